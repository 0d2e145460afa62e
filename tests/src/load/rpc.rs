//! The `rpc` scenario: open-loop `rpc` calls at a fixed rate, either through the gateway
//! (wss connections, frames `{"type":"rpc","id","method","data"}`, acks matched by `id`) or
//! straight to the backend (`POST .../rpc` with a body like the gateway's, over pooled
//! keep-alive HTTP/1.1 connections). Same pacing, same bookkeeping, so that the gateway's
//! added latency is one figure minus the other.
//!
//! Pacing: a 1 ms tick; each tick sends the calls that are due (at 10,000/s: 10 per tick),
//! each to the next connection with fewer than `in_flight` calls outstanding (none free:
//! the call is counted as `overflow`, not sent). A call's round trip runs from the tick that
//! sent it to the read that brought its answer.

use std::{
    cell::RefCell,
    collections::{BTreeMap, HashMap, VecDeque},
    net::SocketAddr,
    rc::Rc,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::Context;
use bytes::{Buf, Bytes};
use hdrhistogram::Histogram;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use serde::Deserialize;
use serde_json::json;
use tokio::{io::AsyncWriteExt, sync::Notify};

use super::{
    proc_stats::cpu_seconds,
    since,
    wire::{opcode, ws_frame, ws_parse},
    ws_client,
};

/// What to run.
#[derive(Debug, Clone)]
pub struct Plan {
    /// Calls per second.
    pub rate: u64,
    /// Connections (wss to the gateway, or HTTP/1.1 to the backend).
    pub connections: usize,
    /// Calls outstanding per connection at most (HTTP/1.1: queued behind the one on the wire).
    pub in_flight: usize,
    /// Seconds before the measured window.
    pub warmup: f64,
    /// Seconds measured.
    pub duration: f64,
    /// Seconds after the last call for answers to arrive; what has not is lost.
    pub drain: f64,
}

/// Processes whose CPU is read at the window's edges.
#[derive(Debug, Clone, Copy)]
pub struct Pids {
    /// The gateway (through mode).
    pub server: Option<u32>,
    /// The backend.
    pub backend: Option<u32>,
}

struct Marks {
    server: Option<f64>,
    backend: Option<f64>,
    client: Option<f64>,
    at: Instant,
}

fn mark(pids: Pids) -> Marks {
    Marks {
        server: pids.server.and_then(cpu_seconds),
        backend: pids.backend.and_then(cpu_seconds),
        client: cpu_seconds(std::process::id()),
        at: Instant::now(),
    }
}

/// Round trips and outcomes of one run.
struct Tally {
    window: (u64, u64),
    rtt_ns: Histogram<u64>,
    sent_in_window: u64,
    answered_in_window: u64,
    answered: u64,
    overflow_in_window: u64,
    errored_in_window: u64,
    /// Round trips of calls answered with an `error` (e.g. `not_found` on an endpoint
    /// without an rpc upstream: the gateway's own round trip, no backend).
    error_rtt_ns: Histogram<u64>,
    wrong_data: u64,
    errors: BTreeMap<String, u64>,
}

impl Tally {
    fn new(window: (u64, u64)) -> Self {
        Self {
            window,
            rtt_ns: Histogram::new_with_bounds(1_000, 60_000_000_000, 3).expect("histogram bounds"),
            sent_in_window: 0,
            answered_in_window: 0,
            answered: 0,
            overflow_in_window: 0,
            errored_in_window: 0,
            error_rtt_ns: Histogram::new_with_bounds(1_000, 60_000_000_000, 3)
                .expect("histogram bounds"),
            wrong_data: 0,
            errors: BTreeMap::new(),
        }
    }

    fn in_window(&self, sent_ns: u64) -> bool {
        sent_ns >= self.window.0 && sent_ns < self.window.1
    }

    fn sent(&mut self, sent_ns: u64) {
        if self.in_window(sent_ns) {
            self.sent_in_window += 1;
        }
    }

    fn overflow(&mut self, sent_ns: u64) {
        if self.in_window(sent_ns) {
            self.overflow_in_window += 1;
        }
    }

    fn answered(&mut self, id: u64, sent_ns: u64, now_ns: u64, data: Option<u64>) {
        self.answered += 1;
        if data != Some(id) {
            self.wrong_data += 1;
        }
        if self.in_window(sent_ns) {
            self.answered_in_window += 1;
            let _ = self
                .rtt_ns
                .record(now_ns.saturating_sub(sent_ns).max(1_000));
        }
    }

    fn error(&mut self, code: &str, sent_ns: Option<u64>, now_ns: u64) {
        if let Some(sent_ns) = sent_ns.filter(|&s| self.in_window(s)) {
            self.errored_in_window += 1;
            let _ = self
                .error_rtt_ns
                .record(now_ns.saturating_sub(sent_ns).max(1_000));
        }
        *self.errors.entry(code.to_owned()).or_default() += 1;
    }
}

/// The `data` every call carries and every answer must echo.
#[derive(Deserialize)]
struct Data {
    n: u64,
}

/// The fields of a gateway reply that matter here.
#[derive(Deserialize)]
struct Reply {
    #[serde(rename = "type")]
    kind: String,
    id: Option<u64>,
    code: Option<String>,
    data: Option<Data>,
}

/// The backend's answer to an rpc.
#[derive(Deserialize)]
struct Answer {
    data: Option<Data>,
}

/// Runs the scenario through the gateway at `addr` + `path` over wss.
pub async fn through_gateway(
    addr: SocketAddr,
    tls: Arc<rustls::ClientConfig>,
    path: &str,
    plan: &Plan,
    pids: Pids,
) -> anyhow::Result<serde_json::Value> {
    let mut conns = Vec::with_capacity(plan.connections);
    for i in 0..plan.connections {
        let mut c = ws_client::connect(addr, tls.clone(), path)
            .await
            .with_context(|| format!("connection {i}"))?;
        c.wait_text("welcome").await?;
        conns.push(c);
    }
    let clock = Clock::new(plan);
    let tally = Rc::new(RefCell::new(Tally::new(clock.window)));
    let mask = [0x11u8, 0x22, 0x33, 0x44];

    struct Side {
        pending: HashMap<u64, u64>,
        pongs: Vec<u8>,
    }
    let mut writers = Vec::new();
    let mut sides = Vec::new();
    let mut readers = Vec::new();
    for c in conns {
        let ws_client::WsConn {
            mut reader,
            writer,
            mut buf,
            ..
        } = c;
        let side = Rc::new(RefCell::new(Side {
            pending: HashMap::new(),
            pongs: Vec::new(),
        }));
        let (s, tally) = (side.clone(), tally.clone());
        let epoch = clock.epoch;
        readers.push(tokio::task::spawn_local(async move {
            buf.reserve(64 * 1024);
            loop {
                let now_ns = since(epoch);
                while let Some((op, start, end, frame_end)) = ws_parse(&buf) {
                    match op {
                        opcode::TEXT => {
                            let mut side = s.borrow_mut();
                            let mut tally = tally.borrow_mut();
                            match serde_json::from_slice::<Reply>(&buf[start..end]) {
                                Ok(r) if r.kind == "ack" => {
                                    match r.id.and_then(|id| Some((id, side.pending.remove(&id)?)))
                                    {
                                        Some((id, sent)) => {
                                            tally.answered(id, sent, now_ns, r.data.map(|d| d.n))
                                        }
                                        None => tally.error("unmatched_ack", None, now_ns),
                                    }
                                }
                                Ok(r) if r.kind == "error" => {
                                    let sent = r.id.and_then(|id| side.pending.remove(&id));
                                    tally.error(r.code.as_deref().unwrap_or("error"), sent, now_ns);
                                }
                                Ok(_) => {}
                                Err(_) => tally.error("unparsed_reply", None, now_ns),
                            }
                        }
                        opcode::PING => ws_frame(
                            &mut s.borrow_mut().pongs,
                            opcode::PONG,
                            &buf[start..end],
                            mask,
                        ),
                        opcode::CLOSE => {
                            tally.borrow_mut().error("closed", None, now_ns);
                            return;
                        }
                        _ => {}
                    }
                    buf.advance(frame_end);
                }
                if buf.capacity() - buf.len() < 16 * 1024 {
                    buf.reserve(64 * 1024);
                }
                match tokio::io::AsyncReadExt::read_buf(&mut reader, &mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                }
            }
        }));
        writers.push((writer, Vec::<u8>::with_capacity(4096)));
        sides.push(side);
    }

    let n = sides.len();
    let mut next = 0usize;
    let mut pacer = Pacer::start(&clock, pids).await;
    while let Some((due, now_ns)) = pacer.next().await {
        {
            let mut tally = tally.borrow_mut();
            for seq in due {
                let pick = (0..n)
                    .map(|k| (next + k) % n)
                    .find(|&c| sides[c].borrow().pending.len() < plan.in_flight);
                let Some(c) = pick else {
                    tally.overflow(now_ns);
                    continue;
                };
                next = c + 1;
                sides[c].borrow_mut().pending.insert(seq, now_ns);
                tally.sent(now_ns);
                let frame =
                    format!(r#"{{"type":"rpc","id":{seq},"method":"echo","data":{{"n":{seq}}}}}"#);
                ws_frame(&mut writers[c].1, opcode::TEXT, frame.as_bytes(), mask);
            }
        }
        for (c, (writer, out)) in writers.iter_mut().enumerate() {
            out.append(&mut sides[c].borrow_mut().pongs);
            if !out.is_empty() {
                writer.write_all(out).await?;
                writer.flush().await?;
                out.clear();
            }
        }
    }
    let (w0, w1) = pacer.finish().await?;
    for r in readers {
        r.abort();
    }
    let t = tally.borrow();
    Ok(report("gateway", plan, &t, &w0, &w1))
}

/// Runs the scenario straight against the backend at `addr`, POSTing to `path_prefix/rpc`.
pub async fn direct(
    addr: SocketAddr,
    path_prefix: &str,
    plan: &Plan,
    pids: Pids,
) -> anyhow::Result<serde_json::Value> {
    let clock = Clock::new(plan);
    let tally = Rc::new(RefCell::new(Tally::new(clock.window)));
    let uri: hyper::Uri = format!("http://{addr}{path_prefix}/rpc").parse()?;
    let host = addr.to_string();

    struct Lane {
        queue: VecDeque<(u64, u64)>,
        busy: bool,
        wake: Rc<Notify>,
    }
    let mut lanes = Vec::new();
    let mut workers = Vec::new();
    for _ in 0..plan.connections {
        let tcp = tokio::net::TcpStream::connect(addr).await?;
        tcp.set_nodelay(true)?;
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake::<_, Full<Bytes>>(TokioIo::new(tcp)).await?;
        tokio::task::spawn_local(conn);
        let lane = Rc::new(RefCell::new(Lane {
            queue: VecDeque::new(),
            busy: false,
            wake: Rc::new(Notify::new()),
        }));
        let (l, tally, uri, host) = (lane.clone(), tally.clone(), uri.clone(), host.clone());
        let epoch = clock.epoch;
        workers.push(tokio::task::spawn_local(async move {
            loop {
                let next = l.borrow_mut().queue.pop_front();
                let Some((seq, sent_ns)) = next else {
                    l.borrow_mut().busy = false;
                    let wake = l.borrow().wake.clone();
                    wake.notified().await;
                    continue;
                };
                l.borrow_mut().busy = true;
                let body = direct_body(seq);
                let request = hyper::Request::post(uri.clone())
                    .header(http::header::HOST, &host)
                    .header(http::header::CONTENT_TYPE, "application/json")
                    .body(Full::new(Bytes::from(body)))
                    .expect("request builds");
                let outcome = async {
                    sender.ready().await?;
                    let response = sender.send_request(request).await?;
                    let status = response.status().as_u16();
                    let body = response.into_body().collect().await?.to_bytes();
                    anyhow::Ok((status, body))
                }
                .await;
                let now_ns = since(epoch);
                let mut tally = tally.borrow_mut();
                match outcome {
                    Ok((200, body)) => {
                        let data = serde_json::from_slice::<Answer>(&body)
                            .ok()
                            .and_then(|a| a.data)
                            .map(|d| d.n);
                        tally.answered(seq, sent_ns, now_ns, data);
                    }
                    Ok((status, _)) => {
                        tally.error(&format!("http_{status}"), Some(sent_ns), now_ns)
                    }
                    Err(_) => {
                        tally.error("connection", Some(sent_ns), now_ns);
                        return;
                    }
                }
            }
        }));
        lanes.push(lane);
    }

    let n = lanes.len();
    let mut next = 0usize;
    let load = |c: usize| {
        let l = lanes[c].borrow();
        l.queue.len() + usize::from(l.busy)
    };
    let mut pacer = Pacer::start(&clock, pids).await;
    while let Some((due, now_ns)) = pacer.next().await {
        let mut tally = tally.borrow_mut();
        for seq in due {
            // An idle connection first, else the least loaded one with room.
            let pick = (0..n)
                .map(|k| (next + k) % n)
                .find(|&c| load(c) == 0)
                .or_else(|| {
                    (0..n)
                        .filter(|&c| load(c) < plan.in_flight)
                        .min_by_key(|&c| load(c))
                });
            let Some(c) = pick else {
                tally.overflow(now_ns);
                continue;
            };
            next = c + 1;
            let mut lane = lanes[c].borrow_mut();
            lane.queue.push_back((seq, now_ns));
            lane.busy = true;
            lane.wake.notify_one();
            tally.sent(now_ns);
        }
    }
    let (w0, w1) = pacer.finish().await?;
    for w in workers {
        w.abort();
    }
    let t = tally.borrow();
    Ok(report("direct", plan, &t, &w0, &w1))
}

/// A body shaped like the gateway's `rpc` call (PROTOCOL.md section 10).
fn direct_body(seq: u64) -> Vec<u8> {
    format!(
        r#"{{"endpoint":"/rpc","transport":"websocket","node":"bench","remote_addr":"127.0.0.1:40000","session":"s-0123456789abcdef0123","user":"anonymous-0123456789ab","method":"echo","data":{{"n":{seq}}}}}"#
    )
    .into_bytes()
}

/// The run's time line: epoch, window, pacing.
struct Clock {
    epoch: Instant,
    start_ns: u64,
    window: (u64, u64),
    stop_ns: u64,
    rate: f64,
}

impl Clock {
    fn new(plan: &Plan) -> Self {
        let start_ns = 100_000_000u64;
        let window = (
            start_ns + (plan.warmup * 1e9) as u64,
            start_ns + ((plan.warmup + plan.duration) * 1e9) as u64,
        );
        Self {
            epoch: Instant::now(),
            start_ns,
            window,
            stop_ns: window.1 + (plan.drain * 1e9) as u64,
            rate: plan.rate as f64,
        }
    }

    fn at(&self, ns: u64) -> tokio::time::Instant {
        (self.epoch + Duration::from_nanos(ns)).into()
    }
}

/// Ticks through the sending part of the run.
struct Pacer<'a> {
    clock: &'a Clock,
    pids: Pids,
    tick: tokio::time::Interval,
    began: Instant,
    seq: u64,
    w0: Option<Marks>,
}

impl<'a> Pacer<'a> {
    async fn start(clock: &'a Clock, pids: Pids) -> Self {
        tokio::time::sleep_until(clock.at(clock.start_ns)).await;
        Self {
            clock,
            pids,
            tick: tokio::time::interval(Duration::from_millis(1)),
            began: Instant::now(),
            seq: 0,
            w0: None,
        }
    }

    /// Waits for the next tick: the calls now due and the time; `None` once the window ended.
    async fn next(&mut self) -> Option<(std::ops::Range<u64>, u64)> {
        self.tick.tick().await;
        let now_ns = since(self.clock.epoch);
        if self.w0.is_none() && now_ns >= self.clock.window.0 {
            self.w0 = Some(mark(self.pids));
        }
        if now_ns >= self.clock.window.1 {
            return None;
        }
        let due = (self.began.elapsed().as_secs_f64() * self.clock.rate) as u64;
        let range = self.seq..due.max(self.seq);
        self.seq = range.end;
        Some((range, now_ns))
    }

    /// Marks the window's end, waits out the drain; the CPU marks at the window's edges.
    async fn finish(self) -> anyhow::Result<(Marks, Marks)> {
        let w1 = mark(self.pids);
        tokio::time::sleep_until(self.clock.at(self.clock.stop_ns)).await;
        Ok((self.w0.context("the window never began")?, w1))
    }
}

fn report(mode: &str, plan: &Plan, t: &Tally, w0: &Marks, w1: &Marks) -> serde_json::Value {
    let secs = w1.at.duration_since(w0.at).as_secs_f64();
    let d = |a: Option<f64>, b: Option<f64>| a.zip(b).map(|(a, b)| b - a);
    let (server, backend, client) = (
        d(w0.server, w1.server),
        d(w0.backend, w1.backend),
        d(w0.client, w1.client),
    );
    let lost = t
        .sent_in_window
        .saturating_sub(t.answered_in_window + t.errored_in_window);
    // Per call answered, or per error when every call was refused (no rpc upstream).
    let calls = t.answered_in_window.max(t.errored_in_window).max(1) as f64;
    let per_call_us = |c: Option<f64>| c.map(|c| c * 1e6 / calls);
    let quantiles = |h: &Histogram<u64>| {
        let q = |q: f64| {
            if h.is_empty() {
                0.0
            } else {
                h.value_at_quantile(q) as f64 / 1e6
            }
        };
        json!({
            "p50": q(0.5), "p90": q(0.9), "p99": q(0.99), "p999": q(0.999),
            "max": if h.is_empty() { 0.0 } else { h.max() as f64 / 1e6 },
        })
    };
    json!({
        "scenario": "rpc",
        "mode": mode,
        "target_rate": plan.rate,
        "connections": plan.connections,
        "in_flight": plan.in_flight,
        "seconds": secs,
        "sent_in_window": t.sent_in_window,
        "answered_in_window": t.answered_in_window,
        "answered_total": t.answered,
        "calls_per_sec": (t.answered_in_window as f64 / secs).round(),
        "overflow": t.overflow_in_window,
        "errored": t.errored_in_window,
        "lost": lost,
        "wrong_data": t.wrong_data,
        "errors": t.errors,
        "rtt_ms": quantiles(&t.rtt_ns),
        "error_rtt_ms": quantiles(&t.error_rtt_ns),
        "server_cpu_s": server,
        "server_cpu_us_per_call": per_call_us(server),
        "backend_cpu_s": backend,
        "backend_cpu_us_per_call": per_call_us(backend),
        "client_cpu_s": client,
        "client_cpu_frac": client.map(|c| c / secs),
        "client_bound": client.map(|c| c / secs > 0.9),
    })
}
