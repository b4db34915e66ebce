//! Split mirror speed on one machine (both sites on 127.0.0.x, files in the
//! temp dir): host write latency over time around a split under load, the
//! time from the split request to the split point, and rejoin speed. Writes
//! the latency plot as an SVG (`docs/split-latency.svg`, latency against
//! time, the split marked). Ignored by default; run with
//! `cargo test --release -p mirrorpoint-target --test mirror_split_bench -- --ignored --nocapture`.

mod common;

use common::*;
use mirrorpoint_poller::{buffer_pool, spawn};
use mirrorpoint_target::units::ByteOffset;
use serde_json::json;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const MIB: u64 = 1 << 20;
const SIZE: u64 = 128 * MIB;
const BS: u64 = 4096;
const QD: usize = 8;

/// (completion time since start in µs, latency in µs)
type Samples = Vec<(u64, u64)>;

fn pct(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn stats(samples: &[(u64, u64)], from: u64, to: u64) -> (usize, u64, u64, u64, u64) {
    let mut v: Vec<u64> = samples
        .iter()
        .filter(|(t, _)| *t >= from && *t < to)
        .map(|(_, l)| *l)
        .collect();
    v.sort_unstable();
    (
        v.len(),
        pct(&v, 0.5),
        pct(&v, 0.99),
        pct(&v, 0.999),
        v.last().copied().unwrap_or(0),
    )
}

fn svg(samples: &[(u64, u64)], req: u64, ret: u64, end: u64, steady_p999: u64) -> String {
    let (w, h, left, bottom) = (900.0, 420.0, 70.0, 40.0);
    let bucket = 10_000u64; // 10 ms
    let n = end.div_ceil(bucket) as usize;
    let mut buckets: Vec<Vec<u64>> = vec![Vec::new(); n];
    for (t, l) in samples {
        if let Some(b) = buckets.get_mut((*t / bucket) as usize) {
            b.push(*l);
        }
    }
    let series: Vec<(u64, u64, u64)> = buckets
        .iter_mut()
        .map(|b| {
            b.sort_unstable();
            (pct(b, 0.5), pct(b, 0.99), b.last().copied().unwrap_or(0))
        })
        .collect();
    let ymax = series
        .iter()
        .map(|s| s.2)
        .max()
        .unwrap_or(1)
        .max(2 * steady_p999)
        .max(1) as f64
        * 1.05;
    let x = |t: u64| left + (t as f64 / end as f64) * (w - left - 20.0);
    let y = |l: u64| h - bottom - (l as f64 / ymax) * (h - bottom - 20.0);
    let mut out = String::new();
    let _ = writeln!(
        out,
        r##"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="12">"##
    );
    let _ = writeln!(out, r##"<rect width="100%" height="100%" fill="white"/>"##);
    let _ = writeln!(
        out,
        r##"<rect x="{:.1}" y="20" width="{:.1}" height="{:.1}" fill="#fde2e2"/>"##,
        x(req),
        (x(ret) - x(req)).max(1.5),
        h - bottom - 20.0
    );
    let _ = writeln!(
        out,
        r##"<line x1="{0:.1}" y1="20" x2="{0:.1}" y2="{1:.1}" stroke="#c00" stroke-width="1.5"/><text x="{2:.1}" y="34" fill="#c00">split requested</text>"##,
        x(req),
        h - bottom,
        x(req) + 4.0
    );
    let _ = writeln!(
        out,
        r##"<line x1="{0:.1}" y1="{1:.1}" x2="{2:.1}" y2="{1:.1}" stroke="#888" stroke-dasharray="4 3"/><text x="{3:.1}" y="{4:.1}" fill="#555">2 x steady p99.9</text>"##,
        left,
        y(2 * steady_p999),
        w - 20.0,
        w - 130.0,
        y(2 * steady_p999) - 4.0
    );
    for (name, idx, color) in [
        ("max", 2usize, "#d62728"),
        ("p99", 1, "#1f77b4"),
        ("p50", 0, "#2ca02c"),
    ] {
        let pts: Vec<String> = series
            .iter()
            .enumerate()
            .filter(|(i, _)| !buckets[*i].is_empty())
            .map(|(i, s)| {
                let v = [s.0, s.1, s.2][idx];
                format!("{:.1},{:.1}", x(i as u64 * bucket + bucket / 2), y(v))
            })
            .collect();
        let _ = writeln!(
            out,
            r##"<polyline fill="none" stroke="{color}" stroke-width="1.2" points="{}"/>"##,
            pts.join(" ")
        );
        let ly = 50.0 + 16.0 * idx as f64;
        let _ = writeln!(
            out,
            r##"<line x1="{0:.1}" y1="{1:.1}" x2="{2:.1}" y2="{1:.1}" stroke="{color}" stroke-width="2"/><text x="{3:.1}" y="{4:.1}">{name} per 10 ms</text>"##,
            w - 160.0,
            ly,
            w - 140.0,
            w - 135.0,
            ly + 4.0
        );
    }
    // Axes.
    let _ = writeln!(
        out,
        r##"<line x1="{left}" y1="{0:.1}" x2="{1:.1}" y2="{0:.1}" stroke="black"/><line x1="{left}" y1="20" x2="{left}" y2="{0:.1}" stroke="black"/>"##,
        h - bottom,
        w - 20.0
    );
    for k in 0..=5 {
        let l = (ymax / 5.0 * k as f64) as u64;
        let _ = writeln!(
            out,
            r##"<text x="{:.1}" y="{:.1}" text-anchor="end">{l}</text>"##,
            left - 6.0,
            y(l) + 4.0
        );
    }
    let secs = end / 1_000_000;
    for s in 0..=secs {
        let _ = writeln!(
            out,
            r##"<text x="{:.1}" y="{:.1}" text-anchor="middle">{s} s</text>"##,
            x(s * 1_000_000),
            h - bottom + 16.0
        );
    }
    let _ = writeln!(
        out,
        r##"<text x="14" y="{:.1}" transform="rotate(-90 14 {:.1})" text-anchor="middle">host write latency (µs)</text>"##,
        h / 2.0,
        h / 2.0
    );
    let _ = writeln!(out, "</svg>");
    out
}

#[test]
#[ignore = "benchmark: run with --ignored --nocapture (release)"]
fn split_latency_and_rejoin_speed() {
    let dir = TempDir::new("split-bench");
    let mut a = Site::start(&dir.0.join("a"), "east", 1, "127.0.0.2", true);
    let mut b = Site::start(&dir.0.join("b"), "west", 2, "127.0.0.3", false);
    b.uring("s1", SIZE + 8 * MIB);
    b.call(
        "agent_add_storage_server",
        json!({"name": "ss1", "id": 1, "volumes": ["s1"]}),
    );
    a.call(
        "agent_add_peer",
        json!({"name": "west", "domain": 2, "address": b.addr.to_string()}),
    );
    b.call(
        "agent_add_peer",
        json!({"name": "east", "domain": 1, "address": a.addr.to_string(), "master": true}),
    );
    wait_for(Duration::from_secs(10), "capacity report", || {
        !a.call("agent_get_sites", json!({}))["peers"][0]["last_report_ms"].is_null()
    });
    a.uring("local", SIZE);
    a.call(
        "mirror_create",
        json!({"name": "m0", "volume": "local", "resync_rate": 0}),
    );
    a.wait_leg("m0", "synced", Duration::from_secs(120));

    let st = a.daemon.as_ref().unwrap().state().clone();
    let vol = st.volumes.get("m0").unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let t0 = Instant::now();
    let run_us = 6_000_000u64;
    let waits: Vec<_> = st
        .reactors
        .iter()
        .enumerate()
        .map(|(core, r)| {
            let (vol, stop) = (vol.clone(), stop.clone());
            r.spawn(move || async move {
                let tasks: Vec<_> = (0..QD)
                    .map(|t| {
                        let (vol, stop) = (vol.clone(), stop.clone());
                        spawn(async move {
                            let ch = vol.channel();
                            let mut out: Samples = Vec::with_capacity(200_000);
                            let mut x = (core * 1000 + t + 1) as u64 * 0x9e37_79b9;
                            while !stop.load(Ordering::Relaxed) {
                                x ^= x << 13;
                                x ^= x >> 7;
                                x ^= x << 17;
                                let off = (x % (SIZE / BS)) * BS;
                                let mut buf = loop {
                                    match buffer_pool().alloc(BS as usize) {
                                        Some(b) => break b,
                                        None => mirrorpoint_poller::yield_now().await,
                                    }
                                };
                                buf[..8].copy_from_slice(&x.to_le_bytes());
                                let s = Instant::now();
                                ch.write(ByteOffset(off), buf.freeze())
                                    .await
                                    .0
                                    .expect("write");
                                out.push((
                                    t0.elapsed().as_micros() as u64,
                                    s.elapsed().as_micros() as u64,
                                ));
                            }
                            out
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
    std::thread::sleep(Duration::from_secs(3));
    let req = t0.elapsed().as_micros() as u64;
    let r = a.call(
        "mirror_split",
        json!({"name": "m0", "image_name": "bench_snap"}),
    );
    let ret = t0.elapsed().as_micros() as u64;
    std::thread::sleep(Duration::from_micros(run_us.saturating_sub(ret)));
    stop.store(true, Ordering::Relaxed);
    let mut samples: Samples = Vec::new();
    for w in waits {
        samples.extend(w.recv_blocking().expect("workers"));
    }
    let end = samples.iter().map(|s| s.0).max().unwrap_or(run_us);
    let split_point_us = r["split_point_us"].as_u64().unwrap();

    // Steady state: 0.5 s .. 0.2 s before the split. Around the split:
    // 100 ms before the request to 500 ms after the answer.
    let steady = stats(&samples, 500_000, req - 200_000);
    let around = stats(&samples, req.saturating_sub(100_000), ret + 500_000);
    let after = stats(&samples, ret + 500_000, end);
    // Slowest write in flight when the split was asked for.
    let inflight_max = samples
        .iter()
        .filter(|(done, lat)| *done >= req && done.saturating_sub(*lat) <= req)
        .map(|(_, l)| *l)
        .max()
        .unwrap_or(0);

    // Rejoin: every region written since the split goes back to the leg.
    let dirty = a.status("m0")["legs"][0]["dirty_regions"].as_u64().unwrap();
    let copied0 = a.status("m0")["legs"][0]["resync_copied_bytes"]
        .as_u64()
        .unwrap();
    let tr = Instant::now();
    let rj = a.call("mirror_rejoin", json!({"name": "m0"}));
    a.wait_leg("m0", "synced", Duration::from_secs(300));
    let rejoin_s = tr.elapsed().as_secs_f64();
    let copied = a.status("m0")["legs"][0]["resync_copied_bytes"]
        .as_u64()
        .unwrap()
        - copied0;

    let mut table = String::new();
    let _ = writeln!(
        table,
        "| window | writes | p50 µs | p99 µs | p99.9 µs | max µs |"
    );
    let _ = writeln!(table, "|---|---|---|---|---|---|");
    for (name, s) in [
        ("steady (0.5 s .. split - 0.2 s)", steady),
        ("around the split (-100 ms .. answer + 500 ms)", around),
        ("after (answer + 500 ms .. end)", after),
    ] {
        let _ = writeln!(
            table,
            "| {name} | {} | {} | {} | {} | {} |",
            s.0, s.1, s.2, s.3, s.4
        );
    }
    println!("{table}");
    println!(
        "split: epoch {} seq {}; request -> split point {split_point_us} µs (slowest write in flight at the request: {inflight_max} µs); request -> answer (image exposed on the remote site) {} µs",
        r["epoch"], r["sequence"], ret - req
    );
    println!(
        "goals: max around the split {} µs vs 2 x steady p99.9 = {} µs; split point {split_point_us} µs vs 1 ms + slowest in-flight write = {} µs",
        around.4,
        2 * steady.3,
        1000 + inflight_max
    );
    println!(
        "rejoin: {} regions ({dirty} dirty before), {copied} bytes in {rejoin_s:.3} s = {:.1} MiB/s (rejoin answer {rj})",
        rj["regions"],
        copied as f64 / MIB as f64 / rejoin_s
    );
    let svg_text = svg(&samples, req, ret, end, steady.3);
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/split-latency.svg");
    std::fs::write(&path, svg_text).expect("write the SVG");
    println!("plot: {}", path.display());
}
