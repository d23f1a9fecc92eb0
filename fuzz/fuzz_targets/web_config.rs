//! Fuzz target: see `wfastcgi::properties::web_config` for the properties checked.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| wfastcgi::properties::web_config(data));
