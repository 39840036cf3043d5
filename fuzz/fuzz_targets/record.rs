//! Order record codec; the check and its properties: `sequencer::fuzzing::record`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| sequencer::fuzzing::record(data));
