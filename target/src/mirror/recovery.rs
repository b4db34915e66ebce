//! Recovery of the local storage device: what a mirror does when its local
//! volume fails, and the rebuild that brings it (or a replacement) back from
//! a remote leg while hosts keep doing I/O.
//!
//! # States of the local leg
//! - `healthy`: reads from the local volume, writes to it and every leg;
//! - `failed`: the local volume returned an I/O error. Reads are served by a
//!   remote leg over the link; writes go to the remote legs only and succeed
//!   when at least one leg took them; every region written is recorded in
//!   the *local rebuild bitmap* (durably, before the write is sent, so a
//!   crash can never leave a remote leg ahead of the bitmap);
//! - `rebuilding`: `mirror_recover_local` (or a resumed rebuild after a
//!   restart) copies every region of the bitmap from a remote leg to the
//!   local volume, region by region under the overlap lock (a host write to
//!   the region and the copy never interleave), rate-limited like resync.
//!   Writes reach the local volume again; reads of regions not yet rebuilt
//!   go to the remote leg, the others to the local volume. When the bitmap
//!   is empty the local volume is flushed and the leg is `healthy`.
//!
//! A read or write that fails on the local volume is retried on a remote
//! leg, so the host sees no error as long as one remote leg is live.
//!
//! # Persistence
//! `mirror-<name>.local` next to the mirror's metadata holds the state, the
//! source leg, the rebuild cursor, the local device's name (a replacement
//! volume) and the bitmap, written whole to a temporary file, `fdatasync`ed
//! and renamed into place (so a torn write leaves the previous version). One
//! thread per mirror does the writing (no blocking syscall on a reactor) and
//! groups whatever is queued into one commit. During a rebuild the bitmap is
//! committed only after the local volume was flushed, so a cleared bit always
//! means the data is durable locally; a `kill -9` re-copies at most what was
//! copied since the last commit.
//!
//! The module is a child of `engine` (it needs the legs' links and the
//! overlap detector) but keeps its logic here, so the engine only has small
//! hooks.

use std::cell::{Cell, RefCell};
use std::fmt;
use std::fs::OpenOptions;
use std::io::{self, Write as _};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use mirrorpoint_poller::{oneshot, sleep, IoBufMut, OneshotSender};
use serde::Serialize;

use super::{join_all, Leg, LegState, Mirror, Reply};
use crate::mirror::legset::Snapshot;
use crate::mirror::wire::{Message, Read, Status};
use crate::units::{ByteLen, ByteOffset};
use crate::volume::{Volume, VolumeChannel, VolumeError};

const MAGIC: &[u8; 8] = b"MPLOCAL1";
/// Commit the rebuild's progress at least this often.
const COMMIT_EVERY: Duration = Duration::from_millis(500);

/// State of the local leg.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
#[repr(u8)]
pub enum LocalState {
    /// Serving reads and taking writes.
    Healthy = 0,
    /// Failed: reads and writes go to the remote legs.
    Failed = 1,
    /// Being rebuilt from a remote leg.
    Rebuilding = 2,
}

impl LocalState {
    fn from_u8(v: u8) -> LocalState {
        match v {
            0 => LocalState::Healthy,
            2 => LocalState::Rebuilding,
            _ => LocalState::Failed,
        }
    }
}

/// Errors of the recovery operations (RPC answers).
#[derive(Debug, thiserror::Error)]
pub enum RecoverError {
    /// A parameter is wrong.
    #[error("{0}")]
    Invalid(String),
    /// The operation does not fit the current state.
    #[error("{0}")]
    Busy(String),
    /// Writing the recovery state failed.
    #[error("local recovery state {path}: {source}")]
    Io {
        /// File.
        path: String,
        /// Error.
        source: io::Error,
    },
}

/// What `mirror_get_status` shows about the local leg.
#[derive(Debug, Clone, Serialize)]
pub struct LocalStatus {
    /// State.
    pub state: LocalState,
    /// The local volume in use.
    pub volume: String,
    /// Regions the local volume misses (to rebuild).
    pub rebuild_regions: u64,
    /// Their bytes.
    pub rebuild_bytes: u64,
    /// Leg the rebuild copies from.
    pub source_leg: usize,
    /// Region the rebuild has reached (persisted).
    pub rebuild_cursor: u64,
    /// Progress of the current/last rebuild, 0..100.
    pub rebuild_percent: f64,
    /// Bytes copied by rebuilds since the mirror started.
    pub rebuild_copied_bytes: u64,
    /// Measured rebuild rate, bytes per second.
    pub rebuild_rate_bps: u64,
    /// Host reads served by a remote leg.
    pub remote_reads: u64,
    /// Local I/O errors seen.
    pub local_errors: u64,
    /// Last local failure or rebuild problem.
    pub last_error: String,
}

enum Req {
    Commit(OneshotSender<io::Result<()>>),
    Stop,
}

/// The local leg's recovery state, shared by every core.
pub struct LocalRecovery {
    path: PathBuf,
    region_shift: u32,
    regions: u64,
    size: u64,
    state: AtomicU8,
    bits: Box<[AtomicU64]>,
    /// Regions a rebuild copied (their bit in `bits` is clear) whose data
    /// the local device may not have made durable yet: the file keeps them
    /// dirty until a flush that began after they were copied has completed
    /// (see [`persist_progress`]), so the rebuild never pauses for it.
    unflushed: Box<[AtomicU64]>,
    dirty: AtomicU64,
    /// Writes between reading the state and setting their bits (Dekker
    /// with the rebuild's switch to `Rebuilding`).
    failed_inflight: AtomicU64,
    source_leg: AtomicUsize,
    cursor: AtomicU64,
    device: Mutex<Arc<Volume>>,
    device_version: AtomicU64,
    total: AtomicU64,
    done: AtomicU64,
    copied: AtomicU64,
    rate_seen: AtomicU64,
    remote_reads: AtomicU64,
    local_errors: AtomicU64,
    last_error: Mutex<String>,
    running: AtomicBool,
    spare: Mutex<Option<Arc<Volume>>>,
    spare_used: AtomicBool,
    /// Serialises writers of the file (the writer thread, RPC threads).
    file_lock: Mutex<()>,
    tx: Mutex<mpsc::Sender<Req>>,
}

