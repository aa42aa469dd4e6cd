"""Plain helpers the test modules import (``from helpers import ...``); fixtures stay in conftest.py.

Not in conftest.py: more than one conftest module exists (tests/model has its own), and
``from conftest import`` would get whichever pytest imported first.
"""

from __future__ import annotations

import math
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


def binomial_tail(k: int, v: int, q: float) -> float:
    """P[Binomial(k, q) >= v] from math.comb terms (not scipy): the privacy audits' tests check the
    library's bound against it."""
    return 1.0 if v <= 0 else math.fsum(math.comb(k, j) * q ** j * (1 - q) ** (k - j) for j in range(v, k + 1))


def one_run_p_value_by_hand(m: int, k: int, v: int, epsilon: float, delta: float) -> float:
    """Steinke, Nasr & Jagielski's bound on P[W >= v] written out, its maximum over every i in 1..m:
    f(v) + 2 m delta max_i (f(v - i) - f(v)) / i, f the Binomial(k, e^eps / (1 + e^eps)) tail."""
    q = math.exp(epsilon) / (1 + math.exp(epsilon))
    f = binomial_tail(k, v, q)
    if delta == 0:
        return min(1.0, f)
    return min(1.0, f + 2 * m * delta * max((binomial_tail(k, v - i, q) - f) / i for i in range(1, m + 1)))


def dvc_metrics_table(root: Path) -> tuple[list[str], list[dict]]:
    """What `dvc metrics show` prints in the DVC project at ``root``: its column names (the Path
    column first) and one row per metrics file (``-`` where a file lacks a figure). DVC's own reader
    and table, in process."""
    from dvc.compare import metrics_table
    from dvc.repo import Repo

    with Repo(str(root)) as repo:
        shown = repo.metrics.show()
    errors = {path: result["error"] for rev in shown.values() for path, result in rev.get("data", {}).items()
              if "error" in result}
    assert not errors, errors
    table = metrics_table(shown)
    columns = list(table.keys())
    return columns, [dict(zip(columns, row)) for row in table]
