//! Split, rejoin and promote: the primary's orchestration (RPCs, records,
//! recovery after a crash), the hosted site's side (`SplitCtl`), and the
//! split image volume. The reasoning is in the parent module's notes.

use std::io::Write as _;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use mirrorpoint_poller::{oneshot, IoBuf, IoBufMut};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::super::engine::{Leg, LegState, Mirror};
use super::super::sequencer::Stamp;
use super::super::service::{self, err, lock, SvcError};
use super::super::wire::{
    Epoch, LegId, Message, MirrorId, SeqNo, SplitCtl, SplitCtlResp, SplitOp, Status,
};
use super::{SplitInfo, SplitPhase};
use crate::daemon::DaemonState;
use crate::units::ByteOffset;
use crate::volume::{random_uuid, Backend, Volume, VolumeChannel, VolumeError};

/// Why a split of the write stream failed.
#[derive(Debug, thiserror::Error)]
pub enum SplitError {
    /// No such leg.
    #[error("the mirror has no leg {0}")]
    NoLeg(usize),
    /// Only a synced leg holds a consistent image.
    #[error("leg {leg} is {state:?}: only a synced leg can be split")]
    NotSynced {
        /// Leg.
        leg: usize,
        /// Its state.
        state: LegState,
    },
    /// Another split of the same sequencer is still draining.
    #[error("another split of this mirror (or its group) is in progress")]
    Busy,
    /// The leg failed while the old epoch drained: no consistent image.
    #[error("leg {0} failed while the split drained; the split was rolled back")]
    LegFailed(usize),
    /// A group split over mirrors that do not share a sequencer.
    #[error("the mirrors of a group split do not share one sequencer")]
    NotGrouped,
    /// Old-epoch writes did not finish in time.
    #[error("old-epoch writes still in flight after {0:?}; the split was rolled back")]
    Timeout(Duration),
}

/// Splits the write stream for the legs `targets` (mirror, leg) of mirrors
/// sharing one sequencer at one point, waits until every old-epoch write
/// has completed on them, flushes them (on `reactor`) and marks them
/// `Split`. Blocking (an RPC thread): the wait for the old epoch spins
/// here, not on a reactor, so the data path is not slowed by it. Returns
/// the split point and how long the old epoch took to drain.
pub fn split_stream(
    reactor: &mirrorpoint_poller::ReactorHandle,
    targets: &[(Arc<Mirror>, usize)],
) -> Result<(Stamp, Duration), SplitError> {
    let Some((first, _)) = targets.first() else {
        return Err(SplitError::NoLeg(0));
    };
    let gate = first.gate().clone();
    // The legs, resolved once (legs can be added and removed online; a
    // split works on the leg that was in the slot when it began).
    let mut legs: Vec<(Arc<Mirror>, Arc<Leg>, u64)> = Vec::new();
    for (m, idx) in targets {
        if !Arc::ptr_eq(m.gate(), &gate) {
            return Err(SplitError::NotGrouped);
        }
        let leg = m.leg(*idx).ok_or(SplitError::NoLeg(*idx))?;
        let state = leg.state();
        if state != LegState::Synced || leg.split.active() {
            return Err(SplitError::NotSynced { leg: *idx, state });
        }
        let gen = leg.link_gen.load(Ordering::SeqCst);
        legs.push((m.clone(), leg, gen));
    }
    let permit = gate.try_begin().ok_or(SplitError::Busy)?;
    let t0 = Instant::now();
    let at = gate.split(&permit, |e| {
        for (_, leg, _) in &legs {
            leg.split.set_from(e);
        }
    });
    let old = at.epoch.wrapping_sub(1);
    let limit = first.cfg.link_timeout * 2;
    let mut spins = 0u32;
    while gate.inflight(old) != 0 {
        if t0.elapsed() > limit {
            rollback(&legs);
            return Err(SplitError::Timeout(limit));
        }
        spins += 1;
        if spins < 200 {
            std::hint::spin_loop();
        } else {
            std::thread::sleep(Duration::from_micros(20));
        }
    }
    let drained = t0.elapsed();
    drop(permit);
    // The image must be durable on the leg before it is handed out.
    let l2: Vec<(Arc<Mirror>, Arc<Leg>)> = legs
        .iter()
        .map(|(m, l, _)| (m.clone(), l.clone()))
        .collect();
    let flushed = reactor.block_on(move || async move {
        for (m, leg) in &l2 {
            m.leg_flush(leg).await;
        }
    });
    if flushed.is_err() {
        rollback(&legs);
        return Err(SplitError::LegFailed(targets[0].1));
    }
    for ((_, leg, gen), (_, idx)) in legs.iter().zip(targets) {
        if leg.link_gen.load(Ordering::SeqCst) != *gen {
            rollback(&legs);
            return Err(SplitError::LegFailed(*idx));
        }
    }
    for (i, ((_, leg, _), (_, idx))) in legs.iter().zip(targets).enumerate() {
        if leg
            .state
            .compare_exchange(
                LegState::Synced as u8,
                LegState::Split as u8,
                Ordering::SeqCst,
                Ordering::SeqCst,
            )
            .is_err()
        {
            // Failed at the last moment: undo the ones already switched.
            for (_, l2, _) in &legs[..i] {
                let _ = l2.state.compare_exchange(
                    LegState::Split as u8,
                    LegState::Degraded as u8,
                    Ordering::SeqCst,
                    Ordering::SeqCst,
                );
            }
            rollback(&legs);
            return Err(SplitError::LegFailed(*idx));
        }
    }
    Ok((at, drained))
}

