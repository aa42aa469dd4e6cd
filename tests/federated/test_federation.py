"""A real federation on loopback: flower-superlink, one SuperNode per hospital, `flwr run`.

TLS and SuperNode authentication are on (keys made in tmp_path), the ClientApps train a tiny
Keras model on tiny per-hospital data, and the ServerApp logs to an MLflow store in tmp_path.
What costs time here is Flower's: polling intervals of a few seconds per message, a Python +
TensorFlow start per hospital, and in the crash test the SuperLink's heartbeat timeout (about a
minute) before it declares a node dead.
"""

from __future__ import annotations

import ipaddress
import json
import os
import signal
import socket
import ssl
import stat
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import tensorflow as tf
import tomli
from mlflow.tracking import MlflowClient

from fedbrain import tracking
from fedbrain.federated import launcher, processes, task
from fedbrain.federated.certificates import ensure_pki
from fedbrain.federated.launcher import Federation
from fedbrain.federated.server_app import pool_batch_norm_statistics

from federated_data import federated_params, make_federated_data

TESTS_DIR = Path(__file__).resolve().parent
TINY = "tiny_model:build"              # with BatchNormalization: statistics calibrated every round
TINY_PLAIN = "tiny_model:build_plain"  # without: less to compute, for the longer scenarios
TINY_SLOW = "tiny_model:build_slow"    # TINY_PLAIN whose training steps take 1.5 s: killed while it trains


@pytest.fixture(autouse=True)
def _no_outside_mlflow(monkeypatch):
    """Only the params' MLflow store (in tmp_path) counts, whatever the caller's environment says."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)


@pytest.fixture
def tiny_model(monkeypatch):
    """Every process the federation starts can import tests/federated/tiny_model.py."""
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(TESTS_DIR), os.environ.get("PYTHONPATH")])))
    monkeypatch.setenv("TF_NUM_INTRAOP_THREADS", "1")
    monkeypatch.setenv("TF_NUM_INTEROP_THREADS", "1")
    return TINY


def tiny_params(tmp_path: Path, rounds: int, model: str = TINY) -> dict:
    params = federated_params(tmp_path, rounds=rounds)
    params["train"]["classifier"]["model"] = model
    return params


def federation_processes(root: Path) -> list[psutil.Process]:
    """Live processes whose Flower home lies under `root`: everything a federation there started."""
    found = []
    for proc in psutil.process_iter():
        try:
            if proc.environ().get("FLWR_HOME", "").startswith(str(root)) and proc.status() != psutil.STATUS_ZOMBIE:
                found.append(proc)
        except psutil.Error:  # gone, a zombie, or not ours to read
            pass
    return found


def commands(root: Path) -> list[str]:
    """The program and first three arguments of each of those processes (skipping any that just ended):
    enough to name `python -m fedbrain.federated.lean flower-superlink`."""
    found = []
    for proc in federation_processes(root):
        try:
            found.append(" ".join(proc.cmdline()[:4]))
        except psutil.Error:
            pass
    return found


def listening_addresses(root: Path) -> set[tuple[str, int]]:
    """(host, port) of every listening TCP socket of those processes."""
    found = set()
    for proc in federation_processes(root):
        try:
            found |= {(c.laddr.ip, c.laddr.port) for c in proc.net_connections(kind="tcp")
                      if c.status == psutil.CONN_LISTEN}
        except psutil.Error:
            pass
    return found


def is_loopback(host: str) -> bool:
    """127.0.0.1, also as gRPC's IPv6 socket shows it (::ffff:127.0.0.1); not 0.0.0.0 or ::."""
    address = ipaddress.ip_address(host)
    return (getattr(address, "ipv4_mapped", None) or address).is_loopback


def tls_handshake(address: str, ca: Path | None) -> str:
    """'ok', or the verification error, of a TLS handshake as a gRPC client makes it."""
    host, port = address.rsplit(":", 1)
    context = ssl.create_default_context(cafile=None if ca is None else str(ca))
    context.set_alpn_protocols(["h2"])
    try:
        with socket.create_connection((host, int(port)), timeout=10) as sock:
            with context.wrap_socket(sock, server_hostname=host):
                return "ok"
    except ssl.SSLCertVerificationError as exc:
        return exc.reason


