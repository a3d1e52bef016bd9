//! Arbitrary bytes as what an HTTP/2 client sends, followed frame by frame whole and in two
//! cuts that must agree.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    wsgate::fuzz::h2_watch(data);
});
