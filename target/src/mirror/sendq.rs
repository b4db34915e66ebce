//! The send side of one mirror link: frames are queued into a shared
//! [`SendList`] and a writer task sends everything queued with one
//! `sendmsg`.
//!
//! Why: a mirrored write used to cost its own `sendmsg` on the primary, and
//! its acknowledgement its own `sendmsg` on the leg, each behind a send
//! lock. Under load many writes (and many acknowledgements) are queued in
//! the same reactor turn; one ring op now carries them all, payload chunks
//! included (shared, not copied).
//!
//! Shape:
//! - [`SendQueue::queue`] appends a frame synchronously and returns its
//!   number; [`SendQueue::sent`] waits until the batch carrying it has gone
//!   (or failed). Callers may drop that wait at any time (a request whose
//!   answer came first does): the frame still goes, and the stream is
//!   never left with half a frame on it, because only the writer task sends.
//! - The writer holds the socket weakly between batches, so the connection
//!   can be handed to another thread (`Conn::into_std`) once every send it
//!   made has completed.
//! - A failed send breaks the stream for good: every frame of that batch
//!   and every later one fails, and the socket is shut down so the
//!   receiving side notices too.

use std::cell::{Cell, RefCell};
use std::io;
use std::os::fd::AsRawFd;
use std::rc::{Rc, Weak};
use std::task::{Poll, Waker};

use mirrorpoint_poller::{spawn, LocalNotify};
use mirrorpoint_transport::{SendList, TcpStream};

/// Frames queued on one link, and the writer task that sends them.
pub(super) struct SendQueue {
    shared: Rc<Shared>,
}

struct Shared {
    /// Frames queued and not yet taken by the writer.
    pending: RefCell<SendList>,
    /// The list the writer hands back after a batch, reused for the next.
    spare: RefCell<Option<SendList>>,
    /// Number of frames queued so far (the last frame's number).
    queued: Cell<u64>,
    /// Frames up to this number have left (or failed).
    done: Cell<u64>,
    /// The first frame that failed, once a send failed.
    failed_from: Cell<Option<u64>>,
    /// Why the stream broke.
    error: RefCell<Option<(io::ErrorKind, String)>>,
    /// Callers waiting for their frame's batch.
    waiters: RefCell<Vec<Waker>>,
    /// Wakes the writer: frames queued, or the connection gone.
    work: LocalNotify,
    /// The connection is gone: the writer ends once nothing is pending.
    closed: Cell<bool>,
    /// Batches sent (each one `sendmsg` unless the kernel took it partly).
    batches: Cell<u64>,
}

impl SendQueue {
    /// Starts the writer task for `stream` on the current reactor.
    ///
    /// # Panics
    /// Off a reactor thread.
    pub(super) fn new(stream: &Rc<TcpStream>) -> SendQueue {
        let shared = Rc::new(Shared {
            pending: RefCell::new(SendList::new()),
            spare: RefCell::new(Some(SendList::new())),
            queued: Cell::new(0),
            done: Cell::new(0),
            failed_from: Cell::new(None),
            error: RefCell::new(None),
            waiters: RefCell::new(Vec::new()),
            work: LocalNotify::default(),
            closed: Cell::new(false),
            batches: Cell::new(0),
        });
        spawn(writer(shared.clone(), Rc::downgrade(stream))).detach();
        SendQueue { shared }
    }

    /// Appends one frame with `fill` (which must append whole frames or
    /// nothing) and returns its number for [`SendQueue::sent`]. Fails at once
    /// when the stream already broke, or with `fill`'s error.
    pub(super) fn queue<E: From<io::Error>>(
        &self,
        fill: impl FnOnce(&mut SendList) -> Result<(), E>,
    ) -> Result<u64, E> {
        let s = &self.shared;
        if let Some(e) = s.broken() {
            return Err(e.into());
        }
        fill(&mut s.pending.borrow_mut())?;
        let n = s.queued.get() + 1;
        s.queued.set(n);
        s.work.notify();
        Ok(n)
    }

    /// Waits until frame `n` has been handed to the kernel; fails if its
    /// batch (or an earlier one) failed.
    pub(super) async fn sent(&self, n: u64) -> io::Result<()> {
        let s = &self.shared;
        std::future::poll_fn(|cx| {
            if s.done.get() >= n {
                return Poll::Ready(match s.failed_from.get() {
                    Some(f) if f <= n => Err(s.broken().unwrap_or_else(|| {
                        io::Error::new(io::ErrorKind::BrokenPipe, "link send failed")
                    })),
                    _ => Ok(()),
                });
            }
            // No dedup: a task polled twice before the batch ends is woken
            // twice, which costs less than searching the list every poll.
            s.waiters.borrow_mut().push(cx.waker().clone());
            Poll::Pending
        })
        .await
    }

    /// Frames queued and not yet sent, and batches sent (for tests).
    #[cfg(test)]
    fn counts(&self) -> (u64, u64) {
        let s = &self.shared;
        (s.queued.get() - s.done.get(), s.batches.get())
    }
}

impl Drop for SendQueue {
    fn drop(&mut self) {
        self.shared.closed.set(true);
        self.shared.work.notify();
    }
}

impl Shared {
    fn broken(&self) -> Option<io::Error> {
        self.error
            .borrow()
            .as_ref()
            .map(|(kind, text)| io::Error::new(*kind, text.clone()))
    }

