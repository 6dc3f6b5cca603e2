//! libFuzzer target: [`kiam::fuzz::pod`].
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| kiam::fuzz::pod(data));
