//! Small synchronisation tools for tasks.
//!
//! [`LocalSemaphore`] bounds a queue depth between tasks of one reactor
//! (no atomics: tasks never leave their reactor). [`LocalNotify`] is a
//! one-waiter wake-up flag between tasks of one reactor (a writer task
//! waiting for work, a closer waiting for the writer to go idle). [`oneshot`] carries one
//! value from any thread to a task or a thread waiting on it, which is how a
//! reactor answers a request posted by another core or by the admin thread.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::{Arc, Condvar, Mutex};
use std::task::{Context, Poll, Waker};

/// A one-waiter wake-up flag for tasks of one reactor: [`notify`] sets it
/// and wakes the waiter; [`wait`] returns once it is set, clearing it. A
/// notification with nobody waiting is kept for the next wait; several
/// notifications before a wait count as one.
///
/// [`notify`]: LocalNotify::notify
/// [`wait`]: LocalNotify::wait
#[derive(Default)]
pub struct LocalNotify {
    set: Cell<bool>,
    waker: RefCell<Option<Waker>>,
}

impl LocalNotify {
    /// Sets the flag and wakes the waiter, if any.
    pub fn notify(&self) {
        self.set.set(true);
        if let Some(w) = self.waker.borrow_mut().take() {
            w.wake();
        }
    }

    /// Waits until the flag is set, then clears it. Only the latest waiter
    /// is woken.
    pub fn wait(&self) -> impl Future<Output = ()> + '_ {
        std::future::poll_fn(move |cx: &mut Context<'_>| {
            if self.set.replace(false) {
                Poll::Ready(())
            } else {
                *self.waker.borrow_mut() = Some(cx.waker().clone());
                Poll::Pending
            }
        })
    }
}

/// A counting semaphore for tasks on one reactor.
#[derive(Clone)]
pub struct LocalSemaphore {
    inner: Rc<SemInner>,
}

struct SemInner {
    permits: Cell<usize>,
    /// Waiting acquirers, oldest first: (registration id, its latest waker).
    waiters: RefCell<VecDeque<(u64, Waker)>>,
    next_id: Cell<u64>,
}

impl SemInner {
    /// Wakes the oldest waiter (it leaves the queue; see [`Acquire`]).
    fn wake_next(&self) {
        let next = self.waiters.borrow_mut().pop_front();
        if let Some((_, w)) = next {
            w.wake();
        }
    }
}

/// Gives its permit back on drop.
pub struct LocalPermit {
    inner: Rc<SemInner>,
}

impl LocalSemaphore {
    /// A semaphore with `permits` permits.
    pub fn new(permits: usize) -> Self {
        LocalSemaphore {
            inner: Rc::new(SemInner {
                permits: Cell::new(permits),
                waiters: RefCell::new(VecDeque::new()),
                next_id: Cell::new(0),
            }),
        }
    }

    /// Permits available now.
    pub fn available(&self) -> usize {
        self.inner.permits.get()
    }

    /// Waits for a permit.
    pub fn acquire(&self) -> Acquire<'_> {
        Acquire {
            sem: self,
            id: None,
        }
    }
}

/// Future of [`LocalSemaphore::acquire`].
///
/// A waiting acquirer has exactly one entry in the queue, whatever how often
/// it is polled (a re-poll only refreshes its waker): a second entry would
/// later take a release's wake-up for a task that no longer waits, and the
/// waiter behind it would never be woken. A release pops the oldest entry
/// and wakes it; an acquirer dropped while queued leaves the queue, and one
/// dropped after being woken but before taking the permit wakes the next.
pub struct Acquire<'a> {
    sem: &'a LocalSemaphore,
    /// Registration id once it waited (queued, or popped and woken).
    id: Option<u64>,
}

impl Future for Acquire<'_> {
    type Output = LocalPermit;
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<LocalPermit> {
        let this = self.get_mut();
        let inner = &this.sem.inner;
        let n = inner.permits.get();
        if n > 0 {
            inner.permits.set(n - 1);
            if let Some(id) = this.id.take() {
                inner.waiters.borrow_mut().retain(|(i, _)| *i != id);
            }
            return Poll::Ready(LocalPermit {
                inner: inner.clone(),
            });
        }
        let mut waiters = inner.waiters.borrow_mut();
        let queued = this
            .id
            .and_then(|id| waiters.iter_mut().find(|(i, _)| *i == id));
        match queued {
            Some(entry) => entry.1.clone_from(cx.waker()),
            None => {
                // First wait, or woken and beaten to the permit: (re)queue.
                let id = this.id.unwrap_or_else(|| {
                    let id = inner.next_id.get();
                    inner.next_id.set(id.wrapping_add(1));
                    id
                });
                this.id = Some(id);
                waiters.push_back((id, cx.waker().clone()));
            }
        }
        Poll::Pending
    }
}

