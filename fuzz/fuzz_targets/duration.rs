//! libFuzzer target: [`kiam::fuzz::duration`].
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| kiam::fuzz::duration(data));
