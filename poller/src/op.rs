//! In-flight io_uring operations and the futures that wait for them.
//!
//! Every SQE a reactor submits carries the index of a slot in the reactor's
//! [`OpTable`] as its user data. The [`Op`] future that submitted it owns
//! whatever memory the kernel reads or writes (buffers, iovecs, addresses):
//! when the completion arrives the reactor stores the result in the slot and
//! wakes the task, and the future hands the result and the resources back.
//! If the future is dropped first, its resources move into the slot and stay
//! there until the kernel is done with them ("ownership passing", as in
//! tokio-uring and monoio): the kernel never touches freed memory.

use crate::reactor;
use std::any::Any;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};

/// What kind of work an op is: shutdown waits for data ops to finish and
/// cancels long-lived ones (socket receives, accepts, the doorbell read).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpKind {
    /// Disk I/O, fsync, fallocate, sends: finishes by itself soon.
    Data,
    /// Waits for the outside world: may never finish by itself.
    LongLived,
}

enum Slot {
    Free,
    Pending {
        waker: Option<Waker>,
        kind: OpKind,
    },
    Done {
        result: i32,
        flags: u32,
    },
    Abandoned {
        _resources: Box<dyn Any>,
        kind: OpKind,
        on_result: Option<fn(i32)>,
    },
}

/// The slots of one reactor's in-flight operations.
#[derive(Default)]
pub struct OpTable {
    slots: Vec<Slot>,
    free: Vec<u32>,
    in_flight_data: usize,
    in_flight_long: usize,
}

impl OpTable {
    /// Reserves a slot for an op about to be submitted.
    pub fn reserve(&mut self, kind: OpKind) -> u32 {
        self.count(kind, 1);
        let slot = Slot::Pending { waker: None, kind };
        match self.free.pop() {
            Some(i) => {
                self.slots[i as usize] = slot;
                i
            }
            None => {
                self.slots.push(slot);
                (self.slots.len() - 1) as u32
            }
        }
    }

    fn count(&mut self, kind: OpKind, delta: isize) {
        let c = match kind {
            OpKind::Data => &mut self.in_flight_data,
            OpKind::LongLived => &mut self.in_flight_long,
        };
        *c = c.wrapping_add_signed(delta);
    }

    /// Data ops the kernel still holds.
    pub fn in_flight_data(&self) -> usize {
        self.in_flight_data
    }

    /// All ops the kernel still holds.
    pub fn in_flight(&self) -> usize {
        self.in_flight_data + self.in_flight_long
    }

    /// Records a completion; wakes the waiting task, or frees an abandoned slot.
    pub fn complete(&mut self, index: u32, result: i32, flags: u32) {
        let Some(slot) = self.slots.get_mut(index as usize) else {
            return;
        };
        match std::mem::replace(slot, Slot::Done { result, flags }) {
            Slot::Pending { waker, kind } => {
                self.count(kind, -1);
                if let Some(w) = waker {
                    w.wake();
                }
            }
            Slot::Abandoned {
                kind, on_result, ..
            } => {
                *slot = Slot::Free;
                self.free.push(index);
                self.count(kind, -1);
                if let Some(f) = on_result {
                    f(result);
                }
            }
            // A completion for a slot that is not in flight: keep what was there.
            other => *slot = other,
        }
    }

    /// Polls a slot: the result when done (freeing the slot), else stores the waker.
    fn poll(&mut self, index: u32, waker: &Waker) -> Option<(i32, u32)> {
        let slot = self.slots.get_mut(index as usize)?;
        match slot {
            Slot::Done { result, flags } => {
                let out = (*result, *flags);
                *slot = Slot::Free;
                self.free.push(index);
                Some(out)
            }
            Slot::Pending { waker: w, .. } => {
                match w {
                    Some(old) if old.will_wake(waker) => {}
                    _ => *w = Some(waker.clone()),
                }
                None
            }
            Slot::Free | Slot::Abandoned { .. } => Some((-libc::ECANCELED, 0)),
        }
    }

    /// The future went away before the completion: park its resources, and
    /// hand the eventual result to `on_result` (e.g. to close an accepted fd).
    fn abandon(&mut self, index: u32, resources: Box<dyn Any>, on_result: Option<fn(i32)>) {
        let Some(slot) = self.slots.get_mut(index as usize) else {
            return;
        };
        match slot {
            Slot::Pending { kind, .. } => {
                let kind = *kind;
                *slot = Slot::Abandoned {
                    _resources: resources,
                    kind,
                    on_result,
                };
            }
            Slot::Done { result, .. } => {
                let result = *result;
                *slot = Slot::Free;
                self.free.push(index);
                if let Some(f) = on_result {
                    f(result);
                }
            }
            Slot::Free | Slot::Abandoned { .. } => {}
        }
    }

    /// Indices of ops still held by the kernel (for cancellation at teardown).
    pub fn pending_indices(&self) -> Vec<u32> {
        self.slots
            .iter()
            .enumerate()
            .filter(|(_, s)| matches!(s, Slot::Pending { .. } | Slot::Abandoned { .. }))
            .map(|(i, _)| i as u32)
            .collect()
    }

    /// Empties the table for teardown, returning what it held so the caller
    /// can drop it outside any borrow. With `leak_in_flight`, resources the
    /// kernel may still use are leaked instead of freed.
    pub fn take_all(&mut self, leak_in_flight: bool) -> Vec<Box<dyn Any>> {
        let mut out: Vec<Box<dyn Any>> = Vec::new();
        for slot in self.slots.drain(..) {
            match slot {
                Slot::Pending { waker: Some(w), .. } => out.push(Box::new(w)),
                Slot::Abandoned {
                    _resources,
                    on_result,
                    ..
                } => {
                    // The kernel never answered; nothing to hand to on_result.
                    let _ = on_result;
                    if leak_in_flight {
                        std::mem::forget(_resources);
                    } else {
                        out.push(_resources);
                    }
                }
                _ => {}
            }
        }
        self.free.clear();
        self.in_flight_data = 0;
        self.in_flight_long = 0;
        out
    }
}

