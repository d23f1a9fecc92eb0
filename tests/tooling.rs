//! IIS tooling: enable/disable (through --dry-run and failing appcmd commands), config, the
//! pre-flight check against a good site and many broken ones, debugging and Application Insights.

mod common;

use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use common::*;

fn wfastcgi(args: &[&str]) -> Output {
    Command::new(BINARY)
        .args(args)
        .output()
        .expect("run wfastcgi")
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

#[test]
fn enable_and_disable_dry_run() {
    let output = wfastcgi(&[
        "enable",
        "--dry-run",
        "--arg",
        "--venv",
        "--arg",
        "C:\\My Site\\venv",
    ]);
    assert!(output.status.success());
    let text = stdout(&output);
    let lines: Vec<&str> = text.lines().collect();
    assert!(
        lines[0].ends_with("\\system32\\inetsrv\\appcmd.exe"),
        "{text}"
    );
    assert_eq!(
        &lines[1..4],
        ["set", "config", "/section:system.webServer/fastCGI"]
    );
    assert_eq!(
        lines[4],
        format!("/+[fullPath='{BINARY}', arguments='--venv \"C:\\My Site\\venv\"', signalBeforeTerminateSeconds='30']")
    );
    assert!(
        text.contains(&format!(
            "scriptProcessor=\"{BINARY}|--venv \"C:\\My Site\\venv\"\""
        )),
        "{text}"
    );
    assert!(text.contains("responseBufferLimit=\"0\""), "{text}");
    // The same command as one line to paste into cmd: the argument with spaces quoted, its
    // inner quotes escaped as Windows programs read them.
    let one_line = format!(
        "{} set config /section:system.webServer/fastCGI \"/+[fullPath='{BINARY}', arguments='--venv \\\"C:\\My Site\\venv\\\"', signalBeforeTerminateSeconds='30']\"",
        lines[0]
    );
    assert_eq!(lines[6], "As one line for cmd:", "{text}");
    assert_eq!(lines[7], one_line, "{text}");

    let output = wfastcgi(&["disable", "--dry-run"]);
    assert_eq!(
        stdout(&output).lines().nth(4),
        Some(format!("/-[fullPath='{BINARY}', arguments='']").as_str())
    );
}

#[test]
fn an_existing_file_first_is_the_appcmd_command() {
    // IIS Express: the given command line is used as the appcmd command.
    let dir = tempfile::tempdir().expect("tempdir");
    let appcmd = dir.path().join("appcmd.exe");
    std::fs::write(&appcmd, "").expect("write");
    let appcmd = appcmd.to_string_lossy().into_owned();
    let output = wfastcgi(&[
        "enable",
        "--dry-run",
        &appcmd,
        "/apphostconfig:C:\\x\\applicationhost.config",
    ]);
    let text = stdout(&output);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines[0], appcmd);
    assert_eq!(lines[1], "/apphostconfig:C:\\x\\applicationhost.config");
    assert_eq!(lines[2], "set");
}

#[test]
fn a_missing_or_failing_appcmd_is_a_clear_error() {
    let output = wfastcgi(&["enable"]);
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("appcmd.exe: is IIS installed with its CGI feature?"),
        "{stderr}"
    );

    let output = wfastcgi(&["disable", "/bin/false"]);
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("/bin/false failed with exit code 1"),
        "{stderr}"
    );

    let output = wfastcgi(&["enable", "/no/such/appcmd.exe"]);
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("is not a file"));
}

#[test]
fn config_django_prints_a_working_web_config() {
    let output = wfastcgi(&[
        "config",
        "--django",
        "mysite",
        "--venv",
        "C:\\sites\\mysite\\.venv",
    ]);
    let xml = stdout(&output);
    let settings = wfastcgi::config::parse_app_settings(xml.as_bytes()).expect("valid web.config");
    assert!(settings.contains(&("DJANGO_SETTINGS_MODULE".into(), "mysite.settings".into())));
    let handlers = wfastcgi::iis::fastcgi_handlers(xml.as_bytes()).expect("valid");
    assert_eq!(handlers[0].script_processor, BINARY);
    // The same file serves the example site with this binary.
    let site = tempfile::tempdir().expect("tempdir");
    copy_tree(
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/django_site"),
        site.path(),
    );
    std::fs::write(site.path().join("web.config"), &xml).expect("write");
    let venv = std::env::var("WFASTCGI_TEST_VENV").expect("run through scripts/test");
    let check = wfastcgi(&[
        "check",
        &site.path().to_string_lossy(),
        "--venv",
        &venv,
        "--request",
        "/",
    ]);
    assert!(check.status.success(), "{}", stdout(&check));
    assert!(stdout(&check).contains("handler \"Python_FastCGI\" runs this binary"));
}

