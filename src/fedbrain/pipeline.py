"""Compile the Kubeflow pipeline (`pipelines/` over `components/`) to pipeline.yaml.

`components/` and `pipelines/` are top-level folders of the repository (DESIGN.md "Layout"), not
part of the installed package: the image runs the component functions' source that kfp copies
into pipeline.yaml, never these modules. So compiling needs a checkout; the repository root is
put on sys.path to import them.

The output is deterministic for a given params file and kfp version: kfp 2.13 writes no
timestamps and no machine paths (checked: two compiles are byte-identical; the only path in it is
params data.root, as params.yaml spells it), so the committed pipeline.yaml can be compared with a
fresh compile (tests/code/test_pipeline.py).

Two ways to run it: `run_locally` (kfp.local's SubprocessRunner in this interpreter, every task a
subprocess on this machine: what tests/code/test_pipeline_local.py runs on the sample) and
`submit` (pipeline.yaml to a Kubeflow Pipelines server with kfp.Client).
"""

from __future__ import annotations

import importlib
import json
import socket
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import urlparse

import yaml

from fedbrain.config import pipeline_variants, with_settings
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


# How long `submit` waits for the server's port before it gives up: an unreachable host (a
# port-forward not running, a wrong name) fails in seconds instead of in urllib3's retries.
CONNECT_TIMEOUT_S = 5.0


def run_locally(params: dict, pipeline_root: str | Path, data_uri: str | Path | None = None) -> Path:
    """Run the whole pipeline on this machine with kfp.local (SubprocessRunner in the current
    interpreter: every task is a subprocess of this Python, its artifacts folders under
    `pipeline_root`). Returns the run's folder, `<pipeline_root>/fedbrain-<time>/<task>/<output>`.

    A failing task stops the run with its log on the console and raises RuntimeError."""
    from kfp import local

    root = Path(pipeline_root).resolve()
    root.mkdir(parents=True, exist_ok=True)
    data = Path(data_uri if data_uri is not None else (params.get("data") or {}).get("root", "")).resolve()
    if not data.is_dir():
        raise InputError(f"{data}: the raw dataset folder is missing; set data.root or pass its path")
    before = set(root.iterdir())
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(root), raise_on_error=True)
    build(params)(params_json=json.dumps(params), data_uri=str(data))
    (run_dir,) = [p for p in root.iterdir() if p not in before and p.is_dir()]
    return run_dir


def run_local(params: dict, pipeline_root: Path, settings: tuple[str, ...] = ()) -> Path:
    """The `fedbrain pipeline run-local` command."""
    params = with_settings(params, settings)
    start = time.perf_counter()
    run_dir = run_locally(params, pipeline_root)
    reports = run_dir / "evaluate" / "reports"
    print(f"pipeline: ran locally in {(time.perf_counter() - start) / 60:.1f} min; artifacts in {run_dir}; "
          f"comparison: {reports / 'comparison.md'}")
    return run_dir


def compiled_params(pipeline_file: Path) -> dict:
    """The params compiled into pipeline.yaml (its `params_json` parameter's default)."""
    if not pipeline_file.is_file():
        raise InputError(f"{pipeline_file}: not found; compile it with `fedbrain pipeline compile`")
    try:
        # The first document is the pipeline's IR (the second, the Kubernetes platform spec).
        declared = next(yaml.safe_load_all(pipeline_file.read_text()))["root"]["inputDefinitions"]["parameters"]
        return json.loads(declared["params_json"]["defaultValue"])
    except (yaml.YAMLError, KeyError, TypeError, StopIteration, json.JSONDecodeError) as exc:
        raise InputError(f"{pipeline_file}: not a fedbrain pipeline (no params_json default: {exc}); "
                         "compile it with `fedbrain pipeline compile`") from exc


def _check_reachable(host: str) -> None:
    url = urlparse(host if "://" in host else f"http://{host}")
    if url.scheme not in ("http", "https") or not url.hostname:
        raise InputError(f"--host {host!r}: expected the Kubeflow Pipelines URL, e.g. http://localhost:8080")
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((url.hostname, port), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as exc:
        raise InputError(f"cannot reach Kubeflow Pipelines at {host} ({url.hostname}:{port}: {exc}); is the "
                         "server up, and the port-forward running (e.g. `kubectl port-forward -n kubeflow "
                         "svc/ml-pipeline-ui 8080:80`)?") from exc
    # Something answers: is it Kubeflow Pipelines? (kfp.Client would retry its health check for 25 s.)
    healthz = f"{url.scheme}://{url.netloc}{url.path.rstrip('/')}/apis/v2beta1/healthz"
    try:
        urllib.request.urlopen(healthz, timeout=CONNECT_TIMEOUT_S).close()
    except urllib.error.HTTPError as exc:
        if exc.code == 404:
            raise InputError(f"{host} answers, but not as Kubeflow Pipelines (GET {healthz}: HTTP 404); "
                             "give the pipelines API's URL (the ml-pipeline-ui service)") from exc
    except OSError as exc:
        raise InputError(f"Kubeflow Pipelines at {host} did not answer its health check ({exc})") from exc


def submit(pipeline_file: Path, host: str, experiment: str, settings: tuple[str, ...] = (),
           data_uri: str | None = None, run_name: str | None = None, namespace: str | None = None) -> str:
    """Submit pipeline.yaml to Kubeflow Pipelines at `host` as a run of `experiment`, with
    `section.key=value` settings laid over the params compiled into it. Returns the run id.

    The variants are tasks of the compiled pipeline: changing `pipeline_variants` or `variants`
    here would not add or remove a task, so it is refused (recompile instead)."""
    params = compiled_params(pipeline_file)
    changed = with_settings(params, settings)
    if any(changed.get(k) != params.get(k) for k in ("pipeline_variants", "variants")):
        raise InputError("the federated variants are compiled into the pipeline's tasks: change them in "
                         "params.yaml and run `fedbrain pipeline compile` instead of setting them at submit")
    arguments = {"params_json": json.dumps(changed)}
    if data_uri:
        arguments["data_uri"] = data_uri
    _check_reachable(host)
    import kfp
    import kfp_server_api
    import urllib3

    try:
        client = kfp.Client(host=host, **({"namespace": namespace} if namespace else {}))
        result = client.create_run_from_pipeline_package(str(pipeline_file), arguments=arguments,
                                                         run_name=run_name, experiment_name=experiment)
    except (kfp_server_api.ApiException, urllib3.exceptions.HTTPError, TimeoutError, OSError) as exc:
        raise InputError(f"Kubeflow Pipelines at {host} refused the run: {exc}") from exc
    print(f"pipeline: submitted {pipeline_file} to {host}, experiment {experiment!r}, run {result.run_id}")
    return result.run_id


__all__ = ["build", "compile_pipeline", "compiled_params", "run", "run_local", "run_locally", "submit"]
