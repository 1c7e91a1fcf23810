"""Plugin manifests: validated, hashed, signature-checked and compiled (child only).

A manifest (plugins/README.md) is a YAML or JSON file in the agent file's
``plugins.dir`` (run in file-name order: ``10-units.yaml`` before ``20-derive.yaml``),
or an entry of a desired bundle's ``plugins`` (run in list order), where the module
travels inline as ``module`` (base64) instead of a ``wasm`` path and is kept under
``<store dir>/plugins/<sha256>.wasm``.

A module must hash to ``sha256``. When the agent file trusts keys (``trust.keys``),
``signature`` is required: Ed25519 (RFC 8032) over :func:`statement`, base64url,
made with any trusted key (``edge plugin sign``). The module is compiled here (which
also fills the compiled-module cache the agent loads from) and its imports and
exports checked against the manifest's capabilities.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any, Final, Literal

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from pydantic import AfterValidator, Field, ValidationError

from edge.config.agent import AgentFile, Duration
from edge.config.section import _error, _Section
from edge.config.sources import Report, Where, read_yaml_file
from edge.wasm.spec import (
    CAPABILITIES,
    HOOKS,
    MAX_MEMORY_PAGES,
    MAX_TIMEOUT_MS,
    ModuleFileError,
    PluginSpec,
    manifest_files,
    read_module,
)

MAX_CONFIG_BYTES: Final = 64 * 1024


def _unique(values: list[str]) -> list[str]:
    if len(set(values)) != len(values):
        raise _error("lists a value more than once")
    return values


def _config_size(value: dict[str, Any]) -> dict[str, Any]:
    try:
        text = json.dumps(value, allow_nan=False)
    except TypeError as e:  # a YAML date, binary or set
        raise _error(f"must be plain JSON (strings, numbers, booleans, null, lists, "
                     f"mappings): {e}") from e
    except ValueError as e:
        raise _error("must be plain JSON: .nan and .inf are no JSON numbers") from e
    if len(text) > MAX_CONFIG_BYTES:
        raise _error(f"is larger than {MAX_CONFIG_BYTES} bytes as JSON")
    return value


class Limits(_Section):
    """``limits``: linear memory in 64 KiB pages, wall time of one call in ms."""

    memory_pages: int = Field(default=16, ge=1, le=MAX_MEMORY_PAGES, strict=True)
    timeout_ms: int = Field(default=20, ge=1, le=MAX_TIMEOUT_MS, strict=True)


class Quarantine(_Section):
    """``quarantine``: ``failures`` within ``window`` (seconds, or ``1m``) quarantine it."""

    failures: int = Field(default=5, ge=1, le=1000, strict=True)
    window: Duration = 60


class Manifest(_Section):
    """One plugin manifest; exactly one of ``wasm`` (a path, relative to the manifest)
    and ``module`` (base64, in a bundle) says where the module is."""

    name: Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9_-]{0,62}$")]
    version: Annotated[str, Field(pattern=r"^[0-9A-Za-z][0-9A-Za-z.+_-]{0,63}$")]
    wasm: str | None = None
    module: str | None = None
    sha256: Annotated[str | None, Field(pattern=r"^[0-9a-f]{64}$")] = None
    signature: str | None = None
    hooks: Annotated[list[Literal[HOOKS]],  # type: ignore[valid-type]
                     AfterValidator(_unique)] = Field(default_factory=lambda: ["readings"],
                                                      min_length=1)
    devices: list[Annotated[str, Field(min_length=1)]] = Field(
        default_factory=lambda: ["*"], min_length=1)
    capabilities: Annotated[list[Literal[tuple(CAPABILITIES)]],  # type: ignore[valid-type]
                            AfterValidator(_unique)] = Field(default_factory=list)
    limits: Limits = Limits()
    on_failure: Literal["pass", "drop"] = "pass"
    quarantine: Quarantine = Quarantine()
    config: Annotated[dict[str, Any], AfterValidator(_config_size)] = Field(
        default_factory=dict)


def statement(name: str, version: str, sha256: str, capabilities: Sequence[str]) -> bytes:
    """What a plugin signature signs: the canonical JSON (sorted keys, no spaces) of
    ``{"capabilities": [sorted], "name", "sha256", "version"}`` — the code and what it
    is granted; where it runs and its config stay the operator's."""
    return json.dumps({"capabilities": sorted(capabilities), "name": name, "sha256": sha256,
                       "version": version}, sort_keys=True, separators=(",", ":")).encode()


