"""Post-processing chosen where it may be chosen: on each fold's validation patients (issue 21).

Session 22 saw one combination clear both centralized leave-one-institution-out targets (32 epochs,
no flips, post-processed), picked after looking at the left-out institutions. Here every fold picks its
rule on its own validation patients (patients of its training institutions), and only then is that rule
scored on the left-out institution. Rules: a threshold; slice components under N px dropped; then keep
every lesion, the largest, or those of at least a share of the largest (a lesion: components that
overlap across neighbouring slices, as `segmentation_scores.postprocess`). Needs the folds' models of
`--setting` from bench/segmenter_sites.py; predicts with params.yaml's test-time flips.

    .venv/bin/python bench/segmenter_postprocess.py [--setting epochs-32]
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
sys.path.insert(0, str(BENCH.parent / "src"))

import numpy as np  # noqa: E402
from scipy import ndimage  # noqa: E402

import centralized  # noqa: E402  (bench/centralized.py: WORK)
import segmenter_sites  # noqa: E402

from fedbrain import segmentation_scores as scores  # noqa: E402
from fedbrain import test_time  # noqa: E402
from fedbrain.dataset import load_split  # noqa: E402
from fedbrain.models import load  # noqa: E402

THRESHOLDS = (0.4, 0.5, 0.6)
MIN_PIXELS = (0, 20)
KEEP = ("all", "largest", 0.1, 0.3)
RAW = (0.5, 0, "all")
PARAMS_RULE = (0.5, 20, "largest")  # params.yaml's evaluate.postprocess_min_pixels and the largest lesion
# Across slices only the same pixel (overlap), in-plane 8-connectivity: segmentation_scores.postprocess's lesions.
ACROSS = np.zeros((3, 3, 3), dtype=bool)
ACROSS[1] = True
ACROSS[0, 1, 1] = ACROSS[2, 1, 1] = True


def apply(prediction: np.ndarray, min_pixels: int, keep) -> np.ndarray:
    """The largest lesion is fedbrain's own `postprocess` (what params.yaml's rule scores); 'all' and a
    share of the largest need its two steps apart, which it does not expose: written out here."""
    if keep == "largest":
        return scores.postprocess(prediction, min_pixels)
    kept = np.zeros_like(prediction)
    for k, plane in enumerate(prediction):
        labels, count = ndimage.label(plane, np.ones((3, 3), dtype=bool))
        if count:
            kept[k] = plane & (np.bincount(labels.ravel())[labels] >= min_pixels)
    volume = kept if kept.any() else prediction
    if keep == "all":
        return volume
    labels, count = ndimage.label(volume, ACROSS)
    if count == 0:
        return volume
    sizes = np.bincount(labels.ravel())[1:]
    return np.isin(labels, 1 + np.nonzero(sizes >= keep * sizes.max())[0])


def volumes(model, processed: Path, parts: Path, split: str, flips) -> dict:
    """{patient: (truth, probabilities)} at the native resolution."""
    data = load_split(processed, parts, split)
    reference = scores.load_reference(processed, data)
    proba = test_time.segment(model, data.images, 32, flips)[..., 0]
    out = {}
    for patient, rows in scores.patients(list(data.patient_ids), list(data.image_ids)).items():
        out[patient] = (np.stack([reference.masks[i] for i in rows]),
                        np.stack([scores.to_native(proba[i], reference.masks[i].shape) for i in rows]))
    return out


def dice_by_patient(held: dict, rule) -> dict:
    threshold, min_pixels, keep = rule
    return {p: scores.dice(truth, apply(proba > threshold, min_pixels, keep)) for p, (truth, proba) in held.items()}


def main(setting: str) -> None:
    work = segmenter_sites.work_folder(smoke=False)
    processed = work / "processed"
    flips = test_time.inference_settings(centralized.params_for(segmenter_sites.ROOT))["test_time_flips"]
    rules = [(t, m, k) for t in THRESHOLDS for m in MIN_PIXELS for k in KEEP]
    rows = {"raw": {}, "params": {}, "chosen": {}}
    print(f"BENCH segmenter_postprocess: {setting}'s centralized models, flips {list(flips)}, {len(rules)} rules, "
          f"each fold's rule chosen on its validation patients", flush=True)
    for site in segmenter_sites.FOLDS:
        fold = work / f"fold-{site}"
        path = fold / setting / "models" / "centralized" / "segmenter.keras"
        if not path.is_file():
            print(f"  fold {site}: {path} missing (bench/segmenter_sites.py --fold {site} --setting {setting})")
            continue
        model = load(path)
        val, test = (volumes(model, processed, fold / "partition", split, flips) for split in ("val", "test"))
        on_val = {rule: float(np.mean(list(dice_by_patient(val, rule).values()))) for rule in rules}
        chosen = max(rules, key=lambda rule: (round(on_val[rule], 4), rule == RAW))
        for name, rule in (("raw", RAW), ("params", PARAMS_RULE), ("chosen", chosen)):
            rows[name][site] = dice_by_patient(test, rule)
        print(f"  fold {site}: chosen {chosen} on {len(val)} validation patients ({on_val[RAW]:.4f} raw -> "
              f"{on_val[chosen]:.4f}); on {len(test)} {site} patients: raw {np.mean(list(rows['raw'][site].values())):.4f}, "
              f"params' post-processing {np.mean(list(rows['params'][site].values())):.4f}, chosen "
              f"{np.mean(list(rows['chosen'][site].values())):.4f}", flush=True)
    print("| rule | " + " | ".join(rows["raw"]) + " | all |")
    for name, by_site in rows.items():
        pooled = [d for values in by_site.values() for d in values.values()]
        print(f"| {name} | " + " | ".join(f"{np.mean(list(v.values())):.4f}" for v in by_site.values())
              + f" | {np.mean(pooled):.4f} |" if pooled else f"| {name} | - |")
    print("targets (centralized): >= 0.82 over all left-out patients, >= 0.75 at the worst institution")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--setting", default="epochs-32", help="whose fold models to re-score (default epochs-32)")
    main(parser.parse_args().setting)
