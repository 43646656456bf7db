//! Topic names, topic filters, and the subscription table.
//!
//! The table is a trie over topic levels, so routing a message costs the depth of its topic
//! rather than the number of subscriptions. `$`-topics (like `$SYS/...`) are never matched
//! by a filter that starts with a wildcard [MQTT-4.7.2-1].

use std::borrow::Borrow;
use std::fmt;
use std::hash::{Hash, Hasher};
use std::sync::Arc;

use crate::protocol::message::SubscriptionOptions;
use crate::small_map::SmallMap;

/// A topic a client may publish to: non-empty, no wildcards, no NUL [MQTT-3.3.2-2], [MQTT-4.7.3-1], [MQTT-4.7.3-2].
pub fn valid_topic_name(topic: &str) -> bool {
    !topic.is_empty() && !topic.contains(['+', '#', '\0'])
}

/// A filter a client may subscribe to [MQTT-4.7.1-2], [MQTT-4.7.1-3], [MQTT-4.7.3-1].
pub fn valid_filter(filter: &str) -> bool {
    if filter.is_empty() || filter.contains('\0') {
        return false;
    }
    let levels: Vec<&str> = filter.split('/').collect();
    for (i, level) in levels.iter().enumerate() {
        if level.contains('#') && (*level != "#" || i + 1 != levels.len()) {
            return false;
        }
        if level.contains('+') && *level != "+" {
            return false;
        }
    }
    true
}

/// `$share/{group}/{filter}` split into its group and filter; `None` when it is not a
/// valid shared subscription (empty group, wildcards in the group, no or an invalid filter).
pub fn parse_shared(filter: &str) -> Option<(&str, &str)> {
    let rest = filter.strip_prefix("$share/")?;
    let (group, inner) = rest.split_once('/')?;
    let group_ok = !group.is_empty() && !group.contains(['+', '#']);
    (group_ok && !inner.is_empty() && valid_filter(inner)).then_some((group, inner))
}

/// Whether `filter` matches the topic name `topic` (both assumed valid).
pub fn filter_matches(filter: &str, topic: &str) -> bool {
    if topic.starts_with('$') && (filter.starts_with('+') || filter.starts_with('#')) {
        return false;
    }
    // Levels as bytes: `str::split('/')` sets up a character search per level, which costs
    // more than the short levels of a topic take to scan (this runs for every PUBLISH, once
    // per bridge filter and pipeline rule).
    let mut topic_levels = topic.as_bytes().split(|b| *b == b'/');
    for f in filter.as_bytes().split(|b| *b == b'/') {
        if f == b"#" {
            return true;
        }
        match topic_levels.next() {
            Some(t) if f == b"+" || f == t => {}
            _ => return false,
        }
    }
    topic_levels.next().is_none()
}

/// Whether some topic name matches both filters (both assumed valid): level by level, `#`
/// matches whatever is left and `+` any one level. Used to find a `[[pipeline]]` rule that
/// no bridge's `forward` could ever reach.
pub fn filters_overlap(a: &str, b: &str) -> bool {
    // A `$` topic is matched only by a filter that names its first level.
    let dollar = |f: &str| f.starts_with('$');
    let wild_first = |f: &str| f.starts_with('+') || f.starts_with('#');
    if (dollar(a) && wild_first(b)) || (dollar(b) && wild_first(a)) {
        return false;
    }
    let (mut a_levels, mut b_levels) = (a.split('/'), b.split('/'));
    loop {
        match (a_levels.next(), b_levels.next()) {
            (Some("#"), _) | (_, Some("#")) => return true,
            (None, None) => return true,
            (Some(x), Some(y)) if x == "+" || y == "+" || x == y => {}
            _ => return false,
        }
    }
}

/// The client key the table stores; sessions are keyed by client id.
pub type ClientKey = Arc<str>;

