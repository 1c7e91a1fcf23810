#!/usr/bin/env python3
"""Wait until this machine is quiet enough to measure on, for at most MAX_WAIT seconds.

    wait_quiet.py [--busy-pct 25] [--sample-s 5] [--max-wait-s 300]

Quiet = over one sample of ``--sample-s`` seconds, all cores together were busy less
than ``--busy-pct`` % of the machine (from /proc/stat; 100 = every core busy). The
benchmark shares the machine with whatever else runs, and the agents' latency and
completeness suffer when the cores are taken. Prints the last busy % on stdout and
what it saw on stderr; exits 0 when quiet, 1 when it gave up (the caller goes on and
the result notes the load).
"""

from __future__ import annotations

import argparse
import sys
import time


def _cpu_times() -> tuple[int, int]:
    """(busy, total) jiffies over all cores since boot."""
    with open("/proc/stat", encoding="ascii") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    total = sum(fields[:8])  # user..steal; guest is already inside user
    return total - idle, total


def busy_pct(sample_s: float) -> float:
    """Share of the whole machine that was busy over the next ``sample_s`` seconds."""
    b0, t0 = _cpu_times()
    time.sleep(sample_s)
    b1, t1 = _cpu_times()
    return 100.0 * (b1 - b0) / max(1, t1 - t0)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--busy-pct", type=float, default=25.0)
    p.add_argument("--sample-s", type=float, default=5.0)
    p.add_argument("--max-wait-s", type=float, default=300.0)
    a = p.parse_args()
    deadline = time.monotonic() + a.max_wait_s
    while True:
        busy = busy_pct(a.sample_s)
        if busy < a.busy_pct:
            print(f"wait_quiet: machine {busy:.0f} % busy: go", file=sys.stderr)
            print(f"{busy:.0f}")
            return 0
        if time.monotonic() >= deadline:
            print(
                f"wait_quiet: machine still {busy:.0f} % busy after {a.max_wait_s:.0f} s; "
                "measuring anyway (see system_cpu_percent_mean_all_cores)",
                file=sys.stderr,
            )
            print(f"{busy:.0f}")
            return 1
        print(f"wait_quiet: machine {busy:.0f} % busy, waiting", file=sys.stderr)


if __name__ == "__main__":
    raise SystemExit(main())
