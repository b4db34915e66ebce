//! A connected TCP socket whose I/O goes through the current reactor's ring.
//!
//! Shape, and why:
//! - Every operation is an [`Op`] that owns what the kernel touches (the
//!   pool buffer, the boxed `msghdr` and iovec array, a reference to the
//!   socket itself) until the completion arrives, so dropping a future early
//!   never frees memory or a descriptor the kernel still uses.
//! - Receives land directly in a pool chunk at a caller-chosen offset, so a
//!   payload is written to memory once and can then be frozen and handed to
//!   the disk and to every mirror leg without copying.
//!   [`TcpStream::recv_split`] receives the rest of such a payload and what
//!   follows it (the next message's header) into a second, staging chunk in
//!   one `IORING_OP_RECVMSG`, so a stream of messages with payloads costs
//!   one receive per message.
//! - Vectored sends put a small copied header and any number of shared pool
//!   chunks in one `IORING_OP_SENDMSG`; partial sends resume at the exact
//!   iovec and offset where the kernel stopped. [`TcpStream::send_list`]
//!   does the same for a reusable [`crate::SendList`] of many byte parts and
//!   chunks (a front end's batch of PDUs), allocating nothing once warm.
//! - The socket stays in blocking mode: io_uring never blocks on it (it
//!   tries without waiting and then arms an internal poll), while an
//!   `O_NONBLOCK` socket would make some kernels hand `EAGAIN` back to us.
//! - Receives, connects and sends are [`OpKind::LongLived`]: a peer may stay
//!   silent forever, or never read, and runtime teardown must not wait for
//!   it; teardown cancels them.
//! - Close on drop is a plain `close(2)`: without `SO_LINGER` it never blocks
//!   (the kernel finishes the FIN exchange in the background), and it needs
//!   no async drop. If an abandoned op still holds the socket, drop first
//!   calls `shutdown(2)` so that op completes and releases it.
//! - A stream is `!Send` (it is used by tasks of one reactor). To move a
//!   connection to another core, turn it into a `std::net::TcpStream`
//!   ([`TcpStream::into_std`]), send that, and wrap it again there
//!   ([`TcpStream::from_std`]); see [`crate::hand_off`].
//!
//! One task at a time should send on a stream (and one receive): two
//! concurrent senders could interleave partial sends. [`crate::TcpLink`]
//! serialises for you.

use io_uring::{opcode, types};
use mirrorpoint_poller::{IoBuf, IoBufMut, Op, OpKind};
use std::fmt;
use std::io;
use std::mem::ManuallyDrop;
use std::net::{Shutdown, SocketAddr, TcpStream as StdTcpStream};
use std::ops::Range;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::rc::Rc;

use crate::send_list::SendList;
use crate::sockaddr::RawAddr;

/// Most iovecs one `sendmsg` takes (`UIO_MAXIOV` on Linux).
const IOV_MAX: usize = 1024;

/// A TCP connection driven by the current reactor's io_uring.
pub struct TcpStream {
    /// Cloned into every op's resources so the descriptor outlives the op.
    sock: Rc<StdTcpStream>,
}

impl fmt::Debug for TcpStream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TcpStream")
            .field("fd", &self.sock.as_raw_fd())
            .field("local", &self.sock.local_addr().ok())
            .field("peer", &self.sock.peer_addr().ok())
            .finish()
    }
}

/// Errors worth simply retrying the same operation for.
pub(crate) fn is_retryable(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EINTR) | Some(libc::EAGAIN))
}

fn check_range(range: &Range<usize>, len: usize) -> io::Result<()> {
    if range.start > range.end || range.end > len {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "range {}..{} outside a {len}-byte buffer",
                range.start, range.end
            ),
        ));
    }
    Ok(())
}

/// Memory a receive may write through a raw pointer.
///
/// # Safety
/// `target_ptr` must point to `target_len` writable bytes that do not move
/// when the value moves (heap or pool memory) and stay valid while it lives.
pub(crate) unsafe trait RecvTarget: Unpin + 'static {
    fn target_len(&self) -> usize;
    fn target_ptr(&mut self) -> *mut u8;
}

