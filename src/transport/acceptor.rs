//! The listening modes on Linux: idle workers accept connections themselves.
//!
//! Through the tokio connection a request crosses two threads: the I/O thread reads it and
//! queues a job, a worker runs it and hands the records back for the I/O thread to write. With
//! one connection per request (nginx's default) those two hand-offs cost half the throughput
//! (hello on a unix socket, pinned: the tokio path with a Rust responder did 31k req/s, a
//! blocking accept-read-write loop 68k). So an idle worker waits on the listening socket itself
//! and serves what it accepts with the blocking driver of the IIS stream (`direct.rs`): no thread
//! hop between the socket and Python. The tokio side keeps what it is good at:
//! - a kept connection (FCGI_KEEP_CONN) that goes quiet is parked there, under the idle timeout;
//!   when its next request starts arriving it is given back to an idle worker ("resumed"), or,
//!   with every worker busy, served there through the job queue;
//! - when every worker has stayed busy for a tick, it accepts the waiting connections itself, so
//!   they queue, or get the 503 of a full queue, as before.
//!
//! Each worker waits in its own epoll set. The listener and the job queue's eventfd are in every
//! set with EPOLLEXCLUSIVE, so a new connection or job wakes one idle worker, not all of them
//! (the thundering herd nginx avoids the same way); the stop eventfd wakes them all.

use std::io;
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use crossbeam_channel::{Receiver, Sender};
use rustix::event::{epoll, EventfdFlags};
use socket2::Socket;
use tokio::sync::mpsc;

use super::direct::{Driver, ParkedConnection};
use super::queue::Doorbell;
use crate::exchange::Job;
use crate::protocol::{Advertised, ParamLimits, Session};
use crate::shutdown::Shutdown;

/// How long a worker waits after a failed accept (out of descriptors) before trying again.
const ACCEPT_RETRY: std::time::Duration = std::time::Duration::from_millis(100);

/// What an epoll event is about.
const LISTENER: u64 = 0;
const JOBS: u64 = 1;
const STOP: u64 = 2;
const NUDGE: u64 = 3;

/// Shared by the workers and the I/O thread.
pub struct Acceptor {
    /// A duplicate of the listening socket, non-blocking.
    listener: Socket,
    /// Rung once for every job queued by the tokio side, and for every resumed connection.
    pub jobs_ready: Arc<Doorbell>,
    /// Parked connections whose next request is arriving, for the next idle worker.
    resume: Sender<ParkedConnection>,
    resumed: Receiver<ParkedConnection>,
    stop: Doorbell,
    /// Wakes one more worker when one took one kind of work (a connection, or a queued job or
    /// connection) while the other kind may be waiting too: EPOLLEXCLUSIVE woke only it.
    nudge: Doorbell,
    idle_workers: AtomicUsize,
    /// Work taken by workers so far, to tell a stuck pool from a busy one.
    taken: AtomicU64,
    parked: mpsc::UnboundedSender<ParkedConnection>,
    allowed_peers: Option<Vec<std::net::IpAddr>>,
    advertised: Advertised,
    /// `WSGI_SEND_TIMEOUT` for the connections workers serve.
    send_timeout: Option<std::time::Duration>,
    /// Accepting fails (out of descriptors) since the error was logged.
    accept_failing: AtomicBool,
    /// Asks the I/O thread to close the idle parked connections, when accepting fails.
    pub reclaim: tokio::sync::Notify,
}

/// What the I/O thread receives: kept connections that went quiet.
pub type Parked = mpsc::UnboundedReceiver<ParkedConnection>;

/// What a worker is given.
enum Work {
    Job(Job),
    Connection(ParkedConnection),
    Stop,
}

impl Acceptor {
    pub fn new(
        listener: &Socket,
        allowed_peers: Option<Vec<std::net::IpAddr>>,
        advertised: Advertised,
        send_timeout: Option<std::time::Duration>,
    ) -> io::Result<(Arc<Acceptor>, Parked)> {
        let listener = listener.try_clone()?;
        listener.set_nonblocking(true)?;
        let (parked, parked_receiver) = mpsc::unbounded_channel();
        let (resume, resumed) = crossbeam_channel::unbounded();
        let acceptor = Acceptor {
            listener,
            jobs_ready: Arc::new(Doorbell::new(EventfdFlags::SEMAPHORE)?),
            resume,
            resumed,
            stop: Doorbell::new(EventfdFlags::empty())?,
            nudge: Doorbell::new(EventfdFlags::empty())?,
            idle_workers: AtomicUsize::new(0),
            taken: AtomicU64::new(0),
            parked,
            allowed_peers,
            advertised,
            send_timeout,
            accept_failing: AtomicBool::new(false),
            reclaim: tokio::sync::Notify::new(),
        };
        Ok((Arc::new(acceptor), parked_receiver))
    }

