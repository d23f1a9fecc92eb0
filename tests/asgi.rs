//! ASGI 3 applications: detection, the HTTP scope, receive()/send() streaming with backpressure,
//! lifespan, errors, pathsend and requests in flight at once. Raw ASGI apps in tests/apps/asgi_app.py
//! (and asgi_errors.py) run under the real binary, IIS-style on fd 0 and on --bind.

mod common;

use common::*;

fn unix_address(app: &AppDir) -> Address {
    Address::Unix(app.path().join("fcgi.sock"))
}

#[test]
fn hello_over_the_iis_stream() {
    let app = AppDir::new("asgi_app.app", &[]);
    let mut gateway = Gateway::iis(&[]);
    let mut client = gateway.client();
    for id in 1..=3 {
        let response = client.get(id, &app.iis_params("GET", "/hello"));
        assert_eq!(response.status, 200, "{}", response.stderr_text());
        assert_eq!(response.text(), "Hello, ASGI!\n");
        assert_eq!(response.header("content-type"), Some("text/plain"));
    }
    let log = app.wait_for_log("ASGI handler");
    assert!(log.contains("coroutine function"), "{log}");
}

/// A receive() cancelled while it waits loses nothing: the next one gets its piece of the body.
#[test]
fn a_cancelled_receive_keeps_its_piece_of_the_body() {
    let app = AppDir::new("asgi_app.cancelled_receive_app", &[]);
    let body = bytes_of(300_000, 8);
    let mut params = app.iis_params("POST", "/");
    set_param(&mut params, "CONTENT_LENGTH", &body.len().to_string());
    let mut gateway = Gateway::iis(&[]);
    let json = gateway
        .client()
        .request(&Send::new(1, &params).body(&body))
        .json();
    assert_eq!(json["sha256"], sha256_hex(&body).as_str(), "IIS stream");
    let gateway = Gateway::bind(Address::Tcp(any_port()), app.path(), &[]);
    let json = gateway
        .connect()
        .request(&Send::new(1, &params).body(&body))
        .json();
    assert_eq!(json["sha256"], sha256_hex(&body).as_str(), "--bind");
}

#[test]
fn hello_and_echo_over_bind() {
    let app = AppDir::new("asgi_app.echo_app", &[]);
    for address in [unix_address(&app), Address::Tcp(any_port())] {
        let gateway = Gateway::bind(address, app.path(), &[]);
        let mut client = gateway.connect();
        let body = bytes_of(300_000, 3);
        let mut params = app.iis_params("POST", "/echo");
        set_param(&mut params, "CONTENT_LENGTH", &body.len().to_string());
        let response = client.request(&Send::new(1, &params).body(&body));
        let json = response.json();
        assert_eq!(json["length"], body.len(), "{}", response.stderr_text());
        assert_eq!(json["sha256"], sha256_hex(&body).as_str());
        assert!(json["chunks"].as_u64().unwrap_or(0) > 1, "{json}");
        drop(gateway);
    }
}

/// 100 slow requests on 100 connections run at once: counted inside the app, not timed. Every
/// connection's task hands its request to the loop and pumps it; no thread waits for one.
#[test]
fn a_hundred_slow_requests_are_in_flight_at_once() {
    let app = AppDir::new("asgi_app.slow_app", &[]);
    let gateway = Gateway::bind(unix_address(&app), app.path(), &[]);
    let clients: Vec<_> = (0..100)
        .map(|_| {
            let mut client = gateway.connect();
            let params = app.iis_params("GET", "/slow?sleep=2");
            client.send(&Send::new(1, &params));
            client
        })
        .collect();
    let handles: Vec<_> = clients
        .into_iter()
        .map(|mut client| std::thread::spawn(move || client.read_response(1)))
        .collect();
    let mut peak = 0;
    for handle in handles {
        let response = handle.join().expect("client");
        assert_eq!(response.status, 200, "{}", response.stderr_text());
        peak = peak.max(response.json()["peak"].as_u64().unwrap_or(0));
    }
    assert_eq!(peak, 100, "requests in flight at once");
    let mut client = gateway.connect();
    let after = client.get(1, &app.iis_params("GET", "/inflight")).json();
    assert_eq!(after["in_flight"], 0, "{after}");
}

