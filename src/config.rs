//! Where the application lives and what its settings are.
//!
//! Settings come from three places. The first that names a key wins:
//! 1. command-line options (`--venv`, `--threads`, ...), given to [`AppConfig::load`] as overrides;
//! 2. `<appSettings>` of the app folder's `web.config`, as wfastcgi.py does (it assigns them to
//!    `os.environ`, so they replace variables of the same name);
//! 3. the process environment.
//!
//! Every web.config setting is also exported to the Python side's `os.environ`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use quick_xml::events::{BytesStart, Event};
use quick_xml::Reader;

/// Requests that may wait for a busy worker thread by default.
pub const DEFAULT_QUEUE_LENGTH: usize = 64;

/// wfastcgi.py's default: restart when a `.py` or `.config` file changes.
pub const DEFAULT_RESTART_REGEX: &str = r".*((\.py)|(\.config))$";

/// How much an error response tells the client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorDetail {
    /// The traceback goes on FCGI_STDERR, which IIS shows in its 500 page (wfastcgi.py's way).
    Full,
    /// A plain 500; the traceback only reaches the log.
    Generic,
}

/// When the log file starts anew.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogRotation {
    Never,
    Hourly,
    Daily,
}

/// A folder as the application is to see it: absolute, symbolic links resolved on Unix. On
/// Windows it stays as given (IIS's `APPL_PHYSICAL_PATH`): `canonicalize` would add the `\\?\`
/// prefix, and Python code that mixes such paths with ordinary ones fails
/// (`os.path.relpath(__file__, os.getcwd())` raises `ValueError`).
pub fn resolve_dir(dir: &Path) -> std::io::Result<PathBuf> {
    let resolved: PathBuf = if cfg!(windows) {
        // Collecting the components drops the trailing `\` IIS sends.
        std::path::absolute(dir)?.components().collect()
    } else {
        dir.canonicalize()?
    };
    if !std::fs::metadata(&resolved)?.is_dir() {
        return Err(std::io::Error::other("not a folder"));
    }
    Ok(resolved)
}

/// The virtualenv this binary is installed in (`<venv>/bin/wfastcgi`,
/// `<venv>\Scripts\wfastcgi.exe`), if it is.
fn installed_venv() -> Option<PathBuf> {
    let exe = std::env::current_exe().ok()?;
    let venv = exe.parent()?.parent()?;
    venv.join("pyvenv.cfg")
        .is_file()
        .then(|| venv.to_path_buf())
}

/// The settings of one application, resolved once when it is first loaded.
#[derive(Debug, Clone)]
pub struct AppConfig {
    pub app_dir: PathBuf,
    /// The web.config that was read, if the folder has one.
    pub web_config: Option<PathBuf>,
    /// web.config app settings in file order; exported to Python's `os.environ`.
    pub app_settings: Vec<(String, String)>,
    overrides: HashMap<String, String>,
}

impl AppConfig {
    /// Reads `web.config` (any letter case) from `app_dir`, if there is one.
    pub fn load(app_dir: &Path, overrides: HashMap<String, String>) -> Result<AppConfig> {
        let app_dir = resolve_dir(app_dir)
            .with_context(|| format!("app folder {} cannot be opened", app_dir.display()))?;
        let web_config = find_web_config(&app_dir)?;
        let app_settings = match &web_config {
            Some(path) => read_app_settings(path)?,
            None => Vec::new(),
        };
        Ok(AppConfig {
            app_dir,
            web_config,
            app_settings,
            overrides,
        })
    }

    /// One setting, by the precedence in the module documentation.
    pub fn get(&self, key: &str) -> Option<String> {
        if let Some(value) = self.overrides.get(key) {
            return Some(value.clone());
        }
        if let Some((_, value)) = self.app_settings.iter().rev().find(|(k, _)| k == key) {
            return Some(value.clone());
        }
        std::env::var(key).ok()
    }

    fn get_nonempty(&self, key: &str) -> Option<String> {
        self.get(key).filter(|v| !v.trim().is_empty())
    }

    pub fn handler(&self) -> Option<String> {
        self.get_nonempty("WSGI_HANDLER")
            .map(|h| h.trim().to_owned())
    }

