//! Framing: cutting whole records off the front of a receive buffer.

use bytes::BytesMut;

use super::{ProtocolError, Record, HEADER_LEN, VERSION_1};

/// Incremental record decoder: the caller appends the bytes it reads to a `BytesMut` and calls
/// [`decode`](Self::decode) until it returns `Ok(None)`.
///
/// It keeps no state: everything it needs is in the buffer, so a partial record costs nothing
/// but the bytes already received, and at most one record (8 + 65535 + 255 bytes) is ever
/// waited for.
#[derive(Debug, Default, Clone, Copy)]
pub struct RecordDecoder;

impl RecordDecoder {
    /// Decodes the record at the front of `buf`.
    ///
    /// - `Ok(Some(record))`: the record's bytes (header, content and padding) were consumed; its
    ///   content shares `buf`'s memory rather than being copied.
    /// - `Ok(None)`: `buf` holds less than one whole record and nothing was consumed; read more.
    /// - `Err(_)`: the stream is malformed and cannot be resynchronised; close the connection.
    pub fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<Record>, ProtocolError> {
        let Some(header) = Header::peek(buf) else {
            return Ok(None);
        };
        // Checked before waiting for the body: a peer speaking something else is told at once.
        if header.version != VERSION_1 {
            return Err(ProtocolError::UnsupportedVersion(header.version));
        }
        if buf.len() < header.record_len() {
            return Ok(None);
        }
        let record = buf.split_to(header.record_len()).freeze();
        let content = record.slice(HEADER_LEN..HEADER_LEN + header.content_len);
        Record::from_parts(header.record_type, header.request_id, content).map(Some)
    }

    /// Checks what is left at the end of the stream: `Ok(())` if nothing, else `TruncatedRecord`.
    pub fn finish(&self, buf: &BytesMut) -> Result<(), ProtocolError> {
        if buf.is_empty() {
            Ok(())
        } else {
            Err(ProtocolError::TruncatedRecord {
                have: buf.len(),
                need: buf.len() + Self::bytes_needed(buf),
            })
        }
    }

    /// How many more bytes `buf` needs before [`decode`](Self::decode) can make progress: the
    /// rest of the header, then the rest of the record; 0 when a whole record is there.
    pub fn bytes_needed(buf: &BytesMut) -> usize {
        match Header::peek(buf) {
            Some(header) => header.record_len().saturating_sub(buf.len()),
            None => HEADER_LEN - buf.len(),
        }
    }
}

/// The header fields that framing needs; the reserved byte is ignored.
struct Header {
    version: u8,
    record_type: u8,
    request_id: u16,
    content_len: usize,
    padding_len: usize,
}

impl Header {
    /// The header at the front of `buf`, if it has arrived.
    fn peek(buf: &[u8]) -> Option<Self> {
        let &[version, record_type, id_hi, id_lo, len_hi, len_lo, padding_len, _reserved] =
            buf.first_chunk::<HEADER_LEN>()?;
        Some(Self {
            version,
            record_type,
            request_id: u16::from_be_bytes([id_hi, id_lo]),
            content_len: usize::from(u16::from_be_bytes([len_hi, len_lo])),
            padding_len: usize::from(padding_len),
        })
    }

