//! The application's backend for upstream-call tests (PROTOCOL.md section 10): a real
//! separate process (`fixtures/upstream_backend.py`, Python standard library) that records
//! every call and answers as the test scripts it.

use std::{path::Path, process::Stdio, time::Duration};

use anyhow::{anyhow, Context};
use serde_json::{json, Map, Value};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

use crate::STEP;

/// A running backend process, killed on drop.
pub struct Backend {
    child: Option<std::process::Child>,
    /// Its port on 127.0.0.1.
    pub port: u16,
}

/// One call the backend received.
#[derive(Debug, Clone)]
pub struct Call {
    /// Arrival order (0, 1, ...) across all events.
    pub seq: u64,
    /// Request path, for example `/gw/publish`.
    pub path: String,
    /// The last path segment: `connect`, `join`, `publish`, `rpc`, `disconnect`.
    pub event: String,
    /// Request headers, names in lower case.
    pub headers: Map<String, Value>,
    /// The body parsed as JSON (`Null` when it was not JSON).
    pub body: Value,
    /// The body as received.
    pub raw: String,
    /// Arrival time in seconds since the backend started.
    pub t: f64,
}

impl Call {
    /// A request header (lower-case name).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(Value::as_str)
    }
}

impl Backend {
    /// Starts the backend on a free loopback port and waits until it listens.
    pub async fn start() -> Self {
        use std::io::BufRead;
        let script = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("fixtures")
            .join("upstream_backend.py");
        let mut child = std::process::Command::new("python3")
            .arg(&script)
            .stdout(Stdio::piped())
            .stdin(Stdio::null())
            .spawn()
            .expect("python3 runs the test backend");
        let stdout = child.stdout.take().expect("stdout");
        let line = tokio::task::spawn_blocking(move || {
            let mut reader = std::io::BufReader::new(stdout);
            let mut line = String::new();
            reader.read_line(&mut line).ok();
            std::thread::spawn(move || std::io::copy(&mut reader, &mut std::io::sink()));
            line
        });
        let line = tokio::time::timeout(STEP, line)
            .await
            .expect("the backend printed its port")
            .expect("reader");
        let port = line
            .trim()
            .strip_prefix("port ")
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("no port line from the backend: {line:?}"));
        Self {
            child: Some(child),
            port,
        }
    }

    /// The upstream `url` for the gateway's config: `http://127.0.0.1:PORT/gw`.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}/gw", self.port)
    }

    /// Replaces the backend's rules (see the fixture's header for their fields).
    pub async fn script(&self, rules: Value) {
        self.control("POST", "/_script", &json!({ "rules": rules }))
            .await;
    }

    /// Lets the calls parked on `hold` answer.
    pub async fn release(&self, hold: &str) {
        self.control("POST", "/_release", &json!({ "hold": hold }))
            .await;
    }

    /// Forgets calls, rules and holds.
    pub async fn reset(&self) {
        self.control("POST", "/_reset", &json!({})).await;
    }

    /// `{"in_flight", "peak_in_flight", "calls"}`.
    pub async fn stats(&self) -> Value {
        self.control("GET", "/_stats", &Value::Null).await
    }

    /// Every call received so far, in arrival order.
    pub async fn calls(&self) -> Vec<Call> {
        let v = self.control("GET", "/_calls", &Value::Null).await;
        v.as_array()
            .expect("a list of calls")
            .iter()
            .map(|c| Call {
                seq: c["seq"].as_u64().unwrap(),
                path: c["path"].as_str().unwrap().to_owned(),
                event: c["event"].as_str().unwrap().to_owned(),
                headers: c["headers"].as_object().cloned().unwrap_or_default(),
                body: c["body"].clone(),
                raw: c["raw"].as_str().unwrap_or_default().to_owned(),
                t: c["t"].as_f64().unwrap_or_default(),
            })
            .collect()
    }

    /// The calls of `event` received so far.
    pub async fn calls_of(&self, event: &str) -> Vec<Call> {
        let mut calls = self.calls().await;
        calls.retain(|c| c.event == event);
        calls
    }

    /// Waits until at least `n` calls of `event` arrived (panics after [`STEP`]) and
    /// returns all of them.
    pub async fn wait_for_calls(&self, event: &str, n: usize) -> Vec<Call> {
        let deadline = tokio::time::Instant::now() + STEP;
        loop {
            let calls = self.calls_of(event).await;
            if calls.len() >= n {
                return calls;
            }
            if tokio::time::Instant::now() > deadline {
                panic!(
                    "waited for {n} `{event}` calls, got {}: {calls:#?}",
                    calls.len()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits until a call of `event` whose body has `field` equal to `value` arrived.
    pub async fn wait_for_call(&self, event: &str, field: &str, value: &Value) -> Call {
        let deadline = tokio::time::Instant::now() + STEP;
        loop {
            if let Some(c) = self
                .calls_of(event)
                .await
                .into_iter()
                .find(|c| c.body.get(field) == Some(value))
            {
                return c;
            }
            if tokio::time::Instant::now() > deadline {
                panic!("no `{event}` call with {field} = {value}");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Kills the process: from then on nothing listens on its port.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    async fn control(&self, method: &str, path: &str, body: &Value) -> Value {
        control_request(self.port, method, path, body)
            .await
            .with_context(|| format!("{method} {path} to the test backend"))
            .unwrap()
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.stop();
    }
}

/// An upstream URL on a loopback port nothing listens on (a backend that is down).
pub fn down_url() -> String {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port();
    format!("http://127.0.0.1:{port}/gw")
}

async fn control_request(
    port: u16,
    method: &str,
    path: &str,
    body: &Value,
) -> anyhow::Result<Value> {
    let body = if body.is_null() {
        String::new()
    } else {
        body.to_string()
    };
    let mut tcp = TcpStream::connect(("127.0.0.1", port)).await?;
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    tcp.write_all(request.as_bytes()).await?;
    let mut raw = Vec::new();
    tokio::time::timeout(STEP, tcp.read_to_end(&mut raw))
        .await
        .context("the backend did not answer")??;
    let text = String::from_utf8(raw)?;
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| anyhow!("no response head: {text:?}"))?;
    if !head.starts_with("HTTP/1.1 200") {
        return Err(anyhow!("{head}"));
    }
    Ok(serde_json::from_str(body)?)
}
