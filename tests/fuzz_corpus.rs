//! Replays the committed fuzz corpus (fuzz/corpus/<target>/) through the same property checks
//! the cargo-fuzz targets run, so every input that ever found a bug keeps being tested.

use std::path::Path;

fn replay(target: &str, check: fn(&[u8])) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/corpus")
        .join(target);
    let entries = std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
    let mut replayed = 0;
    for entry in entries.flatten() {
        let input = std::fs::read(entry.path()).expect("read corpus input");
        check(&input);
        replayed += 1;
    }
    assert!(replayed > 0, "the {target} corpus is empty");
}

#[test]
fn record_stream_corpus() {
    replay("record_stream", wfastcgi::properties::record_stream);
}

#[test]
fn session_corpus() {
    replay("session", wfastcgi::properties::session);
}

#[test]
fn name_values_corpus() {
    replay("name_values", wfastcgi::properties::name_values);
}

#[test]
fn web_config_corpus() {
    replay("web_config", wfastcgi::properties::web_config);
}

#[test]
fn routing_corpus() {
    replay("routing", wfastcgi::properties::routing);
}
