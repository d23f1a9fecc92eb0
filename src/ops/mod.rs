//! Operations: what keeps a site healthy in production without a debugger.
//!
//! - The stuck-request watchdog (`WSGI_REQUEST_TIMEOUT`) and slow-request stacks
//!   (`WSGI_SLOW_REQUEST_LOG`), and every thread's Python stack on `SIGUSR1` (`watchdog.rs`).
//! - Recycling after `WSGI_MAX_REQUESTS` requests or above `WSGI_MAX_RSS` (`service.rs`, which
//!   also takes a process with a stuck thread out of service).
//!
//! Hooked in where a job is served (`python::handle`): [`begin`] when the application is about
//! to run, [`InFlight::end`] when its response is complete.

pub mod access;
pub mod metrics;
pub mod report;
mod service;
mod sink;
mod watchdog;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::config::AppConfig;
use crate::exchange::ResponseSink;
use crate::protocol::Params;
use crate::shutdown;

#[cfg(unix)]
pub use service::restart_environment;
pub use service::{io_finished, listener_for_finish, Cause};
pub use sink::GuardedSink;

/// The settings of this module, for `check` and the README.
pub const SETTINGS: &[&str] = &[
    "WSGI_REQUEST_TIMEOUT",
    "WSGI_SLOW_REQUEST_LOG",
    "WSGI_MAX_REQUESTS",
    "WSGI_MAX_REQUESTS_JITTER",
    "WSGI_MAX_RSS",
    "WSGI_ACCESS_LOG",
    "WSGI_ACCESS_LOG_FORMAT",
    "WSGI_HEALTH_PATH",
    "WSGI_METRICS",
];

/// The command-line twins of the settings (they outrank web.config, as every option does).
#[derive(clap::Args, Clone, Debug, Default)]
pub struct OpsArgs {
    /// Seconds a request may run before its stack is logged, it is answered 504 and the process
    /// is replaced (as WSGI_REQUEST_TIMEOUT).
    #[arg(long, value_name = "SECONDS")]
    pub request_timeout: Option<String>,
    /// Seconds after which a running request's Python stack is logged (as WSGI_SLOW_REQUEST_LOG).
    #[arg(long, value_name = "SECONDS")]
    pub slow_request_log: Option<String>,
    /// Replace the process after this many requests (as WSGI_MAX_REQUESTS).
    #[arg(long, value_name = "N")]
    pub max_requests: Option<String>,
    /// Add 0 to N requests, chosen at start, to WSGI_MAX_REQUESTS (as WSGI_MAX_REQUESTS_JITTER).
    #[arg(long, value_name = "N")]
    pub max_requests_jitter: Option<String>,
    /// Replace the process once its resident memory exceeds this many MiB (as WSGI_MAX_RSS).
    #[arg(long, value_name = "MIB")]
    pub max_rss: Option<String>,
    /// Write one line per request to this file, or to the main log with `log` (as
    /// WSGI_ACCESS_LOG).
    #[arg(long, value_name = "FILE")]
    pub access_log: Option<String>,
    /// The access log's line, Apache style (as WSGI_ACCESS_LOG_FORMAT); default: combined.
    #[arg(long, value_name = "FORMAT")]
    pub access_log_format: Option<String>,
    /// A path the gateway answers itself, 200 while serving and 503 while draining (as
    /// WSGI_HEALTH_PATH).
    #[arg(long, value_name = "/PATH")]
    pub health_path: Option<String>,
    /// Serve OpenMetrics on HOST:PORT or unix:/path (as WSGI_METRICS).
    #[arg(long, value_name = "ADDR")]
    pub metrics: Option<String>,
}

impl OpsArgs {
    fn pairs(&self) -> [(&'static str, &'static str, &Option<String>); 9] {
        [
            (
                "WSGI_REQUEST_TIMEOUT",
                "--request-timeout",
                &self.request_timeout,
            ),
            (
                "WSGI_SLOW_REQUEST_LOG",
                "--slow-request-log",
                &self.slow_request_log,
            ),
            ("WSGI_MAX_REQUESTS", "--max-requests", &self.max_requests),
            (
                "WSGI_MAX_REQUESTS_JITTER",
                "--max-requests-jitter",
                &self.max_requests_jitter,
            ),
            ("WSGI_MAX_RSS", "--max-rss", &self.max_rss),
            ("WSGI_ACCESS_LOG", "--access-log", &self.access_log),
            (
                "WSGI_ACCESS_LOG_FORMAT",
                "--access-log-format",
                &self.access_log_format,
            ),
            ("WSGI_HEALTH_PATH", "--health-path", &self.health_path),
            ("WSGI_METRICS", "--metrics", &self.metrics),
        ]
    }

