//! One connection's protocol, sans I/O: the rules every driver shares.
//!
//! A [`Session`] owns a connection's read buffer and its request state (BEGIN → PARAMS… → empty
//! PARAMS → STDIN… → empty STDIN). A driver reads the socket into [`Session::read_buf`], takes
//! [`Event`]s from [`Session::next_event`] until it has none, writes [`Session::take_replies`]
//! (answers the session gives itself: GET_VALUES_RESULT, UNKNOWN_TYPE, END_REQUEST for
//! UNKNOWN_ROLE, CANT_MPX_CONN or an abort before the start), and closes the connection on an
//! error. It never reads a clock: time comes from the caller.
//!
//! One request at a time: GET_VALUES says FCGI_MPXS_CONNS=0, and IIS never multiplexes; another
//! BEGIN_REQUEST while one runs is answered FCGI_CANT_MPX_CONN. A request answered before its
//! body ended has the rest of its STDIN dropped here ("draining"), so the connection stays
//! usable.

use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};

use super::{
    decode_name_values, encode_end_request, encode_get_values_result, encode_unknown_type,
    ParamLimits, Params, ParamsBuilder, ProtocolError, ProtocolStatus, Record, RecordDecoder, Role,
};

/// FCGI_MAX_CONNS and FCGI_MAX_REQS, as GET_VALUES answers them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Advertised {
    pub max_conns: usize,
    pub max_reqs: usize,
}

impl Advertised {
    /// One connection, one request at a time: IIS's stream.
    pub const ONE: Advertised = Advertised {
        max_conns: 1,
        max_reqs: 1,
    };
}

/// What the driver must do.
#[derive(Debug, PartialEq, Eq)]
pub enum Event {
    /// A request's parameters are complete: run it. It is the running request until
    /// [`Session::response_ended`].
    Request { request_id: u16, params: Params },
    /// A piece of the running request's body.
    Body(Bytes),
    /// The running request's body is complete.
    BodyEnd,
    /// FCGI_ABORT_REQUEST for the running request: its body will not complete.
    Aborted,
    /// A request began while the session takes none ([`Session::set_accepting`], or after a
    /// response without FCGI_KEEP_CONN): the driver answers it with [`Session::refuse`].
    Refused { request_id: u16 },
}

#[derive(Debug)]
enum State {
    Idle,
    Head {
        request_id: u16,
        keep_conn: bool,
        params: ParamsBuilder,
    },
    Running {
        request_id: u16,
        keep_conn: bool,
        /// The empty STDIN record arrived, or the request was aborted: no more body comes.
        body_done: bool,
        /// Aborted: its body is no longer passed on.
        aborted: bool,
    },
}

#[derive(Debug)]
pub struct Session {
    buf: BytesMut,
    state: State,
    /// A request answered before its body ended: its remaining STDIN is dropped.
    draining: Option<u16>,
    replies: BytesMut,
    limits: ParamLimits,
    advertised: Advertised,
    accepting: bool,
    /// A response without FCGI_KEEP_CONN was sent: the connection closes once idle.
    closing: bool,
    /// When the head now arriving started.
    head_since: Option<Instant>,
}

impl Session {
    /// A session reading into `buf` (emptied first: a driver may reuse a buffer's memory).
    pub fn new(limits: ParamLimits, advertised: Advertised, mut buf: BytesMut) -> Session {
        buf.clear();
        Session {
            buf,
            state: State::Idle,
            draining: None,
            replies: BytesMut::new(),
            limits,
            advertised,
            accepting: true,
            closing: false,
            head_since: None,
        }
    }

    /// Where the driver puts the bytes it reads.
    pub fn read_buf(&mut self) -> &mut BytesMut {
        &mut self.buf
    }

    /// The read buffer, emptied, for the driver's next connection.
    pub fn into_buffer(mut self) -> BytesMut {
        self.buf.clear();
        self.buf
    }

    /// Whether new requests are taken (false: a shutdown; a BEGIN_REQUEST is then `Refused`).
    pub fn set_accepting(&mut self, accepting: bool) {
        self.accepting = accepting;
    }

