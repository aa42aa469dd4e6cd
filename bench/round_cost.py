"""One federated round taken apart, phase by phase, and what it costs beyond its training (not a test).

  .venv/bin/python bench/round_cost.py [sample] [full] [--rounds R]
  (default: sample, 2 rounds; round 1 also pays for building the model and its first tracing, and the
  last round for the last model's calibration and evaluation: with --rounds 4 or more the median
  leaves both out)

sample  the embedded data/sample/brain-tumor-mri with params.yaml's partition (3 hospitals, Dirichlet)
full    ../shared/data/brain-tumor-mri/Training, 3 hospitals, Dirichlet alpha 0.5 (bench/federated.py's split)

A real FedAvg federation (fedbrain.federated.launcher: SuperLink and SuperNodes on loopback, TLS and
authentication on) with params.yaml's federated and train.classifier settings. Each hospital times
every part of its message (fedbrain/federated/phases.py): settings, model, evaluation of the previous
global model, decoding and setting the weights, BatchNorm calibration, fit (first epoch, the other
epochs, datasets; then the one validation of what it sends), encoding the reply; and the whole handling by
its own clock, so a part nobody timed is printed as `untimed`. Per round it prints:
  - each hospital's phases, and its fixed cost: handling time - local epochs x its steady epoch (the
    median of its epochs after the first, timed in its own process, under the same contention);
  - the round's fixed cost: round wall time - local epochs x the slowest hospital's steady epoch
    (the slowest hospital is the round's critical path; the remainder beyond its handling is
    transport, Flower's polling and the server's work, measured as that difference);
  - federated / centralized wall time for equal image passes: the round's wall time over local
    epochs x the steady epoch of the centralized fit (all training images, all cores) in this process.
Targets (issue 22): fixed cost <= 1 s per hospital per round on the sample; ratio <= 1.5 on the
sample and <= 1.1 on the full set.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
sys.path.insert(0, str(BENCH.parent / "src"))

import centralized  # noqa: E402  (bench/centralized.py: prepare, WORK, SHARED)
import yaml  # noqa: E402

from fedbrain import train  # noqa: E402
from fedbrain.dataset import load_classes, load_split  # noqa: E402
from fedbrain.federated import launcher  # noqa: E402

WORK = centralized.WORK / "round-cost"
PROJECT = BENCH.parent
DATASETS = {
    "sample": (PROJECT / "data" / "sample" / "brain-tumor-mri", None),
    "full": (centralized.SHARED / "brain-tumor-mri" / "Training", {"scheme": "dirichlet", "hospitals": 3, "alpha": 0.5}),
}
FIXED_TARGET_S = 1.0
RATIO_TARGET = {"sample": 1.5, "full": 1.1}


def bench_params(name: str, rounds: int) -> dict:
    root, partition = DATASETS[name]
    params = yaml.safe_load((PROJECT / "params.yaml").read_text())
    params["data"]["root"] = str(root)
    if partition:
        params["partition"].update(partition)
    params["federated"] = {**params["federated"], "roles": "classifier", "rounds": rounds,
                           "state_dir": str(WORK / "federated-state")}
    params["mlflow"] = {**params["mlflow"], "tracking_uri": f"sqlite:///{WORK / 'mlflow.db'}",
                        "artifact_location": str(WORK / "mlruns"), "log_models": False}
    return params


def hospital_phases(hospital: dict) -> dict[str, float]:
    return {key[len("phase_"):-len("_s")]: value for key, value in hospital.items()
            if key.startswith("phase_") and key != "phase_handler_s"}


def round_report(record: dict, epochs: int, central_epoch: float) -> tuple[list[str], float, float]:
    """Lines for one round, its fixed cost and its federated / centralized ratio."""
    lines = [f"  round {record['round']}: wall {record['wall_time_s']:.2f} s"]
    slowest = None
    for k, hospital in sorted(record["hospitals"].items()):
        if "phase_handler_s" not in hospital:
            continue
        phases = hospital_phases(hospital)
        handler = hospital["phase_handler_s"]
        untimed = handler - sum(phases.values())
        steady = hospital.get("steady_epoch_s", float("nan"))
        fixed = handler - epochs * steady
        parts = ", ".join(f"{name} {seconds:.2f}" for name, seconds in phases.items())
        lines.append(f"    hospital {k} ({hospital.get('examples', 0)} images): handling {handler:.2f} s = {parts}, "
                     f"untimed {untimed:.2f} ({untimed / handler:.1%}); steady epoch {steady:.2f} s; "
                     f"fixed cost in its process {fixed:.2f} s")
        if slowest is None or handler > slowest[1]["phase_handler_s"]:
            slowest = (k, hospital)
    k, hospital = slowest
    transport = record["wall_time_s"] - hospital["phase_handler_s"]
    fixed = record["wall_time_s"] - epochs * hospital["steady_epoch_s"]
    ratio = record["wall_time_s"] / (epochs * central_epoch)
    lines.append(f"    slowest hospital {k}; beyond its handling (transport, polling, server) {transport:.2f} s; "
                 f"round fixed cost {fixed:.2f} s; federated / centralized for equal image passes {ratio:.2f}x")
    return lines, fixed, ratio


def centralized_epoch(params: dict, processed: Path, parts: Path, epochs: int) -> float:
    """The steady seconds of one centralized epoch over all training images (all cores, as
    train-centralized runs): the median of a warm fit's epochs after the first."""
    import tensorflow as tf

    from fedbrain.federated.phases import fit_timer
    from fedbrain.models import build_model

    opts = {**params["train"]["classifier"]}
    split = load_split(processed, parts, "train")
    classes = load_classes(processed)
    tf.keras.utils.set_random_seed(0)
    model = build_model(opts["model"], split.images.shape[1:], len(classes["classes"]))
    train.compile_model(model, "classification", opts["learning_rate"], label_smoothing=opts["label_smoothing"])
    timer = fit_timer()
    train.fit(model, split, None, "classification", opts, epochs + 1, seed=0, callbacks=[timer], verbose=0)
    return statistics.median(timer.epochs[1:])


