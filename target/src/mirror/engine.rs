//! The mirror engine: a volume whose every write reaches the local leg and
//! every live remote leg.
//!
//! # Write path (per core, no lock but the sequencer and the overlap stripe)
//! 1. register the byte range with the [`OverlapDetector`] and wait for
//!    earlier overlapping writes to complete on every leg;
//! 2. take a stamp (sequence + epoch) from the [`Sequencer`] (one atomic add);
//! 3. make sure the range's regions are durably in the activity log
//!    ([`MirrorMeta::begin_write`]: atomics unless the region is new);
//! 4. write the same pool chunk to the local volume and send it on this
//!    core's link to each live remote leg, concurrently;
//! 5. a leg that fails, times out or is not live gets the regions marked in
//!    its dirty bitmap instead, and goes `Degraded`; host I/O is not failed;
//! 6. complete to the host per the acknowledgement policy (`sync`: after
//!    all of it; `async`: after the local write, remote in the background
//!    with a bounded number of writes in flight).
//!
//! # Legs
//! Each remote leg has a supervisor task (on the first reactor) that
//! connects, exchanges generations, brings up one link per core, resyncs the
//! dirty regions (rate-limited, under the overlap detector so a copy never
//! interleaves with a new write to the same region), makes the leg adopt the
//! current generation, and declares it `Synced`. Any link failure marks the
//! leg `Degraded` (bumping its link generation so every core drops its stale
//! link) and the supervisor starts over.
//!
//! The leg set changes online (`add_leg`, `remove_leg`): legs sit in the
//! slots of a [`LegSet`]; each write takes one snapshot of it (per-core
//! cache, see `legset.rs` for why a leg added under load misses nothing).

#[path = "recovery.rs"]
pub mod recovery;

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use mirrorpoint_poller::{sleep, spawn, IoBuf, IoBufMut, LocalSemaphore, ReactorHandle};
use serde::Serialize;

use super::legset::{LegCache, LegSet, LegSetError};
use super::link::{alloc_wait, join_all, now_ns, timeout, Conn};
use super::meta::MirrorMeta;
use super::overlap::OverlapDetector;
use super::replies::{AbandonOnDrop, ReplyError, ReplySlots};
use super::sequencer::Stamp;
use super::split::{LegSplit, SplitGate, SplitInfo};
use super::wire::{
    Epoch, ErrorCode, ErrorMsg, Flush, Generation, GenerationExchange, GenerationFlags,
    HandshakeConfig, Heartbeat, LegId, Message, MirrorId, RequestTag, SeqNo, Status, Timestamp,
    Write, WriteFlags,
};
use crate::units::ByteOffset;
use crate::volume::{Volume, VolumeError};

#[path = "resync.rs"]
mod resync;
use resync::resync;

/// When the host's write completes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum AckPolicy {
    /// After the local leg and every live remote leg have it.
    Sync,
    /// After the local leg; remote legs in the background.
    Async,
}

/// State of a remote leg.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
#[repr(u8)]
pub enum LegState {
    /// Identical to the local leg (up to writes in flight).
    Synced = 0,
    /// Connected, copying dirty regions; new writes also go to it.
    Syncing = 1,
    /// Unreachable: writes are recorded in its dirty bitmap.
    Degraded = 2,
    /// Frozen at an epoch: writes skip it (they set its dirty bits), its
    /// data is a point-in-time image (see `split.rs`).
    Split = 3,
    /// Refused (unrelated data or split brain): the operator must decide.
    Failed = 4,
}

impl LegState {
    fn from_u8(v: u8) -> LegState {
        match v {
            0 => LegState::Synced,
            1 => LegState::Syncing,
            3 => LegState::Split,
            4 => LegState::Failed,
            _ => LegState::Degraded,
        }
    }

    /// Synced or syncing: writes are sent to it.
    pub fn is_live(self) -> bool {
        matches!(self, LegState::Synced | LegState::Syncing)
    }
}

/// A remote leg's parameters.
#[derive(Debug, Clone)]
pub struct LegConfig {
    /// Site (domain agent) holding it.
    pub site: String,
    /// Where that site's daemon listens for mirror links.
    pub address: SocketAddr,
    /// Slot (index of its bitmap in the metadata; the leg's index in status).
    pub slot: usize,
    /// The leg's id within the mirror on the wire (never reused: a leg
    /// added later gets a new one, so a stale allocation is never mistaken
    /// for it).
    pub leg_id: u32,
    /// The leg is split (or a split/rejoin of it was interrupted): it starts
    /// `Split` and every write skips it.
    pub split: bool,
}

/// Engine tunables.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Acknowledgement policy.
    pub ack: AckPolicy,
    /// Async policy: most remote writes in flight per core before writes wait
    /// (each holds its pool chunk until every leg has it).
    pub max_lag_ios: usize,
    /// Resync bandwidth cap in bytes per second (0: none).
    pub resync_rate: u64,
    /// A link that answers nothing for this long is dead.
    pub link_timeout: Duration,
    /// The local leg's failure/rebuild state (see [`recovery`]).
    pub recovery: Arc<recovery::LocalRecovery>,
}

/// One remote leg's shared state.
pub struct Leg {
    idx: usize,
    cfg: LegConfig,
    pub(super) state: AtomicU8,
    pub(super) link_gen: AtomicU64,
    /// Split bookkeeping (which epochs skip the leg).
    pub(super) split: LegSplit,
    degraded_inflight: AtomicU64,
    last_error: Mutex<String>,
    remote_gen: AtomicU64,
    resync_copied: AtomicU64,
    resync_total: AtomicU64,
    resync_pass_copied: AtomicU64,
    resync_started: Mutex<Option<Instant>>,
    resync_rate_seen: AtomicU64,
    degradations: AtomicU64,
    /// Taken out of the leg set: its supervisor ends.
    removed: AtomicBool,
    /// Its supervisor has ended (its slot's bits are no longer cleared).
    sup_done: AtomicBool,
}

impl Leg {
    fn new(cfg: LegConfig) -> Leg {
        let split = LegSplit::default();
        if cfg.split {
            split.skip_all();
        }
        Leg {
            idx: cfg.slot,
            state: AtomicU8::new(if cfg.split {
                LegState::Split
            } else {
                LegState::Degraded
            } as u8),
            split,
            cfg,
            // Random start: link sessions (see connect_link) must not
            // repeat across restarts of this daemon, nor between the legs
            // that used a slot one after the other.
            link_gen: AtomicU64::new(u64::from((super::meta::random_gen() as u32) >> 2) + 1),
            degraded_inflight: AtomicU64::new(0),
            last_error: Mutex::new("not connected yet".into()),
            remote_gen: AtomicU64::new(0),
            resync_copied: AtomicU64::new(0),
            resync_total: AtomicU64::new(0),
            resync_pass_copied: AtomicU64::new(0),
            resync_started: Mutex::new(None),
            resync_rate_seen: AtomicU64::new(0),
            degradations: AtomicU64::new(0),
            removed: AtomicBool::new(false),
            sup_done: AtomicBool::new(false),
        }
    }

    /// Current state.
    pub fn state(&self) -> LegState {
        LegState::from_u8(self.state.load(Ordering::SeqCst))
    }

    /// Its parameters (site, address, slot, wire id).
    pub fn config(&self) -> &LegConfig {
        &self.cfg
    }

