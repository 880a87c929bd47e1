//! Fuzz target: see `harness::fuzz::saga_machine`.

#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| harness::fuzz::saga_machine(data));
