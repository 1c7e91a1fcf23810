"""The configuration the running agent holds, validated in a short-lived child process.

Parsing and validating (PyYAML, pydantic and the KubeEdge loaders: about 14 MB
resident, measured with ``ru_maxrss``) never enter the agent's long-lived process.
:func:`load_runtime_config` forks a child that loads and checks everything, sends
back the result as plain dataclasses (pickled over a pipe) and exits. An input
that makes validation blow up — a YAML alias bomb, a pathological manifest — costs
the child (bounded by ``RLIMIT_AS`` and a deadline), never the agent.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import resource
import select
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from edge.config.errors import ConfigError, Problem
from edge.config.model import DeviceSpec
from edge.policy.spec import PolicySettings
from edge.release.spec import ReleaseSpec
from edge.uplink.settings import BrokerSettings, ForwardSettings
from edge.wasm.spec import PluginSpec

if TYPE_CHECKING:  # the validation libraries stay in the child
    from edge.config.agent import WebConfig

CHILD_MEMORY_LIMIT = 1 << 30  # bytes of address space the validating child may add
CHILD_TIMEOUT_S = 60.0


@dataclass(frozen=True, slots=True)
class ModbusTiming:
    """Reconnect backoff and connect timeout for every Modbus endpoint, and every
    device's circuit breaker (failed cycles to open it, probe delays); seconds."""

    backoff_initial_s: float
    backoff_max_s: float
    connect_timeout_s: float
    breaker_failures: int
    probe_initial_s: float
    probe_max_s: float


@dataclass(frozen=True, slots=True)
class StoreSettings:
    """The outbox file and its bounds: ``max_bytes`` of messages, ``ttl_ms``;
    ``drop`` ``oldest|newest``; ``synchronous`` ``full|normal``."""

    path: Path
    max_bytes: int
    ttl_ms: int
    drop: str
    synchronous: str


@dataclass(frozen=True, slots=True)
class WebSettings:
    """The web server (:mod:`edge.web`): ``enabled``, ``host``/``port``, ``tls`` as
    ``(cert, key)`` paths or None, ``users`` as ``(name, scrypt PHC hash)`` pairs,
    ``tokens`` (``sha256:<hex>`` of API bearer tokens), ``view`` ``local|login``."""

    enabled: bool = False
    host: str = "127.0.0.1"
    port: int = 8080
    tls: tuple[Path, Path] | None = None
    users: tuple[tuple[str, str], ...] = ()
    tokens: tuple[str, ...] = ()
    view: Literal["local", "login"] = "local"


@dataclass(frozen=True, slots=True)
class RuntimeConfig:
    """What ``edge run`` needs, free of the validation libraries.

    ``version`` is a content hash of the agent file and every manifest it loaded
    (``sha256:`` + 12 hex digits); ``broker`` carries the uplink password read from
    ``password_file`` (kept in memory only). ``bundle_version`` is the desired bundle
    applied on top of the agent file (0: none) and ``bundle`` its content. ``plugins``
    run in that order (:mod:`edge.wasm`), their compiled modules cached in
    ``plugin_cache``; ``plugin_dir`` is where their manifests are watched (None when
    they come from the bundle). ``policy`` is the network policy (:mod:`edge.policy`).
    """

    node: str
    topic_prefix: str
    qos: int
    broker: BrokerSettings
    modbus: ModbusTiming
    store: StoreSettings
    forward: ForwardSettings
    log_level: str
    health_window_s: float
    devices: tuple[DeviceSpec, ...]
    warnings: tuple[Problem, ...]
    files: tuple[str, ...]
    version: str
    bundle_version: int = 0
    bundle: Mapping[str, Any] | None = field(default=None, repr=False)
    web: WebSettings = field(default_factory=WebSettings)
    plugins: tuple[PluginSpec, ...] = ()
    plugin_cache: Path | None = None
    plugin_dir: Path | None = None
    policy: PolicySettings = field(default_factory=PolicySettings)
    release: ReleaseSpec | None = None


@dataclass(frozen=True, slots=True)
class BundleSource:
    """A desired bundle to apply on top of the agent file: ``token`` as it came off the
    wire (verified in the child against the agent file's ``trust.keys``, for a version
    above ``running_version``), or the ``content`` of one verified before (from the
    history)."""

    token: bytes | None = None
    content: Mapping[str, Any] | None = None
    running_version: int = 0


class BundleRefusedError(ConfigError):
    """A bundle that failed verification: ``reason`` (see
    :data:`edge.sync.bundle.Reason`) and the ``version`` it claims (None if unknown)."""

    def __init__(self, reason: str, message: str, version: int | None) -> None:
        super().__init__([Problem("desired bundle", None, None, "", message)])
        self.reason = reason
        self.version = version