def sign(m: Manifest, key: Ed25519PrivateKey) -> str:
    """The ``signature`` of manifest ``m`` with ``key`` (base64url, no padding)."""
    assert m.sha256 is not None
    sig = key.sign(statement(m.name, m.version, m.sha256, m.capabilities))
    return base64.urlsafe_b64encode(sig).rstrip(b"=").decode()


def _signature_ok(m: Manifest, keys: Sequence[Ed25519PublicKey]) -> bool:
    assert m.signature is not None
    assert m.sha256 is not None
    try:
        sig = base64.urlsafe_b64decode(m.signature + "=" * (-len(m.signature) % 4))
    except (binascii.Error, ValueError):
        return False
    data = statement(m.name, m.version, m.sha256, m.capabilities)
    for key in keys:
        try:
            key.verify(sig, data)
            return True
        except InvalidSignature:
            continue
    return False


class PluginLoader:
    """Checks manifests for one agent file: ``keys`` its trusted keys, ``store_dir``
    where bundle modules and the compiled-module cache are kept."""

    def __init__(self, agent: AgentFile, report: Report) -> None:
        from edge.sync.bundle import load_public_key  # noqa: PLC0415
        from edge.wasm.instance import Runtime  # noqa: PLC0415 (only when there are plugins)

        self.keys = [load_public_key(Path(k).read_bytes(), where=str(k))
                     for k in agent.trust.keys]
        self.store_dir = agent.store.path.parent
        self.report = report
        self.runtime = Runtime(plugin_cache_dir(agent.store.path))

    def check(self, data: object, where: Where, base: Path | None) -> PluginSpec | None:
        """The spec of one manifest (``base``: the manifest's directory, None for a
        bundle entry); None, with problems reported, when it is not usable."""
        if not isinstance(data, dict):
            self.report.error(where, "", "must be a mapping (a plugin manifest)")
            return None
        try:
            m = Manifest.model_validate(data)
        except ValidationError as e:
            self.report.validation_error(e, where, "", model=Manifest)
            return None
        if m.sha256 is None:
            self.report.error(where, "sha256", "is required: the SHA-256 (hex) of the module, "
                              "from `sha256sum` or `edge plugin sign`")
            return None
        wasm = self._module(m, where, base)
        if wasm is None:
            return None
        path, blob = wasm
        if not (self._authentic(m, path, blob, where) and self._module_ok(m, blob, where)):
            return None
        return PluginSpec(
            name=m.name, version=m.version, wasm=path, sha256=m.sha256,
            capabilities=tuple(m.capabilities), devices=tuple(m.devices),
            memory_pages=m.limits.memory_pages, timeout_ms=m.limits.timeout_ms,
            on_failure=m.on_failure, failures=m.quarantine.failures,
            window_s=float(m.quarantine.window),
            config=json.dumps(m.config, separators=(",", ":"), ensure_ascii=False),
            source=where.file if where.document is None else f"{where.file} #{where.document}",
        )

    def _authentic(self, m: Manifest, path: Path, blob: bytes, where: Where) -> bool:
        """The module hashes to ``sha256`` and the signature verifies (or none is
        needed); else reported."""
        err = self.report.error
        if hashlib.sha256(blob).hexdigest() != m.sha256:
            err(where, "sha256", f"does not match the module {path} (its SHA-256 is "
                f"{hashlib.sha256(blob).hexdigest()})")
            return False
        if m.signature is None and self.keys:
            err(where, "signature", "is required: this agent trusts keys (trust.keys), so "
                "every plugin must be signed by one of them (edge plugin sign)")
            return False
        if m.signature is not None and not self.keys:
            self.report.warning(where, "signature", "is not checked: this agent trusts no key "
                                "(trust.keys), so it runs plugins unsigned")
        elif m.signature is not None and not _signature_ok(m, self.keys):
            err(where, "signature", "does not verify with any trusted key (trust.keys): "
                "signed by another key, or name, version, sha256 or capabilities changed "
                "since it was signed (edge plugin sign again)")
            return False
        return True

    def _module(self, m: Manifest, where: Where, base: Path | None) -> tuple[Path, bytes] | None:
        if base is not None:
            return self._module_file(m, where, base)
        err = self.report.error
        if m.wasm is not None or m.module is None:
            err(where, "module", "is required in a bundle: the module in base64 (wasm "
                "paths are for manifest files)")
            return None
        try:
            blob = base64.b64decode(m.module, validate=True)
        except (binascii.Error, ValueError):
            err(where, "module", "is not valid base64")
            return None
        path = self.store_dir / "plugins" / f"{m.sha256}.wasm"
        if hashlib.sha256(blob).hexdigest() == m.sha256 and not path.is_file():
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                tmp = path.with_suffix(".tmp")
                tmp.write_bytes(blob)
                tmp.replace(path)
            except OSError as e:
                err(where, "module", f"cannot be kept in {path}: {e.strerror}")
                return None
        return path, blob

    def _module_file(self, m: Manifest, where: Where, base: Path) -> tuple[Path, bytes] | None:
        err = self.report.error
        if m.module is not None or m.wasm is None:
            err(where, "wasm", "is required in a manifest file (module is for bundles)")
            return None
        path = (base / m.wasm).resolve()
        try:
            blob = read_module(path)
        except ModuleFileError as e:
            err(where, "wasm", str(e))
            return None
        return path, blob

    def _module_ok(self, m: Manifest, blob: bytes, where: Where) -> bool:
        from edge.wasm.instance import PluginError, module_problems  # noqa: PLC0415

        assert m.sha256 is not None  # check() made sure
        try:
            module = self.runtime.compile(blob, m.sha256)
        except PluginError as e:
            self.report.error(where, "wasm" if m.wasm else "module", f"the module {e}")
            return False
        problems = module_problems(module, tuple(m.capabilities))
        for p in problems:
            self.report.error(where, "wasm" if m.wasm else "module", f"the module {p}")
        return not problems


