//! Command-level tests of the SCSI layer on a malloc volume, driven through
//! `LogicalUnit::execute` on a reactor: CDB decoding, sense data for each
//! error, allocation-length truncation, VPD content, unit attentions, the
//! data path, COMPARE AND WRITE atomicity across two reactors, mode pages,
//! reservations through the dispatcher, and a property test that no CDB or
//! parameter list panics or produces a malformed answer.

use super::cdb::{op, Cdb, Rw};
use super::sense::{Asc, SenseKey};
use super::*;
use crate::units::BlockSize;
use crate::volume::registry::MallocParams;
use crate::volume::{VolumeRegistry, VolumeSpec};
use mirrorpoint_poller::{buffer_pool, PoolConfig, ReactorConfig, Runtime, RuntimeConfig};
use std::sync::Arc;

pub(crate) struct Env {
    pub rt: Runtime,
    pub lu: Arc<LogicalUnit>,
}

pub(crate) fn runtime(cores: usize) -> Runtime {
    Runtime::start(RuntimeConfig {
        cores: (0..cores).collect(),
        reactor: ReactorConfig {
            pool: PoolConfig {
                chunk_size: 128 * 1024,
                chunk_count: 64,
                huge_pages: false,
            },
            ..ReactorConfig::default()
        },
        pin: false,
    })
    .expect("runtime")
}

pub(crate) fn env_with(blocks: u64, bs: BlockSize, cfg: LunConfig, cores: usize) -> Env {
    let reg = VolumeRegistry::new();
    let v = reg
        .create(VolumeSpec::Malloc(MallocParams {
            name: Some("m".into()),
            num_blocks: blocks,
            block_size: bs,
            uuid: Some("6d1a6a7e-3c1b-4b8e-9f00-0123456789ab".into()),
        }))
        .expect("malloc");
    Env {
        rt: runtime(cores),
        lu: Arc::new(LogicalUnit::new(v, cfg)),
    }
}

pub(crate) fn env() -> Env {
    env_with(2048, BlockSize::B512, LunConfig::default(), 1)
}

pub(crate) fn nx(i: &str) -> Nexus {
    Nexus {
        initiator_port: format!("iqn.2026-11.test:{i},i,0x000000000001"),
        target_port: "iqn.2026-11.io.mirrorpoint:t,t,0x0001".into(),
        relative_port: 1,
    }
}

#[derive(Debug)]
pub(crate) struct Out {
    pub status: ScsiStatus,
    pub sense: Option<Vec<u8>>,
    pub data: Vec<u8>,
    pub buffers: usize,
}

impl Out {
    /// (sense key, ASC, ASCQ) of fixed or descriptor sense.
    pub fn key_asc(&self) -> (u8, u8, u8) {
        let s = self.sense.as_deref().expect("sense");
        match s[0] & 0x7f {
            0x70 | 0x71 => (s[2] & 0x0f, s[12], s[13]),
            _ => (s[1] & 0x0f, s[2], s[3]),
        }
    }

    pub fn good(&self) -> bool {
        self.status == ScsiStatus::Good
    }

    #[track_caller]
    pub fn expect(&self, key: SenseKey, asc: Asc) {
        assert_eq!(self.status, ScsiStatus::CheckCondition, "{self:?}");
        assert_eq!(self.key_asc(), (key as u8, asc.0, asc.1), "{self:?}");
    }

    /// Sense-key-specific field pointer of fixed sense: (in_cdb, byte).
    pub fn field_pointer(&self) -> (bool, u16) {
        let s = self.sense.as_deref().expect("sense");
        assert_eq!(s[15] & 0x80, 0x80, "SKSV");
        (s[15] & 0x40 != 0, u16::from_be_bytes([s[16], s[17]]))
    }
}

impl Env {
    /// Runs one command; Data-Out is split into pieces of `split` bytes.
    pub fn cmd_split(&self, n: &Nexus, cdb: &[u8], out: &[u8], split: usize, exp_in: u32) -> Out {
        let lu = self.lu.clone();
        let (n, cdb, out) = (n.clone(), cdb.to_vec(), out.to_vec());
        self.rt.handles()[0]
            .block_on(move || async move {
                let ch = lu.volume().channel();
                let pool = buffer_pool();
                let data_out = out
                    .chunks(split.max(1))
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
                let data: Vec<u8> = r.data_in.iter().flat_map(|b| b.to_vec()).collect();
                let buffers = r.data_in.len();
                drop(r.data_in);
                assert_eq!(
                    pool.free_chunks(),
                    pool.chunk_count(),
                    "a command kept pool chunks"
                );
                Out {
                    status: r.status,
                    sense: r.sense,
                    data,
                    buffers,
                }
            })
            .expect("reactor")
    }

    pub fn cmd(&self, n: &Nexus, cdb: &[u8], out: &[u8], exp_in: u32) -> Out {
        self.cmd_split(n, cdb, out, 128 * 1024, exp_in)
    }

    /// TEST UNIT READY until the pending unit attentions are gone.
    pub fn clear_ua(&self, n: &Nexus) {
        for _ in 0..16 {
            if self.cmd(n, &[0; 6], &[], 0).good() {
                return;
            }
        }
        panic!("unit attentions do not clear");
    }
}

fn read10(lba: u32, blocks: u16) -> Vec<u8> {
    let mut c = vec![op::READ_10, 0];
    c.extend_from_slice(&lba.to_be_bytes());
    c.push(0);
    c.extend_from_slice(&blocks.to_be_bytes());
    c.push(0);
    c
}

fn write10(lba: u32, blocks: u16) -> Vec<u8> {
    let mut c = read10(lba, blocks);
    c[0] = op::WRITE_10;
    c
}

fn cdb16(opcode: u8, flags: u8, lba: u64, n: u32) -> Vec<u8> {
    let mut c = vec![opcode, flags];
    c.extend_from_slice(&lba.to_be_bytes());
    c.extend_from_slice(&n.to_be_bytes());
    c.extend_from_slice(&[0, 0]);
    c
}

fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

#[test]
fn rw_cdb_decoding() {
    let r = Rw::decode(&Cdb::new(&[op::READ_6, 0xff, 0x12, 0x34, 0, 0])).expect("6");
    assert_eq!((r.lba, r.blocks, r.fua), (0x1f1234, 256, false));
    let r = Rw::decode(&Cdb::new(&[op::WRITE_10, 0x08, 0, 0, 1, 0, 0, 0, 9, 0])).expect("10");
    assert_eq!((r.lba, r.blocks, r.fua, r.len_byte), (256, 9, true, 7));
    let r = Rw::decode(&Cdb::new(&[
        op::READ_12,
        0x30,
        0,
        0,
        0,
        7,
        0,
        1,
        0,
        0,
        0,
        0,
    ]))
    .expect("12");
    assert_eq!((r.lba, r.blocks, r.dpo, r.protect), (7, 65536, true, 1));
    let r = Rw::decode(&Cdb::new(&cdb16(op::VERIFY_16, 0x06, 1 << 40, 3))).expect("16");
    assert_eq!((r.lba, r.blocks, r.bytchk, r.len_byte), (1 << 40, 3, 3, 10));
    // Short CDB and NACA.
    assert!(Rw::decode(&Cdb::new(&[op::READ_10, 0, 0])).is_err());
    assert!(Rw::decode(&Cdb::new(&[op::READ_10, 0, 0, 0, 0, 0, 0, 0, 1, 0x04])).is_err());
    // Range checks: zero blocks may start at the capacity, not past it.
    let at = |lba, blocks| Rw {
        lba,
        blocks,
        len_byte: 7,
        protect: 0,
        dpo: false,
        fua: false,
        bytchk: 0,
        flags: 0,
    };
    assert!(at(10, 0).check_range(10).is_ok());
    assert!(at(11, 0).check_range(10).is_err());
    assert!(at(9, 1).check_range(10).is_ok());
    assert!(at(9, 2).check_range(10).is_err());
    assert!(at(u64::MAX, 2).check_range(10).is_err());
}

