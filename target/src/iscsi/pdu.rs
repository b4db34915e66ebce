//! iSCSI PDU codec (RFC 7143 §11): the 48-byte Basic Header Segment of every
//! opcode, Additional Header Segments, padded data segments, CRC32C digests and
//! an incremental framer.
//!
//! The layer is sans-IO and zero-copy: [`frame`] looks at the bytes received
//! so far and either says how many bytes the next PDU needs in total or hands
//! back a [`Pdu`] whose AHS and data segment are slices of the input buffer.
//! Nothing here allocates on the receive path and nothing panics on any input:
//! the BHS is copied into a fixed `[u8; 48]` before any field is read, and all
//! variable-length parts are bounds-checked with `get`.
//!
//! Every error a peer can provoke is a [`PduError`]; [`PduError::reject_reason`]
//! tells the connection layer which Reject reason (RFC 7143 §11.17.1) to send,
//! or `None` when the RFC asks for something else (header digest failure:
//! discard and recover/drop the connection). Reserved *fields* are ignored on
//! receipt as RFC 7143 §11.2 requires ("any compliant receiver MUST ignore any
//! bit not defined"), while reserved *code values* in defined fields
//! (opcodes, logout reasons, SNACK types, login stages) are errors.

use std::cmp::Ordering;
use std::ops::Range;

use thiserror::Error;

/// Length of the Basic Header Segment.
pub const BHS_LEN: usize = 48;
/// Length of a header or data digest.
pub const DIGEST_LEN: usize = 4;
/// Largest value the 24-bit DataSegmentLength field can carry.
pub const MAX_DATA_SEGMENT_LENGTH: u32 = 0x00ff_ffff;
/// TotalAHSLength is in 4-byte words and one byte wide.
pub const MAX_AHS_LEN: usize = 255 * 4;
/// The reserved tag value (RFC 7143 §11.2.1.8 / §11.18.4).
pub const RESERVED_TAG: u32 = 0xffff_ffff;

macro_rules! tag_newtype {
    ($(#[$m:meta])* $name:ident) => {
        $(#[$m])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
        pub struct $name(pub u32);
        impl $name {
            /// The reserved value `0xffffffff`.
            pub const RESERVED: $name = $name(RESERVED_TAG);
            /// True for the reserved value `0xffffffff`.
            pub fn is_reserved(self) -> bool {
                self.0 == RESERVED_TAG
            }
        }
    };
}

tag_newtype!(
    /// Initiator Task Tag.
    Itt
);
tag_newtype!(
    /// Target Transfer Tag.
    Ttt
);

/// Compare two 32-bit serial numbers per RFC 1982 (SERIAL_BITS = 32).
/// Returns `None` when the comparison is undefined (distance exactly 2^31).
pub fn serial_cmp(a: u32, b: u32) -> Option<Ordering> {
    if a == b {
        return Some(Ordering::Equal);
    }
    let d = b.wrapping_sub(a);
    match d.cmp(&0x8000_0000) {
        Ordering::Less => Some(Ordering::Less),
        Ordering::Greater => Some(Ordering::Greater),
        Ordering::Equal => None,
    }
}

macro_rules! serial_newtype {
    ($(#[$m:meta])* $name:ident) => {
        $(#[$m])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
        pub struct $name(pub u32);
        impl $name {
            /// The next serial number (wrapping).
            #[must_use]
            pub fn next(self) -> Self {
                $name(self.0.wrapping_add(1))
            }
            /// Serial addition (RFC 1982 §3.1); `n` should be below 2^31.
            #[must_use]
            pub fn serial_add(self, n: u32) -> Self {
                $name(self.0.wrapping_add(n))
            }
            /// RFC 1982 comparison; `None` when undefined.
            pub fn serial_cmp(self, other: Self) -> Option<Ordering> {
                serial_cmp(self.0, other.0)
            }
            /// `self < other` in serial arithmetic.
            pub fn lt(self, other: Self) -> bool {
                self.serial_cmp(other) == Some(Ordering::Less)
            }
            /// `self > other` in serial arithmetic.
            pub fn gt(self, other: Self) -> bool {
                self.serial_cmp(other) == Some(Ordering::Greater)
            }
        }
    };
}

serial_newtype!(
    /// Command sequence number.
    CmdSn
);
serial_newtype!(
    /// Status sequence number.
    StatSn
);
serial_newtype!(
    /// Data PDU sequence number.
    DataSn
);
serial_newtype!(
    /// R2T sequence number.
    R2tSn
);

/// Target Session Identifying Handle; 0 means "new session".
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct Tsih(pub u16);

/// Initiator Session ID (6 bytes: T/A, B, C, D; RFC 7143 §11.12.5).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct Isid(pub [u8; 6]);

/// Connection ID.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct Cid(pub u16);

/// Logical Unit Number field, kept raw (SAM encoding is the SCSI layer's job).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct Lun(pub [u8; 8]);

impl Lun {
    /// Big-endian view of the 8 bytes.
    pub fn to_u64(self) -> u64 {
        u64::from_be_bytes(self.0)
    }
    /// From a big-endian 64-bit value.
    pub fn from_u64(v: u64) -> Self {
        Lun(v.to_be_bytes())
    }
}

/// Opcodes (RFC 7143 §11.2.1.2).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Opcode {
    NopOut = 0x00,
    ScsiCommand = 0x01,
    TaskMgmtRequest = 0x02,
    LoginRequest = 0x03,
    TextRequest = 0x04,
    DataOut = 0x05,
    LogoutRequest = 0x06,
    Snack = 0x10,
    NopIn = 0x20,
    ScsiResponse = 0x21,
    TaskMgmtResponse = 0x22,
    LoginResponse = 0x23,
    TextResponse = 0x24,
    DataIn = 0x25,
    LogoutResponse = 0x26,
    R2t = 0x31,
    AsyncMessage = 0x32,
    Reject = 0x3f,
}

impl Opcode {
    /// Decode the 6-bit opcode; `None` for reserved and vendor-specific codes.
    pub fn from_u8(v: u8) -> Option<Self> {
        Some(match v & 0x3f {
            0x00 => Opcode::NopOut,
            0x01 => Opcode::ScsiCommand,
            0x02 => Opcode::TaskMgmtRequest,
            0x03 => Opcode::LoginRequest,
            0x04 => Opcode::TextRequest,
            0x05 => Opcode::DataOut,
            0x06 => Opcode::LogoutRequest,
            0x10 => Opcode::Snack,
            0x20 => Opcode::NopIn,
            0x21 => Opcode::ScsiResponse,
            0x22 => Opcode::TaskMgmtResponse,
            0x23 => Opcode::LoginResponse,
            0x24 => Opcode::TextResponse,
            0x25 => Opcode::DataIn,
            0x26 => Opcode::LogoutResponse,
            0x31 => Opcode::R2t,
            0x32 => Opcode::AsyncMessage,
            0x3f => Opcode::Reject,
            _ => return None,
        })
    }

    /// True for opcodes an initiator sends.
    pub fn is_initiator(self) -> bool {
        (self as u8) < 0x20
    }
}

/// Reject reasons (RFC 7143 §11.17.1).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum RejectReason {
    DataDigestError = 0x02,
    SnackReject = 0x03,
    ProtocolError = 0x04,
    CommandNotSupported = 0x05,
    ImmediateCommandReject = 0x06,
    TaskInProgress = 0x07,
    InvalidDataAck = 0x08,
    InvalidPduField = 0x09,
    LongOperationReject = 0x0a,
    NegotiationReset = 0x0b,
    WaitingForLogout = 0x0c,
}

impl RejectReason {
    /// Decode a reason byte; `None` for reserved values.
    pub fn from_u8(v: u8) -> Option<Self> {
        use RejectReason::*;
        Some(match v {
            0x02 => DataDigestError,
            0x03 => SnackReject,
            0x04 => ProtocolError,
            0x05 => CommandNotSupported,
            0x06 => ImmediateCommandReject,
            0x07 => TaskInProgress,
            0x08 => InvalidDataAck,
            0x09 => InvalidPduField,
            0x0a => LongOperationReject,
            0x0b => NegotiationReset,
            0x0c => WaitingForLogout,
            _ => return None,
        })
    }
}

/// Everything that can be wrong with received bytes.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum PduError {
    #[error("buffer holds {have} bytes, {need} needed")]
    Truncated { need: usize, have: usize },
    #[error("unknown or unsupported opcode {0:#04x}")]
    UnknownOpcode(u8),
    #[error("opcode {0:?} is not valid in this direction")]
    WrongDirection(Opcode),
    #[error("DataSegmentLength {len} exceeds MaxRecvDataSegmentLength {max}")]
    DataSegmentTooLong { len: u32, max: u32 },
    #[error("header digest mismatch: got {got:#010x}, computed {computed:#010x}")]
    HeaderDigest { got: u32, computed: u32 },
    #[error("data digest mismatch: got {got:#010x}, computed {computed:#010x}")]
    DataDigest { got: u32, computed: u32 },
    #[error("reserved value {value:#x} in field {field}")]
    ReservedValue { field: &'static str, value: u32 },
    #[error("invalid field {field}: {why}")]
    InvalidField {
        field: &'static str,
        why: &'static str,
    },
    #[error("malformed AHS: {0}")]
    BadAhs(&'static str),
    #[error("value too large to encode in {0}")]
    EncodeOverflow(&'static str),
}

impl PduError {
    /// Which Reject reason the target should answer with, if the RFC calls for
    /// a Reject at all. Header digest errors and truncation are not answered
    /// (the PDU boundary itself is untrustworthy / not yet complete).
    pub fn reject_reason(&self) -> Option<RejectReason> {
        match self {
            PduError::Truncated { .. } | PduError::HeaderDigest { .. } => None,
            PduError::EncodeOverflow(_) => None,
            PduError::UnknownOpcode(_) => Some(RejectReason::CommandNotSupported),
            PduError::WrongDirection(_) => Some(RejectReason::ProtocolError),
            PduError::DataSegmentTooLong { .. } => Some(RejectReason::ProtocolError),
            PduError::DataDigest { .. } => Some(RejectReason::DataDigestError),
            PduError::ReservedValue { .. } => Some(RejectReason::ProtocolError),
            PduError::InvalidField { .. } | PduError::BadAhs(_) => {
                Some(RejectReason::InvalidPduField)
            }
        }
    }
}

// ---------------------------------------------------------------------------
// Per-opcode header structs
// ---------------------------------------------------------------------------

/// Login stages (CSG/NSG, RFC 7143 §11.12.3).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[repr(u8)]
pub enum Stage {
    SecurityNegotiation = 0,
    LoginOperationalNegotiation = 1,
    FullFeaturePhase = 3,
}

impl Stage {
    fn from_bits(v: u8, field: &'static str) -> Result<Self, PduError> {
        match v & 3 {
            0 => Ok(Stage::SecurityNegotiation),
            1 => Ok(Stage::LoginOperationalNegotiation),
            3 => Ok(Stage::FullFeaturePhase),
            v => Err(PduError::ReservedValue {
                field,
                value: u32::from(v),
            }),
        }
    }
}

/// NOP-Out (§11.18).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NopOut {
    pub immediate: bool,
    pub lun: Lun,
    pub itt: Itt,
    pub ttt: Ttt,
    pub cmd_sn: CmdSn,
    pub exp_stat_sn: StatSn,
}

/// Task attribute of a SCSI Command (ATTR field).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum TaskAttr {
    Untagged = 0,
    Simple = 1,
    Ordered = 2,
    HeadOfQueue = 3,
    Aca = 4,
}

/// SCSI Command (§11.3).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ScsiCommand {
    pub immediate: bool,
    pub final_: bool,
    pub read: bool,
    pub write: bool,
    pub attr: TaskAttr,
    pub lun: Lun,
    pub itt: Itt,
    pub expected_data_transfer_length: u32,
    pub cmd_sn: CmdSn,
    pub exp_stat_sn: StatSn,
    /// First 16 bytes of the CDB; longer CDBs continue in an Extended-CDB AHS.
    pub cdb: [u8; 16],
}

/// Task management functions (§11.5.1).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum TmfFunction {
    AbortTask,
    AbortTaskSet,
    ClearAca,
    ClearTaskSet,
    LogicalUnitReset,
    TargetWarmReset,
    TargetColdReset,
    TaskReassign,
    /// Any other value: answer with TMF response "function not supported".
    Other(u8),
}

