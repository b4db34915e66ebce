//! The block commands (SBC-3): capacity, reads, writes, verification,
//! COMPARE AND WRITE, WRITE SAME, UNMAP, cache synchronisation and
//! provisioning status, on a volume channel.
//!
//! Transfers move in pool chunks: a READ larger than a chunk is read as
//! several volume reads into several Data-In buffers; a WRITE is written
//! from the Data-Out buffers as they arrived (zero copy), except that a
//! logical block split across two Data-Out buffers is gathered into a bounce
//! block first, because the volume only takes whole blocks. Every write
//! takes its block range shared in the LU's range lock and COMPARE AND
//! WRITE takes it exclusive, which is what makes COMPARE AND WRITE atomic
//! against writes from any session on any core. Reads take it shared too,
//! so no read observes a COMPARE AND WRITE half done.

use super::cdb::{op, Cdb, Rw};
use super::data::DataOut;
use super::lun::{LogicalUnit, Snapshot, MAX_UNMAP_DESCRIPTORS};
use super::sense::{Asc, Sense, SenseKey};
use super::task::{ScsiResponse, ScsiStatus, ScsiTask};
use super::{good_with, volume_fail, CmdResult, Fail};
use crate::units::{ByteLen, ByteOffset};
use crate::volume::{Volume, VolumeChannel};
use mirrorpoint_poller::{buffer_pool, IoBuf};
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::Arc;

/// Where the backend keeps data, for GET LBA STATUS: a regular file's
/// holes (SEEK_DATA / SEEK_HOLE on a read-only descriptor of the same
/// file), or nothing known (everything reported mapped).
pub(crate) struct AllocationMap {
    file: Option<OwnedFd>,
}

impl AllocationMap {
    pub(crate) fn for_volume(v: &Arc<Volume>) -> Self {
        let info = v.info();
        let uring = info.driver_specific.get("uring");
        let path = uring
            .and_then(|u| u.get("filename"))
            .and_then(|f| f.as_str())
            .map(str::to_owned);
        let block_device = uring
            .and_then(|u| u.get("block_device"))
            .and_then(|b| b.as_bool())
            .unwrap_or(true);
        let file = match path {
            Some(p) if !block_device => std::fs::File::open(p).ok().map(OwnedFd::from),
            _ => None,
        };
        AllocationMap { file }
    }

    /// Extents from byte `offset` up to `end`: (start, length, deallocated),
    /// at most `max` of them.
    fn extents(&self, offset: u64, end: u64, max: usize) -> Vec<(u64, u64, bool)> {
        let Some(fd) = &self.file else {
            return vec![(offset, end - offset, false)];
        };
        let seek = |off: u64, whence: i32| -> Option<u64> {
            let o = i64::try_from(off).ok()?;
            // SAFETY: lseek on a descriptor we own; no memory is involved.
            let r = unsafe { libc::lseek(fd.as_raw_fd(), o, whence) };
            u64::try_from(r).ok()
        };
        let mut out = Vec::new();
        let mut at = offset;
        while at < end && out.len() < max {
            let data = seek(at, libc::SEEK_DATA);
            let next = match data {
                Some(d) if d <= at => {
                    let hole = seek(at, libc::SEEK_HOLE).unwrap_or(end).clamp(at + 1, end);
                    out.push((at, hole - at, false));
                    hole
                }
                Some(d) => {
                    let d = d.min(end);
                    out.push((at, d - at, true));
                    d
                }
                // ENXIO: no data after `at`; other errors: say mapped.
                None => {
                    let errno = std::io::Error::last_os_error().raw_os_error();
                    out.push((at, end - at, errno == Some(libc::ENXIO)));
                    end
                }
            };
            at = next;
        }
        out
    }
}

fn write_protected() -> Fail {
    Sense::new(SenseKey::DataProtect, Asc::WRITE_PROTECTED).into()
}

