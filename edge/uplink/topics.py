"""MQTT topic names of the uplink contract (DESIGN.md §5)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Topics:
    """Topics under one node's prefix, e.g. ``edge/v1/gw-01``.

    ``prefix`` may contain ``{node}``, which is replaced by the node name.
    """

    prefix: str

    @classmethod
    def for_node(cls, template: str, node: str) -> Topics:
        """Expand ``{node}`` in ``template`` and strip trailing slashes."""
        return cls(template.replace("{node}", node).rstrip("/"))

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

    def twins(self, namespace: str, device: str) -> str:
        """Retained KubeEdge-shaped twins of one device."""
        return f"{self.prefix}/twins/{namespace}/{device}"

    @property
    def telemetry_filter(self) -> str:
        """Subscription filter matching every device's telemetry."""
        return f"{self.prefix}/telemetry/#"
