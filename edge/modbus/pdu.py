"""Modbus PDUs and ADUs: build requests, check and decode responses.

Sources of the formats:

* PDU layouts, quantity limits, exception responses: *MODBUS Application Protocol
  Specification V1.1b3* (2012), §4.1 (PDU ≤ 253 bytes), §6.1–§6.6, §6.11, §6.12,
  §6.16 (function codes 1, 2, 3, 4, 5, 6, 15, 16, 22), §6.21 (function code 43 /
  MEI type 14, Read Device Identification) and §7 (exception responses and codes).
* RTU ADU (address + PDU + CRC, CRC low byte first, at most 256 bytes), CRC-16 and
  inter-frame silence: *MODBUS over Serial Line Specification and Implementation
  Guide V1.02* (2006), §2.5.1, §2.5.1.1 and §6.2.2.
* MBAP header: *MODBUS Messaging on TCP/IP Implementation Guide V1.0b* (2006), §3.1.3.

Everything here is synchronous and allocation-light: requests are immutable and
cached, structs are precompiled, read responses are decoded straight out of the
receive buffer (``buf[start:end]`` is the response PDU; it is not copied).
"""

from __future__ import annotations

import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Final

from edge.modbus.errors import FrameErrorKind, ModbusExceptionError, ModbusFrameError

Buffer = bytes | bytearray
"""A receive buffer; responses are decoded in place from ``buf[start:end]``."""

Values = list[int] | list[bool]
"""Decoded read data: registers as ints 0..65535, bits as bools."""

MAX_RTU_FRAME: Final = 256
"""Largest RTU ADU in bytes: address + 253-byte PDU + CRC (Serial Line V1.02 §2.5.1)."""

MAX_PDU: Final = 253
"""Largest PDU in bytes (Application Protocol V1.1b3 §4.1)."""

MAX_READ_REGISTERS: Final = 125
MAX_READ_BITS: Final = 2000
MAX_WRITE_REGISTERS: Final = 123
MAX_WRITE_COILS: Final = 1968

MBAP = struct.Struct(">HHHB")
"""MBAP header (TCP/IP Guide V1.0b §3.1.3): transaction id, protocol id (0), length
(bytes that follow the length field: unit id + PDU), unit id — 7 bytes."""

_FC_ADDR_QTY = struct.Struct(">BHH")  # fc, address, quantity|value (requests, echoes)
_FC_ADDR_QTY_N = struct.Struct(">BHHB")  # fc, address, quantity, byte count (FC 15/16)
_MASK_WRITE = struct.Struct(">BHHH")  # fc, address, AND mask, OR mask (FC 22)
_MEI_REQUEST = struct.Struct(">BBBB")  # fc 0x2B, MEI type 0x0E, ReadDevId code, object id
_MEI_RESPONSE = struct.Struct(">BBBBBBB")  # + conformity, more follows, next id, count
_CRC = struct.Struct("<H")
_REGISTERS = tuple(struct.Struct(f">{n}H") for n in range(MAX_READ_REGISTERS + 1))
_BITS = tuple(tuple(bool(byte >> i & 1) for i in range(8)) for byte in range(256))

# Kinds of request, i.e. how the normal response is checked.
_READ_BITS: Final = 0
_READ_REGISTERS: Final = 1
_WRITE_SINGLE: Final = 2  # FC 5, 6, 22: the response echoes the whole request
_WRITE_MULTIPLE: Final = 3  # FC 15, 16: the response echoes fc, address, quantity
_DEVICE_ID: Final = 4  # FC 43 / MEI 14: an object list (address: object id, count: code)

ENCAPSULATED_INTERFACE: Final = 0x2B
"""Function code 43, Encapsulated Interface Transport (V1.1b3 §6.19)."""
MEI_READ_DEVICE_ID: Final = 0x0E
"""MEI type 14, Read Device Identification (V1.1b3 §6.21)."""
DEVICE_ID_BASIC: Final = 1
DEVICE_ID_REGULAR: Final = 2
DEVICE_ID_EXTENDED: Final = 3
DEVICE_ID_SPECIFIC: Final = 4
"""ReadDevId codes (V1.1b3 §6.21): 1 basic, 2 regular, 3 extended stream (each one
includes the objects of the levels below), 4 one specific object."""
MORE_FOLLOWS: Final = 0xFF
"""MoreFollows value: the object list continues, ask again from NextObjectId."""

