//! The target's receive path with mixed PDU sizes in flight: in-capsule
//! writes of 512 B to 8 KiB (the in-capsule size here, so the split
//! receive's chunk is 8 KiB and most capsules are shorter than it),
//! R2T-solicited 12 KiB writes and reads, 32 at a time on one queue, each
//! write read back and compared. This drives every branch of the greedy and
//! split receives: a capsule whose data lands in the spare chunk with the
//! next PDUs' bytes behind it in the same chunk, a capsule without data or a
//! H2CData PDU that starts a split receive (chunk bytes copied back), data
//! staged by a greedy receive, and a data section finished in place while
//! the next PDUs arrive in the staging vector; with and without digests.
//! Then bursts of 4 KiB writes with a 4 KiB in-capsule size, which the
//! target takes with batch receives (whole batches, a capsule of another
//! shape inside one, a capsule still arriving at its end).

mod nvmf_host_common;

use mirrorpoint_poller::{buffer_pool, spawn};
use mirrorpoint_target::nvmf::host::{ConnectOptions, Controller, IoQueue};
use mirrorpoint_target::nvmf::TransportOptions;
use mirrorpoint_target::units::BlockSize;
use nvmf_host_common::{pattern, runtime, start_malloc_target, Target, CHUNK, HOSTNQN};
use std::rc::Rc;

const NQN: &str = "nqn.2024-01.io.mirrorpoint:splittest";
const BS: usize = 512;
/// Blocks per task region (16 KiB).
const REGION: u64 = 32;
const QD: u64 = 32;
const ROUNDS: u64 = 24;

fn start_target() -> Target {
    start_malloc_target(
        NQN,
        "splitvol",
        REGION * QD,
        BlockSize::B512,
        TransportOptions {
            in_capsule_data_size: 8192,
            io_unit_size: 8192,
            ..TransportOptions::defaults(CHUNK)
        },
    )
}

/// Write sizes in blocks: in-capsule 512 B..8 KiB, and 12 KiB by R2T.
/// A controller on the split-test subsystem and one I/O queue (depth 64)
/// with the given digests; keep the controller as long as the queue.
async fn connect_io_queue(
    addr: std::net::SocketAddr,
    header_digest: bool,
    data_digest: bool,
) -> (Controller, Rc<IoQueue>) {
    let opts = ConnectOptions {
        header_digest,
        data_digest,
        ..ConnectOptions::default()
    };
    let ctrl = Controller::connect(addr, NQN, HOSTNQN, opts)
        .await
        .expect("connect");
    let q = Rc::new(IoQueue::connect(ctrl.info(), 1, 64).await.expect("queue"));
    (ctrl, q)
}

const SIZES: [u64; 8] = [1, 2, 3, 7, 8, 16, 24, 5];

fn mixed_sizes_round_trip(digests: bool) {
    let t = start_target();
    let host = runtime(vec![1]);
    let addr = t.addr;
    let checked = host.handles()[0]
        .block_on(move || async move {
            let (_ctrl, q) = connect_io_queue(addr, digests, digests).await;
            let mut tasks = Vec::new();
            for w in 0..QD {
                let q = q.clone();
                tasks.push(spawn(async move {
                    let base = w * REGION;
                    let mut checked = 0u64;
                    for r in 0..ROUNDS {
                        let blocks = SIZES[((w + r) % SIZES.len() as u64) as usize];
                        let len = blocks as usize * BS;
                        let want = pattern(w * 1000 + r, len);
                        let mut buf = buffer_pool().alloc(len).expect("chunk");
                        buf.copy_from_slice(&want);
                        q.write(1, base, buf.freeze()).await.expect("write");
                        let rbuf = buffer_pool().alloc(len).expect("chunk");
                        let (res, rbuf) = q.read(1, base, blocks as u32, rbuf).await;
                        res.expect("read");
                        assert!(
                            rbuf[..len] == want[..],
                            "task {w} round {r}: {len} bytes read back differ"
                        );
                        checked += 1;
                    }
                    checked
                }));
            }
            let mut n = 0;
            for t in tasks {
                n += t.await;
            }
            n
        })
        .expect("host reactor");
    assert_eq!(checked, QD * ROUNDS);
}

