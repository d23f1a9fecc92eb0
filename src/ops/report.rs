//! What `wfastcgi check` says about the operations settings.

use super::Settings;
use crate::config::AppConfig;

/// IIS's `requestTimeout` when the FastCGI application does not set one.
pub const IIS_DEFAULT_REQUEST_TIMEOUT: u64 = 90;

/// One line of the report.
#[derive(Debug, PartialEq)]
pub enum Finding {
    Ok(String),
    Warn(String),
    Fail(String),
}

pub fn check(config: &AppConfig) -> Vec<Finding> {
    let settings = match Settings::from_config(config) {
        Ok(settings) => settings,
        Err(e) => return vec![Finding::Fail(format!("{e:#}"))],
    };
    let mut findings = Vec::new();
    let (iis_timeout, source) = match iis_request_timeout(config) {
        Ok(Some(seconds)) => (
            seconds,
            "web.config's <fastCgi><application requestTimeout>",
        ),
        Ok(None) => (IIS_DEFAULT_REQUEST_TIMEOUT, "IIS's default"),
        Err(e) => {
            findings.push(Finding::Warn(format!("cannot read requestTimeout: {e}")));
            (IIS_DEFAULT_REQUEST_TIMEOUT, "IIS's default")
        }
    };
    findings.push(match settings.request_timeout {
        None => Finding::Ok(format!(
            "WSGI_REQUEST_TIMEOUT is off: a stuck request runs until IIS kills the process at requestTimeout ({iis_timeout} s, {source}), with nothing logged"
        )),
        Some(timeout) if timeout.as_secs_f64() >= iis_timeout as f64 => Finding::Warn(format!(
            "WSGI_REQUEST_TIMEOUT={} s is not below requestTimeout={iis_timeout} s ({source}): under IIS the process is killed first and the stuck request's stack is never logged",
            timeout.as_secs_f64()
        )),
        Some(timeout) => Finding::Ok(format!(
            "WSGI_REQUEST_TIMEOUT={} s: a request running longer has its stack logged, gets a 504, and the process is replaced (below requestTimeout={iis_timeout} s, {source})",
            timeout.as_secs_f64()
        )),
    });
    if let Some(slow) = settings.slow_request_log {
        findings.push(match settings.request_timeout {
            Some(timeout) if slow >= timeout => Finding::Warn(format!(
                "WSGI_SLOW_REQUEST_LOG={} s is not below WSGI_REQUEST_TIMEOUT: it never logs",
                slow.as_secs_f64()
            )),
            _ => Finding::Ok(format!(
                "WSGI_SLOW_REQUEST_LOG={} s: a request running longer has its stack logged",
                slow.as_secs_f64()
            )),
        });
    }
    if let Some(max) = settings.max_requests {
        findings.push(Finding::Ok(format!(
            "WSGI_MAX_REQUESTS={max} (+ up to {} of jitter): the process is replaced after that many requests",
            settings.max_requests_jitter
        )));
    }
    if let Some(max) = settings.max_rss {
        findings.push(if cfg!(target_os = "linux") {
            Finding::Ok(format!(
                "WSGI_MAX_RSS={} MiB: the process is replaced once its resident memory is above it",
                max >> 20
            ))
        } else {
            Finding::Warn("WSGI_MAX_RSS is only measured on Linux: here it does nothing".into())
        });
    }
    if let Some(address) = &settings.metrics {
        findings.push(Finding::Ok(format!(
            "WSGI_METRICS {address}: OpenMetrics for `serve --bind` (the supervisor adds up its workers'); ignored under IIS, whose processes have no stable address"
        )));
    }
    if let Some(path) = &settings.health_path {
        findings.push(Finding::Ok(format!(
            "WSGI_HEALTH_PATH {path}: answered by the gateway, 200 while serving, 503 while draining"
        )));
    }
    match settings.access_log.as_deref().map(str::trim) {
        None => {}
        Some(super::access::MAIN_LOG) => findings.push(Finding::Ok(
            "WSGI_ACCESS_LOG=log: one line per request in the main log".into(),
        )),
        Some(file) => {
            let path = config.app_dir.join(file);
            let opened = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&path);
            findings.push(match opened {
                Ok(_) => Finding::Ok(format!(
                    "WSGI_ACCESS_LOG {}: one line per request",
                    path.display()
                )),
                Err(e) => Finding::Fail(format!(
                    "WSGI_ACCESS_LOG {} cannot be opened: {e}",
                    path.display()
                )),
            });
        }
    }
    findings
}

/// `requestTimeout` of the web.config's `<system.webServer><fastCgi><application>` that runs
/// this binary (else the first one), in seconds.
fn iis_request_timeout(config: &AppConfig) -> Result<Option<u64>, String> {
    let Some(path) = &config.web_config else {
        return Ok(None);
    };
    let xml = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let exe = std::env::current_exe().unwrap_or_default();
    let applications = fastcgi_applications(&xml)?;
    let chosen = applications
        .iter()
        .find(|(full_path, _)| crate::iis::points_at(full_path, &exe))
        .or(applications.first());
    match chosen {
        Some((_, Some(timeout))) => timeout
            .trim()
            .parse()
            .map(Some)
            .map_err(|_| format!("requestTimeout={timeout:?} is not a whole number of seconds")),
        _ => Ok(None),
    }
}

/// `(fullPath, requestTimeout)` of each `<configuration><system.webServer><fastCgi><application>`.
fn fastcgi_applications(xml: &[u8]) -> Result<Vec<(String, Option<String>)>, String> {
    let mut found = Vec::new();
    let fastcgi: [&[u8]; 3] = [b"configuration", b"system.webServer", b"fastCgi"];
    crate::config::for_each_child(xml, &fastcgi, |element| {
        if element.name().as_ref() != b"application" {
            return Ok(());
        }
        let mut full_path = String::new();
        let mut timeout = None;
        for attr in element.attributes().flatten() {
            let value = attr
                .unescape_value()
                .map_err(|e| format!("bad attribute value: {e}"))?
                .into_owned();
            match attr.key.as_ref() {
                b"fullPath" => full_path = value,
                b"requestTimeout" => timeout = Some(value),
                _ => {}
            }
        }
        found.push((full_path, timeout));
        Ok(())
    })?;
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_fastcgi_applications_request_timeout() {
        let xml = br#"<?xml version="1.0"?>
            <configuration>
              <system.webServer>
                <handlers><add name="x" requestTimeout="5" /></handlers>
                <fastCgi>
                  <application fullPath="C:\other.exe" requestTimeout="30" />
                  <application fullPath="C:\wfastcgi\wfastcgi.exe" requestTimeout="120">
                    <environmentVariables />
                  </application>
                </fastCgi>
              </system.webServer>
            </configuration>"#;
        assert_eq!(
            fastcgi_applications(xml).expect("parses"),
            vec![
                ("C:\\other.exe".to_owned(), Some("30".to_owned())),
                (
                    "C:\\wfastcgi\\wfastcgi.exe".to_owned(),
                    Some("120".to_owned())
                ),
            ]
        );
    }
}
