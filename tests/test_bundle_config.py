"""A desired bundle on top of the agent file, verified and validated in the forked child."""

from __future__ import annotations

import copy
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from support import REPO

from edge.cloud import bundle_content, for_node
from edge.config.errors import ConfigError
from edge.config.runtime import BundleRefusedError, BundleSource, load_runtime_config
from edge.sync.bundle import new_key_pair, rfc3339, sign

EXAMPLES = REPO / "examples" / "manifests"


@pytest.fixture
def signer(tmp_path: Path) -> Ed25519PrivateKey:
    private_pem, public_pem = new_key_pair()
    (tmp_path / "cloud.pub").write_bytes(public_pem)
    from edge.sync.bundle import load_private_key  # noqa: PLC0415

    return load_private_key(private_pem)


@pytest.fixture
def agent_file(tmp_path: Path, signer: Ed25519PrivateKey) -> Path:
    (tmp_path / "local").mkdir()
    path = tmp_path / "edge.yaml"
    path.write_text(yaml.safe_dump({
        "node": "demo-gw", "devices": ["./local"], "store": {"path": "./edge.db"},
        "trust": {"keys": ["./cloud.pub"]}, "modbus": {"breaker_failures": 3},
    }))
    return path


def content(version: int = 7, **over: Any) -> dict[str, Any]:
    now = datetime.now(UTC)
    body: dict[str, Any] = {
        "version": version, "node": "demo-gw", "issued_at": rfc3339(now),
        "expires_at": rfc3339(now + timedelta(days=1)), "policies": [], "plugins": [],
        "agent": {"modbus": {"breaker_failures": 5}, "log": {"level": "debug"}},
        **for_node(bundle_content([EXAMPLES]), "demo-gw"),
    }
    body.update(over)
    return body


def load(agent_file: Path, token: bytes, running: int = 0) -> Any:
    return load_runtime_config(agent_file, source=BundleSource(token=token,
                                                               running_version=running))


def test_a_bundle_replaces_the_devices_and_overrides_agent_settings(
    agent_file: Path, signer: Ed25519PrivateKey
) -> None:
    local = load_runtime_config(agent_file)
    assert local.devices == ()
    assert (local.bundle_version, local.modbus.breaker_failures) == (0, 3)
    cfg = load(agent_file, sign(content(), signer), running=6)
    assert cfg.bundle_version == 7
    assert sorted(d.key for d in cfg.devices) == [
        "default/inverter-1", "default/meter-1", "default/temperature-1", "plant/boiler-1"]
    assert (cfg.modbus.breaker_failures, cfg.log_level) == (5, "debug")
    assert cfg.node == "demo-gw"
    assert cfg.bundle == content() | {"issued_at": cfg.bundle["issued_at"],
                                      "expires_at": cfg.bundle["expires_at"]}
    assert cfg.version != local.version
    # the same content from the history, without a token: the same configuration
    again = load_runtime_config(agent_file, source=BundleSource(content=cfg.bundle))
    assert again.devices == cfg.devices
    assert again.version == cfg.version


def test_a_bundle_that_does_not_verify_is_refused_with_its_reason(
    agent_file: Path, signer: Ed25519PrivateKey
) -> None:
    with pytest.raises(BundleRefusedError) as e:
        load(agent_file, sign(content(), Ed25519PrivateKey.generate()))
    assert e.value.reason == "unknown_key"
    with pytest.raises(BundleRefusedError) as e:
        load(agent_file, sign(content(7), signer), running=7)
    assert (e.value.reason, e.value.version) == ("replayed", 7)
    assert "not newer than version 7, the newest this gateway has taken" in str(e.value.problems[0])


def test_a_bundle_cannot_change_what_only_the_gateway_sets(
    agent_file: Path, signer: Ed25519PrivateKey
) -> None:
    body = content(agent={"node": "other", "trust": {"keys": []}, "store": {"path": "/tmp/x"}})
    with pytest.raises(ConfigError) as e:
        load(agent_file, sign(body, signer))
    fields = {p.field for p in e.value.problems}
    assert {"agent.node", "agent.trust", "agent.store.path"} <= fields
    assert not isinstance(e.value, BundleRefusedError)


def test_bad_devices_in_a_bundle_are_named_by_bundle_and_index(
    agent_file: Path, signer: Ed25519PrivateKey
) -> None:
    body = content()
    devices = copy.deepcopy(body["devices"])
    boiler = next(i for i, d in enumerate(devices) if d["metadata"]["name"] == "boiler-1")
    devices[boiler]["spec"]["protocol"]["configData"]["slaveID"] = 999
    with pytest.raises(ConfigError) as e:
        load(agent_file, sign(content(devices=devices), signer))
    [p] = [p for p in e.value.problems if p.severity == "error"]
    assert p.file == "bundle version 7 devices"
    assert p.document == boiler + 1
    assert "slaveID" in p.field


def test_a_bundle_plugin_is_checked_like_a_manifest_file(
    agent_file: Path, signer: Ed25519PrivateKey
) -> None:
    with pytest.raises(ConfigError) as e:
        load(agent_file, sign(content(plugins=[{"name": "deadband"},
                                               {"name": "units", "version": "1"}]), signer))
    assert [(p.document, p.field, p.message) for p in e.value.problems] == [
        (1, "version", "is required"),
        (2, "sha256", "is required: the SHA-256 (hex) of the module, from `sha256sum` or "
                      "`edge plugin sign`")]
