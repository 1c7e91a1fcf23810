"""edge.modbus.writer and FC 22 against real servers on 127.0.0.1.

Round trips go to a pymodbus 3 server (``support.ModbusServer``) through a small
recording proxy of our own, so each test sees the function codes on the wire and
then reads the raw registers or coils back with a plain read. Behaviour a pymodbus
server cannot show (no FC 22, writes that do not stick, an answer that does not come)
comes from a scripted Modbus TCP device of our own. Every server a test starts is
stopped by the test.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import struct
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from support import Image, ModbusServer, free_port

from edge.config.model import (
    AccessMode,
    DeviceSpec,
    Framing,
    MethodSpec,
    ModbusOptions,
    PropertySpec,
    RawType,
    Table,
    TcpEndpoint,
    Value,
    ValueType,
    Visitor,
)
from edge.modbus import pdu
from edge.modbus.client import Connection, ConnectionPool, ModbusExceptionError, ModbusFrameError
from edge.modbus.writer import (
    WriteError,
    call_method,
    desired_value,
    parse_number,
    write_property,
)

logging.getLogger("pymodbus").setLevel(logging.CRITICAL)

HOST = "127.0.0.1"
HR, IR, CO, DI = Table.HOLDING_REGISTER, Table.INPUT_REGISTER, Table.COIL, Table.DISCRETE_INPUT
RW, RO = AccessMode.READ_WRITE, AccessMode.READ_ONLY
SIZE = 64  # registers and coils per table in the images
BIT_WORD = 0xA5A5  # the holding register that bit tests change, at BIT_ADDRESS
BIT_ADDRESS = 40

_VALUE_TYPES = {
    RawType.FLOAT32: ValueType.FLOAT, RawType.FLOAT64: ValueType.DOUBLE,
    RawType.STRING: ValueType.STRING, RawType.BYTES: ValueType.BYTES,
    RawType.BOOLEAN: ValueType.BOOLEAN, RawType.BIT: ValueType.BOOLEAN,
}


def prop(name: str, table: Table, offset: int, raw: RawType, *, limit: int | None = None,
         access: AccessMode = RW, minimum: float | None = None, maximum: float | None = None,
         value_type: ValueType | None = None, **visitor: Any) -> PropertySpec:
    """A property as the config loader makes it; limit defaults to the raw type's."""
    count = limit if limit is not None else raw.register_count or 1
    return PropertySpec(
        name=name,
        visitor=Visitor(table, offset, count, raw, **visitor),
        value_type=value_type or _VALUE_TYPES.get(raw, ValueType.INT),
        access_mode=access,
        minimum=minimum,
        maximum=maximum,
    )


def device(port: int, *props: PropertySpec, unit: int = 1, retries: int = 0,
           timeout: float = 1.0, methods: tuple[MethodSpec, ...] = (),
           framing: Framing = Framing.MBAP) -> DeviceSpec:
    return DeviceSpec(
        namespace="default", name="plc-1", model="plc", endpoint=TcpEndpoint(HOST, port, framing),
        unit_id=unit, properties=props, options=ModbusOptions(timeout_s=timeout, retries=retries),
        methods=methods,
    )


# ---------------------------------------------------------------- servers of our own


@dataclass
class Frame:
    """One request PDU seen on the wire."""

    unit: int
    fc: int
    pdu: bytes


async def _mbap_frames(reader: asyncio.StreamReader) -> AsyncIterator[tuple[int, int, bytes]]:
    """(transaction id, unit id, PDU) of each MBAP frame until EOF."""
    with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
        while True:
            tid, _, length, unit = struct.unpack(">HHHB", await reader.readexactly(7))
            yield tid, unit, await reader.readexactly(length - 1)