/// The name of one level of a subscription's filter: the key of a node's `children`.
///
/// A name is an entry of its parent's map, and most are short (`devices`, a device id,
/// `cmd`): as a `Box<str>` each was its own heap allocation (a 32-byte chunk even for
/// `cmd`), two of them for a device subscribed to its own `devices/<id>/cmd` (issue 14: the
/// memory of an idle subscribed client). Names of up to [`LevelName::INLINE`] bytes are kept
/// in the entry itself, longer ones in a `Box<str>`; either way 24 bytes.
///
/// It is looked up by `&str` (the map becomes a `HashMap` past a few entries): `Borrow<str>`,
/// `Eq` and `Hash` are those of the `str` it holds, whichever way it holds it.
#[derive(Clone)]
enum LevelName {
    /// `bytes[..len]`, valid UTF-8 (copied from a `str`); the rest is zeros.
    Inline {
        len: u8,
        bytes: [u8; LevelName::INLINE],
    },
    /// Longer than [`LevelName::INLINE`] bytes.
    Heap(Box<str>),
}

// One byte of tag, the length and 22 bytes inline: as big as a `Box<str>` and a tag.
const _: () = assert!(std::mem::size_of::<LevelName>() == 24);

impl LevelName {
    /// The longest name kept inline, in bytes.
    const INLINE: usize = 22;

    fn as_str(&self) -> &str {
        match self {
            LevelName::Inline { len, bytes } => {
                // Checked again on every read (safe Rust): a short scan, ASCII for most names.
                std::str::from_utf8(&bytes[..usize::from(*len)]).expect("copied from a str")
            }
            LevelName::Heap(name) => name,
        }
    }
}

impl From<&str> for LevelName {
    fn from(name: &str) -> Self {
        if name.len() <= Self::INLINE {
            let mut bytes = [0; Self::INLINE];
            bytes[..name.len()].copy_from_slice(name.as_bytes());
            LevelName::Inline {
                len: name.len() as u8,
                bytes,
            }
        } else {
            LevelName::Heap(name.into())
        }
    }
}

impl Borrow<str> for LevelName {
    fn borrow(&self) -> &str {
        self.as_str()
    }
}

impl PartialEq for LevelName {
    fn eq(&self, other: &Self) -> bool {
        self.as_str() == other.as_str()
    }
}

impl Eq for LevelName {}

impl Hash for LevelName {
    /// As the `str` hashes: a `HashMap<LevelName, _>` is looked up by `&str`.
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.as_str().hash(state)
    }
}

impl fmt::Debug for LevelName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self.as_str(), f)
    }
}

#[derive(Default)]
struct Node {
    children: SmallMap<LevelName, Node>,
    plus: Option<Box<Node>>,
    /// `None` while nobody subscribes here. Boxed: most nodes are only a level on the way
    /// to others, and a node is an entry of its parent's map, which keeps room for several
    /// (a device's own `devices/<id>/cmd` is three nodes; issue 14: an idle client's cost).
    subscribers: Option<Box<Subscribers>>,
}

#[derive(Default)]
struct Subscribers {
    /// Subscribers of `<path>`.
    exact: SmallMap<ClientKey, SubscriptionOptions>,
    /// Subscribers of `<path>/#` (at the root: `#`).
    multi: SmallMap<ClientKey, SubscriptionOptions>,
}

impl Node {
    fn is_empty(&self) -> bool {
        self.children.is_empty() && self.plus.is_none() && self.subscribers.is_none()
    }

    fn subscribers(&mut self) -> &mut Subscribers {
        self.subscribers.get_or_insert_with(Default::default)
    }

    /// Removes `client` from `exact` (or `multi`), and the subscribers once none is left.
    fn unsubscribe(&mut self, client: &str, multi: bool) -> bool {
        let Some(subscribers) = self.subscribers.as_mut() else {
            return false;
        };
        let map = if multi {
            &mut subscribers.multi
        } else {
            &mut subscribers.exact
        };
        let removed = map.remove(client).is_some();
        if subscribers.exact.is_empty() && subscribers.multi.is_empty() {
            self.subscribers = None;
        }
        removed
    }
}

/// Every subscription of every session, for routing.
#[derive(Default)]
pub struct SubscriptionTable {
    root: Node,
    len: usize,
}

