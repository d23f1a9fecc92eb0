//! The serving process: the tokio runtime (sockets) on its own threads, the application on
//! this thread and the worker threads, and the order things stop in.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};

use crate::config::{self, AppConfig, ErrorDetail};
use crate::connection::ServerContext;
use crate::exchange::Job;
use crate::protocol::ParamLimits;
use crate::python::{self, App, Deployment};
use crate::server::Transport;
use crate::{logging, shutdown, worker};

/// Requests waiting for a worker beyond those being served; more get a 503.
const QUEUE_CAPACITY: usize = 64;
/// Connections served at once in the listening modes, as GET_VALUES reports it.
const MAX_CONNECTIONS: usize = 1024;
/// How long a shutdown waits for the requests in flight before it stops waiting.
const DEFAULT_GRACE: Duration = Duration::from_secs(30);

/// What the command line says about the application.
#[derive(Debug, Clone, Default)]
pub struct Options {
    pub app_dir: Option<PathBuf>,
    pub venv: Option<PathBuf>,
    pub threads: Option<usize>,
    /// Whether other processes serve the same application (IIS's maxInstances, spawn-fcgi -F).
    pub multiprocess: bool,
}

impl Options {
    /// Command-line options outrank web.config and the environment.
    fn overrides(&self) -> HashMap<String, String> {
        let mut overrides = HashMap::new();
        if let Some(venv) = &self.venv {
            overrides.insert("WSGI_VENV".to_owned(), venv.to_string_lossy().into_owned());
        }
        if let Some(threads) = self.threads {
            overrides.insert("WSGI_THREADS".to_owned(), threads.to_string());
        }
        overrides
    }
}

/// The application, or why every request gets a 500.
enum AppState {
    Ready(App),
    Unavailable {
        message: String,
        detail: ErrorDetail,
    },
}

pub fn serve(transport: Transport, options: Options) -> Result<()> {
    let iis_stream = transport.is_stream();
    // Under IIS the app folder is the first request's APPL_PHYSICAL_PATH, so Python starts
    // then; otherwise it starts now, so a broken set-up fails before the first request.
    let eager_dir = match (&options.app_dir, iis_stream) {
        (Some(dir), _) => Some(dir.clone()),
        (None, false) => Some(std::env::current_dir().context("no working directory")?),
        (None, true) => None,
    };
    let deployment_threads = |config: &AppConfig| -> Result<usize> {
        match config.get("WSGI_THREADS") {
            Some(value) => config::parse_count("WSGI_THREADS", &value),
            None => Ok(if iis_stream { 1 } else { 4 }),
        }
    };
    let eager_config = match &eager_dir {
        Some(dir) => {
            let config = AppConfig::load(dir, options.overrides())?;
            open_log(&config);
            python::interpreter::start(config.venv().as_deref())?;
            Some(config)
        }
        None => None,
    };

    let (jobs, job_receiver) = worker::queue(QUEUE_CAPACITY);
    let (max_conns, max_reqs) = if iis_stream {
        (1, 1)
    } else {
        (MAX_CONNECTIONS, MAX_CONNECTIONS)
    };
    let context = Arc::new(ServerContext {
        jobs,
        param_limits: ParamLimits::default(),
        max_conns,
        max_reqs,
    });
    let (trigger, _) = shutdown::channel();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(if iis_stream { 1 } else { 2 })
        .enable_all()
        .build()
        .context("cannot start the I/O runtime")?;
    let server = std::thread::Builder::new()
        .name("wfastcgi-io".into())
        .spawn(move || {
            runtime.block_on(crate::server::run(
                transport,
                context,
                trigger,
                DEFAULT_GRACE,
            ))
        })
        .context("cannot start the I/O thread")?;

    let (config, first_job) = match eager_config {
        Some(config) => (Some(Ok(config)), None),
        None => match job_receiver.recv() {
            Ok(job) => (Some(lazy_config(&job, &options)), Some(job)),
            Err(_) => (None, None), // the web server left before sending a request
        },
    };
    if let Some(config) = config {
        let threads = match config.as_ref().map(deployment_threads) {
            Ok(Ok(threads)) => threads,
            Ok(Err(e)) => {
                tracing::error!("{e:#}; using 1 thread");
                1
            }
            Err(_) => 1,
        };
        let state = load(
            config,
            Deployment {
                multithread: threads > 1,
                multiprocess: options.multiprocess,
            },
        );
        run_workers(&state, threads, first_job, &job_receiver);
    }
    if server.join().is_err() {
        tracing::error!("the I/O thread panicked");
    }
    python::interpreter::finalize(DEFAULT_GRACE);
    tracing::info!("exiting");
    logging::flush();
    Ok(())
}