impl fmt::Debug for LocalRecovery {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LocalRecovery")
            .field("path", &self.path)
            .field("state", &self.state())
            .field("dirty", &self.dirty.load(Ordering::Relaxed))
            .finish()
    }
}

/// What the file holds.
struct Saved {
    state: LocalState,
    source_leg: usize,
    cursor: u64,
    device: String,
    bits: Vec<u64>,
}

fn encode(s: &Saved, region_shift: u32, regions: u64) -> Vec<u8> {
    let mut b = Vec::with_capacity(64 + s.device.len() + s.bits.len() * 8);
    b.extend_from_slice(MAGIC);
    b.push(s.state as u8);
    b.extend_from_slice(&(s.source_leg as u32).to_le_bytes());
    b.extend_from_slice(&s.cursor.to_le_bytes());
    b.extend_from_slice(&region_shift.to_le_bytes());
    b.extend_from_slice(&regions.to_le_bytes());
    b.extend_from_slice(&(s.device.len() as u32).to_le_bytes());
    b.extend_from_slice(s.device.as_bytes());
    for w in &s.bits {
        b.extend_from_slice(&w.to_le_bytes());
    }
    let crc = crc32c::crc32c(&b);
    b.extend_from_slice(&crc.to_le_bytes());
    b
}

fn decode(b: &[u8], region_shift: u32, regions: u64) -> Result<Saved, String> {
    let bad = |why: &str| Err(format!("corrupt or foreign file: {why}"));
    if b.len() < 8 + 1 + 4 + 8 + 4 + 8 + 4 + 4 || &b[..8] != MAGIC {
        return bad("no magic");
    }
    let (body, crc) = b.split_at(b.len() - 4);
    if crc32c::crc32c(body) != u32::from_le_bytes([crc[0], crc[1], crc[2], crc[3]]) {
        return bad("checksum");
    }
    let mut at = 8;
    let mut take = |n: usize| -> Option<&[u8]> {
        let s = body.get(at..at + n)?;
        at += n;
        Some(s)
    };
    let state = *take(1).and_then(|s| s.first()).ok_or("short")?;
    let u32le = |s: &[u8]| u32::from_le_bytes([s[0], s[1], s[2], s[3]]);
    let u64le = |s: &[u8]| {
        let mut x = [0u8; 8];
        x.copy_from_slice(s);
        u64::from_le_bytes(x)
    };
    let source_leg = u32le(take(4).ok_or("short")?) as usize;
    let cursor = u64le(take(8).ok_or("short")?);
    let shift = u32le(take(4).ok_or("short")?);
    let n = u64le(take(8).ok_or("short")?);
    if shift != region_shift || n != regions {
        return Err(format!(
            "file describes {n} regions of 2^{shift} bytes, the mirror has {regions} of 2^{region_shift}"
        ));
    }
    let dl = u32le(take(4).ok_or("short")?) as usize;
    let device = String::from_utf8(take(dl).ok_or("short")?.to_vec())
        .map_err(|_| "device name is not UTF-8".to_string())?;
    let words = regions.div_ceil(64) as usize;
    let raw = take(words * 8).ok_or("short bitmap")?;
    let bits = raw.chunks_exact(8).map(u64le).collect();
    Ok(Saved {
        state: LocalState::from_u8(state),
        source_leg,
        cursor,
        device,
        bits,
    })
}

