//! NVMe/TCP PDU codec (NVMe/TCP Transport Specification 1.0).
//!
//! Every NVMe/TCP PDU starts with an 8-byte common header (type, flags, HLEN,
//! PDO, PLEN) followed by a type-specific header, an optional header digest,
//! optional padding, optional data and an optional data digest. This module is
//! sans-IO: it works on byte slices only.
//!
//! Shape, and why:
//! * **Validate the common header alone.** Every length rule (HLEN per type,
//!   PLEN bounds, PDO alignment, digest flags against what was negotiated) can
//!   be checked from the first 8 bytes, so [`frame`] rejects a hostile PDU
//!   before the receive loop reads, let alone buffers, its body.
//! * **Errors carry the TermReq.** A decoding failure is a [`PduError`] whose
//!   [`PduError::fatal`] gives the Fatal Error Status and Information (the byte
//!   offset of the bad field where the spec asks for one) so the caller can
//!   send the right C2HTermReq (or H2CTermReq) without re-deriving it. A data
//!   digest mismatch is not fatal by itself: it names the command so the
//!   controller can complete it with Transient Transport Error.
//! * **Zero copy.** Decoded PDUs borrow their data section from the input;
//!   [`Decoded::data_range`] gives the same as a range. Encoding can produce
//!   header and data digest separately ([`Pdu::encode_parts`]) so a sender can
//!   gather-write header, payload and digest without copying the payload.
//! * **One config for both directions.** [`PduConfig`] holds the negotiated
//!   digests and both alignments; H2C PDUs are aligned to CPDA and C2H PDUs to
//!   HPDA, so the same codec serves the target and a userspace initiator.

use super::spec::{CommandId, Cqe, Sqe, CQE_LEN, SQE_LEN};
use super::wire::{put_bytes, put_u16, put_u32, put_u8, u16_at, u32_at, u8_at};
use std::ops::Range;

/// Length of the common header.
pub const CH_LEN: usize = 8;
/// Length of a header or data digest.
pub const DIGEST_LEN: usize = 4;
/// ICReq / ICResp total length (and HLEN).
pub const IC_LEN: usize = 128;
/// H2CTermReq / C2HTermReq HLEN.
pub const TERM_REQ_HLEN: usize = 24;
/// Most header-in-error bytes a TermReq carries.
pub const TERM_REQ_MAX_DATA: usize = 128;
/// Largest TermReq PLEN.
pub const TERM_REQ_MAX_PLEN: usize = TERM_REQ_HLEN + TERM_REQ_MAX_DATA;
/// CapsuleCmd HLEN (common header + 64-byte SQE).
pub const CAPSULE_CMD_HLEN: usize = CH_LEN + SQE_LEN;
/// CapsuleResp HLEN (common header + 16-byte CQE).
pub const CAPSULE_RESP_HLEN: usize = CH_LEN + CQE_LEN;
/// H2CData / C2HData HLEN.
pub const DATA_HLEN: usize = 24;
/// R2T HLEN.
pub const R2T_HLEN: usize = 24;
/// Largest HPDA / CPDA value.
pub const MAX_PDA: u8 = 31;
/// Smallest MAXH2CDATA a controller may advertise.
pub const MIN_MAXH2CDATA: u32 = 4096;
/// The only PDU format version.
pub const PFV_1_0: u16 = 0;

/// PDU header flags (common header byte 1).
pub mod flags {
    /// Header digest present.
    pub const HDGSTF: u8 = 1 << 0;
    /// Data digest present.
    pub const DDGSTF: u8 = 1 << 1;
    /// Last data PDU of the transfer (H2CData, C2HData).
    pub const LAST_PDU: u8 = 1 << 2;
    /// C2HData: command completed successfully, no CapsuleResp follows.
    pub const SUCCESS: u8 = 1 << 3;
}

/// ICReq / ICResp DGST bits.
pub mod dgst {
    /// Header digest enable.
    pub const HDGST_ENABLE: u8 = 1 << 0;
    /// Data digest enable.
    pub const DDGST_ENABLE: u8 = 1 << 1;
}

/// Common header byte offsets (what a TermReq's FEI points at).
pub mod ch_off {
    /// PDU-Type.
    pub const PDU_TYPE: u8 = 0;
    /// FLAGS.
    pub const FLAGS: u8 = 1;
    /// HLEN.
    pub const HLEN: u8 = 2;
    /// PDO.
    pub const PDO: u8 = 3;
    /// PLEN.
    pub const PLEN: u8 = 4;
}

/// PDU types.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum PduType {
    /// Initialize Connection Request (host to controller).
    IcReq = 0x00,
    /// Initialize Connection Response.
    IcResp = 0x01,
    /// Host to controller terminate connection request.
    H2CTermReq = 0x02,
    /// Controller to host terminate connection request.
    C2HTermReq = 0x03,
    /// Command capsule.
    CapsuleCmd = 0x04,
    /// Response capsule.
    CapsuleResp = 0x05,
    /// Host to controller data.
    H2CData = 0x06,
    /// Controller to host data.
    C2HData = 0x07,
    /// Ready to transfer.
    R2T = 0x09,
}

impl PduType {
    /// Decodes a PDU-Type byte.
    pub fn from_u8(v: u8) -> Option<PduType> {
        Some(match v {
            0x00 => PduType::IcReq,
            0x01 => PduType::IcResp,
            0x02 => PduType::H2CTermReq,
            0x03 => PduType::C2HTermReq,
            0x04 => PduType::CapsuleCmd,
            0x05 => PduType::CapsuleResp,
            0x06 => PduType::H2CData,
            0x07 => PduType::C2HData,
            0x09 => PduType::R2T,
            _ => return None,
        })
    }

