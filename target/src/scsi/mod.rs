//! SCSI (SPC-4 / SBC-3) on mirrorpoint volumes: the command set behind the
//! iSCSI front end, kept apart from iSCSI so that it depends only on the
//! volume API and could serve another SCSI transport later.
//!
//! [`task`] is the contract between a SCSI transport and this layer: the
//! transport hands over a CDB with its Data-Out already collected into pool
//! buffers, and gets back a status, sense data and Data-In buffers.
//! [`lun::LogicalUnit`] executes commands for one exported LU; the few
//! target-level answers (REPORT LUNS, commands to a LUN that does not exist)
//! are free functions here.
//!
//! Internally every command handler returns `Result<_, Fail>`: a [`Fail`] is
//! either sense data or a bare status (RESERVATION CONFLICT, BUSY), and only
//! the dispatcher turns it into a [`ScsiResponse`], in the sense format the
//! Control mode page asks for. Handlers never index input slices directly
//! ([`cdb`] reads fields with bounds checks), so no CDB or parameter list can
//! panic the target.

pub(crate) mod cdb;
pub(crate) mod data;
pub(crate) mod inquiry;
pub mod lun;
pub(crate) mod mode;
pub(crate) mod opcodes;
pub(crate) mod pr;
pub(crate) mod rangelock;
pub(crate) mod sbc;
pub mod task;

pub use crate::iscsi::sense;
pub use lun::{LogicalUnit, LunConfig, ResetKind};
pub use task::{Nexus, ScsiResponse, ScsiStatus, ScsiTask, TaskAttribute};

use sense::{Asc, Sense, SenseKey};

/// Why a command did not complete with GOOD.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Fail {
    /// CHECK CONDITION with this sense data.
    Check(Sense),
    /// RESERVATION CONFLICT.
    Conflict,
    /// BUSY (no buffer for the transfer right now; the initiator retries).
    Busy,
}

impl From<Sense> for Fail {
    fn from(s: Sense) -> Self {
        Fail::Check(s)
    }
}

pub(crate) type CmdResult<T = ScsiResponse> = Result<T, Fail>;

impl Fail {
    /// The response for this failure, sense in descriptor format if `desc`.
    pub(crate) fn into_response(self, desc: bool) -> ScsiResponse {
        match self {
            Fail::Check(s) => check_condition(&s, desc),
            Fail::Conflict => status_only(ScsiStatus::ReservationConflict),
            Fail::Busy => status_only(ScsiStatus::Busy),
        }
    }
}

pub(crate) fn status_only(status: ScsiStatus) -> ScsiResponse {
    ScsiResponse {
        status,
        sense: None,
        data_in: Vec::new(),
    }
}

/// CHECK CONDITION carrying `sense`.
pub(crate) fn check_condition(sense: &Sense, desc: bool) -> ScsiResponse {
    ScsiResponse {
        status: ScsiStatus::CheckCondition,
        sense: Some(sense.encode(desc)),
        data_in: Vec::new(),
    }
}

/// GOOD with `bytes` as Data-In, truncated to the CDB's allocation length
/// and the initiator's expected length.
pub(crate) fn good_with(bytes: &[u8], alloc_len: usize, task: &ScsiTask<'_>) -> CmdResult {
    let limit = alloc_len.min(task.expected_data_in as usize);
    Ok(ScsiResponse {
        status: ScsiStatus::Good,
        sense: None,
        data_in: data::to_pool(bytes.get(..limit.min(bytes.len())).unwrap_or(&[]))?,
    })
}

/// REPORT LUNS (SPC-4 §6.33), answered by the target for the whole set of
/// LUNs the session can see. LUN numbers below 256 use peripheral device
/// addressing, below 16384 flat space addressing; larger values are taken to
/// be already encoded 8-byte LUNs.
pub fn report_luns(luns: &[u64], task: &ScsiTask<'_>) -> ScsiResponse {
    report_luns_inner(luns, task).unwrap_or_else(|f| f.into_response(false))
}

