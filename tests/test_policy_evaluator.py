"""The reference evaluator: verdicts and deciding rules over a table of connections
(tests/policy_cases/verdicts.yaml), the compiled rule list, audit mode, a randomized
cross-check against a direct reading of the documents, and `edge policy`."""

from __future__ import annotations

import json
from ipaddress import IPv4Network, IPv6Network, ip_address, ip_network
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st
from policy_strategies import policy_settings as shared_settings
from support import edge_cli

from edge.config.load import load_config
from edge.policy.evaluator import FlatRule, evaluate, rules
from edge.policy.spec import (
    Direction,
    NetworkPolicy,
    Peer,
    PolicySettings,
    PortSpec,
    Rule,
    selects,
)

TABLE = yaml.safe_load((Path(__file__).parent / "policy_cases" / "verdicts.yaml").read_text())


def write_table_agent(directory: Path) -> Path:
    (directory / "resolv.conf").write_text(TABLE["resolv_conf"])
    path = directory / "edge.yaml"
    path.write_text(yaml.safe_dump(TABLE["agent"]))
    return path


@pytest.fixture(scope="module")
def table_settings(tmp_path_factory: pytest.TempPathFactory) -> PolicySettings:
    return load_config(write_table_agent(tmp_path_factory.mktemp("table"))).policy


@pytest.mark.parametrize("case", TABLE["cases"],
                         ids=[f"{c[1]}-{c[0]}-{c[2]}-{c[3]}-{c[4]}" for c in TABLE["cases"]])
def test_verdict(table_settings: PolicySettings, case: list[Any]) -> None:
    workload, direction, address, port, protocol, action, enforced, where = case
    v = evaluate(table_settings, workload, direction, address, port, protocol)
    assert (v.action, v.enforced, v.rule.where if v.rule else None) == (action, enforced,
                                                                          where), v.reason


def test_reasons_say_why(table_settings: PolicySettings) -> None:
    def reason(*connection: Any) -> str:
        return evaluate(table_settings, *connection).reason

    assert reason("system.slice/edge.service", "egress", "10.0.0.5", 502, "tcp") == (
        "allowed by policy 'agent' egress[0].ports[0] (to 10.0.0.0/8 except 10.9.0.0/16, "
        "fd00::/8 except fd00:9::/32; TCP 502)")
    assert reason("system.slice/edge.service", "egress", "10.0.0.66", 1, "udp") == (
        "denied by policy 'agent' egressDeny[0] (to 10.0.0.66/32, fd00::66/128; all ports "
        "and protocols): an explicit deny beats any allow")
    assert reason("system.slice/edge.service", "ingress", "10.2.0.9", 22, "tcp") == (
        "no rule allows it: system.slice/edge.service is selected by 'agent', 'extra', so "
        "it is default deny (ingress)")
    assert reason("system.slice/edge.service", "egress", "192.0.2.10", 8883, "tcp") == (
        "allowed by failsafe broker (the uplink broker 192.0.2.10:8883): failsafe rules "
        "are always allowed, whatever a policy denies")
    assert reason("system.slice/mosquitto.service", "egress", "10.5.0.1", 1, "tcp") == (
        "denied by policy 'trial' egressDeny[0] (to 10.5.0.0/16; all ports and protocols): "
        "an explicit deny beats any allow; audit mode: reported as a would-deny, the "
        "connection passes")
    assert reason("system.slice/other.service", "egress", "10.5.0.1", 1, "tcp") == (
        "no policy selects system.slice/other.service: it is not policed")


def test_rules_are_numbered_in_matching_order(table_settings: PolicySettings,
                                              tmp_path: Path) -> None:
    flat = rules(table_settings)
    assert [r.id for r in flat] == list(range(1, len(flat) + 1))
    order = ["failsafe", "deny", "allow", "default"]

    def rank(section: str, action: str) -> int:
        return order.index(section if section in ("failsafe", "default") else action)

    ranks = [rank(r.section, r.action) for r in flat]
    assert ranks == sorted(ranks)
    # the same documents loaded again: the same rules with the same ids
    again = load_config(write_table_agent(tmp_path)).policy

    def key(r: FlatRule) -> tuple[Any, ...]:  # ``why`` names the resolv.conf's directory
        return (r.id, r.where, r.workload, r.direction, r.peers, r.protocol, r.ports)

    assert list(map(key, rules(again))) == list(map(key, flat))
    assert [(r.id, r.where) for r in flat if r.policy == "extra"] == [
        (13, "policy 'extra' egressDeny[0].ports[0]"), (20, "policy 'extra' egress[0].ports[0]"),
        (24, "policy 'extra' default deny (egress)"), (25, "policy 'extra' default deny (ingress)")]
    assert rules(PolicySettings("enforce", (), table_settings.failsafe)) == ()


