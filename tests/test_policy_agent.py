"""The network policy in the running agent (``edge run``), against the real kernel: a
policy pushed in a desired bundle is enforced, one that cuts the uplink off is rolled
back by the health window, and ``edge policy status|remove`` show and take away what
the kernel holds.

The gateway's uplink goes through a relay (socat) in a test cgroup, the workload the
policies select: agent → 127.0.0.1:relay → the broker's second listener on this side
of a test veth pair. Loopback is failsafe, the veth address is not, so a policy on the
relay can cut the uplink off, as a policy on a VPN or proxy unit could on a gateway.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from policy_kernel import Kernel, Netns, Probe, kernel, netns
from support import (
    Broker,
    Gateway,
    Image,
    ModbusServer,
    Subscriber,
    device_docs,
    edge_cli,
    free_port,
    start_broker,
    wait_event,
    wait_port,
)

LEVEL = [{"name": "level", "type": "INT", "collectCycle": 200,
          "visitor": {"register": "HoldingRegister", "offset": 0, "dataType": "int16"}}]


@pytest.fixture
def k(tmp_path: Path) -> Iterator[Kernel]:
    with kernel(tmp_path) as kern:
        yield kern


@pytest.fixture
def ns() -> Iterator[Netns]:
    with netns() as n:
        yield n


@pytest.fixture
def broker(tmp_path: Path, ns: Netns) -> Iterator[Broker]:
    b = start_broker(tmp_path, "allow_anonymous true\n"
                     f"listener {free_port()} {ns.host4}\n")
    yield b
    b.stop()


def second_listener(b: Broker) -> int:
    """The port of the broker's listener on the veth address."""
    for line in b.conf.read_text().splitlines():
        if line.startswith("listener") and "127.0.0.1" not in line:
            return int(line.split()[1])
    raise AssertionError("no second listener")


@contextlib.contextmanager
def relay(k: Kernel, target: str, port: int) -> Iterator[tuple[int, str]]:
    """socat on 127.0.0.1:(a free port) to target:port, in cgroup ``base/relay``."""
    cg = k.cgroup("relay")
    listen = free_port()
    procs = k.root / cg / "cgroup.procs"

    def enter() -> None:
        procs.write_text(str(os.getpid()))

    proc = subprocess.Popen(["socat", f"TCP-LISTEN:{listen},bind=127.0.0.1,fork,reuseaddr",
                             f"TCP:{target}:{port}"], preexec_fn=enter)  # noqa: PLW1509
    try:
        wait_port(listen)
        yield listen, cg
    finally:
        proc.kill()
        proc.wait()


def relay_policy(cg: str, to: str, port: int) -> dict[str, Any]:
    return {"apiVersion": "gateway.edge/v1alpha1", "kind": "NetworkPolicy",
            "metadata": {"name": "relay"},
            "spec": {"workload": {"cgroup": cg}, "mode": "enforce",
                     "egress": [{"to": [{"cidr": f"{to}/32"}],
                                 "ports": [{"port": port, "protocol": "TCP"}]}]}}