#[test]
fn the_scope_follows_asgi_2_4_and_the_wsgi_routing_rules() {
    let app = AppDir::new("asgi_app.scope_app", &[]);
    let wsgi = AppDir::new("hello.environ_app", &[]);
    let mut params = app.iis_params("POST", "/shop/caf?x=1&y=%20");
    set_param(&mut params, "APPL_MD_PATH", "/LM/W3SVC/1/ROOT/shop");
    set_param(&mut params, "HTTPS", "on");
    set_param(&mut params, "UNENCODED_URL", "/shop/caf%C3%A9?x=1&y=%20");
    set_param(&mut params, "QUERY_STRING", "x=1&y=%20");
    set_param(&mut params, "CONTENT_TYPE", "text/plain");
    set_param(&mut params, "CONTENT_LENGTH", "0");
    set_param(&mut params, "HTTP_X_CUSTOM_THING", "caf\u{e9}");
    set_param(&mut params, "SERVER_PROTOCOL", "HTTP/2");
    let mut gateway = Gateway::iis(&[]);
    let scope = gateway.client().get(1, &params).json();
    let mut wsgi_params = params.clone();
    set_param(
        &mut wsgi_params,
        "APPL_PHYSICAL_PATH",
        &format!("{}/", wsgi.path().display()),
    );
    let mut wsgi_gateway = Gateway::iis(&[]);
    let environ = wsgi_gateway.client().get(1, &wsgi_params).json();

    assert_eq!(scope["type"], "http");
    assert_eq!(
        scope["asgi"],
        serde_json::json!({"version": "3.0", "spec_version": "2.4"})
    );
    assert_eq!(scope["http_version"], "2");
    assert_eq!(scope["method"], "POST");
    assert_eq!(scope["scheme"], "https");
    // The same SCRIPT_NAME and PATH_INFO as the WSGI environ, as UTF-8 text.
    let latin1_to_utf8 = |value: &serde_json::Value| {
        let bytes: Vec<u8> = value
            .as_str()
            .expect("str")
            .chars()
            .map(|c| c as u32 as u8)
            .collect();
        String::from_utf8(bytes).expect("utf-8")
    };
    assert_eq!(scope["root_path"], latin1_to_utf8(&environ["SCRIPT_NAME"]));
    assert_eq!(scope["root_path"], "/shop");
    assert_eq!(
        scope["path"],
        format!("/shop{}", latin1_to_utf8(&environ["PATH_INFO"]))
    );
    assert_eq!(scope["path"], "/shop/caf\u{e9}");
    assert_eq!(scope["raw_path"], "/shop/caf%C3%A9");
    assert_eq!(scope["query_string"], "x=1&y=%20");
    let headers = scope["headers"].as_array().expect("headers");
    let header = |name: &str| {
        headers
            .iter()
            .find(|pair| pair[0] == name)
            .map(|pair| pair[1].as_str().expect("str").to_owned())
    };
    assert_eq!(header("content-type").as_deref(), Some("text/plain"));
    assert_eq!(header("content-length").as_deref(), Some("0"));
    assert_eq!(header("host").as_deref(), Some("localhost"));
    // Bytes as they came (UTF-8 "é" read back as latin-1 by the test app).
    assert_eq!(header("x-custom-thing").as_deref(), Some("caf\u{c3}\u{a9}"));
    assert!(
        headers.iter().all(|pair| {
            let name = pair[0].as_str().expect("str");
            name == name.to_ascii_lowercase() && !name.contains('_')
        }),
        "{headers:?}"
    );
    assert_eq!(scope["client"], serde_json::json!(["127.0.0.1", 50000]));
    assert_eq!(scope["server"], serde_json::json!(["localhost", 80]));
    assert_eq!(scope["state"], serde_json::json!({}));
    assert!(scope["extensions"]
        .as_object()
        .expect("extensions")
        .contains_key("http.response.pathsend"));

    // nginx's parameters over --bind: a root site, REQUEST_URI is the raw target.
    let gateway = Gateway::bind(Address::Tcp(any_port()), app.path(), &[]);
    let nginx: Vec<(String, String)> = [
        ("REQUEST_METHOD", "get"),
        ("SCRIPT_NAME", "/a b"),
        ("REQUEST_URI", "/a%20b?q"),
        ("QUERY_STRING", "q"),
        ("SERVER_PROTOCOL", "HTTP/1.0"),
        ("CONTENT_LENGTH", ""),
        ("CONTENT_TYPE", ""),
        ("HTTP_ACCEPT", "a"),
        ("HTTP_ACCEPT", "b"),
        ("SERVER_ADDR", "10.0.0.1"),
        ("SERVER_PORT", "8080"),
        ("REMOTE_ADDR", "::1"),
        ("REMOTE_PORT", "x"),
    ]
    .iter()
    .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
    .collect();
    let scope = gateway.connect().get(1, &nginx).json();
    assert_eq!(scope["method"], "GET");
    assert_eq!(scope["http_version"], "1.0");
    assert_eq!(scope["path"], "/a b");
    assert_eq!(scope["raw_path"], "/a%20b");
    assert_eq!(scope["root_path"], "");
    assert_eq!(scope["scheme"], "http");
    assert_eq!(scope["client"], serde_json::Value::Null, "no usable port");
    assert_eq!(scope["server"], serde_json::json!(["10.0.0.1", 8080]));
    assert_eq!(
        scope["headers"],
        serde_json::json!([["accept", "a, b"]]),
        "a header sent twice joined as in the WSGI environ; empty content-type and content-length left out"
    );
}

