"""The datapath's tables (edge.policy.tables): what the BPF maps hold for a policy, and
the kernel's lookup over them held to the reference evaluator, randomized and on what a
prefix trie gets wrong easily (excepts, port ranges, nested workloads, audit mode)."""

from __future__ import annotations

import functools
import struct
from ipaddress import IPv4Network, IPv6Network, ip_address, ip_network
from random import Random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from policy_strategies import policy_settings as shared_settings

from edge.policy.evaluator import DIRECTIONS, evaluate, rules
from edge.policy.spec import (
    Direction,
    FailsafeRule,
    NetworkPolicy,
    Peer,
    PolicySettings,
    PortSpec,
    Rule,
    selects,
)
from edge.policy.tables import (
    MAX_LEVEL,
    MAX_RULES,
    Outcome,
    Tables,
    TooManyRules,
    bits_bytes,
    compile_tables,
    lookup,
    port_prefixes,
)

Result = tuple[Outcome, int | None]


def expected(s: PolicySettings, workload: str, direction: Direction, address: str,
             port: int | None, number: int) -> Result:
    """What :func:`evaluate` says, as the kernel's outcome."""
    v = evaluate(s, workload, direction, address, port, str(number))
    if v.rule is None:
        return ("unpoliced", None)
    if v.action == "allow":
        return ("allow", v.rule.id)
    return ("drop" if v.enforced else "would-drop", v.rule.id)


def icmp(address: str) -> int:
    """The ICMP protocol number of ``address`` as it is on the wire."""
    addr = ip_address(address)
    v4 = addr.version == 4 or (addr.version == 6 and addr.ipv4_mapped is not None)
    return 1 if v4 else 58


def agree(s: PolicySettings, workload: str, direction: Direction, address: str,
          port: int | None, protocol: str) -> Result:
    """The kernel's outcome, checked against :func:`evaluate` (``protocol`` TCP, UDP or
    ICMP, by name)."""
    number = {"TCP": 6, "UDP": 17}.get(protocol) or icmp(address)
    got = lookup(compile_tables(s), workload, direction, address, port, number)
    assert got == expected(s, workload, direction, address, port, number)
    return got


def other_protocol(s: PolicySettings, workload: str, direction: Direction,
                   address: str) -> Result:
    """The outcome for an IP protocol the policy cannot name (SCTP): first match among
    the rules of every protocol only, as the evaluator decides."""
    if not any(selects(p.workload, workload) for p in s.policies):
        return ("unpoliced", None)
    addr = ip_address(address)
    if addr.version == 6 and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    hits = [r for r in rules(s) if r.protocol is None and r.applies(workload, direction)
            and any(p.matches(addr) for p in r.peers)]
    in_force = next((r for r in hits if r.enforce), None)
    if in_force is not None and in_force.action == "deny":
        return ("drop", in_force.id)
    return ("allow" if hits[0].action == "allow" else "would-drop", hits[0].id)


def net(text: str) -> IPv4Network | IPv6Network:
    return ip_network(text)


def well_formed(t: Tables) -> None:
    """Keys as the kernel takes them: no bits past the prefix, one entry per prefix."""
    assert len({p for p, _ in t.addr4}) == len(t.addr4)
    assert len({p for p, _ in t.addr6}) == len(t.addr6)
    for length, protocol, port, _ in t.ports:
        assert 0 <= length <= 24
        assert (protocol << 16 | port) & ((1 << (24 - length)) - 1) == 0
    assert len({(length, protocol, port) for length, protocol, port, _ in t.ports}) == len(
        t.ports)
    for bits in (t.deny, t.enforce, *(b for e in t.workloads.values() for b in e)):
        assert 0 <= bits < 1 << len(t.rules)


# --- randomized: the tables' lookup is the evaluator's verdict --------------------------

