"""Real kernel parts for the datapath tests: a private bpffs, test cgroups under the
cgroup v2 root, probe processes inside them, and a network namespace joined to this
one by a veth pair (the only addresses besides loopback that a test may reach).

Everything is made by the test and taken down by it: the cgroups and namespace are
named after this process's PID, the probes are ended by their PID.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from edge.policy.datapath import Datapath, cgroup2_root, mount_bpffs, unmount

PROBE = Path(__file__).with_name("policy_probe.py")
REQUIRED = os.environ.get("EDGE_REQUIRE_BPF") == "1"
"""Set by .ci/run: CI is root with BPF, so a datapath test must not skip there."""


def skip_or_fail(reason: str) -> None:
    """Skips with ``reason``; fails instead where BPF is required (CI)."""
    if REQUIRED:
        pytest.fail(f"EDGE_REQUIRE_BPF=1 but {reason}")
    pytest.skip(reason)


@dataclass
class Kernel:
    """A datapath attached to the test's own parent cgroup ``base`` (so nothing else
    on the machine passes through it), pinned in a private bpffs at ``pin``."""

    root: Path
    base: str
    pin: Path
    dp: Datapath

    def cgroup(self, name: str) -> str:
        """Creates ``base/name`` (and its parents); its path under the root."""
        path = f"{self.base}/{name}"
        (self.root / path).mkdir(parents=True, exist_ok=True)
        return path

    def cgroup_id(self, path: str) -> int:
        """The cgroup v2 id of ``path`` (what the datapath's events carry)."""
        return os.stat(self.root / path).st_ino

    def reopen(self) -> Datapath:
        """A new Datapath on the same pins (as a restarted agent makes)."""
        self.dp.close()
        self.dp = Datapath.open(self.pin, self.root, self.root / self.base)
        return self.dp


@contextlib.contextmanager
def kernel(tmp: Path) -> Iterator[Kernel]:
    """The :class:`Kernel` fixture body; skips (or fails on CI) without root or BPF."""
    if os.geteuid() != 0:
        skip_or_fail("the datapath needs root (CAP_BPF, CAP_NET_ADMIN)")
    root = cgroup2_root()
    if root is None:
        skip_or_fail("no cgroup v2 hierarchy is mounted")
        raise AssertionError  # unreachable
    fs = tmp / "bpffs"
    fs.mkdir()
    base = f"edge-test-{os.getpid()}-{time.monotonic_ns() % 10**9}"
    (root / base).mkdir()
    try:
        mount_bpffs(fs)
    except OSError as e:
        (root / base).rmdir()
        skip_or_fail(f"cannot mount a bpf file system: {e}")
    try:
        try:
            dp = Datapath.open(fs / "edge", root, root / base)
        except OSError as e:
            skip_or_fail(f"the kernel refused the datapath: {e}")
        k = Kernel(root, base, fs / "edge", dp)
        yield k
        k.dp.close()
    finally:
        Datapath.remove(fs / "edge")
        unmount(fs)
        _remove_cgroups(root / base)


def _remove_cgroups(top: Path) -> None:
    """Removes the test's cgroups, deepest first. A process still in one (a probe the
    test did not stop, a relay's child) was started by the test: it is killed by its
    PID first, as a cgroup with a process in it cannot be removed."""
    dirs = [top, *(p for p in top.rglob("*") if p.is_dir())]
    deadline = time.monotonic() + 5
    for d in sorted(dirs, key=lambda p: -len(p.parts)):
        while True:
            pids = [int(x) for x in (d / "cgroup.procs").read_text().split()]
            if not pids or time.monotonic() > deadline:
                break
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.05)
        with contextlib.suppress(OSError):
            d.rmdir()


class Probe:
    """A process inside cgroup ``path`` (or inside network namespace ``netns``) that
    opens connections and listeners on request (tests/policy_probe.py)."""

    def __init__(self, cgroup_dir: Path | None, netns: str | None = None) -> None:
        cmd = [sys.executable, str(PROBE)]
        if netns:
            cmd = ["ip", "netns", "exec", netns, *cmd]
        procs = str(cgroup_dir / "cgroup.procs") if cgroup_dir else None

        def enter() -> None:
            if procs:
                with open(procs, "w") as f:
                    f.write(str(os.getpid()))

        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True, preexec_fn=enter)  # noqa: PLW1509

    def ask(self, **request: Any) -> dict[str, Any]:
        """Sends one request, waits for its answer (see policy_probe.py)."""
        assert self.proc.stdin is not None
        assert self.proc.stdout is not None
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the probe ended ({self.proc.wait()})")
        answer: dict[str, Any] = json.loads(line)
        return answer

    def stop(self) -> None:
        """Ends the probe (by its PID)."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


@dataclass
class Netns:
    """A network namespace ``name`` joined by a veth pair: this side has ``host4`` /
    ``host6``, the namespace ``peer4`` / ``peer6`` and, in ``peers4`` / ``peers6``,
    those and the extra addresses asked for (``.3``, ``.4``, … / ``::3``, ``::4``, …)."""

    name: str
    host4: str
    peer4: str
    host6: str
    peer6: str
    peers4: tuple[str, ...] = ()
    peers6: tuple[str, ...] = ()


@contextlib.contextmanager
def netns(extra: int = 0) -> Iterator[Netns]:
    """A namespace and veth pair made for one test (addresses in 10.231.0.0/16 and
    fd00:231::/32, private to this machine), removed afterwards; ``extra`` more
    addresses of each family on the namespace's side."""
    n = os.getpid() % 250 + 1
    name = f"edge-t{os.getpid()}"
    host, peer = f"eth{os.getpid()}"[:15], f"etp{os.getpid()}"[:15]
    ns = Netns(name, f"10.231.{n}.1", f"10.231.{n}.2", f"fd00:231:{n:x}::1",
               f"fd00:231:{n:x}::2",
               tuple(f"10.231.{n}.{2 + i}" for i in range(extra + 1)),
               tuple(f"fd00:231:{n:x}::{2 + i:x}" for i in range(extra + 1)))
    steps = [
        ["ip", "netns", "add", name],
        ["ip", "link", "add", host, "type", "veth", "peer", "name", peer],
        ["ip", "link", "set", peer, "netns", name],
        ["ip", "addr", "add", f"{ns.host4}/24", "dev", host],
        ["ip", "-6", "addr", "add", f"{ns.host6}/64", "dev", host, "nodad"],
        ["ip", "link", "set", host, "up"],
        ["ip", "-n", name, "addr", "add", f"{ns.peer4}/24", "dev", peer],
        ["ip", "-n", name, "-6", "addr", "add", f"{ns.peer6}/64", "dev", peer, "nodad"],
        ["ip", "-n", name, "link", "set", peer, "up"],
        ["ip", "-n", name, "link", "set", "lo", "up"],
        *(["ip", "-n", name, "addr", "add", f"{a}/24", "dev", peer] for a in ns.peers4[1:]),
        *(["ip", "-n", name, "-6", "addr", "add", f"{a}/64", "dev", peer, "nodad"]
          for a in ns.peers6[1:]),
    ]
    try:
        for step in steps:
            r = subprocess.run(step, capture_output=True, text=True, check=False)
            if r.returncode:
                skip_or_fail(f"cannot make a network namespace ({' '.join(step)}): "
                             f"{r.stderr.strip()}")
        yield ns
    finally:
        subprocess.run(["ip", "link", "del", host], capture_output=True, check=False)
        subprocess.run(["ip", "netns", "del", name], capture_output=True, check=False)
