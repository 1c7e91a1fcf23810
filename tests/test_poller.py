"""The poller against a real TCP server that misbehaves on purpose.

Each unit id of the server answers in its own way: correctly, with an exception,
from the wrong unit id, with a truncated frame, or never. Whatever one unit does,
its properties are ``bad`` in its own reading, its counters rise, and the other
devices on the same connection are untouched.
"""

from __future__ import annotations

import asyncio
import struct
from collections.abc import AsyncIterator

import pytest

from edge.config.model import (
    DeviceSpec,
    ModbusOptions,
    PropertySpec,
    RawType,
    Table,
    TcpEndpoint,
    ValueType,
    Visitor,
)
from edge.modbus.client import ConnectionPool
from edge.modbus.poller import DevicePoller
from edge.reading import Reading

GOOD, EXCEPTION, WRONG_UNIT, SHORT, SILENT, SPARSE = 1, 2, 3, 4, 5, 6
HOLDING = [100, 200, 300, 400, *range(5, 20)]
SPARSE_HOLE = range(1, 10)  # unit SPARSE has no registers there


async def _serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while True:
            header = await reader.readexactly(7)
            tid, _proto, length, unit = struct.unpack(">HHHB", header)
            pdu = await reader.readexactly(length - 1)
            fc, address, count = struct.unpack(">BHH", pdu[:5])
            if unit == SILENT:
                continue
            hole = unit == SPARSE and any(a in SPARSE_HOLE for a in range(address, address + count))
            if (unit == EXCEPTION and address >= 2) or hole:
                body = bytes([fc | 0x80, 2])
            else:
                regs = HOLDING[address : address + count]
                body = bytes([fc, 2 * count]) + struct.pack(f">{count}H", *regs)
            if unit == SHORT:
                body = body[:-1]
            answer_unit = unit + 100 if unit == WRONG_UNIT else unit
            writer.write(struct.pack(">HHHB", tid, 0, len(body) + 1, answer_unit) + body)
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError):
        writer.close()


@pytest.fixture
async def server() -> AsyncIterator[int]:
    srv = await asyncio.start_server(_serve, "127.0.0.1", 0)
    yield srv.sockets[0].getsockname()[1]
    srv.close()
    await srv.wait_closed()


def device(port: int, unit: int) -> DeviceSpec:
    def prop(name: str, offset: int) -> PropertySpec:
        return PropertySpec(
            name, Visitor(Table.HOLDING_REGISTER, offset, 1, RawType.UINT16), ValueType.INT,
            collect_cycle_ms=100,
        )

    return DeviceSpec(
        namespace="default", name=f"unit-{unit}", model="m",
        endpoint=TcpEndpoint("127.0.0.1", port), unit_id=unit,
        # max_gap 0 puts "low" (0..1) and "high" (2..3) into two requests
        properties=(prop("a", 0), prop("b", 1), prop("c", 2), prop("d", 3)),
        options=ModbusOptions(timeout_s=0.2, retries=1, max_gap=0, max_registers=2),
    )


async def poll(port: int, unit: int, cycles: int = 1) -> tuple[DevicePoller, list[Reading]]:
    pool = ConnectionPool(backoff_initial=0.05, backoff_max=0.1)
    readings: list[Reading] = []
    states: list[tuple[str, str]] = []
    poller = DevicePoller(device(port, unit), pool.get(device(port, unit).endpoint),
                          readings.append, lambda d, s, _r: states.append((d, s)),
                          breaker_failures=2)
    try:
        for _ in range(cycles):
            await poller.poll_once()
    finally:
        await pool.close()
    return poller, readings


async def test_good_device(server: int) -> None:
    poller, readings = await poll(server, GOOD, cycles=2)
    assert [r.values for r in readings] == [{"a": 100, "b": 200, "c": 300, "d": 400}] * 2
    assert [r.seq for r in readings] == [1, 2]
    assert poller.stats.state == "online"
    assert poller.request_count == 2


async def test_exception_reply_marks_only_its_request_bad(server: int) -> None:
    poller, readings = await poll(server, EXCEPTION)
    assert readings[0].values == {"a": 100, "b": 200}
    assert readings[0].quality == {"c": "bad", "d": "bad"}
    assert poller.stats.exceptions == 1
    assert poller.stats.exception_codes == {2: 1}
    assert poller.stats.state == "online"


@pytest.mark.parametrize("unit", [WRONG_UNIT, SHORT])
async def test_garbled_replies_are_bad_and_counted(server: int, unit: int) -> None:
    poller, readings = await poll(server, unit)
    assert readings[0].values == {}
    assert readings[0].quality == dict.fromkeys("abcd", "bad")
    assert poller.stats.frame_errors + poller.stats.timeouts >= 2
    assert poller.stats.frame_errors >= 1


async def test_silent_device_is_retried_then_goes_offline(server: int) -> None:
    poller, readings = await poll(server, SILENT, cycles=3)
    # 2 requests × (1 + 1 retry) per cycle, until offline after 2 unanswered cycles
    assert poller.stats.timeouts == 3 * 2 * 2
    assert poller.stats.state == "offline"
    assert [r.quality for r in readings] == [dict.fromkeys("abcd", "bad")]


