"""The MQTT uplink against real mosquitto brokers: TLS, mutual TLS, passwords, QoS,
the LWT and a property's ``pushMethod.mqtt`` sink."""

from __future__ import annotations

import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from support import (
    Broker,
    Image,
    ModbusServer,
    Subscriber,
    device_docs,
    start_broker,
    start_edge,
    write_agent_file,
)

from edge.uplink.client import BrokerClient
from edge.uplink.settings import BrokerSettings

PREFIX = "edge/v1/gw-test"
LEVEL = [{"name": "level", "type": "INT",
          "visitor": {"register": "HoldingRegister", "offset": 0, "dataType": "uint16"}}]


def openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CA, a server certificate for 127.0.0.1 and a client certificate (EC P-256)."""
    d = tmp_path_factory.mktemp("pki")
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    openssl("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.crt", "-days", "2",
            "-subj", "/CN=edge-test-ca", cwd=d)
    (d / "san.ext").write_text("subjectAltName=IP:127.0.0.1\n")
    for name, cn in (("server", "127.0.0.1"), ("client", "gw-test")):
        openssl("req", *ec, "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj",
                f"/CN={cn}", cwd=d)
        openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
                "-CAcreateserial", "-out", f"{name}.crt", "-days", "2",
                *(["-extfile", "san.ext"] if name == "server" else []), cwd=d)
    return d


@pytest.fixture
def device() -> Iterator[ModbusServer]:
    server = ModbusServer({1: Image(hr=[4242])})
    yield server
    server.stop()


def mtls_broker(tmp_path: Path, pki: Path) -> tuple[Broker, Subscriber]:
    """A broker that requires a client certificate, and a subscriber that has one."""
    broker = start_broker(tmp_path, (
        f"cafile {pki}/ca.crt\ncertfile {pki}/server.crt\nkeyfile {pki}/server.key\n"
        "require_certificate true\nuse_identity_as_username true\nallow_anonymous false\n"
    ))
    client_tls = {"ca_certs": str(pki / "ca.crt"), "certfile": str(pki / "client.crt"),
                  "keyfile": str(pki / "client.key")}
    return broker, Subscriber(broker.port, f"{PREFIX}/#", tls=client_tls)


def first_value(sub: Subscriber) -> Any:
    topic = f"{PREFIX}/telemetry/default/tank"
    return sub.wait_for(lambda m: m.topic == topic)[0].json()["values"]


def test_tls_with_client_certificate(tmp_path: Path, pki: Path, device: ModbusServer) -> None:
    broker, sub = mtls_broker(tmp_path, pki)
    cfg = write_agent_file(tmp_path, broker.port, device_docs("tank", device.port, 1, LEVEL),
                           uplink={"tls": {"ca": str(pki / "ca.crt"),
                                           "cert": str(pki / "client.crt"),
                                           "key": str(pki / "client.key")}})
    agent = start_edge(["run", "-c", str(cfg)], tmp_path)
    try:
        assert first_value(sub) == {"level": 4242}
    finally:
        agent.stop()
        sub.stop()
        broker.stop()


def test_tls_broker_refuses_agent_without_client_certificate(
    tmp_path: Path, pki: Path, device: ModbusServer
) -> None:
    broker, sub = mtls_broker(tmp_path, pki)
    cfg = write_agent_file(tmp_path, broker.port, device_docs("tank", device.port, 1, LEVEL),
                           uplink={"tls": {"ca": str(pki / "ca.crt")}})
    agent = start_edge(["run", "-c", str(cfg)], tmp_path)
    try:
        with pytest.raises(TimeoutError):
            sub.wait_for(lambda m: m.topic.startswith(PREFIX), timeout=3)
        assert agent.proc.poll() is None, "a refused uplink must not end the agent"
    finally:
        agent.stop()
        sub.stop()
        broker.stop()


def test_username_and_password_file(tmp_path: Path, device: ModbusServer) -> None:
    pw = tmp_path / "mosquitto.passwd"
    subprocess.run(["mosquitto_passwd", "-c", "-b", str(pw), "gw", "s3cret"], check=True)
    broker = start_broker(tmp_path, f"allow_anonymous false\npassword_file {pw}\n")
    sub = Subscriber(broker.port, f"{PREFIX}/#", auth=("gw", "s3cret"))
    (tmp_path / "uplink.password").write_text("s3cret\n")
    cfg = write_agent_file(tmp_path, broker.port, device_docs("tank", device.port, 1, LEVEL),
                           uplink={"username": "gw", "password_file": "uplink.password"})
    agent = start_edge(["run", "-c", str(cfg)], tmp_path)
    try:
        assert first_value(sub) == {"level": 4242}
        assert "s3cret" not in agent.output()
    finally:
        agent.stop()
        sub.stop()
        broker.stop()


@pytest.mark.parametrize("qos", [0, 1])
def test_configured_qos_is_used(tmp_path: Path, device: ModbusServer, qos: int) -> None:
    broker = start_broker(tmp_path)
    sub = Subscriber(broker.port, f"{PREFIX}/#")
    cfg = write_agent_file(tmp_path, broker.port, device_docs("tank", device.port, 1, LEVEL),
                           uplink={"qos": qos})
    agent = start_edge(["run", "-c", str(cfg)], tmp_path)
    try:
        # the subscriber asks for QoS 1: what it gets is the publisher's QoS
        got = sub.wait_for(lambda m: m.topic.endswith("/telemetry/default/tank"))[0]
        assert got.qos == qos
    finally:
        agent.stop()
        sub.stop()
        broker.stop()


def test_push_method_mqtt_sends_property_to_its_own_broker_and_topic(
    tmp_path: Path, device: ModbusServer
) -> None:
    uplink, sink = start_broker(tmp_path), start_broker(tmp_path)
    sink_sub = Subscriber(sink.port, "plant/#")
    props = [{**LEVEL[0], "pushMethod": {"mqtt": {
        "address": f"tcp://127.0.0.1:{sink.port}", "topic": "plant/tank/level", "qos": 1,
        "retained": True}}}]
    cfg = write_agent_file(tmp_path, uplink.port, device_docs("tank", device.port, 1, props))
    agent = start_edge(["run", "-c", str(cfg)], tmp_path)
    try:
        msg = sink_sub.wait_for(lambda m: m.topic == "plant/tank/level")[0]
        body = msg.json()
        assert body["value"] == 4242
        assert (body["device"], body["namespace"], body["property"]) == ("tank", "default",
                                                                          "level")
        late = Subscriber(sink.port, "plant/#")
        assert late.wait_for(lambda m: m.retain)[0].json()["value"] == 4242
        late.stop()
    finally:
        agent.stop()
        sink_sub.stop()
        for b in (uplink, sink):
            b.stop()



def test_uplink_socket_sends_without_nagle_delay(tmp_path: Path) -> None:
    broker = start_broker(tmp_path)
    client = BrokerClient(BrokerSettings(host="127.0.0.1", port=broker.port, client_id="nd"))
    client.start()
    try:
        deadline = time.monotonic() + 10
        while not client.stats.connected and time.monotonic() < deadline:
            time.sleep(0.02)
        sock = client.paho.socket()
        assert isinstance(sock, socket.socket)
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1
    finally:
        client.stop()
        broker.stop()


def test_broker_that_accepts_and_never_answers_is_reported(tmp_path: Path) -> None:
    with socket.socket() as mute:  # accepts connections (backlog), never speaks MQTT
        mute.bind(("127.0.0.1", 0))
        mute.listen(16)
        cfg = write_agent_file(tmp_path, mute.getsockname()[1], [])
        agent = start_edge(["run", "-c", str(cfg)], tmp_path)
        try:
            deadline = time.monotonic() + 30
            while "not connected to the MQTT broker" not in agent.output():
                assert time.monotonic() < deadline, agent.output()
                assert agent.proc.poll() is None, agent.output()
                time.sleep(0.2)
        finally:
            assert agent.stop() == 0, agent.output()
