//! Bounds-checked little-endian readers and writers.
//!
//! The message codecs go through these instead of indexing, so that no input
//! can make them panic: a short read is a [`WireError`], never an
//! out-of-bounds slice.

use super::error::WireError;
use super::frame::MsgType;

/// Reads little-endian fields off the front of a slice.
pub(crate) struct Reader<'a> {
    buf: &'a [u8],
    msg: MsgType,
}

impl<'a> Reader<'a> {
    pub(crate) fn new(buf: &'a [u8], msg: MsgType) -> Self {
        Reader { buf, msg }
    }

    pub(crate) fn array<const N: usize>(&mut self) -> Result<[u8; N], WireError> {
        let (head, rest) = self
            .buf
            .split_first_chunk::<N>()
            .ok_or(WireError::InvalidField {
                msg: self.msg,
                field: "message header",
                reason: "truncated",
            })?;
        self.buf = rest;
        Ok(*head)
    }

    pub(crate) fn u8(&mut self) -> Result<u8, WireError> {
        Ok(u8::from_le_bytes(self.array()?))
    }

    pub(crate) fn u32(&mut self) -> Result<u32, WireError> {
        Ok(u32::from_le_bytes(self.array()?))
    }

    pub(crate) fn u64(&mut self) -> Result<u64, WireError> {
        Ok(u64::from_le_bytes(self.array()?))
    }

    /// Reads `N` reserved bytes, which must be zero.
    pub(crate) fn reserved<const N: usize>(&mut self) -> Result<(), WireError> {
        if self.array::<N>()? == [0u8; N] {
            Ok(())
        } else {
            Err(WireError::InvalidField {
                msg: self.msg,
                field: "reserved",
                reason: "must be zero",
            })
        }
    }

    /// Fails unless every byte was consumed.
    pub(crate) fn finish(self) -> Result<(), WireError> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(WireError::InvalidField {
                msg: self.msg,
                field: "message header",
                reason: "trailing bytes",
            })
        }
    }
}

/// Writes little-endian fields into a caller buffer.
pub(crate) struct Writer<'a> {
    buf: &'a mut [u8],
    pos: usize,
}

impl<'a> Writer<'a> {
    pub(crate) fn new(buf: &'a mut [u8]) -> Self {
        Writer { buf, pos: 0 }
    }

    pub(crate) fn bytes(&mut self, data: &[u8]) -> Result<(), WireError> {
        let available = self.buf.len();
        let end = self
            .pos
            .checked_add(data.len())
            .ok_or(WireError::BufferTooSmall {
                needed: usize::MAX,
                available,
            })?;
        let dst = self
            .buf
            .get_mut(self.pos..end)
            .ok_or(WireError::BufferTooSmall {
                needed: end,
                available,
            })?;
        dst.copy_from_slice(data);
        self.pos = end;
        Ok(())
    }

    pub(crate) fn u8(&mut self, v: u8) -> Result<(), WireError> {
        self.bytes(&[v])
    }

    pub(crate) fn u16(&mut self, v: u16) -> Result<(), WireError> {
        self.bytes(&v.to_le_bytes())
    }

    pub(crate) fn u32(&mut self, v: u32) -> Result<(), WireError> {
        self.bytes(&v.to_le_bytes())
    }

    pub(crate) fn u64(&mut self, v: u64) -> Result<(), WireError> {
        self.bytes(&v.to_le_bytes())
    }

    pub(crate) fn zeros(&mut self, n: usize) -> Result<(), WireError> {
        for _ in 0..n {
            self.u8(0)?;
        }
        Ok(())
    }

    pub(crate) fn position(&self) -> usize {
        self.pos
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reader_never_overruns() {
        let mut r = Reader::new(&[1, 2, 3, 4, 5], MsgType::Flush);
        assert_eq!(r.u32().unwrap(), 0x0403_0201);
        assert!(r.u32().is_err());
        assert_eq!(r.u8().unwrap(), 5);
        r.finish().unwrap();
    }

    #[test]
    fn writer_never_overruns() {
        let mut buf = [0u8; 3];
        let mut w = Writer::new(&mut buf);
        w.u16(0x0201).unwrap();
        assert_eq!(
            w.u16(7),
            Err(WireError::BufferTooSmall {
                needed: 4,
                available: 3
            })
        );
        assert_eq!(w.position(), 2);
    }
}
