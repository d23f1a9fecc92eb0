//! Real web servers in front of the binary, each started by the test on loopback and stopped by
//! it: nginx (Unix socket and TCP, FCGI_KEEP_CONN on and off) with the Django example,
//! lighttpd spawning the binary (fd 0 a listening socket), spawn-fcgi, Apache mod_proxy_fcgi,
//! libfcgi's cgi-fcgi, and Caddy. The servers come from the distribution; scripts/test installs
//! them when it can. A test whose server is not installed says so on stderr and does nothing.

mod common;

use std::io::{Read, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::web::*;
use common::*;

fn django_site() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/django_site")
}

/// The Django example through nginx: pages, a CSRF form, an upload, a stream, and a burst of
/// 1000 requests from 10 threads, with zero errors allowed.
fn django_behind_nginx(unix: bool, keep_conn: bool) {
    let dir = tempfile::tempdir().expect("tempdir");
    let site = django_site();
    let log = dir.path().join("wfastcgi.log");
    let upstream;
    let mut args: Vec<String> = vec![
        "serve".into(),
        "--app-dir".into(),
        site.display().to_string(),
    ];
    args.extend([
        "--venv".into(),
        venv().display().to_string(),
        "--threads".into(),
        "4".into(),
    ]);
    if unix {
        let socket = dir.path().join("gateway.sock");
        upstream = format!("unix:{}", socket.display());
        args.extend(["--bind".into(), upstream.clone()]);
    } else {
        let address = free_tcp_address();
        upstream = address.to_string();
        args.extend(["--bind".into(), upstream.clone()]);
    }
    let gateway = Command::new(BINARY)
        .args(&args)
        .env("WSGI_LOG", &log)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start wfastcgi");
    let _gateway = Server(gateway);
    let deadline = Instant::now() + Duration::from_secs(30);
    while !std::fs::read_to_string(&log)
        .unwrap_or_default()
        .contains("loaded")
    {
        assert!(Instant::now() < deadline, "gateway did not start");
        std::thread::sleep(Duration::from_millis(25));
    }
    let port = free_tcp_address().port();
    let _nginx = nginx(dir.path(), port, &upstream, keep_conn, "");
    let base = format!("http://127.0.0.1:{port}");
    let http = agent();

    let page = get(&http, &format!("{base}/"));
    assert_eq!(page.status, 200, "{}", page.text());
    assert!(page.text().contains("wfastcgi Django example"));

    let form = get(&http, &format!("{base}/form/"));
    let csrf = form.cookie("csrftoken");
    let html = form.text();
    let marker = "name=\"csrfmiddlewaretoken\" value=\"";
    let start = html.find(marker).expect("token") + marker.len();
    let token = &html[start..start + html[start..].find('"').expect("end")];
    let body = format!("csrfmiddlewaretoken={token}&name=Ann%20Lee");
    let cookie = format!("csrftoken={csrf}");
    let hello = post(
        &http,
        &format!("{base}/form/"),
        &[
            ("Content-Type", "application/x-www-form-urlencoded"),
            ("Cookie", &cookie),
            // As a browser sends it: Django compares it with the Host, port included.
            ("Origin", &base),
        ],
        body.as_bytes(),
    );
    assert_eq!(hello.status, 200, "{}", hello.text());
    assert!(hello.text().contains("Hello, Ann Lee!"));

    let file = bytes_of(5_000_000, 17);
    let boundary = "nginx-test-boundary";
    let mut multipart = Vec::new();
    multipart.extend_from_slice(format!("--{boundary}\r\nContent-Disposition: form-data; name=\"csrfmiddlewaretoken\"\r\n\r\n{csrf}\r\n").as_bytes());
    multipart.extend_from_slice(format!("--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"up.bin\"\r\nContent-Type: application/octet-stream\r\n\r\n").as_bytes());
    multipart.extend_from_slice(&file);
    multipart.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
    let content_type = format!("multipart/form-data; boundary={boundary}");
    let uploaded = post(
        &http,
        &format!("{base}/upload/"),
        &[("Content-Type", &content_type), ("Cookie", &cookie)],
        &multipart,
    );
    assert_eq!(uploaded.status, 200, "{}", uploaded.text());
    let json: serde_json::Value = serde_json::from_slice(&uploaded.body).expect("json");
    assert_eq!(json["size"], file.len());
    assert_eq!(json["sha256"], sha256_hex(&file));

    let streamed = get(&http, &format!("{base}/stream/"));
    assert_eq!(streamed.text().lines().count(), 100);
    assert_eq!(get(&http, &format!("{base}/nope/")).status, 404);

    let threads: Vec<_> = (0..10)
        .map(|t| {
            let (http, base) = (http.clone(), base.clone());
            std::thread::spawn(move || {
                (0..100)
                    .filter(|i| {
                        let reply = get(&http, &format!("{base}/api/info/?t={t}&i={i}"));
                        reply.status != 200 || !reply.text().contains(&format!("\"i\": [\"{i}\"]"))
                    })
                    .count()
            })
        })
        .collect();
    let errors: usize = threads.into_iter().map(|t| t.join().expect("thread")).sum();
    assert_eq!(errors, 0, "1000 requests through nginx, zero errors");
}

