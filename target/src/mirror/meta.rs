//! Persistent mirror metadata: the dirty bitmaps, the activity log and the
//! generation ids, in one file per mirror.
//!
//! # What is kept
//! - One **dirty bitmap** per remote leg, one bit per region (64 KiB to
//!   1 MiB): set while the leg missed (or may have missed) a write to the
//!   region, cleared when resync copied it.
//! - The **activity log** (DRBD's idea): the set of regions that have writes
//!   in flight or about to be. A region enters the log, durably, *before* the
//!   first write to it is issued; after a crash every region in the log is
//!   treated as dirty for every leg, because any of its writes may have
//!   reached some legs and not others. A region leaves the log only when it
//!   has no write in flight and its bitmap bits are already durable.
//! - **Generations**: the mirror's current data generation, two previous
//!   ones, and per leg the generation its bitmap is relative to.
//!
//! # Layout
//! Two 4 KiB superblock slots (offsets 0 and 4096), written alternately with
//! an increasing sequence number and a CRC32C, so a torn superblock write
//! leaves the other slot valid; then each leg's bitmap, 4 KiB aligned.
//! The superblock's leg count is the number of bitmap *slots* on file (leg
//! slot `i` lives at `BITMAP_START + i * span`); legs are added and removed
//! online (see `legset.rs`), so a slot may be unused, and the file grows by
//! one bitmap when a leg is added in a slot past the end. In memory every
//! mirror keeps [`MAX_LEGS`] slots. A file written before online leg
//! changes (slots = legs, in order) reads the same way.
//!
//! # Ordering
//! All file writes go through one metadata thread per mirror (off the
//! reactors: no blocking syscall there). Data-path tasks only touch atomics
//! on the fast path (a region already in the log, a bit already set); on an
//! activity-log miss they hand a request to the thread and wait. The thread
//! batches what is queued into one commit: dirty bitmap pages are written
//! and `fdatasync`ed before the superblock that drops a region from the log,
//! and the superblock (with the new log) is `fdatasync`ed before any waiter
//! is told its region is logged.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};

use mirrorpoint_poller::{oneshot, OneshotSender};

const MAGIC: &[u8; 8] = b"MPMIRMD1";
const SLOT: u64 = 4096;
const BITMAP_START: u64 = 2 * SLOT;
/// Most remote legs one mirror keeps bitmaps for.
pub const MAX_LEGS: usize = 4;
/// Granularity of the activity log: 4 MiB extents (as DRBD's), whatever the
/// bitmap's region size, so a hot set of a GiB fits the log.
pub const AL_EXTENT_SHIFT: u32 = 22;
/// Most extents the activity log keeps (a soft limit: when every logged
/// extent has writes in flight, the log grows past it rather than stall).
pub const AL_TARGET: usize = 256;
/// Hard limit: what fits in a superblock.
const AL_MAX: usize = 400;
const HEADER_LEN: usize = 8 + 8 + 8 + 8 + 8 + 8 + 16 + 4 + 4;
const LEG_LEN: usize = 16;

/// Generation ids of the mirror and its legs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Generations {
    /// Generation of the local (primary) data.
    pub current: u64,
    /// Earlier generations, newest first.
    pub history: [u64; 2],
    /// Per remote leg: the generation the leg's data is at as far as this
    /// side knows, which its bitmap is relative to (0: blank leg).
    pub leg_bitmap: [u64; MAX_LEGS],
}

impl Generations {
    /// Starts a new current generation (the local data moved on without a leg).
    pub fn rotate(&mut self) {
        self.history = [self.current, self.history[0]];
        self.current = random_gen();
    }
}

/// A fresh random generation id (never 0).
pub fn random_gen() -> u64 {
    let mut b = [0u8; 8];
    if getrandom::fill(&mut b).is_err() {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1);
        b = (t ^ u64::from(std::process::id())).to_le_bytes();
    }
    u64::from_le_bytes(b).max(1)
}

enum Req {
    /// Log these regions (durably) then answer.
    Log(Vec<u64>, OneshotSender<io::Result<()>>),
    /// Write everything that changed, then answer.
    Commit(OneshotSender<io::Result<()>>),
    /// Commit with every idle region dropped from the log (clean stop).
    Drain(OneshotSender<io::Result<()>>),
    Stop,
}

