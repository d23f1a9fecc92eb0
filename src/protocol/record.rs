//! The decoded form of every record type, and the encoders that write records.
//!
//! Encoders append to a `BytesMut` and never pad: padding is optional in FastCGI 1.0 and only
//! serves alignment, which no peer requires.

use bytes::{BufMut, Bytes, BytesMut};

use super::{
    ProtocolError, ProtocolStatus, RecordType, Role, FLAG_KEEP_CONN, HEADER_LEN, MAX_CONTENT_LEN,
    NULL_REQUEST_ID, VERSION_1,
};

/// One decoded record. Covers every FastCGI 1.0 type in both directions (the gateway reads the
/// web-server side; a test client or fuzzer decodes the application side too).
///
/// Content is a slice of the received buffer; padding and reserved bytes are dropped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Record {
    BeginRequest {
        request_id: u16,
        role: Role,
        keep_conn: bool,
    },
    AbortRequest {
        request_id: u16,
    },
    EndRequest {
        request_id: u16,
        app_status: u32,
        /// Raw, so a status outside [`ProtocolStatus`] still decodes.
        protocol_status: u8,
    },
    /// Empty content ends the PARAMS stream.
    Params {
        request_id: u16,
        content: Bytes,
    },
    /// Empty content ends the STDIN stream.
    Stdin {
        request_id: u16,
        content: Bytes,
    },
    /// Empty content ends the STDOUT stream.
    Stdout {
        request_id: u16,
        content: Bytes,
    },
    /// Empty content ends the STDERR stream.
    Stderr {
        request_id: u16,
        content: Bytes,
    },
    /// Empty content ends the DATA stream.
    Data {
        request_id: u16,
        content: Bytes,
    },
    /// Name-value pairs whose names are the variables asked for (values are empty).
    GetValues {
        content: Bytes,
    },
    /// Name-value pairs answering a GET_VALUES.
    GetValuesResult {
        content: Bytes,
    },
    /// The application's answer to a management record of a type it does not know.
    UnknownType {
        record_type: u8,
    },
    /// A record of a type this codec does not know.
    Unknown {
        record_type: u8,
        request_id: u16,
        content: Bytes,
    },
}

impl Record {
    /// The request the record belongs to; [`NULL_REQUEST_ID`] for management records.
    pub fn request_id(&self) -> u16 {
        match *self {
            Self::BeginRequest { request_id, .. }
            | Self::AbortRequest { request_id }
            | Self::EndRequest { request_id, .. }
            | Self::Params { request_id, .. }
            | Self::Stdin { request_id, .. }
            | Self::Stdout { request_id, .. }
            | Self::Stderr { request_id, .. }
            | Self::Data { request_id, .. }
            | Self::Unknown { request_id, .. } => request_id,
            Self::GetValues { .. } | Self::GetValuesResult { .. } | Self::UnknownType { .. } => {
                NULL_REQUEST_ID
            }
        }
    }