fn info_unit_error() -> Fail {
    Sense::illegal(Asc::INVALID_FIELD_IN_INFORMATION_UNIT).into()
}

impl LogicalUnit {
    fn check_rw(&self, rw: &Rw) -> Result<(), Fail> {
        if rw.protect != 0 {
            return Err(Sense::invalid_field_in_cdb(1, Some(7)).into());
        }
        rw.check_range(self.num_blocks())?;
        if rw.blocks > u64::from(self.max_transfer()) {
            return Err(Sense::invalid_field_in_cdb(rw.len_byte, None).into());
        }
        Ok(())
    }

    fn writable(&self, snap: &Snapshot) -> Result<(), Fail> {
        if self.config().read_only || snap.mode.swp {
            return Err(write_protected());
        }
        Ok(())
    }

    fn offset(&self, lba: u64) -> ByteOffset {
        ByteOffset(lba.saturating_mul(u64::from(self.block_size())))
    }

    pub(crate) async fn sbc(
        &self,
        ch: &VolumeChannel,
        c: &Cdb<'_>,
        task: &ScsiTask<'_>,
        snap: Snapshot,
    ) -> CmdResult {
        match c.opcode() {
            op::READ_CAPACITY_10 => self.read_capacity_10(c, task),
            op::SERVICE_ACTION_IN_16 => {
                c.check_len(16)?;
                match c.u8(1) & 0x1f {
                    op::SAI_READ_CAPACITY_16 => self.read_capacity_16(c, task),
                    op::SAI_GET_LBA_STATUS => self.get_lba_status(c, task),
                    _ => Err(Sense::invalid_field_in_cdb(1, Some(4)).into()),
                }
            }
            op::READ_6 | op::READ_10 | op::READ_12 | op::READ_16 => {
                let rw = Rw::decode(c)?;
                self.check_rw(&rw)?;
                if rw.blocks == 0 {
                    return Ok(ScsiResponse::good());
                }
                let _g = self.locks.lock(rw.lba, rw.lba + rw.blocks, false).await;
                let data = self
                    .read_blocks(ch, rw.lba, rw.blocks, task.expected_data_in as usize)
                    .await?;
                Ok(ScsiResponse {
                    status: ScsiStatus::Good,
                    sense: None,
                    data_in: data,
                })
            }
            op::WRITE_6 | op::WRITE_10 | op::WRITE_12 | op::WRITE_16 => {
                let rw = Rw::decode(c)?;
                self.check_rw(&rw)?;
                self.writable(&snap)?;
                if rw.blocks == 0 {
                    return Ok(ScsiResponse::good());
                }
                let data = DataOut::new(&task.data_out);
                let blocks = self.received_blocks(&rw, &data);
                if blocks > 0 {
                    let _g = self.locks.lock(rw.lba, rw.lba + blocks, false).await;
                    self.write_data(ch, rw.lba, &data, 0, self.bytes(blocks))
                        .await?;
                    self.flush_if(ch, rw.fua || !snap.mode.wce).await?;
                }
                Ok(ScsiResponse::good())
            }
            op::WRITE_VERIFY_10 | op::WRITE_VERIFY_12 | op::WRITE_VERIFY_16 => {
                let rw = Rw::decode(c)?;
                if rw.bytchk > 1 {
                    return Err(Sense::invalid_field_in_cdb(1, Some(1)).into());
                }
                self.check_rw(&rw)?;
                self.writable(&snap)?;
                if rw.blocks == 0 {
                    return Ok(ScsiResponse::good());
                }
                let data = DataOut::new(&task.data_out);
                let blocks = self.received_blocks(&rw, &data);
                if blocks > 0 {
                    let _g = self.locks.lock(rw.lba, rw.lba + blocks, false).await;
                    self.write_data(ch, rw.lba, &data, 0, self.bytes(blocks))
                        .await?;
                    // Verification is against the medium: make it durable first.
                    self.flush_if(ch, true).await?;
                    if rw.bytchk == 1 {
                        self.compare(ch, rw.lba, blocks, &data, 0, false).await?;
                    }
                }
                Ok(ScsiResponse::good())
            }
            op::VERIFY_10 | op::VERIFY_12 | op::VERIFY_16 => {
                let rw = Rw::decode(c)?;
                if rw.bytchk == 2 {
                    return Err(Sense::invalid_field_in_cdb(1, Some(2)).into());
                }
                self.check_rw(&rw)?;
                if rw.blocks == 0 {
                    return Ok(ScsiResponse::good());
                }
                let data = DataOut::new(&task.data_out);
                let _g = self.locks.lock(rw.lba, rw.lba + rw.blocks, false).await;
                match rw.bytchk {
                    0 => {
                        // Medium verification: read it all back.
                        self.read_blocks(ch, rw.lba, rw.blocks, 0).await?;
                    }
                    1 => {
                        if (data.len() as u64) < self.bytes(rw.blocks) {
                            return Err(info_unit_error());
                        }
                        self.compare(ch, rw.lba, rw.blocks, &data, 0, false).await?;
                    }
                    _ => {
                        if (data.len() as u64) < u64::from(self.block_size()) {
                            return Err(info_unit_error());
                        }
                        self.compare(ch, rw.lba, rw.blocks, &data, 0, true).await?;
                    }
                }
                Ok(ScsiResponse::good())
            }
            op::COMPARE_AND_WRITE => self.compare_and_write(ch, c, task, snap).await,
            op::ORWRITE_16 => {
                let rw = Rw::decode(c)?;
                self.check_rw(&rw)?;
                self.writable(&snap)?;
                if rw.blocks == 0 {
                    return Ok(ScsiResponse::good());
                }
                let data = DataOut::new(&task.data_out);
                let blocks = self.received_blocks(&rw, &data);
                if blocks > 0 {
                    // Read, OR, write back: atomic like COMPARE AND WRITE.
                    let _g = self.locks.lock(rw.lba, rw.lba + blocks, true).await;
                    self.or_write(ch, rw.lba, blocks, &data).await?;
                    self.flush_if(ch, rw.fua || !snap.mode.wce).await?;
                }
                Ok(ScsiResponse::good())
            }
            op::WRITE_SAME_10 | op::WRITE_SAME_16 => self.write_same(ch, c, task, snap).await,
            op::UNMAP => self.unmap(ch, c, task, snap).await,
            op::SYNC_CACHE_10 | op::SYNC_CACHE_16 => {
                let rw = Rw::decode(c)?;
                rw.check_range(self.num_blocks())?;
                self.flush_if(ch, true).await?;
                Ok(ScsiResponse::good())
            }
            op::PREFETCH_10 | op::PREFETCH_16 => {
                let rw = Rw::decode(c)?;
                rw.check_range(self.num_blocks())?;
                Ok(ScsiResponse::good())
            }
            _ => Err(Sense::invalid_opcode().into()),
        }
    }

