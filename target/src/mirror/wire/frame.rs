//! Framing: the fixed 32-byte frame header, its checks, and the incremental
//! framer a receive loop drives.
//!
//! A frame is `fixed header (32) | message header (fixed size per type) |
//! payload`. All integers are little-endian. The fixed header is
//!
//! ```text
//! off len field
//!   0   4 magic            b"MPWR"
//!   4   1 version major    refused unless equal to ours
//!   5   1 version minor    negotiated in the handshake
//!   6   2 message type     MsgType
//!   8   2 frame flags      reserved, zero in 1.x
//!  10   2 header length    32 + message-header size of the type
//!  12   4 payload length   <= configured maximum
//!  16   8 request tag      echoed in the reply
//!  24   4 payload CRC32C   over the payload bytes
//!  28   4 header CRC32C    over bytes 0..28 then the message header
//! ```
//!
//! Why so: metadata (fixed header + message header) and bulk data have
//! separate CRCs so a receiver can read and verify the metadata first, then
//! receive the payload straight into an aligned pool buffer
//! ([`Framer::decode_head`] + [`Framer::decode_split`]), and a sender can send
//! the payload as its own iovec ([`super::Message::encode`]). The message
//! header size is fixed by the type and must equal the header length field, so
//! once 32 bytes are in every length is bounded and cross-checked: a corrupt
//! length is refused, it never makes the receiver wait for or allocate bytes
//! that will not come. Nothing here allocates.

use super::error::WireError;
use super::types::{ProtocolVersion, RequestTag};

/// The protocol magic, first on every frame.
pub const MAGIC: [u8; 4] = *b"MPWR";
/// Size of the fixed frame header.
pub const FRAME_HEADER_LEN: usize = 32;
/// Default payload limit: 1 MiB, the largest I/O the mirror sends in one frame.
pub const DEFAULT_MAX_PAYLOAD: u32 = 1 << 20;
/// No configuration may raise the payload limit above 16 MiB.
pub const MAX_PAYLOAD_CAP: u32 = 16 << 20;

