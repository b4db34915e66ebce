//! Fuzz target: `mirrorpoint_target::iscsi::fuzz_login` on arbitrary input.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    mirrorpoint_target::iscsi::fuzz_login(data);
});
