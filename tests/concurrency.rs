//! One process serving many connections (threads, a bounded queue), several processes under a
//! supervisor, socket activation, and who may connect.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;

#[test]
fn four_threads_serve_four_requests_at_once() {
    let app = AppDir::new("concurrency.barrier", &[]);
    let gateway = Gateway::bind(Address::Tcp(any_port()), app.path(), &["--threads", "4"]);
    let params = app.iis_params("GET", "/");
    let clients: Vec<_> = (0..4)
        .map(|_| {
            let mut client = gateway.connect();
            let params = params.clone();
            std::thread::spawn(move || client.get(1, &params))
        })
        .collect();
    for client in clients {
        let response = client.join().expect("client");
        // With fewer than four threads the barrier times out and the app fails with a 500.
        assert_eq!(response.text(), "met", "{}", response.stderr_text());
    }
    let env = {
        let app = AppDir::new("hello.environ_app", &[]);
        let gateway = Gateway::bind(Address::Tcp(any_port()), app.path(), &["--threads", "4"]);
        gateway.connect().get(1, &app.iis_params("GET", "/")).json()
    };
    assert_eq!(env["wsgi.multithread"], true);
    assert_eq!(env["wsgi.multiprocess"], false);
}

#[test]
fn a_full_queue_answers_503_at_once() {
    let app = AppDir::new("concurrency.sleepy", &[("WSGI_QUEUE_LENGTH", "1")]);
    let gateway = Gateway::bind(Address::Tcp(any_port()), app.path(), &["--threads", "1"]);
    let params = app.iis_params("GET", "/?sleep=3");
    // One request runs, one waits in the queue, the third finds no room.
    let (mut running, mut queued) = gateway.fill_the_thread_and_the_queue(&params);
    let refused = gateway.connect().get(1, &params);
    assert_eq!(refused.status, 503);
    assert_eq!(refused.header("Retry-After"), Some("1"));
    assert_eq!(running.read_response(1).status, 200);
    assert_eq!(queued.read_response(1).status, 200);
    assert!(app
        .log()
        .contains("every worker is busy and the queue is full"));
}

#[test]
fn the_supervisor_replaces_a_killed_worker_and_restarts_on_sighup() {
    let app = AppDir::new("concurrency.sleepy", &[]);
    let mut gateway = Gateway::bind(
        Address::Tcp(any_port()),
        app.path(),
        &["--processes", "2", "--threads", "2"],
    );
    let address = gateway.address.clone().expect("address");
    let deadline = Instant::now() + Duration::from_secs(30);
    while app.log().matches("ready (pid").count() < 2 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    let workers = children(gateway.child.id());
    assert_eq!(workers.len(), 2, "two workers: {workers:?}\n{}", app.log());
    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failed, handle) =
        keep_requesting(address, app.iis_params("GET", "/?sleep=0.01"), stop.clone());
    std::thread::sleep(Duration::from_millis(500));
    // SIGKILL one worker mid-load: only its request in flight may fail.
    // SAFETY: kill(2) on a child process of the gateway under test.
    unsafe { libc::kill(workers[0] as i32, libc::SIGKILL) };
    let log = app.wait_for_log("exited: signal: 9");
    assert!(log.contains("starting a new one"), "{log}");
    let deadline = Instant::now() + Duration::from_secs(30);
    while app.log().matches("ready (pid").count() < 3 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    let after_kill = children(gateway.child.id());
    assert_eq!(after_kill.len(), 2, "replaced: {after_kill:?}");
    assert!(!after_kill.contains(&workers[0]));
    std::thread::sleep(Duration::from_millis(500));
    let failures_after_kill = failed.load(Ordering::Relaxed);
    assert!(
        failures_after_kill <= 2,
        "{failures_after_kill} failures (one per killed connection at most)"
    );

    // SIGHUP replaces both workers one at a time, without failing a request.
    gateway.signal(libc::SIGHUP);
    let log = app.wait_for_log("every worker replaced");
    assert!(log.contains("SIGHUP"), "{log}");
    std::thread::sleep(Duration::from_millis(500));
    stop.store(true, Ordering::Relaxed);
    handle.join().expect("load");
    assert_eq!(
        failed.load(Ordering::Relaxed),
        failures_after_kill,
        "no failure during the rolling restart"
    );
    assert!(ok.load(Ordering::Relaxed) > 20);
    let replaced = children(gateway.child.id());
    assert!(
        replaced.iter().all(|pid| !after_kill.contains(pid)),
        "{replaced:?} vs {after_kill:?}"
    );

    gateway.signal(libc::SIGTERM);
    let status = gateway.wait_exit(Duration::from_secs(30)).expect("stops");
    assert!(status.success());
    assert!(children(gateway.child.id()).is_empty());
}

