"""The register codec against known byte patterns (KubeEdge twindata.go semantics).

Expected words are written out by hand (and, for IEEE values, checked against
``struct`` here); nothing expected is produced by calling ``encode``.
"""

from __future__ import annotations

import math
import random
import struct
from decimal import Decimal

import pytest

from edge.config.model import RawType, Table, Value, Visitor
from edge.modbus.codec import CodecError, bit_mask, decode, decoder_for, encode

HR = Table.HOLDING_REGISTER
IR = Table.INPUT_REGISTER
COIL = Table.COIL
DI = Table.DISCRETE_INPUT
SWAPS = [(False, False), (False, True), (True, False), (True, True)]  # (is_swap, is_register_swap)


def reg(
    raw: RawType,
    *,
    limit: int | None = None,
    scale: float = 1.0,
    swap: bool = False,
    regswap: bool = False,
    bit: int | None = None,
    table: Table = HR,
) -> Visitor:
    count = limit if limit is not None else raw.register_count
    assert count is not None
    return Visitor(table, 0, count, raw, scale, swap, regswap, bit)


def swapped(words: list[int], swap: bool, regswap: bool) -> list[int]:
    """The KubeEdge transform undone by hand: what a device with these flags sends."""
    out = list(reversed(words)) if regswap else list(words)
    return [((w & 0xFF) << 8) | (w >> 8) for w in out] if swap else out


def f32_words(x: float) -> list[int]:
    b = struct.pack(">f", x)
    return [b[0] << 8 | b[1], b[2] << 8 | b[3]]


# -- known patterns ----------------------------------------------------------------

