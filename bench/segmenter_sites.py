"""A tumour segmenter at hospitals it has never seen: leave one institution out (not a test).

  .venv/bin/python bench/segmenter_sites.py [--fold SITE ...] [--only centralized|federated]
                                            [--setting NAME] [--epochs E] [--rounds R] [--local-epochs L]
                                            [--smoke] [--report]

On lgg-mri-segmentation (TCGA-LGG: institutions CS, DU, EZ, HT), for each left-out institution
(default CS, DU and HT; EZ has one patient and always stays in training): the other institutions'
patients are split train/val by patient (`partition.leave_site_out`), a U-Net is trained on them
centralized and federated (FedAvg, one hospital per training institution, EZ merged into one, on
the real Deployment Engine as bench/federated.py runs it), and both are scored on every patient of
the left-out institution: per-patient volume Dice at the native 256x256 resolution
(`fedbrain.segmentation_scores`). Prints, for the folds this work folder holds, each fold's mean and
median per-patient Dice, the mean over the folds, every patient's Dice, and each fold's train time.

`--fold SITE` (repeatable) runs only those folds and `--only` only one of the two trainings, so the
bench runs in parts on a 2-core machine; each part saves its result in the fold's folder and the
table gathers whatever folds are there. Budget: one fold (both trainings) in at most 40 minutes on 2
cores. The defaults (centralized 16 epochs; federated 4 rounds x 4 local epochs) are an estimate from
bench/README.md's full-split timings (about 1 min per epoch of ~1,200 training slices, centralized or
federated), not a measurement of a fold: the printed times say what a fold took.

`--setting NAME` trains (or, for an evaluation-only setting, re-scores the baseline's models) with
one of the remedies of issue 21 item 3, so that each is one row of the ablation table the script
prints (SETTINGS below says what each changes); the default is `baseline`: params.yaml's training,
scored without test-time flips.

`--smoke`: 2 patients per institution, 1 epoch, 1 round of 1 local epoch, in its own work folder: the
script end to end in minutes, numbers meaningless.

Work files go to build/bench/lgg-sites/ (build/bench/lgg-sites-smoke/ for --smoke), MLflow runs to
build/bench/mlflow.db.
"""

from __future__ import annotations

import argparse
import fcntl
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

import centralized  # noqa: E402  (bench/centralized.py: params_for, SHARED, WORK)

import pandas as pd  # noqa: E402

from fedbrain import evaluate, ingest, partition, preprocess, train  # noqa: E402
from fedbrain import segmentation_scores as scores  # noqa: E402
from fedbrain.dataset import load_classes, load_split  # noqa: E402
from fedbrain.errors import InputError  # noqa: E402

ROOT = centralized.SHARED / "lgg-mri-segmentation" / "kaggle_3m"
FOLDS = ("CS", "DU", "HT")
TRAININGS = ("centralized", "federated")
BUDGET_MIN = 40
# Remedies for cross-site shift (issue 21 item 3), each one change from params.yaml:
#   train: merged into train.segmenter; evaluate: merged into evaluate; models_of: an evaluation-only
#   setting re-scores that setting's trained models instead of training its own.
# Every setting that trains is scored without test-time flips, so that each row changes one thing
# from baseline; params.yaml's evaluate.test_time_flips default (all three) is the flips-both row.
NO_FLIPS = {"test_time_flips": []}
ALL_FLIPS = {"test_time_flips": ["horizontal", "vertical", "both"]}
SETTINGS = {
    "baseline": {"evaluate": NO_FLIPS},
    # Test-time flips (fedbrain.test_time): the baseline's models, each slice also predicted mirrored.
    "flips": {"evaluate": {"test_time_flips": ["horizontal"]}, "models_of": "baseline"},
    "flips-both": {"evaluate": ALL_FLIPS, "models_of": "baseline"},
    # Another scanner's intensities while training (train.scanner_intensity), on top of the geometric ones
    # (params.yaml's default since session 21: `baseline` trains with them too from then on).
    "scanner-intensity": {"train": {"augment": {"gamma": 0.3, "contrast": 0.2, "channel_scale": 0.15,
                                                "noise": 0.03}}, "evaluate": NO_FLIPS},
    # Both: the scanner-intensity models, each slice also predicted mirrored three ways.
    "scanner-intensity-flips": {"evaluate": ALL_FLIPS, "models_of": "scanner-intensity"},
    # Twice the bench's epochs (validation Dice was still rising at epoch 16), params.yaml's training
    # otherwise (scanner intensity included); scored without flips, then re-scored with the three.
    "epochs-32": {"train": {"epochs": 32}, "evaluate": NO_FLIPS},
    "epochs-32-flips": {"evaluate": ALL_FLIPS, "models_of": "epochs-32"},
    # epochs-32, and a training slice's pre- and/or post-contrast replaced with its FLAIR with
    # probability 0.15 (train.missing_sequences; 15 of TCGA-LGG's 110 patients lack one of the two, and
    # TCGA_DU_7013, FLAIR in all three channels, scored Dice 0 in every setting before).
    "missing-sequence": {"train": {"epochs": 32, "augment": {"missing_sequence": 0.15}}, "evaluate": NO_FLIPS},
    "missing-sequence-flips": {"evaluate": ALL_FLIPS, "models_of": "missing-sequence"},
    # The federated half (--only federated), params.yaml's training and the default flips: the same
    # 16 epoch-equivalents as 4 x 4 but averaged twice as often (client drift: session 22's CS fold had
    # each hospital's own val Dice 0.50-0.63 and their average 0.40-0.46), and 4 x 4 at half the
    # hospitals' rate (smaller local steps, as the classifier's hospitals take).
    "fed-8x2": {"federated": {"rounds": 8, "local_epochs": 2}, "evaluate": ALL_FLIPS},
    "fed-rate-half": {"federated": {"train": {"segmenter": {"learning_rate": 0.001}}}, "evaluate": ALL_FLIPS},
}


