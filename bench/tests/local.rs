//! `mirrorpoint-bench local`, end to end: short runs through the library on a
//! malloc volume and on a temporary file, and the binary's JSON and its
//! answers to bad arguments. These check that the numbers are consistent
//! (ops counted equal latencies recorded, reads + writes = ops, the mix is
//! honoured), not that they are fast.

use mirrorpoint_bench::config::{BackendKind, Workload};
use mirrorpoint_bench::{run_local, BenchError, LocalArgs, Report};
use std::path::PathBuf;
use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_mirrorpoint-bench");

fn malloc(workload: Workload, qd: usize) -> LocalArgs {
    LocalArgs {
        backend: BackendKind::Malloc,
        size: Some(16 << 20),
        workload,
        qd,
        time: 0.3,
        ramp: 0.1,
        ..LocalArgs::default()
    }
}

/// A temp file on the same file system as the build (so O_DIRECT works, as on
/// ext4/xfs); removed on drop.
struct TempFile(PathBuf);

impl TempFile {
    fn new(tag: &str) -> Self {
        let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
        TempFile(dir.join(format!("mpb-{tag}-{}.img", std::process::id())))
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn check_sane(r: &Report) {
    assert!(r.ops > 0, "no I/O measured: {r:?}");
    assert!(r.iops > 0.0);
    assert_eq!(r.reads + r.writes, r.ops);
    assert_eq!(r.lat_us.samples, r.ops, "every measured I/O has a latency");
    assert_eq!(r.reactors.iter().map(|c| c.ops).sum::<u64>(), r.ops);
    let l = &r.lat_us;
    assert!(l.min > 0.0 && l.min <= l.p50 && l.p50 <= l.p99 && l.p99 <= l.p99_9);
    assert!(l.p99_9 <= l.max && l.avg <= l.max);
    assert!(r.mib_s > 0.0);
    for c in &r.reactors {
        assert!((0.0..=100.0).contains(&c.busy_pct), "{c:?}");
    }
}

#[test]
fn malloc_every_workload() {
    for w in [
        Workload::Read,
        Workload::Write,
        Workload::Randread,
        Workload::Randwrite,
        Workload::Rw,
        Workload::Randrw,
    ] {
        let cfg = malloc(w, 4).validate().expect("valid");
        let r = run_local(&cfg).expect("run");
        check_sane(&r);
        match w {
            Workload::Read | Workload::Randread => assert_eq!(r.writes, 0),
            Workload::Write | Workload::Randwrite => assert_eq!(r.reads, 0),
            _ => assert!(r.reads > 0 && r.writes > 0, "{r:?}"),
        }
        assert_eq!(r.workload, w.name());
    }
}

#[test]
fn malloc_two_cores_and_a_skewed_mix() {
    let args = LocalArgs {
        cores: "0,1".into(),
        rwmixread: Some(90),
        bs: 8192,
        block_size: Some(4096),
        ..malloc(Workload::Randrw, 8)
    };
    let r = run_local(&args.validate().expect("valid")).expect("run");
    check_sane(&r);
    assert_eq!(r.reactors.len(), 2);
    assert!(r.reactors.iter().all(|c| c.ops > 0));
    // Malloc I/O completes inline; the tasks must still give the reactor
    // loop its turns (it publishes its counters there).
    assert!(r.reactors.iter().all(|c| c.busy_pct > 0.0), "{r:?}");
    let share = r.reads as f64 / r.ops as f64;
    assert!((0.85..0.95).contains(&share), "read share {share}");
    assert_eq!(r.block_size, 4096);
}

#[test]
fn uring_on_a_temp_file() {
    let f = TempFile::new("uring");
    for (w, qd) in [
        (Workload::Randwrite, 8),
        (Workload::Randread, 1),
        (Workload::Rw, 4),
    ] {
        let args = LocalArgs {
            backend: BackendKind::Uring,
            file: Some(f.0.clone()),
            size: Some(8 << 20),
            workload: w,
            qd,
            time: 0.3,
            ramp: 0.0,
            ..LocalArgs::default()
        };
        let r = run_local(&args.validate().expect("valid")).expect("run");
        check_sane(&r);
        assert_eq!(r.volume_bytes, 8 << 20);
        assert!(r.reactors[0].ios_completed > 0, "I/O went through the ring");
    }
    // A file smaller than one I/O is refused once its size is known.
    let small = TempFile::new("small");
    std::fs::write(&small.0, vec![1u8; 2048]).expect("small file");
    let args = LocalArgs {
        backend: BackendKind::Uring,
        file: Some(small.0.clone()),
        time: 0.1,
        ..LocalArgs::default()
    };
    let e = run_local(&args.validate().expect("valid")).expect_err("too small");
    assert!(matches!(e, BenchError::InvalidArgument(_)), "{e}");
}

#[test]
fn binary_json_has_every_field() {
    let out = Command::new(BIN)
        .args([
            "local",
            "--backend",
            "malloc",
            "--size",
            "8M",
            "--workload",
            "randrw",
            "--rwmixread",
            "70",
            "--qd",
            "2",
            "--time",
            "0.3",
            "--json",
        ])
        .output()
        .expect("runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("one JSON object");
    for key in [
        "mode",
        "backend",
        "workload",
        "rwmixread",
        "bs",
        "qd",
        "cores",
        "time_s",
        "ramp_s",
        "ops",
        "reads",
        "writes",
        "iops",
        "mib_s",
        "volume_bytes",
        "block_size",
        "busy_poll",
    ] {
        assert!(v.get(key).is_some(), "missing {key}: {v}");
    }
    for key in ["samples", "min", "avg", "p50", "p99", "p99_9", "max"] {
        assert!(v["lat_us"][key].is_number(), "missing lat_us.{key}");
    }
    for key in ["user_s", "sys_s", "us_per_io"] {
        assert!(v["cpu"][key].is_number(), "missing cpu.{key}");
    }
    let reactor = &v["reactors"][0];
    for key in [
        "reactor",
        "cpu",
        "busy_pct",
        "ios_submitted",
        "ios_completed",
        "submit_calls",
        "sleeps",
        "ops",
    ] {
        assert!(reactor.get(key).is_some(), "missing reactors[0].{key}");
    }
    assert_eq!(v["ops"], v["lat_us"]["samples"]);
    assert!(v["iops"].as_f64().unwrap_or(0.0) > 0.0);
    assert_eq!(v["workload"], "randrw");
    assert_eq!(v["rwmixread"], 70);
}

#[test]
fn binary_table_output() {
    let out = Command::new(BIN)
        .args([
            "local",
            "--backend",
            "malloc",
            "--size",
            "4M",
            "--time",
            "0.2",
        ])
        .output()
        .expect("runs");
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    for word in ["IOPS", "p99.9_us", "cpu_us/io", "randread", "reactor 0"] {
        assert!(text.contains(word), "no {word} in\n{text}");
    }
}

#[test]
fn bad_arguments_fail_with_a_clear_message() {
    let cases: &[(&[&str], &str)] = &[
        (&["--backend", "malloc", "--bs", "1000"], "not a multiple"),
        (&["--backend", "malloc", "--bs", "256K"], "chunk size"),
        (&["--backend", "malloc", "--qd", "0"], "--qd"),
        (
            &["--backend", "malloc", "--size", "2K"],
            "smaller than --bs",
        ),
        (
            &["--backend", "malloc", "--block-size", "1024"],
            "512 or 4096",
        ),
        (
            &["--backend", "malloc", "--rwmixread", "50"],
            "rw and randrw",
        ),
        (
            &[
                "--backend",
                "malloc",
                "--workload",
                "randrw",
                "--rwmixread",
                "150",
            ],
            "0 and 100",
        ),
        (&["--backend", "malloc", "--time", "0"], "--time"),
        (&["--backend", "malloc", "--cores", "0,0"], "twice"),
        (
            &["--backend", "malloc", "--cores", "100000"],
            "not available",
        ),
        (&["--backend", "malloc", "--size", "lots"], "not a size"),
        (
            &["--backend", "malloc", "--workload", "zigzag"],
            "invalid value",
        ),
        (&["--backend", "uring"], "needs --file"),
        (
            &[
                "--backend",
                "malloc",
                "--busy-poll",
                "--idle-timeout-us",
                "5",
            ],
            "no effect",
        ),
        (&["--file", "/nonexistent-dir/x.img"], "cannot open"),
    ];
    for (args, expect) in cases {
        let out = Command::new(BIN)
            .arg("local")
            .args(*args)
            .args(
                ["--time", "0.1"]
                    .iter()
                    .filter(|_| !args.contains(&"--time")),
            )
            .output()
            .expect("runs");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} succeeded");
        assert!(
            err.contains(expect),
            "{args:?}: expected '{expect}' in: {err}"
        );
    }
}

#[test]
fn timeline_with_an_event_accounts_for_every_io() {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
    let svg = dir.join(format!("mpb-timeline-{}.svg", std::process::id()));
    let mut args = malloc(Workload::Randwrite, 4);
    args.time = 0.5;
    args.timeline.timeline_ms = Some(50.0);
    args.timeline.timeline_svg = Some(svg.clone());
    args.timeline.events =
        vec![
            mirrorpoint_bench::timeline::parse_event("0.2:sleep 0.03; echo marker").expect("event"),
        ];
    args.timeline.event_window_ms = 20.0;
    let config = args.validate().expect("valid");
    let r = run_local(&config).expect("run");
    check_sane(&r);
    mirrorpoint_bench::output::write_plot(&r, config.timeline.as_ref()).expect("plot");
    let t = r.timeline.as_ref().expect("timeline asked for");
    assert_eq!(t.buckets.len(), 10);
    let in_buckets: u64 = t.buckets.iter().map(|b| b.stats.ios).sum();
    assert_eq!(in_buckets, r.ops, "every measured I/O is in one bucket");
    let e = &t.events[0];
    assert_eq!((e.exit_code, e.output.as_str()), (0, "marker"));
    assert!(e.started_s >= 0.2 && e.duration_ms >= 30.0, "{e:?}");
    assert!(e.around.ios > 0);
    assert_eq!(
        t.steady.ios + e.around.ios,
        r.ops,
        "one event: around + steady = all"
    );
    let plot = std::fs::read_to_string(&svg).expect("svg written");
    let _ = std::fs::remove_file(&svg);
    assert!(plot.starts_with("<svg") && plot.contains("sleep 0.03; echo"));
}

#[test]
fn binary_rejects_an_event_outside_the_window() {
    let out = Command::new(BIN)
        .args([
            "local",
            "--backend",
            "malloc",
            "--time",
            "1",
            "--event",
            "2:true",
        ])
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--event at 2.000 s"), "{err}");
}
