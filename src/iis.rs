//! IIS tooling: registering the binary as a FastCGI application (`enable`/`disable`), a starting
//! `web.config` for a Django project, and reading a `web.config`'s FastCGI handler entry.
//!
//! The appcmd command line is built by pure functions, so what would run on Windows is tested on
//! Linux through `--dry-run`.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

/// Seconds IIS waits after signalling the shutdown event before it kills the process; what
/// wfastcgi.py's enable command registers.
const SIGNAL_BEFORE_TERMINATE_SECONDS: u32 = 30;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Registration {
    Enable,
    Disable,
}

/// The FastCGI application as IIS identifies it: `fullPath` and `arguments`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FastCgiApp {
    pub full_path: String,
    pub arguments: String,
}

impl FastCgiApp {
    /// The application for `exe` started with `args`. An argument with a space or a quote is
    /// wrapped in double quotes, so IIS passes it as one argument (wfastcgi.py did not).
    pub fn new(exe: &Path, args: &[String]) -> Result<FastCgiApp> {
        let full_path = exe.to_string_lossy().into_owned();
        let arguments = args
            .iter()
            .map(|arg| {
                if arg.contains('"') {
                    bail!("argument {arg:?} contains a double quote, which IIS cannot pass");
                }
                Ok(if arg.is_empty() || arg.contains(char::is_whitespace) {
                    format!("\"{arg}\"")
                } else {
                    arg.clone()
                })
            })
            .collect::<Result<Vec<_>>>()?
            .join(" ");
        for value in [&full_path, &arguments] {
            if value.contains('\'') {
                bail!("{value:?} contains a single quote, which appcmd's syntax cannot hold");
            }
        }
        Ok(FastCgiApp {
            full_path,
            arguments,
        })
    }

    /// The `scriptProcessor` value a handler uses to reach this application.
    pub fn script_processor(&self) -> String {
        if self.arguments.is_empty() {
            self.full_path.clone()
        } else {
            format!("{}|{}", self.full_path, self.arguments)
        }
    }

    /// A `<handlers>` entry sending every request of a site to this application.
    pub fn handlers_snippet(&self) -> String {
        format!(
            "<handlers>\n  <add name=\"Python_FastCGI\" path=\"*\" verb=\"*\" modules=\"FastCgiModule\"\n       \
             scriptProcessor=\"{}\"\n       resourceType=\"Unspecified\" requireAccess=\"Script\"\n       \
             responseBufferLimit=\"0\" />\n</handlers>",
            xml_escape(&self.script_processor())
        )
    }
}

/// `%windir%\system32\inetsrv\appcmd.exe`.
pub fn default_appcmd() -> PathBuf {
    let windir = std::env::var("windir")
        .or_else(|_| std::env::var("WINDIR"))
        .unwrap_or_else(|_| "C:\\Windows".to_owned());
    PathBuf::from(format!("{windir}\\system32\\inetsrv\\appcmd.exe"))
}

/// The appcmd argument vector. `appcmd` is the command to run: appcmd.exe by default, or the
/// command line the user gave (IIS Express: `appcmd.exe /apphostconfig:<file>`).
pub fn appcmd_argv(appcmd: &[String], app: &FastCgiApp, registration: Registration) -> Vec<String> {
    let (sign, extra) = match registration {
        Registration::Enable => (
            '+',
            format!(", signalBeforeTerminateSeconds='{SIGNAL_BEFORE_TERMINATE_SECONDS}'"),
        ),
        Registration::Disable => ('-', String::new()),
    };
    let mut argv = appcmd.to_vec();
    argv.extend([
        "set".to_owned(),
        "config".to_owned(),
        "/section:system.webServer/fastCGI".to_owned(),
        format!(
            "/{sign}[fullPath='{}', arguments='{}'{extra}]",
            app.full_path, app.arguments
        ),
    ]);
    argv
}

