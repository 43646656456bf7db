#!/usr/bin/env python3
"""Writes the seed inputs of every fuzz target into fuzz/seeds/<target>/ (not committed).

The committed corpus (fuzz/corpus/) was made from these with `cargo fuzz cmin`; run this
again only to re-seed: python3 fuzz/seed.py [path/to/mqtt-packet-vectors.json]
Sources: the MQTT packet vectors (shared/vectors, from mqtt-packet's test fixtures),
config/waystation.toml with its commented examples switched on, the ACL syntax of
broker/src/acl.rs, and certificates made with Debian's openssl.
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
