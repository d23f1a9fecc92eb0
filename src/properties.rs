//! Properties of the pure parsers, checked on arbitrary input: by the cargo-fuzz targets in
//! `fuzz/`, and by `tests/fuzz_corpus.rs`, which replays the committed corpus in every test run.
//! Each function panics when a property does not hold; a panic is a bug.

use bytes::{Bytes, BytesMut};

use crate::protocol::{
    self, Advertised, Event, ParamLimits, Params, ParamsBuilder, Record, RecordDecoder, Session,
};
use crate::routing::{self, RouteSettings};

/// Small limits, so the fuzzer reaches them.
const LIMITS: ParamLimits = ParamLimits {
    max_total: 4096,
    max_name: 256,
    max_value: 1024,
    max_pairs: 64,
};

/// The record decoder fed `data` in pieces whose sizes come from the data itself: it never
/// panics, never holds more than one record beyond what it was given, yields the same records
/// whatever the split, and every record it yields encodes back to bytes that decode to it.
pub fn record_stream(data: &[u8]) {
    let Some((&seed, stream)) = data.split_first() else {
        return;
    };
    let whole = decode_all(stream, stream.len().max(1));
    let split = decode_all(stream, usize::from(seed % 17) + 1);
    assert_eq!(
        whole, split,
        "the records depend on how the stream is split"
    );
    for record in whole.iter().flatten() {
        let mut encoded = BytesMut::new();
        protocol::encode_record(&mut encoded, record);
        let mut again = Vec::new();
        while let Some(decoded) = RecordDecoder
            .decode(&mut encoded)
            .expect("re-encoded records decode")
        {
            again.push(decoded);
        }
        // A stream too long for one record is re-encoded as several of the same type.
        assert!(!again.is_empty(), "{record:?} encoded to nothing");
        if again.len() == 1 {
            assert_eq!(&again[0], record, "encode(decode(x)) changed the record");
        }
        if let Record::Params { content, .. } = record {
            params_stream(content);
        }
    }
}

/// Decodes `stream` fed `step` bytes at a time; the records, then the error if one ended it.
fn decode_all(stream: &[u8], step: usize) -> Vec<Result<Record, String>> {
    let mut buffer = BytesMut::new();
    let mut records = Vec::new();
    for piece in stream.chunks(step) {
        buffer.extend_from_slice(piece);
        loop {
            match RecordDecoder.decode(&mut buffer) {
                Ok(Some(record)) => records.push(Ok(record)),
                Ok(None) => break,
                Err(e) => {
                    records.push(Err(e.to_string()));
                    return records;
                }
            }
        }
        assert!(
            buffer.len() <= protocol::HEADER_LEN + 65535 + 255,
            "more than one record held"
        );
    }
    if let Err(e) = RecordDecoder.finish(&buffer) {
        records.push(Err(e.to_string()));
    }
    records
}

/// A connection's session fed `data` in pieces whose sizes come from the data itself, with a
/// driver that answers each request when its body ends (or at once, every other request, so
/// bodies are drained) and stops taking requests after a few: it never panics, and the events,
/// the replies and the error that ends the stream are the same however the stream is split.
pub fn session(data: &[u8]) {
    let Some((&seed, stream)) = data.split_first() else {
        return;
    };
    let whole = run_session(seed, stream, stream.len().max(1));
    let split = run_session(seed, stream, usize::from(seed % 17) + 1);
    assert_eq!(
        whole, split,
        "the session depends on how the stream is split"
    );
}

/// What a session did: its events, then its replies, then the error if one ended the stream.
fn run_session(seed: u8, stream: &[u8], step: usize) -> (Vec<String>, Vec<u8>, Option<String>) {
    let mut session = Session::new(LIMITS, Advertised::ONE, BytesMut::new());
    let (mut events, mut replies) = (Vec::new(), Vec::new());
    let mut requests = 0;
    let now = std::time::Instant::now();
    for piece in stream.chunks(step) {
        session.read_buf().extend_from_slice(piece);
        let _ = session.head_deadline(now, std::time::Duration::from_secs(1));
        loop {
            let event = session.next_event();
            replies.extend(session.take_replies().unwrap_or_default());
            let event = match event {
                Ok(Some(event)) => event,
                Ok(None) => break,
                Err(e) => return (events, replies, Some(e.to_string())),
            };
            match &event {
                Event::Request { .. } => {
                    requests += 1;
                    if requests % 2 == 0 {
                        replies.extend(session.end_response(Bytes::from_static(b"early"), false));
                    }
                    session.set_accepting(requests < usize::from(seed % 4) + 1);
                }
                Event::BodyEnd | Event::Aborted => {
                    let aborted = event == Event::Aborted;
                    replies.extend(session.end_response(Bytes::from_static(b"last"), aborted));
                }
                Event::Refused { .. } => session.response_ended(),
                Event::Body(_) => {}
            }
            events.push(format!("{event:?}"));
        }
        assert!(
            session.read_buf().len() <= protocol::HEADER_LEN + 65535 + 255,
            "more than one record held"
        );
    }
    let end = session.end_of_stream().err().map(|e| e.to_string());
    (events, replies, end)
}

