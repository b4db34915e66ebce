//! Changing a running mirror's legs: `mirror_add_leg` (third mirror
//! allocation), `mirror_remove_leg`, and the auto-replacement policy
//! (`mirror_set_policy`).
//!
//! These are control-plane operations on the RPC thread (blocking agent
//! calls and metadata commits are fine there). Each one keeps the same
//! crash order so that `kill -9` at any point leaves a state the next
//! start resumes from:
//! - add: bump `next_leg_id` in the record (a leg id is never reused) →
//!   the agents allocate and persist the new leg → its bitmap slot is
//!   reset to all-dirty, durably → the record names the leg → the engine
//!   publishes it (writes reach it) and its supervisor full-syncs it. A
//!   restart after the record was written finds the slot's bits still set
//!   (minus what was copied) and resumes the full sync.
//! - remove: the engine drops the leg (no write reaches it any more) → the
//!   record forgets it → its agent releases the allocation; an unreachable
//!   agent's release is kept in the record and retried in the background.
//!
//! Auto-replacement runs on one monitor thread per daemon: a remote leg
//! that has been `failed` or unreachable (`degraded`) for longer than the
//! mirror's `failed_timeout_ms` is replaced: a new leg is allocated (the
//! master prefers a domain holding no leg of the mirror; a domain's agent
//! never puts it on a server holding another leg of it), added online, and
//! the old leg removed. Each replacement is logged and listed in
//! `mirror_get_status` under `policy.replacements`.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::Deserialize;
use serde_json::{json, Value};

use super::engine::{LegConfig, LegState, Mirror};
use super::service::{
    allocate_leg, err, lock, record_path, release_leg, rpc_err, write_json_atomically, LegRecord,
    MirrorParams, MirrorRecord, Replacing, SvcError,
};
use crate::daemon::DaemonState;

/// Default for `failed_timeout_ms`.
pub const DEFAULT_FAILED_TIMEOUT_MS: u64 = 60_000;
/// Shortest `failed_timeout_ms` accepted.
pub const MIN_FAILED_TIMEOUT_MS: u64 = 100;
const MONITOR_TICK: Duration = Duration::from_millis(100);
const RELEASE_RETRY: Duration = Duration::from_secs(2);

/// What the monitor keeps per mirror (in memory; the policy itself is in
/// the mirror's `mirror_create` parameters, so `save_config` keeps it).
#[derive(Default)]
pub struct PolicyState {
    /// Per leg id: since when it has not been live.
    down_since: HashMap<u32, Instant>,
    /// Replacements done, newest last.
    replacements: Vec<Value>,
    /// Last replacement attempt that failed, for status.
    last_error: Option<String>,
    last_failed_try: Option<Instant>,
}

fn find(state: &DaemonState, name: &str) -> Result<(MirrorParams, Arc<Mirror>), SvcError> {
    lock(&state.mirror.mirrors)
        .iter()
        .find(|(p, _)| p.name == name)
        .map(|(p, m)| (p.clone(), m.clone()))
        .ok_or_else(|| err(libc::ENODEV, format!("no mirror named '{name}'")))
}

fn load_record(state: &DaemonState, name: &str) -> Result<MirrorRecord, SvcError> {
    let path = record_path(state, name);
    let text = std::fs::read_to_string(&path)
        .map_err(|e| err(libc::EIO, format!("{}: {e}", path.display())))?;
    serde_json::from_str(&text).map_err(|e| err(libc::EIO, format!("{}: {e}", path.display())))
}

fn save_record(state: &DaemonState, name: &str, r: &MirrorRecord) -> Result<(), String> {
    let path = record_path(state, name);
    write_json_atomically(&path, r).map_err(|e| format!("{}: {e}", path.display()))
}

fn now_unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// `mirror_add_leg` parameters.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AddLegParams {
    /// Mirror name.
    pub name: String,
    /// Wanted domain (absent or 0: the master picks).
    #[serde(default)]
    pub domain: Option<u32>,
}

/// `mirror_remove_leg` parameters.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RemoveLegParams {
    /// Mirror name.
    pub name: String,
    /// The leg's index (slot), as `mirror_get_status` shows it.
    pub leg: usize,
}

/// `mirror_set_policy` parameters.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyParams {
    /// Mirror name.
    pub name: String,
    /// Replace failed or unreachable legs automatically.
    pub auto_replace: bool,
    /// After this long failed or unreachable (default 60000 ms).
    #[serde(default)]
    pub failed_timeout_ms: Option<u64>,
}