STANDARD_OBJECTS: Final = {
    0x00: "VendorName",
    0x01: "ProductCode",
    0x02: "MajorMinorRevision",
    0x03: "VendorUrl",
    0x04: "ProductName",
    0x05: "ModelName",
    0x06: "UserApplicationName",
}
"""Names of the standard identification objects (V1.1b3 §6.21, table of object ids):
0–2 basic (mandatory), 3–6 regular (optional). 0x07–0x7F are reserved, 0x80–0xFF
are extended (private, device dependent)."""


@dataclass(frozen=True, slots=True)
class DeviceIdentification:
    """One decoded Read Device Identification response (FC 43 / MEI 14, V1.1b3 §6.21).

    ``code`` is the ReadDevId code echoed (1–4); ``conformity_level`` the device's
    conformity level byte (0x01/0x02/0x03 stream access only, 0x81/0x82/0x83 also
    individual access); ``more_follows`` is True when the device sent MoreFollows
    0xFF: the list continues, ask again with ``next_object_id`` (meaningful only
    then); ``objects`` maps object id (0..255) to its raw value bytes, in the order
    sent.
    """

    code: int
    conformity_level: int
    more_follows: bool
    next_object_id: int
    objects: dict[int, bytes]


Answer = Values | DeviceIdentification | None
"""What :meth:`Request.parse` returns: read data, an identification part, None for a
write."""


class Request:
    """An immutable request PDU together with what its response must look like.

    Build one with :func:`read_request`, :func:`write_registers_request`,
    :func:`write_coils_request`, :func:`mask_write_request` or
    :func:`device_identification_request`; ``pdu`` is the request PDU (function code
    first), ``address``/``count`` the 0-based protocol address and the quantity (for
    FC 43: the object id and the ReadDevId code).
    """

    __slots__ = ("_kind", "address", "count", "function_code", "pdu")

    def __init__(self, kind: int, function_code: int, address: int, count: int, pdu: bytes):
        self._kind = kind
        self.function_code = function_code
        self.address = address
        self.count = count
        self.pdu = pdu

    def __repr__(self) -> str:
        if self._kind == _DEVICE_ID:
            return (f"Request(fc={self.function_code}, mei={MEI_READ_DEVICE_ID}, "
                    f"code={self.count}, object_id={self.address})")
        return f"Request(fc={self.function_code}, address={self.address}, count={self.count})"

    def parse(self, buf: Buffer, start: int, end: int) -> Answer:
        """Check the response PDU ``buf[start:end]`` against this request and decode it.

        Returns the registers (``list[int]``, exactly ``count``) or bits
        (``list[bool]``, exactly ``count``, first address first) of a read, a
        :class:`DeviceIdentification` for FC 43, None for a write. Raises
        :class:`ModbusExceptionError` for an exception response and
        :class:`ModbusFrameError` for a wrong function code, a wrong length or byte
        count, a write echo that does not match the request, or a malformed
        identification response (see :func:`device_identification_request`).
        """
        size = end - start
        if size < 2:
            raise ModbusFrameError(f"response PDU of {size} bytes is too short",
                                   kind=FrameErrorKind.SHORT)
        fc = buf[start]
        if fc != self.function_code:
            if fc == self.function_code | 0x80:
                if size != 2:
                    raise ModbusFrameError(f"exception response of {size} bytes, expected 2",
                                           kind=FrameErrorKind.GARBLED)
                raise ModbusExceptionError(self.function_code, buf[start + 1])
            raise ModbusFrameError(f"function code {fc} in response to {self.function_code}",
                                   kind=FrameErrorKind.WRONG_FUNCTION)
        kind = self._kind
        if kind == _DEVICE_ID:
            return self._parse_identification(buf, start, end)
        if kind <= _READ_REGISTERS:
            byte_count = buf[start + 1]
            expected = 2 * self.count if kind == _READ_REGISTERS else (self.count + 7) >> 3
            if byte_count != expected:
                raise ModbusFrameError(
                    f"byte count {byte_count}, expected {expected} for {self.count} "
                    f"{'registers' if kind == _READ_REGISTERS else 'bits'}",
                    kind=FrameErrorKind.SHORT if byte_count < expected else FrameErrorKind.GARBLED,
                )
            if size != 2 + byte_count:
                raise ModbusFrameError(
                    f"read response of {size} bytes, expected {2 + byte_count}",
                    kind=FrameErrorKind.SHORT if size < 2 + byte_count else FrameErrorKind.GARBLED,
                )
            if kind == _READ_REGISTERS:
                return list(_REGISTERS[self.count].unpack_from(buf, start + 2))
            bits: list[bool] = []
            for i in range(start + 2, end):
                bits.extend(_BITS[buf[i]])
            del bits[self.count :]
            return bits
        echo = self.pdu if kind == _WRITE_SINGLE else self.pdu[:5]
        if size != len(echo) or buf[start:end] != echo:
            raise ModbusFrameError(
                f"write response {bytes(buf[start:end]).hex()} does not echo {echo.hex()}",
                kind=FrameErrorKind.GARBLED,
            )
        return None

    def _parse_identification(self, buf: Buffer, start: int, end: int) -> DeviceIdentification:
        size = end - start
        if size < _MEI_RESPONSE.size:
            raise ModbusFrameError(
                f"device identification response of {size} bytes, expected at least "
                f"{_MEI_RESPONSE.size}", kind=FrameErrorKind.SHORT)
        _, mei, code, conformity, more, next_id, n = _MEI_RESPONSE.unpack_from(buf, start)
        if mei != MEI_READ_DEVICE_ID:
            raise ModbusFrameError(f"MEI type {mei} in response to MEI type {MEI_READ_DEVICE_ID}",
                                   kind=FrameErrorKind.WRONG_FUNCTION)
        if code != self.count:
            raise ModbusFrameError(f"ReadDevId code {code} in response to code {self.count}",
                                   kind=FrameErrorKind.GARBLED)
        if more not in (0, MORE_FOLLOWS):
            raise ModbusFrameError(f"MoreFollows 0x{more:02X}, expected 0x00 or 0xFF",
                                   kind=FrameErrorKind.GARBLED)
        objects: dict[int, bytes] = {}
        pos = start + _MEI_RESPONSE.size
        for i in range(n):
            if pos + 2 > end:
                raise ModbusFrameError(
                    f"device identification response ends after {i} of {n} objects",
                    kind=FrameErrorKind.SHORT)
            object_id, length = buf[pos], buf[pos + 1]
            pos += 2
            if pos + length > end:
                raise ModbusFrameError(
                    f"object 0x{object_id:02X} of {length} bytes runs past the end of the "
                    f"response ({end - pos} bytes left)", kind=FrameErrorKind.SHORT)
            if object_id in objects:
                raise ModbusFrameError(f"object 0x{object_id:02X} sent twice",
                                       kind=FrameErrorKind.GARBLED)
            objects[object_id] = bytes(buf[pos : pos + length])
            pos += length
        if pos != end:
            raise ModbusFrameError(
                f"{end - pos} bytes after the {n} objects of a device identification response",
                kind=FrameErrorKind.GARBLED)
        return DeviceIdentification(code, conformity, more == MORE_FOLLOWS, next_id, objects)


