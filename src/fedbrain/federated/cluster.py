"""The train-federated stage's federation as Kubernetes pods (params.yaml `federated.launcher: kubernetes`).

`launcher.run` hands over to `run` here after its own checks. One run:
1. renders the objects of k8s/base for the partition's hospitals (`pods.render`, pure: see pods.py),
   labelled `fedbrain/run: <run id>` on every object the run creates (and on its pods);
2. creates nothing until what it needs and does not create is there (`ClusterRun.check`): the CA and
   each hospital's key (read from the Secrets the pods mount: the keys registered are exactly the ones
   the SuperNodes sign with), each hospital's data claim, and no federation object left by another run;
3. creates the federation through the official `kubernetes` client: the Deployments labelled
   `app.kubernetes.io/component: flower` (the SuperLink, one SuperNode per hospital) and the Services and
   NetworkPolicies that select their pods, and with `federated.secure_aggregation: paillier` the run's
   Secret `paillier-private-key` (the federation's Paillier key pair is made or reused in
   state_dir/pki/paillier/ as the local launcher does; the Secret is mounted only in the SuperNodes'
   ClientApp containers, the ServerApp gets the public key in its run config). The Namespace, the MLflow
   server, the data claims, the TLS and SuperNode key Secrets and the namespace-wide default-deny policy
   are long-lived: rendered, never created here;
4. waits for the SuperLink (readyReplicas == replicas), registers the SuperNodes' public keys through
   its Control API, then waits for the SuperNodes (an unregistered SuperNode only retries);
5. per role, submits the Flower app with the local launcher's run config (`launcher.run_config`), its
   paths the ones the pods see (`PodFederation.run_config`), and streams the ServerApp's log to the end;
6. copies the ServerApp's output folder out of its container (the SuperLink pod's `state` volume,
   through the exec API, as `kubectl cp` does) into `out`: the same files the local launcher leaves there
   (<role>.keras and its card, history.json, checkpoints/, audit/), and with personalization each
   hospital's hospital_<k>/ out of its SuperNode pod's `out` volume, where its ClientApp saved its
   personalized models, into out/hospital_<k>/. The ServerApp also logs the run to the namespace's MLflow
   server (`federated.kubernetes.tracking_uri`), as it logs locally;
7. deletes every object labelled with the run id whatever happened (try/finally; SIGTERM becomes
   KeyboardInterrupt), and reports what it could not delete without raising over the run's own error.

The Control API is reached at `superlink.<namespace>.svc:9093` from a pod in the cluster (k8s/base's
network policy admits pods of the namespace labelled `fedbrain/flower-control: "true"`), or at the
address in `federated.kubernetes.control_address` from outside (e.g. a `kubectl port-forward` started
once the SuperLink is ready: registration retries until `ready_timeout`). Either way the SuperLink's
certificate is checked against `superlink`, the name the SuperNodes dial.

One federation per namespace at a time: the objects keep k8s/base's names (the SuperNodes dial
`superlink`, the certificate names it), so a second run, or a standing federation made with
`kubectl apply -k`, is refused before anything is created, naming what to delete.

The launcher's identity (kubeconfig user, or the pod's service account) needs, in the namespace: create,
get, list and delete on deployments, services and networkpolicies; get on secrets and
persistentvolumeclaims; list on pods; create on pods/exec; with paillier also create, list and delete on
secrets.
"""

from __future__ import annotations

import base64
import json
import shutil
import signal
import tarfile
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kubernetes.client.exceptions import ApiException

from fedbrain.config import merged
from fedbrain.dataset import hospital_dir
from fedbrain.errors import InputError
from fedbrain.federated.kube_api import Cluster
from fedbrain.federated.pods import CREATED_KINDS, RUN_LABEL, PodFederation, new_run_id, render
from fedbrain.federated.settings import FederatedSettings, KubernetesSettings

