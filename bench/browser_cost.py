"""What one open browser costs the agent: its CPU with the status page open, against
the same agent with no page open, in one run (DESIGN.md §9's budget: < 1 % of a core).

    .venv/bin/python bench/browser_cost.py [--scenario s1] [--seconds 30] [--page devices]

Starts mosquitto, ``edge simulate`` and ``edge run`` (the agent file of
``gen_manifests.py`` with its web page on a free port) from the run directory it
prints, waits 10 s, measures the agent's CPU (user + system, all its threads; 100 = one
core) for SECONDS with no page open, then for SECONDS with Debian's headless chromium
(driven by Playwright) on ``#/PAGE``, and prints both and the difference as JSON.
Stops what it started, by PID. Needs mosquitto, chromium and the test extras
(playwright).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
from playwright.sync_api import sync_playwright

HERE = Path(__file__).resolve().parent
EDGE = [sys.executable, "-m", "edge"]


def free_ports(count: int) -> list[int]:
    out = subprocess.run([sys.executable, str(HERE / "free_ports.py"), str(count), "20000"],
                         capture_output=True, text=True, check=True).stdout
    base = int(out.split()[0])
    return list(range(base, base + count))


def cpu_percent(proc: psutil.Process, seconds: float) -> float:
    before = proc.cpu_times()
    time.sleep(seconds)
    after = proc.cpu_times()
    used = (after.user - before.user) + (after.system - before.system)
    return round(100 * used / seconds, 2)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scenario", default="s1", choices=("s1", "s2"))
    p.add_argument("--seconds", type=float, default=30.0)
    p.add_argument("--page", default="devices", help="the hash route, e.g. devices")
    a = p.parse_args()
    run = Path(tempfile.mkdtemp(prefix="edge-browser-cost."))
    print(f"run dir: {run}", file=sys.stderr)
    broker, web, sim_base, *_ = free_ports(102)  # s2 has 100 devices, one port each
    subprocess.run([sys.executable, str(HERE / "gen_manifests.py"), "--out", str(run),
                    "--scenario", a.scenario, "--sim-base-port", str(sim_base),
                    "--broker-port", str(broker), "--web-port", str(web)],
                   check=True, stdout=subprocess.DEVNULL)
    procs: list[subprocess.Popen[bytes]] = []

    def start(args: list[str], name: str) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(args, cwd=run, stdout=(run / f"{name}.log").open("wb"),
                                stderr=subprocess.STDOUT)
        procs.append(proc)
        return proc

    try:
        (run / "mosquitto.conf").write_text(f"listener {broker} 127.0.0.1\n"
                                            "allow_anonymous true\n")
        start(["mosquitto", "-c", str(run / "mosquitto.conf")], "mosquitto")
        start([*EDGE, "simulate", "-c", "edge.yaml"], "simulate")
        time.sleep(2)
        agent = psutil.Process(start([*EDGE, "run", "-c", "edge.yaml"], "agent").pid)
        time.sleep(10)
        idle = cpu_percent(agent, a.seconds)
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path="/usr/bin/chromium",
                                         args=["--no-sandbox"])
            page = browser.new_page()
            page.goto(f"http://127.0.0.1:{web}/#/{a.page}")
            time.sleep(3)
            with_page = cpu_percent(agent, a.seconds)
            browser.close()
        print(json.dumps({"scenario": a.scenario, "page": a.page, "seconds": a.seconds,
                          "agent_cpu_percent_no_page": idle,
                          "agent_cpu_percent_page_open": with_page,
                          "page_cost_percent": round(with_page - idle, 2),
                          "agent_rss_mb": round(agent.memory_info().rss / 2**20, 1)}))
    finally:
        for proc in reversed(procs):
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
