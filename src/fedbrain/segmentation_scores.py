"""Segmentation scored the way clinicians read it: one Dice per patient, at the images' native resolution.

A model sees ``preprocess.size`` slices (128x128); a radiologist reads the scan as acquired (the
TCGA-LGG slices are 256x256). `score` puts each predicted probability map back on the original
mask's grid (`to_native`, the interpolation preprocess resized with, run the other way), thresholds
it there, stacks each patient's slices in slice order into a volume and scores that volume against
the original masks read from disk (`load_reference`). Where those files are not on this machine
(data moved, a pod without the raw data) the processed masks stand in and ``dice_native_source``
says so; nothing else changes.

How a patient is scored, tumour or not, is `dice_hd95`'s rule (the BraTS convention):
  * mask with tumour: Dice of the volume; HD95 in native pixels, the slice step counting as one
    pixel; a patient with no predicted pixel scores Dice 0 and has no HD95;
  * mask without tumour (empty): an empty prediction scores Dice 1 (HD95 0), any predicted pixel
    scores Dice 0 (HD95 undefined), and that 1 or 0 counts in the mean and median Dice like every
    other patient's. How much was predicted on tumour-free slices, of any patient, is
    ``false_positive_volume_px``, so a stray blob is measured and not only counted.

Post-processing (`postprocess`) is reported beside the raw score (``dice_native_postprocessed_*``)
and never replaces it.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from fedbrain import imaging
from fedbrain.errors import InputError

# The comparison table's segmentation columns (comparison.md/.csv), from `comparison_cells`.
COMPARISON_COLUMNS = ["dice_native_mean", "dice_native_median", "hd95_native_mean", "false_positive_volume_px",
                      "dice_native_postprocessed_mean", "dice_native_by_site"]
# Per institution: the figures of `per_site`, each logged as test_site_<CODE>/<name>.
SITE_FIGURES = ("patients", "dice_native_mean", "dice_native_median", "hd95_native_mean",
                "false_positive_volume_px", "dice_native_postprocessed_mean")


def dice_hd95(truth: np.ndarray, prediction: np.ndarray) -> tuple[float, float | None]:
    """MedPy Dice and HD95 (pixels) of two binary arrays, with the empty cases made explicit.

    Both empty: a perfect answer (Dice 1, HD95 0). One empty: Dice 0 and HD95 undefined (None),
    since there is no surface to measure a distance to; MedPy would raise or return 0 there.
    """
    from medpy.metric.binary import hd95

    truth, prediction = truth.astype(bool), prediction.astype(bool)
    has_truth, has_prediction = truth.any(), prediction.any()
    if not has_truth and not has_prediction:
        return 1.0, 0.0
    if not has_truth or not has_prediction:
        return 0.0, None
    return dice(truth, prediction), float(hd95(prediction, truth))


def dice(truth: np.ndarray, prediction: np.ndarray) -> float:
    """`dice_hd95`'s Dice alone, same empty cases, without the distance transform HD95 costs."""
    from medpy.metric.binary import dc

    truth, prediction = truth.astype(bool), prediction.astype(bool)
    if not truth.any() or not prediction.any():
        return float(truth.any() == prediction.any())  # both empty: 1; one empty: 0
    return float(dc(prediction, truth))


def _natural(text: str) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", text)]


def patients(patient_ids: list, image_ids: list) -> dict[str, list[int]]:
    """{patient: its rows in slice order}; an image without a patient id is its own patient.

    Slice order is the natural order of the image ids (TCGA ``..._2`` before ``..._10``; NIfTI
    slices are zero-padded): a volume stacked in sort order would put slice 10 beside slice 1,
    and HD95 and the overlap across slices would measure the wrong neighbours."""
    groups = [str(p) if p is not None and not (isinstance(p, float) and math.isnan(p)) else str(i)
              for p, i in zip(patient_ids, image_ids)]
    rows: dict[str, list[int]] = {}
    for i, group in enumerate(groups):
        rows.setdefault(group, []).append(i)
    return {g: sorted(r, key=lambda i: _natural(str(image_ids[i]))) for g, r in rows.items()}


# --------------------------------------------------------------------------- the reference masks

@dataclass
class Reference:
    """The truth a segmenter is scored against, per test row: a binary mask and the row's site."""
    masks: list[np.ndarray]  # (H, W) bool each, native or processed size
    sites: list[str | None]
    source: str  # what the masks are, for the results: "native 256x256" or the fallback and why


