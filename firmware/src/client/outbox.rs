//! The in-flight events of one client: a fixed ring of QoS 1 PUBLISHes waiting for their
//! PUBACK. It outlives links (the session marks every slot unsent when one drops, so the next
//! link sends them again with DUP) and knows nothing about the transport or MQTT framing, which
//! keeps it a leaf the session and the public API both use.

use crate::event::Event;

/// A ring of `N` slots, oldest first: removing the oldest moves nothing (no `memmove`), and
/// index loops instead of `heapless::Deque`'s two-slice iterators keep it small in flash.
pub(super) struct Outbox<const N: usize> {
    slots: [Slot; N],
    head: usize,
    len: usize,
}

impl<const N: usize> Outbox<N> {
    pub(super) fn new() -> Self {
        let empty = Slot {
            pid: 0,
            acked: false,
            ever_sent: false,
            sent_on_link: false,
            event: Event {
                seq: 0,
                value: 0,
                threshold: 0,
                direction: crate::detector::Direction::Rising,
                dropped: 0,
            },
        };
        Self {
            slots: [empty; N],
            head: 0,
            len: 0,
        }
    }
    pub(super) fn len(&self) -> usize {
        self.len
    }
    pub(super) fn is_full(&self) -> bool {
        self.len == N
    }
    /// Storage index of the `i`-th oldest slot (`head < N` and `i < N`, so one wrap at most).
    pub(super) fn at(&self, i: usize) -> usize {
        let j = self.head + i;
        if j >= N {
            j - N
        } else {
            j
        }
    }
    pub(super) fn get(&self, i: usize) -> Option<&Slot> {
        if i < self.len {
            self.slots.get(self.at(i))
        } else {
            None
        }
    }
    pub(super) fn get_mut(&mut self, i: usize) -> Option<&mut Slot> {
        if i < self.len {
            let j = self.at(i);
            self.slots.get_mut(j)
        } else {
            None
        }
    }
    /// The position of the oldest unacknowledged slot with packet id `pid` (any id: `None`),
    /// sent on this link if `on_link`. One function for every search keeps one copy in flash.
    pub(super) fn find(&self, pid: Option<u16>, on_link: bool) -> Option<usize> {
        (0..self.len).find(|&i| {
            self.get(i).is_some_and(|s| {
                !s.acked && pid.is_none_or(|p| s.pid == p) && (s.sent_on_link || !on_link)
            })
        })
    }
    /// Appends (the caller makes room first); a full ring ignores the slot.
    pub(super) fn push_back(&mut self, s: Slot) {
        if self.len < N {
            let j = self.at(self.len);
            if let Some(d) = self.slots.get_mut(j) {
                *d = s;
                self.len += 1;
            }
        }
    }
    pub(super) fn pop_front(&mut self) -> Option<Slot> {
        let s = *self.get(0)?;
        self.head = self.at(1);
        self.len -= 1;
        Some(s)
    }
    /// After a link loss: every slot has to be sent again on the next link.
    pub(super) fn all_unsent(&mut self) {
        for s in self.slots.iter_mut() {
            s.sent_on_link = false;
        }
    }
}

#[derive(Clone, Copy)]
pub(super) struct Slot {
    pub(super) pid: u16,
    /// Acknowledged but not yet at the front (acks out of order): a tombstone.
    pub(super) acked: bool,
    pub(super) ever_sent: bool,
    pub(super) sent_on_link: bool,
    pub(super) event: Event,
}
