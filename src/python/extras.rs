//! What wfastcgi.py offers beyond WSGI: remote debugging and Azure Application Insights.
//! Each is optional: a missing package or a failure is logged, never fatal.

use pyo3::prelude::*;

use super::format_exception;

/// `WSGI_PTVSD_SECRET` (+ `WSGI_PTVSD_ADDRESS`, default `0.0.0.0:5678`) enables ptvsd as
/// wfastcgi.py did; `WSGI_DEBUGPY_ADDRESS` starts `debugpy.listen`, ptvsd's maintained successor.
pub fn start_debuggers(py: Python<'_>) {
    if let Ok(secret) = std::env::var("WSGI_PTVSD_SECRET") {
        let address = std::env::var("WSGI_PTVSD_ADDRESS").unwrap_or_else(|_| "0.0.0.0:5678".into());
        let started = host_and_port(&address).and_then(|(host, port)| {
            let ptvsd = py.import("ptvsd")?;
            let kwargs = pyo3::types::PyDict::new(py);
            kwargs.set_item("address", (host, port))?;
            ptvsd.call_method("enable_attach", (secret,), Some(&kwargs))?;
            Ok(())
        });
        report(py, "ptvsd", &address, started);
    }
    if let Ok(address) = std::env::var("WSGI_DEBUGPY_ADDRESS") {
        let started = host_and_port(&address).and_then(|(host, port)| {
            py.import("debugpy")?
                .call_method1("listen", ((host, port),))?;
            Ok(())
        });
        report(py, "debugpy", &address, started);
    }
}

fn report(py: Python<'_>, debugger: &str, address: &str, started: PyResult<()>) {
    match started {
        Ok(()) => tracing::info!("{debugger} is listening on {address} for a debugger to attach"),
        Err(e) => tracing::error!(
            "{debugger} could not start on {address}; serving without it:\n{}",
            format_exception(py, &e)
        ),
    }
}

/// `host:port`, the port last so IPv6 hosts work.
fn host_and_port(address: &str) -> PyResult<(String, u16)> {
    address
        .rsplit_once(':')
        .and_then(|(host, port)| {
            Some((host.trim_matches(['[', ']']).to_owned(), port.parse().ok()?))
        })
        .ok_or_else(|| {
            pyo3::exceptions::PyValueError::new_err(format!("{address:?} is not HOST:PORT"))
        })
}

/// With `APPINSIGHTS_INSTRUMENTATIONKEY`, wraps the handler in
/// `applicationinsights.requests.WSGIApplication` when that package imports, and flushes its
/// telemetry at exit, as wfastcgi.py does.
pub fn wrap_for_application_insights<'py>(
    py: Python<'py>,
    handler: Bound<'py, PyAny>,
) -> Bound<'py, PyAny> {
    let Ok(key) = std::env::var("APPINSIGHTS_INSTRUMENTATIONKEY") else {
        return handler;
    };
    let wrapped = py
        .import("applicationinsights.requests")
        .and_then(|module| module.getattr("WSGIApplication"))
        .and_then(|wrapper| wrapper.call1((key, &handler)))
        .and_then(|wrapped| {
            let flush = wrapped.getattr("client")?.getattr("flush")?;
            py.import("atexit")?.call_method1("register", (flush,))?;
            Ok(wrapped)
        });
    match wrapped {
        Ok(wrapped) => {
            tracing::info!("Application Insights enabled");
            wrapped
        }
        Err(e) => {
            tracing::warn!(
                "APPINSIGHTS_INSTRUMENTATIONKEY is set but applicationinsights cannot be used; serving without it:\n{}",
                format_exception(py, &e)
            );
            handler
        }
    }
}