    /// Takes a waiting connection, if there is one the allow-list lets in. An error (out of
    /// file descriptors, say) is logged and returned: the listener stays readable, so the
    /// caller must wait before trying again, or it would spin.
    pub fn accept(&self) -> io::Result<Option<Socket>> {
        loop {
            let (socket, peer) = match self.listener.accept() {
                Ok(accepted) => accepted,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(None),
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::Interrupted | io::ErrorKind::ConnectionAborted
                    ) =>
                {
                    continue
                }
                Err(e) => {
                    if !self.accept_failing.swap(true, Ordering::AcqRel) {
                        tracing::error!(
                            "accept failed: {e}; retrying every {ACCEPT_RETRY:?}, \
                             closing idle kept connections (logged once until it works again)"
                        );
                    }
                    // Out of descriptors: the idle kept connections give theirs back (as nginx
                    // reclaims its keep-alive ones). No permit is stored for later: once
                    // accepting works, no connection is closed for it.
                    self.reclaim.notify_waiters();
                    return Err(e);
                }
            };
            if self.accept_failing.swap(false, Ordering::AcqRel) {
                tracing::info!("accepting connections again");
            }
            if let Some(peer) = peer.as_socket() {
                let ip = peer.ip().to_canonical();
                if let Some(false) = self.allowed_peers.as_ref().map(|a| a.contains(&ip)) {
                    tracing::warn!("connection from {ip} refused: not in FCGI_WEB_SERVER_ADDRS");
                    continue;
                }
                if let Err(e) = socket.set_tcp_nodelay(true) {
                    tracing::warn!("cannot set TCP_NODELAY: {e}");
                }
            }
            return Ok(Some(socket));
        }
    }

    /// Whether every worker is busy and none has taken new work since the last call (which
    /// saw `taken`): then waiting connections are the I/O thread's to queue or refuse.
    pub fn stuck(&self, taken: &mut u64) -> bool {
        let now = self.taken.load(Ordering::Acquire);
        let stuck = self.idle_workers.load(Ordering::Acquire) == 0 && now == *taken;
        *taken = now;
        stuck
    }

    /// Stops the workers' accepting when dropped, however the I/O thread ends (a panic
    /// included): otherwise they would wait in epoll for ever.
    pub fn stop_on_drop(self: &Arc<Self>) -> StopOnDrop {
        StopOnDrop(self.clone())
    }

    /// Whether a worker waits for work now that no resumed connection has been promised to:
    /// connections are not resumed beyond the idle workers, so a busy pool's go through the
    /// job queue, its limit and its 503.
    pub fn has_idle_worker(&self) -> bool {
        self.idle_workers.load(Ordering::Acquire) > self.resumed.len()
    }

    /// Gives a parked connection whose next request is arriving back to a worker.
    pub fn resume(&self, connection: ParkedConnection) {
        // The receiver lives as long as the acceptor.
        let _ = self.resume.send(connection);
        self.jobs_ready.ring();
    }

    fn park(&self, connection: ParkedConnection) {
        // After the shutdown the I/O thread is gone; the connection just closes.
        let _ = self.parked.send(connection);
    }
}

pub struct StopOnDrop(Arc<Acceptor>);

impl Drop for StopOnDrop {
    /// Wakes every worker to stop taking connections; they serve the queue until it closes.
    fn drop(&mut self) {
        self.0.stop.ring();
    }
}

/// One worker's source of jobs: the connection it serves, else whatever wakes it first.
pub struct WorkerSource<'a> {
    acceptor: &'a Acceptor,
    epoll: OwnedFd,
    jobs: &'a Receiver<Job>,
    shutdown: Shutdown,
    connection: Option<Driver>,
    /// The last connection's read buffer, kept for the next.
    spare_buf: bytes::BytesMut,
    stopping: bool,
}

