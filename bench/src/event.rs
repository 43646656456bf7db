//! Firmware events as the load's payloads (`--payload-format event-v1`): valid JSON of the
//! event schema, version 1 (docs/event-schema.md), one device per publisher; and their
//! decoding on the subscriber's side, one event per PUBLISH or an edge's batch of them
//! (a JSON array or NDJSON of `{"topic":..,"payload":<event>}`, possibly zstd or gzip:
//! docs/pipeline.md), so a subscriber on an upstream counts events, not PUBLISHes.

use std::io::Read as _;

/// What publishers put in their payloads, and subscribers expect.
#[derive(clap::ValueEnum, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum PayloadFormat {
    /// Publisher id, sequence and send time in 16 bytes, padded to --payload.
    #[default]
    Binary,
    /// Firmware events (no send time: subscribers report no latency).
    #[value(name = "event-v1")]
    EventV1,
}

/// The boot counter of every simulated device (the simulator uses Unix seconds).
pub const BOOT: u32 = 1_764_633_600;
/// The simulated temperature sensor's thresholds, milli-°C: each device has its own rising
/// threshold (28-32 °C), the falling one is 1 °C below it.
fn thresholds(publisher: u32) -> (i32, i32) {
    let rising = 28_000 + 1_000 * (publisher % 5) as i32;
    (rising, rising - 1_000)
}

/// Device id of publisher `publisher`: `sim-0003` (also its topic level).
pub fn device_id(publisher: u32) -> String {
    format!("sim-{publisher:04}")
}

/// The publisher number in a device id written by [`device_id`].
fn publisher_of(device: &str) -> Option<u32> {
    device.strip_prefix("sim-")?.parse().ok()
}

