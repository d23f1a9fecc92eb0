//! The access log (`WSGI_ACCESS_LOG`): one line per request, in Apache's combined format unless
//! `WSGI_ACCESS_LOG_FORMAT` says otherwise, handed to a background writer (tracing-appender's
//! non-blocking writer, as the main log) so the disk never holds a request.
//!
//! Lines are gathered into batches of up to 32 KiB, sent to the writer when full and every
//! 100 ms (by the watchdog thread): one line per message cost a wake-up of the writer thread and
//! a write(2) per request. A line is bytes appended to the batch in place (no allocation, no
//! UTF-8 check: every byte written is ASCII or the format's own text), the parameters it needs
//! are found in one pass, and the time comes from the coarse clock, formatted once a second.
//! The batch's lock is taken with the GIL held (the line is written where the request ends), so
//! worker threads never contend for it; only the watchdog's flush can. The cost is in
//! BENCHMARKS.md ("Operations overhead").

use std::io::Write as _;
use std::path::Path;
use std::sync::Mutex;
use std::time::Duration;

use anyhow::{bail, Context, Result};

use super::lock;
use crate::config::LogRotation;
use crate::protocol::Params;

/// Apache's combined log format.
pub const COMBINED: &str = r#"%h %l %u %t "%r" %>s %b "%{Referer}i" "%{User-Agent}i""#;

/// The word that sends access lines to the main log (`WSGI_LOG`).
pub const MAIN_LOG: &str = "log";

#[derive(Debug, Clone, PartialEq)]
enum Atom {
    Text(String),
    /// `%h`: REMOTE_ADDR.
    RemoteAddr,
    /// `%u`: REMOTE_USER.
    RemoteUser,
    /// `%t`: `[30/Nov/2026:02:57:00 +0000]`, UTC.
    Time,
    /// `%r`: `GET /path?query HTTP/1.1`.
    RequestLine,
    /// `%m`.
    Method,
    /// `%U`: the path, without the query.
    Path,
    /// `%q`: `?query`, or nothing.
    Query,
    /// `%s`, `%>s`.
    Status,
    /// `%b` (`-` for none), `%B` (0 for none): body bytes sent.
    Bytes {
        dash: bool,
    },
    /// `%D` µs, `%T` s, `%{ms}T`, `%{us}T`, `%{s}T`.
    Duration(Unit),
    /// `%L`: this process's id and the request's number in it, `1f2e-42`.
    RequestId,
    /// `%{Name}i`: a request header.
    Header(Vec<u8>),
    /// `%{NAME}e`: any FastCGI parameter.
    Param(Vec<u8>),
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Unit {
    Seconds,
    Millis,
    Micros,
}

/// A parsed `WSGI_ACCESS_LOG_FORMAT`.
#[derive(Debug, Clone, PartialEq)]
pub struct Format(Vec<Atom>);

impl Format {
    /// Whether a line shows the request's duration (else it need not be timed).
    pub fn needs_duration(&self) -> bool {
        self.0.iter().any(|atom| matches!(atom, Atom::Duration(_)))
    }
}

impl Format {
    pub fn parse(text: &str) -> Result<Format> {
        let mut atoms = Vec::new();
        let mut literal = String::new();
        let mut chars = text.chars();
        while let Some(c) = chars.next() {
            if c != '%' {
                literal.push(c);
                continue;
            }
            let mut next = chars.next();
            let mut argument = None;
            if next == Some('{') {
                let name: String = chars.by_ref().take_while(|&c| c != '}').collect();
                argument = Some(name);
                next = chars.next();
            }
            if next == Some('>') {
                next = chars.next();
            }
            let atom = match (next, argument) {
                (Some('%'), None) => {
                    literal.push('%');
                    continue;
                }
                (Some('l'), None) => {
                    literal.push('-');
                    continue;
                }
                (Some('h'), None) => Atom::RemoteAddr,
                (Some('u'), None) => Atom::RemoteUser,
                (Some('t'), None) => Atom::Time,
                (Some('r'), None) => Atom::RequestLine,
                (Some('m'), None) => Atom::Method,
                (Some('U'), None) => Atom::Path,
                (Some('q'), None) => Atom::Query,
                (Some('s'), None) => Atom::Status,
                (Some('b'), None) => Atom::Bytes { dash: true },
                (Some('B'), None) => Atom::Bytes { dash: false },
                (Some('D'), None) => Atom::Duration(Unit::Micros),
                (Some('T'), None) => Atom::Duration(Unit::Seconds),
                (Some('T'), Some(unit)) => Atom::Duration(match unit.as_str() {
                    "s" => Unit::Seconds,
                    "ms" => Unit::Millis,
                    "us" => Unit::Micros,
                    other => bail!("%{{{other}}}T: the unit must be s, ms or us"),
                }),
                (Some('L'), None) => Atom::RequestId,
                (Some('i'), Some(name)) => Atom::Header(header_param(&name)),
                (Some('e'), Some(name)) => Atom::Param(name.into_bytes()),
                (Some(other), _) => bail!("%{other} is not a known format atom"),
                (None, _) => bail!("the format ends inside an atom"),
            };
            if !literal.is_empty() {
                atoms.push(Atom::Text(std::mem::take(&mut literal)));
            }
            atoms.push(atom);
        }
        if !literal.is_empty() {
            atoms.push(Atom::Text(literal));
        }
        Ok(Format(atoms))
    }
}

/// `User-Agent` -> `HTTP_USER_AGENT`, as CGI names it.
fn header_param(name: &str) -> Vec<u8> {
    let mut param = b"HTTP_".to_vec();
    param.extend(name.bytes().map(|b| match b {
        b'-' => b'_',
        other => other.to_ascii_uppercase(),
    }));
    param
}

/// What the line says about one request.
pub struct Entry<'a> {
    pub params: &'a Params,
    pub status: u16,
    pub bytes: u64,
    pub duration: Duration,
    pub number: u64,
}

