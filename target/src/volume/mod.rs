//! Volumes: the one block API every front end and the mirror engine use.
//!
//! Shaped like SPDK's bdev/io_channel split. A [`Volume`] is the shared,
//! thread-safe description of a block device (name, geometry, backend). To do
//! I/O, a task opens a [`VolumeChannel`] on its reactor: the channel holds
//! what is per-core (the file registered in that ring's fixed-file table, the
//! queue-depth limit), so the data path takes no lock and crosses no core.
//!
//! All offsets and lengths are bytes, checked against the block size and the
//! volume size before anything reaches a backend: zero-length, misaligned and
//! out-of-range requests fail with a clear [`VolumeError`], never a panic.
//! Buffers are pool chunks passed by value (the op owns them while the kernel
//! does), so the largest single I/O is one chunk.

pub mod error;
pub mod memory;
pub mod registry;
pub mod uring;

use crate::units::{BlockSize, ByteLen, ByteOffset};
use mirrorpoint_poller::{IoBuf, IoBufMut};
use serde::Serialize;
use std::io;
use std::sync::Arc;

pub use registry::{VolumeRegistry, VolumeSpec};

/// Why a volume request failed.
#[derive(Debug, thiserror::Error)]
pub enum VolumeError {
    /// A request for zero bytes.
    #[error("zero-length I/O at offset {offset}")]
    ZeroLength {
        /// Where it was aimed.
        offset: u64,
    },
    /// Offset or length not a multiple of the block size.
    #[error(
        "I/O at offset {offset}, length {len} is not aligned to the {block_size}-byte block size"
    )]
    Misaligned {
        /// Byte offset asked for.
        offset: u64,
        /// Byte length asked for.
        len: u64,
        /// The volume's block size.
        block_size: u32,
    },
    /// The request reaches past the end of the volume.
    #[error("I/O at offset {offset}, length {len} goes past the end of the volume ({size} bytes)")]
    OutOfRange {
        /// Byte offset asked for.
        offset: u64,
        /// Byte length asked for.
        len: u64,
        /// Volume size in bytes.
        size: u64,
    },
    /// No pool buffer was free for an internal transfer.
    #[error("no I/O buffer available")]
    NoBuffer,
    /// The backend failed.
    #[error("backend I/O error: {0}")]
    Io(#[from] io::Error),
}

impl VolumeError {
    /// The errno closest to this error (for RPC answers and front ends).
    pub fn errno(&self) -> i32 {
        match self {
            VolumeError::ZeroLength { .. } | VolumeError::Misaligned { .. } => libc::EINVAL,
            VolumeError::OutOfRange { .. } => libc::ERANGE,
            VolumeError::NoBuffer => libc::ENOMEM,
            VolumeError::Io(e) => e.raw_os_error().unwrap_or(libc::EIO),
        }
    }
}

/// Errors creating a volume.
#[derive(Debug, thiserror::Error)]
pub enum CreateError {
    /// A parameter is out of range.
    #[error("{0}")]
    Invalid(String),
    /// A volume of that name exists.
    #[error("a volume named '{0}' already exists")]
    Exists(String),
    /// The volume is held as storage by something else.
    #[error("volume '{name}' is claimed by {by}")]
    Claimed {
        /// The volume.
        name: String,
        /// Its owner, e.g. "mirror m1".
        by: String,
    },
    /// No volume of that name.
    #[error("no volume named '{0}'")]
    NotFound(String),
    /// Opening or sizing the backing store failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The OS error.
        source: io::Error,
    },
}

/// The backing store of a volume.
pub enum Backend {
    /// A file or block device driven through io_uring.
    Uring(uring::UringBackend),
    /// RAM.
    Malloc(memory::MemoryImage),
    /// A fault-injecting wrapper of another volume (`bdev_error_create`).
    Error(error::ErrorBackend),
    /// A mirrored volume: a local volume plus remote legs.
    Mirror(Arc<crate::mirror::engine::Mirror>),
    /// A split mirror leg's frozen data (read-only, or a writable clone).
    SplitImage(Arc<crate::mirror::split::ops::SplitImage>),
}

/// A block device, shared by every core.
pub struct Volume {
    name: String,
    uuid: String,
    block_size: BlockSize,
    num_blocks: u64,
    backend: Backend,
}

/// Facts about a volume as `bdev_get_bdevs` reports them (SPDK field names).
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct VolumeInfo {
    /// Volume name.
    pub name: String,
    /// "Uring disk" or "Malloc disk", as SPDK names them.
    pub product_name: String,
    /// Logical block size in bytes.
    pub block_size: u32,
    /// Size in blocks.
    pub num_blocks: u64,
    /// Stable identity.
    pub uuid: String,
    /// Backend-specific facts.
    pub driver_specific: serde_json::Value,
    /// Held as storage by a mirror or a storage server (SPDK's field).
    pub claimed: bool,
    /// By what, when claimed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub claimed_by: Option<String>,
}

