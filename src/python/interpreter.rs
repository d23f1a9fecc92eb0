//! Starting and stopping the embedded CPython.
//!
//! The interpreter is configured through PyConfig before it starts, so a virtualenv is used the
//! way `<venv>/bin/python` would use it: `sys.prefix` is the venv (CPython reads its
//! `pyvenv.cfg`) and its site-packages are on `sys.path`. pyo3 sees an initialised interpreter and
//! skips its own start-up. No Python signal handlers are installed: the Rust side owns signals.

#[cfg(unix)]
use std::ffi::CString;
use std::mem::MaybeUninit;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Result};
use pyo3::ffi;
use pyo3::prelude::*;

use crate::config::AppConfig;

/// The interpreter a virtualenv would run.
pub fn venv_python(venv: &Path) -> Result<PathBuf> {
    if !venv.join("pyvenv.cfg").is_file() {
        bail!(
            "virtualenv {} is not usable: it has no pyvenv.cfg (set WSGI_VENV, --venv or VIRTUAL_ENV to a folder made by `python -m venv`)",
            venv.display()
        );
    }
    let python = if cfg!(windows) {
        venv.join("Scripts").join("python.exe")
    } else {
        venv.join("bin").join("python")
    };
    if !python.exists() {
        bail!(
            "virtualenv {} is not usable: {} is missing",
            venv.display(),
            python.display()
        );
    }
    Ok(python)
}

/// Whether CPython is running. On Windows nothing may call into Python before its DLL is loaded.
pub fn running() -> bool {
    #[cfg(windows)]
    if super::library::loaded().is_none() {
        return false;
    }
    // SAFETY: Py_IsInitialized may be called at any time once the library is loaded.
    unsafe { ffi::Py_IsInitialized() != 0 }
}

/// Starts CPython (once per process) and leaves no thread holding the GIL.
pub fn start(config: &AppConfig) -> Result<()> {
    if running() {
        return Ok(());
    }
    let venv = config.venv();
    let executable = venv.as_deref().map(venv_python).transpose()?;
    #[cfg(windows)]
    let home = super::library::load(&super::library::Search {
        python_home: config.python_home().as_deref(),
        venv: venv.as_deref(),
    })
    .map_err(anyhow::Error::msg)?;
    // SAFETY: the PyConfig API is used as CPython documents it: initialised, filled, used once,
    // cleared; Python is not running yet, so no other thread can touch it.
    unsafe {
        let mut config = MaybeUninit::<ffi::PyConfig>::uninit();
        ffi::PyConfig_InitPythonConfig(config.as_mut_ptr());
        let mut config = config.assume_init();
        config.install_signal_handlers = 0;
        config.parse_argv = 0;
        let mut status = match &executable {
            Some(executable) => set_path(&mut config, |c| &mut c.executable, executable),
            // The process is wfastcgi.exe, usually not beside the DLL: Python's home is the
            // DLL's folder (a virtualenv's pyvenv.cfg says it instead).
            #[cfg(windows)]
            None => set_path(&mut config, |c| &mut c.home, home),
            #[cfg(not(windows))]
            None => Ok(()),
        };
        if status.is_ok() {
            let started = ffi::Py_InitializeFromConfig(&config);
            if ffi::PyStatus_Exception(started) != 0 {
                status = Err(status_error(&started));
            }
        }
        ffi::PyConfig_Clear(&mut config);
        status?;
        // Release the GIL taken by initialisation; workers attach as they need it.
        ffi::PyEval_SaveThread();
    }
    Ok(())
}

/// CPython's `wchar_t`, which PyConfig's strings are made of.
#[cfg(windows)]
type WideChar = u16;
#[cfg(unix)]
type WideChar = libc::wchar_t;

