//! `serve --processes N`: one supervisor process holds the listening socket and runs N worker
//! processes of this same binary that accept on it.
//!
//! - A worker gets the socket as fd 3 and a pipe as fd 4, on which it writes one byte once its
//!   application is loaded (its readiness).
//! - A worker that dies is replaced, with a back-off that grows while workers keep dying young.
//! - A watched file change or SIGHUP replaces the workers one at a time, each new one ready
//!   before the old one is told to drain, so capacity never drops to zero. A worker that wants
//!   to be recycled (WSGI_MAX_REQUESTS, WSGI_MAX_RSS, a stuck request) writes `r` and a cause
//!   byte on its readiness pipe and is replaced the same way.
//! - With WSGI_METRICS, workers write `m` and a metrics snapshot on that pipe every second; the
//!   supervisor serves their sum.
//! - SIGTERM or SIGINT drains every worker and exits; SIGUSR1 is passed on to every worker.
//!
//! The supervisor never starts Python.

use std::collections::{BTreeMap, HashMap};
use std::ffi::OsString;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use socket2::Socket;
use tokio::io::AsyncReadExt;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::mpsc;

use crate::config::AppConfig;
use crate::lock;
use crate::ops::metrics;
use crate::shutdown::{self, Reason};
use crate::watcher::{self, WatchSettings};

/// The descriptors a worker finds its socket and readiness pipe on.
pub const LISTEN_FD: RawFd = 3;
pub const READY_FD: RawFd = 4;
/// Environment variables that tell a process it is a supervised worker.
pub const LISTEN_FD_VAR: &str = "WFASTCGI_LISTEN_FD";
pub const READY_FD_VAR: &str = "WFASTCGI_READY_FD";

/// How long a worker may take to load its application before it is counted as failed.
const READY_LIMIT: Duration = Duration::from_secs(120);
/// A worker that lived this long did not die young: the back-off starts over.
const HEALTHY_UPTIME: Duration = Duration::from_secs(10);
const MAX_BACKOFF: Duration = Duration::from_secs(30);

struct Worker {
    pid: u32,
    started: Instant,
}

struct Exit {
    pid: u32,
    status: String,
}

pub struct Supervisor {
    listener: Socket,
    /// The worker command line: this binary's `serve` arguments without `--processes`.
    worker_args: Vec<OsString>,
    slots: Vec<Option<Worker>>,
    /// Empty slots and when to start their next worker.
    pending: Vec<(usize, Instant)>,
    /// Consecutive early deaths, for the back-off.
    failures: u32,
    exits: mpsc::UnboundedSender<Exit>,
    /// Workers (by pid) that asked to be replaced, and why.
    recycles: mpsc::UnboundedSender<(u32, u8)>,
    /// What the metrics endpoint adds up.
    totals: Arc<Mutex<Totals>>,
}

/// The workers' metrics, and the supervisor's own counts.
#[derive(Default)]
struct Totals {
    /// The last snapshot of each running worker.
    live: HashMap<u32, metrics::Snapshot>,
    /// The counters of workers that have exited.
    retired: metrics::Snapshot,
    restarts: BTreeMap<&'static str, u64>,
    respawns: u64,
}

impl Totals {
    fn render(&self) -> String {
        let mut sum = self.retired;
        for snapshot in self.live.values() {
            sum.add(snapshot);
        }
        let counts = metrics::Replacements {
            restarts: metrics::RESTART_CAUSES
                .into_iter()
                .map(|cause| (cause, self.restarts.get(cause).copied().unwrap_or(0)))
                .collect(),
            respawns: Some(self.respawns),
        };
        metrics::render(&sum, &counts)
    }

    fn restarted(&mut self, cause: &'static str) {
        *self.restarts.entry(cause).or_default() += 1;
    }
}

pub fn run(
    listener: Socket,
    worker_args: Vec<OsString>,
    processes: usize,
    config: &AppConfig,
) -> Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the supervisor's runtime")?;
    let (exits, exit_events) = mpsc::unbounded_channel();
    let (recycles, recycle_requests) = mpsc::unbounded_channel::<(u32, u8)>();
    let mut supervisor = Supervisor {
        listener,
        worker_args,
        slots: (0..processes).map(|_| None).collect(),
        pending: Vec::new(),
        failures: 0,
        exits,
        recycles,
        totals: Arc::default(),
    };
    // An invalid setting is the workers' to report (they log it and turn it off).
    let settings = crate::ops::Settings::from_config(config).ok();
    if let Some(address) = settings.and_then(|settings| settings.metrics) {
        let totals = supervisor.totals.clone();
        metrics::serve(&address, move || lock(&totals).render())?;
    }
    let grace = config.restart_grace()?;
    let watch = watch_settings(config);
    runtime.block_on(supervisor.supervise(exit_events, recycle_requests, watch, grace))
}

