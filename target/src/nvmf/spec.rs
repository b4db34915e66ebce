//! NVMe base and NVMe over Fabrics structures: submission and completion
//! queue entries, status codes, SGL descriptors, opcodes, the Fabrics Connect
//! command and its data, Property Get/Set and the controller registers those
//! properties expose.
//!
//! Everything here is a plain value decoded from, or encoded to, a fixed-size
//! little-endian byte record. Decoding a 64-byte SQE or 16-byte CQE cannot
//! fail (every bit pattern is representable and kept, so encode(decode(x)) is
//! byte-exact); interpretation that *can* fail (an SGL the transport does not
//! support, a Connect with a malformed NQN) is a separate step that returns
//! the NVMe [`Status`] the controller should complete the command with, so the
//! caller never has to invent one.

use super::wire::{
    bytes, put_bytes, put_u16, put_u32, put_u64, put_u8, u16_at, u32_at, u64_at, u8_at,
};
use crate::units::{BlockSize, ByteLen, ByteOffset, Lba};
use std::fmt;

/// Size of a submission queue entry.
pub const SQE_LEN: usize = 64;
/// Size of a completion queue entry.
pub const CQE_LEN: usize = 16;
/// Size of a Fabrics Connect command's data.
pub const CONNECT_DATA_LEN: usize = 1024;
/// Width of an NQN field in Connect data, Identify and the discovery log.
pub const NQN_FIELD_LEN: usize = 256;
/// Longest NQN the spec allows (excluding the NUL terminator).
pub const NQN_MAX_LEN: usize = 223;
/// The well-known discovery subsystem NQN.
pub const DISCOVERY_NQN: &str = "nqn.2014-08.org.nvmexpress.discovery";

/// A command identifier (CID), chosen by the host per submission queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct CommandId(pub u16);

/// A namespace identifier.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct Nsid(pub u32);

impl Nsid {
    /// "All namespaces" (FFFFFFFFh).
    pub const BROADCAST: Nsid = Nsid(0xffff_ffff);
    /// Whether this is a valid ID for a single namespace (1..=FFFFFFFEh).
    pub fn is_single(self) -> bool {
        self.0 != 0 && self != Self::BROADCAST
    }
}

/// A controller identifier.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct CntlId(pub u16);

impl CntlId {
    /// In Connect data: "any controller" under the dynamic controller model.
    pub const DYNAMIC: CntlId = CntlId(0xffff);
}

/// A queue identifier (0 is the admin queue).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct QueueId(pub u16);

// ---------------------------------------------------------------------------
// Status
// ---------------------------------------------------------------------------

/// Status Code Type values.
pub mod sct {
    /// Generic command status.
    pub const GENERIC: u8 = 0;
    /// Command specific status.
    pub const COMMAND_SPECIFIC: u8 = 1;
    /// Media and data integrity errors.
    pub const MEDIA: u8 = 2;
    /// Path related status.
    pub const PATH: u8 = 3;
    /// Vendor specific.
    pub const VENDOR: u8 = 7;
}

/// The 15-bit status field of a completion (CQE DW3 bits 31:17), without the
/// phase tag.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Status {
    /// Status Code Type (3 bits).
    pub sct: u8,
    /// Status Code.
    pub sc: u8,
    /// Command Retry Delay selector (2 bits).
    pub crd: u8,
    /// More: extra information in the Error Information log.
    pub more: bool,
    /// Do Not Retry.
    pub dnr: bool,
}