fn rollback(legs: &[(Arc<Mirror>, Arc<Leg>, u64)]) {
    for (m, leg, _) in legs {
        // Writes that skipped the leg set its bits; the leg goes through a
        // resync (the supervisor picks up a degraded leg).
        leg.split.clear();
        if leg.state() == LegState::Synced {
            m.leg_failed(
                leg,
                leg.link_gen.load(Ordering::SeqCst),
                "split rolled back",
            );
        }
    }
}

// ---------------------------------------------------------------------------
// The primary's RPCs.

/// `mirror_split` parameters.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SplitParams {
    /// Mirror (or give `group`).
    #[serde(default)]
    pub name: Option<String>,
    /// Consistency group: every member splits at the same point.
    #[serde(default)]
    pub group: Option<String>,
    /// Leg index (default 0).
    #[serde(default)]
    pub leg: usize,
    /// Name of the image volume on the leg's site (a group split appends
    /// `_<mirror>`).
    pub image_name: String,
    /// The image takes writes (a clone); default read-only.
    #[serde(default)]
    pub writable: bool,
}

/// `mirror_rejoin` parameters.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RejoinParams {
    /// Mirror.
    pub name: String,
    /// Leg index (default 0).
    #[serde(default)]
    pub leg: usize,
    /// Only `"to_leg"` (the primary's data wins; the default).
    #[serde(default)]
    pub direction: Option<String>,
}

/// `mirror_split_promote` parameters.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PromoteParams {
    /// Mirror.
    pub name: String,
    /// Leg index (default 0).
    #[serde(default)]
    pub leg: usize,
}

fn find_mirror(state: &DaemonState, name: &str) -> Result<Arc<Mirror>, SvcError> {
    state
        .mirror
        .mirrors()
        .into_iter()
        .find(|m| m.name() == name)
        .ok_or_else(|| err(libc::ENODEV, format!("no mirror named '{name}'")))
}

fn set_record_split(
    state: &DaemonState,
    name: &str,
    leg: usize,
    info: Option<SplitInfo>,
) -> Result<(), SvcError> {
    service::update_record(state, name, |r| {
        if let Some(l) = r.legs.get_mut(leg) {
            l.split = info.clone();
        }
    })
}

fn check_image_name(name: &str) -> Result<(), SvcError> {
    if name.is_empty()
        || name.len() > 200
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
    {
        return Err(err(
            libc::EINVAL,
            format!("image_name '{name}': 1 to 200 characters of [A-Za-z0-9_.-]"),
        ));
    }
    Ok(())
}

fn ctl(
    state: &DaemonState,
    m: &Mirror,
    leg: usize,
    op: SplitOp,
    info: &SplitInfo,
) -> Result<SplitCtlResp, String> {
    let site = state.mirror.site().ok_or("site not configured")?;
    let addr = m.leg(leg).ok_or("no such leg")?.config().address;
    let leg_id = m.leg(leg).ok_or("no such leg")?.config().leg_id;
    let msg = Message::SplitCtl(SplitCtl {
        mirror: m.id(),
        leg: LegId(leg_id),
        op,
        writable: info.writable,
        epoch: Epoch(info.epoch),
        seq: SeqNo(info.sequence),
        region_size: u32::try_from(m.meta().region_size()).unwrap_or(u32::MAX),
        name: info.image.clone(),
    });
    let replies = service::agent_call(&site, addr, &msg, 1)?;
    match replies.into_iter().next() {
        Some(Message::SplitCtlResp(r)) if r.status == Status::Ok => Ok(r),
        Some(Message::SplitCtlResp(r)) => Err(format!("the leg's site answered {:?}", r.status)),
        _ => Err("the leg's site gave no split answer".into()),
    }
}

