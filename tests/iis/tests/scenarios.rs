//! The Windows scenarios: `wfastcgi.exe` started exactly as IIS starts it, with the official
//! CPython for Windows, driven over IIS's pipe. `scripts/test-windows` builds everything, lays
//! out the folders named by the WFASTCGI_* variables below and runs this under Wine.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use iis_standin::{iis_params, set_param, Client, IisProcess, Response};
use sha2::{Digest, Sha256};

/// A folder `scripts/test-windows` prepared (a Windows path).
fn folder(var: &str) -> PathBuf {
    PathBuf::from(
        std::env::var(var).unwrap_or_else(|_| panic!("{var} is not set: run scripts/test-windows")),
    )
}

/// `wfastcgi.exe` as pip installs it: in a virtualenv's `Scripts\`, made from the CPython whose
/// `python311.dll` it finds through that virtualenv's `pyvenv.cfg`.
fn installed_exe() -> PathBuf {
    folder("WFASTCGI_VENV").join("Scripts").join("wfastcgi.exe")
}

/// A copy of the binary alone in a folder: nothing beside it, no virtualenv around it.
fn bare_exe(name: &str) -> PathBuf {
    let dir = scratch(&format!("{name}-bin"));
    std::fs::create_dir_all(&dir).expect("scratch folder");
    let exe = dir.join("wfastcgi.exe");
    std::fs::copy(installed_exe(), &exe).expect("copy wfastcgi.exe");
    exe
}

fn scratch(name: &str) -> PathBuf {
    let dir = folder("WFASTCGI_SCRATCH").join(name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("scratch folder");
    dir
}

/// A site folder with a web.config of these app settings; the test apps are on PYTHONPATH.
fn site(name: &str, settings: &[(&str, &str)]) -> PathBuf {
    let dir = scratch(name).join("site");
    std::fs::create_dir_all(&dir).expect("site folder");
    let source = folder("WFASTCGI_SOURCE");
    let apps = format!(
        "{};{}",
        source.join("tests").join("apps").display(),
        source.join("tests").join("iis").join("apps").display()
    );
    let mut adds = format!("    <add key=\"PYTHONPATH\" value=\"{apps}\" />\n");
    for (key, value) in settings {
        adds.push_str(&format!("    <add key=\"{key}\" value=\"{value}\" />\n"));
    }
    let config = format!(
        "<?xml version=\"1.0\" encoding=\"utf-8\"?>\n<configuration>\n  <appSettings>\n{adds}  </appSettings>\n</configuration>\n"
    );
    std::fs::write(dir.join("web.config"), config).expect("web.config");
    dir
}

/// IIS starts the process in its own folder, not the site's.
fn start_exe(exe: &Path, site: &Path, signal_before_terminate: bool) -> IisProcess {
    let cwd = site.parent().expect("scratch folder");
    IisProcess::start(exe, "", cwd, &[], signal_before_terminate).expect("start wfastcgi.exe")
}

fn start(site: &Path) -> IisProcess {
    start_exe(&installed_exe(), site, false)
}

fn params(site: &Path, method: &str, path: &str, query: &str) -> Vec<(String, String)> {
    iis_params(&site.display().to_string(), method, path, query)
}

fn get(client: &mut Client, site: &Path, path: &str, query: &str) -> Response {
    client
        .request(&params(site, "GET", path, query), &[])
        .unwrap_or_else(|e| panic!("GET {path}?{query}: {e}"))
}

fn post(client: &mut Client, site: &Path, path: &str, content_type: &str, body: &[u8]) -> Response {
    let mut p = params(site, "POST", path, "");
    set_param(&mut p, "CONTENT_TYPE", content_type);
    set_param(&mut p, "CONTENT_LENGTH", &body.len().to_string());
    client
        .request(&p, body)
        .unwrap_or_else(|e| panic!("POST {path}: {e}"))
}

/// `len` bytes that differ from one test to the next (`seed`) and along the body.
fn bytes_of(len: usize, seed: u32) -> Vec<u8> {
    let mut state = seed.wrapping_mul(2_654_435_761).wrapping_add(1);
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 17;
            state ^= state << 5;
            state as u8
        })
        .collect()
}