impl TmfFunction {
    fn from_u8(v: u8) -> Self {
        use TmfFunction::*;
        match v {
            1 => AbortTask,
            2 => AbortTaskSet,
            3 => ClearAca,
            4 => ClearTaskSet,
            5 => LogicalUnitReset,
            6 => TargetWarmReset,
            7 => TargetColdReset,
            8 => TaskReassign,
            v => Other(v),
        }
    }
    fn to_u8(self) -> u8 {
        use TmfFunction::*;
        match self {
            AbortTask => 1,
            AbortTaskSet => 2,
            ClearAca => 3,
            ClearTaskSet => 4,
            LogicalUnitReset => 5,
            TargetWarmReset => 6,
            TargetColdReset => 7,
            TaskReassign => 8,
            Other(v) => v & 0x7f,
        }
    }
}

/// Task Management Function Request (§11.5).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TaskMgmtRequest {
    pub immediate: bool,
    pub function: TmfFunction,
    pub lun: Lun,
    pub itt: Itt,
    pub referenced_task_tag: Itt,
    pub cmd_sn: CmdSn,
    pub exp_stat_sn: StatSn,
    pub ref_cmd_sn: CmdSn,
    pub exp_data_sn: DataSn,
}

/// Login Request (§11.12).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LoginRequest {
    pub transit: bool,
    pub continue_: bool,
    pub csg: Stage,
    /// Only meaningful when `transit` is set; reserved value 2 is rejected then.
    pub nsg: Stage,
    pub version_max: u8,
    pub version_min: u8,
    pub isid: Isid,
    pub tsih: Tsih,
    pub itt: Itt,
    pub cid: Cid,
    pub cmd_sn: CmdSn,
    pub exp_stat_sn: StatSn,
}

/// Text Request (§11.10).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TextRequest {
    pub immediate: bool,
    pub final_: bool,
    pub continue_: bool,
    pub lun: Lun,
    pub itt: Itt,
    pub ttt: Ttt,
    pub cmd_sn: CmdSn,
    pub exp_stat_sn: StatSn,
}

/// SCSI Data-Out (§11.7).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DataOut {
    pub final_: bool,
    pub lun: Lun,
    pub itt: Itt,
    pub ttt: Ttt,
    pub exp_stat_sn: StatSn,
    pub data_sn: DataSn,
    pub buffer_offset: u32,
}

