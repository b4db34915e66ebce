//! Fuzz target: `mirrorpoint_target::rpc::fuzz_rpc_stream` on arbitrary input.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    mirrorpoint_target::rpc::fuzz_rpc_stream(data);
});