fn pattern(len: usize) -> Vec<u8> {
    (0..len).map(|i| i as u8).collect()
}

fn json_field<'a>(text: &'a str, key: &str) -> Option<&'a str> {
    let marker = format!("\"{key}\": ");
    let start = text.find(&marker)? + marker.len();
    let rest = &text[start..];
    if let Some(quoted) = rest.strip_prefix('"') {
        let mut end = 0;
        let bytes = quoted.as_bytes();
        while end < bytes.len() && !(bytes[end] == b'"' && (end == 0 || bytes[end - 1] != b'\\')) {
            end += 1;
        }
        Some(&quoted[..end])
    } else {
        rest.split([',', '}']).next()
    }
}

fn wait_exit(process: &IisProcess, what: &str) -> u32 {
    process
        .wait(Duration::from_secs(60))
        .unwrap_or_else(|| panic!("wfastcgi.exe still runs 60 s after {what}"))
}

#[test]
fn a_thousand_requests_on_one_pipe_with_bodies_echoed_byte_exact() {
    let site = site("thousand", &[("WSGI_HANDLER", "iisapp.echo")]);
    let process = start(&site);
    let mut client = Client::new(process.pipe());
    for n in 0..1000u32 {
        // Request ids go round 1..=255 about four times.
        if n % 3 == 0 {
            let answer = get(&mut client, &site, "/get", &format!("n={n}"));
            assert_eq!(answer.status, 200, "request {n}: {}", answer.stderr_text());
            assert!(answer.body.is_empty(), "request {n}");
        } else {
            let body = bytes_of((n as usize * 997) % 70_000, n);
            let answer = post(
                &mut client,
                &site,
                "/echo",
                "application/octet-stream",
                &body,
            );
            assert_eq!(answer.status, 200, "request {n}: {}", answer.stderr_text());
            assert_eq!(answer.body.len(), body.len(), "request {n}");
            assert!(answer.body == body, "request {n}: body differs");
        }
    }
    assert!(process.is_running());
}

#[test]
fn fifty_mib_upload_and_download_byte_exact() {
    const SIZE: usize = 50 * 1024 * 1024;
    let site = site("fifty", &[("WSGI_HANDLER", "iisapp.echo")]);
    let process = start(&site);
    let mut client = Client::new(process.pipe());
    let upload = bytes_of(SIZE, 50);
    let answer = post(
        &mut client,
        &site,
        "/echo",
        "application/octet-stream",
        &upload,
    );
    assert_eq!(answer.status, 200, "{}", answer.stderr_text());
    assert_eq!(answer.body.len(), SIZE);
    assert!(answer.body == upload, "the echoed upload differs");
    drop(client);
    drop(process);

    let site = self::site("fifty-down", &[("WSGI_HANDLER", "iisapp.download")]);
    let process = start(&site);
    let mut client = Client::new(process.pipe());
    let answer = get(&mut client, &site, "/download", &format!("n={SIZE}"));
    assert_eq!(answer.status, 200, "{}", answer.stderr_text());
    assert_eq!(answer.body.len(), SIZE);
    assert!(answer.body == pattern(SIZE), "the download differs");
}

#[test]
fn iis_closing_the_pipe_ends_the_process() {
    let site = site("closed", &[("WSGI_HANDLER", "hello.app")]);
    let mut process = start(&site);
    let answer = get(&mut Client::new(process.pipe()), &site, "/", "");
    assert_eq!(answer.status, 200, "{}", answer.stderr_text());
    process.close_pipe();
    assert_eq!(wait_exit(&process, "IIS closed the pipe"), 0);
}

#[test]
fn the_shutdown_event_stops_an_idle_process() {
    let site = site("event-idle", &[("WSGI_HANDLER", "hello.app")]);
    let process = start_exe(&installed_exe(), &site, true);
    let answer = get(&mut Client::new(process.pipe()), &site, "/", "");
    assert_eq!(answer.status, 200, "{}", answer.stderr_text());
    process.signal_shutdown();
    assert_eq!(wait_exit(&process, "the shutdown event"), 0);
}