/// `wfastcgi enable|disable [APPCMD ARGS...] [-- ARGS...]`: as wfastcgi.py, a first argument
/// that is an existing file makes the given command line the appcmd command.
pub fn register(
    registration: Registration,
    command: &[String],
    app_args: &[String],
    dry_run: bool,
) -> Result<()> {
    let exe = std::env::current_exe().context("cannot find this binary")?;
    let app = FastCgiApp::new(&exe, app_args)?;
    let appcmd: Vec<String> = match command.first() {
        Some(first) if Path::new(first).is_file() => command.to_vec(),
        Some(first) => bail!(
            "{first} is not a file: give the path of appcmd.exe (and its options), or nothing"
        ),
        None => vec![default_appcmd().to_string_lossy().into_owned()],
    };
    let argv = appcmd_argv(&appcmd, &app, registration);
    if dry_run {
        for arg in &argv {
            crate::outln!("{arg}");
        }
        crate::outln!("\nAs one line for cmd:\n{}", cmd_line(&argv));
    } else {
        let output = Command::new(&argv[0])
            .args(&argv[1..])
            .output()
            .with_context(|| {
                format!(
                    "cannot run {}: is IIS installed with its CGI feature?",
                    argv[0]
                )
            })?;
        let text = String::from_utf8_lossy(&output.stdout);
        if !text.is_empty() {
            crate::outln!("{}", text.trim_end_matches(['\r', '\n']));
        }
        if !output.status.success() {
            eprint!("{}", String::from_utf8_lossy(&output.stderr));
            let code = output
                .status
                .code()
                .map_or_else(|| "a signal".to_owned(), |c| c.to_string());
            bail!("{} failed with exit code {code}", argv[0]);
        }
    }
    if registration == Registration::Enable {
        crate::outln!("\nscriptProcessor=\"{}\"\n", app.script_processor());
        crate::outln!("{}", app.handlers_snippet());
    }
    Ok(())
}

/// `argv` as one line to paste into cmd.exe: each argument quoted as Windows programs split
/// their command line (the rules `std::process::Command` quotes by), then cmd's own special
/// characters escaped with `^` where cmd's quoting (toggled by every `"`) leaves them exposed.
pub fn cmd_line(argv: &[String]) -> String {
    let mut line = String::new();
    for arg in argv {
        if !line.is_empty() {
            line.push(' ');
        }
        if !arg.is_empty() && !arg.contains([' ', '\t', '"']) {
            line.push_str(arg);
            continue;
        }
        line.push('"');
        let mut backslashes = 0;
        for c in arg.chars() {
            if c == '\\' {
                backslashes += 1;
                continue;
            }
            // Backslashes are literal unless they precede a quote.
            let escapes = if c == '"' {
                2 * backslashes + 1
            } else {
                backslashes
            };
            line.extend(std::iter::repeat_n('\\', escapes));
            line.push(c);
            backslashes = 0;
        }
        line.extend(std::iter::repeat_n('\\', 2 * backslashes));
        line.push('"');
    }
    let mut quoted = false;
    let mut escaped = String::with_capacity(line.len());
    for c in line.chars() {
        if c == '"' {
            quoted = !quoted;
        } else if !quoted && "&|<>^()".contains(c) {
            escaped.push('^');
        }
        escaped.push(c);
    }
    escaped
}

