"""``edge policy explain|rules|status|remove``: the network policy as the reference
evaluator (:mod:`edge.policy.evaluator`) sees it, and as the kernel holds it
(:mod:`edge.policy.datapath`)."""

from __future__ import annotations

import json
from ipaddress import ip_address
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

if TYPE_CHECKING:
    from edge.config.runtime import RuntimeConfig
    from edge.policy.evaluator import FlatRule, Verdict
    from edge.policy.spec import Direction

_CONFIG = click.option("-c", "--config", "config_path", default="edge.yaml",
                       show_default=True, type=click.Path(dir_okay=False, path_type=Path),
                       help="The agent file.")


@click.group()
def policy() -> None:
    """The network policy: explain verdicts, list the compiled rules, show what the
    kernel holds (counters, drops), take the datapath away."""


def _settings_of(config_path: Path) -> RuntimeConfig:
    """The validated configuration (in the config child, as ``edge run`` does); the
    warnings about the policy and its failsafe set printed."""
    from edge.cli import runtime_or_exit  # noqa: PLC0415 (edge.cli imports this module)

    cfg = runtime_or_exit(config_path, warn=False)
    cfg = _running(config_path, cfg)
    for w in cfg.warnings:
        if w.field.startswith(("policy", "uplink.host")):
            click.echo(str(w), err=True)
    return cfg


def _running(config_path: Path, cfg: RuntimeConfig) -> RuntimeConfig:
    """The configuration the agent runs: the newest committed bundle on top of the
    agent file (its policies replace the file's), or the file alone."""
    from edge.config.errors import ConfigError  # noqa: PLC0415
    from edge.config.runtime import BundleSource, load_runtime_config  # noqa: PLC0415
    from edge.store.history import History, history_file  # noqa: PLC0415

    path = history_file(cfg.store.path)
    if not path.exists():
        return cfg
    committed = History(path).committed()
    if committed is None or not committed.version:
        return cfg
    try:
        bundle = load_runtime_config(config_path, source=BundleSource(
            content=committed.content))
    except ConfigError as e:
        click.echo(f"note: the committed bundle version {committed.version} does not "
                   f"validate with {config_path} ({e.problems[0].message}): the agent "
                   "file alone is used here", err=True)
        return cfg
    click.echo(f"note: the agent runs bundle version {committed.version}: its policies "
               "are the ones used here", err=True)
    return bundle


def _rule_json(rule: FlatRule) -> dict[str, Any]:
    return {"id": rule.id, "policy": rule.policy, "section": rule.section,
            "index": rule.index, "port_entry": rule.port_entry, "workload": rule.workload,
            "direction": rule.direction, "action": rule.action,
            "mode": _mode(rule),
            "peers": [str(p) for p in rule.peers], "protocol": rule.protocol,
            "ports": list(rule.ports) if rule.ports else None, "label": rule.label,
            "where": rule.where, "matches": rule.describe()}


def _mode(rule: FlatRule) -> str:
    """``always`` (failsafe), ``enforce`` or ``audit``."""
    if rule.section == "failsafe":
        return "always"
    return "enforce" if rule.enforce else "audit"


def _verdict_text(v: Verdict) -> str:
    if v.action == "allow":
        return "allow"
    return "deny (dropped)" if v.enforced else "deny (audit: a would-deny; it passes)"


def _connection(direction: Direction, value: tuple[str, str, str]) -> tuple[str, int | None,
                                                                             str]:
    """``(address, port, protocol)`` of ``--egress``/``--ingress``; click errors for
    what is none."""
    from edge.policy.evaluator import parse_protocol  # noqa: PLC0415

    option = f"--{direction}"
    address, port_text, protocol = value
    try:
        version = ip_address(address).version
    except ValueError:
        raise click.BadParameter(f"{address!r} is not an IPv4 or IPv6 address",
                                 param_hint=option) from None
    try:
        name = parse_protocol(protocol, version)
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint=option) from None
    if name == "ICMP":
        if port_text not in ("-", "0"):
            raise click.BadParameter("ICMP has no ports: give - as PORT", param_hint=option)
        return address, None, protocol
    if not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise click.BadParameter(f"PORT {port_text!r} is not a port from 0 to 65535",
                                 param_hint=option)
    return address, int(port_text), protocol


