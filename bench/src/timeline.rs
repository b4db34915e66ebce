//! Latency over time, and commands run at set instants of a run.
//!
//! A histogram over the whole window hides what happens around one moment
//! (a mirror split, a rebuild starting): a 5 ms stall among a million 100 µs
//! I/Os moves no percentile. So, when asked (`--timeline-ms`, `--event`,
//! `--timeline-svg`), every measured I/O's completion time and latency are
//! kept (16 bytes each, in a vector reserved before the clock starts), and
//! after the run they are cut into fixed time buckets with exact
//! percentiles. An *event* is a shell command the main thread starts at a
//! given second of the measured window (for example `mirrorpoint rpc
//! mirror_split ...`); its start and end are recorded, and the I/Os that
//! completed from `window` before its start to `window` after its end are
//! compared with the steady state (every I/O outside all such windows). The
//! plot is a hand-written SVG: four lines and a few labels need no plotting
//! crate.

use crate::error::BenchError;
use serde::Serialize;
use std::fmt::Write as _;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

/// Bucket width used when only `--event` or `--timeline-svg` asks for a timeline.
pub const DEFAULT_BUCKET: Duration = Duration::from_millis(10);
/// Most buckets a run may have (keeps the report and the plot readable).
pub const MAX_BUCKETS: u64 = 20_000;
/// Most bytes of an event command's output kept in the report.
const MAX_OUTPUT: usize = 4096;

/// A command to run at `at` into the measured window.
#[derive(Debug, Clone, PartialEq)]
pub struct EventSpec {
    /// Offset from the start of the measured window.
    pub at: Duration,
    /// Run with `sh -c`.
    pub command: String,
}

/// Parses `SECS:COMMAND` (`--event "5:mirrorpoint rpc mirror_split ..."`).
pub fn parse_event(s: &str) -> Result<EventSpec, String> {
    let Some((secs, command)) = s.split_once(':') else {
        return Err(format!("--event '{s}': expected SECONDS:COMMAND"));
    };
    let at: f64 = secs
        .trim()
        .parse()
        .map_err(|_| format!("--event '{s}': '{secs}' is not a number of seconds"))?;
    if !at.is_finite() || !(0.0..=86_400.0).contains(&at) {
        return Err(format!(
            "--event '{s}': the time must be between 0 and 86400 seconds"
        ));
    }
    if command.trim().is_empty() {
        return Err(format!("--event '{s}': the command is empty"));
    }
    Ok(EventSpec {
        at: Duration::from_secs_f64(at),
        command: command.to_string(),
    })
}

/// A checked timeline request.
#[derive(Debug, Clone)]
pub struct TimelineConfig {
    /// Bucket width.
    pub bucket: Duration,
    /// Where to write the plot.
    pub svg: Option<PathBuf>,
    /// Commands to run during the window.
    pub events: Vec<EventSpec>,
    /// Time before an event's start and after its end that counts as around it.
    pub window: Duration,
}

impl TimelineConfig {
    /// Checks the request against the measured window's length.
    pub fn check(&self, measured: Duration) -> Result<(), BenchError> {
        let invalid = |m: String| Err(BenchError::InvalidArgument(m));
        if self.bucket < Duration::from_micros(100) {
            return invalid("--timeline-ms: buckets must be at least 0.1 ms".into());
        }
        let buckets = measured.as_nanos() / self.bucket.as_nanos().max(1);
        if buckets > u128::from(MAX_BUCKETS) {
            return invalid(format!(
                "--timeline-ms: {buckets} buckets over the window; at most {MAX_BUCKETS}"
            ));
        }
        if let Some(e) = self.events.iter().find(|e| e.at >= measured) {
            return invalid(format!(
                "--event at {:.3} s: not inside the {:.3} s measured window",
                e.at.as_secs_f64(),
                measured.as_secs_f64()
            ));
        }
        Ok(())
    }
}

/// One measured I/O: completion (ns since the measured window began) and latency (ns).
pub type Sample = (u64, u64);

/// What an event did.
#[derive(Debug, Clone)]
pub struct EventRun {
    /// The request.
    pub spec: EventSpec,
    /// When the command started, from the window's start.
    pub started: Duration,
    /// When it exited.
    pub finished: Duration,
    /// Exit status (-1: killed by a signal or could not start).
    pub exit_code: i32,
    /// Its standard output, then standard error, shortened.
    pub output: String,
}