def wait_until(condition, timeout: float, what: str, poll: float = 0.5):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := condition():
            return value
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def maps_tensorflow(pid: int) -> bool:
    return any("tensorflow" in m.path for m in psutil.Process(pid).memory_maps())


def trained(record: dict) -> set[str]:
    """Hospitals whose update was averaged into this round's global model."""
    return {k for k, v in record["hospitals"].items() if "train_time_s" in v}


def test_two_rounds_three_hospitals_tls_auth_tracked_and_cleaned_up(tmp_path, tiny_model):
    processed, partition = make_federated_data(tmp_path / "data", hospitals=3)
    params = tiny_params(tmp_path, rounds=2)
    out = tmp_path / "models" / "federated" / "fedavg"
    lines, during, listening = [], [], set()

    def echo(line: str) -> None:
        lines.append(line)
        if "round 1 done" in line and not during:
            during.extend(commands(tmp_path))
            listening.update(listening_addresses(tmp_path))

    history = launcher.run(params, processed, partition, out, echo=echo)

    # Nothing the launcher started outlives it (and the scan did see them while they ran).
    assert any("flower-superlink" in c for c in during), during
    assert sum("fedbrain.federated.supernode" in c for c in during) == 3, during
    assert any("flwr-serverapp" in c for c in during), during
    # Each hospital's ClientApp runs in one long-lived process (TensorFlow imported once), not
    # in a new flwr-clientapp process per message.
    assert sum("fedbrain.federated.clientapp_runtime" in c for c in during) == 3, during
    assert not any("flwr-clientapp" in c for c in during), during
    assert federation_processes(tmp_path) == []
    logs = tmp_path / ".fedbrain" / "federation" / "fedavg" / "logs"
    for k in range(3):
        # One message per round (train, which also calibrates the previous average and evaluates
        # the model before it), then the last average's calibration and the last model's evaluation
        # (from the weights kept: a failed one would add a 5th, an evaluate message with them),
        # all in that one process.
        assert (logs / f"clientapp_hospital_{k}.log").read_text().count("Pull `ClientAppInputs`") == 4
    # Every API of the federation listens on loopback only.
    assert listening and all(is_loopback(host) for host, _ in listening), listening

    # Secure by default: the CA, the SuperLink certificate and one key pair per hospital.
    pki = tmp_path / ".fedbrain" / "pki"
    for private in [pki / "ca.key", pki / "superlink.key", *(pki / "supernodes" / f"hospital_{k}" for k in range(3))]:
        assert stat.S_IMODE(private.stat().st_mode) == 0o600, private
    superlink_log = (logs / "superlink.log").read_text()
    assert superlink_log.count("Activated node_id") == 3
    assert launcher.INSECURE_WARNING not in lines

    # Two rounds: a global model per round, the final model and its per-round history.
    assert sorted(p.name for p in (out / "checkpoints" / "classifier").glob("round_*.keras")) == \
        ["round_1.keras", "round_2.keras"]
    assert (out / "classifier.keras").is_file()
    assert len(history["classifier"]["val_accuracy"]) == 2
    card = json.loads((out / "classifier.json").read_text())
    assert card["training"] == "federated" and card["failures"] == []
    for record in card["round_records"]:
        assert trained(record) == {"0", "1", "2"}
        assert all(h["examples"] == 12 and h["val_examples"] == 4 and h["calibration_time_s"] > 0
                   for h in record["hospitals"].values())
        assert record["bytes_up"] > 0 and record["bytes_down"] > 0
        assert record["wall_time_s"] >= record["train_phase_s"] + record["calibration_phase_s"]
        assert record["train_phase_s"] >= max(h["train_time_s"] for h in record["hospitals"].values()) > 0
        # bench/round_cost.py's parts of a hospital's handling add up to it: nothing unaccounted.
        for hospital in record["hospitals"].values():
            parts = sum(v for key, v in hospital.items() if key.startswith("phase_") and key != "phase_handler_s")
            assert abs(parts - hospital["phase_handler_s"]) <= 0.05 * hospital["phase_handler_s"], hospital
            assert hospital["phase_local_validation_s"] > 0 and "phase_fit_validation_s" not in hospital
    # Round 1's message has no earlier model to evaluate; round 2's and the final ones do.
    assert [all(h.get("evaluation_time_s", 0) > 0 for h in r["hospitals"].values()) for r in card["round_records"]] \
        == [False, True]

    # The global model's BatchNormalization statistics are the hospitals' pooled ones, measured
    # under its own weights (not FedAvg's average of each hospital's moving statistics).
    model = tf.keras.models.load_model(out / "classifier.keras", compile=False)
    (layer,) = task.batch_norm_layers(model)
    stored = layer.moving_mean.numpy(), layer.moving_variance.numpy()
    settings = task.RunSettings.from_run_config(tomli.loads(
        (tmp_path / ".fedbrain" / "federation" / "fedavg" / "run_config.toml").read_text()))
    measured = [(n, stats) for stats, n, _ in
                (task.batch_norm_statistics(model, settings, k) for k in range(3))]
    pooled = pool_batch_norm_statistics(measured)
    assert stored[0] == pytest.approx(pooled[0], rel=1e-3, abs=1e-5)
    assert stored[1] == pytest.approx(pooled[1], rel=1e-3, abs=1e-5)

    # Round 1's global model was evaluated in round 2's message, and round 2's (the last) in the
    # final evaluation message, each from the weights every hospital kept and the statistics sent
    # then: the same figures as the saved models give.
    for r in (1, 2):
        saved = task.build(settings)
        saved.set_weights(tf.keras.models.load_model(out / "checkpoints" / "classifier" / f"round_{r}.keras",
                                                     compile=False).get_weights())
        scores = [task.evaluate_locally(saved, settings, k) for k in range(3)]
        expected = sum(n * s["loss"] for s, n in scores) / sum(n for _, n in scores)
        assert history["classifier"]["val_loss"][r - 1] == pytest.approx(expected, rel=1e-5)
    # The last model's temperature, fitted by the server from the hospitals' validation NLL per
    # candidate temperature (each hospital sent its own; nobody held the pooled split): the one the
    # pooled validation split gives.
    from fedbrain.reliability import choose_temperature

    grids = [task.evaluate_locally(saved, settings, k, temperatures=True) for k in range(3)]
    pooled_nll = sum(n * np.asarray(s[task.TEMPERATURE_NLL]) for s, n in grids)
    assert card["temperature"] == pytest.approx(choose_temperature(pooled_nll))
    assert card["temperature_fitted_on"].startswith("validation split (12 images at 3 hospitals")

    # One MLflow run with the centralized run's metric names, step = round.
    client = MlflowClient(tracking_uri=params["mlflow"]["tracking_uri"])
    experiment = client.get_experiment_by_name("fedbrain-test")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.data.tags["training"] == "federated" and run.data.tags["secure"] == "true"
    for name in ("val_accuracy", "val_loss", "train_loss", "bytes_up", "bytes_down", "round_time_s",
                 "hospital_0/examples", "hospital_2/train_time_s", "hospital_1/val_accuracy"):
        steps = sorted(m.step for m in client.get_metric_history(run.info.run_id, name))
        assert steps == [1, 2], (name, steps)
    val = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "val_accuracy")}
    assert val == {1: pytest.approx(history["classifier"]["val_accuracy"][0]),
                   2: pytest.approx(history["classifier"]["val_accuracy"][1])}
    assert run.data.metrics["failures"] == 0
    assert run.data.metrics["temperature"] == pytest.approx(card["temperature"])


