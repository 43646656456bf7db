//! Waystation sensor firmware: read a sensor, detect threshold crossings, publish them as
//! versioned JSON events over MQTT 3.1.1 with QoS 1.
//!
//! `#![no_std]`, no allocator, no executor. Errors are values; nothing on a firmware path
//! unwraps or formats with `{:?}`. The `std` feature adds [`sim`], simulated sensors over TCP.
#![cfg_attr(not(any(test, feature = "std")), no_std)]
#![cfg_attr(
    not(test),
    deny(clippy::unwrap_used, clippy::expect_used, clippy::panic)
)]

pub mod client;
pub mod config;
pub mod detector;
pub mod device;
pub mod event;
pub mod mqtt;
pub mod sensor;
#[cfg(feature = "std")]
pub mod sim;

pub use client::{Client, ClientConfig, Transport};
pub use detector::{Detector, Direction, Thresholds};
pub use device::{Device, DeviceConfig};
pub use sensor::{Sensor, Tmp102, Waveform};
