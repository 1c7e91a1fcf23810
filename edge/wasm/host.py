"""The plugin host: the chain of plugins on each device's readings (DESIGN.md §7).

:class:`Plugins` runs in the agent's event loop. A reading goes through the plugins
that select its device, in the configured order, one call per batch (a batch is the
readings of one poll); a plugin answers the same JSON shape (plugins/README.md) and
:func:`decode` holds it to it. A plugin that traps, runs out of time or memory, or
answers garbage is counted and its instance thrown away (the next batch gets a new
one); its ``on_failure`` decides whether that batch passes through untouched or is
dropped. ``failures`` within ``window_s`` quarantine it (a ``plugin_quarantined``
event) until its manifest or module changes.

A changed plugin (``configure`` with a new spec under the same name) is loaded and
initialised beside the running version and swapped in between two batches; if it
cannot be loaded the old one keeps running, and if it is quarantined within its
first ``window_s`` the old one is swapped back (``plugin_rolled_back``).
"""

from __future__ import annotations

import collections
import dataclasses
import json
import logging
import math
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from edge.config.model import Value
from edge.reading import Reading
from edge.uplink.payload import json_bytes
from edge.wasm.instance import Instance, PluginError, Runtime, module_problems
from edge.wasm.kv import KvStore
from edge.wasm.spec import ModuleFileError, PluginSpec, read_module

log = logging.getLogger(__name__)

Publish = Callable[..., None]
"""``publish_event(kind, **fields)`` (:meth:`edge.uplink.publisher.Uplink.publish_event`)."""

DURATIONS: Final = 1024
"""Call durations kept per plugin for p50/p99."""
COUNTS: Final = ("calls", "errors", "traps", "timeouts", "passed", "dropped", "instances",
                  "time_s")
"""The :class:`PluginStats` fields that add up over a plugin's versions."""
MAX_NAME: Final = 128
MAX_TEXT: Final = 4096
INT64: Final = 1 << 63


