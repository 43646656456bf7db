//! Issue 3, "Tests, against a real upstream" - what survives a restart of the daemon
//! (SIGTERM and SIGKILL, same data directory): a persistent session with its QoS 1
//! subscription and queued messages, a retained message, and each bridge's cursor
//! (messages forwarded before the restart are not sent again after it, beyond the
//! in-flight window). And cloud-to-device commands published on the upstream reach a local
//! subscriber through `[[bridge.subscribe]]`.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use waystation_e2e::raw::{Connect, Pkt, RawClient};
use waystation_e2e::upstream::{
    analyze, bridge_toml, missing, Collector, Publisher, PublisherSpec, Upstream,
};
use waystation_e2e::Waystation;

#[derive(Clone, Copy, Debug)]
enum Stop {
    Term,
    Kill,
}

fn stop_and_restart(ws: &mut Waystation, how: Stop) {
    match how {
        Stop::Term => {
            let status = ws.terminate();
            assert!(
                status.is_some_and(|s| s.success()),
                "SIGTERM exit: {status:?}\n{}",
                ws.logs()
            );
        }
        Stop::Kill => ws.kill(),
    }
    ws.restart();
}

fn persistent_session_survives(how: Stop) {
    let mut ws = Waystation::start();
    let id = format!("restart-ps-{how:?}");
    let (mut c, sp) = RawClient::connect_ok(ws.addr, &Connect::new(&id).clean(false));
    assert!(!sp);
    c.subscribe_ok(1, &[("dev/+/cmd", 1)]);
    c.disconnect();

    let mut publisher = RawClient::connect(ws.addr, "restart-ps-pub");
    for i in 0..5u16 {
        publisher.publish1(
            &format!("dev/{i}/cmd"),
            format!("queued-{i}").as_bytes(),
            false,
            i + 1,
        );
    }
    drop(publisher);
    stop_and_restart(&mut ws, how);

    let (mut c, sp) = RawClient::connect_ok(ws.addr, &Connect::new(&id).clean(false));
    assert!(
        sp,
        "{how:?}: the persistent session must be present after the restart"
    );
    for i in 0..5u16 {
        let p = c.recv_publish();
        assert_eq!(
            p.topic,
            format!("dev/{i}/cmd"),
            "{how:?}: queued messages in order"
        );
        assert_eq!(p.payload, format!("queued-{i}").into_bytes());
        assert_eq!(p.qos, 1);
        c.ack(&p);
    }
    c.expect_silence(Duration::from_millis(500));
    // The subscription itself survived: a new message is delivered without SUBSCRIBE.
    let mut publisher = RawClient::connect(ws.addr, "restart-ps-pub2");
    publisher.publish1("dev/9/cmd", b"after-restart", false, 1);
    let p = c.recv_publish();
    assert_eq!(p.payload, b"after-restart");
    c.ack(&p);
}

#[test]
fn persistent_session_and_queued_qos1_messages_survive_sigterm() {
    persistent_session_survives(Stop::Term);
}

#[test]
fn persistent_session_and_queued_qos1_messages_survive_sigkill() {
    persistent_session_survives(Stop::Kill);
}

#[test]
fn retained_message_survives_sigkill_and_sigterm() {
    let mut ws = Waystation::start();
    let mut publisher = RawClient::connect(ws.addr, "restart-retain-pub");
    publisher.publish1("cfg/interval", b"30s", true, 1);
    publisher.publish1("cfg/gone", b"x", true, 2);
    publisher.publish1("cfg/gone", b"", true, 3); // cleared: must stay cleared
    drop(publisher);
    for how in [Stop::Kill, Stop::Term] {
        stop_and_restart(&mut ws, how);
        let mut c = RawClient::connect(ws.addr, "restart-retain-sub");
        c.subscribe_ok(1, &[("cfg/#", 1)]);
        let p = c.recv_publish();
        assert_eq!(
            (p.topic.as_str(), p.payload.as_slice(), p.retain),
            ("cfg/interval", &b"30s"[..], true),
            "{how:?}"
        );
        c.ack(&p);
        c.expect_silence(Duration::from_millis(500));
        c.disconnect();
    }
}

