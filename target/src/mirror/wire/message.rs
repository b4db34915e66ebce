//! Typed messages: their message-header layouts, payloads, validation and
//! encoding.
//!
//! Each type has a fixed-size message header (see [`MsgType::msg_header_len`])
//! and an optional payload. Bulk data (Write, ReadResp) is borrowed from the
//! input on decode and from the caller on encode, so it is never copied by the
//! codec; variable-length lists (extents, capacities, digests, names, error
//! text) travel in the payload with their count in the message header, and the
//! payload length must equal count × entry size exactly. The same `validate`
//! runs on encode and decode, so everything we send is something we accept.
//! Lists are decoded into `Vec`s only after their length was checked against
//! the payload actually received, which the framer bounded: no allocation is
//! sized from an unchecked field.

use super::codec::{Reader, Writer};
use super::error::WireError;
use super::frame::{seal_header, Frame, FrameLimits, MsgType, FRAME_HEADER_LEN};
use super::types::*;
use crate::units::{ByteLen, ByteOffset};

/// Longest Error message text, in bytes.
pub const MAX_ERROR_TEXT: usize = 1024;
/// Most storage servers in one capacity report.
pub const MAX_CAPACITY_ENTRIES: usize = 4096;
/// Most extents in one allocation.
pub const MAX_EXTENTS: usize = 4096;
/// Smallest digest region.
pub const MIN_DIGEST_REGION: u32 = 512;
/// Largest digest region.
pub const MAX_DIGEST_REGION: u32 = 1 << 30;
/// Size of a handshake nonce.
pub const NONCE_LEN: usize = 32;
/// Size of a handshake proof (HMAC-SHA256).
pub const PROOF_LEN: usize = 32;

const CAPACITY_ENTRY_LEN: usize = 24;
const EXTENT_ENTRY_LEN: usize = 32;

/// Flags of Write and WriteZeroes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct WriteFlags(pub u32);

impl WriteFlags {
    /// Forced unit access: durable on the leg before it is acknowledged.
    pub const FUA: WriteFlags = WriteFlags(1);
    /// Part of a resync, not an application write.
    pub const RESYNC: WriteFlags = WriteFlags(2);
    /// WriteZeroes only: the leg may deallocate instead of writing zeroes.
    pub const MAY_UNMAP: WriteFlags = WriteFlags(4);

    /// Whether every bit of `other` is set.
    pub fn contains(self, other: WriteFlags) -> bool {
        self.0 & other.0 == other.0
    }

    /// Union.
    pub fn union(self, other: WriteFlags) -> WriteFlags {
        WriteFlags(self.0 | other.0)
    }
}

/// Flags of a GenerationExchange.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct GenerationFlags(pub u32);

impl GenerationFlags {
    /// The sender is the primary (source of application writes).
    pub const PRIMARY: GenerationFlags = GenerationFlags(1);
    /// The sender's data is up to date (consistent and current).
    pub const UP_TO_DATE: GenerationFlags = GenerationFlags(2);
    /// The sender crashed while primary (its bitmap may be incomplete).
    pub const CRASHED_PRIMARY: GenerationFlags = GenerationFlags(4);
    const KNOWN: u32 = 7;
}

/// Handshake opening: who I am, what I speak, my nonce.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hello {
    /// Sender's role.
    pub role: Role,
    /// Versions the sender can speak.
    pub versions: VersionRange,
    /// Fresh random nonce.
    pub nonce: [u8; NONCE_LEN],
    /// Sender's site name.
    pub name: SiteName,
}

/// Handshake proof: HMAC over the transcript, and the chosen version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HelloAck {
    /// Negotiated version.
    pub version: ProtocolVersion,
    /// HMAC-SHA256 proof of the shared secret.
    pub proof: [u8; PROOF_LEN],
}

/// Fatal error report; the sender closes the connection after it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ErrorMsg {
    /// Error code.
    pub code: ErrorCode,
    /// Human-readable detail, at most [`MAX_ERROR_TEXT`] bytes of UTF-8.
    pub text: String,
}

/// A replicated write; the payload is the data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Write<'a> {
    /// Mirror.
    pub mirror: MirrorId,
    /// Position in the mirror's write stream.
    pub seq: SeqNo,
    /// Epoch the write belongs to.
    pub epoch: Epoch,
    /// FUA, RESYNC.
    pub flags: WriteFlags,
    /// Byte offset in the mirror.
    pub offset: ByteOffset,
    /// The data (1 byte up to the payload limit).
    pub data: &'a [u8],
}

/// Completion of a Write, WriteZeroes or Unmap (the frame tag names the request).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WriteAck {
    /// Sequence number of the request.
    pub seq: SeqNo,
    /// Outcome.
    pub status: Status,
}

/// Flush everything acknowledged so far to stable storage.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Flush {
    /// Mirror.
    pub mirror: MirrorId,
    /// Sequence number of the flush in the write stream.
    pub seq: SeqNo,
    /// Epoch.
    pub epoch: Epoch,
}

/// Completion of a Flush.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FlushAck {
    /// Sequence number of the flush.
    pub seq: SeqNo,
    /// Outcome.
    pub status: Status,
}

/// Read a range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Read {
    /// Mirror.
    pub mirror: MirrorId,
    /// Start.
    pub offset: ByteOffset,
    /// Length, 1 byte up to the payload limit (the answer must fit a frame).
    pub len: ByteLen,
}

/// Data of a Read; empty unless the status is Ok.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReadResp<'a> {
    /// Outcome.
    pub status: Status,
    /// The data.
    pub data: &'a [u8],
}

/// Write zeroes to a range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WriteZeroes {
    /// Mirror.
    pub mirror: MirrorId,
    /// Position in the write stream.
    pub seq: SeqNo,
    /// Epoch.
    pub epoch: Epoch,
    /// FUA, RESYNC, MAY_UNMAP.
    pub flags: WriteFlags,
    /// Start.
    pub offset: ByteOffset,
    /// Length, at least 1.
    pub len: ByteLen,
}

/// Discard a range (contents afterwards unspecified).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Unmap {
    /// Mirror.
    pub mirror: MirrorId,
    /// Position in the write stream.
    pub seq: SeqNo,
    /// Epoch.
    pub epoch: Epoch,
    /// Start.
    pub offset: ByteOffset,
    /// Length, at least 1.
    pub len: ByteLen,
}

/// Ask for one digest per `region_size` bytes of a range (last region may be short).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RangeDigest {
    /// Mirror.
    pub mirror: MirrorId,
    /// Start.
    pub offset: ByteOffset,
    /// Length, at least 1.
    pub len: ByteLen,
    /// Region size: a power of two from 512 B to 1 GiB.
    pub region_size: u32,
    /// Digest algorithm.
    pub algo: DigestAlgo,
}

impl RangeDigest {
    /// Number of regions the range splits into.
    pub fn region_count(&self) -> u64 {
        region_count(self.len, self.region_size)
    }
}

fn region_count(len: ByteLen, region_size: u32) -> u64 {
    let r = u64::from(region_size.max(1));
    len.0 / r + u64::from(len.0 % r != 0)
}

/// A packed list of equal-size digests, borrowed from the payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct DigestList<'a> {
    bytes: &'a [u8],
}

impl<'a> DigestList<'a> {
    /// SHA-256 digests.
    pub fn from_sha256(digests: &'a [[u8; 32]]) -> Self {
        DigestList {
            bytes: digests.as_flattened(),
        }
    }

    /// Packed SHA-256 digests (e.g. straight from a pool buffer), or `None`
    /// if the length is not a multiple of 32.
    pub fn from_packed(bytes: &'a [u8]) -> Option<Self> {
        (bytes.len() % 32 == 0).then_some(DigestList { bytes })
    }

    /// Packed bytes.
    pub fn as_bytes(&self) -> &'a [u8] {
        self.bytes
    }

    /// Number of SHA-256 digests.
    pub fn len(&self) -> usize {
        self.bytes.len() / 32
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }

    /// The SHA-256 digests in region order.
    pub fn iter(&self) -> impl Iterator<Item = &'a [u8; 32]> + 'a {
        self.bytes
            .chunks_exact(32)
            .filter_map(|c| c.first_chunk::<32>())
    }
}

/// Per-region digests of a range; empty unless the status is Ok.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RangeDigestResp<'a> {
    /// The request's range, echoed so a response is self-describing.
    pub range: RangeDigest,
    /// Outcome.
    pub status: Status,
    /// One digest per region, in order.
    pub digests: DigestList<'a>,
}