#[test]
fn unknown_opcodes_and_bad_cdbs() {
    let e = env();
    let a = nx("a");
    e.clear_ua(&a);
    for opc in [0x02u8, 0x04, 0x3b, 0x7f, 0xc0, 0xff, op::REPORT_LUNS] {
        let r = e.cmd(
            &a,
            &[opc, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            &[],
            512,
        );
        r.expect(
            SenseKey::IllegalRequest,
            Asc::INVALID_COMMAND_OPERATION_CODE,
        );
        assert_eq!(r.field_pointer(), (true, 0));
    }
    let r = e.cmd(&a, &[], &[], 0);
    r.expect(SenseKey::IllegalRequest, Asc::INVALID_FIELD_IN_CDB);
    // NACA in the control byte.
    e.cmd(&a, &[0, 0, 0, 0, 0, 0x04], &[], 0)
        .expect(SenseKey::IllegalRequest, Asc::INVALID_FIELD_IN_CDB);
    // Truncated CDB.
    e.cmd(&a, &[op::READ_16, 0, 0], &[], 0)
        .expect(SenseKey::IllegalRequest, Asc::INVALID_FIELD_IN_CDB);
}

#[test]
fn unit_attentions_per_nexus() {
    let e = env();
    let (a, b) = (nx("a"), nx("b"));
    // INQUIRY does not report or clear it.
    assert!(e.cmd(&a, &[op::INQUIRY, 0, 0, 0, 96, 0], &[], 96).good());
    e.cmd(&a, &[0; 6], &[], 0)
        .expect(SenseKey::UnitAttention, Asc::POWER_ON_OCCURRED);
    assert!(e.cmd(&a, &[0; 6], &[], 0).good());
    // REQUEST SENSE returns it and clears it.
    let r = e.cmd(&b, &[op::REQUEST_SENSE, 0, 0, 0, 252, 0], &[], 252);
    assert!(r.good());
    assert_eq!((r.data[2], r.data[12], r.data[13]), (6, 0x29, 0x01));
    let r = e.cmd(&b, &[op::REQUEST_SENSE, 1, 0, 0, 252, 0], &[], 252);
    assert_eq!(&r.data[..4], &[0x72, 0, 0, 0], "descriptor NO SENSE");
    assert!(e.cmd(&b, &[0; 6], &[], 0).good());
    // A reset reaches every nexus.
    e.lu.reset(ResetKind::LogicalUnit, &a);
    for n in [&a, &b] {
        e.cmd(n, &read10(0, 1), &[], 512).expect(
            SenseKey::UnitAttention,
            Asc::BUS_DEVICE_RESET_FUNCTION_OCCURRED,
        );
        assert!(e.cmd(n, &read10(0, 1), &[], 512).good());
    }
    // A lost nexus that comes back hears about it.
    e.lu.nexus_lost(&b);
    e.cmd(&b, &[0; 6], &[], 0)
        .expect(SenseKey::UnitAttention, Asc::I_T_NEXUS_LOSS_OCCURRED);
    e.lu.reset(ResetKind::TargetCold, &a);
    e.cmd(&a, &[0; 6], &[], 0)
        .expect(SenseKey::UnitAttention, Asc::POWER_ON_OCCURRED);
}

#[test]
fn inquiry_standard_and_truncation() {
    let e = env();
    let a = nx("a");
    let r = e.cmd(&a, &[op::INQUIRY, 0, 0, 0, 255, 0], &[], 255);
    assert!(r.good());
    let d = &r.data;
    assert_eq!(d.len(), 96);
    assert_eq!(d[0], 0);
    assert_eq!(d[2], 6, "SPC-4");
    assert_eq!(d[3] & 0x0f, 2);
    assert_eq!(usize::from(d[4]) + 5, d.len());
    assert_eq!(d[5] & 0x30, 0x10, "TPGS implicit");
    assert_eq!(d[5] & 0x09, 0, "no 3PC, no PROTECT");
    assert_eq!(&d[8..16], b"MIRRORPT");
    assert!(
        d[58..74].chunks(2).any(|v| v == [0x04, 0xc0]),
        "SBC-3 descriptor"
    );
    // Allocation length and expected length both truncate.
    for (alloc, exp, want) in [
        (5u16, 255u32, 5usize),
        (255, 36, 36),
        (0, 255, 0),
        (1000, 1000, 96),
    ] {
        let a16 = alloc.to_be_bytes();
        let r = e.cmd(&a, &[op::INQUIRY, 0, 0, a16[0], a16[1], 0], &[], exp);
        assert!(r.good());
        assert_eq!(r.data.len(), want, "alloc {alloc} exp {exp}");
    }
    // Page code without EVPD; CMDDT; unknown VPD page.
    let r = e.cmd(&a, &[op::INQUIRY, 0, 0x80, 0, 255, 0], &[], 255);
    r.expect(SenseKey::IllegalRequest, Asc::INVALID_FIELD_IN_CDB);
    assert_eq!(r.field_pointer(), (true, 2));
    e.cmd(&a, &[op::INQUIRY, 2, 0, 0, 255, 0], &[], 255)
        .expect(SenseKey::IllegalRequest, Asc::INVALID_FIELD_IN_CDB);
    let r = e.cmd(&a, &[op::INQUIRY, 1, 0x99, 0, 255, 0], &[], 255);
    r.expect(SenseKey::IllegalRequest, Asc::INVALID_FIELD_IN_CDB);
    assert_eq!(r.field_pointer(), (true, 2));
}

fn vpd(e: &Env, page: u8) -> Vec<u8> {
    let r = e.cmd(&nx("a"), &[op::INQUIRY, 1, page, 1, 0, 0], &[], 256);
    assert!(r.good(), "page {page:#x}: {r:?}");
    assert_eq!(r.data[1], page);
    assert_eq!(
        usize::from(u16::from_be_bytes([r.data[2], r.data[3]])) + 4,
        r.data.len()
    );
    r.data
}

#[test]
fn vpd_pages() {
    let e = env();
    let sup = vpd(&e, 0x00);
    assert_eq!(&sup[4..], &[0x00, 0x80, 0x83, 0xb0, 0xb1, 0xb2]);
    for p in &sup[4..] {
        vpd(&e, *p);
    }
    let serial = vpd(&e, 0x80);
    assert_eq!(&serial[4..], b"6d1a6a7e3c1b4b8e9f000123456789ab");
    let id = vpd(&e, 0x83);
    let mut at = 4;
    let mut types = Vec::new();
    while at + 4 <= id.len() {
        let len = usize::from(id[at + 3]);
        types.push((id[at + 1] & 0x30, id[at + 1] & 0x0f));
        if id[at + 1] & 0x0f == 3 {
            assert_eq!(id[at + 4] >> 4, 3, "NAA locally assigned");
            assert_eq!(
                &id[at + 4..at + 12],
                &[0x36, 0xd1, 0xa6, 0xa7, 0xe3, 0xc1, 0xb4, 0xb8]
            );
        }
        if id[at + 1] & 0x0f == 4 {
            assert_eq!(&id[at + 4..at + 8], &[0, 0, 0, 1]);
        }
        if id[at + 1] & 0x0f == 8 {
            assert_eq!(len % 4, 0);
        }
        at += 4 + len;
    }
    assert_eq!(at, id.len());
    for want in [(0, 3), (0, 1), (0x10, 4), (0x10, 5), (0x10, 8), (0x20, 8)] {
        assert!(types.contains(&want), "{want:?} in {types:?}");
    }
    let bl = vpd(&e, 0xb0);
    assert_eq!(bl.len(), 64);
    assert_eq!(bl[4] & 1, 0, "WSNZ");
    let be32 = |at: usize| u32::from_be_bytes(bl[at..at + 4].try_into().expect("4"));
    assert_eq!(be32(8), 2048, "maximum transfer: eight chunks");
    assert_eq!(be32(12), 256, "optimal transfer: one chunk");
    assert_eq!(u32::from_be_bytes(bl[24..28].try_into().expect("4")), 256);
    assert_ne!(u32::from_be_bytes(bl[20..24].try_into().expect("4")), 0);
    assert_eq!(max_transfer_blocks(512, 128 * 1024), 2048);
    assert_eq!(max_transfer_blocks(4096, 128 * 1024), 256);
    assert_eq!(max_transfer_blocks(0, 128 * 1024), 0);
    let bdc = vpd(&e, 0xb1);
    assert_eq!(&bdc[4..6], &[0, 1], "non-rotating");
    let lbp = vpd(&e, 0xb2);
    assert_eq!(lbp[5] & 0xe4, 0xe4, "LBPU LBPWS LBPWS10 LBPRZ");
    assert_eq!(lbp[5] & 0x02, 0, "no anchors");
}

#[test]
fn read_capacity() {
    let e = env();
    let a = nx("a");
    e.clear_ua(&a);
    let r = e.cmd(
        &a,
        &[op::READ_CAPACITY_10, 0, 0, 0, 0, 0, 0, 0, 0, 0],
        &[],
        8,
    );
    assert_eq!(r.data, [0, 0, 0x07, 0xff, 0, 0, 2, 0]);
    let r = e.cmd(
        &a,
        &[op::READ_CAPACITY_10, 0, 0, 0, 0, 1, 0, 0, 0, 0],
        &[],
        8,
    );
    r.expect(SenseKey::IllegalRequest, Asc::INVALID_FIELD_IN_CDB);
    let mut c = cdb16(op::SERVICE_ACTION_IN_16, 0x10, 0, 32);
    let r = e.cmd(&a, &c, &[], 32);
    assert_eq!(r.data.len(), 32);
    assert_eq!(&r.data[..12], &[0, 0, 0, 0, 0, 0, 0x07, 0xff, 0, 0, 2, 0]);
    assert_eq!(r.data[14] & 0xc0, 0xc0, "LBPME LBPRZ");
    c[13] = 12;
    assert_eq!(e.cmd(&a, &c, &[], 32).data.len(), 12);
}

#[test]
fn read_write_round_trip_and_errors() {
    let e = env();
    let a = nx("a");
    e.clear_ua(&a);
    // 40 blocks written from Data-Out split at odd sizes (blocks straddle PDUs).
    let data = pattern(7, 40 * 512);
    for split in [20480, 700, 511, 513, 4096] {
        assert!(
            e.cmd_split(&a, &write10(100, 40), &data, split, 0).good(),
            "split {split}"
        );
        let r = e.cmd(&a, &read10(100, 40), &[], 40 * 512);
        assert!(r.data == data, "split {split}");
    }
    // All CDB sizes.
    let six = e.cmd(&a, &[op::READ_6, 0, 0, 100, 1, 0], &[], 512);
    assert_eq!(six.data, data[..512]);
    let r12 = e.cmd(
        &a,
        &[op::READ_12, 0, 0, 0, 0, 101, 0, 0, 0, 1, 0, 0],
        &[],
        512,
    );
    assert_eq!(r12.data, data[512..1024]);
    let r16 = e.cmd(&a, &cdb16(op::READ_16, 0x18, 102, 1), &[], 512);
    assert_eq!(r16.data, data[1024..1536]);
    let w = pattern(9, 512);
    assert!(e.cmd(&a, &cdb16(op::WRITE_16, 0x08, 5, 1), &w, 0).good());
    assert!(e.cmd(&a, &[op::WRITE_6, 0, 0, 6, 1, 0], &w, 0).good());
    assert!(e
        .cmd(&a, &[op::WRITE_12, 0, 0, 0, 0, 7, 0, 0, 0, 1, 0, 0], &w, 0)
        .good());
    assert_eq!(
        e.cmd(&a, &read10(5, 3), &[], 1536).data,
        [w.clone(), w.clone(), w.clone()].concat()
    );
    // Expected length shorter than the transfer: truncated.
    let r = e.cmd(&a, &read10(100, 2), &[], 200);
    assert_eq!(r.data, data[..200]);
    let r = e.cmd(&a, &read10(100, 2), &[], 0);
    assert!(r.good() && r.data.is_empty());
    // A transfer larger than a chunk comes back in several buffers.
    let r = e.cmd(&a, &read10(0, 1024), &[], 1024 * 512);
    assert!(r.good() && r.data.len() == 1024 * 512 && r.buffers == 4);
    // Zero blocks: GOOD, even at the capacity; past it: out of range.
    assert!(e.cmd(&a, &read10(2048, 0), &[], 0).good());
    for (lba, n) in [(2049u32, 0u16), (2047, 2), (u32::MAX, 1)] {
        e.cmd(&a, &read10(lba, n), &[], 1024).expect(
            SenseKey::IllegalRequest,
            Asc::LOGICAL_BLOCK_ADDRESS_OUT_OF_RANGE,
        );
    }
    e.cmd(&a, &cdb16(op::READ_16, 0, u64::MAX, 1), &[], 512)
        .expect(
            SenseKey::IllegalRequest,
            Asc::LOGICAL_BLOCK_ADDRESS_OUT_OF_RANGE,
        );
    // RDPROTECT / WRPROTECT without protection information.
    let mut c = read10(0, 1);
    c[1] = 0x20;
    let r = e.cmd(&a, &c, &[], 512);
    r.expect(SenseKey::IllegalRequest, Asc::INVALID_FIELD_IN_CDB);
    assert_eq!(r.field_pointer(), (true, 1));
    // Less Data-Out than the CDB needs: what was sent is written, whole
    // blocks only (the transport reports the overflow residual).
    assert!(e.cmd(&a, &write10(300, 1), &pattern(1, 512), 0).good());
    assert!(e.cmd(&a, &write10(301, 1), &pattern(1, 512), 0).good());
    assert!(e.cmd(&a, &write10(300, 2), &w, 0).good());
    assert!(e.cmd(&a, &write10(301, 1), &w[..200], 0).good());
    let r = e.cmd(&a, &read10(300, 2), &[], 1024);
    assert_eq!(r.data, [w.clone(), pattern(1, 512)].concat());
    // More is fine: the surplus is ignored.
    assert!(e
        .cmd(&a, &write10(0, 1), &[w.clone(), w.clone()].concat(), 0)
        .good());
    // FUA, DPO, and WRITE with write cache disabled all work.
    let mut c = write10(1, 1);
    c[1] = 0x18;
    assert!(e.cmd(&a, &c, &w, 0).good());
}

#[test]
fn verify_and_write_verify() {
    let e = env();
    let a = nx("a");
    e.clear_ua(&a);
    let d = pattern(3, 4 * 512);
    assert!(e.cmd(&a, &write10(10, 4), &d, 0).good());
    let mut v = write10(10, 4);
    v[0] = op::VERIFY_10;
    assert!(e.cmd(&a, &v, &[], 0).good(), "BYTCHK=0");
    v[1] = 0x02;
    assert!(e.cmd(&a, &v, &d, 0).good(), "BYTCHK=1 equal");
    let mut bad = d.clone();
    bad[1000] ^= 0xff;
    let r = e.cmd(&a, &v, &bad, 0);
    r.expect(
        SenseKey::Miscompare,
        Asc::MISCOMPARE_DURING_VERIFY_OPERATION,
    );
    let s = r.sense.as_deref().expect("sense");
    assert_eq!(s[0], 0xf0, "VALID");
    assert_eq!(u32::from_be_bytes(s[3..7].try_into().expect("4")), 1000);
    // BYTCHK=11b: one block compared against each.
    let same = pattern(4, 512).repeat(3);
    assert!(e.cmd(&a, &write10(20, 3), &same, 0).good());
    let v16 = cdb16(op::VERIFY_16, 0x06, 20, 3);
    assert!(e.cmd(&a, &v16, &same[..512], 0).good());
    let r = e.cmd(&a, &cdb16(op::VERIFY_16, 0x06, 19, 3), &same[..512], 0);
    r.expect(
        SenseKey::Miscompare,
        Asc::MISCOMPARE_DURING_VERIFY_OPERATION,
    );
    // BYTCHK=10b is reserved; VRPROTECT unsupported.
    e.cmd(&a, &cdb16(op::VERIFY_16, 0x04, 20, 1), &[], 0)
        .expect(SenseKey::IllegalRequest, Asc::INVALID_FIELD_IN_CDB);
    e.cmd(&a, &cdb16(op::VERIFY_16, 0x20, 20, 1), &[], 0)
        .expect(SenseKey::IllegalRequest, Asc::INVALID_FIELD_IN_CDB);
    e.cmd(&a, &cdb16(op::VERIFY_16, 0x00, 2048, 1), &[], 0)
        .expect(
            SenseKey::IllegalRequest,
            Asc::LOGICAL_BLOCK_ADDRESS_OUT_OF_RANGE,
        );
    // WRITE AND VERIFY with and without BYTCHK.
    let mut wv = write10(30, 4);
    wv[0] = op::WRITE_VERIFY_10;
    assert!(e.cmd(&a, &wv, &d, 0).good());
    wv[1] = 0x02;
    assert!(e.cmd(&a, &wv, &d, 0).good());
    assert!(e
        .cmd(&a, &cdb16(op::WRITE_VERIFY_16, 0x12, 34, 4), &d, 0)
        .good());
    assert_eq!(
        e.cmd(&a, &read10(30, 8), &[], 4096).data,
        [d.clone(), d.clone()].concat()
    );
}

#[test]
fn compare_and_write() {
    let e = env();
    let a = nx("a");
    e.clear_ua(&a);
    let old = pattern(1, 1024);
    let new = pattern(2, 1024);
    assert!(e.cmd(&a, &write10(50, 2), &old, 0).good());
    let mut caw = cdb16(op::COMPARE_AND_WRITE, 0, 50, 0);
    caw[13] = 2;
    assert!(e
        .cmd(&a, &caw, &[old.clone(), new.clone()].concat(), 0)
        .good());
    assert_eq!(e.cmd(&a, &read10(50, 2), &[], 1024).data, new);
    // Miscompare: nothing written, offset reported.
    let r = e.cmd(&a, &caw, &[old.clone(), pattern(5, 1024)].concat(), 0);
    r.expect(
        SenseKey::Miscompare,
        Asc::MISCOMPARE_DURING_VERIFY_OPERATION,
    );
    let s = r.sense.expect("sense");
    let first = old
        .iter()
        .zip(&new)
        .position(|(x, y)| x != y)
        .expect("differ") as u32;
    assert_eq!(u32::from_be_bytes(s[3..7].try_into().expect("4")), first);
    assert_eq!(e.cmd(&a, &read10(50, 2), &[], 1024).data, new);
    // Wrong Data-Out size, beyond the end, zero blocks.
    e.cmd(&a, &caw, &new, 0).expect(
        SenseKey::IllegalRequest,
        Asc::INVALID_FIELD_IN_INFORMATION_UNIT,
    );
    let mut past = cdb16(op::COMPARE_AND_WRITE, 0, 2047, 0);
    past[13] = 2;
    e.cmd(&a, &past, &[old.clone(), new.clone()].concat(), 0)
        .expect(
            SenseKey::IllegalRequest,
            Asc::LOGICAL_BLOCK_ADDRESS_OUT_OF_RANGE,
        );
    assert!(e
        .cmd(&a, &cdb16(op::COMPARE_AND_WRITE, 0, 0, 0), &[], 0)
        .good());
    // 256 blocks do not fit the one-byte field: a zero count with Data-Out.
    let r = e.cmd(&a, &cdb16(op::COMPARE_AND_WRITE, 0, 0, 0), &[0; 1024], 0);
    r.expect(SenseKey::IllegalRequest, Asc::INVALID_FIELD_IN_CDB);
    assert_eq!(r.field_pointer(), (true, 13));
}

#[test]
fn orwrite() {
    let e = env();
    let a = nx("a");
    e.clear_ua(&a);
    assert!(e.cmd(&a, &write10(40, 2), &[0x0f; 1024], 0).good());
    assert!(e
        .cmd(&a, &cdb16(op::ORWRITE_16, 0x08, 40, 2), &[0x30; 1024], 0)
        .good());
    assert_eq!(e.cmd(&a, &read10(40, 2), &[], 1024).data, [0x3f; 1024]);
    assert!(e.cmd(&a, &cdb16(op::ORWRITE_16, 0, 2048, 0), &[], 0).good());
    e.cmd(&a, &cdb16(op::ORWRITE_16, 0, 2049, 0), &[], 0)
        .expect(
            SenseKey::IllegalRequest,
            Asc::LOGICAL_BLOCK_ADDRESS_OUT_OF_RANGE,
        );
    e.cmd(&a, &cdb16(op::ORWRITE_16, 0x20, 0, 1), &[0; 512], 0)
        .expect(SenseKey::IllegalRequest, Asc::INVALID_FIELD_IN_CDB);
}

#[test]
fn transfers_above_block_limits_are_refused() {
    let e = env_with(70000, BlockSize::B512, LunConfig::default(), 1);
    let a = nx("a");
    e.clear_ua(&a);
    let r = e.cmd(&a, &read10(0, 2048), &[], 2048 * 512);
    assert!(r.good() && r.buffers == 8);
    for c in [read10(0, 2049), write10(0, 2049)] {
        let r = e.cmd(&a, &c, &[], 2049 * 512);
        r.expect(SenseKey::IllegalRequest, Asc::INVALID_FIELD_IN_CDB);
        assert_eq!(r.field_pointer(), (true, 7));
    }
    // WRITE SAME is limited to 65535 blocks (Block Limits says so).
    let bl = e.cmd(&a, &[op::INQUIRY, 1, 0xb0, 0, 64, 0], &[], 64).data;
    assert_eq!(&bl[36..44], &0xffffu64.to_be_bytes());
    assert!(e
        .cmd(&a, &cdb16(op::WRITE_SAME_16, 0x08, 0, 0xffff), &[0; 512], 0)
        .good());
    let r = e.cmd(
        &a,
        &cdb16(op::WRITE_SAME_16, 0x08, 0, 0x10000),
        &[0; 512],
        0,
    );
    r.expect(SenseKey::IllegalRequest, Asc::INVALID_FIELD_IN_CDB);
    assert_eq!(r.field_pointer(), (true, 10));
}

/// Tasks on two reactors increment a counter block with COMPARE AND WRITE
/// (read, compare-and-swap, retry on miscompare), while plain writes hammer
/// the neighbouring block. If COMPARE AND WRITE were not atomic, two tasks
/// could both see value v and both write v+1, losing an increment.
#[test]
fn compare_and_write_is_atomic_across_reactors() {
    let e = env_with(64, BlockSize::B512, LunConfig::default(), 2);
    let a = nx("a");
    e.clear_ua(&a);
    assert!(e.cmd(&a, &write10(0, 2), &[0u8; 1024], 0).good());
    const PER_TASK: u64 = 40;
    const TASKS: u64 = 4;
    let waits: Vec<_> =
        e.rt.handles()
            .iter()
            .map(|h| {
                let lu = e.lu.clone();
                let n = a.clone();
                h.spawn(move || async move {
                    let ch = std::rc::Rc::new(lu.volume().channel());
                    let tasks: Vec<_> = (0..TASKS)
                        .map(|t| {
                            let (lu, n, ch) = (lu.clone(), n.clone(), ch.clone());
                            mirrorpoint_poller::spawn(async move {
                                let mut retries = 0u64;
                                let mut done = 0;
                                while done < PER_TASK {
                                    let r = lu
                                        .execute(&ch, task(&read10(0, 1), Vec::new(), 512, &n))
                                        .await;
                                    let cur: Vec<u8> =
                                        r.data_in.iter().flat_map(|b| b.to_vec()).collect();
                                    let v = u64::from_be_bytes(cur[..8].try_into().expect("8"));
                                    let mut next = vec![0u8; 512];
                                    next[..8].copy_from_slice(&(v + 1).to_be_bytes());
                                    let mut caw = cdb16(op::COMPARE_AND_WRITE, 0, 0, 0);
                                    caw[13] = 1;
                                    let out = pool_bufs(&[cur, next].concat());
                                    let r = lu.execute(&ch, task(&caw, out, 0, &n)).await;
                                    match r.status {
                                        ScsiStatus::Good => done += 1,
                                        ScsiStatus::CheckCondition => retries += 1,
                                        s => panic!("{s:?}"),
                                    }
                                    // A plain write next door.
                                    let w = pool_bufs(&pattern(t as u8, 512));
                                    let r = lu.execute(&ch, task(&write10(1, 1), w, 0, &n)).await;
                                    assert_eq!(r.status, ScsiStatus::Good);
                                }
                                retries
                            })
                        })
                        .collect();
                    let mut retries = 0;
                    for t in tasks {
                        retries += t.await;
                    }
                    retries
                })
            })
            .collect();
    let retries: u64 = waits
        .into_iter()
        .map(|w| w.recv_blocking().expect("core"))
        .sum();
    let r = e.cmd(&a, &read10(0, 1), &[], 512);
    let v = u64::from_be_bytes(r.data[..8].try_into().expect("8"));
    assert_eq!(
        v,
        PER_TASK * TASKS * 2,
        "lost increments ({retries} retries)"
    );
}

fn pool_bufs(d: &[u8]) -> Vec<mirrorpoint_poller::IoBuf> {
    let mut b = buffer_pool().alloc(d.len()).expect("chunk");
    b.copy_from_slice(d);
    vec![b.freeze()]
}

fn task<'a>(
    cdb: &'a [u8],
    out: Vec<mirrorpoint_poller::IoBuf>,
    exp_in: u32,
    n: &'a Nexus,
) -> ScsiTask<'a> {
    let len = out.iter().map(|b| b.len() as u32).sum();
    ScsiTask {
        cdb,
        data_out: out,
        expected_data_in: exp_in,
        expected_data_out: len,
        attribute: TaskAttribute::Ordered,
        nexus: n,
    }
}

