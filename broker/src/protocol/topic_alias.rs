//! MQTT 5 topic aliases: how many a client may set (inbound ones are resolved by the v5
//! decoder), and those the broker sends to one client (3.3.2.3.4): the client's CONNECT says
//! how many it accepts; the broker gives the most recently used topics an alias, so a topic
//! repeated on that connection goes as two bytes instead of its name. Aliases last as long
//! as the connection (the encoder that owns this lives in the connection's writer task, so
//! what is assigned here is exactly what the client has been sent, in order).

use std::collections::HashMap;
use std::sync::Arc;

/// How many topic aliases a client may set on one connection (CONNACK Topic Alias
/// Maximum). Each costs the topic's bytes for the connection's life, so a small number:
/// a sensor publishes to a handful of topics.
pub const TOPIC_ALIAS_MAXIMUM: u16 = 16;

/// At most this many aliases per connection, whatever the client allows: each costs the
/// topic's bytes for the connection's life.
pub const MAX_OUTBOUND_ALIASES: u16 = 16;

/// How to send one PUBLISH's topic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AliasUse {
    /// No alias: the topic name alone.
    None,
    /// The topic name, setting this alias for it.
    Set(u16),
    /// This alias alone, the topic name empty.
    Reuse(u16),
}

#[derive(Debug, Default)]
pub struct OutboundAliases {
    max: u16,
    /// Topic -> (alias, last use).
    by_topic: HashMap<Arc<str>, (u16, u64)>,
    clock: u64,
}

impl OutboundAliases {
    /// `client_max`: the client's Topic Alias Maximum (0: none).
    pub fn new(client_max: u16) -> OutboundAliases {
        OutboundAliases {
            max: client_max.min(MAX_OUTBOUND_ALIASES),
            ..OutboundAliases::default()
        }
    }

    /// What to send for `topic`; nothing changes until [`OutboundAliases::sent`].
    pub fn choose(&self, topic: &Arc<str>) -> AliasUse {
        if self.max == 0 {
            return AliasUse::None;
        }
        if let Some((alias, _)) = self.by_topic.get(topic) {
            return AliasUse::Reuse(*alias);
        }
        if (self.by_topic.len() as u16) < self.max {
            return AliasUse::Set(self.by_topic.len() as u16 + 1);
        }
        // Every alias is taken: the least recently used one moves to this topic.
        self.by_topic
            .values()
            .min_by_key(|(_, used)| *used)
            .map_or(AliasUse::None, |(alias, _)| AliasUse::Set(*alias))
    }

    /// Records that a PUBLISH for `topic` went out as `used`.
    pub fn sent(&mut self, topic: &Arc<str>, used: AliasUse) {
        self.clock += 1;
        match used {
            AliasUse::None => {}
            AliasUse::Reuse(_) => {
                if let Some(entry) = self.by_topic.get_mut(topic) {
                    entry.1 = self.clock;
                }
            }
            AliasUse::Set(alias) => {
                self.by_topic.retain(|_, (a, _)| *a != alias);
                self.by_topic.insert(topic.clone(), (alias, self.clock));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn send(aliases: &mut OutboundAliases, topic: &str) -> AliasUse {
        let topic: Arc<str> = topic.into();
        let used = aliases.choose(&topic);
        aliases.sent(&topic, used);
        used
    }

    #[test]
    fn recent_topics_keep_their_alias_and_the_least_recent_gives_way() {
        let mut none = OutboundAliases::new(0);
        assert_eq!(send(&mut none, "a"), AliasUse::None);
        let mut aliases = OutboundAliases::new(2);
        assert_eq!(send(&mut aliases, "a"), AliasUse::Set(1));
        assert_eq!(send(&mut aliases, "b"), AliasUse::Set(2));
        assert_eq!(send(&mut aliases, "a"), AliasUse::Reuse(1));
        // "b" is the least recently used: "c" takes its alias.
        assert_eq!(send(&mut aliases, "c"), AliasUse::Set(2));
        assert_eq!(send(&mut aliases, "b"), AliasUse::Set(1));
        assert_eq!(send(&mut aliases, "c"), AliasUse::Reuse(2));
        // Chosen but not sent (too large with it): nothing recorded.
        let topic: Arc<str> = "d".into();
        assert_eq!(aliases.choose(&topic), AliasUse::Set(1));
        assert_eq!(send(&mut aliases, "b"), AliasUse::Reuse(1));
        assert_eq!(OutboundAliases::new(1000).max, MAX_OUTBOUND_ALIASES);
    }
}
