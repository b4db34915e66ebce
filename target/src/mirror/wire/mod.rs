//! The site-to-site mirror wire protocol, sans IO.
//!
//! A connection between two sites (or an agent and the master agent) carries
//! frames of our own versioned little-endian protocol ([`frame`]): a fixed
//! 32-byte header with magic, version, type, lengths, a request tag and two
//! CRC32Cs (metadata and payload), a fixed-size message header per type, and
//! a payload. [`message`] gives every message a typed, validated form;
//! [`handshake`] authenticates both ends with a shared secret before anything
//! else is accepted.
//!
//! Nothing here touches a socket, a clock or a thread: the caller feeds bytes
//! in and writes bytes out, which keeps the codec testable and fuzzable
//! ([`fuzz_decode`]) and lets the poller-driven socket layer own all IO. Bulk
//! data is never copied by the codec: decoded payloads borrow the receive
//! buffer, and the encoder returns the caller's data as a separate iovec.
//!
//! Everything decoded is checked before use and no input can make the codec
//! panic or allocate beyond the bytes it was given. The lints below hold the
//! non-test code to that: no `unwrap`, `expect`, `panic!` or unchecked slicing.

#![cfg_attr(
    not(test),
    deny(
        clippy::unwrap_used,
        clippy::expect_used,
        clippy::panic,
        clippy::indexing_slicing,
        clippy::unreachable,
        clippy::todo,
        clippy::unimplemented
    )
)]

mod codec;
pub mod error;
pub mod frame;
mod fuzz;
pub mod handshake;
pub mod message;
#[cfg(test)]
mod proptests;
pub mod types;

pub use error::{HandshakeError, WireError};
pub use frame::{
    Decoded, Frame, FrameHeader, FrameLimits, Framer, MsgType, DEFAULT_MAX_PAYLOAD,
    FRAME_HEADER_LEN, MAGIC, MAX_PAYLOAD_CAP,
};
pub use fuzz::fuzz_decode;
pub use handshake::{Acceptor, Established, HandshakeConfig, Initiator, SharedSecret, Step};
pub use message::*;
pub use types::*;

impl<'a> Frame<'a> {
    /// Decodes this frame's message (see [`Message::decode`]).
    pub fn message(&self, limits: &FrameLimits) -> Result<Message<'a>, WireError> {
        Message::decode(self, limits)
    }
}

impl Framer {
    /// Cuts the first frame out of `buf` and decodes its message: the tag and
    /// the message, or how many more bytes are needed.
    pub fn decode_message<'a>(
        &self,
        buf: &'a [u8],
    ) -> Result<Decoded<(RequestTag, Message<'a>)>, WireError> {
        Ok(match self.decode(buf)? {
            Decoded::NeedMore(n) => Decoded::NeedMore(n),
            Decoded::Complete { value, consumed } => Decoded::Complete {
                value: (value.header.tag, value.message(self.limits())?),
                consumed,
            },
        })
    }
}
