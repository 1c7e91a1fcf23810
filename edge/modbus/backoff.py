"""Jittered exponential backoff, shared by reconnects (client) and probes (poller)."""

from __future__ import annotations

import random


def equal_jitter(attempt: int, initial: float, maximum: float) -> float:
    """The delay in seconds before retry number ``attempt`` (0 for the first).

    Equal jitter: drawn uniformly from [cap/2, cap], cap = ``initial`` · 2^attempt
    capped at ``maximum``, so the delay roughly doubles while clients that failed
    together spread out instead of retrying in lockstep.
    """
    cap = min(maximum, initial * 2.0 ** min(attempt, 40))
    return random.uniform(cap / 2, cap)