    /// Last failure text.
    pub fn last_error(&self) -> String {
        self.last_error
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

thread_local! {
    static LINKS: RefCell<HashMap<(u64, usize), Rc<CoreLink>>> = RefCell::new(HashMap::new());
    /// Async policy: this core's bound on remote writes in flight, per mirror.
    static LAG: RefCell<HashMap<u64, Rc<LocalSemaphore>>> = RefCell::new(HashMap::new());
}

static NEXT_UID: AtomicU64 = AtomicU64::new(1);

/// A mirrored volume.
pub struct Mirror {
    uid: u64,
    name: String,
    id: MirrorId,
    recovery: Arc<recovery::LocalRecovery>,
    meta: Arc<MirrorMeta>,
    seq: Arc<SplitGate>,
    /// The consistency group's gate, once the mirror joined one (group.rs):
    /// it replaces `seq` for good (until a restart).
    group_gate: std::sync::OnceLock<Arc<SplitGate>>,
    overlap: Arc<OverlapDetector>,
    pub(super) legs: LegSet<Leg>,
    /// Removed legs whose supervisor may still run (their slot waits).
    retired: Mutex<Vec<Arc<Leg>>>,
    pub(super) cfg: EngineConfig,
    resync_rate: AtomicU64,
    hs: HandshakeConfig,
    reactors: Vec<ReactorHandle>,
    stopping: AtomicBool,
    lag_ios: AtomicU64,
    lag_bytes: AtomicU64,
    verify: super::verify::VerifyState,
}

pub(super) enum Reply {
    Write(Status),
    Flush(Status),
    Gen(GenerationExchange),
    /// Per-region digests (packed), for the consistency check.
    Digest(Status, Vec<u8>),
    /// Data of a Read.
    Read(Status, ReadData),
}

/// The data of a `ReadResp` as it arrived: the frame's own pool chunk when
/// the payload was received into one (a large read: no copy, and aligned for
/// direct I/O), otherwise a copy of the bytes (a small payload cut from a
/// shared receive chunk).
pub(super) enum ReadData {
    /// The frame's payload chunk, exactly the data.
    Chunk(IoBuf),
    /// A copy.
    Bytes(Vec<u8>),
}

impl ReadData {
    /// Alignment a buffer needs to go to a volume as is (direct I/O).
    const DIRECT_ALIGN: usize = 4096;

    /// The data as a pool buffer a volume can write from: the received
    /// chunk itself when it is aligned, else a copy into a fresh chunk.
    pub(super) async fn into_iobuf(self) -> Result<IoBuf, String> {
        if let ReadData::Chunk(b) = &self {
            if (b.as_ptr() as usize) & (Self::DIRECT_ALIGN - 1) == 0 {
                return Ok(b.clone());
            }
        }
        let mut b = alloc_wait(self.len())
            .await
            .map_err(|e| format!("read buffer: {e}"))?;
        b.copy_from_slice(&self);
        Ok(b.freeze())
    }
}

impl std::ops::Deref for ReadData {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            ReadData::Chunk(b) => b,
            ReadData::Bytes(v) => v,
        }
    }
}

/// One core's connection to one remote leg.
struct CoreLink {
    conn: Rc<Conn>,
    gen: u64,
    /// Where requests wait for their answers; a request's tag is
    /// `tag_base` with the slot's id in the low half.
    replies: ReplySlots<Reply>,
    tag_base: u64,
    dead: Cell<bool>,
    last_rx: Cell<Instant>,
}

impl CoreLink {
    async fn request(
        &self,
        msg: &Message<'_>,
        payload: &[IoBuf],
        limit: Duration,
    ) -> Result<Reply, String> {
        if self.dead.get() {
            return Err("link closed".into());
        }
        let id = self.replies.reserve().map_err(|e| e.to_string())?;
        let tag = self.tag_base | u64::from(id);
        // However the wait ends without the answer (timeout, or this future
        // dropped), the slot is given up, not reused before its answer.
        let _abandon = AbandonOnDrop {
            slots: &self.replies,
            id,
        };
        // The answer (or the link's death, which closes the slots) ends the
        // request even while the send is still stuck in a dead socket.
        let fut = async {
            let mut send = std::pin::pin!(self.conn.send(RequestTag(tag), msg, payload));
            let mut sent = false;
            std::future::poll_fn(|cx| {
                if !sent {
                    match send.as_mut().poll(cx) {
                        std::task::Poll::Ready(Err(e)) => {
                            return std::task::Poll::Ready(Err(format!("send: {e}")))
                        }
                        std::task::Poll::Ready(Ok(())) => sent = true,
                        std::task::Poll::Pending => {}
                    }
                }
                match self.replies.poll_reply(id, cx) {
                    std::task::Poll::Ready(Ok(r)) => std::task::Poll::Ready(Ok(r)),
                    std::task::Poll::Ready(Err(ReplyError::Closed)) => {
                        std::task::Poll::Ready(Err("link closed".to_string()))
                    }
                    std::task::Poll::Ready(Err(e)) => std::task::Poll::Ready(Err(e.to_string())),
                    std::task::Poll::Pending => std::task::Poll::Pending,
                }
            })
            .await
        };
        match timeout(limit, fut).await {
            Some(r) => r,
            None => Err(format!("no answer within {limit:?}")),
        }
    }

    fn kill(&self) -> bool {
        if self.dead.replace(true) {
            return false;
        }
        self.conn.abort();
        self.replies.close();
        true
    }
}

/// What the mirror reports per leg.
#[derive(Debug, Clone, Serialize)]
pub struct LegStatus {
    /// Leg index (its slot).
    pub leg: usize,
    /// The leg's id within the mirror on the wire.
    pub leg_id: u32,
    /// Site holding it.
    pub site: String,
    /// Address of that site.
    pub address: String,
    /// State.
    pub state: LegState,
    /// Generation the leg's data is at (as last reported or adopted).
    pub generation: String,
    /// Bytes in dirty regions.
    pub dirty_bytes: u64,
    /// Dirty regions.
    pub dirty_regions: u64,
    /// Bytes copied by resync since the mirror started.
    pub resync_copied_bytes: u64,
    /// Regions dirty when the current or last resync pass began.
    pub resync_total_regions: u64,
    /// Progress of the current/last pass, 0..100.
    pub resync_percent: f64,
    /// Measured resync rate of the current/last pass, bytes per second.
    pub resync_rate_bps: u64,
    /// How often the leg went Degraded.
    pub degradations: u64,
    /// Last failure.
    pub last_error: String,
    /// The leg's split (point, image, phase), when split.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub split: Option<SplitInfo>,
}

/// What `mirror_get_status` reports.
#[derive(Debug, Clone, Serialize)]
pub struct MirrorStatus {
    /// Mirror (volume) name.
    pub name: String,
    /// Mirror id.
    pub mirror_id: u64,
    /// Local volume.
    pub local_volume: String,
    /// Local data generation.
    pub generation: String,
    /// Acknowledgement policy.
    pub ack: AckPolicy,
    /// Region size of the bitmaps.
    pub region_size: u64,
    /// Next sequence number and epoch.
    pub next_seq: u64,
    /// Current epoch.
    pub epoch: u32,
    /// Remote writes acknowledged to the host but not yet to every leg (async).
    pub lag_ios: u64,
    /// Their bytes.
    pub lag_bytes: u64,
    /// Resync rate cap, bytes per second (0: none).
    pub resync_rate_limit: u64,
    /// Metadata commits.
    pub metadata_commits: u64,
    /// Writes that waited for an overlapping one.
    pub overlap_waits: u64,
    /// Remote legs.
    pub legs: Vec<LegStatus>,
    /// The local leg: failure and rebuild.
    pub local: recovery::LocalStatus,
}

/// How a connect decided to resync.
enum Plan {
    Incremental,
    Full,
}

