//! Concurrent stress of the buffer pool and the cross-core queue.
//!
//! Threads take chunks, stamp them with a pattern unique to (thread, round),
//! pass frozen clones to other threads through lock-free queues, and check
//! the stamp wherever they read it. If the pool ever handed one chunk to two
//! owners, or returned a chunk to the free list while a clone was alive, a
//! stamp would be overwritten and the check would fail.

use crossbeam_queue::ArrayQueue;
use mirrorpoint_poller::{BufferPool, IoBuf, PoolConfig};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

fn stamp(thread: usize, round: usize) -> u64 {
    ((thread as u64) << 32) | round as u64
}

fn check(buf: &[u8], expect: u64) {
    for word in buf.chunks_exact(8) {
        let v = u64::from_le_bytes(word.try_into().expect("8 bytes"));
        assert_eq!(v, expect, "chunk content changed under its owner");
    }
}

#[test]
fn pool_and_queues_under_contention() {
    const THREADS: usize = 4;
    const ROUNDS: usize = 20_000;
    let pool = BufferPool::new(PoolConfig {
        chunk_size: 4096,
        chunk_count: 64,
        huge_pages: false,
    })
    .expect("pool");
    // One inbox per thread, as reactors have.
    let inboxes: Arc<Vec<ArrayQueue<(IoBuf, u64)>>> =
        Arc::new((0..THREADS).map(|_| ArrayQueue::new(16)).collect());
    let received = Arc::new(AtomicUsize::new(0));
    let done = Arc::new(AtomicBool::new(false));
    let finished_producing = Arc::new(AtomicUsize::new(0));
    let threads: Vec<_> = (0..THREADS)
        .map(|t| {
            let pool = pool.clone();
            let inboxes = inboxes.clone();
            let received = received.clone();
            let done = done.clone();
            let finished_producing = finished_producing.clone();
            std::thread::spawn(move || {
                let drain = |inboxes: &Vec<ArrayQueue<(IoBuf, u64)>>| {
                    while let Some((buf, expect)) = inboxes[t].pop() {
                        check(&buf, expect);
                        received.fetch_add(1, Ordering::Relaxed);
                    }
                };
                for round in 0..ROUNDS {
                    drain(&inboxes);
                    let Some(mut buf) = pool.alloc(512 + (round % 8) * 448) else {
                        std::thread::yield_now();
                        continue;
                    };
                    let s = stamp(t, round);
                    for word in buf.chunks_exact_mut(8) {
                        word.copy_from_slice(&s.to_le_bytes());
                    }
                    std::thread::yield_now();
                    check(&buf, s);
                    let frozen = buf.freeze();
                    let peer = (t + 1 + round % (THREADS - 1)) % THREADS;
                    if inboxes[peer].push((frozen.clone(), s)).is_err() {
                        // Peer busy: the clone comes back to us and is dropped.
                    }
                    check(&frozen, s);
                }
                finished_producing.fetch_add(1, Ordering::AcqRel);
                while !done.load(Ordering::Acquire) {
                    drain(&inboxes);
                    std::thread::yield_now();
                }
                drain(&inboxes);
            })
        })
        .collect();
    // Once every thread has stopped producing, nothing new enters an inbox;
    // each thread then drains its own until told to stop.
    while finished_producing.load(Ordering::Acquire) < THREADS {
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
    done.store(true, Ordering::Release);
    for t in threads {
        t.join().expect("stress thread");
    }
    assert!(
        inboxes.iter().all(|q| q.is_empty()),
        "every handed-over chunk was checked"
    );
    assert!(received.load(Ordering::Relaxed) > 0);
    assert_eq!(pool.free_chunks(), 64, "every chunk came back exactly once");
}
