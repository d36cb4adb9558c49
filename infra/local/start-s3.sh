#!/usr/bin/env bash
# A local S3-compatible server (moto) on loopback, as the tests use; prints the environment to export.
set -euo pipefail
PORT="${1:-9000}"
echo "export AWS_ENDPOINT_URL=http://127.0.0.1:${PORT} AWS_ACCESS_KEY_ID=testing AWS_SECRET_ACCESS_KEY=testing AWS_DEFAULT_REGION=us-east-1"
exec "$(dirname "$0")/../../.venv/bin/moto_server" -H 127.0.0.1 -p "${PORT}"