/// The in-memory state, shared by every core, and the handle to the
/// metadata thread.
pub struct MirrorMeta {
    path: PathBuf,
    volume_size: u64,
    region_shift: u32,
    regions: u64,
    /// Leg slots in memory (always [`MAX_LEGS`]).
    legs: usize,
    /// Leg slots with a bitmap on file (grows when a leg is added past it).
    file_slots: AtomicUsize,
    bits: Vec<Box<[AtomicU64]>>,
    dirty: Vec<AtomicU64>,
    page_dirty: Vec<Box<[AtomicBool]>>,
    inflight: Box<[AtomicU32]>,
    logged: Box<[AtomicBool]>,
    gens: Mutex<Generations>,
    gens_dirty: AtomicBool,
    tx: Mutex<mpsc::Sender<Req>>,
    /// Regions recovered from the activity log at open (crash recovery).
    pub recovered_from_al: u64,
    commits: AtomicU64,
}

fn bitmap_bytes(regions: u64) -> u64 {
    regions.div_ceil(64) * 8
}

fn bitmap_span(regions: u64) -> u64 {
    bitmap_bytes(regions).div_ceil(SLOT) * SLOT
}

/// What a superblock holds.
struct Super {
    seq: u64,
    al_shift: u32,
    region_size: u64,
    volume_size: u64,
    legs: usize,
    gens: Generations,
    al: Vec<u64>,
}

fn encode_super(s: &Super) -> Vec<u8> {
    let mut b = Vec::with_capacity(SLOT as usize);
    b.extend_from_slice(MAGIC);
    b.extend_from_slice(&s.seq.to_le_bytes());
    b.extend_from_slice(&s.region_size.to_le_bytes());
    b.extend_from_slice(&s.volume_size.to_le_bytes());
    b.extend_from_slice(&s.gens.current.to_le_bytes());
    b.extend_from_slice(&u64::from(AL_EXTENT_SHIFT).to_le_bytes());
    b.extend_from_slice(&s.gens.history[0].to_le_bytes());
    b.extend_from_slice(&s.gens.history[1].to_le_bytes());
    b.extend_from_slice(&(s.legs as u32).to_le_bytes());
    b.extend_from_slice(&(s.al.len() as u32).to_le_bytes());
    for g in s.gens.leg_bitmap {
        b.extend_from_slice(&g.to_le_bytes());
        b.extend_from_slice(&0u64.to_le_bytes());
    }
    for r in &s.al {
        b.extend_from_slice(&r.to_le_bytes());
    }
    b.resize(SLOT as usize - 4, 0);
    let crc = crc32c::crc32c(&b);
    b.extend_from_slice(&crc.to_le_bytes());
    b
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut x = [0u8; 8];
    x.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(x)
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    let mut x = [0u8; 4];
    x.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(x)
}

fn decode_super(b: &[u8]) -> Option<Super> {
    if b.len() != SLOT as usize || &b[..8] != MAGIC {
        return None;
    }
    let crc = u32_at(b, SLOT as usize - 4);
    if crc32c::crc32c(&b[..SLOT as usize - 4]) != crc {
        return None;
    }
    let legs = u32_at(b, 64) as usize;
    let al_len = u32_at(b, 68) as usize;
    if legs > MAX_LEGS || al_len > AL_MAX {
        return None;
    }
    let mut gens = Generations {
        current: u64_at(b, 32),
        history: [u64_at(b, 48), u64_at(b, 56)],
        leg_bitmap: [0; MAX_LEGS],
    };
    for (i, g) in gens.leg_bitmap.iter_mut().enumerate() {
        *g = u64_at(b, HEADER_LEN + i * LEG_LEN);
    }
    let al_start = HEADER_LEN + MAX_LEGS * LEG_LEN;
    let al = (0..al_len).map(|i| u64_at(b, al_start + i * 8)).collect();
    let al_shift = u64_at(b, 40);
    if !(12..=40).contains(&al_shift) {
        return None;
    }
    Some(Super {
        seq: u64_at(b, 8),
        al_shift: al_shift as u32,
        region_size: u64_at(b, 16),
        volume_size: u64_at(b, 24),
        legs,
        gens,
        al,
    })
}