def test_a_compiled_rule_holds_what_the_datapath_needs(table_settings: PolicySettings) -> None:
    [udp_range] = [r for r in rules(table_settings)
                   if r.where == "policy 'agent' egress[0].ports[1]"]
    assert (udp_range.workload, udp_range.direction, udp_range.action, udp_range.enforce,
            udp_range.protocol, udp_range.ports) == (
        "system.slice/edge.service", "egress", "allow", True, "UDP", (1000, 2000))
    assert udp_range.peers == (Peer(ip_network("10.0.0.0/8"), (ip_network("10.9.0.0/16"),)),
                               Peer(ip_network("fd00::/8"), (ip_network("fd00:9::/32"),)))
    [dns_tcp] = [r for r in rules(table_settings) if r.label == "dns" and r.protocol == "TCP"]
    assert (dns_tcp.workload, dns_tcp.ports, dns_tcp.policy, dns_tcp.index) == (
        None, (53, 53), None, 2)


@pytest.mark.parametrize(("address", "port", "protocol", "message"), [
    ("10.0.0.5", 80, "sctp", "protocol 'sctp' is not tcp, udp or icmp"),
    ("10.0.0.5", None, "icmpv6", "icmpv6 is for IPv6 addresses; use icmp with IPv4"),
    ("fd00::1", None, "1", "IP protocol 1 is ICMP for IPv4; ICMPv6 is 58"),
    ("10.0.0.5", 8, "icmp", "ICMP has no ports: give None"),
    ("10.0.0.5", None, "tcp", "TCP needs a port from 0 to 65535, not None"),
    ("10.0.0.5", 65536, "udp", "UDP needs a port from 0 to 65535, not 65536"),
    ("10.0.0.500", 80, "tcp", "'10.0.0.500' does not appear to be an IPv4 or IPv6 address"),
])
def test_a_connection_that_is_none_is_refused(table_settings: PolicySettings, address: str,
                                              port: int | None, protocol: str,
                                              message: str) -> None:
    with pytest.raises(ValueError, match="^" + message.replace("(", r"\(").replace(")", r"\)")):
        evaluate(table_settings, "system.slice/edge.service", "egress", address, port,
                 protocol)


def test_ip_protocol_numbers_are_understood(table_settings: PolicySettings) -> None:
    w = "system.slice/edge.service"
    assert evaluate(table_settings, w, "egress", "10.0.0.5", 502, "6").action == "allow"
    assert evaluate(table_settings, w, "egress", "fd00::5", None, "58").action == "allow"


def test_an_audit_policy_never_loosens_an_enforced_one() -> None:
    any_tcp = Rule(None, (PortSpec("TCP"),))
    enforced = NetworkPolicy("strict", "app", "enforce", egress=(
        Rule((Peer(ip_network("10.0.0.0/8")),)),))
    audit = NetworkPolicy("trial", "app", "audit", egress=(any_tcp,), egress_deny=(
        Rule((Peer(ip_network("11.0.0.0/8")),)),))
    s = PolicySettings("audit", (enforced, audit))
    # trial's allow is not in force: strict's default deny drops it
    v = evaluate(s, "app", "egress", "12.0.0.1", 443, "tcp")
    assert (v.action, v.enforced, v.passes, v.rule and v.rule.where) == (
        "deny", True, False, "policy 'strict' default deny (egress)")
    # trial's deny of what strict allows: a would-deny, it passes
    v = evaluate(s, "app", "egress", "10.0.0.1", 443, "tcp")
    assert (v.action, v.passes) == ("allow", True)
    v = evaluate(s, "app", "egress", "11.0.0.1", 443, "tcp")
    assert (v.action, v.enforced, v.passes, v.rule and v.rule.where) == (
        "deny", True, False, "policy 'strict' default deny (egress)")
    with_allow = PolicySettings("audit", (enforced, NetworkPolicy(
        "trial", "app", "audit", egress_deny=(Rule((Peer(ip_network("10.1.0.0/16")),)),))))
    v = evaluate(with_allow, "app", "egress", "10.1.0.1", 443, "tcp")
    assert (v.action, v.enforced, v.passes, v.rule and v.rule.where) == (
        "deny", False, True, "policy 'trial' egressDeny[0]")


# --- a randomized cross-check against the documents read directly ----------------------

