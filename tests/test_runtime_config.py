"""Configuration is validated in a child process: same result, none of its weight in
the agent, and an input that blows validation up costs only the child."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import yaml
from support import REPO, Subscriber, start_broker, start_edge
from wasm_modules import ECHO, write_plugin

from edge.config.errors import ConfigError
from edge.config.load import load_config
from edge.config.runtime import load_runtime_config

EXAMPLE = REPO / "examples" / "edge.yaml"


def test_same_devices_and_warnings_as_in_process_loading() -> None:
    isolated = load_runtime_config(EXAMPLE)
    direct = load_config(EXAMPLE)
    assert isolated.devices == direct.devices
    assert isolated.warnings == direct.warnings
    assert isolated.node == "demo-gw"
    assert isolated.topic_prefix == "edge/v1/demo-gw"
    assert isolated.version.startswith("sha256:")


def test_problems_come_back_from_the_child(tmp_path: Path) -> None:
    cfg = tmp_path / "edge.yaml"
    cfg.write_text(yaml.safe_dump({"node": "a/b", "uplnk": {}}))
    with pytest.raises(ConfigError) as err:
        load_runtime_config(cfg)
    text = str(err.value)
    assert "uplnk" in text
    assert "node" in text


def test_yaml_alias_bomb_is_contained(tmp_path: Path) -> None:
    """Billion laughs as a Device's properties: 10 levels of 10 aliases expand to 10^9
    entries when validated; the child runs out of memory or time, the caller gets a
    ConfigError and is none the worse."""
    lines = ["apiVersion: devices.kubeedge.io/v1beta1", "kind: Device",
             "metadata: {name: bomb}", "x:",
             '  a0: &a0 [{name: p, collectCycle: 1}, {name: p}, {name: p}, {name: p}]']
    lines += [f"  a{i}: &a{i} [{','.join(['*a' + str(i - 1)] * 10)}]" for i in range(1, 10)]
    lines += ["spec: {deviceModelRef: {name: m}, properties: *a9}"]
    (tmp_path / "bomb.yaml").write_text("\n".join(lines) + "\n")
    cfg = tmp_path / "edge.yaml"
    cfg.write_text(yaml.safe_dump({"node": "gw", "devices": ["bomb.yaml"]}))
    started = time.monotonic()
    with pytest.raises(ConfigError) as err:
        load_runtime_config(cfg, timeout_s=20, memory_limit=400 << 20)
    assert time.monotonic() - started < 30
    assert any("memory" in p.message or "longer" in p.message for p in err.value.problems)


def test_running_agent_does_not_map_the_validation_libraries(tmp_path: Path) -> None:
    """Not even with a plugin, whose manifest the child checked (pydantic, PyYAML, the
    signature's cryptography) while the agent runs only wasmtime."""
    broker = start_broker(tmp_path)
    cfg = tmp_path / "edge.yaml"
    cfg.write_text(yaml.safe_dump({"node": "gw", "uplink": {"port": broker.port}}))
    write_plugin(tmp_path / "plugins", "echo", ECHO)
    sub = Subscriber(broker.port, "edge/v1/gw/state")
    agent = start_edge(["run", "-c", str(cfg)], tmp_path)
    try:
        sub.wait_for(lambda m: m.json()["state"] == "online")
        maps = Path(f"/proc/{agent.proc.pid}/maps").read_text()
        assert "pydantic_core" not in maps
        assert "_yaml" not in maps
        assert "cryptography" not in maps
        assert "libwasmtime" in maps
    finally:
        agent.stop()
        sub.stop()
        broker.stop()
