//! The buffer pool: fixed-size chunks carved from one big memory mapping.
//!
//! Data from a host lands in a pool chunk once and that same chunk is written
//! to the local device and sent to every mirror leg, so the data path copies
//! nothing after the socket receive. The mapping is made with 2 MiB huge pages
//! when the system has them reserved, and with normal pages otherwise; each
//! chunk is registered with its reactor's io_uring as one fixed buffer whose
//! index equals the chunk index, so a fixed read or write needs no lookup.
//!
//! Ownership is what keeps the kernel and Rust from touching a chunk at the
//! same time: an [`IoBufMut`] is the one owner of its chunk and may write to
//! it; [`IoBufMut::freeze`] turns it into an [`IoBuf`], a cheap reference
//! counted read-only handle that can be cloned for every leg a write goes to.
//! The last handle dropped returns the chunk to a lock-free free list, from
//! any thread.

use crossbeam_queue::ArrayQueue;
use memmap2::{MmapMut, MmapOptions};
use std::fmt;
use std::ops::{Deref, DerefMut};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;

/// io_uring accepts at most this many registered buffers per ring.
pub const MAX_CHUNKS: usize = 16384;

/// Errors building a pool.
#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    /// The chunk size or count is out of range.
    #[error("invalid buffer pool geometry: {0}")]
    Geometry(String),
    /// The memory mapping failed.
    #[error("cannot map {bytes} bytes for the buffer pool: {source}")]
    Map {
        /// How much was asked for.
        bytes: usize,
        /// Why it failed.
        source: std::io::Error,
    },
}

/// Shape of a pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolConfig {
    /// Bytes per chunk: a multiple of 4096. The largest single I/O a front end
    /// will accept is one chunk.
    pub chunk_size: usize,
    /// Number of chunks, at most [`MAX_CHUNKS`].
    pub chunk_count: usize,
    /// Try huge pages first.
    pub huge_pages: bool,
}

impl Default for PoolConfig {
    fn default() -> Self {
        PoolConfig {
            chunk_size: 128 * 1024,
            chunk_count: 512,
            huge_pages: true,
        }
    }
}

static NEXT_POOL_ID: AtomicU64 = AtomicU64::new(1);

struct PoolInner {
    id: u64,
    base: *mut u8,
    chunk_size: usize,
    chunk_count: usize,
    huge_pages: bool,
    /// One reference count per chunk: 0 while free.
    refs: Box<[AtomicU32]>,
    free: ArrayQueue<u32>,
    /// Keeps the mapping alive; `base` points into it.
    _map: MmapMut,
}

// SAFETY: `base` points into `_map`, which lives as long as the PoolInner. Access
// to each chunk is arbitrated by ownership: only the unique IoBufMut writes, and
// shared IoBufs only read; the free list and counts are atomics.
unsafe impl Send for PoolInner {}
// SAFETY: see above; every shared mutation goes through atomics.
unsafe impl Sync for PoolInner {}

/// A pool of equal chunks in one mapping. Cloning the handle shares the pool.
#[derive(Clone)]
pub struct BufferPool {
    inner: Arc<PoolInner>,
}

impl fmt::Debug for BufferPool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BufferPool")
            .field("id", &self.inner.id)
            .field("chunk_size", &self.inner.chunk_size)
            .field("chunk_count", &self.inner.chunk_count)
            .field("free", &self.inner.free.len())
            .field("huge_pages", &self.inner.huge_pages)
            .finish()
    }
}

impl BufferPool {
    /// Maps and carves a pool.
    pub fn new(config: PoolConfig) -> Result<Self, PoolError> {
        if config.chunk_size == 0 || config.chunk_size % 4096 != 0 || config.chunk_size > (1 << 30)
        {
            return Err(PoolError::Geometry(format!(
                "chunk size {} must be a non-zero multiple of 4096 up to 1 GiB",
                config.chunk_size
            )));
        }
        if config.chunk_count == 0 || config.chunk_count > MAX_CHUNKS {
            return Err(PoolError::Geometry(format!(
                "chunk count {} must be between 1 and {MAX_CHUNKS}",
                config.chunk_count
            )));
        }
        let bytes = config.chunk_size * config.chunk_count;
        let huge_len = bytes.div_ceil(2 << 20) * (2 << 20);
        let (mut map, huge) = match config.huge_pages {
            true => match MmapOptions::new().len(huge_len).huge(Some(21)).map_anon() {
                Ok(m) => (m, true),
                Err(_) => (Self::map_normal(bytes)?, false),
            },
            false => (Self::map_normal(bytes)?, false),
        };
        if !huge {
            tracing::debug!(
                bytes,
                "buffer pool on normal pages (no huge pages reserved)"
            );
        }
        let base = map.as_mut_ptr();
        let free = ArrayQueue::new(config.chunk_count);
        for index in 0..config.chunk_count as u32 {
            // Cannot fail: the queue holds exactly chunk_count entries.
            let _ = free.push(index);
        }
        let refs = (0..config.chunk_count).map(|_| AtomicU32::new(0)).collect();
        Ok(BufferPool {
            inner: Arc::new(PoolInner {
                id: NEXT_POOL_ID.fetch_add(1, Ordering::Relaxed),
                base,
                chunk_size: config.chunk_size,
                chunk_count: config.chunk_count,
                huge_pages: huge,
                refs,
                free,
                _map: map,
            }),
        })
    }

