//! The few TCP socket operations the NVMe/TCP front end needs, on the
//! current reactor's io_uring: accept, exact-length receive into an owned
//! buffer (a pool chunk or a small header vector), and vectored send.
//!
//! Why here and not in `mirrorpoint-transport`: that crate's TCP layer had
//! not landed when this front end was written; these are the minimal ops on
//! top of `poller::Op`, to be replaced by the transport crate's when it does.
//! Shape: every op owns its memory until the kernel is done with it (the
//! `Op` ownership-passing contract), receives name an exact byte range of
//! the buffer so PDU data can land straight in its final pool chunk, and
//! sends gather a batch of PDUs (header, payload chunk, digest) into one
//! `sendmsg` without copying payloads.

use mirrorpoint_poller::{IoBuf, IoBufMut, Op, OpKind};
use io_uring::{opcode, types};
use std::io;
use std::net::{SocketAddrV4, TcpListener};
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd, OwnedFd};
use std::sync::Arc;

/// A buffer an op may own while the kernel writes into it.
pub trait RecvBuf: Unpin + 'static {
    /// Start of the writable memory and its length.
    fn span(&mut self) -> (*mut u8, usize);
}

impl RecvBuf for Vec<u8> {
    fn span(&mut self) -> (*mut u8, usize) {
        (self.as_mut_ptr(), self.len())
    }
}

impl RecvBuf for IoBufMut {
    fn span(&mut self) -> (*mut u8, usize) {
        let len = self.len();
        (self.as_mut_ptr(), len)
    }
}

/// Binds a non-blocking listening socket (off the reactors: may block briefly).
pub fn listen(addr: SocketAddrV4) -> io::Result<(OwnedFd, SocketAddrV4)> {
    let l = TcpListener::bind(addr)?;
    l.set_nonblocking(true)?;
    let bound = match l.local_addr()? {
        std::net::SocketAddr::V4(a) => a,
        std::net::SocketAddr::V6(_) => return Err(io::Error::other("bound an IPv6 address")),
    };
    // SAFETY: into_raw_fd hands over a descriptor we now own.
    Ok((unsafe { OwnedFd::from_raw_fd(l.into_raw_fd()) }, bound))
}

/// Accepts one connection; non-blocking, close-on-exec, TCP_NODELAY set.
pub async fn accept(listener: &Arc<OwnedFd>) -> io::Result<OwnedFd> {
    let entry = opcode::Accept::new(
        types::Fd(listener.as_raw_fd()),
        std::ptr::null_mut(),
        std::ptr::null_mut(),
    )
    .flags(libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK)
    .build();
    // SAFETY: no pointers; the listener is kept alive by the op's resources.
    let op = unsafe { Op::submit(entry, OpKind::LongLived, listener.clone()) };
    let (c, _) = op.await;
    let fd = c.into_io()? as i32;
    // SAFETY: a fresh descriptor from accept, owned by us now.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let one: libc::c_int = 1;
    // SAFETY: setsockopt reads one c_int from a live local.
    unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_NODELAY,
            (&one as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        );
    }
    Ok(fd)
}

/// The local address of a connected socket.
pub fn local_addr(fd: &OwnedFd) -> io::Result<SocketAddrV4> {
    // SAFETY: a zeroed sockaddr_in is a valid out-parameter.
    let mut sa: libc::sockaddr_in = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
    // SAFETY: getsockname writes at most `len` bytes into sa.
    let r = unsafe { libc::getsockname(fd.as_raw_fd(), (&mut sa as *mut libc::sockaddr_in).cast(), &mut len) };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    if i32::from(sa.sin_family) != libc::AF_INET {
        return Err(io::Error::other("not an IPv4 socket"));
    }
    let ip = std::net::Ipv4Addr::from(u32::from_be(sa.sin_addr.s_addr));
    Ok(SocketAddrV4::new(ip, u16::from_be(sa.sin_port)))
}

