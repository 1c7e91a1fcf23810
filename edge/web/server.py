"""The agent's web server (DESIGN.md §9): the status page, the REST API, the live
stream, ``/metrics``, ``/healthz`` and ``/readyz``, on aiohttp in the agent's event loop.

Listens on ``web.listen`` (default ``127.0.0.1:8080``; HTTPS with ``web.tls``). A port
that cannot be bound (in use, no permission) is logged, reported as a ``web_error``
event and tried again every BIND_RETRY_S; the agent goes on polling and publishing.

* ``/`` and ``/static/…``: the page, every asset served from the agent (nothing from
  the internet);
* ``/metrics``: :mod:`edge.web.metrics` (Prometheus text format);
* ``/api/v1/…``: :mod:`edge.web.api`; ``/api/v1/openapi.json`` its OpenAPI 3 document;
  an unknown path or method under ``/api/`` is answered in JSON too (``{"error"}``);
* ``/api/v1/stream``: Server-Sent Events (text/event-stream), one ``overview`` event a
  second, an ``events`` event with what happened since, and with ``?device=ns/name``
  a ``reading`` event when that device has a new reading (at most one a second);
* ``/healthz``: 200 while the process serves; ``/readyz``: 200 when the store is
  open and the uplink is connected or was so less than UPLINK_GRACE_S ago (or the
  agent started less than that ago), else 503 with the reasons.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import ssl
from collections.abc import AsyncIterator
from importlib import resources
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from aiohttp import ClientConnectionResetError, web

from edge.config.runtime import RuntimeConfig, WebSettings
from edge.store.history import History
from edge.web.api import Api
from edge.web.auth import WebAuth
from edge.web.metrics import metrics_handler, registry_for
from edge.web.openapi import openapi
from edge.web.recent import Recent

if TYPE_CHECKING:
    from aiohttp.typedefs import Handler

    from edge.agent import Agent

log = logging.getLogger(__name__)

BIND_RETRY_S = 30.0
UPLINK_GRACE_S = 30.0
STREAM_PERIOD_S = 1.0
MAX_STREAMS = 16
"""Live streams open at once, at most (each is a browser tab)."""
KEEPALIVE_S = 15.0
"""An idle connection is closed after this (aiohttp's default is an hour)."""
SHUTDOWN_S = 1.0
"""How long a stop waits for requests under way (live streams are cut)."""
BACKLOG = 64
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; frame-ancestors 'none'",
    "X-Frame-Options": "DENY", "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}
STATIC = resources.files("edge.web") / "static"
CONTENT_TYPES = {".html": "text/html", ".js": "text/javascript", ".css": "text/css",
                 ".svg": "image/svg+xml"}


def _ssl_context(settings: WebSettings) -> ssl.SSLContext | None:
    """The TLS context of ``web.tls``; a key that wants a passphrase fails at once
    (ssl.SSLError) instead of prompting on the agent's terminal."""
    if settings.tls is None:
        return None
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(*settings.tls, password=lambda: b"")
    return ctx


def _own_host(host: str, listen_host: str) -> bool:
    """Whether ``host`` (a Host header's name, no port) names this gateway."""
    if host in ("localhost", listen_host.lower()):
        return True
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _api_error(request: web.Request, e: web.HTTPException) -> web.Response | None:
    """The JSON ``{"error"}`` answer for aiohttp's own plain-text refusal ``e`` of a
    path under ``/api/`` (no such path, a method it does not take), like every other
    answer of the API; None when ``e`` is already JSON or the path is not the API's."""
    if not request.path.startswith("/api/") or e.content_type == "application/json":
        return None
    path = request.path[:80]
    if isinstance(e, web.HTTPMethodNotAllowed):
        message = (f"{request.method[:10]} is not allowed on {path}; allowed: "
                   f"{', '.join(sorted(e.allowed_methods))}")
    elif isinstance(e, web.HTTPNotFound):
        message = f"no such path {path} (the API is described at /api/v1/openapi.json)"
    else:
        message = e.reason
    headers = {"Allow": e.headers["Allow"]} if "Allow" in e.headers else None
    return web.json_response({"error": message}, status=e.status, headers=headers)


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
        self.overview: dict[str, Any] | None = None
        self._streams = 0

    def app(self) -> web.Application:
        """The aiohttp application (also what the tests serve)."""
        app = web.Application(middlewares=[self._guard, self.auth.middleware],
                              client_max_size=64 << 10)
        app.cleanup_ctx.append(self._ticking)
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
        """Serve until cancelled; a port that cannot be bound, or a certificate that
        cannot be loaded, is reported and tried again later."""
        runner = web.AppRunner(self.app(), access_log=None, handle_signals=False,
                               keepalive_timeout=KEEPALIVE_S, shutdown_timeout=SHUTDOWN_S)
        await runner.setup()
        scheme = "https" if self.settings.tls else "http"
        try:
            while True:
                try:
                    site = web.TCPSite(runner, self.settings.host, self.settings.port,
                                       ssl_context=_ssl_context(self.settings),
                                       backlog=BACKLOG)
                    await site.start()
                except (OSError, ssl.SSLError) as e:
                    what = ("cannot load web.tls (is the key protected by a passphrase?)"
                            if isinstance(e, ssl.SSLError) else
                            f"cannot listen on {self.settings.host}:{self.settings.port}")
                    log.error("the web page %s: %s; trying again in %.0f s", what,
                              getattr(e, "strerror", None) or e, BIND_RETRY_S)
                    self.agent.uplink.publish_event("web_error", error=f"{what}: {e}")
                    await asyncio.sleep(BIND_RETRY_S)
                    continue
                log.info("web page on %s://%s:%d/", scheme, self.settings.host,
                         self.settings.port)
                await asyncio.Event().wait()
        finally:
            await runner.cleanup()

    async def _ticking(self, app: web.Application) -> AsyncIterator[None]:
        """The app's cleanup context: :meth:`_tick` runs while the app serves."""
        ticker = asyncio.create_task(self._tick(), name="web-overview")
        yield
        ticker.cancel()
        await asyncio.gather(ticker, return_exceptions=True)

    async def _tick(self) -> None:
        """The overview, once a second for every live stream (one computation, however
        many streams; the CPU figure is the agent's over that second); what is kept of
        devices no longer configured is dropped."""
        cfg: RuntimeConfig | None = None
        keep: dict[str, frozenset[str]] = {}
        while True:
            self.overview = self.api.overview_body()
            if self.agent.cfg is not cfg:  # a new configuration
                cfg = self.agent.cfg
                keep = {d.key: frozenset(p.name for p in d.properties) for d in cfg.devices}
            self.recent.forget(keep)  # also readings a stopping poller made since
            await asyncio.sleep(STREAM_PERIOD_S)

    # -- handlers -------------------------------------------------------------------

    @web.middleware
    async def _guard(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """Refuse a Host that is not this gateway's (DNS rebinding: a web site that
        resolves its own name to 127.0.0.1 must not read the page through the
        operator's browser): an IP address, ``localhost``, or the ``web.listen``
        host. Every answer gets the security headers."""
        try:
            host = urlsplit("//" + (request.host or "")).hostname or ""
        except ValueError:
            host = ""
        if not _own_host(host, self.settings.host):
            return web.json_response({"error": f"Host {host[:60]!r} is not this gateway"},
                                     status=421)
        try:
            resp = await handler(request)
        except web.HTTPException as e:
            if e.status < 400:
                raise
            resp = _api_error(request, e) or e
            if resp is e:
                e.headers.update(SECURITY_HEADERS)
                raise
        resp.headers.update(SECURITY_HEADERS)
        return resp

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
        if self._streams >= MAX_STREAMS:
            raise web.HTTPServiceUnavailable(
                text=json.dumps({"error": f"{MAX_STREAMS} live streams are open already"}),
                content_type="application/json", headers={"Retry-After": "10"})
        key = request.query.get("device")
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                           "Cache-Control": "no-cache"})
        self._streams += 1
        try:
            await resp.prepare(request)
            seen_events = self._event_count()
            last_seq = None
            # ends when the client goes, or its login does (logout, expiry)
            while self.auth.still_allowed(request):
                await self._send(resp, "overview", self.overview or self.api.overview_body())
                count = self._event_count()
                if count > seen_events:
                    events = list(self.agent.uplink.forwarder.recent_events)
                    await self._send(resp, "events",
                                     events[-min(count - seen_events, len(events)):])
                    seen_events = count
                if key is not None:
                    seq = self.recent.seq(key)
                    latest = self.recent.latest(key) if seq != last_seq else None
                    if latest is not None:
                        last_seq = seq
                        await self._send(resp, "reading", latest)
                await asyncio.sleep(STREAM_PERIOD_S)
        except (ConnectionError, ClientConnectionResetError):
            pass  # the page went away
        finally:
            self._streams -= 1
        return resp

    def _event_count(self) -> int:
        return self.agent.uplink.forwarder.events_total

    @staticmethod
    async def _send(resp: web.StreamResponse, event: str, data: Any) -> None:
        await resp.write(f"event: {event}\ndata: {json.dumps(data, default=str)}\n\n".encode())
