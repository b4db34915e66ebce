//! The target's CPU time, measured two ways.
//!
//! * **Process accounting** (`nvmf --target-pid`): `/proc/PID/stat` and
//!   `/proc/PID/task/*/stat`, sampled at the start and at the end of the
//!   measured window: user and system time of the whole process (fields 14
//!   and 15 of `stat`, in clock ticks, which include threads that have
//!   exited) and of each thread, so that reactor time can be told from other
//!   threads'. The resolution is one clock tick (usually 10 ms): over a
//!   window of a few seconds that is well under 1% of a busy core. This
//!   counts everything the OS charged the process, including a reactor's
//!   idle spin (it polls for up to `--idle-timeout-us` before blocking).
//! * **Reactor accounting** (`nvmf --target-rpc SOCKET`), as SPDK reports it:
//!   the target's `framework_get_reactors` RPC gives each reactor's `busy_ns`
//!   (wall time of loop turns that found work: completions, messages, timers
//!   or tasks, kernel time in their `io_uring_enter` included) and `idle_ns`,
//!   sampled the same way. Busy time excludes the idle spin; it is wall
//!   time, so a busy turn preempted by another process counts in full. The
//!   reactors publish their counters about once a millisecond (and before
//!   they block), which bounds the error at the window's edges.

use crate::error::BenchError;
use mirrorpoint_target::rpc::client::RpcClient;
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// utime and stime in clock ticks, and the thread's name.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Ticks {
    name: String,
    user: u64,
    sys: u64,
    /// From `schedstat` (threads only): nanoseconds on a CPU and waiting on
    /// a runqueue (runnable but not running).
    sched: Option<(u64, u64)>,
}

/// Parses `schedstat`: `run_ns wait_ns timeslices`.
fn parse_schedstat(s: &str) -> Option<(u64, u64)> {
    let mut f = s.split_whitespace().map(|x| x.parse::<u64>().ok());
    Some((f.next()??, f.next()??))
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
        sched: None,
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
                if let Ok(mut t) = read(format!("/proc/{pid}/task/{tid}/stat")) {
                    t.sched = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/schedstat"))
                        .ok()
                        .as_deref()
                        .and_then(parse_schedstat);
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
                let e = earlier.threads.get(&tid);
                let (u0, s0) = e.map_or((0, 0), |e| (e.user, e.sys));
                let sched = match (t.sched, e.map_or(Some((0, 0)), |e| e.sched)) {
                    (Some((r1, w1)), Some((r0, w0))) => Some((
                        r1.saturating_sub(r0) as f64 / 1e9,
                        w1.saturating_sub(w0) as f64 / 1e9,
                    )),
                    _ => None,
                };
                ThreadCpu {
                    tid,
                    name: t.name.clone(),
                    user_s: secs(t.user.saturating_sub(u0)),
                    sys_s: secs(t.sys.saturating_sub(s0)),
                    on_cpu_s: sched.map(|s| s.0),
                    runqueue_wait_s: sched.map(|s| s.1),
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
    /// Seconds on a CPU by the scheduler's own clock (`schedstat`, ns
    /// resolution), when the kernel provides it.
    pub on_cpu_s: Option<f64>,
    /// Seconds runnable but waiting for a CPU (`schedstat`): preemption by
    /// other processes on a shared machine.
    pub runqueue_wait_s: Option<f64>,
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

/// One reactor's counters as `framework_get_reactors` reports them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct ReactorCounters {
    index: u64,
    lcore: u64,
    busy_ns: u64,
    idle_ns: u64,
    ios_submitted: u64,
}

/// Parses a `framework_get_reactors` result.
fn parse_reactors(v: &Value) -> Result<Vec<ReactorCounters>, String> {
    let list = v
        .get("reactors")
        .and_then(Value::as_array)
        .ok_or("framework_get_reactors: no 'reactors' array in the result")?;
    list.iter()
        .map(|r| {
            let field = |name: &str| {
                r.get(name).and_then(Value::as_u64).ok_or_else(|| {
                    format!("framework_get_reactors: reactor without a numeric '{name}'")
                })
            };
            Ok(ReactorCounters {
                index: field("index")?,
                lcore: field("lcore")?,
                busy_ns: field("busy_ns")?,
                idle_ns: field("idle_ns")?,
                ios_submitted: field("ios_submitted")?,
            })
        })
        .collect()
}

/// A connection to the target's admin socket, for its reactor counters.
pub struct TargetRpc {
    path: PathBuf,
    client: RpcClient,
}

impl std::fmt::Debug for TargetRpc {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TargetRpc")
            .field("path", &self.path)
            .finish()
    }
}

impl TargetRpc {
    /// Connects to the admin socket at `path` and checks that it answers
    /// `framework_get_reactors`.
    pub fn connect(path: &Path) -> Result<TargetRpc, BenchError> {
        let err = |e: String| BenchError::TargetCpu(format!("{}: {e}", path.display()));
        let mut client = RpcClient::connect(path).map_err(|e| err(e.to_string()))?;
        client.set_timeout(Some(Duration::from_secs(5)));
        let mut t = TargetRpc {
            path: path.to_path_buf(),
            client,
        };
        t.sample()?;
        Ok(t)
    }

    /// The target's reactor counters now.
    pub fn sample(&mut self) -> Result<ReactorSample, BenchError> {
        let err = |e: String| BenchError::TargetCpu(format!("{}: {e}", self.path.display()));
        let v = self
            .client
            .call("framework_get_reactors", None)
            .map_err(|e| err(e.to_string()))?;
        Ok(ReactorSample {
            reactors: parse_reactors(&v).map_err(err)?,
        })
    }
}

/// The target's reactor counters at one instant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReactorSample {
    reactors: Vec<ReactorCounters>,
}

