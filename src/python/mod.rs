//! The WSGI bridge: the embedded interpreter, the application, and one request's trip through it.
//! An ASGI application is served by `asgi.rs` instead, from the same loading and worker loop.
//!
//! Threads: each worker thread attaches to the interpreter once and keeps its thread state; it
//! holds the GIL while Python runs and releases it only to wait (for the next job, for body
//! bytes, for room in the response queue).

mod asgi;
mod diagnose;
mod extras;
mod handler;
mod input;
pub mod interpreter;
#[cfg(windows)]
pub mod library;
mod response;
mod streams;

use std::ffi::c_char;

use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict, PyString, PyTuple};
use pyo3::{ffi, intern};

use crate::config::{AppConfig, ErrorDetail};
use crate::exchange::{Job, Output, ResponseEncoder};
use crate::protocol::Params;
use crate::routing::{self, RouteSettings};

pub use asgi::stop as stop_asgi;
pub use asgi::{cancel_task, serving as serves_asgi, watched_task, WatchedTask};
pub use diagnose::{diagnose, run_request, Diagnosis, HandlerReport, RequestReport};
use response::error_response;

use input::WsgiInput;
use response::StartResponse;
use streams::{FileWrapper, LogStream};

/// How the process is deployed, as the environ reports it.
#[derive(Debug, Clone, Copy)]
pub struct Deployment {
    pub multithread: bool,
    pub multiprocess: bool,
}

/// A loaded application, shared by every worker thread.
pub struct App {
    handler: Py<PyAny>,
    /// The environ entries that are the same for every request; copied per request.
    base_environ: Py<PyDict>,
    allow_path_info_for_script_mappings: bool,
    script_name: Option<String>,
    input_spool: Option<u64>,
    max_body: Option<u64>,
    pub error_detail: ErrorDetail,
    /// Set when the handler is an ASGI application: requests go to its event loop.
    asgi: Option<asgi::AsgiApp>,
}

impl App {
    /// An ASGI application: its requests run on the event loop, not on the worker threads.
    pub fn is_asgi(&self) -> bool {
        self.asgi.is_some()
    }

    /// Hands a job of an ASGI application to its event loop without blocking, as a connection's
    /// task must. Only for `is_asgi`: a WSGI application's jobs go through the queue.
    pub fn hand_to_loop(&self, job: Job) {
        if let Some(asgi) = &self.asgi {
            asgi::dispatch(self, asgi, job);
        }
    }
}

/// Prepares the interpreter for the application as wfastcgi.py does (app settings into
/// `os.environ`, `chdir` to the app folder, which goes first on `sys.path`, then `PYTHONPATH`)
/// and resolves `WSGI_HANDLER`. The interpreter must already be running.
pub fn load(config: &AppConfig, deployment: Deployment) -> Result<App, String> {
    let error_detail = config.error_detail().map_err(|e| e.to_string())?;
    let input_spool = config.input_spool().map_err(|e| e.to_string())?;
    let max_body = config.max_body().map_err(|e| e.to_string())?;
    let gc_freeze = config.gc_freeze().map_err(|e| e.to_string())?;
    let handler_name = handler_name(config)?;
    Python::attach(|py| {
        prepare_interpreter(py, config).map_err(|e| format_exception(py, &e))?;
        extras::start_debuggers(py);
        let handler = handler::resolve(py, &handler_name).map_err(|e| {
            format!(
                "Error occurred while reading WSGI handler {handler_name:?}:\n{}",
                format_exception(py, &e)
            )
        })?;
        let setting = config.get("WSGI_INTERFACE");
        let (interface, why) = asgi::detect(py, &handler, setting.as_deref())?;
        let (handler, asgi) = match interface {
            asgi::Interface::Asgi => {
                let routing = asgi::Routing {
                    allow_path_info_for_script_mappings: config
                        .allow_path_info_for_script_mappings(),
                    script_name: config.script_name(),
                };
                let app = asgi::start(py, &handler, routing)?;
                (handler, Some(app))
            }
            asgi::Interface::Wsgi => (extras::wrap_for_application_insights(py, handler), None),
        };
        let base_environ = base_environ(py, deployment).map_err(|e| format_exception(py, &e))?;
        tracing::info!("{interface} handler {handler_name:?} loaded ({why})");
        if gc_freeze {
            // What is loaded now lives as long as the process: collections skip it from here.
            // The garbage of the imports goes first, or it would never be collected.
            let frozen = py.import("gc").and_then(|gc| {
                gc.call_method0("collect")?;
                gc.call_method0("freeze")
            });
            if let Err(e) = frozen {
                tracing::warn!("gc.freeze() failed: {}", format_exception(py, &e));
            }
        }
        // Loading freed much more than it kept: give the free pages back (0.6 MiB for FastAPI).
        #[cfg(all(target_os = "linux", target_env = "gnu"))]
        // SAFETY: malloc_trim only releases memory glibc's allocator holds free.
        unsafe {
            libc::malloc_trim(0);
        }
        Ok(App {
            handler: handler.unbind(),
            base_environ: base_environ.unbind(),
            allow_path_info_for_script_mappings: config.allow_path_info_for_script_mappings(),
            script_name: config.script_name(),
            input_spool,
            max_body,
            error_detail,
            asgi,
        })
    })
}

