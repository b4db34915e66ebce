//! The online consistency check (`mirror_verify`) and repair
//! (`mirror_repair`) between two in-process daemons on 127.0.0.x: ranges
//! corrupted behind the target's back on the remote leg (written straight
//! to the hosted site's storage-server volumes) are reported exactly, both
//! repair directions fix them, and a verify running under a host write
//! workload reports nothing false. The kill -9 drills are in
//! `mirror_verify_crash.rs`.

mod common;

use common::*;
use mirrorpoint_poller::{buffer_pool, spawn};
use mirrorpoint_target::mirror::service::pattern_byte;
use mirrorpoint_target::units::ByteOffset;
use serde_json::{json, Value};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const MIB: u64 = 1 << 20;
const SIZE: u64 = 64 * MIB;
const REGION: u64 = 64 * 1024;

struct Pair {
    _dir: TempDir,
    a: Site,
    b: Site,
    leg: LegMap,
    local: PathBuf,
    /// (logical offset, len, storage-server volume name, device offset).
    extents: Vec<(u64, u64, String, u64)>,
}

fn pair(tag: &str) -> Pair {
    let dir = TempDir::new(tag);
    let mut a = Site::start(&dir.0.join("a"), "east", 1, "127.0.0.2", true);
    let mut b = Site::start(&dir.0.join("b"), "west", 2, "127.0.0.3", false);
    // The leg spans two storage servers (neither has room alone).
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
    let local = a.uring("local", SIZE);
    let created = a.call(
        "mirror_create",
        json!({"name": "m0", "volume": "local", "link_timeout_ms": 3000, "resync_rate": 0}),
    );
    let leg = LegMap::from_create(&created, &[s1, s2]);
    assert!(
        leg.0.len() >= 2,
        "leg should span both servers: {created:#}"
    );
    let extents = created["legs"][0]["extents"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["logical_offset"].as_u64().unwrap(),
                e["len"].as_u64().unwrap(),
                format!("s{}", e["server"].as_u64().unwrap()),
                e["device_offset"].as_u64().unwrap(),
            )
        })
        .collect();
    a.wait_leg("m0", "synced", Duration::from_secs(60));
    Pair {
        _dir: dir,
        a,
        b,
        leg,
        local,
        extents,
    }
}

impl Pair {
    /// Writes a pattern straight to the remote leg's storage-server volumes
    /// (behind the mirror's back), at logical `offset..offset+len`.
    fn corrupt_leg(&mut self, offset: u64, len: u64, seed: u64) {
        for (lo, l, vol, dev) in self.extents.clone() {
            let (a, b) = (offset.max(lo), (offset + len).min(lo + l));
            if a >= b {
                continue;
            }
            self.b.call(
                "bdev_write_pattern",
                json!({"name": vol, "offset": dev + (a - lo), "len": b - a, "seed": seed}),
            );
        }
    }

    fn verify(&mut self, rate: u64) -> Value {
        self.a
            .call("mirror_verify", json!({"name": "m0", "rate": rate}));
        self.wait_job("finished")
    }

