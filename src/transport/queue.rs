//! The queue between connections and the threads that run the application.
//!
//! Bounded, so a flood of requests costs a 503 instead of memory: when every worker is busy and
//! the queue is full, [`JobQueue::submit`] refuses at once. An ASGI application's event loop is
//! its own queue: [`direct`] hands each job to it from the connection's task, with no worker
//! thread in between.

use crossbeam_channel::{Receiver, Sender, TrySendError};
#[cfg(target_os = "linux")]
use rustix::event::{eventfd, EventfdFlags};
#[cfg(target_os = "linux")]
use std::io;
#[cfg(target_os = "linux")]
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use crate::exchange::Job;

#[derive(Clone)]
pub struct JobQueue {
    route: Route,
    /// Rung for every job queued, when workers wait on it rather than on the queue.
    #[cfg(target_os = "linux")]
    doorbell: Option<std::sync::Arc<Doorbell>>,
}

/// A job handed over on the caller's thread; it must not block (it runs on a connection's task).
pub type Handler = std::sync::Arc<dyn Fn(Job) + Send + Sync>;

#[derive(Clone)]
enum Route {
    Queue(Sender<Job>),
    Direct(Handler),
}

impl std::fmt::Debug for JobQueue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.route {
            Route::Queue(sender) => write!(f, "JobQueue({} queued)", sender.len()),
            Route::Direct(_) => f.write_str("JobQueue(direct)"),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SubmitError {
    Full,
    Closed,
}

/// A queue holding at most `capacity` jobs that no worker has taken yet.
pub fn bounded(capacity: usize) -> (JobQueue, Receiver<Job>) {
    let (sender, receiver) = crossbeam_channel::bounded(capacity);
    let queue = JobQueue {
        route: Route::Queue(sender),
        #[cfg(target_os = "linux")]
        doorbell: None,
    };
    (queue, receiver)
}

/// No queue: every job goes to `handler` at once, on the connection's task.
pub fn direct(handler: Handler) -> JobQueue {
    JobQueue {
        route: Route::Direct(handler),
        #[cfg(target_os = "linux")]
        doorbell: None,
    }
}

impl JobQueue {
    /// Rings `doorbell` after each job is queued (`acceptor.rs`: workers wait in epoll).
    #[cfg(target_os = "linux")]
    pub fn ringing(self, doorbell: std::sync::Arc<Doorbell>) -> JobQueue {
        JobQueue {
            doorbell: Some(doorbell),
            ..self
        }
    }

    pub fn submit(&self, job: Job) -> Result<(), SubmitError> {
        let sender = match &self.route {
            Route::Queue(sender) => sender,
            Route::Direct(handler) => {
                handler(job);
                return Ok(());
            }
        };
        sender.try_send(job).map_err(|e| match e {
            TrySendError::Full(_) => SubmitError::Full,
            TrySendError::Disconnected(_) => SubmitError::Closed,
        })?;
        #[cfg(target_os = "linux")]
        if let Some(doorbell) = &self.doorbell {
            doorbell.ring();
        }
        Ok(())
    }
}

#[cfg(target_os = "linux")]
/// An eventfd used as a counter of things to take (a semaphore) or as a flag.
#[derive(Debug)]
pub struct Doorbell(OwnedFd);

#[cfg(target_os = "linux")]
impl Doorbell {
    pub fn new(flags: EventfdFlags) -> io::Result<Doorbell> {
        Ok(Doorbell(eventfd(
            0,
            flags | EventfdFlags::CLOEXEC | EventfdFlags::NONBLOCK,
        )?))
    }

    pub fn ring(&self) {
        // Fails only when the counter would overflow u64: it is then rung enough.
        let _ = rustix::io::write(&self.0, &1u64.to_ne_bytes());
    }

    /// Takes one count (a semaphore) or all of them (a flag); false when there was none.
    pub fn answer(&self) -> bool {
        let mut count = [0u8; 8];
        rustix::io::read(&self.0, &mut count).is_ok()
    }
}

/// Workers wait on it in their epoll sets.
#[cfg(target_os = "linux")]
impl AsFd for Doorbell {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.0.as_fd()
    }
}
