"""``/metrics``: a real agent (Modbus server, mosquitto) scraped over HTTP, parsed with
the Prometheus client's own parser; and the mapping of every stats field."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from conftest import StopLater
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample
from support import (
    LEVEL,
    Image,
    ModbusServer,
    device_docs,
    free_port,
    start_broker,
    write_agent_file,
)

from edge import __version__
from edge.agent import Agent
from edge.config.runtime import build_runtime_config
from edge.modbus.poller import LATENCY_BOUNDS_S, DeviceStats
from edge.web.metrics import AgentCollector, metrics_handler, registry_for

FAMILIES = {
    "edge_device_readings": ("counter", {"device"}),
    "edge_device_points": ("counter", {"device"}),
    "edge_device_poll_duration_seconds": ("histogram", {"device"}),
    "edge_modbus_requests": ("counter", {"device"}),
    "edge_modbus_errors": ("counter", {"device", "kind"}),
    "edge_device_up": ("gauge", {"device"}),
    "edge_device_breaker_open": ("gauge", {"device"}),
    "edge_outbox_rows": ("gauge", set()),
    "edge_outbox_bytes": ("gauge", set()),
    "edge_outbox_oldest_age_seconds": ("gauge", set()),
    "edge_outbox_dropped": ("counter", {"reason"}),
    "edge_mqtt_connected": ("gauge", set()),
    "edge_mqtt_reconnects": ("counter", set()),
    "edge_mqtt_published": ("counter", set()),
    "edge_mqtt_acked": ("counter", set()),
    "edge_mqtt_inflight": ("gauge", set()),
    "edge_config_info": ("gauge", {"version"}),
    "edge_config_applied_version": ("gauge", set()),
    "edge_config_events": ("counter", {"kind"}),
    "edge_config_rollbacks": ("counter", set()),
    "edge_policy_enforced": ("gauge", set()),
    "edge_policy_state": ("gauge", {"state"}),
    "edge_policy_updates": ("counter", set()),
    "edge_policy_drops": ("counter", {"verdict"}),
    "edge_policy_events_lost": ("counter", set()),
    "edge_policy_update_seconds": ("gauge", set()),
    "edge_agent_info": ("gauge", {"version"}),
    "process_cpu_seconds": ("counter", set()),
    "process_resident_memory_bytes": ("gauge", set()),
}
"""Family name (as the parser names it: counters without ``_total``) -> type, labels."""

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def samples(text: str) -> tuple[dict[str, Any], Samples]:
    """The families by name, and every sample's value by (sample name, labels)."""
    families = {f.name: f for f in text_string_to_metric_families(text)}
    values = {(s.name, frozenset(s.labels.items())): s.value
              for f in families.values() for s in f.samples}
    return families, values


def value(values: Samples, name: str, **labels: str) -> float:
    return values[name, frozenset(labels.items())]


def buckets(fam_samples: Iterable[Sample], device: str) -> list[tuple[float, float]]:
    """(le, cumulative count) of one device's histogram, in the order exported."""
    return [(float(s.labels["le"]), s.value) for s in fam_samples
            if s.name.endswith("_bucket") and s.labels["device"] == device]


@pytest.mark.parametrize(("duration_s", "bucket"), [
    (0.0, 0), (0.005, 0), (0.0051, 1), (0.01, 1), (0.099, 4), (0.1, 4), (1.0, 7),
    (10.0, 10), (10.001, 11), (3600.0, 11),
])
def test_a_cycle_falls_in_the_first_bucket_whose_bound_it_does_not_exceed(
    duration_s: float, bucket: int
) -> None:
    st = DeviceStats()
    st.count_cycle(duration_s)
    st.count_cycle(0.002)
    expected = [0] * (len(LATENCY_BOUNDS_S) + 1)
    expected[bucket] += 1
    expected[0] += 1
    assert st.latency_buckets == expected
    assert st.cycles == 2
    assert st.latency_sum_s == pytest.approx(duration_s + 0.002)
    assert st.last_latency_ms == pytest.approx(2.0)


