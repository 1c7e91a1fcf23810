"""The reading: one poll of one device (DESIGN.md §2)."""

from __future__ import annotations

from dataclasses import dataclass, field

from edge.config.model import Value


@dataclass(slots=True)
class Reading:
    """``{device, ts, seq, values{property: value}, quality{property: "bad"}}``.

    ``ts_ms`` is milliseconds since the Unix epoch (UTC) when the values were read;
    ``seq`` counts readings per device. A property whose read failed is absent from
    ``values`` and listed in ``quality`` as ``"bad"``.
    """

    namespace: str
    device: str
    ts_ms: int
    seq: int
    values: dict[str, Value]
    quality: dict[str, str] = field(default_factory=dict)

    def to_payload(self) -> dict[str, object]:
        """The JSON object published on ``…/telemetry/{namespace}/{device}``."""
        payload: dict[str, object] = {
            "device": self.device,
            "ts": self.ts_ms,
            "seq": self.seq,
            "values": self.values,
        }
        if self.quality:
            payload["quality"] = self.quality
        return payload
