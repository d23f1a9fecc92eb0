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

/// 100 slow requests on 100 connections run at once: counted inside the app, not timed. The
/// four workers each pump one; the rest are accepted by the I/O thread and pumped by tasks.
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

/// Starts `handler` IIS-style and sends one GET.
fn answer(handler: &str, settings: &[(&str, &str)]) -> (AppDir, Gateway, Response) {
    let app = AppDir::new(handler, settings);
    let mut gateway = Gateway::iis(&[]);
    let response = gateway.client().get(1, &app.iis_params("GET", "/"));
    (app, gateway, response)
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
        serde_json::json!([["accept", "a"], ["accept", "b"]]),
        "each header line kept; empty content-type and content-length left out"
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
fn lifespan_shutdown_runs_after_the_requests_in_flight() {
    let app = AppDir::new("asgi_app.lifespan_app", &[]);
    let mut gateway = Gateway::bind(Address::Tcp(any_port()), app.path(), &[]);
    assert!(app
        .wait_for_log("lifespan startup")
        .contains("lifespan startup"));
    let mut client = gateway.connect();
    client.send(&Send::new(1, &app.iis_params("GET", "/")));
    let response = client.read_response(1);
    assert_eq!(
        response.json()["events"],
        serde_json::json!(["lifespan.startup"])
    );
    gateway.signal(libc::SIGTERM);
    let status = gateway.wait_exit(std::time::Duration::from_secs(20));
    assert!(status.is_some_and(|s| s.success()), "{status:?}");
    let log = app.log();
    assert!(log.contains("lifespan shutdown after 0 in flight"), "{log}");
    let shutdown = log.find("lifespan shutdown").expect("shutdown");
    let exiting = log.rfind("exiting").expect("exiting");
    assert!(shutdown < exiting, "{log}");
}