    fn wait_job(&mut self, state: &str) -> Value {
        let t0 = Instant::now();
        loop {
            let v = self.a.call("mirror_verify_get", json!({"name": "m0"}));
            if v["state"] == state && v["active"] == false {
                return v;
            }
            assert!(v["state"] != "failed", "verify failed: {v:#}");
            if t0.elapsed() > Duration::from_secs(60) {
                panic!("verify never reached {state}: {v:#}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn compare(&mut self, what: &str) {
        wait_for(Duration::from_secs(30), "a synced, clean leg", || {
            let s = self.a.status("m0");
            s["legs"][0]["state"] == "synced" && s["legs"][0]["dirty_regions"] == 0
        });
        flush(&self.a, "m0");
        assert_same(&read_file(&self.local, SIZE), &self.leg.read(SIZE), what);
    }
}

fn flush(site: &Site, name: &str) {
    let st = site.daemon.as_ref().unwrap().state().clone();
    let vol = st.volumes.get(name).unwrap();
    st.reactors[0]
        .block_on(move || async move { vol.channel().flush().await.expect("flush") })
        .unwrap();
}

/// The region-aligned, merged ranges covering the given byte ranges.
fn expected(ranges: &[(u64, u64)]) -> Vec<Value> {
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
    out.into_iter()
        .map(|(s, n)| json!({"offset": s * REGION, "length": n * REGION, "legs": [0]}))
        .collect()
}

fn pattern(seed: u64, offset: u64, len: u64) -> Vec<u8> {
    (offset..offset + len)
        .map(|p| pattern_byte(seed, p))
        .collect()
}

/// Corrupts exact ranges on the leg; verify reports exactly them; repair
/// in each direction fixes them; a re-verify is clean and the legs are
/// byte-identical. Also the RPCs' errors.
#[test]
fn verify_reports_exactly_the_corrupted_ranges_and_repair_fixes_them() {
    let mut p = pair("verify");
    // Some data through the mirror (both legs).
    p.a.call(
        "bdev_write_pattern",
        json!({"name": "m0", "offset": 0, "len": 12 * MIB, "seed": 7}),
    );
    // A clean mirror verifies clean.
    let v = p.verify(0);
    assert_eq!(v["out_of_sync"], json!([]), "{v:#}");
    assert_eq!(v["checked_bytes"], SIZE);
    assert_eq!(v["skipped_bytes"], json!([0]));

    // Behind the target's back: one 4 KiB block, a 100 KiB run over three
    // regions, a run across the boundary between the leg's two extents,
    // the very last block of the volume.
    let boundary = p.extents[0].0 + p.extents[0].1;
    let corrupt = [
        (MIB + 8192, 4096),
        (5 * MIB + 60 * 1024, 100 * 1024),
        (boundary - 8192, 16384),
        (SIZE - 4096, 4096),
    ];
    for (i, &(o, l)) in corrupt.iter().enumerate() {
        p.corrupt_leg(o, l, 100 + i as u64);
    }
    let v = p.verify(0);
    let want = expected(&corrupt);
    assert_eq!(v["out_of_sync"], json!(want), "{v:#}");
    let st = p.a.status("m0");
    assert_eq!(st["out_of_sync"], json!(want), "mirror_get_status: {st:#}");
    assert_eq!(st["verify"]["state"], "finished");
    assert!(
        st["verify"]["finished_unix_ms"].as_u64().unwrap()
            >= st["verify"]["started_unix_ms"].as_u64().unwrap()
    );

    // Bad parameters are refused, naming the field.
    for (params, field) in [
        (json!({"name": "m0", "direction": "sideways"}), "direction"),
        (json!({"name": "m0", "direction": "from_leg"}), "leg"),
        (
            json!({"name": "m0", "direction": "from_leg", "leg": 3}),
            "leg",
        ),
        (
            json!({"name": "m0", "direction": "local_to_legs", "leg": 0}),
            "leg",
        ),
    ] {
        let e =
            p.a.rpc
                .call("mirror_repair", Some(params.clone()))
                .unwrap_err();
        assert_eq!(e.rpc_code(), Some(-32602), "{params}: {e}");
        assert!(e.to_string().contains(field), "{params}: {e}");
    }
    let e =
        p.a.rpc
            .call("mirror_verify", Some(json!({"name": "m0", "rate": "fast"})))
            .unwrap_err();
    assert_eq!(e.rpc_code(), Some(-32602));
    assert!(e.to_string().contains("rate"), "{e}");
    let e =
        p.a.rpc
            .call("mirror_verify", Some(json!({"name": "nope"})))
            .unwrap_err();
    assert_eq!(e.rpc_code(), Some(-libc::ENODEV), "{e}");

    // Repair: the local data wins.
    p.a.call(
        "mirror_repair",
        json!({"name": "m0", "direction": "local_to_legs"}),
    );
    let v = p.wait_job("finished");
    assert_eq!(v["out_of_sync"], json!([]), "re-verify after repair: {v:#}");
    assert_eq!(
        v["total_bytes"].as_u64().unwrap(),
        want.iter()
            .map(|w| w["length"].as_u64().unwrap())
            .sum::<u64>(),
        "the re-verify covers exactly the repaired ranges: {v:#}"
    );
    p.compare("after repair local_to_legs");
    let e =
        p.a.rpc
            .call(
                "mirror_repair",
                Some(json!({"name": "m0", "direction": "local_to_legs"})),
            )
            .unwrap_err();
    assert_eq!(
        e.rpc_code(),
        Some(-libc::EALREADY),
        "nothing to repair: {e}"
    );

    // Corrupt again; this time the leg's data wins.
    let corrupt = [(3 * MIB, 200 * 1024), (40 * MIB + 4096, 8192)];
    for (i, &(o, l)) in corrupt.iter().enumerate() {
        p.corrupt_leg(o, l, 200 + i as u64);
    }
    let v = p.verify(0);
    assert_eq!(v["out_of_sync"], json!(expected(&corrupt)), "{v:#}");
    p.a.call(
        "mirror_repair",
        json!({"name": "m0", "direction": "from_leg", "leg": 0}),
    );
    let v = p.wait_job("finished");
    assert_eq!(v["out_of_sync"], json!([]), "{v:#}");
    p.compare("after repair from_leg");
    // The local leg now holds what was written to the remote one.
    let local = read_file(&p.local, SIZE);
    for (i, &(o, l)) in corrupt.iter().enumerate() {
        assert!(
            local[o as usize..(o + l) as usize] == pattern_at(&p, o, l, 200 + i as u64)[..],
            "range {o}+{l} not taken from the leg"
        );
    }
}

/// What `corrupt_leg(offset, len, seed)` wrote, as the leg's logical bytes.
fn pattern_at(p: &Pair, offset: u64, len: u64, seed: u64) -> Vec<u8> {
    let mut out = Vec::new();
    for (lo, l, _, dev) in &p.extents {
        let (a, b) = (offset.max(*lo), (offset + len).min(lo + l));
        if a < b {
            out.extend(pattern(seed, dev + (a - lo), b - a));
        }
    }
    out
}

/// A second verify while one runs is refused; cancel stops it; the rate
/// cap holds it back.
#[test]
fn verify_is_one_at_a_time_rate_limited_and_cancellable() {
    let mut p = pair("verify-rate");
    let rate = 8 * MIB;
    p.a.call("mirror_verify", json!({"name": "m0", "rate": rate}));
    let e =
        p.a.rpc
            .call("mirror_verify", Some(json!({"name": "m0"})))
            .unwrap_err();
    assert_eq!(e.rpc_code(), Some(-libc::EBUSY), "{e}");
    let e =
        p.a.rpc
            .call(
                "mirror_repair",
                Some(json!({"name": "m0", "direction": "local_to_legs"})),
            )
            .unwrap_err();
    assert_eq!(e.rpc_code(), Some(-libc::EBUSY), "{e}");
    std::thread::sleep(Duration::from_millis(1000));
    let v = p.a.call("mirror_verify_get", json!({"name": "m0"}));
    assert_eq!(v["state"], "running");
    let checked = v["checked_bytes"].as_u64().unwrap();
    // 1 s at 8 MiB/s (+ one step of slack; the first steps are not paced
    // until they are due).
    assert!(
        checked > 0 && checked <= rate * 3 / 2 + MIB,
        "checked {checked} in ~1 s at {rate} B/s"
    );
    p.a.call(
        "mirror_verify_set_rate",
        json!({"name": "m0", "bytes_per_second": MIB}),
    );
    p.a.call("mirror_verify_cancel", json!({"name": "m0"}));
    let v = p.wait_job("cancelled");
    assert!(v["checked_bytes"].as_u64().unwrap() < SIZE, "{v:#}");
    assert_eq!(v["rate_limit"], MIB);
    let e =
        p.a.rpc
            .call("mirror_verify_cancel", Some(json!({"name": "m0"})))
            .unwrap_err();
    assert_eq!(e.rpc_code(), Some(-libc::EALREADY), "{e}");
    let e =
        p.a.rpc
            .call(
                "mirror_repair",
                Some(json!({"name": "m0", "direction": "local_to_legs"})),
            )
            .unwrap_err();
    assert_eq!(
        e.rpc_code(),
        Some(-libc::EALREADY),
        "repair needs a finished verify: {e}"
    );
}

fn xorshift(x: &mut u64) -> u64 {
    *x ^= *x << 13;
    *x ^= *x >> 7;
    *x ^= *x << 17;
    *x
}

/// Host writes on both cores, hammering a hot 2 MiB and the whole volume,
/// during several verify passes: nothing is reported (the ranges being
/// written are never compared mid-write), and the legs end identical.
#[test]
fn verify_under_host_writes_reports_nothing_false() {
    let mut p = pair("verify-busy");
    let st = p.a.daemon.as_ref().unwrap().state().clone();
    let vol = st.volumes.get("m0").unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let writes = Arc::new(AtomicU64::new(0));
    let waits: Vec<_> = st
        .reactors
        .iter()
        .enumerate()
        .map(|(core, r)| {
            let (vol, stop, writes) = (vol.clone(), stop.clone(), writes.clone());
            r.spawn(move || async move {
                let tasks: Vec<_> = (0..8u64)
                    .map(|t| {
                        let (vol, stop, writes) = (vol.clone(), stop.clone(), writes.clone());
                        spawn(async move {
                            let ch = vol.channel();
                            let mut x = 0x9e37_79b9 ^ (core as u64 * 131 + t + 1);
                            let mut i = 0u64;
                            while !stop.load(Ordering::Relaxed) {
                                let r = xorshift(&mut x);
                                let blocks = 1 + (r % 32);
                                let off = if r % 3 == 0 {
                                    (r >> 8) % (SIZE / 4096 - blocks) * 4096
                                } else {
                                    (r >> 8) % (512 - blocks) * 4096
                                };
                                let mut b = buffer_pool()
                                    .alloc((blocks * 4096) as usize)
                                    .expect("buffer");
                                let stamp = (core as u64) << 56 | t << 48 | i;
                                for (k, c) in b.chunks_mut(8).enumerate() {
                                    c.copy_from_slice(&(stamp ^ k as u64).to_le_bytes());
                                }
                                ch.write(ByteOffset(off), b.freeze())
                                    .await
                                    .0
                                    .expect("host write");
                                writes.fetch_add(1, Ordering::Relaxed);
                                i += 1;
                            }
                        })
                    })
                    .collect();
                for t in tasks {
                    t.await;
                }
            })
        })
        .collect();
    let mut passes = 0;
    let t0 = Instant::now();
    while passes < 3 || t0.elapsed() < Duration::from_secs(3) {
        let before = writes.load(Ordering::Relaxed);
        let v = p.verify(0);
        passes += 1;
        let during = writes.load(Ordering::Relaxed) - before;
        assert_eq!(
            v["out_of_sync"],
            json!([]),
            "false report with {during} host writes during the pass: {v:#}"
        );
        assert!(during > 0, "no host write ran during the pass");
        // Regions are skipped only if the leg dropped out (a loaded machine
        // can time a link out); most of the pass must have been compared.
        let skipped = v["skipped_bytes"][0].as_u64().unwrap();
        assert!(skipped < SIZE / 2, "pass compared too little: {v:#}");
        if passes > 20 {
            break;
        }
    }
    stop.store(true, Ordering::SeqCst);
    for w in waits {
        w.recv_blocking().expect("writers");
    }
    eprintln!(
        "{passes} verify passes, {} host writes, status {:#}",
        writes.load(Ordering::Relaxed),
        p.a.status("m0")["verify"]
    );
    p.compare("after verifying under writes");
}

/// Two remote legs (the second added online on the remote site's third
/// storage server): verify names exactly the legs that differ per range,
/// and a `from_leg` repair from leg 1 makes the local leg and leg 0 hold
/// leg 1's data where leg 1 differs, and the local data elsewhere.
#[test]
fn two_legs_verify_names_the_differing_legs_and_from_leg_repairs_all() {
    let mut p = pair("verify-2legs");
    let s3 = p.b.uring("s3", 64 * MIB);
    p.b.call(
        "agent_add_storage_server",
        json!({"name": "ss3", "id": 3, "volumes": ["s3"]}),
    );
    // Let the master see the new server in a capacity report.
    std::thread::sleep(Duration::from_millis(1200));
    let added =
        p.a.call("mirror_add_leg", json!({"name": "m0", "domain": 2}));
    assert_eq!(added["leg"], 1, "{added:#}");
    let ext1: Vec<(u64, u64, String, u64)> = added["extents"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["logical_offset"].as_u64().unwrap(),
                e["len"].as_u64().unwrap(),
                format!("s{}", e["server"].as_u64().unwrap()),
                e["device_offset"].as_u64().unwrap(),
            )
        })
        .collect();
    assert!(ext1.iter().all(|e| e.2 == "s3"), "{added:#}");
    wait_for(Duration::from_secs(60), "leg 1 synced", || {
        p.a.status("m0")["legs"][1]["state"] == "synced"
    });
    p.a.call(
        "bdev_write_pattern",
        json!({"name": "m0", "offset": 0, "len": 12 * MIB, "seed": 9}),
    );
    let leg0 = p.extents.clone();
    let mut corrupt = |extents: &[(u64, u64, String, u64)], offset: u64, len: u64, seed: u64| {
        for (lo, l, vol, dev) in extents {
            let (a, b) = (offset.max(*lo), (offset + len).min(lo + l));
            if a < b {
                p.b.call(
                    "bdev_write_pattern",
                    json!({"name": vol, "offset": dev + (a - lo), "len": b - a, "seed": seed}),
                );
            }
        }
    };
    corrupt(&ext1, 2 * MIB, 4096, 31); // leg 1 only
    corrupt(&leg0, 6 * MIB, 65536, 32); // both legs, differently
    corrupt(&ext1, 6 * MIB, 65536, 33);
    corrupt(&leg0, 9 * MIB + 8192, 4096, 34); // leg 0 only
    let v = p.verify(0);
    assert_eq!(
        v["out_of_sync"],
        json!([
            {"offset": 2 * MIB, "length": REGION, "legs": [1]},
            {"offset": 6 * MIB, "length": REGION, "legs": [0, 1]},
            {"offset": 9 * MIB, "length": REGION, "legs": [0]},
        ]),
        "{v:#}"
    );
    assert_eq!(v["skipped_bytes"], json!([0, 0]), "{v:#}");
    p.a.call(
        "mirror_repair",
        json!({"name": "m0", "direction": "from_leg", "leg": 1}),
    );
    let v = p.wait_job("finished");
    assert_eq!(v["out_of_sync"], json!([]), "{v:#}");
    flush(&p.a, "m0");
    let local = read_file(&p.local, SIZE);
    let l0 = p.leg.read(SIZE);
    let l1 = LegMap::from_create(
        &json!({"legs": [added.clone()]}),
        &[s3.clone(), s3.clone(), s3],
    )
    .read(SIZE);
    assert_same(&local, &l0, "local vs leg 0 after from_leg 1");
    assert_same(&local, &l1, "local vs leg 1 after from_leg 1");
    // Where leg 1 differed, its data won; at 9 MiB (leg 1 agreed with the
    // local leg) the local data won.
    let p1 = |off: u64, len: u64, seed: u64| -> Vec<u8> {
        let mut out = Vec::new();
        for (lo, l, _, dev) in &ext1 {
            let (a, b) = (off.max(*lo), (off + len).min(lo + l));
            if a < b {
                out.extend(pattern(seed, dev + (a - lo), b - a));
            }
        }
        out
    };
    let at = |o: u64, l: u64| &local[o as usize..(o + l) as usize];
    assert!(
        at(2 * MIB, 4096) == &p1(2 * MIB, 4096, 31)[..],
        "2 MiB: leg 1's data"
    );
    assert!(
        at(6 * MIB, 65536) == &p1(6 * MIB, 65536, 33)[..],
        "6 MiB: leg 1's data"
    );
    assert!(
        at(9 * MIB + 8192, 4096) == &pattern(9, 9 * MIB + 8192, 4096)[..],
        "9 MiB: the local data (written through the mirror with seed 9)"
    );
}
