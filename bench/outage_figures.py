#!/usr/bin/env python3
"""bench/outage.sh's figures beyond the shared outage_analyze.py, and CPU snapshots.

    outage_figures.py snap --out S.json [--pid NAME=PID ...]
    outage_figures.py figures --records R.jsonl --timeline T.json --analysis A.json \\
        --snaps DIR --tags 20 --poll-ms 1000 --out RESULT.json [--meta K=V ...]

``snap`` records the time, the machine's CPU counters (/proc/stat) and the CPU
ticks of the named processes, so ``figures`` can say how busy the machine was in
each phase and what else than the agent, broker and simulator ran (2 cores,
tests may run concurrently).

``figures`` reads the shared analyzer's result (``A.json``, kept whole in the
output) and the same records, and adds ``outage``:

* ``seq`` (edge only: its readings carry ``seq``): per device and agent process
  (before / after a SIGKILL, by the reading's ``ts``) the distinct seqs
  delivered, extra copies (duplicates by (device, seq)), seqs missing between the
  first and last delivered one (gaps), and the first seq seen per process;
* ``agent_kill`` (EDGE_KILL=1): poll cycles missing while the agent was down
  (from the SIGKILL to the restarted agent's first read of that device): not
  polled, so not readings lost; ``lost_excluding_unpolled`` is the rest;
* ``latency_ms``: read→MQTT of live readings (read after the agent's first
  message after the restart) while the backlog still drained, and after it;
* ``rss_mb``: the agent's RSS before the broker was killed, the largest while it
  was down, right after the drain (first sample ≥ 1 s after it) and at the end,
  and how fast it grew while the broker was down (least squares, MB/min);
* ``cpu``: the machine (all cores, % of one core) per phase, the agent (mean of
  the subscriber's samples), broker, simulator, subscriber, and ``other``: the
  machine less all of those. ``disturbed`` when other > DISTURBED_PCT.
Standard library only.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import statistics
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

STARTUP_S = 5.0
"""Seconds after an agent's (re)start whose RSS samples are start-up (validating child)."""
DISTURBED_PCT = 15.0
"""% of a core used by something else than the run's own processes: a disturbed run."""