/// Fuzzing entry point: decodes `data` as a superblock; a superblock that
/// decodes must re-encode to the same bytes. Never panics otherwise.
#[doc(hidden)]
pub fn fuzz_superblock(data: &[u8]) {
    if let Some(s) = decode_super(data) {
        let again = encode_super(&s);
        assert_eq!(again.len(), SLOT as usize);
        let back = decode_super(&again).expect("re-encoded superblock decodes");
        assert_eq!(
            (back.seq, back.al_shift, back.al.clone()),
            (s.seq, s.al_shift, s.al.clone())
        );
        assert_eq!(back.gens, s.gens);
    }
}

/// Errors opening metadata.
#[derive(Debug, thiserror::Error)]
pub enum MetaError {
    /// File I/O.
    #[error("mirror metadata {path}: {source}")]
    Io {
        /// File.
        path: String,
        /// Error.
        source: io::Error,
    },
    /// The file does not describe this mirror.
    #[error("mirror metadata {path}: {reason}")]
    Mismatch {
        /// File.
        path: String,
        /// What differs.
        reason: String,
    },
}

impl MirrorMeta {
    /// Opens (or creates) the metadata of a mirror of `volume_size` bytes
    /// whose remote legs use slots `0..legs`. A new file starts with every
    /// bit set for those slots when `initial_full_sync` (a blank leg needs a
    /// full copy). An existing file may have more slots (legs were removed)
    /// or fewer (a leg was added but its bitmap never reached the file):
    /// slots missing from the file start all dirty, relative to no
    /// generation (full sync), which is never wrong.
    /// An existing file's activity log is folded into the bitmaps (crash
    /// recovery) and emptied, durably, before this returns.
    pub fn open(
        path: &Path,
        volume_size: u64,
        region_size: u64,
        legs: usize,
        initial_full_sync: bool,
    ) -> Result<Arc<MirrorMeta>, MetaError> {
        let io_err = |source| MetaError::Io {
            path: path.display().to_string(),
            source,
        };
        let mismatch = |reason: String| MetaError::Mismatch {
            path: path.display().to_string(),
            reason,
        };
        if !region_size.is_power_of_two() || !(64 << 10..=1 << 20).contains(&region_size) {
            return Err(mismatch(format!(
                "region size {region_size} must be a power of two from 64 KiB to 1 MiB"
            )));
        }
        if legs > MAX_LEGS {
            return Err(mismatch(format!("at most {MAX_LEGS} remote legs")));
        }
        let regions = volume_size.div_ceil(region_size);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .map_err(io_err)?;
        let len = file.metadata().map_err(io_err)?.len();
        let mut existing: Option<Super> = None;
        if len >= BITMAP_START {
            for slot in 0..2 {
                let mut b = vec![0u8; SLOT as usize];
                file.read_exact_at(&mut b, slot * SLOT).map_err(io_err)?;
                if let Some(s) = decode_super(&b) {
                    if existing.as_ref().map_or(true, |e| e.seq < s.seq) {
                        existing = Some(s);
                    }
                }
            }
        }
        let span = bitmap_span(regions);
        let mk_bits = || -> Box<[AtomicU64]> {
            (0..regions.div_ceil(64))
                .map(|_| AtomicU64::new(0))
                .collect()
        };
        let mut bits: Vec<Box<[AtomicU64]>> = (0..MAX_LEGS).map(|_| mk_bits()).collect();
        let full = |words: &mut Box<[AtomicU64]>| {
            for (i, w) in words.iter_mut().enumerate() {
                let left = regions - (i as u64) * 64;
                *w.get_mut() = if left >= 64 {
                    u64::MAX
                } else {
                    (1u64 << left) - 1
                };
            }
        };
        let file_slots;
        let (gens, al, seq, al_shift) = match existing {
            Some(mut s) => {
                if s.region_size != region_size || s.volume_size != volume_size {
                    return Err(mismatch(format!(
                        "file holds a mirror of {} bytes, region {} bytes; asked for {volume_size}, {region_size}",
                        s.volume_size, s.region_size
                    )));
                }
                // Slots the caller uses that never reached the file: full sync.
                for (leg, words) in bits.iter_mut().enumerate().take(legs).skip(s.legs) {
                    full(words);
                    s.gens.leg_bitmap[leg] = 0;
                }
                file_slots = s.legs.max(legs);
                for (leg, words) in bits.iter_mut().enumerate().take(s.legs) {
                    let mut raw = vec![0u8; bitmap_bytes(regions) as usize];
                    file.read_exact_at(&mut raw, BITMAP_START + leg as u64 * span)
                        .map_err(io_err)?;
                    for (w, c) in words.iter_mut().zip(raw.chunks_exact(8)) {
                        *w.get_mut() = u64_at(c, 0);
                    }
                }
                (s.gens, s.al, s.seq, s.al_shift)
            }
            None => {
                file.set_len(BITMAP_START + span * legs as u64)
                    .map_err(io_err)?;
                file_slots = legs;
                let gens = Generations {
                    current: random_gen(),
                    ..Generations::default()
                };
                if initial_full_sync {
                    for words in bits.iter_mut().take(legs) {
                        full(words);
                    }
                }
                (gens, Vec::new(), 0, AL_EXTENT_SHIFT)
            }
        };
        let pages = span / SLOT;
        let extents = volume_size.div_ceil(1 << AL_EXTENT_SHIFT);
        let meta = MirrorMeta {
            path: path.to_path_buf(),
            volume_size,
            region_shift: region_size.trailing_zeros(),
            regions,
            legs: MAX_LEGS,
            file_slots: AtomicUsize::new(file_slots),
            dirty: bits
                .iter()
                .map(|w| {
                    AtomicU64::new(
                        w.iter()
                            .map(|x| u64::from(x.load(Ordering::Relaxed).count_ones()))
                            .sum(),
                    )
                })
                .collect(),
            bits,
            page_dirty: (0..MAX_LEGS)
                .map(|_| (0..pages).map(|_| AtomicBool::new(true)).collect())
                .collect(),
            inflight: (0..extents).map(|_| AtomicU32::new(0)).collect(),
            logged: (0..extents).map(|_| AtomicBool::new(false)).collect(),
            gens: Mutex::new(gens),
            gens_dirty: AtomicBool::new(true),
            tx: Mutex::new(mpsc::channel().0),
            recovered_from_al: al.len() as u64,
            commits: AtomicU64::new(0),
        };
        // Crash recovery: whatever the log held may differ between legs.
        let shift = region_size.trailing_zeros();
        for &e in &al {
            let (start, end) = (e << al_shift, (e + 1) << al_shift);
            for r in (start >> shift)..(end.div_ceil(region_size)).min(regions) {
                for leg in 0..file_slots {
                    meta.set_dirty(leg, r);
                }
            }
        }
        let meta = Arc::new(meta);
        let (tx, rx) = mpsc::channel();
        *meta.tx.lock().unwrap_or_else(|p| p.into_inner()) = tx;
        let mut writer = Writer {
            meta: meta.clone(),
            file,
            seq,
            al: Vec::new(),
            span,
        };
        writer.commit(&[], AL_TARGET).map_err(io_err)?;
        std::thread::Builder::new()
            .name("mirror-meta".into())
            .spawn(move || writer.run(rx))
            .map_err(io_err)?;
        if !al.is_empty() {
            tracing::warn!(
                path = %path.display(),
                extents = al.len(),
                "mirror metadata: activity log held extents after an unclean stop; their regions will be resynced"
            );
        }
        Ok(meta)
    }

