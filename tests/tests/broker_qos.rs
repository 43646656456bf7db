//! QoS 0, 1 and 2 in both directions: packet ids, PUBACK / PUBREC / PUBREL / PUBCOMP flows,
//! exactly-once for inbound QoS 2, ordering, the per-client in-flight window, and the QoS
//! downgrade to the granted QoS. Raw packets for the protocol details, rumqttc and
//! mosquitto_pub/mosquitto_sub for interop.

use std::collections::HashSet;
use std::time::Duration;

use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use waystation_e2e::raw::{self, MosquittoSub, Pkt, RawClient};
use waystation_e2e::Waystation;

const SHORT: Duration = Duration::from_millis(500);

// QoS 0 both directions: no acknowledgement, no packet identifier ([MQTT-2.3.1-5] "A
// PUBLISH Packet MUST NOT contain a Packet Identifier if its QoS value is set to 0"), DUP 0
// ([MQTT-3.3.1-2]).
#[test]
fn qos0_publish_is_delivered_at_qos0_without_ack() {
    let ws = Waystation::start();
    let mut sub = RawClient::connect(ws.addr, "q0-sub");
    sub.subscribe_ok(1, &[("q0/t", 0)]);
    let mut publisher = RawClient::connect(ws.addr, "q0-pub");
    publisher.publish0("q0/t", b"zero", false);
    let p = sub.recv_publish();
    assert_eq!(
        p,
        raw::Publish {
            dup: false,
            qos: 0,
            retain: false,
            topic: "q0/t".into(),
            pid: None,
            payload: b"zero".to_vec()
        }
    );
    // The publisher gets no acknowledgement for QoS 0.
    publisher.expect_silence(SHORT);
    publisher.ping();
}

// QoS 1: [MQTT-4.3.2-2] the receiver of a QoS 1 PUBLISH MUST respond with a PUBACK
// containing its packet id; the server sending QoS 1 uses a non-zero, unused packet id
// ([MQTT-2.3.1-1], [MQTT-4.3.2-1]) and DUP 0 on first delivery ([MQTT-3.3.1-2]).
#[test]
fn qos1_puback_inbound_and_acked_delivery_outbound() {
    let ws = Waystation::start();
    let mut sub = RawClient::connect(ws.addr, "q1-sub");
    sub.subscribe_ok(1, &[("q1/t", 1)]);
    let mut publisher = RawClient::connect(ws.addr, "q1-pub");
    publisher.publish1("q1/t", b"one", false, 0x1234);
    let p = sub.recv_publish();
    assert_eq!((p.qos, p.dup, p.retain), (1, false, false));
    assert_eq!(p.payload, b"one");
    let pid = p.pid.expect("QoS 1 PUBLISH has a packet id");
    assert_ne!(pid, 0, "packet id 0 is not allowed [MQTT-2.3.1-1]");
    sub.send(&raw::puback(pid));
    // Acknowledged: no redelivery on the same connection.
    sub.expect_silence(SHORT);
    sub.ping();
}

// QoS 2 inbound: PUBLISH -> PUBREC, PUBREL -> PUBCOMP, same packet id ([MQTT-4.3.3-2]);
// outbound: PUBLISH(QoS 2, id) -> client PUBREC -> server PUBREL (flags 0010,
// [MQTT-3.6.1-1]) -> client PUBCOMP ([MQTT-4.3.3-1]). Delivered exactly once.
#[test]
fn qos2_full_flow_in_both_directions() {
    let ws = Waystation::start();
    let mut sub = RawClient::connect(ws.addr, "q2-sub");
    sub.subscribe_ok(1, &[("q2/t", 2)]);
    let mut publisher = RawClient::connect(ws.addr, "q2-pub");
    publisher.publish2("q2/t", b"two", false, 77);
    let p = sub.recv_publish();
    assert_eq!(
        (p.qos, p.dup, p.payload.as_slice()),
        (2, false, &b"two"[..])
    );
    let pid = p.pid.unwrap();
    assert_ne!(pid, 0, "[MQTT-2.3.1-1]");
    sub.send(&raw::pubrec(pid));
    assert_eq!(
        sub.recv(),
        Pkt::PubRel(pid),
        "server must answer PUBREC with PUBREL [MQTT-4.3.3-1]"
    );
    sub.send(&raw::pubcomp(pid));
    sub.expect_silence(SHORT);
    sub.ping();
}

