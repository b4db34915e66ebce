//! What a third mirror leg costs, on one machine (three sites on
//! 127.0.0.x, files in the temp dir): 4 KiB random writes with one remote
//! leg, during the full sync of a leg added by `mirror_add_leg`, and with
//! two remote legs; and the full sync rate of an added leg on an idle
//! mirror. Ignored by default; run with
//! `cargo test --release -p mirrorpoint-target --test mirror_legs_bench -- --ignored --nocapture`.

mod common;

use common::*;
use mirrorpoint_poller::{buffer_pool, spawn};
use mirrorpoint_target::units::ByteOffset;
use serde_json::{json, Value};
use std::time::{Duration, Instant};

const MIB: u64 = 1 << 20;
const SIZE: u64 = 256 * MIB;

/// 4 KiB random writes, 2 cores x `qd` tasks, for `secs`: (IOPS, mean µs, p99 µs).
fn run(site: &Site, name: &str, qd: usize, secs: f64) -> (f64, f64, f64) {
    let st = site.daemon.as_ref().unwrap().state().clone();
    let vol = st.volumes.get(name).unwrap();
    let waits: Vec<_> = st
        .reactors
        .iter()
        .enumerate()
        .map(|(core, r)| {
            let vol = vol.clone();
            r.spawn(move || async move {
                let tasks: Vec<_> = (0..qd)
                    .map(|t| {
                        let vol = vol.clone();
                        spawn(async move {
                            let ch = vol.channel();
                            let mut lat = Vec::new();
                            let mut x = (core * 1000 + t + 1) as u64 * 0x9e37_79b9;
                            let t0 = Instant::now();
                            while t0.elapsed().as_secs_f64() < secs {
                                x ^= x << 13;
                                x ^= x >> 7;
                                x ^= x << 17;
                                let off = (x % (SIZE / 4096)) * 4096;
                                let mut b = loop {
                                    match buffer_pool().alloc(4096) {
                                        Some(b) => break b,
                                        None => mirrorpoint_poller::yield_now().await,
                                    }
                                };
                                b[..8].copy_from_slice(&x.to_le_bytes());
                                let s = Instant::now();
                                ch.write(ByteOffset(off), b.freeze())
                                    .await
                                    .0
                                    .expect("write");
                                lat.push(s.elapsed().as_micros() as u64);
                            }
                            lat
                        })
                    })
                    .collect();
                let mut all = Vec::new();
                for t in tasks {
                    all.extend(t.await);
                }
                all
            })
        })
        .collect();
    let mut lat: Vec<u64> = waits
        .into_iter()
        .flat_map(|w| w.recv_blocking().unwrap())
        .collect();
    lat.sort_unstable();
    let n = lat.len() as f64;
    let mean = lat.iter().sum::<u64>() as f64 / n;
    let p99 = lat[((n * 0.99) as usize).min(lat.len() - 1)] as f64;
    (n / secs, mean, p99)
}

fn leg_of(s: &Value, slot: u64) -> Value {
    s["legs"]
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["leg"] == slot)
        .cloned()
        .unwrap_or(Value::Null)
}

/// Waits for leg `slot` to be synced; the seconds it took.
fn wait_synced(a: &mut Site, slot: u64) -> f64 {
    let t0 = Instant::now();
    wait_for(Duration::from_secs(300), "the added leg synced", || {
        leg_of(&a.status("m0"), slot)["state"] == "synced"
    });
    t0.elapsed().as_secs_f64()
}

#[test]
#[ignore]
fn third_leg_cost() {
    let dir = TempDir::new("legs-bench");
    let mut a = Site::start(&dir.0.join("a"), "east", 1, "127.0.0.2", true);
    let mut b = Site::start(&dir.0.join("b"), "west", 2, "127.0.0.3", false);
    let mut c = Site::start(&dir.0.join("c"), "north", 3, "127.0.0.5", false);
    for s in [&mut b, &mut c] {
        for i in 1..=2 {
            s.uring(&format!("s{i}"), SIZE);
            s.call(
                "agent_add_storage_server",
                json!({"name": format!("ss{i}"), "id": i, "volumes": [format!("s{i}")]}),
            );
        }
    }
    for (name, d, s) in [("west", 2, &b), ("north", 3, &c)] {
        a.call(
            "agent_add_peer",
            json!({"name": name, "domain": d, "address": s.addr.to_string()}),
        );
    }
    let east = a.addr.to_string();
    for s in [&mut b, &mut c] {
        s.call(
            "agent_add_peer",
            json!({"name": "east", "domain": 1, "address": east, "master": true}),
        );
    }
    wait_for(Duration::from_secs(10), "capacity reports", || {
        a.call("agent_get_sites", json!({}))["peers"]
            .as_array()
            .unwrap()
            .iter()
            .all(|p| !p["last_report_ms"].is_null())
    });
    a.uring("l0", SIZE);
    a.call(
        "mirror_create",
        json!({"name": "m0", "volume": "l0", "resync_rate": 0, "domain": 2}),
    );
    a.wait_leg("m0", "synced", Duration::from_secs(120));
    println!("| legs | workload | IOPS | mean µs | p99 µs |");
    println!("|---|---|---|---|---|");
    let (iops, mean, p99) = run(&a, "m0", 16, 3.0);
    println!("| local + 1 remote | 4 KiB random write, 2 cores x QD16 | {iops:.0} | {mean:.0} | {p99:.0} |");

    // Full sync of an added leg, idle mirror, no rate cap.
    let added = a.call("mirror_add_leg", json!({"name": "m0", "domain": 3}));
    let slot = added["leg"].as_u64().unwrap();
    let secs = wait_synced(&mut a, slot);
    let full_sync_mibs = SIZE as f64 / MIB as f64 / secs;
    let removed = a.call("mirror_remove_leg", json!({"name": "m0", "leg": slot}));
    assert_eq!(removed["released"], true);

    // Writes during the full sync of an added leg (cap 32 MiB/s: ~8 s).
    a.call(
        "mirror_set_resync_rate",
        json!({"name": "m0", "bytes_per_second": 32 * MIB}),
    );
    // The removed leg's slot is free once its supervisor ended.
    wait_for(Duration::from_secs(10), "a free slot", || {
        a.rpc
            .call("mirror_add_leg", Some(json!({"name": "m0", "domain": 3})))
            .is_ok()
    });
    let (iops, mean, p99) = run(&a, "m0", 16, 3.0);
    let s = a.status("m0");
    let syncing = s["legs"]
        .as_array()
        .unwrap()
        .iter()
        .any(|l| l["state"] == "syncing");
    println!("| local + 1 remote + 1 in full sync (32 MiB/s cap) | 4 KiB random write, 2 cores x QD16 | {iops:.0} | {mean:.0} | {p99:.0} |");
    assert!(syncing, "the full sync ended before the run did: {s:#}");
    wait_for(Duration::from_secs(300), "both legs synced", || {
        a.status("m0")["legs"]
            .as_array()
            .unwrap()
            .iter()
            .all(|l| l["state"] == "synced")
    });
    let (iops, mean, p99) = run(&a, "m0", 16, 3.0);
    println!("| local + 2 remote | 4 KiB random write, 2 cores x QD16 | {iops:.0} | {mean:.0} | {p99:.0} |");
    println!(
        "\nfull sync of an added {} MiB leg, idle mirror, no cap: {secs:.2} s = {full_sync_mibs:.0} MiB/s",
        SIZE / MIB
    );
}