fn write_file(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let tmp = path.with_extension("local-tmp");
    let mut f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(&tmp)?;
    f.write_all(bytes)?;
    f.sync_data()?;
    drop(f);
    std::fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent() {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

impl LocalRecovery {
    /// Opens (or creates, healthy) the recovery state of a mirror whose
    /// configured local volume is `local`. Returns the state and the name of
    /// the local device it records (a replacement, when one was installed):
    /// the caller resolves that name to a volume with [`Self::set_device`].
    pub fn open(
        path: &Path,
        local: Arc<Volume>,
        region_size: u64,
    ) -> Result<(Arc<LocalRecovery>, Option<String>), RecoverError> {
        let io_err = |source| RecoverError::Io {
            path: path.display().to_string(),
            source,
        };
        if !region_size.is_power_of_two() || region_size < 4096 {
            return Err(RecoverError::Invalid(format!(
                "region size {region_size} is not a power of two of at least 4 KiB"
            )));
        }
        let size = local.size().0;
        let region_shift = region_size.trailing_zeros();
        let regions = size.div_ceil(region_size);
        let saved = match std::fs::read(path) {
            Ok(b) => Some(
                decode(&b, region_shift, regions)
                    .map_err(|e| RecoverError::Invalid(format!("{}: {e}", path.display())))?,
            ),
            Err(e) if e.kind() == io::ErrorKind::NotFound => None,
            Err(e) => return Err(io_err(e)),
        };
        let words = regions.div_ceil(64) as usize;
        let mut bits: Vec<u64> = vec![0; words];
        let (state, source_leg, cursor, device) = match saved {
            Some(s) => {
                bits.copy_from_slice(&s.bits);
                (s.state, s.source_leg, s.cursor, Some(s.device))
            }
            None => (LocalState::Healthy, 0, 0, None),
        };
        let dirty = bits.iter().map(|w| u64::from(w.count_ones())).sum();
        let rec = Arc::new(LocalRecovery {
            path: path.to_path_buf(),
            region_shift,
            regions,
            size,
            state: AtomicU8::new(state as u8),
            bits: bits.into_iter().map(AtomicU64::new).collect(),
            unflushed: (0..words).map(|_| AtomicU64::new(0)).collect(),
            dirty: AtomicU64::new(dirty),
            failed_inflight: AtomicU64::new(0),
            source_leg: AtomicUsize::new(source_leg),
            cursor: AtomicU64::new(cursor),
            device: Mutex::new(local),
            device_version: AtomicU64::new(0),
            total: AtomicU64::new(dirty),
            done: AtomicU64::new(0),
            copied: AtomicU64::new(0),
            rate_seen: AtomicU64::new(0),
            remote_reads: AtomicU64::new(0),
            local_errors: AtomicU64::new(0),
            last_error: Mutex::new(String::new()),
            running: AtomicBool::new(false),
            spare: Mutex::new(None),
            spare_used: AtomicBool::new(false),
            file_lock: Mutex::new(()),
            tx: Mutex::new(mpsc::channel().0),
        });
        let (tx, rx) = mpsc::channel();
        *rec.tx.lock().unwrap_or_else(|p| p.into_inner()) = tx;
        let r2 = rec.clone();
        std::thread::Builder::new()
            .name("mirror-local".into())
            .spawn(move || r2.writer(rx))
            .map_err(io_err)?;
        if state != LocalState::Healthy {
            tracing::warn!(
                path = %path.display(),
                ?state,
                regions = dirty,
                "mirror: the local device was not healthy at the last stop"
            );
        }
        Ok((rec, device.filter(|d| !d.is_empty())))
    }

    fn writer(&self, rx: mpsc::Receiver<Req>) {
        while let Ok(first) = rx.recv() {
            let mut waiters = Vec::new();
            let mut stop = false;
            for r in std::iter::once(first).chain(rx.try_iter()) {
                match r {
                    Req::Commit(tx) => waiters.push(tx),
                    Req::Stop => stop = true,
                }
            }
            if !waiters.is_empty() {
                let res = self.commit_blocking();
                for w in waiters {
                    w.send(
                        res.as_ref()
                            .map(|_| ())
                            .map_err(|e| io::Error::new(e.kind(), e.to_string())),
                    );
                }
            }
            if stop {
                return;
            }
        }
    }

    /// Writes the current state to the file (blocking; off the reactors).
    pub fn commit_blocking(&self) -> io::Result<()> {
        let _one_writer = self.file_lock.lock().unwrap_or_else(|p| p.into_inner());
        let saved = Saved {
            state: self.state(),
            source_leg: self.source_leg.load(Ordering::SeqCst),
            cursor: self.cursor.load(Ordering::SeqCst),
            device: self.device().name().to_string(),
            // A region is clear in the file only once rebuilt *and* flushed.
            bits: self
                .bits
                .iter()
                .zip(self.unflushed.iter())
                .map(|(w, u)| w.load(Ordering::SeqCst) | u.load(Ordering::SeqCst))
                .collect(),
        };
        write_file(&self.path, &encode(&saved, self.region_shift, self.regions))
    }

    /// Makes the current state durable (on the writer thread).
    pub async fn commit(&self) -> io::Result<()> {
        let (tx, rx) = oneshot();
        let sent = self
            .tx
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .send(Req::Commit(tx));
        if sent.is_err() {
            return Err(io::Error::other("local recovery writer stopped"));
        }
        rx.await
            .unwrap_or_else(|_| Err(io::Error::other("local recovery writer stopped")))
    }

    /// Stops the writer thread.
    pub fn close(&self) {
        let _ = self
            .tx
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .send(Req::Stop);
    }

    /// Current state.
    pub fn state(&self) -> LocalState {
        LocalState::from_u8(self.state.load(Ordering::SeqCst))
    }

    /// The local volume in use (the configured one or its replacement).
    pub fn device(&self) -> Arc<Volume> {
        self.device
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Bumped whenever the device changes: channels reopen.
    pub fn device_version(&self) -> u64 {
        self.device_version.load(Ordering::SeqCst)
    }

    /// Installs a volume as the local device (a replacement, or the one the
    /// file names at startup). It must be at least the mirror's size.
    pub fn set_device(&self, v: Arc<Volume>) -> Result<(), RecoverError> {
        self.check_device(&v)?;
        *self.device.lock().unwrap_or_else(|p| p.into_inner()) = v;
        self.device_version.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }

    fn check_device(&self, v: &Volume) -> Result<(), RecoverError> {
        if v.size().0 < self.size {
            return Err(RecoverError::Invalid(format!(
                "replacement_bdev: volume '{}' holds {} bytes, the mirror needs {}",
                v.name(),
                v.size().0,
                self.size
            )));
        }
        if v.mirror().is_some() {
            return Err(RecoverError::Invalid(format!(
                "replacement_bdev: volume '{}' is itself a mirror",
                v.name()
            )));
        }
        Ok(())
    }

    /// Configures a spare: when the local device fails, the mirror rebuilds
    /// onto it without waiting for the operator.
    pub fn set_spare(&self, v: Arc<Volume>) -> Result<(), RecoverError> {
        if v.size().0 < self.size || v.mirror().is_some() {
            return Err(RecoverError::Invalid(format!(
                "spare_bdev: volume '{}' ({} bytes) cannot hold this mirror ({} bytes)",
                v.name(),
                v.size().0,
                self.size
            )));
        }
        *self.spare.lock().unwrap_or_else(|p| p.into_inner()) = Some(v);
        Ok(())
    }

    /// Whether the spare was taken into use.
    pub fn spare_used(&self) -> bool {
        self.spare_used.load(Ordering::SeqCst)
    }

    fn region_range(&self, offset: u64, len: u64) -> (u64, u64) {
        (
            offset >> self.region_shift,
            ((offset + len.max(1) - 1) >> self.region_shift).min(self.regions - 1),
        )
    }

    fn set_bit(&self, r: u64) {
        let (w, b) = ((r / 64) as usize, r % 64);
        if self.bits[w].fetch_or(1 << b, Ordering::SeqCst) & (1 << b) == 0 {
            self.dirty.fetch_add(1, Ordering::SeqCst);
        }
    }

    /// Marks region `r` rebuilt: readable locally from now on, clean in the
    /// file after the next flush (`unflushed` first, so that a concurrent
    /// commit always sees one of the two bits).
    fn clear_rebuilt(&self, r: u64) {
        let (w, b) = ((r / 64) as usize, r % 64);
        if let Some(u) = self.unflushed.get(w) {
            u.fetch_or(1 << b, Ordering::SeqCst);
        }
        self.clear_bit(r);
    }

    /// The `unflushed` words now (rebuilt regions whose writes completed).
    fn unflushed_snapshot(&self) -> Vec<u64> {
        self.unflushed
            .iter()
            .map(|u| u.load(Ordering::SeqCst))
            .collect()
    }

    /// After a flush that began after `snap` was taken: those regions are
    /// durable; regions rebuilt since stay in `unflushed`.
    fn flushed(&self, snap: &[u64]) {
        for (u, s) in self.unflushed.iter().zip(snap) {
            if *s != 0 {
                u.fetch_and(!s, Ordering::SeqCst);
            }
        }
    }

    fn clear_bit(&self, r: u64) {
        let (w, b) = ((r / 64) as usize, r % 64);
        if self.bits[w].fetch_and(!(1 << b), Ordering::SeqCst) & (1 << b) != 0 {
            self.dirty.fetch_sub(1, Ordering::SeqCst);
        }
    }

    /// Whether the local volume misses region `r`.
    pub fn is_dirty(&self, r: u64) -> bool {
        let (w, b) = ((r / 64) as usize, r % 64);
        self.bits
            .get(w)
            .is_some_and(|x| x.load(Ordering::SeqCst) & (1 << b) != 0)
    }

    fn any_dirty(&self, offset: u64, len: u64) -> bool {
        let (a, b) = self.region_range(offset, len);
        (a..=b).any(|r| self.is_dirty(r))
    }

    /// Regions the local volume misses.
    pub fn dirty_regions(&self) -> u64 {
        self.dirty.load(Ordering::SeqCst)
    }

    fn next_dirty(&self, from: u64) -> Option<u64> {
        let n = self.bits.len();
        let mut wi = (from / 64) as usize;
        let mut mask = u64::MAX << (from % 64);
        while wi < n {
            let w = self.bits[wi].load(Ordering::SeqCst) & mask;
            if w != 0 {
                return Some(wi as u64 * 64 + u64::from(w.trailing_zeros()));
            }
            wi += 1;
            mask = u64::MAX;
        }
        None
    }

    /// Whether reads of this range may use the local volume.
    pub fn local_readable(&self, offset: u64, len: u64) -> bool {
        match self.state() {
            LocalState::Healthy => true,
            LocalState::Failed => false,
            LocalState::Rebuilding => !self.any_dirty(offset, len),
        }
    }

    /// Whether writes go to the local volume.
    pub fn local_writable(&self) -> bool {
        self.state() != LocalState::Failed
    }

    fn note_error(&self, what: &str) {
        self.local_errors.fetch_add(1, Ordering::Relaxed);
        *self.last_error.lock().unwrap_or_else(|p| p.into_inner()) = what.to_string();
    }

    /// The local volume failed a request on `[offset, offset+len)` (or, with
    /// `len` 0, a flush: anything written may be lost). Marks the leg failed
    /// and the range (or everything) to rebuild, durably.
    pub async fn local_failed(&self, mirror: &str, offset: u64, len: u64, why: &str) {
        self.note_error(why);
        let prev = self.state.swap(LocalState::Failed as u8, Ordering::SeqCst);
        if prev != LocalState::Failed as u8 {
            tracing::error!(
                mirror,
                "local device failed ({why}): reads and writes go to the remote legs"
            );
        }
        if len == 0 {
            for r in 0..self.regions {
                self.set_bit(r);
            }
        } else {
            let (a, b) = self.region_range(offset, len);
            for r in a..=b {
                self.set_bit(r);
            }
        }
        if let Err(e) = self.commit().await {
            tracing::error!(mirror, "cannot persist the local device's failure: {e}");
        }
    }

    /// A write is about to skip the local volume (failed): record its
    /// regions durably first. Returns false when the local volume is
    /// writable after all (the state changed): write it normally.
    pub async fn record_missed_write(&self, offset: u64, len: u64) -> bool {
        self.failed_inflight.fetch_add(1, Ordering::SeqCst);
        if self.local_writable() {
            self.failed_inflight.fetch_sub(1, Ordering::SeqCst);
            return false;
        }
        let (a, b) = self.region_range(offset, len);
        let mut new = false;
        for r in a..=b {
            new |= !self.is_dirty(r);
            self.set_bit(r);
        }
        self.failed_inflight.fetch_sub(1, Ordering::SeqCst);
        if new {
            if let Err(e) = self.commit().await {
                tracing::error!("cannot persist the local rebuild bitmap: {e}");
            }
        }
        true
    }

    /// Status for `mirror_get_status`.
    pub fn status(&self) -> LocalStatus {
        let rs = 1u64 << self.region_shift;
        let dirty = self.dirty_regions();
        let total = self.total.load(Ordering::Relaxed);
        let done = self.done.load(Ordering::Relaxed);
        let pct = if total == 0 {
            if dirty == 0 {
                100.0
            } else {
                0.0
            }
        } else {
            ((done.min(total) as f64 * 100.0 / total as f64) * 10.0).round() / 10.0
        };
        LocalStatus {
            state: self.state(),
            volume: self.device().name().to_string(),
            rebuild_regions: dirty,
            rebuild_bytes: dirty * rs,
            source_leg: self.source_leg.load(Ordering::Relaxed),
            rebuild_cursor: self.cursor.load(Ordering::Relaxed),
            rebuild_percent: pct,
            rebuild_copied_bytes: self.copied.load(Ordering::Relaxed),
            rebuild_rate_bps: self.rate_seen.load(Ordering::Relaxed),
            remote_reads: self.remote_reads.load(Ordering::Relaxed),
            local_errors: self.local_errors.load(Ordering::Relaxed),
            last_error: self
                .last_error
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone(),
        }
    }
}

/// The local volume failed a request (see [`LocalRecovery::local_failed`]);
/// with a spare configured, the rebuild onto it starts by itself.
pub(super) async fn fail_local(m: &Arc<Mirror>, offset: u64, len: u64, why: &str) {
    let rec = &m.recovery;
    rec.local_failed(&m.name, offset, len, why).await;
    if rec.running.load(Ordering::SeqCst) {
        return;
    }
    let spare = rec.spare.lock().unwrap_or_else(|p| p.into_inner()).take();
    if let Some(spare) = spare {
        rec.spare_used.store(true, Ordering::SeqCst);
        tracing::warn!(
            mirror = m.name,
            spare = spare.name(),
            "local device failed: rebuilding onto the spare"
        );
        // start_recover writes the state file: off the reactor.
        let mm = m.clone();
        let spawned = std::thread::Builder::new()
            .name("mirror-spare".into())
            .spawn(move || {
                if let Err(e) = start_recover(&mm, None, Some(spare)) {
                    tracing::error!(mirror = mm.name, "rebuild onto the spare: {e}");
                }
            });
        if let Err(e) = spawned {
            tracing::error!(mirror = m.name, "rebuild onto the spare: {e}");
        }
    }
}

/// Whether an error is the device's (a failing disk), as opposed to a
/// request the volume refused or a transient shortage.
pub fn is_device_error(e: &VolumeError) -> bool {
    matches!(e, VolumeError::Io(_))
}

/// A per-channel handle on the local device that follows replacements.
pub struct LocalChannel {
    cached: std::cell::RefCell<(u64, std::rc::Rc<VolumeChannel>)>,
}

impl LocalChannel {
    /// Opens the current device on this reactor.
    pub fn new(rec: &LocalRecovery) -> LocalChannel {
        LocalChannel {
            cached: std::cell::RefCell::new((
                rec.device_version(),
                std::rc::Rc::new(rec.device().channel()),
            )),
        }
    }

    /// The channel of the current device.
    pub fn get(&self, rec: &LocalRecovery) -> std::rc::Rc<VolumeChannel> {
        let v = rec.device_version();
        let mut c = self.cached.borrow_mut();
        if c.0 != v {
            *c = (v, std::rc::Rc::new(rec.device().channel()));
        }
        c.1.clone()
    }
}

/// Whether leg `idx` can serve a read of `[offset, offset+len)`: synced, or
/// syncing with the range clean for it (or missing locally: then the leg is
/// the newest copy there is).
fn leg_can_serve(m: &Mirror, leg: &Leg, offset: u64, len: u64) -> bool {
    let idx = leg.idx;
    match leg.state() {
        LegState::Synced => true,
        LegState::Syncing => {
            let (a, b) = m.meta.regions_of(offset, len);
            (a..=b).all(|r| !m.meta.is_dirty(idx, r) || m.recovery.is_dirty(r))
        }
        _ => false,
    }
}

/// Reads `len` bytes at `offset` from leg `idx` on this core's link.
async fn leg_read(
    m: &Mirror,
    idx: usize,
    offset: u64,
    len: usize,
) -> Result<super::ReadData, String> {
    let msg = Message::Read(Read {
        mirror: m.id,
        offset: ByteOffset(offset),
        len: ByteLen(len as u64),
    });
    match m.leg_request(idx, &msg, &[]).await? {
        Reply::Read(Status::Ok, data) if data.len() == len => Ok(data),
        Reply::Read(Status::Ok, d) => Err(format!(
            "leg answered {} bytes for a read of {len}",
            d.len()
        )),
        Reply::Read(s, _) => Err(format!("leg read failed: {s:?}")),
        _ => Err("unexpected answer to a read".into()),
    }
}

/// How long a host read or write waits for a remote leg to serve it while
/// the local device cannot (a leg reconnecting after a link drop).
pub(super) const REMOTE_RETRY_LIMIT: Duration = Duration::from_secs(10);

/// Serves a host read from a remote leg (the local volume failed or misses
/// the range), retrying (up to [`REMOTE_RETRY_LIMIT`]) while no leg can.
pub(super) async fn remote_read(
    m: &Mirror,
    legs: &Snapshot<Leg>,
    offset: ByteOffset,
    mut buf: IoBufMut,
) -> (Result<(), VolumeError>, IoBufMut) {
    let len = buf.len();
    let t0 = Instant::now();
    let mut last = String::from("no live remote leg");
    loop {
        let pick = legs
            .iter()
            .find(|(_, l)| leg_can_serve(m, l, offset.0, len as u64));
        if let Some((idx, _)) = pick {
            match leg_read(m, idx, offset.0, len).await {
                Ok(data) => {
                    buf.copy_from_slice(&data);
                    m.recovery.remote_reads.fetch_add(1, Ordering::Relaxed);
                    return (Ok(()), buf);
                }
                Err(e) => last = e,
            }
        }
        if t0.elapsed() > REMOTE_RETRY_LIMIT || m.stopping.load(Ordering::SeqCst) {
            tracing::warn!(
                mirror = m.name,
                offset = offset.0,
                "read failed on the local device and on every remote leg: {last}"
            );
            return (
                Err(VolumeError::Io(io::Error::other(format!(
                    "local device failed and no remote leg could serve the read: {last}"
                )))),
                buf,
            );
        }
        sleep(Duration::from_millis(10)).await;
    }
}

/// `mirror_recover_local`: checks, installs a replacement, and starts the
/// rebuild on the first reactor.
pub fn start_recover(
    m: &Arc<Mirror>,
    source_leg: Option<usize>,
    replacement: Option<Arc<Volume>>,
) -> Result<(), RecoverError> {
    let rec = &m.recovery;
    let snap = m.legs.snapshot();
    let src = match source_leg {
        Some(s) => s,
        // The first synced leg, else the first leg.
        None => snap
            .iter()
            .find(|(_, l)| l.state() == LegState::Synced)
            .or_else(|| snap.iter().next())
            .map(|(i, _)| i)
            .ok_or_else(|| {
                RecoverError::Invalid("the mirror has no remote leg to recover from".into())
            })?,
    };
    if snap.get(src).is_none() {
        return Err(RecoverError::Invalid(format!(
            "source_leg: the mirror has no leg in slot {src}"
        )));
    }
    if rec.running.swap(true, Ordering::SeqCst) {
        return Err(RecoverError::Busy("a rebuild is already running".into()));
    }
    let state = rec.state();
    if state == LocalState::Healthy && replacement.is_none() {
        rec.running.store(false, Ordering::SeqCst);
        return Err(RecoverError::Busy(
            "the local device is healthy: nothing to recover (give replacement_bdev to move to another device)".into(),
        ));
    }
    if let Some(v) = replacement {
        if let Err(e) = rec.check_device(&v) {
            rec.running.store(false, Ordering::SeqCst);
            return Err(e);
        }
        // A new device holds nothing of ours: everything is rebuilt. The
        // leg is failed *before* the device changes, so a read that sees
        // the new device (channels check the version first) also sees the
        // failed state and goes to a remote leg.
        rec.state.store(LocalState::Failed as u8, Ordering::SeqCst);
        for r in 0..rec.regions {
            rec.set_bit(r);
        }
        rec.cursor.store(0, Ordering::SeqCst);
        if let Err(e) = rec.set_device(v) {
            rec.running.store(false, Ordering::SeqCst);
            return Err(e);
        }
    }
    rec.source_leg.store(src, Ordering::SeqCst);
    rec.total.store(rec.dirty_regions(), Ordering::Relaxed);
    rec.done.store(0, Ordering::Relaxed);
    if let Err(source) = rec.commit_blocking() {
        rec.running.store(false, Ordering::SeqCst);
        return Err(RecoverError::Io {
            path: rec.path.display().to_string(),
            source,
        });
    }
    spawn_rebuild(m);
    Ok(())
}

/// Starts the rebuild task (also at startup, to resume one).
pub(super) fn spawn_rebuild(m: &Arc<Mirror>) {
    m.recovery.running.store(true, Ordering::SeqCst);
    let mm = m.clone();
    if let Some(r) = m.reactors.first() {
        r.post(move || mirrorpoint_poller::spawn(rebuild(mm)).detach());
    }
}

async fn rebuild(m: Arc<Mirror>) {
    let rec = &m.recovery;
    let mut backoff = Duration::from_millis(50);
    loop {
        if m.stopping.load(Ordering::SeqCst) {
            break;
        }
        match rebuild_pass(&m).await {
            Ok(true) => break,
            Ok(false) => backoff = Duration::from_millis(50),
            Err(e) => {
                *rec.last_error.lock().unwrap_or_else(|p| p.into_inner()) = e.clone();
                if rec.state() == LocalState::Failed && e.starts_with("local") {
                    // The local device failed again: stop; the operator
                    // starts another recovery (or a replacement).
                    tracing::error!(mirror = m.name, "rebuild of the local device stopped: {e}");
                    break;
                }
                tracing::info!(mirror = m.name, "rebuild waits: {e}");
                sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(1));
            }
        }
    }
    rec.running.store(false, Ordering::SeqCst);
}

/// One pass over the rebuild bitmap. `Ok(true)`: the local leg is healthy.
async fn rebuild_pass(m: &Arc<Mirror>) -> Result<bool, String> {
    let rec = &m.recovery;
    let src = rec.source_leg.load(Ordering::SeqCst);
    // The source must hold everything: wait until it is synced.
    if m.leg_state(src) != LegState::Synced {
        return Err(format!(
            "source leg {src} is {:?}, waiting for it to be synced",
            m.leg_state(src)
        ));
    }
    if rec.state() == LocalState::Failed {
        rec.state
            .store(LocalState::Rebuilding as u8, Ordering::SeqCst);
        // Writes that saw the leg failed have set their bits once this drains.
        while rec.failed_inflight.load(Ordering::SeqCst) != 0 {
            mirrorpoint_poller::yield_now().await;
        }
        rec.commit().await.map_err(|e| format!("persist: {e}"))?;
        rec.total.store(rec.dirty_regions(), Ordering::Relaxed);
        rec.done.store(0, Ordering::Relaxed);
        tracing::info!(
            mirror = m.name,
            regions = rec.dirty_regions(),
            source_leg = src,
            device = rec.device().name(),
            "rebuilding the local device"
        );
    } else if rec.total.load(Ordering::Relaxed) == 0 {
        rec.total.store(rec.dirty_regions(), Ordering::Relaxed);
    }
    let dev = rec.device();
    let local = dev.channel();
    let pass = PassState {
        cursor: Cell::new(rec.cursor.load(Ordering::SeqCst)),
        copied: Cell::new(0),
        workers_left: Cell::new(REBUILD_DEPTH),
        error: RefCell::new(None),
        started: Instant::now(),
    };
    let mut futs: Vec<std::pin::Pin<Box<dyn std::future::Future<Output = ()> + '_>>> = (0
        ..REBUILD_DEPTH)
        .map(|_| Box::pin(rebuild_worker(m, src, &local, &pass)) as _)
        .collect();
    futs.push(Box::pin(rebuild_committer(m, &local, &pass)));
    join_all(futs).await;
    let err = pass.error.borrow_mut().take();
    if let Some(e) = err {
        if rec.state() == LocalState::Rebuilding {
            // Keep what was copied (flush, then commit), then wait and retry.
            persist_progress(m, &local).await?;
        }
        return Err(e);
    }
    if rec.dirty_regions() != 0 {
        // Regions behind the cursor (a resumed rebuild starts mid-way):
        // another pass from the start.
        rec.cursor.store(0, Ordering::SeqCst);
        persist_progress(m, &local).await?;
        return Ok(false);
    }
    // Nothing left: durable locally, then healthy.
    let snap = rec.unflushed_snapshot();
    if let Err(e) = local.flush().await {
        let why = format!("local flush after the rebuild: {e}");
        fail_local(m, 0, 0, &why).await;
        return Err(why);
    }
    rec.flushed(&snap);
    if rec
        .state
        .compare_exchange(
            LocalState::Rebuilding as u8,
            LocalState::Healthy as u8,
            Ordering::SeqCst,
            Ordering::SeqCst,
        )
        .is_err()
    {
        return Err("local device failed again at the end of the rebuild".into());
    }
    rec.cursor.store(0, Ordering::SeqCst);
    rec.commit().await.map_err(|e| format!("persist: {e}"))?;
    *rec.last_error.lock().unwrap_or_else(|p| p.into_inner()) = String::new();
    tracing::info!(
        mirror = m.name,
        bytes = rec.copied.load(Ordering::Relaxed),
        "local device rebuilt: reads are served locally again"
    );
    Ok(true)
}

/// Regions copied at once by a rebuild (each waits for a leg round trip
/// and a local write: one at a time leaves the link and the disk idle).
const REBUILD_DEPTH: usize = 32;

/// One rebuild pass's shared state (all its tasks run on one reactor).
struct PassState {
    cursor: Cell<u64>,
    copied: Cell<u64>,
    workers_left: Cell<usize>,
    error: RefCell<Option<String>>,
    started: Instant,
}

impl PassState {
    fn fail(&self, e: String) {
        self.error.borrow_mut().get_or_insert(e);
    }
}

/// Takes the next dirty region at or after the pass's cursor and copies it
/// from the leg, under the region's overlap lock; until none is left, an
/// error, or the state changes.
async fn rebuild_worker(m: &Arc<Mirror>, src: usize, local: &VolumeChannel, pass: &PassState) {
    let rec = &m.recovery;
    let rs = 1u64 << rec.region_shift;
    let chunk = mirrorpoint_poller::buffer_pool().chunk_size() as u64;
    loop {
        if pass.error.borrow().is_some() {
            break;
        }
        if m.stopping.load(Ordering::SeqCst) {
            pass.fail("stopping".into());
            break;
        }
        if rec.state() != LocalState::Rebuilding {
            pass.fail("local device failed again during the rebuild".into());
            break;
        }
        if m.leg_state(src) != LegState::Synced {
            pass.fail(format!("source leg {src} left the synced state"));
            break;
        }
        let Some(r) = rec.next_dirty(pass.cursor.get()) else {
            break;
        };
        pass.cursor.set(r + 1);
        rec.cursor.store(r + 1, Ordering::SeqCst);
        let res = rebuild_region(m, src, local, r, rs, chunk).await;
        match res {
            Ok(n) => pass.copied.set(pass.copied.get() + n),
            Err(e) => {
                pass.fail(e);
                break;
            }
        }
        let el = pass.started.elapsed();
        let copied = pass.copied.get();
        rec.rate_seen.store(
            (copied as f64 / el.as_secs_f64().max(1e-6)) as u64,
            Ordering::Relaxed,
        );
        let rate = m.resync_rate.load(Ordering::Relaxed);
        if rate > 0 {
            let due = Duration::from_secs_f64(copied as f64 / rate as f64);
            if let Some(wait) = due.checked_sub(el) {
                sleep(wait).await;
            }
        }
    }
    pass.workers_left.set(pass.workers_left.get() - 1);
}

/// Copies region `r` from leg `src` to the local device. Returns the bytes
/// copied (0 when a host write's failure made it moot meanwhile).
async fn rebuild_region(
    m: &Arc<Mirror>,
    src: usize,
    local: &VolumeChannel,
    r: u64,
    rs: u64,
    chunk: u64,
) -> Result<u64, String> {
    let rec = &m.recovery;
    let start = r * rs;
    let end = (start + rs).min(rec.size);
    let guard = m.overlap.lock(start, end);
    guard.ready().await;
    if !rec.is_dirty(r) {
        return Ok(0);
    }
    let mut off = start;
    while off < end {
        let len = chunk.min(end - off) as usize;
        let data = leg_read(m, src, off, len)
            .await
            .map_err(|e| format!("reading region {r} from leg {src}: {e}"))?;
        // The received chunk itself when it is aligned for the device.
        let data = data.into_iobuf().await?;
        let (res, _) = local.write(ByteOffset(off), data).await;
        if let Err(e) = res {
            let why = format!("local write during rebuild: {e}");
            fail_local(m, start, end - start, &why).await;
            return Err(why);
        }
        off += len as u64;
    }
    rec.clear_rebuilt(r);
    rec.copied.fetch_add(end - start, Ordering::Relaxed);
    rec.done.fetch_add(1, Ordering::Relaxed);
    drop(guard);
    Ok(end - start)
}

/// Every [`COMMIT_EVERY`]: flushes the local device and commits the bitmap
/// without pausing the workers; a bit is clear on disk only for regions
/// rebuilt before the flush began (`unflushed`), so a cleared bit on disk is
/// never ahead of the data.
async fn rebuild_committer(m: &Arc<Mirror>, local: &VolumeChannel, pass: &PassState) {
    let mut last = Instant::now();
    while pass.workers_left.get() > 0 {
        sleep(Duration::from_millis(20)).await;
        if last.elapsed() < COMMIT_EVERY || pass.error.borrow().is_some() {
            continue;
        }
        // The workers go on meanwhile: regions they finish during the flush
        // stay dirty in the file until the next one.
        if let Err(e) = persist_progress(m, local).await {
            pass.fail(e);
        }
        last = Instant::now();
    }
}

/// Flushes the local device, then commits the bitmap and cursor: a bit
/// cleared on disk always means the data is durable locally.
async fn persist_progress(m: &Arc<Mirror>, local: &VolumeChannel) -> Result<(), String> {
    // Regions rebuilt so far had their writes complete: the flush makes
    // them durable, and only them (later ones stay dirty in the file).
    let snap = m.recovery.unflushed_snapshot();
    if let Err(e) = local.flush().await {
        let why = format!("local flush during the rebuild: {e}");
        fail_local(m, 0, 0, &why).await;
        return Err(why);
    }
    m.recovery.flushed(&snap);
    m.recovery
        .commit()
        .await
        .map_err(|e| format!("persist rebuild progress: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn saved() -> Saved {
        Saved {
            state: LocalState::Rebuilding,
            source_leg: 2,
            cursor: 77,
            device: "repl".into(),
            bits: vec![0x8000_0000_0000_0001, 0, 0x5],
        }
    }

    #[test]
    fn state_file_round_trips() {
        let b = encode(&saved(), 16, 130);
        let s = decode(&b, 16, 130).expect("decodes");
        assert_eq!(s.state, LocalState::Rebuilding);
        assert_eq!((s.source_leg, s.cursor), (2, 77));
        assert_eq!(s.device, "repl");
        assert_eq!(s.bits, saved().bits);
    }

    /// A torn, truncated or foreign file is refused with a reason, never a panic.
    #[test]
    fn damaged_state_files_are_refused() {
        let b = encode(&saved(), 16, 130);
        for n in 0..b.len() {
            assert!(decode(&b[..n], 16, 130).is_err(), "truncated to {n}");
        }
        for i in 0..b.len() {
            let mut c = b.clone();
            c[i] ^= 0x40;
            assert!(decode(&c, 16, 130).is_err(), "byte {i} flipped");
        }
        let e = decode(&b, 17, 65).err().expect("other geometry");
        assert!(e.contains("regions"), "{e}");
        // A CRC-valid file whose device name length points past the end.
        let mut c = b[..b.len() - 4].to_vec();
        let at = 8 + 1 + 4 + 8 + 4 + 8;
        c[at..at + 4].copy_from_slice(&u32::MAX.to_le_bytes());
        let crc = crc32c::crc32c(&c);
        c.extend_from_slice(&crc.to_le_bytes());
        assert!(decode(&c, 16, 130).is_err());
    }

    /// A fresh scratch directory and a 1 MiB malloc volume for one test.
    fn scratch(tag: &str) -> (std::path::PathBuf, std::sync::Arc<crate::volume::Volume>) {
        let dir = std::env::temp_dir().join(format!("mp-recovery-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("dir");
        let v = crate::volume::VolumeRegistry::new()
            .create(crate::volume::VolumeSpec::Malloc(
                crate::volume::registry::MallocParams {
                    name: Some("l".into()),
                    num_blocks: 2048,
                    block_size: crate::units::BlockSize::B512,
                    uuid: None,
                },
            ))
            .expect("malloc");
        (dir, v)
    }

    /// A region the rebuild copied is clean in the file only after a flush
    /// that began after the copy: a crash before it rebuilds it again.
    #[test]
    fn rebuilt_regions_stay_dirty_on_disk_until_flushed() {
        let (dir, v) = scratch("unfl");
        let path = dir.join("mirror-u.local");
        let (rec, _) = LocalRecovery::open(&path, v.clone(), 64 << 10).expect("new");
        rec.state
            .store(LocalState::Rebuilding as u8, Ordering::SeqCst);
        for r in [2, 5, 9] {
            rec.set_bit(r);
        }
        // Region 2 rebuilt before the flush began, 5 during it.
        rec.clear_rebuilt(2);
        let snap = rec.unflushed_snapshot();
        rec.clear_rebuilt(5);
        assert!(
            !rec.is_dirty(2) && !rec.is_dirty(5),
            "readable locally at once"
        );
        assert_eq!(rec.dirty_regions(), 1);
        rec.commit_blocking().expect("commit");
        let (before, _) = LocalRecovery::open(&path, v.clone(), 64 << 10).expect("reopen");
        assert!(before.is_dirty(2) && before.is_dirty(5) && before.is_dirty(9));
        before.close();
        rec.flushed(&snap);
        rec.commit_blocking().expect("commit");
        rec.close();
        let (after, _) = LocalRecovery::open(&path, v, 64 << 10).expect("reopen");
        assert!(!after.is_dirty(2), "flushed: clean on disk");
        assert!(
            after.is_dirty(5),
            "copied during the flush: still dirty on disk"
        );
        assert!(after.is_dirty(9));
        assert_eq!(after.dirty_regions(), 2);
        after.close();
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn open_persists_and_reloads_the_bitmap() {
        let (dir, v) = scratch("unit");
        let path = dir.join("mirror-x.local");
        let (rec, dev) = LocalRecovery::open(&path, v.clone(), 64 << 10).expect("new");
        assert!(dev.is_none());
        assert_eq!(rec.state(), LocalState::Healthy);
        assert_eq!(rec.regions, 16);
        rec.state.store(LocalState::Failed as u8, Ordering::SeqCst);
        rec.set_bit(3);
        rec.set_bit(15);
        assert_eq!(rec.next_dirty(0), Some(3));
        assert_eq!(rec.next_dirty(4), Some(15));
        assert_eq!(rec.next_dirty(16), None);
        assert!(!rec.local_readable(0, 4096));
        rec.commit_blocking().expect("commit");
        rec.close();
        let (again, dev) = LocalRecovery::open(&path, v.clone(), 64 << 10).expect("reopen");
        assert_eq!(dev.as_deref(), Some("l"));
        assert_eq!(again.state(), LocalState::Failed);
        assert_eq!(again.dirty_regions(), 2);
        assert!(again.is_dirty(3) && again.is_dirty(15) && !again.is_dirty(4));
        again.close();
        let v2 = v.clone();
        assert!(matches!(
            LocalRecovery::open(&path, v, 128 << 10),
            Err(RecoverError::Invalid(_))
        ));
        std::fs::write(&path, b"garbage").expect("write");
        assert!(matches!(
            LocalRecovery::open(&path, v2, 64 << 10),
            Err(RecoverError::Invalid(_))
        ));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
