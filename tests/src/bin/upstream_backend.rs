//! A trivial application backend for the upstream benchmark (PROTOCOL.md section 10): an
//! HTTP/1.1 keep-alive server on one thread that answers every `POST .../rpc` with
//! `{"data": <the request's data>}`, `.../connect` with `{"user": "bench"}` and every other
//! event (`publish`, `join`, `disconnect`) with `{}`.
//!
//! Prints `listening 127.0.0.1:PORT` once bound; runs until killed. Pin it with `taskset`.

use std::net::SocketAddr;

use bytes::Bytes;
use clap::Parser;
use http_body_util::{BodyExt, Full};
use hyper::{body::Incoming, server::conn::http1, service::service_fn, Request, Response};
use hyper_util::rt::TokioIo;
use serde::Deserialize;
use serde_json::value::RawValue;

#[derive(Parser)]
#[command(about = "Trivial upstream backend: echoes rpc data, answers {} to the rest")]
struct Cli {
    /// Address to listen on (port 0: any free port).
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: SocketAddr,
}

#[derive(Deserialize)]
struct Call<'a> {
    #[serde(borrow)]
    data: Option<&'a RawValue>,
}

async fn answer(request: Request<Incoming>) -> Result<Response<Full<Bytes>>, hyper::Error> {
    let path = request.uri().path().to_owned();
    let body = request.into_body().collect().await?.to_bytes();
    let out: Bytes = if path.ends_with("/rpc") {
        match serde_json::from_slice::<Call<'_>>(&body) {
            Ok(Call { data: Some(data) }) => {
                let mut out = Vec::with_capacity(data.get().len() + 10);
                out.extend_from_slice(b"{\"data\":");
                out.extend_from_slice(data.get().as_bytes());
                out.push(b'}');
                out.into()
            }
            _ => Bytes::from_static(b"{\"data\":null}"),
        }
    } else if path.ends_with("/connect") {
        Bytes::from_static(b"{\"user\":\"bench\"}")
    } else {
        Bytes::from_static(b"{}")
    };
    Ok(Response::builder()
        .header(http::header::CONTENT_TYPE, "application/json")
        .body(Full::new(out))
        .expect("a static response builds"))
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind(cli.listen).await?;
        println!("listening {}", listener.local_addr()?);
        loop {
            let (tcp, _) = listener.accept().await?;
            let _ = tcp.set_nodelay(true);
            tokio::spawn(async move {
                let _ = http1::Builder::new()
                    .keep_alive(true)
                    .serve_connection(TokioIo::new(tcp), service_fn(answer))
                    .await;
            });
        }
    })
}
