//! The benchmarks' ceiling for one connection per request: a single thread that accepts, reads
//! until the request's empty STDIN record, writes a fixed `Hello, World!\n` response and closes.
//! No protocol parsing beyond that, no Python: what the kernel's connect/accept/close path allows
//! on this machine, against which no FastCGI server's per-connection figure can go.
//!
//!     accept_ceiling 127.0.0.1:PORT | unix:/path

use std::io::{self, Read, Write};
use std::net::TcpListener;
use std::os::unix::net::UnixListener;

use bytes::BytesMut;
use wfastcgi::exchange::{simple_response, ResponseEncoder};
use wfastcgi::protocol::{RecordType, HEADER_LEN};

fn main() -> io::Result<()> {
    let address = std::env::args()
        .nth(1)
        .ok_or_else(|| io::Error::other("usage: accept_ceiling HOST:PORT | unix:/path"))?;
    match address.strip_prefix("unix:") {
        Some(path) => {
            let _ = std::fs::remove_file(path);
            let listener = UnixListener::bind(path)?;
            loop {
                let (stream, _) = listener.accept()?;
                answer(stream);
            }
        }
        None => {
            let listener = TcpListener::bind(&address)?;
            loop {
                let (stream, _) = listener.accept()?;
                stream.set_nodelay(true)?;
                answer(stream);
            }
        }
    }
}

/// One request: errors end the connection, not the server.
fn answer(mut stream: impl Read + Write) {
    let mut request = BytesMut::zeroed(64 * 1024);
    let mut len = 0;
    // A bodiless request ends with an empty STDIN record: its header is the last bytes.
    while !ends_with_empty_stdin(&request[..len]) {
        match stream.read(&mut request[len..]) {
            Ok(0) | Err(_) => return,
            Ok(n) => len += n,
        }
        if len == request.len() {
            return;
        }
    }
    let request_id = u16::from_be_bytes([request[2], request[3]]);
    let mut encoder = ResponseEncoder::new(request_id);
    simple_response(&mut encoder, "200 OK", &[], b"Hello, World!\n");
    let _ = stream.write_all(&encoder.finish(0));
}

fn ends_with_empty_stdin(bytes: &[u8]) -> bool {
    bytes.len() >= HEADER_LEN && {
        let header = &bytes[bytes.len() - HEADER_LEN..];
        header[1] == RecordType::Stdin as u8 && header[4] == 0 && header[5] == 0
    }
}