    /// How many of the command's blocks the Data-Out covers. An initiator
    /// that announced less Data-Out than the CDB asks for (iSCSI EDTL <
    /// transfer length) gets what it sent written and the rest ignored, as
    /// FCP-4 prescribes for the same case and libiscsi expects; the
    /// transport reports the overflow residual.
    fn received_blocks(&self, rw: &Rw, data: &DataOut<'_>) -> u64 {
        let bs = u64::from(self.block_size().max(1));
        rw.blocks.min(data.len() as u64 / bs)
    }

    fn bytes(&self, blocks: u64) -> u64 {
        blocks.saturating_mul(u64::from(self.block_size()))
    }

    async fn flush_if(&self, ch: &VolumeChannel, yes: bool) -> Result<(), Fail> {
        if yes {
            ch.flush().await.map_err(|e| volume_fail(&e, true))?;
        }
        Ok(())
    }

    /// Reads `blocks` at `lba` in chunk-sized pieces; keeps at most `limit`
    /// bytes (the rest is read only to be verified, when `limit` is 0 all is
    /// read and discarded).
    pub(crate) async fn read_blocks(
        &self,
        ch: &VolumeChannel,
        lba: u64,
        blocks: u64,
        limit: usize,
    ) -> Result<Vec<IoBuf>, Fail> {
        let pool = buffer_pool();
        let bs = u64::from(self.block_size());
        let chunk = (pool.chunk_size() as u64 / bs).max(1) * bs;
        let total = self.bytes(blocks);
        let keep = (limit as u64).min(total);
        let read_to = if limit == 0 { total } else { keep };
        let mut out = Vec::new();
        let mut done = 0u64;
        let start = self.offset(lba).0;
        while done < read_to {
            let n = chunk.min(total - done);
            let buf = pool.alloc(n as usize).ok_or(Fail::Busy)?;
            let (r, buf) = ch.read(ByteOffset(start + done), buf).await;
            r.map_err(|e| volume_fail(&e, false))?;
            if done < keep {
                let take = (keep - done).min(n) as usize;
                let b = buf.freeze();
                out.push(if take as u64 == n {
                    b
                } else {
                    b.slice(0, take).ok_or(Fail::Busy)?
                });
            }
            done += n;
        }
        Ok(out)
    }