/// Logout reason codes (§11.14.1).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum LogoutReason {
    CloseSession = 0,
    CloseConnection = 1,
    RemoveConnectionForRecovery = 2,
}

/// Logout Request (§11.14).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LogoutRequest {
    pub immediate: bool,
    pub reason: LogoutReason,
    pub itt: Itt,
    pub cid: Cid,
    pub cmd_sn: CmdSn,
    pub exp_stat_sn: StatSn,
}

/// SNACK types (§11.16.1).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum SnackType {
    DataR2t = 0,
    Status = 1,
    DataAck = 2,
    RData = 3,
}

/// SNACK Request (§11.16).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Snack {
    pub snack_type: SnackType,
    pub lun: Lun,
    pub itt: Itt,
    pub ttt: Ttt,
    pub exp_stat_sn: StatSn,
    pub beg_run: u32,
    pub run_length: u32,
}

/// NOP-In (§11.19).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NopIn {
    pub lun: Lun,
    pub itt: Itt,
    pub ttt: Ttt,
    pub stat_sn: StatSn,
    pub exp_cmd_sn: CmdSn,
    pub max_cmd_sn: CmdSn,
}

/// SCSI Response (§11.4).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ScsiResponse {
    pub bidi_overflow: bool,
    pub bidi_underflow: bool,
    pub overflow: bool,
    pub underflow: bool,
    pub response: u8,
    pub status: u8,
    pub itt: Itt,
    pub snack_tag: u32,
    pub stat_sn: StatSn,
    pub exp_cmd_sn: CmdSn,
    pub max_cmd_sn: CmdSn,
    pub exp_data_sn: DataSn,
    pub bidi_read_residual_count: u32,
    pub residual_count: u32,
}

/// Task Management Function Response (§11.6).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TaskMgmtResponse {
    pub response: u8,
    pub itt: Itt,
    pub stat_sn: StatSn,
    pub exp_cmd_sn: CmdSn,
    pub max_cmd_sn: CmdSn,
}

/// Login Response (§11.13).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LoginResponse {
    pub transit: bool,
    pub continue_: bool,
    pub csg: Stage,
    pub nsg: Stage,
    pub version_max: u8,
    pub version_active: u8,
    pub isid: Isid,
    pub tsih: Tsih,
    pub itt: Itt,
    pub stat_sn: StatSn,
    pub exp_cmd_sn: CmdSn,
    pub max_cmd_sn: CmdSn,
    pub status_class: u8,
    pub status_detail: u8,
}

/// Text Response (§11.11).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TextResponse {
    pub final_: bool,
    pub continue_: bool,
    pub lun: Lun,
    pub itt: Itt,
    pub ttt: Ttt,
    pub stat_sn: StatSn,
    pub exp_cmd_sn: CmdSn,
    pub max_cmd_sn: CmdSn,
}

/// SCSI Data-In (§11.8).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DataIn {
    pub final_: bool,
    pub acknowledge: bool,
    pub overflow: bool,
    pub underflow: bool,
    /// S bit: the PDU carries status (then `status` and `stat_sn` are valid).
    pub has_status: bool,
    pub status: u8,
    pub lun: Lun,
    pub itt: Itt,
    pub ttt: Ttt,
    pub stat_sn: StatSn,
    pub exp_cmd_sn: CmdSn,
    pub max_cmd_sn: CmdSn,
    pub data_sn: DataSn,
    pub buffer_offset: u32,
    pub residual_count: u32,
}

/// Logout Response (§11.15).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LogoutResponse {
    pub response: u8,
    pub itt: Itt,
    pub stat_sn: StatSn,
    pub exp_cmd_sn: CmdSn,
    pub max_cmd_sn: CmdSn,
    pub time2wait: u16,
    pub time2retain: u16,
}

/// Ready To Transfer (§11.9).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct R2t {
    pub lun: Lun,
    pub itt: Itt,
    pub ttt: Ttt,
    pub stat_sn: StatSn,
    pub exp_cmd_sn: CmdSn,
    pub max_cmd_sn: CmdSn,
    pub r2t_sn: R2tSn,
    pub buffer_offset: u32,
    pub desired_data_transfer_length: u32,
}

/// Asynchronous Message (§11.9).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AsyncMessage {
    pub lun: Lun,
    pub stat_sn: StatSn,
    pub exp_cmd_sn: CmdSn,
    pub max_cmd_sn: CmdSn,
    pub async_event: u8,
    pub async_vcode: u8,
    pub parameter1: u16,
    pub parameter2: u16,
    pub parameter3: u16,
}

/// Reject (§11.17). The data segment carries the rejected PDU's header.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reject {
    pub reason: RejectReason,
    pub stat_sn: StatSn,
    pub exp_cmd_sn: CmdSn,
    pub max_cmd_sn: CmdSn,
    pub data_sn_r2t_sn: u32,
}

/// A typed Basic Header Segment.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Bhs {
    NopOut(NopOut),
    ScsiCommand(ScsiCommand),
    TaskMgmtRequest(TaskMgmtRequest),
    LoginRequest(LoginRequest),
    TextRequest(TextRequest),
    DataOut(DataOut),
    LogoutRequest(LogoutRequest),
    Snack(Snack),
    NopIn(NopIn),
    ScsiResponse(ScsiResponse),
    TaskMgmtResponse(TaskMgmtResponse),
    LoginResponse(LoginResponse),
    TextResponse(TextResponse),
    DataIn(DataIn),
    LogoutResponse(LogoutResponse),
    R2t(R2t),
    AsyncMessage(AsyncMessage),
    Reject(Reject),
}

/// The length fields of a BHS: what follows the 48 bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct SegmentLengths {
    /// TotalAHSLength in bytes (a multiple of 4).
    pub ahs_len: usize,
    /// DataSegmentLength in bytes, without padding.
    pub data_len: u32,
}

fn be16(b: &[u8; BHS_LEN], at: usize) -> u16 {
    let mut a = [0u8; 2];
    if let Some(s) = b.get(at..at + 2) {
        a.copy_from_slice(s);
    }
    u16::from_be_bytes(a)
}

fn be32(b: &[u8; BHS_LEN], at: usize) -> u32 {
    let mut a = [0u8; 4];
    if let Some(s) = b.get(at..at + 4) {
        a.copy_from_slice(s);
    }
    u32::from_be_bytes(a)
}

fn arr<const N: usize>(b: &[u8; BHS_LEN], at: usize) -> [u8; N] {
    let mut a = [0u8; N];
    if let Some(s) = b.get(at..at + N) {
        a.copy_from_slice(s);
    }
    a
}

fn put(b: &mut [u8; BHS_LEN], at: usize, v: &[u8]) {
    if let Some(d) = b.get_mut(at..at + v.len()) {
        d.copy_from_slice(v);
    }
}

fn put16(b: &mut [u8; BHS_LEN], at: usize, v: u16) {
    put(b, at, &v.to_be_bytes());
}

fn put32(b: &mut [u8; BHS_LEN], at: usize, v: u32) {
    put(b, at, &v.to_be_bytes());
}