    /// The fixed HLEN of this type.
    pub fn hlen(self) -> usize {
        match self {
            PduType::IcReq | PduType::IcResp => IC_LEN,
            PduType::H2CTermReq | PduType::C2HTermReq => TERM_REQ_HLEN,
            PduType::CapsuleCmd => CAPSULE_CMD_HLEN,
            PduType::CapsuleResp => CAPSULE_RESP_HLEN,
            PduType::H2CData | PduType::C2HData => DATA_HLEN,
            PduType::R2T => R2T_HLEN,
        }
    }

    /// Sent by the host.
    pub fn is_host_to_controller(self) -> bool {
        matches!(
            self,
            PduType::IcReq | PduType::H2CTermReq | PduType::CapsuleCmd | PduType::H2CData
        )
    }

    /// Whether header and data digests apply (not to IC or TermReq PDUs).
    pub fn has_digests(self) -> bool {
        !matches!(
            self,
            PduType::IcReq | PduType::IcResp | PduType::H2CTermReq | PduType::C2HTermReq
        )
    }

    /// Whether the PDU may carry a PDO-located data section.
    pub fn has_pdo_data(self) -> bool {
        matches!(
            self,
            PduType::CapsuleCmd | PduType::H2CData | PduType::C2HData
        )
    }
}

/// The 8-byte common header, raw.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct CommonHeader {
    /// PDU-Type.
    pub pdu_type: u8,
    /// FLAGS.
    pub flags: u8,
    /// Header length.
    pub hlen: u8,
    /// PDU data offset.
    pub pdo: u8,
    /// Total PDU length.
    pub plen: u32,
}

impl CommonHeader {
    /// Parses the first 8 bytes; `None` if shorter.
    pub fn parse(b: &[u8]) -> Option<CommonHeader> {
        let ch = b.get(..CH_LEN)?;
        Some(CommonHeader {
            pdu_type: u8_at(ch, 0),
            flags: u8_at(ch, 1),
            hlen: u8_at(ch, 2),
            pdo: u8_at(ch, 3),
            plen: u32_at(ch, 4),
        })
    }

    /// Encodes the 8 bytes.
    pub fn encode(&self) -> [u8; CH_LEN] {
        let mut b = [0u8; CH_LEN];
        put_u8(&mut b, 0, self.pdu_type);
        put_u8(&mut b, 1, self.flags);
        put_u8(&mut b, 2, self.hlen);
        put_u8(&mut b, 3, self.pdo);
        put_u32(&mut b, 4, self.plen);
        b
    }
}

/// Per-connection codec parameters: negotiated digests, alignments, limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PduConfig {
    /// Header digests negotiated.
    pub hdgst: bool,
    /// Data digests negotiated.
    pub ddgst: bool,
    /// Controller PDU data alignment (0's based dwords): aligns H2C data.
    pub cpda: u8,
    /// Host PDU data alignment (0's based dwords): aligns C2H data.
    pub hpda: u8,
    /// Largest PLEN accepted.
    pub max_plen: u32,
    /// MAXH2CDATA: largest H2CData data section accepted.
    pub max_h2c_data: u32,
}

impl Default for PduConfig {
    /// The state before IC negotiation: no digests, no padding, 1 MiB + 4 KiB PDUs.
    fn default() -> Self {
        PduConfig {
            hdgst: false,
            ddgst: false,
            cpda: 0,
            hpda: 0,
            max_plen: (1 << 20) + 4096,
            max_h2c_data: 1 << 20,
        }
    }
}

impl PduConfig {
    /// The data alignment in bytes for PDUs of `ty`.
    pub fn alignment(&self, ty: PduType) -> usize {
        let pda = if ty.is_host_to_controller() {
            self.cpda
        } else {
            self.hpda
        };
        (usize::from(pda.min(MAX_PDA)) + 1) * 4
    }
}

/// Fatal Error Status values of a TermReq.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u16)]
pub enum Fes {
    /// Invalid PDU header field (FEI = byte offset of the field).
    InvalidHeaderField = 0x01,
    /// PDU sequence error.
    PduSequenceError = 0x02,
    /// Header digest error.
    HeaderDigestError = 0x03,
    /// Data transfer out of range.
    DataOutOfRange = 0x04,
    /// Data transfer limit exceeded (formerly R2T limit exceeded).
    DataLimitExceeded = 0x05,
    /// Unsupported parameter (FEI = byte offset of the parameter).
    UnsupportedParameter = 0x06,
}

impl Fes {
    /// Decodes a FES value.
    pub fn from_u16(v: u16) -> Option<Fes> {
        Some(match v {
            0x01 => Fes::InvalidHeaderField,
            0x02 => Fes::PduSequenceError,
            0x03 => Fes::HeaderDigestError,
            0x04 => Fes::DataOutOfRange,
            0x05 => Fes::DataLimitExceeded,
            0x06 => Fes::UnsupportedParameter,
            _ => return None,
        })
    }
}

/// What a TermReq reports: status and information.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct FatalError {
    /// Fatal error status.
    pub fes: Fes,
    /// Fatal error information: byte offset of the field for FES 01h/06h,
    /// the received header digest for FES 03h, else 0.
    pub fei: u32,
}