def test_every_stats_field_lands_in_its_own_metric() -> None:
    dev = DeviceStats(readings=6, points=11, requests=40, timeouts=1, exceptions=2,
                      frame_errors=3, connection_errors=4, decode_errors=5,
                      state="unknown", breaker="half_open")
    for d in (0.001, 0.02, 0.03, 20.0):
        dev.count_cycle(d)
    stats = {
        "devices": {"ns/a": dataclasses.asdict(dev),
                    "ns/b": dataclasses.asdict(DeviceStats(state="online"))},
        "outbox": {"rows": 3, "bytes": 300, "oldest_age_s": 1.5,
                   "dropped": {"ttl": 2, "something_new": 1}},
        "uplink": {"connected": False, "reconnects": 2, "inflight": 1, "published": 9,
                   "acked": 8},
        "config": {"version": "abc123", "applied": 7,
                   "events": {"config_rolled_back": 2, "config_applied": 3}},
        "plugins": {"units": {"calls": 10, "errors": 1, "traps": 2, "timeouts": 3,
                              "passed": 4, "dropped": 5, "state": "quarantined",
                              "time_s": 0.25, "p50_us": 20.0, "p99_us": 90.0},
                    "missing": {"state": "not loaded", "load_error": "no such file"}},
    }
    registry = CollectorRegistry()
    registry.register(AgentCollector(lambda: stats))
    families, v = samples(generate_latest(registry).decode())

    assert value(v, "edge_device_readings_total", device="ns/a") == 6
    assert value(v, "edge_device_points_total", device="ns/a") == 11
    assert value(v, "edge_modbus_requests_total", device="ns/a") == 40
    errors = {k: value(v, "edge_modbus_errors_total", device="ns/a", kind=k)
              for k in ("timeout", "exception", "frame", "connection", "decode")}
    assert errors == {"timeout": 1, "exception": 2, "frame": 3, "connection": 4, "decode": 5}
    assert value(v, "edge_device_up", device="ns/a") == 0
    assert value(v, "edge_device_up", device="ns/b") == 1
    assert value(v, "edge_device_breaker_open", device="ns/a") == 1
    assert value(v, "edge_device_breaker_open", device="ns/b") == 0
    hist = families["edge_device_poll_duration_seconds"].samples
    assert buckets(hist, "ns/a") == [
        (0.005, 1), (0.01, 1), (0.025, 2), (0.05, 3), (0.1, 3), (0.25, 3), (0.5, 3),
        (1.0, 3), (2.5, 3), (5.0, 3), (10.0, 3), (float("inf"), 4)]
    assert value(v, "edge_device_poll_duration_seconds_count", device="ns/a") == 4
    assert value(v, "edge_device_poll_duration_seconds_sum", device="ns/a") == pytest.approx(
        20.051)

    assert value(v, "edge_outbox_rows") == 3
    assert value(v, "edge_outbox_bytes") == 300
    assert value(v, "edge_outbox_oldest_age_seconds") == 1.5
    dropped = {r: value(v, "edge_outbox_dropped_total", reason=r)
               for r in ("max_bytes", "ttl", "disk_full", "corrupt", "something_new")}
    assert dropped == {"max_bytes": 0, "ttl": 2, "disk_full": 0, "corrupt": 0,
                       "something_new": 1}

    assert value(v, "edge_mqtt_connected") == 0
    assert value(v, "edge_mqtt_reconnects_total") == 2
    assert value(v, "edge_mqtt_inflight") == 1
    assert value(v, "edge_mqtt_published_total") == 9
    assert value(v, "edge_mqtt_acked_total") == 8

    assert value(v, "edge_config_info", version="abc123") == 1
    assert value(v, "edge_config_applied_version") == 7
    events = {k: value(v, "edge_config_events_total", kind=k) for k in (
        "config_applied", "config_committed", "config_rolled_back", "config_refused")}
    assert events == {"config_applied": 3, "config_committed": 0, "config_rolled_back": 2,
                      "config_refused": 0}
    assert value(v, "edge_config_rollbacks_total") == 2

    assert value(v, "edge_plugin_calls_total", plugin="units") == 10
    failures = {k: value(v, "edge_plugin_failures_total", plugin="units", kind=k)
                for k in ("error", "trap", "timeout")}
    assert failures == {"error": 1, "trap": 2, "timeout": 3}
    assert value(v, "edge_plugin_fallbacks_total", plugin="units", outcome="passed") == 4
    assert value(v, "edge_plugin_fallbacks_total", plugin="units", outcome="dropped") == 5
    assert value(v, "edge_plugin_quarantined", plugin="units") == 1
    assert value(v, "edge_plugin_call_seconds", plugin="units", quantile="0.5") == 20e-6
    assert value(v, "edge_plugin_call_seconds", plugin="units", quantile="0.99") == 90e-6
    assert value(v, "edge_plugin_call_seconds_count", plugin="units") == 10
    assert value(v, "edge_plugin_call_seconds_sum", plugin="units") == 0.25
    assert not any(k[0].startswith("edge_plugin") and ("plugin", "missing") in k[1]
                   for k in v)  # never loaded: nothing counted
    assert value(v, "edge_agent_info", version=__version__) == 1


