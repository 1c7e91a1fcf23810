"""A release as a signed desired bundle names it (free of the libraries that fetch it)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class ReleaseSpec:
    """``agent.release`` of a bundle: ``version`` (PEP 440), ``url`` (http, https or
    file) of its archive, ``size`` (bytes) and ``sha256`` (hex) of that archive."""

    version: str
    url: str
    sha256: str
    size: int
