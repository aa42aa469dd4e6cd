# syntax=docker/dockerfile:1
# The project image, fedbrain:0.1.0: the `fedbrain` library and command line with the locked dependency
# set (TensorFlow, Flower, MLflow, kfp, ...), for the Kubeflow components (components/stages.py IMAGE) and
# the pods in k8s/ (SuperLink, SuperNodes, their SuperExec side-cars, MLflow), which override the command.
#
# NOT BUILT HERE: the development machines have no Docker engine, so this file has never been built or
# run; tests/code/test_dockerfile.py checks offline what can be checked (pinned base, lock, user, COPY
# sources, agreement with k8s/ and components/). Build at the repository root:
#   docker build -t fedbrain:0.1.0 .
#   kind load docker-image fedbrain:0.1.0                  # k8s/overlays/local
#   docker tag fedbrain:0.1.0 registry.example.org/fedbrain:0.1.0 && docker push ...   # k8s/overlays/production

# Python 3.11.7, the interpreter requirements.lock was resolved and tested with, on Debian 12 slim: an
# exact tag. Pin the digest too on first build (no registry is reachable from the development machines):
#   docker buildx imagetools inspect python:3.11.7-slim-bookworm   -> FROM python:3.11.7-slim-bookworm@sha256:<digest>
FROM python:3.11.7-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    TF_CPP_MIN_LOG_LEVEL=3 \
    VIRTUAL_ENV=/opt/fedbrain \
    PATH=/opt/fedbrain/bin:$PATH

# User `app`, uid/gid 49999, HOME /app, as Flower's own images: k8s/ runs every pod as runAsUser 49999
# with a read-only root filesystem and emptyDirs at /app/.cache, /app/.flwr, /app/.config.
RUN groupadd --system --gid 49999 app \
 && useradd --system --uid 49999 --gid 49999 --home-dir /app --create-home --shell /usr/sbin/nologin app

# A virtual environment on PATH: the SuperLink and SuperNodes start `flower-superexec` by name.
# pip pinned (26.3): the lock resolves to the same versions with it as with uv, which scripts/env.sh uses.
RUN python -m venv /opt/fedbrain \
 && pip install --no-cache-dir pip==26.3

WORKDIR /build
# Dependencies first, in their own layer (kept across source edits): pyproject.toml's direct dependencies,
# no test extra, constrained by requirements.lock, in one pip call (DESIGN.md: installing pieces
# separately drifts from the tested set).
COPY pyproject.toml requirements.lock ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" > dependencies.txt \
 && pip install --no-cache-dir -c requirements.lock -r dependencies.txt

# Then the project itself (no dependency changes: --no-deps), and the build folder goes. k8s/base goes
# where src/fedbrain/federated/manifests (a symlink to ../../../k8s/base) finds it, so the wheel, and the
# kubernetes launcher in the image, get the manifests as files.
COPY README.md ./
COPY k8s/base ./k8s/base
COPY src ./src
RUN pip install --no-cache-dir --no-deps -c requirements.lock . \
 && cd / && rm -rf /build

WORKDIR /app
ENV HOME=/app
USER 49999:49999

LABEL org.opencontainers.image.title="fedbrain" \
      org.opencontainers.image.version="0.1.0" \
      org.opencontainers.image.licenses="Apache-2.0"

ENTRYPOINT ["fedbrain"]
CMD ["--help"]
