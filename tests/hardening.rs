//! Faults found by attacking the binary as a hostile or broken client and a careless
//! administrator would (issue 13): slow and silent peers, odd record streams, a killed
//! supervisor, a burst across processes, restarts, unusual web.config files.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use wfastcgi::protocol::{Record, RecordDecoder, RecordType};

fn tcp(gateway: &Gateway) -> std::net::SocketAddr {
    match gateway.address.clone() {
        Some(Address::Tcp(address)) => address,
        other => panic!("a TCP gateway, not {other:?}"),
    }
}

/// A request on a new connection: its status, or 0 when nothing answers within `limit` (so a
/// test fails in seconds, not after the harness's minute).
fn get_within(address: std::net::SocketAddr, params: &[(String, String)], limit: Duration) -> u16 {
    let mut stream = TcpStream::connect(address).expect("connect");
    stream.set_read_timeout(Some(limit)).expect("timeout");
    stream
        .write_all(&Client::<Conn>::encode(&Send::new(1, params)))
        .expect("request");
    let mut status = 0;
    let mut buf = bytes::BytesMut::new();
    let mut chunk = [0u8; 65536];
    loop {
        while let Ok(Some(record)) = RecordDecoder.decode(&mut buf) {
            match record {
                Record::Stdout { content, .. } if status == 0 => {
                    status = String::from_utf8_lossy(&content)
                        .lines()
                        .find_map(|l| l.strip_prefix("Status: "))
                        .and_then(|s| s.get(..3))
                        .and_then(|s| s.parse().ok())
                        .unwrap_or(200);
                }
                Record::EndRequest { .. } => return status,
                _ => {}
            }
        }
        match stream.read(&mut chunk) {
            Ok(n) if n > 0 => buf.extend_from_slice(&chunk[..n]),
            _ => return 0,
        }
    }
}

/// Writes `bytes` one at a time, `pause` apart, until `stop`; whether it wrote them all.
fn trickle(
    address: std::net::SocketAddr,
    bytes: Vec<u8>,
    pause: Duration,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<bool> {
    std::thread::spawn(move || {
        let Ok(mut stream) = TcpStream::connect(address) else {
            return false;
        };
        for byte in bytes {
            if stop.load(Ordering::Relaxed) || stream.write_all(&[byte]).is_err() {
                return false;
            }
            std::thread::sleep(pause);
        }
        true
    })
}

fn record(record_type: RecordType, id: u16, content: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    push_record(&mut out, record_type, id, content, 0);
    out
}

fn get_values() -> Vec<u8> {
    let mut content = bytes::BytesMut::new();
    wfastcgi::protocol::encode_name_value(&mut content, b"FCGI_MAX_CONNS", b"");
    record(RecordType::GetValues, 0, &content)
}

/// Item 1: a head sent one byte every 50 ms (never a 200 ms pause), and a stream of valid
/// records that starts no request, on as many connections as there are threads: every other
/// request is still served, while they are still trickling.
#[test]
fn slow_heads_and_junk_records_do_not_hold_the_workers() {
    let app = AppDir::new("hello.app", &[]);
    let gateway = Gateway::bind(Address::Tcp(any_port()), app.path(), &["--threads", "2"]);
    let address = tcp(&gateway);
    let mut params = app.iis_params("GET", "/");
    // Long enough that the slow head takes minutes to complete.
    set_param(&mut params, "HTTP_X_PAD", &"p".repeat(3000));
    let slow_head = Client::<Conn>::encode(&Send::new(1, &params));
    let junk: Vec<u8> = (0..5000)
        .flat_map(|i| {
            if i % 2 == 0 {
                get_values()
            } else {
                // Type 99, unknown: answered FCGI_UNKNOWN_TYPE.
                vec![1, 99, 0, 0, 0, 8, 0, 0, 1, 2, 3, 4, 5, 6, 7, 8]
            }
        })
        .collect();
    let stop = Arc::new(AtomicBool::new(false));
    let pause = Duration::from_millis(50);
    let slow = trickle(address, slow_head, pause, stop.clone());
    let junk = trickle(address, junk, pause, stop.clone());
    std::thread::sleep(Duration::from_millis(500));
    let plain = app.iis_params("GET", "/");
    let served = (0..5)
        .filter(|_| get_within(address, &plain, Duration::from_secs(10)) == 200)
        .count();
    let still_trickling = !slow.is_finished() && !junk.is_finished();
    stop.store(true, Ordering::Relaxed);
    assert_eq!(served, 5, "requests answered beside the slow connections");
    assert!(still_trickling, "the slow connections were still sending");
    assert!(!slow.join().expect("slow"), "stopped before the end");
    junk.join().expect("junk");
}

/// Item 1, the I/O thread's side: a head still arriving after WSGI_HEADER_TIMEOUT has its
/// connection closed (nginx's `client_header_timeout`), however steadily it trickles.
#[test]
fn a_head_slower_than_the_header_timeout_is_closed() {
    let app = AppDir::new("hello.app", &[("WSGI_HEADER_TIMEOUT", "1")]);
    let gateway = Gateway::bind(Address::Tcp(any_port()), app.path(), &["--threads", "1"]);
    let mut stream = TcpStream::connect(tcp(&gateway)).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(20)))
        .expect("timeout");
    let mut writer = stream.try_clone().expect("clone");
    let head = Client::<Conn>::encode(&Send::new(1, &app.iis_params("GET", "/")));
    let trickle = std::thread::spawn(move || {
        for byte in head {
            if writer.write_all(&[byte]).is_err() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    });
    let mut byte = [0u8; 1];
    let closed = matches!(stream.read(&mut byte), Ok(0) | Err(_)) && {
        let log = app.wait_for_log("WSGI_HEADER_TIMEOUT");
        log.contains("request head not complete within 1s (WSGI_HEADER_TIMEOUT)")
    };
    drop(stream);
    trickle.join().expect("trickle");
    assert!(closed, "{}", app.log());
}

