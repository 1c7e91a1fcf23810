"""The plugin host with real wasmtime and real modules: limits, failures contained,
quarantine, hot swap and rollback, capabilities (edge.wasm)."""

from __future__ import annotations

import json
import logging
import sqlite3
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import wasmtime
from wasm_modules import (
    BOMB,
    COUNTS,
    ECHO,
    GARBAGE,
    KV_THEN_TRAP,
    LOGS,
    LOOP,
    NO_ROOM,
    REFUSES_CONFIG,
    START_LOOP,
    TABLE_BOMB,
    TRAP,
    TWO_MEMORIES,
    constant,
    spec,
    wasm,
)

from edge.reading import Reading
from edge.wasm.call import RawFunc
from edge.wasm.host import Plugins, decode, encode
from edge.wasm.instance import PluginError, Runtime
from edge.wasm.kv import KvStore

Events = list[tuple[str, dict[str, Any]]]


def reading(device: str = "a", seq: int = 1, **values: Any) -> Reading:
    return Reading("default", device, 1_764_763_200_000 + seq, seq, values or {"v": 1.5})


@pytest.fixture
def events() -> Events:
    return []


def recorder(events: Events) -> Callable[..., None]:
    """A publish_event that keeps what it is given."""
    def publish(event: str, /, **fields: Any) -> None:
        events.append((event, fields))
    return publish


@pytest.fixture
def host(tmp_path: Path, events: Events) -> Iterator[Plugins]:
    plugins = Plugins(Runtime(tmp_path / "cache"), KvStore(tmp_path / "plugins.db"),
                      recorder(events))
    yield plugins
    plugins.close()


def kinds(events: Events) -> list[str]:
    return [k for k, _ in events]


def test_echo_passes_readings_and_counts_calls(tmp_path: Path, host: Plugins,
                                               events: Events) -> None:
    host.configure([spec(tmp_path, "echo", ECHO)])
    r = reading(v=230.1, on=True, mode="auto")
    assert host.process(r) == [r]
    stats = host.stats()["echo"]
    assert (stats["calls"], stats["state"], stats["errors"], stats["instances"]) == (
        1, "running", 0, 1)
    assert stats["p50_us"] > 0
    assert kinds(events) == ["plugin_loaded"]


def test_the_answer_replaces_values_and_keeps_ts_and_seq(tmp_path: Path, host: Plugins) -> None:
    answer = ('[{"namespace":"default","device":"a","seq":1,"ts":5,'
              '"values":{"p":-1196.52,"n":3},"quality":{"q":"bad"}}]')
    host.configure([spec(tmp_path, "const", constant(answer))])
    [out] = host.process(reading())
    assert (out.ts_ms, out.seq, out.values, out.quality) == (
        1_764_763_200_001, 1, {"p": -1196.52, "n": 3}, {"q": "bad"})


def test_an_empty_answer_drops_the_batch(tmp_path: Path, host: Plugins) -> None:
    host.configure([spec(tmp_path, "drop", constant("[]"))])
    assert host.process(reading()) == []
    assert host.stats()["drop"]["errors"] == 0


def test_an_infinite_loop_is_stopped_at_its_timeout_and_the_next_batch_runs(
        tmp_path: Path, host: Plugins, events: Events) -> None:
    host.configure([spec(tmp_path, "loop", LOOP, timeout_ms=30),
                    spec(tmp_path, "echo", ECHO)])
    t0 = time.monotonic()
    assert host.process(reading()) == [reading()]  # on_failure pass: the batch goes on
    took = time.monotonic() - t0
    assert 0.03 <= took < 1.0
    stats = host.stats()["loop"]
    assert (stats["timeouts"], stats["passed"], stats["instances"]) == (1, 1, 1)
    assert "ran longer than its 30 ms" in stats["last_error"]
    assert host.stats()["echo"]["calls"] == 1  # the rest of the chain ran
    failed = [f for k, f in events if k == "plugin_failed"]
    assert failed == [{"plugin": "loop", "version": "1.0.0", "kind": "timeout",
                       "error": "ran longer than its 30 ms and was stopped"}]
    host.process(reading(seq=2))
    assert host.stats()["loop"]["instances"] == 2  # a new instance for the next batch


def test_a_plugin_without_room_for_its_input_fails_as_out_of_memory(
        tmp_path: Path, host: Plugins) -> None:
    host.configure([spec(tmp_path, "full", NO_ROOM, on_failure="drop")])
    assert host.process(reading()) == []
    s = host.stats()["full"]
    assert (s["errors"], s["dropped"]) == (1, 1)
    assert s["last_error"] == ("memory: has no room for 97 bytes of input within its limit "
                               "of 16 pages")


