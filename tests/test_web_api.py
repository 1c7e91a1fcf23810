"""The web server's REST API, live stream and health endpoints, against a running agent
(in this process: real mosquitto, real pymodbus servers, real SQLite files), through
aiohttp's test client over a real loopback socket."""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import json
import logging
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer
from conftest import StopLater
from prometheus_client.parser import text_string_to_metric_families
from support import Image, ModbusServer, device_docs, free_port, start_broker, write_agent_file
from wasm_modules import ECHO, TRAP, write_plugin

from edge.agent import Agent
from edge.config.runtime import build_runtime_config
from edge.reading import Reading
from edge.web.auth import hash_password, new_token
from edge.web.openapi import openapi
from edge.web.recent import TREND_STEP_MS, Recent
from edge.web.server import WebServer

PROPS = [
    {"name": "level", "type": "INT", "collectCycle": 100,
     "visitor": {"register": "HoldingRegister", "offset": 0, "dataType": "int16"}},
    {"name": "temperature", "type": "FLOAT", "collectCycle": 100, "accessMode": "ReadWrite",
     "visitor": {"register": "HoldingRegister", "offset": 1, "dataType": "int16",
                 "scale": 0.1}},
]


PASSWORD_HASH = hash_password("correct horse")
TOKEN, TOKEN_HASH = new_token()


class Running:
    def __init__(self, agent: Agent, web: WebServer, client: TestClient[Any, Any]) -> None:
        self.agent, self.web, self.client = agent, web, client

    async def get(self, path: str, status: int = 200) -> Any:
        r = await self.client.get(path)
        assert r.status == status, (path, r.status, await r.text())
        return await r.json()


@pytest.fixture
async def running(tmp_path: Path, stop_later: StopLater) -> AsyncIterator[Running]:
    broker = stop_later(start_broker(tmp_path))
    server = stop_later(ModbusServer({1: Image(hr=[7, 215])}))
    docs = device_docs("tank", server.port, 1, PROPS) + device_docs("dead", free_port(), 1,
                                                                    PROPS[:1])
    cfg = build_runtime_config(write_agent_file(tmp_path, broker.port, docs))
    cfg = dataclasses.replace(
        cfg, web=dataclasses.replace(cfg.web, users=(("admin", PASSWORD_HASH),),
                                     tokens=(TOKEN_HASH,)),
        # not the machine's pin: a datapath another test left there is no business here
        policy=dataclasses.replace(cfg.policy, pin_dir=str(tmp_path / "bpffs" / "edge")))
    agent = Agent(cfg)
    web = WebServer(agent, agent.history, cfg.web)
    stop = asyncio.Event()
    task = asyncio.create_task(agent.run(stop))
    async with TestClient(TestServer(web.app(), host="127.0.0.1")) as client:
        await asyncio.sleep(1.5)
        yield Running(agent, web, client)
    stop.set()
    await task


async def test_overview_devices_and_a_device_with_its_latest_reading_and_trend(
    running: Running
) -> None:
    o = await running.get("/api/v1/overview")
    assert o["agent"]["node"] == running.agent.cfg.node
    assert o["uplink"]["connected"] is True
    assert o["devices"] == {"total": 2, "online": 1, "offline": 1}
    assert o["host"]["rss_bytes"] > 0
    devices = {d["key"]: d for d in await running.get("/api/v1/devices")}
    assert devices["default/tank"]["state"] == "online"
    assert devices["default/dead"]["state"] == "offline"
    assert devices["default/dead"]["errors"]["connection_errors"] > 0
    tank = await running.get("/api/v1/devices/default/tank")
    assert tank["latest"]["values"] == {"level": 7, "temperature": 21.5}
    assert [p["name"] for p in tank["properties"]] == ["level", "temperature"]
    assert tank["twin"]["level"]["reported"]["value"] == 7
    assert set(tank["latest"]["times"]) == {"level", "temperature"}
    trend = await running.get("/api/v1/devices/default/tank/trend")
    ts, value = trend["level"][0]
    assert value == 7.0
    assert isinstance(ts, int)
    assert abs(ts - time.time() * 1000) < 60_000  # ms since the epoch, as everywhere
    later = await running.get(f"/api/v1/devices/default/tank/trend?since={ts}")
    assert later["level"] == [p for p in trend["level"] if p[0] > ts]
    missing = await running.get("/api/v1/devices/default/nope", 404)
    assert "no device 'default/nope'" in missing["error"]
    bad = await running.get("/api/v1/devices/default/tank/trend?since=soon", 400)
    assert bad["error"] == "since must be an integer, got 'soon'"


