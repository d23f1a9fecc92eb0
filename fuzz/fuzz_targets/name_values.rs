//! Fuzz target: see `wfastcgi::properties::name_values` for the properties checked.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| wfastcgi::properties::name_values(data));
