//! Transports and the accept loop.
//!
//! - fd 0 a connected duplex stream: IIS's NamedPipe protocol (on Linux, a socketpair or a
//!   connected socket). One connection; the process ends with it.
//! - fd 0 a listening socket: IIS's Tcp protocol, FCGI_LISTENSOCK_FILENO (spawn-fcgi, lighttpd,
//!   mod_fcgid). Told apart from a stream by SO_ACCEPTCONN.
//! - `--bind 127.0.0.1:9000` or `--bind unix:/path`: a socket we bind.
//! - systemd socket activation (`LISTEN_FDS`/`LISTEN_PID`, fd 3). A restart in the listening
//!   modes re-executes the binary the same way, so the socket stays open across it and no
//!   connection is refused.

use std::io;
#[cfg(unix)]
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use socket2::{Domain, Socket, Type};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::task::JoinSet;

use super::connection::{Connection, ServerContext};
#[cfg(target_os = "linux")]
use super::direct::ParkedConnection;
#[cfg(target_os = "linux")]
use super::queue::JobQueue;
#[cfg(target_os = "linux")]
use crate::protocol::Advertised;
use crate::protocol::Session;
use crate::shutdown::{Reason, Shutdown, Trigger};

/// Where requests come from. Holds plain sockets until the runtime takes them over.
pub enum Transport {
    Stream(Socket),
    Listener(Socket),
    /// A listening socket the worker threads accept from too (`acceptor.rs`).
    #[cfg(target_os = "linux")]
    SharedListener(Socket, Handoff),
    /// IIS's named pipe on standard input.
    #[cfg(windows)]
    NamedPipe(std::os::windows::io::OwnedHandle),
}

/// What the I/O thread does for workers that accept connections themselves: it takes back the
/// kept connections they park, and accepts for them when they are all stuck.
#[cfg(target_os = "linux")]
pub struct Handoff {
    pub acceptor: Arc<super::acceptor::Acceptor>,
    pub parked: super::acceptor::Parked,
    /// Whether to accept for workers that are all stuck. Not when other processes accept on
    /// the same socket (`--processes`): a connection waits in the backlog for a free thread
    /// in any of them, rather than in this one's queue (or its 503) while another is idle.
    pub overflow: bool,
}

#[cfg(target_os = "linux")]
/// Lets the workers accept from a listening transport. Returns the transport for the I/O thread
/// to run, the job queue it submits to (now ringing the workers), and the acceptor the workers
/// wait on; other transports come back as they are. `overflow`: see [`Handoff`].
pub fn share(
    transport: Transport,
    jobs: JobQueue,
    allowed_peers: Option<Vec<std::net::IpAddr>>,
    advertised: Advertised,
    overflow: bool,
    send_timeout: Option<std::time::Duration>,
) -> io::Result<(Transport, JobQueue, Option<Arc<super::acceptor::Acceptor>>)> {
    let Transport::Listener(socket) = transport else {
        return Ok((transport, jobs, None));
    };
    let (acceptor, parked) =
        super::acceptor::Acceptor::new(&socket, allowed_peers, advertised, send_timeout)?;
    let jobs = jobs.ringing(acceptor.jobs_ready.clone());
    let handoff = Handoff {
        acceptor: acceptor.clone(),
        parked,
        overflow,
    };
    Ok((
        Transport::SharedListener(socket, handoff),
        jobs,
        Some(acceptor),
    ))
}

/// The first descriptor socket activation passes.
#[cfg(unix)]
const FIRST_FD: i32 = 3;

/// How often the I/O thread looks whether every worker is stuck with connections waiting.
#[cfg(target_os = "linux")]
const OVERFLOW_TICK: Duration = Duration::from_millis(50);

/// Why fd 0 cannot be served.
#[derive(Debug)]
pub enum StdinError {
    /// Started by hand from a terminal: show usage instead of waiting.
    Terminal,
    NotASocket,
    /// Windows: a pipe, but opened for synchronous I/O, not IIS's overlapped one.
    SynchronousPipe,
    Io(io::Error),
}

impl Transport {
    pub fn is_stream(&self) -> bool {
        match self {
            Transport::Stream(_) => true,
            Transport::Listener(_) => false,
            #[cfg(target_os = "linux")]
            Transport::SharedListener(..) => false,
            #[cfg(windows)]
            Transport::NamedPipe(_) => true,
        }
    }

