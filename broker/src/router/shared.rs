//! MQTT 5 shared subscriptions (`$share/{group}/{filter}`, 4.8.2): the members of a group
//! share its filter's messages, each message going to one member. Kept apart from the
//! subscription table, which delivers to every match, and keyed by the whole `$share/...`
//! filter, which is also what each member's session (and its stored record) holds.
//!
//! Which member: the next one in turn that is connected and has room in its in-flight
//! window or queue; if none is connected, the next persistent member, so a group of
//! persistent sessions queues while all are away (delivered when one comes back); a
//! message no member can take is dropped like any message a session cannot keep.

use std::collections::HashMap;
use std::sync::Arc;

use crate::protocol::message::SubscriptionOptions;
use crate::topic::{filter_matches, parse_shared, ClientKey};

struct Group {
    /// The filter the group shares (after `$share/{group}/`).
    filter: String,
    members: Vec<(ClientKey, SubscriptionOptions)>,
    /// Where the next turn starts.
    next: usize,
}

#[derive(Default)]
pub struct SharedSubscriptions {
    groups: HashMap<Arc<str>, Group>,
}

impl SharedSubscriptions {
    /// Adds or replaces `client`'s membership; `shared` must pass [`parse_shared`].
    pub fn insert(&mut self, shared: &str, client: ClientKey, options: SubscriptionOptions) {
        let Some((_, inner)) = parse_shared(shared) else {
            return;
        };
        let group = self
            .groups
            .entry(Arc::from(shared))
            .or_insert_with(|| Group {
                filter: inner.to_string(),
                members: Vec::new(),
                next: 0,
            });
        match group.members.iter_mut().find(|(c, _)| *c == client) {
            Some(member) => member.1 = options,
            None => group.members.push((client, options)),
        }
    }

    /// Removes `client` from the group; returns whether it was a member.
    pub fn remove(&mut self, shared: &str, client: &str) -> bool {
        let Some(group) = self.groups.get_mut(shared) else {
            return false;
        };
        let before = group.members.len();
        group.members.retain(|(c, _)| &**c != client);
        let removed = group.members.len() < before;
        if group.members.is_empty() {
            self.groups.remove(shared);
        }
        removed
    }

    pub fn is_empty(&self) -> bool {
        self.groups.is_empty()
    }

    /// Members across all groups.
    pub fn len(&self) -> usize {
        self.groups.values().map(|g| g.members.len()).sum()
    }

    /// For every group whose filter matches `topic`, the member `choose` accepts first,
    /// trying them in turn from where the last message stopped: `choose(client, pass)` is
    /// asked with pass 0 (connected members only) and then pass 1 (anyone).
    pub fn pick_for(
        &mut self,
        topic: &str,
        mut choose: impl FnMut(&ClientKey, u8) -> bool,
    ) -> Vec<(ClientKey, SubscriptionOptions)> {
        let mut picked = Vec::new();
        for group in self.groups.values_mut() {
            if !filter_matches(&group.filter, topic) {
                continue;
            }
            let n = group.members.len();
            'passes: for pass in 0..2u8 {
                for step in 0..n {
                    let i = (group.next + step) % n;
                    let (client, options) = &group.members[i];
                    if choose(client, pass) {
                        picked.push((client.clone(), *options));
                        group.next = (i + 1) % n;
                        break 'passes;
                    }
                }
            }
        }
        picked
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::message::QoS;

    #[test]
    fn shared_filters_parse_and_members_take_turns() {
        assert_eq!(parse_shared("$share/g/a/+"), Some(("g", "a/+")));
        for bad in [
            "$share/g",
            "$share//a",
            "$share/g+/a",
            "$share/g/a/#/b",
            "a/b",
        ] {
            assert_eq!(parse_shared(bad), None, "{bad}");
        }
        let mut shared = SharedSubscriptions::default();
        for c in ["a", "b", "c"] {
            shared.insert("$share/g/t/#", c.into(), QoS::AtLeastOnce.into());
        }
        shared.insert("$share/h/x", "a".into(), QoS::AtLeastOnce.into());
        assert_eq!(shared.len(), 4);
        let mut order = Vec::new();
        for _ in 0..4 {
            for (c, _) in shared.pick_for("t/1", |_, _| true) {
                order.push(c.to_string());
            }
        }
        assert_eq!(order, ["a", "b", "c", "a"]);
        // "b" is away (pass 0 refuses it): the turn goes on to "c", then "a".
        let picked = shared.pick_for("t/1", |c, pass| pass == 1 || &**c != "b");
        assert_eq!(&*picked[0].0, "c");
        assert!(shared.pick_for("other", |_, _| true).is_empty());
        assert!(shared.remove("$share/g/t/#", "c"));
        assert!(!shared.remove("$share/g/t/#", "c"));
        assert!(shared.remove("$share/h/x", "a"));
        assert_eq!(shared.len(), 2);
    }
}