/// Item 2: a web server that never reads a large response is cut off after WSGI_SEND_TIMEOUT
/// (logged), so the only worker serves the next request; one that reads slowly but steadily
/// gets the whole response.
#[test]
fn a_peer_that_never_reads_is_closed_and_a_slow_reader_is_not() {
    let app = AppDir::new("stream.app", &[("WSGI_SEND_TIMEOUT", "2")]);
    let gateway = Gateway::bind(Address::Tcp(any_port()), app.path(), &["--threads", "1"]);
    let address = tcp(&gateway);
    // 64 MiB that nobody reads.
    let mut silent = gateway.connect();
    silent.send(&Send::new(1, &app.iis_params("GET", "/?n=1024&size=65536")));
    // GET_VALUES whose answers nobody reads, from a thread (its writes block in turn).
    let flooder = std::thread::spawn(move || {
        let Ok(mut stream) = TcpStream::connect(address) else {
            return;
        };
        let flood: Vec<u8> = (0..20_000).flat_map(|_| get_values()).collect();
        let _ = stream.write_all(&flood);
        let _ = stream.write_all(&flood);
    });
    std::thread::sleep(Duration::from_millis(300));
    let small = app.iis_params("GET", "/?n=1&size=5");
    assert_eq!(get_within(address, &small, Duration::from_secs(20)), 200);
    let log = app.wait_for_log("took nothing for 2s (WSGI_SEND_TIMEOUT)");
    assert!(
        log.contains("took nothing for 2s (WSGI_SEND_TIMEOUT)"),
        "{log}"
    );
    flooder.join().expect("flooder");
    drop(silent);

    // 8 MiB read 1 MiB at a time with a pause of 500 ms after each: 4 s in all, twice the
    // time-out, but never a pause as long as the time-out.
    let mut stream = TcpStream::connect(address).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(20)))
        .expect("timeout");
    let large = app.iis_params("GET", "/?n=128&size=65536");
    stream
        .write_all(&Client::<Conn>::encode(&Send::new(1, &large)))
        .expect("request");
    let mut buf = bytes::BytesMut::new();
    let mut chunk = vec![0u8; 1 << 16];
    let (mut body, mut ended, mut since_pause) = (0, false, 0);
    while !ended {
        match stream.read(&mut chunk) {
            Ok(n) if n > 0 => buf.extend_from_slice(&chunk[..n]),
            _ => break,
        }
        while let Some(record) = RecordDecoder.decode(&mut buf).expect("valid records") {
            match record {
                Record::Stdout { content, .. } => body += content.len(),
                Record::EndRequest { .. } => ended = true,
                _ => {}
            }
        }
        if body >= since_pause + (1 << 20) {
            since_pause = body;
            std::thread::sleep(Duration::from_millis(500));
        }
    }
    assert!(
        ended,
        "the slow reader got the whole response:\n{}",
        app.log()
    );
    assert!(body > 128 * 65536, "{body} bytes");
}