impl Bhs {
    /// The opcode of this header.
    pub fn opcode(&self) -> Opcode {
        match self {
            Bhs::NopOut(_) => Opcode::NopOut,
            Bhs::ScsiCommand(_) => Opcode::ScsiCommand,
            Bhs::TaskMgmtRequest(_) => Opcode::TaskMgmtRequest,
            Bhs::LoginRequest(_) => Opcode::LoginRequest,
            Bhs::TextRequest(_) => Opcode::TextRequest,
            Bhs::DataOut(_) => Opcode::DataOut,
            Bhs::LogoutRequest(_) => Opcode::LogoutRequest,
            Bhs::Snack(_) => Opcode::Snack,
            Bhs::NopIn(_) => Opcode::NopIn,
            Bhs::ScsiResponse(_) => Opcode::ScsiResponse,
            Bhs::TaskMgmtResponse(_) => Opcode::TaskMgmtResponse,
            Bhs::LoginResponse(_) => Opcode::LoginResponse,
            Bhs::TextResponse(_) => Opcode::TextResponse,
            Bhs::DataIn(_) => Opcode::DataIn,
            Bhs::LogoutResponse(_) => Opcode::LogoutResponse,
            Bhs::R2t(_) => Opcode::R2t,
            Bhs::AsyncMessage(_) => Opcode::AsyncMessage,
            Bhs::Reject(_) => Opcode::Reject,
        }
    }

    /// The Initiator Task Tag (reserved value for Async Message and Reject).
    pub fn itt(&self) -> Itt {
        match self {
            Bhs::NopOut(h) => h.itt,
            Bhs::ScsiCommand(h) => h.itt,
            Bhs::TaskMgmtRequest(h) => h.itt,
            Bhs::LoginRequest(h) => h.itt,
            Bhs::TextRequest(h) => h.itt,
            Bhs::DataOut(h) => h.itt,
            Bhs::LogoutRequest(h) => h.itt,
            Bhs::Snack(h) => h.itt,
            Bhs::NopIn(h) => h.itt,
            Bhs::ScsiResponse(h) => h.itt,
            Bhs::TaskMgmtResponse(h) => h.itt,
            Bhs::LoginResponse(h) => h.itt,
            Bhs::TextResponse(h) => h.itt,
            Bhs::DataIn(h) => h.itt,
            Bhs::LogoutResponse(h) => h.itt,
            Bhs::R2t(h) => h.itt,
            Bhs::AsyncMessage(_) | Bhs::Reject(_) => Itt::RESERVED,
        }
    }

    /// Only the segment lengths of a raw BHS (no validation of the rest).
    pub fn lengths(raw: &[u8; BHS_LEN]) -> SegmentLengths {
        SegmentLengths {
            ahs_len: usize::from(raw[4]) * 4,
            data_len: be32(raw, 4) & MAX_DATA_SEGMENT_LENGTH,
        }
    }

