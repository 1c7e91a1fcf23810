"""Plugins in a running agent (`edge run`, real mosquitto, real Modbus server): on the
telemetry path, contained when they fail, hot-reloaded from plugins.dir, and part of a
bundle's health window."""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from support import (
    LEVEL,
    Broker,
    Gateway,
    ModbusServer,
    Subscriber,
    device_docs,
    edge_cli,
    start_broker,
    start_edge,
    wait_event,
    write_agent_file,
)
from wasm_modules import ECHO, LOOP, REFUSES_CONFIG, constant, wasm, write_plugin

from edge.config.plugins import Manifest, sign

PREFIX = "edge/v1/gw-test"


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Broker]:
    b = start_broker(tmp_path)
    yield b
    b.stop()


@pytest.fixture
def sub(broker: Broker) -> Iterator[Subscriber]:
    s = Subscriber(broker.port, "edge/v1/#")
    yield s
    s.stop()


def two_devices(server: ModbusServer) -> list[dict[str, Any]]:
    return [*device_docs("a", server.port, 1, LEVEL), *device_docs("b", server.port, 2, LEVEL)]


def readings(sub: Subscriber, device: str, count: int, timeout: float = 15,
             prefix: str = PREFIX) -> list[dict[str, Any]]:
    topic = f"{prefix}/telemetry/default/{device}"
    start = len(sub.on(topic))
    sub.wait_for(lambda m: m.topic == topic, start + count, timeout)
    return [m.json() for m in sub.on(topic)[start:]]


def test_plugins_transform_telemetry_and_reload_from_their_directory(
        tmp_path: Path, broker: Broker, sub: Subscriber, two_units: ModbusServer) -> None:
    plugins = tmp_path / "plugins"
    write_plugin(plugins, "mute", constant("[]"), devices=["default/a"])
    agent = start_edge(["run", "-c", str(write_agent_file(tmp_path, broker.port,
                                                           two_devices(two_units)))], tmp_path)
    try:
        wait_event(sub, PREFIX, "plugin_loaded", plugin="mute", version="1.0.0")
        assert [r["values"] for r in readings(sub, "b", 3)] == [{"level": 22}] * 3
        assert sub.on(f"{PREFIX}/telemetry/default/a") == []  # muted from the first reading
        # a new version in place: swapped without a restart
        write_plugin(plugins, "mute", ECHO, version="2.0.0", devices=["default/a"])
        wait_event(sub, PREFIX, "plugin_loaded", plugin="mute", version="2.0.0")
        assert [r["values"] for r in readings(sub, "a", 2)] == [{"level": 11}] * 2
        # a broken manifest changes nothing
        manifest = plugins / "mute.yaml"
        manifest.write_text(manifest.read_text().replace("version: 2.0.0", "version: 3.0.0")
                            .replace("sha256: ", "sha256: 0"))
        refused = wait_event(sub, PREFIX, "plugin_refused")
        assert refused["problems"][0].startswith(f"error: {manifest}: sha256: ")
        assert refused["directory"] == str(plugins)
        assert len(readings(sub, "a", 2)) == 2
        manifest.unlink()  # removed: the plugin stops
        wait_event(sub, PREFIX, "plugin_removed", plugin="mute", version="2.0.0")
    finally:
        assert agent.stop() == 0, agent.output()
    out = agent.output()
    assert "plugin mute@2.0.0" in out
    assert f"the plugins in {plugins} validate again" in out


def test_a_plugin_that_hangs_is_quarantined_and_other_devices_go_on(
        tmp_path: Path, broker: Broker, sub: Subscriber, two_units: ModbusServer) -> None:
    write_plugin(tmp_path / "plugins", "hang", LOOP, devices=["default/a"],
                 limits={"timeout_ms": 20}, quarantine={"failures": 3, "window": 60})
    agent = start_edge(["run", "-c", str(write_agent_file(tmp_path, broker.port,
                                                           two_devices(two_units)))], tmp_path)
    try:
        q = wait_event(sub, PREFIX, "plugin_quarantined", plugin="hang")
        assert (q["failures"], q["on_failure"]) == (3, "pass")
        assert q["error"] == "timeout: ran longer than its 20 ms and was stopped"
        a, b = readings(sub, "a", 3), readings(sub, "b", 3)
        assert [r["values"] for r in a] == [{"level": 11}] * 3  # passed on untouched
        seqs = [r["seq"] for r in b]
        assert seqs == list(range(seqs[0], seqs[0] + 3))
    finally:
        assert agent.stop() == 0, agent.output()