/// Marks where the write stream splits: writes before `seq` belong to the old
/// epoch, `seq` onwards to `epoch`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SplitMarker {
    /// Mirror.
    pub mirror: MirrorId,
    /// New epoch.
    pub epoch: Epoch,
    /// First sequence number of the new epoch.
    pub seq: SeqNo,
}

/// Most bytes of a split image's name in a [`SplitCtl`].
pub const MAX_SPLIT_NAME: usize = 255;
/// Most bytes of a [`SplitCtlResp`] bitmap (8 Mi regions: 512 GiB at 64 KiB).
pub const MAX_SPLIT_BITMAP: usize = 1 << 20;

/// What a [`SplitCtl`] asks of the site hosting a leg.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SplitOp {
    /// Stop taking the primary's writes for the leg, persist the split
    /// point and expose the frozen data as a volume named `name`.
    Freeze,
    /// Report the regions written into the image since the split (the
    /// image stops taking writes first, so the answer is final).
    Query,
    /// Drop the image and take the primary's writes again (rejoin).
    End,
    /// Detach the image from the mirror: an independent volume.
    Promote,
}

impl SplitOp {
    /// The wire value.
    pub fn to_wire(self) -> u32 {
        match self {
            SplitOp::Freeze => 1,
            SplitOp::Query => 2,
            SplitOp::End => 3,
            SplitOp::Promote => 4,
        }
    }

    /// From the wire value.
    pub fn from_wire(v: u32) -> Option<SplitOp> {
        Some(match v {
            1 => SplitOp::Freeze,
            2 => SplitOp::Query,
            3 => SplitOp::End,
            4 => SplitOp::Promote,
            _ => return None,
        })
    }
}

/// Split control (agent connection, primary to the leg's site).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SplitCtl {
    /// Mirror.
    pub mirror: MirrorId,
    /// The leg (its id within the mirror; a site may host several).
    pub leg: LegId,
    /// Operation.
    pub op: SplitOp,
    /// Freeze: the image takes writes (a writable clone).
    pub writable: bool,
    /// Split point: first epoch after the split.
    pub epoch: Epoch,
    /// Split point: first sequence number after the split.
    pub seq: SeqNo,
    /// Region size of the image's written-regions bitmap (a power of two, 4 KiB to 1 GiB).
    pub region_size: u32,
    /// Image volume name (Freeze), at most [`MAX_SPLIT_NAME`] bytes of UTF-8.
    pub name: String,
}

/// Answer to a [`SplitCtl`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SplitCtlResp {
    /// Mirror.
    pub mirror: MirrorId,
    /// Outcome.
    pub status: Status,
    /// Region size of `bitmap`.
    pub region_size: u32,
    /// Query: one bit per region written into the image since the split
    /// (LSB first), at most [`MAX_SPLIT_BITMAP`] bytes; empty otherwise.
    pub bitmap: Vec<u8>,
}

/// Liveness probe.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Heartbeat {
    /// Sender's probe counter.
    pub counter: u64,
    /// Sender's clock at send.
    pub sent: Timestamp,
}

/// Liveness answer; with `sent`, gives the round trip time and clock offset
/// (NTP style).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HeartbeatAck {
    /// The probe's counter.
    pub counter: u64,
    /// The probe's `sent`, echoed.
    pub echo_sent: Timestamp,
    /// Responder's clock at receipt.
    pub received: Timestamp,
    /// Responder's clock at reply; not before `received`.
    pub replied: Timestamp,
}

/// One storage server's capacity.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServerCapacity {
    /// The server.
    pub server: StorageServerId,
    /// Its health.
    pub health: Health,
    /// Total bytes.
    pub total: ByteLen,
    /// Free bytes; at most `total`.
    pub free: ByteLen,
}

/// A domain agent's capacity report to the master agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CapacityReport {
    /// Reporting domain.
    pub domain: DomainId,
    /// When the numbers were taken.
    pub reported_at: Timestamp,
    /// Servers, sorted by id, no duplicates, at most [`MAX_CAPACITY_ENTRIES`].
    pub servers: Vec<ServerCapacity>,
}

/// Ask the master agent for a mirror leg of `size` bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AllocateRequest {
    /// Mirror the leg is for.
    pub mirror: MirrorId,
    /// Bytes, at least 1.
    pub size: ByteLen,
    /// Domain asking.
    pub domain: DomainId,
    /// Which leg of the mirror (0 for the first; a mirror can hold several
    /// legs in one domain, on different storage servers). Was reserved
    /// (zero) before third-leg allocation: old senders ask for leg 0.
    pub leg: LegId,
}

/// One piece of a virtual mirror device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Extent {
    /// Server holding it.
    pub server: StorageServerId,
    /// Offset on the server's device.
    pub device_offset: ByteOffset,
    /// Length, at least 1.
    pub len: ByteLen,
    /// Offset in the mirror.
    pub logical_offset: ByteOffset,
}

/// Result of an allocation: an extent map, or an error status and no extents.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AllocateResponse {
    /// Mirror.
    pub mirror: MirrorId,
    /// Outcome.
    pub status: Status,
    /// If Ok: 1 to [`MAX_EXTENTS`] extents sorted by logical offset, not
    /// overlapping logically nor on any server's device.
    pub extents: Vec<Extent>,
}

/// Release a mirror leg and its extents.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReleaseRequest {
    /// Mirror.
    pub mirror: MirrorId,
    /// Domain releasing.
    pub domain: DomainId,
    /// Which leg of the mirror (was reserved, zero: leg 0).
    pub leg: LegId,
}

/// Completion of a release.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReleaseAck {
    /// Mirror.
    pub mirror: MirrorId,
    /// Outcome.
    pub status: Status,
}

/// A leg's generation ids, exchanged on connect to pick the resync direction
/// (DRBD's UUID scheme: equal current ids mean no resync; a peer's bitmap id
/// equal to our current id means the peer has a bitmap against us; anything
/// else needs a full sync or an operator).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GenerationExchange {
    /// Mirror.
    pub mirror: MirrorId,
    /// Leg sending.
    pub leg: LegId,
    /// Current generation of the leg's data.
    pub current: Generation,
    /// Generation at which the leg's dirty bitmap started (0: no bitmap).
    pub bitmap: Generation,
    /// Previous generations, newest first (0: none).
    pub history: [Generation; 2],
    /// PRIMARY, UP_TO_DATE, CRASHED_PRIMARY.
    pub flags: GenerationFlags,
}

