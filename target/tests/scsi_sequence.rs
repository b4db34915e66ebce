//! The SCSI layer through its public API on both backends, the way an
//! initiator drives a fresh LUN: clear the power-on unit attention, INQUIRY
//! and VPD, READ CAPACITY, MODE SENSE, write/read/verify across chunk
//! boundaries, UNMAP and GET LBA STATUS (holes on a file backend),
//! COMPARE AND WRITE, SYNCHRONIZE CACHE, reservations between two
//! initiators, and the target-level REPORT LUNS.

use mirrorpoint_poller::{buffer_pool, PoolConfig, ReactorConfig, Runtime, RuntimeConfig};
use mirrorpoint_target::scsi::{
    lun_not_supported, report_luns, LogicalUnit, LunConfig, Nexus, ResetKind, ScsiStatus, ScsiTask,
    TaskAttribute,
};
use mirrorpoint_target::units::BlockSize;
use mirrorpoint_target::volume::registry::{MallocParams, UringParams};
use mirrorpoint_target::volume::{Volume, VolumeRegistry, VolumeSpec};
use std::sync::Arc;

fn runtime() -> Runtime {
    Runtime::start(RuntimeConfig {
        cores: vec![0, 1],
        reactor: ReactorConfig {
            pool: PoolConfig {
                chunk_size: 128 * 1024,
                chunk_count: 256,
                huge_pages: false,
            },
            ..ReactorConfig::default()
        },
        pin: false,
    })
    .expect("runtime")
}

fn nexus(who: &str) -> Nexus {
    Nexus {
        initiator_port: format!("iqn.1994-05.com.example:{who},i,0x23d000000001"),
        target_port: "iqn.2026-11.io.mirrorpoint:vol0,t,0x0001".into(),
        relative_port: 1,
    }
}

struct Reply {
    status: ScsiStatus,
    sense: Option<Vec<u8>>,
    data: Vec<u8>,
}

impl Reply {
    fn asc(&self) -> (u8, u8, u8) {
        let s = self.sense.as_deref().expect("sense");
        (s[2] & 0x0f, s[12], s[13])
    }
}

/// Runs one command on reactor `core`; Data-Out is cut into 8 KiB PDUs.
fn run(
    rt: &Runtime,
    core: usize,
    lu: &Arc<LogicalUnit>,
    n: &Nexus,
    cdb: &[u8],
    out: &[u8],
    exp_in: u32,
) -> Reply {
    let (lu, n, cdb, out) = (lu.clone(), n.clone(), cdb.to_vec(), out.to_vec());
    rt.handles()[core]
        .block_on(move || async move {
            let ch = lu.volume().channel();
            let pool = buffer_pool();
            let data_out = out
                .chunks(8192)
                .map(|p| {
                    let mut b = pool.alloc(p.len()).expect("chunk");
                    b.copy_from_slice(p);
                    b.freeze()
                })
                .collect();
            let r = lu
                .execute(
                    &ch,
                    ScsiTask {
                        cdb: &cdb,
                        data_out,
                        expected_data_in: exp_in,
                        expected_data_out: out.len() as u32,
                        attribute: TaskAttribute::Simple,
                        nexus: &n,
                    },
                )
                .await;
            Reply {
                status: r.status,
                sense: r.sense,
                data: r.data_in.iter().flat_map(|b| b.to_vec()).collect(),
            }
        })
        .expect("reactor")
}

fn rw(opcode: u8, lba: u64, blocks: u32, flags: u8) -> Vec<u8> {
    let mut c = vec![opcode, flags];
    c.extend_from_slice(&lba.to_be_bytes());
    c.extend_from_slice(&blocks.to_be_bytes());
    c.extend_from_slice(&[0, 0]);
    c
}

fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

