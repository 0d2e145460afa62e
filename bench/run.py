#!/usr/bin/env python3
"""The benchmark: the gateway against the seeds' Node `ws` server and uWebSockets.js, all
driven by the same Rust load generator, in one run, on this machine.

Method: the server under test is pinned to core 0 and the load generator to core 1
(taskset); every measurement starts a fresh server; fan-out runs have 2 s warm-up, 10 s
measured, 3 s drain; figures are the median of 3 runs unless a scenario says otherwise.
Writes bench/results/<UTC date>.json and .md and prints the table.

Upstream calls (issue 22): `--only rpc` (rpc round trips through the gateway to the trivial
backend tests/src/bin/upstream_backend.rs, beside the same calls straight to the backend and
the gateway answering by itself, at 1,000/s and 10,000/s) and `--only fanout_upstream`
(fan-out 1 x 1,000 with a publish upstream answering {} beside the same without); the
backend runs on the load generator's core. See docs/benchmark.md.

Usage: python3 bench/run.py [--quick] [--no-pin] [--only NAME ...]
"""
import argparse
import datetime
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
CERT = BENCH / ".gateway" / "cert.pem"
KEY = BENCH / ".gateway" / "key.pem"
GATEWAY = ROOT / "target" / "release" / "gateway"
LOADGEN = ROOT / "target" / "release" / "loadgen"
BACKEND = ROOT / "target" / "release" / "upstream_backend"
PEERS = {"node-ws": ROOT / "tests/peers/node-ws/server.mjs", "uws": ROOT / "tests/peers/uws/server.mjs"}
TARGETS = ["gateway", "node-ws", "uws"]
# Cores (taskset lists): the server under test, the load generator. `--no-pin` gives every
# process both cores (for a machine whose core 0 is busy with something else).
SERVER_CORES, CLIENT_CORES = "0", "1"


def sh(cmd, **kw):
    print("+", " ".join(map(str, cmd)), file=sys.stderr)
    subprocess.run(cmd, check=True, **kw)


def prepare(peers=True):
    sh(["nice", "-n", "10", "cargo", "build", "--release", "--locked", "-p", "gateway", "--bin", "gateway",
        "-p", "gateway-tests", "--bin", "loadgen", "--bin", "upstream_backend"], cwd=ROOT)
    for peer in PEERS.values() if peers else ():
        if not (peer.parent / "node_modules").exists():
            sh(["npm", "ci", "--no-audit", "--no-fund"], cwd=peer.parent)
    if not CERT.exists():
        sh([GATEWAY, "certs", "dev", "--out", CERT.parent])


def free_port():
    while True:
        with socket.socket() as t, socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
            t.bind(("127.0.0.1", 0))
            port = t.getsockname()[1]
            try:
                u.bind(("127.0.0.1", port))
                return port
            except OSError:
                continue


class Server:
    """A fresh server pinned to core 0."""

    def __init__(self, target, config=None):
        self.port = free_port()
        if target == "gateway":
            cmd = ["taskset", "-c", SERVER_CORES, GATEWAY, "--config", config or BENCH / "gateway.toml",
                   "--listen", f"127.0.0.1:{self.port}"]
            env = dict(os.environ, GATEWAY_LOG="warn")
        else:
            cmd = ["taskset", "-c", SERVER_CORES, "node", PEERS[target], str(self.port), CERT, KEY]
            env = dict(os.environ)
        self.proc = subprocess.Popen(cmd, cwd=BENCH, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                     env=env, text=True)
        line = self.proc.stdout.readline()
        if "listening" not in line:
            raise RuntimeError(f"{target} did not start: {line!r}")
        time.sleep(0.5)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def loadgen(server, target, args, transport="wss", extra=()):
    cmd = ["taskset", "-c", CLIENT_CORES, LOADGEN, "--addr", f"127.0.0.1:{server.port}", "--cert", CERT,
           "--server-pid", str(server.proc.pid), "--target", target, "--transport", transport,
           *extra] + args
    out = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, RUST_BACKTRACE="0"))
    if out.returncode != 0:
        return {"error": (out.stderr or out.stdout).strip().splitlines()[:3]}
    return json.loads(out.stdout)


