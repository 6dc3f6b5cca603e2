//! libFuzzer target: [`kiam::fuzz::paths`].
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| kiam::fuzz::paths(data));