/// Adds a leg to mirror `name` online; returns its slot, id and placement.
pub fn add_leg(state: &DaemonState, name: &str, domain: Option<u32>) -> Result<Value, SvcError> {
    let svc = &state.mirror;
    let _ops = lock(&svc.leg_ops);
    add_leg_locked(state, name, domain.unwrap_or(0))
}

fn add_leg_locked(state: &DaemonState, name: &str, want: u32) -> Result<Value, SvcError> {
    let site = state
        .mirror
        .site()
        .ok_or_else(|| err(libc::EINVAL, "configure the site first (agent_set_site)"))?;
    let (_, m) = find(state, name)?;
    let slot = m.free_slot().ok_or_else(|| {
        err(
            libc::EBUSY,
            format!(
                "mirror '{name}' has no free leg slot (at most {} remote legs; a removed leg's slot is free once its supervisor stopped)",
                m.meta().max_legs()
            ),
        )
    })?;
    let mut rec = load_record(state, name)?;
    let leg_id = next_leg_id(&rec);
    // The id is used up before any agent hears of it.
    rec.next_leg_id = leg_id + 1;
    save_record(state, name, &rec).map_err(|e| err(libc::EIO, e))?;
    let mut leg = allocate_leg(state, &site, rec.mirror_id, leg_id, rec.size, want)?;
    leg.slot = Some(slot);
    let cfg = LegConfig {
        site: leg.site.clone(),
        address: leg.address,
        slot,
        leg_id,
        split: false,
    };
    let mut with_leg = rec.clone();
    with_leg.legs.push(leg.clone());
    let added = m.add_leg(cfg, || save_record(state, name, &with_leg));
    if let Err(e) = added {
        // Nothing references the allocation: give it back.
        if let Err(r) = release_leg(state, &site, rec.mirror_id, &leg) {
            tracing::warn!(
                mirror = name,
                "releasing the unused leg at {}: {r}",
                leg.site
            );
            let _ = with_leg_pending(state, name, &leg);
        }
        return Err(err(libc::EIO, format!("adding the leg: {e}")));
    }
    tracing::info!(
        mirror = name,
        leg = slot,
        leg_id,
        site = leg.site,
        domain = leg.domain,
        "third-mirror allocation: leg added online, full sync running"
    );
    Ok(json!({
        "leg": slot,
        "leg_id": leg_id,
        "site": leg.site,
        "domain": leg.domain,
        "address": leg.address.to_string(),
        "extents": leg.extents,
    }))
}

/// The id the next added leg gets (never one used before in the mirror).
fn next_leg_id(rec: &MirrorRecord) -> u32 {
    rec.legs
        .iter()
        .chain(&rec.pending_release)
        .map(|l| l.leg_id + 1)
        .max()
        .unwrap_or(0)
        .max(rec.next_leg_id)
        .max(1)
}

fn with_leg_pending(state: &DaemonState, name: &str, leg: &LegRecord) -> Result<(), String> {
    let mut rec = load_record(state, name).map_err(|e| e.message)?;
    rec.legs
        .retain(|l| !(l.leg_id == leg.leg_id && l.domain == leg.domain));
    if !rec.pending_release.iter().any(|l| l.leg_id == leg.leg_id) {
        rec.pending_release.push(leg.clone());
    }
    save_record(state, name, &rec)
}

/// Detaches leg `slot` of mirror `name` and releases its allocation.
pub fn remove_leg(state: &DaemonState, name: &str, slot: usize) -> Result<Value, SvcError> {
    let svc = &state.mirror;
    let _ops = lock(&svc.leg_ops);
    remove_leg_locked(state, name, slot)
}

