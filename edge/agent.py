"""The agent supervisor: wires configuration, Modbus pollers and the MQTT uplink.

One task per device (inside it, one per collect cycle). A task that fails with an
unexpected error is logged, reported as an ``agent_error`` event and restarted
after a growing delay; it never takes the other devices or the process down.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from edge import __version__
from edge.config.model import DeviceSpec
from edge.config.runtime import RuntimeConfig
from edge.modbus.client import ConnectionPool
from edge.modbus.poller import DevicePoller
from edge.policy.enforcer import WATCH_S, Enforcer
from edge.reading import Reading
from edge.store.history import History, history_file
from edge.store.outbox import Outbox
from edge.sync.writes import Writes
from edge.systemd import Notifier
from edge.uplink.payload import now_ms
from edge.uplink.publisher import PushSinks, Uplink
from edge.uplink.topics import Topics
from edge.uplink.twins import Twins
from edge.wasm.spec import PluginSpec

if TYPE_CHECKING:  # wasmtime is imported only when a plugin is configured
    from edge.wasm.host import Plugins

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class DeviceChanges:
    """What :meth:`Agent.apply_devices` did, by device key, and the plugins it
    loaded anew (new or changed, by name)."""

    added: tuple[str, ...]
    changed: tuple[str, ...]
    removed: tuple[str, ...]
    plugins: tuple[str, ...] = ()


def _as_polled(d: DeviceSpec) -> DeviceSpec:
    return dataclasses.replace(d, source="", properties=tuple(
        dataclasses.replace(p, desired=None) for p in d.properties))


def same_device(a: DeviceSpec, b: DeviceSpec) -> bool:
    """Equal as polled: where they were read from (``source``) and the desired values
    are left out (a new desired value is a write, :mod:`edge.sync.writes`, not a new
    poller, and the device need not answer for the configuration to be healthy)."""
    return _as_polled(a) == _as_polled(b)


HOT = ("devices", "log_level", "health_window_s", "warnings", "files", "version",
       "bundle_version", "bundle", "plugins", "plugin_dir", "release")
"""RuntimeConfig fields a running agent takes over without a restart (``release``:
nothing runs on it; a release that is due restarts the agent onto it,
:mod:`edge.sync.release`)."""


def _push_sinks(devices: tuple[DeviceSpec, ...]) -> list[tuple[str, str, object, int]]:
    """Every ``pushMethod.mqtt`` sink with its reportCycle, by device and property."""
    return [(d.key, p.name, p.push_mqtt, p.report_cycle_ms) for d in devices
            for p in d.properties if p.push_mqtt is not None]


def needs_restart(running: RuntimeConfig, new: RuntimeConfig) -> list[str]:
    """The RuntimeConfig fields that differ and cannot change while running."""
    return [f.name for f in dataclasses.fields(running)
            if f.name not in HOT and getattr(running, f.name) != getattr(new, f.name)]

RESTART_DELAY_MAX_S = 30.0
UPLINK_WATCH_S = 1.0
UPLINK_WARN_AFTER_S = 10.0


class Agent:
    """Runs until :meth:`run`'s ``stop`` event is set.

    ``history`` is the configuration history (default: opened beside the outbox); it
    also remembers the desired values written (:mod:`edge.sync.writes`).
    """

    def __init__(self, cfg: RuntimeConfig, history: History | None = None) -> None:
        self.cfg = cfg
        self.history = history or History(history_file(cfg.store.path))
        self.task_failures = 0
        """Agent tasks that failed with an unexpected error (the health window resets it)."""
        self.services: list[Callable[[], Awaitable[None]]] = []
        self.notifier = Notifier()
        """systemd's ear (Type=notify, WatchdogSec): READY, WATCHDOG, STOPPING."""
        """More long-running tasks for :meth:`run` (e.g. the control-plane sync)."""
        self.reading_hooks: list[Callable[[Reading], None]] = []
        """Called with every reading, in the event loop (e.g. the web page's trends)."""
        self.topics = Topics(cfg.topic_prefix)
        st = cfg.store
        self.outbox = Outbox(st.path, max_bytes=st.max_bytes, ttl_ms=st.ttl_ms, drop=st.drop,
                             synchronous=st.synchronous)
        self.uplink = Uplink(
            cfg.broker,
            self.topics,
            qos=cfg.qos,
            agent_version=__version__,
            config_version=cfg.version,
            outbox=self.outbox,
            forward=cfg.forward,
        )
        self.push = PushSinks(cfg.devices, cfg.broker.client_id)
        self.twins = Twins(self.uplink.client, self.topics)
        self.twins.configure(cfg.devices)
        m = cfg.modbus
        self.pool = ConnectionPool(
            backoff_initial=m.backoff_initial_s,
            backoff_max=m.backoff_max_s,
            connect_timeout=m.connect_timeout_s,
        )
        # seq goes on from the last committed reading; a device new to this store starts
        # at 1, or at the clock (ms) when a damaged store was replaced, so that seq never
        # goes back for a consumer that de-duplicates by (device, seq)
        self._fresh_seq = now_ms() if self.outbox.replaced_damaged_file else 1
        seqs = self.outbox.seqs
        self.pollers = {
            d.key: self._poller(d, seqs[d.key] + 1 if d.key in seqs else self._fresh_seq)
            for d in cfg.devices
        }
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self.plugins: Plugins | None = None
        """The WASM plugin host, from the first configured plugin on."""
        self._configure_plugins(cfg)
        self.writes = Writes(self.pool, self.history, self.twins, self.uplink.publish_event)
        self.policy = Enforcer(cfg.policy, cfg.store.path.parent / "policy-state.json")
        """The network policy in the kernel (:mod:`edge.policy.enforcer`), loaded by
        :meth:`run` before any connection is opened."""
        self.config_events: collections.Counter[str] = collections.Counter()
        """``config_applied``, ``config_committed``, ``config_rolled_back`` and
        ``config_refused`` events since start (:mod:`edge.sync.controller`)."""
        self.restart_for = ""
        """Why :meth:`run` returned for the process to start again ("" when it was
        stopped): a configuration that needs a new process (``edge run`` re-executes)."""
        self._stop: asyncio.Event | None = None
        self._uplink_down_since = time.monotonic()
        self.started_ms = now_ms()

    def request_restart(self, reason: str) -> None:
        """Stop cleanly, as for a signal, so that the process can start again."""
        log.warning("restarting the agent: %s", reason)
        self.restart_for = reason
        if self._stop is not None:
            self._stop.set()

    def _configure_plugins(self, cfg: RuntimeConfig) -> tuple[str, ...]:
        """Load ``cfg``'s plugins (:mod:`edge.wasm`); the names loaded anew."""
        if self.plugins is None and not cfg.plugins:
            return ()
        host = self.plugins if self.plugins is not None else self._plugin_host()
        before = {n: p.spec for n, p in host.plugins.items()}
        host.configure(cfg.plugins)
        return tuple(s.name for s in cfg.plugins if before.get(s.name) != s)

    def _plugin_host(self) -> Plugins:
        """The plugin host, made the first time a plugin (or a problem) shows up."""
        from edge.wasm.host import Plugins  # noqa: PLC0415 (wasmtime costs ~10 MB)
        from edge.wasm.instance import Runtime  # noqa: PLC0415
        from edge.wasm.kv import KvStore  # noqa: PLC0415

        self.plugins = Plugins(Runtime(self.cfg.plugin_cache),
                               KvStore(self.cfg.store.path.parent / "plugins.db"),
                               self.uplink.publish_event)
        return self.plugins

    def apply_plugins(self, plugins: tuple[PluginSpec, ...]) -> tuple[str, ...]:
        """Run ``plugins`` from the next batch on (from the plugin directory's hot
        reload, :mod:`edge.wasm.watch`); the names loaded anew."""
        cfg = dataclasses.replace(self.cfg, plugins=plugins)
        loaded = self._configure_plugins(cfg)
        self.cfg = cfg
        return loaded

    def plugin_problems(self, problems: list[str]) -> None:
        """Why the plugin directory's last change was not taken (empty: it was), for the
        web page; said in the log when they clear."""
        if self.plugins is None and not problems:
            return
        host = self.plugins if self.plugins is not None else self._plugin_host()
        if host.problems and not problems:
            log.info("the plugins in %s validate again", self.cfg.plugin_dir)
        host.problems = problems

    def _poller(self, d: DeviceSpec, first_seq: int) -> DevicePoller:
        m = self.cfg.modbus
        return DevicePoller(d, self.pool.get(d.endpoint), self._on_reading, self._on_state,
                            breaker_failures=m.breaker_failures,
                            probe_initial_s=m.probe_initial_s, probe_max_s=m.probe_max_s,
                            first_seq=first_seq)

    def _start_poller(self, key: str) -> None:
        self._tasks[key] = asyncio.create_task(self._supervise(key, self.pollers[key].run),
                                               name=f"device[{key}]")

    async def _stop_poller(self, key: str) -> int:
        """Stop one device's polling; the seq its next reading would have had."""
        task = self._tasks.pop(key, None)
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        return self.pollers.pop(key).next_seq

    async def apply_devices(self, cfg: RuntimeConfig) -> DeviceChanges:
        """Make ``cfg``'s devices the polled ones, hot: a device whose definition did
        not change keeps its poller (no gap), a changed one is restarted (``seq`` goes
        on), a removed one stops (its retained state entry is dropped), a new one starts.
        The rest of ``cfg`` must equal the running configuration but for the log level
        (see :func:`needs_restart`)."""
        old = {d.key: d for d in self.cfg.devices}
        new = {d.key: d for d in cfg.devices}
        changes = DeviceChanges(
            added=tuple(k for k in new if k not in old),
            removed=tuple(k for k in old if k not in new),
            changed=tuple(k for k in new if k in old and not same_device(old[k], new[k])),
        )
        sinks_changed = _push_sinks(self.cfg.devices) != _push_sinks(cfg.devices)
        changes = dataclasses.replace(changes, plugins=self._configure_plugins(cfg))
        self.cfg = cfg
        self.twins.configure(cfg.devices)
        self.writes.configure(cfg.devices)
        logging.getLogger("edge").setLevel(cfg.log_level.upper())
        for key in (*changes.removed, *changes.changed):
            next_seq = await self._stop_poller(key)
            if key in changes.removed:
                self.uplink.forget_device(key)
            else:
                self.pollers[key] = self._poller(new[key], next_seq)
        seqs = self.outbox.seqs if changes.added else {}
        for key in changes.added:
            self.pollers[key] = self._poller(
                new[key], seqs[key] + 1 if key in seqs else self._fresh_seq)
        for key in (*changes.changed, *changes.added):
            self._start_poller(key)
        if sinks_changed:  # their clients reconnect: only when a sink changed
            self.push.stop()
            self.push = PushSinks(cfg.devices, cfg.broker.client_id)
            self.push.start()
        log.info("devices applied: %d added, %d changed, %d removed, %d unchanged",
                 len(changes.added), len(changes.changed), len(changes.removed),
                 len(new) - len(changes.added) - len(changes.changed))
        return changes

    def stats(self) -> dict[str, Any]:
        """A snapshot for the web page and /metrics, plain JSON-able values.

        ``outbox``: ``rows``/``bytes`` stored now, ``oldest_age_s`` (0 when empty),
        ``dropped`` by reason, ``committed``/``acked`` since start, ``transactions``,
        ``corrupt_files``. ``uplink``: ``connected``, ``reconnects`` (connections after
        the first), ``inflight``, ``published``/``acked`` since start, ``publish_rate``
        (acknowledged messages/s over the last 10 s), ``held`` (in memory, disk full).
        ``devices``: per ``ns/name`` the poller's counters and breaker
        (:class:`~edge.modbus.poller.DeviceStats`). ``config``: ``version`` (content
        hash), ``applied`` (bundle version, 0 for the agent file alone) and ``events``
        (config events by kind since start). ``plugins``: per plugin name its counters
        (:meth:`edge.wasm.host.Plugins.stats`), empty without plugins.
        """
        ob, fw, cl = self.outbox.stats, self.uplink.forwarder, self.uplink.client.stats
        return {
            "outbox": {
                "rows": ob.rows, "bytes": ob.bytes,
                "oldest_age_s": max(0.0, (now_ms() - ob.oldest_ts) / 1000) if ob.rows else 0.0,
                "dropped": dict(ob.dropped), "committed": ob.committed, "acked": ob.acked,
                "transactions": ob.transactions, "corrupt_files": list(ob.corrupt_files),
            },
            "uplink": {
                "connected": cl.connected, "reconnects": max(0, cl.connects - 1),
                "inflight": fw.inflight, "published": fw.stats.published,
                "acked": fw.stats.acked, "publish_rate": fw.stats.publish_rate(time.monotonic()),
                "held": fw.stats.held,
            },
            "devices": {key: dataclasses.asdict(p.stats) for key, p in self.pollers.items()},
            "config": {"version": self.cfg.version, "applied": self.cfg.bundle_version,
                       "events": dict(self.config_events)},
            "plugins": self.plugins.stats() if self.plugins is not None else {},
            "policy": {"state": self.policy.state, "reason": self.policy.reason,
                       "drops": dict(self.policy.drops)},
        }

    def device_states(self) -> dict[str, str]:
        """``online``/``offline`` of each polled device (``unknown`` before its first
        cycle ended)."""
        known = self.uplink.device_states()
        return {key: known.get(key, "unknown") for key in self.pollers}

    def _on_reading(self, reading: Reading) -> None:
        if self.plugins is None:
            self.uplink.publish_reading(reading)
        else:
            for out in self.plugins.process(reading):
                self.uplink.publish_reading(out)
        self.twins.update(reading)
        if self.push:
            self.push.push(reading)
        for hook in self.reading_hooks:
            hook(reading)

    def _on_state(self, device: str, state: str, reason: str) -> None:
        log.info("device %s is %s%s", device, state, f" ({reason})" if reason else "")
        self.uplink.set_device_state(device, state, reason)

    async def run(self, stop: asyncio.Event) -> None:
        """Start everything, wait for ``stop``, then stop everything cleanly."""
        self._stop = stop
        self._start_policy()
        for moved in self.outbox.stats.corrupt_files:
            log.error("the store %s was damaged: moved to %s and started afresh",
                      self.outbox.path, moved)
            self.uplink.publish_event("store_corrupt", moved_to=moved, kept=0, lost=None)
        self.uplink.start()
        self.push.start()
        log.info(
            "agent %s: node %s, %d devices, %d read requests per round, broker %s:%d",
            __version__,
            self.cfg.node,
            len(self.pollers),
            sum(p.request_count for p in self.pollers.values()),
            self.cfg.broker.host,
            self.cfg.broker.port,
        )
        for key in self.pollers:
            self._start_poller(key)
        self.writes.configure(self.cfg.devices)
        watch = [asyncio.create_task(self._watch_uplink(), name="uplink-watch")]
        if self.policy.state != "off":
            watch.append(asyncio.create_task(self._supervise("policy", self._watch_policy),
                                             name="policy"))
        watch += [asyncio.create_task(self._supervise(f"service[{i}]", svc), name=f"service[{i}]")
                  for i, svc in enumerate(self.services)]
        watch.append(asyncio.create_task(self.notifier.keepalive(), name="watchdog"))
        self.notifier.send("READY=1", f"STATUS=polling {len(self.pollers)} devices, "
                           f"publishing to {self.cfg.broker.host}:{self.cfg.broker.port}")
        try:
            await stop.wait()
        finally:
            self.notifier.send("STOPPING=1")
            tasks = [*watch, *self._tasks.values()]
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await self.writes.stop()
            await self.pool.close()
            self.uplink.cancel_pending()
            await asyncio.to_thread(self.uplink.stop)
            self.push.stop()
            if self.plugins is not None:
                self.plugins.close()
            self.policy.close()
            log.info("agent stopped")

    def _start_policy(self) -> None:
        """The policy into the kernel before the uplink or a device is connected (the
        connections the agent opens are then judged as opened outwards)."""
        state = self.policy.start()
        if state == "unenforced":
            self.uplink.publish_event("policy_unenforced", reason=self.policy.reason)
        elif state == "enforced":
            self.uplink.publish_event("policy_applied", summary=self.policy.summary())

    async def _watch_policy(self) -> None:
        while True:
            await asyncio.sleep(WATCH_S)
            self.policy.poll()

    async def _watch_uplink(self) -> None:
        """Say so when the broker stays unreachable, whatever paho did or did not log
        (a listener that accepts and never answers, resets, or speaks garbage)."""
        stats = self.uplink.client.stats
        warned = False
        while True:
            await asyncio.sleep(UPLINK_WATCH_S)
            if stats.connected:
                self._uplink_down_since, warned = time.monotonic(), False
            elif not warned and self.uplink_down_for() >= UPLINK_WARN_AFTER_S:
                warned = True
                log.warning(
                    "not connected to the MQTT broker %s:%d for %.0f s%s; readings are "
                    "not being delivered", self.cfg.broker.host, self.cfg.broker.port,
                    self.uplink_down_for(),
                    f" ({stats.last_error})" if stats.last_error else "",
                )

    def uplink_down_for(self) -> float:
        """Seconds the uplink has not been connected, as of the last check (once a
        second; since the start before the first connection); 0.0 when connected."""
        if self.uplink.client.stats.connected:
            return 0.0
        return time.monotonic() - self._uplink_down_since

    async def _supervise(self, name: str, run: Callable[[], Awaitable[None]]) -> None:
        delay = 1.0
        while True:
            try:
                await run()
                return
            except asyncio.CancelledError:
                raise
            except Exception as e:  # a bug must not take the other devices down
                self.task_failures += 1
                log.exception("%s failed; restarting in %.0f s", name, delay)
                self.uplink.publish_event("agent_error", task=name, error=repr(e))
                await asyncio.sleep(delay)
                delay = min(delay * 2, RESTART_DELAY_MAX_S)