/// Why a PDU was not accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PduError {
    /// Not an error in the stream: more bytes are needed.
    #[error("incomplete PDU: need {needed} more bytes")]
    Incomplete {
        /// Bytes still missing.
        needed: usize,
    },
    /// A header field is invalid.
    #[error("invalid PDU header field at byte {offset}: {what}")]
    InvalidHeaderField {
        /// Byte offset of the field within the PDU header.
        offset: u8,
        /// What was wrong.
        what: &'static str,
    },
    /// A parameter value is not supported.
    #[error("unsupported parameter at byte {offset}: {what}")]
    UnsupportedParameter {
        /// Byte offset of the field within the PDU header.
        offset: u8,
        /// What was wrong.
        what: &'static str,
    },
    /// A PDU arrived that is not allowed in the current state.
    #[error("PDU sequence error: {what}")]
    SequenceError {
        /// What was wrong.
        what: &'static str,
    },
    /// Header digest mismatch.
    #[error("header digest mismatch: received {received:#010x}, computed {computed:#010x}")]
    HeaderDigest {
        /// Digest in the PDU.
        received: u32,
        /// Digest computed over the header.
        computed: u32,
    },
    /// Data digest mismatch. Not fatal: complete `cid` with Transient
    /// Transport Error (or treat as fatal by policy).
    #[error("data digest mismatch: received {received:#010x}, computed {computed:#010x}")]
    DataDigest {
        /// The command the data belonged to, when the PDU names one.
        cid: Option<CommandId>,
        /// Digest in the PDU.
        received: u32,
        /// Digest computed over the data.
        computed: u32,
    },
    /// Data offset or length outside the command's transfer.
    #[error("data transfer out of range: {what}")]
    DataOutOfRange {
        /// What was wrong.
        what: &'static str,
    },
    /// A PDU or data transfer exceeds the negotiated limit.
    #[error("data transfer limit exceeded: {len} > {limit}")]
    DataLimitExceeded {
        /// Offending length.
        len: u64,
        /// The limit.
        limit: u64,
    },
}

impl PduError {
    /// The TermReq status/information to send, or `None` when the error does
    /// not terminate the connection (incomplete input, data digest).
    pub fn fatal(&self) -> Option<FatalError> {
        let (fes, fei) = match *self {
            PduError::Incomplete { .. } | PduError::DataDigest { .. } => return None,
            PduError::InvalidHeaderField { offset, .. } => {
                (Fes::InvalidHeaderField, u32::from(offset))
            }
            PduError::UnsupportedParameter { offset, .. } => {
                (Fes::UnsupportedParameter, u32::from(offset))
            }
            PduError::SequenceError { .. } => (Fes::PduSequenceError, 0),
            // FEI carries the header digest value that failed (PDU Header Digest).
            PduError::HeaderDigest { received, .. } => (Fes::HeaderDigestError, received),
            PduError::DataOutOfRange { .. } => (Fes::DataOutOfRange, 0),
            PduError::DataLimitExceeded { .. } => (Fes::DataLimitExceeded, 0),
        };
        Some(FatalError { fes, fei })
    }

    /// Builds the C2HTermReq for this error. `received` is the start of the
    /// offending PDU as received; up to 128 bytes of it are echoed back as
    /// the "PDU header in error".
    pub fn c2h_term_req<'a>(&self, received: &'a [u8]) -> Option<Pdu<'a>> {
        let f = self.fatal()?;
        Some(Pdu::C2HTermReq(TermReq::new(f, received)))
    }

    /// Builds the H2CTermReq for this error (initiator side), likewise.
    pub fn h2c_term_req<'a>(&self, received: &'a [u8]) -> Option<Pdu<'a>> {
        let f = self.fatal()?;
        Some(Pdu::H2CTermReq(TermReq::new(f, received)))
    }

    fn field(offset: u8, what: &'static str) -> PduError {
        PduError::InvalidHeaderField { offset, what }
    }
}

/// Where the parts of a PDU lie, derived from its common header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    /// PDU type.
    pub pdu_type: PduType,
    /// Header digest present (at `hlen..hlen+4`).
    pub hdgst: bool,
    /// Data digest present (at `plen-4..plen`).
    pub ddgst: bool,
    /// The data section, relative to the PDU start (empty if none).
    pub data: Range<usize>,
    /// Total PDU length.
    pub plen: usize,
}

