"""Compile the Kubeflow pipeline (`pipelines/` over `components/`) to pipeline.yaml.

`components/` and `pipelines/` are top-level folders of the repository (DESIGN.md "Layout"), not
part of the installed package: the image runs the component functions' source that kfp copies
into pipeline.yaml, never these modules. So compiling needs a checkout; the repository root is
put on sys.path to import them.

The output is deterministic for a given params file and kfp version: kfp 2.13 writes no
timestamps and no machine paths (checked: two compiles are byte-identical; the only path in it is
params data.root, as params.yaml spells it), so the committed pipeline.yaml can be compared with a
fresh compile (tests/code/test_pipeline.py).
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

from fedbrain.config import pipeline_variants
from fedbrain.errors import InputError

REPO = Path(__file__).resolve().parents[2]


def _pipelines_module():
    if not (REPO / "pipelines" / "fedbrain_pipeline.py").is_file():
        raise InputError(f"{REPO}: no pipelines/ folder here; compile the pipeline from a checkout of the repository")
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    return importlib.import_module("pipelines.fedbrain_pipeline")


def build(params: dict):
    """The pipeline function for `params` (variants and default parameter values compiled in)."""
    return _pipelines_module().build_pipeline(params)


def compile_pipeline(params: dict, out: str | Path = "pipeline.yaml") -> Path:
    """Write the compiled pipeline (KFP IR YAML) to `out`; returns its path."""
    from kfp import compiler

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    compiler.Compiler().compile(build(params), str(out))
    return out


def run(params: dict, out: str | Path = "pipeline.yaml") -> Path:
    """The `fedbrain pipeline compile` command."""
    path = compile_pipeline(params, out)
    variants = ", ".join(pipeline_variants(params)) or "none"
    print(f"pipeline: compiled to {path} (federated variants: {variants})")
    return path


__all__ = ["build", "compile_pipeline", "run"]
