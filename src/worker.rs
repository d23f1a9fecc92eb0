//! The queue between connections and the threads that run the application.
//!
//! Bounded, so a flood of requests costs a 503 instead of memory: when every worker is busy and
//! the queue is full, [`JobQueue::submit`] refuses at once.

use crossbeam_channel::{Receiver, Sender, TrySendError};

use crate::exchange::Job;

#[derive(Debug, Clone)]
pub struct JobQueue {
    sender: Sender<Job>,
    /// Rung for every job queued, when workers wait on it rather than on the queue.
    #[cfg(target_os = "linux")]
    doorbell: Option<std::sync::Arc<crate::acceptor::Doorbell>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SubmitError {
    Full,
    Closed,
}

/// A queue holding at most `capacity` jobs that no worker has taken yet.
pub fn queue(capacity: usize) -> (JobQueue, Receiver<Job>) {
    let (sender, receiver) = crossbeam_channel::bounded(capacity);
    let queue = JobQueue {
        sender,
        #[cfg(target_os = "linux")]
        doorbell: None,
    };
    (queue, receiver)
}

impl JobQueue {
    /// Rings `doorbell` after each job is queued (`acceptor.rs`: workers wait in epoll).
    #[cfg(target_os = "linux")]
    pub fn ringing(self, doorbell: std::sync::Arc<crate::acceptor::Doorbell>) -> JobQueue {
        JobQueue {
            doorbell: Some(doorbell),
            ..self
        }
    }

    pub fn submit(&self, job: Job) -> Result<(), SubmitError> {
        self.sender.try_send(job).map_err(|e| match e {
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
