//! Arbitrary bytes as a request body, decoded whole and in cuts that must agree.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    wsgate::fuzz::chunked(data);
});
