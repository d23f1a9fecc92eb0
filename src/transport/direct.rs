//! The IIS fast path: one connection on fd 0, one request at a time (IIS never sends another
//! before END_REQUEST), served by the application's own thread with blocking I/O. No thread hop
//! lies between the socket and the application: the thread that runs Python reads the records,
//! feeds `wsgi.input` straight from the socket, and writes the response itself (a small
//! response in one write).
//!
//! The protocol is the connection's `protocol::Session`, as in `connection.rs`; only the I/O
//! model differs. Waiting for a request wakes every 200 ms so a shutdown (signal, restart) is
//! noticed.
//!
//! On Linux the listening modes use it too, for a connection a worker accepted itself
//! (`acceptor.rs`); such a connection is given back ("parked") once it has no request to serve.

use std::collections::VecDeque;
use std::io::{self, Write};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use socket2::Socket;

use super::ConnectionError;
use crate::exchange::{
    BodyInterrupted, BodySource, BodyStream, Job, Output, OutputTarget, ResponseGone, ResponseSink,
    TrySendError,
};
use crate::lock;
use crate::protocol::{self, Advertised, Event, ParamLimits, Session};
use crate::shutdown::Shutdown;

/// How often a wait for the next request looks at the shutdown flag (the socket's receive
/// time-out: one system call per wait, not a read, a poll and a read).
const POLL: Duration = Duration::from_millis(200);
const READ_CHUNK: usize = 64 * 1024 + 2 * protocol::HEADER_LEN + 256;
/// How long a worker reads a request head (and records that start no request) on an accepted
/// connection before handing it to the I/O thread: web servers send a head at once.
const HEAD_LIMIT: Duration = POLL;

/// The socket and the connection's protocol state.
struct Wire {
    /// Taken when the connection is parked: a request object the application kept past its
    /// request then finds the connection gone instead of reading someone else's.
    socket: Option<Socket>,
    session: Session,
    /// Events read while looking for an abort during a response (the running request's body),
    /// or while draining an answered body (the next request); used first.
    pending: VecDeque<Event>,
    /// `WSGI_SEND_TIMEOUT`, on an accepted connection.
    send_timeout: Option<Duration>,
}

/// How `Wire::next_event` waits for more bytes.
#[derive(Clone, Copy)]
enum Wait<'a> {
    /// As long as it takes, unless `stop` says so while nothing arrives.
    Until(&'a dyn Fn() -> bool),
    /// On a connection that is parked rather than waited on: one `POLL` (`true`) or not at
    /// all, and not past the deadline. A shutdown does not cut this short: a request already
    /// on its way is served, as the tokio connection lingers for it.
    Briefly(bool, Option<Instant>),
}

enum Soon {
    Event(Event),
    /// Nothing has arrived: park the connection.
    Quiet,
    End,
}

enum Filled {
    Data,
    End,
    TimedOut,
}

impl Wire {
    /// The next event in what has arrived, after writing what the session answered itself.
    fn decoded(&mut self) -> Result<Option<Event>, ConnectionError> {
        let event = self.session.next_event();
        if let Some(replies) = self.session.take_replies() {
            self.write_all(&replies)?;
        }
        Ok(event?)
    }

    /// The next event; `End` at the end of the stream, or when `Until`'s `stop` says so while
    /// nothing is arriving; `Quiet` when `Briefly` got nothing more in time.
    fn next_event(&mut self, wait: Wait) -> Result<Soon, ConnectionError> {
        loop {
            if let Some(event) = self.pending.pop_front() {
                return Ok(Soon::Event(event));
            }
            if let Some(event) = self.decoded()? {
                return Ok(Soon::Event(event));
            }
            let filled = match wait {
                Wait::Until(stop) if stop() => return Ok(Soon::End),
                Wait::Until(_) => self.fill(true)?,
                Wait::Briefly(wait, _) => self.fill(wait)?,
            };
            match (filled, wait) {
                (Filled::End, _) => {
                    self.session.end_of_stream()?;
                    return Ok(Soon::End);
                }
                (Filled::TimedOut, Wait::Briefly(..)) => return Ok(Soon::Quiet),
                // A record trickling in byte by byte never times a read out.
                (Filled::Data, Wait::Briefly(_, Some(at))) if Instant::now() >= at => {
                    return Ok(Soon::Quiet)
                }
                _ => {}
            }
        }
    }

