"""The train-federated stage's federation as Kubernetes objects: k8s/base rendered for a run's hospitals.

Pure: nothing here talks to a cluster (cluster.py does, with what this renders). `render` renders the
objects of k8s/base for the partition's hospitals in Python (there is no kubectl in the image): the
base's resources with its kustomization's namespace and labels applied as kustomize applies them,
hospital 0's objects copied for every hospital k by the rule of supernodes.yaml's header (names, the
`fedbrain/hospital` label, `--node-config=partition-id=<k> num-partitions=<n>`, its key Secret, its data
claim), the project image set, and the label `fedbrain/run: <run id>` (`new_run_id`) on every object a
run creates (`federation_objects`: the Deployments labelled `app.kubernetes.io/component: flower`, the
SuperLink and one SuperNode per hospital, the Services and NetworkPolicies that select their pods, and
with a Paillier key its Secret: `with_paillier_key`) and on its pods. The Namespace, the MLflow server,
the data claims, the TLS and SuperNode key Secrets and the namespace-wide default-deny policy are
long-lived: rendered, never created by a run.

`PodFederation` reads from the rendered objects what a run needs to know: which Deployment is the
SuperLink and which are the SuperNodes, the Secrets holding the CA and each hospital's key (the ones
the pods mount), the data claims, the Control API's Service and port, the name the SuperNodes dial, and
the paths the pods see (`PodFederation.run_config`).

The objects keep k8s/base's names (the SuperNodes dial `superlink`, the certificate names it): one
federation per namespace at a time.
"""

from __future__ import annotations

import base64
import json
import re
import secrets
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import yaml

from fedbrain.dataset import hospital_dir
from fedbrain.errors import InputError

# k8s/base, shipped in the package: `manifests` is a link to ../../../k8s/base, which setuptools follows
# when it builds the wheel (package-data in pyproject.toml), so an installed package, the image's too,
# carries the very files kustomize reads; an editable install reads them through the link. The
# repository root is no place to look them up: the image installs the package and has no checkout.
MANIFESTS = Path(__file__).parent / "manifests"

RUN_LABEL = "fedbrain/run"
HOSPITAL_LABEL = "fedbrain/hospital"
COMPONENT_LABEL = "app.kubernetes.io/component"
FLOWER = "flower"
# The repository of the project image in the base (what the overlays' `images: - name: fedbrain` match).
PROJECT_IMAGE = "fedbrain"
# All `render` implements of a kustomization; anything else is refused rather than rendered differently.
KUSTOMIZATION_FIELDS = {"apiVersion", "kind", "namespace", "labels", "resources"}
CLUSTER_SCOPED = {"Namespace", "PersistentVolume", "StorageClass", "ClusterRole", "ClusterRoleBinding",
                  "CustomResourceDefinition", "PriorityClass", "IngressClass"}
# The kinds a run creates, in the order it creates them (deleted in reverse): policies and the Paillier
# key's Secret before the pods (a pod mounting a Secret that is not there yet would not start).
CREATED_KINDS = ("NetworkPolicy", "Service", "Secret", "Deployment")
# federated.secure_aggregation paillier: the federation's private key, a Secret of the run mounted in the
# SuperNodes' ClientApp containers only (the process that decrypts); the file name is the one
# paillier.ensure_keys writes (PRIVATE_FILE), the node-config key the one the local launcher sets.
PAILLIER_SECRET = "paillier-private-key"
PAILLIER_FILE = "paillier_private.json"
PAILLIER_MOUNT = "/app/paillier"
PAILLIER_NODE_CONFIG = "paillier-private-key"


# --- rendering ---------------------------------------------------------------------------------

def _labels(doc: dict) -> dict:
    return doc.setdefault("metadata", {}).setdefault("labels", {})


