"""A fault-injecting TCP proxy in front of a Modbus server, for tests and the benchmark.

:class:`FaultProxy` listens on ``127.0.0.1:listen_port`` and forwards every
connection to ``127.0.0.1:target_port`` (only 127.0.0.1: it is a test tool, never a
relay). What it does to the traffic is its :class:`Mode`, changed at any time with
:meth:`FaultProxy.set_mode` (Python) or a line on the control port (CLI:
``edge faultproxy``). Every mode applies to open connections at once:

``pass``
    Forward both directions unchanged.
``delay`` (``ms``, ``direction``: ``up`` = requests, ``down`` = answers, ``both``)
    Hold every chunk ``ms`` milliseconds before forwarding it (order is kept).
``drop``
    Forward requests, swallow the server's answers: requests time out.
``cut``
    Reset every connection (TCP RST) and stop listening, so new connections are
    refused, until the mode changes again (then it listens on the same port).
``corrupt`` (``flavour``, for ``byte`` also ``at``)
    Change every answer frame (frames delimited by ``framing``: ``mbap`` by the MBAP
    length, ``rtu`` by the function code, as :func:`edge.modbus.pdu.rtu_response_length`):

    * ``byte``: XOR 0xFF into byte ``at`` of the frame (default -1, the last). MBAP
      has no checksum, so on ``mbap`` that is a wrong value nobody can detect, unless
      ``at`` hits the header or the byte count (``at=8``: a byte-count mismatch); on
      ``rtu`` the last byte is the CRC (a CRC error).
    * ``truncate``: drop the frame's last byte, header unchanged (a truncated frame).
    * ``unit``: unit id + 1 (an answer from the wrong unit; RTU CRC recomputed).
    * ``tid``: MBAP transaction id + 1 (an answer to nobody: the request times out).
    * ``function``: another read function code (1→2→3→4→1; RTU CRC recomputed).
    * ``garble``: MBAP protocol id 0xFFFF / RTU function code 0x41 (cannot be framed).

Control port (``--control``): one JSON object per line, e.g.
``{"mode": "delay", "ms": 500, "direction": "down"}``, ``{"mode": "corrupt",
"flavour": "unit"}``, ``{"mode": "pass"}``; an object without ``mode`` only asks.
Each line is answered with one line: ``{"ok": true, "mode": {...}, "stats": {...}}``
or ``{"ok": false, "error": "..."}``. From a shell::

    echo '{"mode":"drop"}' | nc -q1 127.0.0.1 7001

Stdlib only (plus the pure-Python framing helpers of :mod:`edge.modbus.pdu`).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

from edge.modbus.pdu import crc16, rtu_response_length

log = logging.getLogger(__name__)

HOST: Final = "127.0.0.1"
MODES: Final = ("pass", "delay", "drop", "cut", "corrupt")
DIRECTIONS: Final = ("up", "down", "both")
FLAVOURS: Final = ("byte", "truncate", "unit", "tid", "function", "garble")
FRAMINGS: Final = ("mbap", "rtu")
_CHUNK = 65536
_CLOSE_WAIT = 2.0
"""Seconds :meth:`FaultProxy.stop` waits for the connection handlers to end."""


@dataclass(frozen=True, slots=True)
class Mode:
    """What the proxy does to the traffic (see the module docstring).

    ``ms``: delay in milliseconds (``delay``); ``direction``: ``up`` | ``down`` |
    ``both`` (``delay``); ``flavour``: one of :data:`FLAVOURS` (``corrupt``); ``at``:
    frame byte index for flavour ``byte`` (negative counts from the end).
    """

    name: str = "pass"
    ms: float = 0.0
    direction: str = "both"
    flavour: str = "byte"
    at: int = -1

    def __post_init__(self) -> None:
        if self.name not in MODES:
            raise ValueError(f"mode {self.name!r}: not one of {', '.join(MODES)}")
        if self.direction not in DIRECTIONS:
            raise ValueError(f"direction {self.direction!r}: not one of {', '.join(DIRECTIONS)}")
        if self.flavour not in FLAVOURS:
            raise ValueError(f"flavour {self.flavour!r}: not one of {', '.join(FLAVOURS)}")
        if not 0 <= self.ms <= 3_600_000:
            raise ValueError(f"ms {self.ms}: need 0..3600000")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Mode:
        """A mode from its JSON form ``{"mode": NAME, "ms", "direction", "flavour", "at"}``."""
        unknown = set(d) - {"mode", "ms", "direction", "flavour", "at"}
        if unknown:
            raise ValueError(f"unknown keys {sorted(unknown)}")
        try:
            return cls(
                name=str(d.get("mode", "pass")),
                ms=float(d.get("ms", 0.0)),
                direction=str(d.get("direction", "both")),
                flavour=str(d.get("flavour", "byte")),
                at=int(d.get("at", -1)),
            )
        except (TypeError, ValueError) as e:
            raise ValueError(str(e)) from None

    def as_dict(self) -> dict[str, Any]:
        """The JSON form (``mode`` for ``name``)."""
        d = dataclasses.asdict(self)
        d["mode"] = d.pop("name")
        return d

    def delay_s(self, direction: str) -> float:
        """Seconds to hold a chunk going ``up`` or ``down``."""
        if self.name != "delay" or self.direction not in (direction, "both"):
            return 0.0
        return self.ms / 1000.0


@dataclass(slots=True)
class ProxyStats:
    """Counters since start: connections accepted, bytes forwarded each way, answer
    chunks swallowed (``drop``), answer frames changed (``corrupt``), connections
    reset (``cut``)."""

    connections: int = 0
    up_bytes: int = 0
    down_bytes: int = 0
    dropped: int = 0
    corrupted: int = 0
    resets: int = 0


def parse_address(text: str) -> tuple[str, int]:
    """``"127.0.0.1:PORT"`` → ``("127.0.0.1", PORT)``; any other host is a ValueError."""
    host, sep, port = text.rpartition(":")
    if not sep or host != HOST or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"{text!r}: need {HOST}:PORT (only 127.0.0.1 is allowed)")
    return host, int(port)


class _Pipe:
    """One direction of one proxied connection: chunks go out in order, each when due."""

    def __init__(self, writer: asyncio.StreamWriter, count: Callable[[int], None]) -> None:
        self.writer = writer
        self._count = count
        self._queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()
        self.task = asyncio.get_running_loop().create_task(self._run())

    def put(self, data: bytes, delay_s: float) -> None:
        if data:
            self._queue.put_nowait((asyncio.get_running_loop().time() + delay_s, data))

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            due, data = await self._queue.get()
            if due > loop.time():
                await asyncio.sleep(due - loop.time())
            self.writer.write(data)
            self._count(len(data))
            await self.writer.drain()


class FaultProxy:
    """The proxy: ``await start()``, ``await set_mode(...)``, ``await stop()``.

    ``listen_port`` 0 picks a free port (read :attr:`port` after :meth:`start`);
    ``framing`` (``mbap`` or ``rtu``) is how answers are delimited for ``corrupt``.
    """

    def __init__(
        self, target_port: int, *, listen_port: int = 0, framing: str = "mbap",
        mode: Mode | None = None,
    ) -> None:
        if framing not in FRAMINGS:
            raise ValueError(f"framing {framing!r}: not one of {', '.join(FRAMINGS)}")
        self.target_port = target_port
        self.port = listen_port
        self.framing = framing
        self.mode = mode or Mode()
        self._check(self.mode)
        self.stats = ProxyStats()
        self._server: asyncio.Server | None = None
        self._control: asyncio.Server | None = None
        self._conns: set[tuple[asyncio.StreamWriter, asyncio.StreamWriter]] = set()
        self._controllers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[Any]] = set()

    async def start(self) -> None:
        """Listen (unless the mode is ``cut``); :attr:`port` is then the port."""
        if self._server is None and self.mode.name != "cut":
            self._server = await asyncio.start_server(self._accept, HOST, self.port)
            self.port = self._server.sockets[0].getsockname()[1]
        elif self.port == 0:  # started in cut mode: reserve a port to listen on later
            with socket.socket() as s:
                s.bind((HOST, 0))
                self.port = s.getsockname()[1]

    async def serve_control(self, port: int = 0) -> int:
        """Accept JSON control lines on ``127.0.0.1:port``; returns the port."""
        self._control = await asyncio.start_server(self._control_client, HOST, port)
        return int(self._control.sockets[0].getsockname()[1])

    async def stop(self) -> None:
        """Close the listeners and every connection."""
        for server in (self._server, self._control):
            if server is not None:
                server.close()
        self._server = self._control = None
        self._reset_all()  # the connection handlers end by themselves on that
        for w in list(self._controllers):
            w.transport.abort()
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=_CLOSE_WAIT)

    async def set_mode(self, mode: Mode | str, **params: Any) -> None:
        """Switch to ``mode`` (a :class:`Mode`, or its name plus ``ms``/``direction``/
        ``flavour``/``at``); a ``cut`` resets and refuses, leaving it listens again."""
        new = mode if isinstance(mode, Mode) else Mode(mode, **params)
        self._check(new)
        self.mode = new
        log.info("faultproxy :%d -> :%d: %s", self.port, self.target_port, new.as_dict())
        if new.name == "cut":
            if self._server is not None:
                self._server.close()
                self._server = None
            self._reset_all()
        else:
            await self.start()

    def _check(self, mode: Mode) -> None:
        if mode.name == "corrupt" and mode.flavour == "tid" and self.framing == "rtu":
            raise ValueError("flavour tid needs MBAP framing (RTU has no transaction id)")

    def _reset_all(self) -> None:
        for client, upstream in list(self._conns):
            for w in (client, upstream):
                sock = w.get_extra_info("socket")
                if sock is not None:
                    with contextlib.suppress(OSError):  # RST instead of FIN
                        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                        struct.pack("ii", 1, 0))
                w.transport.abort()
            self.stats.resets += 1
        self._conns.clear()

    def _track(self) -> None:
        """Remember the running connection handler, so that :meth:`stop` waits for it."""
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._track()
        if self.mode.name == "cut":
            writer.transport.abort()
            return
        self.stats.connections += 1
        try:
            up_reader, up_writer = await asyncio.open_connection(HOST, self.target_port)
        except OSError as e:
            log.info("faultproxy: target 127.0.0.1:%d: %s", self.target_port, e)
            writer.transport.abort()
            return
        pair = (writer, up_writer)
        self._conns.add(pair)
        to_server = _Pipe(up_writer, self._count_up)
        to_client = _Pipe(writer, self._count_down)
        pumps = [
            asyncio.ensure_future(self._pump_up(reader, to_server)),
            asyncio.ensure_future(self._pump_down(up_reader, to_client)),
            to_server.task,
            to_client.task,
        ]
        try:
            await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for t in pumps:
                t.cancel()
            await asyncio.gather(*pumps, return_exceptions=True)
            self._conns.discard(pair)
            for w in pair:
                w.close()

    def _count_up(self, n: int) -> None:
        self.stats.up_bytes += n

    def _count_down(self, n: int) -> None:
        self.stats.down_bytes += n

    async def _pump_up(self, reader: asyncio.StreamReader, pipe: _Pipe) -> None:
        while data := await reader.read(_CHUNK):
            pipe.put(data, self.mode.delay_s("up"))

    async def _pump_down(self, reader: asyncio.StreamReader, pipe: _Pipe) -> None:
        buf = bytearray()
        while data := await reader.read(_CHUNK):
            mode = self.mode
            if mode.name == "drop":
                self.stats.dropped += 1
                buf.clear()
                continue
            buf += data
            if mode.name == "corrupt":
                out = bytearray()
                while (size := self._frame_size(buf)) is not None and len(buf) >= size:
                    out += self._corrupt(bytearray(buf[:size]), mode)
                    self.stats.corrupted += 1
                    del buf[:size]
                if size == 0:  # cannot be delimited: forward as it is
                    out += buf
                    buf.clear()
            else:
                out = buf[:]
                buf.clear()
            pipe.put(bytes(out), mode.delay_s("down"))

    def _frame_size(self, buf: bytearray) -> int | None:
        """Size of the frame at the start of ``buf``: None while too short to tell,
        0 if it cannot be delimited."""
        if self.framing == "mbap":
            if len(buf) < 6:
                return None
            return 6 + (buf[4] << 8 | buf[5]) if buf[2:4] == b"\0\0" else 0
        if len(buf) < 3:
            return None
        return rtu_response_length(buf) or 0

    def _corrupt(self, frame: bytearray, mode: Mode) -> bytes:
        mbap = self.framing == "mbap"
        unit_at, fc_at = (6, 7) if mbap else (0, 1)
        flavour = mode.flavour
        if flavour == "byte":
            if -len(frame) <= mode.at < len(frame):
                frame[mode.at] ^= 0xFF
            return bytes(frame)
        if flavour == "truncate":
            return bytes(frame[:-1])
        if flavour == "unit":
            frame[unit_at] = (frame[unit_at] + 1) & 0xFF
        elif flavour == "tid":
            struct.pack_into(">H", frame, 0, (struct.unpack_from(">H", frame)[0] + 1) & 0xFFFF)
        elif flavour == "function":
            if 1 <= frame[fc_at] <= 4:
                frame[fc_at] = frame[fc_at] % 4 + 1
        elif mbap:  # garble
            frame[2:4] = b"\xff\xff"
        else:
            frame[fc_at] = 0x41
        if not mbap:
            struct.pack_into("<H", frame, len(frame) - 2, crc16(frame, 0, len(frame) - 2))
        return bytes(frame)

    async def _control_client(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        self._track()
        self._controllers.add(writer)
        try:
            while line := await reader.readline():
                if not line.strip():
                    continue
                reply: dict[str, Any]
                try:
                    cmd = json.loads(line)
                    if not isinstance(cmd, dict):
                        raise ValueError("need a JSON object")
                    if "mode" in cmd:
                        await self.set_mode(Mode.from_dict(cmd))
                    reply = {"ok": True, "mode": self.mode.as_dict(),
                             "stats": dataclasses.asdict(self.stats)}
                except ValueError as e:
                    reply = {"ok": False, "error": str(e)}
                writer.write(json.dumps(reply).encode() + b"\n")
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            self._controllers.discard(writer)
            writer.close()


async def run_proxy(
    listen: str, target: str, control: str, stop: asyncio.Event, *, framing: str = "mbap",
    announce: Callable[[str], None] = print,
) -> None:
    """``edge faultproxy``: run a proxy with its control port until ``stop`` is set.

    Addresses are ``127.0.0.1:PORT`` (port 0: any free one); ``announce`` gets one
    line saying the ports actually used once everything listens.
    """
    _, listen_port = parse_address(listen)
    _, target_port = parse_address(target)
    _, control_port = parse_address(control)
    proxy = FaultProxy(target_port, listen_port=listen_port, framing=framing)
    await proxy.start()
    try:
        control_port = await proxy.serve_control(control_port)
        announce(f"faultproxy listening {HOST}:{proxy.port} -> {HOST}:{target_port}, "
                 f"control {HOST}:{control_port}")
        await stop.wait()
    finally:
        await proxy.stop()
