#!/usr/bin/env python3
"""edge vs the peer, side by side per scenario, with the budgets of DESIGN.md §10.

    report.py [--results bench/results] [--out bench/results/REPORT.md] [--rss-tier core]

Reads the measure.py results that bench/run.sh wrote (``edge-<scenario>-<date>.json``,
``thingsboard-<scenario>-<storage>-<date>.json``, each with a ``bench.run_id``). Per
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
    """``shared`` (the shared start-broker.sh) or ``nodelay`` (mosquitto with TCP_NODELAY)."""
    return str(get(run, "bench", "broker") or "shared")


def variant(runs: list[Run], edge: Run) -> Run | None:
    """The run of the same invocation against the TCP_NODELAY broker, if any."""
    run_id, scenario = get(edge, "bench", "run_id"), get(edge, "bench", "scenario")
    return next(
        (
            r
            for r in runs
            if broker(r) == "nodelay"
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


def verdict(ok: bool | None) -> str:
    return {True: "pass", False: "**FAIL**", None: "inconclusive"}[ok]


def scenario_section(runs: list[Run], scenario: str, rss_tier: str) -> tuple[list[str], list[str]]:
    """(the scenario's markdown, its lines of the budget summary)."""
    title = SCENARIO_TITLES.get(scenario, scenario)
    edge, peers, other = pick(runs, scenario)
    if edge is None:
        return [f"## {title}", "", "No edge run yet (`bench/run.sh " + scenario + "`).", ""], []
    judged = {b.name: (b, *b.check(edge, peers)) for b in budgets(scenario, rss_tier)}
    nodelay = variant(runs, edge)
    shown = (
        [edge] + ([nodelay] if nodelay else []) + [peers[s] for s in PEER_STORAGES if s in peers]
    )
    cols = ["edge"] + (["edge, broker TCP_NODELAY ¹"] if nodelay else [])
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


def report(runs: list[Run], rss_tier: str) -> str:
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
    text = report(load(a.results), a.rss_tier)
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
