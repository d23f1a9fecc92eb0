//! Finding the WSGI callable that `WSGI_HANDLER` names, exactly as wfastcgi.py does.
//!
//! `a.b.c.name` imports the longest module prefix that imports (`a.b.c`, then `a.b`, then `a`;
//! the last name is never imported), then takes the remaining names as attributes. A name written
//! `x()` is called with no arguments before the next name is taken, so
//! `django.core.wsgi.get_wsgi_application()` and `app.create_app().wsgi_app` both work.
//! `module:attr.attr` is accepted too: the part before the colon is the module.

use pyo3::exceptions::{PyImportError, PyValueError};
use pyo3::prelude::*;

pub fn resolve<'py>(py: Python<'py>, name: &str) -> PyResult<Bound<'py, PyAny>> {
    let handler = if let Some((module, attributes)) = name.split_once(':') {
        let module = py.import(module.trim())?;
        walk(module.into_any(), attributes.split('.'))?
    } else {
        resolve_dotted(py, name)?
    };
    if handler.is_none() {
        return Err(PyValueError::new_err(format!(
            "WSGI_HANDLER {name:?} is None"
        )));
    }
    if !handler.is_callable() {
        let kind = handler.get_type().name()?;
        return Err(PyValueError::new_err(format!(
            "WSGI_HANDLER {name:?} is a {kind}, not a callable"
        )));
    }
    Ok(handler)
}

fn resolve_dotted<'py>(py: Python<'py>, name: &str) -> PyResult<Bound<'py, PyAny>> {
    let parts: Vec<&str> = name.split('.').collect();
    // The most useful import error is one raised inside a module that exists (a missing
    // dependency); "no module named <prefix>" only says we tried too long a prefix.
    let mut inner_error: Option<PyErr> = None;
    let mut last_error: Option<PyErr> = None;
    for split in (1..parts.len()).rev() {
        if parts[..split].iter().any(|part| part.ends_with("()")) {
            continue;
        }
        let module_name = parts[..split].join(".");
        match py.import(module_name.as_str()) {
            Ok(module) => return walk(module.into_any(), parts[split..].iter().copied()),
            Err(e) if e.is_instance_of::<PyImportError>(py) => {
                let missing: Option<String> = e
                    .value(py)
                    .getattr("name")
                    .and_then(|n| n.extract())
                    .ok()
                    .flatten();
                let is_prefix_itself = missing
                    .as_deref()
                    .is_some_and(|m| module_name == m || module_name.starts_with(&format!("{m}.")));
                if !is_prefix_itself && inner_error.is_none() {
                    inner_error = Some(e);
                } else {
                    last_error = Some(e);
                }
            }
            Err(e) => return Err(e),
        }
    }
    let cause = inner_error.or(last_error);
    let detail = match &cause {
        Some(_) => "",
        None => " (it names no module: expected module.attribute)",
    };
    let error = PyValueError::new_err(format!("\"{name}\" could not be imported{detail}"));
    // The import error is the __cause__: its traceback is printed above this one, and a
    // diagnosis can look at it.
    error.set_cause(py, cause);
    Err(error)
}

fn walk<'py, 'a>(
    mut object: Bound<'py, PyAny>,
    names: impl Iterator<Item = &'a str>,
) -> PyResult<Bound<'py, PyAny>> {
    for name in names {
        let (attribute, call) = match name.trim().strip_suffix("()") {
            Some(attribute) => (attribute, true),
            None => (name.trim(), false),
        };
        object = object.getattr(attribute)?;
        if call {
            object = object.call0()?;
        }
    }
    Ok(object)
}