NETS = ["0.0.0.0/0", "10.0.0.0/8", "10.1.0.0/16", "10.1.2.0/24", "10.1.2.0/25",
        "10.1.2.128/25", "10.1.2.3/32", "10.2.0.0/16", "192.0.2.0/24", "::/0", "fd00::/8",
        "fd00:1::/32", "fd00:1::/33", "fd00:1:8000::/33", "fd00:1::3/128"]
BOUNDS = [1, 2, 3, 255, 256, 1000, 1023, 1024, 2000, 32768, 65534, 65535]
WORKLOADS = ["a", "a/b", "a/b/c", "c"]


@st.composite
def port_range(draw: st.DrawFn) -> PortSpec:
    protocol = draw(st.sampled_from(["TCP", "UDP"]))
    first, last = sorted(draw(st.lists(st.sampled_from(BOUNDS), min_size=2, max_size=2)))
    return PortSpec(protocol, first, last if last != first else None)  # type: ignore[arg-type]


port_specs = st.one_of(st.just(PortSpec("ICMP")),
                       st.builds(PortSpec, st.sampled_from(["TCP", "UDP"])), port_range())
policy_settings = shared_settings(NETS, WORKLOADS, port_specs, min_policies=0)


def edges(network: IPv4Network | IPv6Network) -> set[str]:
    """The first and last addresses of ``network`` and those just outside it."""
    first, last = int(network.network_address), int(network.broadcast_address)
    top = (1 << network.max_prefixlen) - 1
    address = type(network.network_address)
    return {str(address(a)) for a in (first - 1, first, first + 1, last, last + 1)
            if 0 <= a <= top}


Connection = tuple[str, Direction, str, str, int]


def near(ports: tuple[int, int]) -> set[int]:
    """The ends of a port range and the ports next to them."""
    return {p + d for p in ports for d in (-1, 0, 1) if 0 <= p + d <= 65535}


def connections(s: PolicySettings, rng: Random, count: int) -> list[Connection]:
    """``count`` connections at the edges of what the rules of ``s`` match: of the
    selected workloads, those below them and others, to the first and last addresses
    of every network (and those next to them; IPv4 also IPv4-mapped), on the ports at
    and next to the ends of its port ranges; half of them aimed at one rule (its
    workload, direction, protocol, networks and ports)."""
    flat = rules(s)
    selected = {p.workload for p in s.policies}
    workloads = sorted(selected | {f"{w}/x" for w in selected} | {"ab", "d"})
    protocols = ["TCP", "UDP", "ICMP", "SCTP"]

    @functools.cache
    def addresses(peers: tuple[Peer, ...]) -> list[str]:
        found = {a for p in peers for n in (p.cidr, *p.excepts) for a in edges(n)}
        return sorted(found | {f"::ffff:{a}" for a in found if ":" not in a})

    everywhere = addresses(tuple(p for r in flat for p in r.peers)) or ["10.0.0.1"]
    ports = sorted({0, 65535}.union(*(near(r.ports) for r in flat if r.ports)))
    out: list[Connection] = []
    for _ in range(count):
        if not flat or rng.random() < 0.5:
            out.append((rng.choice(workloads), rng.choice(DIRECTIONS), rng.choice(everywhere),
                        rng.choice(protocols), rng.choice(ports)))
            continue
        r = rng.choice(flat)
        workload = r.workload or rng.choice(workloads)
        out.append((rng.choice([workload, f"{workload}/x"]), r.direction,
                    rng.choice(addresses(r.peers)), r.protocol or rng.choice(protocols),
                    rng.choice(sorted(near(r.ports)) if r.ports else ports)))
    return out


