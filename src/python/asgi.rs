//! The ASGI 3 bridge: one event loop per process, on the `wfastcgi-asgi` thread, runs every
//! request as a task, and is the only thread that runs Python.
//!
//! A request reaches the loop without the GIL ([`dispatch`]): from its connection's task when
//! listening, from a worker under IIS. What the task cannot do without waiting (read the body,
//! send a batch the connection has no room for, send a file, end the request) it asks of the
//! request's pump as an [`Op`]: a task beside the connection's for a request from a connection
//! task (on the I/O runtime; under IIS on Windows, on a runtime of the bridge's own), else the
//! worker that read the request from the IIS stream itself, which then waits for the request. New requests and completed futures reach the loop through one queue in [`Shared`];
//! the loop is woken by one byte on a socket pair it watches with `add_reader` (`sock_recv` on
//! Windows' Proactor loop, which has no `add_reader`), so nothing takes the GIL to wake it. The
//! Python half (`asgi.py`) holds the loop, lifespan and the ASGI message rules.

use std::borrow::Cow;
use std::cell::Cell;
use std::collections::hash_map::{Entry, HashMap};
use std::ffi::CString;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::intern;
use pyo3::prelude::*;
use pyo3::pybacked::PyBackedBytes;
use pyo3::types::{PyBytes, PyDict, PyList, PyString, PyTuple};

use super::response::error_response;
use super::{declared_length, describe, format_exception, health_answer, refuse, App};
use crate::config::ErrorDetail;
use crate::exchange::{BodyEvent, BodyStream, Job, Output, ResponseEncoder, TrySendError};
use crate::ops::{GuardedSink, InFlight};
use crate::protocol::Params;
use crate::routing::{self, RouteSettings};

const SHIM: &str = include_str!("asgi.py");
/// How often a worker looks whether a request whose application waits for `http.disconnect`
/// was aborted.
const WATCH_TICK: Duration = Duration::from_millis(100);
/// At most how often the loop yields to the I/O thread (`yield_to_the_io_thread`). Measured with
/// both on one CPU (FastAPI behind nginx): after every response, hello at 100 clients ran at
/// 10.8k req/s; every 1 ms, 16.9k, and the 100 ms sleep at 100 clients answered as fast as
/// uvicorn (BENCHMARKS.md).
const YIELD_EVERY: Duration = Duration::from_millis(1);
/// A file given to `http.response.pathsend` is read this much at a time.
const FILE_BLOCK: usize = 64 * 1024;

/// The interface an application speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Interface {
    Wsgi,
    Asgi,
}

impl std::fmt::Display for Interface {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Interface::Wsgi => "WSGI",
            Interface::Asgi => "ASGI",
        })
    }
}

/// Which interface `handler` speaks and why: `WSGI_INTERFACE` when set, else an ASGI 3
/// application is a coroutine function or an object whose `__call__` is one.
pub fn detect(
    py: Python<'_>,
    handler: &Bound<'_, PyAny>,
    setting: Option<&str>,
) -> Result<(Interface, String), String> {
    match setting.map(str::trim).filter(|s| !s.is_empty()) {
        Some(v) if v.eq_ignore_ascii_case("wsgi") => {
            return Ok((Interface::Wsgi, "WSGI_INTERFACE=wsgi".into()))
        }
        Some(v) if v.eq_ignore_ascii_case("asgi") => {
            return Ok((Interface::Asgi, "WSGI_INTERFACE=asgi".into()))
        }
        Some(v) => {
            return Err(format!(
                "app setting WSGI_INTERFACE={v:?} is invalid: expected wsgi or asgi"
            ))
        }
        None => {}
    }
    let found = || -> PyResult<(Interface, String)> {
        let inspect = py.import("inspect")?;
        let coroutine = |obj: &Bound<'_, PyAny>| -> PyResult<bool> {
            inspect
                .call_method1("iscoroutinefunction", (obj,))?
                .is_truthy()
        };
        if coroutine(handler)? {
            return Ok((
                Interface::Asgi,
                "the handler is a coroutine function (async def)".into(),
            ));
        }
        let plain = inspect.call_method1("isroutine", (handler,))?.is_truthy()?
            || inspect.call_method1("isclass", (handler,))?.is_truthy()?;
        if !plain {
            if let Ok(call) = handler.getattr("__call__") {
                if coroutine(&call)? {
                    return Ok((
                        Interface::Asgi,
                        "the handler's __call__ is a coroutine function (async def)".into(),
                    ));
                }
            }
        }
        Ok((
            Interface::Wsgi,
            "the handler is not a coroutine function".into(),
        ))
    };
    found().map_err(|e| format_exception(py, &e))
}

/// The loaded ASGI application: requests go to the event loop.
pub struct AsgiApp {
    shared: Arc<Shared>,
    /// Pumps the requests a worker hands over from connection tasks (`wfastcgi-asgi-io`; never
    /// takes the GIL): made for the first one, as a request from a connection's own task is
    /// pumped on that task's runtime.
    runtime: OnceLock<tokio::runtime::Runtime>,
}

impl AsgiApp {
    /// The runtime that pumps a request from a connection task: the caller's, or the bridge's.
    fn pump_runtime(&self) -> std::io::Result<tokio::runtime::Handle> {
        if let Ok(current) = tokio::runtime::Handle::try_current() {
            return Ok(current);
        }
        if let Some(runtime) = self.runtime.get() {
            return Ok(runtime.handle().clone());
        }
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("wfastcgi-asgi-io")
            .enable_time()
            .build()?;
        Ok(self.runtime.get_or_init(|| runtime).handle().clone())
    }
}

