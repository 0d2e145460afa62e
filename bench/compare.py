#!/usr/bin/env python3
"""Before/after: two gateway binaries in one sitting, runs alternated, same load generator.

Usage: python3 bench/compare.py BEFORE_BIN AFTER_BIN [RUNS]
Prints, for each scenario, every run and the median of each binary: fan-out 1 room x 1,000
subscribers at 100,000/s and 900,000/s (deliveries/s, p50/p99, server CPU per million,
loadgen CPU), and idle memory per joined wss connection at 10,000 connections.
The load generator is target/release/loadgen; the server is pinned to core 0, it to core 1.
"""
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run  # noqa: E402


def main():
    before, after = Path(sys.argv[1]).resolve(), Path(sys.argv[2]).resolve()
    runs = int(sys.argv[3]) if len(sys.argv) > 3 else 3
    if not run.CERT.exists():
        run.sh([after, "certs", "dev", "--out", run.CERT.parent])
    scenarios = [
        ("fan-out 1x1000 @100k", run.fanout_args(1, 1000, 100_000, False)),
        ("fan-out 1x1000 @900k", run.fanout_args(1, 1000, 900_000, False)),
        ("idle 10k wss", ["idle", "--connections", "10000"]),
    ]
    for name, args in scenarios:
        got = {"before": [], "after": []}
        for _ in range(runs):
            for label, binary in (("before", before), ("after", after)):
                run.GATEWAY = binary
                r = run.once("gateway", args)
                got[label].append(r)
                print(f"{name} {label}: {run.summary(r)}", flush=True)
        for label, rs in got.items():
            ok = [r for r in rs if "error" not in r]
            if not ok:
                print(f"== {name} {label}: every run failed")
                continue
            if args[0] == "idle":
                print(f"== {name} {label}: median {statistics.median(r['bytes_per_connection'] for r in ok):,.0f} B/connection")
            else:
                med = lambda f: statistics.median(f(r) for r in ok)
                print(f"== {name} {label}: median {med(lambda r: r['deliveries_per_sec']):,.0f}/s "
                      f"p50 {med(lambda r: r['latency_ms']['p50']):.1f} p99 {med(lambda r: r['latency_ms']['p99']):.1f} ms "
                      f"loss {sum(r['losses'] for r in ok)} cpu/M {med(lambda r: r['server_cpu_s_per_million']):.2f} s "
                      f"loadgen cpu {med(lambda r: r['client_cpu_s']):.1f} s")


if __name__ == "__main__":
    main()