/// Validates a common header against the connection state and computes the
/// PDU layout. All checks needing only the first 8 bytes happen here.
pub fn layout(ch: &CommonHeader, cfg: &PduConfig) -> Result<Layout, PduError> {
    let ty = PduType::from_u8(ch.pdu_type)
        .ok_or(PduError::field(ch_off::PDU_TYPE, "unknown PDU type"))?;
    let hlen = ty.hlen();
    if usize::from(ch.hlen) != hlen {
        return Err(PduError::field(ch_off::HLEN, "wrong HLEN for PDU type"));
    }
    let plen = usize::try_from(ch.plen).map_err(|_| PduError::DataLimitExceeded {
        len: u64::from(ch.plen),
        limit: u64::from(cfg.max_plen),
    })?;
    if ch.plen > cfg.max_plen {
        return Err(PduError::DataLimitExceeded {
            len: u64::from(ch.plen),
            limit: u64::from(cfg.max_plen),
        });
    }
    let hd = ch.flags & flags::HDGSTF != 0;
    let dd = ch.flags & flags::DDGSTF != 0;
    if !ty.has_digests() {
        if hd || dd {
            return Err(PduError::field(
                ch_off::FLAGS,
                "digest flag on IC/TermReq PDU",
            ));
        }
        let ok = match ty {
            PduType::IcReq | PduType::IcResp => plen == IC_LEN,
            _ => (TERM_REQ_HLEN..=TERM_REQ_MAX_PLEN).contains(&plen),
        };
        if !ok {
            return Err(PduError::field(ch_off::PLEN, "PLEN invalid for PDU type"));
        }
        return Ok(Layout {
            pdu_type: ty,
            hdgst: false,
            ddgst: false,
            data: hlen..plen,
            plen,
        });
    }
    if hd != cfg.hdgst {
        return Err(PduError::field(
            ch_off::FLAGS,
            "HDGSTF does not match negotiated header digest",
        ));
    }
    let header_end = hlen + if hd { DIGEST_LEN } else { 0 };
    if plen < header_end {
        return Err(PduError::field(ch_off::PLEN, "PLEN shorter than header"));
    }
    if plen == header_end {
        if dd {
            return Err(PduError::field(
                ch_off::FLAGS,
                "DDGSTF set on PDU without data",
            ));
        }
        if matches!(ty, PduType::H2CData | PduType::C2HData) {
            return Err(PduError::field(ch_off::PLEN, "data PDU without data"));
        }
        return Ok(Layout {
            pdu_type: ty,
            hdgst: hd,
            ddgst: false,
            data: header_end..header_end,
            plen,
        });
    }
    // PLEN leaves room for data.
    if !ty.has_pdo_data() {
        return Err(PduError::field(ch_off::PLEN, "PLEN too long for PDU type"));
    }
    if dd != cfg.ddgst {
        return Err(PduError::field(
            ch_off::FLAGS,
            "DDGSTF does not match negotiated data digest",
        ));
    }
    let pdo = usize::from(ch.pdo);
    if pdo < header_end || pdo % cfg.alignment(ty) != 0 {
        return Err(PduError::field(ch_off::PDO, "PDO misplaced or misaligned"));
    }
    let data_end = plen - if dd { DIGEST_LEN } else { 0 };
    if pdo >= data_end {
        return Err(PduError::field(ch_off::PDO, "PDO beyond end of data"));
    }
    Ok(Layout {
        pdu_type: ty,
        hdgst: hd,
        ddgst: dd,
        data: pdo..data_end,
        plen,
    })
}

/// Framing progress for a receive loop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Frame {
    /// Read at least this many more bytes, then ask again.
    NeedMore(usize),
    /// A whole PDU of this many bytes is at the front of the buffer.
    Complete(usize),
}

/// Incremental framer: given the bytes received so far (starting at a PDU
/// boundary), says how many more are needed or how long the complete PDU
/// is. The common header is validated as soon as its 8 bytes are present.
pub fn frame(buf: &[u8], cfg: &PduConfig) -> Result<Frame, PduError> {
    let Some(ch) = CommonHeader::parse(buf) else {
        return Ok(Frame::NeedMore(CH_LEN - buf.len()));
    };
    let l = layout(&ch, cfg)?;
    if buf.len() < l.plen {
        Ok(Frame::NeedMore(l.plen - buf.len()))
    } else {
        Ok(Frame::Complete(l.plen))
    }
}

/// ICReq.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct IcReq {
    /// Host PDU data alignment (0's based dwords, 0..=31).
    pub hpda: u8,
    /// Header digest requested.
    pub hdgst: bool,
    /// Data digest requested.
    pub ddgst: bool,
    /// Maximum outstanding R2Ts per command, 0's based.
    pub maxr2t: u32,
}

/// ICResp.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct IcResp {
    /// Controller PDU data alignment (0's based dwords, 0..=31).
    pub cpda: u8,
    /// Header digest enabled.
    pub hdgst: bool,
    /// Data digest enabled.
    pub ddgst: bool,
    /// Maximum H2CData data bytes (>= 4096, multiple of 4).
    pub maxh2cdata: u32,
}

/// H2CTermReq / C2HTermReq.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct TermReq<'a> {
    /// Fatal error status, raw (see [`Fes::from_u16`]).
    pub fes: u16,
    /// Fatal error information.
    pub fei: u32,
    /// The PDU header in error (at most 128 bytes).
    pub data: &'a [u8],
}

impl<'a> TermReq<'a> {
    /// A TermReq for `err`, echoing up to 128 bytes of `received`.
    pub fn new(err: FatalError, received: &'a [u8]) -> TermReq<'a> {
        let n = received.len().min(TERM_REQ_MAX_DATA);
        TermReq {
            fes: err.fes as u16,
            fei: err.fei,
            data: received.get(..n).unwrap_or(&[]),
        }
    }
}

/// CapsuleCmd: an SQE and any in-capsule data.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct CapsuleCmd<'a> {
    /// The submission queue entry.
    pub sqe: Sqe,
    /// In-capsule data (empty if none).
    pub data: &'a [u8],
}

/// CapsuleResp: a CQE.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct CapsuleResp {
    /// The completion queue entry.
    pub cqe: Cqe,
}

/// H2CData.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct H2CData<'a> {
    /// Command capsule CID.
    pub cid: CommandId,
    /// Transfer tag from the R2T.
    pub ttag: u16,
    /// DATAO: offset of this data within the command's data.
    pub offset: u32,
    /// LAST_PDU flag.
    pub last: bool,
    /// The data (DATAL = its length).
    pub data: &'a [u8],
}

