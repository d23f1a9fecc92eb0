//! Sans-I/O codec for the FastCGI 1.0 wire protocol.
//!
//! Everything here works on in-memory buffers: [`RecordDecoder`] cuts received bytes into
//! [`Record`]s, [`ParamsBuilder`] reassembles the name-value pairs of a PARAMS stream, and the
//! `encode_*` functions append records to an output buffer. Decoding never panics and never
//! copies record content: payloads are slices of the buffer the bytes were received into.
//!
//! Known record types fall into two classes. Management records (GET_VALUES, GET_VALUES_RESULT,
//! UNKNOWN_TYPE) concern the connection and must carry request id 0; all other known types belong
//! to a request and must carry a non-zero id. A type this codec does not know is passed through as
//! [`Record::Unknown`] whatever its id, so the caller can answer it with UNKNOWN_TYPE.

mod decoder;
mod params;
mod record;
mod session;
pub use decoder::RecordDecoder;
pub use params::{decode_name_values, encode_name_value, ParamLimits, Params, ParamsBuilder};
pub use record::{
    encode_abort_request, encode_begin_request, encode_end_of_stream, encode_end_request,
    encode_get_values_result, encode_header, encode_record, encode_stream, encode_unknown_type,
    Record,
};
pub use session::{end_request, Advertised, Event, Session};

/// The only protocol version there is.
pub const VERSION_1: u8 = 1;
/// Size of a record header.
pub const HEADER_LEN: usize = 8;
/// Largest content a single record can carry (the header's length field is 16 bits).
pub const MAX_CONTENT_LEN: usize = 65535;
/// BEGIN_REQUEST flag: keep the connection open after the request ends.
pub const FLAG_KEEP_CONN: u8 = 1;
/// Request id of management records.
pub const NULL_REQUEST_ID: u16 = 0;

/// The `type` byte of a record header, for the types FastCGI 1.0 defines.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum RecordType {
    BeginRequest = 1,
    AbortRequest = 2,
    EndRequest = 3,
    Params = 4,
    Stdin = 5,
    Stdout = 6,
    Stderr = 7,
    Data = 8,
    GetValues = 9,
    GetValuesResult = 10,
    UnknownType = 11,
}

impl RecordType {
    /// The known type with this byte, if any.
    pub fn from_u8(v: u8) -> Option<Self> {
        Some(match v {
            1 => Self::BeginRequest,
            2 => Self::AbortRequest,
            3 => Self::EndRequest,
            4 => Self::Params,
            5 => Self::Stdin,
            6 => Self::Stdout,
            7 => Self::Stderr,
            8 => Self::Data,
            9 => Self::GetValues,
            10 => Self::GetValuesResult,
            11 => Self::UnknownType,
            _ => return None,
        })
    }

    /// Whether the type concerns the connection (request id 0) rather than one request.
    pub fn is_management(self) -> bool {
        matches!(
            self,
            Self::GetValues | Self::GetValuesResult | Self::UnknownType
        )
    }

    /// The type's constant name in the specification.
    fn name(self) -> &'static str {
        match self {
            Self::BeginRequest => "FCGI_BEGIN_REQUEST",
            Self::AbortRequest => "FCGI_ABORT_REQUEST",
            Self::EndRequest => "FCGI_END_REQUEST",
            Self::Params => "FCGI_PARAMS",
            Self::Stdin => "FCGI_STDIN",
            Self::Stdout => "FCGI_STDOUT",
            Self::Stderr => "FCGI_STDERR",
            Self::Data => "FCGI_DATA",
            Self::GetValues => "FCGI_GET_VALUES",
            Self::GetValuesResult => "FCGI_GET_VALUES_RESULT",
            Self::UnknownType => "FCGI_UNKNOWN_TYPE",
        }
    }

    /// Content length of the types whose body has a fixed layout.
    fn fixed_body_len(self) -> Option<usize> {
        match self {
            Self::BeginRequest | Self::EndRequest | Self::UnknownType => Some(8),
            Self::AbortRequest => Some(0),
            _ => None,
        }
    }
}

/// The role a BEGIN_REQUEST asks the application to play.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Responder,
    Authorizer,
    Filter,
    /// A role FastCGI 1.0 does not define; the application answers it with `UnknownRole`.
    Other(u16),
}

