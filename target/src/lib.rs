//! The mirrorpoint storage target.
//!
//! Volumes and their backends, the front ends that export them (NVMe/TCP,
//! iSCSI), the JSON-RPC admin socket and the daemon that ties them together.

pub mod daemon;
pub mod iscsi;
pub mod mirror;
pub mod nvmf;
pub mod rpc;
pub mod scsi;
pub mod slots;
pub mod units;
pub mod volume;
