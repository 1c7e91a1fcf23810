#!/usr/bin/env python3
"""Add this run's context to a measure.py result JSON, in place.

    annotate.py FILE run_id=20261129T220000 role=edge scenario=s1 storage=none ...

Every K=V goes into the file's ``"bench"`` object, next to ``"host"``: CPU count and
model, Python, kernel, mosquitto version, load average now. report.py pairs the runs of
one invocation of run.sh by ``run_id``. Standard library only.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path


def _first_line(cmd: list[str]) -> str | None:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    lines = (out.stdout or out.stderr).strip().splitlines()
    return lines[0] if lines else None


def _cpu_model() -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def host_info() -> dict[str, object]:
    """What the figures depend on: the machine and the broker's version."""
    return {
        "cpus": os.cpu_count(),
        "cpu_model": _cpu_model(),
        "python": platform.python_version(),
        "kernel": platform.release(),
        "mosquitto": _first_line(["mosquitto", "-h"]),
        "loadavg_after": [round(x, 2) for x in os.getloadavg()],
    }


def main(argv: list[str]) -> int:
    if len(argv) < 1:
        print(__doc__, file=sys.stderr)
        return 2
    path = Path(argv[0])
    doc = json.loads(path.read_text(encoding="utf-8"))
    bench = doc.setdefault("bench", {})
    for kv in argv[1:]:
        key, sep, value = kv.partition("=")
        if not sep:
            print(f"annotate: not K=V: {kv!r}", file=sys.stderr)
            return 2
        bench[key] = value
    doc["host"] = host_info()
    path.write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
