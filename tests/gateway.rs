//! The gateway core against the real binary: IIS-style stream on fd 0, --bind, an inherited
//! listening socket; the protocol answers; the WSGI bridge with the apps in tests/apps.

mod common;

use std::time::Duration;

use bytes::BytesMut;
use common::*;
use wfastcgi::protocol::{self, ProtocolStatus, Record, RecordType, Role};

fn iis_gateway(handler: &str, settings: &[(&str, &str)]) -> (AppDir, Gateway) {
    let app = AppDir::new(handler, settings);
    (app, Gateway::iis(&[]))
}

#[test]
fn hello_over_the_iis_stream_with_request_ids_cycling_past_255() {
    let (app, mut gateway) = iis_gateway("hello.app", &[]);
    let mut client = gateway.client();
    let params = app.iis_params("GET", "/hello");
    // IIS numbers requests 1..=255 and wraps to 1; never assume id 1.
    for n in 0..300u32 {
        let id = (n % 255 + 1) as u16;
        let response = client.get(id, &params);
        assert_eq!(response.status, 200, "request {n}: {response:?}");
        assert_eq!(response.body, b"Hello, World!\n");
        assert_eq!(
            response.protocol_status,
            ProtocolStatus::RequestComplete as u8
        );
        assert!(response.stderr.is_empty());
        assert!(
            response
                .stdout_records
                .iter()
                .rev()
                .skip(1)
                .all(|&len| len > 0),
            "no empty STDOUT record but the last: {:?}",
            response.stdout_records
        );
        assert_eq!(response.stdout_records.last(), Some(&0));
    }
    // The end of the IIS stream ends the process cleanly.
    gateway.close_stream();
    drop(client);
    let status = gateway
        .wait_exit(Duration::from_secs(20))
        .expect("exits after the stream ends");
    assert!(status.success(), "{status:?}");
    assert!(app
        .wait_for_log("WSGI handler \"hello.app\" loaded")
        .contains("loaded"));
}

#[test]
fn large_request_ids_and_padded_records() {
    let (app, mut gateway) = iis_gateway("echo.app", &[]);
    let mut client = gateway.client();
    let body = bytes_of(200_000, 7);
    let mut params = app.iis_params("POST", "/echo");
    set_param(&mut params, "CONTENT_LENGTH", &body.len().to_string());
    for (id, padding) in [(65535u16, 7u8), (256, 255), (1, 0)] {
        let mut request = Send::new(id, &params).body(&body);
        request.padding = padding;
        request.stdin_record = 1000 + id as usize % 3000;
        let response = client.request(&request);
        assert_eq!(response.status, 200, "{}", response.text());
        let json = response.json();
        assert_eq!(json["length"], body.len());
        assert_eq!(json["sha256"], sha256_hex(&body));
    }
}

#[test]
fn bodies_split_into_random_stdin_records() {
    let (app, mut gateway) = iis_gateway("echo.app", &[]);
    let mut client = gateway.client();
    let mut rng = XorShift(42);
    for (n, len) in [0usize, 1, 65535, 65536, 10 * 1024 * 1024]
        .into_iter()
        .enumerate()
    {
        let body = bytes_of(len, n as u64 + 1);
        let mut params = app.iis_params("POST", "/echo");
        set_param(&mut params, "CONTENT_LENGTH", &len.to_string());
        // Random record sizes (1..65535) and padding, written by hand.
        let id = n as u16 + 1;
        let mut raw = Vec::new();
        let mut begin = BytesMut::new();
        protocol::encode_begin_request(&mut begin, id, Role::Responder, true);
        raw.extend_from_slice(&begin);
        let mut encoded = BytesMut::new();
        for (k, v) in &params {
            protocol::encode_name_value(&mut encoded, k.as_bytes(), v.as_bytes());
        }
        push_record(&mut raw, RecordType::Params, id, &encoded, 3);
        push_record(&mut raw, RecordType::Params, id, b"", 0);
        let mut rest = &body[..];
        while !rest.is_empty() {
            let size = (rng.below(65535) as usize + 1).min(rest.len());
            push_record(
                &mut raw,
                RecordType::Stdin,
                id,
                &rest[..size],
                rng.below(4) as u8,
            );
            rest = &rest[size..];
        }
        push_record(&mut raw, RecordType::Stdin, id, b"", 0);
        client.write_raw(&raw);
        let response = client.read_response(id);
        let json = response.json();
        assert_eq!(json["length"], len, "body of {len} bytes");
        assert_eq!(json["sha256"], sha256_hex(&body));
    }
}

