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
    /// Split control between a primary and the site hosting the leg
    /// (freeze, query the image's written regions, end, promote).
    SplitCtl = 0x0031, 40;
    /// Answer to a SplitCtl: status and the image's written-regions bitmap.
    SplitCtlResp = 0x0032, 24;
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
        let frame = finish_frame(header, head, payload)?;
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
            Decoded::NeedMore(n) => {
                return Err(WireError::BufferTooSmall {
                    needed: head.len().saturating_add(n),
                    available: head.len(),
                })
            }
        };
        finish_frame(header, head, payload)
    }
}

/// Checks the payload against a verified header and assembles the frame.
fn finish_frame<'a>(
    header: FrameHeader,
    head: &'a [u8],
    payload: &'a [u8],
) -> Result<Frame<'a>, WireError> {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mirror::wire::message::{Flush, Message, Write, WriteFlags};
    use crate::mirror::wire::types::{Epoch, MirrorId, SeqNo};
    use crate::units::ByteOffset;

    const DATA: &[u8] = b"0123456789abcdef";

    fn write_msg() -> Message<'static> {
        Message::Write(Write {
            mirror: MirrorId(7),
            seq: SeqNo(42),
            epoch: Epoch(3),
            flags: WriteFlags::FUA,
            offset: ByteOffset(4096),
            data: DATA,
        })
    }

    fn write_frame() -> Vec<u8> {
        write_msg()
            .encode_to_vec(&Framer::default(), RequestTag(0x1122_3344_5566_7788))
            .unwrap()
    }

    fn reseal(frame: &mut [u8]) {
        let hl = usize::from(u16::from_le_bytes([frame[10], frame[11]]));
        let fixed: [u8; 32] = frame[..32].try_into().unwrap();
        let crc = header_crc(&fixed, &frame[32..hl]);
        frame[28..32].copy_from_slice(&crc.to_le_bytes());
    }

    #[test]
    fn header_layout_is_byte_exact() {
        let f = write_frame();
        assert_eq!(f.len(), 32 + 40 + DATA.len());
        assert_eq!(&f[0..4], b"MPWR");
        assert_eq!(f[4], 1, "major");
        assert_eq!(f[5], 0, "minor");
        assert_eq!(&f[6..8], &[0x10, 0x00], "type Write");
        assert_eq!(&f[8..10], &[0, 0], "flags");
        assert_eq!(&f[10..12], &[72, 0], "header length");
        assert_eq!(&f[12..16], &[16, 0, 0, 0], "payload length");
        assert_eq!(
            &f[16..24],
            &[0x88, 0x77, 0x66, 0x55, 0x44, 0x33, 0x22, 0x11],
            "tag"
        );
        assert_eq!(
            &f[24..28],
            &crc32c::crc32c(DATA).to_le_bytes(),
            "payload crc"
        );
        let mut covered = f[0..28].to_vec();
        covered.extend_from_slice(&f[32..72]);
        assert_eq!(
            &f[28..32],
            &crc32c::crc32c(&covered).to_le_bytes(),
            "header crc"
        );
        // Write message header.
        assert_eq!(&f[32..40], &7u64.to_le_bytes(), "mirror");
        assert_eq!(&f[40..48], &42u64.to_le_bytes(), "seq");
        assert_eq!(&f[48..52], &3u32.to_le_bytes(), "epoch");
        assert_eq!(&f[52..56], &1u32.to_le_bytes(), "flags FUA");
        assert_eq!(&f[56..64], &4096u64.to_le_bytes(), "offset");
        assert_eq!(&f[64..68], &16u32.to_le_bytes(), "length");
        assert_eq!(&f[68..72], &[0; 4], "reserved");
        assert_eq!(&f[72..], DATA);
    }

    #[test]
    fn flush_golden_bytes() {
        let msg = Message::Flush(Flush {
            mirror: MirrorId(1),
            seq: SeqNo(2),
            epoch: Epoch(3),
        });
        let f = msg
            .encode_to_vec(&Framer::default(), RequestTag(9))
            .unwrap();
        let mut expected = Vec::new();
        expected.extend_from_slice(b"MPWR\x01\x00\x12\x00\x00\x00\x38\x00\x00\x00\x00\x00");
        expected.extend_from_slice(&9u64.to_le_bytes());
        expected.extend_from_slice(&[0; 4]); // crc32c of no payload is 0
        let mut meta = expected.clone();
        let body = [1u64.to_le_bytes(), 2u64.to_le_bytes()].concat();
        let body = [body, 3u32.to_le_bytes().to_vec(), vec![0; 4]].concat();
        meta.extend_from_slice(&body);
        expected.extend_from_slice(&crc32c::crc32c(&meta).to_le_bytes());
        expected.extend_from_slice(&body);
        assert_eq!(f, expected);
    }

    #[test]
    fn decodes_zero_copy_and_reports_consumed() {
        let f = write_frame();
        let framer = Framer::default();
        let Decoded::Complete { value, consumed } = framer.decode(&f).unwrap() else {
            panic!("incomplete")
        };
        assert_eq!(consumed, f.len());
        assert_eq!(value.header.tag, RequestTag(0x1122_3344_5566_7788));
        assert_eq!(
            value.payload.as_ptr(),
            f[72..].as_ptr(),
            "payload borrows the input"
        );
        let Message::Write(w) = value.message(framer.limits()).unwrap() else {
            panic!("not a write")
        };
        assert_eq!(w.data.as_ptr(), f[72..].as_ptr());
    }

    #[test]
    fn encoder_leaves_bulk_data_in_place() {
        let data = vec![0xabu8; 4096];
        let msg = Message::Write(Write {
            data: &data,
            ..match write_msg() {
                Message::Write(w) => w,
                _ => unreachable!(),
            }
        });
        let mut head = [0u8; 128];
        let enc = msg
            .encode(&Framer::default(), RequestTag(1), &mut head)
            .unwrap();
        assert_eq!(enc.len, 72);
        assert_eq!(enc.trailer.as_ptr(), data.as_ptr());
        assert_eq!(&head[24..28], &crc32c::crc32c(&data).to_le_bytes());
        let mut small = [0u8; 71];
        assert_eq!(
            msg.encode(&Framer::default(), RequestTag(1), &mut small),
            Err(WireError::BufferTooSmall {
                needed: 72,
                available: 71
            })
        );
    }

    #[test]
    fn truncated_input_needs_more_never_errors() {
        let f = write_frame();
        let framer = Framer::default();
        for end in 0..f.len() {
            match framer.decode(&f[..end]).unwrap() {
                Decoded::NeedMore(n) => {
                    assert!(n > 0);
                    assert!(end + n <= f.len(), "asked past the frame at {end}");
                    if end >= 72 {
                        assert_eq!(end + n, f.len(), "exact once headers are in");
                    }
                }
                other => panic!("prefix {end} decoded: {other:?}"),
            }
        }
    }

    #[test]
    fn incremental_feeding_reaches_the_frame() {
        let f = write_frame();
        let framer = Framer::default();
        let mut have = 0;
        let mut rounds = 0;
        loop {
            rounds += 1;
            match framer.decode(&f[..have]).unwrap() {
                Decoded::NeedMore(n) => have += n,
                Decoded::Complete { consumed, .. } => {
                    assert_eq!(consumed, f.len());
                    break;
                }
            }
        }
        assert_eq!(rounds, 4, "32, then headers, then payload, then done");
    }

    #[test]
    fn every_bit_flip_is_detected() {
        let f = write_frame();
        let framer = Framer::default();
        for bit in 0..f.len() * 8 {
            let mut g = f.clone();
            g[bit / 8] ^= 1 << (bit % 8);
            let r = framer.decode(&g);
            assert!(r.is_err(), "flip of bit {bit} gave {r:?}");
        }
    }

    #[test]
    fn crc_errors_are_typed() {
        let framer = Framer::default();
        let mut f = write_frame();
        f[80] ^= 1;
        assert!(matches!(
            framer.decode(&f),
            Err(WireError::PayloadCrc { .. })
        ));
        let mut f = write_frame();
        f[40] ^= 1;
        assert!(matches!(
            framer.decode(&f),
            Err(WireError::HeaderCrc { .. })
        ));
        let mut f = write_frame();
        f[20] ^= 1;
        assert!(matches!(
            framer.decode(&f),
            Err(WireError::HeaderCrc { .. })
        ));
    }

    #[test]
    fn bad_magic_is_refused_early() {
        let framer = Framer::default();
        assert_eq!(
            framer.decode(b"MPX"),
            Err(WireError::BadMagic { found: *b"MPX\0" })
        );
        assert_eq!(framer.decode(b"MP").unwrap(), Decoded::NeedMore(30));
        let mut f = write_frame();
        f[0] = b'X';
        assert!(matches!(framer.decode(&f), Err(WireError::BadMagic { .. })));
        assert!(matches!(
            framer.decode(b"GET / HTTP/1.1\r\n"),
            Err(WireError::BadMagic { .. })
        ));
    }

    #[test]
    fn other_major_version_is_refused_other_minor_accepted() {
        let framer = Framer::default();
        let mut f = write_frame();
        f[4] = 2;
        f[5] = 7;
        assert_eq!(
            framer.decode(&f[..6]),
            Err(WireError::VersionMismatch {
                ours: ProtocolVersion::new(1, 0),
                theirs: ProtocolVersion::new(2, 7)
            })
        );
        let newer = write_msg()
            .encode_to_vec(
                &framer.with_version(ProtocolVersion::new(1, 3)),
                RequestTag(5),
            )
            .unwrap();
        let Decoded::Complete { value, .. } = framer.decode(&newer).unwrap() else {
            panic!()
        };
        assert_eq!(value.header.version, ProtocolVersion::new(1, 3));
    }

    #[test]
    fn oversize_payload_rejected_from_the_header_alone() {
        let framer = Framer::default();
        let mut f = write_frame();
        f[12..16].copy_from_slice(&u32::MAX.to_le_bytes());
        reseal(&mut f);
        // Only the 32-byte header is given: refused without waiting or allocating.
        assert_eq!(
            framer.decode(&f[..32]),
            Err(WireError::PayloadTooLarge {
                len: u32::MAX,
                max: DEFAULT_MAX_PAYLOAD
            })
        );
        let small = Framer::new(FrameLimits::new(8).unwrap());
        assert_eq!(
            small.decode(&write_frame()[..32]),
            Err(WireError::PayloadTooLarge { len: 16, max: 8 })
        );
        assert!(FrameLimits::new(MAX_PAYLOAD_CAP + 1).is_none());
        assert_eq!(
            write_msg().encode_to_vec(&small, RequestTag(0)),
            Err(WireError::TooMany {
                msg: MsgType::Write,
                what: "bytes",
                count: 16,
                max: 8
            })
        );
    }

    #[test]
    fn unknown_type_flags_and_header_length_are_refused() {
        let framer = Framer::default();
        let mut f = write_frame();
        f[6] = 0xee;
        reseal(&mut f);
        assert_eq!(framer.decode(&f), Err(WireError::UnknownMessageType(0xee)));
        let mut f = write_frame();
        f[8] = 1;
        reseal(&mut f);
        assert_eq!(framer.decode(&f), Err(WireError::ReservedFrameFlags(1)));
        let mut f = write_frame();
        f[10] = 64;
        reseal(&mut f);
        assert_eq!(
            framer.decode(&f),
            Err(WireError::HeaderLength {
                msg: MsgType::Write,
                expected: 72,
                found: 64
            })
        );
    }

    #[test]
    fn split_receive_verifies_head_then_payload() {
        let f = write_frame();
        let framer = Framer::default();
        let Decoded::Complete {
            value: hdr,
            consumed,
        } = framer.decode_head(&f[..72]).unwrap()
        else {
            panic!()
        };
        assert_eq!((consumed, hdr.payload_len), (72, 16));
        let pool = f[72..].to_vec(); // stands for an aligned pool buffer
        let frame = framer.decode_split(&f[..72], &pool).unwrap();
        assert_eq!(frame.payload.as_ptr(), pool.as_ptr());
        assert_eq!(
            framer.decode_split(&f[..72], &pool[..15]),
            Err(WireError::PayloadMismatch {
                declared: 16,
                actual: 15
            })
        );
        let mut bad = pool.clone();
        bad[0] ^= 0x80;
        assert!(matches!(
            framer.decode_split(&f[..72], &bad),
            Err(WireError::PayloadCrc { .. })
        ));
        assert!(framer.decode_split(&f[..71], &pool).is_err());
    }

    #[test]
    fn back_to_back_frames() {
        let framer = Framer::default();
        let mut stream = write_frame();
        stream.extend_from_slice(&write_frame());
        stream.extend_from_slice(&write_frame()[..10]);
        let mut rest = &stream[..];
        let mut n = 0;
        while let Decoded::Complete { consumed, .. } = framer.decode(rest).unwrap() {
            rest = &rest[consumed..];
            n += 1;
        }
        assert_eq!((n, rest.len()), (2, 10));
    }

    #[test]
    fn every_type_has_an_aligned_header() {
        for t in MsgType::ALL {
            assert_eq!(MsgType::from_wire(t.to_wire()), Some(*t));
            assert_eq!(t.msg_header_len() % 8, 0, "{t:?}");
            assert!(t.header_len() <= usize::from(u16::MAX));
        }
        assert_eq!(MsgType::from_wire(0), None);
    }
}