    /// Reads, without waiting, what is left of the last request's body; whether its end came
    /// (or the connection's). What follows it is kept for later.
    fn drain_body_soon(&mut self) -> bool {
        if !self.session.is_draining() {
            return true;
        }
        match self.next_event(Wait::Briefly(false, None)) {
            Ok(Soon::Event(event)) => {
                self.pending.push_back(event);
                true
            }
            Ok(Soon::Quiet) => !self.session.is_draining(),
            Ok(Soon::End) | Err(_) => true,
        }
    }

    /// Reads what is there. With `wait`, blocks until something arrives or the socket's
    /// receive time-out (`POLL`) passes; without, returns at once.
    fn fill(&mut self, wait: bool) -> io::Result<Filled> {
        let Some(socket) = &self.socket else {
            return Ok(Filled::End);
        };
        let buf = self.session.read_buf();
        buf.reserve(READ_CHUNK);
        let flags = if wait { 0 } else { libc::MSG_DONTWAIT };
        loop {
            match socket.recv_with_flags(buf.spare_capacity_mut(), flags) {
                Ok(0) => return Ok(Filled::End),
                Ok(n) => {
                    // SAFETY: recv(2) initialised these `n` bytes of the spare capacity.
                    unsafe { buf.set_len(buf.len() + n) };
                    return Ok(Filled::Data);
                }
                Err(e) => match e.kind() {
                    io::ErrorKind::Interrupted => {}
                    io::ErrorKind::WouldBlock => return Ok(Filled::TimedOut),
                    io::ErrorKind::ConnectionReset => return Ok(Filled::End),
                    _ => return Err(e),
                },
            }
        }
    }

    /// Writes everything. On an accepted connection, a web server that takes nothing for
    /// `WSGI_SEND_TIMEOUT` (the socket never has room for more) has its connection closed, so
    /// a peer that never reads cannot hold the worker; a slow reader keeps it. Sends do not
    /// block there: a blocking send with a time-out returns the few bytes the kernel squeezed
    /// in meanwhile (as it compacts a silent peer's receive buffer), which would count as
    /// progress for ever.
    fn write_all(&mut self, mut data: &[u8]) -> io::Result<()> {
        let Some(socket) = &self.socket else {
            return Err(io::ErrorKind::NotConnected.into());
        };
        let Some(limit) = self.send_timeout else {
            return (&*socket).write_all(data);
        };
        while !data.is_empty() {
            match socket.send_with_flags(data, libc::MSG_DONTWAIT) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => data = &data[n..],
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if !writable_within(socket, limit)? {
                        tracing::warn!(
                            "connection closed: the web server took nothing for {limit:?} \
                             (WSGI_SEND_TIMEOUT)"
                        );
                        self.socket = None;
                        return Err(io::ErrorKind::TimedOut.into());
                    }
                }
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Whether the running request was aborted (or the web server left) since the last look,
    /// reading only what has already arrived. Its body is kept for later, in order, up to
    /// `PENDING_LIMIT` pieces: a body nobody reads does not pile up in memory, it waits in the
    /// socket (and an abort behind it is seen once the body is drained).
    fn aborted_since(&mut self) -> bool {
        const PENDING_LIMIT: usize = 8;
        let mut aborted = false;
        while self.pending.len() < PENDING_LIMIT {
            match self.decoded() {
                Ok(Some(Event::Aborted)) => aborted = true,
                Ok(Some(event)) => self.pending.push_back(event),
                Ok(None) => match self.fill(false) {
                    Ok(Filled::Data) => {}
                    Ok(Filled::TimedOut) => break,
                    Ok(Filled::End) | Err(_) => return true,
                },
                Err(_) => return true,
            }
        }
        aborted
    }
}

/// Waits until `socket` has room to send, up to `limit`; false when it still has none.
fn writable_within(socket: &Socket, limit: Duration) -> io::Result<bool> {
    let mut pollfd = libc::pollfd {
        fd: socket.as_raw_fd(),
        events: libc::POLLOUT,
        revents: 0,
    };
    let deadline = Instant::now() + limit;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let millis = libc::c_int::try_from(left.as_millis()).unwrap_or(libc::c_int::MAX);
        // SAFETY: poll(2) on one valid pollfd that lives across the call.
        match unsafe { libc::poll(&mut pollfd, 1, millis) } {
            0 => return Ok(false),
            n if n > 0 => return Ok(true),
            _ => {
                let error = io::Error::last_os_error();
                if error.kind() != io::ErrorKind::Interrupted {
                    return Err(error);
                }
            }
        }
    }
}