#[test]
fn detection_the_override_and_check() {
    // An object whose __call__ is a coroutine function is ASGI; lifespan state reaches requests.
    let (app, _gateway, response) = answer("asgi_app.lifespan_app", &[]);
    assert_eq!(response.status, 200, "{}", response.stderr_text());
    assert_eq!(response.json()["state"]["started"], "yes");
    assert!(app
        .wait_for_log("ASGI handler")
        .contains("the handler's __call__ is a coroutine function"));

    // A plain __call__ that returns a coroutine is not detected: WSGI, which fails...
    let (app, _gateway, response) = answer("asgi_app.not_detected", &[]);
    assert_eq!(response.status, 500);
    assert!(app
        .wait_for_log("WSGI handler")
        .contains("the handler is not a coroutine function"));
    // ...until WSGI_INTERFACE says otherwise, or --interface.
    let (app, _gateway, response) = answer("asgi_app.not_detected", &[("WSGI_INTERFACE", "asgi")]);
    assert_eq!(response.text(), "Hello, ASGI!\n");
    assert!(app
        .wait_for_log("ASGI handler")
        .contains("WSGI_INTERFACE=asgi"));
    let app = AppDir::new("asgi_app.not_detected", &[]);
    let gateway = Gateway::bind(
        Address::Tcp(any_port()),
        app.path(),
        &["--interface", "asgi"],
    );
    let response = gateway.connect().get(1, &app.iis_params("GET", "/"));
    assert_eq!(response.text(), "Hello, ASGI!\n");

    // A bad value is the reason for every 500.
    let (_app, _gateway, response) = answer("asgi_app.app", &[("WSGI_INTERFACE", "rsgi")]);
    assert_eq!(response.status, 500);
    assert!(
        response
            .stderr_text()
            .contains("WSGI_INTERFACE=\"rsgi\" is invalid"),
        "{}",
        response.stderr_text()
    );

    // check says which and why.
    for (handler, expected) in [
        (
            "asgi_app.app",
            "interface: ASGI (the handler is a coroutine function",
        ),
        (
            "hello.app",
            "interface: WSGI (the handler is not a coroutine function)",
        ),
    ] {
        let app = AppDir::new(handler, &[]);
        let output = std::process::Command::new(BINARY)
            .arg("check")
            .arg(app.path())
            .output()
            .expect("run check");
        let text = String::from_utf8_lossy(&output.stdout);
        assert!(text.contains(expected), "{handler}:\n{text}");
    }
}

#[test]
fn lifespan_startup_failure_is_every_request_500_with_the_reason() {
    let (app, mut gateway, response) = answer("asgi_app.failing_startup", &[]);
    assert_eq!(response.status, 500);
    assert!(
        response
            .stderr_text()
            .contains("ASGI lifespan startup failed: database unreachable"),
        "{}",
        response.stderr_text()
    );
    let again = gateway.client().get(2, &app.iis_params("GET", "/"));
    assert_eq!(again.status, 500, "still serving, still failing");
}

#[test]
fn lifespan_unsupported_carries_on() {
    // asgi_app.app asserts the scope is http: it raises on lifespan.
    let (app, _gateway, response) = answer("asgi_app.app", &[]);
    assert_eq!(response.status, 200);
    let log = app.wait_for_log("does not handle ASGI lifespan");
    assert!(log.contains("AssertionError"), "{log}");
}