def test_unregistered_supernode_is_refused_and_one_without_the_ca_cannot_connect(tmp_path):
    pki = ensure_pki(tmp_path / "pki")
    with Federation(tmp_path / "run", pki) as federation:
        federation.start_superlink()
        federation.start_supernode(0)                                # registered, with the CA
        rogue = federation.start_supernode(1, name="rogue", register=False)
        no_ca = federation.start_supernode(2, name="no_ca", ca_cert=None)  # registered, no CA

        online = wait_until(lambda: [n for n in federation.nodes() if n["status"] == "online"],
                            timeout=60, what="the registered SuperNode to come online")
        # The SuperLink admits no key it does not know: the rogue SuperNode is turned away.
        wait_until(lambda: rogue.proc.poll() is not None, timeout=30, what="the rogue SuperNode to give up")
        assert rogue.proc.returncode != 0
        assert "No SuperNode found with the given public key" in rogue.log_path.read_text()
        assert "Activation failed" in federation.superlink.log_path.read_text()
        # Without the CA certificate the SuperLink's certificate cannot be verified: a TLS client
        # trusting only the system's roots is refused, one trusting our CA gets through.
        assert tls_handshake(federation.fleet_address, ca=None) == "CERTIFICATE_VERIFY_FAILED"
        assert tls_handshake(federation.fleet_address, ca=pki.ca_cert) == "ok"
        # So the SuperNode without it keeps retrying and never comes online.
        wait_until(lambda: no_ca.log_path.read_text().count("Connection attempt failed") >= 3, timeout=30,
                   what="the SuperNode without the CA to fail connecting")
        nodes = federation.nodes()
        assert no_ca.proc.poll() is None
        assert len(online) == 1 and sorted(n["status"] for n in nodes) == ["online", "registered"]
        # Flower's own processes never load TensorFlow (lean.py); the hospitals' ClientApps do.
        flower = {proc.pid: proc.cmdline() for proc in map(psutil.Process, federation.pids())
                  if proc.pid != rogue.proc.pid and proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE}
        flower = {pid: cmd for pid, cmd in flower.items() if "fedbrain.federated.clientapp_runtime" not in cmd}
        commands = {next(a for a in cmd if "flower-" in a or "supernode" in a) for cmd in flower.values()}
        assert {"flower-superlink", "flower-superexec", "fedbrain.federated.supernode"} <= commands, commands
        assert not [cmd for pid, cmd in flower.items() if maps_tensorflow(pid)], flower
        assert maps_tensorflow(federation.clientapps["hospital_0"].proc.pid)
    assert federation_processes(tmp_path) == []


