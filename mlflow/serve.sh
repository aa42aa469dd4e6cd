#!/usr/bin/env bash
# The project's MLflow tracking server on this machine, in one command:
#   bash mlflow/serve.sh                     # http://127.0.0.1:5000 (UI and REST API)
#   MLFLOW_TRACKING_URI=http://127.0.0.1:5000 dvc repro    # then runs land in it
# SQLite backend store and proxied artifacts under $MLFLOW_WORK_DIR (default build/mlflow/, git-ignored);
# runs and artifacts survive restarts. Environment:
#   MLFLOW_PORT      port (default 5000)
#   MLFLOW_HOST      interface (default 127.0.0.1: this machine only)
#   MLFLOW_WORK_DIR  the store's folder (default <repository>/build/mlflow)
#   MLFLOW_WORKERS   server worker processes (default 1: these machines have 2 cores)
# Extra arguments go to `mlflow server`. The cluster's server is k8s/base/mlflow.yaml (mlflow/README.md).
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
mlflow=$root/.venv/bin/mlflow
[ -x "$mlflow" ] || { echo "error: $mlflow not found: run 'bash scripts/env.sh' first" >&2; exit 1; }
work=${MLFLOW_WORK_DIR:-$root/build/mlflow}
mkdir -p "$work/artifacts"
work=$(cd "$work" && pwd)  # absolute: sqlite:////abs/path
# Run from the store's folder: a relative artifact location a client asks for (params.yaml
# mlflow.artifact_location: mlruns) then lands in the store, not wherever this was started.
cd "$work"
port=${MLFLOW_PORT:-5000}
host=${MLFLOW_HOST:-127.0.0.1}
# No MLflow job runner (a huey consumer beside the server, for GenAI jobs and trace roll-ups this project
# does not use): one process fewer to start on 2 cores. MLFLOW_SERVER_ENABLE_JOB_EXECUTION=true brings it back.
export MLFLOW_SERVER_ENABLE_JOB_EXECUTION=${MLFLOW_SERVER_ENABLE_JOB_EXECUTION:-false}
echo "MLflow tracking server: http://$host:$port (store $work)" >&2
exec "$mlflow" server \
  --host "$host" --port "$port" --workers "${MLFLOW_WORKERS:-1}" \
  --backend-store-uri "sqlite:///$work/mlflow.db" \
  --artifacts-destination "$work/artifacts" \
  --serve-artifacts \
  "$@"
