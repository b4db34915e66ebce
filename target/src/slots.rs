//! Command slots: a connection's in-flight I/O commands, run without a
//! spawned task (and so without an allocation or a task wake-up) per command.
//! Used by both front ends: NVMe/TCP I/O queues (one slot per submission
//! queue entry) and iSCSI connections (one per command the session's CmdSN
//! window admits).
//!
//! Shape, and why:
//! * **One slot per submission queue entry.** A queue pair never has more
//!   commands outstanding than its queue size (SQ flow control, enforced by
//!   the receive loop), so a connection gets a table sized by the queue size
//!   negotiated at Connect. A slot is a pinned, reusable box holding one
//!   command's future (`Pin<Box<Option<F>>>`, refilled with [`Pin::set`]);
//!   boxes are made on first use, so after warm-up starting a command
//!   allocates nothing. All commands of a connection are futures of one type
//!   `F` (one `async fn`); [`CommandSlots`] erases it, so the connection need
//!   not name it.
//! * **Started inline.** [`CommandSlots::start`] creates the future in a free
//!   slot and polls it once right away, on the receive loop: a volume call
//!   that completes at once completes the command there; an io_uring request
//!   is queued in the same batch as the receive that brought the command.
//! * **Woken per slot, driven per connection.** Each slot has its own waker
//!   (made once): waking it sets the slot's bit in a [`ReadySet`] and wakes
//!   the connection's one driver task, which polls only the slots whose bits
//!   are set. Many commands completing in one reactor turn schedule the driver
//!   once. Wakers are `Send` and may fire on any thread (nothing on the data
//!   path does so today), hence atomics and a mutex in `ReadySet` rather than
//!   `Cell`s; the `loom` model at the bottom checks that no wake-up is lost.
//! * **Never refuses work it cannot fit.** [`Started::Full`] hands the job
//!   back when every slot is busy (a host that outran flow control, which the
//!   receive loop does not let happen); the caller then runs it as a task of
//!   its own, as before this module.

#[cfg(loom)]
use loom::sync::{
    atomic::{AtomicU64, Ordering},
    Mutex, MutexGuard,
};
use std::cell::{Cell, RefCell};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
#[cfg(not(loom))]
use std::sync::{
    atomic::{AtomicU64, Ordering},
    Mutex, MutexGuard,
};
use std::task::{Context, Poll, Wake, Waker};

const WORD: usize = 64;

/// Which slots were woken since the driver last looked, and the driver's
/// waker.
pub struct ReadySet {
    words: Box<[AtomicU64]>,
    driver: Mutex<Option<Waker>>,
}

