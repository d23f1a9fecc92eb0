//! Restart on file change without losing a request, graceful shutdown, finalisation, log files.

mod common;

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;

const EXIT_LIMIT: Duration = Duration::from_secs(15);

/// An IIS-style gateway that has served one request, so the app is loaded and watched.
fn watched(handler: &str, settings: &[(&str, &str)]) -> (AppDir, Gateway) {
    let app = AppDir::new(handler, settings);
    let mut gateway = Gateway::iis(&[]);
    let warm_up = gateway
        .client()
        .get(1, &app.iis_params("GET", "/?n=1&size=1&sleep=0"));
    assert_eq!(warm_up.status, 200, "{}", warm_up.stderr_text());
    app.wait_for_log("watching");
    (app, gateway)
}

fn touch(path: &Path) {
    std::fs::write(path, b"# changed\n").expect("write file");
}

fn assert_still_running(gateway: &mut Gateway, app: &AppDir) {
    assert!(
        gateway.wait_exit(Duration::from_millis(1500)).is_none(),
        "restarted:\n{}",
        app.log()
    );
    let response = gateway
        .client()
        .get(9, &app.iis_params("GET", "/?n=1&size=1&sleep=0"));
    assert_eq!(response.status, 200);
}

#[test]
fn a_change_waits_for_the_request_in_flight_then_exits() {
    let (app, mut gateway) = watched("stream.slow_app", &[]);
    let mut client = gateway.client();
    client.send(&Send::new(
        2,
        &app.iis_params("GET", "/?n=5&size=10&sleep=0.2"),
    ));
    std::thread::sleep(Duration::from_millis(200));
    touch(&app.path().join("models.py"));
    let response = client.read_response(2);
    assert_eq!(response.body.len(), 50, "the request in flight is complete");
    // No new request is taken in between: refused, or the stream is already closed.
    client.send(&Send::new(
        3,
        &app.iis_params("GET", "/?n=1&size=1&sleep=0"),
    ));
    if let Some(record) = client.read_record() {
        let mut response_bytes = vec![record];
        while let Some(record) = client.read_record() {
            response_bytes.push(record);
        }
        let stdout: Vec<u8> = response_bytes
            .iter()
            .filter_map(|r| match r {
                wfastcgi::protocol::Record::Stdout { content, .. } => Some(content.to_vec()),
                _ => None,
            })
            .flatten()
            .collect();
        assert!(
            String::from_utf8_lossy(&stdout).starts_with("Status: 503"),
            "refused"
        );
    }
    let status = gateway
        .wait_exit(EXIT_LIMIT)
        .expect("exits after the request");
    assert!(status.success(), "{status:?}");
    let log = app.log();
    assert!(log.contains("models.py changed"), "{log}");
    // As IIS does, start a fresh process for the next request.
    let mut fresh = Gateway::iis(&[]);
    let response = fresh
        .client()
        .get(1, &app.iis_params("GET", "/?n=1&size=2&sleep=0"));
    assert_eq!(response.text(), "xx");
}

#[test]
fn changes_that_do_not_match_do_not_restart() {
    let (app, mut gateway) = watched("stream.slow_app", &[]);
    touch(&app.path().join("notes.txt"));
    std::fs::create_dir(app.path().join("__pycache__")).expect("mkdir");
    touch(&app.path().join("__pycache__/x.pyc"));
    touch(&app.path().join("__pycache__/x.py"));
    assert_still_running(&mut gateway, &app);
    // The watcher was alive all along: a matching change restarts.
    touch(&app.path().join("web.config.bak.config"));
    assert!(gateway.wait_exit(EXIT_LIMIT).expect("restarts").success());
}

#[test]
fn an_empty_pattern_never_restarts() {
    let (app, mut gateway) = watched("stream.slow_app", &[("WSGI_RESTART_FILE_REGEX", "")]);
    touch(&app.path().join("app.py"));
    assert_still_running(&mut gateway, &app);
    assert!(app.log().contains("not watching"));
}

