"""A probe for the datapath tests, run inside a test cgroup or network namespace: one
JSON request per stdin line, one JSON answer per stdout line.

``{"op": "listen", "proto": "tcp"|"udp", "host": "0.0.0.0", "port": 0}``
    an echo server (in a thread); answers ``{"port": N}``.
``{"op": "tcp", "host": H, "port": P, "timeout": s}``
    connect, send ``ping``, read the echo: ``{"ok": true}`` or ``{"error": NAME}``
    (``timeout``, or the errno's name: ``EPERM`` for a send the kernel dropped).
``{"op": "udp", ...}``
    the same with one datagram (a fresh socket each time).
"""

from __future__ import annotations

import contextlib
import errno
import json
import socket
import sys
import threading
from typing import Any


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def _serve_tcp(srv: socket.socket) -> None:
    while True:
        conn, _ = srv.accept()
        threading.Thread(target=_echo, args=(conn,), daemon=True).start()


def _echo(conn: socket.socket) -> None:
    with conn, contextlib.suppress(OSError):
        while data := conn.recv(65536):
            conn.sendall(data)


def _serve_udp(srv: socket.socket) -> None:
    while True:
        with contextlib.suppress(OSError):
            data, peer = srv.recvfrom(65536)
            srv.sendto(data, peer)


def listen(proto: str, host: str, port: int) -> dict[str, Any]:
    kind = socket.SOCK_STREAM if proto == "tcp" else socket.SOCK_DGRAM
    srv = socket.socket(_family(host), kind)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind((host, port))
    if proto == "tcp":
        srv.listen(64)
    threading.Thread(target=_serve_tcp if proto == "tcp" else _serve_udp, args=(srv,),
                     daemon=True).start()
    return {"port": srv.getsockname()[1]}


def connect(proto: str, host: str, port: int, timeout: float, size: int) -> dict[str, Any]:
    kind = socket.SOCK_STREAM if proto == "tcp" else socket.SOCK_DGRAM
    payload = b"p" * size
    with socket.socket(_family(host), kind) as s:
        s.settimeout(timeout)
        try:
            if proto == "tcp":
                s.connect((host, port))
                s.sendall(payload)
                got = b""
                while len(got) < len(payload):
                    chunk = s.recv(65536)
                    if not chunk:
                        return {"error": "closed"}
                    got += chunk
            else:
                s.sendto(payload, (host, port))
                s.recvfrom(65536)
        except TimeoutError:
            return {"error": "timeout"}
        except OSError as e:
            return {"error": errno.errorcode.get(e.errno or 0, str(e))}
        return {"ok": True, "local_port": s.getsockname()[1]}


def main() -> None:
    for line in sys.stdin:
        req = json.loads(line)
        try:
            if req["op"] == "listen":
                answer = listen(req["proto"], req.get("host", "0.0.0.0"), req.get("port", 0))
            else:
                answer = connect(req["op"], req["host"], req["port"],
                                 req.get("timeout", 1.0), req.get("size", 4))
        except OSError as e:
            answer = {"error": errno.errorcode.get(e.errno or 0, str(e))}
        sys.stdout.write(json.dumps(answer) + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