fn remove_leg_locked(state: &DaemonState, name: &str, slot: usize) -> Result<Value, SvcError> {
    let site = state
        .mirror
        .site()
        .ok_or_else(|| err(libc::EINVAL, "configure the site first (agent_set_site)"))?;
    let (_, m) = find(state, name)?;
    if slot >= m.meta().max_legs() {
        return Err(err(
            libc::EINVAL,
            format!(
                "leg: {slot} is out of range (legs are 0..{})",
                m.meta().max_legs()
            ),
        ));
    }
    let mut rec = load_record(state, name)?;
    let pos = (0..rec.legs.len())
        .find(|&i| rec.slot_of(i) == slot)
        .ok_or_else(|| {
            err(
                libc::EINVAL,
                format!("leg: mirror '{name}' has no leg {slot}"),
            )
        })?;
    let leg_id = rec.legs[pos].leg_id;
    if m.legs().iter().all(|l| l.config().slot != slot) {
        return Err(err(
            libc::EINVAL,
            format!("leg: mirror '{name}' runs no leg {slot}"),
        ));
    }
    // The record first: after a crash from here on the leg is gone and
    // its release is retried (the removal finishes after a restart).
    let leg = rec.legs.remove(pos);
    rec.pending_release.push(leg.clone());
    save_record(state, name, &rec).map_err(|e| err(libc::EIO, e))?;
    let removed = m
        .remove_leg(slot)
        .map_err(|e| err(libc::EINVAL, format!("leg: {e}")))?;
    if removed.config().leg_id != leg_id {
        tracing::warn!(
            mirror = name,
            leg = slot,
            "record and engine disagree on the leg id ({} vs {})",
            leg_id,
            removed.config().leg_id
        );
    }
    let released = match release_leg(state, &site, rec.mirror_id, &leg) {
        Ok(()) => {
            rec.pending_release.retain(|l| l.leg_id != leg_id);
            save_record(state, name, &rec).map_err(|e| err(libc::EIO, e))?;
            true
        }
        Err(e) => {
            tracing::warn!(
                mirror = name,
                leg = slot,
                "could not release the removed leg at {} yet (retried in the background): {e}",
                leg.site
            );
            false
        }
    };
    Ok(json!({"leg": slot, "leg_id": leg_id, "site": leg.site, "released": released}))
}

/// Sets the auto-replacement policy of mirror `name` (kept in its
/// `mirror_create` parameters, so `save_config` keeps it).
pub fn set_policy(state: &DaemonState, p: PolicyParams) -> Result<Value, SvcError> {
    if let Some(t) = p.failed_timeout_ms {
        if t < MIN_FAILED_TIMEOUT_MS {
            return Err(err(
                libc::EINVAL,
                format!("failed_timeout_ms: must be at least {MIN_FAILED_TIMEOUT_MS}, not {t}"),
            ));
        }
    }
    let mut ms = lock(&state.mirror.mirrors);
    let (params, _) = ms
        .iter_mut()
        .find(|(x, _)| x.name == p.name)
        .ok_or_else(|| err(libc::ENODEV, format!("no mirror named '{}'", p.name)))?;
    params.auto_replace = Some(p.auto_replace);
    if p.failed_timeout_ms.is_some() {
        params.failed_timeout_ms = p.failed_timeout_ms;
    }
    tracing::info!(
        mirror = p.name,
        auto_replace = p.auto_replace,
        failed_timeout_ms = params
            .failed_timeout_ms
            .unwrap_or(DEFAULT_FAILED_TIMEOUT_MS),
        "mirror leg policy set"
    );
    Ok(Value::Bool(true))
}

/// Adds the policy and its history to a mirror's status object.
pub fn decorate_status(state: &DaemonState, params: &MirrorParams, status: &mut Value) {
    let policies = lock(&state.mirror.policies);
    let ps = policies.get(&params.name);
    let downs: Vec<Value> = match (ps, status.get("legs").and_then(Value::as_array)) {
        (Some(ps), Some(legs)) => legs
            .iter()
            .filter_map(|l| {
                let id = l.get("leg_id")?.as_u64()? as u32;
                let since = ps.down_since.get(&id)?;
                Some(json!({"leg_id": id, "down_ms": since.elapsed().as_millis() as u64}))
            })
            .collect(),
        _ => Vec::new(),
    };
    if let Some(obj) = status.as_object_mut() {
        obj.insert(
            "policy".into(),
            json!({
                "auto_replace": params.auto_replace.unwrap_or(false),
                "failed_timeout_ms": params.failed_timeout_ms.unwrap_or(DEFAULT_FAILED_TIMEOUT_MS),
                "legs_down": downs,
                "replacements": ps.map(|p| p.replacements.clone()).unwrap_or_default(),
                "last_error": ps.and_then(|p| p.last_error.clone()),
            }),
        );
    }
}

/// Starts the daemon's leg monitor (auto-replacement, release retries)
/// once.
pub fn start_monitor(state: &Arc<DaemonState>) {
    if state.mirror.monitor.swap(true, Ordering::SeqCst) {
        return;
    }
    let weak = Arc::downgrade(state);
    let spawned = std::thread::Builder::new()
        .name("mirror-legs".into())
        .spawn(move || monitor(weak));
    if let Err(e) = spawned {
        state.mirror.monitor.store(false, Ordering::SeqCst);
        tracing::error!("cannot start the mirror leg monitor: {e}");
    }
}

