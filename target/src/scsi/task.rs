//! The contract between a SCSI transport (iSCSI) and the SCSI command layer.
//!
//! The transport collects all Data-Out of a command (immediate, unsolicited
//! and R2T-solicited) into pool buffers before execution, and sends back
//! whatever Data-In the command produced, computing residuals against the
//! initiator's expected transfer length itself. Buffers are pool chunks so
//! that data moves socket → volume and volume → socket without copying.

use mirrorpoint_poller::IoBuf;

/// Which initiator, through which target port, sent a command (the I_T
/// nexus): reservations and unit attentions are kept per nexus.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Nexus {
    /// Initiator port name, e.g. "iqn.1994-05.com.redhat:host,i,0x23d000000001"
    /// (iSCSI: initiator name + ",i," + ISID in hex).
    pub initiator_port: String,
    /// Target port name, e.g. "iqn.2026-11.io.mirrorpoint:vol0,t,0x0001"
    /// (iSCSI: target name + ",t," + portal group tag in hex).
    pub target_port: String,
    /// Relative target port identifier (the portal group tag for iSCSI).
    pub relative_port: u16,
}

/// Task attributes from the transport (SAM-5).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TaskAttribute {
    /// SIMPLE.
    #[default]
    Simple,
    /// ORDERED.
    Ordered,
    /// HEAD OF QUEUE.
    HeadOfQueue,
    /// ACA.
    Aca,
}

/// One command as the transport hands it over.
#[derive(Debug)]
pub struct ScsiTask<'a> {
    /// The CDB (6 to 260 bytes; extended CDBs arrive whole).
    pub cdb: &'a [u8],
    /// All Data-Out, in order; empty for commands without Data-Out.
    /// The transport guarantees the total does not exceed the expected
    /// data transfer length it accepted.
    pub data_out: Vec<IoBuf>,
    /// Expected Data-In length the initiator allocated (0 if none).
    pub expected_data_in: u32,
    /// Expected Data-Out length the initiator announced (0 if none).
    pub expected_data_out: u32,
    /// Task attribute.
    pub attribute: TaskAttribute,
    /// Who sent it.
    pub nexus: &'a Nexus,
}

/// SCSI status codes (SAM-5).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum ScsiStatus {
    /// GOOD.
    Good = 0x00,
    /// CHECK CONDITION (sense data follows).
    CheckCondition = 0x02,
    /// CONDITION MET.
    ConditionMet = 0x04,
    /// BUSY.
    Busy = 0x08,
    /// RESERVATION CONFLICT.
    ReservationConflict = 0x18,
    /// TASK SET FULL.
    TaskSetFull = 0x28,
    /// ACA ACTIVE.
    AcaActive = 0x30,
    /// TASK ABORTED.
    TaskAborted = 0x40,
}

/// What a command produced.
#[derive(Debug)]
pub struct ScsiResponse {
    /// Status.
    pub status: ScsiStatus,
    /// Sense data (fixed or descriptor format, as the command layer chose),
    /// present with CHECK CONDITION.
    pub sense: Option<Vec<u8>>,
    /// Data-In, in order. May be shorter than `expected_data_in` (the
    /// transport reports an underflow residual) and is never longer: the
    /// command layer truncates to the allocation length / expected length.
    pub data_in: Vec<IoBuf>,
}

impl ScsiResponse {
    /// GOOD with no data.
    pub fn good() -> Self {
        ScsiResponse {
            status: ScsiStatus::Good,
            sense: None,
            data_in: Vec::new(),
        }
    }

    /// Total Data-In bytes.
    pub fn data_in_len(&self) -> usize {
        self.data_in.iter().map(|b| b.len()).sum()
    }
}