#[test]
fn nginx_unix_socket_keep_conn() {
    if !installed("nginx", "nginx_unix_socket_keep_conn") {
        return;
    }
    django_behind_nginx(true, true);
}

#[test]
fn nginx_unix_socket_one_request_per_connection() {
    if !installed("nginx", "nginx_unix_socket_one_request_per_connection") {
        return;
    }
    django_behind_nginx(true, false);
}

#[test]
fn nginx_tcp_keep_conn() {
    if !installed("nginx", "nginx_tcp_keep_conn") {
        return;
    }
    django_behind_nginx(false, true);
}

#[test]
fn nginx_tcp_one_request_per_connection() {
    if !installed("nginx", "nginx_tcp_one_request_per_connection") {
        return;
    }
    django_behind_nginx(false, false);
}

/// hello and echo through an HTTP front end at `base`.
fn check_hello_and_echo(base: &str) {
    let http = agent();
    let hello = get(&http, &format!("{base}/hello"));
    assert_eq!(hello.status, 200);
    assert_eq!(hello.text(), "Hello, World!\n");
    let body = bytes_of(300_000, 5);
    let echo = post(
        &http,
        &format!("{base}/echo"),
        &[("Content-Type", "application/octet-stream")],
        &body,
    );
    assert_eq!(echo.status, 200, "{}", echo.text());
    let json: serde_json::Value = serde_json::from_slice(&echo.body).expect("json");
    assert_eq!(json["length"], body.len());
    assert_eq!(json["sha256"], sha256_hex(&body));
}

/// `wfastcgi serve` on a free loopback port for `app`, and that address.
fn tcp_gateway(app: &AppDir) -> (Gateway, std::net::SocketAddr) {
    let gateway = Gateway::bind(Address::Tcp(any_port()), app.path(), &[]);
    let Some(Address::Tcp(address)) = gateway.address.clone() else {
        unreachable!("bound to TCP")
    };
    (gateway, address)
}

/// An app folder whose handler answers /hello and /echo.
fn hello_and_echo_app() -> AppDir {
    let app = AppDir::new("routes.app", &[]);
    std::fs::write(
        app.path().join("routes.py"),
        "import echo, hello\n\n\
         def app(environ, start_response):\n    \
             if environ['REQUEST_METHOD'] == 'POST':\n        \
                 return echo.app(environ, start_response)\n    \
             return hello.app(environ, start_response)\n",
    )
    .expect("write routes.py");
    app
}

#[test]
fn lighttpd_spawns_the_binary_with_a_listening_socket() {
    if !installed(
        "lighttpd",
        "lighttpd_spawns_the_binary_with_a_listening_socket",
    ) {
        return;
    }
    let app = hello_and_echo_app();
    let port = free_tcp_address().port();
    let dir = app.path();
    let config = format!(
        "server.document-root = \"{dir}\"
server.bind = \"127.0.0.1\"
server.port = {port}
server.pid-file = \"{dir}/lighttpd.pid\"
server.errorlog = \"{dir}/lighttpd.log\"
server.modules = (\"mod_fastcgi\")
fastcgi.server = ( \"/\" => ((
    \"socket\" => \"{dir}/lighttpd-fcgi.sock\",
    \"bin-path\" => \"{binary} --app-dir {dir}\",
    \"check-local\" => \"disable\",
    \"max-procs\" => 1
)))
",
        dir = dir.display(),
        binary = BINARY
    );
    let conf = dir.join("lighttpd.conf");
    std::fs::write(&conf, config).expect("write");
    let _lighttpd = start("lighttpd", &["-D", "-f", &conf.to_string_lossy()]);
    wait_for_port(port);
    check_hello_and_echo(&format!("http://127.0.0.1:{port}"));
    assert!(
        app.log().contains("WSGI handler \"routes.app\" loaded"),
        "{}",
        app.log()
    );
}