    /// Header, content and padding.
    fn record_len(&self) -> usize {
        HEADER_LEN + self.content_len + self.padding_len
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::super::testing::{decode_in_chunks, one_of_each, XorShift};
    use super::super::{encode_record, Role, MAX_CONTENT_LEN};
    use super::*;

    /// Every kind of record, encoded.
    fn sample_stream() -> (Vec<u8>, Vec<Record>) {
        let records = one_of_each(1);
        let mut buf = BytesMut::new();
        for record in &records {
            encode_record(&mut buf, record);
        }
        (buf.to_vec(), records)
    }

    #[test]
    fn empty_stream_is_clean() {
        let mut buf = BytesMut::new();
        assert_eq!(RecordDecoder.decode(&mut buf), Ok(None));
        assert_eq!(RecordDecoder.finish(&buf), Ok(()));
        assert_eq!(RecordDecoder::bytes_needed(&buf), HEADER_LEN);
    }

    #[test]
    fn one_byte_at_a_time_gives_the_same_records() {
        let (bytes, records) = sample_stream();
        assert_eq!(decode_in_chunks(&bytes, || usize::MAX), Ok(records.clone()));
        assert_eq!(decode_in_chunks(&bytes, || 1), Ok(records));
    }

    #[test]
    fn content_is_not_copied() {
        let (bytes, _) = sample_stream();
        let mut buf = BytesMut::from(&bytes[..]);
        let received = buf.as_ptr_range();
        while let Some(record) = RecordDecoder.decode(&mut buf).unwrap() {
            if let Record::Stdin { content, .. } = record {
                assert!(content.is_empty() || received.contains(&content.as_ptr()));
            }
        }
    }

    #[test]
    fn truncated_records_wait_then_fail_at_finish() {
        let mut record = BytesMut::new();
        encode_record(
            &mut record,
            &Record::Stdout {
                request_id: 1,
                content: Bytes::from_static(b"0123456789"),
            },
        );
        record[6] = 4; // padding, appended below
        record.extend_from_slice(&[0; 4]);
        let whole = record.len();
        // Cut in the header, in the content and in the padding.
        for cut in [1, HEADER_LEN - 1, HEADER_LEN, HEADER_LEN + 5, whole - 1] {
            let mut buf = BytesMut::from(&record[..cut]);
            assert_eq!(RecordDecoder.decode(&mut buf), Ok(None), "cut at {cut}");
            assert_eq!(buf.len(), cut);
            let need = if cut < HEADER_LEN { HEADER_LEN } else { whole };
            assert_eq!(RecordDecoder::bytes_needed(&buf), need - cut);
            assert_eq!(
                RecordDecoder.finish(&buf),
                Err(ProtocolError::TruncatedRecord { have: cut, need })
            );
        }
    }

    #[test]
    fn bad_version_is_reported_before_the_body_arrives() {
        for version in [0, 2, 0xFF] {
            let mut buf = BytesMut::from(&[version, 6, 0, 1, 0xFF, 0xFF, 0, 0][..]);
            assert_eq!(
                RecordDecoder.decode(&mut buf),
                Err(ProtocolError::UnsupportedVersion(version))
            );
        }
    }

    fn random_record(rng: &mut XorShift) -> Record {
        let request_id = 1 + rng.below(usize::from(u16::MAX)) as u16;
        let len = match rng.below(10) {
            0 => 0,
            1 => MAX_CONTENT_LEN - rng.below(2),
            _ => rng.below(300),
        };
        let content = Bytes::from(rng.bytes(len));
        match rng.below(12) {
            0 => Record::BeginRequest {
                request_id,
                role: Role::from_u16(rng.below(5) as u16),
                keep_conn: rng.below(2) == 0,
            },
            1 => Record::AbortRequest { request_id },
            2 => Record::EndRequest {
                request_id,
                app_status: rng.next_u64() as u32,
                protocol_status: rng.next_u64() as u8,
            },
            3 => Record::Params {
                request_id,
                content,
            },
            4 => Record::Stdin {
                request_id,
                content,
            },
            5 => Record::Stdout {
                request_id,
                content,
            },
            6 => Record::Stderr {
                request_id,
                content,
            },
            7 => Record::Data {
                request_id,
                content,
            },
            8 => Record::GetValues { content },
            9 => Record::GetValuesResult { content },
            10 => Record::UnknownType {
                record_type: rng.next_u64() as u8,
            },
            _ => Record::Unknown {
                record_type: 12 + rng.below(244) as u8,
                request_id: rng.next_u64() as u16,
                content,
            },
        }
    }

    #[test]
    fn random_records_survive_random_padding_and_splits() {
        let mut rng = XorShift::new(0x00C0_FFEE);
        for _ in 0..200 {
            let mut bytes = BytesMut::new();
            let mut records = Vec::new();
            for _ in 0..1 + rng.below(8) {
                let record = random_record(&mut rng);
                let start = bytes.len();
                encode_record(&mut bytes, &record);
                let padding = rng.below(256);
                bytes[start + 6] = padding as u8;
                bytes.extend_from_slice(&rng.bytes(padding));
                records.push(record);
            }
            let max_chunk = 1 + rng.below(bytes.len());
            let decoded = decode_in_chunks(&bytes, || 1 + rng.below(max_chunk));
            assert_eq!(decoded, Ok(records));
        }
    }

    #[test]
    fn random_garbage_never_panics() {
        let mut rng = XorShift::new(7);
        for _ in 0..2000 {
            let len = rng.below(64);
            let mut bytes = rng.bytes(len);
            // Mostly valid versions and small lengths, so decoding gets past the header.
            if bytes.len() >= HEADER_LEN && rng.below(4) != 0 {
                bytes[0] = VERSION_1;
                bytes[4] = 0;
                bytes[5] = rng.below(16) as u8;
                bytes[6] = rng.below(4) as u8;
            }
            let mut buf = BytesMut::from(&bytes[..]);
            while let Ok(Some(record)) = RecordDecoder.decode(&mut buf) {
                let mut out = BytesMut::new();
                encode_record(&mut out, &record);
            }
            let _ = RecordDecoder.finish(&buf);
        }
    }
}