impl Format {
    pub fn line(&self, entry: &Entry<'_>) -> String {
        let mut out = Vec::with_capacity(160);
        self.write_line(entry, &mut out, &mut Clock::default());
        // ASCII and the format's own text only.
        String::from_utf8_lossy(&out).into_owned()
    }

    fn write_line(&self, entry: &Entry<'_>, out: &mut Vec<u8>, clock: &mut Clock) {
        let fields = Fields::of(entry.params);
        let uri = match fields.request_uri {
            [] => fields.path_info,
            uri => uri,
        };
        for atom in &self.0 {
            match atom {
                Atom::Text(text) => out.extend_from_slice(text.as_bytes()),
                Atom::RemoteAddr => push_or_dash(out, fields.remote_addr),
                Atom::RemoteUser => push_or_dash(out, fields.remote_user),
                Atom::Time => out.extend_from_slice(clock.now()),
                Atom::RequestLine => {
                    push_escaped(out, fields.method);
                    out.push(b' ');
                    push_escaped(out, uri);
                    out.push(b' ');
                    push_escaped(out, fields.protocol);
                }
                Atom::Method => push_escaped(out, fields.method),
                Atom::Path => {
                    let path = uri.split(|&b| b == b'?').next().unwrap_or_default();
                    push_escaped(out, path);
                }
                Atom::Query => {
                    let query = fields.query;
                    if !query.is_empty() {
                        out.push(b'?');
                        push_escaped(out, query);
                    }
                }
                Atom::Status => push_number(out, u64::from(entry.status)),
                Atom::Bytes { dash: true } if entry.bytes == 0 => out.push(b'-'),
                Atom::Bytes { .. } => push_number(out, entry.bytes),
                Atom::Duration(unit) => {
                    let value = match unit {
                        Unit::Seconds => entry.duration.as_secs() as u128,
                        Unit::Millis => entry.duration.as_millis(),
                        Unit::Micros => entry.duration.as_micros(),
                    };
                    push_number(out, u64::try_from(value).unwrap_or(u64::MAX));
                }
                Atom::RequestId => {
                    out.extend_from_slice(process_hex().as_bytes());
                    out.push(b'-');
                    push_number(out, entry.number);
                }
                Atom::Header(name) | Atom::Param(name) => {
                    let value = match name.as_slice() {
                        b"HTTP_REFERER" => fields.referer,
                        b"HTTP_USER_AGENT" => fields.user_agent,
                        other => entry.params.get(other).unwrap_or_default(),
                    };
                    push_or_dash(out, value);
                }
            }
        }
    }
}

/// This process's id in hexadecimal, for `%L`.
fn process_hex() -> &'static str {
    static PID: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    PID.get_or_init(|| format!("{:x}", std::process::id()))
}

/// The parameters the usual formats need, found in one pass (a lookup each would walk the
/// fifty-odd parameters nine times).
#[derive(Default)]
struct Fields<'a> {
    remote_addr: &'a [u8],
    remote_user: &'a [u8],
    method: &'a [u8],
    request_uri: &'a [u8],
    path_info: &'a [u8],
    protocol: &'a [u8],
    query: &'a [u8],
    referer: &'a [u8],
    user_agent: &'a [u8],
}

