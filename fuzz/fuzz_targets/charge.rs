//! Fuzz target: see `harness::fuzz::charge`.

#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| harness::fuzz::charge(data));