/// `WSGI_HANDLER`, or a message that says where it should have been set.
fn handler_name(config: &AppConfig) -> Result<String, String> {
    config.handler().ok_or_else(|| {
        let source = match &config.web_config {
            Some(path) => format!(
                "{} has no <add key=\"WSGI_HANDLER\" .../> in <appSettings>",
                path.display()
            ),
            None => format!(
                "{} has no web.config and WSGI_HANDLER is not set",
                config.app_dir.display()
            ),
        };
        format!("WSGI_HANDLER is not set: {source}")
    })
}

fn prepare_interpreter(py: Python<'_>, config: &AppConfig) -> PyResult<()> {
    let os = py.import("os")?;
    let environ = os.getattr("environ")?;
    for (key, value) in &config.app_settings {
        environ.set_item(key, value)?;
    }
    // sys.path entries must be str (pyo3 turns a PathBuf into a pathlib.Path).
    let app_dir = config.app_dir.to_string_lossy();
    os.call_method1("chdir", (&*app_dir,))?;
    let sys = py.import("sys")?;
    let path = sys.getattr("path")?;
    path.call_method1("insert", (0, &*app_dir))?;
    for entry in config.python_path() {
        path.call_method1("append", (entry.to_string_lossy(),))?;
    }
    sys.setattr("stdout", LogStream::new("stdout", false))?;
    sys.setattr("stderr", LogStream::new("stderr", true))?;
    let version: String = sys.getattr("version")?.extract()?;
    let prefix: String = sys.getattr("prefix")?.extract()?;
    tracing::info!(
        "Python {} (sys.prefix {prefix})",
        version.replace('\n', " ")
    );
    tracing::debug!("sys.path = {}", path.repr()?);
    Ok(())
}

