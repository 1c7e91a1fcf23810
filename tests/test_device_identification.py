"""Read Device Identification (FC 43 / MEI 14, Application Protocol V1.1b3 §6.21).

PDU level: request bytes, parse of normal, continued and every malformed response
(hand-built bytes), RTU frame length, the object naming helper and the simulator's
object selection. Against real servers on 127.0.0.1: pymodbus 3.16 servers in a
thread (tests/support.py ``ModbusServer``: edge's simulator PDU per server) over
MBAP, RTU over TCP and serial RTU on a socat pty pair; a pymodbus server with its own
``identity=`` (pymodbus's encoder); ``run_simulator``; and raw asyncio TCP servers in
the test that answer in two rounds (MoreFollows / NextObjectId) or loop. Every server
a test starts is stopped by the test.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import struct
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest
from pymodbus.framer import FramerType
from pymodbus.framer.rtu import FramerRTU
from pymodbus.pdu.device import ModbusControlBlock, ModbusDeviceIdentification
from pymodbus.server import ModbusTcpServer
from pymodbus.simulator import DataType, SimData, SimDevice
from support import Image, ModbusServer, free_port, start_pty_pair

from edge.config.model import DeviceSpec, Framing, SerialEndpoint, Table, TcpEndpoint
from edge.modbus import pdu
from edge.modbus.client import (
    ConnectionPool,
    FrameErrorKind,
    ModbusExceptionError,
    ModbusFrameError,
    ModbusTimeoutError,
)
from edge.modbus.sim_identification import identification_pdu, identification_response
from edge.modbus.simulator import run_simulator

logging.getLogger("pymodbus").setLevel(logging.CRITICAL)

HOST = "127.0.0.1"
BASIC = {0: b"ACME Instruments", 1: b"PT-100X", 2: b"V2.11"}
REGULAR = {**BASIC, 3: b"https://acme.example", 4: b"Pressure transmitter",
           5: b"PT-100X/4-20", 6: b"pump station 7"}
LONG = {0: b"V" * 100, 1: b"P" * 100, 2: b"1.0", 3: b"U" * 100, 4: b"N" * 60, 5: b"M" * 60,
        6: b"A" * 60}
"""Regular objects of 483 bytes: more than one response holds (246 bytes)."""
IDENTITY = {i: v.decode() for i, v in REGULAR.items()}
BOTH = pytest.mark.parametrize("framing", [Framing.MBAP, Framing.RTU], ids=["mbap", "rtu"])


def response(code: int, objects: dict[int, bytes], *, conformity: int = 0x82, more: int = 0,
             next_id: int = 0, count: int | None = None, mei: int = 0x0E) -> bytes:
    """A hand-built FC 43 / MEI 14 response PDU."""
    body = b"".join(bytes((i, len(v))) + v for i, v in objects.items())
    n = len(objects) if count is None else count
    return bytes((0x2B, mei, code, conformity, more, next_id, n)) + body


@pytest.fixture
async def pool() -> AsyncIterator[ConnectionPool]:
    p = ConnectionPool(backoff_initial=0.2, backoff_max=1.0, connect_timeout=2.0)
    yield p
    await p.close()


# ---------------------------------------------------------------- PDU level


def test_request_pdu_and_limits() -> None:
    req = pdu.device_identification_request(1, 0)
    assert req.pdu == bytes.fromhex("2B0E0100")  # V1.1b3 §6.21 example request
    assert pdu.device_identification_request(4, 0x80).pdu == bytes.fromhex("2B0E0480")
    assert pdu.device_identification_request(1, 0) is req  # cached
    assert repr(req) == "Request(fc=43, mei=14, code=1, object_id=0)"
    for code, object_id in ((0, 0), (5, 0), (1, -1), (1, 256)):
        with pytest.raises(ValueError, match="outside"):
            pdu.device_identification_request(code, object_id)


def test_parse_spec_example() -> None:
    """The basic-stream example of V1.1b3 §6.21 (conformity 0x01, three objects)."""
    raw = (bytes.fromhex("2B0E01010000 03") + b"\x00\x16Company identification"
           + b"\x01\x0fProduct code XX" + b"\x02\x05V2.11")
    part = pdu.device_identification_request(1, 0).parse(raw, 0, len(raw))
    assert part == pdu.DeviceIdentification(
        code=1, conformity_level=0x01, more_follows=False, next_object_id=0,
        objects={0: b"Company identification", 1: b"Product code XX", 2: b"V2.11"})


def test_parse_continued_part_and_offsets() -> None:
    raw = b"junk" + response(2, {3: b"u", 4: b""}, more=0xFF, next_id=5) + b"tail"
    part = pdu.device_identification_request(2, 3).parse(raw, 4, len(raw) - 4)
    assert isinstance(part, pdu.DeviceIdentification)
    assert part.more_follows
    assert part.next_object_id == 5
    assert part.objects == {3: b"u", 4: b""}
    assert list(part.objects) == [3, 4]


@pytest.mark.parametrize(("raw", "kind"), [
    (bytes.fromhex("2B0E01"), FrameErrorKind.SHORT),
    (bytes.fromhex("2B0E0101000000")[:6], FrameErrorKind.SHORT),
    (response(1, BASIC, mei=0x0D), FrameErrorKind.WRONG_FUNCTION),
    (bytes.fromhex("2C0E0101000000"), FrameErrorKind.WRONG_FUNCTION),
    (response(2, BASIC), FrameErrorKind.GARBLED),  # code 2 echoed to a code 1 request
    (response(1, BASIC, more=0x01), FrameErrorKind.GARBLED),
    (response(1, BASIC)[:-1], FrameErrorKind.SHORT),  # last object runs past the PDU
    (response(1, BASIC)[:-6] , FrameErrorKind.SHORT),  # object 2 header cut
    (response(1, BASIC, count=4), FrameErrorKind.SHORT),  # says 4, holds 3
    (response(1, BASIC, count=2), FrameErrorKind.GARBLED),  # says 2, holds 3: trailing
    (response(1, BASIC) + b"\x00", FrameErrorKind.GARBLED),  # trailing byte
    (response(1, {0: b"a"}) + b"\x00\x01b", FrameErrorKind.GARBLED),  # count 1, 2 objects
    (response(1, {0: b"a"})[:-3] + b"\x02\x00\x01a\x00\x01b", FrameErrorKind.GARBLED),  # dup
    (bytes.fromhex("AB0102"), FrameErrorKind.GARBLED),  # exception response of 3 bytes
], ids=["3-bytes", "6-bytes", "mei-13", "fc-44", "code-echo", "more-follows-01",
        "value-past-end", "object-header-cut", "count-too-high", "count-too-low",
        "trailing-byte", "extra-object", "duplicate-object", "exception-3-bytes"])
def test_parse_malformed(raw: bytes, kind: FrameErrorKind) -> None:
    with pytest.raises(ModbusFrameError) as e:
        pdu.device_identification_request(1, 0).parse(raw, 0, len(raw))
    assert e.value.kind is kind, e.value


@pytest.mark.parametrize("code", [1, 2])
def test_parse_exception_response(code: int) -> None:
    raw = bytes((0xAB, code))
    with pytest.raises(ModbusExceptionError) as e:
        pdu.device_identification_request(4, 0x10).parse(raw, 0, 2)
    assert (e.value.function_code, e.value.exception_code) == (43, code)


def test_other_requests_parse_as_before() -> None:
    raw = bytes.fromhex("0302000A")
    assert pdu.read_request(3, 0, 1).parse(raw, 0, 4) == [10]
    with pytest.raises(ModbusFrameError):
        pdu.read_request(3, 0, 1).parse(response(1, BASIC), 0, len(response(1, BASIC)))


def test_rtu_response_length_walks_the_objects() -> None:
    for objects in ({}, BASIC, REGULAR, {0: b""}):
        frame = pdu.rtu_adu(7, response(2, objects))
        for n in range(3, len(frame)):
            size = pdu.rtu_response_length(frame[:n])
            assert size is not None
            assert n < size <= len(frame), (n, size)
        assert pdu.rtu_response_length(frame) == len(frame)
        assert pdu.rtu_response_length(b"xx" + frame + b"more", 2) == len(frame)
    assert pdu.rtu_response_length(pdu.rtu_adu(7, bytes.fromhex("AB01"))) == 5
    assert pdu.rtu_response_length(bytes.fromhex("072B0D0100")) is None  # MEI 13
    too_long = pdu.rtu_adu(7, response(3, {0x80 + i: b"x" * 40 for i in range(7)}))
    assert len(too_long) > pdu.MAX_RTU_FRAME
    assert pdu.rtu_response_length(too_long) is None


def test_identification_text() -> None:
    objects = {0: b"ACME \x00\x00", 2: b" V2.11\r\n", 4: "Gerät".encode(), 5: b"Ger\xe4t",
               0x80: b"\xff\xfe", 7: b"x"}
    assert pdu.identification_text(objects) == {
        "VendorName": "ACME", "MajorMinorRevision": "V2.11", "ProductName": "Gerät",
        "ModelName": "Gerät", "0x80": "ÿþ", "0x07": "x"}
    assert list(pdu.STANDARD_OBJECTS.values())[-1] == "UserApplicationName"


def test_simulator_object_selection() -> None:
    objects = {**REGULAR, 0x80: b"private"}

    def parsed(code: int, object_id: int) -> pdu.DeviceIdentification:
        raw = b"\x2b" + identification_response(objects, code, object_id)
        part = pdu.device_identification_request(code, object_id).parse(raw, 0, len(raw))
        assert isinstance(part, pdu.DeviceIdentification)
        assert part.conformity_level == 0x83
        return part

    assert parsed(1, 0).objects == BASIC
    assert parsed(2, 0).objects == REGULAR
    assert parsed(3, 0).objects == objects
    assert parsed(2, 4).objects == {i: REGULAR[i] for i in (4, 5, 6)}
    assert parsed(1, 5).objects == BASIC  # unknown at that level: restart at 0
    assert parsed(4, 0x80).objects == {0x80: b"private"}
    first = identification_response(LONG, 2, 0)
    assert first[:6] == bytes((0x0E, 2, 0x82, 0xFF, 3, 3))  # 0, 1, 2 fit; go on from 3
    assert len(first) + 1 <= pdu.MAX_PDU
    for bad, why in (({0: "a", 1: "b"}, "mandatory"), ({**IDENTITY, 7: "r"}, "not 0..6"),
                     ({**IDENTITY, 3: "x" * 245}, "at most 244")):
        with pytest.raises(ValueError, match=why):
            identification_pdu(bad)


# ---------------------------------------------------------------- pymodbus servers


@pytest.fixture(params=["socket", "rtu"], ids=["mbap", "rtu-over-tcp"])
def framing(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def endpoint(server: ModbusServer, framing: str) -> TcpEndpoint:
    return TcpEndpoint(HOST, server.port, Framing.MBAP if framing == "socket" else Framing.RTU)


@contextlib.contextmanager
def modbus_server(framing: str = "socket", serial_port: str | None = None,
                  identity: dict[int, str] | dict[int, bytes] | None = None
                  ) -> Iterator[ModbusServer]:
    """Units 1 (holding register 0 = 11) and 2 (22), ``identity`` for both."""
    server = ModbusServer({1: Image(hr=[11]), 2: Image(hr=[22])}, framing=framing,
                          serial_port=serial_port, identity=identity)
    try:
        yield server
    finally:
        server.stop()


async def test_basic_and_regular_objects(framing: str, pool: ConnectionPool) -> None:
    with modbus_server(framing=framing, identity=IDENTITY) as server:
        conn = pool.get(endpoint(server, framing))
        for unit in (1, 2):
            assert await conn.read_device_identification(unit, timeout=2.0) == BASIC
            assert await conn.read_device_identification(unit, code=2, timeout=2.0) == REGULAR
        assert await conn.read(1, Table.HOLDING_REGISTER, 0, 1, timeout=2.0) == [11]
        assert conn.stats.requests == conn.stats.responses == 5


async def test_more_follows_through_a_real_server(framing: str, pool: ConnectionPool) -> None:
    with modbus_server(framing=framing, identity=LONG) as server:
        conn = pool.get(endpoint(server, framing))
        assert await conn.read_device_identification(1, code=2, timeout=2.0) == LONG
        assert conn.stats.requests == 3  # 0..2, 3..4 and 5..6 (246 bytes each at most)


async def test_server_without_identity_answers_illegal_function(
    framing: str, pool: ConnectionPool
) -> None:
    with modbus_server(framing=framing) as server:
        conn = pool.get(endpoint(server, framing))
        with pytest.raises(ModbusExceptionError) as e:
            await conn.read_device_identification(1, timeout=2.0)
        assert (e.value.function_code, e.value.exception_code) == (43, 1)
        assert await conn.read(2, Table.HOLDING_REGISTER, 0, 1, timeout=2.0) == [22]


async def test_arguments_are_checked(pool: ConnectionPool) -> None:
    conn = pool.get(TcpEndpoint(HOST, free_port()))
    with pytest.raises(ValueError, match="code 4"):
        await conn.read_device_identification(1, code=4, timeout=1.0)
    with pytest.raises(ValueError, match="code 0"):
        await conn.read_device_identification(1, code=0, timeout=1.0)
    with pytest.raises(ValueError, match="max_rounds"):
        await conn.read_device_identification(1, timeout=1.0, max_rounds=0)
    with pytest.raises(ValueError, match="timeout"):
        await conn.read_device_identification(1, timeout=0)
    assert conn.stats.requests == 0


@pytest.fixture
def process_identity() -> Iterator[None]:
    """pymodbus's ``identity=`` goes into a process-wide singleton: restore it."""
    identity = ModbusControlBlock().Identity  # type: ignore[no-untyped-call]
    saved = dict(identity.stat_data)
    yield
    identity.stat_data.clear()
    identity.stat_data.update(saved)