async def test_events_stats_config_and_versions(running: Running) -> None:
    events = await running.get("/api/v1/events")
    assert {"device_state"} <= {e["type"] for e in events}
    assert len(await running.get("/api/v1/events?limit=1")) == 1
    stats = await running.get("/api/v1/stats")
    assert stats["devices"]["default/tank"]["readings"] > 0
    cfg = await running.get("/api/v1/config")
    assert (cfg["version"], cfg["applied"]) == (running.agent.cfg.version, 0)
    assert await running.get("/api/v1/config/versions") == []  # no history before `edge run`
    await running.get("/api/v1/config/versions/3", 404)
    await running.get("/api/v1/config/diff?old=0", 400)


async def test_the_stream_sends_the_overview_events_and_the_device_s_readings(
    running: Running
) -> None:
    r = await running.client.get("/api/v1/stream?device=default/tank")
    assert r.headers["Content-Type"] == "text/event-stream"
    seen: dict[str, Any] = {}
    while len(seen) < 2:
        name = (await r.content.readline()).decode().strip()
        data = (await r.content.readline()).decode()
        await r.content.readline()
        seen[name.removeprefix("event: ")] = json.loads(data.removeprefix("data: "))
    r.close()
    assert seen["overview"]["devices"]["total"] == 2
    assert seen["reading"]["values"]["level"] == 7


async def test_health_and_readiness(running: Running) -> None:
    assert await running.get("/healthz") == {"status": "alive"}
    assert await running.get("/readyz") == {"ready": True, "reasons": []}
    running.agent.outbox.closed = True  # as after a failed store: not ready
    assert (await running.get("/readyz", 503))["reasons"] == ["the store is closed"]
    running.agent.outbox.closed = False


async def test_the_page_and_its_assets_are_served_by_the_agent(running: Running) -> None:
    page = await running.client.get("/")
    text = await page.text()
    assert page.status == 200
    assert '<script src="/static/app.js">' in text
    assert "http://" not in text  # nothing from the internet
    assert "https://" not in text
    assert '<link rel="icon" href="/static/favicon.svg"' in text  # no /favicon.ico 404
    for name, kind in (("app.js", "text/javascript"), ("app.css", "text/css"),
                       ("favicon.svg", "image/svg+xml")):
        r = await running.client.get(f"/static/{name}")
        assert (r.status, r.content_type) == (200, kind)
        assert "https://" not in await r.text()
    for name in ("../server.py", ".hidden.js", "nope.js", "recent.py"):
        assert (await running.client.get(f"/static/{name}")).status == 404


async def test_every_route_is_in_the_openapi_document(running: Running) -> None:
    doc = await running.get("/api/v1/openapi.json")
    assert doc == openapi()
    served = {info.get("formatter") or info.get("path")
              for r in running.web.app().router.routes()
              if (info := r.resource.get_info() if r.resource else {})}
    api = {p for p in served if p and p.startswith("/api/v1/")} - {
        "/api/v1/openapi.json", "/api/v1/stream"}
    assert api == set(doc["paths"])


async def test_metrics_are_served_in_the_prometheus_text_format(running: Running) -> None:
    r = await running.client.get("/metrics")
    assert r.status == 200
    assert r.headers["Content-Type"].startswith("text/plain; version=0.0.4")
    families = {f.name: f for f in text_string_to_metric_families(await r.text())}
    readings = {s.labels["device"]: s.value for s in families["edge_device_readings"].samples
                if s.name.endswith("_total")}
    assert readings["default/tank"] > 0


