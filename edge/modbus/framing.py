"""MBAP and RTU framing on asyncio transports: the protocols under a Connection.

A :class:`Link` is the :class:`asyncio.Protocol` of one open transport. It sends a
request with :meth:`Link.exchange` and resolves the returned future from
``data_received`` (answer), from a timer at the caller's deadline
(:class:`ModbusTimeoutError`, or :class:`ModbusFrameError` if the answer was still
incomplete) or from ``connection_lost`` (via the owner's callback, which fails what
is in flight). Formats: MBAP — *MODBUS Messaging on TCP/IP Implementation Guide
V1.0b* §3.1.3; RTU — *MODBUS over Serial Line V1.02* §2.5.1 (see :mod:`edge.modbus.pdu`).
"""

from __future__ import annotations

import abc
import asyncio
import termios
from collections.abc import Callable
from dataclasses import dataclass
from typing import cast

from edge.modbus.errors import (
    ModbusConnectionError,
    ModbusError,
    ModbusExceptionError,
    ModbusFrameError,
    ModbusTimeoutError,
)
from edge.modbus.pdu import (
    MAX_PDU,
    MBAP,
    Buffer,
    Request,
    Values,
    crc16,
    mbap_adu,
    rtu_adu,
    rtu_response_length,
)

_MAX_ABANDONED = 256
"""How many timed-out MBAP transaction ids are remembered to recognise late answers."""


@dataclass(slots=True)
class ConnectionStats:
    """Counters of one connection (monotonic, never reset).

    ``requests``: calls attempted (not refused up front during backoff — those are
    ``rejected``); each attempt ends as one of ``responses`` (normal answers),
    ``exceptions`` (exception responses), ``timeouts``, ``frame_errors`` or a
    connection error. ``connects``/``connect_failures``/``disconnects`` count
    transport events; ``discarded`` counts answers nobody waits for (late MBAP
    answers to timed-out requests, unknown transaction ids, RTU input between
    requests).
    """

    requests: int = 0
    responses: int = 0
    timeouts: int = 0
    exceptions: int = 0
    frame_errors: int = 0
    connects: int = 0
    connect_failures: int = 0
    disconnects: int = 0
    discarded: int = 0
    rejected: int = 0


Pending = tuple["asyncio.Future[Values | None]", Request, int, asyncio.TimerHandle]
"""An outstanding request: the future its caller awaits, the request, the unit id,
the timer that expires it."""


class Link(asyncio.Protocol, abc.ABC):
    """One open transport of a :class:`Connection`; framing lives in the subclasses.

    A request is sent with :meth:`exchange`, which returns the future its caller
    awaits; a timer at the caller's deadline fails it with :class:`ModbusTimeoutError`
    (nothing received) or :class:`ModbusFrameError` (answer incomplete).
    """

    def __init__(
        self, key: str, stats: ConnectionStats, on_lost: Callable[[Link, Exception | None], None]
    ) -> None:
        self.key = key
        self.stats = stats
        self._on_lost = on_lost
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.closed: asyncio.Future[None] = self.loop.create_future()
        self.desynced = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed.done():
            self.closed.set_result(None)
        self._on_lost(self, exc)

    @abc.abstractmethod
    def exchange(
        self, req: Request, unit_id: int, deadline: float
    ) -> asyncio.Future[Values | None]:
        """Send ``req`` to ``unit_id``; the future of its outcome, expiring at ``deadline``."""

    @abc.abstractmethod
    def fail_all(self, error: ModbusError) -> None:
        """Fail every request in flight with ``error``."""

    def drop(self, reason: str) -> None:
        """The byte stream can no longer be trusted: fail what is in flight, reconnect."""
        self.desynced = True
        self.buf.clear()
        self.fail_all(ModbusFrameError(f"{self.key}: {reason}"))
        if self.transport is not None:
            self.transport.abort()
        self._on_lost(self, None)  # at once: no request may go out on this transport

    def _gone(self, exc: Exception) -> None:
        """The transport failed under a request: report it, fail what is still in flight."""
        self._on_lost(self, exc)
        self.fail_all(ModbusConnectionError(f"{self.key}: connection lost: {exc}"))

    def _send(self, data: bytes) -> None:
        """Write ``data``; a transport that is already closing counts as lost at once."""
        transport = self.transport
        if transport is None or transport.is_closing():
            self._gone(ConnectionError("transport is closing"))
        else:
            transport.write(data)

    def _expired(self, req: Request, unit_id: int, partial: int) -> ModbusError:
        where = f"{self.key} unit {unit_id} {req}"
        if partial:
            return ModbusFrameError(f"{where}: answer incomplete ({partial} bytes) at the deadline")
        return ModbusTimeoutError(f"{where}: no answer in time")


