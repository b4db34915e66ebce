//! The process-based crash harness: `mirrorpoint serve` daemons as real child
//! processes (so they can be killed with `kill -9` and restarted from a saved
//! configuration), rpc calls over their admin socket, and the two-site setup
//! (east = a, master; west = b with storage servers) the crash tests start from.

use super::{wait_for, TempDir, SECRET};
use mirrorpoint_target::mirror::service::pattern_byte;
use mirrorpoint_target::rpc::RpcClient;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const MIB: u64 = 1 << 20;

/// A `mirrorpoint serve` process with its admin socket, data and log in `dir`.
pub struct Proc {
    pub child: Option<Child>,
    pub dir: PathBuf,
}

impl Proc {
    /// Spawns the daemon with `config` and waits (up to 60 s) for its socket.
    pub fn start(dir: &Path, config: &Path) -> Proc {
        std::fs::create_dir_all(dir).unwrap();
        let sock = dir.join("rpc.sock");
        let _ = std::fs::remove_file(&sock);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("daemon.log"))
            .unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_mirrorpoint"))
            .args(["serve", "-m", "0,1", "--no-pin", "--buffers", "256"])
            .arg("-c")
            .arg(config)
            .arg("-r")
            .arg(&sock)
            .arg("--data-dir")
            .arg(dir.join("data"))
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::from(log))
            .spawn()
            .expect("spawn mirrorpoint");
        let mut p = Proc {
            child: Some(child),
            dir: dir.to_path_buf(),
        };
        let t0 = Instant::now();
        while RpcClient::connect(&sock).is_err() {
            let exited = p.child.as_mut().and_then(|c| c.try_wait().ok().flatten());
            if exited.is_some() || t0.elapsed() > Duration::from_secs(60) {
                panic!(
                    "daemon in {} did not come up ({exited:?}); log:\n{}",
                    dir.display(),
                    p.log()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        p
    }

    /// The daemon's stderr so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("daemon.log")).unwrap_or_default()
    }

    /// A fresh connection to the admin socket.
    pub fn rpc(&self) -> RpcClient {
        RpcClient::connect(self.dir.join("rpc.sock")).expect("rpc")
    }

    pub fn try_call(&self, method: &str, params: Value) -> Result<Value, String> {
        RpcClient::connect(self.dir.join("rpc.sock"))
            .map_err(|e| e.to_string())?
            .call(method, Some(params))
            .map_err(|e| format!("{e:?}"))
    }

    /// One rpc call on a fresh connection; panics with the daemon's log.
    pub fn call(&self, method: &str, params: Value) -> Value {
        self.try_call(method, params.clone())
            .unwrap_or_else(|e| panic!("{method} {params}: {e}\nlog:\n{}", self.log()))
    }

    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.kill().expect("SIGKILL");
            let _ = c.wait();
        }
    }

    /// Writes the daemon's `save_config` to `dir/saved.json`.
    pub fn save(&self) -> PathBuf {
        let cfg = self.call("save_config", json!({}));
        let p = self.dir.join("saved.json");
        std::fs::write(&p, cfg.to_string()).unwrap();
        p
    }

    /// Status of mirror `m0`.
    pub fn status(&self) -> Value {
        self.call("mirror_get_status", json!({"name": "m0"}))[0].clone()
    }

    /// State of `m0`'s first leg.
    pub fn leg_state(&self) -> String {
        self.call("mirror_get_status", json!({"name": "m0"}))[0]["legs"][0]["state"]
            .as_str()
            .unwrap()
            .to_string()
    }

    /// Waits until `m0`'s first leg is synced (polling every 50 ms).
    pub fn wait_synced(&self, limit: Duration) {
        let t0 = Instant::now();
        while self.leg_state() != "synced" {
            if t0.elapsed() > limit {
                panic!(
                    "never synced: {:#}\nlog:\n{}",
                    self.call("mirror_get_status", json!({})),
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Two daemon processes: `a` is site east (domain 1, 127.0.0.2, master),
/// `b` is site west (domain 2, 127.0.0.3) with `servers` storage servers.
pub struct ProcSites {
    pub dir: TempDir,
    pub a: Proc,
    pub b: Proc,
    /// `files[i]` backs storage server `i + 1` (volume `s{i+1}`, 40 MiB) on b.
    pub files: Vec<PathBuf>,
}

/// Starts both daemons from an empty config, configures the sites, the
/// storage servers and the peers, and waits (10 s) for b's capacity report.
pub fn proc_sites(tag: &str, servers: usize) -> ProcSites {
    let dir = TempDir::new(tag);
    let empty = dir.0.join("empty.json");
    std::fs::write(&empty, r#"{"subsystems": []}"#).unwrap();
    let a = Proc::start(&dir.0.join("a"), &empty);
    let b = Proc::start(&dir.0.join("b"), &empty);
    let aaddr = a.call("agent_set_site", json!({"name": "east", "domain": 1, "listen": "127.0.0.2:0", "secret": SECRET, "master": true}))["listen"].as_str().unwrap().to_string();
    let baddr = b.call(
        "agent_set_site",
        json!({"name": "west", "domain": 2, "listen": "127.0.0.3:0", "secret": SECRET}),
    )["listen"]
        .as_str()
        .unwrap()
        .to_string();
    let files: Vec<PathBuf> = (1..=servers)
        .map(|i| dir.0.join("b").join(format!("s{i}.img")))
        .collect();
    for (i, f) in files.iter().enumerate() {
        let n = format!("s{}", i + 1);
        b.call(
            "bdev_uring_create",
            json!({"name": n, "filename": f, "size": 40 * MIB, "block_size": 4096}),
        );
        b.call(
            "agent_add_storage_server",
            json!({"name": format!("ss{}", i + 1), "id": i + 1, "volumes": [n]}),
        );
    }
    a.call(
        "agent_add_peer",
        json!({"name": "west", "domain": 2, "address": baddr}),
    );
    b.call(
        "agent_add_peer",
        json!({"name": "east", "domain": 1, "address": aaddr, "master": true}),
    );
    wait_for(Duration::from_secs(10), "capacity report", || {
        !a.call("agent_get_sites", json!({}))["peers"][0]["last_report_ms"].is_null()
    });
    ProcSites { dir, a, b, files }
}

/// crc32c of `bdev_write_pattern`'s bytes for `seed` over `offset..offset+len`.
pub fn crc_of_pattern(seed: u64, offset: u64, len: u64) -> u32 {
    let v: Vec<u8> = (offset..offset + len)
        .map(|p| pattern_byte(seed, p))
        .collect();
    crc32c::crc32c(&v)
}

/// Size of one slot of the pattern workload.
pub const SLOT: u64 = 64 * 1024;

/// Per slot: the last acknowledged seed, and a seed in flight when the
/// daemon died (either may be on disk).
pub type Model = Arc<Mutex<Vec<(u64, Option<u64>)>>>;

/// Slot `slot` of a workload whose slots start at `base` (every other 64 KiB).
pub fn slot_offset(base: u64, slot: usize) -> u64 {
    base + slot as u64 * 2 * SLOT
}

/// `threads` writers of `m0` through the admin socket's bdev_write_pattern
/// (thread `t` owns slots `t*16..t*16+16`, seeds `(t+1) << 40 | seed_tag`
/// counting up) until `stop` or an error; each returns its acknowledged count.
pub fn pattern_workload(
    sock: PathBuf,
    model: Model,
    stop: Arc<AtomicBool>,
    threads: usize,
    base: u64,
    seed_tag: impl Fn(&Model) -> u64 + Clone + Send + 'static,
) -> Vec<std::thread::JoinHandle<u64>> {
    (0..threads)
        .map(|t| {
            let (sock, model, stop, seed_tag) =
                (sock.clone(), model.clone(), stop.clone(), seed_tag.clone());
            std::thread::spawn(move || {
                let Ok(mut c) = RpcClient::connect(&sock) else {
                    return 0;
                };
                let mut n = 0u64;
                let mut seed = (t as u64 + 1) << 40 | seed_tag(&model);
                while !stop.load(Ordering::SeqCst) {
                    seed += 1;
                    let slot = t * 16 + (seed % 16) as usize;
                    model.lock().unwrap()[slot].1 = Some(seed);
                    let r = c.call("bdev_write_pattern", Some(json!({"name": "m0", "offset": slot_offset(base, slot), "len": SLOT, "seed": seed})));
                    if r.is_err() {
                        return n; // daemon gone: the in-flight seed stays "maybe"
                    }
                    model.lock().unwrap()[slot] = (seed, None);
                    n += 1;
                }
                n
            })
        })
        .collect()
}

/// Every written slot of `m0` on `a` holds its acknowledged seed's pattern
/// or the one that was in flight.
pub fn verify_model(a: &Proc, model: &Model, base: u64) {
    for (slot, (acked, maybe)) in model.lock().unwrap().iter().enumerate() {
        if *acked == 0 && maybe.is_none() {
            continue;
        }
        let off = slot_offset(base, slot);
        let got = a.call(
            "bdev_read_crc",
            json!({"name": "m0", "offset": off, "len": SLOT}),
        )["crc32c"]
            .as_u64()
            .unwrap() as u32;
        let ok_acked = *acked != 0 && got == crc_of_pattern(*acked, off, SLOT);
        let ok_maybe = maybe.is_some_and(|s| got == crc_of_pattern(s, off, SLOT));
        assert!(
            ok_acked || ok_maybe,
            "slot {slot}: acknowledged write (seed {acked:#x}) lost"
        );
    }
}
