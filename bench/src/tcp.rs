//! `mirrorpoint-bench tcp`: the machine's TCP throughput between two addresses.
//!
//! The mirror goals are stated against "the loopback TCP throughput measured
//! in the same run": a mirrored sequential write or a resync cannot beat the
//! link, so the link is the yardstick. This is a plain iperf-style
//! measurement with kernel sockets on threads (no reactor, no protocol):
//! `--streams` connections to `--to`, each sender writing
//! `--bs`-byte buffers as fast as the kernel takes them, each receiver
//! reading into a 1 MiB buffer. Bytes are counted on the receiving side
//! between the end of the ramp and the end of the measured window, so
//! data still in socket buffers is not counted as delivered.

use crate::config::parse_cores;
use crate::error::BenchError;
use clap::Args;
use serde::Serialize;
use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Arguments of `mirrorpoint-bench tcp`.
#[derive(Debug, Clone, Args)]
pub struct TcpArgs {
    /// Address the receivers listen on (an ephemeral port is picked).
    #[arg(long, default_value = "127.0.0.3")]
    pub to: IpAddr,
    /// Parallel connections.
    #[arg(long, default_value_t = 1)]
    pub streams: usize,
    /// Bytes per send (K/M suffixes allowed).
    #[arg(long, default_value = "128K", value_parser = crate::config::parse_size)]
    pub bs: u64,
    /// Measured seconds.
    #[arg(long, default_value_t = 5.0)]
    pub time: f64,
    /// Seconds before measuring.
    #[arg(long, default_value_t = 0.5)]
    pub ramp: f64,
    /// Pin the sending threads to these CPUs (round-robin).
    #[arg(long)]
    pub sender_cores: Option<String>,
    /// Pin the receiving threads to these CPUs (round-robin).
    #[arg(long)]
    pub receiver_cores: Option<String>,
    /// Listen in this network namespace (`ip netns` name): the receivers
    /// sit on the far side of a link the bench scripts emulate (a veth pair
    /// shaped with `tc`), the senders in the caller's namespace.
    #[arg(long)]
    pub netns: Option<String>,
    /// Print one JSON object instead of a line.
    #[arg(long)]
    pub json: bool,
}

/// What a `tcp` run measured.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct TcpReport {
    /// Always "tcp".
    pub mode: &'static str,
    /// Receiver address.
    pub to: String,
    /// Connections.
    pub streams: usize,
    /// Bytes per send.
    pub bs: u64,
    /// Measured seconds.
    pub time_s: f64,
    /// Bytes received in the window.
    pub bytes: u64,
    /// Throughput in MiB/s.
    pub mib_s: f64,
}

fn pin(cores: &Option<Vec<usize>>, i: usize) {
    let Some(list) = cores else { return };
    if list.is_empty() {
        return;
    }
    let cpu = list[i % list.len()];
    // SAFETY: an all-zero cpu_set_t is the empty set; CPU_SET writes a bit
    // inside it; sched_setaffinity(0) applies it to this thread.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
    }
}

fn io_err(what: &str, e: std::io::Error) -> BenchError {
    BenchError::Tcp(format!("{what}: {e}"))
}

/// Binds a listener inside the network namespace `ns` (`/var/run/netns/NS`,
/// as `ip netns add` makes it). `setns` moves only the calling thread, so a
/// short-lived thread enters the namespace and binds; the socket keeps
/// belonging to that namespace wherever it is used from afterwards.
fn bind_in_netns(ns: &str, addr: SocketAddr) -> Result<TcpListener, BenchError> {
    if ns.is_empty() || ns.contains('/') || ns.starts_with('.') {
        return Err(BenchError::InvalidArgument(format!(
            "--netns {ns:?}: an `ip netns` name, not a path"
        )));
    }
    let path = std::path::Path::new("/var/run/netns").join(ns);
    let file = std::fs::File::open(&path).map_err(|e| {
        BenchError::InvalidArgument(format!("--netns {ns}: {}: {e}", path.display()))
    })?;
    std::thread::spawn(move || {
        use std::os::fd::AsRawFd;
        // SAFETY: setns(2) on a namespace descriptor we hold open; it only
        // changes this thread's network namespace, which ends with it.
        if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            return Err(io_err("setns", std::io::Error::last_os_error()));
        }
        TcpListener::bind(addr).map_err(|e| io_err("listen", e))
    })
    .join()
    .map_err(|_| BenchError::Tcp("the namespace thread panicked".into()))?
}

