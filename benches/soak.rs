//! Soak: mixed requests (GETs, POST bodies, application errors, aborts, slow clients) against
//! the release binary, over the IIS pattern (one persistent stream on fd 0) and over `--bind`
//! (several client threads, a connection per batch). Reports the gateway's RSS and open file
//! descriptors after warm-up and at the end, and every unexpected failure.
//!
//!     cargo bench --bench soak -- [REQUESTS]        (default 200000 per mode)

#[path = "../tests/common/mod.rs"]
mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use common::*;
use wfastcgi::protocol::{self, Record};

const APP: &str = r#"
import hashlib, time

def app(environ, start_response):
    path = environ["PATH_INFO"]
    if path == "/echo":
        data = environ["wsgi.input"].read()
        body = hashlib.sha256(data).hexdigest().encode()
    elif path == "/error":
        raise RuntimeError("soak: deliberate failure")
    elif path == "/stream":
        start_response("200 OK", [("Content-Type", "application/octet-stream")])
        return (b"s" * 16384 for _ in range(64))
    else:
        body = b"Hello, World!\n"
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]
"#;

/// What one request of the mix is, by its number.
#[derive(Clone, Copy)]
enum Kind {
    Hello,
    Echo,
    Error,
    /// A 1 MiB response the client aborts after its first record.
    Abort,
    /// A 1 MiB response read slowly.
    Slow,
}

fn kind(n: usize) -> Kind {
    match n % 100 {
        0 => Kind::Abort,
        1 => Kind::Slow,
        2..=6 => Kind::Error,
        7..=36 => Kind::Echo,
        _ => Kind::Hello,
    }
}

struct Sample {
    rss_kib: u64,
    fds: usize,
}

fn sample(pid: u32) -> Sample {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let rss_kib = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0);
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0);
    Sample { rss_kib, fds }
}

/// Sends request `n` of the mix with id `id`; true when the answer is what that kind expects.
fn one<S: std::io::Read + std::io::Write>(
    client: &mut Client<S>,
    app: &AppDir,
    n: usize,
    id: u16,
) -> bool {
    match kind(n) {
        Kind::Hello => client.get(id, &app.iis_params("GET", "/hello")).body == b"Hello, World!\n",
        Kind::Echo => {
            let body = bytes_of(1 + n % 20_000, n as u64);
            let mut params = app.iis_params("POST", "/echo");
            set_param(&mut params, "CONTENT_LENGTH", &body.len().to_string());
            let mut request = Send::new(id, &params).body(&body);
            request.stdin_record = 1 + n % 65535;
            client.request(&request).body == sha256_hex(&body).as_bytes()
        }
        Kind::Error => {
            let response = client.get(id, &app.iis_params("GET", "/error"));
            response.status == 500 && response.stderr_text().contains("soak: deliberate failure")
        }
        Kind::Abort => {
            client.send(&Send::new(id, &app.iis_params("GET", "/stream")));
            let Some(Record::Stdout { .. }) = client.read_record() else {
                return false;
            };
            let mut abort = BytesMut::new();
            protocol::encode_abort_request(&mut abort, id);
            client.write_raw(&abort);
            loop {
                match client.read_record() {
                    Some(Record::EndRequest { request_id, .. }) => return request_id == id,
                    Some(_) => {}
                    None => return false,
                }
            }
        }
        Kind::Slow => {
            client.send(&Send::new(id, &app.iis_params("GET", "/stream")));
            let mut stdout = Vec::new();
            loop {
                match client.read_record() {
                    Some(Record::Stdout { content, .. }) => {
                        stdout.extend_from_slice(&content);
                        std::thread::sleep(Duration::from_micros(300));
                    }
                    Some(Record::EndRequest { .. }) => {
                        let head = stdout.windows(4).position(|w| w == b"\r\n\r\n");
                        return head.is_some_and(|end| stdout.len() - end - 4 == 64 * 16384);
                    }
                    _ => return false,
                }
            }
        }
    }
}

fn report(
    mode: &str,
    requests: usize,
    failures: usize,
    started: Instant,
    warm: &Sample,
    end: &Sample,
) {
    println!(
        "{mode}: {requests} requests in {:.1} s, {failures} unexpected failures; RSS {:.1} MiB after warm-up, {:.1} MiB at the end (growth {:+.2} MiB); open fds {} -> {}",
        started.elapsed().as_secs_f64(),
        warm.rss_kib as f64 / 1024.0,
        end.rss_kib as f64 / 1024.0,
        (end.rss_kib as f64 - warm.rss_kib as f64) / 1024.0,
        warm.fds,
        end.fds
    );
}

fn soak_iis(app: &AppDir, requests: usize) {
    let mut gateway = Gateway::iis(&[]);
    let pid = gateway.child.id();
    let mut client = gateway.client();
    let warm_up = requests / 10;
    let mut failures = 0;
    let started = Instant::now();
    let mut warm = sample(pid);
    for n in 0..requests {
        if n == warm_up {
            warm = sample(pid);
        }
        let id = (n % 255 + 1) as u16;
        if !one(&mut client, app, n, id) {
            failures += 1;
        }
    }
    report(
        "IIS pattern",
        requests,
        failures,
        started,
        &warm,
        &sample(pid),
    );
}

fn soak_bind(app: &AppDir, requests: usize) {
    const CLIENTS: usize = 4;
    let gateway = Gateway::bind(Address::Tcp(any_port()), app.path(), &["--threads", "4"]);
    let pid = gateway.child.id();
    let next = Arc::new(AtomicUsize::new(0));
    let failures = Arc::new(AtomicUsize::new(0));
    let warm_up = requests / 10;
    let started = Instant::now();
    let warm = std::thread::scope(|scope| {
        for _ in 0..CLIENTS {
            let (next, failures, gateway) = (next.clone(), failures.clone(), &gateway);
            scope.spawn(move || loop {
                // A fresh connection every 50 requests; aborted ones are not reused.
                let mut client = gateway.connect();
                for _ in 0..50 {
                    let n = next.fetch_add(1, Ordering::Relaxed);
                    if n >= requests {
                        return;
                    }
                    if !one(&mut client, app, n, 1) {
                        failures.fetch_add(1, Ordering::Relaxed);
                    }
                }
            });
        }
        while next.load(Ordering::Relaxed) < warm_up {
            std::thread::sleep(Duration::from_millis(10));
        }
        sample(pid)
    });
    // Let idle connections close before counting descriptors.
    std::thread::sleep(Duration::from_millis(500));
    report(
        "--bind, 4 clients",
        requests,
        failures.load(Ordering::Relaxed),
        started,
        &warm,
        &sample(pid),
    );
}

fn main() {
    let requests: usize = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(200_000);
    let app = AppDir::new("soak.app", &[("WSGI_LOG_LEVEL", "info")]);
    std::fs::write(app.path().join("soak.py"), APP).expect("write soak.py");
    println!("soak: {requests} requests per mode, binary {BINARY}");
    soak_iis(&app, requests);
    soak_bind(&app, requests);
}
