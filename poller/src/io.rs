//! File I/O through the current reactor's ring: reads and writes into pool
//! buffers (as fixed buffers when the buffer belongs to this reactor's
//! registered pool), fsync and fallocate, on fixed files where the ring has
//! a free slot.

use crate::buffer::{IoBuf, IoBufMut};
use crate::op::Op;
use crate::reactor::with_core;
use io_uring::{opcode, types};
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::Arc;

/// A file opened for use on one reactor: registered in that ring's fixed
/// file table when a slot is free. Create and drop it on its reactor.
pub struct ReactorFile {
    fd: Arc<OwnedFd>,
    slot: Option<u32>,
}

impl ReactorFile {
    /// Registers `fd` with the current reactor's ring.
    ///
    /// # Panics
    /// Off a reactor thread.
    pub fn new(fd: Arc<OwnedFd>) -> Self {
        let slot = with_core(|c| c.register_file(fd.as_raw_fd()));
        ReactorFile { fd, slot }
    }

    /// Whether the ring uses a fixed-file slot for it.
    pub fn is_fixed(&self) -> bool {
        self.slot.is_some()
    }

    fn target(&self) -> Target {
        match self.slot {
            Some(s) => Target::Fixed(types::Fixed(s)),
            None => Target::Fd(types::Fd(self.fd.as_raw_fd())),
        }
    }

    /// Keeps the descriptor alive for ops that use it by number.
    fn keep_alive(&self) -> Option<Arc<OwnedFd>> {
        match self.slot {
            Some(_) => None,
            None => Some(self.fd.clone()),
        }
    }

    /// Reads `buf.len()` bytes at `offset`, retrying short reads; a read that
    /// hits end of file fails with `UnexpectedEof`.
    pub async fn read_exact_at(
        &self,
        mut buf: IoBufMut,
        offset: u64,
    ) -> (io::Result<()>, IoBufMut) {
        let total = buf.len();
        let mut done = 0usize;
        while done < total {
            let (res, b) = self.read_some(buf, done, offset + done as u64).await;
            buf = b;
            match res {
                Ok(0) => {
                    return (
                        Err(io::Error::new(
                            io::ErrorKind::UnexpectedEof,
                            "read past end of file",
                        )),
                        buf,
                    )
                }
                Ok(n) => done += n as usize,
                Err(e)
                    if e.raw_os_error() == Some(libc::EINTR)
                        || e.raw_os_error() == Some(libc::EAGAIN) => {}
                Err(e) => return (Err(e), buf),
            }
        }
        (Ok(()), buf)
    }

    async fn read_some(
        &self,
        mut buf: IoBufMut,
        start: usize,
        offset: u64,
    ) -> (io::Result<u32>, IoBufMut) {
        let len = (buf.len() - start) as u32;
        let fixed = with_core(|c| c.pool.id()) == buf.pool_id();
        // SAFETY: start < buf.len() <= chunk size, so the pointer stays in the chunk.
        let ptr = unsafe { buf.as_mut_ptr().add(start) };
        let index = buf.index() as u16;
        let entry = match (self.target(), fixed) {
            (Target::Fixed(f), true) => opcode::ReadFixed::new(f, ptr, len, index)
                .offset(offset)
                .build(),
            (Target::Fd(f), true) => opcode::ReadFixed::new(f, ptr, len, index)
                .offset(offset)
                .build(),
            (Target::Fixed(f), false) => opcode::Read::new(f, ptr, len).offset(offset).build(),
            (Target::Fd(f), false) => opcode::Read::new(f, ptr, len).offset(offset).build(),
        };
        // SAFETY: the entry points into buf's chunk, which the op owns until completion.
        let op = unsafe { Op::submit_disk(entry, (buf, self.keep_alive())) };
        let (c, (buf, _fd)) = op.await;
        (c.into_io(), buf)
    }

    /// Writes all of `buf` at `offset`, retrying short writes.
    pub async fn write_all_at(&self, buf: IoBuf, offset: u64) -> (io::Result<()>, IoBuf) {
        self.write_all_at_flags(buf, offset, 0).await
    }

