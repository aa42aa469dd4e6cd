"""Flower's Deployment Engine on this machine: a SuperLink, one SuperNode per hospital, `flwr run`.

`run()` is the `train-federated` stage. It starts `flower-superlink` and one `flower-supernode`
per hospital (through `fedbrain.federated.supernode`) as separate processes on loopback,
registers each SuperNode's public key, submits the app in `fedbrain/federated/app` and streams
the ServerApp's log as it arrives (through the SuperLink's Control API, as
`flwr supernode register` and `flwr run --stream` do; see `control.py`), and stops every
process it started when the run ends, fails or is interrupted.

Secure by default: TLS on every connection (a private CA and a SuperLink certificate) and
SuperNode authentication (the SuperLink admits only registered keys), all made on first use by
`fedbrain.federated.certificates`. `insecure=True` turns both off and prints a warning.

Each process runs in its own session, so stopping it means stopping its process group: the
SuperLink and SuperNodes start `flower-superexec`, which starts a `flwr-serverapp` or
`flwr-clientapp` per run or message, and killing only the parent would leave those behind
(`processes.py`).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import psutil
import tomli
import tomli_w

from fedbrain import tracking
from fedbrain.config import get, section, with_variant
from fedbrain.dataset import HOSPITAL_FOLDER
from fedbrain.errors import InputError
from fedbrain.federated.certificates import Pki, ensure_pki, ensure_supernode_key
from fedbrain.federated import lean, preflight
from fedbrain.federated.control import Control
from fedbrain.federated.encrypted import EncryptionSettings
from fedbrain.federated.processes import (LOOPBACK, STOP_GRACE_S, free_port, process_tree, stop_process_groups,
                                          wait_for_port)
from fedbrain.federated.settings import FederatedSettings
from fedbrain.privacy.settings import PrivacySettings

APP_TEMPLATE = Path(__file__).parent / "app" / "pyproject.toml"
FEDERATION = "local"

INSECURE_WARNING = ("WARNING: --insecure: TLS and SuperNode authentication are OFF. Model updates "
                    "travel in clear text and any process that reaches the SuperLink can join the "
                    "federation. Use this only for debugging on a trusted machine.")


def hospitals_in(partition: Path) -> list[int]:
    """Hospital numbers that have a folder in the partition (hospital_<k>/index.parquet)."""
    ks = sorted(int(p.parent.name.split("_", 1)[1]) for p in partition.glob("hospital_*/index.parquet"))
    if not ks:
        raise InputError(f"{partition}: no hospital_<k>/index.parquet; run the partition stage first "
                         f"(dvc repro partition)")
    return ks


@dataclass
class Started:
    name: str
    proc: subprocess.Popen
    log_path: Path
    appio_port: int | None = None  # a SuperNode's ClientAppIo port (loopback)
    # Every process of its tree seen so far: psutil.Process refuses to signal a reused pid.
    tree: dict[int, psutil.Process] = field(default_factory=dict)


class Federation:
    """A SuperLink and its SuperNodes as local processes; `close()` stops all of them.

    Usable as a context manager. Tests use the same object to start a SuperNode late, kill one
    mid-run, or connect one without its key or without the CA certificate.
    """

    def __init__(self, workdir: Path, pki: Pki | None, echo: Callable[[str], None] = print,
                 env: dict[str, str] | None = None, paillier_private_key: Path | None = None,
                 threads: int | None = None):
        self.workdir = Path(workdir).resolve()
        # Encrypted aggregation: the key every hospital's SuperNode is given (never the SuperLink).
        self.paillier_private_key = paillier_private_key
        self.pki = pki
        self.secure = pki is not None
        self.echo = echo
        self.logs = self.workdir / "logs"
        self.flwr_home = self.workdir / "flwr_home"
        self.app_dir = self.workdir / "app"
        for path in (self.logs, self.flwr_home, self.app_dir):
            path.mkdir(parents=True, exist_ok=True)
        self.ports_given: set[int] = set()  # every port this federation chose: never one twice (free_port)
        self.ports = {api: free_port(self.ports_given) for api in ("fleet", "control", "serverappio")}
        self.superlink: Started | None = None
        self.control: Control | None = None
        self.supernodes: dict[str, Started] = {}
        self.clientapps: dict[str, Started] = {}  # hospital name -> its ClientApp process
        self.env = self._environment(env)
        if threads is not None:  # TensorFlow's pools in every process (federated.hospital_threads)
            self.env.update(TF_NUM_INTRAOP_THREADS=str(threads), TF_NUM_INTEROP_THREADS=str(threads))

    # environment shared by every process of the federation
    def _environment(self, extra: dict[str, str] | None) -> dict[str, str]:
        env = dict(os.environ)
        bin_dir = str(Path(sys.executable).parent)
        # The SuperLink/SuperNode start `flower-superexec`, `flwr-serverapp`, `flwr-clientapp` by
        # name: they must come from this environment, whatever the caller's PATH says.
        # Flower processes that train nothing run without TensorFlow (lean.py): the shims shadow the
        # Flower commands a Flower process starts by name.
        shims = str(lean.write_shims(self.workdir / "bin"))
        env["PATH"] = os.pathsep.join([shims, bin_dir, env.get("PATH", "")])
        env["FLWR_HOME"] = str(self.flwr_home)  # installed app bundles stay inside the run's folder
        env["FLWR_TELEMETRY_ENABLED"] = "0"
        env["PYTHONUNBUFFERED"] = "1"
        env.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
        env.update(extra or {})
        return env

    def __enter__(self) -> Federation:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def control_address(self) -> str:
        return f"{LOOPBACK}:{self.ports['control']}"

    @property
    def fleet_address(self) -> str:
        return f"{LOOPBACK}:{self.ports['fleet']}"

    def _spawn(self, name: str, cmd: list[str]) -> Started:
        log_path = self.logs / f"{name}.log"
        handle = log_path.open("ab")
        # start_new_session: own process group, so stop_process_groups reaches its children too;
        # it also keeps a terminal's Ctrl-C from reaching them before the launcher cleans up.
        proc = subprocess.Popen(cmd, cwd=self.workdir, env=self.env, stdout=handle,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        handle.close()
        return Started(name, proc, log_path)

    # --- SuperLink -----------------------------------------------------------------------------
    def start_superlink(self) -> None:
        cmd = [sys.executable, "-m", "fedbrain.federated.lean", "flower-superlink",
               "--fleet-api-address", self.fleet_address,
               "--control-api-address", self.control_address,
               "--serverappio-api-address", f"{LOOPBACK}:{self.ports['serverappio']}",
               "--flwr-dir", str(self.flwr_home)]
        if self.secure:
            cmd += ["--ssl-ca-certfile", str(self.pki.ca_cert), "--ssl-certfile", str(self.pki.server_cert),
                    "--ssl-keyfile", str(self.pki.server_key), "--enable-supernode-auth"]
        else:
            cmd += ["--insecure"]
        self.superlink = self._spawn("superlink", cmd)
        for api in ("fleet", "control", "serverappio"):
            wait_for_port(self.ports[api], self.superlink.proc, f"flower-superlink ({api} API)",
                          self.superlink.log_path)
        self.write_app()
        self.control = Control(self.control_address, self.pki.ca_cert if self.secure else None)

    def write_app(self) -> Path:
        """The app folder: the template plus this federation's address and CA, so that the `flwr`
        CLI also works against the running federation (e.g. `flwr ls <workdir>/app`)."""
        config = tomli.loads(APP_TEMPLATE.read_text())
        federation: dict = {"address": self.control_address}
        if self.secure:
            federation["root-certificates"] = str(self.pki.ca_cert)
        else:
            federation["insecure"] = True
        config["tool"]["flwr"]["federations"] = {"default": FEDERATION, FEDERATION: federation}
        (self.app_dir / "pyproject.toml").write_text(tomli_w.dumps(config))
        # A bundle needs a file besides pyproject.toml (flwr 1.23 rejects an empty CONTENT list).
        shutil.copyfile(APP_TEMPLATE.with_name("README.md"), self.app_dir / "README.md")
        return self.app_dir

    # --- SuperNodes ----------------------------------------------------------------------------
    def register(self, name: str) -> int:
        """Add a SuperNode's public key to the SuperLink's allow list: its node id."""
        _, public = ensure_supernode_key(self.pki, name)
        return self.control.register_node(public)

    def start_supernode(self, hospital: int, *, name: str | None = None, register: bool = True,
                        hospitals: int | None = None, ca_cert: Path | None | str = "default",
                        auth_key: bool = True, paillier_key: Path | None | str = "default") -> Started:
        """Start the SuperNode of `hospital` (node config partition-id=<hospital>).

        `register=False` skips registering its public key (done already, or, to test the security
        boundary, never); `ca_cert=None` starts it without the federation's CA certificate;
        `paillier_key` gives it another Paillier private key than the federation's.
        """
        name = name or f"hospital_{hospital}"
        node_config = f"partition-id={hospital} hospital-name=\"{name}\""
        if hospitals is not None:
            node_config += f" num-partitions={hospitals}"
        key = self.paillier_private_key if paillier_key == "default" else paillier_key
        if key is not None:
            node_config += f" paillier-private-key=\"{Path(key).resolve()}\""
        appio_port = free_port(self.ports_given)
        appio = f"{LOOPBACK}:{appio_port}"
        # --isolation process: the ClientApp runs in this hospital's clientapp_runtime process
        # (started below, TensorFlow imported once), not in a new process per message.
        # fedbrain.federated.supernode: `flower-supernode` with shorter polls and a reply race closed.
        # Each hospital has its own Flower home (app bundles, the SuperNode's file store), as separate
        # sites would: SuperNodes sharing one rewrite the same bundle's files when one joins, and a
        # ClientApp reading them then fails (seen: an empty bundle metadata file, the round stalled).
        home = self.flwr_home / name
        home.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "fedbrain.federated.supernode", "--superlink", self.fleet_address,
               "--isolation", "process",
               "--clientappio-api-address", appio,
               "--node-config", node_config, "--flwr-dir", str(home)]
        if self.secure:
            private, _ = ensure_supernode_key(self.pki, name)
            if register:
                self.register(name)
            cert = self.pki.ca_cert if ca_cert == "default" else ca_cert
            if cert is not None:
                cmd += ["--root-certificates", str(cert)]
            if auth_key:
                cmd += ["--auth-supernode-private-key", str(private)]
        else:
            cmd += ["--insecure"]
        started = self._spawn(f"supernode_{name}", cmd)
        started.appio_port = appio_port
        self.supernodes[name] = started
        self.clientapps[name] = self._spawn(f"clientapp_{name}", [
            sys.executable, "-m", "fedbrain.federated.clientapp_runtime", "--appio-api-address", appio,
            "--flwr-dir", str(home), "--parent-pid", str(started.proc.pid)])
        return started

    def start_supernodes(self, hospitals: list[int]) -> None:
        """One SuperNode per hospital, each key registered first."""
        if self.secure:
            for k in hospitals:
                self.register(f"hospital_{k}")
        for k in hospitals:
            self.start_supernode(k, register=False, hospitals=len(hospitals))
        # Every SuperNode must be up before the run starts, or the run would go on without that
        # hospital. Its ClientAppIo port was free when chosen but may be taken before it binds
        # (another federation on the machine): that SuperNode exits, and starts again on a new port.
        for k in hospitals:
            name = f"hospital_{k}"
            try:
                self._wait_supernode(name)
            except RuntimeError:
                if "already in use" not in self.supernodes[name].log_path.read_text(errors="replace"):
                    raise
                self.echo(f"federation: {name}'s ClientAppIo port was taken meanwhile; starting it again")
                stop_process_groups([self.clientapps[name].proc], grace=STOP_GRACE_S)
                self.start_supernode(k, register=False, hospitals=len(hospitals))
                self._wait_supernode(name)

    def _wait_supernode(self, name: str) -> None:
        started = self.supernodes[name]
        wait_for_port(started.appio_port, started.proc, f"the SuperNode of {name}", started.log_path)

    def kill_supernode(self, name: str, sig: int = signal.SIGKILL) -> None:
        """Stop one SuperNode and its ClientApp process (SIGKILL: a crash, no goodbye to the SuperLink)."""
        stop_process_groups([self.supernodes[name].proc, self.clientapps[name].proc], sig=sig, grace=STOP_GRACE_S)

    def stop_hospitals_without_clientapp(self) -> None:
        """Stop the SuperNode of a hospital whose ClientApp process has exited (an import error, out
        of memory): the SuperNode would keep taking messages nobody answers and the round would wait
        for round-timeout. Stopped, it misses its heartbeats, the SuperLink reports the hospital as
        failed (as for a crash) and the run goes on with the others."""
        for name, clientapp in self.clientapps.items():
            supernode = self.supernodes[name]
            if clientapp.proc.poll() is not None and supernode.proc.poll() is None:
                self.echo(f"federation: {name}'s ClientApp process exited with code {clientapp.proc.returncode} "
                          f"(see {clientapp.log_path}); stopping its SuperNode, the run goes on without it")
                self.kill_supernode(name)

    # --- runs ----------------------------------------------------------------------------------
    def submit(self, run_config: dict, on_line: Callable[[str], None] | None = None) -> RunHandle:
        """Start a run of the app with these run-config overrides; its log streams to `on_line`."""
        (self.workdir / "run_config.toml").write_text(tomli_w.dumps(run_config))  # for the record
        run_id = self.control.start_run(self.app_dir, run_config)
        handle = RunHandle(self, run_id, on_line or self.echo)
        handle.start()
        return handle

    def run_status(self, run_id: int) -> str:
        """'finished:completed', 'finished:failed', 'running', ..."""
        return self.control.status(run_id)

    def nodes(self) -> list[dict]:
        """The SuperLink's registered SuperNodes with their status (registered, online, offline)."""
        return self.control.nodes()

    def pids(self) -> set[int]:
        """Every live process this federation started, with their descendants."""
        pids: set[int] = set()
        for started in self.all_started():
            for proc in process_tree(started.proc.pid):
                started.tree.setdefault(proc.pid, proc)
                pids.add(proc.pid)
        return pids

    def all_started(self) -> list[Started]:
        return [s for s in (self.superlink, *self.supernodes.values(), *self.clientapps.values()) if s is not None]

    def close(self) -> None:
        """Stop every process group this federation started, and anything left of their trees."""
        if self.control is not None:
            self.control.close()
        started = self.all_started()
        self.pids()  # remember every descendant before the parents go
        stop_process_groups([s.proc for s in started])
        leftovers = []
        for proc in (p for s in started for p in s.tree.values()):
            try:
                if proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE:
                    proc.kill()
                    leftovers.append(proc)
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(leftovers, timeout=STOP_GRACE_S)


