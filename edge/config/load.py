"""Load the agent file and the KubeEdge manifests it names, checking everything first.

Both entry points collect every problem of every input (agent file, each manifest
file, each document) and raise :class:`~edge.config.errors.ConfigError` if any is an
error, so that an invalid input applies nothing (DESIGN.md §3).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edge.config.agent import AgentFile, parse_agent
from edge.config.errors import ConfigError, Problem
from edge.config.failsafe import policy_settings
from edge.config.kubeedge import Manifests, read_manifests, resolve_documents
from edge.config.kubeedge_docs import GROUP
from edge.config.model import DeviceSpec
from edge.config.plugins import load_bundle_plugins, load_plugin_dir
from edge.config.policy import agent_file_policies, bundle_policies
from edge.config.sources import (
    MANIFEST_SUFFIXES,
    Document,
    Report,
    Where,
    or_list,
    read_yaml_file,
)
from edge.policy.evaluator import rules
from edge.policy.spec import PolicySettings
from edge.policy.tables import MAX_RULES, TooManyRules
from edge.profiles.profile import with_local
from edge.wasm.spec import PluginSpec

LOCAL_ONLY = ("node", "devices", "profiles", "trust")
"""Agent-file keys a bundle's ``agent`` may not set: the gateway's identity, where its
local manifests and profiles are, and whom it trusts stay with whoever installed it."""
LOCAL_ONLY_STORE = ("path",)
LOCAL_ONLY_POLICY = ("failsafe", "pin_dir", "backend")
"""What a bundle cannot loosen or remove: the failsafe set that keeps the gateway
reachable whatever a pushed policy says."""
NOT_SUPPORTED_YET: tuple[str, ...] = ()


@dataclass(frozen=True)
class LoadedConfig:
    """A valid agent file, its devices, the warnings found, the manifest files read,
    its plugins in the order they run, and its network policy."""

    agent: AgentFile
    devices: tuple[DeviceSpec, ...]
    warnings: tuple[Problem, ...]
    files: tuple[str, ...]
    plugins: tuple[PluginSpec, ...] = ()
    policy: PolicySettings = field(default_factory=PolicySettings)


def _manifest_hint(data: object, base_dir: Path) -> tuple[list[Path], str | None]:
    """``devices`` and ``node`` read loosely from an invalid agent file, so that the
    manifests' problems are reported together with the agent file's. A path that is
    missing, or neither a regular file nor a directory, is left out: the agent file's
    validation reports it."""
    if not isinstance(data, dict):
        return [], None
    devices = data.get("devices")
    listed = [devices] if isinstance(devices, str) else devices
    written = [p for p in listed if isinstance(p, str)] if isinstance(listed, list) else []
    paths = [base_dir / Path(p).expanduser() for p in written]
    node = data.get("node")
    return [p for p in paths if p.is_file() or p.is_dir()], node if isinstance(node, str) else None


def _why_no_device(agent: AgentFile, manifests: Manifests) -> str:
    """Why ``manifests`` give no device to poll, and what to change."""
    if not agent.devices:
        reason = "devices lists no manifest file or directory"
    elif not manifests.files:
        suffixes = ", ".join("*" + s for s in MANIFEST_SUFFIXES)
        reason = f"no manifest file ({suffixes}) was found under devices"
    elif not manifests.found:
        reason = f"the {len(manifests.files)} manifest file(s) hold no {GROUP} Device"
        if manifests.ignored:
            reason += (
                f"; {manifests.ignored} object(s) of other API groups or versions were ignored"
            )
    else:
        reasons = [
            f"{count} Device(s) skipped for spec.nodeName {name!r} ≠ node {agent.node!r}"
            for name, count in Counter(manifests.other_nodes).items()
        ]
        reasons += [
            f"{count} Device(s) skipped for protocol {name!r}"
            if name
            else f"{count} Device(s) skipped for naming no protocol"
            for name, count in Counter(manifests.other_protocols).items()
        ]
        reason = "; ".join(reasons)
        if manifests.other_nodes:
            names = or_list(sorted(set(manifests.other_nodes)))
            reason += (
                f" (to poll them, set node: {names} in this file, or change the Devices' "
                f"spec.nodeName to {agent.node})"
            )
    return f"no device will be polled: {reason}"


def _fits_datapath(policy: PolicySettings, where: Where, field: str, report: Report) -> None:
    """An error at ``field`` when ``policy`` compiles to more rules than the datapath's
    bitmaps have bits (:data:`~edge.policy.tables.MAX_RULES`)."""
    flat = rules(policy)
    if len(flat) > MAX_RULES:
        failsafe = sum(r.section == "failsafe" for r in flat)
        report.error(where, field, f"{TooManyRules(len(flat))}: every ports entry of a rule "
                     f"is a rule of its own, and {failsafe} are failsafe rules and "
                     f"{2 * len(policy.policies)} default denies (2 per policy); merge rules "
                     "or ports entries (a port range is one entry)")


def load_config(path: str | Path) -> LoadedConfig:
    """Load the agent file at ``path`` and every manifest under its ``devices``.

    Relative paths in the agent file are resolved against its directory; a Device
    bound to another node (``spec.nodeName``) is skipped with a warning. When no
    device is left to poll, a warning at ``devices`` says why (not an error: a
    gateway may receive its devices later).

    Raises:
        ConfigError: with every problem (agent file and manifests; warnings included)
            when any is an error, including a missing or unreadable file.
    """
    path = Path(path)
    report = Report()
    readable, data = read_yaml_file(path, report)
    if isinstance(data, Mapping) and "release" in data:
        report.error(Where(str(path)), "release", "is set by a desired bundle only (agent."
                     "release): the control plane pushes agent releases")
    agent = (
        parse_agent(data, file=str(path), base_dir=path.parent, report=report) if readable else None
    )
    node: str | None
    if agent is not None:
        paths, node = list(agent.devices), agent.node
    else:
        paths, node = _manifest_hint(data, path.parent)
    profiles = with_local(agent.profiles, report) if agent is not None else None
    manifests = read_manifests(paths, node=node, report=report, profiles=profiles)
    plugins = load_plugin_dir(agent, path, report) if agent is not None else ()
    if agent is None or report.has_errors:
        raise ConfigError(report.problems)
    if not manifests.devices:
        report.warning(Where(str(path)), "devices", _why_no_device(agent, manifests))
    policy = policy_settings(agent, str(path), agent_file_policies(agent.policy, str(path)),
                             report)
    _fits_datapath(policy, Where(str(path)), "policy.policies", report)
    report.raise_if_errors()
    return LoadedConfig(agent, manifests.devices, report.warnings, manifests.files, plugins,
                        policy)


def load_manifests(
    paths: Sequence[str | Path], *, node: str | None = None,
    profile_dirs: Sequence[Path] = (),
) -> tuple[tuple[DeviceSpec, ...], tuple[Problem, ...]]:
    """Load KubeEdge manifest files and directories; returns ``(devices, warnings)``.

    ``node`` (this gateway's name) skips Devices bound to other nodes; None keeps all.
    ``profile_dirs`` hold firmware profiles besides the shipped ones.

    Raises:
        ConfigError: with every problem (warnings included) when any is an error.
    """
    report = Report()
    manifests = read_manifests([Path(p) for p in paths], node=node, report=report,
                               profiles=with_local(profile_dirs, report))
    report.raise_if_errors()
    return manifests.devices, report.warnings


def _merge(base: Mapping[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    """``base`` with ``over`` laid on top, mappings merged key by key."""
    out = dict(base)
    for k, v in over.items():
        b = out.get(k)
        out[k] = _merge(b, v) if isinstance(b, Mapping) and isinstance(v, Mapping) else v
    return out


def _bundle_overrides(agent: object, where: Where, report: Report) -> Mapping[str, Any]:
    if not isinstance(agent, Mapping):
        report.error(where, "agent", "must be a mapping of agent-file sections")
        return {}
    for key in LOCAL_ONLY:
        if key in agent:
            report.error(where, f"agent.{key}", "is set by the gateway's own agent file only; "
                         "a bundle cannot change it")
    store = agent.get("store")
    for key in LOCAL_ONLY_STORE:
        if isinstance(store, Mapping) and key in store:
            report.error(where, f"agent.store.{key}", "is set by the gateway's own agent file "
                         "only; a bundle cannot change it")
    policy = agent.get("policy")
    for key in LOCAL_ONLY_POLICY:
        if isinstance(policy, Mapping) and key in policy:
            report.error(where, f"agent.policy.{key}", "is set by the gateway's own agent "
                         "file only; a bundle cannot change it (it can only add policies)")
    if isinstance(policy, Mapping) and "policies" in policy:
        report.error(where, "agent.policy.policies", "a bundle carries its network policies "
                     "in its own policies list, which replaces the agent file's")
    return {k: v for k, v in agent.items() if k not in LOCAL_ONLY}


def load_agent_file(path: str | Path) -> AgentFile:
    """The agent file alone (no manifests), e.g. for its ``trust.keys``.

    Raises:
        ConfigError: every problem of the file.
    """
    path = Path(path)
    report = Report()
    readable, data = read_yaml_file(path, report)
    agent = parse_agent(data, file=str(path), base_dir=path.parent, report=report) if readable \
        else None
    if agent is None or report.has_errors:
        raise ConfigError(report.problems)
    return agent


def load_bundle_config(path: str | Path, bundle: Mapping[str, Any]) -> LoadedConfig:
    """The agent file at ``path`` with a verified bundle's content applied: its
    ``agent`` sections override the file's (except :data:`LOCAL_ONLY`,
    ``store.path``, ``policy.failsafe``), its ``devices``/``deviceModels`` replace the
    manifests the file names, its ``policies`` the file's ``policy.policies``. Checked
    exactly like :func:`load_config`; problems of the
    bundle are reported against ``bundle version N`` (and ``… devices`` / ``…
    deviceModels`` / ``… policies`` with the object's 1-based index as the document).

    Raises:
        ConfigError: with every problem when any is an error.
    """
    path = Path(path)
    label = f"bundle version {bundle.get('version')}"
    report = Report()
    readable, data = read_yaml_file(path, report)
    overrides = _bundle_overrides(bundle.get("agent", {}), Where(label), report)
    for name in NOT_SUPPORTED_YET:
        if bundle.get(name):
            report.error(Where(label), name, "this agent version does not support "
                         f"{name} yet; a bundle with {name} is not applied")
    merged = _merge(data, overrides) if isinstance(data, Mapping) else data
    agent = (
        parse_agent(merged, file=f"{path} + {label} agent", base_dir=path.parent, report=report)
        if readable else None
    )
    documents = [
        Document(f"{label} {name}", i, obj)
        for name in ("deviceModels", "devices")
        for i, obj in enumerate(bundle.get(name) or [], start=1)
    ]
    profiles = with_local(agent.profiles, report) if agent is not None else None
    manifests = resolve_documents(documents, node=agent.node if agent else None, report=report,
                                  profiles=profiles)
    plugins = load_bundle_plugins(bundle.get("plugins"), agent, label, report) if agent else ()
    policies = bundle_policies(bundle.get("policies"), label, report)
    if agent is None or report.has_errors:
        raise ConfigError(report.problems)
    if not manifests.devices:
        report.warning(Where(label), "devices", "no device will be polled: " + (
            f"of the bundle's {manifests.found} Device(s) none can be polled here (see the "
            "warnings)" if manifests.found else "the bundle holds no Device"))
    if agent.policy.policies and not policies:
        report.warning(Where(label), "policies", f"the agent file's {len(agent.policy.policies)} "
                       "network policy(ies) (policy.policies) do not apply: a bundle's policies "
                       "replace them, and this one holds none")
    policy = policy_settings(agent, str(path), policies, report)
    _fits_datapath(policy, Where(label), "policies", report)
    report.raise_if_errors()
    return LoadedConfig(agent, manifests.devices, report.warnings, manifests.files, plugins,
                        policy)
