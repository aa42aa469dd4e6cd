"""k8s/ manifests: every object is a valid Kubernetes object (the installed `kubernetes` client's models,
offline), the kustomize base lists every file and renders, and the pods are hardened as DESIGN.md says.

The overlays (k8s/overlays/local, k8s/overlays/production) and the base are rendered with `kubectl kustomize`
and every rendered object is validated strictly against the Kubernetes API schemas of KUBERNETES_VERSION
(kubernetes-validate, offline); then the pods' hardening, resources, images, each hospital's data claim and
the network policies are checked on what would be applied. Nothing here talks to a cluster."""

from __future__ import annotations

import ast
import functools
import json
import re
import shutil
import subprocess
from pathlib import Path

import kubernetes.client
import kubernetes_validate
import pytest
import yaml

from helpers import PROJECT

BASE = PROJECT / "k8s" / "base"
OVERLAYS = PROJECT / "k8s" / "overlays"

# The Kubernetes API the manifests are validated against: the API of the `kubernetes==30.1.0` client pinned in
# pyproject.toml (what a launcher would talk to a cluster with), and an older API than kubectl's own (v1.32 here)
# so that nothing newer than a 1.30 cluster knows slips in. kubernetes-validate 1.37.0 ships 1.30's schemas.
KUBERNETES_VERSION = "1.30"

# What each overlay must set on every container.
OVERLAY_IMAGES = {
    "local": ("fedbrain:0.1.0", "Never"),  # loaded with `kind load docker-image`, never pulled
    "production": ("registry.example.org/fedbrain:0.1.0", "Always"),
}
OVERLAY_STORAGE_CLASSES = {"local": "standard", "production": "encrypted-ssd"}
TARGETS = ["base", *OVERLAY_IMAGES]


def manifests() -> list[tuple[Path, dict]]:
    found = []
    for path in sorted(BASE.glob("*.yaml")):
        if path.name != "kustomization.yaml":
            found.extend((path, doc) for doc in yaml.safe_load_all(path.read_text()) if doc)
    return found


def objects(kind: str) -> list[dict]:
    return [doc for _, doc in manifests() if doc["kind"] == kind]


class _Response:  # what ApiClient.deserialize reads from an HTTP response
    def __init__(self, doc: dict):
        self.data = json.dumps(doc)


def test_every_object_round_trips_through_the_kubernetes_models():
    """Deserialising checks types and required fields; serialising back drops unknown keys, so a
    misspelt or misplaced field makes the round trip differ from the file."""
    api = kubernetes.client.ApiClient()
    docs = manifests()
    assert docs
    for path, doc in docs:
        version = doc["apiVersion"].split("/")[-1]
        model = f"{version.capitalize()}{doc['kind']}"
        assert hasattr(kubernetes.client, model), f"{path.name}: no model {model}"
        obj = api.deserialize(_Response(doc), model)
        assert api.sanitize_for_serialization(obj) == doc, f"{path.name}: {doc['kind']} {doc['metadata']['name']}"


