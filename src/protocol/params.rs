//! Name-value pairs: the PARAMS stream and the bodies of GET_VALUES and GET_VALUES_RESULT.
//!
//! A pair is `nameLength valueLength name value`. A length below 128 takes one byte; a longer one
//! takes four, big-endian, with the high bit set to tell the two forms apart.

use std::ops::Range;

use bytes::{BufMut, Bytes, BytesMut};

use super::ProtocolError;

/// The high bit that marks a four-byte length.
const LONG_LENGTH: u32 = 1 << 31;

/// Limits on name-value pairs, checked while decoding so a peer cannot make us buffer without
/// bound.
#[derive(Debug, Clone, Copy)]
pub struct ParamLimits {
    /// Bytes of encoded pairs in one PARAMS stream or GET_VALUES body (default 1 MiB).
    pub max_total: usize,
    /// Length of one name (default 64 KiB).
    pub max_name: usize,
    /// Length of one value (default 1 MiB).
    pub max_value: usize,
    /// Number of pairs (default 10 000): each costs a table entry, so a stream of empty pairs
    /// must not cost 32 times its size.
    pub max_pairs: usize,
}

impl Default for ParamLimits {
    fn default() -> Self {
        Self {
            max_total: 1 << 20,
            max_name: 64 << 10,
            max_value: 1 << 20,
            max_pairs: 10_000,
        }
    }
}

/// Decoded name-value pairs in the order received. A pair is a pair of ranges into one of
/// `buffers`: the request's parameter stream (one copy of it, see [`ParamsBuilder`]), or, for a
/// pair added later, a buffer of its own.
#[derive(Clone, Default)]
pub struct Params {
    buffers: Vec<Bytes>,
    pairs: Vec<Pair>,
}

#[derive(Debug, Clone)]
struct Pair {
    buffer: usize,
    name: Range<usize>,
    value: Range<usize>,
}

impl Params {
    /// The value of the first pair with this name; names are case-sensitive.
    pub fn get(&self, name: &[u8]) -> Option<&[u8]> {
        let pair = self.find(name)?;
        Some(&self.buffers[pair.buffer][pair.value.clone()])
    }

    /// Like `get`, as a `Bytes` that shares the record's buffer.
    pub fn value(&self, name: &[u8]) -> Option<Bytes> {
        let pair = self.find(name)?;
        Some(self.buffers[pair.buffer].slice(pair.value.clone()))
    }

    /// Lengths first: most names differ in length, and those are never sliced or compared
    /// (a request looks up about ten names among some fifty pairs).
    fn find(&self, name: &[u8]) -> Option<&Pair> {
        self.pairs.iter().find(|pair| {
            pair.name.len() == name.len() && &self.buffers[pair.buffer][pair.name.clone()] == name
        })
    }

    pub fn iter(&self) -> impl Iterator<Item = (&[u8], &[u8])> {
        self.pairs.iter().map(|pair| {
            let buffer = &self.buffers[pair.buffer];
            (&buffer[pair.name.clone()], &buffer[pair.value.clone()])
        })
    }

    pub fn len(&self) -> usize {
        self.pairs.len()
    }

    pub fn is_empty(&self) -> bool {
        self.pairs.is_empty()
    }

    /// Adds a pair, copied.
    pub fn push(&mut self, name: &[u8], value: &[u8]) {
        let pair = Bytes::from([name, value].concat());
        self.buffers.push(pair);
        self.pairs.push(Pair {
            buffer: self.buffers.len() - 1,
            name: 0..name.len(),
            value: name.len()..name.len() + value.len(),
        });
    }
}

impl PartialEq for Params {
    fn eq(&self, other: &Self) -> bool {
        self.iter().eq(other.iter())
    }
}

impl Eq for Params {}

impl std::fmt::Debug for Params {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list()
            .entries(self.iter().map(|(name, value)| {
                (
                    String::from_utf8_lossy(name),
                    String::from_utf8_lossy(value),
                )
            }))
            .finish()
    }
}

