#!/usr/bin/env bash
# The benchmark: edge and the peer (ThingsBoard IoT Gateway) on one scenario, one
# after the other on this machine, same duration, same simulator and harness.
#
# Usage: bench/run.sh s1|s2|all [SECONDS=60]
#   s1 = 10 devices x 50 tags @ 100 ms, s2 = 100 devices x 20 tags @ 1 s
#
# Per scenario, in this order (each with its own throwaway broker and simulator):
#   1. edge   : `edge run -c edge.yaml` under the shared measure.py
#               -> bench/results/edge-<scenario>-<date>.json
#   2. peer   : the shared peers/thingsboard/run.sh, once per storage in PEER_STORAGES
#               -> bench/results/thingsboard-<scenario>-<storage>-<date>.json
#      (PROFILE=1: a py-spy profile of edge; NODELAY=1: edge again, broker TCP_NODELAY)
#   3. report : bench/report.py -> bench/results/REPORT.md
#
# Env (all optional):
#   EDGE_BENCH_SHARED  the shared harness (default: <repo>/../shared/bench), used in place
#   EDGE_BIN           the agent (default: <repo>/.venv/bin/edge)
#   PEER_STORAGES      "memory sqlite" (default); "" skips the peer
#   SIM_MODE           ports (default: one port per device) | units (one port, unit ids)
#   BROKER_PORT        first port tried for edge's broker (18861); peers from +10, +20
#   SIM_BASE_PORT      first port tried for edge's simulator (16300); peers from +300, +600
#   WARMUP             seconds after the first reading left out of rates (5, as the peer)
#   RESULTS            where results go (default: bench/results)
#   PROFILE=1          after edge's measured run, run it again for PROFILE_SECONDS (30)
#                      under py-spy (PYSPY, default /tmp/venv-pyspy/bin/py-spy) and write
#                      bench/results/edge-<scenario>-<date>-profile.md
#   PLUGINS=1          then measure edge once more with three WASM plugins loaded (units,
#                      derive, deadband: gen_manifests.py --plugins)
#                      -> bench/results/edge-<scenario>-plugins-<date>.json (the deadband
#                      drops unchanged values: completeness is not comparable there)
#   POLICY=1           then measure edge once more inside a cgroup of its own that an
#                      enforced network policy selects (needs root and BPF; datapath
#                      pinned at /sys/fs/bpf/edge-bench-RUN_ID, removed afterwards)
#                      -> bench/results/edge-<scenario>-policy-<date>.json
#   NODELAY=1          (default) then measure edge once more against a broker with
#                      TCP_NODELAY -> bench/results/edge-<scenario>-nodelay-<date>.json
#                      (a diagnostic of the broker hop; NODELAY=0 skips it)
#   QUIET_BUSY_PCT     before each measured run, wait until the whole machine is less
#                      than this % busy (25; see wait_quiet.py) ...
#   QUIET_MAX_WAIT     ... for at most this many seconds (120; 0 = don't wait)
#   RUN_ID             pairs the runs of one invocation (default: a UTC timestamp)
# Only 127.0.0.1 is used. Everything started here is stopped by PID.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/.." && pwd)"
SHARED="${EDGE_BENCH_SHARED:-$REPO/../shared/bench}"
SHARED="$(cd "$SHARED" && pwd)"
SCEN="${1:?usage: bench/run.sh s1|s2|all [SECONDS]}"
DUR="${2:-60}"
export RUN_ID="${RUN_ID:-$(date -u +%Y%m%dT%H%M%SZ)}"

if [ "$SCEN" = all ]; then
  "$0" s1 "$DUR"
  "$0" s2 "$DUR"
  exit 0
fi
case "$SCEN" in s1|s2) ;; *) echo "unknown scenario $SCEN (s1|s2|all)" >&2; exit 2 ;; esac

EDGE_BIN="${EDGE_BIN:-$REPO/.venv/bin/edge}"
PEER_STORAGES="${PEER_STORAGES-memory sqlite}"
SIM_MODE="${SIM_MODE:-ports}"
BROKER_PORT0="${BROKER_PORT:-18861}"
SIM_BASE_PORT0="${SIM_BASE_PORT:-16300}"
WARMUP="${WARMUP:-5}"
RESULTS="${RESULTS:-$HERE/results}"
PYSPY="${PYSPY:-/tmp/venv-pyspy/bin/py-spy}"
PROFILE_SECONDS="${PROFILE_SECONDS:-30}"
NODELAY="${NODELAY:-1}"
QUIET_BUSY_PCT="${QUIET_BUSY_PCT:-25}"
QUIET_MAX_WAIT="${QUIET_MAX_WAIT:-120}"
DATE="$(date +%F)"
TICK=100  # simulator value tick, ms (as the peer's run.sh)
mkdir -p "$RESULTS"
quiet() {  # wait for a quiet machine; prints how busy it was (% of all cores)
  python3 "$HERE/wait_quiet.py" --busy-pct "$QUIET_BUSY_PCT" --max-wait-s "$QUIET_MAX_WAIT" \
    || true
}

