"""Shared fixtures: the real data sets beside the project, tiny datasets built in tmp_path."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from helpers import CLASSES, shared_path, write_jpeg  # noqa: E402


@pytest.fixture
def shared_data():
    return shared_path


@pytest.fixture
def class_folder_root(tmp_path) -> Path:
    """Four class folders with three distinct tiny JPEGs each."""
    root = tmp_path / "classes"
    for k, name in enumerate(CLASSES):
        for i in range(3):
            write_jpeg(root / name / f"{name}_{i}.jpg", seed=10 * k + i)
    return root