/// What the loop and the workers share.
struct Shared {
    items: Mutex<Vec<Item>>,
    /// The SCRIPT_NAME/PATH_INFO settings, for the scope.
    routing: Routing,
    /// The loop thread's `threading.get_ident()`, for the watchdog's stack dumps.
    loop_thread: AtomicU64,
    /// A wake-up byte is on its way: no need for another.
    wake_pending: AtomicBool,
    waker: OnceLock<Wakeup>,
    /// The outcome of lifespan startup, and then whether the loop thread has ended.
    state: Mutex<LoopState>,
    changed: Condvar,
}

#[derive(Default)]
struct LoopState {
    started: Option<Result<(), String>>,
    ended: bool,
}

/// What a worker hands the loop.
enum Item {
    /// A new request: the loop builds its scope and starts its task.
    Request(Arc<Params>, Box<AsgiRequest>),
    Done(Py<PyAny>, Completion),
    Stop,
}

/// The result a future gets.
enum Completion {
    Chunk(Bytes),
    BodyEnd,
    /// The body cannot be completed, or the web server aborted the request.
    Interrupted,
    Sent,
    Gone,
    Error(String),
}

static SHARED: OnceLock<Arc<Shared>> = OnceLock::new();

impl Shared {
    fn push(&self, item: Item) {
        lock(&self.items).push(item);
        if !self.wake_pending.swap(true, Ordering::AcqRel) {
            if let Some(waker) = self.waker.get() {
                waker.wake();
            }
        }
    }

    fn complete(&self, future: Py<PyAny>, completion: Completion) {
        self.push(Item::Done(future, completion));
    }

