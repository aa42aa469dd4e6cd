"""Shared fixtures: the real data sets beside the project, tiny datasets built in tmp_path."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

PROJECT = Path(__file__).resolve().parents[1]
SHARED_DATA = PROJECT.parent / "shared" / "data"
CLASSES = ["glioma", "meningioma", "notumor", "pituitary"]


def shared_path(relative: str) -> Path:
    path = SHARED_DATA / relative
    if not path.exists():
        pytest.skip(f"real data {path} is absent (it lives beside the project, in ../shared/data)")
    return path


@pytest.fixture
def shared_data():
    return shared_path


def write_jpeg(path: Path, seed: int, size: int = 64) -> Path:
    from PIL import Image

    rng = np.random.default_rng(seed)
    pixels = (rng.random((size, size)) * 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, quality=95)
    return path


@pytest.fixture
def class_folder_root(tmp_path) -> Path:
    """Four class folders with three distinct tiny JPEGs each."""
    root = tmp_path / "classes"
    for k, name in enumerate(CLASSES):
        for i in range(3):
            write_jpeg(root / name / f"{name}_{i}.jpg", seed=10 * k + i)
    return root