def _check_range(address: int, count: int, limit: int, what: str) -> None:
    if not 1 <= count <= limit:
        raise ValueError(f"{what}: quantity {count} outside 1..{limit}")
    if address < 0 or address + count > 0x10000:
        raise ValueError(f"{what}: addresses {address}..{address + count - 1} outside 0..65535")


@lru_cache(maxsize=4096)
def read_request(function_code: int, address: int, count: int) -> Request:
    """A read of ``count`` items from ``address`` (0-based protocol address).

    Function codes (Application Protocol V1.1b3 §6.1–§6.4): 1 coils, 2 discrete
    inputs (1..2000 bits), 3 holding registers, 4 input registers (1..125 registers).
    Request PDU: fc u8, address u16 BE, quantity u16 BE. Raises ValueError for
    another function code or a quantity or address range outside those limits.
    Results are cached: equal arguments give the same object.
    """
    if function_code in (1, 2):
        kind, limit = _READ_BITS, MAX_READ_BITS
    elif function_code in (3, 4):
        kind, limit = _READ_REGISTERS, MAX_READ_REGISTERS
    else:
        raise ValueError(f"function code {function_code} is not a read (1, 2, 3, 4)")
    _check_range(address, count, limit, f"read fc {function_code}")
    return Request(
        kind, function_code, address, count, _FC_ADDR_QTY.pack(function_code, address, count)
    )


def write_registers_request(address: int, values: Sequence[int]) -> Request:
    """A write of holding registers: FC 6 for one value, FC 16 for 2..123.

    FC 6 (V1.1b3 §6.6): fc, address u16, value u16; the response echoes the request.
    FC 16 (§6.12): fc, address u16, quantity u16, byte count u8 (2 × quantity), values
    u16 BE; the response echoes fc, address, quantity. Values must be 0..65535;
    raises ValueError otherwise or for an empty or too long ``values``.
    """
    count = len(values)
    _check_range(address, count, MAX_WRITE_REGISTERS, "write registers")
    for v in values:
        if not 0 <= v <= 0xFFFF:
            raise ValueError(f"register value {v} outside 0..65535")
    if count == 1:
        return Request(_WRITE_SINGLE, 6, address, 1, _FC_ADDR_QTY.pack(6, address, values[0]))
    pdu = _FC_ADDR_QTY_N.pack(16, address, count, 2 * count) + _REGISTERS[count].pack(*values)
    return Request(_WRITE_MULTIPLE, 16, address, count, pdu)


