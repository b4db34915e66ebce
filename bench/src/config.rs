//! Command line and run configuration.
//!
//! The CLI speaks fio's vocabulary (`--rw`-style workload names, `--bs`,
//! `--rwmixread`, sizes with K/M/G suffixes) so that a fio job and a
//! mirrorpoint-bench run can be written side by side. Parsing (clap) and
//! checking are kept apart: [`LocalArgs`] is what the user typed,
//! [`LocalConfig`] is a run that is known to make sense, built by
//! [`LocalArgs::validate`] with one clear error per mistake. Checks that need
//! the volume (its block size when the file decides it, its size) are done by
//! [`LocalConfig::check_geometry`] once the volume exists.

use crate::error::BenchError;
use clap::{Args, Parser, Subcommand, ValueEnum};
use serde::Serialize;
use std::path::PathBuf;
use std::time::Duration;

/// Largest queue depth per core: the uring volume's per-core limit.
pub const MAX_QD: usize = 4096;
/// Pool chunk size used unless `--chunk-size` says otherwise: the target's default.
pub const DEFAULT_CHUNK_SIZE: u64 = 128 * 1024;
/// Malloc volume size unless `--size` says otherwise.
pub const DEFAULT_MALLOC_SIZE: u64 = 256 << 20;

/// mirrorpoint-bench: load generators for mirrorpoint volumes and front ends.
#[derive(Debug, Parser)]
#[command(name = "mirrorpoint-bench", version, about)]
pub struct Cli {
    /// What to drive.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands; network front ends (NVMe/TCP, iSCSI) will join `local`.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// bdevperf-style load on a volume inside this process.
    Local(LocalArgs),
}

/// The backend of the volume under test.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendKind {
    /// A file or block device through io_uring (O_DIRECT where possible).
    Uring,
    /// RAM.
    Malloc,
}

/// The I/O pattern, with fio's names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Workload {
    /// Sequential reads.
    Read,
    /// Sequential writes.
    Write,
    /// Uniformly random reads.
    Randread,
    /// Uniformly random writes.
    Randwrite,
    /// Sequential mix of reads and writes (`--rwmixread`).
    Rw,
    /// Random mix of reads and writes (`--rwmixread`).
    Randrw,
}

impl Workload {
    /// Offsets are uniformly random rather than sequential.
    pub fn is_random(self) -> bool {
        matches!(
            self,
            Workload::Randread | Workload::Randwrite | Workload::Randrw
        )
    }

    /// Reads and writes are mixed.
    pub fn is_mixed(self) -> bool {
        matches!(self, Workload::Rw | Workload::Randrw)
    }

    /// Percentage of I/Os that are reads, given the mix for mixed workloads.
    pub fn read_percent(self, rwmixread: u8) -> u8 {
        match self {
            Workload::Read | Workload::Randread => 100,
            Workload::Write | Workload::Randwrite => 0,
            Workload::Rw | Workload::Randrw => rwmixread,
        }
    }

    /// fio's name of the workload.
    pub fn name(self) -> &'static str {
        match self {
            Workload::Read => "read",
            Workload::Write => "write",
            Workload::Randread => "randread",
            Workload::Randwrite => "randwrite",
            Workload::Rw => "rw",
            Workload::Randrw => "randrw",
        }
    }
}

