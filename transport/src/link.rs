//! The message transport between mirror sites: the [`Link`] trait and its
//! TCP implementation, [`TcpLink`].
//!
//! A link carries messages, each a small header (the mirror protocol's
//! command) and a payload of pool chunks (the data written). The trait is
//! shaped by what zero-copy transports need:
//! - sending takes the payload as shared pool buffers ([`IoBuf`]), i.e.
//!   registered memory, and the header as a small slice the link copies into
//!   memory of its own;
//! - receiving scatters the payload into pool buffers ([`IoBufMut`]) given by
//!   the caller, and copies the header out into a caller's slice;
//! - each call owns its buffers and gives them back, as io_uring and RDMA
//!   completions require.
//!
//! # TCP
//! TCP is a byte stream, so [`TcpLink`] frames each message with a 12-byte
//! prefix: magic `"MPL1"`, header length and payload length (little
//! endian). A message goes out as one `sendmsg` of prefix + header (copied,
//! small) and the payload chunks (not copied); the receiver reads the prefix,
//! then the header, then the payload straight into its chunks. Messages are
//! serialised per direction, so tasks may share a link. A link is broken
//! (every later call fails) after any I/O error, a bad frame, or a call
//! dropped half way, because the byte stream is then out of step.
//!
//! # RDMA (later)
//! A reliable-connected queue pair maps onto the same calls:
//! - the reactor's buffer pool mapping is registered once as a memory
//!   region, so every [`IoBuf`]/[`IoBufMut`] is `(addr, len, lkey)` with no
//!   per-I/O registration; headers go through a small registered ring of
//!   header slots owned by the link (the same small copy TCP makes);
//! - [`Link::send_message`] posts one SEND work request whose SGE list is
//!   `[header slot, payload chunks...]` (`SEND_WITH_IMM`, the immediate
//!   carrying the header length), keeps the `IoBuf` clones with the request,
//!   and completes on its send completion (`IBV_WC_SEND`);
//! - [`Link::recv_into`] is served by RECV work requests with SGEs
//!   `[header slot of max_header_len bytes, payload chunks...]`; the sender
//!   pads the header to that slot so payloads land at offset 0 of chunks,
//!   and the receive completion's `byte_len` and immediate give
//!   [`Received`]. Receives must be posted before the peer sends, so an RDMA
//!   link keeps a window of receives posted with chunks of its own pool and
//!   grants the peer credits for them; `recv_into` returns the chunks filled
//!   by the oldest completion and reposts the ones it was given. That is why
//!   the returned buffers may be other chunks than those passed in;
//! - a queue pair entering the error state is the RDMA form of a broken link.

use mirrorpoint_poller::{IoBuf, IoBufMut, LocalSemaphore};
use std::cell::Cell;
use std::future::Future;
use std::io;

use crate::stream::TcpStream;

/// Sizes of one received message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Received {
    /// Header bytes, at the front of the header slice.
    pub header_len: usize,
    /// Payload bytes, filling the returned buffers in order.
    pub payload_len: usize,
}

/// A reliable, ordered message transport to one peer.
pub trait Link {
    /// The largest header a message may carry.
    fn max_header_len(&self) -> usize;

    /// Sends one message: `header` (at most [`Link::max_header_len`] bytes)
    /// followed by the `payload` buffers in order, without copying the
    /// payload. Resolves when the transport has taken all of it (TCP: in
    /// the socket buffer; RDMA: acknowledged by the peer's adapter).
    fn send_message(
        &self,
        header: &[u8],
        payload: &[IoBuf],
    ) -> impl Future<Output = io::Result<()>>;

    /// Receives the next message: its header is copied into the front of
    /// `header`, its payload fills the buffers in order (each up to its
    /// `len()`). Returns the sizes and the buffers, which may be other chunks
    /// of the same pool than those passed in (see the module notes on RDMA).
    /// A header longer than `header` or a payload larger than the buffers is
    /// an `InvalidData` error and breaks the link.
    fn recv_into(
        &self,
        header: &mut [u8],
        payload: Vec<IoBufMut>,
    ) -> impl Future<Output = (io::Result<Received>, Vec<IoBufMut>)>;
}

/// Frame prefix magic: "MPL1".
const MAGIC: u32 = u32::from_le_bytes(*b"MPL1");
/// magic, header length, payload length.
const PREFIX_LEN: usize = 12;
/// Default largest header of a [`TcpLink`].
pub const DEFAULT_MAX_HEADER: usize = 1024;

/// [`Link`] over a [`TcpStream`], with length-prefixed frames.
pub struct TcpLink {
    stream: TcpStream,
    max_header: usize,
    send_lock: LocalSemaphore,
    recv_lock: LocalSemaphore,
    broken: Cell<bool>,
}

impl std::fmt::Debug for TcpLink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TcpLink")
            .field("stream", &self.stream)
            .field("max_header", &self.max_header)
            .field("broken", &self.broken.get())
            .finish()
    }
}

/// Marks the link broken unless disarmed (an error, or a dropped future).
struct Poison<'a> {
    flag: &'a Cell<bool>,
    armed: bool,
}

impl Poison<'_> {
    fn disarm(mut self) {
        self.armed = false;
    }
}

impl Drop for Poison<'_> {
    fn drop(&mut self) {
        if self.armed {
            self.flag.set(true);
        }
    }
}

