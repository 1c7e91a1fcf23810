"""The agent supervisor: wires configuration, Modbus pollers and the MQTT uplink.

One task per device (inside it, one per collect cycle). A task that fails with an
unexpected error is logged, reported as an ``agent_error`` event and restarted
after a growing delay; it never takes the other devices or the process down.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path

from edge import __version__
from edge.config.load import LoadedConfig
from edge.modbus.client import ConnectionPool
from edge.modbus.poller import DevicePoller
from edge.reading import Reading
from edge.uplink.client import BrokerSettings
from edge.uplink.publisher import PushSinks, Uplink
from edge.uplink.topics import Topics

log = logging.getLogger(__name__)

RESTART_DELAY_MAX_S = 30.0


def config_version(cfg: LoadedConfig, agent_file: str | Path) -> str:
    """A short content hash of the agent file and every manifest it loaded."""
    h = hashlib.sha256()
    for name in (str(agent_file), *sorted(cfg.files)):
        h.update(Path(name).read_bytes())
    return "sha256:" + h.hexdigest()[:12]


def broker_settings(cfg: LoadedConfig) -> BrokerSettings:
    """The uplink broker settings from the agent file (reads ``password_file``)."""
    up = cfg.agent.uplink
    password = None
    if up.password_file:
        password = Path(up.password_file).read_text(encoding="utf-8").strip()
    return BrokerSettings(
        host=up.host,
        port=up.port,
        client_id=up.client_id or f"edge-{cfg.agent.node}",
        keepalive=up.keepalive,
        ca=str(up.tls.ca) if up.tls.ca else None,
        cert=str(up.tls.cert) if up.tls.cert else None,
        key=str(up.tls.key) if up.tls.key else None,
        username=up.username,
        password=password,
    )


class Agent:
    """Runs until :meth:`run`'s ``stop`` event is set."""

    def __init__(self, cfg: LoadedConfig, *, version: str) -> None:
        self.cfg = cfg
        agent = cfg.agent
        self.topics = Topics.for_node(agent.uplink.topic_prefix, agent.node)
        self.uplink = Uplink(
            broker_settings(cfg),
            self.topics,
            qos=agent.uplink.qos,
            agent_version=__version__,
            config_version=version,
        )
        self.push = PushSinks(cfg.devices, f"edge-{agent.node}")
        m = agent.modbus
        self.pool = ConnectionPool(
            backoff_initial=m.backoff_initial_ms / 1000.0,
            backoff_max=m.backoff_max_ms / 1000.0,
            connect_timeout=m.connect_timeout_ms / 1000.0,
        )
        self.pollers = {
            d.key: DevicePoller(d, self.pool.get(d.endpoint), self._on_reading, self._on_state)
            for d in cfg.devices
        }

    def _on_reading(self, reading: Reading) -> None:
        self.uplink.publish_reading(reading)
        if self.push:
            self.push.push(reading)

    def _on_state(self, device: str, state: str, reason: str) -> None:
        log.info("device %s is %s%s", device, state, f" ({reason})" if reason else "")
        self.uplink.set_device_state(device, state, reason)

    async def run(self, stop: asyncio.Event) -> None:
        """Start everything, wait for ``stop``, then stop everything cleanly."""
        self.uplink.start()
        self.push.start()
        log.info(
            "agent %s: node %s, %d devices, %d read requests per round, broker %s:%d",
            __version__,
            self.cfg.agent.node,
            len(self.pollers),
            sum(p.request_count for p in self.pollers.values()),
            self.cfg.agent.uplink.host,
            self.cfg.agent.uplink.port,
        )
        tasks = [
            asyncio.create_task(self._supervise(key, p.run), name=f"device[{key}]")
            for key, p in self.pollers.items()
        ]
        try:
            await stop.wait()
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await self.pool.close()
            await asyncio.to_thread(self.uplink.stop)
            self.push.stop()
            log.info("agent stopped")

    async def _supervise(self, name: str, run: Callable[[], Awaitable[None]]) -> None:
        delay = 1.0
        while True:
            try:
                await run()
                return
            except asyncio.CancelledError:
                raise
            except Exception as e:  # a bug must not take the other devices down
                log.exception("%s failed; restarting in %.0f s", name, delay)
                self.uplink.publish_event("agent_error", task=name, error=repr(e))
                await asyncio.sleep(delay)
                delay = min(delay * 2, RESTART_DELAY_MAX_S)
