//! MQTT as the rest of the broker sees it, in neutral types: `message` (a message, what a
//! client is sent, QoS; no policy) and `inbound` (what a client sends). `v4` adapts MQTT
//! 3.1.1 packets (rumqttc's codec) to and from them; an MQTT 5 adapter will sit beside it as
//! `v5`, decoding into the same `inbound` types, so the connection never learns which codec
//! a client speaks.

pub(crate) mod inbound;
pub mod message;
pub(crate) mod v4;