    /// Writes `len` bytes of Data-Out starting at `from` to block `lba`.
    pub(crate) async fn write_data(
        &self,
        ch: &VolumeChannel,
        lba: u64,
        data: &DataOut<'_>,
        from: usize,
        len: u64,
    ) -> Result<(), Fail> {
        let bs = self.block_size() as usize;
        let mut off = self.offset(lba).0;
        let mut bounce: Option<mirrorpoint_poller::IoBufMut> = None;
        let mut filled = 0usize;
        for piece in data.slices(from, len as usize) {
            let mut pos = 0usize;
            while pos < piece.len() {
                let rest = piece.len() - pos;
                if filled > 0 || rest < bs {
                    let b = match bounce.as_mut() {
                        Some(b) => b,
                        None => bounce.insert(buffer_pool().alloc(bs).ok_or(Fail::Busy)?),
                    };
                    let n = (bs - filled).min(rest);
                    if let (Some(dst), Some(src)) =
                        (b.get_mut(filled..filled + n), piece.get(pos..pos + n))
                    {
                        dst.copy_from_slice(src);
                    }
                    filled += n;
                    pos += n;
                    if filled == bs {
                        if let Some(b) = bounce.take() {
                            let (r, _) = ch.write(ByteOffset(off), b.freeze()).await;
                            r.map_err(|e| volume_fail(&e, true))?;
                        }
                        off += bs as u64;
                        filled = 0;
                    }
                } else {
                    let n = rest / bs * bs;
                    let s = piece.slice(pos, n).ok_or(Fail::Busy)?;
                    let (r, _) = ch.write(ByteOffset(off), s).await;
                    r.map_err(|e| volume_fail(&e, true))?;
                    off += n as u64;
                    pos += n;
                }
            }
        }
        Ok(())
    }

    /// ORWRITE: each block becomes its current contents OR the Data-Out.
    async fn or_write(
        &self,
        ch: &VolumeChannel,
        lba: u64,
        blocks: u64,
        data: &DataOut<'_>,
    ) -> Result<(), Fail> {
        let pool = buffer_pool();
        let bs = u64::from(self.block_size());
        let chunk = (pool.chunk_size() as u64 / bs).max(1) * bs;
        let total = self.bytes(blocks);
        let start = self.offset(lba).0;
        let mut done = 0u64;
        while done < total {
            let n = chunk.min(total - done);
            let buf = pool.alloc(n as usize).ok_or(Fail::Busy)?;
            let (r, mut buf) = ch.read(ByteOffset(start + done), buf).await;
            r.map_err(|e| volume_fail(&e, false))?;
            let theirs = data.to_vec(done as usize, n as usize);
            for (b, t) in buf.iter_mut().zip(&theirs) {
                *b |= t;
            }
            let (r, _) = ch.write(ByteOffset(start + done), buf.freeze()).await;
            r.map_err(|e| volume_fail(&e, true))?;
            done += n;
        }
        Ok(())
    }

