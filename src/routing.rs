//! SCRIPT_NAME and PATH_INFO: where the application is mounted and what path it is asked for.
//!
//! Pure functions of the request parameters and two app settings, so every rule is unit-tested
//! with IIS parameter sets (and fuzzed). Two families of front end:
//!
//! **IIS** (the request has `APPL_MD_PATH`, or `SERVER_SOFTWARE` is `Microsoft-IIS/...`). IIS sends
//! the whole URL path in both SCRIPT_NAME and PATH_INFO, converted with the system code page.
//! 1. The path comes from `UNENCODED_URL` when present (raw, percent-decoded here to bytes, so
//!    non-ASCII survives the code page), else `HTTP_X_ORIGINAL_URL` (URL Rewrite's original URL),
//!    else PATH_INFO; the query part is cut off.
//! 2. SCRIPT_NAME is emptied unless the app setting `AllowPathInfoForScriptMappings` exists, in
//!    which case IIS's SCRIPT_NAME is trusted as sent (wfastcgi.py's rule).
//! 3. Beyond wfastcgi.py: in an IIS sub-application (`APPL_MD_PATH` = `/LM/W3SVC/<n>/ROOT/<app>`)
//!    SCRIPT_NAME becomes `/<app>` and PATH_INFO the rest.
//!
//! **Others** (nginx, Apache, lighttpd): SCRIPT_NAME and PATH_INFO are taken as sent. When PATH_INFO
//! is missing (nginx's stock `fastcgi_params` sends none) the app is taken as mounted at the root:
//! PATH_INFO is the percent-decoded path of REQUEST_URI (else SCRIPT_NAME) and SCRIPT_NAME is empty.
//!
//! Last, for both: an app setting `SCRIPT_NAME` that prefixes the full path (without regard to
//! case, ending at a `/` or at the end) is split off into SCRIPT_NAME. Unlike wfastcgi.py, `/app`
//! does not split `/apple`.

use bytes::Bytes;

use crate::protocol::Params;

/// The app settings that move the mount point.
#[derive(Debug, Clone, Copy, Default)]
pub struct RouteSettings<'a> {
    pub allow_path_info_for_script_mappings: bool,
    pub script_name: Option<&'a str>,
}

/// The paths handed to the application, as raw bytes (the environ decodes them as ISO-8859-1).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    pub script_name: Bytes,
    pub path_info: Bytes,
}

pub fn is_iis(params: &Params) -> bool {
    params.get(b"APPL_MD_PATH").is_some()
        || params
            .get(b"SERVER_SOFTWARE")
            .is_some_and(|s| s.starts_with(b"Microsoft-IIS"))
}

pub fn route(params: &Params, settings: &RouteSettings<'_>) -> Route {
    let route = if is_iis(params) {
        iis_route(params, settings)
    } else {
        cgi_route(params)
    };
    match settings.script_name {
        Some(mount) => split_mount_point(route, mount.as_bytes()),
        None => route,
    }
}

fn iis_route(params: &Params, settings: &RouteSettings<'_>) -> Route {
    let path_info = if let Some(raw) = params.get(b"UNENCODED_URL") {
        percent_decode(without_query(raw))
    } else {
        let path = params
            .value(b"HTTP_X_ORIGINAL_URL")
            .or_else(|| params.value(b"PATH_INFO"))
            .unwrap_or_default();
        path.slice(..without_query(&path).len())
    };
    if settings.allow_path_info_for_script_mappings {
        return Route {
            script_name: params.value(b"SCRIPT_NAME").unwrap_or_default(),
            path_info,
        };
    }
    let whole = Route {
        script_name: Bytes::new(),
        path_info,
    };
    match params.get(b"APPL_MD_PATH").and_then(|p| sub_application(p)) {
        Some(app) => split_mount_point(whole, app),
        None => whole,
    }
}

fn cgi_route(params: &Params) -> Route {
    if let Some(path_info) = params.value(b"PATH_INFO") {
        return Route {
            script_name: params.value(b"SCRIPT_NAME").unwrap_or_default(),
            path_info,
        };
    }
    let path_info = match params.get(b"REQUEST_URI") {
        Some(uri) => percent_decode(without_query(uri)),
        None => params.value(b"SCRIPT_NAME").unwrap_or_default(),
    };
    Route {
        script_name: Bytes::new(),
        path_info,
    }
}