impl Drop for Acquire<'_> {
    fn drop(&mut self) {
        let Some(id) = self.id else { return };
        let inner = &self.sem.inner;
        let was_queued = {
            let mut waiters = inner.waiters.borrow_mut();
            let before = waiters.len();
            waiters.retain(|(i, _)| *i != id);
            waiters.len() != before
        };
        // Woken (popped) but gone without the permit: pass the wake-up on.
        if !was_queued && inner.permits.get() > 0 {
            inner.wake_next();
        }
    }
}

impl Drop for LocalPermit {
    fn drop(&mut self) {
        self.inner.permits.set(self.inner.permits.get() + 1);
        self.inner.wake_next();
    }
}

struct OneshotState<T> {
    value: Option<T>,
    sender_gone: bool,
    waker: Option<Waker>,
}

struct OneshotInner<T> {
    state: Mutex<OneshotState<T>>,
    ready: Condvar,
}

/// Sends the one value.
pub struct OneshotSender<T> {
    inner: Arc<OneshotInner<T>>,
}

/// Receives the one value: `.await` it on a reactor, or `recv_blocking` elsewhere.
pub struct OneshotReceiver<T> {
    inner: Arc<OneshotInner<T>>,
}

/// The sender went away without sending.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the sending side went away without an answer")]
pub struct Canceled;

/// A channel for exactly one value.
pub fn oneshot<T>() -> (OneshotSender<T>, OneshotReceiver<T>) {
    let inner = Arc::new(OneshotInner {
        state: Mutex::new(OneshotState {
            value: None,
            sender_gone: false,
            waker: None,
        }),
        ready: Condvar::new(),
    });
    (
        OneshotSender {
            inner: inner.clone(),
        },
        OneshotReceiver { inner },
    )
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic while holding this lock cannot leave the state inconsistent
    // (each critical section is a few field writes), so poisoning is ignored.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl<T> OneshotSender<T> {
    /// Sends the value, waking the receiver.
    pub fn send(self, value: T) {
        let waker = {
            let mut st = lock(&self.inner.state);
            st.value = Some(value);
            st.waker.take()
        };
        self.inner.ready.notify_all();
        if let Some(w) = waker {
            w.wake();
        }
    }
}

impl<T> Drop for OneshotSender<T> {
    fn drop(&mut self) {
        let waker = {
            let mut st = lock(&self.inner.state);
            st.sender_gone = true;
            st.waker.take()
        };
        self.inner.ready.notify_all();
        if let Some(w) = waker {
            w.wake();
        }
    }
}

impl<T> OneshotReceiver<T> {
    /// Blocks the calling (non-reactor) thread until the value arrives.
    pub fn recv_blocking(self) -> Result<T, Canceled> {
        let mut st = lock(&self.inner.state);
        loop {
            if let Some(v) = st.value.take() {
                return Ok(v);
            }
            if st.sender_gone {
                return Err(Canceled);
            }
            st = self.inner.ready.wait(st).unwrap_or_else(|p| p.into_inner());
        }
    }
}

impl<T> Future for OneshotReceiver<T> {
    type Output = Result<T, Canceled>;
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut st = lock(&self.inner.state);
        if let Some(v) = st.value.take() {
            return Poll::Ready(Ok(v));
        }
        if st.sender_gone {
            return Poll::Ready(Err(Canceled));
        }
        st.waker = Some(cx.waker().clone());
        Poll::Pending
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::counting_waker as counter;

    fn poll<F: Future + Unpin>(f: &mut F, w: &Waker) -> Poll<F::Output> {
        Pin::new(f).poll(&mut Context::from_waker(w))
    }

    /// A notification before the wait is kept; several count as one; a
    /// waiting task is woken by the next one.
    #[test]
    fn notify_is_kept_until_waited_for_and_wakes_the_waiter() {
        let n = LocalNotify::default();
        let (count, w) = counter();
        n.notify();
        n.notify();
        assert!(poll(&mut Box::pin(n.wait()), &w).is_ready());
        let mut again = Box::pin(n.wait());
        assert!(poll(&mut again, &w).is_pending(), "two notifies are one");
        n.notify();
        assert_eq!(count.get(), 1, "the waiter is woken");
        assert!(poll(&mut again, &w).is_ready());
    }