@settings(max_examples=300, deadline=None)
@given(policy_settings(), st.integers(0, 2**32))
def test_lookup_agrees_with_evaluate(s: PolicySettings, seed: int) -> None:
    t = compile_tables(s)
    well_formed(t)
    for workload, direction, address, protocol, port in connections(s, Random(seed), 100):
        if protocol == "SCTP":
            assert lookup(t, workload, direction, address, port, 132) == other_protocol(
                s, workload, direction, address)
            continue
        number = {"TCP": 6, "UDP": 17}.get(protocol) or icmp(address)
        given_port = None if protocol == "ICMP" else port
        assert lookup(t, workload, direction, address, given_port, number) == expected(
            s, workload, direction, address, given_port, number)


# --- targeted cases ----------------------------------------------------------------------

ALL = 0b1100  # the two default denies of the one policy, rules 3 and 4


def test_a_hole_in_a_cidr_shadows_it_and_a_rule_inside_the_hole_shows_through() -> None:
    s = PolicySettings("enforce", (NetworkPolicy("p", "a", egress=(
        Rule((Peer(net("10.0.0.0/8"), (net("10.1.0.0/16"),)),), (PortSpec("TCP", 80),)),
        Rule((Peer(net("10.1.2.0/24")),), (PortSpec("TCP", 80),)))),))
    t = compile_tables(s)
    assert t.addr4 == ((net("0.0.0.0/0"), ALL), (net("10.0.0.0/8"), ALL | 0b01),
                       (net("10.1.0.0/16"), ALL), (net("10.1.2.0/24"), ALL | 0b10))
    assert t.addr6 == ((net("::/0"), ALL),)
    assert (t.deny, t.enforce, t.levels, t.workloads) == (ALL, 0b1111, 0b10,
                                                          {"a": (0b0111, 0b1000)})
    assert agree(s, "a", "egress", "10.200.0.1", 80, "TCP") == ("allow", 1)
    assert agree(s, "a", "egress", "10.1.3.1", 80, "TCP") == ("drop", 3)
    assert agree(s, "a", "egress", "10.1.2.255", 80, "TCP") == ("allow", 2)
    assert agree(s, "a", "egress", "10.1.2.1", 81, "TCP") == ("drop", 3)
    assert agree(s, "a", "egress", "::ffff:10.1.2.1", 80, "TCP") == ("allow", 2)
    assert agree(s, "a", "ingress", "10.1.2.1", 80, "TCP") == ("drop", 4)


def test_a_second_peer_of_the_same_rule_fills_its_hole() -> None:
    s = PolicySettings("enforce", (NetworkPolicy("p", "a", egress_deny=(
        Rule((Peer(net("10.0.0.0/8"), (net("10.1.0.0/16"), net("10.2.0.0/16"))),
              Peer(net("10.1.0.0/16"), (net("10.1.2.0/24"),)))),)),))
    t = compile_tables(s)
    assert dict(t.addr4) == {net("0.0.0.0/0"): 0b110, net("10.0.0.0/8"): 0b111,
                             net("10.1.0.0/16"): 0b111, net("10.1.2.0/24"): 0b110,
                             net("10.2.0.0/16"): 0b110}
    for address, rule in [("10.0.0.1", 1), ("10.1.0.1", 1), ("10.1.2.1", 2), ("10.2.0.1", 2),
                          ("10.3.0.1", 1)]:
        assert agree(s, "a", "egress", address, 9, "UDP") == ("drop", rule)


@pytest.mark.parametrize(("first", "last", "count"), [
    (0, 65535, 1), (1, 65535, 16), (1000, 2000, 8), (65535, 65535, 1), (0, 0, 1),
    (1, 65534, 30), (32767, 32768, 2), (1024, 2047, 1)])
def test_a_port_range_is_its_fewest_aligned_blocks(first: int, last: int, count: int) -> None:
    blocks = port_prefixes(first, last)
    assert len(blocks) == count
    assert set().union(*(range(p, p + (1 << (16 - n))) for p, n in blocks)) == set(
        range(first, last + 1))


