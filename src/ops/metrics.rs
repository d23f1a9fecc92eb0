//! Metrics (`WSGI_METRICS`): counters kept with atomics where a request is served, rendered in
//! the OpenMetrics text format by a small HTTP endpoint on its own thread.
//!
//! With `--bind` the process serves the endpoint itself. Under `--processes` the supervisor
//! serves it: each worker sends a [`Snapshot`] of its counters on its readiness pipe every
//! second, and the supervisor adds them up, keeping the last snapshot of each worker that has
//! exited so its counters never go backwards. Under IIS metrics are off: IIS runs and stops
//! processes on its own, with no stable port to scrape.

use std::io::{Read, Write};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::Duration;

use anyhow::{bail, Context, Result};

/// Upper bounds of the request duration histogram, in seconds (and `+Inf`).
const BUCKETS: [f64; 12] = [
    0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// The positions of a snapshot's values.
mod at {
    pub const STATUS: usize = 0; // 5 classes, 1xx to 5xx
    pub const IN_FLIGHT: usize = 5;
    pub const QUEUE: usize = 6;
    pub const BUCKETS: usize = 7; // 13, the last +Inf
    pub const COUNT: usize = 20;
    pub const SUM_MICROS: usize = 21;
    pub const BYTES_IN: usize = 22;
    pub const BYTES_OUT: usize = 23;
    pub const EXCEPTIONS: usize = 24;
    pub const RSS: usize = 25;
    pub const GIL_MICROS: usize = 26;
    pub const QUEUE_FULL: usize = 27;
    pub const LEN: usize = 28;
}

/// One process's values, in the order of [`at`]; what a worker sends the supervisor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Snapshot(pub [u64; at::LEN]);

impl Default for Snapshot {
    fn default() -> Self {
        Snapshot([0; at::LEN])
    }
}

/// The size of a snapshot on the pipe.
pub const SNAPSHOT_BYTES: usize = at::LEN * 8;

impl Snapshot {
    pub fn to_bytes(self) -> [u8; SNAPSHOT_BYTES] {
        let mut bytes = [0; SNAPSHOT_BYTES];
        for (chunk, value) in bytes.chunks_exact_mut(8).zip(self.0) {
            chunk.copy_from_slice(&value.to_le_bytes());
        }
        bytes
    }

    pub fn from_bytes(bytes: &[u8; SNAPSHOT_BYTES]) -> Snapshot {
        let mut snapshot = Snapshot::default();
        for (value, chunk) in snapshot.0.iter_mut().zip(bytes.chunks_exact(8)) {
            let mut word = [0; 8];
            word.copy_from_slice(chunk);
            *value = u64::from_le_bytes(word);
        }
        snapshot
    }

    /// Adds another process's values.
    pub fn add(&mut self, other: &Snapshot) {
        for (mine, theirs) in self.0.iter_mut().zip(other.0) {
            *mine = mine.saturating_add(theirs);
        }
    }

    /// The same with its gauges (in flight, queue, memory) at zero: what an exited worker
    /// leaves behind.
    pub fn retired(mut self) -> Snapshot {
        for gauge in [at::IN_FLIGHT, at::QUEUE, at::RSS] {
            self.0[gauge] = 0;
        }
        self
    }
}

struct Counters {
    values: [AtomicU64; at::LEN],
}

static COUNTERS: Counters = Counters {
    values: [const { AtomicU64::new(0) }; at::LEN],
};
static ENABLED: AtomicBool = AtomicBool::new(false);
static QUEUE_LENGTH: OnceLock<Box<dyn Fn() -> usize + Send + Sync>> = OnceLock::new();

/// Whether this process keeps metrics (then it also times the GIL).
pub fn enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
}

fn add(index: usize, n: u64) {
    COUNTERS.values[index].fetch_add(n, Ordering::Relaxed);
}

/// How many jobs wait for a worker thread, asked at each snapshot.
pub fn set_queue_length(length: impl Fn() -> usize + Send + Sync + 'static) {
    let _ = QUEUE_LENGTH.set(Box::new(length));
}

pub fn request_started() {
    if enabled() {
        add(at::IN_FLIGHT, 1);
    }
}

