"""The uplink: readings, events and the retained agent state over MQTT (DESIGN.md §5).

Payloads are compact JSON (UTF-8). Topics come from :class:`edge.uplink.topics.Topics`.

* ``…/state`` (retained, QoS 1): ``{"state": "online", "version", "agent", "since",
  "devices": {"ns/name": "online"|"offline"}}`` while running;
  ``{"state": "offline", "version", "agent"}`` is the LWT (with the version the agent
  connected with) and is also published (with the running version) on
  a clean stop (the agent no longer vouches for any device then).
* ``…/telemetry/{namespace}/{device}``: a reading, see :class:`edge.reading.Reading`.
* ``…/events``: ``{"ts", "type", ...}``, e.g. ``{"type": "device_state", "device":
  "ns/name", "state": "offline", "reason": "..."}``.

Readings and events go through the SQLite outbox (:mod:`edge.uplink.forwarder`):
committed first, published in order, deleted on PUBACK. The retained state is not
stored: it is the current state, published again on every (re)connect.
* A property's ``pushMethod.mqtt`` gets ``{"device", "namespace", "property",
  "value", "ts"}`` on its own topic and broker, at most once per ``reportCycle``.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from typing import Any

from edge.config.model import DeviceSpec, MqttPush
from edge.reading import Reading
from edge.store.outbox import NewMessage, Outbox
from edge.uplink.client import BrokerClient, Will
from edge.uplink.forwarder import Forwarder
from edge.uplink.payload import json_bytes, now_ms
from edge.uplink.settings import BrokerSettings, ForwardSettings
from edge.uplink.topics import Topics

log = logging.getLogger(__name__)

STATE_DELAY_S = 0.2


class Uplink:
    """Publishes to the node's broker; all methods are safe to call from the event loop."""

    def __init__(
        self,
        settings: BrokerSettings,
        topics: Topics,
        *,
        qos: int,
        agent_version: str,
        config_version: str,
        outbox: Outbox,
        forward: ForwardSettings | None = None,
    ) -> None:
        self.topics = topics
        self.qos = qos
        self._agent_version = agent_version
        self._config_version = config_version
        self._since = now_ms()
        self._devices: dict[str, str] = {}
        self._config: dict[str, Any] = {"applied": 0, "pending": None, "last_error": ""}
        self._lock = threading.Lock()
        self._state_pending: asyncio.TimerHandle | None = None
        self._offline = json_bytes(
            {"state": "offline", "version": config_version, "agent": agent_version}
        )
        self.client = BrokerClient(settings, will=Will(topics.state, self._offline))
        self.client.add_connect_hook(self._publish_state)
        self.forwarder = Forwarder(outbox, self.client, events_topic=topics.events,
                                   settings=forward)

    def start(self) -> None:
        """Start forwarding and connecting; the retained ``online`` state follows every
        (re)connect."""
        self.forwarder.start()
        self.client.start()

    def publish_reading(self, reading: Reading) -> None:
        """Queue one reading for its device's telemetry topic at the configured QoS
        (committed to the outbox, then published)."""
        self.forwarder.submit(NewMessage(
            self.topics.telemetry(reading.namespace, reading.device),
            reading.payload_json(), self.qos, reading.ts_ms,
            f"{reading.namespace}/{reading.device}", reading.seq,
        ))

    def publish_event(self, kind: str, /, **fields: Any) -> None:
        """Queue ``{"ts", "type": kind, **fields}`` for ``…/events`` (QoS 1, via the outbox)."""
        self.forwarder.event(kind, **fields)

    def set_device_state(self, device: str, state: str, reason: str = "") -> None:
        """Record a device's ``online``/``offline`` state: an event at once, and the
        retained state STATE_DELAY_S later, so that many devices changing together
        (a gateway or bus going down) make one state message, not one each.

        Call from the event loop.
        """
        with self._lock:
            if self._devices.get(device) == state:
                return
            self._devices[device] = state
        self.publish_event("device_state", device=device, state=state, reason=reason)
        if self._state_pending is None or self._state_pending.cancelled():
            self._state_pending = asyncio.get_running_loop().call_later(
                STATE_DELAY_S, self._publish_state_now
            )

    def device_states(self) -> dict[str, str]:
        """The last reported state of each device."""
        with self._lock:
            return dict(self._devices)

    def config_state(self) -> dict[str, Any]:
        """The ``config`` block of the retained state (``applied``, ``pending``,
        ``last_error``; empty before the control plane reported)."""
        with self._lock:
            return dict(self._config)

    def forget_device(self, device: str) -> None:
        """A device no longer configured: it leaves the retained state (at once)."""
        with self._lock:
            if self._devices.pop(device, None) is None:
                return
        self._publish_state()

    def set_config(self, version: str, config: dict[str, Any]) -> None:
        """The running configuration's content hash and its ``config`` block of the
        retained state (``applied``, ``pending``, ``last_error``); published at once."""
        with self._lock:
            self._config_version = version
            self._config = dict(config)
            self._offline = json_bytes(
                {"state": "offline", "version": version, "agent": self._agent_version})
        self._publish_state()

    def _publish_state_now(self) -> None:
        self._state_pending = None
        self._publish_state()

    def cancel_pending(self) -> None:
        """Drop a retained-state update not yet sent (call from the loop before :meth:`stop`)."""
        if self._state_pending is not None:
            self._state_pending.cancel()

    def stop(self, *, timeout_s: float = 2.0) -> None:
        """Commit what is queued, wait for what is in flight, close the outbox; then
        publish the retained ``offline`` state, wait for its PUBACK, disconnect.

        Blocks: call it from a worker thread, after :meth:`cancel_pending`.
        """
        self.forwarder.stop(timeout_s)
        info = self.client.publish(self.topics.state, self._offline, retain=True)
        self.client.wait_acked(info, timeout_s)
        self.client.stop()

    def _publish_state(self) -> None:
        """Publish the retained online state (called from the loop and paho's thread).
        Not while disconnected: paho would queue a state that is stale by the time it
        goes out, after the fresh one the connect publishes."""
        if not self.client.stats.connected:
            return
        with self._lock:
            payload = json_bytes(
                {
                    "state": "online",
                    "version": self._config_version,
                    "agent": self._agent_version,
                    "since": self._since,
                    "devices": dict(self._devices),
                    "config": self._config,
                }
            )
            self.client.publish(self.topics.state, payload, retain=True)