def test_supernode_whose_port_was_taken_meanwhile_starts_again_on_another(tmp_path, monkeypatch):
    """The ClientAppIo port chosen for hospital 0 is taken by another program before its SuperNode
    binds it: that SuperNode exits, the launcher starts it again on a new port, and the run's
    federation has every hospital (not a connection to the other program taken for the SuperNode)."""
    lines = []
    with socket.socket() as other, Federation(tmp_path / "run", ensure_pki(tmp_path / "pki"),
                                              echo=lines.append) as federation:
        other.bind((processes.LOOPBACK, 0))
        other.listen()
        taken = other.getsockname()[1]
        federation.start_superlink()
        ports = iter([taken])
        real_free_port = launcher.free_port
        monkeypatch.setattr(launcher, "free_port", lambda given: next(ports, None) or real_free_port(given))
        federation.start_supernodes([0, 1])
        assert any("hospital_0's ClientAppIo port was taken meanwhile" in line for line in lines), lines
        for name in ("hospital_0", "hospital_1"):
            started = federation.supernodes[name]
            assert started.appio_port != taken and started.proc.poll() is None
            assert processes.listens(started.proc.pid, started.appio_port)
        wait_until(lambda: sum(n["status"] == "online" for n in federation.nodes()) == 2, timeout=60,
                   what="both SuperNodes to come online")
    assert federation_processes(tmp_path) == []