F32 = RawType.FLOAT32
DECODE_CASES: list[tuple[str, Visitor, list[int], Value]] = [
    # float32 123.456 = 0x42F6E979 in the four swap layouts
    ("f32 ABCD", reg(F32), [0x42F6, 0xE979], 123.456),
    ("f32 CDAB regswap", reg(F32, regswap=True), [0xE979, 0x42F6], 123.456),
    ("f32 BADC swap", reg(F32, swap=True), [0xF642, 0x79E9], 123.456),
    ("f32 DCBA both", reg(F32, swap=True, regswap=True), [0x79E9, 0xF642], 123.456),
    ("f32 shortest 229.8", reg(F32), [0x4365, 0xCCCD], 229.8),
    ("f32 0.1", reg(F32), [0x3DCC, 0xCCCD], 0.1),
    ("f32 -1.5", reg(F32), [0xBFC0, 0x0000], -1.5),
    ("f32 max", reg(F32), [0x7F7F, 0xFFFF], 3.4028235e38),
    ("f32 min subnormal", reg(F32), [0x0000, 0x0001], 1e-45),
    ("f32 16777216", reg(F32), [0x4B80, 0x0000], 16777216.0),
    ("f32 16777218 needs 8 digits", reg(F32), [0x4B80, 0x0001], 16777218.0),
    ("f32 1.0000001", reg(F32), [0x3F80, 0x0001], 1.0000001),
    ("f32 0.099999994", reg(F32), [0x3DCC, 0xCCCC], 0.099999994),
    ("f32 zero", reg(F32), [0x0000, 0x0000], 0.0),
    # int16 / uint16
    ("i16 1", reg(RawType.INT16), [0x0001], 1),
    ("i16 max", reg(RawType.INT16), [0x7FFF], 32767),
    ("i16 min", reg(RawType.INT16), [0x8000], -32768),
    ("i16 -2", reg(RawType.INT16), [0xFFFE], -2),
    ("i16 -2 swap", reg(RawType.INT16, swap=True), [0xFEFF], -2),
    ("i16 swap", reg(RawType.INT16, swap=True), [0x3412], 0x1234),
    ("i16 regswap is a no-op", reg(RawType.INT16, regswap=True), [0xFFFE], -2),
    ("u16 65534", reg(RawType.UINT16), [0xFFFE], 65534),
    ("u16 swap", reg(RawType.UINT16, swap=True), [0x3412], 0x1234),
    ("u16 both", reg(RawType.UINT16, swap=True, regswap=True), [0x3412], 0x1234),
    # int32 / uint32: 0x00010002 = 65538 in the four layouts, and -2
    ("i32 ABCD", reg(RawType.INT32), [0x0001, 0x0002], 65538),
    ("i32 CDAB", reg(RawType.INT32, regswap=True), [0x0002, 0x0001], 65538),
    ("i32 BADC", reg(RawType.INT32, swap=True), [0x0100, 0x0200], 65538),
    ("i32 DCBA", reg(RawType.INT32, swap=True, regswap=True), [0x0200, 0x0100], 65538),
    ("i32 -2", reg(RawType.INT32), [0xFFFF, 0xFFFE], -2),
    ("i32 -2 regswap", reg(RawType.INT32, regswap=True), [0xFFFE, 0xFFFF], -2),
    ("i32 min", reg(RawType.INT32), [0x8000, 0x0000], -(2**31)),
    ("u32 4294967294", reg(RawType.UINT32), [0xFFFF, 0xFFFE], 4294967294),
    ("u32 DCBA", reg(RawType.UINT32, swap=True, regswap=True), [0x7856, 0x3412], 0x12345678),
    # int64 / uint64 / float64 over 4 words: 0x0102030405060708
    ("i64 ABCDEFGH", reg(RawType.INT64), [0x0102, 0x0304, 0x0506, 0x0708], 0x0102030405060708),
    (
        "i64 regswap",
        reg(RawType.INT64, regswap=True),
        [0x0708, 0x0506, 0x0304, 0x0102],
        0x0102030405060708,
    ),
    (
        "i64 swap",
        reg(RawType.INT64, swap=True),
        [0x0201, 0x0403, 0x0605, 0x0807],
        0x0102030405060708,
    ),
    (
        "i64 both",
        reg(RawType.INT64, swap=True, regswap=True),
        [0x0807, 0x0605, 0x0403, 0x0201],
        0x0102030405060708,
    ),
    ("i64 -2", reg(RawType.INT64), [0xFFFF, 0xFFFF, 0xFFFF, 0xFFFE], -2),
    ("i64 -2 regswap", reg(RawType.INT64, regswap=True), [0xFFFE, 0xFFFF, 0xFFFF, 0xFFFF], -2),
    ("u64 max", reg(RawType.UINT64), [0xFFFF, 0xFFFF, 0xFFFF, 0xFFFF], 2**64 - 1),
    ("u64 read_ts", reg(RawType.UINT64), [0x0000, 0x019A, 0xB3C4, 0xD5E6], 0x019AB3C4D5E6),
    # float64 123.456 = 0x405EDD2F1A9FBE77
    ("f64 ABCD", reg(RawType.FLOAT64), [0x405E, 0xDD2F, 0x1A9F, 0xBE77], 123.456),
    (
        "f64 regswap",
        reg(RawType.FLOAT64, regswap=True),
        [0xBE77, 0x1A9F, 0xDD2F, 0x405E],
        123.456,
    ),
    ("f64 swap", reg(RawType.FLOAT64, swap=True), [0x5E40, 0x2FDD, 0x9F1A, 0x77BE], 123.456),
    (
        "f64 both",
        reg(RawType.FLOAT64, swap=True, regswap=True),
        [0x77BE, 0x9F1A, 0x2FDD, 0x5E40],
        123.456,
    ),
    ("f64 -0.5", reg(RawType.FLOAT64), [0xBFE0, 0, 0, 0], -0.5),
    # scale
    ("KubeEdge temperature int16 x 0.1", reg(RawType.INT16, scale=0.1), [231], 23.1),
    ("u16 2315 x 0.1", reg(RawType.UINT16, scale=0.1), [2315], 231.5),
    ("u16 12345 x 0.01", reg(RawType.UINT16, scale=0.01), [12345], 123.45),
    ("i16 -5 x 0.1", reg(RawType.INT16, scale=0.1), [0xFFFB], -0.5),
    ("i16 -2 x 0.1 swapped", reg(RawType.INT16, scale=0.1, swap=True), [0xFEFF], -0.2),
    ("u16 10 x 0.1 is a float", reg(RawType.UINT16, scale=0.1), [10], 1.0),
    ("u16 x 10 stays int", reg(RawType.UINT16, scale=10), [7], 70),
    ("i16 x -1 stays int", reg(RawType.INT16, scale=-1), [5], -5),
    ("u16 3 x 2.5", reg(RawType.UINT16, scale=2.5), [3], 7.5),
    ("u32 x 0.001", reg(RawType.UINT32, scale=0.001), [0x0001, 0xE240], 123.456),
    ("f32 229.8 x 0.1", reg(F32, scale=0.1), [0x4365, 0xCCCD], 22.98),
    ("f32 123.456 x 10", reg(F32, scale=10), [0x42F6, 0xE979], 1234.56),
    ("f64 0.1 x 3", reg(RawType.FLOAT64, scale=3), [0x3FB9, 0x9999, 0x9999, 0x999A], 0.3),
    # strings: "ABCD", NUL and space padding, swaps, UTF-8
    ("string", reg(RawType.STRING, limit=2), [0x4142, 0x4344], "ABCD"),
    ("string NUL pad", reg(RawType.STRING, limit=3), [0x4142, 0x4344, 0x0000], "ABCD"),
    ("string space pad", reg(RawType.STRING, limit=2), [0x4142, 0x2020], "AB"),
    ("string odd NUL", reg(RawType.STRING, limit=2), [0x4142, 0x4300], "ABC"),
    ("string leading space kept", reg(RawType.STRING, limit=1), [0x2041], " A"),
    ("string swap", reg(RawType.STRING, limit=2, swap=True), [0x4241, 0x4443], "ABCD"),
    ("string regswap", reg(RawType.STRING, limit=2, regswap=True), [0x4344, 0x4142], "ABCD"),
    (
        "string both",
        reg(RawType.STRING, limit=2, swap=True, regswap=True),
        [0x4443, 0x4241],
        "ABCD",
    ),
    ("string swap NUL", reg(RawType.STRING, limit=2, swap=True), [0x4241, 0x0043], "ABC"),
    ("string UTF-8", reg(RawType.STRING, limit=1), [0xC3A9], "é"),
    ("string bad UTF-8 replaced", reg(RawType.STRING, limit=1), [0xFF41], "\ufffdA"),
    ("string all NUL", reg(RawType.STRING, limit=2), [0, 0], ""),
    # bytes (lowercase hex)
    ("bytes", reg(RawType.BYTES, limit=2), [0x0102, 0xABCD], "0102abcd"),
    ("bytes swap", reg(RawType.BYTES, limit=2, swap=True), [0x0102, 0xABCD], "0201cdab"),
    ("bytes regswap", reg(RawType.BYTES, limit=2, regswap=True), [0x0102, 0xABCD], "abcd0102"),
    ("bytes zeros kept", reg(RawType.BYTES, limit=1), [0x0000], "0000"),
    # boolean register: != 0
    ("boolean 0", reg(RawType.BOOLEAN), [0], False),
    ("boolean 1", reg(RawType.BOOLEAN), [1], True),
    ("boolean 0x0100", reg(RawType.BOOLEAN), [0x0100], True),
    ("boolean 0xFFFF swap", reg(RawType.BOOLEAN, swap=True), [0xFFFF], True),
    # bit of a register, 0 = LSB
    ("bit 0 set", reg(RawType.BIT, bit=0), [0x0001], True),
    ("bit 0 clear", reg(RawType.BIT, bit=0), [0xFFFE], False),
    ("bit 15 set", reg(RawType.BIT, bit=15), [0x8000], True),
    ("bit 15 clear", reg(RawType.BIT, bit=15), [0x7FFF], False),
    ("bit 3", reg(RawType.BIT, bit=3), [0x0008], True),
    ("bit 0 swap", reg(RawType.BIT, bit=0, swap=True), [0x0100], True),
    ("bit 0 swap low byte", reg(RawType.BIT, bit=0, swap=True), [0x0001], False),
    ("bit 15 swap", reg(RawType.BIT, bit=15, swap=True), [0x0080], True),
    # input registers decode the same
    ("input register f32", reg(F32, table=IR), [0x4365, 0xCCCD], 229.8),
]


