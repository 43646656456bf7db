//! Arbitrary bytes through the MQTT 5 decoder, packet after packet, as one connection reads
//! them (topic aliases carried from packet to packet); decoded PUBLISHes must survive an
//! encode/decode round trip with their properties.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    waystation_broker::fuzzing::decode_v5(data);
});
