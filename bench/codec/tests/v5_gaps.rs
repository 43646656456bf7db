//! Issue 13: what each candidate MQTT 5 codec does with the inputs that rumqttc 0.25 is known
//! (or suspected) to get wrong. This records behaviour; it asserts no preferred answer.
//!
//! Run: `cargo test --test v5_gaps -- --nocapture` (prints a Markdown table).

use std::panic::{catch_unwind, AssertUnwindSafe};

use bytes::{Bytes, BytesMut};
use waystation_codec_bench::{rmq, rumq, CASES, MAX};

/// A frame: first byte, remaining length (one or two bytes is enough here), body.
fn frame(first: u8, body: &[u8]) -> Vec<u8> {
    let mut v = vec![first];
    let mut n = body.len();
    loop {
        let mut b = (n % 128) as u8;
        n /= 128;
        if n > 0 {
            b |= 0x80;
        }
        v.push(b);
        if n == 0 {
            break;
        }
    }
    v.extend_from_slice(body);
    v
}

fn cat(parts: &[&[u8]]) -> Vec<u8> {
    parts.concat()
}

/// A v5 CONNECT: clean start, keep alive 60, client id "c1", given properties, then
/// optional username "u" and raw password bytes.
fn connect(level: u8, props: &[u8], password: Option<&[u8]>) -> Vec<u8> {
    let flags: u8 = 0x02 | if password.is_some() { 0xC0 } else { 0 };
    let mut body = cat(&[b"\x00\x04MQTT", &[level, flags, 0x00, 0x3C]]);
    if level == 5 {
        body.push(props.len() as u8);
        body.extend_from_slice(props);
    }
    body.extend_from_slice(b"\x00\x02c1");
    if let Some(pw) = password {
        body.extend_from_slice(b"\x00\x01u");
        body.extend_from_slice(&(pw.len() as u16).to_be_bytes());
        body.extend_from_slice(pw);
    }
    frame(0x10, &body)
}

/// QoS 1 PUBLISH to "t", packet id 1, given properties, payload "x".
fn publish_q1(props: &[u8]) -> Vec<u8> {
    let mut body = b"\x00\x01t\x00\x01".to_vec();
    body.push(props.len() as u8);
    body.extend_from_slice(props);
    body.push(b'x');
    frame(0x32, &body)
}

const AUTH_PROPS: &[u8] = b"\x15\x00\x0bSCRAM-SHA-1\x16\x00\x04\x01\x02\x03\x04";

fn auth_continue() -> Vec<u8> {
    let mut body = vec![0x18, AUTH_PROPS.len() as u8];
    body.extend_from_slice(AUTH_PROPS);
    frame(0xF0, &body)
}

struct Case {
    name: &'static str,
    spec: &'static str,
    bytes: Vec<u8>,
    max: u32,
}

fn cases() -> Vec<Case> {
    let c = |name, spec, bytes| Case {
        name,
        spec,
        bytes,
        max: MAX,
    };
    vec![
        c(
            "DISCONNECT `E0 00` (zero length)",
            "valid: reason 0x00, no properties (3.14.2.1)",
            vec![0xE0, 0x00],
        ),
        c(
            "DISCONNECT `E0 01 04` (reason only)",
            "valid: properties omitted when remaining < 2",
            vec![0xE0, 0x01, 0x04],
        ),
        c(
            "PUBACK `40 03 12 67 10` (reason only)",
            "valid: properties omitted when remaining < 4",
            vec![0x40, 0x03, 0x12, 0x67, 0x10],
        ),
        c(
            "AUTH `F0 00`",
            "valid: Success, no properties (3.15.2.1)",
            vec![0xF0, 0x00],
        ),
        c(
            "AUTH 0x18 + method + data",
            "valid: Continue authentication",
            auth_continue(),
        ),
        c(
            "CONNECT, password `FF FE 00 80`",
            "valid: password is Binary Data (3.1.3.6)",
            connect(5, b"", Some(&[0xFF, 0xFE, 0x00, 0x80])),
        ),
        c(
            "CONNECT, receive maximum 0",
            "Protocol Error (3.1.2.11.3)",
            connect(5, b"\x21\x00\x00", None),
        ),
        c(
            "CONNECT, protocol level 4",
            "a v3.1.1 CONNECT: a v5-only reader must reject",
            connect(4, b"", None),
        ),
        c(
            "PUBLISH, topic alias 0",
            "Protocol Error (3.3.2.3.4)",
            publish_q1(b"\x23\x00\x00"),
        ),
        c(
            "PUBLISH, subscription id 0",
            "Protocol Error (3.3.2.3.8)",
            publish_q1(b"\x0b\x00"),
        ),
        c(
            "PUBLISH, message expiry twice",
            "Protocol Error (3.3.2.3.3)",
            publish_q1(b"\x02\x00\x00\x00\x0a\x02\x00\x00\x00\x0a"),
        ),
        c(
            "SUBSCRIBE, subscription id 0",
            "Protocol Error (3.8.2.1.2)",
            frame(0x82, b"\x00\x01\x02\x0b\x00\x00\x01t\x01"),
        ),
        c(
            "PUBLISH, topic `a/+`",
            "Protocol Error: no wildcards in a Topic Name (3.3.2.1)",
            frame(0x30, b"\x00\x03a/+\x00x"),
        ),
        c(
            "PUBLISH, topic with U+0000",
            "Malformed Packet (1.5.4)",
            frame(0x30, b"\x00\x03a\x00b\x00x"),
        ),
        c(
            "PUBLISH, topic bytes `61 FF`",
            "Malformed Packet: not UTF-8 (1.5.4)",
            frame(0x30, b"\x00\x02a\xff\x00x"),
        ),
        c("PUBLISH, QoS 3 (`36`)", "Malformed Packet (3.3.1.2)", {
            let mut v = publish_q1(b"");
            v[0] = 0x36;
            v
        }),
        c(
            "CONNECT, reserved flag bit 0 set",
            "Malformed Packet (3.1.2.3)",
            {
                let mut v = connect(5, b"", None);
                v[9] |= 0x01;
                v
            },
        ),
        Case {
            name: "PUBLISH of 21 B total (remaining 19), max size 20",
            spec: "must be rejected: Maximum Packet Size is the whole packet (3.1.2.11.4)",
            bytes: frame(0x30, &cat(&[b"\x00\x01t\x00", &[b'p'; 15]])),
            max: 20,
        },
    ]
}

