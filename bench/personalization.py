"""Personalized models vs the global model: label skew on the real 4-class set, or real institutions (not a test).

  .venv/bin/python bench/personalization.py [fedavg fedprox fedbn local_head ...] [--alpha 0.1 0.5]
                                            [--rounds R] [--local-epochs E] [--reuse]
  .venv/bin/python bench/personalization.py --sites [fedavg fedbn ...] [--rounds R] [--local-epochs E]
                                            [--reuse] [--smoke]

Default (label skew): brain-tumor-mri/Training, 3 hospitals, Dirichlet label skew at each --alpha (the
smaller, the more each hospital's labels differ from the others'), the same train/val/test split as the
other benches (the split does not depend on alpha: only which hospital holds what). Each hospital also has
its own test part, a partition of the common test split dealt by the same scheme (fedbrain.partition), so
each is scored on images like its own. For each alpha, each named variant (params.yaml `variants`) trains
through the real Deployment Engine (TLS and SuperNode authentication on), one after the other; then the
project's `evaluate` scores every model on every hospital's test part (reports/personalization.csv).

Prints per alpha: each hospital's test accuracy under every global model and every personalized variant's
hospital model, their mean over hospitals, the common test split's accuracy of each global model; then
  personalized vs fedavg   mean per-hospital accuracy (target: not below the global FedAvg model's)
  fedprox vs fedavg        accuracy on the common test split at the same rounds
Baseline: the fedavg variant of the same alpha, same run of this script (or --reuse'd from an earlier one).
Work files: build/bench/personalization/alpha-<a>/ (the processed images are bench/centralized.py's).

--sites (issue 15, real institutions): lgg-mri-segmentation (TCGA-LGG; federated.DATASETS' segmenter
entry), partition scheme `site`: 3 hospitals of whole institutions, the small ones merged
(partition.site_hospitals: DU, HT, CS+EZ), the U-Net (segmenter role), variants fedavg and fedbn by default,
trained and scored as above. partition.test_fraction is 0.2 here, not params.yaml's 0.15: at 0.15 the seeded
split gives CS+EZ no test patient, so that hospital would have no row. Prints two tables, each comparing the
global fedavg model with each personalized variant's own hospital model on that hospital's own test part
(the difference in points; target: not below):
  per hospital     its institutions, test slices (with tumour), and the Dice evaluate writes per hospital for
                   a segmenter, personalization.csv's `dice_tumour_slices` (its only Dice there: mean Dice over
                   the part's test slices with tumour), then the mean over hospitals;
  per institution  per-patient volume Dice at native resolution, mean over the institution's test patients
                   (evaluate's per-site scores in evaluation.json), then all test patients pooled.
Baseline: the global fedavg model of the same run of this script (or --reuse'd). Defaults: 4 rounds x 4 local
epochs (bench/segmenter_sites.py's federated budget): about 20 minutes per variant on 2 cores (~1 min per local
epoch of ~1,100 training slices, plus the rounds' overhead), evaluate a few more. Work files:
build/bench/personalization/sites/ (the processed slices are bench/centralized.py's).

--smoke (with --sites): 2 patients per institution (bench/segmenter_sites.py's smoke data; test_fraction 0.4
so that each hospital holds a test patient), 1 round x 1 local epoch, in build/bench/personalization/
sites-smoke/: the script end to end in minutes (about 8 on a busy 2-core machine), numbers meaningless.
"""

from __future__ import annotations

import argparse
import json
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
import segmenter_sites  # noqa: E402  (bench/segmenter_sites.py: prepare, the --smoke data)

import pandas as pd  # noqa: E402

from fedbrain import evaluate, partition  # noqa: E402
from fedbrain.config import load_params  # noqa: E402
from fedbrain.federated import launcher  # noqa: E402
from fedbrain.hospital_scores import MEAN_ROW, OWN_MODEL  # noqa: E402

WORK = centralized.WORK / "personalization"
VARIANTS = {"alpha": ["fedavg", "fedprox", "fedbn", "local_head"], "sites": ["fedavg", "fedbn"]}
# --sites: partition settings over federated.DATASETS["segmenter"]'s, and rounds x local epochs (full, smoke).
SITES_SPLIT = {False: {"test_fraction": 0.2}, True: {"test_fraction": 0.4}}
SITES_ROUNDS = {False: (4, 4), True: (1, 1)}
SITES_METRIC = "dice_tumour_slices"


def isolated(params: dict, work: Path) -> dict:
    """``params`` with this bench's own federation state and MLflow store under ``work``, and no
    membership audit, registry or MLflow record of evaluate (the scores printed need none)."""
    params["federated"]["state_dir"] = str(work / "federated-state")
    params["mlflow"] = {**params["mlflow"], "tracking_uri": f"sqlite:///{work / 'mlflow.db'}",
                        "artifact_location": str(work / "mlruns")}
    params["evaluate"] = {**params.get("evaluate", {}), "audit": {"members": 0, "seed": 0}, "log_mlflow": False,
                          "register": False}
    return params


