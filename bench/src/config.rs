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
use crate::timeline::TimelineConfig;
use clap::{Args, Parser, Subcommand, ValueEnum};
use mirrorpoint_poller::DiskSubmit;
use serde::Serialize;
use std::net::{SocketAddr, ToSocketAddrs};
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

/// The subcommands; iSCSI will join `local` and `nvmf`.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// bdevperf-style load on a volume inside this process.
    Local(LocalArgs),
    /// The same load on a namespace over NVMe/TCP, with our userspace initiator.
    Nvmf(NvmfArgs),
    /// Plain TCP throughput between two addresses (the yardstick of the mirror goals).
    Tcp(crate::tcp::TcpArgs),
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

/// Latency-over-time options both subcommands share.
#[derive(Debug, Clone, Default, Args)]
pub struct TimelineArgs {
    /// Keep every measured I/O and report latency per time bucket of this
    /// many milliseconds (fractions allowed).
    #[arg(long)]
    pub timeline_ms: Option<f64>,
    /// Write the latency timeline as an SVG plot to this file (buckets of
    /// --timeline-ms, 10 ms unless given).
    #[arg(long)]
    pub timeline_svg: Option<PathBuf>,
    /// Run a shell command at a second of the measured window, given as
    /// SECONDS:COMMAND (repeatable); its duration and the latency around it
    /// are reported.
    #[arg(long = "event", value_parser = crate::timeline::parse_event)]
    pub events: Vec<crate::timeline::EventSpec>,
    /// Milliseconds before an event's start and after its end whose I/Os
    /// count as "around" it.
    #[arg(long, default_value_t = 100.0)]
    pub event_window_ms: f64,
}

impl TimelineArgs {
    /// The checked request, if any of the options asks for a timeline.
    fn validate(&self) -> Result<Option<TimelineConfig>, BenchError> {
        let invalid = |m: String| Err(BenchError::InvalidArgument(m));
        if self.timeline_ms.is_none() && self.timeline_svg.is_none() && self.events.is_empty() {
            return Ok(None);
        }
        let bucket = match self.timeline_ms {
            None => crate::timeline::DEFAULT_BUCKET,
            Some(ms) if (0.1..=60_000.0).contains(&ms) => Duration::from_secs_f64(ms / 1e3),
            Some(ms) => return invalid(format!("--timeline-ms {ms}: must be 0.1 to 60000")),
        };
        let w = self.event_window_ms;
        if !w.is_finite() || !(0.0..=60_000.0).contains(&w) {
            return invalid(format!("--event-window-ms {w}: must be 0 to 60000"));
        }
        Ok(Some(TimelineConfig {
            bucket,
            svg: self.timeline_svg.clone(),
            events: self.events.clone(),
            window: Duration::from_secs_f64(w / 1e3),
        }))
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
    /// When the reactors hand disk requests to the kernel: `immediate` (one
    /// io_uring_enter per request, the default) or `per-turn` (batched with
    /// everything else a loop turn queued).
    #[arg(long, default_value_t = DiskSubmit::Immediate)]
    pub disk_submit: DiskSubmit,
    /// Latency over time and timed events.
    #[command(flatten)]
    pub timeline: TimelineArgs,
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
            disk_submit: DiskSubmit::Immediate,
            timeline: TimelineArgs::default(),
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
    /// When disk requests reach the kernel.
    pub disk_submit: DiskSubmit,
    /// Latency over time and timed events, if asked for.
    pub timeline: Option<TimelineConfig>,
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
        let load = load_config(LoadArgs {
            workload: self.workload,
            rwmixread: self.rwmixread,
            bs: self.bs,
            qd: self.qd,
            cores: &self.cores,
            time: self.time,
            ramp: self.ramp,
            busy_poll: self.busy_poll,
            idle_timeout_us: self.idle_timeout_us,
            chunk_size: self.chunk_size,
            timeline: &self.timeline,
        })?;
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
        Ok(LocalConfig {
            backend: self.backend,
            file: self.file.clone(),
            size,
            block_size: self.block_size,
            workload: load.workload,
            read_percent: load.read_percent,
            bs: load.bs,
            qd: load.qd,
            cores: load.cores,
            time: load.time,
            ramp: load.ramp,
            busy_poll: load.busy_poll,
            idle_timeout: load.idle_timeout,
            chunk_size: load.chunk_size,
            disk_submit: self.disk_submit,
            timeline: load.timeline,
        })
    }
}

