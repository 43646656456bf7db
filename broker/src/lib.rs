//! Waystation broker.
pub mod store;
