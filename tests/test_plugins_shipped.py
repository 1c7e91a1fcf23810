"""The plugins edge ships (plugins/), loaded through their manifests as the agent loads
them, answer known batches with exactly the expected JSON."""

from __future__ import annotations

import dataclasses
import json
import math
import random
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from edge.config.load import load_config
from edge.wasm.instance import Instance, PluginError, Runtime
from edge.wasm.spec import PluginSpec

PLUGINS_DIR = Path(__file__).resolve().parent.parent / "plugins"


@pytest.fixture
def runtime() -> Iterator[Runtime]:
    r = Runtime()
    yield r
    r.stop()


def shipped(tmp_path: Path, name: str) -> PluginSpec:
    """Plugin ``name`` as `edge check` validates it from plugins/<name>/manifest.yaml."""
    agent = tmp_path / "edge.yaml"
    agent.write_text(yaml.safe_dump({"node": "gw", "store": {"path": str(tmp_path / "e.db")},
                                     "plugins": {"dir": str(PLUGINS_DIR / name)}}))
    [spec] = load_config(agent).plugins
    return spec


def instance(runtime: Runtime, spec: PluginSpec) -> Instance:
    module = runtime.compile(spec.wasm.read_bytes(), spec.sha256)
    inst = Instance(runtime, module, spec)
    inst.init(spec.config.encode())
    return inst


def batch(seq: int, ts: int, values: str, quality: str = "{}", device: str = "meter-1") -> bytes:
    return (f'[{{"namespace":"default","device":"{device}","ts":{ts},"seq":{seq},'
            f'"values":{values},"quality":{quality}}}]').encode()


def test_deadband_reports_by_exception(tmp_path: Path, runtime: Runtime) -> None:
    p = instance(runtime, shipped(tmp_path, "deadband"))
    first = batch(42, 1764763200000, '{"voltage":230.1,"current":5.2,"on":true,"mode":"auto"}',
                  '{"power":"bad"}')
    assert p.process(first) == first  # nothing known yet: everything goes
    second = batch(43, 1764763201000,
                   '{"voltage":230.9,"current":5.3,"on":true,"mode":"manual"}')
    # voltage moved 0.8 (< 1.0), current 0.1 (> 0.05), mode changed, on did not
    assert p.process(second) == batch(43, 1764763201000, '{"current":5.3,"mode":"manual"}')
    third = batch(44, 1764763202000,
                  '{"voltage":230.9,"current":5.3,"on":true,"mode":"manual"}')
    assert p.process(third) == b""  # nothing moved: the reading is dropped
    other = batch(1, 1764763202000, '{"voltage":230.9}', device="meter-2")
    assert p.process(other) == other  # per device
    later = batch(45, 1764763200000 + 300_000, '{"voltage":230.1,"current":5.3}')
    # unchanged, but voltage was last reported 300 s ago (the heartbeat), current 299 s
    assert p.process(later) == batch(45, 1764763200000 + 300_000, '{"voltage":230.1}')


def test_derive_adds_computed_values(tmp_path: Path, runtime: Runtime) -> None:
    p = instance(runtime, shipped(tmp_path, "derive"))
    values = ('{"voltage":230.1,"current":5.2,"p1":1000,"p2":-250.5,"p3":1e-7,'
              '"q1":100,"q2":100,"q3":100}')
    assert p.process(batch(42, 1764763200000, values)) == batch(
        42, 1764763200000, values[:-1] + ',"apparent_power":1196.52,"p_total":749.5000001,'
        '"q_total":300,"pf":0.9283912400802012}')
    partial = batch(43, 1764763200100, '{"voltage":230.1,"p1":1,"p2":2}', '{"p3":"bad"}')
    # current and p3 are missing: their outputs are bad; no q at all: q_total is left out
    assert p.process(partial) == batch(
        43, 1764763200100, '{"voltage":230.1,"p1":1,"p2":2}',
        '{"p3":"bad","apparent_power":"bad","p_total":"bad","pf":"bad"}')


