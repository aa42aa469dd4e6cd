"""The Kubeflow pipeline compiles to a valid IR that mirrors dvc.yaml, and pipeline.yaml is up to date.

Fast and offline: nothing here runs a component or talks to a Kubeflow server (none can run here).
"""

from __future__ import annotations

import inspect
import subprocess
import sys

import pytest
import yaml

from helpers import PROJECT

from fedbrain import pipeline as fedbrain_pipeline
from fedbrain.config import load_params

DATA_TASKS = ("ingest", "validate", "preprocess", "partition")
# The component function each task's executor runs, and the fedbrain stage function it must call.
STAGE_CALLS = {
    "ingest": "from fedbrain.ingest import run",
    "validate": "from fedbrain.validate import run",
    "preprocess": "from fedbrain.preprocess import run",
    "partition": "from fedbrain.partition import run",
    "train_centralized": "from fedbrain.train import run_centralized",
    "train_federated": "from fedbrain.federated.launcher import run",
    "evaluate": "from fedbrain.evaluate import run",
}
DATASET, MODEL, METRICS, HTML = "system.Dataset", "system.Model", "system.Metrics", "system.HTML"


def compiled(tmp_path, params: dict | None = None) -> tuple[str, dict]:
    params = params or load_params(PROJECT / "params.yaml")
    path = fedbrain_pipeline.compile_pipeline(params, tmp_path / "pipeline.yaml")
    text = path.read_text()
    return text, next(yaml.safe_load_all(text))  # the IR; a second document holds the Kubernetes platform spec


@pytest.fixture(scope="module")
def ir(tmp_path_factory):
    return compiled(tmp_path_factory.mktemp("pipeline"))[1]


@pytest.fixture(scope="module")
def variants():
    return load_params(PROJECT / "params.yaml")["pipeline_variants"]


def tasks(ir: dict) -> dict:
    return ir["root"]["dag"]["tasks"]


def component_of(ir: dict, task: str) -> dict:
    return ir["components"][tasks(ir)[task]["componentRef"]["name"]]


def executor_of(ir: dict, task: str) -> dict:
    return ir["deploymentSpec"]["executors"][component_of(ir, task)["executorLabel"]]


def federated_tasks(ir: dict) -> dict[str, str]:
    """variant -> task name, from each train-federated task's constant `variant` argument."""
    found = {}
    for name, task in tasks(ir).items():
        if task["componentRef"]["name"].startswith("comp-train-federated"):
            found[task["inputs"]["parameters"]["variant"]["runtimeValue"]["constant"]] = name
    return found


def artifact_types(definitions: dict) -> dict[str, str]:
    return {k: v["artifactType"]["schemaTitle"] for k, v in definitions.get("artifacts", {}).items()}


def test_one_task_per_stage_and_per_variant(ir, variants):
    names = set(tasks(ir))
    assert {"importer", *DATA_TASKS, "train-centralized", "evaluate"} <= names
    federated = federated_tasks(ir)
    assert list(federated) == variants
    assert len(names) == 1 + len(DATA_TASKS) + 1 + len(variants) + 1  # importer, data, centralized, federated, evaluate
    for variant, task in federated.items():
        assert tasks(ir)[task]["taskInfo"]["name"] == f"train-federated-{variant}"


def test_dag_edges_data_then_training_then_evaluation(ir):
    def upstream(task):
        return set(tasks(ir)[task].get("dependentTasks", []))

    assert upstream("ingest") == {"importer"}
    assert "ingest" in upstream("validate")
    assert {"ingest", "validate"} <= upstream("preprocess")  # validation gates preprocessing
    assert upstream("partition") == {"preprocess"}
    training = ["train-centralized", *federated_tasks(ir).values()]
    for task in training:
        assert upstream(task) == {"preprocess", "partition"}
        # centralized and federated training side by side: no training task waits for another
        assert not upstream(task) & set(training)
    assert set(training) <= upstream("evaluate")


def test_artifacts_are_passed_with_their_types(ir, variants):
    outputs = {task: artifact_types(component_of(ir, task).get("outputDefinitions", {})) for task in tasks(ir)}
    inputs = {task: artifact_types(component_of(ir, task).get("inputDefinitions", {})) for task in tasks(ir)}
    assert outputs["importer"] == {"artifact": DATASET}
    assert outputs["ingest"] == {"manifest": DATASET}
    assert outputs["validate"] == {"report": DATASET, "data_docs": HTML, "summary": METRICS}
    assert outputs["preprocess"] == {"processed": DATASET}
    assert outputs["partition"] == {"partition": DATASET}
    for task in ["train-centralized", *federated_tasks(ir).values()]:
        assert outputs[task] == {"model": MODEL}
        assert inputs[task] == {"processed": DATASET, "partition": DATASET}
    assert outputs["evaluate"] == {"reports": DATASET, "metrics": METRICS, "comparison": HTML}
    assert inputs["evaluate"] == {"processed": DATASET, "partition": DATASET, "centralized": MODEL,
                                  **{f"federated_{v}": MODEL for v in variants}}
    # each federated variant's model goes to evaluate's input of that name
    wiring = tasks(ir)["evaluate"]["inputs"]["artifacts"]
    for variant, task in federated_tasks(ir).items():
        assert wiring[f"federated_{variant}"]["taskOutputArtifact"] == {"outputArtifactKey": "model",
                                                                        "producerTask": task}
    assert wiring["centralized"]["taskOutputArtifact"]["producerTask"] == "train-centralized"


