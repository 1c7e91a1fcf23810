"""A network policy as the agent holds it: plain frozen values, validated in the config
child (:mod:`edge.config.policy`).

A :class:`NetworkPolicy` selects one workload by its cgroup v2 path (relative to the
cgroup v2 root, e.g. ``system.slice/edge.service``; the cgroups below it are part of
it). A selected workload is default deny in both directions; its policies' ``egress``
and ``ingress`` rules allow, ``egress_deny`` and ``ingress_deny`` rules deny (and beat
any allow). The :data:`failsafe <PolicySettings.failsafe>` rules are allowed whatever the
policies say. Verdicts are per connection, in the direction it was opened: for egress
the address and port are the remote end's (destination), for ingress the address is the
remote end's (source) and the port the workload's own (destination); replies within an
allowed connection belong to it.
"""

from __future__ import annotations

from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from typing import Final, Literal

Protocol = Literal["TCP", "UDP", "ICMP"]
"""``ICMP`` is ICMP (IP protocol 1) for IPv4 addresses and ICMPv6 (58) for IPv6."""
Direction = Literal["egress", "ingress"]
Mode = Literal["audit", "enforce"]
Network = IPv4Network | IPv6Network
Address = IPv4Address | IPv6Address

PROTOCOLS: Final[tuple[Protocol, ...]] = ("TCP", "UDP", "ICMP")
IP_PROTOCOL: Final = {("TCP", 4): 6, ("TCP", 6): 6, ("UDP", 4): 17, ("UDP", 6): 17,
                      ("ICMP", 4): 1, ("ICMP", 6): 58}
"""(protocol, IP version) → IP protocol number (IANA), for the datapath."""
PIN_DIR: Final = "/sys/fs/bpf/edge"
"""Where the datapath is pinned by default (systemd mounts bpffs at /sys/fs/bpf)."""
CGROUP_ROOT: Final = "/sys/fs/cgroup"
"""Where cgroup v2 is usually mounted (``/sys/fs/cgroup/unified`` on hybrid hosts)."""


def unit_cgroup(unit: str) -> str:
    """The cgroup v2 path systemd gives the system unit ``unit``:
    ``system.slice/<unit>``, and for an instance of a template
    ``system.slice/system-<template>.slice/<unit>`` (``-`` in the template name written
    ``\\x2d``), e.g. ``getty@tty1.service`` →
    ``system.slice/system-getty.slice/getty@tty1.service``.
    A unit with its own ``Slice=`` (or a user unit) is selected by ``cgroup`` instead."""
    if "@" in unit:
        template = unit.split("@", 1)[0].replace("-", "\\x2d")
        return f"system.slice/system-{template}.slice/{unit}"
    return f"system.slice/{unit}"


def selects(selected: str, workload: str) -> bool:
    """Whether a policy on cgroup ``selected`` applies to cgroup ``workload``: the same
    path or one below it (cgroup programs apply to a cgroup's descendants)."""
    return workload == selected or workload.startswith(selected + "/")


@dataclass(frozen=True, slots=True)
class Peer:
    """The addresses of ``cidr`` except those of each of ``excepts`` (all inside
    ``cidr``, of the same IP version)."""

    cidr: Network
    excepts: tuple[Network, ...] = ()

    def matches(self, address: Address) -> bool:
        """Whether ``address`` is in ``cidr`` and in none of ``excepts``."""
        return (address.version == self.cidr.version and address in self.cidr
                and not any(address in e for e in self.excepts))

    def __str__(self) -> str:
        held = f" except {', '.join(map(str, self.excepts))}" if self.excepts else ""
        return f"{self.cidr}{held}"


ANY_ADDRESS: Final = (Peer(IPv4Network("0.0.0.0/0")), Peer(IPv6Network("::/0")))
"""Every IPv4 and IPv6 address (what an omitted ``to``/``from`` means)."""


@dataclass(frozen=True, slots=True)
class PortSpec:
    """One ``ports`` entry: ``protocol`` and, for TCP and UDP, the ports ``port`` to
    ``end_port`` (inclusive; 1–65535). ``port`` None is every port of the protocol;
    ``end_port`` None is ``port`` alone. ICMP has no ports."""

    protocol: Protocol
    port: int | None = None
    end_port: int | None = None

    @property
    def range(self) -> tuple[int, int] | None:
        """``(first, last)`` port, ``(0, 65535)`` for every port; None for ICMP."""
        if self.protocol == "ICMP":
            return None
        if self.port is None:
            return (0, 65535)
        return (self.port, self.end_port if self.end_port is not None else self.port)


@dataclass(frozen=True, slots=True)
class Rule:
    """One rule: connections to (egress) or from (ingress) any of ``peers``, on any of
    ``ports``. ``peers`` None is any address, ``ports`` None every port and protocol."""

    peers: tuple[Peer, ...] | None = None
    ports: tuple[PortSpec, ...] | None = None


@dataclass(frozen=True, slots=True)
class NetworkPolicy:
    """One ``NetworkPolicy`` document: ``name`` (unique), the ``workload`` it selects
    (cgroup path, see :func:`unit_cgroup`), its ``mode`` (None: the agent file's
    ``policy.mode``), its rules by section, and ``source`` (where it was declared:
    ``edge.yaml policy.policies[0]`` or ``bundle version 7 policies #1``)."""

    name: str
    workload: str
    mode: Mode | None = None
    egress: tuple[Rule, ...] = ()
    egress_deny: tuple[Rule, ...] = ()
    ingress: tuple[Rule, ...] = ()
    ingress_deny: tuple[Rule, ...] = ()
    source: str = ""


@dataclass(frozen=True, slots=True)
class FailsafeRule:
    """One failsafe item, always allowed: ``label`` names it (``loopback``, ``dns``,
    ``dhcp``, ``broker``, ``ssh``, ``extra[0]``, ``ingress[0]``), ``why`` says where its
    addresses come from."""

    label: str
    direction: Direction
    rule: Rule
    why: str = ""


@dataclass(frozen=True, slots=True)
class PolicySettings:
    """The network policy of one configuration: the agent file's ``policy.mode`` (the
    mode of policies that name none), the policies (the agent file's
    ``policy.policies``, or a bundle's ``policies``), and the failsafe rules resolved at
    load time (empty while there is no policy: nothing is policed then). ``pin_dir`` is
    where the datapath is pinned in bpffs and ``backend`` what loads it (``libbpf``:
    the prebuilt object; ``bcc``: compiled at run time), the agent file's
    ``policy.pin_dir`` and ``policy.backend``."""

    mode: Mode = "audit"
    policies: tuple[NetworkPolicy, ...] = ()
    failsafe: tuple[FailsafeRule, ...] = ()
    pin_dir: str = PIN_DIR
    backend: Literal["libbpf", "bcc"] = "libbpf"

    def mode_of(self, policy: NetworkPolicy) -> Mode:
        """The mode ``policy`` runs in."""
        return policy.mode or self.mode
