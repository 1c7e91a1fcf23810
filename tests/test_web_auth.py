"""Authentication of the local web page and REST API (:mod:`edge.web.auth`) and
``edge web passwd|token``: hashes, tokens, sessions, the login limiter, and the
middleware and login routes in a real aiohttp server on 127.0.0.1."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import logging
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
import yaml
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from click.testing import CliRunner

import edge.web.auth as auth_module
from edge.cli import main
from edge.web.auth import (
    USER,
    LoginLimiter,
    Sessions,
    WebAuth,
    check_password_hash,
    check_token_hash,
    hash_password,
    is_loopback,
    new_token,
    token_matches,
    verify_password,
)
from edge.web_cli import web as web_group

PASSWORD = "correct horse battery staple"  # noqa: S105 (a test's)
WRONG = "Tr0ub4dor&3 guess"
FAST = {"ln": 4, "r": 8, "p": 1}  # a quick hash for tests; the default takes ~0.3 s
ROLLBACK = "/api/v1/config/rollback"


class Clock:
    """A monotonic clock the test moves."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(scope="module")
def admin_hash() -> str:
    return hash_password(PASSWORD, **FAST)


@pytest.fixture(scope="module")
def token_pair() -> tuple[str, str]:
    return new_token()


def app_for(auth: WebAuth) -> web.Application:
    """The middleware and login routes, a page to view and a state change to make."""
    async def view(request: web.Request) -> web.Response:
        return web.json_response({"user": request[USER]})

    async def rollback(request: web.Request) -> web.Response:
        return web.json_response({"rolled_back": True, "user": request[USER]})

    app = web.Application(middlewares=[auth.middleware])
    app.add_routes(auth.routes())
    app.add_routes([web.get("/api/v1/devices", view), web.post(ROLLBACK, rollback),
                    web.get("/healthz", view), web.get("/static/{name}", view)])
    return app


Start = Callable[..., Awaitable[TestClient[web.Request, web.Application]]]


@pytest.fixture
async def start(admin_hash: str, token_pair: tuple[str, str]) -> AsyncIterator[Start]:
    """``client = await start(**WebAuth keywords)``: a server with user ``admin`` and
    the module's token, and a client of it; both closed at teardown."""
    clients: list[TestClient[web.Request, web.Application]] = []

    async def start_(**kwargs: Any) -> TestClient[web.Request, web.Application]:
        auth = WebAuth({"admin": admin_hash}, [token_pair[1]], **kwargs)
        client = TestClient(TestServer(app_for(auth)))
        await client.start_server()
        clients.append(client)
        return client

    yield start_
    for client in clients:
        await client.close()


async def login(client: TestClient[web.Request, web.Application], user: str = "admin",
                password: str = PASSWORD) -> Any:
    response = await client.post("/api/v1/login", json={"user": user, "password": password})
    assert response.status == 200, await response.text()
    return await response.json()


# Hashes


def test_hash_password_makes_a_phc_string_verify_password_takes() -> None:
    encoded = hash_password(PASSWORD)
    assert re.fullmatch(r"\$scrypt\$ln=15,r=8,p=3\$[A-Za-z0-9+/]{22}\$[A-Za-z0-9+/]{43}",
                        encoded), encoded
    assert verify_password(PASSWORD, encoded)
    assert not verify_password(PASSWORD + " ", encoded)
    assert check_password_hash(encoded) is None
    assert hash_password(PASSWORD, **FAST) != hash_password(PASSWORD, **FAST)  # salted


def test_verify_password_reads_a_hash_made_elsewhere() -> None:
    """A PHC string built from hashlib directly (as passlib writes them)."""
    salt = bytes(range(16))
    digest = hashlib.scrypt(b"p\xc3\xa4ss", salt=salt, n=2**5, r=8, p=2, dklen=24)
    def b64(raw: bytes) -> str:
        return base64.b64encode(raw).decode().rstrip("=")
    encoded = f"$scrypt$ln=5,r=8,p=2${b64(salt)}${b64(digest)}"
    assert verify_password("päss", encoded)
    assert not verify_password("pass", encoded)


