//! Printing a [`Report`]: a text table for people, one JSON object for scripts.
//!
//! Both are rendered from the same [`Report`] value, so every number in the
//! table is also in the JSON under a stable name (the compare script reads
//! `iops` and `lat_us.p50`). The table keeps one row per run so that several
//! runs pasted together line up.

use crate::error::BenchError;
use crate::results::Report;
use crate::timeline::TimelineConfig;
use std::fmt::Write as _;

/// Writes the timeline plot where `--timeline-svg` asked for it.
pub fn write_plot(report: &Report, cfg: Option<&TimelineConfig>) -> Result<(), BenchError> {
    let (Some(cfg), Some(t)) = (cfg, &report.timeline) else {
        return Ok(());
    };
    let Some(path) = &cfg.svg else {
        return Ok(());
    };
    let title = format!(
        "mirrorpoint-bench {}: {} {} B, QD {}, {} core(s): I/O latency over time",
        report.mode,
        report.workload,
        report.bs,
        report.qd,
        report.cores.len()
    );
    std::fs::write(path, crate::timeline::svg(t, &title)).map_err(|error| BenchError::Output {
        path: path.clone(),
        error,
    })
}

/// The report as one JSON object (no trailing newline).
pub fn json(report: &Report) -> String {
    json_value(report)
}

/// Any report as one JSON object (no trailing newline).
pub fn json_value<T: serde::Serialize>(report: &T) -> String {
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
    let idle = if report.busy_poll {
        ", busy-poll".to_string()
    } else {
        format!(", idle timeout {} us", report.idle_timeout_us)
    };
    let idle = match &report.disk_submit {
        Some(d) => format!("{idle}, disk submit {d}"),
        None => idle,
    };
    if let Some(n) = &report.nvmf {
        let _ = writeln!(
            out,
            "nvmf: {} {} nsid {} (cntlid {}), {} bytes, {}-byte blocks; {} connection(s) x qd {}; \
             digests: header {}, data {}; ramp {:.1} s, measured {:.1} s{idle}",
            n.addr,
            n.nqn,
            n.nsid,
            n.cntlid,
            report.volume_bytes,
            report.block_size,
            n.connections,
            n.qd_per_connection,
            if n.header_digest { "on" } else { "off" },
            if n.data_digest { "on" } else { "off" },
            report.ramp_s,
            report.time_s,
        );
    } else {
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
            "volume: {target}, {} bytes, {}-byte blocks; ramp {:.1} s, measured {:.1} s{idle}",
            report.volume_bytes, report.block_size, report.ramp_s, report.time_s,
        );
    }
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
    if let Some(t) = &report.target_cpu {
        let _ = writeln!(
            out,
            "target pid {}: user {:.2} s, sys {:.2} s ({:.0}% of a core); {:.2} us CPU per I/O, \
             {:.0} IOPS per core-second",
            t.pid, t.user_s, t.sys_s, t.core_pct, t.us_per_io, t.iops_per_core_s
        );
        for th in &t.threads {
            let _ = writeln!(
                out,
                "  thread {} ({}): user {:.2} s, sys {:.2} s, {:.2} us per I/O",
                th.tid, th.name, th.user_s, th.sys_s, th.us_per_io
            );
            if let (Some(run), Some(wait)) = (th.on_cpu_s, th.runqueue_wait_s) {
                let _ = writeln!(
                    out,
                    "    scheduler: on a CPU {run:.3} s, runnable but waiting for one {wait:.3} s"
                );
            }
        }
    }
    if let Some(t) = &report.target_reactors {
        let _ = writeln!(
            out,
            "target reactors (own accounting, busy_ns): busy {:.2} s ({:.0}% of a core); \
             {:.2} us busy per I/O, {:.0} IOPS per busy core-second, {:.2} ring ops per I/O",
            t.busy_s, t.busy_core_pct, t.busy_us_per_io, t.iops_per_busy_core_s, t.ring_ops_per_io
        );
        for r in &t.reactors {
            let _ = writeln!(
                out,
                "  reactor {} (cpu {}): busy {:.2} s, idle {:.2} s, {:.2} us busy per I/O, {} ring ops",
                r.index, r.lcore, r.busy_s, r.idle_s, r.busy_us_per_io, r.ring_ops
            );
        }
    }
    if let Some(t) = &report.timeline {
        let s = &t.steady;
        let _ = writeln!(
            out,
            "steady ({} I/Os outside {} ms around events): p99 {:.1} us, p99.9 {:.1} us, max {:.1} us",
            s.ios, t.window_ms, s.p99_us, s.p99_9_us, s.max_us
        );
        for e in &t.events {
            let a = &e.around;
            let _ = writeln!(
                out,
                "event at {:.3} s, ran {:.3} ms, exit {}: {}\n  around it ({} I/Os): p99 {:.1} us, p99.9 {:.1} us, max {:.1} us = {:.2}x steady p99.9\n  output: {}",
                e.started_s,
                e.duration_ms,
                e.exit_code,
                e.command,
                a.ios,
                a.p99_us,
                a.p99_9_us,
                a.max_us,
                e.max_over_steady_p99_9,
                e.output.replace('\n', "\n          ")
            );
        }
    }
    for r in &report.reactors {
        let _ = writeln!(
            out,
            "reactor {} (cpu {}): busy {:.1}%, {} I/Os, {} ring ops submitted in {} submit calls, {} completed, {} sleeps",
            r.reactor,
            r.cpu,
            r.busy_pct,
            r.ops,
            r.ios_submitted,
            r.submit_calls,
            r.ios_completed,
            r.sleeps
        );
    }
    out
}
