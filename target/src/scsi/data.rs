//! Moving bytes between the command layer and pool buffers.
//!
//! Data-In leaves in pool chunks (what the transport sends from without a
//! copy); Data-Out arrives as a list of pool buffers of whatever sizes the
//! transport's PDUs had. [`DataOut`] addresses that list as one logical byte
//! string (copy a range out, compare a range, slice a range without copying)
//! so handlers never care where one PDU ended and the next began.

use super::{CmdResult, Fail};
use mirrorpoint_poller::{buffer_pool, IoBuf};

/// Copies `bytes` into as many pool chunks as it takes.
pub(crate) fn to_pool(bytes: &[u8]) -> CmdResult<Vec<IoBuf>> {
    if bytes.is_empty() {
        return Ok(Vec::new());
    }
    let pool = buffer_pool();
    let chunk = pool.chunk_size().max(1);
    let mut out = Vec::with_capacity(bytes.len().div_ceil(chunk));
    for piece in bytes.chunks(chunk) {
        let mut b = pool.alloc(piece.len()).ok_or(Fail::Busy)?;
        b.copy_from_slice(piece);
        out.push(b.freeze());
    }
    Ok(out)
}

/// The Data-Out of a command as one byte string.
pub(crate) struct DataOut<'a> {
    bufs: &'a [IoBuf],
    len: usize,
}

impl<'a> DataOut<'a> {
    pub fn new(bufs: &'a [IoBuf]) -> Self {
        DataOut {
            bufs,
            len: bufs.iter().map(|b| b.len()).sum(),
        }
    }

    /// Total bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Calls `f` with consecutive slices covering `start..start + len`
    /// (clamped to what exists); `f` returning false stops early.
    fn walk(&self, start: usize, len: usize, mut f: impl FnMut(usize, &[u8]) -> bool) {
        let end = start.saturating_add(len).min(self.len);
        let mut base = 0usize;
        for b in self.bufs {
            let (lo, hi) = (base, base + b.len());
            base = hi;
            if hi <= start {
                continue;
            }
            if lo >= end {
                break;
            }
            let from = start.max(lo) - lo;
            let to = end.min(hi) - lo;
            let Some(s) = b.get(from..to) else { break };
            if !f(start.max(lo) - start, s) {
                break;
            }
        }
    }

    /// Copies `start..start + len` (clamped) into a new vector.
    pub fn to_vec(&self, start: usize, len: usize) -> Vec<u8> {
        let mut v = Vec::with_capacity(len.min(self.len));
        self.walk(start, len, |_, s| {
            v.extend_from_slice(s);
            true
        });
        v
    }

    /// Index (relative to `start`) of the first byte of `start..` that
    /// differs from `other`, if any.
    pub fn first_difference(&self, start: usize, other: &[u8]) -> Option<usize> {
        let mut found = None;
        let mut covered = 0;
        self.walk(start, other.len(), |rel, s| {
            let theirs = other.get(rel..rel + s.len()).unwrap_or(&[]);
            if let Some(i) = s.iter().zip(theirs).position(|(a, b)| a != b) {
                found = Some(rel + i);
                return false;
            }
            covered = rel + s.len();
            true
        });
        found.or(if covered < other.len() {
            Some(covered)
        } else {
            None
        })
    }

    /// The pieces covering `start..start + len` as zero-copy slices.
    pub fn slices(&self, start: usize, len: usize) -> Vec<IoBuf> {
        let mut out = Vec::new();
        let end = start.saturating_add(len).min(self.len);
        let mut base = 0usize;
        for b in self.bufs {
            let (lo, hi) = (base, base + b.len());
            base = hi;
            if hi <= start || lo >= end {
                continue;
            }
            let from = start.max(lo) - lo;
            let to = end.min(hi) - lo;
            if let Some(s) = b.slice(from, to - from) {
                out.push(s);
            }
        }
        out
    }
}
