#!/usr/bin/env python3
"""Summarise a py-spy profile (``py-spy record --format raw``, collapsed stacks).

    profile_top.py PROFILE.txt [--top 25] [--markdown]

Prints the functions with the most samples where the CPU was (self, the innermost
frame) and on the stack (inclusive), and the source files by self samples; functions
are aggregated over line numbers. py-spy leaves idle threads out unless ``--idle``
was given, so the samples are CPU time.
"""

from __future__ import annotations

import argparse
import re
from collections import Counter
from pathlib import Path

_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")
_WAIT_FRAMES = ("EpollSelector.select ", "PollSelector.select ", "SelectSelector.select ")
_SITE = re.compile(r".*/(?:site|dist)-packages/")


def _short_file(path: str) -> str:
    path = _SITE.sub("", path)
    return re.sub(r".*/lib/python3\.\d+/", "", path)


def frame_name(frame: str) -> tuple[str, str]:
    """(``function (file)``, file) with the line number dropped; other frames as is."""
    m = _FRAME.match(frame.strip())
    if not m:
        return frame.strip(), frame.strip()
    file = _short_file(m["file"])
    return f"{m['func']} ({file})", file


def parse(path: Path) -> list[tuple[list[str], int]]:
    """Stacks (outermost first, thread/process frames dropped) with their sample counts."""
    stacks = []
    for raw in path.read_text(encoding="utf-8", errors="replace").splitlines():
        line = raw.strip()
        if not line:
            continue
        body, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        frames = [
            f
            for f in body.split(";")
            if f and not f.startswith(("process ", "thread ")) and f.strip()
        ]
        stacks.append((frames, int(count)))
    return stacks


def summarise(stacks: list[tuple[list[str], int]], top: int) -> str:
    """The three tables as markdown."""
    total = sum(n for _, n in stacks)
    self_f: Counter[str] = Counter()
    incl_f: Counter[str] = Counter()
    self_file: Counter[str] = Counter()
    for frames, n in stacks:
        if not frames:
            continue
        leaf, leaf_file = frame_name(frames[-1])
        self_f[leaf] += n
        self_file[leaf_file] += n
        for name in {frame_name(f)[0] for f in frames}:
            incl_f[name] += n

    def table(title: str, counter: Counter[str]) -> list[str]:
        rows = [f"| {title} | samples | % |", "|---|---|---|"]
        rows += [
            f"| `{name}` | {n} | {100 * n / total:.1f} |" for name, n in counter.most_common(top)
        ]
        return rows

    waiting = sum(n for name, n in self_f.items() if name.startswith(_WAIT_FRAMES))
    out = [
        f"{total} non-idle samples (py-spy leaves idle threads out, so samples ÷ rate ≈ CPU "
        f"seconds); {waiting} ({100 * waiting / total:.1f} %) inside the event loop's "
        "select/epoll call, i.e. the cost of waking up. A frame's self samples include the C "
        "functions it calls (paho's `Client._loop` calls select() in its network thread).",
        "",
    ]
    out += [*table("self (innermost frame)", self_f), ""]
    # frames on every stack (<module>, asyncio.run, ...) say nothing: leave them out
    below_all = Counter({k: v for k, v in incl_f.items() if v < total})
    out += [*table("inclusive (on the stack)", below_all), ""]
    out += table("self by file", self_file)
    return "\n".join(out) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("profile", type=Path)
    p.add_argument("--top", type=int, default=25)
    a = p.parse_args()
    stacks = parse(a.profile)
    if not stacks:
        print(f"{a.profile}: no samples")
        return 1
    print(summarise(stacks, a.top), end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
