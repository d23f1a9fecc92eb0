//! A request's response sink, shared by the thread running the application and the watchdog,
//! which answers a stuck request in its place. A lock keeps their records from interleaving.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, TryLockError};
use std::time::{Duration, Instant};

use crate::exchange::{self, Output, ResponseEncoder, ResponseGone, ResponseSink, TrySendError};

pub struct GuardedSink {
    sink: ResponseSink,
    state: Mutex<State>,
    /// Set by the watchdog: everything the application sends from now on is dropped.
    taken_over: AtomicBool,
}

#[derive(Default)]
struct State {
    /// Records went out: the headers are sent.
    sent: bool,
    /// END_REQUEST went out.
    ended: bool,
}

/// What the watchdog could do with a stuck request's response.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TakeOver {
    /// Nothing was sent: answered 504.
    Answered,
    /// The headers were out: the response was ended, cut short.
    Cut,
    /// The response was already complete.
    AlreadyEnded,
    /// The thread is blocked writing to the web server, holding the response.
    Busy,
}

/// The body of the watchdog's 504.
pub const TIMEOUT_BODY: &[u8] = b"Gateway Timeout: the application did not answer in time\n";

/// How long the watchdog waits for a thread that is writing the response.
const TAKE_OVER_WAIT: Duration = Duration::from_secs(1);

impl GuardedSink {
    pub fn new(sink: ResponseSink) -> Self {
        GuardedSink {
            sink,
            state: Mutex::new(State::default()),
            taken_over: AtomicBool::new(false),
        }
    }

    pub fn request_id(&self) -> u16 {
        self.sink.request_id()
    }

    /// The web server aborted the request, or the watchdog answered it.
    pub fn is_aborted(&self) -> bool {
        self.taken_over.load(Ordering::Acquire) || self.sink.is_aborted()
    }

    /// Names the request while its sink lives: the ASGI bridge keys its task by it, for the
    /// watchdog.
    pub fn key(self: &Arc<Self>) -> usize {
        Arc::as_ptr(self) as usize
    }

    /// As [`GuardedSink::is_aborted`], reading the connection if the request's thread owns it
    /// ([`ResponseSink::look_for_abort`]).
    pub fn look_for_abort(&self) -> bool {
        self.taken_over.load(Ordering::Acquire) || self.sink.look_for_abort()
    }

    /// As [`ResponseSink::try_send`].
    pub fn try_send(&self, output: Output) -> Result<(), TrySendError> {
        let mut state = self.lock();
        if self.taken_over.load(Ordering::Acquire) {
            return Err(TrySendError::Gone);
        }
        let end = matches!(output, Output::End(_));
        self.sink.try_send(output)?;
        state.sent = true;
        state.ended = end;
        Ok(())
    }

    /// As [`ResponseSink::send_blocking`]: never call it holding the GIL.
    pub fn send_blocking(&self, output: Output) -> Result<(), ResponseGone> {
        let mut state = self.lock();
        if self.taken_over.load(Ordering::Acquire) {
            return Err(ResponseGone);
        }
        let end = matches!(output, Output::End(_));
        self.sink.send_blocking(output)?;
        state.sent = true;
        state.ended = end;
        Ok(())
    }

    /// As [`ResponseSink::send_whole`].
    pub fn send_whole(&self, output: Output) {
        if let Err(TrySendError::Full(output)) = self.try_send(output) {
            let _ = self.send_blocking(output);
        }
    }

    /// The connection's channel, whose room an asynchronous sender awaits before
    /// [`GuardedSink::try_send`] (the ASGI bridge).
    pub fn channel(&self) -> Option<&tokio::sync::mpsc::Sender<Output>> {
        self.sink.channel()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The watchdog answers in the application's place: a 504 when nothing was sent, else the
    /// end of the response (cut short, app status 1).
    pub fn take_over(&self) -> TakeOver {
        let deadline = Instant::now() + TAKE_OVER_WAIT;
        let state = loop {
            match self.state.try_lock() {
                Ok(state) => break state,
                Err(TryLockError::Poisoned(poisoned)) => break poisoned.into_inner(),
                Err(TryLockError::WouldBlock) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err(TryLockError::WouldBlock) => return TakeOver::Busy,
            }
        };
        self.taken_over.store(true, Ordering::Release);
        if state.ended {
            return TakeOver::AlreadyEnded;
        }
        let mut encoder = ResponseEncoder::new(self.sink.request_id());
        let outcome = if state.sent {
            TakeOver::Cut
        } else {
            exchange::simple_response(&mut encoder, "504 Gateway Timeout", &[], TIMEOUT_BODY);
            TakeOver::Answered
        };
        let status = u32::from(outcome == TakeOver::Cut);
        let _ = self.sink.send_blocking(Output::End(encoder.finish(status)));
        outcome
    }
}
