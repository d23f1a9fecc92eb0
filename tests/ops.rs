//! Operations against the real binary: the stuck-request watchdog, slow-request stacks, stack
//! dumps on SIGUSR1, and recycling, under IIS (fd 0 a stream) and with `--bind`, alone and with
//! `--processes 2`.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::*;

fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting: {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `serve --processes 2` plus `args`, once both workers are ready.
fn two_workers(app: &AppDir, args: &[&str]) -> Gateway {
    let mut all = vec!["--processes", "2"];
    all.extend_from_slice(args);
    let gateway = Gateway::bind(Address::Tcp(any_port()), app.path(), &all);
    wait_until("two workers", || {
        app.log().matches("ready (pid").count() == 2
    });
    gateway
}

/// Under IIS with WSGI_REQUEST_TIMEOUT=1, `path` of `handler` is answered 504 and the process
/// exits 0; its log.
fn iis_answered_504_then_exit_0(handler: &str, path: &str) -> String {
    let app = AppDir::new(handler, &[("WSGI_REQUEST_TIMEOUT", "1")]);
    let mut gateway = Gateway::iis(&[]);
    let mut client = gateway.client();
    let response = client.get(1, &app.iis_params("GET", path));
    assert_eq!(response.status, 504, "{}", app.log());
    let status = gateway
        .wait_exit(Duration::from_secs(20))
        .expect("the process exits");
    assert_eq!(status.code(), Some(0), "{}", app.log());
    app.log()
}

#[test]
fn iis_a_stuck_request_is_logged_answered_504_and_the_process_exits_0() {
    let log = iis_answered_504_then_exit_0("ops.app", "/spin?stuck");
    assert!(log.contains("GET /spin?stuck is stuck"), "{log}");
    assert!(log.contains("WSGI_REQUEST_TIMEOUT=1"), "{log}");
    assert!(log.contains("answered 504 Gateway Timeout"), "{log}");
    // Every frame, down to the loop itself.
    assert!(log.contains("in app\n"), "{log}");
    assert!(log.contains("in spin_forever\n"), "{log}");
    assert!(log.contains("tests/apps/ops.py\", line "), "{log}");
    assert!(log.contains("without finalising Python"), "{log}");
}

#[test]
fn iis_the_watchdogs_504_has_an_access_line() {
    let app = AppDir::new(
        "ops.app",
        &[
            ("WSGI_REQUEST_TIMEOUT", "1"),
            ("WSGI_ACCESS_LOG", "access.log"),
        ],
    );
    let mut gateway = Gateway::iis(&[]);
    let mut client = gateway.client();
    assert_eq!(client.get(1, &app.iis_params("GET", "/")).status, 200);
    let response = client.get(2, &app.iis_params("GET", "/spin?stuck"));
    assert_eq!(response.status, 504);
    gateway
        .wait_exit(Duration::from_secs(20))
        .expect("the process exits");
    let lines = lines_of(&app.path().join("access.log"), 2);
    assert_eq!(lines.len(), 2, "{lines:?}");
    assert!(
        lines[1].contains(&format!(
            "\"GET /spin?stuck HTTP/1.1\" 504 {} ",
            response.body.len()
        )),
        "{lines:?}"
    );
}

#[test]
fn iis_a_stuck_response_already_started_is_cut_short() {
    let app = AppDir::new("ops.app", &[("WSGI_REQUEST_TIMEOUT", "1")]);
    let mut gateway = Gateway::iis(&[]);
    let mut client = gateway.client();
    let response = client.get(1, &app.iis_params("GET", "/?started"));
    assert_eq!(response.status, 200);
    assert_eq!(response.text(), "first chunk\n");
    assert_eq!(response.app_status, 1, "ended as a failure");
    assert_eq!(
        gateway
            .wait_exit(Duration::from_secs(20))
            .and_then(|s| s.code()),
        Some(0)
    );
    let log = app.log();
    assert!(log.contains("already started, is cut short"), "{log}");
    assert!(log.contains("in started\n"), "{log}");
}

#[test]
fn iis_a_slow_request_has_its_stack_logged_and_is_served() {
    let app = AppDir::new("ops.app", &[("WSGI_SLOW_REQUEST_LOG", "0.3")]);
    let mut gateway = Gateway::iis(&[]);
    let mut client = gateway.client();
    let response = client.get(1, &app.iis_params("GET", "/?nap=1"));
    assert_eq!(response.status, 200);
    let log = app.wait_for_log("in nap\n");
    assert!(log.contains("GET /?nap=1 is slow"), "{log}");
    assert!(log.contains("time.sleep(seconds)"), "{log}");
    // Logged once, and the process keeps serving.
    assert_eq!(log.matches(" is slow").count(), 1, "{log}");
    assert_eq!(client.get(2, &app.iis_params("GET", "/")).status, 200);
    assert!(gateway.child.try_wait().expect("wait").is_none());
}

#[test]
fn sigusr1_dumps_every_threads_python_stack() {
    let app = AppDir::new("ops.app", &[]);
    let mut gateway = Gateway::iis(&[]);
    let mut client = gateway.client();
    assert_eq!(client.get(1, &app.iis_params("GET", "/")).status, 200);
    gateway.signal(libc::SIGUSR1);
    let log = app.wait_for_log("in _background_sleeper");
    assert!(
        log.contains("SIGUSR1: the Python stack of every thread"),
        "{log}"
    );
    assert!(log.contains("ops-sleeper (most recent call last)"), "{log}");
    assert_eq!(client.get(2, &app.iis_params("GET", "/")).status, 200);
}

#[test]
fn processes_sigusr1_reaches_every_worker() {
    let app = AppDir::new("ops.app", &[]);
    let gateway = two_workers(&app, &[]);
    gateway.signal(libc::SIGUSR1);
    wait_until("both workers' stacks", || {
        app.log()
            .matches("SIGUSR1: the Python stack of every thread")
            .count()
            == 2
    });
    let log = app.log();
    assert!(log.contains("in _background_sleeper"), "{log}");
    assert_eq!(children(gateway.child.id()).len(), 2, "nobody died of it");
    assert_eq!(
        gateway.connect().get(1, &app.iis_params("GET", "/")).status,
        200
    );
}

#[test]
fn bind_a_stuck_request_restarts_the_process_in_place() {
    let app = AppDir::new("ops.app", &[("WSGI_REQUEST_TIMEOUT", "1")]);
    let gateway = Gateway::bind(Address::Tcp(any_port()), app.path(), &["--threads", "2"]);
    let mut stuck = gateway.connect();
    let before = gateway.connect().get(1, &app.iis_params("GET", "/")).text();
    let response = stuck.get(1, &app.iis_params("GET", "/?stuck"));
    assert_eq!(response.status, 504, "{}", app.log());
    app.wait_for_log("the listening socket stays open");
    wait_until("the application loads again", || {
        app.log().matches("WSGI handler \"ops.app\" loaded").count() == 2
    });
    let after = gateway.connect().get(1, &app.iis_params("GET", "/"));
    assert_eq!(after.status, 200);
    assert_eq!(after.text(), before, "the same process, executed afresh");
    assert!(app.log().contains("in spin_forever\n"));
}

#[test]
fn processes_a_worker_with_a_stuck_request_is_replaced() {
    let app = AppDir::new("ops.app", &[]);
    let gateway = two_workers(&app, &["--threads", "2", "--request-timeout", "1"]);
    let workers = children(gateway.child.id());
    let response = gateway.connect().get(1, &app.iis_params("GET", "/?stuck"));
    assert_eq!(response.status, 504);
    let log = app.wait_for_log("asks to be recycled");
    assert!(log.contains("in spin_forever\n"), "{log}");
    wait_until("a worker replaced", || {
        let now = children(gateway.child.id());
        now.len() == 2 && now.iter().filter(|pid| workers.contains(pid)).count() == 1
    });
    for n in 0..20 {
        let response = gateway.connect().get(1, &app.iis_params("GET", "/"));
        assert_eq!(response.status, 200, "request {n}");
    }
    assert!(
        !app.log().contains("exited:"),
        "exited 0, not counted as a crash"
    );
}

#[test]
fn iis_max_requests_recycles_after_the_last_response() {
    let app = AppDir::new("ops.app", &[("WSGI_MAX_REQUESTS", "3")]);
    let mut gateway = Gateway::iis(&[]);
    let mut client = gateway.client();
    for id in 1..=3 {
        assert_eq!(client.get(id, &app.iis_params("GET", "/")).status, 200);
    }
    let status = gateway.wait_exit(Duration::from_secs(20)).expect("exits");
    assert_eq!(status.code(), Some(0));
    let log = app.log();
    assert!(
        log.contains("recycling: 3 requests served (WSGI_MAX_REQUESTS=3"),
        "{log}"
    );
}

#[test]
fn check_reports_the_watchdog_against_iis_request_timeout() {
    let app = AppDir::new("ops.app", &[("WSGI_REQUEST_TIMEOUT", "120")]);
    let check = |dir: &std::path::Path| {
        let output = Command::new(BINARY)
            .arg("check")
            .arg(dir)
            .output()
            .expect("run check");
        String::from_utf8_lossy(&output.stdout).into_owned()
    };
    let report = check(app.path());
    assert!(
        report.contains(
            "warn  WSGI_REQUEST_TIMEOUT=120 s is not below requestTimeout=90 s (IIS's default)"
        ),
        "{report}"
    );
    // A longer requestTimeout in web.config's <fastCgi> makes it fine.
    let config = app.path().join("web.config");
    let text = std::fs::read_to_string(&config).expect("read");
    let text = text.replace(
        "</configuration>",
        "<system.webServer><fastCgi><application fullPath=\"C:\\wfastcgi.exe\" requestTimeout=\"300\" /></fastCgi></system.webServer></configuration>",
    );
    std::fs::write(&config, text).expect("write");
    let report = check(app.path());
    assert!(
        report.contains("ok    WSGI_REQUEST_TIMEOUT=120 s: a request running longer"),
        "{report}"
    );
    assert!(
        report.contains("requestTimeout=300 s, web.config's"),
        "{report}"
    );
    let bad = AppDir::new("ops.app", &[("WSGI_MAX_RSS", "lots")]);
    assert!(check(bad.path()).contains("FAIL  app setting WSGI_MAX_RSS=\"lots\" is invalid"));
}

#[test]
fn iis_max_rss_recycles_a_leaking_process() {
    let app = AppDir::new("ops.leak", &[("WSGI_MAX_RSS", "60")]);
    let mut gateway = Gateway::iis(&[]);
    let mut client = gateway.client();
    let mut served = 0;
    for id in 1..=200 {
        let mut request = Send::new(id, &[]);
        let params = app.iis_params("GET", "/");
        request.params = &params;
        client.send(&request);
        match client.read_record() {
            Some(_) => served += 1,
            None => break,
        }
        // The rest of this response.
        let _ = client.read_response(id);
    }
    let status = gateway.wait_exit(Duration::from_secs(20)).expect("exits");
    assert_eq!(status.code(), Some(0));
    assert!(
        served > 5 && served < 200,
        "recycled after {served} requests"
    );
    let log = app.log();
    assert!(log.contains("is above WSGI_MAX_RSS=60 MiB"), "{log}");
}

fn lines_of(path: &std::path::Path, count: usize) -> Vec<String> {
    let mut lines = Vec::new();
    wait_until("the access log lines", || {
        lines = std::fs::read_to_string(path)
            .unwrap_or_default()
            .lines()
            .map(str::to_owned)
            .collect();
        lines.len() >= count
    });
    lines
}

#[test]
fn iis_access_log_in_combined_format() {
    let app = AppDir::new("ops.app", &[("WSGI_ACCESS_LOG", "logs/access.log")]);
    let mut gateway = Gateway::iis(&[]);
    let mut client = gateway.client();
    let pid = client.get(1, &app.iis_params("GET", "/")).text();
    let mut params = app.iis_params("GET", "/a%20b?q=\"x\"");
    set_param(&mut params, "HTTP_REFERER", "http://example.com/");
    assert_eq!(client.get(2, &params).status, 200);
    let mut bad = app.iis_params("POST", "/upload");
    set_param(&mut bad, "CONTENT_LENGTH", "lots");
    assert_eq!(client.get(3, &bad).status, 400);
    let lines = lines_of(&app.path().join("logs/access.log"), 3);
    assert_eq!(lines.len(), 3, "{lines:?}");
    let fields = |line: &str| {
        let (host, rest) = line.split_once(" - - [").expect("start");
        let (_, rest) = rest.split_once("] ").expect("time");
        (host.to_owned(), rest.to_owned())
    };
    assert_eq!(
        fields(&lines[0]),
        (
            "127.0.0.1".to_owned(),
            format!(
                "\"GET / HTTP/1.1\" 200 {} \"-\" \"wfastcgi-tests\"",
                pid.len()
            )
        )
    );
    assert_eq!(
        fields(&lines[1]).1,
        format!(
            "\"GET /a%20b?q=\\\"x\\\" HTTP/1.1\" 200 {} \"http://example.com/\" \"wfastcgi-tests\"",
            pid.len()
        )
    );
    assert_eq!(
        fields(&lines[2]).1,
        "\"POST /upload HTTP/1.1\" 400 12 \"-\" \"wfastcgi-tests\""
    );
}

#[test]
fn processes_access_log_with_a_custom_format() {
    let app = AppDir::new("ops.app", &[]);
    let gateway = two_workers(
        &app,
        &[
            "--access-log",
            "access.log",
            "--access-log-format",
            "%m %U %q %s %B %L %{ms}T %h",
        ],
    );
    let mut pids = std::collections::HashSet::new();
    for n in 0..40 {
        let response = gateway
            .connect()
            .get(1, &app.iis_params("GET", &format!("/n?i={n}")));
        assert_eq!(response.status, 200);
        pids.insert(response.text());
    }
    let lines = lines_of(&app.path().join("access.log"), 40);
    assert_eq!(lines.len(), 40);
    let mut ids = std::collections::HashSet::new();
    for line in &lines {
        let fields: Vec<&str> = line.split(' ').collect();
        assert_eq!(fields.len(), 8, "{line}");
        assert_eq!(&fields[..2], ["GET", "/n"], "{line}");
        assert!(fields[2].starts_with("?i="), "{line}");
        assert_eq!(fields[3], "200");
        let (pid, number) = fields[5].split_once('-').expect("request id");
        let pid = u32::from_str_radix(pid, 16).expect("hex pid");
        assert!(pids.contains(&pid.to_string()), "{line}");
        assert_eq!(fields[4], pid.to_string().len().to_string());
        assert!(ids.insert(fields[5].to_owned()), "unique ids: {line}");
        assert!(number.parse::<u64>().is_ok());
        assert!(fields[6].parse::<u64>().is_ok(), "{line}");
        assert_eq!(fields[7], "127.0.0.1");
    }
    let mut queries: Vec<&str> = lines
        .iter()
        .map(|l| l.split(' ').nth(2).unwrap_or(""))
        .collect();
    queries.sort_unstable();
    queries.dedup();
    assert_eq!(queries.len(), 40, "one line per request");
}

#[test]
fn access_log_to_the_main_log_and_a_bad_format() {
    let app = AppDir::new(
        "ops.app",
        &[
            ("WSGI_ACCESS_LOG", "log"),
            ("WSGI_ACCESS_LOG_FORMAT", "%m %U %s"),
        ],
    );
    let mut gateway = Gateway::iis(&[]);
    let mut client = gateway.client();
    assert_eq!(client.get(1, &app.iis_params("GET", "/main")).status, 200);
    app.wait_for_log("GET /main 200");
    let bad = AppDir::new("ops.app", &[("WSGI_ACCESS_LOG_FORMAT", "%Z")]);
    let output = Command::new(BINARY)
        .arg("check")
        .arg(bad.path())
        .output()
        .expect("check");
    let report = String::from_utf8_lossy(&output.stdout);
    assert!(
        report.contains("FAIL  app setting WSGI_ACCESS_LOG_FORMAT=\"%Z\" is invalid: %Z is not a known format atom"),
        "{report}"
    );
}

#[test]
fn processes_health_path_is_answered_without_the_application() {
    let app = AppDir::new("ops.app", &[("WSGI_ACCESS_LOG", "access.log")]);
    let gateway = two_workers(&app, &["--health-path", "/healthz"]);
    for n in 0..4 {
        let response = gateway
            .connect()
            .get(1, &app.iis_params("GET", "/healthz?probe"));
        assert_eq!(response.status, 200, "probe {n}");
        assert_eq!(response.text(), "OK\n");
    }
    // Other paths reach the application.
    let other = gateway
        .connect()
        .get(1, &app.iis_params("GET", "/healthz/x"));
    assert_eq!(other.status, 200);
    assert!(other.text().parse::<u32>().is_ok());
    let lines = lines_of(&app.path().join("access.log"), 1);
    assert_eq!(lines.len(), 1, "probes are not logged: {lines:?}");
}

#[test]
fn bind_health_path_is_503_while_draining() {
    let app = AppDir::new("ops.app", &[("WSGI_HEALTH_PATH", "/healthz")]);
    let mut gateway = Gateway::bind(Address::Tcp(any_port()), app.path(), &["--threads", "1"]);
    assert_eq!(
        gateway
            .connect()
            .get(1, &app.iis_params("GET", "/healthz"))
            .status,
        200
    );
    // The one thread is busy: the probe waits in the queue while the drain starts, and is
    // answered once the request in flight is done.
    let mut slow = gateway.connect();
    let params = app.iis_params("GET", "/?nap=2");
    slow.send(&Send::new(1, &params));
    std::thread::sleep(Duration::from_millis(300));
    let mut probe = gateway.connect();
    let probe_params = app.iis_params("GET", "/healthz");
    probe.send(&Send::new(1, &probe_params));
    std::thread::sleep(Duration::from_millis(300));
    gateway.signal(libc::SIGTERM);
    assert_eq!(
        slow.read_response(1).status,
        200,
        "the request in flight finishes"
    );
    let answer = probe.read_response(1);
    assert_eq!(answer.status, 503, "{}", answer.text());
    assert_eq!(answer.text(), "draining\n");
    assert_eq!(
        gateway
            .wait_exit(Duration::from_secs(20))
            .and_then(|s| s.code()),
        Some(0)
    );
}

/// GET on the metrics endpoint: the body, parsed by prometheus_client's OpenMetrics parser
/// into `name{label="value",...}` -> value.
fn scrape(address: &str) -> (String, std::collections::BTreeMap<String, f64>) {
    use std::io::{Read, Write};
    let mut response = Vec::new();
    let request = b"GET /metrics HTTP/1.0\r\nHost: test\r\n\r\n";
    match address.strip_prefix("unix:") {
        Some(path) => {
            let mut stream = std::os::unix::net::UnixStream::connect(path).expect("connect");
            stream.write_all(request).expect("send");
            stream.read_to_end(&mut response).expect("read");
        }
        None => {
            let mut stream = std::net::TcpStream::connect(address).expect("connect");
            stream.write_all(request).expect("send");
            stream.read_to_end(&mut response).expect("read");
        }
    }
    let response = String::from_utf8(response).expect("text");
    let (head, body) = response.split_once("\r\n\r\n").expect("head");
    assert!(head.starts_with("HTTP/1.0 200 OK"), "{head}");
    assert!(
        head.contains("Content-Type: application/openmetrics-text; version=1.0.0"),
        "{head}"
    );
    let venv = std::env::var_os("WFASTCGI_TEST_VENV").expect(
        "WFASTCGI_TEST_VENV is not set: run the tests with scripts/test, which installs prometheus_client",
    );
    const PARSE: &str = "
import json, sys
from prometheus_client.openmetrics.parser import text_string_to_metric_families
samples = {}
for family in text_string_to_metric_families(sys.stdin.read()):
    for s in family.samples:
        labels = ','.join('%s=\"%s\"' % kv for kv in sorted(s.labels.items()))
        samples[s.name + '{' + labels + '}'] = s.value
print(json.dumps(samples))
";
    let mut parser = Command::new(std::path::Path::new(&venv).join("bin/python"))
        .args(["-c", PARSE])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("python");
    parser
        .stdin
        .take()
        .expect("stdin")
        .write_all(body.as_bytes())
        .expect("write");
    let output = parser.wait_with_output().expect("parser");
    assert!(
        output.status.success(),
        "the OpenMetrics parser refused:\n{}\n{body}",
        String::from_utf8_lossy(&output.stderr)
    );
    let samples = serde_json::from_slice(&output.stdout).expect("json");
    (body.to_owned(), samples)
}

fn sample(samples: &std::collections::BTreeMap<String, f64>, key: &str) -> f64 {
    *samples
        .get(key)
        .unwrap_or_else(|| panic!("no {key} in {samples:#?}"))
}

#[test]
fn bind_metrics_count_a_known_request_mix() {
    let address = free_tcp_address().to_string();
    let app = AppDir::new("ops.app", &[("WSGI_METRICS", &address)]);
    let gateway = Gateway::bind(Address::Tcp(any_port()), app.path(), &["--threads", "2"]);
    app.wait_for_log("metrics on");
    for _ in 0..5 {
        assert_eq!(
            gateway.connect().get(1, &app.iis_params("GET", "/")).status,
            200
        );
    }
    for _ in 0..2 {
        assert_eq!(
            gateway
                .connect()
                .get(1, &app.iis_params("GET", "/?fail"))
                .status,
            500
        );
    }
    let mut post = app.iis_params("POST", "/");
    set_param(&mut post, "CONTENT_LENGTH", "1000");
    let body = vec![b'x'; 1000];
    let answer = gateway.connect().request(&Send::new(1, &post).body(&body));
    assert_eq!(answer.status, 200);
    let pid_len = answer.body.len() as f64;
    let mut bad = app.iis_params("GET", "/");
    set_param(&mut bad, "CONTENT_LENGTH", "lots");
    assert_eq!(gateway.connect().get(1, &bad).status, 400);
    // A request is counted once its response has left: the client can see it a moment before.
    let mut scraped = Default::default();
    wait_until("the 9 requests counted", || {
        scraped = scrape(&address);
        let classes = ["2xx", "4xx", "5xx"].map(|class| {
            let key = format!("wfastcgi_requests_total{{class=\"{class}\"}}");
            scraped.1.get(&key).copied().unwrap_or_default()
        });
        classes.iter().sum::<f64>() == 9.0
    });
    let (body, samples) = scraped;
    assert_eq!(
        sample(&samples, "wfastcgi_requests_total{class=\"2xx\"}"),
        6.0,
        "{body}"
    );
    assert_eq!(
        sample(&samples, "wfastcgi_requests_total{class=\"4xx\"}"),
        1.0
    );
    assert_eq!(
        sample(&samples, "wfastcgi_requests_total{class=\"5xx\"}"),
        2.0
    );
    assert_eq!(sample(&samples, "wfastcgi_app_exceptions_total{}"), 2.0);
    assert_eq!(
        sample(&samples, "wfastcgi_request_duration_seconds_count{}"),
        9.0
    );
    assert_eq!(
        sample(
            &samples,
            "wfastcgi_request_duration_seconds_bucket{le=\"+Inf\"}"
        ),
        9.0
    );
    assert_eq!(sample(&samples, "wfastcgi_request_bytes_total{}"), 1000.0);
    // Six process ids, two 500 pages, one 400 page.
    let out =
        6.0 * pid_len + 2.0 * "Internal Server Error\n".len() as f64 + "Bad Request\n".len() as f64;
    assert_eq!(sample(&samples, "wfastcgi_response_bytes_total{}"), out);
    assert_eq!(sample(&samples, "wfastcgi_requests_in_flight{}"), 0.0);
    assert_eq!(sample(&samples, "wfastcgi_queue_length{}"), 0.0);
    assert!(sample(&samples, "wfastcgi_resident_memory_bytes{}") > 1e6);
    assert!(sample(&samples, "wfastcgi_gil_wait_seconds_total{}") >= 0.0);
    println!("{body}");
}

#[test]
fn processes_metrics_add_up_the_workers_and_count_restarts() {
    let dir = tempfile::tempdir().expect("temporary folder");
    let address = format!("unix:{}", dir.path().join("metrics.sock").display());
    let app = AppDir::new("ops.app", &[]);
    let gateway = two_workers(&app, &["--metrics", &address]);
    for _ in 0..30 {
        assert_eq!(
            gateway.connect().get(1, &app.iis_params("GET", "/")).status,
            200
        );
    }
    // Each worker reports every second.
    let mut samples = Default::default();
    wait_until("30 requests in the metrics", || {
        samples = scrape(&address).1;
        samples.get("wfastcgi_requests_total{class=\"2xx\"}") == Some(&30.0)
    });
    assert_eq!(sample(&samples, "wfastcgi_worker_respawns_total{}"), 0.0);
    gateway.signal(libc::SIGHUP);
    app.wait_for_log("every worker replaced");
    wait_until("the old workers' counts kept", || {
        samples = scrape(&address).1;
        sample(&samples, "wfastcgi_worker_restarts_total{cause=\"sighup\"}") == 2.0
            && sample(&samples, "wfastcgi_requests_total{class=\"2xx\"}") == 30.0
            && children(gateway.child.id()).len() == 2
    });
    let workers = children(gateway.child.id());
    // SAFETY: kill(2) on a worker of the gateway under test.
    unsafe { libc::kill(workers[0] as i32, libc::SIGKILL) };
    wait_until("a respawn counted", || {
        samples = scrape(&address).1;
        sample(&samples, "wfastcgi_worker_respawns_total{}") == 1.0
    });
    assert_eq!(
        sample(&samples, "wfastcgi_worker_restarts_total{cause=\"stuck\"}"),
        0.0
    );
}

#[test]
fn iis_metrics_are_off() {
    let app = AppDir::new("ops.app", &[("WSGI_METRICS", "127.0.0.1:1")]);
    let mut gateway = Gateway::iis(&[]);
    assert_eq!(
        gateway.client().get(1, &app.iis_params("GET", "/")).status,
        200
    );
    app.wait_for_log("WSGI_METRICS is ignored under IIS");
}

#[test]
fn processes_max_requests_replaces_workers_without_a_failed_request() {
    let app = AppDir::new("ops.app", &[]);
    let gateway = two_workers(&app, &["--max-requests", "5", "--max-requests-jitter", "2"]);
    let mut pids = std::collections::HashSet::new();
    // Requests until three replacements have happened (each takes a worker's start-up).
    wait_until("three workers recycled", || {
        let response = gateway.connect().get(1, &app.iis_params("GET", "/"));
        assert_eq!(response.status, 200, "{}", app.log());
        pids.insert(response.text());
        app.log()
            .matches("asks to be recycled (max_requests)")
            .count()
            >= 3
    });
    let log = app.log();
    assert!(log.contains("(WSGI_MAX_REQUESTS=5, plus "), "{log}");
    // Three recycled need a replacement that served too.
    assert!(pids.len() >= 3, "{pids:?}");
    assert!(!log.contains("exited:"), "{log}");
}

#[test]
fn bind_metrics_count_the_503s_of_a_full_queue() {
    let address = free_tcp_address().to_string();
    let app = AppDir::new(
        "ops.app",
        &[("WSGI_METRICS", &address), ("WSGI_QUEUE_LENGTH", "1")],
    );
    let gateway = Gateway::bind(Address::Tcp(any_port()), app.path(), &["--threads", "1"]);
    app.wait_for_log("metrics on");
    let params = app.iis_params("GET", "/?nap=3");
    // One request runs, one waits in the queue, the third finds no room.
    let (mut running, mut queued) = gateway.fill_the_thread_and_the_queue(&params);
    assert_eq!(gateway.connect().get(1, &params).status, 503);
    assert_eq!(running.read_response(1).status, 200);
    assert_eq!(queued.read_response(1).status, 200);
    let mut samples = Default::default();
    wait_until("the two requests run counted", || {
        samples = scrape(&address).1;
        samples.get("wfastcgi_requests_total{class=\"2xx\"}") == Some(&2.0)
    });
    assert_eq!(
        sample(&samples, "wfastcgi_queue_full_refusals_total{}"),
        1.0
    );
    assert_eq!(
        sample(&samples, "wfastcgi_requests_total{class=\"5xx\"}"),
        0.0,
        "the application never saw it"
    );
}

#[test]
fn bind_restart_counts_survive_the_in_place_restart() {
    let dir = tempfile::tempdir().expect("temporary folder");
    let address = format!("unix:{}", dir.path().join("metrics.sock").display());
    let app = AppDir::new(
        "ops.app",
        &[("WSGI_METRICS", &address), ("WSGI_MAX_REQUESTS", "2")],
    );
    let gateway = Gateway::bind(Address::Tcp(any_port()), app.path(), &[]);
    let restarts = |cause: &str| {
        let key = format!("wfastcgi_worker_restarts_total{{cause=\"{cause}\"}}");
        sample(&scrape(&address).1, &key)
    };
    app.wait_for_log("metrics on");
    assert_eq!(restarts("max_requests"), 0.0);
    let mut pids = std::collections::HashSet::new();
    for round in 1..=2 {
        for _ in 0..2 {
            let response = gateway.connect().get(1, &app.iis_params("GET", "/"));
            assert_eq!(response.status, 200);
            pids.insert(response.text());
        }
        wait_until("the restarted process serves metrics", || {
            app.log().matches("metrics on").count() == round + 1
        });
        assert_eq!(restarts("max_requests"), round as f64, "{}", app.log());
    }
    assert_eq!(pids.len(), 1, "restarted in place: the same process id");
    // A changed file restarts it too, counted under its own cause.
    std::fs::write(app.path().join("touched.py"), "").expect("write");
    wait_until("the third restart", || {
        app.log().matches("metrics on").count() == 4
    });
    assert_eq!(restarts("file_change"), 1.0);
    assert_eq!(restarts("max_requests"), 2.0);
}

/// An ASGI task stuck awaiting is cancelled rather than its process replaced: its stack names
/// the coroutine it awaits in, the client gets 504, the application sees CancelledError, and
/// the same process serves the next request.
#[test]
fn iis_a_stuck_asgi_task_is_answered_504_cancelled_and_the_process_stays() {
    let app = AppDir::new(
        "asgi_app.stuck_app",
        &[
            ("WSGI_REQUEST_TIMEOUT", "1"),
            ("WSGI_SLOW_REQUEST_LOG", "0.3"),
        ],
    );
    let mut gateway = Gateway::iis(&[]);
    let mut client = gateway.client();
    let before = client.get(1, &app.iis_params("GET", "/")).json();
    let response = client.get(1, &app.iis_params("GET", "/sleep"));
    assert_eq!(response.status, 504, "{}", app.log());
    let mut after = client.get(1, &app.iis_params("GET", "/")).json();
    wait_until("the task sees its cancellation", || {
        after = client.get(1, &app.iis_params("GET", "/")).json();
        after["cancelled"] == serde_json::json!(["sleep"])
    });
    assert_eq!(after["pid"], before["pid"], "the same process");
    // The log's writer thread may still hold the line logged as the task was cancelled.
    let log = app.wait_for_log("GET /sleep is stuck");
    assert!(log.contains("GET /sleep is stuck"), "{log}");
    assert!(log.contains("GET /sleep is slow"), "{log}");
    // The slow line and the stuck line each have the task's stack.
    assert_eq!(log.matches("its ASGI task's stack").count(), 2, "{log}");
    assert!(
        log.contains("its ASGI task is cancelled and the process stays in service"),
        "{log}"
    );
    // Every frame of the coroutines the task awaits, down to the application's own.
    assert!(log.contains("in stuck_app\n"), "{log}");
    assert!(log.contains("in sleep_for_an_hour\n"), "{log}");
    assert!(!log.contains("without finalising Python"), "{log}");
}

/// Listening, where connection tasks hand requests to the loop themselves: the stuck task is
/// answered 504 and cancelled while another connection is served, and the process stays.
#[test]
fn bind_a_stuck_asgi_task_is_answered_504_cancelled_while_others_are_served() {
    let app = AppDir::new("asgi_app.stuck_app", &[("WSGI_REQUEST_TIMEOUT", "1")]);
    let gateway = Gateway::bind(Address::Tcp(any_port()), app.path(), &[]);
    let mut client = gateway.connect();
    let before = client.get(1, &app.iis_params("GET", "/")).json();
    let mut stuck = gateway.connect();
    stuck.send(&Send::new(1, &app.iis_params("GET", "/sleep")));
    let mut other = gateway.connect();
    assert_eq!(other.get(1, &app.iis_params("GET", "/")).status, 200);
    assert_eq!(stuck.read_response(1).status, 504, "{}", app.log());
    let mut after = client.get(1, &app.iis_params("GET", "/")).json();
    wait_until("the task sees its cancellation", || {
        after = client.get(1, &app.iis_params("GET", "/")).json();
        after["cancelled"] == serde_json::json!(["sleep"])
    });
    assert_eq!(after["pid"], before["pid"], "the same process");
    let log = app.wait_for_log("its ASGI task is cancelled and the process stays in service");
    assert!(
        log.contains("its ASGI task is cancelled and the process stays in service"),
        "{log}"
    );
    assert!(log.contains("in sleep_for_an_hour\n"), "{log}");
}

/// An ASGI task that never yields blocks the event loop: the process is replaced as for WSGI.
#[test]
fn iis_an_asgi_task_that_blocks_the_loop_replaces_the_process() {
    let log = iis_answered_504_then_exit_0("asgi_app.stuck_app", "/spin");
    assert!(log.contains("GET /spin is stuck"), "{log}");
    assert!(log.contains("the ASGI event loop is blocked"), "{log}");
    assert!(log.contains("in stuck_app\n"), "{log}");
    assert!(log.contains("without finalising Python"), "{log}");
}

/// A cancelled ASGI task that catches CancelledError and goes on holds its request: another
/// WSGI_REQUEST_TIMEOUT later the process is replaced.
#[test]
fn iis_an_asgi_task_that_survives_its_cancellation_replaces_the_process() {
    let log = iis_answered_504_then_exit_0("asgi_app.stuck_app", "/stubborn");
    assert!(log.contains("its ASGI task is cancelled"), "{log}");
    assert!(log.contains("GET /stubborn: its ASGI task still runs 1.0 s after it was cancelled; the process is replaced"), "{log}");
    assert!(log.contains("without finalising Python"), "{log}");
}
