"""edge.modbus client and PDUs against real servers on 127.0.0.1.

Servers: pymodbus 3.16 ModbusTcpServer (MBAP and RTU framing) and ModbusSerialServer
on one end of a socat pty pair, plus raw asyncio TCP servers and a raw serial device
on a pty pair whose answers each test scripts (silence, late, wrong unit, bad CRC,
truncated, wrong byte count, two frames, close).
Every server and process a test starts is stopped by the test.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import shutil
import signal
import socket
import struct
import subprocess
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import serial_asyncio_fast
from pymodbus.datastore import (
    ModbusDeviceContext,
    ModbusSequentialDataBlock,
    ModbusServerContext,
)
from pymodbus.framer import FramerType
from pymodbus.framer.rtu import FramerRTU
from pymodbus.server import ModbusSerialServer, ModbusTcpServer

from edge.config.model import (
    DeviceSpec,
    Framing,
    ModbusOptions,
    PropertySpec,
    RawType,
    SerialEndpoint,
    Table,
    TcpEndpoint,
    ValueType,
    Visitor,
)
from edge.modbus import pdu
from edge.modbus.client import (
    Connection,
    ConnectionPool,
    FrameErrorKind,
    ModbusConnectionError,
    ModbusError,
    ModbusExceptionError,
    ModbusFrameError,
    ModbusTimeoutError,
)
from edge.modbus.poller import DevicePoller
from edge.reading import Reading

logging.getLogger("pymodbus").setLevel(logging.CRITICAL)

HOST = "127.0.0.1"
SIZE = 2100  # items per table and unit in the pymodbus images
UNITS = (1, 2, 7)
HR, IR, CO, DI = Table.HOLDING_REGISTER, Table.INPUT_REGISTER, Table.COIL, Table.DISCRETE_INPUT


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


# ---------------------------------------------------------------- pymodbus images


def expected(unit: int, table: Table, address: int, count: int) -> list[int] | list[bool]:
    """What the pymodbus image of ``unit`` holds (protocol addresses, 0-based)."""
    idx = range(address, address + count)
    if table is HR:
        return [unit * 1000 + i for i in idx]
    if table is IR:
        return [30000 + unit * 1000 + i for i in idx]
    if table is CO:
        return [(i + unit) % 3 == 0 for i in idx]
    return [(i * unit) % 5 in (1, 2) for i in idx]


def server_context() -> ModbusServerContext:
    """Units 1, 2, 7 with distinct, known values in all four tables.

    ``ModbusSequentialDataBlock(1, values)``: pymodbus stores the block at address
    1 - 1 = 0, so ``values[0]`` is protocol address 0 (checked by the reads below).
    """
    return ModbusServerContext(
        devices={
            u: ModbusDeviceContext(
                hr=ModbusSequentialDataBlock(1, expected(u, HR, 0, SIZE)),  # type: ignore[no-untyped-call]
                ir=ModbusSequentialDataBlock(1, expected(u, IR, 0, SIZE)),  # type: ignore[no-untyped-call]
                co=ModbusSequentialDataBlock(1, expected(u, CO, 0, SIZE)),  # type: ignore[no-untyped-call]
                di=ModbusSequentialDataBlock(1, expected(u, DI, 0, SIZE)),  # type: ignore[no-untyped-call]
            )
            for u in UNITS
        },
        single=False,
    )


@contextlib.asynccontextmanager
async def pymodbus_tcp(framing: Framing, port: int | None = None) -> AsyncIterator[TcpEndpoint]:
    """A pymodbus ModbusTcpServer (MBAP, or RTU framing) on a free port."""
    port = port or free_port()
    framer = FramerType.SOCKET if framing is Framing.MBAP else FramerType.RTU
    server = ModbusTcpServer(server_context(), framer=framer, address=(HOST, port))
    await server.serve_forever(background=True)
    try:
        yield TcpEndpoint(HOST, port, framing)
    finally:
        await server.shutdown()  # type: ignore[no-untyped-call]


@pytest.fixture(params=[Framing.MBAP, Framing.RTU], ids=["mbap", "rtu-over-tcp"])
async def pymodbus_endpoint(request: pytest.FixtureRequest) -> AsyncIterator[TcpEndpoint]:
    async with pymodbus_tcp(request.param) as ep:
        yield ep


@pytest.fixture
async def pool() -> AsyncIterator[ConnectionPool]:
    p = ConnectionPool(backoff_initial=0.2, backoff_max=1.0, connect_timeout=2.0)
    yield p
    await p.close()


# ---------------------------------------------------------------- scripted raw servers


@dataclass
class Req:
    """One request a raw server received."""

    index: int
    tid: int
    unit: int
    fc: int
    address: int
    count: int


CLOSE = "close"
Action = list[tuple[float, bytes]] | str | None  # (delay s, bytes) to send; CLOSE; no answer


def answer_values(req: Req) -> list[int]:
    """The register values a raw server answers with: 100 × unit + address + i."""
    return [(req.unit * 100 + req.address + i) & 0xFFFF for i in range(req.count)]


def regs_pdu(fc: int, values: list[int], byte_count: int | None = None) -> bytes:
    n = 2 * len(values) if byte_count is None else byte_count
    return struct.pack(f">BB{len(values)}H", fc, n, *values)


def rtu_frame(unit: int, body: bytes) -> bytes:
    """RTU frame with the CRC computed by pymodbus (an independent implementation)."""
    frame = bytes((unit,)) + body
    return frame + FramerRTU.compute_CRC(frame).to_bytes(2, "big")


def frame_for(framing: Framing, req: Req, body: bytes, unit: int | None = None) -> bytes:
    unit = req.unit if unit is None else unit
    if framing is Framing.MBAP:
        return struct.pack(">HHHB", req.tid, 0, len(body) + 1, unit) + body
    return rtu_frame(unit, body)


def good(framing: Framing, req: Req) -> bytes:
    return frame_for(framing, req, regs_pdu(req.fc, answer_values(req)))


@dataclass
class RawServer:
    """A TCP server on 127.0.0.1 that answers each request as ``policy`` says."""

    framing: Framing
    policy: Callable[[Req], Action]
    port: int = 0
    received: list[Req] = field(default_factory=list)
    outstanding: int = 0
    max_outstanding: int = 0
    connections: int = 0
    request_seen: asyncio.Event = field(default_factory=asyncio.Event)
    _server: asyncio.Server | None = None
    _writers: list[asyncio.StreamWriter] = field(default_factory=list)
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)

    @property
    def endpoint(self) -> TcpEndpoint:
        return TcpEndpoint(HOST, self.port, self.framing)

    async def _read(self, reader: asyncio.StreamReader) -> tuple[int, int, bytes]:
        if self.framing is Framing.MBAP:
            tid, _, length, unit = struct.unpack(">HHHB", await reader.readexactly(7))
            return tid, unit, await reader.readexactly(length - 1)
        frame = await reader.readexactly(8)  # reads only: unit, fc, address, count, CRC
        assert FramerRTU.compute_CRC(frame[:6]).to_bytes(2, "big") == frame[6:]
        return 0, frame[0], frame[1:6]

    async def _send_later(
        self, writer: asyncio.StreamWriter, actions: list[tuple[float, bytes]]
    ) -> None:
        for delay, data in actions:
            await asyncio.sleep(delay)
            writer.write(data)
        self.outstanding -= 1

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self._writers.append(writer)
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
            while True:
                tid, unit, body = await self._read(reader)
                fc, address, count = struct.unpack(">BHH", body[:5])
                req = Req(len(self.received), tid, unit, fc, address, count)
                self.received.append(req)
                self.request_seen.set()
                action = self.policy(req)
                if action == CLOSE:
                    break
                if isinstance(action, list):
                    self.outstanding += 1
                    self.max_outstanding = max(self.max_outstanding, self.outstanding)
                    task = asyncio.create_task(self._send_later(writer, action))
                    self._tasks.add(task)
                    task.add_done_callback(self._tasks.discard)
        writer.close()

    async def __aenter__(self) -> RawServer:
        self._server = await asyncio.start_server(self._handle, HOST, self.port or free_port())
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for task in list(self._tasks):
            task.cancel()
        for w in self._writers:
            w.close()
        await self._server.wait_closed()


def answer_at_once(framing: Framing) -> Callable[[Req], Action]:
    return lambda req: [(0.0, good(framing, req))]


def first_then_good(framing: Framing, first: Callable[[Req], Action]) -> Callable[[Req], Action]:
    """``first`` for request 0, a correct immediate answer for every later one."""
    return lambda req: first(req) if req.index == 0 else [(0.0, good(framing, req))]


async def read_ok(conn: Connection, unit: int = 1, address: int = 10, count: int = 3) -> None:
    """A read that must succeed with the raw servers' values."""
    values = await conn.read(unit, HR, address, count, timeout=2.0)
    assert values == [unit * 100 + address + i for i in range(count)]