def write_coils_request(address: int, values: Sequence[bool]) -> Request:
    """A write of coils: FC 5 for one value, FC 15 for 2..1968.

    FC 5 (V1.1b3 §6.5): fc, address u16, 0xFF00 (on) or 0x0000 (off); the response
    echoes the request. FC 15 (§6.11): fc, address u16, quantity u16, byte count u8,
    bits packed LSB-first (first coil = bit 0 of the first byte, unused high bits 0);
    the response echoes fc, address, quantity. Raises ValueError for an empty or too
    long ``values`` or an address range past 65535.
    """
    count = len(values)
    _check_range(address, count, MAX_WRITE_COILS, "write coils")
    if count == 1:
        return Request(
            _WRITE_SINGLE, 5, address, 1, _FC_ADDR_QTY.pack(5, address, 0xFF00 if values[0] else 0)
        )
    packed = bytearray((count + 7) >> 3)
    for i, v in enumerate(values):
        if v:
            packed[i >> 3] |= 1 << (i & 7)
    pdu = _FC_ADDR_QTY_N.pack(15, address, count, len(packed)) + packed
    return Request(_WRITE_MULTIPLE, 15, address, count, pdu)


def mask_write_request(address: int, and_mask: int, or_mask: int) -> Request:
    """A Mask Write Register (FC 22, V1.1b3 §6.16) of the holding register at ``address``.

    Request PDU: fc 0x16, address u16 BE, AND mask u16 BE, OR mask u16 BE (7 bytes);
    the normal response echoes the request. The device sets the register to
    ``(current AND and_mask) OR (or_mask AND (NOT and_mask))``: and_mask 0xFFFF ^ bit,
    or_mask bit sets a bit; or_mask 0 clears it (:func:`edge.modbus.codec.bit_mask`).
    Raises ValueError for an address or a mask outside 0..65535.
    """
    _check_range(address, 1, 1, "mask write register")
    for name, mask in (("AND", and_mask), ("OR", or_mask)):
        if not 0 <= mask <= 0xFFFF:
            raise ValueError(f"mask write register: {name} mask {mask} outside 0..65535")
    return Request(
        _WRITE_SINGLE, 22, address, 1, _MASK_WRITE.pack(22, address, and_mask, or_mask)
    )


@lru_cache(maxsize=1024)
def device_identification_request(code: int, object_id: int) -> Request:
    """Read Device Identification (FC 43 / MEI 14, V1.1b3 §6.21) from ``object_id``.

    ``code``: 1 basic, 2 regular, 3 extended stream, 4 one specific object;
    ``object_id`` 0..255 (0 to start a stream). Request PDU: 0x2B, 0x0E, code u8,
    object id u8 (4 bytes). Response PDU: 0x2B, 0x0E, code, conformity level,
    MoreFollows (0x00 or 0xFF), NextObjectId, NumberOfObjects, then that many
    ``{id u8, length u8, value}``; :meth:`Request.parse` returns it as a
    :class:`DeviceIdentification` and raises :class:`ModbusFrameError` when the
    response is shorter than 7 bytes or an object runs past its end (``SHORT``), for
    another MEI type (``WRONG_FUNCTION``), another code echoed, a MoreFollows other
    than 0x00/0xFF, an object id sent twice or bytes after the last object
    (``GARBLED``); an exception response (0xAB: 1 unsupported, 2 bad object id) is
    a :class:`ModbusExceptionError`. Raises ValueError for a code outside 1..4 or an
    object id outside 0..255. Results are cached: equal arguments give the same object.
    """
    if not DEVICE_ID_BASIC <= code <= DEVICE_ID_SPECIFIC:
        raise ValueError(f"ReadDevId code {code} outside 1..4")
    if not 0 <= object_id <= 0xFF:
        raise ValueError(f"object id {object_id} outside 0..255")
    return Request(
        _DEVICE_ID, ENCAPSULATED_INTERFACE, object_id, code,
        _MEI_REQUEST.pack(ENCAPSULATED_INTERFACE, MEI_READ_DEVICE_ID, code, object_id),
    )


