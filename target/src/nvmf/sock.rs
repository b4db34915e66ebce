//! Receives into a connection's staging buffer (PDU heads, and what a
//! greedy receive brings beyond them) on the current reactor's io_uring, and
//! the split receive that puts a capsule's in-capsule data straight into a
//! pool chunk in the same op.
//!
//! Listening, accepting, handing connections to reactors, pool-chunk
//! receives and vectored sends come from `mirrorpoint-transport`; its
//! public receive takes pool chunks only, and holding a whole chunk per
//! connection just for 8..256-byte PDU heads would let idle connections
//! drain the pool. So heads (and discarded data) are received here, on a
//! duplicate of the connection's descriptor (same socket, kept in blocking
//! mode by the transport so io_uring never hands back `EAGAIN`). The op owns
//! the vector and the descriptor until the kernel completes it. The split
//! receive does hold one pool chunk while it waits: the connection loop
//! uses it only on I/O queues whose last capsule carried in-capsule data,
//! so at most one chunk per such queue (an I/O queue that goes idle right
//! after a write keeps its spare chunk until the next PDU or its close).
//! The batch receive lends up to 16 chunks to one op, so it never waits:
//! it takes what has already arrived, or reports that nothing had.

use io_uring::{opcode, types};
use mirrorpoint_poller::{IoBufMut, Op, OpKind};
use mirrorpoint_transport::BatchRecv;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::Arc;

/// What a receive's completion means to the loops below: `Some(Ok(n))` for
/// `n > 0` bytes, `Some(Err(_))` for an error or the peer's close
/// (`UnexpectedEof`), `None` to submit the receive again (`EINTR`, and
/// `EAGAIN` when `retry_eagain`: a batch receive reports it as `WouldBlock`).
fn outcome(res: io::Result<u32>, retry_eagain: bool) -> Option<io::Result<usize>> {
    match res {
        Ok(0) => Some(Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "connection closed",
        ))),
        Ok(n) => Some(Ok(n as usize)),
        Err(e) if e.raw_os_error() == Some(libc::EINTR) => None,
        Err(e) if retry_eagain && e.raw_os_error() == Some(libc::EAGAIN) => None,
        Err(e) => Some(Err(e)),
    }
}

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
        if let Some(r) = outcome(c.into_io(), true) {
            return (r.map(|n| n.min(end - start)), buf);
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
        match outcome(c.into_io(), true) {
            Some(Ok(n)) => at += n,
            Some(Err(e)) => return (Err(e), buf),
            None => {}
        }
    }
    (Ok(()), buf)
}

/// The `msghdr` and iovec array of a split receive, boxed once per
/// connection so their addresses stay put while an op holds them.
pub struct SplitMsg {
    msg: libc::msghdr,
    iov: [libc::iovec; 3],
}

impl SplitMsg {
    pub fn new() -> Box<SplitMsg> {
        Box::new(SplitMsg {
            // SAFETY: msghdr is plain old data; all zeroes is a valid empty header.
            msg: unsafe { std::mem::zeroed() },
            iov: [libc::iovec {
                iov_base: std::ptr::null_mut(),
                iov_len: 0,
            }; 3],
        })
    }
}

