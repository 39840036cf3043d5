//! Embedded log reading a log file it did not write; the check and its properties: `sequencer::fuzzing::embedded_log`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| sequencer::fuzzing::embedded_log(data));