macro_rules! msg_types {
    ($($(#[$m:meta])* $v:ident = $n:expr, $ext:expr;)*) => {
        /// The type of a frame's message.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        #[repr(u16)]
        pub enum MsgType {
            $($(#[$m])* $v = $n,)*
        }

        impl MsgType {
            /// Every type.
            pub const ALL: &'static [MsgType] = &[$(MsgType::$v,)*];

            /// From the wire value, if known.
            pub fn from_wire(v: u16) -> Option<Self> {
                match v {
                    $($n => Some(MsgType::$v),)*
                    _ => None,
                }
            }

            /// Size of this type's message header (after the fixed header).
            pub fn msg_header_len(self) -> usize {
                match self {
                    $(MsgType::$v => $ext,)*
                }
            }
        }
    };
}

msg_types! {
    /// Handshake: nonce, name, version range.
    Hello = 0x0001, 40;
    /// Handshake: chosen version and HMAC proof.
    HelloAck = 0x0002, 40;
    /// Fatal error; the sender closes after it.
    Error = 0x000f, 8;
    /// Replicated write with data payload.
    Write = 0x0010, 40;
    /// Acknowledges a Write, WriteZeroes or Unmap.
    WriteAck = 0x0011, 16;
    /// Flush the mirror's volatile cache.
    Flush = 0x0012, 24;
    /// Acknowledges a Flush.
    FlushAck = 0x0013, 16;
    /// Read a range (resync, read balancing).
    Read = 0x0014, 24;
    /// Data of a Read.
    ReadResp = 0x0015, 8;
    /// Write zeroes to a range.
    WriteZeroes = 0x0016, 40;
    /// Discard a range.
    Unmap = 0x0017, 40;
    /// Ask for per-region digests of a range.
    RangeDigest = 0x0020, 32;
    /// Per-region digests.
    RangeDigestResp = 0x0021, 40;
    /// Marks the split of the stream at an epoch.
    SplitMarker = 0x0030, 24;
    /// Liveness probe.
    Heartbeat = 0x0040, 16;
    /// Liveness answer with timestamps.
    HeartbeatAck = 0x0041, 32;
    /// Agent: storage servers and their free space.
    CapacityReport = 0x0050, 16;
    /// Agent: allocate a mirror leg.
    AllocateRequest = 0x0051, 24;
    /// Agent: the extent map of an allocation.
    AllocateResponse = 0x0052, 16;
    /// Agent: release a mirror leg.
    ReleaseRequest = 0x0053, 16;
    /// Agent: release done.
    ReleaseAck = 0x0054, 16;
    /// Generation ids for choosing the resync direction.
    GenerationExchange = 0x0060, 48;
}

impl MsgType {
    /// The wire value.
    pub fn to_wire(self) -> u16 {
        self as u16
    }

    /// The header length field for this type: fixed header plus message header.
    pub fn header_len(self) -> usize {
        FRAME_HEADER_LEN + self.msg_header_len()
    }
}

/// Limits a framer enforces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameLimits {
    max_payload: u32,
}

impl FrameLimits {
    /// Limits with a payload maximum, or `None` above [`MAX_PAYLOAD_CAP`].
    pub fn new(max_payload: u32) -> Option<Self> {
        (max_payload <= MAX_PAYLOAD_CAP).then_some(FrameLimits { max_payload })
    }

    /// Largest payload accepted or produced.
    pub fn max_payload(&self) -> u32 {
        self.max_payload
    }
}

impl Default for FrameLimits {
    fn default() -> Self {
        FrameLimits {
            max_payload: DEFAULT_MAX_PAYLOAD,
        }
    }
}

/// A checked frame header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHeader {
    /// The sender's protocol version (same major as ours).
    pub version: ProtocolVersion,
    /// Message type.
    pub msg_type: MsgType,
    /// Length of fixed plus message header.
    pub header_len: u16,
    /// Length of the payload that follows the headers.
    pub payload_len: u32,
    /// Request tag.
    pub tag: RequestTag,
    /// CRC32C of the payload.
    pub payload_crc: u32,
}

impl FrameHeader {
    /// Header plus payload length.
    pub fn frame_len(&self) -> usize {
        usize::from(self.header_len).saturating_add(self.payload_len as usize)
    }
}

/// A complete frame, both CRCs verified; slices borrow the input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Frame<'a> {
    /// The header.
    pub header: FrameHeader,
    /// The message header bytes (after the fixed 32).
    pub msg_header: &'a [u8],
    /// The payload bytes.
    pub payload: &'a [u8],
}

/// Outcome of feeding bytes to the framer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decoded<T> {
    /// At least this many more bytes are needed; nothing is wrong yet.
    NeedMore(usize),
    /// Done: the value and how many input bytes it took.
    Complete {
        /// The decoded value.
        value: T,
        /// Bytes of input it spans.
        consumed: usize,
    },
}

impl<T> Decoded<T> {
    /// Maps the completed value.
    pub fn map<U>(self, f: impl FnOnce(T) -> U) -> Decoded<U> {
        match self {
            Decoded::NeedMore(n) => Decoded::NeedMore(n),
            Decoded::Complete { value, consumed } => Decoded::Complete {
                value: f(value),
                consumed,
            },
        }
    }
}

/// The sans-IO framer: checks headers and cuts frames out of received bytes.
///
/// A receive loop appends to a buffer, calls [`Framer::decode`] (or
/// [`Framer::poll`]) and either reads at least the returned number of bytes
/// more, or consumes one frame. The framer keeps no state between calls.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Framer {
    limits: FrameLimits,
    version: ProtocolVersion,
}

fn le_u16(b: &[u8; FRAME_HEADER_LEN], at: usize) -> u16 {
    let mut x = [0u8; 2];
    if let Some(s) = b.get(at..at + 2) {
        x.copy_from_slice(s);
    }
    u16::from_le_bytes(x)
}

fn le_u32(b: &[u8; FRAME_HEADER_LEN], at: usize) -> u32 {
    let mut x = [0u8; 4];
    if let Some(s) = b.get(at..at + 4) {
        x.copy_from_slice(s);
    }
    u32::from_le_bytes(x)
}

fn le_u64(b: &[u8; FRAME_HEADER_LEN], at: usize) -> u64 {
    let mut x = [0u8; 8];
    if let Some(s) = b.get(at..at + 8) {
        x.copy_from_slice(s);
    }
    u64::from_le_bytes(x)
}