async def test_without_a_policy_the_policy_is_off(running: Running) -> None:
    """No policy configured (and no datapath pinned from before): nothing is loaded,
    nothing is counted; tests/test_web_policy.py has the other states."""
    assert await running.get("/api/v1/policy") == {
        "state": "off", "reason": "no policy is configured",
        "pin": running.agent.cfg.policy.pin_dir, "gen": None, "applied_ms": 0,
        "update_ms": 0.0, "updates": 0, "workloads": {}, "rules": [], "datapath": {},
        "drops": {}, "recent": []}
    r = await running.client.get("/metrics")
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for f in text_string_to_metric_families(await r.text()) for s in f.samples}
    policy = {k: v for k, v in samples.items() if k[0].startswith("edge_policy_")}
    assert policy == {
        ("edge_policy_enforced", ()): 0,
        ("edge_policy_state", (("state", "off"),)): 1,
        ("edge_policy_state", (("state", "enforced"),)): 0,
        ("edge_policy_state", (("state", "unenforced"),)): 0,
        ("edge_policy_updates_total", ()): 0,
        ("edge_policy_drops_total", (("verdict", "drop"),)): 0,
        ("edge_policy_drops_total", (("verdict", "would-drop"),)): 0,
        ("edge_policy_events_lost_total", ()): 0,
        ("edge_policy_update_seconds", ()): 0}


async def test_a_rollback_through_the_api_needs_a_login_with_its_csrf_token_or_a_token(
    running: Running, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, "edge.web.api")
    history = running.agent.history
    history.commit_baseline({"version": 0})
    # version 0 is the agent file: nothing of it is kept but the number, and says so
    only = await running.get("/api/v1/config/versions")
    assert [(v["version"], v["state"], v["devices"]) for v in only] == [(0, "committed", 2)]
    zero = await running.get("/api/v1/config/versions/0")
    assert zero["content"] == {"version": 0}
    assert zero["devices"] == 2  # it runs: the agent file's devices
    assert "agent file" in zero["note"]
    assert (await running.get("/api/v1/config/diff?old=0&new=0"))["lines"] == []
    history.add_pending(5, {"version": 5})
    history.commit(5)
    client = running.client
    assert (await client.post("/api/v1/config/rollback", json={})).status == 401
    login = await client.post("/api/v1/login", json={"user": "admin",
                                                     "password": "correct horse"})
    assert login.status == 200
    csrf = (await login.json())["csrf"]
    no_csrf = await client.post("/api/v1/config/rollback", json={})
    assert no_csrf.status == 403
    done = await client.post("/api/v1/config/rollback", json={},
                             headers={"X-CSRF-Token": csrf})
    assert (done.status, await done.json()) == (202, {"requested": None, "by": "admin"})
    assert history.take_requests() == [None]  # what the running agent takes within 1 s
    bad = await client.post("/api/v1/config/rollback", json={"version": 9},
                            headers={"X-CSRF-Token": csrf})
    assert (bad.status, (await bad.json())["error"]) == (404, "version 9 is not in the history")
    assert ("rollback to version 9 asked for by admin through the web API refused (404): "
            "version 9 is not in the history") in caplog.text
    client.session.cookie_jar.clear()
    by_token = await client.post("/api/v1/config/rollback", json={"version": 5},
                                 headers={"Authorization": f"Bearer {TOKEN}"})
    assert by_token.status == 202
    same = await client.post("/api/v1/config/rollback", json={"version": 0},
                             headers={"Authorization": f"Bearer {TOKEN}"})
    assert (same.status, (await same.json())["error"]) == (409, "version 0 is the running one")
    assert "refused (409): version 0 is the running one" in caplog.text
    assert f"asked for by token {TOKEN_HASH[7:15]}" in caplog.text
    wrong = await client.post("/api/v1/config/rollback", json={},
                              headers={"Authorization": "Bearer edge_wrong"})
    assert wrong.status == 401
    # the versions and their diff, as the config page shows them
    versions = await running.get("/api/v1/config/versions")
    assert [(v["version"], v["state"]) for v in versions] == [(0, "superseded"),
                                                              (5, "committed")]
    assert [v["devices"] for v in versions] == [2, 0]  # the agent here still runs 0
    diff = await running.get("/api/v1/config/diff?old=0&new=5")
    assert '-  "version": 0' in diff["lines"]


async def test_a_foreign_host_name_is_refused_and_answers_carry_the_security_headers(
    running: Running
) -> None:
    rebound = await running.client.get("/api/v1/config", headers={"Host": "evil.example"})
    assert rebound.status == 421  # DNS rebinding through the operator's browser
    ok = await running.client.get("/api/v1/config", headers={"Host": "localhost:8080"})
    assert ok.status == 200
    assert ok.headers["X-Frame-Options"] == "DENY"
    assert "default-src 'self'" in ok.headers["Content-Security-Policy"]


