//! SUBSCRIBE / SUBACK, UNSUBSCRIBE / UNSUBACK, topic filter matching (`+`, `#`, `$`
//! topics), invalid filters (SUBACK 0x80, connection kept), overlapping subscriptions, and
//! publishing to a topic name with wildcards (connection closed).

use std::time::Duration;

use waystation_e2e::raw::{self, MosquittoSub, RawClient};
use waystation_e2e::Waystation;

const SHORT: Duration = Duration::from_millis(500);

/// Subscribes `filter` on a fresh client, publishes each topic (QoS 0) from another, and
/// returns the topics delivered (a QoS 1 marker on a separate filter bounds the wait).
fn matches(ws: &Waystation, filter: &str, topics: &[&str]) -> Vec<String> {
    let mut sub = RawClient::connect(ws.addr, "match-sub");
    sub.subscribe_ok(1, &[(filter, 0), ("zz-marker", 1)]);
    let mut publisher = RawClient::connect(ws.addr, "match-pub");
    for t in topics {
        publisher.publish0(t, t.as_bytes(), false);
    }
    publisher.publish1("zz-marker", b"end", false, 1);
    let mut got = Vec::new();
    loop {
        let p = sub.recv_publish();
        if p.topic == "zz-marker" {
            sub.ack(&p);
            break;
        }
        got.push(p.topic);
    }
    got
}

// [MQTT-3.8.4-1] the server MUST respond with a SUBACK with the SUBSCRIBE's packet id
// ([MQTT-3.8.4-2]); [MQTT-3.9.3-1] one return code per filter, in order; [MQTT-3.8.4-5]
// each code is the granted maximum QoS (this broker supports QoS 2, so granted = requested).
#[test]
fn suback_grants_requested_qos_per_filter_in_order() {
    let ws = Waystation::start();
    let mut c = RawClient::connect(ws.addr, "suback");
    assert_eq!(
        c.subscribe(0x0102, &[("s/two", 2), ("s/zero", 0), ("s/one", 1)]),
        vec![2, 0, 1]
    );
    assert_eq!(c.subscribe(0xFFFF, &[("s/+/x", 1)]), vec![1]);
    c.ping();
}

// [MQTT-3.8.4-3] a SUBSCRIBE with a filter identical to an existing subscription replaces
// it (new QoS), and the message is delivered once; retained messages are re-sent.
#[test]
fn resubscribe_replaces_the_subscription_qos() {
    let ws = Waystation::start();
    let mut c = RawClient::connect(ws.addr, "resub");
    c.subscribe_ok(1, &[("rs/t", 0)]);
    c.subscribe_ok(2, &[("rs/t", 2)]);
    let mut publisher = RawClient::connect(ws.addr, "resub-pub");
    publisher.publish2("rs/t", b"x", false, 1);
    let p = c.recv_publish();
    assert_eq!(
        p.qos, 2,
        "the second SUBSCRIBE replaced the QoS [MQTT-3.8.4-3]"
    );
    c.ack(&p);
    c.expect_silence(SHORT);
}

// [MQTT-3.10.4-4] UNSUBACK with the UNSUBSCRIBE's packet id; [MQTT-3.10.4-2] the server
// stops adding messages for the deleted subscription; [MQTT-3.10.4-5] UNSUBACK is sent
// even when no filter matched; other subscriptions remain ([MQTT-3.10.4-1] only an exactly
// matching filter is deleted).
#[test]
fn unsubscribe_gets_unsuback_and_stops_delivery() {
    let ws = Waystation::start();
    let mut c = RawClient::connect(ws.addr, "unsub");
    c.subscribe_ok(1, &[("u/a", 1), ("u/b", 1)]);
    let mut publisher = RawClient::connect(ws.addr, "unsub-pub");
    publisher.publish1("u/a", b"before", false, 1);
    let p = c.recv_publish();
    assert_eq!(p.payload, b"before");
    c.ack(&p);

    // [MQTT-3.10.4-6] several filters in one UNSUBSCRIBE: one UNSUBACK.
    c.unsubscribe(0x4242, &["u/a", "not/there"]);
    c.unsubscribe(7, &["never/subscribed"]);
    c.unsubscribe(8, &["u/+"]); // not identical to u/b: u/b stays
    publisher.publish1("u/a", b"after", false, 2);
    publisher.publish1("u/b", b"still", false, 3);
    let p = c.recv_publish();
    assert_eq!(p.topic, "u/b", "u/a was unsubscribed, u/b was not");
    c.ack(&p);
    c.expect_silence(SHORT);
}