#[test]
fn write_same_and_unmap() {
    let e = env();
    let a = nx("a");
    e.clear_ua(&a);
    let blk = pattern(8, 512);
    // WRITE SAME(10) with a pattern.
    let mut ws = write10(200, 300);
    ws[0] = op::WRITE_SAME_10;
    assert!(e.cmd(&a, &ws, &blk, 0).good());
    let r = e.cmd(&a, &read10(200, 256), &[], 256 * 512);
    assert!(r.data.chunks(512).all(|c| c == blk));
    // WRITE SAME(16) UNMAP with zeroes; NDOB.
    assert!(e
        .cmd(
            &a,
            &cdb16(op::WRITE_SAME_16, 0x08, 200, 100),
            &[0u8; 512],
            0
        )
        .good());
    assert!(e
        .cmd(&a, &cdb16(op::WRITE_SAME_16, 0x09, 300, 200), &[], 0)
        .good());
    let r = e.cmd(&a, &read10(200, 256), &[], 256 * 512);
    assert!(r.data[..512 * 256].iter().all(|&b| b == 0));
    // UNMAP deallocates whatever the block holds: it reads back as zeroes.
    assert!(e.cmd(&a, &write10(10, 1), &blk, 0).good());
    assert!(e
        .cmd(&a, &cdb16(op::WRITE_SAME_16, 0x08, 10, 2), &blk, 0)
        .good());
    assert_eq!(e.cmd(&a, &read10(10, 1), &[], 512).data, [0; 512]);
    // Zero blocks: to the end of the medium (WSNZ=0).
    assert!(e
        .cmd(&a, &cdb16(op::WRITE_SAME_16, 0, 2040, 0), &blk, 0)
        .good());
    let r = e.cmd(&a, &read10(2040, 8), &[], 4096);
    assert!(r.data.chunks(512).all(|c| c == blk));
    assert!(e
        .cmd(&a, &cdb16(op::WRITE_SAME_16, 0, 2048, 0), &blk, 0)
        .good());
    // Rejections: ANCHOR, bad Data-Out size, protection, range.
    for (flags, n, data, asc) in [
        (0x10u8, 1u32, blk.clone(), Asc::INVALID_FIELD_IN_CDB),
        (
            0x08,
            1,
            blk[..256].to_vec(),
            Asc::INVALID_FIELD_IN_INFORMATION_UNIT,
        ),
        (
            0x08,
            1,
            [blk.clone(), blk.clone()].concat(),
            Asc::INVALID_FIELD_IN_INFORMATION_UNIT,
        ),
        (0x20, 1, blk.clone(), Asc::INVALID_FIELD_IN_CDB),
    ] {
        e.cmd(&a, &cdb16(op::WRITE_SAME_16, flags, 0, n), &data, 0)
            .expect(SenseKey::IllegalRequest, asc);
    }
    e.cmd(&a, &cdb16(op::WRITE_SAME_16, 0, 2047, 2), &blk, 0)
        .expect(
            SenseKey::IllegalRequest,
            Asc::LOGICAL_BLOCK_ADDRESS_OUT_OF_RANGE,
        );

    // UNMAP.
    assert!(e.cmd(&a, &write10(0, 8), &pattern(1, 4096), 0).good());
    let unmap = |descs: &[(u64, u32)]| {
        let mut p = vec![0u8; 8];
        for (l, n) in descs {
            p.extend_from_slice(&l.to_be_bytes());
            p.extend_from_slice(&n.to_be_bytes());
            p.extend_from_slice(&[0; 4]);
        }
        let bd = (p.len() - 8) as u16;
        p[0..2].copy_from_slice(&(bd + 6).to_be_bytes());
        p[2..4].copy_from_slice(&bd.to_be_bytes());
        let len = (p.len() as u16).to_be_bytes();
        (vec![op::UNMAP, 0, 0, 0, 0, 0, 0, len[0], len[1], 0], p)
    };
    let (c, p) = unmap(&[(1, 2), (5, 1), (7, 0)]);
    assert!(e.cmd(&a, &c, &p, 0).good());
    let r = e.cmd(&a, &read10(0, 8), &[], 4096);
    let want = pattern(1, 4096);
    for blk in 0..8 {
        let zero = [1, 2, 5].contains(&blk);
        let got = &r.data[blk * 512..(blk + 1) * 512];
        assert_eq!(got.iter().all(|&b| b == 0), zero, "block {blk}");
        if !zero {
            assert_eq!(got, &want[blk * 512..(blk + 1) * 512]);
        }
    }
    // Parameter list length 0: nothing to do.
    assert!(e
        .cmd(&a, &[op::UNMAP, 0, 0, 0, 0, 0, 0, 0, 0, 0], &[], 0)
        .good());
    // Too short, out of range, too many descriptors, ANCHOR.
    e.cmd(&a, &[op::UNMAP, 0, 0, 0, 0, 0, 0, 0, 4, 0], &[0; 4], 0)
        .expect(SenseKey::IllegalRequest, Asc::PARAMETER_LIST_LENGTH_ERROR);
    let (c, p) = unmap(&[(2047, 2)]);
    e.cmd(&a, &c, &p, 0).expect(
        SenseKey::IllegalRequest,
        Asc::LOGICAL_BLOCK_ADDRESS_OUT_OF_RANGE,
    );
    let many: Vec<(u64, u32)> = (0..257).map(|i| (i, 1)).collect();
    let (c, p) = unmap(&many);
    e.cmd(&a, &c, &p, 0).expect(
        SenseKey::IllegalRequest,
        Asc::INVALID_FIELD_IN_PARAMETER_LIST,
    );
    let (mut c, p) = unmap(&[(0, 1)]);
    c[1] = 1;
    e.cmd(&a, &c, &p, 0)
        .expect(SenseKey::IllegalRequest, Asc::INVALID_FIELD_IN_CDB);
    // Announced more parameter data than sent.
    let (c, p) = unmap(&[(0, 1)]);
    e.cmd(&a, &c, &p[..10], 0).expect(
        SenseKey::IllegalRequest,
        Asc::INVALID_FIELD_IN_INFORMATION_UNIT,
    );
}

