//! Moving bytes between machines.
//!
//! TCP sockets driven by the reactor's io_uring (accept, connect, send, recv)
//! for the NVMe/TCP and iSCSI front ends and the site-to-site mirror links:
//! no epoll thread, no blocking syscall on a reactor, payloads received
//! straight into pool chunks and sent from them without copies.
//!
//! - [`TcpListener`], [`TcpStream`]: the sockets (see [`stream`] for the
//!   ownership and cancellation rules).
//! - [`hand_off`], [`Acceptor`]: accept on one core, run each connection on
//!   a chosen one for its whole life.
//! - [`Link`], [`TcpLink`]: the message transport of the mirror, shaped so an
//!   RDMA queue pair can implement it later.

pub mod acceptor;
pub mod link;
pub mod listener;
pub mod send_list;
mod sockaddr;
pub mod stream;

pub use acceptor::{hand_off, Acceptor, HandoffError};
pub use link::{Link, Received, TcpLink};
pub use listener::TcpListener;
pub use send_list::SendList;
pub use stream::{BatchRecv, SplitRecv, TcpStream};