@policy.command()
@_CONFIG
@click.option("--workload", metavar="CGROUP",
              help="The connection's cgroup, under the cgroup v2 root "
                   "(e.g. system.slice/edge.service).")
@click.option("--unit", metavar="UNIT",
              help="Or the system unit whose cgroup it is (edge.service: "
                   "system.slice/edge.service).")
@click.option("--egress", nargs=3, metavar="ADDRESS PORT PROTOCOL",
              help="A connection the workload opens to ADDRESS:PORT (tcp, udp; icmp, or "
                   "icmpv6 for IPv6, with PORT -).")
@click.option("--ingress", nargs=3, metavar="ADDRESS PORT PROTOCOL",
              help="A connection from ADDRESS to the workload's PORT.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object.")
def explain(config_path: Path, workload: str | None, unit: str | None,
            egress: tuple[str, str, str] | None, ingress: tuple[str, str, str] | None,
            as_json: bool) -> None:
    """The verdict on one connection: allow or deny, the rule that decides (policy,
    section, index, id) and why."""
    from edge.policy.evaluator import evaluate  # noqa: PLC0415
    from edge.policy.spec import unit_cgroup  # noqa: PLC0415

    if (workload is None) == (unit is None):
        raise click.UsageError("give the workload: --workload CGROUP or --unit UNIT")
    if (egress is None) == (ingress is None):
        raise click.UsageError("give the connection: --egress or --ingress ADDRESS PORT "
                               "PROTOCOL")
    direction: Direction = "egress" if egress else "ingress"
    value = egress or ingress
    assert value is not None
    address, port, protocol = _connection(direction, value)
    cgroup = workload.strip("/") if workload is not None else unit_cgroup(str(unit))
    cfg = _settings_of(config_path)
    v = evaluate(cfg.policy, cgroup, direction, address, port, protocol)
    if as_json:
        click.echo(json.dumps({
            "workload": cgroup, "direction": direction, "address": address, "port": port,
            "protocol": protocol.upper(), "action": v.action, "enforced": v.enforced,
            "passes": v.passes, "reason": v.reason,
            "rule": _rule_json(v.rule) if v.rule else None}, indent=2))
        return
    side = "to" if direction == "egress" else "from"
    on = f" port {port}" if port is not None else ""
    click.echo(f"{direction} of {cgroup} {side} {address} {protocol.upper()}{on}: "
               f"{_verdict_text(v)}")
    if v.rule is not None:
        click.echo(f"rule: #{v.rule.id} {v.rule.where} ({_mode(v.rule)})")
    else:
        click.echo("rule: none (no policy selects this workload)")
    click.echo(f"reason: {v.reason}")


@policy.command()
@_CONFIG
@click.option("--json", "as_json", is_flag=True, help="A JSON array.")
def rules(config_path: Path, as_json: bool) -> None:
    """The compiled rules in the order they match, with the ids the datapath's per-rule
    counters are to use."""
    from edge.policy.evaluator import rules as flatten  # noqa: PLC0415

    cfg = _settings_of(config_path)
    flat = flatten(cfg.policy)
    if as_json:
        click.echo(json.dumps([_rule_json(r) for r in flat], indent=2))
        return
    if not flat:
        click.echo("no network policy: nothing is policed")
        return
    click.echo(f"{'ID':>4}  {'ACTION':<6} {'DIR':<7} {'MODE':<7} {'WORKLOAD':<28} RULE")
    for r in flat:
        click.echo(f"{r.id:>4}  {r.action:<6} {r.direction:<7} "
                   f"{_mode(r):<7} {r.workload or '*':<28} "
                   f"{r.where}: {r.describe()}")