#[test]
fn thick_luns_do_not_unmap() {
    let e = env_with(
        64,
        BlockSize::B512,
        LunConfig {
            thin_provisioning: false,
            ..LunConfig::default()
        },
        1,
    );
    let a = nx("a");
    e.clear_ua(&a);
    e.cmd(&a, &[op::UNMAP, 0, 0, 0, 0, 0, 0, 0, 24, 0], &[0; 24], 0)
        .expect(
            SenseKey::IllegalRequest,
            Asc::INVALID_COMMAND_OPERATION_CODE,
        );
    e.cmd(&a, &cdb16(op::WRITE_SAME_16, 0x08, 0, 1), &[0; 512], 0)
        .expect(SenseKey::IllegalRequest, Asc::INVALID_FIELD_IN_CDB);
    let lbp = vpd(&e, 0xb2);
    assert_eq!(lbp[5], 0);
    let bl = vpd(&e, 0xb0);
    assert_eq!(&bl[20..28], &[0; 8], "no unmap limits");
}

#[test]
fn sync_cache_prefetch_get_lba_status() {
    let e = env();
    let a = nx("a");
    e.clear_ua(&a);
    assert!(e
        .cmd(&a, &[op::SYNC_CACHE_10, 0, 0, 0, 0, 0, 0, 0, 0, 0], &[], 0)
        .good());
    assert!(e
        .cmd(&a, &cdb16(op::SYNC_CACHE_16, 0x02, 10, 10), &[], 0)
        .good());
    e.cmd(&a, &cdb16(op::SYNC_CACHE_16, 0, 2040, 10), &[], 0)
        .expect(
            SenseKey::IllegalRequest,
            Asc::LOGICAL_BLOCK_ADDRESS_OUT_OF_RANGE,
        );
    assert!(e.cmd(&a, &cdb16(op::PREFETCH_16, 0, 0, 10), &[], 0).good());
    e.cmd(&a, &cdb16(op::PREFETCH_16, 0, 2049, 0), &[], 0)
        .expect(
            SenseKey::IllegalRequest,
            Asc::LOGICAL_BLOCK_ADDRESS_OUT_OF_RANGE,
        );
    let gls = |lba: u64, alloc: u32| cdb16(op::SERVICE_ACTION_IN_16, 0x12, lba, alloc);
    let r = e.cmd(&a, &gls(5, 24), &[], 24);
    assert!(r.good());
    assert_eq!(r.data.len(), 24);
    assert_eq!(&r.data[8..16], &5u64.to_be_bytes());
    assert_eq!(
        u32::from_be_bytes(r.data[16..20].try_into().expect("4")),
        2043
    );
    assert_eq!(r.data[20] & 0x0f, 0, "malloc: mapped");
    for lba in [2048u64, 2049, 1 << 63, u64::MAX] {
        e.cmd(&a, &gls(lba, 24), &[], 24).expect(
            SenseKey::IllegalRequest,
            Asc::LOGICAL_BLOCK_ADDRESS_OUT_OF_RANGE,
        );
    }
    // Truncated to the allocation length.
    assert_eq!(e.cmd(&a, &gls(0, 10), &[], 24).data.len(), 10);
}