    /// The settings given on the command line.
    pub fn overrides(&self) -> Vec<(String, String)> {
        self.pairs()
            .into_iter()
            .filter_map(|(key, _, value)| Some((key.to_owned(), value.clone()?)))
            .collect()
    }

    /// The same options for a worker process of `--processes`.
    pub fn args(&self) -> Vec<std::ffi::OsString> {
        self.pairs()
            .into_iter()
            .filter_map(|(_, flag, value)| Some([flag.into(), value.clone()?.into()]))
            .flatten()
            .collect()
    }
}

/// The operations settings in effect.
#[derive(Debug, Clone, Default)]
pub struct Settings {
    pub request_timeout: Option<Duration>,
    pub slow_request_log: Option<Duration>,
    pub max_requests: Option<u64>,
    pub max_requests_jitter: u64,
    /// Bytes.
    pub max_rss: Option<u64>,
    /// `WSGI_ACCESS_LOG`: a file, or `log`.
    pub access_log: Option<String>,
    pub access_log_format: access::Format,
    /// `WSGI_HEALTH_PATH`.
    pub health_path: Option<String>,
    /// `WSGI_METRICS`: `HOST:PORT` or `unix:/path`.
    pub metrics: Option<String>,
}

impl Default for access::Format {
    fn default() -> Self {
        access::Format::parse(access::COMBINED).unwrap_or_else(|_| unreachable!())
    }
}

impl Settings {
    pub fn from_config(config: &AppConfig) -> Result<Settings> {
        Ok(Settings {
            request_timeout: seconds(config, "WSGI_REQUEST_TIMEOUT")?,
            slow_request_log: seconds(config, "WSGI_SLOW_REQUEST_LOG")?,
            max_requests: count(config, "WSGI_MAX_REQUESTS")?,
            max_requests_jitter: count(config, "WSGI_MAX_REQUESTS_JITTER")?.unwrap_or(0),
            max_rss: count(config, "WSGI_MAX_RSS")?.map(|mib| mib.saturating_mul(1 << 20)),
            access_log: config
                .get("WSGI_ACCESS_LOG")
                .filter(|v| !v.trim().is_empty()),
            access_log_format: match config.get("WSGI_ACCESS_LOG_FORMAT") {
                Some(format) if !format.trim().is_empty() => access::Format::parse(&format)
                    .map_err(|e| {
                        anyhow::anyhow!(
                            "app setting WSGI_ACCESS_LOG_FORMAT={format:?} is invalid: {e}"
                        )
                    })?,
                _ => access::Format::default(),
            },
            health_path: match config.get("WSGI_HEALTH_PATH") {
                Some(path) if path.trim().starts_with('/') => Some(path.trim().to_owned()),
                Some(path) if !path.trim().is_empty() => bail!(
                    "app setting WSGI_HEALTH_PATH={path:?} is invalid: expected a path starting with /"
                ),
                _ => None,
            },
            metrics: match config.get("WSGI_METRICS") {
                Some(value) if !value.trim().is_empty() => Some(
                    metrics::parse_address(&value)
                        .with_context(|| format!("app setting WSGI_METRICS={value:?} is invalid"))?,
                ),
                _ => None,
            },
        })
    }

    /// Whether each request must be registered with the watchdog.
    fn watches_requests(&self) -> bool {
        self.request_timeout.is_some() || self.slow_request_log.is_some()
    }
}

/// A number of seconds above 0 (fractions allowed); absent, empty or 0 is off.
fn seconds(config: &AppConfig, key: &str) -> Result<Option<Duration>> {
    let Some(value) = config.get(key).filter(|v| !v.trim().is_empty()) else {
        return Ok(None);
    };
    match value.trim().parse::<f64>() {
        Ok(0.0) => Ok(None),
        Ok(seconds) if seconds > 0.0 && seconds.is_finite() && seconds < 1e9 => {
            Ok(Some(Duration::from_secs_f64(seconds)))
        }
        _ => bail!(
            "app setting {key}={value:?} is invalid: expected a number of seconds (0 turns it off)"
        ),
    }
}

/// A whole number; absent, empty or 0 is off.
fn count(config: &AppConfig, key: &str) -> Result<Option<u64>> {
    let Some(value) = config.get(key).filter(|v| !v.trim().is_empty()) else {
        return Ok(None);
    };
    match value.trim().parse::<u64>() {
        Ok(0) => Ok(None),
        Ok(n) => Ok(Some(n)),
        Err(_) => bail!(
            "app setting {key}={value:?} is invalid: expected a whole number (0 turns it off)"
        ),
    }
}