impl Mirror {
    /// Builds the engine and starts one supervisor per leg on the first
    /// reactor. Fails if two legs name the same slot or a slot is out of range.
    #[allow(clippy::too_many_arguments)]
    pub fn start(
        name: String,
        id: MirrorId,
        _local: Arc<Volume>,
        meta: Arc<MirrorMeta>,
        legs: Vec<LegConfig>,
        cfg: EngineConfig,
        hs: HandshakeConfig,
        reactors: Vec<ReactorHandle>,
    ) -> Result<Arc<Mirror>, LegSetError> {
        let legs = LegSet::new(
            legs.into_iter()
                .map(|cfg| (cfg.slot, Arc::new(Leg::new(cfg))))
                .collect(),
        )?;
        let m = Arc::new(Mirror {
            uid: NEXT_UID.fetch_add(1, Ordering::Relaxed),
            name,
            id,
            recovery: cfg.recovery.clone(),
            meta,
            seq: Arc::new(SplitGate::new(1, 1)),
            group_gate: std::sync::OnceLock::new(),
            overlap: OverlapDetector::new(20, 64),
            legs,
            retired: Mutex::new(Vec::new()),
            resync_rate: AtomicU64::new(cfg.resync_rate),
            cfg,
            hs,
            reactors,
            stopping: AtomicBool::new(false),
            lag_ios: AtomicU64::new(0),
            lag_bytes: AtomicU64::new(0),
            verify: super::verify::VerifyState::default(),
        });
        for (_, leg) in m.legs.snapshot().iter() {
            m.spawn_supervisor(leg.clone());
        }
        if m.recovery.state() == recovery::LocalState::Rebuilding {
            // A rebuild was under way at the last stop: resume it.
            recovery::spawn_rebuild(&m);
        }
        Ok(m)
    }

    fn spawn_supervisor(self: &Arc<Self>, leg: Arc<Leg>) {
        let (mm, l) = (self.clone(), leg.clone());
        let posted = match self.reactors.first() {
            Some(r) => r.post(move || spawn(supervise(mm, l)).detach()),
            None => false,
        };
        if !posted {
            leg.sup_done.store(true, Ordering::SeqCst);
        }
    }

    /// The legs now, by slot.
    pub fn legs(&self) -> Vec<Arc<Leg>> {
        self.legs
            .snapshot()
            .iter()
            .map(|(_, l)| l.clone())
            .collect()
    }

    /// A slot a new leg can take: empty, and not still in use by the
    /// supervisor of a leg removed from it.
    pub fn free_slot(&self) -> Option<usize> {
        let snap = self.legs.snapshot();
        let mut retired = self.retired.lock().unwrap_or_else(|p| p.into_inner());
        retired.retain(|l| !l.sup_done.load(Ordering::SeqCst));
        (0..self.meta.max_legs())
            .find(|&i| snap.get(i).is_none() && !retired.iter().any(|l| l.idx == i))
    }

    /// Adds a leg online, in the free slot `cfg.slot`: every region of the
    /// slot is marked dirty (durably) first, then the leg is published, so
    /// new writes reach it at once (or its bitmap) and its supervisor
    /// connects and copies the rest (full sync), then it is `synced`.
    /// `persist` runs between the durable metadata and the publication (it
    /// records the leg, so a restart resumes its full sync and never takes
    /// an old bitmap of the slot for the new leg's). Blocking (metadata
    /// commit): call it off the reactors.
    pub fn add_leg(
        self: &Arc<Self>,
        cfg: LegConfig,
        persist: impl FnOnce() -> Result<(), String>,
    ) -> Result<Arc<Leg>, String> {
        let slot = cfg.slot;
        if !self.free_slot_is(slot) {
            return Err(format!("leg slot {slot} is not free"));
        }
        self.meta.reset_leg(slot).map_err(|e| e.to_string())?;
        self.meta
            .commit_blocking()
            .map_err(|e| format!("metadata: {e}"))?;
        persist()?;
        let leg = Arc::new(Leg::new(cfg));
        self.legs
            .insert(slot, leg.clone())
            .map_err(|e| e.to_string())?;
        tracing::info!(
            mirror = self.name,
            leg = slot,
            leg_id = leg.cfg.leg_id,
            site = leg.cfg.site,
            "mirror leg added: full sync starts"
        );
        self.spawn_supervisor(leg.clone());
        Ok(leg)
    }

    fn free_slot_is(&self, slot: usize) -> bool {
        let snap = self.legs.snapshot();
        let mut retired = self.retired.lock().unwrap_or_else(|p| p.into_inner());
        retired.retain(|l| !l.sup_done.load(Ordering::SeqCst));
        slot < self.meta.max_legs()
            && snap.get(slot).is_none()
            && !retired.iter().any(|l| l.idx == slot)
    }

    /// Detaches the leg in `slot`: no new write goes to it, its links are
    /// dropped on every core, its supervisor ends. Writes already holding
    /// it finish (or set bits in its slot, which is not reused before its
    /// supervisor has ended).
    pub fn remove_leg(&self, slot: usize) -> Result<Arc<Leg>, String> {
        let leg = self.legs.remove(slot).map_err(|e| e.to_string())?;
        leg.removed.store(true, Ordering::SeqCst);
        leg.link_gen.fetch_add(1, Ordering::SeqCst);
        self.retired
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(leg.clone());
        self.kill_links(Some(slot));
        tracing::info!(
            mirror = self.name,
            leg = slot,
            leg_id = leg.cfg.leg_id,
            site = leg.cfg.site,
            "mirror leg removed"
        );
        Ok(leg)
    }

    fn kill_links(&self, slot: Option<usize>) {
        for r in &self.reactors {
            let uid = self.uid;
            r.post(move || {
                LINKS.with(|l| {
                    l.borrow_mut().retain(|k, v| {
                        if k.0 == uid && slot.map_or(true, |s| s == k.1) {
                            v.kill();
                            false
                        } else {
                            true
                        }
                    })
                })
            });
        }
    }

    /// Name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Mirror id.
    pub fn id(&self) -> MirrorId {
        self.id
    }

    /// The local volume (the configured one, or its replacement).
    pub fn local(&self) -> Arc<Volume> {
        self.recovery.device()
    }

    /// The local leg's failure/rebuild state.
    pub fn recovery(&self) -> &Arc<recovery::LocalRecovery> {
        &self.recovery
    }

    /// The metadata.
    pub fn meta(&self) -> &Arc<MirrorMeta> {
        &self.meta
    }

    /// The sequencer (and split gate) writes take their stamps from: the
    /// group's once the mirror joined one, its own before.
    pub fn gate(&self) -> &Arc<SplitGate> {
        self.group_gate.get().unwrap_or(&self.seq)
    }

    fn enter_gate(&self) -> (Stamp, super::split::Ticket) {
        if let Some(g) = self.group_gate.get() {
            return g.enter();
        }
        let (stamp, ticket) = self.seq.enter();
        // Dekker with join_gate: either it sees this ticket on the old gate
        // (and waits for it), or this load sees the group's gate.
        std::sync::atomic::fence(Ordering::SeqCst);
        match self.group_gate.get() {
            Some(now) => {
                drop(ticket);
                now.enter()
            }
            None => (stamp, ticket),
        }
    }

    /// Joins a consistency group: from now on writes are stamped by `gate`.
    /// Returns once no write stamped by the old gate is in flight (so a
    /// group split cannot miss one). Blocking; not on a reactor.
    pub fn join_gate(&self, gate: Arc<SplitGate>, limit: Duration) -> Result<(), String> {
        if let Some(g) = self.group_gate.get() {
            return if Arc::ptr_eq(g, &gate) {
                Ok(())
            } else {
                Err(format!(
                    "mirror '{}' already belongs to a consistency group (until a restart)",
                    self.name
                ))
            };
        }
        if self.group_gate.set(gate).is_err() {
            return Err(format!(
                "mirror '{}' joined another group meanwhile",
                self.name
            ));
        }
        std::sync::atomic::fence(Ordering::SeqCst);
        let t0 = Instant::now();
        while self.seq.inflight(0) + self.seq.inflight(1) != 0 {
            if t0.elapsed() > limit {
                return Err(format!(
                    "writes of '{}' did not drain in {limit:?}",
                    self.name
                ));
            }
            std::thread::sleep(Duration::from_micros(200));
        }
        Ok(())
    }

