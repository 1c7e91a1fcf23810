"""The policy datapath in a real kernel (tests/policy_kernel.py: a private bpffs, test
cgroups, probe processes, a network namespace): its build, its verdicts held to the
reference evaluator over loopback and a veth pair (IPv4 and IPv6, egress and ingress,
excepts, port ranges, explicit denies, nested and unselected workloads), its counters
and drop events, audit mode, atomic updates under traffic, and what its pins keep
after the agent is gone."""

from __future__ import annotations

import shutil
import socket
import statistics
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from ipaddress import ip_address, ip_network
from pathlib import Path
from typing import Any

import pytest
from conftest import StopLater
from policy_kernel import Kernel, Netns, Probe, kernel, netns, skip_or_fail

from edge.policy.datapath import Applied, Event, object_path
from edge.policy.evaluator import Verdict, evaluate
from edge.policy.spec import Direction, Mode, NetworkPolicy, Peer, PolicySettings, PortSpec, Rule
from edge.policy.tables import Tables, compile_tables, lookup

BUILD = Path(__file__).parents[1] / "edge" / "policy" / "bpf" / "build.sh"
NUMBER = {("tcp", 4): 6, ("tcp", 6): 6, ("udp", 4): 17, ("udp", 6): 17, ("icmp", 4): 1,
          ("icmp", 6): 58}
T = 0.5
"""How long a probe waits for an answer: a denied TCP connect or ingress times out."""


@pytest.fixture
def k(tmp_path: Path) -> Iterator[Kernel]:
    with kernel(tmp_path) as kern:
        yield kern


class Ring:
    """The drop events as they come, taken in batches."""

    def __init__(self, k: Kernel) -> None:
        self.got: list[Event] = []
        self.ring = k.dp.ring(self.got.append)

    def take(self) -> list[Event]:
        self.ring.poll(20)
        while self.ring.poll(0):
            pass
        out = list(self.got)
        del self.got[:]
        return out


@pytest.fixture
def ring(k: Kernel) -> Iterator[Ring]:
    r = Ring(k)
    yield r
    r.ring.close()


def net(text: str) -> Peer:
    return Peer(ip_network(text))


def policy(name: str, workload: str, *, egress: tuple[Rule, ...] = (),
           egress_deny: tuple[Rule, ...] = (), ingress: tuple[Rule, ...] = (),
           ingress_deny: tuple[Rule, ...] = ()) -> NetworkPolicy:
    """A policy whose mode is the settings'."""
    return NetworkPolicy(name, workload, None, egress, egress_deny, ingress, ingress_deny)


def settings(mode: Mode, *policies: NetworkPolicy) -> PolicySettings:
    """Settings as the tests load them: no failsafe rules (loopback is not exempt)."""
    return PolicySettings(mode, policies, ())


@dataclass(frozen=True)
class Case:
    """One connection: of ``workload`` in ``direction``, with remote ``address`` and
    ``port`` (egress: the remote's; ingress: the workload's; None for ICMP), made by
    ``probe`` with ``request``."""

    workload: str
    direction: Direction
    address: str
    port: int | None
    proto: str
    probe: Probe
    request: tuple[tuple[str, Any], ...]

    def verdict(self, s: PolicySettings) -> Verdict:
        return evaluate(s, self.workload, self.direction, self.address, self.port,
                        self.proto)

    def key(self, k: Kernel) -> tuple[object, ...]:
        """What its events carry."""
        address = ip_address(self.address)
        if address.version == 6 and address.ipv4_mapped:  # IPv4 on the wire
            address = address.ipv4_mapped
        return (k.cgroup_id(self.workload), self.direction, address,
                NUMBER[self.proto, address.version], self.port or 0)


def egress(workload: str, probe: Probe, proto: str, host: str, port: int,
           **more: Any) -> Case:
    return Case(workload, "egress", host, port, proto, probe,
                (("op", proto), ("host", host), ("port", port), ("timeout", T),
                 *more.items()))


def ping(workload: str, probe: Probe, host: str) -> Case:
    return Case(workload, "egress", host, None, "icmp", probe,
                (("op", "ping"), ("host", host), ("timeout", T)))


def ingress(workload: str, remote: Probe, proto: str, host: str, port: int,
            source: str) -> Case:
    """``remote`` connects from ``source`` to the workload's listener at ``host``."""
    return Case(workload, "ingress", source, port, proto, remote,
                (("op", proto), ("host", host), ("port", port), ("timeout", T),
                 ("source", source)))


