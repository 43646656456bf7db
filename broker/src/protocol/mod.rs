//! MQTT as the rest of the broker sees it, in neutral types: `message` (a message, what a
//! client is sent, QoS; no policy) and `inbound` (what a client sends). `v4` adapts MQTT
//! 3.1.1 packets (rumqttc's codec) and `v5` MQTT 5.0 packets (rmqtt-codec) to and from them;
//! a connection picks one from its CONNECT's protocol level ([`Decoder`]) and never learns
//! more about the codec than that. `frame` is the fixed header both share.

pub(crate) mod codec;
pub(crate) mod frame;
pub(crate) mod inbound;
pub mod message;
pub(crate) mod topic_alias;
pub(crate) mod v4;
pub(crate) mod v5;

pub(crate) use codec::{Decoder, Encoder};
pub use inbound::Version;
