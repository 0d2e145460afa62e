//! The one session driver both transports share.
//!
//! A front implements two small traits, [`Inbound`] (what the peer sends) and [`FrameSink`]
//! (how frames leave), and hands them to [`run`] with its [`Transport`]'s traits; [`run`]
//! brings the session up the same way for both (the hub, the access log, the writer, corked
//! across sessions or not) and the driver runs it: the protocol state in core, liveness and
//! deadlines, the writer that batches queued frames, the close procedure and the access
//! log.

mod cork;
mod driver;
mod latency;
mod open;
#[cfg(test)]
mod tests;
mod writer;

use std::{future::Future, net::SocketAddr, sync::Arc};

use gateway_core::session::{SessionHandle, TransportKind};

pub(crate) use cork::Flushers;
pub(crate) use driver::{Event, Inbound};
pub(crate) use writer::{FrameSink, WriteStats};

use crate::{http::admission::Admission, state::AppState};
use driver::drive;
use open::{open_session, OpenedSession};
use writer::SessionWriter;

/// What a front tells [`run`] about its transport.
pub(crate) struct Transport {
    /// WebSocket or WebTransport (the hub's view, logs and metric labels).
    pub(crate) kind: TransportKind,
    /// Liveness needs transport pings (see `Connection::open`).
    ///
    /// The transport has no keep-alive of its own.
    pub(crate) pings: bool,
    /// The flushers that cork the session's writes with every other session's.
    ///
    /// `None`: the session's own task writes it.
    pub(crate) corked: Option<Arc<Flushers>>,
}

/// Brings an admitted session from `peer` up and returns its run to the end.
///
/// It registers it with the hub, logs its opening, builds its two halves with `halves`
/// (given the session's handle), sets up its writer and drives it.
///
/// Not an `async fn`: the session's state is built here and moved into the driver's
/// future, which is all the session's task holds (an async wrapper would keep a second
/// copy of it for the session's whole life).
pub(crate) fn run<I, S>(
    app: &Arc<AppState>,
    admission: Admission,
    peer: SocketAddr,
    transport: Transport,
    halves: impl FnOnce(&SessionHandle) -> (I, S),
) -> impl Future<Output = ()> + Send
where
    I: Inbound,
    S: FrameSink,
{
    let OpenedSession {
        conn,
        outbox,
        log,
        calls,
    } = open_session(app, admission, transport.kind, transport.pings, peer);
    let (inbound, sink) = halves(conn.handle());
    let writer = match transport.corked {
        Some(flushers) => {
            SessionWriter::corked(conn.handle(), outbox, sink, &flushers, &app.metrics)
        }
        None => SessionWriter::own_task(conn.handle(), outbox, sink, &app.metrics),
    };
    drive(conn, inbound, writer, log, calls)
}
