//! Authorisation: which topics a client may publish to and read, from a Mosquitto-style
//! ACL file.
//!
//! ```text
//! # Lines before any `user` line apply to anonymous clients.
//! topic read public/#
//!
//! user alice
//! topic readwrite alice/#
//! topic deny alice/secret/#
//!
//! # `pattern` lines apply to every client, wherever they are written:
//! # %c is the client id, %u the user name.
//! pattern write sensors/%c/#
//! pattern read commands/%c/#
//! ```
//!
//! - `topic [read|write|readwrite|deny] <filter>`: the access word may be left out
//!   (`readwrite`, as Mosquitto). The filter is the rest of the line (it may hold spaces).
//! - `deny` wins over any grant; nothing is allowed that no rule grants (default deny).
//! - A client id or user name holding `/`, `+`, `#` or NUL does not get the grants of a
//!   pattern that substitutes it (it could otherwise reach another client's topics or a
//!   wildcard); `deny` patterns are still applied. A `%u` pattern does not apply to an
//!   anonymous client.
//! - PUBLISH (and a will) needs `write` on its topic. SUBSCRIBE is granted when some
//!   `read` rule could match a topic of the filter and no `deny` rule covers all of it;
//!   each message delivered to the client (live or retained) is then checked for `read`
//!   on its own topic, so `#` subscribed by a client that may read `sensors/%c/#` only
//!   receives its own sensors.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use crate::topic::{filter_matches, valid_filter};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    Read,
    Write,
    ReadWrite,
    Deny,
}

impl Access {
    fn reads(self) -> bool {
        matches!(self, Access::Read | Access::ReadWrite)
    }
    fn writes(self) -> bool {
        matches!(self, Access::Write | Access::ReadWrite)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Rule {
    access: Access,
    filter: String,
}

/// A parsed ACL file.
#[derive(Debug, Clone, Default)]
pub struct Acl {
    anonymous: Vec<Rule>,
    users: HashMap<String, Vec<Rule>>,
    patterns: Vec<Rule>,
}

/// An ACL file that could not be used: names the file and the line.
#[derive(Debug, thiserror::Error)]
pub enum AclError {
    #[error("cannot read ACL file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("ACL file {path}, line {line}: {message}")]
    Line {
        path: PathBuf,
        line: usize,
        message: String,
    },
}

/// The rules that apply to one connected client, patterns already substituted.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClientAcl {
    rules: Vec<Rule>,
}

impl Acl {
    pub fn load(path: &Path) -> Result<Acl, AclError> {
        let text = std::fs::read_to_string(path).map_err(|source| AclError::Read {
            path: path.to_owned(),
            source,
        })?;
        Acl::parse(&text).map_err(|(line, message)| AclError::Line {
            path: path.to_owned(),
            line,
            message,
        })
    }

    /// Parses ACL text; the error is (line number, reason).
    pub fn parse(text: &str) -> Result<Acl, (usize, String)> {
        let mut acl = Acl::default();
        let mut user: Option<String> = None;
        for (i, raw) in text.lines().enumerate() {
            let line = raw.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let err = |m: String| (i + 1, m);
            let (keyword, rest) = line
                .split_once(char::is_whitespace)
                .map_or((line, ""), |(k, r)| (k, r.trim()));
            match keyword {
                "user" => {
                    if rest.is_empty() {
                        return Err(err("`user` needs a user name".into()));
                    }
                    acl.users.entry(rest.to_string()).or_default();
                    user = Some(rest.to_string());
                }
                "topic" | "pattern" => {
                    let (access, filter) = match rest
                        .split_once(char::is_whitespace)
                        .and_then(|(w, f)| Some((parse_access(w)?, f.trim())))
                    {
                        Some(pair) => pair,
                        None if parse_access(rest).is_some() => {
                            return Err(err(format!("`{keyword}` needs a topic filter")))
                        }
                        None => (Access::ReadWrite, rest),
                    };
                    if filter.is_empty() {
                        return Err(err(format!("`{keyword}` needs a topic filter")));
                    }
                    let check = if keyword == "pattern" {
                        filter.replace("%c", "x").replace("%u", "x")
                    } else {
                        filter.to_string()
                    };
                    if !valid_filter(&check) {
                        return Err(err(format!("{filter:?} is not a valid topic filter")));
                    }
                    let rule = Rule {
                        access,
                        filter: filter.to_string(),
                    };
                    if keyword == "pattern" {
                        acl.patterns.push(rule);
                    } else {
                        match &user {
                            Some(u) => acl.users.entry(u.clone()).or_default().push(rule),
                            None => acl.anonymous.push(rule),
                        }
                    }
                }
                other => {
                    return Err(err(format!(
                        "unknown keyword {other:?} (expected user, topic or pattern)"
                    )))
                }
            }
        }
        Ok(acl)
    }