def bench(name: str, rounds: int) -> tuple[float, float]:
    params = bench_params(name, rounds)
    processed, parts = centralized.prepare(f"round-cost-{name}", Path(params["data"]["root"]), params)
    out = WORK / name / "fedavg"
    start = time.perf_counter()
    launcher.run(params, processed, parts, out, echo=lambda line: print(f"  | {line}", flush=True))
    wall = time.perf_counter() - start
    card = train.load_card(out / "classifier.keras")
    epochs = int(params["federated"]["local_epochs"])
    central = centralized_epoch(params, processed, parts, epochs)
    print(f"\nBENCH round cost ({name}: {len(load_split(processed, parts, 'train'))} training images, "
          f"{rounds} rounds x {epochs} local epochs, {os.cpu_count()} cores; federation {wall:.0f} s from start "
          f"to stop; centralized steady epoch {central:.2f} s)")
    fixed, ratios = [], []
    # Once per run, not per round: round 1 builds the model and traces it; the last round also holds
    # the last model's calibration and evaluation exchange. With 4 rounds or more both are left out of
    # the median (and printed above); with fewer only round 1 is.
    last = len(card["round_records"])
    kept = range(2, last) if last >= 4 else range(2, last + 1)
    for record in card["round_records"]:
        lines, round_fixed, ratio = round_report(record, epochs, central)
        print("\n".join(lines))
        if record["round"] in kept:
            fixed.append(round_fixed)
            ratios.append(ratio)
    fixed_s, ratio = statistics.median(fixed or [float("nan")]), statistics.median(ratios or [float("nan")])
    which = f"rounds {kept.start}-{kept.stop - 1}" if len(kept) > 1 else f"round {kept.start}"
    # The hospitals train side by side: the round's fixed cost is what each of them waits beyond its epochs.
    print(f"BENCH {name}: fixed cost of a round, on its slowest hospital ({which}, median) {fixed_s:.2f} s "
          f"(target <= {FIXED_TARGET_S:.0f} s); federated / centralized {ratio:.2f}x (target <= {RATIO_TARGET[name]})",
          flush=True)
    return fixed_s, ratio


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("datasets", nargs="*", help=f"any of {', '.join(DATASETS)} (default: sample)")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    if unknown := set(args.datasets) - set(DATASETS):
        parser.error(f"unknown dataset(s) {', '.join(sorted(unknown))}; choose from {', '.join(DATASETS)}")
    for name in args.datasets or ["sample"]:
        bench(name, args.rounds)


if __name__ == "__main__":
    main()