@pytest.mark.parametrize(
    ("visitor", "words", "expected"),
    [pytest.param(v, w, e, id=name) for name, v, w, e in DECODE_CASES],
)
def test_decode_known_patterns(visitor: Visitor, words: list[int], expected: Value) -> None:
    got = decode(visitor, words)
    assert got == expected
    assert type(got) is type(expected)
    assert repr(got) == repr(expected)  # no 231.50000000000003


@pytest.mark.parametrize(
    ("visitor", "words", "expected"),
    [pytest.param(v, w, e, id=name) for name, v, w, e in DECODE_CASES],
)
def test_decoder_reads_at_the_property_index(
    visitor: Visitor, words: list[int], expected: Value
) -> None:
    data = [0xDEAD, 0xBEEF, 0x1234, *words, 0xFFFF]
    assert decoder_for(visitor)(data, 3) == expected


def test_ieee_patterns_match_struct() -> None:
    assert f32_words(123.456) == [0x42F6, 0xE979]
    assert f32_words(229.8) == [0x4365, 0xCCCD]
    assert struct.pack(">d", 123.456).hex() == "405edd2f1a9fbe77"
    assert struct.pack(">d", 0.1).hex() == "3fb999999999999a"
    assert struct.unpack(">f", bytes.fromhex("4365cccd"))[0] == 229.8000030517578