fn base_environ(py: Python<'_>, deployment: Deployment) -> PyResult<Bound<'_, PyDict>> {
    let environ = PyDict::new(py);
    environ.set_item("wsgi.version", PyTuple::new(py, [1, 0])?)?;
    environ.set_item("wsgi.errors", LogStream::new("wsgi.errors", true))?;
    environ.set_item("wsgi.multithread", deployment.multithread)?;
    environ.set_item("wsgi.multiprocess", deployment.multiprocess)?;
    environ.set_item("wsgi.run_once", false)?;
    environ.set_item("wsgi.input_terminated", true)?;
    environ.set_item("wsgi.file_wrapper", py.get_type::<FileWrapper>())?;
    Ok(environ)
}

/// Serves jobs on this thread until `next` has no more. `first` is a job taken before the
/// application was loaded (under IIS the app folder comes from it). `next` waits for a job (or
/// reads one from the IIS stream) with the GIL released.
pub fn serve_jobs(app: &App, first: Option<Job>, next: &mut (dyn FnMut() -> Option<Job> + Send)) {
    if let Some(asgi) = &app.asgi {
        // Python runs on the loop's thread only: this one never takes the GIL.
        for job in first.into_iter().chain(std::iter::from_fn(next)) {
            asgi::dispatch(app, asgi, job);
        }
        return;
    }
    Python::attach(|py| {
        if let Some(job) = first {
            handle(py, app, job);
        }
        if crate::ops::metrics::enabled() {
            // The time from a request's arrival to this thread holding the GIL again.
            while let Some((job, arrived)) =
                py.detach(|| next().map(|job| (job, std::time::Instant::now())))
            {
                crate::ops::metrics::gil_waited(arrived.elapsed());
                handle(py, app, job);
            }
            return;
        }
        while let Some(job) = py.detach(&mut *next) {
            handle(py, app, job);
        }
    });
}

pub(crate) fn handle(py: Python<'_>, app: &App, job: Job) {
    if let Some(asgi) = &app.asgi {
        return py.detach(|| asgi::dispatch(app, asgi, job));
    }
    let Job {
        params,
        body,
        response,
    } = job;
    if let Some((status, body)) = health_answer(&params) {
        return py.detach(|| crate::exchange::respond(&response, status, body));
    }
    let declared = declared_length(app, &params);
    let bytes_in = declared.ok().flatten().unwrap_or(0);
    let in_flight = crate::ops::begin(
        || thread_ident(py),
        || describe(&params),
        &params,
        bytes_in,
        response,
    );
    let content_length = match declared {
        Ok(length) => length,
        Err((status, reason)) => {
            return py.detach(|| refuse(in_flight, &params, status, reason));
        }
    };
    let responder = match Bound::new(py, StartResponse::new(in_flight.sink())) {
        Ok(responder) => responder,
        Err(e) => {
            tracing::error!("cannot create start_response: {}", format_exception(py, &e));
            return in_flight.end(&params, 500, 0);
        }
    };
    let input = match app.input_spool {
        Some(memory_limit) => WsgiInput::spooled(py, body, content_length, memory_limit),
        None => Ok(WsgiInput::new(body, content_length)),
    };
    let result = input
        .and_then(|input| Bound::new(py, input))
        .and_then(|input| app.environ(py, &params, input))
        .map_err(response::Failure::from)
        .and_then(|environ| {
            response::run(py, app.handler.bind(py), environ.into_any(), &responder)
        });
    if let Err(failure) = result {
        let what = describe(&params);
        responder
            .borrow_mut()
            .fail(py, failure, app.error_detail, &what);
    }
    let (status, bytes) = responder.borrow().outcome();
    in_flight.end(&params, status, bytes);
}

/// This thread's `threading.get_ident()`, the key of its stack in `sys._current_frames()`.
fn thread_ident(py: Python<'_>) -> u64 {
    thread_local! {
        static IDENT: std::cell::Cell<Option<u64>> = const { std::cell::Cell::new(None) };
    }
    IDENT.with(|cell| {
        cell.get().unwrap_or_else(|| {
            let ident = py
                .import("threading")
                .and_then(|threading| threading.call_method0("get_ident"))
                .and_then(|id| id.extract())
                .unwrap_or(0);
            cell.set(Some(ident));
            ident
        })
    })
}

/// CONTENT_LENGTH as a number; absent, empty or negative is `None`; anything else is an error.
fn content_length(params: &Params) -> Result<Option<u64>, ()> {
    match params.get(b"CONTENT_LENGTH") {
        None => Ok(None),
        Some(v) if is_unknown_length(v) => Ok(None),
        Some(v) => std::str::from_utf8(v.trim_ascii())
            .ok()
            .and_then(|v| v.parse().ok())
            .map(Some)
            .ok_or(()),
    }
}

/// An empty CONTENT_LENGTH (nginx, for a body-less request) or a negative one (Caddy's `-1` for
/// a chunked upload it streams) means the length is not known: the body is STDIN to its end.
fn is_unknown_length(value: &[u8]) -> bool {
    match value.trim_ascii() {
        [] => true,
        [b'-', digits @ ..] => !digits.is_empty() && digits.iter().all(u8::is_ascii_digit),
        _ => false,
    }
}

/// How a request header sent more than once is joined (nginx passes each as a parameter of the
/// same name): with `; ` for Cookie, `, ` for the others, as HTTP combines field lines. Host is a
/// single value: the last one wins, so a `fastcgi_param HTTP_HOST` after an included
/// `fastcgi_params` overrides it. `None` for parameters that are not joined.
fn repeated_header_separator(name: &[u8]) -> Option<&'static str> {
    match name {
        b"HTTP_HOST" => None,
        b"HTTP_COOKIE" => Some("; "),
        _ if name.starts_with(b"HTTP_") => Some(", "),
        _ => None,
    }
}

/// `WSGI_HEALTH_PATH`: the status line and body the gateway answers with, without Python.
fn health_answer(params: &Params) -> Option<(&'static str, &'static str)> {
    crate::ops::health(params).map(|status| match status {
        200 => ("200 OK", "OK\n"),
        _ => ("503 Service Unavailable", "draining\n"),
    })
}

/// The body length the request declares, or the status and reason it is refused with: a
/// CONTENT_LENGTH that is not a number, or one over `WSGI_MAX_BODY`.
fn declared_length(app: &App, params: &Params) -> Result<Option<u64>, (u16, &'static str)> {
    let length = content_length(params).map_err(|()| {
        tracing::warn!(
            "{}: non-numeric CONTENT_LENGTH refused with 400",
            describe(params)
        );
        (400, "Bad Request")
    })?;
    if let (Some(length), Some(max)) = (length, app.max_body) {
        if length > max {
            tracing::warn!(
                "{}: body of {length} bytes refused with 413 (WSGI_MAX_BODY={max})",
                describe(params)
            );
            return Err((413, "Content Too Large"));
        }
    }
    Ok(length)
}

