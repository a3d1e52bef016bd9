//! Arbitrary bytes, cut into arbitrary reads, through the relay's frame processing.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    wsgate::fuzz::frames(data);
});
