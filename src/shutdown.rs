//! Graceful shutdown, in the style of mini-redis: one trigger, many listeners.
//!
//! A restart (file change), SIGTERM/SIGINT, or the end of the IIS stream all end the same way:
//! stop taking requests, let the ones in flight finish, exit.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::watch;

/// `WSGI_RESTART_GRACE`: how long the requests in flight may take once a shutdown starts.
/// Set once the configuration is read (under IIS, after the first request arrives).
static GRACE_SECONDS: AtomicU64 = AtomicU64::new(30);

pub fn set_grace(grace: Duration) {
    GRACE_SECONDS.store(grace.as_secs(), Ordering::Relaxed);
}

pub fn grace() -> Duration {
    Duration::from_secs(GRACE_SECONDS.load(Ordering::Relaxed))
}

/// Set once no request is served any more: the grace timer stops applying, and Python's own
/// finalisation (which has its own limit) must not be cut short.
static SERVING_DONE: AtomicBool = AtomicBool::new(false);

pub fn serving_done() {
    SERVING_DONE.store(true, Ordering::Release);
}

pub fn is_serving_done() -> bool {
    SERVING_DONE.load(Ordering::Acquire)
}

/// Why the process is going away; logged once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// A watched file changed (WSGI_RESTART_FILE_REGEX).
    Restart,
    /// SIGTERM, SIGINT or the IIS shutdown event.
    Signal,
    /// The web server closed the stream it started us with.
    EndOfStream,
}

/// Starts the shutdown. Cheap to clone; the first reason wins.
#[derive(Debug, Clone)]
pub struct Trigger {
    sender: watch::Sender<Option<Reason>>,
}

/// Waits for the shutdown to start.
#[derive(Debug, Clone)]
pub struct Shutdown {
    receiver: watch::Receiver<Option<Reason>>,
}

pub fn channel() -> (Trigger, Shutdown) {
    let (sender, receiver) = watch::channel(None);
    (Trigger { sender }, Shutdown { receiver })
}

impl Trigger {
    /// Returns false when a shutdown had already started.
    pub fn fire(&self, reason: Reason) -> bool {
        self.sender.send_if_modified(|current| {
            if current.is_some() {
                return false;
            }
            *current = Some(reason);
            true
        })
    }

    pub fn subscribe(&self) -> Shutdown {
        Shutdown {
            receiver: self.sender.subscribe(),
        }
    }
}

impl Shutdown {
    pub fn reason(&self) -> Option<Reason> {
        *self.receiver.borrow()
    }

    /// Resolves once a shutdown has started (at once if it already has).
    pub async fn started(&mut self) -> Option<Reason> {
        let started = self
            .receiver
            .wait_for(Option::is_some)
            .await
            .map(|reason| *reason);
        match started {
            Ok(reason) => reason,
            // Every trigger is gone: nothing can start a shutdown any more, so wait forever.
            Err(_) => std::future::pending().await,
        }
    }
}