/// Runs `spec` at `window_start + spec.at` on a thread of its own.
pub fn spawn_event(
    spec: EventSpec,
    window_start: Instant,
) -> std::thread::JoinHandle<Result<EventRun, BenchError>> {
    std::thread::spawn(move || {
        let when = window_start + spec.at;
        let now = Instant::now();
        if when > now {
            std::thread::sleep(when - now);
        }
        let t0 = Instant::now();
        let out = Command::new("sh").arg("-c").arg(&spec.command).output();
        let t1 = Instant::now();
        let out = out.map_err(|error| BenchError::Event {
            command: spec.command.clone(),
            error,
        })?;
        let mut text = String::from_utf8_lossy(&out.stdout).trim().to_string();
        let err = String::from_utf8_lossy(&out.stderr);
        if !err.trim().is_empty() {
            if !text.is_empty() {
                text.push('\n');
            }
            text.push_str(err.trim());
        }
        if text.len() > MAX_OUTPUT {
            let mut cut = MAX_OUTPUT;
            while !text.is_char_boundary(cut) {
                cut -= 1;
            }
            text.truncate(cut);
            text.push_str(" [...]");
        }
        Ok(EventRun {
            started: t0.saturating_duration_since(window_start),
            finished: t1.saturating_duration_since(window_start),
            exit_code: out.status.code().unwrap_or(-1),
            output: text,
            spec,
        })
    })
}

/// Latency figures of a set of I/Os, in microseconds.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct WindowStats {
    /// I/Os in the set.
    pub ios: u64,
    /// Median.
    pub p50_us: f64,
    /// 99th percentile.
    pub p99_us: f64,
    /// 99.9th percentile.
    pub p99_9_us: f64,
    /// Largest.
    pub max_us: f64,
}

impl WindowStats {
    /// Exact (nearest-rank) figures of `lat_ns`, which this sorts.
    fn of(lat_ns: &mut [u64]) -> WindowStats {
        lat_ns.sort_unstable();
        let n = lat_ns.len();
        let rank = |q: f64| -> f64 {
            if n == 0 {
                return 0.0;
            }
            let i = ((q * n as f64).ceil() as usize).clamp(1, n) - 1;
            lat_ns[i] as f64 / 1000.0
        };
        WindowStats {
            ios: n as u64,
            p50_us: rank(0.50),
            p99_us: rank(0.99),
            p99_9_us: rank(0.999),
            max_us: lat_ns.last().map_or(0.0, |&v| v as f64 / 1000.0),
        }
    }
}

/// One time bucket.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Bucket {
    /// Bucket start, seconds into the measured window.
    pub t_s: f64,
    /// Its I/Os (by completion time) and their latency.
    #[serde(flatten)]
    pub stats: WindowStats,
}

/// An event in the report.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct EventReport {
    /// The command.
    pub command: String,
    /// Asked-for start, seconds into the measured window.
    pub at_s: f64,
    /// Real start.
    pub started_s: f64,
    /// Exit.
    pub finished_s: f64,
    /// Exit minus start, in milliseconds.
    pub duration_ms: f64,
    /// Exit status.
    pub exit_code: i32,
    /// What it printed.
    pub output: String,
    /// I/Os completed from `window_ms` before its start to `window_ms` after its end.
    pub around: WindowStats,
    /// Longest I/O around the event over the steady p99.9 (the stall goal's ratio).
    pub max_over_steady_p99_9: f64,
}

/// The timeline part of a report.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct TimelineReport {
    /// Bucket width in milliseconds.
    pub bucket_ms: f64,
    /// Milliseconds around each event counted as "around" it.
    pub window_ms: f64,
    /// I/Os completed outside every event's surroundings.
    pub steady: WindowStats,
    /// The events, in start order.
    pub events: Vec<EventReport>,
    /// Per bucket, from the start of the measured window.
    pub buckets: Vec<Bucket>,
}

