//! Waystation broker.