/// Accumulates the PARAMS stream of one request.
///
/// Pairs may be split across records at any byte, length bytes included. The records' content
/// is copied into one buffer: memory is the parameter bytes (at most twice, while the buffer
/// grows), never more than `max_total`, however the records are cut. Keeping the records
/// themselves would pin each one's read buffer (16-64 KiB), so 12-byte records cost 5 000 times
/// their size.
#[derive(Debug, Default)]
pub struct ParamsBuilder {
    limits: ParamLimits,
    /// The stream received so far.
    stream: Vec<u8>,
    pairs: Vec<Pair>,
    /// Where the first pair not yet complete starts.
    scanned: usize,
}

impl ParamsBuilder {
    pub fn new(limits: ParamLimits) -> Self {
        Self {
            limits,
            stream: Vec::new(),
            // IIS sends about fifty pairs: room for them without growing step by step.
            pairs: Vec::with_capacity(64),
            scanned: 0,
        }
    }

    /// Takes the content of one non-empty PARAMS record. After an error the builder is spent.
    pub fn push(&mut self, content: &[u8]) -> Result<(), ProtocolError> {
        // Checked before any of the record is kept.
        let received = self.stream.len().saturating_add(content.len());
        if received > self.limits.max_total {
            return Err(ProtocolError::ParamsTooLarge {
                limit: self.limits.max_total,
            });
        }
        if received > self.stream.capacity() {
            // Doubling (linear in all), but never past the limit.
            let room = (2 * self.stream.capacity()).clamp(received, self.limits.max_total);
            self.stream.reserve_exact(room - self.stream.len());
        }
        self.stream.extend_from_slice(content);
        while let Some((name, value)) = scan_pair(&self.stream[self.scanned..], &self.limits)? {
            if self.pairs.len() >= self.limits.max_pairs {
                return Err(ProtocolError::TooManyParams {
                    limit: self.limits.max_pairs,
                });
            }
            let at = self.scanned;
            self.pairs.push(Pair {
                buffer: 0,
                name: at + name.start..at + name.end,
                value: at + value.start..at + value.end,
            });
            self.scanned = at + value.end;
        }
        Ok(())
    }

    /// Ends the stream, on its empty PARAMS record.
    pub fn finish(self) -> Result<Params, ProtocolError> {
        if self.scanned != self.stream.len() {
            return Err(ProtocolError::NameValueTruncated);
        }
        let mut pairs = self.pairs;
        // Room for IIS's fifty pairs was made up front; a request keeps only what it has.
        pairs.shrink_to_fit();
        Ok(Params {
            buffers: vec![Bytes::from(self.stream)],
            pairs,
        })
    }
}

/// Decodes a complete block of name-value pairs, such as GET_VALUES content.
pub fn decode_name_values(content: &[u8], limits: &ParamLimits) -> Result<Params, ProtocolError> {
    let mut builder = ParamsBuilder::new(*limits);
    builder.push(content)?;
    builder.finish()
}

/// Appends one pair, each length in one byte when below 128 and in four bytes otherwise.
///
/// # Panics
///
/// If a length exceeds 2^31 - 1 bytes, which the four-byte form cannot express.
pub fn encode_name_value(buf: &mut BytesMut, name: &[u8], value: &[u8]) {
    buf.reserve(8 + name.len() + value.len());
    put_length(buf, name.len());
    put_length(buf, value.len());
    buf.put_slice(name);
    buf.put_slice(value);
}

fn put_length(buf: &mut BytesMut, len: usize) {
    match u8::try_from(len) {
        Ok(short) if short < 0x80 => buf.put_u8(short),
        _ => {
            let long = u32::try_from(len)
                .ok()
                .filter(|&len| len < LONG_LENGTH)
                .expect("name-value length exceeds 2^31 - 1 bytes");
            buf.put_u32(long | LONG_LENGTH);
        }
    }
}

/// Where a pair's name and value are.
type PairRanges = (Range<usize>, Range<usize>);

