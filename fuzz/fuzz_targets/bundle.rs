//! libFuzzer's entry for the `bundle` target; the body is `fleet_fuzz::bundle::run`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| fleet_fuzz::bundle::run(data));