def test_every_policy_status_field_lands_in_its_own_metric() -> None:
    rule = {"where": "", "what": "", "enforce": True, "direction": "egress",
            "workload": None}
    status: dict[str, Any] = {
        "state": "enforced", "reason": "", "pin": "/sys/fs/bpf/edge", "gen": 1,
        "applied_ms": 1,
        "update_ms": 12.5, "updates": 3, "workloads": {"system.slice/edge.service": 7},
        "rules": [rule | {"id": 1, "policy": None, "section": "failsafe",
                          "action": "allow", "packets": 10, "bytes": 1000},
                  rule | {"id": 2, "policy": "agent", "section": "default",
                          "action": "deny", "packets": 2, "bytes": 120}],
        "datapath": {"events_lost": 4, "unmatched": 0, "unparsed": 0},
        "drops": {"drop": 2, "something_new": 1}, "recent": []}
    stats = {"devices": {}, "outbox": {"rows": 0, "bytes": 0, "oldest_age_s": 0,
                                       "dropped": {}},
             "uplink": {"connected": True, "reconnects": 0, "inflight": 0, "published": 0,
                        "acked": 0},
             "config": {"version": "abc", "applied": 0, "events": {}}, "plugins": {}}
    registry = CollectorRegistry()
    registry.register(AgentCollector(lambda: stats, lambda: status))
    families, v = samples(generate_latest(registry).decode())
    assert value(v, "edge_policy_enforced") == 1
    assert {s: value(v, "edge_policy_state", state=s) for s in (
        "off", "enforced", "unenforced")} == {"off": 0, "enforced": 1, "unenforced": 0}
    failsafe = {"rule": "1", "policy": "", "section": "failsafe", "action": "allow"}
    deny = {"rule": "2", "policy": "agent", "section": "default", "action": "deny"}
    assert value(v, "edge_policy_rule_packets_total", **failsafe) == 10
    assert value(v, "edge_policy_rule_bytes_total", **failsafe) == 1000
    assert value(v, "edge_policy_rule_packets_total", **deny) == 2
    assert value(v, "edge_policy_rule_bytes_total", **deny) == 120
    assert families["edge_policy_rule_packets"].type == "counter"
    assert "zeroed whenever the policy is applied again" in families[
        "edge_policy_rule_packets"].documentation
    assert value(v, "edge_policy_updates_total") == 3
    assert {k: value(v, "edge_policy_drops_total", verdict=k) for k in (
        "drop", "would-drop", "something_new")} == {"drop": 2, "would-drop": 0,
                                                    "something_new": 1}
    assert value(v, "edge_policy_events_lost_total") == 4
    assert value(v, "edge_policy_update_seconds") == 0.0125
    # not in the kernel (the datapath was removed, or never loaded): no rule counters
    status["state"] = "unenforced"
    _, v = samples(generate_latest(registry).decode())
    assert value(v, "edge_policy_enforced") == 0
    assert value(v, "edge_policy_state", state="unenforced") == 1
    assert not any(name.startswith("edge_policy_rule_") for name, _ in v)