class RunHandle:
    """A submitted run: its id, its streamed ServerApp log (also in logs/serverapp_<id>.log), its end."""

    def __init__(self, federation: Federation, run_id: int, on_line: Callable[[str], None]):
        self.federation = federation
        self.run_id = run_id
        self.on_line = on_line
        self.lines: list[str] = []
        self.log_path = federation.logs / f"serverapp_{run_id}.log"
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._pump, name=f"run-{run_id}-log", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _pump(self) -> None:
        with self.log_path.open("a") as log_file:
            def line(text: str) -> None:
                self.lines.append(text)
                log_file.write(text + "\n")
                log_file.flush()
                self.on_line(text)
            try:
                self.federation.control.stream_logs(self.run_id, line)
            except BaseException as exc:  # reported by wait(), not lost in this thread
                self.error = exc

    def wait(self, poll: float = 1.0) -> str:
        """Block until the run ends: its final status ('finished:completed', ...)."""
        # join() with a timeout, so a signal (Ctrl-C, SIGTERM) reaches the main thread promptly.
        while self._thread.is_alive():
            self._thread.join(timeout=0.5)
            self.federation.stop_hospitals_without_clientapp()
        status = self.federation.run_status(self.run_id)
        while not status.startswith("finished"):  # the stream broke off: ask until it ends
            time.sleep(poll)
            status = self.federation.run_status(self.run_id)
        return status


