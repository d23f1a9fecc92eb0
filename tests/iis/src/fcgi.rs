//! IIS's side of FastCGI, written apart from the gateway's codec so the two check each other.
//! Requests go out as IIS sends them (one at a time, KEEP_CONN, ids 1..=255 then 1 again, a
//! body-less request in one write); every record of every answer is checked against what IIS
//! accepts: version 1, the current request id, only STDOUT, STDERR and END_REQUEST, each stream
//! ended once by an empty record, END_REQUEST with REQUEST_COMPLETE last.

use std::io;

use crate::pipe::Pipe;

const BEGIN_REQUEST: u8 = 1;
const END_REQUEST: u8 = 3;
const PARAMS: u8 = 4;
const STDIN: u8 = 5;
const STDOUT: u8 = 6;
const STDERR: u8 = 7;
const RESPONDER: u16 = 1;
const KEEP_CONN: u8 = 1;
/// IIS sends request bodies in records of this size.
pub const STDIN_RECORD: usize = 8192;

/// An answer, read whole and checked.
#[derive(Debug)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    pub stderr: Vec<u8>,
}

impl Response {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn stderr_text(&self) -> String {
        String::from_utf8_lossy(&self.stderr).into_owned()
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn headers_named<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a str> {
        self.headers
            .iter()
            .filter(move |(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

fn record(kind: u8, id: u16, content: &[u8], out: &mut Vec<u8>) {
    let padding = (8 - content.len() % 8) % 8;
    out.extend_from_slice(&[1, kind]);
    out.extend_from_slice(&id.to_be_bytes());
    out.extend_from_slice(&(content.len() as u16).to_be_bytes());
    out.extend_from_slice(&[padding as u8, 0]);
    out.extend_from_slice(content);
    out.extend(std::iter::repeat_n(0, padding));
}

fn length(n: usize, out: &mut Vec<u8>) {
    if n < 128 {
        out.push(n as u8);
    } else {
        out.extend_from_slice(&(n as u32 | 0x8000_0000).to_be_bytes());
    }
}

/// IIS's end of one pipe: sends requests one at a time and reads their answers.
pub struct Client<'p> {
    pipe: &'p Pipe,
    last_id: u16,
    buffer: Vec<u8>,
}

impl<'p> Client<'p> {
    pub fn new(pipe: &'p Pipe) -> Client<'p> {
        Client {
            pipe,
            last_id: 0,
            buffer: Vec::new(),
        }
    }

    /// The request id IIS uses next: 1, 2, ... 255, then 1 again.
    fn next_id(&mut self) -> u16 {
        self.last_id = self.last_id % 255 + 1;
        self.last_id
    }

    /// BEGIN_REQUEST, the params and their empty record, for the next request id.
    fn head(&mut self, params: &[(String, String)]) -> (u16, Vec<u8>) {
        let id = self.next_id();
        let mut out = Vec::new();
        record(
            BEGIN_REQUEST,
            id,
            &[0, RESPONDER as u8, KEEP_CONN, 0, 0, 0, 0, 0],
            &mut out,
        );
        let mut pairs = Vec::new();
        for (name, value) in params {
            length(name.len(), &mut pairs);
            length(value.len(), &mut pairs);
            pairs.extend_from_slice(name.as_bytes());
            pairs.extend_from_slice(value.as_bytes());
        }
        for chunk in pairs.chunks(65535) {
            record(PARAMS, id, chunk, &mut out);
        }
        record(PARAMS, id, &[], &mut out);
        (id, out)
    }

    /// Sends BEGIN_REQUEST and the params; the body follows with `body` and `end_body`.
    pub fn begin(&mut self, params: &[(String, String)]) -> io::Result<u16> {
        let (id, head) = self.head(params);
        self.pipe.write_all(&head)?;
        Ok(id)
    }

    /// Part of request `id`'s body.
    pub fn body(&self, id: u16, data: &[u8]) -> io::Result<()> {
        send_body(self.pipe, id, data, false)
    }

    pub fn end_body(&self, id: u16) -> io::Result<()> {
        send_body(self.pipe, id, &[], true)
    }

    /// One whole request: a body-less one goes in a single write, as IIS sends it; a body is
    /// written on another thread while the answer is read, as IIS does.
    pub fn request(&mut self, params: &[(String, String)], body: &[u8]) -> io::Result<Response> {
        if body.is_empty() {
            let (id, mut out) = self.head(params);
            record(STDIN, id, &[], &mut out);
            self.pipe.write_all(&out)?;
            return self.response(id);
        }
        let id = self.begin(params)?;
        let pipe = self.pipe;
        let buffer = &mut self.buffer;
        let (sent, answer) = std::thread::scope(|scope| {
            let sender = scope.spawn(move || send_body(pipe, id, body, true));
            let answer = read_response(pipe, buffer, id);
            (sender.join(), answer)
        });
        let answer = answer?;
        match sent {
            Ok(sent) => sent.map(|()| answer),
            Err(_) => Err(io::Error::other("the body writer panicked")),
        }
    }

    /// Reads and checks the records of request `id`'s answer up to its END_REQUEST.
    pub fn response(&mut self, id: u16) -> io::Result<Response> {
        read_response(self.pipe, &mut self.buffer, id)
    }
}

/// STDIN records of `data` (and the empty one that ends the body, with `end`), in one write.
fn send_body(pipe: &Pipe, id: u16, data: &[u8], end: bool) -> io::Result<()> {
    let mut out = Vec::with_capacity(data.len() + data.len() / 1024 + 16);
    for chunk in data.chunks(STDIN_RECORD) {
        record(STDIN, id, chunk, &mut out);
    }
    if end {
        record(STDIN, id, &[], &mut out);
    }
    pipe.write_all(&out)
}

/// Reads into `buffer` until it holds `want` bytes.
fn fill(pipe: &Pipe, buffer: &mut Vec<u8>, want: usize) -> io::Result<()> {
    let mut chunk = vec![0; 256 * 1024];
    while buffer.len() < want {
        let n = pipe.read(&mut chunk)?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the gateway closed the pipe in the middle of an answer",
            ));
        }
        buffer.extend_from_slice(&chunk[..n]);
    }
    Ok(())
}

fn read_response(pipe: &Pipe, buffer: &mut Vec<u8>, id: u16) -> io::Result<Response> {
    let bad = |what: String| io::Error::new(io::ErrorKind::InvalidData, what);
    let (mut stdout, mut stderr) = (Vec::new(), Vec::new());
    let (mut stdout_ended, mut stderr_ended) = (false, false);
    loop {
        fill(pipe, buffer, 8)?;
        let header: [u8; 8] = buffer[..8].try_into().expect("8 bytes");
        let (version, kind) = (header[0], header[1]);
        let record_id = u16::from_be_bytes([header[2], header[3]]);
        let content = usize::from(u16::from_be_bytes([header[4], header[5]]));
        let padding = usize::from(header[6]);
        if version != 1 {
            return Err(bad(format!("record version {version}: {header:?}")));
        }
        if record_id != id {
            return Err(bad(format!(
                "record for request {record_id} while {id} runs"
            )));
        }
        fill(pipe, buffer, 8 + content + padding)?;
        let data = buffer[8..8 + content].to_vec();
        buffer.drain(..8 + content + padding);
        match kind {
            STDOUT | STDERR => {
                let (stream, ended, name) = if kind == STDOUT {
                    (&mut stdout, &mut stdout_ended, "STDOUT")
                } else {
                    (&mut stderr, &mut stderr_ended, "STDERR")
                };
                if *ended {
                    return Err(bad(format!("{name} record after the {name} stream ended")));
                }
                *ended = data.is_empty();
                stream.extend_from_slice(&data);
            }
            END_REQUEST => {
                if content != 8 || data[4] != 0 {
                    return Err(bad(format!("END_REQUEST {data:?}: not REQUEST_COMPLETE")));
                }
                if !stdout_ended {
                    return Err(bad("END_REQUEST before the empty STDOUT record".into()));
                }
                return parse(stdout, stderr).map_err(bad);
            }
            other => return Err(bad(format!("record type {other}, which IIS refuses"))),
        }
    }
}

/// Splits the CGI response head (`Status:` and headers) from the body.
fn parse(stdout: Vec<u8>, stderr: Vec<u8>) -> Result<Response, String> {
    let end = stdout
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| format!("no header end in {:?}", String::from_utf8_lossy(&stdout)))?;
    let head = String::from_utf8_lossy(&stdout[..end]).into_owned();
    let mut status = 200;
    let mut headers = Vec::new();
    for line in head.split("\r\n") {
        let (name, value) = line
            .split_once(':')
            .ok_or_else(|| format!("header line without a colon: {line:?}"))?;
        let value = value.trim().to_owned();
        if name.eq_ignore_ascii_case("Status") {
            status = value
                .get(..3)
                .and_then(|code| code.parse().ok())
                .ok_or_else(|| format!("bad Status line {value:?}"))?;
        } else {
            headers.push((name.to_owned(), value));
        }
    }
    Ok(Response {
        status,
        headers,
        body: stdout[end + 4..].to_vec(),
        stderr,
    })
}