def event_key(e: Event) -> tuple[object, ...]:
    return (e.cgroup, e.direction, e.address, e.protocol, e.port)


def run(cases: list[Case]) -> list[dict[str, Any]]:
    """The answers to ``cases``, each probe's at once (a batch), the probes in turn;
    pings one by one (a raw socket takes in every echo reply until it is connected,
    which would count them twice)."""
    answers: dict[int, dict[str, Any]] = {}
    for probe in {id(c.probe): c.probe for c in cases}.values():
        mine = [i for i, c in enumerate(cases) if c.probe is probe]
        if all(cases[i].proto == "icmp" for i in mine):
            answers.update((i, probe.ask(**dict(cases[i].request))) for i in mine)
            continue
        got = probe.ask(op="batch", requests=[dict(cases[i].request) for i in mine])
        answers.update(zip(mine, got["answers"], strict=True))
    return [answers[i] for i in range(len(cases))]


def packets(before: dict[int, tuple[int, int]], after: dict[int, tuple[int, int]]
            ) -> dict[int, int]:
    """Packets per rule between two readings of the counters (rules that moved)."""
    out = {r: n - before.get(r, (0, 0))[0] for r, (n, _) in after.items()}
    return {r: n for r, n in out.items() if n}


def answer_agrees(c: Case, v: Verdict, answer: dict[str, Any]) -> None:
    """A connection works ⇔ it passes; an enforced deny is EPERM for the sender's own
    UDP datagram or ICMP echo request, a timeout otherwise."""
    what = f"{c.workload} {c.direction} {c.proto} {c.address} port {c.port}: {v.reason}"
    if v.passes:
        assert answer.get("ok"), f"{what}, but {answer}"
    elif c.direction == "egress" and c.proto != "tcp":
        assert answer == {"error": "EPERM"}, what
    else:
        assert answer == {"error": "timeout"}, what


def check(k: Kernel, s: PolicySettings, gen: int, cases: list[Case],
          answers: list[dict[str, Any]], events: list[Event],
          moved: dict[int, int]) -> None:
    """Every answer is the evaluator's; each event is of one denied case and names its
    deciding rule (a denied UDP datagram or ICMP echo exactly one; an audited TCP or
    UDP flow one, for its first packet); the counters moved on the deciding rules only:
    for a drop one packet per event, for UDP and ICMP exactly two packets per exchange
    that passes and one per dropped datagram."""
    by_key: dict[tuple[object, ...], list[Event]] = {}
    for e in events:
        by_key.setdefault(event_key(e), []).append(e)
    expected: Counter[int] = Counter()
    allowed_tcp: Counter[int] = Counter()
    for c, answer in zip(cases, answers, strict=True):
        v = c.verdict(s)
        answer_agrees(c, v, answer)
        mine = by_key.pop(c.key(k), [])
        if v.rule is None:
            assert not mine, c
            continue
        if v.action == "allow":
            assert not mine, (c, mine)
            if c.proto == "tcp":
                allowed_tcp[v.rule.id] += 1
            else:
                expected[v.rule.id] += 2
            continue
        verdict = "drop" if v.enforced else "would-drop"
        assert mine, f"no event for {c}: {v.reason}"
        assert {(e.rule, e.verdict, e.gen) for e in mine} == {(v.rule.id, verdict, gen)}, c
        opening = [e for e in mine if e.packet_ingress == (c.direction == "ingress")]
        if not v.enforced and c.proto != "icmp":
            # audit: the flow goes on, reported once, for its first packet (the one
            # enforce would drop; an accepted socket starts with its listener's verdict
            # on the flow). ICMP is judged per message, each one reported.
            assert mine == opening[:1], (c, mine)
            if c.proto == "tcp":
                allowed_tcp[v.rule.id] += 1
            else:
                expected[v.rule.id] += 2
            continue
        if c.proto != "tcp":
            assert len(opening) == 1, (c, mine)
            assert len(mine) == (1 if v.enforced else 2), (c, mine)
        expected[v.rule.id] += len(mine)
    assert not by_key, f"events of no case: {by_key}"
    for rule, n in allowed_tcp.items():  # SYN, SYN-ACK, ACK, data, echo, FIN, …
        assert moved.get(rule, 0) >= 3 * n + expected[rule], (rule, moved)
    assert {r: n for r, n in moved.items() if r not in allowed_tcp} == {
        r: n for r, n in expected.items() if r not in allowed_tcp}