APP_TEMPLATE = Path(__file__).parent / "app"
POLL_S = 2.0
PROGRESS_S = 30.0
# A folder comes out of a container (the ServerApp's output, a hospital's personalized models) in pieces
# of this size: each exec's output is held in memory (base64 text, by the client's stream and by us), and
# the ServerApp's output holds every round's model.
CHUNK_BYTES = 16 * 2**20
# Run in the container with the image's Python (it may have no tar): pack the folder into one file beside
# it and print its size, -1 when there is no such folder (a clearer error than a traceback); then print a
# piece of it, base64 (the exec API's text stream carries that unchanged).
PACK_SCRIPT = ("import os, sys, tarfile\n"
               "if os.path.isdir(sys.argv[1]):\n"
               "    with tarfile.open(sys.argv[2], 'w') as tar:\n"
               "        tar.add(sys.argv[1], arcname='.')\n"
               "print(os.path.getsize(sys.argv[2]) if os.path.isdir(sys.argv[1]) else -1)\n")
CHUNK_SCRIPT = ("import base64, sys\n"
                "with open(sys.argv[1], 'rb') as archive:\n"
                "    archive.seek(int(sys.argv[2]))\n"
                "    sys.stdout.write(base64.b64encode(archive.read(int(sys.argv[3]))).decode())\n")


# --- what a run checks first ---------------------------------------------------------------------

def control_address(settings: KubernetesSettings, federation: PodFederation, in_cluster: bool) -> str:
    """Where the launcher reaches the SuperLink's Control API."""
    if settings.control_address != "auto":
        return settings.control_address
    service, port = federation.control
    if not in_cluster:
        raise InputError(f"params.yaml: 'federated.kubernetes.control_address' is auto, which only a pod in the "
                         f"cluster reaches ({service}.{settings.namespace}.svc:{port}). From outside the cluster "
                         f"set it to host:port, e.g. 127.0.0.1:{port}, and forward the port once the launcher "
                         f"prints 'SuperLink ready': kubectl -n {settings.namespace} port-forward "
                         f"svc/{service} {port}:{port}")
    return f"{service}.{settings.namespace}.svc:{port}"


def check_supported(params: dict, resume: bool, insecure: bool) -> None:
    """What the local launcher does and this one does not yet."""
    if insecure:
        raise InputError("--insecure: federated.launcher kubernetes runs k8s/base, where TLS and SuperNode "
                         "authentication are always on; debug without them with federated.launcher: local")
    if resume:
        raise InputError("--resume: not yet with federated.launcher: kubernetes (the checkpoints would have to be "
                         "copied into the ServerApp's pod first); run again without --resume, or run locally")


def public_key(private: bytes) -> bytes:
    """The OpenSSH public key of a SuperNode's private key (OpenSSH or PEM), as `flwr supernode register` reads."""
    from cryptography.hazmat.primitives import serialization

    loader = serialization.load_ssh_private_key if b"OPENSSH" in private else serialization.load_pem_private_key
    key = loader(private, password=None)
    return key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH) + b"\n"


# --- one run -------------------------------------------------------------------------------------

def _unavailable(exc: BaseException) -> bool:
    """A gRPC error saying nobody answers (yet): a Service without endpoints, a port-forward not started."""
    code = getattr(exc, "code", None)
    return callable(code) and getattr(code(), "name", "") == "UNAVAILABLE"


def _control(address: str, ca: Path, server_name: str):
    from fedbrain.federated.control import Control

    return Control(address, ca, server_name=server_name)