#[test]
fn the_shutdown_event_lets_a_request_whose_body_is_arriving_finish() {
    let site = site("event-body", &[("WSGI_HANDLER", "iisapp.echo")]);
    let process = start_exe(&installed_exe(), &site, true);
    let mut client = Client::new(process.pipe());
    // Python starts with the first request: let that happen before the test proper.
    assert_eq!(get(&mut client, &site, "/", "").status, 200);

    let body = bytes_of(3 * 1024 * 1024, 7);
    let mut p = params(&site, "POST", "/echo", "");
    set_param(&mut p, "CONTENT_TYPE", "application/octet-stream");
    set_param(&mut p, "CONTENT_LENGTH", &body.len().to_string());
    let id = client.begin(&p).expect("request head");
    let (first, rest) = body.split_at(4096);
    client.body(id, first).expect("first part of the body");
    process.signal_shutdown();
    std::thread::sleep(Duration::from_millis(500));
    let answer = std::thread::scope(|scope| {
        let sender = scope.spawn(|| {
            client.body(id, rest)?;
            client.end_body(id)
        });
        let answer = Client::new(process.pipe()).response(id);
        sender.join().expect("sender").expect("rest of the body");
        answer.expect("the answer")
    });
    assert_eq!(answer.status, 200, "{}", answer.stderr_text());
    assert!(answer.body == body, "the echo differs");
    assert_eq!(wait_exit(&process, "the shutdown event"), 0);
}

#[test]
fn a_watched_file_changing_restarts_after_the_request_in_flight() {
    let site = site("watched", &[("WSGI_HANDLER", "iisapp.slow")]);
    let process = start(&site);
    let mut client = Client::new(process.pipe());
    let first = get(&mut client, &site, "/", "ms=1");
    assert_eq!(first.status, 200, "{}", first.stderr_text());
    let id = {
        let mut p = params(&site, "GET", "/", "ms=3000");
        set_param(&mut p, "CONTENT_LENGTH", "");
        let id = client.begin(&p).expect("request head");
        client.end_body(id).expect("end of body");
        id
    };
    std::thread::sleep(Duration::from_millis(500));
    std::fs::write(site.join("views.py"), "# changed\n").expect("change a watched file");
    let answer = client
        .response(id)
        .expect("the request in flight is answered");
    assert_eq!(answer.status, 200, "{}", answer.stderr_text());
    assert_eq!(answer.text(), "slow done");
    assert_eq!(wait_exit(&process, "a watched file changed"), 0);
}

#[test]
fn an_app_that_fails_to_import_answers_500_saying_why_and_stays_up() {
    let site = site("import-error", &[("WSGI_HANDLER", "import_error.app")]);
    let process = start(&site);
    let mut client = Client::new(process.pipe());
    for _ in 0..2 {
        let answer = get(&mut client, &site, "/", "");
        assert_eq!(answer.status, 500);
        // IIS shows FCGI_STDERR in its 500 page (stderrMode ReturnStdErrIn500).
        assert!(
            answer.stderr_text().contains("simulated import failure"),
            "{}",
            answer.stderr_text()
        );
    }
    assert!(process.is_running());
}

#[test]
fn a_non_ascii_url_arrives_through_unencoded_url() {
    let site = site("non-ascii", &[("WSGI_HANDLER", "hello.environ_app")]);
    let process = start(&site);
    let mut client = Client::new(process.pipe());
    // IIS converts server variables with the system code page: é becomes '?'.
    let mut p = params(&site, "GET", "/caf?/men?", "x=1");
    set_param(&mut p, "UNENCODED_URL", "/caf%C3%A9/men%C3%BC?x=1");
    let answer = client.request(&p, &[]).expect("answer");
    assert_eq!(answer.status, 200, "{}", answer.stderr_text());
    let text = answer.text();
    // PEP 3333: the UTF-8 bytes, each as one latin-1 character.
    assert_eq!(
        json_field(&text, "PATH_INFO"),
        Some("/caf\\u00c3\\u00a9/men\\u00c3\\u00bc"),
        "{text}"
    );
    assert_eq!(json_field(&text, "QUERY_STRING"), Some("x=1"), "{text}");
}

