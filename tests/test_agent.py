"""End to end: real pymodbus servers → `edge run` (a real process) → real mosquitto.

Register images are built here with ``struct`` (not with the agent's codec), and the
values the agent publishes must be exactly the ones the images encode.
"""

from __future__ import annotations

import signal
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from support import (
    AgentProcess,
    Broker,
    Image,
    ModbusServer,
    Subscriber,
    device_docs,
    free_port,
    start_broker,
    start_edge,
    start_pty_pair,
    write_agent_file,
)

PREFIX = "edge/v1/gw-test"


def words(fmt: str, *values: Any) -> list[int]:
    """Big-endian 16-bit words of ``struct.pack('>' + fmt, *values)``."""
    raw = struct.pack(">" + fmt, *values)
    return [int.from_bytes(raw[i : i + 2], "big") for i in range(0, len(raw), 2)]


def byte_swapped(ws: list[int]) -> list[int]:
    """Swap the two bytes inside each word (what a device with isSwap sends)."""
    return [((w & 0xFF) << 8) | (w >> 8) for w in ws]


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Broker]:
    b = start_broker(tmp_path)
    yield b
    b.stop()


@pytest.fixture
def sub(broker: Broker) -> Iterator[Subscriber]:
    s = Subscriber(broker.port, f"{PREFIX}/#")
    yield s
    s.stop()


def run_agent(tmp_path: Path, broker: Broker, docs: list[dict[str, Any]],
              **kw: Any) -> AgentProcess:
    cfg = write_agent_file(tmp_path, broker.port, docs, **kw)
    return start_edge(["run", "-c", str(cfg)], tmp_path)


def telemetry(sub: Subscriber, ns: str, name: str, count: int = 1,
              timeout: float = 15) -> list[dict[str, Any]]:
    topic = f"{PREFIX}/telemetry/{ns}/{name}"
    return [m.json() for m in sub.wait_for(lambda m: m.topic == topic, count, timeout)]


METER_IMAGE = Image(
    ir=words("f", 229.8),
    hr=[
        *words("h", -123),                              # 0: int16 × 0.1
        *reversed(words("I", 0x00012345)),              # 1-2: uint32, isRegisterSwap
        *byte_swapped(words("f", -1.5)),                # 3-4: float32, isSwap
        *words("8s", b"EDGE-01\x00"),                   # 5-8: string
        *words("q", -(2**40)),                          # 9-12: int64
        *byte_swapped(list(reversed(words("d", 1e-3)))),  # 13-16: float64, both swaps
        0b1000,                                         # 17: bit 3 set
    ],
    co=[True, False],
    di=[False, True],
)

METER_PROPS: list[dict[str, Any]] = [
    {"name": "voltage", "type": "FLOAT",
     "visitor": {"register": "InputRegister", "offset": 0, "limit": 2, "dataType": "float32"}},
    {"name": "temperature", "type": "FLOAT",
     "visitor": {"register": "HoldingRegister", "offset": 0, "limit": 1, "dataType": "int16",
                 "scale": 0.1}},
    {"name": "hours", "type": "INT",
     "visitor": {"register": "HoldingRegister", "offset": 1, "limit": 2, "dataType": "uint32",
                 "isRegisterSwap": True}},
    {"name": "flow", "type": "FLOAT",
     "visitor": {"register": "HoldingRegister", "offset": 3, "limit": 2, "dataType": "float32",
                 "isSwap": True}},
    {"name": "serial", "type": "STRING",
     "visitor": {"register": "HoldingRegister", "offset": 5, "limit": 4, "dataType": "string"}},
    {"name": "energy", "type": "INT",
     "visitor": {"register": "HoldingRegister", "offset": 9, "limit": 4, "dataType": "int64"}},
    {"name": "ratio", "type": "DOUBLE",
     "visitor": {"register": "HoldingRegister", "offset": 13, "limit": 4, "dataType": "float64",
                 "isSwap": True, "isRegisterSwap": True}},
    {"name": "alarm", "type": "BOOLEAN",
     "visitor": {"register": "HoldingRegister", "offset": 17, "dataType": "bit", "bit": 3}},
    {"name": "pump", "type": "BOOLEAN", "visitor": {"register": "CoilRegister", "offset": 0}},
    {"name": "door", "type": "BOOLEAN",
     "visitor": {"register": "DiscreteInputRegister", "offset": 1}},
]
METER_VALUES = {
    "voltage": 229.8, "temperature": -12.3, "hours": 0x12345, "flow": -1.5,
    "serial": "EDGE-01", "energy": -(2**40), "ratio": 1e-3, "alarm": True, "pump": True,
    "door": True,
}