#[test]
fn mode_sense_and_select() {
    let e = env();
    let (a, b) = (nx("a"), nx("b"));
    e.clear_ua(&a);
    e.clear_ua(&b);
    let r = e.cmd(&a, &[op::MODE_SENSE_6, 0, 0x3f, 0, 255, 0], &[], 255);
    assert!(r.good());
    assert_eq!(usize::from(r.data[0]) + 1, r.data.len());
    assert_eq!(r.data[3], 8, "short block descriptor");
    assert_eq!(&r.data[4..12], &[0, 0, 8, 0, 0, 0, 2, 0]);
    let mut pages = Vec::new();
    let mut at = 12;
    while at < r.data.len() {
        pages.push(r.data[at] & 0x3f);
        at += 2 + usize::from(r.data[at + 1]);
    }
    assert_eq!(pages, [0x01, 0x08, 0x0a, 0x1c]);
    assert_eq!(at, r.data.len());
    // DBD, single page, caching WCE on by default.
    let r = e.cmd(&a, &[op::MODE_SENSE_6, 0x08, 0x08, 0, 255, 0], &[], 255);
    assert_eq!(r.data[3], 0);
    assert_eq!(r.data[4], 0x08);
    assert_eq!(r.data[6] & 0x04, 0x04);
    // Residuals: 4 bytes.
    assert_eq!(
        e.cmd(&a, &[op::MODE_SENSE_6, 0, 0x3f, 0, 4, 0], &[], 255)
            .data
            .len(),
        4
    );
    // MODE SENSE(10) with long LBA descriptor.
    let r = e.cmd(
        &a,
        &[op::MODE_SENSE_10, 0x10, 0x0a, 0, 0, 0, 0, 1, 0, 0],
        &[],
        256,
    );
    assert_eq!(
        usize::from(u16::from_be_bytes([r.data[0], r.data[1]])) + 2,
        r.data.len()
    );
    assert_eq!(r.data[4] & 1, 1, "LONGLBA");
    assert_eq!(&r.data[6..8], &[0, 16]);
    // Changeable, default, saved, unknown page, bad subpage.
    let ch = e.cmd(
        &a,
        &[op::MODE_SENSE_6, 0x08, 0x40 | 0x0a, 0, 255, 0],
        &[],
        255,
    );
    assert_eq!(ch.data[4 + 2] & 0x04, 0x04, "D_SENSE changeable");
    assert_eq!(ch.data[4 + 4] & 0x08, 0x08, "SWP changeable");
    assert!(e
        .cmd(&a, &[op::MODE_SENSE_6, 0, 0x80 | 0x3f, 0, 255, 0], &[], 255)
        .good());
    e.cmd(&a, &[op::MODE_SENSE_6, 0, 0xc0 | 0x3f, 0, 255, 0], &[], 255)
        .expect(
            SenseKey::IllegalRequest,
            Asc::SAVING_PARAMETERS_NOT_SUPPORTED,
        );
    let r = e.cmd(&a, &[op::MODE_SENSE_6, 0, 0x05, 0, 255, 0], &[], 255);
    r.expect(SenseKey::IllegalRequest, Asc::INVALID_FIELD_IN_CDB);
    assert_eq!(r.field_pointer(), (true, 2));
    e.cmd(&a, &[op::MODE_SENSE_6, 0, 0x08, 1, 255, 0], &[], 255)
        .expect(SenseKey::IllegalRequest, Asc::INVALID_FIELD_IN_CDB);

    // MODE SELECT: D_SENSE on -> descriptor sense; B hears MODE PARAMETERS CHANGED.
    let ctl = e
        .cmd(&a, &[op::MODE_SENSE_6, 0x08, 0x0a, 0, 255, 0], &[], 255)
        .data;
    let mut page = ctl[4..].to_vec();
    page[2] |= 0x04;
    let mut p = vec![0, 0, 0, 0];
    p.extend_from_slice(&page);
    let sel = [op::MODE_SELECT_6, 0x10, 0, 0, p.len() as u8, 0];
    assert!(e.cmd(&a, &sel, &p, 0).good());
    let r = e.cmd(&a, &cdb16(op::READ_16, 0, u64::MAX, 1), &[], 512);
    assert_eq!(r.sense.as_deref().map(|s| s[0]), Some(0x72));
    r.expect(
        SenseKey::IllegalRequest,
        Asc::LOGICAL_BLOCK_ADDRESS_OUT_OF_RANGE,
    );
    e.cmd(&b, &[0; 6], &[], 0)
        .expect(SenseKey::UnitAttention, Asc::MODE_PARAMETERS_CHANGED);
    // SWP on: writes are refused, reads work; WP shows in the header.
    page[2] &= !0x04;
    page[4] |= 0x08;
    let mut p = vec![0, 0, 0, 0];
    p.extend_from_slice(&page);
    assert!(e.cmd(&a, &sel, &p, 0).good());
    let hdr = e
        .cmd(&a, &[op::MODE_SENSE_6, 0x08, 0x0a, 0, 255, 0], &[], 255)
        .data;
    assert_eq!(hdr[2] & 0x80, 0x80);
    e.cmd(&a, &write10(0, 1), &[0; 512], 0)
        .expect(SenseKey::DataProtect, Asc::WRITE_PROTECTED);
    assert!(e.cmd(&a, &read10(0, 1), &[], 512).good());
    // Changing a byte that is not changeable: pointer into the parameter list.
    let mut bad = p.clone();
    bad[4 + 3] = 0x00; // queue algorithm modifier
    let r = e.cmd(&a, &sel, &bad, 0);
    r.expect(
        SenseKey::IllegalRequest,
        Asc::INVALID_FIELD_IN_PARAMETER_LIST,
    );
    assert_eq!(r.field_pointer(), (false, 7));
    // WCE off via the caching page with a block descriptor.
    let cache = e
        .cmd(&a, &[op::MODE_SENSE_6, 0, 0x08, 0, 255, 0], &[], 255)
        .data;
    let mut p = cache.clone();
    p[0] = 0;
    p[2] = 0;
    p[12 + 2] &= !0x04;
    assert!(e
        .cmd(
            &a,
            &[op::MODE_SELECT_6, 0x10, 0, 0, p.len() as u8, 0],
            &p,
            0
        )
        .good());
    let cache = e
        .cmd(&a, &[op::MODE_SENSE_6, 0, 0x08, 0, 255, 0], &[], 255)
        .data;
    assert_eq!(cache[12 + 2] & 0x04, 0);
    // Wrong block length in the descriptor; SP=1; short list.
    let mut p2 = p.clone();
    p2[10] = 0x10;
    e.cmd(
        &a,
        &[op::MODE_SELECT_6, 0x10, 0, 0, p2.len() as u8, 0],
        &p2,
        0,
    )
    .expect(
        SenseKey::IllegalRequest,
        Asc::INVALID_FIELD_IN_PARAMETER_LIST,
    );
    e.cmd(
        &a,
        &[op::MODE_SELECT_6, 0x11, 0, 0, p.len() as u8, 0],
        &p,
        0,
    )
    .expect(SenseKey::IllegalRequest, Asc::INVALID_FIELD_IN_CDB);
    e.cmd(
        &a,
        &[op::MODE_SELECT_10, 0x10, 0, 0, 0, 0, 0, 0, 4, 0],
        &[0; 4],
        0,
    )
    .expect(SenseKey::IllegalRequest, Asc::PARAMETER_LIST_LENGTH_ERROR);
    // A read-only LUN reports WP and refuses writes.
    let ro = env_with(
        8,
        BlockSize::B512,
        LunConfig {
            read_only: true,
            ..LunConfig::default()
        },
        1,
    );
    ro.clear_ua(&a);
    assert_eq!(
        ro.cmd(&a, &[op::MODE_SENSE_6, 0, 0x3f, 0, 255, 0], &[], 255)
            .data[2]
            & 0x80,
        0x80
    );
    ro.cmd(&a, &write10(0, 1), &[0; 512], 0)
        .expect(SenseKey::DataProtect, Asc::WRITE_PROTECTED);
}

