//! The ASGI examples through the real binary: the FastAPI app (examples/fastapi_app) and the
//! Django example served by `mysite.asgi` (Django's `get_asgi_application()`), each IIS-style
//! (fd 0, one request at a time) and over `serve --bind` behind a real nginx; there also 100
//! slow requests at once, counted inside the app, and clients that go away mid-upload and
//! mid-stream. Run through scripts/test, which makes the venv (WFASTCGI_TEST_VENV) with FastAPI
//! and Django and installs nginx; without nginx those tests say SKIPPED and do nothing.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::web::*;
use common::*;

fn example(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("examples")
        .join(name)
}

fn venv_text() -> String {
    venv().to_str().expect("utf-8 venv path").to_owned()
}

/// A folder whose web.config serves the Django example through `mysite.asgi`.
fn django_asgi_dir() -> AppDir {
    let site = example("django_site");
    AppDir::new(
        "mysite.asgi.application",
        &[
            ("PYTHONPATH", site.to_str().expect("utf-8 path")),
            ("WSGI_VENV", &venv_text()),
        ],
    )
}

/// An HTTP answer, however it travelled.
struct Answer {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Answer {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.text()))
    }

    fn cookie(&self, name: &str) -> String {
        self.headers
            .iter()
            .filter(|(k, _)| k.eq_ignore_ascii_case("set-cookie"))
            .find_map(|(_, v)| v.strip_prefix(&format!("{name}=")))
            .and_then(|v| v.split(';').next())
            .unwrap_or_else(|| panic!("no {name} cookie in {:?}", self.headers))
            .to_owned()
    }
}

/// The way requests reach the gateway: IIS-style FastCGI on fd 0, or HTTP through nginx.
trait Front {
    fn call(&mut self, method: &str, url: &str, headers: &[(&str, &str)], body: &[u8]) -> Answer;

    fn get(&mut self, url: &str) -> Answer {
        self.call("GET", url, &[], b"")
    }

    fn post(&mut self, url: &str, content_type: &str, body: &[u8]) -> Answer {
        self.call("POST", url, &[("Content-Type", content_type)], body)
    }
}

/// The gateway started as IIS starts it, sent IIS's parameters for `app_dir`.
struct Iis {
    gateway: Gateway,
    app_dir: PathBuf,
}

impl Front for Iis {
    fn call(&mut self, method: &str, url: &str, headers: &[(&str, &str)], body: &[u8]) -> Answer {
        let mut params = iis_params(&self.app_dir, method, url);
        for (name, value) in headers {
            let name = name.to_ascii_uppercase().replace('-', "_");
            let name = if name == "CONTENT_TYPE" {
                name
            } else {
                format!("HTTP_{name}")
            };
            set_param(&mut params, &name, value);
        }
        if !body.is_empty() {
            set_param(&mut params, "CONTENT_LENGTH", &body.len().to_string());
        }
        let response = self
            .gateway
            .client()
            .request(&Send::new(1, &params).body(body));
        assert_eq!(response.protocol_status, 0, "{response:?}");
        Answer {
            status: response.status,
            headers: response.headers,
            body: response.body,
        }
    }
}

/// HTTP to nginx, which passes to the gateway.
struct Http {
    base: String,
    agent: ureq::Agent,
}

impl Front for Http {
    fn call(&mut self, method: &str, url: &str, headers: &[(&str, &str)], body: &[u8]) -> Answer {
        let url = format!("{}{url}", self.base);
        let reply = match method {
            "GET" => get(&self.agent, &url),
            "POST" => post(&self.agent, &url, headers, body),
            other => panic!("no {other} in these tests"),
        };
        Answer {
            status: reply.status,
            headers: reply.headers,
            body: reply.body,
        }
    }
}

fn multipart(boundary: &str, fields: &[(&str, &str)], file: &[u8]) -> Vec<u8> {
    let mut body = Vec::new();
    for (name, value) in fields {
        body.extend_from_slice(
            format!(
                "--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"\r\n\r\n{value}\r\n"
            )
            .as_bytes(),
        );
    }
    body.extend_from_slice(format!("--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"data.bin\"\r\nContent-Type: application/octet-stream\r\n\r\n").as_bytes());
    body.extend_from_slice(file);
    body.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
    body
}

