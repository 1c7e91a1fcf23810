"""The BPF map contents of a policy, and the kernel's lookup over them, in pure Python.

:func:`compile_tables` turns the rule list of :func:`~edge.policy.evaluator.rules` into
what the ``cgroup_skb`` program reads; :func:`lookup` does what that program does with
it, and tests hold :func:`lookup` to :func:`~edge.policy.evaluator.evaluate`.

Rule id ``n`` is bit ``n - 1`` of a 256-bit bitmap (an ``int`` here; in the maps
:func:`bits_bytes`, four little-endian u64 words). Per packet the kernel:

1. ORs the ``(egress, ingress)`` bitmaps of the workload entries of the packet's
   ancestor cgroups, at the levels set in ``levels`` (none found: not policed);
2. takes ``A``, the LPM match of the remote address in the trie of its family, and
   ``P``, the LPM match of (IP protocol, port) in the port trie (port 0 but for TCP
   and UDP; for ingress the workload's own port), a miss being no rule, and
   ``C = A & P & W[direction]``;
3. drops the packet when the lowest rule of ``C & enforce`` is a deny; otherwise the
   lowest rule of ``C`` decides: a deny is an audit would-drop (it passes), an allow
   allows.

A trie holds one entry per prefix that some rule names (a cidr, an except, a port
range's aligned blocks), with every rule that covers that prefix whole: an address
whose longest match is ``P`` is in exactly those rules, as any rule's prefix holds
either all of ``P`` or none of it. Every entry holds the default denies (they cover
every address, protocol and port), so no lookup misses and no entry is 0.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network, ip_address
from typing import Final, Literal, TypeVar

from edge.policy.evaluator import DIRECTIONS, FlatRule, rules
from edge.policy.spec import IP_PROTOCOL, Address, Direction, PolicySettings

MAX_RULES: Final = 256
"""Rules the datapath holds: the width of its bitmaps."""
MAX_LEVEL: Final = 31
"""The deepest cgroup level (path components) the datapath looks a workload up at."""
ICMP_NUMBERS: Final = (IP_PROTOCOL["ICMP", 4], IP_PROTOCOL["ICMP", 6])
"""An ``ICMP`` rule covers ICMP (1) and ICMPv6 (58)."""
_PORT_KEY_BITS: Final = 24  # protocol (8) then port (16, big endian)
Outcome = Literal["unpoliced", "allow", "drop", "would-drop"]
_N = TypeVar("_N", IPv4Network, IPv6Network)
Prefix = tuple[int, int]
"""A prefix as ``(value, length)``, the value's unused low bits zero."""
Region = tuple[Prefix, tuple[Prefix, ...]]
"""What one peer or ports entry covers: a prefix, except the prefixes in it."""


class TooManyRules(ValueError):  # noqa: N818  # the name says it all
    """The settings compile to more than :data:`MAX_RULES` rules (``count``)."""

    def __init__(self, count: int) -> None:
        super().__init__(f"the policy compiles to {count} rules, more than the "
                         f"{MAX_RULES} the datapath holds")
        self.count = count


@dataclass(frozen=True, slots=True)
class Tables:
    """The contents of the datapath's maps for one policy.

    ``rules`` is the rule list (rule ``n`` is bit ``n - 1`` of every bitmap);
    ``deny`` and ``enforce`` are the bitmaps of the deny rules and of the rules in
    force. ``levels`` has bit ``L`` set when some selected workload is ``L`` path
    components deep (``system.slice/edge.service``: 2). ``workloads`` maps each
    selected workload's cgroup path to its ``(egress, ingress)`` bitmaps: the failsafe
    rules and its own, per direction. ``addr4`` and ``addr6`` are the address tries as
    ``(prefix, bits)``; ``ports`` the port trie as ``(prefix length in bits 0..24,
    IP protocol, port, bits)``, the key being the protocol (8 bits) then the port (16
    bits), unused low bits zero. Entries are sorted by key.
    """

    rules: tuple[FlatRule, ...]
    deny: int
    enforce: int
    levels: int
    workloads: dict[str, tuple[int, int]]
    addr4: tuple[tuple[IPv4Network, int], ...]
    addr6: tuple[tuple[IPv6Network, int], ...]
    ports: tuple[tuple[int, int, int, int], ...]


def _bit(rule: FlatRule) -> int:
    return 1 << (rule.id - 1)


