//! Fuzz target: see `harness::fuzz::reserve`.

#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| harness::fuzz::reserve(data));
