//! A minimal SCSI block command set used by the iSCSI connection layer until
//! the real command layer (`scsi::lun`, written on branch `wip-scsi`) lands.
//!
//! It has exactly the entry points the contract names —
//! `LogicalUnit::{new, execute, reset, nexus_lost}`, `report_luns`,
//! `lun_not_supported`, `max_transfer_blocks` — so that switching is a one
//! line change of the `use` in `iscsi::conn`. It implements only what the
//! libiscsi tools and a kernel initiator need to attach a disk and move
//! data: TEST UNIT READY, REQUEST SENSE, INQUIRY (standard, VPD 00/80/83/B0),
//! MODE SENSE 6/10, READ CAPACITY 10/16, READ/WRITE 6/10/12/16,
//! SYNCHRONIZE CACHE 10/16, START STOP UNIT. Everything else answers
//! INVALID COMMAND OPERATION CODE.

use std::sync::Arc;

use mirrorpoint_poller::{buffer_pool, IoBuf};

use super::sense::{Asc, Sense, SenseKey};
use crate::scsi::task::{Nexus, ScsiResponse, ScsiStatus, ScsiTask};
use crate::units::ByteOffset;
use crate::volume::{Volume, VolumeChannel};

pub use crate::scsi::lun::{LunConfig, ResetKind};

/// Largest transfer, in blocks, a single command may ask for.
pub fn max_transfer_blocks(block_size: u32, chunk_size: usize) -> u32 {
    let bytes = chunk_size.saturating_mul(MAX_CHUNKS_PER_COMMAND) as u64;
    u32::try_from(bytes / u64::from(block_size.max(1))).unwrap_or(u32::MAX)
}

/// Most chunks one command may use.
const MAX_CHUNKS_PER_COMMAND: usize = 8;

/// One logical unit backed by a volume.
pub struct LogicalUnit {
    volume: Arc<Volume>,
    cfg: LunConfig,
}

fn check(sense: Sense) -> ScsiResponse {
    ScsiResponse {
        status: ScsiStatus::CheckCondition,
        sense: Some(sense.to_fixed().to_vec()),
        data_in: Vec::new(),
    }
}

/// A response carrying `data` (truncated to `alloc`) in one pool chunk.
fn data_response(data: &[u8], alloc: usize) -> ScsiResponse {
    let n = data.len().min(alloc);
    if n == 0 {
        return ScsiResponse::good();
    }
    let Some(mut b) = buffer_pool().alloc(n) else {
        return ScsiResponse {
            status: ScsiStatus::Busy,
            sense: None,
            data_in: Vec::new(),
        };
    };
    b.copy_from_slice(data.get(..n).unwrap_or(&[]));
    ScsiResponse {
        status: ScsiStatus::Good,
        sense: None,
        data_in: vec![b.freeze()],
    }
}

fn be16(c: &[u8], at: usize) -> u16 {
    let mut a = [0u8; 2];
    if let Some(s) = c.get(at..at + 2) {
        a.copy_from_slice(s);
    }
    u16::from_be_bytes(a)
}
fn be32(c: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    if let Some(s) = c.get(at..at + 4) {
        a.copy_from_slice(s);
    }
    u32::from_be_bytes(a)
}
fn be64(c: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    if let Some(s) = c.get(at..at + 8) {
        a.copy_from_slice(s);
    }
    u64::from_be_bytes(a)
}
fn byte(c: &[u8], at: usize) -> u8 {
    c.get(at).copied().unwrap_or(0)
}

fn padded(s: &str, n: usize) -> Vec<u8> {
    let mut v: Vec<u8> = s.bytes().take(n).collect();
    v.resize(n, b' ');
    v
}

/// REPORT LUNS over the given LUN ids (single-level peripheral/flat addressing).
pub fn report_luns(luns: &[u64], task: &ScsiTask<'_>) -> ScsiResponse {
    let cdb = task.cdb;
    let alloc = be32(cdb, 6) as usize;
    if alloc < 16 && alloc != 0 {
        return check(Sense::invalid_field_in_cdb(6, None));
    }
    let mut d = Vec::with_capacity(8 + luns.len() * 8);
    d.extend_from_slice(&((luns.len() * 8) as u32).to_be_bytes());
    d.extend_from_slice(&[0; 4]);
    for &l in luns {
        let mut e = [0u8; 8];
        if l < 256 {
            e[1] = l as u8;
        } else {
            e[0] = 0x40 | ((l >> 8) & 0x3f) as u8;
            e[1] = l as u8;
        }
        d.extend_from_slice(&e);
    }
    data_response(&d, alloc.min(task.expected_data_in as usize))
}

