//! Third mirror allocation and leg changes, end to end: daemons on
//! 127.0.0.x (east: master agent and primary; west: two storage servers;
//! north: one), legs added and removed online under a verifying write
//! workload, auto-replacement of a leg whose site stopped, and `kill -9`
//! of the primary in the middle of a new leg's full sync. Legs are compared
//! byte for byte from their backing files.

mod common;

use common::process::{crc_of_pattern, proc_sites, Proc, ProcSites};
use common::volume::{flush, write_sync};
use common::*;
use mirrorpoint_poller::{buffer_pool, spawn};
use mirrorpoint_target::rpc::RpcClient;
use mirrorpoint_target::units::ByteOffset;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const MIB: u64 = 1 << 20;
const SIZE: u64 = 32 * MIB;
const BLOCK: u64 = 64 * 1024;

/// Storage server files per site name (server id `i` is `files[i - 1]`).
type Files = HashMap<String, Vec<PathBuf>>;

struct Sites {
    dir: TempDir,
    east: Site,
    west: Option<Site>,
    north: Site,
    files: Files,
    local: PathBuf,
}

fn sites(tag: &str, extra: Value) -> Sites {
    let dir = TempDir::new(tag);
    let mut east = Site::start(&dir.0.join("east"), "east", 1, "127.0.0.2", true);
    let mut west = Site::start(&dir.0.join("west"), "west", 2, "127.0.0.3", false);
    let mut north = Site::start(&dir.0.join("north"), "north", 3, "127.0.0.5", false);
    let mut files = Files::new();
    for (site, name, n) in [(&mut west, "west", 2), (&mut north, "north", 1)] {
        let mut v = Vec::new();
        for i in 1..=n {
            let f = site.uring(&format!("s{i}"), 40 * MIB);
            site.call(
                "agent_add_storage_server",
                json!({"name": format!("ss{i}"), "id": i, "volumes": [format!("s{i}")]}),
            );
            v.push(f);
        }
        files.insert(name.to_string(), v);
    }
    let (ea, wa, na) = (
        east.addr.to_string(),
        west.addr.to_string(),
        north.addr.to_string(),
    );
    east.call(
        "agent_add_peer",
        json!({"name": "west", "domain": 2, "address": wa}),
    );
    east.call(
        "agent_add_peer",
        json!({"name": "north", "domain": 3, "address": na}),
    );
    for s in [&mut west, &mut north] {
        s.call(
            "agent_add_peer",
            json!({"name": "east", "domain": 1, "address": ea, "master": true}),
        );
    }
    wait_for(
        Duration::from_secs(10),
        "capacity reports at the master",
        || {
            east.call("agent_get_sites", json!({}))["peers"]
                .as_array()
                .unwrap()
                .iter()
                .all(|p| !p["last_report_ms"].is_null())
        },
    );
    let local = east.uring("local", SIZE);
    let mut params =
        json!({"name": "m0", "volume": "local", "link_timeout_ms": 600, "resync_rate": 0});
    if let (Some(p), Some(e)) = (params.as_object_mut(), extra.as_object()) {
        p.extend(e.clone());
    }
    let created = east.call("mirror_create", params);
    // The master picks the domain with the most room: west.
    assert_eq!(created["legs"][0]["site"], "west", "{created:#}");
    Sites {
        dir,
        east,
        west: Some(west),
        north,
        files,
        local,
    }
}

/// A leg as files, from its extent map.
fn leg_map(extents: &Value, servers: &[PathBuf]) -> LegMap {
    LegMap(
        extents
            .as_array()
            .expect("extents")
            .iter()
            .map(|e| {
                let id = e["server"].as_u64().unwrap() as usize;
                (
                    e["logical_offset"].as_u64().unwrap(),
                    e["len"].as_u64().unwrap(),
                    servers[id - 1].clone(),
                    e["device_offset"].as_u64().unwrap(),
                )
            })
            .collect(),
    )
}

