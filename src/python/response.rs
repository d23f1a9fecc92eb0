//! Running one request: `start_response`, the `write()` callable, the response iterable, and
//! what happens when any of them fails.
//!
//! Headers are held until the first non-empty body chunk (PEP 3333) and go out in the same
//! batch. A body given as a list or tuple is sent in one batch; a generator's chunks are sent as
//! they come, so streaming responses stream. An error before the headers went out becomes a 500;
//! after, the response is cut short and the request ended. `close()` is always called.

use pyo3::exceptions::{PyAssertionError, PyOSError, PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyList, PyString, PyTuple};

use crate::config::ErrorDetail;
use std::sync::Arc;

use crate::exchange::{self, Output, ResponseEncoder, ResponseGone, TrySendError};
use crate::ops::GuardedSink;

use super::format_exception;
use super::streams::FileWrapper;

/// A list body is sent whole, but not in batches larger than this.
const BATCH_LIMIT: usize = 256 * 1024;
/// The least a file behind `wsgi.file_wrapper` is read at a time.
const FILE_BLOCK: usize = 64 * 1024;

#[pyclass(module = "wfastcgi", name = "StartResponse")]
pub struct StartResponse {
    /// `Status:` line and headers, CGI style, ready to send; set by `start_response`.
    head: Option<Vec<u8>>,
    /// The Content-Length the application declared, if any.
    content_length: Option<u64>,
    /// Body bytes encoded so far.
    body_len: u64,
    /// The status code, for the access log: the application's, or the one sent in its place.
    status: u16,
    headers_sent: bool,
    encoder: ResponseEncoder,
    /// Shared with the watchdog, which may answer a stuck request in the application's place.
    sink: Arc<GuardedSink>,
}

/// Why a request did not end normally.
pub enum Failure {
    /// The application (or its iterable, or `close()`) raised.
    Exception(PyErr),
    /// The application broke the WSGI contract.
    Contract(String),
    /// The file behind `wsgi.file_wrapper` could not be read.
    File(std::io::Error),
    /// The web server aborted the request or went away.
    Gone,
}

impl From<PyErr> for Failure {
    fn from(e: PyErr) -> Self {
        Failure::Exception(e)
    }
}

impl From<ResponseGone> for Failure {
    fn from(_: ResponseGone) -> Self {
        Failure::Gone
    }
}

impl StartResponse {
    pub fn new(sink: Arc<GuardedSink>) -> Self {
        StartResponse {
            head: None,
            content_length: None,
            body_len: 0,
            status: 0,
            headers_sent: false,
            encoder: ResponseEncoder::new(sink.request_id()),
            sink,
        }
    }

    pub fn is_aborted(&self) -> bool {
        self.sink.is_aborted()
    }

    /// The status code and the body bytes sent.
    pub fn outcome(&self) -> (u16, u64) {
        (self.status, self.body_len)
    }

    /// Adds a body chunk (after the headers, for the first) and sends the batch when `flush`.
    fn body(&mut self, py: Python<'_>, data: &[u8], flush: bool) -> Result<(), Failure> {
        if data.is_empty() && !flush {
            return Ok(());
        }
        self.encode_body(data)?;
        // PEP 3333: no block may be delayed, so each chunk leaves as it is produced. A list
        // body (`flush` false) runs no application code between its chunks, so it is sent in
        // one write with END_REQUEST.
        if flush || self.encoder.pending() >= BATCH_LIMIT {
            let records = self.encoder.take();
            if !records.is_empty() {
                self.send(py, Output::Records(records))?;
            }
        }
        Ok(())
    }

    /// Sends a regular file given to `wsgi.file_wrapper`, read here without the GIL, in blocks
    /// of at least 64 KiB (a multiple of the application's `blksize`), up to the declared
    /// Content-Length.
    fn send_file(
        &mut self,
        py: Python<'_>,
        mut file: std::fs::File,
        blksize: usize,
    ) -> Result<(), Failure> {
        use std::io::Read;
        let block = FILE_BLOCK.div_ceil(blksize) * blksize;
        let mut left = self.content_length.unwrap_or(u64::MAX);
        py.detach(|| {
            let mut buffer = vec![0u8; block];
            while left > 0 {
                if self.is_aborted() {
                    return Err(Failure::Gone);
                }
                let want = usize::try_from(left).map_or(block, |left| left.min(block));
                let n = file.read(&mut buffer[..want]).map_err(Failure::File)?;
                if n == 0 {
                    break;
                }
                left -= n as u64;
                self.encode_body(&buffer[..n])?;
                let records = self.encoder.take();
                self.sink.send_blocking(Output::Records(records))?;
            }
            Ok(())
        })
    }

    /// Encodes a body chunk, after the headers for the first non-empty one.
    fn encode_body(&mut self, data: &[u8]) -> Result<(), Failure> {
        if !self.headers_sent && !data.is_empty() {
            let head = self.head.as_deref().ok_or_else(|| {
                Failure::Contract(
                    "the application sent body data before calling start_response()".into(),
                )
            })?;
            self.encoder.stdout(head);
            self.headers_sent = true;
        }
        self.encoder.stdout(data);
        self.body_len += data.len() as u64;
        Ok(())
    }

