//! Where requests come from and how they reach a worker. Modules import downward only:
//!
//! - `server`: the transports (fd 0, `--bind`, socket activation, IIS's named pipe), the accept
//!   loops, signals, re-exec; uses all below.
//! - `acceptor` (Linux): idle workers accept connections themselves and serve them with `direct`;
//!   quiet ones are parked with the I/O thread.
//! - `connection`: the tokio driver, one task per connection, its requests run by workers
//!   through `queue`.
//! - `direct` (Unix): the blocking driver, run by the application's own thread (fd 0 under IIS,
//!   connections a worker accepted).
//! - `queue`: the bounded job queue between the I/O thread and the workers.
//!
//! Both drivers only move bytes between their socket and a `protocol::Session`, which holds
//! every protocol rule; handing a connection from one to the other moves the socket and the
//! session.

use std::io;

use crate::protocol::ProtocolError;

#[cfg(target_os = "linux")]
pub mod acceptor;
pub mod connection;
#[cfg(unix)]
pub mod direct;
pub mod queue;
pub mod server;

/// Why a connection ended early.
#[derive(Debug, thiserror::Error)]
pub enum ConnectionError {
    #[error("I/O error: {0}")]
    Io(#[from] io::Error),
    #[error("protocol error: {0}")]
    Protocol(#[from] ProtocolError),
}