/// Answer for a command addressed to a LUN that does not exist.
pub fn lun_not_supported(task: &ScsiTask<'_>) -> ScsiResponse {
    match task.cdb.first() {
        Some(0x12) => {
            // INQUIRY: peripheral qualifier 011b, device type 1Fh.
            let mut d = [0u8; 36];
            d[0] = 0x7f;
            d[2] = 0x06;
            d[3] = 0x02;
            d[4] = 31;
            let alloc = be16(task.cdb, 3) as usize;
            data_response(&d, alloc.min(task.expected_data_in as usize))
        }
        Some(0x03) => {
            let s = Sense::new(SenseKey::IllegalRequest, Asc(0x25, 0x00)).to_fixed();
            let alloc = usize::from(byte(task.cdb, 4));
            data_response(&s, alloc.min(task.expected_data_in as usize))
        }
        _ => check(Sense::new(SenseKey::IllegalRequest, Asc(0x25, 0x00))),
    }
}

impl LogicalUnit {
    /// A logical unit over `volume`.
    pub fn new(volume: Arc<Volume>, cfg: LunConfig) -> Self {
        LogicalUnit { volume, cfg }
    }

    /// The volume behind it.
    pub fn volume(&self) -> &Arc<Volume> {
        &self.volume
    }

    /// Task management reset; this layer keeps no per-task state.
    pub fn reset(&self, _kind: ResetKind, _nexus: &Nexus) {}

    /// An I_T nexus went away.
    pub fn nexus_lost(&self, _nexus: &Nexus) {}