    fn fail(&self, first: u64, kind: io::ErrorKind, text: String) {
        if self.failed_from.get().is_none() {
            self.failed_from.set(Some(first));
        }
        self.error.borrow_mut().get_or_insert((kind, text));
    }

    fn wake_waiters(&self) {
        let waiters = std::mem::take(&mut *self.waiters.borrow_mut());
        for w in waiters {
            w.wake();
        }
    }
}

/// Sends whatever is queued, one batch per `sendmsg` chain, until the
/// connection is dropped.
async fn writer(s: Rc<Shared>, stream: Weak<TcpStream>) {
    loop {
        if s.pending.borrow().is_empty() {
            if s.closed.get() {
                break;
            }
            s.work.wait().await;
            continue;
        }
        let first = s.done.get() + 1;
        let upto = s.queued.get();
        s.batches.set(s.batches.get() + 1);
        let spare = s.spare.borrow_mut().take().unwrap_or_default();
        let list = std::mem::replace(&mut *s.pending.borrow_mut(), spare);
        let mut list = match (stream.upgrade(), s.broken()) {
            (Some(_), Some(e)) => {
                s.fail(first, e.kind(), e.to_string());
                list
            }
            (Some(stream), None) => {
                let (r, list) = stream.send_list(list).await;
                if let Err(e) = r {
                    s.fail(first, e.kind(), format!("link send: {e}"));
                    // SAFETY: shutdown(2) on a descriptor the stream owns
                    // (kept open by the strong reference); no memory passed.
                    unsafe {
                        libc::shutdown(stream.as_raw_fd(), libc::SHUT_RDWR);
                    }
                }
                list
            }
            (None, _) => {
                s.fail(
                    first,
                    io::ErrorKind::NotConnected,
                    "link closed before the frame was sent".into(),
                );
                list
            }
        };
        list.clear();
        *s.spare.borrow_mut() = Some(list);
        s.done.set(upto);
        s.wake_waiters();
    }
    // Anyone still waiting learns that nothing more will be sent.
    let upto = s.queued.get();
    if s.done.get() < upto {
        s.fail(
            s.done.get() + 1,
            io::ErrorKind::NotConnected,
            "link closed".into(),
        );
        s.done.set(upto);
    }
    s.wake_waiters();
}

#[cfg(test)]
mod tests {
    use super::*;
    use mirrorpoint_poller::{yield_now, PoolConfig, ReactorConfig, Runtime, RuntimeConfig};
    use std::io::Read;

    fn runtime() -> Runtime {
        Runtime::start(RuntimeConfig {
            cores: vec![0],
            reactor: ReactorConfig {
                pool: PoolConfig {
                    chunk_size: 4096,
                    chunk_count: 16,
                    huge_pages: false,
                },
                ..ReactorConfig::default()
            },
            pin: false,
        })
        .expect("runtime")
    }

    /// Frames queued in one turn leave in order, in one batch, and every
    /// waiter learns its frame went; the peer reads exactly the bytes.
    #[test]
    fn frames_queued_together_leave_in_order_in_one_batch() {
        let rt = runtime();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        let reader = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().expect("accept");
            let mut all = Vec::new();
            s.read_to_end(&mut all).expect("read");
            all
        });
        let (pending_before, batches, ok) = rt.handles()[0]
            .block_on(move || async move {
                let stream = Rc::new(TcpStream::connect(addr).await.expect("connect"));
                let q = SendQueue::new(&stream);
                let mut numbers = Vec::new();
                for i in 0..100u8 {
                    let n = q
                        .queue(|l| -> io::Result<()> {
                            l.push_bytes(&[i; 3]);
                            Ok(())
                        })
                        .expect("queued");
                    numbers.push(n);
                }
                let (pending_before, _) = q.counts();
                let mut ok = true;
                for n in numbers {
                    ok &= q.sent(n).await.is_ok();
                }
                let (_, batches) = q.counts();
                drop(q);
                yield_now().await;
                drop(stream);
                (pending_before, batches, ok)
            })
            .expect("done");
        assert_eq!(pending_before, 100, "all queued before the writer ran");
        assert_eq!(batches, 1, "frames queued in one turn leave in one batch");
        assert!(ok);
        let got = reader.join().expect("reader");
        let want: Vec<u8> = (0..100u8).flat_map(|i| [i; 3]).collect();
        assert_eq!(got, want);
    }

    /// Once a send fails, that frame and every later one fail, and new
    /// frames are refused at once.
    #[test]
    fn a_failed_send_fails_this_and_later_frames() {
        let rt = runtime();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (first, later) = rt.handles()[0]
            .block_on(move || async move {
                let stream = Rc::new(TcpStream::connect(addr).await.expect("connect"));
                // The peer closes at once; shut our side so sends fail.
                let (peer, _) = listener.accept().expect("accept");
                drop(peer);
                // SAFETY: shutdown(2) on our own socket; no memory passed.
                unsafe {
                    libc::shutdown(stream.as_raw_fd(), libc::SHUT_WR);
                }
                let q = SendQueue::new(&stream);
                let n = q
                    .queue(|l| -> io::Result<()> {
                        l.push_bytes(b"frame");
                        Ok(())
                    })
                    .expect("queued");
                let first = q.sent(n).await;
                let later = q.queue(|l| -> io::Result<()> {
                    l.push_bytes(b"again");
                    Ok(())
                });
                (first.is_err(), later.is_err())
            })
            .expect("done");
        assert!(first, "the send into a shut socket fails");
        assert!(later, "a broken link refuses new frames");
    }
}