    /// Takes standard input as IIS hands it over on Windows.
    #[cfg(windows)]
    pub fn from_stdin() -> Result<Transport, StdinError> {
        match crate::windows::stdin().map_err(StdinError::Io)? {
            crate::windows::Stdin::NamedPipe(pipe) => Ok(Transport::NamedPipe(pipe)),
            crate::windows::Stdin::Listener(socket) => Ok(Transport::Listener(socket)),
            crate::windows::Stdin::Terminal => Err(StdinError::Terminal),
            crate::windows::Stdin::SynchronousPipe => Err(StdinError::SynchronousPipe),
            crate::windows::Stdin::Other => Err(StdinError::NotASocket),
        }
    }

    /// Takes fd 0 as IIS (or a Unix FastCGI spawner) hands it over.
    #[cfg(unix)]
    pub fn from_stdin() -> Result<Transport, StdinError> {
        use std::os::fd::{FromRawFd, RawFd};
        const STDIN: RawFd = 0;
        // SAFETY: fstat on fd 0 with a zeroed stat buffer of the right type.
        let mut stat: libc::stat = unsafe { std::mem::zeroed() };
        if unsafe { libc::fstat(STDIN, &mut stat) } != 0 {
            return Err(StdinError::Io(io::Error::last_os_error()));
        }
        if stat.st_mode & libc::S_IFMT != libc::S_IFSOCK {
            if unsafe { libc::isatty(STDIN) } == 1 {
                return Err(StdinError::Terminal);
            }
            return Err(StdinError::NotASocket);
        }
        // SAFETY: fd 0 is an open socket that nothing else in this process uses; the Socket
        // becomes its only owner.
        let socket = unsafe { Socket::from_raw_fd(STDIN) };
        let listening = socket.is_listener().map_err(StdinError::Io)?;
        Ok(if listening {
            Transport::Listener(socket)
        } else {
            Transport::Stream(socket)
        })
    }

    /// The socket systemd (or our own restart) passed as fd 3, if `LISTEN_PID` is this process.
    /// The variables are removed so the application's child processes do not see them.
    #[cfg(unix)]
    pub fn from_activation() -> Option<Transport> {
        use std::os::fd::FromRawFd;
        if let Ok(fd) = std::env::var(crate::supervisor::LISTEN_FD_VAR) {
            std::env::remove_var(crate::supervisor::LISTEN_FD_VAR);
            let fd = fd.parse().ok()?;
            // SAFETY: the supervisor passed its listening socket as this descriptor.
            return Some(Transport::Listener(unsafe { Socket::from_raw_fd(fd) }));
        }
        let for_us = std::env::var("LISTEN_PID").ok()?.parse::<u32>().ok()? == std::process::id();
        let count: u32 = std::env::var("LISTEN_FDS").ok()?.parse().ok()?;
        std::env::remove_var("LISTEN_PID");
        std::env::remove_var("LISTEN_FDS");
        std::env::remove_var("LISTEN_FDNAMES");
        if !for_us || count < 1 {
            return None;
        }
        // SAFETY: by the socket activation protocol fd 3 is an open listening socket handed to
        // this process, and nothing else in it owns that descriptor.
        let socket = unsafe { Socket::from_raw_fd(FIRST_FD) };
        Some(Transport::Listener(socket))
    }

    /// Binds `host:port`, or `unix:/path` with the file mode `socket_mode`.
    pub fn bind(address: &str, socket_mode: u32) -> Result<Transport> {
        #[cfg(unix)]
        if let Some(path) = address.strip_prefix("unix:") {
            return bind_unix(PathBuf::from(path), socket_mode);
        }
        #[cfg(not(unix))]
        let _ = socket_mode;
        let address: std::net::SocketAddr = address
            .parse()
            .with_context(|| format!("--bind {address:?}: expected HOST:PORT or unix:/path"))?;
        let socket = Socket::new(Domain::for_address(address), Type::STREAM, None)?;
        socket.set_reuse_address(true)?;
        socket
            .bind(&address.into())
            .with_context(|| format!("cannot bind {address}"))?;
        socket.listen(1024)?;
        Ok(Transport::Listener(socket))
    }
}

#[cfg(unix)]
fn bind_unix(path: PathBuf, socket_mode: u32) -> Result<Transport> {
    use std::os::unix::fs::PermissionsExt;
    if path.exists() {
        // A socket file nobody listens on is left over from a dead process: replace it.
        match std::os::unix::net::UnixStream::connect(&path) {
            Ok(_) => anyhow::bail!("{} is in use by a live socket", path.display()),
            Err(_) => std::fs::remove_file(&path)
                .with_context(|| format!("cannot remove stale socket {}", path.display()))?,
        }
    }
    let socket = Socket::new(Domain::UNIX, Type::STREAM, None)?;
    socket
        .bind(&socket2::SockAddr::unix(&path)?)
        .with_context(|| format!("cannot bind {}", path.display()))?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(socket_mode))?;
    socket.listen(1024)?;
    Ok(Transport::Listener(socket))
}