def test_tcp_device_values_are_exact_and_units_share_a_connection(
    tmp_path: Path, broker: Broker, sub: Subscriber
) -> None:
    server = ModbusServer({1: METER_IMAGE, 2: Image(hr=words("h", 7))})
    docs = [
        *device_docs("meter", server.port, 1, METER_PROPS),
        *device_docs("pump-ctl", server.port, 2, [
            {"name": "level", "type": "INT",
             "visitor": {"register": "HoldingRegister", "offset": 0, "dataType": "int16"}}],
            namespace="plant"),
    ]
    agent = run_agent(tmp_path, broker, docs)
    try:
        readings = telemetry(sub, "default", "meter", count=3)
        assert [r["values"] for r in readings] == [METER_VALUES] * 3
        assert [r["seq"] for r in readings] == [readings[0]["seq"] + i for i in range(3)]
        assert all("quality" not in r for r in readings)
        assert readings[0]["device"] == "meter"
        assert telemetry(sub, "plant", "pump-ctl")[0]["values"] == {"level": 7}
        state = sub.wait_for(lambda m: m.topic == f"{PREFIX}/state" and
                             len(m.json().get("devices", {})) == 2)[0].json()
        assert state["state"] == "online"
        assert state["devices"] == {"default/meter": "online", "plant/pump-ctl": "online"}
    finally:
        assert agent.stop() == 0, agent.output()
        server.stop()
    last_state = sub.on(f"{PREFIX}/state")[-1].json()
    assert last_state["state"] == "offline"


def test_rtu_over_tcp(tmp_path: Path, broker: Broker, sub: Subscriber) -> None:
    server = ModbusServer({5: Image(hr=words("hH", -42, 65000))}, framing="rtu")
    docs = device_docs("rtu-gw", server.port, 5, [
        {"name": "a", "type": "INT",
         "visitor": {"register": "HoldingRegister", "offset": 0, "dataType": "int16"}},
        {"name": "b", "type": "INT",
         "visitor": {"register": "HoldingRegister", "offset": 1, "dataType": "uint16"}},
    ], mode="RTUoverTCP")
    agent = run_agent(tmp_path, broker, docs)
    try:
        assert telemetry(sub, "default", "rtu-gw")[0]["values"] == {"a": -42, "b": 65000}
    finally:
        agent.stop()
        server.stop()


def test_serial_rtu_through_a_pty_pair(tmp_path: Path, broker: Broker, sub: Subscriber) -> None:
    pty = start_pty_pair(tmp_path)
    server = ModbusServer({3: Image(hr=words("i", -70000), co=[False, True])},
                          serial_port=pty.a)
    docs = device_docs("serial-meter", 0, 3, [
        {"name": "power", "type": "INT",
         "visitor": {"register": "HoldingRegister", "offset": 0, "limit": 2,
                     "dataType": "int32"}},
        {"name": "relay", "type": "BOOLEAN", "visitor": {"register": "CoilRegister", "offset": 1}},
    ], mode="RTU")
    docs[1]["spec"]["protocol"]["configData"]["serialPort"] = pty.b
    agent = run_agent(tmp_path, broker, docs)
    try:
        got = telemetry(sub, "default", "serial-meter", count=2)
        assert [r["values"] for r in got] == [{"power": -70000, "relay": True}] * 2
    finally:
        agent.stop()
        server.stop()
        pty.stop()


