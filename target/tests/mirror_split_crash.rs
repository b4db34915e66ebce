//! kill -9 of the primary daemon (a real process) during a split and during
//! a rejoin, under a verifying write workload: after a restart from the
//! saved configuration the split has either finished (the leg is split,
//! the image is on the remote site) or rolled back (no image, the leg
//! resyncs), an interrupted rejoin finishes by itself, no acknowledged
//! write is lost, and the legs end byte-identical.

mod common;

use common::process::{pattern_workload, proc_sites, verify_model, Model, Proc, ProcSites, SLOT};
use common::{assert_same, read_file, wait_for, LegMap, TempDir};
use mirrorpoint_target::rpc::RpcClient;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const MIB: u64 = 1 << 20;
const SIZE: u64 = 32 * MIB;

/// Test-specific views of `m0`'s first leg.
impl Proc {
    fn leg(&self) -> Value {
        self.call("mirror_get_status", json!({"name": "m0"}))[0]["legs"][0].clone()
    }

    fn wait_leg(&self, state: &str, limit: Duration) {
        let t0 = Instant::now();
        loop {
            let l = self.leg();
            if l["state"] == state && (state != "synced" || l["dirty_regions"] == 0) {
                return;
            }
            if t0.elapsed() > limit {
                panic!("leg never {state}: {l:#}\nlog:\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// Slots from 4 MiB.
const BASE: u64 = 4 * MIB;

/// Four writers; seeds also carry the model's size.
fn workload(
    sock: PathBuf,
    model: Model,
    stop: Arc<AtomicBool>,
) -> Vec<std::thread::JoinHandle<u64>> {
    pattern_workload(sock, model, stop, 4, BASE, |m| {
        (m.lock().unwrap().len() as u64) << 20
    })
}

fn verify(a: &Proc, model: &Model) {
    verify_model(a, model, BASE)
}

fn bdev_names(b: &Proc) -> Vec<String> {
    b.call("bdev_get_bdevs", json!({}))
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["name"].as_str().unwrap().to_string())
        .collect()
}

/// Runs `op` on the primary from another thread and kills the primary
/// with SIGKILL `after` into it; restarts it from `cfg`.
fn kill_during(a: &mut Proc, cfg: &Path, op: &'static str, params: Value, after: Duration) -> Proc {
    let sock = a.dir.join("rpc.sock");
    let h = std::thread::spawn(move || {
        RpcClient::connect(&sock)
            .ok()
            .map(|mut c| c.call(op, Some(params)).is_ok())
    });
    std::thread::sleep(after);
    a.kill9();
    let finished = h.join().unwrap();
    eprintln!("{op}: SIGKILL after {after:?} (answered before the kill: {finished:?})");
    Proc::start(&a.dir.clone(), cfg)
}

struct Setup {
    dir: TempDir,
    a: Proc,
    b: Proc,
    local: PathBuf,
    leg: LegMap,
    acfg: PathBuf,
}

/// Two daemons (processes), a synced mirror m0, configs saved.
fn setup(tag: &str) -> Setup {
    let ProcSites { dir, a, b, files } = proc_sites(tag, 1);
    let local = dir.0.join("a").join("local.img");
    a.call(
        "bdev_uring_create",
        json!({"name": "local", "filename": local, "size": SIZE, "block_size": 4096}),
    );
    let created = a.call(
        "mirror_create",
        json!({"name": "m0", "volume": "local", "resync_rate": 0}),
    );
    let leg = LegMap::from_create(&created, &files);
    a.wait_leg("synced", Duration::from_secs(60));
    let acfg = a.save();
    b.save();
    Setup {
        dir,
        a,
        b,
        local,
        leg,
        acfg,
    }
}

#[test]
fn kill_9_during_split_and_rejoin_loses_nothing() {
    let Setup {
        dir: _dir,
        mut a,
        b,
        local,
        leg,
        acfg,
    } = setup("split-crash");
    let model: Model = Arc::new(Mutex::new(vec![(0, None); 64]));
    let mut outcomes = Vec::new();

    for (round, delay_us) in [500u64, 3000, 10_000, 40_000, 300_000]
        .into_iter()
        .enumerate()
    {
        // 1. kill -9 during a split, under writes.
        let stop = Arc::new(AtomicBool::new(false));
        let ws = workload(a.dir.join("rpc.sock"), model.clone(), stop.clone());
        std::thread::sleep(Duration::from_millis(300));
        let image = format!("crash{round}");
        let mut a2 = kill_during(
            &mut a,
            &acfg,
            "mirror_split",
            json!({"name": "m0", "image_name": image}),
            Duration::from_micros(delay_us),
        );
        stop.store(true, Ordering::SeqCst);
        let acked: u64 = ws.into_iter().map(|w| w.join().unwrap()).sum();
        // Finished or rolled back: split with its image, or not split and
        // no image (after the background recovery).
        let t0 = Instant::now();
        let outcome = loop {
            let l = a2.leg();
            let has_image = bdev_names(&b).contains(&image);
            match (l["split"]["phase"].as_str(), has_image) {
                (Some("split"), true) => break "finished",
                (None, false) if l["state"] != "split" => break "rolled back",
                _ => {}
            }
            assert!(
                t0.elapsed() < Duration::from_secs(30),
                "split neither finished nor rolled back: {l:#}, image {has_image}\n{}",
                a2.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        };
        eprintln!("round {round}: kill -9 {delay_us} us into a split ({acked} writes acknowledged before): {outcome}");
        outcomes.push(outcome);
        verify(&a2, &model);
        if outcome == "finished" {
            // 2. kill -9 during the rejoin of that split.
            let stop = Arc::new(AtomicBool::new(false));
            let ws = workload(a2.dir.join("rpc.sock"), model.clone(), stop.clone());
            std::thread::sleep(Duration::from_millis(200));
            a2 = kill_during(
                &mut a2,
                &acfg,
                "mirror_rejoin",
                json!({"name": "m0"}),
                Duration::from_micros(delay_us),
            );
            stop.store(true, Ordering::SeqCst);
            ws.into_iter().for_each(|w| {
                w.join().unwrap();
            });
            // Killed before the rejoin recorded `rejoining`: still split,
            // the operator's rejoin is simply asked again. Otherwise the
            // rejoin finishes by itself after the restart (or had
            // finished): no image, the leg resyncs to synced.
            if a2.leg()["split"]["phase"] == "split" {
                eprintln!("round {round}: killed before the rejoin began; rejoining again");
                a2.call("mirror_rejoin", json!({"name": "m0"}));
            }
            wait_for(Duration::from_secs(30), "the image gone", || {
                !bdev_names(&b).contains(&image)
            });
        }
        a2.wait_leg("synced", Duration::from_secs(60));
        verify(&a2, &model);
        a2.call(
            "bdev_read_crc",
            json!({"name": "m0", "offset": 0, "len": 4096}),
        );
        a2.call(
            "bdev_write_pattern",
            json!({"name": "m0", "offset": 0, "len": 4096, "seed": 1}),
        );
        a2.wait_leg("synced", Duration::from_secs(60));
        // Quiesce through the volume API's flush path (a pattern write
        // then a read); compare the legs byte for byte.
        assert_same(
            &read_file(&local, SIZE),
            &leg.read(SIZE),
            &format!("round {round}: after kill -9 during split/rejoin"),
        );
        a = a2;
    }
    let recovered = a
        .log()
        .matches("interrupted split/rejoin finished after restart")
        .count();
    eprintln!("outcomes: {outcomes:?}; {recovered} interrupted split/rejoin(s) finished by restart recovery");
    drop(b);
}

/// Rewrites leg 0's split record in the primary's mirror record (what a
/// crash at that exact point leaves on disk).
fn set_record_phase(a: &Proc, split: Value) {
    let path = a.dir.join("data").join("mirror-m0.json");
    let mut r: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    r["legs"][0]["split"] = split;
    std::fs::write(&path, r.to_string()).unwrap();
}

/// The two crash points kill -9 rarely lands in, made exact: the primary
/// dies (1) right after recording a split as `pending` (before the
/// sequencer split), (2) in a rejoin after recording `rejoining`, with the
/// image still on the leg's site. After a restart the background recovery
/// rolls (1) back and finishes (2): no image left, the leg synced, every
/// acknowledged write there, legs identical.
#[test]
fn restart_finishes_or_rolls_back_interrupted_splits() {
    let Setup {
        dir: _dir,
        mut a,
        b,
        local,
        leg,
        acfg,
    } = setup("split-recover");
    let model: Model = Arc::new(Mutex::new(vec![(0, None); 64]));
    // (1) pending.
    let stop = Arc::new(AtomicBool::new(false));
    let ws = workload(a.dir.join("rpc.sock"), model.clone(), stop.clone());
    std::thread::sleep(Duration::from_millis(200));
    a.kill9();
    stop.store(true, Ordering::SeqCst);
    ws.into_iter().for_each(|w| {
        w.join().unwrap();
    });
    set_record_phase(
        &a,
        json!({"phase": "pending", "epoch": 0, "sequence": 0, "image": "p0", "writable": false}),
    );
    let a2 = Proc::start(&a.dir.clone(), &acfg);
    a2.wait_leg("synced", Duration::from_secs(60));
    assert!(a2.leg()["split"].is_null(), "{:#}", a2.leg());
    assert!(!bdev_names(&b).contains(&"p0".to_string()));
    verify(&a2, &model);
    wait_for(Duration::from_secs(10), "the recovery log line", || {
        a2.log()
            .contains("interrupted split/rejoin finished after restart")
    });
    assert_same(
        &read_file(&local, SIZE),
        &leg.read(SIZE),
        "after a pending split's rollback",
    );

    // (2) rejoining, the image still on the leg's site.
    let mut a = a2;
    a.call(
        "mirror_split",
        json!({"name": "m0", "image_name": "r1", "writable": true}),
    );
    assert!(bdev_names(&b).contains(&"r1".to_string()));
    let stop = Arc::new(AtomicBool::new(false));
    let ws = workload(a.dir.join("rpc.sock"), model.clone(), stop.clone());
    std::thread::sleep(Duration::from_millis(200));
    // A host write into the clone (tracked: the rejoin must copy it back).
    b.call(
        "bdev_write_pattern",
        json!({"name": "r1", "offset": 20 * MIB, "len": SLOT, "seed": 99}),
    );
    a.kill9();
    stop.store(true, Ordering::SeqCst);
    ws.into_iter().for_each(|w| {
        w.join().unwrap();
    });
    let info = a.call_dead_record();
    set_record_phase(&a, {
        let mut i = info;
        i["phase"] = json!("rejoining");
        i
    });
    let a2 = Proc::start(&a.dir.clone(), &acfg);
    wait_for(
        Duration::from_secs(30),
        "the image dropped by the recovery",
        || !bdev_names(&b).contains(&"r1".to_string()),
    );
    a2.wait_leg("synced", Duration::from_secs(60));
    assert!(a2.leg()["split"].is_null(), "{:#}", a2.leg());
    verify(&a2, &model);
    assert_same(
        &read_file(&local, SIZE),
        &leg.read(SIZE),
        "after an interrupted rejoin finished",
    );
}

impl Proc {
    /// Leg 0's split record as the dead primary left it on disk.
    fn call_dead_record(&self) -> Value {
        let path = self.dir.join("data").join("mirror-m0.json");
        let r: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        assert_eq!(r["legs"][0]["split"]["phase"], "split", "{r:#}");
        r["legs"][0]["split"].clone()
    }
}
