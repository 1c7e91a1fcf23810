"""Scale factor registers and "not implemented" values (SunSpec ``sunssf`` and the
SunSpec not-implemented patterns), from the manifest key to the decoded value."""

from __future__ import annotations

import re
import struct
from pathlib import Path

import pytest
from support import Image, ModbusServer
from test_config import device_doc, load, model_doc, one_error, prop

from edge.config.model import (
    DeviceSpec,
    ModbusOptions,
    PropertySpec,
    RawType,
    Table,
    TcpEndpoint,
    ValueType,
    Visitor,
)
from edge.modbus.client import ConnectionPool
from edge.modbus.codec import CodecError, decode, decoder_for
from edge.modbus.planner import plan_requests
from edge.modbus.poller import DevicePoller
from edge.modbus.writer import write_problem
from edge.reading import Reading

HR = Table.HOLDING_REGISTER


def words(fmt: str, *values: int) -> list[int]:
    """The registers that carry ``values`` packed big-endian as ``fmt``."""
    raw = struct.pack(">" + fmt, *values)
    return list(struct.unpack(f">{len(raw) // 2}H", raw))


def sf_visitor(raw: RawType = RawType.INT16, offset: int = 0, sf: int = 1,
               scale: float = 1.0) -> Visitor:
    return Visitor(HR, offset, raw.register_count or 1, raw, scale=scale, scale_factor=sf)


@pytest.mark.parametrize(("raw", "exponent", "expected"), [
    (-12345, -2, -123.45),
    (-12345, 0, -12345),
    (2315, -1, 231.5),
    (7, 3, 7000),
    (1, -10, 1e-10),
    (32767, 10, 327670000000000),
])  # fmt: skip
def test_value_is_raw_times_ten_to_the_scale_factor(
    raw: int, exponent: int, expected: float
) -> None:
    value = decode(sf_visitor(), [*words("h", raw), *words("h", exponent)])
    assert value == expected
    assert type(value) is type(expected)


def test_scale_factor_before_the_point_and_the_visitor_scale_combine() -> None:
    """uint32 at 1..2 with its exponent at 0, and scale 0.5: raw × 0.5 × 10^-1."""
    visitor = sf_visitor(RawType.UINT32, offset=1, sf=0, scale=0.5)
    data = [*words("h", -1), *words("I", 70001)]
    assert decoder_for(visitor)(data, 1) == 3500.05  # index 1: offset 1 - request address 0
    assert decoder_for(visitor)([9, *data], 2) == 3500.05


@pytest.mark.parametrize(("exponent_word", "message"), [
    (0x8000, "scale factor register 1 is not implemented (0x8000)"),
    (11, "scale factor 11 at register 1 is outside -10..10"),
    (0xFFF5, "scale factor -11 at register 1 is outside -10..10"),
])  # fmt: skip
def test_a_bad_scale_factor_is_a_bad_value_not_a_number(exponent_word: int, message: str) -> None:
    with pytest.raises(CodecError, match=re.escape(message)):
        decode(sf_visitor(), [100, exponent_word])


@pytest.mark.parametrize(("raw", "data", "missing"), [
    (RawType.INT16, [0x8000], 0x8000),
    (RawType.UINT16, [0xFFFF], 0xFFFF),
    (RawType.INT32, [0x8000, 0], 0x80000000),
    (RawType.UINT32, [0xFFFF, 0xFFFF], 0xFFFFFFFF),
    (RawType.FLOAT32, [0x7FC0, 0], 0x7FC00000),
])  # fmt: skip
def test_the_not_implemented_value_is_reported_as_such(
    raw: RawType, data: list[int], missing: int
) -> None:
    visitor = Visitor(HR, 0, raw.register_count or 1, raw, missing=missing)
    with pytest.raises(CodecError, match=f"not implemented by the device .raw value {missing:#x}"):
        decode(visitor, data)
    decode(visitor, [data[0] ^ 0x0100, *data[1:]])  # a bit off is a value


def test_the_not_implemented_value_is_checked_before_the_scale_factor() -> None:
    visitor = Visitor(HR, 0, 1, RawType.INT16, scale_factor=1, missing=0x8000)
    with pytest.raises(CodecError, match="not implemented by the device"):
        decode(visitor, [0x8000, 0x8000])


