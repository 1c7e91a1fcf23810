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
import errno
import termios
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final, cast

from edge.modbus.errors import (
    FrameErrorKind,
    ModbusConnectionError,
    ModbusError,
    ModbusExceptionError,
    ModbusFrameError,
    ModbusTimeoutError,
)
from edge.modbus.pdu import (
    MAX_PDU,
    MBAP,
    Answer,
    Buffer,
    Request,
    crc16,
    mbap_adu,
    rtu_adu,
    rtu_response_length,
)

_MAX_ABANDONED = 256
"""How many timed-out MBAP transaction ids are remembered to recognise late answers."""

LATE_HORIZON: Final = 1.5
"""RTU: an answer is still expected until ``LATE_HORIZON × timeout`` after its request
was sent (``timeout`` the caller's whole budget); see :class:`RtuLink`. 1.5, not more:
the guard is waited for inside the next request's own timeout, which is usually the
same — a horizon of 2 × timeout would leave a retry after a silent timeout no time
at all (with 1.5 it keeps half of it)."""
LATE_GUARD_MAX: Final = 1.0
"""Upper bound in seconds of the late-answer guard (the default request timeout), so
that long timeouts (slow gateways) or a failure early in a long timeout never idle a
shared bus for more than a second per failed request."""


@dataclass(slots=True)
class ConnectionStats:
    """Counters of one connection (monotonic, never reset).

    ``requests``: calls attempted (not refused up front during backoff — those are
    ``rejected``); each attempt ends as one of ``responses`` (normal answers),
    ``exceptions`` (exception responses), ``timeouts``, ``frame_errors`` or a
    connection error. ``connects``/``connect_failures``/``disconnects`` count
    transport events; ``discarded`` counts answers nobody takes: late MBAP answers
    to timed-out requests and unknown transaction ids; on RTU every frame (or, when
    it cannot be delimited, every chunk of input) that arrives between requests —
    late answers during the late-answer guard included — answers to requests whose
    caller went away, a frame incomplete when the next request is sent, and frames
    not taken because more than one arrived for one request.
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


Pending = tuple["asyncio.Future[Answer]", Request, int, asyncio.TimerHandle]
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
        self, req: Request, unit_id: int, deadline: float, timeout: float
    ) -> asyncio.Future[Answer]:
        """Send ``req`` to ``unit_id``; the future of its outcome, expiring at ``deadline``.

        ``timeout`` is the caller's whole budget (``deadline`` was set from it).
        """

    @abc.abstractmethod
    def fail_all(self, error: ModbusError) -> None:
        """Fail every request in flight with ``error``."""

    def drop(self, reason: str, kind: FrameErrorKind) -> None:
        """The byte stream can no longer be trusted: fail what is in flight, reconnect."""
        self.desynced = True
        self.buf.clear()
        self.fail_all(ModbusFrameError(f"{self.key}: {reason}", kind=kind))
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
            return ModbusFrameError(
                f"{where}: answer incomplete ({partial} bytes) at the deadline",
                kind=FrameErrorKind.SHORT,
            )
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
        self, req: Request, unit_id: int, deadline: float, timeout: float
    ) -> asyncio.Future[Answer]:
        pending = self.pending
        tid = (self._tid + 1) & 0xFFFF
        while tid in pending:
            tid = (tid + 1) & 0xFFFF
        self._tid = tid
        self.abandoned.pop(tid, None)
        fut: asyncio.Future[Answer] = self.loop.create_future()
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
            self.drop("truncated MBAP answer", FrameErrorKind.SHORT)

    def _deliver(self, entry: Pending, unit: int, view: Buffer, start: int, end: int) -> None:
        """Resolve ``entry`` with the answer PDU ``view[start:end]`` from ``unit``."""
        fut, req, unit_id, timer = entry
        timer.cancel()
        if fut.done():
            self.stats.discarded += 1
        elif unit != unit_id:
            fut.set_exception(
                ModbusFrameError(f"{self.key}: answer from unit {unit}, asked {unit_id}",
                                 kind=FrameErrorKind.WRONG_UNIT)
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
                self.drop(f"garbled MBAP header {bytes(view[pos : pos + 7]).hex()}",
                          FrameErrorKind.GARBLED)
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
    """RTU framing: one request at a time, frame length from its first bytes, CRC.

    RTU frames carry no transaction id, so an answer is only known to be the answer
    to the request in flight if nothing else can arrive at that time. Rules:

    * **Late-answer guard.** When a request ends without a clean answer (timeout,
      answer incomplete at the deadline, garbled frame, CRC mismatch, wrong unit,
      function code or byte count, more than one frame, caller gone), its answer may
      still be on its way: the link then sends nothing until no byte has arrived for
      the guard time ``G``. ``G`` reaches the request's late-answer horizon,
      ``LATE_HORIZON × timeout`` after it was sent (``timeout`` being the caller's
      whole budget, so a request that waited in a queue or for an earlier guard
      keeps the same horizon), capped at ``LATE_GUARD_MAX`` and never below t3.5:
      after a timeout with nothing waited before the send, ``G = min(0.5 × timeout,
      1 s)``.
      Every byte received meanwhile is discarded (``stats.discarded``) and restarts
      the wait. If a complete frame that answers the failed request (its unit, CRC
      and shape, exception responses included) arrives and is the last input, that
      was the late answer: it is discarded and the line is released after t3.5.
    * **Suspect answer.** If the guard ran out on silence (a late answer, if any, is
      later than the horizon), the next request is sent, but its answer is only
      taken once the line stayed quiet for that ``G`` after it (or at its deadline,
      if that comes first). Input in that time means two frames arrived for one
      request — one answers an earlier request and nothing tells which — so the
      request fails with :class:`ModbusFrameError` (and gets its own guard).
    * More than one frame in the answer window (bytes after a complete frame) is
      likewise a :class:`ModbusFrameError`, never a value.
    * A caller that goes away (cancelled) leaves its request in flight until its
      answer or deadline; the next request waits for that, then for the guard.
    * Serial lines also keep t3.5 of silence after every frame, and the port's
      input buffer is flushed before each request.

    Cost: after a failed request whose late answer does arrive, the time until it
    arrives plus t3.5; after one whose answer never comes, ``G`` of idle line and
    up to ``G`` more before the next answer is taken. The wait counts against the
    next caller's own timeout (see :meth:`wait_ready`; :meth:`busy_reason` says why
    it waited) and holds up no other endpoint. What stays undetectable: a late
    answer beyond the horizon that arrives after the next answer was taken, or a
    device that drops the next request and answers only the old one, same shape.
    """

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
        self.guard = silence  # how long input between requests keeps the line busy
        self.armed = 0.0  # G of a guard the late answer has not ended (0: none)
        self._late: tuple[Request, int] | None = None  # failed request, unit: its answer?
        self._deadline = 0.0
        self._horizon = 0.0  # until when the current request's answer may come
        self._hold = 0.0  # > 0: the current request is suspect, confirm by this silence
        self._held: tuple[Answer | ModbusError] | None = None  # answer on hold
        self._hold_timer: asyncio.TimerHandle | None = None
        self._waker: asyncio.Future[None] | None = None

    def ready(self) -> bool:
        """True when a request may be sent right now."""
        return self.current is None and self.quiet_until <= self.loop.time()

    def busy_reason(self) -> str:
        """Why a request cannot be sent right now (for a timeout message)."""
        if self.current is not None:
            return "the line is still busy with a request whose caller went away"
        if self.armed:
            return (
                f"late-answer guard: the line must stay quiet for {self.armed * 1000:.0f} ms "
                "after a failed request before the next one"
            )
        return "waiting for the line to be silent"

    async def wait_ready(self) -> None:
        """Wait until a request may be sent: nothing in flight and the line quiet (t3.5,
        or the late-answer guard; input extends the wait) — or the link closed."""
        loop = self.loop
        while not self.closed.done():
            waker = self._waker = loop.create_future()
            timer = None  # in flight: woken when it ends
            if self.current is None:
                wait = self.quiet_until - loop.time()
                if wait <= 0:
                    self._waker = None
                    return
                timer = loop.call_later(wait, _resolve, waker)  # or earlier, by the late answer
            try:
                await waker
            finally:
                if timer is not None:
                    timer.cancel()
                self._waker = None

    def _wake(self) -> None:
        if self._waker is not None:
            _resolve(self._waker)

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        self._wake()

    def _guard_now(self) -> float:
        """The late-answer guard for the current request, failing now."""
        wait = self._horizon - self.loop.time()
        return max(self.silence, min(wait, LATE_GUARD_MAX))

    def exchange(
        self, req: Request, unit_id: int, deadline: float, timeout: float
    ) -> asyncio.Future[Answer]:
        loop = self.loop
        fut: asyncio.Future[Answer] = loop.create_future()
        self.current = (fut, req, unit_id, loop.call_at(deadline, self._expire, fut))
        self._deadline = deadline
        self._horizon = loop.time() + LATE_HORIZON * timeout
        self._hold = self.armed  # the guard ran out on silence: confirm this answer
        self.armed = 0.0
        self._late = None
        self.guard = self.silence
        if self.buf:  # the start of a frame that never completed
            self.stats.discarded += 1
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
            if not port.is_open:  # closed under us when the device went away
                raise OSError(errno.ENODEV, f"serial port {port.port} was closed")
            port.reset_input_buffer()
        except (OSError, termios.error) as e:  # SerialException is an OSError
            assert transport is not None
            transport.abort()
            self._gone(e)
            return False
        return True

    def _expire(self, fut: asyncio.Future[Answer]) -> None:
        cur = self.current
        if cur is None or cur[0] is not fut:
            return
        if self._held is not None:  # confirmed as far as the deadline allows
            self._finish(cur, self._held[0], clean=True)
        else:  # keep a partial answer: if it completes during the guard, it ends it
            self._finish(cur, self._expired(cur[1], cur[2], len(self.buf)), keep=True)

    def _release_held(self) -> None:
        cur = self.current
        if cur is not None and self._held is not None:
            self._finish(cur, self._held[0], clean=True)

    def fail_all(self, error: ModbusError) -> None:
        cur = self.current
        if cur is not None:
            self._finish(cur, error)

    def data_received(self, data: bytes) -> None:
        cur = self.current
        if cur is None:
            self._between(data)
        elif self._held is not None:  # input after the answer of a suspect request
            self.stats.discarded += 1  # the held answer
            self._finish(
                cur,
                ModbusFrameError(
                    f"{self.key} unit {cur[2]} {cur[1]}: a second frame followed its answer, "
                    "so one of them answers an earlier request; neither is taken",
                    kind=FrameErrorKind.GARBLED,
                ),
            )
            self._between(data)
        else:
            self.buf += data
            checked = self._check(cur)
            if checked is not None:
                self._answered(cur, *checked)

    def _check(self, cur: Pending) -> tuple[Answer | ModbusError, int] | None:
        """The answer frame at the start of ``buf``: None while incomplete, else its
        outcome (values or identification, None for a write, the device's exception) and size, or
        ``(ModbusFrameError, 0)`` if it cannot be the answer."""
        buf = self.buf
        if len(buf) < 3:
            return None
        size = rtu_response_length(buf)
        if size is not None and len(buf) < size:
            return None
        unit_id = cur[2]
        if size is None:
            wrong, kind = f"garbled RTU frame {bytes(buf[:8]).hex()}", FrameErrorKind.GARBLED
        elif crc16(buf, 0, size) != 0:
            wrong, kind = f"CRC mismatch in {bytes(buf[:size]).hex()}", FrameErrorKind.CRC
        elif buf[0] != unit_id:
            wrong, kind = f"answer from unit {buf[0]}, asked {unit_id}", FrameErrorKind.WRONG_UNIT
        else:
            try:
                return cur[1].parse(buf, 1, size - 2), size
            except ModbusExceptionError as e:
                return e, size
            except ModbusError as e:
                return e, 0
        return ModbusFrameError(f"{self.key}: {wrong}", kind=kind), 0

    def _answered(self, cur: Pending, outcome: Answer | ModbusError, size: int) -> None:
        """A complete frame arrived for ``cur`` (``size`` 0: not its answer)."""
        buf = self.buf
        if not size:
            self._finish(cur, outcome)
        elif len(buf) > size:
            rest = bytes(buf[size:])
            self.stats.discarded += 1
            self._finish(
                cur,
                ModbusFrameError(
                    f"{self.key} unit {cur[2]} {cur[1]}: more than one frame in its answer "
                    f"window ({len(rest)} bytes after a complete frame), so one of them "
                    "answers an earlier request; none is taken",
                    kind=FrameErrorKind.GARBLED,
                ),
            )
            self._between(rest)
        elif self._hold:
            self._held = (outcome,)
            loop = self.loop
            self._hold_timer = loop.call_at(
                min(loop.time() + self._hold, self._deadline), self._release_held
            )
        else:
            self._finish(cur, outcome, clean=True)

    def _between(self, data: bytes) -> None:
        """Input while no request is in flight: discard it, keep the line busy.

        During a late-answer guard, frames are delimited to recognise the late
        answer; once the input cannot be delimited (garbled, CRC mismatch) the guard
        can only end on silence.
        """
        now = self.loop.time()
        self.quiet_until = max(self.quiet_until, now + self.guard)
        late = self._late
        if late is None:
            self.stats.discarded += 1
            return
        buf = self.buf
        buf += data
        while len(buf) >= 3:
            size = rtu_response_length(buf)
            if size is not None and len(buf) < size:
                return  # wait for the rest of the frame
            self.stats.discarded += 1
            if size is None or crc16(buf, 0, size) != 0:
                buf.clear()
                self._late = None
                return
            answers = _answers(late, buf, size)
            del buf[:size]
            if answers and not buf:  # the late answer, and nothing after it
                self._late = None
                self.armed = 0.0
                self.guard = self.silence
                self.quiet_until = now + self.silence
                self._wake()
                return

    def _finish(
        self,
        cur: Pending,
        outcome: Answer | ModbusError,
        *,
        clean: bool = False,
        keep: bool = False,
    ) -> None:
        """Complete the current request. After a clean answer a serial line keeps t3.5
        quiet; after anything else the late-answer guard starts (``keep``: the input
        so far may be the start of the late answer)."""
        self.current = None
        self._held = None
        if self._hold_timer is not None:
            self._hold_timer.cancel()
            self._hold_timer = None
        if not keep:
            self.buf.clear()
        now = self.loop.time()
        if not clean:
            self.guard = self.armed = self._guard_now()
            self._late = (cur[1], cur[2])
            self.quiet_until = now + self.guard
        elif self.serial_line:
            self.quiet_until = now + self.silence
        fut, _, _, timer = cur
        timer.cancel()
        self._wake()
        if fut.done():
            if clean:  # an answer whose caller went away
                self.stats.discarded += 1
            return
        if isinstance(outcome, ModbusError):
            fut.set_exception(outcome)
        else:
            fut.set_result(outcome)


def _resolve(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


def _answers(late: tuple[Request, int], buf: Buffer, size: int) -> bool:
    """True if the CRC-checked frame ``buf[:size]`` is an answer (normal or exception)
    to ``late``'s request from ``late``'s unit."""
    req, unit_id = late
    if buf[0] != unit_id:
        return False
    try:
        req.parse(buf, 1, size - 2)
    except ModbusExceptionError:
        return True
    except ModbusError:
        return False
    return True
