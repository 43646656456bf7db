//! MQTT as the rest of the broker sees it: `message` holds the neutral types (a message,
//! what a client is sent, QoS), with no policy; `v4` adapts MQTT 3.1.1 packets (rumqttc's
//! codec) to and from them. An MQTT 5 adapter will sit beside it as `v5`.

pub mod message;
pub(crate) mod v4;