    /// Interprets a framed record: its header's type and request id and its content, without
    /// padding. Checks what the header alone cannot: the request id's class and body sizes.
    pub(super) fn from_parts(
        record_type: u8,
        request_id: u16,
        content: Bytes,
    ) -> Result<Self, ProtocolError> {
        let Some(known) = RecordType::from_u8(record_type) else {
            return Ok(Self::Unknown {
                record_type,
                request_id,
                content,
            });
        };
        if known.is_management() && request_id != NULL_REQUEST_ID {
            return Err(ProtocolError::ManagementRecordWithRequestId {
                record_type,
                request_id,
            });
        }
        if !known.is_management() && request_id == NULL_REQUEST_ID {
            return Err(ProtocolError::RequestRecordWithNullId { record_type });
        }
        if known
            .fixed_body_len()
            .is_some_and(|len| len != content.len())
        {
            return Err(ProtocolError::BadBodyLength {
                record_type,
                len: content.len(),
            });
        }
        // Fixed-layout bodies are now known to be long enough to index.
        let body = &content[..];
        Ok(match known {
            RecordType::BeginRequest => Self::BeginRequest {
                request_id,
                role: Role::from_u16(u16::from_be_bytes([body[0], body[1]])),
                keep_conn: body[2] & FLAG_KEEP_CONN != 0,
            },
            RecordType::AbortRequest => Self::AbortRequest { request_id },
            RecordType::EndRequest => Self::EndRequest {
                request_id,
                app_status: u32::from_be_bytes([body[0], body[1], body[2], body[3]]),
                protocol_status: body[4],
            },
            RecordType::UnknownType => Self::UnknownType {
                record_type: body[0],
            },
            RecordType::Params => Self::Params {
                request_id,
                content,
            },
            RecordType::Stdin => Self::Stdin {
                request_id,
                content,
            },
            RecordType::Stdout => Self::Stdout {
                request_id,
                content,
            },
            RecordType::Stderr => Self::Stderr {
                request_id,
                content,
            },
            RecordType::Data => Self::Data {
                request_id,
                content,
            },
            RecordType::GetValues => Self::GetValues { content },
            RecordType::GetValuesResult => Self::GetValuesResult { content },
        })
    }
}

/// Appends a record header. The caller then appends `content_len` content bytes and `padding`
/// padding bytes.
pub fn encode_header(
    buf: &mut BytesMut,
    record_type: RecordType,
    request_id: u16,
    content_len: u16,
    padding: u8,
) {
    put_header(buf, record_type as u8, request_id, content_len, padding);
}

/// Appends STDOUT/STDERR/PARAMS/STDIN/DATA payload, split into records of at most
/// [`MAX_CONTENT_LEN`] bytes. Empty data writes nothing, because an empty record would end the
/// stream: only [`encode_end_of_stream`] writes that.
pub fn encode_stream(buf: &mut BytesMut, record_type: RecordType, request_id: u16, data: &[u8]) {
    let records = data.len().div_ceil(MAX_CONTENT_LEN);
    if records == 0 {
        return;
    }
    buf.reserve(data.len() + records * HEADER_LEN);
    // Records of near-equal size: a 64 KiB chunk becomes two 32 KiB records, not 65535 + 1.
    for chunk in data.chunks(data.len().div_ceil(records)) {
        put_record(buf, record_type as u8, request_id, chunk);
    }
}

/// Appends the empty record that ends a stream.
pub fn encode_end_of_stream(buf: &mut BytesMut, record_type: RecordType, request_id: u16) {
    encode_header(buf, record_type, request_id, 0, 0);
}

pub fn encode_end_request(
    buf: &mut BytesMut,
    request_id: u16,
    app_status: u32,
    status: ProtocolStatus,
) {
    put_end_request(buf, request_id, app_status, status as u8);
}

pub fn encode_begin_request(buf: &mut BytesMut, request_id: u16, role: Role, keep_conn: bool) {
    encode_header(buf, RecordType::BeginRequest, request_id, 8, 0);
    buf.put_u16(role.as_u16());
    buf.put_u8(if keep_conn { FLAG_KEEP_CONN } else { 0 });
    buf.put_bytes(0, 5);
}

pub fn encode_abort_request(buf: &mut BytesMut, request_id: u16) {
    encode_header(buf, RecordType::AbortRequest, request_id, 0, 0);
}

/// Appends a GET_VALUES_RESULT answering with `pairs`.
///
/// # Panics
///
/// If the encoded pairs exceed [`MAX_CONTENT_LEN`]; the answer is a handful of short variables.
pub fn encode_get_values_result(buf: &mut BytesMut, pairs: &[(&[u8], &[u8])]) {
    let mut content = BytesMut::new();
    for (name, value) in pairs {
        super::encode_name_value(&mut content, name, value);
    }
    put_record(
        buf,
        RecordType::GetValuesResult as u8,
        NULL_REQUEST_ID,
        &content,
    );
}

