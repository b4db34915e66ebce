//! A reusable gather list for [`TcpStream::send_list`]: many small copied
//! parts (PDU headers, digests) and shared pool chunks (payloads), in order,
//! sent with as few `sendmsg` ops as the kernel allows.
//!
//! Shape, and why:
//! - A front end's writer queues a batch of PDUs and sends it at once; the
//!   per-send cost is then one ring op for the whole batch instead of one per
//!   payload chunk.
//! - Everything the kernel reads (the small-bytes arena, the chunks, the
//!   iovec arrays and the boxed `msghdr`) lives in the list, which moves into
//!   the op while it is in flight and comes back with the result. The list
//!   keeps its capacities across [`SendList::clear`], so after the first few
//!   batches a send allocates nothing.
//! - Small parts are appended to one byte arena and recorded as ranges; the
//!   iovecs are built only when sending, because the arena may reallocate
//!   while parts are being added.
//!
//! [`TcpStream::send_list`]: crate::TcpStream::send_list

use crate::stream::Gather;
use mirrorpoint_poller::IoBuf;

/// One entry of the list, in send order.
enum Part {
    /// `bytes[start..end]` of the arena.
    Bytes { start: usize, end: usize },
    /// A shared pool chunk, sent without copying.
    Chunk(IoBuf),
}

/// An ordered list of byte parts and pool chunks to send on one stream.
pub struct SendList {
    bytes: Vec<u8>,
    parts: Vec<Part>,
    pub(crate) gather: Gather,
    pub(crate) iov: Vec<libc::iovec>,
    pub(crate) msg: Box<libc::msghdr>,
}

impl Default for SendList {
    fn default() -> Self {
        SendList::new()
    }
}

impl std::fmt::Debug for SendList {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SendList")
            .field("parts", &self.parts.len())
            .field("len", &self.len())
            .finish()
    }
}

impl SendList {
    /// An empty list.
    pub fn new() -> SendList {
        SendList {
            bytes: Vec::new(),
            parts: Vec::new(),
            gather: Gather::new(Vec::new()),
            iov: Vec::new(),
            // SAFETY: msghdr is plain old data; all zeroes is a valid empty header.
            msg: Box::new(unsafe { std::mem::zeroed() }),
        }
    }

    /// Appends a copy of `b`.
    pub fn push_bytes(&mut self, b: &[u8]) {
        self.append_with(|v| v.extend_from_slice(b));
    }

    /// Lets `f` append bytes to the arena (e.g. encode a header in place);
    /// what it appended becomes the next part. What `f` leaves behind when it
    /// appends nothing (or truncates back) adds no part.
    pub fn append_with<R>(&mut self, f: impl FnOnce(&mut Vec<u8>) -> R) -> R {
        let start = self.bytes.len();
        let r = f(&mut self.bytes);
        if self.bytes.len() < start {
            // `f` cut into earlier parts' bytes: put the length back so
            // recorded ranges stay valid (the cut bytes read as zeroes).
            self.bytes.resize(start, 0);
        }
        let end = self.bytes.len();
        if end > start {
            match self.parts.last_mut() {
                Some(Part::Bytes { end: last, .. }) if *last == start => *last = end,
                _ => self.parts.push(Part::Bytes { start, end }),
            }
        }
        r
    }

    /// Appends a pool chunk (shared, not copied). Empty chunks are skipped.
    pub fn push_chunk(&mut self, chunk: IoBuf) {
        if !chunk.is_empty() {
            self.parts.push(Part::Chunk(chunk));
        }
    }

    /// Whether nothing is queued.
    pub fn is_empty(&self) -> bool {
        self.parts.is_empty()
    }

    /// Number of parts (byte runs and chunks) queued.
    pub fn parts(&self) -> usize {
        self.parts.len()
    }

    /// Total bytes queued.
    pub fn len(&self) -> usize {
        self.parts
            .iter()
            .map(|p| match p {
                Part::Bytes { start, end } => end - start,
                Part::Chunk(c) => c.len(),
            })
            .sum()
    }

    /// Bytes copied into the arena (the list's length minus its chunks').
    pub fn arena_len(&self) -> usize {
        self.bytes.len()
    }

    /// The arena's capacity (kept across [`SendList::clear`]).
    pub fn arena_capacity(&self) -> usize {
        self.bytes.capacity()
    }

    /// The bytes the list would send, in order, as one vector (a copy: for
    /// tests and debugging, not the data path).
    pub fn to_vec(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.len());
        for p in &self.parts {
            match p {
                Part::Bytes { start, end } => {
                    out.extend_from_slice(self.bytes.get(*start..*end).unwrap_or(&[]))
                }
                Part::Chunk(c) => out.extend_from_slice(c),
            }
        }
        out
    }

    /// Forgets every part (releasing the chunks), keeping the capacities.
    pub fn clear(&mut self) {
        self.bytes.clear();
        self.parts.clear();
        self.gather.reset();
        self.iov.clear();
    }

    /// Points the gather state at the current parts, from the start.
    pub(crate) fn prepare(&mut self) {
        self.gather.reset();
        let base = self.bytes.as_ptr();
        for p in &self.parts {
            let (ptr, len) = match p {
                // `start..end` is inside the arena (append_with keeps it so).
                Part::Bytes { start, end } => (base.wrapping_add(*start), end - start),
                Part::Chunk(c) => (c.as_ptr(), c.len()),
            };
            self.gather.segments.push(libc::iovec {
                iov_base: ptr as *mut libc::c_void,
                iov_len: len,
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn adjacent_byte_parts_merge_and_ranges_survive_reallocation() {
        let mut l = SendList::new();
        l.push_bytes(b"abc");
        l.append_with(|v| v.extend_from_slice(&[b'd'; 1000]));
        assert_eq!(l.parts(), 1);
        assert_eq!(l.len(), 1003);
        l.append_with(|_| ());
        assert_eq!(l.parts(), 1);
        l.prepare();
        assert_eq!(l.gather.segments.len(), 1);
        assert_eq!(l.gather.segments[0].iov_len, 1003);
        assert_eq!(l.gather.segments[0].iov_base as *const u8, l.bytes.as_ptr());
        l.clear();
        assert!(l.is_empty());
        assert_eq!(l.len(), 0);
    }

    #[test]
    fn truncating_appender_cannot_corrupt_earlier_parts() {
        let mut l = SendList::new();
        l.push_bytes(b"hello");
        l.append_with(|v| v.truncate(2));
        assert_eq!(l.len(), 5);
        assert_eq!(l.parts(), 1);
    }
}
