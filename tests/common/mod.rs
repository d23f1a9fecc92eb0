//! A FastCGI client and process harness for the integration tests: it starts the real binary the
//! way IIS does (fd 0 = one end of a socketpair, stdout/stderr closed), on a socket it binds, or
//! with a listening socket on fd 0, and talks to it over real sockets.
#![allow(dead_code)] // each test file uses a different part of the harness

pub mod web;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use sha2::{Digest, Sha256};
use wfastcgi::protocol::{self, Record, RecordDecoder, RecordType, Role};

pub const BINARY: &str = env!("CARGO_BIN_EXE_wfastcgi");
const IO_TIMEOUT: Duration = Duration::from_secs(60);

pub fn apps_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/apps")
}

pub fn sha256_hex(data: &[u8]) -> String {
    Sha256::digest(data)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// A temporary application folder with a web.config naming a handler from tests/apps.
pub struct AppDir {
    pub dir: tempfile::TempDir,
}

impl AppDir {
    pub fn new(handler: &str, settings: &[(&str, &str)]) -> AppDir {
        let dir = tempfile::tempdir().expect("temporary folder");
        let log = dir.path().join("wfastcgi.log");
        let apps = apps_dir();
        let mut all = vec![
            ("WSGI_HANDLER", handler.to_owned()),
            ("PYTHONPATH", apps.to_string_lossy().into_owned()),
            ("WSGI_LOG", log.to_string_lossy().into_owned()),
            ("WSGI_LOG_LEVEL", "debug".to_owned()),
        ];
        for (key, value) in settings {
            all.retain(|(k, _)| k != key);
            all.push((key, (*value).to_owned()));
        }
        let adds: String = all
            .iter()
            .map(|(k, v)| format!("    <add key=\"{k}\" value=\"{}\" />\n", xml_escape(v)))
            .collect();
        let config = format!("<?xml version=\"1.0\" encoding=\"utf-8\"?>\n<configuration>\n  <appSettings>\n{adds}  </appSettings>\n</configuration>\n");
        std::fs::write(dir.path().join("web.config"), config).expect("write web.config");
        AppDir { dir }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.path().join("wfastcgi.log")).unwrap_or_default()
    }

    /// Waits until the log contains `needle` (the log is written by a background thread).
    pub fn wait_for_log(&self, needle: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let log = self.log();
            if log.contains(needle) || Instant::now() > deadline {
                return log;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The parameters IIS 10 sends for a request to `url` (path and query) in this app.
    pub fn iis_params(&self, method: &str, url: &str) -> Vec<(String, String)> {
        iis_params(self.path(), method, url)
    }
}

fn xml_escape(value: &str) -> String {
    value
        .replace('&', "&amp;")
        .replace('"', "&quot;")
        .replace('<', "&lt;")
}

pub fn iis_params(app_dir: &Path, method: &str, url: &str) -> Vec<(String, String)> {
    let (path, query) = url.split_once('?').unwrap_or((url, ""));
    let app = format!("{}/", app_dir.display());
    [
        ("URL", path),
        ("SERVER_SOFTWARE", "Microsoft-IIS/10.0"),
        ("SERVER_PROTOCOL", "HTTP/1.1"),
        ("SERVER_PORT_SECURE", "0"),
        ("SERVER_PORT", "80"),
        ("SERVER_NAME", "localhost"),
        ("SCRIPT_NAME", path),
        ("SCRIPT_FILENAME", "C:\\inetpub\\site\\handler.fcgi"),
        ("REQUEST_URI", url),
        ("REQUEST_METHOD", method),
        ("REMOTE_USER", ""),
        ("REMOTE_PORT", "50000"),
        ("REMOTE_HOST", "127.0.0.1"),
        ("REMOTE_ADDR", "127.0.0.1"),
        ("QUERY_STRING", query),
        ("PATH_TRANSLATED", "C:\\inetpub\\site"),
        ("LOCAL_ADDR", "127.0.0.1"),
        ("INSTANCE_META_PATH", "/LM/W3SVC/1"),
        ("INSTANCE_ID", "1"),
        ("HTTPS", "off"),
        ("GATEWAY_INTERFACE", "CGI/1.1"),
        ("DOCUMENT_ROOT", "C:\\inetpub\\site"),
        ("APPL_PHYSICAL_PATH", &app),
        ("APPL_MD_PATH", "/LM/W3SVC/1/ROOT"),
        ("PATH_INFO", path),
        ("HTTP_HOST", "localhost"),
        ("HTTP_USER_AGENT", "wfastcgi-tests"),
    ]
    .iter()
    .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
    .collect()
}

/// Sets (or adds) a parameter.
pub fn set_param(params: &mut Vec<(String, String)>, name: &str, value: &str) {
    params.retain(|(k, _)| k != name);
    params.push((name.to_owned(), value.to_owned()));
}

/// A running gateway process.
pub struct Gateway {
    pub child: Child,
    /// The client end of the IIS-style stream, when started that way.
    pub stream: Option<UnixStream>,
    pub address: Option<Address>,
}

#[derive(Clone, Debug)]
pub enum Address {
    Tcp(std::net::SocketAddr),
    Unix(PathBuf),
}

impl Gateway {
    /// Starts the binary as IIS does: fd 0 is a duplex stream, stdout and stderr are closed.
    pub fn iis(envs: &[(&str, &str)]) -> Gateway {
        let (ours, theirs) = UnixStream::pair().expect("socketpair");
        ours.set_read_timeout(Some(IO_TIMEOUT)).expect("timeout");
        let mut command = Command::new(BINARY);
        command
            .stdin(Stdio::from(OwnedFd::from(theirs)))
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        for (k, v) in envs {
            command.env(k, v);
        }
        let child = command.spawn().expect("start wfastcgi");
        Gateway {
            child,
            stream: Some(ours),
            address: None,
        }
    }

    /// Starts `wfastcgi serve --bind ADDR --app-dir DIR` plus `args`, and waits until it listens.
    /// For a TCP port 0 (see [`any_port`]) the gateway picks a free port, read from its log
    /// (WSGI_LOG in DIR's web.config): no other test can take it in between.
    pub fn bind(address: Address, app_dir: &Path, args: &[&str]) -> Gateway {
        let bind = match &address {
            Address::Tcp(addr) => addr.to_string(),
            Address::Unix(path) => format!("unix:{}", path.display()),
        };
        let child = Command::new(BINARY)
            .args(["serve", "--bind", &bind, "--app-dir"])
            .arg(app_dir)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start wfastcgi");
        let address = match address {
            Address::Tcp(addr) if addr.port() == 0 => Address::Tcp(port_from_log(app_dir)),
            other => other,
        };
        let gateway = Gateway {
            child,
            stream: None,
            address: Some(address),
        };
        gateway.wait_listening();
        gateway
    }

    /// Starts the binary with a listening TCP socket as fd 0 (IIS Tcp, FCGI_LISTENSOCK_FILENO).
    pub fn inherited_listener(app_dir: &Path) -> Gateway {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let address = listener.local_addr().expect("address");
        let child = Command::new(BINARY)
            .arg("--app-dir")
            .arg(app_dir)
            .stdin(Stdio::from(OwnedFd::from(listener)))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start wfastcgi");
        Gateway {
            child,
            stream: None,
            address: Some(Address::Tcp(address)),
        }
    }

    fn wait_listening(&self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if self.try_connect().is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(25));
        }
        panic!("wfastcgi did not start listening on {:?}", self.address);
    }

    fn try_connect(&self) -> std::io::Result<Conn> {
        let conn = match self.address.as_ref().expect("a bound gateway") {
            Address::Tcp(addr) => Conn::Tcp(TcpStream::connect(addr)?),
            Address::Unix(path) => Conn::Unix(UnixStream::connect(path)?),
        };
        conn.set_read_timeout(IO_TIMEOUT);
        Ok(conn)
    }

    /// A new connection to a bound gateway.
    pub fn connect(&self) -> Client<Conn> {
        Client::new(self.try_connect().expect("connect"))
    }

    /// With one thread and `WSGI_QUEUE_LENGTH=1`: sends the slow request `params` twice, one to
    /// run and one to wait in the queue (each given time to get there), so the next request
    /// finds no room. Returns both connections, still to be read.
    pub fn fill_the_thread_and_the_queue(
        &self,
        params: &[(String, String)],
    ) -> (Client<Conn>, Client<Conn>) {
        let mut running = self.connect();
        running.send(&Send::new(1, params));
        std::thread::sleep(Duration::from_millis(300));
        let mut queued = self.connect();
        queued.send(&Send::new(1, params));
        std::thread::sleep(Duration::from_millis(300));
        (running, queued)
    }

    /// The IIS-style stream as a client.
    pub fn client(&mut self) -> Client<UnixStream> {
        let stream = self
            .stream
            .as_ref()
            .expect("an IIS-style gateway")
            .try_clone()
            .expect("clone stream");
        Client::new(stream)
    }

    /// Closes our end of the IIS stream, as IIS does when it is done with the process.
    pub fn close_stream(&mut self) {
        self.stream.take();
    }

    pub fn signal(&self, signal: i32) {
        // SAFETY: kill(2) on our own child's pid.
        unsafe {
            libc::kill(self.child.id() as i32, signal);
        }
    }

    pub fn wait_exit(&mut self, limit: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `127.0.0.1:0`: let the gateway pick its port ([`Gateway::bind`] reads it from the log).
pub fn any_port() -> std::net::SocketAddr {
    std::net::SocketAddr::from(([127, 0, 0, 1], 0))
}

/// The port of the first `listening on 127.0.0.1:PORT` line of the app folder's log.
fn port_from_log(app_dir: &Path) -> std::net::SocketAddr {
    const LINE: &str = "listening on 127.0.0.1:";
    let log = app_dir.join("wfastcgi.log");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        let port = text.split(LINE).nth(1).and_then(|rest| {
            let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
            digits.parse::<u16>().ok()
        });
        if let Some(port) = port {
            return std::net::SocketAddr::from(([127, 0, 0, 1], port));
        }
        assert!(
            Instant::now() < deadline,
            "no {LINE:?} line in {}:\n{text}",
            log.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A port free now, for servers other than the gateway (nginx, Apache...); it may be taken by
/// the time they bind, which is rare.
pub fn free_tcp_address() -> std::net::SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    listener.local_addr().expect("address")
}

/// A connection of either kind.
pub enum Conn {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Conn {
    fn set_read_timeout(&self, timeout: Duration) {
        let _ = match self {
            Conn::Tcp(s) => s.set_read_timeout(Some(timeout)),
            Conn::Unix(s) => s.set_read_timeout(Some(timeout)),
        };
    }
}

impl Read for Conn {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Conn::Tcp(s) => s.read(buf),
            Conn::Unix(s) => s.read(buf),
        }
    }
}

impl Write for Conn {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            Conn::Tcp(s) => s.write(buf),
            Conn::Unix(s) => s.write(buf),
        }
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// A parsed FastCGI response.
#[derive(Debug, Default)]
pub struct Response {
    pub request_id: u16,
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    pub stderr: Vec<u8>,
    pub app_status: u32,
    pub protocol_status: u8,
    /// STDOUT records received (to check record splitting and the absence of empty ones).
    pub stdout_records: Vec<usize>,
}

impl Response {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn stderr_text(&self) -> String {
        String::from_utf8_lossy(&self.stderr).into_owned()
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("response is not JSON ({e}): {}", self.text()))
    }
}

/// How to send a request.
#[derive(Clone)]
pub struct Send<'a> {
    pub request_id: u16,
    pub keep_conn: bool,
    pub params: &'a [(String, String)],
    pub body: &'a [u8],
    /// STDIN records carry at most this many bytes.
    pub stdin_record: usize,
    /// Padding added to every record.
    pub padding: u8,
}

