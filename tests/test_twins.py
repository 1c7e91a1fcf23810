"""Device twins on the uplink: retained, KubeEdge-shaped, at each reportCycle, only
for reportToCloud properties (real agent, mosquitto, pymodbus)."""

from __future__ import annotations

import itertools
from pathlib import Path

from conftest import StopLater
from support import (
    Image,
    ModbusServer,
    Subscriber,
    device_docs,
    start_broker,
    start_edge,
    write_agent_file,
)

PROPS = [
    {"name": "level", "type": "INT", "collectCycle": 100, "accessMode": "ReadWrite",
     "visitor": {"register": "HoldingRegister", "offset": 0, "dataType": "int16"}},
    {"name": "secret", "type": "INT", "collectCycle": 100,
     "visitor": {"register": "HoldingRegister", "offset": 1, "dataType": "int16"}},
]


def test_twins_report_at_the_report_cycle_only_what_goes_to_the_cloud(
    tmp_path: Path, stop_later: StopLater
) -> None:
    server = stop_later(ModbusServer({1: Image(hr=[11, 7])}))
    docs = device_docs("tank", server.port, 1, PROPS)
    level, secret = docs[1]["spec"]["properties"]
    level.update(reportCycle=1000, desired={"value": "42"})
    secret.update(reportToCloud=False)
    broker = stop_later(start_broker(tmp_path))
    topic = "edge/v1/gw-twin/twins/default/tank"
    sub = stop_later(Subscriber(broker.port, topic))
    agent = stop_later(start_edge(["run", "-c", str(write_agent_file(
        tmp_path, broker.port, docs, node="gw-twin"))], tmp_path))
    first = sub.wait_for(lambda m: True)[0]
    assert set(first.json()) == {"level"}  # secret is not reported to the cloud
    # the desired value is written; observedDesired is its read-back, then reported
    written = sub.wait_for(lambda m: "observedDesired" in m.json()["level"])[0].json()
    assert written["level"]["observedDesired"] == {"value": 42}
    assert server.holding(1, 0) == [42]
    sub.wait_for(lambda m: m.json()["level"]["reported"]["value"] == 42, timeout=5)
    sub.wait_for(lambda m: True, count=3, timeout=10)
    # (the twin is published again, same reported ts, when observedDesired is set)
    stamps = sorted({m.json()["level"]["reported"]["ts"] for m in sub.messages})
    gaps = [b - a for a, b in itertools.pairwise(stamps)]
    assert min(gaps) >= 1000  # once per reportCycle, though read every 100 ms
    # a new subscriber gets the twin at once: it is retained
    late = stop_later(Subscriber(broker.port, topic))
    assert late.wait_for(lambda m: m.retain, timeout=5)[0].json()["level"]["reported"]
    assert agent.stop() == 0
