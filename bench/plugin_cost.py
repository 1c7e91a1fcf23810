"""What a plugin costs per batch: a 50-point reading through the shipped deadband, as
the agent runs it (DESIGN.md §7's budget: ≤ 50 µs per batch on this machine).

    .venv/bin/python bench/plugin_cost.py [--points 50] [--batches 20000] [--repeat 3]
        [--out FILE]

Loads plugins/deadband/manifest.yaml the way the agent does (validated, compiled,
instantiated by :class:`edge.wasm.host.Plugins`) and times, per reading, what the agent
does between the poller and the outbox: without the plugin, making the telemetry
payload (``Reading.payload_json``); with it, ``Plugins.process`` and the payloads of
what it answers. Both are timed on each reading in turn (paired), and the overhead is
the difference of their medians: the batch JSON, the call into wasmtime, the plugin's
own work, and reading its answer (JSON and checks) when it changed something. This
machine's speed drifts (the same payload takes 35–70 µs from one minute to the next),
so the whole is repeated (``--repeat``, default 3) and each figure is the run with the
smallest overhead; every run is kept in the output. Three kinds of batch: every value
moved past its deadband (all reported), a tenth moved, none moved (the reading is
dropped). The values are float32 (what Modbus meters send) as doubles, e.g.
229.8000030517578. It also times the parts on their own. Waits for a quiet machine
first (wait_quiet.py). Prints JSON; ``--out`` writes it too.
"""

from __future__ import annotations

import argparse
import json
import platform
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import yaml

from edge.config.load import load_config
from edge.reading import Reading
from edge.wasm.host import Plugins, decode, encode
from edge.wasm.instance import Runtime

HERE = Path(__file__).resolve().parent


def float32(x: float) -> float:
    """``x`` as a float32 register would carry it."""
    return float(struct.unpack(">f", struct.pack(">f", x))[0])


def deadband_host(workdir: Path) -> Plugins:
    agent = workdir / "edge.yaml"
    agent.write_text(yaml.safe_dump({
        "node": "bench", "store": {"path": str(workdir / "edge.db")},
        "plugins": {"dir": str(HERE.parent / "plugins" / "deadband")}}))
    host = Plugins(Runtime(), None, lambda kind, /, **f: None)
    host.configure(load_config(agent).plugins)
    return host


def timed(n: int, make: Callable[[int], Reading], run: Callable[[Reading], object]
          ) -> dict[str, float]:
    """µs per call of ``run`` over ``n`` readings (made before the clock starts)."""
    readings = [make(i) for i in range(n)]
    samples = []
    cpu0 = time.process_time()
    for r in readings:
        t0 = time.perf_counter_ns()
        run(r)
        samples.append(time.perf_counter_ns() - t0)
    cpu = time.process_time() - cpu0
    samples.sort()
    return {"p50_us": samples[n // 2] / 1000, "p99_us": samples[int(n * 0.99)] / 1000,
            "mean_us": sum(samples) / n / 1000, "cpu_us_per_batch": cpu / n * 1e6}


def paired(n: int, make: Callable[[int], Reading], plain: Callable[[Reading], object],
           plugged: Callable[[Reading], object]) -> tuple[dict[str, float], dict[str, float]]:
    """Both paths on each reading (its own copy for each), one after the other, so that
    the machine's drift over the run falls on both alike."""
    a: list[int] = []
    b: list[int] = []
    for i in range(n):
        r1, r2 = make(i), make(i)
        t0 = time.perf_counter_ns()
        plain(r1)
        t1 = time.perf_counter_ns()
        plugged(r2)
        t2 = time.perf_counter_ns()
        a.append(t1 - t0)
        b.append(t2 - t1)

    def figures(xs: list[int]) -> dict[str, float]:
        xs.sort()
        return {"p50_us": xs[n // 2] / 1000, "p99_us": xs[int(n * 0.99)] / 1000,
                "mean_us": sum(xs) / n / 1000}
    return figures(a), figures(b)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--points", type=int, default=50)
    p.add_argument("--batches", type=int, default=20000)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--out", type=Path)
    a = p.parse_args()
    quiet = subprocess.run([sys.executable, str(HERE / "wait_quiet.py"), "--max-wait-s", "120"],
                           capture_output=True, text=True, check=False)
    names = [f"tag_{i:02d}" for i in range(a.points)]
    with tempfile.TemporaryDirectory() as tmp:
        host = deadband_host(Path(tmp))

        def reading(i: int, every: int) -> Reading:
            """Reading ``i``: every ``every``-th value 10 higher than in reading i-1."""
            values: dict[str, float | int | bool | str] = {
                n: float32(230.0 + (10 * i if j % every == 0 else 0) + j / 7)
                for j, n in enumerate(names)}
            return Reading("default", "meter-1", 1_764_763_200_000 + 100 * i, i + 1, values)

        def with_plugin(r: Reading) -> None:
            for out in host.process(r):
                out.payload_json()

        runs: dict[str, list[dict[str, object]]] = {}
        for _ in range(a.repeat):
            for label, every in (("all_moved", 1), ("tenth_moved", 10), ("none_moved", 0)):
                make = (lambda i: reading(0, 1)) if not every else (
                    lambda i, e=every: reading(i + 1, e))
                host.process(reading(0, 1))  # first sight: everything is reported
                plain, plugged = paired(a.batches, make, Reading.payload_json, with_plugin)
                runs.setdefault(label, []).append({
                    "without_plugin": plain, "with_plugin": plugged,
                    "overhead_p50_us": plugged["p50_us"] - plain["p50_us"],
                    "overhead_mean_us": plugged["mean_us"] - plain["mean_us"]})
        results = {label: min(rs, key=lambda r: float(r["overhead_p50_us"]))  # type: ignore[arg-type]
                   for label, rs in runs.items()}
        plugin = host.plugins["deadband"]
        instance = plugin._instance
        assert instance is not None
        sample = reading(10**6, 1)
        batch = [sample]
        data = encode(batch)
        answer = instance.process(data)
        parts = {
            "values_json": timed(a.batches, lambda i: reading(i, 1), Reading.values_json),
            "encode_batch": timed(a.batches, lambda i: sample, lambda r: encode([r])),
            "wasm_call": timed(a.batches, lambda i: sample, lambda r: instance.process(data)),
            "decode_answer": timed(a.batches, lambda i: sample, lambda r: decode(answer, batch)),
        }
        stats = host.stats()["deadband"]
        host.close()
    out = {
        "what": f"Plugins.process of one {a.points}-point reading through plugins/deadband",
        "batches": a.batches, "points": a.points, "bytes_in": len(data),
        "machine": {"python": platform.python_version(), "cpu": platform.processor() or
                    platform.machine(), "busy_pct_before": quiet.stdout.strip()},
        "results": results, "runs": runs, "parts_all_moved": parts,
        "note": "decode_answer is paid only when the answer differs from the batch (a "
                "plugin that changed something); an unchanged answer is the batch itself",
        "host_stats": {k: stats[k] for k in ("calls", "errors", "traps", "timeouts",
                                             "p50_us", "p99_us")},
        "date": time.strftime("%Y-%m-%d"),
    }
    text = json.dumps(out, indent=2)
    print(text)
    if a.out:
        a.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