fn sequence(rt: &Runtime, volume: Arc<Volume>, file_backed: bool) {
    let lu = Arc::new(LogicalUnit::new(volume.clone(), LunConfig::default()));
    let (a, b) = (nexus("a"), nexus("b"));
    let bs = volume.block_size().bytes();
    let blocks = volume.num_blocks();
    let max = mirrorpoint_target::scsi::max_transfer_blocks(bs, 128 * 1024);

    // Login: INQUIRY works before the unit attention is cleared.
    let inq = run(rt, 0, &lu, &a, &[0x12, 0, 0, 0, 96, 0], &[], 96);
    assert_eq!(inq.status, ScsiStatus::Good);
    assert_eq!(inq.data[0], 0);
    let tur = run(rt, 0, &lu, &a, &[0; 6], &[], 0);
    assert_eq!(tur.asc(), (6, 0x29, 0x01));
    assert_eq!(
        run(rt, 0, &lu, &a, &[0; 6], &[], 0).status,
        ScsiStatus::Good
    );
    // Block limits: the max transfer is one chunk.
    let bl = run(rt, 0, &lu, &a, &[0x12, 1, 0xb0, 0, 64, 0], &[], 64);
    assert_eq!(
        u32::from_be_bytes(bl.data[8..12].try_into().expect("4")),
        max
    );
    // READ CAPACITY(16).
    let rc = run(rt, 0, &lu, &a, &rw(0x9e, 0, 32, 0x10), &[], 32);
    assert_eq!(
        u64::from_be_bytes(rc.data[0..8].try_into().expect("8")),
        blocks - 1
    );
    assert_eq!(
        u32::from_be_bytes(rc.data[8..12].try_into().expect("4")),
        bs
    );
    // MODE SENSE(10), all pages.
    let ms = run(
        rt,
        1,
        &lu,
        &a,
        &[0x5a, 0, 0x3f, 0, 0, 0, 0, 1, 0, 0],
        &[],
        256,
    );
    assert_eq!(ms.status, ScsiStatus::Good);

    // Write the largest transfer from one core, read it back on the other.
    let big = pattern(1, (max * bs) as usize);
    let w = run(rt, 0, &lu, &a, &rw(0x8a, 8, max, 0x08), &big, 0);
    assert_eq!(w.status, ScsiStatus::Good, "{:?}", w.sense);
    let r = run(rt, 1, &lu, &a, &rw(0x88, 8, max, 0), &[], max * bs);
    assert!(r.data == big);
    let v = run(rt, 1, &lu, &a, &rw(0x8f, 8, max, 0x02), &big, 0);
    assert_eq!(v.status, ScsiStatus::Good);

    // UNMAP part of it: it reads as zeroes, and a file reports the hole.
    let hole_start = 8 + u64::from(max) / 2;
    let hole_len = (1 << 20) / bs;
    let _ = run(
        rt,
        0,
        &lu,
        &a,
        &rw(0x93, hole_start, hole_len, 0x08),
        &vec![0; bs as usize],
        0,
    );
    let mut p = vec![0, 22, 0, 16, 0, 0, 0, 0];
    p.extend_from_slice(&hole_start.to_be_bytes());
    p.extend_from_slice(&hole_len.to_be_bytes());
    p.extend_from_slice(&[0; 4]);
    let um = run(rt, 0, &lu, &a, &[0x42, 0, 0, 0, 0, 0, 0, 0, 24, 0], &p, 0);
    assert_eq!(um.status, ScsiStatus::Good, "{:?}", um.sense);
    let r = run(rt, 1, &lu, &a, &rw(0x88, hole_start, 8, 0), &[], 8 * bs);
    assert!(r.data.iter().all(|&x| x == 0));
    let gls = run(rt, 0, &lu, &a, &rw(0x9e, 8, 64, 0x12), &[], 64);
    assert_eq!(gls.status, ScsiStatus::Good);
    let first = &gls.data[8..24];
    assert_eq!(u64::from_be_bytes(first[0..8].try_into().expect("8")), 8);
    assert_eq!(first[12] & 0x0f, 0, "written data is mapped");
    if file_backed {
        let second = &gls.data[24..40];
        let at = u64::from_be_bytes(second[0..8].try_into().expect("8"));
        assert!(
            at >= hole_start && at < hole_start + u64::from(hole_len),
            "hole at {at}"
        );
        assert_eq!(second[12] & 0x0f, 1, "hole reported deallocated");
    }
    // Beyond the end of the LUN.
    let gls = run(rt, 0, &lu, &a, &rw(0x9e, blocks, 24, 0x12), &[], 24);
    assert_eq!(gls.asc(), (5, 0x21, 0x00));

    // COMPARE AND WRITE from the second core.
    let old = pattern(1, big.len())[..bs as usize].to_vec();
    let new = pattern(9, bs as usize);
    let mut caw = rw(0x89, 8, 0, 0);
    caw[13] = 1;
    let ok = run(
        rt,
        1,
        &lu,
        &a,
        &caw,
        &[old.clone(), new.clone()].concat(),
        0,
    );
    assert_eq!(ok.status, ScsiStatus::Good, "{:?}", ok.sense);
    let miss = run(rt, 1, &lu, &a, &caw, &[old, new.clone()].concat(), 0);
    assert_eq!(miss.asc(), (0x0e, 0x1d, 0x00));
    // SYNCHRONIZE CACHE(10).
    assert_eq!(
        run(rt, 0, &lu, &a, &[0x35, 0, 0, 0, 0, 0, 0, 0, 0, 0], &[], 0).status,
        ScsiStatus::Good
    );

    // Second initiator: persistent reservation Write Exclusive by A.
    let _ = run(rt, 0, &lu, &b, &[0; 6], &[], 0);
    let reg = |k: u64| {
        let mut p = vec![0u8; 8];
        p.extend_from_slice(&k.to_be_bytes());
        p.extend_from_slice(&[0; 8]);
        p
    };
    let prout = |sa: u8, t: u8| vec![0x5f, sa, t, 0, 0, 0, 0, 0, 24, 0];
    assert_eq!(
        run(rt, 0, &lu, &a, &prout(6, 0), &reg(0xa), 0).status,
        ScsiStatus::Good
    );
    assert_eq!(
        run(rt, 1, &lu, &b, &prout(6, 0), &reg(0xb), 0).status,
        ScsiStatus::Good
    );
    let mut res = 0xau64.to_be_bytes().to_vec();
    res.extend_from_slice(&[0; 16]);
    assert_eq!(
        run(rt, 0, &lu, &a, &prout(1, 1), &res, 0).status,
        ScsiStatus::Good
    );
    let wb = run(rt, 1, &lu, &b, &rw(0x8a, 0, 1, 0), &new, 0);
    assert_eq!(wb.status, ScsiStatus::ReservationConflict);
    let rb = run(rt, 1, &lu, &b, &rw(0x88, 0, 1, 0), &[], bs);
    assert_eq!(rb.status, ScsiStatus::Good);
    // A LUN reset keeps it; the session of A going away keeps it too.
    lu.reset(ResetKind::LogicalUnit, &b);
    lu.nexus_lost(&a);
    let _ = run(rt, 1, &lu, &b, &[0; 6], &[], 0);
    assert_eq!(
        run(rt, 1, &lu, &b, &rw(0x8a, 0, 1, 0), &new, 0).status,
        ScsiStatus::ReservationConflict
    );
    let _ = run(rt, 0, &lu, &a, &[0; 6], &[], 0);
    let mut clear = 0xau64.to_be_bytes().to_vec();
    clear.extend_from_slice(&[0; 16]);
    assert_eq!(
        run(rt, 0, &lu, &a, &prout(3, 0), &clear, 0).status,
        ScsiStatus::Good
    );
    let rb = run(rt, 1, &lu, &b, &rw(0x8a, 0, 1, 0), &new, 0);
    assert_eq!(rb.asc(), (6, 0x2a, 0x03), "B hears RESERVATIONS PREEMPTED");

    // Target-level answers.
    rt.handles()[0]
        .block_on(move || async move {
            let n = nexus("a");
            let cdb = [0xa0, 0, 0, 0, 0, 0, 0, 0, 0, 64, 0, 0];
            let t = ScsiTask {
                cdb: &cdb,
                data_out: Vec::new(),
                expected_data_in: 64,
                expected_data_out: 0,
                attribute: TaskAttribute::Simple,
                nexus: &n,
            };
            let r = report_luns(&[0, 1], &t);
            assert_eq!(r.data_in_len(), 24);
            let inq = [0x12, 0, 0, 0, 36, 0];
            let t = ScsiTask {
                cdb: &inq,
                expected_data_in: 36,
                ..t
            };
            let r = lun_not_supported(&t);
            assert_eq!(r.data_in.first().map(|b| b[0]), Some(0x7f));
        })
        .expect("reactor");
}

#[test]
fn sequence_on_malloc() {
    let rt = runtime();
    let reg = VolumeRegistry::new();
    let v = reg
        .create(VolumeSpec::Malloc(MallocParams {
            name: Some("m0".into()),
            num_blocks: 16384,
            block_size: BlockSize::B512,
            uuid: None,
        }))
        .expect("malloc");
    sequence(&rt, v, false);
}

#[test]
fn sequence_on_uring_file() {
    let rt = runtime();
    let path = std::env::temp_dir().join(format!("mp-scsi-{}.img", std::process::id()));
    let _ = std::fs::remove_file(&path);
    let reg = VolumeRegistry::new();
    let v = reg
        .create(VolumeSpec::Uring(UringParams {
            name: "u0".into(),
            filename: path.clone(),
            block_size: Some(BlockSize::B4096),
            size: Some(16 << 20),
            queue_depth: Some(8),
            uuid: None,
        }))
        .expect("uring");
    sequence(&rt, v.clone(), true);
    drop(v);
    reg.delete("u0").expect("delete");
    std::fs::remove_file(path).ok();
}