/// Serves until the shutdown starts and the connections in flight have finished. Returns the
/// listening socket when the shutdown is a restart, for the next process to take over.
pub async fn run(
    transport: Transport,
    context: Arc<ServerContext>,
    trigger: Trigger,
) -> Option<Socket> {
    tokio::spawn(watch_signals(trigger.clone()));
    tokio::spawn(enforce_grace(trigger.subscribe()));
    match transport {
        Transport::Stream(socket) => {
            let session = context.session();
            match adopt_stream(socket) {
                Ok(stream) => stream.serve(context, trigger.subscribe(), session).await,
                Err(e) => tracing::error!("cannot use fd 0: {e}"),
            }
            trigger.fire(Reason::EndOfStream);
            None
        }
        #[cfg(windows)]
        Transport::NamedPipe(pipe) => {
            let session = context.session();
            match crate::windows::adopt_pipe(pipe) {
                Ok(pipe) => serve_connection(pipe, context, trigger.subscribe(), session).await,
                Err(e) => tracing::error!("cannot use the IIS pipe: {e}"),
            }
            trigger.fire(Reason::EndOfStream);
            None
        }
        #[cfg(target_os = "linux")]
        Transport::SharedListener(socket, handoff) => {
            let shutdown = trigger.subscribe();
            let listener = overflow_loop(socket, handoff, context, shutdown.clone()).await;
            (shutdown.reason() == Some(Reason::Restart)).then_some(listener)
        }
        Transport::Listener(socket) => {
            let shutdown = trigger.subscribe();
            match accept_loop(socket, context, shutdown.clone()).await {
                Ok(listener) => (shutdown.reason() == Some(Reason::Restart)).then_some(listener),
                Err(e) => {
                    tracing::error!("cannot accept connections: {e}");
                    trigger.fire(Reason::EndOfStream);
                    None
                }
            }
        }
    }
}

/// Starts a thread that watches signals and the grace period, for a process whose requests
/// are served without a runtime (the IIS stream, `direct.rs`).
pub fn spawn_guard(trigger: Trigger) -> Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the signal runtime")?;
    std::thread::Builder::new()
        .name("wfastcgi-signals".into())
        .spawn(move || {
            runtime.block_on(async move {
                tokio::spawn(watch_signals(trigger.clone()));
                enforce_grace(trigger.subscribe()).await;
            })
        })
        .context("cannot start the signal thread")?;
    Ok(())
}

/// Requests still running `WSGI_RESTART_GRACE` after the shutdown started are given up on.
async fn enforce_grace(mut shutdown: Shutdown) {
    shutdown.started().await;
    let grace = crate::shutdown::grace();
    tokio::time::sleep(grace).await;
    if crate::shutdown::is_serving_done() {
        return;
    }
    tracing::warn!(
        "requests still running {grace:?} after the shutdown started; exiting without them"
    );
    crate::logging::flush();
    std::process::exit(0);
}

