"""The `federated:` section of params.yaml, read and checked in one place."""

from __future__ import annotations

import os
import re
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from fedbrain.config import get, merged, section
from fedbrain.dataset import load_classes
from fedbrain.errors import InputError
from fedbrain.federated.personal import PERSONALIZATION
from fedbrain.federated.update_checks import UpdateRules

ROLES = ("classifier", "segmenter")
# federated.strategy: how a round's updates become the next global model (see StrategySettings).
STRATEGIES = ("fedavg", "fedprox", "fedavgm", "fedadam")
# Where train-federated runs its federation: processes on this machine, or pods (federated/cluster.py).
LAUNCHERS = ("local", "kubernetes")


@dataclass(frozen=True)
class KubernetesSettings:
    """`federated.kubernetes`: the kubernetes launcher's cluster (see the comments in params.yaml)."""

    namespace: str = "fedbrain"
    image: str = "fedbrain:0.1.0"
    control_address: str = "auto"
    tracking_uri: str = "auto"
    ready_timeout: float = 600.0

    @classmethod
    def from_params(cls, sec: dict | None) -> KubernetesSettings:
        where, d, keys = "federated.kubernetes", cls(), [f.name for f in fields(cls)]
        sec = {} if sec is None else sec
        if not isinstance(sec, dict):
            raise InputError(f"params.yaml: '{where}' is {sec!r}; expected a mapping of {', '.join(keys)}")
        unknown = sorted(map(str, set(sec) - set(keys)))
        if unknown:
            raise InputError(f"params.yaml: '{where}' has unknown key(s) {', '.join(unknown)}; "
                             f"known: {', '.join(keys)}")
        settings = cls(**{key: get(sec, key, float if key == "ready_timeout" else str, where,
                                   default=getattr(d, key)) for key in keys})
        settings.check()
        return settings

    def check(self) -> None:
        key = "params.yaml: 'federated.kubernetes."
        if not (len(self.namespace) <= 63 and re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", self.namespace)):
            raise InputError(f"{key}namespace' is {self.namespace!r}; use a Kubernetes namespace name (lower-case "
                             f"letters, digits and '-', at most 63 characters), e.g. fedbrain")
        if not self.image or any(c.isspace() for c in self.image):
            raise InputError(f"{key}image' is {self.image!r}; use the project image every pod runs, e.g. "
                             f"fedbrain:0.1.0 or registry.example.org/fedbrain:0.1.0")
        match = re.fullmatch(r"(\[[0-9a-fA-F:]+\]|[A-Za-z0-9.-]+):([0-9]{1,5})", self.control_address)
        if self.control_address != "auto" and not (match and 0 < int(match[2]) < 65536):
            raise InputError(f"{key}control_address' is {self.control_address!r}; use auto (the superlink "
                             f"Service's DNS name, from a pod in the cluster) or host:port, e.g. 127.0.0.1:9093 "
                             f"with `kubectl -n {self.namespace} port-forward svc/superlink 9093:9093`")
        if self.tracking_uri != "auto" and not re.fullmatch(r"https?://\S+", self.tracking_uri):
            raise InputError(f"{key}tracking_uri' is {self.tracking_uri!r}; use auto (http://mlflow."
                             f"{self.namespace}.svc:5000, the namespace's MLflow server) or an http(s):// URL the "
                             f"pods reach: the ServerApp logs from the cluster, where a local file or SQLite store "
                             f"does not exist")
        if not self.ready_timeout > 0:
            raise InputError(f"{key}ready_timeout' is {self.ready_timeout}; use the seconds to wait for the "
                             f"pods to become ready, more than 0 (e.g. 600)")

    @property
    def tracking(self) -> str:
        """The MLflow server the ServerApp logs to from its pod."""
        return f"http://mlflow.{self.namespace}.svc:5000" if self.tracking_uri == "auto" else self.tracking_uri


@dataclass(frozen=True)
class StrategySettings:
    """`federated.strategy` and its parameters (see the comments in params.yaml).

    fedprox acts at the hospitals (federated/proximal.py), fedavgm and fedadam at the server, on the
    examples-weighted average (federated/server_optimizer.py). The defaults are Flower's own, from
    flwr.serverapp.strategy (FedAvgM: server_learning_rate 1.0; FedAdam: eta 0.1, beta_1 0.9,
    beta_2 0.99, tau 1e-3), except proximal_mu and server_momentum, where Flower's 0.0 is FedAvg
    itself: 0.01 is among Li et al. 2020's values; 0.5 measured better than Hsu et al. 2019's 0.9 on
    the full set at 10 x 5 (0.947 vs 0.919, bench/README)."""

    name: str = "fedavg"
    proximal_mu: float = 0.01            # fedprox
    server_learning_rate: float = 1.0    # fedavgm
    server_momentum: float = 0.5         # fedavgm
    adam_learning_rate: float = 0.1      # fedadam: server_adam.learning_rate (Flower's eta)
    beta_1: float = 0.9
    beta_2: float = 0.99
    tau: float = 1e-3

    @classmethod
    def from_params(cls, sec: dict) -> StrategySettings:
        where, d = "federated", cls()
        adam = get(sec, "server_adam", dict, where, default={}) or {}
        unknown = sorted(map(str, set(adam) - {"learning_rate", "beta_1", "beta_2", "tau"}))
        if unknown:
            raise InputError(f"params.yaml: 'federated.server_adam' has unknown key(s) {', '.join(unknown)}; "
                             f"known: learning_rate, beta_1, beta_2, tau")
        settings = cls(
            name=get(sec, "strategy", str, where, choices=STRATEGIES, default=d.name),
            proximal_mu=get(sec, "proximal_mu", float, where, default=d.proximal_mu),
            server_learning_rate=get(sec, "server_learning_rate", float, where, default=d.server_learning_rate),
            server_momentum=get(sec, "server_momentum", float, where, default=d.server_momentum),
            adam_learning_rate=get(adam, "learning_rate", float, f"{where}.server_adam",
                                   default=d.adam_learning_rate),
            beta_1=get(adam, "beta_1", float, f"{where}.server_adam", default=d.beta_1),
            beta_2=get(adam, "beta_2", float, f"{where}.server_adam", default=d.beta_2),
            tau=get(adam, "tau", float, f"{where}.server_adam", default=d.tau))
        settings.check()
        return settings

    def check(self) -> None:
        key = "params.yaml: 'federated."
        if not self.proximal_mu >= 0:
            raise InputError(f"{key}proximal_mu' is {self.proximal_mu}; use 0 (FedAvg's local training) or more, "
                             f"e.g. 0.01")
        if not self.server_learning_rate > 0:
            raise InputError(f"{key}server_learning_rate' is {self.server_learning_rate}; use more than 0 "
                             f"(1.0: FedAvg's step)")
        if not 0 <= self.server_momentum < 1:
            raise InputError(f"{key}server_momentum' is {self.server_momentum}; use a value in [0, 1), e.g. 0.9")
        if not self.adam_learning_rate > 0:
            raise InputError(f"{key}server_adam.learning_rate' is {self.adam_learning_rate}; use more than 0, "
                             f"e.g. 0.1")
        for name in ("beta_1", "beta_2"):
            if not 0 <= getattr(self, name) < 1:
                raise InputError(f"{key}server_adam.{name}' is {getattr(self, name)}; use a value in [0, 1)")
        if not self.tau > 0:
            raise InputError(f"{key}server_adam.tau' is {self.tau}; use more than 0, e.g. 0.001")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> StrategySettings:
        settings = cls(**values)
        settings.check()
        return settings

    def parameters(self) -> dict:
        """The parameters the chosen strategy uses, by their params.yaml names under `federated`."""
        return {"fedavg": {}, "fedprox": {"proximal_mu": self.proximal_mu},
                "fedavgm": {"server_learning_rate": self.server_learning_rate,
                            "server_momentum": self.server_momentum},
                "fedadam": {"server_adam.learning_rate": self.adam_learning_rate, "server_adam.beta_1": self.beta_1,
                            "server_adam.beta_2": self.beta_2, "server_adam.tau": self.tau}}[self.name]

    def as_params(self, params: dict | None = None) -> dict:
        """MLflow params: the strategy and its parameters, leaving out those `params` sets (the run logs
        params.yaml as written; logging a key again with another spelling, 1 vs 1.0, is an MLflow error)."""
        written = params.get("federated") or {} if params else {}

        def is_written(key: str) -> bool:
            sec = written
            for part in key.split("."):
                if not isinstance(sec, dict) or part not in sec:
                    return False
                sec = sec[part]
            return True

        return {f"federated.{key}": value for key, value in {"strategy": self.name, **self.parameters()}.items()
                if not is_written(key)}


@dataclass(frozen=True)
class FederatedSettings:
    """The `federated:` section of params.yaml (see the comments there)."""

    roles: tuple[str, ...] = ("auto",)
    rounds: int = 10
    local_epochs: int = 5
    fraction_train: float = 1.0
    fraction_evaluate: float = 1.0
    min_train_nodes: int = 2
    min_evaluate_nodes: int = 2
    min_available_nodes: int = 2
    round_timeout: float = 3600.0
    node_wait_timeout: float = 600.0
    state_dir: str = ".fedbrain"
    # Per role (an int in params.yaml applies to both).
    calibration_images: dict = field(default_factory=lambda: {"classifier": 128, "segmenter": 0})
    lr_decay: str = "cosine"
    train: dict = field(default_factory=dict)
    hospital_threads: int | str = "auto"
    launcher: str = "local"
    kubernetes: KubernetesSettings = field(default_factory=KubernetesSettings)
    # min_valid_updates, update_norm_factor, max_update_examples (update_checks.py)
    updates: UpdateRules = field(default_factory=UpdateRules)
    strategy: StrategySettings = field(default_factory=StrategySettings)
    # none | fedbn | local_head: layers each hospital keeps as its own (personal.py).
    personalization: str = "none"

    @classmethod
    def from_params(cls, params: dict) -> FederatedSettings:
        sec, where = section(params, "federated"), "federated"
        d = cls()
        roles = get(sec, "roles", (str, list), where, default="auto")
        roles = tuple([roles] if isinstance(roles, str) else roles)
        for role in roles:
            if role not in ("auto", *ROLES):
                raise InputError(f"params.yaml: 'federated.roles' has {role!r}; use auto, classifier or segmenter")
        settings = cls(
            roles=roles,
            rounds=get(sec, "rounds", int, where),
            local_epochs=get(sec, "local_epochs", int, where),
            fraction_train=get(sec, "fraction_train", float, where, default=d.fraction_train),
            fraction_evaluate=get(sec, "fraction_evaluate", float, where, default=d.fraction_evaluate),
            min_train_nodes=get(sec, "min_train_nodes", int, where, default=d.min_train_nodes),
            min_evaluate_nodes=get(sec, "min_evaluate_nodes", int, where, default=d.min_evaluate_nodes),
            min_available_nodes=get(sec, "min_available_nodes", int, where, default=d.min_available_nodes),
            round_timeout=get(sec, "round_timeout", float, where, default=d.round_timeout),
            node_wait_timeout=get(sec, "node_wait_timeout", float, where, default=d.node_wait_timeout),
            state_dir=get(sec, "state_dir", str, where, default=d.state_dir),
            calibration_images=_per_role(get(sec, "calibration_images", (int, dict), where,
                                             default=d.calibration_images), d.calibration_images),
            lr_decay=get(sec, "lr_decay", str, where, choices=("cosine", "none"), default=d.lr_decay),
            train=get(sec, "train", dict, where, default={}) or {},
            hospital_threads=get(sec, "hospital_threads", (int, str), where, default=d.hospital_threads),
            launcher=get(sec, "launcher", str, where, choices=LAUNCHERS, default=d.launcher),
            kubernetes=KubernetesSettings.from_params(sec.get("kubernetes")),
            updates=update_rules(params),
            strategy=StrategySettings.from_params(sec),
            personalization=get(sec, "personalization", str, where, choices=PERSONALIZATION,
                                default=d.personalization),
        )
        settings.check()
        return settings

    def check(self) -> None:
        for role, images in self.calibration_images.items():
            if role not in ROLES:
                raise InputError(f"params.yaml: 'federated.calibration_images' has {role!r}; "
                                 f"use {' and '.join(ROLES)}")
            if not isinstance(images, int) or isinstance(images, bool) or images < 0:
                raise InputError(f"params.yaml: 'federated.calibration_images.{role}' is {images!r}; "
                                 f"use 0 (all) or more")
        for role in ROLES:
            if not isinstance(self.train.get(role) or {}, dict):
                raise InputError(f"params.yaml: 'federated.train.{role}' is {self.train[role]!r}; expected a "
                                 f"mapping of train.{role} keys the hospitals train with instead")
        threads = self.hospital_threads
        if threads != "auto" and (not isinstance(threads, int) or isinstance(threads, bool) or threads < 1):
            raise InputError(f"params.yaml: 'federated.hospital_threads' is {threads!r}; use auto or a whole "
                             f"number of threads, 1 or more")
        for key in ("rounds", "local_epochs", "min_train_nodes", "min_available_nodes"):
            if getattr(self, key) < 1:
                raise InputError(f"params.yaml: 'federated.{key}' is {getattr(self, key)}; use 1 or more")
        for key in ("fraction_train", "fraction_evaluate"):
            if not 0.0 <= getattr(self, key) <= 1.0:
                raise InputError(f"params.yaml: 'federated.{key}' is {getattr(self, key)}; use a fraction in [0, 1]")

    def threads_per_hospital(self, hospitals: int) -> int:
        """TensorFlow's thread pools in each hospital's ClientApp process. Each TensorFlow process sizes
        its pools to every core; with several hospitals training at once on a shared machine, that
        oversubscribes the cores. 'auto': the cores shared among the hospitals, at least 1."""
        if self.hospital_threads == "auto":
            return max(1, (os.cpu_count() or 1) // max(1, hospitals))
        return int(self.hospital_threads)

    def resolve_roles(self, processed: Path) -> list[str]:
        """'auto': the classifier, and the segmenter too when the data has masks (as centralized)."""
        has_masks = bool(load_classes(processed).get("has_masks"))
        roles: list[str] = []
        for role in self.roles:
            wanted = (["classifier", "segmenter"] if has_masks else ["classifier"]) if role == "auto" else [role]
            roles += [r for r in wanted if r not in roles]
        if "segmenter" in roles and not has_masks:
            raise InputError(f"{processed}: no masks.npy, so federated.roles cannot include segmenter; "
                             f"use classifier or a dataset with masks")
        return roles

    def hospital_training(self, params: dict, role: str) -> dict:
        """What each hospital passes to fedbrain.train.fit: train.<role>, then federated.train's keys for
        every role on top, then federated.train.<role>'s for this one (a role's own rate, say)."""
        shared = {key: value for key, value in self.train.items() if key not in ROLES}
        return merged(merged(section(section(params, "train"), role), shared), self.train.get(role) or {})


def update_rules(params: dict) -> UpdateRules:
    """The checks on the hospitals' updates from params.yaml's `federated` section (defaults for the
    keys it lacks). The ServerApp reads them from the run's params, as the stage did."""
    sec, where, d = params.get("federated") or {}, "federated", UpdateRules()
    if not isinstance(sec, dict):
        raise InputError(f"params.yaml: 'federated' is {sec!r}; expected a mapping")
    rules = UpdateRules(
        min_valid_updates=get(sec, "min_valid_updates", int, where, default=d.min_valid_updates),
        norm_factor=get(sec, "update_norm_factor", float, where, default=d.norm_factor),
        max_examples=sec.get("max_update_examples", d.max_examples))
    rules.check()
    return rules


def _per_role(value: int | dict, defaults: dict) -> dict:
    """{role: value} from one value for every role or a mapping of some (the rest: defaults)."""
    return {role: value for role in ROLES} if isinstance(value, int) else {**defaults, **value}
