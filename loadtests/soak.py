"""Soak run: the soak profile (loadtests/soak.conf) plus what locust cannot see, the server's own
gauges sampled during the run, and the idle check afterwards. Writes OUT/summary.json and prints a
Markdown summary (the one in docs/deploy.md came from here).

    python loadtests/soak.py --host http://127.0.0.1:8000 [--users 64] [--run-time 10m]

The API key comes from LRSA_API_KEY. Loopback hosts only, unless --allow-remote.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

from hosts import check_target  # beside this script, which Python puts first on sys.path

ROOT = Path(__file__).resolve().parents[1]
GAUGES = (
    "vllm:num_requests_running",
    "vllm:num_requests_waiting",
    "vllm:kv_cache_usage_perc",
    "lagkv_resident_kv_tokens",
    "lagkv_logical_kv_tokens",
)
COUNTERS = ("lagkv_compressed_partitions_total", "lagkv_evicted_tokens_total",
            "lagkv_freed_blocks_total")  # fmt: skip


def scrape(host: str) -> dict[str, float]:
    """Each series summed over its labels (the engine label, the model name)."""
    text = urllib.request.urlopen(f"{host}/metrics", timeout=10).read().decode()
    values: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name = re.split(r"[{ ]", line, maxsplit=1)[0]
            values[name] = values.get(name, 0.0) + float(line.rpartition(" ")[2])
    return values


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", required=True)
    parser.add_argument("--users", type=int)
    parser.add_argument("--run-time")
    parser.add_argument("--out", default="out/soak")
    parser.add_argument("--allow-remote", action="store_true")
    parser.add_argument("--sample-every", type=float, default=5.0)
    args, extra = parser.parse_known_args()
    check_target(args.host, args.allow_remote)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    locust = shutil.which("locust", path=str(Path(sys.executable).parent)) or "locust"
    cmd = [locust, "--config", "loadtests/soak.conf", "--host", args.host,
           "--csv", str(out / "locust"), *extra]  # fmt: skip
    if args.users:
        cmd += ["--users", str(args.users), "--spawn-rate", str(max(1, args.users // 16))]
    if args.run_time:
        cmd += ["--run-time", args.run_time]
    if args.allow_remote:
        cmd.append("--allow-remote")

    before = scrape(args.host)
    peaks: dict[str, float] = {name: 0.0 for name in GAUGES}
    ratios: list[float] = []
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(args.sample_every):
            try:
                values = scrape(args.host)
            except OSError:
                continue
            for name in GAUGES:
                peaks[name] = max(peaks[name], values.get(name, 0.0))
            if values.get("lagkv_resident_kv_tokens"):
                ratios.append(
                    values["lagkv_logical_kv_tokens"] / values["lagkv_resident_kv_tokens"]
                )

    sampler = threading.Thread(target=sample, daemon=True)
    started = time.time()
    sampler.start()
    result = subprocess.run(cmd, cwd=ROOT, env=os.environ.copy())
    stop.set()
    sampler.join()
    wall = time.time() - started

    # The pool must drain back to idle once the load stops.
    deadline = time.time() + 120
    while True:
        after = scrape(args.host)
        idle = {name: after.get(name, 0.0) for name in GAUGES[:4]}
        if not any(idle.values()) or time.time() > deadline:
            break
        time.sleep(1)

    with open(out / "locust_stats.csv") as f:
        rows = list(csv.DictReader(f))
    summary = {
        "command": " ".join(cmd),
        "locust_exit_code": result.returncode,
        "wall_seconds": round(wall, 1),
        "stats": {
            f"{r['Type']} {r['Name']}".strip(): {
                "count": int(r["Request Count"]),
                "failures": int(r["Failure Count"]),
                "median_ms": float(r["50%"] or 0),
                "p95_ms": float(r["95%"] or 0),
                "p99_ms": float(r["99%"] or 0),
            }
            for r in rows
        },
        "peaks": peaks,
        "compression_ratio_max": round(max(ratios), 2) if ratios else None,
        "counters": {name: after.get(name, 0.0) - before.get(name, 0.0) for name in COUNTERS},
        "idle_after": idle,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")

    print("\n| series | requests | failures | median | p95 | p99 |\n|---|---|---|---|---|---|")
    for key, s in summary["stats"].items():
        print(f"| {key or 'Aggregated'} | {s['count']} | {s['failures']} | {s['median_ms']:.0f} ms "
              f"| {s['p95_ms']:.0f} ms | {s['p99_ms']:.0f} ms |")  # fmt: skip
    print(
        f"\npeaks: {json.dumps(peaks)}\ncompression ratio max: {summary['compression_ratio_max']}"
    )
    print(f"counters: {json.dumps(summary['counters'])}\nidle after: {json.dumps(idle)}")
    ok = result.returncode == 0 and not any(idle.values())
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
