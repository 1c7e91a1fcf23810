"""The forwarder in-process: outbox file → real mosquitto, paced, in order, on a full disk."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

from conftest import StopLater
from support import (
    Image,
    ModbusServer,
    Subscriber,
    device_docs,
    start_broker,
    start_faultproxy,
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


def reading(i: int, size: int = 200, device: str = "a") -> NewMessage:
    body = json.dumps({"device": device, "seq": i, "pad": "x" * size}).encode()
    return NewMessage(f"e/telemetry/ns/{device}", body, 1, now_ms() + i, f"ns/{device}", i)


def forwarder(box: Outbox, port: int, **settings: object) -> Forwarder:
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


def seqs(sub: Subscriber, device: str = "a") -> list[int]:
    return [json.loads(m.payload)["seq"] for m in sub.messages
            if m.topic == f"e/telemetry/ns/{device}"]


def test_a_backlog_drains_paced_and_in_order(tmp_path: Path, stop_later: StopLater) -> None:
    box = Outbox(tmp_path / "o.db", max_bytes=64 << 20, ttl_ms=3_600_000)
    box.write([reading(i) for i in range(1, 1001)], [], keep=frozenset())
    broker = stop_later(start_broker(tmp_path))
    sub = stop_later(Subscriber(broker.port, "e/#"))
    fw = forwarder(box, broker.port, rate=250.0, inflight=20)
    started = time.monotonic()
    most_inflight = 0
    while not seqs(sub) or seqs(sub)[-1] != 1000:
        most_inflight = max(most_inflight, fw.inflight)
        assert time.monotonic() - started < 20
        time.sleep(0.01)
    elapsed = time.monotonic() - started
    stop(fw)
    assert seqs(sub) == list(range(1, 1001))
    # 1000 messages at 250/s with a burst of 20 cannot take less than ~3.9 s
    assert elapsed >= (1000 - 20) / 250 * 0.95
    assert most_inflight <= 20
    assert Outbox(tmp_path / "o.db", max_bytes=64 << 20, ttl_ms=3_600_000).stats.rows == 0


def test_live_readings_overtake_other_devices_backlog_never_their_own(
    tmp_path: Path, stop_later: StopLater
) -> None:
    box = Outbox(tmp_path / "o.db", max_bytes=64 << 20, ttl_ms=3_600_000)
    box.write([reading(i, device=d) for i in range(1, 501) for d in ("a", "c")], [],
              keep=frozenset())
    broker = stop_later(start_broker(tmp_path))
    sub = stop_later(Subscriber(broker.port, "e/#"))
    fw = forwarder(box, broker.port, rate=100.0, inflight=20)  # the backlog takes ~10 s
    time.sleep(0.5)
    delays = []
    for i in range(1, 6):  # live readings of a device with no backlog: at once
        fw.submit(reading(i, device="b"))
        t = time.monotonic()
        sub.wait_for(lambda m, i=i: m.topic == "e/telemetry/ns/b"
                     and json.loads(m.payload)["seq"] == i, timeout=5)
        delays.append(time.monotonic() - t)
    fw.submit(reading(501, device="a"))  # live, after a's backlog: pulls it forward
    sub.wait_for(lambda m: json.loads(m.payload).get("seq") == 501, timeout=5)
    assert len(seqs(sub, "c")) < 450  # c's backlog is still draining, paced
    sub.wait_for(lambda m: m.topic == "e/telemetry/ns/c"
                 and json.loads(m.payload)["seq"] == 500, timeout=20)
    stop(fw)
    assert max(delays) < 1.0  # not behind ~10 s of other devices' backlog
    assert seqs(sub, "a") == list(range(1, 502))  # each device in order, once
    assert seqs(sub, "b") == list(range(1, 6))
    assert seqs(sub, "c") == list(range(1, 501))


def test_a_backlog_leaves_a_quarter_of_the_window_to_live_readings(
    tmp_path: Path, stop_later: StopLater
) -> None:
    box = Outbox(tmp_path / "o.db", max_bytes=64 << 20, ttl_ms=3_600_000)
    box.write([reading(i) for i in range(1, 301)], [], keep=frozenset())
    broker = stop_later(start_broker(tmp_path))
    proxy = stop_later(start_faultproxy(broker.port))
    # every PUBACK (and the CONNACK) comes 1.5 s late: the window fills and stays full
    assert proxy.control('{"mode": "delay", "ms": 1500, "direction": "down"}')[0]["ok"]
    fw = forwarder(box, proxy.port, rate=10_000.0, inflight=20, order="live")
    deadline = time.monotonic() + 5
    while fw.inflight < 15:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    time.sleep(0.2)
    assert fw.inflight == 15  # the backlog's share: 20 - 20 // 4
    fw.submit(reading(1, device="b"))
    deadline = time.monotonic() + 1
    while fw.inflight == 15:
        assert time.monotonic() < deadline, "the live reading waited for the backlog's acks"
        time.sleep(0.01)
    assert fw.inflight == 16
    assert fw.stats.acked == 0  # handed to the broker before any backlog message was acked
    stop(fw)


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
    sub.wait_for(lambda m: json.loads(m.payload).get("seq") == n, timeout=20)
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


def test_order_live_sends_a_live_reading_before_its_own_backlog(
    tmp_path: Path, stop_later: StopLater
) -> None:
    box = Outbox(tmp_path / "o.db", max_bytes=64 << 20, ttl_ms=3_600_000)
    box.write([reading(i) for i in range(1, 301)], [], keep=frozenset())
    broker = stop_later(start_broker(tmp_path))
    sub = stop_later(Subscriber(broker.port, "e/#"))
    fw = forwarder(box, broker.port, rate=100.0, inflight=20, order="live")
    time.sleep(0.5)
    fw.submit(reading(301))
    sub.wait_for(lambda m: json.loads(m.payload)["seq"] == 301, timeout=2)
    assert len(seqs(sub)) < 150  # the backlog is still draining behind it
    sub.wait_for(lambda m: json.loads(m.payload)["seq"] == 300, timeout=10)
    stop(fw)
    assert sorted(seqs(sub)) == list(range(1, 302))
