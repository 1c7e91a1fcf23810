#!/usr/bin/env bash
# Broker outage: edge and the peer (ThingsBoard IoT Gateway) across a broker that is
# down for DOWN seconds in the middle of a run, counted reading by reading.
#
# Usage: bench/outage.sh [AGENTS="edge thingsboard-memory thingsboard-sqlite"] [DOWN="30 60"]
#   e.g. bench/outage.sh                       # all three agents, 30 s and 60 s
#        PRE=15 POST=30 bench/outage.sh edge 30
#        EDGE_KILL=1 bench/outage.sh edge 30   # + SIGKILL of edge during the outage
#
# Per agent and down duration, one after the other, all on 127.0.0.1:
#   1. mosquitto with persistence (the shared start-broker.sh, PERSIST_DIR in the run
#      dir), the shared simulator (one port per device), for the peer the shared
#      fake_tb_platform.py (answers its session-limits RPC);
#   2. a recording subscriber (fixed client id, clean_session=False, '#' at QoS 1,
#      reconnect 0.1..0.5 s), subscribed before the agent starts: bench/outage_sub.py
#      for edge, the shared peers/thingsboard/outage_sub.py for the peer; it samples
#      the agent's RSS/CPU once a second (PID from <run>/agent.pid);
#   3. the agent: `edge run -c edge.yaml` (store: <run>/edge.db), or the peer as the
#      shared peers/thingsboard/outage.sh runs it (its own process group; config by
#      the shared gen_config.py at the scenario's size);
#   4. PRE s after the agent was spawned the broker is stopped by its PID (SIGTERM:
#      mosquitto saves the subscriber's session), DOWN s later it is started again on
#      the same port and persistence dir; with EDGE_KILL=1 edge is SIGKILLed by its PID
#      KILL_AT s after the broker went down and started again at once with the same
#      agent file; POST s after the restart the agent is stopped (SIGTERM);
#   5. the shared outage_analyze.py counts poll cycles (distinct `counter` per device)
#      against the cycles expected; bench/outage_figures.py adds seq duplicates/gaps,
#      live latency during/after the drain, RSS before/during/after, CPU per phase
#      -> bench/results/outage-<agent>[-sigkill]-<down>s-<date>.json
#   6. bench/report.py rewrites bench/results/REPORT.md (outage section).
#
# Env (all optional):
#   SCENARIO         s2 (default; 100 devices x 20 tags @ 1 s) | s1
#   PRE, POST        seconds before the broker is stopped (20) / after it is back (40)
#   EDGE_ORDER=live  edge with uplink.order: live (results labelled edge-live)
#   EDGE_KILL=1      SIGKILL edge KILL_AT s (default DOWN/2) into the outage, restart it
#   EDGE_BIN         the agent (default: <repo>/.venv/bin/edge)
#   EDGE_BENCH_SHARED  the shared harness (default: <repo>/../shared/bench), used in place
#   BROKER_PORT      first port tried for the broker (18871)
#   SIM_BASE_PORT    first port tried for the simulator (16700)
#   GRACE            s before the agent's stop not counted (3, as outage_analyze.py)
#   RESULTS          where results go (default: bench/results)
#   QUIET_BUSY_PCT, QUIET_MAX_WAIT  wait for a quiet machine before each run (25 %, 120 s)
#   RUN_ID           pairs the runs of one invocation (default: a UTC timestamp)
# Only 127.0.0.1 is used. Everything started here is stopped by PID.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/.." && pwd)"
SHARED="${EDGE_BENCH_SHARED:-$REPO/../shared/bench}"
SHARED="$(cd "$SHARED" && pwd)"
TB="$SHARED/peers/thingsboard"
AGENTS="${1:-edge thingsboard-memory thingsboard-sqlite}"
DOWNS="${2:-30 60}"
SCEN="${SCENARIO:-s2}"
PRE="${PRE:-20}"; POST="${POST:-40}"
EDGE_KILL="${EDGE_KILL:-0}"; KILL_AT="${KILL_AT:-}"; EDGE_ORDER="${EDGE_ORDER:-device}"
EDGE_BIN="${EDGE_BIN:-$REPO/.venv/bin/edge}"
BROKER_PORT0="${BROKER_PORT:-18871}"; SIM_BASE_PORT0="${SIM_BASE_PORT:-16700}"
GRACE="${GRACE:-3}"
RESULTS="${RESULTS:-$HERE/results}"
QUIET_BUSY_PCT="${QUIET_BUSY_PCT:-25}"; QUIET_MAX_WAIT="${QUIET_MAX_WAIT:-120}"
export RUN_ID="${RUN_ID:-$(date -u +%Y%m%dT%H%M%SZ)}"
DATE="$(date +%F)"
TICK=100  # simulator value tick, ms
mkdir -p "$RESULTS"