    /// The leg in slot `idx`, if any.
    pub fn leg(&self, idx: usize) -> Option<Arc<Leg>> {
        self.legs.get(idx)
    }

    /// Leg `idx`'s recorded split.
    pub fn split_info(&self, idx: usize) -> Option<SplitInfo> {
        self.legs.get(idx).and_then(|l| l.split.info())
    }

    /// Records leg `idx`'s split.
    pub fn set_split_info(&self, idx: usize, info: Option<SplitInfo>) {
        if let Some(l) = self.legs.get(idx) {
            l.split.set_info(info);
        }
    }

    /// The split of leg `idx` is over (rejoin): writes reach it again and
    /// it resyncs its dirty regions (bits set since the split).
    pub fn end_split(&self, idx: usize) {
        let Some(leg) = self.legs.get(idx) else {
            return;
        };
        leg.split.clear();
        leg.split.set_info(None);
        let _ = leg.state.compare_exchange(
            LegState::Split as u8,
            LegState::Degraded as u8,
            Ordering::SeqCst,
            Ordering::SeqCst,
        );
    }

    /// Leg states, in slot order.
    pub fn leg_states(&self) -> Vec<LegState> {
        self.legs
            .snapshot()
            .iter()
            .map(|(_, l)| l.state())
            .collect()
    }

    /// Total bytes resync copied to the leg in slot `leg`.
    pub fn resync_copied(&self, leg: usize) -> u64 {
        self.legs
            .get(leg)
            .map_or(0, |l| l.resync_copied.load(Ordering::Relaxed))
    }

    /// Changes the resync bandwidth cap.
    pub fn set_resync_rate(&self, bps: u64) {
        self.resync_rate.store(bps, Ordering::Relaxed);
    }

    /// Status for the RPC.
    pub fn status(&self) -> MirrorStatus {
        let g = self.meta.generations();
        let rs = self.meta.region_size();
        let next = self.gate().peek();
        MirrorStatus {
            name: self.name.clone(),
            mirror_id: self.id.0,
            local_volume: self.local().name().to_string(),
            generation: format!("{:016x}", g.current),
            ack: self.cfg.ack,
            region_size: rs,
            next_seq: next.seq,
            epoch: next.epoch,
            lag_ios: self.lag_ios.load(Ordering::Relaxed),
            lag_bytes: self.lag_bytes.load(Ordering::Relaxed),
            resync_rate_limit: self.resync_rate.load(Ordering::Relaxed),
            metadata_commits: self.meta.commits(),
            overlap_waits: self.overlap.waits(),
            legs: self
                .legs
                .snapshot()
                .iter()
                .map(|(_, l)| {
                    let dirty = self.meta.dirty_regions(l.idx);
                    let total = l.resync_total.load(Ordering::Relaxed);
                    let done = l.resync_pass_copied.load(Ordering::Relaxed);
                    let pct = if total == 0 {
                        // No pass yet: a new (added) leg has it all to do.
                        if dirty == 0 {
                            100.0
                        } else {
                            0.0
                        }
                    } else {
                        ((done.min(total) as f64 * 100.0 / total as f64) * 10.0).round() / 10.0
                    };
                    LegStatus {
                        leg: l.idx,
                        leg_id: l.cfg.leg_id,
                        site: l.cfg.site.clone(),
                        address: l.cfg.address.to_string(),
                        state: l.state(),
                        generation: format!("{:016x}", l.remote_gen.load(Ordering::Relaxed)),
                        dirty_bytes: dirty * rs,
                        dirty_regions: dirty,
                        resync_copied_bytes: l.resync_copied.load(Ordering::Relaxed),
                        resync_total_regions: total,
                        resync_percent: pct,
                        resync_rate_bps: l.resync_rate_seen.load(Ordering::Relaxed),
                        degradations: l.degradations.load(Ordering::Relaxed),
                        last_error: l
                            .last_error
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .clone(),
                        split: l.split.info(),
                    }
                })
                .collect(),
            local: self.recovery.status(),
        }
    }

    /// Stops the supervisors and links, and closes the metadata cleanly.
    pub fn stop(&self) {
        if self.stopping.swap(true, Ordering::SeqCst) {
            return;
        }
        for (_, leg) in self.legs.snapshot().iter() {
            leg.link_gen.fetch_add(1, Ordering::SeqCst);
        }
        self.kill_links(None);
        self.meta.close();
        self.recovery.close();
    }

    /// The operator's choice for a refused (`failed`) leg: the local data
    /// wins. The leg's generation is recorded as the one our bitmap is
    /// relative to, every region is marked dirty, and the leg reconnects
    /// and is fully resynced (it adopts our generation at the end).
    pub fn overwrite_leg(&self, idx: usize) -> Result<(), String> {
        let leg = self.legs.get(idx).ok_or_else(|| format!("no leg {idx}"))?;
        let leg = &*leg;
        if leg.state() != LegState::Failed {
            return Err(format!("leg {idx} is {:?}, not failed", leg.state()));
        }
        let theirs = leg.remote_gen.load(Ordering::SeqCst);
        self.meta.set_all_dirty(idx);
        self.meta.update_generations(|g| g.leg_bitmap[idx] = theirs);
        self.meta.commit_blocking().map_err(|e| e.to_string())?;
        tracing::warn!(
            mirror = self.name,
            leg = idx,
            "operator chose to overwrite the leg (generation {}) with the local data",
            gen_str(theirs)
        );
        leg.state.store(LegState::Degraded as u8, Ordering::SeqCst);
        Ok(())
    }

    /// A link of leg `idx` on this core failed (or a write to it did).
    pub(super) fn leg_failed(&self, leg: &Leg, gen: u64, reason: &str) {
        let idx = leg.idx;
        if leg
            .link_gen
            .compare_exchange(gen, gen + 1, Ordering::SeqCst, Ordering::SeqCst)
            .is_err()
        {
            return; // someone reported this generation's failure already
        }
        let prev = LegState::from_u8(leg.state.load(Ordering::SeqCst));
        if prev.is_live() {
            leg.state.store(LegState::Degraded as u8, Ordering::SeqCst);
            leg.degradations.fetch_add(1, Ordering::Relaxed);
        }
        *leg.last_error.lock().unwrap_or_else(|p| p.into_inner()) = reason.to_string();
        if !self.stopping.load(Ordering::Relaxed) {
            tracing::warn!(
                mirror = self.name,
                leg = idx,
                site = leg.cfg.site,
                "mirror leg degraded ({prev:?} -> Degraded): {reason}"
            );
        }
    }

    fn mark_dirty(&self, leg: usize, offset: u64, len: u64) {
        let (a, b) = self.meta.regions_of(offset, len);
        for r in a..=b {
            self.meta.set_dirty(leg, r);
        }
    }

    fn core_link(&self, leg: &Leg) -> Option<Rc<CoreLink>> {
        let gen = leg.link_gen.load(Ordering::SeqCst);
        LINKS.with(|l| {
            l.borrow()
                .get(&(self.uid, leg.idx))
                .filter(|c| c.gen == gen && !c.dead.get())
                .cloned()
        })
    }

