"""The command line: bad input ends in one readable line and exit code 1, never a traceback."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import yaml

from helpers import CLASSES, PROJECT


def fedbrain(*args, cwd):
    return subprocess.run([sys.executable, "-m", "fedbrain.cli", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=120)


def write_params(path: Path, **data):
    params = yaml.safe_load((PROJECT / "params.yaml").read_text())
    params["data"].update(data)
    path.write_text(yaml.safe_dump(params))
    return path


def assert_one_line_error(result, *fragments):
    assert result.returncode == 1, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_missing_root(tmp_path):
    params = write_params(tmp_path / "params.yaml", root=str(tmp_path / "missing"))
    result = fedbrain("ingest", "--params", str(params), "--out", str(tmp_path / "m.parquet"), cwd=tmp_path)
    assert_one_line_error(result, "missing", "dataset root not found", "data.root")
    assert not (tmp_path / "m.parquet").exists()


def test_unreadable_params_value(tmp_path):
    params = write_params(tmp_path / "params.yaml", layout=["class_folders"])
    result = fedbrain("ingest", "--params", str(params), cwd=tmp_path)
    assert_one_line_error(result, "'data.layout'", "expected str")


def test_params_not_yaml(tmp_path):
    (tmp_path / "params.yaml").write_text("data: [unclosed\n")
    result = fedbrain("ingest", "--params", str(tmp_path / "params.yaml"), cwd=tmp_path)
    assert_one_line_error(result, "params.yaml", "not valid YAML")


def test_unknown_class_folder(tmp_path, class_folder_root):
    (class_folder_root / "Glioma_extra").mkdir()
    params = write_params(tmp_path / "params.yaml", root=str(class_folder_root), classes=CLASSES)
    result = fedbrain("ingest", "--params", str(params), "--out", str(tmp_path / "m.parquet"), cwd=tmp_path)
    assert_one_line_error(result, "Glioma_extra", "not a known class")


def test_tensorflow_native_logs_hidden_unless_verbose(tmp_path):
    """A CPU machine's 'Unable to register cuDNN factory' lines read as failures to a newcomer."""
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}  # the suite sets its own
    args = [sys.executable, "-m", "fedbrain.cli"]
    predict = ["predict", "--params", str(PROJECT / "params.yaml"), "--model", str(tmp_path / "none.keras"), "x.jpg"]
    quiet = subprocess.run(args + predict, cwd=tmp_path, capture_output=True, text=True, timeout=120, env=env)
    assert_one_line_error(quiet, "none.keras", "model file not found")  # TensorFlow was imported first
    assert "Unable to register" not in quiet.stderr and " E external/" not in quiet.stderr, quiet.stderr
    loud = subprocess.run(args + ["--verbose"] + predict, cwd=tmp_path, capture_output=True, text=True,
                          timeout=120, env=env)
    assert_one_line_error(loud, "model file not found")
    assert "Unable to register" in loud.stderr, loud.stderr  # what the flag is for