impl SubscriptionTable {
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Adds or replaces `client`'s subscription to `filter` (a valid filter).
    pub fn insert(
        &mut self,
        filter: &str,
        client: ClientKey,
        options: impl Into<SubscriptionOptions>,
    ) {
        let qos = options.into();
        let mut node = &mut self.root;
        let mut levels = filter.split('/').peekable();
        while let Some(level) = levels.next() {
            if level == "#" {
                if node.subscribers().multi.insert(client, qos).is_none() {
                    self.len += 1;
                }
                return;
            }
            node = if level == "+" {
                node.plus.get_or_insert_with(Default::default)
            } else {
                node.children.get_or_default(level)
            };
            if levels.peek().is_none() {
                if node.subscribers().exact.insert(client, qos).is_none() {
                    self.len += 1;
                }
                return;
            }
        }
    }

    /// Removes `client`'s subscription to `filter`; returns whether there was one.
    pub fn remove(&mut self, filter: &str, client: &str) -> bool {
        let levels: Vec<&str> = filter.split('/').collect();
        let removed = Self::remove_at(&mut self.root, &levels, client);
        if removed {
            self.len -= 1;
        }
        removed
    }

    fn remove_at(node: &mut Node, levels: &[&str], client: &str) -> bool {
        let Some((&level, rest)) = levels.split_first() else {
            return false;
        };
        if level == "#" {
            return node.unsubscribe(client, true);
        }
        let child = if level == "+" {
            node.plus.as_deref_mut()
        } else {
            node.children.get_mut(level)
        };
        let Some(child) = child else { return false };
        let removed = if rest.is_empty() {
            child.unsubscribe(client, false)
        } else {
            Self::remove_at(child, rest, client)
        };
        if removed && child.is_empty() {
            if level == "+" {
                node.plus = None;
            } else {
                node.children.remove(level);
            }
        }
        removed
    }

    /// Calls `found` for every subscription matching `topic`. One client may be found more
    /// than once (overlapping filters); the caller keeps the highest QoS.
    pub fn for_each_match(
        &self,
        topic: &str,
        mut found: impl FnMut(&ClientKey, SubscriptionOptions),
    ) {
        let levels: Vec<&str> = topic.split('/').collect();
        let dollar = topic.starts_with('$');
        Self::match_at(&self.root, &levels, dollar, &mut found);
    }