/// Every leg of the mirror's record, as (slot, site, files).
fn record_legs(data_dir: &Path, files: &Files) -> Vec<(usize, String, LegMap)> {
    let text = std::fs::read_to_string(data_dir.join("mirror-m0.json")).expect("record");
    let r: Value = serde_json::from_str(&text).expect("record json");
    r["legs"]
        .as_array()
        .unwrap()
        .iter()
        .enumerate()
        .map(|(i, l)| {
            let site = l["site"].as_str().unwrap().to_string();
            let slot = l["slot"].as_u64().map_or(i, |s| s as usize);
            (slot, site.clone(), leg_map(&l["extents"], &files[&site]))
        })
        .collect()
}

fn leg(status: &Value, slot: usize) -> &Value {
    status["legs"]
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["leg"] == slot)
        .unwrap_or_else(|| panic!("no leg {slot}: {status:#}"))
}

fn all_synced_and_clean(s: &Value) -> bool {
    s["legs"]
        .as_array()
        .unwrap()
        .iter()
        .all(|l| l["state"] == "synced" && l["dirty_regions"] == 0)
}

/// Compares the local volume with every leg of the record.
fn compare_all(s: &mut Sites, want_legs: usize) {
    wait_for(
        Duration::from_secs(60),
        "every leg synced and clean",
        || all_synced_and_clean(&s.east.status("m0")),
    );
    flush(&s.east, "m0");
    let local = read_file(&s.local, SIZE);
    let legs = record_legs(&s.east.dir.join("data"), &s.files);
    assert_eq!(legs.len(), want_legs, "{:#}", s.east.status("m0"));
    for (slot, site, map) in legs {
        assert_same(
            &local,
            &map.read(SIZE),
            &format!("local vs leg {slot} at {site}"),
        );
    }
}

/// A verifying workload on both cores: each task owns 8 blocks and keeps
/// the last acknowledged version of each.
struct Workload {
    stop: Arc<AtomicBool>,
    acked: Arc<AtomicU64>,
    waits: Vec<mirrorpoint_poller::OneshotReceiver<Vec<OwnerModel>>>,
}

const TASKS: u64 = 6;

/// A writer task's id and the last version it wrote to each of its blocks.
type OwnerModel = (u64, Vec<u64>);

fn block_offset(owner: u64, slot: u64) -> u64 {
    (owner * 8 + slot) * BLOCK * 2 + 4 * MIB
}

impl Workload {
    fn start(site: &Site) -> Workload {
        let st = site.daemon.as_ref().unwrap().state().clone();
        let vol = st.volumes.get("m0").unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let acked = Arc::new(AtomicU64::new(0));
        let waits = st
            .reactors
            .iter()
            .enumerate()
            .map(|(core, r)| {
                let (vol, stop, acked) = (vol.clone(), stop.clone(), acked.clone());
                r.spawn(move || async move {
                    let tasks: Vec<_> = (0..TASKS)
                        .map(|t| {
                            let (vol, stop, acked) = (vol.clone(), stop.clone(), acked.clone());
                            spawn(async move {
                                let ch = vol.channel();
                                let owner = core as u64 * TASKS + t;
                                let mut model = vec![0u64; 8];
                                let mut v = 0u64;
                                while !stop.load(Ordering::Relaxed) {
                                    v += 1;
                                    let slot = (v * 7 + owner) % 8;
                                    let mut b = buffer_pool().alloc(BLOCK as usize).expect("buf");
                                    let stamp = owner << 32 | v;
                                    for (k, c) in b.chunks_mut(8).enumerate() {
                                        c.copy_from_slice(&(stamp ^ k as u64).to_le_bytes());
                                    }
                                    ch.write(ByteOffset(block_offset(owner, slot)), b.freeze())
                                        .await
                                        .0
                                        .expect("host write failed");
                                    model[slot as usize] = stamp;
                                    acked.fetch_add(1, Ordering::Relaxed);
                                    mirrorpoint_poller::sleep(Duration::from_millis(1)).await;
                                }
                                (owner, model)
                            })
                        })
                        .collect();
                    let mut out = Vec::new();
                    for t in tasks {
                        out.push(t.await);
                    }
                    out
                })
            })
            .collect();
        Workload { stop, acked, waits }
    }

