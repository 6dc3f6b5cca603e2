//! libFuzzer target: [`kiam::fuzz::request`].
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| kiam::fuzz::request(data));
