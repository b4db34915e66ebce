//! Reply slots of one link: where a request sent to a leg waits for its
//! answer.
//!
//! Every mirrored write, resync chunk, rebuild read, digest and flush the
//! primary sends waits for the leg's answer. A `oneshot` per request (an
//! `Arc` with a mutex and a condvar) plus a `HashMap` entry keyed by the
//! request tag cost an allocation, a lock and a hash per request on the
//! write path. A link lives on one reactor, so a plain slab does: the
//! request's id *is* the index of its slot (low 16 bits) and the slot's
//! sequence number (high 16 bits), the receive loop finds the slot by
//! indexing, and the waiting task keeps its waker in the slot. Freed slots
//! are reused (a free list), so a warm link allocates nothing per request.
//!
//! The sequence number rejects what the `HashMap` silently dropped: an id
//! naming no slot, an answer for a slot that has been freed or reused since
//! (stale), and a second answer for one request (duplicate) come back as a
//! [`ReplyError`], never a panic. A request given up (timed out, or its
//! future dropped) leaves its slot *abandoned* rather than free: the request
//! may still be on the wire, and its late answer must find the slot it was
//! sent for and free it, not a newer request that reused it. An abandoned
//! slot whose answer never comes stays taken until the link closes; the slab
//! is bounded ([`MAX_SLOTS`], or a smaller limit), and a full slab refuses
//! new requests with [`ReplyError::Full`].

use std::cell::RefCell;
use std::task::{Context, Poll, Waker};

/// Most requests one link can have waiting (the index is 16 bits).
pub const MAX_SLOTS: usize = 1 << 16;

/// Why an answer or a request was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ReplyError {
    /// The id's index is past every slot ever handed out.
    #[error("reply id {0:#010x} names no request slot")]
    Unknown(u32),
    /// The slot is free, or was reused by a newer request, or its request
    /// was already answered and collected.
    #[error("reply id {0:#010x} is stale (no request waits on it)")]
    Stale(u32),
    /// The request already has its answer, not yet collected.
    #[error("second reply for id {0:#010x}")]
    Duplicate(u32),
    /// Every slot is taken.
    #[error("too many requests in flight on this link ({0})")]
    Full(usize),
    /// The link closed: no answer will come.
    #[error("link closed")]
    Closed,
}

enum State<T> {
    Free,
    /// Sent, no answer yet; the waiting task's waker.
    Waiting(Option<Waker>),
    /// Answered, not yet collected.
    Ready(T),
    /// Given up by its request; the answer may still come and frees it.
    Abandoned,
    /// The link closed while the request waited.
    Closed,
}

struct Slot<T> {
    seq: u16,
    state: State<T>,
}

struct Inner<T> {
    slots: Vec<Slot<T>>,
    free: Vec<u16>,
    limit: usize,
    closed: bool,
}

/// The reply slots of one link (one reactor: not `Sync`).
pub struct ReplySlots<T> {
    inner: RefCell<Inner<T>>,
}

fn split_id(id: u32) -> (usize, u16) {
    ((id & 0xffff) as usize, (id >> 16) as u16)
}

fn make_id(index: usize, seq: u16) -> u32 {
    (u32::from(seq) << 16) | (index as u32 & 0xffff)
}

impl<T> Default for ReplySlots<T> {
    fn default() -> Self {
        Self::with_limit(MAX_SLOTS)
    }
}

impl<T> ReplySlots<T> {
    /// Slots for at most `limit` waiting requests (capped at [`MAX_SLOTS`]).
    pub fn with_limit(limit: usize) -> Self {
        ReplySlots {
            inner: RefCell::new(Inner {
                slots: Vec::new(),
                free: Vec::new(),
                limit: limit.clamp(1, MAX_SLOTS),
                closed: false,
            }),
        }
    }

