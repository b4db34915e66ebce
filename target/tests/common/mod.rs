//! Helpers for the mirror tests: daemons on 127.0.0.x, a fault-injecting TCP
//! proxy between sites, polling.

#![allow(dead_code)]

use mirrorpoint_poller::PoolConfig;
use mirrorpoint_target::daemon::{Daemon, DaemonOptions};
use mirrorpoint_target::rpc::RpcClient;
use serde_json::{json, Value};
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub mod process;
mod tempdir;
pub mod two_sites;
pub mod verify;
pub mod volume;
pub use tempdir::TempDir;

pub fn options(dir: &Path) -> DaemonOptions {
    std::fs::create_dir_all(dir).expect("dir");
    DaemonOptions {
        cores: vec![0, 1],
        rpc_socket: dir.join("rpc.sock"),
        config_file: Some(write_empty_config(dir)),
        data_dir: dir.join("data"),
        pool: PoolConfig {
            chunk_size: 128 * 1024,
            chunk_count: 256,
            huge_pages: false,
        },
        pin: false,
        ..DaemonOptions::default()
    }
}

fn write_empty_config(dir: &Path) -> PathBuf {
    let p = dir.join("empty.json");
    std::fs::write(&p, r#"{"subsystems": []}"#).expect("config");
    p
}

pub struct Site {
    pub daemon: Option<Daemon>,
    pub rpc: RpcClient,
    pub dir: PathBuf,
    pub addr: SocketAddr,
}

pub const SECRET: &str = "correct horse battery staple 42";

pub fn init_logs() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("MP_LOG").unwrap_or_else(|_| "info".into()),
        )
        .with_test_writer()
        .try_init();
}

impl Site {
    /// A daemon with its site configured, listening on `ip`.
    pub fn start(dir: &Path, name: &str, domain: u32, ip: &str, master: bool) -> Site {
        init_logs();
        let daemon = Daemon::start(options(dir)).expect("daemon starts");
        let mut rpc = RpcClient::connect(dir.join("rpc.sock")).expect("rpc");
        let r = rpc
            .call(
                "agent_set_site",
                Some(json!({"name": name, "domain": domain, "listen": format!("{ip}:0"), "secret": SECRET, "master": master})),
            )
            .expect("agent_set_site");
        let addr: SocketAddr = r["listen"].as_str().unwrap().parse().unwrap();
        Site {
            daemon: Some(daemon),
            rpc,
            dir: dir.to_path_buf(),
            addr,
        }
    }

    pub fn call(&mut self, method: &str, params: Value) -> Value {
        match self.rpc.call(method, Some(params)) {
            Ok(v) => v,
            Err(e) => panic!("{method}: {e:?}"),
        }
    }

    pub fn uring(&mut self, name: &str, size: u64) -> PathBuf {
        let file = self.dir.join(format!("{name}.img"));
        self.call(
            "bdev_uring_create",
            json!({"name": name, "filename": file, "size": size, "block_size": 4096}),
        );
        file
    }

    pub fn status(&mut self, mirror: &str) -> Value {
        self.call("mirror_get_status", json!({"name": mirror}))[0].clone()
    }

    pub fn leg_state(&mut self, mirror: &str) -> String {
        self.status(mirror)["legs"][0]["state"]
            .as_str()
            .unwrap()
            .to_string()
    }

