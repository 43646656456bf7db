#!/usr/bin/env python3
"""Writes the seed inputs of every fuzz target into fuzz/seeds/<target>/ (not committed).

The committed corpus (fuzz/corpus/) was made from these with `cargo fuzz cmin`; run this
again only to re-seed: python3 fuzz/seed.py [path/to/mqtt-packet-vectors.json]
Sources: the MQTT packet vectors (shared/vectors, from mqtt-packet's test fixtures),
config/waystation.toml with its commented examples switched on, the ACL syntax of
broker/src/acl.rs, certificates made with Debian's openssl, and hand-built MQTT 5 packets
(every property of CONNECT, PUBLISH, SUBSCRIBE, acks, DISCONNECT and AUTH, and the
malformed forms the hostile-input test sends) for decode_v5 and connection_v5.
"""
import hashlib, json, os, re, subprocess, sys, tempfile

here = os.path.dirname(os.path.abspath(__file__))
root = os.path.dirname(here)
vectors_path = sys.argv[1] if len(sys.argv) > 1 else os.path.join(root, "..", "shared", "vectors", "mqtt-packet-vectors.json")
if not os.path.exists(vectors_path):
    vectors_path = "/work/shared/vectors/mqtt-packet-vectors.json"


def put(target, data):
    d = os.path.join(here, "seeds", target)
    os.makedirs(d, exist_ok=True)
    if isinstance(data, str):
        data = data.encode()
    with open(os.path.join(d, hashlib.sha1(data).hexdigest()), "wb") as f:
        f.write(data)


def mqtt_str(s):
    return len(s).to_bytes(2, "big") + s


def packet(first, body):
    out, n = bytearray([first]), len(body)
    while True:
        b = n % 128
        n //= 128
        out.append(b | (0x80 if n else 0))
        if not n:
            break
    return bytes(out) + body


def connect(client_id=b"fuzz", flags=0x02, rest=b""):
    return packet(0x10, mqtt_str(b"MQTT") + bytes([4, flags]) + (60).to_bytes(2, "big") + mqtt_str(client_id) + rest)


# MQTT: every vector with bytes, alone (decode, connection) and behind a CONNECT (connection).
vectors = [v for v in json.load(open(vectors_path)) if isinstance(v.get("hex"), str)]
stream = b""
for v in vectors:
    data = bytes.fromhex(v["hex"])
    put("decode", data)
    put("connection", data)
    put("connection", connect() + data)
    if v["kind"] != "parse_error" and v["protocolVersion"] == 4:
        stream += data
put("decode", stream)
sub = packet(0x82, (1).to_bytes(2, "big") + mqtt_str(b"devices/fuzz/#") + b"\x01" + mqtt_str(b"#") + b"\x02")
pub1 = packet(0x32, mqtt_str(b"devices/fuzz/t") + (2).to_bytes(2, "big") + b"hello")
pub2 = packet(0x34, mqtt_str(b"sensors/admin/t") + (3).to_bytes(2, "big") + b"x")
rel = packet(0x62, (3).to_bytes(2, "big"))
will = connect(b"w", 0x2E, mqtt_str(b"devices/w/will") + mqtt_str(b"bye"))
login = connect(b"u", 0xC2, mqtt_str(b"admin") + mqtt_str(b"pw"))
for first in (connect(), will, login):
    put("connection", first + sub + pub1 + pub2 + rel + packet(0xC0, b"") + packet(0xE0, b""))
    put("connection", first + sub + pub1 + packet(0x40, (1).to_bytes(2, "big")) + packet(0xA2, (4).to_bytes(2, "big") + mqtt_str(b"#")))

# MQTT 5 (decode_v5, connection_v5). Properties as (id, value bytes) pairs.
def u16(n):
    return n.to_bytes(2, "big")


def u32(n):
    return n.to_bytes(4, "big")


def varint(n):
    out = bytearray()
    while True:
        b = n % 128
        n //= 128
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def props(*pairs):
    body = b"".join(bytes([pid]) + value for pid, value in pairs)
    return varint(len(body)) + body


def user(k, v):
    return (0x26, mqtt_str(k) + mqtt_str(v))


def connect5(client_id=b"fz5", flags=0x02, properties=props(), rest=b""):
    return packet(0x10, mqtt_str(b"MQTT") + bytes([5, flags]) + u16(60) + properties + mqtt_str(client_id) + rest)