def test_the_ticker_wakes_for_a_call_after_sleeping(tmp_path: Path, host: Plugins) -> None:
    """The epoch ticker sleeps once no call has run for a tick; a hanging call after
    that must still be stopped."""
    host.configure([spec(tmp_path, "echo", ECHO), spec(tmp_path, "loop", LOOP, timeout_ms=30,
                                                        devices=("default/late",))])
    host.process(reading())
    time.sleep(0.1)  # several ticks with nothing running: the ticker is asleep
    assert host.process(reading("late")) == [reading("late")]
    assert host.stats()["loop"]["timeouts"] == 1


def test_a_memory_bomb_is_refused_at_its_limit(tmp_path: Path, host: Plugins) -> None:
    host.configure([spec(tmp_path, "bomb", BOMB, memory_pages=8)])
    assert host.process(reading()) == [reading()]
    stats = host.stats()["bomb"]
    assert stats["traps"] == 1
    assert stats["last_error"].startswith("trap: trapped: wasm `unreachable` instruction "
                                          "executed (in function 1 at 0x")


def test_memory_growth_stops_at_the_limit_exactly(tmp_path: Path) -> None:
    """The store's limit, not the host's RAM, bounds a plugin: memory.grow past
    memory_pages returns -1."""
    runtime = Runtime()
    module = runtime.compile(wasm(BOMB), spec(tmp_path, "b", BOMB).sha256)
    store = wasmtime.Store(runtime.engine)
    store.set_limits(memory_size=8 * 65536)
    store.set_epoch_deadline(1000)
    instance = wasmtime.Linker(runtime.engine).instantiate(store, module)
    memory = instance.exports(store)["memory"]
    assert isinstance(memory, wasmtime.Memory)
    assert memory.grow(store, 6) == 2
    with pytest.raises(wasmtime.WasmtimeError):
        memory.grow(store, 1)
    assert memory.size(store) == 8


def test_a_module_needing_more_memory_than_its_limit_is_not_loaded(
        tmp_path: Path, host: Plugins, events: Events) -> None:
    host.configure([spec(tmp_path, "echo", ECHO, memory_pages=1)])  # ECHO starts at 2 pages
    assert host.process(reading()) == [reading()]
    assert "cannot be instantiated" in host.stats()["echo"]["load_error"]
    assert kinds(events) == ["plugin_refused"]


def test_a_start_function_that_never_ends_is_stopped(tmp_path: Path, host: Plugins) -> None:
    host.configure([spec(tmp_path, "start", START_LOOP, timeout_ms=30)])
    assert host.process(reading()) == [reading()]
    assert host.stats()["start"]["load_error"].startswith("cannot be instantiated: ")


def test_a_trap_and_garbage_are_contained(tmp_path: Path, host: Plugins) -> None:
    host.configure([spec(tmp_path, "trap", TRAP, devices=("default/a",)),
                    spec(tmp_path, "garbage", GARBAGE, devices=("default/b",),
                         on_failure="drop")])
    assert host.process(reading("a")) == [reading("a")]
    assert host.process(reading("b")) == []
    assert host.process(reading("c")) == [reading("c")]  # selected by neither
    s = host.stats()
    assert (s["trap"]["traps"], s["trap"]["passed"]) == (1, 1)
    assert (s["garbage"]["errors"], s["garbage"]["dropped"]) == (1, 1)
    assert "not JSON" in s["garbage"]["last_error"]


def test_repeated_failures_quarantine_the_plugin(tmp_path: Path, host: Plugins,
                                                 events: Events) -> None:
    host.configure([spec(tmp_path, "trap", TRAP, failures=3, window_s=60)])
    for seq in range(1, 6):
        assert host.process(reading(seq=seq)) == [reading(seq=seq)]
    s = host.stats()["trap"]
    assert (s["state"], s["calls"], s["traps"], s["passed"]) == ("quarantined", 3, 3, 5)
    assert kinds(events).count("plugin_failed") == 3
    [q] = [f for k, f in events if k == "plugin_quarantined"]
    assert (q["failures"], q["on_failure"]) == (3, "pass")
    assert host.trouble(["trap"]) == [f"trap is quarantined ({s['last_error']})"]


