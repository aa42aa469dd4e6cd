"""The Dockerfile, offline: no Docker engine runs on the development machines, so the image is never built
here. Checked instead: the base image is pinned, the install is the locked dependency set without the test
extra (dependencies in a layer before the source), the user is uid 49999 with HOME /app as the k8s
manifests assume, every COPY source exists and is in the build context .dockerignore leaves, and the image
name agrees across the Dockerfile, components/stages.py and k8s/base."""

from __future__ import annotations

import ast
import json
import os
import re
import shlex
import tomllib
from pathlib import Path

import yaml

from helpers import PROJECT

DOCKERFILE = PROJECT / "Dockerfile"
DOCKERIGNORE = PROJECT / ".dockerignore"
UID = 49999


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order: comments dropped, continuation lines joined."""
    found, pending = [], ""
    for line in DOCKERFILE.read_text().splitlines():
        stripped = line.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if pending and stripped.startswith("#"):  # a comment inside a continued instruction
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        whole = pending + stripped
        pending = ""
        keyword, _, arguments = whole.partition(" ")
        found.append((keyword.upper(), arguments.strip()))
    assert not pending, "the Dockerfile ends inside a continued line"
    return found


def arguments(keyword: str) -> list[str]:
    return [args for key, args in instructions() if key == keyword]


def position(predicate) -> int:
    """The index of the first instruction predicate(keyword, arguments) holds for."""
    matches = [i for i, item in enumerate(instructions()) if predicate(*item)]
    assert matches
    return matches[0]


def pyproject() -> dict:
    return tomllib.loads((PROJECT / "pyproject.toml").read_text())


def base_pod_specs() -> list[dict]:
    specs = []
    for path in sorted((PROJECT / "k8s" / "base").glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc and doc["kind"] == "Deployment":
                specs.append(doc["spec"]["template"]["spec"])
    assert specs
    return specs


def component_image() -> str:
    """components/stages.py IMAGE, read without importing kfp."""
    tree = ast.parse((PROJECT / "components" / "stages.py").read_text())
    (value,) = [node.value for node in tree.body if isinstance(node, ast.Assign)
                and any(isinstance(t, ast.Name) and t.id == "IMAGE" for t in node.targets)]
    return ast.literal_eval(value)


def _pattern(pattern: str) -> re.Pattern:
    """A .dockerignore pattern (Go filepath.Match plus `**`) as a regex over slash-separated paths."""
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out)


def in_build_context(relative: str) -> bool:
    """Whether .dockerignore leaves this path in the build context: the last pattern matching the path or
    one of its parent folders decides, `!` re-includes (Docker's rules)."""
    rules = []
    for line in DOCKERIGNORE.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            negated = line.startswith("!")
            rules.append((negated, _pattern(line.lstrip("!").strip("/"))))
    parts = relative.split("/")
    prefixes = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    included = True
    for negated, regex in rules:
        if any(regex.fullmatch(prefix) for prefix in prefixes):
            included = negated
    return included


def test_dockerignore_helper_follows_dockers_rules():
    assert not in_build_context(".fedbrain/pki/ca.key")
    assert in_build_context("src/fedbrain/cli.py")
    assert not in_build_context("src/fedbrain/__pycache__/cli.cpython-311.pyc")
    assert not in_build_context("__pycache__/x.pyc")
    assert in_build_context("k8s/base/supernodes.yaml")


def test_base_image_is_pinned_and_is_the_projects_python():
    (image,) = arguments("FROM")  # one stage
    image = image.split()[0]
    name, _, digest = image.partition("@")
    repository, _, tag = name.partition(":")
    assert repository == "python"
    assert tag and tag != "latest", f"unpinned base image {image}"
    match = re.fullmatch(r"(\d+)\.(\d+)\.(\d+)-slim-bookworm", tag)
    assert match, f"not an exact Python release tag: {tag}"
    requires = pyproject()["project"]["requires-python"]  # ">=3.11,<3.12"
    assert f">={match[1]}.{match[2]}" in requires and f"<{match[1]}.{int(match[2]) + 1}" in requires
    assert not digest or re.fullmatch(r"sha256:[0-9a-f]{64}", digest)


def test_installs_the_locked_dependency_set_without_the_test_extra():
    runs = arguments("RUN")
    installs = [run for run in runs if "pip install" in run]
    assert installs
    for run in installs:
        for command in run.split("&&"):
            if "pip install" not in command:
                continue
            words = shlex.split(command)
            assert not any("[test]" in w for w in words), command
            packages = [w for w in words[words.index("install") + 1:] if not w.startswith("-")]
            # either constrained by the lock, or only exact pins (pip itself)
            locked = "-c" in words and words[words.index("-c") + 1] == "requirements.lock"
            assert locked or all(re.fullmatch(r"[A-Za-z0-9_.-]+==[0-9][^=]*", p) for p in packages), command
    locked_runs = [i for i, (key, args) in enumerate(instructions())
                   if key == "RUN" and "-c requirements.lock" in args]
    assert len(locked_runs) >= 2  # the dependencies, then the project
    copy_lock = position(lambda key, args: key == "COPY" and "requirements.lock" in args.split())
    copy_source = position(lambda key, args: key == "COPY" and args.split()[0] == "src")
    dependencies = position(lambda key, args: key == "RUN" and "-r dependencies.txt" in args)
    project = position(lambda key, args: key == "RUN" and "--no-deps" in args and "-c requirements.lock" in args)
    # the dependency layer is built from pyproject.toml and the lock only, before the source is copied
    assert copy_lock < dependencies < copy_source < project
    assert "['project']['dependencies']" in instructions()[dependencies][1]


def test_runs_as_uid_49999_with_home_app_as_the_k8s_manifests_assume():
    users = arguments("USER")
    assert users and users[-1].split(":")[0] == str(UID)
    assert users[-1].split(":")[1:] in ([], [str(UID)])
    setup = " ".join(arguments("RUN"))
    assert f"--uid {UID}" in setup and f"--gid {UID}" in setup and "--home-dir /app" in setup
    env = " ".join(arguments("ENV"))
    assert re.search(r"\bHOME=/app\b", env)
    assert arguments("WORKDIR")[-1] == "/app"
    for pod in base_pod_specs():
        assert pod["securityContext"]["runAsUser"] == UID
        assert pod["securityContext"]["runAsGroup"] == UID
        mounts = {m["mountPath"] for c in pod["containers"] for m in c["volumeMounts"]}
        assert "/app/.cache" in mounts  # under the image's HOME


def copies() -> list[tuple[list[str], str]]:
    """(sources, destination) of every COPY and ADD."""
    found = []
    for args in arguments("COPY") + arguments("ADD"):
        words = [w for w in shlex.split(args) if not w.startswith("--")]
        assert not any(w.startswith(("http://", "https://")) for w in words), args
        found.append((words[:-1], words[-1]))
    assert found
    return found


def context_files(path: Path) -> list[Path]:
    """The files and symlinks Docker would copy from a COPY source (symlinks are copied, not followed)."""
    if not path.is_dir() or path.is_symlink():
        return [path]
    found = []
    for folder, dirs, files in os.walk(path):  # does not follow symlinked folders
        dirs[:] = [d for d in dirs if d != "__pycache__" and not d.endswith(".egg-info")]
        here = Path(folder)
        found += [here / name for name in files]
        found += [here / name for name in dirs if (here / name).is_symlink()]
    return found


def test_every_copied_file_exists_and_is_in_the_build_context():
    mirrored = {}  # a source copied to the same relative place under WORKDIR /build
    for sources, destination in copies():
        for source in sources:
            path = PROJECT / source
            assert path.exists(), f"COPY {source}: no such file"
            if os.path.normpath(destination) in (os.path.normpath(source), "."):
                mirrored[os.path.normpath(source)] = path
            files = context_files(path)
            assert files, source
            for file in files:
                relative = file.relative_to(PROJECT).as_posix()
                assert in_build_context(relative), f"COPY {source}: {relative} is left out by .dockerignore"
    # A symlink in a copied folder arrives as a symlink: what it points at must be copied to the same
    # relative place (src/fedbrain/federated/manifests -> ../../../k8s/base), or it dangles in the image.
    for sources, _ in copies():
        for source in sources:
            for link in (f for f in context_files(PROJECT / source) if f.is_symlink()):
                target = Path(os.path.normpath(link.parent / os.readlink(link))).relative_to(PROJECT).as_posix()
                assert any(target == m or target.startswith(m + "/") for m in mirrored), (
                    f"{link.relative_to(PROJECT)} -> {target}: not copied beside it")
                assert in_build_context(target), target
    # what must never reach the build context (private keys, data, local stores, the venv)
    for secret in (".fedbrain/pki/paillier/private.json", "data/sample/README.md", "mlflow.db", ".venv/bin/python",
                   "models/centralized/classifier.keras", ".git/config", "build/mlflow/mlflow.db",
                   "k8s/overlays/production/kustomization.yaml"):
        assert not in_build_context(secret), secret


def test_entry_point_is_the_fedbrain_command():
    assert json.loads(arguments("ENTRYPOINT")[-1]) == ["fedbrain"]
    assert "fedbrain" in pyproject()["project"]["scripts"]


def test_image_name_and_tag_agree_across_dockerfile_components_and_k8s():
    version = pyproject()["project"]["version"]
    image = component_image()
    assert image == f"fedbrain:{version}"
    assert f'org.opencontainers.image.version="{version}"' in " ".join(arguments("LABEL"))
    for pod in base_pod_specs():
        for container in pod["containers"]:
            assert container["image"] == image, container["name"]