#[test]
fn a_new_sub_folder_is_watched() {
    let (app, mut gateway) = watched("stream.slow_app", &[]);
    let sub = app.path().join("pkg/inner");
    std::fs::create_dir_all(&sub).expect("mkdir");
    touch(&sub.join("views.py"));
    assert!(gateway.wait_exit(EXIT_LIMIT).expect("restarts").success());
    assert!(app.log().contains("views.py changed"), "{}", app.log());
}

#[test]
fn extra_watched_folders_and_polling() {
    for poll in [None, Some("0.2")] {
        let extra = tempfile::tempdir().expect("tempdir");
        let extra_path = extra.path().to_string_lossy().into_owned();
        let mut settings = vec![("WSGI_WATCHER_DIRS", extra_path.as_str())];
        if let Some(interval) = poll {
            settings.push(("WSGI_WATCHER_POLL", interval));
        }
        let (app, mut gateway) = watched("stream.slow_app", &settings);
        std::thread::sleep(Duration::from_millis(500)); // the poller's first scan
        touch(&extra.path().join("shared.py"));
        let status = gateway.wait_exit(EXIT_LIMIT).expect("restarts");
        assert!(status.success());
        let log = app.log();
        assert!(log.contains("shared.py changed"), "{log}");
        if poll.is_some() {
            assert!(log.contains("(polling)"), "{log}");
        }
    }
}

#[test]
fn an_invalid_pattern_is_logged_and_the_default_used() {
    let (app, mut gateway) = watched(
        "stream.slow_app",
        &[("WSGI_RESTART_FILE_REGEX", r".*(?<!test)\.py$")],
    );
    assert!(
        app.log()
            .contains(r#"WSGI_RESTART_FILE_REGEX ".*(?<!test)\\.py$" cannot be used"#),
        "{}",
        app.log()
    );
    touch(&app.path().join("notes.txt"));
    assert_still_running(&mut gateway, &app);
    touch(&app.path().join("app.py"));
    assert!(gateway
        .wait_exit(EXIT_LIMIT)
        .expect("restarts with the default")
        .success());
}

#[test]
fn an_import_failure_is_fixed_by_editing_the_file() {
    let app = AppDir::new("fixme.app", &[]);
    std::fs::write(
        app.path().join("fixme.py"),
        "raise ImportError('not yet')\n",
    )
    .expect("write");
    let mut gateway = Gateway::iis(&[]);
    let response = gateway.client().get(1, &app.iis_params("GET", "/"));
    assert_eq!(response.status, 500);
    app.wait_for_log("watching");
    std::fs::write(app.path().join("fixme.py"), "from hello import app\n").expect("write");
    assert!(gateway.wait_exit(EXIT_LIMIT).expect("restarts").success());
    let mut fresh = Gateway::iis(&[]);
    assert_eq!(
        fresh.client().get(1, &app.iis_params("GET", "/")).text(),
        "Hello, World!\n"
    );
}

#[test]
fn sigterm_lets_the_request_in_flight_finish() {
    let (app, mut gateway) = watched("stream.slow_app", &[]);
    let mut client = gateway.client();
    client.send(&Send::new(
        2,
        &app.iis_params("GET", "/?n=4&size=10&sleep=0.2"),
    ));
    std::thread::sleep(Duration::from_millis(200));
    gateway.signal(libc::SIGTERM);
    assert_eq!(client.read_response(2).body.len(), 40);
    let status = gateway.wait_exit(EXIT_LIMIT).expect("exits");
    assert_eq!(status.code(), Some(0));
}

#[test]
fn a_second_signal_exits_at_once() {
    let (app, mut gateway) = watched("stream.slow_app", &[]);
    let mut client = gateway.client();
    client.send(&Send::new(
        2,
        &app.iis_params("GET", "/?n=100&size=10&sleep=0.1"),
    ));
    std::thread::sleep(Duration::from_millis(200));
    gateway.signal(libc::SIGTERM);
    std::thread::sleep(Duration::from_millis(100));
    gateway.signal(libc::SIGTERM);
    let started = Instant::now();
    gateway.wait_exit(EXIT_LIMIT).expect("exits");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "did not wait for the 10 s request"
    );
    assert!(app.log().contains("second signal"), "{}", app.log());
}