/// Every message of the protocol. `'a` is the lifetime of borrowed payloads.
#[derive(Debug, Clone, PartialEq, Eq)]
#[allow(missing_docs)]
pub enum Message<'a> {
    Hello(Hello),
    HelloAck(HelloAck),
    Error(ErrorMsg),
    Write(Write<'a>),
    WriteAck(WriteAck),
    Flush(Flush),
    FlushAck(FlushAck),
    Read(Read),
    ReadResp(ReadResp<'a>),
    WriteZeroes(WriteZeroes),
    Unmap(Unmap),
    RangeDigest(RangeDigest),
    RangeDigestResp(RangeDigestResp<'a>),
    SplitMarker(SplitMarker),
    SplitCtl(SplitCtl),
    SplitCtlResp(SplitCtlResp),
    Heartbeat(Heartbeat),
    HeartbeatAck(HeartbeatAck),
    CapacityReport(CapacityReport),
    AllocateRequest(AllocateRequest),
    AllocateResponse(AllocateResponse),
    ReleaseRequest(ReleaseRequest),
    ReleaseAck(ReleaseAck),
    GenerationExchange(GenerationExchange),
}

/// An encoded frame: `buf[..len]` then `trailer`, as two iovecs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Encoded<'a> {
    /// Bytes written to the caller's buffer (headers, and small list payloads).
    pub len: usize,
    /// Borrowed bulk payload to send right after, uncopied (may be empty).
    pub trailer: &'a [u8],
}

fn invalid(msg: MsgType, field: &'static str, reason: &'static str) -> WireError {
    WireError::InvalidField { msg, field, reason }
}

fn check_range(msg: MsgType, offset: u64, len: u64) -> Result<(), WireError> {
    if len == 0 {
        return Err(invalid(msg, "length", "must not be zero"));
    }
    offset
        .checked_add(len)
        .map(|_| ())
        .ok_or(WireError::RangeOverflow { msg, offset, len })
}

fn check_flags(msg: MsgType, flags: u32, allowed: u32) -> Result<(), WireError> {
    match flags & !allowed {
        0 => Ok(()),
        bad => Err(WireError::UnknownFlags { msg, flags: bad }),
    }
}

fn status(msg: MsgType, v: u32) -> Result<Status, WireError> {
    Status::from_wire(v).ok_or(invalid(msg, "status", "unknown status code"))
}

fn payload_len_is(msg: MsgType, payload: &[u8], declared: u64) -> Result<(), WireError> {
    if payload.len() as u64 == declared {
        Ok(())
    } else {
        Err(WireError::PayloadLength {
            msg,
            declared,
            actual: payload.len() as u64,
        })
    }
}

fn count_of(msg: MsgType, what: &'static str, count: u64, max: usize) -> Result<(), WireError> {
    if count > max as u64 {
        Err(WireError::TooMany {
            msg,
            what,
            count,
            max: max as u64,
        })
    } else {
        Ok(())
    }
}

fn check_data_len(msg: MsgType, len: u64, limits: &FrameLimits) -> Result<(), WireError> {
    if len > u64::from(limits.max_payload()) {
        return Err(WireError::TooMany {
            msg,
            what: "bytes",
            count: len,
            max: u64::from(limits.max_payload()),
        });
    }
    Ok(())
}

fn check_digest_range(
    msg: MsgType,
    r: &RangeDigest,
    limits: &FrameLimits,
) -> Result<(), WireError> {
    check_range(msg, r.offset.0, r.len.0)?;
    if !r.region_size.is_power_of_two()
        || !(MIN_DIGEST_REGION..=MAX_DIGEST_REGION).contains(&r.region_size)
    {
        return Err(invalid(
            msg,
            "region size",
            "not a power of two in 512..=1GiB",
        ));
    }
    let max = limits.max_payload() as usize / r.algo.digest_len();
    count_of(msg, "digest regions", r.region_count(), max)
}

fn read_version(r: &mut Reader<'_>) -> Result<ProtocolVersion, WireError> {
    Ok(ProtocolVersion::new(r.u8()?, r.u8()?))
}

fn read_digest_range(r: &mut Reader<'_>, msg: MsgType) -> Result<RangeDigest, WireError> {
    let mirror = MirrorId(r.u64()?);
    let offset = ByteOffset(r.u64()?);
    let len = ByteLen(r.u64()?);
    let region_size = r.u32()?;
    let algo = DigestAlgo::from_wire(r.u8()?).ok_or(invalid(msg, "digest algorithm", "unknown"))?;
    r.reserved::<3>()?;
    Ok(RangeDigest {
        mirror,
        offset,
        len,
        region_size,
        algo,
    })
}

fn write_digest_range(w: &mut Writer<'_>, d: &RangeDigest) -> Result<(), WireError> {
    w.u64(d.mirror.0)?;
    w.u64(d.offset.0)?;
    w.u64(d.len.0)?;
    w.u32(d.region_size)?;
    w.u8(d.algo.to_wire())?;
    w.zeros(3)
}

fn validate_extents(msg: MsgType, extents: &[Extent]) -> Result<(), WireError> {
    count_of(msg, "extents", extents.len() as u64, MAX_EXTENTS)?;
    let mut logical_end = 0u64;
    for e in extents {
        check_range(msg, e.device_offset.0, e.len.0)?;
        check_range(msg, e.logical_offset.0, e.len.0)?;
        if e.logical_offset.0 < logical_end {
            return Err(invalid(
                msg,
                "extent map",
                "not sorted by logical offset or overlapping",
            ));
        }
        logical_end = e.logical_offset.0.saturating_add(e.len.0);
    }
    // Device ranges on one server must not overlap either. Bounded by MAX_EXTENTS.
    let mut by_device: Vec<(u32, u64, u64)> = extents
        .iter()
        .map(|e| (e.server.0, e.device_offset.0, e.len.0))
        .collect();
    by_device.sort_unstable();
    for pair in by_device.windows(2) {
        if let [a, b] = pair {
            if a.0 == b.0 && a.1.saturating_add(a.2) > b.1 {
                return Err(invalid(msg, "extent map", "extents overlap on a device"));
            }
        }
    }
    Ok(())
}

impl<'a> Message<'a> {
    /// The message's type.
    pub fn msg_type(&self) -> MsgType {
        match self {
            Message::Hello(_) => MsgType::Hello,
            Message::HelloAck(_) => MsgType::HelloAck,
            Message::Error(_) => MsgType::Error,
            Message::Write(_) => MsgType::Write,
            Message::WriteAck(_) => MsgType::WriteAck,
            Message::Flush(_) => MsgType::Flush,
            Message::FlushAck(_) => MsgType::FlushAck,
            Message::Read(_) => MsgType::Read,
            Message::ReadResp(_) => MsgType::ReadResp,
            Message::WriteZeroes(_) => MsgType::WriteZeroes,
            Message::Unmap(_) => MsgType::Unmap,
            Message::RangeDigest(_) => MsgType::RangeDigest,
            Message::RangeDigestResp(_) => MsgType::RangeDigestResp,
            Message::SplitMarker(_) => MsgType::SplitMarker,
            Message::SplitCtl(_) => MsgType::SplitCtl,
            Message::SplitCtlResp(_) => MsgType::SplitCtlResp,
            Message::Heartbeat(_) => MsgType::Heartbeat,
            Message::HeartbeatAck(_) => MsgType::HeartbeatAck,
            Message::CapacityReport(_) => MsgType::CapacityReport,
            Message::AllocateRequest(_) => MsgType::AllocateRequest,
            Message::AllocateResponse(_) => MsgType::AllocateResponse,
            Message::ReleaseRequest(_) => MsgType::ReleaseRequest,
            Message::ReleaseAck(_) => MsgType::ReleaseAck,
            Message::GenerationExchange(_) => MsgType::GenerationExchange,
        }
    }

    /// Checks the invariants every message must hold, on send and on receipt.
    pub fn validate(&self, limits: &FrameLimits) -> Result<(), WireError> {
        let t = self.msg_type();
        match self {
            Message::Hello(_) | Message::HelloAck(_) => Ok(()),
            Message::Error(e) => count_of(
                t,
                "bytes of error text",
                e.text.len() as u64,
                MAX_ERROR_TEXT,
            ),
            Message::Write(w) => {
                check_flags(t, w.flags.0, WriteFlags::FUA.0 | WriteFlags::RESYNC.0)?;
                check_range(t, w.offset.0, w.data.len() as u64)?;
                check_data_len(t, w.data.len() as u64, limits)
            }
            Message::WriteAck(_) | Message::FlushAck(_) | Message::Flush(_) => Ok(()),
            Message::Read(r) => {
                check_range(t, r.offset.0, r.len.0)?;
                check_data_len(t, r.len.0, limits)
            }
            Message::ReadResp(r) => {
                if r.status != Status::Ok && !r.data.is_empty() {
                    return Err(invalid(t, "data", "present with an error status"));
                }
                check_data_len(t, r.data.len() as u64, limits)
            }
            Message::WriteZeroes(z) => {
                let allowed = WriteFlags::FUA.0 | WriteFlags::RESYNC.0 | WriteFlags::MAY_UNMAP.0;
                check_flags(t, z.flags.0, allowed)?;
                check_range(t, z.offset.0, z.len.0)
            }
            Message::Unmap(u) => check_range(t, u.offset.0, u.len.0),
            Message::RangeDigest(r) => check_digest_range(t, r, limits),
            Message::RangeDigestResp(r) => {
                check_digest_range(t, &r.range, limits)?;
                let dl = r.range.algo.digest_len();
                if r.digests.as_bytes().len() % dl != 0 {
                    return Err(invalid(t, "digests", "not a whole number of digests"));
                }
                let count = (r.digests.as_bytes().len() / dl) as u64;
                let expected = if r.status == Status::Ok {
                    r.range.region_count()
                } else {
                    0
                };
                if count != expected {
                    return Err(invalid(
                        t,
                        "digests",
                        "count does not match the regions of the range",
                    ));
                }
                Ok(())
            }
            Message::SplitMarker(_) | Message::Heartbeat(_) => Ok(()),
            Message::SplitCtl(c) => {
                count_of(
                    t,
                    "bytes of image name",
                    c.name.len() as u64,
                    MAX_SPLIT_NAME,
                )?;
                if !c.region_size.is_power_of_two() || !(4096..=1 << 30).contains(&c.region_size) {
                    return Err(invalid(
                        t,
                        "region_size",
                        "not a power of two from 4 KiB to 1 GiB",
                    ));
                }
                Ok(())
            }
            Message::SplitCtlResp(r) => {
                count_of(
                    t,
                    "bytes of bitmap",
                    r.bitmap.len() as u64,
                    MAX_SPLIT_BITMAP,
                )?;
                if r.status != Status::Ok && !r.bitmap.is_empty() {
                    return Err(invalid(t, "bitmap", "present with an error status"));
                }
                Ok(())
            }
            Message::HeartbeatAck(h) => {
                if h.replied < h.received {
                    return Err(invalid(t, "replied", "before received"));
                }
                Ok(())
            }
            Message::CapacityReport(c) => {
                count_of(t, "servers", c.servers.len() as u64, MAX_CAPACITY_ENTRIES)?;
                let mut prev: Option<StorageServerId> = None;
                for s in &c.servers {
                    if s.free > s.total {
                        return Err(invalid(t, "free", "exceeds total"));
                    }
                    if prev.is_some_and(|p| p >= s.server) {
                        return Err(invalid(t, "servers", "not sorted by id or duplicated"));
                    }
                    prev = Some(s.server);
                }
                Ok(())
            }
            Message::AllocateRequest(a) => {
                if a.size.0 == 0 {
                    return Err(invalid(t, "size", "must not be zero"));
                }
                Ok(())
            }
            Message::AllocateResponse(a) => {
                match (a.status == Status::Ok, a.extents.is_empty()) {
                    (true, true) => return Err(invalid(t, "extent map", "empty on success")),
                    (false, false) => {
                        return Err(invalid(t, "extent map", "present with an error status"))
                    }
                    _ => {}
                }
                validate_extents(t, &a.extents)
            }
            Message::ReleaseRequest(_) | Message::ReleaseAck(_) => Ok(()),
            Message::GenerationExchange(g) => check_flags(t, g.flags.0, GenerationFlags::KNOWN),
        }
    }

    /// Bytes of payload the encoder serialises into the caller's buffer.
    fn inline_payload_len(&self) -> usize {
        match self {
            Message::Hello(h) => h.name.as_str().len(),
            Message::Error(e) => e.text.len(),
            Message::SplitCtl(c) => c.name.len(),
            Message::SplitCtlResp(r) => r.bitmap.len(),
            Message::CapacityReport(c) => c.servers.len().saturating_mul(CAPACITY_ENTRY_LEN),
            Message::AllocateResponse(a) => a.extents.len().saturating_mul(EXTENT_ENTRY_LEN),
            _ => 0,
        }
    }

    /// Borrowed payload sent as its own iovec.
    fn trailer(&self) -> &'a [u8] {
        match self {
            Message::Write(w) => w.data,
            Message::ReadResp(r) => r.data,
            Message::RangeDigestResp(r) => r.digests.as_bytes(),
            _ => &[],
        }
    }

    /// Bytes [`Message::encode`] writes into the caller's buffer.
    pub fn encoded_head_len(&self) -> usize {
        self.msg_type()
            .header_len()
            .saturating_add(self.inline_payload_len())
    }

    /// Whole frame length.
    pub fn encoded_len(&self) -> usize {
        self.encoded_head_len().saturating_add(self.trailer().len())
    }

    fn write_msg_header(&self, w: &mut Writer<'_>) -> Result<(), WireError> {
        match self {
            Message::Hello(h) => {
                w.u8(h.role.to_wire())?;
                w.u8(u8::try_from(h.name.as_str().len()).unwrap_or(u8::MAX))?;
                w.u8(h.versions.min().major)?;
                w.u8(h.versions.min().minor)?;
                w.u8(h.versions.max().major)?;
                w.u8(h.versions.max().minor)?;
                w.zeros(2)?;
                w.bytes(&h.nonce)
            }
            Message::HelloAck(a) => {
                w.u8(a.version.major)?;
                w.u8(a.version.minor)?;
                w.zeros(6)?;
                w.bytes(&a.proof)
            }
            Message::Error(e) => {
                w.u32(e.code.to_wire())?;
                w.u32(u32::try_from(e.text.len()).unwrap_or(u32::MAX))
            }
            Message::Write(x) => {
                w.u64(x.mirror.0)?;
                w.u64(x.seq.0)?;
                w.u32(x.epoch.0)?;
                w.u32(x.flags.0)?;
                w.u64(x.offset.0)?;
                w.u32(u32::try_from(x.data.len()).unwrap_or(u32::MAX))?;
                w.zeros(4)
            }
            Message::WriteAck(a) => {
                w.u64(a.seq.0)?;
                w.u32(a.status.to_wire())?;
                w.zeros(4)
            }
            Message::Flush(f) => {
                w.u64(f.mirror.0)?;
                w.u64(f.seq.0)?;
                w.u32(f.epoch.0)?;
                w.zeros(4)
            }
            Message::FlushAck(a) => {
                w.u64(a.seq.0)?;
                w.u32(a.status.to_wire())?;
                w.zeros(4)
            }
            Message::Read(r) => {
                w.u64(r.mirror.0)?;
                w.u64(r.offset.0)?;
                w.u32(u32::try_from(r.len.0).unwrap_or(u32::MAX))?;
                w.zeros(4)
            }
            Message::ReadResp(r) => {
                w.u32(r.status.to_wire())?;
                w.u32(u32::try_from(r.data.len()).unwrap_or(u32::MAX))
            }
            Message::WriteZeroes(z) => {
                w.u64(z.mirror.0)?;
                w.u64(z.seq.0)?;
                w.u32(z.epoch.0)?;
                w.u32(z.flags.0)?;
                w.u64(z.offset.0)?;
                w.u64(z.len.0)
            }
            Message::Unmap(u) => {
                w.u64(u.mirror.0)?;
                w.u64(u.seq.0)?;
                w.u32(u.epoch.0)?;
                w.zeros(4)?;
                w.u64(u.offset.0)?;
                w.u64(u.len.0)
            }
            Message::RangeDigest(d) => write_digest_range(w, d),
            Message::RangeDigestResp(d) => {
                write_digest_range(w, &d.range)?;
                w.u32(d.status.to_wire())?;
                let n = d.digests.as_bytes().len() / d.range.algo.digest_len();
                w.u32(u32::try_from(n).unwrap_or(u32::MAX))
            }
            Message::SplitMarker(s) => {
                w.u64(s.mirror.0)?;
                w.u32(s.epoch.0)?;
                w.zeros(4)?;
                w.u64(s.seq.0)
            }
            Message::SplitCtl(c) => {
                w.u64(c.mirror.0)?;
                w.u64(c.seq.0)?;
                w.u32(c.epoch.0)?;
                w.u32(c.op.to_wire())?;
                w.u32(u32::from(c.writable))?;
                w.u32(c.region_size)?;
                w.u32(u32::try_from(c.name.len()).unwrap_or(u32::MAX))?;
                w.u32(c.leg.0)
            }
            Message::SplitCtlResp(r) => {
                w.u64(r.mirror.0)?;
                w.u32(r.status.to_wire())?;
                w.u32(r.region_size)?;
                w.u32(u32::try_from(r.bitmap.len()).unwrap_or(u32::MAX))?;
                w.zeros(4)
            }
            Message::Heartbeat(h) => {
                w.u64(h.counter)?;
                w.u64(h.sent.0)
            }
            Message::HeartbeatAck(h) => {
                w.u64(h.counter)?;
                w.u64(h.echo_sent.0)?;
                w.u64(h.received.0)?;
                w.u64(h.replied.0)
            }
            Message::CapacityReport(c) => {
                w.u32(c.domain.0)?;
                w.u32(u32::try_from(c.servers.len()).unwrap_or(u32::MAX))?;
                w.u64(c.reported_at.0)
            }
            Message::AllocateRequest(a) => {
                w.u64(a.mirror.0)?;
                w.u64(a.size.0)?;
                w.u32(a.domain.0)?;
                w.u32(a.leg.0)
            }
            Message::AllocateResponse(a) => {
                w.u64(a.mirror.0)?;
                w.u32(a.status.to_wire())?;
                w.u32(u32::try_from(a.extents.len()).unwrap_or(u32::MAX))
            }
            Message::ReleaseRequest(r) => {
                w.u64(r.mirror.0)?;
                w.u32(r.domain.0)?;
                w.u32(r.leg.0)
            }
            Message::ReleaseAck(r) => {
                w.u64(r.mirror.0)?;
                w.u32(r.status.to_wire())?;
                w.zeros(4)
            }
            Message::GenerationExchange(g) => {
                w.u64(g.mirror.0)?;
                w.u64(g.current.0)?;
                w.u64(g.bitmap.0)?;
                w.u64(g.history[0].0)?;
                w.u64(g.history[1].0)?;
                w.u32(g.leg.0)?;
                w.u32(g.flags.0)
            }
        }
    }

    fn write_inline_payload(&self, w: &mut Writer<'_>) -> Result<(), WireError> {
        match self {
            Message::Hello(h) => w.bytes(h.name.as_str().as_bytes()),
            Message::Error(e) => w.bytes(e.text.as_bytes()),
            Message::SplitCtl(c) => w.bytes(c.name.as_bytes()),
            Message::SplitCtlResp(r) => w.bytes(&r.bitmap),
            Message::CapacityReport(c) => {
                for s in &c.servers {
                    w.u32(s.server.0)?;
                    w.u8(s.health.to_wire())?;
                    w.zeros(3)?;
                    w.u64(s.total.0)?;
                    w.u64(s.free.0)?;
                }
                Ok(())
            }
            Message::AllocateResponse(a) => {
                for e in &a.extents {
                    w.u32(e.server.0)?;
                    w.zeros(4)?;
                    w.u64(e.device_offset.0)?;
                    w.u64(e.len.0)?;
                    w.u64(e.logical_offset.0)?;
                }
                Ok(())
            }
            _ => Ok(()),
        }
    }

    /// Encodes the message as one frame. Writes the headers (and small list
    /// payloads) into `buf`, which needs [`Message::encoded_head_len`] bytes;
    /// bulk data is not copied but returned as [`Encoded::trailer`], to be
    /// sent right after `buf[..len]`. Refuses messages that fail
    /// [`Message::validate`] or exceed the payload limit.
    pub fn encode(
        &self,
        framer: &super::frame::Framer,
        tag: RequestTag,
        buf: &mut [u8],
    ) -> Result<Encoded<'a>, WireError> {
        let limits = framer.limits();
        self.validate(limits)?;
        let msg_type = self.msg_type();
        let hl = msg_type.header_len();
        let inline = self.inline_payload_len();
        let trailer = self.trailer();
        let payload_len = inline.saturating_add(trailer.len());
        let payload_len = u32::try_from(payload_len)
            .ok()
            .filter(|&l| l <= limits.max_payload())
            .ok_or(WireError::PayloadTooLarge {
                len: u32::try_from(payload_len).unwrap_or(u32::MAX),
                max: limits.max_payload(),
            })?;
        let head_len = hl.saturating_add(inline);
        let available = buf.len();
        let out = buf.get_mut(..head_len).ok_or(WireError::BufferTooSmall {
            needed: head_len,
            available,
        })?;
        let (headers, payload) = out.split_at_mut(hl);
        let mut w = Writer::new(headers.get_mut(FRAME_HEADER_LEN..).unwrap_or_default());
        self.write_msg_header(&mut w)?;
        if w.position() != msg_type.msg_header_len() {
            return Err(invalid(
                msg_type,
                "message header",
                "encoder wrote the wrong size",
            ));
        }
        let mut w = Writer::new(payload);
        self.write_inline_payload(&mut w)?;
        if w.position() != inline {
            return Err(invalid(msg_type, "payload", "encoder wrote the wrong size"));
        }
        let payload_crc = crc32c::crc32c_append(crc32c::crc32c(payload), trailer);
        seal_header(
            headers,
            framer.version(),
            msg_type,
            payload_len,
            tag,
            payload_crc,
        )?;
        Ok(Encoded {
            len: head_len,
            trailer,
        })
    }

    /// Encodes into one contiguous vector (control path and tests; the data
    /// path should use [`Message::encode`] with a reused buffer).
    pub fn encode_to_vec(
        &self,
        framer: &super::frame::Framer,
        tag: RequestTag,
    ) -> Result<Vec<u8>, WireError> {
        self.validate(framer.limits())?;
        let mut buf = vec![0u8; self.encoded_head_len()];
        let enc = self.encode(framer, tag, &mut buf)?;
        buf.truncate(enc.len);
        buf.extend_from_slice(enc.trailer);
        Ok(buf)
    }

    /// Decodes a verified frame's message. Bulk data borrows the frame.
    pub fn decode(frame: &Frame<'a>, limits: &FrameLimits) -> Result<Self, WireError> {
        Self::decode_parts(
            frame.header.msg_type,
            frame.msg_header,
            frame.payload,
            limits,
        )
    }

    /// Decodes a message from its type, message header and payload (without
    /// the framing checks; [`Message::decode`] is the normal entry).
    pub fn decode_parts(
        t: MsgType,
        msg_header: &[u8],
        payload: &'a [u8],
        limits: &FrameLimits,
    ) -> Result<Self, WireError> {
        if msg_header.len() != t.msg_header_len() {
            return Err(WireError::HeaderLength {
                msg: t,
                expected: u16::try_from(t.header_len()).unwrap_or(u16::MAX),
                found: u16::try_from(msg_header.len().saturating_add(FRAME_HEADER_LEN))
                    .unwrap_or(u16::MAX),
            });
        }
        let mut r = Reader::new(msg_header, t);
        let msg = match t {
            MsgType::Hello => {
                let role = Role::from_wire(r.u8()?).ok_or(invalid(t, "role", "unknown"))?;
                let name_len = r.u8()?;
                let min = read_version(&mut r)?;
                let max = read_version(&mut r)?;
                r.reserved::<2>()?;
                let nonce = r.array::<NONCE_LEN>()?;
                payload_len_is(t, payload, u64::from(name_len))?;
                let versions =
                    VersionRange::new(min, max).ok_or(invalid(t, "versions", "min above max"))?;
                let name = SiteName::from_bytes(payload)
                    .map_err(|_| invalid(t, "name", "not a valid site name"))?;
                Message::Hello(Hello {
                    role,
                    versions,
                    nonce,
                    name,
                })
            }
            MsgType::HelloAck => {
                let version = read_version(&mut r)?;
                r.reserved::<6>()?;
                let proof = r.array::<PROOF_LEN>()?;
                payload_len_is(t, payload, 0)?;
                Message::HelloAck(HelloAck { version, proof })
            }
            MsgType::Error => {
                let code = ErrorCode::from_wire(r.u32()?).ok_or(invalid(
                    t,
                    "code",
                    "unknown error code",
                ))?;
                let len = r.u32()?;
                count_of(t, "bytes of error text", u64::from(len), MAX_ERROR_TEXT)?;
                payload_len_is(t, payload, u64::from(len))?;
                let text = std::str::from_utf8(payload)
                    .map_err(|_| invalid(t, "text", "not UTF-8"))?
                    .to_owned();
                Message::Error(ErrorMsg { code, text })
            }
            MsgType::Write => {
                let mirror = MirrorId(r.u64()?);
                let seq = SeqNo(r.u64()?);
                let epoch = Epoch(r.u32()?);
                let flags = WriteFlags(r.u32()?);
                let offset = ByteOffset(r.u64()?);
                let len = r.u32()?;
                r.reserved::<4>()?;
                payload_len_is(t, payload, u64::from(len))?;
                Message::Write(Write {
                    mirror,
                    seq,
                    epoch,
                    flags,
                    offset,
                    data: payload,
                })
            }
            MsgType::WriteAck => {
                let seq = SeqNo(r.u64()?);
                let status = status(t, r.u32()?)?;
                r.reserved::<4>()?;
                payload_len_is(t, payload, 0)?;
                Message::WriteAck(WriteAck { seq, status })
            }
            MsgType::Flush => {
                let mirror = MirrorId(r.u64()?);
                let seq = SeqNo(r.u64()?);
                let epoch = Epoch(r.u32()?);
                r.reserved::<4>()?;
                payload_len_is(t, payload, 0)?;
                Message::Flush(Flush { mirror, seq, epoch })
            }
            MsgType::FlushAck => {
                let seq = SeqNo(r.u64()?);
                let status = status(t, r.u32()?)?;
                r.reserved::<4>()?;
                payload_len_is(t, payload, 0)?;
                Message::FlushAck(FlushAck { seq, status })
            }
            MsgType::Read => {
                let mirror = MirrorId(r.u64()?);
                let offset = ByteOffset(r.u64()?);
                let len = ByteLen(u64::from(r.u32()?));
                r.reserved::<4>()?;
                payload_len_is(t, payload, 0)?;
                Message::Read(Read {
                    mirror,
                    offset,
                    len,
                })
            }
            MsgType::ReadResp => {
                let status = status(t, r.u32()?)?;
                let len = r.u32()?;
                payload_len_is(t, payload, u64::from(len))?;
                Message::ReadResp(ReadResp {
                    status,
                    data: payload,
                })
            }
            MsgType::WriteZeroes => {
                let mirror = MirrorId(r.u64()?);
                let seq = SeqNo(r.u64()?);
                let epoch = Epoch(r.u32()?);
                let flags = WriteFlags(r.u32()?);
                let offset = ByteOffset(r.u64()?);
                let len = ByteLen(r.u64()?);
                payload_len_is(t, payload, 0)?;
                Message::WriteZeroes(WriteZeroes {
                    mirror,
                    seq,
                    epoch,
                    flags,
                    offset,
                    len,
                })
            }
            MsgType::Unmap => {
                let mirror = MirrorId(r.u64()?);
                let seq = SeqNo(r.u64()?);
                let epoch = Epoch(r.u32()?);
                r.reserved::<4>()?;
                let offset = ByteOffset(r.u64()?);
                let len = ByteLen(r.u64()?);
                payload_len_is(t, payload, 0)?;
                Message::Unmap(Unmap {
                    mirror,
                    seq,
                    epoch,
                    offset,
                    len,
                })
            }
            MsgType::RangeDigest => {
                let range = read_digest_range(&mut r, t)?;
                payload_len_is(t, payload, 0)?;
                Message::RangeDigest(range)
            }
            MsgType::RangeDigestResp => {
                let range = read_digest_range(&mut r, t)?;
                let status = status(t, r.u32()?)?;
                let count = r.u32()?;
                let declared = u64::from(count).saturating_mul(range.algo.digest_len() as u64);
                payload_len_is(t, payload, declared)?;
                Message::RangeDigestResp(RangeDigestResp {
                    range,
                    status,
                    digests: DigestList { bytes: payload },
                })
            }
            MsgType::SplitMarker => {
                let mirror = MirrorId(r.u64()?);
                let epoch = Epoch(r.u32()?);
                r.reserved::<4>()?;
                let seq = SeqNo(r.u64()?);
                payload_len_is(t, payload, 0)?;
                Message::SplitMarker(SplitMarker { mirror, epoch, seq })
            }
            MsgType::SplitCtl => {
                let mirror = MirrorId(r.u64()?);
                let seq = SeqNo(r.u64()?);
                let epoch = Epoch(r.u32()?);
                let op = SplitOp::from_wire(r.u32()?).ok_or(invalid(
                    t,
                    "op",
                    "unknown split operation",
                ))?;
                let writable = match r.u32()? {
                    0 => false,
                    1 => true,
                    _ => return Err(invalid(t, "writable", "must be 0 or 1")),
                };
                let region_size = r.u32()?;
                let len = r.u32()?;
                let leg = LegId(r.u32()?);
                count_of(t, "bytes of image name", u64::from(len), MAX_SPLIT_NAME)?;
                payload_len_is(t, payload, u64::from(len))?;
                let name = std::str::from_utf8(payload)
                    .map_err(|_| invalid(t, "name", "not UTF-8"))?
                    .to_owned();
                Message::SplitCtl(SplitCtl {
                    mirror,
                    leg,
                    op,
                    writable,
                    epoch,
                    seq,
                    region_size,
                    name,
                })
            }
            MsgType::SplitCtlResp => {
                let mirror = MirrorId(r.u64()?);
                let status = status(t, r.u32()?)?;
                let region_size = r.u32()?;
                let len = r.u32()?;
                r.reserved::<4>()?;
                count_of(t, "bytes of bitmap", u64::from(len), MAX_SPLIT_BITMAP)?;
                payload_len_is(t, payload, u64::from(len))?;
                Message::SplitCtlResp(SplitCtlResp {
                    mirror,
                    status,
                    region_size,
                    bitmap: payload.to_vec(),
                })
            }
            MsgType::Heartbeat => {
                let counter = r.u64()?;
                let sent = Timestamp(r.u64()?);
                payload_len_is(t, payload, 0)?;
                Message::Heartbeat(Heartbeat { counter, sent })
            }
            MsgType::HeartbeatAck => {
                let counter = r.u64()?;
                let echo_sent = Timestamp(r.u64()?);
                let received = Timestamp(r.u64()?);
                let replied = Timestamp(r.u64()?);
                payload_len_is(t, payload, 0)?;
                Message::HeartbeatAck(HeartbeatAck {
                    counter,
                    echo_sent,
                    received,
                    replied,
                })
            }
            MsgType::CapacityReport => {
                let domain = DomainId(r.u32()?);
                let count = r.u32()?;
                let reported_at = Timestamp(r.u64()?);
                count_of(t, "servers", u64::from(count), MAX_CAPACITY_ENTRIES)?;
                payload_len_is(t, payload, u64::from(count) * CAPACITY_ENTRY_LEN as u64)?;
                let mut servers = Vec::with_capacity(count as usize);
                for entry in payload.chunks_exact(CAPACITY_ENTRY_LEN) {
                    let mut e = Reader::new(entry, t);
                    let server = StorageServerId(e.u32()?);
                    let health =
                        Health::from_wire(e.u8()?).ok_or(invalid(t, "health", "unknown"))?;
                    e.reserved::<3>()?;
                    let total = ByteLen(e.u64()?);
                    let free = ByteLen(e.u64()?);
                    servers.push(ServerCapacity {
                        server,
                        health,
                        total,
                        free,
                    });
                }
                Message::CapacityReport(CapacityReport {
                    domain,
                    reported_at,
                    servers,
                })
            }
            MsgType::AllocateRequest => {
                let mirror = MirrorId(r.u64()?);
                let size = ByteLen(r.u64()?);
                let domain = DomainId(r.u32()?);
                let leg = LegId(r.u32()?);
                payload_len_is(t, payload, 0)?;
                Message::AllocateRequest(AllocateRequest {
                    mirror,
                    size,
                    domain,
                    leg,
                })
            }
            MsgType::AllocateResponse => {
                let mirror = MirrorId(r.u64()?);
                let status = status(t, r.u32()?)?;
                let count = r.u32()?;
                count_of(t, "extents", u64::from(count), MAX_EXTENTS)?;
                payload_len_is(t, payload, u64::from(count) * EXTENT_ENTRY_LEN as u64)?;
                let mut extents = Vec::with_capacity(count as usize);
                for entry in payload.chunks_exact(EXTENT_ENTRY_LEN) {
                    let mut e = Reader::new(entry, t);
                    let server = StorageServerId(e.u32()?);
                    e.reserved::<4>()?;
                    extents.push(Extent {
                        server,
                        device_offset: ByteOffset(e.u64()?),
                        len: ByteLen(e.u64()?),
                        logical_offset: ByteOffset(e.u64()?),
                    });
                }
                Message::AllocateResponse(AllocateResponse {
                    mirror,
                    status,
                    extents,
                })
            }
            MsgType::ReleaseRequest => {
                let mirror = MirrorId(r.u64()?);
                let domain = DomainId(r.u32()?);
                let leg = LegId(r.u32()?);
                payload_len_is(t, payload, 0)?;
                Message::ReleaseRequest(ReleaseRequest {
                    mirror,
                    domain,
                    leg,
                })
            }
            MsgType::ReleaseAck => {
                let mirror = MirrorId(r.u64()?);
                let status = status(t, r.u32()?)?;
                r.reserved::<4>()?;
                payload_len_is(t, payload, 0)?;
                Message::ReleaseAck(ReleaseAck { mirror, status })
            }
            MsgType::GenerationExchange => {
                let mirror = MirrorId(r.u64()?);
                let current = Generation(r.u64()?);
                let bitmap = Generation(r.u64()?);
                let h0 = Generation(r.u64()?);
                let h1 = Generation(r.u64()?);
                let leg = LegId(r.u32()?);
                let flags = GenerationFlags(r.u32()?);
                payload_len_is(t, payload, 0)?;
                Message::GenerationExchange(GenerationExchange {
                    mirror,
                    leg,
                    current,
                    bitmap,
                    history: [h0, h1],
                    flags,
                })
            }
        };
        r.finish()?;
        msg.validate(limits)?;
        Ok(msg)
    }
}

