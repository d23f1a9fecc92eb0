//! The watchdog thread: it looks at the requests in flight every tick, logs the Python stack of
//! a slow one, answers a stuck one and takes the process out of service, checks the resident
//! memory, and sends the access log's lines to their writer. Another thread dumps every
//! thread's stack on SIGUSR1.
//!
//! A thread stuck in Python cannot be stopped safely, so a stuck request is answered here (504,
//! or the response ended) and the process replaced. An ASGI request's task can be: when the
//! event loop still runs callbacks, the task's stack is logged, the client answered and the task
//! cancelled, and the process stays in service; a task that never yields blocks the loop, and
//! that process is replaced as for WSGI. Stacks are read by briefly attaching to the
//! interpreter from a helper thread: a pure-Python loop gives the GIL up every switch interval,
//! but code stuck in C while holding it never does, so the helper is waited for only so long.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use pyo3::prelude::*;
use pyo3::types::{PyDict, PyString};

use super::sink::{TakeOver, TIMEOUT_BODY};
use super::{answered_by_watchdog, lock, service, Ops, Tracked};

/// How often the requests in flight and the memory are looked at.
const TICK: Duration = Duration::from_millis(100);
/// How long a stack dump waits for the GIL.
const GIL_WAIT: Duration = Duration::from_secs(2);
/// How long the ASGI event loop has to run a callback before it counts as blocked.
const LOOP_WAIT: Duration = Duration::from_secs(1);

pub fn spawn(ops: &'static Ops) {
    #[cfg(unix)]
    spawn_stack_dumps();
    #[cfg(windows)]
    spawn_stack_event();
    let reports = ops.mode.supervised && super::metrics::enabled();
    if !ops.settings.watches_requests()
        && ops.settings.max_rss.is_none()
        && ops.access.is_none()
        && !reports
    {
        return;
    }
    // A plain thread, not a runtime's: answering a request blocks on the connection's channel.
    let spawned = std::thread::Builder::new()
        .name("wfastcgi-watchdog".into())
        .spawn(move || {
            for tick in 1u64.. {
                std::thread::sleep(TICK);
                inspect_requests(ops);
                check_memory(ops);
                if let Some(access) = &ops.access {
                    access.flush();
                }
                if reports && tick % 10 == 0 {
                    report_to_supervisor();
                }
            }
        });
    if let Err(e) = spawned {
        tracing::error!("cannot start the watchdog thread: {e}");
    }
}

/// A worker of `--processes` sends its metrics to the supervisor (every second).
#[cfg(unix)]
fn report_to_supervisor() {
    crate::supervisor::report_metrics(&super::metrics::snapshot());
}

#[cfg(not(unix))]
fn report_to_supervisor() {}

/// SIGUSR1 logs every thread's Python stack. The handler is installed before this returns (so
/// before the process reports itself ready): SIGUSR1's default action ends the process.
#[cfg(unix)]
fn spawn_stack_dumps() {
    use tokio::signal::unix::{signal, SignalKind};
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => return tracing::error!("cannot start the SIGUSR1 thread: {e}"),
    };
    let mut dumps = {
        let _entered = runtime.enter();
        match signal(SignalKind::user_defined1()) {
            Ok(dumps) => dumps,
            Err(e) => return tracing::error!("cannot watch SIGUSR1: {e}"),
        }
    };
    let spawned = std::thread::Builder::new()
        .name("wfastcgi-sigusr1".into())
        .spawn(move || {
            runtime.block_on(async {
                while dumps.recv().await.is_some() {
                    match python_stacks(None) {
                        Ok(stacks) => {
                            tracing::warn!("SIGUSR1: the Python stack of every thread:\n{stacks}")
                        }
                        Err(e) => tracing::warn!("SIGUSR1: {e}"),
                    }
                }
            })
        });
    if let Err(e) = spawned {
        tracing::error!("cannot start the SIGUSR1 thread: {e}");
    }
}

/// Setting the named event `Global\wfastcgi-stacks-<pid>` logs every thread's Python stack (the
/// Windows counterpart of SIGUSR1; `docs/operations.md` shows the PowerShell line).
#[cfg(windows)]
fn spawn_stack_event() {
    let (event, name) = match crate::windows::stack_event() {
        Ok(created) => created,
        Err(e) => return tracing::error!("cannot create the stack-dump event: {e}"),
    };
    tracing::info!("setting the event {name} logs every thread's Python stack");
    let spawned = std::thread::Builder::new()
        .name("wfastcgi-stack-event".into())
        .spawn(move || loop {
            if let Err(e) = crate::windows::wait_for(&event) {
                return tracing::error!("stopped waiting for {name}: {e}");
            }
            match python_stacks(None) {
                Ok(stacks) => tracing::warn!("{name}: the Python stack of every thread:\n{stacks}"),
                Err(e) => tracing::warn!("{name}: {e}"),
            }
        });
    if let Err(e) = spawned {
        tracing::error!("cannot start the stack-dump event thread: {e}");
    }
}

