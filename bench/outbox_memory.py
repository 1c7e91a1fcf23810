#!/usr/bin/env python3
"""RSS of the outbox path during a long broker outage, compressed in time.

Feeds the real Forwarder + Outbox (a real SQLite file under /tmp) with MINUTES × 6000
s2-sized readings (100 devices × 1 reading/s, ~650-byte payloads) while no broker is
reachable (127.0.0.1:1 refuses), and prints this process's RSS as the backlog grows on
disk. "Memory flat however long the outage" holds when RSS levels off while the file
keeps growing. Usage: .venv/bin/python bench/outbox_memory.py [MINUTES=20]
"""

import json
import sys
import tempfile
import time
from pathlib import Path

from edge.store.outbox import NewMessage, Outbox
from edge.uplink.client import BrokerClient
from edge.uplink.forwarder import Forwarder
from edge.uplink.payload import now_ms
from edge.uplink.settings import BrokerSettings


def rss_mb() -> float:
    status = Path("/proc/self/status").read_text()
    return int(status.split("VmRSS:")[1].split()[0]) / 1024


def main() -> None:
    minutes = int(sys.argv[1]) if len(sys.argv) > 1 else 20
    box = Outbox(Path(tempfile.mkdtemp()) / "edge.db", max_bytes=1 << 30, ttl_ms=10**9)
    client = BrokerClient(BrokerSettings("127.0.0.1", 1, client_id="outbox-memory"))
    fw = Forwarder(box, client, events_topic="bench/events")
    fw.start()
    client.start()
    pad = "x" * 600
    for minute in range(1, minutes + 1):
        for i in range(6000):
            dev = f"default/dev-{i % 100:03d}"
            body = json.dumps({"seq": minute * 6000 + i, "v": pad}).encode()
            fw.submit(NewMessage(f"bench/telemetry/{dev}", body, 1, now_ms(), dev,
                                 minute * 6000 + i))
        while fw.stats.held or box.stats.committed < minute * 6000:
            time.sleep(0.01)
        print(f"outage minute {minute:3d}: {box.stats.rows:7d} readings, "
              f"{box.stats.bytes / 2**20:6.1f} MB stored, RSS {rss_mb():5.1f} MB", flush=True)
    fw.stop(0.5)
    client.stop()


if __name__ == "__main__":
    main()
