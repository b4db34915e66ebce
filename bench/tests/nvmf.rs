//! `mirrorpoint-bench nvmf`, end to end: short runs against mirrorpoint's own
//! NVMe/TCP target started in this process (a malloc namespace on
//! 127.0.0.1, port chosen by the kernel), through the library and through
//! the binary, with this process's pid as `--target-pid` (so the target CPU
//! is reported, if mixed with the bench's own in the library case), and the
//! binary's answers to bad arguments. These check that the numbers are
//! consistent, not that they are fast.

use mirrorpoint_bench::config::Workload;
use mirrorpoint_bench::{run_nvmf, NvmfArgs, Report};
use mirrorpoint_poller::{PoolConfig, ReactorConfig, Runtime, RuntimeConfig};
use mirrorpoint_target::nvmf::subsystem::{ListenAddress, NamespaceParams, Subsystem};
use mirrorpoint_target::nvmf::{NvmfTarget, TransportOptions};
use mirrorpoint_target::units::BlockSize;
use mirrorpoint_target::volume::registry::MallocParams;
use mirrorpoint_target::volume::{VolumeRegistry, VolumeSpec};
use std::net::SocketAddr;
use std::process::Command;
use std::sync::Arc;

const BIN: &str = env!("CARGO_BIN_EXE_mirrorpoint-bench");
const NQN: &str = "nqn.2024-01.io.mirrorpoint:benchtest";
const CHUNK: usize = 128 * 1024;

struct Target {
    _rt: Runtime,
    _volumes: VolumeRegistry,
    nvmf: Arc<NvmfTarget>,
    addr: SocketAddr,
}

impl Drop for Target {
    fn drop(&mut self) {
        self.nvmf.shutdown();
    }
}

/// Our target on one unpinned reactor with one 16 MiB malloc namespace.
fn start_target() -> Target {
    let rt = Runtime::start(RuntimeConfig {
        cores: vec![0],
        reactor: ReactorConfig {
            pool: PoolConfig {
                chunk_size: CHUNK,
                chunk_count: 256,
                huge_pages: false,
            },
            ..ReactorConfig::default()
        },
        pin: false,
    })
    .expect("runtime");
    let volumes = VolumeRegistry::new();
    let vol = volumes
        .create(VolumeSpec::Malloc(MallocParams {
            name: Some("benchvol".into()),
            num_blocks: 4096,
            block_size: BlockSize::B4096,
            uuid: None,
        }))
        .expect("volume");
    let nvmf = NvmfTarget::new(rt.handles().to_vec(), CHUNK).expect("target");
    nvmf.create_transport(TransportOptions::defaults(CHUNK))
        .expect("transport");
    nvmf.add_subsystem(Subsystem::new(NQN, None, None, true, None).expect("subsystem"))
        .expect("add subsystem");
    nvmf.nvm_subsystem(NQN)
        .expect("subsystem")
        .add_namespace(
            vol,
            NamespaceParams {
                bdev_name: "benchvol".into(),
                nsid: Some(1),
                nguid: None,
                uuid: None,
            },
        )
        .expect("namespace");
    let bound = nvmf
        .add_listener(
            NQN,
            &ListenAddress {
                trtype: "tcp".into(),
                adrfam: None,
                traddr: "127.0.0.1".into(),
                trsvcid: "0".into(),
            },
        )
        .expect("listener");
    Target {
        _rt: rt,
        _volumes: volumes,
        nvmf,
        addr: SocketAddr::V4(bound),
    }
}

fn short(t: &Target, workload: Workload, qd: usize, connections: usize) -> NvmfArgs {
    NvmfArgs {
        workload,
        qd,
        connections,
        time: 0.3,
        ramp: 0.1,
        ..NvmfArgs::new(&t.addr.to_string(), NQN)
    }
}

fn check_sane(r: &Report) {
    assert_eq!(r.mode, "nvmf");
    assert!(r.ops > 0, "no I/O measured: {r:?}");
    assert_eq!(r.reads + r.writes, r.ops);
    assert_eq!(r.lat_us.samples, r.ops, "every measured I/O has a latency");
    assert_eq!(r.reactors.iter().map(|c| c.ops).sum::<u64>(), r.ops);
    let l = &r.lat_us;
    assert!(l.min > 0.0 && l.min <= l.p50 && l.p50 <= l.p99 && l.p99 <= l.p99_9);
    assert!(l.p99_9 <= l.max && l.avg <= l.max);
    assert!(r.iops > 0.0 && r.mib_s > 0.0);
    assert_eq!(r.volume_bytes, 16 << 20);
    assert_eq!(r.block_size, 4096);
}

#[test]
fn reads_writes_and_mixes_over_two_connections() {
    let t = start_target();
    for (w, qd, conns) in [
        (Workload::Randread, 1, 1),
        (Workload::Randwrite, 8, 2),
        (Workload::Rw, 4, 2),
    ] {
        let cfg = short(&t, w, qd, conns).validate().expect("valid");
        let r = run_nvmf(&cfg).expect("run");
        check_sane(&r);
        let n = r.nvmf.as_ref().expect("session facts");
        assert_eq!((n.connections, n.qd_per_connection, n.nsid), (conns, qd, 1));
        assert!(r.target_cpu.is_none(), "no pid, no target CPU");
        match w {
            Workload::Randread => assert_eq!(r.writes, 0),
            Workload::Randwrite => assert_eq!(r.reads, 0),
            _ => assert!(r.reads > 0 && r.writes > 0, "{r:?}"),
        }
    }
}