impl ReactorSample {
    /// Reactor time spent between `earlier` and this sample.
    pub fn since(&self, earlier: &ReactorSample) -> Vec<TargetReactor> {
        self.reactors
            .iter()
            .map(|r| {
                let e = earlier.reactors.iter().find(|e| e.index == r.index);
                let d =
                    |now: u64, f: fn(&ReactorCounters) -> u64| now.saturating_sub(e.map_or(0, f));
                TargetReactor {
                    index: r.index,
                    lcore: r.lcore,
                    busy_s: d(r.busy_ns, |c| c.busy_ns) as f64 / 1e9,
                    idle_s: d(r.idle_ns, |c| c.idle_ns) as f64 / 1e9,
                    ring_ops: d(r.ios_submitted, |c| c.ios_submitted),
                }
            })
            .collect()
    }
}

/// One target reactor over an interval, by its own accounting.
#[derive(Debug, Clone, PartialEq)]
pub struct TargetReactor {
    /// Reactor index.
    pub index: u64,
    /// CPU it is pinned to.
    pub lcore: u64,
    /// Seconds in loop turns that found work.
    pub busy_s: f64,
    /// Seconds spinning without work or blocked.
    pub idle_s: f64,
    /// Ring operations (SQEs) it submitted.
    pub ring_ops: u64,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn reactor_counters_parse_and_subtract() {
        let at = |busy: u64, idle: u64, ops: u64| {
            json!({"busy_poll": false, "idle_timeout_us": 50, "reactors": [
                {"index": 0, "lcore": 3, "busy_ns": busy, "idle_ns": idle, "busy_percent": 1.0,
                 "ios_submitted": ops, "ios_completed": 0, "tasks_run": 0, "sleeps": 0}]})
        };
        let a = ReactorSample {
            reactors: parse_reactors(&at(1_000_000_000, 5, 10)).expect("parse"),
        };
        let b = ReactorSample {
            reactors: parse_reactors(&at(1_250_000_000, 2_000_000_005, 110)).expect("parse"),
        };
        let d = b.since(&a);
        assert_eq!(d.len(), 1);
        assert_eq!((d[0].index, d[0].lcore, d[0].ring_ops), (0, 3, 100));
        assert!((d[0].busy_s - 0.25).abs() < 1e-9);
        assert!((d[0].idle_s - 2.0).abs() < 1e-9);
        assert!(parse_reactors(&json!({"reactors": [{"index": 0}]}))
            .expect_err("missing fields")
            .contains("lcore"));
        assert!(parse_reactors(&json!({})).is_err());
    }

    #[test]
    fn parses_stat_with_odd_names() {
        let line = "4242 (reactor (0) x) S 1 4242 4242 0 -1 4194560 1 0 0 0 \
                    1234 56 0 0 20 0 3 0 100 0 0";
        assert_eq!(
            parse_stat(line),
            Some(Ticks {
                name: "reactor (0) x".into(),
                user: 1234,
                sys: 56,
                sched: None,
            })
        );
        assert_eq!(parse_stat("1 (x) S 1 2"), None);
        assert_eq!(parse_schedstat("123 45 6\n"), Some((123, 45)));
        assert_eq!(parse_schedstat("123"), None);
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
