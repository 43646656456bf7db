//! The daemon's configuration file: TOML, read with serde.
//!
//! Every key has a default so that an empty file is a valid config; unknown keys, wrong
//! types and bad addresses are errors that name the key and the line (toml's spans), and
//! `check_semantics` catches values that parse but cannot work. `config/waystation.toml`
//! is the commented reference for every key here: keep the two in step.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use waystation_broker::acl::Acl;
use waystation_broker::auth::PasswordFile;
use waystation_broker::{
    BridgeConfig, DeadLetterLimits, Limits, ListenerConfig, PipelineRule, Security, StorageLimits,
};

/// A 16 MiB payload with its topic: the store splits large records into parts written in
/// the same atomic commit, so any packet up to this is acknowledged only once durable.
pub const MAX_PACKET_SIZE_CEILING: usize = waystation_broker::MAX_PACKET_SIZE_LIMIT;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub gateway: GatewaySection,
    #[serde(default = "default_listeners", rename = "listener")]
    pub listeners: Vec<ListenerConfig>,
    #[serde(default)]
    pub limits: Limits,
    #[serde(default)]
    pub storage: StorageLimits,
    #[serde(default, rename = "bridge")]
    pub bridges: Vec<BridgeConfig>,
    /// `[[pipeline]]`: checks and deduplication before messages are logged for forwarding.
    #[serde(default)]
    pub pipeline: Vec<PipelineRule>,
    #[serde(default)]
    pub dead_letter: DeadLetterLimits,
    #[serde(default)]
    pub http: HttpSection,
    #[serde(default)]
    pub auth: AuthSection,
    #[serde(default)]
    pub acl: AclSection,
}

/// `[auth]`: who may connect. See docs/security.md for the anonymous-access rule.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthSection {
    /// A Mosquitto 2 password file (`waystation passwd` or `mosquitto_passwd` writes it).
    pub password_file: Option<PathBuf>,
    /// Unset: anonymous clients are let in only when there is no password file and every
    /// listener is on loopback. A non-loopback listener with anonymous access needs an
    /// explicit `true` (and logs a warning).
    pub allow_anonymous: Option<bool>,
}

/// `[acl]`: which topics each client may publish to and read.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AclSection {
    /// A Mosquitto-style ACL file; once set, anything it does not grant is denied.
    pub file: Option<PathBuf>,
}

/// The anonymous-access decision, for `run` to log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AnonymousPolicy {
    pub allowed: bool,
    /// Non-loopback listeners open to anonymous clients (only with an explicit `true`).
    pub exposed: Vec<SocketAddr>,
}

/// `[http]`: the observability server (`/metrics`, `/healthz`, `/api/v1/status`, dashboard).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpSection {
    /// Loopback by default, like the MQTT listener. Port 0 picks a free port (logged).
    pub bind: SocketAddr,
    /// false: no HTTP server at all.
    pub enabled: bool,
}