fn short(s: String) -> String {
    let s = s
        .replace('|', "\\|")
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ");
    if s.chars().count() > 170 {
        format!("{}…", s.chars().take(170).collect::<String>())
    } else {
        s
    }
}

/// How much of the input is still in the buffer after the call (a decoder that errors after
/// consuming the frame, or succeeds without consuming all of it, shows here).
fn left(buf: &BytesMut) -> String {
    format!(" [{} B left in buffer]", buf.len())
}

fn rumq_summary(p: &rumq::Packet) -> String {
    use rumq::Packet as P;
    match p {
        P::Connect(c, _, login) => format!(
            "Connect receive_maximum={:?} login={:?}",
            c.properties.as_ref().and_then(|p| p.receive_maximum),
            login
        ),
        P::Publish(p) => match &p.properties {
            None => "Publish, no properties".into(),
            Some(pp) => format!(
                "Publish topic_alias={:?} subscription_identifiers={:?} message_expiry_interval={:?}",
                pp.topic_alias, pp.subscription_identifiers, pp.message_expiry_interval
            ),
        },
        P::Subscribe(s) => format!("Subscribe properties={:?}", s.properties),
        other => format!("{other:?}"),
    }
}

fn rmq_summary(p: &rmq::Packet) -> String {
    use rmq::Packet as P;
    match p {
        P::Connect(c) => format!(
            "Connect receive_max={:?} password={:?}",
            c.receive_max, c.password
        ),
        P::Publish(p) => match &p.properties {
            None => "Publish, no properties".into(),
            Some(pp) => format!(
                "Publish topic_alias={:?} subscription_ids={:?} message_expiry_interval={:?}",
                pp.topic_alias, pp.subscription_ids, pp.message_expiry_interval
            ),
        },
        other => format!("{other:?}"),
    }
}

fn rumq_outcome(bytes: &[u8], max: u32) -> String {
    let r = catch_unwind(AssertUnwindSafe(|| {
        let mut buf = BytesMut::from(bytes);
        match rumq::Packet::read(&mut buf, Some(max)) {
            Ok(p) => format!("accepts: {}{}", rumq_summary(&p), left(&buf)),
            Err(e) => format!("rejects: {e:?}{}", left(&buf)),
        }
    }));
    short(r.unwrap_or_else(|_| "PANIC".into()))
}

fn rmq_outcome(bytes: &[u8], max: u32) -> String {
    let r = catch_unwind(AssertUnwindSafe(|| {
        let mut buf = BytesMut::from(bytes);
        let mut codec = rmq::Codec::new(max, max);
        match rmq::decode(&mut codec, &mut buf) {
            Ok(Some(p)) => format!("accepts: {}{}", rmq_summary(&p), left(&buf)),
            Ok(None) => "incomplete (Ok(None))".into(),
            Err(e) => format!("rejects: {e:?}{}", left(&buf)),
        }
    }));
    short(r.unwrap_or_else(|_| "PANIC".into()))
}

fn hex(b: &[u8]) -> String {
    b.iter()
        .map(|x| format!("{x:02X}"))
        .collect::<Vec<_>>()
        .join(" ")
}