#[test]
fn web_server_addrs_refuses_other_peers() {
    let app = AppDir::new(
        "hello.app",
        &[("FCGI_WEB_SERVER_ADDRS", "10.9.8.7, 10.9.8.6")],
    );
    let gateway = Gateway::bind(Address::Tcp(any_port()), app.path(), &[]);
    let mut client = gateway.connect();
    client.send(&Send::new(1, &app.iis_params("GET", "/")));
    assert!(client.is_closed(), "refused");
    assert!(app
        .wait_for_log("refused")
        .contains("connection from 127.0.0.1 refused: not in FCGI_WEB_SERVER_ADDRS"));

    let app = AppDir::new(
        "hello.app",
        &[("FCGI_WEB_SERVER_ADDRS", "10.9.8.7,127.0.0.1")],
    );
    let gateway = Gateway::bind(Address::Tcp(any_port()), app.path(), &[]);
    assert_eq!(
        gateway.connect().get(1, &app.iis_params("GET", "/")).status,
        200
    );
}

#[test]
fn unix_sockets_mode_live_and_stale() {
    let app = AppDir::new("hello.app", &[]);
    let path = app.path().join("gw.sock");
    let gateway = Gateway::bind(
        Address::Unix(path.clone()),
        app.path(),
        &["--socket-mode", "0600"],
    );
    let mode = std::fs::metadata(&path)
        .expect("socket")
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o600);
    // A second gateway on the same live socket is refused with a clear error.
    let output = Command::new(BINARY)
        .args([
            "serve",
            "--bind",
            &format!("unix:{}", path.display()),
            "--app-dir",
        ])
        .arg(app.path())
        .output()
        .expect("run");
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("is in use by a live socket"));
    drop(gateway);
    // The dead gateway left its socket file: the next one replaces it.
    assert!(path.exists());
    let gateway = Gateway::bind(Address::Unix(path.clone()), app.path(), &[]);
    assert_eq!(
        gateway.connect().get(1, &app.iis_params("GET", "/")).status,
        200
    );
    let mode = std::fs::metadata(&path)
        .expect("socket")
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o660, "the default mode");
}