def once(target, args, transport="wss"):
    with Server(target) as s:
        return loadgen(s, target, args, transport)


def median_run(target, args, key, runs, transport="wss"):
    results = [once(target, args, transport) for _ in range(runs)]
    ok = [r for r in results if "error" not in r]
    if not ok:
        return results[0]
    ok.sort(key=key)
    med = ok[len(ok) // 2]
    med["runs"] = len(results)
    med["failed_runs"] = len(results) - len(ok)
    return med


def fanout_args(rooms, members, rate, quick):
    d = ["--duration", "4", "--warmup", "1", "--drain", "2"] if quick else []
    return ["fanout", "--rooms", str(rooms), "--members", str(members), "--rate", str(rate)] + d


def passes(r, rate):
    return ("error" not in r and r["losses"] == 0 and r["duplicates"] == 0
            and r["latency_ms"]["p99"] <= 100 and r["deliveries_per_sec"] >= 0.97 * rate)


def sweep(target, rates, quick, transport="wss"):
    steps, best = [], None
    for rate in rates:
        r = once(target, fanout_args(1, 1000, rate, quick), transport)
        steps.append({"rate": rate, "ok": passes(r, rate), "result": r})
        print(f"  sweep {target}/{transport} {rate}: {'ok' if passes(r, rate) else 'FAIL'} "
              f"{summary(r)}", file=sys.stderr)
        if not passes(r, rate):
            break
        best = r
    return {"best": best, "steps": steps}


def summary(r):
    if "error" in r:
        return f"error {r['error']}"
    if r.get("scenario") == "fanout":
        return (f"{r['deliveries_per_sec']:.0f}/s p50 {r['latency_ms']['p50']:.1f} p99 {r['latency_ms']['p99']:.1f} "
                f"max {r['latency_ms']['max']:.1f} ms loss {r['losses']} cpu/M {r['server_cpu_s_per_million']:.2f} s "
                f"client {r['client_cpu_s']:.1f} s{' CLIENT-BOUND' if r['client_bound'] else ''}")
    if r.get("scenario") == "rpc":
        l = r["rtt_ms"]
        cpu = lambda k: "—" if r.get(k) is None else f"{r[k]:.1f}"
        return (f"{r['mode']} {r['calls_per_sec']:.0f}/s p50 {l['p50']:.3f} p99 {l['p99']:.3f} max {l['max']:.1f} ms "
                f"errors {sum(r['errors'].values())} lost {r['lost']} overflow {r['overflow']} "
                f"server {cpu('server_cpu_us_per_call')} us/call backend {cpu('backend_cpu_us_per_call')} us/call "
                f"loadgen {r['client_cpu_frac'] * 100:.0f}%{' CLIENT-BOUND' if r['client_bound'] else ''}")
    return json.dumps(r)


# --- Upstream calls (issue 22): a trivial backend beside the gateway -------------------------

def backend_cores():
    """The backend shares the load generator's core: the gateway keeps core 0 to itself."""
    return CLIENT_CORES


class Backend:
    """A fresh trivial backend (tests/src/bin/upstream_backend.rs) pinned to BACKEND_CORE."""

    def __init__(self):
        self.proc = subprocess.Popen(["taskset", "-c", backend_cores(), BACKEND], stdout=subprocess.PIPE,
                                     stderr=subprocess.DEVNULL, text=True)
        line = self.proc.stdout.readline()
        if not line.startswith("listening "):
            raise RuntimeError(f"backend did not start: {line!r}")
        self.addr = line.split()[1]

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.proc.terminate()
        self.proc.wait(10)


def upstream_config(backend):
    """bench/gateway.toml plus /rpc (rpc upstream) and /up (publish upstream for bench-* rooms)."""
    base = (BENCH / "gateway.toml").read_text()
    extra = f"""
[[endpoint]]
path = "/rpc"
auth = "none"
rate_per_sec = 100000
rate_burst = 100000

[endpoint.upstream]
url = "http://{backend.addr}/gw"
events = ["rpc"]
max_in_flight = 4096
timeout_ms = 2000

[[endpoint]]
path = "/up"
auth = "none"
rate_per_sec = 100000
rate_burst = 100000

[endpoint.upstream]
url = "http://{backend.addr}/gw"
events = ["publish"]
rooms = ["bench-*"]
max_in_flight = 4096
timeout_ms = 2000
"""
    # The [[endpoint]] tables must come before the [[room]] ones' sub-keys: put them first.
    head, sep, rooms = base.partition("# Benchmark rooms")
    path = BENCH / "upstream.generated.toml"  # beside gateway.toml: the dev certificate is found relative to the config
    path.write_text(head + extra + "\n" + sep + rooms)
    return path


def loadavg():
    return open("/proc/loadavg").read().split()[:3]


def rpc_once(mode, rate, quick):
    """mode: direct (loadgen -> backend), gateway (loadgen -> gateway /rpc -> backend) or
    gateway_only (rpc frames to /chat, which has no upstream: the gateway answers not_found
    itself; its own round trip, no backend call)."""
    load = loadavg()
    r = _rpc_once(mode, rate, quick)
    r["loadavg_before"] = load
    if mode == "gateway_only" and "error" not in r:
        r["rtt_ms"] = r["error_rtt_ms"]
        r["calls_per_sec"] = round(r["errored"] / r["seconds"])
        r["mode"] = "gateway_only"
    return r


def _rpc_once(mode, rate, quick):
    d = ["--warmup", "1", "--duration", "4"] if quick else ["--warmup", "2", "--duration", "10"]
    args = ["rpc", "--rate", str(rate)] + d
    with Backend() as b:
        if mode == "direct":
            cmd = ["taskset", "-c", CLIENT_CORES, LOADGEN, "--addr", b.addr, "--cert", CERT, "--backend-pid",
                   str(b.proc.pid), "--target", "backend", *args, "--direct"]
            out = subprocess.run(cmd, capture_output=True, text=True)
            if out.returncode != 0:
                return {"error": (out.stderr or out.stdout).strip().splitlines()[:3]}
            return json.loads(out.stdout)
        with Server("gateway", upstream_config(b)) as s:
            path = "/rpc" if mode == "gateway" else "/chat"
            return loadgen(s, "gateway", args, extra=["--path", path, "--backend-pid", str(b.proc.pid)])


def fanout_upstream_once(path, rate, quick):
    load = loadavg()
    with Backend() as b:
        with Server("gateway", upstream_config(b)) as s:
            r = loadgen(s, "gateway", fanout_args(1, 1000, rate, quick),
                        extra=["--path", path, "--backend-pid", str(b.proc.pid)])
    r["loadavg_before"] = load
    return r


def medians(rs, fields):
    """Per-field medians over the runs that did not fail (fields: dotted paths)."""
    ok = [r for r in rs if "error" not in r]
    out = {"runs": len(rs), "failed_runs": len(rs) - len(ok)}
    for f in fields:
        vals = []
        for r in ok:
            v = r
            for k in f.split("."):
                v = v.get(k) if isinstance(v, dict) else None
            if v is not None:
                vals.append(v)
        out[f] = statistics.median(vals) if vals else None
    return out


RPC_FIELDS = ["rtt_ms.p50", "rtt_ms.p90", "rtt_ms.p99", "rtt_ms.p999", "rtt_ms.max", "calls_per_sec",
              "server_cpu_us_per_call", "backend_cpu_us_per_call", "client_cpu_frac", "lost", "overflow", "errored"]
FANOUT_FIELDS = ["deliveries_per_sec", "latency_ms.p50", "latency_ms.p99", "latency_ms.max", "losses",
                 "server_cpu_s_per_million", "backend_cpu_s", "client_cpu_s"]


def rpc_scenario(runs, quick):
    res = {}
    for rate in (1_000, 10_000):
        got = {"direct": [], "gateway": [], "gateway_only": []}
        order = ["direct", "gateway", "gateway_only"]
        for i in range(runs):
            # Alternated, the order rotated every run.
            for mode in order[i % 3:] + order[:i % 3]:
                r = rpc_once(mode, rate, quick)
                got[mode].append(r)
                print(f"rpc@{rate} {summary(r) if 'error' not in r else r}", file=sys.stderr, flush=True)
        res[str(rate)] = {m: {"median": medians(rs, RPC_FIELDS), "runs": rs} for m, rs in got.items()}
    return res


def fanout_upstream_scenario(runs, quick):
    res = {}
    for rate in (100_000, 900_000):
        got = {"without": [], "publish_upstream": []}
        for i in range(runs):
            for label in (("without", "publish_upstream") if i % 2 == 0 else ("publish_upstream", "without")):
                r = fanout_upstream_once("/chat" if label == "without" else "/up", rate, quick)
                got[label].append(r)
                print(f"fanout-upstream@{rate} {label}: {summary(r)} backend cpu {r.get('backend_cpu_s')}",
                      file=sys.stderr, flush=True)
        res[str(rate)] = {m: {"median": medians(rs, FANOUT_FIELDS), "runs": rs} for m, rs in got.items()}
    return res


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="1 run each, shorter windows (smoke)")
    ap.add_argument("--only", nargs="*", default=None)
    ap.add_argument("--no-pin", action="store_true", help="every process on both cores")
    a = ap.parse_args()
    global SERVER_CORES, CLIENT_CORES
    if a.no_pin:
        SERVER_CORES = CLIENT_CORES = "0,1"
    # The upstream scenarios run the gateway alone: no peers to install for them.
    prepare(peers=a.only is None or bool(set(a.only) - {"rpc", "fanout_upstream"}))
    runs = 1 if a.quick else 3
    want = lambda name: a.only is None or name in a.only
    res = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.platform()}",
           "cpu": next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?"),
           "method": ("no pinning (every process on both cores)" if a.no_pin else
                      "server on core 0, loadgen (and the upstream backend) on core 1 (taskset)")
                     + "; fresh server per run; 2 s warm-up, 10 s measured, 3 s drain (rpc: 1 s); median of 3",
           "quick": a.quick}

    p99 = lambda r: r["latency_ms"]["p99"]
    if want("latency"):
        res["latency_100k"] = {}
        for t in TARGETS:
            r = median_run(t, fanout_args(1, 1000, 100_000, a.quick), p99, runs)
            res["latency_100k"][t] = r
            print(f"latency@100k {t}: {summary(r)}", file=sys.stderr)
    if want("sweep"):
        rates = [100_000, 200_000, 300_000, 400_000, 500_000, 600_000, 700_000, 800_000, 900_000, 1_000_000,
                 1_200_000, 1_500_000, 2_000_000, 2_500_000, 3_000_000, 3_500_000, 4_000_000, 5_000_000]
        res["sweep_1x1000"] = {t: sweep(t, rates, a.quick) for t in TARGETS}
    if want("webtransport"):
        rates = [100_000, 200_000, 300_000, 400_000, 500_000, 600_000, 700_000, 800_000]
        res["latency_100k_webtransport"] = median_run("gateway", fanout_args(1, 1000, 100_000, a.quick), p99, runs, "wt")
        print(f"latency@100k gateway/wt: {summary(res['latency_100k_webtransport'])}", file=sys.stderr)
        res["sweep_1x1000_webtransport"] = sweep("gateway", rates, a.quick, "wt")
    if want("rooms"):
        res["rooms_100x100_300k"] = {}
        for t in TARGETS:
            r = median_run(t, fanout_args(100, 100, 300_000, a.quick), p99, runs)
            res["rooms_100x100_300k"][t] = r
            print(f"rooms 100x100 @300k {t}: {summary(r)}", file=sys.stderr)
    if want("big"):
        res["fanout_1x10000_400k"] = {}
        for t in ["gateway", "uws"]:
            r = median_run(t, fanout_args(1, 10_000, 400_000, a.quick), p99, runs)
            res["fanout_1x10000_400k"][t] = r
            print(f"1x10000 @400k {t}: {summary(r)}", file=sys.stderr)
    if want("idle"):
        res["idle_10k"] = {}
        for t in TARGETS:
            r = median_run(t, ["idle", "--connections", "10000"], lambda r: r["bytes_per_connection"], runs)
            res["idle_10k"][t] = r
            print(f"idle 10k {t}: {summary(r)}", file=sys.stderr)
        r = median_run("gateway", ["idle", "--connections", "10000"], lambda r: r["bytes_per_connection"], runs, "wt")
        res["idle_10k"]["gateway-webtransport"] = r
        print(f"idle 10k gateway/wt: {summary(r)}", file=sys.stderr)
    if want("rpc"):
        res["rpc"] = rpc_scenario(runs, a.quick)
    if want("fanout_upstream"):
        res["fanout_upstream"] = fanout_upstream_scenario(runs, a.quick)
    if want("connect"):
        res["connect"] = {}
        for t in TARGETS:
            r = median_run(t, ["connect", "--connections", "3000", "--concurrency", "64"],
                           lambda r: r["server_cpu_ms_per_connection"] or 0, runs)
            res["connect"][t] = r
            print(f"connect {t}: {summary(r)}", file=sys.stderr)

    out_dir = BENCH / "results"
    out_dir.mkdir(exist_ok=True)
    stamp = res["date"][:16].replace(":", "") + ("-quick" if a.quick else "")
    (out_dir / f"{stamp}.json").write_text(json.dumps(res, indent=1))
    md = render(res)
    (out_dir / f"{stamp}.md").write_text(md)
    print(md)