impl<'a> WorkerSource<'a> {
    pub fn new(
        acceptor: &'a Acceptor,
        jobs: &'a Receiver<Job>,
        shutdown: Shutdown,
    ) -> io::Result<WorkerSource<'a>> {
        let epoll = epoll::create(epoll::CreateFlags::CLOEXEC)?;
        let shared = epoll::EventFlags::IN | epoll::EventFlags::EXCLUSIVE;
        epoll::add(&epoll, &acceptor.listener, data(LISTENER), shared)?;
        epoll::add(&epoll, &*acceptor.jobs_ready, data(JOBS), shared)?;
        epoll::add(&epoll, &acceptor.nudge, data(NUDGE), shared)?;
        epoll::add(&epoll, &acceptor.stop, data(STOP), epoll::EventFlags::IN)?;
        Ok(WorkerSource {
            acceptor,
            epoll,
            jobs,
            shutdown,
            connection: None,
            spare_buf: bytes::BytesMut::new(),
            stopping: false,
        })
    }

    /// The next request for this worker; `None` once the shutdown has drained the queue.
    pub fn next_job(&mut self) -> Option<Job> {
        loop {
            if let Some(driver) = &mut self.connection {
                if let Some(job) = driver.next_job() {
                    return Some(job);
                }
                if let Some(driver) = self.connection.take() {
                    let (parked, buf) = driver.finish();
                    self.spare_buf = buf;
                    if let Some(parked) = parked {
                        self.acceptor.park(parked);
                    }
                }
            }
            let work = if self.stopping {
                self.drain()
            } else {
                self.wait()
            };
            match work {
                Work::Job(job) => return Some(job),
                Work::Connection(connection) => {
                    let shutdown = self.shutdown.clone();
                    let send_timeout = self.acceptor.send_timeout;
                    match Driver::accepted(connection, shutdown, send_timeout) {
                        Ok(driver) => self.connection = Some(driver),
                        Err(e) => tracing::warn!("cannot serve an accepted connection: {e}"),
                    }
                }
                Work::Stop if self.stopping => return None,
                Work::Stop => self.stopping = true,
            }
        }
    }

    fn wait(&mut self) -> Work {
        let acceptor = self.acceptor;
        acceptor.idle_workers.fetch_add(1, Ordering::AcqRel);
        let work = loop {
            let mut events = [epoll::Event {
                flags: epoll::EventFlags::empty(),
                data: data(0),
            }; 4];
            let ready = match epoll::wait(&self.epoll, &mut events, None) {
                Ok(ready) => ready,
                Err(rustix::io::Errno::INTR) => continue,
                Err(e) => {
                    tracing::error!("waiting for connections failed: {e}; serving the queue only");
                    break Work::Stop;
                }
            };
            let mut woken = [false; 4];
            for event in &events[..ready] {
                let key = event.data.u64();
                if let Some(flag) = woken.get_mut(key as usize) {
                    *flag = true;
                }
            }
            let [listener, jobs, stop, nudge] = woken;
            if stop {
                break Work::Stop;
            }
            if nudge {
                acceptor.nudge.answer();
            }
            let queued = (jobs || nudge).then(|| self.try_queued()).flatten();
            let took_queued = queued.is_some();
            let work = match queued {
                Some(work) => Some(work),
                None if listener || nudge => match acceptor.accept() {
                    Ok(socket) => socket.map(|socket| {
                        // The last connection's read buffer, for the next.
                        let buf = std::mem::take(&mut self.spare_buf);
                        let session =
                            Session::new(ParamLimits::default(), acceptor.advertised, buf);
                        Work::Connection(ParkedConnection { socket, session })
                    }),
                    Err(_) => {
                        std::thread::sleep(ACCEPT_RETRY);
                        None
                    }
                },
                None => None,
            };
            if let Some(work) = work {
                // This worker takes one thing; if another may be waiting (it was woken to
                // both, or by a nudge, which stands for both), another worker looks.
                let other_kind = if took_queued { listener } else { jobs };
                if nudge || other_kind {
                    acceptor.nudge.ring();
                }
                break work;
            }
        };
        acceptor.idle_workers.fetch_sub(1, Ordering::AcqRel);
        acceptor.taken.fetch_add(1, Ordering::AcqRel);
        work
    }

    /// A job the tokio side queued, or a connection it resumed: the doorbell's count first, so
    /// two workers never wait on the queues for one of them.
    fn try_queued(&self) -> Option<Work> {
        if !self.acceptor.jobs_ready.answer() {
            return None;
        }
        self.try_resumed()
            .or_else(|| self.jobs.try_recv().ok().map(Work::Job))
    }

    fn try_resumed(&self) -> Option<Work> {
        let connection = self.acceptor.resumed.try_recv().ok()?;
        // tokio made it non-blocking; the driver reads with blocking calls.
        match connection.socket.set_nonblocking(false) {
            Ok(()) => Some(Work::Connection(connection)),
            Err(e) => {
                tracing::warn!("cannot serve a resumed connection: {e}");
                None
            }
        }
    }

    /// After the stop: the queue until it closes (when the I/O thread has ended, so nothing
    /// is resumed any more), connections resumed just before the stop included.
    fn drain(&self) -> Work {
        if let Some(work) = self.try_resumed() {
            return work;
        }
        match self.jobs.recv() {
            Ok(job) => Work::Job(job),
            Err(_) => self.try_resumed().unwrap_or(Work::Stop),
        }
    }
}

fn data(key: u64) -> epoll::EventData {
    epoll::EventData::new_u64(key)
}