SALT = base64.b64encode(bytes(range(16))).decode().rstrip("=")  # AAECAwQFBgcICQoLDA0ODw
HASH = base64.b64encode(bytes(32)).decode().rstrip("=")


@pytest.mark.parametrize(("encoded", "why"), [
    ("", "not a PHC string"),
    (f"scrypt$ln=4,r=8,p=1${SALT}${HASH}", "not a PHC string"),
    ("$argon2id$v=19$m=65536,t=3,p=4$c2FsdHNhbHQ$aGFzaGhhc2g", "the algorithm is 'argon2id'"),
    ("$My Password!$x", "the algorithm is not a PHC identifier"),
    (f"$scrypt$ln=4,r=8,p=1${SALT}", "not $scrypt$ln=…,r=…,p=…$<salt>$<hash>"),
    (f"$scrypt$ln=4,r=8${SALT}${HASH}", "the parameters are not ln=…,r=…,p=…"),
    (f"$scrypt$r=8,ln=4,p=1${SALT}${HASH}", "the parameters are not ln=…,r=…,p=…"),
    (f"$scrypt$ln=x,r=8,p=1${SALT}${HASH}", "ln is not a decimal number"),
    (f"$scrypt$ln=4,r=08,p=1${SALT}${HASH}", "r is not a decimal number"),
    (f"$scrypt$ln=0,r=8,p=1${SALT}${HASH}", "out of range"),
    (f"$scrypt$ln=4,r=8,p=17${SALT}${HASH}", "out of range"),
    (f"$scrypt$ln=20,r=8,p=1${SALT}${HASH}", "need 1024 MiB; at most 128 MiB"),
    (f"$scrypt$ln=4,r=8,p=1${SALT}==${HASH}", "the salt is not base64 without padding"),
    (f"$scrypt$ln=4,r=8,p=1${SALT[:-1]}-${HASH}", "the salt is not base64 without padding"),
    (f"$scrypt$ln=4,r=8,p=1${SALT[:-1]}x${HASH}", "the salt is not base64"),  # stray bits
    (f"$scrypt$ln=4,r=8,p=1${SALT[:11]}${HASH}", "the salt has 8 bytes; at least 16"),
    (f"$scrypt$ln=4,r=8,p=1${SALT}${HASH}!", "the hash is not base64 without padding"),
    (f"$scrypt$ln=4,r=8,p=1${SALT}${HASH[:11]}", "the hash has 8 bytes; 16 to 64"),
])
def test_a_malformed_hash_is_refused_saying_why(encoded: str, why: str) -> None:
    problem = check_password_hash(encoded)
    assert problem is not None
    assert why in problem
    assert SALT[:10] not in problem
    assert HASH[:10] not in problem
    with pytest.raises(ValueError, match=re.escape(why)):
        verify_password(PASSWORD, encoded)


def test_web_auth_refuses_malformed_hashes_naming_user_and_token() -> None:
    with pytest.raises(ValueError, match=r"user 'op'.*ln is not.*token hash 1: not sha256"):
        WebAuth({"admin": hash_password(PASSWORD, **FAST), "op": "$scrypt$ln=a,r=8,p=1$x$y"},
                [new_token()[1], "sha256:ABC"])


# Tokens


def test_new_token_and_its_stored_form() -> None:
    token, stored = new_token()
    assert re.fullmatch(r"edge_[A-Za-z0-9_-]{43}", token)
    assert stored == "sha256:" + hashlib.sha256(token.encode()).hexdigest()
    assert check_token_hash(stored) is None
    other_token, other = new_token()
    assert other_token != token
    assert token_matches(token, [other, stored])
    assert token_matches(other_token, [other, stored])
    assert not token_matches(token, [other])
    assert not token_matches(token[:-1], [stored])
    assert not token_matches("", [stored])
    assert not token_matches(token, [])


@pytest.mark.parametrize("stored", ["", "sha256:", "sha256:" + "A" * 64, "md5:" + "a" * 64,
                                    "sha256:" + "a" * 63, "sha256:" + "a" * 65])