// [MQTT-4.3.3-2] "Until it has received the corresponding PUBREL packet, the Receiver MUST
// acknowledge any subsequent PUBLISH packet with the same Packet Identifier by sending a
// PUBREC. It MUST NOT cause duplicate messages to be delivered to any onward recipients in
// this case." After PUBCOMP the packet id is free again ([MQTT-2.3.1-3]): a new PUBLISH
// with it is a new message.
#[test]
fn qos2_inbound_duplicate_before_pubrel_is_delivered_once() {
    let ws = Waystation::start();
    let mut sub = RawClient::connect(ws.addr, "eo-sub");
    sub.subscribe_ok(1, &[("eo/t", 0)]);
    let mut publisher = RawClient::connect(ws.addr, "eo-pub");
    publisher.send(&raw::publish("eo/t", b"once", 2, false, false, Some(7)));
    assert_eq!(publisher.recv(), Pkt::PubRec(7));
    publisher.send(&raw::publish("eo/t", b"once", 2, false, true, Some(7)));
    assert_eq!(
        publisher.recv(),
        Pkt::PubRec(7),
        "a duplicate before PUBREL is answered with PUBREC"
    );
    publisher.send(&raw::publish("eo/t", b"once", 2, false, true, Some(7)));
    assert_eq!(publisher.recv(), Pkt::PubRec(7));
    publisher.send(&raw::pubrel(7));
    assert_eq!(publisher.recv(), Pkt::PubComp(7));
    assert_eq!(sub.recv_publish().payload, b"once");
    sub.expect_silence(Duration::from_millis(700));

    // The id is released: the same id now carries a new message.
    publisher.publish2("eo/t", b"again", false, 7);
    assert_eq!(sub.recv_publish().payload, b"again");
    sub.expect_silence(SHORT);
}

// [MQTT-4.3.3-2] the receiver "MUST respond to a PUBREL packet by sending a PUBCOMP packet
// containing the same Packet Identifier as the PUBREL" — also for an id it has already
// released (the sender may resend PUBREL after a reconnect).
#[test]
fn pubrel_for_unknown_packet_id_gets_pubcomp() {
    let ws = Waystation::start();
    let mut c = RawClient::connect(ws.addr, "stray-pubrel");
    c.send(&raw::pubrel(4242));
    assert_eq!(c.recv(), Pkt::PubComp(4242));
    c.ping();
}

// [MQTT-4.6.0-2] PUBACKs are sent in the order the QoS 1 PUBLISHes were received;
// [MQTT-4.6.0-3] PUBRECs likewise for QoS 2; [MQTT-4.6.0-4] PUBRELs answered in order;
// [MQTT-4.6.0-6] a topic is an Ordered Topic by default: subscribers receive messages in
// the order the publisher sent them. Pipelined, without waiting for acks.
#[test]
fn acks_and_deliveries_keep_publish_order() {
    let ws = Waystation::start();
    let mut sub = RawClient::connect(ws.addr, "ord-sub");
    sub.subscribe_ok(1, &[("ord/t", 2)]);
    let mut publisher = RawClient::connect(ws.addr, "ord-pub");
    let n = 60u16;
    let mut burst = Vec::new();
    for i in 1..=n {
        burst.extend(raw::publish(
            "ord/t",
            format!("m{i}").as_bytes(),
            1,
            false,
            false,
            Some(i),
        ));
    }
    publisher.send(&burst);
    for i in 1..=n {
        assert_eq!(
            publisher.recv(),
            Pkt::PubAck(i),
            "PUBACKs out of order [MQTT-4.6.0-2]"
        );
    }
    let mut burst = Vec::new();
    for i in 1..=n {
        burst.extend(raw::publish(
            "ord/t",
            format!("q{i}").as_bytes(),
            2,
            false,
            false,
            Some(1000 + i),
        ));
    }
    publisher.send(&burst);
    for i in 1..=n {
        assert_eq!(
            publisher.recv(),
            Pkt::PubRec(1000 + i),
            "PUBRECs out of order [MQTT-4.6.0-3]"
        );
    }
    let mut rels = Vec::new();
    for i in 1..=n {
        rels.extend(raw::pubrel(1000 + i));
    }
    publisher.send(&rels);
    for i in 1..=n {
        assert_eq!(
            publisher.recv(),
            Pkt::PubComp(1000 + i),
            "PUBCOMPs out of order"
        );
    }
    // The subscriber sees m1..mn then q1..qn, in order.
    let want: Vec<String> = (1..=n)
        .map(|i| format!("m{i}"))
        .chain((1..=n).map(|i| format!("q{i}")))
        .collect();
    for w in want {
        let p = sub.recv_publish();
        assert_eq!(
            String::from_utf8_lossy(&p.payload),
            w,
            "delivery order [MQTT-4.6.0-6]"
        );
        sub.ack(&p);
    }
}