#[test]
fn paths_are_the_ones_iis_gives_without_a_verbatim_prefix() {
    let site = site("paths", &[("WSGI_HANDLER", "iisapp.paths")]);
    let process = start(&site);
    let answer = get(&mut Client::new(process.pipe()), &site, "/paths", "");
    assert_eq!(answer.status, 200, "{}", answer.stderr_text());
    let text = answer.text();
    assert!(
        !text.contains(r"\\\\?\\"),
        "a verbatim path reached Python: {text}"
    );
    let site_json = site.display().to_string().replace('\\', "\\\\");
    assert_eq!(json_field(&text, "cwd"), Some(site_json.as_str()), "{text}");
    assert_eq!(
        json_field(&text, "path0"),
        Some(site_json.as_str()),
        "{text}"
    );
    // os.path.relpath(__file__, os.getcwd()) works (it raised ValueError with \\?\ paths).
    assert!(
        json_field(&text, "relpath").is_some_and(|p| p.ends_with("iisapp.py")),
        "{text}"
    );
}

#[test]
fn the_django_example_with_its_csrf_form_and_an_upload() {
    let source = folder("WFASTCGI_SOURCE")
        .join("examples")
        .join("django_site");
    let site = scratch("django").join("site");
    copy_tree(&source, &site);
    let process = start(&site);
    let mut client = Client::new(process.pipe());

    let page = get(&mut client, &site, "/", "");
    assert_eq!(page.status, 200, "{}", page.stderr_text());
    assert!(page.text().contains("wfastcgi Django example"));

    let form = get(&mut client, &site, "/form/", "");
    assert_eq!(form.status, 200, "{}", form.stderr_text());
    let csrf = cookie(&form, "csrftoken");
    let html = form.text();
    let marker = "name=\"csrfmiddlewaretoken\" value=\"";
    let start = html.find(marker).expect("token in the form") + marker.len();
    let token = &html[start..start + html[start..].find('"').expect("end of token")];
    let body = format!("csrfmiddlewaretoken={token}&name=Ann");
    let mut p = params(&site, "POST", "/form/", "");
    set_param(&mut p, "CONTENT_TYPE", "application/x-www-form-urlencoded");
    set_param(&mut p, "CONTENT_LENGTH", &body.len().to_string());
    set_param(&mut p, "HTTP_COOKIE", &format!("csrftoken={csrf}"));
    let hello = client.request(&p, body.as_bytes()).expect("form post");
    assert_eq!(hello.status, 200, "{}", hello.text());
    assert!(hello.text().contains("Hello, Ann!"));
    set_param(&mut p, "HTTP_COOKIE", "");
    let refused = client.request(&p, body.as_bytes()).expect("form post");
    assert_eq!(refused.status, 403, "a POST without the CSRF cookie");

    let file = bytes_of(3_000_000, 11);
    let boundary = "wfastcgi-boundary";
    let mut body = Vec::new();
    body.extend_from_slice(format!("--{boundary}\r\nContent-Disposition: form-data; name=\"csrfmiddlewaretoken\"\r\n\r\n{csrf}\r\n").as_bytes());
    body.extend_from_slice(format!("--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"data.bin\"\r\nContent-Type: application/octet-stream\r\n\r\n").as_bytes());
    body.extend_from_slice(&file);
    body.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
    let mut p = params(&site, "POST", "/upload/", "");
    set_param(
        &mut p,
        "CONTENT_TYPE",
        &format!("multipart/form-data; boundary={boundary}"),
    );
    set_param(&mut p, "CONTENT_LENGTH", &body.len().to_string());
    set_param(&mut p, "HTTP_COOKIE", &format!("csrftoken={csrf}"));
    let uploaded = client.request(&p, &body).expect("upload");
    assert_eq!(uploaded.status, 200, "{}", uploaded.text());
    let text = uploaded.text();
    let digest: String = Sha256::digest(&file)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    assert_eq!(json_field(&text, "size"), Some("3000000"), "{text}");
    assert_eq!(json_field(&text, "sha256"), Some(digest.as_str()), "{text}");
}

