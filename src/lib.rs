//! wfastcgi: a FastCGI-to-WSGI gateway that embeds CPython. See ARCHITECTURE.md.

/// `println!` for the commands' reports: a closed standard output (`wfastcgi check | head -1`)
/// ends the process quietly, as command-line tools do, instead of panicking.
#[macro_export]
macro_rules! outln {
    ($($arg:tt)*) => {
        $crate::write_stdout_line(format_args!($($arg)*))
    };
}

#[doc(hidden)]
pub fn write_stdout_line(line: std::fmt::Arguments<'_>) {
    use std::io::Write;
    let mut stdout = std::io::stdout().lock();
    let written = stdout
        .write_fmt(line)
        .and_then(|()| stdout.write_all(b"\n"))
        .and_then(|()| stdout.flush());
    match written {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => std::process::exit(0),
        Err(e) => {
            eprintln!("wfastcgi: cannot write to standard output: {e}");
            std::process::exit(1);
        }
    }
}

/// Locks `mutex`, also after a thread panicked holding it: the data stays usable.
pub fn lock<T>(mutex: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Sleeps until `at`; without it, for ever (a `select!` branch that never fires).
pub async fn sleep_until(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

pub mod check;
pub mod config;
pub mod exchange;
pub mod gateway;
pub mod iis;
pub mod logging;
pub mod ops;
pub mod properties;
pub mod protocol;
pub mod python;
pub mod routing;
pub mod shutdown;
#[cfg(unix)]
pub mod supervisor;
pub mod transport;
pub mod watcher;
#[cfg(windows)]
mod windows;
