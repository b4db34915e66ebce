//! kill -9 of the primary (a real process) in the middle of a rebuild of
//! its local device onto a replacement volume: after a restart from the
//! configuration saved before the rebuild, the rebuild resumes from its
//! persisted progress (it does not start over), finishes, the mirror
//! returns what was written, and the replacement and the remote leg are
//! byte-identical.

mod common;

use common::{assert_same, read_file, wait_for, LegMap, TempDir, SECRET};
use mirrorpoint_target::mirror::service::pattern_byte;
use mirrorpoint_target::rpc::RpcClient;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const MIB: u64 = 1 << 20;
const SIZE: u64 = 64 * MIB;

struct Proc {
    child: Option<Child>,
    dir: PathBuf,
}

impl Proc {
    fn start(dir: &Path, config: &Path) -> Proc {
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

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("daemon.log")).unwrap_or_default()
    }

    fn call(&self, method: &str, params: Value) -> Value {
        let mut c = RpcClient::connect(self.dir.join("rpc.sock")).expect("rpc");
        match c.call(method, Some(params)) {
            Ok(v) => v,
            Err(e) => panic!("{method}: {e:?}\nlog:\n{}", self.log()),
        }
    }

    fn status(&self) -> Value {
        self.call("mirror_get_status", json!({"name": "m0"}))[0].clone()
    }

    fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.kill().expect("SIGKILL");
            let _ = c.wait();
        }
    }

    fn save(&self) -> PathBuf {
        let cfg = self.call("save_config", json!({}));
        let p = self.dir.join("saved.json");
        std::fs::write(&p, cfg.to_string()).unwrap();
        p
    }

    fn wait(&self, what: &str, limit: Duration, f: impl Fn(&Value) -> bool) {
        let t0 = Instant::now();
        loop {
            let s = self.status();
            if f(&s) {
                return;
            }
            if t0.elapsed() > limit {
                panic!("timed out waiting for {what}: {s:#}\nlog:\n{}", self.log());
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

fn crc_of_pattern(seed: u64, offset: u64, len: u64) -> u32 {
    let v: Vec<u8> = (offset..offset + len)
        .map(|p| pattern_byte(seed, p))
        .collect();
    crc32c::crc32c(&v)
}

#[test]
fn kill_9_mid_rebuild_resumes_after_restart() {
    let dir = TempDir::new("recover-crash");
    let empty = dir.0.join("empty.json");
    std::fs::write(&empty, r#"{"subsystems": []}"#).unwrap();
    let mut a = Proc::start(&dir.0.join("a"), &empty);
    let b = Proc::start(&dir.0.join("b"), &empty);
    let aaddr = a.call("agent_set_site", json!({"name": "east", "domain": 1, "listen": "127.0.0.2:0", "secret": SECRET, "master": true}))["listen"].as_str().unwrap().to_string();
    let baddr = b.call(
        "agent_set_site",
        json!({"name": "west", "domain": 2, "listen": "127.0.0.3:0", "secret": SECRET}),
    )["listen"]
        .as_str()
        .unwrap()
        .to_string();
    let files: Vec<PathBuf> = ["s1", "s2"]
        .iter()
        .map(|n| dir.0.join("b").join(format!("{n}.img")))
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
    let base = dir.0.join("a").join("base.img");
    a.call(
        "bdev_uring_create",
        json!({"name": "base", "filename": base, "size": SIZE, "block_size": 4096}),
    );
    a.call("bdev_error_create", json!({"base_name": "base"}));
    let created = a.call(
        "mirror_create",
        json!({"name": "m0", "volume": "EE_base", "link_timeout_ms": 800, "resync_rate": 0}),
    );
    let leg = LegMap::from_create(&created, &files);
    a.wait("a synced leg", Duration::from_secs(60), |s| {
        s["legs"][0]["state"] == "synced"
    });
    a.call(
        "bdev_write_pattern",
        json!({"name": "m0", "offset": 0, "len": SIZE, "seed": 7}),
    );
    // The local device fails; writes go on to the leg only.
    a.call(
        "bdev_error_inject_error",
        json!({"name": "EE_base", "io_type": "all", "permanent": true}),
    );
    a.call(
        "bdev_write_pattern",
        json!({"name": "m0", "offset": 8 * MIB, "len": 8 * MIB, "seed": 8}),
    );
    assert_eq!(a.status()["local"]["state"], "failed");
    let repl = dir.0.join("a").join("repl.img");
    a.call(
        "bdev_uring_create",
        json!({"name": "repl", "filename": repl, "size": SIZE, "block_size": 4096}),
    );
    let cfg = a.save();
    // Slow enough to be killed in the middle: 16 MiB/s over 64 MiB.
    a.call(
        "mirror_set_resync_rate",
        json!({"name": "m0", "bytes_per_second": 16 * MIB}),
    );
    a.call(
        "mirror_recover_local",
        json!({"name": "m0", "replacement_bdev": "repl"}),
    );
    // Half way (2 s at that rate: progress is committed every 500 ms).
    a.wait("half of the rebuild", Duration::from_secs(60), |s| {
        s["local"]["rebuild_percent"].as_f64().unwrap_or(0.0) >= 50.0
    });
    let before = a.status();
    assert_eq!(before["local"]["state"], "rebuilding", "{before:#}");
    a.kill9();
    eprintln!("killed mid-rebuild: {:#}", before["local"]);

    let a = Proc::start(&a.dir.clone(), &cfg);
    a.wait(
        "the resumed rebuild to finish",
        Duration::from_secs(120),
        |s| s["local"]["state"] == "healthy",
    );
    let after = a.status();
    eprintln!("after the restart: {:#}", after["local"]);
    assert_eq!(after["local"]["volume"], "repl", "{after:#}");
    let copied = after["local"]["rebuild_copied_bytes"].as_u64().unwrap();
    assert!(
        copied > 0 && copied <= SIZE - 8 * MIB,
        "the rebuild should resume, not start over: copied {copied} bytes after the restart"
    );
    for (off, len, seed) in [
        (0, 8 * MIB, 7),
        (8 * MIB, 8 * MIB, 8),
        (16 * MIB, SIZE - 16 * MIB, 7),
    ] {
        let got = a.call(
            "bdev_read_crc",
            json!({"name": "m0", "offset": off, "len": len}),
        )["crc32c"]
            .as_u64()
            .unwrap() as u32;
        assert_eq!(
            got,
            crc_of_pattern(seed, off, len),
            "data at {off}..{} after the resumed rebuild",
            off + len
        );
    }
    a.wait("a synced, clean leg", Duration::from_secs(60), |s| {
        s["legs"][0]["state"] == "synced" && s["legs"][0]["dirty_regions"] == 0
    });
    assert_same(
        &read_file(&repl, SIZE),
        &leg.read(SIZE),
        "replacement vs remote leg after the resumed rebuild",
    );
}
