"""The `edge` command line as a user runs it: exit codes and what it prints."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import yaml
from paho.mqtt import publish
from support import (
    REPO,
    device_docs,
    edge_cli,
    free_port,
    start_broker,
    start_edge,
    write_agent_file,
)

from edge import __version__


def test_version() -> None:
    out = edge_cli("--version")
    assert out.returncode == 0
    assert __version__ in out.stdout


def test_check_accepts_the_examples() -> None:
    out = edge_cli("check", "-c", str(REPO / "examples" / "edge.yaml"))
    assert out.returncode == 0, out.stderr
    assert "OK" in out.stdout
    assert "4 device(s), 35 properties, 11 read request(s) per round, 1 plugin(s)" in out.stdout


def _bad_setup(tmp_path: Path) -> Path:
    docs = device_docs("meter", 1502, 1, [
        {"name": "a", "type": "INT",
         "visitor": {"register": "HoldingRegister", "offset": 70000, "dataType": "int16"}},
        {"name": "b", "type": "INT",
         "visitor": {"register": "FancyRegister", "offset": 1, "dataType": "int16"}},
    ])
    return write_agent_file(tmp_path, free_port(), docs)


def test_check_prints_every_error_and_fails(tmp_path: Path) -> None:
    out = edge_cli("check", "-c", str(_bad_setup(tmp_path)))
    assert out.returncode == 2
    lines = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) >= 2, out.stderr
    offset = next(line for line in lines if "offset" in line)
    assert "manifests.yaml" in offset
    assert "Device default/meter" in offset
    assert "spec.properties[0]" in offset
    assert "70000" in offset
    assert any("FancyRegister" in line and "spec.properties[1]" in line for line in lines)


def test_run_with_invalid_configuration_starts_nothing(tmp_path: Path) -> None:
    out = edge_cli("run", "-c", str(_bad_setup(tmp_path)), timeout=30)
    assert out.returncode == 2
    assert "nothing was started" in out.stderr


def test_check_missing_agent_file(tmp_path: Path) -> None:
    out = edge_cli("check", "-c", str(tmp_path / "nope.yaml"))
    assert out.returncode == 2
    assert "nope.yaml" in out.stderr
    assert "Traceback" not in out.stderr


def test_check_reports_unknown_agent_keys(tmp_path: Path) -> None:
    cfg = tmp_path / "edge.yaml"
    cfg.write_text(yaml.safe_dump({"node": "gw", "uplnk": {"host": "x"}}))
    out = edge_cli("check", "-c", str(cfg))
    assert out.returncode == 2
    assert "uplnk" in out.stderr


def test_tail_prints_what_the_agent_publishes_and_survives_a_closed_pipe(tmp_path: Path) -> None:
    broker = start_broker(tmp_path)
    cfg = write_agent_file(tmp_path, broker.port, [], node="gw-tail")
    agent = start_edge(["run", "-c", str(cfg)], tmp_path)
    try:
        out = edge_cli("tail", "-c", str(cfg), "--count", "1", timeout=30)
        assert out.returncode == 0, out.stderr
        assert out.stdout.startswith("state {"), out.stdout
        assert '"state":"online"' in out.stdout
        # `edge tail | head -c 1`: once head is gone, the next message must end tail
        tail = subprocess.Popen([sys.executable, "-m", "edge", "tail", "-c", str(cfg)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        assert tail.stdout is not None
        head = subprocess.run(["head", "-c", "1"], stdin=tail.stdout, capture_output=True,
                              timeout=30, check=False)
        tail.stdout.close()
        assert head.stdout == b"s"
        for _ in range(50):  # bounded: a few events until tail notices the closed pipe
            if tail.poll() is not None:
                break
            publish.single("edge/v1/gw-tail/events", b"{}", hostname="127.0.0.1",
                           port=broker.port)
            time.sleep(0.1)
        assert tail.wait(10) == 0
        assert tail.stderr is not None
        assert b"Traceback" not in tail.stderr.read()
    finally:
        agent.stop()
        broker.stop()


def test_tail_with_a_session_gets_what_was_published_while_it_was_away(tmp_path: Path) -> None:
    broker = start_broker(tmp_path)
    cfg = write_agent_file(tmp_path, broker.port, [], node="gw-away")

    def event(n: int) -> None:
        publish.single("edge/v1/gw-away/events", json.dumps({"n": n}), qos=1,
                       hostname="127.0.0.1", port=broker.port)

    tail = subprocess.Popen([sys.executable, "-m", "edge", "tail", "-c", str(cfg),
                             "--session", "watcher"], stdout=subprocess.PIPE, text=True)
    try:
        assert tail.stdout is not None
        event(1)  # may come before tail subscribed: then the next one is seen
        seen = threading.Thread(target=tail.stdout.readline)
        seen.start()
        for _ in range(100):
            seen.join(0.1)
            if not seen.is_alive():
                break
            event(1)
        assert not seen.is_alive(), "tail never printed anything"
        time.sleep(0.5)  # the last event(1)s are delivered and acknowledged
        tail.send_signal(signal.SIGINT)
        assert tail.wait(10) == 0
        event(2)  # nobody connected: the broker keeps it for the session
        out = edge_cli("tail", "-c", str(cfg), "--session", "watcher", "--count", "1",
                       timeout=30)
        assert out.returncode == 0, out.stderr
        assert out.stdout == 'events {"n":2}\n'
    finally:
        if tail.poll() is None:
            tail.kill()
        broker.stop()


def test_tail_shows_a_signed_bundle_as_its_size(tmp_path: Path) -> None:
    broker = start_broker(tmp_path)
    try:
        cfg = write_agent_file(tmp_path, broker.port, [], node="gw-jws")
        publish.single("edge/v1/gw-jws/desired", b"aGVhZA.Ym9keQ.c2ln", qos=1, retain=True,
                       hostname="127.0.0.1", port=broker.port)
        out = edge_cli("tail", "-c", str(cfg), "--count", "1", timeout=30)
        assert out.stdout == "desired (signed, 18 bytes)\n"
    finally:
        broker.stop()


def test_simulate_on_a_busy_port_says_which_endpoint(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        docs = device_docs("meter", port, 1, [
            {"name": "a", "type": "INT",
             "visitor": {"register": "HoldingRegister", "offset": 0, "dataType": "int16"}}])
        cfg = write_agent_file(tmp_path, free_port(), docs)
        out = edge_cli("simulate", "-c", str(cfg), timeout=30)
    assert out.returncode == 1
    assert f"cannot serve tcp://127.0.0.1:{port}" in out.stderr
    assert "Traceback" not in out.stderr
