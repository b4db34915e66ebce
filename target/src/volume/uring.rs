//! The io_uring backend: a regular file or a block device.
//!
//! Opened once with O_DIRECT where the file system allows it (falling back
//! to buffered I/O with a warning where it does not); each reactor that uses
//! the volume registers the descriptor in its ring's fixed-file table and
//! reads and writes straight from pool chunks (fixed buffers). A per-channel
//! semaphore caps the queue depth the volume sees from one core.
//!
//! A file on a memory file system (tmpfs, ramfs) is the exception: its page
//! cache is the storage, so it is mapped shared and read and written by
//! copying on the reactor (`memory_mapped` in `bdev_get_bdevs`): its
//! channels are memory channels, like the malloc backend's (see
//! `volume::memory`). Through the ring, a buffered read of a shmem file
//! cost more than the copy, and every write was handed to an io-wq worker
//! because shmem takes no non-blocking writes: a thread wake-up and a
//! context switch per write. Write zeroes and unmap of a mapped file zero
//! the range in place, so the file stays allocated and a write can never
//! meet a full tmpfs as SIGBUS.
//!
//! Write zeroes and unmap use fallocate (zero range, punch hole) through the
//! ring, which also works on block devices (the kernel turns them into
//! write-zeroes and discard); where the file system refuses, they fall back
//! to writing zero blocks so that unmapped ranges always read back as zeroes.

use super::memory::MemoryImage;
use super::{CreateError, VolumeError};
use crate::units::{ByteLen, ByteOffset};
use mirrorpoint_poller::{buffer_pool, IoBuf, IoBufMut, LocalSemaphore, ReactorFile};
use std::fs::OpenOptions;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Default per-core queue depth toward the device.
pub const DEFAULT_QUEUE_DEPTH: usize = 128;

/// An open backing file or device.
pub struct UringBackend {
    path: PathBuf,
    fd: Arc<OwnedFd>,
    direct: bool,
    block_device: bool,
    queue_depth: usize,
    /// The file mapped shared, when it is on a memory file system.
    mapped: Option<MemoryImage>,
}

/// Whether `fd` lives on a memory file system (tmpfs, ramfs), whose I/O
/// never waits for a device.
fn on_memory_fs(fd: &impl AsRawFd) -> bool {
    const TMPFS_MAGIC: i64 = 0x0102_1994;
    const RAMFS_MAGIC: i64 = 0x8584_58f6;
    // SAFETY: statfs is plain data; fstatfs fills it for a descriptor we own.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    if unsafe { libc::fstatfs(fd.as_raw_fd(), &mut st) } != 0 {
        return false;
    }
    #[allow(clippy::unnecessary_cast)] // f_type's width differs between targets
    let magic = st.f_type as i64;
    magic == TMPFS_MAGIC || magic == RAMFS_MAGIC
}

/// What opening found out.
pub struct Opened {
    /// The backend.
    pub backend: UringBackend,
    /// Size of the file or device in bytes.
    pub size: u64,
    /// The device's logical block size (512 for regular files).
    pub device_block_size: u32,
}

// From <linux/fs.h>: _IOR(0x12, 114, size_t) and _IO(0x12, 104).
const BLKGETSIZE64: libc::c_ulong = 0x8008_1272;
const BLKSSZGET: libc::c_ulong = 0x1268;

impl UringBackend {
    /// Opens `path` read-write. With `create_size`, a missing regular file is
    /// created and a shorter one extended to that size (sparse).
    pub fn open(
        path: &Path,
        create_size: Option<u64>,
        queue_depth: usize,
    ) -> Result<Opened, CreateError> {
        if queue_depth == 0 || queue_depth > 4096 {
            return Err(CreateError::Invalid(format!(
                "queue_depth {queue_depth} must be between 1 and 4096"
            )));
        }
        let io_err = |what: &str, source| CreateError::Io {
            what: format!("{what} {}", path.display()),
            source,
        };
        if let Some(size) = create_size {
            let f = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(path)
                .map_err(|e| io_err("cannot create", e))?;
            let meta = f.metadata().map_err(|e| io_err("cannot stat", e))?;
            if meta.file_type().is_file() && meta.len() < size {
                f.set_len(size).map_err(|e| io_err("cannot size", e))?;
            }
        }
        let (file, direct) = match OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_DIRECT)
            .open(path)
        {
            Ok(f) => (f, true),
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                let f = OpenOptions::new()
                    .read(true)
                    .write(true)
                    .open(path)
                    .map_err(|e| io_err("cannot open", e))?;
                if !on_memory_fs(&f) {
                    tracing::warn!(
                        path = %path.display(),
                        "the file system does not support O_DIRECT; using buffered I/O (flushes still reach the disk)"
                    );
                }
                (f, false)
            }
            Err(e) => return Err(io_err("cannot open", e)),
        };
        let meta = file.metadata().map_err(|e| io_err("cannot stat", e))?;
        let block_device = meta.file_type().is_block_device();
        let (size, device_block_size) = if block_device {
            let mut size: u64 = 0;
            let mut lbs: libc::c_int = 0;
            // SAFETY: BLKGETSIZE64 writes one u64 into `size`; BLKSSZGET one int.
            let r1 = unsafe { libc::ioctl(file.as_raw_fd(), BLKGETSIZE64, &mut size) };
            // SAFETY: as above.
            let r2 = unsafe { libc::ioctl(file.as_raw_fd(), BLKSSZGET, &mut lbs) };
            if r1 != 0 || r2 != 0 {
                return Err(io_err(
                    "cannot read the geometry of",
                    std::io::Error::last_os_error(),
                ));
            }
            (size, lbs.max(512) as u32)
        } else if meta.file_type().is_file() {
            (meta.len(), 512)
        } else {
            return Err(CreateError::Invalid(format!(
                "{} is neither a regular file nor a block device",
                path.display()
            )));
        };
        let mapped = if !block_device && size > 0 && on_memory_fs(&file) {
            Some(
                MemoryImage::map_file(&file, size)
                    .map_err(|e| io_err("cannot allocate and map (memory file system)", e))?,
            )
        } else {
            None
        };
        Ok(Opened {
            backend: UringBackend {
                path: path.to_path_buf(),
                fd: Arc::new(OwnedFd::from(file)),
                direct,
                block_device,
                queue_depth,
                mapped,
            },
            size,
            device_block_size,
        })
    }

    /// The path it was opened from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Per-core queue depth.
    pub fn queue_depth(&self) -> usize {
        self.queue_depth
    }

    /// Whether O_DIRECT is in use.
    pub fn is_direct(&self) -> bool {
        self.direct
    }

    /// The file mapped shared, when it is on a memory file system: its
    /// channels then copy in and out of it instead of using the ring.
    pub fn memory_image(&self) -> Option<&MemoryImage> {
        self.mapped.as_ref()
    }

    pub(crate) fn describe(&self) -> serde_json::Value {
        serde_json::json!({
            "uring": {
                "filename": self.path.display().to_string(),
                "o_direct": self.direct,
                "block_device": self.block_device,
                "queue_depth": self.queue_depth,
                "memory_mapped": self.mapped.is_some(),
            }
        })
    }

    pub(crate) fn channel(&self) -> UringChannel {
        UringChannel {
            file: ReactorFile::new(self.fd.clone()),
            depth: LocalSemaphore::new(self.queue_depth),
        }
    }

    pub(crate) fn sync_blocking(&self) -> std::io::Result<()> {
        // SAFETY: fsync on a descriptor we own.
        if unsafe { libc::fsync(self.fd.as_raw_fd()) } == 0 {
            Ok(())
        } else {
            Err(std::io::Error::last_os_error())
        }
    }
}

