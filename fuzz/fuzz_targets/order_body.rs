//! Order body parsing; the check and its properties: `ingest::fuzzing::order_body`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| ingest::fuzzing::order_body(data));
