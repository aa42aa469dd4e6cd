# Sourced by run.sh and test.sh: make .venv hold exactly the tested dependency set.
# Re-installs only when pyproject.toml or requirements.lock changed since the last install.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null || { echo "error: $PYTHON not found; fedbrain needs Python 3.11 (set PYTHON=/path/to/python3.11)" >&2; exit 1; }
# 3.11.4 added tarfile's extraction filters, which the Kubernetes launcher uses to copy models safely.
"$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11, 4))' || {
  echo "error: $PYTHON is $("$PYTHON" -V 2>&1); fedbrain needs Python 3.11.4 or a later 3.11 (set PYTHON=/path/to/python3.11)" >&2; exit 1; }
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
stamp=.venv/.fedbrain-installed
want=$(cat pyproject.toml requirements.lock | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "Installing the tested dependency set into .venv (first run: about a minute)..."
  # One install call with the lock as constraints: installing pieces separately drifts (DESIGN.md).
  # uv installs the same pinned versions as pip, downloading and unpacking in parallel: ~40 s instead
  # of pip's 1 min 44 s here (bench/README, "Installing with uv"). --compile-bytecode as pip does: where
  # PYTHONDONTWRITEBYTECODE is set no .pyc is ever written later, and every process would compile
  # TensorFlow's sources again (its import: 8-10 s instead of 3.5). uv reads no pip.conf: where only
  # pip's configured index can reach the packages, uv fails and pip installs instead.
  if ! { .venv/bin/python -m pip install --quiet uv==0.13.9 &&
         .venv/bin/uv pip install --quiet --compile-bytecode --python .venv/bin/python \
           -c requirements.lock -e '.[test]'; }; then
    echo "uv could not install the set; installing with pip (a few minutes)..." >&2
    .venv/bin/python -m pip install --quiet --upgrade pip
    .venv/bin/python -m pip install --quiet -c requirements.lock -e '.[test]'
  fi
  echo "$want" > "$stamp"
fi
# dvc stages call `fedbrain`, and the Flower SuperLink starts `flower-superexec` by name.
export PATH="$PWD/.venv/bin:$PATH"
