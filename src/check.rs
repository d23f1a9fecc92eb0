//! `wfastcgi check`: a pre-flight check of a site. It loads the configuration and the
//! application with the code that serves them, and says, one line each, what is in effect and
//! what would fail, with a hint for the usual mistakes.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use crate::config::{self, AppConfig};
use crate::python::{self, Deployment, HandlerReport};
use crate::{iis, watcher};

/// Prints the report as it goes; counts the failures.
#[derive(Default)]
struct Report {
    failures: usize,
}

impl Report {
    fn ok(&mut self, line: impl AsRef<str>) {
        crate::outln!("ok    {}", line.as_ref());
    }

    fn warn(&mut self, line: impl AsRef<str>) {
        crate::outln!("warn  {}", line.as_ref());
    }

    fn fail(&mut self, line: impl AsRef<str>) {
        self.failures += 1;
        crate::outln!("FAIL  {}", line.as_ref());
    }

    fn detail(&mut self, text: &str) {
        for line in text.lines() {
            crate::outln!("      {line}");
        }
    }
}

/// Settings that are read from the environment too, listed when they come from there.
const KNOWN_SETTINGS: &[&str] = &[
    "WSGI_HANDLER",
    "PYTHONPATH",
    "WSGI_VENV",
    "VIRTUAL_ENV",
    "WSGI_LOG",
    "WSGI_LOG_LEVEL",
    "WSGI_LOG_ROTATE",
    "WSGI_ERROR_DETAIL",
    "WSGI_GC_FREEZE",
    "WSGI_THREADS",
    "WSGI_QUEUE_LENGTH",
    "WSGI_INPUT_SPOOL",
    "WSGI_RESTART_FILE_REGEX",
    "WSGI_WATCHER_DIRS",
    "WSGI_WATCHER_POLL",
    "WSGI_RESTART_GRACE",
    "FCGI_WEB_SERVER_ADDRS",
    "DJANGO_SETTINGS_MODULE",
];

/// Runs the check; true when everything would work.
pub fn run(
    target: Option<PathBuf>,
    overrides: HashMap<String, String>,
    request: Option<&str>,
) -> bool {
    let mut report = Report::default();
    let target = target.unwrap_or_else(|| PathBuf::from("."));
    // A path to a web.config names its folder.
    let app_dir = if target.is_file() {
        target.parent().map(Path::to_path_buf).unwrap_or_default()
    } else {
        target
    };
    let config = match AppConfig::load(&app_dir, overrides) {
        Ok(config) => config,
        Err(e) => {
            report.fail(format!("configuration: {e:#}"));
            return false;
        }
    };
    match &config.web_config {
        Some(path) => report.ok(format!("read {}", path.display())),
        None => report.warn(format!(
            "{} has no web.config: settings come from the environment only",
            config.app_dir.display()
        )),
    }
    for (key, value) in &config.app_settings {
        report.ok(format!("setting {key} = {value:?}"));
    }
    for key in KNOWN_SETTINGS.iter().chain(crate::ops::SETTINGS) {
        let from_file = config.app_settings.iter().any(|(k, _)| k == key);
        if let (false, Some(value)) = (from_file, config.get(key)) {
            report.ok(format!(
                "setting {key} = {value:?} (from the environment or command line)"
            ));
        }
    }
    check_settings(&mut report, &config);
    for finding in crate::ops::report::check(&config) {
        match finding {
            crate::ops::report::Finding::Ok(line) => report.ok(line),
            crate::ops::report::Finding::Warn(line) => report.warn(line),
            crate::ops::report::Finding::Fail(line) => report.fail(line),
        }
    }
    check_log(&mut report, &config);
    check_web_config_handler(&mut report, &config);
    check_python(&mut report, &config, request);
    if report.failures == 0 {
        crate::outln!(
            "\nEverything needed to serve {} is in order.",
            config.app_dir.display()
        );
    } else {
        crate::outln!("\n{} problem(s) found.", report.failures);
    }
    report.failures == 0
}

/// Every typed setting parses, and the restart pattern compiles.
fn check_settings(report: &mut Report, config: &AppConfig) {
    let problems = [
        config.log_level().err(),
        config.log_rotation().err(),
        config.error_detail().err(),
        config.gc_freeze().err(),
        config.input_spool().err(),
        config.queue_length().err(),
        config.watcher_poll().err(),
        config.restart_grace().err(),
        config.web_server_addrs().err(),
        config
            .get("WSGI_THREADS")
            .and_then(|v| config::parse_count("WSGI_THREADS", &v).err()),
    ];
    for problem in problems.into_iter().flatten() {
        report.fail(format!("{problem:#}"));
    }
    match config.restart_regex() {
        None => report.ok("WSGI_RESTART_FILE_REGEX is empty: no restart on file changes"),
        Some(pattern) => match watcher::compile_pattern(&pattern) {
            Ok(_) => report.ok(format!("WSGI_RESTART_FILE_REGEX {pattern:?} compiles")),
            Err(e) => {
                report.fail(format!(
                    "WSGI_RESTART_FILE_REGEX {pattern:?} cannot be used (the default would be):"
                ));
                report.detail(&e.to_string());
            }
        },
    }
}

fn check_log(report: &mut Report, config: &AppConfig) {
    let Some(path) = config.log_path() else {
        report.warn(
            "WSGI_LOG is not set: `serve --bind` logs to its standard error, but under IIS \
             (which gives no console) and in `serve --processes` workers errors are logged nowhere",
        );
        return;
    };
    let opened = path
        .parent()
        .map_or(Ok(()), std::fs::create_dir_all)
        .and_then(|()| {
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&path)
        });
    match opened {
        Ok(_) => report.ok(format!("WSGI_LOG {} is writable", path.display())),
        Err(e) => report.fail(format!("WSGI_LOG {} cannot be opened: {e}", path.display())),
    }
}

