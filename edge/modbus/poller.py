"""Polls one device: its planned requests once per collect cycle, decoded into readings.

A device has one task per distinct collect cycle. A cycle sends the cycle's read
requests one after another on the device's shared connection, decodes every property,
and hands one :class:`~edge.reading.Reading` to the sink. Failures stay local:

* an exception response, a garbled/short frame or an answer from the wrong unit id
  marks the properties of that request ``bad`` in this reading and counts an error;
* a timeout is retried ``options.retries`` times, then marks them ``bad``;
* a connection that is down (or waiting out its reconnect backoff) fails at once.

The device is ``online`` as soon as one request of a cycle is answered (an
exception response is an answer). It is ``offline`` at once when its connection
cannot be made, and after ``offline_after`` consecutive cycles without any answer
when requests time out; until then its readings carry every property as ``bad``.
No readings are produced while it is offline, and an offline device is only probed,
one cycle at a time with a delay doubling from 1 s to 60 s, so that a dead unit on a
shared gateway or serial bus costs the others almost nothing.

A device that answers ILLEGAL DATA ADDRESS to a request that reads unused addresses
to merge properties (gap fill) gets those properties read separately from then on.
Cycles run on absolute deadlines; a cycle that overruns skips the missed deadlines
(counted in ``stats.overruns``) instead of bursting to catch up.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from edge.config.model import DeviceSpec, Value
from edge.modbus.client import (
    Connection,
    ModbusConnectionError,
    ModbusError,
    ModbusExceptionError,
    ModbusFrameError,
    ModbusTimeoutError,
)
from edge.modbus.codec import CodecError, Decoder, decoder_for
from edge.modbus.planner import ReadRequest, plan_device, plan_requests
from edge.reading import Reading

log = logging.getLogger(__name__)

PROBE_INITIAL_S = 1.0
PROBE_MAX_S = 60.0

ReadingSink = Callable[[Reading], None]
StateSink = Callable[[str, str, str], None]
"""Called as ``(device_key, "online" | "offline", reason)`` on every state change."""


@dataclass(slots=True)
class DeviceStats:
    """Per-device counters since start; latency of the last cycle in ms."""

    state: str = "unknown"
    cycles: int = 0
    readings: int = 0
    requests: int = 0
    timeouts: int = 0
    exceptions: int = 0
    frame_errors: int = 0
    connection_errors: int = 0
    decode_errors: int = 0
    overruns: int = 0
    last_poll_ms: int = 0
    last_latency_ms: float = 0.0
    last_error: str = ""
    exception_codes: dict[int, int] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class _PlannedRequest:
    request: ReadRequest
    decoders: tuple[tuple[str, Decoder, int], ...]  # property name, decoder, index


def _planned(r: ReadRequest) -> _PlannedRequest:
    return _PlannedRequest(
        r,
        tuple((p.name, decoder_for(p.visitor), p.visitor.offset - r.address) for p in r.properties),
    )


class DevicePoller:
    """Runs every collect cycle of one device until cancelled."""

    def __init__(
        self,
        device: DeviceSpec,
        connection: Connection,
        sink: ReadingSink,
        on_state: StateSink,
        *,
        offline_after: int = 3,
        first_seq: int = 1,
    ) -> None:
        self.device = device
        self.stats = DeviceStats()
        self._conn = connection
        self._sink = sink
        self._on_state = on_state
        self._offline_after = offline_after
        self._unanswered = 0
        # (table, address, count) of requests failing now -> how (cheap to hash)
        self._failing: dict[tuple[str, int, int], type[ModbusError]] = {}
        self._seq = first_seq
        self._probe_delay = PROBE_INITIAL_S
        self._next_probe = 0.0
        self._groups = {
            cycle: tuple(_planned(r) for r in requests)
            for cycle, requests in plan_device(device).items()
        }

    @property
    def request_count(self) -> int:
        """Read requests per round of all cycles (what the planner produced)."""
        return sum(len(g) for g in self._groups.values())

    async def run(self) -> None:
        """Poll every cycle group concurrently, forever (cancel to stop)."""
        async with asyncio.TaskGroup() as tg:
            for cycle_ms in self._groups:
                tg.create_task(
                    self._cycle_loop(cycle_ms), name=f"poll[{self.device.key}@{cycle_ms}ms]"
                )

    async def _cycle_loop(self, cycle_ms: int) -> None:
        loop = asyncio.get_running_loop()
        period = cycle_ms / 1000.0
        deadline = loop.time()
        while True:
            if self.stats.state == "offline":
                # an offline device is only probed, with backoff, so that it costs a
                # shared bus or gateway nothing between probes
                await asyncio.sleep(max(0.0, self._next_probe - loop.time()))
                deadline = loop.time()
                if self.stats.state == "offline" and deadline < self._next_probe:
                    continue  # another cycle group probed meanwhile
            await self.poll_once(cycle_ms)
            deadline += period
            now = loop.time()
            if deadline < now:
                missed = int((now - deadline) // period) + 1
                self.stats.overruns += missed
                deadline += missed * period
            await asyncio.sleep(deadline - now)

    async def poll_once(self, cycle_ms: int | None = None) -> Reading | None:
        """Poll the group of ``cycle_ms`` (all groups when None); return the reading made."""
        requests = (
            self._groups[cycle_ms]
            if cycle_ms is not None
            else tuple(r for g in self._groups.values() for r in g)
        )
        started = time.perf_counter()
        values: dict[str, Value] = {}
        quality: dict[str, str] = {}
        answered = False
        unreachable = True
        for planned in requests:
            data = await self._read(planned.request)
            if isinstance(data, ModbusExceptionError) and data.exception_code == 2:
                self._split(planned.request)
            if isinstance(data, ModbusError):
                answered = answered or isinstance(data, ModbusExceptionError | ModbusFrameError)
                unreachable = unreachable and isinstance(data, ModbusConnectionError)
                for name, _dec, _i in planned.decoders:
                    quality[name] = "bad"
                continue
            answered = True
            for name, dec, index in planned.decoders:
                try:
                    values[name] = dec(data, index)
                except CodecError as e:
                    self.stats.decode_errors += 1
                    self.stats.last_error = f"{name}: {e}"
                    quality[name] = "bad"
        self.stats.cycles += 1
        self.stats.last_latency_ms = (time.perf_counter() - started) * 1000.0
        self.stats.last_poll_ms = time.time_ns() // 1_000_000
        if not self._account(answered, unreachable=unreachable and bool(requests)):
            return None
        reading = Reading(
            namespace=self.device.namespace,
            device=self.device.name,
            ts_ms=self.stats.last_poll_ms,
            seq=self._seq,
            values=values,
            quality=quality,
        )
        self._seq += 1
        self.stats.readings += 1
        self._sink(reading)
        return reading

    def _account(self, answered: bool, *, unreachable: bool) -> bool:
        """Update online/offline; True when a reading should be produced."""
        if answered:
            self._unanswered = 0
            self._probe_delay = PROBE_INITIAL_S
            if self.stats.state != "online":
                self.stats.state = "online"
                self._on_state(self.device.key, "online", "")
            return True
        self._unanswered = self._offline_after if unreachable else self._unanswered + 1
        if self._unanswered >= self._offline_after:
            if self.stats.state != "offline":
                self.stats.state = "offline"
                self._on_state(self.device.key, "offline", self.stats.last_error)
            else:
                self._probe_delay = min(self._probe_delay * 2, PROBE_MAX_S)
            self._next_probe = asyncio.get_running_loop().time() + self._probe_delay
        return self.stats.state != "offline"

    def _split(self, req: ReadRequest) -> None:
        """ILLEGAL DATA ADDRESS on a request that reads unused addresses to merge
        properties: read those properties without gap fill from now on."""
        covered = {a for p in req.properties for a in range(p.visitor.offset, p.visitor.end)}
        if len(covered) == req.count:
            return  # nothing but the properties' own addresses: a real error
        opts = self.device.options
        parts = plan_requests(req.properties, max_registers=opts.max_registers,
                              max_bits=opts.max_bits, max_gap=0)
        for cycle, group in self._groups.items():
            if any(g.request == req for g in group):
                self._groups[cycle] = tuple(
                    n for g in group
                    for n in ((_planned(r) for r in parts) if g.request == req else (g,))
                )
        log.warning(
            "%s: ILLEGAL DATA ADDRESS for %s %d+%d, which reads unused addresses to merge "
            "properties; reading them in %d requests without gap fill from now on "
            "(set maxGap: 0 to plan it so)",
            self.device.key, req.table, req.address, req.count, len(parts),
        )

    async def _read(self, req: ReadRequest) -> list[int] | list[bool] | ModbusError:
        """Send one request with retries on timeout; the data, or the final error."""
        opts = self.device.options
        attempts = opts.retries + 1
        key = (req.table.value, req.address, req.count)
        error: ModbusError = ModbusTimeoutError("not sent")
        for _ in range(attempts):
            self.stats.requests += 1
            try:
                data = await self._conn.read(
                    self.device.unit_id, req.table, req.address, req.count, timeout=opts.timeout_s
                )
            except ModbusTimeoutError as e:
                self.stats.timeouts += 1
                error = e
            except ModbusExceptionError as e:
                self.stats.exceptions += 1
                codes = self.stats.exception_codes
                codes[e.exception_code] = codes.get(e.exception_code, 0) + 1
                error = e
                break
            except ModbusFrameError as e:
                self.stats.frame_errors += 1
                error = e
                break
            except ModbusConnectionError as e:
                self.stats.connection_errors += 1
                error = e
                break
            else:
                if self._failing.pop(key, None) is not None:
                    log.info("%s: %s %d+%d answers again", self.device.key, req.table,
                             req.address, req.count)
                return data
        self.stats.last_error = f"{req.table} {req.address}+{req.count}: {error}"
        # say it once per kind of failure, not once per cycle
        level = logging.DEBUG if self._failing.get(key) is type(error) else logging.WARNING
        if not isinstance(error, ModbusConnectionError):  # the device state reports those
            log.log(level, "%s: %s", self.device.key, self.stats.last_error)
        self._failing[key] = type(error)
        return error
