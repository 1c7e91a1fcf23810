"""Network policy documents and the agent file's ``policy`` section (pydantic; the
validating child only), turned into :class:`~edge.policy.spec.PolicySettings`.

A document (README, "Network policy (model)"), Cilium's model scaled down::

    apiVersion: gateway.edge/v1alpha1
    kind: NetworkPolicy
    metadata: {name: agent}                   # a DNS label, unique among the policies
    spec:
      workload: {systemdUnit: edge.service}   # or {cgroup: system.slice/edge.service}
      mode: enforce                           # optional; default: policy.mode
      egress: [{to: [{cidr: 10.0.0.0/8, except: [10.9.0.0/16]}],
                ports: [{port: 502, protocol: TCP}]}]
      egressDeny: []                          # same shape; a deny beats any allow
      ingress: [{from: [...], ports: [...]}]
      ingressDeny: []

Policies come from the agent file's ``policy.policies`` or, with a desired bundle, from
the bundle's ``policies`` (which replace the file's). ``policy.failsafe`` adds to the
built-in failsafe set (:mod:`edge.config.failsafe`) and is the agent file's only.
"""

from __future__ import annotations

import re
from ipaddress import ip_network
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BeforeValidator,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from edge.config.section import ConfigPath, _error, _Section
from edge.config.sources import Report, Where
from edge.policy.spec import (
    PIN_DIR,
    Network,
    NetworkPolicy,
    Peer,
    PortSpec,
    Rule,
    unit_cgroup,
)
from edge.policy.tables import MAX_LEVEL

API_VERSION = "gateway.edge/v1alpha1"
KIND = "NetworkPolicy"
_DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")
_UNIT = r"^[A-Za-z0-9:_.\\@-]+\.(service|scope)$"


def _network(value: object) -> Network:
    if not isinstance(value, str):
        raise _error(f"must be a CIDR as a string, such as 10.0.0.0/8 or fd00::/8 (got "
                     f"{value!r})")
    try:
        return ip_network(value, strict=False)
    except ValueError:
        raise _error(f"{value!r} is not an IPv4 or IPv6 network; write a CIDR such as "
                     "10.0.0.0/8 or fd00::/8 (an address alone is a /32 or /128)") from None


def _no_host_bits(value: object) -> object:
    """``10.0.0.5/8`` is refused: which was meant, the address or the network?"""
    if isinstance(value, str):
        try:
            ip_network(value, strict=True)
        except ValueError as e:
            if "host bits set" in str(e):
                raise _error(f"{value!r} has host bits set: the network is "
                             f"{ip_network(value, strict=False)} (or write the address "
                             "alone for just that address)") from None
    return value


Cidr = Annotated[Network, BeforeValidator(_network), BeforeValidator(_no_host_bits)]
"""An IPv4 or IPv6 network in CIDR notation, without host bits; an address alone is
its /32 or /128."""


def _upper(value: object) -> object:
    return value.upper() if isinstance(value, str) else value


class PeerDoc(_Section):
    """One ``to``/``from`` entry: ``cidr`` and holes in it (``except``)."""

    cidr: Cidr
    except_: list[Cidr] = Field(default_factory=list, alias="except")

    @field_validator("except_")
    @classmethod
    def _holes_inside(cls, holes: list[Network], info: ValidationInfo) -> list[Network]:
        cidr: Network | None = info.data.get("cidr")
        if cidr is None:  # reported already
            return holes
        for hole in holes:
            if hole.version != cidr.version:
                raise _error(f"{hole} is IPv{hole.version} and its cidr {cidr} "
                             f"IPv{cidr.version}: an except must lie inside its cidr")
            if not hole.subnet_of(cidr):  # type: ignore[arg-type]  # same version
                raise _error(f"{hole} is not inside its cidr {cidr}: an except must lie "
                             "inside its cidr")
            if hole == cidr:
                raise _error(f"{hole} is the whole cidr: the entry would match no address")
        return holes


Port = Annotated[int, Field(ge=1, le=65535, strict=True)]


class PortDoc(_Section):
    """One ``ports`` entry: ``protocol`` (TCP, UDP or ICMP, any case), and for TCP and
    UDP optionally ``port`` (and ``endPort`` ≥ ``port``, a range); without ``port``
    every port of the protocol."""

    protocol: Annotated[Literal["TCP", "UDP", "ICMP"], BeforeValidator(_upper)]
    port: Port | None = None
    end_port: Port | None = Field(default=None, alias="endPort")

    @model_validator(mode="after")
    def _ports_fit(self) -> PortDoc:
        if self.protocol == "ICMP" and (self.port is not None or self.end_port is not None):
            raise _error("ICMP has no ports: leave out port and endPort (ICMP is ICMPv6 "
                         "for IPv6 addresses)")
        if self.end_port is not None and self.port is None:
            raise _error("endPort needs port: the range is port to endPort")
        if self.end_port is not None and self.port is not None and self.end_port < self.port:
            raise _error(f"endPort {self.end_port} is lower than port {self.port}: the "
                         "range is port to endPort")
        return self


