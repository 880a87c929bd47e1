//! Fuzz target: see `harness::fuzz::ship`.

#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| harness::fuzz::ship(data));
