"""Writes in a running agent: the manifests' desired values, and signed ``cmd/write``
and ``cmd/method`` with correlated replies.

Real parts: mosquitto, a pymodbus server (its registers read back by pymodbus's own
client), the agent as a process, commands signed and sent by ``edge cloud``.
"""

from __future__ import annotations

import json
import struct
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from conftest import StopLater
from support import (
    Gateway,
    Image,
    ModbusServer,
    Subscriber,
    device_docs,
    edge_cli,
    events,
    free_port,
    start_broker,
    start_faultproxy,
    wait_event,
)

from edge.sync.bundle import new_key_pair, signed_command

NODE = "gw-write"
PREFIX = f"edge/v1/{NODE}"
PROPS = [
    {"name": "setpoint", "type": "INT", "accessMode": "ReadWrite", "minimum": -100,
     "maximum": 100, "visitor": {"register": "HoldingRegister", "offset": 0,
                                 "dataType": "int16"}},
    {"name": "flow", "type": "FLOAT", "accessMode": "ReadWrite",
     "visitor": {"register": "HoldingRegister", "offset": 2, "limit": 2,
                 "dataType": "float32", "scale": 0.1, "isRegisterSwap": True}},
    {"name": "enable", "type": "BOOLEAN", "accessMode": "ReadWrite",
     "visitor": {"register": "CoilRegister", "offset": 0, "limit": 1}},
    {"name": "voltage", "type": "INT",
     "visitor": {"register": "HoldingRegister", "offset": 5, "dataType": "int16"}},
]
DESIRED = {"setpoint": "-40", "flow": "12.5", "enable": "true", "voltage": "230"}


def pump_docs(port: int, desired: dict[str, str]) -> list[dict[str, Any]]:
    """The pump: four properties (the last ReadOnly), ``desired`` values, method start."""
    docs = device_docs("pump", port, 1, PROPS)
    for entry in docs[1]["spec"]["properties"]:
        if entry["name"] in desired:
            entry["desired"] = {"value": desired[entry["name"]]}
    docs[1]["spec"]["methods"] = [{"name": "start", "propertyNames": ["setpoint", "enable"]}]
    return docs


def swapped_float(value: float) -> list[int]:
    """float32 words of ``value`` with the two registers swapped (isRegisterSwap)."""
    high, low = struct.unpack(">2H", struct.pack(">f", value))
    return [low, high]


def twin(sub: Subscriber) -> dict[str, Any]:
    return dict(sub.on(f"{PREFIX}/twins/default/pump")[-1].json())


def written(sub: Subscriber) -> list[tuple[str, str]]:
    return [(e["origin"], e["property"]) for e in events(sub, PREFIX, "written")]


def pump_gateway(tmp_path: Path, stop_later: StopLater) -> tuple[Any, Any, Gateway, Any, Any]:
    """The pump (no desired values) on a pymodbus server, its gateway running and
    publishing: ``(server, broker, gateway, subscriber on PREFIX/#, agent)``."""
    server = stop_later(ModbusServer({1: Image(co=[False], hr=[0] * 8)}))
    broker = stop_later(start_broker(tmp_path))
    gw = Gateway(tmp_path, broker, pump_docs(server.port, {}), node=NODE)
    sub = stop_later(Subscriber(broker.port, f"{PREFIX}/#"))
    agent = stop_later(gw.start())
    sub.wait_for(lambda m: m.topic == f"{PREFIX}/telemetry/default/pump")
    return server, broker, gw, sub, agent


def test_desired_values_are_written_once_read_back_and_reported(
    tmp_path: Path, stop_later: StopLater
) -> None:
    server = stop_later(ModbusServer({1: Image(co=[False], hr=[0] * 8)}))
    broker = stop_later(start_broker(tmp_path))
    gw = Gateway(tmp_path, broker, pump_docs(server.port, DESIRED), node=NODE)
    sub = stop_later(Subscriber(broker.port, f"{PREFIX}/#"))
    agent = stop_later(gw.start())

    refused = wait_event(sub, PREFIX, "write_failed", property="voltage")
    assert (refused["origin"], refused["kind"], refused["stage"]) == ("desired", "read_only",
                                                                     "check")
    for prop in ("setpoint", "flow", "enable"):
        wait_event(sub, PREFIX, "written", property=prop)
    # the exact inverse of decoding: int16 two's complement, unscaled float32 words
    # swapped, a coil
    assert server.holding(1, 0, 6) == [0x10000 - 40, 0, *swapped_float(125.0), 0, 0]
    assert server.coils(1, 0) == [True]
    sub.wait_for(lambda m: m.topic == f"{PREFIX}/twins/default/pump"
                 and len([p for p in m.json().values() if "observedDesired" in p]) == 3)
    observed = {p: v["observedDesired"]["value"] for p, v in twin(sub).items()
                if "observedDesired" in v}
    assert observed == {"setpoint": -40, "flow": 12.5, "enable": True}

    # an operator changes the setpoint at the device; a restart does not overwrite it
    assert agent.stop() == 0
    server.set_holding(1, 0, [7])
    before = len(written(sub))
    agent = stop_later(gw.start())
    sub.wait_for(lambda m: m.topic == f"{PREFIX}/twins/default/pump"
                 and m.json()["setpoint"]["reported"]["value"] == 7, timeout=10)
    assert twin(sub)["setpoint"]["observedDesired"] == {"value": -40}  # remembered
    time.sleep(1)
    assert len(written(sub)) == before
    assert server.holding(1, 0) == [7]
    # the ReadOnly refusal was reported once, not again at the restart
    assert len([e for e in events(sub, PREFIX, "write_failed")
                if e["property"] == "voltage"]) == 1

    # a bundle that changes one desired value writes that one alone
    gw.push(1, pump_docs(server.port, {**DESIRED, "setpoint": "-41"}))
    done = wait_event(sub, PREFIX, "written", property="setpoint", value=-41)
    assert (done["origin"], done["read_back"]) == ("desired", -41)
    wait_event(sub, PREFIX, "config_committed", version=1)
    assert server.holding(1, 0) == [0x10000 - 41]
    assert written(sub)[before:] == [("desired", "setpoint")]
    assert "Traceback" not in agent.output()