fn inspect_requests(ops: &'static Ops) {
    if crate::shutdown::is_serving_done() {
        return;
    }
    let running: Vec<Arc<Tracked>> = lock(&ops.running).clone();
    for tracked in running {
        if tracked.abandoned.load(Ordering::Relaxed) {
            continue;
        }
        let elapsed = tracked.started.elapsed();
        if let Some(timeout) = ops.settings.request_timeout {
            if tracked.cancelled.load(Ordering::Relaxed) {
                if elapsed >= 2 * timeout {
                    still_running(ops, &tracked, timeout);
                }
                continue;
            }
            if elapsed >= timeout {
                give_up(ops, &tracked, timeout);
                continue;
            }
        }
        if let Some(slow) = ops.settings.slow_request_log {
            if elapsed >= slow && !tracked.slow_logged.swap(true, Ordering::Relaxed) {
                tracing::warn!(
                    "{} is slow: running for {:.1} s (WSGI_SLOW_REQUEST_LOG={}); {}",
                    tracked.line,
                    elapsed.as_secs_f64(),
                    slow.as_secs_f64(),
                    request_stack(tracked.sink.key(), tracked.thread).0
                );
            }
        }
    }
}

/// A request past WSGI_REQUEST_TIMEOUT: its stack is logged, the client answered, and the process
/// taken out of service.
fn give_up(ops: &'static Ops, tracked: &Tracked, timeout: Duration) {
    let key = tracked.sink.key();
    let (stack, task) = request_stack(key, tracked.thread);
    // Answered before the task is cancelled, so the client gets the 504, not the task's end.
    let outcome = tracked.sink.take_over();
    if outcome == TakeOver::Answered {
        answered_by_watchdog(ops, tracked, 504, TIMEOUT_BODY.len() as u64);
    }
    let answer = match outcome {
        TakeOver::Answered => "the client is answered 504 Gateway Timeout",
        TakeOver::Cut => "its response, already started, is cut short",
        TakeOver::AlreadyEnded => "its response was complete",
        TakeOver::Busy => "its thread is blocked writing the response, which stays unanswered",
    };
    let fate = match task {
        Task::Suspended => "its ASGI task is cancelled and the process stays in service",
        Task::Blocked => {
            "the ASGI event loop is blocked (a task does not yield): the process is replaced"
        }
        Task::Thread => "the process is replaced",
    };
    tracing::error!(
        "{} is stuck: running for {:.1} s, past WSGI_REQUEST_TIMEOUT={}; {answer}; {fate}; {stack}",
        tracked.line,
        tracked.started.elapsed().as_secs_f64(),
        timeout.as_secs_f64(),
    );
    let cancelled = matches!(task, Task::Suspended)
        && with_python(Duration::ZERO, move |py| {
            crate::python::cancel_task(py, key).map_err(|e| crate::python::format_exception(py, &e))
        })
        .map_err(|e| tracing::error!("cannot cancel the ASGI task: {e}; the process is replaced"))
        .is_ok();
    if cancelled {
        tracked.cancelled.store(true, Ordering::Relaxed);
    } else {
        tracked.abandoned.store(true, Ordering::Relaxed);
        service::abandon(ops);
    }
}

/// A cancelled ASGI task that still runs another WSGI_REQUEST_TIMEOUT later (it caught
/// `CancelledError`) holds its request: the process is replaced as for a stuck thread.
fn still_running(ops: &'static Ops, tracked: &Tracked, timeout: Duration) {
    tracked.abandoned.store(true, Ordering::Relaxed);
    tracing::error!(
        "{}: its ASGI task still runs {:.1} s after it was cancelled; the process is replaced; {}",
        tracked.line,
        timeout.as_secs_f64(),
        request_stack(tracked.sink.key(), tracked.thread).0
    );
    service::abandon(ops);
}

/// Whose stack [`request_stack`] logged.
#[derive(Clone, Copy)]
enum Task {
    /// The request's thread's: a WSGI request (or an ASGI one whose task has ended).
    Thread,
    /// The ASGI loop's thread's: the loop did not answer within [`LOOP_WAIT`].
    Blocked,
    /// The ASGI request's task's, waiting on a free loop.
    Suspended,
}

