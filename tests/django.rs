//! The Django example (examples/django_site) through the binary, in a virtualenv given by
//! WSGI_VENV. Run through scripts/test, which makes the venv and sets WFASTCGI_TEST_VENV.

mod common;

use std::path::{Path, PathBuf};

use common::*;

fn venv() -> PathBuf {
    let venv = std::env::var_os("WFASTCGI_TEST_VENV").expect(
        "WFASTCGI_TEST_VENV is not set: run the tests with scripts/test, which makes the venv with Django",
    );
    PathBuf::from(venv)
}

fn site() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/django_site")
}

struct Django {
    gateway: Gateway,
    log: tempfile::TempDir,
}

impl Django {
    fn start() -> Django {
        let log = tempfile::tempdir().expect("tempdir");
        let venv = venv();
        let log_file = log.path().join("wfastcgi.log");
        let gateway = Gateway::iis(&[
            ("WSGI_VENV", venv.to_str().expect("utf-8 path")),
            ("WSGI_LOG", log_file.to_str().expect("utf-8 path")),
        ]);
        Django { gateway, log }
    }

    /// The log once it holds `needle` (it is written by a background thread), or after 20 s.
    fn log_with(&self, needle: &str) -> String {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        loop {
            let log =
                std::fs::read_to_string(self.log.path().join("wfastcgi.log")).unwrap_or_default();
            if log.contains(needle) || std::time::Instant::now() > deadline {
                return log;
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    }
}

fn params(method: &str, url: &str) -> Vec<(String, String)> {
    iis_params(&site(), method, url)
}

fn cookie(response: &Response, name: &str) -> String {
    response
        .headers
        .iter()
        .filter(|(k, _)| k.eq_ignore_ascii_case("Set-Cookie"))
        .find_map(|(_, v)| v.strip_prefix(&format!("{name}=")))
        .and_then(|v| v.split(';').next())
        .unwrap_or_else(|| panic!("no {name} cookie in {:?}", response.headers))
        .to_owned()
}

#[test]
fn pages_forms_uploads_json_streams_and_errors() {
    let mut django = Django::start();
    let mut client = django.gateway.client();

    let page = client.get(1, &params("GET", "/"));
    assert_eq!(
        page.status,
        200,
        "{}\n{}",
        page.stderr_text(),
        django.log_with("loaded")
    );
    assert!(page.text().contains("wfastcgi Django example"));

    // A form with CSRF protection: the token from the page and the cookie must match.
    let form = client.get(2, &params("GET", "/form/"));
    assert_eq!(form.status, 200);
    let csrf = cookie(&form, "csrftoken");
    let html = form.text();
    let marker = "name=\"csrfmiddlewaretoken\" value=\"";
    let start = html.find(marker).expect("token in the form") + marker.len();
    let token = &html[start..start + html[start..].find('"').expect("end of token")];
    let body = format!("csrfmiddlewaretoken={token}&name=Ann");
    let mut post = params("POST", "/form/");
    set_param(
        &mut post,
        "CONTENT_TYPE",
        "application/x-www-form-urlencoded",
    );
    set_param(&mut post, "CONTENT_LENGTH", &body.len().to_string());
    set_param(&mut post, "HTTP_COOKIE", &format!("csrftoken={csrf}"));
    let hello = client.request(&Send::new(3, &post).body(body.as_bytes()));
    assert_eq!(hello.status, 200, "{}", hello.text());
    assert!(hello.text().contains("Hello, Ann!"));
    // Without the cookie Django refuses the POST.
    set_param(&mut post, "HTTP_COOKIE", "");
    let refused = client.request(&Send::new(4, &post).body(body.as_bytes()));
    assert_eq!(refused.status, 403);

    // A multipart upload of 3 MB (over Django's in-memory limit: it spools to disk).
    let file = bytes_of(3_000_000, 11);
    let upload = client.get(5, &params("GET", "/upload/"));
    let csrf = cookie(&upload, "csrftoken");
    let boundary = "wfastcgi-boundary";
    let mut body = Vec::new();
    body.extend_from_slice(format!("--{boundary}\r\nContent-Disposition: form-data; name=\"csrfmiddlewaretoken\"\r\n\r\n{csrf}\r\n").as_bytes());
    body.extend_from_slice(format!("--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"data.bin\"\r\nContent-Type: application/octet-stream\r\n\r\n").as_bytes());
    body.extend_from_slice(&file);
    body.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
    let mut post = params("POST", "/upload/");
    set_param(
        &mut post,
        "CONTENT_TYPE",
        &format!("multipart/form-data; boundary={boundary}"),
    );
    set_param(&mut post, "CONTENT_LENGTH", &body.len().to_string());
    set_param(&mut post, "HTTP_COOKIE", &format!("csrftoken={csrf}"));
    let mut request = Send::new(6, &post).body(&body);
    request.stdin_record = 8192; // as IIS sends it
    let uploaded = client.request(&request);
    assert_eq!(uploaded.status, 200, "{}", uploaded.text());
    let json = uploaded.json();
    assert_eq!(json["name"], "data.bin");
    assert_eq!(json["size"], file.len());
    assert_eq!(json["sha256"], sha256_hex(&file));

    let info = client.get(7, &params("GET", "/api/info/?a=1&a=2")).json();
    assert_eq!(info["path"], "/api/info/");
    assert_eq!(info["query"]["a"], serde_json::json!(["1", "2"]));
    assert_eq!(info["server_software"], "Microsoft-IIS/10.0");

    let streamed = client.get(8, &params("GET", "/stream/"));
    let text = streamed.text();
    assert_eq!(text.lines().count(), 100);
    assert!(text.ends_with("line 100\n"));
    // The async views of the ASGI example work under WSGI too (Django runs them in a loop of
    // its own per request; it consumes the async stream whole).
    let info = client.get(11, &params("GET", "/async/info/?a=1")).json();
    assert_eq!(info["query"]["a"], serde_json::json!(["1"]));
    let streamed = client.get(12, &params("GET", "/async/stream/"));
    assert_eq!(streamed.text(), text);

    let missing = client.get(9, &params("GET", "/no/such/page/"));
    assert_eq!(missing.status, 404);
    assert!(missing.text().contains("Not found (404)"));

    // Django's own error view: a 500 page from the app, not a gateway failure.
    let boom = client.get(10, &params("GET", "/boom/"));
    assert_eq!(boom.status, 500);
    assert!(boom.text().contains("Server error (500)"));
    assert!(boom.stderr.is_empty());
    let log = django.log_with("boom: deliberate error");
    assert!(
        log.contains("boom: deliberate error"),
        "Django's error log reaches ours:\n{log}"
    );
}

#[test]
fn an_iis_sub_application_routes_with_its_script_name() {
    let mut django = Django::start();
    let mut client = django.gateway.client();
    let mut p = params("GET", "/shop/api/info/");
    set_param(&mut p, "APPL_MD_PATH", "/LM/W3SVC/1/ROOT/shop");
    let info = client.get(1, &p).json();
    assert_eq!(info["script_name"], "/shop");
    assert_eq!(info["path"], "/shop/api/info/");
}

#[test]
fn the_virtualenv_is_the_interpreter_prefix() {
    let venv = venv();
    let app = AppDir::new(
        "hello.sys_app",
        &[("WSGI_VENV", venv.to_str().expect("utf-8"))],
    );
    let mut gateway = Gateway::iis(&[]);
    let json = gateway.client().get(1, &app.iis_params("GET", "/")).json();
    let venv = venv.canonicalize().expect("venv path");
    let prefix = PathBuf::from(json["prefix"].as_str().expect("prefix"));
    assert_eq!(prefix.canonicalize().expect("prefix path"), venv);
    assert_ne!(json["prefix"], json["base_prefix"]);
}

/// `check --request` on a failing Django view shows the traceback Django logged (to stderr,
/// which the gateway logs), not only the 500.
#[test]
fn check_request_shows_what_the_application_logged() {
    let output = std::process::Command::new(BINARY)
        .arg("check")
        .arg(site())
        .arg("--venv")
        .arg(venv())
        .args(["--request", "/boom/"])
        .output()
        .expect("run wfastcgi check");
    let report = String::from_utf8_lossy(&output.stdout);
    assert_eq!(output.status.code(), Some(1), "{report}");
    assert!(
        report.contains("FAIL  GET /boom/ answered 500 Internal Server Error"),
        "{report}"
    );
    assert!(report.contains("logged while handling it:"), "{report}");
    assert!(
        report.contains("RuntimeError: boom: deliberate error to show the 500 page"),
        "{report}"
    );
}
