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
    let log = app.wait_for_log("Asgi handler");
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
