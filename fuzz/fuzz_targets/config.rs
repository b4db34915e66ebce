//! Fuzz target: `mirrorpoint_target::daemon::config::fuzz_config` on arbitrary input.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    mirrorpoint_target::daemon::config::fuzz_config(data);
});
