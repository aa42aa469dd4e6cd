"""Flower's own commands without TensorFlow: ``python -m fedbrain.federated.lean <command> [args]``.

Why: the SuperLink, its SuperExec and every SuperNode import ``flwr.server.utils``, whose optional
TensorBoard logger runs ``try: import tensorflow``. TensorFlow is installed beside Flower (the
ClientApp and ServerApp train with it), so each of these processes paid about 2 s and several
hundred MB for a library it never calls (bench/federation_memory.py measures it). A ``None`` entry in
``sys.modules`` makes ``import tensorflow`` raise ModuleNotFoundError, which Flower catches: only its
TensorBoard logger, which fedbrain does not use, is then unavailable. Public Python import
machinery, no Flower function patched. The processes that train (``flwr-serverapp``, the
hospitals' ClientApp runtime) are started by their own names and import TensorFlow as before.
"""

from __future__ import annotations

import sys
from importlib.metadata import entry_points
from pathlib import Path

# Flower's commands a federation starts by name from another Flower process, shadowed by a shim
# (`write_shims`) so they run lean too: the SuperLink starts `flower-superexec` itself.
SHADOWED = ("flower-superexec",)


def block_tensorflow() -> None:
    """From now on `import tensorflow` in this process fails as if it were not installed."""
    if "tensorflow" not in sys.modules:
        sys.modules["tensorflow"] = None


def write_shims(folder: Path, python: str = sys.executable) -> Path:
    """Executables named as Flower's SHADOWED commands that run them through this module; put
    `folder` first on the PATH of the process that starts them."""
    folder.mkdir(parents=True, exist_ok=True)
    for command in SHADOWED:
        shim = folder / command
        shim.write_text(f'#!/bin/sh\nexec "{python}" -m fedbrain.federated.lean {command} "$@"\n')
        shim.chmod(0o755)
    return folder


def main(argv: list[str] | None = None) -> None:
    command, *args = argv if argv is not None else sys.argv[1:]
    scripts = entry_points(group="console_scripts", name=command)
    if not scripts or not command.startswith(("flower-", "flwr-")):
        raise SystemExit(f"fedbrain.federated.lean: {command!r} is not an installed Flower command")
    block_tensorflow()
    sys.argv = [command, *args]  # Flower's commands read their arguments from sys.argv
    sys.exit(next(iter(scripts)).load()())


if __name__ == "__main__":
    main()