// [MQTT-3.8.4-6] / [MQTT-3.3.5-1]: a message is delivered at the minimum of the QoS it was
// published with and the QoS granted to the subscription.
#[test]
fn delivered_qos_is_min_of_publish_and_granted_qos() {
    let ws = Waystation::start();
    let mut subs: Vec<RawClient> = (0..3u8)
        .map(|g| {
            let mut s = RawClient::connect(ws.addr, &format!("min-sub{g}"));
            s.subscribe_ok(1, &[("min/t", g)]);
            s
        })
        .collect();
    let mut publisher = RawClient::connect(ws.addr, "min-pub");
    for q in 0..3u8 {
        publisher.publish_qos(
            "min/t",
            format!("pub-q{q}").as_bytes(),
            q,
            false,
            10 + q as u16,
        );
        for (g, s) in subs.iter_mut().enumerate() {
            let p = s.recv_publish();
            assert_eq!(p.payload, format!("pub-q{q}").as_bytes());
            assert_eq!(p.qos, q.min(g as u8), "published at {q}, granted {g}");
            assert_eq!(
                p.pid.is_some(),
                p.qos > 0,
                "packet id present iff QoS > 0 [MQTT-2.3.1-5]"
            );
            s.ack(&p);
        }
    }
}

// Issue: in-flight window (`[limits] max_inflight`): a client that does not acknowledge is
// sent at most max_inflight unacknowledged QoS 1/2 messages; more wait in its queue and
// each ack releases one more, in order. In-flight ids are distinct and non-zero
// ([MQTT-2.3.1-2]: an id in use is not reused).
#[test]
fn inflight_window_bounds_unacked_deliveries() {
    let ws = Waystation::start_with("[limits]\nmax_inflight = 3\n");
    let mut sub = RawClient::connect(ws.addr, "win-sub");
    sub.subscribe_ok(1, &[("win/t", 1)]);
    let mut publisher = RawClient::connect(ws.addr, "win-pub");
    for i in 0..10u16 {
        publisher.publish1("win/t", format!("{i}").as_bytes(), false, i + 1);
    }
    let mut inflight = Vec::new();
    for _ in 0..3 {
        inflight.push(sub.recv_publish());
    }
    sub.expect_silence(Duration::from_millis(800));
    let ids: HashSet<u16> = inflight.iter().map(|p| p.pid.unwrap()).collect();
    assert_eq!(
        ids.len(),
        3,
        "in-flight packet ids must be distinct [MQTT-2.3.1-2]"
    );
    assert!(!ids.contains(&0));

    // One ack releases exactly one more.
    sub.send(&raw::puback(inflight[0].pid.unwrap()));
    inflight.push(sub.recv_publish());
    sub.expect_silence(Duration::from_millis(500));

    // Ack the rest as they come: all 10 arrive, in order, none twice.
    let mut got: Vec<String> = Vec::new();
    let mut next_ack = 1;
    while got.len() < 10 {
        if got.len() < inflight.len() {
            got.push(String::from_utf8_lossy(&inflight[got.len()].payload).into_owned());
            continue;
        }
        while next_ack < inflight.len() {
            sub.send(&raw::puback(inflight[next_ack].pid.unwrap()));
            next_ack += 1;
        }
        inflight.push(sub.recv_publish());
    }
    while next_ack < inflight.len() {
        sub.send(&raw::puback(inflight[next_ack].pid.unwrap()));
        next_ack += 1;
    }
    let want: Vec<String> = (0..10).map(|i| i.to_string()).collect();
    assert_eq!(got, want);
    sub.expect_silence(SHORT);
}

// The in-flight window also counts QoS 2 messages until their PUBCOMP ([MQTT-4.3.3-1]: the
// id is in use until PUBCOMP).
#[test]
fn inflight_window_counts_qos2_until_pubcomp() {
    let ws = Waystation::start_with("[limits]\nmax_inflight = 2\n");
    let mut sub = RawClient::connect(ws.addr, "win2-sub");
    sub.subscribe_ok(1, &[("win2/t", 2)]);
    let mut publisher = RawClient::connect(ws.addr, "win2-pub");
    for i in 0..4u16 {
        publisher.publish2("win2/t", format!("{i}").as_bytes(), false, i + 1);
    }
    let a = sub.recv_publish();
    let b = sub.recv_publish();
    sub.expect_silence(SHORT);
    // PUBREC alone does not free the slot.
    sub.send(&raw::pubrec(a.pid.unwrap()));
    assert_eq!(sub.recv(), Pkt::PubRel(a.pid.unwrap()));
    sub.expect_silence(SHORT);
    // PUBCOMP does.
    sub.send(&raw::pubcomp(a.pid.unwrap()));
    let c = sub.recv_publish();
    assert_eq!(c.payload, b"2");
    sub.ack(&b);
    let d = sub.recv_publish();
    assert_eq!(d.payload, b"3");
    sub.ack(&c);
    sub.ack(&d);
    sub.expect_silence(SHORT);
}

