//! Printing a [`Report`]: a text table for people, one JSON object for scripts.
//!
//! Both are rendered from the same [`Report`] value, so every number in the
//! table is also in the JSON under a stable name (the compare script reads
//! `iops` and `lat_us.p50`). The table keeps one row per run so that several
//! runs pasted together line up.

use crate::results::Report;
use std::fmt::Write as _;

/// The report as one JSON object (no trailing newline).
pub fn json(report: &Report) -> String {
    // Serialising plain structs of numbers and strings cannot fail; fall back
    // to an error object rather than panicking if it ever does.
    serde_json::to_string_pretty(report)
        .unwrap_or_else(|e| format!("{{\"error\": \"cannot serialise the report: {e}\"}}"))
}

/// The report as a text table, ending with a newline.
pub fn table(report: &Report) -> String {
    let mut out = String::new();
    let cores = report
        .cores
        .iter()
        .map(|c| c.to_string())
        .collect::<Vec<_>>()
        .join(",");
    let workload = if report.workload == "rw" || report.workload == "randrw" {
        format!("{}({}%r)", report.workload, report.rwmixread)
    } else {
        report.workload.to_string()
    };
    let target = match &report.file {
        Some(f) => format!(
            "uring {f} (O_DIRECT {})",
            if report.o_direct == Some(true) {
                "on"
            } else {
                "off"
            }
        ),
        None => "malloc".to_string(),
    };
    let _ = writeln!(
        out,
        "volume: {target}, {} bytes, {}-byte blocks; ramp {:.1} s, measured {:.1} s{}",
        report.volume_bytes,
        report.block_size,
        report.ramp_s,
        report.time_s,
        if report.busy_poll {
            ", busy-poll".to_string()
        } else {
            format!(", idle timeout {} us", report.idle_timeout_us)
        }
    );
    let _ = writeln!(
        out,
        "{:<14} {:>7} {:>5} {:>6} {:>11} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9}",
        "workload",
        "bs",
        "qd",
        "cores",
        "IOPS",
        "MiB/s",
        "avg_us",
        "p50_us",
        "p99_us",
        "p99.9_us",
        "max_us",
        "cpu_us/io"
    );
    let l = &report.lat_us;
    let _ = writeln!(
        out,
        "{:<14} {:>7} {:>5} {:>6} {:>11.0} {:>9.1} {:>9.1} {:>9.1} {:>9.1} {:>9.1} {:>9.1} {:>9.2}",
        workload,
        report.bs,
        report.qd,
        cores,
        report.iops,
        report.mib_s,
        l.avg,
        l.p50,
        l.p99,
        l.p99_9,
        l.max,
        report.cpu.us_per_io
    );
    let _ = writeln!(
        out,
        "cpu: user {:.2} s, sys {:.2} s over the window; {} reads, {} writes",
        report.cpu.user_s, report.cpu.sys_s, report.reads, report.writes
    );
    for r in &report.reactors {
        let _ = writeln!(
            out,
            "reactor {} (cpu {}): busy {:.1}%, {} I/Os, {} ring ops submitted, {} completed, {} sleeps",
            r.reactor, r.cpu, r.busy_pct, r.ops, r.ios_submitted, r.ios_completed, r.sleeps
        );
    }
    out
}
