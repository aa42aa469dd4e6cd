"""`fedbrain pipeline submit`: what it sends to Kubeflow Pipelines, and how it fails.

No Kubeflow server can run here. The run it submits is checked against a stand-in of the KFP v2beta1
REST API on loopback (the cluster's side only: the request bodies are kfp.Client's own, built from
the committed pipeline.yaml); an unreachable host and a server that is not KFP must fail in seconds.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import yaml

from helpers import PROJECT

from fedbrain.config import load_params, with_settings
from fedbrain.errors import InputError

PIPELINE = PROJECT / "pipeline.yaml"


class KfpStandIn(BaseHTTPRequestHandler):
    """The four calls kfp.Client makes to file a run: health, find experiment, create it, create run."""
    received: list[tuple[str, str, dict]] = []

    def _reply(self, body: dict, code: int = 200):
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        self.received.append(("GET", self.path, {}))
        if self.path.startswith("/apis/v2beta1/healthz"):
            return self._reply({"multi_user": False})
        if self.path.startswith("/apis/v2beta1/experiments"):
            return self._reply({"experiments": [], "total_size": 0})
        self._reply({"error": "not found"}, 404)

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])) or b"{}")
        self.received.append(("POST", self.path, body))
        if self.path == "/apis/v2beta1/experiments":
            return self._reply({"experiment_id": "exp-1", "display_name": body["display_name"]})
        if self.path == "/apis/v2beta1/runs":
            return self._reply({"run_id": "run-1", "display_name": body.get("display_name")})
        self._reply({"error": "not found"}, 404)

    def log_message(self, *args):
        pass


class NotKfp(KfpStandIn):
    def do_GET(self):
        self._reply({"error": "no such page"}, 404)


def serve(handler):
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def cli(*args, timeout=60):
    return subprocess.run([sys.executable, "-m", "fedbrain.cli", "pipeline", "submit", *args], cwd=PROJECT,
                          capture_output=True, text=True, timeout=timeout)


def test_submit_files_a_run_of_the_committed_pipeline_with_the_settings():
    KfpStandIn.received = []
    server = serve(KfpStandIn)
    try:
        result = cli("--host", f"http://127.0.0.1:{server.server_port}", "--experiment", "brain-mri",
                     "--data-uri", "minio://mri/brain-tumor-mri", "federated.rounds=3", "privacy.mode=example")
    finally:
        server.shutdown()
    assert result.returncode == 0, result.stderr
    assert "run run-1" in result.stdout
    posts = {path: body for method, path, body in KfpStandIn.received if method == "POST"}
    assert posts["/apis/v2beta1/experiments"]["display_name"] == "brain-mri"
    run = posts["/apis/v2beta1/runs"]
    assert run["experiment_id"] == "exp-1"
    # the committed pipeline as it is: the IR and the Kubernetes platform spec (the pod label)
    ir, platform = yaml.safe_load_all(PIPELINE.read_text())
    assert run["pipeline_spec"] == {"pipeline_spec": ir, "platform_spec": platform}
    assert ir["pipelineInfo"]["name"] == "fedbrain"
    parameters = run["runtime_config"]["parameters"]
    assert parameters["data_uri"] == "minio://mri/brain-tumor-mri"
    sent = json.loads(parameters["params_json"])
    expected = load_params(PROJECT / "params.yaml")
    expected["federated"]["rounds"] = 3
    expected["privacy"]["mode"] = "example"
    assert sent == expected


def test_unreachable_host_fails_within_seconds_with_a_clear_message():
    start = time.perf_counter()
    result = cli("--host", "http://127.0.0.1:9", "--experiment", "x")  # nothing listens on port 9
    elapsed = time.perf_counter() - start
    assert result.returncode == 1
    assert result.stderr.startswith("error: cannot reach Kubeflow Pipelines at http://127.0.0.1:9")
    assert "port-forward" in result.stderr and "Traceback" not in result.stderr
    assert elapsed < 15  # the interpreter's start included; the connect itself is capped at 5 s


def test_a_server_that_is_not_kubeflow_is_named_as_such():
    server = serve(NotKfp)
    try:
        start = time.perf_counter()
        result = cli("--host", f"http://127.0.0.1:{server.server_port}", "--experiment", "x")
        elapsed = time.perf_counter() - start
    finally:
        server.shutdown()
    assert result.returncode == 1 and "not as Kubeflow Pipelines" in result.stderr, result.stderr
    assert elapsed < 15


@pytest.mark.parametrize("setting, message", [
    ("federated.roundz=3", "no 'federated.roundz'; known here: "),
    ("federate.rounds=3", "no section 'federate'"),
    ("rounds", "expected section.key=value"),
    ("pipeline_variants=[fedavg]", "compiled into the pipeline's tasks"),
])
def test_bad_settings_are_refused_before_anything_is_sent(setting, message):
    result = cli("--host", "http://127.0.0.1:9", "--experiment", "x", setting)
    assert result.returncode == 1 and message in result.stderr, result.stderr


def test_settings_are_typed_and_leave_the_params_unchanged():
    params = load_params(PROJECT / "params.yaml")
    rounds = params["federated"]["rounds"]
    changed = with_settings(params, ["federated.rounds=3", "privacy.target_epsilon=4.5",
                                     "privacy.delta=", "federated.roles=[classifier]"])
    assert changed["federated"]["rounds"] == 3 and changed["privacy"]["target_epsilon"] == 4.5
    assert changed["privacy"]["delta"] is None and changed["federated"]["roles"] == ["classifier"]
    assert params["federated"]["rounds"] == rounds  # a copy
    with pytest.raises(InputError, match="not valid YAML"):
        with_settings(params, ["federated.rounds=[3"])