def test_cmd_write_and_method_are_signed_checked_and_answered(
    tmp_path: Path, stop_later: StopLater
) -> None:
    server, broker, gw, sub, agent = pump_gateway(tmp_path, stop_later)
    where = ["--node", NODE, "--broker", f"127.0.0.1:{broker.port}", "--timeout", "15"]

    def cloud(*args: str, key: Path = gw.key_file) -> Any:
        return edge_cli("cloud", args[0], *where, "--key", str(key), *args[1:])

    done = cloud("write", "default/pump", "setpoint", "-12")
    assert done.returncode == 0, done.stderr
    assert f"{NODE}: default/pump setpoint = -12 (read back)" in done.stdout
    assert server.holding(1, 0) == [0x10000 - 12]
    event = wait_event(sub, PREFIX, "written", origin="cmd/write")
    assert (event["property"], event["value"], event["read_back"]) == ("setpoint", -12, -12)
    assert event["id"]

    refusals = [
        (("default/pump", "setpoint", "500"), "(out_of_range)", "allowed -100..100"),
        (("default/pump", "voltage", "1"), "(read_only)", "accessMode is ReadOnly"),
        (("default/pump", "speed", "1"), "(unknown_property)", "it has: setpoint, flow"),
        (("default/fan", "setpoint", "1"), "(unknown_device)", "it has: default/pump"),
        (("default/pump", "flow", '"fast"'), "(bad_value)", "takes a number, not str"),
    ]
    for args, kind, words in refusals:
        failed = cloud("write", *args)
        assert failed.returncode == 1
        assert kind in failed.stderr, failed.stderr
        assert words in failed.stderr, failed.stderr
    assert server.holding(1, 0, 6) == [0x10000 - 12, 0, 0, 0, 0, 0]  # nothing written

    called = cloud("call", "default/pump", "start", "enable=true", "setpoint=5")
    assert called.returncode == 0, called.stderr
    lines = called.stdout.splitlines()
    assert lines == [f"{NODE}: default/pump setpoint = 5 (read back)",
                     f"{NODE}: default/pump enable = true (read back)"]  # the method's order
    assert (server.holding(1, 0), server.coils(1, 0)) == ([5], [True])
    outside = cloud("call", "default/pump", "start", "flow=1")
    assert outside.returncode == 1
    assert "'flow' not in its properties" in outside.stderr

    # a key the gateway does not trust, and a command that is not signed: refused
    stranger = tmp_path / "stranger.key"
    stranger.write_bytes(new_key_pair()[0])
    forged = cloud("write", "default/pump", "setpoint", "9", key=stranger)
    assert forged.returncode == 1
    assert "does not trust" in forged.stderr
    unsigned = json.dumps({"command": "write", "id": "x1", "node": NODE,
                           "device": "default/pump", "property": "setpoint", "value": 9})
    sub.publish(f"{PREFIX}/cmd/write", unsigned.encode())
    reply = sub.wait_for(lambda m: m.topic == f"{PREFIX}/cmd/write/reply"
                         and m.json()["id"] == "x1")[0].json()
    assert (reply["ok"], reply["kind"], reply["reason"]) == (False, "refused", "unsigned")
    assert "the command is plain JSON" in reply["error"]
    # what any client of the broker can send changes neither the state nor the events
    assert not events(sub, PREFIX, "config_refused")
    assert sub.on(f"{PREFIX}/state")[-1].json()["config"]["last_error"] == ""
    assert server.holding(1, 0) == [5]
    assert "Traceback" not in agent.output()