    fn match_at(
        node: &Node,
        levels: &[&str],
        no_wildcard: bool,
        found: &mut impl FnMut(&ClientKey, SubscriptionOptions),
    ) {
        let subscribers = node.subscribers.as_deref();
        if !no_wildcard {
            // `a/#` matches `a` and everything below it.
            for (client, qos) in subscribers.iter().flat_map(|s| &s.multi) {
                found(client, *qos);
            }
        }
        let Some((&level, rest)) = levels.split_first() else {
            for (client, qos) in subscribers.iter().flat_map(|s| &s.exact) {
                found(client, *qos);
            }
            return;
        };
        if let Some(child) = node.children.get(level) {
            Self::match_at(child, rest, false, found);
        }
        if !no_wildcard {
            if let Some(plus) = &node.plus {
                Self::match_at(plus, rest, false, found);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::message::QoS;
    use std::collections::hash_map::RandomState;
    use std::collections::HashMap;
    use std::hash::BuildHasher;

    fn matches(table: &SubscriptionTable, topic: &str) -> Vec<(String, QoS)> {
        let mut out: HashMap<String, QoS> = HashMap::new();
        table.for_each_match(topic, |c, o| {
            let q = o.qos;
            let e = out.entry(c.to_string()).or_insert(q);
            *e = (*e).max(q);
        });
        let mut v: Vec<_> = out.into_iter().collect();
        v.sort();
        v
    }

    #[test]
    fn filters_are_validated() {
        for ok in [
            "a", "a/b", "#", "+", "a/+/c", "a/#", "+/+", "/", "a//b", "$SYS/#",
        ] {
            assert!(valid_filter(ok), "{ok}");
        }
        for bad in ["", "a/#/b", "a#", "a/b#", "a+", "+a/b", "##", "a/\0"] {
            assert!(!valid_filter(bad), "{bad:?}");
        }
        assert!(valid_topic_name("a/b"));
        for bad in ["", "a/+", "#", "a/b#", "a\0"] {
            assert!(!valid_topic_name(bad), "{bad:?}");
        }
    }

    #[test]
    fn filters_overlap_when_one_topic_matches_both() {
        for (a, b) in [
            ("sensors/+/events", "sensors/#"),
            ("sensors/+/events", "+/dev1/+"),
            ("a/#", "a"),
            ("#", "x/y/z"),
            ("$SYS/#", "$SYS/broker"),
        ] {
            assert!(filters_overlap(a, b) && filters_overlap(b, a), "{a} {b}");
        }
        for (a, b) in [
            ("sensors/+/events", "other/#"),
            ("sensors/+/events", "sensors/+"),
            ("a/b", "a"),
            ("$SYS/#", "#"),
            ("$SYS/x", "+/x"),
        ] {
            assert!(!filters_overlap(a, b) && !filters_overlap(b, a), "{a} {b}");
        }
    }

    #[test]
    fn table_matches_like_filter_matches() {
        let filters = [
            "a/b", "a/+", "a/#", "#", "+/b", "+/+", "a/b/c", "$SYS/#", "$SYS/+", "+", "/+", "a//b",
        ];
        let topics = [
            "a", "a/b", "a/c", "a/b/c", "b", "$SYS/x", "$SYS", "/a", "a//b", "x/b",
        ];
        let mut table = SubscriptionTable::default();
        for f in filters {
            table.insert(f, Arc::from(f), QoS::AtLeastOnce);
        }
        assert_eq!(table.len(), filters.len());
        for t in topics {
            let got: Vec<String> = matches(&table, t).into_iter().map(|(c, _)| c).collect();
            let mut want: Vec<String> = filters
                .iter()
                .filter(|f| filter_matches(f, t))
                .map(|f| f.to_string())
                .collect();
            want.sort();
            assert_eq!(got, want, "topic {t}");
        }
    }

    #[test]
    fn spec_examples() {
        assert!(filter_matches("sport/#", "sport"));
        assert!(filter_matches(
            "sport/tennis/#",
            "sport/tennis/player1/ranking"
        ));
        assert!(!filter_matches("sport/+", "sport"));
        assert!(filter_matches("sport/+", "sport/"));
        assert!(filter_matches("+/+", "/finance"));
        assert!(!filter_matches("+", "/finance"));
        assert!(!filter_matches("#", "$SYS/uptime"));
        assert!(!filter_matches("+/monitor/Clients", "$SYS/monitor/Clients"));
        assert!(filter_matches("$SYS/#", "$SYS/monitor/Clients"));
        assert!(filter_matches("$SYS/monitor/+", "$SYS/monitor/Clients"));
    }

    #[test]
    fn a_node_on_the_way_to_others_is_small() {
        // A node is an entry of its parent's map, which keeps room for several: with its
        // subscribers inline it was 152 bytes (issue 14).
        assert!(std::mem::size_of::<Node>() <= 64);
        // With its name: 64 bytes (40 + a 24-byte `LevelName`), 8 more than with a
        // `Box<str>` name, which also cost a 32-byte heap chunk of its own.
        assert!(std::mem::size_of::<(LevelName, Node)>() <= 64);
        assert_eq!(std::mem::size_of::<LevelName>(), 24);
    }

    /// 22 bytes (inline), 23 (boxed), and both again in multi-byte UTF-8.
    fn edge_names() -> [String; 4] {
        [
            "a".repeat(LevelName::INLINE),
            "a".repeat(LevelName::INLINE + 1),
            "é".repeat(LevelName::INLINE / 2),
            "capteur-de-température".to_string(),
        ]
    }

    #[test]
    fn level_names_round_trip_and_hash_as_their_str() {
        let [at_most, over, utf8_at_most, utf8_over] = edge_names();
        assert_eq!((at_most.len(), over.len()), (22, 23));
        assert_eq!((utf8_at_most.len(), utf8_over.len()), (22, 23));
        let hasher = RandomState::new();
        for (name, inline) in [
            ("", true),
            ("cmd", true),
            (at_most.as_str(), true),
            (over.as_str(), false),
            (utf8_at_most.as_str(), true),
            (utf8_over.as_str(), false),
        ] {
            let level = LevelName::from(name);
            assert_eq!(level.as_str(), name);
            let borrowed: &str = level.borrow();
            assert_eq!(borrowed, name);
            assert_eq!(
                matches!(level, LevelName::Inline { .. }),
                inline,
                "{name:?}"
            );
            assert_eq!(level, LevelName::from(name));
            assert_eq!(level.clone().as_str(), name);
            assert_eq!(hasher.hash_one(&level), hasher.hash_one(name), "{name:?}");
            assert_eq!(format!("{level:?}"), format!("{name:?}"));
        }
        assert_ne!(LevelName::from(&*at_most), LevelName::from(&*over));
        assert_ne!(LevelName::from("cmd"), LevelName::from("cm"));
    }

    #[test]
    fn long_short_and_utf8_levels_are_found_routed_and_removed() {
        let names = edge_names();
        // Alone, the four names are a few entries of `devices`; with 8 more, a `HashMap`.
        for siblings in [0, 8] {
            let mut table = SubscriptionTable::default();
            let others: Vec<String> = (0..siblings).map(|i| format!("dev{i}")).collect();
            for name in names.iter().chain(&others) {
                let client: ClientKey = Arc::from(name.as_str());
                table.insert(&format!("devices/{name}/cmd"), client, QoS::AtLeastOnce);
            }
            table.insert("devices/+/cmd", Arc::from("all"), QoS::AtMostOnce);
            let devices = table.root.children.get("devices").expect("devices");
            let many = matches!(devices.children, SmallMap::Many(_));
            assert_eq!(many, siblings > 0, "{siblings} siblings");
            for name in &names {
                let device = devices.children.get(name.as_str()).expect(name);
                assert!(device.children.contains_key("cmd"), "{name}");
                assert!(devices.children.get(&*format!("{name}b")).is_none());
            }
            let want = |name: &str| {
                let mut want = vec![
                    (name.to_string(), QoS::AtLeastOnce),
                    ("all".to_string(), QoS::AtMostOnce),
                ];
                want.sort();
                want
            };
            for name in &names {
                let topic = format!("devices/{name}/cmd");
                assert_eq!(matches(&table, &topic), want(name), "{topic}");
            }
            for name in &names {
                let topic = format!("devices/{name}/cmd");
                assert!(table.remove(&topic, name), "{topic}");
                assert!(!table.remove(&topic, name), "{topic}");
                assert_eq!(
                    matches(&table, &topic),
                    vec![("all".into(), QoS::AtMostOnce)]
                );
                let devices = table.root.children.get("devices").expect("devices");
                assert!(devices.children.get(name.as_str()).is_none(), "{name}");
            }
            for name in &others {
                assert!(table.remove(&format!("devices/{name}/cmd"), name));
            }
            assert!(table.remove("devices/+/cmd", "all"));
            assert!(table.is_empty());
            assert!(table.root.is_empty());
        }
    }

    #[test]
    fn overlapping_and_removal() {
        let mut table = SubscriptionTable::default();
        let c: ClientKey = Arc::from("c");
        table.insert("a/#", c.clone(), QoS::AtMostOnce);
        table.insert("a/b", c.clone(), QoS::AtLeastOnce);
        table.insert("a/b", c.clone(), QoS::ExactlyOnce);
        assert_eq!(table.len(), 2);
        assert_eq!(matches(&table, "a/b"), vec![("c".into(), QoS::ExactlyOnce)]);
        assert!(table.remove("a/b", "c"));
        assert!(!table.remove("a/b", "c"));
        assert_eq!(matches(&table, "a/b"), vec![("c".into(), QoS::AtMostOnce)]);
        assert!(table.remove("a/#", "c"));
        assert!(table.is_empty());
        assert!(table.root.is_empty());
    }
}
