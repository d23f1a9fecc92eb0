//! The bad-input matrix of docs/errors.md, against the real binary: each case gets its log line,
//! its FastCGI answer, and the next request (on the same connection, or a fresh one when the
//! case closes the connection) succeeds.

mod common;

use std::time::Duration;

use bytes::BytesMut;
use common::*;
use wfastcgi::protocol::{self, ProtocolStatus, RecordType, Role};

fn begin(id: u16) -> Vec<u8> {
    let mut out = BytesMut::new();
    protocol::encode_begin_request(&mut out, id, Role::Responder, true);
    out.to_vec()
}

fn record(record_type: RecordType, id: u16, content: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    push_record(&mut out, record_type, id, content, 0);
    out
}

fn encoded_params(params: &[(String, String)]) -> Vec<u8> {
    let mut out = BytesMut::new();
    for (k, v) in params {
        protocol::encode_name_value(&mut out, k.as_bytes(), v.as_bytes());
    }
    out.to_vec()
}

/// A bound gateway for the cases that close their connection: the next one must work.
fn bound(handler: &str) -> (AppDir, Gateway) {
    let app = AppDir::new(handler, &[]);
    let gateway = Gateway::bind(Address::Tcp(any_port()), app.path(), &["--threads", "1"]);
    (app, gateway)
}

fn assert_fresh_connection_works(app: &AppDir, gateway: &Gateway) {
    let response = gateway.connect().get(1, &app.iis_params("GET", "/"));
    assert_eq!(response.status, 200, "the next connection is served");
}

/// Sends `bytes` on a new connection, half-closes it, and expects the gateway to close it and
/// log `message`.
fn closes_with(bytes: &[u8], message: &str) {
    let (app, gateway) = bound("hello.app");
    let mut client = gateway.connect();
    client.write_raw(bytes);
    if let Conn::Tcp(stream) = &client.stream {
        let _ = stream.shutdown(std::net::Shutdown::Write);
    }
    while client.read_record().is_some() {}
    let log = app.wait_for_log(message);
    assert!(log.contains(message), "{message:?} not logged:\n{log}");
    assert_fresh_connection_works(&app, &gateway);
}

#[test]
fn truncated_and_impossible_records_close_the_connection() {
    closes_with(
        &[1, 1, 0, 1],
        "stream ended inside a record: got 4 of its 8 bytes",
    );
    let mut content_short = record(RecordType::Params, 1, &[0u8; 100]);
    content_short.truncate(50);
    closes_with(
        &content_short,
        "stream ended inside a record: got 50 of its 108 bytes",
    );
    let mut padding_short = Vec::new();
    push_record(&mut padding_short, RecordType::Params, 1, b"abc", 200);
    padding_short.truncate(20);
    closes_with(&padding_short, "stream ended inside a record");
    closes_with(&[9, 1, 0, 1, 0, 8, 0, 0], "unsupported FastCGI version 9");
    let mut short_begin = begin(1);
    short_begin[5] = 7;
    short_begin.truncate(15);
    closes_with(&short_begin, "must be exactly 8 bytes");
    closes_with(
        &begin(0),
        "record has request id 0, which is reserved for management records",
    );
}

#[test]
fn params_over_the_limits_close_the_connection() {
    let mut bytes = begin(1);
    let name = "X".repeat(70_000);
    let mut encoded = BytesMut::new();
    protocol::encode_name_value(&mut encoded, name.as_bytes(), b"v");
    for chunk in encoded.chunks(65535) {
        bytes.extend(record(RecordType::Params, 1, chunk));
    }
    closes_with(&bytes, "parameter name of 70000 bytes exceeds the limit");

    let mut bytes = begin(1);
    for _ in 0..20 {
        bytes.extend(record(RecordType::Params, 1, &[b'a'; 60_000]));
    }
    closes_with(
        &bytes,
        "parameters exceed the limit of 1048576 bytes in total",
    );
}