#[test]
fn atexit_runs_and_application_threads_do_not_hold_the_exit() {
    let app = AppDir::new("lingering.app", &[("WSGI_RESTART_GRACE", "1")]);
    let marker = app.path().join("atexit-ran");
    std::fs::write(
        app.path().join("lingering.py"),
        format!(
            "import atexit, threading, time\n\
             from hello import app\n\
             atexit.register(lambda: open({marker:?}, 'w').write('yes'))\n\
             threading.Thread(target=time.sleep, args=(3600,), name='sleeper').start()\n",
            marker = marker.to_string_lossy()
        ),
    )
    .expect("write");
    let mut gateway = Gateway::iis(&[]);
    assert_eq!(
        gateway.client().get(1, &app.iis_params("GET", "/")).status,
        200
    );
    gateway.signal(libc::SIGTERM);
    let started = Instant::now();
    let status = gateway
        .wait_exit(EXIT_LIMIT)
        .expect("exits despite the sleeping thread");
    assert!(status.success());
    assert!(started.elapsed() < Duration::from_secs(8));
    assert_eq!(
        std::fs::read_to_string(&marker).ok().as_deref(),
        Some("yes"),
        "atexit ran"
    );
    assert!(
        app.log()
            .contains("threads still running after 1s: sleeper"),
        "{}",
        app.log()
    );
}

#[test]
fn bind_mode_restarts_in_place_without_failing_a_request() {
    let app = AppDir::new("hello.app", &[]);
    let gateway = Gateway::bind(Address::Tcp(any_port()), app.path(), &[]);
    app.wait_for_log("watching");
    let params = app.iis_params("GET", "/");
    let stop = Arc::new(AtomicBool::new(false));
    let address = gateway.address.clone().expect("address");
    let (served, failures, load) = keep_requesting(address, params, stop.clone());
    std::thread::sleep(Duration::from_millis(500));
    let before = served.load(Ordering::Relaxed);
    touch(&app.path().join("app.py"));
    let log = app.wait_for_log("the listening socket stays open");
    assert!(log.contains("app.py changed"), "{log}");
    // The re-executed process loads the app again and keeps serving.
    let deadline = Instant::now() + Duration::from_secs(20);
    while app
        .log()
        .matches("WSGI handler \"hello.app\" loaded")
        .count()
        < 2
        && Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_millis(500));
    stop.store(true, Ordering::Relaxed);
    load.join().expect("load thread");
    assert_eq!(
        failures.load(Ordering::Relaxed),
        0,
        "no request failed across the restart"
    );
    assert!(
        served.load(Ordering::Relaxed) > before + 10,
        "served during and after the restart"
    );
    assert_eq!(
        app.log()
            .matches("WSGI handler \"hello.app\" loaded")
            .count(),
        2,
        "{}",
        app.log()
    );
    let mut client = gateway.connect();
    assert_eq!(
        client.get(1, &app.iis_params("GET", "/")).status,
        200,
        "same process id, new code"
    );
}

#[test]
fn a_log_that_cannot_be_opened_is_reported_once() {
    let (_holder, app) = app_with_an_unopenable_log("hello.app");
    let mut gateway = Gateway::iis(&[]);
    assert_log_problem_reported_once(&mut gateway.client(), &app);
}

#[test]
fn hourly_rotation_names_the_file_by_the_hour() {
    let app = AppDir::new("hello.app", &[("WSGI_LOG_ROTATE", "hourly")]);
    let mut gateway = Gateway::iis(&[]);
    assert_eq!(
        gateway.client().get(1, &app.iis_params("GET", "/")).status,
        200
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    let rotated = loop {
        let found = std::fs::read_dir(app.path())
            .expect("list")
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .find(|name| name.starts_with("wfastcgi.log."));
        if found.is_some() || Instant::now() > deadline {
            break found;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let name = rotated.expect("an hourly log file");
    assert_eq!(name.len(), "wfastcgi.log.YYYY-MM-DD-HH".len(), "{name}");
}
