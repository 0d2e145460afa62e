//! Load generator for the gateway and its peers (PROTOCOL.md over wss or WebTransport).
//!
//! Scenarios: `fanout` (rooms × members, open-loop publishers of binary envelopes carrying
//! their send time and sequence), `idle` (memory per idle connection) and `connect` (full
//! TLS handshakes + upgrade + welcome per second) and `rpc` (open-loop rpc round trips
//! through the gateway, or the same calls straight to the backend with `--direct`). Prints one JSON object on stdout and a
//! human summary on stderr. Runs on one thread: pin it with `taskset`.

use std::{
    cell::RefCell,
    net::SocketAddr,
    path::PathBuf,
    rc::Rc,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use gateway_tests::load::{
    proc_stats::{cpu_seconds, rss_kib},
    rpc, since,
    stats::{Observed, SeqTracker},
    wire::{opcode, publish_envelope},
    write_probe, ws_client, wt_client, PROBE_LEN,
};
use serde_json::json;
use tokio::{io::AsyncWriteExt, task::LocalSet};

#[derive(Parser)]
#[command(about = "Load generator speaking the gateway protocol over wss or WebTransport")]
struct Cli {
    /// Server address (TCP and UDP).
    #[arg(long, default_value = "127.0.0.1:4433")]
    addr: SocketAddr,
    /// A second node of the same cluster: every other subscriber connects there, while
    /// publishers stay on `--addr` (cross-node fan-out).
    #[arg(long)]
    second_addr: Option<SocketAddr>,
    /// Endpoint path.
    #[arg(long, default_value = "/chat")]
    path: String,
    /// PEM certificate the server presents (trusted for wss).
    #[arg(long)]
    cert: PathBuf,
    /// Subscriber transport.
    #[arg(long, value_enum, default_value = "wss")]
    transport: Transport,
    /// PID of the server, for its CPU and memory.
    #[arg(long)]
    server_pid: Option<u32>,
    /// PID of the application backend (upstream), for its CPU.
    #[arg(long)]
    backend_pid: Option<u32>,
    /// Name of the target in the report.
    #[arg(long, default_value = "gateway")]
    target: String,
    #[command(subcommand)]
    scenario: Scenario,
}

#[derive(Clone, Copy, ValueEnum, PartialEq, Eq, Debug)]
enum Transport {
    Wss,
    Wt,
}

#[derive(Subcommand)]
enum Scenario {
    /// Rooms × members subscribers; one open-loop publisher per room.
    Fanout {
        #[arg(long, default_value_t = 1)]
        rooms: usize,
        #[arg(long, default_value_t = 1000)]
        members: usize,
        /// Target deliveries per second, all rooms together.
        #[arg(long, default_value_t = 100_000)]
        rate: u64,
        /// Payload bytes per message.
        #[arg(long, default_value_t = 100)]
        size: usize,
        #[arg(long, default_value_t = 2.0)]
        warmup: f64,
        #[arg(long, default_value_t = 10.0)]
        duration: f64,
        #[arg(long, default_value_t = 3.0)]
        drain: f64,
    },
    /// Open idle connections and report the server's RSS growth per connection.
    Idle {
        #[arg(long, default_value_t = 10_000)]
        connections: usize,
    },
    /// Open-loop `rpc` calls at `rate` per second through the gateway at `--addr` +
    /// `--path` over wss; with `--direct`, the same calls POSTed to the backend at `--addr`.
    Rpc {
        #[arg(long, default_value_t = 1000)]
        rate: u64,
        /// wss connections (through the gateway) or HTTP/1.1 connections (direct).
        #[arg(long, default_value_t = 32)]
        connections: usize,
        /// Calls outstanding per connection at most.
        #[arg(long, default_value_t = 8)]
        in_flight: usize,
        /// Call the backend at `--addr` directly (plain HTTP/1.1).
        #[arg(long)]
        direct: bool,
        /// The backend's URL path prefix (direct: POST to PREFIX/rpc).
        #[arg(long, default_value = "/gw")]
        backend_path: String,
        #[arg(long, default_value_t = 2.0)]
        warmup: f64,
        #[arg(long, default_value_t = 10.0)]
        duration: f64,
        #[arg(long, default_value_t = 1.0)]
        drain: f64,
    },
    /// Full TLS handshakes + upgrade + welcome, as fast as the server takes them.
    Connect {
        #[arg(long, default_value_t = 3000)]
        connections: usize,
        #[arg(long, default_value_t = 64)]
        concurrency: usize,
    },
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let _ = rustls::crypto::ring::default_provider().install_default();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let local = LocalSet::new();
    let report = local.block_on(&rt, run(&cli))?;
    println!("{report}");
    Ok(())
}

fn tls_config(cli: &Cli, resumption: bool) -> Arc<rustls::ClientConfig> {
    let mut config = (*gateway_tests::client_tls(&cli.cert, &[b"http/1.1"])).clone();
    if !resumption {
        config.resumption = rustls::client::Resumption::disabled();
    }
    Arc::new(config)
}

fn cert_sha256(cli: &Cli) -> anyhow::Result<Vec<u8>> {
    use rustls_pki_types::{pem::PemObject, CertificateDer};
    let der = CertificateDer::from_pem_file(&cli.cert)?;
    let hex = gateway_certs::sha256_hex(&der);
    Ok(hex::decode(hex)?)
}

/// A subscriber of either transport, joined to its room.
enum Subscriber {
    Ws(ws_client::WsConn),
    Wt(Box<wt_client::WtConn>),
}

async fn open_subscriber(
    cli: &Cli,
    addr: SocketAddr,
    tls: &Arc<rustls::ClientConfig>,
    wt: Option<&web_transport_quinn::Client>,
    room: Option<&str>,
) -> anyhow::Result<Subscriber> {
    match (cli.transport, wt) {
        (Transport::Wt, Some(client)) => {
            let url = url::Url::parse(&format!("https://{}{}", addr, cli.path))?;
            let mut c = wt_client::connect(client, &url).await?;
            c.wait_text("welcome").await?;
            if let Some(room) = room {
                c.send_json(&format!(r#"{{"type":"join","room":"{room}","id":1}}"#))
                    .await?;
                c.wait_text("ack").await?;
            }
            Ok(Subscriber::Wt(Box::new(c)))
        }
        _ => {
            let mut c = ws_client::connect(addr, tls.clone(), &cli.path).await?;
            c.wait_text("welcome").await?;
            if let Some(room) = room {
                c.send_text(&format!(r#"{{"type":"join","room":"{room}","id":1}}"#))
                    .await?;
                c.wait_text("ack").await?;
            }
            Ok(Subscriber::Ws(c))
        }
    }
}

/// Opens `n` subscribers, at most `concurrency` handshakes at a time.
async fn open_many(
    cli: &Cli,
    n: usize,
    rooms: usize,
    concurrency: usize,
) -> anyhow::Result<Vec<(usize, Subscriber)>> {
    let tls = tls_config(cli, true);
    let wt = match cli.transport {
        Transport::Wt => Some(wt_client::client(&cert_sha256(cli)?)?),
        Transport::Wss => None,
    };
    let mut out = Vec::with_capacity(n);
    let mut i = 0;
    while i < n {
        let batch: Vec<_> = (i..(i + concurrency).min(n))
            .map(|k| {
                let room = (rooms > 0).then(|| format!("bench-{}", k % rooms.max(1)));
                let (tls, wt) = (tls.clone(), wt.clone());
                let addr = match cli.second_addr {
                    Some(second) if k % 2 == 1 => second,
                    _ => cli.addr,
                };
                async move {
                    let s = open_subscriber(cli, addr, &tls, wt.as_ref(), room.as_deref()).await;
                    (k % rooms.max(1), s)
                }
            })
            .collect();
        for (room, s) in futures_util::future::join_all(batch).await {
            out.push((
                room,
                s.with_context(|| format!("subscriber {} of {n}", out.len()))?,
            ));
        }
        i += concurrency;
    }
    Ok(out)
}

struct Window {
    cpu: Option<f64>,
    backend_cpu: Option<f64>,
    client_cpu: Option<f64>,
    at: Instant,
}

fn mark(cli: &Cli) -> Window {
    Window {
        cpu: cli.server_pid.and_then(cpu_seconds),
        backend_cpu: cli.backend_pid.and_then(cpu_seconds),
        client_cpu: cpu_seconds(std::process::id()),
        at: Instant::now(),
    }
}

async fn run(cli: &Cli) -> anyhow::Result<serde_json::Value> {
    match &cli.scenario {
        Scenario::Fanout {
            rooms,
            members,
            rate,
            size,
            warmup,
            duration,
            drain,
        } => {
            fanout(
                cli, *rooms, *members, *rate, *size, *warmup, *duration, *drain,
            )
            .await
        }
        Scenario::Idle { connections } => idle(cli, *connections).await,
        Scenario::Rpc {
            rate,
            connections,
            in_flight,
            direct,
            backend_path,
            warmup,
            duration,
            drain,
        } => {
            let plan = rpc::Plan {
                rate: *rate,
                connections: *connections,
                in_flight: *in_flight,
                warmup: *warmup,
                duration: *duration,
                drain: *drain,
            };
            let pids = rpc::Pids {
                server: cli.server_pid,
                backend: cli.backend_pid,
            };
            let mut report = if *direct {
                rpc::direct(cli.addr, backend_path, &plan, pids).await?
            } else {
                rpc::through_gateway(cli.addr, tls_config(cli, true), &cli.path, &plan, pids)
                    .await?
            };
            report["target"] = json!(cli.target);
            Ok(report)
        }
        Scenario::Connect {
            connections,
            concurrency,
        } => connect_rate(cli, *connections, *concurrency).await,
    }
}

#[allow(clippy::too_many_arguments)]
async fn fanout(
    cli: &Cli,
    rooms: usize,
    members: usize,
    rate: u64,
    size: usize,
    warmup: f64,
    duration: f64,
    drain: f64,
) -> anyhow::Result<serde_json::Value> {
    let size = size.max(PROBE_LEN);
    let subscribers = open_many(cli, rooms * members, rooms, 100).await?;
    let rss_before = cli.server_pid.and_then(rss_kib);
    // One publisher per room, over wss (the fan-out path is what is measured).
    let tls = tls_config(cli, true);
    let mut publishers = Vec::new();
    for _ in 0..rooms {
        let mut p = ws_client::connect(cli.addr, tls.clone(), &cli.path).await?;
        p.wait_text("welcome").await?;
        publishers.push(p);
    }
    let epoch = Instant::now();
    let start_ns = 100_000_000u64; // publishing starts 100 ms after the epoch
    let window = (
        start_ns + (warmup * 1e9) as u64,
        start_ns + ((warmup + duration) * 1e9) as u64,
    );
    let stop_publish_ns = window.1;
    let stop_ns = window.1 + (drain * 1e9) as u64;
    let observed = Rc::new(Observed::new(window));

    let mut tasks = Vec::new();
    for (_, s) in subscribers {
        let (obs, seqs) = (observed.clone(), SeqTracker::new(rooms));
        tasks.push(tokio::task::spawn_local(async move {
            match s {
                Subscriber::Ws(c) => c.subscribe(epoch, stop_ns, obs, seqs).await,
                Subscriber::Wt(c) => c.subscribe(epoch, stop_ns, obs, seqs).await,
            }
        }));
    }
    let publishes_per_room = rate as f64 / (members * rooms) as f64;
    let sent = Rc::new(RefCell::new(vec![0u64; rooms]));
    let sent_in_window = Rc::new(RefCell::new(0u64));
    let mut pub_tasks = Vec::new();
    for (room, p) in publishers.into_iter().enumerate() {
        let (sent, sent_in_window) = (sent.clone(), sent_in_window.clone());
        pub_tasks.push(tokio::task::spawn_local(async move {
            let ws_client::WsConn {
                mut reader,
                mut writer,
                ..
            } = p;
            // Acks are read and dropped so the publisher's queue never fills.
            let drain_acks = tokio::task::spawn_local(async move {
                let mut sink = vec![0u8; 64 * 1024];
                while let Ok(n) = tokio::io::AsyncReadExt::read(&mut reader, &mut sink).await {
                    if n == 0 {
                        break;
                    }
                }
            });
            let room_name = format!("bench-{room}");
            let mask_conn = [0x11u8, 0x22, 0x33, 0x44];
            let mut payload = vec![0u8; size];
            let mut out = Vec::with_capacity(64 * 1024);
            let mut tick = tokio::time::interval(Duration::from_millis(1));
            tokio::time::sleep_until((epoch + Duration::from_nanos(start_ns)).into()).await;
            let began = Instant::now();
            loop {
                tick.tick().await;
                let now_ns = since(epoch);
                if now_ns >= stop_publish_ns {
                    break;
                }
                let due = (began.elapsed().as_secs_f64() * publishes_per_room) as u64;
                let seq0 = sent.borrow()[room];
                if due <= seq0 {
                    continue;
                }
                out.clear();
                for seq in seq0..due {
                    write_probe(&mut payload, room as u32, seq, now_ns);
                    let env = publish_envelope(&room_name, &payload);
                    gateway_tests::load::wire::ws_frame(&mut out, opcode::BINARY, &env, mask_conn);
                    if now_ns >= window.0 && now_ns < window.1 {
                        *sent_in_window.borrow_mut() += 1;
                    }
                }
                sent.borrow_mut()[room] = due;
                if writer.write_all(&out).await.is_err() || writer.flush().await.is_err() {
                    break;
                }
            }
            let _ = writer.flush().await;
            tokio::time::sleep_until((epoch + Duration::from_nanos(stop_ns)).into()).await;
            drain_acks.abort();
        }));
    }
    // Window marks.
    tokio::time::sleep_until((epoch + Duration::from_nanos(window.0)).into()).await;
    let w0 = mark(cli);
    tokio::time::sleep_until((epoch + Duration::from_nanos(window.1)).into()).await;
    let w1 = mark(cli);
    let rss_after = cli.server_pid.and_then(rss_kib);
    for t in pub_tasks {
        let _ = t.await;
    }
    // The publishers returned at `stop_ns`: what has not arrived by now is lost. Subscribers
    // read without a timer (cheaper per read), so they are stopped here.
    for t in tasks {
        t.abort();
        let _ = t.await;
    }
    let obs = observed.borrow();
    let published: u64 = sent.borrow().iter().sum();
    let expected = published * members as u64;
    let received_unique = obs.total_deliveries;
    let losses = expected.saturating_sub(received_unique);
    let secs = w1.at.duration_since(w0.at).as_secs_f64();
    let deliveries_per_sec = obs.window_deliveries as f64 / secs;
    let server_cpu = w0.cpu.zip(w1.cpu).map(|(a, b)| b - a);
    let client_cpu = w0.client_cpu.zip(w1.client_cpu).map(|(a, b)| b - a);
    let backend_cpu = w0.backend_cpu.zip(w1.backend_cpu).map(|(a, b)| b - a);
    let h = &obs.latency_us;
    let pct = |q: f64| {
        if h.is_empty() {
            0.0
        } else {
            h.value_at_quantile(q) as f64 / 1000.0
        }
    };
    Ok(json!({
        "scenario": "fanout",
        "target": cli.target,
        "transport": format!("{:?}", cli.transport).to_lowercase(),
        "rooms": rooms, "members": members, "size": size,
        "target_rate": rate,
        "published": published,
        "published_in_window": *sent_in_window.borrow(),
        "deliveries_per_sec": deliveries_per_sec.round(),
        "window_deliveries": obs.window_deliveries,
        "expected_deliveries": expected,
        "received": received_unique,
        "losses": losses,
        "gaps": obs.gaps,
        "duplicates": obs.duplicates,
        "latency_ms": {
            "p50": pct(0.5), "p90": pct(0.9), "p99": pct(0.99), "p999": pct(0.999),
            "max": if h.is_empty() { 0.0 } else { h.max() as f64 / 1000.0 },
        },
        "server_cpu_s": server_cpu,
        "server_cpu_s_per_million": server_cpu.map(|c| if obs.window_deliveries > 0 { c / (obs.window_deliveries as f64 / 1e6) } else { 0.0 }),
        "client_cpu_s": client_cpu,
        "client_bound": client_cpu.map(|c| c / secs > 0.9),
        "backend_cpu_s": backend_cpu,
        "server_rss_kib": {"before_publishing": rss_before, "end_of_window": rss_after},
    }))
}

async fn idle(cli: &Cli, connections: usize) -> anyhow::Result<serde_json::Value> {
    let pid = cli.server_pid.context("--server-pid is needed for idle")?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = rss_kib(pid).context("server RSS")?;
    let started = Instant::now();
    let conns = open_many(cli, connections, 0, 100).await?;
    let opened_in = started.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after = rss_kib(pid).context("server RSS")?;
    let per_conn = (after.saturating_sub(before) as f64 * 1024.0) / connections as f64;
    drop(conns);
    Ok(json!({
        "scenario": "idle",
        "target": cli.target,
        "transport": format!("{:?}", cli.transport).to_lowercase(),
        "connections": connections,
        "rss_before_kib": before,
        "rss_after_kib": after,
        "bytes_per_connection": per_conn.round(),
        "open_seconds": opened_in,
    }))
}

async fn connect_rate(
    cli: &Cli,
    connections: usize,
    concurrency: usize,
) -> anyhow::Result<serde_json::Value> {
    let tls = tls_config(cli, false);
    let w0 = mark(cli);
    let mut done = 0usize;
    let mut failed = 0usize;
    while done + failed < connections {
        let n = concurrency.min(connections - done - failed);
        let batch = (0..n).map(|_| {
            let tls = tls.clone();
            async move {
                let mut c = ws_client::connect(cli.addr, tls, &cli.path).await?;
                c.wait_text("welcome").await?;
                anyhow::Ok(())
            }
        });
        for r in futures_util::future::join_all(batch).await {
            match r {
                Ok(()) => done += 1,
                Err(_) => failed += 1,
            }
        }
    }
    let w1 = mark(cli);
    let secs = w1.at.duration_since(w0.at).as_secs_f64();
    let server_cpu = w0.cpu.zip(w1.cpu).map(|(a, b)| b - a);
    let client_cpu = w0.client_cpu.zip(w1.client_cpu).map(|(a, b)| b - a);
    Ok(json!({
        "scenario": "connect",
        "target": cli.target,
        "connections": done,
        "failed": failed,
        "seconds": secs,
        "connections_per_sec": (done as f64 / secs).round(),
        "server_cpu_s": server_cpu,
        "server_cpu_ms_per_connection": server_cpu.map(|c| c * 1000.0 / done.max(1) as f64),
        "client_cpu_s": client_cpu,
        "client_bound": client_cpu.map(|c| c / secs > 0.9),
    }))
}