impl Volume {
    pub(crate) fn new(
        name: String,
        uuid: String,
        block_size: BlockSize,
        num_blocks: u64,
        backend: Backend,
    ) -> Self {
        Volume {
            name,
            uuid,
            block_size,
            num_blocks,
            backend,
        }
    }

    /// The name hosts and RPCs use.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// A UUID string, stable across restarts when given in the config.
    pub fn uuid(&self) -> &str {
        &self.uuid
    }

    /// Logical block size.
    pub fn block_size(&self) -> BlockSize {
        self.block_size
    }

    /// Size in blocks.
    pub fn num_blocks(&self) -> u64 {
        self.num_blocks
    }

    /// Size in bytes.
    pub fn size(&self) -> ByteLen {
        ByteLen(self.num_blocks * u64::from(self.block_size.bytes()))
    }

    /// Whether reads and writes are copies done inside the call (RAM; a
    /// file on a memory file system, mapped): they suspend only once per 16
    /// copies, when the channel yields to its reactor.
    pub fn completes_inline(&self) -> bool {
        match &self.backend {
            Backend::Malloc(_) => true,
            Backend::Uring(u) => u.memory_image().is_some(),
            _ => false,
        }
    }

    /// What `bdev_get_bdevs` shows.
    pub fn info(&self) -> VolumeInfo {
        let (product, driver) = match &self.backend {
            Backend::Uring(u) => ("Uring disk", u.describe()),
            Backend::Malloc(_) => ("Malloc disk", serde_json::json!({})),
            Backend::Error(e) => ("Error disk", e.describe()),
            Backend::Mirror(m) => (
                "Mirror disk",
                serde_json::json!({"mirror": {"local": m.local().name(), "mirror_id": m.id().0}}),
            ),
            Backend::SplitImage(i) => ("Split mirror image", i.describe()),
        };
        VolumeInfo {
            name: self.name.clone(),
            product_name: product.to_string(),
            block_size: self.block_size.bytes(),
            num_blocks: self.num_blocks,
            uuid: self.uuid.clone(),
            driver_specific: driver,
            claimed: false,
            claimed_by: None,
        }
    }

    /// Opens a channel for the calling reactor.
    ///
    /// # Panics
    /// Off a reactor thread (channels are per-core by design).
    pub fn channel(self: &Arc<Self>) -> VolumeChannel {
        let inner = match &self.backend {
            Backend::Uring(u) => match u.memory_image() {
                Some(m) => ChannelInner::Memory(m.clone(), memory::YieldEvery::default()),
                None => ChannelInner::Uring(u.channel()),
            },
            Backend::Malloc(m) => ChannelInner::Memory(m.clone(), memory::YieldEvery::default()),
            Backend::Error(e) => ChannelInner::Error(Box::new(e.channel())),
            Backend::Mirror(m) => {
                ChannelInner::Mirror(Box::new(crate::mirror::engine::MirrorChannel::new(m)))
            }
            Backend::SplitImage(i) => ChannelInner::SplitImage(Box::new(i.channel())),
        };
        VolumeChannel {
            volume: self.clone(),
            inner,
        }
    }

    /// Makes everything written so far durable (used at shutdown, off the data path).
    pub fn sync_blocking(&self) -> io::Result<()> {
        match &self.backend {
            Backend::Uring(u) => u.sync_blocking(),
            Backend::Malloc(_) => Ok(()),
            Backend::Error(e) => e.base().sync_blocking(),
            Backend::Mirror(m) => m.local().sync_blocking(),
            Backend::SplitImage(_) => Ok(()),
        }
    }

    /// The split image, if this is one.
    pub fn split_image(&self) -> Option<&Arc<crate::mirror::split::ops::SplitImage>> {
        match &self.backend {
            Backend::SplitImage(i) => Some(i),
            _ => None,
        }
    }

    /// The mirror engine, if this is a mirrored volume.
    pub fn mirror(&self) -> Option<&Arc<crate::mirror::engine::Mirror>> {
        match &self.backend {
            Backend::Mirror(m) => Some(m),
            _ => None,
        }
    }

    /// The armed errors, if this is an error volume (`bdev_error_create`).
    pub fn error_injection(&self) -> Option<&Arc<error::Injection>> {
        match &self.backend {
            Backend::Error(e) => Some(e.injection()),
            _ => None,
        }
    }