def judge(k: Kernel, ring: Ring, s: PolicySettings, applied: Applied,
          cases: list[Case]) -> list[Event]:
    """Runs ``cases`` (UDP, ICMP, then TCP) and checks them (:func:`check`); their
    events."""
    out: list[Event] = []
    for proto in ("udp", "icmp", "tcp"):
        batch = [c for c in cases if c.proto == proto]
        before = k.dp.counters(applied.gen)
        answers = run(batch)
        time.sleep(0.1)  # the last FINs
        events = ring.take()
        check(k, s, applied.gen, batch, answers, events,
              packets(before, k.dp.counters(applied.gen)))
        out += events
    assert k.dp.stats() == {"events_lost": 0, "unmatched": 0, "unparsed": 0}
    return out


# --- the build ---------------------------------------------------------------------------


def test_the_build_gives_the_committed_object(tmp_path: Path) -> None:
    missing = [t for t in ("clang", "llvm-strip") if shutil.which(t) is None]
    if missing:
        skip_or_fail(f"{' and '.join(missing)} missing: cannot rebuild the datapath")
    out = tmp_path / "policy.bpf.o"
    r = subprocess.run([str(BUILD), str(out)], capture_output=True, text=True, check=False)
    assert r.returncode == 0, r.stderr
    assert out.read_bytes() == object_path().read_bytes(), (
        "edge/policy/bpf/policy.bpf.o is not what build.sh makes of policy.bpf.c")


# --- loopback: one connection at a time, counters and events exactly -----------------------


@dataclass
class Loopback:
    """A workload ``w`` with its probe ``probe`` (listening on loopback), an outside
    probe ``remote`` (listening on 127.0.0.1 and ::1), and :meth:`policy`'s cases."""

    w: str
    probe: Probe
    remote: Probe
    ports: dict[str, int]
    cases: list[Case]

    def policy(self, mode: Mode, filler: int = 0) -> PolicySettings:
        """The cases' policy; ``filler`` deny rules first (TCP to ports 1, 2, …)."""
        p = self.ports
        first = (Rule((net("127.0.0.1/32"),), tuple(
            PortSpec("TCP", n) for n in range(1, filler + 1))),) if filler else ()
        return settings(mode, policy(
            "w", self.w,
            egress=(Rule((net("127.0.0.0/8"), net("::1/128")), (
                PortSpec("TCP", p["tA4"]), PortSpec("TCP", p["tA6"]),
                PortSpec("UDP", p["uA4"]), PortSpec("UDP", p["uA6"]))),),
            egress_deny=(*first, Rule((net("127.0.0.1/32"), net("::1/128")), (
                PortSpec("TCP", p["tD4"]), PortSpec("UDP", p["uD4"]),
                PortSpec("UDP", p["uD6"])))),
            ingress=(Rule((net("127.0.0.1/32"),), (PortSpec("TCP", p["wt"]),
                                                    PortSpec("UDP", p["wu"]))),)))


@pytest.fixture
def loop(k: Kernel, stop_later: StopLater) -> Loopback:
    w = k.cgroup("w")
    probe = stop_later(Probe(k.root / w))
    remote = stop_later(Probe(None))
    ports: dict[str, int] = {}
    cases: list[Case] = []
    for fam, host in (("4", "127.0.0.1"), ("6", "::1")):
        for proto in ("tcp", "udp"):
            for kind in "ADX":  # allowed, explicitly denied, default deny
                name = f"{proto[0]}{kind}{fam}"
                ports[name] = remote.ask(op="listen", proto=proto, host=host)["port"]
                cases.append(egress(w, probe, proto, host, ports[name]))
    for proto in ("tcp", "udp"):
        for name in (f"{proto[0]}", f"{proto[0]}X"):  # allowed in, default deny
            ports[f"w{name}"] = probe.ask(op="listen", proto=proto, host="127.0.0.1")["port"]
            cases.append(ingress(w, remote, proto, "127.0.0.1", ports[f"w{name}"],
                                 "127.0.0.1"))
    return Loopback(w, probe, remote, ports, cases)


def one_by_one(k: Kernel, ring: Ring, s: PolicySettings, applied: Applied,
               cases: list[Case]) -> list[Event]:
    """Each case alone, checked (:func:`check`) with its own counters and events."""
    out: list[Event] = []
    for c in cases:
        before = k.dp.counters(applied.gen)
        answer = c.probe.ask(**dict(c.request))
        time.sleep(0.05)
        events = ring.take()
        moved = packets(before, k.dp.counters(applied.gen))
        check(k, s, applied.gen, [c], [answer], events, moved)
        v = c.verdict(s)
        assert v.rule is not None
        assert set(moved) == {v.rule.id}, (c, moved)
        for e in events:
            assert event_key(e) == c.key(k)
            assert e.packet_ingress == (c.direction == "ingress") or not v.enforced
        out += events
    assert k.dp.stats() == {"events_lost": 0, "unmatched": 0, "unparsed": 0}
    return out


