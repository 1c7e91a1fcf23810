"""`edge simulate`: serves what the manifests describe, with values that change over time.

The example manifests (the demo's) are served with their endpoints moved to free
ports and read back with the agent's own client, planner and codec.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import re
import shutil
import urllib.request
from pathlib import Path

import pytest
from conftest import StopLater
from support import (
    REPO,
    Subscriber,
    edge_cli,
    free_port,
    start_broker,
    start_edge,
    wait_port,
)

from edge.config.load import load_config, load_manifests
from edge.config.model import (
    DeviceSpec,
    PropertySpec,
    RawType,
    Table,
    TcpEndpoint,
    ValueType,
    Visitor,
)
from edge.modbus.client import ConnectionPool
from edge.modbus.codec import decoder_for
from edge.modbus.planner import plan_device
from edge.modbus.simulator import run_simulator, simulated_value, value_range
from edge.modbus.writer import desired_value

EXAMPLES = REPO / "examples"


def moved(devices: tuple[DeviceSpec, ...]) -> tuple[DeviceSpec, ...]:
    """The devices with every TCP endpoint moved to a free port (same port, same new one)."""
    ports: dict[int, int] = {}
    out = []
    for d in devices:
        assert isinstance(d.endpoint, TcpEndpoint)
        port = ports.setdefault(d.endpoint.port, free_port())
        out.append(dataclasses.replace(d, endpoint=dataclasses.replace(d.endpoint, port=port)))
    return tuple(out)


async def read_all(devices: tuple[DeviceSpec, ...]) -> dict[str, dict[str, object]]:
    pool = ConnectionPool()
    got: dict[str, dict[str, object]] = {}
    try:
        for d in devices:
            conn = pool.get(d.endpoint)
            values: dict[str, object] = {}
            for requests in plan_device(d).values():
                for r in requests:
                    data = await conn.read(d.unit_id, r.table, r.address, r.count, timeout=2)
                    for p in r.properties:
                        values[p.name] = decoder_for(p.visitor)(data, p.visitor.offset - r.address)
            got[d.key] = values
    finally:
        await pool.close()
    return got


def held(p: PropertySpec) -> object:
    """What the simulator serves for a property with a desired value: that value, read
    back as the agent decodes it (a coil of the demo's INT property reads as 1)."""
    value = desired_value(p)
    return int(value) if p.visitor.table is Table.COIL and p.value_type is ValueType.INT \
        else value


@pytest.mark.parametrize("t", [1_700_000_000.0, 1_700_000_017.5])
async def test_simulator_serves_exactly_the_simulated_values(t: float) -> None:
    devices = moved(load_config(EXAMPLES / "edge.yaml").devices)
    stop = asyncio.Event()
    server = asyncio.create_task(run_simulator(devices, stop, period_s=60, clock=lambda: t))
    try:
        for port in {d.endpoint.port for d in devices if isinstance(d.endpoint, TcpEndpoint)}:
            await asyncio.to_thread(wait_port, port)
        got = await read_all(devices)
    finally:
        stop.set()
        await server
    expected = {
        d.key: {p.name: held(p) if p.desired is not None else simulated_value(p, d.name, t, 60)
                for p in d.properties} for d in devices
    }
    assert got == expected
    # the demo's desired values are held from the start (boiler setpoint, the sensor's switch)
    assert got["plant/boiler-1"]["setpoint"] == 55.0
    assert got["default/temperature-1"]["temperature-switch"] == 1


def test_simulated_values_change_over_time_and_stay_in_range() -> None:
    devices, _ = load_manifests([EXAMPLES / "manifests"])
    for d in devices:
        for p in d.properties:
            series = [simulated_value(p, d.name, 1_700_000_000 + 10 * i, 60) for i in range(12)]
            assert len(set(series)) > 1, f"{d.key} {p.name} never changes"
            if p.visitor.raw_type in (RawType.FLOAT32, RawType.INT16, RawType.UINT32):
                lo, hi = value_range(p)
                assert all(lo - 1 <= float(v) <= hi for v in series), (d.key, p.name, series)


def test_demo_configuration_end_to_end(tmp_path: Path, stop_later: StopLater) -> None:
    """The demo's files, ports moved: `edge simulate` + `edge run` publish every device,
    and both stop cleanly (exit status 0)."""
    broker = stop_later(start_broker(tmp_path))
    # not the demo's own state (examples/run): a bundle pushed there would run here
    shutil.copytree(EXAMPLES, tmp_path / "examples", ignore=shutil.ignore_patterns("run"))
    shutil.copytree(EXAMPLES.parent / "plugins", tmp_path / "plugins")  # the demo's plugin's
    work = tmp_path / "examples"
    ports = {5020: free_port(), 5021: free_port(), 5022: free_port()}
    for f in (work / "manifests").glob("*.yaml"):
        text = f.read_text()
        for old, new in ports.items():
            text = re.sub(rf"\bport: \"?{old}\"?", f"port: {new}", text)
        f.write_text(text)
    cfg = work / "edge.yaml"
    web = free_port()
    cfg.write_text(cfg.read_text().replace("port: 1883", f"port: {broker.port}")
                   .replace("127.0.0.1:8080", f"127.0.0.1:{web}"))
    check = edge_cli("check", "-c", str(cfg))
    assert check.returncode == 0, check.stderr
    assert "4 device(s)" in check.stdout
    sim = stop_later(start_edge(["simulate", "-c", str(cfg)], work, name="simulate"))
    for port in ports.values():
        wait_port(port)
    sub = stop_later(Subscriber(broker.port, "edge/v1/demo-gw/#"))
    agent = stop_later(start_edge(["run", "-c", str(cfg)], work))
    for dev in ("default/meter-1", "plant/boiler-1", "default/temperature-1",
                "default/inverter-1"):
        topic = f"edge/v1/demo-gw/telemetry/{dev}"
        reading = sub.wait_for(lambda m, t=topic: m.topic == t)[0].json()
        assert reading["values"], reading
        assert "quality" not in reading, reading
    meter = sub.wait_for(lambda m: m.topic.endswith("/telemetry/default/meter-1")
                         and "voltage-l1" in m.json()["values"])[0].json()["values"]
    assert 220 <= meter["voltage-l1"] <= 240
    assert 49.8 <= meter["frequency"] <= 50.2
    # the SunSpec inverter is served as its profile says: the chain image, scale
    # factors and all (edge.profiles.sunspec.chain_image)
    inverter = sub.wait_for(lambda m: m.topic.endswith("/telemetry/default/inverter-1")
                            )[0].json()["values"]
    assert (inverter["common.Mn"], inverter["inverter_three_phase.PhVphA"]) == ("edge", 229.7)
    # the demo's plugin (examples/plugins/10-power.yaml, the shipped derive)
    assert meter["apparent-power-l1"] == meter["voltage-l1"] * meter["current-l1"]
    # and `edge run` serves the status page, its API and the health endpoints
    wait_port(web)
    with urllib.request.urlopen(f"http://127.0.0.1:{web}/api/v1/overview", timeout=5) as r:
        assert json.load(r)["devices"]["total"] == 4
    with urllib.request.urlopen(f"http://127.0.0.1:{web}/", timeout=5) as r:
        assert b"/static/app.js" in r.read()
    assert agent.stop() == 0, agent.output()
    assert sim.stop() == 0, sim.output()


def _prop(name: str, table: Table, offset: int, limit: int, raw: RawType,
          bit: int | None = None) -> PropertySpec:
    return PropertySpec(name, Visitor(table, offset, limit, raw, bit=bit), ValueType.INT)


BITS_DEVICE = DeviceSpec(
    namespace="default", name="bits", model="m", endpoint=TcpEndpoint("127.0.0.1", 0),
    unit_id=9,
    properties=(
        _prop("c0", Table.COIL, 0, 1, RawType.BOOLEAN),
        _prop("c3", Table.COIL, 3, 1, RawType.BOOLEAN),
        _prop("c17", Table.COIL, 17, 1, RawType.BOOLEAN),
        _prop("c40", Table.COIL, 40, 1, RawType.BOOLEAN),
        _prop("di_packed", Table.DISCRETE_INPUT, 5, 20, RawType.UINT32),
        _prop("b2", Table.HOLDING_REGISTER, 0, 1, RawType.BIT, bit=2),
        _prop("b9", Table.HOLDING_REGISTER, 0, 1, RawType.BIT, bit=9),
    ),
)


@pytest.mark.parametrize("max_gap", [0, 16, 100])
@pytest.mark.parametrize("t", [1_700_000_000.0, 1_700_000_031.0])
async def test_simulated_bits_read_back_exactly_for_any_request_shape(
    max_gap: int, t: float
) -> None:
    port = free_port()
    device = dataclasses.replace(
        BITS_DEVICE, endpoint=TcpEndpoint("127.0.0.1", port),
        options=dataclasses.replace(BITS_DEVICE.options, max_gap=max_gap),
    )
    stop = asyncio.Event()
    server = asyncio.create_task(run_simulator([device], stop, period_s=60, clock=lambda: t))
    try:
        await asyncio.to_thread(wait_port, port)
        got = await read_all((device,))
    finally:
        stop.set()
        await server
    assert got[device.key] == {p.name: simulated_value(p, "bits", t, 60)
                               for p in device.properties}


async def test_written_values_stick() -> None:
    port = free_port()
    device = dataclasses.replace(BITS_DEVICE, endpoint=TcpEndpoint("127.0.0.1", port))
    stop = asyncio.Event()
    server = asyncio.create_task(run_simulator([device], stop, period_s=60))
    pool = ConnectionPool()
    try:
        await asyncio.to_thread(wait_port, port)
        conn = pool.get(device.endpoint)
        await conn.write_coils(9, 17, [True], timeout=2)
        await conn.write_coils(9, 40, [False], timeout=2)
        for _ in range(3):
            assert await conn.read(9, Table.COIL, 17, 24, timeout=2) == [True] + [False] * 22 + [
                False]
    finally:
        await pool.close()
        stop.set()
        await server


async def test_a_written_register_stops_being_animated_and_a_desired_value_is_held() -> None:
    """The demo's boiler: its setpoint (desired 55) is 55 from the start, whatever the
    time, as a device set to it before (the agent does not write it again after its own
    restart); a write changes it for good; a register written alone inside a 32-bit
    property (run-hours) keeps its value too."""
    boiler = next(d for d in load_config(EXAMPLES / "edge.yaml").devices
                  if d.key == "plant/boiler-1")
    port = free_port()
    boiler = dataclasses.replace(boiler, endpoint=TcpEndpoint("127.0.0.1", port))
    now = [1_700_000_000.0]
    stop = asyncio.Event()
    server = asyncio.create_task(run_simulator([boiler], stop, period_s=60,
                                               clock=lambda: now[0]))
    pool = ConnectionPool()
    try:
        await asyncio.to_thread(wait_port, port)
        conn = pool.get(boiler.endpoint)
        seen = set()
        for _ in range(6):  # across a period: flow-temperature sweeps, setpoint does not
            regs = await conn.read(2, Table.HOLDING_REGISTER, 0, 4, timeout=2)
            seen.add(regs[0])
            assert regs[1] == 550
            now[0] += 10
        assert len(seen) > 1
        await conn.write_registers(2, 1, [612], timeout=2)
        await conn.write_registers(2, 3, [1234], timeout=2)  # one register of run-hours
        for _ in range(6):
            regs = await conn.read(2, Table.HOLDING_REGISTER, 0, 4, timeout=2)
            assert (regs[1], regs[3]) == (612, 1234)
            assert await conn.read(2, Table.HOLDING_REGISTER, 1, 1, timeout=2) == [612]
            now[0] += 10
    finally:
        await pool.close()
        stop.set()
        await server
