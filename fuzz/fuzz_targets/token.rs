//! libFuzzer target: [`kiam::fuzz::token`].
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| kiam::fuzz::token(data));
