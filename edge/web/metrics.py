"""``/metrics``: the agent in the Prometheus text format 0.0.4 (DESIGN.md §9).

Nothing is counted for it: the poll path keeps its plain counters
(:class:`~edge.modbus.poller.DeviceStats`) and at each scrape :class:`AgentCollector`
turns one :meth:`~edge.agent.Agent.stats` snapshot into metric families, in a
registry of its own (:func:`registry_for`) beside the client library's process and
platform collectors. Per device (label ``device="namespace/name"``):

* ``edge_device_readings_total`` (counter): readings made (``readings``);
* ``edge_device_points_total`` (counter): good values in them (``points``);
* ``edge_device_poll_duration_seconds`` (histogram): poll-cycle durations
  (``latency_buckets``, ``latency_sum_s``; bounds ``LATENCY_BOUNDS_S``);
* ``edge_modbus_requests_total`` (counter): requests sent, retries included;
* ``edge_modbus_errors_total{kind}`` (counter): ``timeout`` (``timeouts``),
  ``exception`` (``exceptions``), ``frame`` (``frame_errors``), ``connection``
  (``connection_errors``) are failed requests; ``decode`` (``decode_errors``) counts
  properties whose registers could not be decoded;
* ``edge_device_up`` (gauge): 1 while ``online``, else 0 (``offline``, ``unknown``);
* ``edge_device_breaker_open`` (gauge): 1 while the breaker is ``open`` or
  ``half_open``, 0 while ``closed``.

Outbox: ``edge_outbox_rows``, ``edge_outbox_bytes``, ``edge_outbox_oldest_age_seconds``
(gauges), ``edge_outbox_dropped_total{reason}`` (counter). MQTT: ``edge_mqtt_connected``,
``edge_mqtt_inflight`` (gauges), ``edge_mqtt_reconnects_total``,
``edge_mqtt_published_total``, ``edge_mqtt_acked_total`` (counters). Configuration:
``edge_config_info{version}`` (gauge, 1; the content hash), ``edge_config_applied_version``
(gauge; the bundle version, 0 for the agent file alone), ``edge_config_events_total{kind}``
(counter; ``kind`` is the event's name, e.g. ``config_rolled_back``),
``edge_config_rollbacks_total`` (counter). Plugins (label ``plugin``, the name):
``edge_plugin_calls_total`` and ``edge_plugin_failures_total{kind}`` (counters; ``kind``
``error`` — an answer refused or no memory for the input —, ``trap``, ``timeout``),
``edge_plugin_fallbacks_total{outcome}`` (counter; batches ``passed`` on untouched or
``dropped`` because it failed or is quarantined), ``edge_plugin_quarantined`` (gauge, 1
while quarantined) and ``edge_plugin_call_seconds`` (summary; quantiles 0.5 and 0.99 over
its last 1024 calls). Network policy (one :meth:`~edge.policy.enforcer.Enforcer.status`
per scrape, which reads the kernel's counters): ``edge_policy_enforced`` (gauge, 1 while
the kernel holds the configured policy), ``edge_policy_state{state}`` (gauge, one series
per state ``off``, ``enforced``, ``unenforced``: 1 for the current one),
``edge_policy_rule_packets_total`` and ``edge_policy_rule_bytes_total`` (counters, only
while enforced; labels ``rule`` (the id), ``policy`` ("" for failsafe rules), ``section``,
``action``; at most 256 rules; zeroed when the policy is applied again, which
``edge_policy_updates_total`` counts), ``edge_policy_drops_total{verdict}`` (counter;
drop events read, ``drop`` and ``would-drop``), ``edge_policy_events_lost_total``
(counter; events the kernel could not hand over) and ``edge_policy_update_seconds``
(gauge; how long the last apply took). ``edge_agent_info{version}`` (gauge, 1).
Labels known in advance (error kinds, drop reasons, config event kinds, policy states
and verdicts) are always exported, at 0 until something happens, so that ``rate()``
sees the first one.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterator, Mapping
from typing import Any, Final

from aiohttp import web
from prometheus_client import (
    CollectorRegistry,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
    SummaryMetricFamily,
)
from prometheus_client.registry import Collector

from edge import __version__
from edge.agent import Agent
from edge.modbus.poller import LATENCY_BOUNDS_S

CONTENT_TYPE: Final = CONTENT_TYPE_PLAIN_0_0_4
"""``text/plain; version=0.0.4; charset=utf-8``: what :func:`generate_latest` writes.
(The library's ``CONTENT_TYPE_LATEST`` announces 1.0.0, UTF-8 names, since 0.23.)"""

ERROR_KINDS: Final = (
    ("timeout", "timeouts"),
    ("exception", "exceptions"),
    ("frame", "frame_errors"),
    ("connection", "connection_errors"),
    ("decode", "decode_errors"),
)
"""``kind`` label of ``edge_modbus_errors_total`` and the DeviceStats counter behind it."""

DROP_REASONS: Final = ("max_bytes", "ttl", "disk_full", "corrupt")
"""Why the outbox drops messages (:class:`~edge.store.outbox.OutboxStats`)."""

CONFIG_EVENTS: Final = ("config_applied", "config_committed", "config_rolled_back",
                        "config_refused")
"""Configuration event kinds (:mod:`edge.sync.controller`)."""

POLICY_STATES: Final = ("off", "enforced", "unenforced")
""":data:`edge.policy.enforcer.State`."""

VERDICTS: Final = ("drop", "would-drop")
"""Drop event verdicts (:data:`edge.policy.datapath.Verdict`)."""

_LE: Final = (*(repr(float(b)) for b in LATENCY_BOUNDS_S), "+Inf")
"""The ``le`` labels, spelt like the library's own histograms' (``0.005``, ``1.0``)."""

Stats = Mapping[str, Any]
""":meth:`~edge.agent.Agent.stats`, or one of its sections (plain JSON-able values)."""


def _counts(known: tuple[str, ...], seen: Mapping[str, int]) -> Iterator[tuple[str, int]]:
    """``known`` labels (0 unless seen), then any others seen, sorted."""
    for label in known:
        yield label, seen.get(label, 0)
    for label in sorted(seen.keys() - set(known)):
        yield label, seen[label]


def _devices(devices: Mapping[str, Stats]) -> Iterator[Metric]:
    readings = CounterMetricFamily(
        "edge_device_readings", "Readings made by the device's poller (one per poll cycle "
        "unless its breaker is open; values that failed are marked bad in them)",
        labels=["device"])
    points = CounterMetricFamily(
        "edge_device_points", "Good values in the readings: properties read and decoded",
        labels=["device"])
    duration = HistogramMetricFamily(
        "edge_device_poll_duration_seconds", "Duration of a poll cycle in seconds: all of "
        "its Modbus requests one after another, retries included", labels=["device"])
    requests = CounterMetricFamily(
        "edge_modbus_requests", "Modbus requests sent to the device (attempts, retries "
        "included)", labels=["device"])
    errors = CounterMetricFamily(
        "edge_modbus_errors", "Failed Modbus requests by kind (timeout; exception: an "
        "exception response; frame: a garbled, short or misaddressed answer; connection: "
        "no connection); kind=decode counts properties that could not be decoded",
        labels=["device", "kind"])
    up = GaugeMetricFamily(
        "edge_device_up", "1 while the device answers (online), 0 while offline or before "
        "its first answer", labels=["device"])
    breaker = GaugeMetricFamily(
        "edge_device_breaker_open", "1 while the device's circuit breaker is open or "
        "half-open (no polling but probes), 0 while closed", labels=["device"])
    for key, d in devices.items():
        labels = [key]
        readings.add_metric(labels, d["readings"])
        points.add_metric(labels, d["points"])
        cumulative, buckets = 0, []
        for le, n in zip(_LE, d["latency_buckets"], strict=True):
            cumulative += n
            buckets.append((le, float(cumulative)))
        duration.add_metric(labels, buckets, d["latency_sum_s"])
        requests.add_metric(labels, d["requests"])
        for kind, counter in ERROR_KINDS:
            errors.add_metric([key, kind], d[counter])
        up.add_metric(labels, 1 if d["state"] == "online" else 0)
        breaker.add_metric(labels, 0 if d["breaker"] == "closed" else 1)
    yield from (readings, points, duration, requests, errors, up, breaker)


def _outbox(ob: Stats) -> Iterator[Metric]:
    yield GaugeMetricFamily(
        "edge_outbox_rows", "Messages stored in the outbox until the broker acknowledges "
        "them", value=ob["rows"])
    yield GaugeMetricFamily(
        "edge_outbox_bytes", "Bytes of the messages stored in the outbox", value=ob["bytes"])
    yield GaugeMetricFamily(
        "edge_outbox_oldest_age_seconds", "Age in seconds of the oldest message in the "
        "outbox (0 when empty)", value=ob["oldest_age_s"])
    dropped = CounterMetricFamily(
        "edge_outbox_dropped", "Messages the outbox dropped, by reason (max_bytes: over its "
        "size bound; ttl: older than its TTL; disk_full; corrupt: lost with a damaged store "
        "file)", labels=["reason"])
    for reason, n in _counts(DROP_REASONS, ob["dropped"]):
        dropped.add_metric([reason], n)
    yield dropped


def _uplink(up: Stats) -> Iterator[Metric]:
    yield GaugeMetricFamily(
        "edge_mqtt_connected", "1 while connected to the MQTT broker, else 0",
        value=1 if up["connected"] else 0)
    yield CounterMetricFamily(
        "edge_mqtt_reconnects", "Connections to the MQTT broker after the first",
        value=up["reconnects"])
    yield CounterMetricFamily(
        "edge_mqtt_published", "Messages published to the MQTT broker (handed to the client)",
        value=up["published"])
    yield CounterMetricFamily(
        "edge_mqtt_acked", "Published messages the MQTT broker acknowledged (PUBACK at QoS 1)",
        value=up["acked"])
    yield GaugeMetricFamily(
        "edge_mqtt_inflight", "Messages published and not yet acknowledged",
        value=up["inflight"])


def _config(cfg: Stats) -> Iterator[Metric]:
    info = GaugeMetricFamily(
        "edge_config_info", "The running configuration: its content hash in the label, "
        "always 1", labels=["version"])
    info.add_metric([cfg["version"]], 1)
    yield info
    yield GaugeMetricFamily(
        "edge_config_applied_version", "Version of the applied configuration bundle (0: "
        "the agent file alone)", value=cfg["applied"])
    events = CounterMetricFamily(
        "edge_config_events", "Configuration events by kind (the event's name on the "
        "events topic)", labels=["kind"])
    for kind, n in _counts(CONFIG_EVENTS, cfg["events"]):
        events.add_metric([kind], n)
    yield events
    yield CounterMetricFamily(
        "edge_config_rollbacks", "Configurations rolled back (config_rolled_back events)",
        value=cfg["events"].get("config_rolled_back", 0))


def _plugins(plugins: Mapping[str, Stats]) -> Iterator[Metric]:
    calls = CounterMetricFamily("edge_plugin_calls", "Batches given to the plugin",
                                labels=["plugin"])
    failures = CounterMetricFamily("edge_plugin_failures", "Calls that failed, by kind",
                                   labels=["plugin", "kind"])
    fallbacks = CounterMetricFamily(
        "edge_plugin_fallbacks", "Batches passed on untouched or dropped because the plugin "
        "failed or is quarantined", labels=["plugin", "outcome"])
    quarantined = GaugeMetricFamily("edge_plugin_quarantined", "1 while quarantined",
                                    labels=["plugin"])
    seconds = SummaryMetricFamily("edge_plugin_call_seconds", "Time per call, seconds",
                                  labels=["plugin"])
    for name, p in plugins.items():
        if "calls" not in p:  # never loaded: nothing to count
            continue
        calls.add_metric([name], p["calls"])
        for kind, key in (("error", "errors"), ("trap", "traps"), ("timeout", "timeouts")):
            failures.add_metric([name, kind], p[key])
        for outcome in ("passed", "dropped"):
            fallbacks.add_metric([name, outcome], p[outcome])
        quarantined.add_metric([name], 1 if p["state"] == "quarantined" else 0)
        seconds.add_sample("edge_plugin_call_seconds", {"plugin": name, "quantile": "0.5"},
                           p["p50_us"] / 1e6)
        seconds.add_sample("edge_plugin_call_seconds", {"plugin": name, "quantile": "0.99"},
                           p["p99_us"] / 1e6)
        seconds.add_metric([name], count_value=p["calls"], sum_value=p["time_s"])
    yield from (calls, failures, fallbacks, quarantined, seconds)


_RESET: Final = ("; zeroed whenever the policy is applied again (a restart, a workload's "
                 "new cgroup: edge_policy_updates_total goes up), so read it with rate() "
                 "or increase(), which take resets in their stride")


def _policy(st: Stats) -> Iterator[Metric]:
    yield GaugeMetricFamily(
        "edge_policy_enforced", "1 while the kernel holds the configured network policy "
        "(state enforced), else 0: no policy configured (off) or not in the kernel "
        "(unenforced, see edge_policy_state)", value=1 if st["state"] == "enforced" else 0)
    state = GaugeMetricFamily(
        "edge_policy_state", "The network policy's state, one series per state, 1 for "
        "the current one: off (no policy configured), enforced (the kernel holds it), "
        "unenforced (configured but not in the kernel: not policed)", labels=["state"])
    for name in (*POLICY_STATES, *sorted({st["state"]} - set(POLICY_STATES))):
        state.add_metric([name], 1 if st["state"] == name else 0)
    yield state
    labels = ["rule", "policy", "section", "action"]
    packets = CounterMetricFamily(
        "edge_policy_rule_packets", "Packets the kernel matched to the rule (rule: its id, "
        "the position in match order, renumbered when the policy changes; policy: \"\" "
        "for failsafe rules)" + _RESET, labels=labels)
    size = CounterMetricFamily(
        "edge_policy_rule_bytes", "Bytes of the packets the kernel matched to the rule "
        "(labels as edge_policy_rule_packets_total)" + _RESET, labels=labels)
    for r in st["rules"] if st["state"] == "enforced" else ():  # else: not in the kernel
        values = [str(r["id"]), r["policy"] or "", r["section"], r["action"]]
        packets.add_metric(values, r["packets"])
        size.add_metric(values, r["bytes"])
    yield packets
    yield size
    yield CounterMetricFamily(
        "edge_policy_updates", "Times the policy was put into the kernel since the agent "
        "started (each one zeroes the rule counters)", value=st["updates"])
    drops = CounterMetricFamily(
        "edge_policy_drops", "Drop events read from the kernel since the agent started, by "
        "verdict: drop (dropped by an enforcing policy), would-drop (an audit policy's: "
        "reported, passed); one per dropped packet, one per flow for would-drop",
        labels=["verdict"])
    for verdict, n in _counts(VERDICTS, st["drops"]):
        drops.add_metric([verdict], n)
    yield drops
    yield CounterMetricFamily(
        "edge_policy_events_lost", "Drop events the kernel could not hand over (its ring "
        "was full); kept in the pinned datapath, so it goes on over agent restarts (a new "
        "build of the datapath starts it at 0)",
        value=st["datapath"].get("events_lost", 0))
    yield GaugeMetricFamily(
        "edge_policy_update_seconds", "How long the last apply of the policy into the "
        "kernel took, seconds (0 before the first)", value=st["update_ms"] / 1000)


class AgentCollector(Collector):
    """The metrics of one :meth:`~edge.agent.Agent.stats` snapshot per scrape (see the
    module docstring for names, types and labels); ``stats`` returns that snapshot,
    ``policy`` (if given) the network policy's status
    (:meth:`~edge.policy.enforcer.Enforcer.status`)."""

    def __init__(self, stats: Callable[[], Stats],
                 policy: Callable[[], Stats] | None = None) -> None:
        self._stats = stats
        self._policy = policy

    def collect(self) -> Iterator[Metric]:
        """Every metric family of one snapshot."""
        s = self._stats()
        yield from _devices(s["devices"])
        yield from _outbox(s["outbox"])
        yield from _uplink(s["uplink"])
        yield from _config(s["config"])
        yield from _plugins(s["plugins"])
        if self._policy is not None:
            yield from _policy(self._policy())
        agent = GaugeMetricFamily(
            "edge_agent_info", "The running agent: its version in the label, always 1",
            labels=["version"])
        agent.add_metric([__version__], 1)
        yield agent


def registry_for(agent: Agent) -> CollectorRegistry:
    """A registry of its own (not the library's global one) with ``agent``'s metrics,
    the process's (``process_cpu_seconds_total``, ``process_resident_memory_bytes``,
    open fds, start time; from /proc, Linux only) and ``python_info``. Collect it on
    the agent's event loop, as :func:`metrics_handler` does: ``stats()`` reads state
    that the loop changes."""
    registry = CollectorRegistry()
    # agent.policy looked up at each scrape: whichever enforcer the agent holds then
    registry.register(AgentCollector(agent.stats, lambda: agent.policy.status()))  # noqa: PLW0108
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    return registry


Handler = Callable[[web.Request], Awaitable[web.Response]]
"""An aiohttp request handler."""


def metrics_handler(registry: CollectorRegistry) -> Handler:
    """An aiohttp handler (for ``GET /metrics``) answering ``registry`` in the text
    format 0.0.4 (:data:`CONTENT_TYPE`). It renders on the event loop, blocking it for
    about 2.5 ms with 10 devices and 25 ms with 100 (2,500 samples, 170 kB)."""

    async def handle(_request: web.Request) -> web.Response:
        # aiohttp takes content_type and charset apart; the whole header as it is
        return web.Response(body=generate_latest(registry), headers={"Content-Type": CONTENT_TYPE})

    return handle