/// A complete `web.config` for a Django project `project` (its settings module is
/// `<project>.settings`), served through `script_processor`.
pub fn django_web_config(project: &str, script_processor: &str, venv: Option<&str>) -> String {
    let venv = venv
        .map(|v| {
            format!(
                "    <add key=\"WSGI_VENV\" value=\"{}\" />\n",
                xml_escape(v)
            )
        })
        .unwrap_or_default();
    format!(
        r#"<?xml version="1.0" encoding="utf-8"?>
<configuration>
  <appSettings>
    <add key="WSGI_HANDLER" value="django.core.wsgi.get_wsgi_application()" />
    <add key="DJANGO_SETTINGS_MODULE" value="{project}.settings" />
{venv}    <add key="WSGI_LOG" value="wfastcgi.log" />
  </appSettings>
  <system.webServer>
    <handlers>
      <!-- Every request goes to Django; responseBufferLimit="0" lets responses stream. -->
      <add name="Python_FastCGI" path="*" verb="*" modules="FastCgiModule"
           scriptProcessor="{script_processor}"
           resourceType="Unspecified" requireAccess="Script"
           responseBufferLimit="0" />
    </handlers>
  </system.webServer>
  <!-- IIS serves the files `manage.py collectstatic` puts in STATIC_ROOT (static/). -->
  <location path="static">
    <system.webServer>
      <handlers>
        <remove name="Python_FastCGI" />
      </handlers>
    </system.webServer>
  </location>
</configuration>
"#,
        project = xml_escape(project),
        script_processor = xml_escape(script_processor),
    )
}

fn xml_escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('"', "&quot;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// A FastCGI handler entry of a `web.config` (`<system.webServer><handlers><add>`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HandlerEntry {
    pub name: String,
    pub script_processor: String,
    pub response_buffer_limit: Option<String>,
}

/// The FastCGI handler entries directly under `<configuration><system.webServer><handlers>`.
pub fn fastcgi_handlers(xml: &[u8]) -> Result<Vec<HandlerEntry>, String> {
    let mut entries = Vec::new();
    let handlers: [&[u8]; 3] = [b"configuration", b"system.webServer", b"handlers"];
    crate::config::for_each_child(xml, &handlers, |element| {
        if element.name().as_ref() != b"add" {
            return Ok(());
        }
        let attribute = |name: &[u8]| {
            element
                .attributes()
                .flatten()
                .find(|a| a.key.as_ref().eq_ignore_ascii_case(name))
                .and_then(|a| a.unescape_value().ok().map(|v| v.into_owned()))
        };
        let modules = attribute(b"modules").unwrap_or_default();
        if modules.eq_ignore_ascii_case("FastCgiModule") {
            entries.push(HandlerEntry {
                name: attribute(b"name").unwrap_or_default(),
                script_processor: attribute(b"scriptProcessor").unwrap_or_default(),
                response_buffer_limit: attribute(b"responseBufferLimit"),
            });
        }
        Ok(())
    })?;
    Ok(entries)
}