    fn map_normal(bytes: usize) -> Result<MmapMut, PoolError> {
        MmapOptions::new()
            .len(bytes)
            .map_anon()
            .map_err(|source| PoolError::Map { bytes, source })
    }

    /// A process-unique id, used to tell whether a buffer belongs to the ring's
    /// registered pool.
    pub fn id(&self) -> u64 {
        self.inner.id
    }

    /// Bytes per chunk.
    pub fn chunk_size(&self) -> usize {
        self.inner.chunk_size
    }

    /// Chunks in the pool.
    pub fn chunk_count(&self) -> usize {
        self.inner.chunk_count
    }

    /// Chunks free right now.
    pub fn free_chunks(&self) -> usize {
        self.inner.free.len()
    }

    /// Whether the mapping got huge pages.
    pub fn huge_pages(&self) -> bool {
        self.inner.huge_pages
    }

    /// Takes a chunk and exposes its first `len` bytes, or `None` when the pool
    /// is empty or `len` is larger than a chunk.
    pub fn alloc(&self, len: usize) -> Option<IoBufMut> {
        if len > self.inner.chunk_size {
            return None;
        }
        let index = self.inner.free.pop()?;
        let previous = self.inner.refs[index as usize].swap(1, Ordering::Acquire);
        debug_assert_eq!(previous, 0, "chunk {index} handed out twice");
        Some(IoBufMut {
            chunk: Chunk {
                pool: Arc::clone(&self.inner),
                index,
            },
            len,
        })
    }

    /// One iovec per chunk, in chunk order, for `io_uring_register_buffers`.
    pub fn iovecs(&self) -> Vec<libc::iovec> {
        (0..self.inner.chunk_count)
            .map(|i| libc::iovec {
                // SAFETY: i < chunk_count, so the offset stays inside the mapping.
                iov_base: unsafe { self.inner.base.add(i * self.inner.chunk_size) }.cast(),
                iov_len: self.inner.chunk_size,
            })
            .collect()
    }
}

/// A counted reference to one chunk; the last one returns it to the free list.
struct Chunk {
    pool: Arc<PoolInner>,
    index: u32,
}

impl Chunk {
    fn ptr(&self) -> *mut u8 {
        // SAFETY: index < chunk_count by construction, so this stays inside the mapping.
        unsafe {
            self.pool
                .base
                .add(self.index as usize * self.pool.chunk_size)
        }
    }

    fn refs(&self) -> &AtomicU32 {
        &self.pool.refs[self.index as usize]
    }

    fn share(&self) -> Chunk {
        self.refs().fetch_add(1, Ordering::Relaxed);
        Chunk {
            pool: Arc::clone(&self.pool),
            index: self.index,
        }
    }
}

impl Drop for Chunk {
    fn drop(&mut self) {
        if self.refs().fetch_sub(1, Ordering::Release) == 1 {
            std::sync::atomic::fence(Ordering::Acquire);
            // Cannot fail: at most chunk_count indices exist, each pushed once.
            let _ = self.pool.free.push(self.index);
        }
    }
}

/// A chunk with one owner, who may read and write it.
pub struct IoBufMut {
    chunk: Chunk,
    len: usize,
}

impl IoBufMut {
    /// The pool this chunk belongs to.
    pub fn pool_id(&self) -> u64 {
        self.chunk.pool.id
    }

    /// The chunk index, which is also its registered buffer index.
    pub fn index(&self) -> u32 {
        self.chunk.index
    }

    /// Bytes the chunk can hold.
    pub fn capacity(&self) -> usize {
        self.chunk.pool.chunk_size
    }

    /// Sets the visible length (up to the capacity); returns false if too long.
    pub fn set_len(&mut self, len: usize) -> bool {
        if len > self.capacity() {
            return false;
        }
        self.len = len;
        true
    }

    /// Raw pointer to the chunk start, for handing to the kernel.
    pub fn as_mut_ptr(&mut self) -> *mut u8 {
        self.chunk.ptr()
    }

    /// Gives up write access; the result can be cloned and sent to many legs.
    pub fn freeze(self) -> IoBuf {
        IoBuf {
            chunk: self.chunk,
            start: 0,
            len: self.len,
        }
    }
}

impl Deref for IoBufMut {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: the chunk is ours alone (refcount 1, no IoBuf exists), len <= chunk size.
        unsafe { std::slice::from_raw_parts(self.chunk.ptr(), self.len) }
    }
}

