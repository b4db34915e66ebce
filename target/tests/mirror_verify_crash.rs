//! kill -9 of the primary daemon (a real process) in the middle of a
//! `mirror_verify` and in the middle of a `mirror_repair` in each direction:
//! after a restart from the saved configuration each resumes from its
//! persisted cursor and finishes, the verify reports exactly the corrupted
//! ranges, and after each repair the legs are byte-identical (holding the
//! leg's data after `from_leg`).

mod common;

use common::{assert_same, read_file, wait_for, LegMap, TempDir, SECRET};
use mirrorpoint_target::rpc::RpcClient;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const MIB: u64 = 1 << 20;
const SIZE: u64 = 64 * MIB;
const REGION: u64 = 64 * 1024;

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
                    std::fs::read_to_string(dir.join("daemon.log")).unwrap_or_default()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        p
    }

    fn rpc(&self) -> RpcClient {
        RpcClient::connect(self.dir.join("rpc.sock")).expect("rpc")
    }

    fn call(&self, method: &str, params: Value) -> Value {
        match self.rpc().call(method, Some(params)) {
            Ok(v) => v,
            Err(e) => panic!(
                "{method}: {e:?}\nlog:\n{}",
                std::fs::read_to_string(self.dir.join("daemon.log")).unwrap_or_default()
            ),
        }
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

    fn leg_state(&self) -> String {
        self.call("mirror_get_status", json!({"name": "m0"}))[0]["legs"][0]["state"]
            .as_str()
            .unwrap()
            .to_string()
    }

    fn wait_synced(&self, limit: Duration) {
        let t0 = Instant::now();
        while self.leg_state() != "synced" {
            if t0.elapsed() > limit {
                panic!(
                    "never synced: {:#}\nlog:\n{}",
                    self.call("mirror_get_status", json!({})),
                    std::fs::read_to_string(self.dir.join("daemon.log")).unwrap_or_default()
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

impl Proc {
    fn job(&self) -> Value {
        self.call("mirror_verify_get", json!({"name": "m0"}))
    }

    /// Waits until the job is `state` and no task runs; panics on failure.
    fn wait_job(&self, state: &str, limit: Duration) -> Value {
        let t0 = Instant::now();
        loop {
            let v = self.job();
            if v["state"] == state && v["active"] == false {
                return v;
            }
            assert!(v["state"] != "failed", "job failed: {v:#}");
            if t0.elapsed() > limit {
                panic!(
                    "job never reached {state}: {v:#}\nlog:\n{}",
                    std::fs::read_to_string(self.dir.join("daemon.log")).unwrap_or_default()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// The region-aligned, merged ranges covering the given byte ranges.
fn expected(ranges: &[(u64, u64)]) -> Value {
    let mut regions: Vec<u64> = ranges
        .iter()
        .flat_map(|&(o, l)| (o / REGION)..(o + l).div_ceil(REGION))
        .collect();
    regions.sort_unstable();
    regions.dedup();
    let mut out: Vec<(u64, u64)> = Vec::new();
    for r in regions {
        match out.last_mut() {
            Some((s, n)) if *s + *n == r => *n += 1,
            _ => out.push((r, 1)),
        }
    }
    Value::Array(
        out.into_iter()
            .map(|(s, n)| json!({"offset": s * REGION, "length": n * REGION, "legs": [0]}))
            .collect(),
    )
}

/// Writes a pattern to the remote leg's logical `o..o+l` straight to the
/// storage servers' volumes (behind the mirror's back).
fn corrupt_leg(b: &Proc, created: &Value, o: u64, l: u64, seed: u64) {
    for e in created["legs"][0]["extents"].as_array().unwrap() {
        let (lo, el, dev) = (
            e["logical_offset"].as_u64().unwrap(),
            e["len"].as_u64().unwrap(),
            e["device_offset"].as_u64().unwrap(),
        );
        let (x, y) = (o.max(lo), (o + l).min(lo + el));
        if x < y {
            b.call(
                "bdev_write_pattern",
                json!({"name": format!("s{}", e["server"]), "offset": dev + (x - lo), "len": y - x, "seed": seed}),
            );
        }
    }
}

#[test]
fn kill_9_mid_verify_and_mid_repair_both_resume_and_finish() {
    let dir = TempDir::new("verify-crash");
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
    let local = dir.0.join("a").join("local.img");
    a.call(
        "bdev_uring_create",
        json!({"name": "local", "filename": local, "size": SIZE, "block_size": 4096}),
    );
    let created = a.call(
        "mirror_create",
        json!({"name": "m0", "volume": "local", "link_timeout_ms": 3000, "resync_rate": 0}),
    );
    let leg = LegMap::from_create(&created, &files);
    a.wait_synced(Duration::from_secs(60));
    let acfg = a.save();
    // Corrupt the leg behind the target's back (straight to the storage
    // servers' volumes): a block early, a large run in the middle (the
    // repair is killed inside it), a run late in the volume.
    let corrupt = [
        (2 * MIB + 4096, 4096),
        (20 * MIB, 12 * MIB),
        (50 * MIB + 4096, 8192),
    ];
    for (i, &(o, l)) in corrupt.iter().enumerate() {
        corrupt_leg(&b, &created, o, l, 11 + i as u64);
    }

    // 1. kill -9 mid-verify (8 MiB/s: 8 s for the volume).
    a.call("mirror_verify", json!({"name": "m0", "rate": 8 * MIB}));
    let t0 = Instant::now();
    while a.job()["cursor"].as_u64().unwrap() < 36 * MIB {
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "verify too slow: {:#}",
            a.job()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let before = a.job();
    a.kill9();
    let a = Proc::start(&a.dir.clone(), &acfg);
    let v = a.wait_job("finished", Duration::from_secs(90));
    eprintln!(
        "verify killed at cursor {}, after restart: {v:#}",
        before["cursor"]
    );
    assert_eq!(v["resumed"], 1, "{v:#}");
    assert_eq!(
        v["started_unix_ms"], before["started_unix_ms"],
        "same job: {v:#}"
    );
    // Resumed from the persisted cursor (not from 0): each byte counted once.
    assert_eq!(v["checked_bytes"], SIZE, "{v:#}");
    assert_eq!(v["out_of_sync"], expected(&corrupt), "{v:#}");
    let st = a.call("mirror_get_status", json!({"name": "m0"}))[0].clone();
    assert_eq!(st["out_of_sync"], expected(&corrupt));

    // 2. kill -9 mid-repair (4 MiB/s: 3 s for the 12 MiB run).
    let mut a = a;
    a.call(
        "mirror_repair",
        json!({"name": "m0", "direction": "local_to_legs", "rate": 4 * MIB}),
    );
    let t0 = Instant::now();
    loop {
        let r = a.job()["repair"]["repaired_bytes"].as_u64().unwrap_or(0);
        if r >= 4 * MIB {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "repair too slow: {:#}",
            a.job()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let before = a.job();
    a.kill9();
    assert!(before["repair"]["remaining"]
        .as_array()
        .is_some_and(|r| !r.is_empty()));
    let a = Proc::start(&a.dir.clone(), &acfg);
    let v = a.wait_job("finished", Duration::from_secs(90));
    eprintln!(
        "repair killed after {} bytes, after restart: {v:#}",
        before["repair"]["repaired_bytes"]
    );
    assert_eq!(v["resumed"], 2, "{v:#}");
    assert_eq!(
        v["out_of_sync"],
        json!([]),
        "re-verify after the repair: {v:#}"
    );
    a.wait_synced(Duration::from_secs(60));
    assert_same(
        &read_file(&local, SIZE),
        &leg.read(SIZE),
        "after the repair",
    );

    // 3. kill -9 mid-repair from the leg (the leg's data wins).
    let mut a = a;
    let bad = (30 * MIB, 8 * MIB);
    corrupt_leg(&b, &created, bad.0, bad.1, 50);
    let want_leg = leg.read(SIZE)[bad.0 as usize..(bad.0 + bad.1) as usize].to_vec();
    a.call("mirror_verify", json!({"name": "m0", "rate": 0}));
    let v = a.wait_job("finished", Duration::from_secs(90));
    assert_eq!(v["out_of_sync"], expected(&[bad]), "{v:#}");
    a.call(
        "mirror_repair",
        json!({"name": "m0", "direction": "from_leg", "leg": 0, "rate": 4 * MIB}),
    );
    let t0 = Instant::now();
    while a.job()["repair"]["repaired_bytes"].as_u64().unwrap_or(0) < 2 * MIB {
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "repair too slow: {:#}",
            a.job()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    a.kill9();
    let a = Proc::start(&a.dir.clone(), &acfg);
    let v = a.wait_job("finished", Duration::from_secs(90));
    assert_eq!(v["resumed"], 1, "{v:#}");
    assert_eq!(v["out_of_sync"], json!([]), "{v:#}");
    a.wait_synced(Duration::from_secs(60));
    let local_now = read_file(&local, SIZE);
    assert!(
        local_now[bad.0 as usize..(bad.0 + bad.1) as usize] == want_leg[..],
        "the local leg does not hold the leg's data after from_leg"
    );
    assert_same(&local_now, &leg.read(SIZE), "after the from_leg repair");
    drop(b);
}
