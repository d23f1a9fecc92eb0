//! One FastCGI connection: reads records, runs one request at a time through a worker, writes
//! the worker's records back.
//!
//! BEGIN_REQUEST → PARAMS… → empty PARAMS (the job is queued now, so the application starts
//! while the body is still arriving) → STDIN… → empty STDIN. The body goes to the application
//! through a small bounded channel; while it is full this task stops reading the socket, which
//! is the backpressure the web server feels. Records of a request that is already answered (the
//! rest of a body the application did not read) are drained, so the connection stays usable.
//!
//! A second BEGIN_REQUEST while a request runs is answered FCGI_CANT_MPX_CONN: IIS never
//! multiplexes, and GET_VALUES says FCGI_MPXS_CONNS=0.

use std::fmt;
use std::io::{self, IoSlice};
use std::sync::Arc;

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;

use crate::exchange::{self, BodyEvent, JobHandles, Output, ResponseEncoder};
use crate::protocol::{
    self, ParamLimits, ParamsBuilder, ProtocolError, ProtocolStatus, Record, RecordDecoder, Role,
};
use crate::shutdown::Shutdown;
use crate::worker::{JobQueue, SubmitError};

/// Where a worker (`direct.rs`) left a connection it hands to the I/O thread; nothing for a
/// connection the I/O thread accepted itself.
#[derive(Debug, Default)]
pub struct Handover {
    /// Bytes read but not served: a request head that stalled (encoded again) and what followed.
    pub buffered: Bytes,
    /// An answered request whose body is still arriving.
    pub draining: Option<Draining>,
}

/// An answered request whose body is still arriving.
#[derive(Debug, Clone, Copy)]
pub struct Draining {
    pub request_id: u16,
    /// It had no FCGI_KEEP_CONN: close once its body has ended.
    pub then_close: bool,
}

/// The log line of a connection closed for `WSGI_IDLE_TIMEOUT` (here, or parked with the I/O
/// thread by a worker, `server.rs`).
pub fn log_idle_close(limit: std::time::Duration) {
    tracing::info!("connection idle for {limit:?}: closed");
}

/// What every connection of a server shares.
pub struct ServerContext {
    pub jobs: JobQueue,
    pub param_limits: ParamLimits,
    /// FCGI_MAX_CONNS and FCGI_MAX_REQS as GET_VALUES reports them.
    pub max_conns: usize,
    pub max_reqs: usize,
    /// FCGI_WEB_SERVER_ADDRS: TCP peers allowed to connect; `None` allows all.
    pub allowed_peers: Option<Vec<std::net::IpAddr>>,
    /// How long a connection may sit without a request in progress before it is closed.
    pub idle_timeout: Option<std::time::Duration>,
    /// How long a write may put nothing out before the connection is closed.
    pub send_timeout: Option<std::time::Duration>,
    /// How long a request head may take to arrive before the connection is closed.
    pub header_timeout: Option<std::time::Duration>,
}

/// Why a connection ended early.
#[derive(Debug)]
pub enum ConnectionError {
    Io(io::Error),
    Protocol(ProtocolError),
}

impl fmt::Display for ConnectionError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConnectionError::Io(e) => write!(f, "I/O error: {e}"),
            ConnectionError::Protocol(e) => write!(f, "protocol error: {e}"),
        }
    }
}

impl From<io::Error> for ConnectionError {
    fn from(e: io::Error) -> Self {
        ConnectionError::Io(e)
    }
}

impl From<ProtocolError> for ConnectionError {
    fn from(e: ProtocolError) -> Self {
        ConnectionError::Protocol(e)
    }
}

enum State {
    Idle,
    ReadingParams {
        request_id: u16,
        keep_conn: bool,
        params: ParamsBuilder,
    },
    Running(Running),
}

struct Running {
    request_id: u16,
    keep_conn: bool,
    handles: JobHandles,
    /// `None` once the body is complete, or once the application stopped listening.
    body: Option<mpsc::Sender<BodyEvent>>,
    /// A STDIN record waiting for room in the body channel; no record is read meanwhile.
    pending_body: Option<BodyEvent>,
}

