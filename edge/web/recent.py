"""What the web page shows of the data: each device's latest value of every property,
and a short trend of every numeric property.

A device whose properties have different ``collectCycle`` values makes several
readings a cycle, each with the properties of one cycle (:mod:`edge.modbus.poller`).
The latest reading of each such group is kept (by reference: nothing is copied on the
poll path) and they are merged when asked for (:meth:`Recent.latest`), each property
with the time of its own read.

Memory is fixed per property, whatever the poll rate: a trend keeps at most one point
per TREND_STEP_MS, the last TREND_POINTS of them (5 minutes), in two rings, an
``array('q')`` of ms and an ``array('d')`` of values (16 bytes a point: 500 properties
take 1.2 MB). Fed by :attr:`edge.agent.Agent.reading_hooks` in the event loop.
"""

from __future__ import annotations

from array import array
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from typing import Any

from edge.reading import Reading

TREND_STEP_MS = 2000
TREND_SLACK_MS = 250
"""A point is due every TREND_STEP_MS, on a fixed schedule, and taken from the first
reading at most this much before it is due: readings every 1 s that come a few ms
early are not skipped (which would make gaps of 3 s), and faster ones give exactly one
point per TREND_STEP_MS on average."""
TREND_POINTS = 150
_NEVER = -(2**62)


def _due(due: int, ts_ms: int) -> int | None:
    """When the point after one taken at ``ts_ms`` is due, if a point is taken at all
    (None: not yet due). The schedule goes on from ``due`` (no drift), or starts again
    from ``ts_ms`` after a pause longer than a step (or when the clock went back)."""
    if ts_ms < due - TREND_SLACK_MS and ts_ms >= due - 2 * TREND_STEP_MS:
        return None
    if 0 <= ts_ms - due + TREND_SLACK_MS <= TREND_STEP_MS:
        return due + TREND_STEP_MS
    return ts_ms + TREND_STEP_MS


@dataclass(slots=True)
class _Trend:
    """A ring of ``(ts_ms, value)`` points, oldest overwritten first; ts 0: empty."""

    ts: array[int] = field(default_factory=lambda: array("q", bytes(8 * TREND_POINTS)))
    values: array[float] = field(default_factory=lambda: array("d", bytes(8 * TREND_POINTS)))
    next: int = 0
    due: int = _NEVER

    def add(self, ts_ms: int, value: float) -> None:
        """Add a point when one is due (:func:`_due`)."""
        due = _due(self.due, ts_ms)
        if due is None:
            return
        self.ts[self.next], self.values[self.next] = ts_ms, value
        self.next = (self.next + 1) % TREND_POINTS
        self.due = due

    def points(self, since_ms: int) -> list[list[float]]:
        order = [*range(self.next, TREND_POINTS), *range(self.next)]
        return [[self.ts[i], self.values[i]] for i in order
                if self.ts[i] and self.ts[i] > since_ms]


@dataclass(slots=True)
class _Device:
    """What is kept of one device: the latest reading of each group of properties
    (keyed by its first property; a reading with a bad first property makes a group
    of its own, which the merge puts in order by ``seq``), when each group's next trend
    points are due, and the trends."""

    groups: dict[str, Reading] = field(default_factory=dict)
    due: dict[str, int] = field(default_factory=dict)
    trends: dict[str, _Trend] = field(default_factory=dict)
    properties: frozenset[str] | None = None  # None: any (until forget() says)


class Recent:
    """Latest values and trends by device key ``namespace/name``."""

    def __init__(self) -> None:
        self._devices: dict[str, _Device] = {}

    def add(self, reading: Reading) -> None:
        """Take one reading (a hook of the agent, on the poll path: a dict store, and
        once every TREND_STEP_MS per group of properties a ring write per numeric
        property; one point per property per TREND_STEP_MS whatever the groups)."""
        key = f"{reading.namespace}/{reading.device}"
        device = self._devices.get(key)
        if device is None:
            device = self._devices[key] = _Device()
        values = reading.values
        group = next(iter(values), None) or next(iter(reading.quality), "")
        device.groups[group] = reading
        ts = reading.ts_ms
        due = _due(device.due.get(group, _NEVER), ts)
        if due is None:
            return
        device.due[group] = due
        trends = device.trends
        for prop, value in values.items():
            if isinstance(value, int | float):  # bool too: 0/1
                trend = trends.get(prop)
                if trend is None:
                    trend = trends[prop] = _Trend()
                trend.add(ts, float(value))

    def forget(self, keep: Collection[str] | Mapping[str, Collection[str]]) -> None:
        """Drop what is kept of devices not in ``keep`` (after a new configuration); when
        ``keep`` maps device keys to property names, also of properties not among them
        (a device whose definition changed)."""
        for key in [k for k in self._devices if k not in keep]:
            del self._devices[key]
        if not isinstance(keep, Mapping):
            return
        for key, device in self._devices.items():
            names = keep[key]
            if device.properties is names:  # the same configuration as last time
                continue
            device.properties = names if isinstance(names, frozenset) else frozenset(names)
            for prop in [p for p in device.trends if p not in device.properties]:
                del device.trends[prop]
            for group in [g for g in device.groups if g not in device.properties]:
                del device.groups[group]
                device.due.pop(group, None)

    def latest(self, key: str) -> dict[str, Any] | None:
        """The latest value of every property of ``key``, merged from its latest
        readings: ``{device, ts, seq, values, times, quality}`` (as published, with
        ``ts`` and ``seq`` of the newest reading, ``times`` the ms of each property's
        own read, and ``quality`` only when a property's latest read was bad), or None
        before the first reading."""
        device = self._devices.get(key)
        if device is None or not device.groups:
            return None
        readings = sorted(device.groups.values(), key=lambda r: r.seq)
        allowed = device.properties
        values: dict[str, Any] = {}
        times: dict[str, int] = {}
        quality: dict[str, str] = {}
        for r in readings:
            for prop, value in r.values.items():
                values[prop], times[prop] = value, r.ts_ms
                quality.pop(prop, None)
            for prop, q in r.quality.items():
                values.pop(prop, None)
                quality[prop], times[prop] = q, r.ts_ms
        if allowed is not None:
            values = {p: v for p, v in values.items() if p in allowed}
            times = {p: t for p, t in times.items() if p in allowed}
            quality = {p: q for p, q in quality.items() if p in allowed}
        newest = readings[-1]
        body: dict[str, Any] = {"device": newest.device, "ts": newest.ts_ms, "seq": newest.seq,
                                "values": values, "times": times}
        if quality:
            body["quality"] = quality
        return body

    def seq(self, key: str) -> int | None:
        """The ``seq`` of the newest reading of ``key`` (None before the first)."""
        device = self._devices.get(key)
        if device is None or not device.groups:
            return None
        return max(r.seq for r in device.groups.values())

    def trend(self, key: str, since_ms: int = 0) -> dict[str, list[list[float]]]:
        """Per numeric property, ``[[ts_ms, value], …]`` oldest first, after ``since_ms``
        (ms since the epoch); booleans as 0/1."""
        device = self._devices.get(key)
        if device is None:
            return {}
        allowed = device.properties
        return {prop: t.points(since_ms) for prop, t in device.trends.items()
                if allowed is None or prop in allowed}
