"""The fedbrain pipeline: the stages of dvc.yaml as Kubeflow tasks.

ingest -> validate -> preprocess -> partition, then train-centralized and one train-federated task
per params.yaml variant side by side, then evaluate over all of their models. The federated tasks
are a plain Python loop at compile time (not dsl.ParallelFor, which kfp.local does not run), so
the variants are fixed when the pipeline is compiled; `params_json` may change any other setting
at submit time (a variant it no longer defines fails its task with the stage's own error).

Pipeline parameters:
- params_json: params.yaml's content as JSON (default: the params file it was compiled from);
- data_uri: the raw dataset, imported as a Dataset artifact (default: params data.root, a path
  relative to the working directory, which suits kfp.local run from the repository root; on a
  cluster, e.g. minio://<bucket>/<prefix> or s3://..., which the KFP launcher downloads).
"""

import json

from kfp import dsl, kubernetes

from components import (evaluate_component, ingest, partition, preprocess, train_centralized, train_federated,
                        validate)
from components.stages import federated_input_name
from fedbrain.config import pipeline_variants

NAME = "fedbrain"

# Training tasks run TensorFlow (and a federated one a SuperLink plus a SuperNode per hospital):
# what they ask the scheduler for. kfp.local ignores it.
TRAIN_CPU, TRAIN_MEMORY = "2", "8G"
# The label k8s/base's superlink-ingress policy admits to the SuperLink's Control API: a
# train-federated task with `federated.launcher: kubernetes` submits its run there.
FLOWER_CONTROL_LABEL = ("fedbrain/flower-control", "true")


def build_pipeline(params: dict):
    """The pipeline function for these params (their variants and defaults are compiled in)."""
    variants = pipeline_variants(params)
    evaluate = evaluate_component(variants)
    default_params = json.dumps(params)
    default_data = str((params.get("data") or {}).get("root", ""))

    @dsl.pipeline(name=NAME, description="Federated brain-tumour MRI: data stages, centralized and "
                                         "federated training (one task per variant), evaluation.")
    def fedbrain_pipeline(params_json: str = default_params, data_uri: str = default_data):
        raw = dsl.importer(artifact_uri=data_uri, artifact_class=dsl.Dataset, reimport=False)
        raw.set_display_name("raw-data")
        manifest = ingest(params_json=params_json, raw=raw.output)
        checked = validate(params_json=params_json, raw=raw.output, manifest=manifest.outputs["manifest"])
        processed = preprocess(params_json=params_json, raw=raw.output, manifest=manifest.outputs["manifest"])
        processed.after(checked)  # a failed validation stops the pipeline before preprocessing
        split = partition(params_json=params_json, processed=processed.outputs["processed"])
        data = {"processed": processed.outputs["processed"], "partition": split.outputs["partition"]}

        centralized = train_centralized(params_json=params_json, **data)
        training = [centralized]
        models = {"centralized": centralized.outputs["model"]}
        for variant in variants:
            federated = train_federated(params_json=params_json, variant=variant, **data)
            federated.set_display_name(f"train-federated-{variant}")
            kubernetes.add_pod_label(federated, *FLOWER_CONTROL_LABEL)
            training.append(federated)
            models[federated_input_name(variant)] = federated.outputs["model"]
        for task in training:
            task.set_cpu_request(TRAIN_CPU).set_memory_request(TRAIN_MEMORY)

        evaluate(params_json=params_json, **data, **models)

    return fedbrain_pipeline
