#!/usr/bin/env python3
"""Print the first port >= START such that COUNT consecutive ports are free on 127.0.0.1.

    free_ports.py COUNT START [--avoid LO-HI ...]

"Free" means a listening socket can bind there now without SO_REUSEADDR, so ports in
TIME_WAIT from an earlier run are skipped too. ``--avoid`` keeps ranges another
part of the same run already took. Only 127.0.0.1 is touched. Exit 1 if nothing is free
below 65536.
"""

from __future__ import annotations

import argparse
import socket
import sys


def port_free(port: int) -> bool:
    """True when a TCP socket can bind 127.0.0.1:port right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def first_free_range(count: int, start: int, avoid: list[tuple[int, int]]) -> int | None:
    """The lowest base >= start with base..base+count-1 all free and outside ``avoid``."""
    base = start
    while base + count <= 65536:
        clash = next((hi for lo, hi in avoid if lo <= base + count - 1 and base <= hi), None)
        if clash is not None:
            base = clash + 1
            continue
        busy = next((p for p in range(base, base + count) if not port_free(p)), None)
        if busy is None:
            return base
        base = busy + 1
    return None


def _range(text: str) -> tuple[int, int]:
    lo, _, hi = text.partition("-")
    return int(lo), int(hi or lo)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("count", type=int)
    p.add_argument("start", type=int)
    p.add_argument("--avoid", type=_range, action="append", default=[], metavar="LO-HI")
    a = p.parse_args()
    base = first_free_range(a.count, a.start, a.avoid)
    if base is None:
        print(f"no {a.count} free consecutive ports from {a.start}", file=sys.stderr)
        return 1
    print(base)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