/// How the process serves, for taking it out of service.
#[derive(Debug, Clone, Copy)]
pub struct Mode {
    /// A worker under `--processes`: the supervisor starts its replacement.
    pub supervised: bool,
    /// Requests are served without an I/O thread (the IIS stream).
    pub direct: bool,
}

struct Ops {
    settings: Settings,
    trigger: shutdown::Trigger,
    shutdown: shutdown::Shutdown,
    mode: Mode,
    /// Requests the application is running, when the watchdog watches them.
    running: Mutex<Vec<Arc<Tracked>>>,
    served: AtomicU64,
    /// WSGI_MAX_REQUESTS plus this process's jitter.
    request_limit: Option<u64>,
    access: Option<access::Sink>,
    /// The access log shows durations: requests are timed even without metrics.
    times_requests: bool,
}

static OPS: OnceLock<Ops> = OnceLock::new();

/// Starts the watchdog thread (it also answers SIGUSR1) with the site's settings. Called once
/// the configuration is read; a setting that does not parse is logged and left off.
pub fn start(config: &AppConfig, trigger: shutdown::Trigger, mode: Mode) {
    let settings = Settings::from_config(config).unwrap_or_else(|e| {
        tracing::error!("{e:#}; the watchdog, recycling, access log and health path are off");
        Settings::default()
    });
    if mode.direct {
        io_finished(None);
    }
    let request_limit = settings
        .max_requests
        .map(|limit| limit + jitter(settings.max_requests_jitter));
    let access = settings.access_log.as_deref().and_then(|value| {
        let rotation = config
            .log_rotation()
            .unwrap_or(crate::config::LogRotation::Never);
        access::Sink::open(value, &config.app_dir, rotation)
            .map_err(|e| tracing::error!("{e:#}; the access log is off"))
            .ok()
    });
    start_metrics(&settings, mode);
    let times_requests = access.is_some() && settings.access_log_format.needs_duration();
    let ops = Ops {
        times_requests,
        access,
        settings,
        shutdown: trigger.subscribe(),
        trigger,
        mode,
        running: Mutex::new(Vec::new()),
        served: AtomicU64::new(0),
        request_limit,
    };
    if OPS.set(ops).is_ok() {
        if let Some(ops) = OPS.get() {
            watchdog::spawn(ops);
        }
        crate::logging::before_flush(flush_access_log);
    }
}

/// Metrics: served here with `--bind`, reported to the supervisor by its workers, off under IIS.
fn start_metrics(settings: &Settings, mode: Mode) {
    let Some(address) = &settings.metrics else {
        return;
    };
    if mode.direct {
        tracing::warn!(
            "WSGI_METRICS is ignored under IIS: IIS starts and stops the processes, which have no stable address to scrape"
        );
    } else if mode.supervised {
        metrics::enable();
    } else if let Err(e) = metrics::serve(address, || {
        metrics::render(&metrics::snapshot(), &metrics::restarts_in_place())
    }) {
        tracing::error!("{e:#}; metrics are off");
    }
}

/// Hands the access lines gathered so far to the writer thread.
fn flush_access_log() {
    if let Some(access) = OPS.get().and_then(|ops| ops.access.as_ref()) {
        access.flush();
    }
}

/// 0 to `max` requests, different for each process (so workers started together do not all
/// recycle together).
fn jitter(max: u64) -> u64 {
    if max == 0 {
        return 0;
    }
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    // A multiplicative hash spreads the pid and the clock over the range.
    let seed = (u64::from(std::process::id()) << 32 | u64::from(nanos))
        .wrapping_mul(0x9E37_79B9_7F4A_7C15);
    (seed >> 11) % (max + 1)
}

/// `WSGI_HEALTH_PATH`: the status the gateway answers a request for it with (200 while serving,
/// 503 once a shutdown or restart has started), or `None` for any other request.
pub fn health(params: &Params) -> Option<u16> {
    let ops = OPS.get()?;
    let wanted = ops.settings.health_path.as_deref()?;
    let uri = params
        .get(b"REQUEST_URI")
        .or_else(|| params.get(b"PATH_INFO"))?;
    let path = uri.split(|&b| b == b'?').next().unwrap_or_default();
    if path != wanted.as_bytes() {
        return None;
    }
    Some(if ops.shutdown.reason().is_some() {
        503
    } else {
        200
    })
}

