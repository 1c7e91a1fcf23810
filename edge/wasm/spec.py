"""A plugin as the agent runs it: plain values, validated in the config child.

The manifest (``name, version, wasm, sha256, signature, hooks, devices, capabilities,
limits, on_failure, quarantine, config``; plugins/README.md) is validated by
:mod:`edge.config.plugins`, which also checks the module's hash, its signature and
its imports and exports, and hands the agent a :class:`PluginSpec`.
"""

from __future__ import annotations

import fnmatch
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
    """The manifests in ``directory`` (not recursive), in file-name order."""
    if not directory.is_dir():
        return []
    return sorted((p for p in directory.iterdir()
                   if p.suffix in MANIFEST_SUFFIXES and p.is_file()), key=lambda p: p.name)
