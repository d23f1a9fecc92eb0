//! The `wfastcgi` command.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

use wfastcgi::gateway::{self, Options};
#[cfg(unix)]
use wfastcgi::supervisor;
use wfastcgi::transport::server::{StdinError, Transport};
use wfastcgi::{iis, logging};

/// A FastCGI-to-WSGI gateway for IIS, nginx, Apache and lighttpd that embeds CPython.
///
/// Without a command it serves as IIS starts it: requests arrive on standard input (a duplex
/// pipe or a listening socket), and the application is the one named by WSGI_HANDLER in the
/// web.config of the first request's APPL_PHYSICAL_PATH.
#[derive(Parser)]
// Options given before a command would apply to nothing: refused.
#[command(
    name = "wfastcgi",
    version,
    about,
    long_about,
    args_conflicts_with_subcommands = true
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    app: AppArgs,
}

#[derive(Subcommand)]
enum Command {
    /// Check a site before IIS (or nginx) runs it: the settings in effect, the virtualenv and
    /// Python, whether WSGI_HANDLER loads, the log file, the web.config handler. Exits 1 when
    /// something would fail.
    Check {
        /// The app folder, or its web.config (default: the working directory).
        target: Option<PathBuf>,
        /// The app folder (the same as TARGET).
        #[arg(long, value_name = "DIR", conflicts_with = "target")]
        app_dir: Option<PathBuf>,
        /// A virtualenv to run the application in (as WSGI_VENV).
        #[arg(long, value_name = "DIR")]
        venv: Option<PathBuf>,
        /// Also send one GET for this path (and query) through the real handler.
        #[arg(long, value_name = "/PATH")]
        request: Option<String>,
    },
    /// Register this binary with IIS as a FastCGI application (appcmd), and print the
    /// scriptProcessor value and a <handlers> entry to use.
    Enable(Registration),
    /// Remove the registration `enable` made.
    Disable(Registration),
    /// Print configuration files.
    Config {
        /// A complete web.config for the Django project whose settings are PROJECT.settings.
        #[arg(long, value_name = "PROJECT")]
        django: String,
        /// The virtualenv to name in WSGI_VENV.
        #[arg(long, value_name = "DIR")]
        venv: Option<String>,
    },
    /// Serve FastCGI on standard input, or on a socket given with --bind.
    Serve {
        /// `HOST:PORT` or `unix:/path/to/socket`.
        #[arg(long, value_name = "ADDR")]
        bind: Option<String>,
        /// File mode of a Unix socket (`--bind unix:PATH`), in octal [default: 0660].
        #[arg(long, value_name = "MODE", value_parser = parse_mode)]
        socket_mode: Option<u32>,
        /// Run N worker processes under a supervisor that holds the socket.
        #[arg(long, value_name = "N", value_parser = clap::value_parser!(u16).range(1..))]
        processes: Option<u16>,
        // Boxed: the operations' options make it much larger than the other commands.
        #[command(flatten)]
        app: Box<AppArgs>,
    },
}

#[cfg(unix)]
impl AppArgs {
    /// The same options for a worker process, with the app folder made absolute.
    fn worker_args(&self) -> Vec<std::ffi::OsString> {
        let mut args = Vec::new();
        let app_dir = self
            .app_dir
            .clone()
            .or_else(|| std::env::current_dir().ok());
        if let Some(dir) = app_dir.and_then(|d| d.canonicalize().ok()) {
            args.extend(["--app-dir".into(), dir.into_os_string()]);
        }
        if let Some(venv) = &self.venv {
            args.extend(["--venv".into(), venv.clone().into_os_string()]);
        }
        if let Some(threads) = self.threads {
            args.extend(["--threads".into(), threads.to_string().into()]);
        }
        if let Some(interface) = &self.interface {
            args.extend(["--interface".into(), interface.into()]);
        }
        args.extend(self.ops.args());
        args
    }
}

impl AppArgs {
    /// The settings given as options.
    fn settings(&self) -> Vec<(String, String)> {
        let mut settings = self.ops.overrides();
        if let Some(interface) = &self.interface {
            settings.push(("WSGI_INTERFACE".to_owned(), interface.clone()));
        }
        settings
    }
}

#[derive(Args)]
struct Registration {
    /// Print the appcmd argument vector, one per line, instead of running it.
    #[arg(long)]
    dry_run: bool,
    /// An argument IIS passes to this binary (repeat for several).
    #[arg(long = "arg", value_name = "ARG", allow_hyphen_values = true)]
    args: Vec<String>,
    /// The appcmd command line to use instead of %windir%\system32\inetsrv\appcmd.exe
    /// (IIS Express: "C:\Program Files\IIS Express\appcmd.exe" /apphostconfig:FILE).
    #[arg(
        trailing_var_arg = true,
        allow_hyphen_values = true,
        value_name = "APPCMD"
    )]
    appcmd: Vec<String>,
}

