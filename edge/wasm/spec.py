"""A plugin as the agent runs it: plain values, validated in the config child.

The manifest (``name, version, wasm, sha256, signature, hooks, devices, capabilities,
limits, on_failure, quarantine, config``; plugins/README.md) is validated by
:mod:`edge.config.plugins`, which also checks the module's hash, its signature and
its imports and exports, and hands the agent a :class:`PluginSpec`.
"""

from __future__ import annotations

import fnmatch
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Literal

HOOKS: Final = ("readings",)
"""Where a plugin may sit: ``readings`` is the batch of one poll, after the poller and
before the outbox (DESIGN.md §2)."""

CAPABILITIES: Final = {
    "log": ("log",),
    "now_ms": ("now_ms",),
    "kv": ("kv_get", "kv_set", "kv_delete"),
}
"""Capability → the functions of import module ``edge`` it grants; nothing else is
importable (no WASI, no files, no network, no environment)."""

IMPORT_MODULE: Final = "edge"
PAGE_BYTES: Final = 65536
MAX_MEMORY_PAGES: Final = 1024  # 64 MiB
MAX_TIMEOUT_MS: Final = 1000
"""A plugin runs in the agent's event loop: its time is everyone's time."""
MANIFEST_SUFFIXES: Final = (".yaml", ".yml", ".json")
MAX_MODULE_BYTES: Final = 8 << 20


@dataclass(frozen=True, slots=True)
class PluginSpec:
    """One validated plugin.

    ``wasm`` is the module file, whose SHA-256 (hex) is ``sha256``; ``devices`` are
    globs on ``namespace/name``; ``memory_pages`` bounds its linear memory (64 KiB
    pages), ``timeout_ms`` one call's wall time; ``on_failure`` says what becomes of
    a batch it fails on and of every batch while it is quarantined (``pass``: the
    readings go on untouched, ``drop``: they are dropped); ``failures`` within
    ``window_s`` seconds quarantine it. ``config`` is the JSON text given to its
    ``init``. ``source`` is where it was declared (a manifest file or the bundle).
    """

    name: str
    version: str
    wasm: Path
    sha256: str
    capabilities: tuple[str, ...]
    devices: tuple[str, ...] = ("*",)
    memory_pages: int = 16
    timeout_ms: int = 20
    on_failure: Literal["pass", "drop"] = "pass"
    failures: int = 5
    window_s: float = 60.0
    config: str = "{}"
    source: str = ""

    def selects(self, device_key: str) -> bool:
        """Whether it runs on the readings of ``device_key`` (``namespace/name``)."""
        return any(fnmatch.fnmatchcase(device_key, g) for g in self.devices)

    @property
    def ident(self) -> str:
        """``name@version`` (sha256 prefix), for messages and events."""
        return f"{self.name}@{self.version} ({self.sha256[:12]})"


def manifest_files(directory: Path) -> list[Path]:
    """The manifests in ``directory`` (not recursive), in file-name order: every entry
    named ``*.yaml``, ``*.yml`` or ``*.json``, regular file or not (the caller says
    what is wrong with one that is not)."""
    if not directory.is_dir():
        return []
    return sorted((p for p in directory.iterdir() if p.suffix in MANIFEST_SUFFIXES),
                  key=lambda p: p.name)


class ModuleFileError(Exception):
    """A module file that cannot be read as one: the message names it and why."""


def read_module(path: Path) -> bytes:
    """The bytes of the module file ``path``: a regular file of at most
    :data:`MAX_MODULE_BYTES` (never a FIFO or device, which could block or never end).

    Raises:
        ModuleFileError: it is not that, or cannot be read.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # a FIFO must not block the open
        with os.fdopen(fd, "rb") as f:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise ModuleFileError(f"{path}: is not a regular file")
            blob = f.read(MAX_MODULE_BYTES + 1)
    except OSError as e:
        raise ModuleFileError(f"{path}: {e.strerror}") from e
    if len(blob) > MAX_MODULE_BYTES:
        raise ModuleFileError(f"{path}: is larger than {MAX_MODULE_BYTES} bytes")
    return blob