/// C2HData.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct C2HData<'a> {
    /// Command capsule CID.
    pub cid: CommandId,
    /// DATAO.
    pub offset: u32,
    /// LAST_PDU flag.
    pub last: bool,
    /// SUCCESS flag (requires `last`): no CapsuleResp will follow.
    pub success: bool,
    /// The data (DATAL = its length).
    pub data: &'a [u8],
}

/// R2T.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct R2t {
    /// Command capsule CID.
    pub cid: CommandId,
    /// Transfer tag the host echoes in H2CData.
    pub ttag: u16,
    /// R2TO: requested data offset.
    pub offset: u32,
    /// R2TL: requested data length (non-zero).
    pub len: u32,
}

/// A decoded PDU; data sections borrow from the input.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Pdu<'a> {
    /// ICReq.
    IcReq(IcReq),
    /// ICResp.
    IcResp(IcResp),
    /// H2CTermReq.
    H2CTermReq(TermReq<'a>),
    /// C2HTermReq.
    C2HTermReq(TermReq<'a>),
    /// CapsuleCmd.
    CapsuleCmd(CapsuleCmd<'a>),
    /// CapsuleResp.
    CapsuleResp(CapsuleResp),
    /// H2CData.
    H2CData(H2CData<'a>),
    /// C2HData.
    C2HData(C2HData<'a>),
    /// R2T.
    R2t(R2t),
}

/// A decoded PDU and where it lay in the input.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decoded<'a> {
    /// The PDU.
    pub pdu: Pdu<'a>,
    /// Bytes consumed from the input (PLEN).
    pub len: usize,
    /// The data section within the input (empty if none).
    pub data_range: Range<usize>,
}

/// Decodes and fully validates the PDU at the front of `buf`.
///
/// Returns [`PduError::Incomplete`] if `buf` does not yet hold all of it;
/// bytes after the PDU are left alone.
pub fn decode<'a>(buf: &'a [u8], cfg: &PduConfig) -> Result<Decoded<'a>, PduError> {
    let (d, digest) = decode_checking_data_digest(buf, cfg)?;
    match digest {
        DataDigest::Mismatch { received, computed } => Err(PduError::DataDigest {
            cid: d.pdu.command_id(),
            received,
            computed,
        }),
        DataDigest::Absent | DataDigest::Ok => Ok(d),
    }
}

/// Outcome of data digest verification.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DataDigest {
    /// The PDU carries no data digest.
    Absent,
    /// The digest matched.
    Ok,
    /// The digest did not match.
    Mismatch {
        /// Digest in the PDU.
        received: u32,
        /// Digest computed over the data.
        computed: u32,
    },
}

/// Like [`decode`], but a data digest mismatch is reported next to the
/// (otherwise fully validated) PDU instead of as an error, so a receiver can
/// keep its transfer bookkeeping exact while failing the command.
pub fn decode_checking_data_digest<'a>(
    buf: &'a [u8],
    cfg: &PduConfig,
) -> Result<(Decoded<'a>, DataDigest), PduError> {
    let ch = CommonHeader::parse(buf).ok_or(PduError::Incomplete {
        needed: CH_LEN.saturating_sub(buf.len()),
    })?;
    let l = layout(&ch, cfg)?;
    let pdu = buf.get(..l.plen).ok_or(PduError::Incomplete {
        needed: l.plen.saturating_sub(buf.len()),
    })?;
    let data: &'a [u8] = pdu.get(l.data.clone()).unwrap_or(&[]);
    let ddgst = l.ddgst.then(|| u32_at(pdu, l.plen - DIGEST_LEN));
    decode_validated(ch, l, pdu, data, ddgst, cfg)
}

/// Where the receive loop should put the bytes of the PDU whose common
/// header is `ch`: the length of its *head* (everything before the data
/// section, or the whole PDU when the data section is part of the header
/// region as in TermReq), the data section's length, and whether a data
/// digest follows the data.
///
/// This is what lets a receiver read the head into a small buffer and then
/// the data straight into its final (pool) buffer, without a copy, and still
/// have every rule checked by [`decode_parts`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PartsLayout {
    /// Bytes from the PDU start up to the data section (or PLEN).
    pub head_len: usize,
    /// Bytes of the separately received data section (0 if none).
    pub data_len: usize,
    /// A 4-byte data digest follows the data section.
    pub ddgst: bool,
}

/// Validates a common header and splits the PDU into head, data and digest
/// (see [`PartsLayout`]).
pub fn parts_layout(ch: &CommonHeader, cfg: &PduConfig) -> Result<PartsLayout, PduError> {
    let l = layout(ch, cfg)?;
    if l.pdu_type.has_pdo_data() && !l.data.is_empty() {
        Ok(PartsLayout {
            head_len: l.data.start,
            data_len: l.data.len(),
            ddgst: l.ddgst,
        })
    } else {
        Ok(PartsLayout {
            head_len: l.plen,
            data_len: 0,
            ddgst: false,
        })
    }
}

/// Like [`decode_checking_data_digest`], for a PDU received in parts: `head`
/// holds the bytes before the data section (as [`parts_layout`] sized it),
/// `data` the data section, `ddgst` the received data digest. Every check of
/// the contiguous decoder applies.
pub fn decode_parts<'a>(
    head: &'a [u8],
    data: &'a [u8],
    ddgst: Option<u32>,
    cfg: &PduConfig,
) -> Result<(Decoded<'a>, DataDigest), PduError> {
    let ch = CommonHeader::parse(head).ok_or(PduError::Incomplete {
        needed: CH_LEN.saturating_sub(head.len()),
    })?;
    let l = layout(&ch, cfg)?;
    let p = parts_layout(&ch, cfg)?;
    if head.len() < p.head_len {
        return Err(PduError::Incomplete {
            needed: p.head_len - head.len(),
        });
    }
    if data.len() != p.data_len || ddgst.is_some() != p.ddgst {
        return Err(PduError::field(ch_off::PLEN, "PDU parts do not match PLEN"));
    }
    let head = head.get(..p.head_len).unwrap_or(&[]);
    let data: &'a [u8] = if p.data_len == 0 {
        head.get(l.data.clone()).unwrap_or(&[])
    } else {
        data
    };
    decode_validated(ch, l, head, data, ddgst, cfg)
}

