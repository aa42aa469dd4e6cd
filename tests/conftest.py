"""Shared fixtures: the real data sets beside the project, tiny datasets built in tmp_path."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from helpers import CLASSES, shared_path, write_jpeg  # noqa: E402


def pytest_configure(config):
    # `timeout` or a CI runner stops the suite with SIGTERM, which would end pytest at once and
    # orphan a test's SuperLink and SuperNodes: raise KeyboardInterrupt instead, so the test's
    # `with Federation(...)` stops every process it started, as Ctrl-C does.
    def interrupt(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, interrupt)


@pytest.fixture(autouse=True)
def mlflow_environment():
    """MLflow 3's set_tracking_uri also writes MLFLOW_TRACKING_URI into os.environ: a test that logs in
    process would point every later test's subprocesses (dvc repro, a federation) at its own store,
    so the dvc pipeline's runs would land in another test's database. Each test leaves the MLflow
    variables as it found them."""
    before = {k: v for k, v in os.environ.items() if k.startswith("MLFLOW_")}
    yield
    for name in [k for k in os.environ if k.startswith("MLFLOW_") and k not in before]:
        del os.environ[name]
    os.environ.update(before)


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
