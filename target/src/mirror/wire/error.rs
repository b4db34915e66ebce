//! Typed errors of the wire codec and the handshake.
//!
//! Every check the decoder makes has its own variant, so a peer that is
//! refused can be told precisely why (and so tests can assert on the reason),
//! and no error carries more than a few bytes: errors are built from checked
//! header fields, never from attacker-sized buffers.

use super::frame::MsgType;
use super::types::{ProtocolVersion, VersionRange};

/// Why a frame or message could not be decoded or encoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    /// The first bytes are not the protocol magic: not our protocol, or the
    /// stream lost sync.
    #[error("bad magic {found:02x?}")]
    BadMagic {
        /// The bytes found where the magic should be (as many as were there).
        found: [u8; 4],
    },
    /// The peer speaks another major version of the protocol.
    #[error("protocol version mismatch: we speak {ours}, peer sent {theirs}")]
    VersionMismatch {
        /// Our version.
        ours: ProtocolVersion,
        /// The version in the peer's frame.
        theirs: ProtocolVersion,
    },
    /// A message type this version does not know.
    #[error("unknown message type {0:#06x}")]
    UnknownMessageType(u16),
    /// Frame flags that this version reserves (must be zero).
    #[error("reserved frame flags set: {0:#06x}")]
    ReservedFrameFlags(u16),
    /// The header length does not match the message type's layout.
    #[error("{msg:?}: header length {found}, expected {expected}")]
    HeaderLength {
        /// The message type.
        msg: MsgType,
        /// The header length this type has.
        expected: u16,
        /// The header length in the frame.
        found: u16,
    },
    /// The payload is longer than the configured limit.
    #[error("payload of {len} bytes exceeds the limit of {max}")]
    PayloadTooLarge {
        /// Declared payload length.
        len: u32,
        /// Configured maximum.
        max: u32,
    },
    /// The header (fixed part and message header) failed its CRC32C.
    #[error("header CRC32C mismatch: frame says {expected:#010x}, computed {computed:#010x}")]
    HeaderCrc {
        /// CRC carried in the frame.
        expected: u32,
        /// CRC computed over the received bytes.
        computed: u32,
    },
    /// The payload failed its CRC32C.
    #[error("payload CRC32C mismatch: frame says {expected:#010x}, computed {computed:#010x}")]
    PayloadCrc {
        /// CRC carried in the frame.
        expected: u32,
        /// CRC computed over the received bytes.
        computed: u32,
    },
    /// A split receive handed a payload of another length than the header declared.
    #[error("payload is {actual} bytes, header declared {declared}")]
    PayloadMismatch {
        /// Length from the header.
        declared: u32,
        /// Length handed in.
        actual: usize,
    },
    /// The payload length disagrees with what the message header declares.
    #[error("{msg:?}: payload is {actual} bytes, message declares {declared}")]
    PayloadLength {
        /// The message type.
        msg: MsgType,
        /// Length implied by the message fields.
        declared: u64,
        /// Actual payload length.
        actual: u64,
    },
    /// A field value is out of its allowed set or range.
    #[error("{msg:?}: invalid {field}: {reason}")]
    InvalidField {
        /// The message type.
        msg: MsgType,
        /// The field.
        field: &'static str,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// Unknown bits in a message's flags.
    #[error("{msg:?}: unknown flags {flags:#x}")]
    UnknownFlags {
        /// The message type.
        msg: MsgType,
        /// The offending bits.
        flags: u32,
    },
    /// An offset plus a length does not fit in 64 bits.
    #[error("{msg:?}: offset {offset} + length {len} overflows")]
    RangeOverflow {
        /// The message type.
        msg: MsgType,
        /// Start offset.
        offset: u64,
        /// Length.
        len: u64,
    },
    /// A list holds more entries than the protocol allows.
    #[error("{msg:?}: {count} {what}, at most {max} allowed")]
    TooMany {
        /// The message type.
        msg: MsgType,
        /// What is counted.
        what: &'static str,
        /// Count found or requested.
        count: u64,
        /// Maximum.
        max: u64,
    },
    /// The caller's buffer cannot hold the encoded header.
    #[error("buffer of {available} bytes too small, {needed} needed")]
    BufferTooSmall {
        /// Bytes needed.
        needed: usize,
        /// Bytes available.
        available: usize,
    },
}

/// Why a handshake failed. Each side's state machine stops at the first error;
/// send the peer [`HandshakeError::to_wire`] and close the connection.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HandshakeError {
    /// The peer's proof does not verify: it does not hold our shared secret
    /// (or the transcript was tampered with).
    #[error("authentication failed: peer proof does not verify")]
    AuthFailed,
    /// The version ranges do not overlap.
    #[error("protocol version mismatch: we support {ours}, peer supports {theirs}")]
    VersionMismatch {
        /// Our supported range.
        ours: VersionRange,
        /// The peer's supported range.
        theirs: VersionRange,
    },
    /// The peer picked a version other than the one both sides must pick.
    #[error("peer chose version {theirs}, expected {expected}")]
    VersionChoice {
        /// The version the negotiation yields.
        expected: ProtocolVersion,
        /// The version the peer announced.
        theirs: ProtocolVersion,
    },
    /// A message that is not valid in the current state.
    #[error("unexpected {got:?} in handshake state {state}")]
    UnexpectedMessage {
        /// The state the machine was in.
        state: &'static str,
        /// The message type received.
        got: MsgType,
    },
    /// The peer claims the same role as we have (e.g. a reflected Hello).
    #[error("peer claims our own role")]
    RoleConflict,
    /// A nonce was seen twice within the connection (reflected or replayed).
    #[error("nonce replayed within the connection")]
    NonceReplay,
    /// The peer's nonce is all zeros: its random source is broken.
    #[error("peer nonce is all zeros")]
    WeakNonce,
    /// The peer is not the site we expected.
    #[error("peer is {found:?}, expected {expected:?}")]
    UnexpectedPeer {
        /// Expected site name.
        expected: String,
        /// The name the peer sent.
        found: String,
    },
    /// The peer refused the handshake with an Error message.
    #[error("peer refused: {code:?}: {message}")]
    PeerRefused {
        /// The peer's error code.
        code: super::types::ErrorCode,
        /// The peer's explanation.
        message: String,
    },
    /// The OS random source failed.
    #[error("random source failed: {0}")]
    Random(String),
    /// A failure that cannot happen with a valid configuration.
    #[error("internal error: {0}")]
    Internal(&'static str),
    /// The machine already failed or finished; it takes no more input.
    #[error("handshake already {0}")]
    Finished(&'static str),
}
