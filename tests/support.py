"""Real parts for integration tests: mosquitto, pymodbus servers, the agent process.

Everything binds to 127.0.0.1 on free ports and is stopped by the PID it was
started with.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import paho.mqtt.client as mqtt
import yaml
from paho.mqtt.enums import CallbackAPIVersion

MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, timeout: float = 10.0) -> None:
    """Block until 127.0.0.1:port accepts connections."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout} s")


@dataclass
class Broker:
    """A mosquitto process on 127.0.0.1:port."""

    port: int
    proc: subprocess.Popen[bytes]
    conf: Path

    def stop(self) -> None:
        """Terminate the broker (by its PID) and wait for it."""
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)


def start_broker(workdir: Path, extra_conf: str = "", port: int | None = None,
                 persist: Path | None = None) -> Broker:
    """Start mosquitto with an anonymous plain listener (or ``extra_conf`` instead).

    With ``persist`` (a directory), sessions and their queued messages are saved there
    when the broker is stopped (SIGTERM) and loaded again by the next one.
    """
    port = port or free_port()
    conf = workdir / f"mosquitto-{port}.conf"
    body = extra_conf or "allow_anonymous true\n"
    user = "user root\n" if os.geteuid() == 0 else ""  # keep access to files under /tmp
    keep = (f"persistence true\npersistence_location {persist}/\n" if persist
            else "persistence false\n")
    conf.write_text(
        f"{user}listener {port} 127.0.0.1\n{body}{keep}log_dest stderr\n"
        "log_type error\nlog_type warning\n"
    )
    log = (workdir / f"mosquitto-{port}.log").open("wb")
    proc = subprocess.Popen([MOSQUITTO, "-c", str(conf)], stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_port(port)
    except TimeoutError:
        proc.kill()
        raise
    return Broker(port, proc, conf)


@dataclass
class Message:
    """One received MQTT message."""

    topic: str
    payload: bytes
    retain: bool
    at: float
    qos: int = 0

    def json(self) -> Any:
        """The payload parsed as JSON."""
        return json.loads(self.payload)


@dataclass
class Subscriber:
    """Collects every message on ``topic_filter`` (QoS 1) into :attr:`messages`."""

    port: int
    topic_filter: str = "#"
    messages: list[Message] = field(default_factory=list)
    tls: dict[str, str] | None = None
    auth: tuple[str, str] | None = None
    persistent: bool = False
    """A session that the broker keeps (clean_session false), reconnecting within 0.2 s:
    with a persistent broker it misses nothing across a broker restart."""

    def __post_init__(self) -> None:
        self._cond = threading.Condition()
        self._ready = threading.Event()
        c = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2,
                        client_id=f"test-sub-{os.getpid()}-{id(self)}",
                        clean_session=not self.persistent)
        c.reconnect_delay_set(cast(int, 0.1), cast(int, 0.2))
        if self.tls:
            c.tls_set(**self.tls)
        if self.auth:
            c.username_pw_set(*self.auth)
        c.on_connect = lambda cl, *_: cl.subscribe(self.topic_filter, qos=1)
        c.on_subscribe = lambda *_: self._ready.set()
        c.on_message = self._on_message
        c.connect("127.0.0.1", self.port)
        c.loop_start()
        if not self._ready.wait(10):
            raise TimeoutError("subscriber did not get its SUBACK")
        self._client = c

    def _on_message(self, _c: mqtt.Client, _u: Any, msg: mqtt.MQTTMessage) -> None:
        with self._cond:
            self.messages.append(Message(msg.topic, msg.payload, bool(msg.retain), time.time(),
                                         msg.qos))
            self._cond.notify_all()

    def wait_for(self, pred: Callable[[Message], bool], count: int = 1,
                 timeout: float = 15.0) -> list[Message]:
        """Wait until ``count`` messages satisfy ``pred``; return them."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                found = [m for m in self.messages if pred(m)]
                if len(found) >= count:
                    return found[:count]
                left = deadline - time.monotonic()
                if left <= 0:
                    topics = sorted({m.topic for m in self.messages})
                    raise TimeoutError(f"{len(found)}/{count} matching messages; seen {topics}")
                self._cond.wait(left)

    def on(self, topic: str) -> list[Message]:
        """Messages received so far on exactly ``topic``."""
        with self._cond:
            return [m for m in self.messages if m.topic == topic]

    def publish(self, topic: str, payload: bytes) -> None:
        """Publish ``payload`` on ``topic`` (QoS 1, not retained) from this client."""
        self._client.publish(topic, payload, qos=1).wait_for_publish(5)

    def stop(self) -> None:
        """Disconnect."""
        self._client.disconnect()
        self._client.loop_stop()


@dataclass
class AgentProcess:
    """``python -m edge run -c FILE`` as a child process."""

    proc: subprocess.Popen[bytes]
    log: Path

    def stop(self, sig: int = signal.SIGTERM) -> int:
        """Send ``sig`` to the agent (by PID) and return its exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        return self.proc.returncode

    def output(self) -> str:
        """What the agent logged so far."""
        return self.log.read_text(errors="replace")