def test_a_changed_plugin_is_swapped_and_a_failing_new_version_rolls_back(
        tmp_path: Path, host: Plugins, events: Events) -> None:
    v1 = spec(tmp_path, "p", ECHO)
    host.configure([v1])
    host.process(reading())
    v2 = spec(tmp_path, "p", TRAP, version="2.0.0", failures=2)
    host.configure([v2])
    assert host.stats()["p"]["version"] == "2.0.0"
    for seq in (2, 3):
        host.process(reading(seq=seq))
    s = host.stats()["p"]
    # back on v1; the counters go on over both versions (1 call of v1, 2 of v2)
    assert (s["version"], s["calls"], s["traps"], s["state"]) == ("1.0.0", 3, 2, "running")
    assert s["load_error"].startswith("rolled back: trap:")
    [rb] = [f for k, f in events if k == "plugin_rolled_back"]
    assert (rb["version"], rb["to"]) == ("2.0.0", "1.0.0")
    host.configure([v2])  # the same failing version again is not taken
    assert host.stats()["p"]["version"] == "1.0.0"
    assert host.process(reading(seq=4)) == [reading(seq=4)]
    assert host.stats()["p"]["calls"] == 4


def test_a_new_version_that_cannot_load_leaves_the_old_one_running(
        tmp_path: Path, host: Plugins, events: Events) -> None:
    host.configure([spec(tmp_path, "p", ECHO)])
    host.configure([spec(tmp_path, "p", REFUSES_CONFIG, version="2.0.0")])
    s = host.stats()["p"]
    assert (s["version"], s["load_error"]) == ("1.0.0",
                                              "refused: init refused its config (status 7)")
    refused = [f for k, f in events if k == "plugin_refused"]
    assert refused[0]["kept"] == "1.0.0"
    assert host.trouble(["p"]) == ["p: refused: init refused its config (status 7)"]


def test_a_removed_plugin_stops_running(tmp_path: Path, host: Plugins) -> None:
    host.configure([spec(tmp_path, "drop", constant("[]"))])
    host.configure([])
    assert host.process(reading()) == [reading()]
    assert host.stats() == {}


def test_log_and_clock_capabilities(tmp_path: Path, host: Plugins,
                                    caplog: pytest.LogCaptureFixture) -> None:
    host.configure([spec(tmp_path, "logs", LOGS, capabilities=("log", "now_ms"))])
    with caplog.at_level(logging.INFO, logger="edge.plugin.logs"):
        for seq in range(1, 41):
            host.process(reading(seq=seq))
    lines = [r.getMessage() for r in caplog.records if r.name == "edge.plugin.logs"]
    assert lines[0] == "hello from wasm"
    assert 20 <= len(lines) < 40  # a burst of 20, then about 2 a second


def test_the_key_value_store_survives_instances_and_restarts(tmp_path: Path,
                                                             events: Events) -> None:
    counter = spec(tmp_path, "counts", COUNTS, capabilities=("kv",))
    trap_first = Plugins(Runtime(), KvStore(tmp_path / "plugins.db"), recorder(events))
    trap_first.configure([counter])
    for seq in range(1, 4):
        trap_first.process(reading(seq=seq))
    trap_first.close()
    with sqlite3.connect(tmp_path / "plugins.db") as db:
        assert db.execute("SELECT plugin, key, value FROM kv").fetchall() == [
            ("counts", b"n", b"\x03")]
    again = Plugins(Runtime(), KvStore(tmp_path / "plugins.db"), recorder(events))
    again.configure([counter])
    again.process(reading(seq=4))
    again.close()
    with sqlite3.connect(tmp_path / "plugins.db") as db:
        assert db.execute("SELECT value FROM kv").fetchone() == (b"\x04",)


def test_the_compiled_module_is_cached_and_a_damaged_cache_is_recompiled(
        tmp_path: Path) -> None:
    s = spec(tmp_path, "echo", ECHO)
    runtime = Runtime(tmp_path / "cache")
    runtime.compile(s.wasm.read_bytes(), s.sha256)
    cached = runtime.cache_file(s.sha256)
    assert cached is not None
    assert cached.name == f"{s.sha256}-wasmtime50.0.1-epoch3.cwasm"
    assert cached.is_file()
    cached.write_bytes(b"garbage")
    module = runtime.compile(s.wasm.read_bytes(), s.sha256)
    assert {e.name for e in module.exports} == {"memory", "alloc", "process"}
    assert cached.read_bytes() != b"garbage"
    with pytest.raises(PluginError, match="SHA-256"):
        Runtime().compile(s.wasm.read_bytes(), "0" * 64)