/// Builds the timeline of a run from every core's samples and the events.
pub fn build(
    cfg: &TimelineConfig,
    measured: Duration,
    samples: &[&[Sample]],
    events: &[EventRun],
) -> TimelineReport {
    let bucket_ns = cfg.bucket.as_nanos().max(1) as u64;
    let nbuckets = (measured.as_nanos() as u64).div_ceil(bucket_ns).max(1) as usize;
    let mut per_bucket: Vec<Vec<u64>> = vec![Vec::new(); nbuckets];
    let window_ns = cfg.window.as_nanos() as u64;
    let spans: Vec<(u64, u64)> = events
        .iter()
        .map(|e| {
            (
                (e.started.as_nanos() as u64).saturating_sub(window_ns),
                e.finished.as_nanos() as u64 + window_ns,
            )
        })
        .collect();
    let mut steady = Vec::new();
    let mut around: Vec<Vec<u64>> = vec![Vec::new(); events.len()];
    for &(done, lat) in samples.iter().flat_map(|s| s.iter()) {
        let b = ((done / bucket_ns) as usize).min(nbuckets - 1);
        per_bucket[b].push(lat);
        let mut inside = false;
        for (i, &(from, to)) in spans.iter().enumerate() {
            if (from..=to).contains(&done) {
                around[i].push(lat);
                inside = true;
            }
        }
        if !inside {
            steady.push(lat);
        }
    }
    let steady = WindowStats::of(&mut steady);
    let events = events
        .iter()
        .zip(around.iter_mut())
        .map(|(e, lat)| {
            let around = WindowStats::of(lat);
            EventReport {
                command: e.spec.command.clone(),
                at_s: e.spec.at.as_secs_f64(),
                started_s: e.started.as_secs_f64(),
                finished_s: e.finished.as_secs_f64(),
                duration_ms: e.finished.saturating_sub(e.started).as_secs_f64() * 1e3,
                exit_code: e.exit_code,
                output: e.output.clone(),
                max_over_steady_p99_9: if steady.p99_9_us > 0.0 {
                    around.max_us / steady.p99_9_us
                } else {
                    0.0
                },
                around,
            }
        })
        .collect();
    let buckets = per_bucket
        .iter_mut()
        .enumerate()
        .map(|(i, lat)| Bucket {
            t_s: (i as u64 * bucket_ns) as f64 / 1e9,
            stats: WindowStats::of(lat),
        })
        .collect();
    TimelineReport {
        bucket_ms: bucket_ns as f64 / 1e6,
        window_ms: cfg.window.as_secs_f64() * 1e3,
        steady,
        events,
        buckets,
    }
}

/// A plotted line: name, colour, and the figure it shows.
type Series = (&'static str, &'static str, fn(&WindowStats) -> f64);