    /// Sends one write to leg `idx` on this core's link, or records it in
    /// the leg's bitmap. True when the leg acknowledged it.
    async fn leg_write(&self, leg: &Leg, stamp: Stamp, offset: u64, buf: IoBuf) -> bool {
        let idx = leg.idx;
        let len = buf.len() as u64;
        if leg.split.skips(stamp.epoch) {
            // Written after the leg's split point: the leg's bitmap records
            // it for the rejoin (split.rs).
            self.mark_dirty(idx, offset, len);
            return false;
        }
        // Dekker with the supervisor's Degraded -> Syncing switch: a write
        // that saw the leg down has its bit set before the resync scans.
        leg.degraded_inflight.fetch_add(1, Ordering::SeqCst);
        let link = if leg.state().is_live() {
            self.core_link(leg)
        } else {
            None
        };
        let Some(link) = link else {
            self.mark_dirty(idx, offset, len);
            leg.degraded_inflight.fetch_sub(1, Ordering::SeqCst);
            if leg.state().is_live() {
                self.leg_failed(
                    leg,
                    leg.link_gen.load(Ordering::SeqCst),
                    "no link on this core",
                );
            }
            return false;
        };
        leg.degraded_inflight.fetch_sub(1, Ordering::SeqCst);
        let msg = Message::Write(Write {
            mirror: self.id,
            seq: SeqNo(stamp.seq),
            epoch: Epoch(stamp.epoch),
            flags: WriteFlags::default(),
            offset: ByteOffset(offset),
            data: &buf,
        });
        let res = link
            .request(&msg, std::slice::from_ref(&buf), self.cfg.link_timeout)
            .await;
        match res {
            Ok(Reply::Write(Status::Ok)) => true,
            other => {
                let reason = match other {
                    Ok(Reply::Write(s)) => format!("remote write failed: {s:?}"),
                    Ok(_) => "unexpected reply to a write".to_string(),
                    Err(e) => e,
                };
                // Same Dekker window as above: a bring-up switching the leg
                // to Syncing either sees this bit or is restarted by it.
                leg.degraded_inflight.fetch_add(1, Ordering::SeqCst);
                self.mark_dirty(idx, offset, len);
                if link.kill() {
                    LINKS.with(|l| {
                        let mut l = l.borrow_mut();
                        if l.get(&(self.uid, idx))
                            .is_some_and(|c| Rc::ptr_eq(c, &link))
                        {
                            l.remove(&(self.uid, idx));
                        }
                    });
                }
                // Whatever link this was (even one of an older link
                // generation), a bit set while the leg is live must send the
                // leg through another resync pass.
                if leg.state().is_live() {
                    self.leg_failed(leg, leg.link_gen.load(Ordering::SeqCst), &reason);
                } else {
                    self.leg_failed(leg, link.gen, &reason);
                }
                leg.degraded_inflight.fetch_sub(1, Ordering::SeqCst);
                false
            }
        }
    }

    pub(super) async fn leg_flush(&self, leg: &Leg) {
        let idx = leg.idx;
        if !leg.state().is_live() {
            return;
        }
        let Some(link) = self.core_link(leg) else {
            return;
        };
        let stamp = self.gate().peek();
        let msg = Message::Flush(Flush {
            mirror: self.id,
            seq: SeqNo(stamp.seq),
            epoch: Epoch(stamp.epoch),
        });
        match link.request(&msg, &[], self.cfg.link_timeout).await {
            Ok(Reply::Flush(Status::Ok)) => {}
            other => {
                let reason = match other {
                    Ok(Reply::Flush(s)) => format!("remote flush failed: {s:?}"),
                    Ok(_) => "unexpected reply to a flush".into(),
                    Err(e) => e,
                };
                if link.kill() {
                    LINKS.with(|l| l.borrow_mut().remove(&(self.uid, idx)));
                }
                self.leg_failed(leg, link.gen, &reason);
            }
        }
    }

    fn our_exchange(&self, leg: &Leg, flags: GenerationFlags) -> GenerationExchange {
        let g = self.meta.generations();
        GenerationExchange {
            mirror: self.id,
            leg: LegId(leg.cfg.leg_id),
            current: Generation(g.current),
            bitmap: Generation(g.leg_bitmap[leg.idx]),
            history: [Generation(g.history[0]), Generation(g.history[1])],
            flags,
        }
    }
}

/// A leg's part of a mirrored I/O: the local leg's result, or `None`.
type LegFuture<'a> = Pin<Box<dyn Future<Output = Option<Result<(), VolumeError>>> + 'a>>;

/// The per-core handle front ends use (through [`VolumeChannel`]).
pub struct MirrorChannel {
    mirror: Arc<Mirror>,
    local: recovery::LocalChannel,
    lag: Rc<LocalSemaphore>,
    legs: LegCache<Leg>,
}

impl MirrorChannel {
    /// Opens a channel on this reactor.
    pub fn new(mirror: &Arc<Mirror>) -> MirrorChannel {
        MirrorChannel {
            local: recovery::LocalChannel::new(&mirror.recovery),
            lag: LAG.with(|l| {
                l.borrow_mut()
                    .entry(mirror.uid)
                    .or_insert_with(|| Rc::new(LocalSemaphore::new(mirror.cfg.max_lag_ios.max(1))))
                    .clone()
            }),
            legs: LegCache::new(&mirror.legs),
            mirror: mirror.clone(),
        }
    }

    /// Reads are served by the local leg; by a remote leg when the local
    /// one failed (the failing read is retried there) or misses the range.
    pub async fn read(
        &self,
        offset: ByteOffset,
        buf: IoBufMut,
    ) -> (Result<(), VolumeError>, IoBufMut) {
        let m = &self.mirror;
        let rec = &m.recovery;
        let len = buf.len() as u64;
        // The channel first, then the state: a replacement device is
        // installed only after the state says failed (see recovery.rs).
        let local = self.local.get(rec);
        let legs = if rec.local_readable(offset.0, len) {
            let (r, buf) = local.read(offset, buf).await;
            let legs = self.legs.get(&m.legs);
            match r {
                Err(e) if recovery::is_device_error(&e) && !legs.is_empty() => {
                    let why = format!("local read: {e}");
                    recovery::fail_local(m, offset.0, len, &why).await;
                }
                r => return (r, buf),
            }
            return recovery::remote_read(m, &legs, offset, buf).await;
        } else {
            self.legs.get(&m.legs)
        };
        recovery::remote_read(m, &legs, offset, buf).await
    }

