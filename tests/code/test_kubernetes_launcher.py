"""federated.launcher: kubernetes (fedbrain/federated/pods.py and cluster.py), offline.

The manifests are the real k8s/base: rendered in Python and compared with `kubectl kustomize`; the
request bodies are the `kubernetes` client's own models. The only test double is the cluster: a fake
of the client's AppsV1Api/CoreV1Api/NetworkingV1Api methods the launcher calls (and of the SuperLink's
Control API inside it), which records every call and reports readiness. Nothing here imports Flower or
TensorFlow (launcher.py does), so the seam in launcher.run and cluster.run's glue are not run here.
"""

from __future__ import annotations

import base64
import contextlib
import functools
import io
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import kubernetes.client
import kubernetes_validate
import pytest
import yaml
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from kubernetes.client.exceptions import ApiException

from fedbrain.errors import InputError
from fedbrain.federated import cluster, kube_api, personal
from fedbrain.federated.cluster import ClusterRun
from fedbrain.federated.kube_api import Cluster
from fedbrain.federated.pods import (MANIFESTS, PAILLIER_FILE, PAILLIER_MOUNT, PAILLIER_SECRET, RUN_LABEL,
                                     PodFederation, federation_objects, render)
from fedbrain.secure import paillier
from fedbrain.federated.settings import FederatedSettings, KubernetesSettings
from helpers import PROJECT
from test_k8s import KUBERNETES_VERSION

BASE = PROJECT / "k8s" / "base"
RUN = "fedavg-20260101-000000-abcd"
MODEL = bytes(range(256)) * 40  # 10 kB: the copy takes several pieces
CLASSES = {"classes": ["glioma", "meningioma", "notumor", "pituitary"], "has_masks": False, "channels": 1,
           "size": 128}


def key(doc: dict) -> tuple[str, str]:
    return doc["kind"], doc["metadata"]["name"]


def without_run_label(doc: dict) -> dict:
    doc = json.loads(json.dumps(doc))
    doc["metadata"].get("labels", {}).pop(RUN_LABEL, None)
    if doc["kind"] == "Deployment":
        doc["spec"]["template"]["metadata"]["labels"].pop(RUN_LABEL, None)
    return doc