def partitioned(params: dict, processed: Path, parts: Path, settings: dict) -> Path:
    """The partition of ``processed`` at ``parts`` (written once), checked to have ``settings``."""
    if not (parts / "splits.parquet").is_file():
        partition.run(params, processed, parts)
    federated.check_partition(parts, settings)
    return parts


def prepare(alpha: float, overrides: dict) -> tuple[dict, Path, Path]:
    name, root, split = federated.DATASETS["classifier"]
    params = isolated(federated.bench_params(root, {**split, "alpha": alpha}, "classifier", overrides), WORK)
    processed, _ = centralized.prepare(name, root, federated.bench_params(root, split, "classifier", overrides))
    return params, processed, partitioned(params, processed, WORK / f"alpha-{alpha}" / "partition",
                                          {**split, "alpha": alpha})


def sites_work(smoke: bool) -> Path:
    return WORK / ("sites-smoke" if smoke else "sites")


def prepare_sites(smoke: bool, overrides: dict) -> tuple[dict, Path, Path]:
    """(params, processed slices, partition) of --sites: the full set's slices are bench/centralized.py's,
    the smoke's segmenter_sites.py's 2 patients per institution, processed in the smoke's work folder."""
    name, root, split = federated.DATASETS["segmenter"]
    settings = {**split, **SITES_SPLIT[smoke]}
    work = sites_work(smoke)
    params = isolated(federated.bench_params(root, settings, "segmenter", overrides), work)
    if smoke:
        processed = segmenter_sites.prepare(params, work, smoke=True)
    else:
        processed, _ = centralized.prepare(name, root, federated.bench_params(root, split, "segmenter", overrides))
    parts = partitioned(params, processed, work / "partition", settings)
    if missing := json.loads((parts / "report.json").read_text())["hospitals_without_test"]:
        sys.exit(f"{parts}: hospital(s) {missing} hold no test patient, so they would have no row; "
                 f"raise SITES_SPLIT's test_fraction, remove {parts} and rerun")
    return params, processed, parts


def train_variants(params: dict, processed: Path, parts: Path, models: Path, variants: list[str],
                   reuse: bool) -> None:
    role = params["federated"]["roles"]
    for variant in variants:
        out = models / "federated" / variant
        if reuse and (out / f"{role}.keras").is_file():
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


def _points(value: float, base: float) -> str:
    return "-" if pd.isna(value) or pd.isna(base) else f"{(value - base) * 100:+.2f}"


def _dice(value: float) -> str:
    return "-" if pd.isna(value) else f"{value:.4f}"


def _head(first: str, names: list[str]) -> None:
    """A Markdown table's header: the ``first`` columns, the global fedavg model, then per variant its
    own hospital's model and its difference."""
    print(f"| {first} | fedavg global model | "
          + " | ".join(f"{n} own hospital's model | {n} - fedavg (points)" for n in names) + " |")
    print("|---" * (first.count("|") + 2) + "|---|---" * len(names) + "|")


def _beside(values: list[float], base: float) -> str:
    """Each variant's Dice and its difference from the fedavg one, as table cells."""
    return " | ".join(f"{_dice(v)} | {_points(v, base)}" for v in values)


def hospital_facts(details: dict, sites: dict[str, list[str]], base: str) -> dict[str, tuple[str, int]]:
    """{hospital: (its institutions, its test slices with tumour)} from the partition's report and the
    baseline's scores (evaluation.json); the mean row gets every institution and the sum."""
    scored = details[base]["metrics"]["by_hospital"]
    facts = {k: (", ".join(sites[k]), scored[k]["tumour_slices"]) for k in scored}
    return {**facts, MEAN_ROW: (", ".join(s for k in scored for s in sites[k]),
                                sum(t for _, t in facts.values()))}


def _site_dice(details: dict, run: str, site: str) -> tuple[float, int]:
    """(mean per-patient volume Dice at native resolution, patients) of ``run`` on ``site``'s test patients."""
    figures = ((details.get(run) or {}).get("metrics", {}).get("per_site") or {}).get(site) or {}
    return figures.get("dice_native_mean", float("nan")), figures.get("patients", 0)


def report_institutions(details: dict, sites: dict[str, list[str]], base: str, names: list[str]) -> None:
    """Per institution: the global fedavg model vs the own model of the hospital that holds it, on the
    institution's test patients (evaluate's per-site scores), and all of them pooled."""
    print("per institution: per-patient volume Dice at native resolution, mean over its test patients "
          "(evaluate's per-site scores, evaluation.json)")
    _head("institution | hospital | test patients", names)
    pooled = {run: [] for run in [base, *names]}
    for k, codes in sites.items():
        for site in codes:
            dice, patients = _site_dice(details, base, site)
            if not patients:
                continue
            own = [_site_dice(details, f"federated/{n}/hospital_{k}/segmenter", site)[0] for n in names]
            for run, value in zip(pooled, [dice, *own]):
                pooled[run].append((value, patients))
            print(f"| {site} | {k} | {patients} | {_dice(dice)} | {_beside(own, dice)} |")
    mean = {run: sum(v * n for v, n in held) / sum(n for _, n in held) for run, held in pooled.items()}
    print(f"| all test patients | | {sum(n for _, n in pooled[base])} | {_dice(mean[base])} | "
          f"{_beside([mean[n] for n in names], mean[base])} |")