#[test]
fn a_pair_split_at_every_byte_is_read_the_same() {
    let app = AppDir::new("hello.environ_app", &[]);
    let mut gateway = Gateway::iis(&[]);
    let mut client = gateway.client();
    let mut params = app.iis_params("GET", "/split");
    set_param(&mut params, "HTTP_X_LONG", &"v".repeat(300));
    let encoded = encoded_params(&params);
    for split in 1..encoded.len() {
        let id = (split % 200 + 1) as u16;
        let mut bytes = begin(id);
        bytes.extend(record(RecordType::Params, id, &encoded[..split]));
        bytes.extend(record(RecordType::Params, id, &encoded[split..]));
        bytes.extend(record(RecordType::Params, id, b""));
        bytes.extend(record(RecordType::Stdin, id, b""));
        client.write_raw(&bytes);
        let env = client.read_response(id).json();
        assert_eq!(
            env["HTTP_X_LONG"].as_str().map(str::len),
            Some(300),
            "split at {split}"
        );
        assert_eq!(env["PATH_INFO"], "/split");
    }
}

#[test]
fn stray_records_are_ignored_and_logged() {
    let app = AppDir::new("hello.app", &[]);
    let mut gateway = Gateway::iis(&[]);
    let mut client = gateway.client();
    let params = app.iis_params("GET", "/");
    // Under IIS the log file is known once the first request has named the app folder.
    assert_eq!(client.get(9, &params).status, 200);
    // STDIN before any BEGIN, PARAMS for an unknown id, a duplicate BEGIN mid-request.
    client.write_raw(&record(RecordType::Stdin, 5, b"early"));
    client.write_raw(&record(RecordType::Params, 6, b"\x01\x01ab"));
    let mut bytes = begin(1);
    bytes.extend(begin(1));
    bytes.extend(record(RecordType::Params, 1, &encoded_params(&params)));
    bytes.extend(record(RecordType::Params, 1, b""));
    bytes.extend(record(RecordType::Stdin, 1, b""));
    client.write_raw(&bytes);
    assert_eq!(client.read_response(1).status, 200);
    assert!(app
        .wait_for_log("duplicate")
        .contains("duplicate FCGI_BEGIN_REQUEST for a running request ignored"));
    assert_eq!(
        client.get(2, &params).status,
        200,
        "the same connection serves on"
    );
}

/// The matrix's duplicate BEGIN row while the application reads the body: IIS's stream (the
/// blocking driver) ignores it as a listening connection does; it used to refuse request 1 with
/// CANT_MPX_CONN, an END_REQUEST in the middle of its response.
#[test]
fn a_duplicate_begin_while_the_body_is_read_is_ignored() {
    let app = AppDir::new("echo.app", &[]);
    let mut gateway = Gateway::iis(&[]);
    let mut client = gateway.client();
    let mut params = app.iis_params("POST", "/");
    set_param(&mut params, "CONTENT_LENGTH", "10");
    let mut bytes = begin(1);
    bytes.extend(record(RecordType::Params, 1, &encoded_params(&params)));
    bytes.extend(record(RecordType::Params, 1, b""));
    bytes.extend(record(RecordType::Stdin, 1, b"01234"));
    client.write_raw(&bytes);
    std::thread::sleep(Duration::from_millis(100));
    let mut bytes = begin(1);
    bytes.extend(record(RecordType::Stdin, 1, b"56789"));
    bytes.extend(record(RecordType::Stdin, 1, b""));
    client.write_raw(&bytes);
    let response = client.read_response(1);
    assert_eq!(
        response.protocol_status,
        ProtocolStatus::RequestComplete as u8
    );
    assert_eq!(response.json()["length"], 10);
    assert!(app
        .wait_for_log("duplicate")
        .contains("duplicate FCGI_BEGIN_REQUEST for a running request ignored"));
}