    /// The mirrored write to every leg, completing when all are done. With
    /// the local leg failed (`skip_local`) or failing now, the write
    /// succeeds when at least one remote leg took it.
    async fn write_all_legs(
        &self,
        legs: &super::legset::Snapshot<Leg>,
        stamp: Stamp,
        offset: ByteOffset,
        buf: &IoBuf,
        skip_local: bool,
    ) -> Result<(), VolumeError> {
        let m = &self.mirror;
        let len = buf.len() as u64;
        let acked = Cell::new(0usize);
        let mut futs: Vec<LegFuture<'_>> = Vec::with_capacity(1 + legs.len());
        if !skip_local {
            let lb = buf.clone();
            let local = self.local.get(&m.recovery);
            futs.push(Box::pin(
                async move { Some(local.write(offset, lb).await.0) },
            ));
        }
        for (_, leg) in legs.iter() {
            let b = buf.clone();
            let acked = &acked;
            futs.push(Box::pin(async move {
                if m.leg_write(leg, stamp, offset.0, b).await {
                    acked.set(acked.get() + 1);
                }
                None
            }));
        }
        let local = join_all(futs).await.into_iter().flatten().next();
        let local_lost = match &local {
            None => true,
            Some(Err(e)) => recovery::is_device_error(e),
            Some(Ok(())) => false,
        };
        if local_lost && acked.get() == 0 && !legs.is_empty() {
            // No copy took it: wait (bounded) for a leg to be live again and
            // resend, so a link drop while the local device is failed does
            // not reach the host. The overlap lock is still held.
            let deadline = Instant::now() + recovery::REMOTE_RETRY_LIMIT;
            while acked.get() == 0
                && Instant::now() < deadline
                && !m.stopping.load(Ordering::SeqCst)
            {
                sleep(Duration::from_millis(10)).await;
                for (_, leg) in legs.iter() {
                    if leg.state().is_live() && m.leg_write(leg, stamp, offset.0, buf.clone()).await
                    {
                        acked.set(acked.get() + 1);
                    }
                }
            }
        }
        let remote_ok = acked.get() > 0;
        match local {
            Some(Ok(())) => Ok(()),
            Some(Err(e)) if recovery::is_device_error(&e) && !legs.is_empty() => {
                let why = format!("local write: {e}");
                recovery::fail_local(m, offset.0, len, &why).await;
                if remote_ok {
                    Ok(())
                } else {
                    Err(e)
                }
            }
            Some(Err(e)) => Err(e),
            None if remote_ok => Ok(()),
            None => Err(VolumeError::Io(std::io::Error::other(
                "the local device failed and no remote leg took the write",
            ))),
        }
    }

    /// A mirrored write (see the module notes).
    pub async fn write(&self, offset: ByteOffset, buf: IoBuf) -> (Result<(), VolumeError>, IoBuf) {
        let m = &self.mirror;
        let len = buf.len() as u64;
        let guard = m.overlap.lock(offset.0, offset.0 + len);
        guard.ready().await;
        // The ticket counts the write in its epoch until every leg has it
        // (a split waits for its old epoch's tickets).
        let (stamp, ticket) = m.enter_gate();
        // One view of the leg set for the whole write (see legset.rs).
        let legs = self.legs.get(&m.legs);
        if let Err(e) = m.meta.begin_write(offset.0, len).await {
            m.meta.end_write(offset.0, len);
            return (Err(VolumeError::Io(e)), buf);
        }
        // Local leg failed: the write's regions are recorded (durably)
        // before any leg sees it, and it goes to the remote legs only.
        let rec = &m.recovery;
        let skip_local = !rec.local_writable()
            && !legs.is_empty()
            && rec.record_missed_write(offset.0, len).await;
        let ack = if skip_local {
            AckPolicy::Sync
        } else {
            m.cfg.ack
        };
        match ack {
            AckPolicy::Sync => {
                let res = self
                    .write_all_legs(&legs, stamp, offset, &buf, skip_local)
                    .await;
                m.meta.end_write(offset.0, len);
                drop(ticket);
                drop(guard);
                (res, buf)
            }
            AckPolicy::Async => {
                let permit = self.lag.acquire().await;
                let (res, b) = self.local.get(rec).write(offset, buf).await;
                if let Err(e) = res {
                    if recovery::is_device_error(&e) && !legs.is_empty() {
                        // Fall back to a synchronous write to the legs.
                        let why = format!("local write: {e}");
                        recovery::fail_local(m, offset.0, len, &why).await;
                        let res = self.write_all_legs(&legs, stamp, offset, &b, true).await;
                        m.meta.end_write(offset.0, len);
                        drop(guard);
                        return (res, b);
                    }
                    m.meta.end_write(offset.0, len);
                    return (Err(e), b);
                }
                m.lag_ios.fetch_add(1, Ordering::Relaxed);
                m.lag_bytes.fetch_add(len, Ordering::Relaxed);
                let mm = m.clone();
                let data = b.clone();
                spawn(async move {
                    let writes = legs.iter().map(|(_, leg)| {
                        let d = data.clone();
                        let mm = &mm;
                        Box::pin(async move {
                            mm.leg_write(leg, stamp, offset.0, d).await;
                        }) as Pin<Box<dyn Future<Output = ()> + '_>>
                    });
                    join_all(writes.collect()).await;
                    mm.meta.end_write(offset.0, len);
                    mm.lag_ios.fetch_sub(1, Ordering::Relaxed);
                    mm.lag_bytes.fetch_sub(len, Ordering::Relaxed);
                    drop(ticket);
                    drop(guard);
                    drop(permit);
                })
                .detach();
                (Ok(()), b)
            }
        }
    }

    /// A FUA write: the write, then a flush of every leg (so it is durable
    /// on every live leg when it completes, as the host asked).
    pub async fn write_fua(
        &self,
        offset: ByteOffset,
        buf: IoBuf,
    ) -> (Result<(), VolumeError>, IoBuf) {
        let (r, buf) = self.write(offset, buf).await;
        if r.is_err() {
            return (r, buf);
        }
        (self.flush().await, buf)
    }

    /// Flushes the local leg and every live remote leg.
    pub async fn flush(&self) -> Result<(), VolumeError> {
        let m = &self.mirror;
        if m.cfg.ack == AckPolicy::Async {
            // Writes already completed to the host must reach the legs first
            // (each either acknowledges them or has them in its bitmap).
            let t0 = Instant::now();
            while m.lag_ios.load(Ordering::Acquire) > 0 && t0.elapsed() < m.cfg.link_timeout * 2 {
                sleep(Duration::from_millis(1)).await;
            }
        }
        let legs = self.legs.get(&m.legs);
        let rec = &m.recovery;
        let mut futs: Vec<LegFuture<'_>> = Vec::with_capacity(1 + legs.len());
        if rec.local_writable() || legs.is_empty() {
            let local = self.local.get(rec);
            futs.push(Box::pin(async move { Some(local.flush().await) }));
        }
        for (_, leg) in legs.iter() {
            futs.push(Box::pin(async move {
                m.leg_flush(leg).await;
                None
            }));
        }
        let local = join_all(futs).await.into_iter().flatten().next();
        let any_leg = legs.iter().any(|(_, l)| l.state().is_live());
        match local {
            Some(Err(e)) if recovery::is_device_error(&e) && !legs.is_empty() => {
                // What the local device holds is unknown now: rebuild it all.
                recovery::fail_local(m, 0, 0, &format!("local flush: {e}")).await;
                if any_leg {
                    Ok(())
                } else {
                    Err(e)
                }
            }
            Some(r) => r,
            None if any_leg => Ok(()),
            None => Err(VolumeError::Io(std::io::Error::other(
                "the local device failed and no remote leg is live",
            ))),
        }
    }
}

// ---------------------------------------------------------------------------
// Links and the supervisor.