def test_bad_replies_and_dead_devices_stay_local(
    tmp_path: Path, broker: Broker, sub: Subscriber
) -> None:
    """An exception reply marks only its properties bad; a dead device goes offline;
    the healthy device keeps its cycle meanwhile."""
    server = ModbusServer({1: Image(hr=words("hh", 11, 12)), 2: Image(hr=words("h", 5))})
    dead_port = free_port()  # nothing listens here
    docs = [
        *device_docs("healthy", server.port, 2, [
            {"name": "x", "type": "INT", "collectCycle": 100,
             "visitor": {"register": "HoldingRegister", "offset": 0, "dataType": "int16"}}]),
        *device_docs("partial", server.port, 1, [
            {"name": "ok", "type": "INT",
             "visitor": {"register": "HoldingRegister", "offset": 1, "dataType": "int16"}},
            {"name": "missing", "type": "INT",  # past the end: ILLEGAL DATA ADDRESS
             "visitor": {"register": "HoldingRegister", "offset": 500, "dataType": "int16"}},
        ]),
        *device_docs("dead", dead_port, 1, [
            {"name": "y", "type": "INT",
             "visitor": {"register": "HoldingRegister", "offset": 0, "dataType": "int16"}}]),
    ]
    agent = run_agent(tmp_path, broker, docs)
    try:
        partial = telemetry(sub, "default", "partial")[0]
        assert partial["values"] == {"ok": 12}
        assert partial["quality"] == {"missing": "bad"}
        offline = sub.wait_for(lambda m: m.topic == f"{PREFIX}/events"
                               and m.json().get("device") == "default/dead")[0].json()
        assert offline["type"] == "device_state"
        assert offline["state"] == "offline"
        first = telemetry(sub, "default", "healthy")[0]["seq"]
        later = telemetry(sub, "default", "healthy", count=20)[-1]
        assert later["seq"] == first + 19
        assert later["values"] == {"x": 5}
        assert not sub.on(f"{PREFIX}/telemetry/default/dead")
        assert agent.proc.poll() is None
    finally:
        agent.stop()
        server.stop()


def test_device_that_comes_back_is_polled_again_without_restart(
    tmp_path: Path, broker: Broker, sub: Subscriber
) -> None:
    port = free_port()
    server = ModbusServer({1: Image(hr=words("h", 1))}, port=port)
    docs = device_docs("flaky", port, 1, [
        {"name": "v", "type": "INT",
         "visitor": {"register": "HoldingRegister", "offset": 0, "dataType": "int16"}}])
    agent = run_agent(tmp_path, broker, docs)
    try:
        telemetry(sub, "default", "flaky")
        server.stop()

        def state_is(s: str) -> Any:
            return lambda m: (m.topic == f"{PREFIX}/events"
                              and m.json().get("device") == "default/flaky"
                              and m.json().get("state") == s)

        sub.wait_for(state_is("offline"))
        server = ModbusServer({1: Image(hr=words("h", 2))}, port=port)
        sub.wait_for(state_is("online"), count=2, timeout=40)
        got = sub.wait_for(lambda m: m.topic.endswith("/telemetry/default/flaky")
                           and m.json()["values"] == {"v": 2})
        assert got
    finally:
        agent.stop()
        server.stop()


def test_killed_agent_leaves_offline_state_via_lwt(
    tmp_path: Path, broker: Broker, sub: Subscriber
) -> None:
    agent = run_agent(tmp_path, broker, [])
    sub.wait_for(lambda m: m.topic == f"{PREFIX}/state" and m.json()["state"] == "online")
    agent.stop(signal.SIGKILL)
    will = sub.wait_for(lambda m: m.topic == f"{PREFIX}/state" and m.json()["state"] == "offline",
                        timeout=120)[0]
    assert will.json()["agent"]
    late = Subscriber(broker.port, f"{PREFIX}/state")
    try:
        retained = late.wait_for(lambda m: m.retain)[0]
        assert retained.json()["state"] == "offline"
    finally:
        late.stop()


def test_many_devices_going_offline_together_make_few_state_messages(
    tmp_path: Path, broker: Broker, sub: Subscriber
) -> None:
    docs = [doc for i in range(20) for doc in device_docs(f"dev-{i}", free_port(), 1, [
        {"name": "v", "type": "INT",
         "visitor": {"register": "HoldingRegister", "offset": 0, "dataType": "int16"}}])]
    agent = run_agent(tmp_path, broker, docs)
    try:
        events = sub.wait_for(lambda m: m.topic == f"{PREFIX}/events", count=20)
        assert {e.json()["device"] for e in events} == {f"default/dev-{i}" for i in range(20)}
        full = sub.wait_for(lambda m: m.topic == f"{PREFIX}/state"
                            and len(m.json().get("devices", {})) == 20)
        assert set(full[0].json()["devices"].values()) == {"offline"}
        assert len(sub.on(f"{PREFIX}/state")) <= 4  # not one per device
    finally:
        agent.stop()