/// Arguments of `mirrorpoint-bench local`, as typed.
#[derive(Debug, Clone, Args)]
pub struct LocalArgs {
    /// Volume backend.
    #[arg(long, value_enum, default_value_t = BackendKind::Uring)]
    pub backend: BackendKind,
    /// File or block device (uring backend).
    #[arg(long)]
    pub file: Option<PathBuf>,
    /// Volume size (malloc), or size to create/extend the file to (uring);
    /// accepts K/M/G/T suffixes (powers of 1024).
    #[arg(long, value_parser = parse_size)]
    pub size: Option<u64>,
    /// Logical block size of the volume (default: 512 for malloc, the device's for uring).
    #[arg(long)]
    pub block_size: Option<u32>,
    /// I/O pattern.
    #[arg(long, value_enum, default_value_t = Workload::Randread)]
    pub workload: Workload,
    /// Percentage of reads in rw/randrw.
    #[arg(long)]
    pub rwmixread: Option<u8>,
    /// Bytes per I/O (K/M suffixes allowed).
    #[arg(long, default_value = "4K", value_parser = parse_size)]
    pub bs: u64,
    /// I/Os in flight per core.
    #[arg(long, default_value_t = 1)]
    pub qd: usize,
    /// CPUs to run reactors on: a list like 0 or 0,1 or 0-3.
    #[arg(long, default_value = "0")]
    pub cores: String,
    /// Measured seconds (fractions allowed).
    #[arg(long, default_value_t = 10.0)]
    pub time: f64,
    /// Seconds of load before measuring starts (fractions allowed).
    #[arg(long, default_value_t = 0.0)]
    pub ramp: f64,
    /// Reactors spin instead of blocking in the ring when idle.
    #[arg(long)]
    pub busy_poll: bool,
    /// Microseconds a reactor spins without work before it blocks in the ring
    /// (ignored with --busy-poll); default: the runtime's default.
    #[arg(long)]
    pub idle_timeout_us: Option<u64>,
    /// Pool chunk size in bytes (largest single I/O); K/M suffixes allowed.
    #[arg(long, default_value = "128K", value_parser = parse_size)]
    pub chunk_size: u64,
    /// Print one JSON object instead of the table.
    #[arg(long)]
    pub json: bool,
}

impl Default for LocalArgs {
    fn default() -> Self {
        LocalArgs {
            backend: BackendKind::Uring,
            file: None,
            size: None,
            block_size: None,
            workload: Workload::Randread,
            rwmixread: None,
            bs: 4096,
            qd: 1,
            cores: "0".into(),
            time: 10.0,
            ramp: 0.0,
            busy_poll: false,
            idle_timeout_us: None,
            chunk_size: DEFAULT_CHUNK_SIZE,
            json: false,
        }
    }
}

/// A checked `local` run.
#[derive(Debug, Clone)]
pub struct LocalConfig {
    /// Volume backend.
    pub backend: BackendKind,
    /// Backing file (uring only).
    pub file: Option<PathBuf>,
    /// Size to make the volume (malloc) or the file (uring, if given).
    pub size: Option<u64>,
    /// Requested logical block size.
    pub block_size: Option<u32>,
    /// I/O pattern.
    pub workload: Workload,
    /// Percentage of reads (100 for read-only, 0 for write-only workloads).
    pub read_percent: u8,
    /// Bytes per I/O.
    pub bs: u64,
    /// I/Os in flight per core.
    pub qd: usize,
    /// CPU ids, one reactor each, in order.
    pub cores: Vec<usize>,
    /// Measured window.
    pub time: Duration,
    /// Unmeasured warm-up before it.
    pub ramp: Duration,
    /// Reactors never block.
    pub busy_poll: bool,
    /// Spin this long without work before blocking (None: runtime default).
    pub idle_timeout: Option<Duration>,
    /// Pool chunk size.
    pub chunk_size: usize,
}

/// Parses a byte count with an optional K/M/G/T suffix (powers of 1024),
/// optionally followed by `B` or `iB` (`4k`, `4K`, `4KiB`, `1G`, `512`).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let lower = t.to_ascii_lowercase();
    let body = lower
        .strip_suffix("ib")
        .or_else(|| lower.strip_suffix('b'))
        .unwrap_or(&lower);
    let (digits, shift) = match body.chars().last() {
        Some('k') => (&body[..body.len() - 1], 10),
        Some('m') => (&body[..body.len() - 1], 20),
        Some('g') => (&body[..body.len() - 1], 30),
        Some('t') => (&body[..body.len() - 1], 40),
        _ => (body, 0),
    };
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("'{s}' is not a size (examples: 4096, 4K, 128K, 1G)"))?;
    n.checked_mul(1u64 << shift)
        .ok_or_else(|| format!("'{s}' is too large"))
}

