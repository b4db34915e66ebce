//! The per-core runtime of mirrorpoint.
//!
//! One pinned reactor thread per configured core. Each reactor owns one
//! io_uring for everything it does (disk I/O, sockets, timers, wake-ups), a
//! single-threaded task executor whose futures complete from that ring, a
//! registered buffer pool, and a lock-free inbox other cores post to.