    /// Queues a batch, releasing the GIL only when the connection is behind.
    fn send(&self, py: Python<'_>, output: Output) -> Result<(), ResponseGone> {
        match self.sink.try_send(output) {
            Ok(()) => Ok(()),
            Err(TrySendError::Full(output)) => py.detach(|| self.sink.send_blocking(output)),
            Err(TrySendError::Gone) => Err(ResponseGone),
        }
    }

    /// Ends a request that went well: headers (for an empty body), end of streams, END_REQUEST.
    pub fn finish(&mut self, py: Python<'_>) -> Result<(), Failure> {
        if !self.headers_sent {
            let head = self.head.as_deref().ok_or_else(|| {
                Failure::Contract(
                    "the application returned without calling start_response()".into(),
                )
            })?;
            self.encoder.stdout(head);
            self.headers_sent = true;
        }
        let records = self.encoder.finish(0);
        self.send(py, Output::End(records))?;
        Ok(())
    }

    /// Ends a request that failed: a 500 when nothing was sent yet, else the response is cut.
    pub fn fail(&mut self, py: Python<'_>, failure: Failure, detail: ErrorDetail, what: &str) {
        let request_id = self.sink.request_id();
        let message = match failure {
            Failure::Gone => {
                tracing::info!(request_id, "{what}: the web server aborted the request or closed the connection; response stopped");
                let records = self.encoder.finish(0);
                let _ = self.send(py, Output::End(records));
                return;
            }
            Failure::Exception(e) => {
                crate::ops::metrics::app_exception();
                format_exception(py, &e)
            }
            Failure::Contract(message) => {
                crate::ops::metrics::app_exception();
                message
            }
            Failure::File(e) => format!("reading the file given to wsgi.file_wrapper failed: {e}"),
        };
        if self.headers_sent {
            tracing::error!(
                request_id,
                "{what} failed after the headers were sent; response cut short:\n{message}"
            );
            self.encoder.discard();
            let records = self.encoder.finish(1);
            let _ = self.send(py, Output::End(records));
            return;
        }
        tracing::error!(request_id, "{what} failed:\n{message}");
        self.encoder.discard();
        error_response(&mut self.encoder, &message, detail);
        (self.status, self.body_len) = (500, ERROR_BODY.len() as u64);
        self.headers_sent = true;
        let records = self.encoder.finish(0);
        let _ = self.send(py, Output::End(records));
    }
}

const ERROR_BODY: &[u8] = b"Internal Server Error\n";

/// A 500 whose detail (by default, as wfastcgi.py does) goes on FCGI_STDERR: IIS shows it in its
/// error page (stderrMode ReturnStdErrIn500); nginx writes it to its error log.
pub fn error_response(encoder: &mut ResponseEncoder, message: &str, detail: ErrorDetail) {
    exchange::simple_response(encoder, "500 Internal Server Error", &[], ERROR_BODY);
    if detail == ErrorDetail::Full {
        encoder.stderr(format!("Error occurred while handling the request:\n{message}").as_bytes());
    }
}

/// Runs the application for one request and sends its response.
pub fn run(
    py: Python<'_>,
    handler: &Bound<'_, PyAny>,
    environ: Bound<'_, PyAny>,
    responder: &Bound<'_, StartResponse>,
) -> Result<(), Failure> {
    let iterable = handler.call1((environ, responder))?;
    let sent = send_iterable(py, &iterable, responder);
    // A plain list or tuple has no `close`; not asking saves building the AttributeError
    // that Python < 3.13 raises inside the lookup (measured: about a tenth of hello's cost
    // in the bridge).
    let plain =
        iterable.is_exact_instance_of::<PyList>() || iterable.is_exact_instance_of::<PyTuple>();
    let close = if plain {
        None
    } else {
        iterable.getattr_opt(pyo3::intern!(py, "close"))?
    };
    let closed = match close {
        Some(close) => close.call0().map(drop).map_err(Failure::from),
        None => Ok(()),
    };
    sent?;
    closed?;
    responder.borrow_mut().finish(py)
}

fn send_iterable(
    py: Python<'_>,
    iterable: &Bound<'_, PyAny>,
    responder: &Bound<'_, StartResponse>,
) -> Result<(), Failure> {
    if iterable.is_instance_of::<PyString>() || iterable.is_none() {
        let kind = iterable.get_type().name()?;
        return Err(Failure::Contract(format!(
            "the application returned a {kind}; it must return an iterable of bytes"
        )));
    }
    if let Ok(wrapper) = iterable.cast::<FileWrapper>() {
        let wrapper = wrapper.get();
        if let Some(file) = wrapper.native_file(py) {
            return responder
                .borrow_mut()
                .send_file(py, file, wrapper.blksize());
        }
    }
    let whole =
        iterable.is_exact_instance_of::<PyList>() || iterable.is_exact_instance_of::<PyTuple>();
    for item in iterable.try_iter()? {
        let item = item?;
        let Ok(chunk) = item.cast::<PyBytes>() else {
            let kind = item.get_type().name()?;
            return Err(Failure::Contract(format!(
                "the application's response iterable yielded a {kind}; WSGI bodies are bytes"
            )));
        };
        let mut responder = responder.borrow_mut();
        if responder.is_aborted() {
            return Err(Failure::Gone);
        }
        responder.body(py, chunk.as_bytes(), !whole)?;
    }
    Ok(())
}

