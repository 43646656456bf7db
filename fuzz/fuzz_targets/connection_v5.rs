//! An MQTT 5 session on a real connection task and router (in memory, no socket): the
//! first byte picks one of the valid MQTT 5 CONNECTs of `fuzzing::v5_connect` (bits 1-2)
//! and the ACL (bit 0); the rest is what the client sends after it.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    waystation_broker::fuzzing::run_connection_v5(data);
});
