//! An IIS stand-in for testing `wfastcgi.exe` on Windows (or under Wine): it starts the gateway
//! exactly as IIS's FastCGI module does ([`process`]), speaks FastCGI to it as IIS does and
//! checks every record of every answer ([`fcgi`]), over IIS's overlapped pipe ([`pipe`]), with
//! the server variables IIS 10 sends ([`iis_params`]).

pub mod fcgi;
pub mod pipe;
pub mod process;

pub use fcgi::{Client, Response};
pub use process::IisProcess;

/// The server variables IIS 10 sends for a request to the site in `app_dir` (a Windows path),
/// in IIS's order. `path` is the URL path as IIS decodes it, `query` without its `?`. The
/// application is the site root (`APPL_MD_PATH` `/LM/W3SVC/1/ROOT`).
pub fn iis_params(app_dir: &str, method: &str, path: &str, query: &str) -> Vec<(String, String)> {
    let uri = if query.is_empty() {
        path.to_owned()
    } else {
        format!("{path}?{query}")
    };
    let app_dir = format!("{}\\", app_dir.trim_end_matches('\\'));
    let translated = format!(
        "{}{}",
        app_dir.trim_end_matches('\\'),
        path.replace('/', "\\")
    );
    [
        ("URL", path),
        ("SERVER_SOFTWARE", "Microsoft-IIS/10.0"),
        ("SERVER_PROTOCOL", "HTTP/1.1"),
        ("SERVER_PORT_SECURE", "0"),
        ("SERVER_PORT", "80"),
        ("SERVER_NAME", "localhost"),
        ("SCRIPT_NAME", path),
        ("SCRIPT_FILENAME", &translated),
        ("REQUEST_URI", &uri),
        ("REQUEST_METHOD", method),
        ("REMOTE_USER", ""),
        ("REMOTE_PORT", "50123"),
        ("REMOTE_HOST", "127.0.0.1"),
        ("REMOTE_ADDR", "127.0.0.1"),
        ("QUERY_STRING", query),
        ("PATH_TRANSLATED", &translated),
        ("LOGON_USER", ""),
        ("LOCAL_ADDR", "127.0.0.1"),
        ("INSTANCE_META_PATH", "/LM/W3SVC/1"),
        ("INSTANCE_NAME", "DEFAULT WEB SITE"),
        ("INSTANCE_ID", "1"),
        ("HTTPS", "off"),
        ("GATEWAY_INTERFACE", "CGI/1.1"),
        ("DOCUMENT_ROOT", app_dir.trim_end_matches('\\')),
        ("CONTENT_TYPE", ""),
        ("CONTENT_LENGTH", "0"),
        ("AUTH_USER", ""),
        ("AUTH_PASSWORD", ""),
        ("AUTH_TYPE", ""),
        ("APPL_PHYSICAL_PATH", &app_dir),
        ("APPL_MD_PATH", "/LM/W3SVC/1/ROOT"),
        ("PATH_INFO", path),
        ("HTTP_HOST", "localhost"),
        ("HTTP_USER_AGENT", "iis-standin"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .collect()
}

/// Sets a parameter, replacing it where it already is (IIS sends each name once).
pub fn set_param(params: &mut Vec<(String, String)>, name: &str, value: &str) {
    match params.iter_mut().find(|(k, _)| k == name) {
        Some((_, v)) => *v = value.to_owned(),
        None => params.push((name.to_owned(), value.to_owned())),
    }
}