def identification_text(objects: Mapping[int, bytes]) -> dict[str, str]:
    """The identification objects by name, their values as text.

    Names: :data:`STANDARD_OBJECTS` for 0–6, ``0xNN`` (two upper-case hex digits) for
    any other id. V1.1b3 §6.21 types the standard objects as ASCII strings; values are
    decoded as UTF-8 (a superset of ASCII) and, where that fails, as Latin-1 (which
    decodes any byte, so nothing is lost or replaced), then stripped of surrounding
    whitespace and NUL padding. Order follows ``objects``.
    """
    out: dict[str, str] = {}
    for object_id, raw in objects.items():
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            text = raw.decode("latin-1")
        out[STANDARD_OBJECTS.get(object_id, f"0x{object_id:02X}")] = text.strip(" \t\r\n\0")
    return out


def mbap_adu(transaction_id: int, unit_id: int, pdu: bytes) -> bytes:
    """MBAP header + PDU (TCP/IP Guide V1.0b §3.1.3); protocol id 0, length = 1 + len(pdu)."""
    return MBAP.pack(transaction_id, 0, len(pdu) + 1, unit_id) + pdu


def _make_crc_table() -> tuple[int, ...]:
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0xA001 if crc & 1 else crc >> 1
        table.append(crc)
    return tuple(table)


_CRC_TABLE = _make_crc_table()


def crc16(data: Buffer, start: int = 0, end: int | None = None) -> int:
    """CRC-16/MODBUS of ``data[start:end]`` (Serial Line V1.02 §6.2.2).

    Reflected polynomial 0xA001 (0x8005), initial value 0xFFFF, no final XOR,
    table-driven. The CRC is sent low byte first; a frame that ends with its own
    correct CRC therefore has a CRC of 0 over the whole frame.
    """
    crc = 0xFFFF
    table = _CRC_TABLE
    for i in range(start, len(data) if end is None else end):
        crc = (crc >> 8) ^ table[(crc ^ data[i]) & 0xFF]
    return crc


def rtu_adu(unit_id: int, pdu: bytes) -> bytes:
    """RTU ADU (Serial Line V1.02 §2.5.1): unit id u8 + PDU + CRC-16 little-endian."""
    frame = bytes((unit_id,)) + pdu
    return frame + _CRC.pack(crc16(frame))


def rtu_response_length(buf: Buffer, start: int = 0) -> int | None:
    """Total length of the RTU response frame that begins at ``buf[start]``.

    Needs the first 3 bytes (unit id, function code, byte count or address high).
    Exception (fc ≥ 0x80): 5; reads (fc 1–4): 5 + byte count; writes (5, 6, 15, 16): 8;
    mask write (22): 10. Read Device Identification (fc 43, MEI type 14): 10 (unit,
    7-byte header, CRC) + 2 + length of each object, walked as far as the buffer
    holds; while the header or the object list is incomplete the result is a lower
    bound larger than the bytes at hand (the caller waits for more and asks again).
    Returns None when the frame cannot be delimited: any other function code or MEI
    type, or an object list that would make the frame longer than
    :data:`MAX_RTU_FRAME`.
    """
    fc = buf[start + 1]
    if fc & 0x80:
        return 5
    if 1 <= fc <= 4:
        return 5 + buf[start + 2]
    if fc in (5, 6, 15, 16):
        return 8
    if fc == 22:
        return 10
    if fc == ENCAPSULATED_INTERFACE and buf[start + 2] == MEI_READ_DEVICE_ID:
        return _rtu_identification_length(buf, start)
    return None


def _rtu_identification_length(buf: Buffer, start: int) -> int | None:
    """:func:`rtu_response_length` of an FC 43 / MEI 14 response."""
    header = 1 + _MEI_RESPONSE.size  # unit id + response header
    have = len(buf) - start
    if have < header:
        return header + 2
    pos = header  # relative to start
    for _ in range(buf[start + header - 1]):
        if pos + 2 > have:
            return pos + 4  # at least the object's id and length, and the CRC
        pos += 2 + buf[start + pos + 1]
        if pos + 2 > MAX_RTU_FRAME:
            return None
    return pos + 2


def rtu_silence(baudrate: int, bytesize: int = 8, parity: str = "N", stopbits: float = 1) -> float:
    """The inter-frame silence t3.5 in seconds (Serial Line V1.02 §2.5.1.1).

    3.5 character times (start + data + parity + stop bits per character); fixed at
    1.75 ms above 19200 baud.
    """
    if baudrate > 19200:
        return 0.00175
    return 3.5 * (1 + bytesize + (parity.upper() != "N") + stopbits) / baudrate