def test_check_token_hash_refuses_what_is_not_a_sha256(stored: str) -> None:
    assert check_token_hash(stored) == "not sha256: and 64 lowercase hexadecimal digits"


# Sessions


def test_a_session_ends_after_idling_for_30_minutes() -> None:
    clock = Clock()
    sessions = Sessions(clock=clock)
    s = sessions.create("admin")
    assert re.fullmatch(r"[A-Za-z0-9_-]{43}", s.id)
    assert re.fullmatch(r"[A-Za-z0-9_-]{43}", s.csrf)
    assert s.id != s.csrf
    assert s.id not in repr(s)
    assert s.csrf not in repr(s)
    assert "admin" in repr(s)
    clock.now += 29 * 60
    assert sessions.get(s.id) is s  # used: the idle time starts again
    clock.now += 29 * 60
    assert sessions.get(s.id) is s
    clock.now += 30 * 60
    assert sessions.get(s.id) is None
    clock.now -= 30 * 60  # gone for good, not merely hidden
    assert sessions.get(s.id) is None


def test_a_session_ends_12_hours_after_login_however_much_it_is_used() -> None:
    clock = Clock()
    sessions = Sessions(clock=clock)
    s = sessions.create("admin")
    for _ in range(12 * 3 - 1):
        clock.now += 20 * 60
        assert sessions.get(s.id) is s
    clock.now += 20 * 60
    assert sessions.get(s.id) is None


def test_creating_more_than_max_sessions_drops_the_oldest() -> None:
    clock = Clock()
    sessions = Sessions(clock=clock)
    made = []
    for _ in range(64):
        made.append(sessions.create("admin"))
        clock.now += 1
    assert all(sessions.get(s.id) is s for s in made)
    newest = sessions.create("admin")
    assert sessions.get(made[0].id) is None
    assert all(sessions.get(s.id) is s for s in [*made[1:], newest])


def test_drop_ends_a_session() -> None:
    sessions = Sessions()
    s, other = sessions.create("admin"), sessions.create("admin")
    sessions.drop(s.id)
    sessions.drop("no such session")
    assert sessions.get(s.id) is None
    assert sessions.get(other.id) is other


# The login limiter


def test_five_failures_lock_a_client_out_until_the_first_is_five_minutes_old() -> None:
    clock = Clock()
    limiter = LoginLimiter(clock=clock)
    for _ in range(5):
        assert limiter.retry_after("10.0.0.1") == 0
        limiter.failed("10.0.0.1")
        clock.now += 10
    assert limiter.retry_after("10.0.0.1") == 250  # the first failure was 50 s ago
    assert limiter.retry_after("10.0.0.2") == 0  # others may still try
    clock.now += 249.5
    assert limiter.retry_after("10.0.0.1") == 1
    clock.now += 0.5
    assert limiter.retry_after("10.0.0.1") == 0
    limiter.failed("10.0.0.1")  # the 2nd to 5th are still within 5 minutes
    assert limiter.retry_after("10.0.0.1") == 10


def test_a_successful_login_clears_its_clients_failures() -> None:
    clock = Clock()
    limiter = LoginLimiter(clock=clock)
    for _ in range(4):
        limiter.failed("10.0.0.1")
        limiter.failed("10.0.0.2")
    limiter.succeeded("10.0.0.1")
    limiter.failed("10.0.0.1")
    limiter.failed("10.0.0.2")
    assert limiter.retry_after("10.0.0.1") == 0
    assert limiter.retry_after("10.0.0.2") == 300


def test_thirty_failures_a_minute_from_anywhere_lock_everyone_out() -> None:
    clock = Clock()
    limiter = LoginLimiter(clock=clock)
    for i in range(30):
        assert limiter.retry_after(f"10.0.1.{i}") == 0
        limiter.failed(f"10.0.1.{i}")
        clock.now += 1
    assert limiter.retry_after("10.0.2.1") == 30  # the first was 30 s ago
    limiter.succeeded("10.0.2.1")  # someone else's success does not lift it
    assert limiter.retry_after("10.0.2.1") == 30
    clock.now += 30
    assert limiter.retry_after("10.0.2.1") == 0


