//! wfastcgi: a FastCGI-to-WSGI gateway that embeds CPython. See ARCHITECTURE.md.

#[cfg(target_os = "linux")]
pub mod acceptor;
pub mod check;
pub mod config;
pub mod connection;
#[cfg(unix)]
pub mod direct;
pub mod exchange;
pub mod gateway;
pub mod iis;
pub mod logging;
pub mod ops;
pub mod properties;
pub mod protocol;
pub mod python;
pub mod routing;
pub mod server;
pub mod shutdown;
#[cfg(unix)]
pub mod supervisor;
pub mod watcher;
#[cfg(windows)]
mod windows;
pub mod worker;