    /// Records the session answers itself, to write before reading on.
    pub fn take_replies(&mut self) -> Option<Bytes> {
        (!self.replies.is_empty()).then(|| self.replies.split().freeze())
    }

    /// The running request, if one runs.
    pub fn running(&self) -> Option<u16> {
        match self.state {
            State::Running { request_id, .. } => Some(request_id),
            _ => None,
        }
    }

    /// A request head has begun (BEGIN_REQUEST read, parameters not complete).
    pub fn in_head(&self) -> bool {
        matches!(self.state, State::Head { .. })
    }

    /// Neither a head nor a request in progress.
    pub fn is_idle(&self) -> bool {
        matches!(self.state, State::Idle)
    }

    /// The rest of an answered request's body is still expected.
    pub fn is_draining(&self) -> bool {
        self.draining.is_some()
    }

    /// A response without FCGI_KEEP_CONN has been sent: close once idle and drained.
    pub fn is_closing(&self) -> bool {
        self.closing
    }

    /// Bytes received and not yet decoded (part of a record).
    pub fn has_buffered(&self) -> bool {
        !self.buf.is_empty()
    }

    /// Nothing is in progress or pending: no head, no request, no body to drain, no bytes.
    pub fn is_quiet(&self) -> bool {
        self.is_idle() && self.draining.is_none() && self.buf.is_empty()
    }

    /// When the request head now arriving (parameters, or the part of a record that is not an
    /// answered request's body) must be complete: `limit` after the first call that saw it
    /// arriving, at `now`. `None` while no head arrives.
    pub fn head_deadline(&mut self, now: Instant, limit: Duration) -> Option<Instant> {
        let arriving = match self.state {
            State::Head { .. } => true,
            State::Idle => self.draining.is_none() && !self.buf.is_empty(),
            State::Running { .. } => false,
        };
        if !arriving {
            self.head_since = None;
            return None;
        }
        Some(*self.head_since.get_or_insert(now) + limit)
    }

    /// Checks what is left when the peer closed its side: an error if a record was cut short.
    pub fn end_of_stream(&self) -> Result<(), ProtocolError> {
        RecordDecoder.finish(&self.buf)
    }

    /// The next thing the driver must do with the bytes received so far; `Ok(None)` when more
    /// are needed. An error leaves the stream unusable: close the connection.
    pub fn next_event(&mut self) -> Result<Option<Event>, ProtocolError> {
        while let Some(record) = RecordDecoder.decode(&mut self.buf)? {
            if let Some(event) = self.on_record(record)? {
                return Ok(Some(event));
            }
        }
        Ok(None)
    }

    /// The running request's response is complete. Returns the bytes to write: `last` (which
    /// ends with END_REQUEST), or a bare END_REQUEST when the request was aborted (`aborted`:
    /// also when the driver saw the web server leave). The connection then stays open unless
    /// the request had no FCGI_KEEP_CONN ([`Session::is_closing`]); a body still arriving is
    /// drained.
    pub fn end_response(&mut self, last: Bytes, aborted: bool) -> Bytes {
        let Some(request_id) = self.running() else {
            return last;
        };
        self.response_ended();
        if aborted {
            end_request(request_id, 0)
        } else {
            last
        }
    }

    /// Answers the running request with `response` (a 503), written with the replies.
    pub fn refuse(&mut self, response: &[u8]) {
        self.replies.extend_from_slice(response);
        self.response_ended();
    }

    /// The running request has been answered by the driver; see [`Session::end_response`].
    pub fn response_ended(&mut self) {
        if let State::Running {
            request_id,
            keep_conn,
            body_done,
            ..
        } = std::mem::replace(&mut self.state, State::Idle)
        {
            if !body_done {
                self.draining = Some(request_id);
            }
            if !keep_conn {
                self.closing = true;
            }
        }
    }

