#!/usr/bin/env python3
"""edge vs the peer, side by side per scenario, with the budgets of DESIGN.md §10.

    report.py [--results bench/results] [--out bench/results/REPORT.md] [--rss-tier core]

Reads the measure.py results that bench/run.sh wrote (``edge-<scenario>-<date>.json``,
``thingsboard-<scenario>-<storage>-<date>.json``, each with a ``bench.run_id``) and
bench/outage.sh's ``outage-<agent>-<down>s-<date>.json`` (section "Broker outage"). Per
scenario it takes the newest edge run and the peer runs of the same invocation (same
``run_id``); a peer run from another invocation is used only when that one has none,
and is marked so. Without ``--out`` the markdown goes to stdout. Standard library only.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SCENARIO_TITLES = {
    "s1": "s1: 10 devices × 50 tags @ 100 ms",
    "s2": "s2: 100 devices × 20 tags @ 1 s",
}
PEER_STORAGES = ("memory", "sqlite")
RSS_TIERS = {"core": 45.0, "web": 55.0, "full": 65.0}
"""DESIGN.md §10: core ≤ 45 MB; with web ≤ 55 MB; with policy and 3 plugins ≤ 65 MB."""
CPU_SHARE, CPU_AIM = 5, 10
"""edge's CPU ≤ 1/5 of the peer's (same scenario, same run), aiming at 1/10."""

Run = dict[str, Any]


def get(d: Any, *path: str) -> Any:
    """``d[path[0]][path[1]]…`` or None."""
    for key in path:
        if not isinstance(d, dict) or d.get(key) is None:
            return None
        d = d[key]
    return d


def num(value: Any, fmt: str = ".1f") -> str:
    """A number formatted, or an en dash when missing."""
    if isinstance(value, int | float) and not (isinstance(value, float) and math.isnan(value)):
        return format(value, fmt)
    return "–"


@dataclass(frozen=True)
class Budget:
    """One line of DESIGN.md §10 as it applies to one scenario."""

    name: str
    target: str
    check: Callable[[Run, dict[str, Run]], tuple[bool | None, str]]
    """(passed or None when it cannot be judged, how the figure compares)."""


def _over(value: float, limit: float, unit: str, *, higher_is_better: bool = False) -> str:
    """``value`` against ``limit``: by how much it misses or meets it."""
    if higher_is_better:
        gap = limit - value
        return f"{value:.2f}{unit} ({abs(gap):.2f} points {'short' if gap > 0 else 'to spare'})"
    gap = value - limit
    if gap > 0:
        ratio = value / limit if limit else math.inf
        how = f"{ratio:.1f}× the budget" if ratio >= 1.5 else f"+{100 * (ratio - 1):.1f} %"
        return f"{value:.2f}{unit} ({gap:.2f}{unit} over, {how})"
    return f"{value:.2f}{unit} ({-gap:.2f}{unit} under)"


def resolution_pct(run: Run) -> float | None:
    """How far one poll round more or less in the window moves completeness, in %.

    measure.py counts the points that arrived inside a window of ``window_s``; where
    that window cuts the polling rhythm decides whether it holds one round of every
    device more or less, so completeness is only known to ± poll period / window.
    """
    poll_ms, window = get(run, "meta", "poll_ms"), run.get("window_s")
    if not poll_ms or not window:
        return None
    return 100 * float(poll_ms) / 1000 / float(window)


def completeness_budget(minimum: float) -> Budget:
    def check(edge: Run, _peers: dict[str, Run]) -> tuple[bool | None, str]:
        c = edge.get("completeness")
        if c is None:
            return None, "not measured"
        pct, res = c * 100, resolution_pct(edge)
        text = _over(pct, minimum, " %", higher_is_better=True)
        if res is not None:
            text += f"; ± {res:.2f} points: one poll round in a {edge['window_s']:.0f} s window"
        if pct >= minimum:
            return True, text
        if res is not None and pct + res >= minimum:
            return None, text + " (inconclusive: the miss is within that resolution)"
        return False, text

    return Budget("completeness", f"≥ {minimum} %", check)


def p99_budget(limit_ms: float) -> Budget:
    def check(edge: Run, _peers: dict[str, Run]) -> tuple[bool | None, str]:
        p99 = get(edge, "latency_ms", "read_to_mqtt", "p99")
        if p99 is None:
            return None, "not measured"
        return p99 <= limit_ms, _over(p99, limit_ms, " ms")

    return Budget("read→MQTT p99", f"≤ {limit_ms:g} ms", check)


def cpu_budget() -> Budget:
    def check(edge: Run, peers: dict[str, Run]) -> tuple[bool | None, str]:
        mine = get(edge, "cpu_percent", "mean")
        peer = next(
            (get(peers[s], "cpu_percent", "mean") for s in PEER_STORAGES if s in peers), None
        )
        if mine is None or peer is None:
            return None, "no peer run to compare with" if mine is not None else "not measured"
        limit, aim = peer / CPU_SHARE, peer / CPU_AIM
        text = (
            f"{_over(mine, limit, ' %')}; limit {limit:.2f} % = peer's {peer:.1f} % / {CPU_SHARE}"
        )
        text += f"; aim ≤ {aim:.2f} % {'met' if mine <= aim else 'not met'}"
        return mine <= limit, text

    return Budget("CPU % of a core", f"≤ 1/{CPU_SHARE} of the peer's (aim 1/{CPU_AIM})", check)


def rss_budget(tier: str) -> Budget:
    limit = RSS_TIERS[tier]

    def check(edge: Run, _peers: dict[str, Run]) -> tuple[bool | None, str]:
        rss = get(edge, "rss_mb", "max")
        if rss is None:
            return None, "not measured"
        return rss <= limit, _over(rss, limit, " MB")

    return Budget("RSS", f"≤ {limit:g} MB ({tier})", check)


def startup_budget(limit_s: float) -> Budget:
    def check(edge: Run, _peers: dict[str, Run]) -> tuple[bool | None, str]:
        s = edge.get("startup_s_to_first_data_msg")
        if s is None:
            return None, "no reading arrived"
        return s <= limit_s, _over(s, limit_s, " s")

    return Budget("start → first publish", f"≤ {limit_s:g} s", check)


def budgets(scenario: str, rss_tier: str) -> list[Budget]:
    """DESIGN.md §10 for one scenario."""
    if scenario == "s1":
        return [completeness_budget(99.9), p99_budget(20), cpu_budget(), rss_budget(rss_tier)]
    if scenario == "s2":
        return [rss_budget(rss_tier), startup_budget(0.5)]
    return []


def load(results: Path) -> list[Run]:
    """Every result of run.sh in ``results``, with its file name under ``_file``."""
    runs = []
    for path in sorted(results.glob("*.json")):
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(doc, dict) and get(doc, "bench", "role") in ("edge", "peer"):
            doc["_file"], doc["_dir"] = path.name, str(path.parent)
            runs.append(doc)
    return runs


def broker(run: Run) -> str:
    """The run's variant: ``shared`` (the shared start-broker.sh), ``nodelay`` (mosquitto
    with TCP_NODELAY) or ``plugins`` (three WASM plugins loaded; run.sh PLUGINS=1)."""
    return str(get(run, "bench", "broker") or "shared")


def variant(runs: list[Run], edge: Run, kind: str) -> Run | None:
    """The run of the same invocation of variant ``kind``, if any."""
    run_id, scenario = get(edge, "bench", "run_id"), get(edge, "bench", "scenario")
    return next(
        (
            r
            for r in runs
            if broker(r) == kind
            and get(r, "bench", "run_id") == run_id
            and get(r, "bench", "scenario") == scenario
        ),
        None,
    )


def pick(runs: list[Run], scenario: str) -> tuple[Run | None, dict[str, Run], set[str]]:
    """The newest edge run of ``scenario``, the peer runs to compare it with, and the
    storages whose peer run comes from another invocation."""
    mine = [r for r in runs if get(r, "bench", "scenario") == scenario]
    edges = sorted(
        (r for r in mine if r["bench"]["role"] == "edge" and broker(r) == "shared"),
        key=lambda r: r.get("started_at", ""),
    )
    edge = edges[-1] if edges else None
    run_id = get(edge, "bench", "run_id")
    peers: dict[str, Run] = {}
    other: set[str] = set()
    for storage in PEER_STORAGES:
        cands = sorted(
            (
                r
                for r in mine
                if r["bench"]["role"] == "peer" and get(r, "bench", "storage") == storage
            ),
            key=lambda r: (get(r, "bench", "run_id") == run_id, r.get("started_at", "")),
        )
        if cands:
            peers[storage] = cands[-1]
            if get(cands[-1], "bench", "run_id") != run_id:
                other.add(storage)
    return edge, peers, other


FIGURES: list[tuple[str, Callable[[Run], str]]] = [
    (
        "points/s (expected)",
        lambda r: (
            f"{num(r.get('points_per_s'), '.0f')} ({num(r.get('expected_points_per_s'), '.0f')})"
        ),
    ),
    ("completeness %", lambda r: num((r.get("completeness") or math.nan) * 100, ".2f")),
    (
        "read→MQTT p50 / p99 ms",
        lambda r: (
            f"{num(get(r, 'latency_ms', 'read_to_mqtt', 'p50'))} / "
            f"{num(get(r, 'latency_ms', 'read_to_mqtt', 'p99'))}"
        ),
    ),
    ("CPU % of a core (mean)", lambda r: num(get(r, "cpu_percent", "mean"))),
    ("RSS MB (max)", lambda r: num(get(r, "rss_mb", "max"))),
    (
        "start-up s (start → first publish)",
        lambda r: num(r.get("startup_s_to_first_data_msg"), ".2f"),
    ),
    (
        "change→MQTT p50 / p99 ms",
        lambda r: (
            f"{num(get(r, 'latency_ms', 'change_to_mqtt', 'p50'))} / "
            f"{num(get(r, 'latency_ms', 'change_to_mqtt', 'p99'))}"
        ),
    ),
    ("CPU % max", lambda r: num(get(r, "cpu_percent", "max"))),
    ("MQTT messages/s", lambda r: num(r.get("data_msgs_per_s"), ".0f")),
    ("Modbus requests/s", lambda r: num(r.get("modbus_requests_per_s"), ".0f")),
    ("simulator CPU %", lambda r: num(get(r, "watched", "simulator", "cpu_mean"))),
    ("threads (max)", lambda r: num(r.get("threads_max"), ".0f")),
    ("other load, % of a core ²", lambda r: num(other_load(r), ".0f")),
]
FIGURE_BUDGET = {
    "completeness %": "completeness",
    "read→MQTT p50 / p99 ms": "read→MQTT p99",
    "CPU % of a core (mean)": "CPU % of a core",
    "RSS MB (max)": "RSS",
    "start-up s (start → first publish)": "start → first publish",
}


def other_load(run: Run) -> float | None:
    """CPU of everything but the agent, its broker and simulator during the run, in % of a
    core (measure.py's own share included): what else the machine was doing."""
    machine, cpus = run.get("system_cpu_percent_mean_all_cores"), run.get("system_cpus")
    mine = get(run, "cpu_percent", "mean")
    if machine is None or not cpus or mine is None:
        return None
    helpers = sum(get(run, "watched", w, "cpu_mean") or 0.0 for w in ("broker", "simulator"))
    return max(0.0, machine * cpus - mine - helpers)


def verdict(ok: bool | str | None) -> str:
    """pass / FAIL / inconclusive, or a string: why the budget does not apply."""
    if isinstance(ok, str):
        return ok
    return {True: "pass", False: "**FAIL**", None: "inconclusive"}[ok]


@dataclass(frozen=True)
class FullTier:
    """A variant judged by the full-tier RSS budget: ``kind`` (the run's broker
    field), its column, its label in the summary, its footnote."""

    kind: str
    column: str
    label: str
    note: str


FULL_TIER = (
    FullTier("plugins", "edge, 3 WASM plugins ³", "3 WASM plugins",
             "³ The same agent once more with three WASM plugins loaded (units on v0, "
             "derive v_sum = v1 + v2, deadband 0: bench/gen_manifests.py --plugins). The "
             "deadband drops values that did not change, so completeness is not "
             "comparable there."),
    FullTier("policy", "edge, policy enforced ⁴", "policy enforced",
             "⁴ The same agent once more in a cgroup of its own that an enforced network "
             "policy selects (bench/gen_manifests.py --policy; run.sh POLICY=1): every "
             "packet of its Modbus and MQTT connections goes through the datapath."),
)


def scenario_section(runs: list[Run], scenario: str, rss_tier: str) -> tuple[list[str], list[str]]:
    """(the scenario's markdown, its lines of the budget summary)."""
    title = SCENARIO_TITLES.get(scenario, scenario)
    edge, peers, other = pick(runs, scenario)
    if edge is None:
        return [f"## {title}", "", "No edge run yet (`bench/run.sh " + scenario + "`).", ""], []
    judged = {b.name: (b, *b.check(edge, peers)) for b in budgets(scenario, rss_tier)}
    nodelay = variant(runs, edge, "nodelay")
    full = [(v, run) for v in FULL_TIER if (run := variant(runs, edge, v.kind)) is not None]
    shown = (
        [edge] + ([nodelay] if nodelay else []) + [run for _, run in full]
        + [peers[s] for s in PEER_STORAGES if s in peers]
    )
    cols = ["edge"] + (["edge, broker TCP_NODELAY ¹"] if nodelay else [])
    cols += [v.column for v, _ in full]
    cols += [
        f"peer {s}" + (" (other run)" if s in other else "") for s in PEER_STORAGES if s in peers
    ]
    out = [f"## {title}", ""]
    out.append("| figure | " + " | ".join(cols) + " | budget (DESIGN.md §10) | edge vs budget |")
    out.append("|---" * (len(cols) + 3) + "|")
    for name, fig in FIGURES:
        cells = [fig(r) for r in shown]
        b = judged.get(FIGURE_BUDGET.get(name, ""))
        target, ok = (b[0].target, verdict(b[1])) if b else ("", "")
        out.append(f"| {name} | " + " | ".join(cells) + f" | {target} | {ok} |")
    out.append("")
    if edge.get("agent_exited_early") is not None:
        out += [f"edge exited early with status {edge['agent_exited_early']}.", ""]
    summary = [
        f"| {scenario} | {b.name} | {b.target} | {detail} | {verdict(ok)} |"
        for b, ok, detail in judged.values()
    ]
    if nodelay is not None:
        out += [
            "¹ The same agent and simulator once more, against a mosquitto with "
            "`set_tcp_nodelay true` (the shared start-broker.sh leaves it off, so Nagle's "
            "algorithm can hold the broker's small writes to the measuring subscriber for "
            "a delayed-ACK period, ~40 ms). A diagnostic of the broker hop, not the figure "
            "judged; the peer has no such run.",
            "",
        ]
        if "read→MQTT p99" in judged:
            b = judged["read→MQTT p99"][0]
            ok, detail = b.check(nodelay, peers)
            summary.append(
                f"| {scenario} | {b.name}, broker TCP_NODELAY (diagnostic) | {b.target} "
                f"| {detail} | {verdict(ok)} |"
            )
    for v, run in full:
        out += [v.note, ""]
        b = rss_budget("full")
        ok, detail = b.check(run, peers)
        summary.append(f"| {scenario} | {b.name}, {v.label} | {b.target} | {detail} "
                       f"| {verdict(ok)} |")
    out += [
        "² The machine's CPU during the run (all cores, in % of one core) less the agent, "
        "its broker and simulator: measure.py itself (a few %) and whatever else ran. "
        "Much more than ~10 means the figures of that column were taken on a busy machine.",
        "",
    ]
    files = [r["_file"] for r in shown]
    out.append(
        f"Run `{get(edge, 'bench', 'run_id')}`, agent {get(edge, 'meta', 'agent')}, "
        f"edge storage: {get(edge, 'meta', 'storage')}, simulator mode "
        f"{get(edge, 'meta', 'sim_mode')}, window {num(edge.get('window_s'))} s of "
        f"{num(edge.get('duration_s'))} s. Files: " + ", ".join(f"`{f}`" for f in files) + "."
    )
    out.append("")
    profile = Path(edge["_dir"]) / edge["_file"].replace(".json", "-profile.md")
    if profile.exists():
        out += [f"py-spy profile of edge in this scenario: `{profile.name}`.", ""]
    return out, summary


# --- broker outage (bench/outage.sh) ---------------------------------------------------

OUTAGE_AGENTS = ("edge", "edge-live", "edge-sigkill", "thingsboard-memory", "thingsboard-sqlite")
OUTAGE_TITLES = {
    "edge": "edge",
    "edge-live": "edge, uplink.order live",
    "edge-sigkill": "edge, SIGKILL in the outage",
    "thingsboard-memory": "peer memory",
    "thingsboard-sqlite": "peer sqlite",
}
FIRST_DATA_S, DRAIN_S, DRAIN_FOR_DOWN_S = 1.0, 5.0, 60
"""Data flowing ≤ 1 s after the broker is back; a 60 s backlog (the issue's case) drained
within 5 s."""
LIVE_SLACK_MS = 20.0
"""Live readings keep their latency: p99 during the drain ≤ the run's own p99 before the
outage + this (the s1 read→MQTT budget; DESIGN.md §10 has no s2 latency number)."""
RSS_FLAT_MB = 2.0
"""Memory flat while the broker is down: the largest RSS then ≤ the RSS before + this."""


def load_outages(results: Path) -> list[Run]:
    """Every result of outage.sh in ``results`` (``bench.role`` = outage)."""
    runs = []
    for path in sorted(results.glob("outage-*.json")):
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(doc, dict) and get(doc, "bench", "role") == "outage":
            doc["_file"] = path.name
            runs.append(doc)
    return runs


def pick_outages(runs: list[Run], down: str) -> dict[str, Run]:
    """Per agent, the newest run with the broker down ``down`` s; peers preferably from
    the invocation of the edge run shown."""
    mine = [r for r in runs if str(get(r, "bench", "down_s")) == down]
    newest = lambda rs: max(rs, key=lambda r: get(r, "bench", "run_id") or "")  # noqa: E731
    edge = [r for r in mine if get(r, "bench", "agent") == "edge"]
    run_id = get(newest(edge), "bench", "run_id") if edge else None
    out = {}
    for agent in OUTAGE_AGENTS:
        cands = [r for r in mine if get(r, "bench", "agent") == agent]
        if cands:
            same = [r for r in cands if get(r, "bench", "run_id") == run_id]
            out[agent] = newest(same or cands)
    return out


def _lost(r: Run) -> str:
    s = get(r, "outage", "summary") or {}
    lost = s.get("lost_points")
    parts = []
    if s.get("lost_points_unpolled"):
        parts.append(f"{s['lost_points_unpolled']} not polled ³")
    if s.get("lost_points_window_edge"):
        parts.append(f"{s['lost_points_window_edge']} window edge ⁴")
    return num(lost, ".0f") + (f" ({', '.join(parts)})" if parts else "")


def _seq(r: Run) -> str:
    t = get(r, "outage", "seq", "total")
    if not t:
        return "–"
    return f"{t['readings_distinct']} / {t['duplicates']} / {t['gaps']}"


def _rss(r: Run) -> str:
    m = get(r, "outage", "rss_mb") or {}
    return (
        f"{num(m.get('before_kill'))} / {num(m.get('max_during_outage'))} / "
        f"{num(m.get('after_drain'))}"
    )


OUTAGE_FIGURES: list[tuple[str, Callable[[Run], str]]] = [
    ("points expected", lambda r: num(get(r, "outage", "summary", "expected_points"), ".0f")),
    ("points delivered", lambda r: num(get(r, "outage", "summary", "delivered_points"), ".0f")),
    ("points lost", _lost),
    ("points duplicated", lambda r: num(get(r, "outage", "summary", "duplicated_points"), ".0f")),
    ("readings by (device, seq): distinct / duplicates / gaps", _seq),
    (
        "first data after restart s",
        lambda r: num(get(r, "after_restart_s", "first_telemetry"), ".2f"),
    ),
    (
        "backlog drained s (points)",
        lambda r: (
            f"{num(get(r, 'after_restart_s', 'backlog_drained'), '.2f')} "
            f"({num(get(r, 'after_restart_s', 'backlog_points'), '.0f')})"
        ),
    ),
    (
        "live read→MQTT p99 ms: during / after drain",
        lambda r: (
            f"{num(get(r, 'outage', 'latency_ms', 'during_drain_p99'))} / "
            f"{num(get(r, 'outage', 'latency_ms', 'after_drain_p99'))}"
        ),
    ),
    (
        "read→MQTT p50 / p99 ms before the outage",
        lambda r: (
            f"{num(get(r, 'latency_read_to_mqtt_ms', 'before_kill_p50'))} / "
            f"{num(get(r, 'latency_read_to_mqtt_ms', 'before_kill_p99'))}"
        ),
    ),
    ("RSS MB: before / max during outage / after drain", _rss),
    (
        "RSS growth while down MB (MB/min)",
        lambda r: (
            f"{num(get(r, 'outage', 'rss_mb', 'growth_during_outage'))} "
            f"({num(get(r, 'outage', 'rss_mb', 'slope_during_outage_mb_per_min'), '.2f')})"
        ),
    ),
    ("agent CPU % of a core (mean)", lambda r: num(get(r, "outage", "cpu", "agent_mean"))),
    (
        "other load, % of a core ⁵",
        lambda r: (
            num(get(r, "outage", "cpu", "other"), ".0f")
            + (" **disturbed**" if get(r, "outage", "cpu", "disturbed") else "")
        ),
    ),
]


def outage_budgets(label: str, r: Run, down: str) -> list[tuple[str, str, bool | str | None, str]]:
    """(budget, target, verdict, detail) of one edge outage run."""
    out: list[tuple[str, str, bool | str | None, str]] = []
    s = get(r, "outage", "summary") or {}
    net = s.get("lost_points_net")
    if net is not None:
        detail = f"{net} net of {s.get('lost_points')} counted"
        out.append(("readings lost", "0", net == 0, detail))
    first = get(r, "after_restart_s", "first_telemetry")
    if first is not None:
        out.append(
            (
                "first data after restart",
                f"≤ {FIRST_DATA_S:g} s",
                first <= FIRST_DATA_S,
                _over(first, FIRST_DATA_S, " s"),
            )
        )
    drained = get(r, "after_restart_s", "backlog_drained")
    if drained is not None and int(float(down)) == DRAIN_FOR_DOWN_S:
        out.append(
            (
                "backlog drained after restart",
                f"≤ {DRAIN_S:g} s",
                drained <= DRAIN_S,
                _over(drained, DRAIN_S, " s"),
            )
        )
    during = get(r, "outage", "latency_ms", "during_drain_p99")
    pre = get(r, "latency_read_to_mqtt_ms", "before_kill_p99")
    if during is not None and pre is not None:
        lim = pre + LIVE_SLACK_MS
        # uplink.order device keeps each device's readings in order: its live readings
        # follow its own backlog, so they are as late as the drain is long, by design
        in_order = label != "edge-live"
        out.append(
            (
                "live read→MQTT p99 during the drain",
                f"≤ pre-outage p99 + {LIVE_SLACK_MS:g} ms",
                "n/a (order device)" if in_order and during > lim else during <= lim,
                _over(during, lim, " ms") + f"; pre-outage p99 {pre:.1f} ms",
            )
        )
    m = get(r, "outage", "rss_mb") or {}
    if m.get("growth_during_outage") is not None:
        g = m["growth_during_outage"]
        out.append(
            (
                "RSS flat while the broker is down",
                f"growth ≤ {RSS_FLAT_MB:g} MB",
                g <= RSS_FLAT_MB,
                _over(g, RSS_FLAT_MB, " MB")
                + f", {m.get('slope_during_outage_mb_per_min')} MB/min",
            )
        )
    return [(f"{OUTAGE_TITLES[label]}: {b}", t, ok, d) for b, t, ok, d in out]


def outage_section(runs: list[Run]) -> tuple[list[str], list[str]]:
    """(the outage markdown, its lines of the budget summary)."""
    if not runs:
        return [], []
    out = [
        "## Broker outage",
        "",
        "`bench/outage.sh`: the broker (mosquitto with persistence) is stopped PRE s into "
        "the run and started again on the same port DOWN s later; a subscriber with a "
        "persistent session records every message; the shared `outage_analyze.py` counts "
        "poll cycles (distinct `counter` per device) against those due, "
        "`bench/outage_figures.py` adds the rest. Points = cycles × tags. Times after the "
        "broker restart.",
        "",
    ]
    summary: list[str] = []
    downs = sorted({str(get(r, "bench", "down_s")) for r in runs}, key=float)
    for down in downs:
        picked = pick_outages(runs, down)
        shown = [a for a in OUTAGE_AGENTS if a in picked]
        first = picked[shown[0]]
        scen = get(first, "bench", "scenario")
        out += [f"### {SCENARIO_TITLES.get(scen, scen)}, broker down {down} s", ""]
        out.append("| figure | " + " | ".join(OUTAGE_TITLES[a] for a in shown) + " |")
        out.append("|---" * (len(shown) + 1) + "|")
        for name, fig in OUTAGE_FIGURES:
            out.append(f"| {name} | " + " | ".join(fig(picked[a]) for a in shown) + " |")
        out.append("")
        for a in shown:
            r = picked[a]
            out.append(
                f"* {OUTAGE_TITLES[a]}: `{r['_file']}`, run `{get(r, 'bench', 'run_id')}`, "
                f"{get(r, 'meta', 'agent')}, broker down "
                f"{num(get(r, 'timeline_s', 'broker_down_s'), '.1f')} s"
                + (
                    f", SIGKILL {num(get(r, 'outage', 'agent_kill', 't_rel_broker_kill_s'))} s "
                    "into it"
                    if get(r, "outage", "agent_kill")
                    else ""
                )
            )
            if a.startswith("edge"):
                summary += [
                    f"| outage {down} s | {b} | {t} | {d} | {verdict(ok)} |"
                    for b, t, ok, d in outage_budgets(a, r, down)
                ]
        out.append("")
    out += [
        "³ Cycles due while edge restarted after its SIGKILL (from the kill to the new "
        "process's first read of the device): never read, so nothing the agent had was lost.",
        "",
        "⁴ `outage_analyze.py` counts floor((cutoff − last cycle) / period) cycles missing "
        "at the end of a device; with the simulator's 100 ms tick, cycles are 0.9–1.1 s "
        "apart and one can fall just after the cutoff. Counted here when the device's next "
        "cycle (in the grace seconds) follows without a cycle missing in between.",
        "",
        "⁵ The machine's CPU during the run (all cores, % of one core) less the agent, broker, "
        "simulator and subscriber (and the peer's platform stand-in): tests or anything else "
        "that ran. Above 15 the run is marked disturbed.",
        "",
    ]
    return out, summary


def report(runs: list[Run], rss_tier: str, outages: list[Run] | None = None) -> str:
    """The whole REPORT.md."""
    head = [
        "# Benchmark: edge vs ThingsBoard IoT Gateway",
        "",
        "Generated by `bench/report.py` from the JSON files beside it; how to run and what "
        "each figure means: `bench/README.md`. Same machine, same simulator, harness and "
        "duration, one after the other in one invocation of `bench/run.sh`. CPU is the "
        "agent's process tree, 100 % = one core. Rates and latencies exclude the first "
        "5 s after the first reading.",
        "",
    ]
    body: list[str] = []
    summary: list[str] = []
    for scenario in SCENARIO_TITLES:
        section, lines = scenario_section(runs, scenario, rss_tier)
        body += section
        summary += lines
    section, lines = outage_section(outages or [])
    body += section
    summary += lines
    host = next((r.get("host") for r in runs if r.get("host")), None)
    if host:
        head += [
            f"Host: {host.get('cpus')} CPUs ({host.get('cpu_model')}), Python "
            f"{host.get('python')}, kernel {host.get('kernel')}, {host.get('mosquitto')}.",
            "",
        ]
    if summary:
        head += [
            "## Budgets",
            "",
            "| scenario | budget | target | edge | verdict |",
            "|---|---|---|---|---|",
            *summary,
            "",
        ]
    return "\n".join(head + body)


def longer_runs(results: Path) -> list[str]:
    """Completeness of the edge runs in sub-directories (e.g. ``s1-300s/``), which narrow
    the resolution that a 60 s window leaves (see :func:`resolution_pct`)."""
    rows = []
    for sub in sorted(d for d in results.iterdir() if d.is_dir()):
        for r in load(sub):
            if r["bench"]["role"] != "edge" or r.get("completeness") is None:
                continue
            scenario = get(r, "bench", "scenario")
            b = next((b for b in budgets(scenario, "core") if b.name == "completeness"), None)
            ok, detail = b.check(r, {}) if b else (None, "no completeness budget")
            p99 = get(r, "latency_ms", "read_to_mqtt", "p99")
            rows.append(
                f"| `{sub.name}/{r['_file']}` | {get(r, 'meta', 'agent')} | {scenario} "
                f"| {num(r.get('window_s'), '.0f')} s "
                f"| {detail} | {num(p99)} | {num(get(r, 'cpu_percent', 'mean'))} "
                f"| {num(get(r, 'rss_mb', 'max'))} | {verdict(ok) if b else ''} |"
            )
    if not rows:
        return []
    return [
        "## Longer edge runs",
        "",
        "edge alone (no peer), for a finer completeness; other figures as above.",
        "",
        "| file | agent | scenario | window | completeness | read→MQTT p99 ms | CPU % | RSS MB "
        "| verdict |",
        "|---|---|---|---|---|---|---|---|---|",
        *rows,
        "",
    ]


def main() -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    here = Path(__file__).resolve().parent
    p.add_argument("--results", type=Path, default=here / "results")
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--rss-tier", choices=sorted(RSS_TIERS), default="core")
    a = p.parse_args()
    text = report(load(a.results), a.rss_tier, load_outages(a.results))
    longer = longer_runs(a.results)
    if longer:
        text += "\n" + "\n".join(longer)
    if a.out is None:
        sys.stdout.write(text)
    else:
        a.out.write_text(text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