    /// A waiter polled again while it waits (as `join_all` does with every
    /// child when any of them is woken) must not leave a stale registration
    /// that swallows the wake-up meant for the next waiter.
    #[test]
    fn a_waiter_polled_twice_does_not_swallow_the_next_wakeup() {
        let sem = LocalSemaphore::new(1);
        let (_, wa) = counter();
        let Poll::Ready(pa) = poll(&mut sem.acquire(), &wa) else {
            panic!("first acquire waits");
        };
        let (cb, wb) = counter();
        let mut b = sem.acquire();
        assert!(poll(&mut b, &wb).is_pending());
        assert!(poll(&mut b, &wb).is_pending());
        let (cc, wc) = counter();
        let mut c = sem.acquire();
        assert!(poll(&mut c, &wc).is_pending());
        drop(pa);
        assert_eq!(cb.get(), 1, "b woken");
        let Poll::Ready(pb) = poll(&mut b, &wb) else {
            panic!("b not ready after the release");
        };
        drop(pb);
        assert_eq!(cc.get(), 1, "c never woken");
        assert!(poll(&mut c, &wc).is_ready());
    }

    /// A waiter that was woken but dropped before taking the permit passes
    /// the wake-up on; one dropped while queued leaves the queue.
    #[test]
    fn a_woken_waiter_that_goes_away_passes_the_permit_on() {
        let sem = LocalSemaphore::new(1);
        let (_, wa) = counter();
        let Poll::Ready(pa) = poll(&mut sem.acquire(), &wa) else {
            panic!("first acquire waits");
        };
        let (cb, wb) = counter();
        let mut b = sem.acquire();
        assert!(poll(&mut b, &wb).is_pending());
        let (cc, wc) = counter();
        let mut c = sem.acquire();
        assert!(poll(&mut c, &wc).is_pending());
        let (cd, wd) = counter();
        let mut d = sem.acquire();
        assert!(poll(&mut d, &wd).is_pending());
        drop(c); // queued, goes away
        drop(pa); // wakes b
        assert_eq!(cb.get(), 1);
        drop(b); // woken, goes away without the permit: d is next
        assert_eq!(cd.get(), 1, "d never woken");
        assert_eq!(cc.get(), 0);
        assert!(poll(&mut d, &wd).is_ready());
    }

    /// Stress: many tasks on one thread through a semaphore of 2, each
    /// polled spuriously; all finish and never more than 2 hold a permit.
    #[test]
    fn stress_every_waiter_finishes_and_the_bound_holds() {
        let sem = LocalSemaphore::new(2);
        let holders = Rc::new(Cell::new(0usize));
        type Task = (
            Arc<crate::testing::WakeCount>,
            Waker,
            Pin<Box<dyn Future<Output = ()>>>,
        );
        let mut tasks: Vec<Task> = (0..64)
            .map(|i| {
                let (c, w) = counter();
                let (sem, holders) = (sem.clone(), holders.clone());
                let fut: Pin<Box<dyn Future<Output = ()>>> = Box::pin(async move {
                    let _p = sem.acquire().await;
                    holders.set(holders.get() + 1);
                    assert!(holders.get() <= 2, "more than 2 permits out");
                    // Yield a few times while holding the permit.
                    for _ in 0..(i % 3) {
                        let mut y = false;
                        std::future::poll_fn(|cx| {
                            if y {
                                Poll::Ready(())
                            } else {
                                y = true;
                                cx.waker().wake_by_ref();
                                Poll::Pending
                            }
                        })
                        .await;
                    }
                    holders.set(holders.get() - 1);
                });
                w.wake_by_ref(); // polled in the first round
                (c, w, fut)
            })
            .collect();
        let mut rounds = 0;
        while !tasks.is_empty() {
            rounds += 1;
            assert!(rounds < 10_000, "{} tasks never finished", tasks.len());
            // Poll the woken ones, and every third one spuriously.
            let mut i = 0;
            tasks.retain_mut(|(c, w, f)| {
                i += 1;
                let woken = c.take() > 0;
                if !(woken || (i + rounds) % 3 == 0) {
                    return true;
                }
                f.as_mut().poll(&mut Context::from_waker(w)).is_pending()
            });
        }
    }

    #[test]
    fn oneshot_across_threads() {
        let (tx, rx) = oneshot();
        let t = std::thread::spawn(move || tx.send(42u32));
        assert_eq!(rx.recv_blocking(), Ok(42));
        t.join().expect("sender thread");
        let (tx, rx) = oneshot::<u32>();
        drop(tx);
        assert_eq!(rx.recv_blocking(), Err(Canceled));
    }
}
