//! Python objects the gateway provides: the log streams that replace `sys.stdout`,
//! `sys.stderr` and serve as `wsgi.errors`, and `wsgi.file_wrapper`.

use std::sync::Mutex;

use pyo3::prelude::*;

/// A text stream whose lines go to the log. The application's `print()` output must never reach
/// the client or IIS's invalid standard handles.
#[pyclass(module = "wfastcgi", name = "LogStream", frozen)]
pub struct LogStream {
    name: &'static str,
    warning: bool,
    /// Text after the last newline, held until the line is complete.
    partial: Mutex<String>,
}

impl LogStream {
    pub fn new(name: &'static str, warning: bool) -> Self {
        LogStream {
            name,
            warning,
            partial: Mutex::new(String::new()),
        }
    }

    fn emit(&self, line: &str) {
        // Debug formatting escapes CR/LF, so a line cannot forge another log entry.
        if self.warning {
            tracing::warn!("{}: {:?}", self.name, line);
        } else {
            tracing::info!("{}: {:?}", self.name, line);
        }
    }
}

#[pymethods]
impl LogStream {
    fn write(&self, text: &str) -> usize {
        let mut partial = self.partial.lock().unwrap_or_else(|p| p.into_inner());
        partial.push_str(text);
        while let Some(end) = partial.find('\n') {
            let line: String = partial.drain(..=end).collect();
            self.emit(line.trim_end_matches(['\r', '\n']));
        }
        text.chars().count()
    }

    fn writelines(&self, lines: &Bound<'_, PyAny>) -> PyResult<()> {
        for line in lines.try_iter()? {
            self.write(&line?.extract::<String>()?);
        }
        Ok(())
    }

    fn flush(&self) {
        let mut partial = self.partial.lock().unwrap_or_else(|p| p.into_inner());
        if !partial.is_empty() {
            let line = std::mem::take(&mut *partial);
            self.emit(&line);
        }
    }

    fn isatty(&self) -> bool {
        false
    }

    fn writable(&self) -> bool {
        true
    }

    #[getter]
    fn encoding(&self) -> &'static str {
        "utf-8"
    }
}

/// `wsgi.file_wrapper`: iterates a file-like object in blocks of `blksize`.
#[pyclass(module = "wfastcgi", name = "FileWrapper", frozen)]
pub struct FileWrapper {
    filelike: Py<PyAny>,
    blksize: usize,
}

impl FileWrapper {
    /// The read size the application asked for.
    pub fn blksize(&self) -> usize {
        self.blksize
    }

    /// The wrapped object as an OS file positioned where Python's file object stands, when it
    /// is a regular file: the gateway then reads it itself, without the GIL.
    #[cfg(unix)]
    pub fn native_file(&self, py: Python<'_>) -> Option<std::fs::File> {
        use std::io::{Seek, SeekFrom};
        use std::os::fd::{AsFd, BorrowedFd};
        let filelike = self.filelike.bind(py);
        let fd: i32 = filelike.call_method0("fileno").ok()?.extract().ok()?;
        let position: u64 = filelike.call_method0("tell").ok()?.extract().ok()?;
        // SAFETY: the fd belongs to a live Python file object for the duration of this call;
        // it is only borrowed here to duplicate it.
        let borrowed = unsafe { BorrowedFd::borrow_raw(fd) };
        let mut file = std::fs::File::from(borrowed.as_fd().try_clone_to_owned().ok()?);
        if !file.metadata().ok()?.is_file() {
            return None;
        }
        file.seek(SeekFrom::Start(position)).ok()?;
        Some(file)
    }

    #[cfg(not(unix))]
    pub fn native_file(&self, _py: Python<'_>) -> Option<std::fs::File> {
        None
    }
}

#[pymethods]
impl FileWrapper {
    #[new]
    #[pyo3(signature = (filelike, blksize=8192))]
    fn new(filelike: Py<PyAny>, blksize: usize) -> Self {
        FileWrapper {
            filelike,
            blksize: blksize.max(1),
        }
    }

    fn __iter__(slf: PyRef<'_, Self>) -> PyRef<'_, Self> {
        slf
    }

    fn __next__<'py>(&self, py: Python<'py>) -> PyResult<Option<Bound<'py, PyAny>>> {
        let block = self
            .filelike
            .bind(py)
            .call_method1("read", (self.blksize,))?;
        Ok((block.len()? > 0).then_some(block))
    }

    fn close(&self, py: Python<'_>) -> PyResult<()> {
        if let Some(close) = self.filelike.bind(py).getattr_opt("close")? {
            close.call0()?;
        }
        Ok(())
    }
}