/// Decoding once the layout is known: `pdu` holds at least the header and
/// header digest, `data` is the data section, `ddgst` the received data digest.
fn decode_validated<'a>(
    ch: CommonHeader,
    l: Layout,
    pdu: &'a [u8],
    data: &'a [u8],
    ddgst: Option<u32>,
    cfg: &PduConfig,
) -> Result<(Decoded<'a>, DataDigest), PduError> {
    let hlen = l.pdu_type.hlen();
    let hdr = pdu
        .get(..hlen)
        .ok_or(PduError::field(ch_off::PLEN, "PLEN shorter than header"))?;
    if l.hdgst {
        let received = u32_at(pdu, hlen);
        let computed = crc32c::crc32c(hdr);
        if received != computed {
            return Err(PduError::HeaderDigest { received, computed });
        }
    }
    let last = ch.flags & flags::LAST_PDU != 0;
    let out = match l.pdu_type {
        PduType::IcReq => {
            if u16_at(hdr, 8) != PFV_1_0 {
                return Err(PduError::UnsupportedParameter {
                    offset: 8,
                    what: "PDU format version",
                });
            }
            let hpda = u8_at(hdr, 10);
            if hpda > MAX_PDA {
                return Err(PduError::field(10, "HPDA above 31"));
            }
            let d = u8_at(hdr, 11);
            let ic = IcReq {
                hpda,
                hdgst: d & dgst::HDGST_ENABLE != 0,
                ddgst: d & dgst::DDGST_ENABLE != 0,
                maxr2t: u32_at(hdr, 12),
            };
            Pdu::IcReq(ic)
        }
        PduType::IcResp => {
            if u16_at(hdr, 8) != PFV_1_0 {
                return Err(PduError::UnsupportedParameter {
                    offset: 8,
                    what: "PDU format version",
                });
            }
            let cpda = u8_at(hdr, 10);
            if cpda > MAX_PDA {
                return Err(PduError::field(10, "CPDA above 31"));
            }
            let maxh2cdata = u32_at(hdr, 12);
            if maxh2cdata < MIN_MAXH2CDATA || maxh2cdata % 4 != 0 {
                return Err(PduError::field(
                    12,
                    "MAXH2CDATA below 4096 or not dword multiple",
                ));
            }
            let d = u8_at(hdr, 11);
            let ic = IcResp {
                cpda,
                hdgst: d & dgst::HDGST_ENABLE != 0,
                ddgst: d & dgst::DDGST_ENABLE != 0,
                maxh2cdata,
            };
            Pdu::IcResp(ic)
        }
        PduType::H2CTermReq | PduType::C2HTermReq => {
            let t = TermReq {
                fes: u16_at(hdr, 8),
                fei: u32_at(hdr, 10),
                data,
            };
            let p = if l.pdu_type == PduType::H2CTermReq {
                Pdu::H2CTermReq(t)
            } else {
                Pdu::C2HTermReq(t)
            };
            p
        }
        PduType::CapsuleCmd => {
            let sqe = hdr
                .get(CH_LEN..)
                .and_then(Sqe::decode)
                .ok_or(PduError::field(ch_off::HLEN, "short SQE"))?;
            Pdu::CapsuleCmd(CapsuleCmd { sqe, data })
        }
        PduType::CapsuleResp => {
            let cqe = hdr
                .get(CH_LEN..)
                .and_then(Cqe::decode)
                .ok_or(PduError::field(ch_off::HLEN, "short CQE"))?;
            Pdu::CapsuleResp(CapsuleResp { cqe })
        }
        PduType::H2CData | PduType::C2HData => {
            let cid = CommandId(u16_at(hdr, 8));
            let offset = check_data_fields(hdr, data.len())?;
            if l.pdu_type == PduType::H2CData {
                if data.len() as u64 > u64::from(cfg.max_h2c_data) {
                    return Err(PduError::DataLimitExceeded {
                        len: data.len() as u64,
                        limit: u64::from(cfg.max_h2c_data),
                    });
                }
                let d = H2CData {
                    cid,
                    ttag: u16_at(hdr, 10),
                    offset,
                    last,
                    data,
                };
                Pdu::H2CData(d)
            } else {
                let success = ch.flags & flags::SUCCESS != 0;
                if success && !last {
                    return Err(PduError::field(ch_off::FLAGS, "SUCCESS without LAST_PDU"));
                }
                let d = C2HData {
                    cid,
                    offset,
                    last,
                    success,
                    data,
                };
                Pdu::C2HData(d)
            }
        }
        PduType::R2T => {
            let r = R2t {
                cid: CommandId(u16_at(hdr, 8)),
                ttag: u16_at(hdr, 10),
                offset: u32_at(hdr, 12),
                len: u32_at(hdr, 16),
            };
            if r.len == 0 {
                return Err(PduError::field(16, "R2TL is zero"));
            }
            if r.offset.checked_add(r.len).is_none() {
                return Err(PduError::DataOutOfRange {
                    what: "R2TO + R2TL overflows",
                });
            }
            Pdu::R2t(r)
        }
    };
    let digest = if let Some(received) = ddgst.filter(|_| l.ddgst) {
        let computed = crc32c::crc32c(data);
        if received == computed {
            DataDigest::Ok
        } else {
            DataDigest::Mismatch { received, computed }
        }
    } else {
        DataDigest::Absent
    };
    let d = Decoded {
        pdu: out,
        len: l.plen,
        data_range: l.data,
    };
    Ok((d, digest))
}

