"""The agent file ``edge.yaml``: node name, uplink, store, web, trust, plugins, policy.

The top-level keys are fixed by DESIGN.md §3 so that operators' files keep working;
sections are added, never renamed. Every setting has a default except ``node``.
Unknown keys are errors; integers are written as integers (``true``, ``1.0`` or
``"1"`` are not one). Relative paths are resolved against the directory of the
agent file; the files named by ``uplink`` and ``trust`` must be readable and load as
the agent will load them (:mod:`edge.config.pem`), and every ``devices`` entry must
exist. ``store``, ``web``, ``trust`` and ``plugins`` are otherwise only checked for
shape; ``policy`` (:mod:`edge.config.policy`) holds network policies, validated here,
that nothing enforces yet.

Example (every key shown with its default)::

    node: gw-01                     # required; one MQTT topic level
    devices: []                     # KubeEdge manifest files or directories
    uplink:
      host: 127.0.0.1
      port: 1883
      qos: 1                        # 0 or 1
      topic_prefix: edge/v1/{node}
      client_id: null               # null = edge-{node}
      keepalive: 30                 # seconds
      tls: {ca: null, cert: null, key: null}
      username: null
      password_file: null
    store: {path: /var/lib/edge/edge.db, max_bytes: 268435456, ttl: 7d}
    web: {listen: 127.0.0.1:8080}
    trust: {keys: []}
    plugins: {dir: ./plugins}
    policy: {mode: audit, policies: [], failsafe: {}}   # see edge.config.policy
    modbus: {backoff_initial_ms: 500, backoff_max_ms: 30000, connect_timeout_ms: 3000}
    log: {level: info}              # debug | info | warning | error
"""

from __future__ import annotations

import os
import re
import unicodedata
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Literal