/// A pause between PARAMS records, so the gateway reads them one at a time.
const PACE: Duration = Duration::from_micros(50);

/// A request whose every parameter is a PARAMS record of its own, each in its own write,
/// `PACE` apart.
fn send_pair_per_record(client: &mut impl Write, id: u16, params: &[(String, String)]) {
    let mut begin = bytes::BytesMut::new();
    wfastcgi::protocol::encode_begin_request(
        &mut begin,
        id,
        wfastcgi::protocol::Role::Responder,
        true,
    );
    client
        .write_all(&record(RecordType::BeginRequest, id, &begin[8..]))
        .expect("write");
    for (name, value) in params {
        let mut pair = bytes::BytesMut::new();
        wfastcgi::protocol::encode_name_value(&mut pair, name.as_bytes(), value.as_bytes());
        client
            .write_all(&record(RecordType::Params, id, &pair))
            .expect("write");
        std::thread::sleep(PACE);
    }
    let end = [
        record(RecordType::Params, id, b""),
        record(RecordType::Stdin, id, b""),
    ]
    .concat();
    client.write_all(&end).expect("write");
}

/// Item 3: 5 000 tiny parameters (13 bytes each), each in a record of its own, cost about
/// their size, not a read buffer each (16-64 KiB: 80-320 MB), on either path a request can
/// take, request after request.
#[test]
fn tiny_params_records_do_not_multiply_memory() {
    let app = AppDir::new("hello.app", &[]);
    let gateway = Gateway::bind(Address::Tcp(any_port()), app.path(), &["--threads", "1"]);
    let pid = gateway.child.id();
    let mut params = app.iis_params("GET", "/");
    for i in 0..5000 {
        params.push((format!("HTTP_X{i:04}"), "v".to_owned()));
    }
    // The peak so far is the start-up's.
    let start = peak_rss_mib(pid);
    for _ in 0..3 {
        let mut client = gateway.connect();
        send_pair_per_record(&mut client.stream, 1, &params);
        assert_eq!(client.read_response(1).status, 200);
    }
    let mut iis = Gateway::iis(&[]);
    let mut client = iis.client();
    for id in 1..=3 {
        send_pair_per_record(&mut client.stream, id, &params);
        assert_eq!(client.read_response(id).status, 200);
    }
    let (bind_peak, iis_peak) = (peak_rss_mib(pid), peak_rss_mib(iis.child.id()));
    assert!(
        bind_peak < start + 20.0,
        "bind mode: {start:.0} MiB at the start, peak {bind_peak:.0} MiB"
    );
    assert!(
        iis_peak < start + 20.0,
        "IIS stream: peak {iis_peak:.0} MiB"
    );
}

/// `serve --processes 2 --threads THREADS`, once both workers are ready.
fn two_processes(app: &AppDir, threads: &str) -> Gateway {
    let gateway = Gateway::bind(
        Address::Tcp(any_port()),
        app.path(),
        &["--processes", "2", "--threads", threads],
    );
    wait_for_count(app, "ready (pid", 2);
    gateway
}

fn process_alive(pid: u32) -> bool {
    // A zombie has no memory map left: only a running process counts.
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .is_ok_and(|status| !status.contains("State:\tZ"))
}

