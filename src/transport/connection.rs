//! The tokio driver: one FastCGI connection served by a task, its requests run by workers
//! through the job queue.
//!
//! The protocol is the connection's `Session`; this moves bytes between it and the socket and
//! its events to and from the worker. A request is queued once its parameters are complete, so
//! the application starts while the body is still arriving. The body goes to the application
//! through a small bounded channel; while it is full this task stops reading the socket, which
//! is the backpressure the web server feels.

use std::io::{self, IoSlice};
use std::sync::Arc;

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;

use super::queue::{JobQueue, SubmitError};
use super::ConnectionError;
use crate::exchange::{self, BodyEvent, JobHandles, Output, ResponseEncoder};
use crate::protocol::{self, Advertised, Event, ParamLimits, ProtocolError, Session};
use crate::shutdown::Shutdown;

/// The log line of a connection closed for `WSGI_IDLE_TIMEOUT` (here, or parked with the I/O
/// thread by a worker, `server.rs`).
pub fn log_idle_close(limit: std::time::Duration) {
    tracing::info!("connection idle for {limit:?}: closed");
}

/// What every connection of a server shares.
pub struct ServerContext {
    pub jobs: JobQueue,
    pub param_limits: ParamLimits,
    /// FCGI_MAX_CONNS (connections served at once) and FCGI_MAX_REQS.
    pub advertised: Advertised,
    /// FCGI_WEB_SERVER_ADDRS: TCP peers allowed to connect; `None` allows all.
    pub allowed_peers: Option<Vec<std::net::IpAddr>>,
    /// How long a connection may sit without a request in progress before it is closed.
    pub idle_timeout: Option<std::time::Duration>,
    /// How long a write may put nothing out before the connection is closed.
    pub send_timeout: Option<std::time::Duration>,
    /// How long a request head may take to arrive before the connection is closed.
    pub header_timeout: Option<std::time::Duration>,
}

impl ServerContext {
    /// The session of a new connection.
    pub fn session(&self) -> Session {
        Session::new(self.param_limits, self.advertised, BytesMut::new())
    }
}

/// The request a worker runs.
struct Running {
    handles: JobHandles,
    /// `None` once the body is complete, or once the application stopped listening.
    body: Option<mpsc::Sender<BodyEvent>>,
    /// A STDIN record waiting for room in the body channel; no record is read meanwhile.
    pending_body: Option<BodyEvent>,
}

pub struct Connection<S> {
    stream: S,
    session: Session,
    running: Option<Running>,
    context: Arc<ServerContext>,
    shutdown: Shutdown,
    peer_closed: bool,
    /// A shutdown started: the connection closes once idle.
    shutting_down: bool,
    /// After a shutdown started: until then an idle connection still takes the request a web
    /// server may already have sent, so nothing in flight is cut off by the race.
    linger_until: Option<tokio::time::Instant>,
    /// When the last bytes arrived, and the timer that closes an idle connection.
    idle_since: tokio::time::Instant,
    idle_timer: std::pin::Pin<Box<tokio::time::Sleep>>,
    /// The timer that closes a connection whose head takes longer than `WSGI_HEADER_TIMEOUT`,
    /// and when it fires.
    head_deadline: Option<tokio::time::Instant>,
    head_timer: std::pin::Pin<Box<tokio::time::Sleep>>,
}

/// How long an idle connection waits for a request already on its way when a shutdown starts.
const LINGER: std::time::Duration = std::time::Duration::from_millis(100);

/// The most one read takes: a body record whole (64 KiB of content and its header).
const READ_SIZE: usize = 64 * 1024 + 16;

thread_local! {
    /// Where reads land first: a connection keeps only what a read brought and it has not yet
    /// decoded, so one waiting for its response holds no read buffer (100 connections waiting
    /// on slow requests held 1.6 MiB of them).
    static READ_SCRATCH: std::cell::RefCell<Box<[u8]>> =
        std::cell::RefCell::new(vec![0; READ_SIZE].into_boxed_slice());
}

/// Reads what `stream` has into the thread's scratch buffer and appends it to `buf`.
async fn read_appending<S: AsyncRead + Unpin>(
    stream: &mut S,
    buf: &mut BytesMut,
) -> io::Result<usize> {
    std::future::poll_fn(|cx| {
        READ_SCRATCH.with_borrow_mut(|scratch| {
            let mut read = tokio::io::ReadBuf::new(scratch);
            std::task::ready!(std::pin::Pin::new(&mut *stream).poll_read(cx, &mut read))?;
            buf.extend_from_slice(read.filled());
            std::task::Poll::Ready(Ok(read.filled().len()))
        })
    })
    .await
}