// SAFETY: a pool chunk never moves; the unique IoBufMut may write its visible bytes.
unsafe impl RecvTarget for IoBufMut {
    fn target_len(&self) -> usize {
        self.len()
    }
    fn target_ptr(&mut self) -> *mut u8 {
        self.as_mut_ptr()
    }
}

// SAFETY: a Vec's heap buffer does not move when the Vec moves.
unsafe impl RecvTarget for Vec<u8> {
    fn target_len(&self) -> usize {
        self.len()
    }
    fn target_ptr(&mut self) -> *mut u8 {
        self.as_mut_ptr()
    }
}

impl TcpStream {
    /// Connects to `addr` with `IORING_OP_CONNECT`; `TCP_NODELAY` is set.
    ///
    /// # Panics
    /// Off a reactor thread (as every op).
    pub async fn connect(addr: SocketAddr) -> io::Result<TcpStream> {
        let domain = match addr {
            SocketAddr::V4(_) => libc::AF_INET,
            SocketAddr::V6(_) => libc::AF_INET6,
        };
        // SAFETY: no pointers; the result is checked.
        let fd = unsafe {
            libc::socket(
                domain,
                libc::SOCK_STREAM | libc::SOCK_CLOEXEC,
                libc::IPPROTO_TCP,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fd is a fresh descriptor nobody else owns.
        let sock = Rc::new(StdTcpStream::from(unsafe { OwnedFd::from_raw_fd(fd) }));
        sock.set_nodelay(true)?;
        let raw = RawAddr::from_std(&addr);
        let entry =
            opcode::Connect::new(types::Fd(sock.as_raw_fd()), raw.as_ptr(), raw.len).build();
        // SAFETY: the address is boxed and owned by the op; the socket is kept
        // alive by the Rc in the resources.
        let op = unsafe { Op::submit(entry, OpKind::LongLived, (raw, sock.clone())) };
        let (c, _resources) = op.await;
        c.into_io()?;
        Ok(TcpStream { sock })
    }

    /// Wraps a connected std socket (e.g. one handed over from another
    /// core): switches it to blocking mode (see the module notes) and sets
    /// `TCP_NODELAY`.
    pub fn from_std(sock: StdTcpStream) -> io::Result<TcpStream> {
        sock.set_nonblocking(false)?;
        sock.set_nodelay(true)?;
        Ok(TcpStream {
            sock: Rc::new(sock),
        })
    }

    /// Wraps an accepted socket; a failing `TCP_NODELAY` (peer already gone)
    /// is left for the first I/O to report.
    pub(crate) fn from_accepted(fd: OwnedFd) -> TcpStream {
        let sock = StdTcpStream::from(fd);
        if let Err(e) = sock.set_nodelay(true) {
            tracing::debug!("TCP_NODELAY on accepted socket: {e}");
        }
        TcpStream {
            sock: Rc::new(sock),
        }
    }

    /// Gives the socket back as a std stream, to move it to another thread.
    /// Fails (returning the stream) while an abandoned op on this reactor
    /// still holds it.
    pub fn into_std(self) -> Result<StdTcpStream, TcpStream> {
        if Rc::strong_count(&self.sock) != 1 {
            return Err(self);
        }
        let this = ManuallyDrop::new(self);
        // SAFETY: `this` is never used or dropped again, so the Rc is moved out once.
        let rc = unsafe { std::ptr::read(&this.sock) };
        Rc::try_unwrap(rc).map_err(|sock| TcpStream { sock })
    }

    /// The remote address.
    pub fn peer_addr(&self) -> io::Result<SocketAddr> {
        self.sock.peer_addr()
    }

    /// The local address.
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.sock.local_addr()
    }

    /// Sets `TCP_NODELAY` (on by default).
    pub fn set_nodelay(&self, on: bool) -> io::Result<()> {
        self.sock.set_nodelay(on)
    }

    /// Whether `TCP_NODELAY` is set.
    pub fn nodelay(&self) -> io::Result<bool> {
        self.sock.nodelay()
    }

    /// One receive into `buf[range]` (`range` within `buf.len()`): the
    /// number of bytes that arrived, 0 when the peer closed its side (or the
    /// range is empty).
    pub async fn recv(&self, buf: IoBufMut, range: Range<usize>) -> (io::Result<usize>, IoBufMut) {
        self.recv_raw(buf, range).await
    }

    /// Receives until `buf[range]` is full. End of stream before that is
    /// `UnexpectedEof`, whether or not some bytes had arrived (as std's
    /// `read_exact`); use [`TcpStream::recv`] where a clean close between
    /// frames must be told apart.
    pub async fn recv_exact(
        &self,
        buf: IoBufMut,
        range: Range<usize>,
    ) -> (io::Result<()>, IoBufMut) {
        self.recv_exact_raw(buf, range).await
    }

    /// Receives into `buf[range]` until at least `min` bytes have arrived
    /// (`min` is clamped to the range's length), taking in the same receives
    /// whatever else the socket has, up to the range's end; returns how many
    /// arrived. End of stream before `min` is `UnexpectedEof`. Lets a reader
    /// of small framed messages take many with one receive.
    pub async fn recv_at_least(
        &self,
        buf: IoBufMut,
        range: Range<usize>,
        min: usize,
    ) -> (io::Result<usize>, IoBufMut) {
        self.recv_at_least_raw(buf, range, min).await
    }

    /// One receive (`IORING_OP_RECVMSG`) spread over `body[body_range]`
    /// and then `tail[tail_range]`: the kernel fills the body first. Lets a
    /// caller receive the rest of a message's payload straight into the
    /// chunk it will be used from and, in the same op, whatever follows it
    /// (the next message's header) into a staging chunk. Returns the bytes
    /// that arrived in all (those past `body_range.len()` are in the tail),
    /// 0 when the peer closed its side (or both ranges are empty). `split`
    /// holds the `msghdr` and iovecs; keep one per stream and pass it each
    /// time, so the op allocates nothing.
    pub async fn recv_split(
        &self,
        body: IoBufMut,
        body_range: Range<usize>,
        tail: IoBufMut,
        tail_range: Range<usize>,
        split: Box<SplitRecv>,
    ) -> (io::Result<usize>, IoBufMut, IoBufMut, Box<SplitRecv>) {
        let (mut body, mut tail, mut split) = (body, tail, split);
        if let Err(e) =
            check_range(&body_range, body.len()).and_then(|()| check_range(&tail_range, tail.len()))
        {
            return (Err(e), body, tail, split);
        }
        if body_range.is_empty() && tail_range.is_empty() {
            return (Ok(0), body, tail, split);
        }
        let want = body_range.len() + tail_range.len();
        // SAFETY (both adds): each range was checked to lie inside its buffer.
        let (b, t) = unsafe {
            (
                body.as_mut_ptr().add(body_range.start),
                tail.as_mut_ptr().add(tail_range.start),
            )
        };
        split.iov = [
            libc::iovec {
                iov_base: b.cast(),
                iov_len: body_range.len(),
            },
            libc::iovec {
                iov_base: t.cast(),
                iov_len: tail_range.len(),
            },
        ];
        split.msg.msg_iov = split.iov.as_mut_ptr();
        split.msg.msg_iovlen = split.iov.len() as _;
        let m: *mut libc::msghdr = &mut split.msg;
        let entry = opcode::RecvMsg::new(types::Fd(self.sock.as_raw_fd()), m).build();
        // SAFETY: the msghdr and its iovec array are boxed (they do not move
        // with the box); the iovecs point into the two pool chunks, which
        // never move and are distinct (each IoBufMut is unique). All of it,
        // with the socket, moves into the op until the completion.
        let op = unsafe {
            Op::submit(
                entry,
                OpKind::LongLived,
                (body, tail, split, self.sock.clone()),
            )
        };
        let (c, (body, tail, split, _sock)) = op.await;
        (
            c.into_io().map(|n| (n as usize).min(want)),
            body,
            tail,
            split,
        )
    }

    /// One receive (`IORING_OP_RECVMSG`) laid out for back-to-back
    /// messages of one shape, a `head` of `head` bytes and a payload of
    /// `body` bytes: for each chunk `i`, `head` bytes into `stage` at
    /// `i * (head + body)`, then `body` bytes into chunk `i`; then
    /// `stage[chunks.len() * (head + body)..tail_end]`. So each whole
    /// message's payload lands in its own chunk, and
    /// `stage[i * stride + head..(i + 1) * stride]` is free to take chunk
    /// `i`'s bytes back when the stream turns out to have another shape. It
    /// takes only what has already arrived (`MSG_DONTWAIT`): the bytes
    /// received, `WouldBlock` when none had, 0 when the peer closed its side.
    /// Each chunk must be at least `body` long. `batch` holds the `msghdr`
    /// and iovecs; keep one per stream.
    pub async fn recv_batch(
        &self,
        stage: IoBufMut,
        head: usize,
        body: usize,
        chunks: Vec<IoBufMut>,
        tail_end: usize,
        batch: Box<BatchRecv>,
    ) -> (io::Result<usize>, IoBufMut, Vec<IoBufMut>, Box<BatchRecv>) {
        let (mut stage, mut chunks, mut batch) = (stage, chunks, batch);
        let fd = self.sock.as_raw_fd();
        let entry = match batch.entry(fd, &mut stage, head, body, &mut chunks, tail_end) {
            Ok(entry) => entry,
            Err(e) => return (Err(e), stage, chunks, batch),
        };
        // SAFETY: the entry points at the boxed msghdr and its iovecs, which
        // point into pool chunks (which never move; the stage and each chunk
        // are distinct unique IoBufMuts; see `BatchRecv::entry`). All of it,
        // with the socket, moves into the op until the completion.
        let op = unsafe {
            Op::submit(
                entry,
                OpKind::LongLived,
                (stage, chunks, batch, self.sock.clone()),
            )
        };
        let (c, (stage, chunks, batch, _sock)) = op.await;
        (c.into_io().map(|n| n as usize), stage, chunks, batch)
    }

    pub(crate) async fn recv_raw<B: RecvTarget>(
        &self,
        mut buf: B,
        range: Range<usize>,
    ) -> (io::Result<usize>, B) {
        if let Err(e) = check_range(&range, buf.target_len()) {
            return (Err(e), buf);
        }
        if range.is_empty() {
            return (Ok(0), buf);
        }
        let len = u32::try_from(range.len()).unwrap_or(u32::MAX);
        // SAFETY: range.start < range.end <= target_len, so the pointer stays in the buffer.
        let ptr = unsafe { buf.target_ptr().add(range.start) };
        let entry = opcode::Recv::new(types::Fd(self.sock.as_raw_fd()), ptr, len).build();
        // SAFETY: ptr..ptr+len lies in `buf` (RecvTarget contract), owned by the op;
        // the socket is kept open by the Rc.
        let op = unsafe { Op::submit(entry, OpKind::LongLived, (buf, self.sock.clone())) };
        let (c, (buf, _sock)) = op.await;
        (c.into_io().map(|n| (n as usize).min(range.len())), buf)
    }

    pub(crate) async fn recv_exact_raw<B: RecvTarget>(
        &self,
        buf: B,
        range: Range<usize>,
    ) -> (io::Result<()>, B) {
        let min = range.len();
        let (r, buf) = self.recv_at_least_raw(buf, range, min).await;
        (r.map(|_| ()), buf)
    }

    pub(crate) async fn recv_at_least_raw<B: RecvTarget>(
        &self,
        mut buf: B,
        range: Range<usize>,
        min: usize,
    ) -> (io::Result<usize>, B) {
        if let Err(e) = check_range(&range, buf.target_len()) {
            return (Err(e), buf);
        }
        let want = min.min(range.len());
        let mut pos = range.start;
        while pos - range.start < want {
            let (res, b) = self.recv_raw(buf, pos..range.end).await;
            buf = b;
            match res {
                Ok(0) => {
                    let msg = if pos == range.start {
                        "connection closed by peer".to_string()
                    } else {
                        format!(
                            "connection closed by peer after {} of {} bytes",
                            pos - range.start,
                            want
                        )
                    };
                    return (Err(io::Error::new(io::ErrorKind::UnexpectedEof, msg)), buf);
                }
                Ok(n) => pos += n,
                Err(e) if is_retryable(&e) => {}
                Err(e) => return (Err(e), buf),
            }
        }
        (Ok(pos - range.start), buf)
    }

    /// One send of `buf` (may be partial): the number of bytes taken.
    pub async fn send(&self, buf: IoBuf) -> (io::Result<usize>, IoBuf) {
        self.send_from(buf, 0).await
    }

    /// Sends all of `buf`, resuming after partial sends.
    pub async fn send_all(&self, buf: IoBuf) -> (io::Result<()>, IoBuf) {
        let mut buf = buf;
        let mut done = 0usize;
        while done < buf.len() {
            let (res, b) = self.send_from(buf, done).await;
            buf = b;
            match res {
                Ok(0) => return (Err(write_zero()), buf),
                Ok(n) => done += n,
                Err(e) if is_retryable(&e) => {}
                Err(e) => return (Err(e), buf),
            }
        }
        (Ok(()), buf)
    }

    async fn send_from(&self, buf: IoBuf, start: usize) -> (io::Result<usize>, IoBuf) {
        if start >= buf.len() {
            return (Ok(0), buf);
        }
        let len = u32::try_from(buf.len() - start).unwrap_or(u32::MAX);
        // SAFETY: start < buf.len(), so the pointer stays inside the visible range.
        let ptr = unsafe { buf.as_ptr().add(start) };
        let entry = opcode::Send::new(types::Fd(self.sock.as_raw_fd()), ptr, len)
            .flags(libc::MSG_NOSIGNAL)
            .build();
        // SAFETY: the pointer is into buf's chunk, which the op keeps alive.
        let op = unsafe { Op::submit(entry, OpKind::LongLived, (buf, self.sock.clone())) };
        let (c, (buf, _sock)) = op.await;
        (c.into_io().map(|n| n as usize), buf)
    }

    /// One `sendmsg` of `header` (copied; keep it small) followed by the
    /// `payload` chunks (shared, not copied). May be partial: returns the
    /// bytes taken.
    pub async fn send_vectored(&self, header: &[u8], payload: &[IoBuf]) -> io::Result<usize> {
        self.sendmsg(header.to_vec(), payload, false).await
    }

    /// Sends `header` and then every `payload` chunk, in order and in full,
    /// with as few `sendmsg` ops as the kernel allows: after a partial send
    /// the next op starts at the iovec and offset where the last one stopped.
    pub async fn send_vectored_all(&self, header: &[u8], payload: &[IoBuf]) -> io::Result<()> {
        self.sendmsg(header.to_vec(), payload, true).await.map(drop)
    }

    /// `sendmsg` of an owned header (moved into the op) and shared chunks;
    /// with `all`, resumes after partial sends until everything is taken.
    pub(crate) async fn sendmsg(
        &self,
        header: Vec<u8>,
        payload: &[IoBuf],
        all: bool,
    ) -> io::Result<usize> {
        let payload: Vec<IoBuf> = payload.iter().filter(|b| !b.is_empty()).cloned().collect();
        let mut segments = Vec::with_capacity(payload.len() + 1);
        if !header.is_empty() {
            segments.push(libc::iovec {
                iov_base: header.as_ptr() as *mut libc::c_void,
                iov_len: header.len(),
            });
        }
        for b in &payload {
            segments.push(libc::iovec {
                iov_base: b.as_ptr() as *mut libc::c_void,
                iov_len: b.len(),
            });
        }
        self.send_segments(header, payload, segments, all).await
    }

    /// `sendmsg` of `segments`, which point into `header`'s heap buffer and
    /// the `payload` chunks (both moved into the op, so they outlive it);
    /// with `all`, resumes after partial sends until everything is taken.
    async fn send_segments(
        &self,
        header: Vec<u8>,
        payload: Vec<IoBuf>,
        segments: Vec<libc::iovec>,
        all: bool,
    ) -> io::Result<usize> {
        let mut gather = Gather::new(segments);
        let total = gather.remaining();
        let mut res = SendMsgResources {
            // SAFETY: msghdr is plain old data; all zeroes is a valid empty header.
            msg: Box::new(unsafe { std::mem::zeroed() }),
            iov: Vec::new(),
            _header: header,
            _payload: payload,
            _sock: self.sock.clone(),
        };
        while !gather.is_done() {
            gather.fill(&mut res.iov);
            res.msg.msg_iov = res.iov.as_mut_ptr();
            res.msg.msg_iovlen = res.iov.len() as _;
            let msg: *const libc::msghdr = &*res.msg;
            let entry = opcode::SendMsg::new(types::Fd(self.sock.as_raw_fd()), msg)
                .flags(libc::MSG_NOSIGNAL as u32)
                .build();
            // SAFETY: the msghdr is boxed, its iovec array is a Vec's heap buffer,
            // and the iovecs point into the header Vec and the payload chunks;
            // all of it moves into the op and stays until the completion.
            let op = unsafe { Op::submit(entry, OpKind::LongLived, res) };
            let (c, back) = op.await;
            res = back;
            match c.into_io() {
                Ok(0) => return Err(write_zero()),
                Ok(n) => {
                    gather.advance(n as usize);
                    if !all {
                        return Ok(n as usize);
                    }
                }
                Err(e) if is_retryable(&e) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(total)
    }

    /// Sends every part of `list` in order and in full, with one `sendmsg`
    /// for the whole list unless the kernel takes it partly (then the next
    /// op resumes at the iovec and offset where it stopped). The list comes
    /// back unchanged (parts still queued; call [`SendList::clear`] to reuse
    /// it); nothing is allocated once its capacities have grown.
    pub async fn send_list(&self, mut list: SendList) -> (io::Result<()>, SendList) {
        list.prepare();
        while !list.gather.is_done() {
            list.gather.fill(&mut list.iov);
            list.msg.msg_iov = list.iov.as_mut_ptr();
            list.msg.msg_iovlen = list.iov.len() as _;
            let msg: *const libc::msghdr = &*list.msg;
            let entry = opcode::SendMsg::new(types::Fd(self.sock.as_raw_fd()), msg)
                .flags(libc::MSG_NOSIGNAL as u32)
                .build();
            // SAFETY: the msghdr is boxed and its iovec array is a Vec's heap
            // buffer; the iovecs point into the list's byte arena (not touched
            // while the op runs) and its pool chunks. The list moves into the
            // op and stays there until the completion.
            let op = unsafe { Op::submit(entry, OpKind::LongLived, (list, self.sock.clone())) };
            let (c, (back, _sock)) = op.await;
            list = back;
            match c.into_io() {
                Ok(0) => return (Err(write_zero()), list),
                Ok(n) => list.gather.advance(n as usize),
                Err(e) if is_retryable(&e) => {}
                Err(e) => return (Err(e), list),
            }
        }
        (Ok(()), list)
    }

    /// Shuts down one or both directions (`IORING_OP_SHUTDOWN`). Shutting
    /// down writing sends a FIN after queued data; the peer's receives then
    /// see end of stream.
    pub async fn shutdown(&self, how: Shutdown) -> io::Result<()> {
        let how = match how {
            Shutdown::Read => libc::SHUT_RD,
            Shutdown::Write => libc::SHUT_WR,
            Shutdown::Both => libc::SHUT_RDWR,
        };
        let entry = opcode::Shutdown::new(types::Fd(self.sock.as_raw_fd()), how).build();
        // SAFETY: no pointers; the Rc keeps the descriptor open.
        let op = unsafe { Op::submit(entry, OpKind::Data, self.sock.clone()) };
        op.await.0.into_io().map(drop)
    }
}

fn write_zero() -> io::Error {
    io::Error::new(io::ErrorKind::WriteZero, "socket took no bytes")
}

impl AsRawFd for TcpStream {
    fn as_raw_fd(&self) -> RawFd {
        self.sock.as_raw_fd()
    }
}

impl AsFd for TcpStream {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.sock.as_fd()
    }
}

impl Drop for TcpStream {
    fn drop(&mut self) {
        if Rc::strong_count(&self.sock) > 1 {
            // An abandoned op still holds the socket; a receive could wait for
            // ever. Shutting it down completes such ops, and the last reference
            // (ours or the op's) closes the descriptor.
            let _ = self.sock.shutdown(Shutdown::Both);
        }
    }
}

/// The `msghdr` and two iovecs of [`TcpStream::recv_split`], boxed once
/// per stream so their addresses stay put while an op holds them.
pub struct SplitRecv {
    msg: libc::msghdr,
    iov: [libc::iovec; 2],
}

impl SplitRecv {
    /// An empty one, ready for [`TcpStream::recv_split`].
    pub fn new() -> Box<SplitRecv> {
        Box::new(SplitRecv {
            // SAFETY: msghdr is plain old data; all zeroes is a valid empty header.
            msg: unsafe { std::mem::zeroed() },
            iov: [libc::iovec {
                iov_base: std::ptr::null_mut(),
                iov_len: 0,
            }; 2],
        })
    }
}

/// The `msghdr` and iovecs of [`TcpStream::recv_batch`], boxed so they stay
/// put while an op holds them.
pub struct BatchRecv {
    msg: libc::msghdr,
    iov: Vec<libc::iovec>,
}

impl BatchRecv {
    /// Room for `chunks_max` (head, chunk) pairs and the tail.
    pub fn new(chunks_max: usize) -> Box<BatchRecv> {
        Box::new(BatchRecv {
            // SAFETY: msghdr is plain old data; all zeroes is a valid empty header.
            msg: unsafe { std::mem::zeroed() },
            iov: Vec::with_capacity(2 * chunks_max + 1),
        })
    }

    /// Lays out the batch receive of [`TcpStream::recv_batch`] on `fd`:
    /// for each chunk `i`, `head` bytes of `stage` at `i * (head + body)`
    /// and then `body` bytes of chunk `i`; then `stage` from
    /// `chunks.len() * (head + body)` to `tail_end`. Returns the
    /// `IORING_OP_RECVMSG` entry (`MSG_DONTWAIT`: only what has arrived),
    /// or `InvalidInput` when the layout does not fit `stage`, a chunk or
    /// this header's room.
    ///
    /// The entry points at this header (boxed, so it stays put) and into
    /// the heap memory behind `stage` and the chunks. Whoever submits it
    /// must hand all of them to the op, so that none is touched, moved out
    /// of its allocation or freed before the completion. This is the one
    /// place the layout is built: the NVMe/TCP reader uses it on its own
    /// staging vector and descriptor, the iSCSI reader through
    /// [`TcpStream::recv_batch`].
    pub fn entry(
        &mut self,
        fd: RawFd,
        stage: &mut [u8],
        head: usize,
        body: usize,
        chunks: &mut [IoBufMut],
        tail_end: usize,
    ) -> io::Result<io_uring::squeue::Entry> {
        let stride = head + body;
        let tail_start = chunks.len() * stride;
        let fits = tail_start <= tail_end
            && tail_end <= stage.len()
            && chunks.iter().all(|c| c.len() >= body)
            && 2 * chunks.len() < self.iov.capacity();
        if !fits {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "batch receive does not fit",
            ));
        }
        let base = stage.as_mut_ptr();
        self.iov.clear();
        for (i, chunk) in chunks.iter_mut().enumerate() {
            // SAFETY: i * stride + head <= tail_start <= stage.len(), checked above.
            let h = unsafe { base.add(i * stride) };
            self.iov.push(libc::iovec {
                iov_base: h.cast(),
                iov_len: head,
            });
            self.iov.push(libc::iovec {
                iov_base: chunk.as_mut_ptr().cast(),
                iov_len: body,
            });
        }
        // SAFETY: tail_start <= tail_end <= stage.len(), checked above.
        let t = unsafe { base.add(tail_start) };
        self.iov.push(libc::iovec {
            iov_base: t.cast(),
            iov_len: tail_end - tail_start,
        });
        // The array never grows past the capacity checked above, so it does
        // not move while an op holds it.
        self.msg.msg_iov = self.iov.as_mut_ptr();
        self.msg.msg_iovlen = self.iov.len() as _;
        let m: *mut libc::msghdr = &mut self.msg;
        Ok(opcode::RecvMsg::new(types::Fd(fd), m)
            .flags(libc::MSG_DONTWAIT as u32)
            .build())
    }
}