def edge_cli(*args: str, cwd: Path | None = None,
             timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run ``python -m edge ARGS`` to completion."""
    return subprocess.run([sys.executable, "-m", "edge", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout, check=False)


def start_edge(args: list[str], workdir: Path, name: str = "agent") -> AgentProcess:
    """Start ``python -m edge ARGS`` in the background, output to ``workdir/name.log``."""
    log = workdir / f"{name}.log"
    proc = subprocess.Popen([sys.executable, "-m", "edge", *args], cwd=workdir,
                            stdout=log.open("wb"), stderr=subprocess.STDOUT)
    return AgentProcess(proc, log)


@dataclass
class FaultProxyProcess:
    """``python -m edge faultproxy`` in front of 127.0.0.1:target (any TCP server)."""

    proc: subprocess.Popen[str]
    port: int
    control_port: int
    ready: str
    """The line the proxy printed when it was listening."""

    def control(self, *lines: str) -> list[dict[str, Any]]:
        """Send each line to the control port; its JSON answers, in order."""
        with socket.create_connection(("127.0.0.1", self.control_port), timeout=5) as s:
            f = s.makefile("rw")
            replies = []
            for line in lines:
                f.write(line + "\n")
                f.flush()
                replies.append(json.loads(f.readline()))
            return replies

    def stop(self) -> int:
        """Terminate the proxy (by its PID); its exit status."""
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)
        return self.proc.returncode


def start_faultproxy(target_port: int) -> FaultProxyProcess:
    """Start the CLI proxy on free ports and wait for its ready line."""
    listen, ctl = free_port(), free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "edge", "faultproxy", "--listen", f"127.0.0.1:{listen}",
         "--target", f"127.0.0.1:{target_port}", "--control", f"127.0.0.1:{ctl}"],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )
    assert proc.stdout is not None
    return FaultProxyProcess(proc, listen, ctl, proc.stdout.readline())


def write_agent_file(workdir: Path, broker_port: int, manifests: list[dict[str, Any]],
                     node: str = "gw-test", uplink: dict[str, Any] | None = None,
                     store: dict[str, Any] | None = None) -> Path:
    """Write ``edge.yaml`` and ``manifests.yaml`` (multi-document) into ``workdir``;
    the outbox is ``workdir/edge.db`` unless ``store`` says otherwise."""
    (workdir / "manifests.yaml").write_text(yaml.safe_dump_all(manifests, sort_keys=False))
    agent = {
        "node": node,
        "devices": ["./manifests.yaml"],
        "uplink": {"host": "127.0.0.1", "port": broker_port, "qos": 1, **(uplink or {})},
        "store": {"path": "./edge.db", **(store or {})},
        "web": {"listen": f"127.0.0.1:{free_port()}"},
        "log": {"level": "debug"},
    }
    path = workdir / "edge.yaml"
    path.write_text(yaml.safe_dump(agent, sort_keys=False))
    return path


LEVEL: list[dict[str, Any]] = [
    {"name": "level", "type": "INT", "collectCycle": 200,
     "visitor": {"register": "HoldingRegister", "offset": 0, "dataType": "int16"}}]
"""One int16 property in holding register 0, read every 200 ms (for device_docs)."""


def device_docs(name: str, port: int, unit: int, props: list[dict[str, Any]], *,
                namespace: str = "default", mode: str = "TCP",
                extra_config: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """A v1beta1 DeviceModel + Device pair.

    Each entry of ``props`` is ``{"name", "type", "visitor": {...configData...}}`` plus
    optional ``collectCycle``, ``accessMode``, ``minimum``, ``maximum``.
    """
    model = {
        "apiVersion": "devices.kubeedge.io/v1beta1",
        "kind": "DeviceModel",
        "metadata": {"name": f"{name}-model", "namespace": namespace},
        "spec": {"protocol": "modbus", "properties": [
            {k: v for k, v in {
                "name": p["name"], "type": p["type"],
                "accessMode": p.get("accessMode", "ReadOnly"),
                "minimum": p.get("minimum"), "maximum": p.get("maximum"),
            }.items() if v is not None}
            for p in props
        ]},
    }
    config: dict[str, Any] = {"communicateMode": mode, "slaveID": unit, "timeout": 300}
    if mode == "RTU":
        config["serialPort"] = str(port)
        config["baudRate"] = 19200
    else:
        config.update(ip="127.0.0.1", port=port)
    config.update(extra_config or {})
    device = {
        "apiVersion": "devices.kubeedge.io/v1beta1",
        "kind": "Device",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "deviceModelRef": {"name": f"{name}-model"},
            "protocol": {"protocolName": "modbus", "configData": config},
            "properties": [
                {"name": p["name"], "collectCycle": p.get("collectCycle", 200),
                 "visitors": {"protocolName": "modbus", "configData": p["visitor"]},
                 **({"pushMethod": p["pushMethod"]} if "pushMethod" in p else {})}
                for p in props
            ],
        },
    }
    return [model, device]


def iter_json(messages: list[Message]) -> Iterator[Any]:
    """Payloads of ``messages`` parsed as JSON."""
    for m in messages:
        yield m.json()


@dataclass
class Image:
    """The register image of one unit id: address i of each table holds ``table[i]``;
    holding register ``hr_start + i`` holds ``hr[i]`` (addresses below ``hr_start``
    answer ILLEGAL DATA ADDRESS)."""

    co: list[bool] = field(default_factory=lambda: [False])
    di: list[bool] = field(default_factory=lambda: [False])
    hr: list[int] = field(default_factory=lambda: [0])
    ir: list[int] = field(default_factory=lambda: [0])
    hr_start: int = 0


class ModbusServer:
    """A pymodbus 3 server (TCP, RTU over TCP, or serial RTU) in a thread of its own.

    ``identity`` (object id → value) is what it answers Read Device Identification
    (FC 43 / MEI 14) with, for every unit; None: ILLEGAL FUNCTION. Served by edge's
    simulator PDU (:func:`edge.modbus.sim_identification.identification_pdu`), per server:
    pymodbus's own ``identity=`` is process-wide.
    """

    def __init__(self, units: dict[int, Image], *, framing: str = "socket",
                 port: int | None = None, serial_port: str | None = None,
                 identity: Mapping[int, str | bytes] | None = None) -> None:
        import asyncio  # noqa: PLC0415

        from pymodbus.framer import FramerType  # noqa: PLC0415
        from pymodbus.server import ModbusSerialServer, ModbusTcpServer  # noqa: PLC0415
        from pymodbus.simulator import DataType, SimData, SimDevice  # noqa: PLC0415

        from edge.modbus.sim_identification import identification_pdu  # noqa: PLC0415

        def block(values: list[Any], kind: DataType, start: int = 0) -> list[SimData]:
            return [SimData(start, values=list(values), datatype=kind)]

        devices = [
            SimDevice(id=unit, simdata=(block(img.co, DataType.BITS), block(img.di, DataType.BITS),
                                        block(img.hr, DataType.REGISTERS, img.hr_start),
                                        block(img.ir, DataType.REGISTERS)))
            for unit, img in units.items()
        ]
        self.port = port or free_port()
        self.loop = asyncio.new_event_loop()
        self.server: Any = None
        started = threading.Event()
        custom = [identification_pdu(identity)]

        async def main() -> None:
            if serial_port:
                self.server = ModbusSerialServer(devices, port=serial_port, baudrate=19200,
                                                 custom_pdu=custom)
            else:
                framer = FramerType.SOCKET if framing == "socket" else FramerType.RTU
                self.server = ModbusTcpServer(devices, framer=framer,
                                              address=("127.0.0.1", self.port),
                                              custom_pdu=custom)
            await self.server.serve_forever(background=True)
            started.set()

        def run() -> None:
            asyncio.set_event_loop(self.loop)
            self.loop.run_until_complete(main())
            self.loop.run_forever()

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()
        if not started.wait(10):
            raise TimeoutError("pymodbus server did not start")
        if not serial_port:
            wait_port(self.port)

    def holding(self, unit: int, address: int, count: int = 1) -> list[int]:
        """Holding registers as the server stores them (FC 3 by pymodbus's own client,
        not through edge)."""
        return list(self._request(unit, "read_holding_registers", address, count=count).registers)

    def coils(self, unit: int, address: int, count: int = 1) -> list[bool]:
        """Coils as the server stores them (FC 1 by pymodbus's own client)."""
        return list(self._request(unit, "read_coils", address, count=count).bits[:count])

    def set_holding(self, unit: int, address: int, values: list[int]) -> None:
        """Change holding registers as an operator at the device would (FC 16 by
        pymodbus's own client)."""
        self._request(unit, "write_registers", address, values)

    def _request(self, unit: int, function: str, *args: Any, **kwargs: Any) -> Any:
        from pymodbus.client import ModbusTcpClient  # noqa: PLC0415

        client = ModbusTcpClient("127.0.0.1", port=self.port, timeout=2)
        try:
            client.connect()
            reply = getattr(client, function)(*args, device_id=unit, **kwargs)
            assert not reply.isError(), reply
            return reply
        finally:
            client.close()

    def stop(self) -> None:
        """Shut the server down and end its thread."""
        import asyncio  # noqa: PLC0415

        asyncio.run_coroutine_threadsafe(self.server.shutdown(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


@dataclass
class PtyPair:
    """Two linked pseudo-terminals made by socat: a serial line in a box."""

    a: str
    b: str
    proc: subprocess.Popen[bytes]

    def stop(self) -> None:
        """Terminate socat (by its PID)."""
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(5)


def start_pty_pair(workdir: Path) -> PtyPair:
    """``socat pty,raw,echo=0,link=A pty,raw,echo=0,link=B``; waits for both links."""
    a, b = workdir / "ttyA", workdir / "ttyB"
    proc = subprocess.Popen(
        ["socat", f"pty,raw,echo=0,link={a}", f"pty,raw,echo=0,link={b}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 5
    while not (a.exists() and b.exists()):
        if time.monotonic() > deadline:
            proc.kill()
            raise TimeoutError("socat did not create the pty pair")
        time.sleep(0.02)
    return PtyPair(str(a), str(b), proc)


class Gateway:
    """One gateway under test: an agent file that trusts a fresh cloud key (``key``,
    ``key_file``), its manifests ``docs``, and the broker; pushes signed bundles."""

    def __init__(self, tmp_path: Path, broker: Broker, docs: list[dict[str, Any]], *,
                 node: str, health_window: float = 2) -> None:
        from edge.sync.bundle import load_private_key, new_key_pair  # noqa: PLC0415

        self.tmp, self.broker, self.node = tmp_path, broker, node
        self.prefix = f"edge/v1/{node}"
        self.started: list[AgentProcess] = []
        private_pem, public_pem = new_key_pair()
        self.key = load_private_key(private_pem)
        (tmp_path / "cloud.pub").write_bytes(public_pem)
        self.key_file = tmp_path / "cloud.key"
        self.key_file.write_bytes(private_pem)
        (tmp_path / "manifests.yaml").write_text(yaml.safe_dump_all(docs))
        self.agent_file = tmp_path / "edge.yaml"
        self.agent_file.write_text(yaml.safe_dump({
            "node": node, "devices": ["./manifests.yaml"],
            "uplink": {"host": "127.0.0.1", "port": broker.port},
            "store": {"path": "./edge.db"}, "trust": {"keys": ["./cloud.pub"]},
            "sync": {"health_window": health_window}, "modbus": {"probe_initial_ms": 5000},
            "web": {"listen": f"127.0.0.1:{free_port()}"},
        }))

    def start(self) -> AgentProcess:
        """Start the agent (also kept in :attr:`started`)."""
        agent = start_edge(["run", "-c", str(self.agent_file)], self.tmp)
        self.started.append(agent)
        return agent

    def push(self, version: int, devices: list[dict[str, Any]], *,
             key: Any = None, raw: bytes | None = None,
             agent: dict[str, Any] | None = None,
             plugins: list[dict[str, Any]] | None = None,
             policies: list[dict[str, Any]] | None = None) -> None:
        """Publish bundle ``version`` with the manifests ``devices``, the agent-file
        sections ``agent``, the plugin manifests ``plugins`` and the NetworkPolicy
        documents ``policies`` (signed by ``key``, default the trusted one; ``raw``:
        these bytes instead)."""
        from datetime import UTC, datetime, timedelta  # noqa: PLC0415

        from edge.cloud import publish_retained  # noqa: PLC0415
        from edge.sync.bundle import rfc3339, sign  # noqa: PLC0415

        now = datetime.now(UTC)
        body = {"version": version, "node": self.node, "issued_at": rfc3339(now),
                "expires_at": rfc3339(now + timedelta(hours=1)), "policies": policies or [],
                "plugins": plugins or [], "agent": agent or {},
                "deviceModels": [d for d in devices if d["kind"] == "DeviceModel"],
                "devices": [d for d in devices if d["kind"] == "Device"]}
        token = raw if raw is not None else sign(body, key or self.key)
        publish_retained("127.0.0.1", self.broker.port, [(f"{self.prefix}/desired", token)])


def events(sub: Subscriber, prefix: str, kind: str) -> list[dict[str, Any]]:
    """The events of ``kind`` received on ``prefix/events``."""
    return [e for m in sub.on(f"{prefix}/events") if (e := m.json())["type"] == kind]


def wait_event(sub: Subscriber, prefix: str, kind: str, timeout: float = 20,
               **fields: Any) -> dict[str, Any]:
    """The first event of ``kind`` on ``prefix/events`` whose ``fields`` match; when none
    comes in time, the TimeoutError lists every event seen (what happened instead)."""
    def match(m: Any) -> bool:
        if m.topic != f"{prefix}/events":
            return False
        e = m.json()
        return bool(e["type"] == kind and all(e.get(k) == v for k, v in fields.items()))
    try:
        return dict(sub.wait_for(match, timeout=timeout)[0].json())
    except TimeoutError as e:
        seen = "\n".join(m.payload.decode(errors="replace")[:400]
                         for m in sub.on(f"{prefix}/events"))
        raise TimeoutError(f"no {kind} event {fields}; events seen:\n{seen}") from e