/// Receives exactly the bytes `start..end` of `buf`. End of stream before
/// that is `UnexpectedEof`.
pub async fn recv_exact<B: RecvBuf>(
    fd: &Arc<OwnedFd>,
    mut buf: B,
    start: usize,
    end: usize,
) -> (io::Result<()>, B) {
    let mut at = start;
    while at < end {
        let (base, len) = buf.span();
        if end > len {
            return (Err(io::Error::other("receive range outside the buffer")), buf);
        }
        let want = u32::try_from(end - at).unwrap_or(u32::MAX);
        // SAFETY: at < end <= len, so the pointer stays inside the buffer.
        let ptr = unsafe { base.add(at) };
        let entry = opcode::Recv::new(types::Fd(fd.as_raw_fd()), ptr, want).build();
        // SAFETY: the entry points into `buf`'s heap or pool memory, which the
        // op owns (with the descriptor) until the kernel completes it.
        let op = unsafe { Op::submit(entry, OpKind::LongLived, (buf, fd.clone())) };
        let (c, (b, _)) = op.await;
        buf = b;
        match c.into_io() {
            Ok(0) => {
                return (
                    Err(io::Error::new(io::ErrorKind::UnexpectedEof, "connection closed")),
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

/// The data section of an outgoing PDU.
pub enum Payload {
    /// No data.
    None,
    /// Data built on the heap (admin replies).
    Heap(Vec<u8>),
    /// A pool chunk (read data), sent without copying.
    Pool(IoBuf),
}

impl Payload {
    fn bytes(&self) -> &[u8] {
        match self {
            Payload::None => &[],
            Payload::Heap(v) => v,
            Payload::Pool(b) => b,
        }
    }
}

/// One PDU to send: header (with header digest and padding), data, data digest.
pub struct OutPdu {
    /// Everything before the data.
    pub head: Vec<u8>,
    /// The data section.
    pub data: Payload,
    /// The data digest, if any.
    pub tail: Option<[u8; 4]>,
}

impl OutPdu {
    fn parts(&self) -> [&[u8]; 3] {
        [
            &self.head,
            self.data.bytes(),
            self.tail.as_ref().map(|t| &t[..]).unwrap_or(&[]),
        ]
    }
}

struct SendState {
    pdus: Vec<OutPdu>,
    iov: Vec<libc::iovec>,
    msg: Box<libc::msghdr>,
}

/// Sends every PDU of the batch, in order, with as few `sendmsg` calls as
/// the socket allows.
pub async fn send_all(fd: &Arc<OwnedFd>, pdus: Vec<OutPdu>) -> io::Result<()> {
    let total: usize = pdus
        .iter()
        .map(|p| p.parts().iter().map(|s| s.len()).sum::<usize>())
        .sum();
    let mut sent = 0usize;
    let mut state = SendState {
        pdus,
        iov: Vec::new(),
        // SAFETY: a zeroed msghdr is valid (no name, no control data).
        msg: Box::new(unsafe { std::mem::zeroed() }),
    };
    while sent < total {
        // Build iovecs for what is left.
        state.iov.clear();
        let mut skip = sent;
        for p in &state.pdus {
            for s in p.parts() {
                if s.is_empty() {
                    continue;
                }
                if skip >= s.len() {
                    skip -= s.len();
                    continue;
                }
                let rest = &s[skip..];
                skip = 0;
                state.iov.push(libc::iovec {
                    iov_base: rest.as_ptr() as *mut libc::c_void,
                    iov_len: rest.len(),
                });
                if state.iov.len() >= 1024 {
                    break;
                }
            }
            if state.iov.len() >= 1024 {
                break;
            }
        }
        state.msg.msg_iov = state.iov.as_mut_ptr();
        state.msg.msg_iovlen = state.iov.len() as _;
        let entry = opcode::SendMsg::new(types::Fd(fd.as_raw_fd()), &*state.msg)
            .flags(libc::MSG_NOSIGNAL as u32)
            .build();
        // SAFETY: the msghdr (boxed), the iovec array (heap) and every byte it
        // points at (PDU vectors and pool chunks) are owned by the op's
        // resources and do not move until it completes.
        let op = unsafe { Op::submit(entry, OpKind::LongLived, (state, fd.clone())) };
        let (c, (s, _)) = op.await;
        state = s;
        match c.into_io() {
            Ok(0) => return Err(io::Error::new(io::ErrorKind::WriteZero, "socket took no bytes")),
            Ok(n) => sent += n as usize,
            Err(e) if matches!(e.raw_os_error(), Some(libc::EINTR) | Some(libc::EAGAIN)) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}
