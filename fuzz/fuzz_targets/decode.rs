//! Arbitrary bytes through the MQTT 3.1.1 decoder, packet after packet, as a connection
//! reads them; decoded PUBLISHes must survive an encode/decode round trip.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    waystation_broker::fuzzing::decode(data);
});