macro_rules! status_consts {
    ($( $(#[$m:meta])* $name:ident = ($sct:expr, $sc:expr); )*) => {
        impl Status {
            $( $(#[$m])* pub const $name: Status = Status { sct: $sct, sc: $sc, crd: 0, more: false, dnr: false }; )*
        }
    };
}

status_consts! {
    /// Successful completion.
    SUCCESS = (sct::GENERIC, 0x00);
    /// Invalid command opcode.
    INVALID_OPCODE = (sct::GENERIC, 0x01);
    /// Invalid field in command.
    INVALID_FIELD = (sct::GENERIC, 0x02);
    /// Command ID conflict.
    COMMAND_ID_CONFLICT = (sct::GENERIC, 0x03);
    /// Data transfer error.
    DATA_TRANSFER_ERROR = (sct::GENERIC, 0x04);
    /// Commands aborted due to power loss notification.
    ABORTED_POWER_LOSS = (sct::GENERIC, 0x05);
    /// Internal error.
    INTERNAL_ERROR = (sct::GENERIC, 0x06);
    /// Command abort requested.
    ABORT_REQUESTED = (sct::GENERIC, 0x07);
    /// Command aborted due to SQ deletion.
    ABORTED_SQ_DELETION = (sct::GENERIC, 0x08);
    /// Invalid namespace or format.
    INVALID_NAMESPACE = (sct::GENERIC, 0x0b);
    /// Command sequence error.
    COMMAND_SEQUENCE_ERROR = (sct::GENERIC, 0x0c);
    /// Invalid SGL segment descriptor.
    INVALID_SGL_SEGMENT_DESCRIPTOR = (sct::GENERIC, 0x0d);
    /// Invalid number of SGL descriptors.
    INVALID_SGL_COUNT = (sct::GENERIC, 0x0e);
    /// Data SGL length invalid.
    DATA_SGL_LENGTH_INVALID = (sct::GENERIC, 0x0f);
    /// Metadata SGL length invalid.
    METADATA_SGL_LENGTH_INVALID = (sct::GENERIC, 0x10);
    /// SGL descriptor type invalid.
    SGL_DESCRIPTOR_TYPE_INVALID = (sct::GENERIC, 0x11);
    /// SGL offset invalid.
    SGL_OFFSET_INVALID = (sct::GENERIC, 0x16);
    /// Host identifier inconsistent format.
    HOST_ID_INCONSISTENT_FORMAT = (sct::GENERIC, 0x18);
    /// Keep alive timer expired.
    KEEP_ALIVE_EXPIRED = (sct::GENERIC, 0x19);
    /// Keep alive timeout invalid.
    KEEP_ALIVE_INVALID = (sct::GENERIC, 0x1a);
    /// Command aborted due to preempt and abort.
    ABORTED_PREEMPT = (sct::GENERIC, 0x1b);
    /// Namespace is write protected.
    NAMESPACE_WRITE_PROTECTED = (sct::GENERIC, 0x20);
    /// Command interrupted (retry).
    COMMAND_INTERRUPTED = (sct::GENERIC, 0x21);
    /// Transient transport error (e.g. an NVMe/TCP data digest mismatch).
    TRANSIENT_TRANSPORT_ERROR = (sct::GENERIC, 0x22);
    /// LBA out of range (NVM command set).
    LBA_OUT_OF_RANGE = (sct::GENERIC, 0x80);
    /// Capacity exceeded (NVM command set).
    CAPACITY_EXCEEDED = (sct::GENERIC, 0x81);
    /// Namespace not ready (NVM command set).
    NAMESPACE_NOT_READY = (sct::GENERIC, 0x82);
    /// Reservation conflict (NVM command set).
    RESERVATION_CONFLICT = (sct::GENERIC, 0x83);
    /// Invalid queue identifier.
    INVALID_QUEUE_ID = (sct::COMMAND_SPECIFIC, 0x01);
    /// Invalid queue size.
    INVALID_QUEUE_SIZE = (sct::COMMAND_SPECIFIC, 0x02);
    /// Abort command limit exceeded.
    ABORT_LIMIT_EXCEEDED = (sct::COMMAND_SPECIFIC, 0x03);
    /// Asynchronous event request limit exceeded.
    ASYNC_EVENT_LIMIT_EXCEEDED = (sct::COMMAND_SPECIFIC, 0x05);
    /// Invalid log page.
    INVALID_LOG_PAGE = (sct::COMMAND_SPECIFIC, 0x09);
    /// Feature identifier not saveable.
    FEATURE_NOT_SAVEABLE = (sct::COMMAND_SPECIFIC, 0x0d);
    /// Feature not changeable.
    FEATURE_NOT_CHANGEABLE = (sct::COMMAND_SPECIFIC, 0x0e);
    /// Connect: incompatible format (RECFMT).
    CONNECT_INCOMPATIBLE_FORMAT = (sct::COMMAND_SPECIFIC, 0x80);
    /// Connect: controller busy.
    CONNECT_CONTROLLER_BUSY = (sct::COMMAND_SPECIFIC, 0x81);
    /// Connect: invalid parameters (IPO/IATTR in DW0).
    CONNECT_INVALID_PARAMETERS = (sct::COMMAND_SPECIFIC, 0x82);
    /// Connect: restart discovery.
    CONNECT_RESTART_DISCOVERY = (sct::COMMAND_SPECIFIC, 0x83);
    /// Connect: invalid host.
    CONNECT_INVALID_HOST = (sct::COMMAND_SPECIFIC, 0x84);
    /// Get Log Page: discovery log changed, restart.
    DISCOVERY_RESTART = (sct::COMMAND_SPECIFIC, 0x90);
    /// Authentication required.
    AUTHENTICATION_REQUIRED = (sct::COMMAND_SPECIFIC, 0x91);
    /// Write fault.
    WRITE_FAULT = (sct::MEDIA, 0x80);
    /// Unrecovered read error.
    UNRECOVERED_READ_ERROR = (sct::MEDIA, 0x81);
    /// Compare failure.
    COMPARE_FAILURE = (sct::MEDIA, 0x85);
    /// Access denied.
    ACCESS_DENIED = (sct::MEDIA, 0x86);
    /// Internal path error.
    INTERNAL_PATH_ERROR = (sct::PATH, 0x00);
    /// Asymmetric access inaccessible.
    ANA_INACCESSIBLE = (sct::PATH, 0x02);
}

impl Status {
    /// The same status with Do Not Retry set.
    pub const fn with_dnr(self) -> Status {
        Status { dnr: true, ..self }
    }

    /// Whether this is successful completion.
    pub fn is_success(self) -> bool {
        self.sct == sct::GENERIC && self.sc == 0
    }

    /// The 16-bit CQE DW3 upper half with the given phase tag in bit 0.
    pub fn to_field(self, phase: bool) -> u16 {
        u16::from(phase)
            | (u16::from(self.sc) << 1)
            | (u16::from(self.sct & 0x7) << 9)
            | (u16::from(self.crd & 0x3) << 12)
            | (u16::from(self.more) << 14)
            | (u16::from(self.dnr) << 15)
    }

    /// Splits a 16-bit status field (with phase tag in bit 0).
    pub fn from_field(v: u16) -> (Status, bool) {
        let s = Status {
            sc: ((v >> 1) & 0xff) as u8,
            sct: ((v >> 9) & 0x7) as u8,
            crd: ((v >> 12) & 0x3) as u8,
            more: v & (1 << 14) != 0,
            dnr: v & (1 << 15) != 0,
        };
        (s, v & 1 != 0)
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sct {:#x} sc {:#04x}", self.sct, self.sc)?;
        if self.dnr {
            write!(f, " dnr")?;
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------
// Opcodes
// ---------------------------------------------------------------------------

macro_rules! u8_enum {
    ($(#[$m:meta])* $name:ident { $( $(#[$vm:meta])* $var:ident = $val:expr, )* }) => {
        $(#[$m])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        #[repr(u8)]
        pub enum $name { $( $(#[$vm])* $var = $val, )* }
        impl $name {
            /// Decodes a raw value; `None` for values this layer does not know.
            pub fn from_u8(v: u8) -> Option<Self> {
                match v { $( $val => Some(Self::$var), )* _ => None }
            }
            /// The raw value.
            pub fn as_u8(self) -> u8 { self as u8 }
        }
    };
}

u8_enum! {
    /// Admin command set opcodes a fabrics target sees.
    AdminOpcode {
        /// Get Log Page.
        GetLogPage = 0x02,
        /// Identify.
        Identify = 0x06,
        /// Abort.
        Abort = 0x08,
        /// Set Features.
        SetFeatures = 0x09,
        /// Get Features.
        GetFeatures = 0x0a,
        /// Asynchronous Event Request.
        AsyncEventRequest = 0x0c,
        /// Keep Alive.
        KeepAlive = 0x18,
        /// Fabrics command (see [`FabricsCommandType`]).
        Fabrics = 0x7f,
    }
}

u8_enum! {
    /// NVM command set I/O opcodes.
    NvmOpcode {
        /// Flush.
        Flush = 0x00,
        /// Write.
        Write = 0x01,
        /// Read.
        Read = 0x02,
        /// Write Uncorrectable.
        WriteUncorrectable = 0x04,
        /// Compare.
        Compare = 0x05,
        /// Write Zeroes.
        WriteZeroes = 0x08,
        /// Dataset Management (deallocate / TRIM).
        DatasetManagement = 0x09,
        /// Verify.
        Verify = 0x0c,
        /// Fabrics command (allowed on I/O queues, e.g. Connect is not; Property is not).
        Fabrics = 0x7f,
    }
}

u8_enum! {
    /// Fabrics command types (FCTYPE, SQE byte 4) of opcode 7Fh.
    FabricsCommandType {
        /// Property Set.
        PropertySet = 0x00,
        /// Connect.
        Connect = 0x01,
        /// Property Get.
        PropertyGet = 0x04,
        /// Authentication Send.
        AuthenticationSend = 0x05,
        /// Authentication Receive.
        AuthenticationReceive = 0x06,
        /// Disconnect.
        Disconnect = 0x08,
    }
}

/// The fabrics opcode.
pub const OPC_FABRICS: u8 = 0x7f;

/// Data transfer direction encoded in an opcode's (or FCTYPE's) low two bits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DataDirection {
    /// No data.
    None,
    /// Host to controller (write-like).
    HostToController,
    /// Controller to host (read-like).
    ControllerToHost,
    /// Both directions.
    Bidirectional,
}

impl DataDirection {
    /// From an opcode or FCTYPE: bits 1:0.
    pub fn from_opcode(op: u8) -> DataDirection {
        match op & 0x3 {
            0 => DataDirection::None,
            1 => DataDirection::HostToController,
            2 => DataDirection::ControllerToHost,
            _ => DataDirection::Bidirectional,
        }
    }
}

// ---------------------------------------------------------------------------
// SGL
// ---------------------------------------------------------------------------

/// SGL descriptor types (byte 15 bits 7:4).
pub mod sgl_type {
    /// SGL Data Block.
    pub const DATA_BLOCK: u8 = 0x0;
    /// SGL Bit Bucket.
    pub const BIT_BUCKET: u8 = 0x1;
    /// SGL Segment.
    pub const SEGMENT: u8 = 0x2;
    /// SGL Last Segment.
    pub const LAST_SEGMENT: u8 = 0x3;
    /// Keyed SGL Data Block (RDMA).
    pub const KEYED_DATA_BLOCK: u8 = 0x4;
    /// Transport SGL Data Block.
    pub const TRANSPORT_DATA_BLOCK: u8 = 0x5;
}

/// SGL descriptor subtypes (byte 15 bits 3:0).
pub mod sgl_subtype {
    /// Address field is an address.
    pub const ADDRESS: u8 = 0x0;
    /// Address field is an offset (in-capsule data).
    pub const OFFSET: u8 = 0x1;
    /// Transport specific; NVMe/TCP uses Ah for its transport data block.
    pub const TRANSPORT_A: u8 = 0xa;
}

/// The data SGL (SGL1 in DPTR) forms an NVMe/TCP controller accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DataSgl {
    /// Data Block, Offset subtype: data follows the SQE inside the capsule at
    /// `offset` (relative to the end of the SQE; must be within ICDOFF rules).
    InCapsule {
        /// Offset into the in-capsule data area.
        offset: u64,
        /// Length in bytes.
        len: u32,
    },
    /// Transport SGL Data Block: data moves in H2CData (after R2T) or C2HData
    /// PDUs. A zero length means the command has no data.
    Transport {
        /// Length in bytes.
        len: u32,
    },
}

impl DataSgl {
    /// The data length the descriptor describes.
    pub fn len(self) -> u32 {
        match self {
            DataSgl::InCapsule { len, .. } | DataSgl::Transport { len } => len,
        }
    }

    /// Whether the descriptor describes no data.
    pub fn is_empty(self) -> bool {
        self.len() == 0
    }

    /// Encodes the 16-byte descriptor.
    pub fn encode(self) -> [u8; 16] {
        let mut b = [0u8; 16];
        match self {
            DataSgl::InCapsule { offset, len } => {
                put_u64(&mut b, 0, offset);
                put_u32(&mut b, 8, len);
                put_u8(
                    &mut b,
                    15,
                    (sgl_type::DATA_BLOCK << 4) | sgl_subtype::OFFSET,
                );
            }
            DataSgl::Transport { len } => {
                put_u32(&mut b, 8, len);
                put_u8(
                    &mut b,
                    15,
                    (sgl_type::TRANSPORT_DATA_BLOCK << 4) | sgl_subtype::TRANSPORT_A,
                );
            }
        }
        b
    }

    /// Decodes SGL1. Only the forms Linux nvme-tcp sends are accepted.
    pub fn decode(raw: &[u8; 16]) -> Result<DataSgl, SglError> {
        let id = u8_at(raw, 15);
        let (ty, sub) = (id >> 4, id & 0xf);
        match (ty, sub) {
            (sgl_type::DATA_BLOCK, sgl_subtype::OFFSET) => Ok(DataSgl::InCapsule {
                offset: u64_at(raw, 0),
                len: u32_at(raw, 8),
            }),
            (sgl_type::TRANSPORT_DATA_BLOCK, sgl_subtype::TRANSPORT_A) => Ok(DataSgl::Transport {
                len: u32_at(raw, 8),
            }),
            (sgl_type::KEYED_DATA_BLOCK, _) => Err(SglError::Keyed),
            _ => Err(SglError::Unsupported { ty, subtype: sub }),
        }
    }
}

/// Why an SGL descriptor was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SglError {
    /// PSDT says PRPs; fabrics commands must use SGLs.
    #[error("PSDT selects PRPs, fabrics require SGLs")]
    PrpNotAllowed,
    /// Keyed SGL data blocks belong to RDMA.
    #[error("keyed SGL data block not supported on TCP")]
    Keyed,
    /// Any other type/subtype.
    #[error("SGL type {ty:#x} subtype {subtype:#x} not supported")]
    Unsupported {
        /// Descriptor type.
        ty: u8,
        /// Descriptor subtype.
        subtype: u8,
    },
}

impl SglError {
    /// The status to complete the command with.
    pub fn status(self) -> Status {
        match self {
            SglError::PrpNotAllowed => Status::INVALID_FIELD.with_dnr(),
            SglError::Keyed | SglError::Unsupported { .. } => {
                Status::SGL_DESCRIPTOR_TYPE_INVALID.with_dnr()
            }
        }
    }
}

// ---------------------------------------------------------------------------
// SQE / CQE
// ---------------------------------------------------------------------------

/// Fused operation field (SQE byte 1 bits 1:0).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Fuse {
    /// Normal operation.
    Normal,
    /// First command of a fused pair.
    First,
    /// Second command of a fused pair.
    Second,
    /// Reserved value 11b.
    Reserved,
}

/// A 64-byte submission queue entry. All bits are kept, so encoding a decoded
/// entry reproduces the input exactly.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Sqe {
    /// Opcode (byte 0).
    pub opcode: u8,
    /// Byte 1: FUSE (1:0), reserved (5:2), PSDT (7:6).
    pub flags: u8,
    /// Command identifier (bytes 3:2).
    pub cid: CommandId,
    /// Namespace ID (bytes 7:4); for fabrics commands byte 4 is FCTYPE.
    pub nsid: Nsid,
    /// Command dword 2.
    pub cdw2: u32,
    /// Command dword 3.
    pub cdw3: u32,
    /// Metadata pointer (bytes 23:16).
    pub mptr: u64,
    /// Data pointer (bytes 39:24), an SGL descriptor on fabrics.
    pub dptr: [u8; 16],
    /// Command dwords 10 through 15.
    pub cdw: [u32; 6],
}

/// PSDT value 01b: SGLs, metadata pointer is a contiguous buffer (what Linux sends).
pub const PSDT_SGL_MPTR_CONTIGUOUS: u8 = 1;
/// PSDT value 10b: SGLs, metadata pointer is an SGL.
pub const PSDT_SGL_MPTR_SGL: u8 = 2;

impl Sqe {
    /// Decodes the first 64 bytes. `None` if `b` is shorter.
    pub fn decode(b: &[u8]) -> Option<Sqe> {
        let raw: [u8; SQE_LEN] = bytes(b, 0)?;
        let raw = &raw[..];
        Some(Sqe {
            opcode: u8_at(raw, 0),
            flags: u8_at(raw, 1),
            cid: CommandId(u16_at(raw, 2)),
            nsid: Nsid(u32_at(raw, 4)),
            cdw2: u32_at(raw, 8),
            cdw3: u32_at(raw, 12),
            mptr: u64_at(raw, 16),
            dptr: bytes(raw, 24).unwrap_or([0; 16]),
            cdw: [
                u32_at(raw, 40),
                u32_at(raw, 44),
                u32_at(raw, 48),
                u32_at(raw, 52),
                u32_at(raw, 56),
                u32_at(raw, 60),
            ],
        })
    }

    /// Encodes the 64-byte entry.
    pub fn encode(&self) -> [u8; SQE_LEN] {
        let mut b = [0u8; SQE_LEN];
        put_u8(&mut b, 0, self.opcode);
        put_u8(&mut b, 1, self.flags);
        put_u16(&mut b, 2, self.cid.0);
        put_u32(&mut b, 4, self.nsid.0);
        put_u32(&mut b, 8, self.cdw2);
        put_u32(&mut b, 12, self.cdw3);
        put_u64(&mut b, 16, self.mptr);
        put_bytes(&mut b, 24, &self.dptr);
        for (i, v) in self.cdw.iter().enumerate() {
            put_u32(&mut b, 40 + 4 * i, *v);
        }
        b
    }

    /// A new entry with PSDT set for SGLs and the given data SGL.
    pub fn new(opcode: u8, cid: CommandId, nsid: Nsid, sgl: DataSgl) -> Sqe {
        Sqe {
            opcode,
            flags: PSDT_SGL_MPTR_CONTIGUOUS << 6,
            cid,
            nsid,
            dptr: sgl.encode(),
            ..Sqe::default()
        }
    }

    /// Command dword 10 + `i` (i in 0..6); 0 outside.
    pub fn cdw10_plus(&self, i: usize) -> u32 {
        self.cdw.get(i).copied().unwrap_or(0)
    }

    /// Fused operation.
    pub fn fuse(&self) -> Fuse {
        match self.flags & 0x3 {
            0 => Fuse::Normal,
            1 => Fuse::First,
            2 => Fuse::Second,
            _ => Fuse::Reserved,
        }
    }

    /// PRP or SGL for Data Transfer (2 bits).
    pub fn psdt(&self) -> u8 {
        self.flags >> 6
    }

    /// For opcode 7Fh: the fabrics command type (byte 4).
    pub fn fctype(&self) -> u8 {
        (self.nsid.0 & 0xff) as u8
    }

    /// Whether this is a fabrics command.
    pub fn is_fabrics(&self) -> bool {
        self.opcode == OPC_FABRICS
    }

    /// The data transfer direction (from FCTYPE for fabrics commands).
    pub fn data_direction(&self) -> DataDirection {
        if self.is_fabrics() {
            DataDirection::from_opcode(self.fctype())
        } else {
            DataDirection::from_opcode(self.opcode)
        }
    }

    /// Interprets DPTR as SGL1, checking PSDT selects SGLs.
    pub fn data_sgl(&self) -> Result<DataSgl, SglError> {
        // Fabrics commands ignore PSDT (their layout has no such field use);
        // for other commands PSDT 00b means PRPs which fabrics forbid.
        if !self.is_fabrics() && self.psdt() == 0 {
            return Err(SglError::PrpNotAllowed);
        }
        DataSgl::decode(&self.dptr)
    }
}

/// A 16-byte completion queue entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Cqe {
    /// Command specific dword 0.
    pub dw0: u32,
    /// Command specific dword 1.
    pub dw1: u32,
    /// SQ head pointer.
    pub sqhd: u16,
    /// SQ identifier.
    pub sqid: u16,
    /// Command identifier.
    pub cid: CommandId,
    /// Status field.
    pub status: Status,
    /// Phase tag (unused on fabrics, kept for exact round trips).
    pub phase: bool,
}

impl Cqe {
    /// A completion for `cid` with `status` and all else zero.
    pub fn new(cid: CommandId, status: Status) -> Cqe {
        Cqe {
            cid,
            status,
            ..Cqe::default()
        }
    }

    /// Decodes the first 16 bytes; `None` if `b` is shorter.
    pub fn decode(b: &[u8]) -> Option<Cqe> {
        let raw: [u8; CQE_LEN] = bytes(b, 0)?;
        let raw = &raw[..];
        let (status, phase) = Status::from_field(u16_at(raw, 14));
        Some(Cqe {
            dw0: u32_at(raw, 0),
            dw1: u32_at(raw, 4),
            sqhd: u16_at(raw, 8),
            sqid: u16_at(raw, 10),
            cid: CommandId(u16_at(raw, 12)),
            status,
            phase,
        })
    }

    /// Encodes the 16-byte entry.
    pub fn encode(&self) -> [u8; CQE_LEN] {
        let mut b = [0u8; CQE_LEN];
        put_u32(&mut b, 0, self.dw0);
        put_u32(&mut b, 4, self.dw1);
        put_u16(&mut b, 8, self.sqhd);
        put_u16(&mut b, 10, self.sqid);
        put_u16(&mut b, 12, self.cid.0);
        put_u16(&mut b, 14, self.status.to_field(self.phase));
        b
    }
}

// ---------------------------------------------------------------------------
// Fabrics: Connect
// ---------------------------------------------------------------------------

/// Why a fabrics command could not be interpreted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum FabricsError {
    /// Not opcode 7Fh with the expected FCTYPE.
    #[error("not a fabrics {expected:?} command")]
    WrongCommand {
        /// The command type that was expected.
        expected: FabricsCommandType,
    },
    /// RECFMT is not 0.
    #[error("connect record format {0} not supported")]
    IncompatibleFormat(u16),
    /// A Connect parameter is invalid; report IPO/IATTR.
    #[error("connect parameter invalid at {} offset {offset}", if *.in_data { "data" } else { "command" })]
    InvalidParameter {
        /// Byte offset of the parameter, in the SQE or in the Connect data.
        offset: u16,
        /// Whether `offset` refers to the Connect data (IATTR bit 0).
        in_data: bool,
    },
    /// Property Get/Set with a reserved size or unknown offset.
    #[error("invalid property access")]
    InvalidProperty,
}

impl FabricsError {
    /// The completion (status and DW0) to answer the command with.
    pub fn completion(self, cid: CommandId) -> Cqe {
        match self {
            FabricsError::WrongCommand { .. } => Cqe::new(cid, Status::INVALID_OPCODE.with_dnr()),
            FabricsError::IncompatibleFormat(_) => {
                Cqe::new(cid, Status::CONNECT_INCOMPATIBLE_FORMAT.with_dnr())
            }
            FabricsError::InvalidParameter { offset, in_data } => Cqe {
                dw0: connect_invalid_param_dw0(offset, in_data),
                ..Cqe::new(cid, Status::CONNECT_INVALID_PARAMETERS.with_dnr())
            },
            FabricsError::InvalidProperty => Cqe::new(cid, Status::INVALID_FIELD.with_dnr()),
        }
    }
}

/// DW0 of a Connect response with "Connect Invalid Parameters": IPO in bits
/// 15:0, IATTR bit 0 in bits 23:16 (1 = offset is into the Connect data).
pub fn connect_invalid_param_dw0(offset: u16, in_data: bool) -> u32 {
    u32::from(offset) | (u32::from(in_data) << 16)
}

/// DW0 of a successful Connect response: CNTLID in bits 15:0, AUTHREQ 31:16.
pub fn connect_success_dw0(cntlid: CntlId, authreq: u16) -> u32 {
    u32::from(cntlid.0) | (u32::from(authreq) << 16)
}

/// SQE byte offsets of Connect command fields.
pub mod connect_off {
    /// Record format.
    pub const RECFMT: u16 = 40;
    /// Queue ID.
    pub const QID: u16 = 42;
    /// Submission queue size (0's based).
    pub const SQSIZE: u16 = 44;
    /// Connect attributes.
    pub const CATTR: u16 = 46;
    /// Keep alive timeout (ms).
    pub const KATO: u16 = 48;
}

/// Connect data byte offsets.
pub mod connect_data_off {
    /// Host identifier (16 bytes).
    pub const HOSTID: u16 = 0;
    /// Controller ID.
    pub const CNTLID: u16 = 16;
    /// Subsystem NQN (256 bytes).
    pub const SUBNQN: u16 = 256;
    /// Host NQN (256 bytes).
    pub const HOSTNQN: u16 = 512;
}

/// A Fabrics Connect command (the SQE part).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ConnectCommand {
    /// Command identifier.
    pub cid: CommandId,
    /// Record format; must be 0.
    pub recfmt: u16,
    /// Queue to create (0 = admin).
    pub qid: QueueId,
    /// Submission queue size, 0's based.
    pub sqsize: u16,
    /// Connect attributes (bit 2: SQ flow control disable).
    pub cattr: u8,
    /// Keep alive timeout in milliseconds (admin queue).
    pub kato: u32,
    /// The data SGL (describing the 1024 bytes of Connect data).
    pub sgl: DataSgl,
}

impl ConnectCommand {
    /// Interprets an SQE as Connect.
    pub fn from_sqe(sqe: &Sqe) -> Result<ConnectCommand, FabricsError> {
        if !sqe.is_fabrics() || sqe.fctype() != FabricsCommandType::Connect.as_u8() {
            return Err(FabricsError::WrongCommand {
                expected: FabricsCommandType::Connect,
            });
        }
        let raw = sqe.encode();
        let raw = &raw[..];
        let recfmt = u16_at(raw, connect_off::RECFMT.into());
        if recfmt != 0 {
            return Err(FabricsError::IncompatibleFormat(recfmt));
        }
        let sgl = DataSgl::decode(&sqe.dptr).map_err(|_| FabricsError::InvalidParameter {
            offset: 24,
            in_data: false,
        })?;
        if sgl.len() as usize != CONNECT_DATA_LEN {
            return Err(FabricsError::InvalidParameter {
                offset: 24,
                in_data: false,
            });
        }
        Ok(ConnectCommand {
            cid: sqe.cid,
            recfmt,
            qid: QueueId(u16_at(raw, connect_off::QID.into())),
            sqsize: u16_at(raw, connect_off::SQSIZE.into()),
            cattr: u8_at(raw, connect_off::CATTR.into()),
            kato: u32_at(raw, connect_off::KATO.into()),
            sgl,
        })
    }

    /// Builds the SQE.
    pub fn to_sqe(&self) -> Sqe {
        let mut raw = [0u8; SQE_LEN];
        put_u8(&mut raw, 0, OPC_FABRICS);
        put_u16(&mut raw, 2, self.cid.0);
        put_u8(&mut raw, 4, FabricsCommandType::Connect.as_u8());
        put_bytes(&mut raw, 24, &self.sgl.encode());
        put_u16(&mut raw, connect_off::RECFMT.into(), self.recfmt);
        put_u16(&mut raw, connect_off::QID.into(), self.qid.0);
        put_u16(&mut raw, connect_off::SQSIZE.into(), self.sqsize);
        put_u8(&mut raw, connect_off::CATTR.into(), self.cattr);
        put_u32(&mut raw, connect_off::KATO.into(), self.kato);
        Sqe::decode(&raw).unwrap_or_default()
    }
}

/// A validated NVMe Qualified Name: 1..=223 printable ASCII bytes.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Nqn(String);

/// Why an NQN field is invalid.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum NqnError {
    /// Empty.
    #[error("NQN is empty")]
    Empty,
    /// No NUL terminator within the field.
    #[error("NQN is not NUL terminated")]
    NotTerminated,
    /// Longer than 223 bytes.
    #[error("NQN longer than 223 bytes")]
    TooLong,
    /// A byte outside printable ASCII.
    #[error("NQN contains a non-printable or non-ASCII byte")]
    BadChar,
}

impl Nqn {
    /// Validates a string as an NQN.
    pub fn new(s: &str) -> Result<Nqn, NqnError> {
        if s.is_empty() {
            return Err(NqnError::Empty);
        }
        if s.len() > NQN_MAX_LEN {
            return Err(NqnError::TooLong);
        }
        if !s.bytes().all(|c| (0x20..=0x7e).contains(&c)) {
            return Err(NqnError::BadChar);
        }
        Ok(Nqn(s.to_owned()))
    }

    /// Parses a fixed-width, NUL-terminated field.
    pub fn from_field(field: &[u8]) -> Result<Nqn, NqnError> {
        let end = field
            .iter()
            .position(|&c| c == 0)
            .ok_or(NqnError::NotTerminated)?;
        let text = field.get(..end).ok_or(NqnError::NotTerminated)?;
        let s = std::str::from_utf8(text).map_err(|_| NqnError::BadChar)?;
        Nqn::new(s)
    }

    /// The NQN text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Nqn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The 1024-byte data of a Connect command.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ConnectData {
    /// Host identifier.
    pub hostid: [u8; 16],
    /// Requested controller (FFFFh = any, for the admin queue).
    pub cntlid: CntlId,
    /// Subsystem the host connects to.
    pub subnqn: Nqn,
    /// The host's NQN.
    pub hostnqn: Nqn,
}

impl ConnectData {
    /// Decodes and validates Connect data. Errors carry the byte offset to
    /// report in the Connect Invalid Parameters response.
    pub fn decode(b: &[u8]) -> Result<ConnectData, FabricsError> {
        let bad = |offset: u16| FabricsError::InvalidParameter {
            offset,
            in_data: true,
        };
        if b.len() < CONNECT_DATA_LEN {
            return Err(FabricsError::InvalidParameter {
                offset: 24,
                in_data: false,
            });
        }
        let hostid: [u8; 16] = bytes(b, 0).ok_or(bad(connect_data_off::HOSTID))?;
        let field = |off: u16| b.get(usize::from(off)..usize::from(off) + NQN_FIELD_LEN);
        let subnqn = field(connect_data_off::SUBNQN)
            .and_then(|f| Nqn::from_field(f).ok())
            .ok_or(bad(connect_data_off::SUBNQN))?;
        let hostnqn = field(connect_data_off::HOSTNQN)
            .and_then(|f| Nqn::from_field(f).ok())
            .ok_or(bad(connect_data_off::HOSTNQN))?;
        Ok(ConnectData {
            hostid,
            cntlid: CntlId(u16_at(b, connect_data_off::CNTLID.into())),
            subnqn,
            hostnqn,
        })
    }

    /// Encodes the 1024 bytes.
    pub fn encode(&self) -> [u8; CONNECT_DATA_LEN] {
        let mut b = [0u8; CONNECT_DATA_LEN];
        put_bytes(&mut b, 0, &self.hostid);
        put_u16(&mut b, connect_data_off::CNTLID.into(), self.cntlid.0);
        super::wire::put_ascii_nul_padded(
            &mut b,
            connect_data_off::SUBNQN.into(),
            NQN_FIELD_LEN,
            self.subnqn.as_str(),
        );
        super::wire::put_ascii_nul_padded(
            &mut b,
            connect_data_off::HOSTNQN.into(),
            NQN_FIELD_LEN,
            self.hostnqn.as_str(),
        );
        b
    }
}

// ---------------------------------------------------------------------------
// Fabrics: Property Get / Set and controller registers
// ---------------------------------------------------------------------------

/// Controller properties (register offsets) a fabrics host reads and writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Property {
    /// Controller Capabilities (8 bytes).
    Cap,
    /// Version (4 bytes).
    Vs,
    /// Controller Configuration (4 bytes).
    Cc,
    /// Controller Status (4 bytes).
    Csts,
    /// NVM Subsystem Reset (4 bytes).
    Nssr,
}

impl Property {
    /// Register offset.
    pub fn offset(self) -> u32 {
        match self {
            Property::Cap => 0x00,
            Property::Vs => 0x08,
            Property::Cc => 0x14,
            Property::Csts => 0x1c,
            Property::Nssr => 0x20,
        }
    }

    /// From a register offset.
    pub fn from_offset(off: u32) -> Option<Property> {
        match off {
            0x00 => Some(Property::Cap),
            0x08 => Some(Property::Vs),
            0x14 => Some(Property::Cc),
            0x1c => Some(Property::Csts),
            0x20 => Some(Property::Nssr),
            _ => None,
        }
    }

    /// Whether the property is 8 bytes wide.
    pub fn is_8_bytes(self) -> bool {
        matches!(self, Property::Cap)
    }
}

/// A Property Get (`value` is `None`) or Property Set command.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PropertyCommand {
    /// Command identifier.
    pub cid: CommandId,
    /// ATTRIB.SIZE: true for 8 bytes, false for 4.
    pub size8: bool,
    /// Register offset (OFST).
    pub offset: u32,
    /// Value to set (Property Set only).
    pub value: Option<u64>,
}

impl PropertyCommand {
    const ATTRIB: usize = 40;
    const OFST: usize = 44;
    const VALUE: usize = 48;

    /// Interprets a Property Get or Set SQE.
    pub fn from_sqe(sqe: &Sqe) -> Result<PropertyCommand, FabricsError> {
        let set = sqe.fctype() == FabricsCommandType::PropertySet.as_u8();
        let get = sqe.fctype() == FabricsCommandType::PropertyGet.as_u8();
        if !sqe.is_fabrics() || !(set || get) {
            return Err(FabricsError::WrongCommand {
                expected: FabricsCommandType::PropertyGet,
            });
        }
        let raw = sqe.encode();
        let raw = &raw[..];
        let size8 = match u8_at(raw, Self::ATTRIB) & 0x7 {
            0 => false,
            1 => true,
            _ => return Err(FabricsError::InvalidProperty),
        };
        Ok(PropertyCommand {
            cid: sqe.cid,
            size8,
            offset: u32_at(raw, Self::OFST),
            value: set.then(|| u64_at(raw, Self::VALUE)),
        })
    }

    /// The known property addressed, checking the access width.
    pub fn property(&self) -> Result<Property, FabricsError> {
        let p = Property::from_offset(self.offset).ok_or(FabricsError::InvalidProperty)?;
        if p.is_8_bytes() != self.size8 {
            return Err(FabricsError::InvalidProperty);
        }
        Ok(p)
    }

    /// Builds the SQE.
    pub fn to_sqe(&self) -> Sqe {
        let mut raw = [0u8; SQE_LEN];
        put_u8(&mut raw, 0, OPC_FABRICS);
        put_u16(&mut raw, 2, self.cid.0);
        let fct = if self.value.is_some() {
            FabricsCommandType::PropertySet
        } else {
            FabricsCommandType::PropertyGet
        };
        put_u8(&mut raw, 4, fct.as_u8());
        // No data: a null transport SGL, as Linux sends.
        put_bytes(&mut raw, 24, &DataSgl::Transport { len: 0 }.encode());
        put_u8(&mut raw, Self::ATTRIB, u8::from(self.size8));
        put_u32(&mut raw, Self::OFST, self.offset);
        if let Some(v) = self.value {
            put_u64(&mut raw, Self::VALUE, v);
        }
        Sqe::decode(&raw).unwrap_or_default()
    }
}

/// The completion for a successful Property Get: value in DW0/DW1.
pub fn property_get_completion(cid: CommandId, value: u64) -> Cqe {
    Cqe {
        dw0: value as u32,
        dw1: (value >> 32) as u32,
        ..Cqe::new(cid, Status::SUCCESS)
    }
}

/// Controller Capabilities fields a fabrics target reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Cap {
    /// Maximum queue entries supported, 0's based.
    pub mqes: u16,
    /// Contiguous queues required (always true on fabrics).
    pub cqr: bool,
    /// Timeout in 500 ms units for CSTS.RDY transitions.
    pub to: u8,
    /// NVM subsystem reset supported.
    pub nssrs: bool,
    /// Command sets supported (bit 0: NVM command set).
    pub css: u8,
    /// Memory page size minimum (2^(12+n)).
    pub mpsmin: u8,
    /// Memory page size maximum (2^(12+n)).
    pub mpsmax: u8,
}

impl Cap {
    /// The 64-bit register value.
    pub fn to_u64(self) -> u64 {
        u64::from(self.mqes)
            | (u64::from(self.cqr) << 16)
            | (u64::from(self.to) << 24)
            | (u64::from(self.nssrs) << 36)
            | (u64::from(self.css) << 37)
            | (u64::from(self.mpsmin & 0xf) << 48)
            | (u64::from(self.mpsmax & 0xf) << 52)
    }

    /// Parses the register value (fields listed here only).
    pub fn from_u64(v: u64) -> Cap {
        Cap {
            mqes: (v & 0xffff) as u16,
            cqr: v & (1 << 16) != 0,
            to: ((v >> 24) & 0xff) as u8,
            nssrs: v & (1 << 36) != 0,
            css: ((v >> 37) & 0xff) as u8,
            mpsmin: ((v >> 48) & 0xf) as u8,
            mpsmax: ((v >> 52) & 0xf) as u8,
        }
    }
}

/// The Version register value for major.minor.tertiary.
pub const fn version(major: u16, minor: u8, tertiary: u8) -> u32 {
    ((major as u32) << 16) | ((minor as u32) << 8) | tertiary as u32
}

/// Shutdown notification (CC.SHN) / shutdown status (CSTS.SHST) values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Shutdown {
    /// No notification / normal operation.
    None,
    /// Normal shutdown / shutdown processing occurring.
    Normal,
    /// Abrupt shutdown / shutdown processing complete.
    Abrupt,
    /// Reserved.
    Reserved,
}

