//! Diagnostics go to the `WSGI_LOG` file, never to stdout/stderr while serving: IIS hands the
//! process invalid standard handles.
//!
//! The subscriber is installed at start-up with a reloadable sink, because under IIS the log
//! file is only known once the first request names the app folder and its web.config is read.

use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};

use anyhow::{Context, Result};
use tracing_appender::non_blocking::WorkerGuard;
use tracing_appender::rolling::{RollingFileAppender, Rotation};
use tracing_subscriber::filter::LevelFilter;
use tracing_subscriber::layer::{Identity, Layered, SubscriberExt};
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{fmt, reload, Layer, Registry};

use crate::config::LogRotation;

/// The level is a global filter of its own: tracing-subscriber cannot reload per-layer filters.
type Filtered = Layered<reload::Layer<LevelFilter, Registry>, Registry>;
type Sink = Box<dyn Layer<Filtered> + Send + Sync>;

struct State {
    level: reload::Handle<LevelFilter, Registry>,
    sink: reload::Handle<Sink, Filtered>,
    /// Flushes the background writer when dropped; kept until [`flush`].
    guard: Option<WorkerGuard>,
    /// The log file, written to directly after [`flush`].
    file: Option<(PathBuf, LogRotation)>,
    /// Other background writers (the access log), flushed the same way.
    others: Vec<WorkerGuard>,
}

static STATE: OnceLock<Mutex<State>> = OnceLock::new();

/// Installs the global subscriber. `to_stderr` is for runs started by hand (`serve --bind`);
/// otherwise nothing is written until [`open_file`] names a log file.
pub fn init(to_stderr: bool, level: tracing::Level) {
    let (sink, level) = if to_stderr {
        (
            line_format(std::io::stderr).boxed(),
            LevelFilter::from_level(level),
        )
    } else {
        (Identity::new().boxed(), LevelFilter::OFF)
    };
    let (level_layer, level) = reload::Layer::new(level);
    let (sink_layer, sink) = reload::Layer::new(sink);
    let installed = tracing_subscriber::registry()
        .with(level_layer)
        .with(sink_layer)
        .try_init();
    if installed.is_ok() {
        let _ = STATE.set(Mutex::new(State {
            level,
            sink,
            guard: None,
            file: None,
            others: Vec::new(),
        }));
    }
}

/// One line per event: time, level, message. No colours: it is a file.
fn line_format<W>(writer: W) -> impl Layer<Filtered> + Send + Sync
where
    W: for<'w> fmt::MakeWriter<'w> + Send + Sync + 'static,
{
    fmt::layer()
        .with_writer(writer)
        .with_ansi(false)
        .with_target(false)
}

/// Sends all further diagnostics to `path` through a background writer thread, so a slow disk
/// never holds a request (or the GIL).
pub fn open_file(path: &Path, level: tracing::Level, rotation: LogRotation) -> Result<()> {
    let appender = appender(path, rotation)
        .with_context(|| format!("WSGI_LOG {} cannot be opened", path.display()))?;
    let (writer, guard) = tracing_appender::non_blocking(appender);
    let state = STATE.get().context("logging is not initialised")?;
    let mut state = crate::lock(state);
    state
        .sink
        .reload(line_format(writer).boxed())
        .context("cannot switch the log sink")?;
    state
        .level
        .reload(LevelFilter::from_level(level))
        .context("cannot set the log level")?;
    state.guard = Some(guard);
    state.file = Some((path.to_owned(), rotation));
    Ok(())
}

/// A file appender for `path`, rotated as `rotation` says.
pub fn appender(path: &Path, rotation: LogRotation) -> Result<RollingFileAppender> {
    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    };
    let file_name = path
        .file_name()
        .with_context(|| format!("{} names no file", path.display()))?;
    let rotation = match rotation {
        LogRotation::Never => Rotation::NEVER,
        LogRotation::Hourly => Rotation::HOURLY,
        LogRotation::Daily => Rotation::DAILY,
    };
    Ok(RollingFileAppender::builder()
        .rotation(rotation)
        .filename_prefix(file_name.to_string_lossy())
        .build(dir)?)
}

/// Keeps another background writer's guard, to be flushed by [`flush`].
pub fn flush_at_exit(guard: WorkerGuard) {
    if let Some(state) = STATE.get() {
        crate::lock(state).others.push(guard);
    }
}

/// A reason the process cannot start at all, before any log file is known: standard error (a
/// person at a console) and, on Windows, the Application event log (IIS gives no console).
pub fn report_startup_failure(message: &str) {
    eprintln!("{message}");
    #[cfg(windows)]
    crate::windows::report_error(message);
}

/// Runs `hook` first each time [`flush`] runs (the access log's batch).
pub fn before_flush(hook: fn()) {
    let _ = BEFORE_FLUSH.set(hook);
}

static BEFORE_FLUSH: OnceLock<fn()> = OnceLock::new();

/// Writes out what the background writer still holds; call before the process exits or
/// re-executes. Lines logged after it (why an exec failed, say) are written to the file
/// directly.
pub fn flush() {
    if let Some(hook) = BEFORE_FLUSH.get() {
        hook();
    }
    if let Some(state) = STATE.get() {
        let mut state = crate::lock(state);
        state.guard.take();
        state.others.clear();
        let direct = state
            .file
            .as_ref()
            .map(|(path, rotation)| appender(path, *rotation));
        if let Some(Ok(file)) = direct {
            // Without a file, later lines are lost, as before the log was opened.
            let _ = state.sink.reload(line_format(file).boxed());
        }
    }
}