#[test]
fn v5_gap_table() {
    println!("\n### Decoding (`rumqttc::v5::mqttbytes::v5::Packet::read` vs `rmqtt_codec::v5::Codec::decode`)\n");
    println!("| input | spec says | rumqttc 0.25.1 | rmqtt-codec 0.3.1 |");
    println!("|---|---|---|---|");
    for case in cases() {
        println!(
            "| {} | {} | {} | {} |",
            case.name,
            case.spec,
            rumq_outcome(&case.bytes, case.max),
            rmq_outcome(&case.bytes, case.max)
        );
    }

    // rumqttc's `Packet::read` has no AUTH arm, but `Auth::read` is public: a checking layer
    // could call it directly. What does it make of the two AUTH inputs?
    println!("\n### rumqttc `Auth::read` called directly (the checking-layer workaround)\n");
    println!("| input | rumqttc `Auth::read` |");
    println!("|---|---|");
    for (name, bytes) in [
        ("AUTH `F0 00`", vec![0xF0, 0x00]),
        ("AUTH 0x18 + method + data", auth_continue()),
    ] {
        let out = catch_unwind(|| {
            let fh = rumq::FixedHeader::new(bytes[0], 1, bytes[1] as usize);
            match rumq::Auth::read(fh, Bytes::from(bytes.clone())) {
                Ok(a) => format!("accepts: {a:?}"),
                Err(e) => format!("rejects: {e:?}"),
            }
        })
        .unwrap_or_else(|_| "PANIC".into());
        println!("| {name} | {} |", short(out));
    }

    // `Packet::read` errs with `InsufficientBytes` on `E0 01 04` after it has split the frame
    // off the buffer; rumqttc's own `Codec` maps that error to "wait for more bytes".
    println!("\n### rumqttc `Codec::decode` (tokio-util) on DISCONNECT `E0 01 04` then PINGREQ `C0 00`\n");
    let mut codec = rumq::Codec {
        max_incoming_size: Some(MAX),
        max_outgoing_size: Some(MAX),
    };
    let mut buf = BytesMut::from(&[0xE0u8, 0x01, 0x04, 0xC0, 0x00][..]);
    let first = tokio_util::codec::Decoder::decode(&mut codec, &mut buf);
    let first_left = buf.len();
    let second = tokio_util::codec::Decoder::decode(&mut codec, &mut buf);
    println!(
        "- 1st call: `{first:?}`, {first_left} B left; 2nd call: `{second:?}`, {} B left",
        buf.len()
    );

    // Building AUTH: rmqtt-codec can; rumqttc's `Auth` needs `AuthReasonCode`, which its
    // `v5` module does not re-export (so `Packet::Auth` cannot be constructed outside).
    println!("\n### Encoding AUTH (Continue, method SCRAM-SHA-1, data 01 02 03 04)\n");
    let expected = auth_continue();
    let mut buf = BytesMut::new();
    let auth = rmq::Auth {
        reason_code: rmq::AuthReasonCode::ContinueAuth,
        auth_method: Some("SCRAM-SHA-1".into()),
        auth_data: Some(Bytes::from_static(&[1, 2, 3, 4])),
        reason_string: None,
        user_properties: Vec::new(),
    };
    let r = rmq::encode(&mut rmq::codec(), rmq::Packet::Auth(auth), &mut buf);
    println!("- spec bytes:  `{}`", hex(&expected));
    println!(
        "- rmqtt-codec: `{}` ({:?}, {})",
        hex(&buf),
        r,
        if buf[..] == expected[..] {
            "identical"
        } else {
            "DIFFERENT"
        }
    );
    println!(
        "- rumqttc: cannot build one (`AuthReasonCode` is in a private module, not re-exported)"
    );

    // The benchmark's fixtures: are the two encodings identical, and does each codec decode
    // the other's bytes?
    println!("\n### Benchmark fixtures: encodings and cross-decoding\n");
    println!("| case | rumqttc bytes | rmqtt bytes | identical | rumqttc reads rmqtt's | rmqtt reads rumqttc's |");
    println!("|---|---|---|---|---|---|");
    for case in CASES {
        let a = rumq::wire(case);
        let b = rmq::wire(case);
        let a_reads_b = rumq::decode(&mut b.clone()).map(|p| p == rumq::packet(case));
        let b_reads_a =
            rmq::decode(&mut rmq::codec(), &mut a.clone()).map(|p| p == Some(rmq::packet(case)));
        println!(
            "| {case} | {} | {} | {} | {} | {} |",
            a.len(),
            b.len(),
            a == b,
            short(match a_reads_b {
                Ok(true) => "equal packet".into(),
                Ok(false) => "different packet".into(),
                Err(e) => format!("{e:?}"),
            }),
            short(match b_reads_a {
                Ok(true) => "equal packet".into(),
                Ok(false) => "different packet".into(),
                Err(e) => format!("{e:?}"),
            }),
        );
        if a != b {
            println!("|   rumqttc | `{}` |||||", hex(&a));
            println!("|   rmqtt | `{}` |||||", hex(&b));
        }
    }
}