    /// The rules for a client: its user's `topic` rules (the anonymous ones when it has no
    /// user name) and every pattern, substituted.
    pub fn for_client(&self, client_id: &str, username: Option<&str>) -> ClientAcl {
        let mut rules = match username {
            Some(u) => self.users.get(u).cloned().unwrap_or_default(),
            None => self.anonymous.clone(),
        };
        let unsafe_value = |v: &str| v.contains(['/', '+', '#', '\0']);
        for p in &self.patterns {
            let uses_c = p.filter.contains("%c");
            let uses_u = p.filter.contains("%u");
            if uses_u && username.is_none() {
                continue;
            }
            let user = username.unwrap_or("");
            let risky = (uses_c && unsafe_value(client_id)) || (uses_u && unsafe_value(user));
            if risky && p.access != Access::Deny {
                continue;
            }
            let mut filter = p.filter.replace("%c", client_id).replace("%u", user);
            if risky && !valid_filter(&filter) {
                // A deny that no longer parses as a filter: deny everything rather than nothing.
                filter = "#".into();
            }
            rules.push(Rule {
                access: p.access,
                filter,
            });
        }
        ClientAcl { rules }
    }
}

fn parse_access(word: &str) -> Option<Access> {
    match word {
        "read" => Some(Access::Read),
        "write" => Some(Access::Write),
        "readwrite" => Some(Access::ReadWrite),
        "deny" => Some(Access::Deny),
        _ => None,
    }
}

impl ClientAcl {
    fn allows(&self, topic: &str, grants: impl Fn(Access) -> bool) -> bool {
        let mut granted = false;
        for r in &self.rules {
            if filter_matches(&r.filter, topic) {
                if r.access == Access::Deny {
                    return false;
                }
                granted |= grants(r.access);
            }
        }
        granted
    }

    /// PUBLISH (or a will) to `topic`.
    pub fn may_publish(&self, topic: &str) -> bool {
        self.allows(topic, Access::writes)
    }

    /// Receiving a message published to `topic`.
    pub fn may_read(&self, topic: &str) -> bool {
        self.allows(topic, Access::reads)
    }

    /// SUBSCRIBE to `filter`: some readable topic could match it and no deny covers it all.
    pub fn may_subscribe(&self, filter: &str) -> bool {
        let mut granted = false;
        for r in &self.rules {
            if r.access == Access::Deny {
                if covers(&r.filter, filter) {
                    return false;
                }
            } else if r.access.reads() && intersects(&r.filter, filter) {
                granted = true;
            }
        }
        granted
    }
}

fn starts_wild(filter: &str) -> bool {
    filter.starts_with('+') || filter.starts_with('#')
}

/// Whether some topic name matches both filters.
pub fn intersects(a: &str, b: &str) -> bool {
    // A `$` topic is never matched by a filter starting with a wildcard.
    if (a.starts_with('$') && starts_wild(b)) || (b.starts_with('$') && starts_wild(a)) {
        return false;
    }
    let (a, b): (Vec<&str>, Vec<&str>) = (a.split('/').collect(), b.split('/').collect());
    fn go(a: &[&str], b: &[&str]) -> bool {
        match (a.first(), b.first()) {
            (Some(&"#"), _) | (_, Some(&"#")) => true,
            (None, None) => true,
            (None, _) | (_, None) => false,
            (Some(x), Some(y)) => (*x == "+" || *y == "+" || x == y) && go(&a[1..], &b[1..]),
        }
    }
    go(&a, &b)
}

/// Whether every topic name matching `inner` also matches `outer`.
pub fn covers(outer: &str, inner: &str) -> bool {
    if starts_wild(outer) && inner.starts_with('$') {
        return false;
    }
    let (o, i): (Vec<&str>, Vec<&str>) = (outer.split('/').collect(), inner.split('/').collect());
    fn go(o: &[&str], i: &[&str]) -> bool {
        match (o.first(), i.first()) {
            (Some(&"#"), _) => true,
            (None, None) => true,
            (None, Some(_)) | (Some(_), None) => false,
            (Some(&"+"), Some(y)) => *y != "#" && go(&o[1..], &i[1..]),
            (Some(x), Some(y)) => *y != "#" && *y != "+" && x == y && go(&o[1..], &i[1..]),
        }
    }
    go(&o, &i)
}

#[cfg(test)]
mod tests {
    use super::*;

    const FILE: &str = "\
# anonymous
topic read public/#

user alice
topic readwrite alice/#
topic deny alice/secret/#
topic factory/line 1/status

user bob
topic write bob/out

pattern write sensors/%c/#
pattern read commands/%u/#
";