async def test_misbehaving_units_do_not_disturb_a_good_one_on_the_same_connection(
    server: int,
) -> None:
    pool = ConnectionPool()
    got: list[Reading] = []
    pollers = [
        DevicePoller(device(server, u), pool.get(device(server, u).endpoint), got.append,
                     lambda *_: None)
        for u in (GOOD, EXCEPTION, WRONG_UNIT, SHORT)
    ]
    try:
        for _ in range(3):
            await asyncio.gather(*(p.poll_once() for p in pollers))
    finally:
        await pool.close()
    good = [r for r in got if r.device == f"unit-{GOOD}"]
    assert [r.values for r in good] == [{"a": 100, "b": 200, "c": 300, "d": 400}] * 3
    assert all(not r.quality for r in good)


async def test_unreachable_device_is_offline_at_once_without_readings() -> None:
    probe = await asyncio.start_server(_serve, "127.0.0.1", 0)
    port = probe.sockets[0].getsockname()[1]
    probe.close()
    await probe.wait_closed()  # now nothing listens on `port`
    poller, readings = await poll(port, GOOD, cycles=2)
    assert poller.stats.state == "offline"
    assert readings == []
    assert poller.stats.connection_errors >= 1


async def test_gap_fill_falls_back_to_separate_reads_on_illegal_address(server: int) -> None:
    """Properties at 0 and 10 are merged into one read of 0..10 (gap fill); the device
    has nothing at 1..9 and answers ILLEGAL DATA ADDRESS: from then on they are read
    separately and are good."""
    dev = DeviceSpec(
        namespace="default", name="sparse", model="m", endpoint=TcpEndpoint("127.0.0.1", server),
        unit_id=SPARSE,
        properties=tuple(
            PropertySpec(n, Visitor(Table.HOLDING_REGISTER, o, 1, RawType.UINT16), ValueType.INT)
            for n, o in (("lo", 0), ("hi", 10))
        ),
        options=ModbusOptions(timeout_s=0.5, max_gap=16),
    )
    pool = ConnectionPool()
    got: list[Reading] = []
    poller = DevicePoller(dev, pool.get(dev.endpoint), got.append, lambda *_: None)
    try:
        assert poller.request_count == 1
        await poller.poll_once()
        assert poller.request_count == 2
        await poller.poll_once()
    finally:
        await pool.close()
    assert got[0].quality == {"lo": "bad", "hi": "bad"}
    assert got[1].values == {"lo": 100, "hi": HOLDING[10]}
    assert not got[1].quality


async def test_offline_device_is_only_probed_with_backoff() -> None:
    probe = await asyncio.start_server(_serve, "127.0.0.1", 0)
    port = probe.sockets[0].getsockname()[1]
    probe.close()
    await probe.wait_closed()  # nothing listens on `port` now
    dev = device(port, GOOD)
    pool = ConnectionPool(backoff_initial=0.01, backoff_max=0.01)
    poller = DevicePoller(dev, pool.get(dev.endpoint), lambda _r: None, lambda *_: None)
    task = asyncio.create_task(poller.run())
    try:
        await asyncio.sleep(2.5)  # 25 cycles of 100 ms
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await pool.close()
    # offline at the first cycle, then probes after 1 s and 2 s more: 2 or 3 cycles
    assert poller.stats.state == "offline"
    assert 2 <= poller.stats.cycles <= 3, poller.stats.cycles
    assert poller.stats.breaker in ("open", "half_open")  # (half-open: cancelled in a probe)
    assert poller.stats.breaker_opened == 1
    assert poller.stats.consecutive_failures == poller.stats.cycles
    assert poller.stats.next_probe_s > 0


async def test_half_open_lets_one_probe_through_across_cycle_groups(server: int) -> None:
    """A silent device with two collect cycles: once its breaker is open, each probe
    cycle runs alone (the other group waits for it), and a failed probe reopens it."""
    dev = DeviceSpec(
        namespace="default", name="two-cycles", model="m",
        endpoint=TcpEndpoint("127.0.0.1", server), unit_id=SILENT,
        properties=tuple(
            PropertySpec(n, Visitor(Table.HOLDING_REGISTER, o, 1, RawType.UINT16),
                         ValueType.INT, collect_cycle_ms=c)
            for n, o, c in (("fast", 0, 100), ("slow", 10, 130))
        ),
        options=ModbusOptions(timeout_s=0.1, retries=0, max_gap=0),
    )
    pool = ConnectionPool()
    poller = DevicePoller(dev, pool.get(dev.endpoint), lambda _r: None, lambda *_: None,
                          breaker_failures=1, probe_initial_s=0.05, probe_max_s=0.05)
    loop = asyncio.get_running_loop()
    started = loop.time()
    poll_once = poller.poll_once
    active: list[int | None] = []
    probes: list[tuple[str, int]] = []  # breaker state at a probe's start, others in flight

    async def observed(cycle_ms: int | None = None) -> Reading | None:
        if poller.stats.breaker != "closed" and loop.time() - started > 0.3:
            probes.append((poller.stats.breaker, len(active)))
        active.append(cycle_ms)
        try:
            return await poll_once(cycle_ms)
        finally:
            active.remove(cycle_ms)

    poller.poll_once = observed  # type: ignore[method-assign]
    task = asyncio.create_task(poller.run())
    try:
        await asyncio.sleep(1.2)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await pool.close()
    # probes every 25..50 ms + 100 ms timeout: ~7 in 0.9 s, each alone, half-open
    assert len(probes) >= 4, probes
    assert probes == [("half_open", 0)] * len(probes)
    assert poller.stats.breaker_opened == 1
    assert poller.stats.state == "offline"
