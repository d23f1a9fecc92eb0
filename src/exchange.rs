//! The hand-off between a connection (a tokio task that owns the socket) and a worker (a thread
//! that runs the application).
//!
//! A connection turns a complete PARAMS stream into a [`Job`] and queues it. The worker reads the
//! body from [`BodyStream`] as the application asks for it and sends encoded records back through
//! [`ResponseSink`]. Both channels are small and bounded: a slow application stops the connection
//! from reading the socket, a slow web server stops the application, and memory stays flat.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use tokio::sync::mpsc;

use crate::protocol::{self, Params, ProtocolStatus, RecordType};

/// STDIN records in flight from a connection to its application (each at most 64 KiB).
pub const BODY_QUEUE: usize = 4;
/// Batches of response records in flight to a connection.
pub const OUTPUT_QUEUE: usize = 8;

/// One request, ready for the application.
#[derive(Debug)]
pub struct Job {
    pub params: Params,
    pub body: BodyStream,
    pub response: ResponseSink,
}

/// What a connection feeds the application's `wsgi.input`.
#[derive(Debug)]
pub enum BodyEvent {
    Data(Bytes),
    /// The empty STDIN record: the body is complete.
    End,
}

/// Where a request's body comes from: a connection task through a channel, or (under IIS) the
/// socket itself, read by the application's thread.
pub trait BodySource: Send + Sync {
    /// Blocks the calling thread (never a tokio thread) until the next piece of the body;
    /// `Ok(None)` at its end.
    fn next_blocking(&mut self) -> Result<Option<Bytes>, BodyInterrupted>;
    /// The connection task's channel, for a consumer that awaits the body rather than block a
    /// thread on it (the ASGI bridge); `None` when the consumer's thread reads the socket.
    fn channel(&mut self) -> Option<&mut mpsc::Receiver<BodyEvent>> {
        None
    }
}

/// Where a request's response goes.
pub trait OutputTarget: Send + Sync {
    /// Queues a batch without blocking, or gives it back (`Full`) when that would block.
    fn try_send(&self, output: Output) -> Result<(), TrySendError>;
    /// Delivers a batch, waiting as long as needed. Never call it holding the GIL.
    fn send_blocking(&self, output: Output) -> Result<(), ResponseGone>;
    /// FCGI_ABORT_REQUEST arrived: the application should stop at its next chunk.
    fn is_aborted(&self) -> bool;
    /// As `is_aborted`, after reading what the web server sent meanwhile when nothing else
    /// reads the connection while the application waits (the IIS stream on Unix).
    fn look_for_abort(&self) -> bool {
        self.is_aborted()
    }
    /// The connection task's channel, whose room a consumer can await (the ASGI bridge).
    fn channel(&self) -> Option<&mpsc::Sender<Output>> {
        None
    }
}

/// The request body as the web server sends it.
pub struct BodyStream {
    source: Box<dyn BodySource>,
}

impl std::fmt::Debug for BodyStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("BodyStream")
    }
}

/// The body cannot be completed: the web server aborted the request or went away.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BodyInterrupted;

impl BodyStream {
    pub fn new(source: Box<dyn BodySource>) -> Self {
        BodyStream { source }
    }

    /// Blocks the calling thread (never a tokio thread) until the next piece of the body;
    /// `Ok(None)` at its end.
    pub fn next_blocking(&mut self) -> Result<Option<Bytes>, BodyInterrupted> {
        self.source.next_blocking()
    }

    /// See [`BodySource::channel`].
    pub fn channel(&mut self) -> Option<&mut mpsc::Receiver<BodyEvent>> {
        self.source.channel()
    }
}

/// The body as a connection task feeds it.
struct ChannelBody(mpsc::Receiver<BodyEvent>);

impl BodySource for ChannelBody {
    fn next_blocking(&mut self) -> Result<Option<Bytes>, BodyInterrupted> {
        match self.0.blocking_recv() {
            Some(BodyEvent::Data(data)) => Ok(Some(data)),
            Some(BodyEvent::End) => Ok(None),
            None => Err(BodyInterrupted),
        }
    }

