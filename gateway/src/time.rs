//! Wall-clock time as the gateway reports it: Unix milliseconds, the broker's own clock
//! (defined once, in `waystation_broker::time`).
//!
//! A leaf module on purpose: the status JSON, `$SYS`, `/metrics` and the dashboard's history
//! all stamp times, and taking the clock from here (not from one of them) keeps their imports
//! pointing one way.

pub use waystation_broker::time::unix_ms;
