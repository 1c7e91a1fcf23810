#!/usr/bin/env bash
# The demo: simulated Modbus devices -> the edge agent -> a local mosquitto broker,
# with every message the agent publishes printed until Ctrl-C. Stops what it started,
# by PID: the agent first, then the console view, the simulator, the broker.
#   broker 127.0.0.1:1883 (a running broker there is reused), devices on 127.0.0.1:5020-5022
#   `kill -USR1 <this script's PID>` (printed at start) stops the demo's broker, the same
#   again starts it: an outage, to watch store-and-forward.
# The outbox is examples/run/edge.db: seq goes on from the last demo; `rm -r
# examples/run` starts afresh.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
"$ROOT/scripts/setup.sh"
cd "$ROOT/examples"
EDGE="$ROOT/.venv/bin/edge"
MOSQUITTO="$(command -v mosquitto || echo /usr/sbin/mosquitto)"
RUN="$(mktemp -d /tmp/edge-demo.XXXXXX)"
PIDS=()      # simulator, tail, agent: stopped newest first
BROKER=""    # the demo's own broker, stopped last; empty when an outside one is used
OWN_BROKER=0
cleanup() {
  trap - EXIT INT TERM USR1
  for ((i = ${#PIDS[@]} - 1; i >= 0; i--)); do
    kill "${PIDS[i]}" 2>/dev/null || true
    wait "${PIDS[i]}" 2>/dev/null || true
  done
  if [ -n "$BROKER" ]; then kill "$BROKER" 2>/dev/null || true; wait "$BROKER" 2>/dev/null || true; fi
  echo "demo stopped; logs in $RUN" >&2
}
trap cleanup EXIT INT TERM
listening() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
start_broker() {
  setsid "$MOSQUITTO" -c "$RUN/mosquitto.conf" >>"$RUN/mosquitto.log" 2>&1 &
  BROKER=$!
  for _ in $(seq 50); do listening 1883 && break; sleep 0.1; done
}
outage() {  # USR1: stop the demo's broker, or start it again
  if [ "$OWN_BROKER" = 0 ]; then
    echo "demo: the broker on 127.0.0.1:1883 is not the demo's; stop it yourself" >&2
  elif [ -n "$BROKER" ]; then
    kill "$BROKER"; wait "$BROKER" 2>/dev/null || true; BROKER=""
    echo "demo: broker stopped -- the agent keeps polling into its outbox; kill -USR1 $$ starts it again" >&2
  else
    start_broker
    echo "demo: broker started -- the backlog drains, seq goes on without a gap" >&2
  fi
}

for port in 5020 5021 5022; do
  if listening "$port"; then
    echo "port 127.0.0.1:$port is already in use; the demo's simulated devices need it" >&2
    exit 1
  fi
done

if listening 1883; then
  echo "using the MQTT broker already listening on 127.0.0.1:1883" >&2
else
  # persistence: the console view's session (and what is queued for it) outlives a restart
  # as root, mosquitto would drop to user mosquitto, who cannot write the run dir
  USER_LINE=""; [ "$(id -u)" = 0 ] && USER_LINE="user root"
  printf '%s\nlistener 1883 127.0.0.1\nallow_anonymous true\npersistence true\npersistence_location %s/\n' \
    "$USER_LINE" "$RUN" >"$RUN/mosquitto.conf"
  start_broker
  OWN_BROKER=1
fi
"$EDGE" check -c edge.yaml
# each child in a session of its own (setsid execs in place: $! is its PID), so that
# Ctrl-C reaches this script alone, which stops them in order
setsid "$EDGE" simulate -c edge.yaml >"$RUN/simulate.log" 2>&1 &
PIDS+=("$!")
for _ in $(seq 50); do listening 5020 && listening 5021 && listening 5022 && break; sleep 0.1; done
if ! { listening 5020 && listening 5021 && listening 5022; }; then
  echo "the simulator did not start; its log:" >&2; cat "$RUN/simulate.log" >&2; exit 1
fi
echo "agent log: $RUN/agent.log -- values as they arrive at the broker (Ctrl-C stops the demo):" >&2
[ "$OWN_BROKER" = 1 ] && echo "broker outage: kill -USR1 $$ (the same again ends it)" >&2
# subscribed before the agent starts, so nothing is missed; its session outlives an outage
setsid "$EDGE" tail -c edge.yaml --session "edge-demo-tail-$$" &
TAIL=$!
PIDS+=("$TAIL")
sleep 1
setsid "$EDGE" run -c edge.yaml >"$RUN/agent.log" 2>&1 &
PIDS+=("$!")
trap outage USR1
while kill -0 "$TAIL" 2>/dev/null; do
  wait "$TAIL" || true  # returns early for each USR1
done