#[test]
fn systemd_socket_activation() {
    let app = AppDir::new("hello.app", &[]);
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let address = listener.local_addr().expect("address");
    let fd = std::os::fd::AsRawFd::as_raw_fd(&listener);
    let mut command = Command::new("sh");
    // LISTEN_PID must be the gateway's own pid: the shell's, which exec keeps.
    command
        .args([
            "-c",
            "LISTEN_PID=$$ LISTEN_FDS=1 exec \"$0\" serve --app-dir \"$1\"",
            BINARY,
        ])
        .arg(app.path())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    // SAFETY: only dup2/fcntl between fork and exec. dup2 onto itself would keep
    // close-on-exec, so an fd that already is 3 has the flag cleared instead.
    unsafe {
        command.pre_exec(move || {
            let inherited = if fd == 3 {
                libc::fcntl(3, libc::F_SETFD, 0)
            } else {
                libc::dup2(fd, 3)
            };
            if inherited < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = command.spawn().expect("start");
    drop(listener);
    let gateway = Gateway {
        child,
        stream: None,
        address: Some(Address::Tcp(address)),
    };
    let mut client = gateway.connect();
    assert_eq!(
        client.get(1, &app.iis_params("GET", "/")).text(),
        "Hello, World!\n"
    );
}

/// A request on a new connection is answered 200 within `limit`, though `behind` holds a
/// connection of the gateway's only worker.
fn assert_served_within(
    gateway: &Gateway,
    params: &[(String, String)],
    limit: Duration,
    behind: &str,
) {
    let started = Instant::now();
    assert_eq!(gateway.connect().get(1, params).status, 200);
    assert!(
        started.elapsed() < limit,
        "a request waited {:?} behind {behind}",
        started.elapsed()
    );
}

/// Listening, an idle worker accepts connections itself; one with no request arriving is handed
/// back to the I/O thread, so it cannot hold the only worker, and is still served later.
#[test]
fn a_quiet_connection_does_not_hold_the_only_worker() {
    let app = AppDir::new("hello.app", &[]);
    let gateway = Gateway::bind(Address::Tcp(any_port()), app.path(), &["--threads", "1"]);
    let params = app.iis_params("GET", "/");
    let mut quiet = gateway.connect();
    std::thread::sleep(Duration::from_millis(50));
    assert_served_within(
        &gateway,
        &params,
        Duration::from_secs(5),
        "a quiet connection",
    );
    // The quiet connection, now with the I/O thread, still takes requests, pauses between them
    // included.
    for request_id in 1..=3 {
        assert_eq!(quiet.get(request_id, &params).status, 200);
        std::thread::sleep(Duration::from_millis(300));
    }
}

/// Without FCGI_KEEP_CONN the connection closes after the response; a body the application did
/// not read is drained first, so closing cannot reset the connection under the web server while
/// it is still writing the body (it would lose the response).
#[test]
fn an_unread_body_does_not_cut_the_response() {
    let app = AppDir::new("hello.app", &[]);
    let gateway = Gateway::bind(Address::Tcp(any_port()), app.path(), &["--threads", "1"]);
    let Some(Address::Tcp(address)) = gateway.address.clone() else {
        panic!("a TCP gateway");
    };
    let params = app.iis_params("POST", "/");
    let body = bytes_of(8 << 20, 3);
    for _ in 0..3 {
        let stream = std::net::TcpStream::connect(address).expect("connect");
        stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .expect("timeout");
        let mut request = Send::new(1, &params).body(&body);
        request.keep_conn = false;
        let bytes = Client::<Conn>::encode(&request);
        let mut writer = stream.try_clone().expect("clone");
        // A pause mid-body: the worker finds nothing more to drain and hands the rest over.
        let sender = std::thread::spawn(move || {
            let (first, rest) = bytes.split_at(bytes.len() / 2);
            std::io::Write::write_all(&mut writer, first)?;
            std::thread::sleep(Duration::from_millis(300));
            std::io::Write::write_all(&mut writer, rest)
        });
        let mut client = Client::new(Conn::Tcp(stream));
        let response = client.read_response(1);
        assert_eq!(response.status, 200);
        assert_eq!(response.text(), "Hello, World!\n");
        sender
            .join()
            .expect("writer")
            .expect("the whole body was taken");
        assert!(client.is_closed(), "closed once the body was drained");
    }
}

/// A request head that stalls half-way (one byte, then a pause) goes to the I/O thread with the
/// bytes read so far, so it neither holds the only worker nor loses its start.
#[test]
fn a_stalled_request_head_does_not_hold_the_only_worker() {
    let app = AppDir::new("hello.app", &[]);
    let gateway = Gateway::bind(Address::Tcp(any_port()), app.path(), &["--threads", "1"]);
    let params = app.iis_params("GET", "/");
    let request = Client::<Conn>::encode(&Send::new(7, &params));
    let mut slow = gateway.connect();
    // The first byte, then the BEGIN_REQUEST record and part of the parameters.
    slow.write_raw(&request[..1]);
    std::thread::sleep(Duration::from_millis(300));
    slow.write_raw(&request[1..request.len() / 2]);
    std::thread::sleep(Duration::from_millis(300));
    assert_served_within(&gateway, &params, Duration::from_secs(5), "a stalled head");
    slow.write_raw(&request[request.len() / 2..]);
    let response = slow.read_response(7);
    assert_eq!(response.status, 200);
    assert_eq!(response.text(), "Hello, World!\n");
}

/// A body the application did not read (here refused with 413 before it is read), still
/// trickling in on a kept connection, is drained by the I/O thread, not by the only worker; the
/// connection then serves its next request.
#[test]
fn a_trickling_unread_body_does_not_hold_the_only_worker() {
    let app = AppDir::new("hello.app", &[("WSGI_MAX_BODY", "10")]);
    let gateway = Gateway::bind(Address::Tcp(any_port()), app.path(), &["--threads", "1"]);
    let get = app.iis_params("GET", "/");
    let mut post = app.iis_params("POST", "/");
    set_param(&mut post, "CONTENT_LENGTH", "1000");
    let body = vec![b'x'; 1000];
    let request = Client::<Conn>::encode(&Send::new(1, &post).body(&body));
    let head_and_some = request.len() - 1000 + 100;
    let mut trickle = gateway.connect();
    trickle.write_raw(&request[..head_and_some]);
    assert_eq!(trickle.read_response(1).status, 413);
    let writer = {
        let Conn::Tcp(stream) = &trickle.stream else {
            panic!("a TCP connection");
        };
        let mut stream = stream.try_clone().expect("clone");
        let rest = request[head_and_some..].to_vec();
        std::thread::spawn(move || {
            for piece in rest.chunks(100) {
                std::thread::sleep(Duration::from_millis(100));
                std::io::Write::write_all(&mut stream, piece).expect("body");
            }
        })
    };
    let limit = Duration::from_millis(800);
    assert_served_within(&gateway, &get, limit, "a trickling body");
    writer.join().expect("writer");
    assert_eq!(trickle.get(2, &get).status, 200);
}