@given(st.integers(0, 65535), st.integers(0, 65535))
def test_port_blocks_cover_the_range_exactly_and_are_fewest(a: int, b: int) -> None:
    first, last = min(a, b), max(a, b)
    blocks = port_prefixes(first, last)
    at = first
    for port, length in blocks:  # in order, back to back: the union is the range
        size = 1 << (16 - length)
        assert port == at
        assert port % size == 0  # aligned: one trie prefix
        # the block twice as big holding it is not inside the range: each block is a
        # largest aligned block in it, and those are what every cover must split into
        if length:
            parent = port - port % (2 * size)
            assert not first <= parent <= parent + 2 * size - 1 <= last
        at += size
    assert at == last + 1


def test_a_port_range_is_refused_outside_the_ports() -> None:
    with pytest.raises(ValueError, match=r"^2-1 is not a range of ports from 0 to 65535$"):
        port_prefixes(2, 1)
    with pytest.raises(ValueError, match="65536"):
        port_prefixes(0, 65536)


def test_port_ranges_that_straddle_block_boundaries() -> None:
    s = PolicySettings("enforce", (NetworkPolicy(
        "p", "a", egress=(Rule(None, (PortSpec("TCP", 1, 65535), PortSpec("UDP", 1000, 2000))),),
        egress_deny=(Rule(None, (PortSpec("TCP", 65535),)),)),))
    t = compile_tables(s)
    # rules: 1 deny TCP 65535, 2 TCP 1-65535, 3 UDP 1000-2000, 4 and 5 the defaults
    tcp = [(length, port, bits) for length, protocol, port, bits in t.ports if protocol == 6]
    assert [(port, length - 8) for length, port, _ in tcp] == sorted(
        [*port_prefixes(1, 65535), (65535, 16)])
    assert {(port, length): bits for length, port, bits in tcp}[65535, 24] == 0b11011
    assert t.ports[0] == (0, 0, 0, 0b11000)
    for port, tcp_rule, udp_rule in [(0, 4, 4), (1, 2, 4), (2, 2, 4), (999, 2, 4),
                                     (1000, 2, 3), (1023, 2, 3), (1024, 2, 3), (2000, 2, 3),
                                     (2001, 2, 4), (65534, 2, 4), (65535, 1, 4)]:
        tcp_outcome = "drop" if tcp_rule in (1, 4) else "allow"
        udp_outcome = "drop" if udp_rule == 4 else "allow"
        assert agree(s, "a", "egress", "192.0.2.1", port, "TCP") == (tcp_outcome, tcp_rule)
        assert agree(s, "a", "egress", "2001:db8::1", port, "UDP") == (udp_outcome, udp_rule)


def test_ipv6_prefixes_holes_and_icmpv6() -> None:
    s = PolicySettings("enforce", (NetworkPolicy("p", "a", ingress=(
        Rule((Peer(net("fd00::/8"), (net("fd00:9::/32"),)),), (PortSpec("ICMP"),)),
        Rule((Peer(net("fd00:9::1/128")),), (PortSpec("TCP", 22),)))),))
    t = compile_tables(s)
    assert t.addr6 == ((net("::/0"), ALL), (net("fd00::/8"), ALL | 0b01),
                       (net("fd00:9::/32"), ALL), (net("fd00:9::1/128"), ALL | 0b10))
    assert (8, 1, 0, ALL | 0b01) in t.ports
    assert (8, 58, 0, ALL | 0b01) in t.ports
    assert agree(s, "a", "ingress", "fd00:1::1", None, "ICMP") == ("allow", 1)
    assert agree(s, "a", "ingress", "fd00:9::2", None, "ICMP") == ("drop", 4)
    assert agree(s, "a", "ingress", "fd00:9::1", 22, "TCP") == ("allow", 2)
    assert agree(s, "a", "ingress", "fd00:9::1", None, "ICMP") == ("drop", 4)
    assert agree(s, "a", "ingress", "10.0.0.1", None, "ICMP") == ("drop", 4)


