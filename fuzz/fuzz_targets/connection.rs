//! Arbitrary bytes written by a client to a real connection task and router (in memory,
//! no socket), with the ACL on for inputs of odd length.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    waystation_broker::fuzzing::run_connection(data, data.len() % 2 == 1);
});