def processed_reference(split, sites: list | None, why: str) -> Reference:
    """The processed masks standing in for the originals, and why."""
    size = "x".join(str(n) for n in split.masks.shape[1:3])
    return Reference([m[..., 0] > 0 for m in split.masks], sites or [None] * len(split),
                     f"processed {size} ({why})")


def load_reference(processed: str | Path, split) -> Reference:
    """The original masks of ``split``'s rows (the processed index's ``mask_path``), and their sites.

    Never raises for missing originals: the processed masks stand in, and ``source`` says why."""
    index = pd.read_parquet(Path(processed) / "index.parquet")
    index = index.drop_duplicates("image_id").set_index("image_id").reindex(list(split.image_ids))
    sites = None
    if "site" in index and index["site"].notna().any():
        sites = [None if pd.isna(s) else str(s) for s in index["site"]]
    if "mask_path" not in index or index["mask_path"].isna().any():
        return processed_reference(split, sites, "the index names no original masks")
    slices = index["slice_index"] if "slice_index" in index else pd.Series(-1, index=index.index)
    masks = []
    for path, k in zip(index["mask_path"], slices):
        try:
            masks.append(imaging.read_mask(str(path), int(k)) > 0)
        except InputError:
            return processed_reference(split, sites, f"original masks not found, e.g. {path}")
    shapes = sorted({"x".join(map(str, m.shape)) for m in masks})
    return Reference(masks, sites or [None] * len(masks), f"native {', '.join(shapes)}")