fn copy_tree(from: &Path, to: &Path) {
    for entry in std::fs::read_dir(from).expect("list").flatten() {
        let target = to.join(entry.file_name());
        if entry.file_type().expect("type").is_dir() {
            std::fs::create_dir_all(&target).expect("mkdir");
            copy_tree(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).expect("copy");
        }
    }
}

fn check(app: &Path, extra: &[&str]) -> (bool, String) {
    let mut args = vec!["check".to_owned(), app.to_string_lossy().into_owned()];
    args.extend(extra.iter().map(|s| (*s).to_owned()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let output = wfastcgi(&args);
    (output.status.success(), stdout(&output))
}

#[test]
fn check_passes_a_good_site_and_accepts_a_web_config_path() {
    let app = AppDir::new("hello.app", &[]);
    let (ok, report) = check(&app.path().join("web.config"), &["--request", "/?x=1"]);
    assert!(ok, "{report}");
    for line in [
        "ok    read ",
        "ok    setting WSGI_HANDLER = \"hello.app\"",
        "ok    WSGI_LOG ",
        "ok    Python ",
        "ok    sys.path = [",
        "ok    WSGI_HANDLER \"hello.app\" imports and is callable (function)",
        "ok    GET /?x=1 answered 200 OK (14 body bytes)",
        "Everything needed to serve",
    ] {
        assert!(report.contains(line), "missing {line:?} in:\n{report}");
    }
}

/// A broken set-up and the message the check must give for it.
struct Case {
    name: &'static str,
    handler: &'static str,
    settings: Vec<(&'static str, String)>,
    /// Files to add to the app folder.
    files: &'static [(&'static str, &'static str)],
    args: Vec<String>,
    message: &'static str,
}

impl Case {
    fn new(name: &'static str, handler: &'static str, message: &'static str) -> Case {
        Case {
            name,
            handler,
            settings: Vec::new(),
            files: &[],
            args: Vec::new(),
            message,
        }
    }
}

/// Each broken set-up fails the check with its own message.
#[test]
fn check_names_each_broken_set_up() {
    let venv = std::env::var("WFASTCGI_TEST_VENV").expect("run through scripts/test");
    let unwritable = std::env::temp_dir().join("wfastcgi-no-such-dir-parent");
    std::fs::write(&unwritable, "a file, so nothing can be created below it").expect("write");
    let cases = [
        Case {
            files: &[(
                "web.config",
                "<configuration><appSettings/></configuration>",
            )],
            ..Case::new("no handler", "hello.app", "WSGI_HANDLER is not set")
        },
        Case {
            files: &[("web.config", "<configuration><appSettings></configuration>")],
            ..Case::new("malformed web.config", "hello.app", "web.config: XML error")
        },
        Case::new(
            "missing module",
            "nosuch.app",
            "no part of \"nosuch.app\" imports",
        ),
        Case::new(
            "missing attribute",
            "hello.nosuch",
            "the nearest part that imports is \"hello\"",
        ),
        Case {
            files: &[
                ("lib/helper.py", "VALUE = 1\n"),
                ("site_app.py", "import helper\nfrom hello import app\n"),
            ],
            ..Case::new(
                "missing PYTHONPATH entry",
                "site_app.app",
                "module \"helper\" is in",
            )
        },
        Case {
            args: vec!["--venv".into(), venv.clone()],
            ..Case::new(
                "Django without settings",
                "django.core.wsgi.get_wsgi_application()",
                "DJANGO_SETTINGS_MODULE is not set",
            )
        },
        Case {
            args: vec!["--venv".into(), "/no/such/venv".into()],
            ..Case::new(
                "bad virtualenv",
                "hello.app",
                "virtualenv /no/such/venv is not usable",
            )
        },
        Case {
            settings: vec![("WSGI_RESTART_FILE_REGEX", r"(?<=x)\.py".into())],
            ..Case::new(
                "invalid regex",
                "hello.app",
                "cannot be used (the default would be)",
            )
        },
        Case {
            settings: vec![(
                "WSGI_LOG",
                unwritable.join("x.log").to_string_lossy().into_owned(),
            )],
            ..Case::new("unwritable log", "hello.app", "cannot be opened")
        },
        Case {
            settings: vec![("WSGI_THREADS", "zero".into())],
            ..Case::new(
                "invalid setting",
                "hello.app",
                "WSGI_THREADS=\"zero\" is invalid",
            )
        },
        Case::new("not callable", "hello.BODY", "is a bytes, not a callable"),
        Case {
            args: vec!["--request".into(), "/".into()],
            ..Case::new(
                "request fails",
                "errors.call_error",
                "GET / answered 500 Internal Server Error",
            )
        },
    ];
    for case in &cases {
        let settings: Vec<(&str, &str)> = case
            .settings
            .iter()
            .map(|(k, v)| (*k, v.as_str()))
            .collect();
        let app = AppDir::new(case.handler, &settings);
        for (path, text) in case.files {
            let path = app.path().join(path);
            std::fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
            std::fs::write(path, text).expect("write");
        }
        let args: Vec<&str> = case.args.iter().map(String::as_str).collect();
        let (ok, report) = check(app.path(), &args);
        assert!(!ok, "{}: the check passed:\n{report}", case.name);
        assert!(
            report.contains(case.message),
            "{}: {:?} missing from:\n{report}",
            case.name,
            case.message
        );
        assert!(report.contains("FAIL"), "{}", case.name);
    }
}

fn write(app: &AppDir, name: &str, text: &str) {
    std::fs::write(app.path().join(name), text).expect("write");
}

#[test]
fn check_warns_about_the_web_config_handler() {
    let app = AppDir::new("hello.app", &[]);
    let config = std::fs::read_to_string(app.path().join("web.config")).expect("read");
    let handler = r#"<system.webServer><handlers><add name="Python_FastCGI" path="*" verb="*"
        modules="FastCgiModule" scriptProcessor="C:\Python311\python.exe|C:\Python311\Lib\site-packages\wfastcgi.py" />
        </handlers></system.webServer></configuration>"#;
    write(
        &app,
        "web.config",
        &config.replace("</configuration>", handler),
    );
    let (ok, report) = check(app.path(), &[]);
    assert!(ok, "a warning is not a failure:\n{report}");
    assert!(report.contains("still runs wfastcgi.py"), "{report}");

    let ours = format!(
        r#"<system.webServer><handlers><add name="Python_FastCGI" path="*" verb="*" modules="FastCgiModule" scriptProcessor="{BINARY}" />
        </handlers></system.webServer></configuration>"#
    );
    write(
        &app,
        "web.config",
        &config.replace("</configuration>", &ours),
    );
    let (_, report) = check(app.path(), &[]);
    assert!(report.contains("runs this binary"), "{report}");
    assert!(
        report.contains("has no responseBufferLimit=\"0\""),
        "{report}"
    );
}

/// Stub packages stand in for debugpy, ptvsd and applicationinsights: they record how the
/// gateway called them.
#[test]
fn debuggers_and_application_insights_are_started() {
    let app = AppDir::new(
        "hello.app",
        &[
            ("WSGI_DEBUGPY_ADDRESS", "127.0.0.1:5679"),
            ("WSGI_PTVSD_SECRET", "s3cret"),
            ("APPINSIGHTS_INSTRUMENTATIONKEY", "key-123"),
        ],
    );
    let marker = |name: &str| app.path().join(name).to_string_lossy().into_owned();
    std::fs::create_dir_all(app.path().join("applicationinsights")).expect("mkdir");
    write(
        &app,
        "debugpy.py",
        &format!(
            "def listen(address):\n    open({:?}, 'w').write(repr(address))\n",
            marker("debugpy.txt")
        ),
    );
    write(
        &app,
        "ptvsd.py",
        &format!("def enable_attach(secret, address):\n    open({:?}, 'w').write(repr((secret, address)))\n", marker("ptvsd.txt")),
    );
    write(&app, "applicationinsights/__init__.py", "");
    write(
        &app,
        "applicationinsights/requests.py",
        &format!(
            "class _Client:\n    def flush(self):\n        open({:?}, 'w').write('flushed')\n\n\
             class WSGIApplication:\n    def __init__(self, key, app):\n        self.key, self.app, self.client = key, app, _Client()\n\n    \
             def __call__(self, environ, start_response):\n        \
             def start(status, headers, exc_info=None):\n            \
             return start_response(status, headers + [('X-Insights', self.key)], exc_info)\n        \
             return self.app(environ, start)\n",
            marker("flushed.txt")
        ),
    );
    let mut gateway = Gateway::iis(&[]);
    let response = gateway.client().get(1, &app.iis_params("GET", "/"));
    assert_eq!(
        response.header("X-Insights"),
        Some("key-123"),
        "wrapped by WSGIApplication"
    );
    let read = |name: &str| std::fs::read_to_string(app.path().join(name)).unwrap_or_default();
    assert_eq!(read("debugpy.txt"), "('127.0.0.1', 5679)");
    assert_eq!(read("ptvsd.txt"), "('s3cret', ('0.0.0.0', 5678))");
    gateway.signal(libc::SIGTERM);
    assert!(gateway
        .wait_exit(Duration::from_secs(15))
        .expect("exits")
        .success());
    assert_eq!(read("flushed.txt"), "flushed", "telemetry flushed at exit");
    assert!(app.log().contains("debugpy is listening on 127.0.0.1:5679"));
}

#[test]
fn a_missing_debugger_is_logged_not_fatal() {
    let app = AppDir::new("hello.app", &[("WSGI_DEBUGPY_ADDRESS", "127.0.0.1:5679")]);
    let mut gateway = Gateway::iis(&[]);
    assert_eq!(
        gateway.client().get(1, &app.iis_params("GET", "/")).status,
        200
    );
    assert!(app
        .wait_for_log("debugpy could not start")
        .contains("No module named 'debugpy'"));
}

/// Runs the binary with `args` and nothing on standard input; kills it after 10 s. The exit
/// code (None when it had to be killed: it carried on) and standard error.
fn run_briefly(args: &[&str]) -> (Option<i32>, String) {
    let mut child = Command::new(BINARY)
        .args(args)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run wfastcgi");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let code = loop {
        if let Ok(Some(status)) = child.try_wait() {
            break status.code();
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut stderr = String::new();
    use std::io::Read;
    let _ = child
        .stderr
        .take()
        .expect("stderr")
        .read_to_string(&mut stderr);
    (code, stderr)
}

/// Every option either works where it is accepted or is refused, naming itself.
#[test]
fn each_commands_options_work_or_are_refused() {
    let app = AppDir::new("hello.app", &[]);
    let dir = app.path().to_string_lossy().into_owned();
    // check --app-dir DIR checks DIR, whatever the working directory.
    let elsewhere = tempfile::tempdir().expect("tempdir");
    let output = Command::new(BINARY)
        .args(["check", "--app-dir", &dir])
        .current_dir(elsewhere.path())
        .output()
        .expect("run wfastcgi");
    let report = stdout(&output);
    assert!(output.status.success(), "{report}");
    assert!(
        report.contains(&format!(
            "ok    read {}",
            app.path().join("web.config").display()
        )),
        "{report}"
    );
    let refused: &[(&[&str], &str)] = &[
        (&["check", "--threads", "2", &dir], "--threads"),
        (&["check", &dir, "--app-dir", &dir], "--app-dir"),
        (&["--venv", &dir, "check", &dir], "--venv"),
        (&["--threads", "2", "serve"], "--threads"),
        (&["config", "--django", "x", "--threads", "2"], "--threads"),
        (
            &[
                "serve",
                "--bind",
                "127.0.0.1:0",
                "--app-dir",
                &dir,
                "--socket-mode",
                "0600",
            ],
            "--socket-mode",
        ),
        (
            &["serve", "--socket-mode", "0600", "--app-dir", &dir],
            "--socket-mode",
        ),
        (
            &[
                "serve",
                "--bind",
                "127.0.0.1:0",
                "--app-dir",
                &dir,
                "--threads",
                "0",
            ],
            "--threads",
        ),
        (&["--app-dir", &dir, "--threads", "0"], "--threads"),
        (
            &[
                "serve",
                "--bind",
                "127.0.0.1:0",
                "--app-dir",
                &dir,
                "--processes",
                "0",
            ],
            "--processes",
        ),
    ];
    for (args, option) in refused {
        let (code, stderr) = run_briefly(args);
        assert_eq!(code, Some(2), "wfastcgi {args:?} was not refused: {stderr}");
        assert!(stderr.contains(option), "wfastcgi {args:?}: {stderr}");
    }
}

/// A reader that stops early (`wfastcgi check | head -1`) ends the command quietly.
#[test]
fn a_closed_standard_output_ends_check_quietly() {
    let app = AppDir::new("hello.app", &[]);
    let (reader, writer) = std::io::pipe().expect("pipe");
    drop(reader);
    let output = Command::new(BINARY)
        .arg("check")
        .arg(app.path())
        .stdout(writer)
        .output()
        .expect("run wfastcgi");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(0), "{stderr}");
    assert!(stderr.is_empty(), "{stderr}");
}

/// Without WSGI_LOG the check says where errors go in each mode.
#[test]
fn check_says_where_errors_go_without_wsgi_log() {
    let app = AppDir::new("hello.app", &[("WSGI_LOG", "")]);
    let (_, report) = check(app.path(), &[]);
    assert!(
        report.contains(
            "warn  WSGI_LOG is not set: `serve --bind` logs to its standard error, but under IIS"
        ),
        "{report}"
    );
}