/// `mirror_split`.
pub fn split(state: &Arc<DaemonState>, p: SplitParams) -> Result<Value, SvcError> {
    check_image_name(&p.image_name)?;
    let members: Vec<Arc<Mirror>> = match (&p.name, &p.group) {
        (Some(n), None) => vec![find_mirror(state, n)?],
        (None, Some(g)) => super::super::group::members(state, g)?,
        _ => {
            return Err(err(
                libc::EINVAL,
                "give either `name` (a mirror) or `group` (a consistency group)",
            ))
        }
    };
    let group = p.group.is_some();
    let mut infos = Vec::new();
    for m in &members {
        if p.leg >= m.leg_count() {
            return Err(err(
                libc::EINVAL,
                format!("leg: mirror '{}' has no leg {}", m.name(), p.leg),
            ));
        }
        let image = if group {
            format!("{}_{}", p.image_name, m.name())
        } else {
            p.image_name.clone()
        };
        infos.push(SplitInfo {
            phase: SplitPhase::Pending,
            epoch: 0,
            sequence: 0,
            image,
            writable: p.writable,
        });
    }
    // Pending first: a crash from here on rolls the split back at restart.
    for (m, info) in members.iter().zip(&infos) {
        set_record_split(state, m.name(), p.leg, Some(info.clone()))?;
    }
    let targets: Vec<(Arc<Mirror>, usize)> = members.iter().map(|m| (m.clone(), p.leg)).collect();
    let reactor = state
        .reactors
        .first()
        .ok_or_else(|| err(libc::ENODEV, "no reactor"))?;
    let (at, drained) = match split_stream(reactor, &targets) {
        Ok(x) => x,
        Err(e) => {
            for m in &members {
                let _ = set_record_split(state, m.name(), p.leg, None);
            }
            return Err(err(libc::EBUSY, e.to_string()));
        }
    };
    let mut images = Vec::new();
    for (m, info) in members.iter().zip(infos.iter_mut()) {
        info.epoch = at.epoch;
        info.sequence = at.seq;
        m.set_split_info(p.leg, Some(info.clone()));
        if let Err(e) = ctl(state, m, p.leg, SplitOp::Freeze, info) {
            // The leg's site did not freeze: roll every member back.
            tracing::warn!(
                mirror = m.name(),
                "split: freeze on the leg's site failed: {e}"
            );
            for m2 in &members {
                if let Err(e2) = rejoin_leg(state, m2, p.leg) {
                    tracing::warn!(
                        mirror = m2.name(),
                        "split rollback: {}; retrying in the background",
                        e2.message
                    );
                    recover(state, m2);
                }
            }
            return Err(err(
                libc::EIO,
                format!("freezing the leg of '{}': {e}", m.name()),
            ));
        }
        info.phase = SplitPhase::Split;
        set_record_split(state, m.name(), p.leg, Some(info.clone()))?;
        m.set_split_info(p.leg, Some(info.clone()));
        images.push(json!({"mirror": m.name(), "image": info.image, "site": m.leg(p.leg).map(|l| l.config().site.clone())}));
    }
    tracing::info!(
        epoch = at.epoch,
        seq = at.seq,
        drained_us = drained.as_micros() as u64,
        "mirror split"
    );
    Ok(json!({
        "epoch": at.epoch,
        "sequence": at.seq,
        "image": if group { Value::Null } else { images[0]["image"].clone() },
        "images": images,
        "split_point_us": drained.as_micros() as u64,
    }))
}

