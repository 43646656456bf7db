//! `[[pipeline]]` and `[dead_letter]` of the config file: what is checked and deduplicated
//! before a message is logged for forwarding, and where refused messages are kept.
//! Deserialized here and checked by [`PipelineRule::validate`] / [`DeadLetterLimits::validate`],
//! whose errors name the key at fault. What the stages do is `crate::pipeline`'s doc.

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use crate::topic::valid_filter;

fn default_dedup_devices() -> usize {
    10_000
}

/// `[[pipeline]]`: the ingest stages for messages on `topics` that a bridge forwards.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PipelineRule {
    /// A topic filter (`+` and `#` allowed).
    pub topics: String,
    /// `"event-v1"` (the firmware's event schema, docs/event-schema.md) or
    /// `{ json_schema = "file" }`. Unset: no check.
    #[serde(default)]
    pub validate: Option<Validation>,
    /// What identifies an event, so a resend is forwarded once. Unset: no deduplication.
    #[serde(default)]
    pub dedup: Option<DedupKey>,
    /// Devices whose recent event numbers are remembered (the least recently heard is
    /// forgotten first).
    #[serde(default = "default_dedup_devices")]
    pub dedup_devices: usize,
}

/// The `topics` of the rules no bridge's `forward` filter can reach: the pipeline runs only on
/// what a bridge forwards, so such a rule does nothing (a typo, most likely). Warned about
/// at start and by `check-config`.
pub fn unreachable_rules<'a>(
    rules: &'a [PipelineRule],
    bridges: &[crate::config::BridgeConfig],
) -> Vec<&'a str> {
    rules
        .iter()
        .filter(|rule| {
            !bridges
                .iter()
                .flat_map(|b| &b.forward)
                .any(|f| crate::topic::filters_overlap(&rule.topics, &f.local))
        })
        .map(|rule| rule.topics.as_str())
        .collect()
}

/// How a rule checks a payload.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(untagged)]
pub enum Validation {
    Preset(Schema),
    /// A JSON Schema document (draft 4 to 2020-12, as its `$schema` says; 2020-12 if it
    /// says none), read and compiled at start. Only local references resolve.
    JsonSchema {
        json_schema: PathBuf,
    },
}

impl Validation {
    /// Reads and compiles a `json_schema` file; the error names the file and the fault.
    pub fn compile(path: &std::path::Path) -> Result<jsonschema::Validator, String> {
        let text = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
        let schema: serde_json::Value = serde_json::from_slice(&text)
            .map_err(|e| format!("{}: not JSON: {e}", path.display()))?;
        jsonschema::validator_for(&schema)
            .map_err(|e| format!("{}: not a usable JSON Schema: {e}", path.display()))
    }
}

/// A built-in schema.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum Schema {
    #[serde(rename = "event-v1")]
    EventV1,
}

/// Where an event's identity is: `"event-v1"` (`device`, `boot`, `seq`) or JSON pointers to
/// the same three parts of another format (`boot` optional).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(untagged)]
pub enum DedupKey {
    Preset(Schema),
    Pointers {
        device: String,
        #[serde(default)]
        boot: Option<String>,
        seq: String,
    },
}

impl DedupKey {
    /// The JSON pointers to (device, boot, seq).
    pub fn pointers(&self) -> (&str, Option<&str>, &str) {
        match self {
            DedupKey::Preset(Schema::EventV1) => ("/device", Some("/boot"), "/seq"),
            DedupKey::Pointers { device, boot, seq } => (device, boot.as_deref(), seq),
        }
    }
}

impl PipelineRule {
    /// Checks what serde cannot; the error names the key.
    pub fn validate(&self) -> Result<(), (String, String)> {
        if !valid_filter(&self.topics) {
            return Err((
                "pipeline.topics".into(),
                format!("{:?} is not a valid topic filter", self.topics),
            ));
        }
        let key = |k: &str| format!("pipeline[{}].{k}", self.topics);
        if self.validate.is_none() && self.dedup.is_none() {
            return Err((
                key("validate"),
                "a pipeline rule needs `validate` or `dedup` (or both)".into(),
            ));
        }
        if let Some(DedupKey::Pointers { device, boot, seq }) = &self.dedup {
            for (name, pointer) in [
                ("device", Some(device)),
                ("boot", boot.as_ref()),
                ("seq", Some(seq)),
            ] {
                if let Some(p) = pointer {
                    if !(p.is_empty() || p.starts_with('/')) {
                        return Err((
                            key(&format!("dedup.{name}")),
                            format!("{p:?} is not a JSON pointer (\"\" or starting with /)"),
                        ));
                    }
                }
            }
        }
        if let Some(Validation::JsonSchema { json_schema }) = &self.validate {
            Validation::compile(json_schema).map_err(|e| (key("validate.json_schema"), e))?;
        }
        if !(1..=1_000_000).contains(&self.dedup_devices) {
            return Err((key("dedup_devices"), "must be 1 to 1000000".into()));
        }
        Ok(())
    }
}

/// `[dead_letter]`: bounds of the store of refused messages (unset keys keep their defaults).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DeadLetterLimits {
    /// Bytes of dead letters kept (topic, payload and reason); the oldest go first.
    pub max_bytes: u64,
    /// Dead letters older than this are deleted; `None` keeps them until `max_bytes`
    /// (seconds in the config file, 0 for forever).
    #[serde(deserialize_with = "super::seconds_or_forever")]
    pub max_age: Option<Duration>,
}

impl Default for DeadLetterLimits {
    fn default() -> Self {
        DeadLetterLimits {
            max_bytes: 16 << 20,
            max_age: Some(Duration::from_secs(7 * 24 * 3600)),
        }
    }
}

impl DeadLetterLimits {
    pub fn validate(&self) -> Result<(), (String, String)> {
        if self.max_bytes < 4096 {
            return Err((
                "dead_letter.max_bytes".into(),
                "must be at least 4096".into(),
            ));
        }
        Ok(())
    }
}
