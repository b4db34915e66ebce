//! Fuzz target: `mirrorpoint_target::mirror::wire::fuzz_decode` on arbitrary input.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    mirrorpoint_target::mirror::wire::fuzz_decode(data);
});