class PushSinks:
    """The per-property ``pushMethod.mqtt`` sinks: one client per distinct broker."""

    def __init__(self, devices: tuple[DeviceSpec, ...], client_id_prefix: str) -> None:
        self._by_device: dict[str, list[tuple[str, MqttPush]]] = {}
        self._clients: dict[tuple[str, int, bool], BrokerClient] = {}
        self._last_push: dict[tuple[str, str], int] = {}
        self._cycle: dict[tuple[str, str], int] = {}
        for d in devices:
            for p in d.properties:
                if p.push_mqtt is None:
                    continue
                self._by_device.setdefault(d.key, []).append((p.name, p.push_mqtt))
                self._cycle[(d.key, p.name)] = p.report_cycle_ms
                broker = (p.push_mqtt.host, p.push_mqtt.port, p.push_mqtt.tls)
                if broker not in self._clients:
                    self._clients[broker] = BrokerClient(
                        BrokerSettings(
                            host=broker[0],
                            port=broker[1],
                            tls=broker[2],
                            client_id=f"{client_id_prefix}-push-{len(self._clients)}",
                        )
                    )

    def __bool__(self) -> bool:
        return bool(self._by_device)

    def start(self) -> None:
        """Connect every sink broker in the background."""
        for c in self._clients.values():
            c.start()

    def push(self, reading: Reading) -> None:
        """Publish the good values of ``reading`` whose report cycle has elapsed."""
        key = f"{reading.namespace}/{reading.device}"
        for name, sink in self._by_device.get(key, ()):
            if name not in reading.values:
                continue
            last = self._last_push.get((key, name))
            if last is not None and reading.ts_ms - last < self._cycle[(key, name)]:
                continue
            self._last_push[(key, name)] = reading.ts_ms
            payload = {
                "device": reading.device,
                "namespace": reading.namespace,
                "property": name,
                "value": reading.values[name],
                "ts": reading.ts_ms,
            }
            client = self._clients[(sink.host, sink.port, sink.tls)]
            client.publish(sink.topic, json_bytes(payload), qos=sink.qos, retain=sink.retained)

    def stop(self) -> None:
        """Disconnect every sink broker."""
        for c in self._clients.values():
            c.stop()
