//! The one session driver both transports share. A transport implements two small traits,
//! [`Inbound`] (what the peer sends) and [`FrameSink`] (how frames leave); the driver runs
//! the session over them: the protocol state in core, liveness and deadlines, the writer
//! that batches queued frames (corked across sessions), the close procedure and the access log.

mod cork;
mod driver;
mod open;
mod writer;

pub(crate) use cork::Flushers;
pub(crate) use driver::{drive, Event, Inbound};
pub(crate) use open::{open_session, OpenedSession, WriteStats};
pub(crate) use writer::{FrameSink, SessionWriter};