impl ReadySet {
    /// A set for `slots` slots, none woken, no driver registered.
    pub fn new(slots: usize) -> ReadySet {
        let words = (0..slots.div_ceil(WORD).max(1))
            .map(|_| AtomicU64::new(0))
            .collect();
        ReadySet {
            words,
            driver: Mutex::new(None),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Option<Waker>> {
        self.driver.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Marks slot `index` woken and wakes the driver, unless another slot of
    /// the same word was already marked since the driver last took the word
    /// (whoever marked that one wakes, or has woken, the driver).
    pub fn mark(&self, index: usize) {
        let Some(word) = self.words.get(index / WORD) else {
            return;
        };
        let prev = word.fetch_or(1 << (index % WORD), Ordering::AcqRel);
        if prev == 0 {
            self.wake_driver();
        }
    }

    /// Wakes the driver (if one is registered).
    pub fn wake_driver(&self) {
        if let Some(w) = self.lock().as_ref() {
            w.wake_by_ref();
        }
    }

    /// Registers the driver's waker. Call before taking the words, so that a
    /// slot marked after its word was taken wakes this driver.
    pub fn register(&self, waker: &Waker) {
        let mut g = self.lock();
        match &*g {
            Some(w) if w.will_wake(waker) => {}
            _ => *g = Some(waker.clone()),
        }
    }

    /// Forgets the driver's waker.
    pub fn unregister(&self) {
        self.lock().take();
    }

    /// Number of 64-slot words.
    pub fn words(&self) -> usize {
        self.words.len()
    }

    /// Takes (and clears) the woken bits of word `k`.
    pub fn take(&self, k: usize) -> u64 {
        self.words.get(k).map_or(0, |w| w.swap(0, Ordering::AcqRel))
    }
}

/// One slot's waker.
struct SlotWake {
    index: usize,
    ready: Arc<ReadySet>,
}

impl Wake for SlotWake {
    fn wake(self: Arc<Self>) {
        self.ready.mark(self.index);
    }
    fn wake_by_ref(self: &Arc<Self>) {
        self.ready.mark(self.index);
    }
}

/// What [`CommandSlots::start`] did with a job.
pub enum Started<J, T> {
    /// It completed during its first poll.
    Done(T),
    /// It is in a slot; the driver will finish it.
    Parked,
    /// Every slot is busy: here is the job back.
    Full(J),
}

/// A connection's command slots, with the future type erased.
pub trait CommandSlots<J, T> {
    /// Starts `job` in a free slot and polls it once.
    fn start(&self, job: J) -> Started<J, T>;
    /// The driver: registers `cx`'s waker, then polls every slot woken since
    /// the last call, handing each finished command's output to `done`.
    fn poll_woken(&self, cx: &mut Context<'_>, done: &mut dyn FnMut(T));
    /// Commands in slots.
    fn busy(&self) -> usize;
    /// Wakes the driver (e.g. to notice the connection is closing).
    fn wake_driver(&self);
    /// Forgets the driver's waker (the driver is gone).
    fn unregister(&self);
}

struct Slot<F> {
    fut: Pin<Box<Option<F>>>,
    waker: Waker,
}

/// Command slots whose futures are made by `make`.
pub struct Slots<J, F: Future> {
    make: fn(J) -> F,
    cap: usize,
    slots: RefCell<Vec<Slot<F>>>,
    free: RefCell<Vec<usize>>,
    ready: Arc<ReadySet>,
    busy: Cell<usize>,
}

impl<J, F: Future> Slots<J, F> {
    /// A table of at most `cap` slots (at least one).
    pub fn new(cap: usize, make: fn(J) -> F) -> Slots<J, F> {
        let cap = cap.max(1);
        Slots {
            make,
            cap,
            slots: RefCell::new(Vec::with_capacity(cap)),
            free: RefCell::new(Vec::with_capacity(cap)),
            ready: Arc::new(ReadySet::new(cap)),
            busy: Cell::new(0),
        }
    }

    /// A free slot's index, making a slot if none is free and there is room.
    fn free_slot(&self) -> Option<usize> {
        if let Some(i) = self.free.borrow_mut().pop() {
            return Some(i);
        }
        let mut slots = self.slots.borrow_mut();
        let i = slots.len();
        if i >= self.cap {
            return None;
        }
        let waker = Waker::from(Arc::new(SlotWake {
            index: i,
            ready: self.ready.clone(),
        }));
        slots.push(Slot {
            fut: Box::pin(None),
            waker,
        });
        Some(i)
    }

    /// Polls slot `i` once; its output if it finished (the slot is then free).
    fn poll_slot(&self, i: usize) -> Option<F::Output> {
        let out = {
            let mut slots = self.slots.borrow_mut();
            let slot = slots.get_mut(i)?;
            let waker = slot.waker.clone();
            let mut cx = Context::from_waker(&waker);
            let fut = slot.fut.as_mut().as_pin_mut()?;
            match fut.poll(&mut cx) {
                Poll::Ready(out) => {
                    slot.fut.as_mut().set(None);
                    out
                }
                Poll::Pending => return None,
            }
        };
        self.free.borrow_mut().push(i);
        self.busy.set(self.busy.get() - 1);
        Some(out)
    }
}

impl<J, F: Future> CommandSlots<J, F::Output> for Slots<J, F> {
    fn start(&self, job: J) -> Started<J, F::Output> {
        let Some(i) = self.free_slot() else {
            return Started::Full(job);
        };
        {
            let mut slots = self.slots.borrow_mut();
            let Some(slot) = slots.get_mut(i) else {
                return Started::Full(job);
            };
            slot.fut.as_mut().set(Some((self.make)(job)));
        }
        self.busy.set(self.busy.get() + 1);
        match self.poll_slot(i) {
            Some(out) => Started::Done(out),
            None => Started::Parked,
        }
    }

    fn poll_woken(&self, cx: &mut Context<'_>, done: &mut dyn FnMut(F::Output)) {
        self.ready.register(cx.waker());
        for k in 0..self.ready.words() {
            let mut bits = self.ready.take(k);
            while bits != 0 {
                let b = bits.trailing_zeros() as usize;
                bits &= bits - 1;
                if let Some(out) = self.poll_slot(k * WORD + b) {
                    done(out);
                }
            }
        }
    }

    fn busy(&self) -> usize {
        self.busy.get()
    }

    fn wake_driver(&self) {
        self.ready.wake_driver();
    }

    fn unregister(&self) {
        self.ready.unregister();
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use std::rc::Rc;
    use std::sync::atomic::AtomicUsize;

    /// A future that is pending until its gate opens, then yields its value.
    struct Gate {
        open: Rc<Cell<bool>>,
        waker: Rc<RefCell<Option<Waker>>>,
        value: u32,
    }

    impl Future for Gate {
        type Output = u32;
        fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<u32> {
            if self.open.get() {
                Poll::Ready(self.value)
            } else {
                *self.waker.borrow_mut() = Some(cx.waker().clone());
                Poll::Pending
            }
        }
    }

    struct CountWake(AtomicUsize);
    impl Wake for CountWake {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    type Job = (u32, Rc<Cell<bool>>, Rc<RefCell<Option<Waker>>>);

    fn gate(job: Job) -> Gate {
        Gate {
            value: job.0,
            open: job.1,
            waker: job.2,
        }
    }

    fn job(v: u32, open: bool) -> Job {
        (v, Rc::new(Cell::new(open)), Rc::new(RefCell::new(None)))
    }

    #[test]
    fn ready_at_once_completes_inline_and_frees_the_slot() {
        let s = Slots::new(2, gate);
        for v in 0..10 {
            match s.start(job(v, true)) {
                Started::Done(out) => assert_eq!(out, v),
                _ => panic!("an open gate completes on its first poll"),
            }
        }
        assert_eq!(s.busy(), 0);
        // Only one slot was ever made.
        assert_eq!(s.slots.borrow().len(), 1);
    }

    #[test]
    fn parked_commands_finish_when_woken_and_only_those_are_polled() {
        let s = Slots::new(3, gate);
        let driver = Arc::new(CountWake(AtomicUsize::new(0)));
        let dw = Waker::from(driver.clone());
        let mut cx = Context::from_waker(&dw);
        let jobs: Vec<Job> = (0..3).map(|v| job(v, false)).collect();
        for j in &jobs {
            assert!(matches!(s.start(j.clone()), Started::Parked));
        }
        assert_eq!(s.busy(), 3);
        // A fourth does not fit: handed back.
        assert!(matches!(s.start(job(9, true)), Started::Full((9, _, _))));
        let mut out = Vec::new();
        s.poll_woken(&mut cx, &mut |v| out.push(v));
        assert!(out.is_empty(), "nothing was woken");
        // Open gate 1 and wake its slot's waker: the driver is woken once.
        jobs[1].1.set(true);
        let w = jobs[1].2.borrow_mut().take().expect("slot waker");
        w.wake();
        assert_eq!(driver.0.load(Ordering::SeqCst), 1);
        // Gate 2 opens without a wake-up: it must not complete (not polled).
        jobs[2].1.set(true);
        s.poll_woken(&mut cx, &mut |v| out.push(v));
        assert_eq!(out, vec![1]);
        assert_eq!(s.busy(), 2);
        // A new command reuses the freed slot.
        assert!(matches!(s.start(job(7, false)), Started::Parked));
        assert_eq!(s.slots.borrow().len(), 3);
        let w2 = jobs[2].2.borrow_mut().take().expect("slot waker");
        w2.wake_by_ref();
        jobs[0].1.set(true);
        jobs[0].2.borrow_mut().take().expect("slot waker").wake();
        s.poll_woken(&mut cx, &mut |v| out.push(v));
        out.sort_unstable();
        assert_eq!(out, vec![0, 1, 2]);
        assert_eq!(s.busy(), 1);
        // A stale waker of a reused slot only causes a harmless poll.
        w2.wake();
        s.poll_woken(&mut cx, &mut |v| out.push(v));
        assert_eq!(out.len(), 3);
    }

    #[test]
    fn wakes_from_other_threads_reach_the_driver() {
        let s = Slots::new(200, gate);
        let driver = Arc::new(CountWake(AtomicUsize::new(0)));
        let dw = Waker::from(driver.clone());
        let mut cx = Context::from_waker(&dw);
        s.poll_woken(&mut cx, &mut |_| {});
        let mut jobs = Vec::new();
        for v in 0..200 {
            let j = job(v, false);
            assert!(matches!(s.start(j.clone()), Started::Parked));
            jobs.push(j);
        }
        let wakers: Vec<Waker> = jobs
            .iter()
            .map(|j| {
                j.1.set(true);
                j.2.borrow_mut().take().expect("slot waker")
            })
            .collect();
        let handles: Vec<_> = wakers
            .chunks(50)
            .map(|c| {
                let c = c.to_vec();
                std::thread::spawn(move || c.into_iter().for_each(Waker::wake))
            })
            .collect();
        for h in handles {
            h.join().expect("waker thread");
        }
        assert!(driver.0.load(Ordering::SeqCst) >= 1);
        let mut n = 0;
        s.poll_woken(&mut cx, &mut |_| n += 1);
        assert_eq!(n, 200);
        assert_eq!(s.busy(), 0);
    }
}

#[cfg(all(test, loom))]
mod loom_tests {
    use super::*;
    use loom::sync::atomic::AtomicBool;
    use loom::thread;

    struct Flag(AtomicBool);
    impl Wake for Flag {
        fn wake(self: Arc<Self>) {
            self.0.store(true, Ordering::SeqCst);
        }
        fn wake_by_ref(self: &Arc<Self>) {
            self.0.store(true, Ordering::SeqCst);
        }
    }

    /// Two slots (same word) woken on two threads while the driver registers
    /// and takes the word: every mark is either seen by that take or leaves
    /// the driver woken (so it will take the word again). No lost wake-up.
    #[test]
    fn no_lost_slot_wakeup() {
        loom::model(|| {
            let set = loom::sync::Arc::new(ReadySet::new(2));
            let flag = Arc::new(Flag(AtomicBool::new(false)));
            let waker = Waker::from(flag.clone());
            let marks: Vec<_> = (0..2)
                .map(|i| {
                    let set = set.clone();
                    thread::spawn(move || set.mark(i))
                })
                .collect();
            set.register(&waker);
            let seen = set.take(0);
            for m in marks {
                m.join().expect("marker");
            }
            let rest = set.take(0);
            // Whatever the first take missed, the driver was woken for it.
            if rest != 0 {
                assert!(flag.0.load(Ordering::SeqCst), "lost wake-up: {rest:#b}");
            }
            assert_eq!(seen | rest, 0b11);
        });
    }
}