/// Merges the image back: its written regions join the leg's bitmap, the
/// leg's site drops the image, the leg resyncs. Idempotent (restart
/// recovery runs it for `pending` and `rejoining` splits).
fn rejoin_leg(state: &DaemonState, m: &Arc<Mirror>, leg: usize) -> Result<u64, SvcError> {
    let mut info = m.split_info(leg).ok_or_else(|| {
        err(
            libc::EINVAL,
            format!("leg {leg} of '{}' is not split", m.name()),
        )
    })?;
    if info.phase == SplitPhase::Promoted {
        return Err(err(
            libc::EINVAL,
            format!("leg {leg} of '{}' was promoted; it cannot rejoin", m.name()),
        ));
    }
    info.phase = SplitPhase::Rejoining;
    set_record_split(state, m.name(), leg, Some(info.clone()))?;
    m.set_split_info(leg, Some(info.clone()));
    let q = ctl(state, m, leg, SplitOp::Query, &info).map_err(|e| err(libc::EIO, e))?;
    let rs = m.meta().region_size();
    if !q.bitmap.is_empty() && u64::from(q.region_size) != rs {
        return Err(err(
            libc::EIO,
            format!(
                "the image's bitmap has {} B regions, the mirror {rs} B",
                q.region_size
            ),
        ));
    }
    let regions = m.local().size().0.div_ceil(rs);
    let mut from_image = 0u64;
    for (i, byte) in q.bitmap.iter().enumerate() {
        for b in 0..8u64 {
            let r = i as u64 * 8 + b;
            if byte & (1 << b) != 0 && r < regions {
                m.meta().set_dirty(leg, r);
                from_image += 1;
            }
        }
    }
    m.meta()
        .commit_blocking()
        .map_err(|e| err(libc::EIO, format!("metadata: {e}")))?;
    ctl(state, m, leg, SplitOp::End, &info).map_err(|e| err(libc::EIO, e))?;
    let dirty = m.meta().dirty_regions(leg);
    m.end_split(leg);
    set_record_split(state, m.name(), leg, None)?;
    tracing::info!(
        mirror = m.name(),
        leg,
        regions = dirty,
        from_image,
        "split leg rejoined; resyncing the changed regions"
    );
    Ok(dirty)
}

/// `mirror_rejoin`.
pub fn rejoin(state: &Arc<DaemonState>, p: RejoinParams) -> Result<Value, SvcError> {
    match p.direction.as_deref() {
        None | Some("to_leg") => {}
        Some(x) => {
            return Err(err(
                libc::EINVAL,
                format!(
                    "direction must be \"to_leg\", not \"{x}\" (image to primary is not supported)"
                ),
            ))
        }
    }
    let m = find_mirror(state, &p.name)?;
    if p.leg >= m.leg_count() {
        return Err(err(libc::EINVAL, format!("leg: no leg {}", p.leg)));
    }
    let regions = rejoin_leg(state, &m, p.leg)?;
    Ok(json!({"regions": regions, "bytes": regions * m.meta().region_size()}))
}

/// `mirror_split_promote`.
pub fn promote(state: &Arc<DaemonState>, p: PromoteParams) -> Result<Value, SvcError> {
    let m = find_mirror(state, &p.name)?;
    if p.leg >= m.leg_count() {
        return Err(err(libc::EINVAL, format!("leg: no leg {}", p.leg)));
    }
    let mut info = m
        .split_info(p.leg)
        .filter(|i| matches!(i.phase, SplitPhase::Split | SplitPhase::Promoted))
        .ok_or_else(|| err(libc::EINVAL, format!("leg {} is not split", p.leg)))?;
    ctl(state, &m, p.leg, SplitOp::Promote, &info).map_err(|e| err(libc::EIO, e))?;
    info.phase = SplitPhase::Promoted;
    set_record_split(state, m.name(), p.leg, Some(info.clone()))?;
    m.set_split_info(p.leg, Some(info.clone()));
    Ok(json!({"image": info.image, "site": m.leg(p.leg).map(|l| l.config().site.clone())}))
}

/// After a restart: finishes interrupted rejoins and rolls back interrupted
/// splits, in the background (the leg's site may be down for a while).
pub fn recover(state: &Arc<DaemonState>, m: &Arc<Mirror>) {
    for leg in 0..m.leg_count() {
        let Some(info) = m.split_info(leg) else {
            continue;
        };
        if !matches!(info.phase, SplitPhase::Pending | SplitPhase::Rejoining) {
            continue;
        }
        let (st, mm) = (state.clone(), m.clone());
        let _ = std::thread::Builder::new()
            .name("split-recover".into())
            .spawn(move || {
                let mut wait = Duration::from_millis(100);
                while !st.mirror.stopping() {
                    match rejoin_leg(&st, &mm, leg) {
                        Ok(n) => {
                            tracing::info!(
                                mirror = mm.name(),
                                leg,
                                regions = n,
                                "interrupted split/rejoin finished after restart"
                            );
                            return;
                        }
                        Err(e) => {
                            tracing::info!(
                                mirror = mm.name(),
                                leg,
                                "split recovery: {}",
                                e.message
                            );
                            std::thread::sleep(wait);
                            wait = (wait * 2).min(Duration::from_secs(1));
                        }
                    }
                }
            });
    }
}