pub struct Connection<S> {
    stream: S,
    read_buf: BytesMut,
    decoder: RecordDecoder,
    /// Records this task answers itself (GET_VALUES_RESULT, refusals), written before reading on.
    replies: BytesMut,
    state: State,
    /// A request answered before its body was complete: its remaining STDIN is dropped.
    draining: Option<u16>,
    context: Arc<ServerContext>,
    shutdown: Shutdown,
    peer_closed: bool,
    close_after_request: bool,
    /// After a shutdown started: until then an idle connection still takes the request a web
    /// server may already have sent, so nothing in flight is cut off by the race.
    linger_until: Option<tokio::time::Instant>,
    /// When the last bytes arrived, and the timer that closes an idle connection.
    idle_since: tokio::time::Instant,
    idle_timer: std::pin::Pin<Box<tokio::time::Sleep>>,
    /// When the request head in progress (a partial record, or parameters) started, and the
    /// timer that closes a connection whose head takes longer than `WSGI_HEADER_TIMEOUT`.
    head_since: Option<tokio::time::Instant>,
    head_timer: std::pin::Pin<Box<tokio::time::Sleep>>,
}

/// How long an idle connection waits for a request already on its way when a shutdown starts.
const LINGER: std::time::Duration = std::time::Duration::from_millis(100);

/// Room kept for the next read: enough for a typical request's records in one read; a larger
/// record gets the room it needs (`RecordDecoder::bytes_needed`).
const READ_ROOM: usize = 16 * 1024;

impl<S: AsyncRead + AsyncWrite + Unpin> Connection<S> {
    pub fn new(stream: S, context: Arc<ServerContext>, shutdown: Shutdown) -> Self {
        Connection {
            stream,
            read_buf: BytesMut::with_capacity(READ_ROOM),
            decoder: RecordDecoder,
            replies: BytesMut::new(),
            state: State::Idle,
            draining: None,
            context,
            shutdown,
            peer_closed: false,
            close_after_request: false,
            linger_until: None,
            idle_since: tokio::time::Instant::now(),
            idle_timer: Box::pin(tokio::time::sleep(std::time::Duration::ZERO)),
            head_since: None,
            head_timer: Box::pin(tokio::time::sleep(std::time::Duration::ZERO)),
        }
    }

    /// Picks up where a worker left the connection: the bytes it read but did not serve, and a
    /// body still arriving, which is drained before the connection closes or (FCGI_KEEP_CONN)
    /// serves its next request.
    pub fn resume(mut self, from: Handover) -> Self {
        self.read_buf.extend_from_slice(&from.buffered);
        if let Some(draining) = from.draining {
            self.draining = Some(draining.request_id);
            self.close_after_request = draining.then_close;
        }
        self
    }

