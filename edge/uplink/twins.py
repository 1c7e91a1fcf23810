"""Device twins, KubeEdge-shaped, retained on ``{prefix}/twins/{namespace}/{device}``.

Payload: ``{property: {"reported": {"value", "ts"}, "observedDesired": {"value"}}}``
for each property with ``reportToCloud``. ``observedDesired`` is the manifest's
``desired`` value as the device took it: the value read back after the agent wrote it
(:mod:`edge.sync.writes`); absent until then, and kept while a newer desired value is
not yet written. A property's reported value is refreshed at most once per
its ``reportCycle`` (the twin is published when any of its properties is due); a
property read ``bad`` keeps its last good value. Twins are the current state, like
``state``: not stored in the outbox, published again on every (re)connect.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Sequence
from typing import Any

from edge.config.model import DeviceSpec
from edge.reading import Reading
from edge.uplink.client import BrokerClient
from edge.uplink.payload import json_bytes
from edge.uplink.topics import Topics


class Twins:
    """The twins of the configured devices; :meth:`update` from the event loop."""

    def __init__(self, client: BrokerClient, topics: Topics) -> None:
        self._client = client
        self._topics = topics
        self._lock = threading.Lock()
        self._cycle: dict[tuple[str, str], int] = {}
        self._observed: dict[tuple[str, str], Any] = {}
        self._docs: dict[str, dict[str, Any]] = {}
        self._last: dict[tuple[str, str], int] = {}
        client.add_connect_hook(self._publish_all)

    def configure(self, devices: Sequence[DeviceSpec]) -> None:
        """Take the reportable properties of ``devices`` (again after a new config);
        twins of devices no longer configured are cleared (empty retained message)."""
        keys = {d.key for d in devices}
        with self._lock:
            gone = [k for k in self._docs if k not in keys]
            self._cycle = {(d.key, p.name): p.report_cycle_ms
                           for d in devices for p in d.properties if p.report_to_cloud}
            wanted = {(d.key, p.name) for d in devices for p in d.properties
                      if p.report_to_cloud and p.desired is not None}
            self._observed = {k: v for k, v in self._observed.items() if k in wanted}
            for k in gone:
                del self._docs[k]
        for k in gone:
            ns, _, name = k.partition("/")
            self._client.publish(self._topics.twin(ns, name), b"", retain=True)

    def update(self, reading: Reading) -> None:
        """Fold one reading in; publish the device's twin when a property is due."""
        key = f"{reading.namespace}/{reading.device}"
        due = False
        with self._lock:
            doc = self._docs.setdefault(key, {})
            for prop, value in reading.values.items():
                cycle = self._cycle.get((key, prop))
                if cycle is None or reading.quality.get(prop) == "bad":
                    continue
                if reading.ts_ms - self._last.get((key, prop), -cycle) >= cycle:
                    self._last[(key, prop)] = reading.ts_ms
                    doc[prop] = {"reported": {"value": value, "ts": reading.ts_ms}}
                    due = True
            if not due or not self._client.stats.connected:
                return  # while disconnected, the connect publishes what is current
            payload = self._payload(key)
        self._client.publish(self._topics.twin(reading.namespace, reading.device), payload,
                             retain=True)

    def observed(self, key: str, prop: str, value: Any) -> None:
        """The desired value of ``key``'s ``prop`` was written and read back as
        ``value``: its ``observedDesired`` (None: unknown, none is shown); published at
        once when the twin has been."""
        with self._lock:
            if (key, prop) not in self._cycle:
                return  # not reported to the cloud
            if value is None:
                self._observed.pop((key, prop), None)
            else:
                self._observed[(key, prop)] = value
            if not self._docs.get(key) or not self._client.stats.connected:
                return
            payload = self._payload(key)
        ns, _, name = key.partition("/")
        self._client.publish(self._topics.twin(ns, name), payload, retain=True)

    def doc(self, key: str) -> dict[str, Any]:
        """The twin of device ``key`` as published (empty before its first reading)."""
        with self._lock:
            return json.loads(self._payload(key)) if self._docs.get(key) else {}

    def _payload(self, key: str) -> bytes:
        observed = self._observed
        return json_bytes({prop: {**entry, **({"observedDesired": {"value": observed[key, prop]}}
                                                 if (key, prop) in observed else {})}
                           for prop, entry in self._docs.get(key, {}).items()})

    def _publish_all(self) -> None:  # paho's thread, after a (re)connect
        with self._lock:
            docs = {k: self._payload(k) for k, doc in self._docs.items() if doc}
        for key, payload in docs.items():
            ns, _, name = key.partition("/")
            self._client.publish(self._topics.twin(ns, name), payload, retain=True)