def work_folder(smoke: bool) -> Path:
    return centralized.WORK / ("lgg-sites-smoke" if smoke else "lgg-sites")


def bench_params(args) -> dict:
    params = centralized.params_for(ROOT)
    segmenter = params["train"]["segmenter"]
    segmenter["epochs"] = args.epochs
    params["federated"] = {**params["federated"], "roles": "segmenter", "rounds": args.rounds,
                           "local_epochs": args.local_epochs}
    if args.smoke:
        segmenter.update(patience=1, warmup_epochs=0)
    return params


def smoke_root(work: Path, per_site: int = 2) -> Path:
    """The first `per_site` patients of every institution, as symlinks (no copy of the data)."""
    root = work / "data"
    root.mkdir(parents=True, exist_ok=True)
    chosen: dict[str, list[Path]] = {}
    for folder in sorted(p for p in ROOT.iterdir() if ingest.TCGA_FOLDER.match(p.name)):
        chosen.setdefault(ingest.TCGA_FOLDER.match(folder.name)["site"], []).append(folder)
    for folders in chosen.values():
        for folder in folders[:per_site]:
            if not (root / folder.name).exists():
                (root / folder.name).symlink_to(folder, target_is_directory=True)
    return root


def prepare(params: dict, work: Path, smoke: bool) -> Path:
    """ingest and preprocess once per work folder (a lock: folds started side by side wait for it)."""
    if not ROOT.is_dir():
        sys.exit(f"{ROOT}: real data absent (expected beside the project in ../shared/data)")
    work.mkdir(parents=True, exist_ok=True)
    manifest, processed = work / "manifest.parquet", work / "processed"
    with open(work / ".prepare.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (processed / "classes.json").is_file():
            params = {**params, "data": {**params["data"], "root": str(smoke_root(work) if smoke else ROOT)}}
            ingest.run(params, manifest)
            preprocess.run(params, manifest, processed)
    return processed


def setting_params(params: dict, name: str) -> dict:
    change = SETTINGS[name]
    segmenter = dict(params["train"]["segmenter"])
    for key, value in (change.get("train") or {}).items():
        segmenter[key] = {**segmenter.get(key, {}), **value} if isinstance(value, dict) else value
    federated = dict(params["federated"])
    for key, value in (change.get("federated") or {}).items():
        federated[key] = value if key != "train" else {
            **federated.get("train", {}), "segmenter": {**federated.get("train", {}).get("segmenter", {}),
                                                        **value["segmenter"]}}
    return {**params, "train": {**params["train"], "segmenter": segmenter}, "federated": federated,
            "evaluate": {**params["evaluate"], **(change.get("evaluate") or {})}}


def run_fold(params: dict, processed: Path, work: Path, site: str, trainings: tuple[str, ...],
             setting: str = "baseline") -> dict:
    fold = work / f"fold-{site}"
    parts = fold / "partition"
    models_of = SETTINGS[setting].get("models_of")
    models = fold / (models_of or setting) / "models"
    params = setting_params(params, setting)
    classes = load_classes(processed)
    index = pd.read_parquet(processed / "index.parquet")
    table, report = partition.leave_site_out(index, list(classes["classes"]), site,
                                             seed=params["partition"]["seed"],
                                             val_fraction=params["partition"]["val_fraction"])
    partition.write_partition(parts, table, report, list(classes["classes"]))
    hospitals = report["sites_per_hospital"]
    print(f"fold {site}, setting {setting}: test {report['groups_per_split']['test']} patients of {site}; train "
          f"{report['groups_per_split']['train']} / val {report['groups_per_split']['val']} patients of the others; "
          f"hospitals {hospitals}", flush=True)
    test = load_split(processed, parts, "test")
    reference = scores.load_reference(processed, test)
    evaluate_params = params["evaluate"]
    settings = {"threshold": evaluate_params["threshold"], "overlays": evaluate_params["overlays"],
                "batch_size": evaluate_params["batch_size"],
                "postprocess_min_pixels": evaluate_params.get("postprocess_min_pixels"),
                "test_time_flips": evaluate_params.get("test_time_flips") or []}
    result_path = fold / "result.json"
    result = json.loads(result_path.read_text()) if result_path.is_file() else {}
    result.update(site=site, test_patients=report["groups_per_split"]["test"], hospitals=hospitals)
    held = result.setdefault("settings", {}).setdefault(setting, {})
    for training in trainings:
        out = models / "centralized" if training == "centralized" else models / "federated" / "fedavg"
        start = time.perf_counter()
        if models_of:
            trained = ((result["settings"].get(models_of) or {}).get(training) or {})
            if not (out / "segmenter.keras").is_file() or not trained:
                raise InputError(f"setting {setting} re-scores the {models_of} setting's {training} model, and "
                                 f"{out / 'segmenter.keras'} is not there: run --setting {models_of} first")
            minutes = trained["train_min"]
        elif training == "centralized":
            train.train_model(params, "segmenter", classes, load_split(processed, parts, "train"),
                              load_split(processed, parts, "val"), out)
        else:
            from fedbrain.federated import launcher

            fold_params = {**params, "federated": {**params["federated"],
                                                   "state_dir": str(fold / setting / "federated-state")}}
            launcher.run(fold_params, processed, parts, out, echo=lambda line: print(f"  | {line}", flush=True))
        if not models_of:
            minutes = (time.perf_counter() - start) / 60
        metrics = evaluate.evaluate_model(out / "segmenter.keras", models, test, list(classes["classes"]), settings,
                                          fold / setting / "plots", reference=reference)["metrics"]
        held[training] = {"train_min": minutes, "source": metrics["dice_native_source"],
                          **{k: metrics.get(k) for k in ("dice_native_mean", "dice_native_median",
                                                         "dice_native_postprocessed_mean", "hd95_native_mean",
                                                         "false_positive_volume_px")},
                          "per_patient": {p: r["dice"] for p, r in metrics["per_patient_native"].items()}}
        print(f"fold {site}, setting {setting}: {training} trained in {minutes:.1f} min, per-patient Dice "
              f"{metrics['dice_native_mean']:.4f} ({metrics['dice_native_source']})", flush=True)
        result_path.write_text(json.dumps(result, indent=2) + "\n")
    return result


def _cell(result: dict, training: str, key: str, form: str = ".4f") -> str:
    value = (result.get(training) or {}).get(key)
    return "-" if value is None else format(value, form)


def _pooled(folds: dict, training: str) -> tuple[float | None, str | None, float | None]:
    """Mean per-patient Dice over every left-out patient of the folds (the issue's figure, not a mean
    of fold means), and the worst institution with its mean."""
    per_patient = [d for r in folds.values() for d in ((r.get(training) or {}).get("per_patient") or {}).values()]
    by_site = {site: r[training]["dice_native_mean"] for site, r in folds.items()
               if (r.get(training) or {}).get("dice_native_mean") is not None}
    if not per_patient:
        return None, None, None
    worst = min(by_site, key=by_site.get)
    return statistics.mean(per_patient), worst, by_site[worst]


def report(work: Path, params: dict, smoke: bool) -> None:
    held = {}
    for path in sorted(work.glob("fold-*/result.json")):
        result = json.loads(path.read_text())
        held[result["site"]] = result
    baseline = {site: r["settings"]["baseline"] for site, r in held.items() if "baseline" in r.get("settings", {})}
    missing = [s for s in FOLDS if s not in baseline]
    fed = params["federated"]
    print(f"\nBENCH segmenter_sites{' --smoke' if smoke else ''} (leave one institution out, lgg-mri-segmentation; "
          f"centralized {params['train']['segmenter']['epochs']} epochs, federated {fed['rounds']} rounds x "
          f"{fed['local_epochs']} local epochs, FedAvg; {os.cpu_count()} cores): baseline folds held "
          f"{', '.join(baseline) or 'none'}" + (f"; not yet run: {', '.join(missing)} (--fold SITE)" if missing else ""))
    print("baseline (params.yaml's training, no test-time flips): per-patient Dice at native resolution, mean / median over the left-out "
          "institution's patients")
    print("| left out | patients | centralized | federated | centralized, post-processed | federated, post-processed "
          "| train min centralized | train min federated | fold min (budget 40) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for site, r in baseline.items():
        fold_min = sum((r.get(t) or {}).get("train_min", 0.0) for t in TRAININGS)
        print(f"| {site} | {held[site]['test_patients']} | " + " | ".join(
            f"{_cell(r, t, 'dice_native_mean')} / {_cell(r, t, 'dice_native_median')}" for t in TRAININGS) + " | "
            + " | ".join(_cell(r, t, "dice_native_postprocessed_mean") for t in TRAININGS) + " | "
            + " | ".join(_cell(r, t, "train_min", ".1f") for t in TRAININGS)
            + f" | {fold_min:.1f}{' OVER' if fold_min > BUDGET_MIN else ''} |")
    cells = []
    for t in TRAININGS:
        mean, worst, worst_mean = _pooled(baseline, t)
        cells.append("-" if mean is None else f"{mean:.4f} (worst {worst} {worst_mean:.4f})")
    print(f"| all left-out patients of {len(baseline)} fold(s) | | " + " | ".join(cells) + " | | | | | |")
    print("targets: centralized >= 0.82 over all left-out patients and >= 0.75 at the worst institution; "
          "federated within 0.03 of centralized; a fold <= 40 min")

    print("\nablation (issue 21 item 3): per-patient Dice at native resolution, mean over each left-out "
          "institution's patients, raw / post-processed; 'all' pools every left-out patient of the folds held")
    print("| setting | training | " + " | ".join(FOLDS) + " | all | post-processed, all | train min per fold |")
    print("|---|---|" + "---|" * (len(FOLDS) + 3))
    for name in SETTINGS:
        folds = {site: r["settings"][name] for site, r in held.items() if name in r.get("settings", {})}
        for t in TRAININGS:
            if not any(f.get(t) for f in folds.values()):
                continue
            mean, _, _ = _pooled(folds, t)
            # Pooled over patients: each fold's post-processed mean weighed by its patients.
            post = [(f[t]["dice_native_postprocessed_mean"], len(f[t]["per_patient"])) for f in folds.values()
                    if (f.get(t) or {}).get("dice_native_postprocessed_mean") is not None]
            pooled_post = sum(m * n for m, n in post) / sum(n for _, n in post) if post else None
            minutes = [f[t]["train_min"] for f in folds.values() if f.get(t)]
            print(f"| {name} | {t} | " + " | ".join(
                f"{_cell(folds.get(site, {}), t, 'dice_native_mean')} / "
                f"{_cell(folds.get(site, {}), t, 'dice_native_postprocessed_mean')}" for site in FOLDS)
                + f" | {mean:.4f} | " + ("-" if pooled_post is None else f"{pooled_post:.4f}")
                + f" | {statistics.mean(minutes):.1f} |")
    for site, r in held.items():
        for name, trainings in r.get("settings", {}).items():
            for training, figures in trainings.items():
                patients = ", ".join(f"{p} {d:.3f}" for p, d in figures["per_patient"].items())
                print(f"  {site} {name} {training} ({figures['source']}): {patients}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--fold", action="append", metavar="SITE", help=f"left-out institution (default {FOLDS})")
    parser.add_argument("--only", choices=TRAININGS, help="train only this one (default both)")
    parser.add_argument("--epochs", type=int, help="centralized epochs (default 16; --smoke 1)")
    parser.add_argument("--rounds", type=int, help="federated rounds (default 4; --smoke 1)")
    parser.add_argument("--local-epochs", type=int, help="local epochs per round (default 4; --smoke 1)")
    parser.add_argument("--smoke", action="store_true", help="2 patients per site, 1 epoch, 1 round: a quick run")
    parser.add_argument("--report", action="store_true", help="print the table of the folds held; train nothing")
    parser.add_argument("--setting", choices=SETTINGS, default="baseline",
                        help="a remedy of the ablation (SETTINGS in this file; default baseline = params.yaml)")
    args = parser.parse_args()
    for name, full, smoke in (("epochs", 16, 1), ("rounds", 4, 1), ("local_epochs", 4, 1)):
        if getattr(args, name) is None:
            setattr(args, name, smoke if args.smoke else full)
    params = bench_params(args)
    work = work_folder(args.smoke)
    if not args.report:
        processed = prepare(params, work, args.smoke)
        for site in args.fold or FOLDS:
            try:
                run_fold(params, processed, work, site, (args.only,) if args.only else TRAININGS, args.setting)
            except InputError as exc:
                sys.exit(f"fold {site}: {exc}")
    report(work, params, args.smoke)