    /// Decode and validate a 48-byte BHS.
    pub fn decode(raw: &[u8; BHS_LEN]) -> Result<(Bhs, SegmentLengths), PduError> {
        let b = raw;
        let op = Opcode::from_u8(b[0]).ok_or(PduError::UnknownOpcode(b[0] & 0x3f))?;
        // Byte 0 bit 7 is reserved in every PDU. The RFC says receivers
        // ignore reserved bits, but no implementation sets this one and a set
        // bit is the cheapest sign of a desynchronised byte stream, so it is
        // refused (as a protocol error) before anything else is trusted.
        if b[0] & 0x80 != 0 {
            return Err(PduError::ReservedValue {
                field: "opcode byte bit 7",
                value: u32::from(b[0]),
            });
        }
        let imm = b[0] & 0x40 != 0;
        let f1 = b[1];
        let fin = f1 & 0x80 != 0;
        let lens = Bhs::lengths(b);
        let lun = Lun(arr::<8>(b, 8));
        let itt = Itt(be32(b, 16));
        let no_segments = |name: &'static str| -> Result<(), PduError> {
            if lens.ahs_len != 0 || lens.data_len != 0 {
                Err(PduError::InvalidField {
                    field: name,
                    why: "this PDU carries no AHS or data segment",
                })
            } else {
                Ok(())
            }
        };
        let bhs = match op {
            Opcode::NopOut => {
                let h = NopOut {
                    immediate: imm,
                    lun,
                    itt,
                    ttt: Ttt(be32(b, 20)),
                    cmd_sn: CmdSn(be32(b, 24)),
                    exp_stat_sn: StatSn(be32(b, 28)),
                };
                if h.itt.is_reserved() && !h.immediate {
                    return Err(PduError::InvalidField {
                        field: "NOP-Out I bit",
                        why: "ITT 0xffffffff requires the immediate bit",
                    });
                }
                Bhs::NopOut(h)
            }
            Opcode::ScsiCommand => {
                let attr = match f1 & 0x07 {
                    0 => TaskAttr::Untagged,
                    1 => TaskAttr::Simple,
                    2 => TaskAttr::Ordered,
                    3 => TaskAttr::HeadOfQueue,
                    4 => TaskAttr::Aca,
                    v => {
                        return Err(PduError::ReservedValue {
                            field: "SCSI Command ATTR",
                            value: u32::from(v),
                        })
                    }
                };
                let h = ScsiCommand {
                    immediate: imm,
                    final_: fin,
                    read: f1 & 0x40 != 0,
                    write: f1 & 0x20 != 0,
                    attr,
                    lun,
                    itt,
                    expected_data_transfer_length: be32(b, 20),
                    cmd_sn: CmdSn(be32(b, 24)),
                    exp_stat_sn: StatSn(be32(b, 28)),
                    cdb: arr::<16>(b, 32),
                };
                if h.itt.is_reserved() {
                    return Err(PduError::InvalidField {
                        field: "ITT",
                        why: "reserved tag on a SCSI Command",
                    });
                }
                if !h.final_ && !h.write {
                    return Err(PduError::InvalidField {
                        field: "SCSI Command F bit",
                        why: "F=0 only allowed when unsolicited data follows (W=1)",
                    });
                }
                if !h.write && lens.data_len != 0 {
                    return Err(PduError::InvalidField {
                        field: "DataSegmentLength",
                        why: "immediate data on a command without W bit",
                    });
                }
                Bhs::ScsiCommand(h)
            }
            Opcode::TaskMgmtRequest => {
                no_segments("TMF Request")?;
                Bhs::TaskMgmtRequest(TaskMgmtRequest {
                    immediate: imm,
                    function: TmfFunction::from_u8(f1 & 0x7f),
                    lun,
                    itt,
                    referenced_task_tag: Itt(be32(b, 20)),
                    cmd_sn: CmdSn(be32(b, 24)),
                    exp_stat_sn: StatSn(be32(b, 28)),
                    ref_cmd_sn: CmdSn(be32(b, 32)),
                    exp_data_sn: DataSn(be32(b, 36)),
                })
            }
            Opcode::LoginRequest => {
                let transit = f1 & 0x80 != 0;
                let cont = f1 & 0x40 != 0;
                if transit && cont {
                    return Err(PduError::InvalidField {
                        field: "Login T/C bits",
                        why: "T and C must not both be set",
                    });
                }
                let csg = Stage::from_bits((f1 >> 2) & 3, "Login CSG")?;
                if csg == Stage::FullFeaturePhase {
                    return Err(PduError::ReservedValue {
                        field: "Login CSG",
                        value: 3,
                    });
                }
                // NSG is only defined when T=1; otherwise report "stay".
                let nsg = if transit {
                    Stage::from_bits(f1 & 3, "Login NSG")?
                } else {
                    csg
                };
                if lens.ahs_len != 0 {
                    return Err(PduError::InvalidField {
                        field: "TotalAHSLength",
                        why: "Login Request carries no AHS",
                    });
                }
                Bhs::LoginRequest(LoginRequest {
                    transit,
                    continue_: cont,
                    csg,
                    nsg,
                    version_max: b[2],
                    version_min: b[3],
                    isid: Isid(arr::<6>(b, 8)),
                    tsih: Tsih(be16(b, 14)),
                    itt,
                    cid: Cid(be16(b, 20)),
                    cmd_sn: CmdSn(be32(b, 24)),
                    exp_stat_sn: StatSn(be32(b, 28)),
                })
            }
            Opcode::TextRequest => {
                let cont = f1 & 0x40 != 0;
                if fin && cont {
                    return Err(PduError::InvalidField {
                        field: "Text F/C bits",
                        why: "F and C must not both be set",
                    });
                }
                Bhs::TextRequest(TextRequest {
                    immediate: imm,
                    final_: fin,
                    continue_: cont,
                    lun,
                    itt,
                    ttt: Ttt(be32(b, 20)),
                    cmd_sn: CmdSn(be32(b, 24)),
                    exp_stat_sn: StatSn(be32(b, 28)),
                })
            }
            Opcode::DataOut => Bhs::DataOut(DataOut {
                final_: fin,
                lun,
                itt,
                ttt: Ttt(be32(b, 20)),
                exp_stat_sn: StatSn(be32(b, 28)),
                data_sn: DataSn(be32(b, 36)),
                buffer_offset: be32(b, 40),
            }),
            Opcode::LogoutRequest => {
                let reason = match f1 & 0x7f {
                    0 => LogoutReason::CloseSession,
                    1 => LogoutReason::CloseConnection,
                    2 => LogoutReason::RemoveConnectionForRecovery,
                    v => {
                        return Err(PduError::ReservedValue {
                            field: "Logout reason code",
                            value: u32::from(v),
                        })
                    }
                };
                no_segments("Logout Request")?;
                Bhs::LogoutRequest(LogoutRequest {
                    immediate: imm,
                    reason,
                    itt,
                    cid: Cid(be16(b, 20)),
                    cmd_sn: CmdSn(be32(b, 24)),
                    exp_stat_sn: StatSn(be32(b, 28)),
                })
            }
            Opcode::Snack => {
                let snack_type = match f1 & 0x0f {
                    0 => SnackType::DataR2t,
                    1 => SnackType::Status,
                    2 => SnackType::DataAck,
                    3 => SnackType::RData,
                    v => {
                        return Err(PduError::ReservedValue {
                            field: "SNACK type",
                            value: u32::from(v),
                        })
                    }
                };
                Bhs::Snack(Snack {
                    snack_type,
                    lun,
                    itt,
                    ttt: Ttt(be32(b, 20)),
                    exp_stat_sn: StatSn(be32(b, 28)),
                    beg_run: be32(b, 40),
                    run_length: be32(b, 44),
                })
            }
            Opcode::NopIn => Bhs::NopIn(NopIn {
                lun,
                itt,
                ttt: Ttt(be32(b, 20)),
                stat_sn: StatSn(be32(b, 24)),
                exp_cmd_sn: CmdSn(be32(b, 28)),
                max_cmd_sn: CmdSn(be32(b, 32)),
            }),
            Opcode::ScsiResponse => Bhs::ScsiResponse(ScsiResponse {
                bidi_overflow: f1 & 0x10 != 0,
                bidi_underflow: f1 & 0x08 != 0,
                overflow: f1 & 0x04 != 0,
                underflow: f1 & 0x02 != 0,
                response: b[2],
                status: b[3],
                itt,
                snack_tag: be32(b, 20),
                stat_sn: StatSn(be32(b, 24)),
                exp_cmd_sn: CmdSn(be32(b, 28)),
                max_cmd_sn: CmdSn(be32(b, 32)),
                exp_data_sn: DataSn(be32(b, 36)),
                bidi_read_residual_count: be32(b, 40),
                residual_count: be32(b, 44),
            }),
            Opcode::TaskMgmtResponse => Bhs::TaskMgmtResponse(TaskMgmtResponse {
                response: b[2],
                itt,
                stat_sn: StatSn(be32(b, 24)),
                exp_cmd_sn: CmdSn(be32(b, 28)),
                max_cmd_sn: CmdSn(be32(b, 32)),
            }),
            Opcode::LoginResponse => {
                let csg = Stage::from_bits((f1 >> 2) & 3, "Login CSG")?;
                let transit = f1 & 0x80 != 0;
                Bhs::LoginResponse(LoginResponse {
                    transit,
                    continue_: f1 & 0x40 != 0,
                    csg,
                    nsg: if transit {
                        Stage::from_bits(f1 & 3, "Login NSG")?
                    } else {
                        csg
                    },
                    version_max: b[2],
                    version_active: b[3],
                    isid: Isid(arr::<6>(b, 8)),
                    tsih: Tsih(be16(b, 14)),
                    itt,
                    stat_sn: StatSn(be32(b, 24)),
                    exp_cmd_sn: CmdSn(be32(b, 28)),
                    max_cmd_sn: CmdSn(be32(b, 32)),
                    status_class: b[36],
                    status_detail: b[37],
                })
            }
            Opcode::TextResponse => Bhs::TextResponse(TextResponse {
                final_: fin,
                continue_: f1 & 0x40 != 0,
                lun,
                itt,
                ttt: Ttt(be32(b, 20)),
                stat_sn: StatSn(be32(b, 24)),
                exp_cmd_sn: CmdSn(be32(b, 28)),
                max_cmd_sn: CmdSn(be32(b, 32)),
            }),
            Opcode::DataIn => Bhs::DataIn(DataIn {
                final_: fin,
                acknowledge: f1 & 0x40 != 0,
                overflow: f1 & 0x04 != 0,
                underflow: f1 & 0x02 != 0,
                has_status: f1 & 0x01 != 0,
                status: if f1 & 0x01 != 0 { b[3] } else { 0 },
                lun,
                itt,
                ttt: Ttt(be32(b, 20)),
                stat_sn: StatSn(be32(b, 24)),
                exp_cmd_sn: CmdSn(be32(b, 28)),
                max_cmd_sn: CmdSn(be32(b, 32)),
                data_sn: DataSn(be32(b, 36)),
                buffer_offset: be32(b, 40),
                residual_count: be32(b, 44),
            }),
            Opcode::LogoutResponse => Bhs::LogoutResponse(LogoutResponse {
                response: b[2],
                itt,
                stat_sn: StatSn(be32(b, 24)),
                exp_cmd_sn: CmdSn(be32(b, 28)),
                max_cmd_sn: CmdSn(be32(b, 32)),
                time2wait: be16(b, 40),
                time2retain: be16(b, 42),
            }),
            Opcode::R2t => Bhs::R2t(R2t {
                lun,
                itt,
                ttt: Ttt(be32(b, 20)),
                stat_sn: StatSn(be32(b, 24)),
                exp_cmd_sn: CmdSn(be32(b, 28)),
                max_cmd_sn: CmdSn(be32(b, 32)),
                r2t_sn: R2tSn(be32(b, 36)),
                buffer_offset: be32(b, 40),
                desired_data_transfer_length: be32(b, 44),
            }),
            Opcode::AsyncMessage => Bhs::AsyncMessage(AsyncMessage {
                lun,
                stat_sn: StatSn(be32(b, 24)),
                exp_cmd_sn: CmdSn(be32(b, 28)),
                max_cmd_sn: CmdSn(be32(b, 32)),
                async_event: b[36],
                async_vcode: b[37],
                parameter1: be16(b, 38),
                parameter2: be16(b, 40),
                parameter3: be16(b, 42),
            }),
            Opcode::Reject => Bhs::Reject(Reject {
                reason: RejectReason::from_u8(b[2]).ok_or(PduError::ReservedValue {
                    field: "Reject reason",
                    value: u32::from(b[2]),
                })?,
                stat_sn: StatSn(be32(b, 24)),
                exp_cmd_sn: CmdSn(be32(b, 28)),
                max_cmd_sn: CmdSn(be32(b, 32)),
                data_sn_r2t_sn: be32(b, 36),
            }),
        };
        Ok((bhs, lens))
    }

    /// Encode into 48 bytes with the given segment lengths. Reserved fields
    /// are zero. Fails only if a length does not fit its field.
    pub fn encode(&self, lens: SegmentLengths) -> Result<[u8; BHS_LEN], PduError> {
        if lens.data_len > MAX_DATA_SEGMENT_LENGTH {
            return Err(PduError::EncodeOverflow("DataSegmentLength"));
        }
        if lens.ahs_len % 4 != 0 || lens.ahs_len > MAX_AHS_LEN {
            return Err(PduError::EncodeOverflow("TotalAHSLength"));
        }
        let mut b = [0u8; BHS_LEN];
        let op = self.opcode() as u8;
        put32(&mut b, 4, lens.data_len);
        b[4] = u8::try_from(lens.ahs_len / 4).unwrap_or(u8::MAX);
        put32(&mut b, 16, self.itt().0);
        let bit = |c: bool, v: u8| if c { v } else { 0 };
        let imm = |i: bool| bit(i, 0x40);
        match self {
            Bhs::NopOut(h) => {
                b[0] = op | imm(h.immediate);
                b[1] = 0x80;
                put(&mut b, 8, &h.lun.0);
                put32(&mut b, 20, h.ttt.0);
                put32(&mut b, 24, h.cmd_sn.0);
                put32(&mut b, 28, h.exp_stat_sn.0);
            }
            Bhs::ScsiCommand(h) => {
                b[0] = op | imm(h.immediate);
                b[1] =
                    bit(h.final_, 0x80) | bit(h.read, 0x40) | bit(h.write, 0x20) | (h.attr as u8);
                put(&mut b, 8, &h.lun.0);
                put32(&mut b, 20, h.expected_data_transfer_length);
                put32(&mut b, 24, h.cmd_sn.0);
                put32(&mut b, 28, h.exp_stat_sn.0);
                put(&mut b, 32, &h.cdb);
            }
            Bhs::TaskMgmtRequest(h) => {
                b[0] = op | imm(h.immediate);
                b[1] = 0x80 | h.function.to_u8();
                put(&mut b, 8, &h.lun.0);
                put32(&mut b, 20, h.referenced_task_tag.0);
                put32(&mut b, 24, h.cmd_sn.0);
                put32(&mut b, 28, h.exp_stat_sn.0);
                put32(&mut b, 32, h.ref_cmd_sn.0);
                put32(&mut b, 36, h.exp_data_sn.0);
            }
            Bhs::LoginRequest(h) => {
                b[0] = op | 0x40;
                b[1] = bit(h.transit, 0x80)
                    | bit(h.continue_, 0x40)
                    | ((h.csg as u8) << 2)
                    | bit(h.transit, h.nsg as u8);
                b[2] = h.version_max;
                b[3] = h.version_min;
                put(&mut b, 8, &h.isid.0);
                put16(&mut b, 14, h.tsih.0);
                put16(&mut b, 20, h.cid.0);
                put32(&mut b, 24, h.cmd_sn.0);
                put32(&mut b, 28, h.exp_stat_sn.0);
            }
            Bhs::TextRequest(h) => {
                b[0] = op | imm(h.immediate);
                b[1] = bit(h.final_, 0x80) | bit(h.continue_, 0x40);
                put(&mut b, 8, &h.lun.0);
                put32(&mut b, 20, h.ttt.0);
                put32(&mut b, 24, h.cmd_sn.0);
                put32(&mut b, 28, h.exp_stat_sn.0);
            }
            Bhs::DataOut(h) => {
                b[0] = op;
                b[1] = bit(h.final_, 0x80);
                put(&mut b, 8, &h.lun.0);
                put32(&mut b, 20, h.ttt.0);
                put32(&mut b, 28, h.exp_stat_sn.0);
                put32(&mut b, 36, h.data_sn.0);
                put32(&mut b, 40, h.buffer_offset);
            }
            Bhs::LogoutRequest(h) => {
                b[0] = op | imm(h.immediate);
                b[1] = 0x80 | (h.reason as u8);
                put16(&mut b, 20, h.cid.0);
                put32(&mut b, 24, h.cmd_sn.0);
                put32(&mut b, 28, h.exp_stat_sn.0);
            }
            Bhs::Snack(h) => {
                b[0] = op;
                b[1] = 0x80 | (h.snack_type as u8);
                put(&mut b, 8, &h.lun.0);
                put32(&mut b, 20, h.ttt.0);
                put32(&mut b, 28, h.exp_stat_sn.0);
                put32(&mut b, 40, h.beg_run);
                put32(&mut b, 44, h.run_length);
            }
            Bhs::NopIn(h) => {
                b[0] = op;
                b[1] = 0x80;
                put(&mut b, 8, &h.lun.0);
                put32(&mut b, 20, h.ttt.0);
                put32(&mut b, 24, h.stat_sn.0);
                put32(&mut b, 28, h.exp_cmd_sn.0);
                put32(&mut b, 32, h.max_cmd_sn.0);
            }
            Bhs::ScsiResponse(h) => {
                b[0] = op;
                b[1] = 0x80
                    | bit(h.bidi_overflow, 0x10)
                    | bit(h.bidi_underflow, 0x08)
                    | bit(h.overflow, 0x04)
                    | bit(h.underflow, 0x02);
                b[2] = h.response;
                b[3] = h.status;
                put32(&mut b, 20, h.snack_tag);
                put32(&mut b, 24, h.stat_sn.0);
                put32(&mut b, 28, h.exp_cmd_sn.0);
                put32(&mut b, 32, h.max_cmd_sn.0);
                put32(&mut b, 36, h.exp_data_sn.0);
                put32(&mut b, 40, h.bidi_read_residual_count);
                put32(&mut b, 44, h.residual_count);
            }
            Bhs::TaskMgmtResponse(h) => {
                b[0] = op;
                b[1] = 0x80;
                b[2] = h.response;
                put32(&mut b, 24, h.stat_sn.0);
                put32(&mut b, 28, h.exp_cmd_sn.0);
                put32(&mut b, 32, h.max_cmd_sn.0);
            }
            Bhs::LoginResponse(h) => {
                b[0] = op;
                b[1] = bit(h.transit, 0x80)
                    | bit(h.continue_, 0x40)
                    | ((h.csg as u8) << 2)
                    | bit(h.transit, h.nsg as u8);
                b[2] = h.version_max;
                b[3] = h.version_active;
                put(&mut b, 8, &h.isid.0);
                put16(&mut b, 14, h.tsih.0);
                put32(&mut b, 24, h.stat_sn.0);
                put32(&mut b, 28, h.exp_cmd_sn.0);
                put32(&mut b, 32, h.max_cmd_sn.0);
                b[36] = h.status_class;
                b[37] = h.status_detail;
            }
            Bhs::TextResponse(h) => {
                b[0] = op;
                b[1] = bit(h.final_, 0x80) | bit(h.continue_, 0x40);
                put(&mut b, 8, &h.lun.0);
                put32(&mut b, 20, h.ttt.0);
                put32(&mut b, 24, h.stat_sn.0);
                put32(&mut b, 28, h.exp_cmd_sn.0);
                put32(&mut b, 32, h.max_cmd_sn.0);
            }
            Bhs::DataIn(h) => {
                b[0] = op;
                b[1] = bit(h.final_, 0x80)
                    | bit(h.acknowledge, 0x40)
                    | bit(h.overflow, 0x04)
                    | bit(h.underflow, 0x02)
                    | bit(h.has_status, 0x01);
                b[3] = if h.has_status { h.status } else { 0 };
                put(&mut b, 8, &h.lun.0);
                put32(&mut b, 20, h.ttt.0);
                put32(&mut b, 24, h.stat_sn.0);
                put32(&mut b, 28, h.exp_cmd_sn.0);
                put32(&mut b, 32, h.max_cmd_sn.0);
                put32(&mut b, 36, h.data_sn.0);
                put32(&mut b, 40, h.buffer_offset);
                put32(&mut b, 44, h.residual_count);
            }
            Bhs::LogoutResponse(h) => {
                b[0] = op;
                b[1] = 0x80;
                b[2] = h.response;
                put32(&mut b, 24, h.stat_sn.0);
                put32(&mut b, 28, h.exp_cmd_sn.0);
                put32(&mut b, 32, h.max_cmd_sn.0);
                put16(&mut b, 40, h.time2wait);
                put16(&mut b, 42, h.time2retain);
            }
            Bhs::R2t(h) => {
                b[0] = op;
                b[1] = 0x80;
                put(&mut b, 8, &h.lun.0);
                put32(&mut b, 20, h.ttt.0);
                put32(&mut b, 24, h.stat_sn.0);
                put32(&mut b, 28, h.exp_cmd_sn.0);
                put32(&mut b, 32, h.max_cmd_sn.0);
                put32(&mut b, 36, h.r2t_sn.0);
                put32(&mut b, 40, h.buffer_offset);
                put32(&mut b, 44, h.desired_data_transfer_length);
            }
            Bhs::AsyncMessage(h) => {
                b[0] = op;
                b[1] = 0x80;
                put(&mut b, 8, &h.lun.0);
                put32(&mut b, 24, h.stat_sn.0);
                put32(&mut b, 28, h.exp_cmd_sn.0);
                put32(&mut b, 32, h.max_cmd_sn.0);
                b[36] = h.async_event;
                b[37] = h.async_vcode;
                put16(&mut b, 38, h.parameter1);
                put16(&mut b, 40, h.parameter2);
                put16(&mut b, 42, h.parameter3);
            }
            Bhs::Reject(h) => {
                b[0] = op;
                b[1] = 0x80;
                b[2] = h.reason as u8;
                put32(&mut b, 24, h.stat_sn.0);
                put32(&mut b, 28, h.exp_cmd_sn.0);
                put32(&mut b, 32, h.max_cmd_sn.0);
                put32(&mut b, 36, h.data_sn_r2t_sn);
            }
        }
        Ok(b)
    }
}