#[test]
fn digests_and_target_cpu() {
    let t = start_target();
    let mut args = short(&t, Workload::Randrw, 4, 1);
    args.header_digest = true;
    args.data_digest = true;
    args.no_sq_flow_control = true;
    args.target_pid = Some(std::process::id());
    let r = run_nvmf(&args.validate().expect("valid")).expect("run");
    check_sane(&r);
    let n = r.nvmf.as_ref().expect("session facts");
    assert!(n.header_digest && n.data_digest && !n.sq_flow_control);
    // The target is this process: its CPU includes the bench's own.
    let tc = r.target_cpu.as_ref().expect("target CPU reported");
    assert_eq!(tc.pid, std::process::id());
    assert!(tc.clock_ticks_per_s > 0);
    assert!(tc.user_s + tc.sys_s > 0.0, "{tc:?}");
    assert!(tc.us_per_io > 0.0 && tc.iops_per_core_s > 0.0);
    assert!(!tc.threads.is_empty());
    let threads: f64 = tc.threads.iter().map(|t| t.user_s + t.sys_s).sum();
    assert!(threads <= tc.user_s + tc.sys_s + 0.05, "{tc:?}");
}

#[test]
fn binary_json_and_table() {
    let t = start_target();
    let addr = t.addr.to_string();
    let pid = std::process::id().to_string();
    let base = [
        "nvmf",
        "--addr",
        &addr,
        "--nqn",
        NQN,
        "--time",
        "0.3",
        "--ramp",
        "0.1",
        "--qd",
        "4",
        "--connections",
        "2",
        "--target-pid",
        &pid,
    ];
    let out = Command::new(BIN)
        .args(base)
        .arg("--json")
        .output()
        .expect("runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    for key in [
        "mode",
        "workload",
        "bs",
        "qd",
        "ops",
        "reads",
        "writes",
        "iops",
        "mib_s",
        "lat_us",
        "cpu",
        "reactors",
        "nvmf",
        "target_cpu",
    ] {
        assert!(v.get(key).is_some(), "no '{key}' in {v}");
    }
    assert_eq!(v["mode"], "nvmf");
    assert_eq!(v["lat_us"]["samples"], v["ops"]);
    assert!(v["ops"].as_u64().expect("ops") > 0);
    assert!(v["cpu"]["us_per_io"].as_f64().expect("cpu") > 0.0);
    assert_eq!(v["nvmf"]["connections"], 2);
    assert_eq!(v["nvmf"]["nqn"], NQN);
    for key in [
        "pid",
        "user_s",
        "sys_s",
        "us_per_io",
        "iops_per_core_s",
        "threads",
    ] {
        assert!(v["target_cpu"].get(key).is_some(), "no target_cpu.{key}");
    }
    // This process served the I/O, so it used CPU in the window.
    assert!(v["target_cpu"]["us_per_io"].as_f64().expect("target") > 0.0);

    let out = Command::new(BIN).args(base).output().expect("runs");
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("nvmf: ") && text.contains(NQN), "{text}");
    assert!(text.contains("us CPU per I/O"), "{text}");
    assert!(text.contains("IOPS"), "{text}");
}

#[test]
fn bad_arguments_fail_with_a_clear_message() {
    let t = start_target();
    let addr = t.addr.to_string();
    let cases: &[(&[&str], &str, i32)] = &[
        (&["--qd", "0"], "--qd", 2),
        (&["--qd", "5000"], "--qd", 2),
        (&["--connections", "0"], "--connections", 2),
        (&["--bs", "1000"], "multiple of 512", 2),
        (&["--bs", "256K"], "chunk size", 2),
        (&["--time", "0"], "--time", 2),
        (&["--rwmixread", "50"], "rw and randrw", 2),
        (&["--nsid", "0"], "--nsid", 2),
        (&["--target-pid", "4294967"], "no such process", 2),
        (&["--cores", "0,0"], "twice", 2),
        (&["--nsid", "9"], "no such active namespace", 2),
        (&["--qd", "1000"], "MQES", 2),
        (&["--bs", "512"], "4096-byte block size", 2),
        (&["--workload", "zigzag"], "invalid value", 2),
    ];
    for (args, expect, code) in cases {
        let out = Command::new(BIN)
            .args(["nvmf", "--addr", &addr, "--nqn", NQN, "--time", "0.1"])
            .args(*args)
            .output()
            .expect("runs");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(*code), "{args:?}: {err}");
        assert!(
            err.contains(expect),
            "{args:?}: expected '{expect}' in: {err}"
        );
    }
    // Runs that cannot connect fail with status 1.
    let failing: &[(&[&str], &str)] = &[
        (
            &[
                "--addr",
                &addr,
                "--nqn",
                "nqn.2024-01.io.mirrorpoint:nosuch",
            ],
            "cannot connect",
        ),
        (&["--addr", "127.0.0.1:1", "--nqn", NQN], "cannot connect"),
        (&["--addr", "nowhere", "--nqn", NQN], "--addr"),
    ];
    for (args, expect) in failing {
        let out = Command::new(BIN)
            .arg("nvmf")
            .args(*args)
            .args(["--time", "0.1"])
            .output()
            .expect("runs");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} succeeded");
        assert!(
            err.contains(expect),
            "{args:?}: expected '{expect}' in: {err}"
        );
    }
    let out = Command::new(BIN)
        .args(["nvmf", "--addr", &addr])
        .output()
        .expect("runs");
    assert_eq!(out.status.code(), Some(2), "--nqn is required");
}
