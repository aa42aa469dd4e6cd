"""k8s/ manifests: every object is a valid Kubernetes object (the installed `kubernetes` client's models,
offline), the kustomize base lists every file and renders, and the pods are hardened as DESIGN.md says."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import kubernetes.client
import pytest
import yaml

from helpers import PROJECT

BASE = PROJECT / "k8s" / "base"


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