from pydantic import (
    AfterValidator,
    BeforeValidator,
    Field,
    ValidationError,
    ValidationInfo,
    ValidatorFunctionWrapHandler,
    WrapValidator,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticKnownError

from edge.config.hosts import host_error
from edge.config.pem import ca_error, cert_error, ed25519_key_error, key_error
from edge.config.policy import PolicyConfig
from edge.config.section import ConfigPath, _error, _Section
from edge.config.sources import Report, Where, special_file

_MQTT_STRING_BYTES = 65_535
"""The longest UTF-8 string MQTT carries (a 16-bit length)."""
_CLIENT_ID_ACCEPTED_BYTES = 23
_DURATION_PART = re.compile(r"(\d+)([dhms])")
_SECONDS_PER_UNIT = {"d": 86_400, "h": 3_600, "m": 60, "s": 1}


def _unreadable(path: Path) -> str | None:
    """Why ``path`` is not a readable regular file; None when it is one."""
    if not path.exists():
        return "no such file"
    if path.is_dir():
        return "is a directory, not a file"
    kind = special_file(path)
    if kind is not None:
        return f"is not a regular file ({kind})"
    try:
        with path.open("rb"):
            return None
    except OSError as err:
        return f"cannot read: {err.strerror}"


def _readable_file(value: Path) -> Path:
    problem = _unreadable(value)
    if problem is not None:
        raise _error(f"{os.path.abspath(value)}: {problem}")
    return value


ConfigFile = Annotated[ConfigPath, AfterValidator(_readable_file)]
"""A :data:`ConfigPath` to a file that must be readable; otherwise the error names
the absolute path: ``/etc/edge/ca.pem: no such file``."""


def _loadable(check: Callable[[Path], str | None]) -> AfterValidator:
    """A validator of a readable file: ``check`` says what is wrong with its content."""

    def validate(value: Path) -> Path:
        problem = check(value)
        if problem is not None:
            raise _error(f"{os.path.abspath(value)}: {problem}")
        return value

    return AfterValidator(validate)


CaFile = Annotated[ConfigFile, _loadable(ca_error)]
"""A :data:`ConfigFile` of PEM CA certificates, as ``ssl`` loads them."""
CertFile = Annotated[ConfigFile, _loadable(cert_error)]
"""A :data:`ConfigFile` holding a PEM certificate."""
TrustKey = Annotated[ConfigFile, _loadable(ed25519_key_error)]
"""A :data:`ConfigFile` holding an Ed25519 public key in PEM."""


def _existing_path(value: object, handler: ValidatorFunctionWrapHandler) -> Path:
    path: Path = handler(value)
    if not path.exists():
        raise _error(f"{value}: no such file or directory ({os.path.abspath(path)})")
    kind = special_file(path)
    if kind is not None:
        raise _error(
            f"{value}: is not a regular file or directory but {kind} ({os.path.abspath(path)})"
        )
    return path


ExistingPath = Annotated[ConfigPath, WrapValidator(_existing_path)]
"""A :data:`ConfigPath` to a regular file or a directory; otherwise the error gives the
path as written and as resolved: ``./manifests: no such file or directory
(/etc/edge/manifests)``."""


def _directory(path: Path) -> Path:
    if not path.is_dir():
        raise _error(f"{path}: is not a directory (profiles are directories of profile "
                     "files, *.yaml or *.yml)")
    return path


ExistingDirectory = Annotated[ExistingPath, AfterValidator(_directory)]
"""An :data:`ExistingPath` that is a directory."""


def _duration_seconds(value: object) -> object:
    if not isinstance(value, str):
        return value
    text = value.replace(" ", "")
    if text.isdigit():
        return int(text)
    parts = _DURATION_PART.findall(text)
    if not parts or "".join(n + u for n, u in parts) != text:
        raise ValueError(
            f"{value!r} is not a duration; use e.g. 7d, 12h, 30m, 45s, 1h30m or seconds"
        )
    return sum(int(n) * _SECONDS_PER_UNIT[u] for n, u in parts)


Duration = Annotated[int, BeforeValidator(_duration_seconds), Field(gt=0, strict=True)]
"""Seconds, written as a number or as ``7d`` / ``12h`` / ``30m`` / ``45s`` (combinable)."""


def _control_characters(value: str) -> str:
    """The control characters (NUL included) in ``value``, each once, as ``'\\x00'``
    …; empty when there are none. MQTT forbids NUL in strings and discourages the others
    (MQTT 3.1.1 §1.5.3)."""
    found = dict.fromkeys(c for c in value if unicodedata.category(c) == "Cc")
    return " ".join(map(repr, found))


def _topic_level(value: str) -> str:
    if not value:
        raise ValueError("must not be empty")
    bad = [c for c in "/+#" if c in value]
    if bad:
        raise ValueError(f"must be one MQTT topic level, without {' '.join(map(repr, bad))}")
    control = _control_characters(value)
    if control:
        raise ValueError(f"must not hold control characters: {control}")
    return value


def _publish_topic(value: str) -> str:
    if not value or "+" in value or "#" in value:
        raise ValueError("must be a non-empty MQTT topic without the wildcards + and #")
    control = _control_characters(value)
    if control:
        raise ValueError(f"must not hold control characters: {control}")
    if "" in value.split("/"):
        raise ValueError("must not have an empty topic level: no leading or trailing '/', no '//'")
    if value.startswith("$"):
        raise ValueError(
            "must not start with '$': brokers reserve such topics ($SYS) and drop what "
            "clients publish to them"
        )
    if "{" in value.replace("{node}", "") or "}" in value.replace("{node}", ""):
        raise ValueError("holds '{' or '}' besides {node}, the only placeholder (a typo?)")
    return value


def _client_id(value: str) -> str:
    control = _control_characters(value)
    if control:
        raise ValueError(f"must not hold control characters: {control}")
    size = len(value.encode())
    if size > _MQTT_STRING_BYTES:
        raise _error(
            f"is {size} bytes long (UTF-8), more than the {_MQTT_STRING_BYTES} an MQTT "
            "string can hold (MQTT 3.1.1 §1.5.3)"
        )
    return value


def _host(value: str) -> str:
    problem = host_error("host", value)
    if problem:
        raise ValueError(problem)
    return value


def _listen_address(value: str) -> str:
    host, sep, port = value.rpartition(":")
    if not (sep and host and port.isdigit() and 0 < int(port) < 65536):
        raise ValueError("must be host:port, e.g. 127.0.0.1:8080 or [::1]:8080")
    problem = host_error("the host", host.strip("[]"))
    if problem:
        raise ValueError(f"must be host:port with an IP address or host name: {problem}")
    return value


def _no_bool_or_float(value: object) -> object:
    """Reject ``true`` and ``1.0`` where an integer choice is expected, as strict ints do."""
    if isinstance(value, bool | float):
        raise PydanticKnownError("int_type")
    return value


def _as_list(value: object) -> object:
    return [value] if isinstance(value, str) else value


class TlsConfig(_Section):
    """``uplink.tls``: CA bundle to verify the broker, client certificate and key for
    mTLS (PEM files, readable). ``cert`` and ``key`` are given together or not at all.
    Each is loaded with :mod:`ssl` as the agent will load it: the key must be
    unencrypted and match the certificate."""

    ca: CaFile | None = None
    cert: CertFile | None = None
    key: ConfigFile | None = None

    @field_validator("key")
    @classmethod
    def _key_of_cert(cls, key: Path | None, info: ValidationInfo) -> Path | None:
        cert = info.data.get("cert")
        if key is not None and cert is not None:
            problem = key_error(cert, key)
            if problem is not None:
                raise _error(f"{os.path.abspath(key)}: {problem}")
        return key

    @model_validator(mode="after")
    def _cert_with_key(self) -> TlsConfig:
        if (self.cert is None) != (self.key is None):
            raise ValueError("cert and key go together: give both or neither")
        return self

    @property
    def enabled(self) -> bool:
        """True when any TLS setting is given (the connection then uses TLS)."""
        return any(p is not None for p in (self.ca, self.cert, self.key))


class UplinkConfig(_Section):
    """``uplink``: the MQTT broker readings are published to (DESIGN.md §5).

    ``qos`` is 0 or 1; ``keepalive`` is seconds; ``topic_prefix`` is an MQTT topic
    that may contain ``{node}`` (no other placeholder), without wildcards, control
    characters, empty levels or a leading ``$``; ``client_id`` None means
    ``edge-{node}``, otherwise it holds no control characters and at most 65535 bytes
    (more than 23 is a warning: brokers need not accept them); ``password_file``
    (readable) holds the password (first line) so that it stays out of the agent file.
    ``reconnect_max_ms`` caps the delay between reconnect attempts (they start at a
    quarter second and double). ``inflight`` caps the messages published and not yet
    acknowledged; ``rate`` caps
    messages per second of a backlog's drain after an outage; ``order`` ``device``
    keeps each device's readings in order (a live reading waits for its own device's
    unsent older ones), ``live`` sends live readings at once, before their device's
    backlog (consumers order by ``seq``).
    """

    host: Annotated[str, AfterValidator(_host)] = "127.0.0.1"
    port: int = Field(default=1883, ge=1, le=65535, strict=True)
    qos: Annotated[Literal[0, 1], BeforeValidator(_no_bool_or_float)] = 1
    topic_prefix: Annotated[str, AfterValidator(_publish_topic)] = "edge/v1/{node}"
    client_id: Annotated[str, Field(min_length=1), AfterValidator(_client_id)] | None = None
    keepalive: int = Field(default=30, ge=1, le=65535, strict=True)
    tls: TlsConfig = TlsConfig()
    username: str | None = None
    password_file: ConfigFile | None = None
    reconnect_max_ms: int = Field(default=1000, ge=100, le=3_600_000, strict=True)
    inflight: int = Field(default=100, ge=1, le=65_535, strict=True)
    rate: float = Field(default=2500.0, gt=0, le=1_000_000)
    order: Literal["device", "live"] = "device"


class StoreConfig(_Section):
    """``store``: the SQLite outbox (see :mod:`edge.store.outbox`).

    ``path`` is the file (its directory is made if missing); ``max_bytes`` caps the
    bytes of the stored messages (topic + payload; at least 64 KiB); ``ttl`` is how long
    an unsent message is kept (seconds, or ``30s``/``15m``/``12h``/``7d``); ``drop``
    says what goes when ``max_bytes`` is reached (``oldest`` stored first, or the
    ``newest``); ``synchronous`` is ``full`` (every commit fsynced: survives a power
    cut) or ``normal`` (survives a killed agent, may lose the last commits on a power
    cut; fewer writes to flash).
    """

    path: ConfigPath = Path("/var/lib/edge/edge.db")
    max_bytes: int = Field(default=268_435_456, ge=65_536, strict=True)
    ttl: Duration = 7 * 86_400
    drop: Literal["oldest", "newest"] = "oldest"
    synchronous: Literal["full", "normal"] = "full"


def _password_hash(value: str) -> str:
    """A scrypt PHC string as :func:`edge.web.auth.hash_password` makes it; the message
    never repeats the value (it may be a password)."""
    from edge.web.auth import check_password_hash  # noqa: PLC0415 (aiohttp: only if used)

    problem = check_password_hash(value)
    if problem:
        raise _error(f"must be a scrypt hash as `edge web passwd` prints it "
                     f"($scrypt$ln=…,r=…,p=…$salt$hash), never the password itself: {problem}")
    return value


def _token_hash(value: str) -> str:
    """A token's stored form; the message never repeats the value (it may be a token)."""
    from edge.web.auth import check_token_hash  # noqa: PLC0415 (aiohttp: only if used)

    if check_token_hash(value):
        raise _error("must be sha256:<64 hex digits> as `edge web token` prints it, never "
                     "the token itself")
    return value


class WebTls(_Section):
    """``web.tls``: serve HTTPS with this certificate chain and key (PEM files)."""

    cert: ExistingPath
    key: ExistingPath


class WebUser(_Section):
    """One ``web.users`` entry: who may log in to change things."""

    name: Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9._@-]+$")]
    password_hash: Annotated[str, AfterValidator(_password_hash)]