/// Connects one link of leg `idx` on the current core, authenticates, and
/// exchanges generations. With `install`, the link becomes this core's link
/// of the leg (tagged with link generation `gen`).
async fn connect_link(
    m: Arc<Mirror>,
    leg: Arc<Leg>,
    gen: u64,
    install: bool,
) -> Result<(Rc<CoreLink>, GenerationExchange), String> {
    let idx = leg.idx;
    let t = m.cfg.link_timeout;
    let conn = Conn::connect(leg.cfg.address, t)
        .await
        .map_err(|e| format!("connect {}: {e}", leg.cfg.address))?;
    conn.handshake_initiator(m.hs.clone(), t)
        .await
        .map_err(|e| format!("handshake with {}: {e}", leg.cfg.address))?;
    // This side receives only small frames: read them in bulk.
    conn.set_batched();
    let link = Rc::new(CoreLink {
        conn: Rc::new(conn),
        gen,
        replies: ReplySlots::default(),
        // The high half of the tags names the link session (the leg's link
        // generation): the leg fences writes of links of another session
        // once a new session opened (see service::serve_leg).
        tag_base: gen << 32,
        dead: Cell::new(false),
        last_rx: Cell::new(Instant::now()),
    });
    spawn(receive_loop(m.clone(), leg.clone(), link.clone())).detach();
    let ours = m.our_exchange(&leg, GenerationFlags::PRIMARY);
    let theirs = match link
        .request(&Message::GenerationExchange(ours), &[], t)
        .await
    {
        Ok(Reply::Gen(g)) => g,
        Ok(_) => {
            link.kill();
            return Err("unexpected answer to the generation exchange".into());
        }
        Err(e) => {
            link.kill();
            return Err(format!("generation exchange: {e}"));
        }
    };
    if install {
        if leg.removed.load(Ordering::SeqCst) || leg.link_gen.load(Ordering::SeqCst) != gen {
            link.kill();
            return Err("leg removed or link failed while connecting".into());
        }
        spawn(watchdog(m.clone(), leg.clone(), link.clone())).detach();
        let old = LINKS.with(|l| l.borrow_mut().insert((m.uid, idx), link.clone()));
        if let Some(old) = old {
            old.kill();
        }
    }
    Ok((link, theirs))
}

async fn receive_loop(m: Arc<Mirror>, leg: Arc<Leg>, link: Rc<CoreLink>) {
    let idx = leg.idx;
    let reason = loop {
        let f = match link.conn.recv().await {
            Ok(f) => f,
            Err(e) => break format!("receive: {e}"),
        };
        link.last_rx.set(Instant::now());
        let framer = link.conn.framer();
        let (tag, msg) = match f.message(&framer) {
            Ok(x) => x,
            Err(e) => break format!("malformed message from the leg: {e}"),
        };
        let reply = match msg {
            Message::WriteAck(a) => Reply::Write(a.status),
            Message::FlushAck(a) => Reply::Flush(a.status),
            Message::GenerationExchange(g) => Reply::Gen(g),
            Message::RangeDigestResp(r) => Reply::Digest(r.status, r.digests.as_bytes().to_vec()),
            Message::ReadResp(r) => match f.payload() {
                // The payload is the data: hand the chunk over, no copy.
                Some(p) if std::ptr::eq(p.as_ptr(), r.data.as_ptr()) && p.len() == r.data.len() => {
                    Reply::Read(r.status, ReadData::Chunk(p.clone()))
                }
                _ => Reply::Read(r.status, ReadData::Bytes(r.data.to_vec())),
            },
            Message::HeartbeatAck(_) => continue,
            Message::Error(e) => break format!("leg refused: {:?}: {}", e.code, e.text),
            other => break format!("unexpected {:?} from the leg", other.msg_type()),
        };
        // An answer of another session, or for no waiting request (its id
        // stale, duplicate or unknown), is dropped: nobody waits for it.
        let id = tag.0 as u32;
        let res = if tag.0 & !0xffff_ffff == link.tag_base {
            link.replies.complete(id, reply)
        } else {
            Err(ReplyError::Unknown(id))
        };
        if let Err(e) = res {
            tracing::debug!(
                mirror = m.name,
                leg = idx,
                "answer from the leg dropped: {e}"
            );
        }
    };
    if link.kill() {
        LINKS.with(|l| {
            let mut l = l.borrow_mut();
            if l.get(&(m.uid, idx)).is_some_and(|c| Rc::ptr_eq(c, &link)) {
                l.remove(&(m.uid, idx));
            }
        });
        m.leg_failed(&leg, link.gen, &reason);
    }
}

async fn watchdog(m: Arc<Mirror>, leg: Arc<Leg>, link: Rc<CoreLink>) {
    let idx = leg.idx;
    let t = m.cfg.link_timeout;
    let beat = (t / 4).clamp(Duration::from_millis(50), Duration::from_secs(1));
    let mut counter = 0u64;
    loop {
        sleep(beat).await;
        if link.dead.get() {
            return;
        }
        if link.last_rx.get().elapsed() > t {
            if link.kill() {
                LINKS.with(|l| {
                    let mut l = l.borrow_mut();
                    if l.get(&(m.uid, idx)).is_some_and(|c| Rc::ptr_eq(c, &link)) {
                        l.remove(&(m.uid, idx));
                    }
                });
                m.leg_failed(&leg, link.gen, &format!("no answer for {t:?} (heartbeat)"));
            }
            return;
        }
        counter += 1;
        let l = link.clone();
        spawn(async move {
            let hb = Message::Heartbeat(Heartbeat {
                counter,
                sent: Timestamp(now_ns()),
            });
            let _ = timeout(Duration::from_secs(5), l.conn.send(RequestTag(0), &hb, &[])).await;
        })
        .detach();
    }
}

fn gen_str(g: u64) -> String {
    format!("{g:016x}")
}

/// Decides what a connect means, from both sides' generations.
fn plan(m: &Mirror, leg: &Leg, theirs: &GenerationExchange) -> Result<Plan, String> {
    let idx = leg.idx;
    let g = m.meta.generations();
    if theirs.flags.0 & (GenerationFlags::PRIMARY.0 | GenerationFlags::CRASHED_PRIMARY.0) != 0
        || theirs.bitmap.0 != 0
    {
        return Err(format!(
            "split brain: the leg at {} has been written as a primary (generation {}, bitmap {}); refusing to resync, the operator must choose which data survives",
            leg.cfg.site,
            gen_str(theirs.current.0),
            gen_str(theirs.bitmap.0)
        ));
    }
    let r = theirs.current.0;
    if r == g.current || (r != 0 && r == g.leg_bitmap[idx]) {
        // Same data generation, or the generation our bitmap for this leg
        // is relative to (after an operator chose to overwrite the leg).
        return Ok(Plan::Incremental);
    }
    if r == 0 {
        // A blank (or never fully synced) leg: our bitmap is relative to
        // nothing unless we never completed a sync to it.
        return Ok(if g.leg_bitmap[idx] == 0 {
            Plan::Incremental
        } else {
            Plan::Full
        });
    }
    Err(format!(
        "unrelated data: the leg at {} holds generation {}, ours is {} (history {}, {}); refusing to mix them, the operator must choose",
        leg.cfg.site,
        gen_str(r),
        gen_str(g.current),
        gen_str(g.history[0]),
        gen_str(g.history[1])
    ))
}

/// One leg's life: connect, resync, stay synced; start over on failure.
async fn supervise(m: Arc<Mirror>, leg: Arc<Leg>) {
    supervise_leg(&m, &leg).await;
    leg.sup_done.store(true, Ordering::SeqCst);
}

async fn supervise_leg(m: &Arc<Mirror>, leg: &Arc<Leg>) {
    let idx = leg.idx;
    let mut backoff = Duration::from_millis(100);
    let mut logged_down = false;
    while !m.stopping.load(Ordering::SeqCst) && !leg.removed.load(Ordering::SeqCst) {
        match leg.state() {
            LegState::Failed | LegState::Split => {
                sleep(Duration::from_millis(200)).await;
                continue;
            }
            LegState::Synced => {
                sleep(Duration::from_millis(50)).await;
                continue;
            }
            LegState::Degraded | LegState::Syncing => {}
        }
        let gen = leg.link_gen.load(Ordering::SeqCst);
        match bring_up(m, leg, gen).await {
            Ok(()) => {
                backoff = Duration::from_millis(100);
                logged_down = false;
            }
            Err(BringUp::Refused(reason)) => {
                tracing::error!(mirror = m.name, leg = idx, "mirror leg refused: {reason}");
                *leg.last_error.lock().unwrap_or_else(|p| p.into_inner()) = reason;
                leg.state.store(LegState::Failed as u8, Ordering::SeqCst);
                leg.link_gen.fetch_add(1, Ordering::SeqCst);
            }
            Err(BringUp::Retry(reason)) => {
                if !logged_down {
                    tracing::info!(
                        mirror = m.name,
                        leg = idx,
                        "mirror leg not reachable yet: {reason}"
                    );
                    logged_down = true;
                }
                *leg.last_error.lock().unwrap_or_else(|p| p.into_inner()) = reason;
                if leg.state() == LegState::Syncing {
                    m.leg_failed(
                        leg,
                        leg.link_gen.load(Ordering::SeqCst),
                        "resync interrupted",
                    );
                }
                sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(1));
            }
        }
    }
}

