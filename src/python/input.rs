//! `wsgi.input`: the request body as the web server sends it, read on demand.
//!
//! Nothing is read ahead beyond the STDIN records already queued by the connection (a few
//! 64 KiB records), so a 2 GiB upload costs no more memory than a small one. The GIL is released
//! while waiting for the web server. CONTENT_LENGTH, when sent, is the end of the body: reads
//! never wait past it.
//!
//! With `WSGI_INPUT_SPOOL=<bytes>` the body is received whole before the application starts:
//! up to that size in memory, beyond it in an anonymous temporary file (gone when closed), so
//! `seek` and `tell` work for applications that need them.

use std::collections::VecDeque;
use std::io::{Cursor, Read, Seek, SeekFrom, Write};

use bytes::{Buf, Bytes};
use pyo3::exceptions::{PyOSError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyList};

use crate::exchange::{BodyInterrupted, BodyStream};

/// Read this much at a time from a spooled body.
const SPOOL_READ: usize = 64 * 1024;

/// A spooled body: in memory or in a temporary file.
trait Spool: Read + Seek + Send + Sync {}
impl<T: Read + Seek + Send + Sync> Spool for T {}

enum Source {
    /// Straight from the web server, as the application reads.
    Stream(BodyStream),
    /// Received whole before the application started.
    Spooled(Box<dyn Spool>),
}

#[pyclass(module = "wfastcgi", name = "InputStream")]
pub struct WsgiInput {
    source: Source,
    chunks: VecDeque<Bytes>,
    buffered: usize,
    /// Bytes CONTENT_LENGTH says are still to come; `None` without CONTENT_LENGTH.
    unreceived: Option<u64>,
    finished: bool,
}

impl WsgiInput {
    pub fn new(body: BodyStream, content_length: Option<u64>) -> Self {
        WsgiInput {
            source: Source::Stream(body),
            chunks: VecDeque::new(),
            buffered: 0,
            unreceived: content_length,
            finished: false,
        }
    }

    /// Receives the whole body (with the GIL released): in memory up to `memory_limit` bytes,
    /// in a temporary file beyond.
    pub fn spooled(
        py: Python<'_>,
        mut body: BodyStream,
        content_length: Option<u64>,
        memory_limit: u64,
    ) -> PyResult<Self> {
        let spool = py.detach(|| spool(&mut body, content_length, memory_limit))?;
        Ok(WsgiInput {
            source: Source::Spooled(spool),
            chunks: VecDeque::new(),
            buffered: 0,
            unreceived: None,
            finished: false,
        })
    }

    /// Waits for the next piece of the body; false at its end.
    fn fill(&mut self, py: Python<'_>) -> PyResult<bool> {
        if self.finished || self.unreceived == Some(0) {
            self.finished = true;
            return Ok(false);
        }
        let body = match &mut self.source {
            Source::Stream(body) => body,
            Source::Spooled(spool) => {
                let mut block = vec![0u8; SPOOL_READ];
                let n = py.detach(|| spool.read(&mut block))?;
                if n == 0 {
                    self.finished = true;
                    return Ok(false);
                }
                block.truncate(n);
                self.buffered += n;
                self.chunks.push_back(Bytes::from(block));
                return Ok(true);
            }
        };
        match py.detach(|| body.next_blocking()) {
            Ok(Some(mut data)) => {
                if let Some(left) = &mut self.unreceived {
                    // Bytes beyond CONTENT_LENGTH are not part of the body.
                    data.truncate(usize::try_from(*left).unwrap_or(usize::MAX));
                    *left -= data.len() as u64;
                }
                self.buffered += data.len();
                self.chunks.push_back(data);
                Ok(true)
            }
            Ok(None) => {
                self.finished = true;
                Ok(false)
            }
            Err(BodyInterrupted) => Err(PyOSError::new_err(
                "request body incomplete: the web server aborted the request or closed the connection",
            )),
        }
    }

    /// Moves `n` buffered bytes into one new `bytes` object (the only copy of body bytes).
    fn take<'py>(&mut self, py: Python<'py>, n: usize) -> PyResult<Bound<'py, PyBytes>> {
        let chunks = &mut self.chunks;
        let bytes = PyBytes::new_with(py, n, |out| {
            let mut filled = 0;
            while filled < n {
                let Some(chunk) = chunks.front_mut() else {
                    break;
                };
                let count = chunk.len().min(n - filled);
                out[filled..filled + count].copy_from_slice(&chunk[..count]);
                chunk.advance(count);
                filled += count;
                if chunk.is_empty() {
                    chunks.pop_front();
                }
            }
            Ok(())
        })?;
        self.buffered -= n;
        Ok(bytes)
    }

    /// Where the first newline among the buffered bytes ends, searching from `from`.
    fn line_end(&self, from: usize) -> Option<usize> {
        let mut offset = 0;
        for chunk in &self.chunks {
            if offset + chunk.len() > from {
                let start = from.saturating_sub(offset);
                if let Some(pos) = chunk[start..].iter().position(|&b| b == b'\n') {
                    return Some(offset + start + pos + 1);
                }
            }
            offset += chunk.len();
        }
        None
    }
}

