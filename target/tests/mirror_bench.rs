//! Mirror write performance on one machine (both sites on 127.0.0.x, files
//! in the temp dir): local volume vs sync mirror vs async mirror, 4 KiB
//! random writes at a queue depth, and 128 KiB sequential writes.
//! Ignored by default; run with
//! `cargo test --release -p mirrorpoint-target --test mirror_bench -- --ignored --nocapture`.

mod common;

use common::two_sites::{two_sites, TwoSites};
use common::*;
use mirrorpoint_poller::{buffer_pool, spawn};
use mirrorpoint_target::units::ByteOffset;
use serde_json::json;
use std::time::{Duration, Instant};

const MIB: u64 = 1 << 20;
const SIZE: u64 = 256 * MIB;

fn run(site: &Site, name: &str, bs: u64, qd: usize, secs: f64, random: bool) -> (f64, f64, f64) {
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
                            let blocks = SIZE / bs;
                            let mut seq = (core * qd + t) as u64 * (blocks / 64);
                            let t0 = Instant::now();
                            while t0.elapsed().as_secs_f64() < secs {
                                x ^= x << 13;
                                x ^= x >> 7;
                                x ^= x << 17;
                                let off = if random {
                                    (x % blocks) * bs
                                } else {
                                    seq = (seq + 1) % blocks;
                                    seq * bs
                                };
                                let mut b = loop {
                                    match buffer_pool().alloc(bs as usize) {
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

#[test]
#[ignore]
fn mirror_write_performance() {
    let TwoSites {
        dir: _dir,
        mut a,
        b: _b,
        ..
    } = two_sites("bench", &[SIZE, SIZE], false);
    a.uring("l0", SIZE);
    a.uring("l1", SIZE);
    a.uring("l2", SIZE);
    a.call(
        "mirror_create",
        json!({"name": "sync", "volume": "l1", "resync_rate": 0}),
    );
    a.call("mirror_create", json!({"name": "async", "volume": "l2", "resync_rate": 0, "ack": "async", "max_lag_ios": 64}));
    a.wait_leg("sync", "synced", Duration::from_secs(120));
    a.wait_leg("async", "synced", Duration::from_secs(120));
    println!("| volume | workload | IOPS | MiB/s | mean µs | p99 µs |");
    println!("|---|---|---|---|---|---|");
    for (name, label) in [
        ("l0", "local only"),
        ("sync", "mirror sync"),
        ("async", "mirror async"),
    ] {
        for (bs, qd, random, wl) in [
            (4096u64, 16usize, true, "4 KiB random write, 2 cores x QD16"),
            (128 * 1024, 4, false, "128 KiB seq write, 2 cores x QD4"),
        ] {
            let (iops, mean, p99) = run(&a, name, bs, qd, 3.0, random);
            println!(
                "| {label} | {wl} | {iops:.0} | {:.0} | {mean:.0} | {p99:.0} |",
                iops * bs as f64 / MIB as f64
            );
        }
    }
    let s = a.status("sync");
    assert_eq!(s["legs"][0]["state"], "synced", "{s:#}");
}