def test_swapped_helper_matches_the_float32_table() -> None:
    for swap, regswap in SWAPS:
        got = swapped([0x42F6, 0xE979], swap, regswap)
        expected = {
            (False, False): [0x42F6, 0xE979],
            (False, True): [0xE979, 0x42F6],
            (True, False): [0xF642, 0x79E9],
            (True, True): [0x79E9, 0xF642],
        }[swap, regswap]
        assert got == expected


def test_negative_zero_float32() -> None:
    got = decode(reg(F32), [0x8000, 0x0000])
    assert got == 0.0
    assert isinstance(got, float)
    assert math.copysign(1.0, got) == -1.0


# -- bit tables --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("visitor", "bits", "expected"),
    [
        (Visitor(COIL, 0, 1, RawType.BOOLEAN), [True], True),
        (Visitor(COIL, 0, 1, RawType.BOOLEAN), [False], False),
        (Visitor(DI, 0, 1, RawType.BOOLEAN), [True], True),
        (Visitor(COIL, 0, 4, RawType.UINT16), [True, False, True, True], 0b1101),
        (Visitor(DI, 0, 4, RawType.UINT16), [False, False, False, True], 8),
        (Visitor(COIL, 0, 16, RawType.UINT16), [True] * 16, 65535),
        (Visitor(COIL, 0, 1, RawType.UINT16), [True], 1),
        (Visitor(COIL, 0, 20, RawType.UINT32), [False] * 19 + [True], 1 << 19),
        (Visitor(COIL, 0, 64, RawType.UINT64), [True] * 64, 2**64 - 1),
        (Visitor(COIL, 0, 3, RawType.UINT16, scale=0.5), [True, True, True], 3.5),
    ],
)
def test_bit_tables(visitor: Visitor, bits: list[bool], expected: Value) -> None:
    assert decode(visitor, bits) == expected
    assert type(decode(visitor, bits)) is type(expected)
    assert decoder_for(visitor)([True, False, *bits], 2) == expected
    assert encode(visitor, expected) == bits


# -- float32: shortest decimal, independently brute-forced -------------------------


def shortest_float32_brute(x: float) -> float:
    for digits in range(1, 10):
        candidate = float(f"{x:.{digits}g}")
        if struct.unpack(">f", struct.pack(">f", candidate))[0] == x:
            return candidate
    raise AssertionError(x)


def test_float32_is_the_shortest_round_tripping_decimal() -> None:
    rng = random.Random(4321)
    patterns = [rng.getrandbits(32) for _ in range(20000)]
    patterns += [rng.getrandbits(23) for _ in range(2000)]  # subnormals
    patterns += [0x3F800000 + k for k in range(-50, 50)]  # around 1.0
    dec = decoder_for(reg(F32))
    checked = 0
    for bits in patterns:
        x = struct.unpack(">f", bits.to_bytes(4, "big"))[0]
        if not math.isfinite(x):
            continue
        words = [bits >> 16, bits & 0xFFFF]
        got = dec(words, 0)
        assert got == shortest_float32_brute(x), hex(bits)
        assert struct.pack(">f", got) == bits.to_bytes(4, "big")
        checked += 1
    assert checked > 20000


