#!/usr/bin/env python3
"""Recording MQTT subscriber for bench/outage.sh: edge's readings (paho-mqtt 2.x).

    outage_sub.py --port 18871 --client-id outage-sub-edge --out records.jsonl \\
        --ready-file sub.ready --watch-pid-file agent.pid [--max-seconds 600]

The shared ``peers/thingsboard/outage_sub.py`` parses ThingsBoard gateway messages;
this one subscribes the same way and writes the same records, for edge's payloads,
so the shared ``outage_analyze.py`` reads both:

* fixed client id, clean_session=False, ``#`` at QoS 1, reconnect back-off
  0.1..0.5 s: a broker with persistence stopped by SIGTERM keeps the session and
  queues what the agent publishes after the restart while this is still reconnecting.
  It subscribes on a connect without a session present (a re-subscription would
  make the broker send the retained state again, which would pass for the agent's
  first message after the restart);
* one JSON line per message: ``{"t": arrival, "topic", "dup": 0|1, "retain": 0|1,
  "bytes", "entries": [[device, ts, read_ts, change_ts, counter, n_values]],
  "seqs": [seq]}`` (``entries``/``seqs`` on telemetry topics only; ``seqs`` is
  parallel to ``entries`` and unknown to outage_analyze.py, which ignores it);
* ``{"event": "connect"|"disconnect", "t", ...}`` and, once a second, ``{"event":
  "proc", "t", "rss_mb", "cpu", "pid"}`` for the process tree whose PID is in
  ``--watch-pid-file``, re-read every second (the agent's PID changes when
  outage.sh restarts it after a SIGKILL).

Telemetry topic ``edge/v1/<node>/telemetry/<namespace>/<device>``, payload
``{"device", "ts", "seq", "values": {...}, "quality"?: {...}}``; the values hold
``read_ts``, ``change_ts`` and ``counter`` (bench/gen_manifests.py); the device is
named ``<namespace>/<device>``. Stops on SIGTERM/SIGINT or after --max-seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import threading
import time
from typing import Any

import paho.mqtt.client as mqtt

try:
    import psutil
except ImportError:  # sampling is optional
    psutil = None

DATA_TOPIC = "edge/v1/+/telemetry/+/+"


def entry(topic: str, body: Any) -> tuple[list[Any], Any] | None:
    """([device, ts, read_ts, change_ts, counter, n_values], seq) of one reading."""
    if not isinstance(body, dict) or not isinstance(body.get("values"), dict):
        return None
    parts = topic.split("/")
    device = f"{parts[4]}/{parts[5]}" if len(parts) >= 6 else str(body.get("device"))
    vals = body["values"]
    row = [
        device,
        body.get("ts"),
        vals.get("read_ts"),
        vals.get("change_ts"),
        vals.get("counter"),
        len(vals),
    ]
    return row, body.get("seq")


class Watch:
    """RSS and CPU of a process tree, its root PID read from a file every sample."""

    def __init__(self, pid_file: str | None) -> None:
        self.pid_file = pid_file
        self.pid: int | None = None
        self.procs: dict[int, Any] = {}

    def sample(self) -> dict[str, Any] | None:
        if psutil is None or not self.pid_file:
            return None
        try:
            with open(self.pid_file, encoding="ascii") as f:
                pid = int(f.read().strip())
        except (OSError, ValueError):
            return None
        if pid != self.pid:
            self.pid, self.procs = pid, {}
        try:
            root = psutil.Process(pid)
            tree = [root, *root.children(recursive=True)]
        except psutil.Error:
            return None
        rss, cpu = 0, 0.0
        for p in tree:
            pp = self.procs.setdefault(p.pid, p)  # the same object, so cpu_percent has a base
            try:
                cpu += pp.cpu_percent(None)
                rss += pp.memory_info().rss
            except psutil.Error:
                pass
        return {
            "event": "proc",
            "t": time.time(),
            "rss_mb": round(rss / 2**20, 1),
            "cpu": round(cpu, 1),
            "pid": pid,
        }


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--client-id", default=f"outage-sub-{os.getpid()}")
    ap.add_argument("--out", required=True, help="JSON-lines record file")
    ap.add_argument("--ready-file", default=None)
    ap.add_argument("--watch-pid-file", default=None, help="sample the tree of the PID in here")
    ap.add_argument("--max-seconds", type=float, default=600)
    return ap.parse_args()


class Recorder:
    """paho callbacks that append one JSON line per event to the record file."""

    def __init__(self, out: Any, ready_file: str | None) -> None:
        self.out = out
        self.ready_file = ready_file
        self.ready = threading.Event()
        self.lock = threading.Lock()

    def write(self, rec: dict[str, Any]) -> None:
        line = json.dumps(rec, separators=(",", ":"))
        with self.lock:
            self.out.write(line + "\n")

    def on_connect(self, c: mqtt.Client, _u: Any, flags: Any, rc: Any, _p: Any) -> None:
        present = bool(getattr(flags, "session_present", False))
        self.write(
            {"event": "connect", "t": time.time(), "rc": str(rc), "session_present": present}
        )
        if not present:
            c.subscribe("#", qos=1)

    def on_subscribe(self, *_a: Any) -> None:
        if not self.ready.is_set():
            self.ready.set()
            if self.ready_file:
                with open(self.ready_file, "w", encoding="ascii") as f:
                    f.write(str(os.getpid()))

    def on_disconnect(self, _c: mqtt.Client, _u: Any, _f: Any, rc: Any, _p: Any) -> None:
        self.write({"event": "disconnect", "t": time.time(), "rc": str(rc)})

    def on_message(self, _c: mqtt.Client, _u: Any, msg: mqtt.MQTTMessage) -> None:
        rec: dict[str, Any] = {
            "t": time.time(),
            "topic": msg.topic,
            "dup": int(msg.dup),
            "retain": int(msg.retain),
            "bytes": len(msg.payload),
        }
        if mqtt.topic_matches_sub(DATA_TOPIC, msg.topic):
            try:
                got = entry(msg.topic, json.loads(msg.payload))
            except ValueError:
                got = None
            if got is None:
                rec["parse_error"] = True
            else:
                rec["entries"], rec["seqs"] = [got[0]], [got[1]]
        self.write(rec)


def main() -> int:
    a = parse_args()
    with open(a.out, "w", buffering=1, encoding="utf-8") as out:
        rec = Recorder(out, a.ready_file)
        c = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2,
            client_id=a.client_id,
            clean_session=False,
            protocol=mqtt.MQTTv311,
        )
        c.reconnect_delay_set(min_delay=0.1, max_delay=0.5)
        c.on_connect, c.on_subscribe = rec.on_connect, rec.on_subscribe
        c.on_disconnect, c.on_message = rec.on_disconnect, rec.on_message
        c.connect(a.host, a.port, keepalive=10)
        c.loop_start()

        stop = threading.Event()
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
        signal.signal(signal.SIGINT, lambda *_: stop.set())
        t0 = time.time()
        watch = Watch(a.watch_pid_file)
        while not stop.is_set() and time.time() - t0 < a.max_seconds:
            stop.wait(1.0)
            sample = watch.sample()
            if sample is not None:
                rec.write(sample)
        c.loop_stop()
        c.disconnect()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
