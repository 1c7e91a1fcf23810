"""The agent's web server (DESIGN.md §9): the status page, the REST API, the live
stream, ``/metrics``, ``/healthz`` and ``/readyz``, on aiohttp in the agent's event loop.

Listens on ``web.listen`` (default ``127.0.0.1:8080``; HTTPS with ``web.tls``). A port
that cannot be bound (in use, no permission) is logged, reported as a ``web_error``
event and tried again every BIND_RETRY_S; the agent goes on polling and publishing.

* ``/`` and ``/static/…``: the page, every asset served from the agent (nothing from
  the internet);
* ``/metrics``: :mod:`edge.web.metrics` (Prometheus text format);
* ``/api/v1/…``: :mod:`edge.web.api`; ``/api/v1/openapi.json`` its OpenAPI 3 document;
* ``/api/v1/stream``: Server-Sent Events (text/event-stream), one ``overview`` event a
  second, an ``events`` event with what happened since, and with ``?device=ns/name``
  a ``reading`` event when that device has a new reading (at most one a second);
* ``/healthz``: 200 while the process serves; ``/readyz``: 200 when the store is
  open and the uplink is connected or was so less than UPLINK_GRACE_S ago (or the
  agent started less than that ago), else 503 with the reasons.
"""

from __future__ import annotations

import asyncio
import json
import logging
import ssl
from importlib import resources
from typing import TYPE_CHECKING, Any

from aiohttp import web

from edge.config.runtime import WebSettings
from edge.store.history import History
from edge.web.api import Api
from edge.web.auth import WebAuth
from edge.web.metrics import metrics_handler, registry_for
from edge.web.openapi import openapi
from edge.web.recent import Recent

if TYPE_CHECKING:
    from edge.agent import Agent

log = logging.getLogger(__name__)

BIND_RETRY_S = 30.0
UPLINK_GRACE_S = 30.0
STREAM_PERIOD_S = 1.0
STATIC = resources.files("edge.web") / "static"
CONTENT_TYPES = {".html": "text/html", ".js": "text/javascript", ".css": "text/css",
                 ".svg": "image/svg+xml"}


def _ssl_context(settings: WebSettings) -> ssl.SSLContext | None:
    if settings.tls is None:
        return None
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(*settings.tls)
    return ctx


class WebServer:
    """The web server of one agent; :meth:`run` is one of the agent's services."""

    def __init__(self, agent: Agent, history: History, settings: WebSettings) -> None:
        self.agent = agent
        self.settings = settings
        self.recent = Recent()
        agent.reading_hooks.append(self.recent.add)
        self.api = Api(agent, history, self.recent)
        self.auth = WebAuth(dict(settings.users), settings.tokens, view=settings.view,
                            secure_cookie=settings.tls is not None)
        self._metrics = metrics_handler(registry_for(agent))

    def app(self) -> web.Application:
        """The aiohttp application (also what the tests serve)."""
        app = web.Application(middlewares=[self.auth.middleware], client_max_size=64 << 10)
        app.add_routes(self.auth.routes())
        app.add_routes([
            web.get("/", self.index),
            web.get("/static/{name}", self.static),
            web.get("/healthz", self.healthz),
            web.get("/readyz", self.readyz),
            web.get("/metrics", self._metrics),
            web.get("/api/v1/openapi.json", self.openapi),
            web.get("/api/v1/stream", self.stream),
            *self.api.routes(),
        ])
        return app

    async def run(self) -> None:
        """Serve until cancelled; a port that cannot be bound is tried again later."""
        runner = web.AppRunner(self.app(), access_log=None, handle_signals=False)
        await runner.setup()
        scheme = "https" if self.settings.tls else "http"
        try:
            while True:
                site = web.TCPSite(runner, self.settings.host, self.settings.port,
                                   ssl_context=_ssl_context(self.settings))
                try:
                    await site.start()
                except OSError as e:
                    log.error("the web page cannot listen on %s:%d: %s; trying again in "
                              "%.0f s", self.settings.host, self.settings.port, e.strerror,
                              BIND_RETRY_S)
                    self.agent.uplink.publish_event("web_error", error=str(e))
                    await asyncio.sleep(BIND_RETRY_S)
                    continue
                log.info("web page on %s://%s:%d/", scheme, self.settings.host,
                         self.settings.port)
                await asyncio.Event().wait()
        finally:
            await runner.cleanup()

    # -- handlers -------------------------------------------------------------------

    async def index(self, request: web.Request) -> web.Response:
        return await self._asset("index.html")

    async def static(self, request: web.Request) -> web.Response:
        return await self._asset(request.match_info["name"])

    async def _asset(self, name: str) -> web.Response:
        suffix = name[name.rfind("."):] if "." in name else ""
        item = STATIC / name
        if "/" in name or name.startswith(".") or suffix not in CONTENT_TYPES \
                or not item.is_file():
            raise web.HTTPNotFound(text="no such file")
        return web.Response(body=item.read_bytes(), content_type=CONTENT_TYPES[suffix],
                            headers={"Cache-Control": "no-cache",
                                     "X-Content-Type-Options": "nosniff"})

    async def healthz(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "alive"})

    def not_ready(self) -> list[str]:
        """Why the agent is not ready (empty when it is)."""
        why = []
        if self.agent.outbox.closed:
            why.append("the store is closed")
        down = self.agent.uplink_down_for()
        if down > UPLINK_GRACE_S:
            why.append(f"the uplink has not been connected for {down:.0f} s")
        return why

    async def readyz(self, request: web.Request) -> web.Response:
        why = self.not_ready()
        return web.json_response({"ready": not why, "reasons": why},
                                 status=503 if why else 200)

    async def openapi(self, request: web.Request) -> web.Response:
        return web.json_response(openapi())

    async def stream(self, request: web.Request) -> web.StreamResponse:
        key = request.query.get("device")
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                           "Cache-Control": "no-cache"})
        await resp.prepare(request)
        seen_events = self._event_count()
        last_seq = None
        while True:
            await self._send(resp, "overview", self.api.overview_body())
            events = list(self.agent.uplink.forwarder.recent_events)
            count = self._event_count()
            if count > seen_events:
                await self._send(resp, "events", events[-min(count - seen_events, len(events)):])
                seen_events = count
            if key is not None:
                latest = self.recent.latest(key)
                if latest is not None and latest["seq"] != last_seq:
                    last_seq = latest["seq"]
                    await self._send(resp, "reading", latest)
            await asyncio.sleep(STREAM_PERIOD_S)

    def _event_count(self) -> int:
        return self.agent.uplink.forwarder.events_total

    @staticmethod
    async def _send(resp: web.StreamResponse, event: str, data: Any) -> None:
        await resp.write(f"event: {event}\ndata: {json.dumps(data, default=str)}\n\n".encode())
