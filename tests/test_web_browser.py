"""The status page in a real headless Chromium (Debian's, driven by Playwright) against
a running agent (`edge run`) polling simulated devices (`edge simulate`) and a real
mosquitto. Screenshots of every page go to EDGE_TEST_ARTIFACTS (default
``test-artifacts/`` in the checkout) for a person to look at."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import threading
import time
from collections.abc import Iterator
from ipaddress import IPv4Network
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import StopLater
from policy_kernel import Probe, kernel
from support import (
    device_docs,
    free_port,
    start_broker,
    start_edge,
    wait_port,
    write_agent_file,
)

from edge.agent import Agent
from edge.config.runtime import build_runtime_config
from edge.policy.datapath import Datapath
from edge.policy.enforcer import Enforcer
from edge.policy.spec import NetworkPolicy, Peer, PolicySettings, PortSpec, Rule
from edge.policy.tables import compile_tables
from edge.web.auth import hash_password
from edge.web.server import WebServer

SHIPPED = Path(__file__).resolve().parent.parent / "plugins"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
playwright = pytest.importorskip("playwright.sync_api", reason="playwright is a test dependency")
pytestmark = pytest.mark.skipif(not Path(CHROMIUM).exists(),
                                reason="Debian's chromium is not installed (.ci/apt-packages)")
ARTIFACTS = Path(os.environ.get("EDGE_TEST_ARTIFACTS",
                                Path(__file__).resolve().parent.parent / "test-artifacts"))
PROPS = [
    {"name": "level", "type": "FLOAT", "collectCycle": 200, "minimum": 0, "maximum": 1000,
     "visitor": {"register": "HoldingRegister", "offset": 0, "limit": 2,
                 "dataType": "float32"}},
    {"name": "pump", "type": "BOOLEAN", "collectCycle": 200, "accessMode": "ReadWrite",
     "visitor": {"register": "CoilRegister", "offset": 0}},
]


@pytest.fixture
def page_url(tmp_path: Path, stop_later: StopLater) -> str:
    broker = stop_later(start_broker(tmp_path))
    modbus, web = free_port(), free_port()
    path = write_agent_file(tmp_path, broker.port,
                            device_docs("tank-1", modbus, 1, PROPS, namespace="plant"))
    agent: dict[str, Any] = yaml.safe_load(path.read_text())
    agent["web"] = {"listen": f"127.0.0.1:{web}",
                    "users": [{"name": "admin", "password_hash": hash_password("s3cret pw")}]}
    # no policy: off, whatever is pinned at the machine's /sys/fs/bpf/edge (not touched)
    agent["policy"] = {"pin_dir": str(tmp_path / "bpffs" / "edge")}
    path.write_text(yaml.safe_dump(agent))
    plugins = tmp_path / "plugins"  # the shipped derive, on the agent's plugins.dir
    plugins.mkdir()
    manifest = yaml.safe_load((SHIPPED / "derive/manifest.yaml").read_text())
    manifest.update(wasm=str(SHIPPED / "derive/derive.wasm"),
                    config={"outputs": [{"name": "level_m", "expr": "level / 100"}]})
    (plugins / "10-derive.yaml").write_text(yaml.safe_dump(manifest))
    stop_later(start_edge(["simulate", "-c", str(path), "--period", "20"], tmp_path,
                          name="simulate"))
    wait_port(modbus)
    stop_later(start_edge(["run", "-c", str(path)], tmp_path))
    wait_port(web)
    return f"http://127.0.0.1:{web}/"


@pytest.fixture
def browser() -> Iterator[Any]:
    with playwright.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield b
        b.close()


def shot(page: Any, name: str) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


def test_the_pages_show_live_values_without_a_reload_and_a_login_works(
    page_url: str, browser: Any
) -> None:
    page = browser.new_page(viewport={"width": 1100, "height": 800})
    missing: list[str] = []
    page.on("response", lambda r: missing.append(r.url) if r.status == 404 else None)
    # the first page of a cold browser: what counts is the content below, not "load"
    page.goto(page_url, wait_until="domcontentloaded", timeout=60_000)
    page.wait_for_selector("text=1 / 1 online", timeout=30_000)
    shot(page, "overview")
    page.evaluate("window.notReloaded = true")
    page.click("text=Devices")
    page.wait_for_selector("a[href='#/device/plant/tank-1']")
    shot(page, "devices")
    page.click("a[href='#/device/plant/tank-1']")
    cell = "td.value[data-prop='level']"
    page.wait_for_selector(cell)
    first = page.inner_text(cell)
    deadline = time.monotonic() + 10  # the SSE stream brings a new reading
    while page.inner_text(cell) == first and time.monotonic() < deadline:
        page.wait_for_timeout(200)
    assert page.inner_text(cell) != first
    assert page.evaluate("window.notReloaded") is True
    page.wait_for_selector("svg.trend polyline", timeout=10_000)
    shot(page, "device")
    page.click("text=Events")
    page.wait_for_selector("td:has-text('device_state')")
    shot(page, "events")
    page.click("text=Policy")
    page.wait_for_selector("#state:has-text('No policy configured')")
    assert "nothing is policed" in page.inner_text("#state")
    assert page.query_selector("#rules") is None
    shot(page, "policy-off")
    page.click("nav >> text=Plugins")
    page.wait_for_selector("td:has-text('derive 1.0.0')")
    page.wait_for_selector("td.online:has-text('running')")
    shot(page, "plugins")
    page.click("text=Config")
    page.fill("input[name=user]", "admin")
    page.fill("input[name=password]", "wrong")
    page.click("text=Log in to change things")
    page.wait_for_selector("#loginerr:has-text('wrong user name or password')", timeout=10_000)
    page.fill("input[name=password]", "s3cret pw")
    page.click("text=Log in to change things")
    page.wait_for_selector("text=logged in as admin", timeout=10_000)
    shot(page, "config")
    assert "s3cret" not in page.content()
    assert missing == []  # not even /favicon.ico


def test_a_failed_navigation_unknown_pages_the_header_login_and_a_lone_version(
    page_url: str, browser: Any
) -> None:
    page = browser.new_page(viewport={"width": 1100, "height": 800})
    page.goto(page_url)
    # the temperature card is there, with or without a temperature
    temperature = page.wait_for_selector(".card:has-text('Temperature')", timeout=15_000)
    if not Path("/sys/class/thermal/thermal_zone0/temp").exists():
        assert "not available on this machine" in temperature.inner_text()
    # a device, then one that is not there: its error stays, the first is not redrawn
    page.goto(page_url + "#/device/plant/tank-1")
    page.wait_for_selector("td.value[data-prop='level']", timeout=15_000)
    page.goto(page_url + "#/device/default/nope")
    page.wait_for_selector("text=no device 'default/nope' on this gateway")
    page.wait_for_timeout(3000)  # three stream periods
    assert page.query_selector("td.value") is None
    assert "no device 'default/nope' on this gateway" in page.inner_text("#view")
    # #devices is #/devices; an unknown page says so, with the pages
    page.goto(page_url + "#devices")
    page.wait_for_selector("a[href='#/device/plant/tank-1']")
    assert page.inner_text("nav a.on") == "Devices"
    page.goto(page_url + "#/nonsense")
    page.wait_for_selector("text=No such page")
    assert page.query_selector("#view a[href='#/config']") is not None
    assert page.query_selector("nav a.on") is None
    shot(page, "no-such-page")
    # the header's Log in, from any page; Log out
    page.goto(page_url + "#/events")
    page.wait_for_selector("td:has-text('device_state')")
    page.click("#loginlink:has-text('Log in')")
    page.fill("input[name=user]", "admin")
    page.fill("input[name=password]", "s3cret pw")
    page.click("form#login button")
    page.wait_for_selector("text=logged in as admin", timeout=10_000)
    page.wait_for_selector("td:has-text('device_state')")  # back on the page it was on
    # only version 0 (the agent file): nothing to roll back to, and a diff of nothing
    page.click("text=Config")
    page.wait_for_selector("text=Nothing to roll back to (only one version).")
    assert page.query_selector("button[data-v]") is None
    assert "agent file (1)" in page.inner_text("table")
    page.click("#diff")
    page.wait_for_selector("#lines:has-text('no differences (the same version)')")
    shot(page, "config-only-version-0")
    page.click("#loginlink:has-text('Log out')")
    page.wait_for_selector("#loginlink:has-text('Log in')")


def test_the_page_fits_a_phone(page_url: str, browser: Any) -> None:
    page = browser.new_page(viewport={"width": 390, "height": 844}, is_mobile=True)
    page.goto(page_url + "#/device/plant/tank-1")
    page.wait_for_selector("td.value[data-prop='level']", timeout=15_000)
    width = page.evaluate("document.documentElement.scrollWidth")
    assert width <= 390  # no sideways scrolling of the page itself (tables scroll inside)
    shot(page, "phone-device")


@contextlib.contextmanager
def agent_in_a_thread(path: Path, policy: Enforcer) -> Iterator[str]:
    """The agent of the agent file ``path`` with ``policy`` as its network policy, and
    its web server, in this process (in a thread with its own event loop, while the
    browser is driven from this one); the page's URL."""
    cfg = build_runtime_config(path)
    loop = asyncio.new_event_loop()
    stop = asyncio.Event()
    failed: list[BaseException] = []

    async def main() -> None:
        agent = Agent(cfg)
        agent.policy = policy
        agent.services.append(WebServer(agent, agent.history, cfg.web).run)
        await agent.run(stop)

    def run() -> None:
        try:
            loop.run_until_complete(main())
        except BaseException as e:
            failed.append(e)
        finally:  # as asyncio.run ends: what is left (the pages' live streams) cancelled
            left = asyncio.all_tasks(loop)
            for task in left:
                task.cancel()
            loop.run_until_complete(asyncio.gather(*left, return_exceptions=True))
            loop.close()

    thread = threading.Thread(target=run, name="agent")
    thread.start()
    try:
        wait_port(cfg.web.port)
        yield f"http://127.0.0.1:{cfg.web.port}/"
    finally:
        loop.call_soon_threadsafe(stop.set)
        thread.join(30)
    assert not failed, failed