def load_base(manifests: Path = MANIFESTS) -> tuple[dict, list[dict]]:
    """The kustomization and its resources' objects, in its order (independent copies: no YAML aliases)."""
    path = Path(manifests) / "kustomization.yaml"
    if not path.is_file():
        raise InputError(f"{path}: not found. The kubernetes launcher reads k8s/base from the installed package "
                         f"(fedbrain/federated/manifests, a link to k8s/base): build the package from a checkout "
                         f"that has k8s/base (in the image: COPY k8s/base before `pip install .`)")
    kustomization = yaml.safe_load(path.read_text()) or {}
    unknown = sorted(set(kustomization) - KUSTOMIZATION_FIELDS)
    if unknown:
        raise InputError(f"{path}: uses {', '.join(unknown)}, which the kubernetes launcher does not render (it "
                         f"applies {', '.join(sorted(KUSTOMIZATION_FIELDS - {'apiVersion', 'kind'}))} as kustomize "
                         f"does); keep them in an overlay or extend fedbrain/federated/pods.py")
    docs = []
    for resource in kustomization.get("resources", []):
        file = path.parent / resource
        if not file.is_file():
            raise InputError(f"{path}: resource {resource!r} is not a file beside it; the kubernetes launcher "
                             f"renders plain manifest files only")
        docs += [json.loads(json.dumps(doc)) for doc in yaml.safe_load_all(file.read_text()) if doc]
    return kustomization, docs


_NAME = re.compile(r"[a-z0-9]([-a-z0-9.]*[a-z0-9])?")
_INDEX = re.compile(r"(?<=[a-z])-0(?=-|\.|$)")
_PARTITION_ID = re.compile(r"\bpartition-id=0\b")
_PARTITIONS = re.compile(r"\bnum-partitions=\d+\b")


def for_hospital(node: Any, k: int, n: int) -> Any:
    """Hospital 0's object (or part of it) as hospital k's of n: `-0` in names (supernode-0, supernode-0-key,
    hospital-0-data) becomes `-<k>`, the `fedbrain/hospital` label `<k>`, the node config
    `partition-id=<k> num-partitions=<n>`."""
    if isinstance(node, dict):
        return {key: str(k) if key == HOSPITAL_LABEL else for_hospital(value, k, n) for key, value in node.items()}
    if isinstance(node, list):
        return [for_hospital(value, k, n) for value in node]
    if isinstance(node, str):
        if _NAME.fullmatch(node):
            node = _INDEX.sub(f"-{k}", node)
        return _PARTITIONS.sub(f"num-partitions={n}", _PARTITION_ID.sub(f"partition-id={k}", node))
    return node


def per_hospital(docs: list[dict], hospitals: list[int]) -> list[dict]:
    """The base's objects with hospital 0's (label fedbrain/hospital: "0") copied for each hospital, in
    place of the base's own per-hospital objects."""
    if not any(_labels(d).get(HOSPITAL_LABEL) == "0" for d in docs):
        raise InputError(f"the manifests have no object labelled {HOSPITAL_LABEL}: \"0\" to copy for each hospital")
    out: list[dict] = []
    for doc in docs:
        hospital = _labels(doc).get(HOSPITAL_LABEL)
        if hospital is None:
            out.append(doc)
        elif hospital == "0":
            out += [for_hospital(doc, k, len(hospitals)) for k in hospitals]
    return out


def _pod_spec(doc: dict) -> dict | None:
    return doc.get("spec", {}).get("template", {}).get("spec")


def _containers(doc: dict) -> list[dict]:
    spec = _pod_spec(doc) or {}
    return [*spec.get("initContainers", []), *spec.get("containers", [])]


def _repository(image: str) -> str:
    name = image.split("@", 1)[0]
    return name.rsplit(":", 1)[0] if ":" in name.rsplit("/", 1)[-1] else name


def federation_objects(docs: list[dict]) -> list[dict]:
    """What a run creates: the Flower Deployments, and the Services and NetworkPolicies selecting their pods."""
    pods = [d["spec"]["template"]["metadata"].get("labels", {}) for d in docs
            if d["kind"] == "Deployment" and _labels(d).get(COMPONENT_LABEL) == FLOWER]

    def selects(selector: dict) -> bool:
        return bool(selector) and any(selector.items() <= pod.items() for pod in pods)

    return [d for d in docs
            if (d["kind"] in ("Deployment", "Secret") and _labels(d).get(COMPONENT_LABEL) == FLOWER)
            or (d["kind"] == "Service" and selects(d.get("spec", {}).get("selector") or {}))
            or (d["kind"] == "NetworkPolicy" and not d["spec"].get("podSelector", {}).get("matchExpressions")
                and selects(d["spec"].get("podSelector", {}).get("matchLabels") or {}))]