def test_loopback_verdicts_counters_and_events_are_the_evaluators(
        k: Kernel, ring: Ring, loop: Loopback) -> None:
    s = loop.policy("enforce")
    applied = k.dp.apply(compile_tables(s))
    events = one_by_one(k, ring, s, applied, loop.cases)
    verdicts = [c.verdict(s) for c in loop.cases]
    assert {v.rule.section for v in verdicts if v.rule} == {"egress", "egressDeny",
                                                            "ingress", "default"}
    assert sum(not v.passes for v in verdicts) >= 6
    assert {e.verdict for e in events} == {"drop"}


def test_rules_in_the_last_word_of_the_bitmaps_decide_and_count_as_well(
        k: Kernel, ring: Ring, loop: Loopback) -> None:
    s = loop.policy("enforce", filler=240)
    tables = compile_tables(s)
    assert len(tables.rules) == 251
    applied = k.dp.apply(tables)
    one_by_one(k, ring, s, applied, loop.cases)
    assert all(v.rule is not None and v.rule.id > 192
               for v in (c.verdict(s) for c in loop.cases))


def test_audit_mode_drops_nothing_and_reports_what_enforce_drops(
        k: Kernel, ring: Ring, loop: Loopback) -> None:
    def key(e: Event) -> tuple[object, ...]:
        return (e.rule, *event_key(e))

    enforce = loop.policy("enforce")
    dropped = one_by_one(k, ring, enforce, k.dp.apply(compile_tables(enforce)), loop.cases)
    audit = loop.policy("audit")
    reported = one_by_one(k, ring, audit, k.dp.apply(compile_tables(audit)), loop.cases)
    assert all(c.verdict(audit).passes for c in loop.cases)  # one_by_one saw them pass
    assert {e.verdict for e in dropped} == {"drop"}
    assert {e.verdict for e in reported} == {"would-drop"}
    assert {key(e) for e in reported} == {key(e) for e in dropped}
    udp = [e for e in dropped if e.protocol == 17]
    assert len(udp) == 5
    # the datagram the workload sent (or got) first: one each, as enforce dropped it
    assert Counter(key(e) for e in reported if e.protocol == 17 and e.packet_ingress == (
        e.direction == "ingress")) == Counter(key(e) for e in udp)


# --- a veth pair, IPv4 and IPv6, egress and ingress, nested and unselected workloads ------


def host_policy(ns: Netns, a: str, ab: str, listening: dict[str, list[int]]
                ) -> PolicySettings:
    """A policy on ``a`` and one on ``a/b`` (so two on ``a/b/c``), over the namespace's
    addresses (``.2``, ``.3``, ``.4`` and ``::2``, ``::3``, ``::4``) and the ports it
    listens on (TCP 7001, 7002, 7004, 7008; UDP 7001, 7002, 7003, 7005) or ``a``'s
    listeners do."""
    v4, v6 = ns.peers4, ns.peers6
    lan = (Peer(ip_network(f"{v4[0]}/24", strict=False), (ip_network(f"{v4[2]}/32"),)),
           Peer(ip_network(f"{v6[0]}/64", strict=False), (ip_network(f"{v6[2]}/128"),)))
    third = (net(f"{v4[1]}/32"), net(f"{v6[1]}/128"))
    fourth = (net(f"{v4[2]}/32"), net(f"{v6[2]}/128"))
    first = (net(f"{v4[0]}/32"), net(f"{v6[0]}/128"))
    tcp, udp = sorted(listening["tcp"]), sorted(listening["udp"])
    on_a = policy(
        "a", a,
        egress_deny=(Rule(third, (PortSpec("TCP", 7000, 7003), PortSpec("UDP", 7001),
                                  PortSpec("ICMP"))),),
        egress=(Rule(lan, (PortSpec("TCP", 7000, 7007), PortSpec("UDP", 7001, 7002),
                           PortSpec("ICMP"))),
                Rule(None, (PortSpec("UDP", 7005),))),
        ingress_deny=(Rule(third, (PortSpec("TCP"),)),),
        ingress=(Rule(lan, (PortSpec("TCP", tcp[0], tcp[3]),)),
                 Rule(None, (PortSpec("UDP", udp[0], udp[1]),))))
    on_ab = policy(
        "ab", ab,
        egress_deny=(Rule(first, (PortSpec("UDP", 7001),)),),
        egress=(Rule(fourth, (PortSpec("TCP", 7001), PortSpec("ICMP"))),),
        ingress_deny=(Rule(first, (PortSpec("UDP"),)),),
        ingress=(Rule(fourth, (PortSpec("TCP"),)),))
    return settings("enforce", on_a, on_ab)