enum BringUp {
    Retry(String),
    Refused(String),
}

async fn bring_up(m: &Arc<Mirror>, leg: &Arc<Leg>, gen: u64) -> Result<(), BringUp> {
    let idx = leg.idx;
    // Probe: decide before any core sends a write.
    let (probe, theirs) = connect_link(m.clone(), leg.clone(), gen, false)
        .await
        .map_err(BringUp::Retry)?;
    probe.kill();
    leg.remote_gen.store(theirs.current.0, Ordering::Relaxed);
    match plan(m, leg, &theirs).map_err(BringUp::Refused)? {
        Plan::Incremental => {}
        Plan::Full => {
            tracing::warn!(
                mirror = m.name,
                leg = idx,
                "leg came back blank: full resync"
            );
            m.meta.set_all_dirty(idx);
        }
    }
    // One link per core.
    let mut waits = Vec::new();
    for r in &m.reactors {
        let (mm, lg) = (m.clone(), leg.clone());
        waits.push(
            r.spawn(move || async move { connect_link(mm, lg, gen, true).await.map(|_| ()) }),
        );
    }
    for w in waits {
        match w.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(BringUp::Retry(e)),
            Err(_) => return Err(BringUp::Retry("reactor stopped".into())),
        }
    }
    if leg
        .state
        .compare_exchange(
            LegState::Degraded as u8,
            LegState::Syncing as u8,
            Ordering::SeqCst,
            Ordering::SeqCst,
        )
        .is_err()
        || leg.link_gen.load(Ordering::SeqCst) != gen
    {
        return Err(BringUp::Retry("link failed while connecting".into()));
    }
    // Writes that saw the leg down have set their bits once this drains.
    while leg.degraded_inflight.load(Ordering::SeqCst) != 0 {
        mirrorpoint_poller::yield_now().await;
    }
    tracing::info!(
        mirror = m.name,
        leg = idx,
        dirty_regions = m.meta.dirty_regions(idx),
        "mirror leg connected, resyncing"
    );
    resync(m, leg, gen).await.map_err(BringUp::Retry)?;
    // Leg now holds our data: make it durable there and adopt our generation.
    let link = m
        .core_link(leg)
        .ok_or_else(|| BringUp::Retry("link lost".into()))?;
    let stamp = m.gate().peek();
    match link
        .request(
            &Message::Flush(Flush {
                mirror: m.id,
                seq: SeqNo(stamp.seq),
                epoch: Epoch(stamp.epoch),
            }),
            &[],
            m.cfg.link_timeout,
        )
        .await
    {
        Ok(Reply::Flush(Status::Ok)) => {}
        _ => return Err(BringUp::Retry("flush after resync failed".into())),
    }
    let adopt = m.our_exchange(
        leg,
        GenerationFlags(GenerationFlags::PRIMARY.0 | GenerationFlags::UP_TO_DATE.0),
    );
    match link
        .request(&Message::GenerationExchange(adopt), &[], m.cfg.link_timeout)
        .await
    {
        Ok(Reply::Gen(g)) if g.current == adopt.current => {
            leg.remote_gen.store(g.current.0, Ordering::Relaxed);
        }
        _ => return Err(BringUp::Retry("leg did not adopt our generation".into())),
    }
    let cur = adopt.current.0;
    m.meta.update_generations(|g| g.leg_bitmap[idx] = cur);
    m.meta
        .commit()
        .await
        .map_err(|e| BringUp::Retry(format!("metadata: {e}")))?;
    if m.meta.dirty_regions(idx) != 0 {
        return Err(BringUp::Retry("regions got dirty during resync".into()));
    }
    if leg
        .state
        .compare_exchange(
            LegState::Syncing as u8,
            LegState::Synced as u8,
            Ordering::SeqCst,
            Ordering::SeqCst,
        )
        .is_ok()
    {
        *leg.last_error.lock().unwrap_or_else(|p| p.into_inner()) = String::new();
        tracing::info!(mirror = m.name, leg = idx, "mirror leg synced");
    }
    Ok(())
}

/// An Error message for refusing a peer.
pub fn error_msg(code: ErrorCode, text: String) -> Message<'static> {
    Message::Error(ErrorMsg { code, text })
}

// ---------------------------------------------------------------------------
// What the consistency check and repair (verify.rs) use of the engine.

impl Mirror {
    pub(super) fn overlap(&self) -> &Arc<OverlapDetector> {
        &self.overlap
    }

    pub(super) fn verify_state(&self) -> &super::verify::VerifyState {
        &self.verify
    }

    /// Slots up to the highest one in use (legs are added and removed
    /// online: a slot below it may be empty, and reports `Failed`).
    pub(super) fn leg_count(&self) -> usize {
        self.legs
            .snapshot()
            .iter()
            .map(|(i, _)| i + 1)
            .max()
            .unwrap_or(0)
    }

    pub(super) fn leg_exists(&self, idx: usize) -> bool {
        self.legs.get(idx).is_some()
    }

    pub(super) fn leg_state(&self, idx: usize) -> LegState {
        self.legs.get(idx).map_or(LegState::Failed, |l| l.state())
    }

    pub(super) fn leg_link_gen(&self, idx: usize) -> u64 {
        self.legs
            .get(idx)
            .map_or(0, |l| l.link_gen.load(Ordering::SeqCst))
    }

    pub(super) fn is_stopping(&self) -> bool {
        self.stopping.load(Ordering::SeqCst)
    }

    pub(super) fn first_reactor(&self) -> Option<&ReactorHandle> {
        self.reactors.first()
    }

    pub(super) fn peek_stamp(&self) -> Stamp {
        self.gate().peek()
    }

    /// Records `offset..offset+len` in leg `idx`'s dirty bitmap (a resync
    /// pass copies it once the leg is connected).
    pub(super) fn mark_leg_dirty(&self, idx: usize, offset: u64, len: u64) {
        if self.legs.get(idx).is_some() {
            self.mark_dirty(idx, offset, len);
        }
    }

    /// One request to leg `idx` on this core's link. A failure drops the
    /// link and degrades the leg, as for a write.
    pub(super) async fn leg_request(
        &self,
        idx: usize,
        msg: &Message<'_>,
        payload: &[IoBuf],
    ) -> Result<Reply, String> {
        let leg = self.legs.get(idx).ok_or_else(|| format!("no leg {idx}"))?;
        let link = self
            .core_link(&leg)
            .ok_or_else(|| format!("leg {idx}: no link on this core"))?;
        match link.request(msg, payload, self.cfg.link_timeout).await {
            Ok(r) => Ok(r),
            Err(e) => {
                let e = format!("{:?}: {e}", msg.msg_type());
                if link.kill() {
                    LINKS.with(|l| {
                        let mut l = l.borrow_mut();
                        if l.get(&(self.uid, idx))
                            .is_some_and(|c| Rc::ptr_eq(c, &link))
                        {
                            l.remove(&(self.uid, idx));
                        }
                    });
                }
                self.leg_failed(&leg, link.gen, &e);
                Err(e)
            }
        }
    }
}
