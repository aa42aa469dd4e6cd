"""One Kubeflow component per fedbrain stage (the stages of dvc.yaml, in data order).

Every component is a lightweight Python component on the project image: kfp copies the
function's source into pipeline.yaml and runs it there with `python3 -m kfp.dsl.executor_main`.
So each body imports what it needs *inside* the function, and does only three things:
1. writes the `params_json` pipeline parameter (params.yaml's content) to a params file and
   loads it with `fedbrain.config.load_params`, as the `fedbrain` command line does;
2. calls the stage function `dvc repro` calls, with KFP artifact paths (`artifact.path`) as the
   stage's folder arguments (artifact paths are where the stage reads and writes);
3. for the KFP UI, copies a stage report into a Metrics or HTML artifact.
No stage logic lives here: a bad input raises the stage's own InputError, which fails the task.

No package is installed at run time (`packages_to_install=[]`, `install_kfp_package=False`: kfp
would otherwise prepend `pip install kfp` to every command), so the image must hold fedbrain and
its pinned dependencies, kfp included; the same property keeps the components runnable by
`kfp.local.SubprocessRunner(use_venv=False)` in the project's .venv.

The raw dataset enters as a `Dataset` artifact (a `dsl.importer` in the pipeline). Its local path
is a function of its URI (`minio://b/k` -> `/minio/b/k`), so the manifest's source paths, written
by ingest under `raw.path`, resolve in validate and preprocess too, which take the same artifact.
"""

import keyword
import linecache
import re

from kfp import dsl
from kfp.dsl import HTML, Dataset, Input, Metrics, Model, Output

# The project image. Built from this repository (e.g. `pip install -c requirements.lock .` on
# python:3.11-slim, which needs no kfp download at run time since kfp==2.13.0 is a dependency);
# no image build can run on the machines this project is developed on (no Docker engine), so
# push one to a registry the cluster can pull from and change this name (then recompile).
IMAGE = "fedbrain:0.1.0"

# Every component: the project image, nothing installed when the task starts.
component = dsl.component(base_image=IMAGE, packages_to_install=[], install_kfp_package=False)


@component
def ingest(params_json: str, raw: Input[Dataset], manifest: Output[Dataset]):
    """fedbrain.ingest.run: the raw dataset (params data.root := the `raw` artifact) -> manifest table."""
    import json
    import tempfile
    from pathlib import Path

    import yaml

    from fedbrain.config import load_params, section
    from fedbrain.ingest import run

    params_file = Path(tempfile.mkdtemp()) / "params.yaml"
    params_file.write_text(yaml.safe_dump(json.loads(params_json), sort_keys=False))
    params = load_params(params_file)
    section(params, "data")["root"] = raw.path
    run(params, out=Path(manifest.path))


@component
def validate(params_json: str, raw: Input[Dataset], manifest: Input[Dataset], report: Output[Dataset],
             data_docs: Output[HTML], summary: Output[Metrics]):
    """fedbrain.validate.run: Great Expectations over the manifest and image statistics.

    A failed validation raises (the task fails, the pipeline stops). `report`: the stage's folder
    (result.json, duplicates.csv, summary.json, data_docs/); `data_docs`: the Data Docs index page
    (the full site, with its styles and validation pages, is in `report`); `summary`: summary.json.
    `raw` is taken so the images the manifest points at are present in this task's pod.
    """
    import json
    import shutil
    import tempfile
    from pathlib import Path

    import yaml

    from fedbrain.config import load_params
    from fedbrain.validate import run

    params_file = Path(tempfile.mkdtemp()) / "params.yaml"
    params_file.write_text(yaml.safe_dump(json.loads(params_json), sort_keys=False))
    result = run(load_params(params_file), manifest=Path(manifest.path), out=Path(report.path))
    shutil.copyfile(Path(report.path) / "data_docs" / "index.html", data_docs.path)
    for key, value in result.items():
        if isinstance(value, (int, float)):
            summary.log_metric(key, float(value))


@component
def preprocess(params_json: str, raw: Input[Dataset], manifest: Input[Dataset], processed: Output[Dataset]):
    """fedbrain.preprocess.run: resize and normalise every image (and mask) once -> arrays.

    Runs after validate (the pipeline orders it so, as dvc.yaml's dependency on summary.json does);
    `raw` is taken so the images the manifest points at are present in this task's pod.
    """
    import json
    import tempfile
    from pathlib import Path

    import yaml

    from fedbrain.config import load_params
    from fedbrain.preprocess import run

    params_file = Path(tempfile.mkdtemp()) / "params.yaml"
    params_file.write_text(yaml.safe_dump(json.loads(params_json), sort_keys=False))
    run(load_params(params_file), manifest=Path(manifest.path), out=Path(processed.path))


@component
def partition(params_json: str, processed: Input[Dataset], partition: Output[Dataset]):
    """fedbrain.partition.run: leakage-free train/val/test split, the train part across hospitals."""
    import json
    import tempfile
    from pathlib import Path

    import yaml

    from fedbrain.config import load_params
    from fedbrain.partition import run

    params_file = Path(tempfile.mkdtemp()) / "params.yaml"
    params_file.write_text(yaml.safe_dump(json.loads(params_json), sort_keys=False))
    run(load_params(params_file), processed=Path(processed.path), out=Path(partition.path))