/// /stats of the FastAPI example once `done` holds for it (or after 20 s, failing).
fn stats_when(front: &mut dyn Front, what: &str, done: impl Fn(&serde_json::Value) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let stats = front.get("/stats").json();
        if done(&stats) {
            return;
        }
        assert!(Instant::now() < deadline, "{what}: {stats}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Every feature of the FastAPI example, checked from its answers.
fn check_fastapi(front: &mut dyn Front) {
    let index = front.get("/");
    assert_eq!(index.status, 200, "{}", index.text());
    let json = index.json();
    assert_eq!(json["greeting"], "hello from lifespan", "lifespan state");
    assert_eq!(json["path"], "/");

    let hello = front.get("/hello");
    assert_eq!(hello.text(), "Hello, World!\n");

    let item = front.get("/items/7?q=tea%20pot&limit=3");
    assert_eq!(item.status, 200, "{}", item.text());
    assert_eq!(
        item.json(),
        serde_json::json!({"item_id": 7, "q": "tea pot", "limit": 3})
    );
    let bad_path = front.get("/items/seven");
    assert_eq!(bad_path.status, 422, "{}", bad_path.text());
    assert_eq!(bad_path.json()["detail"][0]["type"], "int_parsing");
    assert_eq!(front.get("/items/7?limit=many").status, 422);

    let created = front.post(
        "/items",
        "application/json",
        br#"{"name": "kettle", "price": 12.5, "tags": ["tea"]}"#,
    );
    assert_eq!(created.status, 201, "{}", created.text());
    assert_eq!(
        created.json(),
        serde_json::json!({"created": {"name": "kettle", "price": 12.5, "tags": ["tea"]}})
    );
    let invalid = front.post(
        "/items",
        "application/json",
        br#"{"name": "", "price": -1}"#,
    );
    assert_eq!(invalid.status, 422, "{}", invalid.text());
    let kinds: Vec<String> = invalid.json()["detail"]
        .as_array()
        .expect("a list of errors")
        .iter()
        .map(|e| e["type"].as_str().unwrap_or_default().to_owned())
        .collect();
    assert_eq!(kinds, ["string_too_short", "greater_than"]);
    let broken = front.post("/items", "application/json", b"{\"name\": ");
    assert_eq!(broken.status, 422, "{}", broken.text());
    // The background task the POST queued runs after its response.
    stats_when(front, "the background task did not run", |s| {
        s["background_done"] == 1 && s["last_background"] == "kettle"
    });

    let file = bytes_of(3_000_000, 23);
    let body = multipart("asgi-boundary", &[("note", "three megabytes")], &file);
    let uploaded = front.post(
        "/upload",
        "multipart/form-data; boundary=asgi-boundary",
        &body,
    );
    assert_eq!(uploaded.status, 200, "{}", uploaded.text());
    let json = uploaded.json();
    assert_eq!(json["filename"], "data.bin");
    assert_eq!(json["note"], "three megabytes");
    assert_eq!(json["size"], file.len());
    assert_eq!(json["sha256"], sha256_hex(&file));

    let streamed = front.get("/stream?lines=2000&size=100");
    assert_eq!(streamed.status, 200, "{}", streamed.text());
    let expected: String = (1..=2000)
        .map(|n| format!("{:>100}", format!("line {n}\n")))
        .collect();
    assert!(streamed.text() == expected, "the streamed lines");

    let slept = front.get("/sleep?seconds=0.01");
    assert_eq!(slept.json()["slept"], 0.01);

    let boom = front.get("/boom");
    assert_eq!(boom.status, 500);
    assert_eq!(boom.text(), "Internal Server Error");

    stats_when(front, "requests still in flight", |s| {
        s["in_flight"] == 0
            && s["streams_started"] == 1
            && s["streams_finished"] == 1
            && s["startups"] == 1
    });
}

/// The Django example through `get_asgi_application()`: a template page, its CSRF form, an
/// upload, the sync and async views, both streams, the 404 and 500 pages.
fn check_django_asgi(front: &mut dyn Front, origin: &str) {
    let page = front.get("/");
    assert_eq!(page.status, 200, "{}", page.text());
    assert!(page.text().contains("wfastcgi Django example"));

    let form = front.get("/form/");
    let csrf = form.cookie("csrftoken");
    let html = form.text();
    let marker = "name=\"csrfmiddlewaretoken\" value=\"";
    let start = html.find(marker).expect("token") + marker.len();
    let token = &html[start..start + html[start..].find('"').expect("end")];
    let body = format!("csrfmiddlewaretoken={token}&name=Ann%20Lee");
    let cookie = format!("csrftoken={csrf}");
    let hello = front.call(
        "POST",
        "/form/",
        &[
            ("Content-Type", "application/x-www-form-urlencoded"),
            ("Cookie", &cookie),
            ("Origin", origin),
        ],
        body.as_bytes(),
    );
    assert_eq!(hello.status, 200, "{}", hello.text());
    assert!(hello.text().contains("Hello, Ann Lee!"));

    let file = bytes_of(2_000_000, 29);
    let upload = multipart("django-asgi", &[("csrfmiddlewaretoken", &csrf)], &file);
    let uploaded = front.call(
        "POST",
        "/upload/",
        &[
            ("Content-Type", "multipart/form-data; boundary=django-asgi"),
            ("Cookie", &cookie),
            ("Origin", origin),
        ],
        &upload,
    );
    assert_eq!(uploaded.status, 200, "{}", uploaded.text());
    assert_eq!(uploaded.json()["sha256"], sha256_hex(&file));

    let info = front.get("/async/info/?a=1&a=2");
    assert_eq!(info.status, 200, "{}", info.text());
    assert_eq!(
        info.json(),
        serde_json::json!({"async": true, "path": "/async/info/", "query": {"a": ["1", "2"]}})
    );
    let lines: String = (1..=100).map(|n| format!("line {n}\n")).collect();
    let streamed = front.get("/async/stream/");
    assert_eq!(streamed.status, 200, "{}", streamed.text());
    assert_eq!(streamed.text(), lines, "async iterator");
    assert_eq!(front.get("/stream/").text(), lines, "sync iterator");

    assert_eq!(front.get("/nope/").status, 404);
    let boom = front.get("/boom/");
    assert_eq!(boom.status, 500);
    assert!(
        boom.text().contains("Server error (500)"),
        "{}",
        boom.text()
    );
}

#[test]
fn fastapi_iis_style_every_feature_and_lifespan_shutdown_when_iis_closes_the_pipe() {
    let scratch = tempfile::tempdir().expect("tempdir");
    let log = scratch.path().join("wfastcgi.log");
    let shutdown = scratch.path().join("shutdown.txt");
    let gateway = Gateway::iis(&[
        ("WSGI_VENV", &venv_text()),
        ("WSGI_LOG", log.to_str().expect("utf-8 path")),
        (
            "FASTAPI_SHUTDOWN_FILE",
            shutdown.to_str().expect("utf-8 path"),
        ),
    ]);
    let mut iis = Iis {
        gateway,
        app_dir: example("fastapi_app"),
    };
    check_fastapi(&mut iis);
    iis.gateway.close_stream();
    assert!(
        iis.gateway.wait_exit(Duration::from_secs(30)).is_some(),
        "the gateway outlived its pipe"
    );
    assert_eq!(
        std::fs::read_to_string(&shutdown).unwrap_or_default(),
        "lifespan shutdown\n",
        "{}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
}

#[test]
fn django_asgi_iis_style() {
    let app = django_asgi_dir();
    let mut iis = Iis {
        gateway: Gateway::iis(&[]),
        app_dir: app.path().to_owned(),
    };
    // IIS's parameters say the site is http://localhost.
    check_django_asgi(&mut iis, "http://localhost");
}

/// FastCGI parameters are a CGI environment: a name sent twice (as nginx does with the README's
/// second `HTTP_HOST` line for Debian's stock params) is one header with the last value, as in
/// the WSGI environ. Django's ASGI handler joins repeated Host headers with a comma, which it
/// then refuses (400).
#[test]
fn a_parameter_sent_twice_is_one_header_with_the_last_value() {
    let mut gateway = Gateway::iis(&[("WSGI_VENV", &venv_text())]);
    let mut params = iis_params(&example("fastapi_app"), "GET", "/");
    params.push(("HTTP_HOST".to_owned(), "localhost:8080".to_owned()));
    let index = gateway.client().get(1, &params);
    assert_eq!(index.status, 200, "{}", index.stderr_text());
    assert_eq!(index.json()["host"], serde_json::json!(["localhost:8080"]));
}

/// `wfastcgi serve` for `app_dir` on a Unix socket in `dir`, logging to `dir`, with the test
/// venv, and that socket's `unix:` address once it accepts.
fn serve(dir: &Path, app_dir: &Path, envs: &[(&str, &str)]) -> (Server, String) {
    let socket = dir.join("gateway.sock");
    let address = format!("unix:{}", socket.display());
    let mut command = Command::new(BINARY);
    command
        .args([
            "serve",
            "--bind",
            &address,
            "--venv",
            &venv_text(),
            "--app-dir",
        ])
        .arg(app_dir)
        .env("WSGI_LOG", dir.join("wfastcgi.log"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    for (k, v) in envs {
        command.env(k, v);
    }
    let server = Server(command.spawn().expect("start wfastcgi"));
    let deadline = Instant::now() + Duration::from_secs(30);
    while UnixStream::connect(&socket).is_err() {
        assert!(Instant::now() < deadline, "the gateway does not listen");
        std::thread::sleep(Duration::from_millis(25));
    }
    (server, address)
}

/// The FastAPI example served on a socket in `dir`, nginx in front (with `extra` directives),
/// both stopped when dropped, and a front for them; None when nginx is not installed.
fn fastapi_behind_nginx(
    test: &str,
    dir: &Path,
    keep_conn: bool,
    extra: &str,
) -> Option<(Server, Server, Http)> {
    if !installed("nginx", test) {
        return None;
    }
    let (gateway, address) = serve(dir, &example("fastapi_app"), &[]);
    let port = free_tcp_address().port();
    let nginx = nginx(dir, port, &address, keep_conn, extra);
    let http = Http {
        base: format!("http://127.0.0.1:{port}"),
        agent: agent(),
    };
    Some((gateway, nginx, http))
}

#[test]
fn fastapi_behind_nginx_every_feature() {
    let dir = tempfile::tempdir().expect("tempdir");
    let Some((_gateway, _nginx, mut http)) =
        fastapi_behind_nginx("fastapi_behind_nginx_every_feature", dir.path(), true, "")
    else {
        return;
    };
    check_fastapi(&mut http);
}

#[test]
fn django_asgi_behind_nginx() {
    if !installed("nginx", "django_asgi_behind_nginx") {
        return;
    }
    let app = django_asgi_dir();
    let (_gateway, address) = serve(app.path(), app.path(), &[]);
    let port = free_tcp_address().port();
    let _nginx = nginx(app.path(), port, &address, true, "");
    let base = format!("http://127.0.0.1:{port}");
    let mut http = Http {
        base: base.clone(),
        agent: agent(),
    };
    check_django_asgi(&mut http, &base);
}

/// 100 clients each ask for a 0.5 s `/sleep` at once: the app counts how many are inside it at
/// the same time, which is only near 100 if the gateway runs them together on its event loop.
#[test]
fn a_hundred_slow_requests_behind_nginx_are_in_the_app_together() {
    const CLIENTS: usize = 100;
    let dir = tempfile::tempdir().expect("tempdir");
    let Some((_gateway, _nginx, mut http)) = fastapi_behind_nginx(
        "a_hundred_slow_requests_behind_nginx_are_in_the_app_together",
        dir.path(),
        true,
        "",
    ) else {
        return;
    };
    let start = std::sync::Arc::new(std::sync::Barrier::new(CLIENTS));
    let clients: Vec<_> = (0..CLIENTS)
        .map(|_| {
            let (start, base) = (start.clone(), http.base.clone());
            std::thread::spawn(move || {
                let agent = agent();
                start.wait();
                let reply = get(&agent, &format!("{base}/sleep"));
                (reply.status, reply.text())
            })
        })
        .collect();
    let failed: Vec<(u16, String)> = clients
        .into_iter()
        .map(|c| c.join().expect("client thread"))
        .filter(|(status, text)| *status != 200 || text != r#"{"slept":0.5}"#)
        .collect();
    assert!(
        failed.is_empty(),
        "{} failed: {:?}",
        failed.len(),
        failed.first()
    );
    let stats = http.get("/stats").json();
    let together = stats["max_sleeping"].as_u64().unwrap_or_default();
    assert!(
        together >= 90,
        "at most {together} of {CLIENTS} sleeping requests were in the app at once: {stats}"
    );
}

/// What the process's open file descriptors point to.
fn open_fds(pid: u32) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return Vec::new();
    };
    entries
        .filter_map(|entry| std::fs::read_link(entry.ok()?.path()).ok())
        .map(|target| target.display().to_string())
        .collect()
}

/// What the app counted for `path`: `http.disconnect` received, and sends that raised.
fn told_gone(stats: &serde_json::Value, path: &str) -> u64 {
    stats["disconnects"][path].as_u64().unwrap_or_default()
        + stats["send_errors"][path].as_u64().unwrap_or_default()
}

/// Clients that go away mid-upload and mid-stream: nginx closes its FastCGI connection, the
/// app receives `http.disconnect` (the upload) or is told by `send` (the stream; ASGI 2.4
/// allows either), its stream generator is closed, nothing stays in flight, and the gateway
/// holds no more descriptors than before.
#[test]
fn clients_gone_mid_upload_and_mid_stream_behind_nginx_reach_the_app() {
    let dir = tempfile::tempdir().expect("tempdir");
    // Without request buffering nginx passes the body on as it comes, so the app is reading
    // it when the client goes.
    let Some((gateway, nginx, mut http)) = fastapi_behind_nginx(
        "clients_gone_mid_upload_and_mid_stream_behind_nginx_reach_the_app",
        dir.path(),
        false,
        "fastcgi_request_buffering off;",
    ) else {
        return;
    };
    let nginx_address = http.base.trim_start_matches("http://").to_owned();
    let _nginx = nginx;
    let pid = gateway.0.id();
    // Once through the paths the aborts take, so that what they open for good (a spooled
    // upload's temporary file, the loop's executor) is counted before.
    let file = bytes_of(2_000_000, 31);
    let body = multipart("warm", &[], &file);
    let uploaded = http.post("/upload", "multipart/form-data; boundary=warm", &body);
    assert_eq!(uploaded.json()["size"], file.len());
    assert_eq!(http.get("/stream?lines=10").status, 200);
    let fds_before = open_fds(pid);

    let mut upload = TcpStream::connect(&nginx_address).expect("connect to nginx");
    let head = "POST /upload HTTP/1.1\r\nHost: localhost\r\nContent-Type: multipart/form-data; boundary=gone\r\nContent-Length: 50000000\r\n\r\n--gone\r\nContent-Disposition: form-data; name=\"file\"; filename=\"big.bin\"\r\n\r\n";
    upload.write_all(head.as_bytes()).expect("send head");
    upload
        .write_all(&bytes_of(2_000_000, 31))
        .expect("send part of the body");
    stats_when(&mut http, "the upload never reached the app", |s| {
        s["in_flight"] == 1
    });
    drop(upload);
    stats_when(&mut http, "the app was not told of the upload's end", |s| {
        s["disconnects"]["/upload"].as_u64().unwrap_or_default() >= 1 && s["in_flight"] == 0
    });

    let mut stream = TcpStream::connect(&nginx_address).expect("connect to nginx");
    stream
        .write_all(
            b"GET /stream?lines=1000000&delay=0.005&size=1000 HTTP/1.1\r\nHost: localhost\r\n\r\n",
        )
        .expect("send request");
    let mut seen = Vec::new();
    let mut chunk = [0u8; 16384];
    while !String::from_utf8_lossy(&seen).contains("line 10\n") {
        let n = stream.read(&mut chunk).expect("read the stream");
        assert!(n > 0, "nginx closed the stream");
        seen.extend_from_slice(&chunk[..n]);
    }
    drop(stream);
    stats_when(&mut http, "the stream was not cut short", |s| {
        s["streams_cut"] == 1 && told_gone(s, "/stream") >= 1 && s["in_flight"] == 0
    });

    let deadline = Instant::now() + Duration::from_secs(20);
    while open_fds(pid).len() > fds_before.len() {
        assert!(
            Instant::now() < deadline,
            "the gateway holds {:?}, before the aborts {fds_before:?}",
            open_fds(pid)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(http.get("/hello").text(), "Hello, World!\n");
}
