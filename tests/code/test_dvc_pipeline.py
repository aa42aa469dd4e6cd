"""`dvc repro` on the embedded sample, in a copy of the project: all stages run, a second run does nothing."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from helpers import PROJECT

# train-federated runs once per variant; two of params.yaml's here: plain FedAvg, and the secure
# setting, which has every layer of the others (DP-SGD, Paillier) at once.
VARIANTS = ("fedavg", "secure")
STAGES = ("ingest", "validate", "preprocess", "partition", "train-centralized",
          *(f"train-federated@{v}" for v in VARIANTS), "evaluate")


def project_files() -> list[str]:
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=PROJECT,
                            capture_output=True, text=True, check=True).stdout.splitlines()
    return [f for f in listed if (PROJECT / f).is_file()]


@pytest.fixture(scope="module")
def project_copy(tmp_path_factory) -> Path:
    copy = tmp_path_factory.mktemp("project")
    for relative in project_files():
        target = copy / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(PROJECT / relative, target)
    subprocess.run(["git", "init", "-q"], cwd=copy, check=True)
    # The pipeline's mechanics, not model quality, are under test: a few epochs and rounds.
    params = yaml.safe_load((copy / "params.yaml").read_text())
    params["train"]["classifier"]["epochs"] = 2
    params["federated"].update(rounds=2, local_epochs=1)
    assert params["pipeline_variants"] == list(VARIANTS)  # the project's default
    (copy / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return copy


def dvc(*args, cwd):
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    return subprocess.run([str(Path(sys.executable).parent / "dvc"), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=1800)


@pytest.mark.slow
def test_repro_twice_on_embedded_sample(project_copy):
    first = dvc("repro", cwd=project_copy)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    for stage in STAGES:
        assert f"Running stage '{stage}'" in first.stdout
    assert (project_copy / "data" / "partition" / "report.json").is_file()
    assert (project_copy / "reports" / "validation" / "data_docs" / "index.html").is_file()
    comparison = (project_copy / "reports" / "comparison.csv").read_text()
    assert "centralized" in comparison and "federated/fedavg" in comparison and "federated/secure" in comparison
    # The secure variant is on the privacy-utility plot, with its epsilon in metrics.json.
    assert (project_copy / "reports" / "plots" / "privacy_utility.png").stat().st_size > 1000
    metrics = json.loads((project_copy / "reports" / "metrics.json").read_text())
    assert metrics["federated/secure/classifier"]["epsilon"] > 0
    # The federated run per round against the centralized reference line.
    assert (project_copy / "reports" / "plots" / "rounds_classification.png").stat().st_size > 1000

    second = dvc("repro", cwd=project_copy)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "Running stage" not in second.stdout, second.stdout

    dag = dvc("dag", cwd=project_copy)
    for stage in STAGES:
        assert stage in dag.stdout