    fn set_state(&self, change: impl FnOnce(&mut LoopState)) {
        change(&mut lock(&self.state));
        self.changed.notify_all();
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The writing end of the loop's wake-up socket pair, owned by Python (which never closes it).
struct Wakeup(std::mem::ManuallyDrop<socket2::Socket>);

impl Wakeup {
    fn new(handle: u64) -> Wakeup {
        #[cfg(unix)]
        // SAFETY: the descriptor is the open write end of the loop's socket pair, which the
        // Python side keeps open for the life of the process; ManuallyDrop never closes it.
        let socket = unsafe {
            use std::os::fd::FromRawFd;
            socket2::Socket::from_raw_fd(handle as i32)
        };
        #[cfg(windows)]
        // SAFETY: as above, for the SOCKET handle.
        let socket = unsafe {
            use std::os::windows::io::FromRawSocket;
            socket2::Socket::from_raw_socket(handle)
        };
        Wakeup(std::mem::ManuallyDrop::new(socket))
    }

    /// The socket is non-blocking; a full buffer means the loop has a wake-up to read anyway.
    fn wake(&self) {
        let _ = self.0.send(&[1]);
    }
}

/// The loop's handle on [`Shared`].
#[pyclass(module = "wfastcgi", name = "AsgiBridge")]
struct Bridge {
    shared: Arc<Shared>,
}

#[pymethods]
impl Bridge {
    /// Lifespan startup is over: `failure` is why it failed, else the loop reads `waker`.
    #[pyo3(signature = (failure, waker=None))]
    fn started(&self, py: Python<'_>, failure: Option<String>, waker: Option<u64>) {
        let ident = py
            .import("threading")
            .and_then(|threading| threading.call_method0("get_ident"))
            .and_then(|ident| ident.extract())
            .unwrap_or(0);
        self.shared.loop_thread.store(ident, Ordering::Relaxed);
        if let Some(handle) = waker {
            let _ = self.shared.waker.set(Wakeup::new(handle));
        }
        let outcome = match failure {
            Some(reason) => Err(reason),
            None => Ok(()),
        };
        self.shared.set_state(|state| state.started = Some(outcome));
    }

    /// What workers handed over since the last call: `(0, scope, request)`, `(1, future,
    /// result)`, `(2,)` to stop.
    fn drain<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyList>> {
        self.shared.wake_pending.store(false, Ordering::Release);
        let items = std::mem::take(&mut *lock(&self.shared.items));
        let list = PyList::empty(py);
        for item in items {
            let entry = match item {
                Item::Request(params, request) => match scope(py, &self.shared.routing, &params) {
                    Ok(scope) => (0, scope, Py::new(py, *request)?).into_pyobject(py)?,
                    Err(e) => {
                        let message = format_exception(py, &e);
                        let mut request = *request;
                        request.error(&format!("cannot build the ASGI scope:\n{message}"));
                        continue;
                    }
                },
                Item::Done(future, completion) => {
                    let value = match completion {
                        Completion::Chunk(data) => PyBytes::new(py, &data).into_any(),
                        Completion::BodyEnd => py.None().into_bound(py),
                        Completion::Interrupted | Completion::Gone => {
                            false.into_pyobject(py)?.to_owned().into_any()
                        }
                        Completion::Sent => true.into_pyobject(py)?.to_owned().into_any(),
                        Completion::Error(message) => PyString::new(py, &message).into_any(),
                    };
                    (1, future, value).into_pyobject(py)?
                }
                Item::Stop => PyTuple::new(py, [2])?,
            };
            list.append(entry)?;
        }
        Ok(list)
    }

    #[pyo3(signature = (message, error=false))]
    fn log(&self, message: &str, error: bool) {
        if error {
            tracing::error!("{message}");
        } else {
            tracing::info!("{message}");
        }
    }
}

/// Starts the event loop thread and runs lifespan startup; its failure is the reason every
/// request gets a 500.
pub fn start(
    py: Python<'_>,
    handler: &Bound<'_, PyAny>,
    routing: Routing,
) -> Result<AsgiApp, String> {
    let shared = Arc::new(Shared {
        items: Mutex::new(Vec::new()),
        routing,
        loop_thread: AtomicU64::new(0),
        wake_pending: AtomicBool::new(false),
        waker: OnceLock::new(),
        state: Mutex::new(LoopState::default()),
        changed: Condvar::new(),
    });
    let prepared = || -> PyResult<(Py<PyAny>, Py<Bridge>)> {
        let code = CString::new(SHIM).map_err(|e| PyValueError::new_err(e.to_string()))?;
        let module = PyModule::from_code(py, &code, c"wfastcgi_asgi.py", c"wfastcgi_asgi")?;
        let bridge = Py::new(
            py,
            Bridge {
                shared: shared.clone(),
            },
        )?;
        Ok((module.getattr("run")?.unbind(), bridge))
    };
    let (run, bridge) = prepared().map_err(|e| format_exception(py, &e))?;
    let handler = handler.clone().unbind();
    let ending = shared.clone();
    std::thread::Builder::new()
        .name("wfastcgi-asgi".into())
        .spawn(move || {
            Python::attach(|py| {
                if let Err(e) = run.call1(py, (bridge, handler)) {
                    tracing::error!("the ASGI event loop failed:\n{}", format_exception(py, &e));
                }
                ending.set_state(|state| {
                    state
                        .started
                        .get_or_insert(Err("the event loop ended".into()));
                    state.ended = true;
                });
                // Requests handed over too late: their pumps see them dropped and end them.
                drop(std::mem::take(&mut *lock(&ending.items)));
            });
        })
        .map_err(|e| format!("cannot start the event loop thread: {e}"))?;
    let started = py.detach(|| {
        let mut state = lock(&shared.state);
        loop {
            if let Some(started) = &state.started {
                return started.clone();
            }
            state = shared
                .changed
                .wait(state)
                .unwrap_or_else(|poisoned| poisoned.into_inner());
        }
    });
    started.map_err(|reason| format!("ASGI lifespan startup failed: {reason}"))?;
    let _ = SHARED.set(shared.clone());
    Ok(AsgiApp {
        shared,
        runtime: OnceLock::new(),
    })
}

/// Runs lifespan shutdown once every connection and worker is done, and waits for the loop to end, at most
/// `grace`.
pub fn stop(grace: Duration) {
    let Some(shared) = SHARED.get() else { return };
    shared.push(Item::Stop);
    let state = lock(&shared.state);
    let (state, _) = shared
        .changed
        .wait_timeout_while(state, grace, |state| !state.ended)
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    if !state.ended {
        tracing::warn!(
            "the ASGI event loop did not finish within the grace period ({grace:?}): tasks or lifespan shutdown still running"
        );
    }
}

/// What the loop asks of the pump that serves a request's I/O.
enum Op {
    /// The next piece of the body.
    Receive(Py<PyAny>),
    /// Complete this future when the request is aborted or the response complete.
    Watch(Py<PyAny>),
    /// A batch the connection could not take at once; `last`: it ends the request.
    Send {
        output: Output,
        future: Py<PyAny>,
        last: Option<(u16, u64)>,
    },
    /// `http.response.pathsend`: the head, then the file, then the end of the request.
    File {
        head: Bytes,
        path: std::path::PathBuf,
        future: Py<PyAny>,
        status: u16,
    },
    /// The request is over; `output` still to send.
    End {
        output: Option<Output>,
        status: u16,
        bytes: u64,
    },
}

/// The loop's end of a request's pump.
enum Ops {
    /// The pump is the worker thread that took the request.
    Thread(crossbeam_channel::Sender<Op>),
    /// The pump is a task on the bridge's runtime, started by the request's first `Op`.
    Task(Box<TaskPump>),
}

impl Ops {
    fn send(&mut self, op: Op) {
        match self {
            // The worker waits for the request's end, so it is there to receive.
            Ops::Thread(sender) => {
                let _ = sender.send(op);
            }
            Ops::Task(pump) => pump.send(op),
        }
    }
}

/// A request's pump task, started only when the request needs it: a response the connection
/// takes at once, from an application that does not read the body, is ended on the loop's thread
/// without a wake-up of the runtime's.
struct TaskPump {
    sender: Option<tokio::sync::mpsc::UnboundedSender<Op>>,
    /// What the task takes when it starts.
    idle: Option<(BodyStream, InFlight, Arc<Params>)>,
    sink: Arc<GuardedSink>,
    shared: Arc<Shared>,
    runtime: tokio::runtime::Handle,
}

impl TaskPump {
    fn send(&mut self, op: Op) {
        if let Op::End {
            output: None,
            status,
            bytes,
        } = op
        {
            if let Some((_, in_flight, params)) = self.idle.take() {
                return in_flight.end(&params, status, bytes);
            }
        }
        self.start();
        if let Some(sender) = &self.sender {
            let _ = sender.send(op);
        }
    }

    fn start(&mut self) {
        let Some((body, in_flight, params)) = self.idle.take() else {
            return;
        };
        let (sender, ops) = tokio::sync::mpsc::unbounded_channel();
        self.sender = Some(sender);
        let (sink, shared) = (self.sink.clone(), self.shared.clone());
        self.runtime.spawn(async move {
            let mut tick = tokio::time::interval(WATCH_TICK);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut wire = TaskWire {
                ops,
                body,
                sink: sink.clone(),
                tick,
            };
            let (status, bytes) = pump(&mut wire, &sink, &shared).await;
            in_flight.end(&params, status, bytes);
        });
    }
}

impl Drop for TaskPump {
    /// A request dropped before it ended (the loop stopped): its pump cuts the response.
    fn drop(&mut self) {
        self.start();
    }
}

/// Serves one job without the GIL: answers the health path and refusals as for WSGI, then hands
/// the request to the loop, which builds its scope and starts its task. A request from a
/// connection task is then pumped by a task beside it, and this returns at once (a connection's
/// task calls it directly when listening); a request this thread reads from the socket itself
/// (the IIS stream on Unix) is pumped by this thread, which waits for it.
pub(super) fn dispatch(app: &App, asgi: &AsgiApp, job: Job) {
    let Job {
        params,
        mut body,
        response,
    } = job;
    if let Some((status, text)) = health_answer(&params) {
        return crate::exchange::respond(&response, status, text);
    }
    let shared = &asgi.shared;
    let declared = declared_length(app, &params);
    let in_flight = crate::ops::begin(
        || shared.loop_thread.load(Ordering::Relaxed),
        || describe(&params),
        &params,
        declared.ok().flatten().unwrap_or(0),
        response,
    );
    if let Err((status, reason)) = declared {
        return refuse(in_flight, &params, status, reason);
    }
    if lock(&shared.state).ended {
        let message = "the ASGI event loop has stopped (see the log)";
        return unavailable(app, in_flight, &params, message);
    }
    let sink = in_flight.sink();
    let asynchronous = body.channel().is_some() && sink.channel().is_some();
    let params = Arc::new(params);
    let (ops, thread_pump) = if asynchronous {
        let runtime = match asgi.pump_runtime() {
            Ok(runtime) => runtime,
            Err(e) => {
                let message = format!("cannot start the ASGI I/O runtime: {e}");
                return unavailable(app, in_flight, &params, &message);
            }
        };
        let pump = TaskPump {
            sender: None,
            idle: Some((body, in_flight, params.clone())),
            sink: sink.clone(),
            shared: shared.clone(),
            runtime,
        };
        (Ops::Task(Box::new(pump)), None)
    } else {
        let (sender, receiver) = crossbeam_channel::unbounded();
        (Ops::Thread(sender), Some((receiver, body, in_flight)))
    };
    let request = AsgiRequest {
        ops,
        sink: sink.clone(),
        encoder: ResponseEncoder::new(sink.request_id()),
        head: None,
        status: 0,
        body_len: 0,
        sent: false,
        done: false,
        detail: app.error_detail,
        what: describe(&params),
    };
    shared.push(Item::Request(params.clone(), Box::new(request)));
    if let Some((ops, body, in_flight)) = thread_pump {
        let mut wire = ThreadWire {
            ops,
            body,
            sink: sink.clone(),
        };
        let (status, bytes) = run_here(pump(&mut wire, &sink, shared));
        in_flight.end(&params, status, bytes);
    }
}

/// Answers a request the loop cannot take with a 500 that says why.
fn unavailable(app: &App, in_flight: InFlight, params: &Params, message: &str) {
    tracing::error!("{}: {message}", describe(params));
    let sink = in_flight.sink();
    let mut encoder = ResponseEncoder::new(sink.request_id());
    error_response(&mut encoder, message, app.error_detail);
    sink.send_whole(Output::End(encoder.finish(0)));
    in_flight.end(params, 500, ERROR_BODY_LEN);
}

/// What a pump waits for next.
enum Next {
    Op(Op),
    /// `WATCH_TICK` went by: time to look whether the request was aborted.
    Tick,
    /// The request object went away without ending the request (the loop stopped).
    Closed,
}

/// A request's connection, as its pump uses it: blocking calls on a worker thread, or awaited
/// channels in a task.
trait Wire {
    async fn next(&mut self, watching: bool) -> Next;
    async fn read(&mut self) -> Completion;
    /// Whether the web server took the batch.
    async fn send(&mut self, output: Output) -> bool;
}

struct ThreadWire {
    ops: crossbeam_channel::Receiver<Op>,
    body: BodyStream,
    sink: Arc<GuardedSink>,
}

impl Wire for ThreadWire {
    async fn next(&mut self, _watching: bool) -> Next {
        match self.ops.recv_timeout(WATCH_TICK) {
            Ok(op) => Next::Op(op),
            Err(crossbeam_channel::RecvTimeoutError::Timeout) => Next::Tick,
            Err(crossbeam_channel::RecvTimeoutError::Disconnected) => Next::Closed,
        }
    }

    async fn read(&mut self) -> Completion {
        match self.body.next_blocking() {
            Ok(Some(data)) => Completion::Chunk(data),
            Ok(None) => Completion::BodyEnd,
            Err(_) => Completion::Interrupted,
        }
    }

    async fn send(&mut self, output: Output) -> bool {
        self.sink.send_blocking(output).is_ok()
    }
}

struct TaskWire {
    ops: tokio::sync::mpsc::UnboundedReceiver<Op>,
    body: BodyStream,
    sink: Arc<GuardedSink>,
    tick: tokio::time::Interval,
}

impl Wire for TaskWire {
    async fn next(&mut self, watching: bool) -> Next {
        tokio::select! {
            op = self.ops.recv() => op.map_or(Next::Closed, Next::Op),
            _ = self.tick.tick(), if watching => Next::Tick,
        }
    }

    async fn read(&mut self) -> Completion {
        let Some(channel) = self.body.channel() else {
            return Completion::Interrupted;
        };
        match channel.recv().await {
            Some(BodyEvent::Data(data)) => Completion::Chunk(data),
            Some(BodyEvent::End) => Completion::BodyEnd,
            None => Completion::Interrupted,
        }
    }

    /// Waits for room in the connection's channel (the web server reads slowly) without a
    /// thread; the batch still goes through the guarded sink, which the watchdog shares.
    async fn send(&mut self, mut output: Output) -> bool {
        loop {
            match self.sink.try_send(output) {
                Ok(()) => return true,
                Err(TrySendError::Gone) => return false,
                Err(TrySendError::Full(back)) => {
                    output = back;
                    let Some(channel) = self.sink.channel() else {
                        return false;
                    };
                    // The permit is dropped at once: this request is the channel's only sender.
                    if channel.reserve().await.is_err() {
                        return false;
                    }
                }
            }
        }
    }
}

/// Runs a pump on this thread: its [`ThreadWire`] blocks rather than returning `Pending`.
fn run_here<T>(future: impl std::future::Future<Output = T>) -> T {
    let mut future = std::pin::pin!(future);
    let mut context = std::task::Context::from_waker(std::task::Waker::noop());
    loop {
        if let std::task::Poll::Ready(value) = future.as_mut().poll(&mut context) {
            return value;
        }
        std::thread::yield_now();
    }
}

/// Does what the loop asks until the request ends. Returns the status and body bytes for the
/// access log.
async fn pump(wire: &mut impl Wire, sink: &GuardedSink, shared: &Shared) -> (u16, u64) {
    let mut watch: Option<Py<PyAny>> = None;
    let release = |watch: &mut Option<Py<PyAny>>| {
        if let Some(future) = watch.take() {
            shared.complete(future, Completion::Interrupted);
        }
    };
    let mut body_ended = false;
    loop {
        let op = match wire.next(watch.is_some()).await {
            Next::Op(op) => op,
            Next::Tick => {
                // Aborted, or the connection task is gone (the web server closed it); on the
                // IIS stream on Unix the socket is read for it.
                let gone =
                    || sink.look_for_abort() || sink.channel().is_some_and(|c| c.is_closed());
                if watch.is_some() && gone() {
                    release(&mut watch);
                }
                continue;
            }
            Next::Closed => {
                tracing::error!(
                    request_id = sink.request_id(),
                    "the ASGI request was dropped before its response ended; response cut short"
                );
                let mut encoder = ResponseEncoder::new(sink.request_id());
                wire.send(Output::End(encoder.finish(1))).await;
                return (500, 0);
            }
        };
        match op {
            Op::Receive(future) => {
                let completion = if body_ended {
                    Completion::BodyEnd
                } else {
                    wire.read().await
                };
                body_ended = matches!(completion, Completion::BodyEnd);
                shared.complete(future, completion);
            }
            Op::Watch(future) => watch = Some(future),
            Op::Send {
                output,
                future,
                last,
            } => {
                let sent = wire.send(output).await;
                shared.complete(future, Completion::sent(sent));
                if let Some(outcome) = last {
                    release(&mut watch);
                    return outcome;
                }
            }
            Op::File {
                head,
                path,
                future,
                status,
            } => {
                let file = match std::fs::File::open(&path) {
                    Ok(file) => file,
                    Err(e) => {
                        let message =
                            format!("http.response.pathsend cannot open {}: {e}", path.display());
                        shared.complete(future, Completion::Error(message));
                        continue;
                    }
                };
                let (sent, bytes) = send_file(wire, sink, head, file, &path).await;
                shared.complete(future, Completion::sent(sent));
                release(&mut watch);
                return (status, bytes);
            }
            Op::End {
                output,
                status,
                bytes,
            } => {
                if let Some(output) = output {
                    wire.send(output).await;
                }
                release(&mut watch);
                return (status, bytes);
            }
        }
    }
}

impl Completion {
    fn sent(sent: bool) -> Completion {
        if sent {
            Completion::Sent
        } else {
            Completion::Gone
        }
    }
}

/// Sends the head and the file, then ends the request (cut short, app status 1, when the file
/// cannot be read to its end). Returns whether the web server took it all, and the body bytes.
/// The file is read without the GIL, in blocks (on the bridge's runtime thread for a task:
/// a regular file's reads do not wait on the network).
async fn send_file(
    wire: &mut impl Wire,
    sink: &GuardedSink,
    head: Bytes,
    mut file: std::fs::File,
    path: &std::path::Path,
) -> (bool, u64) {
    use std::io::Read;
    let mut encoder = ResponseEncoder::new(sink.request_id());
    encoder.stdout(&head);
    let mut buffer = vec![0u8; FILE_BLOCK];
    let mut bytes = 0u64;
    loop {
        if sink.is_aborted() {
            wire.send(Output::End(encoder.finish(0))).await;
            return (false, bytes);
        }
        match file.read(&mut buffer) {
            Ok(0) => break,
            Ok(n) => {
                encoder.stdout(&buffer[..n]);
                bytes += n as u64;
                if !wire.send(Output::Records(encoder.take())).await {
                    wire.send(Output::End(encoder.finish(0))).await;
                    return (false, bytes);
                }
            }
            Err(e) => {
                tracing::error!(
                    request_id = sink.request_id(),
                    "http.response.pathsend: reading {} failed: {e}; response cut short",
                    path.display()
                );
                encoder.discard();
                wire.send(Output::End(encoder.finish(1))).await;
                return (true, bytes);
            }
        }
    }
    let sent = wire.send(Output::End(encoder.finish(0))).await;
    (sent, bytes)
}

/// One request as the loop sees it: encodes the response and sends what the connection takes at
/// once; anything that would wait goes to the request's worker.
#[pyclass(module = "wfastcgi", name = "AsgiRequest")]
struct AsgiRequest {
    ops: Ops,
    sink: Arc<GuardedSink>,
    encoder: ResponseEncoder,
    /// `Status:` line and headers from `http.response.start`, until they go out.
    head: Option<Vec<u8>>,
    status: u16,
    body_len: u64,
    /// Records went out (or to the worker): too late for a 500.
    sent: bool,
    /// The request's end was handed to the worker.
    done: bool,
    detail: ErrorDetail,
    what: String,
}

impl AsgiRequest {
    fn post(&mut self, op: Op) {
        self.ops.send(op);
    }

    fn end(&mut self, output: Option<Output>) {
        if !self.done {
            self.done = true;
            self.post(Op::End {
                output,
                status: self.status,
                bytes: self.body_len,
            });
        }
    }

    /// Puts the head (once) and `data` in the encoder.
    fn encode(&mut self, data: &[u8]) {
        if let Some(head) = self.head.take() {
            self.encoder.stdout(&head);
        }
        if !data.is_empty() {
            self.encoder.stdout(data);
            self.body_len += data.len() as u64;
        }
    }

    /// A 500 when nothing went out yet, else the response cut short.
    fn error(&mut self, message: &str) {
        crate::ops::metrics::app_exception();
        if self.done {
            tracing::error!(
                request_id = self.sink.request_id(),
                "{} failed after its response was complete:\n{message}",
                self.what
            );
            return;
        }
        self.encoder.discard();
        let output = if self.sent {
            tracing::error!(
                request_id = self.sink.request_id(),
                "{} failed after the response started; response cut short:\n{message}",
                self.what
            );
            self.encoder.finish(1)
        } else {
            tracing::error!(
                request_id = self.sink.request_id(),
                "{} failed:\n{message}",
                self.what
            );
            error_response(&mut self.encoder, message, self.detail);
            self.status = 500;
            self.body_len = ERROR_BODY_LEN;
            self.encoder.finish(0)
        };
        self.end(Some(Output::End(output)));
    }
}

/// The body of the 500 `error_response` writes.
const ERROR_BODY_LEN: u64 = "Internal Server Error\n".len() as u64;

#[pymethods]
impl AsgiRequest {
    /// The request's key in the watchdog's view of the tasks ([`watched_task`]).
    #[getter]
    fn key(&self) -> usize {
        self.sink.key()
    }

    fn receive(&mut self, future: Py<PyAny>) {
        self.post(Op::Receive(future));
    }

    fn watch(&mut self, future: Py<PyAny>) {
        self.post(Op::Watch(future));
    }

    /// `http.response.start`: validated and encoded; it goes out with the first body.
    fn start(&mut self, status: &Bound<'_, PyAny>, headers: &Bound<'_, PyAny>) -> PyResult<()> {
        let (head, status) = encode_head(status, headers)?;
        self.head = Some(head);
        self.status = status;
        Ok(())
    }

    /// `http.response.body`: `True` when the connection took it, `False` when it is gone, else
    /// a future of `event_loop`, which the pump completes (made only then: most responses never
    /// wait).
    fn body<'py>(
        &mut self,
        py: Python<'py>,
        data: &Bound<'py, PyAny>,
        more: bool,
        event_loop: &Bound<'py, PyAny>,
    ) -> PyResult<Bound<'py, PyAny>> {
        // The connection drops an aborted request's batches (it takes them still), so the
        // application learns here that the web server is gone: ASGI 2.4 apps such as Starlette's
        // StreamingResponse stop on a failed send() rather than listen for http.disconnect.
        if self.sink.is_aborted() {
            return Ok(false.into_pyobject(py)?.to_owned().into_any());
        }
        let data: PyBackedBytes = data.extract().map_err(|_| {
            PyTypeError::new_err("http.response.body: body must be bytes or bytearray")
        })?;
        self.encode(&data);
        let output = if more {
            if self.encoder.pending() == 0 {
                return Ok(true.into_pyobject(py)?.to_owned().into_any());
            }
            Output::Records(self.encoder.take())
        } else {
            Output::End(self.encoder.finish(0))
        };
        self.sent = true;
        let last = (!more).then_some((self.status, self.body_len));
        match self.sink.try_send(output) {
            Ok(()) => {
                if !more {
                    self.end(None);
                    if matches!(self.ops, Ops::Task(_)) {
                        yield_to_the_io_thread();
                    }
                }
                Ok(true.into_pyobject(py)?.to_owned().into_any())
            }
            Err(TrySendError::Full(output)) => {
                let future = event_loop.call_method0(intern!(py, "create_future"))?;
                self.done |= last.is_some();
                self.post(Op::Send {
                    output,
                    future: future.clone().unbind(),
                    last,
                });
                Ok(future)
            }
            Err(TrySendError::Gone) => Ok(false.into_pyobject(py)?.to_owned().into_any()),
        }
    }

