"""Commissioning end to end, as a user does it: ``edge simulate --profile`` stands in
for the device, ``edge discover`` writes its manifests, ``edge run`` polls it and the
values on MQTT are exactly the ones the simulated device holds (SunSpec: the image's
decoded points with their scale factors; Eastron SDM630: the float32 values of that
moment). A device whose firmware is outside every range its profile knows gets no
manifest."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from support import AgentProcess, Subscriber, edge_cli, free_port, start_broker, start_edge

from edge.config.model import TcpEndpoint
from edge.modbus.simulator import simulated_value
from edge.profiles.simulate import simulated_profile
from edge.profiles.sunspec import chain_image, expected_values

AT = 1_780_000_000.0  # the simulated devices' frozen clock (Unix seconds)
PERIOD = 60.0


def wait_listening(port: int, proc: AgentProcess, within: float = 15.0) -> None:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        assert proc.proc.poll() is None, proc.output()
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    pytest.fail(f"the simulator did not listen on {port}: {proc.output()}")


@pytest.fixture
def simulate(tmp_path: Path) -> Iterator[Any]:
    started: list[AgentProcess] = []

    def run(*args: str) -> int:
        port = free_port()
        sim = start_edge(["simulate", *args, "--listen", f"127.0.0.1:{port}", "--at", str(AT),
                          "--period", str(PERIOD)], tmp_path, name=f"sim-{port}")
        started.append(sim)
        wait_listening(port, sim)
        return port

    yield run
    for sim in started:
        sim.stop()


def discover(tmp_path: Path, port: int, name: str) -> Path:
    out = tmp_path / f"{name}.yaml"
    done = edge_cli("discover", "--tcp", f"127.0.0.1:{port}", "--name", name, "-o", str(out))
    assert done.returncode == 0, done.stderr
    return out


def telemetry(tmp_path: Path, manifests: list[Path], devices: list[str]) -> dict[str, Any]:
    """Run the agent on ``manifests``; the first reading of each device."""
    broker = start_broker(tmp_path)
    cfg = tmp_path / "edge.yaml"
    cfg.write_text(yaml.safe_dump({"node": "gw", "devices": [str(m) for m in manifests],
                                   "uplink": {"port": broker.port},
                                   "store": {"path": str(tmp_path / "edge.db")}}))
    sub = Subscriber(broker.port, "edge/v1/gw/telemetry/#")
    agent = start_edge(["run", "-c", str(cfg)], tmp_path)
    try:
        return {d: sub.wait_for(lambda m, d=d: m.topic.endswith(f"/default/{d}"),
                                timeout=30)[0].json() for d in devices}
    finally:
        agent.stop()
        sub.stop()
        broker.stop()


def test_discovered_devices_are_polled_with_the_exact_values(tmp_path: Path,
                                                             simulate: Any) -> None:
    inverter = simulate("--profile", "sunspec", "--models", "1,103,203")
    meter = simulate("--profile", "eastron-sdm630", "--firmware", "2.3")
    inverter_yaml = discover(tmp_path, inverter, "inverter")
    meter_yaml = discover(tmp_path, meter, "meter")
    model, device = yaml.safe_load_all(meter_yaml.read_text())
    config = device["spec"]["protocol"]["configData"]
    assert (config["profile"], config["firmware"]) == ("eastron-sdm630", "2.3")
    readings = telemetry(tmp_path, [inverter_yaml, meter_yaml], ["inverter", "meter"])

    chain, image = chain_image([1, 103, 203], base=40000, seed="sunspec")
    got = readings["inverter"]
    assert "quality" not in got  # every property good
    assert got["values"] == expected_values(chain, image)
    # scale factors applied (int16 × 10^sf), signs kept, strings of model 1 read
    assert isinstance(got["values"]["inverter_three_phase.PhVphA"], float)
    assert got["values"]["inverter_three_phase.VAr"] < 0
    assert got["values"]["common.Mn"] == "edge"

    sim = simulated_profile("eastron-sdm630", endpoint=TcpEndpoint("127.0.0.1", meter),
                            firmware="2.3")
    expected = {p.name: simulated_value(p, sim.device.name, AT, PERIOD)
                for p in sim.device.properties}
    assert len(model["spec"]["properties"]) == len(expected) == 89
    assert "quality" not in readings["meter"]
    assert readings["meter"]["values"] == expected
    assert 228 <= readings["meter"]["values"]["voltage_l1"] <= 234


def test_a_firmware_outside_every_range_gets_no_manifest(tmp_path: Path,
                                                         simulate: Any) -> None:
    port = simulate("--profile", "eastron-sdm630", "--firmware", "7.1")
    out = tmp_path / "meter.yaml"
    done = edge_cli("discover", "--tcp", f"127.0.0.1:{port}", "-o", str(out))
    assert done.returncode == 1
    assert "firmware 7.1" in done.stderr
    assert "outside every known range" in done.stderr
    assert not out.exists() or out.read_text() == ""