/// Runs `mirrorpoint-bench tcp`.
pub fn run_tcp(a: &TcpArgs) -> Result<TcpReport, BenchError> {
    let invalid = |m: String| Err(BenchError::InvalidArgument(m));
    if a.streams == 0 || a.streams > 64 {
        return invalid(format!("--streams {}: must be 1 to 64", a.streams));
    }
    if a.bs == 0 || a.bs > (64 << 20) {
        return invalid(format!("--bs {}: must be 1 byte to 64 MiB", a.bs));
    }
    if !(a.time.is_finite() && a.time > 0.0 && a.time <= 3600.0) {
        return invalid(format!(
            "--time {}: must be more than 0, at most 3600",
            a.time
        ));
    }
    if !(a.ramp.is_finite() && (0.0..=600.0).contains(&a.ramp)) {
        return invalid(format!("--ramp {}: must be 0 to 600", a.ramp));
    }
    let cores = |s: &Option<String>| -> Result<Option<Vec<usize>>, BenchError> {
        s.as_deref()
            .map(parse_cores)
            .transpose()
            .map_err(BenchError::InvalidArgument)
    };
    let (send_cores, recv_cores) = (cores(&a.sender_cores)?, cores(&a.receiver_cores)?);
    let addr = SocketAddr::new(a.to, 0);
    let listener = match &a.netns {
        None => TcpListener::bind(addr).map_err(|e| io_err("listen", e))?,
        Some(ns) => bind_in_netns(ns, addr)?,
    };
    let target = listener.local_addr().map_err(|e| io_err("listen", e))?;
    let received = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));

    let mut receivers = Vec::new();
    let mut senders = Vec::new();
    for i in 0..a.streams {
        let sock =
            TcpStream::connect(target).map_err(|e| io_err(&format!("connect {target}"), e))?;
        sock.set_nodelay(true).map_err(|e| io_err("nodelay", e))?;
        let (peer, _) = listener.accept().map_err(|e| io_err("accept", e))?;
        let (received, stop2, rc) = (received.clone(), stop.clone(), recv_cores.clone());
        receivers.push(std::thread::spawn(move || {
            pin(&rc, i);
            let mut peer = peer;
            let mut buf = vec![0u8; 1 << 20];
            while !stop2.load(Ordering::Relaxed) {
                match peer.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        received.fetch_add(n as u64, Ordering::Relaxed);
                    }
                }
            }
        }));
        let (stop2, sc, bs) = (stop.clone(), send_cores.clone(), a.bs as usize);
        senders.push(std::thread::spawn(move || {
            pin(&sc, i);
            let mut sock = sock;
            let buf = vec![0x5au8; bs];
            while !stop2.load(Ordering::Relaxed) {
                if sock.write_all(&buf).is_err() {
                    break;
                }
            }
            let _ = sock.shutdown(std::net::Shutdown::Both);
        }));
    }
    std::thread::sleep(Duration::from_secs_f64(a.ramp));
    let b0 = received.load(Ordering::Relaxed);
    let t0 = Instant::now();
    std::thread::sleep(Duration::from_secs_f64(a.time));
    let b1 = received.load(Ordering::Relaxed);
    let elapsed = t0.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    for t in senders.into_iter().chain(receivers) {
        let _ = t.join();
    }
    let bytes = b1 - b0;
    Ok(TcpReport {
        mode: "tcp",
        to: target.to_string(),
        streams: a.streams,
        bs: a.bs,
        time_s: elapsed,
        bytes,
        mib_s: bytes as f64 / elapsed / (1024.0 * 1024.0),
    })
}
