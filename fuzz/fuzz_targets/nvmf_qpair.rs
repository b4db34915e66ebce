//! Fuzz target: `mirrorpoint_target::nvmf::fuzz_queue_pair` on arbitrary input.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    mirrorpoint_target::nvmf::fuzz_queue_pair(data);
});
