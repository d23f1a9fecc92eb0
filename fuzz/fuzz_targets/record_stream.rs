//! Fuzz target: see `wfastcgi::properties::record_stream` for the properties checked.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| wfastcgi::properties::record_stream(data));
