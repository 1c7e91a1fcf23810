"""Load the agent file and the KubeEdge manifests it names, checking everything first.

Both entry points collect every problem of every input (agent file, each manifest
file, each document) and raise :class:`~edge.config.errors.ConfigError` if any is an
error, so that an invalid input applies nothing (DESIGN.md §3).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from edge.config.agent import AgentFile, parse_agent
from edge.config.errors import ConfigError, Problem
from edge.config.kubeedge import read_manifests
from edge.config.model import DeviceSpec
from edge.config.sources import Report, read_yaml_file


@dataclass(frozen=True)
class LoadedConfig:
    """A valid agent file, its devices, the warnings found, and the manifest files read."""

    agent: AgentFile
    devices: tuple[DeviceSpec, ...]
    warnings: tuple[Problem, ...]
    files: tuple[str, ...]


def _manifest_hint(data: object, base_dir: Path) -> tuple[list[Path], str | None]:
    """``devices`` and ``node`` read loosely from an invalid agent file, so that the
    manifests' problems are reported together with the agent file's."""
    if not isinstance(data, dict):
        return [], None
    devices = data.get("devices")
    listed = [devices] if isinstance(devices, str) else devices
    paths = [base_dir / p for p in listed if isinstance(p, str)] if isinstance(listed, list) else []
    node = data.get("node")
    return paths, node if isinstance(node, str) else None


def load_config(path: str | Path) -> LoadedConfig:
    """Load the agent file at ``path`` and every manifest under its ``devices``.

    Relative paths in the agent file are resolved against its directory; a Device
    bound to another node (``spec.nodeName``) is skipped with a warning.

    Raises:
        ConfigError: with every problem (agent file and manifests; warnings included)
            when any is an error, including a missing or unreadable file.
    """
    path = Path(path)
    report = Report()
    readable, data = read_yaml_file(path, report)
    agent = (
        parse_agent(data, file=str(path), base_dir=path.parent, report=report) if readable else None
    )
    node: str | None
    if agent is not None:
        manifests, node = list(agent.devices), agent.node
    else:
        manifests, node = _manifest_hint(data, path.parent)
    devices, files = read_manifests(manifests, node=node, report=report)
    if agent is None or report.has_errors:
        raise ConfigError(report.problems)
    return LoadedConfig(agent, tuple(devices), report.warnings, tuple(files))


def load_manifests(
    paths: Sequence[str | Path], *, node: str | None = None
) -> tuple[tuple[DeviceSpec, ...], tuple[Problem, ...]]:
    """Load KubeEdge manifest files and directories; returns ``(devices, warnings)``.

    ``node`` (this gateway's name) skips Devices bound to other nodes; None keeps all.

    Raises:
        ConfigError: with every problem (warnings included) when any is an error.
    """
    report = Report()
    devices, _files = read_manifests([Path(p) for p in paths], node=node, report=report)
    report.raise_if_errors()
    return tuple(devices), report.warnings
