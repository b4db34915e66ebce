//! Recovery of the local storage device, end to end: the mirror's local
//! volume is an error bdev (`EE_base`) over a file; errors are injected
//! while hosts write and read-verify through the volume API on both cores.
//! No host I/O may fail, every read must return what was last written, and
//! after `mirror_recover_local` (same device, or a replacement) the local
//! device and the remote leg must be byte-identical.

mod common;

use common::*;
use mirrorpoint_poller::{buffer_pool, spawn};
use mirrorpoint_target::mirror::service::pattern_byte;
use mirrorpoint_target::units::ByteOffset;
use serde_json::{json, Value};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

const MIB: u64 = 1 << 20;
const SIZE: u64 = 64 * MIB;
/// Each host task owns its slots (one 64 KiB region each), so it knows what
/// every read of them must return.
const SLOT: u64 = 64 * 1024;
const TASKS_PER_CORE: u64 = 6;
const SLOTS_PER_TASK: u64 = 8;

struct Rig {
    _dir: TempDir,
    a: Site,
    _b: Site,
    leg: LegMap,
    base: PathBuf,
}

fn rig(tag: &str, extra: Value, spare: bool) -> Rig {
    let dir = TempDir::new(tag);
    let mut a = Site::start(&dir.0.join("a"), "east", 1, "127.0.0.2", true);
    let mut b = Site::start(&dir.0.join("b"), "west", 2, "127.0.0.3", false);
    let s1 = b.uring("s1", 40 * MIB);
    let s2 = b.uring("s2", 40 * MIB);
    b.call(
        "agent_add_storage_server",
        json!({"name": "ss1", "id": 1, "volumes": ["s1"]}),
    );
    b.call(
        "agent_add_storage_server",
        json!({"name": "ss2", "id": 2, "volumes": ["s2"]}),
    );
    a.call(
        "agent_add_peer",
        json!({"name": "west", "domain": 2, "address": b.addr.to_string()}),
    );
    b.call(
        "agent_add_peer",
        json!({"name": "east", "domain": 1, "address": a.addr.to_string(), "master": true}),
    );
    wait_for(
        Duration::from_secs(10),
        "the remote agent's capacity report",
        || !a.call("agent_get_sites", json!({}))["peers"][0]["last_report_ms"].is_null(),
    );
    let base = a.uring("base", SIZE);
    assert_eq!(
        a.call("bdev_error_create", json!({"base_name": "base"})),
        "EE_base"
    );
    let mut params =
        json!({"name": "m0", "volume": "EE_base", "link_timeout_ms": 600, "resync_rate": 0});
    if spare {
        a.call(
            "bdev_malloc_create",
            json!({"name": "spare", "num_blocks": SIZE / 4096, "block_size": 4096}),
        );
        params["spare_bdev"] = json!("spare");
    }
    if let (Some(p), Some(e)) = (params.as_object_mut(), extra.as_object()) {
        p.extend(e.clone());
    }
    let created = a.call("mirror_create", params);
    let leg = LegMap::from_create(&created, &[s1, s2]);
    a.wait_leg("m0", "synced", Duration::from_secs(60));
    Rig {
        _dir: dir,
        a,
        _b: b,
        leg,
        base,
    }
}

fn slot_offset(core: u64, task: u64, k: u64) -> u64 {
    ((core * TASKS_PER_CORE + task) * SLOTS_PER_TASK + k) * SLOT
}

/// What the workload saw.
#[derive(Default)]
struct Tally {
    writes: AtomicU64,
    reads: AtomicU64,
    errors: Mutex<Vec<String>>,
}