impl Default for HttpSection {
    fn default() -> Self {
        HttpSection {
            bind: SocketAddr::from(([127, 0, 0, 1], 8080)),
            enabled: true,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GatewaySection {
    pub id: String,
    pub data_dir: PathBuf,
    /// Seconds between `$SYS/broker/...` updates; 0 = none.
    pub sys_interval: u64,
}

impl Default for GatewaySection {
    fn default() -> Self {
        GatewaySection {
            id: "waystation".into(),
            data_dir: PathBuf::from("/var/lib/waystation"),
            sys_interval: 10,
        }
    }
}

fn default_listeners() -> Vec<ListenerConfig> {
    vec![SocketAddr::from(([127, 0, 0, 1], 1883)).into()]
}

/// A config that could not be used; the message is meant for the operator as it stands.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("invalid config file {path}: {key}: {message}")]
    Value {
        path: PathBuf,
        key: String,
        message: String,
    },
}

impl Config {
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        let config = Config::parse(&text).map_err(|message| ConfigError::Parse {
            path: path.to_owned(),
            message,
        })?;
        config
            .check_semantics()
            .map_err(|(key, message)| ConfigError::Value {
                path: path.to_owned(),
                key,
                message,
            })?;
        Ok(config)
    }

    /// Parses TOML text; the error is toml's report (line, column, the offending
    /// line and what was expected).
    pub fn parse(text: &str) -> Result<Config, String> {
        toml::from_str(text).map_err(|e| e.to_string().trim_end().to_string())
    }

    /// Reads the password and ACL files and decides anonymous access: what the broker
    /// enforces. Errors name the key, and the file and line at fault.
    pub fn security(&self, path: &Path) -> Result<(Security, AnonymousPolicy), ConfigError> {
        let value = |key: &str, message: String| ConfigError::Value {
            path: path.to_owned(),
            key: key.into(),
            message,
        };
        let anonymous = self.anonymous_policy().map_err(|(k, m)| value(&k, m))?;
        let passwords = match &self.auth.password_file {
            Some(file) => Some(std::sync::Arc::new(
                PasswordFile::load(file).map_err(|e| value("auth.password_file", e.to_string()))?,
            )),
            None => None,
        };
        let acl = match &self.acl.file {
            Some(file) => Some(std::sync::Arc::new(
                Acl::load(file).map_err(|e| value("acl.file", e.to_string()))?,
            )),
            None => None,
        };
        Ok((
            Security {
                passwords,
                allow_anonymous: anonymous.allowed,
                acl,
            },
            anonymous,
        ))
    }

    /// `allow_anonymous` unset: anonymous clients are allowed only with no password file
    /// and every listener on loopback (as Mosquitto 2's local-only mode). A listener on a
    /// non-loopback address open to anonymous clients needs an explicit `true`.
    // Hook for TLS (issue 7 part B): a listener that requires client certificates is not
    // open to anonymous clients and is exempt from this rule.
    pub fn anonymous_policy(&self) -> Result<AnonymousPolicy, (String, String)> {
        // A listener that requires client certificates is not open to anonymous clients.
        let network: Vec<SocketAddr> = self
            .listeners
            .iter()
            .filter(|l| l.tls.as_ref().is_none_or(|t| t.client_ca.is_none()))
            .map(|l| l.bind)
            .filter(|a| !a.ip().is_loopback())
            .collect();
        let has_passwords = self.auth.password_file.is_some();
        let allowed = match self.auth.allow_anonymous {
            Some(v) => v,
            None if !has_passwords && !network.is_empty() => {
                return Err((
                    "auth.allow_anonymous".into(),
                    format!(
                        "listener {} is not on loopback and no [auth] password_file is set: anyone who can reach it could connect. \
                         Set [auth] password_file, or write allow_anonymous = true to accept that",
                        network[0]
                    ),
                ));
            }
            None => !has_passwords,
        };
        let has_client_certs = self
            .listeners
            .iter()
            .any(|l| l.tls.as_ref().is_some_and(|t| t.client_ca.is_some()));
        if !allowed && !has_passwords && !has_client_certs {
            return Err((
                "auth.allow_anonymous".into(),
                "false with no [auth] password_file and no listener requiring client certificates: no client could connect".into(),
            ));
        }
        Ok(AnonymousPolicy {
            allowed,
            exposed: if allowed { network } else { Vec::new() },
        })
    }

    fn check_semantics(&self) -> Result<(), (String, String)> {
        self.check_limits().map_err(|(k, m)| (k.to_string(), m))?;
        self.anonymous_policy()?;
        for listener in &self.listeners {
            if let Some(tls) = &listener.tls {
                // Reads the files: a missing or mismatched certificate is a config error.
                waystation_broker::tls::server_config(tls).map_err(|e| {
                    (
                        "listener.tls".to_string(),
                        format!("{}: {e}", listener.bind),
                    )
                })?;
            }
        }
        let mut names = std::collections::HashSet::new();
        for bridge in &self.bridges {
            bridge.validate()?;
            if !names.insert(bridge.name.as_str()) {
                return Err((
                    "bridge.name".into(),
                    format!("{:?} is used by two bridges", bridge.name),
                ));
            }
        }
        for rule in &self.pipeline {
            rule.validate()?;
        }
        self.dead_letter.validate()?;
        if self.storage.max_bytes < 1024 {
            return Err(("storage.max_bytes".into(), "must be at least 1024".into()));
        }
        if self.storage.cache_bytes < 1 << 20 {
            return Err((
                "storage.cache_bytes".into(),
                "must be at least 1 MiB".into(),
            ));
        }
        if self.storage.max_pending_bytes < 64 << 10 {
            return Err((
                "storage.max_pending_bytes".into(),
                "must be at least 65536".into(),
            ));
        }
        Ok(())
    }

    fn check_limits(&self) -> Result<(), (&'static str, String)> {
        if self.gateway.id.is_empty() {
            return Err(("gateway.id", "must not be empty".into()));
        }
        if self.listeners.is_empty() {
            return Err(("listener", "at least one [[listener]] is needed".into()));
        }
        let l = &self.limits;
        if l.max_packet_size < 64 || l.max_packet_size > MAX_PACKET_SIZE_CEILING {
            return Err((
                "limits.max_packet_size",
                format!(
                    "{} is out of range 64..={MAX_PACKET_SIZE_CEILING} (a 16 MiB payload with its topic)",
                    l.max_packet_size
                ),
            ));
        }
        if l.max_connections == 0 {
            return Err(("limits.max_connections", "must be at least 1".into()));
        }
        if l.max_inflight == 0 {
            return Err(("limits.max_inflight", "must be at least 1".into()));
        }
        if l.connect_timeout.is_zero() {
            return Err(("limits.connect_timeout", "must be at least 1 second".into()));
        }
        if l.max_topic_length == 0 || l.max_topic_length > 65535 {
            return Err((
                "limits.max_topic_length",
                format!("{} is out of range 1..=65535", l.max_topic_length),
            ));
        }
        if l.max_topic_levels == 0 {
            return Err(("limits.max_topic_levels", "must be at least 1".into()));
        }
        if l.max_queued_bytes < 1024 {
            return Err(("limits.max_queued_bytes", "must be at least 1024".into()));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use waystation_broker::OnFull;

    #[test]
    fn empty_file_gives_defaults_on_loopback() {
        let config = Config::parse("").expect("empty config is valid");
        assert_eq!(config.listeners.len(), 1);
        assert_eq!(config.listeners[0].bind, "127.0.0.1:1883".parse().unwrap());
        assert_eq!(config.gateway.id, "waystation");
        assert!(config.check_semantics().is_ok());
    }

    #[test]
    fn shipped_default_config_parses() {
        let text = include_str!("../../config/waystation.toml");
        let config = Config::parse(text).expect("config/waystation.toml parses");
        assert!(config.check_semantics().is_ok());
        let defaults = Limits::default();
        assert_eq!(config.limits.max_packet_size, defaults.max_packet_size);
        assert_eq!(config.limits.max_inflight, defaults.max_inflight);
        assert_eq!(config.http.bind, HttpSection::default().bind);
        assert_eq!(
            config.gateway.sys_interval,
            GatewaySection::default().sys_interval
        );
    }

    #[test]
    fn http_and_sys_interval() {
        let config = Config::parse("").unwrap();
        assert_eq!(config.http.bind, "127.0.0.1:8080".parse().unwrap());
        assert!(config.http.enabled);
        assert_eq!(config.gateway.sys_interval, 10);
        let config = Config::parse(
            "[gateway]\nsys_interval = 0\n[http]\nbind = \"0.0.0.0:9100\"\nenabled = false\n",
        )
        .unwrap();
        assert_eq!(config.http.bind, "0.0.0.0:9100".parse().unwrap());
        assert!(!config.http.enabled);
        assert_eq!(config.gateway.sys_interval, 0);
        let err = Config::parse("[http]\nbind = \"nowhere\"\n").unwrap_err();
        assert!(err.contains("line 2") && err.contains("bind"), "{err}");
        let err = Config::parse("[http]\nport = 1\n").unwrap_err();
        assert!(err.contains("port"), "{err}");
    }

    #[test]
    fn anonymous_access_rule() {
        let policy = |text: &str| Config::parse(text).unwrap().anonymous_policy();
        // Loopback only, no password file: anonymous allowed (local-only mode).
        assert_eq!(
            policy("").unwrap(),
            AnonymousPolicy {
                allowed: true,
                exposed: vec![]
            }
        );
        // A password file turns anonymous access off unless asked for.
        assert!(!policy("[auth]\npassword_file = \"/p\"\n").unwrap().allowed);
        // Network listener, no password file, nothing said: refused, naming the key.
        let net = "[[listener]]\nbind = \"0.0.0.0:1883\"\n";
        let (key, msg) = policy(net).unwrap_err();
        assert_eq!(key, "auth.allow_anonymous");
        assert!(msg.contains("0.0.0.0:1883"), "{msg}");
        assert!(Config::parse(net).unwrap().check_semantics().is_err());
        // ... unless written explicitly (then `run` warns about the exposed listener).
        let open = policy(&format!("{net}[auth]\nallow_anonymous = true\n")).unwrap();
        assert_eq!(
            open,
            AnonymousPolicy {
                allowed: true,
                exposed: vec!["0.0.0.0:1883".parse().unwrap()]
            }
        );
        let closed = policy(&format!("{net}[auth]\npassword_file = \"/p\"\n")).unwrap();
        assert_eq!(
            closed,
            AnonymousPolicy {
                allowed: false,
                exposed: vec![]
            }
        );
        assert!(
            policy("[auth]\nallow_anonymous = false\n").is_err(),
            "nobody could connect"
        );
    }

    #[test]
    fn security_files_errors_name_file_and_line() {
        let dir = tempfile::tempdir().unwrap();
        let pw = dir.path().join("pw");
        std::fs::write(&pw, "alice:plain\n").unwrap();
        let cfg = dir.path().join("c.toml");
        let config =
            Config::parse(&format!("[auth]\npassword_file = \"{}\"\n", pw.display())).unwrap();
        let err = config.security(&cfg).unwrap_err().to_string();
        assert!(
            err.contains("auth.password_file")
                && err.contains("line 1")
                && err.contains(&pw.display().to_string()),
            "{err}"
        );
        let acl = dir.path().join("acl");
        std::fs::write(&acl, "user a\ntopic sometimes x\ntopic read a/#/b\n").unwrap();
        let config = Config::parse(&format!("[acl]\nfile = \"{}\"\n", acl.display())).unwrap();
        let err = config.security(&cfg).unwrap_err().to_string();
        assert!(err.contains("acl.file") && err.contains("line 3"), "{err}");
    }

    #[test]
    fn tls_listener_parses_and_its_files_are_checked() {
        let text = "[[listener]]\nbind = \"127.0.0.1:8883\"\ntls = { cert = \"/nonexistent/c.pem\", key = \"/nonexistent/k.pem\", client_ca = \"/nonexistent/ca.pem\", use_identity_as_username = true }\n";
        let config = Config::parse(text).unwrap();
        let tls = config.listeners[0].tls.as_ref().unwrap();
        assert_eq!(
            tls.client_ca.as_deref(),
            Some(Path::new("/nonexistent/ca.pem"))
        );
        assert!(tls.use_identity_as_username);
        let (key, message) = config.check_semantics().unwrap_err();
        assert_eq!(key, "listener.tls");
        assert!(message.contains("/nonexistent/"), "{message}");
        let err = Config::parse(&text.replace("client_ca", "ca")).unwrap_err();
        assert!(err.contains("ca") && err.contains("line 3"), "{err}");
        // A listener that requires client certificates is not open to anonymous clients.
        let network = text.replace("127.0.0.1", "0.0.0.0");
        assert!(Config::parse(&network)
            .unwrap()
            .anonymous_policy()
            .unwrap()
            .exposed
            .is_empty());
    }

    #[test]
    fn bridge_tls_and_password_sources() {
        let base = "[[bridge]]\nname = \"cloud\"\naddress = \"example.com:8883\"\n";
        let config = Config::parse(&format!("{base}tls = true\n")).unwrap();
        assert_eq!(config.bridges[0].tls, Some(Default::default()));
        assert_eq!(
            Config::parse(&format!("{base}tls = false\n"))
                .unwrap()
                .bridges[0]
                .tls,
            None
        );
        let config = Config::parse(&format!(
            "{base}tls = {{ ca_file = \"/ca.pem\", cert = \"/c.pem\", key = \"/k.pem\" }}\n"
        ))
        .unwrap();
        let tls = config.bridges[0].tls.clone().unwrap();
        assert_eq!(tls.ca_file.as_deref(), Some(Path::new("/ca.pem")));
        assert_eq!(tls.key.as_deref(), Some(Path::new("/k.pem")));
        let (key, _) = config.check_semantics().unwrap_err();
        assert_eq!(key, "bridge[cloud].tls");
        let err = Config::parse(&format!("{base}tls = {{ cafile = \"/ca.pem\" }}\n")).unwrap_err();
        assert!(err.contains("cafile") && err.contains("line 4"), "{err}");
        let err = Config::parse(&format!("{base}tls = 3\n")).unwrap_err();
        assert!(err.contains("line 4"), "{err}");
        let half = Config::parse(&format!(
            "{base}tls = {{ ca_file = \"/ca.pem\", cert = \"/c.pem\" }}\n"
        ))
        .unwrap();
        assert_eq!(half.check_semantics().unwrap_err().0, "bridge[cloud].tls");

        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("upstream.pw");
        std::fs::write(&file, "s3cret-from-file\n").unwrap();
        let config = Config::parse(&format!(
            "{base}username = \"u\"\npassword_file = \"{}\"\n",
            file.display()
        ))
        .unwrap();
        assert!(config.check_semantics().is_ok());
        assert_eq!(
            config.bridges[0].password().unwrap().unwrap().expose(),
            "s3cret-from-file"
        );
        let missing = Config::parse(&format!(
            "{base}username = \"u\"\npassword_file = \"/nonexistent/pw\"\n"
        ))
        .unwrap();
        assert_eq!(
            missing.check_semantics().unwrap_err().0,
            "bridge[cloud].password_file"
        );
        std::env::set_var("WAYSTATION_TEST_BRIDGE_PW", "s3cret-from-env");
        let config = Config::parse(&format!(
            "{base}username = \"u\"\npassword_env = \"WAYSTATION_TEST_BRIDGE_PW\"\n"
        ))
        .unwrap();
        assert!(config.check_semantics().is_ok());
        assert_eq!(
            config.bridges[0].password().unwrap().unwrap().expose(),
            "s3cret-from-env"
        );
        let unset = Config::parse(&format!(
            "{base}username = \"u\"\npassword_env = \"WAYSTATION_TEST_UNSET_VARIABLE\"\n"
        ))
        .unwrap();
        assert_eq!(
            unset.check_semantics().unwrap_err().0,
            "bridge[cloud].password_env"
        );
        let two = Config::parse(&format!(
            "{base}username = \"u\"\npassword = \"a\"\npassword_env = \"X\"\n"
        ))
        .unwrap();
        assert_eq!(
            two.check_semantics().unwrap_err().0,
            "bridge[cloud].password"
        );
        let no_user = Config::parse(&format!("{base}password = \"a\"\n")).unwrap();
        assert_eq!(
            no_user.check_semantics().unwrap_err().0,
            "bridge[cloud].username"
        );
    }

    #[test]
    fn bridge_password_never_printed() {
        let text = "[[bridge]]\nname = \"cloud\"\naddress = \"h:1\"\nusername = \"u\"\npassword = \"hunter2-secret\"\n";
        let config = Config::parse(text).unwrap();
        assert_eq!(
            config.bridges[0].password().unwrap().unwrap().expose(),
            "hunter2-secret"
        );
        let printed = format!(
            "{config:?} {:#?} {}",
            config.bridges[0],
            config.bridges[0].password.as_ref().unwrap()
        );
        assert!(!printed.contains("hunter2"), "{printed}");
        assert!(printed.contains("***"), "{printed}");
    }

    #[test]
    fn unknown_key_is_named_with_its_line() {
        let err = Config::parse("[gateway]\nid = \"a\"\nbogus = 1\n").unwrap_err();
        assert!(err.contains("bogus"), "{err}");
        assert!(err.contains("line 3"), "{err}");
    }

    #[test]
    fn wrong_type_and_bad_address_are_named() {
        let err = Config::parse("[limits]\nmax_inflight = \"many\"\n").unwrap_err();
        assert!(
            err.contains("line 2") && err.contains("max_inflight"),
            "{err}"
        );
        let err = Config::parse("[[listener]]\nbind = \"localhost:99999\"\n").unwrap_err();
        assert!(err.contains("line 2") && err.contains("bind"), "{err}");
    }

    #[test]
    fn oversized_packet_limit_is_refused() {
        let config = Config::parse("[limits]\nmax_packet_size = 20000000\n").unwrap();
        let (key, _) = config.check_semantics().unwrap_err();
        assert_eq!(key, "limits.max_packet_size");
    }

    #[test]
    fn pipeline_rules_parse_and_are_checked() {
        // The shipped example, uncommented.
        let shipped = include_str!("../../config/waystation.toml");
        let example: String = shipped
            .lines()
            .skip_while(|l| !l.starts_with("# [[pipeline]]"))
            .take_while(|l| l.starts_with('#'))
            .filter(|l| !l.starts_with("#  "))
            .map(|l| l.trim_start_matches("# "))
            .collect::<Vec<_>>()
            .join("\n");
        let config = Config::parse(&example).expect("the [[pipeline]] example parses");
        assert!(config.check_semantics().is_ok());
        assert_eq!(config.pipeline.len(), 1);
        assert_eq!(config.pipeline[0].topics, "sensors/+/events");
        let pointers =
            "[[pipeline]]\ntopics = \"plant/#\"\ndedup = { device = \"/src\", seq = \"/n\" }\n";
        let config = Config::parse(pointers).expect("pointers parse");
        assert_eq!(
            config.pipeline[0].dedup.as_ref().map(|d| d.pointers()),
            Some(("/src", None, "/n"))
        );
        let key = |text: &str| {
            Config::parse(text)
                .unwrap()
                .check_semantics()
                .unwrap_err()
                .0
        };
        assert_eq!(
            key("[[pipeline]]\ntopics = \"a/#/b\"\nvalidate = \"event-v1\"\n"),
            "pipeline.topics"
        );
        assert_eq!(
            key("[[pipeline]]\ntopics = \"a/b\"\n"),
            "pipeline[a/b].validate"
        );
        assert_eq!(
            key("[[pipeline]]\ntopics = \"a\"\ndedup = { device = \"src\", seq = \"/n\" }\n"),
            "pipeline[a].dedup.device"
        );
        assert_eq!(
            key("[dead_letter]\nmax_bytes = 10\n"),
            "dead_letter.max_bytes"
        );
        let err =
            Config::parse("[[pipeline]]\ntopics = \"a\"\nvalidate = \"event-v2\"\n").unwrap_err();
        assert!(err.contains("event-v2") && err.contains("line 3"), "{err}");
    }

    #[test]
    fn bridges_parse_and_are_checked() {
        let text = r#"
[storage]
max_bytes = 1000000
on_full = "drop_oldest"

[[bridge]]
name = "cloud"
address = "127.0.0.1:1884"
max_rate = 500
[[bridge.forward]]
local = "sensors/#"
remote_prefix = "site1/"
[[bridge.subscribe]]
remote = "site1/commands/#"
local_prefix = "cloud/"
"#;
        let config = Config::parse(text).expect("valid");
        assert!(config.check_semantics().is_ok());
        assert_eq!(config.bridges[0].forward[0].qos, 1);
        assert_eq!(config.storage.on_full, OnFull::DropOldest);
        let bad = text.replace("sensors/#", "sensors/#/x");
        let (key, _) = Config::parse(&bad).unwrap().check_semantics().unwrap_err();
        assert_eq!(key, "bridge[cloud].forward.local");
        let err = Config::parse(&text.replace("drop_oldest", "sometimes")).unwrap_err();
        assert!(err.contains("on_full") && err.contains("line 4"), "{err}");
        let err = Config::parse(&text.replace("max_rate", "max_rat")).unwrap_err();
        assert!(err.contains("max_rat") && err.contains("line 9"), "{err}");
    }

    #[test]
    fn bridge_batch_keys_parse_and_are_checked() {
        use waystation_broker::config::bridge::{BatchEncoding, Compression};
        let text = r#"
[[bridge]]
name = "cloud"
address = "127.0.0.1:1884"
[[bridge.forward]]
local = "sensors/#"
batch = { max_events = 50 }
batch_topic = "site1/events/batch"
encoding = "ndjson"
compress = "zstd"
"#;
        let config = Config::parse(text).expect("valid");
        assert!(config.check_semantics().is_ok());
        let rule = &config.bridges[0].forward[0];
        let batch = rule.batch.expect("batch");
        assert_eq!(
            (batch.max_events, batch.max_ms, batch.max_bytes),
            (50, 1000, 256 * 1024)
        );
        assert_eq!(rule.encoding, Some(BatchEncoding::Ndjson));
        assert_eq!(rule.compress, Some(Compression::Zstd));
        let key = |text: &str| {
            Config::parse(text)
                .unwrap()
                .check_semantics()
                .unwrap_err()
                .0
        };
        let no_batch = text.replace("batch = { max_events = 50 }\n", "");
        assert_eq!(key(&no_batch), "bridge[cloud].forward.batch_topic");
        let compress_only = no_batch.replace("batch_topic = \"site1/events/batch\"\n", "");
        assert_eq!(key(&compress_only), "bridge[cloud].forward.encoding");
        let compress_only = compress_only.replace("encoding = \"ndjson\"\n", "");
        assert_eq!(key(&compress_only), "bridge[cloud].forward.compress");
        let no_topic = text.replace("batch_topic = \"site1/events/batch\"\n", "");
        assert_eq!(key(&no_topic), "bridge[cloud].forward.batch_topic");
        let too_many = text.replace("max_events = 50", "max_events = 101");
        assert_eq!(key(&too_many), "bridge[cloud].forward.batch.max_events");
        let wildcard = text.replace("site1/events/batch", "site1/+");
        assert_eq!(key(&wildcard), "bridge[cloud].forward.batch_topic");
        for (from, to, named) in [
            (
                "max_events = 50",
                "max_events = 50, max_size = 1",
                "max_size",
            ),
            ("\"ndjson\"", "\"csv\"", "csv"),
            ("\"zstd\"", "\"lz4\"", "lz4"),
        ] {
            let err = Config::parse(&text.replace(from, to)).unwrap_err();
            assert!(err.contains(named), "{to}: {err}");
        }
    }
}