def publish5(topic, payload, qos=0, pkid=1, properties=props(), flags=0):
    body = mqtt_str(topic) + (u16(pkid) if qos else b"") + properties + payload
    return packet(0x30 | (qos << 1) | flags, body)


every_publish_property = props(
    (0x01, b"\x01"), (0x02, u32(60)), (0x03, mqtt_str(b"text/plain")), (0x08, mqtt_str(b"devices/fz5/reply")),
    (0x09, mqtt_str(b"\x00\x01corr")), user(b"k", b"v"), user(b"k", b"v2"), (0x23, u16(1)))
v5 = {
    "connect_props": connect5(properties=props(
        (0x11, u32(60)), (0x21, u16(4)), (0x27, u32(4096)), (0x22, u16(8)), (0x19, b"\x01"), (0x17, b"\x00"),
        user(b"site", b"pi"))),
    "connect_will": connect5(flags=0xEE, rest=props(
        (0x18, u32(0)), (0x01, b"\x01"), (0x02, u32(30)), (0x03, mqtt_str(b"text/plain")),
        (0x08, mqtt_str(b"r/t")), (0x09, mqtt_str(b"cd")), user(b"a", b"b"))
        + mqtt_str(b"devices/fz5/will") + mqtt_str(b"bye") + mqtt_str(b"admin") + mqtt_str(b"\x00\xffpw")),
    "connect_auth": connect5(properties=props((0x15, mqtt_str(b"SCRAM-SHA-1")), (0x16, mqtt_str(b"data")))),
    "connect_empty_id": connect5(client_id=b""),
    "publish_every_property": publish5(b"devices/fz5/t", b"hello", 1, 1, every_publish_property),
    "publish_alias_only": publish5(b"", b"again", 1, 2, props((0x23, u16(1)))),
    "publish_qos0_alias": publish5(b"devices/fz5/q0", b"x", 0, 0, props((0x23, u16(2)))),
    "publish_qos2_retain": publish5(b"devices/fz5/q2", b"y", 2, 3, props((0x02, u32(1))), flags=0x01),
    "publish_empty_retained": publish5(b"devices/fz5/q0", b"", 0, 0, props(), flags=0x01),
    "publish_bad_utf8_payload": publish5(b"devices/fz5/t", b"\xff\xfe", 1, 4, props((0x01, b"\x01"))),
    "subscribe_options": packet(0x82, u16(5) + props((0x0B, varint(7)), user(b"k", b"v"))
        + mqtt_str(b"devices/fz5/#") + b"\x01" + mqtt_str(b"devices/+/t") + b"\x06"
        + mqtt_str(b"#") + b"\x1e" + mqtt_str(b"$share/g/devices/#") + b"\x21"),
    "unsubscribe": packet(0xA2, u16(6) + props(user(b"k", b"v")) + mqtt_str(b"devices/fz5/#") + mqtt_str(b"#")),
    "puback_reason": packet(0x40, u16(1) + b"\x10" + props((0x1F, mqtt_str(b"no one")))),
    "puback_short": packet(0x40, u16(1)),
    "pubrec": packet(0x50, u16(2) + b"\x00"),
    "pubrel": packet(0x62, u16(3) + b"\x00" + props()),
    "pubrel_not_found": packet(0x62, u16(9) + b"\x92"),
    "pubcomp": packet(0x70, u16(2)),
    "pingreq": packet(0xC0, b""),
    "disconnect_empty": bytes.fromhex("e000"),
    "disconnect_will": bytes.fromhex("e00104"),
    "disconnect_expiry": packet(0xE0, b"\x00" + props((0x11, u32(120)), (0x1F, mqtt_str(b"bye")))),
    "auth": packet(0xF0, b"\x18" + props((0x15, mqtt_str(b"SCRAM-SHA-1")), (0x16, mqtt_str(b"x")))),
    "auth_empty": bytes.fromhex("f000"),
}
v5_bad = {
    "unknown_property": publish5(b"devices/fz5/t", b"x", 1, 7, props((0x7F, u16(1)))),
    "duplicate_property": publish5(b"devices/fz5/t", b"x", 1, 7, props((0x02, u32(5)), (0x02, u32(6)))),
    "property_length_past_packet": packet(0x32, mqtt_str(b"devices/fz5/t") + u16(7) + varint(40) + b"\x02" + u32(5)),
    "topic_alias_0": publish5(b"devices/fz5/t", b"x", 1, 7, props((0x23, u16(0)))),
    "topic_alias_17": publish5(b"devices/fz5/t", b"x", 1, 7, props((0x23, u16(17)))),
    "alias_not_set": publish5(b"", b"x", 1, 7, props((0x23, u16(9)))),
    "subscription_id_0": packet(0x82, u16(8) + props((0x0B, varint(0))) + mqtt_str(b"a/#") + b"\x01"),
    "publish_with_subscription_id": publish5(b"devices/fz5/t", b"x", 1, 7, props((0x0B, varint(3)))),
    "connect_receive_max_0": connect5(properties=props((0x21, u16(0)))),
}
v5_stream = b"".join(v5[k] for k in ("connect_props", "publish_every_property", "publish_alias_only", "publish_qos0_alias",
                                     "publish_qos2_retain", "subscribe_options", "unsubscribe", "puback_reason", "pubrec",
                                     "pubrel", "pubcomp", "pingreq", "disconnect_expiry"))
