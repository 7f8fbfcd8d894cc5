//! libFuzzer's entry for the `manifest` target; the body is `fleet_fuzz::manifest::run`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| fleet_fuzz::manifest::run(data));