fn broken() -> io::Error {
    io::Error::new(
        io::ErrorKind::BrokenPipe,
        "link is broken by an earlier error",
    )
}

fn invalid_data(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg)
}

impl TcpLink {
    /// A link over `stream` accepting headers up to [`DEFAULT_MAX_HEADER`].
    pub fn new(stream: TcpStream) -> TcpLink {
        TcpLink::with_max_header(stream, DEFAULT_MAX_HEADER)
    }

    /// A link accepting headers up to `max_header` bytes (both ends should agree).
    pub fn with_max_header(stream: TcpStream, max_header: usize) -> TcpLink {
        TcpLink {
            stream,
            max_header: max_header.min(u32::MAX as usize),
            send_lock: LocalSemaphore::new(1),
            recv_lock: LocalSemaphore::new(1),
            broken: Cell::new(false),
        }
    }

    /// The underlying stream.
    pub fn stream(&self) -> &TcpStream {
        &self.stream
    }

    /// Whether an earlier failure put the byte stream out of step.
    pub fn is_broken(&self) -> bool {
        self.broken.get()
    }

    /// The underlying stream back.
    pub fn into_stream(self) -> TcpStream {
        self.stream
    }

    fn poison(&self) -> Poison<'_> {
        Poison {
            flag: &self.broken,
            armed: true,
        }
    }

    async fn recv_payload(
        &self,
        payload: Vec<IoBufMut>,
        mut remaining: usize,
    ) -> (io::Result<()>, Vec<IoBufMut>) {
        let mut done = Vec::with_capacity(payload.len());
        let mut rest = payload.into_iter();
        let mut result = Ok(());
        while remaining > 0 {
            let Some(buf) = rest.next() else {
                // Checked against the buffers' total before; never reached.
                result = Err(invalid_data("payload larger than its buffers".into()));
                break;
            };
            let take = remaining.min(buf.len());
            let (res, buf) = self.stream.recv_exact(buf, 0..take).await;
            done.push(buf);
            if let Err(e) = res {
                result = Err(e);
                break;
            }
            remaining -= take;
        }
        done.extend(rest);
        (result, done)
    }
}

impl Link for TcpLink {
    fn max_header_len(&self) -> usize {
        self.max_header
    }

    async fn send_message(&self, header: &[u8], payload: &[IoBuf]) -> io::Result<()> {
        if header.len() > self.max_header {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "header of {} bytes exceeds the link's {}",
                    header.len(),
                    self.max_header
                ),
            ));
        }
        let payload_len = payload.iter().map(|b| b.len()).sum::<usize>();
        let Ok(payload_len32) = u32::try_from(payload_len) else {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("payload of {payload_len} bytes is too large for one message"),
            ));
        };
        let _permit = self.send_lock.acquire().await;
        if self.broken.get() {
            return Err(broken());
        }
        let guard = self.poison();
        let mut frame = Vec::with_capacity(PREFIX_LEN + header.len());
        frame.extend_from_slice(&MAGIC.to_le_bytes());
        frame.extend_from_slice(&(header.len() as u32).to_le_bytes());
        frame.extend_from_slice(&payload_len32.to_le_bytes());
        frame.extend_from_slice(header);
        self.stream.sendmsg(frame, payload, true).await?;
        guard.disarm();
        Ok(())
    }

    async fn recv_into(
        &self,
        header: &mut [u8],
        payload: Vec<IoBufMut>,
    ) -> (io::Result<Received>, Vec<IoBufMut>) {
        let _permit = self.recv_lock.acquire().await;
        if self.broken.get() {
            return (Err(broken()), payload);
        }
        let guard = self.poison();
        let (res, prefix) = self
            .stream
            .recv_exact_raw(vec![0u8; PREFIX_LEN], 0..PREFIX_LEN)
            .await;
        if let Err(e) = res {
            return (Err(e), payload);
        }
        let word = |i: usize| {
            let mut b = [0u8; 4];
            b.copy_from_slice(&prefix[i * 4..i * 4 + 4]);
            u32::from_le_bytes(b)
        };
        let (magic, header_len, payload_len) = (word(0), word(1) as usize, word(2) as usize);
        if magic != MAGIC {
            return (
                Err(invalid_data(format!("bad frame magic {magic:#010x}"))),
                payload,
            );
        }
        if header_len > header.len().min(self.max_header) {
            return (
                Err(invalid_data(format!(
                    "header of {header_len} bytes exceeds {} (link max {})",
                    header.len(),
                    self.max_header
                ))),
                payload,
            );
        }
        let room = payload.iter().map(|b| b.len()).sum::<usize>();
        if payload_len > room {
            return (
                Err(invalid_data(format!(
                    "payload of {payload_len} bytes exceeds the {room} bytes of buffers given"
                ))),
                payload,
            );
        }
        if header_len > 0 {
            let (res, bytes) = self
                .stream
                .recv_exact_raw(vec![0u8; header_len], 0..header_len)
                .await;
            if let Err(e) = res {
                return (Err(e), payload);
            }
            header[..header_len].copy_from_slice(&bytes);
        }
        let (res, payload) = self.recv_payload(payload, payload_len).await;
        if let Err(e) = res {
            return (Err(e), payload);
        }
        guard.disarm();
        (
            Ok(Received {
                header_len,
                payload_len,
            }),
            payload,
        )
    }
}
