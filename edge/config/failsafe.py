"""The failsafe set (Calico-style), resolved at load time in the validating child.

Always allowed for every policed workload, over any deny, whatever a pushed policy
says, so that a bad policy cannot cut a remote gateway off:

``loopback``
    127.0.0.0/8 and ::1, both directions, every port and protocol.
``dns``
    UDP and TCP 53 to each ``nameserver`` of ``policy.failsafe.resolv_conf``
    (``/etc/resolv.conf``), read at load time (a zone ``%eth0`` is dropped).
``dhcp``, ``dhcpv6``
    the client's side: egress UDP 67 and ingress UDP 68 (IPv4, any address: requests
    are broadcast), egress UDP 547 and ingress UDP 546 (IPv6).
``broker``
    TCP to ``uplink.port`` of ``uplink.host``: the address itself, or every address
    ``getaddrinfo`` gives for the name at load time (sorted; a name that does not
    resolve is a warning, and no broker rule).

The agent file's ``policy.failsafe`` only adds: ``ssh`` (ingress TCP 22),
``extra`` (egress rules) and ``ingress`` (ingress rules).
"""

from __future__ import annotations

import socket
from ipaddress import IPv4Network, IPv6Network, ip_address, ip_network
from pathlib import Path

from edge.config.agent import AgentFile
from edge.config.policy import egress_rule, ingress_rule
from edge.config.sources import Report, Where
from edge.policy.spec import (
    Address,
    FailsafeRule,
    Network,
    NetworkPolicy,
    Peer,
    PolicySettings,
    PortSpec,
    Rule,
)

LOOPBACK = (Peer(IPv4Network("127.0.0.0/8")), Peer(IPv6Network("::1/128")))
_ANY_V4 = (Peer(IPv4Network("0.0.0.0/0")),)
_ANY_V6 = (Peer(IPv6Network("::/0")),)
_DNS_PORTS = (PortSpec("UDP", 53), PortSpec("TCP", 53))


def _host_network(address: Address) -> Network:
    return ip_network(address)


def nameservers(path: Path) -> tuple[Address, ...]:
    """The ``nameserver`` addresses of a resolv.conf (resolv.conf(5)), in order, each
    once; lines that do not hold an address are skipped.

    Raises:
        OSError: the file cannot be read.
    """
    found: dict[Address, None] = {}
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        words = line.split()
        if len(words) >= 2 and words[0] == "nameserver":
            try:
                found.setdefault(ip_address(words[1].split("%", 1)[0]))
            except ValueError:
                continue
    return tuple(found)


def broker_addresses(host: str, port: int) -> tuple[Address, ...]:
    """``host`` if it is an address, else the addresses ``getaddrinfo`` gives for it
    (TCP, both families), sorted (IPv4 first), each once.

    Raises:
        OSError: the name does not resolve (``socket.gaierror``).
    """
    try:
        return (ip_address(host.strip("[]")),)
    except ValueError:
        pass
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    found = {ip_address(str(info[4][0]).split("%", 1)[0]) for info in infos}
    return tuple(sorted(found, key=lambda a: (a.version, int(a))))


def _built_in(agent: AgentFile, file: str, report: Report) -> list[FailsafeRule]:
    where = Where(file)
    out = [FailsafeRule("loopback", d, Rule(LOOPBACK), "127.0.0.0/8 and ::1")
           for d in ("egress", "ingress")]
    resolv = agent.policy.failsafe.resolv_conf
    try:
        servers = nameservers(resolv)
    except OSError as e:
        servers = ()
        report.warning(where, "policy.failsafe.resolv_conf", f"cannot read {resolv} "
                       f"({e.strerror}): the failsafe set allows no DNS resolver but on "
                       "loopback")
    if servers:
        peers = tuple(Peer(_host_network(a)) for a in servers)
        out.append(FailsafeRule("dns", "egress", Rule(peers, _DNS_PORTS),
                                f"the nameservers of {resolv}: "
                                f"{', '.join(map(str, servers))}"))
    out += [
        FailsafeRule("dhcp", "egress", Rule(_ANY_V4, (PortSpec("UDP", 67),)),
                     "DHCP client requests"),
        FailsafeRule("dhcp", "ingress", Rule(_ANY_V4, (PortSpec("UDP", 68),)),
                     "DHCP server replies"),
        FailsafeRule("dhcpv6", "egress", Rule(_ANY_V6, (PortSpec("UDP", 547),)),
                     "DHCPv6 client requests"),
        FailsafeRule("dhcpv6", "ingress", Rule(_ANY_V6, (PortSpec("UDP", 546),)),
                     "DHCPv6 server replies"),
    ]
    up = agent.uplink
    try:
        addresses = broker_addresses(up.host, up.port)
    except OSError as e:
        report.warning(where, "uplink.host", f"{up.host!r} cannot be resolved ({e}): the "
                       "failsafe set has no rule for the control-plane broker, so a policy "
                       f"that does not allow TCP {up.port} to it cuts the gateway off")
        return out
    resolved = "" if up.host.strip("[]") == str(addresses[0]) else (
        f" ({up.host} resolved at load time: {', '.join(map(str, addresses))})")
    out.append(FailsafeRule("broker", "egress", Rule(
        tuple(Peer(_host_network(a)) for a in addresses), (PortSpec("TCP", up.port),)),
        f"the uplink broker {up.host}:{up.port}{resolved}"))
    return out


def failsafe_rules(agent: AgentFile, file: str, report: Report) -> tuple[FailsafeRule, ...]:
    """The failsafe set of ``agent`` (its ``file`` named in warnings): the built-in
    items, then ``ssh``, ``extra`` and ``ingress`` of ``policy.failsafe``. Reads
    resolv.conf and may resolve ``uplink.host`` (a blocking ``getaddrinfo``): call it
    only when some policy needs it."""
    fs = agent.policy.failsafe
    out = _built_in(agent, file, report)
    if fs.ssh:
        out.append(FailsafeRule("ssh", "ingress", Rule(None, (PortSpec("TCP", 22),)),
                                "policy.failsafe.ssh"))
    out += [FailsafeRule(f"extra[{i}]", "egress", egress_rule(r),
                         f"policy.failsafe.extra[{i}]") for i, r in enumerate(fs.extra)]
    out += [FailsafeRule(f"ingress[{i}]", "ingress", ingress_rule(r),
                         f"policy.failsafe.ingress[{i}]") for i, r in enumerate(fs.ingress)]
    return tuple(out)


def policy_settings(agent: AgentFile, file: str, policies: tuple[NetworkPolicy, ...],
                    report: Report) -> PolicySettings:
    """The plain settings of ``agent`` (the agent file ``file``, maybe with a bundle's
    sections) with ``policies``: its ``policy.mode``, and the failsafe set resolved when
    there is a policy (none otherwise: nothing is policed)."""
    failsafe = failsafe_rules(agent, file, report) if policies else ()
    return PolicySettings(agent.policy.mode, policies, failsafe, str(agent.policy.pin_dir),
                          agent.policy.backend)