async fn accept_loop(
    socket: Socket,
    context: Arc<ServerContext>,
    mut shutdown: Shutdown,
) -> io::Result<Socket> {
    tracing::info!("listening on {}", describe(&socket));
    // A copy of the socket: the one to give back for a restart.
    let listener = adopt_listener(socket.try_clone()?)?;
    let mut connections = JoinSet::new();
    let mut accept_failing = false;
    loop {
        // At FCGI_MAX_CONNS, the next connection waits in the backlog for one to finish.
        if connections.len() >= context.advertised.max_conns {
            tokio::select! {
                _ = connections.join_next() => {}
                _ = shutdown.started() => break,
            }
            continue;
        }
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(stream) => {
                    accept_failing = false;
                    if let Some(peer) = stream.refused_peer(context.allowed_peers.as_deref()) {
                        tracing::warn!("connection from {peer} refused: not in FCGI_WEB_SERVER_ADDRS");
                        continue;
                    }
                    let session = context.session();
                    connections.spawn(stream.serve(context.clone(), shutdown.clone(), session));
                }
                Err(e) => {
                    // Out of file descriptors and the like: wait instead of spinning, and log
                    // once until it works again.
                    if !accept_failing {
                        tracing::error!("accept failed: {e}; retrying every 100ms (logged once)");
                        accept_failing = true;
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
            _ = shutdown.started() => break,
        }
        while connections.try_join_next().is_some() {}
    }
    // New connections wait in the backlog, for the restarted process (or for nobody).
    while connections.join_next().await.is_some() {}
    Ok(socket)
}

/// The I/O thread's part when the workers accept (`acceptor.rs`): parked connections, and the
/// connections that wait while every worker is stuck. Returns the listening socket.
#[cfg(target_os = "linux")]
async fn overflow_loop(
    socket: Socket,
    handoff: Handoff,
    context: Arc<ServerContext>,
    mut shutdown: Shutdown,
) -> Socket {
    tracing::info!("listening on {}", describe(&socket));
    let Handoff {
        acceptor,
        mut parked,
        overflow,
    } = handoff;
    let stop_workers = acceptor.stop_on_drop();
    let connection_shutdown = shutdown.clone();
    // Serves the connection here, or (`park`) waits for its next request first.
    let serve = |connections: &mut JoinSet<()>, parked: ParkedConnection, park: bool| {
        let stream = match adopt_stream(parked.socket) {
            Ok(stream) => stream,
            Err(e) => return tracing::warn!("cannot serve a connection: {e}"),
        };
        let (context, shutdown) = (context.clone(), connection_shutdown.clone());
        if park {
            let acceptor = acceptor.clone();
            connections.spawn(stream.wait_for_request(parked.session, acceptor, context, shutdown));
        } else {
            connections.spawn(stream.serve(context, shutdown, parked.session));
        }
    };
    let mut connections = JoinSet::new();
    let mut tick = tokio::time::interval(OVERFLOW_TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut taken = 0;
    loop {
        tokio::select! {
            Some(parked) = parked.recv() => {
                // At FCGI_MAX_CONNS a quiet kept connection is closed; the web server reopens.
                // Waiting for the next request is only for a connection with nothing pending.
                if !parked.session.is_quiet() {
                    serve(&mut connections, parked, false);
                } else if connections.len() < context.advertised.max_conns {
                    serve(&mut connections, parked, true);
                }
            }
            _ = tick.tick() => {
                if overflow && acceptor.stuck(&mut taken) {
                    while connections.len() < context.advertised.max_conns {
                        let Ok(Some(socket)) = acceptor.accept() else { break };
                        let session = context.session();
                        serve(&mut connections, ParkedConnection { socket, session }, false);
                    }
                }
            }
            Some(_) = connections.join_next() => {}
            _ = shutdown.started() => break,
        }
    }
    drop(stop_workers);
    // Connections workers park meanwhile are still served (a body drained, a request on its
    // way lingered for) until the last connection here has finished.
    while !connections.is_empty() {
        tokio::select! {
            Some(parked) = parked.recv() => serve(&mut connections, parked, false),
            _ = connections.join_next() => {}
        }
    }
    socket
}

/// The address, for the log (a test reads the port of a `--bind 127.0.0.1:0` from it).
fn describe(socket: &Socket) -> String {
    let address = match socket.local_addr() {
        Ok(address) => address,
        Err(e) => return format!("an unknown address ({e})"),
    };
    if let Some(ip) = address.as_socket() {
        return ip.to_string();
    }
    #[cfg(unix)]
    if let Some(path) = address.as_pathname() {
        return format!("unix:{}", path.display());
    }
    "an unnamed socket".into()
}

enum Listener {
    Tcp(tokio::net::TcpListener),
    #[cfg(unix)]
    Unix(tokio::net::UnixListener),
}

enum Stream {
    Tcp(tokio::net::TcpStream),
    #[cfg(unix)]
    Unix(tokio::net::UnixStream),
}

impl Listener {
    async fn accept(&self) -> io::Result<Stream> {
        match self {
            Listener::Tcp(listener) => {
                let (stream, _) = listener.accept().await?;
                stream.set_nodelay(true)?;
                Ok(Stream::Tcp(stream))
            }
            #[cfg(unix)]
            Listener::Unix(listener) => Ok(Stream::Unix(listener.accept().await?.0)),
        }
    }
}

impl Stream {
    /// The TCP peer's address when an allow-list is set and does not name it.
    fn refused_peer(&self, allowed: Option<&[std::net::IpAddr]>) -> Option<std::net::IpAddr> {
        let (Stream::Tcp(stream), Some(allowed)) = (self, allowed) else {
            return None;
        };
        let peer = stream.peer_addr().ok()?.ip().to_canonical();
        (!allowed.contains(&peer)).then_some(peer)
    }

    /// A kept connection a worker parked: waits, under the idle timeout, until its next request
    /// starts arriving, then gives it back to an idle worker (no thread hop for the request),
    /// or, with every worker busy, serves it here through the job queue.
    #[cfg(target_os = "linux")]
    async fn wait_for_request(
        self,
        session: Session,
        acceptor: Arc<super::acceptor::Acceptor>,
        context: Arc<ServerContext>,
        mut shutdown: Shutdown,
    ) {
        let idle_timeout = context.idle_timeout;
        let idle = idle_timeout.map(|limit| tokio::time::Instant::now() + limit);
        let arriving = tokio::select! {
            ready = self.readable() => ready.is_ok(),
            () = crate::sleep_until(idle) => {
                super::connection::log_idle_close(idle_timeout.unwrap_or_default());
                return;
            }
            () = acceptor.reclaim.notified() => {
                tracing::info!("idle connection closed: accepting is out of descriptors");
                return;
            }
            // The connection lingers for a request already on its way, then closes.
            _ = shutdown.started() => false,
        };
        if arriving && acceptor.has_idle_worker() {
            match self.into_socket() {
                Ok(socket) => acceptor.resume(ParkedConnection { socket, session }),
                Err(e) => tracing::warn!("connection closed: {e}"),
            }
            return;
        }
        self.serve(context, shutdown, session).await
    }

    #[cfg(target_os = "linux")]
    async fn readable(&self) -> io::Result<()> {
        match self {
            Stream::Tcp(stream) => stream.readable().await,
            Stream::Unix(stream) => stream.readable().await,
        }
    }

    #[cfg(target_os = "linux")]
    fn into_socket(self) -> io::Result<Socket> {
        Ok(match self {
            Stream::Tcp(stream) => Socket::from(stream.into_std()?),
            Stream::Unix(stream) => Socket::from(stream.into_std()?),
        })
    }

    /// Serves the connection from where `session` is (a worker may have begun it).
    async fn serve(self, context: Arc<ServerContext>, shutdown: Shutdown, session: Session) {
        match self {
            Stream::Tcp(stream) => serve_connection(stream, context, shutdown, session).await,
            #[cfg(unix)]
            Stream::Unix(stream) => serve_connection(stream, context, shutdown, session).await,
        }
    }
}

async fn serve_connection<S: AsyncRead + AsyncWrite + Unpin>(
    stream: S,
    context: Arc<ServerContext>,
    shutdown: Shutdown,
    session: Session,
) {
    let mut connection = Connection::new(stream, session, context, shutdown);
    if let Err(e) = connection.run().await {
        tracing::warn!("connection closed: {e}");
    }
}

fn adopt_listener(socket: Socket) -> io::Result<Listener> {
    socket.set_nonblocking(true)?;
    #[cfg(unix)]
    if socket.local_addr()?.is_unix() {
        return tokio::net::UnixListener::from_std(socket.into()).map(Listener::Unix);
    }
    tokio::net::TcpListener::from_std(socket.into()).map(Listener::Tcp)
}

fn adopt_stream(socket: Socket) -> io::Result<Stream> {
    socket.set_nonblocking(true)?;
    #[cfg(unix)]
    if socket.local_addr()?.is_unix() {
        return tokio::net::UnixStream::from_std(socket.into()).map(Stream::Unix);
    }
    socket.set_tcp_nodelay(true)?;
    tokio::net::TcpStream::from_std(socket.into()).map(Stream::Tcp)
}

/// SIGTERM or SIGINT starts a graceful shutdown; a second one exits at once.
#[cfg(unix)]
async fn watch_signals(trigger: Trigger) {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut interrupt)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::error!("cannot install signal handlers");
        return;
    };
    loop {
        tokio::select! {
            _ = term.recv() => {}
            _ = interrupt.recv() => {}
        }
        if trigger.fire(Reason::Signal) {
            tracing::info!("signal received: finishing the requests in flight, then exiting");
        } else {
            tracing::warn!("second signal: exiting now");
            crate::logging::flush();
            std::process::exit(1);
        }
    }
}