    fn channel(&mut self) -> Option<&mut mpsc::Receiver<BodyEvent>> {
        Some(&mut self.0)
    }
}

/// A batch of encoded records for the connection to write.
#[derive(Debug)]
pub enum Output {
    Records(Bytes),
    /// The last batch: it ends with FCGI_END_REQUEST.
    End(Bytes),
}

/// The web server is gone or aborted the request: stop producing the response.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResponseGone;

/// Where the worker sends the response of one request, already encoded as FastCGI records.
pub struct ResponseSink {
    request_id: u16,
    target: Box<dyn OutputTarget>,
}

impl std::fmt::Debug for ResponseSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ResponseSink({})", self.request_id)
    }
}

impl ResponseSink {
    pub fn new(request_id: u16, target: Box<dyn OutputTarget>) -> Self {
        ResponseSink { request_id, target }
    }

    pub fn request_id(&self) -> u16 {
        self.request_id
    }

    /// FCGI_ABORT_REQUEST arrived: the application should stop at its next chunk.
    pub fn is_aborted(&self) -> bool {
        self.target.is_aborted()
    }

    /// See [`OutputTarget::look_for_abort`].
    pub fn look_for_abort(&self) -> bool {
        self.target.look_for_abort()
    }

    /// Queues a batch without blocking; gives it back when that would block, so the caller can
    /// release the GIL before it waits in [`ResponseSink::send_blocking`]. Batches of an aborted
    /// request are dropped by the connection, which still needs the final [`Output::End`].
    pub fn try_send(&self, output: Output) -> Result<(), TrySendError> {
        self.target.try_send(output)
    }

    /// Waits until the batch is delivered. Never call it from a tokio thread, nor holding the GIL.
    pub fn send_blocking(&self, output: Output) -> Result<(), ResponseGone> {
        self.target.send_blocking(output)
    }

    /// Sends a whole response as the request's only batch. A job's channel always has room for
    /// it, so this never blocks there (a connection's task may call it); on the IIS stream it
    /// waits for the web server as [`ResponseSink::send_blocking`] does.
    pub fn send_whole(&self, output: Output) {
        if let Err(TrySendError::Full(output)) = self.try_send(output) {
            let _ = self.send_blocking(output);
        }
    }

    /// See [`OutputTarget::channel`].
    pub fn channel(&self) -> Option<&mpsc::Sender<Output>> {
        self.target.channel()
    }
}

/// The response as a connection task writes it.
struct ChannelOutput {
    sender: mpsc::Sender<Output>,
    aborted: Arc<AtomicBool>,
}

impl OutputTarget for ChannelOutput {
    fn try_send(&self, output: Output) -> Result<(), TrySendError> {
        self.sender.try_send(output).map_err(|e| match e {
            mpsc::error::TrySendError::Full(output) => TrySendError::Full(output),
            mpsc::error::TrySendError::Closed(_) => TrySendError::Gone,
        })
    }

    fn send_blocking(&self, output: Output) -> Result<(), ResponseGone> {
        self.sender.blocking_send(output).map_err(|_| ResponseGone)
    }

    fn is_aborted(&self) -> bool {
        self.aborted.load(Ordering::Acquire)
    }

    fn channel(&self) -> Option<&mpsc::Sender<Output>> {
        Some(&self.sender)
    }
}

pub enum TrySendError {
    Full(Output),
    Gone,
}

/// The connection's ends of a job's channels. The body sender is handed out separately:
/// dropping it is how the application learns the body will never complete.
#[derive(Debug)]
pub struct JobHandles {
    pub output: mpsc::Receiver<Output>,
    pub aborted: Arc<AtomicBool>,
}

impl JobHandles {
    pub fn abort(&self) {
        self.aborted.store(true, Ordering::Release);
    }

    pub fn is_aborted(&self) -> bool {
        self.aborted.load(Ordering::Acquire)
    }
}