def test_units_converts_and_renames(tmp_path: Path, runtime: Runtime) -> None:
    p = instance(runtime, shipped(tmp_path, "units"))
    got = p.process(batch(42, 1764763200000, '{"temperature":21.5,"energy":123456.7,'
                          '"pressure":1013.25,"mode":"auto"}', '{"power":"bad"}',
                          device="boiler-1"))
    assert got == batch(42, 1764763200000, '{"temperature":70.7,"energy_kwh":123.4567,'
                        '"pressure":14.695948775513449,"mode":"auto"}', '{"power":"bad"}',
                        device="boiler-1")
    negative = batch(43, 1764763200000, '{"temperature":-40}', device="boiler-1")
    assert p.process(negative) == batch(43, 1764763200000, '{"temperature":-40}',
                                        device="boiler-1")  # -40 °C is -40 °F


@pytest.mark.parametrize(("name", "config", "logged"), [
    ("derive", '{"outputs":[{"name":"x","expr":"a * (b"}]}', "expected ')' at column 7"),
    ("units", '{"convert":{"t":{"from":"degC","to":"kWh"}}}', "degC"),
    ("deadband", '{"deadband":"wide"}', "deadband"),
])
def test_a_bad_config_is_refused_by_init(tmp_path: Path, runtime: Runtime, name: str,
                                         config: str, logged: str,
                                         caplog: pytest.LogCaptureFixture) -> None:
    spec = shipped(tmp_path, name)
    module = runtime.compile(spec.wasm.read_bytes(), spec.sha256)
    with pytest.raises(PluginError) as e:
        Instance(runtime, module, spec).init(config.encode())
    assert e.value.kind == "refused"
    assert any(logged in r.getMessage() for r in caplog.records
               if r.name == f"edge.plugin.{name}")


def test_numbers_are_read_and_written_exactly(tmp_path: Path, runtime: Runtime) -> None:
    """The shared C code's number parsing (Clinger's fast path, else strtod) and
    printing round-trip every double as Python reads it: y = x through derive."""
    spec = dataclasses.replace(shipped(tmp_path, "derive"),
                               config='{"outputs":[{"name":"y","expr":"x"}]}')
    p = instance(runtime, spec)
    rng = random.Random(7)
    texts = ["0", "-0", "1", "-1", "0.1", "1e-7", "1E+22", "9007199254740993",
             "9007199254740992", "123456789012345678", "4.9e-324", "1.7976931348623157e308",
             "229.8000030517578", "2.2250738585072014e-308", "0.30000000000000004", "1e23"]
    texts += [repr(rng.uniform(-1e6, 1e6)) for _ in range(300)]
    texts += [repr(struct.unpack(">d", rng.randbytes(8))[0]) for _ in range(300)]
    texts += [f"{rng.randint(-10**9, 10**9)}.{rng.randint(0, 999):03d}" for _ in range(300)]
    texts += [f"{rng.randint(1, 99999)}e{rng.randint(-30, 30)}" for _ in range(300)]
    texts = [t for t in texts if math.isfinite(float(t))]
    for seq, text in enumerate(texts, start=1):
        answer = json.loads(p.process(batch(seq, 1, f'{{"x":{text}}}')))
        assert answer[0]["values"]["y"] == float(text), text


def test_derive_reads_bracketed_names(tmp_path: Path, runtime: Runtime) -> None:
    spec = dataclasses.replace(shipped(tmp_path, "derive"), config=(
        '{"outputs":[{"name":"power-l1","expr":"[voltage-l1] * [current-l1]"}]}'))
    p = instance(runtime, spec)
    values = '{"voltage-l1":230.1,"current-l1":5.2}'
    assert p.process(batch(1, 1, values)) == batch(1, 1, values[:-1] + ',"power-l1":1196.52}')