    /// The metadata file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Bytes per region.
    pub fn region_size(&self) -> u64 {
        1 << self.region_shift
    }

    /// Number of regions.
    pub fn regions(&self) -> u64 {
        self.regions
    }

    /// Regions `[first, last]` covering a byte range.
    pub fn regions_of(&self, offset: u64, len: u64) -> (u64, u64) {
        (
            offset >> self.region_shift,
            (offset + len.max(1) - 1) >> self.region_shift,
        )
    }

    /// Marks a region dirty for a leg (in memory; made durable by the next
    /// commit, which happens before the region can leave the activity log).
    pub fn set_dirty(&self, leg: usize, region: u64) {
        let (w, b) = ((region / 64) as usize, region % 64);
        let old = self.bits[leg][w].fetch_or(1 << b, Ordering::AcqRel);
        if old & (1 << b) == 0 {
            self.dirty[leg].fetch_add(1, Ordering::AcqRel);
        }
        self.page_dirty[leg][(w * 8) / SLOT as usize].store(true, Ordering::Release);
    }

    /// Clears a region's bit for a leg (after resync copied it).
    pub fn clear_dirty(&self, leg: usize, region: u64) {
        let (w, b) = ((region / 64) as usize, region % 64);
        let old = self.bits[leg][w].fetch_and(!(1 << b), Ordering::AcqRel);
        if old & (1 << b) != 0 {
            self.dirty[leg].fetch_sub(1, Ordering::AcqRel);
        }
        self.page_dirty[leg][(w * 8) / SLOT as usize].store(true, Ordering::Release);
    }