def report_sites(work: Path, parts: Path, fed: dict, smoke: bool) -> None:
    table = pd.read_csv(work / "reports" / "personalization.csv", dtype={"hospital": str})
    block = table[(table["task"] == "segmentation") & (table["metric"] == SITES_METRIC)]
    details = json.loads((work / "reports" / "evaluation.json").read_text())
    sites = json.loads((parts / "report.json").read_text())["sites_per_hospital"]
    base = "federated/fedavg/segmenter"
    own = [c for c in block.columns if c.endswith(OWN_MODEL) and block[c].notna().any()]
    names = [c[:-len(OWN_MODEL)].rsplit("/", 1)[-1] for c in own]
    facts = hospital_facts(details, sites, base)
    print(f"\nBENCH personalization --sites{' --smoke' if smoke else ''} (lgg-mri-segmentation, TCGA-LGG, 3 hospitals "
          f"= real institutions, U-Net): {fed['rounds']} rounds x {fed['local_epochs']} local epochs; Dice on each "
          f"hospital's own test part ({SITES_METRIC}: mean over its test slices with tumour)")
    _head("hospital | institutions | test slices (with tumour)", names)
    for _, row in block.iterrows():
        codes, tumour = facts[row["hospital"]]
        print(f"| {row['hospital']} | {codes} | {row['test_images']} ({tumour}) | {_dice(row[base])} | "
              f"{_beside([row[c] for c in own], row[base])} |")
    mean = block[block["hospital"] == MEAN_ROW].iloc[0]
    for name, column in zip(names, own):
        print(f"  {name} own models vs the global fedavg model: mean per-hospital Dice {_dice(mean[column])} vs "
              f"{_dice(mean[base])} ({_points(mean[column], mean[base])} points; target: not below)")
    report_institutions(details, sites, base, names)


def run_sites(args, defined: dict) -> None:
    rounds, local_epochs = SITES_ROUNDS[args.smoke]
    overrides = {"rounds": args.rounds or rounds, "local_epochs": args.local_epochs or local_epochs}
    params, processed, parts = prepare_sites(args.smoke, overrides)
    params["variants"] = defined
    work = sites_work(args.smoke)
    train_variants(params, processed, parts, work / "models", args.variants, args.reuse)
    evaluate.run(params, processed, parts, work / "models", work / "reports")
    report_sites(work, parts, params["federated"], args.smoke)


def run_alphas(args, defined: dict) -> None:
    overrides = {k: v for k, v in (("rounds", args.rounds), ("local_epochs", args.local_epochs)) if v}
    for alpha in args.alpha:
        params, processed, parts = prepare(alpha, overrides)
        params["variants"] = defined
        work = WORK / f"alpha-{alpha}"
        train_variants(params, processed, parts, work / "models", args.variants, args.reuse)
        comparison = evaluate.run(params, processed, parts, work / "models", work / "reports")
        report(alpha, pd.read_csv(work / "reports" / "personalization.csv"), comparison, params["federated"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("variants", nargs="*", help=f"default {VARIANTS['alpha']}; --sites: {VARIANTS['sites']}")
    parser.add_argument("--alpha", type=float, nargs="+", default=[0.5, 0.1])
    parser.add_argument("--sites", action="store_true", help="TCGA-LGG, hospitals = real institutions, U-Net")
    parser.add_argument("--smoke", action="store_true", help="with --sites: 2 patients per institution, 1 round x 1")
    parser.add_argument("--rounds", type=int)
    parser.add_argument("--local-epochs", type=int)
    parser.add_argument("--reuse", action="store_true", help="keep models an earlier call trained")
    args = parser.parse_args()
    args.variants = args.variants or VARIANTS["sites" if args.sites else "alpha"]
    defined = load_params(BENCH.parent / "params.yaml").get("variants", {})
    if unknown := [v for v in args.variants if v not in defined]:
        parser.error(f"unknown variant(s) {unknown}; params.yaml defines {sorted(defined)}")
    if args.smoke and not args.sites:
        parser.error("--smoke is a --sites option")
    if args.sites and "fedavg" not in args.variants:
        parser.error("--sites compares with the global fedavg model: name fedavg among the variants")
    if args.sites:
        run_sites(args, defined)
    else:
        run_alphas(args, defined)


if __name__ == "__main__":
    main()