/// Appends the answer to a management record of type `record_type`, which the application does
/// not know.
pub fn encode_unknown_type(buf: &mut BytesMut, record_type: u8) {
    encode_header(buf, RecordType::UnknownType, NULL_REQUEST_ID, 8, 0);
    buf.put_u8(record_type);
    buf.put_bytes(0, 7);
}

/// Encodes any record, for round-trip tests and fuzzing. A valid record written without padding
/// and with zero reserved bytes and flag bits encodes back to the same bytes it decoded from.
///
/// Stream content longer than [`MAX_CONTENT_LEN`] is split as by [`encode_stream`]; empty stream
/// content writes the end-of-stream record.
///
/// # Panics
///
/// If GET_VALUES, GET_VALUES_RESULT or unknown-type content exceeds [`MAX_CONTENT_LEN`], which a
/// decoded record never does.
pub fn encode_record(buf: &mut BytesMut, record: &Record) {
    match *record {
        Record::BeginRequest {
            request_id,
            role,
            keep_conn,
        } => encode_begin_request(buf, request_id, role, keep_conn),
        Record::AbortRequest { request_id } => encode_abort_request(buf, request_id),
        Record::EndRequest {
            request_id,
            app_status,
            protocol_status,
        } => put_end_request(buf, request_id, app_status, protocol_status),
        Record::Params {
            request_id,
            ref content,
        } => put_stream_record(buf, RecordType::Params, request_id, content),
        Record::Stdin {
            request_id,
            ref content,
        } => put_stream_record(buf, RecordType::Stdin, request_id, content),
        Record::Stdout {
            request_id,
            ref content,
        } => put_stream_record(buf, RecordType::Stdout, request_id, content),
        Record::Stderr {
            request_id,
            ref content,
        } => put_stream_record(buf, RecordType::Stderr, request_id, content),
        Record::Data {
            request_id,
            ref content,
        } => put_stream_record(buf, RecordType::Data, request_id, content),
        Record::GetValues { ref content } => {
            put_record(buf, RecordType::GetValues as u8, NULL_REQUEST_ID, content)
        }
        Record::GetValuesResult { ref content } => put_record(
            buf,
            RecordType::GetValuesResult as u8,
            NULL_REQUEST_ID,
            content,
        ),
        Record::UnknownType { record_type } => encode_unknown_type(buf, record_type),
        Record::Unknown {
            record_type,
            request_id,
            ref content,
        } => put_record(buf, record_type, request_id, content),
    }
}

/// A header with a raw type byte, which [`Record::Unknown`] needs.
fn put_header(buf: &mut BytesMut, record_type: u8, request_id: u16, content_len: u16, padding: u8) {
    buf.put_u8(VERSION_1);
    buf.put_u8(record_type);
    buf.put_u16(request_id);
    buf.put_u16(content_len);
    buf.put_u8(padding);
    buf.put_u8(0);
}

/// One unpadded record.
///
/// # Panics
///
/// If `content` exceeds [`MAX_CONTENT_LEN`].
fn put_record(buf: &mut BytesMut, record_type: u8, request_id: u16, content: &[u8]) {
    let len = u16::try_from(content.len()).expect("record content exceeds 65535 bytes");
    put_header(buf, record_type, request_id, len, 0);
    buf.put_slice(content);
}

/// A stream record as decoded: data records, or the end-of-stream record for empty content.
fn put_stream_record(buf: &mut BytesMut, record_type: RecordType, request_id: u16, content: &[u8]) {
    if content.is_empty() {
        encode_end_of_stream(buf, record_type, request_id);
    } else {
        encode_stream(buf, record_type, request_id, content);
    }
}

/// END_REQUEST with a raw status byte, so any decoded status re-encodes.
fn put_end_request(buf: &mut BytesMut, request_id: u16, app_status: u32, protocol_status: u8) {
    encode_header(buf, RecordType::EndRequest, request_id, 8, 0);
    buf.put_u32(app_status);
    buf.put_u8(protocol_status);
    buf.put_bytes(0, 3);
}

