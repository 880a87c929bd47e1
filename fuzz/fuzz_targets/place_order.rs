//! Fuzz target: see `harness::fuzz::place_order`.

#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| harness::fuzz::place_order(data));
