//! FastCGI load driver for the benchmarks (`bench/run` runs it; see bench/README.md).
//!
//!     cargo bench --bench driver -- spawn [LOAD OPTIONS] --app-dir DIR [--processes N] -- CMD ARGS...
//!     cargo bench --bench driver -- connect [LOAD OPTIONS] --addr 127.0.0.1:9000|unix:/path \
//!         [--concurrency C] [--per-request] [--pid PID]...
//!
//! `spawn` starts N processes the way IIS starts a FastCGI application with its default named
//! pipe: fd 0 is one end of a duplex stream (here a Unix socketpair), from which the process reads
//! requests and to which it writes its responses; stdout and stderr lead nowhere. One client
//! thread per process sends one request at a time on that persistent stream, with FCGI_KEEP_CONN
//! and request ids cycling 1..=255, as IIS does.
//!
//! `connect` drives a server that listens on an address, with C client threads, each on a kept
//! connection or (`--per-request`, as nginx does by default) a new connection per request.
//!
//! Every response is checked (END_REQUEST, no STDERR, status, Content-Length against the body,
//! and the body itself as `--check` says); a failed check is counted and reported, never
//! dropped. One JSON object per run goes to stdout.

use std::collections::BTreeMap;
use std::fs;
use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Barrier, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use clap::{Args, Parser, Subcommand, ValueEnum};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use wfastcgi::protocol::{
    encode_begin_request, encode_end_of_stream, encode_name_value, encode_stream, Record,
    RecordDecoder, RecordType, Role, MAX_CONTENT_LEN,
};

const MIB: f64 = 1024.0 * 1024.0;
/// Bodies up to this size are written in the same buffer as the request head, before reading
/// the response; larger ones are written from a second thread while the response is read, so a
/// server that answers before it has read everything cannot deadlock the client.
const INLINE_BODY: u64 = 256 * 1024;
/// STDIN records are written this many at a time (one write call).
const RECORDS_PER_WRITE: usize = 4;
/// Bytes read from the socket per call.
const READ_CHUNK: usize = 256 * 1024;
/// Response bodies kept for checks that need the whole body (JSON, exact text, substring).
const KEEP_BODY: usize = 1 << 20;

#[derive(Parser)]
#[command(about = "FastCGI load driver for the wfastcgi benchmarks")]
struct Cli {
    #[command(subcommand)]
    mode: Mode,
}

#[derive(Subcommand)]
enum Mode {
    /// Start processes with a socketpair on fd 0 (as IIS does) and drive each one.
    Spawn {
        #[command(flatten)]
        load: Load,
        /// Processes to start, each driven by its own client (IIS maxInstances).
        #[arg(long, default_value_t = 1)]
        processes: usize,
        /// The command line of the process under test.
        #[arg(last = true, required = true)]
        command: Vec<String>,
    },
    /// Connect to a listening FastCGI server.
    Connect {
        #[command(flatten)]
        load: Load,
        /// `HOST:PORT` or `unix:/path`.
        #[arg(long)]
        addr: String,
        /// Client threads, each with one request in flight.
        #[arg(long, short = 'c', default_value_t = 1)]
        concurrency: usize,
        /// A new connection per request, without FCGI_KEEP_CONN (nginx's default).
        #[arg(long)]
        per_request: bool,
        /// Processes whose peak RSS (VmHWM) to report; repeatable.
        #[arg(long)]
        pid: Vec<u32>,
        /// How long to keep retrying the first connection while the server starts.
        #[arg(long, default_value_t = 15.0)]
        connect_wait: f64,
    },
}