fn spool(
    body: &mut BodyStream,
    content_length: Option<u64>,
    memory_limit: u64,
) -> PyResult<Box<dyn Spool>> {
    let interrupted = || {
        PyOSError::new_err(
            "request body incomplete: the web server aborted the request or closed the connection",
        )
    };
    let mut memory = Vec::new();
    let mut file: Option<std::fs::File> = None;
    let mut left = content_length.unwrap_or(u64::MAX);
    while left > 0 {
        let Some(mut data) = body.next_blocking().map_err(|_| interrupted())? else {
            break;
        };
        data.truncate(usize::try_from(left).unwrap_or(usize::MAX));
        left -= data.len() as u64;
        if file.is_none() && (memory.len() + data.len()) as u64 > memory_limit {
            let mut spill = tempfile::tempfile()?;
            spill.write_all(&memory)?;
            memory = Vec::new();
            file = Some(spill);
        }
        match &mut file {
            Some(file) => file.write_all(&data)?,
            None => memory.extend_from_slice(&data),
        }
    }
    Ok(match file {
        Some(mut file) => {
            file.rewind()?;
            Box::new(file)
        }
        None => Box::new(Cursor::new(memory)),
    })
}

fn limit(size: Option<isize>) -> usize {
    match size {
        Some(n) if n >= 0 => n as usize,
        _ => usize::MAX,
    }
}

#[pymethods]
impl WsgiInput {
    #[pyo3(signature = (size=None))]
    fn read<'py>(&mut self, py: Python<'py>, size: Option<isize>) -> PyResult<Bound<'py, PyBytes>> {
        let want = limit(size);
        while self.buffered < want && self.fill(py)? {}
        self.take(py, want.min(self.buffered))
    }

    #[pyo3(signature = (size=None))]
    fn readline<'py>(
        &mut self,
        py: Python<'py>,
        size: Option<isize>,
    ) -> PyResult<Bound<'py, PyBytes>> {
        let limit = limit(size);
        let mut searched = 0;
        let n = loop {
            if let Some(end) = self.line_end(searched) {
                break end.min(limit);
            }
            if self.buffered >= limit {
                break limit;
            }
            searched = self.buffered;
            if !self.fill(py)? {
                break self.buffered.min(limit);
            }
        };
        self.take(py, n)
    }

    #[pyo3(signature = (hint=None))]
    fn readlines<'py>(
        &mut self,
        py: Python<'py>,
        hint: Option<isize>,
    ) -> PyResult<Bound<'py, PyList>> {
        let hint = match hint {
            Some(n) if n > 0 => n as usize,
            _ => usize::MAX,
        };
        let lines = PyList::empty(py);
        let mut total = 0;
        while total < hint {
            let line = self.readline(py, None)?;
            if line.as_bytes().is_empty() {
                break;
            }
            total += line.as_bytes().len();
            lines.append(line)?;
        }
        Ok(lines)
    }

    fn __iter__(slf: PyRef<'_, Self>) -> PyRef<'_, Self> {
        slf
    }

    fn __next__<'py>(&mut self, py: Python<'py>) -> PyResult<Option<Bound<'py, PyBytes>>> {
        let line = self.readline(py, None)?;
        Ok((!line.as_bytes().is_empty()).then_some(line))
    }

    fn readable(&self) -> bool {
        true
    }

    fn seekable(&self) -> bool {
        matches!(self.source, Source::Spooled(_))
    }

    fn tell(&mut self) -> PyResult<u64> {
        let Source::Spooled(spool) = &mut self.source else {
            return Err(not_seekable());
        };
        Ok(spool.stream_position()? - self.buffered as u64)
    }

    #[pyo3(signature = (offset, whence=0))]
    fn seek(&mut self, offset: i64, whence: i32) -> PyResult<u64> {
        let position = self.tell()?;
        let Source::Spooled(spool) = &mut self.source else {
            return Err(not_seekable());
        };
        let target = match whence {
            0 => SeekFrom::Start(
                u64::try_from(offset)
                    .map_err(|_| PyValueError::new_err("negative seek position"))?,
            ),
            1 => SeekFrom::Start(
                position
                    .checked_add_signed(offset)
                    .ok_or_else(|| PyValueError::new_err("negative seek position"))?,
            ),
            2 => SeekFrom::End(offset),
            _ => {
                return Err(PyValueError::new_err(format!(
                    "invalid whence ({whence}, should be 0, 1 or 2)"
                )))
            }
        };
        let position = spool.seek(target)?;
        self.chunks.clear();
        self.buffered = 0;
        self.finished = false;
        Ok(position)
    }
}

/// What `seek` raises on a streamed body, as Python's own unseekable streams do.
fn not_seekable() -> PyErr {
    Python::attach(|py| {
        py.import("io")
            .and_then(|io| io.getattr("UnsupportedOperation"))
            .and_then(|kind| {
                kind.call1(("wsgi.input is a stream: set WSGI_INPUT_SPOOL to make it seekable",))
            })
            .map(PyErr::from_value)
            .unwrap_or_else(|e| e)
    })
}
