//! Little-endian field access for fixed-layout wire structures.
//!
//! NVMe and NVMe/TCP structures are fixed-size little-endian records. These
//! helpers read and write fields by byte offset without slice indexing: a read
//! outside the buffer yields zero and a write outside it is dropped. Callers
//! check buffer lengths up front (decoders reject short input with a typed
//! error), so the fallbacks are never reached on validated buffers; they exist
//! so that no input can make the protocol layer panic.

/// Reads `N` bytes at `off`, or `None` if out of range.
pub(crate) fn bytes<const N: usize>(b: &[u8], off: usize) -> Option<[u8; N]> {
    let end = off.checked_add(N)?;
    b.get(off..end)?.try_into().ok()
}

pub(crate) fn u8_at(b: &[u8], off: usize) -> u8 {
    b.get(off).copied().unwrap_or(0)
}

pub(crate) fn u16_at(b: &[u8], off: usize) -> u16 {
    bytes::<2>(b, off).map(u16::from_le_bytes).unwrap_or(0)
}

pub(crate) fn u32_at(b: &[u8], off: usize) -> u32 {
    bytes::<4>(b, off).map(u32::from_le_bytes).unwrap_or(0)
}

pub(crate) fn u64_at(b: &[u8], off: usize) -> u64 {
    bytes::<8>(b, off).map(u64::from_le_bytes).unwrap_or(0)
}

pub(crate) fn put_bytes(b: &mut [u8], off: usize, v: &[u8]) {
    let Some(end) = off.checked_add(v.len()) else {
        return;
    };
    if let Some(dst) = b.get_mut(off..end) {
        dst.copy_from_slice(v);
    }
}

pub(crate) fn put_u8(b: &mut [u8], off: usize, v: u8) {
    if let Some(d) = b.get_mut(off) {
        *d = v;
    }
}

pub(crate) fn put_u16(b: &mut [u8], off: usize, v: u16) {
    put_bytes(b, off, &v.to_le_bytes());
}

pub(crate) fn put_u32(b: &mut [u8], off: usize, v: u32) {
    put_bytes(b, off, &v.to_le_bytes());
}

pub(crate) fn put_u64(b: &mut [u8], off: usize, v: u64) {
    put_bytes(b, off, &v.to_le_bytes());
}

/// Writes `s` into a fixed-width ASCII field padded with spaces (Identify
/// SN/MN/FR style). Text longer than the field is truncated.
pub(crate) fn put_ascii_space_padded(b: &mut [u8], off: usize, width: usize, s: &str) {
    let Some(end) = off.checked_add(width) else {
        return;
    };
    if let Some(dst) = b.get_mut(off..end) {
        dst.fill(b' ');
        for (d, c) in dst.iter_mut().zip(s.bytes()) {
            *d = c;
        }
    }
}

/// Writes `s` into a fixed-width field padded with NULs (NQN / TRADDR style).
/// Text is truncated so that at least one NUL terminator remains.
pub(crate) fn put_ascii_nul_padded(b: &mut [u8], off: usize, width: usize, s: &str) {
    let Some(end) = off.checked_add(width) else {
        return;
    };
    if let Some(dst) = b.get_mut(off..end) {
        dst.fill(0);
        let max = width.saturating_sub(1);
        for (d, c) in dst.iter_mut().zip(s.bytes().take(max)) {
            *d = c;
        }
    }
}