impl Shutdown {
    fn from_bits(v: u32) -> Shutdown {
        match v & 0x3 {
            0 => Shutdown::None,
            1 => Shutdown::Normal,
            2 => Shutdown::Abrupt,
            _ => Shutdown::Reserved,
        }
    }
}

/// Controller Configuration register.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Cc(pub u32);

impl Cc {
    /// Enable.
    pub fn en(self) -> bool {
        self.0 & 1 != 0
    }
    /// I/O command set selected (bits 6:4).
    pub fn css(self) -> u8 {
        ((self.0 >> 4) & 0x7) as u8
    }
    /// Memory page size (bits 10:7): 2^(12+MPS).
    pub fn mps(self) -> u8 {
        ((self.0 >> 7) & 0xf) as u8
    }
    /// Arbitration mechanism (bits 13:11).
    pub fn ams(self) -> u8 {
        ((self.0 >> 11) & 0x7) as u8
    }
    /// Shutdown notification (bits 15:14).
    pub fn shn(self) -> Shutdown {
        Shutdown::from_bits(self.0 >> 14)
    }
    /// I/O submission queue entry size, log2 (bits 19:16).
    pub fn iosqes(self) -> u8 {
        ((self.0 >> 16) & 0xf) as u8
    }
    /// I/O completion queue entry size, log2 (bits 23:20).
    pub fn iocqes(self) -> u8 {
        ((self.0 >> 20) & 0xf) as u8
    }
}

