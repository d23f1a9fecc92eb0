//! The Python half of `wfastcgi check`: the interpreter as serving would set it up, whether the
//! handler imports (and, when not, hints at why), and one request through the real handler.

use std::path::{Path, PathBuf};

use bytes::BytesMut;
use pyo3::exceptions::PyModuleNotFoundError;
use pyo3::prelude::*;

use super::{format_exception, handle, handler, handler_name, prepare_interpreter, App};
use crate::config::AppConfig;
use crate::exchange::{self, BodyEvent, Output};
use crate::protocol::{
    encode_name_value, ParamLimits, Params, ParamsBuilder, Record, RecordDecoder,
};

pub struct Diagnosis {
    pub version: String,
    pub prefix: String,
    pub base_prefix: String,
    pub sys_path: Vec<String>,
    pub handler: HandlerReport,
}

pub enum HandlerReport {
    Ready {
        name: String,
        kind: String,
        /// `WSGI` or `ASGI`, and why.
        interface: String,
    },
    Missing(String),
    Broken {
        name: String,
        error: String,
        hints: Vec<String>,
    },
}

/// Prepares the interpreter exactly as serving does and tries the handler. Python must be
/// running.
pub fn diagnose(config: &AppConfig) -> Result<Diagnosis, String> {
    Python::attach(|py| {
        prepare_interpreter(py, config).map_err(|e| format_exception(py, &e))?;
        let sys = py.import("sys").map_err(|e| format_exception(py, &e))?;
        let text = |name: &str| -> String {
            sys.getattr(name)
                .and_then(|v| v.extract::<String>())
                .unwrap_or_default()
        };
        let sys_path: Vec<String> = sys
            .getattr("path")
            .and_then(|p| p.extract())
            .unwrap_or_default();
        let handler = match handler_name(config) {
            Err(message) => HandlerReport::Missing(message),
            Ok(name) => match handler::resolve(py, &name) {
                Ok(handler) => {
                    let setting = config.get("WSGI_INTERFACE");
                    match super::asgi::detect(py, &handler, setting.as_deref()) {
                        Ok((interface, why)) => HandlerReport::Ready {
                            kind: handler
                                .get_type()
                                .name()
                                .map(|n| n.to_string())
                                .unwrap_or_default(),
                            interface: format!("{interface} ({why})"),
                            name,
                        },
                        Err(error) => HandlerReport::Broken {
                            name,
                            error,
                            hints: Vec::new(),
                        },
                    }
                }
                Err(e) => HandlerReport::Broken {
                    error: format_exception(py, &e),
                    hints: hints(py, config, &name, &e),
                    name,
                },
            },
        };
        Ok(Diagnosis {
            version: text("version")
                .split_whitespace()
                .next()
                .unwrap_or_default()
                .to_owned(),
            prefix: text("prefix"),
            base_prefix: text("base_prefix"),
            sys_path,
            handler,
        })
    })
}

/// What probably went wrong with a handler that does not import.
fn hints(py: Python<'_>, config: &AppConfig, name: &str, error: &PyErr) -> Vec<String> {
    let mut hints = Vec::new();
    let dotted = name.split(':').next().unwrap_or(name);
    let missing: Option<String> = std::iter::successors(Some(error.clone_ref(py)), |e| e.cause(py))
        .find(|e| e.is_instance_of::<PyModuleNotFoundError>(py))
        .and_then(|e| e.value(py).getattr("name").ok()?.extract().ok()?);
    let missing_top = missing
        .as_deref()
        .map(|m| m.split('.').next().unwrap_or(m).to_owned());
    match &missing_top {
        // A module the handler itself names is not found.
        Some(top) if dotted == top || dotted.starts_with(&format!("{top}.")) => {
            match find_module(&config.app_dir, top) {
                Some(dir) => hints.push(format!(
                    "module {top:?} is in {}, which is not on sys.path: add that folder to PYTHONPATH in web.config",
                    dir.display()
                )),
                None => hints.push(format!(
                    "no part of {name:?} imports: is the app folder ({}) or PYTHONPATH right?",
                    config.app_dir.display()
                )),
            }
        }
        // The handler's module imports something that is not found.
        Some(top) => match find_module(&config.app_dir, top) {
            Some(dir) => hints.push(format!(
                "module {top:?} is in {}, which is not on sys.path: add that folder to PYTHONPATH in web.config",
                dir.display()
            )),
            None => hints.push(format!(
                "module {top:?} is not installed in this interpreter: install it into the virtualenv (WSGI_VENV)"
            )),
        },
        None => {
            let parts: Vec<&str> = dotted.split('.').take_while(|p| !p.ends_with("()")).collect();
            let importable = (1..=parts.len())
                .rev()
                .map(|n| parts[..n].join("."))
                .find(|prefix| py.import(prefix.as_str()).is_ok());
            if let Some(prefix) = importable.filter(|prefix| prefix != dotted) {
                hints.push(format!(
                    "the nearest part that imports is {prefix:?}; the rest of {name:?} is not found in it"
                ));
            }
        }
    }
    let settings_missing = std::env::var_os("DJANGO_SETTINGS_MODULE").is_none();
    let mentions_django =
        name.contains("django") || format_exception(py, error).contains("DJANGO_SETTINGS_MODULE");
    if settings_missing && mentions_django {
        hints.push(
            "DJANGO_SETTINGS_MODULE is not set: add <add key=\"DJANGO_SETTINGS_MODULE\" value=\"yourproject.settings\" /> to <appSettings>".to_owned(),
        );
    }
    hints
}

