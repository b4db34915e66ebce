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
const SIZES: [u64; 8] = [1, 2, 3, 7, 8, 16, 24, 5];

fn mixed_sizes_round_trip(digests: bool) {
    let t = start_target();
    let host = runtime(vec![1]);
    let addr = t.addr;
    let checked = host.handles()[0]
        .block_on(move || async move {
            let opts = ConnectOptions {
                header_digest: digests,
                data_digest: digests,
                ..ConnectOptions::default()
            };
            let ctrl = Controller::connect(addr, NQN, HOSTNQN, opts)
                .await
                .expect("connect");
            let q = Rc::new(IoQueue::connect(ctrl.info(), 1, 64).await.expect("queue"));
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