fn watch_settings(config: &AppConfig) -> WatchSettings {
    let mut roots = vec![config.app_dir.clone()];
    roots.extend(config.watcher_dirs());
    WatchSettings {
        roots,
        pattern: config.restart_regex(),
        poll_interval: config.watcher_poll().unwrap_or(None),
        // A failed worker start keeps the old worker serving.
        can_restart: None,
    }
}

/// A file watcher whose trigger fires once; started again after each restart.
fn start_watcher(settings: &WatchSettings) -> shutdown::Shutdown {
    let (trigger, restart) = shutdown::channel();
    watcher::spawn(settings.clone(), trigger);
    restart
}

impl Supervisor {
    async fn supervise(
        &mut self,
        mut exit_events: mpsc::UnboundedReceiver<Exit>,
        mut recycle_requests: mpsc::UnboundedReceiver<(u32, u8)>,
        watch: WatchSettings,
        grace: Duration,
    ) -> Result<()> {
        let mut terminate = signal(SignalKind::terminate())?;
        let mut interrupt = signal(SignalKind::interrupt())?;
        let mut hangup = signal(SignalKind::hangup())?;
        let mut dump = signal(SignalKind::user_defined1())?;
        for slot in 0..self.slots.len() {
            self.replace(slot).await;
        }
        tracing::info!("supervising {} worker processes", self.slots.len());
        let mut restart = start_watcher(&watch);
        loop {
            let next_start = self.pending.iter().map(|(_, at)| *at).min();
            tokio::select! {
                _ = crate::sleep_until(next_start.map(Into::into)) => self.start_pending().await,
                _ = terminate.recv() => break,
                _ = interrupt.recv() => break,
                _ = dump.recv() => {
                    tracing::info!("SIGUSR1: passed to every worker, which logs its Python stacks");
                    for worker in self.slots.iter().flatten() {
                        kill(worker.pid, libc::SIGUSR1);
                    }
                }
                _ = hangup.recv() => {
                    tracing::info!("SIGHUP: replacing the workers one at a time");
                    self.rolling_restart("sighup").await;
                }
                reason = restart.started() => {
                    if reason == Some(Reason::Restart) {
                        self.rolling_restart("file_change").await;
                        restart = start_watcher(&watch);
                    }
                }
                Some(exit) = exit_events.recv() => self.on_exit(exit),
                Some((pid, cause)) = recycle_requests.recv() => self.recycle(pid, cause).await,
            }
        }
        tracing::info!("stopping: draining every worker");
        self.stop_all(&mut exit_events, grace).await;
        Ok(())
    }

    /// Starts a worker for `slot` and waits until it is ready. A failure is logged and the
    /// slot scheduled for another try after the back-off.
    async fn replace(&mut self, slot: usize) -> bool {
        match self.spawn().await {
            Ok(worker) => {
                tracing::info!("worker {} ready (pid {})", slot + 1, worker.pid);
                self.slots[slot] = Some(worker);
                true
            }
            Err(e) => {
                let backoff = self.next_backoff();
                tracing::error!(
                    "worker {} failed to start: {e:#}; trying again in {backoff:?}",
                    slot + 1
                );
                self.pending.push((slot, Instant::now() + backoff));
                false
            }
        }
    }

    fn next_backoff(&mut self) -> Duration {
        let backoff = backoff(self.failures);
        self.failures += 1;
        backoff
    }

    async fn start_pending(&mut self) {
        let now = Instant::now();
        let due: Vec<usize> = self
            .pending
            .iter()
            .filter(|(_, at)| *at <= now)
            .map(|(slot, _)| *slot)
            .collect();
        self.pending.retain(|(_, at)| *at > now);
        for slot in due {
            self.replace(slot).await;
        }
    }

