//! End-to-end behaviour of the runtime: tasks, file I/O through the ring,
//! timers, cross-core messages, sleeping and waking, shutdown.

use mirrorpoint_poller::{
    buffer_pool, sleep, spawn, yield_now, DiskSubmit, Op, OpKind, PoolConfig, ReactorConfig,
    ReactorFile, Runtime, RuntimeConfig,
};
use std::os::fd::{AsRawFd, OwnedFd};
use std::rc::Rc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

fn runtime(reactors: usize) -> Runtime {
    Runtime::start(RuntimeConfig {
        cores: (0..reactors).collect(),
        reactor: ReactorConfig {
            pool: PoolConfig {
                chunk_size: 128 * 1024,
                chunk_count: 64,
                huge_pages: false,
            },
            idle_timeout: Duration::from_micros(200),
            ..ReactorConfig::default()
        },
        pin: false,
    })
    .expect("runtime starts")
}

fn temp_file(name: &str, len: u64) -> (std::path::PathBuf, Arc<OwnedFd>) {
    let path = std::env::temp_dir().join(format!("mp-poller-{}-{name}", std::process::id()));
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&path)
        .expect("temp file");
    f.set_len(len).expect("size");
    (path, Arc::new(OwnedFd::from(f)))
}

#[test]
fn block_on_runs_a_task_and_returns_its_output() {
    let rt = runtime(1);
    let out = rt.handles()[0]
        .block_on(|| async {
            let child = spawn(async { 20 + 1 });
            yield_now().await;
            child.await * 2
        })
        .expect("answer");
    assert_eq!(out, 42);
}

#[test]
fn file_round_trip_through_the_ring() {
    let rt = runtime(1);
    let (path, fd) = temp_file("rw", 1 << 20);
    let ok = rt.handles()[0]
        .block_on(move || async move {
            let file = ReactorFile::new(fd);
            assert!(file.is_fixed(), "a fresh ring has free fixed-file slots");
            let pool = buffer_pool();
            let mut out = pool.alloc(64 * 1024).expect("chunk");
            for (i, b) in out.iter_mut().enumerate() {
                *b = (i * 7 % 251) as u8;
            }
            let out = out.freeze();
            let (r, out) = file.write_all_at(out, 4096 * 3).await;
            r.expect("write");
            file.sync(true).await.expect("fdatasync");
            let back = pool.alloc(64 * 1024).expect("chunk");
            let (r, back) = file.read_exact_at(back, 4096 * 3).await;
            r.expect("read");
            let same = *back == *out;
            // Reading past the end is an error, not a short success.
            let tail = pool.alloc(8192).expect("chunk");
            let (r, _) = file.read_exact_at(tail, (1 << 20) - 4096).await;
            same && r.is_err()
        })
        .expect("answer");
    assert!(ok);
    let on_disk = std::fs::read(&path).expect("read back");
    assert_eq!(on_disk[4096 * 3 + 300], (300 * 7 % 251) as u8);
    std::fs::remove_file(path).ok();
}

#[test]
fn buffers_from_a_foreign_pool_use_plain_reads() {
    let rt = runtime(1);
    let (path, fd) = temp_file("foreign", 1 << 16);
    std::fs::write(&path, vec![0xabu8; 1 << 16]).expect("fill");
    let foreign = mirrorpoint_poller::BufferPool::new(PoolConfig {
        chunk_size: 4096,
        chunk_count: 2,
        huge_pages: false,
    })
    .expect("pool");
    let ok = rt.handles()[0]
        .block_on(move || async move {
            let file = ReactorFile::new(fd);
            let buf = foreign.alloc(4096).expect("chunk");
            let (r, buf) = file.read_exact_at(buf, 0).await;
            r.is_ok() && buf.iter().all(|&b| b == 0xab)
        })
        .expect("answer");
    assert!(ok);
    std::fs::remove_file(path).ok();
}

#[test]
fn timers_fire_in_order_and_not_early() {
    let rt = runtime(1);
    let (order, elapsed) = rt.handles()[0]
        .block_on(|| async {
            let start = Instant::now();
            let log = std::rc::Rc::new(std::cell::RefCell::new(Vec::new()));
            let mut tasks = Vec::new();
            for (ms, tag) in [(30u64, 'c'), (10, 'a'), (20, 'b')] {
                let log = log.clone();
                tasks.push(spawn(async move {
                    sleep(Duration::from_millis(ms)).await;
                    log.borrow_mut().push(tag);
                }));
            }
            for t in tasks {
                t.await;
            }
            let order: String = log.borrow().iter().collect();
            (order, start.elapsed())
        })
        .expect("answer");
    assert_eq!(order, "abc");
    assert!(elapsed >= Duration::from_millis(30), "{elapsed:?}");
}

#[test]
fn reactors_answer_each_other() {
    let rt = runtime(2);
    let other = rt.handles()[1].clone();
    let answer = rt.handles()[0]
        .block_on(move || async move {
            let here = mirrorpoint_poller::current_index();
            let there = other
                .spawn(|| async { mirrorpoint_poller::current_index() })
                .await
                .expect("reply");
            (here, there)
        })
        .expect("answer");
    assert_eq!(answer, (Some(0), Some(1)));
}