impl<'a> Fields<'a> {
    fn of(params: &'a Params) -> Fields<'a> {
        let mut fields = Fields::default();
        for (name, value) in params.iter() {
            // By length first: most names have none of these lengths.
            let slot = match (name.len(), name) {
                (9, b"PATH_INFO") => &mut fields.path_info,
                (11, b"REMOTE_ADDR") => &mut fields.remote_addr,
                (11, b"REMOTE_USER") => &mut fields.remote_user,
                (11, b"REQUEST_URI") => &mut fields.request_uri,
                (12, b"QUERY_STRING") => &mut fields.query,
                (12, b"HTTP_REFERER") => &mut fields.referer,
                (14, b"REQUEST_METHOD") => &mut fields.method,
                (15, b"SERVER_PROTOCOL") => &mut fields.protocol,
                (15, b"HTTP_USER_AGENT") => &mut fields.user_agent,
                _ => continue,
            };
            *slot = value;
        }
        fields
    }
}

/// A number in decimal, without `fmt`'s machinery (a tenth of the line's cost with it).
fn push_number(out: &mut Vec<u8>, mut n: u64) {
    let mut digits = [0u8; 20];
    let mut at = digits.len();
    loop {
        at -= 1;
        digits[at] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[at..]);
}

fn push_or_dash(out: &mut Vec<u8>, value: &[u8]) {
    if value.is_empty() {
        out.push(b'-');
    } else {
        push_escaped(out, value);
    }
}

/// As Apache does: `"` and `\` escaped with a backslash, control characters and bytes above
/// 0x7e as `\xhh`, so a request cannot forge lines or fields.
fn push_escaped(out: &mut Vec<u8>, value: &[u8]) {
    let plain = |b: &u8| matches!(b, 0x20..=0x7e) && *b != b'"' && *b != b'\\';
    if value.iter().all(plain) {
        out.extend_from_slice(value);
        return;
    }
    const HEX: &[u8; 16] = b"0123456789abcdef";
    for &b in value {
        match b {
            b'"' | b'\\' => out.extend_from_slice(&[b'\\', b]),
            0x20..=0x7e => out.push(b),
            _ => out.extend_from_slice(&[
                b'\\',
                b'x',
                HEX[usize::from(b >> 4)],
                HEX[usize::from(b & 15)],
            ]),
        }
    }
}

/// `%t`, formatted once a second.
#[derive(Default)]
struct Clock {
    second: u64,
    text: Vec<u8>,
}

impl Clock {
    fn now(&mut self) -> &[u8] {
        let second = unix_seconds();
        if second != self.second || self.text.is_empty() {
            self.second = second;
            self.text.clear();
            push_time(&mut self.text, second);
        }
        &self.text
    }
}

/// Seconds since 1970 from the coarse clock: it is read without asking the hardware (it moves
/// at each timer tick, a few ms), and %t shows whole seconds.
#[cfg(target_os = "linux")]
fn unix_seconds() -> u64 {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes the timespec it is given, which lives on this stack frame.
    unsafe { libc::clock_gettime(libc::CLOCK_REALTIME_COARSE, &mut now) };
    u64::try_from(now.tv_sec).unwrap_or(0)
}

#[cfg(not(target_os = "linux"))]
fn unix_seconds() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// `[30/Nov/2026:02:57:00 +0000]`.
fn push_time(out: &mut Vec<u8>, seconds: u64) {
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let (year, month, day) = civil_from_days((seconds / 86_400) as i64);
    let time = seconds % 86_400;
    let _ = write!(
        out,
        "[{day:02}/{}/{year}:{:02}:{:02}:{:02} +0000]",
        MONTHS[(month - 1) as usize],
        time / 3600,
        time / 60 % 60,
        time % 60
    );
}

/// Howard Hinnant's days-to-date algorithm: days since 1970-01-01 to (year, month, day).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// A batch is sent to the writer thread once it holds this much.
const BATCH: usize = 32 * 1024;
/// Batches that may wait for the writer thread.
const PENDING_BATCHES: usize = 1024;

/// Where the lines go.
pub enum Sink {
    /// The main log, as INFO events.
    MainLog,
    File {
        writer: tracing_appender::non_blocking::NonBlocking,
        batch: Mutex<Batch>,
    },
}

#[derive(Default)]
pub struct Batch {
    lines: Vec<u8>,
    clock: Clock,
}

impl Sink {
    /// Opens `WSGI_ACCESS_LOG`: the word `log`, or a file (relative to the app folder), rotated
    /// as `WSGI_LOG_ROTATE` says.
    pub fn open(value: &str, app_dir: &Path, rotation: LogRotation) -> Result<Sink> {
        if value.trim() == MAIN_LOG {
            return Ok(Sink::MainLog);
        }
        let path = app_dir.join(value.trim());
        let appender = crate::logging::appender(&path, rotation)
            .with_context(|| format!("WSGI_ACCESS_LOG {}", path.display()))?;
        // Each message is a batch: 1,024 of them (32 MiB) may wait for the disk before more
        // are dropped. The default, 128,000 slots, would take 4 MiB up front.
        let (writer, guard) = tracing_appender::non_blocking::NonBlockingBuilder::default()
            .buffered_lines_limit(PENDING_BATCHES)
            .finish(appender);
        crate::logging::flush_at_exit(guard);
        Ok(Sink::File {
            writer,
            batch: Mutex::new(Batch::default()),
        })
    }