    /// `http.response.pathsend`: the worker sends the file without the GIL.
    fn pathsend<'py>(
        &mut self,
        path: std::path::PathBuf,
        future: Bound<'py, PyAny>,
    ) -> Bound<'py, PyAny> {
        if let Some(head) = self.head.take() {
            self.encoder.stdout(&head);
        }
        let head = self.encoder.take();
        self.post(Op::File {
            head,
            path,
            future: future.clone().unbind(),
            status: self.status,
        });
        future
    }

    /// The application raised: a 500 with `message` (its traceback), or the response cut.
    fn fail(&mut self, message: &str) {
        self.error(message);
    }

    /// The application raised because the web server went away: end the request quietly.
    fn gone(&mut self) {
        if !self.done {
            tracing::info!(
                request_id = self.sink.request_id(),
                "{}: the web server aborted the request or closed the connection; response stopped",
                self.what
            );
            self.encoder.discard();
            let output = self.encoder.finish(0);
            self.end(Some(Output::End(output)));
        }
    }

    /// The application returned.
    fn returned(&mut self) {
        if self.done {
            return;
        }
        if self.head.is_none() && !self.sent {
            return self.error("the application returned without sending http.response.start");
        }
        tracing::warn!(
            request_id = self.sink.request_id(),
            "{}: the application returned before its response was complete (no http.response.body without more_body); ended",
            self.what
        );
        self.encode(b"");
        let output = self.encoder.finish(0);
        self.sent = true;
        self.end(Some(Output::End(output)));
    }
}

