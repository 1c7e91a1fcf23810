"""What the network policy datapath costs (DESIGN.md §10, issue 8's budget): loading it,
updating it (≤ 50 ms), and loopback TCP throughput through an enforced policy (within
5 % of no policy).

    sudo .venv/bin/python bench/policy_cost.py [--seconds 5] [--rounds 5] [--out FILE]

Needs root (BPF), cgroup v2, libbpf1, and iperf3 for the throughput (Debian:
``apt-get install iperf3``; without it that part is skipped). Everything happens on
127.0.0.1, in a cgroup and a bpffs that the script makes and removes; the datapath is
attached to that cgroup only, so nothing else on the machine is policed.

1. **load**, in a fresh process each time (``--rounds``): RSS and time for importing
   the datapath (ctypes, libbpf), for :meth:`Datapath.open` (the kernel's verifier
   runs here, once per boot and build) and for the first apply. Then the bcc backend
   (``edge/policy/bpf/bcc_load.py``, when python3-bpfcc and the kernel headers are
   there): its compile and load times and the peak RSS of the process that compiles.
2. **update**: :meth:`Datapath.apply` of policies of 12, 64 and 250 rules, 100 times
   each: median, p99 and max.
3. **throughput**: iperf3 client and server both in the policed workload, TCP over
   127.0.0.1 for ``--seconds``, alternating ``none`` (no program attached) and
   ``enforced`` (a policy whose allow rule is its last, so every packet goes through
   every lookup), ``--rounds`` times; the median of each and the ratio. Also UDP with
   64-byte datagrams, where the per-packet cost shows most.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from ipaddress import ip_network
from pathlib import Path
from typing import Any

from edge.policy.datapath import (
    BCC_PYTHON,
    Datapath,
    cgroup2_root,
    mount_bpffs,
    object_path,
    unmount,
)
from edge.policy.spec import NetworkPolicy, Peer, PolicySettings, PortSpec, Rule
from edge.policy.tables import compile_tables

LOAD = r"""
import json, sys, time
def rss():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
from pathlib import Path
out = {"rss_start_mb": rss()}
t = time.perf_counter()
from edge.policy.datapath import Datapath
from edge.policy.spec import PolicySettings, NetworkPolicy
from edge.policy.tables import compile_tables
out["import_ms"] = (time.perf_counter() - t) * 1000
out["rss_import_mb"] = rss()
pin, root, attach, workload = sys.argv[1:5]
t = time.perf_counter()
dp = Datapath.open(Path(pin), Path(root), Path(attach))
out["open_ms"] = (time.perf_counter() - t) * 1000
out["rss_open_mb"] = rss()
t = time.perf_counter()
dp.apply(compile_tables(PolicySettings("enforce", (NetworkPolicy("w", workload),))))
out["first_apply_ms"] = (time.perf_counter() - t) * 1000
out["rss_applied_mb"] = rss()
dp.close()
print(json.dumps(out))
"""


@contextmanager
def sandbox() -> Iterator[tuple[Path, Path, str]]:
    """(bpffs dir, cgroup v2 root, the bench's workload cgroup path), removed after."""
    root = cgroup2_root()
    if root is None:
        raise SystemExit("no cgroup v2 hierarchy")
    tmp = Path(tempfile.mkdtemp(prefix="edge-policy-bench-"))
    fs = tmp / "bpffs"
    fs.mkdir()
    try:
        mount_bpffs(fs)
    except OSError as e:
        raise SystemExit(str(e)) from e
    base = f"edge-policy-bench-{os.getpid()}"
    (root / base / "w").mkdir(parents=True)
    try:
        yield fs, root, base
    finally:
        unmount(fs)
        for d in (root / base / "w", root / base):
            d.rmdir()
        shutil.rmtree(tmp)


def settings(workload: str, rules: int, port: int) -> PolicySettings:
    """A policy of about ``rules`` rules: denies and allows to distinct /24s and port
    ranges, and last the allow that the measured traffic needs."""
    egress = [Rule((Peer(ip_network(f"10.{i // 250}.{i % 250}.0/24")),),
                   (PortSpec("TCP", 1000 + i, 1100 + i),)) for i in range(rules - 5)]
    wanted = Rule((Peer(ip_network("127.0.0.1/32")),), (PortSpec("TCP", port),
                                                        PortSpec("UDP", port)))
    p = NetworkPolicy("bench", workload, "enforce", egress=(*egress, wanted),
                      ingress=(wanted,))
    return PolicySettings("enforce", (p,))


def load_cost(fs: Path, root: Path, base: str, rounds: int) -> list[dict[str, float]]:
    out = []
    for i in range(rounds):
        pin = fs / f"load{i}"
        done = subprocess.run([sys.executable, "-c", LOAD, str(pin), str(root),
                               str(root / base), f"{base}/w"],
                              capture_output=True, text=True, check=True)
        out.append(json.loads(done.stdout))
        Datapath.remove(pin)
    return out


def bcc_cost(fs: Path, rounds: int) -> list[dict[str, float]] | str:
    if not Path(f"/lib/modules/{os.uname().release}/build").exists():
        return "skipped: no kernel headers at /lib/modules/$(uname -r)/build"
    source = object_path().with_name("policy.bpf.c")
    out = []
    for i in range(rounds):
        maps = fs / f"bcc{i}"
        done = subprocess.run([BCC_PYTHON, str(source.with_name("bcc_load.py")),
                               str(source), str(maps), str(maps)], capture_output=True,
                              text=True, check=False)
        if done.returncode:
            return f"failed: {done.stderr.strip().splitlines()[-1:]}"
        out.append(json.loads(done.stdout))
        shutil.rmtree(maps)
    return out


def update_cost(dp: Datapath, base: str) -> dict[str, dict[str, float]]:
    out = {}
    for n in (12, 64, 250):
        tables = compile_tables(settings(f"{base}/w", n, 5201))
        times = []
        for _ in range(100):
            times.append(dp.apply(tables).seconds * 1000)
        times.sort()
        out[f"{len(tables.rules)}_rules"] = {
            "median_ms": round(statistics.median(times), 3),
            "p99_ms": round(times[98], 3), "max_ms": round(times[-1], 3),
            "entries": dp.apply(tables).entries}
    return out


def _in_cgroup(procs: Path) -> Any:
    def enter() -> None:
        procs.write_text(str(os.getpid()))
    return enter


def iperf(procs: Path, port: int, seconds: float, udp: bool) -> float:
    """bits/s received, client and server both in the workload."""
    server = subprocess.Popen(["iperf3", "-s", "-1", "-B", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, preexec_fn=_in_cgroup(procs))  # noqa: PLW1509
    try:
        time.sleep(0.3)
        cmd = ["iperf3", "-c", "127.0.0.1", "-p", str(port), "-t", str(seconds), "-J"]
        if udp:
            cmd += ["-u", "-b", "0", "-l", "64"]
        done = subprocess.run(cmd, capture_output=True, text=True, check=True,
                              preexec_fn=_in_cgroup(procs))
        end = json.loads(done.stdout)["end"]
        return float(end["sum"]["bits_per_second"] if udp else
                     end["sum_received"]["bits_per_second"])
    finally:
        server.wait(10)


def throughput(fs: Path, root: Path, base: str, seconds: float, rounds: int
               ) -> dict[str, Any]:
    procs = root / base / "w" / "cgroup.procs"
    port = 5201
    pin = fs / "tput"
    out: dict[str, Any] = {}
    for kind in ("tcp", "udp64"):
        runs: dict[str, list[float]] = {"none": [], "enforced": []}
        for _ in range(rounds):
            for mode in ("none", "enforced"):
                if mode == "enforced":
                    dp = Datapath.open(pin, root, root / base)
                    dp.apply(compile_tables(settings(f"{base}/w", 12, port)))
                    dp.close()
                runs[mode].append(iperf(procs, port, seconds, kind == "udp64"))
                Datapath.remove(pin)
        none, enforced = statistics.median(runs["none"]), statistics.median(runs["enforced"])
        out[kind] = {"none_gbit_s": round(none / 1e9, 3),
                     "enforced_gbit_s": round(enforced / 1e9, 3),
                     "enforced_over_none": round(enforced / none, 4),
                     "runs_gbit_s": {m: [round(v / 1e9, 3) for v in r]
                                     for m, r in runs.items()}}
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=float, default=5.0)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--out", type=Path)
    a = p.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("needs root (BPF)")
    subprocess.run([sys.executable, str(Path(__file__).with_name("wait_quiet.py"))],
                   check=False)
    result: dict[str, Any] = {"machine": platform.node(), "kernel": platform.release(),
                              "cpus": os.cpu_count(), "date": time.strftime("%Y-%m-%d")}
    with sandbox() as (fs, root, base):
        result["load"] = load_cost(fs, root, base, a.rounds)
        result["load_bcc"] = bcc_cost(fs, a.rounds)
        dp = Datapath.open(fs / "update", root, root / base)
        try:
            result["update"] = update_cost(dp, base)
        finally:
            dp.close()
            Datapath.remove(fs / "update")
        if shutil.which("iperf3"):
            result["throughput"] = throughput(fs, root, base, a.seconds, a.rounds)
        else:
            result["throughput"] = "skipped: iperf3 is not installed"
    text = json.dumps(result, indent=2)
    print(text)
    if a.out:
        a.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
