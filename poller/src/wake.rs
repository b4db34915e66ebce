//! The doorbell: how a producer on another thread wakes a reactor that may be
//! about to block in its ring, without losing a wake-up and without a syscall
//! on every message.
//!
//! A reactor that wants to sleep first announces it (`prepare_sleep`), then
//! looks at its inbox once more, and only then blocks. A producer publishes
//! its message first, then checks whether the reactor announced sleep, and
//! only then writes the eventfd (once per sleep, thanks to `rung`). With a
//! SeqCst fence on both sides, at least one of the two sees the other: the
//! reactor sees the message, or the producer sees the announcement. The
//! `loom` model at the bottom checks every interleaving of that.

#[cfg(loom)]
use loom::sync::atomic::{fence, AtomicBool, Ordering};
#[cfg(not(loom))]
use std::sync::atomic::{fence, AtomicBool, Ordering};

/// Sleep announcement and wake de-duplication for one reactor.
#[derive(Debug, Default)]
pub struct Doorbell {
    sleeping: AtomicBool,
    rung: AtomicBool,
}

impl Doorbell {
    /// A fresh doorbell: reactor awake, not rung.
    pub fn new() -> Self {
        Doorbell {
            sleeping: AtomicBool::new(false),
            rung: AtomicBool::new(false),
        }
    }

    /// Producer side, after its message is published: true when the caller
    /// must signal the reactor's eventfd.
    pub fn after_publish(&self) -> bool {
        fence(Ordering::SeqCst);
        self.sleeping.load(Ordering::SeqCst) && !self.rung.swap(true, Ordering::AcqRel)
    }

    /// Reactor side: announce the intent to block. The caller must check its
    /// inbox afterwards and call [`Doorbell::awake`] instead of blocking if
    /// anything is there.
    pub fn prepare_sleep(&self) {
        self.sleeping.store(true, Ordering::SeqCst);
        fence(Ordering::SeqCst);
    }

    /// Reactor side: back from blocking (or decided not to block).
    pub fn awake(&self) {
        self.sleeping.store(false, Ordering::SeqCst);
        self.rung.store(false, Ordering::Release);
    }
}

#[cfg(all(test, loom))]
mod loom_tests {
    use super::*;
    use loom::sync::atomic::AtomicUsize;
    use loom::sync::Arc;
    use loom::thread;

    /// A reactor that decides to block must find the eventfd signalled by any
    /// producer whose message it did not see.
    #[test]
    fn no_lost_wakeup() {
        loom::model(|| {
            let bell = Arc::new(Doorbell::new());
            let inbox = Arc::new(AtomicUsize::new(0));
            let signalled = Arc::new(AtomicBool::new(false));

            let producer = {
                let (bell, inbox, signalled) = (bell.clone(), inbox.clone(), signalled.clone());
                thread::spawn(move || {
                    inbox.fetch_add(1, Ordering::SeqCst);
                    if bell.after_publish() {
                        signalled.store(true, Ordering::SeqCst);
                    }
                })
            };

            bell.prepare_sleep();
            let saw_message = inbox.load(Ordering::SeqCst) > 0;
            producer.join().unwrap();
            if !saw_message {
                assert!(
                    signalled.load(Ordering::SeqCst),
                    "reactor blocked with a message it never saw and no signal"
                );
            }
            bell.awake();
        });
    }

    /// Two producers racing while the reactor sleeps: one signal suffices and
    /// after `awake` a new sleep can be signalled again.
    #[test]
    fn rings_once_per_sleep() {
        loom::model(|| {
            let bell = Arc::new(Doorbell::new());
            bell.prepare_sleep();
            let signals = Arc::new(AtomicUsize::new(0));
            let handles: Vec<_> = (0..2)
                .map(|_| {
                    let (bell, signals) = (bell.clone(), signals.clone());
                    thread::spawn(move || {
                        if bell.after_publish() {
                            signals.fetch_add(1, Ordering::SeqCst);
                        }
                    })
                })
                .collect();
            for h in handles {
                h.join().unwrap();
            }
            assert_eq!(signals.load(Ordering::SeqCst), 1);
            bell.awake();
            bell.prepare_sleep();
            assert!(bell.after_publish());
        });
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    #[test]
    fn awake_reactor_is_not_signalled() {
        let bell = Doorbell::new();
        assert!(!bell.after_publish());
        bell.prepare_sleep();
        assert!(bell.after_publish());
        assert!(
            !bell.after_publish(),
            "second producer rides on the first signal"
        );
        bell.awake();
        assert!(!bell.after_publish());
    }
}