/// The I/O thread does not preempt the loop's (gateway.rs): after a complete response the loop
/// lets it put what is ready on the wire, unless it did so less than `YIELD_EVERY` ago, so a
/// burst of responses goes out in batches rather than after the whole burst.
fn yield_to_the_io_thread() {
    thread_local! {
        static LAST_YIELD: Cell<Option<Instant>> = const { Cell::new(None) };
    }
    let now = Instant::now();
    if LAST_YIELD
        .get()
        .is_none_or(|last| now.duration_since(last) >= YIELD_EVERY)
    {
        LAST_YIELD.set(Some(now));
        std::thread::yield_now();
    }
}

/// `Status:` and header lines from `http.response.start`, and the status code.
fn encode_head(status: &Bound<'_, PyAny>, headers: &Bound<'_, PyAny>) -> PyResult<(Vec<u8>, u16)> {
    let code: u16 = status
        .extract()
        .ok()
        .filter(|code| (100..=999).contains(code))
        .ok_or_else(|| {
            PyValueError::new_err(format!(
                "http.response.start: status {status} is invalid: expected an int from 100 to 999"
            ))
        })?;
    let mut head = format!("Status: {code} {}\r\n", reason(code)).into_bytes();
    for header in headers.try_iter()? {
        let header = header?;
        // A tuple or a list (the spec's `[name, value]`).
        let pair = header
            .try_iter()
            .and_then(|items| {
                items
                    .map(|item| Ok(item?.extract::<PyBackedBytes>()?))
                    .collect::<PyResult<Vec<_>>>()
            })
            .ok()
            .filter(|pair| pair.len() == 2)
            .ok_or_else(|| {
                PyTypeError::new_err(format!(
                    "http.response.start: header {header} is not a pair of bytes"
                ))
            })?;
        let (name, value) = (&*pair[0], &*pair[1]);
        let valid_name = !name.is_empty()
            && name
                .iter()
                .all(|b| b.is_ascii_graphic() && !b"()<>@,;:\\\"/[]?={}".contains(b));
        if !valid_name {
            return Err(PyValueError::new_err(format!(
                "http.response.start: header name {:?} is invalid",
                String::from_utf8_lossy(name)
            )));
        }
        if value.iter().any(|&b| b == b'\r' || b == b'\n' || b == 0) {
            return Err(PyValueError::new_err(format!(
                "http.response.start: header {}: {:?} is invalid: CR, LF or NUL in the value",
                String::from_utf8_lossy(name),
                String::from_utf8_lossy(value)
            )));
        }
        head.extend_from_slice(name);
        head.extend_from_slice(b": ");
        head.extend_from_slice(value);
        head.extend_from_slice(b"\r\n");
    }
    head.extend_from_slice(b"\r\n");
    Ok((head, code))
}

