//! x
pub fn fuzz_decode(_d: &[u8]) {}
