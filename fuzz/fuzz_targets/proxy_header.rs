//! Arbitrary bytes as a PROXY v1 or v2 header.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    wsgate::fuzz::proxy_header(data);
});
