//! Each device's recent event numbers, so that an event sent again (a device's resend after
//! a reconnect, or after the gateway restarted before its PUBACK) is logged for forwarding
//! only once.
//!
//! Per device: the boot it is in, the highest `seq` heard in that boot and which of the
//! [`WINDOW`] numbers below it were heard. The rule is never to drop what was not provably
//! heard: an event of an older boot, or more than `WINDOW` numbers behind the highest, is
//! forwarded (a possible duplicate, which the event id lets the cloud remove) rather than
//! guessed at. A new boot starts a new window. At most `max_devices` devices are
//! remembered; those heard least recently are forgotten first (a sixteenth at a time).
//!
//! Durability: a changed window is written (an `Op::Put` of 32 bytes under
//! `Keyspace::Dedup`) in the same group commit as the log appends it decided: changes are
//! gathered over the router's burst and written once per device by [`DeviceWindows::flush`]
//! when the burst is submitted, so a sensor sending fifty events in one burst costs one
//! write, not fifty. After a crash the windows on disk match exactly the events the log
//! holds.

use std::collections::HashMap;

use super::event::EventId;
use crate::store::{Keyspace, Op};

/// Event numbers remembered below the highest, per device.
pub const WINDOW: u64 = 128;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Window {
    boot: u64,
    top: u64,
    /// Bit i: `top - i` was heard.
    heard: u128,
}

impl Window {
    fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(32);
        v.extend_from_slice(&self.boot.to_be_bytes());
        v.extend_from_slice(&self.top.to_be_bytes());
        v.extend_from_slice(&self.heard.to_be_bytes());
        v
    }

    fn decode(v: &[u8]) -> Option<Window> {
        Some(Window {
            boot: u64::from_be_bytes(v.get(0..8)?.try_into().ok()?),
            top: u64::from_be_bytes(v.get(8..16)?.try_into().ok()?),
            heard: u128::from_be_bytes(v.get(16..32)?.try_into().ok()?),
        })
    }

    /// Marks `(boot, seq)` heard; false if it had been.
    fn hear(&mut self, boot: u64, seq: u64) -> bool {
        if boot > self.boot {
            *self = Window {
                boot,
                top: seq,
                heard: 1,
            };
            return true;
        }
        if boot < self.boot {
            return true; // an older boot: not known, forwarded
        }
        if seq > self.top {
            let shift = seq - self.top;
            self.heard = if shift >= WINDOW {
                0
            } else {
                self.heard << shift
            };
            self.heard |= 1;
            self.top = seq;
            return true;
        }
        let behind = self.top - seq;
        if behind >= WINDOW {
            return true; // too far back to know
        }
        let bit = 1u128 << behind;
        let first = self.heard & bit == 0;
        self.heard |= bit;
        first
    }
}

/// The windows of one `[[pipeline]]` rule's devices.
pub struct DeviceWindows {
    /// Prefix of this rule's keys in `Keyspace::Dedup`.
    tag: Vec<u8>,
    max_devices: usize,
    /// Each device's window and when it was last heard (a tick).
    windows: HashMap<String, Entry>,
    tick: u64,
    /// Devices whose window changed since the last `flush` (each once: `Entry::dirty`).
    dirty: Vec<String>,
}

struct Entry {
    window: Window,
    last_heard: u64,
    /// Listed in `DeviceWindows::dirty`.
    dirty: bool,
}

impl DeviceWindows {
    pub fn new(tag: Vec<u8>, max_devices: usize) -> DeviceWindows {
        DeviceWindows {
            tag,
            max_devices: max_devices.max(1),
            windows: HashMap::new(),
            tick: 0,
            dirty: Vec::new(),
        }
    }

    pub fn tag(&self) -> &[u8] {
        &self.tag
    }

