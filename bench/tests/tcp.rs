//! `mirrorpoint-bench tcp`: a short run over loopback moves data and reports
//! it consistently; bad arguments are refused with exit status 2.

use mirrorpoint_bench::tcp::{run_tcp, TcpArgs};
use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_mirrorpoint-bench");

#[test]
fn loopback_run_reports_what_it_received() {
    let args = TcpArgs {
        to: "127.0.0.1".parse().expect("ip"),
        streams: 2,
        bs: 64 << 10,
        time: 0.2,
        ramp: 0.05,
        sender_cores: None,
        receiver_cores: None,
        netns: None,
        json: true,
    };
    let r = run_tcp(&args).expect("run");
    assert_eq!(r.streams, 2);
    assert!(r.bytes > 0, "{r:?}");
    let expect = r.bytes as f64 / r.time_s / (1024.0 * 1024.0);
    assert!((r.mib_s - expect).abs() < 1e-6 * expect.max(1.0));
}

#[test]
fn binary_refuses_bad_arguments() {
    for bad in [
        &["--streams", "0"][..],
        &["--time", "0"],
        &["--bs", "0"],
        &["--netns", "../etc"],
        &["--netns", "mirrorpoint-no-such-namespace"],
    ] {
        let out = Command::new(BIN)
            .arg("tcp")
            .args(bad)
            .output()
            .expect("run");
        assert_eq!(out.status.code(), Some(2), "{bad:?}");
    }
}