def to_native(proba: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """A (h, w) probability map on a (H, W) grid: scikit-image's resize, as preprocess resized.

    The same library and pixel-centre convention as `fedbrain.preprocess.resize`, so a mask taken
    down and back up lands where it was; linear interpolation of the probabilities (thresholding
    afterwards gives smooth edges, a thresholded mask blown up would give blocks). No anti-aliasing:
    this is an upsampling."""
    from skimage.transform import resize

    if proba.shape == tuple(shape):
        return proba
    return resize(proba.astype(np.float32), tuple(shape), order=1, mode="edge", anti_aliasing=False,
                  preserve_range=True)


# --------------------------------------------------------------------------- post-processing

def postprocess(prediction: np.ndarray, min_pixels: int) -> np.ndarray:
    """A patient's predicted tumour (slices, H, W) cleaned up; never a pixel added.

    1. Connected components (8-connected) smaller than ``min_pixels`` on their slice are dropped:
       speckle.
    2. Of what remains, the components joined across neighbouring slices where they overlap make
       one lesion; the largest lesion (most pixels) is kept, the rest dropped: a low-grade glioma is
       one lesion (in the TCGA-LGG truth masks the largest such lesion holds at least 99.98% of the
       tumour pixels of 90% of the patients, and at least 96.7% in every one).
    3. If step 1 left nothing, the largest lesion of the raw prediction is kept: the only predicted
       tumour is never removed, however small.
    """
    from scipy import ndimage

    prediction = np.asarray(prediction, dtype=bool)
    if prediction.ndim == 2:
        return postprocess(prediction[None], min_pixels)[0]
    # In-plane 8-connectivity; across slices only the same pixel, i.e. overlap.
    across = np.zeros((3, 3, 3), dtype=bool)
    across[1] = True
    across[0, 1, 1] = across[2, 1, 1] = True

    def largest_lesion(volume: np.ndarray) -> np.ndarray:
        labels, count = ndimage.label(volume, across)
        if count == 0:
            return volume
        sizes = np.bincount(labels.ravel())[1:]
        return labels == 1 + int(np.argmax(sizes))

    kept = np.zeros_like(prediction)
    for k, plane in enumerate(prediction):
        labels, count = ndimage.label(plane, np.ones((3, 3), dtype=bool))
        if count:
            sizes = np.bincount(labels.ravel())
            kept[k] = plane & (sizes[labels] >= min_pixels)
    return largest_lesion(kept if kept.any() else prediction)


# --------------------------------------------------------------------------- scores

def defined_mean(values) -> float | None:
    values = [v for v in values if v is not None]
    return float(np.mean(values)) if values else None


def _median(values) -> float | None:
    values = [v for v in values if v is not None]
    return float(np.median(values)) if values else None


def _summary(records: list[dict], postprocessed: bool) -> dict:
    out = {"dice_native_mean": defined_mean(r["dice"] for r in records),
           "dice_native_median": _median(r["dice"] for r in records),
           "hd95_native_mean": defined_mean(r["hd95"] for r in records),
           "hd95_native_median": _median(r["hd95"] for r in records),
           "false_positive_volume_px": int(sum(r["false_positive_px"] for r in records))}
    if postprocessed:
        out.update(dice_native_postprocessed_mean=defined_mean(r["dice_postprocessed"] for r in records),
                   dice_native_postprocessed_median=_median(r["dice_postprocessed"] for r in records),
                   hd95_native_postprocessed_mean=defined_mean(r["hd95_postprocessed"] for r in records))
    return out


def score(reference: Reference, proba: np.ndarray, patient_ids: list, image_ids: list, threshold: float = 0.5,
          min_pixels: int | None = None) -> dict:
    """Per-patient volume Dice and HD95 at the reference's resolution, their mean and median, the
    false-positive volume on tumour-free slices, all of it per site; with ``min_pixels`` also after
    `postprocess`. Scalars at the top level; ``per_patient_native`` and ``per_site`` hold the details."""
    proba = np.asarray(proba)[..., 0]
    if len(proba) != len(reference.masks):
        raise ValueError(f"{len(proba)} predictions for {len(reference.masks)} reference masks")
    records: dict[str, dict] = {}
    for patient, rows in patients(patient_ids, image_ids).items():
        truth = np.stack([reference.masks[i] for i in rows])
        prediction = np.stack([to_native(proba[i], reference.masks[i].shape) > threshold for i in rows])
        tumour_free = ~truth.any(axis=(1, 2))
        dice, hd = dice_hd95(truth, prediction)
        record = {"site": reference.sites[rows[0]], "slices": len(rows), "tumour_px": int(truth.sum()),
                  "predicted_px": int(prediction.sum()), "false_positive_px": int(prediction[tumour_free].sum()),
                  "dice": dice, "hd95": hd}
        if min_pixels is not None:
            record["dice_postprocessed"], record["hd95_postprocessed"] = dice_hd95(
                truth, postprocess(prediction, min_pixels))
        records[patient] = record
    values = list(records.values())
    out = {"dice_native_source": reference.source, "patients_native": len(values),
           "tumour_free_patients": sum(1 for r in values if r["tumour_px"] == 0),
           "tumour_free_slices": int(sum(1 for m in reference.masks if not m.any())),
           **_summary(values, min_pixels is not None)}
    if min_pixels is not None:
        out["postprocessing"] = (f"slice components under {min_pixels} px dropped, the largest lesion "
                                 "(components overlapping across slices) kept")
    sites = sorted({r["site"] for r in values if r["site"] is not None})
    out["per_site"] = {site: {"patients": sum(1 for r in values if r["site"] == site),
                              **_summary([r for r in values if r["site"] == site], min_pixels is not None)}
                       for site in sites}
    out["per_patient_native"] = records
    return out


def metric_key(site: str) -> str:
    """A site code as part of an MLflow metric name (letters, digits, _ - . only)."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", str(site))


def site_scalars(metrics: dict) -> dict:
    """``site_<CODE>/<figure>`` for every site's figures (metrics.json, MLflow)."""
    return {f"site_{metric_key(site)}/{name}": figures[name]
            for site, figures in (metrics.get("per_site") or {}).items() for name in SITE_FIGURES
            if figures.get(name) is not None}


def comparison_cells(metrics: dict) -> dict:
    """A model's `COMPARISON_COLUMNS` (None for a classifier)."""
    cells = {c: metrics.get(c) for c in COMPARISON_COLUMNS}
    sites = metrics.get("per_site") or {}
    cells["dice_native_by_site"] = "; ".join(
        f"{site} {f['dice_native_mean']:.3f}" for site, f in sites.items() if f.get("dice_native_mean") is not None
    ) or None
    return cells


def sites_markdown(results: list[dict]) -> str:
    """comparison.md's per-institution table: one row per segmenter and site ("" when there is none)."""
    rows = []
    for result in results:
        metrics = result["metrics"]
        for site, f in (metrics.get("per_site") or {}).items():
            cells = [result["info"]["run"], site, str(f["patients"])]
            cells += ["" if f.get(k) is None else f"{f[k]:.4f}" if isinstance(f[k], float) else str(f[k])
                      for k in SITE_FIGURES[1:]]
            rows.append("| " + " | ".join(cells) + " |")
    if not rows:
        return ""
    header = ["run", "site", *SITE_FIGURES]
    source = {r["metrics"].get("dice_native_source") for r in results if r["metrics"].get("per_site")}
    return ("\n## Segmentation per institution\n\nPer-patient volume Dice and HD95 at "
            f"{', '.join(sorted(source))} resolution, mean and median over the site's test patients; "
            "`false_positive_volume_px`: predicted pixels on its slices without tumour.\n\n"
            + "\n".join(["| " + " | ".join(header) + " |", "|" + "---|" * len(header), *rows]) + "\n")
