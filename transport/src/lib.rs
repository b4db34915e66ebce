//! Moving bytes between machines.
//!
//! TCP sockets driven by the reactor's io_uring (accept, connect, send, recv),
//! and later RDMA behind the same traits.
