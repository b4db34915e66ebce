//! Exact-length receive into a small heap buffer (a PDU head) on the
//! current reactor's io_uring.
//!
//! Listening, accepting, handing connections to reactors, pool-chunk
//! receives and vectored sends come from `mirrorpoint-transport`; its
//! public receive takes pool chunks only, and holding a whole chunk per
//! connection just for 8..256-byte PDU heads would let idle connections
//! drain the pool. So heads (and discarded data) are received here, on a
//! duplicate of the connection's descriptor (same socket, kept in blocking
//! mode by the transport so io_uring never hands back `EAGAIN`). The op owns
//! the vector and the descriptor until the kernel completes it.

use io_uring::{opcode, types};
use mirrorpoint_poller::{Op, OpKind};
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::Arc;

/// One receive into `buf[start..end]`: the bytes that arrived (at least
/// one), or `UnexpectedEof` when the peer closed.
pub async fn recv_some(
    fd: &Arc<OwnedFd>,
    mut buf: Vec<u8>,
    start: usize,
    end: usize,
) -> (io::Result<usize>, Vec<u8>) {
    loop {
        let (base, len) = (buf.as_mut_ptr(), buf.len());
        if start >= end || end > len {
            return (
                Err(io::Error::other("receive range outside the buffer")),
                buf,
            );
        }
        let want = u32::try_from(end - start).unwrap_or(u32::MAX);
        // SAFETY: start < end <= len, so the pointer stays inside the buffer.
        let ptr = unsafe { base.add(start) };
        let entry = opcode::Recv::new(types::Fd(fd.as_raw_fd()), ptr, want).build();
        // SAFETY: the entry points into `buf`'s heap memory, which the op owns
        // (with the descriptor) until the kernel completes it.
        let op = unsafe { Op::submit(entry, OpKind::LongLived, (buf, fd.clone())) };
        let (c, (b, _)) = op.await;
        buf = b;
        match c.into_io() {
            Ok(0) => {
                return (
                    Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "connection closed",
                    )),
                    buf,
                )
            }
            Ok(n) => return (Ok((n as usize).min(end - start)), buf),
            Err(e) if matches!(e.raw_os_error(), Some(libc::EINTR) | Some(libc::EAGAIN)) => {}
            Err(e) => return (Err(e), buf),
        }
    }
}

/// Receives exactly the bytes `start..end` of `buf`. End of stream before
/// that is `UnexpectedEof`.
pub async fn recv_exact(
    fd: &Arc<OwnedFd>,
    mut buf: Vec<u8>,
    start: usize,
    end: usize,
) -> (io::Result<()>, Vec<u8>) {
    let mut at = start;
    while at < end {
        let (base, len) = (buf.as_mut_ptr(), buf.len());
        if end > len {
            return (
                Err(io::Error::other("receive range outside the buffer")),
                buf,
            );
        }
        let want = u32::try_from(end - at).unwrap_or(u32::MAX);
        // SAFETY: at < end <= len, so the pointer stays inside the buffer.
        let ptr = unsafe { base.add(at) };
        let entry = opcode::Recv::new(types::Fd(fd.as_raw_fd()), ptr, want).build();
        // SAFETY: the entry points into `buf`'s heap memory, which the
        // op owns (with the descriptor) until the kernel completes it.
        let op = unsafe { Op::submit(entry, OpKind::LongLived, (buf, fd.clone())) };
        let (c, (b, _)) = op.await;
        buf = b;
        match c.into_io() {
            Ok(0) => {
                return (
                    Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "connection closed",
                    )),
                    buf,
                )
            }
            Ok(n) => at += n as usize,
            Err(e) if matches!(e.raw_os_error(), Some(libc::EINTR) | Some(libc::EAGAIN)) => {}
            Err(e) => return (Err(e), buf),
        }
    }
    (Ok(()), buf)
}