#[test]
fn aborts_before_during_and_after_the_body() {
    let app = AppDir::new("echo.app", &[]);
    let mut gateway = Gateway::iis(&[]);
    let mut client = gateway.client();
    let mut params = app.iis_params("POST", "/");
    set_param(&mut params, "CONTENT_LENGTH", "10");
    // Under IIS the log file is known once the first request has named the app folder.
    assert_eq!(
        client
            .request(&Send::new(9, &params).body(b"0123456789"))
            .status,
        200
    );
    let abort = |id: u16| {
        let mut out = BytesMut::new();
        protocol::encode_abort_request(&mut out, id);
        out.to_vec()
    };
    // Before the parameters are complete: answered at once.
    let mut bytes = begin(1);
    bytes.extend(record(RecordType::Params, 1, &encoded_params(&params)));
    bytes.extend(abort(1));
    client.write_raw(&bytes);
    assert_eq!(
        client.read_response(1).protocol_status,
        ProtocolStatus::RequestComplete as u8
    );
    // During the body.
    let mut bytes = begin(2);
    bytes.extend(record(RecordType::Params, 2, &encoded_params(&params)));
    bytes.extend(record(RecordType::Params, 2, b""));
    bytes.extend(record(RecordType::Stdin, 2, b"12345"));
    client.write_raw(&bytes);
    std::thread::sleep(Duration::from_millis(100));
    client.write_raw(&abort(2));
    assert_eq!(client.read_response(2).protocol_status, 0);
    // After the response: nothing to abort, ignored.
    let full = client.request(&Send::new(3, &params).body(b"0123456789"));
    assert_eq!(full.json()["length"], 10);
    client.write_raw(&abort(3));
    let log = app.wait_for_log("request aborted by the web server");
    assert!(log.contains("before it started"), "{log}");
    let again = client.request(&Send::new(4, &params).body(b"0123456789"));
    assert_eq!(again.json()["length"], 10, "the same connection serves on");
}

#[test]
fn the_stream_ending_mid_request_ends_the_process_cleanly() {
    let app = AppDir::new("echo.app", &[]);
    let mut gateway = Gateway::iis(&[]);
    let mut client = gateway.client();
    assert_eq!(client.get(1, &app.iis_params("GET", "/")).status, 200);
    let mut params = app.iis_params("POST", "/");
    set_param(&mut params, "CONTENT_LENGTH", "100");
    let mut bytes = begin(2);
    bytes.extend(record(RecordType::Params, 2, &encoded_params(&params)));
    bytes.extend(record(RecordType::Params, 2, b""));
    bytes.extend(record(RecordType::Stdin, 2, b"partial"));
    client.write_raw(&bytes);
    drop(client);
    gateway.close_stream();
    let status = gateway.wait_exit(Duration::from_secs(20)).expect("exits");
    assert!(status.success(), "{status:?}");
    assert!(app
        .wait_for_log("request body incomplete")
        .contains("request body incomplete"));
}

#[test]
fn odd_but_valid_parameters_reach_the_application() {
    let app = AppDir::new("hello.environ_app", &[]);
    let mut gateway = Gateway::iis(&[]);
    let mut client = gateway.client();
    let mut bytes = begin(65535);
    let mut encoded = BytesMut::new();
    protocol::encode_name_value(&mut encoded, b"HTTP_X_\xe9T\xe9", b"caf\xe9");
    protocol::encode_name_value(&mut encoded, b"", b"empty name");
    bytes.extend(record(RecordType::Params, 65535, &encoded));
    bytes.extend(record(
        RecordType::Params,
        65535,
        &encoded_params(&app.iis_params("GET", "/")),
    ));
    bytes.extend(record(RecordType::Params, 65535, b""));
    bytes.extend(record(RecordType::Stdin, 65535, b""));
    client.write_raw(&bytes);
    let env = client.read_response(65535).json();
    assert_eq!(
        env["HTTP_X_\u{e9}T\u{e9}"], "caf\u{e9}",
        "bytes >= 0x80 as ISO-8859-1"
    );
    assert_eq!(env[""], "empty name");
}

