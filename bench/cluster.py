"""Cross-node fan-out over Redis, side by side with a single node, in one sitting.

1 room x 1,000 subscribers, 100-byte binary messages, one publisher, the Rust loadgen on
core 1; gateways and redis-server(s) on core 0. Set-ups: one node without `[cluster]`;
one node with `[cluster] redis` (every hop through Redis); two nodes with the subscribers
split between them and the publisher on the first, through one Redis (`two-nodes`) and
through a Redis Cluster of three masters (`two-nodes-redis-cluster`, `[cluster]
redis_cluster`). Also the CPU time of the Redis processes per million deliveries (over
the whole run: warm-up, measurement and drain; deliveries counted as the measured rate
times warm-up plus measurement). Prints one JSON object (medians of RUNS runs per rate)
and a Markdown table.

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
SETUPS = os.environ.get("SETUPS", "single,cluster-one-node,two-nodes,two-nodes-redis-cluster").split(",")
WARMUP, DURATION = int(os.environ.get("WARMUP", "1")), 5
RUNS = 3
BASE = open(os.path.join(ROOT, "bench", "gateway.toml")).read().replace("127.0.0.1:4433", "127.0.0.1:0")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_seconds(pid):
    """User + system CPU time of a process so far."""
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def start_redis_cluster(workdir, masters=3):
    """`masters` cluster-enabled redis-servers on core 0, joined into one cluster."""
    procs, ports = [], []
    for i in range(masters):
        port, bus = free_port(), free_port()
        d = os.path.join(workdir, f"redis-{i}")
        os.makedirs(d)
        procs.append(subprocess.Popen(
            ["taskset", "-c", "0", "redis-server", "--port", str(port), "--cluster-port", str(bus),
             "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf", "--save", "",
             "--appendonly", "no", "--bind", "127.0.0.1", "--dir", d], stdout=subprocess.DEVNULL))
        ports.append(port)
    time.sleep(0.5)
    subprocess.run(["redis-cli", "--cluster", "create"] + [f"127.0.0.1:{p}" for p in ports]
                   + ["--cluster-replicas", "0", "--cluster-yes"], check=True, capture_output=True)
    for _ in range(100):
        states = [subprocess.run(["redis-cli", "-p", str(p), "cluster", "info"], capture_output=True,
                                 text=True).stdout for p in ports]
        if all("cluster_state:ok" in s for s in states):
            break
        time.sleep(0.1)
    return procs, ports


def start_gateway(workdir, name, redis_port, cluster_ports=None):
    text = BASE.replace('node_id = "bench"', f'node_id = "{name}"')
    if redis_port:
        text += f'\n[cluster]\nredis = "redis://127.0.0.1:{redis_port}"\n'
    if cluster_ports:
        seeds = ", ".join(f'"redis://127.0.0.1:{p}"' for p in cluster_ports)
        text += f'\n[cluster]\nredis_cluster = [{seeds}]\n'
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
        procs, redis = [], []
        try:
            redis_port, cluster_ports = None, None
            if setup == "two-nodes-redis-cluster":
                redis, cluster_ports = start_redis_cluster(workdir)
            elif setup != "single":
                redis_port = free_port()
                redis = [subprocess.Popen(["taskset", "-c", "0", "redis-server", "--port", str(redis_port),
                                           "--save", "", "--appendonly", "no"], stdout=subprocess.DEVNULL)]
                time.sleep(0.3)
            a, addr_a, cert = start_gateway(workdir, "node-a", redis_port, cluster_ports)
            procs.append(a)
            args = [LOADGEN, "--addr", addr_a, "--cert", cert, "--server-pid", str(a.pid)]
            if setup.startswith("two-nodes"):
                b, addr_b, _ = start_gateway(workdir, "node-b", redis_port, cluster_ports)
                procs.append(b)
                args += ["--second-addr", addr_b]
            args += ["fanout", "--rooms", "1", "--members", "1000", "--rate", str(rate),
                     "--warmup", str(WARMUP), "--duration", str(DURATION), "--drain", "2"]
            redis_cpu = sum(cpu_seconds(r.pid) for r in redis)
            out = subprocess.run(["taskset", "-c", "1"] + args, capture_output=True, text=True, timeout=120)
            redis_cpu = sum(cpu_seconds(r.pid) for r in redis) - redis_cpu
            result = json.loads(out.stdout)
            deliveries = result["deliveries_per_sec"] * (WARMUP + DURATION)
            result["redis_cpu_s_per_million"] = redis_cpu / deliveries * 1e6 if redis and deliveries else None
            return result
        finally:
            for p in procs + redis:
                p.kill()
                p.wait()


def main():
    results = {"date": time.strftime("%Y-%m-%d"), "runs": RUNS, "rates": {}}
    for rate in RATES:
        row = {}
        for setup in SETUPS:
            runs = [once(setup, rate) for _ in range(RUNS)]
            pick = lambda key: statistics.median(r["latency_ms"][key] for r in runs)
            row[setup] = {
                "deliveries_per_sec": statistics.median(r["deliveries_per_sec"] for r in runs),
                "p50_ms": pick("p50"), "p99_ms": pick("p99"),
                "losses": max(r["losses"] for r in runs),
                "redis_cpu_s_per_million": (statistics.median(r["redis_cpu_s_per_million"] for r in runs)
                                            if runs[0]["redis_cpu_s_per_million"] is not None else None),
            }
            print(f"{rate}/s {setup}: {row[setup]}", file=sys.stderr)
        results["rates"][rate] = row
    print(json.dumps(results))
    print("| rate | set-up | deliveries/s | p50 ms | p99 ms | lost (worst run) | Redis CPU s / 10⁶ deliveries |")
    print("|---|---|---|---|---|---|---|")
    for rate, row in results["rates"].items():
        for setup, r in row.items():
            cpu = "-" if r["redis_cpu_s_per_million"] is None else f"{r['redis_cpu_s_per_million']:.3f}"
            print(f"| {rate:,} | {setup} | {r['deliveries_per_sec']:,.0f} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} | {r['losses']} | {cpu} |")


main()
