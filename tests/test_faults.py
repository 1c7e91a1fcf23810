"""Fault tolerance against real parts: pymodbus servers, the fault proxy, a socat pty pair.

Three good devices are polled straight from a pymodbus server; a fourth (same server,
or an RTU-over-TCP one) sits behind :class:`~edge.faultproxy.FaultProxy`. For each
fault the faulty device's counters show its kind, its breaker opens, it closes again
once the proxy passes, and the good devices keep their cadence meanwhile.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import itertools
import os
import random
import re
import socket
import struct
import subprocess
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from conftest import StopLater
from support import REPO, Image, ModbusServer, start_faultproxy, start_pty_pair

from edge.config.model import (
    DeviceSpec,
    Endpoint,
    Framing,
    ModbusOptions,
    PropertySpec,
    RawType,
    SerialEndpoint,
    Table,
    TcpEndpoint,
    ValueType,
    Visitor,
)
from edge.faultproxy import FaultProxy, Mode, parse_address
from edge.modbus.client import ConnectionPool
from edge.modbus.poller import DevicePoller
from edge.reading import Reading

CYCLE_MS = 100
GOOD_UNITS = (1, 2, 3)
FAULTY_UNIT = 4
CADENCE_SLACK_S = 0.06
"""How far an interval between two readings of a good device may stray from its cycle.

Cycles run on absolute deadlines, so reading k is made at t0 + k·cycle + the cycle's
latency and an interval is the cycle ± the difference of two latencies. One read of
a pymodbus server on localhost takes a few ms; 60 ms is ten times that, for
scheduling noise, and well below what being held up by the faulty device would cost:
a missed cycle (+100 ms) or one of its timeouts (+150 ms)."""
STALL_S = 0.02
"""A loop that wakes this much later than asked was held up: by the machine (another
process, the GIL of the server threads), not by anything a device does."""


@contextlib.asynccontextmanager
async def running(proxy: FaultProxy) -> AsyncIterator[FaultProxy]:
    await proxy.start()
    try:
        yield proxy
    finally:
        await proxy.stop()


def image(unit: int) -> Image:
    return Image(hr=[unit * 100, unit * 100 + 1])


def spec(name: str, endpoint: Endpoint, unit: int, timeout_s: float) -> DeviceSpec:
    return DeviceSpec(
        namespace="default", name=name, model="m", endpoint=endpoint, unit_id=unit,
        properties=tuple(
            PropertySpec(p, Visitor(Table.HOLDING_REGISTER, i, 1, RawType.UINT16), ValueType.INT,
                         collect_cycle_ms=CYCLE_MS)
            for i, p in enumerate(("a", "b"))
        ),
        options=ModbusOptions(timeout_s=timeout_s, retries=0),
    )


@pytest.fixture(scope="module")
def mbap_server() -> Iterator[ModbusServer]:
    server = ModbusServer({u: image(u) for u in (*GOOD_UNITS, FAULTY_UNIT)})
    yield server
    server.stop()


@pytest.fixture(scope="module")
def rtu_server() -> Iterator[ModbusServer]:
    server = ModbusServer({FAULTY_UNIT: image(FAULTY_UNIT)}, framing="rtu")
    yield server
    server.stop()


@dataclass
class Fleet:
    """Pollers running as tasks; readings and state changes with loop times."""

    pollers: dict[str, DevicePoller] = field(default_factory=dict)
    readings: dict[str, list[tuple[float, Reading]]] = field(default_factory=dict)
    states: dict[str, list[str]] = field(default_factory=dict)
    tasks: list[asyncio.Task[None]] = field(default_factory=list)

    def add(self, dev: DeviceSpec, pool: ConnectionPool, **kw: Any) -> DevicePoller:
        loop = asyncio.get_running_loop()
        got = self.readings.setdefault(dev.key, [])
        states = self.states.setdefault(dev.key, [])
        poller = DevicePoller(dev, pool.get(dev.endpoint),
                              lambda r: got.append((loop.time(), r)),
                              lambda _k, s, _r: states.append(s), **kw)
        self.pollers[dev.key] = poller
        self.tasks.append(loop.create_task(poller.run(), name=dev.key))
        return poller

    def alive(self) -> None:
        """No poller ever ended (they only end by raising)."""
        for t in self.tasks:
            assert not t.done(), (t.get_name(), t.exception() if t.done() else None)


@contextlib.asynccontextmanager
async def fleet(pool: ConnectionPool) -> AsyncIterator[Fleet]:
    f = Fleet()
    try:
        yield f
    finally:
        for t in f.tasks:
            t.cancel()
        await asyncio.gather(*f.tasks, return_exceptions=True)
        await pool.close()


async def until(pred: Callable[[], bool], within: float, what: str) -> float:
    """Wait (polling every 10 ms) until ``pred()``; returns the loop time it held."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while not pred():
        if loop.time() > deadline:
            pytest.fail(f"not {what} within {within} s")
        await asyncio.sleep(0.01)
    return loop.time()


