//! libFuzzer target: [`kiam::fuzz::certificate`].
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| kiam::fuzz::certificate(data));