#[test]
fn mixed_sizes_plain() {
    mixed_sizes_round_trip(false);
}

#[test]
fn mixed_sizes_with_digests() {
    mixed_sizes_round_trip(true);
}

/// In-capsule size of the batch tests: the 4 KiB writes are exactly the
/// shape a batch receive lays out.
const BATCH_ICD: usize = 4096;
const BATCH_ROUNDS: u64 = 24;

/// Bursts of in-capsule 4 KiB writes, 32 in flight on one queue (the host
/// sends each burst with one `sendmsg`), broken now and then by a read or a
/// 512-byte write, so the target's batch receive sees whole batches, a
/// capsule of another shape in the middle of one, and a capsule still
/// arriving at its end. Every read checks what the task last wrote and each
/// region is read back at the end. Without a data digest the target must
/// have taken the writes with batch receives: its reactor completes fewer
/// ring ops (receives and sends together) than there were writes, where
/// one receive per write already makes more. With a data digest batching
/// is off and only the data is checked.
fn bursts_of_in_capsule_writes(header_digest: bool, data_digest: bool) {
    let t = start_malloc_target(
        NQN,
        "batchvol",
        8 * QD,
        BlockSize::B512,
        TransportOptions {
            in_capsule_data_size: BATCH_ICD as u32,
            io_unit_size: 8192,
            ..TransportOptions::defaults(CHUNK)
        },
    );
    let host = runtime(vec![1]);
    let addr = t.addr;
    let ops_before = t.rt.handles()[0].stats().ios_completed;
    let writes = host.handles()[0]
        .block_on(move || async move {
            let (_ctrl, q) = connect_io_queue(addr, header_digest, data_digest).await;
            let mut tasks = Vec::new();
            for w in 0..QD {
                let q = q.clone();
                tasks.push(spawn(async move {
                    let base = w * 8;
                    let mut expect = vec![0u8; BATCH_ICD];
                    let mut writes = 0u64;
                    for r in 0..BATCH_ROUNDS {
                        let seed = w * 1000 + r;
                        // Two tasks break the runs of 4 KiB writes now and then.
                        let odd = (w == 5 || w == 17) && r % 4 != 0;
                        if odd && r % 4 == 1 {
                            let buf = buffer_pool().alloc(BATCH_ICD).expect("chunk");
                            let (res, buf) = q.read(1, base, 8, buf).await;
                            res.expect("read");
                            assert!(buf[..] == expect[..], "task {w} round {r}: read differs");
                            continue;
                        }
                        let len = if odd && r % 4 == 3 { BS } else { BATCH_ICD };
                        expect[..len].copy_from_slice(&pattern(seed, len));
                        let mut buf = buffer_pool().alloc(len).expect("chunk");
                        buf.copy_from_slice(&expect[..len]);
                        q.write(1, base, buf.freeze()).await.expect("write");
                        writes += 1;
                    }
                    let buf = buffer_pool().alloc(BATCH_ICD).expect("chunk");
                    let (res, buf) = q.read(1, base, 8, buf).await;
                    res.expect("final read");
                    assert!(buf[..] == expect[..], "task {w}: final read differs");
                    writes
                }));
            }
            let mut n = 0;
            for t in tasks {
                n += t.await;
            }
            n
        })
        .expect("host reactor");
    // The reactor publishes its counters at least every millisecond.
    std::thread::sleep(std::time::Duration::from_millis(20));
    let ops = t.rt.handles()[0].stats().ios_completed - ops_before;
    assert!(writes > QD * BATCH_ROUNDS * 3 / 4, "{writes} writes");
    if !data_digest {
        assert!(
            ops < writes,
            "{ops} ring ops on the target for {writes} in-capsule writes: no batch receives"
        );
    }
}

#[test]
fn bursts_of_in_capsule_writes_plain() {
    bursts_of_in_capsule_writes(false, false);
}

#[test]
fn bursts_of_in_capsule_writes_with_header_digest() {
    bursts_of_in_capsule_writes(true, false);
}

#[test]
fn bursts_of_in_capsule_writes_with_both_digests() {
    bursts_of_in_capsule_writes(true, true);
}