/// A few bits of noise that depend only on (publisher, seq), so runs are repeatable.
fn noise(publisher: u32, seq: u32) -> u64 {
    let mut x = (u64::from(publisher) << 32 | u64::from(seq)).wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

/// Appends event `seq` of the device of `publisher`, as the firmware writes it (fields in its
/// order, no whitespace): a temperature that crosses the device's rising and falling
/// thresholds in turn, the reading that completed the debounce up to 1.5 °C past the threshold,
/// and a heartbeat (a reading between the thresholds) every 16th event.
pub fn write_event(out: &mut Vec<u8>, publisher: u32, seq: u32) {
    let n = noise(publisher, seq);
    let (rising, falling) = thresholds(publisher);
    let past = (n % 1_500) as i32;
    let (value, threshold, direction) = if seq % 16 == 15 {
        // After a rising event (seq 14): the next crossing is the falling one.
        (falling + 1 + (n % 999) as i32, falling, "heartbeat")
    } else if seq.is_multiple_of(2) {
        (rising + past, rising, "rising")
    } else {
        (falling - past, falling, "falling")
    };
    use std::io::Write as _;
    let _ = write!(
        out,
        "{{\"v\":1,\"device\":\"{}\",\"boot\":{BOOT},\"seq\":{seq},\"sensor\":\"temp\",\"value\":{value},\"threshold\":{threshold},\"direction\":\"{direction}\"}}",
        device_id(publisher)
    );
}

/// The events in one PUBLISH payload, each as (publisher, seq): a single event, or a batch
/// (JSON array or NDJSON, each element the event or `{"topic":..,"payload":<event>}`),
/// zstd- or gzip-compressed or not (told by the magic bytes). Err: not such a payload.
pub fn events_in(payload: &[u8], mut each: impl FnMut(u32, u32)) -> Result<(), String> {
    let plain;
    let body: &[u8] = if payload.starts_with(&[0x28, 0xB5, 0x2F, 0xFD]) {
        let mut d =
            ruzstd::decoding::StreamingDecoder::new(payload).map_err(|e| format!("zstd: {e}"))?;
        let mut v = Vec::with_capacity(payload.len() * 8);
        d.read_to_end(&mut v).map_err(|e| format!("zstd: {e}"))?;
        plain = v;
        &plain
    } else if payload.starts_with(&[0x1F, 0x8B]) {
        let mut v = Vec::with_capacity(payload.len() * 8);
        flate2::read::GzDecoder::new(payload)
            .read_to_end(&mut v)
            .map_err(|e| format!("gzip: {e}"))?;
        plain = v;
        &plain
    } else {
        payload
    };
    let mut one = |v: &serde_json::Value| -> Result<(), String> {
        let ev = v.get("payload").unwrap_or(v);
        let publisher = ev
            .get("device")
            .and_then(|d| d.as_str())
            .and_then(publisher_of)
            .ok_or("no device sim-NNNN")?;
        let seq = ev
            .get("seq")
            .and_then(|s| s.as_u64())
            .and_then(|s| u32::try_from(s).ok())
            .ok_or("no seq")?;
        each(publisher, seq);
        Ok(())
    };
    match body.iter().find(|b| !b.is_ascii_whitespace()) {
        Some(b'[') => {
            let all: Vec<serde_json::Value> =
                serde_json::from_slice(body).map_err(|e| e.to_string())?;
            all.iter().try_for_each(&mut one)
        }
        Some(b'{') => {
            for line in body.split(|&b| b == b'\n') {
                if line.iter().all(u8::is_ascii_whitespace) {
                    continue;
                }
                let v: serde_json::Value =
                    serde_json::from_slice(line).map_err(|e| e.to_string())?;
                one(&v)?;
            }
            Ok(())
        }
        _ => Err("not JSON".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn collect(payload: &[u8]) -> Vec<(u32, u32)> {
        let mut v = Vec::new();
        events_in(payload, |p, s| v.push((p, s))).expect("decodes");
        v
    }

    #[test]
    fn events_are_the_schema() {
        for seq in [0, 1, 14, 15, 16] {
            let mut out = Vec::new();
            write_event(&mut out, 3, seq);
            let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
            assert_eq!(v["v"], 1);
            assert_eq!(v["device"], "sim-0003");
            assert_eq!(v["boot"], u64::from(BOOT));
            assert_eq!(v["seq"], u64::from(seq));
            assert_eq!(v["sensor"], "temp");
            let (value, threshold) = (
                v["value"].as_i64().unwrap(),
                v["threshold"].as_i64().unwrap(),
            );
            match v["direction"].as_str().unwrap() {
                "rising" => assert!(value >= threshold),
                "falling" => assert!(value <= threshold),
                "heartbeat" => {
                    assert!(value > threshold && value < i64::from(thresholds(3).0))
                }
                d => panic!("direction {d}"),
            }
            assert_eq!(v.as_object().unwrap().len(), 8);
        }
    }

    #[test]
    fn single_array_ndjson_and_compressed_batches_decode() {
        let mut a = Vec::new();
        write_event(&mut a, 1, 7);
        assert_eq!(collect(&a), [(1, 7)]);
        let mut b = Vec::new();
        write_event(&mut b, 2, 9);
        let wrap = |e: &[u8]| {
            format!(
                "{{\"topic\":\"sensors/x/events\",\"payload\":{}}}",
                std::str::from_utf8(e).unwrap()
            )
        };
        let array = format!("[{},{}]", wrap(&a), wrap(&b));
        assert_eq!(collect(array.as_bytes()), [(1, 7), (2, 9)]);
        let nd = format!("{}\n{}\n", wrap(&a), wrap(&b));
        assert_eq!(collect(nd.as_bytes()), [(1, 7), (2, 9)]);
        let z = ruzstd::encoding::compress_to_vec(
            array.as_bytes(),
            ruzstd::encoding::CompressionLevel::Fastest,
        );
        assert_eq!(collect(&z), [(1, 7), (2, 9)]);
        use std::io::Write as _;
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(nd.as_bytes()).unwrap();
        assert_eq!(collect(&gz.finish().unwrap()), [(1, 7), (2, 9)]);
        assert!(events_in(&[0, 0, 0], |_, _| {}).is_err());
    }
}