#[pymethods]
impl StartResponse {
    #[pyo3(signature = (status, headers, exc_info=None))]
    fn __call__<'py>(
        slf: &Bound<'py, Self>,
        status: &Bound<'py, PyAny>,
        headers: &Bound<'py, PyAny>,
        exc_info: Option<&Bound<'py, PyAny>>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let exc_info = exc_info.filter(|e| !e.is_none());
        {
            let this = slf.borrow();
            match exc_info {
                // PEP 3333: too late to change the status; re-raise the application's error.
                Some(exc_info) if this.headers_sent => {
                    return Err(PyErr::from_value(exc_info.get_item(1)?));
                }
                None if this.head.is_some() => {
                    return Err(PyAssertionError::new_err(
                        "start_response() called a second time without exc_info",
                    ));
                }
                _ => {}
            }
        }
        let (head, content_length, code) = encode_head(status, headers)?;
        let mut this = slf.borrow_mut();
        this.head = Some(head);
        this.status = code;
        this.content_length = content_length;
        drop(this);
        slf.getattr(pyo3::intern!(slf.py(), "write"))
    }

    /// The legacy `write()` callable that `start_response` returns.
    fn write(&mut self, py: Python<'_>, data: &Bound<'_, PyAny>) -> PyResult<()> {
        let Ok(data) = data.cast::<PyBytes>() else {
            return Err(PyTypeError::new_err("write() takes bytes"));
        };
        match self.body(py, data.as_bytes(), true) {
            Ok(()) => Ok(()),
            Err(Failure::Gone) => Err(PyOSError::new_err("the client went away")),
            Err(Failure::Contract(message)) => Err(PyAssertionError::new_err(message)),
            Err(Failure::Exception(e)) => Err(e),
            Err(Failure::File(e)) => Err(e.into()),
        }
    }
}

/// `Status: 200 OK\r\nName: value\r\n...\r\n` from start_response's arguments, validated,
/// the Content-Length among them, and the status code.
fn encode_head(
    status: &Bound<'_, PyAny>,
    headers: &Bound<'_, PyAny>,
) -> PyResult<(Vec<u8>, Option<u64>, u16)> {
    let mut content_length = None;
    let status: String = status
        .extract()
        .map_err(|_| PyTypeError::new_err("start_response() status must be a str"))?;
    let valid_status = status.len() >= 4
        && status.as_bytes()[..3].iter().all(u8::is_ascii_digit)
        && status.as_bytes()[3] == b' '
        && status
            .chars()
            .all(|c| c == '\t' || (c as u32 >= 0x20 && c as u32 <= 0xff && c != '\x7f'));
    if !valid_status {
        return Err(PyValueError::new_err(format!(
            "start_response() status {status:?} is invalid: expected a three-digit code, a space and a reason phrase"
        )));
    }
    let mut head = Vec::with_capacity(128);
    head.extend_from_slice(b"Status: ");
    push_latin1(&mut head, &status);
    head.extend_from_slice(b"\r\n");
    for header in headers.try_iter()? {
        let header = header?;
        let (name, value): (String, String) = header.extract().map_err(|_| {
            PyTypeError::new_err(format!(
                "start_response() header {header} is not a (str, str) tuple"
            ))
        })?;
        let valid_name = !name.is_empty()
            && name
                .bytes()
                .all(|b| b.is_ascii_graphic() && !b"()<>@,;:\\\"/[]?={}".contains(&b));
        if !valid_name {
            return Err(PyValueError::new_err(format!(
                "start_response() header name {name:?} is invalid"
            )));
        }
        let valid_value = value
            .chars()
            .all(|c| c == '\t' || (c as u32 >= 0x20 && c as u32 <= 0xff && c != '\x7f'));
        if !valid_value {
            return Err(PyValueError::new_err(format!(
                "start_response() header {name}: {value:?} is invalid: control characters or characters outside ISO-8859-1"
            )));
        }
        if name.eq_ignore_ascii_case("content-length") {
            content_length = value.trim().parse().ok();
        }
        head.extend_from_slice(name.as_bytes());
        head.extend_from_slice(b": ");
        push_latin1(&mut head, &value);
        head.extend_from_slice(b"\r\n");
    }
    head.extend_from_slice(b"\r\n");
    let code = status[..3].parse().unwrap_or(0);
    Ok((head, content_length, code))
}

/// Appends a string already checked to hold only ISO-8859-1 characters, one byte each.
fn push_latin1(out: &mut Vec<u8>, text: &str) {
    out.extend(text.chars().map(|c| c as u32 as u8));
}