/// Parses a CPU list: `0`, `0,1`, `0-3`, `0,2-3`.
pub fn parse_cores(s: &str) -> Result<Vec<usize>, String> {
    let mut out = Vec::new();
    for part in s.split(',').map(str::trim) {
        if part.is_empty() {
            return Err(format!("--cores '{s}': empty entry"));
        }
        let bad = || format!("--cores '{s}': '{part}' is not a CPU id or range like 0-3");
        match part.split_once('-') {
            Some((a, b)) => {
                let a: usize = a.trim().parse().map_err(|_| bad())?;
                let b: usize = b.trim().parse().map_err(|_| bad())?;
                if a > b {
                    return Err(bad());
                }
                out.extend(a..=b);
            }
            None => out.push(part.parse().map_err(|_| bad())?),
        }
    }
    let mut sorted = out.clone();
    sorted.sort_unstable();
    if let Some(w) = sorted.windows(2).find(|w| w[0] == w[1]) {
        return Err(format!("--cores '{s}': CPU {} listed twice", w[0]));
    }
    Ok(out)
}

fn seconds(name: &str, v: f64, allow_zero: bool) -> Result<Duration, BenchError> {
    let ok = v.is_finite() && (v > 0.0 || (allow_zero && v == 0.0)) && v <= 86_400.0;
    if !ok {
        let range = if allow_zero { "0" } else { "more than 0" };
        return Err(BenchError::InvalidArgument(format!(
            "--{name} {v}: must be {range} and at most 86400 seconds"
        )));
    }
    Ok(Duration::from_secs_f64(v))
}

impl LocalArgs {
    /// Checks the arguments against each other.
    pub fn validate(&self) -> Result<LocalConfig, BenchError> {
        let invalid = |m: String| Err(BenchError::InvalidArgument(m));
        match (self.backend, &self.file) {
            (BackendKind::Uring, None) => {
                return invalid("--backend uring needs --file PATH".into())
            }
            (BackendKind::Malloc, Some(_)) => {
                return invalid("--file applies to --backend uring only".into())
            }
            _ => {}
        }
        if let Some(b) = self.block_size {
            if b != 512 && b != 4096 {
                return invalid(format!("--block-size {b}: must be 512 or 4096"));
            }
        }
        let chunk = self.chunk_size;
        if chunk == 0 || chunk % 4096 != 0 || chunk > (16 << 20) {
            return invalid(format!(
                "--chunk-size {chunk}: must be a non-zero multiple of 4096 up to 16M"
            ));
        }
        if self.bs == 0 {
            return invalid("--bs must be more than 0".into());
        }
        if self.bs > chunk {
            return invalid(format!(
                "--bs {} is larger than the pool chunk size {chunk} (the largest single I/O)",
                self.bs
            ));
        }
        let block = u64::from(self.block_size.unwrap_or(512));
        if self.bs % block != 0 {
            return invalid(format!(
                "--bs {} is not a multiple of the {block}-byte block size",
                self.bs
            ));
        }
        if self.qd == 0 || self.qd > MAX_QD {
            return invalid(format!("--qd {}: must be between 1 and {MAX_QD}", self.qd));
        }
        let read_percent = match (self.workload.is_mixed(), self.rwmixread) {
            (true, Some(p)) if p > 100 => {
                return invalid(format!("--rwmixread {p}: must be between 0 and 100"))
            }
            (true, p) => p.unwrap_or(50),
            (false, Some(_)) => {
                return invalid(format!(
                    "--rwmixread applies to rw and randrw, not {}",
                    self.workload.name()
                ))
            }
            (false, None) => self.workload.read_percent(0),
        };
        let size = match (self.backend, self.size) {
            (BackendKind::Malloc, None) => Some(DEFAULT_MALLOC_SIZE),
            (_, s) => s,
        };
        if let Some(s) = size {
            if s < self.bs {
                return invalid(format!("--size {s} is smaller than --bs {}", self.bs));
            }
            if s % block != 0 {
                return invalid(format!(
                    "--size {s} is not a multiple of the {block}-byte block size"
                ));
            }
        }
        let cores = parse_cores(&self.cores).map_err(BenchError::InvalidArgument)?;
        Ok(LocalConfig {
            backend: self.backend,
            file: self.file.clone(),
            size,
            block_size: self.block_size,
            workload: self.workload,
            read_percent,
            bs: self.bs,
            qd: self.qd,
            cores,
            time: seconds("time", self.time, false)?,
            ramp: seconds("ramp", self.ramp, true)?,
            busy_poll: self.busy_poll,
            idle_timeout: match self.idle_timeout_us {
                Some(us) if us > 10_000_000 => {
                    return invalid(format!("--idle-timeout-us {us}: at most 10000000"))
                }
                Some(_) if self.busy_poll => {
                    return invalid("--idle-timeout-us has no effect with --busy-poll".into())
                }
                us => us.map(Duration::from_micros),
            },
            chunk_size: chunk as usize,
        })
    }
}

