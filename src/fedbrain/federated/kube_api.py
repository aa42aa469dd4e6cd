"""The Kubernetes API calls a federation run makes (cluster.py), in one namespace.

`Cluster` wraps the official client's AppsV1Api, CoreV1Api and NetworkingV1Api (or objects with the same
methods: the tests' fake cluster) behind the few verbs a run needs, by kind: create, read, list, delete,
a Secret's value and a command in a container (the exec API, as `kubectl exec`). `to_model` turns a
rendered manifest into the client's model, so every request body is type-checked by the client.
"""

from __future__ import annotations

import base64
import json

import yaml
from kubernetes.client.exceptions import ApiException

from fedbrain.errors import InputError

# Kind -> the client method suffix (create_namespaced_<suffix>, ...) and the API object that has it.
API_METHODS = {"Deployment": ("apps", "deployment"), "Service": ("core", "service"),
               "NetworkPolicy": ("networking", "network_policy"),
               "PersistentVolumeClaim": ("core", "persistent_volume_claim"), "Secret": ("core", "secret"),
               "Pod": ("core", "pod")}
EXEC_TIMEOUT_S = 600.0


class _Response:  # what ApiClient.deserialize reads
    def __init__(self, doc: dict):
        self.data = json.dumps(doc)


_api_client = None


def to_model(doc: dict):
    """A manifest as the client's model (V1Deployment, ...): the request body, type-checked by the client."""
    global _api_client
    from kubernetes.client import ApiClient

    if _api_client is None:
        _api_client = ApiClient()
    return _api_client.deserialize(_Response(doc), f"{doc['apiVersion'].split('/')[-1].capitalize()}{doc['kind']}")


class Cluster:
    """The Kubernetes API calls a run makes, in one namespace: the official client's AppsV1Api,
    CoreV1Api and NetworkingV1Api (`connect`), or objects with the same methods."""

    def __init__(self, apps, core, networking, namespace: str, in_cluster: bool = False):
        self.apis = {"apps": apps, "core": core, "networking": networking}
        self.core, self.namespace, self.in_cluster = core, namespace, in_cluster

    @classmethod
    def connect(cls, namespace: str) -> Cluster:
        """In a pod: its service account; elsewhere: the kubeconfig (KUBECONFIG, ~/.kube/config)."""
        import os

        from kubernetes import client, config

        in_cluster = bool(os.environ.get("KUBERNETES_SERVICE_HOST"))
        try:
            config.load_incluster_config() if in_cluster else config.load_kube_config()
        except config.ConfigException as exc:
            raise InputError(f"no Kubernetes cluster to run the federation in ({exc}): set KUBECONFIG or run "
                             f"in a pod, or use federated.launcher: local") from exc
        return cls(client.AppsV1Api(), client.CoreV1Api(), client.NetworkingV1Api(), namespace, in_cluster)

    def _call(self, verb: str, kind: str, *args, **kwargs):
        api, suffix = API_METHODS[kind]
        return getattr(self.apis[api], f"{verb}_namespaced_{suffix}")(*args, **kwargs)

    def create(self, doc: dict) -> None:
        self._call("create", doc["kind"], self.namespace, to_model(doc))

    def read(self, kind: str, name: str):
        """The object, or None when there is none."""
        try:
            return self._call("read", kind, name, self.namespace)
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise

    def list(self, kind: str, selector: str) -> list:
        return self._call("list", kind, self.namespace, label_selector=selector).items

    def delete(self, kind: str, name: str) -> bool:
        """False when it was gone already. Pods of a Deployment go in the background."""
        try:
            self._call("delete", kind, name, self.namespace, propagation_policy="Background")
            return True
        except ApiException as exc:
            if exc.status == 404:
                return False
            raise

    def secret(self, name: str, key: str) -> bytes | None:
        found = self.read("Secret", name)
        value = (found.data or {}).get(key) if found is not None else None
        return None if value is None else base64.b64decode(value)

    def exec(self, pod: str, container: str, command: list[str], timeout: float = EXEC_TIMEOUT_S) -> str:
        """A command's stdout in a running container (the exec API, as `kubectl exec`); raises on failure."""
        from kubernetes.stream import stream

        ws = stream(self.core.connect_get_namespaced_pod_exec, pod, self.namespace, container=container,
                    command=command, stderr=True, stdin=False, stdout=True, tty=False, _preload_content=False)
        try:
            ws.run_forever(timeout=timeout)
            if ws.is_open():
                raise TimeoutError(f"{pod}/{container}: {command[0]} still running after {timeout:.0f} s")
            out, err = ws.read_stdout(), ws.read_stderr()
            try:
                code = ws.returncode
            except (TypeError, KeyError, ValueError, yaml.YAMLError):
                code = None
            if code != 0:
                raise RuntimeError(f"{pod}/{container}: {command[0]} exited with {code}: {err.strip()[-2000:]}")
            return out
        finally:
            ws.close()