    /// A window read back at start (`key` without the tag). False if it is unreadable.
    pub fn restore(&mut self, device: &[u8], value: &[u8]) -> bool {
        match (std::str::from_utf8(device), Window::decode(value)) {
            (Ok(device), Some(window)) => {
                self.tick += 1;
                let entry = Entry {
                    window,
                    last_heard: self.tick,
                    dirty: false,
                };
                self.windows.insert(device.to_string(), entry);
                true
            }
            _ => false,
        }
    }

    pub fn devices(&self) -> usize {
        self.windows.len()
    }

    /// Whether `id` is heard for the first time; records it (the write waits for `flush`;
    /// forgetting a device is written to `ops` at once).
    pub fn first_time(&mut self, id: &EventId, ops: &mut Vec<Op>) -> bool {
        self.tick += 1;
        let tick = self.tick;
        let first = match self.windows.get_mut(&*id.device) {
            Some(entry) => {
                entry.last_heard = tick;
                let first = entry.window.hear(id.boot, id.seq);
                if first && !entry.dirty {
                    entry.dirty = true;
                    self.dirty.push(id.device.to_string());
                }
                first
            }
            None => {
                let entry = Entry {
                    window: Window {
                        boot: id.boot,
                        top: id.seq,
                        heard: 1,
                    },
                    last_heard: tick,
                    dirty: true,
                };
                self.dirty.push(id.device.to_string());
                self.windows.insert(id.device.to_string(), entry);
                true
            }
        };
        if self.windows.len() > self.max_devices {
            self.forget_least_recent(ops);
        }
        first
    }

    /// Forgets the least recently heard sixteenth of `max_devices` (at least one), so that
    /// finding them (a pass over every window) is paid once per that many new devices, and
    /// hearing a known device costs no bookkeeping.
    fn forget_least_recent(&mut self, ops: &mut Vec<Op>) {
        let excess = self.windows.len() - self.max_devices;
        let count = (excess + self.max_devices / 16)
            .max(1)
            .min(self.windows.len());
        let mut ticks: Vec<u64> = self.windows.values().map(|e| e.last_heard).collect();
        let (_, threshold, _) = ticks.select_nth_unstable(count - 1);
        let threshold = *threshold; // ticks are unique: exactly `count` are at or below it
        let tag = &self.tag;
        // A forgotten device may stay listed in `dirty`: `flush` skips what it cannot find.
        self.windows.retain(|device, entry| {
            if entry.last_heard > threshold {
                return true;
            }
            ops.push(Op::Remove {
                space: Keyspace::Dedup,
                key: key(tag, device),
            });
            false
        });
    }

    /// Writes the windows changed since the last flush.
    pub fn flush(&mut self, ops: &mut Vec<Op>) {
        for device in self.dirty.drain(..) {
            if let Some(entry) = self.windows.get_mut(&device) {
                if std::mem::take(&mut entry.dirty) {
                    ops.push(put(&self.tag, &device, &entry.window));
                }
            }
        }
    }
}

fn key(tag: &[u8], device: &str) -> Vec<u8> {
    let mut key = tag.to_vec();
    key.extend_from_slice(device.as_bytes());
    key
}