    /// Runs one command.
    pub async fn execute(&self, ch: &VolumeChannel, task: ScsiTask<'_>) -> ScsiResponse {
        let cdb = task.cdb;
        let alloc_in = task.expected_data_in as usize;
        let bs = self.volume.block_size().bytes();
        let blocks = self.volume.num_blocks();
        match byte(cdb, 0) {
            0x00 | 0x1b => ScsiResponse::good(),
            0x03 => {
                let s = Sense::new(SenseKey::NoSense, Asc(0, 0)).to_fixed();
                data_response(&s, usize::from(byte(cdb, 4)).min(alloc_in))
            }
            0x12 => self.inquiry(cdb, alloc_in),
            0x1a | 0x5a => {
                let ten = byte(cdb, 0) == 0x5a;
                let page = byte(cdb, 2) & 0x3f;
                let mut pages = Vec::new();
                if page == 0x08 || page == 0x3f {
                    // Caching: write cache enabled.
                    pages.extend_from_slice(&[0x08, 0x12, 0x04]);
                    pages.extend_from_slice(&[0; 17]);
                }
                if page == 0x0a || page == 0x3f {
                    pages.extend_from_slice(&[0x0a, 0x0a, 0x02, 0x10]);
                    pages.extend_from_slice(&[0; 8]);
                }
                if pages.is_empty() && page != 0x3f {
                    return check(Sense::invalid_field_in_cdb(2, Some(5)));
                }
                let mut d = Vec::new();
                if ten {
                    let len = (pages.len() + 6) as u16;
                    d.extend_from_slice(&len.to_be_bytes());
                    d.extend_from_slice(&[0, 0, 0, 0, 0, 0]);
                    d.extend(pages);
                    data_response(&d, (be16(cdb, 7) as usize).min(alloc_in))
                } else {
                    d.push((pages.len() + 3) as u8);
                    d.extend_from_slice(&[0, 0, 0]);
                    d.extend(pages);
                    data_response(&d, usize::from(byte(cdb, 4)).min(alloc_in))
                }
            }
            0x25 => {
                let last = u32::try_from(blocks.saturating_sub(1)).unwrap_or(u32::MAX);
                let mut d = [0u8; 8];
                d[..4].copy_from_slice(&last.to_be_bytes());
                d[4..].copy_from_slice(&bs.to_be_bytes());
                data_response(&d, 8.min(alloc_in))
            }
            0x9e if byte(cdb, 1) & 0x1f == 0x10 => {
                let mut d = [0u8; 32];
                d[..8].copy_from_slice(&blocks.saturating_sub(1).to_be_bytes());
                d[8..12].copy_from_slice(&bs.to_be_bytes());
                data_response(&d, (be32(cdb, 10) as usize).min(alloc_in))
            }
            0x35 | 0x91 => match ch.flush().await {
                Ok(()) => ScsiResponse::good(),
                Err(_) => check(Sense::new(SenseKey::MediumError, Asc(0x0c, 0x00))),
            },
            op @ (0x08 | 0x28 | 0xa8 | 0x88 | 0x0a | 0x2a | 0xaa | 0x8a) => {
                let (lba, len) = match op {
                    0x08 | 0x0a => {
                        let lba = u64::from(be32(cdb, 0) & 0x1f_ffff);
                        let l = u32::from(byte(cdb, 4));
                        (lba, if l == 0 { 256 } else { l })
                    }
                    0x28 | 0x2a => (u64::from(be32(cdb, 2)), u32::from(be16(cdb, 7))),
                    0xa8 | 0xaa => (u64::from(be32(cdb, 2)), be32(cdb, 6)),
                    _ => (be64(cdb, 2), be32(cdb, 10)),
                };
                let write = matches!(op, 0x0a | 0x2a | 0xaa | 0x8a);
                if lba.checked_add(u64::from(len)).map_or(true, |e| e > blocks) {
                    return check(Sense::lba_out_of_range());
                }
                if len == 0 {
                    return ScsiResponse::good();
                }
                let pool = buffer_pool();
                let max = max_transfer_blocks(bs, pool.chunk_size());
                if len > max {
                    return check(Sense::invalid_field_in_cdb(7, None));
                }
                let offset = lba * u64::from(bs);
                let bytes = u64::from(len) * u64::from(bs);
                if write {
                    self.write(ch, offset, bytes, task.data_out).await
                } else {
                    self.read(ch, offset, bytes, alloc_in).await
                }
            }
            _ => check(Sense::invalid_opcode()),
        }
    }

    fn inquiry(&self, cdb: &[u8], alloc_in: usize) -> ScsiResponse {
        let alloc = (be16(cdb, 3) as usize).min(alloc_in);
        let evpd = byte(cdb, 1) & 1 != 0;
        let page = byte(cdb, 2);
        if !evpd {
            if page != 0 {
                return check(Sense::invalid_field_in_cdb(2, None));
            }
            let mut d = vec![0u8; 36];
            d[2] = 0x06; // SPC-4
            d[3] = 0x02;
            d[4] = 31;
            d[7] = 0x02; // CMDQUE
            d[8..16].copy_from_slice(&padded("MIRRORPT", 8));
            d[16..32].copy_from_slice(&padded("mirrorpoint", 16));
            d[32..36].copy_from_slice(&padded("0001", 4));
            return data_response(&d, alloc);
        }
        let serial: String = self.volume.uuid().chars().filter(|c| *c != '-').collect();
        let body: Vec<u8> = match page {
            0x00 => vec![0x00, 0x80, 0x83, 0xb0],
            0x80 => serial.as_bytes().to_vec(),
            0x83 => {
                let mut v = Vec::new();
                // NAA-6 style designator from the UUID (binary, LU).
                let hex: Vec<u8> = (0..serial.len().min(32) / 2)
                    .filter_map(|i| u8::from_str_radix(serial.get(2 * i..2 * i + 2)?, 16).ok())
                    .collect();
                let mut naa = [0u8; 16];
                naa[0] = 0x60;
                for (i, b) in hex.iter().take(15).enumerate() {
                    naa[i + 1] = *b;
                }
                v.extend_from_slice(&[0x01, 0x03, 0x00, 16]);
                v.extend_from_slice(&naa);
                // T10 vendor id, ASCII.
                let t10 = format!("{:8}{}", self.cfg.vendor, self.volume.name());
                v.extend_from_slice(&[0x02, 0x01, 0x00, t10.len() as u8]);
                v.extend_from_slice(t10.as_bytes());
                v
            }
            0xb0 => {
                let pool = buffer_pool();
                let max = max_transfer_blocks(self.volume.block_size().bytes(), pool.chunk_size());
                let mut v = vec![0u8; 60];
                v[4..8].copy_from_slice(&max.to_be_bytes());
                v
            }
            _ => return check(Sense::invalid_field_in_cdb(2, None)),
        };
        let mut d = vec![0u8, page];
        d.extend_from_slice(&(body.len() as u16).to_be_bytes());
        d.extend(body);
        data_response(&d, alloc)
    }