def _covers(outer: Prefix, inner: Prefix, width: int) -> bool:
    """Whether prefix ``outer`` holds all of ``inner`` (``width``-bit keys)."""
    return inner[1] >= outer[1] and (inner[0] ^ outer[0]) >> (width - outer[1]) == 0


def _trie(regions: dict[Region, int], width: int) -> dict[Prefix, int]:
    """Every prefix the regions (region → rule bits) name, with the bits of every region
    that holds it whole; ``width``-bit keys."""
    prefixes = {p for outer, holes in regions for p in (outer, *holes)}
    return {p: _or(bits for (outer, holes), bits in regions.items()
                   if _covers(outer, p, width) and not any(_covers(h, p, width)
                                                             for h in holes))
            for p in prefixes}


def _or(values: Iterable[int]) -> int:
    out = 0
    for v in values:
        out |= v
    return out


def _add(regions: dict[Region, int], region: Region, rule: FlatRule) -> None:
    regions[region] = regions.get(region, 0) | _bit(rule)


def _address_trie(flat: tuple[FlatRule, ...], family: type[_N]) -> tuple[tuple[_N, int], ...]:
    regions: dict[Region, int] = {}
    for rule in flat:
        for peer in rule.peers:
            if isinstance(peer.cidr, family):
                _add(regions, ((int(peer.cidr.network_address), peer.cidr.prefixlen),
                               tuple(sorted((int(e.network_address), e.prefixlen)
                                            for e in peer.excepts))), rule)
    width = 32 if family is IPv4Network else 128
    return tuple((family(p), bits) for p, bits in sorted(_trie(regions, width).items()))


def port_prefixes(first: int, last: int) -> tuple[tuple[int, int], ...]:
    """The ports ``first`` to ``last`` (inclusive, 0–65535) as the fewest aligned
    blocks: ``(port, length)``, the block of the ports whose first ``length`` bits
    (of 16) are those of ``port``, in port order (``(0, 65535)`` is ``((0, 0),)``).

    Raises:
        ValueError: not a range of ports.
    """
    if not 0 <= first <= last <= 65535:
        raise ValueError(f"{first}-{last} is not a range of ports from 0 to 65535")
    out: list[tuple[int, int]] = []
    port = first
    while port <= last:
        size = (port & -port) if port else 1 << 16  # the largest block aligned at port
        while port + size - 1 > last:
            size >>= 1
        out.append((port, 16 - size.bit_length() + 1))
        port += size
    return tuple(out)


def _port_regions(rule: FlatRule) -> tuple[Prefix, ...]:
    """The port-trie prefixes of what ``rule`` covers."""
    if rule.protocol is None:
        return ((0, 0),)
    if rule.protocol == "ICMP":
        return tuple((number << 16, 8) for number in ICMP_NUMBERS)
    number = IP_PROTOCOL[rule.protocol, 4]  # TCP and UDP: the same for IPv6
    first, last = rule.ports if rule.ports is not None else (0, 65535)
    return tuple((number << 16 | port, 8 + length)
                 for port, length in port_prefixes(first, last))


def _port_trie(flat: tuple[FlatRule, ...]) -> tuple[tuple[int, int, int, int], ...]:
    regions: dict[Region, int] = {}
    for rule in flat:
        for prefix in _port_regions(rule):
            _add(regions, (prefix, ()), rule)
    return tuple((length, key >> 16, key & 0xFFFF, bits)
                 for (key, length), bits in sorted(_trie(regions, _PORT_KEY_BITS).items()))


def workload_level(path: str) -> int:
    """The cgroup level of ``path``: its number of components."""
    return path.count("/") + 1


def compile_tables(settings: PolicySettings) -> Tables:
    """The map contents for ``settings`` (see :class:`Tables`); no policy: no workload,
    nothing policed.

    Raises:
        TooManyRules: more than :data:`MAX_RULES` rules.
        ValueError: a selected workload deeper than :data:`MAX_LEVEL` levels.
    """
    flat = rules(settings)
    if len(flat) > MAX_RULES:
        raise TooManyRules(len(flat))
    failsafe = {d: _or(_bit(r) for r in flat if r.workload is None and r.direction == d)
                for d in DIRECTIONS}
    own: dict[str, dict[Direction, int]] = {}
    for r in flat:
        if r.workload is not None:
            sides = own.setdefault(r.workload, {"egress": 0, "ingress": 0})
            sides[r.direction] |= _bit(r)
    levels = 0
    for path in own:
        if workload_level(path) > MAX_LEVEL:
            raise ValueError(f"workload {path} is {workload_level(path)} cgroup levels "
                             f"deep, more than the {MAX_LEVEL} the datapath looks up")
        levels |= 1 << workload_level(path)
    return Tables(
        rules=flat,
        deny=_or(_bit(r) for r in flat if r.action == "deny"),
        enforce=_or(_bit(r) for r in flat if r.enforce),
        levels=levels,
        workloads={path: (failsafe["egress"] | sides["egress"],
                          failsafe["ingress"] | sides["ingress"])
                   for path, sides in own.items()},
        addr4=_address_trie(flat, IPv4Network),
        addr6=_address_trie(flat, IPv6Network),
        ports=_port_trie(flat),
    )


