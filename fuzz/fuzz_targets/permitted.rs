//! libFuzzer target: [`kiam::fuzz::permitted`].
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| kiam::fuzz::permitted(data));
