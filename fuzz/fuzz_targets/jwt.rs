//! Buyer JWT and operator token check; the check and its properties: `ingest::fuzzing::jwt`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| ingest::fuzzing::jwt(data));