# -- NaN / infinity ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("visitor", "words", "shown"),
    [
        (reg(F32), [0x7FC0, 0x0000], "nan"),
        (reg(F32), [0x7F80, 0x0000], "inf"),
        (reg(F32), [0xFF80, 0x0000], "-inf"),
        (reg(F32, swap=True, regswap=True), [0x0000, 0xC07F], "nan"),
        (reg(F32, scale=0.1), [0x7F80, 0x0000], "inf"),
        (reg(RawType.FLOAT64), [0x7FF8, 0, 0, 0], "nan"),
        (reg(RawType.FLOAT64), [0xFFF0, 0, 0, 0], "-inf"),
    ],
)
def test_not_finite_raises(visitor: Visitor, words: list[int], shown: str) -> None:
    with pytest.raises(CodecError, match=rf"{visitor.raw_type} value {shown} \(registers"):
        decode(visitor, words)


# -- scaled integers are the float nearest the exact decimal -----------------------


@pytest.mark.parametrize("scale", ["0.1", "0.01", "0.001", "0.25", "0.3", "1.5", "0.05"])
def test_scaled_integers_are_exact(scale: str) -> None:
    dec = decoder_for(reg(RawType.INT16, scale=float(scale)))
    for raw in range(-32768, 32768, 7):
        expected = float(Decimal(raw) * Decimal(scale))
        got = dec([raw & 0xFFFF], 0)
        assert got == expected, (raw, scale)
        assert isinstance(got, float)


def test_integral_scales_keep_int() -> None:
    for scale in (1, 1.0, 10, 100.0, -1, -2.0):
        for raw in (0, 1, 32767):
            got = decode(reg(RawType.INT16, scale=scale), [raw])
            assert got == raw * int(scale)
            assert type(got) is int


# -- encode: known patterns (hand-written words) -----------------------------------

ENCODE_CASES: list[tuple[str, Visitor, Value, list[int]]] = [
    ("f32 ABCD", reg(F32), 123.456, [0x42F6, 0xE979]),
    ("f32 CDAB", reg(F32, regswap=True), 123.456, [0xE979, 0x42F6]),
    ("f32 BADC", reg(F32, swap=True), 123.456, [0xF642, 0x79E9]),
    ("f32 DCBA", reg(F32, swap=True, regswap=True), 123.456, [0x79E9, 0xF642]),
    ("f32 from int", reg(F32), 2, [0x4000, 0x0000]),
    ("f32 x 0.1", reg(F32, scale=0.1), 22.98, [0x4365, 0xCCCD]),
    ("i16 -2", reg(RawType.INT16), -2, [0xFFFE]),
    ("i16 -2 swap", reg(RawType.INT16, swap=True), -2, [0xFEFF]),
    ("u16 65535", reg(RawType.UINT16), 65535, [0xFFFF]),
    ("i16 x 0.1", reg(RawType.INT16, scale=0.1), 23.1, [231]),
    ("i16 x 0.1 negative", reg(RawType.INT16, scale=0.1), -0.5, [0xFFFB]),
    ("i16 x 0.1 half rounds away", reg(RawType.INT16, scale=0.1), 23.15, [232]),
    ("i16 x 0.1 negative half", reg(RawType.INT16, scale=0.1), -23.15, [0xFF18]),
    ("i16 x 0.1 below half", reg(RawType.INT16, scale=0.1), 23.14, [231]),
    ("u16 2.5 rounds to 3", reg(RawType.UINT16), 2.5, [3]),
    ("u16 x 10", reg(RawType.UINT16, scale=10), 70, [7]),
    ("i16 x -1", reg(RawType.INT16, scale=-1), -5, [5]),
    ("i32 CDAB", reg(RawType.INT32, regswap=True), 65538, [0x0002, 0x0001]),
    ("i32 BADC", reg(RawType.INT32, swap=True), 65538, [0x0100, 0x0200]),
    ("i32 -2", reg(RawType.INT32), -2, [0xFFFF, 0xFFFE]),
    ("u32 DCBA", reg(RawType.UINT32, swap=True, regswap=True), 0x12345678, [0x7856, 0x3412]),
    (
        "i64 both",
        reg(RawType.INT64, swap=True, regswap=True),
        0x0102030405060708,
        [0x0807, 0x0605, 0x0403, 0x0201],
    ),
    ("u64 regswap", reg(RawType.UINT64, regswap=True), 2**48 + 2, [0x0002, 0x0000, 0x0000, 0x0001]),
    ("f64 swap", reg(RawType.FLOAT64, swap=True), 123.456, [0x5E40, 0x2FDD, 0x9F1A, 0x77BE]),
    ("string NUL padded", reg(RawType.STRING, limit=3), "ABC", [0x4142, 0x4300, 0x0000]),
    ("string swap", reg(RawType.STRING, limit=2, swap=True), "ABCD", [0x4241, 0x4443]),
    ("string regswap", reg(RawType.STRING, limit=2, regswap=True), "ABCD", [0x4344, 0x4142]),
    ("string UTF-8", reg(RawType.STRING, limit=1), "é", [0xC3A9]),
    ("string empty", reg(RawType.STRING, limit=1), "", [0x0000]),
    ("bytes", reg(RawType.BYTES, limit=2), "0102abcd", [0x0102, 0xABCD]),
    ("bytes upper case", reg(RawType.BYTES, limit=2), "0102ABCD", [0x0102, 0xABCD]),
    ("bytes regswap", reg(RawType.BYTES, limit=2, regswap=True), "abcd0102", [0x0102, 0xABCD]),
    ("boolean true", reg(RawType.BOOLEAN), True, [0x0001]),
    ("boolean false", reg(RawType.BOOLEAN), False, [0x0000]),
    ("boolean 1", reg(RawType.BOOLEAN), 1, [0x0001]),
    ("boolean true swap", reg(RawType.BOOLEAN, swap=True), True, [0x0100]),
    ("bit 15 alone", reg(RawType.BIT, bit=15), True, [0x8000]),
    ("bit 3 false", reg(RawType.BIT, bit=3), False, [0x0000]),
    ("bit 0 swap", reg(RawType.BIT, bit=0, swap=True), True, [0x0100]),
]