/// CRC32C of the metadata: fixed header bytes 0..28, then the message header.
pub(crate) fn header_crc(fixed: &[u8; FRAME_HEADER_LEN], msg_header: &[u8]) -> u32 {
    let (covered, _) = fixed.split_at(28);
    crc32c::crc32c_append(crc32c::crc32c(covered), msg_header)
}

impl Framer {
    /// A framer speaking [`ProtocolVersion::CURRENT`] with the given limits.
    pub fn new(limits: FrameLimits) -> Self {
        Framer {
            limits,
            version: ProtocolVersion::CURRENT,
        }
    }

    /// The same framer, stamping `version` on encoded frames (use the version
    /// the handshake negotiated). Decoding accepts any minor of our major.
    pub fn with_version(self, version: ProtocolVersion) -> Self {
        Framer { version, ..self }
    }

    /// The limits.
    pub fn limits(&self) -> &FrameLimits {
        &self.limits
    }

    /// The version stamped on encoded frames.
    pub fn version(&self) -> ProtocolVersion {
        self.version
    }

    /// Checks the fixed header in `buf[..32]` (all but the header CRC, which
    /// needs the message header too). Also checks a partial prefix, so a
    /// stream that is not ours is refused at its first bytes.
    fn check_fixed(&self, buf: &[u8]) -> Result<Option<FrameHeader>, WireError> {
        let magic_part = buf.get(..buf.len().min(4)).unwrap_or_default();
        if magic_part != MAGIC.get(..magic_part.len()).unwrap_or_default() {
            let mut found = [0u8; 4];
            for (d, s) in found.iter_mut().zip(magic_part) {
                *d = *s;
            }
            return Err(WireError::BadMagic { found });
        }
        if let (Some(&major), Some(&minor)) = (buf.get(4), buf.get(5)) {
            if major != self.version.major {
                return Err(WireError::VersionMismatch {
                    ours: self.version,
                    theirs: ProtocolVersion { major, minor },
                });
            }
        }
        let Some(fixed) = buf.first_chunk::<FRAME_HEADER_LEN>() else {
            return Ok(None);
        };
        let raw_type = le_u16(fixed, 6);
        let msg_type =
            MsgType::from_wire(raw_type).ok_or(WireError::UnknownMessageType(raw_type))?;
        let flags = le_u16(fixed, 8);
        if flags != 0 {
            return Err(WireError::ReservedFrameFlags(flags));
        }
        let header_len = le_u16(fixed, 10);
        if usize::from(header_len) != msg_type.header_len() {
            return Err(WireError::HeaderLength {
                msg: msg_type,
                expected: u16::try_from(msg_type.header_len()).unwrap_or(u16::MAX),
                found: header_len,
            });
        }
        let payload_len = le_u32(fixed, 12);
        if payload_len > self.limits.max_payload {
            return Err(WireError::PayloadTooLarge {
                len: payload_len,
                max: self.limits.max_payload,
            });
        }
        Ok(Some(FrameHeader {
            version: ProtocolVersion {
                major: fixed[4],
                minor: fixed[5],
            },
            msg_type,
            header_len,
            payload_len,
            tag: RequestTag(le_u64(fixed, 16)),
            payload_crc: le_u32(fixed, 24),
        }))
    }

    /// Checks the metadata at the start of `buf`: the fixed header and the
    /// message header, with the header CRC. Needs `header_len` bytes, not the
    /// payload: for a split receive, read the head, call this, then receive
    /// `payload_len` bytes into a buffer of your choice and call
    /// [`Framer::decode_split`].
    pub fn decode_head(&self, buf: &[u8]) -> Result<Decoded<FrameHeader>, WireError> {
        let Some(header) = self.check_fixed(buf)? else {
            return Ok(Decoded::NeedMore(
                FRAME_HEADER_LEN.saturating_sub(buf.len()),
            ));
        };
        let hl = usize::from(header.header_len);
        let (Some(fixed), Some(msg_header)) = (
            buf.first_chunk::<FRAME_HEADER_LEN>(),
            buf.get(FRAME_HEADER_LEN..hl),
        ) else {
            return Ok(Decoded::NeedMore(hl.saturating_sub(buf.len())));
        };
        let expected = le_u32(fixed, 28);
        let computed = header_crc(fixed, msg_header);
        if expected != computed {
            return Err(WireError::HeaderCrc { expected, computed });
        }
        Ok(Decoded::Complete {
            value: header,
            consumed: hl,
        })
    }

