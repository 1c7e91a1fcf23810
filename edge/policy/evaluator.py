"""The reference evaluator: the verdict of the policy for one connection, in pure Python.

:func:`rules` compiles :class:`~edge.policy.spec.PolicySettings` into one ordered list
of :class:`FlatRule` with numeric ids; :func:`evaluate` decides over that list, and the
kernel datapath (not built yet) is to load the same list (its per-rule counters keyed by
the ids) and be held to :func:`evaluate` by tests.

Order of the list, and of matching: failsafe allows, then every policy's explicit
denies (``egressDeny``, ``ingressDeny``), then its allows (``egress``, ``ingress``),
then one default deny per policy and direction. A connection of a workload that no
policy selects is allowed (not policed). Otherwise the verdict is taken twice, first
match each time among the rules that apply to the workload and direction:

1. over the rules in force (failsafe, and those of policies in ``enforce`` mode): a
   deny there drops the connection (``enforced``);
2. over every rule, audit-mode policies' too: a deny there is a would-deny that is
   reported and passes (audit); otherwise it is allowed.

So an audit-mode policy never changes what passes or is dropped, it only reports what
it would drop; failsafe allows beat every deny.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from ipaddress import IPv6Address, ip_address
from typing import Final, Literal

from edge.policy.spec import (
    ANY_ADDRESS,
    Address,
    Direction,
    NetworkPolicy,
    Peer,
    PolicySettings,
    PortSpec,
    Protocol,
    Rule,
    selects,
)

Section = Literal["failsafe", "egressDeny", "ingressDeny", "egress", "ingress", "default"]
Action = Literal["allow", "deny"]
DIRECTIONS: Final[tuple[Direction, ...]] = ("egress", "ingress")
_NUMBERS: Final = {"6": "TCP", "17": "UDP", "1": "ICMP", "58": "ICMP"}
_ICMP6: Final = ("ICMPV6", "ICMP6", "IPV6-ICMP", "58")


@dataclass(frozen=True, slots=True)
class FlatRule:
    """One compiled rule: a rule of a policy (or a failsafe item) for one of its
    ``ports`` entries.

    ``id`` (1-based, the position in :func:`rules`) is stable for a given settings
    object. ``policy`` is the policy's name (None for failsafe rules), ``section`` and
    ``index`` locate the rule in it (the failsafe item's index in
    :attr:`PolicySettings.failsafe`; None for a default deny), ``port_entry`` the entry
    of its ``ports`` (None when it has none). ``workload`` is the selected cgroup path
    (None: every policed workload). ``enforce`` is False for the rules of an
    audit-mode policy. The rule matches a connection in ``direction`` to or from an
    address of one of ``peers``, with ``protocol`` (None: any) on a port within
    ``ports`` (inclusive; None: any port, or ICMP, which has none). ``label`` names a
    failsafe item (``dns``), ``why`` says where its addresses come from.
    """

    id: int
    policy: str | None
    section: Section
    index: int | None
    port_entry: int | None
    workload: str | None
    direction: Direction
    action: Action
    enforce: bool
    peers: tuple[Peer, ...]
    protocol: Protocol | None
    ports: tuple[int, int] | None
    label: str = ""
    why: str = ""

    def applies(self, workload: str, direction: Direction) -> bool:
        """Whether the rule is about connections of ``workload`` in ``direction``."""
        return self.direction == direction and (
            self.workload is None or selects(self.workload, workload))

    def matches(self, address: Address, port: int | None, protocol: Protocol) -> bool:
        """Whether a connection with that remote ``address``, ``port`` and ``protocol``
        is one of this rule's (its workload and direction not checked)."""
        if self.protocol is not None and self.protocol != protocol:
            return False
        if self.ports is not None and not (
                port is not None and self.ports[0] <= port <= self.ports[1]):
            return False
        return any(p.matches(address) for p in self.peers)

    @property
    def where(self) -> str:
        """Where it comes from: ``policy 'agent' egress[0]`` (``.ports[1]``),
        ``failsafe dns``, ``policy 'agent' default deny (egress)``."""
        if self.section == "failsafe":
            return f"failsafe {self.label}"
        if self.section == "default":
            return f"policy {self.policy!r} default deny ({self.direction})"
        entry = f".ports[{self.port_entry}]" if self.port_entry is not None else ""
        return f"policy {self.policy!r} {self.section}[{self.index}]{entry}"

    def describe(self) -> str:
        """What it matches, e.g. ``to 10.0.0.0/8 except 10.9.0.0/16; TCP 502``."""
        side = "to" if self.direction == "egress" else "from"
        peers = ("any address" if self.peers == ANY_ADDRESS
                 else f"{side} {', '.join(map(str, self.peers))}")
        if self.protocol is None:
            what = "all ports and protocols"
        elif self.ports is None or self.ports == (0, 65535):
            what = self.protocol if self.protocol == "ICMP" else f"{self.protocol} (all ports)"
        elif self.ports[0] == self.ports[1]:
            what = f"{self.protocol} {self.ports[0]}"
        else:
            what = f"{self.protocol} {self.ports[0]}-{self.ports[1]}"
        return f"{peers}; {what}"