    /// Serves requests until the web server closes the connection, a request without
    /// FCGI_KEEP_CONN is answered, or a shutdown finds the connection idle.
    pub async fn run(&mut self) -> Result<(), ConnectionError> {
        loop {
            self.process_buffered()?;
            if !self.replies.is_empty() {
                let mut replies = [self.replies.split().freeze()];
                let send_timeout = self.context.send_timeout;
                write_all_vectored(&mut self.stream, &mut replies, send_timeout).await?;
            }
            if self.is_done() {
                let _ = self.stream.shutdown().await;
                return Ok(());
            }
            let reading = !self.peer_closed && !self.has_pending_body();
            let idle_limit = self
                .context
                .idle_timeout
                .filter(|_| !matches!(self.state, State::Running(_)));
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
                wake = running_event(&mut self.state) => match wake {
                    Wake::Output(output) => self.write_output(output).await?,
                    Wake::BodyDelivered(true) => {}
                    Wake::BodyDelivered(false) => self.stop_feeding_body(),
                },
                read = self.stream.read_buf(&mut self.read_buf), if reading => {
                    if read? == 0 {
                        self.decoder.finish(&self.read_buf)?;
                        self.on_peer_closed();
                    }
                    let needed = RecordDecoder::bytes_needed(&self.read_buf);
                    self.read_buf.reserve(needed.max(READ_ROOM));
                    self.idle_since = tokio::time::Instant::now();
                }
                _ = self.shutdown.started(), if !self.close_after_request => {
                    self.close_after_request = true;
                    if matches!(self.state, State::Idle) {
                        self.linger_until = Some(tokio::time::Instant::now() + LINGER);
                    }
                }
                _ = linger(self.linger_until) => self.linger_until = None,
            }
        }
    }

    /// `WSGI_HEADER_TIMEOUT` while a request head is arriving (as nginx's
    /// `client_header_timeout`): a client sending it slowly, byte by byte, cannot keep the
    /// connection for ever. Starts the head's timer when the head starts.
    fn head_limit(&mut self) -> Option<std::time::Duration> {
        let arriving = match self.state {
            State::ReadingParams { .. } => true,
            // Part of a record that is not the rest of an answered request's body.
            State::Idle => self.draining.is_none() && !self.read_buf.is_empty(),
            State::Running(_) => false,
        };
        let limit = self.context.header_timeout.filter(|_| arriving);
        match (limit, self.head_since) {
            (Some(limit), None) => {
                let now = tokio::time::Instant::now();
                self.head_since = Some(now);
                self.head_timer.as_mut().reset(now + limit);
            }
            (None, Some(_)) => self.head_since = None,
            _ => {}
        }
        limit
    }

    fn has_pending_body(&self) -> bool {
        matches!(&self.state, State::Running(r) if r.pending_body.is_some())
    }

    fn is_done(&self) -> bool {
        match &self.state {
            State::Running(_) => false,
            // The peer closed with a request half-sent: nothing more can arrive.
            State::ReadingParams { .. } => self.peer_closed,
            // Closing with a body still arriving would reset the connection under a web
            // server that is still writing it, and it might lose the response.
            State::Idle => {
                self.peer_closed
                    || (self.close_after_request && !self.lingering() && self.draining.is_none())
            }
        }
    }

    fn lingering(&self) -> bool {
        self.linger_until.is_some()
    }

    /// Handles the records already read, stopping at a body record that has to wait for room.
    fn process_buffered(&mut self) -> Result<(), ProtocolError> {
        while !self.has_pending_body() {
            match self.decoder.decode(&mut self.read_buf)? {
                Some(record) => self.on_record(record)?,
                None => break,
            }
        }
        Ok(())
    }

    fn on_record(&mut self, record: Record) -> Result<(), ProtocolError> {
        match record {
            Record::BeginRequest {
                request_id,
                role,
                keep_conn,
            } => self.on_begin(request_id, role, keep_conn),
            Record::Params {
                request_id,
                content,
            } => self.on_params(request_id, content)?,
            Record::Stdin {
                request_id,
                content,
            } => self.on_stdin(request_id, content),
            Record::AbortRequest { request_id } => self.on_abort(request_id),
            Record::GetValues { content } => self.on_get_values(&content)?,
            Record::Data { request_id, .. } => {
                tracing::debug!(
                    request_id,
                    "ignoring FCGI_DATA: only the RESPONDER role is served"
                );
            }
            Record::Unknown { record_type, .. } => {
                tracing::warn!(
                    record_type,
                    "unknown FastCGI record type; answered FCGI_UNKNOWN_TYPE"
                );
                protocol::encode_unknown_type(&mut self.replies, record_type);
            }
            Record::EndRequest { request_id, .. }
            | Record::Stdout { request_id, .. }
            | Record::Stderr { request_id, .. } => {
                tracing::warn!(request_id, "ignoring a record only an application may send");
            }
            Record::GetValuesResult { .. } | Record::UnknownType { .. } => {
                tracing::warn!("ignoring a management record only an application may send");
            }
        }
        Ok(())
    }

    fn on_begin(&mut self, request_id: u16, role: Role, keep_conn: bool) {
        match &self.state {
            State::Idle => {}
            State::ReadingParams { request_id: id, .. }
            | State::Running(Running { request_id: id, .. })
                if *id == request_id =>
            {
                tracing::warn!(
                    request_id,
                    "duplicate FCGI_BEGIN_REQUEST for a running request ignored"
                );
                return;
            }
            _ => {
                tracing::warn!(
                    request_id,
                    "second request on a busy connection: FCGI_CANT_MPX_CONN"
                );
                protocol::encode_end_request(
                    &mut self.replies,
                    request_id,
                    0,
                    ProtocolStatus::CantMpxConn,
                );
                return;
            }
        }
        self.draining = None;
        if self.close_after_request && !self.lingering() {
            // A shutdown started: requests already begun finish, new ones are turned away.
            return self.refuse(request_id, keep_conn, "the server is shutting down");
        }
        self.linger_until = None;
        if role != Role::Responder {
            tracing::warn!(
                request_id,
                ?role,
                "only the RESPONDER role is served: FCGI_UNKNOWN_ROLE"
            );
            protocol::encode_end_request(
                &mut self.replies,
                request_id,
                0,
                ProtocolStatus::UnknownRole,
            );
            return;
        }
        self.state = State::ReadingParams {
            request_id,
            keep_conn,
            params: ParamsBuilder::new(self.context.param_limits),
        };
    }

    fn on_params(&mut self, request_id: u16, content: Bytes) -> Result<(), ProtocolError> {
        let State::ReadingParams {
            request_id: id,
            params,
            ..
        } = &mut self.state
        else {
            tracing::debug!(
                request_id,
                "FCGI_PARAMS outside a request's parameter stream ignored"
            );
            return Ok(());
        };
        if *id != request_id {
            tracing::debug!(request_id, "FCGI_PARAMS for another request ignored");
            return Ok(());
        }
        if !content.is_empty() {
            return params.push(&content);
        }
        let State::ReadingParams {
            request_id,
            keep_conn,
            params,
        } = std::mem::replace(&mut self.state, State::Idle)
        else {
            unreachable!("matched above");
        };
        self.start(request_id, keep_conn, params.finish()?);
        Ok(())
    }

    /// Queues the job for a worker, or answers 503 at once when every worker and queue slot is
    /// taken.
    fn start(&mut self, request_id: u16, keep_conn: bool, params: protocol::Params) {
        let (job, handles, body) = exchange::job(request_id, params);
        match self.context.jobs.submit(job) {
            Ok(()) => {}
            Err(SubmitError::Full) => {
                return self.refuse(
                    request_id,
                    keep_conn,
                    "every worker is busy and the queue is full",
                )
            }
            Err(SubmitError::Closed) => {
                return self.refuse(request_id, keep_conn, "the server is shutting down")
            }
        }
        self.state = State::Running(Running {
            request_id,
            keep_conn,
            body: Some(body),
            handles,
            pending_body: None,
        });
    }

    /// Answers `503 Service Unavailable` with Retry-After and drops the rest of the request.
    fn refuse(&mut self, request_id: u16, keep_conn: bool, reason: &str) {
        tracing::warn!(request_id, "request refused with 503: {reason}");
        let mut encoder = ResponseEncoder::new(request_id);
        exchange::simple_response(
            &mut encoder,
            "503 Service Unavailable",
            &[("Retry-After", "1")],
            b"Service Unavailable\n",
        );
        self.replies.extend_from_slice(&encoder.finish(0));
        self.draining = Some(request_id);
        if !keep_conn {
            self.close_after_request = true;
        }
    }

    fn on_stdin(&mut self, request_id: u16, content: Bytes) {
        let State::Running(running) = &mut self.state else {
            if self.draining != Some(request_id) {
                tracing::debug!(request_id, "FCGI_STDIN for no running request ignored");
            } else if content.is_empty() {
                self.draining = None;
            }
            return;
        };
        if running.request_id != request_id {
            tracing::debug!(request_id, "FCGI_STDIN for another request ignored");
            return;
        }
        let Some(body) = &running.body else {
            return; // the application no longer reads: drain
        };
        let event = if content.is_empty() {
            BodyEvent::End
        } else {
            BodyEvent::Data(content)
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
        if let State::Running(running) = &mut self.state {
            running.body = None;
            running.pending_body = None;
        }
    }

    fn on_abort(&mut self, request_id: u16) {
        match &mut self.state {
            State::ReadingParams { request_id: id, .. } if *id == request_id => {
                tracing::info!(
                    request_id,
                    "request aborted by the web server before it started"
                );
                protocol::encode_end_request(
                    &mut self.replies,
                    request_id,
                    0,
                    ProtocolStatus::RequestComplete,
                );
                self.state = State::Idle;
            }
            State::Running(running) if running.request_id == request_id => {
                tracing::info!(request_id, "request aborted by the web server");
                running.handles.abort();
                // Closing the body channel wakes an application blocked on wsgi.input.
                running.body = None;
                running.pending_body = None;
            }
            _ => tracing::debug!(
                request_id,
                "FCGI_ABORT_REQUEST for no running request ignored"
            ),
        }
    }

    fn on_get_values(&mut self, content: &Bytes) -> Result<(), ProtocolError> {
        let asked = protocol::decode_name_values(content, &self.context.param_limits)?;
        encode_values_answer(
            &mut self.replies,
            &asked,
            self.context.max_conns,
            self.context.max_reqs,
        );
        Ok(())
    }

    fn on_peer_closed(&mut self) {
        self.peer_closed = true;
        if let State::Running(running) = &mut self.state {
            if running.body.is_some() {
                // The body can never complete; wsgi.input reports the interruption.
                running.body = None;
                running.pending_body = None;
            }
        }
    }

    async fn write_output(&mut self, output: Option<Output>) -> Result<(), ConnectionError> {
        let State::Running(running) = &mut self.state else {
            return Ok(());
        };
        let aborted = running.handles.is_aborted();
        let request_id = running.request_id;
        // Coalesce what the worker has already queued into one vectored write.
        let mut batch: Vec<Bytes> = Vec::new();
        let mut ended = false;
        let mut next = output;
        loop {
            match next {
                Some(Output::Records(records)) => {
                    if !aborted {
                        batch.push(records);
                    }
                }
                Some(Output::End(records)) => {
                    batch.push(if aborted {
                        end_request(request_id, 0)
                    } else {
                        records
                    });
                    ended = true;
                    break;
                }
                None => {
                    // The worker dropped the job without ending it (it cannot, by construction,
                    // but a lost END_REQUEST would hang the web server): end it here.
                    tracing::error!(
                        request_id,
                        "worker ended the request without FCGI_END_REQUEST"
                    );
                    batch.push(end_request(request_id, 1));
                    ended = true;
                    break;
                }
            }
            next = match running.handles.output.try_recv() {
                Ok(output) => Some(output),
                Err(_) => break,
            };
        }
        let keep_conn = running.keep_conn;
        let body_unfinished = running.body.is_some() || running.pending_body.is_some();
        if ended {
            if body_unfinished {
                self.draining = Some(request_id);
            }
            self.state = State::Idle;
            if !keep_conn {
                self.close_after_request = true;
            }
        }
        write_all_vectored(&mut self.stream, &mut batch, self.context.send_timeout).await?;
        Ok(())
    }
}

