"""Desired bundles in a running agent: hot apply, health window, commit, rollback, refusal.

Real parts: mosquitto, a pymodbus server, the agent as a process (``python -m edge
run``), bundles signed and published as the cloud CLI does.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any

import pytest
import support
from conftest import StopLater
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from support import (
    LEVEL,
    Broker,
    Gateway,
    Image,
    ModbusServer,
    Subscriber,
    device_docs,
    edge_cli,
    free_port,
    start_broker,
)

from edge.sync.bundle import new_key_pair

NODE = "gw-sync"
PREFIX = f"edge/v1/{NODE}"
PROPS = LEVEL


@pytest.fixture
def server(two_units: ModbusServer) -> ModbusServer:
    return two_units


def events(sub: Subscriber, kind: str) -> list[dict[str, Any]]:
    return support.events(sub, PREFIX, kind)


def wait_event(sub: Subscriber, kind: str, timeout: float = 20, **fields: Any) -> dict[str, Any]:
    return support.wait_event(sub, PREFIX, kind, timeout, **fields)


def state(sub: Subscriber) -> dict[str, Any]:
    return dict(sub.on(f"{PREFIX}/state")[-1].json())


def seqs(sub: Subscriber, device: str) -> list[int]:
    return [m.json()["seq"] for m in sub.on(f"{PREFIX}/telemetry/default/{device}")]


def test_bundles_apply_hot_commit_roll_back_and_survive_a_restart(
    tmp_path: Path, stop_later: StopLater, server: ModbusServer
) -> None:
    broker = stop_later(start_broker(tmp_path))
    gw = Gateway(tmp_path, broker, device_docs("a", server.port, 1, PROPS), node=NODE)
    sub = stop_later(Subscriber(broker.port, f"{PREFIX}/#"))
    agent = stop_later(gw.start())
    sub.wait_for(lambda m: m.topic.endswith("/telemetry/default/a"), count=3)

    # v1 adds device b; a is unchanged and keeps polling without a gap
    a, b = device_docs("a", server.port, 1, PROPS), device_docs("b", server.port, 2, PROPS)
    gw.push(1, a + b)
    applied = wait_event(sub, "config_applied", version=1)
    assert (applied["added"], applied["changed"], applied["removed"]) == (["default/b"], [], [])
    wait_event(sub, "config_committed", version=1)
    assert state(sub)["config"] == {"applied": 1, "pending": None, "last_error": ""}
    assert sub.on(f"{PREFIX}/telemetry/default/b")[0].json()["values"] == {"level": 22}
    got = seqs(sub, "a")
    assert got == list(range(1, len(got) + 1))  # a was never restarted: no gap, no reset

    # v2 moves b to a port where nothing listens: b goes offline, v2 is rolled back
    dead = device_docs("b", free_port(), 2, PROPS)
    gw.push(2, a + dead)
    wait_event(sub, "config_applied", version=2)
    rolled = wait_event(sub, "config_rolled_back", version=2)
    assert "default/b" in rolled["reason"]
    assert rolled["to"] == 1
    assert state(sub)["config"]["applied"] == 1
    assert "version 2 rolled back" in state(sub)["config"]["last_error"]
    n_b = len(seqs(sub, "b"))
    sub.wait_for(lambda m: m.topic.endswith("/telemetry/default/b"), count=n_b + 3)  # b is back

    # the same version again (signed anew) is refused: it was rolled back
    gw.push(2, a + dead)
    refused = wait_event(sub, "config_refused", version=2)
    assert refused["reason"] == "rolled_back"
    # unsigned, wrongly signed and older bundles are refused; v1 keeps running
    gw.push(3, a, raw=json.dumps({"version": 3}).encode())
    assert wait_event(sub, "config_refused", reason="unsigned")["error"]
    gw.push(3, a, key=Ed25519PrivateKey.generate())
    forged = wait_event(sub, "config_refused", reason="unknown_key")
    assert (forged["version"], forged["claimed_version"]) == (None, 3)
    gw.push(1, a)
    assert wait_event(sub, "config_refused", reason="replayed")["version"] == 1
    assert events(sub, "config_applied")[-1]["version"] == 2
    assert state(sub)["config"]["applied"] == 1

    # every bundle was verified in the forked child: no crypto in the agent's memory
    maps = Path(f"/proc/{agent.proc.pid}/maps").read_text()
    assert "cryptography" not in maps
    assert "pydantic_core" not in maps
    # a restart runs the committed version 1 (from the history), with device b
    assert agent.stop() == 0
    n_b = len(seqs(sub, "b"))
    agent = stop_later(gw.start())
    sub.wait_for(lambda m: m.topic.endswith("/telemetry/default/b"), count=n_b + 3)
    assert "Traceback" not in agent.output()


def test_a_hot_apply_that_adds_a_device_leaves_ten_polling_devices_without_a_gap(
    tmp_path: Path, stop_later: StopLater
) -> None:
    server = stop_later(ModbusServer({u: Image(hr=[u]) for u in range(1, 12)}))
    fast = [{**LEVEL[0], "collectCycle": 100}]
    ten = [d for u in range(1, 11) for d in device_docs(f"d{u}", server.port, u, fast)]
    broker = stop_later(start_broker(tmp_path))
    gw = Gateway(tmp_path, broker, ten, node=NODE)
    sub = stop_later(Subscriber(broker.port, f"{PREFIX}/#"))
    stop_later(gw.start())
    for u in range(1, 11):
        sub.wait_for(lambda m, u=u: m.topic.endswith(f"/telemetry/default/d{u}"), count=5)
    gw.push(1, ten + device_docs("d11", server.port, 11, fast))
    applied = wait_event(sub, "config_applied", version=1)
    assert (applied["added"], applied["changed"]) == (["default/d11"], [])
    wait_event(sub, "config_committed", version=1)
    sub.wait_for(lambda m: m.topic.endswith("/telemetry/default/d11"), count=5)
    for u in range(1, 11):
        readings = [m.json() for m in sub.on(f"{PREFIX}/telemetry/default/d{u}")]
        assert [r["seq"] for r in readings] == list(range(1, len(readings) + 1)), u
        assert {r["values"]["level"] for r in readings} == {u}
        stamps = [r["ts"] for r in readings if r["ts"] >= applied["ts"] - 1000]
        # every 100 ms across the apply (a restarted poller would leave a hole)
        assert max(b - a for a, b in itertools.pairwise(stamps)) < 300, u


def test_a_restart_during_the_health_window_rolls_back_on_start_up(
    tmp_path: Path, stop_later: StopLater, server: ModbusServer
) -> None:
    broker = stop_later(start_broker(tmp_path))
    gw = Gateway(tmp_path, broker, device_docs("a", server.port, 1, PROPS), node=NODE)
    text = gw.agent_file.read_text().replace("health_window: 2", "health_window: 60")
    gw.agent_file.write_text(text)
    sub = stop_later(Subscriber(broker.port, f"{PREFIX}/#"))
    agent = stop_later(gw.start())
    sub.wait_for(lambda m: m.topic.endswith("/telemetry/default/a"))
    a, b = device_docs("a", server.port, 1, PROPS), device_docs("b", server.port, 2, PROPS)
    gw.push(1, a + b)
    wait_event(sub, "config_applied", version=1)
    agent.stop(9)  # SIGKILL inside the 60 s window
    agent = stop_later(gw.start())
    rolled = wait_event(sub, "config_rolled_back", version=1)
    assert rolled["reason"] == "the agent restarted during the health window"
    assert rolled["to"] == 0
    # the retained v1 is delivered again, and refused: it was rolled back
    assert wait_event(sub, "config_refused", version=1)["reason"] == "rolled_back"
    n_a = len(seqs(sub, "a"))
    sub.wait_for(lambda m: m.topic.endswith("/telemetry/default/a"), count=n_a + 3)
    assert not sub.on(f"{PREFIX}/telemetry/default/b") or all(
        m.at < rolled["ts"] / 1000 + 1 for m in sub.on(f"{PREFIX}/telemetry/default/b"))


def start_committed(tmp_path: Path, stop_later: StopLater,
                    server: ModbusServer) -> tuple[Broker, Gateway, Subscriber]:
    """A running agent with version 1 (device a) committed."""
    broker = stop_later(start_broker(tmp_path))
    gw = Gateway(tmp_path, broker, device_docs("a", server.port, 1, PROPS), node=NODE)
    sub = stop_later(Subscriber(broker.port, f"{PREFIX}/#"))
    stop_later(gw.start())
    sub.wait_for(lambda m: m.topic.endswith("/telemetry/default/a"))
    gw.push(1, device_docs("a", server.port, 1, PROPS))
    wait_event(sub, "config_committed", version=1)
    return broker, gw, sub


def test_agent_settings_are_applied_by_a_restart_and_rolled_back_by_one(
    tmp_path: Path, stop_later: StopLater, server: ModbusServer
) -> None:
    _, gw, sub = start_committed(tmp_path, stop_later, server)
    agent = gw.started[-1]
    a = device_docs("a", server.port, 1, PROPS)
    telemetry = f"{PREFIX}/telemetry/default/a"

    # v2 publishes readings with QoS 0: the agent restarts itself (same process) for it
    gw.push(2, a, agent={"uplink": {"qos": 0}})
    applied = wait_event(sub, "config_applied", version=2)
    assert applied["restart"] == ["qos"]
    wait_event(sub, "config_committed", version=2)
    assert state(sub)["config"] == {"applied": 2, "pending": None, "last_error": ""}
    n = len(sub.on(telemetry))
    assert sub.wait_for(lambda m: m.topic == telemetry, count=n + 2)[-1].qos == 0
    assert agent.proc.poll() is None  # re-executed in place: same PID, still running
    assert not events(sub, "config_refused")  # the retained v2 again is the running one

    # v3 points the uplink at a port where no broker listens: it cannot report, so its
    # health window fails; the agent restarts onto v2 and says so from there
    gw.push(3, a, agent={"uplink": {"qos": 0, "port": free_port()}})
    assert wait_event(sub, "config_applied", version=3)["restart"] == ["broker"]
    rolled = wait_event(sub, "config_rolled_back", version=3, timeout=30)
    assert rolled["reason"] == "the uplink is not connected at the end of the health window"
    assert rolled["to"] == 2
    sub.wait_for(lambda m: m.topic == f"{PREFIX}/state" and m.json().get("config", {}).get(
        "applied") == 2 and "version 3" in m.json()["config"]["last_error"])
    n = len(sub.on(telemetry))
    sub.wait_for(lambda m: m.topic == telemetry, count=n + 2)
    history = edge_cli("config", "history", "-c", str(gw.agent_file))
    assert "rolled_back" in history.stdout
    assert agent.proc.poll() is None
    assert "Traceback" not in agent.output()


def test_edge_rollback_goes_back_and_config_history_and_diff_show_it(
    tmp_path: Path, stop_later: StopLater, server: ModbusServer
) -> None:
    broker, gw, sub = start_committed(tmp_path, stop_later, server)
    a, b = device_docs("a", server.port, 1, PROPS), device_docs("b", server.port, 2, PROPS)
    gw.push(3, a + b)
    wait_event(sub, "config_committed", version=3)
    cfg = str(gw.agent_file)

    out = edge_cli("rollback", "-c", cfg)
    assert out.returncode == 0, out.stderr
    rolled = wait_event(sub, "config_rolled_back", version=3)
    assert (rolled["to"], rolled["reason"]) == (1, "rolled back on request to version 1")
    sub.wait_for(lambda m: m.topic == f"{PREFIX}/state" and m.json()["config"]["applied"] == 1
                 and "default/b" not in m.json()["devices"] and m.at * 1000 >= rolled["ts"])
    listing = edge_cli("config", "history", "-c", cfg)
    assert listing.returncode == 0, listing.stderr
    states = {int(line.split()[0]): line.split()[1] for line in listing.stdout.splitlines()[1:]}
    assert states == {0: "superseded", 1: "committed", 3: "rolled_back"}
    assert "(rolled back on request to version 1)" in listing.stdout
    diff = edge_cli("config", "diff", "-c", cfg, "1", "3")
    assert diff.returncode == 0, diff.stderr
    assert '+        "name": "b"' in diff.stdout
    # going back to a version that was rolled back is refused before asking the agent
    again = edge_cli("rollback", "-c", cfg, "3")
    assert again.returncode != 0
    assert "version 3 was rolled back" in again.stderr
    # after going back to 1, a version between 1 and 3 is still a replay: never seen,
    # but older than the newest this gateway took
    gw.push(2, a + b)
    refused = wait_event(sub, "config_refused", version=2)
    assert refused["reason"] == "replayed"
    assert "newest this gateway has taken" in refused["error"]
    status = edge_cli("cloud", "status", "--broker", f"127.0.0.1:{broker.port}",
                      "--node", NODE, "--node", "gw-nobody")
    assert status.returncode == 1  # gw-nobody has no retained state
    assert f"{NODE}: online, config 1, devices 1/1 online" in status.stdout
    assert "gw-nobody: no retained state" in status.stderr


def test_cloud_rollback_is_a_signed_command_with_a_reply(
    tmp_path: Path, stop_later: StopLater, server: ModbusServer
) -> None:
    broker, gw, sub = start_committed(tmp_path, stop_later, server)
    a, b = device_docs("a", server.port, 1, PROPS), device_docs("b", server.port, 2, PROPS)
    gw.push(2, a + b)
    wait_event(sub, "config_committed", version=2)
    where = ["--node", NODE, "--broker", f"127.0.0.1:{broker.port}", "--timeout", "15"]

    stranger = tmp_path / "stranger.key"
    stranger.write_bytes(new_key_pair()[0])
    forged = edge_cli("cloud", "rollback", *where, "--key", str(stranger), "1")
    assert forged.returncode == 1
    assert f"{NODE}: refused:" in forged.stderr
    assert "does not trust" in forged.stderr
    assert state(sub)["config"]["applied"] == 2  # nothing happened

    done = edge_cli("cloud", "rollback", *where, "--key", str(gw.key_file), "1")
    assert done.returncode == 0, done.stderr
    assert f"{NODE}: rolled back, running version 1" in done.stdout
    rolled = wait_event(sub, "config_rolled_back", version=2)
    assert rolled["to"] == 1
    again = edge_cli("cloud", "rollback", *where, "--key", str(gw.key_file), "2")
    assert again.returncode == 1
    assert "refused: cannot roll back to version 2: it was rolled back" in again.stderr
