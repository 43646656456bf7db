//! Waystation's edge broker (stub while the core lands).
use std::net::SocketAddr;
use std::time::Duration;

#[derive(Debug, Clone)]
pub struct Limits {
    pub max_packet_size: usize,
    pub max_connections: usize,
    pub max_inflight: u16,
    pub max_queued_messages: usize,
    pub connect_timeout: Duration,
}
impl Default for Limits {
    fn default() -> Self {
        Limits { max_packet_size: 65536, max_connections: 10_000, max_inflight: 100, max_queued_messages: 1000, connect_timeout: Duration::from_secs(10) }
    }
}
pub struct BrokerConfig { pub listeners: Vec<SocketAddr>, pub limits: Limits }
pub struct Broker { addrs: Vec<SocketAddr> }
impl Broker {
    pub async fn start(c: BrokerConfig) -> std::io::Result<Broker> { Ok(Broker { addrs: c.listeners }) }
    pub fn local_addrs(&self) -> &[SocketAddr] { &self.addrs }
    pub async fn shutdown(self) {}
}