@component
def train_centralized(params_json: str, processed: Input[Dataset], partition: Input[Dataset],
                      model: Output[Model]):
    """fedbrain.train.run_centralized: the pooled baseline (classifier, and U-Net with masks) -> `model`."""
    import json
    import tempfile
    from pathlib import Path

    import yaml

    from fedbrain.config import load_params
    from fedbrain.train import run_centralized

    params_file = Path(tempfile.mkdtemp()) / "params.yaml"
    params_file.write_text(yaml.safe_dump(json.loads(params_json), sort_keys=False))
    run_centralized(load_params(params_file), processed=Path(processed.path), partition=Path(partition.path),
                    out=Path(model.path))


@component
def train_federated(params_json: str, variant: str, processed: Input[Dataset], partition: Input[Dataset],
                    model: Output[Model]):
    """fedbrain.federated.launcher.run for one params.yaml variant -> `model`/<variant>/.

    With federated.launcher local (the default) the federation runs inside this task's pod, as
    `dvc repro` runs it on one machine: a SuperLink and one SuperNode per hospital as processes on
    loopback (TLS and SuperNode authentication on, keys made in the pod). With kubernetes (set in
    params_json) the launcher makes it of pods of its own from k8s/base and deletes them after
    (fedbrain/federated/cluster.py): the hospitals then train on their data claims, this task's
    `partition` only being checked, and this pod needs a service account allowed to make them and the
    label fedbrain/flower-control: "true". The model folder is named by the variant, as
    models/federated/<variant>/ is under DVC (MLflow run names are taken from it).
    """
    import json
    import tempfile
    from pathlib import Path

    import yaml

    from fedbrain.config import load_params
    from fedbrain.federated.launcher import run

    params_file = Path(tempfile.mkdtemp()) / "params.yaml"
    params_file.write_text(yaml.safe_dump(json.loads(params_json), sort_keys=False))
    run(load_params(params_file), processed=Path(processed.path), partition=Path(partition.path),
        out=Path(model.path) / variant, variant=variant)


# evaluate takes one Model input per federated variant. kfp 2.13 has no list-of-artifacts input
# except dsl.Collected from a dsl.ParallelFor, which kfp.local does not run, and kfp.local also
# needs every declared input artifact bound (no optional, unbound ones). The variants are fixed
# when the pipeline is compiled, so the component's signature is made then, from this template:
# its body is the same for any variants (`federated` maps each variant to its argument).
_EVALUATE = '''\
def evaluate(params_json: str, processed: Input[Dataset], partition: Input[Dataset], centralized: Input[Model],
{federated_inputs}
             reports: Output[Dataset], metrics: Output[Metrics], comparison: Output[HTML]):
    """fedbrain.evaluate.run: every trained model on the same held-out test split.

    The models are laid out as under DVC (models/centralized, models/federated/<variant>) in a
    scratch folder; `reports`: the stage's folder (evaluation.json, metrics.json, comparison
    table, plots); `metrics`: metrics.json as `<run>/<metric>`; `comparison`: the comparison
    table of centralized vs each federated variant, as HTML.
    """
    import json
    import shutil
    import tempfile
    from pathlib import Path

    import pandas as pd
    import yaml

    from fedbrain.config import load_params
    from fedbrain.evaluate import run

    federated = {{{federated_map}}}
    scratch = Path(tempfile.mkdtemp())
    params_file = scratch / "params.yaml"
    params_file.write_text(yaml.safe_dump(json.loads(params_json), sort_keys=False))
    models = scratch / "models"
    shutil.copytree(centralized.path, models / "centralized")
    for name, artifact in federated.items():
        shutil.copytree(Path(artifact.path) / name, models / "federated" / name,
                        ignore=shutil.ignore_patterns("checkpoints"))
    out = Path(reports.path)
    run(load_params(params_file), processed=Path(processed.path), partition=Path(partition.path),
        models=models, out=out)
    for run_name, values in json.loads((out / "metrics.json").read_text()).items():
        for key, value in values.items():
            if isinstance(value, (int, float)):
                metrics.log_metric(f"{{run_name}}/{{key}}", float(value))
    Path(comparison.path).write_text(pd.read_csv(out / "comparison.csv").to_html(index=False))
'''


def federated_input_name(variant: str) -> str:
    """The evaluate component's input for a variant's model: `federated_<variant>` as an identifier."""
    name = "federated_" + re.sub(r"\W", "_", variant)
    if not name.isidentifier() or keyword.iskeyword(name):
        raise ValueError(f"variant {variant!r} gives no valid input name")
    return name


def evaluate_component(variants: list[str]):
    """The evaluate component for these federated variants (one `federated_<variant>` input each)."""
    names = [federated_input_name(v) for v in variants]
    if len(set(names)) != len(names):
        raise ValueError(f"variants {variants} map to clashing input names {names}")
    source = _EVALUATE.format(
        federated_inputs="".join(f"             {n}: Input[Model],\n" for n in names).rstrip("\n"),
        federated_map=", ".join(f"{v!r}: {n}" for v, n in zip(variants, names)))
    # kfp reads the function's source with inspect.getsource: register the generated text under
    # a name of its own (one per variant set) so that it can.
    filename = f"<fedbrain evaluate component: {', '.join(variants)}>"
    linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
    namespace = {"Input": Input, "Output": Output, "Dataset": Dataset, "Model": Model,
                 "Metrics": Metrics, "HTML": HTML, "__name__": __name__}
    exec(compile(source, filename, "exec"), namespace)
    return component(namespace["evaluate"])
