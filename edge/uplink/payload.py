"""Wire helpers of the uplink: compact UTF-8 JSON and the millisecond clock."""

from __future__ import annotations

import json
import time


def json_bytes(obj: object) -> bytes:
    """``obj`` as compact JSON (no spaces, UTF-8, non-ASCII kept as is)."""
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()


def now_ms() -> int:
    """Milliseconds since the Unix epoch (UTC)."""
    return time.time_ns() // 1_000_000