/// A request the watchdog watches.
struct Tracked {
    /// `GET /path?query`, escaped.
    line: String,
    /// The Python thread identifier (`threading.get_ident()`) of the thread running it.
    thread: u64,
    started: Instant,
    sink: Arc<GuardedSink>,
    slow_logged: std::sync::atomic::AtomicBool,
    /// Answered by the watchdog; its thread is given up on.
    abandoned: std::sync::atomic::AtomicBool,
    /// Its ASGI task was cancelled past WSGI_REQUEST_TIMEOUT, and it is still answered.
    cancelled: std::sync::atomic::AtomicBool,
    /// Counted in the metrics and the access log, by whichever of its thread and the watchdog
    /// ended it first.
    accounted: std::sync::atomic::AtomicBool,
    /// Its parameters, for the access line the watchdog writes when it answers (kept only with
    /// an access log).
    params: Option<Params>,
    bytes_in: u64,
}

/// One request the application runs.
pub struct InFlight {
    sink: Arc<GuardedSink>,
    tracked: Option<Arc<Tracked>>,
    /// When it started, if anything shows its duration (metrics, the access log's `%D`...).
    started: Option<Instant>,
    /// CONTENT_LENGTH.
    bytes_in: u64,
}

/// The application is about to run a request (`bytes_in`: its CONTENT_LENGTH): its response
/// goes through the returned sink, which the watchdog can answer in its place.
pub fn begin(
    thread: impl FnOnce() -> u64,
    line: impl FnOnce() -> String,
    params: &Params,
    bytes_in: u64,
    sink: ResponseSink,
) -> InFlight {
    let sink = Arc::new(GuardedSink::new(sink));
    metrics::request_started();
    let ops = OPS.get();
    let tracked = ops
        .filter(|ops| ops.settings.watches_requests())
        .map(|ops| {
            let tracked = Arc::new(Tracked {
                line: line(),
                thread: thread(),
                started: Instant::now(),
                sink: sink.clone(),
                slow_logged: Default::default(),
                abandoned: Default::default(),
                cancelled: Default::default(),
                accounted: Default::default(),
                params: ops.access.as_ref().map(|_| params.clone()),
                bytes_in,
            });
            lock(&ops.running).push(tracked.clone());
            tracked
        });
    let timed = metrics::enabled() || ops.is_some_and(|ops| ops.times_requests);
    let started = match &tracked {
        Some(tracked) => Some(tracked.started),
        None => timed.then(Instant::now),
    };
    InFlight {
        sink,
        tracked,
        started,
        bytes_in,
    }
}

impl InFlight {
    pub fn sink(&self) -> Arc<GuardedSink> {
        self.sink.clone()
    }

    /// The response is complete (or cut short): `status` and `bytes` of body were sent.
    pub fn end(self, params: &Params, status: u16, bytes: u64) {
        let Some(ops) = OPS.get() else { return };
        if let Some(tracked) = &self.tracked {
            lock(&ops.running).retain(|t| !Arc::ptr_eq(t, tracked));
            if tracked.accounted.swap(true, Ordering::AcqRel) {
                // The watchdog answered it, and counted it.
                return;
            }
        }
        let duration = self.started.map(|started| started.elapsed());
        let served = account(ops, params, status, self.bytes_in, bytes, duration);
        if let (Some(limit), Some(max)) = (ops.request_limit, ops.settings.max_requests) {
            if served == limit {
                service::recycle(
                    ops,
                    service::Cause::MaxRequests,
                    format!(
                        "{served} requests served (WSGI_MAX_REQUESTS={max}, plus {} of jitter)",
                        limit - max
                    ),
                );
            }
        }
    }
}

/// Counts an ended request in the metrics and writes its access line; returns its number.
fn account(
    ops: &Ops,
    params: &Params,
    status: u16,
    bytes_in: u64,
    bytes_out: u64,
    duration: Option<Duration>,
) -> u64 {
    let served = ops.served.fetch_add(1, Ordering::Relaxed) + 1;
    if metrics::enabled() {
        metrics::request_ended(status, bytes_in, bytes_out, duration.unwrap_or_default());
    }
    if let Some(sink) = &ops.access {
        let entry = access::Entry {
            params,
            status,
            bytes: bytes_out,
            duration: duration.unwrap_or_default(),
            number: served,
        };
        sink.record(&ops.settings.access_log_format, &entry);
    }
    served
}

/// The watchdog answered a stuck request with `status` and `bytes` of body: counted now, since
/// its thread may never end it.
fn answered_by_watchdog(ops: &Ops, tracked: &Tracked, status: u16, bytes: u64) {
    if tracked.accounted.swap(true, Ordering::AcqRel) {
        return;
    }
    let duration = Some(tracked.started.elapsed());
    let empty = Params::default();
    let params = tracked.params.as_ref().unwrap_or(&empty);
    account(ops, params, status, tracked.bytes_in, bytes, duration);
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}