def test_kustomization_lists_every_manifest():
    listed = yaml.safe_load((BASE / "kustomization.yaml").read_text())["resources"]
    assert sorted(listed) == sorted(p.name for p in BASE.glob("*.yaml") if p.name != "kustomization.yaml")


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl not installed")
def test_kustomize_renders_offline():
    result = subprocess.run(["kubectl", "kustomize", str(BASE)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    rendered = [d for d in yaml.safe_load_all(result.stdout) if d]
    assert len(rendered) == len(manifests())
    assert all(d["metadata"].get("namespace") == "fedbrain" for d in rendered if d["kind"] != "Namespace")


def test_pods_run_non_root_with_a_read_only_root_filesystem():
    for deployment in objects("Deployment"):
        pod = deployment["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["runAsUser"] == 49999
        mounted_volumes = {v["name"] for v in pod["volumes"]}
        for container in pod["containers"]:
            assert container["securityContext"]["readOnlyRootFilesystem"] is True
            assert container["securityContext"]["allowPrivilegeEscalation"] is False
            mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
            assert {"/app/.cache", "/var/tmp", "/tmp"} <= set(mounts)
            assert set(mounts.values()) <= mounted_volumes


def test_superlink_ports_and_side_car():
    (superlink,) = [d for d in objects("Deployment") if d["metadata"]["name"] == "superlink"]
    containers = {c["name"]: c for c in superlink["spec"]["template"]["spec"]["containers"]}
    assert {p["containerPort"] for p in containers["superlink"]["ports"]} >= {9091, 9092, 9093}
    assert "--serverappio-api-address=127.0.0.1:9091" in containers["superlink"]["args"]  # loopback only
    assert "--insecure" in containers["serverapp"]["args"]  # SuperExec has no TLS: hence the loopback
    (service,) = [s for s in objects("Service") if s["metadata"]["name"] == "superlink"]
    assert {p["port"] for p in service["spec"]["ports"]} == {9092, 9093}


def test_one_supernode_per_hospital_with_a_clientapp_side_car():
    hospitals = yaml.safe_load((PROJECT / "params.yaml").read_text())["partition"]["hospitals"]
    supernodes = [d for d in objects("Deployment") if d["metadata"]["name"].startswith("supernode-")]
    assert sorted(d["metadata"]["name"] for d in supernodes) == [f"supernode-{k}" for k in range(hospitals)]
    for k, deployment in enumerate(sorted(supernodes, key=lambda d: d["metadata"]["name"])):
        containers = {c["name"]: c for c in deployment["spec"]["template"]["spec"]["containers"]}
        assert set(containers) == {"supernode", "clientapp"}
        assert f"--node-config=partition-id={k} num-partitions={hospitals}" in containers["supernode"]["args"]


def test_mlflow_has_health_probes_and_a_service():
    (mlflow,) = [d for d in objects("Deployment") if d["metadata"]["name"] == "mlflow"]
    (container,) = mlflow["spec"]["template"]["spec"]["containers"]
    assert container["readinessProbe"]["httpGet"]["path"] == "/health"
    assert container["livenessProbe"]["httpGet"]["path"] == "/health"
    assert any(s["metadata"]["name"] == "mlflow" for s in objects("Service"))


def test_network_policy_denies_ingress_by_default():
    policies = {p["metadata"]["name"]: p["spec"] for p in objects("NetworkPolicy")}
    assert policies["default-deny-ingress"] == {"podSelector": {}, "policyTypes": ["Ingress"]}


# --- the rendered base and overlays -------------------------------------------------------------------------------

def _target_dir(target: str) -> Path:
    return BASE if target == "base" else OVERLAYS / target


@functools.cache
def _render(target: str) -> tuple[str, str]:
    result = subprocess.run(["kubectl", "kustomize", str(_target_dir(target))], capture_output=True, text=True,
                            timeout=60)
    return result.stdout, result.stderr if result.returncode else ""


def rendered(target: str) -> list[dict]:
    """`kubectl kustomize <target>`: the objects `kubectl apply -k` would send."""
    if shutil.which("kubectl") is None:
        pytest.skip("kubectl is not installed: the overlays are rendered with `kubectl kustomize` (kustomize built in)")
    stdout, error = _render(target)
    assert not error, f"kubectl kustomize {target}: {error}"
    return [doc for doc in yaml.safe_load_all(stdout) if doc]


def rendered_objects(target: str, kind: str) -> dict[str, dict]:
    return {doc["metadata"]["name"]: doc for doc in rendered(target) if doc["kind"] == kind}


def pod_templates(target: str) -> dict[str, dict]:
    """Deployment name -> its pod template (metadata and spec)."""
    return {name: d["spec"]["template"] for name, d in rendered_objects(target, "Deployment").items()}


def containers(pod_spec: dict) -> list[dict]:
    return [*pod_spec.get("initContainers", []), *pod_spec["containers"]]


def selects(selector: dict, labels: dict) -> bool:
    """Whether a Kubernetes label selector (matchLabels and matchExpressions) selects these labels."""
    if any(labels.get(key) != value for key, value in selector.get("matchLabels", {}).items()):
        return False
    for expression in selector.get("matchExpressions", []):
        key, operator, values = expression["key"], expression["operator"], expression.get("values", [])
        ok = {"In": lambda: labels.get(key) in values, "NotIn": lambda: labels.get(key) not in values,
              "Exists": lambda: key in labels, "DoesNotExist": lambda: key not in labels}[operator]()
        if not ok:
            return False
    return True


_UNITS = {"m": 1e-3, "": 1.0, "k": 1e3, "M": 1e6, "G": 1e9, "Ki": 2.0**10, "Mi": 2.0**20, "Gi": 2.0**30, "Ti": 2.0**40}


def quantity(value) -> float:
    match = re.fullmatch(r"([0-9]+(?:\.[0-9]+)?)([a-zA-Z]*)", str(value))
    assert match and match[2] in _UNITS, f"not a Kubernetes quantity: {value!r}"
    return float(match[1]) * _UNITS[match[2]]


def component_image() -> str:
    """components/stages.py IMAGE, read without importing kfp (or putting components/ on sys.path)."""
    tree = ast.parse((PROJECT / "components" / "stages.py").read_text())
    (value,) = [node.value for node in tree.body if isinstance(node, ast.Assign)
                and any(isinstance(target, ast.Name) and target.id == "IMAGE" for target in node.targets)]
    return ast.literal_eval(value)


def hospitals() -> int:
    return yaml.safe_load((PROJECT / "params.yaml").read_text())["partition"]["hospitals"]


def test_selector_matching_helper():
    labels = {"app.kubernetes.io/name": "supernode", "fedbrain/hospital": "1"}
    assert selects({}, labels)
    assert selects({"matchLabels": {"app.kubernetes.io/name": "supernode"}}, labels)
    assert not selects({"matchLabels": {"app.kubernetes.io/name": "superlink"}}, labels)
    assert selects({"matchExpressions": [{"key": "fedbrain/hospital", "operator": "In", "values": ["0", "1"]}]}, labels)
    assert not selects({"matchExpressions": [{"key": "fedbrain/hospital", "operator": "DoesNotExist"}]}, labels)


@pytest.mark.parametrize("overlay", sorted(OVERLAY_IMAGES))
def test_overlay_is_a_kustomization_over_the_base(overlay):
    folder = OVERLAYS / overlay
    kustomization = yaml.safe_load((folder / "kustomization.yaml").read_text())
    assert kustomization["resources"] == ["../../base"]
    # kustomize's own features, not the deprecated fields kubectl's kustomize (v5) warns about
    assert not {"bases", "patchesStrategicMerge", "patchesJson6902", "commonLabels", "vars"} & set(kustomization)
    (image,) = kustomization["images"]
    assert image["name"] == "fedbrain"
    patch_files = {p["path"] for p in kustomization["patches"] if "path" in p}
    assert all((folder / path).is_file() for path in patch_files)
    assert {p.name for p in folder.glob("*.yaml")} == {"kustomization.yaml", *patch_files}  # nothing left unused
    assert sorted(OVERLAYS.iterdir()) == sorted(OVERLAYS / name for name in OVERLAY_IMAGES)


@pytest.mark.parametrize("target", TARGETS)
def test_rendered_objects_validate_against_the_kubernetes_schemas(target):
    """Strict: an unknown or misplaced field is an error, as are wrong types and missing required fields;
    then the same round trip through the `kubernetes` client's models as the base files get."""
    docs = rendered(target)
    assert docs
    api = kubernetes.client.ApiClient()
    for doc in docs:
        name = f"{target}: {doc['kind']} {doc['metadata']['name']}"
        try:
            validated = kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as error:
            pytest.fail(f"{name}: {'.'.join(map(str, error.path))}: {error.message}")
        assert validated == KUBERNETES_VERSION, name  # not a nearby version's schemas
        model = f"{doc['apiVersion'].split('/')[-1].capitalize()}{doc['kind']}"
        assert api.sanitize_for_serialization(api.deserialize(_Response(doc), model)) == doc, name


@pytest.mark.parametrize("target", TARGETS)
def test_rendered_objects_keep_the_base_names_in_the_namespace(target):
    """The launcher reads k8s/base: an overlay changes fields, never which objects exist or their names."""
    keys = sorted((d["kind"], d["metadata"]["name"]) for d in rendered(target))
    assert keys == sorted((d["kind"], d["metadata"]["name"]) for d in rendered("base"))
    assert all(d["metadata"].get("namespace") == "fedbrain" for d in rendered(target) if d["kind"] != "Namespace")
    assert rendered_objects(target, "Namespace")["fedbrain"]["metadata"]["labels"][
        "pod-security.kubernetes.io/enforce"] == "restricted"


@pytest.mark.parametrize("target", TARGETS)
def test_every_pod_template_is_hardened(target):
    base_pods = pod_templates("base")
    pods = pod_templates(target)
    assert set(pods) == {"superlink", "mlflow", *(f"supernode-{k}" for k in range(hospitals()))}
    for name, template in pods.items():
        pod = template["spec"]
        assert pod["automountServiceAccountToken"] is False, name
        assert pod["securityContext"]["runAsNonRoot"] is True, name
        assert pod["securityContext"]["runAsUser"] == 49999, name
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}, name
        assert not pod.get("hostNetwork") and not pod.get("hostPID") and not pod.get("hostIPC"), name
        base_containers = {c["name"]: c for c in containers(base_pods[name]["spec"])}
        for container in containers(pod):
            where = f"{target}: {name}/{container['name']}"
            context = container["securityContext"]
            assert context["allowPrivilegeEscalation"] is False, where
            assert context["capabilities"] == {"drop": ["ALL"]}, where
            assert not context.get("privileged"), where
            if base_containers[container["name"]]["securityContext"].get("readOnlyRootFilesystem"):
                assert context["readOnlyRootFilesystem"] is True, where


@pytest.mark.parametrize("overlay", sorted(OVERLAY_IMAGES))
def test_every_container_has_cpu_and_memory_requests_and_limits(overlay):
    for name, template in pod_templates(overlay).items():
        for container in containers(template["spec"]):
            where = f"{overlay}: {name}/{container['name']}"
            resources = container["resources"]
            for resource in ("cpu", "memory"):
                request = quantity(resources["requests"][resource])
                limit = quantity(resources["limits"][resource])
                assert 0 < request <= limit, f"{where}: {resource} request {request} > limit {limit}"


@pytest.mark.parametrize("target", TARGETS)
def test_every_container_runs_the_targets_image(target):
    """The base runs the image the Kubeflow components run (components/stages.py IMAGE); each overlay its own."""
    image, pull_policy = OVERLAY_IMAGES.get(target, (component_image(), None))
    for name, template in pod_templates(target).items():
        for container in containers(template["spec"]):
            assert container["image"] == image, f"{target}: {name}/{container['name']}"
            assert container.get("imagePullPolicy") == pull_policy, f"{target}: {name}/{container['name']}"


@pytest.mark.parametrize("target", TARGETS)
def test_each_hospital_mounts_its_own_data_claim(target):
    pods = pod_templates(target)
    claims = rendered_objects(target, "PersistentVolumeClaim")
    claimed_by = {}  # claim -> the Deployments whose pods mount it
    for name, template in pods.items():
        for volume in template["spec"]["volumes"]:
            if "persistentVolumeClaim" in volume:
                claimed_by.setdefault(volume["persistentVolumeClaim"]["claimName"], []).append(name)
    for k in range(hospitals()):
        pod = pods[f"supernode-{k}"]["spec"]
        volumes = {v["name"]: v for v in pod["volumes"]}
        assert volumes["data"]["persistentVolumeClaim"]["claimName"] == f"hospital-{k}-data"
        (clientapp,) = [c for c in pod["containers"] if c["name"] == "clientapp"]
        assert {"name": "data", "mountPath": "/app/data", "readOnly": True} in clientapp["volumeMounts"]
        (supernode,) = [c for c in pod["containers"] if c["name"] == "supernode"]
        assert all(m["name"] != "data" for m in supernode["volumeMounts"])  # only the ClientApp reads the data
        assert claimed_by[f"hospital-{k}-data"] == [f"supernode-{k}"]  # no other pod mounts it
        assert claims[f"hospital-{k}-data"]["metadata"]["labels"]["fedbrain/hospital"] == str(k)
    assert claimed_by["mlflow-store"] == ["mlflow"]
    assert set(claims) == set(claimed_by)  # no claim left unused
    if target in OVERLAY_STORAGE_CLASSES:
        assert {c["spec"].get("storageClassName") for c in claims.values()} == {OVERLAY_STORAGE_CLASSES[target]}


@pytest.mark.parametrize("target", TARGETS)
def test_network_policies_govern_the_hospital_pods(target):
    """Every hospital pod is selected by the default deny; the only policy that lets anything in is
    supernode-ingress (kubelet's gRPC health probes on 8081); its SuperNodes are the peers the Fleet rule allows."""
    policies = rendered_objects(target, "NetworkPolicy")
    assert set(policies) == {"default-deny-ingress", "superlink-ingress", "supernode-ingress", "mlflow-ingress"}
    assert all("Ingress" in p["spec"]["policyTypes"] for p in policies.values())
    deployments = rendered_objects(target, "Deployment")
    hospital_pods = {name: d["spec"]["template"]["metadata"]["labels"] for name, d in deployments.items()
                     if name.startswith("supernode-")}
    assert len(hospital_pods) == hospitals()
    for name, labels in hospital_pods.items():
        selecting = {p for p, policy in policies.items() if selects(policy["spec"]["podSelector"], labels)}
        assert selecting == {"default-deny-ingress", "supernode-ingress"}, name
        allowing = {p for p in selecting if policies[p]["spec"].get("ingress")}
        assert allowing == {"supernode-ingress"}, name
    assert "ingress" not in policies["default-deny-ingress"]["spec"]
    assert policies["supernode-ingress"]["spec"]["ingress"] == [{"ports": [{"protocol": "TCP", "port": 8081}]}]
    for name in hospital_pods:  # 8081 is the SuperNode's health server, and the ClientApp listens nowhere
        pod = deployments[name]["spec"]["template"]["spec"]
        ports = {c["name"]: [p["containerPort"] for p in c.get("ports", [])] for c in pod["containers"]}
        assert ports == {"supernode": [8081], "clientapp": []}, name
    # The SuperLink's Fleet API (9092) admits exactly the hospital pods, and not the other Deployments.
    superlink_labels = deployments["superlink"]["spec"]["template"]["metadata"]["labels"]
    assert selects(policies["superlink-ingress"]["spec"]["podSelector"], superlink_labels)
    (fleet,) = [r for r in policies["superlink-ingress"]["spec"]["ingress"]
                if r.get("ports") == [{"protocol": "TCP", "port": 9092}]]
    (peers,) = fleet["from"]
    for name, deployment in deployments.items():
        assert selects(peers["podSelector"], deployment["spec"]["template"]["metadata"]["labels"]) == (
            name in hospital_pods), name


def test_production_spreads_the_hospitals_over_nodes():
    for name, template in pod_templates("production").items():
        if not name.startswith("supernode-"):
            continue
        (term,) = template["spec"]["affinity"]["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"]
        assert term["podAffinityTerm"]["topologyKey"] == "kubernetes.io/hostname"
        assert selects(term["podAffinityTerm"]["labelSelector"], template["metadata"]["labels"])