def test_the_limiter_remembers_at_most_max_clients() -> None:
    clock = Clock()
    limiter = LoginLimiter(max_clients=3, clock=clock)
    for _ in range(5):
        limiter.failed("10.0.0.1")
    assert limiter.retry_after("10.0.0.1") == 300
    for client in ("10.0.0.2", "10.0.0.3", "10.0.0.4"):
        limiter.failed(client)
    assert limiter.retry_after("10.0.0.1") == 0  # forgotten: the longest since it failed
    assert limiter.retry_after("10.0.0.4") == 0
    for _ in range(4):
        limiter.failed("10.0.0.4")
    assert limiter.retry_after("10.0.0.4") == 300  # still remembered


# Who may view


@pytest.mark.parametrize(("address", "loopback"), [
    ("127.0.0.1", True), ("127.10.20.30", True), ("::1", True), ("::ffff:127.0.0.1", True),
    ("10.0.0.1", False), ("192.168.1.20", False), ("128.0.0.1", False), ("::2", False),
    ("::ffff:10.0.0.1", False), ("fe80::1", False), ("0.0.0.0", False), ("localhost", False),
    ("", False), (None, False),
])
def test_viewing_without_login_is_for_loopback_clients_only(
    address: str | None, loopback: bool, admin_hash: str
) -> None:
    assert is_loopback(address) is loopback
    assert WebAuth({"admin": admin_hash}, view="local").may_view(address) is loopback
    assert WebAuth({"admin": admin_hash}, view="login").may_view(address) is False


async def test_view_local_lets_loopback_clients_look_but_not_change(start: Start) -> None:
    client = await start(view="local")
    response = await client.get("/api/v1/devices")
    assert response.status == 200
    assert await response.json() == {"user": None}
    response = await client.post(ROLLBACK)
    assert response.status == 401
    assert response.headers["WWW-Authenticate"] == 'Bearer realm="edge"'
    assert await response.json() == {"error": "log in, or send a bearer token"}


async def test_view_login_needs_a_login_to_look(start: Start) -> None:
    client = await start(view="login")
    response = await client.get("/api/v1/devices")
    assert response.status == 401
    assert (await client.get("/api/v1/session")).status == 401
    await login(client)
    response = await client.get("/api/v1/devices")
    assert response.status == 200
    assert await response.json() == {"user": "admin"}


async def test_open_paths_need_no_login(start: Start) -> None:
    client = await start(view="login")
    for path in ("/healthz", "/static/app.css"):
        assert (await client.get(path)).status == 200, path
        assert (await client.head(path)).status == 200, path
    closed = await start(view="login", open_paths=["POST /api/v1/login"])
    assert (await closed.get("/healthz")).status == 401
    assert (await closed.get("/static/app.css")).status == 401
    await login(closed)
    assert (await closed.get("/healthz")).status == 200


# Logging in


async def test_login_sets_an_httponly_samesite_strict_session_cookie(start: Start) -> None:
    client = await start()
    response = await client.post("/api/v1/login", json={"user": "admin", "password": PASSWORD})
    assert response.status == 200
    body = await response.json()
    assert body["user"] == "admin"
    assert re.fullmatch(r"[A-Za-z0-9_-]{43}", body["csrf"])
    cookie = response.headers["Set-Cookie"]
    attributes = {a.strip().split("=")[0].lower(): a for a in cookie.split(";")[1:]}
    assert re.match(r"edge_session=[A-Za-z0-9_-]{43};", cookie)
    assert attributes.keys() == {"httponly", "samesite", "path"}, cookie
    assert attributes["samesite"].strip() == "SameSite=Strict"
    assert attributes["path"].strip() == "Path=/"
    response = await client.get("/api/v1/session")
    assert response.status == 200
    assert await response.json() == body


async def test_the_session_cookie_is_secure_under_tls(start: Start) -> None:
    client = await start(secure_cookie=True)
    response = await client.post("/api/v1/login", json={"user": "admin", "password": PASSWORD})
    assert response.status == 200
    attributes = [a.strip().lower() for a in response.headers["Set-Cookie"].split(";")]
    assert "secure" in attributes
    assert "httponly" in attributes


