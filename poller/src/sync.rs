//! Small synchronisation tools for tasks.
//!
//! [`LocalSemaphore`] bounds a queue depth between tasks of one reactor
//! (no atomics: tasks never leave their reactor). [`oneshot`] carries one
//! value from any thread to a task or a thread waiting on it, which is how a
//! reactor answers a request posted by another core or by the admin thread.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::{Arc, Condvar, Mutex};
use std::task::{Context, Poll, Waker};

/// A counting semaphore for tasks on one reactor.
#[derive(Clone)]
pub struct LocalSemaphore {
    inner: Rc<SemInner>,
}

struct SemInner {
    permits: Cell<usize>,
    waiters: RefCell<VecDeque<Waker>>,
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
            }),
        }
    }

    /// Permits available now.
    pub fn available(&self) -> usize {
        self.inner.permits.get()
    }

    /// Waits for a permit.
    pub fn acquire(&self) -> Acquire<'_> {
        Acquire { sem: self }
    }
}

/// Future of [`LocalSemaphore::acquire`].
pub struct Acquire<'a> {
    sem: &'a LocalSemaphore,
}

impl Future for Acquire<'_> {
    type Output = LocalPermit;
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<LocalPermit> {
        let inner = &self.sem.inner;
        let n = inner.permits.get();
        if n > 0 {
            inner.permits.set(n - 1);
            return Poll::Ready(LocalPermit {
                inner: inner.clone(),
            });
        }
        inner.waiters.borrow_mut().push_back(cx.waker().clone());
        Poll::Pending
    }
}

impl Drop for LocalPermit {
    fn drop(&mut self) {
        self.inner.permits.set(self.inner.permits.get() + 1);
        // Wake one waiter; it re-checks (a waiter that went away just passes
        // the chance on, because it will not take the permit).
        let next = self.inner.waiters.borrow_mut().pop_front();
        if let Some(w) = next {
            w.wake();
        }
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
