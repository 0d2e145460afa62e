//! Reproduces the unauthenticated exhaustion attacks of the security review against a
//! running gateway and reports the server's resident memory before, at the peak and after
//! the attacker leaves. Used by hand (see the README's Security section), not by the suite,
//! whose tests run the same attacks at a smaller scale.

use std::{net::SocketAddr, path::PathBuf, sync::Arc, time::Duration};

use bytes::Bytes;
use clap::{Parser, Subcommand};
use gateway_tests::{load::proc_stats::rss_kib, quic_client, tls_connect};
use serde_json::json;
use tokio::{io::AsyncWriteExt, task::JoinSet, time::Instant};

#[derive(Parser)]
#[command(about = "Unauthenticated exhaustion attacks against a running gateway")]
struct Cli {
    /// Server address (TCP and UDP).
    #[arg(long)]
    addr: SocketAddr,
    /// PEM certificate the server presents.
    #[arg(long)]
    cert: PathBuf,
    /// PID of the server, for its memory.
    #[arg(long)]
    server_pid: u32,
    /// Connections to open.
    #[arg(long, default_value_t = 500)]
    conns: usize,
    /// How long the attacker holds its connections.
    #[arg(long, default_value_t = 15)]
    hold_secs: u64,
    #[command(subcommand)]
    attack: Attack,
}

#[derive(Subcommand, Clone, Copy)]
enum Attack {
    /// `POST /api/publish` with a wrong key declaring 2 MB, 1.9 MB sent, then a stall.
    HttpBodies,
    /// Per QUIC connection, `streams` HTTP/3 publishes with a wrong key, 127 KB, no FIN.
    H3Bodies {
        #[arg(long, default_value_t = 8)]
        streams: usize,
    },
    /// QUIC connections that complete the handshake and do nothing.
    IdleQuic,
}

/// What one attacking connection saw.
#[derive(Default)]
struct Seen {
    opened: bool,
    responses: usize,
    closed_by_server: bool,
}

#[tokio::main(flavor = "multi_thread", worker_threads = 1)]
async fn main() -> anyhow::Result<()> {
    let cli = Arc::new(Cli::parse());
    let baseline = rss_kib(cli.server_pid).unwrap_or(0);
    let started = Instant::now();
    let mut tasks = JoinSet::new();
    for _ in 0..cli.conns {
        let cli = cli.clone();
        tasks.spawn(async move {
            let hold = Instant::now() + Duration::from_secs(cli.hold_secs);
            match cli.attack {
                Attack::HttpBodies => http_bodies(&cli, hold).await,
                Attack::H3Bodies { streams } => h3_bodies(&cli, streams, hold).await,
                Attack::IdleQuic => idle_quic(&cli, hold).await,
            }
        });
    }
    let mut peak = baseline;
    let mut seen = Vec::new();
    let sample = tokio::time::interval(Duration::from_millis(100));
    tokio::pin!(sample);
    while !tasks.is_empty() {
        tokio::select! {
            Some(done) = tasks.join_next() => seen.push(done.unwrap_or_default()),
            _ = sample.tick() => peak = peak.max(rss_kib(cli.server_pid).unwrap_or(0)),
        }
    }
    let attack_secs = started.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_secs(5)).await;
    let after = rss_kib(cli.server_pid).unwrap_or(0);
    let report = json!({
        "connections": cli.conns,
        "opened": seen.iter().filter(|s| s.opened).count(),
        "responses": seen.iter().map(|s| s.responses).sum::<usize>(),
        "closed_by_server": seen.iter().filter(|s| s.closed_by_server).count(),
        "attack_secs": attack_secs,
        "rss_kib": {"baseline": baseline, "peak": peak, "after_5s": after},
    });
    println!("{report}");
    Ok(())
}

async fn http_bodies(cli: &Cli, hold: Instant) -> Seen {
    use tokio::io::AsyncReadExt;
    let mut seen = Seen::default();
    let Ok(mut tls) = tls_connect(cli.addr, &cli.cert).await else {
        return seen;
    };
    seen.opened = true;
    let head = "POST /api/publish HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer wrong\r\nContent-Length: 2000000\r\n\r\n";
    let chunk = vec![b'x'; 64 * 1024];
    let mut ok = tls.write_all(head.as_bytes()).await.is_ok();
    for _ in 0..29 {
        ok = ok && tls.write_all(&chunk).await.is_ok();
    }
    let _ = tls.flush().await;
    let mut buf = vec![0u8; 4096];
    loop {
        match tokio::time::timeout_at(hold, tls.read(&mut buf)).await {
            Err(_) => return seen,
            Ok(Ok(n)) if n > 0 => {
                if buf[..n].starts_with(b"HTTP/1.1 ") {
                    seen.responses += 1;
                }
            }
            Ok(_) => {
                seen.closed_by_server = true;
                return seen;
            }
        }
    }
}

async fn quic_connect(cli: &Cli) -> Option<(quinn::Endpoint, quinn::Connection)> {
    let endpoint = quic_client(&cli.cert).ok()?;
    let conn = endpoint.connect(cli.addr, "127.0.0.1").ok()?.await.ok()?;
    Some((endpoint, conn))
}

async fn h3_bodies(cli: &Cli, streams: usize, hold: Instant) -> Seen {
    let mut seen = Seen::default();
    let Some((_endpoint, conn)) = quic_connect(cli).await else {
        return seen;
    };
    seen.opened = true;
    let Ok((mut driver, mut send)) = h3::client::new(h3_quinn::Connection::new(conn.clone())).await
    else {
        return seen;
    };
    let drive =
        tokio::spawn(
            async move { futures_util::future::poll_fn(|cx| driver.poll_close(cx)).await },
        );
    let body = Bytes::from(vec![b'x'; 127 * 1024]);
    let mut requests = Vec::new();
    for _ in 0..streams {
        let req = http::Request::post(format!("https://127.0.0.1:{}/api/publish", cli.addr.port()))
            .header("authorization", "Bearer wrong")
            .body(())
            .expect("request");
        let Ok(mut stream) = send.send_request(req).await else {
            break;
        };
        let _ = stream.send_data(body.clone()).await;
        requests.push(stream);
    }
    for mut stream in requests {
        if let Ok(Ok(_)) = tokio::time::timeout_at(hold, stream.recv_response()).await {
            seen.responses += 1;
        }
    }
    seen.closed_by_server = tokio::time::timeout_at(hold, conn.closed()).await.is_ok();
    drive.abort();
    seen
}

async fn idle_quic(cli: &Cli, hold: Instant) -> Seen {
    let mut seen = Seen::default();
    let Some((_endpoint, conn)) = quic_connect(cli).await else {
        return seen;
    };
    seen.opened = true;
    seen.closed_by_server = tokio::time::timeout_at(hold, conn.closed()).await.is_ok();
    seen
}