/// A folder below `root` (at most four levels down, outside virtualenvs and caches) that holds
/// module `name` as `name.py` or a package.
fn find_module(root: &Path, name: &str) -> Option<PathBuf> {
    let mut pending = vec![(root.to_path_buf(), 0)];
    while let Some((dir, depth)) = pending.pop() {
        if dir.join(format!("{name}.py")).is_file() || dir.join(name).join("__init__.py").is_file()
        {
            return Some(dir);
        }
        if depth == 4 || dir.join("pyvenv.cfg").exists() {
            continue;
        }
        for entry in std::fs::read_dir(&dir).ok()?.flatten() {
            let skipped = entry.file_name().to_string_lossy().starts_with(['.', '_']);
            if !skipped && entry.file_type().is_ok_and(|t| t.is_dir()) {
                pending.push((entry.path(), depth + 1));
            }
        }
    }
    None
}

pub struct RequestReport {
    pub status: String,
    pub headers: Vec<(String, String)>,
    pub body_length: usize,
}

/// Sends one GET for `url` (path and query) through the real request path of a loaded app.
pub fn run_request(app: &App, config: &AppConfig, url: &str) -> Result<RequestReport, String> {
    let params = request_params(config, url)?;
    let (job, mut handles, body) = exchange::job(1, params);
    body.try_send(BodyEvent::End).map_err(|e| e.to_string())?;
    drop(body);
    // The response is collected on another thread, as a connection would, so a large one
    // cannot fill the bounded channel and stall the application.
    let collector = std::thread::spawn(move || {
        let mut records = BytesMut::new();
        while let Some(output) = handles.output.blocking_recv() {
            match output {
                Output::Records(bytes) => records.extend_from_slice(&bytes),
                Output::End(bytes) => {
                    records.extend_from_slice(&bytes);
                    break;
                }
            }
        }
        records
    });
    Python::attach(|py| handle(py, app, job));
    let mut records = collector
        .join()
        .map_err(|_| "the response collector failed".to_owned())?;
    let mut stdout = Vec::new();
    while let Some(record) = RecordDecoder
        .decode(&mut records)
        .map_err(|e| e.to_string())?
    {
        if let Record::Stdout { content, .. } = record {
            stdout.extend_from_slice(&content);
        }
    }
    let split = stdout
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or("the response has no header block")?;
    let head = String::from_utf8_lossy(&stdout[..split]).into_owned();
    let mut status = String::new();
    let mut headers = Vec::new();
    for line in head.split("\r\n") {
        let (name, value) = line.split_once(':').unwrap_or((line, ""));
        if name.eq_ignore_ascii_case("status") {
            status = value.trim().to_owned();
        } else {
            headers.push((name.to_owned(), value.trim().to_owned()));
        }
    }
    Ok(RequestReport {
        status,
        headers,
        body_length: stdout.len() - split - 4,
    })
}

/// Parameters like a web server's for a GET of `url`, encoded and decoded by the real codec.
fn request_params(config: &AppConfig, url: &str) -> Result<Params, String> {
    let (path, query) = url.split_once('?').unwrap_or((url, ""));
    let app_dir = format!("{}{}", config.app_dir.display(), std::path::MAIN_SEPARATOR);
    let pairs = [
        ("REQUEST_METHOD", "GET"),
        ("REQUEST_URI", url),
        ("PATH_INFO", path),
        ("SCRIPT_NAME", ""),
        ("QUERY_STRING", query),
        ("SERVER_NAME", "localhost"),
        ("SERVER_PORT", "80"),
        ("SERVER_PROTOCOL", "HTTP/1.1"),
        ("SERVER_SOFTWARE", "wfastcgi-check"),
        ("REMOTE_ADDR", "127.0.0.1"),
        ("HTTP_HOST", "localhost"),
        ("APPL_PHYSICAL_PATH", &app_dir),
    ];
    let mut encoded = BytesMut::new();
    for (name, value) in pairs {
        encode_name_value(&mut encoded, name.as_bytes(), value.as_bytes());
    }
    let mut builder = ParamsBuilder::new(ParamLimits::default());
    builder.push(&encoded).map_err(|e| e.to_string())?;
    builder.finish().map_err(|e| e.to_string())
}