    /// [`write_all_at`](Self::write_all_at) with `pwritev2` flags on every
    /// write, e.g. `libc::RWF_DSYNC` for a write that is durable when it
    /// completes (what a block device calls FUA).
    pub async fn write_all_at_flags(
        &self,
        buf: IoBuf,
        offset: u64,
        rw_flags: i32,
    ) -> (io::Result<()>, IoBuf) {
        let total = buf.len();
        let mut done = 0usize;
        let mut buf = buf;
        while done < total {
            let (res, b) = self
                .write_some(buf, done, offset + done as u64, rw_flags)
                .await;
            buf = b;
            match res {
                Ok(0) => {
                    return (
                        Err(io::Error::new(
                            io::ErrorKind::WriteZero,
                            "device took no bytes",
                        )),
                        buf,
                    )
                }
                Ok(n) => done += n as usize,
                Err(e)
                    if e.raw_os_error() == Some(libc::EINTR)
                        || e.raw_os_error() == Some(libc::EAGAIN) => {}
                Err(e) => return (Err(e), buf),
            }
        }
        (Ok(()), buf)
    }

    async fn write_some(
        &self,
        buf: IoBuf,
        start: usize,
        offset: u64,
        rw_flags: i32,
    ) -> (io::Result<u32>, IoBuf) {
        let len = (buf.len() - start) as u32;
        let fixed = with_core(|c| c.pool.id()) == buf.pool_id();
        // SAFETY: start < buf.len(), so the pointer stays inside the visible range.
        let ptr = unsafe { buf.as_ptr().add(start) };
        let index = buf.index() as u16;
        let entry = match (self.target(), fixed) {
            (Target::Fixed(f), true) => opcode::WriteFixed::new(f, ptr, len, index)
                .offset(offset)
                .rw_flags(rw_flags)
                .build(),
            (Target::Fd(f), true) => opcode::WriteFixed::new(f, ptr, len, index)
                .offset(offset)
                .rw_flags(rw_flags)
                .build(),
            (Target::Fixed(f), false) => opcode::Write::new(f, ptr, len)
                .offset(offset)
                .rw_flags(rw_flags)
                .build(),
            (Target::Fd(f), false) => opcode::Write::new(f, ptr, len)
                .offset(offset)
                .rw_flags(rw_flags)
                .build(),
        };
        // SAFETY: the entry points into buf's chunk, which the op owns until completion.
        let op = unsafe { Op::submit_disk(entry, (buf, self.keep_alive())) };
        let (c, (buf, _fd)) = op.await;
        (c.into_io(), buf)
    }

    /// fsync (or fdatasync) through the ring.
    pub async fn sync(&self, data_only: bool) -> io::Result<()> {
        let flags = if data_only {
            types::FsyncFlags::DATASYNC
        } else {
            types::FsyncFlags::empty()
        };
        let entry = match self.target() {
            Target::Fixed(f) => opcode::Fsync::new(f).flags(flags).build(),
            Target::Fd(f) => opcode::Fsync::new(f).flags(flags).build(),
        };
        // SAFETY: fsync carries no pointers.
        let op = unsafe { Op::submit_disk(entry, self.keep_alive()) };
        op.await.0.into_io().map(|_| ())
    }

    /// fallocate(2) through the ring (zero range, punch hole, ...).
    pub async fn fallocate(&self, mode: i32, offset: u64, len: u64) -> io::Result<()> {
        let entry = match self.target() {
            Target::Fixed(f) => opcode::Fallocate::new(f, len)
                .offset(offset)
                .mode(mode)
                .build(),
            Target::Fd(f) => opcode::Fallocate::new(f, len)
                .offset(offset)
                .mode(mode)
                .build(),
        };
        // SAFETY: fallocate carries no pointers.
        let op = unsafe { Op::submit_disk(entry, self.keep_alive()) };
        op.await.0.into_io().map(|_| ())
    }
}

impl Drop for ReactorFile {
    fn drop(&mut self) {
        if let Some(slot) = self.slot.take() {
            // In-flight requests hold their own reference to the file, so the
            // slot can be released now.
            let _ = crate::reactor::try_with_core(|c| c.unregister_file(slot));
        }
    }
}

enum Target {
    Fixed(types::Fixed),
    Fd(types::Fd),
}