def test_veth_verdicts_ipv4_ipv6_egress_and_ingress_are_the_evaluators(
        k: Kernel, ring: Ring, stop_later: StopLater) -> None:
    with netns(extra=2) as ns:
        remote = stop_later(Probe(None, netns=ns.name))
        for address in (*ns.peers4, *ns.peers6):  # UDP answers from the address asked
            for proto in ("tcp", "udp"):
                for port in ((7001, 7002, 7004, 7008) if proto == "tcp" else (7001, 7002,
                                                                               7003, 7005)):
                    remote.ask(op="listen", proto=proto, host=address, port=port)
        a, ab, abc, u = k.cgroup("a"), k.cgroup("a/b"), k.cgroup("a/b/c"), k.cgroup("u")
        cases: list[Case] = []
        listening: dict[str, list[int]] = {"tcp": [], "udp": []}
        for w in (a, ab, abc, u):
            probe = stop_later(Probe(k.root / w))
            # IPv4-mapped addresses of an IPv6 socket: IPv4 on the wire
            cases += [egress(w, probe, proto, f"::ffff:{ns.peers4[1]}", 7002)
                      for proto in ("tcp", "udp")]
            for peers, host in ((ns.peers4, ns.host4), (ns.peers6, ns.host6)):
                for address in peers:
                    cases += [egress(w, probe, "tcp", address, p) for p in (7001, 7004, 7008)]
                    cases += [egress(w, probe, "udp", address, p) for p in (7001, 7003, 7005)]
                    cases.append(ping(w, probe, address))
                # a datagram in fragments on the wire (MTU 1500): judged once, whole
                cases += [egress(w, probe, "udp", address, 7002, size=3000)
                          for address in (peers[0], peers[2])]
                for proto in ("tcp", "udp"):
                    for _ in range(3):
                        port = probe.ask(op="listen", proto=proto,
                                         host="0.0.0.0" if host == ns.host4 else "::")["port"]
                        if w == a:
                            listening[proto].append(port)
                        cases += [ingress(w, remote, proto, host, port, source)
                                  for source in peers]
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s4, socket.socket(
                socket.AF_INET6, socket.SOCK_DGRAM) as s6:
            for address in (*ns.peers4, *ns.peers6):  # neighbours resolved beforehand
                (s6 if ":" in address else s4).sendto(b"", (address, 9))
        time.sleep(0.2)
        s = host_policy(ns, a, ab, listening)
        applied = k.dp.apply(compile_tables(s))
        events = judge(k, ring, s, applied, cases)

    verdicts = [(c, c.verdict(s)) for c in cases]
    decided = {(c.workload, ip_address(c.address).version, v.rule.policy, v.rule.section)
               for c, v in verdicts if v.rule is not None}
    for version in (4, 6):
        for w, name, section in [
                (a, "a", "egress"), (a, "a", "egressDeny"), (a, "a", "ingress"),
                (a, "a", "ingressDeny"), (a, "a", "default"), (ab, "ab", "egress"),
                (ab, "ab", "egressDeny"), (ab, "ab", "ingress"), (ab, "ab", "ingressDeny"),
                (ab, "a", "egress"), (ab, "a", "default"), (abc, "ab", "egress"),
                (abc, "ab", "egressDeny"), (abc, "a", "egress"), (abc, "a", "ingressDeny")]:
            assert (w, version, name, section) in decided
    # an address in an except: the default deny for a, b's own allow below a/b
    fourth = Counter((c.workload, getattr(v.rule, "policy", None),
                      getattr(v.rule, "section", None)) for c, v in verdicts
                     if c.address in (ns.peers4[2], ns.peers6[2]) and c.proto == "tcp"
                     and c.direction == "egress" and c.port == 7001)
    assert fourth == {(a, "a", "default"): 2, (ab, "ab", "egress"): 2,
                      (abc, "ab", "egress"): 2, (u, None, None): 2}
    assert {(ip_address(c.address).version, v.passes) for c, v in verdicts
            if c.proto == "icmp" and c.workload != u} == {(4, True), (4, False), (6, True),
                                                         (6, False)}
    assert all(v.passes for c, v in verdicts if c.workload == u)
    assert k.cgroup_id(u) not in {e.cgroup for e in events}
    assert len(events) >= sum(not v.passes for _, v in verdicts) > 40


