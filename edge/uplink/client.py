"""A connected MQTT client (paho-mqtt 2.x) with reconnect, TLS and counters.

paho runs its network loop in one thread per client (``loop_start``); ``publish`` is
thread-safe and never blocks the asyncio loop: while the broker is away paho keeps
QoS 1 messages in its own queue (bounded by ``max_queued``) and sends them after the
reconnect.
"""

from __future__ import annotations

import logging
import socket
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, cast

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.reasoncodes import ReasonCode

from edge.uplink.settings import BrokerSettings

log = logging.getLogger(__name__)

DROP_LOG_INTERVAL_S = 60.0


@dataclass(frozen=True, slots=True)
class Will:
    """Last will: published by the broker if the connection dies uncleanly."""

    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = True


@dataclass(slots=True)
class ClientStats:
    """Counters since start; ``acked`` counts PUBACKs (QoS 1) and sent QoS 0 messages."""

    connected: bool = False
    connects: int = 0
    disconnects: int = 0
    published: int = 0
    acked: int = 0
    dropped: int = 0
    last_error: str = ""


@dataclass(slots=True)
class _Hooks:
    on_connect: list[Callable[[], None]] = field(default_factory=list)


def _no_delay(_c: mqtt.Client, _u: Any, sock: Any) -> None:
    """Send each publish at once: paho leaves Nagle's algorithm on, which holds a
    reading behind the previous one until the broker's delayed ACK (up to 40 ms)."""
    if isinstance(sock, socket.socket) and sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class BrokerClient:
    """One MQTT connection; call :meth:`start`, then :meth:`publish`, then :meth:`stop`."""

    def __init__(self, settings: BrokerSettings, *, will: Will | None = None) -> None:
        self.settings = settings
        self.stats = ClientStats()
        self._hooks = _Hooks()
        self.on_acked: Callable[[int], None] | None = None
        """Called with the message id (in paho's thread) when a QoS 1 message is
        acknowledged (PUBACK) or a QoS 0 message was written to the socket."""
        self._drop_logged_at = -DROP_LOG_INTERVAL_S
        c = mqtt.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=settings.client_id,
            clean_session=settings.clean_session,
            reconnect_on_failure=True,
        )
        if settings.tls or settings.ca or settings.cert:
            c.tls_set(
                ca_certs=settings.ca,
                certfile=settings.cert,
                keyfile=settings.key,
                cert_reqs=ssl.CERT_REQUIRED,
            )
        if settings.username is not None:
            c.username_pw_set(settings.username, settings.password)
        if will is not None:
            c.will_set(will.topic, will.payload, qos=will.qos, retain=will.retain)
        # paho annotates int but computes in floats; sub-second delays are what make
        # data flow again within a second of the broker coming back
        c.reconnect_delay_set(
            cast(int, settings.reconnect_min_s), cast(int, settings.reconnect_max_s)
        )
        c.max_queued_messages_set(settings.max_queued)
        c.max_inflight_messages_set(settings.max_inflight)
        c.on_socket_open = _no_delay
        c.on_connect = self._on_connect
        c.on_connect_fail = self._on_connect_fail
        c.on_disconnect = self._on_disconnect
        c.on_publish = self._on_publish
        self._client = c

    @property
    def paho(self) -> mqtt.Client:
        """The underlying paho client (for subscriptions)."""
        return self._client

    def add_connect_hook(self, hook: Callable[[], None]) -> None:
        """Call ``hook`` (in paho's thread) after every successful (re)connect."""
        self._hooks.on_connect.append(hook)

    def start(self) -> None:
        """Connect in the background; reconnects forever until :meth:`stop`."""
        s = self.settings
        self._client.connect_async(s.host, s.port, keepalive=s.keepalive)
        self._client.loop_start()

    def publish(
        self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False
    ) -> mqtt.MQTTMessageInfo | None:
        """Queue one message; None (and counted as dropped) when paho's queue is full."""
        info = self._client.publish(topic, payload, qos=qos, retain=retain)
        if info.rc in (MQTTErrorCode.MQTT_ERR_SUCCESS, MQTTErrorCode.MQTT_ERR_NO_CONN):
            self.stats.published += 1
            return info
        self.stats.dropped += 1
        now = time.monotonic()
        if now - self._drop_logged_at >= DROP_LOG_INTERVAL_S:  # say it, but not per message
            self._drop_logged_at = now
            log.warning("MQTT publish to %s dropped (%s); %d dropped since start",
                        topic, mqtt.error_string(info.rc), self.stats.dropped)
        return None

    def publish_mid(self, topic: str, payload: bytes, *, qos: int) -> int | None:
        """:meth:`publish` returning the MQTT message id (None when refused); the id
        comes back through :attr:`on_acked`."""
        info = self.publish(topic, payload, qos=qos)
        return None if info is None else info.mid

    def wait_acked(self, info: mqtt.MQTTMessageInfo | None, timeout_s: float) -> bool:
        """Block until the message behind ``info`` is acknowledged (False on timeout)."""
        if info is None or not self.stats.connected:
            return False
        try:
            info.wait_for_publish(timeout_s)
        except (ValueError, RuntimeError):
            return False
        return info.is_published()

    def stop(self) -> None:
        """Disconnect cleanly (the will is not sent) and stop the network thread."""
        self._client.disconnect()
        self._client.loop_stop()

    def _on_connect(
        self, _c: mqtt.Client, _u: Any, _f: Any, reason: ReasonCode, _p: Any
    ) -> None:
        if reason.is_failure:
            self.stats.last_error = f"connect refused: {reason}"
            log.warning("MQTT broker %s:%d refused the connection: %s",
                        self.settings.host, self.settings.port, reason)
            return
        self.stats.connected = True
        self.stats.connects += 1
        log.info("MQTT connected to %s:%d", self.settings.host, self.settings.port)
        for hook in self._hooks.on_connect:
            hook()

    def _on_connect_fail(self, _c: mqtt.Client, _u: Any) -> None:
        first = not self.stats.last_error.startswith("cannot reach")
        self.stats.last_error = f"cannot reach {self.settings.host}:{self.settings.port}"
        log.log(logging.WARNING if first else logging.DEBUG,
                "MQTT broker %s:%d unreachable; retrying every %g-%g s",
                self.settings.host, self.settings.port,
                self.settings.reconnect_min_s, self.settings.reconnect_max_s)

    def _on_disconnect(
        self, _c: mqtt.Client, _u: Any, _f: Any, reason: ReasonCode, _p: Any
    ) -> None:
        if self.stats.connected:
            self.stats.disconnects += 1
            level = logging.INFO if reason.value == 0 else logging.WARNING
            log.log(level, "MQTT connection to %s:%d closed: %s",
                    self.settings.host, self.settings.port, reason)
        self.stats.connected = False
        self.stats.last_error = str(reason)

    def _on_publish(self, _c: mqtt.Client, _u: Any, mid: int, _r: Any, _p: Any) -> None:
        self.stats.acked += 1
        if self.on_acked is not None:
            self.on_acked(mid)
