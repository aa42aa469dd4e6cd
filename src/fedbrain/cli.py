"""The `fedbrain` command line: one subcommand per pipeline stage, nothing else.

Each subcommand reads params.yaml, calls one stage function and turns an InputError into one
readable line and exit code 1. Stage modules are imported lazily so `fedbrain --help` is fast
(TensorFlow takes seconds to import).
"""

from __future__ import annotations

import importlib
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
def main():
    """Federated brain-tumour MRI: data stages, training, evaluation."""


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


if __name__ == "__main__":
    main()