#[test]
fn a_watched_file_restarts_an_asgi_app_in_place() {
    let app = AppDir::new("asgi_app.lifespan_app", &[]);
    let gateway = Gateway::bind(Address::Tcp(any_port()), app.path(), &[]);
    let pid = gateway.child.id();
    let mut client = gateway.connect();
    assert_eq!(client.get(1, &app.iis_params("GET", "/")).status, 200);
    std::fs::write(app.path().join("touched.py"), "").expect("touch");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while app.log().matches("lifespan startup").count() < 2 && std::time::Instant::now() < deadline
    {
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let log = app.log();
    assert_eq!(log.matches("lifespan startup").count(), 2, "{log}");
    let shutdown = log
        .find("lifespan shutdown")
        .expect("shutdown before the restart");
    assert!(
        shutdown < log.rfind("lifespan startup").unwrap_or(0),
        "{log}"
    );
    let response = gateway.connect().get(1, &app.iis_params("GET", "/"));
    assert_eq!(response.json()["state"]["started"], "yes");
    assert_eq!(gateway.child.id(), pid, "restarted in place");
}

#[test]
fn lifespan_shutdown_runs_after_the_requests_in_flight() {
    let app = AppDir::new("asgi_app.lifespan_app", &[]);
    let mut gateway = Gateway::bind(Address::Tcp(any_port()), app.path(), &[]);
    assert!(app
        .wait_for_log("lifespan startup")
        .contains("lifespan startup"));
    // SIGTERM while a request is in flight: it finishes, then lifespan shutdown runs.
    let mut client = gateway.connect();
    client.send(&Send::new(1, &app.iis_params("GET", "/?sleep=1")));
    app.wait_for_log("slow request started");
    gateway.signal(libc::SIGTERM);
    let response = client.read_response(1);
    assert_eq!(response.status, 200);
    assert_eq!(
        response.json()["events"],
        serde_json::json!(["lifespan.startup"])
    );
    let status = gateway.wait_exit(std::time::Duration::from_secs(20));
    assert!(status.is_some_and(|s| s.success()), "{status:?}");
    let log = app.log();
    assert!(log.contains("lifespan shutdown after 0 in flight"), "{log}");
    let shutdown = log.find("lifespan shutdown").expect("shutdown");
    let exiting = log.rfind("exiting").expect("exiting");
    assert!(shutdown < exiting, "{log}");

    // IIS closes the pipe.
    let (app, mut gateway, response) = answer("asgi_app.lifespan_app", &[]);
    assert_eq!(response.json()["state"]["started"], "yes");
    gateway.close_stream();
    let status = gateway.wait_exit(std::time::Duration::from_secs(20));
    assert!(status.is_some_and(|s| s.success()), "{status:?}");
    assert!(app.log().contains("lifespan shutdown after 0 in flight"));
}

/// Stopping is bounded by one WSGI_RESTART_GRACE, not one for the event loop and another for
/// Python: a lifespan shutdown that never completes uses up the grace, so the application's
/// thread that never ends is not waited for at all (waits here are never shorter than asked).
#[test]
fn one_grace_bounds_the_loop_and_finalising_together() {
    let (app, mut gateway, response) =
        answer("asgi_app.never_drains", &[("WSGI_RESTART_GRACE", "1")]);
    assert_eq!(response.status, 200);
    gateway.close_stream();
    let status = gateway.wait_exit(std::time::Duration::from_secs(20));
    assert!(status.is_some_and(|s| s.success()), "{status:?}");
    let log = app.log();
    assert!(
        log.contains("did not finish within the grace period (1s)"),
        "{log}"
    );
    assert!(
        log.contains("threads still running after 0ns: never-ends"),
        "{log}"
    );
}

#[test]
fn exception_before_the_response_starts() {
    assert_500("asgi_errors.call_error", "ValueError: boom in call");
    // http.response.start reached the gateway, but nothing the web server: still a 500.
    assert_500(
        "asgi_errors.error_after_start_before_body",
        "RuntimeError: boom before the body",
    );
    assert_500("asgi_errors.sys_exit_app", "SystemExit: 3");
}

#[test]
fn response_start_misuse() {
    assert_500(
        "asgi_errors.bad_header",
        "header x-bad: \"a\\nb\" is invalid: CR, LF or NUL",
    );
    assert_500("asgi_errors.bad_header_type", "is not a pair of bytes");
    assert_500(
        "asgi_errors.bad_status",
        "status 200 OK is invalid: expected an int",
    );
    assert_500(
        "asgi_errors.start_twice",
        "http.response.start sent a second time",
    );
    assert_500(
        "asgi_errors.body_before_start",
        "http.response.body before http.response.start",
    );
    assert_500(
        "asgi_errors.never_sends",
        "the application returned without sending http.response.start",
    );
    assert_500(
        "asgi_errors.websocket_message",
        "unexpected ASGI message type 'websocket.accept' on an http scope",
    );
}

#[test]
fn bodies_that_are_not_bytes() {
    assert_500(
        "asgi_errors.non_bytes_body",
        "http.response.body: body must be bytes or bytearray",
    );
}

#[test]
fn failure_after_the_response_started_cuts_it() {
    for (handler, detail) in [
        (
            "asgi_errors.error_after_start",
            "RuntimeError: boom after start",
        ),
        (
            "asgi_errors.body_after_end",
            "http.response.body after the response was complete",
        ),
    ] {
        let (app, mut gateway, response) = answer(handler, &[]);
        assert_eq!(response.status, 200, "{handler}");
        assert!(
            response.stderr.is_empty(),
            "{handler}: no STDERR once the response started"
        );
        let log = app.wait_for_log(detail);
        assert!(log.contains(detail), "{handler}:\n{log}");
        if handler.ends_with("error_after_start") {
            assert_eq!(response.app_status, 1, "{handler}");
            assert_eq!(response.text(), "partial");
            assert!(log.contains("failed after the response started; response cut short"));
        } else {
            // The response was complete before the mistake: it stands.
            assert_eq!(response.text(), "done");
        }
        assert_eq!(
            gateway.client().get(2, &app.iis_params("GET", "/")).status,
            200
        );
    }
}

#[test]
fn an_unfinished_response_is_ended_and_trailers_are_dropped() {
    let (app, _gateway, response) = answer("asgi_errors.returns_after_start", &[]);
    assert_eq!(response.status, 200);
    assert_eq!(response.text(), "unfinished");
    assert_eq!(response.app_status, 0);
    assert!(app
        .wait_for_log("returned before its response was complete")
        .contains("ended"));

    let (_app, _gateway, response) = answer("asgi_errors.trailers", &[]);
    assert_eq!(response.status, 200);
    assert_eq!(response.text(), "with trailers");
    assert!(response.stderr.is_empty());
}

#[test]
fn generic_error_detail_sends_no_traceback() {
    let (app, _gateway, response) = answer(
        "asgi_errors.call_error",
        &[("WSGI_ERROR_DETAIL", "generic")],
    );
    assert_eq!(response.status, 500);
    assert!(
        response.stderr.is_empty(),
        "no STDERR: {}",
        response.stderr_text()
    );
    assert!(!response.text().contains("boom"));
    assert!(
        app.wait_for_log("boom in call").contains("Traceback"),
        "still logged"
    );
}

#[test]
fn print_and_logging_go_to_the_log() {
    let (app, _gateway, response) = answer("asgi_errors.prints_app", &[]);
    assert_eq!(response.text(), "ok");
    let log = app.wait_for_log("logged by the ASGI app");
    assert!(log.contains("printed by the ASGI app"), "{log}");
    assert!(log.contains("logged by the ASGI app"), "{log}");
}

#[test]
fn a_streaming_response_streams_in_chunks() {
    let (_app, _gateway, response) = answer("asgi_app.stream_app", &[]);
    assert_eq!(response.status, 200);
    assert_eq!(response.text(), "x".repeat(50));
    assert!(response.header("content-length").is_none());
    let app = AppDir::new("asgi_app.stream_app", &[]);
    let gateway = Gateway::bind(Address::Tcp(any_port()), app.path(), &[]);
    let response = gateway
        .connect()
        .get(1, &app.iis_params("GET", "/?n=20&size=1000&sleep=0.01"));
    assert_eq!(response.body.len(), 20_000);
    assert!(
        response.stdout_records.len() >= 20,
        "each chunk sent as it comes: {:?}",
        response.stdout_records
    );
}

/// The ceiling the streaming issue sets for the whole process, Python included.
const CEILING_MIB: f64 = 64.0;
const GIB: usize = 1024 * 1024 * 1024;
const BIG: usize = 256 * 1024 * 1024;

/// A 1 GiB upload read with receive(), IIS-style (the worker pumps it) and over --bind (a task
/// pumps it), in bounded memory: receive() asks for one STDIN record at a time.
#[test]
fn a_1_gib_upload_is_streamed_in_bounded_memory() {
    let app = AppDir::new("asgi_app.count_app", &[]);
    let mut params = app.iis_params("POST", "/upload");
    set_param(&mut params, "CONTENT_LENGTH", &GIB.to_string());

    let mut gateway = Gateway::iis(&[]);
    let mut client = gateway.client();
    let sender = stream_upload(client.stream.try_clone().expect("clone"), &params, GIB);
    let json = client.read_response(1).json();
    sender.join().expect("sender");
    // The content is checked by hello_and_echo_over_bind; here, only how much arrived.
    assert_eq!(json["length"], GIB);
    let peak = peak_rss_mib(gateway.child.id());
    assert!(peak <= CEILING_MIB, "peak RSS {peak:.1} MiB, IIS stream");

    let socket = app.path().join("upload.sock");
    let gateway = Gateway::bind(Address::Unix(socket.clone()), app.path(), &[]);
    let stream = std::os::unix::net::UnixStream::connect(&socket).expect("connect");
    let mut client = Client::new(stream.try_clone().expect("clone"));
    let sender = stream_upload(stream, &params, GIB);
    let json = client.read_response(1).json();
    sender.join().expect("sender");
    assert_eq!(json["length"], GIB);
    let peak = peak_rss_mib(gateway.child.id());
    assert!(peak <= CEILING_MIB, "peak RSS {peak:.1} MiB, --bind");
}

/// send() waits while the web server reads slowly: the output stays bounded, both pumps.
#[test]
fn a_big_streaming_response_and_a_slow_reader_stay_in_bounded_memory() {
    let app = AppDir::new("asgi_app.stream_app", &[]);
    let url = format!("/?n={}&size=65536", BIG / 65536);
    let read_slowly_then_fast = |client: &mut Client<_>, pid: u32| {
        let mut body = 0usize;
        let mut slow_peak = 0.0;
        loop {
            match client.read_record() {
                Some(wfastcgi::protocol::Record::Stdout { content, .. }) => body += content.len(),
                Some(wfastcgi::protocol::Record::EndRequest { .. }) => break,
                Some(other) => panic!("unexpected {other:?}"),
                None => panic!("closed early"),
            }
            if body < 8 * 1024 * 1024 {
                std::thread::sleep(std::time::Duration::from_millis(2));
                slow_peak = peak_rss_mib(pid);
            }
        }
        assert!(body >= BIG, "{body} bytes");
        assert!(
            slow_peak <= CEILING_MIB,
            "peak RSS {slow_peak:.1} MiB with a slow reader"
        );
        let peak = peak_rss_mib(pid);
        assert!(peak <= CEILING_MIB, "peak RSS {peak:.1} MiB for 256 MiB");
    };
    let mut gateway = Gateway::iis(&[]);
    let mut client = gateway.client();
    client.send(&Send::new(1, &app.iis_params("GET", &url)));
    read_slowly_then_fast(&mut client, gateway.child.id());

    let socket = app.path().join("download.sock");
    let gateway = Gateway::bind(Address::Unix(socket.clone()), app.path(), &[]);
    let mut client =
        Client::new(std::os::unix::net::UnixStream::connect(&socket).expect("connect"));
    client.send(&Send::new(1, &app.iis_params("GET", &url)));
    read_slowly_then_fast(&mut client, gateway.child.id());
}

/// What disconnect_app saw, once it has seen `count` things, and its requests still running.
fn seen<S: std::io::Read + std::io::Write>(
    client: &mut Client<S>,
    app: &AppDir,
    id: u16,
    count: usize,
) -> serde_json::Value {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let json = client.get(id, &app.iis_params("GET", "/seen")).json();
        let done =
            json["seen"].as_array().is_some_and(|s| s.len() >= count) && json["in_flight"] == 0;
        if done || std::time::Instant::now() > deadline {
            return json;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

#[test]
fn aborts_mid_upload_and_mid_stream_are_http_disconnect() {
    use wfastcgi::protocol;
    // IIS: FCGI_ABORT_REQUEST mid-upload; the app waiting in receive() gets http.disconnect.
    let app = AppDir::new("asgi_app.disconnect_app", &[]);
    let mut gateway = Gateway::iis(&[]);
    let mut client = gateway.client();
    let mut params = app.iis_params("POST", "/upload");
    set_param(&mut params, "CONTENT_LENGTH", "1000000");
    let whole =
        Client::<std::os::unix::net::UnixStream>::encode(&Send::new(1, &params).body(&[7u8; 1000]));
    client.write_raw(&whole[..whole.len() - protocol::HEADER_LEN]);
    client.abort(1);
    let response = client.read_response(1);
    assert_eq!(response.protocol_status, 0);
    let json = seen(&mut client, &app, 2, 1);
    assert_eq!(json["seen"], serde_json::json!(["upload: http.disconnect"]));
    assert_eq!(json["in_flight"], 0, "nothing left running");

    // --bind: the web server closes the connection mid-upload, then mid-stream.
    let gateway = Gateway::bind(Address::Tcp(any_port()), app.path(), &[]);
    let mut client = gateway.connect();
    client.write_raw(&whole[..whole.len() - protocol::HEADER_LEN]);
    drop(client);
    let mut client = gateway.connect();
    client.send(&Send::new(1, &app.iis_params("GET", "/stream")));
    for _ in 0..4 {
        client.read_record().expect("some of the body");
    }
    drop(client);
    let json = seen(&mut gateway.connect(), &app, 1, 3);
    let mut events: Vec<&str> = json["seen"]
        .as_array()
        .expect("list")
        .iter()
        .filter_map(|e| e.as_str())
        .collect();
    // The two connections end independently; the stream's two events come in order.
    let upload = events.iter().position(|e| *e == "upload: http.disconnect");
    events.remove(upload.expect("the upload saw http.disconnect"));
    assert_eq!(
        events,
        ["stream: ClientDisconnected", "stream: http.disconnect"],
        "{json}"
    );
    assert_eq!(json["in_flight"], 0, "nothing left running");
    let log = app.wait_for_log("response stopped");
    assert!(
        log.contains("closed the connection; response stopped"),
        "{log}"
    );

    // The web server closes the connection while the app waits in receive() after the body.
    let mut client = gateway.connect();
    client.send(&Send::new(1, &app.iis_params("GET", "/wait")));
    app.wait_for_log("waiting for http.disconnect");
    drop(client);
    let json = seen(&mut gateway.connect(), &app, 1, 4);
    assert_eq!(json["seen"][3], "wait: http.disconnect", "{json}");
    assert_eq!(json["in_flight"], 0);
}

/// On the IIS stream (read by the request's own thread on Unix), FCGI_ABORT_REQUEST while the
/// application waits in receive() after the body is http.disconnect at once, not at its next
/// send(), and the request is ended.
#[test]
fn iis_an_abort_while_waiting_in_receive_after_the_body_is_http_disconnect() {
    let app = AppDir::new("asgi_app.disconnect_app", &[]);
    let mut gateway = Gateway::iis(&[]);
    let mut client = gateway.client();
    client.send(&Send::new(1, &app.iis_params("GET", "/wait")));
    app.wait_for_log("waiting for http.disconnect");
    client.abort(1);
    let response = client.read_response(1);
    assert_eq!(response.protocol_status, 0);
    let json = seen(&mut client, &app, 2, 1);
    assert_eq!(json["seen"], serde_json::json!(["wait: http.disconnect"]));
    assert_eq!(json["in_flight"], 0, "nothing left running");
}

/// A web server that has read all it was sent and closes (nginx buffering the response): the
/// connection sees the end of its stream, no failed write, and drops the rest of the response;
/// send() must raise all the same, as ASGI 2.4 apps (Starlette's StreamingResponse) stop on it.
#[test]
fn a_web_server_closing_cleanly_mid_stream_fails_send() {
    let app = AppDir::new("asgi_app.disconnect_app", &[]);
    let socket = app.path().join("closing.sock");
    let gateway = Gateway::bind(Address::Unix(socket.clone()), app.path(), &[]);
    let stream = std::os::unix::net::UnixStream::connect(&socket).expect("connect");
    let mut client = Client::new(stream.try_clone().expect("clone"));
    client.send(&Send::new(1, &app.iis_params("GET", "/stream")));
    for _ in 0..4 {
        client.read_record().expect("some of the body");
    }
    // Half-closed and still reading, so no write of the gateway's fails.
    stream
        .shutdown(std::net::Shutdown::Write)
        .expect("shut down the sending side");
    let reader = std::thread::spawn(move || while client.read_record().is_some() {});
    let json = seen(&mut gateway.connect(), &app, 1, 2);
    assert_eq!(
        json["seen"],
        serde_json::json!(["stream: ClientDisconnected", "stream: http.disconnect"]),
        "{json}"
    );
    assert_eq!(json["in_flight"], 0, "nothing left running");
    reader.join().expect("the gateway closed the connection");
}

#[test]
fn pathsend_is_served_from_the_file() {
    let app = AppDir::new("asgi_app.pathsend_app", &[]);
    let data = bytes_of(3_000_001, 9);
    let path = app.path().join("data.bin");
    std::fs::write(&path, &data).expect("write");
    let big = app.path().join("big.bin");
    std::fs::File::create(&big)
        .and_then(|file| file.set_len(BIG as u64))
        .expect("sparse file");
    let url = |path: &std::path::Path| format!("/?path={}", path.display());

    let mut gateway = Gateway::iis(&[]);
    let mut client = gateway.client();
    let response = client.get(1, &app.iis_params("GET", &url(&path)));
    assert_eq!(response.status, 200, "{}", response.stderr_text());
    assert_eq!(response.header("content-length"), Some("3000001"));
    assert!(response.body == data, "content differs");
    let response = client.get(2, &app.iis_params("GET", &url(&big)));
    assert_eq!(response.body.len(), BIG);
    let peak = peak_rss_mib(gateway.child.id());
    assert!(
        peak <= CEILING_MIB,
        "peak RSS {peak:.1} MiB for a 256 MiB file"
    );
    // A missing file: nothing was sent, so a 500 that names it.
    let missing = app.path().join("missing.bin");
    let response = client.get(3, &app.iis_params("GET", &url(&missing)));
    assert_eq!(response.status, 500);
    assert!(
        response
            .stderr_text()
            .contains("http.response.pathsend cannot open"),
        "{}",
        response.stderr_text()
    );

    let gateway = Gateway::bind(Address::Tcp(any_port()), app.path(), &[]);
    let response = gateway
        .connect()
        .get(1, &app.iis_params("GET", &url(&path)));
    assert!(response.body == data, "content differs over --bind");
}

/// ops::begin and InFlight::end serve ASGI requests too: the access log, the health path,
/// WSGI_MAX_REQUESTS.
#[test]
fn operations_hooks_count_asgi_requests() {
    let app = AppDir::new(
        "asgi_app.app",
        &[
            ("WSGI_ACCESS_LOG", "log"),
            ("WSGI_ACCESS_LOG_FORMAT", "%m %U %s %B"),
            ("WSGI_HEALTH_PATH", "/healthz"),
        ],
    );
    let gateway = Gateway::bind(Address::Tcp(any_port()), app.path(), &[]);
    let mut client = gateway.connect();
    assert_eq!(client.get(1, &app.iis_params("GET", "/logged")).status, 200);
    assert_eq!(
        client.get(1, &app.iis_params("GET", "/healthz")).text(),
        "OK\n"
    );
    let log = app.wait_for_log("GET /logged 200 13");
    assert!(log.contains("GET /logged 200 13"), "{log}");

    let app = AppDir::new("asgi_app.app", &[("WSGI_MAX_REQUESTS", "3")]);
    let mut gateway = Gateway::iis(&[]);
    let mut client = gateway.client();
    for id in 1..=3 {
        assert_eq!(client.get(id, &app.iis_params("GET", "/")).status, 200);
    }
    let status = gateway
        .wait_exit(std::time::Duration::from_secs(20))
        .expect("exits");
    assert_eq!(status.code(), Some(0));
    assert!(app
        .log()
        .contains("recycling: 3 requests served (WSGI_MAX_REQUESTS=3"));
}

/// With uvloop importable (the test virtualenv has it) the loop is uvloop's, and the wake-up,
/// streaming both ways and many requests at once work on it as on asyncio's.
#[test]
fn uvloop_when_it_is_importable() {
    let venv = std::env::var("WFASTCGI_TEST_VENV").expect(
        "WFASTCGI_TEST_VENV is not set: run the tests with scripts/test, which installs uvloop",
    );
    let app = AppDir::new("asgi_app.echo_app", &[("WSGI_VENV", &venv)]);
    let gateway = Gateway::bind(Address::Tcp(any_port()), app.path(), &[]);
    let body = bytes_of(1_000_000, 4);
    let mut params = app.iis_params("POST", "/echo");
    set_param(&mut params, "CONTENT_LENGTH", &body.len().to_string());
    let json = gateway
        .connect()
        .request(&Send::new(1, &params).body(&body))
        .json();
    assert_eq!(json["sha256"], sha256_hex(&body).as_str());
    assert!(
        app.log().contains("ASGI event loop: uvloop"),
        "{}",
        app.log()
    );

    let app = AppDir::new("asgi_app.slow_app", &[("WSGI_VENV", &venv)]);
    let gateway = Gateway::bind(Address::Tcp(any_port()), app.path(), &[]);
    let clients: Vec<_> = (0..20)
        .map(|_| {
            let mut client = gateway.connect();
            client.send(&Send::new(1, &app.iis_params("GET", "/slow?sleep=1")));
            client
        })
        .collect();
    let peaks: Vec<u64> = clients
        .into_iter()
        .map(|mut client| client.read_response(1).json()["peak"].as_u64().unwrap_or(0))
        .collect();
    assert_eq!(peaks.iter().max(), Some(&20), "{peaks:?}");
}

/// Listening, the first request reports a log that cannot be opened, as under IIS: the connection
/// task that hands requests to the loop answers it; the next request is served.
#[test]
fn bind_reports_a_log_that_cannot_be_opened_to_the_first_request() {
    let (_holder, app) = app_with_an_unopenable_log("asgi_app.app");
    let gateway = Gateway::bind(unix_address(&app), app.path(), &[]);
    assert_log_problem_reported_once(&mut gateway.connect(), &app);
}