    /// `PYTHONPATH` entries with `%VAR%` (and `$VAR`, `${VAR}` on Unix) expanded, relative
    /// entries resolved against the app folder.
    pub fn python_path(&self) -> Vec<PathBuf> {
        let Some(raw) = self.get_nonempty("PYTHONPATH") else {
            return Vec::new();
        };
        let expanded = expand_vars(&raw, |name| self.get(name));
        split_path_list(&expanded)
            .map(|entry| self.app_dir.join(entry))
            .collect()
    }

    /// The virtualenv to run in: `WSGI_VENV`, else `VIRTUAL_ENV`, else the one pip installed
    /// this binary into.
    pub fn venv(&self) -> Option<PathBuf> {
        self.get_nonempty("WSGI_VENV")
            .or_else(|| self.get_nonempty("VIRTUAL_ENV"))
            .map(|v| self.app_dir.join(v.trim()))
            .or_else(installed_venv)
    }

    /// `WSGI_PYTHON_HOME`: the folder holding the Python DLL (Windows), relative to the app folder.
    pub fn python_home(&self) -> Option<PathBuf> {
        self.get_nonempty("WSGI_PYTHON_HOME")
            .map(|v| self.app_dir.join(v.trim()))
    }

    /// The restart pattern; `None` when the setting is the empty string (watching off).
    pub fn restart_regex(&self) -> Option<String> {
        match self.get("WSGI_RESTART_FILE_REGEX") {
            Some(pattern) if pattern.is_empty() => None,
            Some(pattern) => Some(pattern),
            None => Some(DEFAULT_RESTART_REGEX.to_owned()),
        }
    }

    /// Extra folders to watch (`WSGI_WATCHER_DIRS`, `;`-separated, relative to the app folder).
    pub fn watcher_dirs(&self) -> Vec<PathBuf> {
        self.get_nonempty("WSGI_WATCHER_DIRS")
            .map(|dirs| {
                dirs.split(';')
                    .map(str::trim)
                    .filter(|d| !d.is_empty())
                    .map(|d| self.app_dir.join(d))
                    .collect()
            })
            .unwrap_or_default()
    }

    pub fn restart_grace(&self) -> Result<Duration> {
        let seconds = self.parse_number("WSGI_RESTART_GRACE", 30)?;
        Ok(Duration::from_secs(seconds))
    }

    /// `WSGI_MAX_BODY`: the largest request body accepted, in bytes; larger ones are answered
    /// `413` before the application runs. Off by default.
    pub fn max_body(&self) -> Result<Option<u64>> {
        self.parse_bytes("WSGI_MAX_BODY")
    }

    /// `WSGI_IDLE_TIMEOUT`: seconds a connection may wait between requests (listening modes);
    /// 0 turns it off.
    pub fn idle_timeout(&self) -> Result<Option<Duration>> {
        let seconds = self.parse_number("WSGI_IDLE_TIMEOUT", 300)?;
        Ok((seconds > 0).then(|| Duration::from_secs(seconds)))
    }

    /// `WSGI_HEADER_TIMEOUT`: seconds a request head (BEGIN_REQUEST to the end of the
    /// parameters) may take to arrive before the connection is closed (listening modes); 0
    /// turns it off.
    pub fn header_timeout(&self) -> Result<Option<Duration>> {
        let seconds = self.parse_number("WSGI_HEADER_TIMEOUT", 60)?;
        Ok((seconds > 0).then(|| Duration::from_secs(seconds)))
    }

    /// `WSGI_SEND_TIMEOUT`: seconds a response may wait for the web server to take any of it
    /// before the connection is closed (listening modes); 0 turns it off.
    pub fn send_timeout(&self) -> Result<Option<Duration>> {
        let seconds = self.parse_number("WSGI_SEND_TIMEOUT", 60)?;
        Ok((seconds > 0).then(|| Duration::from_secs(seconds)))
    }