async def test_a_wrong_password_and_an_unknown_user_get_the_same_answer(start: Start) -> None:
    client = await start()
    answers = []
    for user, password in [("admin", WRONG), ("nobody", WRONG), ("nobody", PASSWORD)]:
        response = await client.post("/api/v1/login", json={"user": user, "password": password})
        answers.append((response.status, await response.text(), "Set-Cookie" in response.headers))
    assert answers == [(401, '{"error": "wrong user name or password"}', False)] * 3


async def test_an_unknown_user_is_checked_against_a_hash_like_the_real_one(
    start: Start, monkeypatch: pytest.MonkeyPatch
) -> None:
    checked: list[tuple[int, int, int, int, int]] = []
    verify = auth_module._verify

    def spy(password: str, stored: Any) -> bool:
        checked.append((stored.ln, stored.r, stored.p, len(stored.salt), len(stored.hash)))
        return verify(password, stored)

    monkeypatch.setattr(auth_module, "_verify", spy)
    client = await start()
    for user in ("admin", "nobody"):
        response = await client.post("/api/v1/login", json={"user": user, "password": WRONG})
        assert response.status == 401
    assert checked == [(4, 8, 1, 16, 32)] * 2


@pytest.mark.parametrize(("kwargs", "status"), [
    ({"data": "user=admin&password=x",
      "headers": {"Content-Type": "application/x-www-form-urlencoded"}}, 415),
    ({"data": '{"user": "admin", "password": "x"}', "headers": {"Content-Type": "text/plain"}},
     415),
    ({"data": "{not json", "headers": {"Content-Type": "application/json"}}, 400),
    ({"json": ["admin", PASSWORD]}, 400),
    ({"json": {"user": "admin"}}, 400),
    ({"json": {"user": "admin", "password": 12345678}}, 400),
    ({"json": {"user": "admin", "password": "x" * 1025}}, 400),
])
async def test_a_malformed_login_is_refused(start: Start, kwargs: Any, status: int) -> None:
    client = await start()
    response = await client.post("/api/v1/login", **kwargs)
    assert response.status == status
    assert "error" in await response.json()


async def test_logins_are_rate_limited(start: Start) -> None:
    clock = Clock()
    client = await start(limiter=LoginLimiter(clock=clock))
    for _ in range(5):
        response = await client.post("/api/v1/login", json={"user": "admin", "password": WRONG})
        assert response.status == 401
        clock.now += 1
    response = await client.post("/api/v1/login", json={"user": "admin", "password": PASSWORD})
    assert response.status == 429  # even the right password, until the window passes
    assert response.headers["Retry-After"] == "295"
    assert await response.json() == {"error": "too many failed logins; try again later"}
    assert "Set-Cookie" not in response.headers
    clock.now += 295
    await login(client)
    for _ in range(5):  # the success cleared the failures
        response = await client.post("/api/v1/login", json={"user": "admin", "password": WRONG})
        assert response.status == 401


async def test_parallel_guesses_cannot_overtake_the_limiter(start: Start) -> None:
    client = await start()
    responses = await asyncio.gather(*(
        client.post("/api/v1/login", json={"user": "admin", "password": f"{WRONG}{i}"})
        for i in range(12)))
    assert sorted(r.status for r in responses) == [401] * 5 + [429] * 7


# Changing state


async def test_a_session_changes_state_only_with_its_csrf_token(start: Start) -> None:
    client = await start()
    csrf = (await login(client))["csrf"]
    response = await client.post(ROLLBACK)
    assert response.status == 403
    assert await response.json() == {"error": "the X-CSRF-Token header is missing"}
    response = await client.post(ROLLBACK, headers={"X-CSRF-Token": csrf[:-1] + "x"})
    assert response.status == 403
    assert await response.json() == {"error": "the X-CSRF-Token header does not match the "
                                                "session"}
    other = await start()
    other_csrf = (await login(other))["csrf"]  # another session's token does not do
    response = await client.post(ROLLBACK, headers={"X-CSRF-Token": other_csrf})
    assert response.status == 403
    response = await client.post(ROLLBACK, headers={"X-CSRF-Token": csrf})
    assert response.status == 200
    assert await response.json() == {"rolled_back": True, "user": "admin"}


