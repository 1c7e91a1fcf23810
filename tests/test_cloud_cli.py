"""``edge cloud keygen`` and ``push`` against a real mosquitto."""

from __future__ import annotations

import stat
from datetime import UTC, datetime
from pathlib import Path

from conftest import StopLater
from support import REPO, Subscriber, edge_cli, start_broker

from edge.sync.bundle import key_id, load_public_key, verify

EXAMPLES = REPO / "examples" / "manifests"


def keygen(tmp_path: Path) -> tuple[Path, Path]:
    out = edge_cli("cloud", "keygen", "--out", str(tmp_path / "keys"))
    assert out.returncode == 0, out.stderr
    return tmp_path / "keys" / "cloud.key", tmp_path / "keys" / "cloud.pub"


def test_keygen_writes_a_private_key_only_its_owner_reads(tmp_path: Path) -> None:
    private, public = keygen(tmp_path)
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    kid = key_id(load_public_key(public.read_bytes()))
    again = edge_cli("cloud", "keygen", "--out", str(tmp_path / "keys"))
    assert again.returncode != 0
    assert "exists; not overwritten" in again.stderr
    assert kid == key_id(load_public_key(public.read_bytes()))  # the first pair is kept


def test_push_publishes_a_retained_signed_bundle_per_node(
    tmp_path: Path, stop_later: StopLater
) -> None:
    private, public = keygen(tmp_path)
    broker = stop_later(start_broker(tmp_path))
    agent = tmp_path / "agent.yaml"
    agent.write_text("log: {level: debug}\n")
    out = edge_cli("cloud", "push", "--node", "demo-gw", "--node", "gw-2", "--key",
                   str(private), "--broker", f"127.0.0.1:{broker.port}", "--version", "42",
                   "--agent", str(agent), str(EXAMPLES))
    assert out.returncode == 0, out.stderr
    assert ("demo-gw: version 42 -> edge/v1/demo-gw/desired (4 devices, 4 models, "
            "0 plugins, 0 policies)") in out.stdout
    # the energy meter and the inverter are bound to demo-gw (spec.nodeName): gw-2 gets
    # only the other two
    assert ("gw-2: version 42 -> edge/v1/gw-2/desired (2 devices, 4 models, "
            "0 plugins, 0 policies)") in out.stdout
    sub = stop_later(Subscriber(broker.port, "edge/v1/+/desired"))  # subscribed afterwards
    got = {m.topic: m for m in sub.wait_for(lambda m: m.retain, count=2)}
    trusted = [load_public_key(public.read_bytes())]
    b = verify(got["edge/v1/demo-gw/desired"].payload, trusted, node="demo-gw",
               now=datetime.now(UTC), running_version=41)
    assert b.version == 42
    assert sorted(d["metadata"]["name"] for d in b.devices) == [
        "boiler-1", "inverter-1", "meter-1", "temperature-1"]
    assert b.agent == {"log": {"level": "debug"}}


def test_push_of_invalid_manifests_sends_nothing(tmp_path: Path, stop_later: StopLater) -> None:
    private, _ = keygen(tmp_path)
    broker = stop_later(start_broker(tmp_path))
    bad = tmp_path / "bad.yaml"
    bad.write_text((EXAMPLES / "boiler.yaml").read_text().replace("slaveID: 2", "slaveID: 999"))
    out = edge_cli("cloud", "push", "--node", "gw", "--key", str(private), "--broker",
                   f"127.0.0.1:{broker.port}", str(bad))
    assert out.returncode == 2
    assert "slaveID" in out.stderr
    sub = stop_later(Subscriber(broker.port, "edge/v1/+/desired"))
    assert sub.messages == []


def test_push_of_an_invalid_policy_names_it_and_sends_nothing(
        tmp_path: Path, stop_later: StopLater) -> None:
    private, _ = keygen(tmp_path)
    broker = stop_later(start_broker(tmp_path))
    policy = tmp_path / "policy.yaml"
    policy.write_text(
        "apiVersion: gateway.edge/v1alpha1\nkind: NetworkPolicy\nmetadata: {name: agent}\n"
        "spec:\n  workload: {systemdUnit: edge.service}\n"
        "  egress: [{to: [{cidr: 10.0.0.0/8, except: [172.16.0.0/12]}]}]\n")
    out = edge_cli("cloud", "push", "--node", "gw", "--key", str(private), "--broker",
                   f"127.0.0.1:{broker.port}", "--policy", str(policy), str(EXAMPLES))
    assert out.returncode == 2
    assert f"{policy} policies document 1: spec.egress[0].to[0].except" in out.stderr
    assert "is not inside its cidr 10.0.0.0/8" in out.stderr
    sub = stop_later(Subscriber(broker.port, "edge/v1/+/desired"))
    assert sub.messages == []