pub fn request_ended(status: u16, bytes_in: u64, bytes_out: u64, duration: Duration) {
    COUNTERS.values[at::IN_FLIGHT].fetch_sub(1, Ordering::Relaxed);
    add(at::BYTES_IN, bytes_in);
    let class = usize::from(status / 100).clamp(1, 5) - 1;
    add(at::STATUS + class, 1);
    add(at::BYTES_OUT, bytes_out);
    let seconds = duration.as_secs_f64();
    let bucket = BUCKETS
        .iter()
        .position(|&le| seconds <= le)
        .unwrap_or(BUCKETS.len());
    add(at::BUCKETS + bucket, 1);
    add(at::COUNT, 1);
    add(at::SUM_MICROS, duration.as_micros() as u64);
}

/// A request was answered 503 at once: every worker was busy and the job queue full.
pub fn refused_queue_full() {
    if enabled() {
        add(at::QUEUE_FULL, 1);
    }
}

/// The application raised (or broke the WSGI contract).
pub fn app_exception() {
    if enabled() {
        add(at::EXCEPTIONS, 1);
    }
}

/// A worker thread waited this long for the GIL after its request arrived.
pub fn gil_waited(wait: Duration) {
    add(at::GIL_MICROS, wait.as_micros() as u64);
}

/// This process's values now.
pub fn snapshot() -> Snapshot {
    let mut snapshot = Snapshot::default();
    for (value, counter) in snapshot.0.iter_mut().zip(&COUNTERS.values) {
        *value = counter.load(Ordering::Relaxed);
    }
    snapshot.0[at::QUEUE] = QUEUE_LENGTH.get().map_or(0, |length| length()) as u64;
    snapshot.0[at::RSS] = super::watchdog::resident_bytes().unwrap_or(0);
    snapshot
}