/// The sub-application's virtual path in an IIS metabase path: `/LM/W3SVC/1/ROOT/shop` gives
/// `/shop`; the site root (`.../ROOT`) gives `None`.
pub fn sub_application(appl_md_path: &[u8]) -> Option<&[u8]> {
    const ROOT: &[u8] = b"/root";
    let start = appl_md_path
        .windows(ROOT.len())
        .position(|w| w.eq_ignore_ascii_case(ROOT))?
        + ROOT.len();
    let app = appl_md_path[start..]
        .strip_suffix(b"/")
        .unwrap_or(&appl_md_path[start..]);
    (app.len() > 1 && app[0] == b'/').then_some(app)
}

/// Moves `mount` from the front of the full path into SCRIPT_NAME when it is a prefix that ends
/// at a segment boundary. SCRIPT_NAME keeps the request's own spelling of the prefix.
fn split_mount_point(route: Route, mount: &[u8]) -> Route {
    let mount = mount.strip_suffix(b"/").unwrap_or(mount);
    let full = if route.script_name.is_empty() {
        route.path_info.clone()
    } else {
        Bytes::from([&route.script_name[..], &route.path_info[..]].concat())
    };
    let boundary = full.len() == mount.len() || full.get(mount.len()) == Some(&b'/');
    if mount.is_empty() || !boundary || !full[..mount.len()].eq_ignore_ascii_case(mount) {
        return route;
    }
    Route {
        script_name: full.slice(..mount.len()),
        path_info: full.slice(mount.len()..),
    }
}

fn without_query(uri: &[u8]) -> &[u8] {
    uri.split(|&b| b == b'?').next().unwrap_or(uri)
}

/// `%XX` to the byte it names; a `%` not followed by two hex digits stays as it is.
pub fn percent_decode(input: &[u8]) -> Bytes {
    if !input.contains(&b'%') {
        return Bytes::copy_from_slice(input);
    }
    let mut out = Vec::with_capacity(input.len());
    let mut i = 0;
    while i < input.len() {
        let escaped = (input[i] == b'%')
            .then(|| input.get(i + 1..i + 3))
            .flatten()
            .and_then(|hex| Some(hex_value(hex[0])? << 4 | hex_value(hex[1])?));
        match escaped {
            Some(byte) => {
                out.push(byte);
                i += 3;
            }
            None => {
                out.push(input[i]);
                i += 1;
            }
        }
    }
    Bytes::from(out)
}