/// FCGI_END_REQUEST, REQUEST_COMPLETE, on its own.
fn end_request(request_id: u16, app_status: u32) -> Bytes {
    let mut end = BytesMut::new();
    protocol::encode_end_request(
        &mut end,
        request_id,
        app_status,
        ProtocolStatus::RequestComplete,
    );
    end.freeze()
}

/// FCGI_GET_VALUES_RESULT for the variables asked about that this gateway knows; it never
/// multiplexes.
pub(crate) fn encode_values_answer(
    buf: &mut BytesMut,
    asked: &protocol::Params,
    max_conns: usize,
    max_reqs: usize,
) {
    let (max_conns, max_reqs) = (max_conns.to_string(), max_reqs.to_string());
    let known: [(&[u8], &[u8]); 3] = [
        (b"FCGI_MAX_CONNS", max_conns.as_bytes()),
        (b"FCGI_MAX_REQS", max_reqs.as_bytes()),
        (b"FCGI_MPXS_CONNS", b"0"),
    ];
    let answer: Vec<(&[u8], &[u8])> = known
        .into_iter()
        .filter(|(name, _)| asked.get(name).is_some())
        .collect();
    protocol::encode_get_values_result(buf, &answer);
}

async fn linger(until: Option<tokio::time::Instant>) {
    match until {
        Some(until) => tokio::time::sleep_until(until).await,
        None => std::future::pending().await,
    }
}

enum Wake {
    /// The next batch of the running request's response.
    Output(Option<Output>),
    /// The waiting body record was delivered (false: the application no longer reads the body).
    BodyDelivered(bool),
}

/// Waits for the running request's worker; never resolves while no request runs.
async fn running_event(state: &mut State) -> Wake {
    let State::Running(Running {
        handles,
        body,
        pending_body,
        ..
    }) = state
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