async def test_a_bearer_token_changes_state_without_session_or_csrf(
    start: Start, token_pair: tuple[str, str]
) -> None:
    token, stored = token_pair
    client = await start(view="login")
    for scheme in ("Bearer", "bearer"):
        response = await client.post(ROLLBACK, headers={"Authorization": f"{scheme} {token}"})
        assert response.status == 200
        assert await response.json() == {"rolled_back": True,
                                         "user": f"token {stored[7:15]}"}
    response = await client.get("/api/v1/devices", headers={"Authorization": f"Bearer {token}"})
    assert response.status == 200
    response = await client.get("/api/v1/session", headers={"Authorization": f"Bearer {token}"})
    assert (response.status, await response.json()) == (
        200, {"user": f"token {stored[7:15]}", "via": "token", "csrf": None})
    for wrong in (f"Bearer {token[:-1]}", f"Bearer {new_token()[0]}", f"Basic {token}",
                  "Bearer ", token):
        response = await client.post(ROLLBACK, headers={"Authorization": wrong})
        assert response.status == 401, wrong
        assert response.headers["WWW-Authenticate"] == 'Bearer realm="edge"'


async def test_a_wrong_bearer_token_is_refused_even_where_viewing_is_open(
    start: Start, token_pair: tuple[str, str]
) -> None:
    client = await start(view="local")
    response = await client.get("/api/v1/devices",
                                headers={"Authorization": f"Bearer {token_pair[0]}x"})
    assert response.status == 401


async def test_logout_ends_the_session_and_expires_the_cookie(start: Start) -> None:
    client = await start(view="login")
    csrf = (await login(client))["csrf"]
    session_id = next(c.value for c in client.session.cookie_jar if c.key == "edge_session")
    response = await client.post("/api/v1/logout")
    assert response.status == 403  # logging out is a change too
    response = await client.post("/api/v1/logout", headers={"X-CSRF-Token": csrf})
    assert response.status == 204
    cookie = response.headers["Set-Cookie"]
    assert cookie == ('edge_session=""; expires=Thu, 01 Jan 1970 00:00:00 GMT; HttpOnly; '
                      "Max-Age=0; Path=/; SameSite=Strict")
    # The old cookie, sent again, is worth nothing.
    headers = {"Cookie": f"edge_session={session_id}", "X-CSRF-Token": csrf}
    assert (await client.get("/api/v1/session", headers=headers)).status == 401
    assert (await client.post(ROLLBACK, headers=headers)).status == 401


async def test_a_session_idle_for_30_minutes_is_refused(start: Start) -> None:
    clock = Clock()
    client = await start(sessions=Sessions(clock=clock))
    csrf = (await login(client))["csrf"]
    clock.now += 29 * 60
    assert (await client.post(ROLLBACK, headers={"X-CSRF-Token": csrf})).status == 200
    clock.now += 29 * 60
    assert (await client.get("/api/v1/session")).status == 200
    clock.now += 30 * 60
    assert (await client.get("/api/v1/session")).status == 401
    assert (await client.post(ROLLBACK, headers={"X-CSRF-Token": csrf})).status == 401


async def test_a_session_is_refused_12_hours_after_login(start: Start) -> None:
    clock = Clock()
    client = await start(sessions=Sessions(idle_timeout_s=24 * 3600, clock=clock))
    csrf = (await login(client))["csrf"]
    clock.now += 12 * 3600 - 1
    assert (await client.post(ROLLBACK, headers={"X-CSRF-Token": csrf})).status == 200
    clock.now += 1
    assert (await client.post(ROLLBACK, headers={"X-CSRF-Token": csrf})).status == 401