NETS = ["0.0.0.0/0", "10.0.0.0/8", "10.1.0.0/16", "10.1.2.0/24", "10.1.2.3/32",
        "10.2.0.0/16", "::/0", "fd00::/8", "fd00:1::/32", "fd00:1::3/128"]
ADDRESSES = ["10.1.2.3", "10.1.2.4", "10.1.9.9", "10.2.0.1", "11.0.0.1", "fd00:1::3",
             "fd00:1::4", "fd00:2::1", "fe80::1"]
WORKLOADS = ["a", "a/b", "c"]


port_specs = st.one_of(
    st.just(PortSpec("ICMP")),
    st.builds(PortSpec, st.sampled_from(["TCP", "UDP"])),
    st.tuples(st.sampled_from(["TCP", "UDP"]), st.integers(1, 5), st.integers(0, 2)).map(
        lambda t: PortSpec(t[0], t[1], t[1] + t[2] if t[2] else None)),  # type: ignore[arg-type]
)
policy_settings = shared_settings(NETS, WORKLOADS, port_specs, min_policies=1)


def _in(rule: Rule, address: str, port: int | None, protocol: str) -> bool:
    """The document's meaning: any peer (none: any address) × any ports entry (none:
    everything); an entry without port is every port of its protocol."""
    addr = ip_address(address)
    if rule.peers is not None and not any(
            addr in p.cidr and not any(addr in e for e in p.excepts)
            for p in rule.peers if p.cidr.version == addr.version):
        return False
    return rule.ports is None or any(
        e.protocol == protocol and (protocol == "ICMP" or e.port is None or (
            port is not None and e.port <= port <= (e.end_port or e.port)))
        for e in rule.ports)


def _decide(s: PolicySettings, policies: list[NetworkPolicy], direction: Direction,
            address: str, port: int | None, protocol: str) -> str:
    def side(p: NetworkPolicy, deny: bool) -> tuple[Rule, ...]:
        if direction == "egress":
            return p.egress_deny if deny else p.egress
        return p.ingress_deny if deny else p.ingress

    if not policies:
        return "allow"
    if any(f.direction == direction and _in(f.rule, address, port, protocol)
           for f in s.failsafe):
        return "allow"
    if any(_in(r, address, port, protocol) for p in policies for r in side(p, True)):
        return "deny"
    if any(_in(r, address, port, protocol) for p in policies for r in side(p, False)):
        return "allow"
    return "deny"


@settings(max_examples=400, deadline=None)
@given(policy_settings(), st.sampled_from([*WORKLOADS, "a/b/c", "d"]),
       st.sampled_from(["egress", "ingress"]), st.sampled_from(ADDRESSES),
       st.sampled_from(["TCP", "UDP", "ICMP"]), st.integers(1, 8))
def test_evaluate_agrees_with_the_documents(s: PolicySettings, workload: str,
                                            direction: Direction, address: str,
                                            protocol: str, port: int) -> None:
    port_or_none = None if protocol == "ICMP" else port
    v = evaluate(s, workload, direction, address, port_or_none, protocol)
    selecting = [p for p in s.policies if selects(p.workload, workload)]
    in_force = _decide(s, [p for p in selecting if s.mode_of(p) == "enforce"], direction,
                       address, port_or_none, protocol)
    everything = _decide(s, selecting, direction, address, port_or_none, protocol)
    assert v.passes == (in_force == "allow")
    assert v.action == ("deny" if in_force == "deny" else everything)
    if not selecting:
        assert v.rule is None
        return
    assert v.rule is not None
    assert v.rule.applies(workload, direction)
    if v.rule.section == "failsafe":
        assert v.rule.index is not None
        assert _in(s.failsafe[v.rule.index].rule, address, port_or_none, protocol)
    elif v.rule.section != "default":
        policy = next(p for p in s.policies if p.name == v.rule.policy)
        attribute = {"egress": "egress", "egressDeny": "egress_deny", "ingress": "ingress",
                     "ingressDeny": "ingress_deny"}[v.rule.section]
        assert v.rule.index is not None
        rule: Rule = getattr(policy, attribute)[v.rule.index]
        entry = (None if v.rule.port_entry is None or rule.ports is None
                 else (rule.ports[v.rule.port_entry],))
        assert _in(Rule(rule.peers, entry), address, port_or_none, protocol)


