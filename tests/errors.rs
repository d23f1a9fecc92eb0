//! Broken applications and set-ups: each gets a specific log line and a proper FastCGI answer,
//! and the process keeps serving.

mod common;

use common::*;

#[test]
fn exception_in_the_call() {
    assert_500("errors.call_error", "ValueError: boom in call");
}

#[test]
fn start_response_misuse() {
    assert_500("errors.bad_header", "header X-Bad: \"a\\nb\" is invalid");
    assert_500("errors.bad_status", "status \"abc\" is invalid");
    assert_500(
        "errors.start_twice",
        "start_response() called a second time without exc_info",
    );
    assert_500(
        "errors.no_start_response",
        "before calling start_response()",
    );
}

#[test]
fn bodies_that_are_not_bytes() {
    assert_500(
        "errors.non_bytes_body",
        "yielded a str; WSGI bodies are bytes",
    );
    assert_500(
        "errors.returns_str",
        "returned a str; it must return an iterable of bytes",
    );
    assert_500("errors.returns_none", "returned a NoneType");
}

#[test]
fn sys_exit_in_the_application_does_not_end_the_process() {
    assert_500("errors.sys_exit_app", "SystemExit: 3");
}

#[test]
fn exc_info_replaces_the_status_before_the_body() {
    let (_app, _gateway, response) = answer("errors.exc_info_app", &[]);
    assert_eq!(response.status, 500);
    assert!(
        response.stderr.is_empty(),
        "a handled error is not a failure"
    );
}

#[test]
fn failure_after_the_headers_cuts_the_response() {
    for (handler, detail) in [
        ("errors.iter_error", "RuntimeError: boom in iteration"),
        ("errors.close_error", "RuntimeError: boom in close"),
    ] {
        let (app, mut gateway, response) = answer(handler, &[]);
        assert_eq!(response.status, 200, "{handler}");
        assert!(
            response.stderr.is_empty(),
            "{handler}: no STDERR once the response started"
        );
        assert_eq!(response.app_status, 1, "{handler}");
        let log = app.wait_for_log(detail);
        assert!(
            log.contains("failed after the headers were sent"),
            "{handler}:\n{log}"
        );
        assert_eq!(
            gateway.client().get(2, &app.iis_params("GET", "/")).status,
            200
        );
    }
}

#[test]
fn generic_error_detail_sends_no_traceback() {
    let (app, _gateway, response) =
        answer("errors.call_error", &[("WSGI_ERROR_DETAIL", "generic")]);
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
fn import_failure_keeps_the_process_up_with_the_reason() {
    let (app, mut gateway, response) = answer("import_error.app", &[]);
    assert_eq!(response.status, 500);
    let stderr = response.stderr_text();
    assert!(
        stderr.contains("Error occurred while reading WSGI handler \"import_error.app\""),
        "{stderr}"
    );
    assert!(
        stderr.contains("ImportError: simulated import failure"),
        "{stderr}"
    );
    for id in 2..=3 {
        let again = gateway.client().get(id, &app.iis_params("GET", "/"));
        assert_eq!(again.status, 500);
    }
    let log = app.wait_for_log("simulated import failure");
    assert_eq!(
        log.matches("the application cannot be loaded").count(),
        1,
        "logged once:\n{log}"
    );
}

#[test]
fn handler_resolution_errors_are_specific() {
    let cases = [
        ("no_such_module.app", "No module named 'no_such_module'"),
        (
            "hello.no_such_attribute",
            "has no attribute 'no_such_attribute'",
        ),
        ("hello.BODY", "is a bytes, not a callable"),
        ("hello", "it names no module"),
    ];
    for (handler, detail) in cases {
        let (_app, _gateway, response) = answer(handler, &[]);
        assert_eq!(response.status, 500, "{handler}");
        assert!(
            response.stderr_text().contains(detail),
            "{handler}: {}",
            response.stderr_text()
        );
    }
}

#[test]
fn handler_forms_that_resolve() {
    // module:attribute, and a call in the middle of the dotted name.
    for handler in [
        "hello:app",
        "hello.make().app",
        "hello:make().app",
        "hello.app",
    ] {
        let (_app, _gateway, response) = answer(handler, &[]);
        assert_eq!(
            response.status,
            200,
            "{handler}: {}",
            response.stderr_text()
        );
    }
}

#[test]
fn missing_handler_and_bad_web_config() {
    let app = AppDir::new("hello.app", &[]);
    std::fs::write(
        app.path().join("web.config"),
        "<configuration><appSettings></appSettings></configuration>",
    )
    .expect("write");
    let mut gateway = Gateway::iis(&[]);
    let response = gateway.client().get(1, &app.iis_params("GET", "/"));
    assert_eq!(response.status, 500);
    assert!(
        response.stderr_text().contains("WSGI_HANDLER is not set"),
        "{}",
        response.stderr_text()
    );

    let app = AppDir::new("hello.app", &[]);
    std::fs::write(
        app.path().join("web.config"),
        "<configuration><appSettings><add key='A'></configuration>",
    )
    .expect("write");
    let mut gateway = Gateway::iis(&[]);
    let response = gateway.client().get(1, &app.iis_params("GET", "/"));
    assert_eq!(response.status, 500);
    assert!(
        response.stderr_text().contains("web.config: XML error"),
        "{}",
        response.stderr_text()
    );
}

#[test]
fn a_bad_virtualenv_is_named() {
    let (_app, _gateway, response) = answer("hello.app", &[("WSGI_VENV", "/nonexistent/venv")]);
    assert_eq!(response.status, 500);
    assert!(
        response
            .stderr_text()
            .contains("virtualenv /nonexistent/venv is not usable"),
        "{}",
        response.stderr_text()
    );
    // With --bind the same mistake stops the start-up with the message.
    let app = AppDir::new("hello.app", &[("WSGI_VENV", "/nonexistent/venv")]);
    let output = std::process::Command::new(BINARY)
        .args(["serve", "--bind", "127.0.0.1:0", "--app-dir"])
        .arg(app.path())
        .output()
        .expect("run");
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("is not usable"));
}
