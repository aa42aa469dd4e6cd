"""Kubeflow Pipelines components (kfp 2.13): one per fedbrain stage, each a thin call into the
same `fedbrain` stage function that `dvc repro` runs through the `fedbrain` command line.

A top-level folder, not an installed package (DESIGN.md "Layout"): `fedbrain.pipeline` puts the
repository root on sys.path to import it at compile time. Nothing here runs in the cluster as
this module: kfp serialises each component function's *source* into pipeline.yaml, and the
function runs inside the project image, importing `fedbrain` there.
"""

from components.stages import (IMAGE, evaluate_component, ingest, partition, preprocess, train_centralized,
                               train_federated, validate)

__all__ = ["IMAGE", "evaluate_component", "ingest", "partition", "preprocess", "train_centralized",
           "train_federated", "validate"]
