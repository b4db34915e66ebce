//! Online consistency check (`mirror_verify`) and repair (`mirror_repair`).
//!
//! # Check
//! One task per mirror (on its first reactor) walks the volume in steps of
//! [`STEP`] bytes (at least one bitmap region, region-aligned). For each
//! step it takes the step's range in the [`OverlapDetector`](super::overlap)
//! — so no host write to it is in flight on any leg and none starts — then,
//! concurrently, digests the local data and asks every live remote leg for
//! its digests of the same range (`RangeDigest` on this core's link). Only
//! digests cross the link: the hosted side reads its extents through its
//! storage-server volumes and digests there ([`digest_regions`] is shared by
//! both sides). The lock is released before the comparison, so a host write
//! waits at most one step's reads.
//!
//! The digest is SHA-256, one per bitmap region (so reports have region
//! granularity and line up with what resync copies). It is the wire's only
//! digest algorithm; unlike CRC32C it cannot be made to collide by the data
//! (a 32-bit check also lets one bad region in 4 billion through, which a
//! large volume with many corrupted regions can reach), and with SHA-NI it
//! runs at about disk speed. 32 bytes per 64 KiB region is 1/2048 of the data.
//!
//! A region is compared for a leg only when the leg is live (synced or
//! syncing) before and after the request on the same link generation and
//! its bit in the leg's dirty bitmap is clear (a dirty region is known to
//! differ; resync owns it). Skipped bytes are counted per leg. Differing
//! regions are merged with their neighbours that differ on the same legs,
//! logged (`tracing::warn`), and reported as `out_of_sync` in
//! `mirror_get_status`.
//!
//! # Repair
//! `local_to_legs` copies each out-of-sync region from the local leg to the
//! legs that differ (`Write{RESYNC}` under the region's overlap lock, like
//! resync). `from_leg` reads the chosen leg (`Read`) and writes the data to
//! the local volume and every other leg. A leg that is down gets the region
//! in its dirty bitmap instead (its resync copies it). Then the repaired
//! ranges are verified again, and that pass's result is the new report.
//!
//! # Restart
//! The job (cursor, what was found, the repair still to do, the rate) is a
//! small JSON next to the mirror's metadata, written atomically (by a helper
//! thread: no blocking syscall on a reactor) at most every
//! [`PERSIST_EVERY`] and at every state change. After a `kill -9` the job
//! resumes from the cursor (ranges found past the cursor are dropped and
//! found again), and an interrupted repair redoes its remaining regions
//! (copying is idempotent).

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use mirrorpoint_poller::{oneshot, sleep, spawn, yield_now, IoBuf, IoBufMut};
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use super::engine::{LegState, Mirror, Reply};
use super::link::{alloc_wait, join_all};
use super::wire::{
    DigestAlgo, Epoch, Message, RangeDigest, Read, SeqNo, Status, Write, WriteFlags,
};
use crate::units::{ByteLen, ByteOffset};

/// Bytes checked per step (one overlap-lock hold); raised to the region size
/// when regions are larger.
pub const STEP: u64 = 1 << 20;

/// Steps checked concurrently (pipelining one step's digesting with the
/// next one's reads and the legs' answers; each step holds its own lock).
/// With 4, the legs' storage-volume channels see more operations than their
/// queue depth, which is what exposed the lost wake-up fixed in
/// `LocalSemaphore` (host writes to the leg hung until the link timed out).
pub const DEPTH: usize = 4;

/// Longest interval between two writes of the job file while running.
pub const PERSIST_EVERY: Duration = Duration::from_millis(500);

/// Default verify rate cap, bytes per second.
pub const DEFAULT_RATE: u64 = 256 << 20;

/// How long a starting (or resumed) job waits for down legs to come up.
const WAIT_LEGS: Duration = Duration::from_secs(30);

/// Errors of the verify RPCs.
#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    /// A verify or repair already runs.
    #[error("a verify or repair of mirror '{0}' is already running")]
    Busy(String),
    /// Nothing runs.
    #[error("no verify or repair of mirror '{0}' is running")]
    NotRunning(String),
    /// A parameter is wrong (names it).
    #[error("{field}: {message}")]
    Param {
        /// The parameter.
        field: &'static str,
        /// What is wrong.
        message: String,
    },
    /// Repair asked without a finished verify that found something.
    #[error("nothing to repair: {0}")]
    NothingToRepair(String),
    /// The job file could not be written.
    #[error("verify state file {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
}

/// Where a job is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobState {
    /// Never run.
    #[default]
    Idle,
    /// Checking (or repairing, see `repair`).
    Running,
    /// Stopped by `mirror_verify_cancel`.
    Cancelled,
    /// Done; `out_of_sync` is the result.
    Finished,
    /// Stopped by an error (`last_error`).
    Failed,
}

/// Which way `mirror_repair` copies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Direction {
    /// The local leg wins: copied to the legs that differ.
    LocalToLegs,
    /// The given remote leg wins: copied to the local leg and the others.
    FromLeg,
}

/// A range that differs between the local leg and `legs`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutOfSync {
    /// Start (region-aligned).
    pub offset: u64,
    /// Length (whole regions, the last one may end at the volume's end).
    pub length: u64,
    /// Remote legs whose data differs from the local leg's.
    pub legs: Vec<usize>,
}

/// A byte range of the volume.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Span {
    /// Start.
    pub offset: u64,
    /// Length.
    pub length: u64,
}

