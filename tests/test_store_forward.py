"""Store-and-forward end to end: a real agent process, real mosquitto, real SQLite file.

The broker is stopped by its PID and started again on the same port with its
persistence directory, so the test's subscriber (a session the broker keeps) misses
nothing across the restart; the agent's own session is clean. Every reading carries
``(device, seq)``; "nothing lost" means every device's seqs arrive as one gap-free
run, and the agent's outbox is empty after a clean stop (a reading leaves the outbox
only on PUBACK).
"""

from __future__ import annotations

import signal
import sqlite3
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

from conftest import StopLater
from support import (
    AgentProcess,
    Broker,
    Image,
    ModbusServer,
    Subscriber,
    device_docs,
    start_broker,
    start_edge,
    write_agent_file,
)

PREFIX = "edge/v1/gw-test"
DEVICES = 10
CYCLE_MS = 200


def fleet(server: ModbusServer) -> list[dict[str, Any]]:
    """DEVICES devices (unit ids 1..DEVICES on one server), one register each."""
    prop = [{"name": "level", "type": "INT", "collectCycle": CYCLE_MS,
             "visitor": {"register": "HoldingRegister", "offset": 0, "dataType": "int16"}}]
    return [doc for u in range(1, DEVICES + 1)
            for doc in device_docs(f"dev-{u}", server.port, u, prop)]


def readings(sub: Subscriber) -> list[dict[str, Any]]:
    return [m.json() for m in sub.messages if m.topic.startswith(f"{PREFIX}/telemetry/")]


def events(sub: Subscriber, kind: str) -> list[dict[str, Any]]:
    return [e for e in (m.json() for m in sub.on(f"{PREFIX}/events")) if e["type"] == kind]


def seqs_by_device(rs: list[dict[str, Any]]) -> dict[str, list[int]]:
    """Arrival order of seqs per device, duplicates (same device, seq) removed."""
    seen: set[tuple[str, int]] = set()
    out: dict[str, list[int]] = defaultdict(list)
    for r in rs:
        key = (r["device"], r["seq"])
        if key not in seen:
            seen.add(key)
            out[r["device"]].append(r["seq"])
    return out


def outbox_rows(db: Path) -> int:
    with sqlite3.connect(db) as c:
        return int(c.execute("SELECT count(*) FROM outbox").fetchone()[0])


