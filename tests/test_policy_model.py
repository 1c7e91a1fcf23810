"""NetworkPolicy documents as `edge check` sees them: the exact errors of what is wrong,
where policies come from (agent file, bundle), the failsafe set resolved at load time,
and the plain settings the agent gets."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from ipaddress import ip_network
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from support import Subscriber, start_broker, start_edge

from edge.config.errors import ConfigError, Problem
from edge.config.load import LoadedConfig, load_bundle_config, load_config
from edge.config.runtime import BundleSource, load_runtime_config
from edge.policy.evaluator import rules
from edge.policy.spec import NetworkPolicy, Peer, PortSpec, Rule, unit_cgroup
from edge.policy.tables import MAX_RULES
from edge.sync.bundle import load_private_key, new_key_pair, rfc3339, sign


def doc(name: str = "agent", **spec: Any) -> dict[str, Any]:
    """A NetworkPolicy document selecting edge.service, with ``spec`` laid on top."""
    return {"apiVersion": "gateway.edge/v1alpha1", "kind": "NetworkPolicy",
            "metadata": {"name": name},
            "spec": {"workload": {"systemdUnit": "edge.service"}, **spec}}


def agent_file(tmp_path: Path, policies: list[Any] | None = None, **policy: Any) -> Path:
    (tmp_path / "resolv.conf").write_text("nameserver 192.0.2.53\n")
    path = tmp_path / "edge.yaml"
    section = {"failsafe": {"resolv_conf": "./resolv.conf"}, **policy}
    if policies is not None:
        section["policies"] = policies
    path.write_text(yaml.safe_dump({"node": "gw", "store": {"path": "./edge.db"},
                                    "uplink": {"host": "127.0.0.1", "port": 1883},
                                    "policy": section}))
    return path


def problems(load: Any) -> list[str]:
    with pytest.raises(ConfigError) as e:
        load()
    return [f"{p.field}: {p.message}" for p in e.value.problems if p.severity == "error"]


def errors(tmp_path: Path, *policies: Any, **policy: Any) -> list[str]:
    path = agent_file(tmp_path, list(policies), **policy)
    return problems(lambda: load_config(path))


P = "policy.policies[0].spec."


@pytest.mark.parametrize(("spec", "expected"), [
    ({"egress": [{"to": [{"cidr": "10.0.0.0/33"}]}]},
     f"{P}egress[0].to[0].cidr: '10.0.0.0/33' is not an IPv4 or IPv6 network; write a "
     "CIDR such as 10.0.0.0/8 or fd00::/8 (an address alone is a /32 or /128)"),
    ({"egress": [{"to": [{"cidr": "fd00::/8/8"}]}]},
     f"{P}egress[0].to[0].cidr: 'fd00::/8/8' is not an IPv4 or IPv6 network; write a "
     "CIDR such as 10.0.0.0/8 or fd00::/8 (an address alone is a /32 or /128)"),
    ({"egress": [{"to": [{"cidr": "10.0.0.5/8"}]}]},
     f"{P}egress[0].to[0].cidr: '10.0.0.5/8' has host bits set: the network is 10.0.0.0/8 "
     "(or write the address alone for just that address)"),
    ({"egress": [{"to": [{"cidr": 10}]}]},
     f"{P}egress[0].to[0].cidr: must be a CIDR as a string, such as 10.0.0.0/8 or "
     "fd00::/8 (got 10)"),
    ({"egressDeny": [{"to": [{"cidr": "10.0.0.0/8", "except": ["10.9.0.0/16",
                                                                "192.168.0.0/16"]}]}]},
     f"{P}egressDeny[0].to[0].except: 192.168.0.0/16 is not inside its cidr 10.0.0.0/8: "
     "an except must lie inside its cidr"),
    ({"ingress": [{"from": [{"cidr": "10.0.0.0/8", "except": ["fd00::/16"]}]}]},
     f"{P}ingress[0].from[0].except: fd00::/16 is IPv6 and its cidr 10.0.0.0/8 IPv4: an "
     "except must lie inside its cidr"),
    ({"egress": [{"to": [{"cidr": "fd00::/8", "except": ["fd00::/8"]}]}]},
     f"{P}egress[0].to[0].except: fd00::/8 is the whole cidr: the entry would match no "
     "address"),
    ({"egress": [{"ports": [{"port": 2000, "endPort": 1000, "protocol": "UDP"}]}]},
     f"{P}egress[0].ports[0]: endPort 1000 is lower than port 2000: the range is port to "
     "endPort"),
    ({"egress": [{"ports": [{"endPort": 1000, "protocol": "UDP"}]}]},
     f"{P}egress[0].ports[0]: endPort needs port: the range is port to endPort"),
    ({"ingressDeny": [{"ports": [{"port": 8, "protocol": "ICMP"}]}]},
     f"{P}ingressDeny[0].ports[0]: ICMP has no ports: leave out port and endPort (ICMP is "
     "ICMPv6 for IPv6 addresses)"),
    ({"egress": [{"ports": [{"port": 0, "protocol": "TCP"}]}]},
     f"{P}egress[0].ports[0].port: Input should be greater than or equal to 1 (got 0)"),
    ({"egress": [{"ports": [{"port": 80, "protocol": "SCTP"}]}]},
     f"{P}egress[0].ports[0].protocol: Input should be 'TCP', 'UDP' or 'ICMP' (got 'SCTP')"),
    ({"egress": [{"ports": [{"port": "80", "protocol": "TCP"}]}]},
     f"{P}egress[0].ports[0].port: Input should be a valid integer (got '80')"),
    ({"egress": [{"to": []}]},
     f"{P}egress[0].to: is empty; leave it out for any address"),
    ({"egress": [{"ports": []}]},
     f"{P}egress[0].ports: is empty; leave it out for all ports and protocols"),
    ({"egress": [{"to": [{"cidr": "10.0.0.0/8", "exept": []}]}]},
     f"{P}egress[0].to[0].exept: unknown key 'exept'; accepted: cidr, except"),
    ({"ingress": [{"to": [{"cidr": "10.0.0.0/8"}]}]},
     f"{P}ingress[0].to: unknown key 'to'; accepted: from, ports"),
    ({"egress": [{"ports": [{"port": 80, "protocol": "TCP", "end_port": 90}]}]},
     f"{P}egress[0].ports[0].end_port: unknown key 'end_port'; accepted: protocol, port, "
     "endPort"),
    ({"egres": []},
     f"{P}egres: unknown key 'egres'; accepted: workload, mode, egress, egressDeny, "
     "ingress, ingressDeny"),
    ({"workload": {"systemdUnit": "edge.service", "cgroup": "system.slice/edge.service"}},
     f"{P}workload: give exactly one of systemdUnit (e.g. edge.service) and cgroup (e.g. "
     "system.slice/edge.service)"),
    ({"workload": {"cgroup": "system.slice/../edge.service"}},
     f"{P}workload.cgroup: 'system.slice/../edge.service' is not a cgroup path: give the "
     "path under the cgroup v2 root, e.g. system.slice/edge.service (no empty, . or .. "
     "parts)"),
    ({"workload": {"cgroup": "/sys/fs/cgroup/unified/nc/app"}},
     f"{P}workload.cgroup: '/sys/fs/cgroup/unified/nc/app' is a file system path: give "
     "the path under the cgroup v2 root, here 'nc/app'"),
    ({"workload": {"cgroup": "/".join(["x"] * 32)}},
     f"{P}workload.cgroup: '{'/'.join(['x'] * 32)}' is 32 cgroups deep: the datapath "
     "selects workloads at most 31 levels below the cgroup v2 root"),
    ({"mode": "enforcing"},
     f"{P}mode: Input should be 'audit' or 'enforce' (got 'enforcing')"),
])
def test_a_bad_document_is_refused_with_an_exact_message(tmp_path: Path, spec: dict[str, Any],
                                                        expected: str) -> None:
    assert errors(tmp_path, doc(**spec)) == [expected]


def test_every_problem_of_a_document_is_reported_at_once(tmp_path: Path) -> None:
    bad = doc("Agent", egress=[{"to": [{"cidr": "300.0.0.0/8"}],
                                "ports": [{"port": 53, "protocol": "ICMP"}]}])
    bad["kind"] = "NetworkPolicies"
    bad["metadata"]["labels"] = {}
    assert errors(tmp_path, bad) == [
        "policy.policies[0].kind: Input should be 'NetworkPolicy' (got 'NetworkPolicies')",
        "policy.policies[0].metadata.name: 'Agent' is not a DNS label (RFC 1123): at most "
        "63 lowercase letters, digits and '-', starting and ending with a letter or digit",
        "policy.policies[0].metadata.labels: unknown key 'labels'; accepted: name",
        f"{P}egress[0].to[0].cidr: '300.0.0.0/8' is not an IPv4 or IPv6 network; write a "
        "CIDR such as 10.0.0.0/8 or fd00::/8 (an address alone is a /32 or /128)",
        f"{P}egress[0].ports[0]: ICMP has no ports: leave out port and endPort (ICMP is "
        "ICMPv6 for IPv6 addresses)",
    ]


def test_two_policies_of_one_name_are_refused(tmp_path: Path) -> None:
    assert errors(tmp_path, doc("agent"), doc("other"), doc("agent")) == [
        "policy.policies: NetworkPolicy 'agent' is defined twice, policies[0] and "
        "policies[2]: names must be unique"]


def test_a_built_in_failsafe_item_cannot_be_switched_off(tmp_path: Path) -> None:
    message = ("cannot be switched off: the built-in failsafe items are always allowed, so "
               "that a bad policy cannot cut the gateway off (failsafe items can only be "
               "added)")
    assert errors(tmp_path, doc(), failsafe={"dns": False, "broker": True, "loopback": 0,
                                             "ssh": True}) == [
        f"policy.failsafe.loopback: {message}", f"policy.failsafe.dns: {message}"]
    assert errors(tmp_path, doc(), failsafe={"ntp": True}) == [
        "policy.failsafe.ntp: unknown key 'ntp'; accepted: loopback, dns, dhcp, broker, "
        "ssh, extra, ingress, resolv_conf"]


def test_a_valid_document_becomes_plain_values(tmp_path: Path) -> None:
    cfg = load_config(agent_file(tmp_path, [doc(
        mode="enforce",
        egress=[{"to": [{"cidr": "10.0.0.0/8", "except": ["10.9.0.0/16"]},
                        {"cidr": "fd00::/8"}],
                 "ports": [{"port": 502, "protocol": "TCP"},
                           {"port": 1000, "endPort": 2000, "protocol": "udp"},
                           {"protocol": "ICMP"}]}],
        egressDeny=[{"to": [{"cidr": "10.0.0.66"}]}],
        ingress=[{}],
    )]))
    [policy] = cfg.policy.policies
    assert policy == NetworkPolicy(
        name="agent", workload="system.slice/edge.service", mode="enforce",
        egress=(Rule((Peer(ip_network("10.0.0.0/8"), (ip_network("10.9.0.0/16"),)),
                      Peer(ip_network("fd00::/8"))),
                     (PortSpec("TCP", 502), PortSpec("UDP", 1000, 2000), PortSpec("ICMP"))),),
        egress_deny=(Rule((Peer(ip_network("10.0.0.66/32")),), None),),
        ingress=(Rule(None, None),),
        source=f"{tmp_path / 'edge.yaml'} policy.policies[0]",
    )
    assert cfg.policy.mode == "audit"
    assert [f.label for f in cfg.policy.failsafe] == [
        "loopback", "loopback", "dns", "dhcp", "dhcp", "dhcpv6", "dhcpv6", "broker"]


@pytest.mark.parametrize(("unit", "cgroup"), [
    ("edge.service", "system.slice/edge.service"),
    ("session-1.scope", "system.slice/session-1.scope"),
    ("getty@tty1.service", "system.slice/system-getty.slice/getty@tty1.service"),
    ("serial-getty@ttyS0.service",
     "system.slice/system-serial\\x2dgetty.slice/serial-getty@ttyS0.service"),
])
def test_a_systemd_unit_is_its_cgroup_in_the_system_slice(unit: str, cgroup: str) -> None:
    assert unit_cgroup(unit) == cgroup


def test_a_unit_name_must_be_a_service_or_scope(tmp_path: Path) -> None:
    [error] = errors(tmp_path, doc(workload={"systemdUnit": "edge"}))
    assert error.startswith(f"{P}workload.systemdUnit: String should match pattern")


def test_no_policy_reads_no_resolver_and_resolves_no_broker(tmp_path: Path) -> None:
    path = agent_file(tmp_path, [], failsafe={"resolv_conf": "./missing"})
    path.write_text(path.read_text().replace("127.0.0.1", "broker.invalid"))
    cfg = load_config(path)
    assert (cfg.policy.policies, cfg.policy.failsafe) == ((), ())
    assert not [w for w in cfg.warnings if w.field != "devices"]


def warnings(cfg: LoadedConfig) -> list[str]:
    return [f"{w.field}: {w.message}" for w in cfg.warnings if w.field != "devices"]


def test_an_unreadable_resolv_conf_and_an_unresolvable_broker_are_warnings(
        tmp_path: Path) -> None:
    path = agent_file(tmp_path, [doc()], failsafe={"resolv_conf": "./missing"})
    path.write_text(path.read_text().replace("127.0.0.1", "broker.invalid"))
    cfg = load_config(path)
    [resolv, broker] = warnings(cfg)
    assert resolv == (f"policy.failsafe.resolv_conf: cannot read {tmp_path / 'missing'} (No "
                      "such file or directory): the failsafe set allows no DNS resolver but "
                      "on loopback")
    assert broker.startswith("uplink.host: 'broker.invalid' cannot be resolved (")
    assert broker.endswith("): the failsafe set has no rule for the control-plane broker, so "
                           "a policy that does not allow TCP 1883 to it cuts the gateway off")
    assert [f.label for f in cfg.policy.failsafe] == [
        "loopback", "loopback", "dhcp", "dhcp", "dhcpv6", "dhcpv6"]


def test_the_failsafe_set_takes_resolvers_broker_and_additions(tmp_path: Path) -> None:
    path = agent_file(tmp_path, [doc()], failsafe={
        "resolv_conf": "./resolv.conf", "ssh": True,
        "extra": [{"to": [{"cidr": "192.0.2.123"}], "ports": [{"port": 123, "protocol": "UDP"}]}],
        "ingress": [{"ports": [{"port": 9100, "protocol": "TCP"}]}]})
    (tmp_path / "resolv.conf").write_text(
        "# comment\nsearch lan\nnameserver 192.0.2.53\nnameserver fe80::1%eth0\n"
        "nameserver not-an-address\nnameserver 192.0.2.53\n")
    path.write_text(path.read_text().replace("127.0.0.1", "localhost"))
    fs = {(f.label, f.direction): f for f in load_config(path).policy.failsafe}
    assert fs["dns", "egress"].rule == Rule(
        (Peer(ip_network("192.0.2.53/32")), Peer(ip_network("fe80::1/128"))),
        (PortSpec("UDP", 53), PortSpec("TCP", 53)))
    broker = fs["broker", "egress"]
    assert ip_network("127.0.0.1/32") in [p.cidr for p in broker.rule.peers or ()]
    assert broker.rule.ports == (PortSpec("TCP", 1883),)
    assert broker.why.startswith("the uplink broker localhost:1883 (localhost resolved at "
                                 "load time: 127.0.0.1")
    assert fs["ssh", "ingress"].rule == Rule(None, (PortSpec("TCP", 22),))
    assert fs["extra[0]", "egress"].rule == Rule((Peer(ip_network("192.0.2.123/32")),),
                                                 (PortSpec("UDP", 123),))
    assert fs["ingress[0]", "ingress"].rule == Rule(None, (PortSpec("TCP", 9100),))


# --- policies in a desired bundle ------------------------------------------------------


@pytest.fixture
def signer(tmp_path: Path) -> Ed25519PrivateKey:
    private_pem, public_pem = new_key_pair()
    (tmp_path / "cloud.pub").write_bytes(public_pem)
    return load_private_key(private_pem)


def bundle(version: int = 7, **over: Any) -> dict[str, Any]:
    now = datetime.now(UTC)
    return {"version": version, "node": "gw", "issued_at": rfc3339(now),
            "expires_at": rfc3339(now + timedelta(days=1)), "devices": [],
            "deviceModels": [], "policies": [], "plugins": [], "agent": {}, **over}


def bundle_errors(path: Path, content: dict[str, Any]) -> list[str]:
    with pytest.raises(ConfigError) as e:
        load_bundle_config(path, content)
    return [_where(p) for p in e.value.problems if p.severity == "error"]


def _where(p: Problem) -> str:
    return f"{p.file} #{p.document} {p.field}: {p.message}"


def test_a_bundle_cannot_set_the_failsafe_set_or_policies_in_its_agent_section(
        tmp_path: Path) -> None:
    path = agent_file(tmp_path, [doc()])
    content = bundle(agent={"policy": {"mode": "enforce", "failsafe": {"extra": []},
                                       "policies": [doc("other")]}})
    assert bundle_errors(path, content) == [
        "bundle version 7 #None agent.policy.failsafe: is set by the gateway's own agent "
        "file only; a bundle cannot change it (it can only add policies)",
        "bundle version 7 #None agent.policy.policies: a bundle carries its network "
        "policies in its own policies list, which replaces the agent file's",
    ]


def test_bad_policies_in_a_bundle_are_named_by_bundle_and_index(tmp_path: Path) -> None:
    path = agent_file(tmp_path, [])
    content = bundle(policies=[doc("a"), doc("b", egress=[{"ports": [
        {"port": 9, "endPort": 1, "protocol": "TCP"}]}]), "text", doc("a")])
    assert bundle_errors(path, content) == [
        "bundle version 7 policies #2 spec.egress[0].ports[0]: endPort 1 is lower than port "
        "9: the range is port to endPort",
        "bundle version 7 policies #3 : must be a mapping (a NetworkPolicy document)",
        "bundle version 7 policies #4 metadata.name: duplicate NetworkPolicy 'a': already "
        "defined in document 1",
    ]


def ports(n: int) -> dict[str, Any]:
    """An egress rule of ``n`` ports entries: ``n`` rules of the compiled list."""
    return {"ports": [{"port": port, "protocol": "TCP"} for port in range(1, n + 1)]}


TOO_MANY = ("the policy compiles to 257 rules, more than the 256 the datapath holds: every "
            "ports entry of a rule is a rule of its own, and 9 are failsafe rules and 2 "
            "default denies (2 per policy); merge rules or ports entries (a port range is "
            "one entry)")


def test_a_policy_the_datapath_cannot_hold_is_refused(tmp_path: Path) -> None:
    # 9 failsafe rules (loopback ×2, dns UDP and TCP, dhcp ×2, dhcpv6 ×2, broker), the
    # rule's entries and the policy's 2 default denies
    cfg = load_config(agent_file(tmp_path, [doc(egress=[ports(245)])]))
    assert len(rules(cfg.policy)) == MAX_RULES
    assert errors(tmp_path, doc(egress=[ports(246)])) == [f"policy.policies: {TOO_MANY}"]
    assert bundle_errors(agent_file(tmp_path, []), bundle(policies=[doc(egress=[ports(246)])])
                         ) == [f"bundle version 7 #None policies: {TOO_MANY}"]


def test_a_bundles_policies_replace_the_agent_files(tmp_path: Path, signer: Ed25519PrivateKey
                                                    ) -> None:
    path = agent_file(tmp_path, [doc("local")])
    text = yaml.safe_load(path.read_text())
    text["trust"] = {"keys": ["./cloud.pub"]}
    path.write_text(yaml.safe_dump(text))
    local = load_runtime_config(path)
    assert [p.name for p in local.policy.policies] == ["local"]
    pushed = bundle(policies=[doc("pushed", mode="enforce")],
                    agent={"policy": {"mode": "enforce"}})
    cfg = load_runtime_config(path, source=BundleSource(token=sign(pushed, signer)))
    assert [(p.name, p.source) for p in cfg.policy.policies] == [
        ("pushed", "bundle version 7 policies #1")]
    assert cfg.policy.mode == "enforce"
    assert cfg.policy.failsafe == local.policy.failsafe  # the agent file's, resolved again
    assert cfg.version != local.version
    empty = load_bundle_config(path, bundle(8))
    assert empty.policy.policies == ()
    assert [_where(w) for w in empty.warnings if w.field == "policies"] == [
        "bundle version 8 #None policies: the agent file's 1 network policy(ies) "
        "(policy.policies) do not apply: a bundle's policies replace them, and this one "
        "holds none"]


def test_the_config_version_changes_with_policies_only(tmp_path: Path) -> None:
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "edge.yaml").write_text("node: gw\nstore: {path: ./edge.db}\n")
    with_empty = tmp_path / "empty"
    with_empty.mkdir()
    (with_empty / "edge.yaml").write_text("node: gw\nstore: {path: ./edge.db}\n")
    a = load_runtime_config(plain / "edge.yaml")
    b = load_runtime_config(with_empty / "edge.yaml")
    assert a.version == b.version  # no policy: the hash of the files alone, as before
    assert a.policy.policies == ()
    c = load_runtime_config(agent_file(tmp_path, [doc()]))
    d = load_runtime_config(agent_file(tmp_path / "empty", []))
    assert c.version != d.version


def test_the_running_agent_holds_policies_without_the_validators(tmp_path: Path) -> None:
    """`edge run` with policies: validated in the child, the agent maps no pydantic.
    (Its datapath pin is on no bpffs: the policy is unenforced, nothing is left in the
    kernel.)"""
    broker = start_broker(tmp_path)
    path = agent_file(tmp_path, [doc(egress=[{"to": [{"cidr": "10.0.0.0/8"}]}])],
                      pin_dir=str(tmp_path / "edge-pin"))
    path.write_text(path.read_text().replace("1883", str(broker.port)))
    sub = Subscriber(broker.port, "edge/v1/gw/state")
    agent = start_edge(["run", "-c", str(path)], tmp_path)
    try:
        sub.wait_for(lambda m: m.json()["state"] == "online")
        maps = Path(f"/proc/{agent.proc.pid}/maps").read_text()
        assert "pydantic_core" not in maps
        assert "_yaml" not in maps
    finally:
        agent.stop()
        sub.stop()
        broker.stop()
