//! The userspace NVMe/TCP initiator (`nvmf::host`) against mirrorpoint's own
//! NVMe/TCP target over 127.0.0.1: connect, identify, discovery, write/read/
//! verify at QD 32 with header and data digests on and off, in-capsule and
//! R2T-solicited writes (several R2Ts per write: MAXH2CDATA is 8 KiB),
//! the C2HData SUCCESS flag, Write Zeroes / deallocate / flush, an I/O queue
//! on a second reactor, NVMe status mapping, keep-alive and shutdown.

mod nvmf_host_common;

use mirrorpoint_poller::buffer_pool;
use mirrorpoint_target::nvmf::host::{ConnectOptions, Controller, IoQueue, StatusKind};
use mirrorpoint_target::nvmf::TransportOptions;
use mirrorpoint_target::units::BlockSize;
use nvmf_host_common::{runtime, session, start_malloc_target, Target, CHUNK, HOSTNQN};

const NQN: &str = "nqn.2024-01.io.mirrorpoint:hosttest";
const BLOCKS: u64 = 8192; // 32 MiB of 4 KiB blocks
const EXTENTS: u64 = 128;

/// Our target with one 32 MiB malloc namespace; MAXH2CDATA 8 KiB so a
/// solicited write takes several R2Ts.
fn start_target() -> Target {
    start_malloc_target(
        NQN,
        "hostvol",
        BLOCKS,
        BlockSize::B4096,
        TransportOptions {
            io_unit_size: 8192,
            ..TransportOptions::defaults(CHUNK)
        },
    )
}

#[test]
fn plain_in_capsule_and_success_flag() {
    let t = start_target();
    let opts = ConnectOptions {
        disable_sq_flow_control: true,
        ..ConnectOptions::default()
    };
    let r = session(t.addr, NQN, opts, 1, EXTENTS);
    assert!(r.in_capsule_limit >= 4096, "{r:?}");
    assert!(r.stats.success_flag_completions >= EXTENTS, "{r:?}");
    assert_eq!(r.max_h2c_data, 8192);
}

#[test]
fn digests_in_capsule() {
    let t = start_target();
    let opts = ConnectOptions {
        header_digest: true,
        data_digest: true,
        ..ConnectOptions::default()
    };
    let r = session(t.addr, NQN, opts, 2, EXTENTS);
    assert_eq!(r.digests, (true, true));
    assert!(r.stats.in_capsule_writes > 0, "{r:?}");
}

#[test]
fn plain_r2t_only() {
    let t = start_target();
    let opts = ConnectOptions {
        in_capsule_writes: false,
        ..ConnectOptions::default()
    };
    let r = session(t.addr, NQN, opts, 3, EXTENTS);
    // Writes up to 128 KiB, MAXH2CDATA 8 KiB: our target solicits in 8 KiB R2Ts.
    assert!(r.stats.r2ts > EXTENTS, "{r:?}");
    assert_eq!(r.stats.in_capsule_writes, 0);
}

#[test]
fn digests_r2t_only() {
    let t = start_target();
    let opts = ConnectOptions {
        header_digest: true,
        data_digest: true,
        in_capsule_writes: false,
        ..ConnectOptions::default()
    };
    let r = session(t.addr, NQN, opts, 4, EXTENTS);
    assert_eq!(r.stats.in_capsule_writes, 0);
    assert_eq!(r.stats.success_flag_completions, 0);
}

#[test]
fn discovery_deallocate_and_refusals() {
    let t = start_target();
    nvmf_host_common::discovery(t.addr, NQN, &t.addr.port().to_string());
    let host = runtime(vec![0]);
    let addr = t.addr;
    host.handles()[0]
        .block_on(move || async move {
            let ctrl = Controller::connect(addr, NQN, HOSTNQN, ConnectOptions::default())
                .await
                .expect("connect");
            let q = IoQueue::connect(ctrl.info(), 1, 4).await.expect("queue");
            let mut b = buffer_pool().alloc(8192).expect("chunk");
            b.fill(0xa5);
            q.write(1, 10, b.freeze()).await.expect("write");
            q.deallocate(1, &[(10, 1), (11, 1)])
                .await
                .expect("deallocate");
            let b = buffer_pool().alloc(8192).expect("chunk");
            let (r, b) = q.read(1, 10, 2, b).await;
            r.expect("read");
            assert!(
                b.iter().all(|&x| x == 0),
                "deallocated blocks read back data"
            );
            assert!(
                IoQueue::connect(ctrl.info(), 1, 4).await.is_err(),
                "qid 1 twice"
            );
            let e = IoQueue::connect(ctrl.info(), 99, 4)
                .await
                .expect_err("qid 99");
            assert!(e.to_string().contains("qid 99"), "{e}");

            // An unknown subsystem is refused with a typed status.
            let e = Controller::connect(
                addr,
                "nqn.2024-01.io.mirrorpoint:nope",
                HOSTNQN,
                ConnectOptions::default(),
            )
            .await
            .expect_err("unknown subsystem");
            assert!(
                matches!(
                    e.status_kind(),
                    Some(StatusKind::ConnectInvalidParameters | StatusKind::ConnectInvalidHost)
                ),
                "{e}"
            );
        })
        .expect("reactor");
}