impl<S: AsyncRead + AsyncWrite + Unpin> Connection<S> {
    /// Serves `stream` from where `session` is: a new one, or one a worker handed over (a head
    /// half received, a body still arriving).
    pub fn new(
        stream: S,
        session: Session,
        context: Arc<ServerContext>,
        shutdown: Shutdown,
    ) -> Self {
        Connection {
            stream,
            session,
            running: None,
            context,
            shutdown,
            peer_closed: false,
            shutting_down: false,
            linger_until: None,
            idle_since: tokio::time::Instant::now(),
            idle_timer: Box::pin(tokio::time::sleep(std::time::Duration::ZERO)),
            head_deadline: None,
            head_timer: Box::pin(tokio::time::sleep(std::time::Duration::ZERO)),
        }
    }

    /// Serves requests until the web server closes the connection, a request without
    /// FCGI_KEEP_CONN is answered, or a shutdown finds the connection idle.
    pub async fn run(&mut self) -> Result<(), ConnectionError> {
        loop {
            self.process_buffered()?;
            if let Some(replies) = self.session.take_replies() {
                let send_timeout = self.context.send_timeout;
                write_all_vectored(&mut self.stream, &mut [replies], send_timeout).await?;
            }
            if self.is_done() {
                let _ = self.stream.shutdown().await;
                return Ok(());
            }
            let reading = !self.peer_closed && !self.has_pending_body();
            let buf = self.session.read_buf();
            if buf.is_empty() {
                // Let go of the memory its records were read into (their body chunks keep
                // what they still need): the next read allocates what it brings.
                *buf = BytesMut::new();
            }
            let idle_limit = self.context.idle_timeout.filter(|_| self.running.is_none());
            // One timer for the connection's life, moved forward as bytes arrive.
            if let Some(limit) = idle_limit {
                self.idle_timer.as_mut().reset(self.idle_since + limit);
            }
            let head_limit = self.head_limit();
            tokio::select! {
                () = &mut self.idle_timer, if idle_limit.is_some() => {
                    log_idle_close(idle_limit.unwrap_or_default());
                    return Ok(());
                }
                () = &mut self.head_timer, if head_limit.is_some() => {
                    tracing::warn!(
                        "request head not complete within {:?} (WSGI_HEADER_TIMEOUT): \
                         connection closed",
                        head_limit.unwrap_or_default()
                    );
                    return Ok(());
                }
                wake = running_event(&mut self.running) => match wake {
                    Wake::Output(output) => self.write_output(output).await?,
                    Wake::BodyDelivered(true) => {}
                    Wake::BodyDelivered(false) => self.stop_feeding_body(),
                },
                read = read_appending(&mut self.stream, self.session.read_buf()), if reading => {
                    if read? == 0 {
                        self.session.end_of_stream()?;
                        self.peer_closed = true;
                        // A FastCGI web server closes only when it gives up on the request: the
                        // application may stop (an ASGI one waiting for http.disconnect learns it).
                        if let Some(running) = &self.running {
                            running.handles.abort();
                        }
                        // The body can never complete; wsgi.input reports the interruption.
                        self.stop_feeding_body();
                    }
                    self.idle_since = tokio::time::Instant::now();
                }
                _ = self.shutdown.started(), if !self.shutting_down => {
                    self.shutting_down = true;
                    if self.session.is_idle() {
                        self.linger_until = Some(tokio::time::Instant::now() + LINGER);
                    }
                }
                _ = crate::sleep_until(self.linger_until) => self.linger_until = None,
            }
        }
    }

    /// `WSGI_HEADER_TIMEOUT` while a request head is arriving (as nginx's
    /// `client_header_timeout`): a client sending it slowly, byte by byte, cannot keep the
    /// connection for ever. The session says when the head started.
    fn head_limit(&mut self) -> Option<std::time::Duration> {
        let limit = self.context.header_timeout?;
        let now = tokio::time::Instant::now().into_std();
        let deadline = self
            .session
            .head_deadline(now, limit)
            .map(tokio::time::Instant::from_std);
        if deadline != self.head_deadline {
            self.head_deadline = deadline;
            if let Some(deadline) = deadline {
                self.head_timer.as_mut().reset(deadline);
            }
        }
        deadline.map(|_| limit)
    }