#[test]
fn content_length_mismatches_and_garbage() {
    let app = AppDir::new("echo.app", &[("WSGI_MAX_BODY", "1000")]);
    let mut gateway = Gateway::iis(&[]);
    let mut client = gateway.client();
    let with_length = |length: &str| {
        let mut params = app.iis_params("POST", "/");
        set_param(&mut params, "CONTENT_LENGTH", length);
        params
    };
    // Larger than the body: the body ends with the empty STDIN record.
    let json = client
        .request(&Send::new(1, &with_length("50")).body(b"0123456789"))
        .json();
    assert_eq!(json["length"], 10);
    // Smaller: only CONTENT_LENGTH bytes are the body.
    let json = client
        .request(&Send::new(2, &with_length("4")).body(b"0123456789"))
        .json();
    assert_eq!(json["length"], 4);
    // Not a number: 400 without running the application.
    let refused = client.request(&Send::new(3, &with_length("ten")).body(b"0123456789"));
    assert_eq!(refused.status, 400);
    // Negative (Caddy's -1 for a chunked upload): unknown, so the body is STDIN to its end, and
    // the application sees no CONTENT_LENGTH.
    let json = client
        .request(&Send::new(6, &with_length("-1")).body(b"0123456789"))
        .json();
    assert_eq!(json["length"], 10);
    let env_app = AppDir::new("hello.environ_app", &[]);
    let mut params = env_app.iis_params("POST", "/");
    set_param(&mut params, "CONTENT_LENGTH", "-1");
    let mut env_gateway = Gateway::iis(&[]);
    let env = env_gateway
        .client()
        .request(&Send::new(1, &params).body(b"abc"))
        .json();
    assert!(env.get("CONTENT_LENGTH").is_none(), "{env}");
    // Over WSGI_MAX_BODY: 413 before the application reads a byte.
    let body = vec![b'x'; 5000];
    let refused = client.request(&Send::new(4, &with_length("5000")).body(&body));
    assert_eq!(refused.status, 413);
    let log = app.wait_for_log("413");
    assert!(
        log.contains("non-numeric CONTENT_LENGTH refused with 400"),
        "{log}"
    );
    assert!(
        log.contains("body of 5000 bytes refused with 413 (WSGI_MAX_BODY=1000)"),
        "{log}"
    );
    let json = client
        .request(&Send::new(5, &with_length("3")).body(b"abc"))
        .json();
    assert_eq!(json["length"], 3, "the same connection serves on");
}

#[test]
fn a_non_str_header_is_a_500() {
    let app = AppDir::new("errors.non_str_header", &[]);
    let mut gateway = Gateway::iis(&[]);
    let mut client = gateway.client();
    let response = client.get(1, &app.iis_params("GET", "/"));
    assert_eq!(response.status, 500);
    assert!(
        response.stderr_text().contains("is not a (str, str) tuple"),
        "{}",
        response.stderr_text()
    );
    assert_eq!(
        client.get(2, &app.iis_params("GET", "/")).status,
        500,
        "still serving"
    );
}

#[test]
fn an_idle_connection_is_closed_in_bind_mode() {
    let app = AppDir::new("hello.app", &[("WSGI_IDLE_TIMEOUT", "1")]);
    let gateway = Gateway::bind(Address::Tcp(any_port()), app.path(), &[]);
    let mut client = gateway.connect();
    assert_eq!(client.get(1, &app.iis_params("GET", "/")).status, 200);
    // Nothing for longer than the timeout: the gateway closes the connection.
    assert!(client.is_closed());
    assert!(app
        .wait_for_log("connection idle")
        .contains("connection idle for 1s: closed"));
    assert_fresh_connection_works(&app, &gateway);
}

#[test]
fn log_lines_cannot_be_forged_through_request_data() {
    let app = AppDir::new("errors.call_error", &[]);
    let mut gateway = Gateway::iis(&[]);
    let mut params = app.iis_params("GET", "/x");
    set_param(
        &mut params,
        "REQUEST_URI",
        "/x\r\n2026-01-01T00:00:00Z  INFO forged line",
    );
    let response = gateway.client().get(1, &params);
    assert_eq!(response.status, 500);
    let log = app.wait_for_log("boom in call");
    assert!(
        log.contains(r"/x\r\n2026-01-01T00:00:00Z  INFO forged line"),
        "escaped:\n{log}"
    );
    assert!(
        !log.lines()
            .any(|line| line.starts_with("2026-01-01T00:00:00Z")),
        "{log}"
    );
}

#[test]
fn a_management_record_with_a_request_id_closes_the_connection() {
    let mut get_values = Vec::new();
    push_record(&mut get_values, RecordType::GetValues, 3, b"", 0);
    closes_with(&get_values, "must have request id 0, not 3");
}
