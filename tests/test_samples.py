"""The upstream KubeEdge samples, with only their address changed, run end to end.

v1beta1 (kubeedge/examples temperature demo: TCP, ``port: "5502"`` as a string,
``dataType: float`` with limit 1) and v1alpha2 (kubeedge crd-samples: a TCP device and
an RTU device on ``/dev/ttyS0``, here a pty pair). `edge simulate` serves them,
`edge run` polls them, and every property arrives with a value its type allows.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import yaml
from conftest import StopLater
from support import (
    Subscriber,
    free_port,
    start_broker,
    start_edge,
    start_pty_pair,
    wait_port,
)

CASES = Path(__file__).parent / "cases"


def _agent_file(path: Path, node: str, broker_port: int, manifests: str) -> Path:
    path.write_text(yaml.safe_dump({
        "node": node, "devices": [manifests],
        "uplink": {"host": "127.0.0.1", "port": broker_port}, "log": {"level": "debug"},
        "store": {"path": "./edge.db"},
    }))
    return path


def _replace(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text, f"{old!r} not in {path}"
    path.write_text(text.replace(old, new))


def test_v1beta1_temperature_demo(tmp_path: Path, stop_later: StopLater) -> None:
    shutil.copytree(CASES / "sample_v1beta1_temperature_demo" / "manifests", tmp_path / "m")
    port = free_port()
    _replace(tmp_path / "m" / "temperature-instance.yaml", 'port: "5502"', f'port: "{port}"')
    _replace(tmp_path / "m" / "temperature-instance.yaml", '"10.244.1.13"', '"127.0.0.1"')
    broker = stop_later(start_broker(tmp_path))
    # the sample is bound to nodeName kind-worker: the agent runs as that node
    cfg = _agent_file(tmp_path / "edge.yaml", "kind-worker", broker.port, "./m")
    stop_later(start_edge(["simulate", "-c", str(cfg)], tmp_path, name="simulate"))
    wait_port(port)
    sub = stop_later(Subscriber(broker.port, "edge/v1/kind-worker/#"))
    stop_later(start_edge(["run", "-c", str(cfg)], tmp_path))
    got = sub.wait_for(
        lambda m: m.topic == "edge/v1/kind-worker/telemetry/default/temperature-instance"
    )[0].json()
    values = got["values"]
    assert set(values) == {"temperature", "temperature-switch"}
    assert 0 <= values["temperature"] <= 100  # the model's minimum..maximum
    assert values["temperature-switch"] in (0, 1)


def test_v1alpha2_crd_samples_tcp_and_rtu(tmp_path: Path, stop_later: StopLater) -> None:
    src = CASES / "sample_v1alpha2_crd_samples" / "manifests"
    pty = stop_later(start_pty_pair(tmp_path))
    port = free_port()
    for side, tty in (("agent", pty.b), ("sim", pty.a)):
        shutil.copytree(src, tmp_path / side)
        _replace(tmp_path / side / "modbustcp-device-instance.yaml", '"192.168.33.1"',
                 '"127.0.0.1"')
        _replace(tmp_path / side / "modbustcp-device-instance.yaml", "port: 502",
                 f"port: {port}")
        rtu = tmp_path / side / "modbusrtu-device-instance.yaml"
        _replace(rtu, "'/dev/ttyS0'", f"'{tty}'")
        # a pty refuses even parity (EINVAL from tcsetattr on this kernel); a pty has no
        # parity bit to carry anyway, so the line settings are the only other change
        _replace(rtu, "parity: even", "parity: none")
    broker = stop_later(start_broker(tmp_path))
    sim_cfg = _agent_file(tmp_path / "sim.yaml", "test", broker.port, "./sim")
    cfg = _agent_file(tmp_path / "edge.yaml", "test", broker.port, "./agent")
    stop_later(start_edge(["simulate", "-c", str(sim_cfg)], tmp_path, name="simulate"))
    wait_port(port)
    sub = stop_later(Subscriber(broker.port, "edge/v1/test/#"))
    stop_later(start_edge(["run", "-c", str(cfg)], tmp_path))
    for name in ("modbustcp-device", "modbusrtu-device"):
        topic = f"edge/v1/test/telemetry/default/{name}"
        got = sub.wait_for(lambda m, t=topic: m.topic == t and
                           "temperature-enable" in m.json()["values"])[0].json()
        assert got["values"]["temperature-enable"] in (0, 1), got
        assert "quality" not in got, got
