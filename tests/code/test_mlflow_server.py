"""mlflow/serve.sh really serves: started on a free port with its store in a temporary folder, it answers
/health, records a run's metric and artifact sent through the MLflow client (the artifact through the
server's proxy, into the store's folder), gives them back, and stops with its process group."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request

import pytest

from helpers import PROJECT

SERVE = PROJECT / "mlflow" / "serve.sh"
START_TIMEOUT_S = 90  # a fresh store's migrations and the server's imports: 20-45 s on 2 busy cores


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_healthy(url: str, server: subprocess.Popen, log) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if server.poll() is not None:
            pytest.fail(f"mlflow/serve.sh exited with {server.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=5) as response:
                if response.status == 200 and response.read().strip() == b"OK":
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(1)
    pytest.fail(f"no OK from {url}/health in {START_TIMEOUT_S} s:\n{log.read_text()[-3000:]}")


def stop(server: subprocess.Popen) -> None:
    """The whole process group: `mlflow server` runs its workers as children."""
    for sig, grace in ((signal.SIGTERM, 20), (signal.SIGKILL, 10)):
        try:
            os.killpg(server.pid, sig)
        except ProcessLookupError:
            return
        try:
            server.wait(timeout=grace)
            time.sleep(0.5)  # children of the group may outlive their parent by a moment
            os.killpg(server.pid, 0)  # raises when nothing of the group is left
        except subprocess.TimeoutExpired:
            continue
        except ProcessLookupError:
            return


@pytest.mark.slow
def test_serve_sh_records_a_run_with_a_metric_and_an_artifact(tmp_path, monkeypatch):
    store = tmp_path / "store"
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "MLFLOW_WORK_DIR": str(store), "MLFLOW_PORT": str(port)}
    env.pop("MLFLOW_TRACKING_URI", None)
    log = tmp_path / "server.log"
    with open(log, "w") as out:
        server = subprocess.Popen(["bash", str(SERVE)], cwd=tmp_path, env=env, stdout=out, stderr=subprocess.STDOUT,
                                  start_new_session=True)
    try:
        from mlflow.tracking import MlflowClient  # imported while the server starts

        wait_healthy(url, server, log)
        monkeypatch.setenv("MLFLOW_TRACKING_URI", url)  # what a run sets to log here
        client = MlflowClient(tracking_uri=url)
        experiment = client.create_experiment("serve-sh-test")
        assert client.get_experiment(experiment).artifact_location.startswith("mlflow-artifacts:")  # proxied
        run = client.create_run(experiment, tags={"training": "centralized"})
        run_id = run.info.run_id
        for step, value in enumerate([0.5, 0.75]):
            client.log_metric(run_id, "val_accuracy", value, step=step)
        note = tmp_path / "comparison.md"
        note.write_text("| model | accuracy |\n| cnn | 0.75 |\n")
        client.log_artifact(run_id, str(note))
        client.set_terminated(run_id)

        again = client.get_run(run_id)
        assert again.data.metrics == {"val_accuracy": 0.75}
        assert [(m.step, m.value) for m in client.get_metric_history(run_id, "val_accuracy")] == [(0, 0.5), (1, 0.75)]
        assert again.data.tags["training"] == "centralized"
        assert [a.path for a in client.list_artifacts(run_id)] == ["comparison.md"]
        back = client.download_artifacts(run_id, "comparison.md", str(tmp_path / "back"))
        assert open(back).read() == note.read_text()
        # the store is where serve.sh says: SQLite and the proxied artifacts under MLFLOW_WORK_DIR
        assert (store / "mlflow.db").is_file()
        (stored,) = (store / "artifacts").rglob("comparison.md")
        assert run_id in stored.parts

        # fedbrain's own experiment, made through the server with params.yaml's local artifact_location
        # set: it must get the server's proxied location, not a folder on whichever disk made it.
        from fedbrain import tracking
        from fedbrain.config import load_params

        params = load_params(PROJECT / "params.yaml")
        assert params["mlflow"]["artifact_location"]  # the local store's folder is set...
        monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "fedbrain-through-server")
        assert tracking.configure(params) == url
        made = client.get_experiment_by_name("fedbrain-through-server")
        assert made.artifact_location.startswith("mlflow-artifacts:")  # ...and not used against a server
    finally:
        stop(server)
    assert server.poll() is not None