#[derive(Args, Clone, Default)]
struct AppArgs {
    /// The application folder (holding web.config); default: IIS's APPL_PHYSICAL_PATH, else the
    /// working directory.
    #[arg(long, value_name = "DIR")]
    app_dir: Option<PathBuf>,
    /// A virtualenv to run the application in (as WSGI_VENV).
    #[arg(long, value_name = "DIR")]
    venv: Option<PathBuf>,
    /// Python worker threads (as WSGI_THREADS); default 1 under IIS, 4 with --bind.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u16).range(1..))]
    threads: Option<u16>,
    /// The application's interface, when telling it from the handler is not wanted (as
    /// WSGI_INTERFACE): an ASGI 3 application is otherwise a coroutine function.
    #[arg(long, value_parser = ["wsgi", "asgi"])]
    interface: Option<String>,
    #[command(flatten)]
    ops: wfastcgi::ops::OpsArgs,
}

#[cfg(unix)]
fn activation_transport() -> Option<Transport> {
    Transport::from_activation()
}

#[cfg(not(unix))]
fn activation_transport() -> Option<Transport> {
    None
}

fn parse_mode(text: &str) -> Result<u32, String> {
    u32::from_str_radix(text.trim_start_matches("0o"), 8)
        .ok()
        .filter(|mode| *mode <= 0o777)
        .ok_or_else(|| format!("{text:?} is not an octal file mode such as 0660"))
}

/// The commands that do not serve.
fn tool(command: Command) -> ExitCode {
    let result = match command {
        Command::Check {
            target,
            app_dir,
            venv,
            request,
        } => {
            let options = Options {
                venv,
                ..Options::default()
            };
            let fine =
                wfastcgi::check::run(target.or(app_dir), options.overrides(), request.as_deref());
            return if fine {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            };
        }
        Command::Enable(r) => {
            iis::register(iis::Registration::Enable, &r.appcmd, &r.args, r.dry_run)
        }
        Command::Disable(r) => {
            iis::register(iis::Registration::Disable, &r.appcmd, &r.args, r.dry_run)
        }
        Command::Config { django, venv } => std::env::current_exe()
            .map(|exe| {
                let xml = iis::django_web_config(&django, &exe.to_string_lossy(), venv.as_deref());
                wfastcgi::outln!("{}", xml.trim_end_matches('\n'))
            })
            .map_err(Into::into),
        Command::Serve { .. } => unreachable!("serving is not a tool"),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("wfastcgi: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let (bind, socket_mode, processes, app) = match cli.command {
        Some(Command::Serve {
            bind,
            socket_mode,
            processes,
            app,
        }) => (bind, socket_mode, processes, *app),
        None => (None, None, None, cli.app),
        Some(tool_command) => return tool(tool_command),
    };
    if socket_mode.is_some() && !bind.as_deref().is_some_and(|b| b.starts_with("unix:")) {
        eprintln!(
            "wfastcgi: --socket-mode is the file mode of a Unix socket; it needs --bind unix:PATH"
        );
        return ExitCode::from(2);
    }
    #[cfg(unix)]
    let supervised = std::env::var_os(supervisor::LISTEN_FD_VAR).is_some();
    #[cfg(not(unix))]
    let supervised = false;
    // A socket passed by systemd, or by this binary restarting itself, wins over --bind.
    let activated = activation_transport();
    let transport = match (activated, &bind) {
        (Some(transport), _) => Ok(transport),
        (None, Some(address)) => Transport::bind(address, socket_mode.unwrap_or(0o660)),
        (None, None) => Transport::from_stdin().map_err(|e| match e {
            StdinError::Terminal => anyhow::anyhow!(
                "standard input is a terminal, not a FastCGI connection.\n\
                 IIS starts wfastcgi with a pipe on standard input; to serve by hand, run\n  \
                 wfastcgi serve --bind 127.0.0.1:9000 --app-dir DIR\n\
                 (see wfastcgi --help)"
            ),
            StdinError::NotASocket => anyhow::anyhow!(
                "standard input is not a socket: wfastcgi reads FastCGI records from a duplex \
                 pipe or socket on standard input, or from --bind ADDR"
            ),
            StdinError::SynchronousPipe => anyhow::anyhow!(
                "standard input is a pipe opened for synchronous I/O, not the overlapped duplex \
                 named pipe IIS creates: start wfastcgi.exe from IIS (scriptProcessor), or serve \
                 a socket with --bind ADDR"
            ),
            StdinError::Io(e) => anyhow::anyhow!("cannot inspect standard input: {e}"),
        }),
    };
    let transport = match transport {
        Ok(transport) => transport,
        Err(e) => {
            logging::report_startup_failure(&format!("wfastcgi: {e:#}"));
            return ExitCode::from(2);
        }
    };
    // Only a server started by hand logs to stderr: IIS gives the process invalid handles.
    logging::init(bind.is_some() && !supervised, tracing::Level::INFO);
    let options = Options {
        app_dir: app.app_dir.clone(),
        venv: app.venv.clone(),
        threads: app.threads.map(usize::from),
        multiprocess: bind.is_none() || supervised || processes.is_some_and(|n| n > 1),
        supervised,
        settings: app.settings(),
    };
    let served = match processes {
        #[cfg(unix)]
        Some(processes) => gateway::supervise(
            transport,
            options,
            usize::from(processes),
            app.worker_args(),
        ),
        #[cfg(not(unix))]
        Some(_) => Err(anyhow::anyhow!(
            "--processes is not available on Windows: IIS runs maxInstances processes"
        )),
        None => gateway::serve(transport, options),
    };
    match served {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            logging::flush();
            if bind.is_some() {
                eprintln!("wfastcgi: {e:#}");
            }
            ExitCode::FAILURE
        }
    }
}
