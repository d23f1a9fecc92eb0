//! The queue between connections and the threads that run the application.
//!
//! Bounded, so a flood of requests costs a 503 instead of memory: when every worker is busy and
//! the queue is full, [`JobQueue::submit`] refuses at once.

use crossbeam_channel::{Receiver, Sender, TrySendError};

use crate::exchange::Job;

#[derive(Debug, Clone)]
pub struct JobQueue {
    sender: Sender<Job>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SubmitError {
    Full,
    Closed,
}

/// A queue holding at most `capacity` jobs that no worker has taken yet.
pub fn queue(capacity: usize) -> (JobQueue, Receiver<Job>) {
    let (sender, receiver) = crossbeam_channel::bounded(capacity);
    (JobQueue { sender }, receiver)
}

impl JobQueue {
    pub fn submit(&self, job: Job) -> Result<(), SubmitError> {
        self.sender.try_send(job).map_err(|e| match e {
            TrySendError::Full(_) => SubmitError::Full,
            TrySendError::Disconnected(_) => SubmitError::Closed,
        })
    }
}
