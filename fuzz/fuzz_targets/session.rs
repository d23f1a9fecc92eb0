//! Fuzz target: see `wfastcgi::properties::session` for the properties checked.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| wfastcgi::properties::session(data));
