//! libFuzzer's entry for the `agent_config` target; the body is `fleet_fuzz::agent_config::run`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| fleet_fuzz::agent_config::run(data));