/// The reason phrase of the `Status:` line (web servers pass it on).
fn reason(code: u16) -> &'static str {
    match code {
        100 => "Continue",
        101 => "Switching Protocols",
        200 => "OK",
        201 => "Created",
        202 => "Accepted",
        204 => "No Content",
        206 => "Partial Content",
        301 => "Moved Permanently",
        302 => "Found",
        303 => "See Other",
        304 => "Not Modified",
        307 => "Temporary Redirect",
        308 => "Permanent Redirect",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        409 => "Conflict",
        410 => "Gone",
        413 => "Content Too Large",
        415 => "Unsupported Media Type",
        422 => "Unprocessable Content",
        429 => "Too Many Requests",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        _ => "Status",
    }
}

/// The SCRIPT_NAME/PATH_INFO settings (`routing.rs`), as the WSGI environ uses them.
pub struct Routing {
    pub allow_path_info_for_script_mappings: bool,
    pub script_name: Option<String>,
}

/// The request headers as ASGI pairs: every `HTTP_*` parameter, lower-cased with `-` for `_`, and
/// the content type and length. A header named more than once is one pair, as in the WSGI
/// environ: nginx passes `Content-Type` both as CONTENT_TYPE and HTTP_CONTENT_TYPE, and a second
/// `HTTP_HOST` comes from its configuration (nginx joins a repeated request header itself). Host
/// and the content fields keep the last value; the others are joined.
fn headers<'py>(py: Python<'py>, params: &Params) -> PyResult<Bound<'py, PyList>> {
    let mut headers: Vec<(Vec<u8>, Cow<'_, [u8]>)> = Vec::new();
    // Keyed by the parameter's name without `HTTP_`, so CONTENT_TYPE and HTTP_CONTENT_TYPE meet.
    let mut seen: HashMap<&[u8], usize> = HashMap::new();
    for (name, value) in params.iter() {
        let (key, header) = match name {
            b"CONTENT_TYPE" if !value.is_empty() => (name, b"content-type".to_vec()),
            b"CONTENT_LENGTH" if !super::is_unknown_length(value) => {
                (name, b"content-length".to_vec())
            }
            _ => match name.strip_prefix(b"HTTP_") {
                Some(rest) if !rest.is_empty() => (
                    rest,
                    rest.iter()
                        .map(|&b| match b {
                            b'_' => b'-',
                            _ => b.to_ascii_lowercase(),
                        })
                        .collect(),
                ),
                _ => continue,
            },
        };
        match seen.entry(key) {
            Entry::Occupied(index) => {
                let (header, earlier) = &mut headers[*index.get()];
                *earlier = match header.as_slice() {
                    b"host" | b"content-type" | b"content-length" => Cow::Borrowed(value),
                    b"cookie" => Cow::Owned([earlier, &b"; "[..], value].concat()),
                    _ => Cow::Owned([earlier, &b", "[..], value].concat()),
                };
            }
            Entry::Vacant(slot) => {
                slot.insert(headers.len());
                headers.push((header, Cow::Borrowed(value)));
            }
        }
    }
    let list = PyList::empty(py);
    for (name, value) in &headers {
        list.append((PyBytes::new(py, name), PyBytes::new(py, value)))?;
    }
    Ok(list)
}