    async fn spawn(&self) -> Result<Worker> {
        let (ready_writer, mut ready_reader) = ready_pipe()?;
        // Above the target numbers, so each dup2 below really copies (and so clears
        // close-on-exec): dup2 of a descriptor onto itself does nothing.
        let listener = duplicate_above(self.listener.as_raw_fd(), READY_FD + 1)?;
        let ready = duplicate_above(ready_writer.as_raw_fd(), READY_FD + 1)?;
        let (listener_fd, ready_fd) = (listener.as_raw_fd(), ready.as_raw_fd());
        let exe = std::env::current_exe().context("cannot find this binary")?;
        let mut command = tokio::process::Command::new(exe);
        command
            .arg("serve")
            .args(&self.worker_args)
            .env(LISTEN_FD_VAR, LISTEN_FD.to_string())
            .env(READY_FD_VAR, READY_FD.to_string());
        let supervisor = libc::pid_t::try_from(std::process::id()).unwrap_or(0);
        // SAFETY: between fork and exec only dup2, prctl and getppid run, which are
        // async-signal-safe and allocate nothing; dup2 also clears close-on-exec on the new
        // descriptors, so exactly these two are inherited.
        unsafe {
            command.pre_exec(move || {
                if libc::dup2(listener_fd, LISTEN_FD) < 0 || libc::dup2(ready_fd, READY_FD) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                // A supervisor killed outright (SIGKILL) cannot drain its workers: they get
                // SIGTERM from the kernel and drain themselves, rather than keep the port.
                // The signal is sent when the thread that forked ends: this runtime's thread
                // is the supervisor's only one.
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                // The supervisor died before the prctl: nobody would send the signal.
                if libc::getppid() != supervisor {
                    return Err(std::io::Error::from_raw_os_error(libc::ESRCH));
                }
                Ok(())
            });
        }
        let mut child = command.spawn().context("cannot start a worker")?;
        drop((ready_writer, ready, listener));
        let pid = child.id().context("the worker exited at once")?;
        let exits = self.exits.clone();
        tokio::spawn(async move {
            let status = match child.wait().await {
                Ok(status) => status.to_string(),
                Err(e) => format!("unknown ({e})"),
            };
            let _ = exits.send(Exit { pid, status });
        });
        let mut byte = [0u8; 1];
        match tokio::time::timeout(READY_LIMIT, ready_reader.read(&mut byte)).await {
            Ok(Ok(1)) => {
                let recycles = self.recycles.clone();
                let totals = self.totals.clone();
                tokio::spawn(async move {
                    // Until the worker exits (end of file) or says something else.
                    let mut payload = [0u8; metrics::SNAPSHOT_BYTES];
                    let mut cause = [0u8; 1];
                    while let Ok(1) = ready_reader.read(&mut byte).await {
                        match byte[0] {
                            b'r' if ready_reader.read_exact(&mut cause).await.is_ok() => {
                                let _ = recycles.send((pid, cause[0]));
                            }
                            b'm' if ready_reader.read_exact(&mut payload).await.is_ok() => {
                                let snapshot = metrics::Snapshot::from_bytes(&payload);
                                lock(&totals).live.insert(pid, snapshot);
                            }
                            _ => break,
                        }
                    }
                });
                Ok(Worker {
                    pid,
                    started: Instant::now(),
                })
            }
            Ok(_) => anyhow::bail!("worker pid {pid} exited before it was ready"),
            Err(_) => {
                kill(pid, libc::SIGKILL);
                anyhow::bail!("worker pid {pid} was not ready within {READY_LIMIT:?}")
            }
        }
    }

    fn on_exit(&mut self, exit: Exit) {
        {
            let mut totals = lock(&self.totals);
            if let Some(last) = totals.live.remove(&exit.pid) {
                totals.retired.add(&last.retired());
            }
        }
        let Some(slot) = self.slot_of(exit.pid) else {
            return; // a worker that was replaced on purpose, or never became ready
        };
        let lived = self.slots[slot].take().map(|w| w.started.elapsed());
        if lived.is_some_and(|lived| lived >= HEALTHY_UPTIME) {
            self.failures = 0;
        }
        lock(&self.totals).respawns += 1;
        let backoff = self.next_backoff();
        tracing::warn!(
            "worker {} (pid {}) exited: {}; starting a new one in {backoff:?}",
            slot + 1,
            exit.pid,
            exit.status
        );
        self.pending.push((slot, Instant::now() + backoff));
    }

    fn slot_of(&self, pid: u32) -> Option<usize> {
        self.slots
            .iter()
            .position(|w| w.as_ref().is_some_and(|w| w.pid == pid))
    }

    async fn rolling_restart(&mut self, cause: &'static str) {
        for slot in 0..self.slots.len() {
            lock(&self.totals).restarted(cause);
            self.replace_running(slot).await;
        }
        tracing::info!("every worker replaced");
    }

    /// Starts a new worker for `slot`, then tells the old one to drain.
    async fn replace_running(&mut self, slot: usize) {
        let old = self.slots[slot].take();
        if !self.replace(slot).await {
            // Keep the old worker serving rather than leave the slot empty.
            self.pending.retain(|(pending, _)| *pending != slot);
            self.slots[slot] = old;
            return;
        }
        if let Some(old) = old {
            kill(old.pid, libc::SIGTERM);
        }
    }

    /// A worker asked to be recycled.
    async fn recycle(&mut self, pid: u32, cause: u8) {
        let Some(slot) = self.slot_of(pid) else {
            return;
        };
        let cause = crate::ops::Cause::label(cause);
        tracing::info!(
            "worker {} (pid {pid}) asks to be recycled ({cause}): replacing it",
            slot + 1
        );
        lock(&self.totals).restarted(cause);
        self.replace_running(slot).await;
    }