def signed_entry(wat: str, key: Any, **fields: Any) -> dict[str, Any]:
    """A bundle's plugin entry for ``wat``, signed with ``key``."""
    blob = wasm(wat)
    entry = {"name": "p", "version": "1.0.0", "sha256": hashlib.sha256(blob).hexdigest(),
             "module": base64.b64encode(blob).decode(), **fields}
    return {**entry, "signature": sign(Manifest.model_validate(entry), key)}


def test_a_bundle_whose_plugin_fails_to_start_is_rolled_back(
        tmp_path: Path, broker: Broker, sub: Subscriber, two_units: ModbusServer) -> None:
    docs = two_devices(two_units)
    gw = Gateway(tmp_path, broker, docs, node="gw-plug", health_window=2)
    prefix = gw.prefix
    agent = gw.start()
    try:
        readings(sub, "a", 1, prefix=prefix)
        gw.push(1, docs, plugins=[signed_entry(ECHO, gw.key)])
        wait_event(sub, prefix, "config_committed", version=1)
        gw.push(2, docs, plugins=[signed_entry(REFUSES_CONFIG, gw.key, version="2.0.0")])
        rolled = wait_event(sub, prefix, "config_rolled_back", version=2)
        assert rolled["reason"] == ("plugin(s) failing after the change: p: refused: init "
                                    "refused its config (status 7)")
        assert rolled["to"] == 1
        unsigned = {k: v for k, v in signed_entry(ECHO, gw.key, version="3.0.0").items()
                    if k != "signature"}
        gw.push(3, docs, plugins=[unsigned])
        refused = wait_event(sub, prefix, "config_refused", version=None, reason="invalid")
        assert any("signature: is required" in p for p in refused["problems"])
    finally:
        assert agent.stop() == 0, agent.output()
    state = yaml.safe_load((tmp_path / "edge.yaml").read_text())
    assert "plugins" not in state  # nothing was written into the agent file


def test_edge_cloud_push_carries_a_plugin_to_a_gateway(
        tmp_path: Path, broker: Broker, sub: Subscriber, two_units: ModbusServer) -> None:
    docs = two_devices(two_units)
    gw = Gateway(tmp_path, broker, docs, node="gw-push", health_window=1)
    shipped = Path(__file__).resolve().parent.parent / "plugins" / "derive"
    manifest = yaml.safe_load((shipped / "manifest.yaml").read_text())
    manifest.update(wasm=str(shipped / "derive.wasm"), devices=["default/a"],
                    config={"outputs": [{"name": "double", "expr": "level * 2"}]})
    (tmp_path / "derive.yaml").write_text(yaml.safe_dump(manifest))
    (tmp_path / "cloud-manifests").mkdir()
    (tmp_path / "cloud-manifests" / "m.yaml").write_text(yaml.safe_dump_all(docs))
    agent = gw.start()
    try:
        readings(sub, "a", 1, prefix=gw.prefix)
        out = edge_cli("cloud", "push", "--node", "gw-push", "--key", str(gw.key_file),
                       "--broker", f"127.0.0.1:{broker.port}", "--version", "5",
                       "--plugin", str(tmp_path / "derive.yaml"),
                       str(tmp_path / "cloud-manifests"))
        assert out.returncode == 0, out.stderr
        assert out.stdout.strip().endswith("(2 devices, 2 models, 1 plugins, 0 policies)")
        wait_event(sub, gw.prefix, "plugin_loaded", plugin="derive")
        wait_event(sub, gw.prefix, "config_committed", version=5)
        values = readings(sub, "a", 2, prefix=gw.prefix)[-1]["values"]
        assert values == {"level": 11, "double": 22}
        assert readings(sub, "b", 1, prefix=gw.prefix)[-1]["values"] == {"level": 22}
    finally:
        assert agent.stop() == 0, agent.output()