/// DATAO/DATAL checks shared by H2CData and C2HData; returns DATAO.
fn check_data_fields(hdr: &[u8], data_len: usize) -> Result<u32, PduError> {
    let datao = u32_at(hdr, 12);
    let datal = u32_at(hdr, 16);
    if usize::try_from(datal).ok() != Some(data_len) {
        return Err(PduError::field(16, "DATAL does not match PDU data length"));
    }
    if datao.checked_add(datal).is_none() {
        return Err(PduError::DataOutOfRange {
            what: "DATAO + DATAL overflows",
        });
    }
    Ok(datao)
}

/// Why a PDU could not be encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum EncodeError {
    /// The data does not fit the PDU (PLEN overflow, TermReq > 128 bytes,
    /// DATAL > u32).
    #[error("PDU data too large")]
    DataTooLarge,
    /// H2CData/C2HData must carry data.
    #[error("data PDU without data")]
    EmptyData,
    /// A field value is out of its range (PDA > 31, MAXH2CDATA too small,
    /// SUCCESS without LAST, zero R2TL).
    #[error("field out of range: {0}")]
    InvalidField(&'static str),
}

/// A PDU encoded for gather-write: `header` (CH, PSH, header digest and
/// padding), then the data slice, then `data_digest` if present.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EncodedParts {
    /// Everything before the data.
    pub header: Vec<u8>,
    /// The data digest, to send after the data.
    pub data_digest: Option<[u8; DIGEST_LEN]>,
}

impl<'a> Pdu<'a> {
    /// The PDU type.
    pub fn pdu_type(&self) -> PduType {
        match self {
            Pdu::IcReq(_) => PduType::IcReq,
            Pdu::IcResp(_) => PduType::IcResp,
            Pdu::H2CTermReq(_) => PduType::H2CTermReq,
            Pdu::C2HTermReq(_) => PduType::C2HTermReq,
            Pdu::CapsuleCmd(_) => PduType::CapsuleCmd,
            Pdu::CapsuleResp(_) => PduType::CapsuleResp,
            Pdu::H2CData(_) => PduType::H2CData,
            Pdu::C2HData(_) => PduType::C2HData,
            Pdu::R2t(_) => PduType::R2T,
        }
    }

    /// The command a PDU refers to, if it names one.
    pub fn command_id(&self) -> Option<CommandId> {
        match self {
            Pdu::CapsuleCmd(c) => Some(c.sqe.cid),
            Pdu::CapsuleResp(r) => Some(r.cqe.cid),
            Pdu::H2CData(d) => Some(d.cid),
            Pdu::C2HData(d) => Some(d.cid),
            Pdu::R2t(r) => Some(r.cid),
            Pdu::IcReq(_) | Pdu::IcResp(_) | Pdu::H2CTermReq(_) | Pdu::C2HTermReq(_) => None,
        }
    }

