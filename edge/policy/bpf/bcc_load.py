#!/usr/bin/python3
"""The bcc backend: compile policy.bpf.c at run time with bcc (Debian ``python3-bpfcc``),
load both programs, pin them and their maps, and exit.

    /usr/bin/python3 bcc_load.py SOURCE MAPS_DIR PROGRAM_DIR

Run by :class:`edge.policy.datapath.Datapath` in a process of its own, with the system
Python that has bcc (the PyPI package named ``bcc`` is an unrelated one), so that
LLVM's 70 MiB and more (../shared/reference §2.6) never enter the agent: the agent
attaches the pinned programs and fills the pinned maps as with the prebuilt object.
Pins ``MAPS_DIR/<map>`` and ``PROGRAM_DIR/program-egress``, ``program-ingress``.
Prints one JSON line: ``compile_ms``, ``load_ms``, ``rss_mb`` (this process's peak).
bcc needs the kernel's headers (``/lib/modules/$(uname -r)/build``); without them it
fails, and the message says so. Standard library and bcc only: the edge package is
not importable here.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time

CALLS = ((re.compile(r"\bLOOKUP\((\w+), "), r"\1.lookup("),
         (re.compile(r"\bSK_STORAGE_GET\((\w+), (\w+), "), r"\1.sk_storage_get(\2, 0, "),
         (re.compile(r"\bRINGBUF_OUTPUT\((\w+), (&\w+), (sizeof\(\w+\))\)"),
          r"\1.ringbuf_output(\2, \3, 0)"))
"""The source's map calls as bcc wants them written (its rewriter ignores macros)."""
MAPS = ("active", "gens", "addr4", "addr6", "ports", "workloads", "counters", "stats",
        "sockets", "events")


def peak_rss_mb() -> float:
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return 0.0


def main() -> int:
    source, maps_dir, program_dir = sys.argv[1:4]
    sys.path.append("/usr/lib/python3/dist-packages")
    try:
        from bcc import BPF  # noqa: PLC0415
        from bcc.libbcc import lib  # noqa: PLC0415
    except ImportError as e:
        print(f"bcc is not installed (Debian: apt-get install python3-bpfcc): {e}",
              file=sys.stderr)
        return 3
    start = time.perf_counter()
    with open(source, encoding="utf-8") as f:
        text = f.read()
    for pattern, replacement in CALLS:
        text = pattern.sub(replacement, text)
    b = BPF(text=text.encode())
    compiled = time.perf_counter()
    programs = {d: b.load_func(f"edge_{d}", BPF.CGROUP_SKB) for d in ("egress", "ingress")}
    loaded = time.perf_counter()
    os.makedirs(maps_dir, mode=0o700, exist_ok=True)
    for name in MAPS:
        fd = lib.bpf_table_fd(b.module, name.encode())
        if fd < 0 or lib.bpf_obj_pin(fd, os.path.join(maps_dir, name).encode()) != 0:
            print(f"cannot pin map {name} in {maps_dir}", file=sys.stderr)
            return 1
    for direction, fn in programs.items():
        path = os.path.join(program_dir, f"program-{direction}")
        if lib.bpf_obj_pin(fn.fd, path.encode()) != 0:
            print(f"cannot pin {path}", file=sys.stderr)
            return 1
    print(json.dumps({"compile_ms": round((compiled - start) * 1000, 1),
                      "load_ms": round((loaded - compiled) * 1000, 1),
                      "rss_mb": round(peak_rss_mb(), 1)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