impl fmt::Debug for BatchRecv {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BatchRecv").finish_non_exhaustive()
    }
}

impl fmt::Debug for SplitRecv {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SplitRecv").finish_non_exhaustive()
    }
}

/// What one `sendmsg` op owns.
struct SendMsgResources {
    msg: Box<libc::msghdr>,
    iov: Vec<libc::iovec>,
    _header: Vec<u8>,
    _payload: Vec<IoBuf>,
    _sock: Rc<StdTcpStream>,
}

/// The segments of a vectored send and how far the kernel has taken them.
pub(crate) struct Gather {
    pub(crate) segments: Vec<libc::iovec>,
    /// First segment not fully sent.
    index: usize,
    /// Bytes of that segment already sent.
    offset: usize,
}

impl Gather {
    pub(crate) fn new(segments: Vec<libc::iovec>) -> Gather {
        Gather {
            segments,
            index: 0,
            offset: 0,
        }
    }

    /// Empties the segments (keeping their capacity) and rewinds.
    pub(crate) fn reset(&mut self) {
        self.segments.clear();
        self.index = 0;
        self.offset = 0;
    }

    pub(crate) fn is_done(&self) -> bool {
        self.index >= self.segments.len()
    }

    fn remaining(&self) -> usize {
        self.segments[self.index.min(self.segments.len())..]
            .iter()
            .map(|s| s.iov_len)
            .sum::<usize>()
            - self.offset
    }