/// A repair in progress.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RepairJob {
    /// Direction.
    pub direction: Direction,
    /// The source leg for `from_leg`.
    pub leg: Option<usize>,
    /// Still to copy (the front entry shrinks as its regions are done).
    pub remaining: Vec<OutOfSync>,
    /// What is being repaired (verified again afterwards).
    pub spans: Vec<Span>,
    /// Bytes copied so far.
    pub repaired_bytes: u64,
    /// Bytes to copy in all.
    pub total_bytes: u64,
    /// Regions handed to resync (leg down) instead of copied.
    pub deferred_regions: u64,
}

/// A verify job: what `mirror_get_status` shows and what survives restarts.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Job {
    /// State.
    pub state: JobState,
    /// What this pass checks: the whole volume, or repaired ranges.
    pub scope: Vec<Span>,
    /// Everything in `scope` below this offset is checked.
    pub cursor: u64,
    /// Bytes in `scope`.
    pub total_bytes: u64,
    /// Bytes checked.
    pub checked_bytes: u64,
    /// Rate cap, bytes per second (0: none).
    pub rate_limit: u64,
    /// Measured rate of the current/last run, bytes per second.
    pub rate_bps: u64,
    /// Started (ms since the Unix epoch).
    pub started_unix_ms: Option<u64>,
    /// Finished, cancelled or failed (ms since the Unix epoch).
    pub finished_unix_ms: Option<u64>,
    /// Ranges found different so far.
    pub out_of_sync: Vec<OutOfSync>,
    /// Per leg: bytes not compared (leg down, region dirty, no answer).
    pub skipped_bytes: Vec<u64>,
    /// A repair still to do before the check.
    pub repair: Option<RepairJob>,
    /// Why it failed.
    pub last_error: Option<String>,
    /// Times the job was resumed after a restart.
    pub resumed: u64,
}

/// Per-mirror verify state (lives in the engine's `Mirror`).
#[derive(Default)]
pub struct VerifyState {
    job: Mutex<Job>,
    running: AtomicBool,
    cancel: AtomicBool,
    rate: AtomicU64,
}

