//! The IIS fast path: one connection on fd 0, one request at a time (IIS never sends another
//! before END_REQUEST), served by the application's own thread with blocking I/O. No thread hop
//! lies between the socket and the application: the thread that runs Python reads the records,
//! feeds `wsgi.input` straight from the socket, and writes the response itself (a small
//! response in one write).
//!
//! It speaks the same protocol as `connection.rs` with the same pure codec; only the I/O model
//! differs. Waiting for a request wakes every 200 ms so a shutdown (signal, restart) is noticed.
//!
//! On Linux the listening modes use it too, for a connection a worker accepted itself
//! (`acceptor.rs`); such a connection is given back ("parked") once it has no request to serve.

use std::collections::VecDeque;
use std::io::{self, Write};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use socket2::Socket;

use crate::connection::{encode_values_answer, ConnectionError, Draining, Handover};
use crate::exchange::{
    BodyInterrupted, BodySource, BodyStream, Job, Output, OutputTarget, ResponseGone, ResponseSink,
    TrySendError,
};
use crate::protocol::{
    self, ParamLimits, ParamsBuilder, ProtocolStatus, Record, RecordDecoder, Role,
};
use crate::shutdown::Shutdown;

/// How often a wait for the next request looks at the shutdown flag (the socket's receive
/// time-out: one system call per wait, not a read, a poll and a read).
const POLL: Duration = Duration::from_millis(200);
const READ_CHUNK: usize = 64 * 1024 + 2 * protocol::HEADER_LEN + 256;
/// How long a worker reads a request head (and records that start no request) on an accepted
/// connection before handing it to the I/O thread: web servers send a head at once.
const HEAD_LIMIT: Duration = POLL;

/// FCGI_MAX_CONNS and FCGI_MAX_REQS, as GET_VALUES answers them.
#[derive(Debug, Clone, Copy)]
pub struct Advertised {
    pub max_conns: usize,
    pub max_reqs: usize,
}

/// IIS's stream: one connection, one request at a time.
const IIS_STREAM: Advertised = Advertised {
    max_conns: 1,
    max_reqs: 1,
};

/// The socket, and what was read from it but not yet used.
struct Wire {
    /// Taken when the connection is parked: a request object the application kept past its
    /// request then finds the connection gone instead of reading someone else's.
    socket: Option<Socket>,
    buf: BytesMut,
    /// Records read while looking for an abort during a response; used before `buf`.
    pending: VecDeque<Record>,
    limits: ParamLimits,
    advertised: Advertised,
    /// `WSGI_SEND_TIMEOUT`, on an accepted connection.
    send_timeout: Option<Duration>,
    /// The running request's empty STDIN record has been read.
    body_ended: bool,
}

enum Soon {
    Record(Record),
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
    /// The next record, or `None` at the end of the stream, or when `stop` says so while
    /// nothing is arriving.
    fn next_record(&mut self, stop: &dyn Fn() -> bool) -> Result<Option<Record>, ConnectionError> {
        if let Some(record) = self.pending.pop_front() {
            return Ok(Some(record));
        }
        loop {
            if let Some(record) = RecordDecoder.decode(&mut self.buf)? {
                return Ok(Some(record));
            }
            if stop() {
                return Ok(None);
            }
            match self.fill(true)? {
                Filled::Data | Filled::TimedOut => {}
                Filled::End => {
                    RecordDecoder.finish(&self.buf)?;
                    return Ok(None);
                }
            }
        }
    }

    /// Like `next_record`, on a connection that is parked rather than waited on: waits one
    /// `POLL` (`wait`) or not at all for more bytes; `Quiet` when none came. A shutdown does not
    /// cut this short: a request already on its way is served, as the tokio connection lingers
    /// for it.
    fn next_record_soon(
        &mut self,
        wait: bool,
        deadline: Option<Instant>,
    ) -> Result<Soon, ConnectionError> {
        loop {
            if let Some(record) = self.pending.pop_front() {
                return Ok(Soon::Record(record));
            }
            if let Some(record) = RecordDecoder.decode(&mut self.buf)? {
                return Ok(Soon::Record(record));
            }
            match self.fill(wait)? {
                // A record trickling in byte by byte never times a read out.
                Filled::Data if deadline.is_some_and(|at| Instant::now() >= at) => {
                    return Ok(Soon::Quiet)
                }
                Filled::Data => {}
                Filled::TimedOut => return Ok(Soon::Quiet),
                Filled::End => {
                    RecordDecoder.finish(&self.buf)?;
                    return Ok(Soon::End);
                }
            }
        }
    }