#[test]
fn bridge_cursor_survives_restart_duplicates_bounded_by_the_window() {
    const MAX_INFLIGHT: usize = 100;
    const BOUND: usize = MAX_INFLIGHT + 64;
    let upstream = Upstream::start();
    let collector = Collector::start(upstream.port, "restart-cursor-collector", "site1/#");
    let mut ws = Waystation::start_with(&bridge_toml(
        &upstream.address(),
        &format!("max_inflight = {MAX_INFLIGHT}"),
    ));
    assert!(
        ws.wait_for_log("upstream connected", Duration::from_secs(10)),
        "{}",
        ws.logs()
    );

    let mut want = HashSet::new();
    let mut report = Vec::new();
    for (round, how) in [Stop::Kill, Stop::Term].into_iter().enumerate() {
        let publishers: Vec<Publisher> = (0..4)
            .map(|p| Publisher::start(ws.addr, PublisherSpec::new(p + 10 * round as u32, 500)))
            .collect();
        for p in publishers {
            let id = p.spec.publisher;
            want.extend(
                p.join(Duration::from_secs(60))
                    .acked
                    .iter()
                    .map(|s| (id, *s)),
            );
        }
        assert!(
            collector.wait_for_all(&want, Duration::from_secs(30)),
            "all forwarded before the restart"
        );
        std::thread::sleep(Duration::from_millis(300));
        let before = collector.count();
        stop_and_restart(&mut ws, how);
        // The restarted bridge connects and sends whatever its cursor says is left.
        let reconnected = Instant::now();
        collector.wait_quiet(Duration::from_millis(1_500), Duration::from_secs(10));
        let resent = collector.count() - before;
        report.push(format!(
            "{how:?}: {resent} re-sent ({:?})",
            reconnected.elapsed()
        ));
        assert!(resent <= BOUND, "{how:?}: {resent} messages forwarded before the restart were sent again (bound {BOUND})");
    }
    // And the bridge still forwards new messages after the restarts.
    let st = Publisher::start(ws.addr, PublisherSpec::new(99, 10)).join(Duration::from_secs(20));
    want.extend(st.acked.iter().map(|s| (99, *s)));
    let arrived = collector.wait_for_all(&want, Duration::from_secs(20));
    let a = analyze(&collector.received(), "site1/");
    println!(
        "bridge cursor: {} forwarded, {} duplicates; {report:?}",
        a.unique.len(),
        a.duplicates
    );
    assert!(arrived, "{:?}", missing(&want, &a.unique));
}

#[test]
fn commands_from_the_upstream_reach_a_local_subscriber_also_after_a_restart() {
    let upstream = Upstream::start();
    let extra = format!(
        "{}\n[[bridge.subscribe]]\nremote = \"site1/cmd/#\"\nlocal_prefix = \"\"\nqos = 1\n\n\
         [[bridge.forward]]\nlocal = \"site1/cmd/#\"\nremote_prefix = \"echo/\"\nqos = 1\n",
        bridge_toml(&upstream.address(), "")
    );
    let mut ws = Waystation::start_with(&extra);
    let mut options = rumqttc::MqttOptions::new("restart-cloud-app", "127.0.0.1", upstream.port);
    options.set_keep_alive(Duration::from_secs(30));
    let (cloud, mut connection) = rumqttc::Client::new(options, 100);
    std::thread::spawn(move || {
        for event in connection.iter() {
            if event.is_err() {
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    });
    // A forward rule matches the command topic too: the bridge must not send its own
    // commands back up (they would arrive as echo/site1/cmd/...).
    let echo = Collector::start(upstream.port, "restart-cmd-echo", "echo/#");

    for round in 0..2 {
        if round == 1 {
            stop_and_restart(&mut ws, Stop::Kill);
        }
        let mut local = RawClient::connect(ws.addr, "restart-cmd-sub");
        local.subscribe_ok(1, &[("site1/cmd/#", 1)]);
        assert!(
            ws.wait_for_log("upstream connected", Duration::from_secs(10)),
            "bridge never connected:\n{}",
            ws.logs()
        );
        // The bridge subscribes upstream right after its CONNACK: publish until one arrives.
        let deadline = Instant::now() + Duration::from_secs(15);
        let mut got = None;
        let mut n = 0;
        while Instant::now() < deadline && got.is_none() {
            n += 1;
            cloud
                .publish(
                    "site1/cmd/valve",
                    rumqttc::QoS::AtLeastOnce,
                    false,
                    format!("r{round}-open-{n}"),
                )
                .expect("queue a publish on the upstream");
            if let Ok(Pkt::Publish(p)) = local.recv_timeout(Duration::from_millis(300)) {
                got = Some(p);
            }
        }
        let p = got.unwrap_or_else(|| {
            panic!(
                "round {round}: no command reached the local subscriber\n{}",
                ws.logs()
            )
        });
        assert_eq!(p.topic, "site1/cmd/valve");
        assert!(String::from_utf8_lossy(&p.payload).starts_with(&format!("r{round}-open-")));
        local.ack(&p);
        local.disconnect();
    }
    // Control: a local publish on that topic does go up through the forward rule.
    let mut local = RawClient::connect(ws.addr, "restart-cmd-local-pub");
    local.publish1("site1/cmd/local", b"from-a-device", false, 1);
    assert!(
        waystation_e2e::wait_until(Duration::from_secs(10), || echo.count() > 0),
        "the echo/ forward rule never forwarded the local control message"
    );
    std::thread::sleep(Duration::from_millis(300));
    let echoed: Vec<String> = echo.received().into_iter().map(|r| r.topic).collect();
    assert_eq!(
        echoed,
        vec!["echo/site1/cmd/local".to_string()],
        "commands from the upstream must not go back up"
    );
    let _ = cloud.try_disconnect();
}