fn monitor(weak: Weak<DaemonState>) {
    let mut last_release_try = Instant::now();
    loop {
        std::thread::sleep(MONITOR_TICK);
        let Some(state) = weak.upgrade() else {
            return;
        };
        if state.mirror.stop.load(Ordering::SeqCst) {
            state.mirror.monitor.store(false, Ordering::SeqCst);
            return;
        }
        let mirrors: Vec<(MirrorParams, Arc<Mirror>)> = lock(&state.mirror.mirrors).clone();
        for (p, m) in &mirrors {
            if !lock(&state.mirror.policies).contains_key(&p.name) {
                // First look at this mirror since the daemon started.
                resume_replacement(&state, &p.name);
            }
            check_mirror(&state, p, m);
        }
        if last_release_try.elapsed() >= RELEASE_RETRY {
            last_release_try = Instant::now();
            for (p, _) in &mirrors {
                retry_releases(&state, &p.name);
            }
        }
    }
}

fn check_mirror(state: &DaemonState, p: &MirrorParams, m: &Arc<Mirror>) {
    let timeout = Duration::from_millis(
        p.failed_timeout_ms
            .unwrap_or(DEFAULT_FAILED_TIMEOUT_MS)
            .max(MIN_FAILED_TIMEOUT_MS),
    );
    let legs = m.legs();
    let mut due = None;
    {
        let mut policies = lock(&state.mirror.policies);
        let ps = policies.entry(p.name.clone()).or_default();
        let now = Instant::now();
        ps.down_since
            .retain(|id, _| legs.iter().any(|l| l.config().leg_id == *id));
        for l in &legs {
            let id = l.config().leg_id;
            match l.state() {
                LegState::Degraded | LegState::Failed => {
                    let since = *ps.down_since.entry(id).or_insert(now);
                    if due.is_none() && since.elapsed() >= timeout {
                        due = Some((l.config().slot, id, l.state(), since.elapsed()));
                    }
                }
                _ => {
                    ps.down_since.remove(&id);
                }
            }
        }
        // After a failed attempt, wait a while before the next one.
        if ps
            .last_failed_try
            .is_some_and(|t| t.elapsed() < timeout.min(Duration::from_secs(5)))
        {
            due = None;
        }
    }
    if !p.auto_replace.unwrap_or(false) {
        return;
    }
    let Some((slot, id, st, down)) = due else {
        return;
    };
    let _ops = lock(&state.mirror.leg_ops);
    // Still the same leg, still down (an operator may have acted meanwhile).
    if !m
        .legs()
        .iter()
        .any(|l| l.config().leg_id == id && !l.state().is_live())
    {
        return;
    }
    let old_site = m
        .legs()
        .iter()
        .find(|l| l.config().leg_id == id)
        .map(|l| (l.config().site.clone(), l.last_error()))
        .unwrap_or_default();
    tracing::warn!(
        mirror = p.name,
        leg = slot,
        leg_id = id,
        site = old_site.0,
        "mirror leg {st:?} for {down:?} (policy: {timeout:?}): allocating a replacement"
    );
    let res = replace(state, &p.name, slot);
    let mut policies = lock(&state.mirror.policies);
    let ps = policies.entry(p.name.clone()).or_default();
    match res {
        Ok(new) => {
            ps.down_since.remove(&id);
            ps.last_error = None;
            ps.last_failed_try = None;
            let ev = json!({
                "at_unix_ms": now_unix_ms(),
                "old_leg": slot,
                "old_leg_id": id,
                "old_site": old_site.0,
                "old_state": st,
                "reason": old_site.1,
                "down_ms": down.as_millis() as u64,
                "new_leg": new.get("leg"),
                "new_leg_id": new.get("leg_id"),
                "new_site": new.get("site"),
                "new_domain": new.get("domain"),
            });
            tracing::warn!(mirror = p.name, "mirror leg replaced: {ev}");
            ps.replacements.push(ev);
        }
        Err(e) => {
            tracing::error!(
                mirror = p.name,
                leg = slot,
                "auto-replacement failed: {}",
                e.message
            );
            ps.last_error = Some(e.message);
            ps.last_failed_try = Some(Instant::now());
        }
    }
}

