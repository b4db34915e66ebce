//! The `mirrorpoint` binary: `serve` runs the target, `rpc` talks to a
//! running one over its admin socket.

use clap::{Parser, Subcommand};
use mirrorpoint_poller::{DiskSubmit, PoolConfig};
use mirrorpoint_target::daemon::{Daemon, DaemonOptions, DEFAULT_DATA_DIR};
use mirrorpoint_target::rpc::{ClientError, RpcClient, DEFAULT_SOCKET_PATH};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

#[derive(Parser)]
#[command(
    name = "mirrorpoint",
    version,
    about = "Userspace block storage target with synchronous remote mirroring"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the target (built-in default configuration unless --config is given).
    Serve(ServeArgs),
    /// Call an admin method on a running target and print the result.
    Rpc(RpcArgs),
}

#[derive(clap::Args)]
struct ServeArgs {
    /// Start from this JSON configuration (as written by save_config).
    #[arg(long, short = 'c')]
    config: Option<PathBuf>,
    /// CPUs to run reactors on: "0", "0,1", "0-3" or a hex mask "0x3".
    #[arg(long, short = 'm', value_parser = parse_cores)]
    cores: Option<CoreList>,
    /// Admin socket path.
    #[arg(long, short = 'r', default_value = DEFAULT_SOCKET_PATH)]
    rpc_socket: PathBuf,
    /// Data directory of the built-in default configuration.
    #[arg(long, default_value = DEFAULT_DATA_DIR)]
    data_dir: PathBuf,
    /// Never block in the ring: spin at 100% CPU (lab benchmarks).
    #[arg(long)]
    busy_poll: bool,
    /// Spin this many microseconds without work before blocking.
    #[arg(long, default_value_t = 50)]
    idle_timeout_us: u64,
    /// When reactors hand disk requests to the kernel: `immediate` (one
    /// io_uring_enter each, as soon as queued) or `per-turn` (batched with
    /// the loop turn's other submissions).
    #[arg(long, default_value_t = DiskSubmit::Immediate)]
    disk_submit: DiskSubmit,
    /// Bytes per buffer-pool chunk (largest single I/O), multiple of 4096.
    #[arg(long, default_value_t = 128 * 1024)]
    buffer_size: usize,
    /// Buffer-pool chunks per reactor.
    #[arg(long, default_value_t = 512)]
    buffers: usize,
    /// Do not pin reactor threads to their CPUs.
    #[arg(long)]
    no_pin: bool,
    /// Where the built-in default configuration exports its volume over iSCSI.
    #[arg(long, default_value = mirrorpoint_target::daemon::DEFAULT_ISCSI_LISTEN)]
    iscsi_listen: String,
    /// Where the built-in default exports its volume over NVMe/TCP
    /// (IPv4 address:port, port 0 picks one), or "none".
    #[arg(long, default_value = mirrorpoint_target::daemon::DEFAULT_NVMF_LISTEN, value_parser = parse_listen)]
    nvmf_listen: ListenOpt,
}

/// A parsed `--nvmf-listen` value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct ListenOpt(Option<std::net::SocketAddrV4>);

fn parse_listen(s: &str) -> Result<ListenOpt, String> {
    if s.eq_ignore_ascii_case("none") {
        return Ok(ListenOpt(None));
    }
    s.parse()
        .map(|a| ListenOpt(Some(a)))
        .map_err(|_| format!("'{s}' is not an IPv4 address:port or \"none\""))
}

#[derive(clap::Args)]
struct RpcArgs {
    /// Admin socket path.
    #[arg(long, short = 's', default_value = DEFAULT_SOCKET_PATH)]
    socket: PathBuf,
    /// Seconds to wait for the answer.
    #[arg(long, default_value_t = 60)]
    timeout: u64,
    /// Method name, e.g. bdev_get_bdevs.
    method: String,
    /// Parameters as a JSON object or array.
    params: Option<String>,
}

/// A parsed `--cores` value.
#[derive(Debug, Clone, PartialEq, Eq)]
struct CoreList(Vec<usize>);

fn parse_cores(s: &str) -> Result<CoreList, String> {
    parse_core_list(s).map(CoreList)
}

fn parse_core_list(s: &str) -> Result<Vec<usize>, String> {
    let s = s.trim();
    if let Some(hex) = s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        let mask = u64::from_str_radix(hex, 16).map_err(|e| format!("bad core mask '{s}': {e}"))?;
        let cores: Vec<usize> = (0..64).filter(|i| mask & (1 << i) != 0).collect();
        return if cores.is_empty() {
            Err("core mask selects no core".into())
        } else {
            Ok(cores)
        };
    }
    let mut cores = Vec::new();
    for part in s.split(',') {
        let part = part.trim();
        let bad = |e: std::num::ParseIntError| format!("bad core '{part}': {e}");
        match part.split_once('-') {
            Some((a, b)) => {
                let (a, b): (usize, usize) = (a.parse().map_err(bad)?, b.parse().map_err(bad)?);
                if a > b || b - a > 1024 {
                    return Err(format!("bad core range '{part}'"));
                }
                cores.extend(a..=b);
            }
            None => cores.push(part.parse().map_err(bad)?),
        }
    }
    cores.sort_unstable();
    cores.dedup();
    Ok(cores)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Serve(args) => serve(args),
        Command::Rpc(args) => rpc(args),
    }
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}