#[test]
fn get_values_unknown_type_and_unknown_role() {
    let (_app, mut gateway) = iis_gateway("hello.app", &[]);
    let mut client = gateway.client();
    let mut raw = BytesMut::new();
    let mut names = BytesMut::new();
    for name in [
        "FCGI_MAX_CONNS",
        "FCGI_MAX_REQS",
        "FCGI_MPXS_CONNS",
        "FCGI_UNKNOWN_NAME",
    ] {
        protocol::encode_name_value(&mut names, name.as_bytes(), b"");
    }
    protocol::encode_header(&mut raw, RecordType::GetValues, 0, names.len() as u16, 0);
    raw.extend_from_slice(&names);
    client.write_raw(&raw);
    let Some(Record::GetValuesResult { content }) = client.read_record() else {
        panic!("expected FCGI_GET_VALUES_RESULT");
    };
    let values = protocol::decode_name_values(&content, &Default::default()).expect("pairs");
    assert_eq!(values.get(b"FCGI_MAX_CONNS"), Some(&b"1"[..]));
    assert_eq!(values.get(b"FCGI_MAX_REQS"), Some(&b"1"[..]));
    assert_eq!(values.get(b"FCGI_MPXS_CONNS"), Some(&b"0"[..]));
    assert_eq!(values.len(), 3, "unknown names are left out");

    let mut unknown = Vec::new();
    push_record(&mut unknown, RecordType::BeginRequest, 0, b"", 0);
    unknown[1] = 42; // a record type FastCGI 1.0 does not define
    client.write_raw(&unknown);
    assert_eq!(
        client.read_record(),
        Some(Record::UnknownType { record_type: 42 })
    );

    for role in [Role::Authorizer, Role::Filter] {
        let mut begin = BytesMut::new();
        protocol::encode_begin_request(&mut begin, 9, role, true);
        client.write_raw(&begin);
        let response = client.read_response(9);
        assert_eq!(response.protocol_status, ProtocolStatus::UnknownRole as u8);
    }
    // The connection still serves.
    let response = client.get(10, &iis_params(_app.path(), "GET", "/"));
    assert_eq!(response.status, 200);
}

#[test]
fn a_second_request_on_a_busy_connection_gets_cant_mpx_conn() {
    let (app, mut gateway) = iis_gateway("stream.slow_app", &[]);
    let mut client = gateway.client();
    let params = app.iis_params("GET", "/slow?n=2&size=5&sleep=0.3");
    client.send(&Send::new(1, &params));
    let mut begin = BytesMut::new();
    protocol::encode_begin_request(&mut begin, 2, Role::Responder, true);
    client.write_raw(&begin);
    // The refusal for request 2 comes first; request 1 completes normally.
    let refusal = client.read_record().expect("a record");
    assert_eq!(
        refusal,
        Record::EndRequest {
            request_id: 2,
            app_status: 0,
            protocol_status: ProtocolStatus::CantMpxConn as u8
        }
    );
    let response = client.read_response(1);
    assert_eq!(response.body, b"xxxxxxxxxx");
}

