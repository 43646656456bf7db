//! The demo's "cloud": rumqttd (a second MQTT implementation) in-process, a subscriber on
//! it that records every forwarded event (the self-check's ground truth), and a relay in
//! front of it that the demo cuts to stage an outage.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::watch;
use waystation_cloud::{Cloud, CloudOptions};

use super::edge::REMOTE_PREFIX;

/// What the cloud subscriber saw.
#[derive(Default)]
pub struct CloudLog {
    /// (device, boot, seq) of every event, once.
    pub unique: HashSet<(String, u64, u64)>,
    pub total: u64,
    pub unparsable: u64,
}

/// rumqttd on a free loopback port, in its own threads (they live until the process exits).
pub async fn start_cloud() -> anyhow::Result<SocketAddr> {
    // Its start-up wait blocks; keep it off the runtime's workers.
    let cloud = tokio::task::spawn_blocking(|| Cloud::start(CloudOptions::default())).await??;
    Ok(cloud.addr())
}

/// Subscribes to the forwarded events on the cloud (directly, not through the relay) and
/// records each; returns once the subscription is acknowledged.
pub async fn start_cloud_subscriber(
    cloud: SocketAddr,
    log: Arc<Mutex<CloudLog>>,
) -> anyhow::Result<()> {
    use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
    let mut options = MqttOptions::new(
        "demo-cloud-subscriber",
        cloud.ip().to_string(),
        cloud.port(),
    );
    options.set_keep_alive(Duration::from_secs(30));
    options.set_max_packet_size(256 * 1024, 256 * 1024);
    let (client, mut eventloop) = AsyncClient::new(options, 100);
    client
        .subscribe(format!("{REMOTE_PREFIX}sensors/+/events"), QoS::AtLeastOnce)
        .await?;
    let (subscribed_tx, subscribed_rx) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        let _client = client; // keeps the request channel open
        let mut subscribed = Some(subscribed_tx);
        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::SubAck(_))) => {
                    if let Some(tx) = subscribed.take() {
                        let _ = tx.send(());
                    }
                }
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    let key = serde_json::from_slice::<serde_json::Value>(&p.payload)
                        .ok()
                        .and_then(|v| {
                            Some((
                                v["device"].as_str()?.to_string(),
                                v["boot"].as_u64()?,
                                v["seq"].as_u64()?,
                            ))
                        });
                    let mut log = log.lock().unwrap_or_else(|p| p.into_inner());
                    log.total += 1;
                    match key {
                        Some(k) => {
                            log.unique.insert(k);
                        }
                        None => log.unparsable += 1,
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(error = %e, "cloud subscriber: connection error; reconnecting");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        }
    });
    tokio::time::timeout(Duration::from_secs(10), subscribed_rx)
        .await
        .map_err(|_| anyhow::anyhow!("the cloud subscriber was not subscribed within 10 s"))??;
    Ok(())
}

/// A TCP relay to `target`. While the returned flag is true, every relayed connection is
/// closed and new ones are accepted and closed at once: the cloud is unreachable.
/// The flag is a `watch<bool>`, not a `Shutdown`: the cloud comes back, and a `Shutdown`
/// cannot be un-signalled.
pub async fn start_relay(
    target: SocketAddr,
) -> anyhow::Result<(SocketAddr, Arc<watch::Sender<bool>>)> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let (down_tx, down_rx) = watch::channel(false);
    tokio::spawn(async move {
        loop {
            let Ok((mut inbound, _)) = listener.accept().await else {
                continue;
            };
            if *down_rx.borrow() {
                drop(inbound);
                continue;
            }
            let mut down = down_rx.clone();
            tokio::spawn(async move {
                let Ok(mut outbound) = tokio::net::TcpStream::connect(target).await else {
                    return;
                };
                let _ = inbound.set_nodelay(true);
                let _ = outbound.set_nodelay(true);
                tokio::select! {
                    _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                    _ = down.wait_for(|d| *d) => {}
                }
            });
        }
    });
    Ok((addr, Arc::new(down_tx)))
}