def _not_empty(what: str) -> AfterValidator:
    def check(value: list[Any] | None) -> list[Any] | None:
        if value is not None and not value:
            raise _error(f"is empty; leave it out for {what}")
        return value
    return AfterValidator(check)


Ports = Annotated[list[PortDoc] | None, _not_empty("all ports and protocols")]


class EgressRuleDoc(_Section):
    """An ``egress``/``egressDeny`` rule: ``to`` (omitted: any address) × ``ports``
    (omitted: all ports and protocols)."""

    to: Annotated[list[PeerDoc] | None, _not_empty("any address")] = None
    ports: Ports = None


class IngressRuleDoc(_Section):
    """An ``ingress``/``ingressDeny`` rule: ``from`` (omitted: any address) × ``ports``
    (the workload's own; omitted: all ports and protocols)."""

    from_: Annotated[list[PeerDoc] | None, _not_empty("any address")] = Field(
        default=None, alias="from")
    ports: Ports = None


def _cgroup_path(value: str) -> str:
    path = value.strip("/")
    parts = path.split("/")
    if not path or any(p in ("", ".", "..") for p in parts):
        raise _error(f"{value!r} is not a cgroup path: give the path under the cgroup v2 "
                     "root, e.g. system.slice/edge.service (no empty, . or .. parts)")
    if any(ord(c) < 32 for c in path):
        raise _error("must not hold control characters")
    if path.startswith("sys/fs/cgroup/"):
        under = path.removeprefix("sys/fs/cgroup/").removeprefix("unified/")
        raise _error(f"{value!r} is a file system path: give the path under the cgroup v2 "
                     f"root, here {under!r}")
    if len(parts) > MAX_LEVEL:
        raise _error(f"{value!r} is {len(parts)} cgroups deep: the datapath selects "
                     f"workloads at most {MAX_LEVEL} levels below the cgroup v2 root")
    return path


class WorkloadDoc(_Section):
    """``spec.workload``: exactly one of ``systemdUnit`` (a system unit, in
    ``system.slice``) and ``cgroup`` (a path under the cgroup v2 root)."""

    systemd_unit: Annotated[str, Field(pattern=_UNIT)] | None = Field(
        default=None, alias="systemdUnit")
    cgroup: Annotated[str, AfterValidator(_cgroup_path)] | None = None

    @model_validator(mode="after")
    def _one(self) -> WorkloadDoc:
        if (self.systemd_unit is None) == (self.cgroup is None):
            raise _error("give exactly one of systemdUnit (e.g. edge.service) and cgroup "
                         "(e.g. system.slice/edge.service)")
        return self

    @property
    def path(self) -> str:
        """The cgroup path it selects (:func:`~edge.policy.spec.unit_cgroup`)."""
        return self.cgroup if self.cgroup is not None else unit_cgroup(str(self.systemd_unit))


class SpecDoc(_Section):
    """``spec``: the workload, an optional mode, and the four rule lists."""

    workload: WorkloadDoc
    mode: Literal["audit", "enforce"] | None = None
    egress: list[EgressRuleDoc] = Field(default_factory=list)
    egress_deny: list[EgressRuleDoc] = Field(default_factory=list, alias="egressDeny")
    ingress: list[IngressRuleDoc] = Field(default_factory=list)
    ingress_deny: list[IngressRuleDoc] = Field(default_factory=list, alias="ingressDeny")


def _dns_label(value: str) -> str:
    if not _DNS_LABEL.fullmatch(value):
        raise _error(f"{value!r} is not a DNS label (RFC 1123): at most 63 lowercase "
                     "letters, digits and '-', starting and ending with a letter or digit")
    return value


class MetadataDoc(_Section):
    """``metadata``: the policy's ``name``, a DNS label (RFC 1123)."""

    name: Annotated[str, AfterValidator(_dns_label)]


class NetworkPolicyDoc(_Section):
    """One ``gateway.edge/v1alpha1`` ``NetworkPolicy`` document."""

    api_version: Literal["gateway.edge/v1alpha1"] = Field(alias="apiVersion")
    kind: Literal["NetworkPolicy"]
    metadata: MetadataDoc
    spec: SpecDoc


def _unique_names(policies: list[NetworkPolicyDoc]) -> list[NetworkPolicyDoc]:
    seen: dict[str, int] = {}
    for i, p in enumerate(policies):
        name = p.metadata.name
        if name in seen:
            raise _error(f"NetworkPolicy {name!r} is defined twice, policies[{seen[name]}] "
                         f"and policies[{i}]: names must be unique")
        seen[name] = i
    return policies


def _no_switch_off(value: bool) -> bool:
    if not value:
        raise _error("cannot be switched off: the built-in failsafe items are always "
                     "allowed, so that a bad policy cannot cut the gateway off (failsafe "
                     "items can only be added)")
    return value