@pytest.mark.usefixtures("process_identity")
@pytest.mark.parametrize("framer", [FramerType.SOCKET, FramerType.RTU], ids=["mbap", "rtu"])
async def test_pymodbus_own_identity_encoder(framer: FramerType, pool: ConnectionPool) -> None:
    """pymodbus's own FC 43 implementation (its encoder and MoreFollows split)."""
    port = free_port()
    server = ModbusTcpServer(
        [SimDevice(id=1, simdata=[SimData(0, values=[0], datatype=DataType.REGISTERS)])],
        framer=framer, address=(HOST, port), identity=ModbusDeviceIdentification(info=LONG))  # type: ignore[no-untyped-call]
    await server.serve_forever(background=True)
    try:
        conn = pool.get(TcpEndpoint(HOST, port, Framing.MBAP if framer is FramerType.SOCKET
                                    else Framing.RTU))
        assert await conn.read_device_identification(1, timeout=2.0) == {
            i: LONG[i] for i in range(3)}
        assert await conn.read_device_identification(1, code=2, timeout=2.0) == LONG
    finally:
        await server.shutdown()  # type: ignore[no-untyped-call]


async def test_serial_rtu_on_a_pty_pair(tmp_path: Path, pool: ConnectionPool) -> None:
    if shutil.which("socat") is None:
        pytest.skip("socat is not installed: no pty pair")
    pair = start_pty_pair(tmp_path)
    try:
        with modbus_server(serial_port=pair.b, identity=LONG):
            conn = pool.get(SerialEndpoint(pair.a, baudrate=19200))
            assert await conn.read_device_identification(2, code=2, timeout=3.0) == LONG
            assert await conn.read(1, Table.HOLDING_REGISTER, 0, 1, timeout=2.0) == [11]
            assert await conn.read_device_identification(1, timeout=3.0) == {
                i: LONG[i] for i in range(3)}
    finally:
        pair.stop()