#[cfg(test)]
mod tests {
    use super::super::testing::{decode_all, one_of_each};
    use super::*;

    fn encoded(record: &Record) -> BytesMut {
        let mut buf = BytesMut::new();
        encode_record(&mut buf, record);
        buf
    }

    /// A raw record with arbitrary header fields, padding filled with junk.
    fn raw(version: u8, record_type: u8, request_id: u16, content: &[u8], padding: u8) -> Vec<u8> {
        let mut out = vec![version, record_type];
        out.extend_from_slice(&request_id.to_be_bytes());
        out.extend_from_slice(&(content.len() as u16).to_be_bytes());
        out.extend_from_slice(&[padding, 0]);
        out.extend_from_slice(content);
        out.resize(out.len() + usize::from(padding), 0xAA);
        out
    }

    #[test]
    fn every_record_type_and_request_id_round_trips() {
        for request_id in [1, 2, 255, 256, 0x1234, u16::MAX - 1, u16::MAX] {
            for record in one_of_each(request_id) {
                let bytes = encoded(&record);
                let decoded = decode_all(&bytes).unwrap();
                assert_eq!(decoded, std::slice::from_ref(&record));
                assert_eq!(encoded(&decoded[0]), bytes);
                let expected_id = match record {
                    Record::GetValues { .. }
                    | Record::GetValuesResult { .. }
                    | Record::UnknownType { .. } => NULL_REQUEST_ID,
                    Record::Unknown { request_id: id, .. } => id,
                    _ => request_id,
                };
                assert_eq!(decoded[0].request_id(), expected_id);
            }
        }
    }

    #[test]
    fn header_layout_matches_the_specification() {
        let mut buf = BytesMut::new();
        encode_header(&mut buf, RecordType::Stdout, 0x0102, 0x0304, 5);
        assert_eq!(&buf[..], [1, 6, 1, 2, 3, 4, 5, 0]);

        buf.clear();
        encode_begin_request(&mut buf, 0xABCD, Role::Filter, true);
        assert_eq!(
            &buf[..],
            [1, 1, 0xAB, 0xCD, 0, 8, 0, 0, 0, 3, 1, 0, 0, 0, 0, 0]
        );

        buf.clear();
        encode_end_request(&mut buf, 7, 0x0A0B_0C0D, ProtocolStatus::UnknownRole);
        assert_eq!(
            &buf[..],
            [1, 3, 0, 7, 0, 8, 0, 0, 0x0A, 0x0B, 0x0C, 0x0D, 3, 0, 0, 0]
        );

        buf.clear();
        encode_unknown_type(&mut buf, 99);
        assert_eq!(&buf[..], [1, 11, 0, 0, 0, 8, 0, 0, 99, 0, 0, 0, 0, 0, 0, 0]);

        buf.clear();
        encode_abort_request(&mut buf, 3);
        encode_end_of_stream(&mut buf, RecordType::Params, 3);
        assert_eq!(&buf[..], [1, 2, 0, 3, 0, 0, 0, 0, 1, 4, 0, 3, 0, 0, 0, 0]);
    }

    #[test]
    fn get_values_result_holds_the_encoded_pairs() {
        let mut buf = BytesMut::new();
        encode_get_values_result(&mut buf, &[(b"FCGI_MPXS_CONNS", b"0"), (b"X", b"")]);
        let [Record::GetValuesResult { content }] = &decode_all(&buf).unwrap()[..] else {
            panic!("expected one GET_VALUES_RESULT");
        };
        assert_eq!(&content[..], b"\x0f\x01FCGI_MPXS_CONNS0\x01\x00X");
    }

    #[test]
    fn padding_of_any_length_is_skipped() {
        for padding in 0..=u8::MAX {
            let mut bytes = raw(1, 6, 9, b"out", padding);
            bytes.extend(raw(1, 2, 9, b"", padding));
            assert_eq!(
                decode_all(&bytes),
                Ok(vec![
                    Record::Stdout {
                        request_id: 9,
                        content: Bytes::from_static(b"out"),
                    },
                    Record::AbortRequest { request_id: 9 },
                ]),
                "padding {padding}"
            );
        }
    }