@dataclass(slots=True)
class PluginStats:
    """Counters of a plugin since the agent started, over every version it ran under
    its name (Prometheus counters never go back; a rolled-back version's failures stay
    counted).

    ``calls`` batches given to it; ``errors`` answers refused (not JSON, wrong shape,
    no memory for the input), ``traps``, ``timeouts``; ``passed``/``dropped``
    batches let through untouched or dropped because it failed or is quarantined;
    ``instances`` created (1 + one per failure); ``time_s`` spent in its calls.
    ``state`` ``running|quarantined``.
    """

    calls: int = 0
    errors: int = 0
    traps: int = 0
    timeouts: int = 0
    passed: int = 0
    dropped: int = 0
    instances: int = 0
    state: str = "running"
    last_error: str = ""
    time_s: float = 0.0
    durations_us: collections.deque[float] = field(
        default_factory=lambda: collections.deque(maxlen=DURATIONS))

    def absorb(self, other: PluginStats) -> None:
        """Add ``other``'s counts (of the version this one replaces, or replaced)."""
        for k in COUNTS:
            setattr(self, k, getattr(self, k) + getattr(other, k))

    def snapshot(self) -> dict[str, Any]:
        """Plain values; ``p50_us``/``p99_us`` over the last :data:`DURATIONS` calls."""
        d = sorted(self.durations_us)
        out = {k: getattr(self, k) for k in (*COUNTS, "state", "last_error")}
        out["p50_us"] = d[len(d) // 2] if d else 0.0
        out["p99_us"] = d[min(len(d) - 1, math.ceil(len(d) * 0.99) - 1)] if d else 0.0
        return out


def encode(batch: Sequence[Reading]) -> bytes:
    """The JSON array a plugin's ``process`` receives (compact UTF-8; each reading's
    ``values`` as :meth:`~edge.reading.Reading.values_json` made them)."""
    return b"[" + b",".join(
        b'{"namespace":%b,"device":%b,"ts":%d,"seq":%d,"values":%b,"quality":%b}' % (
            json_bytes(r.namespace), json_bytes(r.device), r.ts_ms, r.seq, r.values_json(),
            json_bytes(r.quality) if r.quality else b"{}")
        for r in batch) + b"]"


_LONE_SURROGATE: Final = re.compile(rb"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")
"""A UTF-16 surrogate escape: json.loads pairs them, but lets a lone one through."""


def _has_surrogate(doc: object) -> bool:
    """Whether a string (or a key) in ``doc`` holds a lone surrogate."""
    if isinstance(doc, str):
        return any("\ud800" <= c <= "\udfff" for c in doc)
    if isinstance(doc, list):
        return any(_has_surrogate(v) for v in doc)
    if isinstance(doc, dict):
        return any(_has_surrogate(k) or _has_surrogate(v) for k, v in doc.items())
    return False


def _bad_value(values: dict[str, Any]) -> str | None:
    """The name of the first value that is not a boolean, a finite number (integers in
    int64) or a string of at most :data:`MAX_TEXT` characters; None when all are."""
    isfinite = math.isfinite
    for name, v in values.items():
        t = type(v)
        if t is float:
            if not isfinite(v):
                return name
        elif t is int:
            if not -INT64 <= v < INT64:
                return name
        elif t is str:
            if len(v) > MAX_TEXT:
                return name
        elif t is not bool:
            return name
    return None


def _mapping(item: dict[str, Any], key: str, where: str) -> dict[str, Any]:
    m = item.get(key)
    if m is None:
        return {}
    if type(m) is not dict:
        raise PluginError("output", f"{where}: {key} must be an object")
    if m and (min(map(len, m)) == 0 or max(map(len, m)) > MAX_NAME):
        raise PluginError("output", f"{where}: a name in {key} is empty or longer than "
                                    f"{MAX_NAME} characters")
    return m


def decode(answer: bytes, batch: Sequence[Reading]) -> list[Reading]:
    """The readings a plugin answered for ``batch``. Each must carry the
    ``namespace``, ``device`` and ``seq`` of a reading of the batch (which keeps its
    ``ts``); ``values`` map names to a boolean, a finite number (integers in int64)
    or a string of at most :data:`MAX_TEXT` characters; ``quality`` names to
    ``"bad"``. b"" is the empty answer.

    Raises PluginError(output), naming the reading and the field at fault.
    """
    if not answer:
        return []
    try:
        doc = json.loads(answer)
    except (ValueError, UnicodeDecodeError) as e:
        raise PluginError("output", f"answered something that is not JSON ({e})") from e
    except RecursionError as e:
        raise PluginError("output", "answered JSON nested too deeply") from e
    if _LONE_SURROGATE.search(answer) and _has_surrogate(doc):
        raise PluginError("output", "answered a string with a lone surrogate (\\ud800–"
                                    "\\udfff), which is no Unicode text")
    if not isinstance(doc, list):
        raise PluginError("output", "must answer a JSON array of readings, "
                                    f"not a {type(doc).__name__}")
    index = {(r.namespace, r.device, r.seq): r for r in batch}
    out: list[Reading] = []
    for i, item in enumerate(doc):
        where = f"answered reading {i}"
        if not isinstance(item, dict):
            raise PluginError("output", f"{where} is not an object")
        ident: Any = (item.get("namespace"), item.get("device"), item.get("seq"))
        hashable = isinstance(ident[0], str) and isinstance(ident[1], str) and (
            type(ident[2]) is int)
        src = index.pop(ident, None) if hashable else None
        if src is None:
            raise PluginError("output", f"{where} ({ident[0]}/{ident[1]} seq {ident[2]}) is "
                                        "not a reading of the batch, or is answered twice")
        values: dict[str, Value] = _mapping(item, "values", where)
        bad = _bad_value(values)
        if bad is not None:
            raise PluginError("output", f"{where}: values.{bad} must be a boolean, a finite "
                                        "number or a short string")
        quality = _mapping(item, "quality", where)
        for name, q in quality.items():
            if q != "bad":
                raise PluginError("output", f"{where}: quality.{name} must be \"bad\"")
        out.append(Reading(src.namespace, src.device, src.ts_ms, src.seq, values, quality))
    return out


class Plugin:
    """One loaded plugin version: its module, the live instance, its stats."""

    def __init__(self, host: Plugins, spec: PluginSpec) -> None:
        self.spec = spec
        self.stats = PluginStats()
        self.failed_at: collections.deque[float] = collections.deque()
        self.loaded_at = time.monotonic()
        self.previous: Plugin | None = None
        """The version this one replaced, until it has run ``window_s`` unquarantined."""
        self._host = host
        wasm = _read(spec.wasm)
        self._module = host.runtime.compile(wasm, spec.sha256)
        problems = module_problems(self._module, spec.capabilities)
        if problems:
            raise PluginError("load", "; ".join(problems))
        self._instance: Instance | None = self._instantiate()

    def _instantiate(self) -> Instance:
        kv = self._host.kv.plugin(self.spec.name) if (
            "kv" in self.spec.capabilities and self._host.kv is not None) else None
        instance = Instance(self._host.runtime, self._module, self.spec, kv)
        instance.init(self.spec.config.encode())
        self.stats.instances += 1
        return instance

    def run(self, batch: list[Reading]) -> list[Reading]:
        """Its answer to ``batch``; on a failure (counted), the batch or nothing as
        ``on_failure`` says."""
        stats = self.stats
        if stats.state == "quarantined":
            return self._fallback(batch)
        stats.calls += 1
        t0 = time.perf_counter()
        try:
            instance = self._instance or self._instantiate()
            self._instance = instance
            data = encode(batch)
            answer = instance.process(data)
            out = batch if answer == data else decode(answer, batch)
        except Exception as e:
            if not isinstance(e, PluginError):  # a host bug must not stop the poller
                log.exception("plugin %s: handling its call failed", self.spec.ident)
                e = PluginError("output", f"its answer could not be handled ({e!r})")
            self._instance = None
            self._kv(failed=True)
            self._failed(e)
            return self._fallback(batch)
        finally:
            took = time.perf_counter() - t0
            stats.time_s += took
            stats.durations_us.append(took * 1e6)
        self._kv(failed=False)
        return out

    def _kv(self, *, failed: bool) -> None:
        """Keep (write) or undo what the call changed in its key-value store."""
        kv = self._host.kv
        if kv is not None and "kv" in self.spec.capabilities:
            if failed:
                kv.discard(self.spec.name)
            else:
                kv.flush(self.spec.name)

    def _fallback(self, batch: list[Reading]) -> list[Reading]:
        if self.spec.on_failure == "drop":
            self.stats.dropped += 1
            return []
        self.stats.passed += 1
        return batch

    def _failed(self, e: PluginError) -> None:
        stats, spec = self.stats, self.spec
        if e.kind == "trap":
            stats.traps += 1
        elif e.kind == "timeout":
            stats.timeouts += 1
        else:
            stats.errors += 1
        stats.last_error = f"{e.kind}: {e}"
        now = time.monotonic()
        self.failed_at.append(now)
        while self.failed_at and self.failed_at[0] < now - spec.window_s:
            self.failed_at.popleft()
        log.warning("plugin %s %s", spec.ident, e)
        self._host.publish("plugin_failed", plugin=spec.name, version=spec.version,
                           kind=e.kind, error=str(e))
        if len(self.failed_at) >= spec.failures:
            stats.state = "quarantined"
            log.error("plugin %s quarantined after %d failures within %.0f s; its batches "
                      "are %s", spec.ident, len(self.failed_at), spec.window_s,
                      "dropped" if spec.on_failure == "drop" else "passed on untouched")
            self._host.publish("plugin_quarantined", plugin=spec.name, version=spec.version,
                               failures=len(self.failed_at), window_s=spec.window_s,
                               on_failure=spec.on_failure, error=stats.last_error)
            self._host.quarantined(self)


def _read(path: Path) -> bytes:
    try:
        return read_module(path)
    except ModuleFileError as e:
        raise PluginError("load", f"cannot be read: {e}") from e


class _Lines(logging.Handler):
    """Keeps what a plugin logs, for a message that says why it did not start."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def trial(specs: Sequence[PluginSpec], cache_dir: Path | None) -> list[str]:
    """Start each plugin as the agent would — instantiated within its limits, ``init``
    given its config — and say, one message each, which do not (``edge check``). What a
    plugin logs meanwhile goes into its message, not the log."""
    runtime = Runtime(cache_dir)
    problems = []
    try:
        for spec in specs:
            logger = logging.getLogger(f"edge.plugin.{spec.name}")
            said, propagate = _Lines(), logger.propagate
            logger.addHandler(said)
            logger.propagate = False
            try:
                module = runtime.compile(_read(spec.wasm), spec.sha256)
                Instance(runtime, module, spec).init(spec.config.encode())
            except PluginError as e:
                why = str(e) if e.kind == "load" else f"{e.kind}: {e}"
                logged = f" (it logged: {' | '.join(said.lines[:3])})" if said.lines else ""
                problems.append(f"{spec.source}: plugin {spec.ident} {why}{logged}")
            finally:
                logger.removeHandler(said)
                logger.propagate = propagate
    finally:
        runtime.stop()
    return problems


class Plugins:
    """The configured plugins, in order; :meth:`process` runs a reading through
    those that select its device. ``kv`` backs the ``kv`` capability (None: no
    plugin may hold state across restarts; ``kv_set`` refuses)."""

    def __init__(self, runtime: Runtime, kv: KvStore | None, publish: Publish) -> None:
        self.runtime = runtime
        self.kv = kv
        self.publish = publish
        self.plugins: dict[str, Plugin] = {}
        self.load_errors: dict[str, str] = {}
        """Plugins (by name) whose configured version could not be loaded, and why."""
        self.problems: list[str] = []
        """Why the plugin directory's last change was not taken (:mod:`edge.wasm.watch`);
        empty when it was."""
        self._chains: dict[str, list[Plugin]] = {}
        self._refused: dict[str, PluginSpec] = {}

    def configure(self, specs: Sequence[PluginSpec]) -> None:
        """Make ``specs`` the plugins, in that order: unchanged ones keep their
        instance and stats, a new or changed one is loaded (the old version, if any,
        keeps running when that fails), a removed one is dropped."""
        running = self.plugins
        new: dict[str, Plugin] = {}
        for spec in specs:
            old = running.get(spec.name)
            if old is not None and old.spec == spec:
                new[spec.name] = old
                self.load_errors.pop(spec.name, None)
                continue
            if self._refused.get(spec.name) == spec:  # rolled back from before: keep old
                if old is not None:
                    new[spec.name] = old
                continue
            try:
                plugin = Plugin(self, spec)
            except PluginError as e:
                self._load_failed(spec, old, e)
                if old is not None:
                    new[spec.name] = old
                continue
            plugin.previous = old
            if old is not None:
                plugin.stats.absorb(old.stats)
            self.load_errors.pop(spec.name, None)
            log.info("plugin %s loaded from %s", spec.ident, spec.source or spec.wasm)
            self.publish("plugin_loaded", plugin=spec.name, version=spec.version,
                         sha256=spec.sha256)
            new[spec.name] = plugin
        for name in set(self.load_errors) - {s.name for s in specs}:
            del self.load_errors[name]
        for name in set(running) - set(new):
            log.info("plugin %s removed", running[name].spec.ident)
            self.publish("plugin_removed", plugin=name, version=running[name].spec.version)
        self.plugins = new
        self._chains.clear()

    def _load_failed(self, spec: PluginSpec, old: Plugin | None, e: PluginError) -> None:
        kept = f"; version {old.spec.version} keeps running" if old is not None else ""
        message = f"{e}" if e.kind == "load" else f"{e.kind}: {e}"
        log.error("plugin %s (%s) cannot be loaded: %s%s", spec.ident, spec.source, message,
                  kept)
        self.load_errors[spec.name] = message
        self.publish("plugin_refused", plugin=spec.name, version=spec.version,
                     error=message, kept=old.spec.version if old is not None else None)

    def quarantined(self, plugin: Plugin) -> None:
        """Called by a plugin as it is quarantined: a new version quarantined within
        its first ``window_s`` gives way to the version it replaced."""
        prev = plugin.previous
        if prev is None or time.monotonic() - plugin.loaded_at > plugin.spec.window_s:
            return
        spec = plugin.spec
        log.error("plugin %s failed right after it was loaded; back to version %s",
                  spec.ident, prev.spec.version)
        self._refused[spec.name] = spec
        self.load_errors[spec.name] = f"rolled back: {plugin.stats.last_error}"
        prev.stats = dataclasses.replace(  # the counts so far include prev's (absorbed)
            plugin.stats, state=prev.stats.state, last_error=prev.stats.last_error,
            durations_us=prev.stats.durations_us)
        self.plugins[spec.name] = prev
        self._chains.clear()
        self.publish("plugin_rolled_back", plugin=spec.name, version=spec.version,
                     to=prev.spec.version, error=plugin.stats.last_error)

    def _chain(self, key: str) -> list[Plugin]:
        chain = self._chains.get(key)
        if chain is None:
            chain = self._chains[key] = [p for p in self.plugins.values() if p.spec.selects(key)]
        return chain

    def process(self, reading: Reading) -> list[Reading]:
        """``reading`` after every plugin that selects its device (an empty list when
        one dropped it)."""
        batch = [reading]
        for plugin in self._chain(f"{reading.namespace}/{reading.device}"):
            batch = plugin.run(batch)
            if not batch:
                break
        return batch

    def trouble(self, names: Sequence[str]) -> list[str]:
        """What is wrong with the plugins ``names``: not loaded (or rolled back) or
        quarantined; empty when all of them run."""
        out = []
        for name in names:
            p = self.plugins.get(name)
            if name in self.load_errors:
                out.append(f"{name}: {self.load_errors[name]}")
            elif p is not None and p.stats.state == "quarantined":
                out.append(f"{name} is quarantined ({p.stats.last_error})")
        return out

    def stats(self) -> dict[str, Any]:
        """Per plugin name, in the order they run: ``version``, ``sha256``, ``devices``,
        ``on_failure``, the :class:`PluginStats` counters, and ``load_error`` when its
        configured version could not be loaded (or was rolled back); a plugin never
        loaded has only ``state`` ``not loaded`` and ``load_error``."""
        out: dict[str, Any] = {}
        for name, p in self.plugins.items():
            out[name] = {"version": p.spec.version, "sha256": p.spec.sha256,
                         "devices": list(p.spec.devices), "on_failure": p.spec.on_failure,
                         **p.stats.snapshot(),
                         "load_error": self.load_errors.get(name, "")}
        for name, error in self.load_errors.items():
            out.setdefault(name, {"state": "not loaded", "load_error": error})
        return out

    def close(self) -> None:
        """Stop the ticker and close the key-value store."""
        self.runtime.stop()
        if self.kv is not None:
            self.kv.close()
