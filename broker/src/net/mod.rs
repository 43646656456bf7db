//! The network side: `server` (listeners, accept, `max_connections`, ordered shutdown) and
//! `connection` (one client: handshake, reader, writer). The rustls configs they use are in
//! the crate's `tls`, below `config`, because loading the config already checks bridges'
//! certificate files.

pub(crate) mod connection;
pub mod handles;
pub mod server;

#[cfg(test)]
mod footprint_tests;