/// One valid example of every message type, for tests.
#[cfg(test)]
pub(crate) fn samples() -> Vec<Message<'static>> {
    static DATA: [u8; 4096] = [0x5a; 4096];
    static DIGESTS: [[u8; 32]; 3] = [[1; 32], [2; 32], [3; 32]];
    let name = SiteName::new("site-a").unwrap();
    let range = RangeDigest {
        mirror: MirrorId(9),
        offset: ByteOffset(1 << 20),
        len: ByteLen(3 * 65536 - 100),
        region_size: 65536,
        algo: DigestAlgo::Sha256,
    };
    vec![
        Message::Hello(Hello {
            role: Role::Initiator,
            versions: VersionRange::new(ProtocolVersion::new(1, 0), ProtocolVersion::new(1, 2))
                .unwrap(),
            nonce: [7; 32],
            name,
        }),
        Message::HelloAck(HelloAck {
            version: ProtocolVersion::new(1, 0),
            proof: [9; 32],
        }),
        Message::Error(ErrorMsg {
            code: ErrorCode::AuthFailed,
            text: "authentication failed ✗".into(),
        }),
        Message::Write(Write {
            mirror: MirrorId(1),
            seq: SeqNo(100),
            epoch: Epoch(2),
            flags: WriteFlags::FUA.union(WriteFlags::RESYNC),
            offset: ByteOffset(8192),
            data: &DATA,
        }),
        Message::WriteAck(WriteAck {
            seq: SeqNo(100),
            status: Status::Ok,
        }),
        Message::Flush(Flush {
            mirror: MirrorId(1),
            seq: SeqNo(101),
            epoch: Epoch(2),
        }),
        Message::FlushAck(FlushAck {
            seq: SeqNo(101),
            status: Status::IoError,
        }),
        Message::Read(Read {
            mirror: MirrorId(1),
            offset: ByteOffset(0),
            len: ByteLen(4096),
        }),
        Message::ReadResp(ReadResp {
            status: Status::Ok,
            data: &DATA,
        }),
        Message::WriteZeroes(WriteZeroes {
            mirror: MirrorId(1),
            seq: SeqNo(102),
            epoch: Epoch(2),
            flags: WriteFlags::MAY_UNMAP,
            offset: ByteOffset(1 << 30),
            len: ByteLen(1 << 40),
        }),
        Message::Unmap(Unmap {
            mirror: MirrorId(1),
            seq: SeqNo(103),
            epoch: Epoch(2),
            offset: ByteOffset(0),
            len: ByteLen(512),
        }),
        Message::RangeDigest(range),
        Message::RangeDigestResp(RangeDigestResp {
            range,
            status: Status::Ok,
            digests: DigestList::from_sha256(&DIGESTS),
        }),
        Message::SplitMarker(SplitMarker {
            mirror: MirrorId(1),
            epoch: Epoch(3),
            seq: SeqNo(104),
        }),
        Message::Heartbeat(Heartbeat {
            counter: 5,
            sent: Timestamp(1_700_000_000_000_000_000),
        }),
        Message::HeartbeatAck(HeartbeatAck {
            counter: 5,
            echo_sent: Timestamp(1_700_000_000_000_000_000),
            received: Timestamp(1_700_000_000_000_100_000),
            replied: Timestamp(1_700_000_000_000_150_000),
        }),
        Message::CapacityReport(CapacityReport {
            domain: DomainId(2),
            reported_at: Timestamp(77),
            servers: vec![
                ServerCapacity {
                    server: StorageServerId(1),
                    health: Health::Healthy,
                    total: ByteLen(1 << 40),
                    free: ByteLen(1 << 39),
                },
                ServerCapacity {
                    server: StorageServerId(4),
                    health: Health::Degraded,
                    total: ByteLen(1 << 41),
                    free: ByteLen(0),
                },
            ],
        }),
        Message::AllocateRequest(AllocateRequest {
            mirror: MirrorId(11),
            size: ByteLen(10 << 30),
            domain: DomainId(2),
            leg: LegId(3),
        }),
        Message::AllocateResponse(AllocateResponse {
            mirror: MirrorId(11),
            status: Status::Ok,
            extents: vec![
                Extent {
                    server: StorageServerId(4),
                    device_offset: ByteOffset(1 << 30),
                    len: ByteLen(4 << 30),
                    logical_offset: ByteOffset(0),
                },
                Extent {
                    server: StorageServerId(1),
                    device_offset: ByteOffset(0),
                    len: ByteLen(6 << 30),
                    logical_offset: ByteOffset(4 << 30),
                },
            ],
        }),
        Message::ReleaseRequest(ReleaseRequest {
            mirror: MirrorId(11),
            domain: DomainId(2),
            leg: LegId(3),
        }),
        Message::ReleaseAck(ReleaseAck {
            mirror: MirrorId(11),
            status: Status::NotFound,
        }),
        Message::GenerationExchange(GenerationExchange {
            mirror: MirrorId(1),
            leg: LegId(2),
            current: Generation(0xdead_beef),
            bitmap: Generation(0xcafe),
            history: [Generation(3), Generation(0)],
            flags: GenerationFlags::PRIMARY,
        }),
        Message::SplitCtl(SplitCtl {
            mirror: MirrorId(1),
            leg: LegId(2),
            op: SplitOp::Freeze,
            writable: true,
            epoch: Epoch(3),
            seq: SeqNo(104),
            region_size: 65536,
            name: "m0-backup".into(),
        }),
        Message::SplitCtlResp(SplitCtlResp {
            mirror: MirrorId(1),
            status: Status::Ok,
            region_size: 65536,
            bitmap: vec![0x81, 0, 4],
        }),
    ]
}

