"""Register and bit codec: Modbus words or bits <-> property values (DESIGN.md §4).

Source of the format: KubeEdge mappers-go ``mappers/modbus-dmi/device/twindata.go``.
Decoding takes the ``limit`` registers of a property, reverses their order when
``isRegisterSwap``, then swaps the two bytes of each register when ``isSwap``,
decodes the bytes big-endian as the raw type and multiplies by ``scale``.
Encoding (writes) is the exact inverse: unscale, encode big-endian, byte swap,
word swap.

Output rules (shared with the uplink, so a value means the same everywhere):

* integers with scale 1 or an integral scale stay ``int``;
* integers with a non-integral scale become ``float``: ``raw * scale`` computed
  from the decimal the scale is written as and rounded once, so raw 2315 with scale
  0.1 gives 231.5 (the float nearest the exact decimal), never 231.50000000000003;
* ``float32`` becomes the shortest decimal that round-trips (through float64) to
  the same float32, so 0x4365CCCD gives 229.8, not 229.8000030517578; ``float64``
  is taken as is; a scale other than 1 then multiplies and the product is rounded
  to 15 significant digits (float64's decimal precision), removing binary noise;
* NaN and ±infinity raise :class:`CodecError` (the poller marks the property bad);
* ``string``: the bytes after the swaps as UTF-8 (errors replaced), trailing NUL
  and spaces stripped; ``bytes``: the bytes after the swaps as lowercase hex;
  ``boolean``: register != 0; ``bit``: bit ``visitor.bit`` (0 = LSB) of the
  register after the byte swap;
* bit tables (coils, discrete inputs): ``boolean`` is the bit; an unsigned integer
  type packs ``limit`` bits first-address-first into bit 0, then scales.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Callable, Sequence
from fractions import Fraction
from typing import TypeVar

from edge.config.model import RawType, Value, Visitor

Decoder = Callable[[Sequence[int] | Sequence[bool], int], Value]
"""``dec(data, index)``: decode one property from the words (register tables) or
bits (bit tables) of a whole read request, starting at ``index``. ``data`` must hold
at least ``index + limit`` items; register words are 0..65535."""

_Data = Sequence[int] | Sequence[bool]
_Reader = Callable[[_Data, int], int]
_FloatReader = Callable[[_Data, int], float]
_N = TypeVar("_N", int, float)


class CodecError(ValueError):
    """A value that cannot be decoded or encoded; the message names the raw type,
    the value and what is allowed."""


_STRUCT_CODE = {
    RawType.INT16: "h",
    RawType.UINT16: "H",
    RawType.INT32: "i",
    RawType.UINT32: "I",
    RawType.INT64: "q",
    RawType.UINT64: "Q",
    RawType.FLOAT32: "f",
    RawType.FLOAT64: "d",
}
_FLOAT32 = struct.Struct(">f")
_FLOAT32_MAX = 3.4028234663852886e38
_FLOAT32_MIN_NORMAL = 2.0**-126
_SIGNIFICANT_FLOAT64 = ".15g"


def decoder_for(visitor: Visitor) -> Decoder:
    """Compile the decoder of one property (see :func:`_plain_decoder` and the module
    docstring), with its "not implemented" value and scale factor register if any.

    Raises:
        CodecError: as :func:`_plain_decoder`; a scale factor on a type that is not a
            fixed-width integer of a register table. The decoder raises CodecError
            for the ``missing`` raw value, a missing (0x8000) scale factor and one
            outside -10..10.
    """
    if visitor.scale_factor is None:
        decoder = _plain_decoder(visitor)
    else:
        decoder = _scale_factor_decoder(visitor)
    if visitor.missing is not None:
        decoder = _with_missing(visitor, decoder)
    return decoder


SCALE_FACTOR_MISSING = 0x8000
"""The int16 scale factor value that means "not implemented" (SunSpec ``sunssf``)."""
SCALE_FACTOR_RANGE = range(-10, 11)
"""Exponents a scale factor may hold (SunSpec Information Model: -10..10)."""
_POWERS_OF_TEN: tuple[int, ...] = tuple(10**i for i in range(11))


def _scale_factor_decoder(visitor: Visitor) -> Decoder:
    """raw × scale × 10^e, e the int16 at ``visitor.scale_factor``: an int while the
    product is integral by construction (e ≥ 0, integral scale), else the float nearest
    the exact decimal (raw -12345, e -2 → -123.45)."""
    sf = visitor.scale_factor
    if visitor.table.is_bit or not visitor.raw_type.is_integer or sf is None:
        raise CodecError(
            f"a scale factor register applies to integer types of register tables, "
            f"not to {visitor.raw_type} of {visitor.table}"
        )
    _check_register_limit(visitor)
    delta = sf - visitor.offset
    num, den = _scale_fraction(visitor)
    unscaled = _integer_reader(visitor)

    def scaled(data: Sequence[int] | Sequence[bool], index: int) -> Value:
        word = int(data[index + delta])
        if word == SCALE_FACTOR_MISSING:
            raise CodecError(f"scale factor register {sf} is not implemented (0x8000)")
        exponent = word - 0x10000 if word & 0x8000 else word
        if exponent not in SCALE_FACTOR_RANGE:
            raise CodecError(f"scale factor {exponent} at register {sf} is outside -10..10")
        raw = unscaled(data, index) * num
        if exponent >= 0:
            raw *= _POWERS_OF_TEN[exponent]
            if den == 1:
                return raw
            return raw / den  # one correctly rounded division: the nearest float
        return raw / (den * _POWERS_OF_TEN[-exponent])

    return scaled


def _with_missing(visitor: Visitor, decoder: Decoder) -> Decoder:
    missing, limit = visitor.missing, visitor.limit
    if visitor.table.is_bit:
        raise CodecError(f"a not-implemented value applies to register tables, not {visitor.table}")

    def checked(data: Sequence[int] | Sequence[bool], index: int) -> Value:
        raw = 0
        for word in data[index : index + limit]:
            raw = raw << 16 | int(word)
        if raw == missing:
            raise CodecError(f"not implemented by the device (raw value {missing:#x})")
        return decoder(data, index)

    return checked


def _plain_decoder(visitor: Visitor) -> Decoder:
    """The decoder of a property without scale factor register; see the module
    docstring for the rules.

    Every choice that depends on the visitor (struct formats, swaps, scale) is made
    here, once; the returned function only indexes, unpacks and scales.

    Raises:
        CodecError: the visitor cannot be decoded (raw type not allowed in its
            table, ``limit`` not matching the raw type, bit index outside 0..15,
            scale zero or not finite). The returned decoder raises CodecError
            for NaN or infinite floats.
    """
    num, den = _scale_fraction(visitor)
    if visitor.table.is_bit:
        reader = _bit_table_reader(visitor)
        return _scaled_int(reader, num, den) if visitor.raw_type.is_integer else reader
    raw = visitor.raw_type
    if raw in (RawType.STRING, RawType.BYTES):
        return _text_reader(visitor)
    _check_register_limit(visitor)
    if raw is RawType.BOOLEAN:
        return _boolean_reader
    if raw is RawType.BIT:
        return _bit_reader(visitor)
    if raw.is_integer:
        return _scaled_int(_integer_reader(visitor), num, den)
    return _scaled_float(_float_reader(visitor), num, den)


def decode(visitor: Visitor, data: Sequence[int] | Sequence[bool]) -> Value:
    """Decode one property from its own words or bits: ``decoder_for(visitor)(data, 0)``.

    Raises:
        CodecError: as :func:`decoder_for` and its decoder.
    """
    return decoder_for(visitor)(data, 0)


def encode(visitor: Visitor, value: Value) -> list[int] | list[bool]:
    """The words (register tables, 0..65535 each) or bits (bit tables) that write
    ``value``: ``limit`` items, ready for FC 16/6 or FC 15/5.

    The exact inverse of :func:`decode`: integer types divide by the scale and round
    to nearest (halves away from zero), floats divide by the scale, strings are
    UTF-8 padded with NUL to ``limit * 2`` bytes, bytes are hex of exactly
    ``limit * 2`` bytes, booleans write 1/0; then big-endian, byte swap, word swap.
    ``decode(visitor, encode(visitor, v)) == v`` for every value ``v`` that decoding
    can produce. A ``bit`` inside a register encodes as a word holding only that bit:
    writing it whole would clear the other 15 bits, so writers use :func:`bit_mask`
    (FC 22) or read-modify-write instead.

    Raises:
        CodecError: the value has the wrong kind for the raw type, is out of the raw
            type's range after unscaling (the message gives the range), is not
            finite, or is too long.
    """
    if visitor.table.is_bit:
        return _encode_bits(visitor, value)
    return _encode_registers(visitor, value)


def bit_mask(visitor: Visitor, value: Value) -> tuple[int, int]:
    """``(and_mask, or_mask)`` of a Modbus mask write (FC 22) that sets a ``bit``
    property to ``value`` and leaves the other 15 bits of its register alone.

    The device computes ``(current & and_mask) | (or_mask & ~and_mask)``. The bit
    position accounts for ``isSwap`` exactly as decoding does.

    Raises:
        CodecError: the visitor is not a bit inside a register, or ``value`` is not
            a boolean (or 0/1).
    """
    if visitor.table.is_bit or visitor.raw_type is not RawType.BIT:
        raise CodecError(
            f"bit_mask needs a bit inside a register, got {visitor.raw_type} in {visitor.table}"
        )
    mask = 1 << _wire_bit(visitor)
    return 0xFFFF ^ mask, mask if _as_bool(visitor.raw_type, value) else 0


# -- decoding ---------------------------------------------------------------------


def _scale_fraction(visitor: Visitor) -> tuple[int, int]:
    """The scale as the exact fraction of the decimal it is written as (0.1 -> 1/10)."""
    scale = visitor.scale
    if not math.isfinite(scale) or scale == 0:
        raise CodecError(f"scale {scale!r} is not allowed; it must be finite and non-zero")
    exact = Fraction(repr(float(scale)))
    return exact.numerator, exact.denominator


def _check_register_limit(visitor: Visitor) -> None:
    count = visitor.raw_type.register_count
    if visitor.limit != count:
        raise CodecError(
            f"{visitor.raw_type} reads exactly {count} register(s), not limit {visitor.limit}"
        )


def _scaled_int(reader: _Reader, num: int, den: int) -> Decoder:
    if num == 1 and den == 1:
        return reader
    if den == 1:
        return lambda data, index: reader(data, index) * num
    # int * int / int is one correctly rounded division: the float nearest the
    # exact decimal product, whose repr has the scale's decimals.
    return lambda data, index: reader(data, index) * num / den


def _scaled_float(reader: _FloatReader, num: int, den: int) -> Decoder:
    if num == 1 and den == 1:
        return reader
    scale = num / den

    def scaled(data: Sequence[int] | Sequence[bool], index: int) -> float:
        value = reader(data, index) * scale
        if math.isinf(value):  # a finite reading times the scale can overflow float64
            raise CodecError(f"{reader(data, index)!r} × scale {scale!r} overflows float64")
        return float(format(value, _SIGNIFICANT_FLOAT64))

    return scaled


def _word_formats(visitor: Visitor, code: str) -> tuple[struct.Struct, struct.Struct]:
    """Structs that pack the words as read and unpack the value after both swaps.

    Packing the words little-endian swaps the bytes of each word; unpacking the
    whole little-endian reverses all bytes, i.e. reverses the word order and swaps
    each word's bytes. So: pack '<' iff exactly one swap is set, unpack '<' iff
    the register swap is set (2×2 cases, checked against KubeEdge patterns in tests).
    """
    count = visitor.limit  # == register_count, checked by _check_register_limit
    pack_order = "<" if visitor.is_swap != visitor.is_register_swap else ">"
    unpack_order = "<" if visitor.is_register_swap else ">"
    return struct.Struct(pack_order + "H" * count), struct.Struct(unpack_order + code)


def _integer_reader(visitor: Visitor) -> _Reader:
    raw = visitor.raw_type
    if raw is RawType.UINT16 and not visitor.is_swap:
        return lambda data, index: data[index]
    if raw is RawType.INT16 and not visitor.is_swap:
        return lambda data, index: data[index] - ((data[index] & 0x8000) << 1)
    return _unpacking_reader(*_word_formats(visitor, _STRUCT_CODE[raw]), int)


def _unpacking_reader(
    packer: struct.Struct, unpacker: struct.Struct, kind: type[_N]
) -> Callable[[_Data, int], _N]:
    """A reader for 1, 2 or 4 words; ``kind`` is the Python type ``unpacker`` yields."""
    pack, unpack = packer.pack, unpacker.unpack
    words = packer.size // 2
    if words == 1:

        def read1(data: _Data, index: int) -> _N:
            value: _N = unpack(pack(data[index]))[0]
            return value

        return read1
    if words == 2:

        def read2(data: _Data, index: int) -> _N:
            value: _N = unpack(pack(data[index], data[index + 1]))[0]
            return value

        return read2

    def read4(data: _Data, index: int) -> _N:
        value: _N = unpack(pack(data[index], data[index + 1], data[index + 2], data[index + 3]))[0]
        return value

    return read4


def _float_reader(visitor: Visitor) -> _FloatReader:
    raw = visitor.raw_type
    packer, unpacker = _word_formats(visitor, _STRUCT_CODE[raw])
    isfinite = math.isfinite
    if raw is RawType.FLOAT64:
        read = _unpacking_reader(packer, unpacker, float)

        def read64(data: _Data, index: int) -> float:
            value = read(data, index)
            if isfinite(value):
                return value
            raise _not_finite(raw, value, data[index : index + 4])

        return read64
    pack, unpack = packer.pack, unpacker.unpack
    shortest = _shortest_float32
    f32_pack, f32_unpack = _FLOAT32.pack, _FLOAT32.unpack
    normal, largest = _FLOAT32_MIN_NORMAL, _FLOAT32_MAX

    def read32(data: _Data, index: int) -> float:
        value: float = unpack(pack(data[index], data[index + 1]))[0]
        # most readings are short decimals: 6 digits, inlined (see _shortest_float32)
        short = float(format(value, ".6g"))
        if f32_unpack(f32_pack(short))[0] == value and normal <= abs(value) <= largest:
            return short
        if isfinite(value):
            return shortest(value)
        raise _not_finite(raw, value, data[index : index + 2])

    return read32


_LONGER_DIGITS = (".7g", ".8g")
_SUBNORMAL_DIGITS = (".1g", ".2g", ".3g", ".4g", ".5g", ".6g", *_LONGER_DIGITS)


def _shortest_float32(value: float) -> float:
    """The float64 of the shortest decimal that round-trips to the finite float32
    ``value``, when 6 digits did not (or ``value`` is zero or subnormal).

    For a normal float32 (relative half-ulp <= 6e-8, far below the 6-digit spacing
    of >= 1e-6) a round-tripping decimal of <= 6 digits is exactly what rounding to
    6 digits yields, so the decoder tries 6 digits first and this search goes on at
    7; zero and subnormals have fewer bits and start at 1. 9 digits always round-trip.
    """
    pack, unpack = _FLOAT32.pack, _FLOAT32.unpack
    for digits in _LONGER_DIGITS if abs(value) >= _FLOAT32_MIN_NORMAL else _SUBNORMAL_DIGITS:
        candidate = float(format(value, digits))
        if unpack(pack(candidate))[0] == value:
            return candidate
    return float(format(value, ".9g"))


def _not_finite(raw: RawType, value: float, words: Sequence[int] | Sequence[bool]) -> CodecError:
    hexed = " ".join(f"0x{word:04X}" for word in words)
    return CodecError(
        f"{raw} value {value!r} (registers {hexed}) is not finite; only finite numbers "
        "are valid readings"
    )


def _text_count(visitor: Visitor) -> int:
    if visitor.limit < 1:
        raise CodecError(f"{visitor.raw_type} needs limit >= 1 register, not {visitor.limit}")
    return visitor.limit


def _text_reader(visitor: Visitor) -> Decoder:
    count = _text_count(visitor)
    pack = struct.Struct(("<" if visitor.is_swap else ">") + "H" * count).pack
    step = -1 if visitor.is_register_swap else 1
    if visitor.raw_type is RawType.BYTES:
        return lambda data, index: pack(*data[index : index + count][::step]).hex()
    return lambda data, index: (
        pack(*data[index : index + count][::step]).rstrip(b"\x00 ").decode("utf-8", "replace")
    )


def _boolean_reader(data: _Data, index: int) -> bool:
    return data[index] != 0


def _wire_bit(visitor: Visitor) -> int:
    """Bit position on the wire: ``isSwap`` exchanges the two bytes, i.e. bit b <-> b ^ 8."""
    bit = visitor.bit
    if bit is None or not 0 <= bit <= 15:
        raise CodecError(f"bit needs a bit index 0..15 (0 = LSB), got {bit!r}")
    return bit ^ 8 if visitor.is_swap else bit


def _bit_reader(visitor: Visitor) -> Decoder:
    shift = _wire_bit(visitor)
    return lambda data, index: (data[index] >> shift) & 1 == 1


def _bit_table_reader(visitor: Visitor) -> _Reader:
    raw = visitor.raw_type
    if raw is RawType.BOOLEAN:
        if visitor.limit != 1:
            raise CodecError(f"boolean in {visitor.table} reads 1 bit, not limit {visitor.limit}")
        return lambda data, index: bool(data[index])
    bits = raw.bits
    if bits is None or raw.signed:
        raise CodecError(
            f"{raw} cannot be read from {visitor.table}; allowed: boolean, uint16, uint32, uint64"
        )
    count = visitor.limit
    if not 1 <= count <= bits:
        raise CodecError(f"{raw} in {visitor.table} packs 1..{bits} bits, not limit {count}")
    weights = tuple(1 << k for k in range(count))
    return lambda data, index: sum(
        weight for weight, bit in zip(weights, data[index : index + count], strict=True) if bit
    )


# -- encoding ---------------------------------------------------------------------


def _encode_bits(visitor: Visitor, value: Value) -> list[bool]:
    _bit_table_reader(visitor)  # validates the raw type and limit
    if visitor.raw_type is RawType.BOOLEAN:
        return [_as_bool(visitor.raw_type, value)]
    bits = _unscale_integer(visitor, value, 0, (1 << visitor.limit) - 1)
    return [bool(bits >> k & 1) for k in range(visitor.limit)]


def _encode_registers(visitor: Visitor, value: Value) -> list[int]:
    raw = visitor.raw_type
    if raw is RawType.STRING:
        return _words(visitor, _string_bytes(visitor, value))
    if raw is RawType.BYTES:
        return _words(visitor, _hex_bytes(visitor, value))
    _check_register_limit(visitor)
    if raw is RawType.BOOLEAN:
        return _words(visitor, b"\x00\x01" if _as_bool(raw, value) else b"\x00\x00")
    if raw is RawType.BIT:
        return [1 << _wire_bit(visitor) if _as_bool(raw, value) else 0]
    code = ">" + _STRUCT_CODE[raw]
    if raw.is_integer:
        raw_value = _unscale_integer(visitor, value, *_integer_range(raw))
        return _words(visitor, struct.pack(code, raw_value))
    return _words(visitor, _float_bytes(visitor, code, value))


def _words(visitor: Visitor, raw: bytes) -> list[int]:
    """Big-endian value bytes -> the words to write: byte swap, then word swap."""
    words = list(struct.unpack(("<" if visitor.is_swap else ">") + "H" * (len(raw) // 2), raw))
    if visitor.is_register_swap:
        words.reverse()
    return words


def _as_bool(raw: RawType, value: Value) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return value == 1
    raise CodecError(f"{raw} needs true/false (or 0/1), got {value!r}")


def _number(raw: RawType, value: Value) -> int | float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise CodecError(f"{raw} needs a number, got {value!r}")
    return value


def _integer_range(raw: RawType) -> tuple[int, int]:
    bits = raw.bits or 0
    return (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if raw.signed else (0, (1 << bits) - 1)


def _unscale_integer(visitor: Visitor, value: Value, lo: int, hi: int) -> int:
    """``value / scale`` rounded to nearest (halves away from zero), checked to lo..hi."""
    num, den = _scale_fraction(visitor)
    raw_type = visitor.raw_type
    number = _number(raw_type, value)
    if isinstance(number, float) and not math.isfinite(number):
        raise CodecError(f"{raw_type} cannot hold {number!r}; allowed: finite numbers")
    exact = Fraction(number if isinstance(number, int) else repr(number)) * den / num
    magnitude = math.floor(abs(exact) + Fraction(1, 2))
    raw = -magnitude if exact < 0 else magnitude
    if lo <= raw <= hi:
        return raw
    if num == 1 and den == 1:
        raise CodecError(f"{raw_type} cannot hold {value!r}; allowed {lo}..{hi}")
    low, high = sorted((lo * num / den, hi * num / den) if den != 1 else (lo * num, hi * num))
    raise CodecError(
        f"{raw_type} cannot hold {value!r} (raw {raw} at scale {visitor.scale}); "
        f"allowed raw {lo}..{hi}, i.e. values {low}..{high}"
    )


def _float_bytes(visitor: Visitor, code: str, value: Value) -> bytes:
    num, den = _scale_fraction(visitor)
    raw_type = visitor.raw_type
    number = _number(raw_type, value)
    try:
        unscaled = float(number) if num == 1 and den == 1 else number * den / num
        if math.isfinite(unscaled):
            return struct.pack(code, unscaled)
    except OverflowError:
        pass
    limit = "finite numbers"
    if raw_type is RawType.FLOAT32:
        limit += f" of magnitude <= {_FLOAT32_MAX!r}"
        if num != 1 or den != 1:
            limit += f" before scale {visitor.scale}"
    raise CodecError(f"{raw_type} cannot hold {value!r}; allowed: {limit}")


def _string_bytes(visitor: Visitor, value: Value) -> bytes:
    size = _text_count(visitor) * 2
    if not isinstance(value, str):
        raise CodecError(f"string needs text, got {value!r}")
    data = value.encode("utf-8")
    if len(data) > size:
        raise CodecError(
            f"string {value!r} is {len(data)} UTF-8 bytes; limit {visitor.limit} register(s) "
            f"allows at most {size}"
        )
    return data.ljust(size, b"\x00")


def _hex_bytes(visitor: Visitor, value: Value) -> bytes:
    size = _text_count(visitor) * 2
    try:
        data = bytes.fromhex(value) if isinstance(value, str) else None
    except ValueError:
        data = None
    if data is None or len(data) != size:
        raise CodecError(
            f"bytes needs a hex string of exactly {size} bytes (limit {visitor.limit} "
            f"register(s)), got {value!r}"
        )
    return data