/// What the driver needs of any run: the load and the reactors it runs on.
#[derive(Debug, Clone)]
pub struct LoadConfig {
    /// I/O pattern.
    pub workload: Workload,
    /// Percentage of reads.
    pub read_percent: u8,
    /// Bytes per I/O.
    pub bs: u64,
    /// I/Os in flight per core (`local`) or per connection (`nvmf`).
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
    /// Latency over time and timed events, if asked for.
    pub timeline: Option<TimelineConfig>,
}

/// Host NQN the benchmark connects as unless `--hostnqn` says otherwise.
pub const DEFAULT_HOSTNQN: &str =
    "nqn.2014-08.org.nvmexpress:uuid:6d6972726f72-706f696e742d62656e6368";
/// Most NVMe/TCP I/O queues one run opens.
pub const MAX_CONNECTIONS: usize = 64;
/// Deepest NVMe/TCP I/O queue (the initiator's SQ is one entry larger).
pub const MAX_NVMF_QD: usize = 1024;

/// Arguments of `mirrorpoint-bench nvmf`, as typed.
#[derive(Debug, Clone, Args)]
pub struct NvmfArgs {
    /// Target address (IPv4 or [IPv6] with port).
    #[arg(long, default_value = "127.0.0.1:4420")]
    pub addr: String,
    /// Subsystem NQN.
    #[arg(long)]
    pub nqn: String,
    /// Namespace ID to drive.
    #[arg(long, default_value_t = 1)]
    pub nsid: u32,
    /// Host NQN to connect as.
    #[arg(long, default_value = DEFAULT_HOSTNQN)]
    pub hostnqn: String,
    /// I/O pattern.
    #[arg(long, value_enum, default_value_t = Workload::Randread)]
    pub workload: Workload,
    /// Percentage of reads in rw/randrw.
    #[arg(long)]
    pub rwmixread: Option<u8>,
    /// Bytes per I/O (K/M suffixes allowed).
    #[arg(long, default_value = "4K", value_parser = parse_size)]
    pub bs: u64,
    /// I/Os in flight per connection (I/O queue).
    #[arg(long, default_value_t = 1)]
    pub qd: usize,
    /// I/O queues (one TCP connection each), spread round-robin over --cores.
    #[arg(long, default_value_t = 1)]
    pub connections: usize,
    /// CPUs to run the bench's reactors on: a list like 0 or 0,1 or 0-3.
    #[arg(long, default_value = "0")]
    pub cores: String,
    /// Measured seconds (fractions allowed).
    #[arg(long, default_value_t = 10.0)]
    pub time: f64,
    /// Seconds of load before measuring starts (fractions allowed).
    #[arg(long, default_value_t = 0.0)]
    pub ramp: f64,
    /// Ask for header digests (CRC32C on every PDU header).
    #[arg(long)]
    pub header_digest: bool,
    /// Ask for data digests (CRC32C on every data PDU).
    #[arg(long)]
    pub data_digest: bool,
    /// Connect I/O queues with SQ flow control disabled, so the target may
    /// end a read with a SUCCESS-flagged C2HData instead of a separate
    /// response capsule (SPDK hosts do this; Linux never does).
    #[arg(long)]
    pub no_sq_flow_control: bool,
    /// The bench's reactors spin instead of blocking in the ring when idle.
    #[arg(long)]
    pub busy_poll: bool,
    /// Microseconds the bench's reactors spin without work before blocking.
    #[arg(long)]
    pub idle_timeout_us: Option<u64>,
    /// Pool chunk size in bytes (largest single I/O); K/M suffixes allowed.
    #[arg(long, default_value = "128K", value_parser = parse_size)]
    pub chunk_size: u64,
    /// Process ID of the target: its CPU time over the measured window is
    /// read from /proc/PID/stat (and per thread from /proc/PID/task).
    #[arg(long)]
    pub target_pid: Option<u32>,
    /// The target's admin (JSON-RPC) socket: its reactors' own busy time
    /// (`framework_get_reactors` busy_ns) over the measured window is
    /// reported per I/O, beside the process accounting of `--target-pid`.
    #[arg(long, value_name = "SOCKET")]
    pub target_rpc: Option<std::path::PathBuf>,
    /// Latency over time and timed events.
    #[command(flatten)]
    pub timeline: TimelineArgs,
    /// Print one JSON object instead of the table.
    #[arg(long)]
    pub json: bool,
}