def _status(cfg: RuntimeConfig) -> dict[str, Any]:
    """What the agent last wrote (its state file) with the kernel's counters now."""
    from edge.policy.datapath import Datapath  # noqa: PLC0415

    state_file = cfg.store.path.parent / "policy-state.json"
    try:
        body: dict[str, Any] = json.loads(state_file.read_text(encoding="utf-8"))
        body["as_of_ms"] = int(state_file.stat().st_mtime * 1000)
    except (OSError, ValueError):
        body = {"state": "unknown", "reason": f"no agent state in {state_file}",
                "rules": [], "recent": [], "workloads": {}}
    pin = Path(cfg.policy.pin_dir)
    body["pin"] = str(pin)
    try:
        dp = Datapath.open(pin, load=False)
    except OSError as e:
        body["kernel"] = {"pinned": False, "reason": e.strerror or str(e)}
        return body
    try:
        counters = dp.counters()
        body["kernel"] = {"pinned": True, "gen": dp.active_gen(), "datapath": dp.stats()}
    finally:
        dp.close()
    for r in body.get("rules", []):
        r["packets"], r["bytes"] = counters.get(r["id"], (0, 0))
    return body


@policy.command()
@_CONFIG
@click.option("--json", "as_json", is_flag=True, help="One JSON object.")
def status(config_path: Path, as_json: bool) -> None:
    """What the kernel enforces now: the agent's state, each rule's packet and byte
    counters, and the recent drops (needs root to read the kernel's maps)."""
    body = _status(_settings_of(config_path))
    if as_json:
        click.echo(json.dumps(body, indent=2))
        return
    kernel = body["kernel"]
    click.echo(f"network policy: {body['state']}" + (f" ({body['reason']})"
                                                     if body.get("reason") else ""))
    if kernel["pinned"]:
        click.echo(f"kernel: pinned at {body['pin']}, generation {kernel['gen']}; "
                   + ", ".join(f"{k.replace('_', ' ')} {v}"
                               for k, v in kernel["datapath"].items()))
    else:
        click.echo(f"kernel: nothing pinned ({kernel['reason']})")
    for path, cg in body.get("workloads", {}).items():
        click.echo(f"workload {path}: " + (f"cgroup {cg}" if cg is not None
                                           else "no cgroup now (not running)"))
    if body.get("rules"):
        click.echo(f"{'ID':>4}  {'ACTION':<6} {'DIR':<7} {'MODE':<7} {'PACKETS':>9} "
                   f"{'BYTES':>11}  RULE")
        for r in body["rules"]:
            mode = ("always" if r["section"] == "failsafe"
                    else "enforce" if r["enforce"] else "audit")
            click.echo(f"{r['id']:>4}  {r['action']:<6} {r['direction']:<7} {mode:<7} "
                       f"{r.get('packets', '–'):>9} {r.get('bytes', '–'):>11}  "
                       f"{r['where']}: {r['what']}")
    if body.get("recent"):
        click.echo(f"recent drops (newest last; as the agent last wrote them, "
                   f"{_clock(body['as_of_ms'])}):")
        for d in body["recent"][-20:]:
            port = "" if d["protocol"] == "ICMP" else f" {d['port']}"
            click.echo(f"  {_clock(d['time_ms'])} {d['verdict']:<10} {d['direction']:<7} "
                       f"{d['workload']} {d['address']} {d['protocol']}{port}: "
                       f"#{d['rule']} {d['where']}")


def _clock(ms: int) -> str:
    import time  # noqa: PLC0415

    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ms / 1000))


@policy.command()
@_CONFIG
def remove(config_path: Path) -> None:
    """Take the datapath out of the kernel: detach the programs and free the maps
    pinned at policy.pin_dir. Until the agent starts again, nothing is policed."""
    from edge.policy.datapath import Datapath  # noqa: PLC0415

    cfg = _settings_of(config_path)
    pin = Path(cfg.policy.pin_dir)
    try:
        removed = Datapath.remove(pin)
    except OSError as e:
        raise click.ClickException(f"cannot remove {pin}: {e}") from e
    click.echo(f"removed the network policy datapath pinned at {pin}: nothing is policed "
               "now" if removed else f"nothing is pinned at {pin}")
