"""The Eastron SDM630 and SDM120 firmware profiles: the shipped files against a
third-party SDM630 register map, their use from manifests (firmware ranges, per-device
overrides), and a poll of a real pymodbus server through edge's own poller.

The register map CSV is test data only (not part of edge); without it the comparison
is skipped.
"""

from __future__ import annotations

import copy
import csv
import struct
from collections.abc import Iterator
from itertools import pairwise
from pathlib import Path
from typing import Any

import pytest
from support import Image, ModbusServer
from test_config import Doc, device_doc, load, model_doc, one_error, prop

from edge.config.model import (
    AccessMode,
    DeviceSpec,
    ProfileRef,
    PropertySpec,
    RawType,
    Table,
    TcpEndpoint,
    ValueType,
    Visitor,
)
from edge.config.sources import Report
from edge.modbus.client import ConnectionPool
from edge.modbus.poller import DevicePoller
from edge.profiles.profile import SHIPPED, Loaded, read_profile, visitor_config
from edge.reading import Reading

SDM630 = SHIPPED / "eastron" / "sdm630.yaml"
SDM120 = SHIPPED / "eastron" / "sdm120.yaml"
SDM630_CSV = Path("/work/shared/data/registermaps/Eastron_SDM630.csv")

CSV_UNITS: dict[str, str | None] = {
    "V": "V", "A": "A", "W": "W", "VA": "VA", "VAr": "var", "None": None,
    "Degrees": "°", "Hz": "Hz", "kWh": "kWh", "kVArh": "kvarh", "kVAh": "kVAh",
    "Ah": "Ah", "%": "%",
}  # fmt: skip
"""The CSV's unit spellings and the profile's."""

V2_ONLY = [
    f"{kind}_{line}"
    for kind in ("import_energy", "export_energy", "energy", "import_reactive_energy",
                 "export_reactive_energy", "reactive_energy")
    for line in ("l1", "l2", "l3")
]  # fmt: skip
"""The SDM630 properties of firmware 2.0 and later (0x015A-0x017C)."""

SINGLE_PHASE = {"voltage", "current", "power", "apparent_power", "reactive_power",
                "power_factor", "phase_angle", "current_demand", "current_demand_max"}
"""SDM120 names whose SDM630 counterpart is line 1's (``<name>_l1``)."""


def profile(path: Path) -> Loaded:
    report = Report()
    loaded = read_profile(path, report)
    assert report.problems == [], report.problems
    assert loaded is not None
    return loaded


def spans(loaded: Loaded) -> dict[str, tuple[Table, int, int]]:
    """Each property's (table, first address, one past the last) as the profile says."""
    out = {}
    for index, p in enumerate(loaded.doc.spec.properties):
        config = visitor_config(loaded, index)
        offset = int(config["offset"].value)
        out[p.name] = (Table(config["register"].value), offset,
                       offset + int(config["limit"].value))
    return out


def csv_rows() -> list[dict[str, str]]:
    if not SDM630_CSV.is_file():
        pytest.skip(f"{SDM630_CSV} is not on this machine")
    with SDM630_CSV.open(newline="") as f:
        return list(csv.DictReader(f))


# --- the files ------------------------------------------------------------------------


@pytest.mark.parametrize("path", [SDM630, SDM120], ids=["sdm630", "sdm120"])
def test_profile_loads_without_problems(path: Path) -> None:
    loaded = profile(path)
    assert loaded.doc.spec.vendor == "Eastron"
    assert loaded.doc.spec.defaults.table is Table.INPUT_REGISTER
    assert loaded.doc.spec.defaults.data_type is RawType.FLOAT32


def test_sdm630_identification_and_firmware_registers() -> None:
    spec = profile(SDM630).doc.spec
    [ident] = spec.identification
    assert (ident.table, ident.offset, ident.data_type) == (Table.HOLDING_REGISTER, 0xFC02,
                                                            RawType.UINT16)
    assert ident.equals == [0x0070, 0x0079]
    assert spec.firmware is not None
    assert (spec.firmware.table, spec.firmware.offset, spec.firmware.format) == (
        Table.HOLDING_REGISTER, 0xFC03, "major.minor")
    assert spec.firmware.known == [">=1.0,<2.0", ">=2.0,<4.0"]
    assert sorted(p.name for p in spec.properties if p.firmware) == sorted(V2_ONLY)
    assert {p.firmware for p in spec.properties if p.firmware} == {">=2.0"}


def test_every_csv_row_is_an_sdm630_property() -> None:
    rows = csv_rows()
    loaded = profile(SDM630)
    by_offset = {off: name for name, (_t, off, _e) in spans(loaded).items()}
    props = {p.name: p for p in loaded.doc.spec.properties}
    assert len(rows) == 85
    for row in rows:
        assert (row["function"], row["type"]) == ("4", "Float"), row
        address = int(row["addr"].strip(), 16)
        assert address in by_offset, f"0x{address:04X} {row['name']} is not in the profile"
        name = by_offset[address]
        config = visitor_config(loaded, list(props).index(name))
        assert (config["register"].value, config["dataType"].value,
                config["limit"].value) == ("InputRegister", "float32", 2), name
        assert props[name].unit == CSV_UNITS[row["unit"]], (name, row)