    fn has_pending_body(&self) -> bool {
        matches!(&self.running, Some(r) if r.pending_body.is_some())
    }

    fn is_done(&self) -> bool {
        if self.running.is_some() {
            return false;
        }
        if self.peer_closed {
            // With a request half-sent, nothing more can arrive either.
            return true;
        }
        // Closing with a body still arriving would reset the connection under a web server
        // that is still writing it, and it might lose the response.
        self.session.is_idle()
            && !self.session.is_draining()
            && (self.session.is_closing() || (self.shutting_down && self.linger_until.is_none()))
    }

    /// Handles the records already read, stopping at a body record that has to wait for room.
    fn process_buffered(&mut self) -> Result<(), ProtocolError> {
        while !self.has_pending_body() {
            // A shutdown turns new requests away, after the linger for one on its way.
            self.session
                .set_accepting(!self.shutting_down || self.linger_until.is_some());
            let Some(event) = self.session.next_event()? else {
                break;
            };
            match event {
                Event::Request { request_id, params } => self.start(request_id, params),
                Event::Body(data) => self.feed_body(BodyEvent::Data(data)),
                Event::BodyEnd => self.feed_body(BodyEvent::End),
                Event::Aborted => {
                    if let Some(running) = &mut self.running {
                        running.handles.abort();
                        // Closing the body channel wakes an application blocked on wsgi.input.
                        self.stop_feeding_body();
                    }
                }
                Event::Refused { request_id } => {
                    self.refuse(request_id, "the server is shutting down")
                }
            }
        }
        if !self.session.is_idle() {
            // A request began: the linger has served its purpose.
            self.linger_until = None;
        }
        Ok(())
    }

    /// Queues the job for a worker, or answers 503 at once when every worker and queue slot is
    /// taken.
    fn start(&mut self, request_id: u16, params: protocol::Params) {
        let (job, handles, body) = exchange::job(request_id, params);
        match self.context.jobs.submit(job) {
            Ok(()) => {}
            Err(SubmitError::Full) => {
                crate::ops::metrics::refused_queue_full();
                return self.refuse(request_id, "every worker is busy and the queue is full");
            }
            Err(SubmitError::Closed) => {
                return self.refuse(request_id, "the server is shutting down")
            }
        }
        self.running = Some(Running {
            body: Some(body),
            handles,
            pending_body: None,
        });
    }

    /// Answers `503 Service Unavailable` with Retry-After and drops the rest of the request.
    fn refuse(&mut self, request_id: u16, reason: &str) {
        tracing::warn!(request_id, "request refused with 503: {reason}");
        let mut encoder = ResponseEncoder::new(request_id);
        exchange::simple_response(
            &mut encoder,
            "503 Service Unavailable",
            &[("Retry-After", "1")],
            b"Service Unavailable\n",
        );
        self.session.refuse(&encoder.finish(0));
    }

    /// Passes a piece of the body on, or keeps it while the channel is full.
    fn feed_body(&mut self, event: BodyEvent) {
        let Some(running) = &mut self.running else {
            return;
        };
        let Some(body) = &running.body else {
            return; // the application no longer reads: drain
        };
        let ended = matches!(event, BodyEvent::End);
        match body.try_send(event) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(event)) => running.pending_body = Some(event),
            Err(mpsc::error::TrySendError::Closed(_)) => running.body = None,
        }
        if ended && running.pending_body.is_none() {
            running.body = None;
        }
    }

    fn stop_feeding_body(&mut self) {
        if let Some(running) = &mut self.running {
            running.body = None;
            running.pending_body = None;
        }
    }

    async fn write_output(&mut self, output: Option<Output>) -> Result<(), ConnectionError> {
        let Some(running) = &mut self.running else {
            return Ok(());
        };
        let aborted = running.handles.is_aborted();
        let request_id = self.session.running().unwrap_or_default();
        // Coalesce what the worker has already queued into one vectored write.
        let mut batch: Vec<Bytes> = Vec::new();
        let mut next = output;
        loop {
            match next {
                Some(Output::Records(records)) => {
                    if !aborted {
                        batch.push(records);
                    }
                }
                Some(Output::End(records)) => {
                    batch.push(self.session.end_response(records, aborted));
                    self.running = None;
                    break;
                }
                None => {
                    // The worker dropped the job without ending it (it cannot, by construction,
                    // but a lost END_REQUEST would hang the web server): end it here.
                    tracing::error!(
                        request_id,
                        "worker ended the request without FCGI_END_REQUEST"
                    );
                    batch.push(
                        self.session
                            .end_response(protocol::end_request(request_id, 1), false),
                    );
                    self.running = None;
                    break;
                }
            }
            next = match running.handles.output.try_recv() {
                Ok(output) => Some(output),
                Err(_) => break,
            };
        }
        write_all_vectored(&mut self.stream, &mut batch, self.context.send_timeout).await?;
        Ok(())
    }
}