fn rumqttc_client(
    id: &str,
    port: u16,
) -> (AsyncClient, tokio::sync::mpsc::UnboundedReceiver<Event>) {
    let mut opts = MqttOptions::new(id, "127.0.0.1", port);
    opts.set_keep_alive(Duration::from_secs(10));
    let (client, mut eventloop) = AsyncClient::new(opts, 100);
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok(ev) = eventloop.poll().await {
            if tx.send(ev).is_err() {
                break;
            }
        }
    });
    (client, rx)
}

async fn next_incoming(rx: &mut tokio::sync::mpsc::UnboundedReceiver<Event>, what: &str) -> Packet {
    loop {
        match tokio::time::timeout(Duration::from_secs(5), rx.recv()).await {
            Ok(Some(Event::Incoming(p))) => return p,
            Ok(Some(Event::Outgoing(_))) => {}
            Ok(None) => panic!("{what}: eventloop ended"),
            Err(_) => panic!("{what}: nothing within 5 s"),
        }
    }
}

// QoS 2 interop with real clients: mosquitto_pub -q 2 -> broker -> rumqttc subscriber at
// QoS 2, and rumqttc QoS 2 publisher -> broker -> mosquitto_sub -q 2. Each message arrives
// exactly once at QoS 2 ([MQTT-4.3.3-2], [MQTT-3.8.4-6]).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qos2_interop_with_mosquitto_and_rumqttc() {
    let ws = Waystation::start();
    let port = ws.port();

    let (sub, mut sub_rx) = rumqttc_client("rq-sub", port);
    sub.subscribe("interop/#", QoS::ExactlyOnce).await.unwrap();
    loop {
        if let Packet::SubAck(a) = next_incoming(&mut sub_rx, "suback").await {
            assert_eq!(
                a.return_codes,
                vec![rumqttc::mqttbytes::v4::SubscribeReasonCode::Success(
                    QoS::ExactlyOnce
                )]
            );
            break;
        }
    }
    tokio::task::spawn_blocking(move || {
        for i in 0..3 {
            raw::mosquitto_pub(
                port,
                &[
                    "-q",
                    "2",
                    "-t",
                    "interop/from-mosquitto",
                    "-m",
                    &format!("mq{i}"),
                ],
            );
        }
    })
    .await
    .unwrap();
    for i in 0..3 {
        loop {
            if let Packet::Publish(p) =
                next_incoming(&mut sub_rx, "publish from mosquitto_pub").await
            {
                assert_eq!(p.qos, QoS::ExactlyOnce);
                assert_eq!(&p.payload[..], format!("mq{i}").as_bytes());
                break;
            }
        }
    }

    let msub = tokio::task::spawn_blocking(move || {
        MosquittoSub::start(
            port,
            &["-q", "2", "-t", "interop2/t", "-C", "3", "-W", "15"],
        )
    })
    .await
    .unwrap();
    let (publisher, mut pub_rx) = rumqttc_client("rq-pub", port);
    for i in 0..3 {
        publisher
            .publish("interop2/t", QoS::ExactlyOnce, false, format!("rq{i}"))
            .await
            .unwrap();
    }
    let mut comps = 0;
    while comps < 3 {
        if let Packet::PubComp(_) = next_incoming(&mut pub_rx, "pubcomp").await {
            comps += 1;
        }
    }
    let (lines, debug) =
        tokio::task::spawn_blocking(move || msub.collect(3, Duration::from_secs(10)))
            .await
            .unwrap();
    assert_eq!(debug.len(), 3, "mosquitto_sub saw {debug:?}");
    for d in &debug {
        assert!(d.contains("q2"), "delivered at QoS 2: {d}");
    }
    assert_eq!(
        lines,
        vec!["interop2/t rq0", "interop2/t rq1", "interop2/t rq2"]
    );
    // The rumqttc subscriber (interop/#) must not have received anything more.
    tokio::time::sleep(Duration::from_millis(300)).await;
    while let Ok(ev) = sub_rx.try_recv() {
        if let Event::Incoming(Packet::Publish(p)) = ev {
            panic!("unexpected extra delivery {p:?}");
        }
    }
}