    /// The volume an error volume wraps.
    pub fn error_base(&self) -> Option<&Arc<Volume>> {
        match &self.backend {
            Backend::Error(e) => Some(e.base()),
            _ => None,
        }
    }

    /// Checks a request against the geometry.
    pub fn check_range(&self, offset: ByteOffset, len: u64) -> Result<(), VolumeError> {
        let bs = u64::from(self.block_size.bytes());
        if len == 0 {
            return Err(VolumeError::ZeroLength { offset: offset.0 });
        }
        if offset.0 % bs != 0 || len % bs != 0 {
            return Err(VolumeError::Misaligned {
                offset: offset.0,
                len,
                block_size: self.block_size.bytes(),
            });
        }
        let size = self.size().0;
        match offset.0.checked_add(len) {
            Some(end) if end <= size => Ok(()),
            _ => Err(VolumeError::OutOfRange {
                offset: offset.0,
                len,
                size,
            }),
        }
    }
}

enum ChannelInner {
    Uring(uring::UringChannel),
    /// RAM, or a file on a memory file system mapped shared: copies here,
    /// with a yield now and then.
    Memory(memory::MemoryImage, memory::YieldEvery),
    Error(Box<error::ErrorChannel>),
    Mirror(Box<crate::mirror::engine::MirrorChannel>),
    SplitImage(Box<crate::mirror::split::ops::SplitImageChannel>),
}

/// A volume opened on one reactor; all I/O goes through it.
pub struct VolumeChannel {
    volume: Arc<Volume>,
    inner: ChannelInner,
}

impl VolumeChannel {
    /// The volume this channel reaches.
    pub fn volume(&self) -> &Arc<Volume> {
        &self.volume
    }

    /// Reads `buf.len()` bytes at `offset` into `buf`.
    pub async fn read(
        &self,
        offset: ByteOffset,
        buf: IoBufMut,
    ) -> (Result<(), VolumeError>, IoBufMut) {
        if let Err(e) = self.volume.check_range(offset, buf.len() as u64) {
            return (Err(e), buf);
        }
        match &self.inner {
            ChannelInner::Uring(c) => c.read(offset, buf).await,
            ChannelInner::Memory(m, pace) => {
                let out = m.read(offset, buf);
                pace.copied().await;
                out
            }
            ChannelInner::Error(e) => e.read(offset, buf).await,
            ChannelInner::Mirror(m) => Box::pin(m.read(offset, buf)).await,
            ChannelInner::SplitImage(i) => Box::pin(i.read(offset, buf)).await,
        }
    }

    /// Writes all of `buf` at `offset`.
    pub async fn write(&self, offset: ByteOffset, buf: IoBuf) -> (Result<(), VolumeError>, IoBuf) {
        if let Err(e) = self.volume.check_range(offset, buf.len() as u64) {
            return (Err(e), buf);
        }
        match &self.inner {
            ChannelInner::Uring(c) => c.write(offset, buf).await,
            ChannelInner::Memory(m, pace) => {
                let out = m.write(offset, buf);
                pace.copied().await;
                out
            }
            ChannelInner::Error(e) => e.write(offset, buf).await,
            ChannelInner::Mirror(m) => Box::pin(m.write(offset, buf)).await,
            ChannelInner::SplitImage(i) => Box::pin(i.write(offset, buf)).await,
        }
    }

    /// Writes all of `buf` at `offset` and makes it durable before
    /// completing (an NVMe or SCSI FUA write). Unlike `write` + `flush`,
    /// other writes are not made durable by it.
    pub async fn write_fua(
        &self,
        offset: ByteOffset,
        buf: IoBuf,
    ) -> (Result<(), VolumeError>, IoBuf) {
        if let Err(e) = self.volume.check_range(offset, buf.len() as u64) {
            return (Err(e), buf);
        }
        match &self.inner {
            ChannelInner::Uring(c) => c.write_fua(offset, buf).await,
            // Memory has no volatile cache to bypass (a memory file
            // system's page cache is its storage).
            ChannelInner::Memory(..) => self.write(offset, buf).await,
            ChannelInner::Error(e) => e.write_fua(offset, buf).await,
            ChannelInner::Mirror(m) => Box::pin(m.write_fua(offset, buf)).await,
            ChannelInner::SplitImage(i) => {
                let (r, buf) = Box::pin(i.write(offset, buf)).await;
                if r.is_err() {
                    return (r, buf);
                }
                (Box::pin(i.flush()).await, buf)
            }
        }
    }