/// Controller Status register.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Csts(pub u32);

impl Csts {
    /// Builds CSTS from its fields.
    pub fn new(rdy: bool, cfs: bool, shst: Shutdown) -> Csts {
        let sh = match shst {
            Shutdown::None => 0,
            Shutdown::Normal => 1,
            Shutdown::Abrupt => 2,
            Shutdown::Reserved => 3,
        };
        Csts(u32::from(rdy) | (u32::from(cfs) << 1) | (sh << 2))
    }
    /// Ready.
    pub fn rdy(self) -> bool {
        self.0 & 1 != 0
    }
    /// Controller fatal status.
    pub fn cfs(self) -> bool {
        self.0 & 2 != 0
    }
    /// Shutdown status (bits 3:2).
    pub fn shst(self) -> Shutdown {
        Shutdown::from_bits(self.0 >> 2)
    }
    /// NVM subsystem reset occurred (bit 4).
    pub fn nssro(self) -> bool {
        self.0 & (1 << 4) != 0
    }
    /// Processing paused (bit 5).
    pub fn pp(self) -> bool {
        self.0 & (1 << 5) != 0
    }
}

/// The "NVMe" value written to NSSR to request a subsystem reset.
pub const NSSR_RESET_VALUE: u32 = 0x4E56_4D65;