impl VerifyState {
    fn job(&self) -> MutexGuard<'_, Job> {
        self.job.lock().unwrap_or_else(|p| p.into_inner())
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// The job file of a mirror: next to its metadata file.
pub fn job_path(m: &Mirror) -> PathBuf {
    m.meta().path().with_extension("verify.json")
}

fn write_atomically(path: &Path, job: &Job) -> Result<(), VerifyError> {
    use std::io::Write as _;
    let io = |source| VerifyError::Io {
        path: path.to_path_buf(),
        source,
    };
    let text = serde_json::to_vec_pretty(job).map_err(|e| io(std::io::Error::other(e)))?;
    let tmp = path.with_extension("verify.tmp");
    let mut f = std::fs::File::create(&tmp).map_err(io)?;
    f.write_all(&text).map_err(io)?;
    f.sync_all().map_err(io)?;
    std::fs::rename(&tmp, path).map_err(io)?;
    if let Some(dir) = path.parent() {
        if let Ok(d) = std::fs::File::open(dir) {
            let _ = d.sync_all();
        }
    }
    Ok(())
}

/// Writes the job file from a reactor (the write runs on a helper thread).
async fn persist(m: &Arc<Mirror>) {
    let job = m.verify_state().job().clone();
    let path = job_path(m);
    let (tx, rx) = oneshot();
    let spawned = std::thread::Builder::new()
        .name("verify-persist".into())
        .spawn(move || tx.send(write_atomically(&path, &job)));
    let res = match spawned {
        Ok(_) => rx.await.unwrap_or(Ok(())),
        Err(e) => Err(VerifyError::Io {
            path: job_path(m),
            source: e,
        }),
    };
    if let Err(e) = res {
        tracing::error!(mirror = m.name(), "persisting the verify state: {e}");
    }
}

/// Removes a deleted mirror's job file.
pub fn forget(m: &Mirror) {
    let _ = std::fs::remove_file(job_path(m));
}

/// After `mirror_create` (start or replay): loads the job file and resumes
/// a job that was running when the daemon stopped.
pub fn resume(m: &Arc<Mirror>) {
    let path = job_path(m);
    let Ok(text) = std::fs::read(&path) else {
        return;
    };
    let mut job: Job = match serde_json::from_slice(&text) {
        Ok(j) => j,
        Err(e) => {
            tracing::warn!(
                mirror = m.name(),
                "ignoring unreadable verify state {}: {e}",
                path.display()
            );
            return;
        }
    };
    let vs = m.verify_state();
    let run = job.state == JobState::Running;
    if run {
        job.resumed += 1;
        // Ranges found past the cursor are found again.
        let cursor = job.cursor;
        job.out_of_sync.retain(|o| o.offset < cursor);
        if let Some(last) = job.out_of_sync.last_mut() {
            last.length = last.length.min(cursor - last.offset);
        }
        tracing::info!(
            mirror = m.name(),
            cursor = job.cursor,
            repair = job.repair.is_some(),
            "resuming the interrupted verify"
        );
    }
    vs.rate.store(job.rate_limit, Ordering::Relaxed);
    *vs.job() = job;
    if run {
        vs.running.store(true, Ordering::SeqCst);
        start_task(m.clone());
    }
}

fn start_task(m: Arc<Mirror>) {
    let Some(r) = m.first_reactor().cloned() else {
        m.verify_state().running.store(false, Ordering::SeqCst);
        return;
    };
    r.post(move || spawn(run(m)).detach());
}

/// `mirror_verify`: starts a check of the whole volume; returns at once.
pub fn start(m: &Arc<Mirror>, rate: Option<u64>) -> Result<Job, VerifyError> {
    let vs = m.verify_state();
    if vs
        .running
        .compare_exchange(false, true, Ordering::SeqCst, Ordering::SeqCst)
        .is_err()
    {
        return Err(VerifyError::Busy(m.name().to_string()));
    }
    let size = m.local().size().0;
    let rate = rate.unwrap_or(DEFAULT_RATE);
    vs.cancel.store(false, Ordering::SeqCst);
    vs.rate.store(rate, Ordering::Relaxed);
    let job = Job {
        state: JobState::Running,
        scope: vec![Span {
            offset: 0,
            length: size,
        }],
        cursor: 0,
        total_bytes: size,
        rate_limit: rate,
        started_unix_ms: Some(now_ms()),
        skipped_bytes: vec![0; m.leg_count()],
        ..Job::default()
    };
    if let Err(e) = write_atomically(&job_path(m), &job) {
        vs.running.store(false, Ordering::SeqCst);
        return Err(e);
    }
    *vs.job() = job.clone();
    start_task(m.clone());
    Ok(job)
}

/// `mirror_repair`: repairs what the last verify found, then verifies it again.
pub fn repair(
    m: &Arc<Mirror>,
    direction: Direction,
    leg: Option<usize>,
    rate: Option<u64>,
) -> Result<RepairJob, VerifyError> {
    match (direction, leg) {
        (Direction::FromLeg, None) => {
            return Err(VerifyError::Param {
                field: "leg",
                message: "direction \"from_leg\" needs the source leg".into(),
            })
        }
        (Direction::LocalToLegs, Some(_)) => {
            return Err(VerifyError::Param {
                field: "leg",
                message: "direction \"local_to_legs\" takes no leg".into(),
            })
        }
        (_, Some(l)) if l >= m.leg_count() => {
            return Err(VerifyError::Param {
                field: "leg",
                message: format!("mirror has {} remote legs, no leg {l}", m.leg_count()),
            })
        }
        _ => {}
    }
    let vs = m.verify_state();
    if vs
        .running
        .compare_exchange(false, true, Ordering::SeqCst, Ordering::SeqCst)
        .is_err()
    {
        return Err(VerifyError::Busy(m.name().to_string()));
    }
    let fail = |e| {
        vs.running.store(false, Ordering::SeqCst);
        Err(e)
    };
    let mut job = vs.job().clone();
    if job.state != JobState::Finished {
        return fail(VerifyError::NothingToRepair(format!(
            "the last verify is {:?}, not finished",
            job.state
        )));
    }
    if job.out_of_sync.is_empty() {
        return fail(VerifyError::NothingToRepair(
            "the last verify found no out-of-sync range".into(),
        ));
    }
    let spans: Vec<Span> = job
        .out_of_sync
        .iter()
        .map(|o| Span {
            offset: o.offset,
            length: o.length,
        })
        .collect();
    let total: u64 = spans.iter().map(|s| s.length).sum();
    let rj = RepairJob {
        direction,
        leg,
        remaining: job.out_of_sync.clone(),
        spans: spans.clone(),
        repaired_bytes: 0,
        total_bytes: total,
        deferred_regions: 0,
    };
    let rate = rate.unwrap_or(job.rate_limit);
    vs.cancel.store(false, Ordering::SeqCst);
    vs.rate.store(rate, Ordering::Relaxed);
    job.state = JobState::Running;
    job.repair = Some(rj.clone());
    job.rate_limit = rate;
    job.last_error = None;
    job.started_unix_ms = Some(now_ms());
    job.finished_unix_ms = None;
    if let Err(e) = write_atomically(&job_path(m), &job) {
        return fail(e);
    }
    *vs.job() = job;
    start_task(m.clone());
    Ok(rj)
}

/// `mirror_verify_cancel`: stops the running job at its next step.
pub fn cancel(m: &Mirror) -> Result<(), VerifyError> {
    let vs = m.verify_state();
    if !vs.running.load(Ordering::SeqCst) {
        return Err(VerifyError::NotRunning(m.name().to_string()));
    }
    vs.cancel.store(true, Ordering::SeqCst);
    Ok(())
}

/// `mirror_verify_set_rate`.
pub fn set_rate(m: &Mirror, bps: u64) {
    let vs = m.verify_state();
    vs.rate.store(bps, Ordering::Relaxed);
    vs.job().rate_limit = bps;
}

/// The job, as `mirror_get_status` and `mirror_verify_get` show it.
pub fn snapshot(m: &Mirror) -> Job {
    m.verify_state().job().clone()
}

/// Whether a job task is running.
pub fn is_running(m: &Mirror) -> bool {
    m.verify_state().running.load(Ordering::SeqCst)
}

// ---------------------------------------------------------------------------
// Digests (both sides).

/// One SHA-256 digest per `region` bytes of `offset..offset+len` (the last
/// region may be short), packed. `read(offset, len)` returns `len` bytes of
/// the volume in a pool chunk; `chunk` bounds `len`. The reads of a call are
/// issued concurrently (at most [`STEP`] bytes' worth), then hashed in order,
/// yielding to the reactor after each chunk.
pub async fn digest_regions<F>(
    read: F,
    offset: u64,
    len: u64,
    region: u64,
    chunk: u64,
) -> Result<Vec<u8>, String>
where
    F: AsyncFn(u64, usize) -> Result<IoBufMut, String>,
{
    if region == 0 || chunk == 0 {
        return Err("region and chunk sizes must be non-zero".into());
    }
    let end = offset
        .checked_add(len)
        .ok_or_else(|| "range overflows".to_string())?;
    // The pieces: chunk-sized, never crossing a region boundary.
    let mut pieces = Vec::new();
    let mut r_start = offset;
    while r_start < end {
        let r_end = r_start.saturating_add(region).min(end);
        let mut off = r_start;
        while off < r_end {
            let n = chunk.min(r_end - off);
            pieces.push((off, n, off + n == r_end));
            off += n;
        }
        r_start = r_end;
    }
    let mut out = Vec::with_capacity(len.div_ceil(region) as usize * 32);
    let mut hasher = Sha256::new();
    let batch = (STEP / chunk).max(1) as usize;
    for group in pieces.chunks(batch) {
        let futs = group
            .iter()
            .map(|&(off, n, _)| {
                let read = &read;
                Box::pin(async move { read(off, n as usize).await })
                    as std::pin::Pin<
                        Box<dyn std::future::Future<Output = Result<IoBufMut, String>> + '_>,
                    >
            })
            .collect();
        let bufs = join_all(futs).await;
        for (&(_, _, last), b) in group.iter().zip(bufs) {
            let b = b?;
            hasher.update(&b[..]);
            if last {
                out.extend_from_slice(&hasher.finalize_reset());
            }
            // One chunk's hash (tens of µs) at a time: the host's I/O on
            // this reactor runs between them instead of waiting behind a
            // whole step's (about 0.5 ms per MiB, several steps in a row
            // when the pacer releases a window).
            yield_now().await;
        }
    }
    Ok(out)
}

/// Checks a `RangeDigest` request against a hosted leg of `size` bytes.
pub fn check_request(r: &RangeDigest, size: u64) -> Status {
    if r.algo != DigestAlgo::Sha256 {
        return Status::InvalidRequest;
    }
    match r.offset.0.checked_add(r.len.0) {
        Some(end) if end <= size => Status::Ok,
        _ => Status::OutOfRange,
    }
}

// ---------------------------------------------------------------------------
// The job task.

enum Stop {
    Cancelled,
    Stopping,
    Failed(String),
}

async fn run(m: Arc<Mirror>) {
    let res = run_job(&m).await;
    let vs = m.verify_state();
    {
        let mut job = vs.job();
        match &res {
            Ok(()) => {
                job.state = JobState::Finished;
                job.finished_unix_ms = Some(now_ms());
                tracing::info!(
                    mirror = m.name(),
                    checked = job.checked_bytes,
                    out_of_sync = job.out_of_sync.len(),
                    "verify finished"
                );
            }
            Err(Stop::Cancelled) => {
                job.state = JobState::Cancelled;
                job.finished_unix_ms = Some(now_ms());
                tracing::info!(mirror = m.name(), "verify cancelled");
            }
            // Left Running in the file: resumed when the mirror starts again.
            Err(Stop::Stopping) => {}
            Err(Stop::Failed(e)) => {
                job.state = JobState::Failed;
                job.finished_unix_ms = Some(now_ms());
                job.last_error = Some(e.clone());
                tracing::error!(mirror = m.name(), "verify failed: {e}");
            }
        }
    }
    if !matches!(res, Err(Stop::Stopping)) {
        persist(&m).await;
    }
    vs.cancel.store(false, Ordering::SeqCst);
    vs.running.store(false, Ordering::SeqCst);
}

fn check_stop(m: &Mirror) -> Result<(), Stop> {
    if m.is_stopping() {
        return Err(Stop::Stopping);
    }
    if m.verify_state().cancel.load(Ordering::SeqCst) {
        return Err(Stop::Cancelled);
    }
    Ok(())
}

/// Waits (bounded) until no leg is degraded or syncing, so a job started
/// right after a (re)start compares every leg rather than skipping it.
async fn wait_legs(m: &Mirror) -> Result<(), Stop> {
    let t0 = Instant::now();
    while t0.elapsed() < WAIT_LEGS {
        check_stop(m)?;
        let settled = (0..m.leg_count()).all(|i| {
            matches!(
                m.leg_state(i),
                LegState::Synced | LegState::Failed | LegState::Split
            )
        });
        if settled {
            break;
        }
        sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}

async fn run_job(m: &Arc<Mirror>) -> Result<(), Stop> {
    wait_legs(m).await?;
    if m.verify_state().job().repair.is_some() {
        run_repair(m).await?;
    }
    run_check(m).await
}

/// Rate limiting: a window that restarts when the cap changes.
struct Pacer {
    started: Instant,
    done: u64,
    rate: u64,
}

impl Pacer {
    fn new(m: &Mirror) -> Pacer {
        Pacer {
            started: Instant::now(),
            done: 0,
            rate: m.verify_state().rate.load(Ordering::Relaxed),
        }
    }

    /// Counts `bytes` and sleeps until they are due at the current cap (in
    /// slices, so a changed cap or a cancel takes effect at once).
    async fn pace(&mut self, m: &Mirror, bytes: u64) -> Result<(), Stop> {
        self.done += bytes;
        loop {
            check_stop(m)?;
            let rate = m.verify_state().rate.load(Ordering::Relaxed);
            if rate != self.rate {
                self.rate = rate;
                self.started = Instant::now();
                self.done = 0;
                return Ok(());
            }
            if rate == 0 {
                return Ok(());
            }
            let due = Duration::from_secs_f64(self.done as f64 / rate as f64);
            match due.checked_sub(self.started.elapsed()) {
                Some(wait) if !wait.is_zero() => sleep(wait.min(Duration::from_millis(100))).await,
                _ => return Ok(()),
            }
        }
    }
}

fn step_len(m: &Mirror) -> u64 {
    m.meta().region_size().max(STEP)
}

async fn run_check(m: &Arc<Mirror>) -> Result<(), Stop> {
    let vs = m.verify_state();
    let (scope, mut cursor) = {
        let mut job = vs.job();
        job.skipped_bytes.resize(m.leg_count(), 0);
        (job.scope.clone(), job.cursor)
    };
    let rs = m.meta().region_size();
    let step = step_len(m);
    let started = Instant::now();
    let mut done = 0u64;
    let mut pacer = Pacer::new(m);
    let mut last_persist = Instant::now();
    for span in scope {
        let end = span.offset.saturating_add(span.length);
        let mut at = span.offset.max(cursor);
        // A sliding window of up to `depth` steps (each under its own lock):
        // a step starts as soon as the oldest one is done, so one step's
        // digesting on either side overlaps the next ones' reads and the
        // legs' answers, with no barrier between batches. Results are taken
        // in order (the cursor only moves over checked steps). Steps are
        // aligned to `step`, so they coincide with overlap stripes.
        let mut window: VecDeque<Step<'_>> = VecDeque::new();
        let mut next_at = at;
        while at < end {
            if let Err(e) = check_stop(m) {
                drain(&mut window).await;
                return Err(e);
            }
            while next_at < end && window.len() < depth(m) {
                let next = ((next_at / step) + 1).saturating_mul(step).min(end);
                window.push_back(Step {
                    a: next_at,
                    b: next,
                    slot: Slot::Running(Box::pin(check_range(m, next_at, next, rs))),
                });
                next_at = next;
            }
            let Some((a, b, found)) = first_done(&mut window).await else {
                break;
            };
            let found = match found {
                Ok(f) => f,
                Err(e) => {
                    drain(&mut window).await;
                    return Err(e);
                }
            };
            {
                let mut job = vs.job();
                for (off, len, legs) in found.differ {
                    tracing::warn!(
                        mirror = m.name(),
                        offset = off,
                        length = len,
                        legs = ?legs,
                        "verify: range out of sync"
                    );
                    merge(&mut job.out_of_sync, off, len, legs);
                }
                for (leg, n) in found.skipped.iter().enumerate() {
                    if let Some(s) = job.skipped_bytes.get_mut(leg) {
                        *s += n;
                    }
                }
                job.checked_bytes += b - a;
                job.cursor = b;
                done += b - a;
                job.rate_bps = (done as f64 / started.elapsed().as_secs_f64().max(1e-6)) as u64;
            }
            cursor = b;
            at = b;
            if last_persist.elapsed() >= PERSIST_EVERY {
                while_polling(&mut window, persist(m)).await;
                last_persist = Instant::now();
            }
            // The steps in flight go on while the cap makes this one wait
            // (they hold overlap locks: host writes must not wait for it).
            if let Err(e) = while_polling(&mut window, pacer.pace(m, b - a)).await {
                drain(&mut window).await;
                return Err(e);
            }
        }
    }
    Ok(())
}

/// One step of a check in the window.
struct Step<'a> {
    a: u64,
    b: u64,
    slot: Slot<'a>,
}

enum Slot<'a> {
    Running(std::pin::Pin<Box<dyn std::future::Future<Output = Result<Found, Stop>> + 'a>>),
    Done(Result<Found, Stop>),
}

/// Polls every running step once (a finished one keeps its result).
fn poll_steps(window: &mut VecDeque<Step<'_>>, cx: &mut std::task::Context<'_>) {
    for s in window.iter_mut() {
        if let Slot::Running(f) = &mut s.slot {
            if let std::task::Poll::Ready(r) = f.as_mut().poll(cx) {
                s.slot = Slot::Done(r);
            }
        }
    }
}

/// Runs the window until its oldest step is done, and takes it out.
async fn first_done(window: &mut VecDeque<Step<'_>>) -> Option<(u64, u64, Result<Found, Stop>)> {
    std::future::poll_fn(|cx| {
        poll_steps(window, cx);
        match window.front() {
            Some(Step {
                slot: Slot::Running(_),
                ..
            }) => std::task::Poll::Pending,
            _ => std::task::Poll::Ready(()),
        }
    })
    .await;
    let s = window.pop_front()?;
    Some(match s.slot {
        Slot::Done(r) => (s.a, s.b, r),
        Slot::Running(f) => (s.a, s.b, f.await),
    })
}

/// Awaits `fut` while the window's steps go on.
async fn while_polling<T>(
    window: &mut VecDeque<Step<'_>>,
    fut: impl std::future::Future<Output = T>,
) -> T {
    let mut fut = std::pin::pin!(fut);
    std::future::poll_fn(|cx| {
        poll_steps(window, cx);
        fut.as_mut().poll(cx)
    })
    .await
}

/// Lets the steps still in flight finish (their reads own pool buffers and
/// hold overlap locks) before an early return.
async fn drain(window: &mut VecDeque<Step<'_>>) {
    std::future::poll_fn(|cx| {
        poll_steps(window, cx);
        if window.iter().all(|s| matches!(s.slot, Slot::Done(_))) {
            std::task::Poll::Ready(())
        } else {
            std::task::Poll::Pending
        }
    })
    .await;
    window.clear();
}

/// Steps checked at once: [`DEPTH`], fewer under a low rate cap (so the
/// cap is kept smoothly: at most one step per 1/16 s).
fn depth(m: &Mirror) -> usize {
    let rate = m.verify_state().rate.load(Ordering::Relaxed);
    if rate == 0 {
        return DEPTH;
    }
    ((rate / (16 * STEP)) as usize).clamp(1, DEPTH)
}

fn merge(list: &mut Vec<OutOfSync>, offset: u64, length: u64, legs: Vec<usize>) {
    if let Some(last) = list.last_mut() {
        if last.offset + last.length == offset && last.legs == legs {
            last.length += length;
            return;
        }
    }
    list.push(OutOfSync {
        offset,
        length,
        legs,
    });
}

struct Found {
    /// (offset, length, legs) runs of regions differing on the same legs.
    differ: Vec<(u64, u64, Vec<usize>)>,
    /// Per leg, bytes not compared.
    skipped: Vec<u64>,
}

async fn local_digests(m: &Mirror, start: u64, end: u64, rs: u64) -> Result<Vec<u8>, String> {
    let ch = m.local().channel();
    let chunk = mirrorpoint_poller::buffer_pool().chunk_size() as u64;
    let read = async |off: u64, n: usize| {
        let b = alloc_wait(n).await.map_err(|e| e.to_string())?;
        let (r, b) = ch.read(ByteOffset(off), b).await;
        r.map(|()| b)
            .map_err(|e| format!("local read at {off}: {e}"))
    };
    digest_regions(read, start, end - start, rs, chunk).await
}

async fn leg_digests(m: &Mirror, leg: usize, start: u64, end: u64, rs: u64) -> Option<Vec<u8>> {
    let msg = Message::RangeDigest(RangeDigest {
        mirror: m.id(),
        offset: ByteOffset(start),
        len: ByteLen(end - start),
        region_size: u32::try_from(rs).ok()?,
        algo: DigestAlgo::Sha256,
    });
    match m.leg_request(leg, &msg, &[]).await {
        Ok(Reply::Digest(Status::Ok, d)) => Some(d),
        Ok(Reply::Digest(s, _)) => {
            tracing::warn!(
                mirror = m.name(),
                leg,
                offset = start,
                "leg refused a digest request: {s:?}"
            );
            None
        }
        Ok(_) => {
            tracing::warn!(mirror = m.name(), leg, "unexpected answer to RangeDigest");
            None
        }
        Err(e) => {
            tracing::info!(mirror = m.name(), leg, "digest request failed: {e}");
            None
        }
    }
}

/// Compares one step's regions on every live leg, under the step's overlap lock.
async fn check_range(m: &Arc<Mirror>, start: u64, end: u64, rs: u64) -> Result<Found, Stop> {
    let n = m.leg_count();
    let guard = m.overlap().lock(start, end);
    guard.ready().await;
    let live: Vec<(usize, u64)> = (0..n)
        .filter(|&i| matches!(m.leg_state(i), LegState::Synced | LegState::Syncing))
        .map(|i| (i, m.leg_link_gen(i)))
        .collect();
    type Fut<'a> =
        std::pin::Pin<Box<dyn std::future::Future<Output = Result<Vec<u8>, String>> + 'a>>;
    let mut futs: Vec<Fut<'_>> = vec![Box::pin(local_digests(m, start, end, rs))];
    for &(leg, _) in &live {
        futs.push(Box::pin(async move {
            leg_digests(m, leg, start, end, rs)
                .await
                .ok_or_else(String::new)
        }));
    }
    let mut res = join_all(futs).await.into_iter();
    let local = res
        .next()
        .unwrap_or_else(|| Err("no local result".into()))
        .map_err(Stop::Failed)?;
    let remote: Vec<Option<Vec<u8>>> = res.map(Result::ok).collect();
    // Whether each leg stayed live on the same link the whole time.
    let stayed: Vec<bool> = live
        .iter()
        .map(|&(i, g)| {
            matches!(m.leg_state(i), LegState::Synced | LegState::Syncing) && m.leg_link_gen(i) == g
        })
        .collect();
    drop(guard);
    let mut found = Found {
        differ: Vec::new(),
        skipped: vec![0; n],
    };
    let regions = (end - start).div_ceil(rs);
    let mut compared = vec![false; n];
    for (k, ((leg, _), d)) in live.iter().zip(&remote).enumerate() {
        if stayed[k] && d.as_ref().is_some_and(|d| d.len() == local.len()) {
            compared[*leg] = true;
        }
    }
    for r in 0..regions {
        let off = start + r * rs;
        let len = rs.min(end - off);
        let region = off / rs;
        let ours = local.get(r as usize * 32..r as usize * 32 + 32);
        let mut legs = Vec::new();
        for (k, (leg, _)) in live.iter().enumerate() {
            let theirs = remote[k]
                .as_ref()
                .and_then(|d| d.get(r as usize * 32..r as usize * 32 + 32));
            if !compared[*leg] || m.meta().is_dirty(*leg, region) {
                found.skipped[*leg] += len;
                continue;
            }
            if theirs != ours {
                legs.push(*leg);
            }
        }
        for (leg, skipped) in found.skipped.iter_mut().enumerate() {
            // A leg not compared at all (down, failed); an empty slot (a
            // removed leg) is not a leg.
            if m.leg_exists(leg) && !live.iter().any(|(l, _)| *l == leg) {
                *skipped += len;
            }
        }
        if !legs.is_empty() {
            match found.differ.last_mut() {
                Some((o, l, g)) if *o + *l == off && *g == legs => *l += len,
                _ => found.differ.push((off, len, legs)),
            }
        }
    }
    Ok(found)
}

// ---------------------------------------------------------------------------
// Repair.

async fn run_repair(m: &Arc<Mirror>) -> Result<(), Stop> {
    let vs = m.verify_state();
    let rs = m.meta().region_size();
    let size = m.local().size().0;
    let mut pacer = Pacer::new(m);
    let mut last_persist = Instant::now();
    loop {
        check_stop(m)?;
        let (direction, src, front) = {
            let job = vs.job();
            let Some(rj) = job.repair.as_ref() else {
                return Ok(());
            };
            (rj.direction, rj.leg, rj.remaining.first().cloned())
        };
        let Some(front) = front else { break };
        // One region of the front entry.
        let off = front.offset;
        let end = (off - off % rs + rs)
            .min(front.offset + front.length)
            .min(size);
        if end <= off {
            let mut job = vs.job();
            if let Some(rj) = job.repair.as_mut() {
                rj.remaining.remove(0);
            }
            continue;
        }
        let deferred = repair_region(m, direction, src, &front.legs, off, end).await?;
        {
            let mut job = vs.job();
            if let Some(rj) = job.repair.as_mut() {
                rj.repaired_bytes += end - off;
                rj.deferred_regions += deferred;
                if let Some(f) = rj.remaining.first_mut() {
                    f.length -= end - f.offset;
                    f.offset = end;
                    if f.length == 0 {
                        rj.remaining.remove(0);
                    }
                }
            }
        }
        if last_persist.elapsed() >= PERSIST_EVERY {
            persist(m).await;
            last_persist = Instant::now();
        }
        pacer.pace(m, end - off).await?;
    }
    // Repaired: verify exactly those ranges again.
    {
        let mut job = vs.job();
        let spans = job
            .repair
            .as_ref()
            .map(|r| r.spans.clone())
            .unwrap_or_default();
        if let Some(rj) = job.repair.as_ref() {
            tracing::info!(
                mirror = m.name(),
                bytes = rj.repaired_bytes,
                deferred_regions = rj.deferred_regions,
                direction = ?rj.direction,
                "repair done, verifying the repaired ranges"
            );
        }
        job.repair = None;
        job.total_bytes = spans.iter().map(|s| s.length).sum();
        job.scope = spans;
        job.cursor = 0;
        job.checked_bytes = 0;
        job.out_of_sync.clear();
        job.skipped_bytes = vec![0; m.leg_count()];
    }
    persist(m).await;
    Ok(())
}

/// Reads `start..end` from remote leg `leg`, chunk by chunk.
async fn read_leg(m: &Mirror, leg: usize, start: u64, end: u64) -> Result<Vec<IoBuf>, String> {
    let chunk = mirrorpoint_poller::buffer_pool().chunk_size() as u64;
    let mut out = Vec::new();
    let mut off = start;
    while off < end {
        let n = chunk.min(end - off);
        let msg = Message::Read(Read {
            mirror: m.id(),
            offset: ByteOffset(off),
            len: ByteLen(n),
        });
        match m.leg_request(leg, &msg, &[]).await? {
            Reply::Read(Status::Ok, data) if data.len() as u64 == n => {
                out.push(data.into_iobuf().await?);
            }
            Reply::Read(s, _) => return Err(format!("leg {leg} refused a read at {off}: {s:?}")),
            _ => return Err(format!("unexpected answer to a read from leg {leg}")),
        }
        off += n;
    }
    Ok(out)
}

async fn read_local(m: &Mirror, start: u64, end: u64) -> Result<Vec<IoBuf>, String> {
    let ch = m.local().channel();
    let chunk = mirrorpoint_poller::buffer_pool().chunk_size() as u64;
    let mut out = Vec::new();
    let mut off = start;
    while off < end {
        let n = chunk.min(end - off);
        let b = alloc_wait(n as usize).await.map_err(|e| e.to_string())?;
        let (r, b) = ch.read(ByteOffset(off), b).await;
        r.map_err(|e| format!("local read at {off}: {e}"))?;
        out.push(b.freeze());
        off += n;
    }
    Ok(out)
}

/// Writes `data` (chunks from `start` on) to remote leg `leg` as resync
/// writes; false (and the region dirty for the leg) if it could not.
async fn write_leg(m: &Mirror, leg: usize, start: u64, data: &[IoBuf]) -> bool {
    let total: u64 = data.iter().map(|b| b.len() as u64).sum();
    if !matches!(m.leg_state(leg), LegState::Synced | LegState::Syncing) {
        m.mark_leg_dirty(leg, start, total);
        return false;
    }
    let mut off = start;
    for b in data {
        let stamp = m.peek_stamp();
        let msg = Message::Write(Write {
            mirror: m.id(),
            seq: SeqNo(stamp.seq),
            epoch: Epoch(stamp.epoch),
            flags: WriteFlags::RESYNC,
            offset: ByteOffset(off),
            data: b,
        });
        match m.leg_request(leg, &msg, std::slice::from_ref(b)).await {
            Ok(Reply::Write(Status::Ok)) => {}
            _ => {
                // The leg is degraded now (or about to be): its resync copies it.
                m.mark_leg_dirty(leg, start, total);
                return false;
            }
        }
        off += b.len() as u64;
    }
    true
}

/// Repairs one region (under its overlap lock). Returns how many leg
/// copies were handed to resync instead.
async fn repair_region(
    m: &Arc<Mirror>,
    direction: Direction,
    src: Option<usize>,
    differ: &[usize],
    start: u64,
    end: u64,
) -> Result<u64, Stop> {
    let guard = m.overlap().lock(start, end);
    guard.ready().await;
    let mut deferred = 0u64;
    let from_leg = match (direction, src) {
        (Direction::FromLeg, Some(l)) if differ.contains(&l) => Some(l),
        _ => None,
    };
    match from_leg {
        None => {
            // The local data is the good copy (or the source leg agrees
            // with it): copy it to the legs that differ.
            let data = read_local(m, start, end).await.map_err(Stop::Failed)?;
            for &leg in differ {
                if Some(leg) == src {
                    continue;
                }
                if !write_leg(m, leg, start, &data).await {
                    deferred += 1;
                }
            }
        }
        Some(l) => {
            if !matches!(m.leg_state(l), LegState::Synced | LegState::Syncing)
                || m.meta().is_dirty(l, start / m.meta().region_size())
            {
                return Err(Stop::Failed(format!(
                    "source leg {l} is not in sync for the range at {start} (state {:?})",
                    m.leg_state(l)
                )));
            }
            let data = read_leg(m, l, start, end).await.map_err(Stop::Failed)?;
            let ch = m.local().channel();
            let mut off = start;
            for b in &data {
                let (r, _) = ch.write(ByteOffset(off), b.clone()).await;
                r.map_err(|e| Stop::Failed(format!("local write at {off}: {e}")))?;
                off += b.len() as u64;
            }
            for leg in 0..m.leg_count() {
                if leg != l && !write_leg(m, leg, start, &data).await {
                    deferred += 1;
                }
            }
        }
    }
    drop(guard);
    Ok(deferred)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merge_joins_adjacent_runs_on_the_same_legs() {
        let mut v = Vec::new();
        merge(&mut v, 0, 10, vec![0]);
        merge(&mut v, 10, 10, vec![0]);
        merge(&mut v, 20, 10, vec![0, 1]);
        merge(&mut v, 40, 10, vec![0, 1]);
        assert_eq!(
            v,
            vec![
                OutOfSync {
                    offset: 0,
                    length: 20,
                    legs: vec![0]
                },
                OutOfSync {
                    offset: 20,
                    length: 10,
                    legs: vec![0, 1]
                },
                OutOfSync {
                    offset: 40,
                    length: 10,
                    legs: vec![0, 1]
                },
            ]
        );
    }

    #[test]
    fn job_round_trips_through_json() {
        let job = Job {
            state: JobState::Running,
            scope: vec![Span {
                offset: 0,
                length: 1 << 20,
            }],
            cursor: 65536,
            out_of_sync: vec![OutOfSync {
                offset: 0,
                length: 65536,
                legs: vec![0],
            }],
            repair: Some(RepairJob {
                direction: Direction::FromLeg,
                leg: Some(0),
                remaining: vec![],
                spans: vec![],
                repaired_bytes: 0,
                total_bytes: 0,
                deferred_regions: 0,
            }),
            ..Job::default()
        };
        let text = serde_json::to_string(&job).expect("json");
        let back: Job = serde_json::from_str(&text).expect("parse");
        assert_eq!(back.cursor, 65536);
        assert_eq!(back.out_of_sync, job.out_of_sync);
        assert_eq!(back.repair.map(|r| r.direction), Some(Direction::FromLeg));
    }

    #[test]
    fn request_checks() {
        let r = RangeDigest {
            mirror: super::super::wire::MirrorId(1),
            offset: ByteOffset(0),
            len: ByteLen(1 << 20),
            region_size: 65536,
            algo: DigestAlgo::Sha256,
        };
        assert_eq!(check_request(&r, 1 << 20), Status::Ok);
        assert_eq!(check_request(&r, (1 << 20) - 1), Status::OutOfRange);
        let r = RangeDigest {
            offset: ByteOffset(u64::MAX),
            ..r
        };
        assert_eq!(check_request(&r, 1 << 20), Status::OutOfRange);
    }

    /// Digesting a step hands the reactor back after every chunk it hashes,
    /// so host I/O on the same reactor is not held up for a whole step; and
    /// the digests are each region's SHA-256.
    #[test]
    fn digesting_a_step_lets_other_tasks_run_between_chunks() {
        use mirrorpoint_poller::{PoolConfig, ReactorConfig, Runtime, RuntimeConfig};
        use std::cell::Cell;
        use std::rc::Rc;
        const CHUNK: u64 = 64 << 10;
        const REGION: u64 = 512 << 10;
        let rt = Runtime::start(RuntimeConfig {
            cores: vec![0],
            reactor: ReactorConfig {
                pool: PoolConfig {
                    chunk_size: CHUNK as usize,
                    chunk_count: 32,
                    huge_pages: false,
                },
                ..ReactorConfig::default()
            },
            pin: false,
        })
        .expect("runtime");
        let byte_at = |off: u64| (off / 4096 % 251) as u8;
        let (digests, ticks_while_hashing) = rt.handles()[0]
            .block_on(move || async move {
                let pieces = (STEP / CHUNK) as usize;
                let reads_done = Rc::new(Cell::new(0usize));
                let finished = Rc::new(Cell::new(false));
                let ticks = Rc::new(Cell::new(0usize));
                let (r, f, t) = (reads_done.clone(), finished.clone(), ticks.clone());
                let ticker = spawn(async move {
                    while !f.get() {
                        if r.get() == pieces {
                            t.set(t.get() + 1);
                        }
                        yield_now().await;
                    }
                });
                let read = async |off: u64, n: usize| {
                    let mut b = alloc_wait(n).await.map_err(|e| e.to_string())?;
                    for (i, x) in b.iter_mut().enumerate() {
                        *x = byte_at(off + i as u64);
                    }
                    reads_done.set(reads_done.get() + 1);
                    Ok(b)
                };
                let d = digest_regions(read, 0, STEP, REGION, CHUNK).await;
                finished.set(true);
                ticker.await;
                (d, ticks.get())
            })
            .expect("reactor");
        let digests = digests.expect("digests");
        let want: Vec<u8> = (0..STEP / REGION)
            .flat_map(|k| {
                let data: Vec<u8> = (k * REGION..(k + 1) * REGION).map(byte_at).collect();
                Sha256::digest(&data).to_vec()
            })
            .collect();
        assert_eq!(digests, want);
        let pieces = (STEP / CHUNK) as usize;
        assert!(
            ticks_while_hashing >= pieces - 1,
            "the other task ran {ticks_while_hashing} times while {pieces} chunks were hashed"
        );
    }
}