    /// `WSGI_QUEUE_LENGTH`: requests that may wait for a busy worker; more get a 503.
    pub fn queue_length(&self) -> Result<usize> {
        match self.get_nonempty("WSGI_QUEUE_LENGTH") {
            None => Ok(DEFAULT_QUEUE_LENGTH),
            Some(value) => parse_count("WSGI_QUEUE_LENGTH", &value),
        }
    }

    /// `FCGI_WEB_SERVER_ADDRS`: the web servers allowed to connect over TCP (comma-separated
    /// addresses); `None` allows every peer.
    pub fn web_server_addrs(&self) -> Result<Option<Vec<std::net::IpAddr>>> {
        let Some(list) = self.get_nonempty("FCGI_WEB_SERVER_ADDRS") else {
            return Ok(None);
        };
        list.split(',')
            .map(str::trim)
            .filter(|a| !a.is_empty())
            .map(|a| {
                a.parse().map_err(|_| {
                    invalid(
                        "FCGI_WEB_SERVER_ADDRS",
                        a,
                        "IP addresses separated by commas",
                    )
                })
            })
            .collect::<Result<Vec<_>>>()
            .map(Some)
    }

    /// `WSGI_INPUT_SPOOL=<bytes>`: receive bodies whole before the application runs, in memory
    /// up to that size, in a temporary file beyond, so `wsgi.input` can seek. Off by default.
    pub fn input_spool(&self) -> Result<Option<u64>> {
        self.parse_bytes("WSGI_INPUT_SPOOL")
    }

    /// `WSGI_WATCHER_POLL=<seconds>`: poll instead of change notifications (network shares).
    pub fn watcher_poll(&self) -> Result<Option<Duration>> {
        match self.get_nonempty("WSGI_WATCHER_POLL") {
            None => Ok(None),
            Some(value) => match value.trim().parse::<f64>() {
                Ok(seconds) if seconds > 0.0 && seconds.is_finite() => {
                    Ok(Some(Duration::from_secs_f64(seconds)))
                }
                _ => Err(invalid(
                    "WSGI_WATCHER_POLL",
                    &value,
                    "a number of seconds above 0",
                )),
            },
        }
    }

    pub fn log_path(&self) -> Option<PathBuf> {
        self.get_nonempty("WSGI_LOG")
            .map(|p| self.app_dir.join(p.trim()))
    }

    pub fn log_level(&self) -> Result<tracing::Level> {
        match self.get_nonempty("WSGI_LOG_LEVEL") {
            None => Ok(tracing::Level::INFO),
            Some(level) => level.trim().parse().map_err(|_| {
                invalid(
                    "WSGI_LOG_LEVEL",
                    &level,
                    "error, warn, info, debug or trace",
                )
            }),
        }
    }

    pub fn log_rotation(&self) -> Result<LogRotation> {
        match self
            .get_nonempty("WSGI_LOG_ROTATE")
            .as_deref()
            .map(str::trim)
        {
            None => Ok(LogRotation::Never),
            Some(v) if v.eq_ignore_ascii_case("never") => Ok(LogRotation::Never),
            Some(v) if v.eq_ignore_ascii_case("hourly") => Ok(LogRotation::Hourly),
            Some(v) if v.eq_ignore_ascii_case("daily") => Ok(LogRotation::Daily),
            Some(v) => Err(invalid("WSGI_LOG_ROTATE", v, "never, hourly or daily")),
        }
    }

    pub fn error_detail(&self) -> Result<ErrorDetail> {
        match self
            .get_nonempty("WSGI_ERROR_DETAIL")
            .as_deref()
            .map(str::trim)
        {
            None => Ok(ErrorDetail::Full),
            Some(v) if v.eq_ignore_ascii_case("full") => Ok(ErrorDetail::Full),
            Some(v) if v.eq_ignore_ascii_case("generic") => Ok(ErrorDetail::Generic),
            Some(v) => Err(invalid("WSGI_ERROR_DETAIL", v, "full or generic")),
        }
    }