async def test_a_live_stream_ends_with_its_login(running: Running) -> None:
    running.web.auth.view = "login"  # nobody may look without logging in
    client = running.client
    login = await client.post("/api/v1/login", json={"user": "admin",
                                                     "password": "correct horse"})
    csrf = (await login.json())["csrf"]
    r = await client.get("/api/v1/stream")
    assert r.status == 200
    await r.content.readline()
    out = await client.post("/api/v1/logout", headers={"X-CSRF-Token": csrf})
    assert out.status == 204
    rest = await asyncio.wait_for(r.content.read(), timeout=5)  # the server ends it
    assert rest.count(b"event: overview") <= 2


async def test_what_the_page_keeps_of_a_removed_device_goes(running: Running) -> None:
    assert running.web.recent.latest("default/tank") is not None
    kept = [d for d in running.agent.cfg.devices if d.key != "default/tank"]
    await running.agent.apply_devices(dataclasses.replace(running.agent.cfg,
                                                          devices=tuple(kept)))
    await asyncio.sleep(2.5)  # the web server's once-a-second tick
    assert running.web.recent.latest("default/tank") is None
    assert running.web.recent.trend("default/tank") == {}


def test_the_latest_values_of_a_device_with_several_collect_cycles_are_merged() -> None:
    """A fast group (100 ms) and a slow one (1 s; a text and a number): the latest value
    of every property, each with its own time, and one trend point per property every
    2 s, whatever the other group does."""
    recent = Recent()
    seq = 0

    def read(ts: int, values: dict[str, Any], quality: dict[str, str] | None = None) -> None:
        nonlocal seq
        seq += 1
        recent.add(Reading("plant", "boiler", ts, seq, values, quality or {}))

    start = 1_700_000_000_000
    for i in range(100):  # 10 s
        ts = start + 100 * i
        read(ts, {"flow": 20.0 + i, "pump": True})
        if i % 10 == 3:
            read(ts + 1, {"serial": "SN-1", "hours": 1000 + i})
    latest = recent.latest("plant/boiler")
    assert latest is not None
    assert latest["values"] == {"flow": 119.0, "pump": True, "serial": "SN-1", "hours": 1093}
    assert latest["times"] == {"flow": start + 9900, "pump": start + 9900,
                               "serial": start + 9301, "hours": start + 9301}
    assert (latest["ts"], latest["seq"]) == (start + 9900, seq)
    assert "quality" not in latest
    trend = recent.trend("plant/boiler")
    assert set(trend) == {"flow", "pump", "hours"}
    # on a fixed 2 s schedule, each point from the first reading at most 250 ms early
    assert [p[0] - start for p in trend["flow"]] == [0, 1800, 3800, 5800, 7800, 9800]
    assert [p[0] - start for p in trend["hours"]] == [301, 2301, 4301, 6301, 8301]
    assert recent.trend("plant/boiler", since_ms=start + 6000) == {
        "flow": [[start + 7800, 98.0], [start + 9800, 118.0]],
        "pump": [[start + 7800, 1.0], [start + 9800, 1.0]],
        "hours": [[start + 6301, 1063.0], [start + 8301, 1083.0]]}
    # a failed read of one property: bad, without its old value, until read again
    read(start + 10_000, {"pump": False}, {"flow": "bad"})
    latest = recent.latest("plant/boiler")
    assert latest is not None
    assert latest["quality"] == {"flow": "bad"}
    assert "flow" not in latest["values"]
    assert latest["values"]["pump"] is False
    read(start + 10_100, {"flow": 5.0, "pump": False})
    latest = recent.latest("plant/boiler")
    assert latest is not None
    assert "quality" not in latest
    assert latest["values"]["flow"] == 5.0
    # a new definition without "hours" and "serial": they go
    recent.forget({"plant/boiler": frozenset({"flow", "pump"})})
    latest = recent.latest("plant/boiler")
    assert latest is not None
    assert set(latest["values"]) == {"flow", "pump"}
    assert set(recent.trend("plant/boiler")) == {"flow", "pump"}
    recent.forget(set())
    assert recent.latest("plant/boiler") is None


