"""The reading: one poll of one device (DESIGN.md §2)."""

from __future__ import annotations

from dataclasses import dataclass, field

from edge.config.model import Value
from edge.uplink.payload import json_bytes


@dataclass(slots=True)
class Reading:
    """``{device, ts, seq, values{property: value}, quality{property: "bad"}}``.

    ``ts_ms`` is milliseconds since the Unix epoch (UTC) when the values were read;
    ``seq`` counts readings per device. A property whose read failed is absent from
    ``values`` and listed in ``quality`` as ``"bad"``. ``values`` must not change once
    :meth:`values_json` was called (the poller never changes a reading it handed on).
    """

    namespace: str
    device: str
    ts_ms: int
    seq: int
    values: dict[str, Value]
    quality: dict[str, str] = field(default_factory=dict)
    _values_json: bytes | None = field(default=None, init=False, repr=False, compare=False)

    def values_json(self) -> bytes:
        """``values`` as compact JSON, made once: the telemetry payload and a plugin's
        batch (:func:`edge.wasm.host.encode`) share it."""
        if self._values_json is None:
            self._values_json = json_bytes(self.values)
        return self._values_json

    def payload_json(self) -> bytes:
        """:meth:`to_payload` as compact UTF-8 JSON."""
        quality = b',"quality":' + json_bytes(self.quality) if self.quality else b""
        return b'{"device":%b,"ts":%d,"seq":%d,"values":%b%b}' % (
            json_bytes(self.device), self.ts_ms, self.seq, self.values_json(), quality)

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