    /// Compares `blocks` at `lba` with Data-Out from `from` (or, with
    /// `single`, every block with the first Data-Out block); MISCOMPARE
    /// carries the Data-Out offset of the first differing byte.
    async fn compare(
        &self,
        ch: &VolumeChannel,
        lba: u64,
        blocks: u64,
        data: &DataOut<'_>,
        from: usize,
        single: bool,
    ) -> Result<(), Fail> {
        let bufs = self.read_blocks(ch, lba, blocks, usize::MAX).await?;
        let bs = self.block_size() as usize;
        let mut at = 0usize;
        for b in &bufs {
            if single {
                for (i, block) in b.chunks(bs).enumerate() {
                    if let Some(d) = data.first_difference(from, block) {
                        return Err(Sense::miscompare((at + i * bs + d) as u64).into());
                    }
                }
            } else if let Some(d) = data.first_difference(from + at, b) {
                return Err(Sense::miscompare((at + d) as u64).into());
            }
            at += b.len();
        }
        Ok(())
    }

    fn read_capacity_10(&self, c: &Cdb<'_>, task: &ScsiTask<'_>) -> CmdResult {
        c.check_len(10)?;
        if !c.bit(8, 0) && c.be32(2) != 0 {
            return Err(Sense::invalid_field_in_cdb(2, None).into());
        }
        let last = self.num_blocks().saturating_sub(1);
        let mut d = Vec::with_capacity(8);
        d.extend_from_slice(&u32::try_from(last).unwrap_or(u32::MAX).to_be_bytes());
        d.extend_from_slice(&self.block_size().to_be_bytes());
        good_with(&d, 8, task)
    }

    fn read_capacity_16(&self, c: &Cdb<'_>, task: &ScsiTask<'_>) -> CmdResult {
        let alloc = c.be32(10) as usize;
        let mut d = vec![0u8; 32];
        d[0..8].copy_from_slice(&self.num_blocks().saturating_sub(1).to_be_bytes());
        d[8..12].copy_from_slice(&self.block_size().to_be_bytes());
        // LOGICAL BLOCKS PER PHYSICAL BLOCK EXPONENT stays 0: with it set,
        // libiscsi's GetLBAStatus.UnmapSingle expects GET LBA STATUS to
        // start its first descriptor at a physical block boundary instead of
        // the requested LBA, which SBC-3 forbids. Block Limits still gives
        // 4 KiB as the optimal granularity.
        if self.config().thin_provisioning {
            d[14] = 0xc0; // LBPME, LBPRZ
        }
        good_with(&d, alloc, task)
    }

    fn get_lba_status(&self, c: &Cdb<'_>, task: &ScsiTask<'_>) -> CmdResult {
        let lba = c.be64(2);
        let alloc = c.be32(10) as usize;
        if lba >= self.num_blocks() {
            return Err(Sense::lba_out_of_range().into());
        }
        let bs = u64::from(self.block_size());
        let max = (alloc.saturating_sub(8) / 16).clamp(1, 64);
        let extents = self
            .lba_status
            .extents(lba * bs, self.num_blocks() * bs, max);
        let mut body = Vec::new();
        for (start, len, dealloc) in extents {
            let first = start / bs;
            let count = u32::try_from(len.div_ceil(bs)).unwrap_or(u32::MAX);
            body.extend_from_slice(&first.to_be_bytes());
            body.extend_from_slice(&count.to_be_bytes());
            body.push(u8::from(dealloc && self.config().thin_provisioning));
            body.extend_from_slice(&[0; 3]);
        }
        let mut d = Vec::with_capacity(8 + body.len());
        d.extend_from_slice(&u32::try_from(body.len() + 4).unwrap_or(0).to_be_bytes());
        d.extend_from_slice(&[0; 4]);
        d.extend_from_slice(&body);
        good_with(&d, alloc, task)
    }