async def test_logging_in_again_ends_the_previous_session(start: Start) -> None:
    client = await start()
    jar = client.session.cookie_jar
    first = (await login(client))["csrf"]
    first_id = next(c.value for c in jar if c.key == "edge_session")
    second = (await login(client))["csrf"]
    second_id = next(c.value for c in jar if c.key == "edge_session")
    assert second != first
    assert second_id != first_id
    jar.clear()
    headers = {"Cookie": f"edge_session={first_id}", "X-CSRF-Token": first}
    assert (await client.post(ROLLBACK, headers=headers)).status == 401
    headers = {"Cookie": f"edge_session={second_id}", "X-CSRF-Token": second}
    assert (await client.post(ROLLBACK, headers=headers)).status == 200


# Secrets


async def test_no_secret_appears_in_logs_or_answers(
    start: Start, token_pair: tuple[str, str], admin_hash: str,
    caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    token, stored = token_pair
    client = await start(view="login")
    bodies = []

    async def post(path: str, **kwargs: Any) -> None:
        response = await client.post(path, **kwargs)
        bodies.append(await response.text())

    for user in ("admin", "nobody"):
        await post("/api/v1/login", json={"user": user, "password": WRONG})
    body = await login(client)
    csrf = body["csrf"]
    session_id = next(c.value for c in client.session.cookie_jar if c.key == "edge_session")
    await post(ROLLBACK, headers={"X-CSRF-Token": csrf[::-1]})
    await post(ROLLBACK, headers={"Authorization": f"Bearer {token}"})
    await post(ROLLBACK, headers={"Authorization": f"Bearer {token}x"})
    await post("/api/v1/logout", headers={"X-CSRF-Token": csrf})
    for _ in range(5):
        await post("/api/v1/login", json={"user": "admin", "password": WRONG})
    await post("/api/v1/login", json={"user": "admin", "password": PASSWORD})  # 429
    assert '"error": "too many failed logins' in bodies[-1]

    assert "failed login from 127.0.0.1 for a user who exists (a wrong password)" \
        in caplog.text
    assert "failed login from 127.0.0.1 for an unknown user" in caplog.text
    assert "nobody" not in caplog.text  # a name may be a password in the wrong field
    assert "logins from 127.0.0.1 refused for 300 s" in caplog.text
    assert "admin logged in from 127.0.0.1" in caplog.text
    salt = admin_hash.split("$")[3]
    secrets = [PASSWORD, WRONG, token, stored, stored[7:], admin_hash, salt, csrf, session_id]
    for secret in secrets:
        assert secret not in caplog.text
        assert all(secret not in b for b in bodies)


# The CLI


def test_passwd_prints_a_users_entry_to_paste() -> None:
    password = "a long enough passphrase"  # noqa: S105 (a test's)
    result = CliRunner().invoke(
        web_group, ["passwd", "--user", "op: erator"],
        input=f"short\n{password}\n{password}x\n{password}\n{password}\n")
    assert result.exit_code == 0, result.output
    assert "Error: at least 8 characters, please" in result.output
    assert "Error: The two entered values do not match." in result.output
    assert password not in result.output
    lines = result.output.splitlines()
    paste = lines[lines.index("Paste under web.users in the agent file:") + 1]
    entry = yaml.safe_load(paste)
    assert entry == [{"name": "op: erator", "password_hash": entry[0]["password_hash"]}]
    assert entry[0]["password_hash"].startswith("$scrypt$ln=15,r=8,p=3$")
    assert verify_password(password, entry[0]["password_hash"])
    assert not verify_password(password + "x", entry[0]["password_hash"])


def test_passwd_with_no_input_fails() -> None:
    result = CliRunner().invoke(web_group, ["passwd"], input="")
    assert result.exit_code != 0
    assert "Paste" not in result.output


def test_token_prints_the_token_once_and_its_entry() -> None:
    result = CliRunner().invoke(main, ["web", "token"])
    assert result.exit_code == 0, result.output
    tokens = re.findall(r"edge_[A-Za-z0-9_-]{43}", result.output)
    assert len(tokens) == 1
    lines = result.output.splitlines()
    entry = yaml.safe_load(lines[lines.index("Paste under web.tokens in the agent file:") + 1])
    assert len(entry) == 1
    assert check_token_hash(entry[0]) is None
    assert token_matches(tokens[0], entry)
    again = CliRunner().invoke(main, ["web", "token"])
    assert tokens[0] not in again.output