/// The FastAPI example served as ASGI by the Windows build, on asyncio's default (proactor)
/// loop: lifespan state in a JSON GET, path and query parameters, a pydantic-validated POST and
/// its 422, a StreamingResponse, and the background task the POST queued.
#[test]
fn the_fastapi_example_as_asgi_with_lifespan_state_validation_and_a_stream() {
    let source = folder("WFASTCGI_SOURCE")
        .join("examples")
        .join("fastapi_app");
    let site = scratch("fastapi").join("site");
    copy_tree(&source, &site);
    let process = start(&site);
    let mut client = Client::new(process.pipe());

    let index = get(&mut client, &site, "/", "");
    assert_eq!(index.status, 200, "{}", index.stderr_text());
    assert!(
        index
            .text()
            .contains("\"greeting\":\"hello from lifespan\""),
        "{}",
        index.text()
    );
    let item = get(&mut client, &site, "/items/7", "q=tea&limit=3");
    assert_eq!(item.text(), r#"{"item_id":7,"q":"tea","limit":3}"#);
    assert_eq!(get(&mut client, &site, "/items/seven", "").status, 422);

    let created = post(
        &mut client,
        &site,
        "/items",
        "application/json",
        br#"{"name": "kettle", "price": 12.5, "tags": ["tea"]}"#,
    );
    assert_eq!(created.status, 201, "{}", created.text());
    assert_eq!(
        created.text(),
        r#"{"created":{"name":"kettle","price":12.5,"tags":["tea"]}}"#
    );
    let invalid = post(
        &mut client,
        &site,
        "/items",
        "application/json",
        br#"{"name": "kettle", "price": -1}"#,
    );
    assert_eq!(invalid.status, 422, "{}", invalid.text());
    assert!(
        invalid.text().contains("greater_than"),
        "{}",
        invalid.text()
    );

    let streamed = get(&mut client, &site, "/stream", "lines=500");
    assert_eq!(streamed.status, 200, "{}", streamed.stderr_text());
    let expected: String = (1..=500).map(|n| format!("line {n}\n")).collect();
    assert_eq!(streamed.text(), expected);

    // The background task runs after its response was sent: asked until it shows.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let stats = get(&mut client, &site, "/stats", "").text();
        if stats.contains("\"background_done\":1,") {
            break;
        }
        assert!(Instant::now() < deadline, "no background task ran: {stats}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn cookie(response: &Response, name: &str) -> String {
    response
        .headers_named("Set-Cookie")
        .find_map(|v| v.strip_prefix(&format!("{name}=")))
        .and_then(|v| v.split(';').next())
        .unwrap_or_else(|| panic!("no {name} cookie in {:?}", response.headers))
        .to_owned()
}

fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("folder");
    for entry in std::fs::read_dir(from).expect("source folder") {
        let entry = entry.expect("entry");
        let target = to.join(entry.file_name());
        if entry.file_type().expect("type").is_dir() {
            copy_tree(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).expect("copy");
        }
    }
}

#[test]
fn wsgi_venv_names_a_windows_layout_virtualenv() {
    let venv = folder("WFASTCGI_VENV");
    let venv_text = venv.display().to_string();
    let site = site(
        "venv",
        &[("WSGI_HANDLER", "iisapp.paths"), ("WSGI_VENV", &venv_text)],
    );
    // A binary that is not in the virtualenv: WSGI_VENV alone says where Python is.
    let process = start_exe(&bare_exe("venv"), &site, false);
    let answer = get(&mut Client::new(process.pipe()), &site, "/", "");
    assert_eq!(answer.status, 200, "{}", answer.stderr_text());
    let text = answer.text();
    let venv_json = venv_text.replace('\\', "\\\\");
    assert_eq!(
        json_field(&text, "prefix"),
        Some(venv_json.as_str()),
        "{text}"
    );
    // The virtualenv's Lib\site-packages is on sys.path.
    assert!(
        json_field(&text, "venv_marker").is_some_and(|m| m.contains("site-packages")),
        "{text}"
    );
}

#[test]
fn wsgi_python_home_finds_python_for_a_binary_alone_in_its_folder() {
    let home = folder("WFASTCGI_PYTHON_HOME").display().to_string();
    let site = site(
        "python-home",
        &[
            ("WSGI_HANDLER", "iisapp.paths"),
            ("WSGI_PYTHON_HOME", &home),
        ],
    );
    let process = start_exe(&bare_exe("python-home"), &site, false);
    let answer = get(&mut Client::new(process.pipe()), &site, "/", "");
    assert_eq!(answer.status, 200, "{}", answer.stderr_text());
    assert!(answer.text().contains("3.11."), "{}", answer.text());
}

/// Runs Windows' `reg` command (Wine has one too).
fn reg(args: &[&str]) {
    let status = std::process::Command::new("reg")
        .args(args)
        .stdout(std::process::Stdio::null())
        .status()
        .expect("run reg");
    assert!(status.success(), "reg {args:?}");
}

// One test, not two: the registry is shared by every process of the Wine prefix.
#[test]
fn python_from_the_registry_and_a_500_naming_every_place_without_it() {
    let site = site("no-python", &[("WSGI_HANDLER", "hello.app")]);
    let exe = bare_exe("no-python");
    let process = start_exe(&exe, &site, false);
    let mut client = Client::new(process.pipe());
    for _ in 0..2 {
        let answer = get(&mut client, &site, "/", "");
        assert_eq!(answer.status, 500);
        let text = answer.stderr_text();
        assert!(text.contains("python311.dll"), "{text}");
        assert!(text.contains("the folder of wfastcgi.exe"), "{text}");
        assert!(text.contains("WSGI_PYTHON_HOME"), "{text}");
        assert!(text.contains("PATH"), "{text}");
    }
    assert!(
        process.is_running(),
        "the process stays up to explain itself"
    );
    drop(client);
    drop(process);

    // The python.org installer registers its folder (PEP 514).
    let key = r"HKCU\Software\Python\PythonCore\3.11\InstallPath";
    let home = folder("WFASTCGI_PYTHON_HOME").display().to_string();
    reg(&["add", key, "/ve", "/d", &home, "/f"]);
    let process = start_exe(&exe, &site, false);
    let answer = get(&mut Client::new(process.pipe()), &site, "/", "");
    reg(&["delete", r"HKCU\Software\Python\PythonCore\3.11", "/f"]);
    assert_eq!(answer.status, 200, "{}", answer.stderr_text());
}

/// `wfastcgi.exe check`, run as an administrator would, with its output.
fn check(site: &Path) -> (i32, String) {
    let output = std::process::Command::new(installed_exe())
        .arg("check")
        .arg(site)
        .arg("--request")
        .arg("/")
        .stdin(std::process::Stdio::null())
        .output()
        .expect("run wfastcgi.exe check");
    let mut text = String::from_utf8_lossy(&output.stdout).into_owned();
    text.push_str(&String::from_utf8_lossy(&output.stderr));
    (output.status.code().unwrap_or(-1), text)
}

#[test]
fn check_passes_on_a_good_site_and_fails_on_a_broken_one() {
    let good = site("check-good", &[("WSGI_HANDLER", "hello.app")]);
    let (code, text) = check(&good);
    assert!(text.contains("python311.dll loaded from"), "{text}");
    assert!(text.contains("answered 200"), "{text}");
    assert!(!text.contains("FAIL"), "{text}");
    assert_eq!(code, 0, "{text}");

    let broken = site("check-broken", &[("WSGI_HANDLER", "hello.no_such_app")]);
    let (code, text) = check(&broken);
    assert!(text.contains("FAIL"), "{text}");
    assert!(text.contains("no_such_app"), "{text}");
    assert_eq!(code, 1, "{text}");
}

/// Starts the binary with `stdin` by hand (not as IIS would) and waits for it to end by itself:
/// its exit code and standard error.
fn refused(stdin: std::process::Stdio, what: &str) -> (Option<i32>, String) {
    let mut child = std::process::Command::new(installed_exe())
        .stdin(stdin)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run wfastcgi.exe");
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("wfastcgi.exe still waits with {what} as standard input");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let mut text = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().expect("stderr"), &mut text)
        .expect("stderr");
    (status.code(), text)
}