def test_a_new_desired_value_for_an_offline_device_is_committed_and_written_when_it_answers(
    tmp_path: Path, stop_later: StopLater
) -> None:
    port = free_port()  # nothing listens yet: the pump is offline
    broker = stop_later(start_broker(tmp_path))
    gw = Gateway(tmp_path, broker, pump_docs(port, {}), node=NODE)
    sub = stop_later(Subscriber(broker.port, f"{PREFIX}/#"))
    stop_later(gw.start())
    wait_event(sub, PREFIX, "device_state", state="offline")
    gw.push(1, pump_docs(port, {"setpoint": "33"}))
    # a desired value alone changes no poller, and the device need not answer for it
    applied = wait_event(sub, PREFIX, "config_applied", version=1)
    assert applied["changed"] == []
    failed = wait_event(sub, PREFIX, "write_failed", property="setpoint")
    assert failed["kind"] in ("connection", "timeout")
    wait_event(sub, PREFIX, "config_committed", version=1)
    server = stop_later(ModbusServer({1: Image(co=[False], hr=[0] * 8)}, port=port))
    done = wait_event(sub, PREFIX, "written", property="setpoint", timeout=30)
    assert done["read_back"] == 33
    assert server.holding(1, 0) == [33]


def test_commands_are_answered_during_a_health_window_and_never_carried_out_twice(
    tmp_path: Path, stop_later: StopLater
) -> None:
    server, broker, gw, sub, agent = pump_gateway(tmp_path, stop_later)
    where = ["--node", NODE, "--broker", f"127.0.0.1:{broker.port}", "--key",
             str(gw.key_file), "--timeout", "10"]

    gw.push(1, pump_docs(server.port, {}), agent={"sync": {"health_window": 60}})
    wait_event(sub, PREFIX, "config_applied", version=1)
    done = edge_cli("cloud", "write", *where, "default/pump", "setpoint", "21")
    assert done.returncode == 0, done.stderr  # not held up by the 60 s window
    assert server.holding(1, 0) == [21]
    busy = edge_cli("cloud", "rollback", *where)
    assert busy.returncode == 1
    assert "version 1 is in its health window" in busy.stderr

    # the same signed command again, also after a restart: refused, nothing written
    cid, token = signed_command(gw.key, "write", node=NODE, now=datetime.now(UTC),
                                device="default/pump", property="setpoint", value=22)
    sub.publish(f"{PREFIX}/cmd/write", token)
    first = sub.wait_for(lambda m: m.topic == f"{PREFIX}/cmd/write/reply"
                         and m.json()["id"] == cid)[0].json()
    assert first["ok"] is True
    assert agent.stop() == 0
    server.set_holding(1, 0, [5])
    agent = stop_later(gw.start())
    def replies() -> list[Any]:
        return [m.json() for m in sub.on(f"{PREFIX}/cmd/write/reply") if m.json()["id"] == cid]

    deadline = time.monotonic() + 20
    while len(replies()) < 2 and time.monotonic() < deadline:  # until it has subscribed
        sub.publish(f"{PREFIX}/cmd/write", token)
        time.sleep(0.5)
    again = replies()[1]
    assert (again["ok"], again["kind"], again["reason"]) == (False, "refused", "replayed")
    assert server.holding(1, 0) == [5]
    assert "Traceback" not in agent.output()


def test_a_rollback_after_an_unconfirmed_write_writes_the_old_value_back(
    tmp_path: Path, stop_later: StopLater
) -> None:
    server = stop_later(ModbusServer({1: Image(co=[False], hr=[0] * 8)}))
    proxy = stop_later(start_faultproxy(server.port))
    broker = stop_later(start_broker(tmp_path))
    gw = Gateway(tmp_path, broker, pump_docs(server.port, {"setpoint": "-40"}), node=NODE,
                 health_window=8)
    sub = stop_later(Subscriber(broker.port, f"{PREFIX}/#"))
    stop_later(gw.start())
    wait_event(sub, PREFIX, "written", property="setpoint", value=-40)

    # v1 reaches the pump through a proxy that passes requests and drops the answers:
    # its write reaches the device, its answer does not, so what the device holds is
    # unknown. (The pump is online until v1 is applied: it is v1 that takes it away.)
    proxy.control('{"mode": "drop"}')
    gw.push(1, pump_docs(proxy.port, {"setpoint": "-41"}))
    failed = wait_event(sub, PREFIX, "write_failed", property="setpoint")
    assert (failed["kind"], failed["stage"]) == ("timeout", "write")
    assert server.holding(1, 0) == [0x10000 - 41]
    sub.wait_for(lambda m: m.topic == f"{PREFIX}/twins/default/pump"
                 and "observedDesired" not in m.json().get("setpoint", {}))
    # the device stopped answering: v1 is rolled back, and v0's value is written again
    wait_event(sub, PREFIX, "config_rolled_back", version=1, timeout=30)
    sub.wait_for(lambda m: m.topic == f"{PREFIX}/events" and m.json()["type"] == "written"
                 and m.json()["value"] == -40, count=2, timeout=30)
    assert server.holding(1, 0) == [0x10000 - 40]