/// Geometry of the plot.
const WIDTH: f64 = 960.0;
const HEIGHT: f64 = 440.0;
const LEFT: f64 = 70.0;
const RIGHT: f64 = 20.0;
const TOP: f64 = 40.0;
const BOTTOM: f64 = 50.0;

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// The timeline as an SVG document: latency (log scale) against time, one
/// line per percentile, each event marked, and the stall limit (2x steady p99.9).
pub fn svg(t: &TimelineReport, title: &str) -> String {
    let plot_w = WIDTH - LEFT - RIGHT;
    let plot_h = HEIGHT - TOP - BOTTOM;
    let duration = t.buckets.len() as f64 * t.bucket_ms / 1e3;
    let limit = 2.0 * t.steady.p99_9_us;
    let values = t
        .buckets
        .iter()
        .filter(|b| b.stats.ios > 0)
        .flat_map(|b| [b.stats.p50_us, b.stats.max_us]);
    let (mut lo, mut hi) = values.fold((f64::MAX, 0.0f64), |(lo, hi), v| (lo.min(v), hi.max(v)));
    if lo > hi {
        (lo, hi) = (1.0, 1000.0);
    }
    hi = hi.max(limit);
    let lo_dec = lo.max(0.1).log10().floor();
    let hi_dec = hi.max(1.0).log10().ceil().max(lo_dec + 1.0);
    let x = |s: f64| LEFT + plot_w * (s / duration.max(f64::MIN_POSITIVE));
    let y = |us: f64| {
        let v = us.max(10f64.powf(lo_dec)).log10();
        TOP + plot_h * (1.0 - (v - lo_dec) / (hi_dec - lo_dec))
    };
    let mut out = String::new();
    let _ = writeln!(
        out,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" viewBox="0 0 {WIDTH} {HEIGHT}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(
        out,
        r#"<rect x="0" y="0" width="{WIDTH}" height="{HEIGHT}" fill="white"/>"#
    );
    let _ = writeln!(
        out,
        r#"<text x="{LEFT}" y="18" font-size="14">{}</text>"#,
        escape(title)
    );
    // Grid: one line per decade, one per second (or per tenth of the window).
    let mut d = lo_dec;
    while d <= hi_dec {
        let yy = y(10f64.powf(d));
        let _ = writeln!(
            out,
            r##"<line x1="{LEFT}" y1="{yy:.1}" x2="{:.1}" y2="{yy:.1}" stroke="#ddd"/><text x="{:.1}" y="{:.1}" text-anchor="end">{}</text>"##,
            LEFT + plot_w,
            LEFT - 6.0,
            yy + 4.0,
            fmt_us(10f64.powf(d))
        );
        d += 1.0;
    }
    let step = nice_step(duration);
    let mut s = 0.0;
    while s <= duration + 1e-9 {
        let xx = x(s);
        let _ = writeln!(
            out,
            r##"<line x1="{xx:.1}" y1="{TOP}" x2="{xx:.1}" y2="{:.1}" stroke="#eee"/><text x="{xx:.1}" y="{:.1}" text-anchor="middle">{}</text>"##,
            TOP + plot_h,
            TOP + plot_h + 16.0,
            trim_float(s)
        );
        s += step;
    }
    let _ = writeln!(
        out,
        r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">seconds into the measured window ({} ms buckets, by completion time)</text>"#,
        LEFT + plot_w / 2.0,
        HEIGHT - 10.0,
        trim_float(t.bucket_ms)
    );
    let _ = writeln!(
        out,
        r#"<text transform="translate(16,{:.1}) rotate(-90)" text-anchor="middle">I/O latency</text>"#,
        TOP + plot_h / 2.0
    );
    // Events: shaded from start to end, a line at the start.
    for e in &t.events {
        let (x0, x1) = (x(e.started_s), x(e.finished_s));
        let _ = writeln!(
            out,
            r##"<rect x="{x0:.1}" y="{TOP}" width="{:.1}" height="{plot_h:.1}" fill="#f3c0c0" opacity="0.6"/><line x1="{x0:.1}" y1="{TOP}" x2="{x0:.1}" y2="{:.1}" stroke="#c00000" stroke-dasharray="4 3"/><text x="{:.1}" y="{:.1}" fill="#c00000">{} ({:.2} ms)</text>"##,
            (x1 - x0).max(1.5),
            TOP + plot_h,
            x0 + 4.0,
            TOP + 14.0,
            escape(&event_label(&e.command)),
            e.duration_ms
        );
    }
    if limit > 0.0 {
        let yy = y(limit);
        let _ = writeln!(
            out,
            r##"<line x1="{LEFT}" y1="{yy:.1}" x2="{:.1}" y2="{yy:.1}" stroke="#555" stroke-dasharray="6 4"/><text x="{:.1}" y="{:.1}" text-anchor="end" fill="#555">2x steady p99.9 ({})</text>"##,
            LEFT + plot_w,
            LEFT + plot_w - 4.0,
            yy - 4.0,
            fmt_us(limit)
        );
    }
    let series: [Series; 4] = [
        ("p50", "#999999", |s| s.p50_us),
        ("p99", "#1f77b4", |s| s.p99_us),
        ("p99.9", "#ff7f0e", |s| s.p99_9_us),
        ("max", "#d62728", |s| s.max_us),
    ];
    for (i, (name, color, get)) in series.iter().enumerate() {
        let mut points = String::new();
        for b in t.buckets.iter().filter(|b| b.stats.ios > 0) {
            let _ = write!(
                points,
                "{:.1},{:.1} ",
                x(b.t_s + t.bucket_ms / 2e3),
                y(get(&b.stats))
            );
        }
        let _ = writeln!(
            out,
            r#"<polyline fill="none" stroke="{color}" stroke-width="1.2" points="{}"/>"#,
            points.trim_end()
        );
        // Legend: top right, above the plot.
        let lx = WIDTH - RIGHT - 320.0 + 80.0 * i as f64;
        let ly = TOP - 8.0;
        let _ = writeln!(
            out,
            r#"<line x1="{lx:.1}" y1="{ly:.1}" x2="{:.1}" y2="{ly:.1}" stroke="{color}" stroke-width="2"/><text x="{:.1}" y="{:.1}">{name}</text>"#,
            lx + 20.0,
            lx + 24.0,
            ly + 4.0
        );
    }
    let _ = writeln!(
        out,
        r#"<rect x="{LEFT}" y="{TOP}" width="{plot_w:.1}" height="{plot_h:.1}" fill="none" stroke="black"/>"#
    );
    out.push_str("</svg>\n");
    out
}

/// The first words of a command, for the plot's label.
fn event_label(command: &str) -> String {
    let words: Vec<&str> = command.split_whitespace().collect();
    // `... rpc METHOD ...` reads best as the method name.
    // (skipping options and paths: `rpc -s /run/mp.sock mirror_split ...`).
    if let Some(i) = words.iter().position(|w| *w == "rpc") {
        if let Some(m) = words[i + 1..]
            .iter()
            .find(|w| !w.starts_with('-') && !w.contains('/'))
        {
            return (*m).to_string();
        }
    }
    let mut s = words.iter().take(3).copied().collect::<Vec<_>>().join(" ");
    if s.len() > 40 {
        s.truncate(40);
    }
    s
}

fn nice_step(duration: f64) -> f64 {
    let raw = (duration / 10.0).max(1e-3);
    let mag = 10f64.powf(raw.log10().floor());
    [1.0, 2.0, 5.0, 10.0]
        .into_iter()
        .map(|m| m * mag)
        .find(|s| *s >= raw)
        .unwrap_or(10.0 * mag)
}

fn trim_float(v: f64) -> String {
    let s = format!("{v:.3}");
    s.trim_end_matches('0').trim_end_matches('.').to_string()
}

fn fmt_us(us: f64) -> String {
    if us >= 1e6 {
        format!("{} s", trim_float(us / 1e6))
    } else if us >= 1e3 {
        format!("{} ms", trim_float(us / 1e3))
    } else {
        format!("{} µs", trim_float(us))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> TimelineConfig {
        TimelineConfig {
            bucket: Duration::from_millis(100),
            svg: None,
            events: vec![],
            window: Duration::from_millis(50),
        }
    }

    #[test]
    fn events_parse_and_reject_nonsense() {
        let e = parse_event("2.5:mirrorpoint rpc mirror_split a:b").expect("valid");
        assert_eq!(e.at, Duration::from_millis(2500));
        assert_eq!(e.command, "mirrorpoint rpc mirror_split a:b");
        for bad in ["", "5", "x:cmd", "-1:cmd", "3:  ", "NaN:cmd", "1e9:cmd"] {
            assert!(parse_event(bad).is_err(), "{bad}");
        }
        let mut c = cfg();
        c.events.push(parse_event("10:true").expect("valid"));
        assert!(c.check(Duration::from_secs(10)).is_err());
        assert!(c.check(Duration::from_secs(11)).is_ok());
        c.bucket = Duration::from_micros(10);
        assert!(c.check(Duration::from_secs(11)).is_err());
    }

    #[test]
    fn buckets_and_event_windows_hold_exactly_their_ios() {
        // 1 s window, 100 ms buckets; 100 I/Os of 100 µs spread evenly, one
        // 5 ms I/O completing at 500 ms, next to an event from 490 to 495 ms.
        let mut samples: Vec<Sample> = (0..100).map(|i| (i * 10_000_000, 100_000)).collect();
        samples.push((500_000_000, 5_000_000));
        let run = EventRun {
            spec: EventSpec {
                at: Duration::from_millis(490),
                command: "mirrorpoint rpc mirror_split x".into(),
            },
            started: Duration::from_millis(490),
            finished: Duration::from_millis(495),
            exit_code: 0,
            output: "{}".into(),
        };
        let t = build(&cfg(), Duration::from_secs(1), &[&samples], &[run]);
        assert_eq!(t.buckets.len(), 10);
        assert!(t.buckets.iter().all(|b| b.stats.ios >= 10));
        assert_eq!(t.buckets[5].stats.ios, 11);
        assert_eq!(t.buckets[5].stats.max_us, 5000.0);
        // Around the event: completions from 440 to 545 ms: 44..=54 (11) + the slow one.
        let e = &t.events[0];
        assert_eq!(e.around.ios, 12);
        assert_eq!(e.around.max_us, 5000.0);
        assert_eq!(t.steady.ios, 89);
        assert_eq!(t.steady.max_us, 100.0);
        assert_eq!(e.max_over_steady_p99_9, 50.0);
        assert!((e.duration_ms - 5.0).abs() < 1e-9);
        let plot = svg(&t, "split <test>");
        assert!(plot.starts_with("<svg") && plot.trim_end().ends_with("</svg>"));
        assert!(plot.contains("mirror_split (5.00 ms)"));
        assert_eq!(
            event_label("mirrorpoint rpc -s /run/mp.sock mirror_split '{}'"),
            "mirror_split"
        );
        assert!(plot.contains("split &lt;test&gt;"));
        assert_eq!(plot.matches("<polyline").count(), 4);
    }

    #[test]
    fn percentiles_are_nearest_rank() {
        let mut v: Vec<u64> = (1..=1000).map(|i| i * 1000).collect();
        let s = WindowStats::of(&mut v);
        assert_eq!(
            (s.p50_us, s.p99_us, s.p99_9_us, s.max_us),
            (500.0, 990.0, 999.0, 1000.0)
        );
        assert_eq!(WindowStats::of(&mut []).ios, 0);
    }

    #[test]
    fn an_event_command_runs_and_is_timed() {
        let spec = parse_event("0:echo split-point; sleep 0.05").expect("valid");
        let start = Instant::now();
        let run = spawn_event(spec, start)
            .join()
            .expect("event thread")
            .expect("ran");
        assert_eq!(run.exit_code, 0);
        assert_eq!(run.output, "split-point");
        assert!(run.finished >= run.started + Duration::from_millis(50));
    }
}