// [MQTT-4.7.1-3] `+` matches exactly one level (also an empty one); topic matching is
// case-sensitive and levels are separated by `/`.
#[test]
fn plus_wildcard_matches_exactly_one_level() {
    let ws = Waystation::start();
    let got = matches(
        &ws,
        "a/+/c",
        &[
            "a/b/c", "a//c", "a/x/c", "a/b/c/d", "a/c", "a/b/d", "A/b/c", "b/a/b/c",
        ],
    );
    assert_eq!(got, vec!["a/b/c", "a//c", "a/x/c"]);
    let got = matches(&ws, "sport/+", &["sport", "sport/", "sport/x", "sport/x/y"]);
    assert_eq!(got, vec!["sport/", "sport/x"]);
    let got = matches(&ws, "+/+", &["/x", "a/b", "a", "a/b/c"]);
    assert_eq!(got, vec!["/x", "a/b"]);
    let got = matches(&ws, "+", &["a", "/a", "b"]);
    assert_eq!(got, vec!["a", "b"]);
}

// [MQTT-4.7.1-2] `#` matches the parent level and any number of child levels: `a/#`
// matches `a`, `a/b`, `a/b/c` but not `ab`; `#` alone matches every topic (not `$` ones).
#[test]
fn hash_wildcard_matches_parent_and_all_children() {
    let ws = Waystation::start();
    let got = matches(&ws, "a/#", &["a", "a/", "a/b", "a/b/c", "ab", "b/a", "A/b"]);
    assert_eq!(got, vec!["a", "a/", "a/b", "a/b/c"]);
    let got = matches(&ws, "a/+/#", &["a", "a/b", "a/b/c/d", "x/b"]);
    assert_eq!(got, vec!["a/b", "a/b/c/d"]);
    let got = matches(&ws, "#", &["x", "/y", "x/y/z"]);
    assert_eq!(got, vec!["x", "/y", "x/y/z"]);
}

// [MQTT-4.7.2-1] "The Server MUST NOT match Topic Filters starting with a wildcard
// character (# or +) with Topic Names beginning with a $ character." Filters that spell the
// `$` level out do match.
#[test]
fn dollar_topics_not_matched_by_leading_wildcards() {
    let ws = Waystation::start();
    let mut wild = RawClient::connect(ws.addr, "dollar-wild");
    wild.subscribe_ok(1, &[("#", 0), ("+/status", 0), ("+", 0)]);
    let mut explicit = RawClient::connect(ws.addr, "dollar-explicit");
    explicit.subscribe_ok(1, &[("$app/#", 0), ("$other/+", 0)]);
    let mut publisher = RawClient::connect(ws.addr, "dollar-pub");
    publisher.publish1("$app/status", b"d1", false, 1);
    publisher.publish1("$other/status", b"d2", false, 2);
    publisher.publish1("$app", b"d3", false, 3);
    publisher.publish1("plain/status", b"p", false, 4);

    let mut got = Vec::new();
    for _ in 0..3 {
        got.push(explicit.recv_publish().topic);
    }
    assert_eq!(got, vec!["$app/status", "$other/status", "$app"]);
    // The wildcard subscriber receives only the plain topic (once: overlapping filters).
    let p = wild.recv_publish();
    assert_eq!(
        p.topic, "plain/status",
        "a $ topic matched a filter starting with a wildcard [MQTT-4.7.2-1]"
    );
    wild.expect_silence(SHORT);
}

