"""Federated vs centralized on the real data beside the project (not a test).

  .venv/bin/python bench/federated.py [classifier] [segmenter] [--rounds R] [--local-epochs E] [--resume]
  (default: both, with params.yaml's federated.rounds and federated.local_epochs; --resume continues
  an interrupted bench run from its last saved round, as `fedbrain train-federated --resume` does)

classifier  brain-tumor-mri/Training, 3 hospitals, Dirichlet alpha 0.5: FedAvg through the real
            Deployment Engine (fedbrain.federated.launcher: SuperLink + 3 SuperNodes on loopback,
            TLS and SuperNode authentication on) with params.yaml's `federated` and
            `train.classifier` settings, vs the centralized baseline trained on the same split.
            Prints both test accuracies (target: federated within 2 points), rounds, local
            epochs and wall time.
segmenter   lgg-mri-segmentation, hospitals = real institutions (site): federated U-Net vs the
            centralized one, Dice on the test slices with tumour and per patient (target: within 0.05).
Both print the orchestration overhead per round, (round wall time - slowest hospital's
training time) / round wall time (target: at most 10%).

The data stages and the centralized baseline are bench/centralized.py's (same work folder
build/bench/<dataset>/, so the same split); the baseline is trained here only when that script
has not left one. The federated model goes to build/bench/<dataset>/models/federated/fedavg/.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
sys.path.insert(0, str(BENCH.parent / "src"))

import centralized  # noqa: E402  (bench/centralized.py: params_for, prepare, WORK, SHARED)

from fedbrain import evaluate, train  # noqa: E402
from fedbrain.dataset import load_classes, load_split  # noqa: E402
from fedbrain.federated import launcher  # noqa: E402

WORK = centralized.WORK

DATASETS = {
    # role: (data folder, partition settings)
    "classifier": ("brain-tumor-mri", centralized.SHARED / "brain-tumor-mri" / "Training",
                   {"scheme": "dirichlet", "hospitals": 3, "alpha": 0.5}),
    "segmenter": ("lgg-mri-segmentation", centralized.SHARED / "lgg-mri-segmentation" / "kaggle_3m",
                  {"scheme": "site", "hospitals": 3}),
}


def bench_params(root: Path, partition: dict, role: str, overrides: dict) -> dict:
    params = centralized.params_for(root)
    params["partition"].update(partition)
    params["federated"] = {**params["federated"], "roles": role, "state_dir": str(WORK / "federated-state"),
                           **overrides}
    # Not centralized.py's store: its runs may be writing to that SQLite file right now.
    params["mlflow"] = {**params["mlflow"], "tracking_uri": f"sqlite:///{WORK / 'federated-mlflow.db'}",
                        "artifact_location": str(WORK / "federated-mlruns")}
    return params


def check_partition(parts: Path, partition: dict) -> None:
    report = json.loads((parts / "report.json").read_text())
    for key, value in partition.items():
        if report["settings"].get(key) != value:
            sys.exit(f"{parts}: partitioned with {key}={report['settings'].get(key)}, this bench needs {value}; "
                     f"remove {parts} and rerun")


def centralized_model(params: dict, role: str, processed: Path, parts: Path, models: Path) -> tuple[Path, float | None]:
    path = models / "centralized" / f"{role}.keras"
    if not path.is_file():
        print(f"training the centralized {role} (no baseline from bench/centralized.py yet)", flush=True)
        classes = load_classes(processed)
        train.train_model(params, role, classes, load_split(processed, parts, "train"),
                          load_split(processed, parts, "val"), models / "centralized")
    return path, train.load_card(path).get("train_time_s")


def test_metrics(path: Path, models: Path, processed: Path, parts: Path, params: dict, plots: Path) -> dict:
    test = load_split(processed, parts, "test")
    classes = list(load_classes(processed)["classes"])
    settings = {"threshold": params["evaluate"]["threshold"], "overlays": params["evaluate"]["overlays"],
                "batch_size": params["evaluate"]["batch_size"]}
    return evaluate.evaluate_model(path, models, test, classes, settings, plots)["metrics"]


def overhead_report(card: dict) -> str:
    rows, shares = [], []
    for record in card["round_records"]:
        slowest = max((h.get("train_time_s", 0.0) for h in record["hospitals"].values()), default=0.0)
        share = (record["wall_time_s"] - slowest) / record["wall_time_s"]
        shares.append(share)
        # Of the overhead, the most any hospital spent calibrating and evaluating (the rest is
        # moving weights, polling, averaging and saving).
        spent = {name: max((h.get(f"{name}_time_s", 0.0) for h in record["hospitals"].values()), default=0.0)
                 for name in ("calibration", "evaluation")}
        rows.append(f"    round {record['round']:2d}: wall {record['wall_time_s']:7.1f} s, slowest hospital "
                    f"trained {slowest:7.1f} s, overhead {share:6.1%} (calibration {spent['calibration']:.1f} s, "
                    f"evaluation {spent['evaluation']:.1f} s), global model {_val(record)}, "
                    f"up {record['bytes_up'] / 1e6:.1f} MB / down {record['bytes_down'] / 1e6:.1f} MB")
    return "\n".join(rows) + (f"\n    overhead per round: median {statistics.median(shares):.1%}, "
                              f"max {max(shares):.1%} (target 10%)")


def _val(record: dict) -> str:
    return ", ".join(f"{k}={v:.4f}" for k, v in sorted(record["metrics"].items()) if k.startswith("val_"))


def run_federated(params: dict, processed: Path, parts: Path, models: Path, resume: bool) -> tuple[Path, float]:
    out = models / "federated" / "fedavg"
    start = time.perf_counter()
    launcher.run(params, processed, parts, out, resume=resume, echo=lambda line: print(f"  | {line}", flush=True))
    return out, time.perf_counter() - start


def bench(role: str, overrides: dict, resume: bool) -> None:
    name, root, partition = DATASETS[role]
    params = bench_params(root, partition, role, overrides)
    processed, parts = centralized.prepare(name, root, params)
    check_partition(parts, partition)
    models = WORK / name / "models"
    central_path, central_time = centralized_model(params, role, processed, parts, models)
    out, wall = run_federated(params, processed, parts, models, resume)
    card = train.load_card(out / f"{role}.keras")
    plots = WORK / name / "reports" / "federated-bench"
    central = test_metrics(central_path, models, processed, parts, params, plots)
    federated = test_metrics(out / f"{role}.keras", models, processed, parts, params, plots)
    fed = params["federated"]
    resumed = " (resumed: this call's share)" if resume else ""
    header = (f"\nBENCH federated {role} ({name}, {partition}, {card['model']}): {fed['rounds']} rounds x "
              f"{fed['local_epochs']} local epochs, federated wall time {wall / 60:.1f} min{resumed} "
              f"(centralized training {central_time / 60 if central_time else float('nan'):.1f} min)")
    if role == "classifier":
        gap = central["accuracy"] - federated["accuracy"]
        result = (f"  test accuracy: federated {federated['accuracy']:.4f}, centralized {central['accuracy']:.4f}, "
                  f"gap {gap * 100:+.2f} points (target <= 2); macro F1 federated {federated['macro_f1']:.4f}, "
                  f"centralized {central['macro_f1']:.4f}")
    else:
        gap = central["dice_tumour_slices"] - federated["dice_tumour_slices"]
        result = (f"  Dice on test tumour slices: federated {federated['dice_tumour_slices']:.4f}, centralized "
                  f"{central['dice_tumour_slices']:.4f}, gap {gap:+.4f} (target <= 0.05); per patient: federated "
                  f"{federated['dice']:.4f}, centralized {central['dice']:.4f}")
    print(header + "\n" + result + "\n" + overhead_report(card), flush=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("parts", nargs="*", help="classifier and/or segmenter (default: both)")
    parser.add_argument("--rounds", type=int)
    parser.add_argument("--local-epochs", type=int)
    parser.add_argument("--resume", action="store_true", help="continue from the last saved round")
    args = parser.parse_args()
    if unknown := set(args.parts) - set(DATASETS):
        parser.error(f"unknown part(s) {sorted(unknown)}; use classifier and/or segmenter")
    overrides = {k: v for k, v in (("rounds", args.rounds), ("local_epochs", args.local_epochs)) if v}
    for part in args.parts or ["classifier", "segmenter"]:
        bench(part, overrides, args.resume)
