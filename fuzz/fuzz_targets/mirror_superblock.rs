//! Fuzz target: the mirror metadata superblock decoder (on-disk data a crash
//! or a bad disk may have mangled) on arbitrary input.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    mirrorpoint_target::mirror::meta::fuzz_superblock(data);
});
