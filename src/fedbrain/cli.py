"""The `fedbrain` command line: one subcommand per pipeline stage, nothing else.

Each subcommand reads params.yaml, calls one stage function and turns an InputError into one
readable line and exit code 1. Stage modules are imported lazily so `fedbrain --help` is fast
(TensorFlow takes seconds to import).
"""

from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path

import click

from fedbrain.config import load_params
from fedbrain.errors import InputError

PARAMS = click.option("--params", "params_path", default="params.yaml", show_default=True,
                      type=click.Path(path_type=Path), help="The params file.")


def _run(module: str, function: str, params_path: Path, **kwargs):
    try:
        params = load_params(params_path)
        stage = getattr(importlib.import_module(f"fedbrain.{module}"), function)
        return stage(params, **kwargs)
    except InputError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(1)


@click.group()
@click.option("--verbose", is_flag=True, help="Show TensorFlow's native log lines (CUDA plugin "
              "registration, oneDNN notes): noise on a CPU machine, useful when debugging TensorFlow itself.")
def main(verbose):
    """Federated brain-tumour MRI: data stages, training, evaluation."""
    # TensorFlow's C++ logger prints 'Unable to register cuDNN factory' at ERROR level on every CPU
    # import, which reads as a failure; level 3 hides it. Python exceptions are unaffected. Set before
    # any stage imports TensorFlow (stages are imported lazily), and only if the user did not choose.
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "0" if verbose else os.environ.get("TF_CPP_MIN_LOG_LEVEL", "3")


@main.command()
@PARAMS
@click.option("--out", default="data/interim/manifest.parquet", show_default=True, type=click.Path(path_type=Path))
def ingest(params_path, out):
    """Dataset root -> manifest table (one row per 2D image or slice)."""
    _run("ingest", "run", params_path, out=out)


@main.command()
@PARAMS
@click.option("--manifest", default="data/interim/manifest.parquet", show_default=True, type=click.Path(path_type=Path))
@click.option("--out", default="reports/validation", show_default=True, type=click.Path(path_type=Path))
def validate(params_path, manifest, out):
    """Great Expectations checks over the manifest and image statistics."""
    _run("validate", "run", params_path, manifest=manifest, out=out)


@main.command()
@PARAMS
@click.option("--manifest", default="data/interim/manifest.parquet", show_default=True, type=click.Path(path_type=Path))
@click.option("--out", default="data/processed", show_default=True, type=click.Path(path_type=Path))
def preprocess(params_path, manifest, out):
    """Resize, normalise intensities; write arrays (and masks) once."""
    _run("preprocess", "run", params_path, manifest=manifest, out=out)


@main.command()
@PARAMS
@click.option("--processed", default="data/processed", show_default=True, type=click.Path(path_type=Path))
@click.option("--out", default="data/partition", show_default=True, type=click.Path(path_type=Path))
def partition(params_path, processed, out):
    """Leakage-free train/val/test split, then the train part across hospitals."""
    _run("partition", "run", params_path, processed=processed, out=out)


@main.command(name="train-centralized")
@PARAMS
@click.option("--processed", default="data/processed", show_default=True, type=click.Path(path_type=Path))
@click.option("--partition", default="data/partition", show_default=True, type=click.Path(path_type=Path))
@click.option("--out", default="models/centralized", show_default=True, type=click.Path(path_type=Path))
def train_centralized(params_path, processed, partition, out):
    """The pooled baseline: classifier (and U-Net when the data has masks), one MLflow run each."""
    _run("train", "run_centralized", params_path, processed=processed, partition=partition, out=out)


@main.command()
@PARAMS
@click.option("--processed", default="data/processed", show_default=True, type=click.Path(path_type=Path))
@click.option("--partition", default="data/partition", show_default=True, type=click.Path(path_type=Path))
@click.option("--models", default="models", show_default=True, type=click.Path(path_type=Path))
@click.option("--out", default="reports", show_default=True, type=click.Path(path_type=Path))
def evaluate(params_path, processed, partition, models, out):
    """Every trained model on the test split: metrics, plots, comparison table."""
    _run("evaluate", "run", params_path, processed=processed, partition=partition, models=models, out=out)


@main.command()
@PARAMS
@click.option("--model", required=True, help="A .keras model (classifier or segmenter), or a registered one: "
              "models:/fedbrain-classifier@champion.")
@click.option("--out", default="predictions", show_default=True, type=click.Path(path_type=Path),
              help="Where the segmenter's mask PNGs and --explain's overlays go.")
@click.option("--slice", "slice_index", default=None, type=int,
              help="Axial slice of NIfTI inputs (default: the middle one).")