#[test]
fn a_standard_input_that_is_no_pipe_or_socket_is_refused_at_once() {
    let file = scratch("stdin-file").join("input.txt");
    std::fs::write(&file, "not FastCGI").expect("input file");
    let stdin = std::fs::File::open(&file).expect("input file");
    let (code, text) = refused(stdin.into(), "a file");
    assert_eq!(code, Some(2), "{text}");
    assert!(text.contains("standard input is not a socket"), "{text}");
}

#[test]
fn an_anonymous_pipe_as_standard_input_is_refused_at_once() {
    // `type requests | wfastcgi.exe`, or a service wrapper: a pipe, but not IIS's overlapped one.
    let (code, text) = refused(std::process::Stdio::piped(), "an anonymous pipe");
    assert_eq!(code, Some(2), "{text}");
    assert!(text.contains("synchronous I/O"), "{text}");
}

/// The Windows counterpart of SIGUSR1: setting the named event `Global\wfastcgi-stacks-<pid>`
/// (as an administrator's PowerShell would) logs every thread's Python stack.
#[test]
fn the_stack_dump_event_logs_every_threads_python_stack() {
    use windows_sys::Win32::Foundation::CloseHandle;
    use windows_sys::Win32::System::Threading::{OpenEventW, SetEvent, EVENT_MODIFY_STATE};
    let site = site("stacks", &[("WSGI_HANDLER", "ops.app")]);
    let log = site.join("wfastcgi.log");
    std::fs::write(
        site.join("web.config"),
        std::fs::read_to_string(site.join("web.config"))
            .expect("web.config")
            .replace(
                "  </appSettings>",
                &format!(
                    "    <add key=\"WSGI_LOG\" value=\"{}\" />\n  </appSettings>",
                    log.display()
                ),
            ),
    )
    .expect("web.config");
    let process = start(&site);
    let mut client = Client::new(process.pipe());
    let answer = get(&mut client, &site, "/", "");
    assert_eq!(answer.status, 200, "{}", answer.stderr_text());
    let pid = answer.text();
    let name = format!("Global\\wfastcgi-stacks-{pid}");
    let wide: Vec<u16> = name.encode_utf16().chain([0]).collect();
    // SAFETY: a NUL-terminated name; the handle is closed below.
    let event = unsafe { OpenEventW(EVENT_MODIFY_STATE, 0, wide.as_ptr()) };
    assert!(
        !event.is_null(),
        "cannot open {name}: {}",
        std::io::Error::last_os_error()
    );
    // SAFETY: the handle just opened, with EVENT_MODIFY_STATE.
    assert_ne!(unsafe { SetEvent(event) }, 0, "SetEvent");
    // SAFETY: closed once, and not used after.
    unsafe { CloseHandle(event) };
    let deadline = Instant::now() + Duration::from_secs(30);
    let text = loop {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        if text.contains("in _background_sleeper") || Instant::now() > deadline {
            break text;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(
        text.contains(&format!(
            "setting the event {name} logs every thread's Python stack"
        )),
        "{text}"
    );
    assert!(
        text.contains(&format!("{name}: the Python stack of every thread")),
        "{text}"
    );
    assert!(
        text.contains("ops-sleeper (most recent call last)"),
        "{text}"
    );
    assert!(text.contains("in _background_sleeper"), "{text}");
    // It keeps serving.
    assert_eq!(get(&mut client, &site, "/", "").status, 200);
}