// ---------------------------------------------------------------------------
// The site hosting the leg.

/// A hosted leg's split, persisted with its allocation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostedSplit {
    /// First epoch after the split.
    pub epoch: u32,
    /// First sequence number after the split.
    pub sequence: u64,
    /// Image volume name.
    pub image: String,
    /// The image takes writes.
    pub writable: bool,
    /// Region size of the image's written-regions bitmap.
    pub region_size: u64,
    /// Detached from the mirror.
    #[serde(default)]
    pub promoted: bool,
}

fn bits_path(state: &DaemonState, mirror: u64, leg: u32) -> PathBuf {
    state
        .options
        .data_dir
        .join(format!("split-{mirror:016x}-{leg}.bits"))
}

/// Answers a primary's `SplitCtl` (agent thread; blocking I/O allowed).
pub fn hosted_ctl(state: &Arc<DaemonState>, c: &SplitCtl) -> Message<'static> {
    let mirror = c.mirror.0;
    let leg = c.leg.0;
    let resp = |status: Status, region_size: u32, bitmap: Vec<u8>| {
        Message::SplitCtlResp(SplitCtlResp {
            mirror: MirrorId(mirror),
            status,
            region_size,
            bitmap,
        })
    };
    let current = service::hosted_split(state, mirror, leg);
    let current = match current {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(mirror, "split request for a leg not hosted here: {e}");
            return resp(Status::NotFound, 0, Vec::new());
        }
    };
    match c.op {
        SplitOp::Freeze => {
            if let Some(cur) = &current {
                // A repeated freeze of the same split is answered again.
                return if cur.epoch == c.epoch.0 && cur.image == c.name {
                    resp(Status::Ok, 0, Vec::new())
                } else {
                    resp(Status::Busy, 0, Vec::new())
                };
            }
            if state.volumes.get(&c.name).is_some() {
                tracing::warn!(mirror, "split image name '{}' is taken", c.name);
                return resp(Status::InvalidRequest, 0, Vec::new());
            }
            let hs = HostedSplit {
                epoch: c.epoch.0,
                sequence: c.seq.0,
                image: c.name.clone(),
                writable: c.writable,
                region_size: u64::from(c.region_size),
                promoted: false,
            };
            // Fence the primary's links first, then persist, then expose.
            if let Err(e) = service::set_hosted_split(state, mirror, leg, Some(hs.clone())) {
                tracing::error!(mirror, "persisting the split: {e}");
                return resp(Status::IoError, 0, Vec::new());
            }
            match expose(state, mirror, leg, &hs) {
                Ok(()) => {
                    tracing::info!(
                        mirror,
                        image = hs.image,
                        epoch = hs.epoch,
                        seq = hs.sequence,
                        writable = hs.writable,
                        "leg split: image exposed"
                    );
                    resp(Status::Ok, 0, Vec::new())
                }
                Err(e) => {
                    tracing::error!(mirror, "exposing the split image: {e}");
                    let _ = service::set_hosted_split(state, mirror, leg, None);
                    resp(Status::IoError, 0, Vec::new())
                }
            }
        }
        SplitOp::Query => {
            let Some(cur) = current else {
                return resp(Status::Ok, c.region_size, Vec::new());
            };
            if cur.promoted {
                return resp(Status::InvalidRequest, 0, Vec::new());
            }
            let bitmap = match image_of(state, &cur.image) {
                Some(img) => img.stop_writes(),
                // Not exposed (e.g. restart before its servers came back):
                // what is on disk is final.
                None => ImageBits::load(&bits_path(state, mirror, leg)).unwrap_or_default(),
            };
            resp(
                Status::Ok,
                u32::try_from(cur.region_size).unwrap_or(u32::MAX),
                bitmap,
            )
        }
        SplitOp::End => {
            let Some(cur) = current else {
                return resp(Status::Ok, 0, Vec::new());
            };
            if cur.promoted {
                return resp(Status::InvalidRequest, 0, Vec::new());
            }
            drop_image(state, mirror, leg, &cur.image);
            if let Err(e) = service::set_hosted_split(state, mirror, leg, None) {
                tracing::error!(mirror, "ending the split: {e}");
                return resp(Status::IoError, 0, Vec::new());
            }
            let _ = std::fs::remove_file(bits_path(state, mirror, leg));
            tracing::info!(
                mirror,
                image = cur.image,
                "split ended: the leg takes the primary's writes again"
            );
            resp(Status::Ok, 0, Vec::new())
        }
        SplitOp::Promote => {
            let Some(mut cur) = current else {
                return resp(Status::InvalidRequest, 0, Vec::new());
            };
            cur.promoted = true;
            cur.writable = true;
            if let Err(e) = service::set_hosted_split(state, mirror, leg, Some(cur.clone())) {
                tracing::error!(mirror, "promoting: {e}");
                return resp(Status::IoError, 0, Vec::new());
            }
            if let Some(img) = image_of(state, &cur.image) {
                img.promote();
            }
            let _ = std::fs::remove_file(bits_path(state, mirror, leg));
            tracing::info!(
                mirror,
                image = cur.image,
                "split image promoted to an independent volume"
            );
            resp(Status::Ok, 0, Vec::new())
        }
    }
}