def test_ports_are_read_past_ip_options_and_ipv6_extension_headers(
        k: Kernel, ring: Ring, stop_later: StopLater) -> None:
    w = k.cgroup("w")
    probe = stop_later(Probe(k.root / w))
    remote = stop_later(Probe(None))
    cases: list[Case] = []
    allow: list[PortSpec] = []
    deny: list[PortSpec] = []
    for host, variants in (("127.0.0.1", [["ip"]]),
                           ("::1", [["hbh"], ["dst"], ["hbh", "dst"]])):
        for proto, name in (("tcp", "TCP"), ("udp", "UDP")):
            allowed, denied = (remote.ask(op="listen", proto=proto, host=host)["port"]
                               for _ in range(2))
            allow.append(PortSpec(name, allowed))  # type: ignore[arg-type]
            deny.append(PortSpec(name, denied))  # type: ignore[arg-type]
            cases += [egress(w, probe, proto, host, port, options=options)
                      for options in variants for port in (allowed, denied)]
    here = (net("127.0.0.1/32"), net("::1/128"))
    s = settings("enforce", policy("w", w, egress=(Rule(here, tuple(allow)),),
                                   egress_deny=(Rule(here, tuple(deny)),)))
    one_by_one(k, ring, s, k.dp.apply(compile_tables(s)), cases)
    # a port not found would be port 0: the default deny
    assert {getattr(c.verdict(s).rule, "section", None) for c in cases} == {
        "egress", "egressDeny"}


# --- connections opened before a policy selected their workload ---------------------------


def test_a_connection_opened_before_its_workload_was_policed_keeps_its_direction(
        k: Kernel, ring: Ring, stop_later: StopLater) -> None:
    w, other = k.cgroup("w"), k.cgroup("other")
    remote = stop_later(Probe(None))
    probe = stop_later(Probe(k.root / w))
    tcp = remote.ask(op="listen", proto="tcp", host="127.0.0.1")["port"]
    udp = remote.ask(op="listen", proto="udp", host="127.0.0.1")["port"]
    inbound = probe.ask(op="listen", proto="tcp", host="127.0.0.1")["port"]
    k.dp.apply(compile_tables(settings("enforce", policy("other", other))))  # attached
    out_tcp = probe.ask(op="open", proto="tcp", host="127.0.0.1", port=tcp)
    out_udp = probe.ask(op="open", proto="udp", host="127.0.0.1", port=udp)
    in_tcp = remote.ask(op="open", proto="tcp", host="127.0.0.1", port=inbound)
    assert probe.ask(op="send", id=out_tcp["id"], timeout=T)["ok"]
    assert probe.ask(op="send", id=out_udp["id"], timeout=T)["ok"]
    assert remote.ask(op="send", id=in_tcp["id"], timeout=T)["ok"]
    assert k.dp.counters() == {}

    here = net("127.0.0.1/32")
    s = settings("enforce", policy(
        "w", w, egress=(Rule((here,), (PortSpec("TCP", tcp), PortSpec("UDP", udp))),),
        ingress=(Rule((here,), (PortSpec("TCP", inbound),)),)))
    applied = k.dp.apply(compile_tables(s))
    for prober, held in ((probe, out_tcp), (probe, out_udp), (remote, in_tcp)):
        answer = prober.ask(op="send", id=held["id"], timeout=T)
        assert answer.get("ok"), (held, answer, ring.take())
    assert ring.take() == []
    assert set(k.dp.counters(applied.gen)) == {1, 2, 3}

    closed = settings("enforce", policy("w", w))  # default deny: dropped as egress
    applied = k.dp.apply(compile_tables(closed))
    assert probe.ask(op="send", id=out_tcp["id"], timeout=T) == {"error": "timeout"}
    got = {(e.rule, e.direction, e.port) for e in ring.take()}
    assert (1, "egress", tcp) in got  # not ingress on its own port, as it was
    assert got <= {(1, "egress", tcp), (2, "ingress", inbound)}  # a late ACK inwards