/// Allocates and adds a new leg, then removes the one in `slot` (removed
/// first if no slot is free). The record says a replacement is under way
/// (`replacing`) until both are done, so that after a crash in between the
/// restart finishes it (see [`resume_replacement`]) instead of allocating
/// yet another leg.
fn replace(state: &DaemonState, name: &str, slot: usize) -> Result<Value, SvcError> {
    let (_, m) = find(state, name)?;
    let mut rec = load_record(state, name)?;
    let old = (0..rec.legs.len())
        .find(|&i| rec.slot_of(i) == slot)
        .map(|i| rec.legs[i].leg_id)
        .ok_or_else(|| err(libc::ENOENT, format!("mirror '{name}' has no leg {slot}")))?;
    rec.replacing = Some(Replacing {
        old_leg_id: old,
        new_from: next_leg_id(&rec),
    });
    save_record(state, name, &rec).map_err(|e| err(libc::EIO, e))?;
    let res = if m.free_slot().is_some() {
        add_leg_locked(state, name, 0).and_then(|new| {
            remove_leg_locked(state, name, slot)?;
            Ok(new)
        })
    } else {
        remove_leg_locked(state, name, slot).and_then(|_| add_leg_locked(state, name, 0))
    };
    let mut rec = load_record(state, name)?;
    rec.replacing = None;
    save_record(state, name, &rec).map_err(|e| err(libc::EIO, e))?;
    res
}

/// After a restart: a replacement that a crash interrupted is finished.
/// If its new leg was recorded, the old leg is removed now (it was down
/// past the timeout when the replacement began); if not, nothing was
/// changed yet and the policy decides again.
fn resume_replacement(state: &DaemonState, name: &str) {
    let _ops = lock(&state.mirror.leg_ops);
    let Ok(rec) = load_record(state, name) else {
        return;
    };
    let Some(r) = rec.replacing else {
        return;
    };
    let new_id = rec
        .legs
        .iter()
        .filter(|l| l.leg_id >= r.new_from)
        .map(|l| l.leg_id)
        .max();
    let old = (0..rec.legs.len()).find(|&i| rec.legs[i].leg_id == r.old_leg_id);
    match (new_id, old) {
        (Some(new_id), Some(i)) => {
            let slot = rec.slot_of(i);
            tracing::warn!(
                mirror = name,
                leg = slot,
                leg_id = r.old_leg_id,
                "finishing a leg replacement interrupted by a restart: removing the old leg"
            );
            if let Err(e) = remove_leg_locked(state, name, slot) {
                tracing::error!(mirror = name, "finishing the replacement: {}", e.message);
                return;
            }
            lock(&state.mirror.policies)
                .entry(name.to_string())
                .or_default()
                .replacements
                .push(json!({
                    "at_unix_ms": now_unix_ms(),
                    "old_leg": slot,
                    "old_leg_id": r.old_leg_id,
                    "new_leg_id": new_id,
                    "reason": "replacement interrupted by a restart, finished after it",
                }));
        }
        _ => tracing::info!(
            mirror = name,
            "a leg replacement was interrupted before its new leg was recorded, or after the old one was removed: nothing left to do"
        ),
    }
    let Ok(mut again) = load_record(state, name) else {
        return;
    };
    again.replacing = None;
    if let Err(e) = save_record(state, name, &again) {
        tracing::warn!(mirror = name, "{e}");
    }
}

fn retry_releases(state: &DaemonState, name: &str) {
    let Some(site) = state.mirror.site() else {
        return;
    };
    let _ops = lock(&state.mirror.leg_ops);
    let Ok(mut rec) = load_record(state, name) else {
        return;
    };
    if rec.pending_release.is_empty() {
        return;
    }
    let before = rec.pending_release.len();
    let id = rec.mirror_id;
    rec.pending_release
        .retain(|l| release_leg(state, &site, id, l).is_err());
    if rec.pending_release.len() != before {
        tracing::info!(
            mirror = name,
            released = before - rec.pending_release.len(),
            "released removed legs whose site is back"
        );
        if let Err(e) = save_record(state, name, &rec) {
            tracing::warn!(mirror = name, "{e}");
        }
    }
}

/// Registers `mirror_add_leg`, `mirror_remove_leg`, `mirror_set_policy`.
pub fn register(
    methods: &crate::rpc::MethodRegistry,
    state: &Arc<DaemonState>,
) -> Result<(), crate::rpc::RegisterError> {
    use crate::rpc::parse_params;
    let s = state.clone();
    methods.register("mirror_add_leg", move |p| {
        let a: AddLegParams = parse_params(p)?;
        add_leg(&s, &a.name, a.domain).map_err(rpc_err)
    })?;
    let s = state.clone();
    methods.register("mirror_remove_leg", move |p| {
        let r: RemoveLegParams = parse_params(p)?;
        remove_leg(&s, &r.name, r.leg).map_err(rpc_err)
    })?;
    let s = state.clone();
    methods.register("mirror_set_policy", move |p| {
        let r: PolicyParams = parse_params(p)?;
        set_policy(&s, r).map_err(rpc_err)
    })?;
    Ok(())
}