def test_the_policy_page_shows_the_kernel_s_counters_and_drops_live(
    tmp_path: Path, stop_later: StopLater, browser: Any
) -> None:
    """A policy enforced in the real kernel (tests/policy_kernel.py), probes in its
    workloads' cgroups connecting to 127.0.0.1 (allowed, dropped, audited): the page
    shows the state, the rules with their counters and the drops, on a phone too; when
    the datapath is removed it says, without a reload, that nothing is enforced."""
    broker = stop_later(start_broker(tmp_path))
    path = write_agent_file(tmp_path, broker.port, [])
    with kernel(tmp_path) as k:
        server = stop_later(Probe(None))  # listens, in this test's own cgroup (not policed)
        enforced = stop_later(Probe(k.root / k.cgroup("plc-gateway")))
        audited = stop_later(Probe(k.root / k.cgroup("historian")))
        allowed = server.ask(op="listen", proto="tcp", host="127.0.0.1")["port"]
        denied = server.ask(op="listen", proto="tcp", host="127.0.0.1")["port"]
        loopback = (Peer(IPv4Network("127.0.0.1/32")),)
        settings = PolicySettings("enforce", (
            NetworkPolicy("plc", f"{k.base}/plc-gateway",
                          egress=(Rule(loopback, (PortSpec("TCP", allowed),)),)),
            NetworkPolicy("historian", f"{k.base}/historian", mode="audit",
                          egress=(Rule(loopback, (PortSpec("TCP", allowed),)),)),
        ), failsafe=(), pin_dir=str(k.pin))
        k.dp.apply(compile_tables(settings))  # attached below the harness's base cgroup
        with agent_in_a_thread(path, Enforcer(settings)) as url:
            assert "ok" in enforced.ask(op="tcp", host="127.0.0.1", port=allowed, size=3000)
            assert "error" in enforced.ask(op="tcp", host="127.0.0.1", port=denied,
                                           timeout=0.5)
            assert "ok" in audited.ask(op="tcp", host="127.0.0.1", port=denied)
            page = browser.new_page(viewport={"width": 1100, "height": 800})
            page.goto(url + "#/policy")
            page.wait_for_selector("#state:has-text('Enforced')", timeout=15_000)
            page.wait_for_selector("#drops .verdict.drop", timeout=10_000)
            page.wait_for_selector("#drops .verdict.would-drop")
            assert "2 policies: plc (enforce), historian (audit), 6 rules" in page.inner_text(
                "#state")
            assert page.inner_text("#drops .verdict.drop") == "dropped"
            assert page.inner_text("#drops .verdict.would-drop") == "would drop (audit)"
            rows = page.query_selector_all("#rules tr")
            assert len(rows) == 7  # the header, then the rules in match order
            first = [c.inner_text() for c in rows[1].query_selector_all("td")]
            assert first[:4] == ["1", "allow", "egress", "enforce"]
            assert int(first[4].replace(",", "")) > 0  # the kernel's packets
            assert "policy 'plc' egress[0].ports[0]" in first[6]
            assert "audit" in page.inner_text("#rules")
            assert "not running" not in page.inner_text("#workloads")
            shot(page, "policy-enforced")
            phone = browser.new_page(viewport={"width": 390, "height": 844}, is_mobile=True)
            phone.goto(url + "#/policy")
            phone.wait_for_selector("#drops .verdict.drop", timeout=15_000)
            assert phone.evaluate("document.documentElement.scrollWidth") <= 390
            shot(phone, "phone-policy")
            page.evaluate("window.notReloaded = true")
            Datapath.remove(k.pin)  # edge policy remove: the agent sees it within a second
            page.wait_for_selector("#state.alert:has-text('NOT enforced')", timeout=10_000)
            assert "the datapath was removed" in page.inner_text("#state")
            assert page.evaluate("window.notReloaded") is True
            assert page.inner_text("#rules tr:nth-child(2) td.num") == "–"  # not counted now
            shot(page, "policy-unenforced")
