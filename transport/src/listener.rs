//! A listening TCP socket whose accepts go through the current reactor's ring.
//!
//! Setup (socket, `SO_REUSEADDR`, bind, listen) is done by std on the calling
//! thread: it happens once and none of it blocks. Each [`TcpListener::accept`]
//! is one `IORING_OP_ACCEPT`, a long-lived op (it may wait for ever, and
//! runtime teardown cancels it) whose boxed `sockaddr` storage the kernel
//! fills with the peer address. Accepted sockets get `SOCK_CLOEXEC` and
//! `TCP_NODELAY`.

use io_uring::{opcode, types};
use mirrorpoint_poller::{Op, OpKind};
use std::fmt;
use std::io;
use std::mem::ManuallyDrop;
use std::net::{SocketAddr, TcpListener as StdTcpListener};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::rc::Rc;

use crate::sockaddr::RawAddr;
use crate::stream::{is_retryable, TcpStream};

/// A TCP listener for tasks of one reactor.
pub struct TcpListener {
    /// Cloned into every accept's resources so the descriptor outlives the op.
    sock: Rc<StdTcpListener>,
}

impl fmt::Debug for TcpListener {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TcpListener")
            .field("fd", &self.sock.as_raw_fd())
            .field("local", &self.sock.local_addr().ok())
            .finish()
    }
}

impl TcpListener {
    /// Binds and listens on `addr` (port 0 picks an ephemeral port; see
    /// [`TcpListener::local_addr`]). std sets `SO_REUSEADDR` before binding.
    pub fn bind(addr: SocketAddr) -> io::Result<TcpListener> {
        TcpListener::from_std(StdTcpListener::bind(addr)?)
    }

    /// Wraps a std listener (made elsewhere, or moved from another thread),
    /// switching it to blocking mode (see [`crate::stream`] for why).
    pub fn from_std(sock: StdTcpListener) -> io::Result<TcpListener> {
        sock.set_nonblocking(false)?;
        Ok(TcpListener {
            sock: Rc::new(sock),
        })
    }

    /// Gives the socket back as a std listener; fails (returning the
    /// listener) while an abandoned accept still holds it.
    pub fn into_std(self) -> Result<StdTcpListener, TcpListener> {
        if Rc::strong_count(&self.sock) != 1 {
            return Err(self);
        }
        let this = ManuallyDrop::new(self);
        // SAFETY: `this` is never used or dropped again, so the Rc is moved out once.
        let rc = unsafe { std::ptr::read(&this.sock) };
        Rc::try_unwrap(rc).map_err(|sock| TcpListener { sock })
    }

    /// The bound address.
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.sock.local_addr()
    }

    /// Waits for the next connection. `EINTR`/`EAGAIN` are retried here;
    /// other errors (including per-connection ones such as `ECONNABORTED`
    /// or `EMFILE`) are returned: see [`crate::Acceptor`] for a loop that
    /// tells transient from fatal ones.
    pub async fn accept(&self) -> io::Result<(TcpStream, SocketAddr)> {
        loop {
            let mut raw = RawAddr::empty();
            let entry = opcode::Accept::new(
                types::Fd(self.sock.as_raw_fd()),
                raw.as_mut_ptr(),
                &mut raw.len,
            )
            .flags(libc::SOCK_CLOEXEC)
            .build();
            // SAFETY: the address storage and its length are boxed and owned by
            // the op; the Rc keeps the listening socket open.
            let op = unsafe { Op::submit(entry, OpKind::LongLived, (raw, self.sock.clone())) }
                .on_orphaned_result(close_accepted_fd);
            let (c, (raw, _sock)) = op.await;
            let fd = match c.into_io() {
                Ok(fd) => fd as RawFd,
                Err(e) if is_retryable(&e) => continue,
                Err(e) => return Err(e),
            };
            // SAFETY: a successful accept returns a fresh descriptor we now own.
            let owned = unsafe { OwnedFd::from_raw_fd(fd) };
            let stream = TcpStream::from_accepted(owned);
            let peer = match raw.to_std() {
                Ok(a) => a,
                Err(_) => stream.peer_addr()?,
            };
            return Ok((stream, peer));
        }
    }
}

impl AsRawFd for TcpListener {
    fn as_raw_fd(&self) -> RawFd {
        self.sock.as_raw_fd()
    }
}

impl AsFd for TcpListener {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.sock.as_fd()
    }
}

impl Drop for TcpListener {
    fn drop(&mut self) {
        if Rc::strong_count(&self.sock) > 1 {
            // An abandoned accept still holds the socket and could wait for
            // ever; shutting a listening socket down makes it fail (EINVAL).
            // SAFETY: no pointers; the descriptor is open (we hold a reference).
            unsafe { libc::shutdown(self.sock.as_raw_fd(), libc::SHUT_RDWR) };
        }
    }
}

/// If an accept's future went away before the kernel answered, the socket it
/// accepted has no owner: close it rather than leak it.
fn close_accepted_fd(result: i32) {
    if result >= 0 {
        // SAFETY: a non-negative accept result is a new descriptor nobody else
        // has seen, so closing it cannot affect another owner.
        unsafe { libc::close(result) };
    }
}