/// The HTTP connection scope (ASGI 2.4) of a request.
fn scope<'py>(
    py: Python<'py>,
    settings: &Routing,
    params: &Params,
) -> PyResult<Bound<'py, PyDict>> {
    let text = |name: &[u8]| params.get(name).filter(|v| !v.is_empty());
    let route = routing::route(
        params,
        &RouteSettings {
            allow_path_info_for_script_mappings: settings.allow_path_info_for_script_mappings,
            script_name: settings.script_name.as_deref(),
        },
    );
    let scope = PyDict::new(py);
    scope.set_item(intern!(py, "type"), intern!(py, "http"))?;
    let asgi = PyDict::new(py);
    asgi.set_item(intern!(py, "version"), intern!(py, "3.0"))?;
    asgi.set_item(intern!(py, "spec_version"), intern!(py, "2.4"))?;
    scope.set_item(intern!(py, "asgi"), asgi)?;
    let protocol = text(b"SERVER_PROTOCOL").unwrap_or(b"HTTP/1.1");
    let http_version = match protocol.strip_prefix(b"HTTP/") {
        Some(b"1.0") => intern!(py, "1.0"),
        Some(b"2" | b"2.0") => intern!(py, "2"),
        Some(b"3" | b"3.0") => intern!(py, "3"),
        _ => intern!(py, "1.1"),
    };
    scope.set_item(intern!(py, "http_version"), http_version)?;
    let method = match text(b"REQUEST_METHOD").unwrap_or(b"GET") {
        b"GET" => intern!(py, "GET").clone(),
        b"POST" => intern!(py, "POST").clone(),
        b"HEAD" => intern!(py, "HEAD").clone(),
        other => PyString::new(py, &String::from_utf8_lossy(other).to_ascii_uppercase()),
    };
    scope.set_item(intern!(py, "method"), method)?;
    let https = params
        .get(b"HTTPS")
        .is_some_and(|v| v.eq_ignore_ascii_case(b"on"));
    scope.set_item(
        intern!(py, "scheme"),
        if https {
            intern!(py, "https")
        } else {
            intern!(py, "http")
        },
    )?;
    let mut path = route.script_name.to_vec();
    path.extend_from_slice(&route.path_info);
    scope.set_item(intern!(py, "path"), String::from_utf8_lossy(&path))?;
    // The target as the client sent it: IIS's UNENCODED_URL, nginx's REQUEST_URI.
    let raw = text(b"UNENCODED_URL")
        .or_else(|| text(b"REQUEST_URI"))
        .map(|uri| uri.split(|&b| b == b'?').next().unwrap_or_default())
        .unwrap_or(&path);
    scope.set_item(intern!(py, "raw_path"), PyBytes::new(py, raw))?;
    let query = params.get(b"QUERY_STRING").unwrap_or_default();
    scope.set_item(intern!(py, "query_string"), PyBytes::new(py, query))?;
    scope.set_item(
        intern!(py, "root_path"),
        String::from_utf8_lossy(&route.script_name),
    )?;
    scope.set_item(intern!(py, "headers"), headers(py, params)?)?;
    let address = |host: &[u8], port: &[u8]| -> Option<(String, u16)> {
        let host = params.get(host).filter(|v| !v.is_empty())?;
        let port = std::str::from_utf8(params.get(port)?)
            .ok()?
            .trim()
            .parse()
            .ok()?;
        Some((String::from_utf8_lossy(host).into_owned(), port))
    };
    scope.set_item(
        intern!(py, "client"),
        address(b"REMOTE_ADDR", b"REMOTE_PORT"),
    )?;
    scope.set_item(
        intern!(py, "server"),
        address(b"SERVER_ADDR", b"SERVER_PORT").or_else(|| address(b"SERVER_NAME", b"SERVER_PORT")),
    )?;
    let extensions = PyDict::new(py);
    extensions.set_item(intern!(py, "http.response.pathsend"), PyDict::new(py))?;
    scope.set_item(intern!(py, "extensions"), extensions)?;
    Ok(scope)
}