def _clientapp(doc: dict) -> dict:
    found = [c for c in _containers(doc) if "--plugin-type=clientapp" in c.get("args", [])]
    if len(found) != 1:
        raise InputError(f"{doc['metadata']['name']}: {len(found)} containers with --plugin-type=clientapp; "
                         f"expected one")
    return found[0]


def with_paillier_key(docs: list[dict], private_key: bytes) -> list[dict]:
    """The federation with its Paillier private key (the key file's bytes) as the Secret PAILLIER_SECRET,
    mounted read-only at PAILLIER_MOUNT in each SuperNode's ClientApp container, which decrypts (the
    SuperNode container only relays messages and gets the file's path in its node config, as locally).
    Nothing of it goes to the SuperLink's pod: the ServerApp holds the public key only."""
    secret = {"apiVersion": "v1", "kind": "Secret",
              "metadata": {"name": PAILLIER_SECRET, "labels": {"app.kubernetes.io/name": PAILLIER_SECRET,
                                                                COMPONENT_LABEL: FLOWER}},
              "type": "Opaque", "data": {PAILLIER_FILE: base64.b64encode(private_key).decode()}}
    supernodes = [d for d in docs if d["kind"] == "Deployment"
                  and any((c.get("command") or [None])[0] == "flower-supernode" for c in _containers(d))]
    for doc in supernodes:
        _pod_spec(doc).setdefault("volumes", []).append(
            {"name": "paillier", "secret": {"secretName": PAILLIER_SECRET, "defaultMode": 0o440}})
        _clientapp(doc).setdefault("volumeMounts", []).append(
            {"name": "paillier", "mountPath": PAILLIER_MOUNT, "readOnly": True})
        (supernode,) = [c for c in _containers(doc) if (c.get("command") or [None])[0] == "flower-supernode"]
        args = supernode.setdefault("args", [])
        setting = f'{PAILLIER_NODE_CONFIG}="{PAILLIER_MOUNT}/{PAILLIER_FILE}"'
        at = [i for i, arg in enumerate(args) if arg.startswith("--node-config=")]
        if at:
            args[at[0]] += f" {setting}"
        else:
            args.append(f"--node-config={setting}")
    return [*docs, secret]


def render(hospitals: Iterable[int] | int, run_id: str | None = None, namespace: str | None = None,
           image: str | None = None, manifests: Path = MANIFESTS, paillier_key: bytes | None = None) -> list[dict]:
    """Every object of the kustomize base for these hospitals (a count means 0..n-1), as
    `kubectl kustomize` renders the base when they are its own; `run_id` labels what a run creates;
    `paillier_key` (the private key file's bytes) adds its Secret and mounts (`with_paillier_key`)."""
    kustomization, docs = load_base(manifests)
    hospitals = list(range(hospitals)) if isinstance(hospitals, int) else sorted(hospitals)
    if not hospitals:
        raise InputError("no hospitals to render SuperNodes for")
    docs = per_hospital(docs, hospitals)
    if paillier_key is not None:
        docs = with_paillier_key(docs, paillier_key)
    namespace = namespace or kustomization.get("namespace")
    pairs: dict[str, str] = {}
    for entry in kustomization.get("labels", []):
        if entry.get("includeSelectors") or entry.get("includeTemplates"):
            raise InputError("kustomization labels with includeSelectors or includeTemplates are not rendered by "
                             "the kubernetes launcher (the base sets neither); extend fedbrain/federated/pods.py")
        pairs.update(entry.get("pairs", {}))
    for doc in docs:
        if namespace:
            if doc["kind"] == "Namespace":
                doc["metadata"]["name"] = namespace
            elif doc["kind"] not in CLUSTER_SCOPED:
                doc["metadata"]["namespace"] = namespace
        if pairs:
            _labels(doc).update(pairs)
        for container in _containers(doc):
            if image and _repository(container.get("image", "")) == PROJECT_IMAGE:
                container["image"] = image
    if run_id:
        for doc in federation_objects(docs):
            _labels(doc)[RUN_LABEL] = run_id
            if doc["kind"] == "Deployment":
                doc["spec"]["template"]["metadata"].setdefault("labels", {})[RUN_LABEL] = run_id
    return docs