BOTH = pytest.mark.parametrize("framing", [Framing.MBAP, Framing.RTU], ids=["mbap", "rtu"])


# ---------------------------------------------------------------- PDU level


def test_crc16_matches_spec_example_and_pymodbus() -> None:
    frame = bytes.fromhex("01030000000A")
    assert pdu.rtu_adu(1, bytes.fromhex("030000000A")) == bytes.fromhex("01030000000AC5CD")
    assert FramerRTU.compute_CRC(frame).to_bytes(2, "big") == bytes.fromhex("C5CD")
    assert pdu.crc16(bytes.fromhex("01030000000AC5CD")) == 0  # residue of a correct frame
    for n in range(0, 256, 7):
        data = bytes((i * 37 + n) & 0xFF for i in range(n))
        assert pdu.crc16(data).to_bytes(2, "little") == FramerRTU.compute_CRC(data).to_bytes(
            2, "big"
        )


def test_request_pdus_match_spec_examples() -> None:
    # V1.1b3 §6.3: read holding registers 108-110 → 03 006B 0003
    assert pdu.read_request(3, 0x6B, 3).pdu == bytes.fromhex("03006B0003")
    # §6.5: write coil 173 ON → 05 00AC FF00
    assert pdu.write_coils_request(0xAC, [True]).pdu == bytes.fromhex("0500ACFF00")
    # §6.6: write register 2 = 3 → 06 0001 0003
    assert pdu.write_registers_request(1, [3]).pdu == bytes.fromhex("0600010003")
    # §6.11: 10 coils from 20: CD 01
    coils = [True, False, True, True, False, False, True, True, True, False]
    assert pdu.write_coils_request(0x13, coils).pdu == bytes.fromhex("0F0013000A02CD01")
    # §6.12: registers 2-3 = 000A 0102
    assert pdu.write_registers_request(1, [0x0A, 0x0102]).pdu == bytes.fromhex(
        "100001000204000A0102"
    )
    assert pdu.mbap_adu(0x1234, 9, b"\x03\x00\x00\x00\x01") == bytes.fromhex(
        "123400000006090300000001"
    )


def test_response_parsing_matches_spec_examples() -> None:
    # §6.1: read coils 20-38 → 01 03 CD 6B 05
    bits = pdu.read_request(1, 0x13, 0x13).parse(bytes.fromhex("0103CD6B05"), 0, 5)
    assert bits == [bool(0x05_6B_CD >> i & 1) for i in range(19)]
    regs = pdu.read_request(3, 0x6B, 3).parse(bytes.fromhex("0306022B00000064"), 0, 8)
    assert regs == [0x022B, 0, 0x64]
    with pytest.raises(ModbusExceptionError) as ei:
        pdu.read_request(4, 0, 1).parse(bytes.fromhex("8402"), 0, 2)
    assert (ei.value.function_code, ei.value.exception_code) == (4, 2)
    assert ei.value.name == "ILLEGAL DATA ADDRESS"
    with pytest.raises(ModbusFrameError, match="byte count") as ei:
        pdu.read_request(3, 0, 2).parse(bytes.fromhex("030200010002"), 0, 6)
    assert ei.value.kind is FrameErrorKind.SHORT
    with pytest.raises(ModbusFrameError, match="function code") as ei:
        pdu.read_request(3, 0, 1).parse(bytes.fromhex("04020001"), 0, 4)
    assert ei.value.kind is FrameErrorKind.WRONG_FUNCTION
    with pytest.raises(ModbusFrameError, match="echo") as ei:
        pdu.write_registers_request(5, [1, 2]).parse(bytes.fromhex("1000050003"), 0, 5)
    assert ei.value.kind is FrameErrorKind.GARBLED
    assert pdu.write_registers_request(5, [1, 2]).parse(bytes.fromhex("1000050002"), 0, 5) is None