@click.option("--explain", is_flag=True, help="Also write OUT/<image>_gradcam.png per classified image: the "
              "Grad-CAM heat map of the predicted class over the image (where the classifier found its evidence).")
@click.argument("images", nargs=-1, required=True)
def predict(params_path, model, out, slice_index, explain, images):
    """Class probabilities (JSON on stdout) and tumour masks for image files."""
    _run("predict", "run", params_path, model=model, images=list(images), out=out, slice_index=slice_index,
         explain=explain)


@main.command(name="train-federated")
@PARAMS
@click.option("--processed", default="data/processed", show_default=True, type=click.Path(path_type=Path))
@click.option("--partition", default="data/partition", show_default=True, type=click.Path(path_type=Path))
@click.option("--out", default="models/federated/fedavg", show_default=True, type=click.Path(path_type=Path))
@click.option("--resume", is_flag=True, help="Continue from the last round saved in --out after a crash.")
@click.option("--insecure", is_flag=True,
              help="Turn TLS and SuperNode authentication off (prints a warning; debugging only).")
@click.option("--variant", default=None,
              help="A federated variant from params.yaml `variants` (dp, paillier, secure, ...) laid over the settings.")
def train_federated(params_path, processed, partition, out, resume, insecure, variant):
    """FedAvg on Flower's Deployment Engine: a SuperLink and one SuperNode per hospital, on loopback."""
    _run("federated.launcher", "run", params_path, processed=processed, partition=partition, out=out,
         resume=resume, insecure=insecure, variant=variant)


@main.group()
def audit():
    """The hash-chained audit log of federated rounds."""


@audit.command(name="verify")
@click.argument("log", type=click.Path(path_type=Path))
def audit_verify(log):
    """Check LOG's hash chain: exit 0 if intact, 1 naming the first bad line, 2 if LOG cannot be read."""
    verify = importlib.import_module("fedbrain.secure.audit").verify
    try:
        result = verify(log)
    except InputError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(2)  # not 1: nothing was checked, which is not the same as a tampered log
    if not result.ok:
        click.echo(f"{log}: line {result.first_bad_line}: {result.reason}", err=True)
        sys.exit(1)
    rounds = f"{result.rounds[0]}-{result.rounds[-1]}" if result.rounds else "none"
    click.echo(f"{log}: intact, {result.entries} entries, rounds {rounds}, "
               f"hospitals [{', '.join(result.hospitals)}], last hash {result.last_sha256[:12]}")


@main.group()
def pipeline():
    """The Kubeflow pipeline (components/, pipelines/)."""


@pipeline.command(name="compile")
@PARAMS
@click.option("--out", default="pipeline.yaml", show_default=True, type=click.Path(path_type=Path))
def pipeline_compile(params_path, out):
    """Compile the pipeline to KFP IR YAML; params.yaml's content and variants are compiled in."""
    _run("pipeline", "run", params_path, out=out)


SETTINGS = click.argument("settings", nargs=-1, metavar="[SECTION.KEY=VALUE]...")


@pipeline.command(name="run-local")
@PARAMS
@click.option("--root", "pipeline_root", default="build/kfp-local", show_default=True,
              type=click.Path(path_type=Path), help="Where kfp.local keeps each task's artifacts.")
@SETTINGS
def pipeline_run_local(params_path, pipeline_root, settings):
    """Run the whole pipeline on this machine with kfp.local (every task a subprocess)."""
    _run("pipeline", "run_local", params_path, pipeline_root=pipeline_root, settings=settings)


@pipeline.command(name="submit")
@click.option("--host", required=True, help="Kubeflow Pipelines URL, e.g. http://localhost:8080.")
@click.option("--experiment", required=True, help="The experiment the run is filed under (made if new).")
@click.option("--pipeline", "pipeline_file", default="pipeline.yaml", show_default=True,
              type=click.Path(path_type=Path))
@click.option("--data-uri", help="The raw dataset's URI on the cluster (minio://, s3://, gs://).")
@click.option("--run-name")
@click.option("--namespace", help="The user namespace of a multi-user Kubeflow.")
@SETTINGS
def pipeline_submit(host, experiment, pipeline_file, data_uri, run_name, namespace, settings):
    """Submit pipeline.yaml with kfp.Client; SECTION.KEY=VALUE settings override its params."""
    from fedbrain import pipeline as kubeflow

    try:
        kubeflow.submit(pipeline_file, host, experiment, settings, data_uri=data_uri, run_name=run_name,
                        namespace=namespace)
    except InputError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
