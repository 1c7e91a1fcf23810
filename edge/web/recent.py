"""What the web page shows of the data: each device's latest reading, and a short trend
of every numeric property.

Memory is fixed per property, whatever the poll rate: a trend keeps at most one point
per TREND_STEP_S seconds, the last TREND_POINTS of them (5 minutes), in two
``array('d')`` rings (16 bytes a point: 500 properties take 1.2 MB). Fed by
:attr:`edge.agent.Agent.reading_hooks` in the event loop.
"""

from __future__ import annotations

import math
from array import array
from dataclasses import dataclass, field
from typing import Any

from edge.reading import Reading

TREND_STEP_S = 2.0
TREND_POINTS = 150


@dataclass(slots=True)
class _Trend:
    """A ring of ``(ts_s, value)`` points, oldest overwritten first."""

    ts: array[float] = field(default_factory=lambda: array("d", [math.nan] * TREND_POINTS))
    values: array[float] = field(default_factory=lambda: array("d", [0.0] * TREND_POINTS))
    next: int = 0

    def add(self, ts_s: float, value: float) -> None:
        self.ts[self.next], self.values[self.next] = ts_s, value
        self.next = (self.next + 1) % TREND_POINTS

    def points(self, since_s: float) -> list[list[float]]:
        order = [*range(self.next, TREND_POINTS), *range(self.next)]
        return [[self.ts[i], self.values[i]] for i in order
                if not math.isnan(self.ts[i]) and self.ts[i] > since_s]


class Recent:
    """Latest readings and trends by device key ``namespace/name``."""

    def __init__(self) -> None:
        self._latest: dict[str, Reading] = {}
        self._trends: dict[str, dict[str, _Trend]] = {}
        self._trend_ts: dict[str, float] = {}

    def add(self, reading: Reading) -> None:
        """Take one reading (a hook of the agent, on the poll path: a dict store, and at
        most every TREND_STEP_S per device a ring write per numeric property)."""
        key = f"{reading.namespace}/{reading.device}"
        self._latest[key] = reading
        ts_s = reading.ts_ms / 1000
        if ts_s - self._trend_ts.get(key, -math.inf) < TREND_STEP_S:
            return
        self._trend_ts[key] = ts_s
        trends = self._trends.setdefault(key, {})
        for prop, value in reading.values.items():
            if isinstance(value, int | float):  # bool too: 0/1
                trend = trends.get(prop)
                if trend is None:
                    trend = trends[prop] = _Trend()
                trend.add(ts_s, float(value))

    def forget(self, keep: set[str]) -> None:
        """Drop what is kept of devices not in ``keep`` (after a new configuration)."""
        for key in [k for k in self._latest if k not in keep]:
            del self._latest[key]
        for key in [k for k in self._trends if k not in keep]:
            del self._trends[key]
            self._trend_ts.pop(key, None)

    def latest(self, key: str) -> dict[str, Any] | None:
        """The latest reading of ``key`` as published (``device, ts, seq, values,
        quality``), or None before the first."""
        reading = self._latest.get(key)
        return None if reading is None else reading.to_payload()

    def trend(self, key: str, since_s: float = 0.0) -> dict[str, list[list[float]]]:
        """Per numeric property, ``[[ts_s, value], …]`` oldest first, after ``since_s``
        (seconds since the epoch); booleans as 0/1."""
        return {prop: t.points(since_s) for prop, t in self._trends.get(key, {}).items()}
