//! Volume data held in memory: RAM (the malloc backend), or a file on a
//! memory file system mapped shared (the uring backend's tmpfs/ramfs files).
//!
//! One mapping holds the data: anonymous for RAM, `MAP_SHARED` of the file
//! for tmpfs, whose page cache is the storage itself, so a copy into the
//! mapping is the whole write (a `pwrite` to tmpfs would hand each write to
//! an io-wq worker, since shmem takes no non-blocking writes). Concurrent
//! access from several reactors goes through striped reader-writer locks
//! (one per 64 KiB), so overlapping writes from two cores never race in
//! memory; a request locks its stripes in ascending order, which rules out
//! deadlock. The locks are uncontended in practice and cost far less than
//! the copy they guard; the guards of a request live on the stack (a request
//! of up to `INLINE_STRIPES` stripes allocates nothing).
//!
//! The copy itself is synchronous, so a channel yields to its reactor once
//! per [`COPIES_PER_YIELD`] copies ([`YieldEvery`]): a task looping over
//! such a volume still lets the rest of its reactor run, while a front
//! end's command (one copy, then its response) does not pay a trip through
//! the run queue for it, as it did when the malloc channel yielded after
//! every request.

use super::VolumeError;
use crate::units::{ByteLen, ByteOffset};
use memmap2::{MmapMut, MmapOptions};
use mirrorpoint_poller::{yield_now, IoBuf, IoBufMut};
use std::cell::Cell;
use std::os::fd::AsRawFd;
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};

const STRIPE: u64 = 64 * 1024;
/// Requests spanning at most this many stripes keep their guards on the stack.
const INLINE_STRIPES: usize = 4;

/// The guards of one request, held until it is done.
/// (Held only for their `Drop`, which releases the stripes.)
enum Guards<G> {
    Inline { _held: [Option<G>; INLINE_STRIPES] },
    Heap { _held: Vec<G> },
}

impl<G> Guards<G> {
    fn take(range: std::ops::Range<usize>, mut lock: impl FnMut(usize) -> G) -> Self {
        if range.len() <= INLINE_STRIPES {
            let mut held: [Option<G>; INLINE_STRIPES] = [None, None, None, None];
            for (slot, i) in held.iter_mut().zip(range) {
                *slot = Some(lock(i));
            }
            Guards::Inline { _held: held }
        } else {
            Guards::Heap {
                _held: range.map(lock).collect(),
            }
        }
    }
}

/// Copies a channel does before it yields once: at most 16 chunks of
/// 128 KiB, a few hundred µs, between two yields.
const COPIES_PER_YIELD: u32 = 16;

/// One channel's count of copies since it last yielded.
#[derive(Default)]
pub(crate) struct YieldEvery {
    copies: Cell<u32>,
}

impl YieldEvery {
    /// Counts a copy; every [`COPIES_PER_YIELD`]th yields to the reactor.
    pub(crate) async fn copied(&self) {
        let n = self.copies.get() + 1;
        if n >= COPIES_PER_YIELD {
            self.copies.set(0);
            yield_now().await;
        } else {
            self.copies.set(n);
        }
    }
}

struct ImageInner {
    base: *mut u8,
    len: u64,
    stripes: Box<[RwLock<()>]>,
    _map: MmapMut,
}

// SAFETY: `base` points into `_map`, owned by this struct; every access to the
// bytes happens under the stripe locks covering them.
unsafe impl Send for ImageInner {}
// SAFETY: as above.
unsafe impl Sync for ImageInner {}

/// Memory-held volume data, shared by every channel of its volume.
#[derive(Clone)]
pub struct MemoryImage {
    inner: Arc<ImageInner>,
}