@dataclass
class RecordingProxy:
    """Forwards Modbus TCP to 127.0.0.1:target and records every request frame."""

    target: int
    frames: list[Frame] = field(default_factory=list)
    connections: int = 0
    port: int = 0
    _server: asyncio.Server | None = None
    _writers: list[asyncio.StreamWriter] = field(default_factory=list)

    def fcs(self) -> list[int]:
        return [f.fc for f in self.frames]

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        up_reader, up_writer = await asyncio.open_connection(HOST, self.target)
        self._writers += [writer, up_writer]

        async def back() -> None:
            with contextlib.suppress(ConnectionError):
                while data := await up_reader.read(4096):
                    writer.write(data)

        answers = asyncio.create_task(back())
        async for tid, unit, body in _mbap_frames(reader):
            self.frames.append(Frame(unit, body[0], body))
            up_writer.write(pdu.mbap_adu(tid, unit, body))
        answers.cancel()
        up_writer.close()
        writer.close()

    async def __aenter__(self) -> RecordingProxy:
        self._server = await asyncio.start_server(self._handle, HOST, 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for w in self._writers:
            w.close()
        await self._server.wait_closed()


@dataclass
class ScriptedDevice:
    """A Modbus TCP device of our own (any unit id): FC 1, 3, 5, 6, 15, 16 on an image of
    ``SIZE`` holding registers and coils, FC 22 only with ``mask_write`` (else exception
    1, ILLEGAL FUNCTION); with ``ignore_writes`` writes are echoed but not stored;
    ``silent(index, frame)`` True leaves request ``index`` unanswered."""

    hr: list[int] = field(default_factory=lambda: [0] * SIZE)
    co: list[bool] = field(default_factory=lambda: [False] * SIZE)
    mask_write: bool = True
    ignore_writes: bool = False
    silent: Callable[[int, Frame], bool] = lambda _i, _f: False
    frames: list[Frame] = field(default_factory=list)
    port: int = 0
    _server: asyncio.Server | None = None
    _writers: list[asyncio.StreamWriter] = field(default_factory=list)

    def fcs(self) -> list[int]:
        return [f.fc for f in self.frames]

    def answer(self, body: bytes) -> bytes:  # noqa: PLR0911, PLR0912 - one branch per function code
        fc = body[0]
        address, arg = struct.unpack(">HH", body[1:5])
        keep = not self.ignore_writes
        if fc == 3:
            return struct.pack(f">BB{arg}H", 3, 2 * arg, *self.hr[address : address + arg])
        if fc == 1:
            packed = bytearray((arg + 7) // 8)
            for i, bit in enumerate(self.co[address : address + arg]):
                packed[i // 8] |= bit << (i % 8)
            return bytes((1, len(packed))) + packed
        if fc in (5, 6):
            if keep and fc == 5:
                self.co[address] = arg == 0xFF00
            if keep and fc == 6:
                self.hr[address] = arg
            return body
        if fc == 16:
            if keep:
                self.hr[address : address + arg] = struct.unpack(f">{arg}H", body[6:])
            return body[:5]
        if fc == 15:
            if keep:
                for i in range(arg):
                    self.co[address + i] = bool(body[6 + i // 8] >> (i % 8) & 1)
            return body[:5]
        if fc == 22 and self.mask_write:
            and_mask, or_mask = struct.unpack(">HH", body[3:7])
            if keep:
                self.hr[address] = (self.hr[address] & and_mask) | (or_mask & ~and_mask & 0xFFFF)
            return body
        return bytes((fc | 0x80, 1))

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.append(writer)
        async for tid, unit, body in _mbap_frames(reader):
            frame = Frame(unit, body[0], body)
            self.frames.append(frame)
            if not self.silent(len(self.frames) - 1, frame):
                writer.write(pdu.mbap_adu(tid, unit, self.answer(body)))
        writer.close()

    async def __aenter__(self) -> ScriptedDevice:
        self._server = await asyncio.start_server(self._handle, HOST, 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for w in self._writers:
            w.close()
        await self._server.wait_closed()


# ---------------------------------------------------------------- fixtures


def _image() -> Image:
    hr = [0] * SIZE
    hr[BIT_ADDRESS] = BIT_WORD
    return Image(hr=hr, co=[False] * SIZE)


@pytest.fixture
def server() -> Iterator[ModbusServer]:
    """A pymodbus server, unit 1, ``SIZE`` holding registers and coils."""
    s = ModbusServer({1: _image()})
    yield s
    s.stop()


@pytest.fixture
async def proxy(server: ModbusServer) -> AsyncIterator[RecordingProxy]:
    async with RecordingProxy(server.port) as p:
        yield p


@pytest.fixture
async def pool() -> AsyncIterator[ConnectionPool]:
    p = ConnectionPool(backoff_initial=0.2, backoff_max=1.0, connect_timeout=2.0)
    yield p
    await p.close()


def connect(pool: ConnectionPool, dev: DeviceSpec) -> Connection:
    return pool.get(dev.endpoint)


async def raw(conn: Connection, table: Table, address: int, count: int) -> list[Any]:
    """The words or bits as stored, by a plain read (not through the writer)."""
    return list(await conn.read(1, table, address, count, timeout=2.0))


def words(fmt: str, *values: Any) -> list[int]:
    """Big-endian ``struct`` bytes as 16-bit words: the image without any swap."""
    data = struct.pack(">" + fmt, *values)
    return list(struct.unpack(f">{len(data) // 2}H", data))


# ---------------------------------------------------------------- round trips

# (property, value, returned value, function code of the write, raw words or bits)
ROUND_TRIPS = [
    (prop("i16", HR, 2, RawType.INT16), -1234, -1234, 6, words("h", -1234)),
    (prop("u16", HR, 2, RawType.UINT16), 65535, 65535, 6, [0xFFFF]),
    (prop("i32", HR, 2, RawType.INT32), -100000, -100000, 16, words("i", -100000)),
    (prop("u32", HR, 2, RawType.UINT32), 4_000_000_000, 4_000_000_000, 16,
     words("I", 4_000_000_000)),
    (prop("i64", HR, 2, RawType.INT64), -(2**62) - 5, -(2**62) - 5, 16, words("q", -(2**62) - 5)),
    (prop("u64", HR, 2, RawType.UINT64), 2**64 - 1, 2**64 - 1, 16, [0xFFFF] * 4),
    # 229.8 is not a float32: the register holds 0x4365CCCD, which decodes to 229.8 again
    (prop("f32", HR, 2, RawType.FLOAT32), 229.8, 229.8, 16, [0x4365, 0xCCCD]),
    (prop("f64", HR, 2, RawType.FLOAT64), -1.5e300, -1.5e300, 16, words("d", -1.5e300)),
    # scale: 231.57 V at 0.1 is raw 2316, which reads 231.6 (not a mismatch)
    (prop("scaled", HR, 2, RawType.INT16, scale=0.1), 231.57, 231.6, 6, [2316]),
    (prop("scaled32", HR, 2, RawType.UINT32, scale=0.01), 12345.67, 12345.67, 16,
     words("I", 1234567)),
    (prop("swap", HR, 2, RawType.UINT16, is_swap=True), 0x1234, 0x1234, 6, [0x3412]),
    (prop("regswap", HR, 2, RawType.INT32, is_register_swap=True), 0x11223344, 0x11223344, 16,
     [0x3344, 0x1122]),
    # float32 1.5 = 3F C0 00 00; word order reversed, then each word's bytes swapped
    (prop("bothswap", HR, 2, RawType.FLOAT32, is_swap=True, is_register_swap=True), 1.5, 1.5,
     16, [0x0000, 0xC03F]),
    (prop("text", HR, 2, RawType.STRING, limit=4), "pump-7", "pump-7", 16,
     [0x7075, 0x6D70, 0x2D37, 0x0000]),
    (prop("blob", HR, 2, RawType.BYTES, limit=1), "CAFE", "cafe", 6, [0xCAFE]),
    (prop("flag", HR, 2, RawType.BOOLEAN), True, True, 6, [1]),
    (prop("coil", CO, 5, RawType.BOOLEAN), True, True, 5, [True]),
    (prop("coils", CO, 5, RawType.UINT16, limit=4), 0b1101, 0b1101, 15,
     [True, False, True, True]),
]


@pytest.mark.parametrize(
    ("spec", "value", "returned", "fc", "stored"), ROUND_TRIPS, ids=[c[0].name for c in ROUND_TRIPS]
)
async def test_every_type_round_trips_through_a_real_server(
    proxy: RecordingProxy, pool: ConnectionPool, spec: PropertySpec, value: Value,
    returned: Value, fc: int, stored: list[Any],
) -> None:
    dev = device(proxy.port, spec)
    conn = connect(pool, dev)
    result = await write_property(conn, dev, spec, value)
    assert result == returned
    assert type(result) is type(returned)
    # the write by its function code, then the read-back of the property's own items
    assert proxy.fcs() == [fc, spec.visitor.table.read_function_code]
    v = spec.visitor
    assert await raw(conn, v.table, v.offset, v.limit) == stored
    written = proxy.frames[0].pdu
    assert struct.unpack(">H", written[1:3])[0] == v.offset


async def test_one_register_goes_by_fc6_and_more_by_fc16_on_the_wire(
    proxy: RecordingProxy, pool: ConnectionPool
) -> None:
    one, two = prop("one", HR, 10, RawType.UINT16), prop("two", HR, 12, RawType.UINT32)
    dev = device(proxy.port, one, two)
    conn = connect(pool, dev)
    await write_property(conn, dev, one, 0xBEEF)
    await write_property(conn, dev, two, 0x01020304)
    fc6, fc16 = proxy.frames[0], proxy.frames[2]
    assert fc6.pdu == bytes.fromhex("06000ABEEF")  # fc, address 10, value (§6.6)
    assert fc16.pdu == bytes.fromhex("10000C0002040102" "0304")  # fc, 12, qty 2, 4 bytes (§6.12)
    assert proxy.fcs() == [6, 3, 16, 3]


@pytest.mark.parametrize("framing", [Framing.MBAP, Framing.RTU], ids=["mbap", "rtu-over-tcp"])
async def test_bit_in_holding_register_by_fc22_leaves_the_other_bits(
    pool: ConnectionPool, framing: Framing
) -> None:
    server = ModbusServer({1: _image()}, framing="socket" if framing is Framing.MBAP else "rtu")
    try:
        bit1 = prop("bit1", HR, BIT_ADDRESS, RawType.BIT, bit=1)
        bit0 = prop("bit0", HR, BIT_ADDRESS, RawType.BIT, bit=0)
        bit3_swapped = prop("bit3s", HR, BIT_ADDRESS, RawType.BIT, bit=3, is_swap=True)
        dev = device(server.port, bit1, bit0, bit3_swapped, framing=framing)
        conn = connect(pool, dev)
        assert await write_property(conn, dev, bit1, True) is True
        assert await raw(conn, HR, BIT_ADDRESS, 1) == [BIT_WORD | 0x0002]
        assert await write_property(conn, dev, bit0, False) is False
        assert await raw(conn, HR, BIT_ADDRESS, 1) == [(BIT_WORD | 0x0002) & ~0x0001]
        # isSwap: bit 3 after the byte swap is bit 11 on the wire
        assert await write_property(conn, dev, bit3_swapped, True) is True
        assert await raw(conn, HR, BIT_ADDRESS, 1) == [((BIT_WORD | 0x0002) & ~0x0001) | 0x0800]
        assert 1 not in conn.mask_write_unsupported
        # the neighbours were never touched
        assert await raw(conn, HR, BIT_ADDRESS - 1, 3) == [0, 0xADA6, 0]
    finally:
        server.stop()


async def test_bit_write_is_one_fc22_request_with_the_bits_masks(
    proxy: RecordingProxy, pool: ConnectionPool
) -> None:
    bit = prop("bit5", HR, BIT_ADDRESS, RawType.BIT, bit=5)
    dev = device(proxy.port, bit)
    conn = connect(pool, dev)
    await write_property(conn, dev, bit, True)
    await write_property(conn, dev, bit, False)
    # §6.16: fc 0x16, address, AND mask, OR mask
    assert [f.pdu for f in proxy.frames if f.fc == 22] == [
        bytes.fromhex("160028FFDF0020"), bytes.fromhex("160028FFDF0000")
    ]
    assert proxy.fcs() == [22, 3, 22, 3]
    assert await raw(conn, HR, BIT_ADDRESS, 1) == [BIT_WORD & ~0x20]


async def test_fc22_unsupported_falls_back_to_read_modify_write_and_is_remembered(
    pool: ConnectionPool,
) -> None:
    async with ScriptedDevice(mask_write=False) as dev_server:
        dev_server.hr[7] = 0x00F0
        b0 = prop("b0", HR, 7, RawType.BIT, bit=0)
        b7 = prop("b7", HR, 7, RawType.BIT, bit=7)
        dev = device(dev_server.port, b0, b7)
        conn = connect(pool, dev)
        assert await write_property(conn, dev, b0, True) is True
        assert dev_server.fcs() == [22, 3, 6, 3]  # refused FC 22, then FC 3 + FC 6, read-back
        assert dev_server.frames[2].pdu == bytes.fromhex("06000700F1")
        assert dev_server.hr[7] == 0x00F1
        assert conn.mask_write_unsupported == {1}
        dev_server.frames.clear()
        assert await write_property(conn, dev, b7, False) is False
        assert dev_server.fcs() == [3, 6, 3]  # straight to read-modify-write
        assert dev_server.hr[7] == 0x0071
        # per unit: another unit on the same connection still gets FC 22 first
        other = device(dev_server.port, b0, unit=2)
        dev_server.frames.clear()
        await write_property(conn, other, b0, True)
        assert dev_server.fcs()[0] == 22
        assert conn.mask_write_unsupported == {1, 2}


async def test_timed_out_write_is_sent_again_and_read_modify_write_restarts_from_its_read(
    pool: ConnectionPool,
) -> None:
    u16 = prop("u16", HR, 3, RawType.UINT16)
    bit = prop("bit", HR, 9, RawType.BIT, bit=2)
    # the first FC 6 goes unanswered: it is idempotent, so it is simply sent again
    first_fc6 = {"seen": False}

    def drop_first_fc6(_i: int, frame: Frame) -> bool:
        if frame.fc == 6 and not first_fc6["seen"]:
            first_fc6["seen"] = True
            return True
        return False

    async with ScriptedDevice(silent=drop_first_fc6) as s:
        dev = device(s.port, u16, retries=1, timeout=0.3)
        conn = connect(pool, dev)
        assert await write_property(conn, dev, u16, 4242) == 4242
        assert s.fcs() == [6, 6, 3]
    # read-modify-write: the FC 6 goes unanswered; the retry starts again from FC 3
    first_fc6["seen"] = False
    async with ScriptedDevice(mask_write=False, silent=drop_first_fc6) as s:
        dev = device(s.port, bit, retries=1, timeout=0.3)
        conn = pool.get(dev.endpoint)
        assert await write_property(conn, dev, bit, True) is True
        assert s.fcs() == [22, 3, 6, 3, 6, 3]
        assert s.hr[9] == 0x0004


async def test_timeout_after_the_retries_is_reported(pool: ConnectionPool) -> None:
    u16 = prop("u16", HR, 3, RawType.UINT16)
    async with ScriptedDevice(silent=lambda _i, f: f.fc == 6) as s:
        dev = device(s.port, u16, retries=1, timeout=0.2)
        with pytest.raises(WriteError) as ei:
            await write_property(connect(pool, dev), dev, u16, 7)
        assert s.fcs() == [6, 6]  # never a read-back of a write that did not answer
    err = ei.value
    assert (err.kind, err.stage) == ("timeout", "write")
    assert "default/plc-1" in str(err)
    assert "'u16'" in str(err)
    assert "FC 6" in str(err)
    assert "may or may not have applied" in str(err)


async def test_unreachable_endpoint_is_a_connection_error(pool: ConnectionPool) -> None:
    u16 = prop("u16", HR, 3, RawType.UINT16)
    dev = device(free_port(), u16)
    with pytest.raises(WriteError) as ei:
        await write_property(connect(pool, dev), dev, u16, 7)
    assert ei.value.kind == "connection"
    assert "connect failed" in str(ei.value)


# ---------------------------------------------------------------- refusals


@pytest.mark.parametrize(
    ("spec", "value", "kind", "text"),
    [
        (prop("ro", HR, 2, RawType.UINT16, access=RO), 1, "read_only", "ReadOnly"),
        (prop("ir", IR, 2, RawType.UINT16), 1, "not_writable", "InputRegister cannot be written"),
        (prop("di", DI, 2, RawType.BOOLEAN), True, "not_writable",
         "DiscreteInputRegister cannot be written"),
        (prop("lim", HR, 2, RawType.INT16, scale=0.1, minimum=5, maximum=90), 90.1,
         "out_of_range", "allowed 5..90"),
        (prop("lim", HR, 2, RawType.INT16, scale=0.1, minimum=5, maximum=90), 4.99,
         "out_of_range", "allowed 5..90"),
        (prop("low", HR, 2, RawType.INT16, minimum=-3.5), -4, "out_of_range", "at least -3.5"),
        # the raw type's own range, from the codec
        (prop("i16", HR, 2, RawType.INT16), 40000, "bad_value", "allowed -32768..32767"),
        (prop("i16", HR, 2, RawType.INT16), "12", "bad_value", "takes a number, not str"),
        (prop("i16", HR, 2, RawType.INT16), True, "bad_value", "takes a number, not bool"),
        (prop("i16", HR, 2, RawType.INT16), 5.5, "bad_value", "whole numbers only"),
        (prop("f32", HR, 2, RawType.FLOAT32), float("nan"), "bad_value", "not a finite number"),
        (prop("coil", CO, 2, RawType.BOOLEAN), 1, "bad_value", "takes true or false"),
        (prop("text", HR, 2, RawType.STRING, limit=2), "five!", "bad_value", "at most 4"),
    ],
    ids=lambda p: p.name if isinstance(p, PropertySpec) else None,
)
async def test_refused_before_any_request_goes_out(
    proxy: RecordingProxy, pool: ConnectionPool, spec: PropertySpec, value: Value, kind: str,
    text: str,
) -> None:
    dev = device(proxy.port, spec)
    with pytest.raises(WriteError) as ei:
        await write_property(connect(pool, dev), dev, spec, value)
    err = ei.value
    assert (err.kind, err.stage, err.property, err.device) == (kind, "check", spec.name,
                                                               "default/plc-1")
    assert text in str(err)
    assert f"property {spec.name!r}" in str(err)
    assert repr(value) in str(err)
    assert isinstance(err, ValueError)
    assert proxy.connections == 0
    assert proxy.frames == []


async def test_bounds_are_inclusive_in_engineering_units(
    proxy: RecordingProxy, pool: ConnectionPool
) -> None:
    spec = prop("lim", HR, 2, RawType.INT16, scale=0.1, minimum=5, maximum=90)
    dev = device(proxy.port, spec)
    conn = connect(pool, dev)
    assert await write_property(conn, dev, spec, 90) == 90  # raw 900, beyond 90 unscaled
    assert await raw(conn, HR, 2, 1) == [900]
    assert await write_property(conn, dev, spec, 5) == 5


# ---------------------------------------------------------------- device answers


async def test_exception_response_is_reported_with_its_code(
    proxy: RecordingProxy, pool: ConnectionPool
) -> None:
    beyond = prop("beyond", HR, SIZE + 10, RawType.UINT16)  # outside the server's image
    dev = device(proxy.port, beyond)
    with pytest.raises(WriteError) as ei:
        await write_property(connect(pool, dev), dev, beyond, 3)
    err = ei.value
    assert (err.kind, err.stage, err.exception_code) == ("device_error", "write", 2)
    assert "exception 0x02 ILLEGAL DATA ADDRESS (function code 6)" in str(err)
    assert proxy.fcs() == [6]  # an exception is no timeout: not sent again


async def test_a_device_that_ignores_writes_is_a_mismatch(pool: ConnectionPool) -> None:
    u16 = prop("u16", HR, 3, RawType.UINT16)
    f32 = prop("f32", HR, 4, RawType.FLOAT32)
    async with ScriptedDevice(ignore_writes=True) as s:
        s.hr[3] = 17
        dev = device(s.port, u16, f32)
        with pytest.raises(WriteError) as ei:
            await write_property(connect(pool, dev), dev, u16, 1234)
        assert s.fcs() == [6, 3]
        err = ei.value
        assert (err.kind, err.stage, err.written, err.read_back) == ("mismatch", "read_back",
                                                                     1234, 17)
        assert "wrote 1234, read back 17" in str(err)
        s.ignore_writes = False  # an honest device: 0.1 as float32 reads back as 0.1
        assert await write_property(connect(pool, dev), dev, f32, 0.1) == 0.1


# ---------------------------------------------------------------- methods


def _method_device(port: int) -> DeviceSpec:
    a, b = prop("a", HR, 1, RawType.UINT16), prop("b", HR, 2, RawType.INT32)
    c = prop("c", HR, SIZE + 5, RawType.UINT16)  # the device refuses this address
    other = prop("other", HR, 8, RawType.UINT16)
    return device(port, a, b, c, other, methods=(
        MethodSpec("setup", ("a", "b")), MethodSpec("all", ("a", "b", "c")),
    ))


async def test_method_writes_in_property_order_and_returns_the_read_backs(
    proxy: RecordingProxy, pool: ConnectionPool
) -> None:
    dev = _method_device(proxy.port)
    conn = connect(pool, dev)
    result = await call_method(conn, dev, "setup", {"b": -5, "a": 9})
    assert result == {"a": 9, "b": -5}
    assert list(result) == ["a", "b"]
    assert proxy.fcs() == [6, 3, 16, 3]  # a (register 1) first, as propertyNames say
    assert await raw(conn, HR, 1, 3) == [9, *words("i", -5)]


async def test_method_refuses_a_property_outside_it_before_writing(
    proxy: RecordingProxy, pool: ConnectionPool
) -> None:
    dev = _method_device(proxy.port)
    conn = connect(pool, dev)
    with pytest.raises(WriteError) as ei:
        await call_method(conn, dev, "setup", {"a": 1, "other": 2})
    assert (ei.value.kind, ei.value.method) == ("bad_value", "setup")
    assert "'other' not in its properties" in str(ei.value)
    assert "a, b" in str(ei.value)
    with pytest.raises(WriteError) as ei:  # a bad value of a later property: nothing sent
        await call_method(conn, dev, "setup", {"a": 1, "b": "x"})
    assert (ei.value.kind, ei.value.property, ei.value.written_before) == ("bad_value", "b", ())
    with pytest.raises(WriteError) as ei:
        await call_method(conn, dev, "reboot", {"a": 1})
    assert ei.value.kind == "unknown_method"
    assert "setup, all" in str(ei.value)
    assert proxy.connections == 0
    assert proxy.frames == []


async def test_method_stops_at_the_first_failure_and_says_what_was_written(
    proxy: RecordingProxy, pool: ConnectionPool
) -> None:
    dev = _method_device(proxy.port)
    conn = connect(pool, dev)
    with pytest.raises(WriteError) as ei:
        await call_method(conn, dev, "all", {"c": 3, "a": 4, "b": 5})
    err = ei.value
    assert (err.kind, err.property, err.exception_code) == ("device_error", "c", 2)
    assert err.written_before == ("a", "b")
    assert err.results == {"a": 4, "b": 5}
    assert "method 'all'" in str(err)
    assert "after writing a, b" in str(err)
    assert proxy.fcs() == [6, 3, 16, 3, 6]
    assert await raw(conn, HR, 1, 3) == [4, *words("i", 5)]


# ---------------------------------------------------------------- FC 22 PDU


def test_mask_write_pdu_matches_the_spec_example() -> None:
    # V1.1b3 §6.16: register 5 (address 4), AND 0x00F2, OR 0x0025; the answer echoes it
    req = pdu.mask_write_request(4, 0x00F2, 0x0025)
    assert req.pdu == bytes.fromhex("16000400F20025")
    assert req.parse(bytes.fromhex("16000400F20025"), 0, 7) is None
    with pytest.raises(ModbusFrameError, match="echo"):
        req.parse(bytes.fromhex("16000400F20026"), 0, 7)
    with pytest.raises(ModbusFrameError, match="echo"):
        req.parse(bytes.fromhex("1600040000"), 0, 5)  # an FC 6-sized answer
    with pytest.raises(ModbusExceptionError) as ei:
        req.parse(bytes.fromhex("9601"), 0, 2)
    assert (ei.value.function_code, ei.value.exception_code) == (22, 1)
    # the spec's worked example: current 0x12 -> 0x17
    assert (0x12 & 0x00F2) | (0x0025 & ~0x00F2 & 0xFFFF) == 0x17
    # RTU: unit + 7 PDU bytes + CRC
    assert pdu.rtu_response_length(pdu.rtu_adu(1, req.pdu)) == 10
    assert len(pdu.rtu_adu(1, req.pdu)) == 10
    with pytest.raises(ValueError, match="OR mask"):
        pdu.mask_write_request(4, 0, 0x10000)
    # FC 5/6 echoes are still checked whole
    assert pdu.write_registers_request(1, [3]).parse(bytes.fromhex("0600010003"), 0, 5) is None
    with pytest.raises(ModbusFrameError, match="echo"):
        pdu.write_coils_request(1, [True]).parse(bytes.fromhex("050001FF0000"), 0, 6)


@pytest.mark.parametrize(("text", "number"), [
    ("-12", -12), ("+5", 5), ("007", 7), (" 42 ", 42), (".5", 0.5), ("2.5e3", 2500.0),
    ("-1.", -1.0), ("1_000", None), ("0x10", None), ("nan", None), ("inf", None),
    ("\u0663", None), ("", None), ("1" * 5000, None),
])
def test_numbers_are_ascii_decimal_only(text: str, number: float | None) -> None:
    got = parse_number(text)
    assert got == number
    assert type(got) is type(number)


@pytest.mark.parametrize(("value_type", "text", "value"), [
    (ValueType.BOOLEAN, "TRUE", True), (ValueType.BOOLEAN, "0", False),
    (ValueType.BOOLEAN, "yes", "yes"), (ValueType.INT, "-40", -40),
    (ValueType.INT, "5.0", 5.0), (ValueType.INT, "1_000", "1_000"),
    (ValueType.FLOAT, "12", 12.0), (ValueType.STRING, " a ", " a "),
])
def test_desired_text_becomes_a_value_of_the_value_type(
    value_type: ValueType, text: str, value: object
) -> None:
    spec = dataclasses.replace(prop("p", HR, 0, RawType.INT16, value_type=value_type),
                               desired=text)
    got = desired_value(spec)
    assert got == value
    assert type(got) is type(value)