/// One reactor's view of a uring volume.
pub(crate) struct UringChannel {
    file: ReactorFile,
    depth: LocalSemaphore,
}

impl UringChannel {
    pub(crate) async fn read(
        &self,
        offset: ByteOffset,
        buf: IoBufMut,
    ) -> (Result<(), VolumeError>, IoBufMut) {
        let _permit = self.depth.acquire().await;
        let (r, buf) = self.file.read_exact_at(buf, offset.0).await;
        (r.map_err(VolumeError::Io), buf)
    }

    pub(crate) async fn write(
        &self,
        offset: ByteOffset,
        buf: IoBuf,
    ) -> (Result<(), VolumeError>, IoBuf) {
        let _permit = self.depth.acquire().await;
        let (r, buf) = self.file.write_all_at(buf, offset.0).await;
        (r.map_err(VolumeError::Io), buf)
    }

    /// A write that is durable when it completes (FUA): `RWF_DSYNC`, so the
    /// kernel makes this write stable (a FUA write on a device that has
    /// one, else the write then a cache flush) without flushing every
    /// other write as `flush` does.
    pub(crate) async fn write_fua(
        &self,
        offset: ByteOffset,
        buf: IoBuf,
    ) -> (Result<(), VolumeError>, IoBuf) {
        let _permit = self.depth.acquire().await;
        let (r, buf) = self
            .file
            .write_all_at_flags(buf, offset.0, libc::RWF_DSYNC)
            .await;
        (r.map_err(VolumeError::Io), buf)
    }

    pub(crate) async fn flush(&self) -> Result<(), VolumeError> {
        let _permit = self.depth.acquire().await;
        self.file.sync(true).await.map_err(VolumeError::Io)
    }

    pub(crate) async fn write_zeroes(
        &self,
        offset: ByteOffset,
        len: ByteLen,
    ) -> Result<(), VolumeError> {
        let mode = libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE;
        self.fallocate_or_zero(mode, offset, len).await
    }

    pub(crate) async fn unmap(&self, offset: ByteOffset, len: ByteLen) -> Result<(), VolumeError> {
        let mode = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
        self.fallocate_or_zero(mode, offset, len).await
    }

    async fn fallocate_or_zero(
        &self,
        mode: i32,
        offset: ByteOffset,
        len: ByteLen,
    ) -> Result<(), VolumeError> {
        let result = {
            let _permit = self.depth.acquire().await;
            self.file.fallocate(mode, offset.0, len.0).await
        };
        match result {
            Ok(()) => Ok(()),
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::EOPNOTSUPP) | Some(libc::EINVAL) | Some(libc::ENODEV)
                ) =>
            {
                self.write_zero_blocks(offset, len).await
            }
            Err(e) => Err(VolumeError::Io(e)),
        }
    }

    async fn write_zero_blocks(&self, offset: ByteOffset, len: ByteLen) -> Result<(), VolumeError> {
        let pool = buffer_pool();
        let chunk = pool.chunk_size() as u64;
        let mut zeroes = pool.alloc(chunk as usize).ok_or(VolumeError::NoBuffer)?;
        zeroes.fill(0);
        let zeroes = zeroes.freeze();
        let mut done = 0u64;
        while done < len.0 {
            let n = (len.0 - done).min(chunk);
            let piece = zeroes.slice(0, n as usize).ok_or(VolumeError::NoBuffer)?;
            let (r, _) = self.write(ByteOffset(offset.0 + done), piece).await;
            r?;
            done += n;
        }
        Ok(())
    }
}
