"""Agent file and KubeEdge manifest loading: upstream samples, dialects, layouts, errors.

Every test writes real files (``tmp_path``) and loads them through the public entry
points :func:`load_config` / :func:`load_manifests`.
"""

from __future__ import annotations

import copy
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from edge.config.agent import AgentFile
from edge.config.errors import ConfigError, Problem
from edge.config.load import load_config, load_manifests
from edge.config.model import (
    AccessMode,
    DeviceSpec,
    Framing,
    MethodSpec,
    ModbusOptions,
    MqttPush,
    PropertySpec,
    RawType,
    SerialEndpoint,
    Table,
    TcpEndpoint,
    ValueType,
    Visitor,
)
from edge.web.auth import hash_password

CASES = Path(__file__).parent / "cases"
V1BETA1_DEMO = CASES / "sample_v1beta1_temperature_demo" / "manifests"
V1ALPHA2_SAMPLES = CASES / "sample_v1alpha2_crd_samples" / "manifests"
UPSTREAM_SAMPLES = Path("/work/shared/data/kubeedge/samples")

Doc = dict[str, Any]


# --- builders -----------------------------------------------------------------------


def model_doc(*properties: Doc, name: str = "meter-model", **spec: Any) -> Doc:
    """A v1beta1 DeviceModel; by default voltage (FLOAT) and setpoint (INT, 0..1000)."""
    props = list(properties) or [
        {"name": "voltage", "type": "FLOAT", "accessMode": "ReadOnly", "unit": "V"},
        {"name": "setpoint", "type": "INT", "accessMode": "ReadWrite",
         "minimum": "0", "maximum": "1000"},
    ]  # fmt: skip
    return {
        "apiVersion": "devices.kubeedge.io/v1beta1",
        "kind": "DeviceModel",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {"protocol": "modbus", "properties": props, **spec},
    }


def prop(name: str, **config: Any) -> Doc:
    """A v1beta1 Device property entry with a Modbus visitor."""
    return {"name": name, "visitors": {"protocolName": "modbus", "configData": config}}


VOLTAGE = prop("voltage", register="InputRegister", offset=0, limit=2, dataType="float32")
SETPOINT = prop("setpoint", register="HoldingRegister", offset=10, limit=1, dataType="int16")
TCP = {"communicateMode": "TCP", "ip": "127.0.0.1", "port": 5020, "slaveID": 1}


def unit(unit_id: int) -> Doc:
    """:data:`TCP` with another unit id: a second device on the same endpoint."""
    return {**TCP, "slaveID": unit_id}


def device_doc(
    *properties: Doc,
    name: str = "meter-1",
    config: Doc | None = None,
    model: str = "meter-model",
    **spec: Any,
) -> Doc:
    """A v1beta1 Device of ``meter-model``; by default TCP with voltage and setpoint."""
    return {
        "apiVersion": "devices.kubeedge.io/v1beta1",
        "kind": "Device",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {
            "deviceModelRef": {"name": model},
            "protocol": {"protocolName": "modbus", "configData": TCP if config is None else config},
            "properties": list(properties) or [copy.deepcopy(VOLTAGE), copy.deepcopy(SETPOINT)],
            **spec,
        },
    }