@pytest.mark.parametrize("crash", ["supernode", "clientapp"])
def test_crashed_supernode_does_not_stop_the_run_and_a_late_one_joins(tmp_path, tiny_model, crash, monkeypatch):
    """Kill one of 3 SuperNodes while it trains in round 2 of 4 (or only its ClientApp process:
    the launcher then stops its SuperNode); start a 4th during round 2. Hospital 1's ClientApp is held
    inside its first training step of round 2 (tiny_model's barrier), so the kill lands while it trains,
    however loaded the machine."""
    import math

    from tiny_model import HOLD_DIR

    holds = tmp_path / "holds"
    holds.mkdir()
    monkeypatch.setenv(HOLD_DIR, str(holds))
    processed, partition = make_federated_data(tmp_path / "data", hospitals=4)
    out = tmp_path / "models" / "federated" / "fedavg"
    params = tracking.absolute_params(tiny_params(tmp_path, rounds=4, model=TINY_SLOW))
    settings, roles, _ = launcher.prepare(params, processed, partition, out, resume=False)
    config = launcher.run_config(settings, params, "classifier", processed, partition, out, resume=False,
                                 secure=True)
    # Round 1's training steps: 12 images per hospital in batches of batch_size, local_epochs times.
    round_1_steps = math.ceil(12 / params["train"]["classifier"]["batch_size"]) * settings.local_epochs
    lines = []
    with Federation(tmp_path / "run", ensure_pki(tmp_path / "pki"), echo=lines.append) as federation:
        federation.start_superlink()
        federation.start_supernodes([0, 1, 2])
        pid = federation.clientapps["hospital_1"].proc.pid
        (holds / f"{pid}.hold").write_text(str(round_1_steps))
        handle = federation.submit(config)
        crashing = federation.supernodes["hospital_1"]
        wait_until(lambda: (holds / f"{pid}.holding").is_file(), timeout=240,
                   what="hospital 1 to train in round 2")
        assert crashing.log_path.read_text().count("Received: train message") == 2
        if crash == "supernode":
            federation.kill_supernode("hospital_1")   # SIGKILL: a crash, no goodbye to the SuperLink
        else:
            federation.clientapps["hospital_1"].proc.kill()
        federation.start_supernode(3)             # registers its key and joins mid-run
        status = handle.wait()
    assert status == "finished:completed"
    stopped = [line for line in lines if "hospital_1's ClientApp process exited" in line]
    assert len(stopped) == (crash == "clientapp"), lines
    assert federation_processes(tmp_path) == []

    card = json.loads((out / "classifier.json").read_text())
    rounds = card["round_records"]
    assert [r["round"] for r in rounds] == [1, 2, 3, 4]
    assert trained(rounds[0]) == {"0", "1", "2"}
    # Round 2 went on with the two that were left; the crash is on record.
    assert trained(rounds[1]) == {"0", "2"}
    assert [(f["round"], f["hospital"], f["phase"]) for f in card["failures"]] == [(2, 1, "train")]
    # The late SuperNode takes part from the next round on; the crashed one is gone.
    assert trained(rounds[2]) == trained(rounds[3]) == {"0", "2", "3"}
    assert rounds[3]["hospitals"]["3"]["examples"] == 12

    client = MlflowClient(tracking_uri=params["mlflow"]["tracking_uri"])
    (run,) = client.search_runs([client.get_experiment_by_name("fedbrain-test").experiment_id])
    failed = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "nodes_failed")}
    assert failed == {1: 0, 2: 1, 3: 0, 4: 0}
    assert run.data.tags["failures"] == "1"


def test_interrupted_launcher_stops_every_process_and_resume_continues(tmp_path, tiny_model):
    """SIGTERM (what `dvc repro` gets on Ctrl-C) once round 1 of 3 is saved: run() stops every
    process and re-raises; `resume=True` then runs rounds 2 and 3 only, into the same MLflow run.
    (Usually the stop comes before round 2 is saved; under load it may come after.)"""
    processed, partition = make_federated_data(tmp_path / "data", hospitals=2)
    params = tiny_params(tmp_path, rounds=3, model=TINY_PLAIN)
    out = tmp_path / "models" / "fedavg"
    seen, fired = [], threading.Event()

    def interrupt_after_round_1(line: str) -> None:
        if "round 1 done" in line and not fired.is_set():
            fired.set()
            seen.extend(commands(tmp_path))
            os.kill(os.getpid(), signal.SIGTERM)

    with pytest.raises(KeyboardInterrupt):
        # The signal lands in the main thread while run() waits for the run to end.
        launcher.run(params, processed, partition, out, echo=interrupt_after_round_1)
    assert any("flwr-serverapp" in c for c in seen) and sum("fedbrain.federated.supernode" in c for c in seen) == 2, seen
    assert federation_processes(tmp_path) == []
    saved = json.loads((out / "checkpoints" / "classifier" / "state.json").read_text())
    # Round 1's checkpoint at least; on a loaded machine round 2 may be saved before the signal lands.
    done = saved["round"]
    assert done in (1, 2) and not (out / "classifier.keras").exists()

    lines = []
    history = launcher.run(params, processed, partition, out, resume=True, echo=lines.append)
    assert any(f"resuming classifier after round {done} of 3" in line for line in lines)
    assert not any(f"round {r}/3" in line for line in lines for r in range(1, done + 1))
    assert federation_processes(tmp_path) == []
    card = json.loads((out / "classifier.json").read_text())
    assert [r["round"] for r in card["round_records"]] == [1, 2, 3]
    assert card["round_records"][0]["wall_time_s"] == saved["rounds"][0]["wall_time_s"]
    assert len(history["classifier"]["val_accuracy"]) == 3
    client = MlflowClient(tracking_uri=params["mlflow"]["tracking_uri"])
    (run,) = client.search_runs([client.get_experiment_by_name("fedbrain-test").experiment_id])
    assert run.info.run_id == saved["run_id"] == card["run_id"] and run.info.status == "FINISHED"
    assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "val_accuracy")) == [1, 2, 3]