@dataclass(frozen=True, slots=True)
class Verdict:
    """What the policy makes of one connection.

    ``action`` ``allow`` or ``deny``; ``enforced`` True when the deciding rule is in
    force (failsafe, or an ``enforce``-mode policy): a deny that is not enforced is an
    audit would-deny and the connection passes. ``rule`` is the deciding rule (None
    when no policy selects the workload), ``reason`` says why in words.
    """

    action: Action
    enforced: bool
    rule: FlatRule | None
    reason: str

    @property
    def passes(self) -> bool:
        """Whether the connection goes through (an allow, or a deny in audit mode)."""
        return self.action == "allow" or not self.enforced


def _flat(rule: Rule, *, id_: int, policy: str | None, section: Section, index: int,
          workload: str | None, direction: Direction, action: Action, enforce: bool,
          label: str = "", why: str = "") -> list[FlatRule]:
    """One FlatRule per ``ports`` entry of ``rule`` (one for all when it has none),
    numbered from ``id_``."""
    peers = rule.peers if rule.peers is not None else ANY_ADDRESS
    entries: list[tuple[int | None, PortSpec | None]] = (
        [(None, None)] if rule.ports is None else list(enumerate(rule.ports)))
    return [FlatRule(id_ + n, policy, section, index, entry, workload, direction, action,
                     enforce, peers, spec.protocol if spec else None,
                     spec.range if spec else None, label, why)
            for n, (entry, spec) in enumerate(entries)]


def _sections(p: NetworkPolicy, action: Action) -> list[tuple[Section, Direction,
                                                                tuple[Rule, ...]]]:
    if action == "deny":
        return [("egressDeny", "egress", p.egress_deny), ("ingressDeny", "ingress",
                                                          p.ingress_deny)]
    return [("egress", "egress", p.egress), ("ingress", "ingress", p.ingress)]


@functools.lru_cache(maxsize=16)
def rules(settings: PolicySettings) -> tuple[FlatRule, ...]:
    """The settings compiled into the ordered list the evaluator (and the datapath)
    match against: failsafe rules, explicit denies, allows, default denies (see the
    module docstring). Rule ids are 1, 2, … in this order. No policy: no rule (the
    failsafe rules only count for policed workloads)."""
    if not settings.policies:
        return ()
    out: list[FlatRule] = []
    for i, item in enumerate(settings.failsafe):
        out += _flat(item.rule, id_=len(out) + 1, policy=None, section="failsafe", index=i,
                     workload=None, direction=item.direction, action="allow", enforce=True,
                     label=item.label, why=item.why)
    for action in ("deny", "allow"):
        for p in settings.policies:
            enforce = settings.mode_of(p) == "enforce"
            for section, direction, section_rules in _sections(p, action):
                for i, rule in enumerate(section_rules):
                    out += _flat(rule, id_=len(out) + 1, policy=p.name, section=section,
                                 index=i, workload=p.workload, direction=direction,
                                 action=action, enforce=enforce)
    for p in settings.policies:
        for direction in DIRECTIONS:
            out.append(FlatRule(len(out) + 1, p.name, "default", None, None, p.workload,
                                direction, "deny", settings.mode_of(p) == "enforce",
                                ANY_ADDRESS, None, None))
    return tuple(out)