impl<'a> Send<'a> {
    pub fn new(request_id: u16, params: &'a [(String, String)]) -> Self {
        Send {
            request_id,
            keep_conn: true,
            params,
            body: b"",
            stdin_record: 65535,
            padding: 0,
        }
    }

    pub fn body(mut self, body: &'a [u8]) -> Self {
        self.body = body;
        self
    }
}

pub struct Client<S> {
    pub stream: S,
    buf: BytesMut,
}

impl<S: Read + Write> Client<S> {
    pub fn new(stream: S) -> Self {
        Client {
            stream,
            buf: BytesMut::new(),
        }
    }

    /// Writes bytes; a peer that has already closed is left for the next read to report.
    pub fn write_raw(&mut self, bytes: &[u8]) {
        if let Err(e) = self.stream.write_all(bytes) {
            assert!(is_closed_error(&e), "write to wfastcgi: {e}");
        }
    }

    /// Sends FCGI_ABORT_REQUEST for `id`.
    pub fn abort(&mut self, id: u16) {
        let mut abort = BytesMut::new();
        wfastcgi::protocol::encode_abort_request(&mut abort, id);
        self.write_raw(&abort);
    }

    /// Encodes a whole request (BEGIN, PARAMS, empty PARAMS, STDIN..., empty STDIN).
    pub fn encode(request: &Send<'_>) -> Vec<u8> {
        let mut out = Vec::new();
        let mut begin = BytesMut::new();
        protocol::encode_begin_request(
            &mut begin,
            request.request_id,
            Role::Responder,
            request.keep_conn,
        );
        push_record(
            &mut out,
            RecordType::BeginRequest,
            request.request_id,
            &begin[8..],
            request.padding,
        );
        let mut params = BytesMut::new();
        for (k, v) in request.params {
            protocol::encode_name_value(&mut params, k.as_bytes(), v.as_bytes());
        }
        for chunk in params.chunks(65535) {
            push_record(
                &mut out,
                RecordType::Params,
                request.request_id,
                chunk,
                request.padding,
            );
        }
        push_record(
            &mut out,
            RecordType::Params,
            request.request_id,
            b"",
            request.padding,
        );
        for chunk in request.body.chunks(request.stdin_record.max(1)) {
            push_record(
                &mut out,
                RecordType::Stdin,
                request.request_id,
                chunk,
                request.padding,
            );
        }
        push_record(
            &mut out,
            RecordType::Stdin,
            request.request_id,
            b"",
            request.padding,
        );
        out
    }