    async fn stop_all(&mut self, exit_events: &mut mpsc::UnboundedReceiver<Exit>, grace: Duration) {
        let mut running: Vec<u32> = self
            .slots
            .iter_mut()
            .filter_map(|w| w.take())
            .map(|w| w.pid)
            .collect();
        for pid in &running {
            kill(*pid, libc::SIGTERM);
        }
        let deadline = tokio::time::sleep(grace + Duration::from_secs(5));
        tokio::pin!(deadline);
        while !running.is_empty() {
            tokio::select! {
                Some(exit) = exit_events.recv() => running.retain(|pid| *pid != exit.pid),
                _ = &mut deadline => {
                    for pid in &running {
                        tracing::warn!("worker pid {pid} did not stop in time: killed");
                        kill(*pid, libc::SIGKILL);
                    }
                    return;
                }
            }
        }
    }
}

fn backoff(failures: u32) -> Duration {
    let backoff = Duration::from_millis(500).saturating_mul(1 << failures.min(6));
    backoff.min(MAX_BACKOFF)
}

fn kill(pid: u32, signal: i32) {
    if let Ok(pid) = i32::try_from(pid) {
        // SAFETY: kill(2) on a child process of ours.
        unsafe {
            libc::kill(pid, signal);
        }
    }
}

/// A close-on-exec copy of `fd` numbered at least `lowest`.
fn duplicate_above(fd: RawFd, lowest: RawFd) -> Result<OwnedFd> {
    use std::os::fd::FromRawFd;
    // SAFETY: fcntl(F_DUPFD_CLOEXEC) on a descriptor we own returns a new one, or -1.
    let copy = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, lowest) };
    if copy < 0 {
        return Err(std::io::Error::last_os_error()).context("cannot duplicate a descriptor");
    }
    // SAFETY: `copy` is a fresh descriptor nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(copy) })
}

/// A pipe whose write end a worker inherits; the read end is polled by tokio.
fn ready_pipe() -> Result<(OwnedFd, tokio::net::unix::pipe::Receiver)> {
    let (sender, receiver) = tokio::net::unix::pipe::pipe().context("cannot make a pipe")?;
    let writer = sender.into_blocking_fd().context("cannot use the pipe")?;
    Ok((writer, receiver))
}

/// In a worker: the pipe to the supervisor, kept open after readiness to ask for recycling.
static READY_PIPE: std::sync::Mutex<Option<std::fs::File>> = std::sync::Mutex::new(None);

/// In a worker: tells the supervisor the application is loaded.
pub fn report_ready() {
    use std::io::Write;
    use std::os::fd::FromRawFd;
    let Some(fd) = std::env::var(READY_FD_VAR)
        .ok()
        .and_then(|v| v.parse::<RawFd>().ok())
    else {
        return;
    };
    std::env::remove_var(READY_FD_VAR);
    // SAFETY: the supervisor passed this descriptor for this purpose; nothing else owns it.
    let mut pipe = unsafe { std::fs::File::from_raw_fd(fd) };
    // Kept open from now on: no child process of the application may inherit it.
    // SAFETY: fcntl on the descriptor just taken over.
    unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
    match pipe.write_all(b"1") {
        Ok(()) => *lock(&READY_PIPE) = Some(pipe),
        Err(e) => tracing::warn!("cannot report readiness to the supervisor: {e}"),
    }
}

/// In a worker: asks the supervisor to start a replacement and then stop this worker (`cause`
/// names why, for the metrics). False when there is no supervisor to ask.
pub fn request_replacement(cause: u8) -> bool {
    use std::io::Write;
    match lock(&READY_PIPE)
        .as_mut()
        .map(|pipe| pipe.write_all(&[b'r', cause]))
    {
        Some(Ok(())) => true,
        Some(Err(e)) => {
            tracing::warn!("cannot ask the supervisor for a replacement: {e}");
            false
        }
        None => false,
    }
}

/// In a worker: sends its metrics to the supervisor, which adds up its workers'.
pub fn report_metrics(snapshot: &metrics::Snapshot) {
    use std::io::Write;
    let mut message = vec![b'm'];
    message.extend_from_slice(&snapshot.to_bytes());
    if let Some(pipe) = lock(&READY_PIPE).as_mut() {
        let _ = pipe.write_all(&message);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_to_a_ceiling() {
        assert_eq!(backoff(0), Duration::from_millis(500));
        assert_eq!(backoff(1), Duration::from_secs(1));
        assert_eq!(backoff(3), Duration::from_secs(4));
        assert_eq!(backoff(20), MAX_BACKOFF);
    }
}
