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
  for ((i = ${#PIDS[@]} - 1; i >= 0; i--)); do  # agent first, broker last
    kill "${PIDS[i]}" 2>/dev/null || true
    wait "${PIDS[i]}" 2>/dev/null || true
  done
  echo "demo stopped; logs in $RUN" >&2
}
trap cleanup EXIT INT TERM
listening() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

for port in 5020 5021; do
  if listening "$port"; then
    echo "port 127.0.0.1:$port is already in use; the demo's simulated devices need it" >&2
    exit 1
  fi
done

if listening 1883; then
  echo "using the MQTT broker already listening on 127.0.0.1:1883" >&2
else
  printf 'listener 1883 127.0.0.1\nallow_anonymous true\npersistence false\n' >"$RUN/mosquitto.conf"
  "$(command -v mosquitto || echo /usr/sbin/mosquitto)" -c "$RUN/mosquitto.conf" >"$RUN/mosquitto.log" 2>&1 &
  PIDS+=("$!")
  for _ in $(seq 50); do listening 1883 && break; sleep 0.1; done
fi
"$EDGE" check -c edge.yaml
"$EDGE" simulate -c edge.yaml >"$RUN/simulate.log" 2>&1 &
PIDS+=("$!")
for _ in $(seq 50); do listening 5020 && listening 5021 && break; sleep 0.1; done
if ! { listening 5020 && listening 5021; }; then
  echo "the simulator did not start; its log:" >&2; cat "$RUN/simulate.log" >&2; exit 1
fi
echo "agent log: $RUN/agent.log -- values as they arrive at the broker (Ctrl-C stops the demo):" >&2
"$EDGE" tail -c edge.yaml &  # subscribed before the agent starts, so nothing is missed
TAIL=$!
PIDS+=("$TAIL")
sleep 1
"$EDGE" run -c edge.yaml >"$RUN/agent.log" 2>&1 &
PIDS+=("$!")
wait "$TAIL"