async def test_edge_simulate_serves_identification_per_endpoint(pool: ConnectionPool) -> None:
    a, b = TcpEndpoint(HOST, free_port()), TcpEndpoint(HOST, free_port(), Framing.RTU)
    devices = [DeviceSpec(namespace="default", name=f"d{i}", model="m", endpoint=ep, unit_id=3,
                          properties=()) for i, ep in enumerate((a, b))]
    stop = asyncio.Event()
    task = asyncio.create_task(run_simulator(devices, stop, identification={a.key: IDENTITY}))
    try:
        for _ in range(200):
            try:
                _, writer = await asyncio.open_connection(HOST, b.port)
            except OSError:
                await asyncio.sleep(0.05)
                continue
            writer.close()
            break
        got = await pool.get(a).read_device_identification(3, code=2, timeout=2.0)
        assert got == REGULAR
        with pytest.raises(ModbusExceptionError) as e:
            await pool.get(b).read_device_identification(3, timeout=2.0)
        assert e.value.exception_code == 1
    finally:
        stop.set()
        await task
    with pytest.raises(ValueError, match="not served"):
        await run_simulator(devices, stop, identification={"tcp://127.0.0.1:1": IDENTITY})


# ---------------------------------------------------------------- scripted MBAP / RTU servers


Answer = Callable[[int, int], bytes]
"""(ReadDevId code, object id) asked → the response PDU to send."""


