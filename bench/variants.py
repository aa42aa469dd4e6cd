"""The federated variants side by side on the real 4-class set (not a test).

  .venv/bin/python bench/variants.py [fedavg paillier dp secure ...] [--rounds R] [--local-epochs E] [--reuse]
                                     [--threads T] [--suffix S] [--seed N]

Each named variant (params.yaml `variants`) trains the classifier on brain-tumor-mri/Training,
3 hospitals, Dirichlet alpha 0.5, through the real Deployment Engine (TLS and SuperNode
authentication on), from the same split and seed, one after the other (never two at once on 2
cores). Baseline: the first variant named (fedavg by default). Prints per variant: test accuracy
and macro F1, epsilon (with its delta and accounting), median round wall time, bytes per round,
and the encrypted variants' encryption and shared-decryption seconds; then the ratios the issues
ask for:
  paillier vs fedavg   round time (target <= 1.5), accuracy difference (target within 0.5 points)
  dp vs fedavg         accuracy difference (target within 5 points at epsilon <= 8)
  secure vs dp         round time (target <= 1.5), accuracy difference (target within 0.5 points)
--reuse keeps a variant's model from an earlier call when it exists (build/bench/.../models/federated/<v>/).
--suffix S trains into models/federated/<v>S/ instead (e.g. other rounds beside the default run).
--seed N trains with train.seed N (other initial weights and batch order, the same split) into
models/federated/<v>-seedN/ (unless --suffix names another): compare it with `bench/centralized.py
classifier --seed N`, the centralized run of the same seed.
The data stages and the split are bench/centralized.py's (build/bench/brain-tumor-mri/).
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

import centralized  # noqa: E402
import federated  # noqa: E402  (bench/federated.py: bench_params, test_metrics, DATASETS)

from fedbrain import train  # noqa: E402
from fedbrain.config import load_params  # noqa: E402
from fedbrain.federated import launcher  # noqa: E402

WORK = centralized.WORK


def summary(card: dict) -> dict:
    records = card["round_records"]
    # The last round also drains the pipeline (its calibration and evaluation exchanges): leave it out
    # of the typical round when there are others.
    typical = records[:-1] or records
    hospitals = [h for r in typical for h in r["hospitals"].values()]
    return {
        "round_s": statistics.median(r["wall_time_s"] for r in typical),
        "bytes_up": statistics.median(r["bytes_up"] for r in typical),
        "bytes_down": statistics.median(r["bytes_down"] for r in typical),
        "train_s": statistics.median(max((h.get("train_time_s", 0.0) for h in r["hospitals"].values()), default=0)
                                     for r in typical),
        "encryption_s": statistics.median([h.get("encryption_time_s", 0.0) for h in hospitals] or [0.0]),
        "decryption_s": statistics.median(r.get("decryption_phase_s", 0.0) for r in typical),
    }


def run_variant(variant: str, params: dict, processed: Path, parts: Path, models: Path, reuse: bool,
                suffix: str = "") -> dict:
    out = models / "federated" / f"{variant}{suffix}"
    if not (reuse and (out / "classifier.keras").is_file()):
        start = time.perf_counter()
        launcher.run(params, processed, parts, out, variant=variant,
                     echo=lambda line: print(f"  [{variant}] {line}", flush=True))
        print(f"  [{variant}] {(time.perf_counter() - start) / 60:.1f} min", flush=True)
    card = train.load_card(out / "classifier.keras")
    metrics = federated.test_metrics(out / "classifier.keras", models, processed, parts, params,
                                     WORK / "brain-tumor-mri" / "reports" / "variants-bench")
    return {"card": card, "metrics": metrics, **summary(card)}


def ratio_line(name: str, result: dict, base_name: str, base: dict, round_target: float | None,
               accuracy_points: float) -> str:
    gap = (result["metrics"]["accuracy"] - base["metrics"]["accuracy"]) * 100
    text = f"  {name} vs {base_name}: accuracy {gap:+.2f} points (target within {accuracy_points})"
    if round_target is not None:
        text += f", round time {result['round_s'] / base['round_s']:.2f}x (target <= {round_target})"
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("variants", nargs="*", default=["fedavg", "paillier"])
    parser.add_argument("--rounds", type=int)
    parser.add_argument("--local-epochs", type=int)
    parser.add_argument("--reuse", action="store_true", help="keep models an earlier call trained")
    parser.add_argument("--suffix", default="", help="train into models/federated/<variant><suffix>/")
    parser.add_argument("--seed", type=int, help="train.seed for every variant (into models/federated/<v>-seedN/)")
    parser.add_argument("--threads", type=int, help="federated.hospital_threads (default: params.yaml's); runs "
                        "compared for round time need the same")
    args = parser.parse_args()
    defined = load_params(BENCH.parent / "params.yaml").get("variants", {})
    if unknown := [v for v in args.variants if v not in defined]:
        parser.error(f"unknown variant(s) {unknown}; params.yaml defines {sorted(defined)}")
    name, root, partition = federated.DATASETS["classifier"]
    overrides = {k: v for k, v in (("rounds", args.rounds), ("local_epochs", args.local_epochs),
                                   ("hospital_threads", args.threads)) if v}
    params = federated.bench_params(root, partition, "classifier", overrides)
    params["variants"] = defined
    suffix = args.suffix
    if args.seed is not None:
        params["train"]["seed"] = args.seed
        suffix = suffix or f"-seed{args.seed}"
        if clash := [v for v in args.variants if "seed" in (defined[v] or {}).get("train", {})]:
            parser.error(f"variant(s) {clash} set train.seed themselves; --seed would not apply to them")
    processed, parts = centralized.prepare(name, root, params)
    federated.check_partition(parts, partition)
    models = WORK / name / "models"
    results = {v: run_variant(v, params, processed, parts, models, args.reuse, suffix) for v in args.variants}

    fed = params["federated"]
    print(f"\nBENCH variants, classifier ({name}, {partition}): {fed['rounds']} rounds x {fed['local_epochs']} "
          f"local epochs, same split and seed; median round (last round's drain left out)")
    for variant, r in results.items():
        card, m = r["card"], r["metrics"]
        epsilon = (f"epsilon {card['epsilon']:.2f} at delta {card['delta']:.0e} ({card.get('epsilon_accounting')})"
                   if card.get("epsilon") is not None else "no DP")
        print(f"  {variant:9s} accuracy {m['accuracy']:.4f}, macro F1 {m['macro_f1']:.4f}, {epsilon}; round "
              f"{r['round_s']:.1f} s (slowest hospital trained {r['train_s']:.1f} s), up {r['bytes_up'] / 1e6:.1f} MB "
              f"/ down {r['bytes_down'] / 1e6:.1f} MB per round, encryption {r['encryption_s']:.1f} s per hospital, "
              f"shared decryption {r['decryption_s']:.1f} s; {card.get('aggregation', 'fedavg')}, "
              f"{card['rounds']} rounds run")
    pairs = [("paillier", "fedavg", 1.5, 0.5), ("dp", "fedavg", None, 5.0), ("secure", "dp", 1.5, 0.5)]
    for variant, base, round_target, points in pairs:
        if variant in results and base in results:
            print(ratio_line(variant, results[variant], base, results[base], round_target, points))


if __name__ == "__main__":
    main()
