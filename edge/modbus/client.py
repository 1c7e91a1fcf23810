"""Our own asyncio Modbus client: one :class:`Connection` per endpoint, shared by unit ids.

Transports (all on :class:`asyncio.Protocol`, no streams):

* Modbus TCP (:class:`~edge.config.model.TcpEndpoint`, ``Framing.MBAP``): MBAP header
  (TCP/IP Guide V1.0b §3.1.3), answers matched by transaction id, up to
  ``max_inflight`` requests outstanding on the connection.
* RTU over TCP (``TcpEndpoint``, ``Framing.RTU``) and RTU on a serial line
  (:class:`~edge.config.model.SerialEndpoint`, via pyserial-asyncio-fast, port opened
  exclusively): unit id + PDU + CRC-16 (Serial Line V1.02 §2.5.1), strictly one
  request at a time per endpoint.

Failure model (what a caller sees):

* :class:`ModbusTimeoutError` — ``timeout`` passed (it bounds the whole call: queueing
  behind other requests on the endpoint, a connect, an RTU line's silence or
  late-answer guard, and the answer) with nothing of the answer received. A late
  MBAP answer to it is discarded by transaction id and counted in ``stats.discarded``.
* :class:`ModbusFrameError` — an answer that cannot be the answer, including one
  that was still incomplete when ``timeout`` passed. MBAP: a garbled header or
  truncated answer desynchronises the byte stream, so the connection is dropped
  (without backoff) and the next request reconnects.
* RTU frames carry no transaction id, so after a request that ended without a clean
  answer (timeout, frame error) the line is guarded against its late answer: the
  next request is only sent once no byte has arrived for the late-answer guard
  time (until 1.5 × the failed request's timeout after it was sent, at most 1 s),
  or right after the late answer itself arrived (it is discarded). If the guard ran
  out on silence, the next answer is only taken after that much silence again; two
  frames for one request are a :class:`ModbusFrameError`, never a value (details:
  :class:`~edge.modbus.framing.RtuLink`). The guard is waited for inside the next
  request's own ``timeout``; when that passes first, the request fails with
  :class:`ModbusTimeoutError` saying so, unsent. Serial lines also keep t3.5 of
  silence after every frame and flush their input before each request.
* :class:`ModbusExceptionError` — the device's exception response.
* Read Device Identification (:meth:`Connection.read_device_identification`) is a
  sequence of requests; a device whose object list does not end (MoreFollows with a
  NextObjectId that does not advance, or too many rounds) is a
  :class:`ModbusFrameError` (``GARBLED``).
* :class:`ModbusConnectionError` — connect refused/failed/timed out, connection lost
  (reset, broken pipe, EOF, serial port gone); every request in flight fails with it.
  The endpoint is then down for a jittered exponential backoff (equal jitter: a delay
  drawn from [cap/2, cap], cap doubling from ``backoff_initial`` to ``backoff_max``,
  reset after the next answered request). During backoff requests fail at once with
  ``retry_in`` > 0; the first request after it reconnects. Connections are only ever
  made lazily by requests; nothing needs a restart.

Connections share no locks, so a slow or dead endpoint never delays another.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import math
from collections.abc import Sequence
from typing import Any, cast

import serial_asyncio_fast

from edge.config.model import Endpoint, Framing, SerialEndpoint, Table
from edge.modbus.backoff import equal_jitter
from edge.modbus.errors import (
    FrameErrorKind,
    ModbusConnectionError,
    ModbusError,
    ModbusExceptionError,
    ModbusFrameError,
    ModbusTimeoutError,
)
from edge.modbus.framing import ConnectionStats, Link, MbapLink, RtuLink
from edge.modbus.pdu import (
    DEVICE_ID_BASIC,
    DEVICE_ID_EXTENDED,
    Answer,
    DeviceIdentification,
    Request,
    device_identification_request,
    mask_write_request,
    read_request,
    rtu_silence,
    write_coils_request,
    write_registers_request,
)

__all__ = [
    "Connection",
    "ConnectionPool",
    "ConnectionStats",
    "FrameErrorKind",
    "ModbusConnectionError",
    "ModbusError",
    "ModbusExceptionError",
    "ModbusFrameError",
    "ModbusTimeoutError",
]

_RTU_TCP_SILENCE = rtu_silence(9600)
"""t3.5 assumed behind an RTU-over-TCP gateway, whose line speed we do not know: 9600 8N1
(4.0 ms)."""
_CLOSE_WAIT = 2.0
"""Seconds :meth:`Connection.close` waits for the transport to report it is closed."""


def _check_options(
    backoff_initial: float, backoff_max: float, connect_timeout: float, max_inflight: int
) -> None:
    if not 0 < backoff_initial <= backoff_max:
        raise ValueError("need 0 < backoff_initial <= backoff_max")
    if connect_timeout <= 0 or max_inflight < 1:
        raise ValueError("need connect_timeout > 0 and max_inflight >= 1")


class Connection:
    """The connection to one endpoint, shared by every unit id behind it.

    Get one from :meth:`ConnectionPool.get`. It connects lazily on the first request
    and reconnects by itself (see the module docstring for timeouts, losses and
    backoff). ``timeout`` of every call is in seconds and bounds the whole call.
    Unit ids: 0..255 on Modbus TCP, 1..247 with RTU framing. Arguments outside the
    protocol limits raise ValueError.
    """

    def __init__(
        self,
        endpoint: Endpoint,
        *,
        backoff_initial: float = 0.5,
        backoff_max: float = 30.0,
        connect_timeout: float = 3.0,
        max_inflight: int = 1,
    ) -> None:
        _check_options(backoff_initial, backoff_max, connect_timeout, max_inflight)
        self.endpoint = endpoint
        self.stats = ConnectionStats()
        self._key = endpoint.key
        self._rtu = isinstance(endpoint, SerialEndpoint) or endpoint.framing is Framing.RTU
        self._backoff_initial = backoff_initial
        self._backoff_max = backoff_max
        self._connect_timeout = connect_timeout
        self._slots = asyncio.Semaphore(1 if self._rtu else max_inflight)
        self._link: MbapLink | RtuLink | None = None
        self._connect_task: asyncio.Task[None] | None = None
        self._attempt = 0
        self._retry_at = 0.0
        self._last_error = ""
        self._closed = False
        self.mask_write_unsupported: set[int] = set()
        """Unit ids that answered ILLEGAL FUNCTION (exception 1) to a mask write (FC 22),
        recorded by :meth:`mask_write_register`; writers go straight to read-modify-write
        for them (:mod:`edge.modbus.writer`). Kept for the life of this connection object
        (across reconnects: the device behind the endpoint is the same)."""
        self._unit_locks: dict[int, asyncio.Lock] = {}

    def __repr__(self) -> str:
        return f"Connection({self._key}, connected={self.connected})"

    @property
    def connected(self) -> bool:
        """True while a transport to the endpoint is open."""
        return self._link is not None

    async def read(
        self,
        unit_id: int,
        table: Table,
        address: int,
        count: int,
        *,
        timeout: float,  # noqa: ASYNC109
    ) -> list[int] | list[bool]:
        """Read ``count`` items of ``table`` from 0-based ``address`` of unit ``unit_id``.

        FC 1/2/3/4 by table. Returns exactly ``count`` values: registers as ints
        0..65535, coils and discrete inputs as bools. Limits: 1..125 registers,
        1..2000 bits. Raises the ModbusError subclasses described in the module doc.
        """
        result = await self._call(
            unit_id, read_request(table.read_function_code, address, count), timeout
        )
        return cast("list[int] | list[bool]", result)

    async def write_registers(
        self,
        unit_id: int,
        address: int,
        values: Sequence[int],
        *,
        timeout: float,  # noqa: ASYNC109
    ) -> None:
        """Write holding registers from ``address``: FC 6 for one value, FC 16 for 2..123.

        Values are 0..65535; the device's echo is checked.
        """
        await self._call(unit_id, write_registers_request(address, values), timeout)

    async def write_coils(
        self,
        unit_id: int,
        address: int,
        values: Sequence[bool],
        *,
        timeout: float,  # noqa: ASYNC109
    ) -> None:
        """Write coils from ``address``: FC 5 for one value, FC 15 for 2..1968.

        The device's echo is checked.
        """
        await self._call(unit_id, write_coils_request(address, values), timeout)

    async def mask_write_register(
        self,
        unit_id: int,
        address: int,
        and_mask: int,
        or_mask: int,
        *,
        timeout: float,  # noqa: ASYNC109
    ) -> None:
        """Mask Write Register (FC 22, Application Protocol V1.1b3 §6.16) at ``address``.

        Frame: fc 0x16, address u16, AND mask u16, OR mask u16, all big-endian; the
        device sets the holding register to ``(current AND and_mask) OR (or_mask AND
        (NOT and_mask))`` in one request and echoes the request, which is checked.
        Masks are 0..65535. A device that answers ILLEGAL FUNCTION (exception 1) is
        added to :attr:`mask_write_unsupported`; the ModbusExceptionError is raised
        all the same.
        """
        try:
            await self._call(unit_id, mask_write_request(address, and_mask, or_mask), timeout)
        except ModbusExceptionError as e:
            if e.exception_code == 0x01:
                self.mask_write_unsupported.add(unit_id)
            raise

    async def read_device_identification(
        self,
        unit_id: int,
        *,
        code: int = DEVICE_ID_BASIC,
        timeout: float,  # noqa: ASYNC109
        max_rounds: int = 16,
    ) -> dict[int, bytes]:
        """Read Device Identification (FC 43 / MEI 14, Application Protocol V1.1b3 §6.21).

        ``code``: 1 basic (objects 0–2: VendorName, ProductCode, MajorMinorRevision),
        2 regular (also 3–6), 3 extended (also 0x80–0xFF); the device sends what it
        has of that level. Asks from object 0 and, while the device answers
        MoreFollows 0xFF, again from its NextObjectId, merging the objects. Returns
        the raw object values by object id (0..255), in the order received; name and
        decode them with :func:`edge.modbus.pdu.identification_text`.

        ``timeout`` (seconds) bounds the whole sequence. ``max_rounds`` bounds the
        requests: a device still saying MoreFollows after that many, or giving a
        NextObjectId that is not above the object id of the request it answers (it
        would loop), fails with :class:`ModbusFrameError` (``GARBLED``). A device
        without identification answers ILLEGAL FUNCTION (exception 1,
        :class:`ModbusExceptionError`). Raises ValueError for a code outside 1..3 or
        ``max_rounds`` < 1, and the other ModbusError subclasses of the module doc.
        """
        if not DEVICE_ID_BASIC <= code <= DEVICE_ID_EXTENDED:
            raise ValueError(f"ReadDevId code {code} outside 1..3 (streams)")
        if max_rounds < 1:
            raise ValueError("max_rounds must be >= 1")
        if timeout <= 0:
            raise ValueError("timeout must be > 0")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        objects: dict[int, bytes] = {}
        object_id = 0
        for _ in range(max_rounds):
            left = deadline - loop.time()
            if left <= 0:
                raise ModbusTimeoutError(
                    f"{self._key} unit {unit_id}: device identification incomplete after "
                    f"{timeout} s (next object 0x{object_id:02X})"
                )
            part = await self._call(unit_id, device_identification_request(code, object_id), left)
            assert isinstance(part, DeviceIdentification)
            objects.update(part.objects)
            if not part.more_follows:
                return objects
            if part.next_object_id <= object_id:
                raise ModbusFrameError(
                    f"{self._key} unit {unit_id}: device identification loops: asked from "
                    f"object 0x{object_id:02X}, told to go on from 0x{part.next_object_id:02X}",
                    kind=FrameErrorKind.GARBLED,
                )
            object_id = part.next_object_id
        raise ModbusFrameError(
            f"{self._key} unit {unit_id}: device identification still not complete after "
            f"{max_rounds} requests (next object 0x{object_id:02X})",
            kind=FrameErrorKind.GARBLED,
        )

    def unit_lock(self, unit_id: int) -> asyncio.Lock:
        """The lock that serialises this process's multi-request sequences on one unit
        id behind this endpoint (a write and its read-back, :mod:`edge.modbus.writer`).

        Polling does not take it (reads cannot lose a write); other Modbus clients of the
        device know nothing of it, which is why FC 22 is preferred where it is supported.
        """
        lock = self._unit_locks.get(unit_id)
        if lock is None:
            lock = self._unit_locks[unit_id] = asyncio.Lock()
        return lock

    async def close(self) -> None:
        """Close the transport and fail whatever is in flight; later calls fail at once."""
        if self._closed:
            return
        self._closed = True
        task = self._connect_task
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        link = self._link
        if link is not None:
            self._link = None
            self.stats.disconnects += 1
            link.fail_all(self._closed_error())
            if link.transport is not None:
                link.transport.close()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(link.closed), _CLOSE_WAIT)

    async def _call(self, unit_id: int, req: Request, timeout: float) -> Answer:  # noqa: ASYNC109
        if not (1 <= unit_id <= 247 if self._rtu else 0 <= unit_id <= 255):
            raise ValueError(f"unit id {unit_id} out of range for {self._key}")
        if timeout <= 0:
            raise ValueError("timeout must be > 0")
        if self._closed:
            raise self._closed_error()
        loop = asyncio.get_running_loop()
        if self._link is None and self._connect_task is None:
            wait = self._retry_at - loop.time()
            if wait > 0:
                self.stats.rejected += 1
                raise self._down_error(wait)
        stats = self.stats
        stats.requests += 1
        deadline = loop.time() + timeout
        try:
            link = await self._acquire(loop, deadline)
        except ModbusTimeoutError:
            stats.timeouts += 1
            raise
        try:
            result = await link.exchange(req, unit_id, deadline, timeout)
        except ModbusTimeoutError:
            stats.timeouts += 1
            raise
        except ModbusExceptionError:
            stats.exceptions += 1
            self._attempt = 0
            raise
        except ModbusFrameError:
            stats.frame_errors += 1
            raise
        finally:
            self._slots.release()
        stats.responses += 1
        self._attempt = 0
        return result

    async def _acquire(
        self, loop: asyncio.AbstractEventLoop, deadline: float
    ) -> MbapLink | RtuLink:
        """Take a request slot and an open link ready to send, before ``deadline``.

        The caller releases the slot. Raises ModbusTimeoutError at the deadline,
        ModbusConnectionError if the endpoint cannot be reached.
        """
        slots = self._slots
        link = self._link
        if link is not None and not slots.locked() and (isinstance(link, MbapLink) or link.ready()):
            await slots.acquire()  # free: returns without suspending
            return link
        waiting = "queued behind other requests"
        try:
            async with asyncio.timeout_at(deadline):
                await slots.acquire()
                try:
                    waiting = "connecting"
                    link = self._link or await self._connect(loop)
                    while isinstance(link, RtuLink):
                        waiting = "line"
                        await link.wait_ready()
                        if link is self._link:  # not lost while the line went quiet
                            break
                        waiting = "connecting"
                        link = await self._connect(loop)
                except BaseException:
                    slots.release()
                    raise
        except TimeoutError:
            if waiting == "line" and isinstance(link, RtuLink):
                waiting = link.busy_reason()
            elif self._link is None:
                waiting = "connecting"
            raise ModbusTimeoutError(
                f"{self._key}: not ready to send within the timeout ({waiting})"
            ) from None
        return link

    async def _connect(self, loop: asyncio.AbstractEventLoop) -> MbapLink | RtuLink:
        """The open link, connecting (once, shared by all waiting callers) if needed."""
        if self._closed:
            raise self._closed_error()
        task = self._connect_task
        if task is None:
            wait = self._retry_at - loop.time()
            if wait > 0:
                raise self._down_error(wait)
            task = self._connect_task = loop.create_task(self._open(), name=f"connect {self._key}")
        await asyncio.shield(task)
        if self._closed:
            raise self._closed_error()
        link = self._link
        if link is None:
            raise self._down_error(self._retry_at - loop.time())
        return link

    async def _open(self) -> None:
        """Open the transport; on failure start the backoff. Never raises but on close."""
        ep = self.endpoint
        link: MbapLink | RtuLink
        transport: Any
        try:
            async with asyncio.timeout(self._connect_timeout):
                if isinstance(ep, SerialEndpoint):
                    silence = rtu_silence(ep.baudrate, ep.bytesize, ep.parity, ep.stopbits)
                    link = RtuLink(
                        self._key, self.stats, self._lost, silence=silence, serial_line=True
                    )
                    transport, _ = await serial_asyncio_fast.create_serial_connection(
                        asyncio.get_running_loop(),
                        lambda: link,
                        ep.port,
                        baudrate=ep.baudrate,
                        bytesize=ep.bytesize,
                        parity=ep.parity,
                        stopbits=ep.stopbits,
                        exclusive=True,
                    )
                else:
                    link = (
                        RtuLink(
                            self._key,
                            self.stats,
                            self._lost,
                            silence=_RTU_TCP_SILENCE,
                            serial_line=False,
                        )
                        if self._rtu
                        else MbapLink(self._key, self.stats, self._lost)
                    )
                    transport, _ = await asyncio.get_running_loop().create_connection(
                        lambda: link, ep.host, ep.port
                    )
        except asyncio.CancelledError:
            if not self._closed:
                raise
            return
        except TimeoutError:
            self._failed(f"connect timed out after {self._connect_timeout} s")
            return
        except (OSError, ValueError) as e:
            self._failed(f"connect failed: {e}")
            return
        finally:
            self._connect_task = None
        link.transport = transport
        self._link = link
        self.stats.connects += 1

    def _failed(self, reason: str) -> None:
        """Mark the endpoint down and draw the next backoff delay (equal jitter)."""
        self.stats.connect_failures += 1
        self._backoff(reason)

    def _backoff(self, reason: str) -> None:
        delay = equal_jitter(self._attempt, self._backoff_initial, self._backoff_max)
        self._attempt += 1
        self._retry_at = asyncio.get_running_loop().time() + delay
        self._last_error = reason

    def _lost(self, link: Link, exc: Exception | None) -> None:
        """Called by a link's ``connection_lost``: fail its requests, back off."""
        if self._link is not link:
            return
        self._link = None
        self.stats.disconnects += 1
        if link.desynced:
            reason = "connection dropped after a garbled answer"
        else:
            reason = f"connection lost: {exc}" if exc else "connection closed by the peer"
            self._backoff(reason)
        link.fail_all(
            ModbusConnectionError(
                f"{self._key}: {reason}",
                retry_in=max(0.0, self._retry_at - asyncio.get_running_loop().time()),
            )
        )

    def _down_error(self, wait: float) -> ModbusConnectionError:
        return ModbusConnectionError(
            f"{self._key} is down ({self._last_error}); next connect in {wait:.2f} s",
            retry_in=max(0.0, wait),
        )

    def _closed_error(self) -> ModbusConnectionError:
        return ModbusConnectionError(f"{self._key}: connection closed", retry_in=math.inf)