    /// The data section.
    pub fn data(&self) -> &'a [u8] {
        match self {
            Pdu::H2CTermReq(t) | Pdu::C2HTermReq(t) => t.data,
            Pdu::CapsuleCmd(c) => c.data,
            Pdu::H2CData(d) => d.data,
            Pdu::C2HData(d) => d.data,
            Pdu::IcReq(_) | Pdu::IcResp(_) | Pdu::CapsuleResp(_) | Pdu::R2t(_) => &[],
        }
    }

    /// Encodes everything but the data (see [`EncodedParts`]).
    pub fn encode_parts(&self, cfg: &PduConfig) -> Result<EncodedParts, EncodeError> {
        let mut header = Vec::new();
        let data_digest = self.encode_head_into(cfg, &mut header)?;
        Ok(EncodedParts {
            header,
            data_digest,
        })
    }

    /// Appends everything before the data (CH, PSH, header digest, padding)
    /// to `out`, and returns the data digest to send after the data, if any.
    /// On error `out` is left as it was. Lets a writer encode heads straight
    /// into its send buffer, without a vector per PDU.
    pub fn encode_head_into(
        &self,
        cfg: &PduConfig,
        out: &mut Vec<u8>,
    ) -> Result<Option<[u8; DIGEST_LEN]>, EncodeError> {
        let start = out.len();
        let r = self.encode_head_at(cfg, out, start);
        if r.is_err() {
            out.truncate(start);
        }
        r
    }

    fn encode_head_at(
        &self,
        cfg: &PduConfig,
        out: &mut Vec<u8>,
        start: usize,
    ) -> Result<Option<[u8; DIGEST_LEN]>, EncodeError> {
        let ty = self.pdu_type();
        let hlen = ty.hlen();
        out.resize(start + hlen, 0);
        let hdr = &mut out[start..];
        let mut fl = 0u8;
        match self {
            Pdu::IcReq(ic) => {
                if ic.hpda > MAX_PDA {
                    return Err(EncodeError::InvalidField("HPDA"));
                }
                put_u16(hdr, 8, PFV_1_0);
                put_u8(hdr, 10, ic.hpda);
                put_u8(hdr, 11, dgst_bits(ic.hdgst, ic.ddgst));
                put_u32(hdr, 12, ic.maxr2t);
            }
            Pdu::IcResp(ic) => {
                if ic.cpda > MAX_PDA {
                    return Err(EncodeError::InvalidField("CPDA"));
                }
                if ic.maxh2cdata < MIN_MAXH2CDATA || ic.maxh2cdata % 4 != 0 {
                    return Err(EncodeError::InvalidField("MAXH2CDATA"));
                }
                put_u16(hdr, 8, PFV_1_0);
                put_u8(hdr, 10, ic.cpda);
                put_u8(hdr, 11, dgst_bits(ic.hdgst, ic.ddgst));
                put_u32(hdr, 12, ic.maxh2cdata);
            }
            Pdu::H2CTermReq(t) | Pdu::C2HTermReq(t) => {
                if t.data.len() > TERM_REQ_MAX_DATA {
                    return Err(EncodeError::DataTooLarge);
                }
                put_u16(hdr, 8, t.fes);
                put_u32(hdr, 10, t.fei);
            }
            Pdu::CapsuleCmd(c) => put_bytes(hdr, CH_LEN, &c.sqe.encode()),
            Pdu::CapsuleResp(r) => put_bytes(hdr, CH_LEN, &r.cqe.encode()),
            Pdu::H2CData(d) => {
                put_u16(hdr, 8, d.cid.0);
                put_u16(hdr, 10, d.ttag);
                put_data_fields(hdr, d.offset, d.data.len())?;
                if d.last {
                    fl |= flags::LAST_PDU;
                }
            }
            Pdu::C2HData(d) => {
                if d.success && !d.last {
                    return Err(EncodeError::InvalidField("SUCCESS without LAST_PDU"));
                }
                put_u16(hdr, 8, d.cid.0);
                put_data_fields(hdr, d.offset, d.data.len())?;
                if d.last {
                    fl |= flags::LAST_PDU;
                }
                if d.success {
                    fl |= flags::SUCCESS;
                }
            }
            Pdu::R2t(r) => {
                if r.len == 0 {
                    return Err(EncodeError::InvalidField("R2TL"));
                }
                put_u16(hdr, 8, r.cid.0);
                put_u16(hdr, 10, r.ttag);
                put_u32(hdr, 12, r.offset);
                put_u32(hdr, 16, r.len);
            }
        }
        let data = self.data();
        let digests = ty.has_digests();
        let hd = digests && cfg.hdgst;
        let dd = digests && cfg.ddgst && !data.is_empty();
        if hd {
            fl |= flags::HDGSTF;
        }
        if dd {
            fl |= flags::DDGSTF;
        }
        let header_end = hlen + if hd { DIGEST_LEN } else { 0 };
        let (pdo, data_start) = if ty.has_pdo_data() && !data.is_empty() {
            let a = cfg.alignment(ty);
            let p = header_end.div_ceil(a) * a;
            (
                u8::try_from(p).map_err(|_| EncodeError::InvalidField("PDO"))?,
                p,
            )
        } else {
            (0, header_end)
        };
        let plen = data_start
            .checked_add(data.len())
            .and_then(|n| n.checked_add(if dd { DIGEST_LEN } else { 0 }))
            .and_then(|n| u32::try_from(n).ok())
            .ok_or(EncodeError::DataTooLarge)?;
        let ch = CommonHeader {
            pdu_type: ty as u8,
            flags: fl,
            hlen: u8::try_from(hlen).map_err(|_| EncodeError::InvalidField("HLEN"))?,
            pdo,
            plen,
        };
        put_bytes(hdr, 0, &ch.encode());
        if hd {
            let d = crc32c::crc32c(&out[start..start + hlen]);
            out.extend_from_slice(&d.to_le_bytes());
        }
        out.resize(start + data_start, 0);
        Ok(dd.then(|| crc32c::crc32c(data).to_le_bytes()))
    }

    /// Encodes the whole PDU, appending to `out`. Returns its length.
    pub fn encode(&self, cfg: &PduConfig, out: &mut Vec<u8>) -> Result<usize, EncodeError> {
        let parts = self.encode_parts(cfg)?;
        let start = out.len();
        out.extend_from_slice(&parts.header);
        out.extend_from_slice(self.data());
        if let Some(d) = parts.data_digest {
            out.extend_from_slice(&d);
        }
        Ok(out.len() - start)
    }

    /// Encodes into a new vector.
    pub fn to_vec(&self, cfg: &PduConfig) -> Result<Vec<u8>, EncodeError> {
        let mut v = Vec::new();
        self.encode(cfg, &mut v)?;
        Ok(v)
    }
}

fn dgst_bits(h: bool, d: bool) -> u8 {
    (if h { dgst::HDGST_ENABLE } else { 0 }) | (if d { dgst::DDGST_ENABLE } else { 0 })
}

fn put_data_fields(hdr: &mut [u8], offset: u32, len: usize) -> Result<(), EncodeError> {
    if len == 0 {
        return Err(EncodeError::EmptyData);
    }
    let datal = u32::try_from(len).map_err(|_| EncodeError::DataTooLarge)?;
    if offset.checked_add(datal).is_none() {
        return Err(EncodeError::DataTooLarge);
    }
    put_u32(hdr, 12, offset);
    put_u32(hdr, 16, datal);
    Ok(())
}

#[cfg(test)]
mod tests;