    /// Whether a region is dirty for a leg.
    pub fn is_dirty(&self, leg: usize, region: u64) -> bool {
        let (w, b) = ((region / 64) as usize, region % 64);
        self.bits[leg][w].load(Ordering::Acquire) & (1 << b) != 0
    }

    /// Dirty regions of a leg.
    pub fn dirty_regions(&self, leg: usize) -> u64 {
        self.dirty[leg].load(Ordering::Acquire)
    }

    /// The first dirty region of a leg at or after `from`, wrapping.
    pub fn next_dirty(&self, leg: usize, from: u64) -> Option<u64> {
        let words = &self.bits[leg];
        let n = words.len();
        if n == 0 {
            return None;
        }
        let start_w = ((from / 64) as usize) % n;
        for k in 0..=n {
            let wi = (start_w + k) % n;
            let mut w = words[wi].load(Ordering::Acquire);
            if k == 0 {
                w &= u64::MAX << (from % 64);
            }
            if w != 0 {
                return Some(wi as u64 * 64 + u64::from(w.trailing_zeros()));
            }
        }
        // The first word's low bits, skipped above.
        let w = words[start_w].load(Ordering::Acquire);
        (w != 0).then(|| start_w as u64 * 64 + u64::from(w.trailing_zeros()))
    }

    /// Marks every region dirty for a leg (full sync).
    pub fn set_all_dirty(&self, leg: usize) {
        for r in 0..self.regions {
            self.set_dirty(leg, r);
        }
    }

    /// Leg slots there are (bitmaps kept in memory).
    pub fn max_legs(&self) -> usize {
        self.legs
    }

    /// Prepares slot `leg` for a newly added leg: every region dirty (it
    /// needs a full copy), its bitmap relative to no generation, and the
    /// slot on file (the file grows if needed). Durable after the next
    /// commit. Bits only ever get set here, so a write racing with it
    /// cannot lose one.
    pub fn reset_leg(&self, leg: usize) -> Result<(), MetaError> {
        if leg >= self.legs {
            return Err(MetaError::Mismatch {
                path: self.path.display().to_string(),
                reason: format!("leg slot {leg}: at most {MAX_LEGS} remote legs"),
            });
        }
        self.set_all_dirty(leg);
        self.update_generations(|g| g.leg_bitmap[leg] = 0);
        self.file_slots.fetch_max(leg + 1, Ordering::SeqCst);
        Ok(())
    }

    /// Leg slots with a bitmap on file.
    pub fn file_slots(&self) -> usize {
        self.file_slots.load(Ordering::SeqCst)
    }

    /// The generations.
    pub fn generations(&self) -> Generations {
        *self.gens.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Changes the generations (durable after the next commit).
    pub fn update_generations(&self, f: impl FnOnce(&mut Generations)) -> Generations {
        let mut g = self.gens.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut g);
        self.gens_dirty.store(true, Ordering::Release);
        *g
    }

    /// Metadata commits so far (tests, status).
    pub fn commits(&self) -> u64 {
        self.commits.load(Ordering::Relaxed)
    }

    fn extents_of(offset: u64, len: u64) -> (u64, u64) {
        (
            offset >> AL_EXTENT_SHIFT,
            (offset + len.max(1) - 1) >> AL_EXTENT_SHIFT,
        )
    }

    /// Called before a write to `[offset, offset+len)` is issued: counts it
    /// in flight and makes sure its activity-log extents are durably logged.
    /// Fast path: atomics only. Always pair with [`MirrorMeta::end_write`].
    pub async fn begin_write(&self, offset: u64, len: u64) -> io::Result<()> {
        let (first, last) = Self::extents_of(offset, len);
        let mut missing = Vec::new();
        for r in first..=last {
            self.inflight[r as usize].fetch_add(1, Ordering::SeqCst);
            if !self.logged[r as usize].load(Ordering::SeqCst) {
                missing.push(r);
            }
        }
        if missing.is_empty() {
            return Ok(());
        }
        let (tx, rx) = oneshot();
        self.send(Req::Log(missing, tx))?;
        rx.await
            .unwrap_or_else(|_| Err(io::Error::other("mirror metadata thread stopped")))
    }