async def test_a_running_agent_scraped_twice(tmp_path: Path, stop_later: StopLater) -> None:
    broker = stop_later(start_broker(tmp_path))
    server = stop_later(ModbusServer({1: Image(hr=[5, 7])}))
    good = device_docs("meter", server.port, 1, [
        {"name": name, "type": "INT", "collectCycle": 100,
         "visitor": {"register": "HoldingRegister", "offset": offset, "dataType": "int16"}}
        for offset, name in enumerate(("level", "flow"))])
    dead = device_docs("gone", free_port(), 1, LEVEL)  # nothing listens there
    agent = Agent(build_runtime_config(write_agent_file(tmp_path, broker.port, good + dead)))
    app = web.Application()
    app.router.add_get("/metrics", metrics_handler(registry_for(agent)))
    stop_event = asyncio.Event()
    task = asyncio.create_task(agent.run(stop_event))
    try:
        async with TestClient(TestServer(app)) as client:

            async def scrape() -> tuple[dict[str, Any], Samples]:
                resp = await client.get("/metrics")
                assert resp.status == 200
                assert resp.headers["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
                return samples(await resp.text())

            await asyncio.sleep(1.0)
            _, first = await scrape()
            await asyncio.sleep(1.0)
            families, second = await scrape()
            stop_event.set()
            await task
            _, last = await scrape()  # polling has stopped: the counts hold still
    finally:
        stop_event.set()
        await asyncio.gather(task, return_exceptions=True)

    for name, (kind, labels) in FAMILIES.items():
        assert name in families, name
        assert families[name].type == kind, name
        for s in families[name].samples:
            assert set(s.labels) - {"le"} == labels, (name, s)
    meter, gone = "default/meter", "default/gone"
    for name in ("edge_device_readings_total", "edge_device_points_total",
                 "edge_modbus_requests_total"):
        assert value(second, name, device=meter) > value(first, name, device=meter) > 0, name
    for name in ("edge_mqtt_published_total", "edge_mqtt_acked_total"):
        assert value(second, name) > value(first, name) > 0, name
    assert value(second, "edge_mqtt_connected") == 1
    assert value(second, "edge_config_info", version=agent.cfg.version) == 1
    assert value(second, "edge_agent_info", version=__version__) == 1
    assert value(second, "process_resident_memory_bytes") > 0

    stats = agent.pollers[meter].stats
    assert value(last, "edge_device_readings_total", device=meter) == stats.readings
    assert value(last, "edge_device_points_total", device=meter) == 2 * stats.readings
    hist = buckets(families["edge_device_poll_duration_seconds"].samples, meter)
    assert [le for le, _ in hist] == [*LATENCY_BOUNDS_S, float("inf")]
    counts = [n for _, n in hist]
    assert counts == sorted(counts)  # cumulative
    assert counts[-1] == value(second, "edge_device_poll_duration_seconds_count", device=meter)
    assert value(last, "edge_device_poll_duration_seconds_count", device=meter) == stats.cycles
    assert value(second, "edge_device_up", device=meter) == 1
    assert value(second, "edge_device_breaker_open", device=meter) == 0
    assert value(second, "edge_modbus_errors_total", device=meter, kind="connection") == 0

    assert value(second, "edge_modbus_errors_total", device=gone, kind="connection") > 0
    assert value(second, "edge_device_up", device=gone) == 0
    assert value(second, "edge_device_breaker_open", device=gone) == 1
    assert value(second, "edge_device_readings_total", device=gone) == 0