/// The stack to log for a request: its ASGI task's (the request's sink has `key`) while the
/// event loop is free, else its thread's (the loop's, for a task that blocks it).
fn request_stack(key: usize, thread: u64) -> (String, Task) {
    use crate::python::WatchedTask;
    if !crate::python::serves_asgi() {
        return (stack_of(thread), Task::Thread);
    }
    let task = with_python(LOOP_WAIT, move |py| {
        crate::python::watched_task(py, key, LOOP_WAIT)
            .map_err(|e| crate::python::format_exception(py, &e))
    });
    match task {
        Ok(WatchedTask::Suspended(stack)) => (
            format!("its ASGI task's stack (most recent call last):\n{stack}"),
            Task::Suspended,
        ),
        Ok(WatchedTask::LoopBlocked) => (stack_of(thread), Task::Blocked),
        Ok(WatchedTask::None) => (stack_of(thread), Task::Thread),
        Err(e) => (format!("{e}; {}", stack_of(thread)), Task::Thread),
    }
}

fn check_memory(ops: &'static Ops) {
    let Some(limit) = ops.settings.max_rss else {
        return;
    };
    if let Some(rss) = resident_bytes() {
        if rss > limit {
            service::recycle(
                ops,
                service::Cause::MaxRss,
                format!(
                    "resident memory {} MiB is above WSGI_MAX_RSS={} MiB",
                    rss >> 20,
                    limit >> 20
                ),
            );
        }
    }
}

/// This process's resident set size.
#[cfg(target_os = "linux")]
pub fn resident_bytes() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    // SAFETY: sysconf has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    Some(pages * u64::try_from(page).ok()?)
}

#[cfg(not(target_os = "linux"))]
pub fn resident_bytes() -> Option<u64> {
    None
}

/// "the Python stack of its thread ...:" and the stack, or why there is none.
fn stack_of(thread: u64) -> String {
    match python_stacks(Some(thread)) {
        Ok(stack) if stack.is_empty() => format!("thread {thread:#x} has no Python stack"),
        Ok(stack) => format!("its thread's Python stack:\n{stack}"),
        Err(e) => e,
    }
}

/// The Python stack of `thread` (every thread when `None`), every frame, most recent call last,
/// as `traceback` prints it. Taken from a helper thread, waited for at most [`GIL_WAIT`].
pub fn python_stacks(thread: Option<u64>) -> Result<String, String> {
    with_python(Duration::ZERO, move |py| {
        format_stacks(py, thread).map_err(|e| {
            let error = crate::python::format_exception(py, &e);
            format!("cannot read the Python stacks:\n{error}")
        })
    })
}

/// Runs `work` with the GIL on a helper thread, waited for at most [`GIL_WAIT`] to get the GIL
/// and `more` for what `work` waits for itself.
fn with_python<T: Send + 'static>(
    more: Duration,
    work: impl FnOnce(Python<'_>) -> Result<T, String> + Send + 'static,
) -> Result<T, String> {
    if !crate::python::interpreter::running() {
        return Err("Python is not running".into());
    }
    let (sender, receiver) = std::sync::mpsc::channel();
    let spawned = std::thread::Builder::new()
        .name("wfastcgi-stacks".into())
        .spawn(move || {
            let _ = sender.send(Python::attach(work));
        });
    if let Err(e) = spawned {
        return Err(format!("cannot start a thread to attach to Python: {e}"));
    }
    match receiver.recv_timeout(GIL_WAIT + more) {
        Ok(done) => done,
        Err(_) => Err(format!(
            "no Python stack: the GIL was not released within {GIL_WAIT:?} (a thread is stuck in C code that holds it)"
        )),
    }
}

fn format_stacks(py: Python<'_>, only: Option<u64>) -> PyResult<String> {
    let frames = py.import("sys")?.call_method0("_current_frames")?;
    let frames = frames.cast::<PyDict>()?;
    let format_stack = py.import("traceback")?.getattr("format_stack")?;
    let names = PyDict::new(py);
    for thread in py
        .import("threading")?
        .call_method0("enumerate")?
        .try_iter()?
    {
        let thread = thread?;
        names.set_item(thread.getattr("ident")?, thread.getattr("name")?)?;
    }
    let mut out = String::new();
    for (ident, frame) in frames.iter() {
        let ident: u64 = ident.extract()?;
        if only.is_some_and(|only| only != ident) {
            continue;
        }
        let name = match names.get_item(ident)? {
            Some(name) => format!(" {}", name.str()?),
            None => String::new(),
        };
        out.push_str(&format!(
            "Thread {ident:#x}{name} (most recent call last):\n"
        ));
        let lines = format_stack.call1((frame,))?;
        out.push_str(
            &PyString::new(py, "")
                .call_method1("join", (lines,))?
                .extract::<String>()?,
        );
    }
    Ok(out)
}