    /// Takes a slot for a request about to be sent; returns its id (never 0).
    pub fn reserve(&self) -> Result<u32, ReplyError> {
        let mut g = self.inner.borrow_mut();
        if g.closed {
            return Err(ReplyError::Closed);
        }
        let index = match g.free.pop() {
            Some(i) => usize::from(i),
            None => {
                if g.slots.len() >= g.limit {
                    return Err(ReplyError::Full(g.limit));
                }
                g.slots.push(Slot {
                    seq: 0,
                    state: State::Free,
                });
                g.slots.len() - 1
            }
        };
        let slot = &mut g.slots[index];
        // A new sequence number per use; 0 is skipped so an id is never 0.
        slot.seq = match slot.seq.wrapping_add(1) {
            0 => 1,
            s => s,
        };
        slot.state = State::Waiting(None);
        Ok(make_id(index, slot.seq))
    }

    /// The answer to request `id` arrived.
    pub fn complete(&self, id: u32, value: T) -> Result<(), ReplyError> {
        let (index, seq) = split_id(id);
        let waker = {
            let mut g = self.inner.borrow_mut();
            let g = &mut *g;
            let Some(slot) = g.slots.get_mut(index) else {
                return Err(ReplyError::Unknown(id));
            };
            if slot.seq != seq {
                return Err(ReplyError::Stale(id));
            }
            match &mut slot.state {
                State::Waiting(w) => {
                    let w = w.take();
                    slot.state = State::Ready(value);
                    w
                }
                State::Abandoned => {
                    // The late answer of a request given up: the slot is
                    // free for reuse only now.
                    slot.state = State::Free;
                    g.free.push(index as u16);
                    None
                }
                State::Ready(_) => return Err(ReplyError::Duplicate(id)),
                State::Free | State::Closed => return Err(ReplyError::Stale(id)),
            }
        };
        if let Some(w) = waker {
            w.wake();
        }
        Ok(())
    }

    /// Polls for request `id`'s answer; a collected answer (or the link's
    /// closing) frees the slot.
    pub fn poll_reply(&self, id: u32, cx: &mut Context<'_>) -> Poll<Result<T, ReplyError>> {
        let (index, seq) = split_id(id);
        let mut g = self.inner.borrow_mut();
        let g = &mut *g;
        let Some(slot) = g.slots.get_mut(index) else {
            return Poll::Ready(Err(ReplyError::Unknown(id)));
        };
        if slot.seq != seq {
            return Poll::Ready(Err(ReplyError::Stale(id)));
        }
        match std::mem::replace(&mut slot.state, State::Free) {
            State::Ready(v) => {
                g.free.push(index as u16);
                Poll::Ready(Ok(v))
            }
            State::Closed => {
                g.free.push(index as u16);
                Poll::Ready(Err(ReplyError::Closed))
            }
            State::Waiting(w) => {
                let w = match w {
                    Some(w) if w.will_wake(cx.waker()) => w,
                    _ => cx.waker().clone(),
                };
                slot.state = State::Waiting(Some(w));
                Poll::Pending
            }
            s @ (State::Free | State::Abandoned) => {
                slot.state = s;
                Poll::Ready(Err(ReplyError::Stale(id)))
            }
        }
    }

    /// Request `id` stops waiting (timed out or dropped). Its slot stays
    /// taken until the answer arrives or the link closes; an answer that
    /// already arrived is discarded and the slot freed. Nothing happens if
    /// the request already collected its answer.
    pub fn abandon(&self, id: u32) {
        let (index, seq) = split_id(id);
        let mut g = self.inner.borrow_mut();
        let g = &mut *g;
        let Some(slot) = g.slots.get_mut(index) else {
            return;
        };
        if slot.seq != seq {
            return;
        }
        match slot.state {
            State::Waiting(_) => slot.state = State::Abandoned,
            State::Ready(_) | State::Closed => {
                slot.state = State::Free;
                g.free.push(index as u16);
            }
            State::Free | State::Abandoned => {}
        }
    }