/// Under IIS: the app folder is the first request's APPL_PHYSICAL_PATH.
fn lazy_config(job: &Job, options: &Options) -> Result<AppConfig, String> {
    let dir = match &options.app_dir {
        Some(dir) => dir.clone(),
        None => match job.params.get(b"APPL_PHYSICAL_PATH") {
            Some(path) => PathBuf::from(String::from_utf8_lossy(path).into_owned()),
            None => std::env::current_dir().map_err(|e| format!("no working directory: {e}"))?,
        },
    };
    let config = AppConfig::load(&dir, options.overrides()).map_err(|e| format!("{e:#}"))?;
    open_log(&config);
    Ok(config)
}

fn open_log(config: &AppConfig) {
    let level = config.log_level().unwrap_or_else(|e| {
        tracing::warn!("{e}; logging at INFO");
        tracing::Level::INFO
    });
    if let Some(path) = config.log_path() {
        let rotation = config.log_rotation().unwrap_or(config::LogRotation::Never);
        if let Err(e) = logging::open_file(&path, level, rotation) {
            tracing::error!("{e:#}");
        }
    }
    tracing::info!(
        "wfastcgi {} serving {}{}",
        env!("CARGO_PKG_VERSION"),
        config.app_dir.display(),
        config
            .web_config
            .as_ref()
            .map(|p| format!(" with {}", p.display()))
            .unwrap_or_default()
    );
}

fn load(config: Result<AppConfig, String>, deployment: Deployment) -> AppState {
    let unavailable = |message: String, detail| {
        tracing::error!("the application cannot be loaded; every request gets a 500:\n{message}");
        AppState::Unavailable { message, detail }
    };
    let config = match config {
        Ok(config) => config,
        Err(message) => return unavailable(message, ErrorDetail::Full),
    };
    let detail = config.error_detail().unwrap_or(ErrorDetail::Full);
    if let Err(e) = python::interpreter::start(config.venv().as_deref()) {
        return unavailable(format!("{e:#}"), detail);
    }
    match python::load(&config, deployment) {
        Ok(app) => AppState::Ready(app),
        Err(message) => unavailable(message, detail),
    }
}

/// Runs `threads` workers (this thread is one of them) until the job queue closes.
fn run_workers(
    state: &AppState,
    threads: usize,
    first_job: Option<Job>,
    jobs: &crossbeam_channel::Receiver<Job>,
) {
    std::thread::scope(|scope| {
        for n in 1..threads {
            let spawned = std::thread::Builder::new()
                .name(format!("wfastcgi-worker-{n}"))
                .spawn_scoped(scope, move || work(state, None, jobs));
            if let Err(e) = spawned {
                tracing::error!("cannot start worker thread {n}: {e}");
            }
        }
        work(state, first_job, jobs);
    });
}

fn work(state: &AppState, first: Option<Job>, jobs: &crossbeam_channel::Receiver<Job>) {
    match state {
        AppState::Ready(app) => python::serve_jobs(app, first, jobs),
        AppState::Unavailable { message, detail } => {
            for job in first.into_iter().chain(jobs.iter()) {
                python::respond_unavailable(job, message, *detail);
            }
        }
    }
}