@pytest.mark.parametrize("path", [SDM630, SDM120], ids=["sdm630", "sdm120"])
def test_no_two_properties_overlap(path: Path) -> None:
    ranges = sorted(spans(profile(path)).items(), key=lambda kv: (kv[1][0], kv[1][1]))
    for (name_a, (table_a, _s, end_a)), (name_b, (table_b, start_b, _e)) in pairwise(ranges):
        assert table_a != table_b or end_a <= start_b, f"{name_a} overlaps {name_b}"


def test_sdm120_is_the_single_phase_subset_of_sdm630() -> None:
    sdm630 = spans(profile(SDM630))
    sdm120 = spans(profile(SDM120))
    assert len(sdm120) == 22
    for name, span in sdm120.items():
        counterpart = f"{name}_l1" if name in SINGLE_PHASE else name
        assert sdm630.get(counterpart) == span, name
    units_630 = {p.name: p.unit for p in profile(SDM630).doc.spec.properties}
    for p in profile(SDM120).doc.spec.properties:
        counterpart = f"{p.name}_l1" if p.name in SINGLE_PHASE else p.name
        if p.name != "power_demand_max_total":  # W for the SDM120, VA in the SDM630 maps
            assert units_630[counterpart] == p.unit, p.name


# --- manifests ------------------------------------------------------------------------


def tcp(port: int = 5020, **extra: Any) -> Doc:
    return {"communicateMode": "TCP", "ip": "127.0.0.1", "port": port, "slaveID": 1,
            "profile": "eastron-sdm630", **extra}


def bare_model(*properties: Doc) -> Doc:
    """The v1beta1 DeviceModel ``meter-model``, with only ``properties`` (none by default)."""
    doc = model_doc({"name": "x"})
    doc["spec"]["properties"] = list(properties)
    if not properties:
        del doc["spec"]["properties"]
    return doc


def profiled_device(config: Doc, *properties: Doc) -> Doc:
    doc = device_doc(prop("x"), config=config)
    doc["spec"]["properties"] = [copy.deepcopy(p) for p in properties]
    return doc


def expected_spec(loaded: Loaded, names: list[str], tmp_path: Path,
                  firmware: str = "2.3") -> DeviceSpec:
    """The DeviceSpec the profile alone describes for ``names`` (the Device being the
    second document of ``load``'s file)."""
    props = {p.name: p for p in loaded.doc.spec.properties}
    out = []
    for name in names:
        _table, offset, end = spans(loaded)[name]
        out.append(PropertySpec(
            name, Visitor(Table.INPUT_REGISTER, offset, end - offset, RawType.FLOAT32),
            ValueType.FLOAT, access_mode=AccessMode.READ_ONLY, unit=props[name].unit,
        ))
    return DeviceSpec(namespace="default", name="meter-1", model="meter-model",
                      endpoint=TcpEndpoint("127.0.0.1", 5020), unit_id=1,
                      properties=tuple(out), source=f"{tmp_path / 'm.yaml'}: document 2",
                      profile=ProfileRef(loaded.doc.name, firmware))


def all_names(path: Path) -> list[str]:
    return [p.name for p in profile(path).doc.spec.properties]


def test_model_without_properties_gets_every_profile_property(tmp_path: Path) -> None:
    (device,) = load(tmp_path, bare_model(), profiled_device(tcp(firmware="2.3")))
    assert device == expected_spec(profile(SDM630), all_names(SDM630), tmp_path)
    assert len(device.properties) == 89


def test_v1_firmware_leaves_out_the_v2_registers(tmp_path: Path) -> None:
    (device,) = load(tmp_path, bare_model(), profiled_device(tcp(firmware="1.5")))
    names = [n for n in all_names(SDM630) if n not in V2_ONLY]
    assert device == expected_spec(profile(SDM630), names, tmp_path, firmware="1.5")
    assert len(device.properties) == 71


def test_model_listing_a_v2_property_on_v1_firmware_is_an_error(tmp_path: Path) -> None:
    model = bare_model({"name": "voltage_l1"}, {"name": "import_energy_l1"})
    assert one_error(tmp_path, model, profiled_device(tcp(firmware="1.5"))) == (
        "spec.properties[1]: property 'import_energy_l1' of profile eastron-sdm630 exists "
        "in firmware >=2.0 only; this device's firmware is 1.5")


def test_model_listing_properties_gets_only_those(tmp_path: Path) -> None:
    model = bare_model({"name": "voltage_l1"}, {"name": "import_energy_l1"})
    (device,) = load(tmp_path, model, profiled_device(tcp(firmware="2.3")))
    assert device == expected_spec(profile(SDM630), ["voltage_l1", "import_energy_l1"], tmp_path)