/// Who claims a split image in the volume registry (so `bdev_delete` and
/// other owners keep off it while it belongs to the split).
fn image_owner(mirror: u64, leg: u32) -> String {
    format!("split of mirror {mirror:016x} leg {leg}")
}

/// Drops a split image from the volume registry.
pub fn drop_image(state: &DaemonState, mirror: u64, leg: u32, image: &str) {
    if let Some(img) = image_of(state, image) {
        img.stop_writes();
    }
    state.volumes.release(image, &image_owner(mirror, leg));
    let _ = state.volumes.delete(image);
}

fn image_of(state: &DaemonState, name: &str) -> Option<Arc<SplitImage>> {
    let v = state.volumes.get(name)?;
    v.split_image().cloned()
}

/// Registers the image volume of a split hosted leg (after a freeze, and at
/// start-up once the leg's storage servers are configured).
pub fn expose(state: &DaemonState, mirror: u64, leg: u32, hs: &HostedSplit) -> Result<(), String> {
    if state.volumes.get(&hs.image).is_some() {
        return Ok(());
    }
    let pieces = service::hosted_pieces(state, mirror, leg)?;
    let first = pieces.first().ok_or("the leg has no extents")?;
    let bs = first.2.block_size();
    let size: u64 = pieces.iter().map(|p| p.1).sum();
    let bits = if hs.writable && !hs.promoted {
        let path = bits_path(state, mirror, leg);
        let regions = size.div_ceil(hs.region_size.max(1));
        Some(ImageBits::open(path, hs.region_size, regions).map_err(|e| e.to_string())?)
    } else {
        None
    };
    let img = Arc::new(SplitImage {
        mirror,
        pieces: pieces
            .into_iter()
            .map(|(logical, len, volume, offset)| ImagePiece {
                logical,
                len,
                volume,
                offset,
            })
            .collect(),
        writable: AtomicBool::new(hs.writable || hs.promoted),
        stopped: AtomicBool::new(false),
        inflight: AtomicU64::new(0),
        bits,
    });
    let vol = Volume::new(
        hs.image.clone(),
        random_uuid(),
        bs,
        size / u64::from(bs.bytes()),
        Backend::SplitImage(img),
    );
    state.volumes.register(vol).map_err(|e| e.to_string())?;
    state
        .volumes
        .claim(&hs.image, &image_owner(mirror, leg))
        .map(|_| ())
        .map_err(|e| e.to_string())
}

// ---------------------------------------------------------------------------
// The image volume.

struct ImagePiece {
    logical: u64,
    len: u64,
    volume: Arc<Volume>,
    offset: u64,
}

/// A split leg's frozen data as a volume: the allocation's extents, read
/// only, or a writable clone whose written regions are tracked.
pub struct SplitImage {
    mirror: u64,
    pieces: Vec<ImagePiece>,
    writable: AtomicBool,
    /// Rejoin started: no more writes.
    stopped: AtomicBool,
    inflight: AtomicU64,
    bits: Option<ImageBits>,
}

impl SplitImage {
    /// What `bdev_get_bdevs` shows.
    pub fn describe(&self) -> Value {
        json!({"split_image": {
            "mirror_id": self.mirror,
            "writable": self.writable.load(Ordering::SeqCst) && !self.stopped.load(Ordering::SeqCst),
            "written_regions": self.bits.as_ref().map_or(0, ImageBits::count),
        }})
    }