class ClusterRun:
    """One train-federated run's federation on the cluster: `execute` creates, waits, runs each role,
    collects the output and deletes what it created (see the module's docstring)."""

    def __init__(self, cluster: Cluster, docs: list[dict], run_id: str, settings: KubernetesSettings, workdir: Path,
                 echo: Callable[[str], None] = print, control_factory: Callable = _control,
                 clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] = time.sleep,
                 poll_s: float = POLL_S, chunk_bytes: int = CHUNK_BYTES):
        self.cluster, self.run_id, self.settings, self.echo = cluster, run_id, settings, echo
        self.federation = PodFederation(docs)
        self.workdir, self.logs, self.app_dir = Path(workdir), Path(workdir) / "logs", Path(workdir) / "app"
        self.control_factory, self.clock, self.sleep, self.poll_s = control_factory, clock, sleep, poll_s
        self.chunk_bytes = chunk_bytes
        self.created: list[tuple[str, str]] = []
        self.attempted = False  # a create was sent: from here on, clean up
        self.control = None

    def execute(self, configs: dict[str, dict], out: Path) -> dict[str, str]:
        """Run each role's config ({role: run config}) on a fresh federation; {role: final status}."""
        statuses: dict[str, str] = {}
        try:
            address = control_address(self.settings, self.federation, self.cluster.in_cluster)
            ca, keys = self.check()
            self.create()
            self.wait_ready([self.federation.superlink["metadata"]["name"]], "SuperLink")
            self.echo(f"kubernetes: registering the SuperNodes' keys through the Control API at {address}")
            self.connect(address, ca)
            self.register(keys)
            self.wait_ready([d["metadata"]["name"] for d in self.federation.supernodes.values()],
                            f"{len(keys)} SuperNodes")
            for role, config in configs.items():
                statuses[role], flower_run = self.run_role(role, config)
                # A failed run's hospitals may have saved nothing: its own error is the one to report.
                self.collect(Path(out), hospitals=statuses[role] == "finished:completed"
                             and config.get("personalization", "none") != "none")
                if statuses[role] != "finished:completed":
                    raise RuntimeError(f"federated {role} run {flower_run} ended as {statuses[role]}; its ServerApp "
                                       f"log is in {self.logs / f'serverapp_{flower_run}.log'}")
        finally:
            if self.control is not None:
                try:
                    self.control.close()
                except Exception as exc:  # noqa: BLE001 - cleanup goes on
                    self.echo(f"kubernetes: closing the Control API channel failed: {exc}")
            if self.attempted:
                self.delete()
        return statuses

    # before anything is created
    def check(self) -> tuple[bytes, dict[int, bytes]]:
        """The CA and each hospital's public key from the Secrets the pods mount; refuses to start when a
        Secret or data claim is missing or a federation object exists already."""
        ns, missing = self.settings.namespace, []
        ca_name, ca_key = self.federation.ca_secret
        ca = self.cluster.secret(ca_name, ca_key)
        if ca is None:
            missing.append(f"secret {ca_name} (key {ca_key}): the federation's CA certificate")
        keys: dict[int, bytes] = {}
        for k in sorted(self.federation.supernodes):
            name, key = self.federation.key_secret(k)
            private = self.cluster.secret(name, key)
            if private is None:
                missing.append(f"secret {name} (key {key}): hospital {k}'s SuperNode private key")
                continue
            try:
                keys[k] = public_key(private)
            except (ValueError, TypeError) as exc:
                missing.append(f"secret {name} (key {key}): not an OpenSSH or PEM private key ({exc})")
        missing += [f"persistentvolumeclaim {claim}: a hospital's data (k8s/base/hospital-data.yaml)"
                    for claim in self.federation.claims if self.cluster.read("PersistentVolumeClaim", claim) is None]
        if missing:
            raise InputError(f"namespace {ns} lacks what the run needs and does not create:\n  - "
                             + "\n  - ".join(missing) + "\nsee k8s/README.md (the secrets, made from the federation's "
                             "PKI) and k8s/base/hospital-data.yaml (one claim per hospital, holding its data)")
        found = []
        for doc in self.federation.objects:
            existing = self.cluster.read(doc["kind"], doc["metadata"]["name"])
            if existing is not None:
                owner = ((existing.metadata.labels or {}).get(RUN_LABEL) if existing.metadata else None)
                found.append((f"{doc['kind'].lower()}/{doc['metadata']['name']}", owner))
        if found:
            owners = sorted({owner for _, owner in found if owner})
            raise InputError(f"namespace {ns} already has {', '.join(name for name, _ in found)} ("
                             + (f"left by run(s) {', '.join(owners)}" if owners else "not made by a run: "
                                "e.g. `kubectl apply -k`") + "); one federation runs per namespace. If none is "
                             f"running, delete them: kubectl -n {ns} delete {' '.join(name for name, _ in found)}")
        return ca, keys

    def create(self) -> None:
        for doc in self.federation.objects:
            kind, name = doc["kind"], doc["metadata"]["name"]
            self.attempted = True
            try:
                self.cluster.create(doc)
            except ApiException as exc:
                if exc.status == 409:
                    raise InputError(f"namespace {self.settings.namespace}: {kind.lower()}/{name} appeared meanwhile "
                                     f"(another run?); nothing of it was changed") from exc
                raise
            self.created.append((kind, name))
        self.echo(f"kubernetes: created {', '.join(f'{k.lower()}/{n}' for k, n in self.created)} in namespace "
                  f"{self.settings.namespace} (label {RUN_LABEL}={self.run_id})")

    def wait_ready(self, names: list[str], what: str) -> None:
        """Poll the Deployments until each has readyReplicas == replicas, printing progress; TimeoutError
        after ready_timeout, with what the pods report (image pulls, scheduling, crashes)."""
        start = self.clock()
        last, printed = None, start
        while True:
            state = {}
            for name in names:
                deployment = self.cluster.read("Deployment", name)
                if deployment is None:
                    raise RuntimeError(f"kubernetes: deployment/{name} is gone (deleted by someone else?)")
                want = deployment.spec.replicas if deployment.spec.replicas is not None else 1
                status = deployment.status
                generation = deployment.metadata.generation or 0
                current = status is not None and (status.observed_generation or 0) >= generation
                state[name] = ((status.ready_replicas or 0) if current else 0, want)
            pending = [name for name, (ready, want) in state.items() if ready < want]
            elapsed = self.clock() - start
            if not pending:
                self.echo(f"kubernetes: {what} ready ({elapsed:.0f} s)")
                return
            summary = ", ".join(f"{name} {ready}/{want}" for name, (ready, want) in state.items())
            if summary != last or self.clock() - printed >= PROGRESS_S:
                self.echo(f"kubernetes: waiting for {what} ({elapsed:.0f} s): {summary}")
                last, printed = summary, self.clock()
            if elapsed >= self.settings.ready_timeout:
                problems = self.pod_problems()
                raise TimeoutError(f"kubernetes: {what} not ready after {self.settings.ready_timeout:.0f} s "
                                   f"(federated.kubernetes.ready_timeout): {summary}; "
                                   f"{'; '.join(problems) or 'no pod reports a problem'}; see kubectl -n "
                                   f"{self.settings.namespace} describe pods -l {RUN_LABEL}={self.run_id}")
            self.sleep(self.poll_s)

    def pod_problems(self) -> list[str]:
        problems = []
        try:
            pods = self.cluster.list("Pod", f"{RUN_LABEL}={self.run_id}")
        except Exception as exc:  # noqa: BLE001 - a diagnosis only
            return [f"pods not listed ({exc})"]
        for pod in pods:
            name, status = pod.metadata.name, pod.status
            if status is None:
                continue
            for condition in status.conditions or []:
                if condition.type == "PodScheduled" and condition.status == "False":
                    problems.append(f"{name}: not scheduled ({condition.reason}: {condition.message})")
            for container in [*(status.init_container_statuses or []), *(status.container_statuses or [])]:
                waiting = container.state.waiting if container.state else None
                if waiting is not None and waiting.reason:
                    problems.append(f"{name}/{container.name}: {waiting.reason}"
                                    + (f" ({waiting.message})" if waiting.message else ""))
                elif container.restart_count:
                    problems.append(f"{name}/{container.name}: restarted {container.restart_count} times")
        return problems

    # the SuperLink's Control API
    def connect(self, address: str, ca: bytes) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        (self.workdir / "ca.crt").write_bytes(ca)
        self.control = self.control_factory(address, self.workdir / "ca.crt", self.federation.server_name)
        self.app_dir.mkdir(parents=True, exist_ok=True)
        # A bundle needs a file besides pyproject.toml (flwr 1.23 rejects an empty CONTENT list).
        for name in ("pyproject.toml", "README.md"):
            shutil.copyfile(APP_TEMPLATE / name, self.app_dir / name)

    def _retry(self, call: Callable[[], Any]) -> Any:
        """`call`, again while the Control API is unavailable (no Service endpoints yet, a port-forward not
        started), for up to ready_timeout."""
        deadline = self.clock() + self.settings.ready_timeout
        while True:
            try:
                return call()
            except Exception as exc:
                if not _unavailable(exc) or self.clock() >= deadline:
                    raise
                self.sleep(self.poll_s)

    def register(self, keys: dict[int, bytes]) -> None:
        folder = self.workdir / "keys"
        folder.mkdir(parents=True, exist_ok=True)
        nodes = {}
        for k, public in keys.items():
            path = folder / f"hospital_{k}.pub"
            path.write_bytes(public)
            nodes[k] = self._retry(lambda path=path: self.control.register_node(path))
        self.echo(f"kubernetes: SuperNode keys registered (hospital: node id {nodes})")

    def run_role(self, role: str, config: dict) -> tuple[str, int]:
        """Submit one role's run, stream its ServerApp log until it ends: (final status, Flower run id)."""
        self.logs.mkdir(parents=True, exist_ok=True)
        (self.workdir / f"run_config_{role}.json").write_text(json.dumps(config, indent=2))  # for the record
        clock = self.clock()
        flower_run = self.control.start_run(self.app_dir, config)
        self.echo(f"kubernetes: {role} run {flower_run} started")
        errors: list[BaseException] = []

        def pump() -> None:
            with (self.logs / f"serverapp_{flower_run}.log").open("a") as log:
                def line(text: str) -> None:
                    log.write(text + "\n")
                    log.flush()
                    self.echo(text)
                try:
                    self.control.stream_logs(flower_run, line)
                except BaseException as exc:  # noqa: BLE001 - reported below, not lost in the thread
                    errors.append(exc)

        thread = threading.Thread(target=pump, name=f"run-{flower_run}-log", daemon=True)
        thread.start()
        while thread.is_alive():  # join with a timeout: Ctrl-C and SIGTERM reach this thread promptly
            thread.join(timeout=0.5)
        if errors:
            self.echo(f"kubernetes: the log stream broke off ({errors[0]}); asking for the run's status")
        status = self.control.status(flower_run)
        while not status.startswith("finished"):
            self.sleep(self.poll_s)
            status = self.control.status(flower_run)
        self.echo(f"kubernetes: {role} run {flower_run} {status} ({self.clock() - clock:.1f} s)")
        return status, flower_run

    def collect(self, out: Path, hospitals: bool = False) -> None:
        """Copy the ServerApp's output folder from its container into `out`, and with `hospitals` each
        hospital's personalized models from its SuperNode pod into out/hospital_<k>/."""
        self._copy(self.federation.superlink, *self.federation.serverapp, out, "SuperLink")
        if hospitals:
            # A hospital the last evaluation did not sample (fraction_evaluate < 1) saved no model:
            # the run is still good, as with the local launcher, so a missing folder is a warning.
            for k, doc in sorted(self.federation.supernodes.items()):
                self._copy(doc, *self.federation.hospital_folder(k), hospital_dir(out, k),
                           f"hospital {k}'s SuperNode", missing_ok=True)

    def _copy(self, deployment: dict, container: str, folder: str, out: Path, what: str,
              missing_ok: bool = False) -> None:
        """A folder of a container of the Deployment's running pod into `out` (packed, in chunk_bytes pieces)."""
        selector = self.federation.selector(deployment, self.run_id)
        running = [p.metadata.name for p in self.cluster.list("Pod", selector)
                   if p.status is not None and p.status.phase == "Running"]
        if not running:
            raise RuntimeError(f"kubernetes: no running {what} pod ({selector}) to copy {folder} from")
        pod, archive = running[0], f"{folder}.tar"
        size = int(self.cluster.exec(pod, container, ["python3", "-c", PACK_SCRIPT, folder, archive]).strip())
        if size < 0:
            missing = (f"kubernetes: {what} pod {pod} has no {folder} to copy into {out}; see its log: "
                       f"kubectl -n {self.settings.namespace} logs {pod} -c {container}")
            if not missing_ok:
                raise RuntimeError(missing)
            self.echo(f"WARNING: {missing}")
            return
        with tempfile.TemporaryFile() as local:
            for offset in range(0, size, self.chunk_bytes):
                local.write(base64.b64decode(self.cluster.exec(
                    pod, container, ["python3", "-c", CHUNK_SCRIPT, archive, str(offset), str(self.chunk_bytes)])))
            if local.tell() != size:
                raise RuntimeError(f"kubernetes: copied {local.tell()} of {pod}:{archive}'s {size} bytes")
            local.seek(0)
            out.mkdir(parents=True, exist_ok=True)
            with tarfile.open(fileobj=local, mode="r:") as tar:
                files = [m for m in tar.getmembers() if m.isfile()]
                tar.extractall(out, filter="data")
        self.echo(f"kubernetes: copied {len(files)} files ({size / 1e6:.1f} MB) from {pod}:{folder} to {out}")

    def delete(self) -> list[str]:
        """Delete every object labelled with the run id (and any this run recorded); errors are printed
        and returned, never raised: they must not hide the run's own error."""
        problems, deleted = [], []
        for kind in reversed(CREATED_KINDS):
            names = {name for k, name in self.created if k == kind}
            try:
                names |= {o.metadata.name for o in self.cluster.list(kind, f"{RUN_LABEL}={self.run_id}")}
            except Exception as exc:  # noqa: BLE001
                problems.append(f"listing {kind.lower()}s labelled {RUN_LABEL}={self.run_id}: {exc}")
            for name in sorted(names):
                try:
                    if self.cluster.delete(kind, name):
                        deleted.append(f"{kind.lower()}/{name}")
                except Exception as exc:  # noqa: BLE001
                    problems.append(f"deleting {kind.lower()}/{name}: {exc}")
        self.echo(f"kubernetes: deleted {', '.join(deleted) or 'nothing'}")
        if problems:
            self.echo(f"kubernetes: WARNING, cleanup incomplete: {'; '.join(problems)}. Delete what is left with "
                      f"kubectl -n {self.settings.namespace} delete deployment,service,networkpolicy,secret "
                      f"-l {RUN_LABEL}={self.run_id}")
        return problems