    pub fn send(&mut self, request: &Send<'_>) {
        let bytes = Self::encode(request);
        self.write_raw(&bytes);
    }

    pub fn request(&mut self, request: &Send<'_>) -> Response {
        self.send(request);
        self.read_response(request.request_id)
    }

    pub fn get(&mut self, request_id: u16, params: &[(String, String)]) -> Response {
        self.request(&Send::new(request_id, params))
    }

    /// The next record, or None at end of stream.
    pub fn read_record(&mut self) -> Option<Record> {
        let mut decoder = RecordDecoder;
        loop {
            if let Some(record) = decoder
                .decode(&mut self.buf)
                .expect("valid record from wfastcgi")
            {
                return Some(record);
            }
            let mut chunk = [0u8; 65536];
            let n = match self.stream.read(&mut chunk) {
                Ok(n) => n,
                Err(e) if is_closed_error(&e) => 0,
                Err(e) => panic!("read from wfastcgi: {e}"),
            };
            if n == 0 {
                assert!(
                    self.buf.is_empty(),
                    "wfastcgi closed the stream inside a record"
                );
                return None;
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }

    /// Reads records until END_REQUEST for `request_id`; other ids' records fail the test.
    pub fn read_response(&mut self, request_id: u16) -> Response {
        let mut stdout = Vec::new();
        let mut response = Response {
            request_id,
            ..Default::default()
        };
        loop {
            let record = self
                .read_record()
                .expect("wfastcgi closed the stream before END_REQUEST");
            assert_eq!(
                record.request_id(),
                request_id,
                "record for another request: {record:?}"
            );
            match record {
                Record::Stdout { content, .. } => {
                    response.stdout_records.push(content.len());
                    stdout.extend_from_slice(&content);
                }
                Record::Stderr { content, .. } => response.stderr.extend_from_slice(&content),
                Record::EndRequest {
                    app_status,
                    protocol_status,
                    ..
                } => {
                    response.app_status = app_status;
                    response.protocol_status = protocol_status;
                    break;
                }
                other => panic!("unexpected record {other:?}"),
            }
        }
        parse_cgi(&stdout, &mut response);
        response
    }

    /// True when the gateway closed the connection (EOF) within the read timeout.
    pub fn is_closed(&mut self) -> bool {
        self.read_record().is_none()
    }
}

fn is_closed_error(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::BrokenPipe | std::io::ErrorKind::ConnectionReset
    )
}

pub fn push_record(
    out: &mut Vec<u8>,
    record_type: RecordType,
    id: u16,
    content: &[u8],
    padding: u8,
) {
    let mut header = BytesMut::new();
    protocol::encode_header(&mut header, record_type, id, content.len() as u16, padding);
    out.extend_from_slice(&header);
    out.extend_from_slice(content);
    out.extend(std::iter::repeat_n(0u8, padding as usize));
}

fn parse_cgi(stdout: &[u8], response: &mut Response) {
    let Some(split) = stdout.windows(4).position(|w| w == b"\r\n\r\n") else {
        response.body = stdout.to_vec();
        return;
    };
    let head = String::from_utf8_lossy(&stdout[..split]).into_owned();
    for line in head.split("\r\n") {
        if let Some((name, value)) = line.split_once(':') {
            let value = value.trim();
            if name.eq_ignore_ascii_case("Status") {
                response.status = value[..3].parse().unwrap_or(0);
            }
            response.headers.push((name.to_owned(), value.to_owned()));
        }
    }
    if response.status == 0 {
        response.status = 200;
    }
    response.body = stdout[split + 4..].to_vec();
}

/// Deterministic pseudo-random numbers for record splits.
pub struct XorShift(pub u64);

impl XorShift {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

pub fn bytes_of(len: usize, seed: u64) -> Vec<u8> {
    let mut rng = XorShift(seed | 1);
    (0..len).map(|_| rng.next() as u8).collect()
}

/// The process's peak resident memory (VmHWM) in MiB.
pub fn peak_rss_mib(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("process status");
    let kib: f64 = status
        .lines()
        .find_map(|line| line.strip_prefix("VmHWM:"))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmHWM in /proc/PID/status");
    kib / 1024.0
}

/// Sends request 1 with a body of `total` bytes (1 MiB pieces of [`bytes_of`]) on `writer` from
/// a thread, as IIS streams an upload: the head, then STDIN records as fast as the gateway takes
/// them.
pub fn stream_upload(
    mut writer: impl Write + std::marker::Send + 'static,
    params: &[(String, String)],
    total: usize,
) -> std::thread::JoinHandle<()> {
    let header_only = Client::<UnixStream>::encode(&Send::new(1, params));
    // Everything but the body's end.
    let head_len = header_only.len() - protocol::HEADER_LEN;
    std::thread::spawn(move || {
        writer.write_all(&header_only[..head_len]).expect("write");
        let mut records = Vec::new();
        for piece in upload_chunk().chunks(65535) {
            push_record(&mut records, RecordType::Stdin, 1, piece, 0);
        }
        for _ in 0..total / UPLOAD_CHUNK {
            writer.write_all(&records).expect("write body");
        }
        let mut end = Vec::new();
        push_record(&mut end, RecordType::Stdin, 1, b"", 0);
        writer.write_all(&end).expect("write end");
    })
}

const UPLOAD_CHUNK: usize = 1024 * 1024;

fn upload_chunk() -> Vec<u8> {
    bytes_of(UPLOAD_CHUNK, 5)
}

/// The SHA-256 (hex) of the body [`stream_upload`] sends.
pub fn upload_sha256(total: usize) -> String {
    let chunk = upload_chunk();
    let mut digest = Sha256::default();
    for _ in 0..total / UPLOAD_CHUNK {
        digest.update(&chunk);
    }
    digest
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Requests on a fresh connection each (without FCGI_KEEP_CONN) in a loop until `stop` (or a
/// minute): the number answered and the number that failed, and the thread.
pub fn keep_requesting(
    address: Address,
    params: Vec<(String, String)>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> (
    std::sync::Arc<std::sync::atomic::AtomicUsize>,
    std::sync::Arc<std::sync::atomic::AtomicUsize>,
    std::thread::JoinHandle<()>,
) {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    let ok = Arc::new(AtomicUsize::new(0));
    let failed = Arc::new(AtomicUsize::new(0));
    let (answered, broken) = (ok.clone(), failed.clone());
    let handle = std::thread::spawn(move || {
        let deadline = Instant::now() + Duration::from_secs(60);
        while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
            let Address::Tcp(addr) = &address else {
                panic!("keep_requesting needs a TCP address")
            };
            let good = TcpStream::connect(addr).ok().is_some_and(|stream| {
                stream.set_read_timeout(Some(Duration::from_secs(20))).ok();
                let mut client = Client::new(stream);
                let mut request = Send::new(1, &params);
                request.keep_conn = false;
                client.send(&request);
                matches!(client.read_record(), Some(Record::Stdout { .. }))
            });
            if good { &answered } else { &broken }.fetch_add(1, Ordering::Relaxed);
        }
    });
    (ok, failed, handle)
}

/// The child processes of `pid` (a supervisor's workers), by `pgrep -P`.
pub fn children(pid: u32) -> Vec<u32> {
    let output = std::process::Command::new("pgrep")
        .args(["-P", &pid.to_string()])
        .output()
        .expect("pgrep");
    String::from_utf8_lossy(&output.stdout)
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect()
}

/// Starts the handler under the IIS pattern and sends one GET.
pub fn answer(handler: &str, settings: &[(&str, &str)]) -> (AppDir, Gateway, Response) {
    let app = AppDir::new(handler, settings);
    let mut gateway = Gateway::iis(&[]);
    let response = gateway.client().get(1, &app.iis_params("GET", "/"));
    (app, gateway, response)
}

/// A 500 with the detail on FCGI_STDERR (what IIS shows), the detail in the log, and a
/// process that still answers the next request the same way.
pub fn assert_500(handler: &str, detail: &str) {
    let (app, mut gateway, response) = answer(handler, &[]);
    assert_eq!(response.status, 500, "{handler}: {}", response.text());
    assert_eq!(response.text(), "Internal Server Error\n");
    assert!(
        response.stderr_text().contains(detail),
        "{handler}: stderr {:?}",
        response.stderr_text()
    );
    assert_eq!(response.protocol_status, 0);
    let log = app.wait_for_log(detail);
    assert!(
        log.contains(detail),
        "{handler}: log lacks {detail:?}:\n{log}"
    );
    let again = gateway.client().get(2, &app.iis_params("GET", "/"));
    assert_eq!(again.status, 500, "{handler}: still serving");
}

/// An app whose `WSGI_LOG` can never be opened (a path below a regular file), and the folder
/// holding that file, which must outlive the app.
pub fn app_with_an_unopenable_log(handler: &str) -> (AppDir, AppDir) {
    let holder = AppDir::new(handler, &[]);
    let bad = holder.path().join("web.config").join("wfastcgi.log");
    let app = AppDir::new(handler, &[("WSGI_LOG", bad.to_str().expect("utf-8"))]);
    (holder, app)
}

/// The first request is a 500 that says the log cannot be opened; the next is served.
pub fn assert_log_problem_reported_once<S: Read + Write>(client: &mut Client<S>, app: &AppDir) {
    let first = client.get(1, &app.iis_params("GET", "/"));
    assert_eq!(first.status, 500);
    assert!(
        first.text().contains("cannot be opened"),
        "{}",
        first.text()
    );
    assert_eq!(client.get(2, &app.iis_params("GET", "/")).status, 200);
}