def fmt(v, nd=1):
    return "—" if v is None else (f"{v:,.{nd}f}" if isinstance(v, float) else f"{v:,}")


def render(res):
    L = [f"Benchmark of {res['date']} on {res['machine']} ({res['cpu']}).", "", f"Method: {res['method']}.", ""]
    def ratio(a, b):
        return "—" if not a or not b else f"{a / b:.2f}×"
    if "sweep_1x1000" in res:
        L += ["### Fan-out, 1 room × 1,000 subscribers, 100-byte binary payloads: highest rate with zero loss and p99 ≤ 100 ms", "",
              "| target | deliveries/s | p50 ms | p99 ms | max ms | server CPU s per 10⁶ deliveries | loadgen CPU (of 10 s) | first failing step |", "|---|---|---|---|---|---|---|---|"]
        for t, s in res["sweep_1x1000"].items():
            b = s["best"]
            fail = next((st for st in s["steps"] if not st["ok"]), None)
            fail_txt = "none up to the top rate" if not fail else f"{fail['rate']:,}: " + (
                "error" if "error" in fail["result"] else
                f"{fail['result']['deliveries_per_sec']:,.0f}/s, loss {fail['result']['losses']}, p99 {fail['result']['latency_ms']['p99']:.0f} ms")
            if b:
                L.append(f"| {t} | {b['deliveries_per_sec']:,.0f} | {b['latency_ms']['p50']:.1f} | {b['latency_ms']['p99']:.1f} | {b['latency_ms']['max']:.1f} | {b['server_cpu_s_per_million']:.2f} | {b['client_cpu_s']:.1f} s{' (client-bound)' if b['client_bound'] else ''} | {fail_txt} |")
            else:
                L.append(f"| {t} | below the first step | | | | | | {fail_txt} |")
        g = (res["sweep_1x1000"]["gateway"]["best"] or {}).get("deliveries_per_sec")
        n = (res["sweep_1x1000"]["node-ws"]["best"] or {}).get("deliveries_per_sec")
        u = (res["sweep_1x1000"]["uws"]["best"] or {}).get("deliveries_per_sec")
        L += ["", f"Ratios: gateway / Node ws = {ratio(g, n)}, gateway / uWebSockets.js = {ratio(g, u)}.", ""]
    for key, title in [("latency_100k", "Latency at 100,000 deliveries/s (1 × 1,000, 100 B)"),
                       ("rooms_100x100_300k", "Many rooms: 100 rooms × 100 subscribers at 300,000 deliveries/s"),
                       ("fanout_1x10000_400k", "1 room × 10,000 subscribers at 400,000 deliveries/s")]:
        if key not in res:
            continue
        L += [f"### {title}", "", "| target | deliveries/s | losses | p50 ms | p90 ms | p99 ms | p99.9 ms | max ms | server CPU s per 10⁶ | loadgen CPU s |", "|---|---|---|---|---|---|---|---|---|---|"]
        for t, r in res[key].items():
            if "error" in r:
                L.append(f"| {t} | error: {' '.join(r['error'])[:80]} | | | | | | | | |")
                continue
            l = r["latency_ms"]
            L.append(f"| {t} | {r['deliveries_per_sec']:,.0f} | {r['losses']} | {l['p50']:.1f} | {l['p90']:.1f} | {l['p99']:.1f} | {l['p999']:.1f} | {l['max']:.1f} | {r['server_cpu_s_per_million']:.2f} | {r['client_cpu_s']:.1f}{' (client-bound)' if r['client_bound'] else ''} |")
        L.append("")
    if "latency_100k_webtransport" in res:
        r = res["latency_100k_webtransport"]
        best = res["sweep_1x1000_webtransport"]["best"]
        wss_best = (res.get("sweep_1x1000", {}).get("gateway", {}).get("best") or {}).get("deliveries_per_sec")
        L += ["### WebTransport subscribers (gateway), same fan-out", ""]
        if "error" not in r:
            L.append(f"At 100,000 deliveries/s: p50 {r['latency_ms']['p50']:.1f} ms, p99 {r['latency_ms']['p99']:.1f} ms, losses {r['losses']}, server CPU {r['server_cpu_s_per_million']:.2f} s per 10⁶.")
        if best:
            L.append(f"Highest zero-loss rate with p99 ≤ 100 ms: {best['deliveries_per_sec']:,.0f} deliveries/s (p99 {best['latency_ms']['p99']:.1f} ms) = {ratio(best['deliveries_per_sec'], wss_best)} of the wss figure.")
        L.append("")
    if "idle_10k" in res:
        L += ["### Idle memory, 10,000 connections (server RSS growth per connection)", "", "| target | bytes per connection | RSS before → after (KiB) |", "|---|---|---|"]
        for t, r in res["idle_10k"].items():
            if "error" in r:
                L.append(f"| {t} | error: {' '.join(r['error'])[:80]} | |")
            else:
                L.append(f"| {t} | {r['bytes_per_connection']:,.0f} | {r['rss_before_kib']:,} → {r['rss_after_kib']:,} |")
        L.append("")
    if "connect" in res:
        L += ["### Connection setup: full TLS 1.3 handshake + upgrade + welcome (3,000 connections, 64 in flight)", "", "| target | connections/s | server CPU ms per connection | loadgen CPU s |", "|---|---|---|---|"]
        for t, r in res["connect"].items():
            if "error" in r:
                L.append(f"| {t} | error | | |")
            else:
                L.append(f"| {t} | {r['connections_per_sec']:,.0f} | {r['server_cpu_ms_per_connection']:.3f} | {r['client_cpu_s']:.1f}{' (client-bound)' if r['client_bound'] else ''} |")
        L.append("")
    if "rpc" in res:
        L += render_rpc(res["rpc"])
    if "fanout_upstream" in res:
        L += render_fanout_upstream(res["fanout_upstream"])
    return "\n".join(L)