for AGENT in $AGENTS; do
  case "$AGENT" in edge|thingsboard-memory|thingsboard-sqlite) ;;
    *) echo "unknown agent $AGENT (edge|thingsboard-memory|thingsboard-sqlite)" >&2; exit 2 ;;
  esac
done
[ -x "$EDGE_BIN" ] || { echo "no agent at $EDGE_BIN (pip install -e $REPO into .venv)" >&2; exit 1; }
[ -x /tmp/venv-bench/bin/python ] || "$SHARED/setup-venvs.sh" bench
case " $AGENTS " in *" thingsboard-"*)
  [ -x /tmp/venv-tb/bin/thingsboard-gateway ] || "$SHARED/setup-venvs.sh" tb ;;
esac
VB=/tmp/venv-bench/bin/python

PROBE="$(mktemp -d /tmp/edge-outage-probe.XXXXXX)"
read -r DEV TAGS POLL < <(python3 "$HERE/gen_manifests.py" --out "$PROBE" --scenario "$SCEN" \
  | python3 -c 'import json,sys; d=json.load(sys.stdin);
print(d["devices"], d["tags_per_device"], d["poll_ms"])')
rm -rf "$PROBE"

now() { date +%s.%N; }
alive() {  # PID -> 0 if running (zombies count as gone)
  local st; st="$(ps -o stat= -p "$1" 2>/dev/null || true)"
  [ -n "$st" ] && [ "${st:0:1}" != "Z" ]
}
wait_gone() {  # PID TIMEOUT_S
  local i
  for i in $(seq 1 $(( $2 * 10 ))); do alive "$1" || return 0; sleep 0.1; done
  return 1
}
sleep_until() {  # EPOCH_S: sleep until then (at once if past)
  sleep "$(python3 -c "import time; print(max(0.0, $1 - time.time()))")"
}
quiet() {
  python3 "$HERE/wait_quiet.py" --busy-pct "$QUIET_BUSY_PCT" --max-wait-s "$QUIET_MAX_WAIT" \
    || true
}

PIDS=(); BROKER_PID=""; AGENT_PID=""; GW_PGID=""
stop_all() {
  local p
  [ -n "$GW_PGID" ] && kill -TERM -- "-$GW_PGID" 2>/dev/null || true
  [ -n "$AGENT_PID" ] && kill -TERM "$AGENT_PID" 2>/dev/null || true
  for p in "${PIDS[@]}" $BROKER_PID; do kill "$p" 2>/dev/null || true; done
  for p in "${PIDS[@]}" $BROKER_PID $AGENT_PID; do wait_gone "$p" 5 || kill -9 "$p" 2>/dev/null || true; done
  [ -n "$GW_PGID" ] && kill -KILL -- "-$GW_PGID" 2>/dev/null || true
  PIDS=(); BROKER_PID=""; AGENT_PID=""; GW_PGID=""
}
trap stop_all EXIT

start_agent() {  # AGENT RUN: spawn it, set AGENT_PID (and GW_PGID for the peer)
  if [ "$1" = edge ]; then
    ( cd "$2" && exec "$EDGE_BIN" run -c "$2/edge.yaml" ) >>"$2/edge.out" 2>&1 </dev/null &
    AGENT_PID=$!
  else  # as the shared outage.sh: own session/process group, $! is the gateway = its PGID
    ( cd "$2" && TB_GW_CONFIG_DIR="$2/config/" exec setsid /tmp/venv-tb/bin/thingsboard-gateway ) \
      >>"$2/gateway.out" 2>&1 </dev/null &
    AGENT_PID=$!; GW_PGID=$AGENT_PID
  fi
  echo "$AGENT_PID" >"$2/agent.pid"
}

run_one() {  # AGENT DOWN
  local agent="$1" down="$2" kill_edge=0 label storage=none
  [ "$agent" = edge ] && [ "$EDGE_KILL" = 1 ] && kill_edge=1
  label="$agent$([ "$agent" = edge ] && [ "$EDGE_ORDER" = live ] && echo -live || true)"
  label="$label$([ "$kill_edge" = 1 ] && echo -sigkill || true)"
  case "$agent" in thingsboard-*) storage="${agent#thingsboard-}" ;; esac
  local run port simp kill_at
  kill_at="${KILL_AT:-$(python3 -c "print($down / 2)")}"
  port="$(python3 "$HERE/free_ports.py" 1 "$BROKER_PORT0")"
  simp="$(python3 "$HERE/free_ports.py" "$DEV" "$SIM_BASE_PORT0" --avoid "$port-$port")"
  run="$(mktemp -d "/tmp/edge-outage-${label}-${down}s.XXXXXX")"
  chmod 755 "$run"  # mosquitto drops to its own user and writes the persistence dir in here
  mkdir -p "$run/snaps"
  local persist="$run/mosq-persist" total=$((PRE + down + POST + 90))
  echo "=== outage $label, $SCEN, broker down ${down}s (pre ${PRE}s, post ${POST}s):" \
    "broker :$port, simulator :$simp, run dir $run" >&2
  local busy load; busy="$(quiet)"; load="$(cut -d' ' -f1-3 /proc/loadavg)"

  BROKER_PID="$(PERSIST_DIR="$persist" "$SHARED/start-broker.sh" "$port" 2>>"$run/broker.log")"
  local broker1="$BROKER_PID"
  "$VB" "$SHARED/sim_devices.py" -n "$DEV" --mode ports --base-port "$simp" --tick-ms "$TICK" \
    --stats-file "$run/sim-stats.json" --ready-file "$run/sim.ready" --max-seconds "$total" \
    >"$run/sim.log" 2>&1 &
  local sim=$!; PIDS+=("$sim")
  local platform=""
  if [ "$agent" != edge ]; then
    "$VB" "$TB/fake_tb_platform.py" --port "$port" --max-seconds "$total" \
      >"$run/fake-platform.log" 2>&1 &
    platform=$!; PIDS+=("$platform")
  fi
  for _ in $(seq 1 100); do [ -f "$run/sim.ready" ] && break; sleep 0.1; done
  [ -f "$run/sim.ready" ] || { echo "simulator did not start" >&2; cat "$run/sim.log" >&2; exit 1; }

  local agent_ver
  if [ "$agent" = edge ]; then
    python3 "$HERE/gen_manifests.py" --out "$run" --scenario "$SCEN" --sim-mode ports \
      --sim-base-port "$simp" --broker-port "$port" --store-path "$run/edge.db" \
      --uplink-order "$EDGE_ORDER" >/dev/null
    "$EDGE_BIN" check -c "$run/edge.yaml" >"$run/check.out" 2>&1 \
      || { echo "edge check failed:" >&2; cat "$run/check.out" >&2; exit 1; }
    local rev; rev="$(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo unknown)"
    git -C "$REPO" diff --quiet HEAD -- edge 2>/dev/null || rev="$rev+dirty"
    agent_ver="edge $("$EDGE_BIN" --version 2>/dev/null | awk '{print $NF}') ($rev)"
  else
    local pkgcfg
    pkgcfg="$(/tmp/venv-tb/bin/python -c 'import thingsboard_gateway,os;print(os.path.join(os.path.dirname(thingsboard_gateway.__file__),"config"))')"
    "$VB" "$TB/gen_config.py" --out "$run/config" --devices "$DEV" --tags "$TAGS" \
      --poll-ms "$POLL" --sim-base-port "$simp" --sim-mode ports --broker-port "$port" \
      --storage "$storage" --package-config-dir "$pkgcfg" >/dev/null
    mkdir -p "$run/logs"
    agent_ver="thingsboard-gateway $(/tmp/venv-tb/bin/python -c 'import importlib.metadata as m;print(m.version("thingsboard-gateway"))')"
  fi

  # the recording subscriber first (its session must exist before the agent publishes)
  local sub_py="$HERE/outage_sub.py"; [ "$agent" = edge ] || sub_py="$TB/outage_sub.py"
  "$VB" "$sub_py" --port "$port" --client-id "outage-sub-$label" --out "$run/records.jsonl" \
    --ready-file "$run/sub.ready" --watch-pid-file "$run/agent.pid" --max-seconds "$total" \
    2>"$run/sub.log" &
  local sub=$!; PIDS+=("$sub")
  for _ in $(seq 1 50); do [ -f "$run/sub.ready" ] && break; sleep 0.1; done
  [ -f "$run/sub.ready" ] || { echo "subscriber did not subscribe" >&2; cat "$run/sub.log" >&2; exit 1; }
  local t_sub; t_sub="$(now)"

  local helpers=(--pid "simulator=$sim" --pid "subscriber=$sub" --pid "platform=$platform")
  python3 "$HERE/outage_figures.py" snap --out "$run/snaps/start.json" "${helpers[@]}" \
    --pid "broker1=$broker1"
  local t_start; t_start="$(now)"
  start_agent "$agent" "$run"
  local agent1="$AGENT_PID"

  sleep_until "$(python3 -c "print($t_start + $PRE)")"
  python3 "$HERE/outage_figures.py" snap --out "$run/snaps/kill.json" "${helpers[@]}" \
    --pid "broker1=$broker1"
  local t_kill; t_kill="$(now)"
  kill -TERM "$BROKER_PID"
  wait_gone "$BROKER_PID" 10 || { echo "broker $BROKER_PID did not exit" >&2; exit 1; }
  local t_gone; t_gone="$(now)"; BROKER_PID=""

  local edge_tl=""
  if [ "$kill_edge" = 1 ]; then
    sleep_until "$(python3 -c "print($t_kill + $kill_at)")"
    local t_ek; t_ek="$(now)"
    kill -KILL "$AGENT_PID"
    wait "$AGENT_PID" 2>/dev/null || true
    echo "--- $(date -u +%T) SIGKILL of edge $AGENT_PID, restarted with the same agent file" \
      >>"$run/edge.out"
    local t_er; t_er="$(now)"
    start_agent edge "$run"
    edge_tl=", \"t_edge_kill\": $t_ek, \"t_edge_restart\": $t_er, \"edge_pid_1\": $agent1,
 \"edge_pid_2\": $AGENT_PID"
    echo "edge SIGKILLed at +$(python3 -c "print(round($t_ek - $t_kill, 2))") s of the outage," \
      "restarted as $AGENT_PID" >&2
  fi

  sleep_until "$(python3 -c "print($t_kill + $down)")"
  python3 "$HERE/outage_figures.py" snap --out "$run/snaps/restart.json" "${helpers[@]}" \
    --pid "broker1=$broker1"
  local t_rcmd; t_rcmd="$(now)"
  BROKER_PID="$(PERSIST_DIR="$persist" "$SHARED/start-broker.sh" "$port" 2>>"$run/broker.log")"
  local t_restart; t_restart="$(now)"  # start-broker.sh returns once the port accepts
  local broker2="$BROKER_PID"

  sleep_until "$(python3 -c "print($t_restart + $POST)")"
  local t_stop; t_stop="$(now)"
  if [ -n "$GW_PGID" ]; then
    kill -TERM -- "-$GW_PGID" 2>/dev/null || true
    wait_gone "$GW_PGID" 15 || { kill -KILL -- "-$GW_PGID" 2>/dev/null || true; echo "peer needed SIGKILL" >&2; }
    GW_PGID=""
  else
    kill -TERM "$AGENT_PID" 2>/dev/null || true
    wait_gone "$AGENT_PID" 15 || { kill -KILL "$AGENT_PID" 2>/dev/null || true; echo "edge needed SIGKILL" >&2; }
  fi
  wait "$AGENT_PID" 2>/dev/null || true
  AGENT_PID=""
  sleep 2  # let the subscriber take what is still in the broker
  python3 "$HERE/outage_figures.py" snap --out "$run/snaps/stop.json" "${helpers[@]}" \
    --pid "broker1=$broker1" --pid "broker2=$broker2"
  kill "$sub"; wait_gone "$sub" 10 || true

  cat >"$run/timeline.json" <<EOF
{"t_agent_start": $t_start, "t_sub_ready": $t_sub, "t_kill": $t_kill, "t_broker_gone": $t_gone,
 "t_restart_cmd": $t_rcmd, "t_restart": $t_restart, "t_agent_stop": $t_stop,
 "kill_signal": "TERM", "broker_pid_1": $broker1, "broker_pid_2": $broker2$edge_tl}
EOF
  local meta=(--meta "agent=$agent_ver" --meta "scenario=$SCEN" --meta "storage=$storage"
    --meta "devices=$DEV" --meta "tags_per_device=$TAGS" --meta "poll_ms=$POLL"
    --meta "sim_tick_ms=$TICK" --meta "qos=1" --meta "pre_s=$PRE" --meta "down_s=$down"
    --meta "post_s=$POST" --meta "edge_kill=$kill_edge" --meta "run_dir=$run")
  "$VB" "$TB/outage_analyze.py" run --records "$run/records.jsonl" --timeline "$run/timeline.json" \
    --devices "$DEV" --tags "$TAGS" --poll-ms "$POLL" --tick-ms "$TICK" --grace "$GRACE" \
    --label "outage-$label-${down}s" --out "$run/analysis.json" "${meta[@]}" >/dev/null
  local out="$RESULTS/outage-$label-${down}s-$DATE.json" extra=()
  [ "$kill_edge" = 1 ] && extra=(--meta "kill_at_s=$kill_at")
  python3 "$HERE/outage_figures.py" figures --records "$run/records.jsonl" \
    --timeline "$run/timeline.json" --analysis "$run/analysis.json" --snaps "$run/snaps" \
    --tags "$TAGS" --poll-ms "$POLL" --grace "$GRACE" --out "$out" "${extra[@]}" \
    >"$run/figures.json"
  python3 "$HERE/annotate.py" "$out" "run_id=$RUN_ID" role=outage "agent=$label" \
    "scenario=$SCEN" "storage=$storage" "down_s=$down" "edge_kill=$kill_edge" \
    "loadavg_before=$load" "machine_busy_pct_before=$busy" "run_dir=$run"
  python3 - "$out" <<'EOF' >&2
import json, sys
d = json.load(open(sys.argv[1])); s = d["outage"]["summary"]; o = d["outage"]
print(f"  expected {s['expected_points']}, delivered {s['delivered_points']}, lost "
      f"{s['lost_points']}, duplicated {s['duplicated_points']}; first data "
      f"{s['first_data_after_restart_s']} s, backlog drained {s['backlog_drained_s']} s; RSS "
      f"{o['rss_mb']['before_kill']} / {o['rss_mb']['max_during_outage']} / "
      f"{o['rss_mb']['after_drain']} MB; other load {o['cpu'].get('other')} % of a core")
EOF
  echo "result: $out" >&2
  stop_all
  sleep 2
}

for AGENT in $AGENTS; do
  for DOWN in $DOWNS; do
    run_one "$AGENT" "$DOWN"
  done
done
python3 "$HERE/report.py" --results "$RESULTS" --out "$RESULTS/REPORT.md" --rss-tier web
echo "report: $RESULTS/REPORT.md" >&2
