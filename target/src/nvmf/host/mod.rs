//! A userspace NVMe/TCP initiator (host), for tests and the benchmark harness.
//!
//! No packaged userspace NVMe/TCP host exists where mirrorpoint is built
//! (nvme-cli needs the kernel's initiator), so this is how our tests and
//! `mirrorpoint-bench` drive an NVMe/TCP target over the network — ours, or
//! the Linux kernel's nvmet-tcp.
//!
//! Shape, and why:
//! * **Reactor-native.** It runs on mirrorpoint's own reactors: sockets are
//!   `transport::TcpStream`s on the current ring, buffers are pool chunks,
//!   and a queue pair is tied to the reactor that opened it, like an SPDK
//!   qpair. A [`Controller`] (admin queue) lives on one reactor; I/O queues
//!   ([`IoQueue`]) can be opened on any reactor from its `Arc<ControllerInfo>`.
//! * **The same codec as the target.** PDUs, SQEs/CQEs, Connect and Property
//!   commands, Identify and log page layouts all come from the sans-IO
//!   `nvmf` modules the target uses (encode on one side, decode on the
//!   other), so a layout bug cannot hide by being mirrored.
//! * **Target input is never trusted.** Every PDU is validated by the codec
//!   (header digest before any field is used, DATAO/DATAL against the
//!   command's transfer, R2T ranges against the write), errors are typed
//!   ([`HostError`]), and nothing a target sends can panic the host.
//!
//! Use, on a reactor (see `target/tests/nvmf_host_common` for a whole
//! session):
//!
//! ```ignore
//! let ctrl = Controller::connect(addr, "nqn.2024-01.io.example:vol0", hostnqn,
//!                                ConnectOptions::default()).await?;
//! let q = Rc::new(IoQueue::connect(ctrl.info(), 1, 32).await?); // any reactor
//! let mut b = buffer_pool().alloc(4096).ok_or(HostError::NoBuffer)?;
//! b.fill(7);
//! q.write(1, 0, b.freeze()).await?;                  // NSID 1, LBA 0
//! let buf = buffer_pool().alloc(4096).ok_or(HostError::NoBuffer)?;
//! let (r, buf) = q.read(1, 0, 8, buf).await;         // 8 blocks of 512 B
//! ```
//!
//! Modules: [`controller`] (connect sequence, admin commands, discovery,
//! keep-alive), [`io`] (NVM I/O commands), [`parse`] (Identify and Discovery
//! log decoders), [`error`]; the queue pair engine is private (`queue`).

pub mod controller;
pub mod error;
pub mod io;
pub mod parse;
mod queue;

pub use queue::QueueStats;

pub use controller::{host_id_for, ConnectOptions, Controller, ControllerInfo};
pub use error::{HostError, StatusKind};
pub use io::IoQueue;
pub use parse::{ControllerData, DiscoveryLog, DiscoveryLogEntry, NamespaceData};
