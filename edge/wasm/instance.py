"""wasmtime for plugins: one engine, its epoch ticker, compiled modules, instances.

The engine interrupts a call by epoch (DESIGN.md §7): one daemon thread increments
the epoch every :data:`TICK_S` while calls are made, and each call may run
``timeout_ms`` rounded up to whole ticks plus one (wasmtime releases the GIL while
guest code runs, so the ticker runs). When a tick passes with no call running and none
begun, the ticker sleeps until the next call begins (:meth:`Runtime.enter`): a Python
thread waking every 5 ms costs about 1.5 % of a core here, which an idle gateway should
not pay. Memory is bounded per store (``memory.grow`` beyond it returns -1 to the
guest). A compiled module is cached in ``cache_dir`` under its SHA-256, wasmtime's
version and :data:`ENGINE_TAG`, so that a restart deserializes instead of compiling.

Errors are :class:`PluginError` with a ``kind``: ``load`` (the module cannot be used
as a plugin), ``refused`` (``init`` refused its config), ``trap``, ``timeout``,
``memory`` (no room within its limit) and ``output`` (not a valid answer).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import logging
import math
import os
import re
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Final, Literal

import wasmtime

from edge.wasm.call import RawFunc, RawMemory, Result, set_deadline
from edge.wasm.kv import PluginKv
from edge.wasm.spec import CAPABILITIES, IMPORT_MODULE, PAGE_BYTES, PluginSpec

log = logging.getLogger(__name__)

TICK_S: Final = 0.005
ENGINE_TAG: Final = "epoch3"
"""Names the engine settings below in cache file names: change it when they change."""
MAX_TABLE_ELEMENTS: Final = 10_000
"""Function-table entries a plugin may have (C's indirect calls need a few hundred)."""
MAX_OUTPUT: Final = 4 << 20
"""Bytes a plugin may answer with."""
LOG_BURST: Final = 20
LOG_PER_S: Final = 2.0

Kind = Literal["load", "refused", "trap", "timeout", "memory", "output"]

_I32, _I64 = wasmtime.ValType.i32(), wasmtime.ValType.i64()
_SIGNATURES: Final = {  # import name → (params, results)
    "log": ([_I32, _I32, _I32], []),
    "now_ms": ([], [_I64]),
    "kv_get": ([_I32] * 4, [_I32]),
    "kv_set": ([_I32] * 4, [_I32]),
    "kv_delete": ([_I32] * 2, [_I32]),
}
_EXPORTS: Final = {"alloc": (1, "i32"), "process": (2, "i64"), "init": (2, "i32")}
_LEVELS: Final = (logging.DEBUG, logging.INFO, logging.WARNING, logging.ERROR)


class PluginError(Exception):
    """A plugin failed: ``kind`` (module docstring) and what happened."""

    def __init__(self, kind: Kind, message: str) -> None:
        super().__init__(message)
        self.kind: Kind = kind


def _signature(ty: wasmtime.FuncType) -> tuple[list[str], list[str]]:
    return [str(p) for p in ty.params], [str(r) for r in ty.results]


def module_problems(module: wasmtime.Module, capabilities: tuple[str, ...]) -> list[str]:
    """What keeps ``module`` from being a plugin granted ``capabilities``: a missing
    or mistyped export, an import outside module ``edge`` or not granted."""
    problems = []
    granted = {f for c in capabilities for f in CAPABILITIES[c]}
    needs = {f: c for c, fs in CAPABILITIES.items() for f in fs}
    for imp in module.imports:
        what = f"{imp.module}.{imp.name}"
        if imp.module != IMPORT_MODULE or imp.name not in needs:
            problems.append(f"imports {what}, which edge does not provide (only "
                            f"{IMPORT_MODULE}.{{{', '.join(needs)}}}; no WASI, files, network "
                            "or environment)")
        elif imp.name not in granted:
            problems.append(f"imports {what}, which needs the capability "
                            f"{needs[imp.name]!r} that its manifest does not grant")
        elif not isinstance(imp.type, wasmtime.FuncType) or _signature(imp.type) != tuple(
                [str(t) for t in ts] for ts in _SIGNATURES[imp.name]):
            problems.append(f"imports {what} with the wrong type")
    exports = {e.name: e.type for e in module.exports}
    if not isinstance(exports.get("memory"), wasmtime.MemoryType):
        problems.append("does not export its memory as 'memory'")
    for name, (nparams, result) in _EXPORTS.items():
        ty = exports.get(name)
        want = (["i32"] * nparams, [result])
        if ty is None and name != "init":
            problems.append(f"does not export the function {name!r}")
        elif ty is not None and (not isinstance(ty, wasmtime.FuncType) or _signature(ty) != want):
            problems.append(f"exports {name!r} with the wrong type: it must take "
                            f"{nparams} i32 and return {result}")
    return problems


class Runtime:
    """The engine, its ticker thread (started with the first instance) and the module
    cache in ``cache_dir`` (None: compile every time)."""

    def __init__(self, cache_dir: Path | None = None) -> None:
        cfg = wasmtime.Config()
        cfg.epoch_interruption = True
        # no compiler thread pool: plugins are small, and the config child (forked from
        # the agent, where such a pool's threads would not exist) must compile too
        cfg.parallel_compilation = False
        cfg.memory_may_move = False  # edge.wasm.call addresses memory from its base
        cfg.wasm_multi_memory = False  # one memory, the one memory_pages bounds
        cfg.wasm_threads = False
        self.engine = wasmtime.Engine(cfg)
        self.cache_dir = cache_dir
        self._stop = threading.Event()
        self._ticker: threading.Thread | None = None
        self._wake = threading.Condition()
        self._idle = True  # the ticker waits for a call
        self._active = 0  # calls running
        self._entered = 0  # calls begun

    def cache_file(self, sha256: str) -> Path | None:
        """Where the compiled module of ``sha256`` is cached (None without a cache)."""
        if self.cache_dir is None:
            return None
        version = importlib.metadata.version("wasmtime")
        return self.cache_dir / f"{sha256}-wasmtime{version}-{ENGINE_TAG}.cwasm"

    def compile(self, wasm: bytes, sha256: str) -> wasmtime.Module:
        """The module of ``wasm`` (whose SHA-256 must be ``sha256``), from the cache or
        compiled (and then cached). Raises PluginError(load)."""
        cached = self.cache_file(sha256)
        if cached is not None and cached.is_file():
            try:
                return wasmtime.Module.deserialize_file(self.engine, str(cached))
            except wasmtime.WasmtimeError as e:
                log.warning("the compiled plugin %s is unusable (%s); compiling again",
                            cached, str(e).splitlines()[0])
        if hashlib.sha256(wasm).hexdigest() != sha256:
            raise PluginError("load", f"its module's SHA-256 is not {sha256}")
        try:
            module = wasmtime.Module(self.engine, wasm)
        except wasmtime.WasmtimeError as e:
            raise PluginError("load", f"is not a valid WASM module: {_cause(e)}") from e
        if cached is not None:
            self._store(cached, module.serialize())
        return module

    @staticmethod
    def _store(path: Path, blob: bytes | bytearray) -> None:
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_bytes(blob)
            tmp.replace(path)
        except OSError as e:
            log.warning("cannot cache the compiled plugin in %s: %s", path, e.strerror)
            tmp.unlink(missing_ok=True)

    def start(self) -> None:
        """Start the epoch ticker (once)."""
        if self._ticker is None:
            self._ticker = threading.Thread(target=self._tick, name="wasm-epoch", daemon=True)
            self._ticker.start()

    def enter(self) -> None:
        """A call into a plugin begins: the ticker runs until it has ended (:meth:`leave`)."""
        with self._wake:
            self._active += 1
            self._entered += 1
            if self._idle:
                self._idle = False
                self._wake.notify()

    def leave(self) -> None:
        """The call begun by :meth:`enter` has ended."""
        with self._wake:
            self._active -= 1

    def _tick(self) -> None:
        seen = -1
        while True:
            with self._wake:
                if not self._active and self._entered == seen:
                    self._idle = True  # nothing ran during the last tick
                while self._idle and not self._stop.is_set():
                    self._wake.wait()
                seen = self._entered
            if self._stop.wait(TICK_S):
                return
            self.engine.increment_epoch()

    def stop(self) -> None:
        """Stop the ticker."""
        with self._wake:
            self._stop.set()
            self._wake.notify()
        if self._ticker is not None:
            self._ticker.join()


class Instance:
    """One instance of ``spec``'s ``module`` in its own store, with only the imports
    its capabilities grant (``kv`` its key-value store when granted).

    Raises PluginError(load) when it cannot be instantiated (e.g. its initial memory
    exceeds its limit); ``init`` and ``process`` raise PluginError as the module
    docstring says. After any error the instance must be thrown away.
    """

    def __init__(self, runtime: Runtime, module: wasmtime.Module, spec: PluginSpec,
                 kv: PluginKv | None = None) -> None:
        self.spec = spec
        self._kv = kv
        self._log = logging.getLogger(f"edge.plugin.{spec.name}")
        self._log_tokens, self._log_at = float(LOG_BURST), time.monotonic()
        self.logs_dropped = 0
        self._ticks = math.ceil(spec.timeout_ms / 1000 / TICK_S) + 1
        store = self._store = wasmtime.Store(runtime.engine)
        store.set_limits(memory_size=spec.memory_pages * PAGE_BYTES, memories=1, tables=1,
                         table_elements=MAX_TABLE_ELEMENTS, instances=1)
        set_deadline(store, self._ticks)
        linker = wasmtime.Linker(runtime.engine)
        for cap in spec.capabilities:
            for name in CAPABILITIES[cap]:
                params, results = _SIGNATURES[name]
                linker.define_func(IMPORT_MODULE, name, wasmtime.FuncType(params, results),
                                   self._host(name), access_caller=True)
        self._runtime = runtime
        runtime.start()  # a start function runs at instantiation, under the deadline too
        runtime.enter()
        try:
            inst = linker.instantiate(store, module)
        except wasmtime.Trap as e:
            raise PluginError("load", f"cannot be instantiated: {_trap_text(e)}") from e
        except wasmtime.WasmtimeError as e:
            raise PluginError("load", f"cannot be instantiated: {_cause(e)}") from e
        finally:
            runtime.leave()
        exports = inst.exports(store)
        memory = exports["memory"]
        assert isinstance(memory, wasmtime.Memory)  # module_problems checked the exports
        self._memory = RawMemory(store, memory)
        self._alloc = self._func(exports, "alloc", 1, "i32")
        self._process = self._func(exports, "process", 2, "i64")
        self._init = self._func(exports, "init", 2, "i32") if "init" in exports else None

    def _func(self, exports: Mapping[str, object], name: str, nparams: int,
              result: Result) -> RawFunc:
        func = exports[name]
        assert isinstance(func, wasmtime.Func)
        return RawFunc(self._store, func, nparams, result)

    def _call(self, fn: RawFunc, *args: int) -> int:
        try:
            return fn(*args)
        except wasmtime.Trap as e:
            if e.trap_code == wasmtime.TrapCode.INTERRUPT:
                raise PluginError("timeout", f"ran longer than its {self.spec.timeout_ms} ms "
                                             "and was stopped") from e
            raise PluginError("trap", f"trapped: {_trap_text(e)}") from e
        except wasmtime.WasmtimeError as e:
            raise PluginError("trap", f"failed: {_cause(e)}") from e

    def _input(self, data: bytes) -> int:
        ptr = self._call(self._alloc, len(data)) & 0xFFFFFFFF
        if ptr == 0:
            raise PluginError("memory", f"has no room for {len(data)} bytes of input within "
                                        f"its limit of {self.spec.memory_pages} pages")
        try:
            self._memory.write(ptr, data)
        except IndexError as e:
            raise PluginError("output", f"alloc({len(data)}) returned a range outside its "
                                        f"memory: {e}") from e
        return ptr

    def init(self, config: bytes) -> None:
        """Give it its config (if it exports ``init``)."""
        if self._init is not None:
            set_deadline(self._store, self._ticks)
            self._runtime.enter()
            try:
                status = self._call(self._init, self._input(config), len(config))
            finally:
                self._runtime.leave()
            if status != 0:
                raise PluginError("refused", f"init refused its config (status {status})")

    def process(self, batch: bytes) -> bytes:
        """Its answer to ``batch`` (JSON bytes in, bytes out; b"" drops the batch).
        ``alloc`` and ``process`` share the one ``timeout_ms``."""
        set_deadline(self._store, self._ticks)
        self._runtime.enter()
        try:
            packed = self._call(self._process, self._input(batch), len(batch)) & (1 << 64) - 1
        finally:
            self._runtime.leave()
        out_ptr, out_len = packed >> 32, packed & 0xFFFFFFFF
        if out_len == 0:
            return b""
        if out_len > MAX_OUTPUT:
            raise PluginError("output", f"answered {out_len} bytes, more than {MAX_OUTPUT}")
        try:
            return self._memory.read(out_ptr, out_len)
        except IndexError as e:
            raise PluginError("output", f"answered a range outside its memory: {e}") from e

    def _host(self, name: str) -> Callable[..., int | None]:
        """The import ``name`` bound to this instance. It never raises: a bad pointer
        from the guest makes it return -1 (or log nothing)."""
        def read(caller: wasmtime.Caller, ptr: int, n: int) -> bytes:
            mem = caller.get("memory")
            if not isinstance(mem, wasmtime.Memory) or ptr < 0 or n < 0 or (
                    ptr + n > mem.data_len(caller)):
                raise IndexError
            return bytes(mem.read(caller, ptr, ptr + n))

        def write(caller: wasmtime.Caller, ptr: int, data: bytes) -> None:
            mem = caller.get("memory")
            if not isinstance(mem, wasmtime.Memory) or ptr < 0 or (
                    ptr + len(data) > mem.data_len(caller)):
                raise IndexError
            mem.write(caller, data, ptr)

        kv = self._kv

        def log_(caller: wasmtime.Caller, level: int, ptr: int, n: int) -> None:
            try:
                text = read(caller, ptr, min(max(n, 0), 1024)).decode(errors="replace")
            except IndexError:
                return
            self._emit_log(_LEVELS[min(max(level, 0), 3)], text)

        def now_ms(caller: wasmtime.Caller) -> int:
            return time.time_ns() // 1_000_000

        def kv_get(caller: wasmtime.Caller, kptr: int, klen: int, vptr: int, vcap: int) -> int:
            try:
                value = kv.get(read(caller, kptr, klen)) if kv is not None else None
                if value is None:
                    return -1
                write(caller, vptr, value[:max(vcap, 0)])
                return len(value)
            except IndexError:
                return -1

        def kv_set(caller: wasmtime.Caller, kptr: int, klen: int, vptr: int, vlen: int) -> int:
            try:
                ok = kv is not None and kv.set(read(caller, kptr, klen), read(caller, vptr, vlen))
            except IndexError:
                return -1
            return 0 if ok else -1

        def kv_delete(caller: wasmtime.Caller, kptr: int, klen: int) -> int:
            try:
                return 0 if kv is not None and kv.delete(read(caller, kptr, klen)) else -1
            except IndexError:
                return -1

        funcs: dict[str, Callable[..., int | None]] = {
            "log": log_, "now_ms": now_ms, "kv_get": kv_get, "kv_set": kv_set,
            "kv_delete": kv_delete}
        return funcs[name]

    def _emit_log(self, level: int, text: str) -> None:
        now = time.monotonic()
        self._log_tokens = min(LOG_BURST, self._log_tokens + (now - self._log_at) * LOG_PER_S)
        self._log_at = now
        if self._log_tokens < 1:
            self.logs_dropped += 1
            return
        self._log_tokens -= 1
        self._log.log(level, "%s", text)


def _trap_text(trap: wasmtime.Trap) -> str:
    """The cause of ``trap`` and where: ``wasm `unreachable` instruction executed (in
    function 1 at 0x49)``."""
    lines = [ln.strip() for ln in str(trap).splitlines() if ln.strip()]
    text = lines[-1].removeprefix("wasm trap: ") if lines else "a trap"
    frames = trap.frames
    if frames:
        f = frames[0]
        text += f" (in {f.func_name or f'function {f.func_index}'}"
        text += f" at {f.module_offset:#x})" if f.module_offset < 1 << 32 else ")"
    return text


_FRAME = re.compile(r"\d+:\s+0x[0-9a-f]+ - ")  # a backtrace line
_CHAIN = re.compile(r"^\d+: ")  # "1: " before a cause


def _cause(e: Exception) -> str:
    """wasmtime's message: its first line and, when it says more, its last (the cause:
    ``failed to compile: wasm[0]::function[2]: type mismatch: …``)."""
    lines = [_CHAIN.sub("", ln.strip()) for ln in str(e).splitlines()
             if ln.strip() and ln.strip() != "Caused by:" and not _FRAME.match(ln.strip())]
    if not lines:
        return type(e).__name__
    return lines[0] if len(lines) == 1 else f"{lines[0]}: {lines[-1]}"