// Issue: "invalid filters get return code 0x80 (not a dropped connection)".
// [MQTT-4.7.1-2] `#` must be the last character and alone in its level; [MQTT-4.7.1-3]
// `+` must occupy an entire level. [MQTT-3.9.3-2] 0x80 is the failure return code; the
// valid filters in the same SUBSCRIBE are granted and work.
#[test]
fn invalid_filters_get_0x80_and_connection_stays_open() {
    let ws = Waystation::start();
    let mut c = RawClient::connect(ws.addr, "badfilter");
    let codes = c.subscribe(
        3,
        &[
            ("a/#/b", 1),
            ("ok/t", 1),
            ("a+", 0),
            ("a/b#", 2),
            ("+a/b", 1),
            ("#/", 0),
            ("x/++", 1),
            ("ok/+", 2),
        ],
    );
    assert_eq!(codes, vec![0x80, 1, 0x80, 0x80, 0x80, 0x80, 0x80, 2]);
    c.ping();
    let mut publisher = RawClient::connect(ws.addr, "badfilter-pub");
    publisher.publish1("ok/t", b"works", false, 1);
    let p = c.recv_publish();
    assert_eq!(
        (p.payload.as_slice(), p.qos),
        (&b"works"[..], 1),
        "delivered once, at the highest granted QoS"
    );
    c.ack(&p);
    c.expect_silence(SHORT);
}

// Issue: "Overlapping subscriptions of one client: the message is delivered once, at the
// highest granted QoS" ([MQTT-3.3.5-1]: the server MUST respect the maximum QoS of all the
// matching subscriptions).
#[test]
fn overlapping_subscriptions_deliver_once_at_highest_qos() {
    let ws = Waystation::start();
    let mut c = RawClient::connect(ws.addr, "overlap");
    c.subscribe_ok(1, &[("a/#", 0), ("a/b", 1), ("+/b", 0)]);
    let mut publisher = RawClient::connect(ws.addr, "overlap-pub");
    publisher.publish2("a/b", b"once", false, 1);
    let p = c.recv_publish();
    assert_eq!(p.payload, b"once");
    assert_eq!(p.qos, 1, "highest granted QoS among matching subscriptions");
    c.ack(&p);
    c.expect_silence(SHORT);
    // A topic only the QoS 0 filter matches arrives at QoS 0.
    publisher.publish2("a/c", b"only-hash", false, 2);
    let p = c.recv_publish();
    assert_eq!((p.topic.as_str(), p.qos), ("a/c", 0));
    c.expect_silence(SHORT);
}

// [MQTT-3.3.2-2] "The Topic Name in the PUBLISH Packet MUST NOT contain wildcard
// characters." [MQTT-4.7.3-1] topic names are at least one character long. Such a PUBLISH
// is a protocol violation: the connection is closed ([MQTT-4.8.0-1]) and nothing is
// delivered.
#[test]
fn publish_to_topic_with_wildcards_closes_connection() {
    let ws = Waystation::start();
    let mut sub = RawClient::connect(ws.addr, "wild-sub");
    sub.subscribe_ok(1, &[("#", 1)]);
    for (i, topic) in ["a/+", "a/#", "#", "+", "a/+/b", ""].iter().enumerate() {
        for qos in [0u8, 1] {
            let mut c = RawClient::connect(ws.addr, &format!("wild-pub-{i}-{qos}"));
            c.send(&raw::publish(
                topic,
                b"bad",
                qos,
                false,
                false,
                (qos > 0).then_some(1),
            ));
            let got = c.expect_closed(Duration::from_secs(3));
            assert!(
                got.is_empty(),
                "PUBLISH to {topic:?} (QoS {qos}) answered with {got:?} instead of a close"
            );
        }
    }
    sub.expect_silence(SHORT);
    sub.ping();
}

// Wildcard subscription through Debian's mosquitto_sub: real-client interop for `+`/`#`.
#[test]
fn mosquitto_sub_wildcards_receive_matching_topics() {
    let ws = Waystation::start();
    let msub = MosquittoSub::start(
        ws.port(),
        &[
            "-t",
            "house/+/temp",
            "-t",
            "garden/#",
            "-C",
            "3",
            "-W",
            "10",
        ],
    );
    let mut publisher = RawClient::connect(ws.addr, "mq-wild-pub");
    for t in [
        "house/kitchen/temp",
        "house/kitchen/hum",
        "garden",
        "house/temp",
        "garden/pond/level",
    ] {
        publisher.publish1(t, b"v", false, 1);
    }
    let (lines, _) = msub.collect(3, Duration::from_secs(5));
    assert_eq!(
        lines,
        vec!["house/kitchen/temp v", "garden v", "garden/pond/level v"]
    );
}