#[cfg(test)]
mod tests {
    use super::super::frame::{Decoded, Framer};
    use super::*;

    fn framer() -> Framer {
        Framer::default()
    }

    fn round_trip(msg: &Message<'_>) {
        let f = framer();
        let bytes = msg.encode_to_vec(&f, RequestTag(77)).unwrap();
        assert_eq!(bytes.len(), msg.encoded_len());
        let Decoded::Complete {
            value: (tag, back),
            consumed,
        } = f.decode_message(&bytes).unwrap()
        else {
            panic!("incomplete")
        };
        assert_eq!((tag, consumed), (RequestTag(77), bytes.len()));
        assert_eq!(&back, msg);
    }

    #[test]
    fn every_message_round_trips() {
        let samples = samples();
        let mut seen: Vec<MsgType> = samples.iter().map(Message::msg_type).collect();
        seen.dedup();
        assert_eq!(seen, MsgType::ALL, "a sample for every type, in order");
        for m in &samples {
            round_trip(m);
        }
    }

    #[test]
    fn error_statuses_round_trip() {
        round_trip(&Message::ReadResp(ReadResp {
            status: Status::OutOfRange,
            data: &[],
        }));
        round_trip(&Message::AllocateResponse(AllocateResponse {
            mirror: MirrorId(1),
            status: Status::NoSpace,
            extents: vec![],
        }));
        let Message::RangeDigestResp(mut r) = samples()[12] else {
            panic!()
        };
        r.status = Status::Busy;
        r.digests = DigestList::default();
        round_trip(&Message::RangeDigestResp(r));
    }

