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
    gateway's memory; the SQLite outbox replaces this bound.
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
    reconnect_min_s: int = 1
    reconnect_max_s: int = 8
    max_queued: int = 20_000
