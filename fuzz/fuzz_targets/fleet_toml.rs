//! libFuzzer's entry for the `fleet_toml` target; the body is `fleet_fuzz::fleet_toml::run`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| fleet_fuzz::fleet_toml::run(data));
