"""ingest: a raw dataset root -> a manifest table, one row per 2D image or axial slice.

Layouts (detected, or named by `data.layout`):
  class_folders  <root>/<class>/*.{jpg,jpeg,png}                   label = folder
  tcga_lgg       <root>/TCGA_<site>_<id>_<date>/*_<n>.tif + _mask.tif   label = mask has tumour
  brats          BraTS 2020/21 <case>_{flair,t1,t1ce,t2}[_seg].nii.gz or
                 2023 <case>-{t1c,t1n,t2f,t2w}[-seg].nii.gz           modalities as channels
  nifti_pairs    <root>/<patient>/<name>.nii.gz + a mask file (name holds "mask" or "seg")

A file that does not decode stays in the manifest with empty size and hash, so the validate
stage can name it in its report; structural problems (unknown class, empty folder, missing
mask, volume without brain) stop here with one line.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm import tqdm

from fedbrain import imaging
from fedbrain.config import get, section
from fedbrain.errors import InputError

LAYOUTS = ("class_folders", "tcga_lgg", "brats", "nifti_pairs")
TUMOR, NO_TUMOR = "tumor", "no_tumor"
COLUMNS = ["image_id", "patient_id", "site", "label", "source_path", "slice_index", "mask_path",
           "modality", "channels", "content_hash", "width", "height", "layout"]

TCGA_FOLDER = re.compile(r"^TCGA_(?P<site>[A-Z0-9]{2})_(?P<id>[A-Z0-9]+)_(?P<date>\d+)$")
TCGA_SLICE = re.compile(r"^(?P<case>.+)_(?P<n>\d+)\.tiff?$")
# BraTS modality order is fixed so channel k means the same sequence for every case.
BRATS_2020 = re.compile(r"^(?P<case>BraTS\d*_\w+?_\d+)_(?P<mod>flair|t1|t1ce|t2|seg)\.nii(\.gz)?$")
BRATS_2023 = re.compile(r"^(?P<case>BraTS-[A-Z]+-\d+-\d+)-(?P<mod>t1c|t1n|t2f|t2w|seg)\.nii(\.gz)?$")
BRATS_MODALITIES = {"2020": ("flair", "t1", "t1ce", "t2"), "2023": ("t1c", "t1n", "t2f", "t2w")}
MASK_WORDS = re.compile(r"mask|seg", re.IGNORECASE)
# An axial slice "contains brain" when this share of its voxels is above 10% of the volume's
# 99th-percentile intensity: empty slices at the top and bottom of a volume carry no signal.
BRAIN_FRACTION = 0.05


def run(params: dict, out: Path) -> pd.DataFrame:
    data = section(params, "data")
    root = Path(get(data, "root", str, "data"))
    layout = get(data, "layout", str, "data", choices=("auto",) + LAYOUTS)
    classes = get(data, "classes", list, "data")
    manifest = build_manifest(root, layout, classes)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    manifest.to_parquet(tmp, index=False)
    os.replace(tmp, out)  # the next stage never sees a half-written manifest
    undecodable = int(manifest["content_hash"].isna().sum())
    print(f"ingest: {len(manifest)} images from {root} (layout {manifest['layout'].iat[0]}), "
          f"{manifest['label'].nunique()} labels, {undecodable} undecodable -> {out}")
    return manifest


def build_manifest(root: str | Path, layout: str = "auto", classes: list[str] | None = None) -> pd.DataFrame:
    root = Path(root)
    if not root.is_dir():
        raise InputError(f"{root}: dataset root not found; set data.root in params.yaml to a folder")
    if layout == "auto":
        layout = detect_layout(root)
    if layout not in LAYOUTS:
        raise InputError(f"data.layout {layout!r} is unknown; use one of auto, {', '.join(LAYOUTS)}")
    rows = {"class_folders": lambda: _class_folders(root, classes or []),
            "tcga_lgg": lambda: _tcga_lgg(root),
            "brats": lambda: _brats(root),
            "nifti_pairs": lambda: _nifti_pairs(root)}[layout]()
    if not rows:
        raise InputError(f"{root}: no images found for layout {layout}")
    manifest = pd.DataFrame(rows, columns=COLUMNS)
    manifest["layout"] = layout
    for column in ("slice_index", "channels"):
        manifest[column] = manifest[column].astype("int64")
    for column in ("width", "height"):
        manifest[column] = manifest[column].astype("Int64")
    return manifest.sort_values("image_id", kind="stable").reset_index(drop=True)


def detect_layout(root: Path) -> str:
    subdirs = [p for p in root.iterdir() if p.is_dir()]
    if any(TCGA_FOLDER.match(p.name) for p in subdirs):
        return "tcga_lgg"
    names = [p.name for p in root.rglob("*.nii*")]
    if names:
        if any(BRATS_2020.match(n) or BRATS_2023.match(n) for n in names):
            return "brats"
        return "nifti_pairs"
    if any(_files(p, (".jpg", ".jpeg", ".png")) for p in subdirs):
        return "class_folders"
    raise InputError(f"{root}: cannot tell the dataset layout (no class folders with JPEG/PNG, no TCGA_ "
                     "folders, no NIfTI files); set data.layout or point data.root at the dataset")


def _files(folder: Path, suffixes: tuple[str, ...]) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.name.lower().endswith(suffixes))


def _row(image_id, patient_id, site, label, source, slice_index, mask, modality, pixels) -> dict:
    ok = pixels is not None
    return {"image_id": image_id, "patient_id": patient_id, "site": site, "label": label,
            "source_path": str(source), "slice_index": slice_index,
            "mask_path": None if mask is None else str(mask), "modality": modality,
            "channels": pixels.shape[2] if ok else 0,
            "content_hash": imaging.content_hash(pixels) if ok else None,
            "width": pixels.shape[1] if ok else None, "height": pixels.shape[0] if ok else None}


def _decode_or_none(path: Path) -> np.ndarray | None:
    try:
        return imaging.read_image(str(path))
    except InputError:
        return None  # kept with an empty hash: validate names it in its report


def _class_folders(root: Path, classes: list[str]) -> list[dict]:
    if not classes:
        raise InputError("params.yaml: 'data.classes' is empty; list the class folder names")
    folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    unknown = [p.name for p in folders if p.name not in classes]
    if unknown:
        raise InputError(f"{root / unknown[0]}: folder is not a known class ({', '.join(classes)}); "
                         "rename it or add it to data.classes")
    files = []
    for name in classes:
        folder = root / name
        if not folder.is_dir():
            raise InputError(f"{folder}: class folder missing; add images or remove '{name}' from data.classes")
        images = _files(folder, (".jpg", ".jpeg", ".png"))
        if not images:
            raise InputError(f"{folder}: class folder has no JPEG/PNG images; add images or remove '{name}' from data.classes")
        files += [(name, path) for path in images]
    rows = []
    for label, path in tqdm(files, desc="ingest", unit="img", mininterval=1.0):
        pixels = _decode_or_none(path)
        rows.append(_row(f"{label}/{path.stem}", None, None, label, path, -1, None, "gray", pixels))
    return rows


def _tcga_lgg(root: Path) -> list[dict]:
    work = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        match = TCGA_FOLDER.match(folder.name)
        if not match:
            continue
        patient = f"TCGA_{match['site']}_{match['id']}"
        for path in _files(folder, (".tif", ".tiff")):
            if path.stem.endswith("_mask"):
                continue
            slice_match = TCGA_SLICE.match(path.name)
            if not slice_match:
                raise InputError(f"{path}: expected <case>_<slice>.tif; rename it or move it out of the dataset")
            mask = path.with_name(f"{path.stem}_mask{path.suffix}")
            if not mask.is_file():
                raise InputError(f"{path}: its mask {mask.name} is missing; add it or remove the slice")
            work.append((patient, match["site"], path, mask, int(slice_match["n"])))
    rows = []
    for patient, site, path, mask, number in tqdm(work, desc="ingest", unit="slice", mininterval=1.0):
        pixels = _decode_or_none(path)
        label = None
        try:
            label = TUMOR if imaging.read_mask(str(mask)).any() else NO_TUMOR
        except InputError:
            pixels = None  # an unreadable mask makes the slice unusable; validate reports it
        rows.append(_row(path.stem, patient, site, label, path, -1, mask, "pre,flair,post", pixels))
    return rows


def _brain_slices(volume: np.ndarray) -> list[int]:
    threshold = 0.1 * np.percentile(volume, 99)
    if threshold <= 0:
        return []
    fraction = (volume > threshold).mean(axis=(0, 1))
    return [int(k) for k in np.flatnonzero(fraction >= BRAIN_FRACTION)]


def _volume_rows(case_id, patient, volumes: list[Path], mask: Path | None, modality: str) -> list[dict]:
    """One row per axial slice that contains brain; the mask labels each slice."""
    stacked = np.stack([imaging.read_volume(str(p)) for p in volumes], axis=-1) if len(
        {imaging.read_volume(str(p)).shape for p in volumes}) == 1 else None
    if stacked is None:
        raise InputError(f"{volumes[0].parent}: modalities of case {case_id} have different shapes; co-register them")
    mask_volume = None
    if mask is not None:
        mask_volume = imaging.read_volume(str(mask))
        if mask_volume.shape != stacked.shape[:3]:
            raise InputError(f"{mask}: mask shape {mask_volume.shape} differs from its image {stacked.shape[:3]}; "
                             "use the mask made for this volume")
    slices = _brain_slices(stacked[..., 0])
    if not slices:
        raise InputError(f"{volumes[0]}: no axial slice contains brain (volume is empty or constant); remove it")
    source = imaging.MODALITY_SEPARATOR.join(str(p) for p in volumes)
    rows = []
    for k in slices:
        pixels = stacked[:, :, k, :]
        label = None if mask_volume is None else (TUMOR if mask_volume[:, :, k].any() else NO_TUMOR)
        rows.append(_row(f"{case_id}/{k:03d}", patient, None, label, source, k, mask, modality, pixels))
    return rows


def _brats(root: Path) -> list[dict]:
    cases: dict[tuple[str, str], dict[str, Path]] = {}
    for path in sorted(root.rglob("*.nii*")):
        match = BRATS_2020.match(path.name) or BRATS_2023.match(path.name)
        if match:
            edition = "2020" if BRATS_2020.match(path.name) else "2023"
            cases.setdefault((edition, match["case"]), {})[match["mod"]] = path
    rows = []
    for (edition, case), files in tqdm(sorted(cases.items()), desc="ingest", unit="case"):
        modalities = BRATS_MODALITIES[edition]
        missing = [m for m in modalities if m not in files]
        if missing:
            raise InputError(f"{root}: case {case} lacks modalities {', '.join(missing)}; add them or remove the case")
        # BraTS 2023 ids end in a time point (-000); the patient is the id without it.
        patient = case.rsplit("-", 1)[0] if edition == "2023" else case
        rows += _volume_rows(case, patient, [files[m] for m in modalities], files.get("seg"), ",".join(modalities))
    return rows


def _nifti_pairs(root: Path) -> list[dict]:
    rows = []
    volumes = sorted(root.rglob("*.nii*"))
    by_folder: dict[Path, list[Path]] = {}
    for path in volumes:
        by_folder.setdefault(path.parent, []).append(path)
    for folder, paths in tqdm(sorted(by_folder.items()), desc="ingest", unit="folder"):
        masks = [p for p in paths if MASK_WORDS.search(p.name)]
        images = [p for p in paths if p not in masks]
        patient = str(folder.relative_to(root)) if folder != root else None
        for image in images:
            mask = _pair_mask(image, masks)
            stem = image.name.split(".nii")[0]
            case = f"{patient}/{stem}" if patient else stem
            rows += _volume_rows(case, patient or stem, [image], mask, "mri")
    return rows


def _pair_mask(image: Path, masks: list[Path]) -> Path | None:
    """The mask sharing the longest name prefix with the image (Pre_Scan_T1 <-> Pre_Mask)."""
    if not masks:
        return None
    stem = image.name.split(".nii")[0]

    def shared(mask: Path) -> int:
        return len(os.path.commonprefix([stem, MASK_WORDS.split(mask.name)[0]]))

    best = max(masks, key=shared)
    return best if shared(best) > 0 else None