/// A submitted operation; resolves to the raw CQE result and the resources.
pub struct Op<R: 'static> {
    index: u32,
    resources: Option<R>,
    on_orphaned_result: Option<fn(i32)>,
}

impl<R: 'static> Op<R> {
    /// Queues `entry` on the current reactor's ring; `resources` stay with the
    /// op until the kernel completes it.
    ///
    /// # Safety
    /// Every pointer in `entry` must point into memory owned by `resources`
    /// that does not move when `resources` moves (heap or pool memory), or to
    /// memory that outlives the operation (e.g. `'static`), and stay valid
    /// while `resources` lives.
    ///
    /// # Panics
    /// Outside a reactor thread: ops exist only on reactors.
    pub unsafe fn submit(entry: io_uring::squeue::Entry, kind: OpKind, resources: R) -> Op<R> {
        let index = reactor::with_core(|core| {
            // SAFETY: forwarded from this function's contract.
            unsafe { core.submit_entry(entry, kind) }
        });
        Op {
            index,
            resources: Some(resources),
            on_orphaned_result: None,
        }
    }

    /// [`submit`](Self::submit) for a disk request (file read, write, sync,
    /// fallocate): queued the same way, then handed to the kernel at once
    /// or at the end of the turn as the reactor's `DiskSubmit` says.
    ///
    /// # Safety
    /// As for [`submit`](Self::submit).
    ///
    /// # Panics
    /// Outside a reactor thread.
    pub unsafe fn submit_disk(entry: io_uring::squeue::Entry, resources: R) -> Op<R> {
        let index = reactor::with_core(|core| {
            // SAFETY: forwarded from this function's contract.
            let index = unsafe { core.submit_entry(entry, OpKind::Data) };
            core.disk_request_queued();
            index
        });
        Op {
            index,
            resources: Some(resources),
            on_orphaned_result: None,
        }
    }

    /// Runs `f` with the CQE result if this future is dropped before the op
    /// completes: for ops whose result is itself a resource (an accepted
    /// socket, an opened file) that would otherwise leak.
    pub fn on_orphaned_result(mut self, f: fn(i32)) -> Self {
        self.on_orphaned_result = Some(f);
        self
    }
}

/// The result of an op: the CQE's `res` (negative errno on failure) and flags.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Completion {
    /// `res` from the CQE.
    pub result: i32,
    /// `flags` from the CQE.
    pub flags: u32,
}

impl Completion {
    /// `res` as an io::Result: bytes transferred or an errno.
    pub fn into_io(self) -> io::Result<u32> {
        if self.result < 0 {
            Err(io::Error::from_raw_os_error(-self.result))
        } else {
            Ok(self.result as u32)
        }
    }
}

impl<R: Unpin + 'static> Future for Op<R> {
    type Output = (Completion, R);

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let index = self.index;
        let done = reactor::with_core(|core| core.ops.borrow_mut().poll(index, cx.waker()));
        match done {
            Some((result, flags)) => match self.resources.take() {
                Some(r) => Poll::Ready((Completion { result, flags }, r)),
                None => Poll::Pending, // polled after completion: never resolves twice
            },
            None => Poll::Pending,
        }
    }
}

impl<R: 'static> Drop for Op<R> {
    fn drop(&mut self) {
        if let Some(resources) = self.resources.take() {
            let index = self.index;
            let on_result = self.on_orphaned_result;
            let parked = reactor::try_with_core(|core| {
                core.ops
                    .borrow_mut()
                    .abandon(index, Box::new(resources), on_result);
            });
            if parked.is_none() {
                // Not on a reactor any more (teardown raced): the kernel may still
                // use the memory, so it must not be freed.
                tracing::warn!("op dropped off its reactor; leaking its resources");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::counting_waker;
    use std::sync::atomic::{AtomicUsize, Ordering};

    static ORPHAN: AtomicUsize = AtomicUsize::new(0);

    fn record_orphan(result: i32) {
        ORPHAN.store(result as usize, Ordering::SeqCst);
    }

    #[test]
    fn slot_lifecycle_and_counts() {
        let (count, waker) = counting_waker();
        let mut t = OpTable::default();
        let a = t.reserve(OpKind::Data);
        let b = t.reserve(OpKind::LongLived);
        assert_eq!((t.in_flight_data(), t.in_flight()), (1, 2));
        assert_eq!(t.poll(a, &waker), None);
        t.complete(a, 4096, 0);
        assert_eq!(count.get(), 1);
        assert_eq!(t.poll(a, &waker), Some((4096, 0)));
        t.abandon(b, Box::new(vec![0u8; 8]), Some(record_orphan));
        assert_eq!(t.pending_indices(), vec![b]);
        t.complete(b, 77, 0);
        assert_eq!(
            ORPHAN.load(Ordering::SeqCst),
            77,
            "orphaned result handed over"
        );
        assert_eq!(t.in_flight(), 0);
        assert!(t.pending_indices().is_empty());
        // Both slots are reused.
        let c = t.reserve(OpKind::Data);
        let d = t.reserve(OpKind::Data);
        let mut reused = [c, d];
        reused.sort();
        assert_eq!(reused, [a.min(b), a.max(b)]);
        // A stray completion for an unknown slot is ignored.
        t.complete(999, 0, 0);
    }
}