def test_unknown_firmware_is_refused(tmp_path: Path) -> None:
    assert one_error(tmp_path, bare_model(), profiled_device(tcp(firmware="7.0"))) == (
        "spec.protocol.configData.firmware: firmware 7.0 is outside every range profile "
        "eastron-sdm630 knows (>=1.0,<2.0; >=2.0,<4.0): its register map is not guessed; "
        "check the device (edge discover) or write a profile for this firmware")


def test_missing_firmware_is_asked_for(tmp_path: Path) -> None:
    message = one_error(tmp_path, bare_model(), profiled_device(tcp()))
    assert message.startswith(
        "spec.protocol.configData.firmware: profile eastron-sdm630's register map depends "
        "on the firmware (properties import_energy_l1, ")
    assert message.endswith(
        "exist in some firmware only): give the device's firmware (configData firmware, "
        "as edge discover prints it)")


def test_sdm120_needs_no_firmware(tmp_path: Path) -> None:
    config = {**tcp(), "profile": "eastron-sdm120"}
    (device,) = load(tmp_path, bare_model(), profiled_device(config))
    assert [p.name for p in device.properties] == all_names(SDM120)


def test_device_overrides_scale_and_offset(tmp_path: Path) -> None:
    device_doc_ = profiled_device(
        tcp(firmware="2.3"),
        prop("import_energy_total", scale=1000),
        prop("voltage_l2", offset=0x0100),
    )
    (device,) = load(tmp_path, bare_model(), device_doc_)
    props = {p.name: p for p in device.properties}
    assert props["import_energy_total"].visitor == Visitor(
        Table.INPUT_REGISTER, 0x0048, 2, RawType.FLOAT32, scale=1000.0)
    assert props["voltage_l2"].visitor == Visitor(Table.INPUT_REGISTER, 0x0100, 2,
                                                  RawType.FLOAT32)
    assert props["voltage_l1"].visitor == Visitor(Table.INPUT_REGISTER, 0, 2, RawType.FLOAT32)


def test_invalid_override_names_the_devices_field(tmp_path: Path) -> None:
    device_doc_ = profiled_device(tcp(firmware="2.3"), prop("voltage_l1", offset=70000))
    assert one_error(tmp_path, bare_model(), device_doc_) == (
        "spec.properties[0].visitors.configData.offset: offset 70000 is out of range 0..65535")


# --- a real poll ----------------------------------------------------------------------


def sample_values(names: list[str]) -> dict[str, float]:
    """A distinct value of at most six significant digits per property (so its float32
    reads back as the same decimal), with the stated ones for a few."""
    values = {name: round(10.5 + i * 1.25, 2) for i, name in enumerate(names)}
    values.update(voltage_l1=229.8, voltage_l2=231.4, voltage_l3=0.0, current_l1=-3.125,
                  power_total=-1234.5, frequency=49.98, import_energy_total=12345.6,
                  power_factor_l1=-0.873)
    return values


def image(loaded: Loaded, values: dict[str, float]) -> Image:
    """Input registers holding ``values`` as float32, high word first, at the profile's
    addresses."""
    where = spans(loaded)
    registers = [0] * (max(end for _t, _s, end in where.values()) + 1)
    for name, value in values.items():
        _table, offset, _end = where[name]
        registers[offset:offset + 2] = struct.unpack(">HH", struct.pack(">f", value))
    return Image(ir=registers)


@pytest.fixture
def meter() -> Iterator[ModbusServer]:
    server = ModbusServer({1: image(profile(SDM630), sample_values(all_names(SDM630)))})
    yield server
    server.stop()


async def poll(device: DeviceSpec) -> Reading:
    pool = ConnectionPool(backoff_initial=0.05, backoff_max=0.1)
    readings: list[Reading] = []
    poller = DevicePoller(device, pool.get(device.endpoint), readings.append,
                          lambda _d, _s, _r: None, breaker_failures=2)
    try:
        await poller.poll_once()
    finally:
        await pool.close()
    [reading] = readings
    return reading


async def test_poll_a_meter_with_the_profiles_visitors(
    meter: ModbusServer, tmp_path: Path
) -> None:
    docs = (bare_model(), profiled_device(tcp(meter.port, firmware="2.3"),
                                          prop("import_energy_total", scale=1000)))
    (device,) = load(tmp_path, *docs)
    reading = await poll(device)
    expected: dict[str, Any] = sample_values(all_names(SDM630))
    expected["import_energy_total"] = 12345600.0
    assert reading.quality == {}
    assert reading.values == expected
    assert reading.values["voltage_l1"] == 229.8
    assert reading.values["power_total"] == -1234.5


async def test_poll_a_v1_meter_reads_no_v2_register(
    meter: ModbusServer, tmp_path: Path
) -> None:
    docs = (bare_model(), profiled_device(tcp(meter.port, firmware="1.5")))
    (device,) = load(tmp_path, *docs)
    reading = await poll(device)
    assert all(p.visitor.end <= 0x015A for p in device.properties)
    assert set(reading.values) == set(all_names(SDM630)) - set(V2_ONLY)
    assert reading.values["frequency"] == 49.98