    /// `WSGI_GC_FREEZE`: whether the objects that exist once the application is loaded are
    /// moved out of the garbage collector's way (`gc.freeze()`), so that a full collection
    /// does not walk the whole framework again (20-40 ms for FastAPI) in the middle of requests.
    pub fn gc_freeze(&self) -> Result<bool> {
        let value = self.get_nonempty("WSGI_GC_FREEZE");
        match value.as_deref().map(str::trim) {
            None => Ok(true),
            Some(v)
                if ["on", "true", "1"]
                    .iter()
                    .any(|t| v.eq_ignore_ascii_case(t)) =>
            {
                Ok(true)
            }
            Some(v)
                if ["off", "false", "0"]
                    .iter()
                    .any(|t| v.eq_ignore_ascii_case(t)) =>
            {
                Ok(false)
            }
            Some(v) => Err(invalid("WSGI_GC_FREEZE", v, "on or off")),
        }
    }

    /// wfastcgi.py keeps SCRIPT_NAME only when this setting exists, whatever its value.
    pub fn allow_path_info_for_script_mappings(&self) -> bool {
        self.get("AllowPathInfoForScriptMappings").is_some()
    }

    /// An explicit mount point to split off PATH_INFO.
    pub fn script_name(&self) -> Option<String> {
        self.get_nonempty("SCRIPT_NAME")
    }

    /// An optional size in bytes.
    fn parse_bytes(&self, key: &str) -> Result<Option<u64>> {
        self.get_nonempty(key)
            .map(|value| {
                value
                    .trim()
                    .parse()
                    .map_err(|_| invalid(key, &value, "a number of bytes"))
            })
            .transpose()
    }

    fn parse_number(&self, key: &str, default: u64) -> Result<u64> {
        match self.get_nonempty(key) {
            None => Ok(default),
            Some(v) => v
                .trim()
                .parse()
                .map_err(|_| invalid(key, &v, "a whole number")),
        }
    }
}

fn invalid(key: &str, value: &str, expected: &str) -> anyhow::Error {
    anyhow::anyhow!("app setting {key}={value:?} is invalid: expected {expected}")
}

/// IIS matches file names without regard to case; so do we.
fn find_web_config(dir: &Path) -> Result<Option<PathBuf>> {
    let entries =
        std::fs::read_dir(dir).with_context(|| format!("cannot list {}", dir.display()))?;
    for entry in entries.flatten() {
        if entry
            .file_name()
            .to_string_lossy()
            .eq_ignore_ascii_case("web.config")
        {
            return Ok(Some(entry.path()));
        }
    }
    Ok(None)
}

/// The largest web.config read: IIS's default `maxWebConfigFileSizeInKB` (250). The file is
/// read with this limit, so one that never ends (a link to `/dev/zero`) is refused too.
pub const MAX_WEB_CONFIG_BYTES: u64 = 250 * 1024;

fn read_app_settings(path: &Path) -> Result<Vec<(String, String)>> {
    use std::io::Read;
    // A web.config that cannot be used, with the file and position.
    let refuse = |message: String| anyhow::anyhow!("{}: {message}", path.display());
    let mut bytes = Vec::new();
    std::fs::File::open(path)
        .and_then(|file| file.take(MAX_WEB_CONFIG_BYTES + 1).read_to_end(&mut bytes))
        .with_context(|| format!("cannot read {}", path.display()))?;
    if bytes.len() as u64 > MAX_WEB_CONFIG_BYTES {
        return Err(refuse(format!(
            "larger than {} KB, the limit IIS also applies by default \
             (maxWebConfigFileSizeInKB); move large settings to the environment",
            MAX_WEB_CONFIG_BYTES / 1024
        )));
    }
    parse_app_settings(&bytes).map_err(refuse)
}