    /// Message header and payload of a sample, for corrupting past the CRCs.
    fn parts(msg: &Message<'_>) -> (MsgType, Vec<u8>, Vec<u8>) {
        let bytes = msg.encode_to_vec(&framer(), RequestTag(0)).unwrap();
        let t = msg.msg_type();
        let hl = t.header_len();
        (t, bytes[32..hl].to_vec(), bytes[hl..].to_vec())
    }

    fn decode(t: MsgType, h: &[u8], p: &[u8]) -> Result<(), WireError> {
        Message::decode_parts(t, h, p, &FrameLimits::default()).map(|_| ())
    }

    #[test]
    fn write_validation() {
        let (t, mut h, p) = parts(&samples()[3]);
        assert!(decode(t, &h, &p).is_ok());
        // Declared length disagrees with the payload.
        assert!(matches!(
            decode(t, &h, &p[1..]),
            Err(WireError::PayloadLength {
                declared: 4096,
                actual: 4095,
                ..
            })
        ));
        // Offset + length overflows.
        let mut h2 = h.clone();
        h2[24..32].copy_from_slice(&(u64::MAX - 10).to_le_bytes());
        assert!(matches!(
            decode(t, &h2, &p),
            Err(WireError::RangeOverflow { .. })
        ));
        // Unknown flag bit.
        let mut h2 = h.clone();
        h2[20] = 0x80;
        assert!(matches!(
            decode(t, &h2, &p),
            Err(WireError::UnknownFlags { flags: 0x80, .. })
        ));
        // MAY_UNMAP is for WriteZeroes only.
        h2[20] = 4;
        assert!(matches!(
            decode(t, &h2, &p),
            Err(WireError::UnknownFlags { flags: 4, .. })
        ));
        // Reserved bytes.
        h[36] = 1;
        assert!(matches!(
            decode(t, &h, &p),
            Err(WireError::InvalidField {
                field: "reserved",
                ..
            })
        ));
        // Empty writes.
        let empty = Message::Write(Write {
            data: &[],
            ..match samples()[3] {
                Message::Write(w) => w,
                _ => unreachable!(),
            }
        });
        assert!(empty.encode_to_vec(&framer(), RequestTag(0)).is_err());
    }