# --- the stage ---------------------------------------------------------------------------------

def run_config(settings: FederatedSettings, params: dict, role: str, processed: Path, partition: Path,
               out: Path, *, resume: bool, secure: bool, paillier_public_key: Path | None = None) -> dict:
    """One role's run settings as the app's run-config keys (see app/pyproject.toml)."""
    return {
        "processed": str(processed.resolve()),
        "partition": str(partition.resolve()),
        "out": str(out.resolve()),
        "role": role,
        "rounds": settings.rounds,
        "local-epochs": settings.local_epochs,
        "seed": get(section(params, "train"), "seed", int, "train", default=42),
        "train-params": json.dumps(settings.hospital_training(params, role)),
        "params": json.dumps(params),
        "fraction-train": settings.fraction_train,
        "fraction-evaluate": settings.fraction_evaluate,
        "min-train-nodes": settings.min_train_nodes,
        "min-evaluate-nodes": settings.min_evaluate_nodes,
        "min-available-nodes": settings.min_available_nodes,
        "round-timeout": settings.round_timeout,
        "node-wait-timeout": settings.node_wait_timeout,
        "resume": resume,
        "run-name": f"federated-{out.name}-{role}",
        "secure": secure,
        "calibration-images": settings.calibration_images[role],
        "lr-decay": settings.lr_decay,
        "privacy": json.dumps(PrivacySettings.from_params(params).to_dict()),
        "secure-aggregation": json.dumps(EncryptionSettings.from_params(section(params, "federated")).to_dict()),
        "paillier-public-key": str(paillier_public_key.resolve()) if paillier_public_key else "",
        "hospital-threads": settings.threads_per_hospital(len(hospitals_in(partition))),
        "strategy": json.dumps(settings.strategy.to_dict()),
        "personalization": settings.personalization,
    }


