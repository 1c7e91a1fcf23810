"""MQTT topic names of the uplink contract (DESIGN.md §5)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

COMMANDS: Final = ("rollback", "write", "method")
"""The signed commands an agent takes, each on ``…/cmd/{name}`` (fields:
:data:`edge.sync.bundle.COMMAND_FIELDS`)."""
MAX_COMMAND_BYTES: Final = 64 << 10
"""Largest signed command taken (a JWS in compact form)."""


@dataclass(frozen=True, slots=True)
class Topics:
    """Topics under one node's prefix, e.g. ``edge/v1/gw-01`` (``{node}`` already filled in)."""

    prefix: str

    @property
    def state(self) -> str:
        """Retained agent state; its ``offline`` payload is the LWT."""
        return f"{self.prefix}/state"

    @property
    def events(self) -> str:
        """Events: device online/offline, config applied, drops."""
        return f"{self.prefix}/events"

    def telemetry(self, namespace: str, device: str) -> str:
        """Readings of one device."""
        return f"{self.prefix}/telemetry/{namespace}/{device}"

    @property
    def desired(self) -> str:
        """The retained, signed desired bundle from the control plane (DESIGN.md §6)."""
        return f"{self.prefix}/desired"

    def command(self, name: str) -> str:
        """A command to the agent (its reply: this + ``/reply``)."""
        return f"{self.prefix}/cmd/{name}"

    def twin(self, namespace: str, device: str) -> str:
        """The retained twin of one device (reported / observedDesired)."""
        return f"{self.prefix}/twins/{namespace}/{device}"