/// The name and value of the whole pair at the start of `buf` (which ends where its value
/// ends); `None` while more bytes are needed. Each length is checked against `limits` as soon as
/// it is known, so an oversized pair fails before its bytes arrive.
fn scan_pair(buf: &[u8], limits: &ParamLimits) -> Result<Option<PairRanges>, ProtocolError> {
    let Some((name_len, name_width)) = read_length(buf) else {
        return Ok(None);
    };
    if name_len > limits.max_name {
        return Err(ProtocolError::NameTooLong {
            len: name_len,
            limit: limits.max_name,
        });
    }
    let Some((value_len, value_width)) = read_length(&buf[name_width..]) else {
        return Ok(None);
    };
    if value_len > limits.max_value {
        return Err(ProtocolError::ValueTooLong {
            len: value_len,
            limit: limits.max_value,
        });
    }
    let value_start = name_width + value_width + name_len;
    // Saturates only on 32-bit targets with limits near 4 GiB; such a pair never completes, and
    // max_total ends the stream.
    let end = value_start.saturating_add(value_len);
    let name = name_width + value_width..value_start;
    Ok((buf.len() >= end).then_some((name, value_start..end)))
}

/// Reads the length at the start of `buf` as (length, bytes it takes); `None` while it has not
/// all arrived.
fn read_length(buf: &[u8]) -> Option<(usize, usize)> {
    match *buf {
        [short, ..] if short < 0x80 => Some((usize::from(short), 1)),
        [b0, b1, b2, b3, ..] => {
            let long = u32::from_be_bytes([b0, b1, b2, b3]) & !LONG_LENGTH;
            // 31 bits fit the usize of every target `bytes` supports.
            Some((long as usize, 4))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::XorShift;
    use super::*;

    fn encode_pairs(pairs: &[(&[u8], &[u8])]) -> Bytes {
        let mut buf = BytesMut::new();
        for (name, value) in pairs {
            encode_name_value(&mut buf, name, value);
        }
        buf.freeze()
    }

    fn params_of(pairs: &[(&[u8], &[u8])]) -> Params {
        let mut params = Params::default();
        for (name, value) in pairs {
            params.push(name, value);
        }
        params
    }

    /// Feeds `stream` as records of the given lengths (the rest in one last record).
    fn build(
        stream: &Bytes,
        record_lens: impl IntoIterator<Item = usize>,
        limits: ParamLimits,
    ) -> Result<Params, ProtocolError> {
        let mut builder = ParamsBuilder::new(limits);
        let mut rest = stream.clone();
        for len in record_lens {
            builder.push(&rest.split_to(len.min(rest.len())))?;
        }
        if !rest.is_empty() {
            builder.push(&rest)?;
        }
        builder.finish()
    }

    fn roomy() -> ParamLimits {
        ParamLimits {
            max_total: 4 << 20,
            max_name: 2 << 20,
            max_value: 2 << 20,
            max_pairs: 1 << 20,
        }
    }

    /// A mix of short and long lengths, empty names and values, and non-UTF-8 bytes.
    fn sample() -> Vec<(Vec<u8>, Vec<u8>)> {
        vec![
            (b"SCRIPT_NAME".to_vec(), b"/app".to_vec()),
            (b"EMPTY".to_vec(), Vec::new()),
            (vec![b'N'; 130], vec![0xFF; 300]),
            (Vec::new(), b"nameless".to_vec()),
            (b"QUERY_STRING".to_vec(), vec![b'q'; 127]),
            (vec![b'M'; 128], b"x".to_vec()),
        ]
    }

    fn as_slices(pairs: &[(Vec<u8>, Vec<u8>)]) -> Vec<(&[u8], &[u8])> {
        pairs.iter().map(|(n, v)| (&n[..], &v[..])).collect()
    }

    #[test]
    fn lengths_take_one_byte_below_128_and_four_above() {
        for len in [0, 1, 127, 128, 65535, 1 << 20] {
            let width = if len < 128 { 1 } else { 4 };
            let mut encoded = BytesMut::new();
            put_length(&mut encoded, len);
            assert_eq!(encoded.len(), width);
            assert_eq!(read_length(&encoded), Some((len, width)));

            let long = vec![b'z'; len];
            for (name, value) in [(&long[..], &b"v"[..]), (&b"n"[..], &long[..])] {
                let encoded = encode_pairs(&[(name, value)]);
                assert_eq!(encoded.len(), 1 + width + 1 + len, "length {len}");
                assert_eq!(
                    decode_name_values(&encoded, &roomy()),
                    Ok(params_of(&[(name, value)]))
                );
            }
        }
        // Four-byte lengths are big-endian with the high bit set.
        let encoded = encode_pairs(&[(&[b'a'; 0x0102][..], b"")]);
        assert_eq!(&encoded[..5], [0x80, 0x00, 0x01, 0x02, 0x00]);
    }

    #[test]
    fn a_split_at_any_byte_gives_the_same_params() {
        let pairs = sample();
        let expected = params_of(&as_slices(&pairs));
        let stream = encode_pairs(&as_slices(&pairs));
        for split in 0..=stream.len() {
            assert_eq!(
                build(&stream, [split], ParamLimits::default()),
                Ok(expected.clone()),
                "split at {split}"
            );
        }
        let one_byte_records = std::iter::repeat_n(1, stream.len());
        assert_eq!(
            build(&stream, one_byte_records, ParamLimits::default()),
            Ok(expected)
        );
    }

    #[test]
    fn a_value_may_span_many_records() {
        let value: Vec<u8> = (0..200_000).map(|i| i as u8).collect();
        let stream = encode_pairs(&[(b"BIG", &value), (b"after", b"1")]);
        let expected = params_of(&[(b"BIG", &value), (b"after", b"1")]);
        assert_eq!(build(&stream, [65535; 4], roomy()), Ok(expected));
    }

    #[test]
    fn tiny_records_do_not_pin_their_read_buffers() {
        let stream = encode_pairs(&as_slices(&sample()));
        let mut builder = ParamsBuilder::new(ParamLimits::default());
        let mut records = Vec::new();
        for piece in stream.chunks(12) {
            // Each record arrived in a read buffer of its own, as a slow sender's do.
            let mut read = BytesMut::with_capacity(64 << 10);
            read.extend_from_slice(piece);
            let record = read.freeze();
            builder.push(&record).unwrap();
            records.push(record);
        }
        assert!(builder.stream.capacity() <= 2 * stream.len());
        let params = builder.finish().unwrap();
        assert_eq!(params, params_of(&as_slices(&sample())));
        assert!(records.into_iter().all(|record| record.is_unique()));
    }

    #[test]
    fn params_lookup_is_first_match_and_case_sensitive() {
        let params = params_of(&[(b"A", b"1"), (b"a", b"2"), (b"A", b"3")]);
        assert_eq!(params.len(), 3);
        assert!(!params.is_empty());
        assert!(Params::default().is_empty());
        assert_eq!(params.get(b"A"), Some(&b"1"[..]));
        assert_eq!(params.get(b"a"), Some(&b"2"[..]));
        assert_eq!(params.get(b"b"), None);
        let names: Vec<&[u8]> = params.iter().map(|(name, _)| name).collect();
        assert_eq!(names, [b"A", b"a", b"A"]);
    }

    #[test]
    fn incomplete_pairs_are_truncation_errors() {
        let stream = encode_pairs(&[(b"NAME", b"value")]);
        for cut in 1..stream.len() {
            let partial = stream.slice(..cut);
            assert_eq!(
                decode_name_values(&partial, &ParamLimits::default()),
                Err(ProtocolError::NameValueTruncated),
                "cut at {cut}"
            );
        }
        assert_eq!(
            decode_name_values(&Bytes::new(), &ParamLimits::default()),
            Ok(Params::default())
        );
    }

    #[test]
    fn long_names_and_values_fail_as_soon_as_their_length_arrives() {
        let limits = ParamLimits::default();
        let mut builder = ParamsBuilder::new(limits);
        builder.push(&[0x80]).unwrap();
        assert_eq!(
            builder.push(&[0x01, 0x00, 0x01]),
            Err(ProtocolError::NameTooLong {
                len: 0x1_0001,
                limit: 64 << 10
            })
        );

        let mut builder = ParamsBuilder::new(limits);
        assert_eq!(
            builder.push(&[0x01, 0x80, 0x10, 0x00, 0x01]),
            Err(ProtocolError::ValueTooLong {
                len: 0x10_0001,
                limit: 1 << 20
            })
        );

        let at_limits = ParamLimits {
            max_total: 1000,
            max_name: 3,
            max_value: 4,
            max_pairs: 10,
        };
        let fits = encode_pairs(&[(b"abc", b"defg")]);
        assert!(decode_name_values(&fits, &at_limits).is_ok());
        let name_over = encode_pairs(&[(b"abcd", b"")]);
        assert_eq!(
            decode_name_values(&name_over, &at_limits),
            Err(ProtocolError::NameTooLong { len: 4, limit: 3 })
        );
        let value_over = encode_pairs(&[(b"", b"abcde")]);
        assert_eq!(
            decode_name_values(&value_over, &at_limits),
            Err(ProtocolError::ValueTooLong { len: 5, limit: 4 })
        );
    }

    #[test]
    fn total_limit_trips_without_buffering_past_it() {
        let limits = ParamLimits {
            max_total: 1000,
            ..ParamLimits::default()
        };
        // One pair declaring a 5000-byte value: legal per pair, too big for the stream.
        let stream = encode_pairs(&[(b"N", &[b'v'; 5000])]);
        let mut builder = ParamsBuilder::new(limits);
        builder.push(&stream[..600]).unwrap();
        assert_eq!(builder.stream.len(), 600);
        builder.push(&stream[600..1000]).unwrap();
        assert!(builder.stream.capacity() <= limits.max_total);
        assert_eq!(
            builder.push(&stream[1000..1001]),
            Err(ProtocolError::ParamsTooLarge { limit: 1000 })
        );
        assert_eq!(builder.stream.len(), 1000);
        assert!(builder.stream.capacity() <= limits.max_total);

        let exactly = encode_pairs(&[(b"N", &[b'v'; 994])]);
        assert_eq!(exactly.len(), 1000);
        assert!(decode_name_values(&exactly, &limits).is_ok());
        let one_over = encode_pairs(&[(b"N", &[b'v'; 995])]);
        assert_eq!(
            decode_name_values(&one_over, &limits),
            Err(ProtocolError::ParamsTooLarge { limit: 1000 })
        );
    }

    #[test]
    fn random_pairs_survive_random_record_splits() {
        let mut rng = XorShift::new(0x5EED);
        for _ in 0..300 {
            let pairs: Vec<(Vec<u8>, Vec<u8>)> = (0..rng.below(12))
                .map(|_| {
                    let mut len = || match rng.below(6) {
                        0 => 120 + rng.below(20),
                        1 => rng.below(3000),
                        _ => rng.below(20),
                    };
                    let (name_len, value_len) = (len(), len());
                    (rng.bytes(name_len), rng.bytes(value_len))
                })
                .collect();
            let stream = encode_pairs(&as_slices(&pairs));
            let max_record = 1 + rng.below(stream.len().max(1));
            let record_lens: Vec<usize> = (0..stream.len())
                .map(|_| 1 + rng.below(max_record))
                .collect();
            assert_eq!(
                build(&stream, record_lens, ParamLimits::default()),
                Ok(params_of(&as_slices(&pairs)))
            );
        }
    }

    #[test]
    fn random_garbage_never_panics() {
        let mut rng = XorShift::new(99);
        let limits = ParamLimits {
            max_total: 4096,
            max_name: 512,
            max_value: 1024,
            max_pairs: 100,
        };
        for _ in 0..2000 {
            let len = rng.below(300);
            let garbage = Bytes::from(rng.bytes(len));
            let record_lens: Vec<usize> = (0..8).map(|_| 1 + rng.below(64)).collect();
            let _ = build(&garbage, record_lens, limits);
        }
    }

    #[test]
    fn the_number_of_pairs_is_limited() {
        let limits = ParamLimits {
            max_pairs: 3,
            ..ParamLimits::default()
        };
        let three = encode_pairs(&[(b"a", b""), (b"b", b""), (b"c", b"")]);
        assert_eq!(decode_name_values(&three, &limits).map(|p| p.len()), Ok(3));
        let four = encode_pairs(&[(b"a", b""), (b"b", b""), (b"c", b""), (b"d", b"")]);
        assert_eq!(
            decode_name_values(&four, &limits),
            Err(ProtocolError::TooManyParams { limit: 3 })
        );
    }
}