fn check_web_config_handler(report: &mut Report, config: &AppConfig) {
    let Some(path) = &config.web_config else {
        return;
    };
    let Ok(xml) = std::fs::read(path) else { return };
    let handlers = match iis::fastcgi_handlers(&xml) {
        Ok(handlers) => handlers,
        Err(e) => return report.fail(format!("{}: {e}", path.display())),
    };
    let exe = std::env::current_exe().unwrap_or_default();
    let Some(handler) = handlers
        .iter()
        .find(|h| iis::points_at(&h.script_processor, &exe))
    else {
        match handlers.first() {
            Some(other) if other.script_processor.to_ascii_lowercase().contains("wfastcgi.py") => report.warn(format!(
                "handler {:?} still runs wfastcgi.py ({}): set scriptProcessor=\"{}\"",
                other.name,
                other.script_processor,
                exe.display()
            )),
            Some(other) => report.warn(format!(
                "handler {:?} runs {}, not this binary ({}); fine if that is another install of it",
                other.name,
                other.script_processor,
                exe.display()
            )),
            None => report.warn(
                "web.config has no FastCGI handler: IIS will not send requests here (see `wfastcgi enable`)",
            ),
        }
        return;
    };
    report.ok(format!("handler {:?} runs this binary", handler.name));
    match handler.response_buffer_limit.as_deref() {
        Some("0") => report.ok("responseBufferLimit=\"0\": streamed responses reach the client as they are sent"),
        _ => report.warn(format!(
            "handler {:?} has no responseBufferLimit=\"0\": IIS buffers responses (4 MiB by default), so streaming stalls",
            handler.name
        )),
    }
}

fn check_python(report: &mut Report, config: &AppConfig, request: Option<&str>) {
    let venv = config.venv();
    if let Some(venv) = &venv {
        match python::interpreter::venv_python(venv) {
            Ok(python) => report.ok(format!(
                "virtualenv {} ({})",
                venv.display(),
                python.display()
            )),
            Err(e) => return report.fail(format!("{e:#}")),
        }
    }
    if let Err(e) = python::interpreter::start(config) {
        return report.fail(format!("{e:#}"));
    }
    #[cfg(windows)]
    if let Some(folder) = python::library::loaded() {
        report.ok(format!(
            "{} loaded from {}",
            python::library::DLL,
            folder.display()
        ));
    }
    let diagnosis = match python::diagnose(config) {
        Ok(diagnosis) => diagnosis,
        Err(e) => {
            report.fail("the interpreter cannot be prepared for the application:");
            return report.detail(&e);
        }
    };
    report.ok(format!(
        "Python {} with sys.prefix {}{}",
        diagnosis.version,
        diagnosis.prefix,
        if diagnosis.prefix == diagnosis.base_prefix {
            String::new()
        } else {
            format!(" (a virtualenv of {})", diagnosis.base_prefix)
        }
    ));
    report.ok(format!("sys.path = {:?}", diagnosis.sys_path));
    match diagnosis.handler {
        HandlerReport::Ready {
            name,
            kind,
            interface,
        } => {
            report.ok(format!(
                "WSGI_HANDLER {name:?} imports and is callable ({kind})"
            ));
            report.ok(format!("interface: {interface}"));
        }
        HandlerReport::Missing(message) => return report.fail(message),
        HandlerReport::Broken { name, error, hints } => {
            report.fail(format!("WSGI_HANDLER {name:?} cannot be loaded:"));
            report.detail(&error);
            for hint in hints {
                report.detail(&format!("hint: {hint}"));
            }
            return;
        }
    }
    let Some(url) = request else { return };
    let deployment = Deployment {
        multithread: false,
        multiprocess: true,
    };
    let app = match python::load(config, deployment) {
        Ok(app) => app,
        Err(e) => return report.fail(format!("GET {url} could not be served: {e}")),
    };
    // What the application logs (Django logs a failing view's traceback to stderr, a plain
    // WSGI app's is logged by the gateway) is collected while the request runs on this thread.
    let logged = LogCapture::default();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(logged.clone())
        .with_max_level(tracing::Level::INFO)
        .with_ansi(false)
        .without_time()
        .with_target(false)
        .finish();
    let answered =
        tracing::subscriber::with_default(subscriber, || python::run_request(&app, config, url));
    match answered {
        Ok(answer) => {
            let line = format!(
                "GET {url} answered {} ({} body bytes)",
                answer.status, answer.body_length
            );
            if answer.status.starts_with('5') {
                report.fail(line);
            } else {
                report.ok(line);
            }
            for (name, value) in &answer.headers {
                report.detail(&format!("{name}: {value}"));
            }
            let logged = logged.text();
            if !logged.is_empty() {
                report.detail("logged while handling it:");
                report.detail(&logged);
            }
        }
        Err(e) => report.fail(format!("GET {url} could not be served: {e}")),
    }
}

/// Log lines written while `check --request` runs the request.
#[derive(Clone, Default)]
struct LogCapture(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

impl LogCapture {
    fn text(&self) -> String {
        let bytes = crate::lock(&self.0);
        String::from_utf8_lossy(&bytes).trim_end().to_owned()
    }
}

impl std::io::Write for LogCapture {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        let mut bytes = crate::lock(&self.0);
        bytes.extend_from_slice(data);
        Ok(data.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for LogCapture {
    type Writer = LogCapture;

    fn make_writer(&'a self) -> Self::Writer {
        self.clone()
    }
}