/// The text of a web.config: UTF-8 (with or without a byte-order mark), or UTF-16 LE or BE with
/// its byte-order mark (Windows PowerShell 5.1's `Out-File` writes UTF-16LE), as IIS and
/// wfastcgi.py's `minidom` read them. A UTF-16 file becomes UTF-8 for the XML reader, which
/// then ignores the `encoding` of the declaration.
fn decode_text(bytes: &[u8]) -> std::result::Result<std::borrow::Cow<'_, [u8]>, String> {
    let utf16 = |from: fn([u8; 2]) -> u16, body: &[u8]| {
        if body.len() % 2 != 0 {
            return Err("a UTF-16 web.config with an odd number of bytes".to_owned());
        }
        let units = body.chunks_exact(2).map(|pair| from([pair[0], pair[1]]));
        char::decode_utf16(units)
            .collect::<std::result::Result<String, _>>()
            .map(|text| std::borrow::Cow::Owned(text.into_bytes()))
            .map_err(|e| format!("invalid UTF-16: {e}"))
    };
    match bytes {
        [0xFF, 0xFE, body @ ..] => utf16(u16::from_le_bytes, body),
        [0xFE, 0xFF, body @ ..] => utf16(u16::from_be_bytes, body),
        [0xEF, 0xBB, 0xBF, body @ ..] => Ok(std::borrow::Cow::Borrowed(body)),
        _ => Ok(std::borrow::Cow::Borrowed(bytes)),
    }
}

/// App settings in file order, each key once: `<add>` of a key already there moves it to the
/// end, as .NET's collection does. Linear: a removed entry leaves a hole instead of shifting
/// the rest, so 300 000 `<add>`s cost 300 000 steps, not their square.
#[derive(Default)]
struct Settings {
    entries: Vec<Option<(String, String)>>,
    index: HashMap<String, usize>,
}

impl Settings {
    fn add(&mut self, key: String, value: String) {
        self.remove(&key);
        self.index.insert(key.clone(), self.entries.len());
        self.entries.push(Some((key, value)));
    }

    fn remove(&mut self, key: &str) {
        if let Some(at) = self.index.remove(key) {
            self.entries[at] = None;
        }
    }

    fn clear(&mut self) {
        self.entries.clear();
        self.index.clear();
    }
}

/// Reads `<configuration><appSettings>`: `<add key value/>` in order, honouring `<remove key/>`
/// and `<clear/>` as .NET does. Keys are trimmed (wfastcgi.py does); values are kept as written.
pub fn parse_app_settings(xml: &[u8]) -> std::result::Result<Vec<(String, String)>, String> {
    let mut settings = Settings::default();
    for_each_child(xml, &[b"configuration", b"appSettings"], |element| {
        apply_setting(element, &mut settings)
    })?;
    Ok(settings.entries.into_iter().flatten().collect())
}

