"""Plain helpers the test modules import (``from helpers import ...``); fixtures stay in conftest.py.

Not in conftest.py: more than one conftest module exists (tests/model has its own), and
``from conftest import`` would get whichever pytest imported first.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

PROJECT = Path(__file__).resolve().parents[1]
SHARED_DATA = PROJECT.parent / "shared" / "data"
CLASSES = ["glioma", "meningioma", "notumor", "pituitary"]


def shared_path(relative: str) -> Path:
    """A path under ../shared/data; the test is skipped when that data is absent."""
    path = SHARED_DATA / relative
    if not path.exists():
        pytest.skip(f"real data {path} is absent (it lives beside the project, in ../shared/data)")
    return path


def write_jpeg(path: Path, seed: int, size: int = 64) -> Path:
    from PIL import Image

    rng = np.random.default_rng(seed)
    pixels = (rng.random((size, size)) * 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, quality=95)
    return path