    async fn read(
        &self,
        ch: &VolumeChannel,
        offset: u64,
        bytes: u64,
        alloc: usize,
    ) -> ScsiResponse {
        let pool = buffer_pool();
        let chunk = pool.chunk_size() as u64;
        let bs = u64::from(self.volume.block_size().bytes());
        let want = bytes.min(alloc as u64);
        // Read whole blocks covering `want`, then trim.
        let covered = want.div_ceil(bs) * bs;
        let step = (chunk / bs).max(1) * bs;
        let mut out: Vec<IoBuf> = Vec::new();
        let mut pos = 0u64;
        while pos < covered {
            let n = (covered - pos).min(step);
            let Some(buf) = pool.alloc(n as usize) else {
                return ScsiResponse {
                    status: ScsiStatus::Busy,
                    sense: None,
                    data_in: Vec::new(),
                };
            };
            let (res, buf) = ch.read(ByteOffset(offset + pos), buf).await;
            if res.is_err() {
                return check(Sense::new(SenseKey::MediumError, Asc(0x11, 0x00)));
            }
            let keep = (want - pos).min(n) as usize;
            let frozen = buf.freeze();
            out.push(frozen.slice(0, keep).unwrap_or(frozen));
            pos += n;
        }
        ScsiResponse {
            status: ScsiStatus::Good,
            sense: None,
            data_in: out,
        }
    }

    async fn write(
        &self,
        ch: &VolumeChannel,
        offset: u64,
        bytes: u64,
        data: Vec<IoBuf>,
    ) -> ScsiResponse {
        let bs = self.volume.block_size().bytes() as usize;
        let have: u64 = data.iter().map(|b| b.len() as u64).sum();
        // Less Data-Out than the CDB asks for (EDTL < SCSI transfer
        // length): write the whole blocks that arrived (FCP-4 overflow rule).
        let bytes = if have < bytes {
            have / bs as u64 * bs as u64
        } else {
            bytes
        };
        if bytes == 0 {
            return ScsiResponse::good();
        }
        let aligned = data.iter().all(|b| b.len() % bs == 0);
        let mut pos = 0u64;
        if aligned {
            for b in data {
                if pos >= bytes {
                    break;
                }
                let take = (bytes - pos).min(b.len() as u64) as usize;
                let piece = b.slice(0, take).unwrap_or(b);
                let (res, _) = ch.write(ByteOffset(offset + pos), piece).await;
                if res.is_err() {
                    return check(Sense::new(SenseKey::MediumError, Asc(0x0c, 0x00)));
                }
                pos += take as u64;
            }
            return ScsiResponse::good();
        }
        // Unaligned Data-Out PDUs: coalesce into whole-block chunks (a copy;
        // initiators normally send block-multiple PDUs so this is rare).
        let pool = buffer_pool();
        let step = (pool.chunk_size() / bs).max(1) * bs;
        let mut src = data.iter().flat_map(|b| b.iter().copied());
        while pos < bytes {
            let n = ((bytes - pos) as usize).min(step);
            let Some(mut buf) = pool.alloc(n) else {
                return ScsiResponse {
                    status: ScsiStatus::Busy,
                    sense: None,
                    data_in: Vec::new(),
                };
            };
            for d in buf.iter_mut() {
                *d = src.next().unwrap_or(0);
            }
            let (res, _) = ch.write(ByteOffset(offset + pos), buf.freeze()).await;
            if res.is_err() {
                return check(Sense::new(SenseKey::MediumError, Asc(0x0c, 0x00)));
            }
            pos += n as u64;
        }
        ScsiResponse::good()
    }
}