put("decode_v5", v5_stream)
for data in list(v5.values()) + list(v5_bad.values()):
    put("decode_v5", data)
    put("connection", data)
for v in vectors:
    if v["protocolVersion"] == 5:
        put("decode_v5", bytes.fromhex(v["hex"]))
session = [v5[k] for k in ("subscribe_options", "publish_every_property", "publish_alias_only", "publish_qos0_alias",
                           "publish_qos2_retain", "puback_reason", "pubrec", "pubrel", "pubcomp", "pingreq", "unsubscribe",
                           "publish_empty_retained")]
# connection_v5: one selector byte (bit 0 ACL, bits 1-2 the CONNECT, fuzzing::v5_connect), then packets.
for selector in range(8):
    for end in ("disconnect_empty", "disconnect_will", "disconnect_expiry", "auth"):
        put("connection_v5", bytes([selector]) + b"".join(session) + v5[end])
    put("connection_v5", bytes([selector]) + v5["subscribe_options"] + v5["publish_bad_utf8_payload"] + v5["pubrel_not_found"])
for data in list(v5_bad.values()) + [v5["auth_empty"], v5["connect_props"]]:
    put("connection_v5", bytes([0]) + v5["subscribe_options"] + v5["publish_every_property"] + data)
for v in vectors:
    if v["protocolVersion"] == 5 and v["hex"][:2] != "10":
        put("connection_v5", bytes([1]) + bytes.fromhex(v["hex"]))

# Config: the shipped file, and again with every commented example switched on.
# Section by section (each seed under 2 KiB: scripts/fuzz.sh runs config with -max_len=2048).
text = open(os.path.join(root, "config", "waystation.toml")).read()
enabled = re.sub(r"(?m)^# (\[\[?[a-z.]+\]\]?|[a-z_]+ = .*)$", r"\1", text)
for t in (text, enabled):
    for section in re.split(r"(?m)^(?=\[)", t):
        lines = [l for l in section.splitlines() if l.strip() and not l.lstrip().startswith("#")]
        if lines:
            put("config", "\n".join(lines)[:2048] + "\n")
put("config", '[[listener]]\nbind = "0.0.0.0:8883"\ntls = { cert = "c", key = "k", client_ca = "ca", use_identity_as_username = true }\n'
    '[[bridge]]\nname = "aws"\naddress = "x.iot.example.com:8883"\ntls = true\n[[bridge.forward]]\nlocal = "sensors/#"\n')

# ACL
put("acl", "topic read public/#\n\nuser alice\ntopic readwrite alice/#\ntopic deny alice/secret/#\n"
    "pattern write sensors/%c/#\npattern read commands/%u/#\n")
put("acl", "# comment\ntopic $SYS/#\nuser bob\ntopic write +/x/#\npattern deny %c/%u/private\n")

# Certificates (DER)
with tempfile.TemporaryDirectory() as d:
    def ssl(*args):
        subprocess.run(["openssl", *args], cwd=d, check=True, capture_output=True)
    ssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", "ca.key",
        "-out", "ca.crt", "-days", "2", "-subj", "/CN=Seed CA", "-outform", "PEM")
    ssl("req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", "c.key",
        "-out", "c.csr", "-subj", "/C=DE/O=Waystation/CN=sensor-42")
    ssl("x509", "-req", "-in", "c.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial", "-out", "c.der", "-outform", "DER", "-days", "2")
    ssl("x509", "-in", "ca.crt", "-out", "ca.der", "-outform", "DER")
    for name in ("c.der", "ca.der"):
        put("cert_cn", open(os.path.join(d, name), "rb").read())
print("seeds written to", os.path.join(here, "seeds"))
