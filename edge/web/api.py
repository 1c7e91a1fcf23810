"""The REST API under ``/api/v1`` (DESIGN.md §9), described by ``/api/v1/openapi.json``
(:mod:`edge.web.openapi`, kept equal to these handlers by the tests).

JSON everywhere; times are ms since the Unix epoch (UTC) unless a name says ``_s``.
Errors are ``{"error": message}`` with 400 (a bad parameter, named), 404 (no such
device or version) or 409 (a rollback that cannot be asked for). Nothing here
returns a secret: users' password hashes, tokens and the uplink password never leave
the agent.

Read: ``overview``, ``devices``, ``devices/{namespace}/{name}`` (definition, latest
reading, twin), ``devices/{namespace}/{name}/trend`` (``?since=`` ms),
``readings`` (the latest of every device), ``events`` (``?limit=``, newest last),
``stats`` (:meth:`edge.agent.Agent.stats`), ``plugins`` (each plugin's counters, in
the order they run, and why the plugin directory's last change was not taken),
``policy`` (:meth:`edge.policy.enforcer.Enforcer.status`: the network policy's state,
its rules in match order with the kernel's counters, the recent drops, newest last),
``config`` and ``config/versions``,
``config/versions/{version}``, ``config/diff?old=&new=``. Version 0 is the agent
file alone: its content is not kept (``{"version": 0}``), and its ``devices`` is the
running configuration's while it runs, else null. Change (login or token,
:mod:`edge.web.auth`): ``POST config/rollback`` ``{"version": int | null}`` asks the
running agent to roll back, as ``edge rollback`` does (202; it happens within a second,
or after an open health window).
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psutil
from aiohttp import web

from edge import __version__
from edge.config.model import DeviceSpec, SerialEndpoint
from edge.store.history import History
from edge.web.auth import USER
from edge.web.recent import Recent

if TYPE_CHECKING:
    from edge.agent import Agent

log = logging.getLogger(__name__)

EVENTS_MAX = 200
INT64_MAX = 2**63 - 1
"""The largest integer parameter taken (SQLite's INTEGER)."""
THERMAL = Path("/sys/class/thermal")
VERSION_0_NOTE = ("version 0 is the agent file alone: its content is not kept (content is "
                  "only the version number); going back to it reads the file as it is then")


def _json(body: object, status: int = 200) -> web.Response:
    return web.json_response(body, status=status, dumps=lambda o: json.dumps(o, default=str))


def _error(status: int, message: str) -> web.HTTPException:
    classes: dict[int, type[web.HTTPException]] = {
        400: web.HTTPBadRequest, 404: web.HTTPNotFound, 409: web.HTTPConflict}
    return classes[status](text=json.dumps({"error": message}), content_type="application/json")


def _int_param(request: web.Request, name: str, default: int | None = None,
               low: int | None = None) -> int | None:
    text = request.query.get(name)
    if text is None:
        return default
    try:
        value = int(text)
    except ValueError:
        raise _error(400, f"{name} must be an integer, got {text[:40]!r}") from None
    if low is not None and value < low:
        raise _error(400, f"{name} must be at least {low}, got {value}")
    if abs(value) > INT64_MAX:
        raise _error(400, f"{name} must be at most {INT64_MAX}")
    return value


def _endpoint(d: DeviceSpec) -> str:
    e = d.endpoint
    return e.port if isinstance(e, SerialEndpoint) else e.key


def _temperature_c() -> float | None:
    """The SoC temperature (the first thermal zone), when the kernel exposes one."""
    try:
        return int((THERMAL / "thermal_zone0" / "temp").read_text()) / 1000
    except (OSError, ValueError):
        return None


class Api:
    """The ``/api/v1`` handlers of one agent."""

    def __init__(self, agent: Agent, history: History, recent: Recent) -> None:
        self.agent = agent
        self.history = history
        self.recent = recent
        self._process = psutil.Process()
        self._process.cpu_percent()  # the first call starts the measurement

    def routes(self) -> list[web.RouteDef]:
        """The routes, under ``/api/v1``."""
        p = "/api/v1"
        return [
            web.get(f"{p}/overview", self.overview),
            web.get(f"{p}/devices", self.devices),
            web.get(f"{p}/devices/{{namespace}}/{{name}}", self.device),
            web.get(f"{p}/devices/{{namespace}}/{{name}}/trend", self.trend),
            web.get(f"{p}/readings", self.readings),
            web.get(f"{p}/events", self.events),
            web.get(f"{p}/stats", self.stats),
            web.get(f"{p}/plugins", self.plugins),
            web.get(f"{p}/policy", self.policy),
            web.get(f"{p}/config", self.config),
            web.get(f"{p}/config/versions", self.versions),
            web.get(f"{p}/config/versions/{{version}}", self.version),
            web.get(f"{p}/config/diff", self.diff),
            web.post(f"{p}/config/rollback", self.rollback),
        ]

    # -- read ---------------------------------------------------------------------

    def overview_body(self) -> dict[str, Any]:
        """What the overview shows (also sent on the live stream each second)."""
        agent, stats = self.agent, self.agent.stats()
        mem = self._process.memory_info()
        disk = psutil.disk_usage(str(agent.cfg.store.path.parent))
        states = agent.device_states()
        return {
            "agent": {"version": __version__, "node": agent.cfg.node, "pid": os.getpid(),
                      "started": agent.started_ms,
                      "uptime_s": round(time.time() - agent.started_ms / 1000, 1),
                      "release": os.environ.get("EDGE_RELEASE") or None},
            "config": {"version": agent.cfg.version, "applied": agent.cfg.bundle_version,
                       **agent.uplink.config_state()},
            "uplink": {**stats["uplink"], "broker": f"{agent.cfg.broker.host}:"
                       f"{agent.cfg.broker.port}", "down_for_s": round(agent.uplink_down_for(), 1)},
            "outbox": {k: stats["outbox"][k] for k in ("rows", "bytes", "oldest_age_s", "dropped")},
            "devices": {"total": len(states),
                        "online": sum(1 for s in states.values() if s == "online"),
                        "offline": sum(1 for s in states.values() if s == "offline")},
            "host": {"cpu_percent": self._process.cpu_percent(), "rss_bytes": mem.rss,
                     "memory_percent": round(psutil.virtual_memory().percent, 1),
                     "disk_free_bytes": disk.free, "disk_total_bytes": disk.total,
                     "temperature_c": _temperature_c()},
        }

    async def overview(self, request: web.Request) -> web.Response:
        return _json(self.overview_body())

    def _device_summary(self, d: DeviceSpec, stats: dict[str, Any]) -> dict[str, Any]:
        s = stats.get(d.key, {})
        return {
            "key": d.key, "namespace": d.namespace, "name": d.name, "model": d.model,
            "endpoint": _endpoint(d), "unit_id": d.unit_id,
            "profile": {"name": d.profile.name, "firmware": d.profile.firmware}
            if d.profile else None,
            "state": s.get("state", "unknown"),
            "last_poll": s.get("last_poll_ms"), "last_latency_ms": s.get("last_latency_ms"),
            "last_error": s.get("last_error", ""), "breaker": s.get("breaker", "closed"),
            "readings": s.get("readings", 0), "requests": s.get("requests", 0),
            "errors": {k: s.get(k, 0) for k in ("timeouts", "exceptions", "frame_errors",
                                                 "connection_errors", "decode_errors")},
        }

    async def devices(self, request: web.Request) -> web.Response:
        stats = self.agent.stats()["devices"]
        return _json([self._device_summary(d, stats) for d in self.agent.cfg.devices])

    def _find(self, request: web.Request) -> DeviceSpec:
        key = f"{request.match_info['namespace']}/{request.match_info['name']}"
        device = next((d for d in self.agent.cfg.devices if d.key == key), None)
        if device is None:
            raise _error(404, f"no device {key!r} on this gateway")
        return device

    async def device(self, request: web.Request) -> web.Response:
        d = self._find(request)
        body = self._device_summary(d, self.agent.stats()["devices"])
        body["properties"] = [
            {"name": p.name, "type": str(p.value_type), "access": str(p.access_mode),
             "unit": p.unit, "minimum": p.minimum, "maximum": p.maximum, "desired": p.desired,
             "report_to_cloud": p.report_to_cloud, "collect_cycle_ms": p.collect_cycle_ms,
             "table": str(p.visitor.table), "address": p.visitor.offset}
            for p in d.properties]
        body["methods"] = [{"name": m.name, "properties": list(m.property_names)}
                           for m in d.methods]
        body["latest"] = self.recent.latest(d.key)
        body["twin"] = self.agent.twins.doc(d.key)
        return _json(body)

    async def trend(self, request: web.Request) -> web.Response:
        d = self._find(request)
        since = _int_param(request, "since", 0, low=0) or 0
        return _json(self.recent.trend(d.key, since))

    async def readings(self, request: web.Request) -> web.Response:
        return _json({d.key: self.recent.latest(d.key) for d in self.agent.cfg.devices})

    async def events(self, request: web.Request) -> web.Response:
        limit = _int_param(request, "limit", EVENTS_MAX, low=1) or EVENTS_MAX
        recent = list(self.agent.uplink.forwarder.recent_events)
        return _json(recent[-limit:])

    async def stats(self, request: web.Request) -> web.Response:
        return _json(self.agent.stats())

    async def plugins(self, request: web.Request) -> web.Response:
        host = self.agent.plugins
        stats = host.stats() if host is not None else {}
        return _json({"plugins": [{"name": name, **s} for name, s in stats.items()],
                      "problems": host.problems if host is not None else []})

    async def policy(self, request: web.Request) -> web.Response:
        # the kernel's counters are read here, once per request (256 map lookups)
        return _json(self.agent.policy.status())

    async def config(self, request: web.Request) -> web.Response:
        cfg = self.agent.cfg
        return _json({"version": cfg.version, "applied": cfg.bundle_version,
                      "files": list(cfg.files), **self.agent.uplink.config_state()})

    def _devices_of(self, version: int, content: Mapping[str, Any]) -> int | None:
        """How many devices ``version`` has: a bundle's, or for version 0 (the agent
        file, whose content is not kept) the running configuration's when it is the
        one running, else None (it is known when the file is read again)."""
        if version != 0:
            return len(content.get("devices", []))
        return len(self.agent.cfg.devices) if self.agent.cfg.bundle_version == 0 else None

    async def versions(self, request: web.Request) -> web.Response:
        return _json([{"version": v.version, "state": v.state, "reason": v.reason,
                       "received": v.received_ms, "decided": v.decided_ms,
                       "devices": self._devices_of(v.version, v.content)}
                      for v in self.history.versions()])

    async def version(self, request: web.Request) -> web.Response:
        text = request.match_info["version"]
        if not (text.isascii() and text.isdigit()) or int(text) > INT64_MAX:
            raise _error(400, f"version must be an integer from 0 to {INT64_MAX}, "
                              f"got {text[:40]!r}")
        kept = self.history.get(int(text))
        if kept is None:
            raise _error(404, f"version {text} is not in the history")
        return _json({"version": kept.version, "state": kept.state, "content": kept.content,
                      "devices": self._devices_of(kept.version, kept.content),
                      "note": VERSION_0_NOTE if kept.version == 0 else None})

    async def diff(self, request: web.Request) -> web.Response:
        old, new = _int_param(request, "old"), _int_param(request, "new")
        if old is None or new is None:
            raise _error(400, "give both old and new (version numbers)")
        try:
            return _json({"old": old, "new": new, "lines": self.history.diff(old, new)})
        except ValueError as e:
            raise _error(404, str(e)) from e

    # -- change -------------------------------------------------------------------

    async def rollback(self, request: web.Request) -> web.Response:
        try:
            body = await request.json() if request.can_read_body else {}
        except ValueError:
            raise _error(400, "the body must be JSON: {\"version\": N} or {}") from None
        if not isinstance(body, dict):
            raise _error(400, "the body must be a JSON object: {\"version\": N} or {}")
        unknown = sorted(set(body) - {"version"})
        if unknown:
            raise _error(400, f"unknown key {unknown[0][:40]!r}; accepted: version")
        version = body.get("version")
        if version is not None and (isinstance(version, bool) or not isinstance(version, int)
                                    or not 0 <= version <= INT64_MAX):
            raise _error(400, f"version must be an integer from 0 to {INT64_MAX}, or null")
        target = "the version before" if version is None else f"version {version}"
        refusal = self._rollback_refusal(version)
        if refusal is not None:
            status, why = refusal
            log.warning("rollback to %s asked for by %s through the web API refused (%d): %s",
                        target, request.get(USER), status, why)
            raise _error(status, why)
        log.warning("rollback to %s asked for by %s through the web API", target,
                    request.get(USER))
        self.history.request_rollback(version)
        return _json({"requested": version, "by": request.get(USER)}, status=202)

    def _rollback_refusal(self, version: int | None) -> tuple[int, str] | None:
        """Why a rollback to ``version`` (None: the one before) cannot be asked for:
        404 or 409 and the reason; None when it can."""
        if version is not None:
            kept = self.history.get(version)
            if kept is None:
                return 404, f"version {version} is not in the history"
            if kept.state == "rolled_back":
                return 409, f"version {version} was rolled back ({kept.reason})"
        elif self.history.previous() is None:
            return 409, "there is no earlier version to roll back to"
        if version is not None and version == self.agent.cfg.bundle_version:
            return 409, f"version {version} is the running one"
        return None