// ---------------------------------------------------------------------------
// AHS
// ---------------------------------------------------------------------------

/// AHS types (RFC 7143 §11.2.2.2).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ahs<'a> {
    /// Bytes 17.. of a CDB longer than 16 bytes (padding excluded).
    ExtendedCdb(&'a [u8]),
    /// Bidirectional Read Expected Data Transfer Length.
    BidiReadExpectedLength(u32),
    /// Vendor-specific types 60..=63 (specific byte + data).
    Vendor { ahs_type: u8, data: &'a [u8] },
}

/// Iterate and validate the AHS area of a PDU.
pub fn parse_ahs(mut area: &[u8]) -> Result<Vec<Ahs<'_>>, PduError> {
    let mut out = Vec::new();
    while !area.is_empty() {
        let Some(&[l0, l1, ty]) = area.get(..3) else {
            return Err(PduError::BadAhs("truncated AHS header"));
        };
        let len = usize::from(u16::from_be_bytes([l0, l1]));
        // AHSLength counts the type-specific byte and the data, not the
        // 2-byte length nor the type byte.
        if len == 0 {
            return Err(PduError::BadAhs("zero AHSLength"));
        }
        let body = area
            .get(3..3 + len)
            .ok_or(PduError::BadAhs("AHSLength beyond TotalAHSLength"))?;
        let padded = (3 + len).div_ceil(4) * 4;
        // The first body byte is type-specific (reserved for types 1 and 2).
        let rest = body.get(1..).unwrap_or(&[]);
        match ty {
            1 => out.push(Ahs::ExtendedCdb(rest)),
            2 => {
                if len != 5 {
                    return Err(PduError::BadAhs("bidirectional AHS must have AHSLength 5"));
                }
                let v: [u8; 4] = rest
                    .try_into()
                    .map_err(|_| PduError::BadAhs("bidirectional AHS length"))?;
                out.push(Ahs::BidiReadExpectedLength(u32::from_be_bytes(v)));
            }
            60..=63 => out.push(Ahs::Vendor {
                ahs_type: ty,
                data: body,
            }),
            _ => return Err(PduError::BadAhs("reserved AHS type")),
        }
        area = area.get(padded..).unwrap_or(&[]);
    }
    Ok(out)
}

