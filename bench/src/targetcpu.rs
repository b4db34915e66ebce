//! Another process's CPU time, from `/proc/PID/stat` and `/proc/PID/task/*/stat`.
//!
//! `nvmf --target-pid` samples the target at the start and at the end of
//! the measured window: user and system time of the whole process (fields
//! 14 and 15 of `stat`, in clock ticks, which include threads that have
//! exited) and of each thread, so that reactor time can be told from other
//! threads'. The resolution is one clock tick (usually 10 ms): over a
//! window of a few seconds that is well under 1% of a busy core.

use crate::error::BenchError;
use std::collections::BTreeMap;

/// utime and stime in clock ticks, and the thread's name.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Ticks {
    name: String,
    user: u64,
    sys: u64,
}

/// Parses a `stat` line: `pid (comm) state ppid ... utime stime ...`.
/// The name may contain spaces and parentheses, so fields are counted from
/// the last ')'.
fn parse_stat(line: &str) -> Option<Ticks> {
    let open = line.find('(')?;
    let close = line.rfind(')')?;
    let name = line.get(open + 1..close)?.to_string();
    let rest: Vec<&str> = line.get(close + 1..)?.split_whitespace().collect();
    // rest[0] is field 3 (state); utime is field 14, stime field 15.
    Some(Ticks {
        name,
        user: rest.get(11)?.parse().ok()?,
        sys: rest.get(12)?.parse().ok()?,
    })
}

fn ticks_per_s() -> u64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as u64
    } else {
        100
    }
}

/// One sample of a process and its threads.
#[derive(Debug, Clone)]
pub struct ProcSample {
    pid: u32,
    process: Ticks,
    threads: BTreeMap<u32, Ticks>,
}

impl ProcSample {
    /// Reads `/proc/PID/stat` and every `/proc/PID/task/TID/stat`.
    pub fn take(pid: u32) -> Result<ProcSample, BenchError> {
        let read = |path: String| -> Result<Ticks, BenchError> {
            let s = std::fs::read_to_string(&path)
                .map_err(|e| BenchError::TargetCpu(format!("{path}: {e}")))?;
            parse_stat(&s).ok_or_else(|| BenchError::TargetCpu(format!("{path}: cannot parse")))
        };
        let process = read(format!("/proc/{pid}/stat"))?;
        let mut threads = BTreeMap::new();
        if let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/task")) {
            for e in dir.flatten() {
                let Some(tid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
                    continue;
                };
                // A thread may exit between the listing and the read.
                if let Ok(t) = read(format!("/proc/{pid}/task/{tid}/stat")) {
                    threads.insert(tid, t);
                }
            }
        }
        Ok(ProcSample {
            pid,
            process,
            threads,
        })
    }

    /// CPU time used between `earlier` and this sample.
    pub fn since(&self, earlier: &ProcSample) -> TargetCpu {
        let hz = ticks_per_s();
        let secs = |t: u64| t as f64 / hz as f64;
        let threads = self
            .threads
            .iter()
            .map(|(&tid, t)| {
                let (u0, s0) = earlier
                    .threads
                    .get(&tid)
                    .map_or((0, 0), |e| (e.user, e.sys));
                ThreadCpu {
                    tid,
                    name: t.name.clone(),
                    user_s: secs(t.user.saturating_sub(u0)),
                    sys_s: secs(t.sys.saturating_sub(s0)),
                }
            })
            .collect();
        TargetCpu {
            pid: self.pid,
            ticks_per_s: hz,
            user_s: secs(self.process.user.saturating_sub(earlier.process.user)),
            sys_s: secs(self.process.sys.saturating_sub(earlier.process.sys)),
            threads,
        }
    }
}

/// One thread's CPU time over an interval.
#[derive(Debug, Clone, PartialEq)]
pub struct ThreadCpu {
    /// Thread ID.
    pub tid: u32,
    /// Thread name.
    pub name: String,
    /// User seconds.
    pub user_s: f64,
    /// System seconds.
    pub sys_s: f64,
}

/// A process's CPU time over an interval.
#[derive(Debug, Clone, PartialEq)]
pub struct TargetCpu {
    /// The process.
    pub pid: u32,
    /// Clock ticks per second (the resolution).
    pub ticks_per_s: u64,
    /// User seconds, all threads.
    pub user_s: f64,
    /// System seconds, all threads.
    pub sys_s: f64,
    /// Each thread alive at the end of the interval.
    pub threads: Vec<ThreadCpu>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_stat_with_odd_names() {
        let line = "4242 (reactor (0) x) S 1 4242 4242 0 -1 4194560 1 0 0 0 \
                    1234 56 0 0 20 0 3 0 100 0 0";
        assert_eq!(
            parse_stat(line),
            Some(Ticks {
                name: "reactor (0) x".into(),
                user: 1234,
                sys: 56
            })
        );
        assert_eq!(parse_stat("1 (x) S 1 2"), None);
    }

    #[test]
    fn samples_this_process() {
        let pid = std::process::id();
        let a = ProcSample::take(pid).expect("sample");
        let mut x = 0u64;
        let t = std::time::Instant::now();
        while t.elapsed().as_millis() < 50 {
            x = x.wrapping_add(std::hint::black_box(1));
        }
        let b = ProcSample::take(pid).expect("sample");
        let d = b.since(&a);
        assert!(x > 0);
        assert!(d.user_s + d.sys_s >= 0.0);
        assert!(!d.threads.is_empty());
        assert!(ProcSample::take(u32::MAX).is_err());
    }
}