    /// Adds the request's line.
    pub fn record(&self, format: &Format, entry: &Entry<'_>) {
        match self {
            Sink::MainLog => tracing::info!(target: "access", "{}", format.line(entry)),
            Sink::File { writer, batch } => {
                let mut batch = lock(batch);
                let Batch { lines, clock } = &mut *batch;
                format.write_line(entry, lines, clock);
                lines.push(b'\n');
                if lines.len() >= BATCH {
                    send(writer, lines);
                }
            }
        }
    }

    /// Hands the lines gathered so far to the writer thread.
    pub fn flush(&self) {
        if let Sink::File { writer, batch } = self {
            send(writer, &mut lock(batch).lines);
        }
    }
}

/// One message of whole lines: the writer thread writes it with one write(2), so processes
/// appending to the same file do not mix their lines.
fn send(writer: &tracing_appender::non_blocking::NonBlocking, lines: &mut Vec<u8>) {
    if !lines.is_empty() {
        let _ = writer.clone().write_all(lines);
        lines.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(pairs: &[(&str, &str)]) -> Params {
        let mut builder = crate::protocol::ParamsBuilder::new(Default::default());
        let mut encoded = bytes::BytesMut::new();
        for (name, value) in pairs {
            crate::protocol::encode_name_value(&mut encoded, name.as_bytes(), value.as_bytes());
        }
        builder.push(&encoded).expect("valid");
        builder.finish().expect("complete")
    }

    #[test]
    fn combined_format() {
        let params = params(&[
            ("REMOTE_ADDR", "10.0.0.1"),
            ("REQUEST_METHOD", "GET"),
            ("REQUEST_URI", "/a b?x=\"1\""),
            ("QUERY_STRING", "x=\"1\""),
            ("SERVER_PROTOCOL", "HTTP/1.1"),
            ("HTTP_USER_AGENT", "curl/8\n"),
        ]);
        let entry = Entry {
            params: &params,
            status: 200,
            bytes: 0,
            duration: Duration::from_micros(1500),
            number: 7,
        };
        let line = Format::parse(COMBINED).expect("parses").line(&entry);
        let (start, rest) = line.split_once(" [").expect("time");
        assert_eq!(start, "10.0.0.1 - -");
        let (_, rest) = rest.split_once("] ").expect("time end");
        assert_eq!(
            rest,
            r#""GET /a b?x=\"1\" HTTP/1.1" 200 - "-" "curl/8\x0a""#
        );
        let custom = Format::parse("%m %U%q %s %B %D %{ms}T %L %{REMOTE_ADDR}e 100%%")
            .expect("parses")
            .line(&entry);
        let pid = format!("{:x}", std::process::id());
        assert_eq!(
            custom,
            format!(r#"GET /a b?x=\"1\" 200 0 1500 1 {pid}-7 10.0.0.1 100%"#)
        );
    }

    #[test]
    fn bad_formats_are_refused() {
        assert!(Format::parse("%Z").is_err());
        assert!(Format::parse("%{min}T").is_err());
        assert!(Format::parse("trailing %").is_err());
    }

    #[test]
    fn dates() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(20_422), (2025, 11, 30));
        assert_eq!(civil_from_days(11_016), (2000, 2, 29));
        let mut out = Vec::new();
        push_time(&mut out, 86_399);
        assert_eq!(out, b"[01/Jan/1970:23:59:59 +0000]");
        let mut numbers = Vec::new();
        for n in [0, 7, 10, 504, u64::MAX] {
            push_number(&mut numbers, n);
            numbers.push(b' ');
        }
        assert_eq!(numbers, b"0 7 10 504 18446744073709551615 ");
    }
}
