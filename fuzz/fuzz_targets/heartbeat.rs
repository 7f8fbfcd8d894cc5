//! libFuzzer's entry for the `heartbeat` target; the body is `fleet_fuzz::heartbeat::run`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| fleet_fuzz::heartbeat::run(data));
