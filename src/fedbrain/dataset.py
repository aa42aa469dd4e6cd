"""The on-disk contract between the data stages and every trainer.

preprocess writes ``<processed>/``:
  images.npy     float32 (N, size, size, channels), intensities in [0, 1]
  masks.npy      uint8 (N, size, size, 1) in {0, 1}; only when the dataset has masks
  index.parquet  the manifest rows in array order, plus ``row`` and ``label_index``
  classes.json   {"classes": [...], "has_masks": bool, "channels": C, "size": S}

partition writes ``<partition>/``:
  splits.parquet          row, image_id, patient_id, site, label, label_index, split
                          (train | val | test), hospital (-1 for test), test_hospital (for a test row,
                          the hospital whose held-out test part it is in; -1 for train/val rows and
                          for test rows in no hospital's part)
  hospital_<k>/index.parquet  the train and val rows that hospital k holds (row, split, label_index)
  report.json, label_counts.png
  summary.json            the headline figures for ``dvc metrics show`` (duplicates dropped, split sizes)

Every trainer (centralized, each federated hospital, evaluate) reads through ``load_split``
so that they all see exactly the same examples for a split. The test split is held out centrally
(no hospital folder holds it); its per-hospital parts partition it (a patient in one part at
most), for scoring a hospital's own model on data like its own: ``load_split(..., "test",
hospital=k)``, or ``hospital_test_parts`` for their positions in the pooled test split.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import pandas as pd

from fedbrain.errors import InputError

SPLITS = ("train", "val", "test")
TEST_PART = "test_hospital"  # splits.parquet's column: whose held-out test part a test row is in


@dataclass
class Split:
    images: np.ndarray  # (n, size, size, channels) float32 in [0, 1]
    labels: np.ndarray  # (n,) int64 class index
    masks: np.ndarray | None  # (n, size, size, 1) uint8, or None without masks
    image_ids: list[str]
    patient_ids: list[str | None]

    def __len__(self) -> int:
        return len(self.labels)


@contextmanager
def replaced_folder(out: str | Path) -> Iterator[Path]:
    """A new temporary folder beside `out` to write into; when the block ends without an error it
    replaces `out` whole (renamed over it), and on any error `out` is left as it was and the
    temporary folder removed: a stage's output folder is never half-written."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    old = None
    try:
        os.chmod(tmp, 0o755)
        yield tmp
        if out.exists() or out.is_symlink():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.replace(out, old)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and not out.exists():
            os.replace(old, out)  # put the previous result back
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink()


def write_atomic(path: str | Path, write) -> None:
    """``write(tmp)`` to a temporary file in the same folder, then renamed over ``path``: never half
    a file (the file-level ``replaced_folder``). ``tmp`` keeps ``path``'s suffix, which Keras reads."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_text_atomic(path: str | Path, text: str) -> None:
    write_atomic(path, lambda tmp: tmp.write_text(text))


def load_classes(processed_dir: str | Path) -> dict:
    path = Path(processed_dir) / "classes.json"
    if not path.is_file():
        raise InputError(f"{path}: not found; run the preprocess stage first (dvc repro preprocess)")
    return json.loads(path.read_text())


# A hospital's folder: its partition (partition/hospital_<k>/) and its personalized models
# (models/federated/<variant>/hospital_<k>/).
HOSPITAL_FOLDER = re.compile(r"hospital_(\d+)")


def hospital_dir(root: str | Path, hospital: int) -> Path:
    return Path(root) / f"hospital_{hospital}"


def hospital_examples(partition_dir: str | Path, hospital: int, split: str = "train") -> int:
    """How many examples of `split` the hospital holds, from its index alone (no images read)."""
    index = pd.read_parquet(hospital_dir(partition_dir, hospital) / "index.parquet", columns=["split"])
    return int((index["split"] == split).sum())


def _splits_table(partition_dir: Path) -> tuple[pd.DataFrame, Path]:
    path = partition_dir / "splits.parquet"
    if not path.is_file():
        raise InputError(f"{path}: not found; run the partition stage first (dvc repro partition)")
    return pd.read_parquet(path), path


def _test_part(partition_dir: Path, hospital: int) -> pd.DataFrame:
    """splits.parquet's test rows in hospital ``hospital``'s held-out test part."""
    table, path = _splits_table(partition_dir)
    if TEST_PART not in table.columns:
        raise InputError(f"{path}: has no {TEST_PART} column (written before each hospital had a held-out "
                         f"test part), so hospital {hospital}'s test part is unknown; re-run the partition "
                         "stage: dvc repro partition")
    if not hospital_dir(partition_dir, hospital).is_dir():
        known = sorted(p.name for p in partition_dir.glob("hospital_*"))
        raise InputError(f"{partition_dir}: has no hospital {hospital} (hospitals: {', '.join(known) or 'none'}); "
                         "use one of them, or re-run the partition stage with more partition.hospitals")
    return table[(table["split"] == "test") & (table[TEST_PART] == hospital)]


def hospital_test_parts(partition_dir: str | Path) -> dict[int, np.ndarray] | None:
    """Each hospital's held-out test part as positions in the pooled test split (``load_split(...,
    "test")``'s order): {hospital: positions}, hospitals without a test part left out. None for a
    splits.parquet written before test parts existed: a caller that can do without them decides."""
    table, _ = _splits_table(Path(partition_dir))
    if TEST_PART not in table.columns:
        return None
    owner = table.loc[table["split"] == "test", TEST_PART].to_numpy(dtype=np.int64)
    return {int(k): np.flatnonzero(owner == k) for k in np.unique(owner) if k >= 0}


def load_split(processed_dir: str | Path, partition_dir: str | Path, split: str,
               hospital: int | None = None) -> Split:
    """The examples of one split, pooled (hospital=None) or as held by one hospital; for the test
    split, hospital k's held-out test part (splits.parquet's test_hospital)."""
    if split not in SPLITS:
        raise InputError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
    processed_dir, partition_dir = Path(processed_dir), Path(partition_dir)
    if hospital is None:
        index = _splits_table(partition_dir)[0]
    elif split == "test":
        index = _test_part(partition_dir, hospital)
    else:
        index_path = hospital_dir(partition_dir, hospital) / "index.parquet"
        if not index_path.is_file():
            raise InputError(f"{index_path}: not found; run the partition stage first (dvc repro partition)")
        index = pd.read_parquet(index_path)
    index = index[index["split"] == split]
    rows = index["row"].to_numpy(dtype=np.int64)

    images = np.load(processed_dir / "images.npy", mmap_mode="r")
    masks_path = processed_dir / "masks.npy"
    masks = np.load(masks_path, mmap_mode="r")[rows] if masks_path.is_file() else None
    full = pd.read_parquet(processed_dir / "index.parquet", columns=["row", "image_id", "patient_id"])
    full = full.set_index("row").loc[rows]
    return Split(
        images=np.asarray(images[rows], dtype=np.float32),
        labels=index["label_index"].to_numpy(dtype=np.int64),
        masks=None if masks is None else np.asarray(masks),
        image_ids=full["image_id"].tolist(),
        patient_ids=full["patient_id"].tolist(),
    )
