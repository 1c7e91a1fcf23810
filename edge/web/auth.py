"""Who may look at and who may change the gateway through the local web page and the
REST API (DESIGN.md §9).

* Viewing (``GET``, ``HEAD``, ``OPTIONS``): open to loopback clients (127.0.0.0/8,
  ::1) when ``view`` is ``local``; from any other address, or always when ``view`` is
  ``login``, a session or a bearer token is needed.
* Changing anything (``POST``, ``PUT``, ``PATCH``, ``DELETE``): a bearer token
  (``Authorization: Bearer <token>``, RFC 6750), or a session cookie together with the
  session's CSRF token in the ``X-CSRF-Token`` header (the synchronizer token pattern
  of the OWASP CSRF Prevention Cheat Sheet).
* Always open: :data:`OPEN_PATHS` (health checks, the login itself, static assets).

The client's address is the TCP peer's, never a header such as ``X-Forwarded-For``.
Passwords are kept as scrypt hashes in PHC string format (:func:`hash_password`), API
tokens as their SHA-256 (:func:`new_token`; a token is 256 random bits, so a fast hash
is enough). Sessions live in the agent's memory only (:class:`Sessions`): a restart
logs everyone out. Logins are rate-limited per client address and over all clients
(:class:`LoginLimiter`). No secret (password, password hash, token, session id, CSRF
token) is written to a log or put in an error message; the CSRF token is only sent to
the holder of its session, in the answers of ``POST /api/v1/login`` and
``GET /api/v1/session``. A failed login is logged with the client's address and
whether the user exists, never the name (it may be a password typed in the wrong field).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import hmac
import ipaddress
import logging
import math
import re
import secrets
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final, Literal, NamedTuple

from aiohttp import hdrs, web
from aiohttp.typedefs import Handler

log = logging.getLogger(__name__)

SCRYPT_LN: Final = 15
"""log2 of scrypt's CPU/memory cost N: N = 2^15 needs 128·N·r bytes = 32 MiB with r = 8."""
SCRYPT_R: Final = 8
"""scrypt's block size (r × 128 bytes)."""
SCRYPT_P: Final = 3
"""scrypt's parallelization; N = 2^15, r = 8, p = 3 is the 32 MiB line of the OWASP
Password Storage Cheat Sheet (as strong as its minimum N = 2^17, r = 8, p = 1, which
needs 128 MiB); about 0.3 s on one core of a small x86 machine."""
SALT_BYTES: Final = 16
HASH_BYTES: Final = 32
MAX_SCRYPT_MEMORY: Final = 128 * 1024 * 1024
"""The most memory a stored hash may ask for (bytes): N = 2^17, r = 8 fits, 2^18 not."""
MAX_SCRYPT_P: Final = 16
TOKEN_PREFIX: Final = "edge_"  # noqa: S105 (a prefix, not a password)
SESSION_COOKIE: Final = "edge_session"
CSRF_HEADER: Final = "X-CSRF-Token"
LOGIN_PATH: Final = "/api/v1/login"
LOGOUT_PATH: Final = "/api/v1/logout"
SESSION_PATH: Final = "/api/v1/session"
OPEN_PATHS: Final = ("GET /", "GET /healthz", "GET /readyz", f"POST {LOGIN_PATH}",
                     "GET /static/")
"""Paths open without a login, each ``[METHOD ]PATH``: without a method any method,
``GET`` also allows ``HEAD``; a path ending in ``/`` stands for every path under it
(but ``/`` alone is the root page only)."""
SAFE_METHODS: Final = frozenset({hdrs.METH_GET, hdrs.METH_HEAD, hdrs.METH_OPTIONS})
MAX_USER_CHARS: Final = 256
MAX_PASSWORD_CHARS: Final = 1024

USER: Final = web.RequestKey[str | None]("user")
"""``request[USER]``: who the request is authenticated as (a user name, or ``token
<first 8 hex digits of its hash>`` for a bearer token), None when nobody."""

View = Literal["local", "login"]
Clock = Callable[[], float]

