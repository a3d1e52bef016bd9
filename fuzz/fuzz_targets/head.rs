//! Arbitrary bytes as a client's request head, through the head parser and the decision path.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    wsgate::fuzz::head(data);
});