#[test]
fn apache_mod_proxy_fcgi() {
    if !installed("apache2", "apache_mod_proxy_fcgi") {
        return;
    }
    let app = hello_and_echo_app();
    let (_gateway, upstream) = tcp_gateway(&app);
    let port = free_tcp_address().port();
    let dir = app.path();
    let modules = "/usr/lib/apache2/modules";
    let config = format!(
        "ServerRoot \"{dir}\"
ServerName localhost
Listen 127.0.0.1:{port}
PidFile \"{dir}/apache.pid\"
ErrorLog \"{dir}/apache-error.log\"
LoadModule mpm_event_module {modules}/mod_mpm_event.so
LoadModule authz_core_module {modules}/mod_authz_core.so
LoadModule proxy_module {modules}/mod_proxy.so
LoadModule proxy_fcgi_module {modules}/mod_proxy_fcgi.so
User www-data
Group www-data
ProxyPass \"/\" \"fcgi://{upstream}/\"
",
        dir = dir.display()
    );
    let conf = dir.join("apache.conf");
    std::fs::write(&conf, config).expect("write");
    let _apache = start("apache2", &["-f", &conf.to_string_lossy(), "-DFOREGROUND"]);
    wait_for_port(port);
    check_hello_and_echo(&format!("http://127.0.0.1:{port}"));
}

#[test]
fn spawn_fcgi_hands_over_a_listening_socket() {
    if !installed("spawn-fcgi", "spawn_fcgi_hands_over_a_listening_socket") {
        return;
    }
    let app = hello_and_echo_app();
    let port = free_tcp_address().port();
    let _spawned = start(
        "spawn-fcgi",
        &[
            "-n",
            "-a",
            "127.0.0.1",
            "-p",
            &port.to_string(),
            "--",
            BINARY,
            "--app-dir",
            &app.path().to_string_lossy(),
        ],
    );
    wait_for_port(port);
    let stream = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .expect("timeout");
    let mut client = Client::new(stream);
    assert_eq!(
        client.get(1, &app.iis_params("GET", "/hello")).text(),
        "Hello, World!\n"
    );
    let body = bytes_of(100_000, 3);
    let mut params = app.iis_params("POST", "/echo");
    set_param(&mut params, "CONTENT_LENGTH", &body.len().to_string());
    let json = client.request(&Send::new(2, &params).body(&body)).json();
    assert_eq!(json["sha256"], sha256_hex(&body));
}

#[test]
fn libfcgi_cgi_fcgi_connect() {
    if !installed("cgi-fcgi", "libfcgi_cgi_fcgi_connect") {
        return;
    }
    let app = hello_and_echo_app();
    let (_gateway, address) = tcp_gateway(&app);
    let run = |method: &str, body: &[u8]| {
        let mut child = Command::new("cgi-fcgi")
            .args(["-bind", "-connect", &address.to_string()])
            .env("REQUEST_METHOD", method)
            .env("SERVER_NAME", "localhost")
            .env("SERVER_PORT", "80")
            .env("SERVER_PROTOCOL", "HTTP/1.1")
            .env("REQUEST_URI", "/")
            .env("CONTENT_LENGTH", body.len().to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("cgi-fcgi");
        use std::io::Write;
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(body)
            .expect("write");
        let output = child.wait_with_output().expect("cgi-fcgi output");
        String::from_utf8_lossy(&output.stdout).into_owned()
    };
    let hello = run("GET", b"");
    assert!(hello.starts_with("Status: 200 OK\r\n"), "{hello}");
    assert!(hello.ends_with("\r\n\r\nHello, World!\n"), "{hello}");
    let body = bytes_of(50_000, 8);
    let echo = run("POST", &body);
    assert!(echo.contains(&sha256_hex(&body)), "{echo}");
}

/// One raw HTTP/1.0 request to `127.0.0.1:port`; the response's body.
fn raw_http_body(port: u16, request: &str) -> Vec<u8> {
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .expect("timeout");
    stream.write_all(request.as_bytes()).expect("send request");
    let mut response = Vec::new();
    stream.read_to_end(&mut response).expect("read response");
    let split = response
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("a response head");
    response[split + 4..].to_vec()
}

/// nginx 1.22 passes a request header sent twice as two parameters of the same name; the
/// application sees them joined as HTTP joins field lines (Cookie with `; `).
#[test]
fn nginx_repeated_headers_are_joined() {
    if !installed("nginx", "nginx_repeated_headers_are_joined") {
        return;
    }
    let app = AppDir::new("hello.environ_app", &[]);
    let (_gateway, upstream) = tcp_gateway(&app);
    let port = free_tcp_address().port();
    let _nginx = nginx(app.path(), port, &upstream.to_string(), true, "");
    let body = raw_http_body(
        port,
        &format!(
            "GET /env HTTP/1.0\r\nHost: 127.0.0.1:{port}\r\nX-Dup: one\r\nX-Dup: two\r\n\
             Cookie: a=1\r\nCookie: b=2\r\n\r\n"
        ),
    );
    let env: serde_json::Value = serde_json::from_slice(&body)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&body)));
    assert_eq!(env["HTTP_X_DUP"], "one, two", "{env}");
    assert_eq!(env["HTTP_COOKIE"], "a=1; b=2", "{env}");
    // Host: the last HTTP_HOST parameter (the README's fix after Debian's `$host` line).
    assert_eq!(env["HTTP_HOST"], format!("127.0.0.1:{port}"), "{env}");
}