    #[test]
    fn reserved_bytes_and_unknown_flags_are_ignored() {
        let bytes = raw(1, 1, 1, &[0, 1, 0xFF, 9, 9, 9, 9, 9], 0);
        assert_eq!(
            decode_all(&bytes),
            Ok(vec![Record::BeginRequest {
                request_id: 1,
                role: Role::Responder,
                keep_conn: true,
            }])
        );
    }

    #[test]
    fn fixed_size_bodies_must_have_their_size() {
        for (record_type, len) in [(1, 7), (1, 9), (3, 0), (3, 16), (2, 1)] {
            let request_id = 1;
            assert_eq!(
                decode_all(&raw(1, record_type, request_id, &vec![0; len], 0)),
                Err(ProtocolError::BadBodyLength { record_type, len })
            );
        }
        assert_eq!(
            decode_all(&raw(1, 11, 0, &[5; 7], 0)),
            Err(ProtocolError::BadBodyLength {
                record_type: 11,
                len: 7
            })
        );
    }

    #[test]
    fn request_ids_must_match_the_record_class() {
        for record_type in [9, 10] {
            assert_eq!(
                decode_all(&raw(1, record_type, 1, b"", 0)),
                Err(ProtocolError::ManagementRecordWithRequestId {
                    record_type,
                    request_id: 1
                })
            );
        }
        assert_eq!(
            decode_all(&raw(1, 11, 256, &[0; 8], 0)),
            Err(ProtocolError::ManagementRecordWithRequestId {
                record_type: 11,
                request_id: 256
            })
        );
        for record_type in 4..=8 {
            assert_eq!(
                decode_all(&raw(1, record_type, 0, b"", 0)),
                Err(ProtocolError::RequestRecordWithNullId { record_type })
            );
        }
        assert_eq!(
            decode_all(&raw(1, 1, 0, &[0, 1, 0, 0, 0, 0, 0, 0], 0)),
            Err(ProtocolError::RequestRecordWithNullId { record_type: 1 })
        );
    }

    #[test]
    fn unknown_types_decode_with_any_request_id() {
        for (record_type, request_id) in [(0, 0), (12, 0), (12, 7), (0xFF, u16::MAX)] {
            assert_eq!(
                decode_all(&raw(1, record_type, request_id, b"??", 3)),
                Ok(vec![Record::Unknown {
                    record_type,
                    request_id,
                    content: Bytes::from_static(b"??"),
                }])
            );
        }
    }

    #[test]
    fn encode_stream_splits_into_full_records_without_empty_ones() {
        for (len, records) in [(0, 0), (1, 1), (65535, 1), (65536, 2), (200_000, 4)] {
            let data: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
            let mut buf = BytesMut::new();
            encode_stream(&mut buf, RecordType::Stdout, 3, &data);
            assert_eq!(buf.len(), len + records * HEADER_LEN);

            let decoded = decode_all(&buf).unwrap();
            assert_eq!(decoded.len(), records, "{len} bytes");
            let mut joined = Vec::new();
            for record in decoded {
                let Record::Stdout {
                    request_id: 3,
                    content,
                } = record
                else {
                    panic!("unexpected {record:?}");
                };
                assert!(!content.is_empty() && content.len() <= MAX_CONTENT_LEN);
                // Near-equal sizes: no tiny tail record.
                assert!(
                    content.len() >= len / records - 1,
                    "{} of {len}",
                    content.len()
                );
                joined.extend_from_slice(&content);
            }
            assert_eq!(joined, data);
        }
    }

    #[test]
    fn oversized_stream_records_are_split_by_encode_record() {
        let record = Record::Stdin {
            request_id: 2,
            content: Bytes::from(vec![7; MAX_CONTENT_LEN + 1]),
        };
        assert_eq!(decode_all(&encoded(&record)).unwrap().len(), 2);
    }
}