#[test]
fn serves_over_bound_tcp_unix_and_an_inherited_listener() {
    let app = AppDir::new("hello.app", &[]);
    let params = app.iis_params("GET", "/");
    let socket = app.path().join("wfastcgi.sock");
    let gateways = [
        Gateway::bind(Address::Tcp(any_port()), app.path(), &[]),
        Gateway::bind(Address::Unix(socket), app.path(), &[]),
        Gateway::inherited_listener(app.path()),
    ];
    for gateway in &gateways {
        // Several connections, several requests each.
        for _ in 0..3 {
            let mut client = gateway.connect();
            for id in 1..=3 {
                let response = client.get(id, &params);
                assert_eq!(response.text(), "Hello, World!\n");
            }
        }
    }
}

#[test]
fn without_keep_conn_the_connection_closes_after_the_response() {
    let app = AppDir::new("hello.app", &[]);
    let gateway = Gateway::bind(Address::Tcp(any_port()), app.path(), &[]);
    let params = app.iis_params("GET", "/");
    let mut client = gateway.connect();
    let mut request = Send::new(1, &params);
    request.keep_conn = false;
    let response = client.request(&request);
    assert_eq!(response.status, 200);
    assert!(
        client.is_closed(),
        "closed after a request without FCGI_KEEP_CONN"
    );
    let mut client = gateway.connect();
    assert_eq!(
        client.get(1, &params).status,
        200,
        "kept open with FCGI_KEEP_CONN"
    );
    assert_eq!(client.get(2, &params).status, 200);
}

#[test]
fn the_embedded_interpreter_is_the_one_the_build_used() {
    let (app, mut gateway) = iis_gateway(
        "hello.sys_app",
        &[("WFASTCGI_TEST_SETTING", "from web.config")],
    );
    let mut client = gateway.client();
    let json = client.get(1, &app.iis_params("GET", "/")).json();
    let build_python = std::process::Command::new(env!("WFASTCGI_BUILD_PYTHON"))
        .args(["-c", "import sys; print(sys.version.split()[0])"])
        .output()
        .expect("run the build interpreter");
    let build_version = String::from_utf8_lossy(&build_python.stdout)
        .trim()
        .to_owned();
    assert_eq!(
        json["version"],
        build_version.as_str(),
        "not another libpython on the loader path"
    );
    let app_dir = app
        .path()
        .canonicalize()
        .expect("path")
        .to_string_lossy()
        .into_owned();
    assert_eq!(json["cwd"], app_dir.as_str(), "chdir to the app folder");
    assert_eq!(
        json["path"][0],
        app_dir.as_str(),
        "app folder first on sys.path"
    );
    let apps = apps_dir().to_string_lossy().into_owned();
    assert!(
        json["path"]
            .as_array()
            .expect("list")
            .iter()
            .any(|p| p == apps.as_str()),
        "PYTHONPATH appended"
    );
    assert_eq!(
        json["settings_env"], "from web.config",
        "app settings reach os.environ"
    );
}

#[test]
fn environ_follows_pep_3333_and_wfastcgi() {
    let (app, mut gateway) = iis_gateway("hello.environ_app", &[]);
    let mut client = gateway.client();
    let mut params = app.iis_params("GET", "/shop/caf?x=1");
    set_param(&mut params, "APPL_MD_PATH", "/LM/W3SVC/1/ROOT/shop");
    set_param(&mut params, "HTTPS", "on");
    set_param(&mut params, "UNENCODED_URL", "/shop/caf%C3%A9?x=1");
    set_param(&mut params, "HTTP_X_ORIGINAL_URL", "/shop/caf?x=1");
    set_param(&mut params, "HTTP_X_CUSTOM", "caf\u{e9}");
    let env = client.get(1, &params).json();
    assert_eq!(env["SCRIPT_NAME"], "/shop", "sub-application mount point");
    // UTF-8 bytes of "é", seen as ISO-8859-1 characters (PEP 3333).
    assert_eq!(env["PATH_INFO"], "/caf\u{c3}\u{a9}");
    assert_eq!(env["wsgi.path_info"], "/caf\u{c3}\u{a9}");
    assert_eq!(env["QUERY_STRING"], "x=1");
    assert_eq!(env["wsgi.query_string"], "x=1");
    assert_eq!(env["wfastcgi.http_x_original_url"], "/shop/caf?x=1");
    assert_eq!(env["HTTP_X_CUSTOM"], "caf\u{c3}\u{a9}");
    assert_eq!(env["wsgi.url_scheme"], "https");
    assert_eq!(env["wsgi.version"], serde_json::json!([1, 0]));
    assert_eq!(env["wsgi.multithread"], false);
    assert_eq!(env["wsgi.multiprocess"], true);
    assert_eq!(env["wsgi.run_once"], false);
    assert_eq!(env["wsgi.input_terminated"], true);
    assert!(
        env.get("CONTENT_LENGTH").is_none(),
        "empty CONTENT_LENGTH is left out"
    );

    // Root site: SCRIPT_NAME cleared, PATH_INFO from IIS without the query.
    let env = client
        .get(2, &app.iis_params("GET", "/polls/3/?page=2"))
        .json();
    assert_eq!(env["SCRIPT_NAME"], "");
    assert_eq!(env["PATH_INFO"], "/polls/3/");
    assert_eq!(env["wsgi.url_scheme"], "http");
}