/// A failed I/O command lands in the Error Information log page (newest
/// first, with its queue, command, status and LBA) and in the SMART log's
/// error count, as `nvme error-log` and `nvme smart-log` show them.
#[test]
fn io_errors_fill_the_error_log() {
    let t = start_target();
    let host = runtime(vec![0]);
    let addr = t.addr;
    host.handles()[0]
        .block_on(move || async move {
            let ctrl = Controller::connect(addr, NQN, HOSTNQN, ConnectOptions::default())
                .await
                .expect("connect");
            let log = ctrl
                .get_log_page(0x01, 0xffff_ffff, 0, 64)
                .await
                .expect("log");
            assert_eq!(
                &log[..8],
                &[0u8; 8],
                "no error yet: the first entry is invalid"
            );
            let q = IoQueue::connect(ctrl.info(), 1, 4).await.expect("queue");
            for lba in [BLOCKS, BLOCKS + 7] {
                let b = buffer_pool().alloc(4096).expect("chunk");
                let (r, _) = q.read(1, lba, 1, b).await;
                let e = r.expect_err("read past the end");
                assert_eq!(e.status_kind(), Some(StatusKind::LbaOutOfRange), "{e}");
            }
            let log = ctrl
                .get_log_page(0x01, 0xffff_ffff, 0, 3 * 64)
                .await
                .expect("log");
            let u64_at = |o: usize| u64::from_le_bytes(log[o..o + 8].try_into().expect("8"));
            let u16_at = |o: usize| u16::from_le_bytes(log[o..o + 2].try_into().expect("2"));
            // Newest first: count 2 at LBA BLOCKS + 7, then count 1 at BLOCKS.
            assert_eq!((u64_at(0), u64_at(16)), (2, BLOCKS + 7));
            assert_eq!((u64_at(64), u64_at(64 + 16)), (1, BLOCKS));
            assert_eq!(u64_at(128), 0, "only two entries are valid");
            assert_eq!(u16_at(8), q.qid(), "SQID");
            // Status field (bits 15:1 of the completion's status): SC 80h
            // (LBA Out of Range), SCT 0, DNR set.
            let status = u16_at(12) >> 1;
            assert_eq!(status & 0xff, 0x80, "status {status:#x}");
            assert_eq!(
                u32::from_le_bytes(log[24..28].try_into().expect("4")),
                1,
                "NSID"
            );
            let smart = ctrl
                .get_log_page(0x02, 0xffff_ffff, 0, 512)
                .await
                .expect("smart");
            assert_eq!(
                u64::from_le_bytes(smart[176..184].try_into().expect("8")),
                2
            );
            let id = ctrl.identify_raw(1, 0).await.expect("identify");
            assert_eq!(id[262], 63, "ELPE: 64 entries");
        })
        .expect("reactor");
}

/// Rough speed of the initiator against our target, both in this process on
/// the same two cores: 4 KiB random reads, then writes, at QD 32 on one
/// queue for two seconds each. Ignored (timing, not correctness):
/// `cargo test --release -p mirrorpoint-target --test nvmf_host_target -- --ignored --nocapture`.
#[test]
#[ignore = "timing only"]
fn qd32_4k_iops() {
    let t = start_target();
    let host = runtime(vec![1]);
    let addr = t.addr;
    host.handles()[0]
        .block_on(move || async move {
            let ctrl = Controller::connect(addr, NQN, HOSTNQN, ConnectOptions::default())
                .await
                .expect("connect");
            let q = std::rc::Rc::new(IoQueue::connect(ctrl.info(), 1, 32).await.expect("queue"));
            for write in [false, true] {
                let end = std::time::Instant::now() + std::time::Duration::from_secs(2);
                let mut tasks = Vec::new();
                for w in 0..32u64 {
                    let q = q.clone();
                    tasks.push(mirrorpoint_poller::spawn(async move {
                        let mut x = (w + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15);
                        let mut n = 0u64;
                        let mut buf = buffer_pool().alloc(4096).expect("chunk");
                        while std::time::Instant::now() < end {
                            x ^= x << 13;
                            x ^= x >> 7;
                            x ^= x << 17;
                            let lba = x % BLOCKS;
                            if write {
                                let b = buf.freeze();
                                q.write(1, lba, b.clone()).await.expect("write");
                                buf = b.try_into_mut().expect("sole owner");
                            } else {
                                let (r, b) = q.read(1, lba, 1, buf).await;
                                r.expect("read");
                                buf = b;
                            }
                            n += 1;
                        }
                        n
                    }));
                }
                let mut total = 0;
                for t in tasks {
                    total += t.await;
                }
                eprintln!(
                    "4 KiB random {} QD 32: {} IOPS",
                    if write { "write" } else { "read" },
                    total / 2
                );
            }
        })
        .expect("reactor");
}

/// Keep Alive at KATO/2 keeps an idle controller alive past KATO; with the
/// keep-alive held back, our target tears the controller down.
#[test]
fn keep_alive_keeps_an_idle_controller() {
    let t = start_target();
    let host = runtime(vec![0]);
    let addr = t.addr;
    host.handles()[0]
        .block_on(move || async move {
            let kato = std::time::Duration::from_secs(1);
            let ok = ConnectOptions {
                keep_alive: kato,
                ..ConnectOptions::default()
            };
            let starved = ConnectOptions {
                keep_alive: kato,
                keep_alive_interval: Some(std::time::Duration::from_secs(60)),
                ..ConnectOptions::default()
            };
            let a = Controller::connect(addr, NQN, HOSTNQN, ok)
                .await
                .expect("connect");
            let b = Controller::connect(addr, NQN, HOSTNQN, starved)
                .await
                .expect("connect");
            let qa = IoQueue::connect(a.info(), 1, 4).await.expect("queue a");
            let qb = IoQueue::connect(b.info(), 1, 4).await.expect("queue b");
            mirrorpoint_poller::sleep(std::time::Duration::from_millis(2500)).await;
            a.identify_controller().await.expect("kept alive");
            qa.flush(1).await.expect("I/O queue kept alive");
            assert!(
                b.identify_controller().await.is_err(),
                "no keep-alive, yet alive"
            );
            assert!(qb.flush(1).await.is_err(), "I/O queue of a dead controller");
        })
        .expect("reactor");
}