#[derive(Args, Clone)]
struct Load {
    /// Name echoed in the JSON report.
    #[arg(long, default_value = "")]
    label: String,
    /// The application folder, sent as APPL_PHYSICAL_PATH (with a trailing slash) and
    /// DOCUMENT_ROOT.
    #[arg(long, default_value = "/")]
    app_dir: String,
    #[arg(long, default_value = "GET")]
    method: String,
    /// The request path (PATH_INFO).
    #[arg(long, default_value = "/")]
    path: String,
    #[arg(long, default_value = "")]
    query: String,
    /// Request body size; the bytes are deterministic, sent in STDIN records of at most 65535.
    #[arg(long, default_value_t = 0)]
    body_bytes: u64,
    /// Expected HTTP status.
    #[arg(long, default_value_t = 200)]
    status: u16,
    /// How to check the response body.
    #[arg(long, value_enum, default_value_t = CheckKind::None)]
    check: CheckKind,
    /// For `--check contains`: text the body must contain.
    #[arg(long, default_value = "")]
    contains: String,
    /// Expected response body length.
    #[arg(long)]
    expect_length: Option<u64>,
    /// Stop starting requests after this many seconds.
    #[arg(long)]
    duration: Option<f64>,
    /// Stop after this many requests in all (with --duration: whichever comes first).
    #[arg(long)]
    requests: Option<u64>,
    /// Requests per client before the measurement (not counted, status checked).
    #[arg(long, default_value_t = 2)]
    warmup: u64,
    /// Query string of the warm-up requests (which have no body); default: `--query`.
    #[arg(long)]
    warmup_query: Option<String>,
    /// A request whose socket is idle this long fails.
    #[arg(long, default_value_t = 30.0)]
    timeout: f64,
    /// Hard limit on the measured part: past it the connections are shut down, the requests in
    /// flight fail, and the report says `timed_out`.
    #[arg(long, default_value_t = 120.0)]
    max_seconds: f64,
    /// Parameter set: what IIS 10 sends, or nginx with the usual WSGI settings.
    #[arg(long, value_enum)]
    style: Option<Style>,
    /// CPUs to pin to, e.g. `0,1`: client thread i (and in spawn mode process i, with all its
    /// threads) runs on CPU i modulo the list. On a small VM a wake-up across CPUs can cost more
    /// than a whole request, and where the scheduler puts the threads changes from run to run.
    #[arg(long, value_delimiter = ',')]
    cpus: Vec<usize>,
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum CheckKind {
    /// Status and lengths only.
    None,
    /// Exactly `Hello, World!\n`.
    Hello,
    /// JSON `{length, sha256}` matching what was sent (the echo app).
    Echo,
    /// Byte i of the body is i % 256 (the stream app).
    Pattern,
    /// Every byte is zero (the sparse file).
    Zeros,
    /// The body contains `--contains`.
    Contains,
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum Style {
    Iis,
    Nginx,
}

fn main() {
    // `cargo bench` appends `--bench` to the arguments of a harness=false target.
    let mut args: Vec<String> = std::env::args().collect();
    if args.last().map(String::as_str) == Some("--bench") {
        args.pop();
    }
    let cli = Cli::parse_from(args);
    let report = match cli.mode {
        Mode::Spawn {
            load,
            processes,
            command,
        } => run_spawn(load, processes.max(1), command),
        Mode::Connect {
            load,
            addr,
            concurrency,
            per_request,
            pid,
            connect_wait,
        } => run_connect(
            load,
            addr,
            concurrency.max(1),
            per_request,
            pid,
            connect_wait,
        ),
    };
    match report {
        Ok(report) => println!("{report}"),
        Err(e) => {
            eprintln!("driver: {e}");
            std::process::exit(2);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Connections

/// A client's end of a connection.
enum Conn {
    Unix(UnixStream),
    Tcp(TcpStream),
}

impl Conn {
    fn connect(addr: &str, timeout: Duration) -> io::Result<Conn> {
        let conn = match addr.strip_prefix("unix:") {
            Some(path) => Conn::Unix(UnixStream::connect(path)?),
            None => {
                let stream = TcpStream::connect(addr)?;
                // Requests are written whole; Nagle would only add delay.
                stream.set_nodelay(true)?;
                Conn::Tcp(stream)
            }
        };
        conn.set_timeout(timeout)?;
        Ok(conn)
    }

    fn set_timeout(&self, timeout: Duration) -> io::Result<()> {
        self.set_read_timeout(Some(timeout))?;
        match self {
            Conn::Unix(s) => s.set_write_timeout(Some(timeout)),
            Conn::Tcp(s) => s.set_write_timeout(Some(timeout)),
        }
    }

    fn set_read_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        match self {
            Conn::Unix(s) => s.set_read_timeout(timeout),
            Conn::Tcp(s) => s.set_read_timeout(timeout),
        }
    }

    fn try_clone(&self) -> io::Result<Conn> {
        Ok(match self {
            Conn::Unix(s) => Conn::Unix(s.try_clone()?),
            Conn::Tcp(s) => Conn::Tcp(s.try_clone()?),
        })
    }

    fn shutdown(&self) {
        let _ = match self {
            Conn::Unix(s) => s.shutdown(Shutdown::Both),
            Conn::Tcp(s) => s.shutdown(Shutdown::Both),
        };
    }
}

impl Read for Conn {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Conn::Unix(s) => s.read(buf),
            Conn::Tcp(s) => s.read(buf),
        }
    }
}

impl Write for Conn {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Conn::Unix(s) => s.write(buf),
            Conn::Tcp(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// Requests

/// The deterministic request body: a pseudo-random block of a prime length, repeated. The length
/// is no multiple of the record size, so records sent out of order or twice change the hash.
struct BodySource {
    len: u64,
    /// `PERIOD` bytes, then the first `MAX_SLICE` of them again, so any slice of up to
    /// `MAX_SLICE` bytes starting anywhere in the period is contiguous.
    block: Vec<u8>,
    sha256: String,
}

impl BodySource {
    const PERIOD: usize = 1_000_003;
    const MAX_SLICE: usize = MAX_CONTENT_LEN * RECORDS_PER_WRITE;

    fn new(len: u64) -> BodySource {
        let mut state: u64 = 0x9E37_79B9_7F4A_7C15;
        let mut block: Vec<u8> = (0..Self::PERIOD)
            .map(|_| {
                // xorshift64: deterministic, no dependency.
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                (state >> 24) as u8
            })
            .collect();
        block.extend_from_within(..Self::MAX_SLICE);
        let mut body = BodySource {
            len,
            block,
            sha256: String::new(),
        };
        let mut hasher = Sha256::new();
        body.for_each_slice(|slice| {
            hasher.update(slice);
            Ok(())
        })
        .expect("hashing cannot fail");
        body.sha256 = hex(&hasher.finalize());
        body
    }

    /// Calls `f` with consecutive slices (at most `MAX_SLICE` bytes) that make up the body.
    fn for_each_slice(&self, mut f: impl FnMut(&[u8]) -> io::Result<()>) -> io::Result<()> {
        let mut offset = 0u64;
        while offset < self.len {
            let start = (offset % Self::PERIOD as u64) as usize;
            let n = (self.len - offset).min(Self::MAX_SLICE as u64) as usize;
            f(&self.block[start..start + n])?;
            offset += n as u64;
        }
        Ok(())
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// What every request of a run looks like, encoded once.
struct RequestTemplate {
    /// The PARAMS stream's content (name-value pairs).
    params: Vec<u8>,
    body: Option<Arc<BodySource>>,
    keep_conn: bool,
    /// The HTTP status every response must have.
    expected_status: u16,
    /// The idle limit of reads and writes.
    timeout: Duration,
}

impl RequestTemplate {
    fn new(load: &Load, query: &str, body: Option<Arc<BodySource>>, style: Style) -> Self {
        let content_length = body.as_ref().map_or(0, |b| b.len);
        let pairs = params(load, query, content_length, style);
        let mut encoded = BytesMut::new();
        for (name, value) in &pairs {
            encode_name_value(&mut encoded, name.as_bytes(), value.as_bytes());
        }
        RequestTemplate {
            params: encoded.to_vec(),
            body,
            keep_conn: true,
            expected_status: load.status,
            timeout: Duration::from_secs_f64(load.timeout),
        }
    }

    fn body_len(&self) -> u64 {
        self.body.as_ref().map_or(0, |b| b.len)
    }

    /// BEGIN_REQUEST, PARAMS and, without a body, the empty STDIN record too: a body-less request
    /// arrives in one write, as IIS sends it.
    fn encode_head(&self, buf: &mut BytesMut, id: u16) {
        encode_begin_request(buf, id, Role::Responder, self.keep_conn);
        encode_stream(buf, RecordType::Params, id, &self.params);
        encode_end_of_stream(buf, RecordType::Params, id);
        if self.body.is_none() {
            encode_end_of_stream(buf, RecordType::Stdin, id);
        }
    }
}

/// The parameters of one request: IIS 10's server variables (REFERENCE.md §1) or what nginx
/// sends with `fastcgi_params` plus the usual WSGI lines (`SCRIPT_NAME ""`, `PATH_INFO`).
fn params(load: &Load, query: &str, content_length: u64, style: Style) -> Vec<(String, String)> {
    let path = load.path.clone();
    let uri = if query.is_empty() {
        path.clone()
    } else {
        format!("{path}?{query}")
    };
    let dir = load.app_dir.trim_end_matches('/').to_owned();
    let content_type = if content_length > 0 {
        "application/octet-stream"
    } else {
        ""
    };
    let mut p: Vec<(&str, String)> = match style {
        Style::Iis => vec![
            ("URL", path.clone()),
            ("SERVER_SOFTWARE", "Microsoft-IIS/10.0".into()),
            ("SERVER_PROTOCOL", "HTTP/1.1".into()),
            ("SERVER_PORT_SECURE", "0".into()),
            ("SERVER_PORT", "80".into()),
            ("SERVER_NAME", "localhost".into()),
            // For a script mapping IIS sends SCRIPT_NAME == PATH_INFO == the URL path.
            ("SCRIPT_NAME", path.clone()),
            ("SCRIPT_FILENAME", format!("{dir}{path}")),
            ("REQUEST_URI", uri),
            ("REQUEST_METHOD", load.method.clone()),
            ("REMOTE_USER", String::new()),
            ("REMOTE_PORT", "50123".into()),
            ("REMOTE_HOST", "127.0.0.1".into()),
            ("REMOTE_ADDR", "127.0.0.1".into()),
            ("QUERY_STRING", query.into()),
            ("PATH_TRANSLATED", format!("{dir}{path}")),
            ("LOGON_USER", String::new()),
            ("LOCAL_ADDR", "127.0.0.1".into()),
            ("INSTANCE_META_PATH", "/LM/W3SVC/1".into()),
            ("INSTANCE_NAME", "DEFAULT WEB SITE".into()),
            ("INSTANCE_ID", "1".into()),
            ("HTTPS", "off".into()),
            ("GATEWAY_INTERFACE", "CGI/1.1".into()),
            ("DOCUMENT_ROOT", dir.clone()),
            ("CONTENT_TYPE", content_type.into()),
            ("CONTENT_LENGTH", content_length.to_string()),
            ("AUTH_TYPE", String::new()),
            ("APPL_PHYSICAL_PATH", format!("{dir}/")),
            ("APPL_MD_PATH", "/LM/W3SVC/1/ROOT".into()),
            ("PATH_INFO", path),
        ],
        Style::Nginx => vec![
            ("QUERY_STRING", query.into()),
            ("REQUEST_METHOD", load.method.clone()),
            ("CONTENT_TYPE", content_type.into()),
            ("CONTENT_LENGTH", content_length.to_string()),
            ("SCRIPT_NAME", String::new()),
            ("PATH_INFO", path.clone()),
            ("REQUEST_URI", uri),
            ("DOCUMENT_URI", path),
            ("DOCUMENT_ROOT", dir),
            ("SERVER_PROTOCOL", "HTTP/1.1".into()),
            ("REQUEST_SCHEME", "http".into()),
            ("GATEWAY_INTERFACE", "CGI/1.1".into()),
            ("SERVER_SOFTWARE", "nginx/1.22.1".into()),
            ("REMOTE_ADDR", "127.0.0.1".into()),
            ("REMOTE_PORT", "50123".into()),
            ("SERVER_ADDR", "127.0.0.1".into()),
            ("SERVER_PORT", "80".into()),
            ("SERVER_NAME", "localhost".into()),
            ("REDIRECT_STATUS", "200".into()),
        ],
    };
    p.extend([
        ("HTTP_HOST", "localhost".to_owned()),
        ("HTTP_USER_AGENT", "wfastcgi-bench-driver".to_owned()),
        ("HTTP_ACCEPT", "*/*".to_owned()),
        ("HTTP_CONNECTION", "keep-alive".to_owned()),
    ]);
    p.into_iter().map(|(k, v)| (k.to_owned(), v)).collect()
}

/// Why a request failed; `fatal` when the connection can no longer be used.
struct Failure {
    message: String,
    fatal: bool,
}

impl Failure {
    fn check(message: impl Into<String>) -> Failure {
        Failure {
            message: message.into(),
            fatal: false,
        }
    }

    fn io(what: &str, e: io::Error) -> Failure {
        let kind = match e.kind() {
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => "timed out".to_owned(),
            _ => e.to_string(),
        };
        Failure {
            message: format!("{what}: {kind}"),
            fatal: true,
        }
    }
}

/// How one response's body is checked, incrementally as its bytes arrive.
struct BodyCheck<'a> {
    kind: CheckKind,
    load: &'a Load,
    /// The sent body's hash and length, for the echo app's answer.
    sent: Option<(&'a str, u64)>,
    offset: u64,
    kept: Vec<u8>,
    bad_at: Option<u64>,
}

impl<'a> BodyCheck<'a> {
    fn new(kind: CheckKind, load: &'a Load, sent: Option<(&'a str, u64)>) -> Self {
        BodyCheck {
            kind,
            load,
            sent,
            offset: 0,
            kept: Vec::new(),
            bad_at: None,
        }
    }

    fn feed(&mut self, data: &[u8]) {
        match self.kind {
            CheckKind::Pattern if self.bad_at.is_none() => {
                // Byte i must be i % 256 (the byte's low 8 bits).
                let start = self.offset;
                if let Some(i) = data
                    .iter()
                    .enumerate()
                    .position(|(i, &b)| b != (start + i as u64) as u8)
                {
                    self.bad_at = Some(start + i as u64);
                }
            }
            CheckKind::Zeros if self.bad_at.is_none() => {
                if let Some(i) = data.iter().position(|&b| b != 0) {
                    self.bad_at = Some(self.offset + i as u64);
                }
            }
            CheckKind::Hello | CheckKind::Echo | CheckKind::Contains => {
                let room = KEEP_BODY.saturating_sub(self.kept.len());
                self.kept.extend_from_slice(&data[..data.len().min(room)]);
            }
            _ => {}
        }
        self.offset += data.len() as u64;
    }

    fn verdict(&self) -> Result<(), String> {
        if let Some(at) = self.bad_at {
            return Err(format!("{:?} check: wrong byte at offset {at}", self.kind));
        }
        match self.kind {
            CheckKind::Hello if self.kept != b"Hello, World!\n" => Err(format!(
                "hello check: body {:?}",
                String::from_utf8_lossy(&self.kept[..self.kept.len().min(60)])
            )),
            CheckKind::Echo => {
                let (sha, len) = self.sent.unwrap_or(("", 0));
                let answer: Value = serde_json::from_slice(&self.kept).map_err(|e| {
                    format!(
                        "echo check: not JSON ({e}): {:?}",
                        String::from_utf8_lossy(&self.kept[..self.kept.len().min(60)])
                    )
                })?;
                if answer["length"].as_u64() != Some(len) || answer["sha256"].as_str() != Some(sha)
                {
                    return Err(format!(
                        "echo check: sent {len} bytes with sha256 {sha}, the app got {answer}"
                    ));
                }
                Ok(())
            }
            CheckKind::Contains => {
                let needle = self.load.contains.as_bytes();
                if needle.is_empty() || self.kept.windows(needle.len()).any(|w| w == needle) {
                    Ok(())
                } else {
                    Err(format!("body does not contain {:?}", self.load.contains))
                }
            }
            _ => Ok(()),
        }
    }
}

/// The CGI response head: `Status:` (or an `HTTP/1.x` status line) and `Content-Length`.
fn parse_head(head: &[u8]) -> Result<(u16, Option<u64>), String> {
    let text = String::from_utf8_lossy(head);
    let mut status = None;
    let mut content_length = None;
    let mut location = false;
    for (n, line) in text
        .split('\n')
        .map(|l| l.trim_end_matches('\r'))
        .enumerate()
    {
        if n == 0 && line.starts_with("HTTP/") {
            status = line.split(' ').nth(1).and_then(|s| s.parse().ok());
            continue;
        }
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        let value = value.trim();
        match name.trim().to_ascii_lowercase().as_str() {
            "status" => {
                status = Some(
                    value
                        .split(' ')
                        .next()
                        .and_then(|s| s.parse().ok())
                        .ok_or_else(|| format!("bad Status header {value:?}"))?,
                )
            }
            "content-length" => {
                content_length = Some(
                    value
                        .parse()
                        .map_err(|_| format!("bad Content-Length {value:?}"))?,
                )
            }
            "location" => location = true,
            _ => {}
        }
    }
    // CGI: no Status header means 200, or 302 with a Location.
    let status = status.unwrap_or(if location { 302 } else { 200 });
    Ok((status, content_length))
}

/// Reads responses off one connection, keeping bytes that arrived past a response's end.
struct ResponseReader {
    buf: BytesMut,
    scratch: Vec<u8>,
}

impl ResponseReader {
    fn new() -> Self {
        ResponseReader {
            buf: BytesMut::with_capacity(READ_CHUNK),
            scratch: vec![0; READ_CHUNK],
        }
    }

    /// Reads the response to request `id` up to its END_REQUEST and checks it. Returns the
    /// response body's length.
    fn read(
        &mut self,
        conn: &mut Conn,
        id: u16,
        expected_status: u16,
        check: &mut BodyCheck,
    ) -> Result<u64, Failure> {
        let mut decoder = RecordDecoder;
        let mut head: Vec<u8> = Vec::new();
        let mut head_info: Option<(u16, Option<u64>)> = None;
        let mut body_len = 0u64;
        let mut stderr: Vec<u8> = Vec::new();
        loop {
            let record = match decoder.decode(&mut self.buf) {
                Ok(Some(record)) => record,
                Ok(None) => {
                    let n = conn
                        .read(&mut self.scratch)
                        .map_err(|e| Failure::io("reading the response", e))?;
                    if n == 0 {
                        return Err(Failure {
                            message: "connection closed before END_REQUEST".into(),
                            fatal: true,
                        });
                    }
                    self.buf.extend_from_slice(&self.scratch[..n]);
                    continue;
                }
                Err(e) => {
                    return Err(Failure {
                        message: format!("malformed response: {e}"),
                        fatal: true,
                    })
                }
            };
            if record.request_id() != id {
                return Err(Failure {
                    message: format!(
                        "record for request {} during request {id}: {record:?}",
                        record.request_id()
                    ),
                    fatal: true,
                });
            }
            match record {
                Record::Stdout { content, .. } => {
                    if head_info.is_some() {
                        body_len += content.len() as u64;
                        check.feed(&content);
                        continue;
                    }
                    head.extend_from_slice(&content);
                    let Some(end) = head.windows(4).position(|w| w == b"\r\n\r\n") else {
                        if head.len() > 64 * 1024 {
                            return Err(Failure::check("response head over 64 KiB"));
                        }
                        continue;
                    };
                    head_info = Some(parse_head(&head[..end]).map_err(Failure::check)?);
                    let rest = head.split_off(end + 4);
                    body_len += rest.len() as u64;
                    check.feed(&rest);
                }
                Record::Stderr { content, .. } => {
                    if stderr.len() < 4096 {
                        stderr.extend_from_slice(&content);
                    }
                }
                Record::EndRequest {
                    protocol_status, ..
                } => {
                    if protocol_status != 0 {
                        return Err(Failure::check(format!(
                            "END_REQUEST with protocol status {protocol_status}"
                        )));
                    }
                    break;
                }
                other => {
                    return Err(Failure {
                        message: format!("unexpected record {other:?}"),
                        fatal: true,
                    })
                }
            }
        }
        if !stderr.is_empty() {
            let text = String::from_utf8_lossy(&stderr);
            let first: String = text.chars().take(300).collect();
            return Err(Failure::check(format!("STDERR: {first}")));
        }
        let Some((status, content_length)) = head_info else {
            return Err(Failure::check(format!(
                "no complete response head (got {} bytes)",
                head.len()
            )));
        };
        if status != expected_status {
            return Err(Failure::check(format!(
                "status {status}, expected {expected_status}"
            )));
        }
        if let Some(cl) = content_length {
            if cl != body_len {
                return Err(Failure::check(format!(
                    "Content-Length {cl} but {body_len} body bytes"
                )));
            }
        }
        Ok(body_len)
    }
}

/// Sends one request on `conn` and reads and checks its response; returns the response body's
/// length.
fn exchange(
    conn: &mut Conn,
    reader: &mut ResponseReader,
    out: &mut BytesMut,
    template: &RequestTemplate,
    id: u16,
    check: &mut BodyCheck,
) -> Result<u64, Failure> {
    let expected_status = template.expected_status;
    out.clear();
    template.encode_head(out, id);
    let Some(body) = &template.body else {
        conn.write_all(out)
            .map_err(|e| Failure::io("writing the request", e))?;
        return reader.read(conn, id, expected_status, check);
    };
    if body.len <= INLINE_BODY {
        encode_body(out, body, id);
        conn.write_all(out)
            .map_err(|e| Failure::io("writing the request", e))?;
        return reader.read(conn, id, expected_status, check);
    }
    let mut writer = conn
        .try_clone()
        .map_err(|e| Failure::io("cloning the connection", e))?;
    let head = out.split().freeze();
    // No response is due while the body is still going out (a server may read it slowly), so
    // reads wait without the idle timeout here; the writer keeps its own, and --max-seconds
    // bounds the whole.
    conn.set_read_timeout(None)
        .map_err(|e| Failure::io("socket options", e))?;
    let result = thread::scope(|scope| {
        let sender = scope.spawn(move || -> io::Result<()> {
            writer.write_all(&head)?;
            let mut records = BytesMut::with_capacity(BodySource::MAX_SLICE + 64);
            body.for_each_slice(|slice| {
                records.clear();
                encode_stream(&mut records, RecordType::Stdin, id, slice);
                writer.write_all(&records)
            })?;
            records.clear();
            encode_end_of_stream(&mut records, RecordType::Stdin, id);
            writer.write_all(&records)
        });
        let response = reader.read(conn, id, expected_status, check);
        if response.is_err() {
            // Unblocks a writer stuck on a server that stopped reading.
            conn.shutdown();
        }
        let sent = sender.join().expect("the body writer panicked");
        match (response, sent) {
            (Err(failure), _) => Err(failure),
            (Ok(_), Err(e)) => Err(Failure::io("writing the body", e)),
            (Ok(len), Ok(())) => Ok(len),
        }
    });
    conn.set_read_timeout(Some(template.timeout))
        .map_err(|e| Failure::io("socket options", e))?;
    result
}

/// Appends a whole (small) body and its end as STDIN records.
fn encode_body(out: &mut BytesMut, body: &BodySource, id: u16) {
    body.for_each_slice(|slice| {
        encode_stream(out, RecordType::Stdin, id, slice);
        Ok(())
    })
    .expect("encoding cannot fail");
    encode_end_of_stream(out, RecordType::Stdin, id);
}

// ---------------------------------------------------------------------------------------------
// Clients

/// Where a client gets its connection from.
enum Link {
    /// The persistent stream to a spawned process; when it breaks, the client stops.
    Spawned(Option<Conn>),
    /// A listening server.
    Address {
        addr: String,
        per_request: bool,
        current: Option<Conn>,
    },
}

impl Link {
    /// The connection to use; a new one is also put in `slot` for the watchdog to shut down.
    fn conn(
        &mut self,
        timeout: Duration,
        wait: Option<Instant>,
        slot: &Mutex<Option<Conn>>,
    ) -> Result<&mut Conn, Failure> {
        match self {
            Link::Spawned(conn) => conn.as_mut().ok_or_else(|| Failure {
                message: "the process's stream is broken".into(),
                fatal: true,
            }),
            Link::Address { addr, current, .. } => {
                if current.is_none() {
                    let conn = connect_retrying(addr, timeout, wait)?;
                    *slot.lock().unwrap() = conn.try_clone().ok();
                    *current = Some(conn);
                }
                Ok(current.as_mut().expect("just connected"))
            }
        }
    }

    /// After a request: per-request connections are closed, broken ones dropped (with the
    /// watchdog's copy in `slot`, which would otherwise keep the socket open).
    fn after(&mut self, broken: bool, slot: &Mutex<Option<Conn>>) {
        match self {
            Link::Spawned(conn) => {
                if broken {
                    *conn = None;
                    *slot.lock().unwrap() = None;
                }
            }
            Link::Address {
                per_request,
                current,
                ..
            } => {
                if broken || *per_request {
                    *current = None;
                    *slot.lock().unwrap() = None;
                }
            }
        }
    }

    fn is_dead(&self) -> bool {
        matches!(self, Link::Spawned(None))
    }
}

fn connect_retrying(addr: &str, timeout: Duration, wait: Option<Instant>) -> Result<Conn, Failure> {
    loop {
        match Conn::connect(addr, timeout) {
            Ok(conn) => return Ok(conn),
            Err(e) => match wait {
                Some(until) if Instant::now() < until => {
                    thread::sleep(Duration::from_millis(20));
                }
                _ => return Err(Failure::io(&format!("connecting to {addr}"), e)),
            },
        }
    }
}

/// What one client measured.
#[derive(Default)]
struct ClientStats {
    ok: u64,
    latencies_ns: Vec<u64>,
    bytes_up: u64,
    bytes_down: u64,
    failures: u64,
    errors: BTreeMap<String, u64>,
}

impl ClientStats {
    fn fail(&mut self, message: String) {
        self.failures += 1;
        *self.errors.entry(message).or_default() += 1;
    }
}

/// Shared by the clients of a run.
struct RunControl {
    load: Load,
    template: RequestTemplate,
    warmup: RequestTemplate,
    timeout: Duration,
    /// Tickets for `--requests`.
    issued: AtomicU64,
    /// Set by the watchdog at `--max-seconds`.
    stop: AtomicBool,
    /// The clients and the watchdog start measuring together.
    start: Barrier,
    /// Each client's current connection, for the watchdog to shut down.
    slots: Vec<Mutex<Option<Conn>>>,
    connect_wait: Option<Duration>,
}

impl RunControl {
    fn may_start(&self, started: Instant) -> bool {
        if self.stop.load(Ordering::Relaxed) {
            return false;
        }
        if let Some(d) = self.load.duration {
            if started.elapsed().as_secs_f64() >= d {
                return false;
            }
        }
        match self.load.requests {
            Some(n) => self.issued.fetch_add(1, Ordering::Relaxed) < n,
            None => true,
        }
    }
}

/// One client: warm-up, wait for the others, then requests until the run ends. Returns its
/// stats and the instant it began measuring.
fn client(control: &RunControl, index: usize, mut link: Link) -> (ClientStats, Instant) {
    let mut stats = ClientStats::default();
    if let Some(cpu) = cpu_for(&control.load.cpus, index) {
        if let Err(e) = pin(0, cpu) {
            stats.fail(format!("cannot pin the client to CPU {cpu}: {e}"));
        }
    }
    let slot = &control.slots[index];
    if let Link::Spawned(Some(conn)) = &link {
        *slot.lock().unwrap() = conn.try_clone().ok();
    }
    let mut reader = ResponseReader::new();
    let mut out = BytesMut::with_capacity(64 * 1024);
    let mut id: u16 = 0;
    let mut next_id = || {
        // IIS's ids: 1, 2, ..., 255, 1, ...
        id = if id >= 255 { 1 } else { id + 1 };
        id
    };
    let sent = control
        .template
        .body
        .as_ref()
        .map(|b| (b.sha256.as_str(), b.len));

    let wait = control.connect_wait.map(|d| Instant::now() + d);
    for _ in 0..control.load.warmup {
        let mut check = BodyCheck::new(CheckKind::None, &control.load, None);
        let result = link.conn(control.timeout, wait, slot).and_then(|conn| {
            exchange(
                conn,
                &mut reader,
                &mut out,
                &control.warmup,
                next_id(),
                &mut check,
            )
        });
        let broken = match result {
            Ok(_) => false,
            Err(f) => {
                stats.fail(format!("warm-up: {}", f.message));
                f.fatal
            }
        };
        link.after(broken, slot);
    }

    control.start.wait();
    let started = Instant::now();
    while !link.is_dead() && control.may_start(started) {
        let begun = Instant::now();
        let mut check = BodyCheck::new(control.load.check, &control.load, sent);
        let result = link.conn(control.timeout, None, slot).and_then(|conn| {
            let received = exchange(
                conn,
                &mut reader,
                &mut out,
                &control.template,
                next_id(),
                &mut check,
            )?;
            check.verdict().map_err(Failure::check)?;
            if let Some(expected) = control.load.expect_length {
                if received != expected {
                    return Err(Failure::check(format!(
                        "{received} body bytes, expected {expected}"
                    )));
                }
            }
            Ok(received)
        });
        let elapsed = begun.elapsed();
        let broken = match result {
            Ok(received) => {
                stats.ok += 1;
                stats.latencies_ns.push(elapsed.as_nanos() as u64);
                stats.bytes_up += control.template.body_len();
                stats.bytes_down += received;
                false
            }
            Err(f) => {
                let message = if control.stop.load(Ordering::Relaxed) {
                    format!("stopped at --max-seconds: {}", f.message)
                } else {
                    f.message
                };
                stats.fail(message);
                f.fatal
            }
        };
        link.after(broken, slot);
    }
    (stats, started)
}

/// Runs the clients with a watchdog for `--max-seconds`; merges what they measured.
fn drive(control: Arc<RunControl>, links: Vec<Link>) -> Value {
    let (done_tx, done_rx) = mpsc::channel::<()>();
    let watchdog = {
        let control = control.clone();
        let limit = Duration::from_secs_f64(control.load.max_seconds);
        thread::spawn(move || {
            // The limit counts from the end of the warm-up: the watchdog is one more party to
            // the start barrier.
            control.start.wait();
            if let Err(mpsc::RecvTimeoutError::Timeout) = done_rx.recv_timeout(limit) {
                control.stop.store(true, Ordering::Relaxed);
                for slot in &control.slots {
                    if let Some(conn) = slot.lock().unwrap().as_ref() {
                        conn.shutdown();
                    }
                }
            }
        })
    };
    let handles: Vec<_> = links
        .into_iter()
        .enumerate()
        .map(|(i, link)| {
            let control = control.clone();
            thread::spawn(move || client(&control, i, link))
        })
        .collect();
    let results: Vec<(ClientStats, Instant)> = handles
        .into_iter()
        .map(|h| h.join().expect("a client panicked"))
        .collect();
    let finished = Instant::now();
    let _ = done_tx.send(());
    let _ = watchdog.join();

    let started = results.iter().map(|(_, s)| *s).min().unwrap_or(finished);
    let elapsed = finished.duration_since(started).as_secs_f64().max(1e-9);
    let mut total = ClientStats::default();
    for (stats, _) in results {
        total.ok += stats.ok;
        total.latencies_ns.extend(stats.latencies_ns);
        total.bytes_up += stats.bytes_up;
        total.bytes_down += stats.bytes_down;
        total.failures += stats.failures;
        for (message, n) in stats.errors {
            *total.errors.entry(message).or_default() += n;
        }
    }
    total.latencies_ns.sort_unstable();
    let ms = |ns: Option<u64>| ns.map(|v| v as f64 / 1e6);
    let mean = if total.latencies_ns.is_empty() {
        None
    } else {
        Some(total.latencies_ns.iter().sum::<u64>() / total.latencies_ns.len() as u64)
    };
    let errors: Vec<Value> = total
        .errors
        .iter()
        .take(8)
        .map(|(message, n)| json!({"count": n, "message": message}))
        .collect();
    json!({
        "label": control.load.label,
        "requests": total.ok,
        "failures": total.failures,
        "errors": errors,
        "timed_out": control.stop.load(Ordering::Relaxed),
        "elapsed_s": elapsed,
        "rps": total.ok as f64 / elapsed,
        "p50_ms": ms(percentile(&total.latencies_ns, 0.50)),
        "p99_ms": ms(percentile(&total.latencies_ns, 0.99)),
        "mean_ms": ms(mean),
        "body_bytes_up": total.bytes_up,
        "body_bytes_down": total.bytes_down,
        "mib_s_up": total.bytes_up as f64 / MIB / elapsed,
        "mib_s_down": total.bytes_down as f64 / MIB / elapsed,
        "cpus": control.load.cpus,
    })
}

/// Nearest-rank percentile of sorted values.
fn percentile(sorted: &[u64], p: f64) -> Option<u64> {
    if sorted.is_empty() {
        return None;
    }
    let rank = (p * sorted.len() as f64).ceil() as usize;
    Some(sorted[rank.clamp(1, sorted.len()) - 1])
}

fn control(load: Load, clients: usize, style: Style, keep_conn: bool) -> Arc<RunControl> {
    let body = (load.body_bytes > 0).then(|| Arc::new(BodySource::new(load.body_bytes)));
    let mut template = RequestTemplate::new(&load, &load.query, body, style);
    let warmup_query = load.warmup_query.clone().unwrap_or(load.query.clone());
    let mut warmup = RequestTemplate::new(&load, &warmup_query, None, style);
    template.keep_conn = keep_conn;
    warmup.keep_conn = keep_conn;
    Arc::new(RunControl {
        timeout: Duration::from_secs_f64(load.timeout),
        template,
        warmup,
        issued: AtomicU64::new(0),
        stop: AtomicBool::new(false),
        start: Barrier::new(clients + 1),
        slots: (0..clients).map(|_| Mutex::new(None)).collect(),
        connect_wait: None,
        load,
    })
}

fn cpu_for(cpus: &[usize], index: usize) -> Option<usize> {
    (!cpus.is_empty()).then(|| cpus[index % cpus.len()])
}

/// Restricts a thread or process (`pid` 0: the calling thread) to one CPU.
fn pin(pid: libc::pid_t, cpu: usize) -> io::Result<()> {
    // SAFETY: cpu_set_t is plain data, which CPU_SET writes only inside; sched_setaffinity reads
    // size_of::<cpu_set_t>() bytes of it.
    let result = unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(pid, std::mem::size_of::<libc::cpu_set_t>(), &set)
    };
    if result == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Peak resident set size of a process, in MiB, from VmHWM in /proc/PID/status.
fn peak_rss_mib(pid: u32) -> Option<f64> {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

fn add_rss(report: &mut Value, pids: &[u32]) {
    let each: Vec<Option<f64>> = pids.iter().map(|&pid| peak_rss_mib(pid)).collect();
    let peak = each
        .iter()
        .flatten()
        .cloned()
        .fold(None, |m: Option<f64>, v| Some(m.map_or(v, |m| m.max(v))));
    report["peak_rss_mib"] = json!(peak);
    report["peak_rss_mib_each"] = json!(each);
}

fn run_spawn(load: Load, processes: usize, command: Vec<String>) -> Result<Value, String> {
    let style = load.style.unwrap_or(Style::Iis);
    let control = control(load, processes, style, true);
    let mut children: Vec<Child> = Vec::new();
    let mut links = Vec::new();
    // Driver-side clones keep each stream open after its client ends, so the process is still
    // there (with its /proc entry) when its peak RSS is read.
    let mut keep_open = Vec::new();
    for i in 0..processes {
        let (ours, theirs) = UnixStream::pair().map_err(|e| format!("socketpair: {e}"))?;
        let mut process = Command::new(&command[0]);
        process
            .args(&command[1..])
            .stdin(Stdio::from(std::os::fd::OwnedFd::from(theirs)))
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        if let Some(cpu) = cpu_for(&control.load.cpus, i) {
            // SAFETY: the closure runs in the child between fork and exec, and makes only one
            // system call (async-signal-safe), so every thread the process starts inherits it.
            unsafe {
                process.pre_exec(move || pin(0, cpu));
            }
        }
        let child = process
            .spawn()
            .map_err(|e| format!("cannot start {:?}: {e}", command[0]))?;
        children.push(child);
        let conn = Conn::Unix(ours);
        conn.set_timeout(control.timeout)
            .map_err(|e| format!("socket options: {e}"))?;
        keep_open.push(conn.try_clone().map_err(|e| format!("dup: {e}"))?);
        links.push(Link::Spawned(Some(conn)));
    }
    let mut report = drive(control, links);
    let pids: Vec<u32> = children.iter().map(Child::id).collect();
    add_rss(&mut report, &pids);

    // Closing the stream is how IIS says goodbye (end of the pipe): the process should exit.
    drop(keep_open);
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut exits = Vec::new();
    for child in &mut children {
        let status = loop {
            match child.try_wait() {
                Ok(Some(status)) => break Some(status),
                Ok(None) if Instant::now() < deadline => thread::sleep(Duration::from_millis(10)),
                _ => {
                    let _ = child.kill();
                    let _ = child.wait();
                    break None;
                }
            }
        };
        exits.push(match status {
            Some(s) => json!(s.code()),
            None => json!("killed after 10 s"),
        });
    }
    report["mode"] = json!("spawn");
    report["processes"] = json!(processes);
    report["exit"] = json!(exits);
    Ok(report)
}

fn run_connect(
    load: Load,
    addr: String,
    concurrency: usize,
    per_request: bool,
    pids: Vec<u32>,
    connect_wait: f64,
) -> Result<Value, String> {
    let style = load.style.unwrap_or(Style::Nginx);
    let mut control = control(load, concurrency, style, !per_request);
    Arc::get_mut(&mut control)
        .expect("not shared yet")
        .connect_wait = Some(Duration::from_secs_f64(connect_wait));
    let links = (0..concurrency)
        .map(|_| Link::Address {
            addr: addr.clone(),
            per_request,
            current: None,
        })
        .collect();
    let mut report = drive(control, links);
    add_rss(&mut report, &pids);
    report["mode"] = json!("connect");
    report["concurrency"] = json!(concurrency);
    report["per_request"] = json!(per_request);
    Ok(report)
}