def _lowest(bits: int) -> int | None:
    """The id of the lowest rule in ``bits`` (None: none)."""
    return (bits & -bits).bit_length() or None


def _lpm_address(trie: tuple[tuple[IPv4Network, int], ...] | tuple[tuple[IPv6Network, int],
                                                                    ...],
                 address: Address) -> int:
    best: tuple[int, int] | None = None
    for prefix, bits in trie:
        if address in prefix and (best is None or prefix.prefixlen > best[0]):
            best = (prefix.prefixlen, bits)
    return best[1] if best is not None else 0


def _lpm_port(trie: tuple[tuple[int, int, int, int], ...], key: int) -> int:
    best: tuple[int, int] | None = None
    for length, protocol, port, bits in trie:
        if (_covers((protocol << 16 | port, length), (key, _PORT_KEY_BITS), _PORT_KEY_BITS)
                and (best is None or length > best[0])):
            best = (length, bits)
    return best[1] if best is not None else 0


def lookup(tables: Tables, workload: str, direction: Direction, address: str | Address,
           port: int | None, protocol_number: int) -> tuple[Outcome, int | None]:
    """What the kernel does with a connection of cgroup ``workload`` in ``direction``
    with remote ``address`` (an IPv4-mapped IPv6 address taken as IPv4), ``port``
    (egress: the remote's, ingress: the workload's; None is 0, what the kernel puts for
    ICMP and protocols but TCP and UDP) and IP protocol ``protocol_number``:
    ``("unpoliced", None)``, or ``("allow" | "drop" | "would-drop", rule id)``.

    Raises:
        ValueError: a direction, address, port or protocol number that is none, or
            tables in which the connection matches no rule (no policy's).
    """
    if direction not in DIRECTIONS:
        raise ValueError(f"direction {direction!r} is not egress or ingress")
    addr = ip_address(address) if isinstance(address, str) else address
    if isinstance(addr, IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    port = 0 if port is None else port
    if not 0 <= port <= 65535 or not 0 <= protocol_number <= 255:
        raise ValueError(f"port {port} or protocol {protocol_number} out of range")
    parts = workload.split("/")
    found = [tables.workloads.get("/".join(parts[:level]))
             for level in range(1, min(len(parts), MAX_LEVEL) + 1)
             if tables.levels >> level & 1]
    sides = [entry for entry in found if entry is not None]
    if not sides:
        return ("unpoliced", None)
    w = _or(entry[DIRECTIONS.index(direction)] for entry in sides)
    a = _lpm_address(tables.addr4 if isinstance(addr, IPv4Address) else tables.addr6, addr)
    p = _lpm_port(tables.ports, protocol_number << 16 | port)
    c = a & p & w
    e = _lowest(c & tables.enforce)
    if e is not None and tables.deny >> (e - 1) & 1:
        return ("drop", e)
    f = _lowest(c)
    if f is None:
        raise ValueError(f"{workload} {direction} {addr} port {port} protocol "
                         f"{protocol_number} matches no rule: these are no policy's tables")
    return ("would-drop" if tables.deny >> (f - 1) & 1 else "allow", f)


def bits_bytes(bits: int) -> bytes:
    """A bitmap as the maps hold it: 32 bytes, four little-endian u64 words, word 0
    holding rules 1–64 (bits 0–63).

    Raises:
        ValueError: not a bitmap of :data:`MAX_RULES` bits.
    """
    if not 0 <= bits < 1 << MAX_RULES:
        raise ValueError(f"{bits:#x} is not a bitmap of {MAX_RULES} bits")
    return bits.to_bytes(MAX_RULES // 8, "little")