def parse_protocol(name: str, version: int) -> Protocol:
    """``tcp``, ``udp``, ``icmp`` (any case), ``icmpv6`` for IPv6, or an IP protocol
    number (6, 17, 1, 58) as the protocol of a connection to an IP ``version`` address.

    Raises:
        ValueError: another protocol, or ICMPv6 with an IPv4 address (or ICMP's
            number 1 with IPv6).
    """
    upper = name.strip().upper()
    if upper in _ICMP6:
        if version != 6:
            raise ValueError(f"{name} is for IPv6 addresses; use icmp with IPv4")
        return "ICMP"
    if upper == "1" and version == 6:
        raise ValueError("IP protocol 1 is ICMP for IPv4; ICMPv6 is 58")
    upper = _NUMBERS.get(upper, upper)
    if upper not in ("TCP", "UDP", "ICMP"):
        raise ValueError(f"protocol {name!r} is not tcp, udp or icmp")
    return upper  # type: ignore[return-value]  # checked just above


def evaluate(settings: PolicySettings, workload: str, direction: Direction,
             address: str | Address, port: int | None, protocol: str) -> Verdict:
    """The verdict on a connection of ``workload`` (cgroup path under the cgroup v2
    root, e.g. ``system.slice/edge.service``) in ``direction``: for ``egress`` to
    ``address`` (IPv4 or IPv6) port ``port``, for ``ingress`` from ``address`` to the
    workload's port ``port``; ``protocol`` as :func:`parse_protocol` takes it. ``port``
    is 0–65535 for TCP and UDP and None for ICMP. An IPv4-mapped IPv6 address
    (``::ffff:10.0.0.5``) is taken as the IPv4 address it is on the wire.

    Raises:
        ValueError: an address, port, protocol or direction that is none.
    """
    if direction not in DIRECTIONS:
        raise ValueError(f"direction {direction!r} is not egress or ingress")
    addr = ip_address(address) if isinstance(address, str) else address
    if isinstance(addr, IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped  # ::ffff:a.b.c.d goes out as IPv4
    proto = parse_protocol(protocol, addr.version)
    if proto == "ICMP" and port is not None:
        raise ValueError("ICMP has no ports: give None")
    if proto != "ICMP" and (port is None or not 0 <= port <= 65535):
        raise ValueError(f"{proto} needs a port from 0 to 65535, not {port}")
    selecting = [p.name for p in settings.policies if selects(p.workload, workload)]
    if not selecting:
        return Verdict("allow", False, None, f"no policy selects {workload}: it is not "
                       "policed")
    applicable = [r for r in rules(settings)
                  if r.applies(workload, direction) and r.matches(addr, port, proto)]
    in_force = next((r for r in applicable if r.enforce), None)
    if in_force is not None and in_force.action == "deny":
        return Verdict("deny", True, in_force, _reason(in_force, workload, selecting))
    hit = applicable[0]  # a default deny of a selecting policy always applies
    if hit.action == "deny":
        return Verdict("deny", False, hit, _reason(hit, workload, selecting)
                       + "; audit mode: reported as a would-deny, the connection passes")
    return Verdict("allow", hit.enforce, hit, _reason(hit, workload, selecting))


def _reason(rule: FlatRule, workload: str, selecting: list[str]) -> str:
    if rule.section == "failsafe":
        return (f"allowed by {rule.where} ({rule.why}): failsafe rules are always allowed, "
                "whatever a policy denies")
    if rule.section == "default":
        names = ", ".join(map(repr, selecting))
        return (f"no rule allows it: {workload} is selected by {names}, so it is default "
                f"deny ({rule.direction})")
    if rule.action == "deny":
        return f"denied by {rule.where} ({rule.describe()}): an explicit deny beats any allow"
    return f"allowed by {rule.where} ({rule.describe()})"