/// Answers a request the application never sees. Blocks while the web server is behind: never
/// call it holding the GIL.
fn refuse(in_flight: crate::ops::InFlight, params: &Params, status: u16, reason: &str) {
    let sink = in_flight.sink();
    let body = format!("{reason}\n");
    let mut encoder = ResponseEncoder::new(sink.request_id());
    crate::exchange::simple_response(
        &mut encoder,
        &format!("{status} {reason}"),
        &[],
        body.as_bytes(),
    );
    sink.send_whole(Output::End(encoder.finish(0)));
    in_flight.end(params, status, body.len() as u64);
}

/// `GET /path` for log lines, with control characters escaped so a request cannot forge lines.
/// IIS sends no REQUEST_URI: its URL is UNENCODED_URL, else PATH_INFO and QUERY_STRING.
fn describe(params: &Params) -> String {
    let field = |name: &[u8]| params.get(name).filter(|v| !v.is_empty());
    let escaped = |v: &[u8]| String::from_utf8_lossy(v).escape_debug().to_string();
    let url = match field(b"REQUEST_URI").or_else(|| field(b"UNENCODED_URL")) {
        Some(url) => escaped(url),
        None => {
            let path = field(b"PATH_INFO").map(escaped).unwrap_or_default();
            match field(b"QUERY_STRING") {
                Some(query) => format!("{path}?{}", escaped(query)),
                None => path,
            }
        }
    };
    let method = field(b"REQUEST_METHOD").map(escaped).unwrap_or_default();
    format!("{method} {url}")
}

impl App {
    /// The PEP 3333 environ: every parameter as an ISO-8859-1 `str`, the paths by the rules in
    /// [`routing`], the raw-bytes keys wfastcgi.py adds, and the `wsgi.*` entries.
    fn environ<'py>(
        &self,
        py: Python<'py>,
        params: &Params,
        input: Bound<'py, WsgiInput>,
    ) -> PyResult<Bound<'py, PyDict>> {
        let environ = self.base_environ.bind(py).copy()?;
        LAST_PARAMS.with_borrow_mut(|last| -> PyResult<()> {
            // nginx sends these empty for body-less requests, Caddy CONTENT_LENGTH -1 for a
            // body of unknown length; PEP 3333 wants them absent.
            let present = params.iter().filter(|(name, value)| match *name {
                b"CONTENT_LENGTH" => !is_unknown_length(value),
                b"CONTENT_TYPE" => !value.is_empty(),
                _ => true,
            });
            for (index, (name, value)) in present.enumerate() {
                let (name_str, value_str) = last.strings(py, index, name, value)?;
                match repeated_header_separator(name) {
                    Some(separator) => match environ.get_item(&name_str)? {
                        Some(earlier) => {
                            let joined = earlier.add(separator)?.add(value_str)?;
                            environ.set_item(name_str, joined)?;
                        }
                        None => environ.set_item(name_str, value_str)?,
                    },
                    None => environ.set_item(name_str, value_str)?,
                }
            }
            Ok(())
        })?;
        let route = routing::route(
            params,
            &RouteSettings {
                allow_path_info_for_script_mappings: self.allow_path_info_for_script_mappings,
                script_name: self.script_name.as_deref(),
            },
        );
        environ.set_item(intern!(py, "SCRIPT_NAME"), latin1(py, &route.script_name)?)?;
        environ.set_item(intern!(py, "PATH_INFO"), latin1(py, &route.path_info)?)?;
        environ.set_item(
            intern!(py, "wsgi.script_name"),
            PyBytes::new(py, &route.script_name),
        )?;
        environ.set_item(
            intern!(py, "wsgi.path_info"),
            PyBytes::new(py, &route.path_info),
        )?;
        let query = params.get(b"QUERY_STRING").unwrap_or_default();
        environ.set_item(intern!(py, "wsgi.query_string"), PyBytes::new(py, query))?;
        if let Some(original) = params.get(b"HTTP_X_ORIGINAL_URL") {
            environ.set_item(
                intern!(py, "wfastcgi.http_x_original_url"),
                PyBytes::new(py, original),
            )?;
        }
        let https = params
            .get(b"HTTPS")
            .is_some_and(|v| v.eq_ignore_ascii_case(b"on"));
        let scheme = if https {
            intern!(py, "https")
        } else {
            intern!(py, "http")
        };
        environ.set_item(intern!(py, "wsgi.url_scheme"), scheme)?;
        // PEP 3333 requires these; some front ends leave them out.
        for (key, default) in [
            (intern!(py, "REQUEST_METHOD"), "GET"),
            (intern!(py, "QUERY_STRING"), ""),
            (intern!(py, "SERVER_NAME"), "localhost"),
            (intern!(py, "SERVER_PORT"), "80"),
            (intern!(py, "SERVER_PROTOCOL"), "HTTP/1.0"),
        ] {
            if !environ.contains(key)? {
                environ.set_item(key, default)?;
            }
        }
        environ.set_item(intern!(py, "wsgi.input"), input)?;
        Ok(environ)
    }
}