fn report_luns_inner(luns: &[u64], task: &ScsiTask<'_>) -> CmdResult {
    let c = cdb::Cdb::new(task.cdb);
    if c.opcode() != cdb::op::REPORT_LUNS {
        return Err(Sense::invalid_opcode().into());
    }
    c.check_len(12)?;
    // SELECT REPORT: 00h, 01h (well known: none), 02h (all) are accepted.
    let select = c.u8(2);
    if select > 2 {
        return Err(Sense::invalid_field_in_cdb(2, None).into());
    }
    let alloc = c.be32(6) as usize;
    if alloc < 16 {
        return Err(Sense::invalid_field_in_cdb(6, None).into());
    }
    let shown: Vec<u64> = if select == 1 {
        Vec::new()
    } else {
        luns.to_vec()
    };
    let mut out = Vec::with_capacity(8 + 8 * shown.len());
    let list_len = u32::try_from(8 * shown.len()).unwrap_or(u32::MAX);
    out.extend_from_slice(&list_len.to_be_bytes());
    out.extend_from_slice(&[0; 4]);
    for &l in &shown {
        out.extend_from_slice(&encode_lun(l));
    }
    good_with(&out, alloc, task)
}

/// The 8-byte SAM LUN for a LUN number.
pub fn encode_lun(lun: u64) -> [u8; 8] {
    if lun < 256 {
        [0, lun as u8, 0, 0, 0, 0, 0, 0]
    } else if lun < 16384 {
        [0x40 | (lun >> 8) as u8, lun as u8, 0, 0, 0, 0, 0, 0]
    } else {
        lun.to_be_bytes()
    }
}

/// Any command addressed to a LUN that does not exist: INQUIRY answers with
/// peripheral qualifier 011b / device type 1Fh, REQUEST SENSE with LOGICAL
/// UNIT NOT SUPPORTED sense data, REPORT LUNS must be routed to
/// [`report_luns`] by the transport, everything else gets CHECK CONDITION /
/// LOGICAL UNIT NOT SUPPORTED.
pub fn lun_not_supported(task: &ScsiTask<'_>) -> ScsiResponse {
    let c = cdb::Cdb::new(task.cdb);
    let not_supported = Sense::illegal(Asc::LOGICAL_UNIT_NOT_SUPPORTED);
    let r = match c.opcode() {
        cdb::op::INQUIRY => {
            let alloc = c.be16(3) as usize;
            let mut d = vec![0u8; 36];
            d[0] = 0x7f;
            if c.u8(1) & 1 != 0 {
                d.truncate(4);
            } else {
                d[2] = 0x06;
                d[3] = 0x02;
                d[4] = 31;
            }
            good_with(&d, alloc, task)
        }
        cdb::op::REQUEST_SENSE => {
            let desc = c.u8(1) & 1 != 0;
            good_with(&not_supported.encode(desc), usize::from(c.u8(4)), task)
        }
        _ => Err(not_supported.into()),
    };
    r.unwrap_or_else(|f| f.into_response(false))
}

/// Most pool chunks one command may move (Data-In or Data-Out).
pub const MAX_TRANSFER_CHUNKS: usize = 8;

/// The MAXIMUM TRANSFER LENGTH reported in the Block Limits VPD page (and
/// enforced), in blocks: [`MAX_TRANSFER_CHUNKS`] pool chunks (1 MiB with
/// 128 KiB chunks). A single volume I/O is at most one chunk, which Block
/// Limits reports as the OPTIMAL TRANSFER LENGTH; larger commands are split
/// into several volume I/Os and several Data-In buffers. One chunk as the
/// maximum would be too small: initiators (and libiscsi's own tests) send
/// 257-block writes without consulting Block Limits.
pub fn max_transfer_blocks(block_size: u32, chunk_size: usize) -> u32 {
    if block_size == 0 {
        return 0;
    }
    let bytes = chunk_size.saturating_mul(MAX_TRANSFER_CHUNKS);
    u32::try_from(bytes / block_size as usize).unwrap_or(u32::MAX)
}

/// MEDIUM ERROR sense for a failed volume request, or the matching
/// ILLEGAL REQUEST when the request itself was out of range.
pub(crate) fn volume_fail(e: &crate::volume::VolumeError, writing: bool) -> Fail {
    use crate::volume::VolumeError as E;
    match e {
        E::OutOfRange { .. } => Sense::lba_out_of_range().into(),
        E::NoBuffer => Fail::Busy,
        E::ZeroLength { .. } | E::Misaligned { .. } => {
            Sense::new(SenseKey::HardwareError, Asc::INTERNAL_TARGET_FAILURE).into()
        }
        E::Io(_) => Sense::new(
            SenseKey::MediumError,
            if writing {
                Asc::WRITE_ERROR
            } else {
                Asc::UNRECOVERED_READ_ERROR
            },
        )
        .into(),
    }
}

#[cfg(test)]
mod tests;
