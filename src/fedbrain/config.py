"""params.yaml: every tunable of every stage, read in one place."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from fedbrain.errors import InputError

DEFAULT_PARAMS = Path("params.yaml")


def load_params(path: str | Path = DEFAULT_PARAMS) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: params file not found; run from the project root or pass --params")
    try:
        params = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise InputError(f"{path}: not valid YAML ({exc}); fix the file") from exc
    if not isinstance(params, dict):
        raise InputError(f"{path}: expected a mapping of stage sections at the top level")
    return params


def section(params: dict[str, Any], name: str) -> dict[str, Any]:
    value = params.get(name)
    if not isinstance(value, dict):
        raise InputError(f"params.yaml: section '{name}' is missing or not a mapping")
    return value


def get(sec: dict[str, Any], key: str, kind: type | tuple[type, ...], where: str,
        choices: tuple | None = None, default: Any = ...) -> Any:
    """A typed value from a params section; a missing or wrong value names the key."""
    if key not in sec:
        if default is ...:
            raise InputError(f"params.yaml: '{where}.{key}' is missing")
        return default
    value = sec[key]
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or (isinstance(value, bool) and kind in (int, float)):
        names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise InputError(f"params.yaml: '{where}.{key}' is {value!r}; expected {names}")
    if choices is not None and value not in choices:
        raise InputError(f"params.yaml: '{where}.{key}' is {value!r}; expected one of {', '.join(map(str, choices))}")
    return value


def merged(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """`base` with `overrides` laid over it, mapping by mapping (a copy; neither is changed)."""
    out = dict(base)
    for key, value in overrides.items():
        out[key] = merged(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def with_variant(params: dict[str, Any], name: str | None) -> dict[str, Any]:
    """params with federated variant `name`'s overrides (params.yaml `variants.<name>`) applied."""
    if name is None:
        return params
    variants = params.get("variants") or {}
    if name not in variants:
        raise InputError(f"params.yaml: no federated variant {name!r} under 'variants'; "
                         f"defined: {', '.join(variants) or 'none'}")
    overrides = variants[name] or {}
    if not isinstance(overrides, dict):
        raise InputError(f"params.yaml: 'variants.{name}' must be a mapping of params sections to override")
    unknown = sorted(set(overrides) - set(params) - {"privacy"})
    if unknown:
        raise InputError(f"params.yaml: 'variants.{name}' overrides unknown section(s) {', '.join(unknown)}")
    return merged(params, overrides) | {"variant": name}


def pipeline_variants(params: dict[str, Any]) -> list[str]:
    """The federated variants `dvc repro` and the Kubeflow pipeline train (params.yaml
    `pipeline_variants`, each defined under `variants`)."""
    names = params.get("pipeline_variants", list(params.get("variants") or {}))
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise InputError("params.yaml: 'pipeline_variants' must be a list of variant names")
    missing = [n for n in names if n not in (params.get("variants") or {})]
    if missing:
        raise InputError(f"params.yaml: 'pipeline_variants' names {', '.join(missing)}, not defined under 'variants'")
    return names


def with_settings(params: dict[str, Any], settings: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """params with `section.key=value` settings laid over it (values are read as YAML, so
    `federated.rounds=3` is an int and `privacy.mode=example` a string); a copy.

    Only settings params already has can be changed: a misspelt key names the keys it could be."""
    out = merged(params, {})
    for setting in settings:
        dotted, sep, text = setting.partition("=")
        if not sep or not dotted.strip():
            raise InputError(f"setting {setting!r}: expected section.key=value, e.g. federated.rounds=3")
        try:
            value = yaml.safe_load(text) if text.strip() else None
        except yaml.YAMLError as exc:
            raise InputError(f"setting {setting!r}: the value is not valid YAML ({exc})") from exc
        *path, key = dotted.strip().split(".")
        target, where = out, []
        for name in path:
            child = target.get(name)
            if not isinstance(child, dict):
                raise InputError(f"setting {setting!r}: params.yaml has no section '{'.'.join([*where, name])}'; "
                                 f"known here: {', '.join(sorted(target))}")
            target[name] = child = dict(child)
            target, where = child, [*where, name]
        if key not in target:
            raise InputError(f"setting {setting!r}: params.yaml has no '{'.'.join([*where, key])}'; "
                             f"known here: {', '.join(sorted(target))}")
        target[key] = value
    return out