[ -x "$EDGE_BIN" ] || { echo "no agent at $EDGE_BIN (pip install -e $REPO into .venv)" >&2; exit 1; }
[ -x /tmp/venv-bench/bin/python ] || "$SHARED/setup-venvs.sh" bench
VB=/tmp/venv-bench/bin/python

RUN="$(mktemp -d "/tmp/edge-bench-${SCEN}.XXXXXX")"
echo "run dir: $RUN" >&2
PIDS=()
WRAP=()  # what edge run is started through (POLICY=1: into its cgroup)
cleanup() {
  local p
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  sleep 0.5
  for p in "${PIDS[@]}"; do kill -9 "$p" 2>/dev/null || true; done
}
trap cleanup EXIT

# --- ports: a range of free ports per run, so nothing lingering from a run matters
read -r DEV TAGS POLL EXPECT < <(python3 "$HERE/gen_manifests.py" --out "$RUN/probe" \
  --scenario "$SCEN" | python3 -c 'import json,sys; d=json.load(sys.stdin);
print(d["devices"], d["tags_per_device"], d["poll_ms"], d["expected_points_per_s"])')
rm -rf "$RUN/probe"
NSIM=$([ "$SIM_MODE" = ports ] && echo "$DEV" || echo 1)
AVOID=()
take() {  # COUNT START -> first free base port outside what this run already took
  python3 "$HERE/free_ports.py" "$1" "$2" "${AVOID[@]}"
}
# (take runs in a subshell: callers add what they took to AVOID)
BROKER_PORT="$(take 1 "$BROKER_PORT0")"; AVOID+=(--avoid "$BROKER_PORT-$BROKER_PORT")
SIM_BASE_PORT="$(take "$NSIM" "$SIM_BASE_PORT0")"
AVOID+=(--avoid "$SIM_BASE_PORT-$((SIM_BASE_PORT + NSIM - 1))")
WEB_PORT="$(take 1 18080)"; AVOID+=(--avoid "$WEB_PORT-$WEB_PORT")  # the agent's web page

# --- edge
python3 "$HERE/gen_manifests.py" --out "$RUN" --scenario "$SCEN" --sim-mode "$SIM_MODE" \
  --sim-base-port "$SIM_BASE_PORT" --broker-port "$BROKER_PORT" --web-port "$WEB_PORT" >/dev/null
if ! "$EDGE_BIN" check -c "$RUN/edge.yaml" >"$RUN/check.out" 2>&1; then
  echo "edge check failed on the generated config:" >&2; cat "$RUN/check.out" >&2; exit 1
fi
cat "$RUN/check.out" >&2
EDGE_VER="$("$EDGE_BIN" --version 2>/dev/null | awk '{print $NF}')"
GIT_REV="$(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo unknown)"
git -C "$REPO" diff --quiet HEAD -- edge 2>/dev/null || GIT_REV="$GIT_REV+dirty"
STORE=none; [ -d "$REPO/edge/store" ] && STORE=sqlite

# wait for a quiet machine before starting anything (the simulator stops by itself)
BUSY="$(quiet)"
BROKER_PID="$("$SHARED/start-broker.sh" "$BROKER_PORT")"; PIDS+=("$BROKER_PID")
"$VB" "$SHARED/sim_devices.py" -n "$DEV" --mode "$SIM_MODE" --base-port "$SIM_BASE_PORT" \
  --tick-ms "$TICK" --stats-file "$RUN/sim-stats.json" --ready-file "$RUN/sim.ready" \
  --max-seconds $((2 * DUR + PROFILE_SECONDS + QUIET_MAX_WAIT + 180)) >"$RUN/sim.log" 2>&1 &
SIM_PID=$!; PIDS+=("$SIM_PID")
for _ in $(seq 1 100); do [ -f "$RUN/sim.ready" ] && break; sleep 0.1; done
[ -f "$RUN/sim.ready" ] || { echo "simulator did not start" >&2; cat "$RUN/sim.log" >&2; exit 1; }

measure_edge() {  # OUT CFG_DIR BROKER_PORT BROKER_PID VARIANT BUSY: edge under measure.py
  local out="$1" dir="$2" port="$3" bpid="$4" variant="$5" busy="$6" load
  load="$(cut -d' ' -f1-3 /proc/loadavg)"
  "$VB" "$SHARED/measure.py" --broker-port "$port" --duration "$DUR" --warmup "$WARMUP" \
    --data-topic 'edge/v1/bench/telemetry/#' --format device \
    --label "edge-${SCEN}-${SIM_MODE}-${variant}" --out "$out" \
    --agent-log "$dir/edge.out" --cwd "$dir" \
    --watch "broker=$bpid" --watch "simulator=$SIM_PID" --sim-stats "$RUN/sim-stats.json" \
    --expect-points-per-s "$EXPECT" --series \
    --meta "agent=edge $EDGE_VER ($GIT_REV)" --meta "scenario=$SCEN" --meta "storage=$STORE" \
    --meta "devices=$DEV" --meta "tags_per_device=$TAGS" --meta "poll_ms=$POLL" \
    --meta "sim_mode=$SIM_MODE" --meta "sim_tick_ms=$TICK" --meta "qos=1" \
    --meta "broker=$variant" \
    -- "${WRAP[@]}" "$EDGE_BIN" run -c "$dir/edge.yaml" >"$dir/measure.json"
  python3 "$HERE/annotate.py" "$out" "run_id=$RUN_ID" role=edge "scenario=$SCEN" \
    "storage=$STORE" "broker=$variant" "loadavg_before=$load" \
    "machine_busy_pct_before=$busy" "run_dir=$dir"
  echo "result: $out" >&2
}

OUT="$RESULTS/edge-$SCEN-$DATE.json"
echo "=== edge $SCEN (${DUR}s): broker :$BROKER_PORT, simulator :$SIM_BASE_PORT ($SIM_MODE)" >&2
measure_edge "$OUT" "$RUN" "$BROKER_PORT" "$BROKER_PID" shared "$BUSY"

if [ "${PLUGINS:-0}" = 1 ]; then
  PDIR="$RUN/with-plugins"
  mkdir -p "$PDIR"
  python3 "$HERE/gen_manifests.py" --out "$PDIR" --scenario "$SCEN" --sim-mode "$SIM_MODE" \
    --sim-base-port "$SIM_BASE_PORT" --broker-port "$BROKER_PORT" --web-port "$WEB_PORT" \
    --plugins "$REPO/plugins" >/dev/null
  "$EDGE_BIN" check -c "$PDIR/edge.yaml" >&2
  measure_edge "$RESULTS/edge-$SCEN-plugins-$DATE.json" "$PDIR" "$BROKER_PORT" "$BROKER_PID" \
    plugins "$(quiet)"
fi

if [ "${POLICY:-0}" = 1 ]; then
  CGROOT="$(awk '{ for (i = 7; i <= NF; i++) if ($i == "-") { if ($(i + 1) == "cgroup2") print $5; break } }' /proc/self/mountinfo | head -1)"
  [ -n "$CGROOT" ] || { echo "POLICY=1: no cgroup v2 hierarchy" >&2; exit 1; }
  CG="edge-bench-$RUN_ID/agent"
  PIN="/sys/fs/bpf/edge-bench-$RUN_ID"
  mkdir -p "$CGROOT/$CG"
  PODIR="$RUN/with-policy"
  mkdir -p "$PODIR/manifests"
  python3 "$HERE/gen_manifests.py" --out "$PODIR" --scenario "$SCEN" --sim-mode "$SIM_MODE" \
    --sim-base-port "$SIM_BASE_PORT" --broker-port "$BROKER_PORT" --web-port "$WEB_PORT" \
    --policy "$CG" "$PIN" >/dev/null
  "$EDGE_BIN" check -c "$PODIR/edge.yaml" >&2
  # the agent moves itself into the policed cgroup, then becomes `edge run` (same PID)
  WRAP=(sh -c 'echo $$ >"$0" && exec "$@"' "$CGROOT/$CG/cgroup.procs")
  measure_edge "$RESULTS/edge-$SCEN-policy-$DATE.json" "$PODIR" "$BROKER_PORT" "$BROKER_PID" \
    policy "$(quiet)"
  WRAP=()
  "$EDGE_BIN" policy status -c "$PODIR/edge.yaml" >"$PODIR/policy-status.txt" 2>&1 || true
  "$EDGE_BIN" policy remove -c "$PODIR/edge.yaml" >&2
  rmdir "$CGROOT/$CG" "$CGROOT/edge-bench-$RUN_ID"
fi

if [ "${PROFILE:-0}" = 1 ]; then
  [ -x "$PYSPY" ] || { python3 -m venv "$(dirname "$(dirname "$PYSPY")")" \
    && "$(dirname "$PYSPY")/pip" install -q py-spy; }
  echo "=== edge $SCEN under py-spy (${PROFILE_SECONDS}s)" >&2
  (cd "$RUN" && exec "$EDGE_BIN" run -c "$RUN/edge.yaml" >"$RUN/edge-profile.out" 2>&1) &
  AGENT_PID=$!; PIDS+=("$AGENT_PID")
  sleep 3  # past start-up: profile the steady state
  "$PYSPY" record -p "$AGENT_PID" -d "$PROFILE_SECONDS" -r 100 --nonblocking -f raw \
    -o "$RUN/profile.txt" >"$RUN/py-spy.log" 2>&1 || cat "$RUN/py-spy.log" >&2
  kill "$AGENT_PID" 2>/dev/null || true
  wait "$AGENT_PID" 2>/dev/null || true
  if [ -s "$RUN/profile.txt" ]; then
    PROF="$RESULTS/edge-$SCEN-$DATE-profile.md"
    {
      echo "# py-spy profile: edge, $SCEN, ${PROFILE_SECONDS}s at 100 Hz (run $RUN_ID, $GIT_REV)"
      echo
      python3 "$HERE/profile_top.py" "$RUN/profile.txt" --top 25
    } >"$PROF"
    echo "profile: $PROF (raw stacks: $RUN/profile.txt)" >&2
  fi
fi

if [ "$NODELAY" = 1 ]; then
  # Same agent, same simulator, a broker that sets TCP_NODELAY on its sockets
  # (mosquitto's set_tcp_nodelay; the shared start-broker.sh leaves it off, so
  # Nagle's algorithm can hold the broker's small writes to the measuring
  # subscriber for up to a delayed-ACK period, ~40 ms). A diagnostic for the
  # read->MQTT budget; the figures judged are the ones with the shared broker.
  NP="$(take 1 $((BROKER_PORT0 + 5)))"; AVOID+=(--avoid "$NP-$NP")
  mkdir -p "$RUN/nodelay/manifests"
  cp "$RUN/manifests/sim.yaml" "$RUN/nodelay/manifests/"
  sed "s/\"port\": $BROKER_PORT,/\"port\": $NP,/" "$RUN/edge.yaml" >"$RUN/nodelay/edge.yaml"
  cat >"$RUN/nodelay/mosquitto.conf" <<EOF
listener $NP 127.0.0.1
allow_anonymous true
persistence false
set_tcp_nodelay true
log_dest stderr
log_type error
log_type warning
max_queued_messages 1000000
max_queued_bytes 0
max_inflight_messages 0
EOF
  MOSQ="$(command -v mosquitto || echo /usr/sbin/mosquitto)"
  nohup "$MOSQ" -c "$RUN/nodelay/mosquitto.conf" >"$RUN/nodelay/mosquitto.log" 2>&1 </dev/null &
  NB_PID=$!; PIDS+=("$NB_PID")
  for _ in $(seq 1 50); do
    (exec 3<>"/dev/tcp/127.0.0.1/$NP") 2>/dev/null && break
    sleep 0.1
  done
  echo "=== edge $SCEN (${DUR}s), broker with TCP_NODELAY :$NP" >&2
  BUSY="$(quiet)"
  measure_edge "$RESULTS/edge-$SCEN-nodelay-$DATE.json" "$RUN/nodelay" "$NP" "$NB_PID" nodelay \
    "$BUSY"
fi
cleanup; PIDS=()

# --- the peer, same scenario, same duration, its own broker and simulator
for STORAGE in $PEER_STORAGES; do
  sleep 2
  BP="$(take 1 $((BROKER_PORT0 + 10)))"; AVOID+=(--avoid "$BP-$BP")
  SP="$(take "$NSIM" $((SIM_BASE_PORT0 + 300)))"; AVOID+=(--avoid "$SP-$((SP + NSIM - 1))")
  OUT="$RESULTS/thingsboard-$SCEN-$STORAGE-$DATE.json"
  BUSY="$(quiet)"
  LOAD_BEFORE="$(cut -d' ' -f1-3 /proc/loadavg)"
  echo "=== thingsboard $SCEN $STORAGE (${DUR}s): broker :$BP, simulator :$SP ($SIM_MODE)" >&2
  OUT="$OUT" BROKER_PORT="$BP" SIM_BASE_PORT="$SP" \
    "$SHARED/peers/thingsboard/run.sh" "$SCEN" "$STORAGE" "$DUR" "$SIM_MODE" \
    >"$RUN/thingsboard-$STORAGE.json" 2>"$RUN/thingsboard-$STORAGE.log" \
    || { echo "peer run failed:" >&2; tail -20 "$RUN/thingsboard-$STORAGE.log" >&2; exit 1; }
  python3 "$HERE/annotate.py" "$OUT" "run_id=$RUN_ID" role=peer "scenario=$SCEN" \
    "storage=$STORAGE" "loadavg_before=$LOAD_BEFORE" "machine_busy_pct_before=$BUSY" \
    "run_dir=$(sed -n 's/^run dir: //p' "$RUN/thingsboard-$STORAGE.log")"
  echo "result: $OUT" >&2
done

python3 "$HERE/report.py" --results "$RESULTS" --out "$RESULTS/REPORT.md" --rss-tier web
echo "report: $RESULTS/REPORT.md" >&2