    async fn compare_and_write(
        &self,
        ch: &VolumeChannel,
        c: &Cdb<'_>,
        task: &ScsiTask<'_>,
        snap: Snapshot,
    ) -> CmdResult {
        c.check_len(16)?;
        if c.u8(1) >> 5 != 0 {
            return Err(Sense::invalid_field_in_cdb(1, Some(7)).into());
        }
        let lba = c.be64(2);
        let n = u64::from(c.u8(13));
        if n == 0 {
            // No blocks, yet Data-Out: the CDB and the transfer disagree
            // (e.g. 256 blocks truncated into the one-byte field).
            if !task.data_out.is_empty() || task.expected_data_out != 0 {
                return Err(Sense::invalid_field_in_cdb(13, None).into());
            }
            return Ok(ScsiResponse::good());
        }
        if n > u64::from(self.facts().max_compare_and_write_blocks) {
            return Err(Sense::invalid_field_in_cdb(13, None).into());
        }
        match lba.checked_add(n) {
            Some(end) if end <= self.num_blocks() => {}
            _ => return Err(Sense::lba_out_of_range().into()),
        }
        self.writable(&snap)?;
        let data = DataOut::new(&task.data_out);
        let half = self.bytes(n);
        if data.len() as u64 != 2 * half {
            return Err(info_unit_error());
        }
        let _g = self.locks.lock(lba, lba + n, true).await;
        self.compare(ch, lba, n, &data, 0, false).await?;
        self.write_data(ch, lba, &data, half as usize, half).await?;
        self.flush_if(ch, c.bit(1, 3) || !snap.mode.wce).await?;
        Ok(ScsiResponse::good())
    }

    async fn write_same(
        &self,
        ch: &VolumeChannel,
        c: &Cdb<'_>,
        task: &ScsiTask<'_>,
        snap: Snapshot,
    ) -> CmdResult {
        let rw = Rw::decode(c)?;
        let ten = c.opcode() == op::WRITE_SAME_10;
        if rw.protect != 0 {
            return Err(Sense::invalid_field_in_cdb(1, Some(7)).into());
        }
        if rw.flags & 0x10 != 0 {
            // ANCHOR: anchored logical blocks are not supported (ANC_SUP=0).
            return Err(Sense::invalid_field_in_cdb(1, Some(4)).into());
        }
        let unmap = rw.flags & 0x08 != 0;
        let ndob = !ten && rw.flags & 0x01 != 0;
        if unmap && !self.config().thin_provisioning {
            return Err(Sense::invalid_field_in_cdb(1, Some(3)).into());
        }
        rw.check_range(self.num_blocks())?;
        // WSNZ=0: zero blocks means "to the end of the medium".
        let mut rw = rw;
        if rw.blocks == 0 {
            rw.blocks = self.num_blocks() - rw.lba;
            if rw.blocks == 0 {
                return Ok(ScsiResponse::good());
            }
        }
        if rw.blocks > self.max_write_same_blocks() {
            return Err(Sense::invalid_field_in_cdb(rw.len_byte, None).into());
        }
        self.writable(&snap)?;
        let bs = self.block_size() as usize;
        let data = DataOut::new(&task.data_out);
        let pattern = if ndob {
            vec![0u8; bs]
        } else {
            if data.len() != bs {
                return Err(info_unit_error());
            }
            data.to_vec(0, bs)
        };
        let off = self.offset(rw.lba);
        let len = ByteLen(self.bytes(rw.blocks));
        let _g = self.locks.lock(rw.lba, rw.lba + rw.blocks, false).await;
        // UNMAP=1 deallocates whatever the Data-Out block holds, as LIO and
        // tgt do and initiators expect; the blocks then read as zeroes
        // (LBPRZ=1), which is what READ CAPACITY and VPD B2h announce.
        if unmap {
            ch.unmap(off, len)
                .await
                .map_err(|e| volume_fail(&e, true))?;
        } else if pattern.iter().all(|&b| b == 0) {
            ch.write_zeroes(off, len)
                .await
                .map_err(|e| volume_fail(&e, true))?;
        } else {
            let pool = buffer_pool();
            let chunk = (pool.chunk_size() / bs).max(1) * bs;
            let fill = (chunk as u64).min(len.0) as usize;
            let mut b = pool.alloc(fill).ok_or(Fail::Busy)?;
            for block in b.chunks_mut(bs) {
                block.copy_from_slice(pattern.get(..block.len()).unwrap_or(&[]));
            }
            let b = b.freeze();
            let mut done = 0u64;
            while done < len.0 {
                let n = (len.0 - done).min(fill as u64) as usize;
                let s = b.slice(0, n).ok_or(Fail::Busy)?;
                let (r, _) = ch.write(ByteOffset(off.0 + done), s).await;
                r.map_err(|e| volume_fail(&e, true))?;
                done += n as u64;
            }
        }
        self.flush_if(ch, !snap.mode.wce).await?;
        Ok(ScsiResponse::good())
    }