def test_exception_names() -> None:
    names = {code: ModbusExceptionError(3, code).name for code in (1, 2, 3, 4, 5, 6, 10, 11)}
    assert names == {
        1: "ILLEGAL FUNCTION",
        2: "ILLEGAL DATA ADDRESS",
        3: "ILLEGAL DATA VALUE",
        4: "SERVER DEVICE FAILURE",
        5: "ACKNOWLEDGE",
        6: "SERVER DEVICE BUSY",
        10: "GATEWAY PATH UNAVAILABLE",
        11: "GATEWAY TARGET DEVICE FAILED TO RESPOND",
    }


@pytest.mark.parametrize(
    "build",
    [
        lambda: pdu.read_request(3, 0, 126),
        lambda: pdu.read_request(4, 0, 0),
        lambda: pdu.read_request(1, 0, 2001),
        lambda: pdu.read_request(3, 65535, 2),
        lambda: pdu.read_request(7, 0, 1),
        lambda: pdu.write_registers_request(0, [0] * 124),
        lambda: pdu.write_registers_request(0, []),
        lambda: pdu.write_registers_request(0, [65536]),
        lambda: pdu.write_coils_request(0, [True] * 1969),
    ],
)
def test_limits_are_enforced(build: Callable[[], object]) -> None:
    with pytest.raises(ValueError, match=r"outside|not a read"):
        build()


def test_limits_at_the_maximum_are_accepted() -> None:
    assert pdu.read_request(3, 65535 - 124, 125).count == 125
    assert pdu.read_request(2, 0, 2000).count == 2000
    assert len(pdu.write_registers_request(0, [1] * 123).pdu) == 6 + 246
    assert len(pdu.write_coils_request(0, [True] * 1968).pdu) == 6 + 246


def test_rtu_frame_length_and_silence() -> None:
    assert pdu.rtu_response_length(bytes.fromhex("0103CD")) == 5 + 0xCD
    assert pdu.rtu_response_length(bytes.fromhex("010600")) == 8
    assert pdu.rtu_response_length(bytes.fromhex("018302")) == 5
    assert pdu.rtu_response_length(bytes.fromhex("012B00")) is None
    assert pdu.rtu_silence(115200) == 0.00175
    assert pdu.rtu_silence(9600, 8, "E", 1) == pytest.approx(3.5 * 11 / 9600)


# ---------------------------------------------------------------- pymodbus servers


async def test_reads_all_tables_of_several_units_on_one_connection(
    pymodbus_endpoint: TcpEndpoint, pool: ConnectionPool
) -> None:
    conn = pool.get(pymodbus_endpoint)
    assert not conn.connected
    for unit in UNITS:
        for table in Table:
            for address, count in ((0, 1), (3, 17)):
                got = await conn.read(unit, table, address, count, timeout=2.0)
                assert got == expected(unit, table, address, count), (unit, table, address)
    assert await conn.read(2, HR, 100, 125, timeout=2.0) == expected(2, HR, 100, 125)
    assert await conn.read(7, DI, 5, 2000, timeout=2.0) == expected(7, DI, 5, 2000)
    assert conn.connected
    s = conn.stats
    assert (s.connects, s.requests, s.responses, s.timeouts, s.frame_errors) == (1, 26, 26, 0, 0)


async def test_writes_are_read_back(pymodbus_endpoint: TcpEndpoint, pool: ConnectionPool) -> None:
    conn = pool.get(pymodbus_endpoint)
    await conn.write_registers(2, 40, [0xBEEF], timeout=2.0)  # FC 6
    await conn.write_registers(2, 50, list(range(60000, 60123)), timeout=2.0)  # FC 16, max
    await conn.write_coils(2, 7, [not expected(2, CO, 7, 1)[0]], timeout=2.0)  # FC 5
    pattern = [i % 3 == 1 for i in range(30)]
    await conn.write_coils(2, 100, pattern, timeout=2.0)  # FC 15
    assert await conn.read(2, HR, 39, 3, timeout=2.0) == [2039, 0xBEEF, 2041]
    assert await conn.read(2, HR, 50, 123, timeout=2.0) == list(range(60000, 60123))
    assert await conn.read(2, CO, 7, 1, timeout=2.0) == [not expected(2, CO, 7, 1)[0]]
    assert await conn.read(2, CO, 100, 30, timeout=2.0) == pattern
    assert await conn.read(1, HR, 40, 1, timeout=2.0) == [1040]  # other unit untouched
    assert conn.stats.responses == 9


async def test_exception_response(pymodbus_endpoint: TcpEndpoint, pool: ConnectionPool) -> None:
    conn = pool.get(pymodbus_endpoint)
    with pytest.raises(ModbusExceptionError) as ei:
        await conn.read(1, HR, SIZE - 2, 5, timeout=2.0)  # past the end of the block
    assert (ei.value.function_code, ei.value.exception_code) == (3, 2)
    assert ei.value.name == "ILLEGAL DATA ADDRESS"
    assert await conn.read(1, IR, 0, 2, timeout=2.0) == expected(1, IR, 0, 2)
    assert (conn.stats.exceptions, conn.stats.responses) == (1, 1)