enum Wake {
    /// The next batch of the running request's response.
    Output(Option<Output>),
    /// The waiting body record was delivered (false: the application no longer reads the body).
    BodyDelivered(bool),
}

/// Waits for the running request's worker; never resolves while no request runs.
async fn running_event(running: &mut Option<Running>) -> Wake {
    let Some(Running {
        handles,
        body,
        pending_body,
    }) = running
    else {
        return std::future::pending().await;
    };
    tokio::select! {
        output = handles.output.recv() => Wake::Output(output),
        delivered = deliver_pending_body(body, pending_body) => Wake::BodyDelivered(delivered),
    }
}

async fn deliver_pending_body(
    body: &mut Option<mpsc::Sender<BodyEvent>>,
    pending: &mut Option<BodyEvent>,
) -> bool {
    let Some(sender) = body.as_ref().filter(|_| pending.is_some()) else {
        return std::future::pending().await;
    };
    let Ok(permit) = sender.reserve().await else {
        return false;
    };
    if let Some(event) = pending.take() {
        let ended = matches!(event, BodyEvent::End);
        permit.send(event);
        if ended {
            *body = None;
        }
    }
    true
}

/// Writes every buffer, using one system call for as many as the kernel takes at once. A write
/// that can put nothing out for `timeout` fails: a web server that never reads cannot keep the
/// connection, while a slow one that reads keeps it.
async fn write_all_vectored<S: AsyncWrite + Unpin>(
    stream: &mut S,
    buffers: &mut [Bytes],
    timeout: Option<std::time::Duration>,
) -> io::Result<()> {
    let mut first = 0;
    while first < buffers.len() {
        if buffers[first].is_empty() {
            first += 1;
            continue;
        }
        let slices: Vec<IoSlice<'_>> = buffers[first..].iter().map(|b| IoSlice::new(b)).collect();
        let write = stream.write_vectored(&slices);
        let mut written = match timeout {
            Some(limit) => tokio::time::timeout(limit, write).await.map_err(|_| {
                io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("the web server took nothing for {limit:?} (WSGI_SEND_TIMEOUT)"),
                )
            })??,
            None => write.await?,
        };
        if written == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        while written > 0 {
            let chunk = &mut buffers[first];
            let n = written.min(chunk.len());
            chunk.advance(n);
            written -= n;
            if chunk.is_empty() {
                first += 1;
            }
        }
    }
    stream.flush().await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{encode_begin_request, encode_end_of_stream, RecordType, Role};

    /// A connection whose request's records are all decoded holds no read buffer.
    #[tokio::test]
    async fn a_connection_lets_go_of_its_read_buffer_once_the_records_are_taken() {
        let mut request = BytesMut::new();
        encode_begin_request(&mut request, 1, Role::Responder, false);
        let mut pairs = BytesMut::new();
        protocol::encode_name_value(&mut pairs, b"REQUEST_METHOD", b"GET");
        protocol::encode_stream(&mut request, RecordType::Params, 1, &pairs);
        encode_end_of_stream(&mut request, RecordType::Params, 1);
        encode_end_of_stream(&mut request, RecordType::Stdin, 1);

        let (jobs, receiver) = super::super::queue::bounded(1);
        let context = Arc::new(ServerContext {
            jobs,
            param_limits: ParamLimits::default(),
            advertised: Advertised::ONE,
            allowed_peers: None,
            idle_timeout: None,
            send_timeout: None,
            header_timeout: None,
        });
        let (_trigger, shutdown) = crate::shutdown::channel();
        let (mut client, server) = tokio::io::duplex(64 << 10);
        let mut connection = Connection::new(server, context.session(), context.clone(), shutdown);
        client.write_all(&request).await.unwrap();
        client.shutdown().await.unwrap();
        // The worker drops the job unanswered: the connection ends the request and returns.
        let worker = std::thread::spawn(move || drop(receiver.recv()));
        connection.run().await.unwrap();
        worker.join().unwrap();
        assert_eq!(connection.session.read_buf().capacity(), 0);
    }
}