/// Caddy's FastCGI transport (`php_fastcgi` without the PHP): a chunked upload reaches the
/// gateway with CONTENT_LENGTH -1 and its body streamed, an upload with a length as usual.
#[test]
fn caddy_reverse_proxy_fastcgi_transport() {
    if !installed("caddy", "caddy_reverse_proxy_fastcgi_transport") {
        return;
    }
    let app = hello_and_echo_app();
    let (_gateway, upstream) = tcp_gateway(&app);
    let port = free_tcp_address().port();
    let dir = app.path();
    let config = format!(
        "{{
    admin off
    auto_https off
}}
http://127.0.0.1:{port} {{
    reverse_proxy {upstream} {{
        transport fastcgi
    }}
}}
"
    );
    let caddyfile = dir.join("Caddyfile");
    std::fs::write(&caddyfile, config).expect("write Caddyfile");
    let child = Command::new("caddy")
        .args(["run", "--adapter", "caddyfile", "--config"])
        .arg(&caddyfile)
        .env("HOME", dir)
        .env("XDG_DATA_HOME", dir.join("data"))
        .env("XDG_CONFIG_HOME", dir.join("config"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start caddy");
    let _caddy = Server(child);
    wait_for_port(port);
    let base = format!("http://127.0.0.1:{port}");
    check_hello_and_echo(&base);

    let body = bytes_of(1_000_000, 11);
    let mut reader = std::io::Cursor::new(body.clone());
    let echo = reply(
        agent()
            .post(&format!("{base}/echo"))
            .header("Content-Type", "application/octet-stream")
            .send(ureq::SendBody::from_reader(&mut reader)),
    );
    assert_eq!(echo.status, 200, "{}", echo.text());
    let json: serde_json::Value = serde_json::from_slice(&echo.body).expect("json");
    assert_eq!(json["length"], body.len(), "the chunked upload, whole");
    assert_eq!(json["sha256"], sha256_hex(&body));
}

/// A W3C WebDriver session in headless Chromium, driven through chromedriver.
struct Browser {
    http: ureq::Agent,
    session: String,
    _user_data: tempfile::TempDir,
    _driver: Server,
}

impl Browser {
    fn start() -> Browser {
        let port = free_tcp_address().port();
        let driver = start("chromedriver", &[&format!("--port={port}")]);
        wait_for_port(port);
        let user_data = tempfile::tempdir().expect("tempdir");
        let args = [
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            &format!("--user-data-dir={}", user_data.path().display()),
        ];
        let capabilities = serde_json::json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {"binary": "/usr/bin/chromium", "args": args},
        }}});
        let http = agent();
        let base = format!("http://127.0.0.1:{port}/session");
        let created = webdriver(&http, &base, &capabilities);
        let session = created["sessionId"]
            .as_str()
            .unwrap_or_else(|| panic!("no WebDriver session: {created}"))
            .to_owned();
        Browser {
            http,
            session: format!("{base}/{session}"),
            _user_data: user_data,
            _driver: driver,
        }
    }

    fn open(&self, url: &str) {
        webdriver(
            &self.http,
            &format!("{}/url", self.session),
            &serde_json::json!({"url": url}),
        );
    }

    /// Runs `script` in the page; with `done` it is asynchronous and calls its last argument.
    fn run(&self, script: &str, done: bool) -> serde_json::Value {
        let kind = if done { "async" } else { "sync" };
        webdriver(
            &self.http,
            &format!("{}/execute/{kind}", self.session),
            &serde_json::json!({"script": script, "args": []}),
        )
    }

    /// Evaluates `expression` in the page until it is true (the page loads after a submit).
    fn wait_for(&self, expression: &str) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.run(&format!("return !!({expression});"), false) != true {
            assert!(Instant::now() < deadline, "never true: {expression}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.http.delete(&self.session).call();
    }
}

