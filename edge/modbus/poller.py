"""Polls one device: its planned requests once per collect cycle, decoded into readings.

A device has one task per distinct collect cycle. A cycle sends the cycle's read
requests one after another on the device's shared connection, decodes every property,
and hands one :class:`~edge.reading.Reading` to the sink. Failures stay local and
never end the poller:

* an exception response, a garbled/short frame or an answer from the wrong unit id
  marks the properties of that request ``bad`` in this reading and counts an error
  by kind (:class:`DeviceStats`);
* a timeout is retried ``options.retries`` times, then marks them ``bad``;
* a connection that is down (or waiting out its reconnect backoff) fails at once.

Circuit breaker (:class:`CircuitBreaker`, state in ``stats.breaker``): a cycle
*fails* when no request got an answer (data or an exception response; a frame that
cannot be the answer is none). The breaker is ``closed`` while the device is polled
normally; it *opens* after ``breaker_failures`` consecutive failed cycles, at once
when every request of a cycle failed for want of a connection. While ``open`` no
readings are made and nothing is sent; when the probe time comes it is
``half_open``: one cycle (the probe) is in flight, alone. An answered probe closes it,
a failed one opens it again with the probe delay doubled (equal jitter, from
``probe_initial_s`` to ``probe_max_s``, like the client's reconnect backoff), so dead
devices on one bus neither cost it much nor probe in lockstep. The device is reported
``offline`` when the breaker opens and ``online`` at its first answer and whenever the
breaker closes.

A device that answers ILLEGAL DATA ADDRESS to a request that reads unused addresses
to merge properties (gap fill) gets those properties read separately from then on.
Cycles run on absolute deadlines; a cycle that overruns skips the missed deadlines
(counted in ``stats.overruns``) instead of bursting to catch up.
"""

from __future__ import annotations

import asyncio
import logging
import time
from bisect import bisect_left
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Final, Literal