def new_run_id(out: Path) -> str:
    """A label value naming this run: the output folder's name, the time, 4 random hex digits."""
    stem = re.sub(r"[^a-z0-9]+", "-", Path(out).name.lower()).strip("-")[:24] or "run"
    return f"{stem}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"


# --- what a run reads from the rendered objects --------------------------------------------------

def _arg(container: dict, flag: str) -> str | None:
    args = [*container.get("command", []), *container.get("args", [])]
    for i, arg in enumerate(args):
        if arg.startswith(flag + "="):
            return arg.split("=", 1)[1]
        if arg == flag and i + 1 < len(args):
            return args[i + 1]
    return None


class PodFederation:
    """The rendered federation, and what a run needs to know of it: which Deployment is the SuperLink,
    which are the SuperNodes, where the pods keep the CA, the keys, the data, the ServerApp's output and
    the hospitals' personalized models."""

    def __init__(self, docs: list[dict]):
        self.docs = docs
        self.objects = sorted(federation_objects(docs), key=lambda d: CREATED_KINDS.index(d["kind"]))
        deployments = [d for d in self.objects if d["kind"] == "Deployment"]
        self.superlink = self._one([d for d in deployments if self._running(d, "flower-superlink")], "SuperLink")
        self.supernodes = {int(_labels(d)[HOSPITAL_LABEL]): d for d in deployments
                           if self._running(d, "flower-supernode")}
        if not self.supernodes:
            raise InputError("the manifests have no SuperNode Deployment (a container running flower-supernode)")

    @staticmethod
    def _one(found: list[dict], what: str) -> dict:
        if len(found) != 1:
            raise InputError(f"the manifests have {len(found)} {what} Deployments; the kubernetes launcher needs one")
        return found[0]

    @staticmethod
    def _running(doc: dict, command: str) -> bool:
        return any((c.get("command") or [None])[0] == command for c in _containers(doc))

    @staticmethod
    def _container(doc: dict, predicate: Callable[[dict], bool], what: str) -> dict:
        found = [c for c in _containers(doc) if predicate(c)]
        if len(found) != 1:
            raise InputError(f"{doc['metadata']['name']}: {len(found)} containers {what}; expected one")
        return found[0]

    def _mount(self, doc: dict, container: dict, path: str) -> tuple[dict, str]:
        """The pod volume that holds `path` in this container, and the path inside it."""
        mounts = [m for m in container.get("volumeMounts", [])
                  if path == m["mountPath"] or path.startswith(m["mountPath"].rstrip("/") + "/")]
        if not mounts:
            raise InputError(f"{doc['metadata']['name']}/{container['name']}: no volume mounted at {path}")
        mount = max(mounts, key=lambda m: len(m["mountPath"]))
        (volume,) = [v for v in _pod_spec(doc)["volumes"] if v["name"] == mount["name"]]
        return volume, path[len(mount["mountPath"]):].strip("/")

    def _secret_file(self, doc: dict, container: dict, flag: str) -> tuple[str, str]:
        """(Secret, key) of the file a container's `flag` names."""
        path = _arg(container, flag)
        if path is None:
            raise InputError(f"{doc['metadata']['name']}/{container['name']}: no {flag}; the kubernetes launcher "
                             f"runs TLS and SuperNode authentication")
        volume, inside = self._mount(doc, container, path)
        if "secret" not in volume:
            raise InputError(f"{doc['metadata']['name']}: {path} ({flag}) is not from a Secret")
        items = {item["path"]: item["key"] for item in volume["secret"].get("items", [])}
        return volume["secret"]["secretName"], items.get(inside, inside)

    def _supernode(self, k: int) -> tuple[dict, dict]:
        doc = self.supernodes[k]
        return doc, self._container(doc, lambda c: (c.get("command") or [None])[0] == "flower-supernode",
                                    "running flower-supernode")

    @property
    def ca_secret(self) -> tuple[str, str]:
        """The CA the SuperNodes check the SuperLink with: the launcher checks it with the same."""
        return self._secret_file(*self._supernode(min(self.supernodes)), "--root-certificates")

    def key_secret(self, k: int) -> tuple[str, str]:
        """Hospital k's SuperNode private key (Secret, key)."""
        return self._secret_file(*self._supernode(k), "--auth-supernode-private-key")

    @property
    def server_name(self) -> str:
        """The SuperLink's name as the SuperNodes dial it (the name its certificate carries)."""
        address = _arg(self._supernode(min(self.supernodes))[1], "--superlink") or "superlink:9092"
        return address.rsplit(":", 1)[0]

    @property
    def control(self) -> tuple[str, int]:
        """(Service, port) of the SuperLink's Control API."""
        pod = self.superlink["spec"]["template"]["metadata"].get("labels", {})
        for service in (d for d in self.objects if d["kind"] == "Service"):
            if service["spec"].get("selector", {}).items() <= pod.items():
                for port in service["spec"].get("ports", []):
                    if port.get("name") == "control":
                        return service["metadata"]["name"], int(port["port"])
        raise InputError("the manifests have no Service with a port named control selecting the SuperLink")

    @property
    def claims(self) -> list[str]:
        """The PersistentVolumeClaims the federation's pods mount (each hospital's data)."""
        return sorted({v["persistentVolumeClaim"]["claimName"] for d in self.objects if d["kind"] == "Deployment"
                       for v in _pod_spec(d).get("volumes", []) if "persistentVolumeClaim" in v})

    @property
    def serverapp(self) -> tuple[str, str]:
        """(container, output folder) of the ServerApp: a folder on the SuperLink pod's `state` volume."""
        container = self._container(self.superlink, lambda c: "--plugin-type=serverapp" in c.get("args", []),
                                    "with --plugin-type=serverapp")
        mounts = {m["name"]: m["mountPath"] for m in container.get("volumeMounts", [])}
        if "state" not in mounts:
            raise InputError(f"{self.superlink['metadata']['name']}/{container['name']}: no `state` volume to "
                             f"write the ServerApp's output to")
        return container["name"], f"{mounts['state'].rstrip('/')}/out"

    def _clientapp_path(self, volume: str) -> str:
        """Where every hospital's ClientApp mounts `volume`: one path for all (the run config has one)."""
        paths = set()
        for doc in self.supernodes.values():
            paths |= {m["mountPath"] for m in _clientapp(doc).get("volumeMounts", []) if m["name"] == volume}
        if len(paths) != 1:
            raise InputError(f"the SuperNodes' ClientApp containers mount volume `{volume}` at {sorted(paths)}; "
                             f"expected one path for all")
        return paths.pop().rstrip("/")

    @property
    def data_dir(self) -> str:
        """Where every hospital's ClientApp sees its data claim (volume `data`)."""
        return self._clientapp_path("data")

    @property
    def hospital_out(self) -> str:
        """Where every hospital's ClientApp saves its personalized models (volume `out`, of its own pod)."""
        return self._clientapp_path("out")

    def hospital_folder(self, k: int) -> tuple[str, str]:
        """(container, folder) of hospital k's personalized models in its SuperNode pod (personal.save's
        hospital_<k>/ under hospital_out)."""
        return _clientapp(self.supernodes[k])["name"], str(hospital_dir(self.hospital_out, k))

    def run_config(self, config: dict, classes: dict, paillier_public_key: str = "",
                   training_dataset: str = "") -> dict:
        """The local launcher's run config with the paths the pods see: each hospital's claim holds
        processed/ and partition/ (as the stages write them), the ServerApp writes to its `state` volume
        and, having no data, gets classes.json and the training dataset's reference
        (tracking.dataset_reference, computed where the data is) in the config, and the Paillier public
        key's JSON text (the key file's content; "" without encryption) in place of a path to it. Each
        ClientApp saves its personalized models on its own pod's `out` volume (`hospital-out`): `out` is
        the SuperLink pod's, which a SuperNode pod does not have (and its root filesystem is read-only)."""
        return {**config, "processed": f"{self.data_dir}/processed", "partition": f"{self.data_dir}/partition",
                "out": self.serverapp[1], "hospital-out": self.hospital_out, "classes": json.dumps(classes),
                "paillier-public-key": paillier_public_key, "training-dataset": training_dataset,
                # Each pod's TensorFlow sizes its own pools (the launcher sets no thread count there).
                "hospital-threads": 0}

    def selector(self, doc: dict, run_id: str) -> str:
        labels = {**doc["spec"]["selector"]["matchLabels"], RUN_LABEL: run_id}
        return ",".join(f"{k}={v}" for k, v in labels.items())
