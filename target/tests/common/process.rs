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