BuiltIn = Annotated[bool, AfterValidator(_no_switch_off)]


class FailsafeConfig(_Section):
    """``policy.failsafe``: what is allowed besides the built-in items (loopback, DNS to
    the resolvers of ``resolv_conf``, DHCP, the uplink broker), which are always on
    (``true`` is accepted, ``false`` refused): ``extra`` egress rules, ``ingress`` rules,
    ``ssh`` (ingress TCP 22 from any address). The agent file's only."""

    loopback: BuiltIn = True
    dns: BuiltIn = True
    dhcp: BuiltIn = True
    broker: BuiltIn = True
    ssh: bool = False
    extra: list[EgressRuleDoc] = Field(default_factory=list)
    ingress: list[IngressRuleDoc] = Field(default_factory=list)
    resolv_conf: ConfigPath = Path("/etc/resolv.conf")


class PolicyConfig(_Section):
    """``policy``: the mode of policies that name none (``audit`` reports what would be
    dropped, ``enforce`` drops it), the policies, additions to the failsafe set,
    ``pin_dir``, where the datapath is pinned (in a bpf file system), and ``backend``:
    ``libbpf`` loads the prebuilt object (about 40 ms, under 2 MB in the agent), ``bcc``
    compiles the C source at run time in a process of its own (about 1.5 s and 130 MB
    there; needs Debian's python3-bpfcc and the kernel's headers). The last two are the
    agent file's only."""

    mode: Literal["audit", "enforce"] = "audit"
    policies: Annotated[list[NetworkPolicyDoc], AfterValidator(_unique_names)] = Field(
        default_factory=list)
    failsafe: FailsafeConfig = FailsafeConfig()
    pin_dir: ConfigPath = Path(PIN_DIR)
    backend: Literal["libbpf", "bcc"] = "libbpf"


def _peers(docs: list[PeerDoc] | None) -> tuple[Peer, ...] | None:
    if docs is None:
        return None
    return tuple(Peer(d.cidr, tuple(d.except_)) for d in docs)


def _ports(docs: list[PortDoc] | None) -> tuple[PortSpec, ...] | None:
    if docs is None:
        return None
    return tuple(PortSpec(d.protocol, d.port, d.end_port) for d in docs)


def egress_rule(doc: EgressRuleDoc) -> Rule:
    """The plain rule of an egress rule document."""
    return Rule(_peers(doc.to), _ports(doc.ports))


def ingress_rule(doc: IngressRuleDoc) -> Rule:
    """The plain rule of an ingress rule document."""
    return Rule(_peers(doc.from_), _ports(doc.ports))


def network_policy(doc: NetworkPolicyDoc, source: str) -> NetworkPolicy:
    """The plain policy of a validated document declared at ``source``."""
    s = doc.spec
    return NetworkPolicy(
        name=doc.metadata.name, workload=s.workload.path, mode=s.mode,
        egress=tuple(map(egress_rule, s.egress)),
        egress_deny=tuple(map(egress_rule, s.egress_deny)),
        ingress=tuple(map(ingress_rule, s.ingress)),
        ingress_deny=tuple(map(ingress_rule, s.ingress_deny)),
        source=source,
    )


def agent_file_policies(policy: PolicyConfig, file: str) -> tuple[NetworkPolicy, ...]:
    """The agent file's ``policy.policies``, already validated with it."""
    return tuple(network_policy(d, f"{file} policy.policies[{i}]")
                 for i, d in enumerate(policy.policies))


def bundle_policies(entries: object, label: str, report: Report) -> tuple[NetworkPolicy, ...]:
    """The policies of a bundle's ``policies`` list, each reported against ``label
    policies`` and its 1-based index; problems (also a name given twice) go to
    ``report``."""
    if not entries:
        return ()
    if not isinstance(entries, list):
        report.error(Where(label), "policies", "must be a list of NetworkPolicy documents")
        return ()
    out: list[NetworkPolicy] = []
    seen: dict[str, int] = {}
    for i, entry in enumerate(entries, start=1):
        where = Where(f"{label} policies", i)
        if not isinstance(entry, dict):
            report.error(where, "", f"must be a mapping (a {KIND} document)")
            continue
        try:
            doc = NetworkPolicyDoc.model_validate(entry)
        except ValidationError as e:
            report.validation_error(e, where, "", model=NetworkPolicyDoc)
            continue
        name = doc.metadata.name
        if name in seen:
            report.error(where, "metadata.name", f"duplicate {KIND} {name!r}: already "
                         f"defined in document {seen[name]}")
            continue
        seen[name] = i
        out.append(network_policy(doc, f"{where.file} #{i}"))
    return tuple(out)


__all__ = ["API_VERSION", "KIND", "FailsafeConfig", "NetworkPolicyDoc", "PolicyConfig",
           "agent_file_policies", "bundle_policies", "egress_rule", "ingress_rule",
           "network_policy"]
