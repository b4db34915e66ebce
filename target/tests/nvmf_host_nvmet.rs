//! The userspace NVMe/TCP initiator against the Linux kernel's nvmet-tcp
//! target (a brd RAM disk exported by a Debian kernel under QEMU; see
//! `scripts/interop/nvmet-host-check.sh`, which boots the guest and runs
//! this test). Ignored by default: it needs `MP_NVMET_ADDR` (host:port the
//! guest's port 4420 is forwarded to) and `MP_NVMET_NQN`.
//!
//! Each session: connect and identify, write/read/verify at QD 32, Write
//! Zeroes, flush, LBA-out-of-range status, a second I/O queue on another
//! reactor, keep-alive and shutdown; with header and data digests off and
//! on, in-capsule and R2T-only writes, and SQ flow control disabled (where
//! nvmet ends reads with SUCCESS-flagged C2HData). Plus the discovery log.

mod nvmf_host_common;

use mirrorpoint_target::nvmf::host::ConnectOptions;
use nvmf_host_common::{discovery, session_with_floor};
use std::net::SocketAddr;

/// Fewer extents than against our target: the guest runs under TCG.
const EXTENTS: u64 = 48;

fn target() -> (SocketAddr, String) {
    let addr = std::env::var("MP_NVMET_ADDR")
        .expect("MP_NVMET_ADDR (run scripts/interop/nvmet-host-check.sh)")
        .parse()
        .expect("MP_NVMET_ADDR is host:port");
    let nqn = std::env::var("MP_NVMET_NQN").expect("MP_NVMET_NQN");
    (addr, nqn)
}

#[test]
#[ignore = "needs a Linux nvmet-tcp target: scripts/interop/nvmet-host-check.sh"]
fn against_linux_nvmet_tcp() {
    let (addr, nqn) = target();
    discovery(addr, &nqn, "4420");
    let cases = [
        ("no digests, in-capsule", false, false, true, false),
        ("header+data digests, in-capsule", true, true, true, false),
        (
            "no digests, R2T only, SQ flow control off",
            false,
            false,
            false,
            true,
        ),
        ("header+data digests, R2T only", true, true, false, false),
        (
            "header digest only, SQ flow control off",
            true,
            false,
            true,
            true,
        ),
    ];
    // MP_NVMET_CASES=0,2 runs only those; MP_NVMET_FLOOR overrides the
    // smallest R2T-only write (see below).
    let only: Option<Vec<usize>> = std::env::var("MP_NVMET_CASES")
        .ok()
        .map(|v| v.split(',').filter_map(|x| x.trim().parse().ok()).collect());
    let floor_override: Option<usize> = std::env::var("MP_NVMET_FLOOR")
        .ok()
        .and_then(|v| v.parse().ok());
    for (i, (name, hd, dd, icw, noflow)) in cases.into_iter().enumerate() {
        if only.as_ref().is_some_and(|o| !o.contains(&i)) {
            continue;
        }
        let opts = ConnectOptions {
            header_digest: hd,
            data_digest: dd,
            in_capsule_writes: icw,
            disable_sq_flow_control: noflow,
            ..ConnectOptions::default()
        };
        // Linux 6.1 nvmet-tcp never sends the R2T for a write no larger than
        // its inline data size (16 KiB) that arrives without in-capsule data
        // (nvmet_tcp_queue_response waits for inline data that never comes);
        // Linux hosts always send such writes in the capsule. R2T-only
        // sessions therefore write more than 16 KiB at a time.
        let floor = if icw {
            0
        } else {
            floor_override.unwrap_or(16 * 1024 + 4096)
        };
        let r = session_with_floor(addr, &nqn, opts, 100 + i as u64, EXTENTS, floor);
        eprintln!(
            "nvmet session '{name}': OK; cntlid {} model '{}', ns 1 {} x {} B, digests {:?}, \
             in-capsule limit {}, MAXH2CDATA {}, {} extents / {} KiB verified in {:.1} s, {:?}",
            r.cntlid,
            r.model,
            r.nsze,
            r.block_size,
            r.digests,
            r.in_capsule_limit,
            r.max_h2c_data,
            r.extents,
            r.bytes / 1024,
            r.io_seconds,
            r.stats
        );
        assert_eq!(r.digests, (hd, dd));
        if icw {
            assert!(r.stats.in_capsule_writes > 0, "{r:?}");
        } else {
            assert_eq!(r.stats.in_capsule_writes, 0, "{r:?}");
            assert!(r.stats.r2ts >= EXTENTS, "{r:?}");
        }
        if noflow && !dd {
            assert!(r.stats.success_flag_completions > 0, "{r:?}");
        }
    }
}
