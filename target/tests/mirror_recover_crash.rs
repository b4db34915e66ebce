//! kill -9 of the primary (a real process) in the middle of a rebuild of
//! its local device onto a replacement volume: after a restart from the
//! configuration saved before the rebuild, the rebuild resumes from its
//! persisted progress (it does not start over), finishes, the mirror
//! returns what was written, and the replacement and the remote leg are
//! byte-identical.

mod common;

use common::process::{crc_of_pattern, proc_sites, Proc, ProcSites};
use common::{assert_same, read_file, LegMap};
use serde_json::{json, Value};
use std::time::{Duration, Instant};

const MIB: u64 = 1 << 20;
const SIZE: u64 = 64 * MIB;

impl Proc {
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

#[test]
fn kill_9_mid_rebuild_resumes_after_restart() {
    let ProcSites {
        dir,
        mut a,
        b: _b,
        files,
    } = proc_sites("recover-crash", 2);
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