impl NvmfArgs {
    /// Arguments with the defaults, for `nqn` at `addr`.
    pub fn new(addr: &str, nqn: &str) -> NvmfArgs {
        NvmfArgs {
            addr: addr.into(),
            nqn: nqn.into(),
            nsid: 1,
            hostnqn: DEFAULT_HOSTNQN.into(),
            workload: Workload::Randread,
            rwmixread: None,
            bs: 4096,
            qd: 1,
            connections: 1,
            cores: "0".into(),
            time: 10.0,
            ramp: 0.0,
            header_digest: false,
            data_digest: false,
            no_sq_flow_control: false,
            busy_poll: false,
            idle_timeout_us: None,
            chunk_size: DEFAULT_CHUNK_SIZE,
            target_pid: None,
            target_rpc: None,
            timeline: TimelineArgs::default(),
            json: false,
        }
    }

    /// Checks the arguments against each other.
    pub fn validate(&self) -> Result<NvmfConfig, BenchError> {
        let invalid = |m: String| Err(BenchError::InvalidArgument(m));
        let addr = match self.addr.to_socket_addrs().map(|mut a| a.next()) {
            Ok(Some(a)) => a,
            _ => return invalid(format!("--addr '{}': not an address:port", self.addr)),
        };
        if self.nqn.trim().is_empty() {
            return invalid("--nqn must not be empty".into());
        }
        if self.nsid == 0 || self.nsid == u32::MAX {
            return invalid(format!("--nsid {}: not a valid namespace ID", self.nsid));
        }
        if self.connections == 0 || self.connections > MAX_CONNECTIONS {
            return invalid(format!(
                "--connections {}: must be between 1 and {MAX_CONNECTIONS}",
                self.connections
            ));
        }
        if self.qd == 0 || self.qd > MAX_NVMF_QD {
            return invalid(format!(
                "--qd {}: must be between 1 and {MAX_NVMF_QD}",
                self.qd
            ));
        }
        let load = load_config(LoadArgs {
            workload: self.workload,
            rwmixread: self.rwmixread,
            bs: self.bs,
            qd: self.qd,
            cores: &self.cores,
            time: self.time,
            ramp: self.ramp,
            busy_poll: self.busy_poll,
            idle_timeout_us: self.idle_timeout_us,
            chunk_size: self.chunk_size,
            timeline: &self.timeline,
        })?;
        if self.bs % 512 != 0 {
            return invalid(format!("--bs {} is not a multiple of 512", self.bs));
        }
        if let Some(pid) = self.target_pid {
            if !std::path::Path::new(&format!("/proc/{pid}/stat")).exists() {
                return invalid(format!("--target-pid {pid}: no such process"));
            }
        }
        if let Some(sock) = &self.target_rpc {
            if !sock.exists() {
                return invalid(format!("--target-rpc {}: no such socket", sock.display()));
            }
        }
        Ok(NvmfConfig {
            addr,
            nqn: self.nqn.clone(),
            nsid: self.nsid,
            hostnqn: self.hostnqn.clone(),
            connections: self.connections,
            header_digest: self.header_digest,
            data_digest: self.data_digest,
            no_sq_flow_control: self.no_sq_flow_control,
            target_pid: self.target_pid,
            target_rpc: self.target_rpc.clone(),
            load,
        })
    }
}