def test_a_ping_goes_out_even_from_a_socket_that_took_in_another_pings_reply_first(
        k: Kernel, ring: Ring, stop_later: StopLater) -> None:
    w = k.cgroup("w")
    probe = stop_later(Probe(k.root / w))
    s = settings("enforce", policy("w", w, egress=(
        Rule((net("127.0.0.1/32"), net("::1/128")), (PortSpec("ICMP"),)),)))
    applied = k.dp.apply(compile_tables(s))
    for host in ("127.0.0.1", "::1"):
        assert evaluate(s, w, "egress", host, None, "icmp").passes
        early = probe.ask(op="open", proto="icmp", v6=":" in host)  # as ping(8) does
        assert probe.ask(op="ping", host=host, timeout=T) == {"ok": True}  # seen by early
        answer = probe.ask(op="send", id=early["id"], host=host, timeout=T)
        assert answer == {"ok": True}, (host, ring.take())
    assert ring.take() == []
    assert set(k.dp.counters(applied.gen)) == {1}


# --- atomic updates under continuous traffic ----------------------------------------------


def test_flipping_the_policy_under_traffic_gives_no_wrong_verdict(
        k: Kernel, stop_later: StopLater) -> None:
    w = k.cgroup("w")
    sink = stop_later(Probe(None))
    ports = [sink.ask(op="listen", proto="udp", host="127.0.0.1", echo=False)["port"]
             for _ in range(3)]
    one, two, unused = ports
    here = (net("127.0.0.1/32"),)

    def only(allow: int, deny: int, shifted: bool) -> PolicySettings:
        first = (Rule(here, (PortSpec("UDP", unused),)),) if shifted else ()
        return settings("enforce", policy(
            "w", w, egress=(Rule(here, (PortSpec("UDP", allow),)),),
            egress_deny=(*first, Rule(here, (PortSpec("UDP", deny),)))))

    # A, B, then A and B with the rule ids shifted: each generation's tables change
    cycle = [compile_tables(only(one, two, False)), compile_tables(only(two, one, False)),
             compile_tables(only(one, two, True)), compile_tables(only(two, one, True))]
    events: list[Event] = []
    stop = threading.Event()
    ring = k.dp.ring(events.append)

    def read() -> None:
        while not stop.is_set():
            ring.poll(20)

    reader = threading.Thread(target=read)
    applies: list[tuple[int, int, int, Tables]] = []  # (start ns, end ns, gen, tables)
    seconds: list[float] = []

    def apply(tables: Tables) -> None:
        start = time.monotonic_ns()  # CLOCK_MONOTONIC, as the events' ts_ns
        applied = k.dp.apply(tables)
        applies.append((start, time.monotonic_ns(), applied.gen, tables))
        seconds.append(applied.seconds)

    apply(cycle[-1])
    sender = stop_later(Probe(k.root / w))
    sender.ask(op="flood", host="127.0.0.1", ports=[one, two], interval=0.0002)
    reader.start()
    try:
        for i in range(200):
            time.sleep(0.004)
            apply(cycle[i % 4])
        time.sleep(0.004)
        flood = sender.ask(op="flood_stop")
        time.sleep(0.05)
    finally:
        stop.set()
        reader.join()
    while ring.poll(0):
        pass
    ring.close()
    log: list[tuple[int, int, int, int]] = [tuple(x) for x in flood["log"]]
    eperm = Counter(port for _, _, port, passed in log if not passed)
    print(f"apply: median {statistics.median(seconds) * 1000:.2f} ms, "
          f"max {max(seconds) * 1000:.2f} ms over {len(seconds)} applies; "
          f"sent {Counter(port for _, _, port, _ in log)}, EPERM {eperm}, "
          f"events {len(events)}")

    assert flood["other"] == {}
    wrong = []  # a drop that is not what that generation's tables say
    for e in events:
        assert (e.direction, e.packet_ingress, e.address, e.protocol) == (
            "egress", False, ip_address("127.0.0.1"), 17)
        tables = next(t for start, _, gen, t in reversed(applies)
                      if gen == e.gen and start <= e.ts_ns)
        if lookup(tables, w, "egress", e.address, e.port, 17) != ("drop", e.rule):
            wrong.append(e)
    assert wrong == []
    assert k.dp.stats() == {"events_lost": 0, "unmatched": 0, "unparsed": 0}  # no miss
    assert eperm == Counter(e.port for e in events)
    # every datagram sent between two applies got the verdict of the first one's tables
    # (the sockets' cached allows too)
    judged = []
    for i, (_, end, _, tables) in enumerate(applies):
        until = applies[i + 1][0] if i + 1 < len(applies) else log[-1][1] + 1
        for start, done, port, passed in log:
            if end <= start and done <= until:
                drop = lookup(tables, w, "egress", "127.0.0.1", port, 17)[0] == "drop"
                judged.append((i, port, passed, drop))
    assert [j for j in judged if j[2] == j[3]] == []
    assert len(judged) > len(log) / 3
    for port in (one, two):  # each was dropped and passed in turn
        assert {passed for _, p, passed, _ in judged if p == port} == {0, 1}
    for start, _, gen, tables in applies[-2:]:  # each generation's counters since its apply
        denied = sum(n for r, (n, _) in k.dp.counters(gen).items()
                     if tables.deny >> (r - 1) & 1)
        assert denied == sum(1 for e in events if e.gen == gen and e.ts_ns >= start)