    #[test]
    fn wrong_message_header_size_is_refused() {
        let (t, h, p) = parts(&samples()[5]);
        assert!(matches!(
            decode(t, &h[..8], &p),
            Err(WireError::HeaderLength { .. })
        ));
        assert!(matches!(
            decode(t, &h, &[0]),
            Err(WireError::PayloadLength { declared: 0, .. })
        ));
    }

    #[test]
    fn statuses_and_codes_must_be_known() {
        let (t, mut h, p) = parts(&samples()[4]);
        h[8] = 200;
        assert!(matches!(
            decode(t, &h, &p),
            Err(WireError::InvalidField {
                field: "status",
                ..
            })
        ));
        let (t, mut h, p) = parts(&samples()[2]);
        h[0] = 0;
        assert!(matches!(
            decode(t, &h, &p),
            Err(WireError::InvalidField { field: "code", .. })
        ));
    }

    #[test]
    fn read_and_read_resp_validation() {
        let too_big = Message::Read(Read {
            mirror: MirrorId(1),
            offset: ByteOffset(0),
            len: ByteLen(u64::from(DEFAULT_MAX_PAYLOAD_FOR_TESTS) + 1),
        });
        assert!(matches!(
            too_big.encode_to_vec(&framer(), RequestTag(0)),
            Err(WireError::TooMany { .. })
        ));
        let err_with_data = Message::ReadResp(ReadResp {
            status: Status::IoError,
            data: b"x",
        });
        assert!(err_with_data.validate(&FrameLimits::default()).is_err());
    }