class Stalls:
    """Spans of loop time in which an event loop of this process ran late.

    The good devices' cadence is asserted in the time the process could keep it: a
    stall of the test's loop or of a server's (seen by a 5 ms ticker on each) excuses
    the cycles it overlaps, a faulty device holding up a good one does not stall them.
    """

    def __init__(self) -> None:
        self.spans: list[tuple[float, float]] = []

    async def _tick(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            asked = loop.time() + 0.005
            await asyncio.sleep(0.005)
            if (woke := loop.time()) - asked > STALL_S:
                self.spans.append((asked, woke))

    @contextlib.asynccontextmanager
    async def watching(self, *servers: ModbusServer) -> AsyncIterator[None]:
        """Tick on the running loop and on each server's loop while inside."""
        tickers: list[concurrent.futures.Future[None] | asyncio.Task[None]] = [
            asyncio.get_running_loop().create_task(self._tick()),
            *(asyncio.run_coroutine_threadsafe(self._tick(), s.loop) for s in servers)]
        try:
            yield
        finally:
            for t in tickers:
                t.cancel()

    def overlap(self, a: float, b: float) -> bool:
        return any(s < b and e > a for s, e in self.spans)


def assert_cadence(f: Fleet, key: str, start: float, end: float, stalls: Stalls) -> None:
    """``key`` made a good reading every cycle between ``start`` and ``end``.

    An interval that strays from the cycle by more than the slack is allowed only where
    a stall of the process overlaps it or the cycle before it (a late reading makes
    the next interval short).
    """
    times = [t for t, r in f.readings[key] if start <= t <= end]
    assert all(not r.quality for t, r in f.readings[key] if start <= t <= end), key
    assert times, key
    period = CYCLE_MS / 1000
    for a, b in itertools.pairwise([start, *times, end]):
        late = b - a > period + CADENCE_SLACK_S
        early = b - a < period - CADENCE_SLACK_S and a != start and b != end
        assert not (late or early) or stalls.overlap(a - period, b), (
            key, round(a - start, 3), round(b - a, 3), stalls.spans)
    if not stalls.spans:
        assert f.pollers[key].stats.overruns == 0, key


FRAME_COUNTERS = ("crc_errors", "short_frames", "garbled_frames", "wrong_unit", "wrong_function")


@dataclass(frozen=True)
class Fault:
    mode: Mode
    counter: str  # the DeviceStats counter this fault must raise
    framing: str = "mbap"
    reconnects: bool = False  # the fault ends connections

    def __str__(self) -> str:
        m = self.mode
        extra = {"delay": f"{m.ms:.0f}ms-{m.direction}", "corrupt": m.flavour}.get(m.name, "")
        return f"{self.framing}-{m.name}-{extra}".rstrip("-")


FAULTS = [
    Fault(Mode("delay", ms=300), "timeouts"),  # answers later than the 150 ms timeout
    Fault(Mode("delay", ms=300, direction="up"), "timeouts"),
    Fault(Mode("drop"), "timeouts"),
    Fault(Mode("cut"), "connection_errors", reconnects=True),
    Fault(Mode("corrupt", flavour="byte", at=8), "garbled_frames"),  # MBAP byte count
    Fault(Mode("corrupt", flavour="truncate"), "short_frames", reconnects=True),
    Fault(Mode("corrupt", flavour="unit"), "wrong_unit"),
    Fault(Mode("corrupt", flavour="tid"), "timeouts"),  # answers nobody: discarded
    Fault(Mode("corrupt", flavour="function"), "wrong_function"),
    Fault(Mode("corrupt", flavour="garble"), "garbled_frames", reconnects=True),
    Fault(Mode("corrupt", flavour="byte"), "crc_errors", framing="rtu"),  # the CRC's last byte
    Fault(Mode("corrupt", flavour="truncate"), "short_frames", framing="rtu"),
    Fault(Mode("corrupt", flavour="unit"), "wrong_unit", framing="rtu"),
    Fault(Mode("corrupt", flavour="garble"), "garbled_frames", framing="rtu"),
]


@pytest.mark.parametrize("fault", FAULTS, ids=str)
async def test_fault_opens_the_breaker_of_its_device_only(
    fault: Fault, mbap_server: ModbusServer, rtu_server: ModbusServer
) -> None:
    target = rtu_server if fault.framing == "rtu" else mbap_server
    async with running(FaultProxy(target.port, framing=fault.framing)) as proxy:
        await _fault_cycle(fault, proxy, mbap_server, rtu_server)


async def _fault_cycle(fault: Fault, proxy: FaultProxy, mbap_server: ModbusServer,
                       rtu_server: ModbusServer) -> None:
    pool = ConnectionPool(backoff_initial=0.05, backoff_max=0.2, connect_timeout=0.5)
    stalls = Stalls()
    async with fleet(pool) as f, stalls.watching(mbap_server, rtu_server):
        good = [
            f.add(spec(f"good-{u}", TcpEndpoint("127.0.0.1", mbap_server.port), u, 0.5), pool)
            for u in GOOD_UNITS
        ]
        framing = Framing.RTU if fault.framing == "rtu" else Framing.MBAP
        faulty = f.add(
            spec("faulty", TcpEndpoint("127.0.0.1", proxy.port, framing), FAULTY_UNIT, 0.15),
            pool, breaker_failures=2, probe_initial_s=0.1, probe_max_s=0.4,
        )
        await until(lambda: all(p.stats.state == "online" for p in [*good, faulty]), 3,
                    "all online")
        start_readings = len(f.readings[faulty.device.key])
        assert faulty.stats.frame_errors == faulty.stats.timeouts == 0
        assert faulty.stats.breaker == "closed"

        t_fault = asyncio.get_running_loop().time()
        await proxy.set_mode(fault.mode)
        await until(lambda: faulty.stats.breaker != "closed", 3, "breaker open")
        assert f.states[faulty.device.key] == ["online", "offline"]
        await asyncio.sleep(0.5)  # failed probes keep it open
        assert faulty.stats.breaker in ("open", "half_open")
        assert faulty.stats.state == "offline"
        f.alive()

        await proxy.set_mode("pass")
        t_back = await until(lambda: faulty.stats.breaker == "closed", 3, "breaker closed")
        await asyncio.sleep(0.25)
        f.alive()

    s = faulty.stats
    assert getattr(s, fault.counter) > 0, (fault.counter, s)
    for counter in FRAME_COUNTERS:
        if counter != fault.counter:
            assert getattr(s, counter) == 0, (counter, s)
    assert s.frame_errors == sum(getattr(s, c) for c in FRAME_COUNTERS)
    if fault.counter != "timeouts" and fault.framing == "mbap":
        # (RTU: after a bad frame the line is kept quiet for its late answer, and a
        # request that cannot be sent within its timeout for that times out)
        assert s.timeouts == 0, s
    if fault.counter != "connection_errors":
        assert s.connection_errors == 0, s
    assert (s.reconnects > 0) == fault.reconnects, s
    assert s.breaker_opened == 1
    assert s.state == "online"
    assert f.states[faulty.device.key] == ["online", "offline", "online"]
    after = [r for t, r in f.readings[faulty.device.key][start_readings:] if t > t_back]
    assert after, "no reading after the breaker closed"
    assert after[-1].values == {"a": 400, "b": 401}
    for p in good:
        assert_cadence(f, p.device.key, t_fault, t_back, stalls)
        st = p.stats
        assert (st.timeouts, st.frame_errors, st.connection_errors, st.breaker_opened) == (
            0, 0, 0, 0)


async def _garbage(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Answers every MBAP request with 1..20 random bytes."""
    rnd = random.Random(4)
    with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
        while True:
            header = await reader.readexactly(7)
            await reader.readexactly(struct.unpack(">H", header[4:6])[0] - 1)
            writer.write(rnd.randbytes(rnd.randint(1, 20)))
            await writer.drain()
    writer.close()


@pytest.mark.parametrize("answer", ["random-bytes", "wrong-unit", "garbled-header"])
async def test_device_answering_garbage_keeps_being_polled(
    answer: str, mbap_server: ModbusServer
) -> None:
    garbage = await asyncio.start_server(_garbage, "127.0.0.1", 0)
    flavour = "unit" if answer == "wrong-unit" else "garble"
    proxy = FaultProxy(mbap_server.port, mode=Mode("corrupt", flavour=flavour))
    pool = ConnectionPool(backoff_initial=0.02, backoff_max=0.05)
    async with running(proxy), garbage:
        port = garbage.sockets[0].getsockname()[1] if answer == "random-bytes" else proxy.port
        async with fleet(pool) as f:
            bad = f.add(spec("bad", TcpEndpoint("127.0.0.1", port), FAULTY_UNIT, 0.1), pool,
                        breaker_failures=2, probe_initial_s=0.05, probe_max_s=0.1)
            await until(lambda: bad.stats.breaker != "closed", 2, "breaker open")
            cycles = bad.stats.cycles
            await asyncio.sleep(1.0)
            f.alive()
            # probed at least every 0.1 s (+ a cycle of at most 0.1 s): still polled
            assert bad.stats.cycles >= cycles + 4
    s = bad.stats
    assert s.state == "offline"  # nothing it says is an answer
    assert f.readings[bad.device.key] == [(t, r) for t, r in f.readings[bad.device.key]
                                          if set(r.quality) == {"a", "b"}]
    assert s.frame_errors > 0
    # every request failed, and was counted by kind (but one the cancel cut short)
    sent = range(s.requests - 1, s.requests + 1)
    if answer == "wrong-unit":
        assert s.wrong_unit == s.frame_errors
        assert s.frame_errors in sent
    elif answer == "garbled-header":
        assert s.garbled_frames == s.frame_errors
        assert s.frame_errors in sent
        assert s.reconnects >= 3  # each garbled header drops the connection
    else:
        assert s.frame_errors + s.timeouts + s.connection_errors in sent


async def test_serial_port_that_disappears_is_reopened(
    tmp_path: Path, stop_later: StopLater
) -> None:
    """socat's pty link is the port; killing socat unplugs it, a new socat on the same
    link path plugs it in again, and the same poller reads again without a restart."""
    pty = stop_later(start_pty_pair(tmp_path))
    server = ModbusServer({7: image(7)}, serial_port=pty.b)
    link = pty.a
    pool = ConnectionPool(backoff_initial=0.05, backoff_max=0.2, connect_timeout=0.5)
    dev = spec("serial", SerialEndpoint(link, baudrate=19200), 7, 0.3)
    async with fleet(pool) as f:
        p = f.add(dev, pool, breaker_failures=2, probe_initial_s=0.1, probe_max_s=0.3)
        await until(lambda: p.stats.state == "online", 3, "online")

        try:
            pty.stop()  # by PID: the adapter is unplugged
        finally:
            server.stop()
        # socat removed its link: the port is gone
        assert not await asyncio.to_thread(os.path.lexists, link)
        await until(lambda: p.stats.state == "offline", 3, "offline")
        assert p.stats.breaker in ("open", "half_open")
        assert p.stats.connection_errors > 0
        gone = len(f.readings[dev.key])
        await asyncio.sleep(0.5)  # probes fail: the port is not there
        assert len(f.readings[dev.key]) == gone

        pty2 = stop_later(start_pty_pair(tmp_path))  # plugged in again: same link path
        assert pty2.a == link
        stop_later(ModbusServer({7: image(7)}, serial_port=pty2.b))
        t_back = await until(lambda: p.stats.state == "online", 5, "online again")
        await until(lambda: sum(t > t_back for t, _ in f.readings[dev.key]) >= 3, 3,
                    "3 readings after reopening")
        f.alive()
    assert f.states[dev.key] == ["online", "offline", "online"]
    assert p.stats.reconnects == 1
    assert p.stats.breaker == "closed"
    assert f.readings[dev.key][-1][1].values == {"a": 700, "b": 701}


# ---------------------------------------------------------------- the proxy by itself


def test_modes_from_json() -> None:
    assert Mode.from_dict({"mode": "delay", "ms": 500}) == Mode("delay", ms=500)
    assert Mode.from_dict({"mode": "corrupt", "flavour": "unit"}).as_dict() == {
        "mode": "corrupt", "ms": 0.0, "direction": "both", "flavour": "unit", "at": -1}
    for bad in ({"mode": "explode"}, {"mode": "delay", "ms": -1}, {"mode": "drop", "x": 1},
                {"mode": "corrupt", "flavour": "nope"}, {"mode": "delay", "direction": "left"},
                {"mode": "delay", "ms": "soon"}):
        with pytest.raises(ValueError):  # noqa: PT011
            Mode.from_dict(bad)
    with pytest.raises(ValueError, match="transaction id"):
        FaultProxy(1, framing="rtu", mode=Mode("corrupt", flavour="tid"))


@pytest.mark.parametrize("address", ["0.0.0.0:502", "10.0.0.1:502", "localhost:502",
                                     "127.0.0.1", "127.0.0.1:x", "127.0.0.1:70000"])
def test_only_127_0_0_1_is_an_address(address: str) -> None:
    with pytest.raises(ValueError, match=r"127\.0\.0\.1"):
        parse_address(address)
    assert parse_address("127.0.0.1:5020") == ("127.0.0.1", 5020)


def test_cli_proxy_is_driven_from_its_control_port(mbap_server: ModbusServer) -> None:
    proxy = start_faultproxy(mbap_server.port)
    listen, control = proxy.port, proxy.control
    try:
        assert re.fullmatch(rf"faultproxy listening 127\.0\.0\.1:{listen} -> "
                            rf"127\.0\.0\.1:{mbap_server.port}, control "
                            rf"127\.0\.0\.1:{proxy.control_port}\n", proxy.ready), proxy.ready

        def read_unit(unit: int) -> bytes:
            with socket.create_connection(("127.0.0.1", listen), timeout=1) as s:
                s.sendall(struct.pack(">HHHBBHH", 9, 0, 6, unit, 3, 0, 2))
                return s.recv(64)

        assert read_unit(2) == struct.pack(">HHHBBBHH", 9, 0, 7, 2, 3, 4, 200, 201)
        replies = control('{"mode":"drop"}', "not json", '{"mode":"fly"}', "{}")
        assert replies[0]["ok"]
        assert replies[0]["mode"]["mode"] == "drop"
        assert [r["ok"] for r in replies[1:]] == [False, False, True]
        assert replies[3]["stats"]["connections"] == 1
        with pytest.raises(TimeoutError):
            read_unit(2)
        control('{"mode":"cut"}')
        with pytest.raises(ConnectionRefusedError):
            read_unit(2)
        control('{"mode":"corrupt","flavour":"unit"}')
        assert read_unit(2)[6] == 3
        control('{"mode":"pass"}')
        assert read_unit(2)[6] == 2
    finally:
        proxy.stop()
    assert proxy.proc.returncode == 0


def test_cli_proxy_refuses_other_targets() -> None:
    got = subprocess.run(
        [sys.executable, "-m", "edge", "faultproxy", "--listen", "127.0.0.1:0",
         "--target", "192.168.1.10:502", "--control", "127.0.0.1:0"],
        cwd=REPO, capture_output=True, text=True, timeout=30, check=False,
    )
    assert got.returncode == 2
    assert "only 127.0.0.1" in got.stderr