/// Calls `visit` with each element directly under the element path `parent` (from the root) of
/// a web.config, decoded as [`decode_text`] does. Every reader of web.config sections uses it.
pub fn for_each_child(
    xml: &[u8],
    parent: &[&[u8]],
    mut visit: impl FnMut(&BytesStart<'_>) -> std::result::Result<(), String>,
) -> std::result::Result<(), String> {
    let xml = decode_text(xml)?;
    let mut reader = Reader::from_reader(xml.as_ref());
    let mut path: Vec<Vec<u8>> = Vec::new();
    let mut buf = Vec::new();
    loop {
        let position = reader.buffer_position();
        let event = reader
            .read_event_into(&mut buf)
            .map_err(|e| format!("XML error at byte {position}: {e}"))?;
        let in_parent = || path.iter().map(Vec::as_slice).eq(parent.iter().copied());
        match event {
            Event::Start(element) => {
                if in_parent() {
                    visit(&element)?;
                }
                path.push(element.name().as_ref().to_vec());
            }
            Event::Empty(element) if in_parent() => visit(&element)?,
            Event::End(_) => {
                path.pop();
            }
            Event::Eof => break,
            _ => {}
        }
        buf.clear();
    }
    if !path.is_empty() {
        return Err("unexpected end of file: unclosed elements".into());
    }
    Ok(())
}

fn apply_setting(
    element: &BytesStart<'_>,
    settings: &mut Settings,
) -> std::result::Result<(), String> {
    let name = element.name();
    let attribute = |wanted: &[u8]| -> std::result::Result<Option<String>, String> {
        for attr in element.attributes() {
            let attr = attr.map_err(|e| format!("bad attribute in <appSettings>: {e}"))?;
            if attr.key.as_ref() == wanted {
                let value = attr
                    .unescape_value()
                    .map_err(|e| format!("bad attribute value in <appSettings>: {e}"))?;
                return Ok(Some(value.into_owned()));
            }
        }
        Ok(None)
    };
    match name.as_ref() {
        b"add" => {
            let key = attribute(b"key")?.ok_or("an <add> in <appSettings> has no key attribute")?;
            let value = attribute(b"value")?.unwrap_or_default();
            settings.add(key.trim().to_owned(), value);
        }
        b"remove" => {
            if let Some(key) = attribute(b"key")? {
                settings.remove(key.trim());
            }
        }
        b"clear" => settings.clear(),
        _ => {}
    }
    Ok(())
}

/// Expands `%NAME%` everywhere and, on Unix, `$NAME` and `${NAME}`. Unknown names stay as written,
/// as Python's `os.path.expandvars` leaves them.
pub fn expand_vars(input: &str, lookup: impl Fn(&str) -> Option<String>) -> String {
    let mut out = String::with_capacity(input.len());
    let mut rest = input;
    while let Some(pos) = rest.find(['%', '$']) {
        out.push_str(&rest[..pos]);
        rest = &rest[pos..];
        match variable_at(rest).and_then(|(name, len)| Some((lookup(name)?, len))) {
            Some((value, len)) => {
                out.push_str(&value);
                rest = &rest[len..];
            }
            None => {
                out.push_str(&rest[..1]);
                rest = &rest[1..];
            }
        }
    }
    out.push_str(rest);
    out
}

/// The variable named at the start of `text`, and how many bytes name it.
fn variable_at(text: &str) -> Option<(&str, usize)> {
    if let Some(after) = text.strip_prefix('%') {
        let end = after.find('%')?;
        return (end > 0).then(|| (&after[..end], end + 2));
    }
    if !cfg!(unix) {
        return None;
    }
    let after = text.strip_prefix('$')?;
    if let Some(braced) = after.strip_prefix('{') {
        let end = braced.find('}')?;
        return (end > 0).then(|| (&braced[..end], end + 3));
    }
    let len = after
        .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .unwrap_or(after.len());
    (len > 0).then(|| (&after[..len], len + 1))
}

/// `;` separates entries everywhere (the web.config convention); `:` too on Unix.
fn split_path_list(list: &str) -> impl Iterator<Item = &str> {
    list.split(|c| c == ';' || (cfg!(unix) && c == ':'))
        .map(str::trim)
        .filter(|entry| !entry.is_empty())
}

/// Reads a positive count setting such as `WSGI_THREADS`.
pub fn parse_count(key: &str, value: &str) -> Result<usize> {
    match value.trim().parse::<usize>() {
        Ok(n) if n > 0 => Ok(n),
        _ => bail!("{key}={value:?} is invalid: expected a whole number above 0"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(xml: &str) -> Vec<(String, String)> {
        parse_app_settings(xml.as_bytes()).expect("valid web.config")
    }

    #[test]
    fn reads_app_settings_in_order_and_trims_keys() {
        let xml = r#"<?xml version="1.0" encoding="utf-8"?>
            <configuration>
              <appSettings>
                <add key=" WSGI_HANDLER " value="app.application" />
                <add key="PYTHONPATH" value="a;b &amp; c"></add>
              </appSettings>
              <system.webServer><add key="IGNORED" value="x"/></system.webServer>
            </configuration>"#;
        assert_eq!(
            settings(xml),
            vec![
                ("WSGI_HANDLER".into(), "app.application".into()),
                ("PYTHONPATH".into(), "a;b & c".into()),
            ]
        );
    }

    #[test]
    fn honours_remove_clear_and_byte_order_mark() {
        let xml =
            "\u{feff}<configuration><appSettings><add key='A' value='1'/><add key='B' value='2'/>\
                   <remove key='A'/><add key='B' value='3'/></appSettings></configuration>";
        assert_eq!(settings(xml), vec![("B".into(), "3".into())]);
        let cleared = "<configuration><appSettings><add key='A' value='1'/><clear/></appSettings></configuration>";
        assert!(settings(cleared).is_empty());
    }

    #[test]
    fn reads_utf16_with_a_byte_order_mark() {
        let xml = "<?xml version=\"1.0\" encoding=\"utf-16\"?><configuration><appSettings>\
                   <add key=\"K\" value=\"caf\u{e9} \u{1F600}\"/></appSettings></configuration>";
        let le: Vec<u8> = [0xFF, 0xFE]
            .into_iter()
            .chain(xml.encode_utf16().flat_map(u16::to_le_bytes))
            .collect();
        let be: Vec<u8> = [0xFE, 0xFF]
            .into_iter()
            .chain(xml.encode_utf16().flat_map(u16::to_be_bytes))
            .collect();
        let expected = vec![("K".to_owned(), "caf\u{e9} \u{1F600}".to_owned())];
        assert_eq!(parse_app_settings(&le), Ok(expected.clone()));
        assert_eq!(parse_app_settings(&be), Ok(expected));
        let err = parse_app_settings(&le[..le.len() - 1]).expect_err("odd length");
        assert!(err.contains("odd number"), "{err}");
    }

    #[test]
    fn adding_a_key_again_moves_it_to_the_end() {
        let xml = "<configuration><appSettings><add key='A' value='1'/><add key='B' value='2'/>\
                   <add key='A' value='3'/><remove key='B'/><add key='B' value='4'/>\
                   <remove key='nope'/></appSettings></configuration>";
        assert_eq!(
            settings(xml),
            vec![("A".into(), "3".into()), ("B".into(), "4".into())]
        );
    }

    #[test]
    fn ignores_app_settings_outside_configuration_root() {
        let xml = "<configuration><location><appSettings><add key='A' value='1'/></appSettings></location></configuration>";
        assert!(settings(xml).is_empty());
    }

    #[test]
    fn malformed_xml_is_a_specific_error() {
        let err = parse_app_settings(
            b"<configuration><appSettings><add key='A' value='1'></configuration>",
        )
        .expect_err("mismatched tags");
        assert!(err.contains("XML error"), "{err}");
        let err = parse_app_settings(
            b"<configuration><appSettings><add value='1'/></appSettings></configuration>",
        )
        .expect_err("no key");
        assert!(err.contains("no key"), "{err}");
        let err = parse_app_settings(b"<configuration><appSettings>").expect_err("unclosed");
        assert!(err.contains("unclosed"), "{err}");
    }

    #[test]
    fn expands_windows_and_unix_variables() {
        let lookup = |name: &str| match name {
            "HOME" => Some("/home/me".to_owned()),
            "APPL_PHYSICAL_PATH" => Some("C:\\site\\".to_owned()),
            _ => None,
        };
        assert_eq!(
            expand_vars("%APPL_PHYSICAL_PATH%lib", lookup),
            "C:\\site\\lib"
        );
        assert_eq!(expand_vars("%UNKNOWN%;100%", lookup), "%UNKNOWN%;100%");
        if cfg!(unix) {
            assert_eq!(
                expand_vars("$HOME/a:${HOME}/b:$NOPE", lookup),
                "/home/me/a:/home/me/b:$NOPE"
            );
        }
    }

    #[test]
    fn splits_path_lists() {
        let entries: Vec<_> = split_path_list(" a ; b;;c").collect();
        assert_eq!(entries, ["a", "b", "c"]);
    }

    #[test]
    fn precedence_is_overrides_then_web_config_then_environment() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(
            dir.path().join("Web.Config"),
            "<configuration><appSettings><add key='WSGI_LOG_LEVEL' value='debug'/>\
             <add key='WSGI_THREADS' value='3'/></appSettings></configuration>",
        )
        .expect("write");
        let overrides = HashMap::from([("WSGI_THREADS".to_owned(), "5".to_owned())]);
        let config = AppConfig::load(dir.path(), overrides).expect("load");
        assert!(config.web_config.is_some(), "found regardless of case");
        assert_eq!(config.get("WSGI_THREADS").as_deref(), Some("5"));
        assert_eq!(config.log_level().expect("level"), tracing::Level::DEBUG);
        assert_eq!(config.get("PATH"), std::env::var("PATH").ok());
        assert_eq!(
            config.restart_regex().as_deref(),
            Some(DEFAULT_RESTART_REGEX)
        );
    }
}