def pct(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    s = sorted(xs)
    k = (len(s) - 1) * q
    f = int(k)
    c = min(f + 1, len(s) - 1)
    return round(s[f] + (s[c] - s[f]) * (k - f), 1)


# --- snap -----------------------------------------------------------------------------


def _proc_ticks(pid: int) -> int | None:
    """utime + stime of one process, clock ticks (None when it is gone)."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text(encoding="ascii")
    except OSError:
        return None
    fields = text[text.rindex(")") + 2 :].split()
    return int(fields[11]) + int(fields[12])


def cmd_snap(a: argparse.Namespace) -> None:
    cpu = Path("/proc/stat").read_text(encoding="ascii").splitlines()[0].split()[1:]
    ticks = [int(x) for x in cpu]
    idle = ticks[3] + (ticks[4] if len(ticks) > 4 else 0)  # idle + iowait
    pids = {}
    for kv in a.pid:
        name, _, pid = kv.partition("=")
        if pid.strip():
            pids[name] = {"pid": int(pid), "ticks": _proc_ticks(int(pid))}
    snap = {
        "t": time.time(),
        "total": sum(ticks[:8]),
        "idle": idle,
        "cpus": os.cpu_count(),
        "clk_tck": os.sysconf("SC_CLK_TCK"),
        "loadavg": list(os.getloadavg()),
        "pids": pids,
    }
    Path(a.out).write_text(json.dumps(snap) + "\n", encoding="utf-8")


# --- figures --------------------------------------------------------------------------


def read_records(path: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(messages, proc samples)."""
    msgs, proc = [], []
    with open(path, encoding="utf-8") as f:
        for line in f:
            r = json.loads(line)
            ev = r.get("event")
            if ev == "proc":
                proc.append(r)
            elif ev is None:
                msgs.append(r)
    return msgs, proc


def seq_figures(
    msgs: list[dict[str, Any]], t_edge_kill: float | None, cutoff: float
) -> dict[str, Any] | None:
    """Duplicates and gaps by (device, seq), per agent process."""
    seen: dict[tuple[str, int], dict[int, list[int]]] = defaultdict(lambda: defaultdict(list))
    any_seq = False
    for m in msgs:
        for row, seq in zip(m.get("entries", ()), m.get("seqs", ()), strict=False):
            if seq is None or row[1] is None:
                continue
            any_seq = True
            ts_s = row[1] / 1000.0
            if ts_s > cutoff:
                continue
            proc = 1 if t_edge_kill is not None and ts_s >= t_edge_kill else 0
            seen[(row[0], proc)][int(seq)].append(m["dup"])
    if not any_seq:
        return None
    out: dict[str, Any] = {}
    for proc in sorted({p for _, p in seen}):
        keys = [k for k in seen if k[1] == proc]
        distinct = dups = dups_flag = gaps = 0
        firsts = []
        for k in keys:
            s = seen[k]
            distinct += len(s)
            dups += sum(len(v) - 1 for v in s.values())
            dups_flag += sum(sum(v[1:]) for v in s.values())
            lo, hi = min(s), max(s)
            gaps += (hi - lo + 1) - len(s)
            firsts.append(lo)
        out["after_agent_restart" if proc else "first_agent"] = {
            "devices": len(keys),
            "readings_distinct": distinct,
            "duplicates": dups,
            "duplicates_with_dup_flag": dups_flag,
            "gaps": gaps,
            "first_seq_min": min(firsts),
            "first_seq_max": max(firsts),
        }
    tot = {k: sum(v[k] for v in out.values()) for k in ("readings_distinct", "duplicates", "gaps")}
    return {
        "total": tot,
        **out,
        "note": (
            "per device and agent process (before/after the SIGKILL, by the reading's ts); "
            "gaps = seqs missing between the first and last delivered one; duplicates = extra "
            "copies of a (device, seq); readings counted up to the cutoff"
        ),
    }


def cycles(msgs: list[dict[str, Any]], cutoff: float = math.inf) -> dict[str, dict[int, float]]:
    """device -> counter -> tick time (change_ts, s), as outage_analyze.py dates cycles."""
    out: dict[str, dict[int, float]] = defaultdict(dict)
    for m in msgs:
        for dev, _ts, read_ts, chg, counter, _n in m.get("entries", ()):
            if counter is None:
                continue
            t = (chg or read_ts or 0) / 1000.0
            if t <= cutoff:
                prev = out[dev].get(int(counter))
                out[dev][int(counter)] = t if prev is None else min(prev, t)
    return out


def tail_artifacts(
    cyc: dict[str, dict[int, float]], res: dict[str, Any], cutoff: float, t_kill: float
) -> int:
    """Tail cycles outage_analyze.py counts missing that were only late for the cutoff.

    It counts floor((cutoff - last cycle) / period) cycles missing at the end of each
    device; with the simulator's 100 ms tick a device's cycles are 0.9..1.1 s apart,
    so one of them can fall just after the cutoff. When the device's next cycle (read
    after the cutoff, in the grace seconds) follows the last one counted without a
    missing cycle in between, none was lost there.
    """
    n = 0
    for dev, d in res.get("per_device", {}).items():
        tail = d.get("missing_by_phase", {}).get("tail", 0)
        if not tail or dev not in cyc:
            continue
        times = sorted(cyc[dev].values())
        before = [t for t in times if t <= cutoff]
        after = [t for t in times if t > cutoff]
        if not before or not after:
            continue
        pre = [b - a for a, b in itertools.pairwise(before) if b < t_kill]
        period = statistics.median(pre) if pre else d.get("period_s", 1.0)
        missing_between = max(0, round((after[0] - before[-1]) / period) - 1)
        n += tail - min(tail, missing_between)
    return n


def unpolled(
    msgs: list[dict[str, Any]],
    cyc: dict[str, dict[int, float]],
    t_kill_agent: float,
    t_agent_back: float,
    t_broker_kill: float,
    poll_s: float,
) -> dict[str, Any]:
    """Cycles missing while the agent was down (SIGKILL .. its first read of the device)."""
    first_read: dict[str, float] = {}
    for m in msgs:
        for dev, _ts, read_ts, _c, _k, _n in m.get("entries", ()):
            if read_ts and read_ts / 1000.0 >= t_agent_back:
                first_read[dev] = min(first_read.get(dev, math.inf), read_ts / 1000.0)
    n_unpolled = n_lost_down = 0
    for dev, cs in cyc.items():
        times = sorted(cs.values())
        pre = [b - a for a, b in itertools.pairwise(times) if b < t_broker_kill]
        period = statistics.median(pre) if pre else poll_s
        back = first_read.get(dev, math.inf)
        for a_, b_ in itertools.pairwise(times):
            k = round((b_ - a_) / period)
            for j in range(1, k):
                slot = a_ + j * period
                if t_kill_agent <= slot < back:
                    n_unpolled += 1
                elif slot >= t_broker_kill and slot < t_kill_agent:
                    n_lost_down += 1
    return {
        "unpolled_cycles": n_unpolled,
        "missing_cycles_read_before_sigkill": n_lost_down,
        "respawn_s": round(t_agent_back - t_kill_agent, 2),
        "first_read_after_restart_s": round(min(first_read.values()) - t_kill_agent, 2)
        if first_read
        else None,
    }


def agent_reconnected(msgs: list[dict[str, Any]], t_restart: float) -> float | None:
    """Arrival of the agent's first message after the broker restart that is not a DUP.

    A DUP that arrives first is the broker re-delivering, from the subscriber's saved
    session, what it had not acknowledged before the outage (e.g. the retained state):
    it says nothing about the agent, which connects on its own back-off later."""
    return min((m["t"] for m in msgs if m["t"] >= t_restart and not m.get("dup")),
               default=None)


def live_latency(
    msgs: list[dict[str, Any]], t_live: float | None, t_drained: float | None, cutoff: float
) -> dict[str, Any]:
    """read→MQTT of live readings during and after the drain (first copy of a cycle)."""
    first: dict[tuple[str, int], tuple[float, float]] = {}
    for m in msgs:
        for dev, _ts, read_ts, _c, counter, _n in m.get("entries", ()):
            if counter is None or not read_ts:
                continue
            key = (dev, int(counter))
            if key not in first or m["t"] < first[key][0]:
                first[key] = (m["t"], read_ts / 1000.0)
    during, after = [], []
    if t_live is not None:
        end = t_drained if t_drained is not None else t_live
        for arr, read_s in first.values():
            if t_live <= read_s <= end:
                during.append((arr - read_s) * 1000)
            elif read_s > end and read_s <= cutoff:
                after.append((arr - read_s) * 1000)
    return {
        "during_drain_n": len(during),
        "during_drain_p50": pct(during, 0.5),
        "during_drain_p99": pct(during, 0.99),
        "during_drain_max": pct(during, 1.0),
        "after_drain_n": len(after),
        "after_drain_p50": pct(after, 0.5),
        "after_drain_p99": pct(after, 0.99),
        "note": (
            "live = read at or after the agent's first message (not a DUP) after the broker "
            "restart; during drain = read by the last backlog arrival (whenever it "
            "arrived); after = read after it, up to the cutoff; first copy of each cycle"
        ),
    }


def slope_mb_per_min(samples: list[tuple[float, float]]) -> float | None:
    if len(samples) < 3:
        return None
    mt = statistics.fmean(t for t, _ in samples)
    mr = statistics.fmean(r for _, r in samples)
    den = sum((t - mt) ** 2 for t, _ in samples)
    if den == 0:
        return None
    return round(60 * sum((t - mt) * (r - mr) for t, r in samples) / den, 2)


def rss_figures(
    proc: list[dict[str, Any]],
    t_kill: float,
    t_restart: float,
    t_drained: float | None,
    t_stop: float,
    restarts: tuple[float, ...] = (),
) -> dict[str, Any]:
    before = [p["rss_mb"] for p in proc if p["t"] <= t_kill]
    in_outage = [(p["t"], p["rss_mb"]) for p in proc if t_kill < p["t"] <= t_restart]
    # an agent restarted after a SIGKILL is left out for STARTUP_S: its validating child
    # and imports are start-up, not the backlog
    during = [(t, r) for t, r in in_outage if not any(0 <= t - s < STARTUP_S for s in restarts)]
    after = [p["rss_mb"] for p in proc if t_drained is not None and p["t"] >= t_drained + 1.0]
    end = [p["rss_mb"] for p in proc if p["t"] <= t_stop]
    b = before[-1] if before else None
    m = max((r for _, r in during), default=None)
    return {
        "before_kill": b,
        "max_during_outage": m,
        "after_drain": after[0] if after else None,
        "end": end[-1] if end else None,
        "max": max((p["rss_mb"] for p in proc), default=None),
        "max_during_outage_incl_startup": max((r for _, r in in_outage), default=None),
        "growth_during_outage": round(m - b, 1) if m is not None and b is not None else None,
        "slope_during_outage_mb_per_min": slope_mb_per_min(during),
        "pids": sorted({p["pid"] for p in proc if "pid" in p}),
    }


def cpu_figures(snaps: Path, proc: list[dict[str, Any]], tl: dict[str, Any]) -> dict[str, Any]:
    """Machine CPU per phase and the run's own processes, % of one core."""
    s = {p.stem: json.loads(p.read_text(encoding="utf-8")) for p in snaps.glob("*.json")}
    if "start" not in s or "stop" not in s:
        return {}

    def busy(a: dict[str, Any], b: dict[str, Any]) -> float | None:
        dt = b["total"] - a["total"]
        if dt <= 0:
            return None
        return round(100 * b["cpus"] * (dt - (b["idle"] - a["idle"])) / dt, 1)

    phases = {}
    order = [k for k in ("start", "kill", "restart", "stop") if k in s]
    names = {
        ("start", "kill"): "before_kill",
        ("kill", "restart"): "broker_down",
        ("restart", "stop"): "after_restart",
        ("start", "restart"): "before_restart",
    }
    for x, y in itertools.pairwise(order):
        phases[names.get((x, y), f"{x}_{y}")] = busy(s[x], s[y])
    start, stop = s["start"], s["stop"]
    wall = stop["t"] - start["t"]
    hz = stop["clk_tck"]

    def used(name: str) -> float:
        """% of a core of one helper over the run: ticks at its last snapshot less at start."""
        last = None
        for k in reversed(order):
            got = s[k]["pids"].get(name, {}).get("ticks")
            if got is not None:
                last = got
                break
        first = start["pids"].get(name, {}).get("ticks") or 0
        return 100 * ((last or 0) - first) / hz / wall if wall > 0 else 0.0

    helpers = {
        "simulator": used("simulator"),
        "broker": used("broker1") + used("broker2"),
        "subscriber": used("subscriber"),
        "platform": used("platform"),
    }
    window = [p["cpu"] for p in proc if start["t"] <= p["t"] <= stop["t"]]
    agent = statistics.fmean(window) if window else 0.0
    machine = busy(start, stop) or 0.0
    other = max(0.0, machine - agent - sum(helpers.values()))
    return {
        "machine_by_phase": phases,
        "machine": machine,
        "agent_mean": round(agent, 1),
        "agent_max": max(window, default=None),
        **{k: round(v, 1) for k, v in helpers.items()},
        "other": round(other, 1),
        "disturbed": other > DISTURBED_PCT,
        "loadavg": {k: s[k]["loadavg"] for k in order},
        "note": (
            f"% of one core; other = machine less agent, broker, simulator, "
            f"subscriber{', platform stand-in' if helpers['platform'] else ''}: "
            f"disturbed when above {DISTURBED_PCT:g}"
        ),
    }


def cmd_figures(a: argparse.Namespace) -> None:
    res = json.loads(Path(a.analysis).read_text(encoding="utf-8"))
    tl = json.loads(Path(a.timeline).read_text(encoding="utf-8"))
    msgs, proc = read_records(a.records)
    t_start, t_kill, t_restart, t_stop = (
        tl["t_agent_start"],
        tl["t_kill"],
        tl["t_restart"],
        tl["t_agent_stop"],
    )
    cutoff = t_stop - a.grace
    ar = res.get("after_restart_s", {})
    t_first = agent_reconnected(msgs, t_restart)
    t_drained = (
        t_restart + ar["backlog_drained"] if ar.get("backlog_drained") is not None else t_first
    )
    t_edge_kill = tl.get("t_edge_kill")
    out: dict[str, Any] = {}
    out["seq"] = seq_figures(msgs, t_edge_kill, cutoff)
    pts = res["points"]
    if t_edge_kill is not None:
        k = unpolled(
            msgs,
            cycles(msgs, cutoff),
            t_edge_kill,
            tl["t_edge_restart"],
            t_kill,
            a.poll_ms / 1000.0,
        )
        k["unpolled_points"] = k["unpolled_cycles"] * a.tags
        k["lost_excluding_unpolled"] = pts["lost_cadence"] - k["unpolled_points"]
        k["t_rel_broker_kill_s"] = round(t_edge_kill - t_kill, 2)
        out["agent_kill"] = k
    out["latency_ms"] = live_latency(msgs, t_first, t_drained, cutoff)
    restarts = (tl["t_edge_restart"],) if t_edge_kill is not None else ()
    out["rss_mb"] = rss_figures(proc, t_kill, t_restart, t_drained, t_stop, restarts)
    out["cpu"] = cpu_figures(Path(a.snaps), proc, tl)
    tail = tail_artifacts(cycles(msgs), res, cutoff, t_kill) * a.tags
    unpolled_pts = out.get("agent_kill", {}).get("unpolled_points", 0)
    out["summary"] = {
        "expected_points": pts["expected_cadence"],
        "delivered_points": pts["delivered_unique"],
        "lost_points": pts["lost_cadence"],
        "lost_points_unpolled": unpolled_pts,
        "lost_points_window_edge": tail,
        "lost_points_net": pts["lost_cadence"] - unpolled_pts - tail,
        "duplicated_points": pts["duplicates"],
        "first_data_after_restart_s": ar.get("first_telemetry"),
        "backlog_drained_s": ar.get("backlog_drained"),
        "backlog_points": ar.get("backlog_points"),
        "agent_runs_s": round(t_stop - t_start, 1),
        "note": (
            "points = poll cycles x tags (outage_analyze.py, gap count); lost_points_unpolled: "
            "cycles due while the agent restarted after its SIGKILL (never read); "
            "lost_points_window_edge: tail cycles that arrived just after the cutoff "
            "(tail_artifacts); lost_points_net: the rest"
        ),
    }
    res["outage"] = out
    for kv in a.meta:
        k, _, v = kv.partition("=")
        res.setdefault("meta", {})[k] = v
    Path(a.out).write_text(json.dumps(res, indent=1) + "\n", encoding="utf-8")
    print(json.dumps(out, indent=1))


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sp = ap.add_subparsers(dest="cmd", required=True)
    s = sp.add_parser("snap")
    s.add_argument("--out", required=True)
    s.add_argument("--pid", action="append", default=[], metavar="NAME=PID")
    s.set_defaults(fn=cmd_snap)
    f = sp.add_parser("figures")
    f.add_argument("--records", required=True)
    f.add_argument("--timeline", required=True)
    f.add_argument("--analysis", required=True)
    f.add_argument("--snaps", required=True, help="dir of snap JSONs: start, kill, restart, stop")
    f.add_argument("--tags", type=int, required=True)
    f.add_argument("--poll-ms", type=int, required=True)
    f.add_argument("--grace", type=float, default=3.0, help="as outage_analyze.py's")
    f.add_argument("--out", required=True)
    f.add_argument("--meta", action="append", default=[])
    f.set_defaults(fn=cmd_figures)
    a = ap.parse_args()
    a.fn(a)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