/// Host tasks on every core: write a seeded pattern to one of their slots,
/// read a slot back and check it, until `stop`. Returns when all finished.
fn workload(
    site: &Site,
    stop: Arc<AtomicBool>,
    tally: Arc<Tally>,
) -> Vec<mirrorpoint_poller::OneshotReceiver<()>> {
    let st = site.daemon.as_ref().unwrap().state().clone();
    let vol = st.volumes.get("m0").unwrap();
    st.reactors
        .iter()
        .enumerate()
        .map(|(core, r)| {
            let (vol, stop, tally) = (vol.clone(), stop.clone(), tally.clone());
            r.spawn(move || async move {
                let tasks: Vec<_> = (0..TASKS_PER_CORE)
                    .map(|t| {
                        let (vol, stop, tally) = (vol.clone(), stop.clone(), tally.clone());
                        spawn(async move {
                            let ch = vol.channel();
                            let mut seeds = [0u64; SLOTS_PER_TASK as usize];
                            let mut x = 0x9e37_79b9 ^ ((core as u64) << 8 | t);
                            while !stop.load(Ordering::SeqCst) {
                                x ^= x << 13;
                                x ^= x >> 7;
                                x ^= x << 17;
                                let k = x % SLOTS_PER_TASK;
                                let off = slot_offset(core as u64, t, k);
                                let seed = x | 1;
                                let mut b = buffer_pool().alloc(SLOT as usize).expect("buffer");
                                for (i, byte) in b.iter_mut().enumerate() {
                                    *byte = pattern_byte(seed, off + i as u64);
                                }
                                let (r, _) = ch.write(ByteOffset(off), b.freeze()).await;
                                if let Err(e) = r {
                                    tally.errors.lock().unwrap().push(format!("write at {off}: {e}"));
                                    continue;
                                }
                                seeds[k as usize] = seed;
                                tally.writes.fetch_add(1, Ordering::Relaxed);
                                let k2 = (x >> 20) % SLOTS_PER_TASK;
                                let off2 = slot_offset(core as u64, t, k2);
                                let b = buffer_pool().alloc(SLOT as usize).expect("buffer");
                                let (r, b) = ch.read(ByteOffset(off2), b).await;
                                if let Err(e) = r {
                                    tally.errors.lock().unwrap().push(format!("read at {off2}: {e}"));
                                    continue;
                                }
                                let want = seeds[k2 as usize];
                                let ok = b.iter().enumerate().all(|(i, &v)| {
                                    v == if want == 0 { 0 } else { pattern_byte(want, off2 + i as u64) }
                                });
                                if !ok {
                                    tally.errors.lock().unwrap().push(format!(
                                        "read at {off2} returned other data than the last write (seed {want:#x})"
                                    ));
                                }
                                tally.reads.fetch_add(1, Ordering::Relaxed);
                            }
                        })
                    })
                    .collect();
                for t in tasks {
                    t.await;
                }
            })
        })
        .collect()
}