def write_docs(path: Path, *docs: Doc | None) -> Path:
    """Write ``docs`` as one multi-document YAML file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump_all(docs, sort_keys=False))
    return path


def load(tmp_path: Path, *docs: Doc, node: str | None = None) -> tuple[DeviceSpec, ...]:
    devices, _warnings = load_manifests([write_docs(tmp_path / "m.yaml", *docs)], node=node)
    return devices


def load_warned(tmp_path: Path, *docs: Doc) -> tuple[tuple[DeviceSpec, ...], list[str]]:
    devices, warnings = load_manifests([write_docs(tmp_path / "m.yaml", *docs)])
    assert all(w.severity == "warning" for w in warnings)
    return devices, [f"{w.field}: {w.message}" for w in warnings]


def errors(tmp_path: Path, *docs: Doc) -> list[str]:
    """``field: message`` of every error loading ``docs`` raises."""
    with pytest.raises(ConfigError) as raised:
        load(tmp_path, *docs)
    return [f"{p.field}: {p.message}" for p in raised.value.problems if p.severity == "error"]


def one_error(tmp_path: Path, *docs: Doc) -> str:
    found = errors(tmp_path, *docs)
    assert len(found) == 1, found
    return found[0]


# --- upstream samples ----------------------------------------------------------------


def test_v1beta1_temperature_demo_sample() -> None:
    devices, warnings = load_manifests([V1BETA1_DEMO])
    assert devices == (
        DeviceSpec(
            namespace="default",
            name="temperature-instance",
            model="temperature-model",
            endpoint=TcpEndpoint("10.244.1.13", 5502, Framing.MBAP),  # port "5502", a string
            unit_id=1,
            properties=(
                PropertySpec(
                    name="temperature",
                    visitor=Visitor(Table.HOLDING_REGISTER, 0, 1, RawType.INT16, scale=0.1),
                    value_type=ValueType.FLOAT,
                    access_mode=AccessMode.READ_WRITE,
                    collect_cycle_ms=10000,
                    report_cycle_ms=10000,
                    minimum=1.0,  # visitor min 1.0 is tighter than the model's "0"
                    maximum=100.0,
                    unit="Celsius",
                ),
                PropertySpec(
                    name="temperature-switch",
                    visitor=Visitor(Table.COIL, 0, 1, RawType.UINT16),
                    value_type=ValueType.INT,
                    access_mode=AccessMode.READ_WRITE,
                    collect_cycle_ms=10000,
                    report_cycle_ms=10000,
                    desired="1",
                ),
            ),
            options=ModbusOptions(),
            methods=(
                MethodSpec(
                    "SwitchControl", ("temperature-switch",), "control the switch of the device"
                ),
                MethodSpec(
                    "UpdateTemperature", ("temperature",), "update the temperature of the device"
                ),
            ),
            source=f"{V1BETA1_DEMO}/temperature-instance.yaml: document 1",
        ),
    )
    assert [(w.field, w.severity) for w in warnings] == [
        ("spec.properties[0].visitors.configData.dataType", "warning")
    ]
    assert "float with limit 1 is ambiguous: read as int16 × scale 0.1" in warnings[0].message


def _v1alpha2_properties(
    first_offset: int, collect_ms: int, desired: str
) -> tuple[PropertySpec, ...]:
    return (
        PropertySpec(
            name="temperature",
            visitor=Visitor(Table.COIL, first_offset, 1, RawType.UINT16),  # swaps: no bits to swap
            collect_cycle_ms=collect_ms,
            maximum=1.0,  # the model's maximum 100, limited to what one coil holds
            unit="degree celsius",
            value_type=ValueType.INT,
            access_mode=AccessMode.READ_WRITE,
        ),
        PropertySpec(
            name="temperature-enable",
            visitor=Visitor(Table.COIL, 3, 1, RawType.UINT16),
            desired=desired,  # status.twins[].desired in v1alpha2
            value_type=ValueType.INT,
            access_mode=AccessMode.READ_WRITE,
        ),
    )


def test_v1alpha2_tcp_and_rtu_samples() -> None:
    devices, warnings = load_manifests([V1ALPHA2_SAMPLES])
    assert devices == (
        DeviceSpec(
            namespace="default",
            name="modbusrtu-device",
            model="modbus-sample-model",
            endpoint=SerialEndpoint("/dev/ttyS0", 9600, 8, "E", 1),
            unit_id=1,
            properties=_v1alpha2_properties(2, 1000, "1"),
            source=f"{V1ALPHA2_SAMPLES}/modbusrtu-device-instance.yaml: document 1",
        ),
        DeviceSpec(
            namespace="default",
            name="modbustcp-device",
            model="modbus-sample-model",
            endpoint=TcpEndpoint("192.168.33.1", 502),
            unit_id=1,
            properties=_v1alpha2_properties(0, 5000, "0"),
            source=f"{V1ALPHA2_SAMPLES}/modbustcp-device-instance.yaml: document 1",
        ),
    )
    assert [w.field for w in warnings] == [
        "spec.nodeSelector",
        "spec.nodeSelector",
        "spec.properties[0].type.int.maximum",
    ]


@pytest.mark.parametrize(
    ("copied", "upstream"),
    [
        (V1BETA1_DEMO, UPSTREAM_SAMPLES / "v1beta1" / "examples-temperature-sensor-demo"),
        (V1ALPHA2_SAMPLES, UPSTREAM_SAMPLES / "v1alpha2" / "kubeedge-crd-samples"),
    ],
)
def test_sample_copies_are_the_upstream_files(copied: Path, upstream: Path) -> None:
    if not upstream.is_dir():
        pytest.skip(f"{upstream} is not on this machine")
    files = sorted(p.name for p in upstream.iterdir())
    assert sorted(p.name for p in copied.iterdir()) == files
    for name in files:
        assert (copied / name).read_bytes() == (upstream / name).read_bytes()


def test_node_name_selects_the_devices_of_this_gateway() -> None:
    mine, _ = load_manifests([V1BETA1_DEMO], node="kind-worker")
    assert [d.name for d in mine] == ["temperature-instance"]
    others, warnings = load_manifests([V1BETA1_DEMO], node="gw-01")
    assert others == ()
    skipped = [w for w in warnings if w.field == "spec.nodeName"]
    assert (
        skipped[0].message
        == "belongs to node 'kind-worker', not to this gateway ('gw-01'); skipped"
    )


# --- protocol configData dialects -----------------------------------------------------


@pytest.mark.parametrize(
    ("config", "endpoint", "unit_id"),
    [
        pytest.param({"ip": "10.0.0.5", "port": "5020", "slaveID": 3},
                     TcpEndpoint("10.0.0.5", 5020), 3, id="port-string-tcp-inferred"),
        pytest.param({"ip": "10.0.0.5", "port": 1502, "unitID": 7},
                     TcpEndpoint("10.0.0.5", 1502), 7, id="port-int-unitID"),
        pytest.param({"ip": "plc.local"}, TcpEndpoint("plc.local", 502), 1, id="defaults"),
        pytest.param({"communicateMode": "tcp", "ip": "h", "port": 502, "slaveID": "4"},
                     TcpEndpoint("h", 502), 4, id="mode-lower-case"),
        pytest.param({"communicateMode": "RTUoverTCP", "ip": "gw", "port": 4001},
                     TcpEndpoint("gw", 4001, Framing.RTU), 1, id="rtu-over-tcp"),
        pytest.param({"communicateMode": "rtu_over_tcp", "ip": "gw", "port": 4001},
                     TcpEndpoint("gw", 4001, Framing.RTU), 1, id="rtu-over-tcp-spelled"),
        pytest.param({"communicateMode": "RTU", "serialName": "/dev/ttyUSB0", "baudRate": 19200,
                      "dataBits": 8, "stopBits": 2, "parity": "Even", "rs485Enabled": True,
                      "slaveID": 2},
                     SerialEndpoint("/dev/ttyUSB0", 19200, 8, "E", 2), 2,
                     id="examples-demo-rtu-serialName"),
        pytest.param({"slaveID": 1, "serialPort": "1", "baudRate": 115200, "dataBits": 8,
                      "parity": "even", "stopBits": 1},
                     SerialEndpoint("1", 115200, 8, "E", 1), 1, id="mappers-go-serialPort"),
        pytest.param({"serialPort": "/dev/ttyS1", "parity": "None"},
                     SerialEndpoint("/dev/ttyS1", 9600, 8, "N", 1), 1, id="rtu-defaults"),
        pytest.param({"serialPort": "/dev/ttyS1", "parity": "O", "dataBits": 7},
                     SerialEndpoint("/dev/ttyS1", 9600, 7, "O", 1), 1, id="parity-letter"),
        pytest.param({"serialPort": "/dev/ttyS1", "parity": "odd"},
                     SerialEndpoint("/dev/ttyS1", 9600, 8, "O", 1), 1, id="parity-lower"),
    ],
)  # fmt: skip
def test_protocol_dialects(
    tmp_path: Path, config: Doc, endpoint: TcpEndpoint | SerialEndpoint, unit_id: int
) -> None:
    (device,) = load(tmp_path, model_doc(), device_doc(config=config))
    assert device.endpoint == endpoint
    assert device.unit_id == unit_id
    assert device.options == ModbusOptions()


@pytest.mark.parametrize(
    ("config", "expected"),
    [
        ({}, "ip: no endpoint: give ip (and port) for Modbus TCP, "
             "or serialName/serialPort for Modbus RTU"),
        ({"ip": "h", "serialPort": "/dev/ttyS0"},
         "communicateMode: ambiguous: both ip (Modbus TCP) and a "
         "serial port (Modbus RTU) are given; set communicateMode to TCP, RTU or RTUoverTCP"),
        ({"communicateMode": "TCP", "serialPort": "/dev/ttyS0"},
         "ip: ip is required with communicateMode TCP"),
        ({"communicateMode": "RTU", "ip": "h"},
         "serialPort: serialPort (or serialName) is required with "
         "communicateMode RTU"),
        ({"communicateMode": "UDP", "ip": "h"},
         "communicateMode: communicateMode 'UDP' is not accepted; "
         "use TCP, RTU or RTUoverTCP"),
        ({"ip": "h", "slaveID": 0},
         "slaveID: unit id 0 is the broadcast address: no device "
         "answers it, so it cannot be polled; use the device's unit id 1..247"),
        ({"ip": "h", "unitID": 248}, "unitID: unitID 248 is out of range 0..247"),
        ({"ip": "h", "port": "http"},
         "port: port must be an integer, got 'http'"),
        ({"ip": "h", "port": 0}, "port: port 0 is out of range 1..65535"),
        ({"ip": "", "port": 502}, "ip: ip must be a non-empty string, got ''"),
        ({"serialName": "/dev/a", "serialPort": "/dev/b"},
         "serialPort: serialPort and serialName mean the same; give only one"),
        ({"ip": "h", "slaveID": 1, "unitID": 1},
         "unitID: unitID and slaveID mean the same; give only one"),
        ({"serialPort": "/dev/a", "parity": "mark"},
         "parity: parity 'mark' is not accepted; use None, Even, Odd, "
         "N, E or O"),
        ({"serialPort": "/dev/a", "stopBits": 3}, "stopBits: stopBits 3 is out of range 1..2"),
        ({"serialPort": "/dev/a", "rs485Enabled": "yes"},
         "rs485Enabled: rs485Enabled must be true or false, got 'yes'"),
        ({"ip": "h", "timeout": 0}, "timeout: timeout 0 is out of range 1..600000"),
        ({"ip": "h", "maxRegistersPerRequest": 126},
         "maxRegistersPerRequest: maxRegistersPerRequest 126 is out of range 1..125"),
        ({"ip": "h", "maxBitsPerRequest": 2001},
         "maxBitsPerRequest: maxBitsPerRequest 2001 is out of range 1..2000"),
        ({"ip": "h", "maxGap": -1}, "maxGap: maxGap -1 is out of range 0..2000"),
        ({"ip": "h", "retries": 1.5}, "retries: retries must be an integer, got 1.5"),
    ],
)  # fmt: skip
def test_protocol_errors(tmp_path: Path, config: Doc, expected: str) -> None:
    found = one_error(tmp_path, model_doc(), device_doc(config=config))
    assert found == f"spec.protocol.configData.{expected}"


@pytest.mark.parametrize(
    "ip",
    ["10.0.0.5", "::1", "fe80::1%eth0", "2001:db8::5", "plc", "PLC-01.plant.example",
     "plc.local.", "1plc.example", "a" * 63 + ".example"],
)  # fmt: skip
def test_ip_is_an_address_or_a_host_name(tmp_path: Path, ip: str) -> None:
    (device,) = load(tmp_path, model_doc(), device_doc(config={**TCP, "ip": ip}))
    assert device.endpoint == TcpEndpoint(ip, 5020)


@pytest.mark.parametrize(
    ("ip", "expected"),
    [
        ("127.0.0.1:5130", "holds a port, which ip does not take: put the port in port "
                           "(ip: 127.0.0.1, port: 5130)"),
        ("[::1]:502", "holds a port, which ip does not take: put the port in port "
                      "(ip: ::1, port: 502)"),
        ("mqtt://plc.local", "is a URL; give only the address or host name (ip: plc.local), "
                             "and the port in port"),
        ("tcp://", "is a URL; give only the address or host name, and the port in port"),
        ("\tplc", "contains whitespace; give only the address or host name"),
        ("1.2.3", "is not an IPv4 address (four numbers 0..255 joined by dots)"),
        ("[fe80::1]", "is an IPv6 address in brackets; give it without them (ip: fe80::1)"),
        ("plc-.local", "is neither an IPv4/IPv6 address nor a host name (RFC 1123: "
                       "dot-separated labels of 1..63 letters, digits and '-', not starting "
                       "or ending with '-')"),
        ("a" * 64 + ".example", "is neither an IPv4/IPv6 address nor a host name (RFC 1123: "
                                "dot-separated labels of 1..63 letters, digits and '-', not "
                                "starting or ending with '-')"),
        ("plc..local", "is neither an IPv4/IPv6 address nor a host name (RFC 1123: "
                       "dot-separated labels of 1..63 letters, digits and '-', not starting "
                       "or ending with '-')"),
    ],
)  # fmt: skip
def test_ip_errors(tmp_path: Path, ip: str, expected: str) -> None:
    found = one_error(tmp_path, model_doc(), device_doc(config={**TCP, "ip": ip}))
    assert found == f"spec.protocol.configData.ip: ip {ip!r} {expected}"


def test_rtu_over_tcp_ip_is_checked_too(tmp_path: Path) -> None:
    config = {"communicateMode": "RTUoverTCP", "ip": "gw:4001"}
    assert one_error(tmp_path, model_doc(), device_doc(config=config)) == (
        "spec.protocol.configData.ip: ip 'gw:4001' holds a port, which ip does not take: "
        "put the port in port (ip: gw, port: 4001)"
    )


def test_timeout_is_milliseconds(tmp_path: Path) -> None:
    assert one_error(tmp_path, model_doc(), device_doc(config={**TCP, "timeout": "2s"})) == (
        "spec.protocol.configData.timeout: timeout must be an integer number of milliseconds, "
        "got '2s' (1000 for one second)"
    )


def test_extension_options_and_model_defaults_overridden_key_by_key(tmp_path: Path) -> None:
    model = model_doc(protocolConfigData={
        "ip": "10.0.0.1", "port": 1502, "slaveID": 5, "timeout": 250, "retries": 3,
        "maxRegistersPerRequest": 60, "maxBitsPerRequest": 800, "maxGap": 0,
    })  # fmt: skip
    (device,) = load(tmp_path, model, device_doc(config={"ip": "10.0.0.9", "retries": 0}))
    assert device.endpoint == TcpEndpoint("10.0.0.9", 1502)
    assert device.unit_id == 5
    assert device.options == ModbusOptions(timeout_s=0.25, retries=0, max_registers=60,
                                           max_bits=800, max_gap=0)  # fmt: skip


def test_unknown_protocol_key_is_a_warning_naming_it(tmp_path: Path) -> None:
    devices, warnings = load_warned(
        tmp_path, model_doc(), device_doc(config={**TCP, "ipAddress": "x"})
    )
    assert len(devices) == 1
    assert warnings == [
        "spec.protocol.configData.ipAddress: unknown key 'ipAddress' is ignored; accepted: "
        "communicateMode, ip, port, slaveID, serialPort, baudRate, dataBits, stopBits, parity, "
        "rs485Enabled, serialType, timeout, retries, maxRegistersPerRequest, maxBitsPerRequest, "
        "maxGap, profile, firmware, sunspecChain, unitID, serialName"
    ]


def test_a_model_key_with_a_problem_is_reported_at_the_model(tmp_path: Path) -> None:
    model = model_doc(protocolConfigData={"timeout": "soon"})
    with pytest.raises(ConfigError) as raised:
        load(tmp_path, model, device_doc())
    (problem,) = raised.value.problems
    assert (problem.document, problem.obj, problem.field) == (
        1,
        "DeviceModel default/meter-model",
        "spec.protocolConfigData.timeout",
    )


# --- visitors and raw types (DESIGN.md §4) ---------------------------------------------


def typed_model(type_name: str | None) -> Doc:
    p: Doc = {"name": "value", "accessMode": "ReadWrite"}
    if type_name is not None:
        p["type"] = type_name
    return model_doc(p)


@pytest.mark.parametrize(
    ("model_type", "config", "raw"),
    [
        ("INT", {"register": "HoldingRegister", "limit": 1}, RawType.INT16),
        ("INT", {"register": "HoldingRegister", "limit": 2}, RawType.INT32),
        ("INT", {"register": "InputRegister", "limit": 4}, RawType.INT64),
        ("FLOAT", {"register": "HoldingRegister", "limit": 1}, RawType.INT16),
        ("FLOAT", {"register": "HoldingRegister", "limit": 2}, RawType.FLOAT32),
        ("FLOAT", {"register": "HoldingRegister", "limit": 4}, RawType.FLOAT64),
        ("DOUBLE", {"register": "HoldingRegister", "limit": 4}, RawType.FLOAT64),
        ("STRING", {"register": "HoldingRegister", "limit": 10}, RawType.STRING),
        ("BYTES", {"register": "InputRegister", "limit": 3}, RawType.BYTES),
        ("BOOLEAN", {"register": "HoldingRegister", "limit": 1}, RawType.BOOLEAN),
        ("STRING", {"register": "InputRegister", "limit": 2, "dataType": "uint32"}, RawType.UINT32),
        ("INT", {"register": "HoldingRegister", "limit": 4, "dataType": "UINT64"}, RawType.UINT64),
        ("INT", {"register": "HoldingRegister", "limit": 2, "dataType": "float"}, RawType.FLOAT32),
        (None, {"register": "HoldingRegister", "limit": 4, "dataType": "double"}, RawType.FLOAT64),
        (None, {"register": "InputRegister", "limit": 1, "dataType": "bit", "bit": 3}, RawType.BIT),
        ("BOOLEAN", {"register": "CoilRegister", "limit": 1}, RawType.BOOLEAN),
        ("INT", {"register": "CoilRegister", "limit": 1}, RawType.UINT16),
        ("INT", {"register": "DiscreteInputRegister", "limit": 16}, RawType.UINT16),
        ("INT", {"register": "DiscreteInputRegister", "limit": 17}, RawType.UINT32),
        ("BOOLEAN", {"register": "CoilRegister", "limit": 40}, RawType.UINT64),
        ("INT", {"register": "CoilRegister", "limit": 8, "dataType": "uint64"}, RawType.UINT64),
        ("INT", {"register": "CoilRegister", "limit": 1, "dataType": "Boolean"}, RawType.BOOLEAN),
    ],
)  # fmt: skip
def test_raw_type_resolution(
    tmp_path: Path, model_type: str | None, config: Doc, raw: RawType
) -> None:
    (device,) = load(
        tmp_path, typed_model(model_type), device_doc(prop("value", offset=0, **config))
    )
    (value,) = device.properties
    assert value.visitor.raw_type is raw
    assert value.visitor.limit == config["limit"]


@pytest.mark.parametrize(
    ("model_type", "config", "expected"),
    [
        ("INT", {"register": "HoldingRegister", "limit": 1, "dataType": "int32"},
         "limit: limit 1 does not fit int32 (2 registers)"),
        ("INT", {"register": "HoldingRegister", "limit": 2, "dataType": "int16"},
         "limit: limit 2 does not fit int16 (1 register)"),
        ("INT", {"register": "HoldingRegister", "limit": 3},
         "limit: limit 3 does not fit DeviceModel type INT: it takes limit 1 (int16), 2 (int32) or "
         "4 (int64); or set an explicit dataType"),
        ("DOUBLE", {"register": "HoldingRegister", "limit": 2},
         "limit: limit 2 does not fit DeviceModel type DOUBLE: it takes limit 4 (float64); or set "
         "an explicit dataType"),
        ("BOOLEAN", {"register": "HoldingRegister", "limit": 2},
         "limit: limit 2 does not fit DeviceModel type BOOLEAN: it takes limit 1 (boolean); or set "
         "an explicit dataType"),
        ("INT", {"register": "HoldingRegister", "dataType": "word"},
         "dataType: dataType 'word' is not known; accepted: int16, uint16, int32, uint32, int64, "
         "uint64, float32, float64, string, bytes, boolean, bit (exact), or int, float, double, "
         "string, boolean, bytes (KubeEdge generic, mapped by limit)"),
        ("INT", {"register": "HoldingRegister", "dataType": None},
         "dataType: dataType is empty; accepted: int16, uint16, int32, uint32, int64, "
         "uint64, float32, float64, string, bytes, boolean, bit (exact), or int, float, double, "
         "string, boolean, bytes (KubeEdge generic, mapped by limit)"),
        (None, {"register": "HoldingRegister"},
         "dataType: no Modbus type: the DeviceModel property type is absent; set dataType here or "
         "type in the model"),
        ("STREAM", {"register": "HoldingRegister"},
         "dataType: no Modbus type: the DeviceModel property type is STREAM; set dataType here or "
         "type in the model"),
        ("INT", {"register": "CoilRegister", "limit": 65},
         "limit: limit 65 bits do not fit one value (at most 64, uint64); split the property"),
        ("INT", {"register": "CoilRegister", "limit": 2, "dataType": "boolean"},
         "limit: limit 2 does not fit boolean (1 bit)"),
        ("INT", {"register": "DiscreteInputRegister", "limit": 17, "dataType": "uint16"},
         "limit: limit 17 does not fit uint16 (16 bits)"),
        ("INT", {"register": "CoilRegister", "dataType": "int16"},
         "dataType: dataType int16 cannot be read from CoilRegister, a bit table: use boolean, "
         "uint16, uint32 or uint64"),
        ("INT", {"register": "HoldingRegister", "dataType": "bit"},
         "bit: bit is required with dataType bit (0 = LSB)"),
        ("INT", {"register": "HoldingRegister", "dataType": "bit", "bit": 16},
         "bit: bit 16 is out of range 0..15"),
        ("INT", {"register": "HoldingRegister", "dataType": "int16", "bit": 2},
         "bit: bit is only used with dataType bit"),
        ("INT", {"register": "holding", "dataType": "int16"},
         "register: register 'holding' is not accepted; use CoilRegister, DiscreteInputRegister, "
         "HoldingRegister or InputRegister"),
        ("INT", {"dataType": "int16"}, "register: register is required"),
        ("INT", {"register": "InputRegister", "offset": None, "dataType": "int16"},
         "offset: offset is required (the 0-based address)"),
        ("INT", {"register": "InputRegister", "offset": -1, "dataType": "int16"},
         "offset: offset -1 is out of range 0..65535"),
        ("INT", {"register": "InputRegister", "offset": 65530, "limit": 8, "dataType": "string"},
         "offset: offset 65530 + limit 8 runs past the last address (65535) of InputRegister"),
        ("STRING", {"register": "InputRegister", "limit": 126},
         "limit: limit 126 is more than one read of InputRegister carries: 125 registers"),
        ("INT", {"register": "CoilRegister", "limit": 2001},
         "limit: limit 2001 is more than one read of CoilRegister carries: 2000 bits"),
        ("INT", {"register": "InputRegister", "limit": 0},
         "limit: limit 0 is out of range 1..65536"),
        ("INT", {"register": "HoldingRegister", "scale": 0}, "scale: scale must not be 0"),
        ("INT", {"register": "InputRegister", "scale": "x"},
         "scale: scale must be a number, got 'x'"),
        ("INT", {"register": "HoldingRegister", "isSwap": "maybe"},
         "isSwap: isSwap must be true or false, got 'maybe'"),
    ],
)  # fmt: skip
def test_visitor_errors(tmp_path: Path, model_type: str | None, config: Doc, expected: str) -> None:
    visitor = {"offset": 0, **config}
    if visitor["offset"] is None:
        del visitor["offset"]
    found = one_error(tmp_path, typed_model(model_type), device_doc(prop("value", **visitor)))
    assert found == f"spec.properties[0].visitors.configData.{expected}"


def test_limit_over_the_devices_own_request_cap(tmp_path: Path) -> None:
    config = {**TCP, "maxRegistersPerRequest": 8}
    device = device_doc(prop("value", register="HoldingRegister", offset=0, limit=10,
                             dataType="string"), config=config)  # fmt: skip
    assert one_error(tmp_path, typed_model("STRING"), device) == (
        "spec.properties[0].visitors.configData.limit: limit 10 is more than one read of "
        "HoldingRegister carries: 8 registers (maxRegistersPerRequest of this device)"
    )


def test_generic_types_warn_where_upstream_mappers_differ(tmp_path: Path) -> None:
    model = model_doc({"name": "count", "type": "INT"}, {"name": "temp", "type": "FLOAT"},
                      {"name": "exact", "type": "INT"})  # fmt: skip
    device = device_doc(
        prop("count", register="HoldingRegister", offset=0, limit=2),
        prop("temp", register="HoldingRegister", offset=2, limit=1, scale=0.5, dataType="float"),
        prop("exact", register="HoldingRegister", offset=3, limit=1, dataType="uint16"),
    )
    devices, warnings = load_warned(tmp_path, model, device)
    assert [p.visitor.raw_type for p in devices[0].properties] == [
        RawType.INT32,
        RawType.INT16,
        RawType.UINT16,
    ]
    assert warnings == [
        "spec.properties[0].visitors.configData.dataType: DeviceModel type INT with limit 2 is "
        "read as signed int32 (upstream mappers read it unsigned, which breaks negative values); "
        "set dataType int32 or uint32 to say which",
        "spec.properties[1].visitors.configData.dataType: dataType float with limit 1 is "
        "ambiguous: read as int16 × scale 0.5, as the upstream examples mapper does; set "
        "dataType int16 or uint16 to say which",
    ]


def test_bit_tables_ignore_scale_and_swaps(tmp_path: Path) -> None:
    device = device_doc(prop("value", register="CoilRegister", offset=4, limit=3, scale=10,
                             isSwap=True, isRegisterSwap=True))  # fmt: skip
    devices, warnings = load_warned(tmp_path, typed_model("INT"), device)
    assert devices[0].properties[0].visitor == Visitor(Table.COIL, 4, 3, RawType.UINT16)
    assert warnings == [
        "spec.properties[0].visitors.configData.scale: scale 10 is ignored for uint16 on "
        "CoilRegister"
    ]


def test_value_type_comes_from_the_model_or_the_visitor(tmp_path: Path) -> None:
    model = model_doc({"name": "a", "type": "double"}, {"name": "b"}, {"name": "c"})
    device = device_doc(
        prop("a", register="HoldingRegister", offset=0, limit=2, dataType="float32"),
        prop("b", register="HoldingRegister", offset=2, limit=4, dataType="float64"),
        prop("c", register="HoldingRegister", offset=6, limit=1, dataType="int"),
    )
    (loaded,) = load(tmp_path, model, device)
    assert [p.value_type for p in loaded.properties] == [
        ValueType.DOUBLE,
        ValueType.DOUBLE,
        ValueType.INT,
    ]


def test_model_visitor_is_the_default_and_device_keys_override_it(tmp_path: Path) -> None:
    model = model_doc(
        {"name": "power", "type": "FLOAT", "visitors": {"protocolName": "modbus", "configData": {
            "register": "InputRegister", "offset": 200, "limit": 2, "isSwap": True}}},
        {"name": "energy", "type": "DOUBLE", "visitors": {"protocolName": "modbus", "configData": {
            "register": "InputRegister", "offset": 100, "limit": 4}}},
        {"name": "label", "type": "STRING"},
    )  # fmt: skip
    device = device_doc({"name": "power", "collectCycle": 500, "visitors": {
        "protocolName": "modbus", "configData": {"offset": 210}}})  # fmt: skip
    devices, warnings = load_warned(tmp_path, model, device)
    power, energy = devices[0].properties
    assert power.visitor == Visitor(Table.INPUT_REGISTER, 210, 2, RawType.FLOAT32, is_swap=True)
    assert power.collect_cycle_ms == 500
    assert energy.visitor == Visitor(Table.INPUT_REGISTER, 100, 4, RawType.FLOAT64)
    assert energy.collect_cycle_ms == 1000
    assert warnings == [
        "spec: property 'label' has no Modbus visitor (neither in the DeviceModel nor in this "
        "Device); not polled"
    ]


def test_unknown_visitor_key_is_a_warning(tmp_path: Path) -> None:
    device = device_doc(prop("voltage", register="InputRegister", offset=0, limit=2,
                             dataType="float32", byteOrder="ABCD"), SETPOINT)  # fmt: skip
    _, warnings = load_warned(tmp_path, model_doc(), device)
    assert warnings == [
        "spec.properties[0].visitors.configData.byteOrder: unknown key 'byteOrder' is ignored; "
        "accepted: register, offset, limit, scale, isSwap, isRegisterSwap, dataType, bit, min, "
        "max, scaleFactor, missing"
    ]


def test_read_write_on_a_read_only_table_is_a_warning(tmp_path: Path) -> None:
    device = device_doc(VOLTAGE, prop("setpoint", register="InputRegister", offset=10, limit=1,
                                      dataType="int16"))  # fmt: skip
    _, warnings = load_warned(tmp_path, model_doc(), device)
    assert warnings == [
        "spec.properties[1].visitors.configData: property 'setpoint' is ReadWrite but "
        "InputRegister cannot be written; it is only read"
    ]


# --- write bounds, cycles, pushMethod, methods ---------------------------------------


def test_bounds_the_tighter_of_model_and_visitor_wins(tmp_path: Path) -> None:
    model = model_doc({"name": "sp", "type": "FLOAT", "accessMode": "ReadWrite",
                       "minimum": "-10.5", "maximum": "100"})  # fmt: skip
    device = device_doc(prop("sp", register="HoldingRegister", offset=0, limit=1, dataType="int16",
                             scale=0.1, min=0, max="250.5"))  # fmt: skip
    (loaded,) = load(tmp_path, model, device)
    assert (loaded.properties[0].minimum, loaded.properties[0].maximum) == (0.0, 100.0)


@pytest.mark.parametrize(
    ("model_prop", "config", "expected"),
    [
        ({"type": "INT", "maximum": "70000"}, {"limit": 1, "dataType": "int16"},
         "DeviceModel default/meter-model spec.properties[0].maximum: maximum 70000 does not fit "
         "int16 × scale 1 (-32768..32767)"),
        ({"type": "INT", "minimum": "-1"}, {"limit": 1, "dataType": "uint16"},
         "DeviceModel default/meter-model spec.properties[0].minimum: minimum -1 does not fit "
         "uint16 × scale 1 (0..65535)"),
        ({"type": "FLOAT"}, {"limit": 1, "dataType": "int16", "scale": 0.1, "max": 5000},
         "Device default/meter-1 spec.properties[0].visitors.configData.max: max 5000 does not "
         "fit int16 × scale 0.1 (-3276.8..3276.7)"),
        ({"type": "FLOAT"}, {"limit": 1, "dataType": "uint16", "scale": -2, "max": 10},
         "Device default/meter-1 spec.properties[0].visitors.configData.max: max 10 does not "
         "fit uint16 × scale -2 (-131070..0)"),
        ({"type": "INT", "minimum": "5", "maximum": "1"}, {"limit": 1, "dataType": "int16"},
         "DeviceModel default/meter-model spec.properties[0].maximum: maximum 1 is less than "
         "minimum 5"),
        ({"type": "INT", "maximum": "lots"}, {"limit": 1, "dataType": "int16"},
         "DeviceModel default/meter-model spec.properties[0].maximum: maximum must be a number "
         "(a string such as \"100.5\" is accepted as in v1beta1), got 'lots'"),
        ({"type": "INT", "maximum": "50"}, {"limit": 1, "dataType": "int16", "min": 60},
         "Device default/meter-1 spec.properties[0].visitors.configData.min: no value is "
         "allowed: minimum 60 > maximum 50 (the tighter of the DeviceModel's minimum/maximum and "
         "the visitor's min/max wins)"),
    ],
)  # fmt: skip
def test_bound_errors(tmp_path: Path, model_prop: Doc, config: Doc, expected: str) -> None:
    model = model_doc({"name": "v", "accessMode": "ReadWrite", **model_prop})
    device = device_doc(prop("v", register="HoldingRegister", offset=0, **config))
    with pytest.raises(ConfigError) as raised:
        load(tmp_path, model, device)
    assert [f"{p.obj} {p.field}: {p.message}" for p in raised.value.problems] == [expected]


def test_bounds_on_bits_are_limited_and_on_strings_ignored(tmp_path: Path) -> None:
    model = model_doc({"name": "relay", "type": "INT", "maximum": "100"},
                      {"name": "label", "type": "STRING", "maximum": "3"})  # fmt: skip
    device = device_doc(prop("relay", register="CoilRegister", offset=0),
                        prop("label", register="HoldingRegister", offset=0, limit=4))  # fmt: skip
    devices, warnings = load_warned(tmp_path, model, device)
    relay, label = devices[0].properties
    assert (relay.minimum, relay.maximum, label.minimum, label.maximum) == (None, 1.0, None, None)
    assert warnings == [
        "spec.properties[0].maximum: maximum 100 is outside what uint16 on CoilRegister holds "
        "(0..1); writes are limited to 0..1",
        "spec.properties[1].maximum: maximum is ignored for string",
    ]


@pytest.mark.parametrize(
    ("cycle", "expected"),
    [(None, 1000), (0, 1000), (1, 1), (250, 250), (86_400_000, 86_400_000), ("2000", 2000)],
)
def test_cycles_are_milliseconds(tmp_path: Path, cycle: object, expected: int) -> None:
    entry = {**copy.deepcopy(VOLTAGE), "collectCycle": cycle, "reportCycle": cycle}
    (device,) = load(tmp_path, model_doc(), device_doc(entry, SETPOINT))
    voltage, setpoint = device.properties
    assert (voltage.collect_cycle_ms, voltage.report_cycle_ms) == (expected, expected)
    assert (setpoint.collect_cycle_ms, setpoint.report_cycle_ms) == (1000, 1000)


@pytest.mark.parametrize(
    ("cycle", "expected"),
    [
        (-1, "collectCycle -1 is negative; give milliseconds (0 or absent means 1000)"),
        (86_400_001, "collectCycle 86400001 is more than one day: KubeEdge cycles are "
                     "milliseconds and this looks like nanoseconds (86.400001 ms)"),
        (10_000_000_000, "collectCycle 10000000000 is more than one day: KubeEdge cycles are "
                         "milliseconds and this looks like nanoseconds (10000 ms)"),
        (1.5, "collectCycle must be an integer number of milliseconds, got 1.5 "
              "(1000 for one second)"),
        ("1s", "collectCycle must be an integer number of milliseconds, got '1s' "
               "(1000 for one second)"),
        (True, "collectCycle must be an integer number of milliseconds, got True "
               "(1000 for one second)"),
    ],
)  # fmt: skip
def test_cycle_errors(tmp_path: Path, cycle: object, expected: str) -> None:
    entry = {**copy.deepcopy(VOLTAGE), "collectCycle": cycle}
    found = one_error(tmp_path, model_doc(), device_doc(entry, SETPOINT))
    assert found == f"spec.properties[0].collectCycle: {expected}"


def test_cycles_under_10_ms_are_warned(tmp_path: Path) -> None:
    entry = {**copy.deepcopy(VOLTAGE), "collectCycle": 5, "reportCycle": 9}
    setpoint = {**copy.deepcopy(SETPOINT), "collectCycle": 10, "reportCycle": 0}
    (device,), warnings = load_warned(tmp_path, model_doc(), device_doc(entry, setpoint))
    assert [p.collect_cycle_ms for p in device.properties] == [5, 10]
    assert warnings == [
        "spec.properties[0].collectCycle: collectCycle 5 ms is probably a mistake: KubeEdge "
        "cycles are milliseconds (5000 for 5 s)",
        "spec.properties[0].reportCycle: reportCycle 9 ms is probably a mistake: KubeEdge "
        "cycles are milliseconds (9000 for 9 s)",
    ]


def test_an_invalid_property_entry_has_no_follow_on_messages(tmp_path: Path) -> None:
    model = model_doc()
    model["spec"]["properties"][1]["accessMode"] = "RW"  # setpoint: invalid in the model
    device = device_doc({**copy.deepcopy(VOLTAGE), "reportToCloud": "maybe"},  # invalid entry
                        copy.deepcopy(SETPOINT),
                        methods=[{"name": "Set", "propertyNames": ["setpoint"]}])  # fmt: skip
    with pytest.raises(ConfigError) as raised:
        load(tmp_path, model, device)
    assert [f"{p.severity}: {p.field}" for p in raised.value.problems] == [
        "error: spec.properties[1].accessMode",
        "error: spec.properties[0].reportToCloud",
    ]  # no "not polled" for voltage, no "not in DeviceModel" for setpoint or its method


@pytest.mark.parametrize(
    ("mqtt", "expected"),
    [
        ({"address": "tcp://172.18.0.3:31883", "topic": "current temperature", "qos": 0,
          "retained": False}, MqttPush("172.18.0.3", 31883, "current temperature")),
        ({"address": "mqtt://broker", "topic": "t", "qos": 2, "retained": True},
         MqttPush("broker", 1883, "t", qos=2, retained=True)),
        ({"address": "ssl://broker", "topic": "t"}, MqttPush("broker", 8883, "t", tls=True)),
        ({"address": "MQTTS://broker:9883", "topic": "t"}, MqttPush("broker", 9883, "t", tls=True)),
        ({"address": "tls://[::1]:8884", "topic": "a/b"}, MqttPush("::1", 8884, "a/b", tls=True)),
    ],
)  # fmt: skip
def test_push_method_mqtt(tmp_path: Path, mqtt: Doc, expected: MqttPush) -> None:
    entry = {**copy.deepcopy(VOLTAGE), "pushMethod": {"mqtt": mqtt}}
    (device,) = load(tmp_path, model_doc(), device_doc(entry, SETPOINT))
    assert device.properties[0].push_mqtt == expected
    assert device.properties[1].push_mqtt is None


@pytest.mark.parametrize(
    ("mqtt", "expected"),
    [
        ({"address": "broker:1883", "topic": "t"},
         "address: address 'broker:1883' must be scheme://host[:port] with scheme tcp or mqtt "
         "(plain), ssl, mqtts or tls"),
        ({"address": "http://broker", "topic": "t"},
         "address: address 'http://broker' must be scheme://host[:port] with scheme tcp or mqtt "
         "(plain), ssl, mqtts or tls"),
        ({"address": "tcp://broker:99999", "topic": "t"},
         "address: address 'tcp://broker:99999' must be scheme://host[:port] with scheme tcp or "
         "mqtt (plain), ssl, mqtts or tls"),
        ({"address": "tcp://broker", "topic": "a/#"},
         "topic: topic 'a/#' must be non-empty and without the wildcards + and #"),
        ({"address": "tcp://broker"}, "topic: is required"),
        ({"address": "tcp://broker", "topic": "t", "qos": 3},
         "qos: Input should be less than or equal to 2 (got 3)"),
    ],
)  # fmt: skip
def test_push_method_mqtt_errors(tmp_path: Path, mqtt: Doc, expected: str) -> None:
    entry = {**copy.deepcopy(VOLTAGE), "pushMethod": {"mqtt": mqtt}}
    found = one_error(tmp_path, model_doc(), device_doc(entry, SETPOINT))
    assert found == f"spec.properties[0].pushMethod.mqtt.{expected}"


def test_other_push_methods_are_warned_and_ignored(tmp_path: Path) -> None:
    entry = {**copy.deepcopy(VOLTAGE), "pushMethod": {
        "http": {"hostName": "h", "port": 80}, "otel": {"endpointURL": "http://o"},
        "dbMethod": {"influxdb2": {}}}}  # fmt: skip
    devices, warnings = load_warned(tmp_path, model_doc(), device_doc(entry, SETPOINT))
    assert devices[0].properties[0].push_mqtt is None
    assert warnings == [
        f"spec.properties[0].pushMethod.{key}: pushMethod {key} is not supported, ignored "
        "(edge pushes to mqtt only)"
        for key in ("http", "otel", "dbMethod")
    ]


def test_methods(tmp_path: Path) -> None:
    methods = [{"name": "Set", "description": "write it", "propertyNames": ["setpoint"]},
               {"name": "Nothing"}]  # fmt: skip
    (device,) = load(tmp_path, model_doc(), device_doc(methods=methods))
    assert device.methods == (
        MethodSpec("Set", ("setpoint",), "write it"),
        MethodSpec("Nothing", ()),
    )


def test_method_errors(tmp_path: Path) -> None:
    methods = [{"name": "Set", "propertyNames": ["setpoint", "set_point"]},
               {"name": "Set", "propertyNames": []}]  # fmt: skip
    assert errors(tmp_path, model_doc(), device_doc(methods=methods)) == [
        "spec.methods[1]: duplicate method 'Set' (first at spec.methods[0])",
        "spec.methods[0].propertyNames[1]: method 'Set' names property 'set_point', which "
        "DeviceModel default/meter-model does not have; it has: voltage, setpoint",
    ]


# --- layouts, files, documents --------------------------------------------------------


def _twin_status() -> Doc:
    return {"state": "online", "twins": [{
        "propertyName": "setpoint",
        "reported": {"value": "40", "metadata": {"timestamp": "1550049403598", "type": "int"}},
        "observedDesired": {"value": "42"},
    }]}  # fmt: skip


def test_v1beta1_1_22_and_1_23_layouts_load_alike(tmp_path: Path) -> None:
    setpoint = {**copy.deepcopy(SETPOINT), "desired": {"value": "42", "metadata": {"type": "int"}}}
    old = device_doc(VOLTAGE, setpoint)
    old["status"] = _twin_status()  # ≤1.22: twins on the Device
    new = device_doc(VOLTAGE, setpoint, stateReport={"reportCycle": 60000, "reportToCloud": True})
    status = {"apiVersion": "devices.kubeedge.io/v1beta1", "kind": "DeviceStatus",
              "metadata": {"name": "meter-1", "namespace": "default"}, "spec": {},
              "status": _twin_status()}  # fmt: skip
    (before,) = load(tmp_path / "1.22", model_doc(), old)
    (after,) = load(tmp_path / "1.23", model_doc(), new, status)
    assert before.properties[1].desired == "42"
    assert before.properties == after.properties
    assert (before.endpoint, before.unit_id) == (after.endpoint, after.unit_id)


def test_a_directory_of_manifests(tmp_path: Path) -> None:
    root = tmp_path / "manifests"
    write_docs(root / "b-devices" / "meter-2.yml", device_doc(name="meter-2"))
    write_docs(root / "a-models.yaml", model_doc())
    write_docs(root / "b-devices" / "nested" / "meter-1.yaml",
               device_doc(name="meter-1", config=unit(2)))  # fmt: skip
    write_docs(
        root / "..2024_01_01" / "meter-1.yaml", device_doc(name="meter-1")
    )  # ConfigMap mount
    write_docs(root / "..data" / "meter-1.yaml", device_doc(name="meter-1"))
    (root / "notes.txt").write_text("apiVersion: not yaml we read\n")
    config = tmp_path / "edge.yaml"
    config.write_text("node: gw-01\ndevices: manifests\n")
    loaded = load_config(config)
    assert loaded.files == tuple(str(root / f) for f in
                                 ("a-models.yaml", "b-devices/meter-2.yml",
                                  "b-devices/nested/meter-1.yaml"))  # fmt: skip
    assert [d.name for d in loaded.devices] == ["meter-2", "meter-1"]
    assert loaded.warnings == ()
    assert loaded.devices[0].source == f"{root}/b-devices/meter-2.yml: document 1"


def test_a_file_listed_twice_is_read_once(tmp_path: Path) -> None:
    file = write_docs(tmp_path / "m" / "all.yaml", model_doc(), device_doc())
    devices, _ = load_manifests([tmp_path / "m", file, str(file)])
    assert [d.name for d in devices] == ["meter-1"]


def test_multi_document_file(tmp_path: Path) -> None:
    config_map = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "x"}}
    file = write_docs(tmp_path / "all.yaml", None, model_doc(), config_map, device_doc(),
                      device_doc(name="meter-2", config={**TCP, "slaveID": 2}), None)  # fmt: skip
    devices, warnings = load_manifests([file])
    assert [(d.name, d.unit_id, d.source) for d in devices] == [
        ("meter-1", 1, f"{file}: document 4"),
        ("meter-2", 2, f"{file}: document 5"),
    ]
    assert [(w.document, w.field, w.message) for w in warnings] == [
        (3, "apiVersion", "apiVersion 'v1' (kind ConfigMap) is not devices.kubeedge.io/v1beta1 "
                          "or v1alpha2; ignored"),
    ]  # fmt: skip


def test_kubectl_list_items_are_objects(tmp_path: Path) -> None:
    bad = device_doc(name="meter-2", config={"ip": "h", "port": "x"})
    listed = {"apiVersion": "v1", "kind": "List", "items": [model_doc(), device_doc(), bad]}
    file = write_docs(tmp_path / "dump.yaml", listed)
    with pytest.raises(ConfigError) as raised:
        load_manifests([file])
    assert [(p.document, p.obj, p.field) for p in raised.value.problems] == [
        (1, "Device default/meter-2", "items[2].spec.protocol.configData.port")
    ]


def test_every_problem_names_file_document_object_and_field(tmp_path: Path) -> None:
    file = write_docs(tmp_path / "m.yaml", model_doc(),
                      device_doc(config={**TCP, "port": 0}))  # fmt: skip
    with pytest.raises(ConfigError) as raised:
        load_manifests([file])
    assert raised.value.problems == [
        Problem(str(file), 2, "Device default/meter-1", "spec.protocol.configData.port",
                "port 0 is out of range 1..65535"),
    ]  # fmt: skip
    assert str(raised.value) == (
        f"error: {file} document 2 (Device default/meter-1): spec.protocol.configData.port: "
        "port 0 is out of range 1..65535"
    )


def test_all_problems_of_all_documents_at_once_and_nothing_applied(tmp_path: Path) -> None:
    good = write_docs(tmp_path / "a.yaml", model_doc(), device_doc(name="good"))
    bad = write_docs(tmp_path / "b.yaml",
                     device_doc(VOLTAGE, prop("setpoint", register="InputRegister", offset=-1,
                                              dataType="int16"),
                                name="bad-1", config=unit(2)),
                     device_doc(name="bad-2", config={}),
                     device_doc(name="bad-3", model="nope"))  # fmt: skip
    with pytest.raises(ConfigError) as raised:
        load_manifests([good, bad])
    assert [(p.file, p.document, p.obj, p.field) for p in raised.value.problems] == [
        (str(bad), 1, "Device default/bad-1", "spec.properties[1].visitors.configData.offset"),
        (str(bad), 2, "Device default/bad-2", "spec.protocol.configData.ip"),
        (str(bad), 3, "Device default/bad-3", "spec.deviceModelRef.name"),
    ]


def test_yaml_syntax_error_names_file_document_and_line(tmp_path: Path) -> None:
    file = tmp_path / "m.yaml"
    head = yaml.safe_dump(model_doc()) + "---\nkind: Device\nmetadata:\n"
    file.write_text(head + "  name: [x\n  namespace: default\n")
    with pytest.raises(ConfigError) as raised:
        load_manifests([file])
    (problem,) = raised.value.problems
    line = len(head.splitlines()) + 1
    assert (problem.file, problem.document, problem.obj, problem.field) == (str(file), 2, None, "")
    assert problem.message == (
        f"YAML syntax error at line {line + 1}, column 12: did not find expected ',' or ']', "
        f"while parsing a flow sequence (line {line})"
    )


@pytest.mark.parametrize(
    ("doc", "expected"),
    [
        ("- just\n- a list\n", "document 1: : must be a mapping (a Kubernetes object), got list"),
        ("apiVersion: devices.kubeedge.io/v1beta1\nkind: Gadget\nmetadata: {name: g}\n",
         "document 1: kind: kind 'Gadget' is not known in devices.kubeedge.io/v1beta1; "
         "accepted: Device, DeviceModel, DeviceStatus"),
        ("apiVersion: devices.kubeedge.io/v1alpha2\nkind: DeviceStatus\nmetadata: {name: g}\n",
         "document 1: kind: kind 'DeviceStatus' is not known in devices.kubeedge.io/v1alpha2; "
         "accepted: Device, DeviceModel"),
        ("apiVersion: devices.kubeedge.io/v1beta1\nkind: Device\nmetadata: {}\nspec: {}\n",
         "document 1: metadata.name: is required"),
        ("apiVersion: devices.kubeedge.io/v1beta1\nkind: Device\nmetadata: {name: d}\nspec: {}\n",
         "document 1: spec.deviceModelRef: is required"),
        ("apiVersion: devices.kubeedge.io/v1beta1\nkind: DeviceModel\nmetadata: {name: m}\n"
         "spec: {properties: [{name: a, type: NUMBER}, {type: INT}, {name: c, accessMode: RW}]}\n",
         "document 1: spec.properties[0].type: type 'NUMBER' is not a KubeEdge property type; "
         "accepted: INT, FLOAT, DOUBLE, STRING, BOOLEAN, BYTES, STREAM\n"
         "document 1: spec.properties[1].name: is required\n"
         "document 1: spec.properties[2].accessMode: Input should be 'ReadOnly' or 'ReadWrite' "
         "(got 'RW')"),
    ],
)  # fmt: skip
def test_document_errors(tmp_path: Path, doc: str, expected: str) -> None:
    file = tmp_path / "m.yaml"
    file.write_text(doc)
    with pytest.raises(ConfigError) as raised:
        load_manifests([file])
    found = [f"document {p.document}: {p.field}: {p.message}" for p in raised.value.problems]
    assert found == expected.split("\n")


def test_other_api_versions_and_protocols_are_skipped_with_a_warning(tmp_path: Path) -> None:
    old = {**device_doc(name="old"), "apiVersion": "devices.kubeedge.io/v1alpha1"}
    opcua = device_doc(name="opc", config={"url": "opc.tcp://x"})
    opcua["spec"]["protocol"]["protocolName"] = "opcua"
    no_protocol = device_doc(name="bare")
    del no_protocol["spec"]["protocol"]["protocolName"]
    model = model_doc()
    del model["spec"]["protocol"]
    devices, warnings = load_warned(tmp_path, model, old, opcua, no_protocol)
    assert devices == ()
    assert warnings == [
        "apiVersion: apiVersion 'devices.kubeedge.io/v1alpha1' (kind Device) is not "
        "devices.kubeedge.io/v1beta1 or v1alpha2; ignored",
        "spec.protocol: protocol 'opcua' is not supported (edge speaks modbus: "
        "spec.protocol.protocolName or the DeviceModel's spec.protocol); skipped",
        "spec.protocol: no protocol is named (edge speaks modbus: spec.protocol.protocolName or "
        "the DeviceModel's spec.protocol); skipped",
    ]


def test_the_model_protocol_applies_when_the_device_names_none(tmp_path: Path) -> None:
    device = device_doc()
    del device["spec"]["protocol"]["protocolName"]
    assert len(load(tmp_path, model_doc(), device)) == 1


@pytest.mark.parametrize(
    ("docs", "expected"),
    [
        ([model_doc(), device_doc(), device_doc()],
         "document 3: metadata.name: duplicate Device default/meter-1: already defined in "
         "{file}: document 2"),
        ([model_doc(), model_doc(), device_doc()],
         "document 2: metadata.name: duplicate DeviceModel default/meter-model: already defined "
         "in {file}: document 1"),
        ([model_doc(), device_doc(VOLTAGE, SETPOINT, VOLTAGE)],
         "document 2: spec.properties[2]: duplicate property 'voltage' (first at "
         "spec.properties[0])"),
        ([model_doc({"name": "a", "type": "INT"}, {"name": "a", "type": "INT"}), device_doc()],
         "document 1: spec.properties[1]: duplicate property 'a' (first at spec.properties[0])"),
    ],
)  # fmt: skip
def test_duplicates(tmp_path: Path, docs: list[Doc], expected: str) -> None:
    file = write_docs(tmp_path / "m.yaml", *docs)
    with pytest.raises(ConfigError) as raised:
        load_manifests([file])
    found = [f"document {p.document}: {p.field}: {p.message}" for p in raised.value.problems]
    assert expected.format(file=file) in found


def test_a_model_in_another_namespace_does_not_resolve(tmp_path: Path) -> None:
    model = model_doc()
    model["metadata"]["namespace"] = "plant"
    assert one_error(tmp_path, model, device_doc()) == (
        "spec.deviceModelRef.name: DeviceModel default/meter-model is not in the manifests "
        "read; DeviceModels in namespace default: none"
    )


def test_a_broken_model_is_not_reported_as_missing(tmp_path: Path) -> None:
    model = model_doc()
    model["spec"]["properties"] = "voltage"
    assert one_error(tmp_path, model, device_doc()) == (
        "spec.properties: Input should be a valid list (got 'voltage')"
    )


def test_missing_manifest_path(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as raised:
        load_manifests([tmp_path / "nowhere"])
    assert [str(p) for p in raised.value.problems] == [
        f"error: {tmp_path / 'nowhere'}: no such file or directory"
    ]


# --- the agent file ------------------------------------------------------------------


def write_agent(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "etc" / "edge.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def agent_problems(tmp_path: Path, text: str) -> list[str]:
    with pytest.raises(ConfigError) as raised:
        load_config(write_agent(tmp_path, text))
    return [f"{p.field}: {p.message}" for p in raised.value.problems]


def test_agent_file_defaults(tmp_path: Path) -> None:
    loaded = load_config(write_agent(tmp_path, "node: gw-01\n"))
    base = tmp_path / "etc"
    assert (loaded.devices, loaded.files) == ((), ())
    assert [str(w) for w in loaded.warnings] == [
        f"warning: {base / 'edge.yaml'}: devices: no device will be polled: devices lists no "
        "manifest file or directory"
    ]
    agent = loaded.agent
    assert agent.model_dump() == {
        "node": "gw-01",
        "devices": [],
        "profiles": [],
        "uplink": {"host": "127.0.0.1", "port": 1883, "qos": 1, "topic_prefix": "edge/v1/{node}",
                   "client_id": None, "keepalive": 30,
                   "tls": {"ca": None, "cert": None, "key": None},
                   "username": None, "password_file": None, "reconnect_max_ms": 1000,
                   "inflight": 100, "rate": 2500.0, "order": "device"},
        "store": {"path": Path("/var/lib/edge/edge.db"), "max_bytes": 268435456, "ttl": 604800,
                  "drop": "oldest", "synchronous": "full"},
        "web": {"enabled": True, "listen": "127.0.0.1:8080", "tls": None, "users": [],
                "tokens": [], "view": "local"},
        "trust": {"keys": []},
        "plugins": {"dir": base / "plugins"},
        "policy": {"mode": "audit", "policies": [], "failsafe": {
            "loopback": True, "dns": True, "dhcp": True, "broker": True, "ssh": False,
            "extra": [], "ingress": [], "resolv_conf": Path("/etc/resolv.conf")},
            "pin_dir": Path("/sys/fs/bpf/edge"), "backend": "libbpf"},
        "modbus": {"backoff_initial_ms": 500, "backoff_max_ms": 30000, "connect_timeout_ms": 3000,
                   "breaker_failures": 3, "probe_initial_ms": 1000, "probe_max_ms": 60000},
        "sync": {"health_window": 30},
        "log": {"level": "info"},
        "release": None,
    }  # fmt: skip
    assert (agent.topic_prefix, agent.client_id, agent.uplink.tls.enabled) == (
        "edge/v1/gw-01",
        "edge-gw-01",
        False,
    )


def openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """ca.pem (a self-signed CA), gw.pem + gw.key (a certificate and its key), other.key
    (another key), locked.key (gw.key encrypted), ed25519.pub and ec.pub (public keys)."""
    d = tmp_path_factory.mktemp("pki")
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-days", "2"]
    openssl("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-subj", "/CN=ca", cwd=d)
    openssl("req", "-x509", *ec, "-keyout", "gw.key", "-out", "gw.pem", "-subj", "/CN=gw", cwd=d)
    openssl("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:prime256v1",
            "-out", "other.key", cwd=d)  # fmt: skip
    openssl("pkey", "-in", "gw.key", "-aes256", "-passout", "pass:secret", "-out", "locked.key",
            cwd=d)  # fmt: skip
    openssl("genpkey", "-algorithm", "ed25519", "-out", "ed25519.key", cwd=d)
    openssl("pkey", "-in", "ed25519.key", "-pubout", "-out", "ed25519.pub", cwd=d)
    openssl("pkey", "-in", "other.key", "-pubout", "-out", "ec.pub", cwd=d)
    return d


def test_agent_file_full(tmp_path: Path, pki: Path) -> None:
    write_docs(tmp_path / "etc" / "manifests" / "m.yaml", model_doc())
    elsewhere = write_docs(tmp_path / "elsewhere" / "d.yaml", device_doc())
    secrets = tmp_path / "secrets"
    for file, source in [("etc/certs/ca.pem", "ca.pem"), ("etc/certs/gw.pem", "gw.pem"),
                         ("secrets/gw.key", "gw.key"), ("etc/keys/cloud.pem", "ed25519.pub")]:
        (tmp_path / file).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(pki / source, tmp_path / file)
    (tmp_path / "etc/secrets").mkdir()
    (tmp_path / "etc/secrets/mqtt.pw").write_text("-\n")
    path = write_agent(
        tmp_path,
        """\
