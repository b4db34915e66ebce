//! mirrorpoint-bench: load generators for mirrorpoint volumes and front ends.
//!
//! A library with a thin binary on top, so that tests can run a benchmark
//! in-process and look at the [`results::Report`] directly, and so that the
//! future network subcommands (NVMe/TCP, iSCSI) can reuse the workload,
//! histogram and output code. `local` is the bdevperf-style mode: load on a
//! volume inside this process; `nvmf` runs the same load over NVMe/TCP.
//!
//! - [`config`]: the command line and its checks;
//! - [`workload`]: offsets and read/write choice per I/O;
//! - [`driver`]: the per-core tasks and the run's timing;
//! - [`results`]: histograms, CPU and reactor counters, the report;
//! - [`nvmf`]: the NVMe/TCP session around the driver;
//! - [`targetcpu`]: the target process's CPU time from `/proc`;
//! - [`tcp`]: plain TCP throughput between two addresses (the link yardstick);
//! - [`timeline`]: latency over time and commands run at set instants;
//! - [`output`]: the text table and JSON.

pub mod config;
pub mod driver;
pub mod error;
pub mod nvmf;
pub mod output;
pub mod results;
pub mod targetcpu;
pub mod tcp;
pub mod timeline;
pub mod workload;

pub use config::{Cli, Command, LocalArgs, LocalConfig, NvmfArgs, NvmfConfig};
pub use driver::run_local;
pub use error::BenchError;
pub use nvmf::run_nvmf;
pub use results::Report;