    /// Stops taking writes, waits for the ones in flight, returns the
    /// written-regions bitmap.
    fn stop_writes(&self) -> Vec<u8> {
        self.stopped.store(true, Ordering::SeqCst);
        let t0 = Instant::now();
        while self.inflight.load(Ordering::SeqCst) != 0 && t0.elapsed() < Duration::from_secs(30) {
            std::thread::sleep(Duration::from_millis(1));
        }
        self.bits
            .as_ref()
            .map(ImageBits::snapshot)
            .unwrap_or_default()
    }

    fn promote(&self) {
        self.writable.store(true, Ordering::SeqCst);
    }

    /// Opens a channel on this reactor.
    pub fn channel(self: &Arc<Self>) -> SplitImageChannel {
        SplitImageChannel {
            chans: self.pieces.iter().map(|p| p.volume.channel()).collect(),
            img: self.clone(),
        }
    }
}

/// Per-core I/O handle of a [`SplitImage`].
pub struct SplitImageChannel {
    img: Arc<SplitImage>,
    chans: Vec<VolumeChannel>,
}

fn ro() -> VolumeError {
    VolumeError::Io(std::io::Error::from_raw_os_error(libc::EROFS))
}

impl SplitImageChannel {
    /// Reads, routed by extent (a read crossing an extent boundary goes
    /// through a bounce buffer per piece).
    pub async fn read(
        &self,
        offset: ByteOffset,
        mut buf: IoBufMut,
    ) -> (Result<(), VolumeError>, IoBufMut) {
        let len = buf.len() as u64;
        let end = offset.0 + len;
        let parts: Vec<usize> = (0..self.img.pieces.len())
            .filter(|&i| {
                let p = &self.img.pieces[i];
                offset.0 < p.logical + p.len && end > p.logical
            })
            .collect();
        if let [i] = parts[..] {
            let p = &self.img.pieces[i];
            if offset.0 >= p.logical && end <= p.logical + p.len {
                return self.chans[i]
                    .read(ByteOffset(p.offset + offset.0 - p.logical), buf)
                    .await;
            }
        }
        for i in parts {
            let p = &self.img.pieces[i];
            let (a, b) = (offset.0.max(p.logical), end.min(p.logical + p.len));
            let Some(tmp) = mirrorpoint_poller::buffer_pool().alloc((b - a) as usize) else {
                return (Err(VolumeError::NoBuffer), buf);
            };
            let (r, tmp) = self.chans[i]
                .read(ByteOffset(p.offset + a - p.logical), tmp)
                .await;
            if let Err(e) = r {
                return (Err(e), buf);
            }
            let at = (a - offset.0) as usize;
            buf[at..at + tmp.len()].copy_from_slice(&tmp);
        }
        (Ok(()), buf)
    }

    /// Writes (a writable clone only): the regions' bits are durable first.
    pub async fn write(&self, offset: ByteOffset, buf: IoBuf) -> (Result<(), VolumeError>, IoBuf) {
        let img = &self.img;
        img.inflight.fetch_add(1, Ordering::SeqCst);
        let out = self.write_inner(offset, &buf).await;
        img.inflight.fetch_sub(1, Ordering::SeqCst);
        (out, buf)
    }

    async fn write_inner(&self, offset: ByteOffset, buf: &IoBuf) -> Result<(), VolumeError> {
        let img = &self.img;
        if img.stopped.load(Ordering::SeqCst) || !img.writable.load(Ordering::SeqCst) {
            return Err(ro());
        }
        let len = buf.len() as u64;
        if let Some(bits) = &img.bits {
            bits.mark(offset.0, len).await?;
        }
        let end = offset.0 + len;
        for (p, ch) in img.pieces.iter().zip(&self.chans) {
            let (a, b) = (offset.0.max(p.logical), end.min(p.logical + p.len));
            if a >= b {
                continue;
            }
            let slice = buf
                .slice((a - offset.0) as usize, (b - a) as usize)
                .ok_or(VolumeError::NoBuffer)?;
            ch.write(ByteOffset(p.offset + a - p.logical), slice)
                .await
                .0?;
        }
        Ok(())
    }

    /// Flushes every volume the image's extents live on.
    pub async fn flush(&self) -> Result<(), VolumeError> {
        for ch in &self.chans {
            ch.flush().await?;
        }
        Ok(())
    }
}

/// A writable image's written regions, persisted in a file before the data
/// of a region's first write is written (so a crash of the leg's site
/// never hides a write from the rejoin).
struct ImageBits {
    path: PathBuf,
    region_size: u64,
    /// Bits set (possibly not yet durable).
    mem: Arc<Mutex<Vec<u8>>>,
    /// Bits known durable.
    durable: Mutex<Vec<u8>>,
    /// Serialises the file writes.
    file: Arc<Mutex<()>>,
}