# --- the stage -----------------------------------------------------------------------------------

def cluster_params(params: dict, settings: KubernetesSettings) -> dict:
    """params as the ServerApp's pod uses them: MLflow at the namespace's server, its default artifact root."""
    params = merged(params, {"mlflow": {"tracking_uri": settings.tracking}})
    params["mlflow"].pop("artifact_location", None)  # a local folder; the server keeps the artifacts
    return params


def run(params: dict, settings: FederatedSettings, roles: list[str], hospitals: list[int], processed: Path,
        partition: Path, out: Path, *, resume: bool = False, insecure: bool = False,
        echo: Callable[[str], None] = print, cluster: Cluster | None = None,
        control_factory: Callable = _control) -> dict:
    """launcher.run for federated.launcher kubernetes, after launcher.prepare's checks: {role: history}."""
    from fedbrain import tracking
    from fedbrain.dataset import load_classes
    from fedbrain.federated.launcher import _raise_on_sigterm, paillier_keys, run_config  # imports Flower

    check_supported(params, resume=resume, insecure=insecure)
    k8s = settings.kubernetes
    run_id = new_run_id(out)
    state = Path(settings.state_dir).resolve()
    # The local launcher's key pair (state_dir/pki/paillier/): the private key file goes into the run's
    # Secret for the SuperNodes' ClientApps, the public key's text into the ServerApp's run config.
    public, private = paillier_keys(state, params, echo)
    docs = render(hospitals, run_id, namespace=k8s.namespace, image=k8s.image,
                  paillier_key=private.read_bytes() if private else None)
    federation = PodFederation(docs)
    workdir = state / "federation" / out.name
    shutil.rmtree(workdir, ignore_errors=True)  # the previous run's logs
    out.mkdir(parents=True, exist_ok=True)
    (out / "history.json").unlink(missing_ok=True)
    pod_params, classes = cluster_params(params, k8s), load_classes(processed)
    # The ServerApp's pod has no data: the lineage digest is computed here, where the stages wrote it.
    dataset = tracking.dataset_reference(tracking.training_dataset(params, processed, partition))
    configs = {role: federation.run_config(run_config(settings, pod_params, role, processed, partition, out,
                                                      resume=False, secure=True), classes,
                                          public.read_text() if public else "", dataset) for role in roles}
    cluster = cluster or Cluster.connect(k8s.namespace)
    echo(f"kubernetes: run {run_id} in namespace {k8s.namespace}: hospitals {hospitals}, image {k8s.image}, "
         f"{settings.rounds} rounds of {settings.local_epochs} local epochs, roles {roles}; MLflow {k8s.tracking}; "
         f"logs in {workdir / 'logs'}")
    previous = _raise_on_sigterm()
    try:
        statuses = ClusterRun(cluster, docs, run_id, k8s, workdir, echo, control_factory).execute(configs, out)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    history = json.loads((out / "history.json").read_text())
    echo(f"kubernetes: {', '.join(f'{r} {s}' for r, s in statuses.items())}; global models in {out}")
    return history