@contextlib.asynccontextmanager
async def scripted(framing: Framing, answer: Answer, asked: list[tuple[int, int]],
                   delay: float = 0.0) -> AsyncIterator[TcpEndpoint]:
    """A TCP server on 127.0.0.1 that answers each FC 43 request with ``answer`` after
    ``delay`` seconds (MBAP, or RTU framing sent in 3-byte pieces), recording what was
    asked."""
    writers: list[asyncio.StreamWriter] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writers.append(writer)
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
            while True:
                if framing is Framing.MBAP:
                    tid, _, length, unit = struct.unpack(">HHHB", await reader.readexactly(7))
                    body = await reader.readexactly(length - 1)
                else:
                    frame = await reader.readexactly(7)
                    assert FramerRTU.compute_CRC(frame[:5]).to_bytes(2, "big") == frame[5:]
                    unit, body = frame[0], frame[1:5]
                assert body[:2] == b"\x2b\x0e"
                asked.append((body[2], body[3]))
                out = answer(body[2], body[3])
                await asyncio.sleep(delay)
                if framing is Framing.MBAP:
                    writer.write(struct.pack(">HHHB", tid, 0, len(out) + 1, unit) + out)
                    continue
                frame = bytes((unit,)) + out
                frame += FramerRTU.compute_CRC(frame).to_bytes(2, "big")
                for i in range(0, len(frame), 3):
                    writer.write(frame[i : i + 3])
                    await writer.drain()
                    await asyncio.sleep(0.001)
        writer.close()

    server = await asyncio.start_server(handle, HOST, 0)
    try:
        yield TcpEndpoint(HOST, server.sockets[0].getsockname()[1], framing)
    finally:
        server.close()
        for w in writers:
            w.close()
        await server.wait_closed()


