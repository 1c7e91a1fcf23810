"""A probe for the datapath tests, run inside a test cgroup or network namespace: one
JSON request per stdin line, one JSON answer per stdout line.

``{"op": "listen", "proto": "tcp"|"udp", "host": "0.0.0.0", "port": 0, "echo": true}``
    a server (in a thread) that echoes (``echo`` false: a UDP sink that never
    answers); answers ``{"port": N}``.
``{"op": "tcp", "host": H, "port": P, "timeout": s, "source": A, "size": N}``
    connect (from address ``source`` if given; with the ``options`` named in
    :data:`OPTIONS`), send ``size`` bytes, read the echo:
    ``{"ok": true, "local_port": N}`` or ``{"error": NAME}`` (``timeout``, or the
    errno's name: ``EPERM`` for a send the kernel dropped).
``{"op": "udp", ...}``
    the same with one datagram (a fresh socket each time).
``{"op": "ping", "host": H, "timeout": s}``
    one ICMP (ICMPv6) echo request from a raw socket that takes in only the echo
    replies of ``host``; answered as ``udp`` is.
``{"op": "batch", "requests": [...]}``
    ``tcp`` / ``udp`` / ``ping`` requests run at once (a thread each): ``{"answers": [...]}`` in
    their order.
``{"op": "open", "proto": ..., "host": H, "port": P}``
    a TCP connection (or connected UDP socket) kept open: ``{"id": N, "local_port": L}``;
    ``{"op": "send", "id": N, "timeout": s}`` sends ``ping`` on it and reads the echo,
    answering as ``tcp`` does. With ``"proto": "icmp"`` (and ``"v6"``) a raw socket
    (as ``ping`` makes, not connected yet) that ``send`` (with ``host``) pings from.
``{"op": "flood", "host": H, "ports": [P, ...], "interval": s}``
    starts sending one datagram to each port in turn from a socket for each, then one
    to each from a socket for all, every ``interval``; ``{"op": "flood_stop"}`` stops
    and answers ``{"log": [[start_ns, end_ns, P, 1 sent | 0 EPERM], ...], "other":
    {NAME: n}}`` (CLOCK_MONOTONIC; other errors by name).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import socket
import struct
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

_held: dict[int, socket.socket] = {}
_flood: dict[str, Any] = {}


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def _error(e: OSError) -> dict[str, Any]:
    return {"error": errno.errorcode.get(e.errno or 0, str(e))}


def _serve_tcp(srv: socket.socket) -> None:
    while True:
        conn, _ = srv.accept()
        threading.Thread(target=_echo, args=(conn,), daemon=True).start()


def _echo(conn: socket.socket) -> None:
    with conn, contextlib.suppress(OSError):
        while data := conn.recv(65536):
            conn.sendall(data)


def _serve_udp(srv: socket.socket, echo: bool) -> None:
    while True:
        with contextlib.suppress(OSError):
            data, peer = srv.recvfrom(65536)
            if echo:
                srv.sendto(data, peer)


def listen(proto: str, host: str, port: int, echo: bool) -> dict[str, Any]:
    kind = socket.SOCK_STREAM if proto == "tcp" else socket.SOCK_DGRAM
    srv = socket.socket(_family(host), kind)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind((host, port))
    if proto == "tcp":
        srv.listen(64)
        threading.Thread(target=_serve_tcp, args=(srv,), daemon=True).start()
    else:
        threading.Thread(target=_serve_udp, args=(srv, echo), daemon=True).start()
    return {"port": srv.getsockname()[1]}


def _exchange(s: socket.socket, payload: bytes) -> dict[str, Any]:
    """Sends ``payload`` on a connected socket and reads it back."""
    try:
        if s.type == socket.SOCK_STREAM:
            s.sendall(payload)
            got = b""
            while len(got) < len(payload):
                chunk = s.recv(65536)
                if not chunk:
                    return {"error": "closed"}
                got += chunk
        else:
            s.send(payload)
            s.recv(65536)
    except TimeoutError:
        return {"error": "timeout"}
    except OSError as e:
        return _error(e)
    return {"ok": True, "local_port": s.getsockname()[1]}


OPTIONS = {  # IP options, IPv6 hop-by-hop and destination options headers
    "ip": (socket.IPPROTO_IP, socket.IP_OPTIONS, bytes([1, 1, 1, 1])),  # 4 NOPs
    "hbh": (socket.IPPROTO_IPV6, 54, bytes([0, 0, 1, 4, 0, 0, 0, 0])),  # PadN
    "dst": (socket.IPPROTO_IPV6, 59, bytes([0, 1, 0x1E, 10, *[7] * 10, 1, 0])),  # skip
}


def _socket(proto: str, host: str, port: int, timeout: float,
            source: str | None, options: tuple[str, ...] = ()) -> socket.socket:
    kind = socket.SOCK_STREAM if proto == "tcp" else socket.SOCK_DGRAM
    s = socket.socket(_family(host), kind)
    s.settimeout(timeout)
    for name in options:
        s.setsockopt(*OPTIONS[name])
    if source:
        s.bind((source, 0))
    s.connect((host, port))
    return s


def connect(proto: str, host: str, port: int, timeout: float, size: int,
            source: str | None = None, options: tuple[str, ...] = ()) -> dict[str, Any]:
    try:
        s = _socket(proto, host, port, timeout, source, options)
    except TimeoutError:
        return {"error": "timeout"}
    except OSError as e:
        return _error(e)
    with s:
        return _exchange(s, b"p" * size)


def _raw(v6: bool) -> socket.socket:
    """A raw ICMP (ICMPv6) socket that takes in echo replies only."""
    s = socket.socket(socket.AF_INET6 if v6 else socket.AF_INET, socket.SOCK_RAW,
                      socket.IPPROTO_ICMPV6 if v6 else socket.IPPROTO_ICMP)
    if v6:
        blocked = [0xFFFFFFFF] * 8
        blocked[129 >> 5] &= ~(1 << (129 & 31))
        s.setsockopt(socket.IPPROTO_ICMPV6, 1, struct.pack("8I", *blocked))  # ICMP6_FILTER
    else:
        s.setsockopt(255, 1, struct.pack("I", 0xFFFFFFFE))  # SOL_RAW, ICMP_FILTER
    return s


def _echo_request(v6: bool) -> bytes:
    message = struct.pack("!BBHHH", 128 if v6 else 8, 0, 0,
                          int.from_bytes(os.urandom(2), "big"), 1) + b"ping"
    if v6:  # the kernel sums ICMPv6 itself
        return message
    total = sum(struct.unpack(f"!{len(message) // 2}H", message))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return message[:2] + struct.pack("!H", ~total & 0xFFFF) + message[4:]


def ping(host: str, timeout: float, raw: socket.socket | None = None) -> dict[str, Any]:
    v6 = ":" in host
    message = _echo_request(v6)
    with raw or _raw(v6) as s:
        try:
            s.connect((host, 0))  # from then on only host's replies come in
            s.send(message)
            end = time.monotonic() + timeout
            while True:
                s.settimeout(max(end - time.monotonic(), 0.001))
                data, peer = s.recvfrom(65536)
                reply = data if v6 else data[(data[0] & 0xF) * 4:]
                if (peer[0] == host and reply[0] == (129 if v6 else 0)
                        and reply[4:6] == message[4:6]):
                    return {"ok": True}
        except TimeoutError:
            return {"error": "timeout"}
        except OSError as e:
            return _error(e)


def one(req: dict[str, Any]) -> dict[str, Any]:
    if req["op"] == "ping":
        return ping(req["host"], req.get("timeout", 1.0))
    return connect(req["op"], req["host"], req["port"], req.get("timeout", 1.0),
                   req.get("size", 4), req.get("source"), tuple(req.get("options", ())))


def batch(requests: list[dict[str, Any]]) -> dict[str, Any]:
    answers: list[dict[str, Any]] = [{} for _ in requests]

    def run(i: int) -> None:
        answers[i] = one(requests[i])

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(requests))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return {"answers": answers}


def flood(host: str, ports: list[int], interval: float) -> dict[str, Any]:
    stop = threading.Event()
    log: list[tuple[int, int, int, int]] = []
    other: Counter[str] = Counter()

    def run() -> None:
        sockets = [socket.socket(_family(host), socket.SOCK_DGRAM) for _ in ports]
        shared = socket.socket(_family(host), socket.SOCK_DGRAM)
        sockets.append(shared)
        turns = [*zip(sockets, ports, strict=False), *((shared, port) for port in ports)]
        try:
            while not stop.is_set():
                for s, port in turns:
                    start = time.monotonic_ns()
                    try:
                        s.sendto(b"f", (host, port))
                        passed = 1
                    except OSError as e:
                        passed = 0
                        if e.errno != errno.EPERM:
                            other[errno.errorcode.get(e.errno or 0, str(e))] += 1
                    log.append((start, time.monotonic_ns(), port, passed))
                    time.sleep(interval)
        finally:
            for s in sockets:
                s.close()

    thread = threading.Thread(target=run, daemon=True)
    _flood.update(stop=stop, thread=thread, log=log, other=other)
    thread.start()
    return {"ok": True}


def flood_stop() -> dict[str, Any]:
    _flood["stop"].set()
    _flood["thread"].join()
    return {"log": _flood["log"], "other": dict(_flood["other"])}


def hold(req: dict[str, Any]) -> dict[str, Any]:
    if req["proto"] == "icmp":
        s = _raw(req.get("v6", False))
        _held[s.fileno()] = s
        return {"id": s.fileno()}
    s = _socket(req["proto"], req["host"], req["port"], req.get("timeout", 1.0),
                req.get("source"))
    _held[s.fileno()] = s
    return {"id": s.fileno(), "local_port": s.getsockname()[1]}


def send(req: dict[str, Any]) -> dict[str, Any]:
    s = _held[req["id"]]
    if s.type == socket.SOCK_RAW:
        return ping(req["host"], req.get("timeout", 1.0), _held.pop(req["id"]))
    s.settimeout(req.get("timeout", 1.0))
    return _exchange(s, b"p" * req.get("size", 4))


OPS: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
    "listen": lambda r: listen(r["proto"], r.get("host", "0.0.0.0"), r.get("port", 0),
                               r.get("echo", True)),
    "batch": lambda r: batch(r["requests"]),
    "open": hold,
    "send": send,
    "flood": lambda r: flood(r["host"], r["ports"], r.get("interval", 0.001)),
    "flood_stop": lambda _: flood_stop(),
    "tcp": one,
    "udp": one,
    "ping": one,
}


def main() -> None:
    for line in sys.stdin:
        req = json.loads(line)
        try:
            answer = OPS[req["op"]](req)
        except TimeoutError:
            answer = {"error": "timeout"}
        except OSError as e:
            answer = _error(e)
        sys.stdout.write(json.dumps(answer) + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