@pytest.mark.parametrize(
    ("visitor", "value", "words"),
    [pytest.param(v, x, w, id=name) for name, v, x, w in ENCODE_CASES],
)
def test_encode_known_patterns(visitor: Visitor, value: Value, words: list[int]) -> None:
    assert encode(visitor, value) == words


def test_encode_bit_tables() -> None:
    assert encode(Visitor(COIL, 0, 1, RawType.BOOLEAN), True) == [True]
    assert encode(Visitor(COIL, 0, 1, RawType.BOOLEAN), 0) == [False]
    assert encode(Visitor(COIL, 0, 4, RawType.UINT16), 13) == [True, False, True, True]
    assert encode(Visitor(COIL, 0, 4, RawType.UINT16), 0) == [False] * 4
    with pytest.raises(CodecError, match=r"uint16 cannot hold 16; allowed 0\.\.15"):
        encode(Visitor(COIL, 0, 4, RawType.UINT16), 16)


def test_bit_mask_for_mask_write() -> None:
    assert bit_mask(reg(RawType.BIT, bit=3), True) == (0xFFF7, 0x0008)
    assert bit_mask(reg(RawType.BIT, bit=3), False) == (0xFFF7, 0x0000)
    assert bit_mask(reg(RawType.BIT, bit=15), True) == (0x7FFF, 0x8000)
    assert bit_mask(reg(RawType.BIT, bit=0, swap=True), True) == (0xFEFF, 0x0100)
    with pytest.raises(CodecError, match="bit_mask needs a bit inside a register"):
        bit_mask(reg(RawType.UINT16), True)