// ---------------------------------------------------------------------------
// NVM I/O commands
// ---------------------------------------------------------------------------

/// Read, Write, Compare or Write Zeroes: the LBA range and flags.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct RwCommand {
    /// Starting LBA (CDW10-11).
    pub slba: Lba,
    /// Number of logical blocks, 1..=65536 (CDW12 15:0 is 0's based).
    pub nlb: u32,
    /// Force unit access (CDW12 bit 30).
    pub fua: bool,
    /// Write Zeroes: deallocate (CDW12 bit 25).
    pub deac: bool,
}

impl RwCommand {
    /// Reads the range fields of an NVM I/O SQE.
    pub fn from_sqe(sqe: &Sqe) -> RwCommand {
        let cdw12 = sqe.cdw10_plus(2);
        RwCommand {
            slba: Lba(u64::from(sqe.cdw10_plus(0)) | (u64::from(sqe.cdw10_plus(1)) << 32)),
            nlb: (cdw12 & 0xffff) + 1,
            fua: cdw12 & (1 << 30) != 0,
            deac: cdw12 & (1 << 25) != 0,
        }
    }

    /// Writes the range fields into an SQE. `nlb` must be 1..=65536.
    pub fn fill_sqe(&self, sqe: &mut Sqe) {
        sqe.cdw[0] = self.slba.0 as u32;
        sqe.cdw[1] = (self.slba.0 >> 32) as u32;
        sqe.cdw[2] = (self.nlb.saturating_sub(1) & 0xffff)
            | (u32::from(self.fua) << 30)
            | (u32::from(self.deac) << 25);
    }

