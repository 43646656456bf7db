//! The demo's edge: the broker with its durable store and a bridge to the cloud, the
//! observability server and `$SYS`, as the daemon would run them from a config file.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use waystation_broker::bridge::{BridgeConfig, ForwardRule, ReconnectConfig};
use waystation_broker::status::BrokerStatus;
use waystation_broker::{Broker, BrokerConfig, Limits, Shutdown, StatusHandle, StorageLimits};

/// Local topics forwarded to the cloud, and the prefix they get there.
pub const FORWARD: &str = "sensors/+/events";
pub const REMOTE_PREFIX: &str = "demo-site/";

pub struct Edge {
    pub broker: Broker,
    /// The broker's MQTT listener (the sensors connect here).
    pub addr: SocketAddr,
    pub handle: StatusHandle,
    /// Where the dashboard and /metrics are served.
    pub http_addr: SocketAddr,
    http: tokio::task::JoinHandle<()>,
    sys: tokio::task::JoinHandle<()>,
    obs_stop: Shutdown,
}

impl Edge {
    /// Starts the broker (bridge to `uplink`, store in `data_dir`), the HTTP server on
    /// `http` (or a free port when that one is taken: a second demo must still run) and
    /// `$SYS` every 5 s.
    pub async fn start(
        uplink: SocketAddr,
        data_dir: &Path,
        http: SocketAddr,
    ) -> anyhow::Result<Edge> {
        let broker = Broker::start(broker_config(uplink, data_dir)).await?;
        let addr = broker.local_addrs()[0];
        let handle = broker.status_handle();
        let obs_stop = Shutdown::new();
        let (http_addr, http) = match crate::http::serve(
            http,
            handle.clone(),
            "demo".into(),
            broker.dead_letters(),
            obs_stop.clone(),
        )
        .await
        {
            Ok(h) => h,
            Err(_) => {
                crate::http::serve(
                    SocketAddr::from(([127, 0, 0, 1], 0)),
                    handle.clone(),
                    "demo".into(),
                    broker.dead_letters(),
                    obs_stop.clone(),
                )
                .await?
            }
        };
        let sys = tokio::spawn(crate::sys::run(
            broker.publisher(),
            handle.clone(),
            Duration::from_secs(5),
            obs_stop.clone(),
        ));
        Ok(Edge {
            broker,
            addr,
            handle,
            http_addr,
            http,
            sys,
            obs_stop,
        })
    }

    /// Stops `$SYS` and the HTTP server, then the broker; returns the broker's last status
    /// (taken before it shuts down, while the bridge counters are still there).
    pub async fn stop(self) -> BrokerStatus {
        self.obs_stop.signal();
        let _ = self.sys.await;
        let _ = tokio::time::timeout(Duration::from_secs(2), self.http).await;
        let status = self.handle.status();
        self.broker.shutdown().await;
        status
    }
}

/// Short keep-alive, timeouts and reconnect delays: the outage and the simulated faults
/// should be noticed and recovered from within the demo's minute.
fn broker_config(uplink: SocketAddr, data_dir: &Path) -> BrokerConfig {
    BrokerConfig {
        gateway_id: "demo".into(),
        listeners: vec![SocketAddr::from(([127, 0, 0, 1], 0)).into()],
        limits: Limits::default(),
        data_dir: Some(data_dir.to_path_buf()),
        storage: StorageLimits::default(),
        pipeline: Vec::new(),
        dead_letter: Default::default(),
        bridges: vec![BridgeConfig {
            name: "cloud".into(),
            address: uplink.to_string(),
            client_id: None,
            username: None,
            password: None,
            password_file: None,
            password_env: None,
            tls: None,
            keep_alive: 5,
            clean_session: false,
            protocol: 4,
            session_expiry: None,
            connect_timeout: 5,
            max_inflight: 100,
            max_rate: None,
            ack_timeout: 5,
            reconnect: ReconnectConfig {
                initial_ms: 250,
                max_ms: 1000,
            },
            forward: vec![ForwardRule::new(FORWARD, REMOTE_PREFIX, 1)],
            subscribe: vec![],
        }],
        security: Default::default(),
    }
}