/// Processes replaced on purpose, by cause, and (with a supervisor) workers that died: counted
/// by the supervisor of `--processes`, or by a single `--bind` process across its in-place
/// restarts ([`restarts_in_place`]).
#[derive(Debug, Default, Clone)]
pub struct Replacements {
    /// `(cause, count)`, in a fixed order.
    pub restarts: Vec<(&'static str, u64)>,
    /// `None` without a supervisor.
    pub respawns: Option<u64>,
}

/// The causes of a restart, as the metrics label them.
pub const RESTART_CAUSES: [&str; 5] = ["file_change", "sighup", "max_requests", "max_rss", "stuck"];

/// The variable that carries a `--bind` process's restart counts across its in-place restart
/// (`file_change=1,stuck=2`), as the listening socket is carried.
pub const RESTARTS_VAR: &str = "WFASTCGI_RESTARTS";

/// This process's restarts so far, by cause (in the order of [`RESTART_CAUSES`]).
static RESTARTS: [AtomicU64; 5] = [const { AtomicU64::new(0) }; 5];

/// Takes the counts an in-place restart passed in [`RESTARTS_VAR`], and removes the variable so
/// the application's child processes do not see it. Call before Python starts.
pub fn restore_restarts() {
    let Some(value) = std::env::var_os(RESTARTS_VAR) else {
        return;
    };
    std::env::remove_var(RESTARTS_VAR);
    for pair in value.to_string_lossy().split(',') {
        let Some((cause, count)) = pair.split_once('=') else {
            continue;
        };
        let index = RESTART_CAUSES.iter().position(|&known| known == cause);
        if let (Some(index), Ok(count)) = (index, count.parse()) {
            RESTARTS[index].store(count, Ordering::Relaxed);
        }
    }
}

/// The value of [`RESTARTS_VAR`] for the process that replaces this one in place because of
/// `cause`: the counts so far plus this restart.
#[cfg(unix)]
pub fn restarts_after(cause: &str) -> String {
    RESTART_CAUSES
        .iter()
        .zip(&RESTARTS)
        .map(|(&known, count)| {
            let count = count.load(Ordering::Relaxed) + u64::from(known == cause);
            format!("{known}={count}")
        })
        .collect::<Vec<_>>()
        .join(",")
}

/// A single `--bind` process's restarts, carried across its in-place restarts.
pub fn restarts_in_place() -> Replacements {
    Replacements {
        restarts: RESTART_CAUSES
            .iter()
            .zip(&RESTARTS)
            .map(|(&cause, count)| (cause, count.load(Ordering::Relaxed)))
            .collect(),
        respawns: None,
    }
}

/// The OpenMetrics text of `snapshot`, plus the restarts (and respawns) counted.
pub fn render(snapshot: &Snapshot, replacements: &Replacements) -> String {
    let v = &snapshot.0;
    let mut out = String::with_capacity(4096);
    header(
        &mut out,
        "wfastcgi_requests",
        "counter",
        "Requests answered, by status class.",
    );
    for (class, value) in v[at::STATUS..at::STATUS + 5].iter().enumerate() {
        out.push_str(&format!(
            "wfastcgi_requests_total{{class=\"{}xx\"}} {value}\n",
            class + 1
        ));
    }
    let simple: [(&str, &str, &str, String); 8] = [
        (
            "wfastcgi_requests_in_flight",
            "gauge",
            "Requests the application is running.",
            v[at::IN_FLIGHT].to_string(),
        ),
        (
            "wfastcgi_queue_length",
            "gauge",
            "Requests waiting for a worker thread.",
            v[at::QUEUE].to_string(),
        ),
        (
            "wfastcgi_queue_full_refusals",
            "counter",
            "Requests answered 503 at once: every worker busy and the queue full.",
            v[at::QUEUE_FULL].to_string(),
        ),
        (
            "wfastcgi_request_bytes",
            "counter",
            "Request body bytes (CONTENT_LENGTH) of the requests run.",
            v[at::BYTES_IN].to_string(),
        ),
        (
            "wfastcgi_response_bytes",
            "counter",
            "Response body bytes sent.",
            v[at::BYTES_OUT].to_string(),
        ),
        (
            "wfastcgi_app_exceptions",
            "counter",
            "Requests the application failed (an exception or a WSGI contract break).",
            v[at::EXCEPTIONS].to_string(),
        ),
        (
            "wfastcgi_resident_memory_bytes",
            "gauge",
            "Resident memory of the serving processes.",
            v[at::RSS].to_string(),
        ),
        (
            "wfastcgi_gil_wait_seconds",
            "counter",
            "Time requests waited for the GIL once they had arrived.",
            seconds(v[at::GIL_MICROS]),
        ),
    ];
    for (name, kind, help, value) in simple {
        header(&mut out, name, kind, help);
        let sample = if kind == "counter" {
            format!("{name}_total")
        } else {
            name.to_owned()
        };
        out.push_str(&format!("{sample} {value}\n"));
    }
    let name = "wfastcgi_request_duration_seconds";
    header(
        &mut out,
        name,
        "histogram",
        "Time from the application's start to the end of its response.",
    );
    let mut cumulative = 0;
    for (index, count) in v[at::BUCKETS..at::BUCKETS + BUCKETS.len() + 1]
        .iter()
        .enumerate()
    {
        cumulative += count;
        let le = BUCKETS
            .get(index)
            .map_or_else(|| "+Inf".to_owned(), |le| format!("{le:?}"));
        out.push_str(&format!("{name}_bucket{{le=\"{le}\"}} {cumulative}\n"));
    }
    out.push_str(&format!("{name}_count {}\n", v[at::COUNT]));
    out.push_str(&format!("{name}_sum {}\n", seconds(v[at::SUM_MICROS])));
    let name = "wfastcgi_worker_restarts";
    header(
        &mut out,
        name,
        "counter",
        "Processes replaced on purpose (workers, or a single --bind process restarted in place), by cause.",
    );
    for (cause, count) in &replacements.restarts {
        out.push_str(&format!("{name}_total{{cause=\"{cause}\"}} {count}\n"));
    }
    if let Some(respawns) = replacements.respawns {
        let name = "wfastcgi_worker_respawns";
        header(
            &mut out,
            name,
            "counter",
            "Workers that died and were started again.",
        );
        out.push_str(&format!("{name}_total {respawns}\n"));
    }
    out.push_str("# EOF\n");
    out
}

fn header(out: &mut String, name: &str, kind: &str, help: &str) {
    out.push_str(&format!("# TYPE {name} {kind}\n# HELP {name} {help}\n"));
}

fn seconds(micros: u64) -> String {
    format!("{:?}", micros as f64 / 1e6)
}

/// `WSGI_METRICS`: `HOST:PORT` or `unix:/path`.
pub fn parse_address(value: &str) -> Result<String> {
    let value = value.trim();
    if let Some(path) = value.strip_prefix("unix:") {
        if path.is_empty() {
            bail!("unix: needs a path");
        }
        return Ok(value.to_owned());
    }
    value
        .parse::<std::net::SocketAddr>()
        .with_context(|| format!("{value:?} is neither HOST:PORT nor unix:/path"))?;
    Ok(value.to_owned())
}

/// Serves the endpoint on its own thread: every request gets the text `body()` returns.
pub fn serve(address: &str, body: impl Fn() -> String + Send + 'static) -> Result<()> {
    let listener = bind(address)?;
    tracing::info!("metrics on {address}");
    std::thread::Builder::new()
        .name("wfastcgi-metrics".into())
        .spawn(move || loop {
            match listener.accept() {
                Ok(stream) => answer(stream, &body),
                Err(e) => {
                    tracing::warn!("metrics: accept failed: {e}");
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
        })
        .context("cannot start the metrics thread")?;
    ENABLED.store(true, Ordering::Relaxed);
    Ok(())
}

/// Turns the counters on without an endpoint: a worker of `--processes` reports to the
/// supervisor instead.
pub fn enable() {
    ENABLED.store(true, Ordering::Relaxed);
}

fn bind(address: &str) -> Result<socket2::Socket> {
    use socket2::{Domain, SockAddr, Socket, Type};
    let (socket, target) = match address.strip_prefix("unix:") {
        Some(path) => {
            // A socket file left by an earlier run (or this process before a re-exec).
            let _ = std::fs::remove_file(path);
            (
                Socket::new(Domain::UNIX, Type::STREAM, None)?,
                SockAddr::unix(path)?,
            )
        }
        None => {
            let address: std::net::SocketAddr = address.parse()?;
            let socket = Socket::new(Domain::for_address(address), Type::STREAM, None)?;
            socket.set_reuse_address(true)?;
            (socket, address.into())
        }
    };
    socket
        .bind(&target)
        .and_then(|()| socket.listen(16))
        .with_context(|| format!("WSGI_METRICS {address} cannot be listened on"))?;
    Ok(socket)
}

/// Reads the request head (whatever it asks) and answers with the metrics.
fn answer(stream: (socket2::Socket, socket2::SockAddr), body: &impl Fn() -> String) {
    let mut stream = stream.0;
    let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
    let mut head = Vec::new();
    let mut buffer = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 8192 {
        match stream.read(&mut buffer) {
            Ok(0) | Err(_) => return,
            Ok(n) => head.extend_from_slice(&buffer[..n]),
        }
    }
    let text = body();
    let response = format!(
        "HTTP/1.0 200 OK\r\nContent-Type: application/openmetrics-text; version=1.0.0; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{text}",
        text.len()
    );
    let _ = stream.write_all(response.as_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snapshots_travel_and_add_up() {
        let mut one = Snapshot::default();
        one.0[at::STATUS + 1] = 3;
        one.0[at::RSS] = 100;
        let back = Snapshot::from_bytes(&one.to_bytes());
        assert_eq!(back, one);
        let mut total = Snapshot::default();
        total.add(&one);
        total.add(&one.retired());
        assert_eq!(total.0[at::STATUS + 1], 6);
        assert_eq!(total.0[at::RSS], 100);
    }

    #[cfg(unix)]
    #[test]
    fn restart_counts_travel() {
        assert_eq!(
            restarts_after("stuck"),
            "file_change=0,sighup=0,max_requests=0,max_rss=0,stuck=1"
        );
    }

    #[test]
    fn addresses() {
        assert!(parse_address("127.0.0.1:9191").is_ok());
        assert!(parse_address("unix:/run/m.sock").is_ok());
        assert!(parse_address("localhost").is_err());
        assert!(parse_address("unix:").is_err());
    }
}