/// Sets a path field of a PyConfig being filled.
///
/// # Safety
/// `config` is initialised and not yet used to start Python.
unsafe fn set_path(
    config: &mut ffi::PyConfig,
    field: impl Fn(&mut ffi::PyConfig) -> &mut *mut WideChar,
    path: &Path,
) -> Result<()> {
    #[cfg(windows)]
    let status = {
        use std::os::windows::ffi::OsStrExt;
        let wide: Vec<u16> = path.as_os_str().encode_wide().chain(Some(0)).collect();
        let target: *mut *mut WideChar = field(config);
        ffi::PyConfig_SetString(config, target, wide.as_ptr())
    };
    #[cfg(not(windows))]
    let status = {
        use anyhow::Context as _;
        use std::os::unix::ffi::OsStrExt;
        let bytes = CString::new(path.as_os_str().as_bytes())
            .with_context(|| format!("{} contains a NUL byte", path.display()))?;
        let target: *mut *mut WideChar = field(config);
        ffi::PyConfig_SetBytesString(config, target, bytes.as_ptr())
    };
    if ffi::PyStatus_Exception(status) != 0 {
        return Err(status_error(&status));
    }
    Ok(())
}

unsafe fn status_error(status: &ffi::PyStatus) -> anyhow::Error {
    let message = if status.err_msg.is_null() {
        "unknown error".to_owned()
    } else {
        std::ffi::CStr::from_ptr(status.err_msg)
            .to_string_lossy()
            .into_owned()
    };
    anyhow!("Python failed to start: {message}")
}

/// Shuts Python down in order: the application's non-daemon threads are joined, then atexit
/// handlers run and the interpreter is finalised, all within `grace` from now. Threads still
/// running then do not hold the exit: atexit handlers run anyway and finalisation (which would
/// wait for them) is skipped, since the process is about to end.
pub fn finalize(grace: Duration) {
    if !running() {
        return;
    }
    let deadline = Instant::now() + grace;
    let stragglers = Python::attach(|py| join_application_threads(py, deadline));
    match stragglers {
        Ok(names) if names.is_empty() => {}
        Ok(names) => {
            tracing::warn!(
                "threads still running after {grace:?}: {}; running atexit handlers and exiting without them",
                names.join(", ")
            );
            Python::attach(|py| {
                if let Err(e) = py
                    .import("atexit")
                    .and_then(|m| m.call_method0("_run_exitfuncs"))
                {
                    tracing::error!("atexit handlers failed: {e}");
                }
            });
            return;
        }
        Err(e) => tracing::warn!("cannot list the application's threads: {e}"),
    }
    // Finalisation can still block (an atexit handler that waits): it gets what is left.
    std::thread::spawn(move || {
        std::thread::sleep(deadline.saturating_duration_since(Instant::now()));
        tracing::warn!("Python did not finish shutting down within {grace:?}; exiting anyway");
        crate::logging::flush();
        std::process::exit(0);
    });
    // SAFETY: every worker has finished and released the GIL; this thread takes it and
    // CPython tears itself down. No Python object is used after this.
    unsafe {
        ffi::PyGILState_Ensure();
        if ffi::Py_FinalizeEx() != 0 {
            tracing::warn!("Python reported an error while shutting down");
        }
    }
}

/// Joins the non-daemon threads the application started, until `deadline`; returns the names of
/// those still running. `Thread.join` releases the GIL while it waits.
fn join_application_threads(py: Python<'_>, deadline: Instant) -> PyResult<Vec<String>> {
    let threading = py.import("threading")?;
    let current = threading.call_method0("current_thread")?;
    let mut running = Vec::new();
    for thread in threading.call_method0("enumerate")?.try_iter()? {
        let thread = thread?;
        if thread.is(&current) || thread.getattr("daemon")?.extract::<bool>()? {
            continue;
        }
        let left = deadline.saturating_duration_since(Instant::now());
        thread.call_method1("join", (left.as_secs_f64(),))?;
        if thread.call_method0("is_alive")?.extract::<bool>()? {
            running.push(thread.getattr("name")?.extract::<String>()?);
        }
    }
    Ok(running)
}