    /// Like [`Framer::decode`] but only reports whether a whole frame is in
    /// `buf` (headers checked, payload CRC not yet).
    pub fn poll(&self, buf: &[u8]) -> Result<Decoded<FrameHeader>, WireError> {
        Ok(match self.decode_head(buf)? {
            Decoded::NeedMore(n) => Decoded::NeedMore(n),
            Decoded::Complete { value, .. } => {
                let total = value.frame_len();
                if buf.len() < total {
                    Decoded::NeedMore(total - buf.len())
                } else {
                    Decoded::Complete {
                        value,
                        consumed: total,
                    }
                }
            }
        })
    }

    /// Cuts the first frame out of `buf`, checking everything the framing
    /// layer can check (both CRCs included). The frame's slices borrow `buf`.
    pub fn decode<'a>(&self, buf: &'a [u8]) -> Result<Decoded<Frame<'a>>, WireError> {
        let (header, total) = match self.poll(buf)? {
            Decoded::NeedMore(n) => return Ok(Decoded::NeedMore(n)),
            Decoded::Complete { value, consumed } => (value, consumed),
        };
        let hl = usize::from(header.header_len);
        let head = buf.get(..hl).unwrap_or_default();
        let payload = buf.get(hl..total).unwrap_or_default();
        let frame = self.decode_split(head, payload)?;
        Ok(Decoded::Complete {
            value: frame,
            consumed: total,
        })
    }

    /// A frame received in two pieces: `head` holds exactly the header bytes
    /// ([`FrameHeader::header_len`]), `payload` exactly the payload.
    pub fn decode_split<'a>(
        &self,
        head: &'a [u8],
        payload: &'a [u8],
    ) -> Result<Frame<'a>, WireError> {
        let header = match self.decode_head(head)? {
            Decoded::Complete { value, consumed } if consumed == head.len() => value,
            Decoded::Complete { value, .. } => {
                return Err(WireError::HeaderLength {
                    msg: value.msg_type,
                    expected: value.header_len,
                    found: u16::try_from(head.len()).unwrap_or(u16::MAX),
                })
            }
            Decoded::NeedMore(_) => {
                return Err(WireError::BufferTooSmall {
                    needed: FRAME_HEADER_LEN.max(head.len() + 1),
                    available: head.len(),
                })
            }
        };
        if payload.len() != header.payload_len as usize {
            return Err(WireError::PayloadMismatch {
                declared: header.payload_len,
                actual: payload.len(),
            });
        }
        let computed = crc32c::crc32c(payload);
        if computed != header.payload_crc {
            return Err(WireError::PayloadCrc {
                expected: header.payload_crc,
                computed,
            });
        }
        Ok(Frame {
            header,
            msg_header: head.get(FRAME_HEADER_LEN..).unwrap_or_default(),
            payload,
        })
    }
}

/// Writes the fixed header into `out` (which holds the message header after
/// it, already written) and seals it with both CRCs.
pub(crate) fn seal_header(
    out: &mut [u8],
    version: ProtocolVersion,
    msg_type: MsgType,
    payload_len: u32,
    tag: RequestTag,
    payload_crc: u32,
) -> Result<(), WireError> {
    let hl = msg_type.header_len();
    let available = out.len();
    let (fixed, rest) =
        out.split_first_chunk_mut::<FRAME_HEADER_LEN>()
            .ok_or(WireError::BufferTooSmall {
                needed: hl,
                available,
            })?;
    let msg_header = rest
        .get(..hl - FRAME_HEADER_LEN)
        .ok_or(WireError::BufferTooSmall {
            needed: hl,
            available,
        })?;
    let mut w = super::codec::Writer::new(fixed);
    w.bytes(&MAGIC)?;
    w.u8(version.major)?;
    w.u8(version.minor)?;
    w.u16(msg_type.to_wire())?;
    w.u16(0)?;
    w.u16(u16::try_from(hl).unwrap_or(u16::MAX))?;
    w.u32(payload_len)?;
    w.u64(tag.0)?;
    w.u32(payload_crc)?;
    let crc = header_crc(fixed, msg_header);
    if let Some(slot) = fixed.get_mut(28..32) {
        slot.copy_from_slice(&crc.to_le_bytes());
    }
    Ok(())
}
