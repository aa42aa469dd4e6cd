"""A local federation's memory, process by process, and what TensorFlow cost Flower's own processes (not a test).

  .venv/bin/python bench/federation_memory.py [--hospitals N]   (default 3)

Starts the federation `train-federated` starts (fedbrain.federated.launcher: SuperLink with its
SuperExec, one SuperNode and one ClientApp runtime per hospital, TLS and authentication on), waits
until every SuperNode is online, and reads each process's PSS (proportional set size: shared pages
split between the processes that share them, so the figures add up). No run is submitted: this is
the federation standing, before any model or data is loaded.

Baseline, measured in the same call: Flower's own processes import TensorFlow through Flower's
optional TensorBoard logger unless fedbrain.federated.lean blocks it. For each Flower entry module
(SuperLink, SuperExec, SuperNode) a bare process imports it twice, once as Flower's command would
(TensorFlow importable) and once blocked; the difference is what each Flower process of the
federation would carry without lean.py. Issue 16 item 7: Flower's own processes without TensorFlow,
and the memory per added hospital.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH.parent / "src"))

import psutil  # noqa: E402

from fedbrain.federated.certificates import ensure_pki  # noqa: E402
from fedbrain.federated.launcher import Federation  # noqa: E402

WORK = BENCH.parent / "build" / "bench" / "federation-memory"
MB = 2 ** 20
# The module each Flower command imports before doing anything (their console-script entry points).
FLOWER_MODULES = {"superlink": "flwr.server.app", "superexec": "flwr.supercore.cli", "supernode": "flwr.supernode.cli"}


def pss(proc: psutil.Process) -> float:
    return proc.memory_full_info().pss / MB


def loads_tensorflow(proc: psutil.Process) -> bool:
    return any("tensorflow" in m.path for m in proc.memory_maps())


def role(cmdline: list[str]) -> str:
    command = " ".join(cmdline[1:4])  # `-m fedbrain.federated.<module>` or `-m ...lean flower-<command>`
    for name, marker in (("clientapp", "clientapp_runtime"), ("superexec", "flower-superexec"),
                         ("supernode", "supernode"), ("superlink", "flower-superlink")):
        if marker in command:
            return name
    return "other"


def standing_federation(hospitals: int) -> tuple[list[dict], float]:
    """Each process of a standing federation: role, PSS, whether TensorFlow is mapped in it."""
    started = time.monotonic()
    with Federation(WORK / "run", ensure_pki(WORK / "pki"), echo=lambda line: None) as federation:
        federation.start_superlink()
        federation.start_supernodes(list(range(hospitals)))
        deadline = time.monotonic() + 120
        while sum(n["status"] == "online" for n in federation.nodes()) < hospitals:
            if time.monotonic() > deadline:
                raise SystemExit("the SuperNodes did not all come online within 120 s")
            time.sleep(0.5)
        up_s = time.monotonic() - started
        time.sleep(5)  # let the ClientApp runtimes finish importing
        rows = []
        for pid in sorted(federation.pids()):
            proc = psutil.Process(pid)
            rows.append({"pid": pid, "role": role(proc.cmdline()), "pss_mb": pss(proc),
                         "tensorflow": loads_tensorflow(proc)})
    return rows, up_s


def import_cost(module: str, blocked: bool) -> float:
    """PSS of a bare process that has imported `module`, with TensorFlow importable or blocked."""
    block = "from fedbrain.federated.lean import block_tensorflow; block_tensorflow(); " if blocked else ""
    code = f"import sys; {block}import {module}; print('ready', flush=True); sys.stdin.read()"
    proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready", f"importing {module} failed"
        return pss(psutil.Process(proc.pid))
    finally:
        proc.stdin.close()
        proc.wait(timeout=30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hospitals", type=int, default=3)
    args = parser.parse_args()

    rows, up_s = standing_federation(args.hospitals)
    print(f"BENCH federation memory, {args.hospitals} hospitals, standing (no run), up in {up_s:.1f} s")
    by_role: dict[str, list[dict]] = {}
    for row in rows:
        by_role.setdefault(row["role"], []).append(row)
    for name, members in sorted(by_role.items()):
        with_tf = sum(r["tensorflow"] for r in members)
        print(f"  {name:10s} x{len(members)}: {sum(r['pss_mb'] for r in members):7.0f} MB PSS "
              f"({members[0]['pss_mb']:.0f} MB each; TensorFlow loaded in {with_tf} of {len(members)})")
    total = sum(r["pss_mb"] for r in rows)

    extra = {}
    for name, module in FLOWER_MODULES.items():
        extra[name] = import_cost(module, blocked=False) - import_cost(module, blocked=True)
        print(f"  baseline: importing {module} with TensorFlow importable costs {extra[name]:.0f} MB more PSS")
    flower_lean = [r for r in rows if r["role"] in FLOWER_MODULES]
    baseline = total + sum(extra[r["role"]] for r in flower_lean if not r["tensorflow"])
    per_hospital = sum(r["pss_mb"] for r in rows if r["role"] in ("supernode", "clientapp")) / args.hospitals
    print(f"federation: {total:.0f} MB PSS; with TensorFlow in Flower's processes (baseline) {baseline:.0f} MB; "
          f"ratio {total / baseline:.2f}")
    print(f"per added hospital (SuperNode + ClientApp runtime): {per_hospital:.0f} MB, baseline "
          f"{per_hospital + extra['supernode']:.0f} MB")
    leaks = [r for r in flower_lean if r["tensorflow"]]
    if leaks:
        print(f"NOT MET: TensorFlow is loaded in Flower processes {[r['pid'] for r in leaks]}")


if __name__ == "__main__":
    main()
