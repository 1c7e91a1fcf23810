"""The two ways to load the datapath give the same verdicts, and one is swapped for the
other under the pins without a moment unpoliced: libbpf with the prebuilt object (the
default), and bcc compiling the same C source at run time in a process of its own."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from ipaddress import ip_network
from pathlib import Path

import pytest
from policy_kernel import Kernel, Probe, kernel, skip_or_fail

from edge.policy.datapath import BCC_PYTHON, Datapath
from edge.policy.spec import NetworkPolicy, Peer, PolicySettings, PortSpec, Rule
from edge.policy.tables import compile_tables


@pytest.fixture
def k(tmp_path: Path) -> Iterator[Kernel]:
    with kernel(tmp_path) as kern:
        yield kern


def bcc_usable() -> None:
    """Skips (fails on CI) without bcc or the kernel headers it compiles against."""
    probe = subprocess.run([BCC_PYTHON, "-c", "import sys; sys.path.append("
                            "'/usr/lib/python3/dist-packages'); import bcc"],
                           capture_output=True, check=False)
    if not shutil.which(BCC_PYTHON) or probe.returncode:
        skip_or_fail("bcc is not installed (Debian: python3-bpfcc)")
    build = Path(f"/lib/modules/{os.uname().release}/build")
    if not build.exists():
        skip_or_fail(f"bcc needs the kernel's headers at {build}")


def test_bcc_and_libbpf_give_the_same_verdicts_and_swap_under_the_pins(
        k: Kernel) -> None:
    bcc_usable()
    workload = k.cgroup("w")
    server = Probe(None)
    client = Probe(k.root / workload)
    try:
        allowed = server.ask(op="listen", proto="udp", host="127.0.0.1")["port"]
        denied = server.ask(op="listen", proto="udp", host="127.0.0.1")["port"]
        policy = NetworkPolicy("w", workload, "enforce", egress=(Rule(
            (Peer(ip_network("127.0.0.1/32")),), (PortSpec("UDP", allowed),)),))
        tables = compile_tables(PolicySettings("enforce", (policy,)))

        def verdicts() -> tuple[str, ...]:
            answers = [client.ask(op="udp", host="127.0.0.1", port=port, timeout=1)
                       for port in (allowed, denied)]
            return tuple("ok" if a.get("ok") else a["error"] for a in answers)

        k.dp.apply(tables)  # libbpf, the harness's default
        assert verdicts() == ("ok", "EPERM")
        k.dp.close()
        k.dp = Datapath.open(k.pin, k.root, k.root / k.base, backend="bcc")
        assert k.dp.tag.startswith("bcc-")
        applied = k.dp.apply(tables)  # swaps the programs in the pinned links
        assert sorted(p.name for p in k.pin.glob("maps-*")) == [f"maps-{k.dp.tag}"]
        assert verdicts() == ("ok", "EPERM")
        deny = next(r.id for r in tables.rules
                    if r.section == "default" and r.direction == "egress")
        packets = {rule: n for rule, (n, _) in k.dp.counters(applied.gen).items()}
        assert packets == {1: 2, deny: 1}  # out and back; the one dropped
        k.dp.close()
        k.dp = Datapath.open(k.pin, k.root, k.root / k.base)  # and back to libbpf
        k.dp.apply(tables)
        assert verdicts() == ("ok", "EPERM")
    finally:
        client.stop()
        server.stop()