/// A WebDriver command; its `value`.
fn webdriver(http: &ureq::Agent, url: &str, body: &serde_json::Value) -> serde_json::Value {
    let answer = reply(
        http.post(url)
            .header("Content-Type", "application/json")
            .send(body.to_string().as_bytes()),
    );
    let json: serde_json::Value = serde_json::from_slice(&answer.body).expect("WebDriver JSON");
    assert_eq!(answer.status, 200, "WebDriver {url}: {json}");
    json["value"].clone()
}

/// `scripts/demo`, in a process group of its own as a terminal's foreground job; stopped with
/// Ctrl-C (SIGINT to the group) when dropped, so a failing test leaves nothing running.
struct Demo(Child);

impl Demo {
    fn ctrl_c(&self) {
        // SAFETY: killpg(2) on the process group of our own child.
        unsafe { libc::killpg(self.0.id() as i32, libc::SIGINT) };
    }
}

impl Drop for Demo {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            self.ctrl_c();
            let _ = self.0.wait();
        }
    }
}

/// `scripts/demo` as a person runs it, its pages in a real browser, then Ctrl-C: ready only when
/// the gateway listens; the stylesheet applies (nginx serves it as text/css); the form posts
/// with CSRF (the browser sends Origin); a 3 MiB upload passes nginx; one Ctrl-C drains.
#[test]
fn demo_in_a_real_browser() {
    let test = "demo_in_a_real_browser";
    if !["nginx", "chromium", "chromedriver"]
        .iter()
        .all(|program| installed(program, test))
    {
        return;
    }
    let port = free_tcp_address().port();
    let gateway = free_tcp_address();
    let dir = tempfile::tempdir().expect("tempdir");
    let stderr = dir.path().join("demo.stderr");
    let demo = Command::new("bash")
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/demo"))
        .env("WFASTCGI_BIN", BINARY)
        .env("WFASTCGI_DEMO_PORT", port.to_string())
        .env("WFASTCGI_DEMO_GATEWAY", gateway.to_string())
        .env("WFASTCGI_TEST_VENV", venv())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(&stderr).expect("stderr file"))
        // Its own process group, as a terminal's foreground job: Ctrl-C is sent to the group.
        .process_group(0)
        .spawn()
        .expect("start scripts/demo");
    let mut demo = Demo(demo);
    let stdout = demo.0.stdout.take().expect("stdout");
    let (lines, ready) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufRead::lines(std::io::BufReader::new(stdout)).map_while(Result::ok) {
            let _ = lines.send(line);
        }
    });
    let said = loop {
        match ready.recv_timeout(Duration::from_secs(120)) {
            Ok(line) if line.starts_with("ready") => break line,
            Ok(_) => continue,
            Err(e) => {
                panic!(
                    "scripts/demo never said ready ({e}): {}",
                    std::fs::read_to_string(&stderr).unwrap_or_default()
                );
            }
        }
    };
    assert!(
        said.contains(&format!("http://127.0.0.1:{port}/")) && said.contains(&gateway.to_string()),
        "{said}"
    );
    assert!(
        std::net::TcpStream::connect(gateway).is_ok(),
        "ready before the gateway listens"
    );

    let base = format!("http://127.0.0.1:{port}");
    let browser = Browser::start();
    browser.open(&format!("{base}/"));
    // style.css sets `max-width: 40em` on the body: 640px once applied.
    assert_eq!(
        browser.run("return getComputedStyle(document.body).maxWidth;", false),
        "640px",
        "the stylesheet does not apply"
    );
    browser.open(&format!("{base}/form/"));
    browser.run(
        "document.querySelector('input[name=name]').value = 'Ann Lee';
         document.querySelector('button[type=submit]').click();",
        false,
    );
    browser.wait_for("document.querySelector('h1') && document.querySelector('h1').textContent.startsWith('Hello')");
    assert_eq!(
        browser.run("return document.querySelector('h1').textContent;", false),
        "Hello, Ann Lee!"
    );
    browser.open(&format!("{base}/upload/"));
    let uploaded = browser.run(
        "const done = arguments[arguments.length - 1];
         const form = new FormData();
         form.append('csrfmiddlewaretoken',
                     document.querySelector('[name=csrfmiddlewaretoken]').value);
         form.append('file', new Blob([new Uint8Array(3 * 1024 * 1024)]), 'big.bin');
         fetch('/upload/', {method: 'POST', body: form})
             .then(r => r.text().then(t => done([r.status, t])))
             .catch(e => done([0, String(e)]));",
        true,
    );
    assert_eq!(uploaded[0], 200, "{uploaded}");
    let json: serde_json::Value =
        serde_json::from_str(uploaded[1].as_str().expect("text")).expect("json");
    assert_eq!(json["size"], 3 * 1024 * 1024);
    drop(browser);

    demo.ctrl_c();
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Ok(Some(status)) = demo.0.try_wait() {
            break status;
        }
        assert!(Instant::now() < deadline, "scripts/demo did not stop");
        std::thread::sleep(Duration::from_millis(50));
    };
    let log = std::fs::read_to_string(&stderr).unwrap_or_default();
    assert!(status.success(), "{status:?}: {log}");
    assert!(
        log.contains("signal received: finishing the requests in flight"),
        "{log}"
    );
    assert!(
        !log.contains("second signal"),
        "one Ctrl-C signalled twice: {log}"
    );
}

