//! Topic aliases for an MQTT 5 upstream: the topics forwarded most recently each get an
//! alias (up to the upstream's CONNACK Topic Alias Maximum, capped by `MAX_ALIASES`), so a
//! PUBLISH to such a topic carries two bytes of alias instead of the topic name.
//!
//! The first PUBLISH to a topic sets its alias (topic and alias both sent); later ones send
//! the alias with an empty topic. When every alias is taken, the least recently used topic
//! gives its alias up to the new one (the PUBLISH that sets it tells the upstream). Aliases
//! belong to one connection: a new table starts with every connection.
//!
//! [`TopicAliases::choose`] only proposes; [`TopicAliases::commit`] records the choice once
//! the PUBLISH carrying it is really sent (a message dropped as too large must not leave
//! the upstream and this table disagreeing).

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

/// Most aliases used on one connection, whatever the upstream allows: each holds its
/// topic's bytes for the connection's life, and a site forwards a bounded set of topics.
pub const MAX_ALIASES: u16 = 1024;

/// How a PUBLISH names its topic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AliasUse {
    /// No alias (none allowed, or the topic is too short to gain from one).
    None,
    /// Topic and alias both sent: the upstream maps the alias to the topic from now on.
    Set(u16),
    /// Alias only, empty topic: the upstream already maps it.
    Use(u16),
}

/// One connection's outbound alias table, least recently used first out.
#[derive(Debug, Default)]
pub struct TopicAliases {
    max: u16,
    /// Topic -> (alias, last use).
    by_topic: HashMap<Arc<str>, (u16, u64)>,
    /// Last use -> alias, oldest first.
    by_use: BTreeMap<u64, u16>,
    /// Alias `n` at index `n - 1`.
    topics: Vec<Arc<str>>,
    clock: u64,
}

impl TopicAliases {
    /// `upstream_max`: the CONNACK's Topic Alias Maximum (0: no aliases).
    pub fn new(upstream_max: u16) -> TopicAliases {
        TopicAliases {
            max: upstream_max.min(MAX_ALIASES),
            ..TopicAliases::default()
        }
    }

    /// How the next PUBLISH to `topic` should name it (nothing recorded yet).
    pub fn choose(&self, topic: &str) -> AliasUse {
        // An alias costs 3 bytes (identifier + u16) and an empty topic 2: a topic of 3 bytes
        // or fewer gains nothing.
        if self.max == 0 || topic.len() <= 3 {
            return AliasUse::None;
        }
        if let Some((alias, _)) = self.by_topic.get(topic) {
            return AliasUse::Use(*alias);
        }
        if self.topics.len() < usize::from(self.max) {
            return AliasUse::Set(self.topics.len() as u16 + 1);
        }
        match self.by_use.first_key_value() {
            Some((_, alias)) => AliasUse::Set(*alias),
            None => AliasUse::None,
        }
    }

    /// Records that a PUBLISH named `topic` as `chosen` (what `choose` returned for it).
    pub fn commit(&mut self, topic: &str, chosen: AliasUse) {
        self.clock += 1;
        let now = self.clock;
        match chosen {
            AliasUse::None => {}
            AliasUse::Use(alias) => {
                if let Some(entry) = self.by_topic.get_mut(topic) {
                    self.by_use.remove(&entry.1);
                    entry.1 = now;
                    self.by_use.insert(now, alias);
                }
            }
            AliasUse::Set(alias) => {
                let index = usize::from(alias) - 1;
                let topic: Arc<str> = Arc::from(topic);
                if let Some(old) = self.topics.get(index).cloned() {
                    if let Some((_, used)) = self.by_topic.remove(&old) {
                        self.by_use.remove(&used);
                    }
                    self.topics[index] = topic.clone();
                } else {
                    self.topics.push(topic.clone());
                }
                if let Some((_, used)) = self.by_topic.insert(topic, (alias, now)) {
                    self.by_use.remove(&used);
                }
                self.by_use.insert(now, alias);
            }
        }
    }

    /// Aliases in use.
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.by_topic.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn send(t: &mut TopicAliases, topic: &str) -> AliasUse {
        let chosen = t.choose(topic);
        t.commit(topic, chosen);
        chosen
    }

    #[test]
    fn first_use_sets_then_the_alias_alone_is_sent() {
        let mut t = TopicAliases::new(10);
        assert_eq!(send(&mut t, "site1/sensors/a"), AliasUse::Set(1));
        assert_eq!(send(&mut t, "site1/sensors/b"), AliasUse::Set(2));
        assert_eq!(send(&mut t, "site1/sensors/a"), AliasUse::Use(1));
        assert_eq!(send(&mut t, "site1/sensors/b"), AliasUse::Use(2));
        assert_eq!(t.len(), 2);
    }

    #[test]
    fn no_aliases_when_the_upstream_allows_none_or_the_topic_is_tiny() {
        let mut t = TopicAliases::new(0);
        assert_eq!(send(&mut t, "site1/sensors/a"), AliasUse::None);
        assert_eq!(send(&mut t, "site1/sensors/a"), AliasUse::None);
        let mut t = TopicAliases::new(5);
        assert_eq!(send(&mut t, "a/b"), AliasUse::None);
        assert_eq!(t.len(), 0);
    }

    #[test]
    fn the_least_recently_used_topic_gives_its_alias_up() {
        let mut t = TopicAliases::new(2);
        assert_eq!(send(&mut t, "topic/a"), AliasUse::Set(1));
        assert_eq!(send(&mut t, "topic/b"), AliasUse::Set(2));
        assert_eq!(send(&mut t, "topic/a"), AliasUse::Use(1)); // b is now the oldest
        assert_eq!(
            send(&mut t, "topic/c"),
            AliasUse::Set(2),
            "b's alias goes to c"
        );
        assert_eq!(send(&mut t, "topic/b"), AliasUse::Set(1), "a is oldest now");
        assert_eq!(send(&mut t, "topic/c"), AliasUse::Use(2));
        assert_eq!(send(&mut t, "topic/b"), AliasUse::Use(1));
        assert_eq!(t.len(), 2);
        assert!(t.topics.len() <= 2 && t.by_use.len() == 2);
    }

    #[test]
    fn a_choice_not_committed_changes_nothing() {
        // A message dropped as too large was never sent: its alias must not be recorded.
        let mut t = TopicAliases::new(1);
        assert_eq!(t.choose("topic/big"), AliasUse::Set(1));
        assert_eq!(send(&mut t, "topic/a"), AliasUse::Set(1));
        assert_eq!(send(&mut t, "topic/a"), AliasUse::Use(1));
    }

    #[test]
    fn capped_at_max_aliases_whatever_the_upstream_allows() {
        let mut t = TopicAliases::new(u16::MAX);
        for i in 0..(u32::from(MAX_ALIASES) + 10) {
            send(&mut t, &format!("topic/{i}"));
        }
        assert_eq!(t.len(), usize::from(MAX_ALIASES));
        assert_eq!(t.by_use.len(), usize::from(MAX_ALIASES));
        // The 10 oldest gave theirs up; the newest are still aliased.
        assert_eq!(
            t.choose(&format!("topic/{}", MAX_ALIASES + 9)),
            AliasUse::Use(10)
        );
    }
}