class ConnectionPool:
    """One :class:`Connection` per endpoint key; the parameters apply to all of them.

    ``backoff_initial``/``backoff_max``/``connect_timeout`` are seconds;
    ``max_inflight`` bounds outstanding requests per Modbus TCP connection (RTU is
    always one at a time).
    """

    def __init__(
        self,
        *,
        backoff_initial: float = 0.5,
        backoff_max: float = 30.0,
        connect_timeout: float = 3.0,
        max_inflight: int = 1,
    ) -> None:
        _check_options(backoff_initial, backoff_max, connect_timeout, max_inflight)
        self._new = functools.partial(
            Connection,
            backoff_initial=backoff_initial,
            backoff_max=backoff_max,
            connect_timeout=connect_timeout,
            max_inflight=max_inflight,
        )
        self._connections: dict[str, Connection] = {}
        self._closed = False

    def get(self, endpoint: Endpoint) -> Connection:
        """The connection for ``endpoint.key``, created (unconnected) on first use.

        Raises ValueError when a serial port is asked for with other line settings
        than the first time (one bus, one set of settings), RuntimeError once closed.
        """
        if self._closed:
            raise RuntimeError("connection pool is closed")
        conn = self._connections.get(endpoint.key)
        if conn is None:
            conn = self._new(endpoint)
            self._connections[endpoint.key] = conn
        elif conn.endpoint != endpoint:
            raise ValueError(f"{endpoint.key} is already used as {conn.endpoint}, not {endpoint}")
        return conn

    async def close(self) -> None:
        """Close every connection."""
        self._closed = True
        conns = list(self._connections.values())
        self._connections.clear()
        await asyncio.gather(*(c.close() for c in conns))