def test_nested_workloads_get_both_policies_and_a_sibling_none() -> None:
    dns = FailsafeRule("dns", "egress", Rule((Peer(net("192.0.2.53/32")),),
                                              (PortSpec("UDP", 53),)))
    outer = NetworkPolicy("outer", "a", "enforce", egress=(Rule(None, (PortSpec("TCP", 80),)),))
    inner = NetworkPolicy("inner", "a/b", "enforce", egress_deny=(
        Rule((Peer(net("10.0.0.0/8")),)),))
    s = PolicySettings("audit", (outer, inner), (dns,))
    # 1 dns, 2 inner's deny, 3 outer's allow, 4-5 outer's defaults, 6-7 inner's
    t = compile_tables(s)
    assert t.levels == 0b110
    assert t.workloads == {"a": (0b0001101, 0b0010000), "a/b": (0b0100011, 0b1000000)}
    assert agree(s, "a/b/c", "egress", "10.0.0.1", 80, "TCP") == ("drop", 2)
    assert agree(s, "a/b", "egress", "11.0.0.1", 80, "TCP") == ("allow", 3)
    assert agree(s, "a", "egress", "10.0.0.1", 80, "TCP") == ("allow", 3)
    assert agree(s, "a/b", "egress", "10.0.0.1", 443, "TCP") == ("drop", 2)
    assert agree(s, "a/b", "egress", "192.0.2.53", 53, "UDP") == ("allow", 1)
    assert agree(s, "a/c", "egress", "10.0.0.1", 443, "TCP") == ("drop", 4)
    assert agree(s, "a/b", "ingress", "10.0.0.1", 80, "TCP") == ("drop", 5)
    assert agree(s, "ab", "egress", "10.0.0.1", 80, "TCP") == ("unpoliced", None)
    assert agree(s, "b/a", "egress", "10.0.0.1", 80, "TCP") == ("unpoliced", None)


def test_a_workload_is_looked_up_at_most_31_levels_down() -> None:
    deep = "/".join(["x"] * MAX_LEVEL)
    s = PolicySettings("enforce", (NetworkPolicy("p", deep),))
    t = compile_tables(s)
    assert t.levels == 1 << MAX_LEVEL
    assert lookup(t, deep + "/y/z", "egress", "10.0.0.1", 1, 6) == ("drop", 1)
    with pytest.raises(ValueError, match="cgroup levels deep") as e:
        compile_tables(PolicySettings("enforce", (NetworkPolicy("p", deep + "/x"),)))
    assert str(e.value) == (f"workload {deep}/x is 32 cgroup levels deep, more than the 31 "
                            "the datapath looks up")


def test_audit_would_drops_and_enforced_drops() -> None:
    strict = NetworkPolicy("strict", "app", "enforce", egress=(
        Rule((Peer(net("10.0.0.0/8")),)),))
    trial = NetworkPolicy("trial", "app", "audit", egress=(Rule(None, (PortSpec("TCP"),)),),
                          egress_deny=(Rule((Peer(net("10.1.0.0/16")),)),
                                       Rule((Peer(net("11.0.0.0/8")),))))
    s = PolicySettings("audit", (strict, trial))
    # 1-2 trial's denies, 3 strict's allow, 4 trial's allow, 5-6 strict's defaults, 7-8 trial's
    t = compile_tables(s)
    assert (t.deny, t.enforce) == (0b11110011, 0b00110100)
    assert agree(s, "app", "egress", "10.1.0.1", 443, "TCP") == ("would-drop", 1)
    assert agree(s, "app", "egress", "10.2.0.1", 443, "TCP") == ("allow", 3)
    assert agree(s, "app", "egress", "11.0.0.1", 443, "TCP") == ("drop", 5)
    assert agree(s, "app", "egress", "12.0.0.1", 443, "TCP") == ("drop", 5)
    audit_only = PolicySettings("audit", (trial,))
    assert agree(audit_only, "app", "egress", "12.0.0.1", 443, "TCP") == ("allow", 3)
    assert agree(audit_only, "app", "egress", "12.0.0.1", 443, "UDP") == ("would-drop", 4)