/// Name-value pairs: decoding never panics, stays within the limits, does not depend on how
/// the bytes are split across records, and re-encoding the pairs decodes to the same pairs.
pub fn name_values(data: &[u8]) {
    params_stream(&Bytes::copy_from_slice(data));
}

fn params_stream(content: &Bytes) {
    let whole = protocol::decode_name_values(content, &LIMITS);
    let mut builder = ParamsBuilder::new(LIMITS);
    let mut split = Ok(());
    for piece in content.chunks(7) {
        split = split.and_then(|()| builder.push(piece));
    }
    let split = split.and_then(|()| builder.finish());
    // Which limit trips first may depend on the split; whether one trips may not.
    assert_eq!(
        whole.is_ok(),
        split.is_ok(),
        "the split changed whether the pairs decode"
    );
    let Ok(params) = whole else { return };
    assert_eq!(
        Ok(&params),
        split.as_ref(),
        "the pairs depend on how the records are split"
    );
    assert!(params.len() <= LIMITS.max_pairs);
    let mut encoded = BytesMut::new();
    for (name, value) in params.iter() {
        assert!(name.len() <= LIMITS.max_name && value.len() <= LIMITS.max_value);
        protocol::encode_name_value(&mut encoded, name, value);
    }
    let again =
        protocol::decode_name_values(&encoded.freeze(), &LIMITS).expect("re-encoded pairs decode");
    assert_eq!(again, params, "encode(decode(x)) changed the pairs");
}

/// The web.config reader never panics, and the keys it returns are trimmed and unique.
pub fn web_config(data: &[u8]) {
    let Ok(settings) = crate::config::parse_app_settings(data) else {
        return;
    };
    for (i, (key, _)) in settings.iter().enumerate() {
        assert_eq!(key, key.trim(), "untrimmed key");
        assert!(
            settings[..i].iter().all(|(k, _)| k != key),
            "duplicate key {key:?}"
        );
    }
}

/// The SCRIPT_NAME/PATH_INFO rules never panic, and moving the mount point (a sub-application,
/// a SCRIPT_NAME setting) never changes the full path SCRIPT_NAME + PATH_INFO under IIS.
pub fn routing(data: &[u8]) {
    let Some((&flags, rest)) = data.split_first() else {
        return;
    };
    const NAMES: [&[u8]; 8] = [
        b"PATH_INFO",
        b"SCRIPT_NAME",
        b"REQUEST_URI",
        b"UNENCODED_URL",
        b"HTTP_X_ORIGINAL_URL",
        b"APPL_MD_PATH",
        b"SERVER_SOFTWARE",
        b"QUERY_STRING",
    ];
    let mut params = Params::default();
    let mut mount = None;
    for (i, value) in rest.split(|&b| b == 0).enumerate() {
        match NAMES.get(i) {
            Some(name) => params.push(name, value),
            None => mount = Some(String::from_utf8_lossy(value).into_owned()),
        }
    }
    let settings = RouteSettings {
        allow_path_info_for_script_mappings: flags & 1 == 1,
        script_name: mount.as_deref(),
    };
    let moved = routing::route(&params, &settings);
    if routing::is_iis(&params) && !settings.allow_path_info_for_script_mappings {
        let mut at_root = Params::default();
        for (name, value) in params.iter().filter(|(name, _)| *name != b"APPL_MD_PATH") {
            at_root.push(name, value);
        }
        if !routing::is_iis(&at_root) {
            return; // APPL_MD_PATH was what made it IIS
        }
        let whole = routing::route(&at_root, &RouteSettings::default());
        let joined = [&moved.script_name[..], &moved.path_info[..]].concat();
        assert_eq!(
            joined,
            whole.path_info.to_vec(),
            "the mount point changed the full path"
        );
    }
}