/// Whether an ASGI application's event loop was started in this process.
pub fn serving() -> bool {
    SHARED.get().is_some()
}

/// What the watchdog finds of a request's ASGI task.
pub enum WatchedTask {
    /// The request is not served by an ASGI task (any more).
    None,
    /// The event loop did not run a callback within the wait: a task does not yield.
    LoopBlocked,
    /// The loop is free and the task waits: its stack, every frame, outermost first.
    Suspended(String),
}

/// The task of the request whose sink has `key`, and whether the loop answers within `wait`
/// (`asgi.py`, `watched_task`). Called with the GIL from a thread of the watchdog's.
pub fn watched_task(py: Python<'_>, key: usize, wait: Duration) -> PyResult<WatchedTask> {
    let found = py
        .import("wfastcgi_asgi")?
        .call_method1("watched_task", (key, wait.as_secs_f64()))?;
    if found.is_none() {
        return Ok(WatchedTask::None);
    }
    if !found.is_truthy()? {
        return Ok(WatchedTask::LoopBlocked);
    }
    Ok(WatchedTask::Suspended(found.extract()?))
}

/// Cancels the task of the request whose sink has `key`, if it still runs; the loop raises
/// `CancelledError` in it. Called with the GIL.
pub fn cancel_task(py: Python<'_>, key: usize) -> PyResult<()> {
    py.import("wfastcgi_asgi")?
        .call_method1("cancel_task", (key,))?;
    Ok(())
}