async def test_server_stopped_and_restarted_recovers_by_itself() -> None:
    pool = ConnectionPool(backoff_initial=0.3, backoff_max=0.6, connect_timeout=1.0)
    port = free_port()
    try:
        async with pymodbus_tcp(Framing.MBAP, port) as ep:
            conn = pool.get(ep)
            assert await conn.read(1, HR, 0, 2, timeout=1.0) == [1000, 1001]
        # stopped: the loss (not a timeout), then fast failures while backing off
        with pytest.raises(ModbusConnectionError):
            await conn.read(1, HR, 0, 2, timeout=30.0)
        assert not conn.connected
        rejected = conn.stats.rejected
        with pytest.raises(ModbusConnectionError) as ei:
            await conn.read(1, HR, 0, 2, timeout=1.0)
        assert 0 < ei.value.retry_in <= 0.6
        assert conn.stats.rejected == rejected + 1
        async with pymodbus_tcp(Framing.MBAP, port):
            errors: list[ModbusError] = []
            for _ in range(100):
                try:
                    assert await conn.read(1, HR, 0, 2, timeout=1.0) == [1000, 1001]
                    break
                except ModbusConnectionError as e:
                    errors.append(e)
                    await asyncio.sleep(0.05)
            else:
                pytest.fail(f"no recovery: {errors[-1]}")
            assert conn.stats.connects == 2
            assert conn.stats.disconnects == 1
            assert await conn.read(2, HR, 0, 1, timeout=1.0) == [2000]
    finally:
        await pool.close()


async def test_refused_port_and_backoff_schedule() -> None:
    pool = ConnectionPool(backoff_initial=0.1, backoff_max=0.4, connect_timeout=1.0)
    conn = pool.get(TcpEndpoint(HOST, free_port()))
    try:
        for cap in (0.1, 0.2, 0.4, 0.4):
            with pytest.raises(ModbusConnectionError, match="connect failed"):
                await conn.read(1, HR, 0, 1, timeout=1.0)
            with pytest.raises(ModbusConnectionError) as ei:
                await conn.read(1, HR, 0, 1, timeout=1.0)  # at once: no connect attempt
            assert cap / 2 - 0.05 < ei.value.retry_in <= cap
            await asyncio.sleep(ei.value.retry_in + 0.01)
        s = conn.stats
        assert (s.connect_failures, s.rejected, s.connects, s.requests) == (4, 4, 0, 4)
    finally:
        await pool.close()


