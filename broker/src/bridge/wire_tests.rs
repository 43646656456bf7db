//! Encoding and decoding for both upstream protocols, against rmqtt-codec as the peer.
use super::*;
