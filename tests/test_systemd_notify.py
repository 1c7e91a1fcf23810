"""sd_notify(3) as systemd sees it under Type=notify and WatchdogSec: a real datagram
socket stands where systemd's would, and `edge run` talks to it."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from support import start_broker

from edge.systemd import Notifier


def notify_socket(path: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(10)
    return sock


def messages(sock: socket.socket, until: str, within: float = 20.0) -> list[str]:
    """Every message received until one holding ``until``."""
    got: list[str] = []
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        got.append(sock.recv(4096).decode())
        if until in got[-1]:
            return got
    pytest.fail(f"no {until} within {within} s: {got}")


def test_edge_run_is_ready_keeps_the_watchdog_fed_and_says_it_stops(tmp_path: Path) -> None:
    broker = start_broker(tmp_path)
    cfg = tmp_path / "edge.yaml"
    cfg.write_text(yaml.safe_dump({"node": "gw", "uplink": {"port": broker.port},
                                   "store": {"path": str(tmp_path / "edge.db")}}))
    sock = notify_socket(str(tmp_path / "notify"))
    env = {**os.environ, "NOTIFY_SOCKET": str(tmp_path / "notify"), "WATCHDOG_USEC": "400000"}
    agent = subprocess.Popen([sys.executable, "-m", "edge", "run", "-c", str(cfg)],
                             cwd=tmp_path, env=env, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    try:
        first = messages(sock, "READY=1")
        assert "STATUS=polling 0 devices, publishing to 127.0.0.1:" in first[-1]
        fed: list[str] = []
        while len(fed) < 4:  # fed again and again, not once
            fed += [m for m in messages(sock, "WATCHDOG=1") if m == "WATCHDOG=1"]
        agent.send_signal(signal.SIGTERM)
        assert "STOPPING=1" in messages(sock, "STOPPING=1")[-1]
        assert agent.wait(15) == 0
    finally:
        if agent.poll() is None:
            agent.kill()
            agent.wait(5)
        sock.close()
        broker.stop()


def test_an_abstract_socket_and_a_watchdog_meant_for_another_process() -> None:
    name = f"edge-test-{os.getpid()}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0" + name)
    sock.settimeout(5)
    try:
        notifier = Notifier({"NOTIFY_SOCKET": "@" + name, "WATCHDOG_USEC": "1000000"})
        assert notifier.watchdog_s == 1.0
        notifier.send("READY=1", "STATUS=up")
        assert sock.recv(100) == b"READY=1\nSTATUS=up"
    finally:
        sock.close()
    other = Notifier({"NOTIFY_SOCKET": "@" + name, "WATCHDOG_USEC": "1000000",
                      "WATCHDOG_PID": str(os.getpid() + 1)})
    assert other.watchdog_s is None  # systemd watches another process: no keepalive


def test_without_systemd_nothing_is_sent_and_a_gone_socket_is_not_fatal(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    assert Notifier({}).address == ""
    Notifier({}).send("READY=1")  # nothing to send to: no error
    gone = Notifier({"NOTIFY_SOCKET": str(tmp_path / "missing")})
    gone.send("READY=1")
    gone.send("WATCHDOG=1")  # never raised, logged once
    assert [r.getMessage().split(":")[0] for r in caplog.records] == [
        f"cannot notify systemd at {tmp_path / 'missing'}"]