/// Stops the workload when a test ends, even by a failed assertion (the
/// daemon's reactors would otherwise never finish their tasks).
struct StopOnDrop(Arc<AtomicBool>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

fn local_state(a: &mut Site) -> String {
    a.status("m0")["local"]["state"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

fn flush(site: &Site) {
    let st = site.daemon.as_ref().unwrap().state().clone();
    let vol = st.volumes.get("m0").unwrap();
    st.reactors[0]
        .block_on(move || async move { vol.channel().flush().await.expect("flush") })
        .unwrap();
}

/// Reads a whole volume of the daemon through the volume API.
fn read_volume(site: &Site, name: &str) -> Vec<u8> {
    let st = site.daemon.as_ref().unwrap().state().clone();
    let vol = st.volumes.get(name).unwrap();
    st.reactors[0]
        .block_on(move || async move {
            let ch = vol.channel();
            let mut out = Vec::with_capacity(SIZE as usize);
            let mut off = 0;
            while off < SIZE {
                let b = buffer_pool().alloc(128 * 1024).expect("buffer");
                let (r, b) = ch.read(ByteOffset(off), b).await;
                r.expect("read volume");
                out.extend_from_slice(&b);
                off += 128 * 1024;
            }
            out
        })
        .unwrap()
}

fn stop_and_check(
    stop: &AtomicBool,
    waits: Vec<mirrorpoint_poller::OneshotReceiver<()>>,
    tally: &Tally,
) {
    stop.store(true, Ordering::SeqCst);
    for w in waits {
        w.recv_blocking().expect("workload");
    }
    let errors = tally.errors.lock().unwrap();
    assert!(
        errors.is_empty(),
        "the host saw {} errors, first: {:?}",
        errors.len(),
        errors.iter().take(5).collect::<Vec<_>>()
    );
    eprintln!(
        "host workload: {} writes, {} verified reads, no error",
        tally.writes.load(Ordering::Relaxed),
        tally.reads.load(Ordering::Relaxed)
    );
}

/// The local device fails (every read and write errors) under a verifying
/// workload: nothing reaches the host, reads come from the remote leg. Once
/// the fault is gone, `mirror_recover_local` rebuilds it while the workload
/// goes on; reads move back and the legs are identical.
#[test]
fn local_device_fails_under_load_and_is_rebuilt_in_place() {
    let mut r = rig("recover-same", json!({}), false);
    let stop = Arc::new(AtomicBool::new(false));
    let _guard = StopOnDrop(stop.clone());
    let tally = Arc::new(Tally::default());
    let waits = workload(&r.a, stop.clone(), tally.clone());
    wait_for(Duration::from_secs(20), "host I/O", || {
        tally.reads.load(Ordering::Relaxed) > 200
    });
    r.a.call(
        "bdev_error_inject_error",
        json!({"name": "EE_base", "io_type": "all", "permanent": true}),
    );
    wait_for(Duration::from_secs(10), "the local leg to fail", || {
        local_state(&mut r.a) == "failed"
    });
    let served = r.a.status("m0")["local"]["remote_reads"].as_u64().unwrap();
    let reads0 = tally.reads.load(Ordering::Relaxed);
    wait_for(Duration::from_secs(20), "reads served by the leg", || {
        tally.reads.load(Ordering::Relaxed) > reads0 + 200
    });
    let s = r.a.status("m0");
    assert!(
        s["local"]["remote_reads"].as_u64().unwrap() > served,
        "reads should come from the remote leg: {s:#}"
    );
    assert!(s["local"]["rebuild_regions"].as_u64().unwrap() > 0, "{s:#}");
    // A rebuild while the device still fails stops and leaves it failed.
    // Clear the fault first, as an operator would after fixing the path.
    r.a.call(
        "bdev_error_inject_error",
        json!({"name": "EE_base", "io_type": "clear"}),
    );
    // Bad parameters are refused with the field named.
    let e =
        r.a.rpc
            .call(
                "mirror_recover_local",
                Some(json!({"name": "m0", "source_leg": 3})),
            )
            .expect_err("no leg 3");
    assert!(format!("{e:?}").contains("source_leg"), "{e:?}");
    r.a.call("mirror_recover_local", json!({"name": "m0"}));
    wait_for(
        Duration::from_secs(60),
        "the local leg to be rebuilt",
        || local_state(&mut r.a) == "healthy",
    );
    let writes0 = tally.writes.load(Ordering::Relaxed);
    wait_for(
        Duration::from_secs(20),
        "host I/O after the rebuild",
        || tally.writes.load(Ordering::Relaxed) > writes0 + 100,
    );
    stop_and_check(&stop, waits, &tally);
    let s = r.a.status("m0");
    eprintln!("status after the rebuild: {:#}", s["local"]);
    assert!(s["local"]["rebuild_copied_bytes"].as_u64().unwrap() > 0);
    assert_eq!(s["local"]["rebuild_regions"], 0);
    let remote_reads = s["local"]["remote_reads"].as_u64().unwrap();
    // Reads are local again: more reads do not go to the leg.
    read_volume(&r.a, "m0");
    assert_eq!(
        r.a.status("m0")["local"]["remote_reads"].as_u64().unwrap(),
        remote_reads
    );
    wait_for(Duration::from_secs(30), "a synced, clean leg", || {
        let s = r.a.status("m0");
        s["legs"][0]["state"] == "synced" && s["legs"][0]["dirty_regions"] == 0
    });
    flush(&r.a);
    assert_same(
        &read_file(&r.base, SIZE),
        &r.leg.read(SIZE),
        "rebuilt local vs remote leg",
    );
}

/// The failed device is replaced by a new (blank) file volume: the whole
/// device is rebuilt onto it under load, and save_config names it.
#[test]
fn failed_local_device_is_replaced_under_load() {
    let mut r = rig("recover-replace", json!({}), false);
    let stop = Arc::new(AtomicBool::new(false));
    let _guard = StopOnDrop(stop.clone());
    let tally = Arc::new(Tally::default());
    let waits = workload(&r.a, stop.clone(), tally.clone());
    wait_for(Duration::from_secs(20), "host I/O", || {
        tally.reads.load(Ordering::Relaxed) > 200
    });
    r.a.call(
        "bdev_error_inject_error",
        json!({"name": "EE_base", "io_type": "write", "num": 1}),
    );
    wait_for(Duration::from_secs(10), "the local leg to fail", || {
        local_state(&mut r.a) == "failed"
    });
    let repl = r.a.uring("repl", SIZE);
    let e =
        r.a.rpc
            .call(
                "mirror_recover_local",
                Some(json!({"name": "m0", "replacement_bdev": "nope"})),
            )
            .expect_err("no such volume");
    assert!(format!("{e:?}").contains("replacement_bdev"), "{e:?}");
    r.a.call(
        "mirror_recover_local",
        json!({"name": "m0", "replacement_bdev": "repl"}),
    );
    wait_for(
        Duration::from_secs(60),
        "the replacement to be rebuilt",
        || local_state(&mut r.a) == "healthy",
    );
    let writes0 = tally.writes.load(Ordering::Relaxed);
    wait_for(
        Duration::from_secs(20),
        "host I/O after the rebuild",
        || tally.writes.load(Ordering::Relaxed) > writes0 + 100,
    );
    stop_and_check(&stop, waits, &tally);
    let s = r.a.status("m0");
    assert_eq!(s["local"]["volume"], "repl", "{s:#}");
    assert_eq!(s["local_volume"], "repl", "{s:#}");
    assert!(
        s["local"]["rebuild_copied_bytes"].as_u64().unwrap() >= SIZE,
        "a replacement is rebuilt whole: {s:#}"
    );
    let cfg = r.a.call("save_config", json!({}));
    let create = cfg["subsystems"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|s| s["config"].as_array().unwrap().iter())
        .find(|c| c["method"] == "mirror_create")
        .unwrap()
        .clone();
    assert_eq!(create["params"]["volume"], "repl", "{create:#}");
    wait_for(Duration::from_secs(30), "a synced, clean leg", || {
        let s = r.a.status("m0");
        s["legs"][0]["state"] == "synced" && s["legs"][0]["dirty_regions"] == 0
    });
    flush(&r.a);
    assert_same(
        &read_file(&repl, SIZE),
        &r.leg.read(SIZE),
        "replacement vs remote leg",
    );
}

/// With a spare configured (`spare_bdev`, a RAM volume here), a local
/// failure rebuilds onto it by itself.
#[test]
fn configured_spare_takes_over_by_itself() {
    let mut r = rig("recover-spare", json!({}), true);
    let e =
        r.a.rpc
            .call("mirror_recover_local", Some(json!({"name": "m0"})))
            .expect_err("healthy: nothing to recover");
    assert!(format!("{e:?}").contains("healthy"), "{e:?}");
    // The error bdev's RPCs refuse what they must, naming the field.
    let e =
        r.a.rpc
            .call("bdev_error_delete", Some(json!({"name": "base"})))
            .expect_err("not an error volume");
    assert!(format!("{e:?}").contains("name"), "{e:?}");
    r.a.rpc
        .call("bdev_delete", Some(json!({"name": "base"})))
        .expect_err("wrapped by EE_base");
    let e =
        r.a.rpc
            .call(
                "bdev_error_inject_error",
                Some(json!({"name": "EE_base", "io_type": "write", "num": 0})),
            )
            .expect_err("zero errors");
    assert!(format!("{e:?}").contains("num"), "{e:?}");
    r.a.rpc
        .call(
            "bdev_error_inject_error",
            Some(json!({"name": "EE_base", "io_type": "sideways"})),
        )
        .expect_err("no such I/O type");
    let stop = Arc::new(AtomicBool::new(false));
    let _guard = StopOnDrop(stop.clone());
    let tally = Arc::new(Tally::default());
    let waits = workload(&r.a, stop.clone(), tally.clone());
    wait_for(Duration::from_secs(20), "host I/O", || {
        tally.reads.load(Ordering::Relaxed) > 100
    });
    r.a.call(
        "bdev_error_inject_error",
        json!({"name": "EE_base", "io_type": "read", "permanent": true}),
    );
    wait_for(Duration::from_secs(60), "the spare to be rebuilt", || {
        let s = r.a.status("m0");
        s["local"]["volume"] == "spare" && s["local"]["state"] == "healthy"
    });
    stop_and_check(&stop, waits, &tally);
    wait_for(Duration::from_secs(30), "a synced, clean leg", || {
        let s = r.a.status("m0");
        s["legs"][0]["state"] == "synced" && s["legs"][0]["dirty_regions"] == 0
    });
    flush(&r.a);
    assert_same(
        &read_volume(&r.a, "spare"),
        &r.leg.read(SIZE),
        "spare vs remote leg",
    );
}