    /// Stops the writers and checks the local volume holds every
    /// acknowledged version.
    fn finish(self, local: &Path) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        let mut models = Vec::new();
        for w in self.waits {
            models.extend(w.recv_blocking().expect("writers"));
        }
        let data = read_file(local, SIZE);
        for (owner, model) in models {
            for (slot, want) in model.iter().enumerate() {
                if *want == 0 {
                    continue;
                }
                let off = block_offset(owner, slot as u64) as usize;
                let got = u64::from_le_bytes(data[off..off + 8].try_into().unwrap());
                assert_eq!(
                    got, *want,
                    "acknowledged write lost (owner {owner}, slot {slot})"
                );
            }
        }
        self.acked.load(Ordering::Relaxed)
    }
}

/// `mirror_add_leg` under a verifying workload: the new leg is placed in a
/// domain holding none of the mirror's legs (north), receives live writes
/// while its full sync runs, and ends synced and identical; a fourth leg
/// asked in west goes to west's other storage server; a fifth finds no
/// server without a leg of the mirror and is refused.
#[test]
fn third_leg_added_under_a_verifying_workload_ends_identical() {
    let mut s = sites("legs-add", json!({}));
    s.east.wait_leg("m0", "synced", Duration::from_secs(60));
    let w = Workload::start(&s.east);
    std::thread::sleep(Duration::from_millis(300));
    // Slow the full sync down so that many writes land during it.
    s.east.call(
        "mirror_set_resync_rate",
        json!({"name": "m0", "bytes_per_second": 16 * MIB}),
    );
    let before = w.acked.load(Ordering::Relaxed);
    let added = s.east.call("mirror_add_leg", json!({"name": "m0"}));
    assert_eq!(added["site"], "north", "{added:#}");
    assert_eq!(added["leg"], 1, "{added:#}");
    let st = s.east.status("m0");
    assert_eq!(st["legs"].as_array().unwrap().len(), 2, "{st:#}");
    let l1 = leg(&st, 1);
    assert!(
        l1["state"] != "synced" && l1["dirty_regions"].as_u64().unwrap() > 0,
        "a new leg starts with a full sync to do: {st:#}"
    );
    wait_for(Duration::from_secs(60), "leg 1 synced", || {
        leg(&s.east.status("m0"), 1)["state"] == "synced"
    });
    let during = w.acked.load(Ordering::Relaxed) - before;
    assert!(during > 50, "only {during} writes during the full sync");
    assert!(
        leg(&s.east.status("m0"), 1)["resync_copied_bytes"]
            .as_u64()
            .unwrap()
            >= SIZE
    );
    // The same domain again, explicitly: the other storage server.
    let fourth = s
        .east
        .call("mirror_add_leg", json!({"name": "m0", "domain": 2}));
    assert_eq!(fourth["site"], "west");
    assert_eq!(fourth["leg"], 2);
    assert!(
        fourth["extents"]
            .as_array()
            .unwrap()
            .iter()
            .all(|e| e["server"] == 2),
        "the fourth leg must not share west's server 1 with leg 0: {fourth:#}"
    );
    // No server of any domain is free of this mirror's legs with room.
    let e = s
        .east
        .rpc
        .call("mirror_add_leg", Some(json!({"name": "m0"})))
        .expect_err("no room left");
    // ENOSPC: from the master's capacity view, or from west's agent if
    // its last report still showed server 2 free.
    assert!(format!("{e:?}").contains("code: -28"), "{e:?}");
    wait_for(Duration::from_secs(60), "leg 2 synced", || {
        leg(&s.east.status("m0"), 2)["state"] == "synced"
    });
    std::thread::sleep(Duration::from_millis(300));
    let acked = w.finish(&s.local);
    compare_all(&mut s, 3);
    let hosted = s.west.as_mut().unwrap().call("agent_get_sites", json!({}));
    assert_eq!(
        hosted["hosted_legs"].as_array().unwrap().len(),
        2,
        "{hosted:#}"
    );
    eprintln!(
        "{acked} acknowledged writes verified; status {:#}",
        s.east.status("m0")
    );
}