#[test]
fn script_name_and_allow_path_info_settings() {
    let (app, mut gateway) = iis_gateway("hello.environ_app", &[("SCRIPT_NAME", "/App")]);
    let mut client = gateway.client();
    let env = client.get(1, &app.iis_params("GET", "/app/page")).json();
    assert_eq!(
        (env["SCRIPT_NAME"].as_str(), env["PATH_INFO"].as_str()),
        (Some("/app"), Some("/page"))
    );

    let (app, mut gateway) = iis_gateway(
        "hello.environ_app",
        &[("AllowPathInfoForScriptMappings", "1")],
    );
    let mut client = gateway.client();
    let mut params = app.iis_params("GET", "/handler.fcgi/rest");
    set_param(&mut params, "SCRIPT_NAME", "/handler.fcgi");
    set_param(&mut params, "PATH_INFO", "/rest");
    let env = client.get(1, &params).json();
    assert_eq!(
        (env["SCRIPT_NAME"].as_str(), env["PATH_INFO"].as_str()),
        (Some("/handler.fcgi"), Some("/rest"))
    );
}

#[test]
fn wsgiref_validator_passes() {
    for handler in ["hello.validated", "hello.validated_echo"] {
        let (app, mut gateway) = iis_gateway(handler, &[]);
        let mut client = gateway.client();
        let body = b"some body bytes\nline two";
        let mut params = app.iis_params("POST", "/v");
        set_param(&mut params, "CONTENT_LENGTH", &body.len().to_string());
        set_param(&mut params, "CONTENT_TYPE", "text/plain");
        let response = client.request(&Send::new(1, &params).body(body));
        assert_eq!(
            response.status,
            200,
            "{handler}: {} {}",
            response.text(),
            response.stderr_text()
        );
        assert!(response.stderr.is_empty(), "{}", response.stderr_text());
    }
}

#[test]
fn streaming_generator_and_write_callable() {
    let (app, mut gateway) = iis_gateway("stream.app", &[]);
    let mut client = gateway.client();
    let response = client.get(1, &app.iis_params("GET", "/s?n=40&size=100000"));
    assert_eq!(response.body.len(), 4_000_000);
    assert!(response.stdout_records.iter().all(|&n| n <= 65535));

    let (app, mut gateway) = iis_gateway("stream.write_app", &[]);
    let mut client = gateway.client();
    assert_eq!(
        client.get(1, &app.iis_params("GET", "/")).text(),
        "one\ntwo\nend"
    );

    let (app, mut gateway) = iis_gateway("stream.lazy_app", &[]);
    let mut client = gateway.client();
    assert_eq!(
        client.get(1, &app.iis_params("GET", "/?n=3&size=2")).text(),
        "xxxxxx"
    );
}