impl Role {
    pub fn from_u16(v: u16) -> Self {
        match v {
            1 => Self::Responder,
            2 => Self::Authorizer,
            3 => Self::Filter,
            other => Self::Other(other),
        }
    }

    pub fn as_u16(self) -> u16 {
        match self {
            Self::Responder => 1,
            Self::Authorizer => 2,
            Self::Filter => 3,
            Self::Other(v) => v,
        }
    }
}

/// Why a request ended, as reported in END_REQUEST.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum ProtocolStatus {
    RequestComplete = 0,
    CantMpxConn = 1,
    Overloaded = 2,
    UnknownRole = 3,
}

/// A violation of the protocol or of the configured limits. None of these can be recovered from
/// on the same connection, because the byte stream can no longer be trusted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtocolError {
    #[error("unsupported FastCGI version {0} (only version {VERSION_1} exists)")]
    UnsupportedVersion(u8),
    /// A fixed-layout record (BEGIN_REQUEST, ABORT_REQUEST, END_REQUEST, UNKNOWN_TYPE) has content
    /// of the wrong length.
    #[error("{}", bad_body_length(*record_type, *len))]
    BadBodyLength { record_type: u8, len: usize },
    /// The stream ended inside a record. `need` is the record's whole length, or [`HEADER_LEN`]
    /// while its header was incomplete.
    #[error("stream ended inside a record: got {have} of its {need} bytes")]
    TruncatedRecord { have: usize, need: usize },
    #[error(
        "{} is a management record and must have request id 0, not {request_id}",
        type_name(*record_type)
    )]
    ManagementRecordWithRequestId { record_type: u8, request_id: u16 },
    #[error(
        "{} record has request id 0, which is reserved for management records",
        type_name(*record_type)
    )]
    RequestRecordWithNullId { record_type: u8 },
    #[error("name-value data ends in the middle of a pair")]
    NameValueTruncated,
    #[error("parameter name of {len} bytes exceeds the limit of {limit}")]
    NameTooLong { len: usize, limit: usize },
    #[error("parameter value of {len} bytes exceeds the limit of {limit}")]
    ValueTooLong { len: usize, limit: usize },
    #[error("parameters exceed the limit of {limit} bytes in total")]
    ParamsTooLarge { limit: usize },
    #[error("more than {limit} parameters")]
    TooManyParams { limit: usize },
}

fn bad_body_length(record_type: u8, len: usize) -> String {
    let name = type_name(record_type);
    match RecordType::from_u8(record_type).and_then(RecordType::fixed_body_len) {
        Some(expected) => {
            format!("{name} record has a {len}-byte body; it must be exactly {expected} bytes")
        }
        None => format!("{name} record has an invalid {len}-byte body"),
    }
}

/// A record type byte by its specification name when it has one.
fn type_name(record_type: u8) -> String {
    match RecordType::from_u8(record_type) {
        Some(known) => known.name().to_owned(),
        None => format!("unknown type {record_type}"),
    }
}

/// Helpers shared by the tests of the submodules.
#[cfg(test)]
mod testing {
    use bytes::{Bytes, BytesMut};

    use super::{ProtocolError, ProtocolStatus, Record, RecordDecoder, Role, NULL_REQUEST_ID};

    /// Feeds `bytes` to a decoder in chunks of the given sizes (the rest in one last chunk),
    /// checking the documented contract after every call.
    pub fn decode_in_chunks(
        bytes: &[u8],
        mut chunk_sizes: impl FnMut() -> usize,
    ) -> Result<Vec<Record>, ProtocolError> {
        let mut decoder = RecordDecoder;
        let mut buf = BytesMut::new();
        let mut records = Vec::new();
        let mut rest = bytes;
        loop {
            let take = chunk_sizes().min(rest.len());
            buf.extend_from_slice(&rest[..take]);
            rest = &rest[take..];
            loop {
                let before = buf.len();
                let needed = RecordDecoder::bytes_needed(&buf);
                match decoder.decode(&mut buf)? {
                    Some(record) => {
                        assert_eq!(needed, 0);
                        records.push(record);
                    }
                    None => {
                        assert_eq!(buf.len(), before, "Ok(None) must consume nothing");
                        assert!(needed > 0);
                        break;
                    }
                }
            }
            if rest.is_empty() {
                decoder.finish(&buf)?;
                return Ok(records);
            }
        }
    }