impl ImageBits {
    fn load(path: &std::path::Path) -> Option<Vec<u8>> {
        std::fs::read(path).ok()
    }

    fn open(path: PathBuf, region_size: u64, regions: u64) -> std::io::Result<ImageBits> {
        let n = regions.div_ceil(8) as usize;
        let mut v = Self::load(&path).unwrap_or_default();
        v.resize(n, 0);
        let bits = ImageBits {
            path,
            region_size: region_size.max(1),
            durable: Mutex::new(v.clone()),
            mem: Arc::new(Mutex::new(v)),
            file: Arc::new(Mutex::new(())),
        };
        let snap = bits.snapshot();
        persist(&bits.path, &snap)?;
        Ok(bits)
    }

    fn snapshot(&self) -> Vec<u8> {
        lock(&self.mem).clone()
    }

    fn count(&self) -> u64 {
        lock(&self.mem)
            .iter()
            .map(|b| u64::from(b.count_ones()))
            .sum()
    }

    async fn mark(&self, offset: u64, len: u64) -> Result<(), VolumeError> {
        let (a, b) = (
            offset / self.region_size,
            (offset + len - 1) / self.region_size,
        );
        let need = {
            let durable = lock(&self.durable);
            let mut mem = lock(&self.mem);
            let mut need = false;
            for r in a..=b {
                let (i, bit) = ((r / 8) as usize, 1u8 << (r % 8));
                if let Some(m) = mem.get_mut(i) {
                    *m |= bit;
                }
                if durable.get(i).is_some_and(|d| d & bit == 0) {
                    need = true;
                }
            }
            need
        };
        if !need {
            return Ok(());
        }
        // The snapshot is taken on the helper thread, under the file lock,
        // after our bits were set: it holds them, and a file written later
        // holds a superset (bits are only added).
        let (tx, rx) = oneshot();
        let (path, file, mem) = (self.path.clone(), self.file.clone(), self.mem.clone());
        std::thread::spawn(move || {
            let _g = lock(&file);
            let snap = lock(&mem).clone();
            tx.send(persist(&path, &snap).map(|()| snap));
        });
        match rx.await {
            Ok(Ok(snap)) => {
                let mut d = lock(&self.durable);
                for (x, y) in d.iter_mut().zip(snap) {
                    *x |= y;
                }
                Ok(())
            }
            Ok(Err(e)) => Err(VolumeError::Io(e)),
            Err(_) => Err(VolumeError::Io(std::io::Error::other("bitmap writer gone"))),
        }
    }
}

fn persist(path: &std::path::Path, bits: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(bits)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent() {
        if let Ok(d) = std::fs::File::open(dir) {
            let _ = d.sync_all();
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// RPC registration.

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct GroupName {
    name: String,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct MaybeGroup {
    #[serde(default)]
    name: Option<String>,
}

/// Registers `mirror_split`, `mirror_rejoin`, `mirror_split_promote` and
/// `mirror_group_create` / `_delete` / `_get`.
pub fn register(
    methods: &crate::rpc::MethodRegistry,
    state: &Arc<DaemonState>,
) -> Result<(), crate::rpc::RegisterError> {
    use super::super::group;
    use crate::rpc::parse_params;
    let rpc_err = service::rpc_err;
    let s = state.clone();
    methods.register("mirror_split", move |p| {
        split(&s, parse_params(p)?).map_err(rpc_err)
    })?;
    let s = state.clone();
    methods.register("mirror_rejoin", move |p| {
        rejoin(&s, parse_params(p)?).map_err(rpc_err)
    })?;
    let s = state.clone();
    methods.register("mirror_split_promote", move |p| {
        promote(&s, parse_params(p)?).map_err(rpc_err)
    })?;
    let s = state.clone();
    methods.register("mirror_group_create", move |p| {
        group::create(&s, parse_params(p)?).map_err(rpc_err)
    })?;
    let s = state.clone();
    methods.register("mirror_group_delete", move |p| {
        let g: GroupName = parse_params(p)?;
        group::delete(&s, &g.name).map_err(rpc_err)
    })?;
    let s = state.clone();
    methods.register("mirror_group_get", move |p| {
        let g: MaybeGroup = parse_params(p)?;
        group::get(&s, g.name.as_deref()).map_err(rpc_err)
    })?;
    Ok(())
}