    async fn unmap(
        &self,
        ch: &VolumeChannel,
        c: &Cdb<'_>,
        task: &ScsiTask<'_>,
        snap: Snapshot,
    ) -> CmdResult {
        if !self.config().thin_provisioning {
            return Err(Sense::invalid_opcode().into());
        }
        c.check_len(10)?;
        if c.bit(1, 0) {
            return Err(Sense::invalid_field_in_cdb(1, Some(0)).into());
        }
        let len = usize::from(c.be16(7));
        if len == 0 {
            return Ok(ScsiResponse::good());
        }
        self.writable(&snap)?;
        let p = super::lun::param_list(task, len)?;
        if len < 8 {
            return Err(Sense::illegal(Asc::PARAMETER_LIST_LENGTH_ERROR).into());
        }
        let get = |i: usize| p.get(i).copied().unwrap_or(0);
        let bd_len = usize::from(u16::from_be_bytes([get(2), get(3)])).min(len - 8);
        let count = bd_len / 16;
        if count > MAX_UNMAP_DESCRIPTORS as usize {
            return Err(Sense::invalid_field_in_parameter_list(2, None).into());
        }
        let mut ranges = Vec::with_capacity(count);
        for i in 0..count {
            let at = 8 + 16 * i;
            let mut lb = [0u8; 8];
            lb.copy_from_slice(p.get(at..at + 8).unwrap_or(&[0; 8]));
            let lba = u64::from_be_bytes(lb);
            let n = u32::from_be_bytes([get(at + 8), get(at + 9), get(at + 10), get(at + 11)]);
            // MAXIMUM UNMAP LBA COUNT is reported as FFFFFFFFh (no limit):
            // one descriptor cannot exceed it.
            match lba.checked_add(u64::from(n)) {
                Some(end) if end <= self.num_blocks() => {}
                _ => return Err(Sense::lba_out_of_range().into()),
            }
            if n > 0 {
                ranges.push((lba, u64::from(n)));
            }
        }
        for (lba, n) in ranges {
            let _g = self.locks.lock(lba, lba + n, false).await;
            ch.unmap(self.offset(lba), ByteLen(self.bytes(n)))
                .await
                .map_err(|e| volume_fail(&e, true))?;
        }
        self.flush_if(ch, !snap.mode.wce).await?;
        Ok(ScsiResponse::good())
    }
}