/// `mirror_remove_leg`: writes continue and stop reaching the removed leg,
/// its allocation is released at its agent; the leg set and the policy
/// survive save_config + restart (with nothing to resync). Bad parameters
/// are refused with -32602 naming the field.
#[test]
fn removed_leg_is_released_and_leg_set_survives_restart() {
    let mut s = sites("legs-remove", json!({}));
    s.east.wait_leg("m0", "synced", Duration::from_secs(60));
    write_sync(&s.east, 1, "m0", 0, 65536, 0x11);
    let added = s.east.call("mirror_add_leg", json!({"name": "m0"}));
    assert_eq!(added["site"], "north");
    wait_for(Duration::from_secs(60), "leg 1 synced", || {
        all_synced_and_clean(&s.east.status("m0"))
    });
    let west_leg = record_legs(&s.east.dir.join("data"), &s.files)
        .into_iter()
        .find(|l| l.0 == 0)
        .unwrap()
        .2;
    for (params, field) in [
        (json!({"name": "m0", "leg": 7}), "leg"),
        (json!({"name": "m0"}), "leg"),
        (json!({"name": "m0", "leg": 0, "x": 1}), "x"),
    ] {
        let e = s
            .east
            .rpc
            .call("mirror_remove_leg", Some(params.clone()))
            .expect_err("bad params");
        let text = format!("{e:?}");
        assert!(
            text.contains("-32602") && text.contains(field),
            "{params}: {text}"
        );
    }
    let e = s
        .east
        .rpc
        .call(
            "mirror_set_policy",
            Some(json!({"name": "m0", "auto_replace": true, "failed_timeout_ms": 5})),
        )
        .expect_err("too short");
    assert!(format!("{e:?}").contains("failed_timeout_ms"), "{e:?}");
    let e = s
        .east
        .rpc
        .call("mirror_add_leg", Some(json!({"domain": 3})))
        .expect_err("no name");
    assert!(format!("{e:?}").contains("name"), "{e:?}");

    let removed = s
        .east
        .call("mirror_remove_leg", json!({"name": "m0", "leg": 0}));
    assert_eq!(removed["released"], true, "{removed:#}");
    assert_eq!(removed["site"], "west");
    let st = s.east.status("m0");
    assert_eq!(st["legs"].as_array().unwrap().len(), 1, "{st:#}");
    assert_eq!(st["legs"][0]["leg"], 1);
    wait_for(Duration::from_secs(5), "west's release", || {
        s.west.as_mut().unwrap().call("agent_get_sites", json!({}))["hosted_legs"]
            .as_array()
            .unwrap()
            .is_empty()
    });
    // Writes continue, and no longer reach the removed leg.
    write_sync(&s.east, 1, "m0", 0, 65536, 0x22);
    write_sync(&s.east, 1, "m0", 20 * MIB, 65536, 0x23);
    assert_eq!(leg(&s.east.status("m0"), 1)["state"], "synced");
    let old = west_leg.read(SIZE);
    assert!(
        old[..65536].iter().all(|&b| b == 0x11),
        "removed leg got a write"
    );
    assert!(old[20 * MIB as usize..][..65536].iter().all(|&b| b != 0x23));
    s.east.call(
        "mirror_set_policy",
        json!({"name": "m0", "auto_replace": true, "failed_timeout_ms": 600000}),
    );

    // save_config + restart.
    let adir = s.east.dir.clone();
    let cfg = s.east.call("save_config", json!({}));
    s.east.daemon.take().unwrap().shutdown();
    let cfgfile = adir.join("saved.json");
    // Same listen port after the restart: the other agents know the master
    // there (they report capacity to it).
    let text = cfg
        .to_string()
        .replace("127.0.0.2:0", &s.east.addr.to_string());
    std::fs::write(&cfgfile, text).unwrap();
    let mut opts = options(&adir);
    opts.config_file = Some(cfgfile);
    s.east.daemon = Some(mirrorpoint_target::daemon::Daemon::start(opts).expect("restart"));
    s.east.rpc = RpcClient::connect(adir.join("rpc.sock")).unwrap();
    wait_for(
        Duration::from_secs(30),
        "leg 1 synced after restart",
        || all_synced_and_clean(&s.east.status("m0")),
    );
    let st = s.east.status("m0");
    assert_eq!(st["legs"].as_array().unwrap().len(), 1, "{st:#}");
    assert_eq!(st["legs"][0]["leg"], 1);
    assert_eq!(st["legs"][0]["site"], "north");
    assert_eq!(st["legs"][0]["resync_copied_bytes"], 0, "{st:#}");
    assert_eq!(st["policy"]["auto_replace"], true, "{st:#}");
    assert_eq!(st["policy"]["failed_timeout_ms"], 600000);
    wait_for(
        Duration::from_secs(10),
        "capacity reports after restart",
        || {
            s.east.call("agent_get_sites", json!({}))["peers"]
                .as_array()
                .unwrap()
                .iter()
                .all(|p| !p["last_report_ms"].is_null())
        },
    );
    // A new leg takes the freed slot 0 and a fresh leg id.
    let again = s
        .east
        .call("mirror_add_leg", json!({"name": "m0", "domain": 2}));
    assert_eq!(again["leg"], 0);
    assert_eq!(again["leg_id"], 2);
    write_sync(&s.east, 1, "m0", MIB, 65536, 0x33);
    compare_all(&mut s, 2);
}