#[test]
fn input_reading_methods() {
    let body = b"first line\nsecond, a longer line\n\nno newline at the end";
    let lines: Vec<usize> = vec![11, 22, 1, 21];
    for handler in ["echo.readline_app", "echo.readlines_app", "echo.iter_app"] {
        let (app, mut gateway) = iis_gateway(handler, &[]);
        let mut client = gateway.client();
        let mut params = app.iis_params("POST", "/");
        set_param(&mut params, "CONTENT_LENGTH", &body.len().to_string());
        let mut request = Send::new(1, &params).body(body);
        request.stdin_record = 5; // lines cross record boundaries
        let json = client.request(&request).json();
        assert_eq!(json["lines"], serde_json::json!(lines), "{handler}");
        assert_eq!(json["sha256"], sha256_hex(body));
    }
    let (app, mut gateway) = iis_gateway("echo.readline_limit_app", &[]);
    let mut client = gateway.client();
    let mut params = app.iis_params("POST", "/");
    set_param(&mut params, "CONTENT_LENGTH", &body.len().to_string());
    let json = client.request(&Send::new(1, &params).body(body)).json();
    let lengths: Vec<u64> = json["lines"]
        .as_array()
        .expect("list")
        .iter()
        .filter_map(|v| v.as_u64())
        .collect();
    assert!(lengths.iter().all(|&n| n <= 10), "{lengths:?}");
    assert_eq!(lengths.iter().sum::<u64>(), body.len() as u64);

    let (app, mut gateway) = iis_gateway("echo.read_all_app", &[]);
    let mut client = gateway.client();
    // No CONTENT_LENGTH: the body ends with the empty STDIN record.
    let params = app.iis_params("POST", "/");
    let json = client.request(&Send::new(1, &params).body(body)).json();
    assert_eq!(json["length"], body.len());
    // CONTENT_LENGTH shorter than what is sent: only CONTENT_LENGTH bytes are the body.
    let mut params = app.iis_params("POST", "/");
    set_param(&mut params, "CONTENT_LENGTH", "5");
    let json = client.request(&Send::new(2, &params).body(body)).json();
    assert_eq!(json["length"], 5);
}

#[test]
fn an_ignored_body_does_not_break_the_connection() {
    let (app, mut gateway) = iis_gateway("echo.ignore_body_app", &[]);
    let mut client = gateway.client();
    let body = bytes_of(1_000_000, 3);
    let mut params = app.iis_params("POST", "/");
    set_param(&mut params, "CONTENT_LENGTH", &body.len().to_string());
    for id in 1..=3 {
        let response = client.request(&Send::new(id, &params).body(&body));
        assert_eq!(response.text(), "ignored");
    }
}

#[test]
fn abort_stops_the_response_and_closes_the_iterable() {
    let (app, mut gateway) = iis_gateway("stream.slow_app", &[]);
    let mut client = gateway.client();
    let params = app.iis_params("GET", "/?n=50&size=10&sleep=0.05");
    client.send(&Send::new(7, &params));
    std::thread::sleep(Duration::from_millis(200));
    client.abort(7);
    let response = client.read_response(7);
    assert!(
        response.body.len() < 500,
        "stopped early: {} bytes",
        response.body.len()
    );
    assert!(app
        .wait_for_log("aborted")
        .contains("request aborted by the web server"));
    // The connection and the process keep serving.
    let response = client.get(8, &app.iis_params("GET", "/?n=1&size=3&sleep=0"));
    assert_eq!(response.text(), "xxx");
}

#[test]
fn close_is_called_once_per_request_and_on_abort() {
    let (app, mut gateway) = iis_gateway("errors.tracked", &[]);
    let mut client = gateway.client();
    for id in 1..=3 {
        assert_eq!(
            client.get(id, &app.iis_params("GET", "/")).text(),
            "tracked"
        );
    }
    assert_eq!(client.get(4, &app.iis_params("GET", "/count")).text(), "3");
    client.send(&Send::new(5, &app.iis_params("GET", "/slow")));
    std::thread::sleep(Duration::from_millis(200));
    client.abort(5);
    let response = client.read_response(5);
    assert!(response.body.len() < 100, "stopped early");
    assert_eq!(client.get(6, &app.iis_params("GET", "/count")).text(), "4");
}

