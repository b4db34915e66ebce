//! The per-core runtime of mirrorpoint.
//!
//! One pinned reactor thread per configured core. Each reactor owns one
//! io_uring for everything it does (disk I/O, sockets, timers, wake-ups), a
//! single-threaded task executor whose futures complete from that ring, a
//! registered buffer pool, and a lock-free inbox other cores post to. See
//! [`reactor`] for the execution model and why it was chosen.

pub mod buffer;
pub mod io;
pub mod op;
pub mod reactor;
pub mod runtime;
pub mod stats;
pub mod sync;
pub mod testing;
pub mod timer;
pub mod wake;

pub use buffer::{BufferPool, IoBuf, IoBufMut, PoolConfig, PoolError};
pub use io::ReactorFile;
pub use op::{Completion, Op, OpKind};
pub use reactor::{
    buffer_pool, current_index, current_stats, on_reactor, sleep, sleep_until, spawn, yield_now,
    DiskSubmit, ReactorConfig, ReactorError, Sleep, Task,
};
pub use runtime::{ReactorHandle, Runtime, RuntimeConfig};
pub use stats::StatsSnapshot;
pub use sync::{
    oneshot, Canceled, LocalNotify, LocalPermit, LocalSemaphore, OneshotReceiver, OneshotSender,
};