    /// Makes every completed write durable.
    pub async fn flush(&self) -> Result<(), VolumeError> {
        match &self.inner {
            ChannelInner::Uring(c) => c.flush().await,
            ChannelInner::Memory(..) => Ok(()),
            ChannelInner::Error(e) => e.flush().await,
            ChannelInner::Mirror(m) => Box::pin(m.flush()).await,
            ChannelInner::SplitImage(i) => Box::pin(i.flush()).await,
        }
    }

    /// Mirrored volumes: zeroes go through the mirror write path, so every
    /// leg gets them in order with other writes.
    async fn mirror_zero(&self, offset: ByteOffset, len: ByteLen) -> Result<(), VolumeError> {
        let pool = mirrorpoint_poller::buffer_pool();
        let chunk = pool.chunk_size() as u64;
        let mut off = offset.0;
        let end = offset.0 + len.0;
        while off < end {
            let n = chunk.min(end - off);
            let mut b = pool.alloc(n as usize).ok_or(VolumeError::NoBuffer)?;
            b.fill(0);
            let (r, _) = Box::pin(self.write(ByteOffset(off), b.freeze())).await;
            r?;
            off += n;
        }
        Ok(())
    }

    /// Writes zeroes over a range (may use the backend's zero-range support).
    pub async fn write_zeroes(&self, offset: ByteOffset, len: ByteLen) -> Result<(), VolumeError> {
        self.volume.check_range(offset, len.0)?;
        match &self.inner {
            ChannelInner::Uring(c) => c.write_zeroes(offset, len).await,
            ChannelInner::Memory(m, _) => {
                m.zero_in_steps(offset, len).await;
                Ok(())
            }
            ChannelInner::Error(e) => e.write_zeroes(offset, len).await,
            ChannelInner::Mirror(_) | ChannelInner::SplitImage(_) => {
                self.mirror_zero(offset, len).await
            }
        }
    }

    /// Releases a range; it reads back as zeroes afterwards.
    pub async fn unmap(&self, offset: ByteOffset, len: ByteLen) -> Result<(), VolumeError> {
        self.volume.check_range(offset, len.0)?;
        match &self.inner {
            ChannelInner::Uring(c) => c.unmap(offset, len).await,
            ChannelInner::Memory(m, _) => {
                m.zero_in_steps(offset, len).await;
                Ok(())
            }
            ChannelInner::Error(e) => e.unmap(offset, len).await,
            ChannelInner::Mirror(_) | ChannelInner::SplitImage(_) => {
                self.mirror_zero(offset, len).await
            }
        }
    }
}

/// A random RFC 4122 version-4 UUID string.
pub fn random_uuid() -> String {
    let mut b = [0u8; 16];
    // SAFETY: getrandom writes at most b.len() bytes into b.
    let n = unsafe { libc::getrandom(b.as_mut_ptr().cast(), b.len(), 0) };
    if n != b.len() as isize {
        // getrandom cannot fail for 16 bytes once the pool is initialised;
        // fall back to time and pid rather than refusing to create a volume.
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        b[..16].copy_from_slice(&(t ^ u128::from(std::process::id())).to_le_bytes());
    }
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h: Vec<String> = b.iter().map(|x| format!("{x:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        h[0..4].concat(),
        h[4..6].concat(),
        h[6..8].concat(),
        h[8..10].concat(),
        h[10..16].concat()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vol() -> Volume {
        Volume::new(
            "v".into(),
            random_uuid(),
            BlockSize::B512,
            8,
            Backend::Malloc(memory::MemoryImage::new(4096).expect("ram")),
        )
    }

    #[test]
    fn range_checks() {
        let v = vol();
        assert!(v.check_range(ByteOffset(0), 4096).is_ok());
        assert!(v.check_range(ByteOffset(3584), 512).is_ok());
        assert!(matches!(
            v.check_range(ByteOffset(0), 0),
            Err(VolumeError::ZeroLength { .. })
        ));
        assert!(matches!(
            v.check_range(ByteOffset(100), 512),
            Err(VolumeError::Misaligned { .. })
        ));
        assert!(matches!(
            v.check_range(ByteOffset(0), 100),
            Err(VolumeError::Misaligned { .. })
        ));
        assert!(matches!(
            v.check_range(ByteOffset(3584), 1024),
            Err(VolumeError::OutOfRange { .. })
        ));
        assert!(matches!(
            v.check_range(ByteOffset(u64::MAX - 511), 512),
            Err(VolumeError::OutOfRange { .. })
        ));
    }

    #[test]
    fn uuids_are_v4_and_distinct() {
        let a = random_uuid();
        let b = random_uuid();
        assert_ne!(a, b);
        assert_eq!(a.len(), 36);
        assert_eq!(&a[14..15], "4");
    }
}