/// The binary a restart runs: the one installed at this binary's path now. A deploy that
/// replaced it (a new file renamed over it) leaves Linux naming the running one
/// `PATH (deleted)`; the new one at `PATH` is the one to run.
#[cfg(unix)]
fn restart_binary() -> io::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    if exe.exists() {
        return Ok(exe);
    }
    let replaced = exe
        .to_str()
        .and_then(|path| path.strip_suffix(" (deleted)"))
        .map(PathBuf::from);
    Ok(replaced.filter(|path| path.exists()).unwrap_or(exe))
}

/// Whether `reexec` can start the binary now; why not, when not (it was deleted, or replaced by
/// something that cannot run). Checked before a restart starts draining, since after that a
/// failed exec can only exit.
#[cfg(unix)]
pub fn can_reexec() -> Result<(), String> {
    use std::os::unix::fs::PermissionsExt;
    let exe = restart_binary().map_err(|e| format!("cannot find this binary: {e}"))?;
    match std::fs::metadata(&exe) {
        Ok(meta) if meta.is_file() && meta.permissions().mode() & 0o111 != 0 => Ok(()),
        Ok(_) => Err(format!("{} is not an executable file", exe.display())),
        Err(e) => Err(format!(
            "this binary, {}, cannot be run: {e}",
            exe.display()
        )),
    }
}