    /// Checks the range lies within a namespace of `nsze` blocks.
    pub fn check_range(&self, nsze: u64) -> Result<(), Status> {
        match self.slba.0.checked_add(u64::from(self.nlb)) {
            Some(end) if end <= nsze => Ok(()),
            _ => Err(Status::LBA_OUT_OF_RANGE.with_dnr()),
        }
    }

    /// Byte offset of the first block.
    pub fn offset(&self, bs: BlockSize) -> Option<ByteOffset> {
        bs.offset_of(self.slba)
    }

    /// Bytes the command transfers (Read/Write/Compare).
    pub fn byte_len(&self, bs: BlockSize) -> Option<ByteLen> {
        bs.len_of(u64::from(self.nlb))
    }

    /// Checks the data SGL describes exactly the blocks addressed; a
    /// mismatch completes with Data SGL Length Invalid.
    pub fn check_transfer(&self, bs: BlockSize, sgl: DataSgl) -> Result<(), Status> {
        match self.byte_len(bs) {
            Some(ByteLen(n)) if n == u64::from(sgl.len()) => Ok(()),
            _ => Err(Status::DATA_SGL_LENGTH_INVALID.with_dnr()),
        }
    }
}

/// Feature identifiers (Get/Set Features CDW10 7:0) a fabrics target sees.
pub mod fid {
    /// Arbitration.
    pub const ARBITRATION: u8 = 0x01;
    /// Volatile write cache.
    pub const VOLATILE_WRITE_CACHE: u8 = 0x06;
    /// Number of queues.
    pub const NUMBER_OF_QUEUES: u8 = 0x07;
    /// Asynchronous event configuration.
    pub const ASYNC_EVENT_CONFIG: u8 = 0x0b;
    /// Keep alive timer.
    pub const KEEP_ALIVE_TIMER: u8 = 0x0f;
    /// Host identifier.
    pub const HOST_ID: u8 = 0x81;
}