fn hex_value(digit: u8) -> Option<u8> {
    (digit as char).to_digit(16).map(|v| v as u8)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(pairs: &[(&str, &str)]) -> Params {
        let mut params = Params::default();
        for (name, value) in pairs {
            params.push(name.as_bytes(), value.as_bytes());
        }
        params
    }

    /// What IIS 10 sends for a script-mapped site at the root of site 1.
    fn iis(url_path: &str, extra: &[(&str, &str)]) -> Params {
        let mut pairs = vec![
            ("URL", url_path),
            ("SERVER_SOFTWARE", "Microsoft-IIS/10.0"),
            ("SCRIPT_NAME", url_path),
            ("PATH_INFO", url_path),
            ("REQUEST_URI", url_path),
            ("APPL_PHYSICAL_PATH", "C:\\inetpub\\site\\"),
            ("APPL_MD_PATH", "/LM/W3SVC/1/ROOT"),
        ];
        pairs.retain(|(name, _)| !extra.iter().any(|(n, _)| n == name));
        pairs.extend_from_slice(extra);
        params(&pairs)
    }

    fn routed(params: &Params, settings: RouteSettings<'_>) -> (String, String) {
        let route = route(params, &settings);
        (
            String::from_utf8_lossy(&route.script_name).into_owned(),
            String::from_utf8_lossy(&route.path_info).into_owned(),
        )
    }

    fn pair(script_name: &str, path_info: &str) -> (String, String) {
        (script_name.to_owned(), path_info.to_owned())
    }

    #[test]
    fn iis_root_site_clears_script_name() {
        let p = iis("/polls/3/", &[]);
        assert_eq!(routed(&p, RouteSettings::default()), pair("", "/polls/3/"));
    }

    #[test]
    fn iis_allow_path_info_keeps_script_name() {
        let p = iis("/handler.fcgi", &[("PATH_INFO", "/rest")]);
        let settings = RouteSettings {
            allow_path_info_for_script_mappings: true,
            ..Default::default()
        };
        assert_eq!(routed(&p, settings), pair("/handler.fcgi", "/rest"));
    }

    #[test]
    fn iis_original_url_replaces_rewritten_path_and_loses_query() {
        let p = iis(
            "/handler.fcgi/polls",
            &[("HTTP_X_ORIGINAL_URL", "/polls/?page=2")],
        );
        assert_eq!(routed(&p, RouteSettings::default()), pair("", "/polls/"));
    }

    #[test]
    fn iis_unencoded_url_keeps_non_ascii_bytes() {
        // The code page turned "é" into "?" in the decoded variables; the raw URL has it right.
        let p = iis(
            "/caf?",
            &[
                ("UNENCODED_URL", "/caf%C3%A9?x=1"),
                ("HTTP_X_ORIGINAL_URL", "/caf?"),
            ],
        );
        let route = route(&p, &RouteSettings::default());
        assert_eq!(&route.path_info[..], "/café".as_bytes());
    }

    #[test]
    fn iis_sub_application_moves_its_path_to_script_name() {
        let p = iis("/koo/blurb", &[("APPL_MD_PATH", "/LM/W3SVC/2/Root/koo")]);
        assert_eq!(routed(&p, RouteSettings::default()), pair("/koo", "/blurb"));
        let p = iis("/KOO", &[("APPL_MD_PATH", "/lm/w3svc/2/root/koo/")]);
        assert_eq!(routed(&p, RouteSettings::default()), pair("/KOO", ""));
        let p = iis("/kook/x", &[("APPL_MD_PATH", "/LM/W3SVC/2/ROOT/koo")]);
        assert_eq!(routed(&p, RouteSettings::default()), pair("", "/kook/x"));
    }

    #[test]
    fn nested_sub_application() {
        assert_eq!(sub_application(b"/LM/W3SVC/1/ROOT/a/b"), Some(&b"/a/b"[..]));
        assert_eq!(sub_application(b"/LM/W3SVC/1/ROOT"), None);
        assert_eq!(sub_application(b"/LM/W3SVC/1/ROOT/"), None);
        assert_eq!(sub_application(b"garbage"), None);
    }

    #[test]
    fn script_name_setting_splits_case_insensitively_at_a_boundary() {
        let settings = RouteSettings {
            script_name: Some("/App"),
            ..Default::default()
        };
        assert_eq!(routed(&iis("/app/x", &[]), settings), pair("/app", "/x"));
        assert_eq!(routed(&iis("/apple", &[]), settings), pair("", "/apple"));
        assert_eq!(routed(&iis("/app", &[]), settings), pair("/app", ""));
    }

    #[test]
    fn script_name_setting_overrides_sub_application() {
        let p = iis("/koo/sub/x", &[("APPL_MD_PATH", "/LM/W3SVC/2/ROOT/koo")]);
        let settings = RouteSettings {
            script_name: Some("/koo/sub/"),
            ..Default::default()
        };
        assert_eq!(routed(&p, settings), pair("/koo/sub", "/x"));
    }

    #[test]
    fn cgi_front_end_paths_are_kept() {
        let p = params(&[
            ("SCRIPT_NAME", "/app"),
            ("PATH_INFO", "/x"),
            ("REQUEST_URI", "/app/x"),
        ]);
        assert_eq!(routed(&p, RouteSettings::default()), pair("/app", "/x"));
    }

    #[test]
    fn nginx_without_path_info_mounts_at_root() {
        let p = params(&[
            ("SCRIPT_NAME", "/caf\u{e9}/x"),
            ("REQUEST_URI", "/caf%C3%A9/x?q=1"),
        ]);
        let route = route(&p, &RouteSettings::default());
        assert!(route.script_name.is_empty());
        assert_eq!(&route.path_info[..], "/café/x".as_bytes());
        let p = params(&[("SCRIPT_NAME", "/only")]);
        assert_eq!(routed(&p, RouteSettings::default()), pair("", "/only"));
    }

    #[test]
    fn percent_decoding_keeps_bad_escapes() {
        assert_eq!(&percent_decode(b"/a%2Fb%zz%4")[..], b"/a/b%zz%4");
        assert_eq!(&percent_decode(b"%")[..], b"%");
        assert_eq!(&percent_decode(b"%ff")[..], b"\xff");
    }
}