# -- encode errors -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("visitor", "value", "message"),
    [
        (reg(RawType.INT16), 40000, r"int16 cannot hold 40000; allowed -32768\.\.32767"),
        (reg(RawType.INT16), -32769, r"int16 cannot hold -32769; allowed -32768\.\.32767"),
        (reg(RawType.UINT16), -1, r"uint16 cannot hold -1; allowed 0\.\.65535"),
        (reg(RawType.UINT32), 2**32, r"uint32 cannot hold 4294967296; allowed 0\.\.4294967295"),
        (
            reg(RawType.INT16, scale=0.1),
            4000,
            r"int16 cannot hold 4000 \(raw 40000 at scale 0\.1\); allowed raw "
            r"-32768\.\.32767, i\.e\. values -3276\.8\.\.3276\.7",
        ),
        (
            reg(RawType.UINT16, scale=-1),
            1,
            r"uint16 cannot hold 1 \(raw -1 at scale -1\); allowed raw 0\.\.65535, "
            r"i\.e\. values -65535\.\.0",
        ),
        (
            reg(RawType.STRING, limit=2),
            "ABCDE",
            r"string 'ABCDE' is 5 UTF-8 bytes; limit 2 register\(s\) allows at most 4",
        ),
        (reg(RawType.STRING, limit=1), "éé", r"string 'éé' is 4 UTF-8 bytes"),
        (reg(RawType.STRING, limit=1), 12, r"string needs text, got 12"),
        (reg(RawType.BYTES, limit=2), "0102", r"bytes needs a hex string of exactly 4 bytes"),
        (reg(RawType.BYTES, limit=1), "zzzz", r"bytes needs a hex string .* got 'zzzz'"),
        (reg(RawType.BYTES, limit=1), 258, r"bytes needs a hex string .* got 258"),
        (reg(RawType.INT16), "12", r"int16 needs a number, got '12'"),
        (reg(RawType.INT16), True, r"int16 needs a number, got True"),
        (reg(RawType.INT16), math.nan, r"int16 cannot hold nan; allowed: finite numbers"),
        (reg(F32), 1e39, r"float32 cannot hold 1e\+39; allowed: finite numbers of magnitude"),
        (reg(F32, scale=0.1), 1e38, r"float32 cannot hold 1e\+38; .* before scale 0\.1"),
        (reg(F32), math.inf, r"float32 cannot hold inf"),
        (reg(RawType.FLOAT64), math.nan, r"float64 cannot hold nan; allowed: finite numbers$"),
        (reg(RawType.FLOAT64), "1.5", r"float64 needs a number"),
        (reg(RawType.BOOLEAN), 2, r"boolean needs true/false \(or 0/1\), got 2"),
        (reg(RawType.BIT, bit=1), "on", r"bit needs true/false \(or 0/1\), got 'on'"),
        (Visitor(COIL, 0, 1, RawType.BOOLEAN), 0.5, r"boolean needs true/false"),
    ],
)
def test_encode_errors(visitor: Visitor, value: Value, message: str) -> None:
    with pytest.raises(CodecError, match=message):
        encode(visitor, value)


# -- visitors the codec refuses ----------------------------------------------------


@pytest.mark.parametrize(
    ("visitor", "message"),
    [
        (reg(RawType.INT32, limit=1), r"int32 reads exactly 2 register\(s\), not limit 1"),
        (reg(F32, limit=4), r"float32 reads exactly 2 register\(s\), not limit 4"),
        (reg(RawType.BIT, bit=16), r"bit index 0\.\.15 \(0 = LSB\), got 16"),
        (reg(RawType.BIT), r"bit index 0\.\.15 \(0 = LSB\), got None"),
        (reg(RawType.STRING, limit=0), r"string needs limit >= 1 register, not 0"),
        (reg(RawType.INT16, scale=0.0), r"scale 0\.0 is not allowed"),
        (reg(RawType.INT16, scale=math.inf), r"scale inf is not allowed"),
        (Visitor(COIL, 0, 16, RawType.INT16), r"int16 cannot be read from CoilRegister"),
        (Visitor(DI, 0, 2, RawType.FLOAT32), r"float32 cannot be read from Discrete"),
        (Visitor(COIL, 0, 17, RawType.UINT16), r"uint16 in CoilRegister packs 1\.\.16 bits"),
        (Visitor(COIL, 0, 2, RawType.BOOLEAN), r"boolean in CoilRegister reads 1 bit"),
    ],
)
def test_refused_visitors(visitor: Visitor, message: str) -> None:
    with pytest.raises(CodecError, match=message):
        decoder_for(visitor)


# -- round trips -------------------------------------------------------------------

INTEGER_TYPES = [
    RawType.INT16,
    RawType.UINT16,
    RawType.INT32,
    RawType.UINT32,
    RawType.INT64,
    RawType.UINT64,
]


