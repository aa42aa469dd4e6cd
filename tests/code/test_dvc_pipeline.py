"""`dvc repro` on the embedded sample, in a copy of the project: all stages run, a second run does nothing;
and the same stages as a Kubeflow pipeline run by kfp.local leave the same results."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from helpers import PROJECT, dvc_metrics_table

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
    # The pipeline's mechanics, not model quality, are under test: a few epochs, one round (a
    # federation's start-up, four TensorFlow processes, is most of what each federated stage costs).
    params = yaml.safe_load((copy / "params.yaml").read_text())
    params["train"]["classifier"]["epochs"] = 2
    params["federated"].update(rounds=1, local_epochs=1)
    assert params["pipeline_variants"] == list(VARIANTS)  # the project's default
    (copy / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return copy


def dvc(*args, cwd):
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    return subprocess.run([str(Path(sys.executable).parent / "dvc"), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=1800)


@pytest.fixture(scope="module")
def first_repro(project_copy):
    return dvc("repro", cwd=project_copy)


def mlflow_runs(project: Path) -> int:
    import sqlite3

    with sqlite3.connect(project / "mlflow.db") as db:
        return db.execute("SELECT COUNT(*) FROM runs").fetchone()[0]


@pytest.mark.slow
def test_repro_twice_on_embedded_sample(project_copy, first_repro):
    first = first_repro
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
    # `dvc metrics show`: the headline figures, a row per run with its test accuracy, at most 30 columns.
    columns, rows = dvc_metrics_table(project_copy)
    assert len(columns) <= 30, columns
    shown = {row["Path"]: row for row in rows}
    assert all(shown[f"reports/headline/{run}.json"]["test_accuracy"] != "-" for run in metrics), shown
    assert shown["reports/headline/federated/secure/classifier.json"]["epsilon"] != "-"
    # The federated run per round against the centralized reference line.
    assert (project_copy / "reports" / "plots" / "rounds_classification.png").stat().st_size > 1000

    second = dvc("repro", cwd=project_copy)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "Running stage" not in second.stdout, second.stdout

    dag = dvc("dag", cwd=project_copy)
    for stage in STAGES:
        assert stage in dag.stdout


@pytest.mark.slow
def test_kfp_local_run_leaves_the_same_results_as_dvc_repro(project_copy, first_repro, tmp_path):
    """The whole pipeline (the pipelines/ DAG over the components/) run by kfp.local's SubprocessRunner,
    every task a subprocess of this interpreter, from the same params as the dvc run: FedAvg only,
    the secure variant's rounds are the dvc test's cost already. Data stages and the centralized
    model are deterministic: their results must equal dvc's; the federated run is not bit-reproducible
    (replies arrive in any order), so it must report the same metrics, with its own values."""
    assert first_repro.returncode == 0, first_repro.stderr[-3000:]
    runs_before = mlflow_runs(project_copy)
    result = subprocess.run([sys.executable, "-m", "fedbrain.cli", "pipeline", "run-local", "--root",
                             str(tmp_path / "kfp"), "pipeline_variants=[fedavg]"], cwd=project_copy,
                            capture_output=True, text=True, timeout=1800)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    (run_dir,) = (tmp_path / "kfp").iterdir()
    assert f"artifacts in {run_dir}" in result.stdout
    tasks = {"ingest", "validate", "preprocess", "partition", "train-centralized", "train-federated", "evaluate"}
    assert {p.name for p in run_dir.iterdir()} == tasks

    def same_json(kfp_file: str, dvc_file: str):
        assert json.loads((run_dir / kfp_file).read_text()) == json.loads((project_copy / dvc_file).read_text())

    same_json("validate/report/summary.json", "reports/validation/summary.json")
    same_json("partition/partition/report.json", "data/partition/report.json")
    import pandas as pd

    pd.testing.assert_frame_equal(pd.read_parquet(run_dir / "partition/partition/splits.parquet"),
                                  pd.read_parquet(project_copy / "data/partition/splits.parquet"))
    assert "<html" in (run_dir / "validate/data_docs").read_text().lower()  # the Data Docs page, an HTML artifact

    kfp_metrics = json.loads((run_dir / "evaluate/reports/metrics.json").read_text())
    dvc_metrics = json.loads((project_copy / "reports/metrics.json").read_text())
    assert set(kfp_metrics) == {"centralized/classifier", "federated/fedavg/classifier"}
    assert kfp_metrics["centralized/classifier"] == dvc_metrics["centralized/classifier"]
    federated = kfp_metrics["federated/fedavg/classifier"]
    assert set(federated) == set(dvc_metrics["federated/fedavg/classifier"])
    assert 0.0 <= federated["test_accuracy"] <= 1.0 and 0.0 <= federated["mia_auc"] <= 1.0
    # The tasks' MLflow runs land in the same store as dvc's (params tracking_uri, relative to the
    # working directory): the centralized and the federated one at least.
    assert mlflow_runs(project_copy) >= runs_before + 2