fn put(tag: &[u8], device: &str, window: &Window) -> Op {
    Op::Put {
        space: Keyspace::Dedup,
        key: key(tag, device),
        value: window.encode(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(device: &str, boot: u64, seq: u64) -> EventId<'_> {
        EventId {
            device: device.into(),
            boot,
            seq,
        }
    }

    #[test]
    fn a_resend_is_heard_once_and_nothing_unknown_is_dropped() {
        let mut w = DeviceWindows::new(b"t".to_vec(), 10);
        let mut ops = Vec::new();
        for seq in 0..10 {
            assert!(w.first_time(&id("a", 1, seq), &mut ops));
        }
        assert!(!w.first_time(&id("a", 1, 3), &mut ops), "resend");
        assert!(
            !w.first_time(&id("a", 1, 9), &mut ops),
            "resend of the newest"
        );
        // Out of order but new, within the window.
        assert!(w.first_time(&id("a", 1, 12), &mut ops));
        assert!(w.first_time(&id("a", 1, 11), &mut ops));
        assert!(!w.first_time(&id("a", 1, 11), &mut ops));
        // Far behind the window: not known, so forwarded.
        assert!(w.first_time(&id("a", 1, 500), &mut ops));
        assert!(
            w.first_time(&id("a", 1, 12), &mut ops),
            "128+ behind: forwarded"
        );
        // A new boot restarts the numbers; the old boot is never dropped as a duplicate.
        assert!(w.first_time(&id("a", 2, 0), &mut ops));
        assert!(!w.first_time(&id("a", 2, 0), &mut ops));
        assert!(w.first_time(&id("a", 1, 500), &mut ops));
        // Another device has its own numbers.
        assert!(w.first_time(&id("b", 2, 0), &mut ops));
    }

    #[test]
    fn windows_survive_a_restart_through_their_ops() {
        let mut w = DeviceWindows::new(b"t".to_vec(), 10);
        let mut ops = Vec::new();
        for seq in [5, 7, 6] {
            w.first_time(&id("dev", 3, seq), &mut ops);
        }
        w.flush(&mut ops);
        assert_eq!(ops.len(), 1, "one write per device per flush");
        let mut again = DeviceWindows::new(b"t".to_vec(), 10);
        let mut last = HashMap::new();
        for op in ops {
            if let Op::Put { key, value, .. } = op {
                last.insert(key, value);
            }
        }
        for (key, value) in last {
            assert!(again.restore(&key[1..], &value));
        }
        let mut ops = Vec::new();
        for seq in [5, 6, 7] {
            assert!(!again.first_time(&id("dev", 3, seq), &mut ops), "seq {seq}");
        }
        assert!(again.first_time(&id("dev", 3, 8), &mut ops));
        assert!(!again.restore(b"x", b"short"));
    }

    #[test]
    fn the_least_recently_heard_device_is_forgotten() {
        let mut w = DeviceWindows::new(b"t".to_vec(), 2);
        let mut ops = Vec::new();
        w.first_time(&id("a", 1, 1), &mut ops);
        w.first_time(&id("b", 1, 1), &mut ops);
        w.first_time(&id("a", 1, 2), &mut ops); // a heard more recently than b
        ops.clear();
        w.first_time(&id("c", 1, 1), &mut ops);
        assert_eq!(w.devices(), 2);
        assert!(ops.contains(&Op::Remove {
            space: Keyspace::Dedup,
            key: b"tb".to_vec()
        }));
        // b is forgotten: its resend is forwarded (never dropped unknown); a is remembered.
        assert!(w.first_time(&id("b", 1, 1), &mut ops));
        assert!(!w.first_time(&id("c", 1, 1), &mut ops));
    }

    #[test]
    fn many_devices_are_forgotten_a_sixteenth_at_a_time_oldest_first() {
        let mut w = DeviceWindows::new(b"t".to_vec(), 64);
        let mut ops = Vec::new();
        for d in 0..64 {
            w.first_time(&id(&format!("d{d}"), 1, 1), &mut ops);
        }
        assert!(ops.is_empty());
        w.first_time(&id("d0", 1, 2), &mut ops); // d0 heard again: now the most recent
        w.first_time(&id("new", 1, 1), &mut ops);
        // 65 > 64: one over plus 64 / 16 = 5 forgotten, the least recently heard: d1..d5.
        assert_eq!(w.devices(), 60);
        let removed: Vec<Vec<u8>> = ops
            .iter()
            .filter_map(|op| match op {
                Op::Remove { key, .. } => Some(key.clone()),
                _ => None,
            })
            .collect();
        let mut want: Vec<Vec<u8>> = (1..=5).map(|d| format!("td{d}").into_bytes()).collect();
        let mut got = removed.clone();
        got.sort();
        want.sort();
        assert_eq!(got, want);
        assert!(!w.first_time(&id("d0", 1, 2), &mut ops), "d0 remembered");
        assert!(
            !w.first_time(&id("new", 1, 1), &mut ops),
            "the newest remembered"
        );
    }
}
