//! Batches of a `[[bridge.forward]]` rule with `batch` set: the events it forwards, gathered
//! into one upstream PUBLISH of up to `max_events` events (or `max_bytes` of their topics and
//! payloads), encoded as a JSON array or NDJSON and compressed with zstd or gzip.
//!
//! Plain state and pure functions: [`PendingBatch`] is the batch being gathered, which the
//! session owns in its `Window` across turns and reconnects (never a future); `forward.rs`
//! feeds it log entries and turns it into a PUBLISH, `window.rs` acknowledges its events
//! together. Each event is `{"topic":"<local topic>","payload":<JSON>}` when the payload is
//! valid JSON (written compactly, unchanged otherwise), else
//! `{"topic":"...","payload_base64":"..."}`.

use std::io::Write as _;
use std::time::{Duration, Instant};

use base64::Engine as _;

use crate::config::bridge::{BatchConfig, BatchEncoding, Compression, ForwardRule};
use crate::store::Seq;

/// A batching rule's settings, borrowed from its config.
#[derive(Debug, Clone, Copy)]
pub(super) struct BatchSpec<'a> {
    pub(super) limits: BatchConfig,
    topic: &'a str,
    pub(super) encoding: BatchEncoding,
    pub(super) compress: Option<Compression>,
}

impl<'a> BatchSpec<'a> {
    /// The rule's batch settings; None for a rule that forwards each message on its own.
    pub(super) fn of(rule: &'a ForwardRule) -> Option<BatchSpec<'a>> {
        Some(BatchSpec {
            limits: rule.batch?,
            topic: rule.batch_topic.as_deref()?,
            encoding: rule.encoding.unwrap_or_default(),
            compress: rule.compress,
        })
    }

    /// The upstream topic: `batch_topic`, with `/zstd` or `/gzip` over MQTT 3.1.1 when
    /// compressed (MQTT 5 says it in a user property instead).
    pub(super) fn topic(&self, v5: bool) -> String {
        match self.content_encoding() {
            Some(suffix) if !v5 => format!("{}/{suffix}", self.topic),
            _ => self.topic.to_string(),
        }
    }

    pub(super) fn content_type(&self) -> &'static str {
        match self.encoding {
            BatchEncoding::JsonArray => "application/json",
            BatchEncoding::Ndjson => "application/x-ndjson",
        }
    }

    /// `zstd`, `gzip` or None (not compressed).
    pub(super) fn content_encoding(&self) -> Option<&'static str> {
        self.compress.map(|c| match c {
            Compression::Zstd => "zstd",
            Compression::Gzip => "gzip",
        })
    }
}

/// The batch being gathered: log entries `first_seq..=last_seq` that its rule forwards
/// (entries between them that this bridge passes over are not in it), encoded so far.
#[derive(Debug)]
pub(super) struct PendingBatch {
    /// Index of its rule in the bridge's `forward`.
    pub(super) rule: usize,
    pub(super) first_seq: Seq,
    pub(super) last_seq: Seq,
    pub(super) events: usize,
    /// Bytes of the events' topics and payloads (`max_bytes`).
    pub(super) input_bytes: usize,
    /// The events so far, each encoded and separated as the encoding wants.
    body: Vec<u8>,
    /// `max_ms` after its first event was read: it goes up then, full or not.
    pub(super) deadline: Instant,
}

impl PendingBatch {
    pub(super) fn new(rule: usize, spec: &BatchSpec, now: Instant) -> PendingBatch {
        PendingBatch {
            rule,
            first_seq: 0,
            last_seq: 0,
            events: 0,
            input_bytes: 0,
            body: Vec::new(),
            deadline: now + Duration::from_millis(spec.limits.max_ms),
        }
    }