async def test_connect_timeout_bounds_a_hanging_connect() -> None:
    """A listener whose accept queue is full drops SYNs: the connect hangs."""
    listener = socket.socket()
    listener.bind((HOST, 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    fillers = []
    for _ in range(3):
        s = socket.socket()
        s.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            s.connect((HOST, port))
        fillers.append(s)
    pool = ConnectionPool(connect_timeout=0.3)
    try:
        conn = pool.get(TcpEndpoint(HOST, port))
        with pytest.raises(ModbusTimeoutError, match="connecting"):
            await conn.read(1, HR, 0, 1, timeout=0.1)  # its own timeout, connect goes on
        with pytest.raises(ModbusConnectionError, match="connect timed out") as ei:
            await conn.read(1, HR, 0, 1, timeout=5.0)  # waits for the same connect
        assert ei.value.retry_in > 0
        st = conn.stats
        assert (st.connect_failures, st.timeouts, st.connects) == (1, 1, 0)
    finally:
        await pool.close()
        for f in fillers:
            f.close()
        listener.close()


async def test_slow_endpoint_does_not_delay_another(pool: ConnectionPool) -> None:
    order: list[str] = []

    async def timed(name: str, coro: asyncio.Future[object] | asyncio.Task[object]) -> None:
        await coro
        order.append(name)

    def slow_policy(req: Req) -> Action:
        return [(0.5, good(Framing.MBAP, req))]

    async with RawServer(Framing.MBAP, slow_policy) as slow, pymodbus_tcp(Framing.MBAP) as fast:
        slow_conn, fast_conn = pool.get(slow.endpoint), pool.get(fast)
        slow_task = asyncio.create_task(timed("slow", read_ok(slow_conn)))  # type: ignore[arg-type]
        await asyncio.sleep(0)  # the slow request goes out first
        for i in range(10):
            await fast_conn.read(1, HR, i, 1, timeout=2.0)
            order.append(f"fast{i}")
        await slow_task
    assert order == [f"fast{i}" for i in range(10)] + ["slow"]


# ---------------------------------------------------------------- scripted servers


@BOTH
async def test_timeout_then_next_request_works(framing: Framing, pool: ConnectionPool) -> None:
    async with RawServer(framing, first_then_good(framing, lambda req: None)) as srv:
        conn = pool.get(srv.endpoint)
        with pytest.raises(ModbusTimeoutError):
            await conn.read(1, HR, 10, 3, timeout=0.2)
        await read_ok(conn)
        assert (conn.stats.timeouts, conn.stats.responses, conn.stats.connects) == (1, 1, 1)


async def test_late_mbap_answer_is_discarded(pool: ConnectionPool) -> None:
    late = first_then_good(Framing.MBAP, lambda req: [(0.4, good(Framing.MBAP, req))])
    async with RawServer(Framing.MBAP, late) as srv:
        conn = pool.get(srv.endpoint)
        with pytest.raises(ModbusTimeoutError):
            await conn.read(1, HR, 10, 3, timeout=0.1)
        await read_ok(conn, address=20)  # answered before the late one arrives
        await asyncio.sleep(0.5)
        assert conn.stats.discarded == 1
        await read_ok(conn, address=30)
        assert (conn.stats.timeouts, conn.stats.responses, conn.stats.connects) == (1, 2, 1)


async def test_late_rtu_answer_is_flushed_not_taken(pool: ConnectionPool) -> None:
    late = first_then_good(Framing.RTU, lambda req: [(0.2, good(Framing.RTU, req))])
    async with RawServer(Framing.RTU, late) as srv:
        conn = pool.get(srv.endpoint)
        with pytest.raises(ModbusTimeoutError):
            await conn.read(1, HR, 10, 3, timeout=0.05)
        await asyncio.sleep(0.3)  # the late answer arrives between requests
        await read_ok(conn, address=40)
        assert conn.stats.discarded == 1


@BOTH
async def test_wrong_unit_id_is_a_frame_error(framing: Framing, pool: ConnectionPool) -> None:
    wrong = first_then_good(
        framing, lambda req: [(0.0, frame_for(framing, req, regs_pdu(3, [1, 2, 3]), unit=9))]
    )
    async with RawServer(framing, wrong) as srv:
        conn = pool.get(srv.endpoint)
        with pytest.raises(ModbusFrameError, match="unit 9") as ei:
            await conn.read(1, HR, 10, 3, timeout=1.0)
        assert ei.value.kind is FrameErrorKind.WRONG_UNIT
        await read_ok(conn)
        assert (conn.stats.frame_errors, conn.stats.responses) == (1, 1)


@BOTH
async def test_wrong_function_code_is_a_frame_error(framing: Framing, pool: ConnectionPool) -> None:
    wrong = first_then_good(
        framing, lambda req: [(0.0, frame_for(framing, req, regs_pdu(4, answer_values(req))))]
    )
    async with RawServer(framing, wrong) as srv:
        conn = pool.get(srv.endpoint)
        with pytest.raises(ModbusFrameError, match="function code 4") as ei:
            await conn.read(1, HR, 10, 3, timeout=1.0)
        assert ei.value.kind is FrameErrorKind.WRONG_FUNCTION
        await read_ok(conn)
        assert conn.stats.frame_errors == 1


@BOTH
async def test_wrong_byte_count_is_a_frame_error(framing: Framing, pool: ConnectionPool) -> None:
    short = first_then_good(
        framing, lambda req: [(0.0, frame_for(framing, req, regs_pdu(3, answer_values(req)[:-1])))]
    )
    async with RawServer(framing, short) as srv:
        conn = pool.get(srv.endpoint)
        with pytest.raises(ModbusFrameError, match="byte count 4, expected 6") as ei:
            await conn.read(1, HR, 10, 3, timeout=1.0)
        assert ei.value.kind is FrameErrorKind.SHORT
        await read_ok(conn)
        assert (conn.stats.frame_errors, conn.stats.responses) == (1, 1)


@BOTH
async def test_truncated_answer_is_a_frame_error(framing: Framing, pool: ConnectionPool) -> None:
    truncated = first_then_good(framing, lambda req: [(0.0, good(framing, req)[:-3])])
    async with RawServer(framing, truncated) as srv:
        conn = pool.get(srv.endpoint)
        with pytest.raises(ModbusFrameError, match="incomplete") as ei:
            await conn.read(1, HR, 10, 3, timeout=0.3)
        assert ei.value.kind is FrameErrorKind.SHORT
        await read_ok(conn)  # MBAP: on a fresh connection, without backoff
        assert (conn.stats.frame_errors, conn.stats.timeouts, conn.stats.responses) == (1, 0, 1)
        assert conn.stats.connects == srv.connections == (2 if framing is Framing.MBAP else 1)


async def test_bad_crc_is_a_frame_error(pool: ConnectionPool) -> None:
    def bad_crc(req: Req) -> Action:
        frame = bytearray(good(Framing.RTU, req))
        frame[-1] ^= 0xFF
        return [(0.0, bytes(frame))]

    async with RawServer(Framing.RTU, first_then_good(Framing.RTU, bad_crc)) as srv:
        conn = pool.get(srv.endpoint)
        with pytest.raises(ModbusFrameError, match="CRC") as ei:
            await conn.read(1, HR, 10, 3, timeout=1.0)
        assert ei.value.kind is FrameErrorKind.CRC
        await read_ok(conn)
        assert (conn.stats.frame_errors, conn.stats.responses) == (1, 1)


async def test_garbled_rtu_frame_then_line_noise(pool: ConnectionPool) -> None:
    # an unknown function code cannot be delimited; the rest of the noise follows later
    noise = first_then_good(
        Framing.RTU, lambda req: [(0.0, b"\x01\x41\x02\x03"), (0.05, b"\x99" * 20)]
    )
    async with RawServer(Framing.RTU, noise) as srv:
        conn = pool.get(srv.endpoint)
        with pytest.raises(ModbusFrameError, match="garbled") as ei:
            await conn.read(1, HR, 10, 3, timeout=1.0)
        assert ei.value.kind is FrameErrorKind.GARBLED
        await asyncio.sleep(0.1)
        await read_ok(conn)
        assert conn.stats.discarded == 1


async def test_garbled_mbap_header_drops_the_connection(pool: ConnectionPool) -> None:
    garbled = first_then_good(
        Framing.MBAP, lambda req: [(0.0, struct.pack(">HHHB", req.tid, 7, 5, 1) + b"\x03\x02\x00")]
    )
    async with RawServer(Framing.MBAP, garbled) as srv:
        conn = pool.get(srv.endpoint)
        with pytest.raises(ModbusFrameError, match="garbled MBAP header") as ei:
            await conn.read(1, HR, 10, 1, timeout=1.0)
        assert ei.value.kind is FrameErrorKind.GARBLED
        await read_ok(conn)
        assert (conn.stats.connects, conn.stats.rejected) == (2, 0)


@BOTH
async def test_connection_closed_mid_request(framing: Framing, pool: ConnectionPool) -> None:
    async with RawServer(framing, first_then_good(framing, lambda req: CLOSE)) as srv:
        conn = pool.get(srv.endpoint)
        started = time.monotonic()
        with pytest.raises(ModbusConnectionError, match="closed by the peer"):
            await conn.read(1, HR, 10, 3, timeout=30.0)
        assert time.monotonic() - started < 10  # the loss, not the 30 s timeout, ended it
        with pytest.raises(ModbusConnectionError) as ei:
            await conn.read(1, HR, 10, 3, timeout=1.0)
        assert ei.value.retry_in > 0
        await asyncio.sleep(ei.value.retry_in + 0.01)
        await read_ok(conn)
        s = conn.stats
        assert (s.connects, s.disconnects, s.rejected, s.responses) == (2, 1, 1, 1)


async def test_mbap_answers_matched_by_transaction_id() -> None:
    held: list[Req] = []

    def reverse_order(req: Req) -> Action:
        held.append(req)
        if len(held) < 3:
            return []
        return [(0.0, good(Framing.MBAP, r)) for r in reversed(held)]

    pool = ConnectionPool(max_inflight=3)
    try:
        async with RawServer(Framing.MBAP, reverse_order) as srv:
            conn = pool.get(srv.endpoint)
            await asyncio.gather(*(read_ok(conn, unit=u, address=10 * u) for u in (1, 2, 3)))
            assert srv.max_outstanding == 3
            assert [r.tid for r in held] == [1, 2, 3]
    finally:
        await pool.close()


async def test_mbap_default_is_one_request_in_flight(pool: ConnectionPool) -> None:
    def slow(req: Req) -> Action:
        return [(0.05, good(Framing.MBAP, req))]

    async with RawServer(Framing.MBAP, slow) as srv:
        conn = pool.get(srv.endpoint)
        await asyncio.gather(*(read_ok(conn, unit=u) for u in (1, 2, 3)))
        assert srv.max_outstanding == 1
        assert len(srv.received) == 3


async def test_queued_requests_fail_when_closed() -> None:
    pool = ConnectionPool()

    def slow(req: Req) -> Action:
        return [(0.3, good(Framing.RTU, req))]

    async with RawServer(Framing.RTU, slow) as srv:
        conn = pool.get(srv.endpoint)
        calls = [asyncio.create_task(conn.read(u, HR, 0, 1, timeout=5.0)) for u in (1, 2, 3)]
        await srv.request_seen.wait()
        await pool.close()
        results = await asyncio.gather(*calls, return_exceptions=True)
        assert all(isinstance(r, ModbusConnectionError) for r in results), results
        assert len(srv.received) == 1  # the queued ones were never sent
        assert conn.stats.connects == 1


async def test_rtu_sends_one_request_at_a_time() -> None:
    pool = ConnectionPool(max_inflight=4)  # ignored for RTU: one bus, one request
    try:
        slow = lambda req: [(0.05, good(Framing.RTU, req))]  # noqa: E731
        async with RawServer(Framing.RTU, slow) as srv:
            conn = pool.get(srv.endpoint)
            await asyncio.gather(*(read_ok(conn, unit=u) for u in (1, 2, 3, 4)))
            assert srv.max_outstanding == 1
            assert sorted(r.unit for r in srv.received) == [1, 2, 3, 4]
    finally:
        await pool.close()


async def test_queued_request_times_out_behind_a_slow_one(pool: ConnectionPool) -> None:
    slow = lambda req: [(0.5, good(Framing.RTU, req))]  # noqa: E731
    async with RawServer(Framing.RTU, slow) as srv:
        conn = pool.get(srv.endpoint)
        first = asyncio.create_task(read_ok(conn, unit=1))
        await asyncio.sleep(0.05)
        with pytest.raises(ModbusTimeoutError, match="queued"):
            await conn.read(2, HR, 0, 1, timeout=0.1)
        await first
        assert len(srv.received) == 1


# ---------------------------------------------------------------- pool


async def test_pool_shares_connections_by_key() -> None:
    pool = ConnectionPool()
    a = pool.get(TcpEndpoint(HOST, 1502))
    assert pool.get(TcpEndpoint(HOST, 1502)) is a
    assert pool.get(TcpEndpoint(HOST, 1502, Framing.RTU)) is not a
    s = pool.get(SerialEndpoint("/dev/ttyX", 9600))
    assert pool.get(SerialEndpoint("/dev/ttyX", 9600)) is s
    with pytest.raises(ValueError, match="already used"):
        pool.get(SerialEndpoint("/dev/ttyX", 19200))
    await pool.close()
    with pytest.raises(RuntimeError):
        pool.get(TcpEndpoint(HOST, 1502))
    with pytest.raises(ModbusConnectionError) as ei:
        await a.read(1, HR, 0, 1, timeout=1.0)
    assert ei.value.retry_in == math.inf


async def test_close_fails_requests_in_flight() -> None:
    pool = ConnectionPool()
    async with RawServer(Framing.MBAP, lambda req: None) as srv:
        conn = pool.get(srv.endpoint)
        pending = asyncio.create_task(conn.read(1, HR, 0, 1, timeout=10.0))
        await srv.request_seen.wait()
        await pool.close()
        with pytest.raises(ModbusConnectionError, match="closed"):
            await pending
        assert not conn.connected


# ---------------------------------------------------------------- serial line (pty pair)


@dataclass
class PtyPair:
    client: str
    server: str
    proc: subprocess.Popen[bytes]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(10)


def start_pty_pair(directory: Path) -> PtyPair:
    """socat linking two ptys: ``client`` for us, ``server`` for pymodbus."""
    socat = shutil.which("socat")
    if socat is None:
        pytest.skip("socat is not installed (apt-get install socat): no pty pair for RTU tests")
    a, b = directory / "ttyA", directory / "ttyB"
    proc = subprocess.Popen(
        [socat, "-d", "-d", f"pty,raw,echo=0,link={a}", f"pty,raw,echo=0,link={b}"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 10
    while not (a.exists() and b.exists()):
        if time.monotonic() > deadline or proc.poll() is not None:
            proc.kill()
            proc.wait()
            raise RuntimeError("socat did not create the pty pair")
        time.sleep(0.02)
    return PtyPair(str(a), str(b), proc)


@pytest.fixture
def pty_pair(tmp_path: Path) -> Iterator[PtyPair]:
    pair = start_pty_pair(tmp_path)
    yield pair
    pair.stop()


@contextlib.asynccontextmanager
async def pymodbus_serial(port: str) -> AsyncIterator[None]:
    server = ModbusSerialServer(server_context(), framer=FramerType.RTU, port=port, baudrate=115200)
    await server.serve_forever(background=True)
    try:
        yield
    finally:
        await server.shutdown()  # type: ignore[no-untyped-call]


async def test_serial_rtu_reads_writes_exceptions(pty_pair: PtyPair, pool: ConnectionPool) -> None:
    async with pymodbus_serial(pty_pair.server):
        conn = pool.get(SerialEndpoint(pty_pair.client, baudrate=115200))
        for unit in UNITS:
            for table in Table:
                got = await conn.read(unit, table, 5, 20, timeout=2.0)
                assert got == expected(unit, table, 5, 20), (unit, table)
        await conn.write_registers(7, 3, [11], timeout=2.0)
        await conn.write_registers(7, 4, [12, 13, 14], timeout=2.0)
        await conn.write_coils(7, 0, [True], timeout=2.0)
        await conn.write_coils(7, 1, [False, True, True], timeout=2.0)
        assert await conn.read(7, HR, 2, 5, timeout=2.0) == [7002, 11, 12, 13, 14]
        assert await conn.read(7, CO, 0, 4, timeout=2.0) == [True, False, True, True]
        with pytest.raises(ModbusExceptionError) as ei:
            await conn.read(7, IR, SIZE - 1, 2, timeout=2.0)
        assert ei.value.name == "ILLEGAL DATA ADDRESS"
        assert await conn.read(1, HR, 0, 1, timeout=2.0) == [1000]
        assert (conn.stats.connects, conn.stats.frame_errors, conn.stats.timeouts) == (1, 0, 0)


async def test_serial_unanswered_unit_times_out_then_line_recovers(
    pty_pair: PtyPair, pool: ConnectionPool
) -> None:
    async with pymodbus_serial(pty_pair.server):
        conn = pool.get(SerialEndpoint(pty_pair.client, baudrate=115200))
        assert await conn.read(2, HR, 0, 2, timeout=2.0) == [2000, 2001]
        with pytest.raises(ModbusError):  # no unit 99 on the bus
            await conn.read(99, HR, 0, 2, timeout=0.3)
        assert await conn.read(2, HR, 0, 2, timeout=2.0) == [2000, 2001]


async def test_serial_port_gone_then_back(tmp_path: Path) -> None:
    pool = ConnectionPool(backoff_initial=0.2, backoff_max=0.4)
    pair = start_pty_pair(tmp_path)
    try:
        async with pymodbus_serial(pair.server):
            conn = pool.get(SerialEndpoint(pair.client, baudrate=115200))
            assert await conn.read(1, HR, 0, 1, timeout=2.0) == [1000]
            pair.stop()  # the "USB adapter" is unplugged
            with pytest.raises(ModbusConnectionError):  # the loss, not a timeout
                await conn.read(1, HR, 0, 1, timeout=30.0)
            assert not conn.connected
        pair = start_pty_pair(tmp_path)  # plugged in again, same device path
        async with pymodbus_serial(pair.server):
            for _ in range(100):
                with contextlib.suppress(ModbusConnectionError):
                    assert await conn.read(1, HR, 0, 1, timeout=2.0) == [1000]
                    break
                await asyncio.sleep(0.05)
            else:
                pytest.fail("serial endpoint did not recover")
            assert conn.stats.connects == 2
    finally:
        await pool.close()
        pair.stop()


# ---------------------------------------------------------------- late RTU answers
#
# RTU frames carry no transaction id: an answer that arrives after its request timed
# out has the same shape as the answer to the next request (unit, function code, byte
# count). The link must never hand it to the next caller. The scripted devices below
# answer each register with its own address, so a value tells which request it answers.


class SerialScript(asyncio.Protocol):
    """The device end of a pty pair: reads 8-byte RTU read requests, answers as
    ``policy`` says (like :class:`RawServer`, delays relative to the request)."""

    def __init__(self, policy: Callable[[Req], Action]) -> None:
        self.policy = policy
        self.received: list[Req] = []
        self.transport: asyncio.Transport | None = None
        self.timers: list[asyncio.TimerHandle] = []
        self._buf = bytearray()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self._buf += data
        while len(self._buf) >= 8:
            frame = bytes(self._buf[:8])
            del self._buf[:8]
            unit, fc, address, count = struct.unpack(">BBHH", frame[:6])
            req = Req(len(self.received), 0, unit, fc, address, count)
            self.received.append(req)
            action = self.policy(req)
            if isinstance(action, list):
                loop, at = asyncio.get_running_loop(), 0.0
                for delay, out in action:
                    at += delay
                    assert self.transport is not None
                    self.timers.append(loop.call_later(at, self.transport.write, out))


@contextlib.asynccontextmanager
async def rtu_device(
    line: str, policy: Callable[[Req], Action], tmp_path: Path
) -> AsyncIterator[tuple[TcpEndpoint | SerialEndpoint, list[Req]]]:
    """A scripted RTU device: behind an RTU-over-TCP server, or on a pty pair."""
    if line == "rtu-over-tcp":
        async with RawServer(Framing.RTU, policy) as srv:
            yield srv.endpoint, srv.received
        return
    pair = start_pty_pair(tmp_path)
    device = SerialScript(policy)
    transport, _ = await serial_asyncio_fast.create_serial_connection(
        asyncio.get_running_loop(), lambda: device, pair.server, baudrate=115200
    )
    try:
        yield SerialEndpoint(pair.client, baudrate=115200), device.received
    finally:
        for timer in device.timers:
            timer.cancel()
        transport.close()
        pair.stop()


RTU_LINES = pytest.mark.parametrize("line", ["rtu-over-tcp", "serial"])


def at_address(req: Req, delay: float) -> Action:
    """The correct answer, each register's value equal to its address, after ``delay`` s."""
    values = [req.address + i for i in range(req.count)]
    return [(delay, rtu_frame(req.unit, regs_pdu(req.fc, values)))]


async def outcome(conn: Connection, address: int, timeout: float) -> list[int] | str:  # noqa: ASYNC109
    """One uint16 holding register of unit 1, or the name of the error."""
    try:
        return list(await conn.read(1, HR, address, 1, timeout=timeout))
    except ModbusError as e:
        return type(e).__name__


@RTU_LINES
async def test_late_rtu_answers_are_never_taken_for_the_next_request(
    line: str, tmp_path: Path, pool: ConnectionPool
) -> None:
    """The tester's case: every answer 330 ms late, timeout 300 ms, retries 0, three
    1-register reads at 0, 100, 200. Before the fix the answer to request N was taken
    as the answer to N+1: ``[timeout, [0], [100]]`` every cycle."""
    async with rtu_device(line, lambda req: at_address(req, 0.33), tmp_path) as (ep, received):
        conn = pool.get(ep)
        for _cycle in range(2):
            got = [await outcome(conn, address, 0.3) for address in (0, 100, 200)]
            assert got == ["ModbusTimeoutError"] * 3
        await asyncio.sleep(0.4)  # the last late answer arrives and is discarded
        assert conn.stats.discarded == 6  # every late answer, none taken
        assert await conn.read(1, HR, 300, 1, timeout=1.0) == [300]  # in time: its own
        assert [r.address for r in received] == [0, 100, 200, 0, 100, 200, 300]
        s = conn.stats
        assert (s.timeouts, s.responses, s.frame_errors, s.connects) == (6, 1, 0, 1)


@RTU_LINES
async def test_answer_after_a_late_one_is_its_own(
    line: str, tmp_path: Path, pool: ConnectionPool
) -> None:
    """Only the first answer is late (330 ms for a 300 ms timeout), the others come
    after 100 ms: the late one must be discarded, not handed to the read of 100."""

    def first_late(req: Req) -> Action:
        return at_address(req, 0.33 if req.index == 0 else 0.1)

    async with rtu_device(line, first_late, tmp_path) as (ep, received):
        conn = pool.get(ep)
        got = [await outcome(conn, address, 0.3) for address in (0, 100, 200)]
        assert got == ["ModbusTimeoutError", [100], [200]]
        assert conn.stats.discarded == 1
        assert len(received) == 3


@RTU_LINES
async def test_late_answer_in_the_next_window_is_detected(
    line: str, tmp_path: Path, pool: ConnectionPool
) -> None:
    """A gateway that queues requests: the first answer comes 700 ms after its request
    (timeout 400 ms, late-answer horizon 600 ms: the guard ran out), the queued second
    request is answered 30 ms after it. Two frames arrive in the second request's
    window: it must fail rather than take the first (which answers request 0), and
    the third request is in step again. Before the fix the second got ``[0]``."""
    loop = asyncio.get_running_loop()
    last = [0.0]

    def queueing(req: Req) -> Action:
        now = loop.time()
        at = now + 0.7 if req.index == 0 else max(now, last[0]) + 0.03
        last[0] = at
        return at_address(req, at - now)

    async with rtu_device(line, queueing, tmp_path) as (ep, _):
        conn = pool.get(ep)
        got = [await outcome(conn, address, 0.4) for address in (0, 100, 200)]
        assert got == ["ModbusTimeoutError", "ModbusFrameError", [200]]
        assert conn.stats.discarded == 2


async def test_late_answer_guard_counts_against_the_next_request(pool: ConnectionPool) -> None:
    loop = asyncio.get_running_loop()
    async with (
        RawServer(Framing.RTU, first_then_good(Framing.RTU, lambda req: None)) as srv,
        pymodbus_tcp(Framing.MBAP) as other,
    ):
        conn = pool.get(srv.endpoint)
        with pytest.raises(ModbusTimeoutError, match="no answer"):
            await conn.read(1, HR, 10, 3, timeout=0.4)  # guard: 0.2 s without input
        expired = loop.time()
        # another endpoint is not held up by this one's guard
        assert await pool.get(other).read(1, HR, 0, 1, timeout=1.0) == [1000]
        assert loop.time() - expired < 0.15
        with pytest.raises(ModbusTimeoutError, match="late-answer guard"):
            await conn.read(1, HR, 10, 3, timeout=0.05)
        assert len(srv.received) == 1  # never sent
        await read_ok(conn)
        assert len(srv.received) == 2
        assert srv.received[1].index == 1
        assert loop.time() - expired >= 0.2
        assert (conn.stats.timeouts, conn.stats.responses) == (2, 1)


async def test_two_frames_for_one_request_are_not_taken(pool: ConnectionPool) -> None:
    double = first_then_good(Framing.RTU, lambda req: [(0.0, good(Framing.RTU, req) * 2)])
    async with RawServer(Framing.RTU, double) as srv:
        conn = pool.get(srv.endpoint)
        with pytest.raises(ModbusFrameError, match="more than one frame"):
            await conn.read(1, HR, 10, 3, timeout=1.0)
        await read_ok(conn)
        assert (conn.stats.frame_errors, conn.stats.responses) == (1, 1)


async def test_answer_incomplete_at_the_deadline_completes_in_the_guard(
    pool: ConnectionPool,
) -> None:
    split = first_then_good(
        Framing.RTU,
        lambda req: [(0.0, good(Framing.RTU, req)[:4]), (0.35, good(Framing.RTU, req)[4:])],
    )
    async with RawServer(Framing.RTU, split) as srv:
        conn = pool.get(srv.endpoint)
        with pytest.raises(ModbusFrameError, match="incomplete") as ei:
            await conn.read(1, HR, 10, 3, timeout=0.3)
        assert ei.value.kind is FrameErrorKind.SHORT
        await read_ok(conn, address=20)  # sent after the rest of the late answer
        assert conn.stats.discarded == 1
        assert [r.address for r in srv.received] == [10, 20]


@RTU_LINES
async def test_poller_publishes_no_value_from_a_late_answer(line: str, tmp_path: Path) -> None:
    """The tester's reading: the agent published ``{"at100": 0, "at200": 100}`` with
    good quality; every property must be bad instead, every cycle."""
    async with rtu_device(line, lambda req: at_address(req, 0.33), tmp_path) as (ep, _):

        def prop(address: int) -> PropertySpec:
            return PropertySpec(
                f"at{address}", Visitor(HR, address, 1, RawType.UINT16), ValueType.INT
            )

        spec = DeviceSpec(
            namespace="default", name="late", model="m", endpoint=ep, unit_id=1,
            properties=(prop(0), prop(100), prop(200)),
            options=ModbusOptions(timeout_s=0.3, retries=0),
        )
        pool = ConnectionPool()
        readings: list[Reading] = []
        poller = DevicePoller(spec, pool.get(ep), readings.append, lambda *_: None)
        try:
            for _ in range(2):
                await poller.poll_once()
        finally:
            await pool.close()
        assert [(r.values, r.quality) for r in readings] == [
            ({}, {"at0": "bad", "at100": "bad", "at200": "bad"})
        ] * 2


async def test_answer_to_a_cancelled_call_is_not_taken_by_the_next(pool: ConnectionPool) -> None:
    async with RawServer(Framing.RTU, lambda req: at_address(req, 0.2)) as srv:
        conn = pool.get(srv.endpoint)
        abandoned = asyncio.create_task(conn.read(1, HR, 0, 1, timeout=1.0))
        await srv.request_seen.wait()
        abandoned.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await abandoned
        # sent only once the abandoned request's answer is in (and discarded)
        assert await conn.read(1, HR, 100, 1, timeout=1.0) == [100]
        assert conn.stats.discarded == 1
        assert [r.address for r in srv.received] == [0, 100]