def test_another_ip_protocol_matches_only_rules_of_every_protocol() -> None:
    s = PolicySettings("enforce", (NetworkPolicy("p", "a", egress=(
        Rule((Peer(net("10.1.0.0/16")),)),
        Rule(None, (PortSpec("TCP"), PortSpec("UDP", 1, 65535), PortSpec("ICMP"))))),))
    t = compile_tables(s)
    for port in (None, 0, 80):
        assert lookup(t, "a", "egress", "10.1.0.1", port, 132) == ("allow", 1)
        assert lookup(t, "a", "egress", "10.2.0.1", port, 132) == ("drop", 5)
        assert lookup(t, "a", "egress", "fd00::1", port, 47) == ("drop", 5)
    assert agree(s, "a", "egress", "10.2.0.1", 0, "TCP") == ("allow", 2)
    assert agree(s, "a", "egress", "10.2.0.1", None, "ICMP") == ("allow", 4)
    assert lookup(t, "a", "egress", "10.2.0.1", None, 0) == ("drop", 5)


def test_no_policy_polices_nothing() -> None:
    t = compile_tables(PolicySettings("enforce", (), (FailsafeRule("x", "egress", Rule()),)))
    assert (t.rules, t.workloads, t.levels, t.addr4, t.addr6, t.ports) == ((), {}, 0, (), (),
                                                                           ())
    assert lookup(t, "a", "egress", "10.0.0.1", 80, 6) == ("unpoliced", None)


def test_a_lookup_refuses_what_is_no_connection() -> None:
    t = compile_tables(PolicySettings("enforce", (NetworkPolicy("p", "a"),)))
    with pytest.raises(ValueError, match="direction 'out' is not egress or ingress"):
        lookup(t, "a", "out", "10.0.0.1", 80, 6)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="port 65536 or protocol 6 out of range"):
        lookup(t, "a", "egress", "10.0.0.1", 65536, 6)
    with pytest.raises(ValueError, match="port 0 or protocol 256 out of range"):
        lookup(t, "a", "egress", "10.0.0.1", None, 256)
    with pytest.raises(ValueError, match="matches no rule"):
        lookup(Tables((), 0, 0, 2, {"a": (0, 0)}, (), (), ()), "a", "egress", "10.0.0.1", 1, 6)


def test_too_many_rules() -> None:
    def with_entries(n: int) -> PolicySettings:  # n ports entries and 2 default denies
        ports = tuple(PortSpec("TCP", port) for port in range(1, n + 1))
        return PolicySettings("enforce", (NetworkPolicy("p", "a", egress=(Rule(None, ports),)),))

    t = compile_tables(with_entries(MAX_RULES - 2))
    assert len(t.rules) == MAX_RULES
    assert lookup(t, "a", "ingress", "10.0.0.1", 1, 6) == ("drop", MAX_RULES)
    assert bits_bytes(t.deny)[-1] == 0b11000000
    with pytest.raises(TooManyRules) as e:
        compile_tables(with_entries(MAX_RULES - 1))
    assert (str(e.value), e.value.count) == (
        "the policy compiles to 257 rules, more than the 256 the datapath holds", 257)


def test_a_bitmap_is_four_little_endian_words() -> None:
    assert bits_bytes(0) == bytes(32)
    assert bits_bytes(1) == b"\x01" + bytes(31)
    bits = 1 << 0 | 1 << 63 | 1 << 64 | 1 << 130 | 1 << 255
    assert struct.unpack("<4Q", bits_bytes(bits)) == (1 | 1 << 63, 1, 1 << 2, 1 << 63)
    for bad in (-1, 1 << 256):
        with pytest.raises(ValueError, match="is not a bitmap of 256 bits"):
            bits_bytes(bad)
