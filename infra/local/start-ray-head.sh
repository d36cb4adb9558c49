#!/usr/bin/env bash
# A local Ray head on loopback with its Jobs API (dashboard) on 127.0.0.1; blocks until stopped.
# Stop it with Ctrl-C, or by signalling this script's process group: `ray stop` would stop every Ray on the machine.
#   infra/local/start-ray-head.sh [DASHBOARD_PORT]       then: segmill submit job.yaml --address http://127.0.0.1:8265
# Every port and the temp dir can be set, so several heads (one per test session) live side by side:
#   RAY_PORT (6379) RAY_CLIENT_PORT (10001) RAY_AGENT_PORT (52365) RAY_TEMP_DIR (/tmp/ray) NUM_CPUS (4)
set -euo pipefail
RAY="$(dirname "$0")/../../.venv/bin/ray"
[ -x "$RAY" ] || RAY=ray  # an installed segmill (the container image) brings ray on PATH
# Jobs run `python -c ... run-spec`: put the Python that runs Ray first on PATH.
PATH="$(dirname "$(readlink -f "$(command -v "$RAY")")"):$PATH"
export PATH
exec "$RAY" start --head --block --disable-usage-stats \
    --node-ip-address=127.0.0.1 --port="${RAY_PORT:-6379}" \
    --dashboard-host=127.0.0.1 --dashboard-port="${1:-8265}" \
    --ray-client-server-port="${RAY_CLIENT_PORT:-10001}" --dashboard-agent-listen-port="${RAY_AGENT_PORT:-52365}" \
    --temp-dir="${RAY_TEMP_DIR:-/tmp/ray}" --num-cpus="${NUM_CPUS:-4}"