    /// The iovecs of the next op: the rest of the current segment, then
    /// whole segments, at most `IOV_MAX` in all.
    pub(crate) fn fill(&self, iov: &mut Vec<libc::iovec>) {
        iov.clear();
        for (i, s) in self.segments[self.index..].iter().take(IOV_MAX).enumerate() {
            let skip = if i == 0 { self.offset } else { 0 };
            iov.push(libc::iovec {
                iov_base: s.iov_base.cast::<u8>().wrapping_add(skip).cast(),
                iov_len: s.iov_len - skip,
            });
        }
    }

    /// Moves past `n` bytes the kernel took.
    pub(crate) fn advance(&mut self, mut n: usize) {
        while n > 0 && self.index < self.segments.len() {
            let left = self.segments[self.index].iov_len - self.offset;
            if n < left {
                self.offset += n;
                return;
            }
            n -= left;
            self.index += 1;
            self.offset = 0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seg(base: usize, len: usize) -> libc::iovec {
        libc::iovec {
            iov_base: base as *mut libc::c_void,
            iov_len: len,
        }
    }

    fn view(iov: &[libc::iovec]) -> Vec<(usize, usize)> {
        iov.iter()
            .map(|v| (v.iov_base as usize, v.iov_len))
            .collect()
    }

    #[test]
    fn partial_sends_resume_inside_and_across_iovecs() {
        let mut g = Gather::new(vec![seg(1000, 10), seg(5000, 100), seg(9000, 7)]);
        let mut iov = Vec::new();
        assert_eq!(g.remaining(), 117);
        g.fill(&mut iov);
        assert_eq!(view(&iov), [(1000, 10), (5000, 100), (9000, 7)]);
        g.advance(4); // inside the header
        g.fill(&mut iov);
        assert_eq!(view(&iov), [(1004, 6), (5000, 100), (9000, 7)]);
        g.advance(6 + 50); // exactly the header's end, then half the chunk
        g.fill(&mut iov);
        assert_eq!(view(&iov), [(5050, 50), (9000, 7)]);
        assert_eq!(g.remaining(), 57);
        g.advance(50); // exactly to a boundary
        g.fill(&mut iov);
        assert_eq!(view(&iov), [(9000, 7)]);
        g.advance(7);
        assert!(g.is_done());
        assert_eq!(g.remaining(), 0);
        g.advance(3); // a stray count past the end is ignored
        assert!(g.is_done());
    }

    #[test]
    fn long_lists_go_out_in_iov_max_batches() {
        let segs: Vec<_> = (0..IOV_MAX + 5).map(|i| seg(i * 100, 10)).collect();
        let mut g = Gather::new(segs);
        let mut iov = Vec::new();
        g.fill(&mut iov);
        assert_eq!(iov.len(), IOV_MAX);
        g.advance(10 * IOV_MAX);
        g.fill(&mut iov);
        assert_eq!(iov.len(), 5);
        assert_eq!(iov[0].iov_base as usize, IOV_MAX * 100);
    }

    #[test]
    fn empty_gather_is_done() {
        let g = Gather::new(Vec::new());
        assert!(g.is_done());
        assert_eq!(g.remaining(), 0);
    }
}