    /// The link closed: every waiting request ends with
    /// [`ReplyError::Closed`], abandoned slots are freed, and no new
    /// request is taken.
    pub fn close(&self) {
        let mut wakers = Vec::new();
        {
            let mut g = self.inner.borrow_mut();
            let g = &mut *g;
            g.closed = true;
            for (i, slot) in g.slots.iter_mut().enumerate() {
                match &mut slot.state {
                    State::Waiting(w) => {
                        wakers.extend(w.take());
                        slot.state = State::Closed;
                    }
                    State::Abandoned => {
                        slot.state = State::Free;
                        g.free.push(i as u16);
                    }
                    _ => {}
                }
            }
        }
        for w in wakers {
            w.wake();
        }
    }

    /// Requests waiting or abandoned (slots taken).
    #[cfg(test)]
    pub fn in_use(&self) -> usize {
        let g = self.inner.borrow();
        g.slots.len() - g.free.len()
    }
}

/// Abandons a request's slot when its waiting ends without collecting the
/// answer (timeout, or the request's future dropped).
pub struct AbandonOnDrop<'a, T> {
    /// The slots.
    pub slots: &'a ReplySlots<T>,
    /// The request.
    pub id: u32,
}

impl<T> Drop for AbandonOnDrop<'_, T> {
    fn drop(&mut self) {
        self.slots.abandon(self.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mirrorpoint_poller::testing::counting_waker as waker;
    use std::task::Waker;

    fn poll(s: &ReplySlots<u32>, id: u32, w: &Waker) -> Poll<Result<u32, ReplyError>> {
        s.poll_reply(id, &mut Context::from_waker(w))
    }

    #[test]
    fn answer_wakes_the_waiter_and_frees_the_slot() {
        let s = ReplySlots::default();
        let (count, w) = waker();
        let id = s.reserve().unwrap();
        assert_ne!(id, 0);
        assert_eq!(poll(&s, id, &w), Poll::Pending);
        s.complete(id, 7).unwrap();
        assert_eq!(count.get(), 1);
        assert_eq!(poll(&s, id, &w), Poll::Ready(Ok(7)));
        assert_eq!(s.in_use(), 0);
        // The slot is reused with a new sequence number.
        let id2 = s.reserve().unwrap();
        assert_eq!(id2 & 0xffff, id & 0xffff);
        assert_ne!(id2, id);
    }

    #[test]
    fn stale_duplicate_and_unknown_ids_are_refused() {
        let s = ReplySlots::default();
        let (_, w) = waker();
        let a = s.reserve().unwrap();
        s.complete(a, 1).unwrap();
        // A second answer before the first is collected.
        assert_eq!(s.complete(a, 2), Err(ReplyError::Duplicate(a)));
        assert_eq!(poll(&s, a, &w), Poll::Ready(Ok(1)));
        // An answer after it was collected: the slot is free.
        assert_eq!(s.complete(a, 3), Err(ReplyError::Stale(a)));
        // The slot reused: the old id no longer matches.
        let b = s.reserve().unwrap();
        assert_eq!(s.complete(a, 4), Err(ReplyError::Stale(a)));
        assert_eq!(poll(&s, a, &w), Poll::Ready(Err(ReplyError::Stale(a))));
        // An index never handed out.
        let unknown = (1 << 16) | 5;
        assert_eq!(s.complete(unknown, 5), Err(ReplyError::Unknown(unknown)));
        assert_eq!(s.complete(u32::MAX, 5), Err(ReplyError::Unknown(u32::MAX)));
        // The live request is untouched by all of that.
        s.complete(b, 9).unwrap();
        assert_eq!(poll(&s, b, &w), Poll::Ready(Ok(9)));
    }

    #[test]
    fn an_abandoned_slot_waits_for_its_late_answer() {
        let s = ReplySlots::default();
        let (_, w) = waker();
        let a = s.reserve().unwrap();
        assert_eq!(poll(&s, a, &w), Poll::Pending);
        s.abandon(a);
        // Still taken: a new request gets another slot, so the late answer
        // cannot reach it.
        let b = s.reserve().unwrap();
        assert_ne!(a & 0xffff, b & 0xffff);
        s.complete(a, 1).unwrap();
        assert_eq!(s.in_use(), 1);
        // Now free; its id is stale.
        assert_eq!(s.complete(a, 1), Err(ReplyError::Stale(a)));
        assert_eq!(poll(&s, b, &w), Poll::Pending);
        // An answer that arrived before the request gave up is discarded.
        s.complete(b, 2).unwrap();
        s.abandon(b);
        assert_eq!(s.in_use(), 0);
        // Abandoning after collecting does nothing.
        let c = s.reserve().unwrap();
        s.complete(c, 3).unwrap();
        assert_eq!(poll(&s, c, &w), Poll::Ready(Ok(3)));
        let d = s.reserve().unwrap();
        s.abandon(c);
        assert_eq!(s.in_use(), 1);
        s.complete(d, 4).unwrap();
        assert_eq!(poll(&s, d, &w), Poll::Ready(Ok(4)));
    }

    #[test]
    fn close_ends_every_waiter_and_refuses_new_requests() {
        let s = ReplySlots::default();
        let (count, w) = waker();
        let a = s.reserve().unwrap();
        let b = s.reserve().unwrap();
        let c = s.reserve().unwrap();
        assert_eq!(poll(&s, a, &w), Poll::Pending);
        assert_eq!(poll(&s, b, &w), Poll::Pending);
        s.abandon(c);
        s.close();
        assert_eq!(count.get(), 2);
        assert_eq!(poll(&s, a, &w), Poll::Ready(Err(ReplyError::Closed)));
        assert_eq!(poll(&s, b, &w), Poll::Ready(Err(ReplyError::Closed)));
        assert_eq!(s.complete(c, 1), Err(ReplyError::Stale(c)));
        assert_eq!(s.in_use(), 0);
        assert_eq!(s.reserve(), Err(ReplyError::Closed));
    }

    #[test]
    fn a_full_slab_refuses_and_recovers() {
        let s = ReplySlots::with_limit(3);
        let (_, w) = waker();
        let ids: Vec<u32> = (0..3).map(|_| s.reserve().unwrap()).collect();
        assert_eq!(s.reserve(), Err(ReplyError::Full(3)));
        s.complete(ids[1], 1).unwrap();
        assert_eq!(poll(&s, ids[1], &w), Poll::Ready(Ok(1)));
        let again = s.reserve().unwrap();
        assert_eq!(again & 0xffff, ids[1] & 0xffff);
    }

    #[test]
    fn sequence_numbers_wrap_without_zero_ids() {
        let s = ReplySlots::default();
        let (_, w) = waker();
        let mut last = 0;
        for i in 0..70_000u32 {
            let id = s.reserve().unwrap();
            assert_ne!(id, 0);
            assert_ne!(id, last);
            assert_eq!(id & 0xffff, 0);
            s.complete(id, i).unwrap();
            assert_eq!(poll(&s, id, &w), Poll::Ready(Ok(i)));
            last = id;
        }
    }

    #[test]
    fn random_answers_never_reach_the_wrong_request() {
        // Many requests in flight, answered out of order with stale,
        // duplicate and forged ids mixed in: each waiter gets exactly its
        // own answer (the value is its id).
        let s = ReplySlots::with_limit(64);
        let (_, w) = waker();
        let mut live: Vec<u32> = Vec::new();
        let mut done: Vec<u32> = Vec::new();
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        for _ in 0..20_000 {
            match next() % 4 {
                0 | 1 => {
                    if let Ok(id) = s.reserve() {
                        assert_eq!(poll(&s, id, &w), Poll::Pending);
                        live.push(id);
                    }
                }
                2 if !live.is_empty() => {
                    let i = (next() as usize) % live.len();
                    let id = live.swap_remove(i);
                    s.complete(id, id).unwrap();
                    assert_eq!(poll(&s, id, &w), Poll::Ready(Ok(id)));
                    done.push(id);
                }
                _ if !done.is_empty() => {
                    let old = done[(next() as usize) % done.len()];
                    if !live.contains(&old) {
                        assert!(s.complete(old, 0).is_err());
                    }
                }
                _ => {}
            }
        }
        for id in live {
            s.complete(id, id).unwrap();
            assert_eq!(poll(&s, id, &w), Poll::Ready(Ok(id)));
        }
        assert_eq!(s.in_use(), 0);
    }
}