def test_a_trend_has_a_point_every_2_s_of_readings_every_second_that_jitter() -> None:
    recent = Recent()
    start = 1_700_000_000_000
    for k in range(60):
        jitter = (-3, 0, 2, -1)[k % 4]  # ms, as asyncio's timers are
        recent.add(Reading("default", "meter", start + 1000 * k + jitter, k, {"v": 230.0}))
    ts = [p[0] for p in recent.trend("default/meter")["v"]]
    gaps = {b - a for a, b in itertools.pairwise(ts)}
    assert len(ts) == 30
    assert all(abs(gap - TREND_STEP_MS) <= 5 for gap in gaps), sorted(gaps)
    # after a pause (the device was offline) the schedule starts again
    recent.add(Reading("default", "meter", start + 100_000, 60, {"v": 231.0}))
    recent.add(Reading("default", "meter", start + 101_000, 61, {"v": 231.0}))
    recent.add(Reading("default", "meter", start + 102_000, 62, {"v": 232.0}))
    assert recent.trend("default/meter", since_ms=start + 99_000)["v"] == [
        [start + 100_000, 231.0], [start + 102_000, 232.0]]


async def test_an_unknown_api_path_or_method_is_answered_in_json(running: Running) -> None:
    for path in ("/api/v1/nope", "/api/v1/devices/default", "/api/nope"):
        r = await running.client.get(path)
        assert (r.status, r.content_type) == (404, "application/json"), path
        assert (await r.json())["error"].startswith(f"no such path {path}")
        assert r.headers["X-Frame-Options"] == "DENY"
    r = await running.client.put("/api/v1/devices",
                                 headers={"Authorization": f"Bearer {TOKEN}"})
    assert (r.status, r.content_type, r.headers["Allow"]) == (405, "application/json",
                                                              "GET,HEAD")
    assert (await r.json()) == {
        "error": "PUT is not allowed on /api/v1/devices; allowed: GET, HEAD"}
    r = await running.client.get("/nope")  # not the API: aiohttp's own answer
    assert (r.status, r.content_type) == (404, "text/plain")


@pytest.fixture
def plugins(tmp_path: Path) -> None:
    """Two plugins in the agent's plugins.dir, for a ``running`` agent requested after
    this fixture: an echo, then one that always traps (its batches pass on)."""
    write_plugin(tmp_path / "plugins", "echo", ECHO, file="10-echo.yaml",
                 devices=["default/tank"])
    write_plugin(tmp_path / "plugins", "broken", TRAP, file="20-broken.yaml",
                 quarantine={"failures": 1000, "window": 60})


async def test_plugins_and_their_metrics(plugins: None, running: Running) -> None:
    answer = await running.get("/api/v1/plugins")
    assert answer["problems"] == []
    listed = answer["plugins"]
    assert [p["name"] for p in listed] == ["echo", "broken"]
    echo, broken = listed
    assert (echo["state"], echo["devices"], echo["errors"]) == ("running", ["default/tank"], 0)
    assert echo["calls"] > 0
    assert broken["traps"] == broken["calls"] == broken["passed"] > 0
    assert broken["last_error"].startswith("trap: trapped: wasm `unreachable`")
    tank = await running.get("/api/v1/devices/default/tank")
    assert tank["latest"]["values"] == {"level": 7, "temperature": 21.5}
    r = await running.client.get("/metrics")
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for f in text_string_to_metric_families(await r.text()) for s in f.samples}
    assert samples[("edge_plugin_calls_total", (("plugin", "echo"),))] > 0
    assert samples[("edge_plugin_failures_total", (("kind", "trap"), ("plugin", "broken")))] > 0
    assert samples[("edge_plugin_fallbacks_total", (("outcome", "passed"),
                                                    ("plugin", "broken")))] > 0
    assert samples[("edge_plugin_quarantined", (("plugin", "broken"),))] == 0
    assert samples[("edge_plugin_call_seconds_count", (("plugin", "echo"),))] > 0
    assert 0 < samples[("edge_plugin_call_seconds", (("plugin", "echo"), ("quantile", "0.5")))] \
        < 0.02


async def test_no_plugins_is_an_empty_list(running: Running) -> None:
    assert await running.get("/api/v1/plugins") == {"plugins": [], "problems": []}