def _version(agent_file: Path, files: tuple[str, ...],
             bundle: Mapping[str, Any] | None = None,
             plugins: tuple[PluginSpec, ...] = (),
             policy: PolicySettings | None = None) -> str:
    """``sha256:`` and 12 hex digits over the files, the plugins, the policies (their
    mode and rules; not the failsafe addresses resolved at load time, which may change
    from one load to the next) and the bundle; what is empty adds nothing."""
    h = hashlib.sha256()
    for name in (str(agent_file), *sorted(files)):
        h.update(Path(name).read_bytes())
    if plugins:
        h.update(repr(plugins).encode())
    if policy is not None and policy.policies:
        h.update(repr((policy.mode, policy.policies)).encode())
    if bundle is not None:
        h.update(json.dumps(bundle, sort_keys=True, separators=(",", ":")).encode())
    return "sha256:" + h.hexdigest()[:12]


def _verified_content(path: Path, source: BundleSource) -> Mapping[str, Any]:
    """The content of ``source``, its token verified first (only ever in the child)."""
    if source.token is None:
        if source.content is None:
            raise ValueError("a BundleSource needs a token or a content")
        return source.content
    from edge.config.load import load_agent_file  # noqa: PLC0415
    from edge.sync.bundle import BundleError, load_public_key, verify  # noqa: PLC0415

    agent = load_agent_file(path)
    keys = [load_public_key(Path(k).read_bytes(), where=str(k)) for k in agent.trust.keys]
    try:
        bundle = verify(source.token, keys, node=agent.node, now=datetime.now(UTC),
                        running_version=source.running_version)
    except BundleError as e:
        raise BundleRefusedError(e.reason, str(e), e.version) from e
    return bundle.content


def build_runtime_config(path: Path, source: BundleSource | None = None) -> RuntimeConfig:
    """Load and validate ``path`` (with ``source`` applied on top) in this process.

    Raises:
        BundleRefusedError: the bundle's token did not verify.
        ConfigError: every problem of the agent file and the manifests or bundle.
    """
    from edge.config.load import load_bundle_config, load_config  # noqa: PLC0415 (child only)
    from edge.config.plugins import plugin_cache_dir  # noqa: PLC0415

    content = _verified_content(path, source) if source is not None else None
    cfg = load_config(path) if content is None else load_bundle_config(path, content)
    agent, up = cfg.agent, cfg.agent.uplink
    password = None
    if up.password_file:
        try:
            password = Path(up.password_file).read_text(encoding="utf-8").strip()
        except OSError as e:
            raise ConfigError([Problem(str(path), None, None, "uplink.password_file",
                                       f"cannot read {up.password_file}: {e.strerror}")]) from e
    return RuntimeConfig(
        node=agent.node,
        topic_prefix=agent.topic_prefix,
        qos=up.qos,
        broker=BrokerSettings(
            host=up.host,
            port=up.port,
            client_id=agent.client_id,
            keepalive=up.keepalive,
            ca=str(up.tls.ca) if up.tls.ca else None,
            cert=str(up.tls.cert) if up.tls.cert else None,
            key=str(up.tls.key) if up.tls.key else None,
            username=up.username,
            password=password,
            reconnect_min_s=min(0.25, up.reconnect_max_ms / 1000.0),
            reconnect_max_s=up.reconnect_max_ms / 1000.0,
            max_inflight=up.inflight,
        ),
        modbus=ModbusTiming(
            backoff_initial_s=agent.modbus.backoff_initial_ms / 1000.0,
            backoff_max_s=agent.modbus.backoff_max_ms / 1000.0,
            connect_timeout_s=agent.modbus.connect_timeout_ms / 1000.0,
            breaker_failures=agent.modbus.breaker_failures,
            probe_initial_s=agent.modbus.probe_initial_ms / 1000.0,
            probe_max_s=agent.modbus.probe_max_ms / 1000.0,
        ),
        store=StoreSettings(
            path=agent.store.path,
            max_bytes=agent.store.max_bytes,
            ttl_ms=agent.store.ttl * 1000,
            drop=agent.store.drop,
            synchronous=agent.store.synchronous,
        ),
        forward=ForwardSettings(inflight=up.inflight, rate=up.rate, order=up.order),
        log_level=agent.log.level,
        health_window_s=float(agent.sync.health_window),
        devices=cfg.devices,
        warnings=cfg.warnings,
        files=cfg.files,
        version=_version(path, cfg.files, content, cfg.plugins, cfg.policy),
        bundle_version=int(content["version"]) if content is not None else 0,
        bundle=content,
        web=_web_settings(agent.web),
        plugins=cfg.plugins,
        plugin_cache=plugin_cache_dir(agent.store.path),
        plugin_dir=agent.plugins.dir if content is None else None,
        policy=cfg.policy,
        release=ReleaseSpec(agent.release.version, agent.release.url, agent.release.sha256,
                            agent.release.size) if agent.release else None,
    )


def _web_settings(web: WebConfig) -> WebSettings:
    host, _, port = web.listen.rpartition(":")
    return WebSettings(
        enabled=web.enabled,
        host=host.strip("[]"),
        port=int(port),
        tls=(web.tls.cert, web.tls.key) if web.tls else None,
        users=tuple((u.name, u.password_hash) for u in web.users),
        tokens=tuple(web.tokens),
        view=web.view,
    )


