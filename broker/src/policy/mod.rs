//! Who may do what: `auth` (password files, Mosquitto's format), `acl` (per-topic read and
//! write rules) and `ratelimit` (connection and publish rates). `docs/security.md` has the
//! threat model.

pub mod acl;
pub mod auth;
pub(crate) mod ratelimit;