impl LocalConfig {
    /// Checks the I/O size against the volume as created: `bs` must be a
    /// multiple of its block size and fit in it at least once.
    pub fn check_geometry(&self, block_size: u32, volume_bytes: u64) -> Result<(), BenchError> {
        if self.bs % u64::from(block_size) != 0 {
            return Err(BenchError::InvalidArgument(format!(
                "--bs {} is not a multiple of the volume's {block_size}-byte block size",
                self.bs
            )));
        }
        if volume_bytes < self.bs {
            return Err(BenchError::InvalidArgument(format!(
                "the volume holds {volume_bytes} bytes, less than one --bs {} I/O",
                self.bs
            )));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("4k"), Ok(4096));
        assert_eq!(parse_size("4KiB"), Ok(4096));
        assert_eq!(parse_size("128K"), Ok(128 << 10));
        assert_eq!(parse_size("1G"), Ok(1 << 30));
        assert_eq!(parse_size("2MB"), Ok(2 << 20));
        assert!(parse_size("x").is_err());
        assert!(parse_size("-1").is_err());
        assert!(parse_size("99999999999T").is_err());
    }

    #[test]
    fn cores() {
        assert_eq!(parse_cores("0"), Ok(vec![0]));
        assert_eq!(parse_cores("0,1"), Ok(vec![0, 1]));
        assert_eq!(parse_cores("2,0-1"), Ok(vec![2, 0, 1]));
        assert!(parse_cores("0,0").is_err());
        assert!(parse_cores("").is_err());
        assert!(parse_cores("3-1").is_err());
        assert!(parse_cores("a").is_err());
    }

    fn malloc() -> LocalArgs {
        LocalArgs {
            backend: BackendKind::Malloc,
            ..LocalArgs::default()
        }
    }

    #[test]
    fn rejects_inconsistent_arguments() {
        let cases = [
            LocalArgs::default(), // uring without --file
            LocalArgs {
                bs: 1000,
                ..malloc()
            },
            LocalArgs {
                bs: 256 << 10,
                ..malloc()
            },
            LocalArgs { qd: 0, ..malloc() },
            LocalArgs {
                block_size: Some(1024),
                ..malloc()
            },
            LocalArgs {
                bs: 512,
                block_size: Some(4096),
                ..malloc()
            },
            LocalArgs {
                size: Some(2048),
                ..malloc()
            },
            LocalArgs {
                rwmixread: Some(70),
                ..malloc()
            },
            LocalArgs {
                workload: Workload::Randrw,
                rwmixread: Some(101),
                ..malloc()
            },
            LocalArgs {
                time: 0.0,
                ..malloc()
            },
            LocalArgs {
                ramp: -1.0,
                ..malloc()
            },
            LocalArgs {
                time: f64::NAN,
                ..malloc()
            },
        ];
        for args in cases {
            assert!(
                matches!(args.validate(), Err(BenchError::InvalidArgument(_))),
                "{args:?}"
            );
        }
    }

    #[test]
    fn defaults_and_mixes() {
        let c = malloc().validate().expect("valid");
        assert_eq!(c.size, Some(DEFAULT_MALLOC_SIZE));
        assert_eq!(c.read_percent, 100);
        let c = LocalArgs {
            workload: Workload::Randrw,
            ..malloc()
        }
        .validate()
        .expect("valid");
        assert_eq!(c.read_percent, 50);
        let c = LocalArgs {
            workload: Workload::Write,
            ..malloc()
        }
        .validate()
        .expect("valid");
        assert_eq!(c.read_percent, 0);
        assert!(c.check_geometry(4096, 1 << 20).is_ok());
        assert!(c.check_geometry(4096, 2048).is_err());
        let c = LocalArgs {
            bs: 512,
            ..malloc()
        }
        .validate()
        .expect("valid");
        assert!(c.check_geometry(4096, 1 << 20).is_err());
    }
}