    fn on_record(&mut self, record: Record) -> Result<Option<Event>, ProtocolError> {
        match record {
            Record::BeginRequest {
                request_id,
                role,
                keep_conn,
            } => return Ok(self.on_begin(request_id, role, keep_conn)),
            Record::Params {
                request_id,
                content,
            } => return self.on_params(request_id, &content),
            Record::Stdin {
                request_id,
                content,
            } => return Ok(self.on_stdin(request_id, content)),
            Record::AbortRequest { request_id } => return Ok(self.on_abort(request_id)),
            Record::GetValues { content } => {
                let asked = decode_name_values(&content, &self.limits)?;
                encode_values_answer(&mut self.replies, &asked, self.advertised);
            }
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
                encode_unknown_type(&mut self.replies, record_type);
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
        Ok(None)
    }

    fn on_begin(&mut self, request_id: u16, role: Role, keep_conn: bool) -> Option<Event> {
        match &self.state {
            State::Idle => {}
            State::Head { request_id: id, .. } | State::Running { request_id: id, .. }
                if *id == request_id =>
            {
                tracing::warn!(
                    request_id,
                    "duplicate FCGI_BEGIN_REQUEST for a running request ignored"
                );
                return None;
            }
            _ => {
                tracing::warn!(
                    request_id,
                    "second request on a busy connection: FCGI_CANT_MPX_CONN"
                );
                self.end_request(request_id, ProtocolStatus::CantMpxConn);
                return None;
            }
        }
        self.draining = None;
        if !self.accepting || self.closing {
            // Requests already begun finish; new ones are turned away. It runs until the
            // driver has answered it.
            self.state = State::Running {
                request_id,
                keep_conn,
                body_done: false,
                aborted: false,
            };
            return Some(Event::Refused { request_id });
        }
        if role != Role::Responder {
            tracing::warn!(
                request_id,
                ?role,
                "only the RESPONDER role is served: FCGI_UNKNOWN_ROLE"
            );
            self.end_request(request_id, ProtocolStatus::UnknownRole);
            return None;
        }
        self.state = State::Head {
            request_id,
            keep_conn,
            params: ParamsBuilder::new(self.limits),
        };
        None
    }

    fn on_params(
        &mut self,
        request_id: u16,
        content: &[u8],
    ) -> Result<Option<Event>, ProtocolError> {
        let State::Head {
            request_id: id,
            keep_conn,
            params,
        } = &mut self.state
        else {
            tracing::debug!(
                request_id,
                "FCGI_PARAMS outside a request's parameter stream ignored"
            );
            return Ok(None);
        };
        if *id != request_id {
            tracing::debug!(request_id, "FCGI_PARAMS for another request ignored");
            return Ok(None);
        }
        if !content.is_empty() {
            params.push(content)?;
            return Ok(None);
        }
        let (keep_conn, params) = (*keep_conn, std::mem::take(params).finish()?);
        self.state = State::Running {
            request_id,
            keep_conn,
            body_done: false,
            aborted: false,
        };
        Ok(Some(Event::Request { request_id, params }))
    }

    fn on_stdin(&mut self, request_id: u16, content: Bytes) -> Option<Event> {
        let State::Running {
            request_id: id,
            body_done,
            aborted,
            ..
        } = &mut self.state
        else {
            if self.draining != Some(request_id) {
                tracing::debug!(request_id, "FCGI_STDIN for no running request ignored");
            } else if content.is_empty() {
                self.draining = None;
            }
            return None;
        };
        if *id != request_id {
            tracing::debug!(request_id, "FCGI_STDIN for another request ignored");
            return None;
        }
        if *body_done {
            return None;
        }
        if content.is_empty() {
            *body_done = true;
            return (!*aborted).then_some(Event::BodyEnd);
        }
        (!*aborted).then_some(Event::Body(content))
    }

    fn on_abort(&mut self, request_id: u16) -> Option<Event> {
        match &mut self.state {
            State::Head { request_id: id, .. } if *id == request_id => {
                tracing::info!(
                    request_id,
                    "request aborted by the web server before it started"
                );
                self.end_request(request_id, ProtocolStatus::RequestComplete);
                self.state = State::Idle;
                None
            }
            State::Running {
                request_id: id,
                body_done,
                aborted: aborted @ false,
                ..
            } if *id == request_id => {
                tracing::info!(request_id, "request aborted by the web server");
                *aborted = true;
                // A web server sends nothing more of an aborted request.
                *body_done = true;
                Some(Event::Aborted)
            }
            _ => {
                tracing::debug!(
                    request_id,
                    "FCGI_ABORT_REQUEST for no running request ignored"
                );
                None
            }
        }
    }

    fn end_request(&mut self, request_id: u16, status: ProtocolStatus) {
        encode_end_request(&mut self.replies, request_id, 0, status);
    }
}

/// FCGI_END_REQUEST, REQUEST_COMPLETE, on its own.
pub fn end_request(request_id: u16, app_status: u32) -> Bytes {
    let mut end = BytesMut::new();
    encode_end_request(
        &mut end,
        request_id,
        app_status,
        ProtocolStatus::RequestComplete,
    );
    end.freeze()
}

/// FCGI_GET_VALUES_RESULT for the variables asked about that this gateway knows; it never
/// multiplexes.
fn encode_values_answer(buf: &mut BytesMut, asked: &Params, advertised: Advertised) {
    let max_conns = advertised.max_conns.to_string();
    let max_reqs = advertised.max_reqs.to_string();
    let known: [(&[u8], &[u8]); 3] = [
        (b"FCGI_MAX_CONNS", max_conns.as_bytes()),
        (b"FCGI_MAX_REQS", max_reqs.as_bytes()),
        (b"FCGI_MPXS_CONNS", b"0"),
    ];
    let answer: Vec<(&[u8], &[u8])> = known
        .into_iter()
        .filter(|(name, _)| asked.get(name).is_some())
        .collect();
    encode_get_values_result(buf, &answer);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::testing::decode_all;
    use crate::protocol::{
        encode_abort_request, encode_begin_request, encode_end_of_stream, encode_name_value,
        encode_record, encode_stream, RecordType,
    };

    fn session() -> Session {
        Session::new(ParamLimits::default(), Advertised::ONE, BytesMut::new())
    }

    fn begin(buf: &mut BytesMut, id: u16, keep_conn: bool) {
        encode_begin_request(buf, id, Role::Responder, keep_conn);
    }

    fn params(buf: &mut BytesMut, id: u16) {
        let mut pairs = BytesMut::new();
        encode_name_value(&mut pairs, b"REQUEST_METHOD", b"GET");
        encode_stream(buf, RecordType::Params, id, &pairs);
        encode_end_of_stream(buf, RecordType::Params, id);
    }

    /// A STDIN record; empty, the end of the body.
    fn stdin(buf: &mut BytesMut, id: u16, data: &[u8]) {
        match data {
            b"" => encode_end_of_stream(buf, RecordType::Stdin, id),
            data => encode_stream(buf, RecordType::Stdin, id, data),
        }
    }

    /// Feeds `bytes` and collects the events and replies.
    fn feed(session: &mut Session, bytes: &[u8]) -> (Vec<Event>, Vec<Record>) {
        session.read_buf().extend_from_slice(bytes);
        let mut events = Vec::new();
        while let Some(event) = session.next_event().expect("valid stream") {
            events.push(event);
        }
        let replies = session.take_replies().unwrap_or_default();
        (events, decode_all(&replies).expect("valid replies"))
    }

    fn ended(request_id: u16, status: ProtocolStatus) -> Record {
        Record::EndRequest {
            request_id,
            app_status: 0,
            protocol_status: status as u8,
        }
    }

    #[test]
    fn a_request_its_body_and_the_next_one() {
        let mut s = session();
        let mut bytes = BytesMut::new();
        begin(&mut bytes, 1, true);
        params(&mut bytes, 1);
        stdin(&mut bytes, 1, b"body");
        stdin(&mut bytes, 1, b"");
        let (events, replies) = feed(&mut s, &bytes);
        assert!(replies.is_empty());
        assert!(matches!(
            &events[0],
            Event::Request { request_id: 1, params }
                if params.get(b"REQUEST_METHOD") == Some(&b"GET"[..])
        ));
        assert_eq!(
            events[1..],
            [Event::Body(Bytes::from_static(b"body")), Event::BodyEnd]
        );
        assert_eq!(s.running(), Some(1));
        assert_eq!(s.end_response(Bytes::from_static(b"x"), false), "x");
        assert!(s.is_quiet() && !s.is_closing());
    }

    #[test]
    fn management_records_are_answered_at_any_time() {
        let mut s = session();
        let mut bytes = BytesMut::new();
        let mut asked = BytesMut::new();
        encode_name_value(&mut asked, b"FCGI_MPXS_CONNS", b"");
        encode_record(
            &mut bytes,
            &Record::GetValues {
                content: asked.freeze(),
            },
        );
        encode_record(
            &mut bytes,
            &Record::Unknown {
                record_type: 77,
                request_id: 0,
                content: Bytes::new(),
            },
        );
        let (events, replies) = feed(&mut s, &bytes);
        assert!(events.is_empty());
        assert!(matches!(replies[0], Record::GetValuesResult { .. }));
        assert_eq!(replies[1], Record::UnknownType { record_type: 77 });
    }

    #[test]
    fn refusals_are_answered_with_end_request() {
        let mut s = session();
        let mut bytes = BytesMut::new();
        encode_begin_request(&mut bytes, 1, Role::Authorizer, true);
        begin(&mut bytes, 2, true);
        begin(&mut bytes, 2, true);
        begin(&mut bytes, 3, true);
        encode_abort_request(&mut bytes, 2);
        let (events, replies) = feed(&mut s, &bytes);
        assert!(events.is_empty());
        assert_eq!(
            replies,
            [
                ended(1, ProtocolStatus::UnknownRole),
                ended(3, ProtocolStatus::CantMpxConn),
                ended(2, ProtocolStatus::RequestComplete),
            ]
        );
        assert!(s.is_quiet());
    }

    #[test]
    fn an_aborted_request_ends_with_a_bare_end_request_and_drains_nothing() {
        let mut s = session();
        let mut bytes = BytesMut::new();
        begin(&mut bytes, 1, false);
        params(&mut bytes, 1);
        encode_abort_request(&mut bytes, 1);
        stdin(&mut bytes, 1, b"late");
        let (events, _) = feed(&mut s, &bytes);
        assert_eq!(events.last(), Some(&Event::Aborted));
        assert_eq!(events.len(), 2);
        let last = s.end_response(Bytes::from_static(b"response"), true);
        assert_eq!(last, end_request(1, 0));
        assert!(!s.is_draining() && s.is_closing());
    }

    #[test]
    fn an_unread_body_is_drained_and_a_closing_session_refuses() {
        let mut s = session();
        let mut bytes = BytesMut::new();
        begin(&mut bytes, 1, false);
        params(&mut bytes, 1);
        let (events, _) = feed(&mut s, &bytes);
        assert_eq!(events.len(), 1);
        s.response_ended();
        assert!(s.is_draining() && s.is_closing());
        let mut rest = BytesMut::new();
        stdin(&mut rest, 1, b"unread");
        stdin(&mut rest, 1, b"");
        begin(&mut rest, 2, true);
        let (events, _) = feed(&mut s, &rest);
        assert_eq!(events, [Event::Refused { request_id: 2 }]);
        assert!(!s.is_draining());
    }

    #[test]
    fn the_head_deadline_runs_from_the_first_byte_of_a_head() {
        let mut s = session();
        let start = Instant::now();
        let limit = Duration::from_secs(5);
        assert_eq!(s.head_deadline(start, limit), None);
        let mut bytes = BytesMut::new();
        begin(&mut bytes, 1, true);
        s.read_buf().extend_from_slice(&bytes[..3]);
        assert_eq!(s.head_deadline(start, limit), Some(start + limit));
        let later = start + Duration::from_secs(1);
        s.read_buf().extend_from_slice(&bytes[3..]);
        assert_eq!(s.next_event(), Ok(None));
        assert_eq!(s.head_deadline(later, limit), Some(start + limit));
        let mut head_end = BytesMut::new();
        params(&mut head_end, 1);
        s.read_buf().extend_from_slice(&head_end);
        assert!(matches!(s.next_event(), Ok(Some(Event::Request { .. }))));
        assert_eq!(s.head_deadline(later, limit), None);
    }

    #[test]
    fn a_protocol_error_is_returned() {
        let mut s = session();
        s.read_buf().extend_from_slice(&[2, 1, 0, 1, 0, 8, 0, 0]);
        assert_eq!(s.next_event(), Err(ProtocolError::UnsupportedVersion(2)));
    }
}