def _unique_users(users: list[WebUser]) -> list[WebUser]:
    names = [u.name for u in users]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise _error(f"user {twice[0]!r} is listed more than once")  # no hashes echoed
    return users


class WebConfig(_Section):
    """``web``: the local status page, REST API and /metrics (:mod:`edge.web`).

    ``listen`` is ``host:port``; ``enabled: false`` runs no web server. ``tls`` makes it
    HTTPS. ``users`` may log in (scrypt hashes), ``tokens`` are the SHA-256 of API
    bearer tokens. ``view``: who may look without logging in: ``local`` (clients on
    loopback) or ``login`` (nobody). Changing anything always needs a login or a token.
    """

    enabled: bool = True
    listen: Annotated[str, AfterValidator(_listen_address)] = "127.0.0.1:8080"
    tls: WebTls | None = None
    users: Annotated[list[WebUser], AfterValidator(_unique_users)] = Field(default_factory=list)
    tokens: list[Annotated[str, AfterValidator(_token_hash)]] = Field(default_factory=list)
    view: Literal["local", "login"] = "local"


class TrustConfig(_Section):
    """``trust``: Ed25519 public keys (PEM files) trusted for bundles and plugins."""

    keys: list[TrustKey] = Field(default_factory=list)


class PluginsConfig(_Section):
    """``plugins``: the directory of WASM plugins and their manifests."""

    dir: ConfigPath = Path("plugins")