node: gw-01
devices: [./manifests, ELSEWHERE]
uplink:
  host: broker.example.com
  port: 8883
  qos: 0
  topic_prefix: plant-3/{node}
  client_id: gateway-one
  keepalive: 60
  tls: {ca: certs/ca.pem, cert: certs/gw.pem, key: SECRETS/gw.key}
  username: gw-01
  password_file: secrets/mqtt.pw
store: {path: data/edge.db, max_bytes: 1048576, ttl: 1d12h}
web: {listen: "[::1]:9090"}
trust: {keys: [keys/cloud.pem]}
plugins: {dir: /opt/edge/plugins}
policy: {mode: enforce}
modbus: {backoff_initial_ms: 100, backoff_max_ms: 100, connect_timeout_ms: 1500}
log: {level: debug}
""".replace("ELSEWHERE", str(elsewhere)).replace("SECRETS", str(secrets)),
    )
    base = tmp_path / "etc"
    loaded = load_config(path)
    agent = loaded.agent
    assert isinstance(agent, AgentFile)
    assert agent.devices == [base / "manifests", elsewhere]
    assert agent.uplink.tls.ca == base / "certs" / "ca.pem"
    assert agent.uplink.tls.key == secrets / "gw.key"
    assert agent.uplink.tls.enabled
    assert agent.uplink.password_file == base / "secrets" / "mqtt.pw"
    assert (agent.store.path, agent.store.ttl) == (base / "data" / "edge.db", 36 * 3600)
    assert agent.trust.keys == [base / "keys" / "cloud.pem"]
    assert (agent.topic_prefix, agent.client_id) == ("plant-3/gw-01", "gateway-one")
    assert (agent.web.listen, agent.policy.mode, agent.log.level) == (
        "[::1]:9090",
        "enforce",
        "debug",
    )
    assert [d.name for d in loaded.devices] == ["meter-1"]


@pytest.mark.parametrize("level", ["debug", "INFO", "Warning", "ERROR"])
def test_log_level_in_any_case(tmp_path: Path, level: str) -> None:
    path = write_agent(tmp_path, f"node: gw\nlog: {{level: {level}}}\n")
    assert load_config(path).agent.log.level == level.lower()


@pytest.mark.parametrize(
    ("ttl", "seconds"),
    [("7d", 604800), ("12h", 43200), ("30m", 1800), ("45s", 45), ("1h30m", 5400), (90, 90),
     ("3600", 3600)],
)  # fmt: skip
def test_store_ttl_durations(tmp_path: Path, ttl: object, seconds: int) -> None:
    path = write_agent(tmp_path, yaml.safe_dump({"node": "gw", "store": {"ttl": ttl}}))
    assert load_config(path).agent.store.ttl == seconds


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("uplink: {host: b}\n", ["node: is required"]),
        ("node: gw/01\n", ["node: must be one MQTT topic level, without '/' (got 'gw/01')"]),
        ("node: 'gw+#'\n", ["node: must be one MQTT topic level, without '+' '#' (got 'gw+#')"]),
        ("node: ''\n", ["node: must not be empty (got '')"]),
        ("node: gw\nnodes: [a]\n",
         ["nodes: unknown key 'nodes'; accepted: node, devices, profiles, uplink, store, web, "
          "trust, plugins, policy, modbus, sync, log, release"]),
        ("node: gw\nuplink: {tls: {key: edge.yaml}}\n",
         ["uplink.tls: cert and key go together: give both or neither"]),
        ("node: gw\nuplink: {qos: 2, port: 0, topic_prefix: 'a/#'}\n",
         ["uplink.port: Input should be greater than or equal to 1 (got 0)",
          "uplink.qos: Input should be 0 or 1 (got 2)",
          "uplink.topic_prefix: must be a non-empty MQTT topic without the wildcards + and # "
          "(got 'a/#')"]),
        ("node: \"gw\\0\"\n", ["node: must not hold control characters: '\\x00' (got 'gw\\x00')"]),
        ("node: gw\nuplink: {topic_prefix: \"a\\x85/{node}\"}\n",
         ["uplink.topic_prefix: must not hold control characters: '\\x85' (got 'a\\x85/{node}')"]),
        ("node: gw\nuplink: {topic_prefix: '/edge/{node}'}\n",
         ["uplink.topic_prefix: must not have an empty topic level: no leading or trailing '/', "
          "no '//' (got '/edge/{node}')"]),
        ("node: gw\nuplink: {topic_prefix: $edge}\n",
         ["uplink.topic_prefix: must not start with '$': brokers reserve such topics ($SYS) and "
          "drop what clients publish to them (got '$edge')"]),
        ("node: gw\nuplink: {topic_prefix: 'edge/{node}}'}\n",
         ["uplink.topic_prefix: holds '{' or '}' besides {node}, the only placeholder (a typo?) "
          "(got 'edge/{node}}')"]),
        ("node: gw\nuplink: {port: '1883', keepalive: true}\nstore: {ttl: 1.5}\n",
         ["uplink.port: Input should be a valid integer (got '1883')",
          "uplink.keepalive: Input should be a valid integer (got True)",
          "store.ttl: Input should be a valid integer (got 1.5)"]),
        ("node: gw\nuplink: {qos: true}\n",
         ["uplink.qos: Input should be a valid integer (got True)"]),
        ("node: gw\nstore: {ttl: 1w}\n",
         ["store.ttl: '1w' is not a duration; use e.g. 7d, 12h, 30m, 45s, 1h30m or seconds "
          "(got '1w')"]),
        ("node: gw\nstore: {ttl: 0}\n", ["store.ttl: Input should be greater than 0 (got 0)"]),
        ("node: gw\nweb: {listen: localhost}\n",
         ["web.listen: must be host:port, e.g. 127.0.0.1:8080 or [::1]:8080 (got 'localhost')"]),
        ("node: gw\nweb: {users: [{name: admin, password_hash: hunter2}]}\n",
         ["web.users[0].password_hash: must be a scrypt hash as `edge web passwd` prints it "
          "($scrypt$ln=…,r=…,p=…$salt$hash), never the password itself: not a PHC string (it "
          "starts $scrypt$)"]),
        ("node: gw\nweb: {tokens: [edge_abc]}\n",
         ["web.tokens[0]: must be sha256:<64 hex digits> as `edge web token` prints it, never "
          "the token itself"]),
        ("node: gw\nweb: {listen: 'gw_01:8080'}\n",
         ["web.listen: must be host:port with an IP address or host name: the host 'gw_01' is "
          "neither an IPv4/IPv6 address nor a host name (RFC 1123: dot-separated labels of "
          "1..63 letters, digits and '-', not starting or ending with '-') (got "
          "'gw_01:8080')"]),
        ("node: gw\nweb: {view: all}\n",
         ["web.view: Input should be 'local' or 'login' (got 'all')"]),
        ("node: gw\npolicy: {mode: block}\n",
         ["policy.mode: Input should be 'audit' or 'enforce' (got 'block')"]),
        ("node: gw\nmodbus: {backoff_initial_ms: 5000, backoff_max_ms: 1000}\n",
         ["modbus: backoff_initial_ms must not be greater than backoff_max_ms"]),
        ("node: gw\nlog: {level: Trace}\n",
         ["log.level: Input should be 'debug', 'info', 'warning' or 'error' (got 'trace')"]),
        ("node: gw\nlog: {lvl: debug}\n", ["log.lvl: unknown key 'lvl'; accepted: level"]),
        ("", [": must be a mapping of settings (node is required), but it is empty"]),
        ("- node\n", [": must be a mapping of settings (node is required), but it is a list"]),
    ],
)  # fmt: skip
def test_agent_file_errors(tmp_path: Path, text: str, expected: list[str]) -> None:
    assert agent_problems(tmp_path, text) == expected


@pytest.mark.parametrize(
    ("prefix", "topic"),
    [("plant-3", "plant-3"), ("{node}", "gw-01"), ("a/{node}/b/{node}", "a/gw-01/b/gw-01"),
     ("edge v1/ünits$/{node}", "edge v1/ünits$/gw-01")],
)  # fmt: skip
def test_topic_prefix(tmp_path: Path, prefix: str, topic: str) -> None:
    agent = {"node": "gw-01", "uplink": {"topic_prefix": prefix}}
    path = write_agent(tmp_path, yaml.safe_dump(agent))
    assert load_config(path).agent.topic_prefix == topic


@pytest.mark.parametrize(
    ("client_id", "warned"),
    [("a" * 23, False), ("a" * 24, True), ("ü" * 12, True), ("a" * 65535, True)],
)
def test_client_id_longer_than_23_bytes_is_a_warning(
    tmp_path: Path, client_id: str, warned: bool
) -> None:
    path = write_agent(tmp_path, yaml.safe_dump({"node": "gw", "uplink": {"client_id": client_id}}))
    loaded = load_config(path)
    assert loaded.agent.client_id == client_id
    warnings = [w.message for w in loaded.warnings if w.field == "uplink.client_id"]
    size = len(client_id.encode())
    assert warnings == [
        f"is {size} bytes long: MQTT 3.1.1 servers need only accept client ids of 1 to 23 "
        "bytes (§3.1.3.1), so a broker may refuse it; most accept longer ones"
    ] * warned


@pytest.mark.parametrize(
    ("client_id", "expected"),
    [("a" * 65536, "is 65536 bytes long (UTF-8), more than the 65535 an MQTT string can hold "
                   "(MQTT 3.1.1 §1.5.3)"),
     ("gw\x7f", "must not hold control characters: '\\x7f' (got 'gw\\x7f')"),
     ("", "String should have at least 1 character (got '')")],
)  # fmt: skip
def test_client_id_errors(tmp_path: Path, client_id: str, expected: str) -> None:
    text = yaml.safe_dump({"node": "gw", "uplink": {"client_id": client_id}})
    assert agent_problems(tmp_path, text) == [f"uplink.client_id: {expected}"]


@pytest.mark.parametrize(
    ("tls", "expected"),
    [
        ({"ca": "gw.key"}, "uplink.tls.ca: PKI/gw.key: cannot be loaded as CA certificates (PEM, "
         "-----BEGIN CERTIFICATE-----): [X509: NO_CERTIFICATE_OR_CRL_FOUND] no certificate or "
         "crl found"),
        ({"cert": "ed25519.pub", "key": "gw.key"}, "uplink.tls.cert: PKI/ed25519.pub: cannot be "
         "loaded as a certificate (PEM, -----BEGIN CERTIFICATE-----): [X509: "
         "NO_CERTIFICATE_OR_CRL_FOUND] no certificate or crl found"),
        ({"cert": "gw.pem", "key": "other.key"}, "uplink.tls.key: PKI/other.key: does not match "
         "cert PKI/gw.pem: [X509: KEY_VALUES_MISMATCH] key values mismatch"),
        ({"cert": "gw.pem", "key": "ec.pub"}, "uplink.tls.key: PKI/ec.pub: cannot be loaded as a "
         "PEM private key: [SSL] PEM lib"),
        ({"cert": "gw.pem", "key": "locked.key"}, "uplink.tls.key: PKI/locked.key: is encrypted, "
         "and the agent has no passphrase for it: store it unencrypted"),
    ],
)  # fmt: skip
def test_tls_files_are_loaded_as_the_agent_loads_them(
    tmp_path: Path, pki: Path, tls: Doc, expected: str
) -> None:
    agent = {"node": "gw", "uplink": {"tls": {k: str(pki / v) for k, v in tls.items()}}}
    assert agent_problems(tmp_path, yaml.safe_dump(agent)) == [expected.replace("PKI", str(pki))]


def test_trust_keys_are_ed25519_public_keys(tmp_path: Path, pki: Path) -> None:
    keys = [str(pki / name) for name in ("ed25519.pub", "ec.pub", "ed25519.key")]
    assert agent_problems(tmp_path, yaml.safe_dump({"node": "gw", "trust": {"keys": keys}})) == [
        f"trust.keys[1]: {keys[1]}: is a public key, but not an Ed25519 one (signatures are "
        "EdDSA/Ed25519)",
        f"trust.keys[2]: {keys[2]}: holds no PEM public key (-----BEGIN PUBLIC KEY-----)",
    ]


def test_agent_file_missing_or_broken(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as raised:
        load_config(tmp_path / "edge.yaml")
    assert [str(p) for p in raised.value.problems] == [
        f"error: {tmp_path / 'edge.yaml'}: no such file"
    ]
    path = write_agent(tmp_path, "node: gw\nuplink:\n  host: [b\n")
    with pytest.raises(ConfigError) as raised:
        load_config(path)
    (problem,) = raised.value.problems
    assert (problem.file, problem.document, problem.field) == (str(path), None, "")
    assert problem.message.startswith(
        "YAML syntax error at line 4, column 1: did not find expected"
    )


def test_agent_and_manifest_problems_come_together(tmp_path: Path) -> None:
    write_docs(tmp_path / "etc" / "m.yaml", model_doc(), device_doc(config={"ip": "h", "port": 0}))
    problems = agent_problems(
        tmp_path, "node: gw\ndevices: [m.yaml, gone.yaml]\nuplink: {qos: 9}\n"
    )
    assert problems == [
        f"devices[1]: gone.yaml: no such file or directory ({tmp_path / 'etc' / 'gone.yaml'})",
        "uplink.qos: Input should be 0 or 1 (got 9)",
        "spec.protocol.configData.port: port 0 is out of range 1..65535",
    ]


def test_agent_node_filters_devices(tmp_path: Path) -> None:
    write_docs(tmp_path / "etc" / "m.yaml", model_doc(), device_doc(nodeName="gw-02"),
               device_doc(name="meter-2", nodeName="gw-01"),
               device_doc(name="meter-3", config=unit(3)))  # fmt: skip
    loaded = load_config(write_agent(tmp_path, "node: gw-01\ndevices: [m.yaml]\n"))
    assert [d.name for d in loaded.devices] == ["meter-2", "meter-3"]
    assert [w.obj for w in loaded.warnings] == ["Device default/meter-1"]


# --- v1alpha2 specifics --------------------------------------------------------------


def v1alpha2_device(protocol: Doc, *visitors: Doc, status: Doc | None = None) -> Doc:
    doc: Doc = {
        "apiVersion": "devices.kubeedge.io/v1alpha2",
        "kind": "Device",
        "metadata": {"name": "a2"},
        "spec": {"deviceModelRef": {"name": "a2-model"}, "protocol": protocol,
                 "propertyVisitors": list(visitors)},
    }  # fmt: skip
    if status is not None:
        doc["status"] = status
    return doc


V1ALPHA2_MODEL: Doc = {
    "apiVersion": "devices.kubeedge.io/v1alpha2",
    "kind": "DeviceModel",
    "metadata": {"name": "a2-model"},
    "spec": {"properties": [
        {"name": "level", "type": {"float": {"accessMode": "ReadWrite", "minimum": 0,
                                              "maximum": 10.5, "unit": "m"}}},
        {"name": "pump", "type": {"boolean": {"accessMode": "ReadWrite", "defaultValue": False}}},
    ]},
}  # fmt: skip
LEVEL = {"propertyName": "level", "collectCycle": 500, "reportCycle": 2000,
         "modbus": {"register": "HoldingRegister", "offset": 4, "limit": 2, "scale": 1,
                    "isSwap": False, "isRegisterSwap": True}}  # fmt: skip


def test_v1alpha2_conversion(tmp_path: Path) -> None:
    protocol = {"modbus": {"slaveID": 12}, "common": {
        "tcp": {"ip": "10.1.1.1", "port": 5020}, "collectTimeout": 300, "collectRetryTimes": 4,
        "customizedValues": {"maxGap": 4, "maxRegistersPerRequest": 32}}}  # fmt: skip
    pump = {"propertyName": "pump",
            "modbus": {"register": "CoilRegister", "offset": 7, "limit": 1}}  # fmt: skip
    status = {"twins": [{"propertyName": "pump", "desired": {"value": "true"},
                         "reported": {"value": "false"}}]}  # fmt: skip
    (device,) = load(
        tmp_path, V1ALPHA2_MODEL, v1alpha2_device(protocol, LEVEL, pump, status=status)
    )
    assert device == DeviceSpec(
        namespace="default",
        name="a2",
        model="a2-model",
        endpoint=TcpEndpoint("10.1.1.1", 5020),
        unit_id=12,
        properties=(
            PropertySpec("level", Visitor(Table.HOLDING_REGISTER, 4, 2, RawType.FLOAT32,
                                          is_register_swap=True),
                         ValueType.FLOAT, AccessMode.READ_WRITE, 500, 2000,
                         minimum=0.0, maximum=10.5, unit="m"),
            PropertySpec("pump", Visitor(Table.COIL, 7, 1, RawType.BOOLEAN), ValueType.BOOLEAN,
                         AccessMode.READ_WRITE, desired="true"),
        ),
        options=ModbusOptions(timeout_s=0.3, retries=4, max_registers=32, max_gap=4),
        source=f"{tmp_path / 'm.yaml'}: document 2",
    )  # fmt: skip


@pytest.mark.parametrize(
    ("protocol", "visitors", "expected"),
    [
        ({"modbus": {"slaveID": 1}, "common": {"tcp": {"ip": "h"}, "com": {"serialPort": "/d"}}},
         [LEVEL], "spec.protocol.communicateMode: ambiguous: both ip (Modbus TCP) and a serial "
                  "port (Modbus RTU) are given; set communicateMode to TCP, RTU or RTUoverTCP"),
        ({"modbus": {"slaveID": 1}, "common": {"com": {"serialPort": "/d", "baudRate": 10}}},
         [LEVEL], "spec.protocol.common.com.baudRate: baudRate 10 is out of range 50..4000000"),
        ({"modbus": {"slaveID": 1}, "common": {"tcp": {"ip": "h"}, "collectTimeout": 0}},
         [LEVEL],
         "spec.protocol.common.collectTimeout: collectTimeout 0 is out of range 1..600000"),
        ({"modbus": {"slaveID": 1}, "common": {"tcp": {"ip": "h"},
                                               "customizedValues": {"timeout": 5},
                                               "collectTimeout": 9}},
         [LEVEL], "spec.protocol.common.collectTimeout: also given as customizedValues.timeout; "
                  "give only one"),
        ({"modbus": {}, "common": {"tcp": {"ip": "h"}}}, [{"propertyName": "level"}],
         "spec.propertyVisitors[0].modbus: is required: a Modbus device's visitor gives register, "
         "offset, limit, scale, isSwap, isRegisterSwap"),
        ({"modbus": {}, "common": {"tcp": {"ip": "h"}}},
         [{**LEVEL, "propertyName": "depth"}],
         "spec.propertyVisitors[0]: property 'depth' is not in DeviceModel default/a2-model; "
         "it has: level, pump"),
        ({"modbus": {}, "common": {"tcp": {"ip": "10.1.1.1:5020"}}}, [LEVEL],
         "spec.protocol.common.tcp.ip: ip '10.1.1.1:5020' holds a port, which ip does not take: "
         "put the port in port (ip: 10.1.1.1, port: 5020)"),
        ({"modbus": {}, "common": {"tcp": {"ip": "h"}, "collectTimeout": "1s"}}, [LEVEL],
         "spec.protocol.common.collectTimeout: collectTimeout must be an integer number of "
         "milliseconds, got '1s' (1000 for one second)"),
        ({"modbus": {}, "common": {"tcp": {"ip": "h"}}}, [{**LEVEL, "reportCycle": "2s"}],
         "spec.propertyVisitors[0].reportCycle: reportCycle must be an integer number of "
         "milliseconds, got '2s' (1000 for one second)"),
        ({"modbus": {}, "common": {"tcp": {"ip": "h"}}},
         [{**LEVEL, "modbus": "HoldingRegister"}],  # nothing more is said about level
         "spec.propertyVisitors[0].modbus: Input should be a valid dictionary "
         "(got 'HoldingRegister')"),
    ],
)  # fmt: skip
def test_v1alpha2_errors(tmp_path: Path, protocol: Doc, visitors: list[Doc], expected: str) -> None:
    assert one_error(tmp_path, V1ALPHA2_MODEL, v1alpha2_device(protocol, *visitors)) == expected


def test_v1alpha2_model_type_must_be_one_typed_block(tmp_path: Path) -> None:
    model = copy.deepcopy(V1ALPHA2_MODEL)
    model["spec"]["properties"][1]["type"] = {"int": {}, "float": {}}
    protocol = {"modbus": {"slaveID": 1}, "common": {"tcp": {"ip": "h"}}}
    assert errors(tmp_path, model, v1alpha2_device(protocol, LEVEL)) == [
        "spec.properties[1].type: must hold exactly one of int, float, double, string, boolean, "
        "bytes; got int, float"
    ]


def test_v1alpha2_non_modbus_device_is_skipped(tmp_path: Path) -> None:
    devices, warnings = load_warned(
        tmp_path, V1ALPHA2_MODEL, v1alpha2_device({"opcua": {"url": "opc.tcp://h"}}, LEVEL)
    )
    assert devices == ()
    assert warnings[0].startswith("spec.protocol: protocol 'opcua' is not supported")


# --- whole-gateway warnings ----------------------------------------------------------


def test_devices_on_the_same_endpoint_and_unit_id_are_warned(tmp_path: Path) -> None:
    devices, warnings = load_warned(
        tmp_path, model_doc(),
        device_doc(name="a", config={"ip": "::1", "port": 502}),
        device_doc(name="b", config={"ip": "0:0::1", "port": 502}),  # the same address
        device_doc(name="c", config={"ip": "PLC.local"}),
        device_doc(name="d", config={"ip": "plc.local", "communicateMode": "RTUoverTCP"}),
        device_doc(name="e", config={"ip": "plc.local", "slaveID": 2}),
    )  # fmt: skip
    assert len(devices) == 5
    assert [w.split(" as ")[0] for w in warnings] == [
        "spec.protocol.configData: same endpoint [::1]:502 and unit id 1",
        "spec.protocol.configData: same endpoint plc.local:502 and unit id 1",
    ]
    assert warnings[0].split(" as ")[1].startswith(f"Device default/a ({tmp_path / 'm.yaml'}: ")


def test_devices_on_one_serial_port_share_its_line_settings(tmp_path: Path) -> None:
    rtu = {"serialPort": "/dev/ttyS0", "baudRate": 19200, "parity": "Even"}
    devices = load(tmp_path, model_doc(), device_doc(name="a", config={**rtu, "slaveID": 1}),
                   device_doc(name="b", config={**rtu, "parity": "E", "slaveID": 2}))  # fmt: skip
    assert len(devices) == 2
    message = one_error(
        tmp_path, model_doc(), device_doc(name="a", config={**rtu, "slaveID": 1}),
        device_doc(name="b", config={**rtu, "baudRate": "9600", "slaveID": 2}),
    )  # fmt: skip
    assert message == (
        f"spec.protocol.configData: serial port /dev/ttyS0 is also used by Device default/a "
        f"({tmp_path / 'm.yaml'}: document 2) with other line settings: baudRate 9600 here, "
        "19200 there; devices on one bus share its settings, make them equal"
    )


def no_device_warning(tmp_path: Path, agent: str, *docs: Doc) -> str:
    if docs:
        write_docs(tmp_path / "etc" / "m.yaml", *docs)
    loaded = load_config(write_agent(tmp_path, agent))
    assert loaded.devices == ()
    (warning,) = [w for w in loaded.warnings if w.field == "devices"]
    assert (warning.file, warning.severity) == (str(tmp_path / "etc" / "edge.yaml"), "warning")
    return warning.message


def test_no_device_to_poll_says_why(tmp_path: Path) -> None:
    other_protocol = device_doc(name="opc")
    other_protocol["spec"]["protocol"]["protocolName"] = "opcua"
    assert no_device_warning(
        tmp_path, "node: gw-01\ndevices: m.yaml\n", model_doc(),
        device_doc(nodeName="gw-02"), device_doc(name="meter-2", nodeName="gw-03"),
        device_doc(name="meter-3", nodeName="gw-02"), other_protocol,
    ) == (
        "no device will be polled: 2 Device(s) skipped for spec.nodeName 'gw-02' ≠ node 'gw-01'; "
        "1 Device(s) skipped for spec.nodeName 'gw-03' ≠ node 'gw-01'; 1 Device(s) skipped for "
        "protocol 'opcua' (to poll them, set node: gw-02 or gw-03 in this file, or change the "
        "Devices' spec.nodeName to gw-01)"
    )  # fmt: skip


def test_no_device_only_models(tmp_path: Path) -> None:
    assert no_device_warning(tmp_path, "node: gw\ndevices: [m.yaml]\n", model_doc()) == (
        "no device will be polled: the 1 manifest file(s) hold no devices.kubeedge.io Device"
    )


def test_manifests_alone_do_not_warn_about_no_device(tmp_path: Path) -> None:
    devices, warnings = load_manifests([write_docs(tmp_path / "m.yaml", model_doc())])
    assert (devices, warnings) == ((), ())


@pytest.mark.parametrize("key", ["uplink.password_file", "uplink.tls.ca", "trust.keys[0]"])
def test_agent_files_must_be_regular_readable_files(tmp_path: Path, key: str) -> None:
    base = tmp_path / "etc"
    base.mkdir()
    os.mkfifo(base / "pipe")
    (base / "dir").mkdir()
    agent = {"uplink.password_file": "uplink: {password_file: NAME}",
             "uplink.tls.ca": "uplink: {tls: {ca: NAME}}",
             "trust.keys[0]": "trust: {keys: [NAME]}"}[key]  # fmt: skip
    for name, expected in [("pipe", "is not a regular file (a FIFO)"),
                           ("/dev/zero", "is not a regular file (a character device)"),
                           ("dir", "is a directory, not a file"),
                           ("../gone", "no such file")]:  # fmt: skip
        problems = agent_problems(tmp_path, f"node: gw\n{agent.replace('NAME', name)}\n")
        resolved = os.path.abspath(base / name)
        assert problems == [f"{key}: {resolved}: {expected}"]


def test_devices_must_be_regular_files_or_directories(tmp_path: Path) -> None:
    base = tmp_path / "etc"
    base.mkdir()
    os.mkfifo(base / "pipe.yaml")
    problems = agent_problems(tmp_path, "node: gw\ndevices: [/dev/zero, pipe.yaml]\n")
    assert problems == [
        "devices[0]: /dev/zero: is not a regular file or directory but a character device "
        "(/dev/zero)",
        f"devices[1]: pipe.yaml: is not a regular file or directory but a FIFO "
        f"({base / 'pipe.yaml'})",
    ]
    with pytest.raises(ConfigError) as raised:
        load_manifests(["/dev/zero", base / "pipe.yaml"])
    assert [str(p) for p in raised.value.problems] == [
        "error: /dev/zero: is not a regular file or directory (a character device)",
        f"error: {base / 'pipe.yaml'}: is not a regular file or directory (a FIFO)",
    ]


def test_a_fifo_in_a_manifest_directory_is_skipped_with_a_warning(tmp_path: Path) -> None:
    write_docs(tmp_path / "m" / "meters.yaml", model_doc(), device_doc())
    os.mkfifo(tmp_path / "m" / "pipe.yaml")
    devices, warnings = load_manifests([tmp_path / "m"])
    assert [d.name for d in devices] == ["meter-1"]
    assert [str(w) for w in warnings] == [
        f"warning: {tmp_path / 'm' / 'pipe.yaml'}: is not a regular file (a FIFO); skipped"
    ]


@pytest.mark.parametrize("special", ["/dev/zero", "pipe"])
def test_agent_file_must_be_a_regular_file(tmp_path: Path, special: str) -> None:
    os.mkfifo(tmp_path / "pipe")
    path = tmp_path / special
    with pytest.raises(ConfigError) as raised:
        load_config(path)
    kind = "a FIFO" if special == "pipe" else "a character device"
    assert [str(p) for p in raised.value.problems] == [
        f"error: {path}: is not a regular file ({kind})"
    ]


def test_a_manifest_over_16_mib_is_not_read(tmp_path: Path) -> None:
    big = write_docs(tmp_path / "big.yaml", model_doc())
    os.truncate(big, (16 << 20) + 1)
    write_docs(tmp_path / "small.yaml", model_doc())
    os.truncate(tmp_path / "small.yaml", 16 << 20)  # NUL padding: read, then not YAML
    with pytest.raises(ConfigError) as raised:
        load_manifests([big, tmp_path / "small.yaml"])
    assert [f"{p.file}: {p.message}" for p in raised.value.problems][:1] == [
        f"{big}: is larger than 16 MiB, the most edge reads from one file; split the manifests "
        "into several files"
    ]
    assert raised.value.problems[1].file == str(tmp_path / "small.yaml")


# --- names become MQTT topic levels ---------------------------------------------------


@pytest.mark.parametrize("name", ["meter-1", "m", "meter.1.a-b", "0", "a" * 253])
def test_kubernetes_object_names_are_accepted(tmp_path: Path, name: str) -> None:
    (device,) = load(tmp_path, model_doc(), device_doc(name=name))
    assert device.name == name


@pytest.mark.parametrize(
    ("metadata", "expected"),
    [
        ({"name": "a+b"}, "metadata.name: name 'a+b' is not a DNS-1123 subdomain"),
        ({"name": "Meter"}, "metadata.name: name 'Meter' is not a DNS-1123 subdomain"),
        ({"name": "-a"}, "metadata.name: name '-a' is not a DNS-1123 subdomain"),
        ({"name": "a..b"}, "metadata.name: name 'a..b' is not a DNS-1123 subdomain"),
        ({"name": "a" * 254}, f"metadata.name: name '{'a' * 254}' (254 characters) is not"),
        ({"name": "m", "namespace": "a.b"}, "metadata.namespace: namespace 'a.b' is not"),
        ({"name": "m", "namespace": "n" * 64}, "metadata.namespace: namespace 'nnnnnnnn"),
    ],
)  # fmt: skip
def test_kubernetes_object_name_errors(tmp_path: Path, metadata: Doc, expected: str) -> None:
    device = device_doc()
    device["metadata"] = metadata
    assert one_error(tmp_path, model_doc(), device).startswith(expected)


def test_a_web_user_listed_twice_is_an_error(tmp_path: Path) -> None:
    h = hash_password("pw", ln=4)
    text = yaml.safe_dump({"node": "gw", "web": {"users": [
        {"name": "admin", "password_hash": h}, {"name": "admin", "password_hash": h}]}})
    assert agent_problems(tmp_path, text) == ["web.users: user 'admin' is listed more than once"]
