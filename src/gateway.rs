//! The serving process: the tokio runtime (sockets) on its own threads, the application on
//! this thread and the worker threads, and the order things stop in.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};

use crate::config::{self, AppConfig, ErrorDetail};
use crate::exchange::Job;
use crate::protocol::{Advertised, ParamLimits};
use crate::python::{self, App, Deployment};
use crate::transport::connection::ServerContext;
use crate::transport::queue;
use crate::transport::server::Transport;
use crate::watcher::{self, WatchSettings};
use crate::{exchange, logging, ops, shutdown};

/// Connections served at once in the listening modes (more wait in the backlog), as
/// GET_VALUES reports it.
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
    /// A worker under `--processes`: the supervisor watches files and restarts it.
    pub supervised: bool,
    /// More settings given as options (`ops::OpsArgs`).
    pub settings: Vec<(String, String)>,
}

impl Options {
    /// Command-line options outrank web.config and the environment.
    pub fn overrides(&self) -> HashMap<String, String> {
        let mut overrides: HashMap<String, String> = self.settings.iter().cloned().collect();
        if let Some(venv) = &self.venv {
            // A path typed on the command line is relative to the working directory.
            let venv = std::path::absolute(venv).unwrap_or_else(|_| venv.clone());
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
    Ready(Arc<App>),
    Unavailable {
        message: String,
        detail: ErrorDetail,
    },
}

/// The application folder and what was read from it.
struct Site {
    app_dir: PathBuf,
    config: Result<AppConfig, String>,
    /// A problem the first request's response reports (a log file that cannot be opened).
    notice: Option<String>,
}

impl Site {
    /// At start-up: a configuration that cannot be read stops the process.
    fn eager(dir: PathBuf, options: &Options) -> Result<Site> {
        let config = AppConfig::load(&dir, options.overrides())?;
        let notice = open_log(&config);
        python::interpreter::start(&config)?;
        Ok(Site {
            app_dir: config.app_dir.clone(),
            config: Ok(config),
            notice,
        })
    }

    /// Under IIS: the folder is the first request's APPL_PHYSICAL_PATH. Every problem here is
    /// answered with a 500 that explains it, and the folder is still watched for the fix.
    fn lazy(job: &Job, options: &Options) -> Site {
        let app_dir = match (&options.app_dir, job.params.get(b"APPL_PHYSICAL_PATH")) {
            (Some(dir), _) => dir.clone(),
            (None, Some(path)) => PathBuf::from(String::from_utf8_lossy(path).into_owned()),
            (None, None) => std::env::current_dir().unwrap_or_else(|_| PathBuf::from(".")),
        };
        match AppConfig::load(&app_dir, options.overrides()) {
            Ok(config) => Site {
                app_dir: config.app_dir.clone(),
                notice: open_log(&config),
                config: Ok(config),
            },
            Err(e) => Site {
                app_dir,
                config: Err(format!("{e:#}")),
                notice: None,
            },
        }
    }

    /// `in_place`: a restart re-executes the binary (listening modes), rather than exiting.
    fn watch_settings(&self, in_place: bool) -> WatchSettings {
        let mut roots = vec![self.app_dir.clone()];
        let (pattern, poll_interval) = match &self.config {
            Ok(config) => {
                roots.extend(config.watcher_dirs());
                let poll = config.watcher_poll().unwrap_or_else(|e| {
                    tracing::error!("{e:#}; using change notifications");
                    None
                });
                (config.restart_regex(), poll)
            }
            Err(_) => (Some(config::DEFAULT_RESTART_REGEX.to_owned()), None),
        };
        #[cfg(unix)]
        let can_restart = in_place.then_some(crate::transport::server::can_reexec as fn() -> _);
        #[cfg(not(unix))]
        let can_restart = {
            let _ = in_place;
            None
        };
        WatchSettings {
            roots,
            pattern,
            poll_interval,
            can_restart,
        }
    }
}

pub fn serve(transport: Transport, options: Options) -> Result<()> {
    // Before the start environment is kept and Python copies it.
    ops::metrics::restore_restarts();
    // Before web.config settings go into it (Python's os.environ): an in-place restart starts
    // from this, so it sees web.config as it is then, as a fresh process would.
    #[cfg(unix)]
    crate::transport::server::keep_start_environment();
    let iis_stream = transport.is_stream();
    // Under IIS the app folder is the first request's APPL_PHYSICAL_PATH, so Python starts
    // then; otherwise it starts now, so a broken set-up fails before the first request.
    let eager_site = match (&options.app_dir, iis_stream) {
        (Some(dir), _) => Some(Site::eager(dir.clone(), &options)?),
        (None, false) => Some(Site::eager(
            std::env::current_dir().context("no working directory")?,
            &options,
        )?),
        (None, true) => None,
    };

    let (trigger, _) = shutdown::channel();
    let transport = match transport {
        #[cfg(unix)]
        Transport::Stream(socket) => return serve_direct(socket, eager_site, &options, trigger),
        other => other,
    };
    let config = match eager_site.as_ref().map(|s| &s.config) {
        Some(Ok(config)) => Some(config),
        _ => None,
    };
    // Listening, the application is loaded before a connection is taken: an ASGI one runs its
    // requests on its event loop, so the I/O thread serves every connection and hands their
    // requests to the loop itself (python/asgi.rs), with no worker thread.
    let threads = config.map_or(1, |config| self::threads(config, iis_stream));
    let preloaded = match (eager_site.as_ref(), iis_stream) {
        (Some(site), false) => Some(load(site.config.clone(), deployment(threads, &options))),
        _ => None,
    };
    let asgi = match &preloaded {
        Some(AppState::Ready(app)) if app.is_asgi() => Some(app.clone()),
        _ => None,
    };
    let queue_length = match config {
        Some(config) => config.queue_length()?,
        None => config::DEFAULT_QUEUE_LENGTH,
    };
    let allowed_peers = config.map_or(Ok(None), AppConfig::web_server_addrs)?;
    // Under IIS, IIS owns connection lifetimes: no time-outs.
    let listening = config.filter(|_| !iis_stream);
    let idle_timeout = listening.map_or(Ok(None), AppConfig::idle_timeout)?;
    let send_timeout = listening.map_or(Ok(None), AppConfig::send_timeout)?;
    let header_timeout = listening.map_or(Ok(None), AppConfig::header_timeout)?;
    let (jobs, job_receiver) = queue::bounded(queue_length);
    let jobs = match &asgi {
        Some(app) => {
            // Closed, so start_site finds no job for the notice rather than waiting for one.
            drop(jobs);
            let notice = eager_site.as_ref().and_then(|site| site.notice.clone());
            to_event_loop(app.clone(), notice)
        }
        None => jobs,
    };
    let waiting = job_receiver.clone();
    ops::metrics::set_queue_length(move || waiting.len());
    let (max_conns, max_reqs) = if iis_stream {
        (1, 1)
    } else {
        (MAX_CONNECTIONS, MAX_CONNECTIONS)
    };
    let advertised = Advertised {
        max_conns,
        max_reqs,
    };
    // On Linux idle workers accept connections themselves (acceptor.rs), WSGI only.
    #[cfg(target_os = "linux")]
    let (transport, jobs, acceptor) = match asgi {
        Some(_) => (transport, jobs, None),
        None => crate::transport::server::share(
            transport,
            jobs,
            allowed_peers.clone(),
            advertised,
            !options.supervised,
            send_timeout,
        )
        .context("cannot share the listening socket with the workers")?,
    };
    let context = Arc::new(ServerContext {
        jobs,
        param_limits: ParamLimits::default(),
        advertised,
        allowed_peers,
        idle_timeout,
        send_timeout,
        header_timeout,
    });
    // One I/O thread: the protocol work is light next to Python's, and fewer threads mean
    // fewer cross-thread wake-ups (measured, hello on a unix socket, pinned: 43-47k against
    // 41-42k req/s with two on kept connections, 24-26k against 22-23k with one per request).
    #[cfg(target_os = "linux")]
    let defer_to_loop = asgi.is_some();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .on_thread_start(move || {
            #[cfg(target_os = "linux")]
            if defer_to_loop {
                defer_to_the_event_loop();
            }
        })
        .build()
        .context("cannot start the I/O runtime")?;
    let server_trigger = trigger.clone();
    let server = std::thread::Builder::new()
        .name("wfastcgi-io".into())
        .spawn(move || {
            #[cfg(target_os = "linux")]
            if defer_to_loop {
                defer_to_the_event_loop();
            }
            let listener = runtime.block_on(crate::transport::server::run(
                transport,
                context,
                server_trigger,
            ));
            ops::io_finished(listener);
            // Kept until the event loop has stopped: it runs the pumps of ASGI requests whose
            // connection is already gone.
            runtime
        })
        .context("cannot start the I/O thread")?;

    let mut next = || job_receiver.recv().ok();
    let (site, first_job) = match eager_site {
        Some(site) => (Some(site), None),
        // The web server may leave before sending a request.
        None => next()
            .map(|job| (Some(Site::lazy(&job, &options)), Some(job)))
            .unwrap_or_default(),
    };
    if let Some(site) = site {
        let threads = site
            .config
            .as_ref()
            .map_or(1, |config| self::threads(config, iis_stream));
        let (state, first_job) = start_site(
            site,
            first_job,
            &mut next,
            &options,
            &trigger,
            threads,
            if iis_stream {
                Serving::Stream
            } else {
                Serving::Listening
            },
            preloaded,
        );
        let feed = Feed {
            jobs: &job_receiver,
            #[cfg(target_os = "linux")]
            acceptor: acceptor.as_deref(),
            #[cfg(target_os = "linux")]
            shutdown: trigger.subscribe(),
        };
        if asgi.is_none() {
            run_workers(&state, threads, first_job, &feed);
        }
    }
    let _io_runtime = server
        .join()
        .map_err(|_| tracing::error!("the I/O thread panicked"));
    finish()
}

/// With an ASGI application, the I/O threads do not preempt the event loop's thread when a
/// request arrives or a response is handed to them (SCHED_BATCH): they run when it waits, or
/// yields after a complete response (at most every millisecond, python/asgi.rs). A CPU shared
/// by both then switches threads a few times per hundred requests rather than three times a
/// request (FastAPI hello at 10 clients, both threads on one CPU: 8.6k against 13.6k req/s).
/// An idle CPU still takes a woken I/O thread at once.
#[cfg(target_os = "linux")]
fn defer_to_the_event_loop() {
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: sets the calling thread's own policy; `param` outlives the call.
    if unsafe { libc::sched_setscheduler(0, libc::SCHED_BATCH, &param) } != 0 {
        let error = std::io::Error::last_os_error();
        tracing::debug!("an I/O thread stays SCHED_OTHER: {error}");
    }
}

/// Listening, the event loop is an ASGI application's queue: its connection tasks hand it their
/// requests themselves, one thread hop fewer than through a worker. `notice` (a log problem)
/// answers the first request instead.
fn to_event_loop(app: Arc<App>, notice: Option<String>) -> queue::JobQueue {
    let notice = std::sync::Mutex::new(notice);
    queue::direct(Arc::new(move |job| match crate::lock(&notice).take() {
        Some(notice) => exchange::respond_notice(job, &notice),
        None => app.hand_to_loop(job),
    }))
}

/// Under IIS (fd 0 a connected stream): requests are read and answered by the application's
/// own thread (`direct.rs`); a small runtime thread only watches signals and the grace period.
#[cfg(unix)]
fn serve_direct(
    socket: socket2::Socket,
    eager_site: Option<Site>,
    options: &Options,
    trigger: shutdown::Trigger,
) -> Result<()> {
    crate::transport::server::spawn_guard(trigger.clone())?;
    let mut driver = crate::transport::direct::Driver::new(socket, trigger.subscribe())
        .context("cannot use fd 0")?;
    let mut next = || driver.next_job();
    let (site, first_job) = match eager_site {
        Some(site) => (Some(site), None),
        None => next()
            .map(|job| (Some(Site::lazy(&job, options)), Some(job)))
            .unwrap_or_default(),
    };
    if let Some(site) = site {
        let (state, first_job) = start_site(
            site,
            first_job,
            &mut next,
            options,
            &trigger,
            1,
            Serving::Direct,
            None,
        );
        work(&state, first_job, &mut next);
    }
    trigger.fire(shutdown::Reason::EndOfStream);
    finish()
}

/// Watches the site, sets the grace period, reports a log problem to the first request, and
/// loads the application (unless `preloaded`). Returns it with the first job still to serve.
#[allow(clippy::too_many_arguments)]
fn start_site(
    site: Site,
    mut first_job: Option<Job>,
    next: &mut dyn FnMut() -> Option<Job>,
    options: &Options,
    trigger: &shutdown::Trigger,
    threads: usize,
    serving: Serving,
    preloaded: Option<AppState>,
) -> (AppState, Option<Job>) {
    if !options.supervised {
        watcher::spawn(
            site.watch_settings(serving == Serving::Listening),
            trigger.clone(),
        );
    }
    if let Ok(config) = &site.config {
        let mode = ops::Mode {
            supervised: options.supervised,
            direct: serving == Serving::Direct,
        };
        ops::start(config, trigger.clone(), mode);
        shutdown::set_grace(config.restart_grace().unwrap_or_else(|e| {
            tracing::error!("{e:#}; using 30 s");
            DEFAULT_GRACE
        }));
    }
    if let Some(notice) = &site.notice {
        if let Some(job) = first_job.take().or_else(&mut *next) {
            exchange::respond_notice(job, notice);
        }
    }
    let state = preloaded.unwrap_or_else(|| load(site.config, deployment(threads, options)));
    #[cfg(unix)]
    crate::supervisor::report_ready();
    (state, first_job)
}

/// Finalises Python, then exits, or (a restart in a listening mode) re-executes in place.
/// When a request's thread is stuck, the watchdog ends the process instead.
fn finish() -> Result<()> {
    let Some(listener) = ops::listener_for_finish() else {
        loop {
            std::thread::park();
        }
    };
    shutdown::serving_done();
    // One grace for the whole drain: finalising Python gets what the event loop left of it.
    let grace = shutdown::grace();
    let deadline = std::time::Instant::now() + grace;
    python::stop_asgi(grace);
    // Rounded up to whole milliseconds for its log lines: an unused 1 s grace reads "1s".
    let left = deadline.saturating_duration_since(std::time::Instant::now());
    let left = u64::try_from(left.as_micros().div_ceil(1000)).unwrap_or(u64::MAX);
    python::interpreter::finalize(std::time::Duration::from_millis(left));
    match listener {
        #[cfg(unix)]
        Some(listener) => {
            tracing::info!("restarting: the listening socket stays open across the restart");
            logging::flush();
            let error = crate::transport::server::reexec(listener);
            Err(anyhow::anyhow!("cannot restart: {error}"))
        }
        _ => {
            tracing::info!("exiting");
            logging::flush();
            Ok(())
        }
    }
}

/// `serve --processes N`: the supervisor, which holds the socket and never starts Python.
#[cfg(unix)]
pub fn supervise(
    transport: Transport,
    options: Options,
    processes: usize,
    worker_args: Vec<std::ffi::OsString>,
) -> Result<()> {
    let Transport::Listener(listener) = transport else {
        anyhow::bail!("--processes needs a listening socket: use --bind");
    };
    let dir = match options.app_dir.clone() {
        Some(dir) => dir,
        None => std::env::current_dir().context("no working directory")?,
    };
    let config = AppConfig::load(&dir, options.overrides())?;
    open_log(&config);
    crate::supervisor::run(listener, worker_args, processes, &config)?;
    tracing::info!("exiting");
    logging::flush();
    Ok(())
}

fn threads(config: &AppConfig, iis_stream: bool) -> usize {
    match config.get("WSGI_THREADS") {
        None => {
            if iis_stream {
                1
            } else {
                4
            }
        }
        Some(value) => config::parse_count("WSGI_THREADS", &value).unwrap_or_else(|e| {
            tracing::error!("{e:#}; using 1 thread");
            1
        }),
    }
}

fn deployment(threads: usize, options: &Options) -> Deployment {
    Deployment {
        multithread: threads > 1,
        multiprocess: options.multiprocess,
    }
}

/// Opens the log file the configuration names; returns the problem when it cannot.
fn open_log(config: &AppConfig) -> Option<String> {
    let level = config.log_level().unwrap_or_else(|e| {
        tracing::warn!("{e}; logging at INFO");
        tracing::Level::INFO
    });
    let mut notice = None;
    if let Some(path) = config.log_path() {
        let rotation = config.log_rotation().unwrap_or_else(|e| {
            tracing::warn!("{e}; not rotating");
            config::LogRotation::Never
        });
        if let Err(e) = logging::open_file(&path, level, rotation) {
            tracing::error!("{e:#}");
            notice = Some(format!("{e:#}; logging is off until the next start"));
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
    notice
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
    if let Err(e) = python::interpreter::start(&config) {
        return unavailable(format!("{e:#}"), detail);
    }
    match python::load(&config, deployment) {
        Ok(app) => AppState::Ready(Arc::new(app)),
        Err(message) => unavailable(message, detail),
    }
}

/// How requests reach the workers, which decides how the process is replaced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Serving {
    /// The IIS stream read by the application's thread (`serve_direct`): exits to be replaced.
    Direct,
    /// The IIS stream through the I/O thread (the Windows named pipe): exits to be replaced.
    Stream,
    /// A listening socket: restarts in place, keeping it.
    Listening,
}

/// Where the workers of the listening modes get their requests.
struct Feed<'a> {
    /// Requests the I/O thread read.
    jobs: &'a crossbeam_channel::Receiver<Job>,
    /// On Linux, connections the workers accept themselves.
    #[cfg(target_os = "linux")]
    acceptor: Option<&'a crate::transport::acceptor::Acceptor>,
    #[cfg(target_os = "linux")]
    shutdown: shutdown::Shutdown,
}

impl Feed<'_> {
    /// Serves requests until the job queue closes.
    fn work(&self, state: &AppState, first_job: Option<Job>) {
        #[cfg(target_os = "linux")]
        if let Some(acceptor) = self.acceptor {
            match crate::transport::acceptor::WorkerSource::new(
                acceptor,
                self.jobs,
                self.shutdown.clone(),
            ) {
                Ok(mut source) => return work(state, first_job, &mut || source.next_job()),
                Err(e) => tracing::error!(
                    "cannot wait for connections ({e}): this worker serves the queue only"
                ),
            }
        }
        work(state, first_job, &mut || self.jobs.recv().ok());
    }
}

/// Runs `threads` workers (this thread is one of them) until the job queue closes.
fn run_workers(state: &AppState, threads: usize, first_job: Option<Job>, feed: &Feed) {
    std::thread::scope(|scope| {
        for n in 1..threads {
            let spawned = std::thread::Builder::new()
                .name(format!("wfastcgi-worker-{n}"))
                .spawn_scoped(scope, move || feed.work(state, None));
            if let Err(e) = spawned {
                tracing::error!("cannot start worker thread {n}: {e}");
            }
        }
        feed.work(state, first_job);
    });
}

/// Serves jobs from `next` until it has no more.
fn work(state: &AppState, first: Option<Job>, next: &mut (dyn FnMut() -> Option<Job> + Send)) {
    match state {
        AppState::Ready(app) => python::serve_jobs(app, first, next),
        AppState::Unavailable { message, detail } => {
            for job in first.into_iter().chain(std::iter::from_fn(next)) {
                python::respond_unavailable(job, message, *detail);
            }
        }
    }
}