def wait_until(pred: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        time.sleep(0.1)


def setup(tmp_path: Path, stop_later: StopLater, **store: Any) -> tuple[
        Broker, Subscriber, Path, Path]:
    persist = tmp_path / "mosquitto"
    persist.mkdir()
    broker = stop_later(start_broker(tmp_path, persist=persist))
    sub = stop_later(Subscriber(broker.port, f"{PREFIX}/#", persistent=True))
    server = stop_later(ModbusServer({u: Image(hr=[u]) for u in range(1, DEVICES + 1)}))
    cfg = write_agent_file(tmp_path, broker.port, fleet(server), store=store or None)
    return broker, sub, cfg, persist


def restart_broker(tmp_path: Path, stop_later: StopLater, old: Broker, persist: Path) -> Broker:
    return stop_later(start_broker(tmp_path, port=old.port, persist=persist))


def test_broker_down_30s_every_reading_arrives_once_in_order(
    tmp_path: Path, stop_later: StopLater
) -> None:
    broker, sub, cfg, persist = setup(tmp_path, stop_later)
    agent: AgentProcess = stop_later(start_edge(["run", "-c", str(cfg)], tmp_path))
    wait_until(lambda: len(seqs_by_device(readings(sub))) == DEVICES, 15, "all devices publish")
    time.sleep(1)
    broker.stop()  # by its PID
    time.sleep(30)
    broker = restart_broker(tmp_path, stop_later, broker, persist)
    time.sleep(5)
    assert agent.stop() == 0
    got = readings(sub)
    per_device = seqs_by_device(got)
    assert len(per_device) == DEVICES
    total = 0
    for device, seqs in per_device.items():
        # gap-free and in order: every seq from the first to the last, each once
        assert seqs == list(range(seqs[0], seqs[0] + len(seqs))), device
        # the outage is in there: 30 s at 5 readings/s
        assert len(seqs) > 36 * 1000 // CYCLE_MS * 0.9, device
        total += len(seqs)
    assert outbox_rows(tmp_path / "edge.db") == 0  # nothing left that the broker lacks
    print(f"{total} readings, {len(got) - total} duplicates")


def test_sigkill_during_an_outage_loses_no_committed_reading(
    tmp_path: Path, stop_later: StopLater
) -> None:
    broker, sub, cfg, persist = setup(tmp_path, stop_later)
    db = tmp_path / "edge.db"
    agent: AgentProcess = stop_later(start_edge(["run", "-c", str(cfg)], tmp_path))
    wait_until(lambda: len(seqs_by_device(readings(sub))) == DEVICES, 15, "all devices publish")
    broker.stop()
    time.sleep(3)
    agent.stop(signal.SIGKILL)
    with sqlite3.connect(db) as c:
        committed = {(d.split("/")[1], s) for d, s in c.execute("SELECT device, seq FROM seq")}
        backlog = int(c.execute("SELECT count(*) FROM outbox").fetchone()[0])
    assert backlog > 3 * DEVICES * 1000 // CYCLE_MS * 0.8  # the outage's readings, on disk
    agent = stop_later(start_edge(["run", "-c", str(cfg)], tmp_path, name="agent-2"))
    time.sleep(2)  # the restarted agent polls into the same outbox, broker still down
    broker = restart_broker(tmp_path, stop_later, broker, persist)
    wait_until(lambda: outbox_rows(db) < DEVICES * 2, 20, "backlog drained")
    time.sleep(1)
    assert agent.stop() == 0
    per_device = seqs_by_device(readings(sub))
    for device, seqs in per_device.items():
        assert seqs == list(range(seqs[0], seqs[0] + len(seqs))), device
    # the last reading committed before the kill arrived, and seq went on after it
    for device, last in committed:
        assert last in per_device[device]
        assert per_device[device][-1] > last + 5
    assert outbox_rows(db) == 0


def test_outbox_at_its_byte_limit_drops_the_oldest_with_an_exact_count(
    tmp_path: Path, stop_later: StopLater
) -> None:
    broker, sub, cfg, persist = setup(tmp_path, stop_later, max_bytes=65_536)
    agent: AgentProcess = stop_later(start_edge(["run", "-c", str(cfg)], tmp_path))
    wait_until(lambda: len(seqs_by_device(readings(sub))) == DEVICES, 15, "all devices publish")
    broker.stop()
    time.sleep(20)  # ~1000 readings of ~110 bytes: far more than 64 KiB
    broker = restart_broker(tmp_path, stop_later, broker, persist)
    wait_until(lambda: outbox_rows(tmp_path / "edge.db") < DEVICES * 2, 10, "backlog drained")
    assert agent.stop() == 0  # and the drops since the last report are reported
    drops = events(sub, "outbox_dropped")
    assert drops
    assert {d["reason"] for d in drops} == {"max_bytes"}
    reported = sum(d["count"] for d in drops)
    assert drops[-1]["total"] == reported
    missing = 0
    for device, seqs in seqs_by_device(readings(sub)).items():
        present = set(seqs)
        gaps = [s for s in range(min(seqs), max(seqs)) if s not in present]
        missing += len(gaps)
        # oldest first: what is missing is one run, read early in the outage
        assert gaps == list(range(gaps[0], gaps[0] + len(gaps))), device
    assert missing == reported > 100
    assert "outbox: dropped" in agent.output()


def test_a_damaged_store_is_moved_aside_and_the_agent_runs_on(
    tmp_path: Path, stop_later: StopLater
) -> None:
    _broker, sub, cfg, _persist = setup(tmp_path, stop_later)
    (tmp_path / "edge.db").write_bytes(b"\x00garbage, not SQLite" * 1000)
    agent: AgentProcess = stop_later(start_edge(["run", "-c", str(cfg)], tmp_path))
    wait_until(lambda: len(seqs_by_device(readings(sub))) == DEVICES, 15, "all devices publish")
    wait_until(lambda: events(sub, "store_corrupt"), 5, "store_corrupt event")
    moved = events(sub, "store_corrupt")[0]["moved_to"]
    assert Path(moved).read_bytes().startswith(b"\x00garbage")
    # seq starts at the clock (ms), above anything the lost store may have handed out
    assert min(r["seq"] for r in readings(sub)) > 1_700_000_000_000
    assert agent.stop() == 0
    assert "was damaged: moved to" in agent.output()
