//! CDB field access and the decoding shared by command families.
//!
//! [`Cdb`] reads fields with bounds checks (a missing byte reads as zero;
//! [`Cdb::check_len`] rejects CDBs shorter than their opcode's length), so
//! handlers can be written against the standard's byte tables without a
//! single panicking index. [`Rw`] decodes the READ/WRITE/VERIFY/WRITE SAME
//! family of every CDB length into one shape.

use super::sense::Sense;
use super::Fail;

/// Operation codes this layer knows.
pub(crate) mod op {
    pub const TEST_UNIT_READY: u8 = 0x00;
    pub const REQUEST_SENSE: u8 = 0x03;
    pub const READ_6: u8 = 0x08;
    pub const WRITE_6: u8 = 0x0a;
    pub const INQUIRY: u8 = 0x12;
    pub const MODE_SELECT_6: u8 = 0x15;
    pub const RESERVE_6: u8 = 0x16;
    pub const RELEASE_6: u8 = 0x17;
    pub const MODE_SENSE_6: u8 = 0x1a;
    pub const START_STOP_UNIT: u8 = 0x1b;
    pub const PREVENT_ALLOW: u8 = 0x1e;
    pub const READ_CAPACITY_10: u8 = 0x25;
    pub const READ_10: u8 = 0x28;
    pub const WRITE_10: u8 = 0x2a;
    pub const WRITE_VERIFY_10: u8 = 0x2e;
    pub const VERIFY_10: u8 = 0x2f;
    pub const PREFETCH_10: u8 = 0x34;
    pub const SYNC_CACHE_10: u8 = 0x35;
    pub const WRITE_SAME_10: u8 = 0x41;
    pub const UNMAP: u8 = 0x42;
    pub const MODE_SELECT_10: u8 = 0x55;
    pub const RESERVE_10: u8 = 0x56;
    pub const RELEASE_10: u8 = 0x57;
    pub const MODE_SENSE_10: u8 = 0x5a;
    pub const PR_IN: u8 = 0x5e;
    pub const PR_OUT: u8 = 0x5f;
    pub const READ_16: u8 = 0x88;
    pub const COMPARE_AND_WRITE: u8 = 0x89;
    pub const ORWRITE_16: u8 = 0x8b;
    pub const WRITE_16: u8 = 0x8a;
    pub const WRITE_VERIFY_16: u8 = 0x8e;
    pub const VERIFY_16: u8 = 0x8f;
    pub const PREFETCH_16: u8 = 0x90;
    pub const SYNC_CACHE_16: u8 = 0x91;
    pub const WRITE_SAME_16: u8 = 0x93;
    pub const SERVICE_ACTION_IN_16: u8 = 0x9e;
    pub const REPORT_LUNS: u8 = 0xa0;
    pub const MAINTENANCE_IN: u8 = 0xa3;
    pub const READ_12: u8 = 0xa8;
    pub const WRITE_12: u8 = 0xaa;
    pub const WRITE_VERIFY_12: u8 = 0xae;
    pub const VERIFY_12: u8 = 0xaf;

    /// SERVICE ACTION IN(16) service actions.
    pub const SAI_READ_CAPACITY_16: u8 = 0x10;
    pub const SAI_GET_LBA_STATUS: u8 = 0x12;
    /// MAINTENANCE IN service actions.
    pub const MI_REPORT_TARGET_PORT_GROUPS: u8 = 0x0a;
    pub const MI_REPORT_SUPPORTED_OPCODES: u8 = 0x0c;
    pub const MI_REPORT_SUPPORTED_TMF: u8 = 0x0d;
}

/// Bounds-checked view of a CDB.
#[derive(Clone, Copy)]
pub(crate) struct Cdb<'a>(pub &'a [u8]);

impl<'a> Cdb<'a> {
    pub fn new(b: &'a [u8]) -> Self {
        Cdb(b)
    }

    pub fn opcode(&self) -> u8 {
        self.u8(0)
    }

    pub fn u8(&self, i: usize) -> u8 {
        self.0.get(i).copied().unwrap_or(0)
    }

    pub fn be16(&self, i: usize) -> u16 {
        u16::from_be_bytes([self.u8(i), self.u8(i + 1)])
    }

