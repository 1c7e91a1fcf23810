#!/usr/bin/env bash
# The demo: simulated Modbus devices -> the edge agent -> a local mosquitto broker,
# with every message the agent publishes printed until Ctrl-C. Stops what it started.
#   broker 127.0.0.1:1883 (a running broker there is reused), devices on 127.0.0.1:5020-5021
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
"$ROOT/scripts/setup.sh"
cd "$ROOT/examples"
EDGE="$ROOT/.venv/bin/edge"
RUN="$(mktemp -d /tmp/edge-demo.XXXXXX)"
PIDS=()
cleanup() {
  trap - EXIT INT TERM
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  echo "demo stopped; logs in $RUN" >&2
}
trap cleanup EXIT INT TERM

if (exec 3<>/dev/tcp/127.0.0.1/1883) 2>/dev/null; then
  echo "using the MQTT broker already listening on 127.0.0.1:1883" >&2
else
  printf 'listener 1883 127.0.0.1\nallow_anonymous true\npersistence false\n' >"$RUN/mosquitto.conf"
  "$(command -v mosquitto || echo /usr/sbin/mosquitto)" -c "$RUN/mosquitto.conf" >"$RUN/mosquitto.log" 2>&1 &
  PIDS+=("$!")
  for _ in $(seq 50); do (exec 3<>/dev/tcp/127.0.0.1/1883) 2>/dev/null && break; sleep 0.1; done
fi
"$EDGE" check -c edge.yaml
"$EDGE" simulate -c edge.yaml >"$RUN/simulate.log" 2>&1 &
PIDS+=("$!")
"$EDGE" run -c edge.yaml >"$RUN/agent.log" 2>&1 &
PIDS+=("$!")
echo "agent log: $RUN/agent.log -- values as they arrive at the broker (Ctrl-C stops the demo):" >&2
"$EDGE" tail -c edge.yaml