class MbapLink(Link):
    """Modbus TCP framing: MBAP header, answers matched by transaction id."""

    def __init__(
        self, key: str, stats: ConnectionStats, on_lost: Callable[[Link, Exception | None], None]
    ) -> None:
        super().__init__(key, stats, on_lost)
        self.pending: dict[int, Pending] = {}
        self.abandoned: dict[int, None] = {}  # insertion-ordered set of timed-out ids
        self._tid = 0

    def exchange(
        self, req: Request, unit_id: int, deadline: float
    ) -> asyncio.Future[Values | None]:
        pending = self.pending
        tid = (self._tid + 1) & 0xFFFF
        while tid in pending:
            tid = (tid + 1) & 0xFFFF
        self._tid = tid
        self.abandoned.pop(tid, None)
        fut: asyncio.Future[Values | None] = self.loop.create_future()
        pending[tid] = (fut, req, unit_id, self.loop.call_at(deadline, self._expire, tid))
        self._send(mbap_adu(tid, unit_id, req.pdu))
        return fut

    def _expire(self, tid: int) -> None:
        entry = self.pending.pop(tid, None)
        if entry is None:
            return
        abandoned = self.abandoned
        abandoned[tid] = None
        if len(abandoned) > _MAX_ABANDONED:
            del abandoned[next(iter(abandoned))]
        fut, req, unit_id, _ = entry
        buf = self.buf
        partial = len(buf) if len(buf) >= 2 and (buf[0] << 8 | buf[1]) == tid else 0
        if not fut.done():
            fut.set_exception(self._expired(req, unit_id, partial))
        if partial:
            self.drop("truncated MBAP answer")

    def _deliver(self, entry: Pending, unit: int, view: Buffer, start: int, end: int) -> None:
        """Resolve ``entry`` with the answer PDU ``view[start:end]`` from ``unit``."""
        fut, req, unit_id, timer = entry
        timer.cancel()
        if fut.done():
            self.stats.discarded += 1
        elif unit != unit_id:
            fut.set_exception(
                ModbusFrameError(f"{self.key}: answer from unit {unit}, asked {unit_id}")
            )
        else:
            try:
                fut.set_result(req.parse(view, start, end))
            except ModbusError as e:
                fut.set_exception(e)

    def fail_all(self, error: ModbusError) -> None:
        for fut, _, _, timer in self.pending.values():
            timer.cancel()
            if not fut.done():
                fut.set_exception(error)
        self.pending.clear()

    def data_received(self, data: bytes) -> None:
        buf = self.buf
        view: Buffer
        if buf:
            buf += data
            view = buf
        else:
            view = data
        n = len(view)
        pos = 0
        pending = self.pending
        while n - pos >= 7:
            tid, protocol, length, unit = MBAP.unpack_from(view, pos)
            if protocol != 0 or not 3 <= length <= MAX_PDU + 1:
                self.drop(f"garbled MBAP header {bytes(view[pos : pos + 7]).hex()}")
                return
            end = pos + 6 + length
            if end > n:
                break
            entry = pending.pop(tid, None)
            if entry is None:
                self.abandoned.pop(tid, None)
                self.stats.discarded += 1
            else:
                self._deliver(entry, unit, view, pos + 7, end)
            pos = end
        if view is buf:
            del buf[:pos]
        elif pos < n:
            buf += data[pos:]