/// Whether a `scriptProcessor` value names `exe` (Windows paths compare without regard to case).
pub fn points_at(script_processor: &str, exe: &Path) -> bool {
    let full_path = script_processor
        .split('|')
        .next()
        .unwrap_or_default()
        .trim();
    let exe = exe.to_string_lossy();
    full_path.eq_ignore_ascii_case(&exe)
        || Path::new(full_path)
            .canonicalize()
            .is_ok_and(|p| p.to_string_lossy().eq_ignore_ascii_case(&exe))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cmd_line_quotes_for_the_program_and_escapes_for_cmd() {
        let argv: Vec<String> = [
            r"C:\Program Files\IIS Express\appcmd.exe",
            "set",
            r#"/+[fullPath='C:\a b\w.exe', arguments='--venv "C:\My Site\venv\"']"#,
            r"C:\R&D\",
            "",
        ]
        .map(String::from)
        .to_vec();
        assert_eq!(
            cmd_line(&argv),
            r#""C:\Program Files\IIS Express\appcmd.exe" set "/+[fullPath='C:\a b\w.exe', arguments='--venv \"C:\My Site\venv\\\"']" C:\R^&D\ """#
        );
    }

    fn app(exe: &str, args: &[&str]) -> FastCgiApp {
        let args: Vec<String> = args.iter().map(|a| (*a).to_owned()).collect();
        FastCgiApp::new(Path::new(exe), &args).expect("valid")
    }

    #[test]
    fn enable_and_disable_command_lines() {
        let app = app(r"C:\Program Files\wfastcgi\wfastcgi.exe", &[]);
        let appcmd = vec![r"C:\Windows\system32\inetsrv\appcmd.exe".to_owned()];
        assert_eq!(
            appcmd_argv(&appcmd, &app, Registration::Enable),
            [
                r"C:\Windows\system32\inetsrv\appcmd.exe",
                "set",
                "config",
                "/section:system.webServer/fastCGI",
                r"/+[fullPath='C:\Program Files\wfastcgi\wfastcgi.exe', arguments='', signalBeforeTerminateSeconds='30']",
            ]
        );
        assert_eq!(
            appcmd_argv(&appcmd, &app, Registration::Disable)[4],
            r"/-[fullPath='C:\Program Files\wfastcgi\wfastcgi.exe', arguments='']"
        );
        assert_eq!(
            app.script_processor(),
            r"C:\Program Files\wfastcgi\wfastcgi.exe"
        );
    }

    #[test]
    fn arguments_with_spaces_are_quoted() {
        let app = app(r"C:\w\wfastcgi.exe", &["--venv", r"C:\My Sites\venv"]);
        assert_eq!(app.arguments, r#"--venv "C:\My Sites\venv""#);
        assert_eq!(
            app.script_processor(),
            r#"C:\w\wfastcgi.exe|--venv "C:\My Sites\venv""#
        );
        assert!(app
            .handlers_snippet()
            .contains("&quot;C:\\My Sites\\venv&quot;"));
        let quote = FastCgiApp::new(Path::new(r"C:\it's\wfastcgi.exe"), &[]);
        assert!(quote.is_err());
    }

    #[test]
    fn finds_fastcgi_handlers() {
        let xml = br#"<configuration><system.webServer><handlers>
            <remove name="x"/>
            <add name="Python_FastCGI" path="*" verb="*" modules="FastCgiModule"
                 scriptProcessor="C:\w\wfastcgi.exe" responseBufferLimit="0"/>
            <add name="static" path="*.css" modules="StaticFileModule"/>
          </handlers></system.webServer>
          <location path="static"><system.webServer><handlers>
            <add name="other" modules="FastCgiModule" scriptProcessor="elsewhere"/>
          </handlers></system.webServer></location></configuration>"#;
        let handlers = fastcgi_handlers(xml).expect("parses");
        assert_eq!(
            handlers,
            [HandlerEntry {
                name: "Python_FastCGI".into(),
                script_processor: r"C:\w\wfastcgi.exe".into(),
                response_buffer_limit: Some("0".into()),
            }]
        );
        assert!(points_at(
            r"c:\W\WFASTCGI.exe|--x",
            Path::new(r"C:\w\wfastcgi.exe")
        ));
        assert!(!points_at(
            r"C:\Python\python.exe|C:\w\wfastcgi.py",
            Path::new(r"C:\w\wfastcgi.exe")
        ));
    }

    #[test]
    fn django_web_config_is_valid_and_complete() {
        let xml = django_web_config("mysite", r"C:\w\wfastcgi.exe", Some(r"C:\site\.venv"));
        let settings = crate::config::parse_app_settings(xml.as_bytes()).expect("valid XML");
        let get = |k: &str| {
            settings
                .iter()
                .find(|(key, _)| key == k)
                .map(|(_, v)| v.as_str())
        };
        assert_eq!(
            get("WSGI_HANDLER"),
            Some("django.core.wsgi.get_wsgi_application()")
        );
        assert_eq!(get("DJANGO_SETTINGS_MODULE"), Some("mysite.settings"));
        assert_eq!(get("WSGI_VENV"), Some(r"C:\site\.venv"));
        let handlers = fastcgi_handlers(xml.as_bytes()).expect("valid XML");
        assert_eq!(handlers[0].response_buffer_limit.as_deref(), Some("0"));
        assert!(xml.contains("<location path=\"static\">"));
    }
}