/// When a connection is given back instead of waited on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Parking {
    /// IIS's stream: the process lives for it, so it is always waited on.
    Never,
    /// Just accepted: the request is on its way; wait one `POLL` for it.
    FirstRequest,
    /// Between requests on a kept connection: only a request already there is served.
    NextRequest,
    /// Given back: no request to serve now (a head that stalled, or a body still arriving).
    Parked,
}

/// A connection handed between a worker and the I/O thread: the socket and its session, as
/// far as it got.
pub struct ParkedConnection {
    pub socket: Socket,
    pub session: Session,
}

/// Reads requests from the IIS stream, or from a connection a worker accepted.
pub struct Driver {
    wire: Arc<Mutex<Wire>>,
    shutdown: Shutdown,
    parking: Parking,
}

impl Driver {
    /// IIS's stream on fd 0.
    pub fn new(socket: Socket, shutdown: Shutdown) -> io::Result<Driver> {
        socket.set_nonblocking(false)?;
        let buf = BytesMut::with_capacity(READ_CHUNK);
        let session = Session::new(ParamLimits::default(), Advertised::ONE, buf);
        let connection = ParkedConnection { socket, session };
        Driver::with(connection, shutdown, Parking::Never, None)
    }

    /// A connection a worker accepted (blocking, as accept(2) returns it on Linux), or one the
    /// I/O thread gives back; `finish` gives it back when it has no request to serve.
    pub fn accepted(
        connection: ParkedConnection,
        shutdown: Shutdown,
        send_timeout: Option<Duration>,
    ) -> io::Result<Driver> {
        Driver::with(connection, shutdown, Parking::FirstRequest, send_timeout)
    }

    fn with(
        connection: ParkedConnection,
        shutdown: Shutdown,
        parking: Parking,
        send_timeout: Option<Duration>,
    ) -> io::Result<Driver> {
        let ParkedConnection { socket, session } = connection;
        socket.set_read_timeout(Some(POLL))?;
        Ok(Driver {
            wire: Arc::new(Mutex::new(Wire {
                socket: Some(socket),
                session,
                pending: VecDeque::new(),
                send_timeout,
            })),
            shutdown,
            parking,
        })
    }

    /// Ends the driver: the connection, if `next_job` ended because it had no request to
    /// serve (and it is still open), else the read buffer, emptied, for the next connection (a
    /// fresh 64 KiB buffer per connection cost a heap grow and trim, and their page faults,
    /// every time).
    pub fn finish(self) -> (Option<ParkedConnection>, BytesMut) {
        let mut wire = lock(&self.wire);
        let empty = Session::new(ParamLimits::default(), Advertised::ONE, BytesMut::new());
        let session = std::mem::replace(&mut wire.session, empty);
        match wire.socket.take() {
            Some(socket) if self.parking == Parking::Parked => {
                (Some(ParkedConnection { socket, session }), BytesMut::new())
            }
            _ => (None, session.into_buffer()),
        }
    }

    /// The next request, once its parameters are complete; `None` when the stream ends, a
    /// shutdown has started, the stream breaks the protocol (logged), or (an accepted
    /// connection) no request is arriving, which parks it.
    pub fn next_job(&mut self) -> Option<Job> {
        let mut wire = lock(&self.wire);
        let shutdown = &self.shutdown;
        // The last request's body, unread: what has arrived is dropped. The rest, if it is
        // still on its way, the I/O thread drains, so no worker waits on it (and closing before
        // would reset the connection under a web server still writing it).
        let parks = matches!(self.parking, Parking::NextRequest);
        if parks && !wire.drain_body_soon() {
            self.parking = Parking::Parked;
            return None;
        }
        if wire.session.is_closing() {
            return None;
        }
        // A head sent slowly, or a stream of records that starts no request, goes to the I/O
        // thread once this passes, so workers stay free for complete requests.
        let deadline = Instant::now() + HEAD_LIMIT;
        loop {
            let started = wire.session.in_head();
            let wait_briefly = match self.parking {
                Parking::Never | Parking::Parked => None,
                _ if started => Some(true),
                Parking::FirstRequest => Some(true),
                // Part of the next request's first record is here: the rest is on its way.
                Parking::NextRequest => Some(wire.session.has_buffered()),
            };
            // A shutdown stops the wait for a request, never one half received.
            let stop = || !started && shutdown.reason().is_some();
            let next = match wait_briefly {
                Some(_) if Instant::now() >= deadline => Ok(Soon::Quiet),
                Some(wait) => wire.next_event(Wait::Briefly(wait, Some(deadline))),
                None => wire.next_event(Wait::Until(&stop)),
            };
            match next {
                Ok(Soon::Event(Event::Request { request_id, params })) => {
                    if self.parking == Parking::FirstRequest {
                        self.parking = Parking::NextRequest;
                    }
                    drop(wire);
                    return Some(self.job(request_id, params));
                }
                // Before a request starts the session answers everything else itself.
                Ok(Soon::Event(_)) => {}
                // A request head that stalls, or takes longer than `HEAD_LIMIT`, goes to the I/O
                // thread with the session as far as it came, so a client sending it slowly does
                // not hold a worker.
                Ok(Soon::Quiet) => {
                    self.parking = Parking::Parked;
                    return None;
                }
                Ok(Soon::End) => return None,
                Err(e) => {
                    tracing::warn!("connection closed: {e}");
                    return None;
                }
            }
        }
    }