# --- the pins ------------------------------------------------------------------------------


def test_the_pins_keep_the_policy_a_new_agent_takes_over_and_remove_ends_it(
        k: Kernel, stop_later: StopLater) -> None:
    w = k.cgroup("w")
    remote = stop_later(Probe(None))
    probe: Probe = stop_later(Probe(k.root / w))
    allowed, denied = (remote.ask(op="listen", proto="udp", host="127.0.0.1")["port"]
                       for _ in range(2))
    here = (net("127.0.0.1/32"),)

    def only(port: int) -> Tables:
        return compile_tables(settings("enforce", policy(
            "w", w, egress=(Rule(here, (PortSpec("UDP", port),)),))))

    def udp(port: int) -> dict[str, Any]:
        answer = probe.ask(op="udp", host="127.0.0.1", port=port, timeout=T)
        return {"ok": True} if answer.get("ok") else answer

    first = k.dp.apply(only(allowed))
    assert udp(allowed) == {"ok": True}
    assert udp(denied) == {"error": "EPERM"}
    counted = k.dp.counters()
    maps = sorted(p.name for p in k.pin.glob("maps-*"))
    k.dp.close()  # the agent is gone
    assert udp(denied) == {"error": "EPERM"}
    assert udp(allowed) == {"ok": True}

    dp = k.reopen()
    assert sorted(p.name for p in k.pin.glob("maps-*")) == maps
    assert dp.active_gen() == first.gen
    assert dp.counters() == {1: (counted[1][0] + 2, counted[1][1] * 2),
                             2: (counted[2][0] + 1, counted[2][1] * 2)}
    second = dp.apply(only(denied))
    assert second.gen == 1 - first.gen
    assert sorted(p.name for p in k.pin.glob("maps-*")) == maps
    assert udp(denied) == {"ok": True}
    assert udp(allowed) == {"error": "EPERM"}

    assert type(dp).remove(k.pin)
    assert not k.pin.exists()
    assert udp(allowed) == {"ok": True}
    assert udp(denied) == {"ok": True}


# --- what no policy selects ----------------------------------------------------------------


def test_a_workload_no_policy_selects_is_never_counted(
        k: Kernel, ring: Ring, stop_later: StopLater) -> None:
    app, app2, parent = k.cgroup("app"), k.cgroup("app2"), k.cgroup("p")
    child = k.cgroup("p/c")
    remote = stop_later(Probe(None))
    tcp = remote.ask(op="listen", proto="tcp", host="127.0.0.1")["port"]
    udp = remote.ask(op="listen", proto="udp", host="::1")["port"]
    s = settings("enforce", policy("app", app), policy("c", child))  # all denied
    applied = k.dp.apply(compile_tables(s))
    for w in (app2, parent):  # a name that app is a prefix of; a selected one's parent
        probe = stop_later(Probe(k.root / w))
        inbound = probe.ask(op="listen", proto="udp", host="127.0.0.1")["port"]
        assert probe.ask(op="tcp", host="127.0.0.1", port=tcp, timeout=T)["ok"]
        assert probe.ask(op="udp", host="::1", port=udp, timeout=T)["ok"]
        assert remote.ask(op="udp", host="127.0.0.1", port=inbound, timeout=T)["ok"]
        assert evaluate(s, w, "egress", "127.0.0.1", tcp, "tcp").rule is None
    assert k.dp.counters(applied.gen) == {}
    assert ring.take() == []
    selected = stop_later(Probe(k.root / app))  # while the policy is in force
    assert selected.ask(op="udp", host="::1", port=udp, timeout=T) == {"error": "EPERM"}
    rule = evaluate(s, app, "egress", "::1", udp, "udp").rule
    assert rule is not None
    assert {r: n for r, (n, _) in k.dp.counters(applied.gen).items()} == {rule.id: 1}
    assert [e.rule for e in ring.take()] == [rule.id]
    assert k.dp.stats() == {"events_lost": 0, "unmatched": 0, "unparsed": 0}