@pytest.mark.parametrize(("answer", "error"), [
    ('{"a": 1}', "must answer a JSON array of readings, not a dict"),
    ("[1]", "answered reading 0 is not an object"),
    ('[{"namespace":"default","device":"x","seq":1,"values":{}}]',
     "(default/x seq 1) is not a reading of the batch"),
    ('[{"namespace":"default","device":"a","seq":1},{"namespace":"default","device":"a",'
     '"seq":1}]', "answered reading 1 (default/a seq 1) is not a reading of the batch, or "
                  "is answered twice"),
    ('[{"namespace":"default","device":"a","seq":1,"values":{"v":[1]}}]',
     "values.v must be a boolean, a finite number or a short string"),
    ('[{"namespace":"default","device":"a","seq":1,"values":{"v":1e999}}]',
     "values.v must be a boolean"),
    ('[{"namespace":"default","device":"a","seq":1,"quality":{"v":"good"}}]',
     'quality.v must be "bad"'),
    ('[{"namespace":"default","device":"a","seq":1,"values":[]}]', "values must be an object"),
    ("\xff", "not JSON"),
    ('[{"namespace":[],"device":"a","seq":1}]', "is not a reading of the batch"),
    ('[{"namespace":"default","device":"a","seq":{}}]', "is not a reading of the batch"),
    ('[{"namespace":"default","device":"a","seq":true}]', "is not a reading of the batch"),
    ("[" * 100_000 + "]" * 100_000, "nested too deeply"),
    ('[{"namespace":"default","device":"a","seq":1,"values":{"x":"\\ud800"}}]',
     "lone surrogate"),
    ('[{"namespace":"default","device":"a","seq":1,"values":{"\\udfff":1}}]',
     "lone surrogate"),
])
def test_an_answer_of_the_wrong_shape_names_the_fault(answer: str, error: str) -> None:
    with pytest.raises(PluginError, match=error.replace("(", r"\(").replace(")", r"\)")
                       .replace("[", r"\[")) as e:
        decode(answer.encode("latin-1"), [reading()])
    assert e.value.kind == "output"


def test_a_surrogate_pair_is_text() -> None:
    answer = '[{"namespace":"default","device":"a","seq":1,"values":{"x":"\\ud83d\\ude00"}}]'
    [out] = decode(answer.encode(), [reading()])
    assert out.values == {"x": "\U0001f600"}
    assert out.payload_json().decode().count("\U0001f600") == 1


def test_a_table_bomb_is_refused_at_the_table_limit(tmp_path: Path, host: Plugins) -> None:
    host.configure([spec(tmp_path, "tables", TABLE_BOMB)])
    assert host.process(reading()) == [reading()]
    assert host.stats()["tables"]["last_error"].startswith(
        "trap: trapped: wasm `unreachable`")  # table.grow answered -1: nothing allocated


def test_a_second_memory_is_refused(tmp_path: Path, host: Plugins) -> None:
    host.configure([spec(tmp_path, "two", TWO_MEMORIES)])
    assert "multi" in host.stats()["two"]["load_error"]


def test_a_failed_call_leaves_nothing_in_the_key_value_store(tmp_path: Path,
                                                              host: Plugins) -> None:
    host.configure([spec(tmp_path, "kvtrap", KV_THEN_TRAP, capabilities=("kv",))])
    host.process(reading())
    host.close()
    with sqlite3.connect(tmp_path / "plugins.db") as db:
        assert db.execute("SELECT count(*) FROM kv").fetchone() == (0,)
    assert host.kv is not None
    assert host.kv.plugin("kvtrap").items == {}


def test_encode_is_the_documented_batch() -> None:
    r = Reading("default", "meter-1", 1_764_763_200_000, 42, {"voltage": 230.1, "mode": "ä"},
                {"power": "bad"})
    assert json.loads(encode([r])) == [{
        "namespace": "default", "device": "meter-1", "ts": 1_764_763_200_000, "seq": 42,
        "values": {"voltage": 230.1, "mode": "ä"}, "quality": {"power": "bad"}}]


def test_raw_calls_answer_as_the_public_api_does(tmp_path: Path) -> None:
    """edge.wasm.call uses wasmtime-py's ctypes layer: pin that it agrees with
    Func.__call__ on results and traps for this wasmtime version."""
    runtime = Runtime()
    store = wasmtime.Store(runtime.engine)
    store.set_epoch_deadline(1000)
    for wat in (ECHO, TRAP):
        instance = wasmtime.Linker(runtime.engine).instantiate(
            store, runtime.compile(wasm(wat), spec(tmp_path, "x", wat).sha256))
        process = instance.exports(store)["process"]
        assert isinstance(process, wasmtime.Func)
        raw = RawFunc(store, process, 2, "i64")
        if wat is ECHO:
            assert raw(1024, 77) == process(store, 1024, 77) == (1024 << 32) | 77
        else:
            with pytest.raises(wasmtime.Trap) as public:
                process(store, 0, 0)
            with pytest.raises(wasmtime.Trap) as fast:
                raw(0, 0)
            assert fast.value.trap_code == public.value.trap_code == wasmtime.TrapCode.UNREACHABLE