class ModbusConfig(_Section):
    """``modbus``: connection behaviour shared by every endpoint, in milliseconds.

    Reconnects back off exponentially (with jitter) from ``backoff_initial_ms`` to
    ``backoff_max_ms``; ``connect_timeout_ms`` bounds one TCP connect or serial open.
    A device's circuit breaker opens after ``breaker_failures`` cycles in a row without
    an answer; it then lets one probe cycle through after a delay doubling (with
    jitter) from ``probe_initial_ms`` to ``probe_max_ms``.
    """

    backoff_initial_ms: int = Field(default=500, gt=0, strict=True)
    backoff_max_ms: int = Field(default=30_000, gt=0, strict=True)
    connect_timeout_ms: int = Field(default=3_000, gt=0, strict=True)
    breaker_failures: int = Field(default=3, ge=1, le=1000, strict=True)
    probe_initial_ms: int = Field(default=1_000, gt=0, strict=True)
    probe_max_ms: int = Field(default=60_000, gt=0, strict=True)

    @model_validator(mode="after")
    def _backoff_order(self) -> ModbusConfig:
        if self.backoff_initial_ms > self.backoff_max_ms:
            raise ValueError("backoff_initial_ms must not be greater than backoff_max_ms")
        if self.probe_initial_ms > self.probe_max_ms:
            raise ValueError("probe_initial_ms must not be greater than probe_max_ms")
        return self


def _lower(value: object) -> object:
    return value.lower() if isinstance(value, str) else value


class SyncConfig(_Section):
    """``sync``: desired bundles from the control plane (see :mod:`edge.sync.controller`).

    ``health_window`` is how long a newly applied configuration is watched before it
    is committed or rolled back (seconds, or ``30s``/``2m``).
    """

    health_window: Duration = 30


