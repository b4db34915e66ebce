//! The errors a benchmark run can end with.
//!
//! One enum for the whole crate so that `main` can print any failure the
//! same way (one line on stderr, exit status 2 for bad arguments and 1 for
//! failed runs) and tests can match on what went wrong rather than on text.

use mirrorpoint_poller::ReactorError;
use mirrorpoint_target::nvmf::host::HostError;
use mirrorpoint_target::volume::{CreateError, VolumeError};

/// Why a benchmark could not be set up or did not finish.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    /// An argument is out of range or inconsistent with another one.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// The reactors could not be started.
    #[error("cannot start the runtime: {0}")]
    Runtime(#[from] ReactorError),
    /// The volume could not be created.
    #[error("cannot create the volume: {0}")]
    Volume(#[from] CreateError),
    /// A reactor ran out of pool buffers while setting up its tasks.
    #[error("reactor {core}: the buffer pool has no free chunk for task {task}")]
    NoBuffer {
        /// Reactor index.
        core: usize,
        /// Task index on that reactor.
        task: usize,
    },
    /// An I/O failed during the run; the run stops at the first failure.
    #[error("I/O failed on reactor {core} ({count} error(s)); first: {first}")]
    Io {
        /// Reactor index that saw the first failure.
        core: usize,
        /// Failed I/Os on that reactor.
        count: u64,
        /// The first failure.
        first: IoFailure,
    },
    /// The NVMe/TCP controller or an I/O queue could not be brought up, or
    /// the namespace does not fit the run.
    #[error("NVMe/TCP: {0}")]
    Nvmf(String),
    /// The target's CPU time could not be read.
    #[error("target CPU: {0}")]
    TargetCpu(String),
    /// A reactor went away before reporting its results.
    #[error("reactor {0} stopped before reporting its results")]
    ReactorLost(usize),
    /// Histograms could not be created or merged.
    #[error("latency histogram: {0}")]
    Histogram(String),
    /// An `--event` command could not be started.
    #[error("event '{command}': {error}")]
    Event {
        /// The command.
        command: String,
        /// Why it did not run.
        error: std::io::Error,
    },
    /// The TCP throughput run failed.
    #[error("tcp: {0}")]
    Tcp(String),
    /// An output file could not be written.
    #[error("cannot write {path}: {error}")]
    Output {
        /// The file.
        path: std::path::PathBuf,
        /// Why.
        error: std::io::Error,
    },
}

/// One failed I/O: from a local volume or over NVMe/TCP.
#[derive(Debug, thiserror::Error)]
pub enum IoFailure {
    /// A volume channel's error.
    #[error("{0}")]
    Volume(#[from] VolumeError),
    /// The initiator's error (transport, or an NVMe status).
    #[error("{0}")]
    Nvmf(#[from] HostError),
}

impl BenchError {
    /// The process exit status for this error: 2 for bad arguments (as clap
    /// uses), 1 for everything else.
    pub fn exit_code(&self) -> i32 {
        match self {
            BenchError::InvalidArgument(_) => 2,
            _ => 1,
        }
    }
}