def plugin_cache_dir(store_path: Path) -> Path:
    """Where compiled modules are cached: ``plugins-cache`` beside the outbox."""
    return store_path.parent / "plugins-cache"


def _check_names(specs: list[PluginSpec], report: Report, where: Where) -> None:
    seen: dict[str, str] = {}
    for s in specs:
        if s.name in seen:
            report.error(where, "plugins", f"two plugins are named {s.name!r} ({seen[s.name]} "
                         f"and {s.source})")
        seen[s.name] = s.source


def load_plugin_dir(agent: AgentFile, agent_file: Path,
                    report: Report) -> tuple[PluginSpec, ...]:
    """The plugins of ``agent.plugins.dir`` (the agent file itself left out, should it
    lie there); problems go to ``report``. A missing directory is no plugin (the
    default need not exist)."""
    files = [f for f in manifest_files(agent.plugins.dir) if f.resolve() != agent_file.resolve()]
    for f in [f for f in files if not f.is_file()]:
        report.error(Where(str(f)), "", "is not a regular file (a plugin manifest was "
                     "expected: every *.yaml, *.yml and *.json in plugins.dir is one)")
        files.remove(f)
    if not files:
        return ()
    loader = PluginLoader(agent, report)
    specs = []
    for f in files:
        readable, data = read_yaml_file(f, report)
        spec = loader.check(data, Where(str(f)), f.parent) if readable else None
        if spec is not None:
            specs.append(spec)
    _check_names(specs, report, Where(str(agent.plugins.dir)))
    return tuple(specs)


def load_bundle_plugins(entries: object, agent: AgentFile, label: str,
                        report: Report) -> tuple[PluginSpec, ...]:
    """The plugins of a bundle's ``plugins`` list (entries reported as ``label
    plugins`` #N); problems go to ``report``."""
    if not entries:
        return ()
    if not isinstance(entries, list):
        report.error(Where(label), "plugins", "must be a list of plugin manifests")
        return ()
    loader = PluginLoader(agent, report)
    specs = [s for i, e in enumerate(entries, start=1)
             if (s := loader.check(e, Where(f"{label} plugins", i), None)) is not None]
    _check_names(specs, report, Where(label))
    return tuple(specs)