/// One receive spread over `stage[head]`, then `chunk[body]`, then
/// `stage[tail]` (one `IORING_OP_RECVMSG`): lets a command capsule's head
/// land in the staging buffer and its in-capsule data straight in the pool
/// chunk it will be written from with one ring op, or the rest of a data
/// section land in its chunk while the next PDUs' bytes land in the staging
/// buffer. Returns the bytes that arrived (at least one; the kernel fills
/// the parts in order), or `UnexpectedEof` when the peer closed.
pub async fn recv_split(
    fd: &Arc<OwnedFd>,
    stage: Vec<u8>,
    head: std::ops::Range<usize>,
    chunk: IoBufMut,
    body: std::ops::Range<usize>,
    tail: std::ops::Range<usize>,
    msg: Box<SplitMsg>,
) -> (io::Result<usize>, Vec<u8>, IoBufMut, Box<SplitMsg>) {
    let (mut stage, mut chunk, mut msg) = (stage, chunk, msg);
    let ok = |r: &std::ops::Range<usize>| r.start <= r.end && r.end <= stage.len();
    let body_ok = body.start <= body.end && body.end <= chunk.len();
    if !ok(&head) || !ok(&tail) || head.end > tail.start || !body_ok {
        return (
            Err(io::Error::other("receive range outside the buffer")),
            stage,
            chunk,
            msg,
        );
    }
    loop {
        let base = stage.as_mut_ptr();
        // SAFETY (both adds): the ranges were checked to lie inside `stage`.
        let (h, t) = unsafe { (base.add(head.start), base.add(tail.start)) };
        // SAFETY: body was checked to lie inside the chunk.
        let b = unsafe { chunk.as_mut_ptr().add(body.start) };
        msg.iov = [
            libc::iovec {
                iov_base: h.cast(),
                iov_len: head.len(),
            },
            libc::iovec {
                iov_base: b.cast(),
                iov_len: body.len(),
            },
            libc::iovec {
                iov_base: t.cast(),
                iov_len: tail.len(),
            },
        ];
        msg.msg.msg_iov = msg.iov.as_mut_ptr();
        msg.msg.msg_iovlen = msg.iov.len() as _;
        let m: *mut libc::msghdr = &mut msg.msg;
        let entry = opcode::RecvMsg::new(types::Fd(fd.as_raw_fd()), m).build();
        // SAFETY: the msghdr and iovecs are boxed, and the iovecs point into
        // `stage`'s heap memory (disjoint ranges) and the pool chunk; all of
        // it, with the descriptor, moves into the op until the completion.
        let op = unsafe { Op::submit(entry, OpKind::LongLived, (stage, chunk, msg, fd.clone())) };
        let (c, (s, ch, m, _)) = op.await;
        (stage, chunk, msg) = (s, ch, m);
        if let Some(r) = outcome(c.into_io(), true) {
            return (r, stage, chunk, msg);
        }
    }
}

/// One receive (`IORING_OP_RECVMSG`) laid out for back-to-back command
/// capsules that each carry `body` bytes of in-capsule data: for each chunk
/// `i`, `head` bytes into `stage` at `i * (head + body)`, then `body` bytes
/// into chunk `i`; after the last chunk, `stage` up to `tail_end`. So
/// `stage[i * stride + head..(i + 1) * stride]` mirrors chunk `i`: copying
/// a chunk's bytes back there makes `stage` the contiguous stream again.
/// The layout is the transport's ([`BatchRecv::entry`], which the iSCSI
/// reader uses too); here it is laid over the staging vector and the
/// duplicated descriptor. It takes only what has already arrived
/// (`MSG_DONTWAIT`): a connection waiting for its next PDU holds no batch of
/// chunks. Returns the bytes that arrived (at least one; the kernel fills
/// the parts in order), `WouldBlock` when none had, or `UnexpectedEof` when
/// the peer closed.
pub async fn recv_batch(
    fd: &Arc<OwnedFd>,
    stage: Vec<u8>,
    head: usize,
    body: usize,
    chunks: Vec<IoBufMut>,
    tail_end: usize,
    msg: Box<BatchRecv>,
) -> (io::Result<usize>, Vec<u8>, Vec<IoBufMut>, Box<BatchRecv>) {
    let (mut stage, mut chunks, mut msg) = (stage, chunks, msg);
    loop {
        let entry = match msg.entry(
            fd.as_raw_fd(),
            &mut stage,
            head,
            body,
            &mut chunks,
            tail_end,
        ) {
            Ok(entry) => entry,
            Err(e) => return (Err(e), stage, chunks, msg),
        };
        // SAFETY: the entry points at the boxed msghdr and its iovecs, which
        // point into `stage`'s heap memory (disjoint ranges) and into the
        // pool chunks; all of it, with the descriptor, moves into the op
        // until the completion (moving a Vec leaves its heap memory put).
        let op = unsafe { Op::submit(entry, OpKind::LongLived, (stage, chunks, msg, fd.clone())) };
        let (c, (s, ch, m, _)) = op.await;
        (stage, chunks, msg) = (s, ch, m);
        if let Some(r) = outcome(c.into_io(), false) {
            return (r, stage, chunks, msg);
        }
    }
}