    pub fn be24(&self, i: usize) -> u32 {
        u32::from_be_bytes([0, self.u8(i), self.u8(i + 1), self.u8(i + 2)])
    }

    pub fn be32(&self, i: usize) -> u32 {
        u32::from_be_bytes([self.u8(i), self.u8(i + 1), self.u8(i + 2), self.u8(i + 3)])
    }

    pub fn be64(&self, i: usize) -> u64 {
        (u64::from(self.be32(i)) << 32) | u64::from(self.be32(i + 4))
    }

    /// Whether `bit` of byte `i` is set.
    pub fn bit(&self, i: usize, bit: u8) -> bool {
        self.u8(i) & (1 << (bit & 7)) != 0
    }

    /// Rejects a CDB shorter than `len`, and a control byte asking for NACA
    /// (we report NORMACA=0).
    pub fn check_len(&self, len: usize) -> Result<(), Fail> {
        if self.0.len() < len {
            return Err(Sense::invalid_field_in_cdb(0, None).into());
        }
        let control = len - 1;
        if self.u8(control) & 0x04 != 0 {
            return Err(Sense::invalid_field_in_cdb(control as u16, Some(2)).into());
        }
        Ok(())
    }
}

/// The CDB length an opcode's group implies (SPC-4 §4.2.5.1), `None` for
/// variable-length and vendor-specific groups.
pub(crate) fn group_len(opcode: u8) -> Option<usize> {
    match opcode >> 5 {
        0 => Some(6),
        1 | 2 => Some(10),
        4 => Some(16),
        5 => Some(12),
        _ => None,
    }
}

/// A decoded READ / WRITE / VERIFY / WRITE SAME / PRE-FETCH / SYNCHRONIZE
/// CACHE style CDB.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Rw {
    pub lba: u64,
    pub blocks: u64,
    /// Byte of the transfer length field (for field pointers).
    pub len_byte: u16,
    /// RDPROTECT / WRPROTECT / VRPROTECT (byte 1 bits 7-5).
    pub protect: u8,
    pub dpo: bool,
    pub fua: bool,
    /// BYTCHK (byte 1 bits 2-1).
    pub bytchk: u8,
    /// Byte 1 of the CDB, for command-specific bits.
    pub flags: u8,
}

impl Rw {
    /// Decodes by CDB length: 6, 10, 12 or 16 bytes.
    pub fn decode(c: &Cdb<'_>) -> Result<Rw, Fail> {
        let op = c.opcode();
        let len = group_len(op).ok_or_else(|| Fail::from(Sense::invalid_opcode()))?;
        c.check_len(len)?;
        let flags = c.u8(1);
        let (lba, blocks, len_byte) = match len {
            6 => {
                let lba = u64::from(c.be24(1) & 0x1f_ffff);
                // READ(6)/WRITE(6): a transfer length of 0 means 256 blocks.
                let n = match c.u8(4) {
                    0 => 256,
                    n => u64::from(n),
                };
                (lba, n, 4)
            }
            10 => (u64::from(c.be32(2)), u64::from(c.be16(7)), 7),
            12 => (u64::from(c.be32(2)), u64::from(c.be32(6)), 6),
            _ => (c.be64(2), u64::from(c.be32(10)), 10),
        };
        let six = len == 6;
        Ok(Rw {
            lba,
            blocks,
            len_byte,
            protect: if six { 0 } else { flags >> 5 },
            dpo: !six && flags & 0x10 != 0,
            fua: !six && flags & 0x08 != 0,
            bytchk: if six { 0 } else { (flags >> 1) & 3 },
            flags: if six { 0 } else { flags },
        })
    }

    /// LBA range check against a volume of `num_blocks` (SBC-3 §4.5): the
    /// range must end at or before the capacity; a zero-length range may
    /// start at the capacity but not beyond.
    pub fn check_range(&self, num_blocks: u64) -> Result<(), Fail> {
        match self.lba.checked_add(self.blocks) {
            Some(end) if end <= num_blocks && self.lba <= num_blocks => Ok(()),
            _ => Err(Sense::lba_out_of_range().into()),
        }
    }
}