@pytest.mark.parametrize("raw", INTEGER_TYPES)
@pytest.mark.parametrize(("swap", "regswap"), SWAPS)
def test_integer_round_trip(raw: RawType, swap: bool, regswap: bool) -> None:
    bits = raw.bits
    assert bits is not None
    lo, hi = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if raw.signed else (0, 2**bits - 1)
    rng = random.Random(bits * 4 + swap * 2 + regswap)
    values = [lo, lo + 1, -1 if raw.signed else 1, 0, 1, hi - 1, hi]
    values += [rng.randint(lo, hi) for _ in range(500)]
    for scale, as_value in (
        (1.0, lambda r: r),
        (0.1, lambda r: float(Decimal(r) / 10)),
        (-10, lambda r: -10 * r),
    ):
        visitor = reg(raw, scale=scale, swap=swap, regswap=regswap)
        for r in values:
            if scale == 0.1 and abs(r) >= 2**53:
                continue  # not exactly representable as a float after scaling
            v = as_value(r)
            words = encode(visitor, v)
            assert decode(visitor, words) == v
            assert len(words) == raw.register_count
            assert all(0 <= w <= 0xFFFF for w in words)
            assert encode(visitor, decode(visitor, words)) == words


@pytest.mark.parametrize("raw", [RawType.FLOAT32, RawType.FLOAT64])
@pytest.mark.parametrize(("swap", "regswap"), SWAPS)
def test_float_round_trip_over_random_bit_patterns(raw: RawType, swap: bool, regswap: bool) -> None:
    count = raw.register_count
    assert count is not None
    rng = random.Random(count * 4 + swap * 2 + regswap)
    visitor = reg(raw, swap=swap, regswap=regswap)
    done = 0
    for _ in range(3000):
        words = [rng.getrandbits(16) for _ in range(count)]
        try:
            value = decode(visitor, words)
        except CodecError:
            continue  # NaN / infinity
        assert encode(visitor, value) == words
        assert decode(visitor, encode(visitor, value)) == value
        done += 1
    assert done > 2900


@pytest.mark.parametrize("scale", [0.1, 0.01, 10, 0.5])
def test_scaled_float32_round_trip(scale: float) -> None:
    visitor = reg(F32, scale=scale)
    rng = random.Random(int(scale * 1000))
    values = [round(rng.uniform(-1e4, 1e4), rng.randint(0, 3)) for _ in range(2000)]
    for v in values:
        decoded = decode(visitor, encode(visitor, v))
        assert decode(visitor, encode(visitor, decoded)) == decoded
    for v in (0.0, 22.98, -40.5, 230.1, 49.99):
        assert decode(visitor, encode(visitor, v)) == v


@pytest.mark.parametrize(("swap", "regswap"), SWAPS)
def test_string_and_bytes_round_trip(swap: bool, regswap: bool) -> None:
    rng = random.Random(7 + swap * 2 + regswap)
    alphabet = "abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.é€"
    for limit in (1, 2, 3, 8, 125):
        sv = reg(RawType.STRING, limit=limit, swap=swap, regswap=regswap)
        bv = reg(RawType.BYTES, limit=limit, swap=swap, regswap=regswap)
        for _ in range(60):
            text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 2 * limit)))
            text = text.encode()[: 2 * limit].decode("utf-8", "ignore").rstrip(" ")
            assert decode(sv, encode(sv, text)) == text
            raw = bytes(rng.getrandbits(8) for _ in range(2 * limit)).hex()
            assert decode(bv, encode(bv, raw)) == raw


def test_boolean_and_bit_round_trip() -> None:
    for swap in (False, True):
        for value in (False, True):
            v = reg(RawType.BOOLEAN, swap=swap)
            assert decode(v, encode(v, value)) is value
            for bit in range(16):
                b = reg(RawType.BIT, bit=bit, swap=swap)
                assert decode(b, encode(b, value)) is value
                and_mask, or_mask = bit_mask(b, value)
                for current in (0x0000, 0xFFFF, 0xA5A5):
                    written = (current & and_mask) | (or_mask & ~and_mask & 0xFFFF)
                    assert decode(b, [written]) is value
                    assert written & and_mask == current & and_mask  # other bits kept


def test_scaled_float64_overflow_is_a_codec_error_not_infinity() -> None:
    words = [0x7FEE, 0x7FFF, 0x8080, 0x9341]  # about 1.3e308: finite, ×10 is not
    v = Visitor(Table.HOLDING_REGISTER, 0, 4, RawType.FLOAT64, scale=10.0)
    with pytest.raises(CodecError, match="overflows"):
        decode(v, words)