    /// One record of every kind with the given request id (management records ignore it).
    pub fn one_of_each(request_id: u16) -> Vec<Record> {
        let content = Bytes::from_static(b"some content");
        vec![
            Record::BeginRequest {
                request_id,
                role: Role::Responder,
                keep_conn: true,
            },
            Record::BeginRequest {
                request_id,
                role: Role::Other(0xBEEF),
                keep_conn: false,
            },
            Record::AbortRequest { request_id },
            Record::EndRequest {
                request_id,
                app_status: 0xDEAD_BEEF,
                protocol_status: ProtocolStatus::Overloaded as u8,
            },
            Record::Params {
                request_id,
                content: content.clone(),
            },
            Record::Params {
                request_id,
                content: Bytes::new(),
            },
            Record::Stdin {
                request_id,
                content: content.clone(),
            },
            Record::Stdin {
                request_id,
                content: Bytes::new(),
            },
            Record::Stdout {
                request_id,
                content: content.clone(),
            },
            Record::Stderr {
                request_id,
                content: content.clone(),
            },
            Record::Data {
                request_id,
                content: content.clone(),
            },
            Record::GetValues {
                content: Bytes::from_static(b"\x0e\x00FCGI_MPXS_CONNS"),
            },
            Record::GetValuesResult {
                content: Bytes::from_static(b"\x0e\x01FCGI_MPXS_CONNS0"),
            },
            Record::UnknownType { record_type: 42 },
            Record::Unknown {
                record_type: 42,
                request_id,
                content: content.clone(),
            },
            Record::Unknown {
                record_type: 0,
                request_id: NULL_REQUEST_ID,
                content: Bytes::new(),
            },
        ]
    }

    /// Decodes every record in `bytes`, requiring that they fill it exactly.
    pub fn decode_all(bytes: &[u8]) -> Result<Vec<Record>, ProtocolError> {
        decode_in_chunks(bytes, || usize::MAX)
    }

    /// xorshift64: a deterministic PRNG, so property tests need no `rand` and failures replay.
    pub struct XorShift(u64);

    impl XorShift {
        pub fn new(seed: u64) -> Self {
            // Zero is xorshift's only fixed point.
            Self(seed | 1)
        }

        pub fn next_u64(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }

        /// Uniform enough in `0..n` for tests; `n` must be non-zero.
        pub fn below(&mut self, n: usize) -> usize {
            (self.next_u64() % n as u64) as usize
        }

        pub fn bytes(&mut self, len: usize) -> Vec<u8> {
            (0..len).map(|_| self.next_u64() as u8).collect()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn record_type_bytes_round_trip_and_only_9_to_11_are_management() {
        for v in 0..=u8::MAX {
            match RecordType::from_u8(v) {
                Some(t) => assert_eq!((t as u8, t.is_management()), (v, v >= 9)),
                None => assert!(v == 0 || v > 11, "type {v} should be known"),
            }
        }
    }

    #[test]
    fn role_values_round_trip() {
        for v in [0, 1, 2, 3, 4, u16::MAX] {
            assert_eq!(Role::from_u16(v).as_u16(), v);
        }
        assert_eq!(Role::from_u16(1), Role::Responder);
        assert_eq!(Role::from_u16(4), Role::Other(4));
    }

    #[test]
    fn errors_name_the_record_type_and_expected_size() {
        let bad_begin = ProtocolError::BadBodyLength {
            record_type: 1,
            len: 7,
        };
        assert_eq!(
            bad_begin.to_string(),
            "FCGI_BEGIN_REQUEST record has a 7-byte body; it must be exactly 8 bytes"
        );
        let bad_abort = ProtocolError::BadBodyLength {
            record_type: 2,
            len: 3,
        };
        assert!(bad_abort.to_string().ends_with("exactly 0 bytes"));
        let unknown = ProtocolError::ManagementRecordWithRequestId {
            record_type: 200,
            request_id: 5,
        };
        assert!(unknown.to_string().starts_with("unknown type 200 "));
    }
}