/// A checked `nvmf` run.
#[derive(Debug, Clone)]
pub struct NvmfConfig {
    /// Target address.
    pub addr: SocketAddr,
    /// Subsystem NQN.
    pub nqn: String,
    /// Namespace driven.
    pub nsid: u32,
    /// Host NQN.
    pub hostnqn: String,
    /// I/O queues (TCP connections).
    pub connections: usize,
    /// Header digests asked for.
    pub header_digest: bool,
    /// Data digests asked for.
    pub data_digest: bool,
    /// I/O queues connect without SQ flow control.
    pub no_sq_flow_control: bool,
    /// Target process whose CPU time is measured.
    pub target_pid: Option<u32>,
    /// Target admin socket whose reactor counters are read.
    pub target_rpc: Option<std::path::PathBuf>,
    /// The load (`qd` is per connection).
    pub load: LoadConfig,
}

/// The load arguments both subcommands share, as typed.
struct LoadArgs<'a> {
    workload: Workload,
    rwmixread: Option<u8>,
    bs: u64,
    qd: usize,
    cores: &'a str,
    time: f64,
    ramp: f64,
    busy_poll: bool,
    idle_timeout_us: Option<u64>,
    chunk_size: u64,
    timeline: &'a TimelineArgs,
}

/// Checks of the load arguments both subcommands share.
fn load_config(a: LoadArgs<'_>) -> Result<LoadConfig, BenchError> {
    let invalid = |m: String| Err(BenchError::InvalidArgument(m));
    let chunk = a.chunk_size;
    if chunk == 0 || chunk % 4096 != 0 || chunk > (16 << 20) {
        return invalid(format!(
            "--chunk-size {chunk}: must be a non-zero multiple of 4096 up to 16M"
        ));
    }
    if a.bs == 0 {
        return invalid("--bs must be more than 0".into());
    }
    if a.bs > chunk {
        return invalid(format!(
            "--bs {} is larger than the pool chunk size {chunk} (the largest single I/O)",
            a.bs
        ));
    }
    let read_percent = match (a.workload.is_mixed(), a.rwmixread) {
        (true, Some(p)) if p > 100 => {
            return invalid(format!("--rwmixread {p}: must be between 0 and 100"))
        }
        (true, p) => p.unwrap_or(50),
        (false, Some(_)) => {
            return invalid(format!(
                "--rwmixread applies to rw and randrw, not {}",
                a.workload.name()
            ))
        }
        (false, None) => a.workload.read_percent(0),
    };
    let cores = parse_cores(a.cores).map_err(BenchError::InvalidArgument)?;
    let time = seconds("time", a.time, false)?;
    let timeline = a.timeline.validate()?;
    if let Some(t) = &timeline {
        t.check(time)?;
    }
    Ok(LoadConfig {
        workload: a.workload,
        read_percent,
        bs: a.bs,
        qd: a.qd,
        cores,
        time,
        ramp: seconds("ramp", a.ramp, true)?,
        busy_poll: a.busy_poll,
        idle_timeout: match a.idle_timeout_us {
            Some(us) if us > 10_000_000 => {
                return invalid(format!("--idle-timeout-us {us}: at most 10000000"))
            }
            Some(_) if a.busy_poll => {
                return invalid("--idle-timeout-us has no effect with --busy-poll".into())
            }
            us => us.map(Duration::from_micros),
        },
        chunk_size: chunk as usize,
        timeline,
    })
}

impl LocalConfig {
    /// The load part of the run, for the driver.
    pub fn load(&self) -> LoadConfig {
        LoadConfig {
            workload: self.workload,
            read_percent: self.read_percent,
            bs: self.bs,
            qd: self.qd,
            cores: self.cores.clone(),
            time: self.time,
            ramp: self.ramp,
            busy_poll: self.busy_poll,
            idle_timeout: self.idle_timeout,
            chunk_size: self.chunk_size,
            timeline: self.timeline.clone(),
        }
    }

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