/// Item 4: after the supervisor is killed outright its workers drain and exit, so the port is
/// free for the next start.
#[test]
fn workers_exit_when_the_supervisor_is_killed() {
    let app = AppDir::new("hello.app", &[]);
    let mut gateway = two_processes(&app, "1");
    let address = tcp(&gateway);
    let workers: Vec<u32> = app
        .log()
        .split("ready (pid ")
        .skip(1)
        .filter_map(|rest| rest.split(')').next()?.parse().ok())
        .collect();
    assert_eq!(workers.len(), 2, "{}", app.log());
    gateway.signal(libc::SIGKILL);
    gateway.wait_exit(Duration::from_secs(10)).expect("killed");
    let deadline = Instant::now() + Duration::from_secs(20);
    while workers.iter().any(|pid| process_alive(*pid)) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    let alive: Vec<_> = workers.iter().filter(|pid| process_alive(**pid)).collect();
    for pid in &alive {
        // SAFETY: kill(2) on a leftover worker of the gateway under test.
        unsafe { libc::kill(**pid as i32, libc::SIGKILL) };
    }
    assert!(
        alive.is_empty(),
        "workers {alive:?} outlived the supervisor"
    );
    // The port is free: a new supervisor binds it (Gateway::bind waits until it listens).
    drop(Gateway::bind(
        Address::Tcp(address),
        app.path(),
        &["--processes", "2"],
    ));
}

/// Item 5: a burst of 16 one-second requests on two processes of two threads, with a queue of
/// one: each process takes only what its threads can start, so no request is refused while the
/// other process has a free thread, and both serve.
#[test]
fn processes_share_a_burst_without_a_503() {
    let app = AppDir::new("concurrency.sleepy", &[("WSGI_QUEUE_LENGTH", "1")]);
    let gateway = two_processes(&app, "2");
    let params = app.iis_params("GET", "/?sleep=0.5");
    let clients: Vec<_> = (0..16)
        .map(|_| {
            let mut client = gateway.connect();
            let params = params.clone();
            std::thread::spawn(move || client.get(1, &params))
        })
        .collect();
    let responses: Vec<Response> = clients
        .into_iter()
        .map(|c| c.join().expect("client"))
        .collect();
    let refused = responses.iter().filter(|r| r.status == 503).count();
    let mut pids: Vec<String> = responses.iter().map(Response::text).collect();
    pids.sort();
    pids.dedup();
    assert_eq!(refused, 0, "503s while the other process had free threads");
    assert_eq!(pids.len(), 2, "both processes served: {pids:?}");
}