@BOTH
async def test_two_rounds_are_merged(framing: Framing, pool: ConnectionPool) -> None:
    def answer(code: int, object_id: int) -> bytes:
        if object_id == 0:
            return response(code, BASIC, more=0xFF, next_id=3)
        return response(code, {i: REGULAR[i] for i in range(object_id, 7)})

    asked: list[tuple[int, int]] = []
    async with scripted(framing, answer, asked) as ep:
        conn = pool.get(ep)
        assert await conn.read_device_identification(1, code=2, timeout=2.0) == REGULAR
    assert asked == [(2, 0), (2, 3)]
    assert conn.stats.responses == 2


@BOTH
@pytest.mark.parametrize("next_id", [0, 2], ids=["stuck-at-0", "stuck-at-2"])
async def test_looping_device_is_refused(
    framing: Framing, next_id: int, pool: ConnectionPool
) -> None:
    def answer(code: int, object_id: int) -> bytes:
        if object_id == 0:
            return response(code, BASIC, more=0xFF, next_id=next_id)
        return response(code, {3: b"u"}, more=0xFF, next_id=next_id)

    asked: list[tuple[int, int]] = []
    async with scripted(framing, answer, asked) as ep:
        conn = pool.get(ep)
        with pytest.raises(ModbusFrameError, match="loops") as e:
            await conn.read_device_identification(1, code=2, timeout=2.0)
    assert e.value.kind is FrameErrorKind.GARBLED
    assert asked == ([(2, 0)] if next_id == 0 else [(2, 0), (2, 2)])


async def test_endless_but_advancing_list_stops_at_max_rounds(pool: ConnectionPool) -> None:
    asked: list[tuple[int, int]] = []

    def answer(code: int, object_id: int) -> bytes:
        return response(code, {0x80 + object_id: b"x"}, more=0xFF, next_id=object_id + 1)

    async with scripted(Framing.MBAP, answer, asked) as ep:
        conn = pool.get(ep)
        with pytest.raises(ModbusFrameError, match="after 5 requests") as e:
            await conn.read_device_identification(1, code=3, timeout=2.0, max_rounds=5)
    assert e.value.kind is FrameErrorKind.GARBLED
    assert asked == [(3, i) for i in range(5)]


async def test_timeout_bounds_the_whole_sequence(pool: ConnectionPool) -> None:
    """A device answering every round in 0.3 s: the timeout is for all rounds."""
    asked: list[tuple[int, int]] = []
    loop = asyncio.get_running_loop()

    def answer(code: int, object_id: int) -> bytes:
        return response(code, {0x80 + object_id: b"x"}, more=0xFF, next_id=object_id + 1)

    async with scripted(Framing.MBAP, answer, asked, delay=0.3) as ep:
        conn = pool.get(ep)
        started = loop.time()
        with pytest.raises(ModbusTimeoutError):
            await conn.read_device_identification(1, code=3, timeout=1.0)
        assert 0.9 < loop.time() - started < 1.3
        assert len(asked) == 4