/// The environment the process started with, before web.config's settings went into it.
#[cfg(unix)]
static START_ENVIRONMENT: std::sync::OnceLock<Vec<(std::ffi::OsString, std::ffi::OsString)>> =
    std::sync::OnceLock::new();

/// Keeps the environment as it is now for [`reexec`]; call before web.config is applied.
#[cfg(unix)]
pub fn keep_start_environment() {
    START_ENVIRONMENT.get_or_init(|| std::env::vars_os().collect());
}

/// Replaces this process with a fresh copy of the binary, same arguments, passing `listener` as
/// fd 3 by the socket activation protocol. The new process gets the environment this process
/// started with ([`keep_start_environment`]), not the current one, which holds web.config's
/// settings as they were: a setting since removed would live on, and a large one can exceed the
/// kernel's limit for exec (E2BIG). The binary at this binary's path runs, or if it cannot, the
/// running one. Returns only if both execs failed.
#[cfg(unix)]
pub fn reexec(listener: Socket) -> io::Error {
    use std::os::fd::AsRawFd;
    use std::os::unix::process::CommandExt;
    let fd = listener.as_raw_fd();
    // SAFETY: dup2/fcntl on descriptors this process owns, right before exec; every other
    // descriptor Rust opened is close-on-exec, so taking fd 3 over is harmless.
    unsafe {
        if fd != FIRST_FD && libc::dup2(fd, FIRST_FD) < 0 {
            return io::Error::last_os_error();
        }
        let flags = libc::fcntl(FIRST_FD, libc::F_GETFD);
        if flags < 0 || libc::fcntl(FIRST_FD, libc::F_SETFD, flags & !libc::FD_CLOEXEC) < 0 {
            return io::Error::last_os_error();
        }
    }
    // Kept at start-up; else (never in practice) the environment as it is.
    let environment = START_ENVIRONMENT.get_or_init(|| std::env::vars_os().collect());
    let exec = |exe: &std::path::Path| {
        std::process::Command::new(exe)
            .args(std::env::args_os().skip(1))
            .env_clear()
            .envs(environment.iter().map(|(k, v)| (k, v)))
            .envs(crate::ops::restart_environment())
            .env("LISTEN_FDS", "1")
            .env("LISTEN_PID", std::process::id().to_string())
            .exec()
    };
    let (exe, error) = match restart_binary() {
        Ok(exe) => {
            let error = exec(&exe);
            (exe, error)
        }
        Err(e) => (PathBuf::from("this binary"), e),
    };
    // The binary at the path cannot run after all (not a program, say): the running one can
    // (Linux's /proc/self/exe), so the process keeps serving, with the code it has.
    tracing::error!(
        "cannot run {}: {error}; restarting the running binary instead",
        exe.display()
    );
    crate::logging::flush();
    exec(std::path::Path::new("/proc/self/exe"))
}

/// Ctrl-C or IIS's shutdown event starts a graceful shutdown; a second Ctrl-C exits at once.
#[cfg(windows)]
async fn watch_signals(trigger: Trigger) {
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = crate::windows::shutdown_event() => {}
    }
    trigger.fire(Reason::Signal);
    tracing::info!("shutdown requested: finishing the requests in flight, then exiting");
    if tokio::signal::ctrl_c().await.is_ok() {
        tracing::warn!("second interrupt: exiting now");
        crate::logging::flush();
        std::process::exit(1);
    }
}
