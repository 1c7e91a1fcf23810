"""The network policy on the web server: ``GET /api/v1/policy`` and the ``edge_policy_*``
metrics, through aiohttp's test client against a running agent (real mosquitto): a
policy configured where the kernel cannot take it (unenforced, with the reason), and
one enforced in the real kernel (tests/policy_kernel.py: a private bpffs, the test's own
cgroups) with probes whose connections to 127.0.0.1 are allowed, dropped and
audited, so that the counters and drops shown are the kernel's. (No policy at all:
tests/test_web_api.py.)"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Iterator
from ipaddress import IPv4Network
from pathlib import Path
from typing import Any

import yaml
from aiohttp.test_utils import TestClient, TestServer
from conftest import StopLater
from policy_kernel import Kernel, Probe, kernel
from prometheus_client.parser import text_string_to_metric_families
from support import start_broker, write_agent_file

from edge.agent import Agent
from edge.config.runtime import build_runtime_config
from edge.policy.enforcer import Enforcer
from edge.policy.spec import NetworkPolicy, Peer, PolicySettings, PortSpec, Rule
from edge.policy.tables import compile_tables
from edge.web.server import WebServer

LOOPBACK = (Peer(IPv4Network("127.0.0.1/32")),)
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def value(values: Samples, name: str, **labels: str) -> float:
    return values[name, frozenset(labels.items())]


class Served:
    def __init__(self, agent: Agent, client: TestClient[Any, Any]) -> None:
        self.agent, self.client = agent, client

    async def policy(self) -> dict[str, Any]:
        r = await self.client.get("/api/v1/policy")
        assert r.status == 200, await r.text()
        body: dict[str, Any] = await r.json()
        return body

    async def metrics(self) -> Samples:
        r = await self.client.get("/metrics")
        assert r.status == 200
        return {(s.name, frozenset(s.labels.items())): s.value
                for f in text_string_to_metric_families(await r.text()) for s in f.samples}


@contextlib.asynccontextmanager
async def serve(agent: Agent) -> AsyncIterator[Served]:
    """``agent`` running (its policy started by :meth:`Agent.run`), its web app served."""
    web = WebServer(agent, agent.history, agent.cfg.web)
    stop = asyncio.Event()
    task = asyncio.create_task(agent.run(stop))
    try:
        async with TestClient(TestServer(web.app(), host="127.0.0.1")) as client:
            await asyncio.sleep(0.5)
            yield Served(agent, client)
    finally:
        stop.set()
        await task


def policy_doc(name: str, cgroup: str, mode: str, port: int) -> dict[str, Any]:
    return {"apiVersion": "gateway.edge/v1alpha1", "kind": "NetworkPolicy",
            "metadata": {"name": name},
            "spec": {"workload": {"cgroup": cgroup}, "mode": mode,
                     "egress": [{"to": [{"cidr": "127.0.0.1/32"}],
                                 "ports": [{"port": port, "protocol": "TCP"}]}]}}


async def test_a_policy_the_kernel_cannot_take_is_unenforced_and_says_why(
    tmp_path: Path, stop_later: StopLater
) -> None:
    broker = stop_later(start_broker(tmp_path))
    path = write_agent_file(tmp_path, broker.port, [])
    doc = yaml.safe_load(path.read_text())
    (tmp_path / "plain-file").write_text("")  # not a bpf file system, nor can be one
    doc["policy"] = {"mode": "enforce", "pin_dir": str(tmp_path / "plain-file" / "edge"),
                     "policies": [policy_doc("agent", "system.slice/edge.service",
                                             "enforce", 502)]}
    path.write_text(yaml.safe_dump(doc))
    agent = Agent(build_runtime_config(path))
    async with serve(agent) as served:
        status = await served.policy()
        v = await served.metrics()
        events = await (await served.client.get("/api/v1/events")).json()
    assert status["state"] == "unenforced"
    assert f"{tmp_path / 'plain-file'} is not " in status["reason"]
    assert "bpf file system" in status["reason"]
    assert status["pin"] == str(tmp_path / "plain-file" / "edge")
    assert (status["applied_ms"], status["updates"], status["workloads"]) == (0, 0, {})
    assert (status["datapath"], status["drops"], status["recent"]) == ({}, {}, [])
    rules = status["rules"]
    assert [r["id"] for r in rules] == list(range(1, len(rules) + 1))  # match order
    failsafe = [r for r in rules if r["section"] == "failsafe"]
    assert {r["where"] for r in failsafe} >= {"failsafe loopback", "failsafe broker"}
    assert all(r["enforce"] and r["policy"] is None for r in failsafe)
    own = [(r["where"], r["action"], r["direction"], r["workload"])
           for r in rules if r["policy"] == "agent"]
    assert own == [
        ("policy 'agent' egress[0].ports[0]", "allow", "egress", "system.slice/edge.service"),
        ("policy 'agent' default deny (egress)", "deny", "egress", "system.slice/edge.service"),
        ("policy 'agent' default deny (ingress)", "deny", "ingress",
         "system.slice/edge.service")]
    assert rules[len(failsafe)]["what"] == "to 127.0.0.1/32; TCP 502"
    assert all(r["packets"] == r["bytes"] == 0 for r in rules)
    assert [e["reason"] for e in events if e["type"] == "policy_unenforced"] == [
        status["reason"]]

    assert value(v, "edge_policy_enforced") == 0
    assert {s: value(v, "edge_policy_state", state=s) for s in (
        "off", "enforced", "unenforced")} == {"off": 0, "enforced": 0, "unenforced": 1}
    assert not any(name.startswith("edge_policy_rule_") for name, _ in v)  # not in the kernel
    assert value(v, "edge_policy_drops_total", verdict="drop") == 0
    assert value(v, "edge_policy_drops_total", verdict="would-drop") == 0
    assert value(v, "edge_policy_events_lost_total") == 0
    assert value(v, "edge_policy_updates_total") == 0
    assert value(v, "edge_policy_update_seconds") == 0


@contextlib.contextmanager
def probes(k: Kernel, *cgroups: str) -> Iterator[list[Probe]]:
    """A probe in each of ``cgroups`` (made under the harness's base), and one outside
    (in this test's own cgroup, not policed) that listens."""
    started = [Probe(None), *(Probe(k.root / k.cgroup(name)) for name in cgroups)]
    try:
        yield started
    finally:
        for p in started:
            p.stop()


async def test_an_enforced_policy_shows_the_kernel_s_counters_and_drops(
    tmp_path: Path, stop_later: StopLater
) -> None:
    broker = stop_later(start_broker(tmp_path))
    with kernel(tmp_path) as k, probes(k, "enforced", "audited") as (server, enforced,
                                                                         audited):
        allowed = server.ask(op="listen", proto="tcp", host="127.0.0.1")["port"]
        denied = server.ask(op="listen", proto="tcp", host="127.0.0.1")["port"]
        settings = PolicySettings("enforce", (
            NetworkPolicy("strict", f"{k.base}/enforced",
                          egress=(Rule(LOOPBACK, (PortSpec("TCP", allowed),)),)),
            NetworkPolicy("watch", f"{k.base}/audited", mode="audit",
                          egress=(Rule(LOOPBACK, (PortSpec("TCP", allowed),)),)),
        ), failsafe=(), pin_dir=str(k.pin))
        # the harness's datapath attached below its own base cgroup first: the agent's
        # then takes it over there (instead of attaching at the cgroup v2 root)
        k.dp.apply(compile_tables(settings))
        agent = Agent(build_runtime_config(write_agent_file(tmp_path, broker.port, [])))
        agent.policy = Enforcer(settings)
        async with serve(agent) as served:
            assert agent.policy.state == "enforced", agent.policy.reason
            ask = asyncio.to_thread
            for _ in range(2):
                assert "ok" in await ask(enforced.ask, op="tcp", host="127.0.0.1",
                                         port=allowed, size=1000)
            assert "error" in await ask(enforced.ask, op="tcp", host="127.0.0.1",
                                        port=denied, timeout=0.5)
            assert "ok" in await ask(audited.ask, op="tcp", host="127.0.0.1", port=denied)
            deadline = time.monotonic() + 10  # the agent reads the event ring every second
            status = await served.policy()
            while time.monotonic() < deadline and not {"drop", "would-drop"} <= set(
                    status["drops"]):
                await asyncio.sleep(0.3)
                status = await served.policy()
            v = await served.metrics()
            page = await (await served.client.get("/static/app.js")).text()
    assert "pagePolicy" in page
    assert status["state"] == "enforced"
    assert status["reason"] == ""
    assert status["pin"] == str(k.pin)
    assert status["updates"] == 1
    assert abs(status["applied_ms"] - time.time() * 1000) < 60_000
    assert status["update_ms"] > 0
    assert set(status["workloads"]) == {f"{k.base}/enforced", f"{k.base}/audited"}
    assert all(isinstance(cg, int) for cg in status["workloads"].values())
    rules = {r["where"]: r for r in status["rules"]}
    allow = rules["policy 'strict' egress[0].ports[0]"]
    assert allow["packets"] >= 6  # two connections: SYN, ACK, data, FIN, and the replies
    assert allow["bytes"] > 2000  # 1000 bytes sent on each
    drop = rules["policy 'strict' default deny (egress)"]
    assert drop["packets"] >= 1  # the SYN (and its retries)
    audit = rules["policy 'watch' default deny (egress)"]
    assert audit["packets"] >= 3
    assert (audit["enforce"], drop["enforce"]) == (False, True)
    assert rules["policy 'watch' egress[0].ports[0]"]["packets"] == 0
    assert status["drops"]["drop"] >= 1
    assert status["drops"]["would-drop"] == 1  # the audited connection's SYN: once a flow
    assert status["datapath"]["events_lost"] == 0
    by_verdict = {e["verdict"]: e for e in status["recent"]}
    assert by_verdict["drop"] == by_verdict["drop"] | {
        "workload": f"{k.base}/enforced", "rule": drop["id"], "where": drop["where"],
        "direction": "egress", "address": "127.0.0.1", "protocol": "TCP", "port": denied}
    assert by_verdict["would-drop"]["workload"] == f"{k.base}/audited"
    assert by_verdict["would-drop"]["rule"] == audit["id"]

    assert value(v, "edge_policy_enforced") == 1
    assert value(v, "edge_policy_state", state="enforced") == 1
    assert value(v, "edge_policy_state", state="unenforced") == 0
    labels = {"rule": str(allow["id"]), "policy": "strict", "section": "egress",
              "action": "allow"}
    assert value(v, "edge_policy_rule_packets_total", **labels) >= allow["packets"]
    assert value(v, "edge_policy_rule_bytes_total", **labels) >= allow["bytes"]
    assert value(v, "edge_policy_rule_packets_total", rule=str(drop["id"]), policy="strict",
                 section="default", action="deny") >= 1
    assert len([n for n, _ in v if n == "edge_policy_rule_packets_total"]) == len(rules)
    assert value(v, "edge_policy_drops_total", verdict="drop") >= 1
    assert value(v, "edge_policy_drops_total", verdict="would-drop") == 1
    assert value(v, "edge_policy_events_lost_total") == 0
    assert value(v, "edge_policy_updates_total") == 1
    assert 0 < value(v, "edge_policy_update_seconds") < 5
