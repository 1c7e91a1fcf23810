"""``edge cloud rollout``: three real agents on one broker, canary first."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from conftest import StopLater
from support import (
    LEVEL,
    ModbusServer,
    Subscriber,
    device_docs,
    edge_cli,
    free_port,
    start_broker,
    start_edge,
)

from edge.sync.bundle import new_key_pair

NODES = ("gw-r1", "gw-r2", "gw-r3")
PROPS = LEVEL


@pytest.fixture
def server(two_units: ModbusServer) -> ModbusServer:
    return two_units


@pytest.fixture
def fleet(tmp_path: Path, stop_later: StopLater, server: ModbusServer) -> tuple[int, Path]:
    """Three agents polling device a, trusting one key; (broker port, private key)."""
    broker = stop_later(start_broker(tmp_path))
    private_pem, public_pem = new_key_pair()
    (tmp_path / "cloud.key").write_bytes(private_pem)
    (tmp_path / "cloud.pub").write_bytes(public_pem)
    sub = stop_later(Subscriber(broker.port, "edge/v1/+/state"))
    for node in NODES:
        home = tmp_path / node
        home.mkdir()
        (home / "manifests.yaml").write_text(
            yaml.safe_dump_all(device_docs("a", server.port, 1, PROPS)))
        (home / "edge.yaml").write_text(yaml.safe_dump({
            "node": node, "devices": ["./manifests.yaml"],
            "uplink": {"host": "127.0.0.1", "port": broker.port},
            "store": {"path": "./edge.db"}, "trust": {"keys": [str(tmp_path / "cloud.pub")]},
            "sync": {"health_window": 2}, "web": {"listen": f"127.0.0.1:{free_port()}"},
        }))
        stop_later(start_edge(["run", "-c", str(home / "edge.yaml")], home))
    for node in NODES:  # every agent is up and reports its config
        sub.wait_for(lambda m, n=node: m.topic == f"edge/v1/{n}/state"
                     and "config" in m.json())
    return broker.port, tmp_path / "cloud.key"


def rollout(port: int, key: Path, manifests: Path, version: int) -> tuple[int, str]:
    out = edge_cli("cloud", "rollout", *[a for n in NODES for a in ("--node", n)],
                   "--canary", "1", "--key", str(key), "--broker", f"127.0.0.1:{port}",
                   "--version", str(version), "--timeout", "20", str(manifests), timeout=120)
    return out.returncode, out.stdout + out.stderr


def applied(port: int) -> dict[str, int]:
    out = edge_cli("cloud", "status", "--broker", f"127.0.0.1:{port}", "--json")
    return {(s := json.loads(line))["node"]: s["config"]["applied"]
            for line in out.stdout.splitlines()}


def test_a_good_bundle_goes_to_every_node_in_stages(
    tmp_path: Path, fleet: tuple[int, Path], server: ModbusServer
) -> None:
    port, key = fleet
    good = tmp_path / "good.yaml"
    good.write_text(yaml.safe_dump_all(device_docs("a", server.port, 1, PROPS)
                                       + device_docs("b", server.port, 2, PROPS)))
    rc, text = rollout(port, key, good, 5)
    assert rc == 0, text
    assert text.index("stage 1 (canary): gw-r1") < text.index("stage 2: gw-r2")
    assert "stage 3: committed" in text
    assert applied(port) == dict.fromkeys(NODES, 5)


def test_a_canary_that_rolls_back_stops_the_rollout(
    tmp_path: Path, fleet: tuple[int, Path], server: ModbusServer
) -> None:
    port, key = fleet
    broken = tmp_path / "broken.yaml"  # device b at an address where nothing answers
    broken.write_text(yaml.safe_dump_all(device_docs("a", server.port, 1, PROPS)
                                         + device_docs("b", free_port(), 2, PROPS)))
    rc, text = rollout(port, key, broken, 6)
    assert rc == 1
    assert "gw-r1: version 6 rolled back: device(s) default/b not online" in text
    assert "rollout stopped, 2 node(s) not given it" in text
    assert "gw-r2" not in text.split("rollout stopped")[0]
    assert applied(port) == dict.fromkeys(NODES, 0)
    # the other two never got it: nothing retained on their desired topics
    sub = Subscriber(port, "edge/v1/+/desired")
    try:
        got = sub.wait_for(lambda m: m.retain, count=1, timeout=3)
        assert [m.topic for m in got] == ["edge/v1/gw-r1/desired"]
        assert not any(m.topic != "edge/v1/gw-r1/desired" for m in sub.messages)
    finally:
        sub.stop()


def test_a_later_stage_failing_rolls_the_earlier_nodes_back(
    tmp_path: Path, fleet: tuple[int, Path], server: ModbusServer
) -> None:
    port, key = fleet
    only_r2 = device_docs("c", free_port(), 3, PROPS)  # dead, and bound to gw-r2 only
    only_r2[1]["spec"]["nodeName"] = "gw-r2"
    bundle = tmp_path / "bundle.yaml"
    bundle.write_text(yaml.safe_dump_all(device_docs("a", server.port, 1, PROPS) + only_r2))
    rc, text = rollout(port, key, bundle, 7)
    assert rc == 1
    assert "stage 1: committed" in text
    assert "gw-r2: version 7 rolled back" in text
    assert "rollout stopped, 1 node(s) not given it" in text
    assert "gw-r1: rolled back (back on version 0)" in text
    assert applied(port) == dict.fromkeys(NODES, 0)