    /// The write covered by [`MirrorMeta::begin_write`] completed on every leg
    /// (or was accounted in the bitmaps).
    pub fn end_write(&self, offset: u64, len: u64) {
        let (first, last) = Self::extents_of(offset, len);
        for r in first..=last {
            self.inflight[r as usize].fetch_sub(1, Ordering::SeqCst);
        }
    }

    /// Writes everything that changed and waits until it is durable.
    pub async fn commit(&self) -> io::Result<()> {
        let (tx, rx) = oneshot();
        self.send(Req::Commit(tx))?;
        rx.await
            .unwrap_or_else(|_| Err(io::Error::other("mirror metadata thread stopped")))
    }

    /// [`MirrorMeta::commit`] from a non-reactor thread.
    pub fn commit_blocking(&self) -> io::Result<()> {
        let (tx, rx) = oneshot();
        self.send(Req::Commit(tx))?;
        rx.recv_blocking()
            .unwrap_or_else(|_| Err(io::Error::other("mirror metadata thread stopped")))
    }

    fn send(&self, req: Req) -> io::Result<()> {
        self.tx
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .send(req)
            .map_err(|_| io::Error::other("mirror metadata thread stopped"))
    }

    /// Stops the metadata thread after a final commit (a clean stop leaves
    /// an empty activity log).
    pub fn close(&self) {
        let (tx, rx) = oneshot();
        if self.send(Req::Drain(tx)).is_ok() {
            let _ = rx.recv_blocking();
        }
        let _ = self.send(Req::Stop);
    }
}

struct Writer {
    meta: Arc<MirrorMeta>,
    file: File,
    seq: u64,
    al: Vec<u64>,
    span: u64,
}

impl Writer {
    fn run(mut self, rx: mpsc::Receiver<Req>) {
        while let Ok(first) = rx.recv() {
            let mut batch = vec![first];
            while let Ok(more) = rx.try_recv() {
                batch.push(more);
            }
            let mut add = Vec::new();
            let mut replies = Vec::new();
            let mut stop = false;
            let mut drain = false;
            for req in batch {
                match req {
                    Req::Log(regions, tx) => {
                        add.extend(regions);
                        replies.push(tx);
                    }
                    Req::Commit(tx) => replies.push(tx),
                    Req::Drain(tx) => {
                        drain = true;
                        replies.push(tx);
                    }
                    Req::Stop => stop = true,
                }
            }
            let res = self.commit(&add, if drain { 0 } else { AL_TARGET });
            for tx in replies {
                tx.send(match &res {
                    Ok(()) => Ok(()),
                    Err(e) => Err(io::Error::new(e.kind(), e.to_string())),
                });
            }
            if let Err(e) = res {
                tracing::error!(path = %self.meta.path.display(), "mirror metadata commit failed: {e}");
            }
            if stop {
                break;
            }
        }
    }