from edge.config.model import DeviceSpec, Value
from edge.modbus.backoff import equal_jitter
from edge.modbus.client import (
    Connection,
    FrameErrorKind,
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

LATENCY_BOUNDS_S: Final = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
"""Upper bounds (seconds, inclusive like Prometheus ``le``) of the poll-cycle latency
buckets in :attr:`DeviceStats.latency_buckets`; one more bucket holds the rest (+Inf)."""

BreakerState = Literal["closed", "open", "half_open"]

ReadingSink = Callable[[Reading], None]
StateSink = Callable[[str, str, str], None]
"""Called as ``(device_key, "online" | "offline", reason)`` on every state change."""


@dataclass(slots=True)
class DeviceStats:
    """Per-device counters since start (never reset) and the device's current state.

    ``state``: ``unknown`` (nothing answered yet), ``online`` or ``offline``.
    ``requests`` counts attempts (retries included); each failed one is counted once
    by kind: ``timeouts``; ``exceptions`` (by code in ``exception_codes``);
    ``frame_errors``, split by :class:`~edge.modbus.errors.FrameErrorKind` into
    ``crc_errors``, ``short_frames``, ``garbled_frames``, ``wrong_unit`` and
    ``wrong_function``; ``connection_errors`` (connect refused/failed, reset, broken
    pipe, serial port gone, or the endpoint waiting out its reconnect backoff).
    An MBAP answer with a wrong transaction id answers nobody: it shows as a timeout.
    ``reconnects``: connections to the device's endpoint made after the first one,
    as this device saw them (every device on a shared connection counts them).
    ``decode_errors``: properties that could not be decoded. ``overruns``: cycle
    deadlines skipped because a cycle ran late.

    Breaker: ``breaker`` is ``closed | open | half_open``, ``breaker_opened`` how
    often it opened, ``consecutive_failures`` the failed cycles in a row now,
    ``next_probe_s`` when an open breaker lets the next probe through (the event
    loop's monotonic clock, seconds; 0.0 while closed).
    ``last_poll_ms`` is the wall-clock time of the last cycle (ms since the epoch),
    ``last_latency_ms`` its duration, ``last_error`` the last failure's message.

    ``readings``: readings made; ``points``: the good values in them (properties read
    and decoded). The duration of every cycle (those that made no reading too, see
    :meth:`count_cycle`): ``latency_sum_s`` their sum in seconds, ``latency_buckets``
    how many fell in each bucket, not cumulative: ``len(LATENCY_BOUNDS_S) + 1`` counts
    summing to ``cycles``, element ``i`` the durations ``d`` with
    ``LATENCY_BOUNDS_S[i-1] < d <= LATENCY_BOUNDS_S[i]`` (no lower bound for ``i = 0``),
    the last one those above ``LATENCY_BOUNDS_S[-1]``.
    """

    state: str = "unknown"
    cycles: int = 0
    readings: int = 0
    points: int = 0
    requests: int = 0
    timeouts: int = 0
    exceptions: int = 0
    frame_errors: int = 0
    crc_errors: int = 0
    short_frames: int = 0
    garbled_frames: int = 0
    wrong_unit: int = 0
    wrong_function: int = 0
    connection_errors: int = 0
    reconnects: int = 0
    decode_errors: int = 0
    overruns: int = 0
    breaker: BreakerState = "closed"
    breaker_opened: int = 0
    consecutive_failures: int = 0
    next_probe_s: float = 0.0
    last_poll_ms: int = 0
    last_latency_ms: float = 0.0
    last_error: str = ""
    exception_codes: dict[int, int] = field(default_factory=dict)
    latency_sum_s: float = 0.0
    latency_buckets: list[int] = field(default_factory=lambda: [0] * (len(LATENCY_BOUNDS_S) + 1))

    def count_cycle(self, duration_s: float) -> None:
        """Count one poll cycle that took ``duration_s`` seconds."""
        self.cycles += 1
        self.last_latency_ms = duration_s * 1000.0
        self.latency_sum_s += duration_s
        self.latency_buckets[bisect_left(LATENCY_BOUNDS_S, duration_s)] += 1


_FRAME_COUNTERS: Final = {
    FrameErrorKind.CRC: "crc_errors",
    FrameErrorKind.SHORT: "short_frames",
    FrameErrorKind.GARBLED: "garbled_frames",
    FrameErrorKind.WRONG_UNIT: "wrong_unit",
    FrameErrorKind.WRONG_FUNCTION: "wrong_function",
}
"""The DeviceStats counter of each kind of frame error."""


class CircuitBreaker:
    """The circuit breaker of one device; its state lives in ``stats`` (see the module doc).

    ``failures``: consecutive failed cycles that open it; ``probe_initial_s`` and
    ``probe_max_s`` bound the delay before a probe (seconds, equal jitter, doubling
    after each failed probe). Use: :meth:`wait` before a cycle (returns when the
    cycle may run), :meth:`record` after it.
    """

    def __init__(
        self, stats: DeviceStats, *, failures: int, probe_initial_s: float, probe_max_s: float
    ) -> None:
        if failures < 1 or not 0 < probe_initial_s <= probe_max_s:
            raise ValueError("need failures >= 1 and 0 < probe_initial_s <= probe_max_s")
        self.stats = stats
        self.failures = failures
        self.probe_initial_s = probe_initial_s
        self.probe_max_s = probe_max_s
        self._failed_probes = 0
        self._changed = asyncio.Event()

    async def wait(self) -> None:
        """Return at once while closed; while open, at the probe time, turning it
        ``half_open`` (the caller runs the probe); while half-open, once the probe in
        flight has ended and the breaker is closed or due again."""
        stats = self.stats
        loop = asyncio.get_running_loop()
        while stats.breaker != "closed":
            left = stats.next_probe_s - loop.time()
            if stats.breaker == "open" and left <= 0:
                self.start_probe()
                return
            changed = self._changed
            try:
                async with asyncio.timeout(left if stats.breaker == "open" else None):
                    await changed.wait()
            except TimeoutError:
                pass

    def start_probe(self) -> None:
        """A cycle starts while the breaker is open: it is the probe."""
        if self.stats.breaker == "open":
            self._set("half_open")

    def record(self, answered: bool, *, unreachable: bool) -> bool:
        """Account a cycle; True when it changed the breaker between closed and open.

        ``answered``: some request got an answer; ``unreachable``: every request
        failed for want of a connection (opens the breaker at once).
        """
        stats = self.stats
        if answered:
            stats.consecutive_failures = 0
            self._failed_probes = 0
            if stats.breaker == "closed":
                return False
            stats.next_probe_s = 0.0
            self._set("closed")
            return True
        stats.consecutive_failures += 1
        was_closed = stats.breaker == "closed"
        if was_closed:
            if not unreachable and stats.consecutive_failures < self.failures:
                return False
            stats.breaker_opened += 1
            self._failed_probes = 0
        elif stats.breaker == "open":
            return False  # a cycle that started before it opened: keep the probe time
        else:
            self._failed_probes += 1
        delay = equal_jitter(self._failed_probes, self.probe_initial_s, self.probe_max_s)
        stats.next_probe_s = asyncio.get_running_loop().time() + delay
        self._set("open")
        return was_closed

    def _set(self, state: BreakerState) -> None:
        self.stats.breaker = state
        self._changed.set()  # wake every waiter, then start a new round
        self._changed = asyncio.Event()


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
        breaker_failures: int = 3,
        probe_initial_s: float = PROBE_INITIAL_S,
        probe_max_s: float = PROBE_MAX_S,
        first_seq: int = 1,
    ) -> None:
        self.device = device
        self.stats = DeviceStats()
        self.breaker = CircuitBreaker(
            self.stats,
            failures=breaker_failures,
            probe_initial_s=probe_initial_s,
            probe_max_s=probe_max_s,
        )
        self._conn = connection
        self._connects_seen = connection.stats.connects
        self._sink = sink
        self._on_state = on_state
        # (table, address, count) of requests failing now -> how (cheap to hash)
        self._failing: dict[tuple[str, int, int], type[ModbusError]] = {}
        self._seq = first_seq
        self._groups = {
            cycle: tuple(_planned(r) for r in requests)
            for cycle, requests in plan_device(device).items()
        }

    @property
    def next_seq(self) -> int:
        """The ``seq`` of the next reading (a replacement poller goes on from it)."""
        return self._seq

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
            if self.stats.breaker != "closed":
                # open: nothing is sent until the probe, so that a dead device costs a
                # shared bus or gateway nothing; half-open: another group probes
                await self.breaker.wait()
                deadline = loop.time()
            await self.poll_once(cycle_ms)
            deadline += period
            now = loop.time()
            if deadline < now:
                missed = int((now - deadline) // period) + 1
                self.stats.overruns += missed
                deadline += missed * period
            await asyncio.sleep(deadline - now)

    async def poll_once(self, cycle_ms: int | None = None) -> Reading | None:
        """Poll the group of ``cycle_ms`` (all groups when None); return the reading made.

        Polls whatever the breaker's state (an open breaker makes this the probe);
        only :meth:`run` waits for it.
        """
        self.breaker.start_probe()
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
                answered = answered or isinstance(data, ModbusExceptionError)
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
        self.stats.count_cycle(time.perf_counter() - started)
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
        self.stats.points += len(values)
        self._sink(reading)
        return reading

    def _account(self, answered: bool, *, unreachable: bool) -> bool:
        """Update the breaker and online/offline; True when a reading should be produced."""
        changed = self.breaker.record(answered, unreachable=unreachable)
        stats = self.stats
        if stats.breaker == "open":
            if changed:
                stats.state = "offline"
                self._on_state(self.device.key, "offline", stats.last_error)
            return False
        if answered and stats.state != "online":
            stats.state = "online"
            self._on_state(self.device.key, "online", "")
        return True

    def _split(self, req: ReadRequest) -> None:
        """ILLEGAL DATA ADDRESS on a request that reads unused addresses to merge
        properties: read those properties without gap fill from now on."""
        covered = {a for p in req.properties for a in range(p.visitor.offset, p.visitor.end)}
        if len(covered) == req.count:
            return  # nothing but the properties' own addresses: a real error
        opts = self.device.options
        parts = plan_requests(req.properties, max_registers=opts.max_registers,
                              max_bits=opts.max_bits, max_gap=0)
        if [(r.address, r.count) for r in parts] == [(req.address, req.count)]:
            return  # the span a scale factor register needs, not a gap: a real error
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
                counter = _FRAME_COUNTERS[e.kind]
                setattr(self.stats, counter, getattr(self.stats, counter) + 1)
                error = e
                break
            except ModbusConnectionError as e:
                self.stats.connection_errors += 1
                error = e
                break
            else:
                self._count_reconnects()
                if self._failing.pop(key, None) is not None:
                    log.info("%s: %s %d+%d answers again", self.device.key, req.table,
                             req.address, req.count)
                return data
        self._count_reconnects()
        self.stats.last_error = f"{req.table} {req.address}+{req.count}: {error}"
        # say it once per kind of failure, not once per cycle
        level = logging.DEBUG if self._failing.get(key) is type(error) else logging.WARNING
        if not isinstance(error, ModbusConnectionError):  # the device state reports those
            log.log(level, "%s: %s", self.device.key, self.stats.last_error)
        self._failing[key] = type(error)
        return error

    def _count_reconnects(self) -> None:
        connects = self._conn.stats.connects
        if connects > self._connects_seen:
            self.stats.reconnects += connects - max(self._connects_seen, 1)
            self._connects_seen = connects
