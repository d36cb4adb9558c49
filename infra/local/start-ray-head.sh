#!/usr/bin/env bash
# A local Ray head on loopback with its Jobs API (dashboard) on 127.0.0.1:8265.
set -euo pipefail
exec "$(dirname "$0")/../../.venv/bin/ray" start --head --node-ip-address=127.0.0.1 --dashboard-host=127.0.0.1 \
    --dashboard-port="${1:-8265}" --num-cpus="${NUM_CPUS:-4}" --block