/// Build the AHS area (padded) for an extended CDB of `cdb.len() > 16` bytes
/// and/or a bidirectional read length.
pub fn build_ahs(extended_cdb: Option<&[u8]>, bidi_read_len: Option<u32>) -> Vec<u8> {
    let mut v = Vec::new();
    if let Some(ext) = extended_cdb {
        let len = u16::try_from(ext.len() + 1).unwrap_or(u16::MAX);
        v.extend_from_slice(&len.to_be_bytes());
        v.push(1);
        v.push(0);
        v.extend_from_slice(ext);
        while v.len() % 4 != 0 {
            v.push(0);
        }
    }
    if let Some(l) = bidi_read_len {
        v.extend_from_slice(&[0, 5, 2, 0]);
        v.extend_from_slice(&l.to_be_bytes());
    }
    v
}

// ---------------------------------------------------------------------------
// Digests and framing
// ---------------------------------------------------------------------------

/// CRC32C as iSCSI uses it for header and data digests.
pub fn crc32c(data: &[u8]) -> u32 {
    crc32c::crc32c(data)
}

/// The digest as it appears on the wire (least significant byte first, as
/// the RFC 7143 Appendix B.4 examples show).
pub fn digest_bytes(crc: u32) -> [u8; 4] {
    crc.to_le_bytes()
}

fn read_digest(b: &[u8]) -> Option<u32> {
    let a: [u8; 4] = b.get(..4)?.try_into().ok()?;
    Some(u32::from_le_bytes(a))
}

/// Bytes of padding after a segment of `len` bytes.
pub fn pad_len(len: usize) -> usize {
    (4 - len % 4) % 4
}

/// Negotiated framing parameters of a connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FrameConfig {
    pub header_digest: bool,
    pub data_digest: bool,
    /// Our MaxRecvDataSegmentLength (8192 during login).
    pub max_recv_data_segment_length: u32,
}