/// The `str` objects of the last request's parameters, by position, per thread. A web server
/// sends the same names in the same order every time, and most values (server name, port,
/// software, app path, host, user agent...) repeat too: comparing bytes is cheaper than making
/// new strings (and interned names make the application's `environ[...]` lookups cheaper).
/// Bounded: at most `SLOTS` parameters, values up to `CACHED_VALUE` bytes.
struct LastParams {
    slots: Vec<Slot>,
}

/// Bytes are copied into the slot's own buffers (no reference into the request's records).
struct Slot {
    name: Vec<u8>,
    name_str: Py<PyString>,
    value: Vec<u8>,
    value_str: Option<Py<PyString>>,
}

const SLOTS: usize = 256;
const CACHED_VALUE: usize = 256;

impl LastParams {
    /// The name and value of parameter `index` as `str`, reusing last request's when equal.
    fn strings<'py>(
        &mut self,
        py: Python<'py>,
        index: usize,
        name: &[u8],
        value: &[u8],
    ) -> PyResult<(Bound<'py, PyString>, Bound<'py, PyString>)> {
        // Slots fill in order; anything beyond them is made fresh.
        if index >= SLOTS || index > self.slots.len() {
            return Ok((latin1(py, name)?, latin1(py, value)?));
        }
        if index >= self.slots.len() || self.slots[index].name != name {
            let name_str = match std::str::from_utf8(name).ok().filter(|t| t.is_ascii()) {
                Some(text) => PyString::intern(py, text),
                None => latin1(py, name)?,
            };
            let slot = Slot {
                name: name.to_vec(),
                name_str: name_str.unbind(),
                value: Vec::new(),
                value_str: None,
            };
            self.slots.truncate(index);
            self.slots.push(slot);
        }
        let slot = &mut self.slots[index];
        let value_str = match &slot.value_str {
            Some(cached) if slot.value == value => cached.bind(py).clone(),
            _ => {
                let fresh = latin1(py, value)?;
                if value.len() <= CACHED_VALUE {
                    slot.value.clear();
                    slot.value.extend_from_slice(value);
                    slot.value_str = Some(fresh.clone().unbind());
                }
                fresh
            }
        };
        Ok((slot.name_str.bind(py).clone(), value_str))
    }
}

thread_local! {
    static LAST_PARAMS: std::cell::RefCell<LastParams> =
        const { std::cell::RefCell::new(LastParams { slots: Vec::new() }) };
}

/// Bytes as a `str` of the same code points (PEP 3333's "native strings").
fn latin1<'py>(py: Python<'py>, bytes: &[u8]) -> PyResult<Bound<'py, PyString>> {
    // SAFETY: the pointer and length describe a live slice; CPython copies it and returns a new
    // reference or NULL with an exception set, which from_owned_ptr_or_err turns into an error.
    unsafe {
        let ptr = ffi::PyUnicode_DecodeLatin1(
            bytes.as_ptr() as *const c_char,
            bytes.len() as ffi::Py_ssize_t,
            std::ptr::null(),
        );
        Ok(Bound::from_owned_ptr_or_err(py, ptr)?.cast_into_unchecked())
    }
}

/// The whole traceback, as Python's `traceback` module prints it.
pub fn format_exception(py: Python<'_>, error: &PyErr) -> String {
    let formatted = py.import("traceback").and_then(|traceback| {
        let lines = traceback.call_method1(
            "format_exception",
            (error.get_type(py), error.value(py), error.traceback(py)),
        )?;
        PyString::new(py, "")
            .call_method1("join", (lines,))?
            .extract::<String>()
    });
    formatted.unwrap_or_else(|_| error.to_string())
}

/// Answers a job without Python: the application could not be loaded.
pub fn respond_unavailable(job: Job, message: &str, detail: ErrorDetail) {
    let mut encoder = ResponseEncoder::new(job.response.request_id());
    error_response(&mut encoder, message, detail);
    let _ = job.response.send_blocking(Output::End(encoder.finish(0)));
}