impl MemoryImage {
    /// Maps `bytes` of zeroed memory.
    pub fn new(bytes: u64) -> std::io::Result<Self> {
        let len = usize::try_from(bytes)
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidInput, "too large"))?;
        let map = MmapMut::map_anon(len.max(1))?;
        Ok(Self::from_map(map, bytes))
    }

    /// Maps the first `bytes` of `file` shared, after allocating them in the
    /// file system (`fallocate`), so that a full tmpfs fails here with
    /// ENOSPC instead of a later write to a hole failing as SIGBUS. `file`
    /// must be on a memory file system (the caller checked) and opened
    /// read-write.
    pub fn map_file(file: &std::fs::File, bytes: u64) -> std::io::Result<Self> {
        let len = usize::try_from(bytes)
            .ok()
            .filter(|&l| l > 0)
            .ok_or_else(|| {
                std::io::Error::new(std::io::ErrorKind::InvalidInput, "size not mappable")
            })?;
        let flen = i64::try_from(bytes)
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidInput, "too large"))?;
        // SAFETY: fallocate on a descriptor the caller owns; mode 0 only
        // allocates the holes in [0, bytes) and keeps the data.
        if unsafe { libc::fallocate(file.as_raw_fd(), 0, 0, flen) } != 0 {
            let e = std::io::Error::last_os_error();
            // ramfs allocates nothing ahead, and has no size limit to meet.
            if e.raw_os_error() != Some(libc::EOPNOTSUPP) {
                return Err(e);
            }
        }
        // SAFETY: the mapping is of our volume's own backing file, opened
        // read-write and now allocated to `bytes`; the target changes its
        // contents only through this mapping, under the stripe locks (zero
        // and unmap included; the only other use of the descriptor is
        // fsync, and GET LBA STATUS seeks on a read-only one). Another
        // process truncating the file under a running target would fault
        // the next access (SIGBUS), as with any memory-mapped store; the
        // file is the target's, not shared.
        let map = unsafe { MmapOptions::new().len(len).populate().map_mut(file)? };
        Ok(Self::from_map(map, bytes))
    }

    /// Takes ownership of `map`, which covers `bytes`. The mapping does not
    /// move when the `MmapMut` handle does, so its base pointer stays valid.
    fn from_map(mut map: MmapMut, bytes: u64) -> Self {
        let stripes = (0..bytes.div_ceil(STRIPE).max(1))
            .map(|_| RwLock::new(()))
            .collect();
        MemoryImage {
            inner: Arc::new(ImageInner {
                base: map.as_mut_ptr(),
                len: bytes,
                stripes,
                _map: map,
            }),
        }
    }

    fn stripes(&self, offset: u64, len: u64) -> std::ops::Range<usize> {
        let first = (offset / STRIPE) as usize;
        let last = ((offset + len - 1) / STRIPE) as usize;
        first..last + 1
    }

    fn read_lock(&self, offset: u64, len: u64) -> Guards<RwLockReadGuard<'_, ()>> {
        Guards::take(self.stripes(offset, len), |i| {
            self.inner.stripes[i]
                .read()
                .unwrap_or_else(|p| p.into_inner())
        })
    }

    fn write_lock(&self, offset: u64, len: u64) -> Guards<RwLockWriteGuard<'_, ()>> {
        Guards::take(self.stripes(offset, len), |i| {
            self.inner.stripes[i]
                .write()
                .unwrap_or_else(|p| p.into_inner())
        })
    }

    fn in_bounds(&self, offset: u64, len: u64) -> bool {
        len > 0
            && offset
                .checked_add(len)
                .is_some_and(|end| end <= self.inner.len)
    }

    /// Copies out of the image. The caller has range-checked against the volume.
    pub fn read(
        &self,
        offset: ByteOffset,
        mut buf: IoBufMut,
    ) -> (Result<(), VolumeError>, IoBufMut) {
        let len = buf.len() as u64;
        if !self.in_bounds(offset.0, len) {
            return (Err(out_of_range(offset, len, self.inner.len)), buf);
        }
        let guards = self.read_lock(offset.0, len);
        // SAFETY: offset+len is inside the mapping (checked above) and the
        // stripes covering it are read-locked, so no writer touches it.
        unsafe {
            std::ptr::copy_nonoverlapping(
                self.inner.base.add(offset.0 as usize),
                buf.as_mut_ptr(),
                len as usize,
            );
        }
        drop(guards);
        (Ok(()), buf)
    }

    /// Copies into the image. The caller has range-checked against the volume.
    pub fn write(&self, offset: ByteOffset, buf: IoBuf) -> (Result<(), VolumeError>, IoBuf) {
        let len = buf.len() as u64;
        if !self.in_bounds(offset.0, len) {
            return (Err(out_of_range(offset, len, self.inner.len)), buf);
        }
        let guards = self.write_lock(offset.0, len);
        // SAFETY: in bounds (checked above), stripes write-locked, and the
        // source is a pool chunk that cannot overlap this mapping.
        unsafe {
            std::ptr::copy_nonoverlapping(
                buf.as_ptr(),
                self.inner.base.add(offset.0 as usize),
                len as usize,
            );
        }
        drop(guards);
        (Ok(()), buf)
    }

    /// Zeroes a range one MiB at a time with a yield between, so that a
    /// large unmap (mkfs discards the whole device) does not hold the
    /// reactor for the whole memset.
    pub async fn zero_in_steps(&self, offset: ByteOffset, len: ByteLen) {
        const STEP: u64 = 1 << 20;
        let end = offset.0.saturating_add(len.0);
        let mut at = offset.0;
        while at < end {
            let n = STEP.min(end - at);
            self.zero(ByteOffset(at), ByteLen(n));
            at += n;
            if at < end {
                yield_now().await;
            }
        }
    }

    /// Zeroes a range (write zeroes and unmap).
    fn zero(&self, offset: ByteOffset, len: ByteLen) {
        if !self.in_bounds(offset.0, len.0) {
            return;
        }
        let guards = self.write_lock(offset.0, len.0);
        // SAFETY: in bounds and write-locked, as in `write`.
        unsafe {
            std::ptr::write_bytes(self.inner.base.add(offset.0 as usize), 0, len.0 as usize);
        }
        drop(guards);
    }
}

fn out_of_range(offset: ByteOffset, len: u64, size: u64) -> VolumeError {
    VolumeError::OutOfRange {
        offset: offset.0,
        len,
        size,
    }
}