#[test]
fn print_output_goes_to_the_log_not_the_client() {
    let (app, mut gateway) = iis_gateway("errors.prints_app", &[]);
    let mut client = gateway.client();
    let response = client.get(1, &app.iis_params("GET", "/"));
    assert_eq!(response.text(), "printed");
    assert!(response.stderr.is_empty());
    let log = app.wait_for_log("wsgi.errors");
    assert!(log.contains("stdout"), "{log}");
    assert!(log.contains("stderr"), "{log}");
}

#[test]
fn standard_input_that_is_not_a_connection_is_an_error() {
    let output = std::process::Command::new(BINARY)
        .stdin(std::process::Stdio::null())
        .output()
        .expect("run");
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("standard input is not a socket"),
        "{stderr}"
    );
    let output = std::process::Command::new(BINARY)
        .arg("--version")
        .output()
        .expect("run");
    assert!(String::from_utf8_lossy(&output.stdout).starts_with("wfastcgi "));
}

#[test]
fn a_malformed_record_closes_only_that_connection() {
    let app = AppDir::new("hello.app", &[]);
    let gateway = Gateway::bind(Address::Tcp(any_port()), app.path(), &["--threads", "1"]);
    let params = app.iis_params("GET", "/");
    let mut bad = gateway.connect();
    bad.write_raw(&[2, 1, 0, 1, 0, 8, 0, 0]); // version 2
    assert!(bad.is_closed(), "a protocol error closes the connection");
    let log = app.wait_for_log("protocol error");
    assert!(log.contains("unsupported FastCGI version 2"), "{log}");
    // A truncated record at end of stream is reported too.
    let mut truncated = gateway.connect();
    truncated.write_raw(&[1, 1, 0, 1, 0, 8]);
    drop(truncated);
    assert!(app
        .wait_for_log("stream ended inside a record")
        .contains("stream ended inside a record"));
    let mut good = gateway.connect();
    assert_eq!(
        good.get(1, &params).status,
        200,
        "the process keeps serving"
    );
}

/// Loading the application ends with `gc.freeze()`, so a full collection does not walk the
/// framework again in the middle of requests; `WSGI_GC_FREEZE=off` leaves the collector alone
/// (CPython 3.12 starts with a few hundred objects frozen of its own), and a value that is
/// neither is the reason for every request's 500.
#[test]
fn the_loaded_application_is_frozen_out_of_the_collectors_way() {
    let frozen = |handler: &str, setting: Option<&str>| -> usize {
        let settings: Vec<(&str, &str)> =
            setting.map(|v| ("WSGI_GC_FREEZE", v)).into_iter().collect();
        let (_app, _gateway, response) = answer(handler, &settings);
        assert_eq!(
            response.status,
            200,
            "{handler} {setting:?}: {}",
            response.text()
        );
        response.text().trim().parse().expect("a count")
    };
    for (handler, off) in [("gc_state.app", "off"), ("gc_state.asgi_app", "OFF")] {
        let left_alone = frozen(handler, Some(off));
        for setting in [None, Some("on")] {
            let count = frozen(handler, setting);
            assert!(
                count > left_alone + 1000,
                "{handler} {setting:?}: {count} objects frozen, {left_alone} with {off}"
            );
        }
    }
    let (_app, _gateway, response) = answer("gc_state.app", &[("WSGI_GC_FREEZE", "maybe")]);
    assert_eq!(response.status, 500);
    assert!(
        response
            .stderr_text()
            .contains(r#"app setting WSGI_GC_FREEZE="maybe" is invalid: expected on or off"#),
        "{}",
        response.stderr_text()
    );
}
