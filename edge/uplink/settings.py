"""Where and how the agent reaches an MQTT broker (no paho import: cheap to load)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class BrokerSettings:
    """Where and how to connect.

    ``ca`` alone verifies the broker (TLS); ``cert`` + ``key`` add a client
    certificate (mutual TLS); ``tls`` without ``ca`` verifies against the system
    store. ``keepalive`` is in seconds; reconnect delays in seconds. ``max_queued``
    bounds the messages paho keeps in memory while the broker is away (about 1.7 kB
    each for a 50-value reading: 20 000 ≈ 34 MB), so an outage cannot exhaust a small
    gateway's memory (the uplink's readings wait in the SQLite outbox instead, and
    only ``max_inflight`` of them are ever handed to paho at once).
    ``clean_session=False`` asks the broker to keep the session (subscriptions and
    unacknowledged QoS 1 messages) of ``client_id`` while it is disconnected.
    """

    host: str
    port: int
    client_id: str
    keepalive: int = 30
    tls: bool = False
    ca: str | None = None
    cert: str | None = None
    key: str | None = None
    username: str | None = None
    password: str | None = None
    reconnect_min_s: float = 1.0
    reconnect_max_s: float = 8.0
    max_queued: int = 20_000
    max_inflight: int = 1000
    clean_session: bool = True


@dataclass(frozen=True, slots=True)
class ForwardSettings:
    """Pacing of the uplink from the outbox.

    ``inflight``: messages published and not yet acknowledged, at most; ``rate``:
    messages per second, at most, of a backlog's drain; ``order``: ``device`` (a live
    reading waits for the unsent older readings of its own device) or ``live`` (it
    goes out at once; consumers order by ``seq``); ``tail``: committed
    messages kept in memory so live traffic is published without reading them back;
    ``ack_delay_s``: how long acknowledgements may wait to be deleted when no new
    message comes to share the transaction; ``held_max``: messages kept in memory
    while the disk is full.
    """

    inflight: int = 100
    rate: float = 2500.0
    order: str = "device"
    tail: int = 1000
    ack_delay_s: float = 0.1
    held_max: int = 20_000