/// Completion DW0 for Number of Queues: allocated I/O SQs and CQs, both 0's
/// based, in bits 15:0 and 31:16.
pub fn number_of_queues_dw0(io_queues: u16) -> u32 {
    let n = u32::from(io_queues.saturating_sub(1));
    n | (n << 16)
}

/// Size of one Dataset Management range.
pub const DSM_RANGE_LEN: usize = 16;

/// One Dataset Management range.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct DsmRange {
    /// Context attributes.
    pub attributes: u32,
    /// Length in logical blocks.
    pub nlb: u32,
    /// Starting LBA.
    pub slba: Lba,
}

impl DsmRange {
    /// Encodes the 16-byte range.
    pub fn encode(&self) -> [u8; DSM_RANGE_LEN] {
        let mut b = [0u8; DSM_RANGE_LEN];
        put_u32(&mut b, 0, self.attributes);
        put_u32(&mut b, 4, self.nlb);
        put_u64(&mut b, 8, self.slba.0);
        b
    }
}

/// A Dataset Management command's attributes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct DsmCommand {
    /// Number of ranges (CDW10 7:0 is 0's based), 1..=256.
    pub ranges: u16,
    /// Attribute: deallocate (CDW11 bit 2).
    pub deallocate: bool,
}

impl DsmCommand {
    /// Reads a Dataset Management SQE.
    pub fn from_sqe(sqe: &Sqe) -> DsmCommand {
        DsmCommand {
            ranges: (sqe.cdw10_plus(0) & 0xff) as u16 + 1,
            deallocate: sqe.cdw10_plus(1) & (1 << 2) != 0,
        }
    }

    /// Bytes of range data the command carries.
    pub fn data_len(&self) -> usize {
        usize::from(self.ranges) * DSM_RANGE_LEN
    }