def test_params_are_one_json_parameter_defaulting_to_params_yaml(ir):
    params = load_params(PROJECT / "params.yaml")
    declared = ir["root"]["inputDefinitions"]["parameters"]
    assert set(declared) == {"params_json", "data_uri"}
    assert yaml.safe_load(declared["params_json"]["defaultValue"]) == params
    assert declared["data_uri"]["defaultValue"] == params["data"]["root"]
    for name, task in tasks(ir).items():
        if name != "importer":
            assert task["inputs"]["parameters"]["params_json"] == {"componentInputParameter": "params_json"}


def test_every_executor_runs_the_project_image_and_installs_nothing(ir):
    from components import IMAGE

    executors = ir["deploymentSpec"]["executors"]
    containers = [e["container"] for e in executors.values() if "container" in e]
    assert len(containers) == len(tasks(ir)) - 1  # all but the importer
    for container in containers:
        assert container["image"] == IMAGE
        command = " ".join(container["command"] + container["args"])
        assert "pip install" not in command and "pip3" not in command


def test_each_executor_is_a_thin_call_into_its_stage_function(ir):
    """The embedded source defines the function the executor calls, with the component's
    inputs and outputs as its arguments, and imports the stage function dvc.yaml's command runs."""
    for task in tasks(ir):
        if task == "importer":
            continue
        container = executor_of(ir, task)["container"]
        function = container["args"][container["args"].index("--function_to_execute") + 1]
        source = container["command"][-1]
        assert STAGE_CALLS[function] in source
        namespace = {}
        exec(compile(source, f"<{task}>", "exec"), namespace)  # defines the function; runs nothing
        arguments = set(inspect.signature(namespace[function]).parameters)
        component = component_of(ir, task)
        declared = {name for side in ("inputDefinitions", "outputDefinitions")
                    for kind in ("artifacts", "parameters") for name in component.get(side, {}).get(kind, {})}
        assert arguments == declared, task


def test_compile_is_deterministic_and_has_no_machine_paths(tmp_path):
    first, _ = compiled(tmp_path / "a")
    second, _ = compiled(tmp_path / "b")
    assert first == second
    assert str(PROJECT) not in first and str(tmp_path) not in first


def test_committed_pipeline_yaml_is_a_fresh_compile(tmp_path):
    committed = PROJECT / "pipeline.yaml"
    assert committed.is_file(), "pipeline.yaml is missing: run `fedbrain pipeline compile`"
    fresh, _ = compiled(tmp_path)
    assert committed.read_text() == fresh, "pipeline.yaml is stale: run `fedbrain pipeline compile` and commit it"


def test_variants_are_compiled_in(tmp_path):
    params = load_params(PROJECT / "params.yaml")
    params["variants"] = {"fedavg": {}, "dp-strong": {"privacy": {"mode": "example"}}}
    params["pipeline_variants"] = ["fedavg", "dp-strong"]
    _, ir = compiled(tmp_path, params)
    assert list(federated_tasks(ir)) == ["fedavg", "dp-strong"]
    assert "federated_dp_strong" in component_of(ir, "evaluate")["inputDefinitions"]["artifacts"]


def test_cli_compiles_to_the_given_file(tmp_path):
    out = tmp_path / "sub" / "pipeline.yaml"
    result = subprocess.run([sys.executable, "-m", "fedbrain.cli", "pipeline", "compile", "--out", str(out)],
                            cwd=PROJECT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "compiled to" in result.stdout
    assert out.read_text() == (PROJECT / "pipeline.yaml").read_text()


def test_cli_bad_params_file_is_one_line_error(tmp_path):
    result = subprocess.run([sys.executable, "-m", "fedbrain.cli", "pipeline", "compile", "--params",
                             str(tmp_path / "missing.yaml"), "--out", str(tmp_path / "p.yaml")],
                            cwd=PROJECT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and result.stderr.startswith("error:") and "Traceback" not in result.stderr


def test_federated_tasks_carry_the_label_the_superlink_policy_admits(ir, variants):
    """k8s/base's superlink-ingress admits Control API clients by this pod label: a train-federated
    task with `federated.launcher: kubernetes` needs it; no other task gets it."""
    from pipelines.fedbrain_pipeline import FLOWER_CONTROL_LABEL

    policies = yaml.safe_load_all((PROJECT / "k8s" / "base" / "networkpolicy.yaml").read_text())
    (superlink,) = [p for p in policies if p["metadata"]["name"] == "superlink-ingress"]
    (control,) = [r for r in superlink["spec"]["ingress"] if r.get("ports") == [{"protocol": "TCP", "port": 9093}]]
    key, value = FLOWER_CONTROL_LABEL
    assert all(peer["podSelector"]["matchLabels"] == {key: value} for peer in control["from"])

    with open(PROJECT / "pipeline.yaml") as f:
        platform = [d for d in yaml.safe_load_all(f)][-1]["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    labelled = {executor for executor, spec in platform.items()
                if spec.get("podMetadata", {}).get("labels", {}).get(key) == value}
    federated = {component_of(ir, task)["executorLabel"] for task in federated_tasks(ir).values()}
    assert labelled == federated and len(federated) == len(variants)