def _validate(path: Path, source: BundleSource | None) -> object:
    """In the child: a RuntimeConfig, a list of problems, or ("refused", reason,
    message, version) — plain values that pickle."""
    try:
        return build_runtime_config(path, source)
    except BundleRefusedError as e:
        return ("refused", e.reason, e.problems[0].message, e.version)
    except ConfigError as e:
        return e.problems
    except MemoryError:
        return [Problem(str(path), None, None, "", "validating it ran out of memory")]


def _child(target: Callable[[], object], out: int, memory_limit: int) -> None:
    """Runs in the forked child: call ``target``, write the pickled outcome, never
    return (the exit status says whether it got that far)."""
    status = 0
    try:
        # on top of what the agent had mapped (a WASM plugin's store reserves GiBs of
        # address space it never touches)
        with open("/proc/self/statm", "rb") as f:
            mapped = int(f.read().split()[0]) * resource.getpagesize()
        limit = mapped + memory_limit
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
        try:
            outcome = target()
        except MemoryError:
            outcome = None
        data = pickle.dumps(outcome, protocol=pickle.HIGHEST_PROTOCOL)
        view = memoryview(data)
        while view:
            view = view[os.write(out, view):]
    except BaseException:  # report through the exit status, never return
        status = 1
    finally:
        os._exit(status)


class ChildCall:
    """``target()`` running in a forked child that may map ``memory_limit`` bytes of
    address space beyond what it inherited, for ``timeout_s`` seconds; :meth:`outcome`
    waits for its return value, which must pickle. Whatever ``target`` imports stays in the child.

    Start it early: the caller can import and prepare meanwhile (two cores on a
    typical gateway).
    """

    def __init__(
        self,
        target: Callable[[], object],
        *,
        label: str,
        timeout_s: float = CHILD_TIMEOUT_S,
        memory_limit: int = CHILD_MEMORY_LIMIT,
    ) -> None:
        self.label = label
        self._timeout_s = timeout_s
        self._deadline = time.monotonic() + timeout_s
        self._read_fd, write_fd = os.pipe()
        self._pid = os.fork()
        if self._pid == 0:  # pragma: no cover (the child always leaves through os._exit)
            os.close(self._read_fd)
            _child(target, write_fd, memory_limit)
        os.close(write_fd)

    def outcome(self) -> object:
        """What ``target`` returned.

        Raises:
            ConfigError: one problem (against ``label``) when the child took longer
                than its time, crashed, or ran out of memory.
        """
        read_fd = self._read_fd
        chunks: list[bytes] = []
        try:
            while True:
                left = self._deadline - time.monotonic()
                if left <= 0 or not select.select([read_fd], [], [], left)[0]:
                    os.kill(self._pid, 9)
                    raise ConfigError([Problem(self.label, None, None, "", "validation took "
                                               f"longer than {self._timeout_s:.0f} s")])
                chunk = os.read(read_fd, 1 << 16)
                if not chunk:
                    break
                chunks.append(chunk)
        finally:
            os.close(read_fd)
            _, status = os.waitpid(self._pid, 0)
        outcome = pickle.loads(b"".join(chunks)) if status == 0 and chunks else None  # noqa: S301
        if outcome is None:
            why = ("ran out of memory" if status == 0 and chunks
                   else f"failed unexpectedly (child status {status})")
            raise ConfigError([Problem(self.label, None, None, "", f"validation {why}")])
        return outcome


class PendingConfig:
    """A validation running in a forked child (:class:`ChildCall`); :meth:`result`
    waits for it."""

    def __init__(
        self,
        path: Path,
        *,
        source: BundleSource | None = None,
        timeout_s: float = CHILD_TIMEOUT_S,
        memory_limit: int = CHILD_MEMORY_LIMIT,
    ) -> None:
        self.path = path
        self._call = ChildCall(lambda: _validate(path, source), label=str(path),
                               timeout_s=timeout_s, memory_limit=memory_limit)

    def result(self) -> RuntimeConfig:
        """The validated configuration.

        Raises:
            BundleRefusedError: the source's bundle did not verify.
            ConfigError: every problem found; also when validation crashed, ran out of
                memory or time (then one problem says so).
        """
        outcome = self._call.outcome()
        if isinstance(outcome, RuntimeConfig):
            return outcome
        if isinstance(outcome, tuple):
            _, reason, message, version = outcome
            raise BundleRefusedError(reason, message, version)
        if isinstance(outcome, list):
            raise ConfigError(outcome)
        raise ConfigError([Problem(str(self.path), None, None, "",
                                   f"validation returned {type(outcome).__name__}")])


def load_runtime_config(
    path: str | Path,
    *,
    source: BundleSource | None = None,
    timeout_s: float = CHILD_TIMEOUT_S,
    memory_limit: int = CHILD_MEMORY_LIMIT,
) -> RuntimeConfig:
    """Validate ``path`` (with ``source`` applied on top) in a forked child and return
    what the agent needs.

    The child may map ``memory_limit`` bytes of address space beyond what it inherits,
    and take ``timeout_s`` seconds.

    Raises:
        ConfigError: as :meth:`PendingConfig.result`. Nothing is started.
    """
    return PendingConfig(Path(path), source=source, timeout_s=timeout_s,
                         memory_limit=memory_limit).result()