impl Default for FrameConfig {
    fn default() -> Self {
        FrameConfig {
            header_digest: false,
            data_digest: false,
            max_recv_data_segment_length: 8192,
        }
    }
}

/// A complete received PDU; segments borrow from the input.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pdu<'a> {
    pub bhs: Bhs,
    /// The raw 48 header bytes (needed e.g. to build a Reject).
    pub raw_bhs: [u8; BHS_LEN],
    /// The AHS area (multiple of 4 bytes), unparsed.
    pub ahs: &'a [u8],
    /// The data segment without padding and digest.
    pub data: &'a [u8],
    /// Where `data` lies in the input buffer.
    pub data_range: Range<usize>,
    /// Total bytes this PDU occupied in the input (consume this many).
    pub wire_len: usize,
}

impl Pdu<'_> {
    /// Parsed AHS list.
    pub fn ahs_list(&self) -> Result<Vec<Ahs<'_>>, PduError> {
        parse_ahs(self.ahs)
    }

    /// The complete CDB of a SCSI Command (16 bytes plus any Extended-CDB AHS).
    pub fn full_cdb(&self) -> Result<Option<Vec<u8>>, PduError> {
        let Bhs::ScsiCommand(c) = &self.bhs else {
            return Ok(None);
        };
        let mut cdb = c.cdb.to_vec();
        for a in self.ahs_list()? {
            if let Ahs::ExtendedCdb(ext) = a {
                cdb.extend_from_slice(ext);
            }
        }
        Ok(Some(cdb))
    }
}

/// Result of [`frame`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Framed<'a> {
    /// The next PDU needs this many bytes in total; read more.
    NeedMore(usize),
    /// A complete, validated PDU.
    Complete(Pdu<'a>),
}

/// Which side is receiving: determines which opcodes are acceptable.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// We are the target: accept initiator opcodes only.
    Target,
    /// We are the initiator: accept target opcodes only.
    Initiator,
}

/// Incrementally frame the next PDU in `buf`.
///
/// The header digest is verified before any field past the length bytes is
/// trusted; the data digest is verified before the data is handed out.
pub fn frame<'a>(buf: &'a [u8], cfg: &FrameConfig, role: Role) -> Result<Framed<'a>, PduError> {
    let Some(raw) = buf.get(..BHS_LEN) else {
        return Ok(Framed::NeedMore(BHS_LEN));
    };
    let mut raw_bhs = [0u8; BHS_LEN];
    raw_bhs.copy_from_slice(raw);
    let lens = Bhs::lengths(&raw_bhs);
    let hd = if cfg.header_digest { DIGEST_LEN } else { 0 };
    let data_len = lens.data_len as usize;
    let dd = if cfg.data_digest && data_len > 0 {
        DIGEST_LEN
    } else {
        0
    };
    let header_end = BHS_LEN + lens.ahs_len;
    let data_start = header_end + hd;
    let data_end = data_start + data_len;
    let total = data_end + pad_len(data_len) + dd;

    // Check the header digest as soon as the header is complete, so that a
    // corrupted length field is reported as a digest error rather than
    // waiting for bytes that will never come.
    if hd > 0 {
        let Some(hdr) = buf.get(..header_end) else {
            return Ok(Framed::NeedMore(data_start));
        };
        let Some(got) = buf.get(header_end..data_start).and_then(read_digest) else {
            return Ok(Framed::NeedMore(data_start));
        };
        let computed = crc32c(hdr);
        if got != computed {
            return Err(PduError::HeaderDigest { got, computed });
        }
    }
    let (bhs, _) = Bhs::decode(&raw_bhs)?;
    let op = bhs.opcode();
    let ok_dir = match role {
        Role::Target => op.is_initiator(),
        Role::Initiator => !op.is_initiator(),
    };
    if !ok_dir {
        return Err(PduError::WrongDirection(op));
    }
    if lens.data_len > cfg.max_recv_data_segment_length {
        return Err(PduError::DataSegmentTooLong {
            len: lens.data_len,
            max: cfg.max_recv_data_segment_length,
        });
    }
    if buf.len() < total {
        return Ok(Framed::NeedMore(total));
    }
    let ahs = buf.get(BHS_LEN..header_end).unwrap_or(&[]);
    parse_ahs(ahs)?;
    let data = buf.get(data_start..data_end).unwrap_or(&[]);
    if dd > 0 {
        let padded_end = data_end + pad_len(data_len);
        let covered = buf.get(data_start..padded_end).unwrap_or(&[]);
        let got = buf
            .get(padded_end..total)
            .and_then(read_digest)
            .unwrap_or(0);
        let computed = crc32c(covered);
        if got != computed {
            return Err(PduError::DataDigest { got, computed });
        }
    }
    Ok(Framed::Complete(Pdu {
        bhs,
        raw_bhs,
        ahs,
        data,
        data_range: data_start..data_end,
        wire_len: total,
    }))
}

/// Append a complete PDU (BHS, AHS, header digest, data, padding, data
/// digest) to `out`. `ahs` must be a multiple of 4 bytes (see [`build_ahs`]).
pub fn encode_pdu(
    bhs: &Bhs,
    ahs: &[u8],
    data: &[u8],
    header_digest: bool,
    data_digest: bool,
    out: &mut Vec<u8>,
) -> Result<(), PduError> {
    let data_len =
        u32::try_from(data.len()).map_err(|_| PduError::EncodeOverflow("DataSegmentLength"))?;
    let raw = bhs.encode(SegmentLengths {
        ahs_len: ahs.len(),
        data_len,
    })?;
    let start = out.len();
    out.extend_from_slice(&raw);
    out.extend_from_slice(ahs);
    if header_digest {
        let crc = crc32c(out.get(start..).unwrap_or(&[]));
        out.extend_from_slice(&digest_bytes(crc));
    }
    if !data.is_empty() {
        let dstart = out.len();
        out.extend_from_slice(data);
        out.resize(out.len() + pad_len(data.len()), 0);
        if data_digest {
            let crc = crc32c(out.get(dstart..).unwrap_or(&[]));
            out.extend_from_slice(&digest_bytes(crc));
        }
    }
    Ok(())
}

/// Build the Reject PDU header for a PDU we refuse; its data segment must be
/// the rejected PDU's raw BHS (RFC 7143 §11.17).
pub fn reject_for(
    reason: RejectReason,
    stat_sn: StatSn,
    exp_cmd_sn: CmdSn,
    max_cmd_sn: CmdSn,
) -> Bhs {
    Bhs::Reject(Reject {
        reason,
        stat_sn,
        exp_cmd_sn,
        max_cmd_sn,
        data_sn_r2t_sn: 0,
    })
}

/// Append a complete Reject PDU for a PDU we refuse (RFC 7143 §11.17): the
/// data segment is the rejected PDU's 48-byte header.
#[allow(clippy::too_many_arguments)]
pub fn encode_reject(
    reason: RejectReason,
    rejected_bhs: &[u8; BHS_LEN],
    stat_sn: StatSn,
    exp_cmd_sn: CmdSn,
    max_cmd_sn: CmdSn,
    header_digest: bool,
    data_digest: bool,
    out: &mut Vec<u8>,
) -> Result<(), PduError> {
    let bhs = reject_for(reason, stat_sn, exp_cmd_sn, max_cmd_sn);
    encode_pdu(&bhs, &[], rejected_bhs, header_digest, data_digest, out)
}

#[cfg(test)]
mod tests;
