//! The benchmarks' floor: the gateway's FastCGI server stack (transports, connections, job queue,
//! response encoding) with no Python behind it. Every request gets `Hello, World!\n`.
//!
//!     native_responder                     serve fd 0, as IIS starts a FastCGI process
//!     native_responder --bind ADDR         listen on 127.0.0.1:PORT or unix:/path
//!
//! Listening, it is wired as `gateway::serve` wires the real binary (src/gateway.rs): a one-thread
//! tokio runtime on its own thread runs `server::run`, and a plain thread (here the main thread,
//! where the gateway runs its Python worker) serves what it accepts itself (on Linux,
//! `acceptor.rs`) and the jobs the runtime queues. So the time the gateway spends per request
//! beyond this is what calling into Python costs.
//!
//! On fd 0 it serves the stream on this thread, as the gateway does (`direct.rs`).

use std::sync::Arc;

use anyhow::{anyhow, Context, Result};

use wfastcgi::exchange::{simple_response, Job, Output, ResponseEncoder};
use wfastcgi::protocol::{Advertised, ParamLimits};
use wfastcgi::shutdown;
use wfastcgi::transport::connection::ServerContext;
use wfastcgi::transport::queue;
use wfastcgi::transport::server::{run, Transport};

/// As in the gateway: requests waiting beyond the one being answered; more get a 503.
const QUEUE_CAPACITY: usize = 64;
/// Connections served at once when listening (the gateway's figure).
const MAX_CONNECTIONS: usize = 1024;
/// File mode of a `unix:` socket (the gateway's default `--socket-mode`).
const SOCKET_MODE: u32 = 0o660;

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let transport = match args.as_slice() {
        [] => Transport::from_stdin().map_err(|e| anyhow!("cannot serve fd 0: {e:?}"))?,
        [flag, addr] if flag == "--bind" => Transport::bind(addr, SOCKET_MODE)?,
        _ => return Err(anyhow!("usage: native_responder [--bind ADDR]")),
    };
    match transport {
        #[cfg(unix)]
        Transport::Stream(socket) => serve_stream(socket),
        other => serve_queued(other),
    }
}

/// fd 0 as IIS hands it over, served as the gateway's `serve_direct` serves it, without Python:
/// a runtime thread only for signals, and requests read and answered on this thread.
#[cfg(unix)]
fn serve_stream(socket: socket2::Socket) -> Result<()> {
    let (trigger, _) = shutdown::channel();
    wfastcgi::transport::server::spawn_guard(trigger.clone())?;
    let mut driver = wfastcgi::transport::direct::Driver::new(socket, trigger.subscribe())
        .context("cannot use fd 0")?;
    while let Some(job) = driver.next_job() {
        answer(job);
    }
    Ok(())
}

/// The runtime thread runs the server; this thread answers the jobs it queues.
fn serve_queued(transport: Transport) -> Result<()> {
    // One connection on a stream (IIS), so the process says it takes one request at a time.
    let (max_conns, max_reqs) = if transport.is_stream() {
        (1, 1)
    } else {
        (MAX_CONNECTIONS, MAX_CONNECTIONS)
    };
    let advertised = Advertised {
        max_conns,
        max_reqs,
    };
    let (jobs, job_receiver) = queue::bounded(QUEUE_CAPACITY);
    let (trigger, _) = shutdown::channel();
    #[cfg(target_os = "linux")]
    let (transport, jobs, acceptor) =
        wfastcgi::transport::server::share(transport, jobs, None, advertised, true, None)?;
    let context = Arc::new(ServerContext {
        jobs,
        param_limits: ParamLimits::default(),
        advertised,
        allowed_peers: None,
        idle_timeout: None,
        send_timeout: None,
        header_timeout: None,
    });
    #[cfg(target_os = "linux")]
    let shutdown = trigger.subscribe();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .context("cannot start the I/O runtime")?;
    // When the server stops (end of the stream, a signal), this thread ends and drops the
    // context, the last sender of the job queue, which ends the loop below.
    let io = std::thread::Builder::new()
        .name("native-io".into())
        .spawn(move || runtime.block_on(run(transport, context, trigger)))
        .context("cannot start the I/O thread")?;

    #[cfg(target_os = "linux")]
    if let Some(acceptor) = acceptor {
        let mut source =
            wfastcgi::transport::acceptor::WorkerSource::new(&acceptor, &job_receiver, shutdown)?;
        while let Some(job) = source.next_job() {
            answer(job);
        }
    }
    for job in job_receiver.iter() {
        answer(job);
    }
    io.join().map_err(|_| anyhow!("the I/O thread panicked"))?;
    Ok(())
}

fn answer(mut job: Job) {
    // Read the body to its end as an application would (hello requests have none).
    while let Ok(Some(_)) = job.body.next_blocking() {}
    let mut encoder = ResponseEncoder::new(job.response.request_id());
    simple_response(&mut encoder, "200 OK", &[], b"Hello, World!\n");
    // An error means the web server went away; the connection ends the request itself.
    let _ = job.response.send_blocking(Output::End(encoder.finish(0)));
}