def render_rpc(rpc):
    f = lambda v, nd=3: "—" if v is None else f"{v:,.{nd}f}"
    L = ["### rpc round trips: through the gateway vs straight to the backend (medians of alternated runs)", "",
         "| rate | path | calls/s | p50 ms | p90 ms | p99 ms | max ms | gateway CPU µs/call | backend CPU µs/call | loadgen CPU | lost / errors / overflow |",
         "|---|---|---|---|---|---|---|---|---|---|---|"]
    for rate, modes in rpc.items():
        for mode in ("direct", "gateway", "gateway_only"):
            m = modes[mode]["median"]
            name = {"direct": "direct to the backend", "gateway": "through the gateway",
                    "gateway_only": "gateway alone (no upstream: not_found)"}[mode]
            L.append(f"| {int(rate):,}/s | {name} | {f(m['calls_per_sec'], 0)} | {f(m['rtt_ms.p50'])} | {f(m['rtt_ms.p90'])} | "
                     f"{f(m['rtt_ms.p99'])} | {f(m['rtt_ms.max'], 1)} | {f(m['server_cpu_us_per_call'], 1)} | "
                     f"{f(m['backend_cpu_us_per_call'], 1)} | {f(None if m['client_cpu_frac'] is None else m['client_cpu_frac'] * 100, 0)} % | "
                     f"{f(m['lost'], 0)} / {f(m['errored'], 0)} / {f(m['overflow'], 0)} |")
    L += ["", "| rate | gateway adds at p50 | at p99 | target (10,000/s) |", "|---|---|---|---|"]
    for rate, modes in rpc.items():
        g, d = modes["gateway"]["median"], modes["direct"]["median"]
        if None in (g["rtt_ms.p50"], d["rtt_ms.p50"]):
            continue
        a50, a99 = g["rtt_ms.p50"] - d["rtt_ms.p50"], g["rtt_ms.p99"] - d["rtt_ms.p99"]
        verdict = ("met" if a50 < 0.5 and a99 < 2 else "not met") if rate == "10000" else ""
        L.append(f"| {int(rate):,}/s | {a50:.3f} ms | {a99:.3f} ms | {verdict} |")
    L.append("")
    return L


def render_fanout_upstream(fu):
    f = lambda v, nd=1: "—" if v is None else f"{v:,.{nd}f}"
    L = ["### Fan-out 1 × 1,000 with a publish upstream answering {} vs without (medians of alternated runs)", "",
         "| deliveries/s target | endpoint | deliveries/s | losses | p50 ms | p99 ms | max ms | gateway CPU s per 10⁶ | backend CPU s | loadgen CPU s |",
         "|---|---|---|---|---|---|---|---|---|---|"]
    for rate, modes in fu.items():
        for label in ("without", "publish_upstream"):
            m = modes[label]["median"]
            L.append(f"| {int(rate):,} | {'no upstream' if label == 'without' else 'publish upstream'} | {f(m['deliveries_per_sec'], 0)} | "
                     f"{f(m['losses'], 0)} | {f(m['latency_ms.p50'])} | {f(m['latency_ms.p99'])} | {f(m['latency_ms.max'])} | "
                     f"{f(m['server_cpu_s_per_million'], 2)} | {f(m['backend_cpu_s'], 2)} | {f(m['client_cpu_s'])} |")
    L.append("")
    return L


if __name__ == "__main__":
    main()