def test_a_pushed_policy_that_cuts_the_uplink_off_is_rolled_back(
        tmp_path: Path, k: Kernel, ns: Netns, broker: Broker) -> None:
    server = ModbusServer({1: Image(hr=[7])})
    sub = Subscriber(broker.port, "edge/v1/#")
    upstream = second_listener(broker)
    with relay(k, ns.host4, upstream) as (relay_port, cg):
        docs = device_docs("a", server.port, 1, LEVEL)
        gw = Gateway(tmp_path, broker, docs, node="gw-pol", health_window=3)
        agent_file = yaml.safe_load(gw.agent_file.read_text())
        agent_file["uplink"]["port"] = relay_port
        agent_file["policy"] = {"mode": "enforce", "pin_dir": str(k.pin.parent / "agent")}
        gw.agent_file.write_text(yaml.safe_dump(agent_file))
        agent = gw.start()
        try:
            wait_event(sub, gw.prefix, "device_state", state="online")
            (tmp_path / "relay-policy.yaml").write_text(
                yaml.safe_dump(relay_policy(cg, ns.host4, upstream)))
            (tmp_path / "cloud").mkdir()
            (tmp_path / "cloud" / "m.yaml").write_text(yaml.safe_dump_all(docs))
            out = edge_cli("cloud", "push", "--node", gw.node, "--key", str(gw.key_file),
                           "--broker", f"127.0.0.1:{broker.port}", "--version", "1",
                           "--policy", str(tmp_path / "relay-policy.yaml"),
                           str(tmp_path / "cloud"))
            assert out.returncode == 0, out.stderr
            assert out.stdout.strip().endswith("0 plugins, 1 policies)")
            wait_event(sub, gw.prefix, "config_committed", version=1, timeout=30)
            applied = wait_event(sub, gw.prefix, "policy_applied")
            assert "1 policy (1 enforce)" in applied["summary"]
            # version 2 lets the relay reach the wrong address only: the uplink is cut
            gw.push(2, docs, policies=[relay_policy(cg, ns.peer4, upstream)])
            rolled = wait_event(sub, gw.prefix, "config_rolled_back", version=2, timeout=40)
            assert rolled["to"] == 1
            assert "uplink" in rolled["reason"]
            status = edge_cli("policy", "status", "-c", str(gw.agent_file), "--json")
            assert status.returncode == 0, status.stderr
            body = json.loads(status.stdout)
            assert body["state"] == "enforced", (body, agent.output()[-3000:])
            assert body["kernel"]["pinned"] is True
            allow = next(r for r in body["rules"] if r["where"] == "policy 'relay' egress[0]"
                         ".ports[0]")
            assert allow["what"] == f"to {ns.host4}/32; TCP {upstream}"
            assert allow["packets"] > 0  # the uplink goes through it again
            explained = edge_cli("policy", "explain", "-c", str(gw.agent_file), "--workload",
                                 cg, "--egress", ns.host4, str(upstream), "tcp")
            assert "note: the agent runs bundle version 1" in explained.stderr
            assert explained.stdout.splitlines()[1] == (
                f"rule: #{allow['id']} policy 'relay' egress[0].ports[0] (enforce)")
            # version 2's drops are kept across the restart that rolled it back
            drops = [d for d in body["recent"] if d["verdict"] == "drop"]
            assert drops, body["recent"]
            assert {(d["workload"], d["address"], d["protocol"], d["port"], d["where"])
                    for d in drops} == {(cg, ns.host4, "TCP", upstream,
                                         "policy 'relay' default deny (egress)")}
        finally:
            assert agent.stop() == 0, agent.output()
            sub.stop()
            server.stop()
        out = agent.output()
        assert "network policy: enforced" in out
        # the pins outlive the agent: the relay is still policed after it stopped
        blocked = edge_cli("policy", "status", "-c", str(gw.agent_file))
        assert "network policy: enforced" in blocked.stdout, blocked.stdout
        removed = edge_cli("policy", "remove", "-c", str(gw.agent_file))
        assert removed.returncode == 0, removed.stderr
        assert "removed the network policy datapath" in removed.stdout
        assert not (k.pin.parent / "agent").exists()
        again = edge_cli("policy", "remove", "-c", str(gw.agent_file))
        assert "nothing is pinned" in again.stdout


def test_without_a_datapath_the_agent_runs_on_and_says_the_policy_is_unenforced(
        tmp_path: Path) -> None:
    b = start_broker(tmp_path)
    server = ModbusServer({1: Image(hr=[7])})
    sub = Subscriber(b.port, "edge/v1/#")
    docs = device_docs("a", server.port, 1, LEVEL)
    gw = Gateway(tmp_path, b, docs, node="gw-unenf")
    agent_file = yaml.safe_load(gw.agent_file.read_text())
    (tmp_path / "not-bpffs").mkdir()
    agent_file["policy"] = {"mode": "enforce", "pin_dir": str(tmp_path / "not-bpffs" / "edge"),
                            "policies": [relay_policy("system.slice/x.service", "10.0.0.1",
                                                      502)]}
    gw.agent_file.write_text(yaml.safe_dump(agent_file))
    agent = gw.start()
    try:
        event = wait_event(sub, gw.prefix, "policy_unenforced")
        assert event["reason"] == (f"{tmp_path / 'not-bpffs'} is not on a bpf file system "
                                   f"(mount one: mount -t bpf bpf {tmp_path / 'not-bpffs'})")
        wait_event(sub, gw.prefix, "device_state", state="online")  # and it runs on
        status = edge_cli("policy", "status", "-c", str(gw.agent_file), "--json")
        body = json.loads(status.stdout)
        assert body["state"] == "unenforced"
        assert body["reason"] == event["reason"]
        assert body["kernel"]["pinned"] is False
        text = edge_cli("policy", "status", "-c", str(gw.agent_file))
        assert text.returncode == 0, text.stderr
        assert f"kernel: nothing pinned ({event['reason']})" in text.stdout
        assert "–" in text.stdout  # no counters: nothing in the kernel
    finally:
        assert agent.stop() == 0, agent.output()
        sub.stop()
        server.stop()
        b.stop()
    assert "network policy NOT enforced" in agent.output()


def test_a_drop_below_a_workload_is_named_by_its_cgroup_path(k: Kernel) -> None:
    from edge.policy.enforcer import Enforcer  # noqa: PLC0415
    from edge.policy.spec import NetworkPolicy, PolicySettings  # noqa: PLC0415

    app = k.cgroup("app")
    sub = k.cgroup("app/sub")
    settings = PolicySettings("enforce", (NetworkPolicy("app", app),),
                              pin_dir=str(k.pin.parent / "enforcer"))
    enforcer = Enforcer(settings)
    probe = Probe(k.root / sub)
    try:
        assert enforcer.start() == "enforced", enforcer.reason
        assert probe.ask(op="udp", host="127.0.0.1", port=9, timeout=0.5) == {
            "error": "EPERM"}
        enforcer.poll()
        assert [(d.workload, d.verdict, d.where) for d in enforcer.recent] == [
            (sub, "drop", "policy 'app' default deny (egress)")]
    finally:
        probe.stop()
        enforcer.close()