    pub fn wait_leg(&mut self, mirror: &str, state: &str, limit: Duration) {
        let t0 = Instant::now();
        loop {
            let s = self.status(mirror);
            if s["legs"][0]["state"] == state {
                return;
            }
            if t0.elapsed() > limit {
                panic!("leg never reached {state}: {s:#}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

pub fn wait_for(limit: Duration, what: &str, mut f: impl FnMut() -> bool) {
    let t0 = Instant::now();
    while !f() {
        if t0.elapsed() > limit {
            panic!("timed out waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A remote leg as files: (logical offset, len, file, file offset).
pub struct LegMap(pub Vec<(u64, u64, PathBuf, u64)>);

impl LegMap {
    /// From mirror_create's answer; `servers[id-1]` is the file of server `id`
    /// (one volume per server in these tests).
    pub fn from_create(created: &Value, servers: &[PathBuf]) -> LegMap {
        let mut v = Vec::new();
        for e in created["legs"][0]["extents"].as_array().unwrap() {
            let id = e["server"].as_u64().unwrap() as usize;
            v.push((
                e["logical_offset"].as_u64().unwrap(),
                e["len"].as_u64().unwrap(),
                servers[id - 1].clone(),
                e["device_offset"].as_u64().unwrap(),
            ));
        }
        LegMap(v)
    }

    pub fn read(&self, size: u64) -> Vec<u8> {
        let mut out = vec![0u8; size as usize];
        for (lo, len, file, off) in &self.0 {
            let mut f = std::fs::File::open(file).expect("leg file");
            use std::os::unix::fs::FileExt;
            let end = (*lo + *len).min(size);
            f.read_exact_at(&mut out[*lo as usize..end as usize], *off)
                .expect("read leg");
            let _ = f.flush();
        }
        out
    }
}

pub fn read_file(path: &Path, size: u64) -> Vec<u8> {
    let mut f = std::fs::File::open(path).expect("file");
    let mut v = vec![0u8; size as usize];
    f.read_exact(&mut v).expect("read");
    v
}

/// Asserts two images are equal, naming the first differing block.
pub fn assert_same(a: &[u8], b: &[u8], what: &str) {
    assert_eq!(a.len(), b.len());
    if a != b {
        let first = a.iter().zip(b).position(|(x, y)| x != y).unwrap();
        let diff_blocks = a
            .chunks(4096)
            .zip(b.chunks(4096))
            .filter(|(x, y)| x != y)
            .count();
        let blocks: Vec<String> = a
            .chunks(4096)
            .zip(b.chunks(4096))
            .enumerate()
            .filter(|(_, (x, y))| x != y)
            .take(8)
            .map(|(i, (x, y))| format!("block {i}: {:02x?} vs {:02x?}", &x[..8], &y[..8]))
            .collect();
        panic!(
            "{what}: legs differ first at byte {first} (block {}), {diff_blocks} blocks differ: {blocks:?}",
            first / 4096
        );
    }
}

// ---------------------------------------------------------------------------
// The fault-injecting proxy.

pub const PASS: u8 = 0;
pub const STALL: u8 = 1;
pub const CUT: u8 = 2;
pub const CORRUPT: u8 = 3;
/// Corrupt the next chunk going back from the upstream (answers).
pub const CORRUPT_BACK: u8 = 4;

/// A TCP proxy in front of `upstream` that can cut, stall, corrupt or
/// delay the traffic.
pub struct Proxy {
    pub addr: SocketAddr,
    mode: Arc<AtomicU8>,
    delay_us: Arc<AtomicU64>,
    conns: Arc<Mutex<Vec<TcpStream>>>,
    stop: Arc<AtomicBool>,
    pub forwarded: Arc<AtomicU64>,
}

impl Proxy {
    pub fn start(ip: &str, upstream: SocketAddr) -> Proxy {
        let l = TcpListener::bind(format!("{ip}:0")).expect("proxy bind");
        let addr = l.local_addr().unwrap();
        l.set_nonblocking(true).unwrap();
        let p = Proxy {
            addr,
            mode: Arc::new(AtomicU8::new(PASS)),
            delay_us: Arc::new(AtomicU64::new(0)),
            conns: Arc::new(Mutex::new(Vec::new())),
            stop: Arc::new(AtomicBool::new(false)),
            forwarded: Arc::new(AtomicU64::new(0)),
        };
        let (mode, conns, stop, delay, fwd) = (
            p.mode.clone(),
            p.conns.clone(),
            p.stop.clone(),
            p.delay_us.clone(),
            p.forwarded.clone(),
        );
        std::thread::spawn(move || {
            while !stop.load(Ordering::SeqCst) {
                let (client, _) = match l.accept() {
                    Ok(c) => c,
                    Err(_) => {
                        std::thread::sleep(Duration::from_millis(5));
                        continue;
                    }
                };
                client.set_nonblocking(false).unwrap();
                if mode.load(Ordering::SeqCst) == CUT {
                    drop(client);
                    continue;
                }
                let Ok(server) = TcpStream::connect(upstream) else {
                    continue;
                };
                let _ = client.set_nodelay(true);
                let _ = server.set_nodelay(true);
                {
                    let mut c = conns.lock().unwrap();
                    c.push(client.try_clone().unwrap());
                    c.push(server.try_clone().unwrap());
                }
                for (from, to, corrupting) in [
                    (
                        client.try_clone().unwrap(),
                        server.try_clone().unwrap(),
                        true,
                    ),
                    (server, client, false),
                ] {
                    let (mode, delay, fwd) = (mode.clone(), delay.clone(), fwd.clone());
                    std::thread::spawn(move || pump(from, to, corrupting, &mode, &delay, &fwd));
                }
            }
        });
        p
    }

    pub fn set(&self, m: u8) {
        self.mode.store(m, Ordering::SeqCst);
        if m == CUT {
            for c in self.conns.lock().unwrap().drain(..) {
                let _ = c.shutdown(Shutdown::Both);
            }
        }
    }

    pub fn set_delay(&self, d: Duration) {
        self.delay_us.store(d.as_micros() as u64, Ordering::SeqCst);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        self.set(CUT);
    }
}

fn pump(
    mut from: TcpStream,
    mut to: TcpStream,
    corrupting: bool,
    mode: &AtomicU8,
    delay: &AtomicU64,
    fwd: &AtomicU64,
) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        loop {
            match mode.load(Ordering::SeqCst) {
                STALL => std::thread::sleep(Duration::from_millis(2)),
                CUT => {
                    let _ = to.shutdown(Shutdown::Both);
                    let _ = from.shutdown(Shutdown::Both);
                    return;
                }
                _ => break,
            }
        }
        let which = if corrupting { CORRUPT } else { CORRUPT_BACK };
        if mode
            .compare_exchange(which, PASS, Ordering::SeqCst, Ordering::SeqCst)
            .is_ok()
        {
            buf[n / 2] ^= 0x5a;
        }
        let d = delay.load(Ordering::SeqCst);
        if d > 0 {
            std::thread::sleep(Duration::from_micros(d));
        }
        if to.write_all(&buf[..n]).is_err() {
            break;
        }
        fwd.fetch_add(n as u64, Ordering::Relaxed);
    }
    let _ = to.shutdown(Shutdown::Both);
    let _ = from.shutdown(Shutdown::Both);
}