/// Auto-replacement: the site of a leg stops; once the leg has been
/// unreachable for `failed_timeout_ms`, the master allocates a replacement
/// on another site, it is full-synced (writes continue meanwhile) and ends
/// identical; the event is in the status, the old allocation's release is
/// pending while its site is down and done once it is back.
#[test]
fn leg_unreachable_past_the_timeout_is_replaced() {
    let mut s = sites("legs-auto", json!({}));
    s.east.wait_leg("m0", "synced", Duration::from_secs(60));
    s.east.call(
        "mirror_set_policy",
        json!({"name": "m0", "auto_replace": true, "failed_timeout_ms": 1500}),
    );
    let w = Workload::start(&s.east);
    std::thread::sleep(Duration::from_millis(300));
    let mut west = s.west.take().unwrap();
    let west_cfg = west.call("save_config", json!({}));
    let west_addr = west.addr;
    let t_stop = Instant::now();
    west.daemon.take().unwrap().shutdown();
    wait_for(Duration::from_secs(10), "leg 0 degraded", || {
        s.east.status("m0")["legs"][0]["state"] == "degraded"
    });
    // Not before the timeout.
    std::thread::sleep(Duration::from_millis(500));
    if t_stop.elapsed() < Duration::from_millis(1400) {
        let st = s.east.status("m0");
        assert_eq!(st["legs"][0]["site"], "west", "replaced too early: {st:#}");
    }
    wait_for(Duration::from_secs(30), "a replacement at north", || {
        let st = s.east.status("m0");
        let legs = st["legs"].as_array().unwrap();
        legs.len() == 1 && legs[0]["site"] == "north"
    });
    assert!(t_stop.elapsed() >= Duration::from_millis(1500));
    wait_for(Duration::from_secs(60), "the replacement synced", || {
        all_synced_and_clean(&s.east.status("m0"))
    });
    std::thread::sleep(Duration::from_millis(200));
    let acked = w.finish(&s.local);
    let st = s.east.status("m0");
    let ev = &st["policy"]["replacements"][0];
    assert_eq!(ev["old_site"], "west", "{st:#}");
    assert_eq!(ev["new_site"], "north", "{st:#}");
    assert!(ev["down_ms"].as_u64().unwrap() >= 1500, "{st:#}");
    compare_all(&mut s, 1);
    let rec: Value = serde_json::from_str(
        &std::fs::read_to_string(s.east.dir.join("data").join("mirror-m0.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(rec["pending_release"][0]["site"], "west", "{rec:#}");
    let hosted = s.north.call("agent_get_sites", json!({}));
    assert_eq!(hosted["hosted_legs"].as_array().unwrap().len(), 1);
    eprintln!("{acked} acknowledged writes verified across the replacement; {st:#}");
    // West comes back (same address): the pending release goes through.
    let cfgfile = west.dir.join("saved.json");
    let text = west_cfg
        .to_string()
        .replace("127.0.0.3:0", &west_addr.to_string());
    std::fs::write(&cfgfile, text).unwrap();
    let mut opts = options(&west.dir);
    opts.config_file = Some(cfgfile);
    west.daemon = Some(mirrorpoint_target::daemon::Daemon::start(opts).expect("west restarts"));
    west.rpc = RpcClient::connect(west.dir.join("rpc.sock")).unwrap();
    assert_eq!(
        west.call("agent_get_sites", json!({}))["hosted_legs"]
            .as_array()
            .unwrap()
            .len(),
        1,
        "west kept the allocation while it was down"
    );
    wait_for(Duration::from_secs(20), "the pending release", || {
        west.call("agent_get_sites", json!({}))["hosted_legs"]
            .as_array()
            .unwrap()
            .is_empty()
    });
    // The record forgets it just after the release answered.
    let rpath = s.east.dir.join("data").join("mirror-m0.json");
    wait_for(
        Duration::from_secs(5),
        "no pending release in the record",
        || {
            let rec: Value =
                serde_json::from_str(&std::fs::read_to_string(&rpath).unwrap()).unwrap();
            rec.get("pending_release").is_none()
        },
    );
    // The mirror never went back to the old leg.
    assert_eq!(s.east.status("m0")["legs"].as_array().unwrap().len(), 1);
    drop(s.dir);
}

/// An auto-replacement cut by a crash after its new leg was recorded and
/// before the old one was removed (the on-disk state a `kill -9` there
/// leaves: the record names both legs and the replacement under way): after
/// the restart the old leg is removed at once (not after another timeout)
/// and no further leg is allocated.
#[test]
fn replacement_cut_by_a_crash_is_finished_after_restart() {
    let mut s = sites("legs-resume", json!({}));
    s.east.wait_leg("m0", "synced", Duration::from_secs(60));
    write_sync(&s.east, 1, "m0", 0, 65536, 0x44);
    // The replacement's first half: the new leg (north) added.
    let added = s.east.call("mirror_add_leg", json!({"name": "m0"}));
    assert_eq!(added["site"], "north");
    wait_for(Duration::from_secs(60), "both legs synced", || {
        all_synced_and_clean(&s.east.status("m0"))
    });
    s.east.call(
        "mirror_set_policy",
        json!({"name": "m0", "auto_replace": true, "failed_timeout_ms": 600000}),
    );
    let adir = s.east.dir.clone();
    let cfg = s.east.call("save_config", json!({}));
    s.east.daemon.take().unwrap().shutdown();
    // The old leg's site is down; the record says the replacement of leg
    // id 0 was under way, its new leg being id 1 or later.
    s.west.take().unwrap().daemon.take().unwrap().shutdown();
    let rpath = adir.join("data").join("mirror-m0.json");
    let mut rec: Value = serde_json::from_str(&std::fs::read_to_string(&rpath).unwrap()).unwrap();
    rec["replacing"] = json!({"old_leg_id": 0, "new_from": 1});
    std::fs::write(&rpath, rec.to_string()).unwrap();
    let cfgfile = adir.join("saved.json");
    let text = cfg
        .to_string()
        .replace("127.0.0.2:0", &s.east.addr.to_string());
    std::fs::write(&cfgfile, text).unwrap();
    let mut opts = options(&adir);
    opts.config_file = Some(cfgfile);
    let t0 = Instant::now();
    s.east.daemon = Some(mirrorpoint_target::daemon::Daemon::start(opts).expect("restart"));
    s.east.rpc = RpcClient::connect(adir.join("rpc.sock")).unwrap();
    wait_for(Duration::from_secs(10), "the old leg removed", || {
        let st = s.east.status("m0");
        let legs = st["legs"].as_array().unwrap();
        legs.len() == 1 && legs[0]["site"] == "north"
    });
    assert!(
        t0.elapsed() < Duration::from_secs(10),
        "finished at once, not after the policy's timeout"
    );
    let st = s.east.status("m0");
    assert_eq!(st["legs"][0]["leg_id"], 1, "{st:#}");
    let ev = &st["policy"]["replacements"][0];
    assert_eq!(ev["old_leg_id"], 0, "{st:#}");
    assert_eq!(ev["new_leg_id"], 1, "{st:#}");
    wait_for(Duration::from_secs(5), "the record settled", || {
        let rec: Value = serde_json::from_str(&std::fs::read_to_string(&rpath).unwrap()).unwrap();
        rec.get("replacing").is_none()
            && rec["legs"].as_array().unwrap().len() == 1
            && rec["pending_release"][0]["site"] == "west"
    });
    // No further leg anywhere.
    let hosted = s.north.call("agent_get_sites", json!({}));
    assert_eq!(
        hosted["hosted_legs"].as_array().unwrap().len(),
        1,
        "{hosted:#}"
    );
    write_sync(&s.east, 1, "m0", 2 * MIB, 65536, 0x45);
    compare_all(&mut s, 1);
}

// ---------------------------------------------------------------------------
// kill -9 in the middle of a new leg's full sync (daemons as processes).

/// Per block: last acknowledged seed, and one in flight at the kill.
type Model = Arc<Mutex<Vec<(u64, Option<u64>)>>>;

fn pattern_writers(
    sock: PathBuf,
    model: Model,
    stop: Arc<AtomicBool>,
) -> Vec<std::thread::JoinHandle<u64>> {
    (0..3usize)
        .map(|t| {
            let (sock, model, stop) = (sock.clone(), model.clone(), stop.clone());
            std::thread::spawn(move || {
                let Ok(mut c) = RpcClient::connect(&sock) else {
                    return 0;
                };
                let mut n = 0;
                let mut seed = (t as u64 + 1) << 40;
                while !stop.load(Ordering::SeqCst) {
                    seed += 1;
                    let slot = t * 16 + (seed % 16) as usize;
                    model.lock().unwrap()[slot].1 = Some(seed);
                    let r = c.call(
                        "bdev_write_pattern",
                        Some(json!({"name": "m0", "offset": block_offset(0, slot as u64), "len": BLOCK, "seed": seed})),
                    );
                    if r.is_err() {
                        return n;
                    }
                    model.lock().unwrap()[slot] = (seed, None);
                    n += 1;
                }
                n
            })
        })
        .collect()
}

/// `kill -9` of the primary while a leg added by `mirror_add_leg` is in
/// its full sync (under writes): after a restart from the saved config the
/// leg is back, its sync resumes where the durable bitmap says (not from
/// zero) and finishes; no acknowledged write is lost; all legs identical.
#[test]
fn kill_9_during_the_full_sync_of_an_added_leg_resumes_after_restart() {
    let ProcSites {
        dir,
        mut a,
        b,
        files,
    } = proc_sites("legs-crash", 2);
    let local = dir.0.join("a").join("local.img");
    a.call(
        "bdev_uring_create",
        json!({"name": "local", "filename": local, "size": SIZE, "block_size": 4096}),
    );
    a.call(
        "mirror_create",
        json!({"name": "m0", "volume": "local", "link_timeout_ms": 800, "resync_rate": 0}),
    );
    wait_for(Duration::from_secs(60), "leg 0 synced", || {
        a.status()["legs"][0]["state"] == "synced"
    });
    let model: Model = Arc::new(Mutex::new(vec![(0, None); 48]));
    let stop = Arc::new(AtomicBool::new(false));
    let ws = pattern_writers(a.dir.join("rpc.sock"), model.clone(), stop.clone());
    a.call(
        "mirror_set_resync_rate",
        json!({"name": "m0", "bytes_per_second": 8 * MIB}),
    );
    let added = a.call("mirror_add_leg", json!({"name": "m0"}));
    assert_eq!(added["site"], "west");
    assert!(added["extents"]
        .as_array()
        .unwrap()
        .iter()
        .all(|e| e["server"] == 2));
    let saved = a.call("save_config", json!({}));
    let cfg = a.dir.join("saved.json");
    std::fs::write(&cfg, saved.to_string()).unwrap();
    wait_for(Duration::from_secs(30), "the full sync 60 % done", || {
        let st = a.status();
        let l = leg(&st, 1);
        l["state"] == "syncing" && l["resync_percent"].as_f64().unwrap() >= 60.0
    });
    let st = a.status();
    assert_eq!(leg(&st, 1)["state"], "syncing", "{st:#}");
    let copied_before = leg(&st, 1)["resync_copied_bytes"].as_u64().unwrap();
    a.kill9();
    stop.store(true, Ordering::SeqCst);
    let acked: u64 = ws.into_iter().map(|w| w.join().unwrap()).sum();
    assert!(acked > 10, "only {acked} writes before the kill");

    let a = Proc::start(&a.dir.clone(), &cfg);
    wait_for(
        Duration::from_secs(60),
        "both legs synced after restart",
        || all_synced_and_clean(&a.status()),
    );
    let st = a.status();
    assert_eq!(st["legs"].as_array().unwrap().len(), 2, "{st:#}");
    let copied_after = leg(&st, 1)["resync_copied_bytes"].as_u64().unwrap();
    // Started over, it would copy every region again (SIZE); resumed, the
    // 40 % left, plus at most 250 ms of unrecorded progress (2 MiB at
    // 8 MiB/s) and the activity log's two extents (8 MiB): ~23 MiB.
    assert!(
        copied_after <= SIZE - 4 * MIB,
        "the full sync started over instead of resuming: {copied_before} bytes before the kill, {copied_after} after: {st:#}"
    );
    eprintln!(
        "full sync: {copied_before} bytes before kill -9, {copied_after} after restart; {acked} writes"
    );
    for (slot, (acked, maybe)) in model.lock().unwrap().iter().enumerate() {
        if *acked == 0 && maybe.is_none() {
            continue;
        }
        let off = block_offset(0, slot as u64);
        let got = a.call(
            "bdev_read_crc",
            json!({"name": "m0", "offset": off, "len": BLOCK}),
        )["crc32c"]
            .as_u64()
            .unwrap() as u32;
        let ok = (*acked != 0 && got == crc_of_pattern(*acked, off, BLOCK))
            || maybe.is_some_and(|s| got == crc_of_pattern(s, off, BLOCK));
        assert!(
            ok,
            "block {slot}: acknowledged write (seed {acked:#x}) lost"
        );
    }
    let mut fmap = Files::new();
    fmap.insert("west".into(), files.clone());
    let local_data = read_file(&local, SIZE);
    let legs = record_legs(&a.dir.join("data"), &fmap);
    assert_eq!(legs.len(), 2);
    for (slot, site, map) in legs {
        assert_same(
            &local_data,
            &map.read(SIZE),
            &format!("local vs leg {slot} at {site}"),
        );
    }
    drop(b);
}
