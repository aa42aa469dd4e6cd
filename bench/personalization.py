"""Personalized models vs the global model under label skew, on the real 4-class set (not a test).

  .venv/bin/python bench/personalization.py [fedavg fedprox fedbn local_head ...] [--alpha 0.1 0.5]
                                            [--rounds R] [--local-epochs E] [--reuse]

brain-tumor-mri/Training, 3 hospitals, Dirichlet label skew at each --alpha (the smaller, the more each
hospital's labels differ from the others'), the same train/val/test split as the other benches (the split
does not depend on alpha: only which hospital holds what). Each hospital also has its own test part, a
partition of the common test split dealt by the same scheme (fedbrain.partition), so each is scored on
images like its own. For each alpha, each named variant (params.yaml `variants`) trains through the real
Deployment Engine (TLS and SuperNode authentication on), one after the other; then the project's
`evaluate` scores every model on every hospital's test part (reports/personalization.csv).

Prints per alpha: each hospital's test accuracy under every global model and every personalized variant's
hospital model, their mean over hospitals, the common test split's accuracy of each global model; then
  personalized vs fedavg   mean per-hospital accuracy (target: not below the global FedAvg model's)
  fedprox vs fedavg        accuracy on the common test split at the same rounds
Baseline: the fedavg variant of the same alpha, same run of this script (or --reuse'd from an earlier one).
Work files: build/bench/personalization/alpha-<a>/ (the processed images are bench/centralized.py's).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
sys.path.insert(0, str(BENCH.parent / "src"))

import centralized  # noqa: E402
import federated  # noqa: E402  (bench/federated.py: bench_params, DATASETS)

import pandas as pd  # noqa: E402

from fedbrain import evaluate, partition  # noqa: E402
from fedbrain.config import load_params  # noqa: E402
from fedbrain.federated import launcher  # noqa: E402

WORK = centralized.WORK / "personalization"


def prepare(alpha: float, overrides: dict) -> tuple[dict, Path, Path]:
    name, root, split = federated.DATASETS["classifier"]
    params = federated.bench_params(root, {**split, "alpha": alpha}, "classifier", overrides)
    params["federated"]["state_dir"] = str(WORK / "federated-state")
    params["mlflow"] = {**params["mlflow"], "tracking_uri": f"sqlite:///{WORK / 'mlflow.db'}",
                        "artifact_location": str(WORK / "mlruns")}
    # The scores this bench prints need no membership audit, registry or MLflow record of evaluate.
    params["evaluate"] = {**params.get("evaluate", {}), "audit": {"members": 0, "seed": 0}, "log_mlflow": False,
                          "register": False}
    processed, _ = centralized.prepare(name, root, federated.bench_params(root, split, "classifier", overrides))
    parts = WORK / f"alpha-{alpha}" / "partition"
    if not (parts / "splits.parquet").is_file():
        partition.run(params, processed, parts)
    federated.check_partition(parts, {**split, "alpha": alpha})
    return params, processed, parts


def train_variants(params: dict, processed: Path, parts: Path, models: Path, variants: list[str],
                   reuse: bool) -> None:
    for variant in variants:
        out = models / "federated" / variant
        if reuse and (out / "classifier.keras").is_file():
            continue
        start = time.perf_counter()
        launcher.run(params, processed, parts, out, variant=variant,
                     echo=lambda line: print(f"  [{variant}] {line}", flush=True))
        print(f"  [{variant}] {(time.perf_counter() - start) / 60:.1f} min", flush=True)


def report(alpha: float, table: pd.DataFrame, comparison: pd.DataFrame, fed: dict) -> None:
    print(f"\nBENCH personalization, brain-tumor-mri, 3 hospitals, Dirichlet alpha {alpha}: {fed['rounds']} rounds x "
          f"{fed['local_epochs']} local epochs; accuracy on each hospital's own test part")
    print(table.to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    mean = table[table["hospital"].astype(str).str.startswith("mean")].iloc[0]
    base = "federated/fedavg/classifier"
    for column in table.columns:
        if "own hospital" in column and base in table.columns:
            print(f"  {column} vs {base}: mean per-hospital accuracy {mean[column]:.4f} vs {mean[base]:.4f} "
                  f"({(mean[column] - mean[base]) * 100:+.2f} points; target: not below)")
    common = comparison.set_index("run")["accuracy"]
    if base in common and "federated/fedprox/classifier" in common:
        print(f"  fedprox vs fedavg on the common test split: {common['federated/fedprox/classifier']:.4f} vs "
              f"{common[base]:.4f} ({(common['federated/fedprox/classifier'] - common[base]) * 100:+.2f} points)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("variants", nargs="*", default=["fedavg", "fedprox", "fedbn", "local_head"])
    parser.add_argument("--alpha", type=float, nargs="+", default=[0.5, 0.1])
    parser.add_argument("--rounds", type=int)
    parser.add_argument("--local-epochs", type=int)
    parser.add_argument("--reuse", action="store_true", help="keep models an earlier call trained")
    args = parser.parse_args()
    defined = load_params(BENCH.parent / "params.yaml").get("variants", {})
    if unknown := [v for v in args.variants if v not in defined]:
        parser.error(f"unknown variant(s) {unknown}; params.yaml defines {sorted(defined)}")
    overrides = {k: v for k, v in (("rounds", args.rounds), ("local_epochs", args.local_epochs)) if v}
    for alpha in args.alpha:
        params, processed, parts = prepare(alpha, overrides)
        params["variants"] = defined
        work = WORK / f"alpha-{alpha}"
        train_variants(params, processed, parts, work / "models", args.variants, args.reuse)
        comparison = evaluate.run(params, processed, parts, work / "models", work / "reports")
        report(alpha, pd.read_csv(work / "reports" / "personalization.csv"), comparison, params["federated"])


if __name__ == "__main__":
    main()