def test_planner_reads_the_scale_factor_in_the_same_request() -> None:
    """W at 100 scaled by W_SF at 110, A at 0 scaled by A_SF at 4: with no gap fill the
    two points and their exponents make two requests covering both exponents."""
    def point(name: str, offset: int, sf: int) -> PropertySpec:
        return PropertySpec(name, sf_visitor(offset=offset, sf=sf), ValueType.FLOAT)

    requests = plan_requests([point("W", 100, 110), point("A", 0, 4)], max_gap=16)
    assert [(r.address, r.count) for r in requests] == [(0, 5), (100, 11)]
    before = plan_requests([point("W", 100, 90)], max_gap=0)
    assert [(r.address, r.count) for r in before] == [(90, 11)]
    with pytest.raises(ValueError, match="reads 127 registers of HoldingRegister with its scale"):
        plan_requests([point("W", 0, 126)])


def sf_model() -> dict[str, object]:
    return model_doc({"name": "power", "accessMode": "ReadWrite"})


def test_manifest_scale_factor_and_missing(tmp_path: Path) -> None:
    (device,) = load(tmp_path, sf_model(), device_doc(prop(
        "power", register="HoldingRegister", offset=40084, dataType="int16",
        scaleFactor=40085, missing="0x8000")))
    (power,) = device.properties
    assert power.visitor.scale_factor == 40085
    assert power.visitor.missing == 0x8000
    assert power.value_type is ValueType.FLOAT
    kind, cause = write_problem(power, 10.0) or ("", "")
    assert kind == "not_writable"
    assert "scale factor register 40085" in cause


@pytest.mark.parametrize(("config", "expected"), [
    ({"dataType": "float32", "limit": 2, "scaleFactor": 9},
     "scaleFactor: a scale factor register applies to integer types of register tables, "
     "not to float32 of HoldingRegister"),
    ({"dataType": "int32", "limit": 2, "scaleFactor": 1},
     "scaleFactor: scale factor register 1 is one of the property's own registers (0..1)"),
    ({"dataType": "int16", "scaleFactor": 125},
     "scaleFactor: scale factor register 125 is 126 registers from the property's end: "
     "more than one read of HoldingRegister carries (125)"),
    ({"dataType": "int16", "missing": 0x10000},
     "missing: missing must be the raw value of the 1 register(s) as an unsigned integer "
     "(0..0xffff), got 65536"),
    ({"dataType": "int16", "missing": "0xZZ"},
     "missing: missing must be the raw value of the 1 register(s) as an unsigned integer "
     "(0..0xffff), got '0xZZ'"),
])  # fmt: skip
def test_manifest_scale_factor_errors(tmp_path: Path, config: dict[str, object],
                                      expected: str) -> None:
    message = one_error(tmp_path, sf_model(), device_doc(
        prop("power", register="HoldingRegister", offset=0, **config)))
    assert message == f"spec.properties[0].visitors.configData.{expected}"


async def test_a_missing_scale_factor_register_is_a_device_error_not_a_gap(
        caplog: pytest.LogCaptureFixture) -> None:
    """A point at 10 scaled by register 20, on a device with registers 0..14 only: the
    read of 10..20 is refused (ILLEGAL DATA ADDRESS) and the point is bad; edge does
    not take the scale factor register for a gap it filled, so it does not re-plan."""
    server = ModbusServer({1: Image(hr=[0] * 15)})
    point = PropertySpec("W", sf_visitor(offset=10, sf=20), ValueType.FLOAT)
    device = DeviceSpec("default", "inv", "m", TcpEndpoint("127.0.0.1", server.port), 1,
                        (point,), ModbusOptions(max_gap=0, timeout_s=1.0, retries=0))
    pool = ConnectionPool()
    readings: list[Reading] = []
    try:
        poller = DevicePoller(device, pool.get(device.endpoint), readings.append,
                              lambda *_: None)
        for _ in range(2):
            await poller.poll_once()
    finally:
        await pool.close()
        server.stop()
    assert [r.quality for r in readings] == [{"W": "bad"}, {"W": "bad"}]
    assert poller.stats.exception_codes == {2: 2}
    assert "without gap fill" not in caplog.text