impl DerefMut for IoBufMut {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in deref; &mut self makes this the only live reference.
        unsafe { std::slice::from_raw_parts_mut(self.chunk.ptr(), self.len) }
    }
}

impl fmt::Debug for IoBufMut {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "IoBufMut(chunk {}, {} bytes)",
            self.chunk.index, self.len
        )
    }
}

/// A read-only view of part of a chunk, shared by reference count.
pub struct IoBuf {
    chunk: Chunk,
    start: usize,
    len: usize,
}

impl IoBuf {
    /// The pool this chunk belongs to.
    pub fn pool_id(&self) -> u64 {
        self.chunk.pool.id
    }

    /// The chunk index, which is also its registered buffer index.
    pub fn index(&self) -> u32 {
        self.chunk.index
    }

    /// Raw pointer to the first visible byte, for handing to the kernel.
    pub fn as_ptr(&self) -> *const u8 {
        // SAFETY: start <= chunk size, so the pointer stays in (or one past) the chunk.
        unsafe { self.chunk.ptr().add(self.start) }
    }

    /// A narrower view of the same chunk (no copy), or `None` if out of range.
    pub fn slice(&self, start: usize, len: usize) -> Option<IoBuf> {
        let end = start.checked_add(len)?;
        if end > self.len {
            return None;
        }
        Some(IoBuf {
            chunk: self.chunk.share(),
            start: self.start + start,
            len,
        })
    }

    /// Takes back write access when this is the only handle left.
    pub fn try_into_mut(self) -> Result<IoBufMut, IoBuf> {
        if self.chunk.refs().load(Ordering::Acquire) == 1 && self.start == 0 {
            Ok(IoBufMut {
                chunk: self.chunk,
                len: self.len,
            })
        } else {
            Err(self)
        }
    }
}

impl Clone for IoBuf {
    fn clone(&self) -> Self {
        IoBuf {
            chunk: self.chunk.share(),
            start: self.start,
            len: self.len,
        }
    }
}

impl Deref for IoBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: nobody holds write access while an IoBuf exists (IoBufMut is
        // unique and freeze consumed it); start + len <= chunk size.
        unsafe { std::slice::from_raw_parts(self.as_ptr(), self.len) }
    }
}

impl fmt::Debug for IoBuf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "IoBuf(chunk {}, {}..{})",
            self.chunk.index,
            self.start,
            self.start + self.len
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn small_pool(chunks: usize) -> BufferPool {
        BufferPool::new(PoolConfig {
            chunk_size: 4096,
            chunk_count: chunks,
            huge_pages: false,
        })
        .expect("pool")
    }

    #[test]
    fn rejects_bad_geometry() {
        for (size, count) in [(0, 1), (1000, 1), (4096, 0), (4096, MAX_CHUNKS + 1)] {
            let r = BufferPool::new(PoolConfig {
                chunk_size: size,
                chunk_count: count,
                huge_pages: false,
            });
            assert!(matches!(r, Err(PoolError::Geometry(_))), "{size} {count}");
        }
    }

    #[test]
    fn alloc_until_empty_then_recycle() {
        let pool = small_pool(4);
        let bufs: Vec<_> = (0..4).map(|_| pool.alloc(4096).expect("chunk")).collect();
        assert!(pool.alloc(1).is_none());
        let mut indices: Vec<_> = bufs.iter().map(|b| b.index()).collect();
        indices.sort();
        assert_eq!(indices, vec![0, 1, 2, 3]);
        drop(bufs);
        assert_eq!(pool.free_chunks(), 4);
        assert!(pool.alloc(4097).is_none(), "larger than a chunk");
    }

    #[test]
    fn frozen_clones_keep_the_chunk_until_the_last_drop() {
        let pool = small_pool(1);
        let mut b = pool.alloc(8).expect("chunk");
        b.copy_from_slice(b"abcdefgh");
        let shared = b.freeze();
        let leg2 = shared.clone();
        let tail = shared.slice(4, 4).expect("in range");
        assert_eq!(&*tail, b"efgh");
        assert!(shared.slice(6, 4).is_none());
        drop(shared);
        assert_eq!(pool.free_chunks(), 0);
        let leg2 = leg2.try_into_mut().expect_err("tail still shares it");
        drop(tail);
        let back = leg2.try_into_mut().expect("sole owner again");
        assert_eq!(&*back, b"abcdefgh");
        drop(back);
        assert_eq!(pool.free_chunks(), 1);
    }

    #[test]
    fn iovecs_cover_each_chunk_once() {
        let pool = small_pool(3);
        let v = pool.iovecs();
        assert_eq!(v.len(), 3);
        let b0 = v[0].iov_base as usize;
        for (i, iov) in v.iter().enumerate() {
            assert_eq!(iov.iov_base as usize, b0 + i * 4096);
            assert_eq!(iov.iov_len, 4096);
        }
    }
}
