"""Cross-node fan-out over Redis, side by side with a single node, in one sitting.

1 room x 1,000 subscribers, 100-byte binary messages, one publisher, the Rust loadgen on
core 1; gateways and redis-server on core 0. Three set-ups: one node without `[cluster]`;
one node with `[cluster] redis` (every hop through Redis); two nodes with the subscribers
split between them and the publisher on the first. Prints one JSON object (medians of
RUNS runs per rate) and a Markdown table.

Usage: python3 bench/cluster.py [RATE ...]   (needs `cargo build --release -p gateway
-p gateway-tests` and redis-server)."""
import json
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GATEWAY = os.path.join(ROOT, "target", "release", "gateway")
LOADGEN = os.path.join(ROOT, "target", "release", "loadgen")
RATES = [int(r) for r in sys.argv[1:]] or [10_000, 100_000, 200_000]
RUNS = 3
BASE = open(os.path.join(ROOT, "bench", "gateway.toml")).read().replace("127.0.0.1:4433", "127.0.0.1:0")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_gateway(workdir, name, redis_port):
    text = BASE.replace('node_id = "bench"', f'node_id = "{name}"')
    if redis_port:
        text += f'\n[cluster]\nredis = "redis://127.0.0.1:{redis_port}"\n'
    path = os.path.join(workdir, f"{name}.toml")
    open(path, "w").write(text)
    proc = subprocess.Popen(["taskset", "-c", "0", GATEWAY, "--config", path], cwd=workdir,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    addr = cert = None
    while cert is None:
        line = proc.stdout.readline()
        if not line:
            raise RuntimeError("gateway exited")
        if line.startswith("listening https+wss on "):
            addr = line.split()[3]
        m = re.match(r"dev certificate (\S+)", line)
        if m:
            cert = os.path.join(workdir, m.group(1))
    return proc, addr, cert


def once(setup, rate):
    with tempfile.TemporaryDirectory() as workdir:
        procs, redis = [], None
        try:
            redis_port = None
            if setup != "single":
                redis_port = free_port()
                redis = subprocess.Popen(["taskset", "-c", "0", "redis-server", "--port", str(redis_port),
                                          "--save", "", "--appendonly", "no"], stdout=subprocess.DEVNULL)
                time.sleep(0.3)
            a, addr_a, cert = start_gateway(workdir, "node-a", redis_port)
            procs.append(a)
            args = [LOADGEN, "--addr", addr_a, "--cert", cert, "--server-pid", str(a.pid)]
            if setup == "two-nodes":
                b, addr_b, _ = start_gateway(workdir, "node-b", redis_port)
                procs.append(b)
                args += ["--second-addr", addr_b]
            args += ["fanout", "--rooms", "1", "--members", "1000", "--rate", str(rate),
                     "--warmup", "1", "--duration", "5", "--drain", "2"]
            out = subprocess.run(["taskset", "-c", "1"] + args, capture_output=True, text=True, timeout=120)
            return json.loads(out.stdout)
        finally:
            for p in procs:
                p.kill()
                p.wait()
            if redis:
                redis.kill()
                redis.wait()


def main():
    results = {"date": time.strftime("%Y-%m-%d"), "runs": RUNS, "rates": {}}
    for rate in RATES:
        row = {}
        for setup in ["single", "cluster-one-node", "two-nodes"]:
            runs = [once(setup, rate) for _ in range(RUNS)]
            pick = lambda key: statistics.median(r["latency_ms"][key] for r in runs)
            row[setup] = {
                "deliveries_per_sec": statistics.median(r["deliveries_per_sec"] for r in runs),
                "p50_ms": pick("p50"), "p99_ms": pick("p99"),
                "losses": max(r["losses"] for r in runs),
            }
            print(f"{rate}/s {setup}: {row[setup]}", file=sys.stderr)
        results["rates"][rate] = row
    print(json.dumps(results))
    print("| rate | set-up | deliveries/s | p50 ms | p99 ms | lost (worst run) |")
    print("|---|---|---|---|---|---|")
    for rate, row in results["rates"].items():
        for setup, r in row.items():
            print(f"| {rate:,} | {setup} | {r['deliveries_per_sec']:,.0f} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} | {r['losses']} |")


main()