def _raise_on_sigterm():
    """Turn SIGTERM (e.g. `dvc repro` being stopped) into KeyboardInterrupt so cleanup runs."""
    if threading.current_thread() is not threading.main_thread():
        return None

    def handler(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    return signal.signal(signal.SIGTERM, handler)


def paillier_keys(state: Path, params: dict, echo: Callable[[str], None] = print) -> tuple[Path | None, Path | None]:
    """(public, private) key files of the federation's Paillier key pair with federated.secure_aggregation
    paillier, else (None, None). Both launchers use this one pair: the private key goes to hospitals only."""
    encryption = EncryptionSettings.from_params(section(params, "federated"))
    if not encryption.enabled:
        return None, None
    from fedbrain.secure.paillier import ensure_keys

    # One key pair per federation, beside the TLS material, made on first use.
    public, private = ensure_keys(state / "pki" / "paillier", encryption.key_bits)
    echo(f"federation: Paillier {encryption.key_bits}-bit encrypted aggregation (public key {public})")
    return public, private


def prepare(params: dict, processed: Path, partition: Path, out: Path, resume: bool,
            echo: Callable[[str], None] = print) -> tuple[FederatedSettings, list[str], list[int]]:
    """Check everything a run needs before starting any process."""
    settings = FederatedSettings.from_params(params)
    roles = settings.resolve_roles(processed)
    for role in roles:
        settings.hospital_training(params, role)  # train.<role> must exist
    hospitals = hospitals_in(partition)
    preflight.check(params, settings, roles, partition, hospitals, echo)
    if len(hospitals) < settings.min_available_nodes:
        raise InputError(f"{partition}: {len(hospitals)} hospital(s) but federated.min_available_nodes is "
                         f"{settings.min_available_nodes}; lower it or partition into more hospitals")
    if resume and not any((out / "checkpoints").glob("*/state.json")):
        raise InputError(f"{out}: no saved round to resume from; run without --resume")
    return settings, roles, hospitals


def run(params: dict, processed: Path, partition: Path, out: Path, resume: bool = False,
        insecure: bool = False, echo: Callable[[str], None] = print, variant: str | None = None) -> dict:
    """The train-federated stage: FedAvg over the partition's hospitals -> `out`.

    `variant`: params.yaml `variants.<name>` laid over the settings (privacy, encryption).
    Per role (classifier, and segmenter when the data has masks): `out/checkpoints/<role>/`
    every round, then `out/<role>.keras` with its card; `out/history.json` for all roles.
    Returns {role: history}. `federated.launcher: kubernetes`: the same federation as pods (cluster.py).
    """
    processed, partition, out = Path(processed), Path(partition), Path(out)
    params = with_variant(params, variant)
    settings, roles, hospitals = prepare(params, processed, partition, out, resume, echo)
    if settings.launcher == "kubernetes":
        from fedbrain.federated.cluster import run as run_on_cluster

        return run_on_cluster(params, settings, roles, hospitals, processed, partition, out, resume=resume,
                              insecure=insecure, echo=echo)
    state = Path(settings.state_dir).resolve()  # the Flower processes run with another cwd
    workdir = state / "federation" / out.name
    shutil.rmtree(workdir, ignore_errors=True)  # the previous run's logs and app bundles
    if insecure:
        echo(INSECURE_WARNING)
    pki = None if insecure else ensure_pki(state / "pki")
    public_key, private_key = paillier_keys(state, params, echo)
    out.mkdir(parents=True, exist_ok=True)
    if not resume:
        (out / "history.json").unlink(missing_ok=True)
        for old in out.iterdir():  # an earlier run's personalized models
            if HOSPITAL_FOLDER.fullmatch(old.name):
                shutil.rmtree(old, ignore_errors=True)
    params = tracking.absolute_params(params)

    previous = _raise_on_sigterm()
    threads = settings.threads_per_hospital(len(hospitals))
    federation = Federation(workdir, pki, echo=echo, env={"MLFLOW_TRACKING_URI": params["mlflow"]["tracking_uri"]},
                            paillier_private_key=private_key, threads=threads)
    statuses = {}
    try:
        echo(f"federation: SuperLink on {federation.fleet_address} (TLS and SuperNode authentication "
             f"{'off' if insecure else 'on'}), hospitals {hospitals}, {settings.rounds} rounds of "
             f"{settings.local_epochs} local epochs, roles {roles}, {threads} TensorFlow thread(s) per process; "
             f"logs in {federation.logs}")
        clock = time.perf_counter()
        federation.start_superlink()
        echo(f"federation: SuperLink ready ({time.perf_counter() - clock:.1f} s)")
        clock = time.perf_counter()
        federation.start_supernodes(hospitals)
        echo(f"federation: {len(hospitals)} SuperNodes {'registered and ' if pki else ''}started "
             f"({time.perf_counter() - clock:.1f} s)")
        for role in roles:
            config = run_config(settings, params, role, processed, partition, out,
                                resume=resume and (out / "checkpoints" / role / "state.json").is_file(),
                                secure=not insecure, paillier_public_key=public_key)
            clock = time.perf_counter()
            handle = federation.submit(config)
            statuses[role] = status = handle.wait()
            echo(f"federation: {role} run {handle.run_id} {status} ({time.perf_counter() - clock:.1f} s)")
            if status != "finished:completed":
                raise RuntimeError(f"federated {role} run {handle.run_id} ended as {status}; its ServerApp "
                                   f"log is in {handle.log_path}")
    finally:
        clock = time.perf_counter()
        federation.close()
        echo(f"federation: every process stopped ({time.perf_counter() - clock:.1f} s)")
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    history = json.loads((out / "history.json").read_text())
    echo(f"federation: {', '.join(f'{r} {s}' for r, s in statuses.items())}; global models in {out}")
    return history
