//! `wsgi.input`: the request body as the web server sends it, read on demand.
//!
//! Nothing is read ahead beyond the STDIN records already queued by the connection (a few
//! 64 KiB records), so a 2 GiB upload costs no more memory than a small one. The GIL is released
//! while waiting for the web server. CONTENT_LENGTH, when sent, is the end of the body: reads
//! never wait past it.

use std::collections::VecDeque;

use bytes::{Buf, Bytes};
use pyo3::exceptions::PyOSError;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyList};

use crate::exchange::{BodyInterrupted, BodyStream};

#[pyclass(module = "wfastcgi", name = "InputStream")]
pub struct WsgiInput {
    body: BodyStream,
    chunks: VecDeque<Bytes>,
    buffered: usize,
    /// Bytes CONTENT_LENGTH says are still to come; `None` without CONTENT_LENGTH.
    unreceived: Option<u64>,
    finished: bool,
}

impl WsgiInput {
    pub fn new(body: BodyStream, content_length: Option<u64>) -> Self {
        WsgiInput {
            body,
            chunks: VecDeque::new(),
            buffered: 0,
            unreceived: content_length,
            finished: false,
        }
    }

    /// Waits for the next piece of the body; false at its end.
    fn fill(&mut self, py: Python<'_>) -> PyResult<bool> {
        if self.finished || self.unreceived == Some(0) {
            self.finished = true;
            return Ok(false);
        }
        let body = &mut self.body;
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
}