class RtuLink(Link):
    """RTU framing: one request at a time, frame length from its first bytes, CRC."""

    def __init__(
        self,
        key: str,
        stats: ConnectionStats,
        on_lost: Callable[[Link, Exception | None], None],
        *,
        silence: float,
        serial_line: bool,
    ) -> None:
        super().__init__(key, stats, on_lost)
        self.current: Pending | None = None
        self.silence = silence
        self.serial_line = serial_line
        self.quiet_until = 0.0  # loop time before which nothing may be sent

    def ready(self) -> bool:
        """True when a request may be sent right now."""
        return self.current is None and self.quiet_until <= self.loop.time()

    async def wait_ready(self) -> None:
        """Wait until the line has been silent for t3.5 (input extends the wait)."""
        cur = self.current
        if cur is not None:  # its caller went away (cancelled) before the answer
            self._finish(cur, None)
        loop = self.loop
        while (wait := self.quiet_until - loop.time()) > 0:  # noqa: ASYNC110 (moving deadline)
            await asyncio.sleep(wait)

    def exchange(
        self, req: Request, unit_id: int, deadline: float
    ) -> asyncio.Future[Values | None]:
        fut: asyncio.Future[Values | None] = self.loop.create_future()
        self.current = (fut, req, unit_id, self.loop.call_at(deadline, self._expire, fut))
        self.buf.clear()
        if not self.serial_line or self._flush_port():
            self._send(rtu_adu(unit_id, req.pdu))
        return fut

    def _flush_port(self) -> bool:
        """Discard the serial port's input buffer; False (and lost) if the port is gone."""
        transport = self.transport
        port = None if transport is None else transport.get_extra_info("serial")
        if port is None:
            return True
        try:
            port.reset_input_buffer()
        except (OSError, termios.error) as e:  # SerialException is an OSError
            assert transport is not None
            transport.abort()
            self._gone(e)
            return False
        return True

    def _expire(self, fut: asyncio.Future[Values | None]) -> None:
        cur = self.current
        if cur is not None and cur[0] is fut:
            self._finish(cur, self._expired(cur[1], cur[2], len(self.buf)))

    def fail_all(self, error: ModbusError) -> None:
        cur = self.current
        if cur is not None:
            self._finish(cur, error)

    def data_received(self, data: bytes) -> None:
        cur = self.current
        if cur is None:  # nobody asked: discard, and the line is not silent yet
            self.quiet_until = self.loop.time() + self.silence
            self.stats.discarded += 1
            return
        buf = self.buf
        buf += data
        if len(buf) < 3:
            return
        size = rtu_response_length(buf)
        if size is None:
            self._finish(
                cur, ModbusFrameError(f"{self.key}: garbled RTU frame {bytes(buf[:8]).hex()}")
            )
            return
        if len(buf) < size:
            return
        unit_id = cur[2]
        if crc16(buf, 0, size) != 0:
            self._finish(
                cur, ModbusFrameError(f"{self.key}: CRC mismatch in {bytes(buf[:size]).hex()}")
            )
        elif buf[0] != unit_id:
            self._finish(
                cur, ModbusFrameError(f"{self.key}: answer from unit {buf[0]}, asked {unit_id}")
            )
        else:
            try:
                result = cur[1].parse(buf, 1, size - 2)
            except ModbusError as e:
                clean = isinstance(e, ModbusExceptionError) and len(buf) == size
                self._finish(cur, e, clean=clean)
                return
            self._finish(cur, result, clean=len(buf) == size)

    def _finish(
        self, cur: Pending, outcome: Values | ModbusError | None, clean: bool = False
    ) -> None:
        """Complete the current request; unless the frame was clean, keep t3.5 quiet."""
        self.current = None
        self.buf.clear()
        if not clean or self.serial_line:
            self.quiet_until = self.loop.time() + self.silence
        fut, _, _, timer = cur
        timer.cancel()
        if fut.done():
            return
        if isinstance(outcome, ModbusError):
            fut.set_exception(outcome)
        else:
            fut.set_result(outcome)