    const DEFAULT_MAX_PAYLOAD_FOR_TESTS: u32 = super::super::frame::DEFAULT_MAX_PAYLOAD;

    #[test]
    fn digest_validation() {
        let Message::RangeDigestResp(r) = samples()[12] else {
            panic!()
        };
        assert_eq!(r.range.region_count(), 3);
        assert_eq!(r.digests.iter().count(), 3);
        // One digest short of the range.
        let short = Message::RangeDigestResp(RangeDigestResp {
            digests: DigestList::from_sha256(&[[0; 32]; 2]),
            ..r
        });
        assert!(short.validate(&FrameLimits::default()).is_err());
        let (t, h, p) = parts(&Message::RangeDigestResp(r));
        assert!(matches!(
            decode(t, &h, &p[..64]),
            Err(WireError::PayloadLength { .. })
        ));
        // Region size must be a power of two within bounds.
        for bad in [0u32, 100, 256, 3 << 20, 1 << 31] {
            let m = Message::RangeDigest(RangeDigest {
                region_size: bad,
                ..r.range
            });
            assert!(m.validate(&FrameLimits::default()).is_err(), "{bad}");
        }
        // The answer must fit a frame.
        let huge = Message::RangeDigest(RangeDigest {
            len: ByteLen(1 << 40),
            region_size: 4096,
            ..r.range
        });
        assert!(matches!(
            huge.validate(&FrameLimits::default()),
            Err(WireError::TooMany {
                what: "digest regions",
                ..
            })
        ));
        // Unknown algorithm.
        let (t, mut h, p) = parts(&Message::RangeDigest(r.range));
        h[28] = 9;
        assert!(decode(t, &h, &p).is_err());
    }

    #[test]
    fn extent_maps_must_be_sorted_disjoint_and_bounded() {
        let Message::AllocateResponse(ok) = samples()[18].clone() else {
            panic!()
        };
        let limits = FrameLimits::default();
        let mut swapped = ok.clone();
        swapped.extents.reverse();
        assert!(Message::AllocateResponse(swapped)
            .validate(&limits)
            .is_err());
        let mut logical_overlap = ok.clone();
        logical_overlap.extents[1].logical_offset = ByteOffset((4 << 30) - 1);
        assert!(Message::AllocateResponse(logical_overlap)
            .validate(&limits)
            .is_err());
        let mut device_overlap = ok.clone();
        device_overlap.extents[1].server = StorageServerId(4);
        device_overlap.extents[1].device_offset = ByteOffset((5 << 30) - 1);
        assert!(Message::AllocateResponse(device_overlap.clone())
            .validate(&limits)
            .is_err());
        device_overlap.extents[1].device_offset = ByteOffset(5 << 30);
        assert!(Message::AllocateResponse(device_overlap)
            .validate(&limits)
            .is_ok());
        let mut overflow = ok.clone();
        overflow.extents[0].device_offset = ByteOffset(u64::MAX);
        assert!(Message::AllocateResponse(overflow)
            .validate(&limits)
            .is_err());
        let mut empty_ok = ok.clone();
        empty_ok.extents.clear();
        assert!(Message::AllocateResponse(empty_ok)
            .validate(&limits)
            .is_err());
        let mut err_with_map = ok.clone();
        err_with_map.status = Status::NoSpace;
        assert!(Message::AllocateResponse(err_with_map)
            .validate(&limits)
            .is_err());
        // A huge count is refused before any allocation or payload check.
        let (t, mut h, _) = parts(&Message::AllocateResponse(ok));
        h[12..16].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(
            decode(t, &h, &[]),
            Err(WireError::TooMany {
                what: "extents",
                ..
            })
        ));
    }

    #[test]
    fn capacity_reports_are_checked() {
        let Message::CapacityReport(c) = samples()[16].clone() else {
            panic!()
        };
        let limits = FrameLimits::default();
        let mut dup = c.clone();
        dup.servers[1].server = StorageServerId(1);
        assert!(Message::CapacityReport(dup).validate(&limits).is_err());
        let mut over = c.clone();
        over.servers[0].free = ByteLen((1 << 40) + 1);
        assert!(Message::CapacityReport(over).validate(&limits).is_err());
        let (t, h, mut p) = parts(&Message::CapacityReport(c));
        p[4] = 3; // health
        assert!(matches!(
            decode(t, &h, &p),
            Err(WireError::InvalidField {
                field: "health",
                ..
            })
        ));
    }

    #[test]
    fn small_messages_are_checked() {
        let limits = FrameLimits::default();
        let hb = Message::HeartbeatAck(HeartbeatAck {
            counter: 1,
            echo_sent: Timestamp(5),
            received: Timestamp(10),
            replied: Timestamp(9),
        });
        assert!(hb.validate(&limits).is_err());
        let alloc = Message::AllocateRequest(AllocateRequest {
            mirror: MirrorId(1),
            size: ByteLen(0),
            domain: DomainId(1),
            leg: LegId(0),
        });
        assert!(alloc.validate(&limits).is_err());
        let gen = Message::GenerationExchange(GenerationExchange {
            flags: GenerationFlags(8),
            ..match samples()[21] {
                Message::GenerationExchange(g) => g,
                _ => unreachable!(),
            }
        });
        assert!(gen.validate(&limits).is_err());
        let long = Message::Error(ErrorMsg {
            code: ErrorCode::Internal,
            text: "x".repeat(MAX_ERROR_TEXT + 1),
        });
        assert!(long.validate(&limits).is_err());
        let (t, h, _) = parts(&samples()[2]);
        assert!(matches!(
            decode(t, &h, &[0xff; 26]),
            Err(WireError::PayloadLength { .. }) | Err(WireError::InvalidField { .. })
        ));
        let bad_utf8 = {
            let mut h = h.clone();
            h[4..8].copy_from_slice(&2u32.to_le_bytes());
            decode(t, &h, &[0xc3, 0x28])
        };
        assert!(matches!(
            bad_utf8,
            Err(WireError::InvalidField { field: "text", .. })
        ));
        let z = Message::Unmap(Unmap {
            mirror: MirrorId(1),
            seq: SeqNo(1),
            epoch: Epoch(1),
            offset: ByteOffset(u64::MAX),
            len: ByteLen(1),
        });
        assert!(matches!(
            z.validate(&limits),
            Err(WireError::RangeOverflow { .. })
        ));
    }

    #[test]
    fn hello_name_and_versions_are_checked() {
        let (t, h, p) = parts(&samples()[0]);
        assert!(decode(t, &h, b"bad name").is_err(), "length mismatch");
        assert!(matches!(
            decode(t, &h, b"bad na"),
            Err(WireError::InvalidField { field: "name", .. })
        ));
        let mut h2 = h.clone();
        h2[2] = 1;
        h2[3] = 5; // min 1.5 > max 1.2
        assert!(matches!(
            decode(t, &h2, &p),
            Err(WireError::InvalidField {
                field: "versions",
                ..
            })
        ));
        let mut h3 = h.clone();
        h3[0] = 3;
        assert!(matches!(
            decode(t, &h3, &p),
            Err(WireError::InvalidField { field: "role", .. })
        ));
    }
}