    /// One commit: log `add`, evict idle regions beyond the target, write
    /// dirty bitmap pages (synced first when a region leaves the log), then
    /// the superblock, synced; then mark `add` logged.
    fn commit(&mut self, add: &[u64], target: usize) -> io::Result<()> {
        let m = self.meta.clone();
        for &r in add {
            if !self.al.contains(&r) {
                self.al.push(r);
            }
        }
        // Oldest first; evict idle ones while over the target.
        let mut evicted = false;
        let mut i = 0;
        while self.al.len() > target && i < self.al.len() {
            let r = self.al[i] as usize;
            if add.contains(&self.al[i]) {
                i += 1;
                continue;
            }
            // Dekker with begin_write: clear first, then look for writers.
            m.logged[r].store(false, Ordering::SeqCst);
            if m.inflight[r].load(Ordering::SeqCst) == 0 {
                self.al.remove(i);
                evicted = true;
            } else {
                m.logged[r].store(true, Ordering::SeqCst);
                i += 1;
            }
        }
        if self.al.len() > AL_MAX {
            return Err(io::Error::other(format!(
                "activity log full: {} regions with writes in flight",
                self.al.len()
            )));
        }
        let mut wrote_pages = false;
        let slots = m.file_slots.load(Ordering::SeqCst);
        for leg in 0..slots {
            for (p, flag) in m.page_dirty[leg].iter().enumerate() {
                if !flag.swap(false, Ordering::AcqRel) {
                    continue;
                }
                let words = &m.bits[leg];
                let first = p * (SLOT as usize / 8);
                let last = (first + SLOT as usize / 8).min(words.len());
                let mut buf = Vec::with_capacity(SLOT as usize);
                for w in &words[first..last] {
                    buf.extend_from_slice(&w.load(Ordering::Acquire).to_le_bytes());
                }
                self.file.write_all_at(
                    &buf,
                    BITMAP_START + leg as u64 * self.span + p as u64 * SLOT,
                )?;
                wrote_pages = true;
            }
        }
        if wrote_pages && evicted {
            self.file.sync_data()?;
        }
        m.gens_dirty.store(false, Ordering::Release);
        self.seq += 1;
        let sb = encode_super(&Super {
            seq: self.seq,
            al_shift: AL_EXTENT_SHIFT,
            region_size: m.region_size(),
            volume_size: m.volume_size,
            legs: slots,
            gens: m.generations(),
            al: self.al.clone(),
        });
        self.file.write_all_at(&sb, (self.seq % 2) * SLOT)?;
        self.file.sync_data()?;
        for &r in add {
            m.logged[r as usize].store(true, Ordering::SeqCst);
        }
        m.commits.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmp(tag: &str) -> PathBuf {
        let p = std::env::temp_dir().join(format!("mp-meta-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_file(&p);
        p
    }

    fn block_on<F: std::future::Future>(f: F) -> F::Output {
        // The metadata futures only wait on oneshots answered by a thread.
        struct W(std::thread::Thread);
        impl std::task::Wake for W {
            fn wake(self: Arc<Self>) {
                self.0.unpark();
            }
        }
        let waker = std::task::Waker::from(Arc::new(W(std::thread::current())));
        let mut cx = std::task::Context::from_waker(&waker);
        let mut f = std::pin::pin!(f);
        loop {
            if let std::task::Poll::Ready(v) = f.as_mut().poll(&mut cx) {
                return v;
            }
            std::thread::park_timeout(std::time::Duration::from_millis(10));
        }
    }

    #[test]
    fn activity_log_survives_a_crash_as_dirty_regions() {
        const EXT: u64 = 1 << AL_EXTENT_SHIFT;
        const R: u64 = 64 << 10;
        let path = tmp("al");
        let m = MirrorMeta::open(&path, 64 << 20, R, 1, false).expect("open");
        assert_eq!(m.dirty_regions(0), 0);
        block_on(m.begin_write(5 * EXT + 512, 4096)).expect("logged");
        block_on(m.begin_write(9 * EXT - R, 2 * R)).expect("logged"); // spans 8 and 9
        m.end_write(9 * EXT - R, 2 * R);
        // A region written while degraded, durable only through the log.
        m.set_dirty(0, 3);
        // "Crash": no close; open the file again.
        let again = MirrorMeta::open(&path, 64 << 20, R, 1, false).expect("reopen");
        assert_eq!(again.recovered_from_al, 3);
        let per = EXT / R;
        assert_eq!(again.dirty_regions(0), 3 * per);
        for r in [5 * per, 6 * per - 1, 8 * per, 10 * per - 1] {
            assert!(again.is_dirty(0, r), "region {r}");
        }
        assert!(!again.is_dirty(0, 3) && !again.is_dirty(0, 6 * per));
        // A clean close leaves nothing to recover.
        again.close();
        let third = MirrorMeta::open(&path, 64 << 20, R, 1, false).expect("reopen");
        assert_eq!(third.recovered_from_al, 0);
        assert_eq!(third.dirty_regions(0), 3 * per);
        third.close();
        let _ = std::fs::remove_file(&path);
    }

    #[test]
    fn evicted_extents_keep_their_bits() {
        const EXT: u64 = 1 << AL_EXTENT_SHIFT;
        let path = tmp("evict");
        let n = AL_TARGET as u64 + 50;
        let size = 2 << 30;
        let m = MirrorMeta::open(&path, size, 64 << 10, 2, false).expect("open");
        for e in 0..n {
            block_on(m.begin_write(e * EXT, 4096)).expect("logged");
            m.set_dirty(1, e * (EXT >> 16));
            m.end_write(e * EXT, 4096);
        }
        let again = MirrorMeta::open(&path, size, 64 << 10, 2, false).expect("reopen");
        assert!(again.recovered_from_al <= AL_TARGET as u64 + 1);
        for e in 0..n {
            assert!(
                again.is_dirty(1, e * (EXT >> 16)),
                "extent {e} lost its bit"
            );
        }
        assert!(matches!(
            MirrorMeta::open(&path, 1 << 29, 64 << 10, 2, false),
            Err(MetaError::Mismatch { .. })
        ));
        let _ = std::fs::remove_file(&path);
    }

    #[test]
    fn a_leg_added_online_gets_a_slot_on_file_and_a_full_bitmap() {
        const R: u64 = 64 << 10;
        let path = tmp("addleg");
        let size = 8 << 20;
        let regions = size / R;
        // A file of the old shape: one leg, synced.
        let m = MirrorMeta::open(&path, size, R, 1, false).expect("open");
        m.set_dirty(0, 7);
        m.update_generations(|g| g.leg_bitmap[0] = 42);
        block_on(m.commit()).expect("commit");
        // Add a leg in slot 2 (slot 1 unused): the file grows to 3 slots.
        m.reset_leg(2).expect("slot 2");
        assert!(m.reset_leg(MAX_LEGS).is_err());
        assert_eq!(m.dirty_regions(2), regions);
        // Resync copied half of it, then a crash.
        for r in 0..regions / 2 {
            m.clear_dirty(2, r);
        }
        block_on(m.commit()).expect("commit");
        assert_eq!(m.file_slots(), 3);
        let again = MirrorMeta::open(&path, size, R, 3, false).expect("reopen");
        assert_eq!(again.file_slots(), 3);
        assert_eq!(again.dirty_regions(0), 1);
        assert!(again.is_dirty(0, 7));
        assert_eq!(again.dirty_regions(1), 0);
        assert_eq!(again.dirty_regions(2), regions - regions / 2);
        assert_eq!(again.next_dirty(2, 0), Some(regions / 2));
        assert_eq!(again.generations().leg_bitmap[0], 42);
        again.close();
        // The record names fewer legs than the file has (slot 2 removed):
        // still the same mirror.
        let fewer = MirrorMeta::open(&path, size, R, 1, false).expect("fewer");
        assert_eq!(fewer.dirty_regions(0), 1);
        fewer.close();
        // More legs than the file has: the missing slot starts all dirty.
        let more = MirrorMeta::open(&path, size, R, 4, false).expect("more");
        assert_eq!(more.dirty_regions(3), regions);
        assert_eq!(more.generations().leg_bitmap[3], 0);
        more.close();
        let _ = std::fs::remove_file(&path);
    }

    proptest::proptest! {
        /// Corrupting any bytes of a valid superblock is caught (CRC) or
        /// decodes to a superblock that round-trips; never a panic.
        #[test]
        fn superblock_decoding_is_total(
            flips in proptest::collection::vec((0usize..4096, proptest::num::u8::ANY), 0..8),
            al in proptest::collection::vec(0u64..1 << 20, 0..AL_MAX),
        ) {
            let mut b = encode_super(&Super {
                seq: 7,
                al_shift: AL_EXTENT_SHIFT,
                region_size: 65536,
                volume_size: 1 << 30,
                legs: 2,
                gens: Generations { current: 5, history: [4, 3], leg_bitmap: [5, 0, 0, 0] },
                al: al.clone(),
            });
            let clean = decode_super(&b).expect("valid");
            proptest::prop_assert_eq!(&clean.al, &al);
            for (at, x) in &flips {
                b[*at] ^= *x;
            }
            fuzz_superblock(&b);
            fuzz_superblock(&b[..b.len() / 2]);
        }
    }

    #[test]
    fn new_file_with_full_sync_marks_every_region() {
        let path = tmp("full");
        let m = MirrorMeta::open(&path, (64 << 20) + 4096, 1 << 20, 1, true).expect("open");
        assert_eq!(m.regions(), 65);
        assert_eq!(m.dirty_regions(0), 65);
        assert_eq!(m.next_dirty(0, 64), Some(64));
        for r in 0..65 {
            m.clear_dirty(0, r);
        }
        assert_eq!(m.next_dirty(0, 0), None);
        let _ = std::fs::remove_file(&path);
    }
}