    #[test]
    fn anonymous_rules_come_before_any_user() {
        let acl = Acl::parse(FILE).unwrap();
        let anon = acl.for_client("dev1", None);
        assert!(anon.may_read("public/x"));
        assert!(!anon.may_publish("public/x"));
        assert!(!anon.may_read("alice/x"));
        // Patterns apply to anonymous clients too, but not those with %u.
        assert!(anon.may_publish("sensors/dev1/t"));
        assert!(!anon.may_read("commands/dev1/x"));
    }

    #[test]
    fn user_rules_deny_wins_and_default_deny() {
        let acl = Acl::parse(FILE).unwrap();
        let alice = acl.for_client("a1", Some("alice"));
        assert!(alice.may_publish("alice/x") && alice.may_read("alice/x/y"));
        assert!(!alice.may_publish("alice/secret/k") && !alice.may_read("alice/secret/k"));
        assert!(
            alice.may_publish("factory/line 1/status"),
            "no access word: readwrite, spaces kept"
        );
        assert!(
            !alice.may_read("public/x"),
            "anonymous rules are not alice's"
        );
        assert!(!alice.may_publish("bob/out"));
        let bob = acl.for_client("b1", Some("bob"));
        assert!(bob.may_publish("bob/out") && !bob.may_read("bob/out"));
        assert!(bob.may_read("commands/bob/reboot") && !bob.may_read("commands/alice/reboot"));
        assert!(bob.may_publish("sensors/b1/temp") && !bob.may_publish("sensors/b2/temp"));
        let stranger = acl.for_client("s", Some("mallory"));
        assert!(!stranger.may_read("public/x") && !stranger.may_publish("mallory/x"));
    }

    #[test]
    fn subscribe_needs_some_read_and_no_covering_deny() {
        let acl = Acl::parse(FILE).unwrap();
        let alice = acl.for_client("a1", Some("alice"));
        assert!(alice.may_subscribe("alice/#"));
        assert!(
            alice.may_subscribe("#"),
            "intersects alice/#; deliveries are checked per topic"
        );
        assert!(alice.may_subscribe("+/x"));
        assert!(!alice.may_subscribe("alice/secret/#"));
        assert!(!alice.may_subscribe("alice/secret/+/z"));
        assert!(!alice.may_subscribe("bob/#"));
        assert!(!alice.may_subscribe("$SYS/#"));
        let bob = acl.for_client("b1", Some("bob"));
        assert!(!bob.may_subscribe("bob/out"), "write only");
    }

    #[test]
    fn unsafe_ids_get_no_pattern_grants() {
        let acl = Acl::parse(
            "pattern write sensors/%c/#\npattern deny private/%c/#\ntopic read private/#\n",
        )
        .unwrap();
        for id in ["a/b", "+", "#", "x+y"] {
            let c = acl.for_client(id, None);
            assert!(!c.may_publish("sensors/a/b/t"), "{id}");
            assert!(
                !c.may_publish(&format!("sensors/{id}/t").replace(['+', '#'], "q")),
                "{id}"
            );
        }
        // The deny pattern still applies (here as deny-all since "private/#/#" is not a filter).
        assert!(!acl.for_client("#", None).may_read("private/z"));
        assert!(!acl.for_client("a/b", None).may_read("private/a/b/z"));
        assert!(acl.for_client("a/b", None).may_read("private/other"));
    }

    #[test]
    fn filter_set_relations() {
        assert!(intersects("a/+", "+/b"));
        assert!(intersects("a/#", "a"));
        assert!(!intersects("a/b", "a/c"));
        assert!(!intersects("a/b/c", "a/b"));
        assert!(!intersects("#", "$SYS/x"));
        assert!(intersects("$SYS/#", "$SYS/+"));
        assert!(covers("a/#", "a/b/+"));
        assert!(covers("a/#", "a"));
        assert!(covers("+/b", "x/b"));
        assert!(!covers("a/+", "a/#"));
        assert!(!covers("a/b", "a/+"));
        assert!(!covers("#", "$SYS/#"));
    }

    #[test]
    fn parse_errors_name_the_line() {
        assert_eq!(Acl::parse("user a\ntopic read a/#/b\n").unwrap_err().0, 2);
        assert_eq!(Acl::parse("\n\nallow all\n").unwrap_err().0, 3);
        assert_eq!(Acl::parse("user\n").unwrap_err().0, 1);
        assert_eq!(Acl::parse("topic read\n").unwrap_err().0, 1);
        assert_eq!(Acl::parse("topic\n").unwrap_err().0, 1);
        assert!(Acl::parse("pattern readwrite x/%c/%u/#\n").is_ok());
    }
}
