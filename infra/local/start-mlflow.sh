#!/usr/bin/env bash
# A local MLflow tracking server and registry on loopback: SQLite backend, artifacts served by the server from a
# local folder, or from the local S3 server (start-s3.sh) with ARTIFACTS=s3://BUCKET/PATH. Blocks until stopped.
#   infra/local/start-mlflow.sh [PORT] [STATE_DIR]      then: export MLFLOW_TRACKING_URI=http://127.0.0.1:PORT
set -euo pipefail
PORT="${1:-5000}"
STATE="$(mkdir -p "${2:-.segmill/mlflow}" && cd "${2:-.segmill/mlflow}" && pwd)"
ARTIFACTS="${ARTIFACTS:-$STATE/artifacts}"
MLFLOW="$(dirname "$0")/../../.venv/bin/mlflow"
[ -x "$MLFLOW" ] || MLFLOW=mlflow
echo "export MLFLOW_TRACKING_URI=http://127.0.0.1:${PORT}"
exec "$MLFLOW" server --host 127.0.0.1 --port "${PORT}" --workers "${WORKERS:-1}" \
    --backend-store-uri "sqlite:///${STATE}/mlflow.db" --serve-artifacts --artifacts-destination "${ARTIFACTS}"
