"""The forwarder in-process: outbox file → real mosquitto, paced, in order, on a full disk."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import StopLater
from support import (
    Image,
    ModbusServer,
    Subscriber,
    device_docs,
    start_broker,
    write_agent_file,
)

from edge.agent import Agent
from edge.config.runtime import build_runtime_config
from edge.store.outbox import NewMessage, Outbox
from edge.uplink.client import BrokerClient
from edge.uplink.forwarder import Forwarder
from edge.uplink.payload import now_ms
from edge.uplink.settings import BrokerSettings, ForwardSettings

EVENTS = "e/events"


def reading(i: int, size: int = 200) -> NewMessage:
    body = json.dumps({"device": "a", "seq": i, "pad": "x" * size}).encode()
    return NewMessage("e/telemetry/ns/a", body, 1, now_ms() + i, "ns/a", i)


def forwarder(box: Outbox, port: int, **settings: float) -> Forwarder:
    client = BrokerClient(BrokerSettings("127.0.0.1", port, client_id=f"fw-{port}",
                                         reconnect_min_s=0.1, reconnect_max_s=0.2))
    fw = Forwarder(box, client, events_topic=EVENTS,
                   settings=ForwardSettings(**settings))  # type: ignore[arg-type]
    fw.start()
    client.start()
    return fw


def stop(fw: Forwarder) -> None:
    fw.stop(1.0)
    fw.client.stop()


def seqs(sub: Subscriber) -> list[int]:
    return [json.loads(m.payload)["seq"] for m in sub.messages if "/telemetry/" in m.topic]


def test_a_backlog_drains_paced_in_order_and_live_messages_follow_it(
    tmp_path: Path, stop_later: StopLater
) -> None:
    box = Outbox(tmp_path / "o.db", max_bytes=64 << 20, ttl_ms=3_600_000)
    box.write([reading(i) for i in range(1, 1001)], [], keep=frozenset())
    broker = stop_later(start_broker(tmp_path))
    sub = stop_later(Subscriber(broker.port, "e/#"))
    fw = forwarder(box, broker.port, rate=250.0, inflight=20)
    started = time.monotonic()
    most_inflight = 0
    for i in range(1001, 1011):  # live readings arrive while the backlog drains
        fw.submit(reading(i))
        most_inflight = max(most_inflight, fw.inflight)
        time.sleep(0.05)
    sub.wait_for(lambda m: json.loads(m.payload).get("seq") == 1010, timeout=20)
    elapsed = time.monotonic() - started
    stop(fw)
    assert seqs(sub) == list(range(1, 1011))  # once each, in order, backlog first
    # 1010 messages at 250/s with a burst of 20 cannot take less than ~3.96 s
    assert elapsed >= (1010 - 20) / 250 * 0.95
    assert most_inflight <= 20
    assert fw.stats.read_back >= 1000 - 20
    again = Outbox(tmp_path / "o.db", max_bytes=64 << 20, ttl_ms=3_600_000)
    assert again.stats.rows == 0


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs to fill needs root")
    mnt = tmp_path / "small"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mnt)], check=True)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_a_full_disk_drops_the_oldest_reports_it_and_delivers_the_rest(
    small_disk: Path, tmp_path: Path, stop_later: StopLater
) -> None:
    box = Outbox(small_disk / "o.db", max_bytes=64 << 20, ttl_ms=3_600_000,
                 reserve_bytes=1 << 20)
    persist = tmp_path / "mosquitto"
    persist.mkdir()
    broker = start_broker(tmp_path, persist=persist)
    sub = stop_later(Subscriber(broker.port, "e/#", persistent=True))
    broker.stop()  # the subscriber's session waits in the broker's file
    port = broker.port  # an outage that outgrows the disk
    fw = forwarder(box, port)
    n = 3000
    for i in range(1, n + 1):
        fw.submit(reading(i, size=1500))
        if i % 100 == 0:
            time.sleep(0.01)
    deadline = time.monotonic() + 15
    while box.stats.committed + sum(box.stats.dropped.values()) < n:
        assert time.monotonic() < deadline, (box.stats, fw.stats)
        time.sleep(0.1)
    assert fw._thread.is_alive()
    dropped = box.stats.dropped["disk_full"]
    assert dropped > 0
    stop_later(start_broker(tmp_path, port=port, persist=persist))
    try:
        sub.wait_for(lambda m: json.loads(m.payload).get("seq") == n, timeout=20)
    except TimeoutError:
        raise AssertionError((box.stats, fw.stats, fw._next_id, box.end_id, len(seqs(sub)))) from None
    time.sleep(6)  # one drop report per 5 s
    stop(fw)
    got = seqs(sub)
    assert got == sorted(set(got))  # in order, once each
    assert len(got) == n - dropped
    assert got[-1] == n  # the oldest were dropped, not the newest
    events = [json.loads(m.payload) for m in sub.messages if m.topic == EVENTS]
    assert any(e["type"] == "store_full" and e["state"] == "full" for e in events)
    reports = [e for e in events if e["type"] == "outbox_dropped"]
    assert {e["reason"] for e in reports} == {"disk_full"}
    assert sum(e["count"] for e in reports) == dropped == reports[-1]["total"]


async def test_agent_stats_show_the_outbox_uplink_and_devices(
    tmp_path: Path, stop_later: StopLater
) -> None:
    broker = stop_later(start_broker(tmp_path))
    server = stop_later(ModbusServer({1: Image(hr=[5])}))
    docs = device_docs("meter", server.port, 1, [
        {"name": "level", "type": "INT", "collectCycle": 100,
         "visitor": {"register": "HoldingRegister", "offset": 0, "dataType": "int16"}}])
    agent = Agent(build_runtime_config(write_agent_file(tmp_path, broker.port, docs)))
    stop_event = asyncio.Event()
    task = asyncio.create_task(agent.run(stop_event))
    await asyncio.sleep(2.5)
    s = agent.stats()
    stop_event.set()
    await task
    assert s["uplink"]["connected"] is True
    assert s["uplink"]["acked"] >= 15
    assert s["uplink"]["publish_rate"] > 0
    assert s["outbox"]["committed"] >= s["uplink"]["acked"] - 5
    assert s["outbox"]["rows"] <= 5
    assert s["outbox"]["dropped"] == {}
    dev = s["devices"]["default/meter"]
    assert dev["state"] == "online"
    assert dev["readings"] >= 15
    json.dumps(s)  # plain values only