fn prout(sa: u8, t: u8, key: u64, sa_key: u64) -> (Vec<u8>, Vec<u8>) {
    let mut p = key.to_be_bytes().to_vec();
    p.extend_from_slice(&sa_key.to_be_bytes());
    p.extend_from_slice(&[0; 8]);
    (vec![op::PR_OUT, sa, t, 0, 0, 0, 0, 0, 24, 0], p)
}

#[test]
fn persistent_reservations_through_the_dispatcher() {
    let e = env();
    let (a, b) = (nx("a"), nx("b"));
    e.clear_ua(&a);
    e.clear_ua(&b);
    let run = |n: &Nexus, sa: u8, t: u8, k: u64, s: u64| {
        let (c, p) = prout(sa, t, k, s);
        e.cmd(n, &c, &p, 0)
    };
    assert!(run(&a, 6, 0, 0, 0xaa).good());
    assert!(run(&b, 6, 0, 0, 0xbb).good());
    assert!(run(&a, 1, 3, 0xaa, 0).good()); // EXCLUSIVE ACCESS
                                            // B: reads and writes conflict; INQUIRY, TUR, READ CAPACITY, PR IN do not.
    assert_eq!(
        e.cmd(&b, &read10(0, 1), &[], 512).status,
        ScsiStatus::ReservationConflict
    );
    assert_eq!(
        e.cmd(&b, &write10(0, 1), &[0; 512], 0).status,
        ScsiStatus::ReservationConflict
    );
    assert!(e.cmd(&b, &[0; 6], &[], 0).good());
    assert!(e.cmd(&b, &[op::INQUIRY, 0, 0, 0, 96, 0], &[], 96).good());
    assert!(e
        .cmd(
            &b,
            &[op::READ_CAPACITY_10, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            &[],
            8
        )
        .good());
    let rk = e.cmd(&b, &[op::PR_IN, 0, 0, 0, 0, 0, 0, 0x40, 0, 0], &[], 0x4000);
    assert!(rk.good());
    assert_eq!(&rk.data[4..8], &[0, 0, 0, 16]);
    // Truncation of READ KEYS.
    assert_eq!(
        e.cmd(&b, &[op::PR_IN, 0, 0, 0, 0, 0, 0, 0, 12, 0], &[], 0x4000)
            .data
            .len(),
        12
    );
    // A: fine.
    assert!(e.cmd(&a, &read10(0, 1), &[], 512).good());
    // Service actions 4..31 of PR IN are invalid.
    for s in 4u8..0x20 {
        let r = e.cmd(&a, &[op::PR_IN, s, 0, 0, 0, 0, 0, 0x40, 0, 0], &[], 0x4000);
        r.expect(SenseKey::IllegalRequest, Asc::INVALID_FIELD_IN_CDB);
    }
    for s in 0u8..4 {
        assert!(e
            .cmd(&a, &[op::PR_IN, s, 0, 0, 0, 0, 0, 0x40, 0, 0], &[], 0x4000)
            .good());
    }
    // Parameter list length must be 24.
    e.cmd(&a, &[op::PR_OUT, 0, 0, 0, 0, 0, 0, 0, 20, 0], &[0; 20], 0)
        .expect(SenseKey::IllegalRequest, Asc::PARAMETER_LIST_LENGTH_ERROR);
    // SPC-2 RESERVE conflicts with a persistent reservation.
    assert_eq!(
        e.cmd(&a, &[op::RESERVE_6, 0, 0, 0, 0, 0], &[], 0).status,
        ScsiStatus::ReservationConflict
    );
    // B preempts A: A hears REGISTRATIONS PREEMPTED once.
    assert!(run(&b, 4, 1, 0xbb, 0xaa).good());
    e.cmd(&a, &[0; 6], &[], 0)
        .expect(SenseKey::UnitAttention, Asc::REGISTRATIONS_PREEMPTED);
    assert_eq!(
        e.cmd(&a, &write10(0, 1), &[0; 512], 0).status,
        ScsiStatus::ReservationConflict
    );
    assert!(
        e.cmd(&a, &read10(0, 1), &[], 512).good(),
        "WRITE EXCLUSIVE lets reads through"
    );
    // Reservations survive resets and nexus loss.
    e.lu.reset(ResetKind::LogicalUnit, &a);
    e.lu.nexus_lost(&b);
    e.clear_ua(&a);
    assert_eq!(
        e.cmd(&a, &write10(0, 1), &[0; 512], 0).status,
        ScsiStatus::ReservationConflict
    );
    e.clear_ua(&b);
    assert!(run(&b, 3, 0, 0xbb, 0).good());
    assert!(e.cmd(&a, &write10(0, 1), &[0; 512], 0).good());
}

/// libiscsi Reserve6.2Initiators.
#[test]
fn reserve6_two_initiators() {
    let e = env();
    let (a, b) = (nx("a"), nx("b"));
    e.clear_ua(&a);
    e.clear_ua(&b);
    let reserve = [op::RESERVE_6, 0, 0, 0, 0, 0];
    let release = [op::RELEASE_6, 0, 0, 0, 0, 0];
    let ms = [op::MODE_SENSE_6, 0, 0x3f, 0, 255, 0];
    assert!(e.cmd(&a, &reserve, &[], 0).good());
    assert!(e.cmd(&a, &reserve, &[], 0).good());
    assert_eq!(
        e.cmd(&b, &reserve, &[], 0).status,
        ScsiStatus::ReservationConflict
    );
    assert!(e.cmd(&b, &release, &[], 0).good());
    assert!(e.cmd(&a, &ms, &[], 255).good());
    assert_eq!(
        e.cmd(&b, &ms, &[], 255).status,
        ScsiStatus::ReservationConflict
    );
    assert_eq!(
        e.cmd(&b, &[0; 6], &[], 0).status,
        ScsiStatus::ReservationConflict
    );
    assert!(e.cmd(&b, &[op::INQUIRY, 0, 0, 0, 96, 0], &[], 96).good());
    assert_eq!(
        e.cmd(&b, &reserve, &[], 0).status,
        ScsiStatus::ReservationConflict
    );
    assert!(e.cmd(&a, &release, &[], 0).good());
    assert!(e
        .cmd(&b, &[op::RESERVE_10, 0, 0, 0, 0, 0, 0, 0, 0, 0], &[], 0)
        .good());
    assert!(e
        .cmd(&b, &[op::RELEASE_10, 0, 0, 0, 0, 0, 0, 0, 0, 0], &[], 0)
        .good());
    // Released by a reset, by nexus loss.
    assert!(e.cmd(&a, &reserve, &[], 0).good());
    e.lu.reset(ResetKind::LogicalUnit, &b);
    e.clear_ua(&b);
    assert!(e.cmd(&b, &reserve, &[], 0).good());
    e.lu.nexus_lost(&b);
    e.clear_ua(&a);
    assert!(e.cmd(&a, &reserve, &[], 0).good());
}

#[test]
fn report_supported_opcodes_and_tmf() {
    let e = env();
    let a = nx("a");
    e.clear_ua(&a);
    let rsoc = |opts: u8, opc: u8, sa: u16| {
        let s = sa.to_be_bytes();
        vec![
            op::MAINTENANCE_IN,
            0x0c,
            opts,
            opc,
            s[0],
            s[1],
            0,
            0,
            0xff,
            0xff,
            0,
            0,
        ]
    };
    let all = e.cmd(&a, &rsoc(0, 0, 0), &[], 0xffff);
    assert!(all.good());
    let len = u32::from_be_bytes(all.data[0..4].try_into().expect("4")) as usize;
    assert_eq!(len + 4, all.data.len());
    let descs: Vec<&[u8]> = all.data[4..].chunks(8).collect();
    assert_eq!(descs.len(), opcodes::COMMANDS.len());
    for d in &descs {
        let (opc, sa, servactv) = (d[0], u16::from_be_bytes([d[2], d[3]]), d[5] & 1 != 0);
        let cdb_len = u16::from_be_bytes([d[6], d[7]]);
        let one = e.cmd(
            &a,
            &rsoc(if servactv { 2 } else { 1 }, opc, sa),
            &[],
            0xffff,
        );
        assert!(one.good(), "{opc:#x}/{sa:#x}");
        assert_eq!(one.data[1] & 0x07, 3, "supported");
        assert_eq!(u16::from_be_bytes([one.data[2], one.data[3]]), cdb_len);
        assert_eq!(one.data[4], opc);
        // The wrong option for it is an invalid field.
        e.cmd(
            &a,
            &rsoc(if servactv { 1 } else { 2 }, opc, sa),
            &[],
            0xffff,
        )
        .expect(SenseKey::IllegalRequest, Asc::INVALID_FIELD_IN_CDB);
        if !servactv {
            assert_eq!(sa, 0);
        }
        // Every listed command is really dispatched (never INVALID OPERATION CODE).
        if opc != op::REPORT_LUNS {
            let mut c = vec![0u8; usize::from(cdb_len)];
            c[0] = opc;
            c[1] = sa as u8;
            let r = e.cmd(&a, &c, &[], 512);
            if r.sense.is_some() {
                assert_ne!(
                    r.key_asc().1,
                    0x20,
                    "{opc:#x}/{sa:#x} listed but not dispatched"
                );
            }
        }
    }
    // RCTD: 20-byte descriptors with timeouts.
    let r = e.cmd(&a, &rsoc(0x80, 0, 0), &[], 0xffff);
    assert_eq!(r.data.len(), 4 + 20 * descs.len());
    assert_eq!(r.data[4 + 5] & 0x02, 0x02);
    assert_eq!(&r.data[4 + 8..4 + 10], &[0, 0x0a]);
    let one = e.cmd(&a, &rsoc(0x81, op::READ_10, 0), &[], 0xffff);
    assert_eq!(one.data[1], 0x83);
    assert_eq!(one.data.len(), 4 + 10 + 12);
    // Unsupported opcode: "not supported" data; bad option: invalid field.
    let none = e.cmd(&a, &rsoc(1, 0xe0, 0), &[], 0xffff);
    assert!(none.good());
    assert_eq!(none.data[1] & 0x07, 1);
    e.cmd(&a, &rsoc(5, 0, 0), &[], 0xffff)
        .expect(SenseKey::IllegalRequest, Asc::INVALID_FIELD_IN_CDB);
    // TMF.
    let tmf = e.cmd(
        &a,
        &[op::MAINTENANCE_IN, 0x0d, 0, 0, 0, 0, 0, 0, 0, 4, 0, 0],
        &[],
        255,
    );
    assert_eq!(tmf.data, [0xda, 0, 0, 0]);
    let tmf = e.cmd(
        &a,
        &[op::MAINTENANCE_IN, 0x0d, 0x80, 0, 0, 0, 0, 0, 0, 16, 0, 0],
        &[],
        255,
    );
    assert_eq!(tmf.data.len(), 16);
    // RTPG.
    let r = e.cmd(
        &a,
        &[op::MAINTENANCE_IN, 0x0a, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0],
        &[],
        256,
    );
    assert!(r.good());
    assert_eq!(&r.data[4..8], &[0x80, 0x01, 0, 1]);
    assert_eq!(r.data[11], 1);
    assert_eq!(&r.data[12..16], &[0, 0, 0, 1]);
}

#[test]
fn start_stop_and_prevent_allow() {
    let e = env();
    let a = nx("a");
    e.clear_ua(&a);
    assert!(e
        .cmd(&a, &[op::START_STOP_UNIT, 0, 0, 0, 1, 0], &[], 0)
        .good());
    assert!(e
        .cmd(&a, &[op::START_STOP_UNIT, 1, 0, 0, 0, 0], &[], 0)
        .good());
    e.cmd(&a, &[op::START_STOP_UNIT, 0, 0, 0, 0x30, 0], &[], 0)
        .expect(SenseKey::IllegalRequest, Asc::INVALID_FIELD_IN_CDB);
    assert!(e
        .cmd(&a, &[op::PREVENT_ALLOW, 0, 0, 0, 1, 0], &[], 0)
        .good());
    e.cmd(&a, &[op::START_STOP_UNIT, 0, 0, 0, 2, 0], &[], 0)
        .expect(SenseKey::IllegalRequest, Asc::MEDIUM_REMOVAL_PREVENTED);
    assert!(e
        .cmd(&a, &[op::PREVENT_ALLOW, 0, 0, 0, 0, 0], &[], 0)
        .good());
    assert!(e
        .cmd(&a, &[op::START_STOP_UNIT, 0, 0, 0, 2, 0], &[], 0)
        .good());
    e.cmd(&a, &[op::PREVENT_ALLOW, 0, 0, 0, 2, 0], &[], 0)
        .expect(SenseKey::IllegalRequest, Asc::INVALID_FIELD_IN_CDB);
}

#[test]
fn target_level_answers() {
    let rt = runtime(1);
    rt.handles()[0]
        .block_on(|| async {
            let n = nx("a");
            let t = |cdb: &'static [u8], exp: u32| ScsiTask {
                cdb,
                data_out: Vec::new(),
                expected_data_in: exp,
                expected_data_out: 0,
                attribute: TaskAttribute::HeadOfQueue,
                nexus: Box::leak(Box::new(n.clone())),
            };
            let flat = |r: &ScsiResponse| -> Vec<u8> {
                r.data_in.iter().flat_map(|b| b.to_vec()).collect()
            };
            let r = report_luns(
                &[0, 1, 300],
                &t(&[0xa0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0], 256),
            );
            let d = flat(&r);
            assert_eq!(&d[0..4], &[0, 0, 0, 24]);
            assert_eq!(&d[8..16], &[0; 8]);
            assert_eq!(&d[16..18], &[0, 1]);
            assert_eq!(&d[24..26], &[0x41, 0x2c]);
            let r = report_luns(&[0, 1], &t(&[0xa0, 0, 0, 0, 0, 0, 0, 0, 0, 8, 0, 0], 256));
            assert_eq!(
                r.status,
                ScsiStatus::CheckCondition,
                "allocation length < 16"
            );
            let r = report_luns(&[0, 1], &t(&[0xa0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0], 12));
            assert_eq!(flat(&r).len(), 12);
            let r = lun_not_supported(&t(&[0x12, 0, 0, 0, 36, 0], 36));
            let d = flat(&r);
            assert_eq!(d[0], 0x7f);
            assert_eq!(d.len(), 36);
            let r = lun_not_supported(&t(&[0x00, 0, 0, 0, 0, 0], 0));
            assert_eq!(r.status, ScsiStatus::CheckCondition);
            let s = r.sense.expect("sense");
            assert_eq!((s[2], s[12]), (5, 0x25));
            let r = lun_not_supported(&t(&[0x03, 0, 0, 0, 18, 0], 18));
            assert_eq!(r.status, ScsiStatus::Good);
            assert_eq!(flat(&r)[12], 0x25);
        })
        .expect("reactor");
}