def test_any_address_covers_both_families() -> None:
    s = PolicySettings("enforce", (NetworkPolicy("p", "a", egress=(Rule(),)),))
    [allow] = [r for r in rules(s) if r.section == "egress"]
    assert [p.cidr for p in allow.peers] == [IPv4Network("0.0.0.0/0"), IPv6Network("::/0")]
    for address in ("203.0.113.9", "2001:db8::9"):
        assert evaluate(s, "a", "egress", address, 9, "udp").action == "allow"


# --- edge policy ----------------------------------------------------------------------


def test_edge_policy_explain(tmp_path: Path) -> None:
    path = write_table_agent(tmp_path)
    done = edge_cli("policy", "explain", "-c", str(path), "--workload",
                    "system.slice/edge.service", "--egress", "10.0.0.5", "502", "tcp")
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        "egress of system.slice/edge.service to 10.0.0.5 TCP port 502: allow",
        "rule: #15 policy 'agent' egress[0].ports[0] (enforce)",
        "reason: allowed by policy 'agent' egress[0].ports[0] (to 10.0.0.0/8 except "
        "10.9.0.0/16, fd00::/8 except fd00:9::/32; TCP 502)",
    ]
    done = edge_cli("policy", "explain", "-c", str(path), "--unit", "mosquitto.service",
                    "--egress", "10.5.0.1", "443", "TCP")
    assert done.stdout.splitlines()[:2] == [
        "egress of system.slice/mosquitto.service to 10.5.0.1 TCP port 443: deny (audit: a "
        "would-deny; it passes)",
        "rule: #14 policy 'trial' egressDeny[0] (audit)"]
    done = edge_cli("policy", "explain", "-c", str(path), "--unit", "edge.service",
                    "--ingress", "fe80::1", "546", "udp", "--json")
    out = json.loads(done.stdout)
    assert (out["action"], out["enforced"], out["passes"], out["rule"]["where"],
            out["rule"]["id"], out["rule"]["mode"]) == (
        "allow", True, True, "failsafe dhcpv6", 8, "always")
    done = edge_cli("policy", "explain", "-c", str(path), "--workload", "user.slice",
                    "--egress", "fd00::1", "-", "icmpv6")
    assert done.stdout.splitlines() == [
        "egress of user.slice to fd00::1 ICMPV6: allow",
        "rule: none (no policy selects this workload)",
        "reason: no policy selects user.slice: it is not policed"]


@pytest.mark.parametrize(("args", "message"), [
    (["--egress", "10.0.0.5", "502", "tcp"], "give the workload: --workload CGROUP or --unit"),
    (["--unit", "edge.service"], "give the connection: --egress or --ingress"),
    (["--unit", "edge.service", "--egress", "10.0.0.5", "x", "tcp"],
     "PORT 'x' is not a port from 0 to 65535"),
    (["--unit", "edge.service", "--egress", "10.0.0.5", "7", "icmp"],
     "ICMP has no ports: give - as PORT"),
    (["--unit", "edge.service", "--egress", "gateway", "7", "tcp"],
     "'gateway' is not an IPv4 or IPv6 address"),
])
def test_edge_policy_explain_refuses_what_is_no_connection(tmp_path: Path, args: list[str],
                                                           message: str) -> None:
    done = edge_cli("policy", "explain", "-c", str(write_table_agent(tmp_path)), *args)
    assert done.returncode == 2
    assert message in done.stderr


def test_edge_policy_rules(tmp_path: Path) -> None:
    path = write_table_agent(tmp_path)
    done = edge_cli("policy", "rules", "-c", str(path))
    lines = done.stdout.splitlines()
    assert lines[0].split() == ["ID", "ACTION", "DIR", "MODE", "WORKLOAD", "RULE"]
    assert lines[1].split() == ["1", "allow", "egress", "always", "*", "failsafe",
                                "loopback:", "to", "127.0.0.0/8,", "::1/128;", "all", "ports",
                                "and", "protocols"]
    listed = json.loads(edge_cli("policy", "rules", "-c", str(path), "--json").stdout)
    assert [r["id"] for r in listed] == list(range(1, len(lines)))
    bare = tmp_path / "bare.yaml"
    bare.write_text("node: gw\nstore: {path: ./edge.db}\n")
    assert edge_cli("policy", "rules", "-c", str(bare)).stdout == (
        "no network policy: nothing is policed\n")
    bad = tmp_path / "bad.yaml"
    bad.write_text("node: gw\npolicy: {policies: [{kind: NetworkPolicy}]}\n")
    done = edge_cli("policy", "rules", "-c", str(bad))
    assert done.returncode == 2
    assert f"error: {bad}: policy.policies[0].apiVersion: is required" in done.stderr