    /// Whether one more event of `input` bytes (topic and payload), `encoded` long, still
    /// goes in before the batch is sent: at most `max_bytes` of input and an encoded body of
    /// at most `encoded_cap`. An empty batch takes any one event.
    pub(super) fn fits(
        &self,
        spec: &BatchSpec,
        input: usize,
        encoded: usize,
        encoded_cap: usize,
    ) -> bool {
        self.events == 0
            || (self.input_bytes + input <= spec.limits.max_bytes
                && self.body.len() + encoded + 2 <= encoded_cap)
    }

    /// Adds log entry `seq`, whose event `encoded` came from `input` bytes.
    pub(super) fn push(&mut self, spec: &BatchSpec, seq: Seq, input: usize, encoded: &[u8]) {
        if self.events == 0 {
            self.first_seq = seq;
        } else if spec.encoding == BatchEncoding::JsonArray {
            self.body.push(b',');
        }
        self.body.extend_from_slice(encoded);
        if spec.encoding == BatchEncoding::Ndjson {
            self.body.push(b'\n');
        }
        self.last_seq = seq;
        self.events += 1;
        self.input_bytes += input;
    }

    /// Full: it goes up now.
    pub(super) fn is_full(&self, spec: &BatchSpec) -> bool {
        self.events >= spec.limits.max_events || self.input_bytes >= spec.limits.max_bytes
    }

    /// The PUBLISH payload: the events in their encoding, compressed if the rule says so.
    pub(super) fn finish(self, spec: &BatchSpec) -> Result<Vec<u8>, String> {
        let body = match spec.encoding {
            BatchEncoding::JsonArray => {
                let mut array = Vec::with_capacity(self.body.len() + 2);
                array.push(b'[');
                array.extend_from_slice(&self.body);
                array.push(b']');
                array
            }
            BatchEncoding::Ndjson => self.body,
        };
        compress(body, spec.compress)
    }
}

/// `data` compressed with `how` (fastest levels: an edge gateway's CPU is small), or as is.
pub(super) fn compress(data: Vec<u8>, how: Option<Compression>) -> Result<Vec<u8>, String> {
    match how {
        None => Ok(data),
        Some(Compression::Zstd) => Ok(ruzstd::encoding::compress_to_vec(
            data.as_slice(),
            ruzstd::encoding::CompressionLevel::Fastest,
        )),
        Some(Compression::Gzip) => {
            let mut gz = flate2::write::GzEncoder::new(
                Vec::with_capacity(data.len() / 4),
                flate2::Compression::fast(),
            );
            gz.write_all(&data)
                .and_then(|_| gz.finish())
                .map_err(|e| format!("gzip: {e}"))
        }
    }
}

/// One event: `{"topic":...,"payload":<JSON>}` or `{"topic":...,"payload_base64":"..."}`.
pub(super) fn event(topic: &str, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(topic.len() + payload.len() * 4 / 3 + 40);
    out.extend_from_slice(b"{\"topic\":");
    // A String serializes infallibly into a Vec.
    let _ = serde_json::to_writer(&mut out, topic);
    if serde_json::from_slice::<serde::de::IgnoredAny>(payload).is_ok() {
        out.extend_from_slice(b",\"payload\":");
        minify_into(&mut out, payload);
    } else {
        out.extend_from_slice(b",\"payload_base64\":\"");
        let text = base64::engine::general_purpose::STANDARD.encode(payload);
        out.extend_from_slice(text.as_bytes());
        out.push(b'"');
    }
    out.push(b'}');
    out
}

/// Valid JSON `json` appended without the whitespace outside its strings: the same value,
/// byte for byte in its strings and numbers, on one line (NDJSON needs that).
fn minify_into(out: &mut Vec<u8>, json: &[u8]) {
    let (mut in_string, mut escaped) = (false, false);
    for &b in json {
        if in_string {
            out.push(b);
            if escaped {
                escaped = false;
            } else if b == b'\\' {
                escaped = true;
            } else if b == b'"' {
                in_string = false;
            }
        } else if !matches!(b, b' ' | b'\t' | b'\n' | b'\r') {
            in_string = b == b'"';
            out.push(b);
        }
    }
}

#[cfg(test)]
#[path = "batch_tests.rs"]
mod tests;
