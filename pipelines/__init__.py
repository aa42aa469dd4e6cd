"""Kubeflow pipeline definitions over `components/`; compiled to pipeline.yaml by `fedbrain pipeline compile`.

A top-level folder, not an installed package (DESIGN.md "Layout"), imported by `fedbrain.pipeline`.
"""