/// Starts `binary serve --bind unix:DIR/gateway.sock --app-dir DIR` and waits until it listens.
fn serve_unix(binary: &Path, app: &AppDir) -> Gateway {
    let socket = app.path().join("gateway.sock");
    let child = Command::new(binary)
        .args(["serve", "--bind"])
        .arg(format!("unix:{}", socket.display()))
        .arg("--app-dir")
        .arg(app.path())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start wfastcgi");
    let gateway = Gateway {
        child,
        stream: None,
        address: Some(Address::Unix(socket.clone())),
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::os::unix::net::UnixStream::connect(&socket).is_err() {
        assert!(Instant::now() < deadline, "not listening:\n{}", app.log());
        std::thread::sleep(Duration::from_millis(25));
    }
    gateway
}

fn wait_for_count(app: &AppDir, needle: &str, count: usize) -> String {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let log = app.log();
        if log.matches(needle).count() >= count || Instant::now() > deadline {
            return log;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn write_config(app: &AppDir, settings: &[(&str, &str)]) {
    let log = app.path().join("wfastcgi.log");
    let mut adds = format!(
        "<add key=\"WSGI_HANDLER\" value=\"environment.app\"/>\
         <add key=\"PYTHONPATH\" value=\"{}\"/>\
         <add key=\"WSGI_LOG\" value=\"{}\"/>",
        apps_dir().display(),
        log.display()
    );
    for (key, value) in settings {
        adds.push_str(&format!("<add key=\"{key}\" value=\"{value}\"/>"));
    }
    let xml = format!("<configuration><appSettings>{adds}</appSettings></configuration>");
    std::fs::write(app.path().join("web.config"), xml).expect("web.config");
}

/// Items 6 and 7: an in-place restart sees web.config as it is now (a removed setting is gone
/// from the new process), and a 200 KB setting does not make the re-exec fail.
#[test]
fn a_restart_reflects_web_config_as_it_is_now() {
    let app = AppDir::new("environment.app", &[]);
    let big = "b".repeat(200_000);
    write_config(&app, &[("FOO", "bar"), ("BIG", &big)]);
    let gateway = serve_unix(Path::new(BINARY), &app);
    app.wait_for_log("watching");
    let params = app.iis_params("GET", "/");
    let env = gateway.connect().get(1, &params).json();
    assert_eq!(env["FOO"], "bar");
    assert_eq!(env["BIG"].as_str().map(str::len), Some(200_000));

    write_config(&app, &[("BIG", &big)]);
    let log = wait_for_count(&app, "watching", 2);
    assert_eq!(log.matches("watching").count(), 2, "restarted:\n{log}");
    let env = gateway.connect().get(1, &params).json();
    assert!(env.get("FOO").is_none(), "a removed setting lives on");
    assert_eq!(env["BIG"].as_str().map(str::len), Some(200_000));
}

/// `serve_unix` with a copy of the binary in the app folder (for a test to replace), once it
/// watches for changes; the gateway and the copy's path.
fn serve_a_copy(app: &AppDir) -> (Gateway, PathBuf) {
    let copy = app.path().join("wfastcgi-copy");
    std::fs::copy(BINARY, &copy).expect("copy the binary");
    let gateway = serve_unix(&copy, app);
    app.wait_for_log("watching");
    (gateway, copy)
}

/// Item 7: a restart the binary cannot make (it was deleted) is logged, and the process keeps
/// serving instead of draining into an exec that fails; once a binary is installed at the path
/// again (renamed over it, as deploys do), the next change restarts into it.
#[test]
fn a_restart_that_cannot_happen_keeps_serving() {
    let app = AppDir::new("hello.app", &[]);
    let (mut gateway, copy) = serve_a_copy(&app);
    std::fs::remove_file(&copy).expect("delete the binary");
    std::fs::write(app.path().join("app.py"), "# changed\n").expect("touch");
    let log = app.wait_for_log("cannot restart");
    assert!(log.contains("app.py changed"), "{log}");
    assert!(log.contains("but the process cannot restart"), "{log}");
    assert!(
        gateway.wait_exit(Duration::from_millis(500)).is_none(),
        "{log}"
    );
    let params = app.iis_params("GET", "/");
    assert_eq!(gateway.connect().get(1, &params).status, 200);

    let staged = app.path().join("wfastcgi-new");
    std::fs::copy(BINARY, &staged).expect("stage the binary");
    std::fs::rename(&staged, &copy).expect("install the binary");
    std::fs::write(app.path().join("app.py"), "# changed again\n").expect("touch");
    let log = wait_for_count(&app, "WSGI handler \"hello.app\" loaded", 2);
    assert!(
        log.contains("restarting: the listening socket stays open"),
        "{log}"
    );
    assert_eq!(gateway.connect().get(1, &params).status, 200);
}

/// Item 7: a binary at the path that passes the check but cannot be executed (still open for
/// writing, as while a deploy copies it: ETXTBSY) fails the exec after the drain; the running
/// binary is executed instead, and serves on.
#[test]
fn a_restart_whose_exec_fails_runs_the_running_binary() {
    let app = AppDir::new("hello.app", &[]);
    let (mut gateway, copy) = serve_a_copy(&app);
    let staged = app.path().join("wfastcgi-new");
    std::fs::copy(BINARY, &staged).expect("stage the binary");
    let still_writing = std::fs::OpenOptions::new()
        .append(true)
        .open(&staged)
        .expect("open for writing");
    std::fs::rename(&staged, &copy).expect("install the binary");
    std::fs::write(app.path().join("app.py"), "# changed\n").expect("touch");
    let log = wait_for_count(&app, "WSGI handler \"hello.app\" loaded", 2);
    drop(still_writing);
    assert!(
        log.contains("restarting the running binary instead"),
        "{log}"
    );
    assert!(
        gateway.wait_exit(Duration::from_millis(300)).is_none(),
        "{log}"
    );
    let params = app.iis_params("GET", "/");
    assert_eq!(gateway.connect().get(1, &params).status, 200);
}

/// Item 8: a web.config in UTF-16 with a byte-order mark (Windows PowerShell 5.1's `Out-File`)
/// is read, little- and big-endian.
#[test]
fn a_utf16_web_config_is_read() {
    for big_endian in [false, true] {
        let app = AppDir::new("hello.app", &[]);
        let config = app.path().join("web.config");
        let text = std::fs::read_to_string(&config)
            .expect("web.config")
            .replace("utf-8", "utf-16");
        let mut bytes = if big_endian {
            vec![0xFE, 0xFF]
        } else {
            vec![0xFF, 0xFE]
        };
        for unit in text.encode_utf16() {
            let pair = if big_endian {
                unit.to_be_bytes()
            } else {
                unit.to_le_bytes()
            };
            bytes.extend_from_slice(&pair);
        }
        std::fs::write(&config, bytes).expect("write");
        let gateway = serve_unix(Path::new(BINARY), &app);
        let response = gateway.connect().get(1, &app.iis_params("GET", "/"));
        assert_eq!(response.text(), "Hello, World!\n");
    }
}

/// `serve` in `dir`, with the address space capped so a web.config read without end fails
/// instead of taking the machine's memory: its exit status and standard error.
fn serve_and_fail(dir: &Path) -> (Option<std::process::ExitStatus>, String) {
    let mut command = Command::new(BINARY);
    command
        .args(["serve", "--bind", "127.0.0.1:0", "--app-dir"])
        .arg(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    // SAFETY: setrlimit is async-signal-safe and allocates nothing.
    unsafe {
        command.pre_exec(|| {
            let limit = libc::rlimit {
                rlim_cur: 1 << 30,
                rlim_max: 1 << 30,
            };
            libc::setrlimit(libc::RLIMIT_AS, &limit);
            Ok(())
        });
    }
    let mut child = command.spawn().expect("start wfastcgi");
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Ok(Some(status)) = child.try_wait() {
            break Some(status);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut stderr = String::new();
    if let Some(mut pipe) = child.stderr.take() {
        let _ = pipe.read_to_string(&mut stderr);
    }
    (status, stderr)
}

/// Item 9: a web.config over IIS's default size limit (here 300 000 settings, 9 MB, which took
/// quadratic time) and one that never ends (a link to /dev/zero) are refused at once, saying why.
#[test]
fn an_oversized_or_endless_web_config_is_refused() {
    let huge = tempfile::tempdir().expect("temporary folder");
    let adds: String = (0..300_000)
        .map(|i| format!("<add key=\"K{i}\" value=\"v\"/>\n"))
        .collect();
    std::fs::write(
        huge.path().join("web.config"),
        format!("<configuration><appSettings>\n{adds}</appSettings></configuration>"),
    )
    .expect("write");
    let endless = tempfile::tempdir().expect("temporary folder");
    std::os::unix::fs::symlink("/dev/zero", endless.path().join("web.config")).expect("link");
    for dir in [huge.path(), endless.path()] {
        let (status, stderr) = serve_and_fail(dir);
        assert!(status.is_some_and(|s| !s.success()), "{status:?}: {stderr}");
        assert!(stderr.contains("larger than 250 KB"), "{stderr}");
    }
}

/// Smaller: IIS sends no REQUEST_URI; log lines still name the path.
#[test]
fn log_lines_name_the_path_without_request_uri() {
    let app = AppDir::new("errors.call_error", &[]);
    let mut gateway = Gateway::iis(&[]);
    let mut params = app.iis_params("GET", "/shop/cart?item=3");
    params.retain(|(k, _)| k != "REQUEST_URI");
    assert_eq!(gateway.client().get(1, &params).status, 500);
    let log = app.wait_for_log("failed");
    assert!(log.contains("GET /shop/cart?item=3 failed"), "{log}");
}

/// Smaller: the polling watcher logs a symlink loop once, not on every scan.
#[test]
fn a_symlink_loop_is_logged_once() {
    let app = AppDir::new("hello.app", &[("WSGI_WATCHER_POLL", "0.1")]);
    std::os::unix::fs::symlink(app.path(), app.path().join("loop")).expect("link");
    let gateway = Gateway::bind(Address::Tcp(any_port()), app.path(), &[]);
    app.wait_for_log("watching");
    std::thread::sleep(Duration::from_millis(1500));
    let log = app.log();
    let errors = log.matches("file watcher error").count();
    assert!(errors <= 1, "{errors} watcher error lines:\n{log}");
    drop(gateway);
}

/// Smaller: out of descriptors, a failing accept is logged once per burst, and the idle kept
/// connections are closed so new ones are taken.
#[test]
fn out_of_descriptors_is_logged_once_and_idle_connections_reclaimed() {
    let app = AppDir::new("hello.app", &[]);
    let gateway = Gateway::bind(Address::Tcp(any_port()), app.path(), &["--threads", "2"]);
    let address = tcp(&gateway);
    let pid = gateway.child.id();
    let params = app.iis_params("GET", "/");
    // Warm up (the first request may open files), then allow 4 more descriptors.
    assert_eq!(get_within(address, &params, Duration::from_secs(20)), 200);
    std::thread::sleep(Duration::from_millis(300));
    // A new descriptor takes the lowest free number, and fails at the limit: the fifth free
    // number lets exactly four more be opened.
    let used: Vec<u64> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("descriptors")
        .flatten()
        .filter_map(|entry| entry.file_name().to_str()?.parse().ok())
        .collect();
    let fifth_free = (0..)
        .filter(|n| !used.contains(n))
        .nth(4)
        .expect("a free number");
    let limit = libc::rlimit {
        rlim_cur: fifth_free,
        rlim_max: fifth_free,
    };
    // SAFETY: prlimit(2) on our own child, with a valid rlimit.
    let set = unsafe {
        libc::prlimit(
            pid as i32,
            libc::RLIMIT_NOFILE,
            &limit,
            std::ptr::null_mut(),
        )
    };
    assert_eq!(set, 0, "prlimit");
    // Four connections whose heads stall half-way hold the four descriptors; they are not
    // idle, so nothing may close them.
    let mut request = Send::new(1, &params);
    request.keep_conn = false;
    let request = Client::<Conn>::encode(&request);
    let mut stalled: Vec<Client<Conn>> = (0..4)
        .map(|_| {
            let mut client = gateway.connect();
            client.write_raw(&request[..20]);
            client
        })
        .collect();
    std::thread::sleep(Duration::from_millis(500));
    let waiting = TcpStream::connect(address).expect("connect");
    std::thread::sleep(Duration::from_millis(1500));
    let failures = app.log().matches("accept failed").count();
    assert_eq!(failures, 1, "{}", app.log());
    // One stalled head completes: its connection ends, and the waiting one is taken.
    let mut last = stalled.pop().expect("a stalled client");
    last.write_raw(&request[20..]);
    assert_eq!(last.read_response(1).status, 200);
    waiting
        .set_read_timeout(Some(Duration::from_secs(20)))
        .expect("timeout");
    let mut waiting = Client::new(Conn::Tcp(waiting));
    assert_eq!(waiting.get(1, &params).status, 200);
    // Idle kept connections now hold every descriptor; a new connection takes one back.
    drop(stalled);
    std::thread::sleep(Duration::from_millis(300));
    let kept: Vec<Client<Conn>> = (0..3)
        .map(|_| {
            let mut client = gateway.connect();
            assert_eq!(client.get(1, &params).status, 200);
            client
        })
        .collect();
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(get_within(address, &params, Duration::from_secs(20)), 200);
    assert!(
        app.log().contains("idle connection closed"),
        "{}",
        app.log()
    );
    drop((kept, waiting));
}