_B64 = re.compile(r"[A-Za-z0-9+/]+")
_DECIMAL = re.compile(r"0|[1-9][0-9]{0,9}")
_PHC_ID = re.compile(r"[a-z0-9-]{1,32}")
_TOKEN_HASH = re.compile(r"sha256:[0-9a-f]{64}")


class _Scrypt(NamedTuple):
    """A parsed scrypt PHC string."""

    ln: int
    r: int
    p: int
    salt: bytes
    hash: bytes


def _utf8(text: str) -> bytes:
    # surrogatepass: JSON may carry lone surrogates; they hash like any other text.
    return text.encode("utf-8", "surrogatepass")


def _b64encode(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii").rstrip("=")


def _b64decode(text: str) -> bytes | None:
    """The bytes of canonical unpadded standard base64 (the PHC "B64"), else None."""
    if not _B64.fullmatch(text) or len(text) % 4 == 1:
        return None
    try:
        raw = base64.b64decode(text + "=" * (-len(text) % 4), validate=True)
    except binascii.Error:
        return None
    return raw if _b64encode(raw) == text else None


def _scrypt_memory(ln: int, r: int, p: int) -> int:
    """The bytes OpenSSL's scrypt allocates, which ``maxmem`` must allow:
    128·r·(N + 2) for V and 128·r·p for B; 32 MiB + 5 KiB for N = 2^15, r = 8, p = 3."""
    return 128 * r * ((1 << ln) + 2 + p)


def _scrypt(password: str, ln: int, r: int, p: int, salt: bytes, dklen: int) -> bytes:
    return hashlib.scrypt(_utf8(password), salt=salt, n=1 << ln, r=r, p=p,
                          maxmem=_scrypt_memory(ln, r, p), dklen=dklen)


def _parse_params(text: str) -> tuple[int, int, int]:
    """``ln``, ``r`` and ``p`` of ``ln=…,r=…,p=…``.

    Raises:
        ValueError: why they are not usable.
    """
    pairs = [part.partition("=") for part in text.split(",")]
    if [(k, sep) for k, sep, _ in pairs] != [("ln", "="), ("r", "="), ("p", "=")]:
        raise ValueError("the parameters are not ln=…,r=…,p=…")
    for k, _, v in pairs:
        if not _DECIMAL.fullmatch(v):
            raise ValueError(f"{k} is not a decimal number")
    ln, r, p = (int(v) for _, _, v in pairs)
    if not 1 <= ln <= 31 or r < 1 or not 1 <= p <= MAX_SCRYPT_P:
        raise ValueError(f"ln={ln}, r={r}, p={p} are out of range "
                         f"(ln 1 to 31, r at least 1, p 1 to {MAX_SCRYPT_P})")
    memory = _scrypt_memory(ln, r, p)
    if memory > MAX_SCRYPT_MEMORY:
        raise ValueError(f"ln={ln}, r={r} need {memory / 2**20:.0f} MiB; "
                         f"at most {MAX_SCRYPT_MEMORY // 2**20} MiB")
    return ln, r, p


def _parse(encoded: str) -> _Scrypt:
    """The parts of a scrypt PHC string; never quotes the salt or hash.

    Raises:
        ValueError: what is wrong with ``encoded``.
    """
    fields = encoded.split("$")
    if len(fields) < 2 or fields[0]:
        raise ValueError("not a PHC string (it starts $scrypt$)")
    if fields[1] != "scrypt":
        shown = repr(fields[1]) if _PHC_ID.fullmatch(fields[1]) else "not a PHC identifier"
        raise ValueError(f"the algorithm is {shown}, not scrypt")
    if len(fields) != 5:
        raise ValueError("not $scrypt$ln=…,r=…,p=…$<salt>$<hash>")
    _, _, params, salt_b64, hash_b64 = fields
    ln, r, p = _parse_params(params)
    salt = _b64decode(salt_b64)
    if salt is None:
        raise ValueError("the salt is not base64 without padding")
    if len(salt) < SALT_BYTES:
        raise ValueError(f"the salt has {len(salt)} bytes; at least {SALT_BYTES}")
    digest = _b64decode(hash_b64)
    if digest is None:
        raise ValueError("the hash is not base64 without padding")
    if not 16 <= len(digest) <= 64:
        raise ValueError(f"the hash has {len(digest)} bytes; 16 to 64")
    return _Scrypt(ln, r, p, salt, digest)


def hash_password(password: str, *, ln: int = SCRYPT_LN, r: int = SCRYPT_R,
                  p: int = SCRYPT_P) -> str:
    """``password`` hashed with scrypt (RFC 7914) under a new 16-byte random salt, as a
    PHC string (github.com/P-H-C/phc-string-format):
    ``$scrypt$ln=15,r=8,p=3$<salt>$<hash>``, salt and 32-byte hash in base64 without
    padding, the form passlib uses. ``ln`` is log2 of N; memory 128·2^ln·r bytes
    (32 MiB by default), time proportional to 2^ln·r·p. Smaller parameters are for
    tests only; :func:`verify_password` reads them from the string.

    Raises:
        ValueError: ``ln``, ``r`` or ``p`` out of range (see :func:`check_password_hash`).
    """
    _parse_params(f"ln={ln},r={r},p={p}")
    salt = secrets.token_bytes(SALT_BYTES)
    digest = _scrypt(password, ln, r, p, salt, HASH_BYTES)
    return f"$scrypt$ln={ln},r={r},p={p}${_b64encode(salt)}${_b64encode(digest)}"


def _verify(password: str, stored: _Scrypt) -> bool:
    computed = _scrypt(password, stored.ln, stored.r, stored.p, stored.salt, len(stored.hash))
    return hmac.compare_digest(computed, stored.hash)


def verify_password(password: str, encoded: str) -> bool:
    """Whether ``password`` is the one ``encoded`` (from :func:`hash_password`) was made
    of; the hashes are compared in constant time. Takes as long as hashing (blocks the
    calling thread; :class:`WebAuth` runs it in a worker thread).

    Raises:
        ValueError: ``encoded`` is malformed; the message says what is wrong.
    """
    return _verify(password, _parse(encoded))


def check_password_hash(encoded: str) -> str | None:
    """None when ``encoded`` is a scrypt PHC string :func:`verify_password` takes, else
    why not (for configuration validation; the message never quotes salt or hash)."""
    try:
        _parse(encoded)
    except ValueError as e:
        return str(e)
    return None


def _token_hash(token: str) -> str:
    return "sha256:" + hashlib.sha256(_utf8(token)).hexdigest()


def new_token() -> tuple[str, str]:
    """A new API token and the form to store: ``(token, "sha256:<64 hex digits>")``.
    The token is ``edge_`` and 32 random bytes in URL-safe base64 (43 characters)."""
    token = TOKEN_PREFIX + secrets.token_urlsafe(32)
    return token, _token_hash(token)


def check_token_hash(stored: str) -> str | None:
    """None when ``stored`` is a token's stored form ``sha256:<64 lowercase hex digits>``,
    else why not (for configuration validation)."""
    if _TOKEN_HASH.fullmatch(stored):
        return None
    return "not sha256: and 64 lowercase hexadecimal digits"


def _matching_hash(token: str, stored_hashes: Iterable[str]) -> str | None:
    """The stored hash ``token`` matches, comparing with every one in constant time."""
    computed = _utf8(_token_hash(token))
    found = None
    for stored in stored_hashes:
        if hmac.compare_digest(computed, _utf8(stored)):
            found = stored
    return found


def token_matches(token: str, stored_hashes: Iterable[str]) -> bool:
    """Whether ``token`` is one of those whose stored forms (from :func:`new_token`) are
    ``stored_hashes``; each is compared in constant time."""
    return _matching_hash(token, stored_hashes) is not None


@dataclass
class Session:
    """One login. ``id`` is the session cookie's value, ``csrf`` the token the page
    sends back in ``X-CSRF-Token``; ``created`` and ``last_used`` are seconds of the
    :class:`Sessions` clock. Neither secret shows in ``repr``."""

    user: str
    id: str = field(repr=False)
    csrf: str = field(repr=False)
    created: float
    last_used: float


class Sessions:
    """Sessions in memory, at most ``max_sessions`` (creating one more drops the oldest).
    A session ends ``idle_timeout_s`` after it was last used or ``absolute_timeout_s``
    after it was created, whichever comes first (the OWASP Session Management Cheat
    Sheet's idle and absolute timeouts). ``clock`` gives monotonic seconds."""

    def __init__(self, *, idle_timeout_s: float = 30 * 60,
                 absolute_timeout_s: float = 12 * 3600, max_sessions: int = 64,
                 clock: Clock = time.monotonic) -> None:
        self.idle_timeout_s = idle_timeout_s
        self.absolute_timeout_s = absolute_timeout_s
        self.max_sessions = max_sessions
        self._clock = clock
        self._sessions: dict[str, Session] = {}

    def _expired(self, s: Session, now: float) -> bool:
        return (now - s.last_used >= self.idle_timeout_s
                or now - s.created >= self.absolute_timeout_s)

    def create(self, user: str) -> Session:
        """A new session of ``user``: id and CSRF token 32 random bytes each, in
        URL-safe base64."""
        now = self._clock()
        for sid in [sid for sid, s in self._sessions.items() if self._expired(s, now)]:
            del self._sessions[sid]
        while len(self._sessions) >= self.max_sessions:
            oldest = self._sessions.pop(next(iter(self._sessions)))
            log.info("session of %s ended: more than %d sessions", oldest.user,
                     self.max_sessions)
        s = Session(user=user, id=secrets.token_urlsafe(32), csrf=secrets.token_urlsafe(32),
                    created=now, last_used=now)
        self._sessions[s.id] = s
        return s

    def get(self, session_id: str) -> Session | None:
        """The live session ``session_id``, now marked as used; None when there is none
        (never was, dropped or expired)."""
        s = self._sessions.get(session_id)
        if s is None:
            return None
        now = self._clock()
        if self._expired(s, now):
            del self._sessions[session_id]
            return None
        s.last_used = now
        return s

    def alive(self, session_id: str) -> bool:
        """Whether the session ``session_id`` is live, without marking it as used (a
        live stream must not keep a session from going idle)."""
        s = self._sessions.get(session_id)
        return s is not None and not self._expired(s, self._clock())

    def drop(self, session_id: str) -> None:
        """End the session ``session_id``, if there is one."""
        self._sessions.pop(session_id, None)


class LoginLimiter:
    """Failed logins counted per client address and over all clients: after
    ``max_failures`` within ``window_s`` a client is refused until the oldest of them is
    ``window_s`` old; after ``max_global_failures`` within ``global_window_s`` from all
    clients together everyone is (so rotating addresses does not help guessing, at the
    price that a flood also keeps the operator out for that long). A successful login
    clears its client's failures. At most ``max_clients`` addresses are remembered
    (those that failed longest ago are forgotten first; the global count still holds).
    ``clock`` gives monotonic seconds."""

    def __init__(self, *, max_failures: int = 5, window_s: float = 300.0,
                 max_global_failures: int = 30, global_window_s: float = 60.0,
                 max_clients: int = 1024, clock: Clock = time.monotonic) -> None:
        self.max_failures = max_failures
        self.window_s = window_s
        self.max_global_failures = max_global_failures
        self.global_window_s = global_window_s
        self.max_clients = max_clients
        self._clock = clock
        self._clients: dict[str, deque[float]] = {}  # least recently failed first
        self._global: deque[float] = deque(maxlen=max_global_failures)  # the latest

    def _forget(self, now: float) -> None:
        while self._clients:
            client, failures = next(iter(self._clients.items()))
            if failures[-1] > now - self.window_s:
                break
            del self._clients[client]

    def retry_after(self, client: str) -> int:
        """Whole seconds until ``client`` may try to log in again; 0: now."""
        now = self._clock()
        waits = [0.0]
        # Each deque holds the latest failures, as many as allowed: when full and its
        # oldest is within the window, no more are.
        failures = self._clients.get(client)
        if failures is not None and len(failures) == self.max_failures:
            waits.append(failures[0] + self.window_s - now)
        if len(self._global) == self.max_global_failures:
            waits.append(self._global[0] + self.global_window_s - now)
        return max(0, math.ceil(max(waits)))

    def failed(self, client: str) -> None:
        """Count a failed login of ``client``."""
        now = self._clock()
        self._forget(now)
        failures = self._clients.pop(client, None) or deque(maxlen=self.max_failures)
        failures.append(now)
        self._clients[client] = failures
        self._global.append(now)
        while len(self._clients) > self.max_clients:
            del self._clients[next(iter(self._clients))]

    def succeeded(self, client: str) -> None:
        """Forget the failed logins of ``client``."""
        self._clients.pop(client, None)


def peer_address(request: web.BaseRequest) -> str | None:
    """The IP address of the TCP peer (the transport's ``peername``), None when there is
    none (a closed connection, a Unix socket). Headers such as ``X-Forwarded-For`` or
    ``Forwarded`` are never used: any client can send them."""
    transport = request.transport
    peer = transport.get_extra_info("peername") if transport is not None else None
    if isinstance(peer, tuple) and peer and isinstance(peer[0], str):
        return peer[0]
    return None


def is_loopback(address: str | None) -> bool:
    """Whether ``address`` is in 127.0.0.0/8 or is ::1 (also as ::ffff:127.x.y.z)."""
    if address is None:
        return False
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped.is_loopback
    return ip.is_loopback


class _OpenPath(NamedTuple):
    methods: frozenset[str] | None  # None: any
    path: str
    prefix: bool

    @classmethod
    def parse(cls, entry: str) -> _OpenPath:
        method, _, path = entry.rpartition(" ")
        methods = None
        if method:
            methods = frozenset({method, hdrs.METH_HEAD} if method == hdrs.METH_GET
                                else {method})
        return cls(methods, path, path.endswith("/") and path != "/")

    def matches(self, method: str, path: str) -> bool:
        if self.methods is not None and method not in self.methods:
            return False
        return path.startswith(self.path) if self.prefix else path == self.path


def _error(status: int, message: str, headers: Mapping[str, str] | None = None
           ) -> web.Response:
    return web.json_response({"error": message}, status=status, headers=headers)


_UNAUTHENTICATED: Final[Mapping[str, str]] = {hdrs.WWW_AUTHENTICATE: 'Bearer realm="edge"'}


class WebAuth:
    """Authentication of the web server: :attr:`middleware` for every request and
    :meth:`routes` for logging in and out.

    ``users`` maps user names to :func:`hash_password` strings; ``token_hashes`` are
    :func:`new_token` stored forms; ``view`` says who may view without logging in:
    ``local`` loopback clients, ``login`` nobody; ``secure_cookie`` (True when served
    over TLS) adds ``Secure`` to the session cookie; ``open_paths`` as
    :data:`OPEN_PATHS`. ``sessions`` and ``limiter`` default to :class:`Sessions` and
    :class:`LoginLimiter` with their defaults.

    Raises:
        ValueError: a malformed password hash (naming its user) or token hash (naming
            its position in ``token_hashes``).
    """

    def __init__(self, users: Mapping[str, str], token_hashes: Iterable[str] = (), *,
                 view: View = "local", secure_cookie: bool = False,
                 open_paths: Iterable[str] = OPEN_PATHS, sessions: Sessions | None = None,
                 limiter: LoginLimiter | None = None) -> None:
        self._users: dict[str, _Scrypt] = {}
        problems: list[str] = []
        for name, encoded in users.items():
            try:
                self._users[name] = _parse(encoded)
            except ValueError as e:
                problems.append(f"the password hash of user {name!r}: {e}")
        self._token_hashes = list(token_hashes)
        problems += [f"token hash {i}: {why}" for i, h in enumerate(self._token_hashes)
                     if (why := check_token_hash(h))]
        if problems:
            raise ValueError("; ".join(problems))
        self.view = view
        self.secure_cookie = secure_cookie
        self._open = [_OpenPath.parse(p) for p in open_paths]
        self.sessions = sessions if sessions is not None else Sessions()
        self.limiter = limiter if limiter is not None else LoginLimiter()
        # Unknown users are checked against this, with the parameters of a real hash,
        # so that the time of an answer does not tell whether the user exists.
        model = next(iter(self._users.values()), None)
        ln, r, p, n = ((model.ln, model.r, model.p, len(model.hash)) if model
                       else (SCRYPT_LN, SCRYPT_R, SCRYPT_P, HASH_BYTES))
        self._dummy = _Scrypt(ln, r, p, secrets.token_bytes(SALT_BYTES),
                              secrets.token_bytes(n))
        # One password check at a time: bounds the memory (one scrypt), and the limiter
        # is asked and told in turn, so parallel guesses cannot overtake it.
        self._checking = asyncio.Lock()

    def may_view(self, address: str | None) -> bool:
        """Whether a client at ``address`` may view without logging in."""
        return self.view == "local" and is_loopback(address)

    def still_allowed(self, request: web.Request) -> bool:
        """Whether a long request (a live stream) that was let in may go on: its bearer
        token, its session (live, not marked as used), or a loopback client's view."""
        authorization = request.headers.get(hdrs.AUTHORIZATION)
        if authorization is not None:
            return self._bearer_user(authorization) is not None
        session_id = request.cookies.get(SESSION_COOKIE)
        if session_id and self.sessions.alive(session_id):
            return True
        return self.may_view(peer_address(request))

    def _is_open(self, request: web.Request) -> bool:
        path = request.rel_url.path_safe  # what the router matches
        return any(p.matches(request.method, path) for p in self._open)

    def _bearer_user(self, authorization: str) -> str | None:
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():  # the scheme is case-insensitive
            return None
        stored = _matching_hash(token.strip(), self._token_hashes)
        return f"token {stored.removeprefix('sha256:')[:8]}" if stored else None

    def _session(self, request: web.Request) -> Session | None:
        session_id = request.cookies.get(SESSION_COOKIE)
        return self.sessions.get(session_id) if session_id else None

    def _csrf_refusal(self, request: web.Request, session: Session) -> web.Response | None:
        if request.method in SAFE_METHODS:
            return None
        sent = request.headers.get(CSRF_HEADER)
        if not sent:
            return _error(403, f"the {CSRF_HEADER} header is missing")
        if not hmac.compare_digest(_utf8(sent), _utf8(session.csrf)):
            return _error(403, f"the {CSRF_HEADER} header does not match the session")
        return None

    def _refusal(self, request: web.Request) -> web.Response | None:
        """The answer refusing ``request`` (401 or 403), or None once ``request[USER]``
        is set."""
        request[USER] = None
        if self._is_open(request):
            return None
        authorization = request.headers.get(hdrs.AUTHORIZATION)
        if authorization is not None:
            request[USER] = self._bearer_user(authorization)
            if request[USER] is None:
                return _error(401, "the Authorization header is not a valid bearer token",
                              _UNAUTHENTICATED)
            return None
        session = self._session(request)
        if session is None:
            if request.method in SAFE_METHODS and self.may_view(peer_address(request)):
                return None
            return _error(401, "log in, or send a bearer token", _UNAUTHENTICATED)
        request[USER] = session.user
        return self._csrf_refusal(request, session)

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """Answer 401 (no or wrong credentials) or 403 (CSRF token missing or wrong) to
        what the client may not do, else set ``request[USER]`` and call ``handler``."""
        refusal = self._refusal(request)
        if refusal is not None:
            return refusal
        return await handler(request)

    async def _password_ok(self, user: str, password: str) -> bool:
        stored = self._users.get(user)
        ok = await asyncio.to_thread(_verify, password, stored or self._dummy)
        return ok and stored is not None

    async def login(self, request: web.Request) -> web.Response:
        """``POST /api/v1/login`` with JSON ``{"user": …, "password": …}``: 200
        ``{"user", "csrf"}`` and the session cookie (``HttpOnly; SameSite=Strict;
        Path=/``, ``Secure`` with ``secure_cookie``; no ``Max-Age``: it ends with the
        browser, or with the session); 401 for a wrong user or password alike; 429 with
        ``Retry-After`` (seconds) after too many failures; 400 or 415 for a malformed
        request. Any session the request came with ends."""
        if request.content_type != "application/json":
            return _error(415, "send application/json")  # nor can a cross-site form
        try:
            body: Any = await request.json()
        except ValueError:
            body = None
        if not isinstance(body, dict):
            body = {}
        user, password = body.get("user"), body.get("password")
        if not (isinstance(user, str) and isinstance(password, str)
                and len(user) <= MAX_USER_CHARS and len(password) <= MAX_PASSWORD_CHARS):
            return _error(400, f'expected {{"user": …, "password": …}}, strings of at most '
                               f"{MAX_USER_CHARS} and {MAX_PASSWORD_CHARS} characters")
        client = peer_address(request) or "unknown"
        async with self._checking:
            wait = self.limiter.retry_after(client)
            if wait:
                log.debug("login from %s refused: %d s to wait", client, wait)
                return _error(429, "too many failed logins; try again later",
                              {hdrs.RETRY_AFTER: str(wait)})
            ok = await self._password_ok(user, password)
            if not ok:
                self.limiter.failed(client)
                # never the name itself: it may be a password typed in the wrong field
                log.warning("failed login from %s for %s", client,
                            "a user who exists (a wrong password)" if user in self._users
                            else "an unknown user")
                if wait := self.limiter.retry_after(client):
                    log.warning("logins from %s refused for %d s: too many failures",
                                client, wait)
                return _error(401, "wrong user name or password")
            self.limiter.succeeded(client)
        old = request.cookies.get(SESSION_COOKIE)
        if old:
            self.sessions.drop(old)
        session = self.sessions.create(user)
        log.info("%s logged in from %s", user, client)
        response = web.json_response({"user": user, "via": "session", "csrf": session.csrf})
        response.set_cookie(SESSION_COOKIE, session.id, path="/", httponly=True,
                            samesite="Strict", secure=self.secure_cookie)
        return response

    async def logout(self, request: web.Request) -> web.Response:
        """``POST /api/v1/logout`` (through :attr:`middleware`: CSRF token needed): end the
        request's session and expire its cookie; 204."""
        session = self._session(request)
        if session is not None:
            self.sessions.drop(session.id)
            log.info("%s logged out", session.user)
        response = web.Response(status=204)
        response.del_cookie(SESSION_COOKIE, path="/", httponly=True, samesite="Strict",
                            secure=self.secure_cookie)
        return response

    async def session(self, request: web.Request) -> web.Response:
        """``GET /api/v1/session``: who the request is: 200 ``{"user", "via": "session",
        "csrf"}`` of its session (for a page loaded later), or ``{"user": "token <8 hex
        digits>", "via": "token", "csrf": null}`` for a valid bearer token (a wrong one
        is refused by :attr:`middleware`); 401 when it is neither."""
        if request.headers.get(hdrs.AUTHORIZATION) is not None and request.get(USER):
            return web.json_response({"user": request[USER], "via": "token", "csrf": None})
        session = self._session(request)
        if session is None:
            return _error(401, "not logged in")
        return web.json_response({"user": session.user, "via": "session",
                                  "csrf": session.csrf})

    def routes(self) -> list[web.RouteDef]:
        """:meth:`login`, :meth:`logout` and :meth:`session` at their paths, for
        ``app.add_routes``."""
        return [web.post(LOGIN_PATH, self.login), web.post(LOGOUT_PATH, self.logout),
                web.get(SESSION_PATH, self.session)]