    /// Reads, without waiting, what is left of the last request's body; whether its end came.
    /// Records of anything else (an abort, the next request) are kept for later.
    fn drain_body_soon(&mut self, request_id: u16) -> bool {
        loop {
            match self.next_record_soon(false, None) {
                Ok(Soon::Record(Record::Stdin {
                    request_id: id,
                    content,
                })) if id == request_id => {
                    if content.is_empty() {
                        self.body_ended = true;
                        return true;
                    }
                }
                Ok(Soon::Record(other)) => {
                    self.pending.push_front(other);
                    return true;
                }
                Ok(Soon::Quiet) => return false,
                Ok(Soon::End) | Err(_) => return true,
            }
        }
    }

    /// Reads what is there. With `wait`, blocks until something arrives or the socket's
    /// receive time-out (`POLL`) passes; without, returns at once.
    fn fill(&mut self, wait: bool) -> io::Result<Filled> {
        let Some(fd) = self.socket.as_ref().map(AsRawFd::as_raw_fd) else {
            return Ok(Filled::End);
        };
        self.buf.reserve(READ_CHUNK);
        let flags = if wait { 0 } else { libc::MSG_DONTWAIT };
        loop {
            let spare = self.buf.spare_capacity_mut();
            // SAFETY: recv(2) writes at most `spare.len()` bytes into the uninitialised spare
            // capacity, and only the bytes it reports are marked as initialised below.
            let read = unsafe { libc::recv(fd, spare.as_mut_ptr().cast(), spare.len(), flags) };
            match read {
                0 => return Ok(Filled::End),
                n if n > 0 => {
                    // SAFETY: the kernel initialised these `n` bytes.
                    unsafe { self.buf.set_len(self.buf.len() + n as usize) };
                    return Ok(Filled::Data);
                }
                _ => {
                    let error = io::Error::last_os_error();
                    match error.kind() {
                        io::ErrorKind::Interrupted => {}
                        io::ErrorKind::WouldBlock => return Ok(Filled::TimedOut),
                        io::ErrorKind::ConnectionReset => return Ok(Filled::End),
                        _ => return Err(error),
                    }
                }
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

    /// Whether request `id` was aborted (or the web server left) since the last look, reading
    /// only what has already arrived. Other records are kept for later, in order, up to
    /// `PENDING_LIMIT` of them: a body nobody reads does not pile up in memory, it waits in the
    /// socket (and an abort behind it is seen once the body is drained).
    fn aborted_since(&mut self, id: u16) -> bool {
        const PENDING_LIMIT: usize = 8;
        let mut aborted = false;
        while self.pending.len() < PENDING_LIMIT {
            match RecordDecoder.decode(&mut self.buf) {
                Ok(Some(Record::AbortRequest { request_id })) if request_id == id => aborted = true,
                Ok(Some(Record::BeginRequest { request_id, .. })) if request_id != id => {
                    if self.refuse_second(request_id).is_err() {
                        return true;
                    }
                }
                Ok(Some(other @ (Record::GetValues { .. } | Record::Unknown { .. }))) => {
                    if self.answer_management(&other).is_err() {
                        return true;
                    }
                }
                Ok(Some(other)) => self.pending.push_back(other),
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

    /// Answers the management records a web server may send at any time; false for others.
    fn answer_management(&mut self, record: &Record) -> io::Result<bool> {
        let mut reply = BytesMut::new();
        match record {
            Record::GetValues { content } => {
                let asked = protocol::decode_name_values(content, &self.limits).unwrap_or_default();
                let Advertised {
                    max_conns,
                    max_reqs,
                } = self.advertised;
                encode_values_answer(&mut reply, &asked, max_conns, max_reqs);
            }
            Record::Unknown { record_type, .. } => {
                tracing::warn!(
                    record_type,
                    "unknown FastCGI record type; answered FCGI_UNKNOWN_TYPE"
                );
                protocol::encode_unknown_type(&mut reply, *record_type);
            }
            _ => return Ok(false),
        }
        self.write_all(&reply)?;
        Ok(true)
    }

    /// A BEGIN_REQUEST while a request runs: IIS never sends one; refuse it as the spec says.
    fn refuse_second(&mut self, request_id: u16) -> io::Result<()> {
        tracing::warn!(
            request_id,
            "second request on a busy connection: FCGI_CANT_MPX_CONN"
        );
        self.end_request(request_id, ProtocolStatus::CantMpxConn)
    }

    fn end_request(&mut self, request_id: u16, status: ProtocolStatus) -> io::Result<()> {
        let mut reply = BytesMut::new();
        protocol::encode_end_request(&mut reply, request_id, 0, status);
        self.write_all(&reply)
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

fn lock(wire: &Mutex<Wire>) -> MutexGuard<'_, Wire> {
    wire.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
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
    Parked,
    /// Answered without FCGI_KEEP_CONN, its body still arriving: given back to be drained and
    /// closed.
    ParkedDraining,
}

/// A connection given back by a worker, or accepted by the I/O thread itself (`fresh`).
pub struct ParkedConnection {
    pub socket: Socket,
    pub handover: Handover,
}

/// Reads requests from the IIS stream, or from a connection a worker accepted.
pub struct Driver {
    wire: Arc<Mutex<Wire>>,
    shutdown: Shutdown,
    /// The last request did not set FCGI_KEEP_CONN.
    close: bool,
    parking: Parking,
    /// The request served last.
    request_id: u16,
    /// What `finish` hands over with the socket.
    buffered: Bytes,
}

impl Driver {
    /// IIS's stream on fd 0.
    pub fn new(socket: Socket, shutdown: Shutdown) -> io::Result<Driver> {
        socket.set_nonblocking(false)?;
        let buf = BytesMut::with_capacity(READ_CHUNK);
        Driver::with(socket, shutdown, IIS_STREAM, Parking::Never, buf, None)
    }

    /// A connection just accepted from a listening socket (blocking, as accept(2) returns it
    /// on Linux), read into `buf` (the worker's, from its last connection: a fresh 64 KiB
    /// buffer per connection cost a heap grow and trim, and their page faults, every time);
    /// `finish` gives both back.
    pub fn accepted(
        socket: Socket,
        shutdown: Shutdown,
        advertised: Advertised,
        send_timeout: Option<Duration>,
        buf: BytesMut,
    ) -> io::Result<Driver> {
        let parking = Parking::FirstRequest;
        Driver::with(socket, shutdown, advertised, parking, buf, send_timeout)
    }

    fn with(
        socket: Socket,
        shutdown: Shutdown,
        advertised: Advertised,
        parking: Parking,
        buf: BytesMut,
        send_timeout: Option<Duration>,
    ) -> io::Result<Driver> {
        socket.set_read_timeout(Some(POLL))?;
        Ok(Driver {
            wire: Arc::new(Mutex::new(Wire {
                socket: Some(socket),
                buf,
                pending: VecDeque::new(),
                limits: ParamLimits::default(),
                advertised,
                send_timeout,
                body_ended: false,
            })),
            shutdown,
            close: false,
            parking,
            request_id: 0,
            buffered: Bytes::new(),
        })
    }

    /// Ends the driver: the connection, if `next_job` ended because it had no request to
    /// serve (and it is still open), and the read buffer, emptied, for the next connection.
    pub fn finish(mut self) -> (Option<ParkedConnection>, BytesMut) {
        let mut wire = lock(&self.wire);
        let mut buf = std::mem::take(&mut wire.buf);
        buf.clear();
        let draining = match self.parking {
            Parking::Parked => None,
            Parking::ParkedDraining => Some(Draining {
                request_id: self.request_id,
                then_close: self.close,
            }),
            _ => return (None, buf),
        };
        let parked = wire.socket.take().map(|socket| ParkedConnection {
            socket,
            handover: Handover {
                buffered: std::mem::take(&mut self.buffered),
                draining,
            },
        });
        (parked, buf)
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
        if parks && !wire.body_ended && !wire.drain_body_soon(self.request_id) {
            // Part of a record may be here: it goes along.
            self.buffered = wire.buf.split().freeze();
            self.parking = Parking::ParkedDraining;
            return None;
        }
        if self.close {
            return None;
        }
        let mut request: Option<(u16, bool, ParamsBuilder)> = None;
        // A head sent slowly, or a stream of records that starts no request, goes to the I/O
        // thread once this passes, so workers stay free for complete requests.
        let deadline = Instant::now() + HEAD_LIMIT;
        loop {
            let wait_briefly = match self.parking {
                Parking::Never | Parking::Parked | Parking::ParkedDraining => None,
                _ if request.is_some() => Some(true),
                Parking::FirstRequest => Some(true),
                // Part of the next request's first record is here: the rest is on its way.
                Parking::NextRequest => Some(!wire.buf.is_empty()),
            };
            // A shutdown stops the wait for a request, never one half received.
            let started = request.is_some();
            let stop = || !started && shutdown.reason().is_some();
            let next = match wait_briefly {
                Some(_) if Instant::now() >= deadline => Ok(Soon::Quiet),
                Some(wait) => wire.next_record_soon(wait, Some(deadline)),
                None => wire
                    .next_record(&stop)
                    .map(|record| record.map_or(Soon::End, Soon::Record)),
            };
            let record = match next {
                Ok(Soon::Record(record)) => record,
                // A request head that stalls, or takes longer than `HEAD_LIMIT`, goes to the I/O
                // thread, encoded again as far as it came, so a client sending it slowly does
                // not hold a worker.
                Ok(Soon::Quiet) => {
                    let mut buffered = BytesMut::new();
                    if let Some((request_id, keep_conn, params)) = &request {
                        protocol::encode_begin_request(
                            &mut buffered,
                            *request_id,
                            Role::Responder,
                            *keep_conn,
                        );
                        let mut stream = BytesMut::new();
                        params.replay(&mut stream);
                        protocol::encode_stream(
                            &mut buffered,
                            protocol::RecordType::Params,
                            *request_id,
                            &stream,
                        );
                    }
                    buffered.extend_from_slice(&wire.buf.split());
                    self.buffered = buffered.freeze();
                    self.parking = Parking::Parked;
                    return None;
                }
                Ok(Soon::End) => return None,
                Err(e) => {
                    tracing::warn!("connection closed: {e}");
                    return None;
                }
            };
            let answered = match record {
                Record::BeginRequest {
                    request_id,
                    role,
                    keep_conn,
                } => match &request {
                    Some((id, ..)) if *id == request_id => {
                        tracing::warn!(
                            request_id,
                            "duplicate FCGI_BEGIN_REQUEST for a running request ignored"
                        );
                        Ok(())
                    }
                    Some(_) => wire.refuse_second(request_id),
                    None if role != Role::Responder => {
                        tracing::warn!(
                            request_id,
                            ?role,
                            "only the RESPONDER role is served: FCGI_UNKNOWN_ROLE"
                        );
                        wire.end_request(request_id, ProtocolStatus::UnknownRole)
                    }
                    None => {
                        request = Some((request_id, keep_conn, ParamsBuilder::new(wire.limits)));
                        Ok(())
                    }
                },
                Record::Params {
                    request_id,
                    content,
                } => match &mut request {
                    Some((id, _, params)) if *id == request_id && !content.is_empty() => {
                        if let Err(e) = params.push(&content) {
                            tracing::warn!("connection closed: protocol error: {e}");
                            return None;
                        }
                        Ok(())
                    }
                    Some((id, ..)) if *id == request_id => {
                        let (request_id, keep_conn, params) = request.take()?;
                        let params = match params.finish() {
                            Ok(params) => params,
                            Err(e) => {
                                tracing::warn!("connection closed: protocol error: {e}");
                                return None;
                            }
                        };
                        self.close = !keep_conn;
                        if self.parking == Parking::FirstRequest {
                            self.parking = Parking::NextRequest;
                        }
                        wire.body_ended = false;
                        self.request_id = request_id;
                        drop(wire);
                        return Some(self.job(request_id, params));
                    }
                    _ => Ok(()),
                },
                Record::AbortRequest { request_id } => match &request {
                    Some((id, ..)) if *id == request_id => {
                        tracing::info!(
                            request_id,
                            "request aborted by the web server before it started"
                        );
                        request = None;
                        wire.end_request(request_id, ProtocolStatus::RequestComplete)
                    }
                    _ => Ok(()),
                },
                // The rest of a body nobody read, and strays, are dropped here.
                Record::Stdin { .. } | Record::Data { .. } => Ok(()),
                other => match wire.answer_management(&other) {
                    Ok(true) => Ok(()),
                    Ok(false) => {
                        tracing::warn!("ignoring a record only an application may send");
                        Ok(())
                    }
                    Err(e) => Err(e),
                },
            };
            if let Err(e) = answered {
                tracing::warn!("connection closed: {e}");
                return None;
            }
        }
    }

    fn job(&self, request_id: u16, params: protocol::Params) -> Job {
        let aborted = Arc::new(AtomicBool::new(false));
        Job {
            params,
            body: BodyStream::new(Box::new(DirectBody {
                wire: self.wire.clone(),
                request_id,
                aborted: aborted.clone(),
                done: false,
            })),
            response: ResponseSink::new(
                request_id,
                Box::new(DirectOutput {
                    wire: self.wire.clone(),
                    request_id,
                    aborted,
                }),
            ),
        }
    }
}

impl ParkedConnection {
    pub fn fresh(socket: Socket) -> ParkedConnection {
        ParkedConnection {
            socket,
            handover: Handover::default(),
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

/// `wsgi.input` read straight from the socket.
struct DirectBody {
    wire: Arc<Mutex<Wire>>,
    request_id: u16,
    aborted: Arc<AtomicBool>,
    done: bool,
}

impl BodySource for DirectBody {
    fn next_blocking(&mut self) -> Result<Option<Bytes>, BodyInterrupted> {
        if self.done {
            return Ok(None);
        }
        let mut wire = lock(&self.wire);
        loop {
            match wire.next_record(&|| false) {
                Ok(Some(Record::Stdin {
                    request_id,
                    content,
                })) if request_id == self.request_id => {
                    if content.is_empty() {
                        self.done = true;
                        wire.body_ended = true;
                        return Ok(None);
                    }
                    return Ok(Some(content));
                }
                Ok(Some(Record::AbortRequest { request_id })) if request_id == self.request_id => {
                    tracing::info!(request_id, "request aborted by the web server");
                    self.aborted.store(true, Ordering::Release);
                    return Err(BodyInterrupted);
                }
                Ok(Some(Record::BeginRequest { request_id, .. })) => {
                    if wire.refuse_second(request_id).is_err() {
                        return Err(BodyInterrupted);
                    }
                }
                Ok(Some(other)) => {
                    if wire.answer_management(&other).is_err() {
                        return Err(BodyInterrupted);
                    }
                }
                Ok(None) | Err(_) => return Err(BodyInterrupted),
            }
        }
    }
}

/// The response, written straight to the socket.
struct DirectOutput {
    wire: Arc<Mutex<Wire>>,
    request_id: u16,
    aborted: Arc<AtomicBool>,
}

impl OutputTarget for DirectOutput {
    /// Writing may block on a slow web server, so the caller first releases the GIL and then
    /// calls `send_blocking`.
    fn try_send(&self, output: Output) -> Result<(), TrySendError> {
        Err(TrySendError::Full(output))
    }

    fn send_blocking(&self, output: Output) -> Result<(), ResponseGone> {
        let mut wire = lock(&self.wire);
        match output {
            Output::Records(records) => {
                if self.is_aborted() || wire.aborted_since(self.request_id) {
                    self.aborted.store(true, Ordering::Release);
                    tracing::info!(
                        request_id = self.request_id,
                        "request aborted by the web server"
                    );
                    return Err(ResponseGone);
                }
                wire.write_all(&records).map_err(|_| ResponseGone)
            }
            Output::End(_) if self.is_aborted() => wire
                .end_request(self.request_id, ProtocolStatus::RequestComplete)
                .map_err(|_| ResponseGone),
            Output::End(records) => wire.write_all(&records).map_err(|_| ResponseGone),
        }
    }

    fn is_aborted(&self) -> bool {
        self.aborted.load(Ordering::Acquire)
    }
}