def test_insecure_flag_warns_and_a_segmenter_trains_federated(tmp_path, tiny_model):
    """--insecure: a warning, no keys made, TLS off; and the U-Net's task (masks, Dice) runs federated."""
    processed, partition = make_federated_data(tmp_path / "data", hospitals=2, masks=True)
    params = federated_params(tmp_path, rounds=1, roles="segmenter")
    params["train"]["segmenter"] = {**params["train"]["classifier"], "model": "tiny_model:build_segmenter"}
    out = tmp_path / "models" / "federated" / "fedavg"
    lines = []

    history = launcher.run(params, processed, partition, out, insecure=True, echo=lines.append)

    assert launcher.INSECURE_WARNING in lines
    assert not (tmp_path / ".fedbrain" / "pki").exists()
    assert federation_processes(tmp_path) == []
    card = json.loads((out / "segmenter.json").read_text())
    assert card["training"] == "federated" and card["task"] == "segmentation"
    assert len(history["segmenter"]["val_dice"]) == 1 and 0.0 <= history["segmenter"]["val_dice"][0] <= 1.0
    assert {"0", "1"} == trained(card["round_records"][0])
    model = tf.keras.models.load_model(out / "segmenter.keras", compile=False)
    assert model.output_shape == (None, 16, 16, 1)
    client = MlflowClient(tracking_uri=params["mlflow"]["tracking_uri"])
    (run,) = client.search_runs([client.get_experiment_by_name("fedbrain-test").experiment_id])
    assert run.data.tags["secure"] == "false" and run.data.tags["task"] == "segmentation"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val_dice")] == [1]