@functools.cache
def kustomized() -> dict[tuple[str, str], dict]:
    if shutil.which("kubectl") is None:
        pytest.skip("kubectl is not installed")
    result = subprocess.run(["kubectl", "kustomize", str(BASE)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return {key(d): d for d in yaml.safe_load_all(result.stdout) if d}


def base_hospitals() -> int:
    return sum(1 for d in kustomized().values() if d["kind"] == "Deployment" and "fedbrain/hospital" in
               d["metadata"]["labels"])


# --- rendering -----------------------------------------------------------------------------------

def test_shipped_manifests_are_k8s_base():
    """The package carries k8s/base (a link the wheel build follows), so an installed package has it."""
    assert MANIFESTS.resolve() == BASE.resolve()
    package_data = (PROJECT / "pyproject.toml").read_text()
    assert '"manifests/*.yaml"' in package_data


def test_render_for_the_bases_hospitals_is_kubectl_kustomize():
    n = base_hospitals()
    docs = render(n, run_id=RUN)
    assert {key(d): without_run_label(d) for d in docs} == kustomized()


def test_a_run_creates_the_federation_and_labels_it():
    docs = render(base_hospitals(), run_id=RUN)
    created = {key(d) for d in federation_objects(docs)}
    supernodes = {("Deployment", f"supernode-{k}") for k in range(base_hospitals())}
    assert created == {("Deployment", "superlink"), ("Service", "superlink"), *supernodes,
                       ("NetworkPolicy", "superlink-ingress"), ("NetworkPolicy", "supernode-ingress")}
    # the same objects as kustomize's, but for the run label
    assert all(without_run_label(d) == kustomized()[key(d)] for d in docs if key(d) in created)
    for doc in docs:
        labels = doc["metadata"]["labels"]
        assert (labels.get(RUN_LABEL) == RUN) == (key(doc) in created), key(doc)
        if key(doc) in created and doc["kind"] == "Deployment":
            assert doc["spec"]["template"]["metadata"]["labels"][RUN_LABEL] == RUN  # its pods carry it
            assert RUN_LABEL not in doc["spec"]["selector"]["matchLabels"]
    # long-lived: MLflow, the data claims, the namespace and its default-deny policy
    assert ("Deployment", "mlflow") not in created and ("NetworkPolicy", "default-deny-ingress") not in created
    assert not any(kind in ("PersistentVolumeClaim", "Namespace") for kind, _ in created)


@pytest.mark.parametrize("n", [2, 5])
def test_other_hospital_counts_copy_hospital_0(n):
    docs = render(n, run_id=RUN, namespace="fed-test", image="registry.example.org/fedbrain:0.2.0")
    by_key = {key(d): d for d in docs}
    deployments = sorted(name for kind, name in by_key if kind == "Deployment" and name.startswith("supernode-"))
    assert deployments == [f"supernode-{k}" for k in range(n)]
    claims = sorted(name for kind, name in by_key if kind == "PersistentVolumeClaim" and name.startswith("hospital-"))
    assert claims == [f"hospital-{k}-data" for k in range(n)]
    zero = by_key[("Deployment", "supernode-0")]
    for k in range(n):
        doc = by_key[("Deployment", f"supernode-{k}")]
        assert doc["metadata"]["labels"]["fedbrain/hospital"] == str(k)
        assert doc["spec"]["selector"]["matchLabels"]["fedbrain/hospital"] == str(k)
        assert doc["spec"]["template"]["metadata"]["labels"]["fedbrain/hospital"] == str(k)
        pod = doc["spec"]["template"]["spec"]
        (supernode,) = [c for c in pod["containers"] if c["name"] == "supernode"]
        assert f"--node-config=partition-id={k} num-partitions={n}" in supernode["args"]
        volumes = {v["name"]: v for v in pod["volumes"]}
        assert volumes["key"]["secret"]["secretName"] == f"supernode-{k}-key"
        assert volumes["data"]["persistentVolumeClaim"]["claimName"] == f"hospital-{k}-data"
        assert volumes["tls"]["secret"]["secretName"] == "superlink-ca"  # shared, not per hospital
        claim = by_key[("PersistentVolumeClaim", f"hospital-{k}-data")]
        assert claim["metadata"]["labels"]["fedbrain/hospital"] == str(k)
        assert {c["image"] for c in pod["containers"]} == {"registry.example.org/fedbrain:0.2.0"}
        assert doc["metadata"]["namespace"] == "fed-test"
        # nothing else differs from hospital 0's, but for its index
        text = json.dumps(doc)
        for mine, its in [(f"supernode-{k}", "supernode-0"), (f"hospital-{k}-data", "hospital-0-data"),
                          (f"partition-id={k}", "partition-id=0"),
                          (f'"fedbrain/hospital": "{k}"', '"fedbrain/hospital": "0"')]:
            text = text.replace(mine, its)
        assert text == json.dumps(zero)
    assert ("Deployment", f"supernode-{n}") not in by_key
    federation = PodFederation(docs)
    assert sorted(federation.supernodes) == list(range(n))
    assert federation.claims == claims
    assert [federation.key_secret(k) for k in range(n)] == [(f"supernode-{k}-key", "node") for k in range(n)]


def test_request_bodies_are_the_clients_models():
    """What create_namespaced_* is sent deserializes into the client's models and serializes back unchanged
    (a misspelt or misplaced field would be dropped), for the base's hospital count and another."""
    api = kubernetes.client.ApiClient()
    for n, key_file in ((base_hospitals(), None), (5, b'{"format": "not read here"}')):
        for doc in federation_objects(render(n, run_id=RUN, paillier_key=key_file)):
            body = kube_api.to_model(doc)
            assert type(body).__name__ == f"V1{doc['kind']}"
            assert api.sanitize_for_serialization(body) == doc, key(doc)


def test_what_the_run_reads_from_the_manifests():
    federation = PodFederation(render(base_hospitals(), run_id=RUN))
    assert federation.ca_secret == ("superlink-ca", "ca.crt")
    assert federation.server_name == "superlink"
    assert federation.control == ("superlink", 9093)
    assert federation.serverapp == ("serverapp", "/app/state/out")
    assert federation.data_dir == "/app/data"
    assert federation.hospital_out == "/app/out"
    assert federation.hospital_folder(1) == ("clientapp", "/app/out/hospital_1")
    config = federation.run_config({"processed": "/here/processed", "partition": "/here/partition",
                                    "out": "/here/out", "rounds": 3}, CLASSES)
    assert config == {"processed": "/app/data/processed", "partition": "/app/data/partition",
                      "out": "/app/state/out", "hospital-out": "/app/out", "rounds": 3, "classes": json.dumps(CLASSES),
                      "hospital-threads": 0, "paillier-public-key": "", "training-dataset": ""}
    # the app template declares the keys, or Flower would refuse them in the run config
    template = (PROJECT / "src/fedbrain/federated/app/pyproject.toml").read_text()
    assert 'classes = ""' in template and 'training-dataset = ""' in template and 'hospital-out = ""' in template


@pytest.mark.parametrize("n", [3, 5])
def test_each_hospitals_clientapp_saves_its_personalized_models_on_a_writable_volume_of_its_own_pod(n):
    """The run config's `hospital-out` is a writable emptyDir of each SuperNode pod, mounted in its
    ClientApp container (the one that saves); `out` is the SuperLink pod's, which no SuperNode pod has,
    and everything else in a SuperNode pod is read-only."""
    docs = render(n, run_id=RUN, paillier_key=b'{"format": "not read here"}' if n == 5 else None)
    federation = PodFederation(docs)
    config = federation.run_config({"out": "/here/out"}, CLASSES)
    where = config["hospital-out"]
    for k in range(n):
        doc = federation.supernodes[k]
        pod = doc["spec"]["template"]["spec"]
        volumes = {v["name"]: v for v in pod["volumes"]}
        by_container = {name: [m for m in c.get("volumeMounts", []) if m["mountPath"] == where]
                        for name, c in containers(doc).items()}
        assert by_container["supernode"] == []
        (mount,) = by_container["clientapp"]
        assert not mount.get("readOnly") and volumes[mount["name"]] == {"name": mount["name"], "emptyDir": {}}
        assert all(c["securityContext"]["readOnlyRootFilesystem"] for c in containers(doc).values())
        assert pod["securityContext"]["fsGroup"] == pod["securityContext"]["runAsUser"]  # the app's uid writes it
        assert not any(m["mountPath"] == config["out"] or config["out"].startswith(m["mountPath"] + "/")
                       for c in containers(doc).values() for m in c["volumeMounts"])
        assert federation.hospital_folder(k) == ("clientapp", f"{where}/hospital_{k}")
    # still valid Kubernetes objects, as test_k8s checks the base's (strict: unknown fields are errors)
    for doc in docs:
        assert kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True) == KUBERNETES_VERSION, key(doc)


def test_a_kustomization_it_cannot_render_is_refused(tmp_path):
    for path in BASE.glob("*.yaml"):
        shutil.copy(path, tmp_path / path.name)
    kustomization = yaml.safe_load((tmp_path / "kustomization.yaml").read_text())
    (tmp_path / "kustomization.yaml").write_text(yaml.safe_dump({**kustomization, "patches": [{"path": "x.yaml"}]}))
    with pytest.raises(InputError, match="patches"):
        render(3, manifests=tmp_path)
    with pytest.raises(InputError, match="kustomization.yaml: not found"):
        render(3, manifests=tmp_path / "missing")


# --- the cluster: a fake of the client's API objects ---------------------------------------------

KINDS = {"deployment": "Deployment", "service": "Service", "network_policy": "NetworkPolicy",
         "persistent_volume_claim": "PersistentVolumeClaim", "secret": "Secret", "pod": "Pod"}
REAL_APIS = (kubernetes.client.AppsV1Api, kubernetes.client.CoreV1Api, kubernetes.client.NetworkingV1Api)


def node_key() -> bytes:
    return ec.generate_private_key(ec.SECP384R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption())


class FakeExec:
    """What kubernetes.stream returns with _preload_content=False (a finished command)."""

    def __init__(self, stdout: str, stderr: str, code: int):
        self.stdout, self.stderr, self.returncode = stdout, stderr, code

    def run_forever(self, timeout=None):
        pass

    def is_open(self):
        return False

    def read_stdout(self, timeout=None):
        return self.stdout

    def read_stderr(self, timeout=None):
        return self.stderr

    def close(self):
        pass


class FakeKubernetes:
    """AppsV1Api, CoreV1Api and NetworkingV1Api in one object: the methods the launcher calls, over a
    store of models. Deployments become ready after `ready_after` reads (never: `never_ready`); each
    Deployment has one running pod; exec runs the command with this Python on that pod's own files,
    pod_root/<deployment>/ (`pod_dir`)."""

    def __init__(self, pod_root: Path, hospitals: int = 3, missing=(), never_ready=(), fail_delete=(),
                 fail_create=(), ready_after: int = 1):
        self.api_client = SimpleNamespace(configuration=None, request=None)  # what kubernetes.stream swaps
        self.pod_root, self.never_ready, self.ready_after = pod_root, set(never_ready), ready_after
        self.fail_delete, self.fail_create = set(fail_delete), set(fail_create)
        self.objects: dict[tuple[str, str], object] = {}
        self.calls: list[tuple[str, str, dict]] = []  # (method, object name, keyword arguments)
        self.reads: dict[str, int] = {}
        self.keys = {k: node_key() for k in range(hospitals)}
        secrets = {"superlink-ca": {"ca.crt": b"-----BEGIN CERTIFICATE-----\nfake\n"},
                   **{f"supernode-{k}-key": {"node": v} for k, v in self.keys.items()}}
        for name, data in secrets.items():
            if name not in missing:
                self.objects[("Secret", name)] = kubernetes.client.V1Secret(
                    metadata=kubernetes.client.V1ObjectMeta(name=name),
                    data={k: base64.b64encode(v).decode() for k, v in data.items()})
        for k in range(hospitals):
            if f"hospital-{k}-data" not in missing:
                claim = kubernetes.client.V1PersistentVolumeClaim(metadata=kubernetes.client.V1ObjectMeta(
                    name=f"hospital-{k}-data"))
                self.objects[("PersistentVolumeClaim", f"hospital-{k}-data")] = claim

    def __getattr__(self, method: str):
        verb, _, suffix = method.partition("_namespaced_")
        if verb not in ("create", "read", "list", "delete") or suffix not in KINDS:
            raise AttributeError(method)
        return functools.partial(getattr(self, f"_{verb}"), method, KINDS[suffix])

    def pod_dir(self, deployment: str) -> Path:
        return self.pod_root / deployment

    def created_by_run(self) -> set[tuple[str, str]]:
        return {k for k, o in self.objects.items() if (o.metadata.labels or {}).get(RUN_LABEL)}

    def _create(self, method, kind, namespace, body):
        self.calls.append((method, body.metadata.name, {}))
        assert type(body).__name__ == f"V1{kind}", "the body is the client's model"
        if body.metadata.name in self.fail_create:
            raise ApiException(status=500, reason="injected create failure")
        if (kind, body.metadata.name) in self.objects:
            raise ApiException(status=409, reason="AlreadyExists")
        body.metadata.generation = 1
        self.objects[(kind, body.metadata.name)] = body

    def _read(self, method, kind, name, namespace):
        self.calls.append((method, name, {}))
        found = self.objects.get((kind, name))
        if found is None:
            raise ApiException(status=404, reason="NotFound")
        if kind == "Deployment":
            self.reads[name] = self.reads.get(name, 0) + 1
            ready = name not in self.never_ready and self.reads[name] > self.ready_after
            found.status = kubernetes.client.V1DeploymentStatus(observed_generation=1, replicas=1,
                                                                ready_replicas=1 if ready else None)
        return found

    def _pods(self) -> list:
        pods = []
        for (kind, name), deployment in self.objects.items():
            if kind == "Deployment":
                waiting = ({"reason": "ImagePullBackOff", "message": "no such image"} if name in self.never_ready
                           else None)
                pods.append(kube_api.to_model({"apiVersion": "v1", "kind": "Pod", "metadata": {
                    "name": f"{name}-5d8f9-x2x7q", "labels": deployment.spec.template.metadata.labels},
                    "status": {"phase": "Running" if not waiting else "Pending", "containerStatuses": [
                        {"name": c.name, "image": c.image, "imageID": "", "ready": not waiting, "restartCount": 0,
                         "state": {"waiting": waiting} if waiting else {"running": {}}}
                        for c in deployment.spec.template.spec.containers]}}))
        return pods

    def _list(self, method, kind, namespace, label_selector=""):
        self.calls.append((method, "", {"label_selector": label_selector}))
        wanted = dict(pair.split("=", 1) for pair in label_selector.split(",") if pair)
        items = self._pods() if kind == "Pod" else [o for (k, _), o in self.objects.items() if k == kind]
        return SimpleNamespace(items=[o for o in items if wanted.items() <= (o.metadata.labels or {}).items()])

    def _delete(self, method, kind, name, namespace, propagation_policy=None):
        self.calls.append((method, name, {"propagation_policy": propagation_policy}))
        if name in self.fail_delete:
            raise ApiException(status=500, reason="injected delete failure")
        if self.objects.pop((kind, name), None) is None:
            raise ApiException(status=404, reason="NotFound")

    def connect_get_namespaced_pod_exec(self, name, namespace, **kwargs):
        """Runs `python3 -c <script> <args>` here, in this process, with the pod's paths under its pod_dir."""
        self.calls.append(("connect_get_namespaced_pod_exec", name, kwargs))
        command = kwargs["command"]
        assert command[:2] == ["python3", "-c"]
        root = self.pod_dir(name.rsplit("-", 2)[0])  # the pod's Deployment (pods are named <deployment>-<hash>-<id>)
        args = [str(root / a.lstrip("/")) if a.startswith("/") else a for a in command[3:]]
        stdout, stderr, argv = io.StringIO(), io.StringIO(), sys.argv
        try:
            sys.argv = ["-c", *args]
            with contextlib.redirect_stdout(stdout):
                exec(compile(command[2], "<pod>", "exec"), {"__name__": "__main__"})  # noqa: S102
            code = 0
        except Exception as exc:  # noqa: BLE001 - the command's failure, as its exit code
            stderr.write(repr(exc))
            code = 1
        finally:
            sys.argv = argv
        return FakeExec(stdout.getvalue(), stderr.getvalue(), code)


class Unavailable(Exception):
    def code(self):
        return SimpleNamespace(name="UNAVAILABLE")


def personalized_model(k: int) -> bytes:
    return MODEL[:1000] + bytes([k]) * 9000  # 10 kB, hospital k's own


class FakeControl:
    """The SuperLink's Control API (control.Control's methods); start_run plays the ServerApp, writing its
    output where the SuperLink pod's `out` is, and with personalization each hospital's ClientApp but
    `unsaved`, saving its personalized model where personal.save would in its own pod."""

    def __init__(self, kube: FakeKubernetes, fail: str | None = None, unavailable: int = 0, hospitals: int = 3,
                 unsaved: tuple[int, ...] = ()):
        self.kube, self.fail, self.unavailable = kube, fail, unavailable
        self.hospitals, self.unsaved = hospitals, unsaved
        self.registered: list[bytes] = []
        self.configs: list[dict] = []
        self.closed = False

    def register_node(self, path: Path) -> int:
        self.kube.calls.append(("register_node", Path(path).name, {}))
        if self.unavailable:
            self.unavailable -= 1
            raise Unavailable("no endpoints yet")
        self.registered.append(Path(path).read_bytes())
        return 100 + len(self.registered)

    def start_run(self, app_dir: Path, config: dict) -> int:
        self.kube.calls.append(("start_run", config["role"], {}))
        assert {p.name for p in Path(app_dir).iterdir()} == {"pyproject.toml", "README.md"}
        if self.fail == "submit":
            raise RuntimeError("submit failed")
        self.configs.append(config)
        if config.get("personalization", "none") != "none":
            for k in set(range(self.hospitals)) - set(self.unsaved):
                path = personal.hospital_model_path(self.kube.pod_dir(f"supernode-{k}") / config["hospital-out"].lstrip(
                    "/"), k, config["role"])
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(personalized_model(k))
                path.with_suffix(".json").write_text(json.dumps({"hospital": k}))
        out = self.kube.pod_dir("superlink") / config["out"].lstrip("/")
        (out / "checkpoints" / config["role"]).mkdir(parents=True, exist_ok=True)
        (out / "checkpoints" / config["role"] / "state.json").write_text("{}")
        (out / f"{config['role']}.keras").write_bytes(MODEL)
        (out / "history.json").write_text(json.dumps({config["role"]: {"accuracy": [0.5, 0.75]}}))
        return 7

    def stream_logs(self, run_id: int, on_line) -> None:
        on_line("INFO :      [classifier] round 1/2")
        on_line("INFO :      [classifier] global model saved")

    def status(self, run_id: int) -> str:
        self.kube.calls.append(("status", str(run_id), {}))
        if self.fail == "interrupt":
            raise KeyboardInterrupt("Ctrl-C while the run trains")
        return "finished:failed" if self.fail == "failed" else "finished:completed"

    def close(self) -> None:
        self.closed = True


class Clock:
    def __init__(self):
        self.now = 0.0

    def time(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


def cluster_run(tmp_path: Path, kube: FakeKubernetes, control: FakeControl, echo: list[str], hospitals: int = 3,
                ready_timeout: float = 60.0, paillier_keys: tuple[Path, Path] | None = None,
                personalization: str = "none"):
    """A ClusterRun as cluster.run sets it up; `paillier_keys`: (public, private) files of ensure_keys."""
    settings = KubernetesSettings(ready_timeout=ready_timeout)
    public, private = paillier_keys or (None, None)
    docs = render(hospitals, run_id=RUN, namespace=settings.namespace, image=settings.image,
                  paillier_key=private.read_bytes() if private else None)
    factory_calls = []

    def factory(address, ca, server_name):
        factory_calls.append((address, Path(ca).read_bytes(), server_name))
        return control

    clock = Clock()
    run = ClusterRun(Cluster(kube, kube, kube, settings.namespace, in_cluster=True), docs, RUN, settings,
                     tmp_path / "work", echo=echo.append, control_factory=factory, clock=clock.time,
                     sleep=clock.sleep, poll_s=1.0, chunk_bytes=4096)
    configs = {"classifier": PodFederation(docs).run_config(
        {"role": "classifier", "rounds": 2, "personalization": personalization}, CLASSES,
        public.read_text() if public else "")}
    return run, configs, factory_calls


def methods(kube: FakeKubernetes) -> list[str]:
    return [method for method, _, _ in kube.calls]


def test_a_run_creates_waits_registers_runs_collects_and_deletes(tmp_path):
    kube = FakeKubernetes(tmp_path / "pod")
    control, echo = FakeControl(kube, unavailable=2), []
    run, configs, factory_calls = cluster_run(tmp_path, kube, control, echo)
    out = tmp_path / "out"

    assert run.execute(configs, out) == {"classifier": "finished:completed"}

    created = [(m.removeprefix("create_namespaced_"), name) for m, name, _ in kube.calls if m.startswith("create_")]
    assert created == [("network_policy", "superlink-ingress"), ("network_policy", "supernode-ingress"),
                       ("service", "superlink"), ("deployment", "superlink"),
                       *[("deployment", f"supernode-{k}") for k in range(3)]]
    # the SuperLink ready before any key is registered; the SuperNodes ready before the run starts
    order = methods(kube)
    first_register = order.index("register_node")
    assert max(i for i, (m, name, _) in enumerate(kube.calls) if m == "create_namespaced_deployment") < first_register
    assert kube.reads["superlink"] == 2 and "read_namespaced_deployment" in order[:first_register]
    assert all(kube.reads[f"supernode-{k}"] == 2 for k in range(3))
    assert max(i for i, (m, name, _) in enumerate(kube.calls) if name.startswith("supernode-")
               and m == "read_namespaced_deployment") < order.index("start_run")
    # in-cluster DNS, the certificate checked as the SuperNodes check it, the CA from its Secret
    assert factory_calls == [("superlink.fedbrain.svc:9093", b"-----BEGIN CERTIFICATE-----\nfake\n", "superlink")]
    # every hospital's public key (of the private key its SuperNode mounts) registered, after two retries
    assert control.registered == [cluster.public_key(kube.keys[k]) for k in range(3)]
    assert order.count("register_node") == 5
    (config,) = control.configs
    assert config["processed"] == "/app/data/processed" and config["out"] == "/app/state/out"
    assert json.loads(config["classes"]) == CLASSES
    # the ServerApp's output copied back; its log kept; everything the run made deleted; the channel closed
    assert (out / "classifier.keras").read_bytes() == MODEL
    assert json.loads((out / "history.json").read_text()) == {"classifier": {"accuracy": [0.5, 0.75]}}
    assert (out / "checkpoints" / "classifier" / "state.json").is_file()
    assert "global model saved" in (tmp_path / "work" / "logs" / "serverapp_7.log").read_text()
    execs = [kwargs for m, _, kwargs in kube.calls if m == "connect_get_namespaced_pod_exec"]
    assert len(execs) >= 4  # pack, then pieces of 4096 bytes
    assert all(e["container"] == "serverapp" and e["_preload_content"] is False for e in execs)
    # without personalization nothing comes out of the hospitals' pods
    assert {name.rsplit("-", 2)[0] for m, name, _ in kube.calls if m == "connect_get_namespaced_pod_exec"} == {
        "superlink"}
    assert not list(out.glob("hospital_*"))
    assert kube.created_by_run() == set()
    assert control.closed
    deleted = [name for m, name, _ in kube.calls if m.startswith("delete_")]
    assert sorted(deleted) == sorted(name for _, name in created)
    assert all(kwargs["propagation_policy"] == "Background" for m, _, kwargs in kube.calls if m.startswith("delete_"))
    # long-lived objects untouched
    assert ("Secret", "superlink-ca") in kube.objects and ("PersistentVolumeClaim", "hospital-0-data") in kube.objects
    assert any("waiting for SuperLink" in line for line in echo)


def packed(kube: FakeKubernetes) -> list[tuple[str, str, str]]:
    """(Deployment of the pod, container, folder) of every folder packed for copying, in order."""
    return [(name.rsplit("-", 2)[0], kwargs["container"], kwargs["command"][3]) for m, name, kwargs in kube.calls
            if m == "connect_get_namespaced_pod_exec" and kwargs["command"][2] == cluster.PACK_SCRIPT]


@pytest.mark.parametrize("personalization", ["fedbn", "local_head"])
def test_a_personalized_run_copies_each_hospitals_models_out_of_its_own_pod(tmp_path, personalization):
    kube = FakeKubernetes(tmp_path / "pod")
    control, echo = FakeControl(kube), []
    run, configs, _ = cluster_run(tmp_path, kube, control, echo, personalization=personalization)
    out = tmp_path / "out"

    assert run.execute(configs, out) == {"classifier": "finished:completed"}

    (config,) = control.configs
    assert (config["out"], config["hospital-out"], config["personalization"]) == (
        "/app/state/out", "/app/out", personalization)
    # the global model from the SuperLink's pod, each hospital's own from its SuperNode pod's ClientApp
    assert packed(kube) == [("superlink", "serverapp", "/app/state/out"),
                            *[(f"supernode-{k}", "clientapp", f"/app/out/hospital_{k}") for k in range(3)]]
    assert (out / "classifier.keras").read_bytes() == MODEL
    for k in range(3):
        assert (out / f"hospital_{k}" / "classifier.keras").read_bytes() == personalized_model(k)
        assert json.loads((out / f"hospital_{k}" / "classifier.json").read_text()) == {"hospital": k}
        assert sorted(p.name for p in (out / f"hospital_{k}").iterdir()) == ["classifier.json", "classifier.keras"]
    # copied before the pods (and their emptyDirs) are deleted
    calls = methods(kube)
    assert max(i for i, m in enumerate(calls) if m == "connect_get_namespaced_pod_exec") < calls.index(
        "delete_namespaced_deployment")
    assert kube.created_by_run() == set()


@pytest.mark.parametrize("fail", [None, "failed"])
def test_a_hospital_without_its_personalized_model_is_a_warning_naming_it_and_its_pod(tmp_path, fail):
    """A hospital the last evaluation did not sample saved no model: the run is still good (as locally),
    and the warning names the hospital and its pod; the others' models are copied. When the run itself
    failed, its error is the one reported and no hospital's pod is copied from."""
    kube, echo = FakeKubernetes(tmp_path / "pod"), []
    control = FakeControl(kube, fail=fail, unsaved=(1,))
    run, configs, _ = cluster_run(tmp_path, kube, control, echo, personalization="fedbn")
    out = tmp_path / "out"
    if fail:
        with pytest.raises(RuntimeError, match="ended as finished:failed"):
            run.execute(configs, out)
    else:
        run.execute(configs, out)
        warnings = [line for line in echo if line.startswith("WARNING")]
        assert len(warnings) == 1 and re.search(
            r"hospital 1's SuperNode pod supernode-1-5d8f9-x2x7q has no /app/out/hospital_1 to copy into "
            r".*out/hospital_1; see its log: kubectl -n fedbrain logs supernode-1-5d8f9-x2x7q -c clientapp",
            warnings[0])
    assert (out / "classifier.keras").read_bytes() == MODEL
    assert [deployment for deployment, _, _ in packed(kube)] == (
        ["superlink"] if fail else ["superlink", "supernode-0", "supernode-1", "supernode-2"])
    assert (out / "hospital_0").is_dir() == (not fail) and (out / "hospital_2").is_dir() == (not fail)
    assert not (out / "hospital_1").exists()
    assert kube.created_by_run() == set()


def test_the_methods_called_exist_on_the_real_client():
    kube = FakeKubernetes(Path("/nonexistent"))
    c = Cluster(kube, kube, kube, "fedbrain")
    c.read("Secret", "superlink-ca"), c.list("Pod", "a=b"), c.delete("Deployment", "gone")
    for doc in federation_objects(render(3, run_id=RUN)):
        c.create(doc), c.read(doc["kind"], doc["metadata"]["name"]), c.list(doc["kind"], f"{RUN_LABEL}={RUN}")
        c.delete(doc["kind"], doc["metadata"]["name"])
    for method, _, kwargs in kube.calls:
        (real,) = [getattr(api, method) for api in REAL_APIS if hasattr(api, method)]
        for kwarg in kwargs:
            assert f" {kwarg}:" in real.__doc__, (method, kwarg)
    assert hasattr(kubernetes.client.CoreV1Api, "connect_get_namespaced_pod_exec")


@pytest.mark.parametrize("failure", ["submit", "ready-timeout", "interrupt", "failed", "create"])
def test_a_failure_after_creating_deletes_everything_and_reraises(tmp_path, failure):
    kube = FakeKubernetes(tmp_path / "pod", never_ready={"supernode-1"} if failure == "ready-timeout" else (),
                          fail_create={"supernode-2"} if failure == "create" else ())
    control, echo = FakeControl(kube, fail=failure), []
    run, configs, _ = cluster_run(tmp_path, kube, control, echo, ready_timeout=5.0)
    expected = {"submit": (RuntimeError, "submit failed"), "ready-timeout": (TimeoutError, "ImagePullBackOff"),
                "interrupt": (KeyboardInterrupt, "Ctrl-C"), "failed": (RuntimeError, "ended as finished:failed"),
                "create": (ApiException, "injected create failure")}[failure]
    with pytest.raises(expected[0], match=expected[1]):
        run.execute(configs, tmp_path / "out")
    assert kube.created_by_run() == set()
    assert not any(kind in ("Deployment", "Service", "NetworkPolicy") for kind, _ in kube.objects)
    assert methods(kube)[-1].startswith("delete_") or methods(kube)[-1].startswith("list_")
    if failure == "ready-timeout":
        (line,) = [line for line in echo if "deleted" in line]
        assert "deployment/supernode-1" in line
    if failure == "failed":  # what the ServerApp left is copied back before the error
        assert (tmp_path / "out" / "checkpoints" / "classifier" / "state.json").is_file()


def test_deletion_errors_do_not_hide_the_runs_error(tmp_path):
    kube = FakeKubernetes(tmp_path / "pod", fail_delete={"supernode-1"})
    control, echo = FakeControl(kube, fail="submit"), []
    run, configs, _ = cluster_run(tmp_path, kube, control, echo)
    with pytest.raises(RuntimeError, match="submit failed"):
        run.execute(configs, tmp_path / "out")
    assert kube.created_by_run() == {("Deployment", "supernode-1")}  # the rest went regardless
    (warning,) = [line for line in echo if "WARNING" in line]
    assert "supernode-1" in warning and f"-l {RUN_LABEL}={RUN}" in warning


def test_missing_secrets_and_claims_stop_the_run_before_anything_is_created(tmp_path):
    kube = FakeKubernetes(tmp_path / "pod", missing={"supernode-2-key", "hospital-1-data"})
    run, configs, _ = cluster_run(tmp_path, kube, FakeControl(kube), [])
    with pytest.raises(InputError, match="secret supernode-2-key .*\n.*persistentvolumeclaim hospital-1-data"):
        run.execute(configs, tmp_path / "out")
    assert not any(m.startswith(("create_", "delete_")) for m in methods(kube))


def test_a_standing_federation_is_refused_and_left_alone(tmp_path):
    kube = FakeKubernetes(tmp_path / "pod")
    kube.objects[("Deployment", "superlink")] = standing = kube_api.to_model(
        [d for d in render(3) if key(d) == ("Deployment", "superlink")][0])
    run, configs, _ = cluster_run(tmp_path, kube, FakeControl(kube), [])
    with pytest.raises(InputError, match="kubectl -n fedbrain delete deployment/superlink"):
        run.execute(configs, tmp_path / "out")
    assert not any(m.startswith(("create_", "delete_")) for m in methods(kube))
    assert kube.objects[("Deployment", "superlink")] is standing


# --- federated.secure_aggregation paillier -------------------------------------------------------

@pytest.fixture(scope="module")
def paillier_keys(tmp_path_factory) -> tuple[Path, Path]:
    """The federation's key pair as both launchers make it (state_dir/pki/paillier/, params' 2048 bits)."""
    return paillier.ensure_keys(tmp_path_factory.mktemp("state") / "pki" / "paillier", 2048)


def private_material(private: Path) -> list[str]:
    """What of the private key must appear nowhere server-side: p and q (decimal and as the file writes
    them), lambda, the Secret's name and the file's name."""
    key = paillier.load_private_key(private)
    lam = (key.p - 1) * (key.q - 1)
    return [str(key.p), str(key.q), format(key.p, "x"), format(key.q, "x"), str(lam), PAILLIER_SECRET,
            PAILLIER_FILE, base64.b64encode(private.read_bytes()).decode()[:40]]


def containers(doc: dict) -> dict[str, dict]:
    return {c["name"]: c for c in doc["spec"]["template"]["spec"]["containers"]}


def test_the_paillier_key_is_a_secret_of_the_run_mounted_only_in_the_clientapps(paillier_keys):
    public, private = paillier_keys
    docs = render(3, run_id=RUN, paillier_key=private.read_bytes())
    by_key = {key(d): d for d in docs}
    secret = by_key[("Secret", PAILLIER_SECRET)]
    assert base64.b64decode(secret["data"][PAILLIER_FILE]) == private.read_bytes()
    # labelled and namespaced as the other objects a run creates, created before the pods, deleted with them
    assert secret["metadata"]["labels"][RUN_LABEL] == RUN and secret["metadata"]["namespace"] == "fedbrain"
    assert secret["metadata"]["labels"]["app.kubernetes.io/part-of"] == "fedbrain"
    objects = [key(d) for d in PodFederation(docs).objects]
    assert objects.index(("Secret", PAILLIER_SECRET)) < min(i for i, (kind, _) in enumerate(objects)
                                                             if kind == "Deployment")
    for k in range(3):
        doc = by_key[("Deployment", f"supernode-{k}")]
        volumes = {v["name"]: v for v in doc["spec"]["template"]["spec"]["volumes"]}
        assert volumes["paillier"]["secret"]["secretName"] == PAILLIER_SECRET
        mounted = {name: [m for m in c.get("volumeMounts", []) if m["name"] == "paillier"]
                   for name, c in containers(doc).items()}
        assert mounted == {"supernode": [], "clientapp": [{"name": "paillier", "mountPath": PAILLIER_MOUNT,
                                                           "readOnly": True}]}
        assert (f'--node-config=partition-id={k} num-partitions=3 '
                f'paillier-private-key="{PAILLIER_MOUNT}/{PAILLIER_FILE}"') in containers(doc)["supernode"]["args"]
    # nothing of it anywhere else: the SuperLink's pod, its Service and policies, the long-lived objects
    elsewhere = json.dumps([d for d in docs if key(d) != ("Secret", PAILLIER_SECRET)
                            and not key(d)[1].startswith("supernode-")])
    assert [m for m in private_material(private) if m in elsewhere] == []
    # without encryption: no Secret, no mount, no node-config key
    assert "paillier" not in json.dumps(render(3, run_id=RUN))


def test_a_paillier_run_gives_the_serverapp_the_public_key_only_and_deletes_the_secret(tmp_path, paillier_keys):
    public, private = paillier_keys
    kube = FakeKubernetes(tmp_path / "pod")
    control, echo = FakeControl(kube), []
    run, configs, _ = cluster_run(tmp_path, kube, control, echo, paillier_keys=paillier_keys)
    superlink_seen = []
    original_create = kube._create

    def create(method, kind, namespace, body):  # what the cluster holds of the SuperLink, as created
        if kind != "Secret" and not body.metadata.name.startswith("supernode-"):
            superlink_seen.append(kubernetes.client.ApiClient().sanitize_for_serialization(body))
        return original_create(method, kind, namespace, body)

    kube._create = create
    assert run.execute(configs, tmp_path / "out") == {"classifier": "finished:completed"}

    created = [(m.removeprefix("create_namespaced_"), name) for m, name, _ in kube.calls if m.startswith("create_")]
    assert created.index(("secret", PAILLIER_SECRET)) < min(i for i, (kind, _) in enumerate(created)
                                                            if kind == "deployment")
    # the ServerApp's run config carries the public key's text, which the server side loads as the key
    (config,) = control.configs
    assert config["paillier-public-key"] == public.read_text()
    assert paillier.load_public_key(config["paillier-public-key"]).n == paillier.load_private_key(private).public_key.n
    server_side = json.dumps([config, superlink_seen]) + (tmp_path / "work" / "run_config_classifier.json").read_text()
    assert {d["metadata"]["name"] for d in superlink_seen} >= {"superlink", "superlink-ingress"}
    assert [m for m in private_material(private) if m in server_side] == []
    # deleted with the rest; the long-lived Secrets stay
    assert ("delete_namespaced_secret", PAILLIER_SECRET) in [(m, name) for m, name, _ in kube.calls]
    assert kube.created_by_run() == set() and ("Secret", PAILLIER_SECRET) not in kube.objects
    assert ("Secret", "superlink-ca") in kube.objects and ("Secret", "supernode-0-key") in kube.objects


def test_a_leftover_paillier_secret_is_refused_as_the_other_leftovers(tmp_path, paillier_keys):
    kube = FakeKubernetes(tmp_path / "pod")
    kube.objects[("Secret", PAILLIER_SECRET)] = leftover = kubernetes.client.V1Secret(
        metadata=kubernetes.client.V1ObjectMeta(name=PAILLIER_SECRET, labels={RUN_LABEL: "earlier-run"}),
        data={PAILLIER_FILE: "e30="})
    run, configs, _ = cluster_run(tmp_path, kube, FakeControl(kube), [], paillier_keys=paillier_keys)
    with pytest.raises(InputError, match=rf"secret/{PAILLIER_SECRET} \(left by run\(s\) earlier-run\).*"
                                         rf"kubectl -n fedbrain delete secret/{PAILLIER_SECRET}"):
        run.execute(configs, tmp_path / "out")
    assert not any(m.startswith(("create_", "delete_")) for m in methods(kube))
    assert kube.objects[("Secret", PAILLIER_SECRET)] is leftover


# --- settings ------------------------------------------------------------------------------------

def federated_params(**overrides) -> dict:
    params = yaml.safe_load((PROJECT / "params.yaml").read_text())
    return {**params, "federated": {**params["federated"], **overrides}}


def test_params_yaml_defaults_to_the_local_launcher():
    settings = FederatedSettings.from_params(federated_params())
    assert settings.launcher == "local"
    assert settings.kubernetes == KubernetesSettings()
    assert settings.kubernetes.tracking == "http://mlflow.fedbrain.svc:5000"


@pytest.mark.parametrize("overrides, message", [
    ({"launcher": "k8s"}, r"'federated.launcher' is 'k8s'; expected one of local, kubernetes"),
    ({"kubernetes": "fedbrain"}, r"'federated.kubernetes' is 'fedbrain'; expected a mapping"),
    ({"kubernetes": {"namspace": "x"}}, r"'federated.kubernetes' has unknown key\(s\) namspace; known: namespace"),
    ({"kubernetes": {"namespace": "Fed_Brain"}}, r"'federated.kubernetes.namespace' is 'Fed_Brain'; use a Kubernetes"),
    ({"kubernetes": {"image": ""}}, r"'federated.kubernetes.image' is ''; use the project image"),
    ({"kubernetes": {"control_address": "superlink"}}, r"'federated.kubernetes.control_address' is 'superlink'"),
    ({"kubernetes": {"control_address": "127.0.0.1:99999"}}, r"control_address' is '127.0.0.1:99999'; use auto"),
    ({"kubernetes": {"tracking_uri": "sqlite:///mlflow.db"}}, r"'federated.kubernetes.tracking_uri' is 'sqlite"),
    ({"kubernetes": {"ready_timeout": 0}}, r"'federated.kubernetes.ready_timeout' is 0.0; use the seconds"),
    ({"kubernetes": {"ready_timeout": "soon"}}, r"'federated.kubernetes.ready_timeout' is 'soon'; expected float"),
])
def test_bad_settings_name_the_key_and_the_fix(overrides, message):
    with pytest.raises(InputError, match=message):
        FederatedSettings.from_params(federated_params(**overrides))


def test_good_settings_and_what_is_not_supported_yet():
    settings = FederatedSettings.from_params(federated_params(launcher="kubernetes", kubernetes={
        "control_address": "127.0.0.1:9093", "tracking_uri": "http://127.0.0.1:5000", "ready_timeout": 30}))
    assert settings.launcher == "kubernetes" and settings.kubernetes.ready_timeout == 30.0
    federation = PodFederation(render(3))
    assert cluster.control_address(settings.kubernetes, federation, in_cluster=False) == "127.0.0.1:9093"
    with pytest.raises(InputError, match="port-forward svc/superlink 9093:9093"):
        cluster.control_address(KubernetesSettings(), federation, in_cluster=False)
    params = federated_params()
    for kwargs, message in [({"insecure": True}, "--insecure"), ({"resume": True}, "--resume")]:
        with pytest.raises(InputError, match=message):
            cluster.check_supported(params, **{"resume": False, "insecure": False, **kwargs})
    cluster.check_supported(federated_params(secure_aggregation="paillier"), resume=False, insecure=False)
    for personalization in ("fedbn", "local_head"):  # each hospital's model is copied out of its pod
        cluster.check_supported(federated_params(personalization=personalization), resume=False, insecure=False)
    pod_params = cluster.cluster_params(params, settings.kubernetes)
    assert pod_params["mlflow"]["tracking_uri"] == "http://127.0.0.1:5000"
    assert "artifact_location" not in pod_params["mlflow"] and "artifact_location" in params["mlflow"]


def test_the_serverapp_takes_the_classes_from_the_run_config_when_it_has_no_data(tmp_path):
    """What PodFederation.run_config adds reaches the ServerApp's RunSettings (its pod has no processed/)."""
    from fedbrain.federated.task import RunSettings

    config = {"processed": str(tmp_path / "nowhere"), "partition": "", "out": "", "role": "classifier",
              "rounds": 1, "local-epochs": 1, "seed": 1, "train-params": "{}", "params": "{}",
              "fraction-train": 1.0, "fraction-evaluate": 1.0, "min-train-nodes": 2, "min-evaluate-nodes": 2,
              "min-available-nodes": 2, "round-timeout": 1.0, "node-wait-timeout": 1.0, "resume": False,
              "run-name": "t", "secure": True, "calibration-images": 0, "lr-decay": "cosine"}
    pods = PodFederation(render(3)).run_config(config, CLASSES, training_dataset='{"name": "x-train"}')
    assert RunSettings.from_run_config(pods).class_info() == CLASSES
    assert RunSettings.from_run_config(pods).training_dataset == '{"name": "x-train"}'
    assert RunSettings.from_run_config(config).training_dataset == ""  # the local launcher: read from processed
    # the hospitals save their personalized models on their own pods' volume; locally beside the global model
    assert (RunSettings.from_run_config(pods).out, RunSettings.from_run_config(pods).hospital_out) == (
        Path("/app/state/out"), Path("/app/out"))
    assert RunSettings.from_run_config(config).hospital_out is None
    assert RunSettings.from_run_config({**config, "hospital-out": ""}).hospital_out is None  # the template's default
    (tmp_path / "nowhere").mkdir()
    (tmp_path / "nowhere" / "classes.json").write_text(json.dumps({**CLASSES, "size": 64}))
    assert RunSettings.from_run_config({**config, "classes": ""}).class_info()["size"] == 64  # the local launcher's
