"""WASM modules for the plugin host's tests, in WAT (wasmtime compiles it), each with
one behaviour: a well-behaved echo, and one per way a plugin goes wrong."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import wasmtime
import yaml

from edge.wasm.spec import PluginSpec

_ALLOC = '(func (export "alloc") (param i32) (result i32) i32.const 1024)'
_ECHO = """(func (export "process") (param $p i32) (param $n i32) (result i64)
  local.get $p i64.extend_i32_u i64.const 32 i64.shl local.get $n i64.extend_i32_u i64.or)"""


def _module(body: str, *, imports: str = "", pages: int = 2) -> str:
    return f'(module {imports} (memory (export "memory") {pages}) {body})'


def constant(answer: str) -> str:
    """Answers ``answer`` (kept at address 100, under 900 bytes) to every batch."""
    data = answer.replace("\\", "\\\\").replace('"', '\\"')
    return _module(f'''(data (i32.const 100) "{data}") {_ALLOC}
      (func (export "process") (param i32 i32) (result i64)
        i64.const {(100 << 32) | len(answer.encode())})''')


ECHO = _module(f"{_ALLOC} {_ECHO}")
"""Answers the batch as it came."""
LOOP = _module(f'''{_ALLOC} (func (export "process") (param i32 i32) (result i64)
  (loop $forever (br $forever)) i64.const 0)''')
"""Never returns."""
BOMB = _module(f'''{_ALLOC} (func (export "process") (param i32 i32) (result i64)
  (loop $more (br_if $more (i32.ne (memory.grow (i32.const 1)) (i32.const -1))))
  unreachable)''')
"""Grows its memory a page at a time until refused, then traps."""
START_LOOP = _module(f'{_ALLOC} {_ECHO} (func $start (loop $l (br $l))) (start $start)')
"""Never finishes being instantiated."""
TABLE_BOMB = _module(f'''(table $t 1 funcref) (elem declare func $f) (func $f) {_ALLOC}
  (func (export "process") (param i32 i32) (result i64)
    (if (i32.eq (table.grow $t (ref.func $f) (i32.const 1000000000)) (i32.const -1))
      (then unreachable))
    i64.const 0)''')
"""Asks for a billion table entries; traps when refused."""
TWO_MEMORIES = f'(module (memory (export "memory") 1) (memory 1) {_ALLOC} {_ECHO})'
KV_THEN_TRAP = _module(f'''(data (i32.const 200) "k") {_ALLOC}
  (func (export "process") (param i32 i32) (result i64)
    (drop (call $set (i32.const 200) (i32.const 1) (i32.const 200) (i32.const 1)))
    unreachable)''', imports='(import "edge" "kv_set" (func $set (param i32 i32 i32 i32) '
                              '(result i32)))')
"""Stores key "k", then traps: the store must not keep it."""
TRAP = _module(f'{_ALLOC} (func (export "process") (param i32 i32) (result i64) unreachable)')
GARBAGE = constant("not json{")
NO_PROCESS = _module(_ALLOC)
NO_ROOM = _module(f'(func (export "alloc") (param i32) (result i32) i32.const 0) {_ECHO}')
"""Never has room for the input."""
WASI = _module(f"{_ALLOC} {_ECHO}", imports='(import "wasi_snapshot_preview1" "fd_write" '
               '(func (param i32 i32 i32 i32) (result i32)))')
REFUSES_CONFIG = _module(f'''{_ALLOC} {_ECHO}
  (func (export "init") (param i32 i32) (result i32) i32.const 7)''')
LOGS = _module(f'''(data (i32.const 16) "hello from wasm") {_ALLOC}
  (func (export "process") (param $p i32) (param $n i32) (result i64)
    (call $log (i32.const 1) (i32.const 16) (i32.const 15))
    (drop (call $now))
    local.get $p i64.extend_i32_u i64.const 32 i64.shl local.get $n i64.extend_i32_u i64.or)''',
               imports='(import "edge" "log" (func $log (param i32 i32 i32))) '
                       '(import "edge" "now_ms" (func $now (result i64)))')
"""Logs "hello from wasm" and reads the clock on each batch, then echoes it."""
COUNTS = _module(f'''(data (i32.const 200) "n") {_ALLOC}
  (func (export "process") (param $p i32) (param $n i32) (result i64)
    (if (i32.eq (call $get (i32.const 200) (i32.const 1) (i32.const 300) (i32.const 1))
                (i32.const -1))
      (then (i32.store8 (i32.const 300) (i32.const 0))))
    (i32.store8 (i32.const 300) (i32.add (i32.load8_u (i32.const 300)) (i32.const 1)))
    (drop (call $set (i32.const 200) (i32.const 1) (i32.const 300) (i32.const 1)))
    local.get $p i64.extend_i32_u i64.const 32 i64.shl local.get $n i64.extend_i32_u i64.or)''',
                 imports='(import "edge" "kv_get" (func $get (param i32 i32 i32 i32) '
                         '(result i32))) (import "edge" "kv_set" (func $set (param i32 i32 '
                         'i32 i32) (result i32)))')
"""Counts its batches in key "n" of its key-value store (one byte), then echoes."""


def wasm(wat: str) -> bytes:
    """The binary module of ``wat``."""
    return bytes(wasmtime.wat2wasm(wat))


def write_plugin(directory: Path, name: str, wat: str, *, file: str | None = None,
                 **manifest: Any) -> Path:
    """``name.wasm`` and its manifest (``file``, default ``name.yaml``) in
    ``directory``; ``manifest`` adds or overrides fields."""
    blob = wasm(wat)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / f"{name}.wasm").write_bytes(blob)
    doc = {"name": name, "version": "1.0.0", "wasm": f"{name}.wasm",
           "sha256": hashlib.sha256(blob).hexdigest(), **manifest}
    path = directory / (file or f"{name}.yaml")
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def spec(directory: Path, name: str, wat: str, **fields: Any) -> PluginSpec:
    """A PluginSpec of ``wat`` (written to ``directory/name.wasm``), as the config
    child would hand it over; ``fields`` override PluginSpec's defaults."""
    blob = wasm(wat)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{name}-{hashlib.sha256(blob).hexdigest()[:8]}.wasm"
    path.write_bytes(blob)
    return PluginSpec(**{"name": name, "version": "1.0.0", "wasm": path,
                         "sha256": hashlib.sha256(blob).hexdigest(), "capabilities": (),
                         **fields})