class LogConfig(_Section):
    """``log``: the log level, in any case (``INFO`` is ``info``)."""

    level: Annotated[Literal["debug", "info", "warning", "error"], BeforeValidator(_lower)] = "info"


def _release_version(value: str) -> str:
    from packaging.version import InvalidVersion, Version  # noqa: PLC0415

    try:
        Version(value)
    except InvalidVersion:
        raise ValueError(f"{value!r} is not a PEP 440 version (e.g. 0.2.0)") from None
    if "/" in value or value.startswith("."):
        raise ValueError(f"{value!r} cannot name a release directory")
    return value


def _release_url(value: str) -> str:
    scheme = value.partition(":")[0].lower()
    if scheme not in ("http", "https", "file") or "://" not in value:
        raise ValueError("must be an http://, https:// or file:// URL")
    return value


class ReleaseConfig(_Section):
    """``release`` (only in a desired bundle's ``agent``): the agent release this
    gateway is to run. ``version`` (PEP 440) names it; ``url`` (http, https, file) is
    its archive (:mod:`edge.release.slots`), ``size`` its length in bytes and
    ``sha256`` its digest (64 lowercase hex digits), which the bundle's signature
    covers. A version other than the running one is installed beside it and run on
    trial for the health window (:mod:`edge.sync.controller`)."""

    version: Annotated[str, AfterValidator(_release_version)]
    url: Annotated[str, AfterValidator(_release_url)]
    sha256: Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
    size: int = Field(gt=0, le=1 << 30, strict=True)


class AgentFile(_Section):
    """The whole agent file (DESIGN.md §3). Only ``node`` is required.

    ``node`` names the gateway: one MQTT topic level (no ``/``, ``+``, ``#``, control
    characters), also matched against a Device's ``spec.nodeName``. ``devices`` lists
    KubeEdge manifest files or directories (a single string is one entry); each must
    exist. ``profiles`` lists directories of firmware profiles of one's own
    (:mod:`edge.profiles.profile`), named by Devices like the shipped ones.
    """

    node: Annotated[str, AfterValidator(_topic_level)]
    devices: Annotated[list[ExistingPath], BeforeValidator(_as_list)] = Field(default_factory=list)
    profiles: Annotated[list[ExistingDirectory], BeforeValidator(_as_list)] = Field(
        default_factory=list)
    uplink: UplinkConfig = UplinkConfig()
    store: StoreConfig = StoreConfig()
    web: WebConfig = WebConfig()
    trust: TrustConfig = TrustConfig()
    plugins: PluginsConfig = PluginsConfig()
    policy: PolicyConfig = PolicyConfig()
    modbus: ModbusConfig = ModbusConfig()
    sync: SyncConfig = SyncConfig()
    log: LogConfig = LogConfig()
    release: ReleaseConfig | None = None

    @property
    def topic_prefix(self) -> str:
        """``uplink.topic_prefix`` with ``{node}`` filled in, e.g. ``edge/v1/gw-01``."""
        return self.uplink.topic_prefix.replace("{node}", self.node)

    @property
    def client_id(self) -> str:
        """The MQTT client id: ``uplink.client_id`` or ``edge-{node}``."""
        return self.uplink.client_id or f"edge-{self.node}"


def parse_agent(data: object, *, file: str, base_dir: Path, report: Report) -> AgentFile | None:
    """Validate the parsed YAML of an agent file.

    Relative paths are resolved against ``base_dir``. Problems (field paths like
    ``uplink.port``) go to ``report`` against ``file``; returns None if there are errors.
    """
    where = Where(file)
    if not isinstance(data, dict):
        got = "empty" if data is None else f"a {type(data).__name__}"
        report.error(
            where, "", f"must be a mapping of settings (node is required), but it is {got}"
        )
        return None
    try:
        agent = AgentFile.model_validate(data, context={"base_dir": base_dir})
    except ValidationError as err:
        report.validation_error(err, where, "", model=AgentFile)
        return None
    client_id = agent.uplink.client_id
    if client_id is not None and len(client_id.encode()) > _CLIENT_ID_ACCEPTED_BYTES:
        report.warning(
            where,
            "uplink.client_id",
            f"is {len(client_id.encode())} bytes long: MQTT 3.1.1 servers need only accept "
            f"client ids of 1 to {_CLIENT_ID_ACCEPTED_BYTES} bytes (§3.1.3.1), so a broker "
            "may refuse it; most accept longer ones",
        )
    return agent