/// An application that leaks 1 MiB per request, behind nginx, with two worker processes under
/// WSGI_MAX_RSS: each worker is replaced when it grows past the limit, one at a time, and not
/// one of 2,000 requests fails.
#[test]
fn nginx_leaking_app_is_recycled_by_max_rss_without_a_failed_request() {
    if !installed(
        "nginx",
        "nginx_leaking_app_is_recycled_by_max_rss_without_a_failed_request",
    ) {
        return;
    }
    let app = AppDir::new(
        "ops.leak",
        &[("WSGI_MAX_RSS", "100"), ("WSGI_LOG_LEVEL", "info")],
    );
    let gateway = Gateway::bind(
        Address::Tcp(any_port()),
        app.path(),
        &["--processes", "2", "--threads", "2"],
    );
    let Some(Address::Tcp(upstream)) = gateway.address.clone() else {
        unreachable!()
    };
    let dir = tempfile::tempdir().expect("temporary folder");
    let port = free_tcp_address().port();
    let _nginx = nginx(dir.path(), port, &upstream.to_string(), false, "");
    let url = format!("http://127.0.0.1:{port}/");
    let clients: Vec<_> = (0..4)
        .map(|_| {
            let url = url.clone();
            std::thread::spawn(move || {
                let http = agent();
                let mut failures = Vec::new();
                let mut pids = std::collections::HashSet::new();
                for _ in 0..500 {
                    let answer = get(&http, &url);
                    if answer.status == 200 {
                        pids.insert(answer.text());
                    } else {
                        failures.push(format!("{} {}", answer.status, answer.text()));
                    }
                }
                (failures, pids)
            })
        })
        .collect();
    let mut failures = Vec::new();
    let mut pids = std::collections::HashSet::new();
    for client in clients {
        let (failed, seen) = client.join().expect("client thread");
        failures.extend(failed);
        pids.extend(seen);
    }
    let log = app.log();
    assert!(failures.is_empty(), "{failures:?}\n{log}");
    let recycled = log.matches("asks to be recycled").count();
    // 2,000 MiB leaked over workers of 100 MiB at most: many replacements.
    assert!(recycled >= 10, "{recycled} recycled\n{log}");
    assert!(pids.len() > 10, "{} worker processes answered", pids.len());
    assert!(log.contains("is above WSGI_MAX_RSS=100 MiB"), "{log}");
    assert!(
        !log.contains("exited:"),
        "no worker counted as crashed\n{log}"
    );
    println!(
        "2,000 requests, 0 failed, {recycled} workers recycled, {} worker processes answered",
        pids.len()
    );
}