/// Blocks SIGINT and SIGTERM in this thread (and so in every thread it
/// spawns later) so that `wait_for_signal` can take them synchronously.
fn block_signals() -> libc::sigset_t {
    // SAFETY: sigset_t is plain data; sigemptyset/sigaddset initialise it and
    // pthread_sigmask only reads it.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        set
    }
}

fn wait_for_signal(set: &libc::sigset_t) -> i32 {
    let mut sig: libc::c_int = 0;
    // SAFETY: `set` is initialised and `sig` is a valid out pointer.
    while unsafe { libc::sigwait(set, &mut sig) } != 0 {}
    sig
}

fn serve(args: ServeArgs) -> ExitCode {
    init_logging();
    let signals = block_signals();
    let options = DaemonOptions {
        cores: args.cores.map(|c| c.0).unwrap_or_default(),
        rpc_socket: args.rpc_socket,
        config_file: args.config,
        data_dir: args.data_dir,
        busy_poll: args.busy_poll,
        idle_timeout: Duration::from_micros(args.idle_timeout_us),
        disk_submit: args.disk_submit,
        pool: PoolConfig {
            chunk_size: args.buffer_size,
            chunk_count: args.buffers,
            huge_pages: true,
        },
        pin: !args.no_pin,
        iscsi_listen: args.iscsi_listen,
        nvmf_default_listen: args.nvmf_listen.0,
    };
    let daemon = match Daemon::start(options) {
        Ok(d) => d,
        Err(e) => {
            eprintln!("mirrorpoint: cannot start: {e}");
            return ExitCode::FAILURE;
        }
    };
    for line in &daemon.startup_report {
        println!("mirrorpoint: {line}");
    }
    println!("mirrorpoint: ready (SIGINT or SIGTERM to stop)");
    let sig = wait_for_signal(&signals);
    let name = if sig == libc::SIGINT {
        "SIGINT"
    } else {
        "SIGTERM"
    };
    println!("mirrorpoint: {name}: stopping; draining in-flight I/O");
    let synced = daemon.shutdown();
    println!("mirrorpoint: stopped cleanly, {synced} volume(s) synced");
    ExitCode::SUCCESS
}

fn rpc(args: RpcArgs) -> ExitCode {
    let params = match &args.params {
        None => None,
        Some(text) => match serde_json::from_str::<serde_json::Value>(text) {
            Ok(v @ (serde_json::Value::Object(_) | serde_json::Value::Array(_))) => Some(v),
            Ok(_) => {
                eprintln!("mirrorpoint rpc: parameters must be a JSON object or array");
                return ExitCode::from(2);
            }
            Err(e) => {
                eprintln!("mirrorpoint rpc: parameters are not valid JSON: {e}");
                return ExitCode::from(2);
            }
        },
    };
    let mut client = match RpcClient::connect(&args.socket) {
        Ok(c) => c,
        Err(e) => {
            eprintln!(
                "mirrorpoint rpc: cannot connect to {}: {e}",
                args.socket.display()
            );
            return ExitCode::from(2);
        }
    };
    client.set_timeout(Some(Duration::from_secs(args.timeout)));
    match client.call(&args.method, params) {
        Ok(v) => {
            match serde_json::to_string_pretty(&v) {
                Ok(s) => println!("{s}"),
                Err(_) => println!("{v}"),
            }
            ExitCode::SUCCESS
        }
        Err(ClientError::Rpc(e)) => {
            eprintln!("error {}: {}", e.code, e.message);
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("mirrorpoint rpc: {e}");
            ExitCode::from(2)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{parse_core_list as parse_cores, Cli};
    use clap::{CommandFactory, Parser};

    #[test]
    fn nvmf_listen_values() {
        use super::{parse_listen, ListenOpt};
        assert_eq!(parse_listen("none"), Ok(ListenOpt(None)));
        assert_eq!(
            parse_listen("127.0.0.1:4420"),
            Ok(ListenOpt(Some("127.0.0.1:4420".parse().expect("addr"))))
        );
        assert!(parse_listen("localhost:4420").is_err());
        assert!(parse_listen("127.0.0.1").is_err());
    }

    #[test]
    fn core_lists() {
        assert_eq!(parse_cores("0"), Ok(vec![0]));
        assert_eq!(parse_cores("1,0"), Ok(vec![0, 1]));
        assert_eq!(parse_cores("0-2,5"), Ok(vec![0, 1, 2, 5]));
        assert_eq!(parse_cores("0x5"), Ok(vec![0, 2]));
        assert!(parse_cores("0x0").is_err());
        assert!(parse_cores("a").is_err());
        assert!(parse_cores("3-1").is_err());
    }

    #[test]
    fn command_line_definition_is_consistent() {
        Cli::command().debug_assert();
        let cli = Cli::try_parse_from(["mirrorpoint", "serve", "--cores", "0-1", "--busy-poll"])
            .expect("parses");
        match cli.command {
            super::Command::Serve(a) => {
                assert_eq!(a.cores.map(|c| c.0), Some(vec![0, 1]));
                assert!(a.busy_poll);
            }
            super::Command::Rpc(_) => panic!("wrong subcommand"),
        }
        assert!(Cli::try_parse_from(["mirrorpoint", "serve", "--cores", "x"]).is_err());
    }
}
