//! Taking the process out of service: recycling (WSGI_MAX_REQUESTS, WSGI_MAX_RSS) and a stuck
//! request. Both go the way a file change does: under IIS the process drains and exits 0, with
//! `--bind` it drains and re-executes itself in place, and a worker of `--processes` asks the
//! supervisor for a replacement, which starts it and then tells this one to drain.
//!
//! A process with a stuck thread cannot end the usual way (the main thread joins every worker,
//! and finalising Python waits for the stuck one), so the watchdog ends it: once the other
//! requests in flight have finished (up to the grace), it exits or re-executes without
//! finalising Python. The listening socket the I/O thread hands back at its end goes to whichever
//! of the main thread and the watchdog ends the process.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use socket2::Socket;

use super::{lock, Ops};
use crate::shutdown::{self, Reason};

/// How often the watchdog's exit looks at what is still running.
const POLL: Duration = Duration::from_millis(50);

#[derive(Default)]
struct ExitSlot {
    /// The I/O thread has ended (or there is none).
    io_done: bool,
    listener: Option<Socket>,
    /// The watchdog ends the process.
    watchdog: bool,
    /// The main thread ends the process.
    main: bool,
}

static EXIT: Mutex<ExitSlot> = Mutex::new(ExitSlot {
    io_done: false,
    listener: None,
    watchdog: false,
    main: false,
});

/// The I/O thread has ended; `listener` is the socket to re-execute with, on a restart.
pub fn io_finished(listener: Option<Socket>) {
    let mut slot = lock(&EXIT);
    slot.io_done = true;
    slot.listener = listener;
}

/// For the main thread, once every worker has returned: the listening socket to restart with,
/// or `None` when the watchdog is already ending the process.
pub fn listener_for_finish() -> Option<Option<Socket>> {
    let mut slot = lock(&EXIT);
    if slot.watchdog {
        return None;
    }
    slot.main = true;
    Some(slot.listener.take())
}

static REPLACING: AtomicBool = AtomicBool::new(false);
/// Why this process restarts, when recycling started the restart (else a file changed).
#[cfg(unix)]
static RESTART_CAUSE: Mutex<Option<Cause>> = Mutex::new(None);
static ABANDONING: AtomicBool = AtomicBool::new(false);

/// Why a process is recycled (the supervisor counts them by cause).
#[derive(Debug, Clone, Copy)]
pub enum Cause {
    MaxRequests,
    MaxRss,
    Stuck,
}

impl Cause {
    /// The byte that names it on the pipe to the supervisor.
    pub fn code(self) -> u8 {
        match self {
            Cause::MaxRequests => b'q',
            Cause::MaxRss => b'm',
            Cause::Stuck => b's',
        }
    }

    /// The metrics label of a code.
    pub fn label(code: u8) -> &'static str {
        match code {
            b'q' => "max_requests",
            b'm' => "max_rss",
            b's' => "stuck",
            _ => "other",
        }
    }
}

/// Replaces the process once, losing no request.
pub(super) fn recycle(ops: &Ops, why: Cause, cause: String) {
    if REPLACING.swap(true, Ordering::AcqRel) {
        return;
    }
    if ops.mode.supervised && ask_supervisor(why) {
        tracing::info!("recycling: {cause}; the supervisor starts a replacement");
        return;
    }
    tracing::info!("recycling: {cause}; finishing the requests in flight, then restarting");
    let first = ops.trigger.fire(Reason::Restart);
    #[cfg(unix)]
    if first {
        *lock(&RESTART_CAUSE) = Some(why);
    }
    #[cfg(not(unix))]
    let _ = first;
}

/// What an in-place restart adds to the environment of the process that replaces this one: the
/// restart counts, this restart included, for the metrics. A restart not started by recycling
/// was started by the file watcher (a single `--bind` process has no other).
#[cfg(unix)]
pub fn restart_environment() -> [(&'static str, String); 1] {
    let cause = match *lock(&RESTART_CAUSE) {
        Some(cause) => Cause::label(cause.code()),
        None => "file_change",
    };
    [(
        super::metrics::RESTARTS_VAR,
        super::metrics::restarts_after(cause),
    )]
}

/// Asks the supervisor of `--processes` for a replacement; false without one.
#[cfg(unix)]
fn ask_supervisor(why: Cause) -> bool {
    crate::supervisor::request_replacement(why.code())
}

#[cfg(not(unix))]
fn ask_supervisor(_: Cause) -> bool {
    false
}

/// A request's thread is stuck: the process is replaced, and the watchdog ends it once the
/// other requests in flight are done.
pub(super) fn abandon(ops: &'static Ops) {
    recycle(ops, Cause::Stuck, "a request is stuck".into());
    if ABANDONING.swap(true, Ordering::AcqRel) {
        return;
    }
    let spawned = std::thread::Builder::new()
        .name("wfastcgi-exit".into())
        .spawn(move || exit_when_drained(ops));
    if let Err(e) = spawned {
        tracing::error!("cannot start the thread that ends the process: {e}");
    }
}

fn exit_when_drained(ops: &Ops) {
    let shutdown = ops.trigger.subscribe();
    // Under --processes, once the supervisor's replacement is ready and it says so.
    while shutdown.reason().is_none() {
        std::thread::sleep(POLL);
    }
    // Before the grace timer, which would exit without re-executing.
    let deadline = Instant::now() + shutdown::grace().saturating_sub(Duration::from_secs(1));
    loop {
        let others = lock(&ops.running)
            .iter()
            .any(|t| !t.abandoned.load(Ordering::Relaxed));
        if (!others && lock(&EXIT).io_done) || Instant::now() >= deadline {
            break;
        }
        std::thread::sleep(POLL);
    }
    let listener = {
        let mut slot = lock(&EXIT);
        if slot.main {
            return;
        }
        slot.watchdog = true;
        slot.listener.take()
    };
    shutdown::serving_done();
    tracing::warn!(
        "a request's thread is stuck: ending the process without finalising Python (atexit handlers do not run)"
    );
    match listener {
        #[cfg(unix)]
        Some(listener) => {
            tracing::info!("restarting: the listening socket stays open across the restart");
            crate::logging::flush();
            let error = crate::transport::server::reexec(listener);
            tracing::error!("cannot restart: {error}");
            crate::logging::flush();
            std::process::exit(1);
        }
        _ => {
            tracing::info!("exiting");
            crate::logging::flush();
            std::process::exit(0);
        }
    }
}