/// A job, the connection's handles on it, and the sender of its body.
pub fn job(request_id: u16, params: Params) -> (Job, JobHandles, mpsc::Sender<BodyEvent>) {
    let (body_tx, body_rx) = mpsc::channel(BODY_QUEUE);
    let (output_tx, output_rx) = mpsc::channel(OUTPUT_QUEUE);
    let aborted = Arc::new(AtomicBool::new(false));
    let job = Job {
        params,
        body: BodyStream::new(Box::new(ChannelBody(body_rx))),
        response: ResponseSink::new(
            request_id,
            Box::new(ChannelOutput {
                sender: output_tx,
                aborted: aborted.clone(),
            }),
        ),
    };
    let handles = JobHandles {
        output: output_rx,
        aborted,
    };
    (job, handles, body_tx)
}

/// Builds the records of one response: STDOUT and STDERR data, then the end of both streams and
/// FCGI_END_REQUEST. Never writes an empty record except the ones that end a stream.
#[derive(Debug)]
pub struct ResponseEncoder {
    request_id: u16,
    buf: BytesMut,
    wrote_stderr: bool,
}

impl ResponseEncoder {
    pub fn new(request_id: u16) -> Self {
        ResponseEncoder {
            request_id,
            buf: BytesMut::new(),
            wrote_stderr: false,
        }
    }

    pub fn stdout(&mut self, data: &[u8]) {
        protocol::encode_stream(&mut self.buf, RecordType::Stdout, self.request_id, data);
    }

    /// Under IIS any STDERR output turns the response into a 500 (stderrMode), so this is only for
    /// a request that failed.
    pub fn stderr(&mut self, data: &[u8]) {
        if !data.is_empty() {
            self.wrote_stderr = true;
        }
        protocol::encode_stream(&mut self.buf, RecordType::Stderr, self.request_id, data);
    }

    /// Bytes encoded and not yet taken.
    pub fn pending(&self) -> usize {
        self.buf.len()
    }

    /// Drops what is encoded but not yet taken (a response replaced by an error page).
    pub fn discard(&mut self) {
        self.buf.clear();
    }

    /// Everything encoded so far, for sending now.
    pub fn take(&mut self) -> Bytes {
        self.buf.split().freeze()
    }

    /// Ends the streams and the request; returns the last batch.
    pub fn finish(&mut self, app_status: u32) -> Bytes {
        protocol::encode_end_of_stream(&mut self.buf, RecordType::Stdout, self.request_id);
        if self.wrote_stderr {
            protocol::encode_end_of_stream(&mut self.buf, RecordType::Stderr, self.request_id);
        }
        protocol::encode_end_request(
            &mut self.buf,
            self.request_id,
            app_status,
            ProtocolStatus::RequestComplete,
        );
        self.take()
    }
}

/// A complete CGI-style response (`Status:` line, headers, body) as STDOUT records.
pub fn simple_response(
    encoder: &mut ResponseEncoder,
    status: &str,
    extra_headers: &[(&str, &str)],
    body: &[u8],
) {
    let mut head = format!(
        "Status: {status}\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (name, value) in extra_headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str("\r\n");
    encoder.stdout(head.as_bytes());
    encoder.stdout(body);
}

/// Answers a request the application does not see with a plain-text `status` and `body`.
/// On the IIS stream it blocks while the web server is behind: never call it holding the GIL.
pub fn respond(response: &ResponseSink, status: &str, body: &str) {
    let mut encoder = ResponseEncoder::new(response.request_id());
    simple_response(&mut encoder, status, &[], body.as_bytes());
    response.send_whole(Output::End(encoder.finish(0)));
}

/// Answers a job with a 500 whose body is `notice`: a deployment problem the administrator must
/// see (IIS shows the body), reported once.
pub fn respond_notice(job: Job, notice: &str) {
    respond(
        &job.response,
        "500 Internal Server Error",
        &format!("wfastcgi: {notice}\n"),
    );
}