def test_a_hospital_whose_update_is_nan_is_rejected_and_the_rounds_go_on_without_it(tmp_path, tiny_model):
    """Hospital 2's training images are NaN (a corrupt export), so every update it sends has NaN
    weights: the server rejects it with the reason each round, averages hospitals 0 and 1, and the
    rejection is on the console, in the card, in MLflow and in the audit log (update_checks.py)."""
    import numpy as np
    import pandas as pd

    processed, partition = make_federated_data(tmp_path / "data", hospitals=3)
    images = np.load(processed / "images.npy")
    rows = pd.read_parquet(partition / "hospital_2" / "index.parquet").query("split == 'train'")["row"]
    images[rows.to_numpy()] = np.nan  # its validation images stay sound: it still evaluates the global model
    np.save(processed / "images.npy", images)
    params = tiny_params(tmp_path, rounds=2, model=TINY_PLAIN)
    out = tmp_path / "models" / "federated" / "fedavg"
    lines = []

    launcher.run(params, processed, partition, out, echo=lines.append)

    card = json.loads((out / "classifier.json").read_text())
    assert [r["round"] for r in card["round_records"]] == [1, 2] and "stopped_by_validation" not in card
    assert card["failures"] == []
    for record in card["round_records"]:
        (rejection,) = record["rejections"]
        assert (rejection["hospital"], rejection["round"], rejection["what"]) == (2, record["round"], "update")
        assert "NaN or infinite value(s)" in rejection["reason"]
        # The round went on with the other two; hospital 2's training figures are not on record.
        # (Hospital 2 trained, so its time is on record; its examples and training metrics are not.)
        averaged = {k for k, h in record["hospitals"].items() if "examples" in h}
        assert averaged == {"0", "1"} and record["hospitals"]["2"]["rejected"] == 1.0
        assert not any(key.startswith("train_") and key != "train_time_s" for key in record["hospitals"]["2"])
        assert np.isfinite(record["metrics"]["train_loss"])
    assert [(r["round"], r["hospital"]) for r in card["rejections"]] == [(1, 2), (2, 2)]
    for r in (1, 2):
        assert any(f"round {r}: hospital 2 " in line and "update rejected: update has" in line for line in lines), lines
    model = tf.keras.models.load_model(out / "classifier.keras", compile=False)
    assert all(np.isfinite(w).all() for w in model.get_weights())

    client = MlflowClient(tracking_uri=params["mlflow"]["tracking_uri"])
    (run,) = client.search_runs([client.get_experiment_by_name("fedbrain-test").experiment_id])
    for r in (1, 2):
        assert "NaN or infinite" in run.data.tags[f"rejected/round_{r}/hospital_2"]
    assert {m.step: m.value for m in client.get_metric_history(run.info.run_id, "hospital_2/rejected")} == \
        {1: 1.0, 2: 1.0}
    assert {m.step: m.value for m in client.get_metric_history(run.info.run_id, "nodes_rejected")} == {1: 1, 2: 1}
    assert run.data.params["federated.update_norm_factor"] == "10.0"  # the default, logged with the run
    # Hospital 2's val_* of the global models count: its validation images are sound.
    assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "hospital_2/val_accuracy")) == [1, 2]

    entries = [json.loads(line) for line in (out / "audit" / "classifier.jsonl").read_text().splitlines()]
    rejected = [e for e in entries if e["status"] == "rejected"]
    assert [(e["round"], e["hospital"], e["phase"]) for e in rejected] == [(1, 2, "train"), (2, 2, "train")]
    assert all(e["reason"].startswith("update: update has") for e in rejected)


def test_a_round_with_too_few_valid_updates_stops_the_run_and_keeps_the_last_good_model(tmp_path, tiny_model):
    """min_valid_updates=3 and hospital 2's update is NaN: round 1 has two valid updates, so the run
    stops before averaging anything, saves the last good global model (here the initial one) as a
    usable model, and says why in the card, MLflow and the log; the audit log stays verifiable."""
    import numpy as np
    import pandas as pd

    from fedbrain.secure.audit import verify

    processed, partition = make_federated_data(tmp_path / "data", hospitals=3)
    images = np.load(processed / "images.npy")
    rows = pd.read_parquet(partition / "hospital_2" / "index.parquet").query("split == 'train'")["row"]
    images[rows.to_numpy()] = np.nan
    np.save(processed / "images.npy", images)
    params = tiny_params(tmp_path, rounds=2, model=TINY_PLAIN)
    params["federated"]["min_valid_updates"] = 3
    out = tmp_path / "models" / "federated" / "fedavg"
    lines = []

    launcher.run(params, processed, partition, out, echo=lines.append)

    card = json.loads((out / "classifier.json").read_text())
    stop = card["stopped_by_validation"]
    assert stop["round"] == 1 and "2 valid update(s), fewer than federated.min_valid_updates=3" in stop["reason"]
    assert [(r["hospital"], r["what"]) for r in stop["rejections"]] == [(2, "update")]
    assert card["rounds"] == 0 and card["rounds_planned"] == 2
    assert any("too few valid updates: stopping after round 0 of 2" in line for line in lines), lines
    model = tf.keras.models.load_model(out / "classifier.keras", compile=False)
    assert all(np.isfinite(w).all() for w in model.get_weights())
    client = MlflowClient(tracking_uri=params["mlflow"]["tracking_uri"])
    (run,) = client.search_runs([client.get_experiment_by_name("fedbrain-test").experiment_id])
    assert run.info.status == "FINISHED" and "fewer than" in run.data.tags["stopped_by_validation"]
    assert verify(out / "audit" / "classifier.jsonl").ok