    /// Parses the range list; `data` must hold all ranges.
    pub fn parse_ranges(&self, data: &[u8]) -> Result<Vec<DsmRange>, Status> {
        let body = data
            .get(..self.data_len())
            .ok_or(Status::DATA_SGL_LENGTH_INVALID.with_dnr())?;
        Ok(body
            .chunks_exact(DSM_RANGE_LEN)
            .map(|r| DsmRange {
                attributes: u32_at(r, 0),
                nlb: u32_at(r, 4),
                slba: Lba(u64_at(r, 8)),
            })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn sqe_field_offsets() {
        let sqe = Sqe {
            opcode: 0x02,
            flags: 0x40,
            cid: CommandId(0x1234),
            nsid: Nsid(7),
            cdw2: 0,
            cdw3: 0,
            mptr: 0,
            dptr: DataSgl::Transport { len: 4096 }.encode(),
            cdw: [0x10, 0x20, 0x07, 0, 0, 0],
        };
        let b = sqe.encode();
        assert_eq!(b[0], 0x02);
        assert_eq!(b[1], 0x40);
        assert_eq!(&b[2..4], &[0x34, 0x12]);
        assert_eq!(&b[4..8], &[7, 0, 0, 0]);
        assert_eq!(&b[32..36], &4096u32.to_le_bytes());
        assert_eq!(b[39], 0x5a);
        assert_eq!(&b[40..44], &0x10u32.to_le_bytes());
        assert_eq!(&b[48..52], &7u32.to_le_bytes());
        assert_eq!(Sqe::decode(&b), Some(sqe));
        assert_eq!(sqe.psdt(), 1);
        assert_eq!(sqe.fuse(), Fuse::Normal);
        assert_eq!(sqe.data_direction(), DataDirection::ControllerToHost);
        assert_eq!(sqe.data_sgl(), Ok(DataSgl::Transport { len: 4096 }));
    }

    #[test]
    fn sgl_forms() {
        let ic = DataSgl::InCapsule {
            offset: 0,
            len: 512,
        }
        .encode();
        assert_eq!(ic[15], 0x01);
        assert_eq!(
            DataSgl::decode(&ic),
            Ok(DataSgl::InCapsule {
                offset: 0,
                len: 512
            })
        );
        let mut keyed = [0u8; 16];
        keyed[15] = 0x40;
        assert_eq!(DataSgl::decode(&keyed), Err(SglError::Keyed));
        assert_eq!(
            SglError::Keyed.status(),
            Status::SGL_DESCRIPTOR_TYPE_INVALID.with_dnr()
        );
        let mut seg = [0u8; 16];
        seg[15] = 0x20;
        assert!(matches!(
            DataSgl::decode(&seg),
            Err(SglError::Unsupported { ty: 2, .. })
        ));
        let prp = Sqe {
            opcode: 0x01,
            ..Sqe::default()
        };
        assert_eq!(prp.data_sgl(), Err(SglError::PrpNotAllowed));
    }

    #[test]
    fn cqe_status_bits() {
        let cqe = Cqe {
            dw0: 1,
            dw1: 2,
            sqhd: 3,
            sqid: 4,
            cid: CommandId(5),
            status: Status::LBA_OUT_OF_RANGE.with_dnr(),
            phase: false,
        };
        let b = cqe.encode();
        assert_eq!(&b[12..14], &[5, 0]);
        // SC 0x80 in bits 8:1, DNR bit 15.
        assert_eq!(u16::from_le_bytes([b[14], b[15]]), (0x80 << 1) | 0x8000);
        assert_eq!(Cqe::decode(&b), Some(cqe));
        let inv_host = Status::CONNECT_INVALID_HOST.to_field(false);
        assert_eq!(inv_host, (0x84 << 1) | (1 << 9));
    }

    fn connect_data() -> ConnectData {
        ConnectData {
            hostid: [0xab; 16],
            cntlid: CntlId::DYNAMIC,
            subnqn: Nqn::new("nqn.2024-01.io.mirrorpoint:vol0").unwrap(),
            hostnqn: Nqn::new("nqn.2014-08.org.nvmexpress:uuid:1234").unwrap(),
        }
    }

    #[test]
    fn connect_round_trip_and_offsets() {
        let cmd = ConnectCommand {
            cid: CommandId(9),
            recfmt: 0,
            qid: QueueId(3),
            sqsize: 127,
            cattr: 0,
            kato: 0,
            sgl: DataSgl::InCapsule {
                offset: 0,
                len: 1024,
            },
        };
        let sqe = cmd.to_sqe();
        let raw = sqe.encode();
        assert_eq!(raw[0], 0x7f);
        assert_eq!(raw[4], 0x01);
        assert_eq!(&raw[42..44], &[3, 0]);
        assert_eq!(&raw[44..46], &[127, 0]);
        assert_eq!(ConnectCommand::from_sqe(&sqe), Ok(cmd));

        let data = connect_data();
        let b = data.encode();
        assert_eq!(&b[16..18], &[0xff, 0xff]);
        assert_eq!(&b[256..259], b"nqn");
        assert_eq!(&b[512..515], b"nqn");
        assert_eq!(ConnectData::decode(&b), Ok(data));
    }

    #[test]
    fn connect_validation() {
        let mut b = connect_data().encode();
        b[256..512].fill(b'a'); // no NUL
        assert_eq!(
            ConnectData::decode(&b),
            Err(FabricsError::InvalidParameter {
                offset: 256,
                in_data: true
            })
        );
        let mut b = connect_data().encode();
        b[512] = 0xff;
        let err = ConnectData::decode(&b).unwrap_err();
        assert_eq!(
            err,
            FabricsError::InvalidParameter {
                offset: 512,
                in_data: true
            }
        );
        let cqe = err.completion(CommandId(1));
        assert_eq!(cqe.dw0, 512 | (1 << 16));
        assert_eq!(cqe.status, Status::CONNECT_INVALID_PARAMETERS.with_dnr());
        let mut b = connect_data().encode();
        b[512] = 0;
        assert!(ConnectData::decode(&b).is_err());
        let mut sqe = ConnectCommand {
            cid: CommandId(9),
            recfmt: 0,
            qid: QueueId(0),
            sqsize: 31,
            cattr: 0,
            kato: 5000,
            sgl: DataSgl::InCapsule {
                offset: 0,
                len: 1024,
            },
        }
        .to_sqe();
        sqe.cdw[0] |= 1;
        assert_eq!(
            ConnectCommand::from_sqe(&sqe),
            Err(FabricsError::IncompatibleFormat(1))
        );
        assert!(Nqn::new(&"a".repeat(224)).is_err());
        assert!(Nqn::new(&"a".repeat(223)).is_ok());
    }

    #[test]
    fn property_commands() {
        let get = PropertyCommand {
            cid: CommandId(1),
            size8: true,
            offset: 0,
            value: None,
        };
        let sqe = get.to_sqe();
        let raw = sqe.encode();
        assert_eq!(raw[4], 0x04);
        assert_eq!(raw[40], 1);
        assert_eq!(PropertyCommand::from_sqe(&sqe), Ok(get));
        assert_eq!(get.property(), Ok(Property::Cap));
        let set = PropertyCommand {
            cid: CommandId(2),
            size8: false,
            offset: 0x14,
            value: Some(0x460001),
        };
        let sqe = set.to_sqe();
        let raw = sqe.encode();
        assert_eq!(raw[4], 0x00);
        assert_eq!(&raw[44..48], &0x14u32.to_le_bytes());
        assert_eq!(&raw[48..52], &0x460001u32.to_le_bytes());
        let back = PropertyCommand::from_sqe(&sqe).unwrap();
        assert_eq!(back, set);
        let cc = Cc(back.value.unwrap() as u32);
        assert!(cc.en());
        assert_eq!(cc.iosqes(), 6);
        assert_eq!(cc.iocqes(), 4);
        assert_eq!(cc.shn(), Shutdown::None);
        // Wrong width for CC.
        let bad = PropertyCommand { size8: true, ..set };
        assert_eq!(bad.property(), Err(FabricsError::InvalidProperty));
        let csts = Csts::new(true, false, Shutdown::Abrupt);
        assert_eq!(csts.0, 0b1001);
        assert_eq!(csts.shst(), Shutdown::Abrupt);
        let cap = Cap {
            mqes: 127,
            cqr: true,
            to: 15,
            nssrs: false,
            css: 1,
            mpsmin: 0,
            mpsmax: 0,
        };
        assert_eq!(Cap::from_u64(cap.to_u64()), cap);
        assert_eq!(cap.to_u64() >> 37 & 1, 1);
        assert_eq!(version(1, 4, 0), 0x0001_0400);
        let c = property_get_completion(CommandId(4), 0x1122_3344_5566_7788);
        assert_eq!((c.dw0, c.dw1), (0x5566_7788, 0x1122_3344));
    }

    #[test]
    fn rw_and_dsm() {
        let mut sqe = Sqe::new(
            0x01,
            CommandId(1),
            Nsid(1),
            DataSgl::Transport { len: 8192 },
        );
        let rw = RwCommand {
            slba: Lba(0x1_0000_0002),
            nlb: 2,
            fua: true,
            deac: false,
        };
        rw.fill_sqe(&mut sqe);
        let raw = sqe.encode();
        assert_eq!(&raw[40..48], &0x1_0000_0002u64.to_le_bytes());
        assert_eq!(&raw[48..50], &[1, 0]);
        assert_eq!(raw[51] & 0x40, 0x40);
        assert_eq!(RwCommand::from_sqe(&sqe), rw);
        assert_eq!(rw.byte_len(BlockSize::B4096), Some(ByteLen(8192)));
        assert_eq!(
            rw.check_transfer(BlockSize::B4096, DataSgl::Transport { len: 8192 }),
            Ok(())
        );
        assert!(rw
            .check_transfer(BlockSize::B512, DataSgl::Transport { len: 8192 })
            .is_err());
        assert_eq!(rw.check_range(0x1_0000_0004), Ok(()));
        assert_eq!(
            rw.check_range(0x1_0000_0003),
            Err(Status::LBA_OUT_OF_RANGE.with_dnr())
        );
        let huge = RwCommand {
            slba: Lba(u64::MAX),
            ..rw
        };
        assert!(huge.check_range(u64::MAX).is_err());

        let mut sqe = Sqe::new(
            0x09,
            CommandId(2),
            Nsid(1),
            DataSgl::InCapsule { offset: 0, len: 32 },
        );
        sqe.cdw[0] = 1;
        sqe.cdw[1] = 1 << 2;
        let dsm = DsmCommand::from_sqe(&sqe);
        assert_eq!(
            dsm,
            DsmCommand {
                ranges: 2,
                deallocate: true
            }
        );
        let r = DsmRange {
            attributes: 0,
            nlb: 8,
            slba: Lba(16),
        };
        let mut data = r.encode().to_vec();
        assert_eq!(
            dsm.parse_ranges(&data),
            Err(Status::DATA_SGL_LENGTH_INVALID.with_dnr())
        );
        data.extend_from_slice(&r.encode());
        assert_eq!(dsm.parse_ranges(&data), Ok(vec![r, r]));
        assert_eq!(number_of_queues_dw0(4), 0x0003_0003);
    }

    proptest! {
        #[test]
        fn sqe_round_trip(b in proptest::collection::vec(any::<u8>(), 64)) {
            let sqe = Sqe::decode(&b).unwrap();
            prop_assert_eq!(&sqe.encode()[..], &b[..]);
            let _ = sqe.data_sgl();
            let _ = ConnectCommand::from_sqe(&sqe);
            let _ = PropertyCommand::from_sqe(&sqe).map(|p| p.property());
            let _ = RwCommand::from_sqe(&sqe).check_range(u64::MAX);
            let _ = DsmCommand::from_sqe(&sqe).parse_ranges(&b);
        }

        #[test]
        fn cqe_round_trip(b in proptest::collection::vec(any::<u8>(), 16)) {
            let cqe = Cqe::decode(&b).unwrap();
            prop_assert_eq!(&cqe.encode()[..], &b[..]);
        }

        #[test]
        fn connect_data_never_panics(b in proptest::collection::vec(any::<u8>(), 0..1100)) {
            let _ = ConnectData::decode(&b);
        }
    }
}