    fn job(&self, request_id: u16, params: protocol::Params) -> Job {
        let request = DirectRequest {
            wire: self.wire.clone(),
            request_id,
            aborted: Arc::default(),
            done: false,
        };
        Job {
            params,
            body: BodyStream::new(Box::new(request.clone())),
            response: ResponseSink::new(request_id, Box::new(request)),
        }
    }
}

impl Drop for Driver {
    /// Closes the connection now, even if the application still holds a request object
    /// (which a reference cycle can keep alive until Python's next collection).
    fn drop(&mut self) {
        lock(&self.wire).socket.take();
    }
}

/// A request's `wsgi.input`, read straight from the socket, and its response, written straight
/// to it.
#[derive(Clone)]
struct DirectRequest {
    wire: Arc<Mutex<Wire>>,
    request_id: u16,
    aborted: Arc<AtomicBool>,
    /// The body has ended.
    done: bool,
}

impl BodySource for DirectRequest {
    fn next_blocking(&mut self) -> Result<Option<Bytes>, BodyInterrupted> {
        if self.done {
            return Ok(None);
        }
        let mut wire = lock(&self.wire);
        if self.aborted.load(Ordering::Acquire) || wire.session.running() != Some(self.request_id) {
            return Err(BodyInterrupted);
        }
        match wire.next_event(Wait::Until(&|| false)) {
            Ok(Soon::Event(Event::Body(data))) => Ok(Some(data)),
            Ok(Soon::Event(Event::BodyEnd)) => {
                self.done = true;
                Ok(None)
            }
            Ok(Soon::Event(Event::Aborted)) => {
                self.aborted.store(true, Ordering::Release);
                Err(BodyInterrupted)
            }
            _ => Err(BodyInterrupted),
        }
    }
}

impl OutputTarget for DirectRequest {
    /// Writing may block on a slow web server, so the caller first releases the GIL and then
    /// calls `send_blocking`.
    fn try_send(&self, output: Output) -> Result<(), TrySendError> {
        Err(TrySendError::Full(output))
    }

    fn send_blocking(&self, output: Output) -> Result<(), ResponseGone> {
        let mut wire = lock(&self.wire);
        if wire.session.running() != Some(self.request_id) {
            return Err(ResponseGone);
        }
        match output {
            Output::Records(records) => {
                if self.is_aborted() || wire.aborted_since() {
                    self.aborted.store(true, Ordering::Release);
                    return Err(ResponseGone);
                }
                wire.write_all(&records).map_err(|_| ResponseGone)
            }
            Output::End(records) => {
                // What was kept of its body is dropped with it.
                wire.pending.clear();
                let last = wire.session.end_response(records, self.is_aborted());
                wire.write_all(&last).map_err(|_| ResponseGone)
            }
        }
    }

    fn is_aborted(&self) -> bool {
        self.aborted.load(Ordering::Acquire)
    }

    /// Nothing reads the socket while an ASGI application waits for `http.disconnect`: this
    /// reads what has arrived (without waiting), as a response's next write does.
    fn look_for_abort(&self) -> bool {
        if self.is_aborted() {
            return true;
        }
        let mut wire = lock(&self.wire);
        if wire.session.running() == Some(self.request_id) && wire.aborted_since() {
            self.aborted.store(true, Ordering::Release);
        }
        self.is_aborted()
    }
}