mod fuzz {
    use super::*;
    use proptest::prelude::*;

    fn well_formed(r: &Out) -> bool {
        match r.status {
            ScsiStatus::Good => r.sense.is_none(),
            ScsiStatus::CheckCondition => {
                let Some(s) = r.sense.as_deref() else {
                    return false;
                };
                match s.first().map(|b| b & 0x7f) {
                    Some(0x70) => {
                        s.len() == 18 && usize::from(s[7]) + 8 == s.len() && s[2] & 0x0f != 0
                    }
                    Some(0x72) => s.len() >= 8 && usize::from(s[7]) + 8 == s.len(),
                    _ => false,
                }
            }
            ScsiStatus::ReservationConflict | ScsiStatus::Busy => r.sense.is_none(),
            _ => false,
        }
    }

    fn cdb_strategy() -> impl Strategy<Value = Vec<u8>> {
        let known: Vec<u8> = opcodes::COMMANDS.iter().map(|c| c.opcode).collect();
        (
            prop_oneof![3 => proptest::sample::select(known), 1 => any::<u8>()],
            proptest::collection::vec(any::<u8>(), 0..20),
            any::<bool>(),
        )
            .prop_map(|(opc, mut rest, small)| {
                // Often keep LBAs and lengths small so commands get past range checks.
                if small {
                    for (i, b) in rest.iter_mut().enumerate() {
                        if i > 0 && i < 12 {
                            *b &= 0x03;
                        }
                    }
                }
                let mut c = vec![opc];
                c.extend(rest);
                c
            })
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]
        #[test]
        fn arbitrary_commands_never_panic(
            cmds in proptest::collection::vec(
                (cdb_strategy(), proptest::collection::vec(any::<u8>(), 0..1100), 64usize..600, 0u32..3000, 0u8..3),
                1..24,
            )
        ) {
            let e = env_with(64, BlockSize::B512, LunConfig::default(), 1);
            let nexuses = [nx("a"), nx("b"), nx("c")];
            for (cdb, data, split, exp, who) in cmds {
                let r = e.cmd_split(&nexuses[usize::from(who)], &cdb, &data, split, exp);
                prop_assert!(well_formed(&r), "{:02x?} -> {:?}", cdb, r);
                prop_assert!(r.data.len() <= exp as usize, "{:02x?}: {} > {}", cdb, r.data.len(), exp);
            }
        }
    }
}