/// Many producers post to a reactor that keeps falling asleep: every message
/// must run (a lost wake-up would hang or lose counts).
#[test]
fn no_message_is_lost_while_the_reactor_sleeps() {
    let rt = runtime(1);
    let handle = rt.handles()[0].clone();
    let counter = Arc::new(AtomicUsize::new(0));
    let producers: Vec<_> = (0..4)
        .map(|p| {
            let handle = handle.clone();
            let counter = counter.clone();
            std::thread::spawn(move || {
                for i in 0..2000 {
                    let c = counter.clone();
                    assert!(handle.post(move || {
                        c.fetch_add(1, Ordering::SeqCst);
                    }));
                    if (i + p) % 97 == 0 {
                        // Give the reactor time to pass its idle timeout and block.
                        std::thread::sleep(Duration::from_micros(600));
                    }
                }
            })
        })
        .collect();
    for p in producers {
        p.join().expect("producer");
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while counter.load(Ordering::SeqCst) < 8000 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(counter.load(Ordering::SeqCst), 8000);
    std::thread::sleep(Duration::from_millis(20));
    let stats = handle.stats();
    assert!(
        stats.sleeps > 0,
        "an idle reactor blocks in its ring: {stats:?}"
    );
}

#[test]
fn busy_poll_reactor_never_sleeps_and_counts_io() {
    let mut rt = Runtime::start(RuntimeConfig {
        cores: vec![0],
        reactor: ReactorConfig {
            busy_poll: true,
            pool: PoolConfig {
                chunk_size: 4096,
                chunk_count: 8,
                huge_pages: false,
            },
            ..ReactorConfig::default()
        },
        pin: false,
    })
    .expect("runtime");
    let (path, fd) = temp_file("busy", 1 << 16);
    rt.handles()[0]
        .block_on(move || async move {
            let file = ReactorFile::new(fd);
            for i in 0..10u64 {
                let buf = buffer_pool().alloc(4096).expect("chunk").freeze();
                file.write_all_at(buf, i * 4096).await.0.expect("write");
            }
        })
        .expect("done");
    std::thread::sleep(Duration::from_millis(30));
    let stats = rt.handles()[0].stats();
    assert_eq!(stats.sleeps, 0);
    assert!(
        stats.ios_submitted >= 10 && stats.ios_completed >= 10,
        "{stats:?}"
    );
    assert!(stats.busy_ns > 0 && stats.idle_ns > 0);
    rt.shutdown();
    std::fs::remove_file(path).ok();
}

/// Sixteen writes queued in one loop turn: with `DiskSubmit::Immediate`
/// each enters the ring on its own (the device starts on the first while
/// the others are still being queued); with `PerTurn` the turn submits
/// them together.
#[test]
fn disk_requests_enter_the_ring_at_once_unless_batched_per_turn() {
    const WRITES: u64 = 16;
    for policy in [DiskSubmit::Immediate, DiskSubmit::PerTurn] {
        let mut rt = Runtime::start(RuntimeConfig {
            cores: vec![0],
            reactor: ReactorConfig {
                disk_submit: policy,
                pool: PoolConfig {
                    chunk_size: 4096,
                    chunk_count: 32,
                    huge_pages: false,
                },
                ..ReactorConfig::default()
            },
            pin: false,
        })
        .expect("runtime");
        let (path, fd) = temp_file(&format!("submit-{policy}"), WRITES * 4096);
        let (before, after) = rt.handles()[0]
            .block_on(move || async move {
                let file = Rc::new(ReactorFile::new(fd));
                let before = mirrorpoint_poller::current_stats();
                let tasks: Vec<_> = (0..WRITES)
                    .map(|i| {
                        let file = file.clone();
                        spawn(async move {
                            let buf = buffer_pool().alloc(4096).expect("chunk").freeze();
                            file.write_all_at(buf, i * 4096).await.0.expect("write");
                        })
                    })
                    .collect();
                for t in tasks {
                    t.await;
                }
                (before, mirrorpoint_poller::current_stats())
            })
            .expect("done");
        let submitted = after.ios_submitted - before.ios_submitted;
        let calls = after.submit_calls - before.submit_calls;
        assert!(submitted >= WRITES, "{policy}: {submitted} ops submitted");
        match policy {
            DiskSubmit::Immediate => assert!(
                calls >= WRITES,
                "immediate: {calls} submit calls for {WRITES} writes"
            ),
            DiskSubmit::PerTurn => assert!(
                calls <= WRITES / 4,
                "per-turn: {calls} submit calls for {WRITES} writes queued in one turn"
            ),
        }
        rt.shutdown();
        std::fs::remove_file(path).ok();
    }
}

/// A task parked on an op that never completes by itself (a read from an
/// empty pipe) must not keep shutdown from finishing, and its buffer must
/// not be freed while the kernel still holds it.
#[test]
fn shutdown_cancels_long_lived_ops() {
    let mut rt = runtime(1);
    let mut fds = [0i32; 2];
    // SAFETY: pipe writes two descriptors into the array.
    assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
    // SAFETY: both descriptors are fresh and owned here.
    let (reader, writer) = unsafe {
        use std::os::fd::FromRawFd;
        (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1]))
    };
    let started = rt.handles()[0]
        .block_on(move || async move {
            spawn(async move {
                let mut buf = buffer_pool().alloc(4096).expect("chunk");
                let entry = io_uring::opcode::Read::new(
                    io_uring::types::Fd(reader.as_raw_fd()),
                    buf.as_mut_ptr(),
                    4096,
                )
                .build();
                // SAFETY: the entry points into buf's chunk, owned by the op.
                let op = unsafe { Op::submit(entry, OpKind::LongLived, (buf, reader)) };
                let _ = op.await;
            })
            .detach();
            true
        })
        .expect("spawned");
    assert!(started);
    std::thread::sleep(Duration::from_millis(20));
    let t0 = Instant::now();
    rt.shutdown();
    assert!(t0.elapsed() < Duration::from_secs(5));
    drop(writer);
}
