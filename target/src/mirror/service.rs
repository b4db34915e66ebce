//! The site: its mirror listener, the remote legs it hosts, its domain
//! mirror agent, and the mirrors it runs as primary.
//!
//! # Connections
//! Every connection between sites starts with the authenticated handshake
//! ([`super::wire::handshake`]); a wrong secret or protocol version is
//! refused with a clear log line on both sides, and the daemon carries on.
//! The first message after it says what the connection is for:
//! - `GenerationExchange`: a data link of a mirror whose leg this site
//!   hosts. It is served on the reactor it was accepted on: writes land in
//!   a pool chunk and go to the leg's extents on the storage servers from
//!   there, routed by the extent map;
//! - `CapacityReport`, `AllocateRequest`, `ReleaseRequest`: agent traffic,
//!   handed to a plain thread (control plane, blocking I/O allowed there).
//!
//! # Agents
//! Every daemon is the domain mirror agent of its site over its storage
//! servers (pools of local volumes whose space is the concatenation of the
//! volumes). One agent is the master. Other agents push a `CapacityReport`
//! to the master every second. `mirror_create` asks the master for a leg of
//! N bytes (its `AllocateRequest.domain` names the wanted domain, 0 for
//! any); the master picks a domain other than the asker's with room (over
//! all its healthy servers together), forwards the request to that domain's
//! agent (or serves it itself), which builds the virtual device from free
//! extents on one or more servers and persists the allocation. The master
//! answers the asker with a `CapacityReport` naming the chosen domain, then
//! the `AllocateResponse` with the extent map. The asker persists the leg
//! (site, address, mirror id) next to the mirror's metadata.

use std::collections::HashMap;
use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpStream as StdTcpStream};
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use mirrorpoint_poller::{oneshot, spawn, IoBuf, IoBufMut};
use mirrorpoint_transport::{Acceptor as TcpAcceptor, TcpListener, TcpStream};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::engine::recovery::{LocalRecovery, RecoverError};
use super::engine::{AckPolicy, EngineConfig, LegConfig, Mirror};
use super::link::{join_all, now_ns, Conn, RawFrame};
use super::meta::MirrorMeta;
use super::wire::{
    AllocateRequest, AllocateResponse, CapacityReport, Decoded, DomainId, ErrorCode, ErrorMsg,
    Extent, FlushAck, Framer, Generation, GenerationExchange, GenerationFlags, HandshakeConfig,
    Health, HeartbeatAck, Initiator, LegId, Message, MirrorId, ReleaseAck, ReleaseRequest,
    RequestTag, ServerCapacity, SharedSecret, SiteName, Status, StorageServerId, Timestamp,
    WriteAck,
};
use crate::daemon::DaemonState;
use crate::units::{ByteLen, ByteOffset};
use crate::volume::{random_uuid, Volume, VolumeChannel};

pub(super) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// `agent_set_site` parameters.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct SiteParams {
    /// This site's name (the handshake name).
    pub name: String,
    /// This site's domain id (non-zero).
    pub domain: u32,
    /// Where this site listens for mirror links and agents.
    pub listen: SocketAddr,
    /// Secret shared by all sites (16 to 1024 bytes).
    pub secret: String,
    /// This agent is the master mirror agent.
    #[serde(default)]
    pub master: bool,
}

/// `agent_add_peer` parameters.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct PeerParams {
    /// Peer site name.
    pub name: String,
    /// Its domain id.
    pub domain: u32,
    /// Its listen address.
    pub address: SocketAddr,
    /// It is the master agent.
    #[serde(default)]
    pub master: bool,
}

/// `agent_add_storage_server` parameters.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct StorageServerParams {
    /// Server name.
    pub name: String,
    /// Id within the domain (non-zero, unique).
    pub id: u32,
    /// Its volumes (bdev names), concatenated in this order.
    pub volumes: Vec<String>,
}

/// `mirror_create` parameters.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct MirrorParams {
    /// Name of the mirrored volume (what front ends export).
    pub name: String,
    /// The local volume (leg 0).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volume: Option<String>,
    /// Without `volume`: size of a local volume to create (file in the data dir).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<u64>,
    /// Wanted remote domain (absent or 0: the master picks).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub domain: Option<u32>,
    /// Mirror id (given on replay; random when absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mirror_id: Option<u64>,
    /// Bitmap region size, 64 KiB to 1 MiB (default 64 KiB).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub region_size: Option<u64>,
    /// "sync" (default) or "async".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ack: Option<String>,
    /// Async: remote writes in flight per core before writes wait (default 64).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_lag_ios: Option<usize>,
    /// Resync cap in bytes per second (default 256 MiB/s; 0: none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resync_rate: Option<u64>,
    /// A leg silent this long is degraded (default 3000 ms).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub link_timeout_ms: Option<u64>,
    /// A spare volume: when the local device fails, the mirror rebuilds
    /// onto it from a remote leg without waiting for the operator.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spare_bdev: Option<String>,
    /// Replace a remote leg that is failed or unreachable for longer than
    /// `failed_timeout_ms` by a newly allocated one (default off; also set
    /// by `mirror_set_policy`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auto_replace: Option<bool>,
    /// See `auto_replace` (default 60000 ms).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failed_timeout_ms: Option<u64>,
}

/// What the asker persists about a mirror's legs.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(super) struct LegRecord {
    pub(super) site: String,
    pub(super) domain: u32,
    pub(super) address: SocketAddr,
    pub(super) extents: Vec<ExtentRec>,
    /// Bitmap slot (absent in records written before online leg changes:
    /// the leg's position).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(super) slot: Option<usize>,
    /// The leg's id on the wire and at its agent (0: the first leg).
    #[serde(default)]
    pub(super) leg_id: u32,
    /// The leg's split (split.rs), when split.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(super) split: Option<super::split::SplitInfo>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub(super) struct MirrorRecord {
    pub(super) mirror_id: u64,
    pub(super) size: u64,
    pub(super) legs: Vec<LegRecord>,
    /// Next leg id to hand out (ids are never reused).
    #[serde(default)]
    pub(super) next_leg_id: u32,
    /// Legs removed whose allocation could not be released yet (their site
    /// was unreachable); retried in the background.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub(super) pending_release: Vec<LegRecord>,
    /// An automatic replacement under way (finished after a restart).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(super) replacing: Option<Replacing>,
}

/// A leg replacement under way: the old leg, and the first leg id its
/// replacement can have.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub(super) struct Replacing {
    pub(super) old_leg_id: u32,
    pub(super) new_from: u32,
}

impl MirrorRecord {
    /// The slot of the `i`th leg record.
    pub(super) fn slot_of(&self, i: usize) -> usize {
        self.legs[i].slot.unwrap_or(i)
    }
}

/// Rewrites a mirror's record (atomically, durably).
pub(super) fn update_record(
    state: &DaemonState,
    name: &str,
    f: impl FnOnce(&mut MirrorRecord),
) -> Result<(), SvcError> {
    let path = record_path(state, name);
    let text = std::fs::read_to_string(&path)
        .map_err(|e| err(libc::EIO, format!("{}: {e}", path.display())))?;
    let mut r: MirrorRecord = serde_json::from_str(&text)
        .map_err(|e| err(libc::EIO, format!("{}: {e}", path.display())))?;
    f(&mut r);
    write_json_atomically(&path, &r).map_err(|e| err(libc::EIO, format!("{}: {e}", path.display())))
}

/// One extent of an allocation.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct ExtentRec {
    /// Storage server id.
    pub server: u32,
    /// Offset in the server's space.
    pub device_offset: u64,
    /// Length.
    pub len: u64,
    /// Offset in the mirror.
    pub logical_offset: u64,
}

impl From<&Extent> for ExtentRec {
    fn from(e: &Extent) -> Self {
        ExtentRec {
            server: e.server.0,
            device_offset: e.device_offset.0,
            len: e.len.0,
            logical_offset: e.logical_offset.0,
        }
    }
}

impl From<&ExtentRec> for Extent {
    fn from(e: &ExtentRec) -> Self {
        Extent {
            server: StorageServerId(e.server),
            device_offset: ByteOffset(e.device_offset),
            len: ByteLen(e.len),
            logical_offset: ByteOffset(e.logical_offset),
        }
    }
}

/// A remote leg hosted here.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Allocation {
    /// Mirror id.
    pub mirror_id: u64,
    /// Site that asked (through the master).
    pub via: String,
    /// Bytes.
    pub size: u64,
    /// Extent map.
    pub extents: Vec<ExtentRec>,
    /// Generation the leg's data is at (0: never fully synced).
    pub generation: u64,
    /// Which leg of the mirror (a mirror may have several legs here, on
    /// different storage servers).
    #[serde(default)]
    pub leg: u32,
    /// Split off by the primary (split.rs): the primary's writes are refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub split: Option<super::split::ops::HostedSplit>,
}

struct Report {
    report: CapacityReport,
    at: Instant,
}

struct Piece {
    logical: u64,
    len: u64,
    volume: Arc<Volume>,
    offset: u64,
}

/// A hosted leg, resolved to volumes.
struct LegTarget {
    mirror: u64,
    leg: u32,
    size: u64,
    pieces: Vec<Piece>,
    gen: AtomicU64,
    /// The primary's current link session (high half of the tag of the
    /// GenerationExchange that opened the newest link).
    session: AtomicU64,
    /// Writes being applied, over all links.
    inflight: AtomicU64,
    /// The allocation was released: links stop applying writes.
    released: AtomicBool,
    /// The leg is split off: the primary's writes are refused.
    frozen: AtomicBool,
}

/// Everything mirror-related of a daemon.
#[derive(Default)]
pub struct MirrorService {
    site: Mutex<Option<SiteParams>>,
    peers: Mutex<Vec<PeerParams>>,
    servers: Mutex<Vec<StorageServerParams>>,
    allocations: Mutex<Vec<Allocation>>,
    reports: Mutex<HashMap<u32, Report>>,
    targets: Mutex<HashMap<(u64, u32), Arc<LegTarget>>>,
    pub(super) mirrors: Mutex<Vec<(MirrorParams, Arc<Mirror>)>>,
    /// Master: domains it placed legs of each mirror in (prefers others for
    /// a further leg; in memory only, the domain agents' own exclusion of
    /// servers holding a leg of the mirror is what is guaranteed).
    placements: Mutex<HashMap<u64, Vec<u32>>>,
    /// Serialises leg changes (add, remove, auto-replacement) per daemon.
    pub(super) leg_ops: Mutex<()>,
    /// The auto-replacement monitor thread is running.
    pub(super) monitor: AtomicBool,
    pub(super) stop: Arc<AtomicBool>,
    /// Per mirror: the leg monitor's view (auto-replacement).
    pub(super) policies: Mutex<HashMap<String, super::legops::PolicyState>>,
    /// Consistency groups (group.rs).
    pub(super) groups: Mutex<Vec<super::group::Group>>,
    listening: Mutex<Option<SocketAddr>>,
}

/// Errors of the service, as RPC-able text with an errno.
#[derive(Debug)]
pub struct SvcError {
    /// Negative errno for the RPC answer.
    pub errno: i32,
    /// Message.
    pub message: String,
}

pub(super) fn err(errno: i32, message: impl Into<String>) -> SvcError {
    SvcError {
        errno,
        message: message.into(),
    }
}

pub(super) fn hs_config(site: &SiteParams) -> Result<HandshakeConfig, SvcError> {
    let secret = SharedSecret::new(site.secret.as_bytes())
        .map_err(|e| err(libc::EINVAL, format!("secret: {e}")))?;
    let name = SiteName::new(&site.name).map_err(|_| {
        err(
            libc::EINVAL,
            format!("site name '{}' is not valid", site.name),
        )
    })?;
    Ok(HandshakeConfig::new(secret, name))
}

pub(super) fn write_json_atomically(path: &Path, value: &impl Serialize) -> std::io::Result<()> {
    let text = serde_json::to_string_pretty(value).map_err(std::io::Error::other)?;
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(text.as_bytes())?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent() {
        if let Ok(d) = std::fs::File::open(dir) {
            let _ = d.sync_all();
        }
    }
    Ok(())
}

impl MirrorService {
    fn data_dir(state: &DaemonState) -> PathBuf {
        state.options.data_dir.clone()
    }

    fn alloc_path(state: &DaemonState, site: &str) -> PathBuf {
        Self::data_dir(state).join(format!("agent-{site}.json"))
    }

    /// The site's configuration.
    pub fn site(&self) -> Option<SiteParams> {
        lock(&self.site).clone()
    }

    /// The mirror engines.
    pub fn mirrors(&self) -> Vec<Arc<Mirror>> {
        lock(&self.mirrors).iter().map(|(_, m)| m.clone()).collect()
    }

    /// Whether the daemon is shutting down.
    pub fn stopping(&self) -> bool {
        self.stop.load(Ordering::SeqCst)
    }

    /// Stops every mirror (clean metadata) and the agent threads.
    pub fn shutdown(&self) {
        self.stop.store(true, Ordering::SeqCst);
        for (_, m) in lock(&self.mirrors).iter() {
            m.stop();
        }
    }

    /// The calls that rebuild this subsystem, for save_config.
    pub fn config_calls(&self) -> Vec<(String, Value)> {
        let mut out = Vec::new();
        if let Some(s) = self.site() {
            out.push(("agent_set_site".into(), json!(s)));
        }
        for p in lock(&self.peers).iter() {
            out.push(("agent_add_peer".into(), json!(p)));
        }
        for s in lock(&self.servers).iter() {
            out.push(("agent_add_storage_server".into(), json!(s)));
        }
        for (p, m) in lock(&self.mirrors).iter() {
            // After a replacement (by the operator or onto the spare) the
            // mirror is recreated over its current local device.
            let mut p = p.clone();
            let dev = m.local().name().to_string();
            if p.volume.as_deref() != Some(dev.as_str()) {
                p.volume = Some(dev.clone());
                p.size = None;
            }
            if p.spare_bdev.as_deref() == Some(dev.as_str()) || m.recovery().spare_used() {
                p.spare_bdev = None;
            }
            out.push(("mirror_create".into(), json!(p)));
        }
        for g in lock(&self.groups).iter() {
            out.push(("mirror_group_create".into(), json!(g.params)));
        }
        out
    }
}

// ---------------------------------------------------------------------------
// Site and agent configuration.

/// `agent_set_site`: names the site, starts its listener.
pub fn set_site(state: &Arc<DaemonState>, p: SiteParams) -> Result<Value, SvcError> {
    let svc = &state.mirror;
    if p.domain == 0 {
        return Err(err(libc::EINVAL, "domain must be non-zero"));
    }
    hs_config(&p)?;
    if svc.site().is_some() {
        return Err(err(libc::EEXIST, "the site is already configured"));
    }
    // After a crash, the dead process's io_uring may still hold the old
    // listening socket for a moment (ring teardown is asynchronous): retry.
    let t0 = Instant::now();
    let std_listener = loop {
        match std::net::TcpListener::bind(p.listen) {
            Ok(l) => break l,
            Err(e)
                if e.kind() == std::io::ErrorKind::AddrInUse
                    && p.listen.port() != 0
                    && t0.elapsed() < Duration::from_secs(5) =>
            {
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(e) => {
                return Err(err(
                    e.raw_os_error().unwrap_or(libc::EIO),
                    format!("cannot listen on {}: {e}", p.listen),
                ))
            }
        }
    };
    let bound = std_listener
        .local_addr()
        .map_err(|e| err(libc::EIO, e.to_string()))?;
    std::fs::create_dir_all(MirrorService::data_dir(state))
        .map_err(|e| err(libc::EIO, format!("data dir: {e}")))?;
    // Allocations hosted here survive restarts.
    let path = MirrorService::alloc_path(state, &p.name);
    if path.exists() {
        let text = std::fs::read_to_string(&path)
            .map_err(|e| err(libc::EIO, format!("{}: {e}", path.display())))?;
        let allocs: Vec<Allocation> = serde_json::from_str(&text)
            .map_err(|e| err(libc::EINVAL, format!("{}: {e}", path.display())))?;
        *lock(&svc.allocations) = allocs;
    }
    // Saved with the port actually bound, so a restart keeps the address
    // the other sites know.
    let mut p = p;
    p.listen = bound;
    *lock(&svc.site) = Some(p.clone());
    *lock(&svc.listening) = Some(bound);
    let st = state.clone();
    let targets = state.reactors.clone();
    let first = state
        .reactors
        .first()
        .ok_or_else(|| err(libc::ENODEV, "no reactor"))?;
    first.post(move || {
        let listener = match TcpListener::from_std(std_listener) {
            Ok(l) => l,
            Err(e) => {
                tracing::error!("mirror listener: {e}");
                return;
            }
        };
        let acceptor = match TcpAcceptor::new(listener, targets) {
            Ok(a) => a,
            Err(e) => {
                tracing::error!("mirror listener: {e}");
                return;
            }
        };
        spawn(async move {
            let st2 = st.clone();
            let r = acceptor
                .run(move |stream, peer| handle_conn(st2.clone(), stream, peer))
                .await;
            if let Err(e) = r {
                tracing::error!("mirror listener stopped: {e}");
            }
        })
        .detach();
    });
    // Non-master agents report their capacity to the master.
    let st = state.clone();
    let stop = svc.stop.clone();
    let _ = std::thread::Builder::new()
        .name("agent-report".into())
        .spawn(move || {
            while !stop.load(Ordering::SeqCst) {
                report_capacity(&st);
                std::thread::sleep(Duration::from_millis(500));
            }
        });
    tracing::info!(site = p.name, domain = p.domain, listen = %bound, master = p.master, "mirror site configured");
    Ok(json!({"listen": bound.to_string()}))
}

/// `agent_add_peer`.
pub fn add_peer(state: &DaemonState, p: PeerParams) -> Result<Value, SvcError> {
    SiteName::new(&p.name)
        .map_err(|_| err(libc::EINVAL, format!("peer name '{}' is not valid", p.name)))?;
    let mut peers = lock(&state.mirror.peers);
    if peers
        .iter()
        .any(|x| x.name == p.name || x.domain == p.domain)
    {
        return Err(err(
            libc::EEXIST,
            format!("peer '{}' or domain {} already known", p.name, p.domain),
        ));
    }
    peers.push(p);
    Ok(Value::Bool(true))
}

/// `agent_add_storage_server`.
pub fn add_storage_server(state: &DaemonState, p: StorageServerParams) -> Result<Value, SvcError> {
    if p.id == 0 || p.volumes.is_empty() {
        return Err(err(
            libc::EINVAL,
            "a storage server needs a non-zero id and at least one volume",
        ));
    }
    for v in &p.volumes {
        let vol = state
            .volumes
            .get(v)
            .ok_or_else(|| err(libc::ENODEV, format!("no volume named '{v}'")))?;
        if vol.mirror().is_some() {
            return Err(err(
                libc::EINVAL,
                format!("'{v}' is a mirror, not a local volume"),
            ));
        }
    }
    let mut servers = lock(&state.mirror.servers);
    if servers.iter().any(|s| s.id == p.id || s.name == p.name) {
        return Err(err(
            libc::EEXIST,
            format!("storage server '{}' (id {}) exists", p.name, p.id),
        ));
    }
    // The pool's volumes are the server's storage from now on: nobody may
    // delete them or build a mirror on them.
    let owner = format!("storage server {}", p.name);
    let mut claims = Vec::new();
    for v in &p.volumes {
        match ClaimGuard::take(&state.volumes, v, &owner) {
            Ok(c) => claims.push(c),
            Err(e) => return Err(err(libc::EBUSY, e.to_string())),
        }
    }
    claims.into_iter().for_each(ClaimGuard::keep);
    servers.push(p);
    drop(servers);
    restore_split_images(state);
    Ok(Value::Bool(true))
}

/// A volume claim that is released when dropped, unless kept: error paths
/// of the calls that claim volumes give them back.
struct ClaimGuard<'a> {
    volumes: &'a crate::volume::VolumeRegistry,
    name: String,
    owner: String,
    kept: bool,
}

impl<'a> ClaimGuard<'a> {
    fn take(
        volumes: &'a crate::volume::VolumeRegistry,
        name: &str,
        owner: &str,
    ) -> Result<ClaimGuard<'a>, crate::volume::CreateError> {
        volumes.claim(name, owner)?;
        Ok(ClaimGuard {
            volumes,
            name: name.to_string(),
            owner: owner.to_string(),
            kept: false,
        })
    }

    fn keep(mut self) {
        self.kept = true;
    }
}

impl Drop for ClaimGuard<'_> {
    fn drop(&mut self) {
        if !self.kept {
            self.volumes.release(&self.name, &self.owner);
        }
    }
}

/// Who claims a mirror's local volume.
fn mirror_owner(name: &str) -> String {
    format!("mirror {name}")
}

/// Per server: (id, total bytes, free bytes, used intervals per volume).
fn capacity(state: &DaemonState) -> Vec<ServerCapacity> {
    let servers = lock(&state.mirror.servers).clone();
    let allocs = lock(&state.mirror.allocations).clone();
    let mut out: Vec<ServerCapacity> = servers
        .iter()
        .map(|s| {
            let mut total = 0u64;
            let mut healthy = true;
            for v in &s.volumes {
                match state.volumes.get(v) {
                    Some(vol) => total += vol.size().0,
                    None => healthy = false,
                }
            }
            let used: u64 = allocs
                .iter()
                .flat_map(|a| a.extents.iter())
                .filter(|e| e.server == s.id)
                .map(|e| e.len)
                .sum();
            ServerCapacity {
                server: StorageServerId(s.id),
                health: if healthy {
                    Health::Healthy
                } else {
                    Health::Failed
                },
                total: ByteLen(total),
                free: ByteLen(total.saturating_sub(used)),
            }
        })
        .collect();
    out.sort_by_key(|c| c.server);
    out
}

fn report_capacity(state: &Arc<DaemonState>) {
    let Some(site) = state.mirror.site() else {
        return;
    };
    if site.master {
        return;
    }
    let Some(master) = lock(&state.mirror.peers).iter().find(|p| p.master).cloned() else {
        return;
    };
    let report = Message::CapacityReport(CapacityReport {
        domain: DomainId(site.domain),
        reported_at: Timestamp(now_ns()),
        servers: capacity(state),
    });
    if let Err(e) = agent_call(&site, master.address, &report, 0) {
        tracing::debug!("capacity report to master {}: {e}", master.name);
    }
}

/// Allocates `size` bytes from this domain's servers (or returns the
/// existing allocation of the mirror), persisted before it is returned.
fn local_allocate(
    state: &DaemonState,
    mirror: u64,
    leg: u32,
    size: u64,
    via: &str,
) -> Result<Vec<ExtentRec>, (Status, String)> {
    let svc = &state.mirror;
    let site = svc
        .site()
        .ok_or((Status::InvalidRequest, "site not configured".to_string()))?;
    let caps = capacity(state);
    let mut allocs = lock(&svc.allocations);
    if let Some(a) = allocs
        .iter()
        .find(|a| a.mirror_id == mirror && a.leg == leg)
    {
        return Ok(a.extents.clone());
    }
    // Another leg of the same mirror never shares a storage server with
    // this one (a server's loss must not take two legs).
    let taken: Vec<u32> = allocs
        .iter()
        .filter(|a| a.mirror_id == mirror)
        .flat_map(|a| a.extents.iter().map(|e| e.server))
        .collect();
    let servers = lock(&svc.servers).clone();
    let mut order: Vec<&ServerCapacity> = caps
        .iter()
        .filter(|c| c.health == Health::Healthy && !taken.contains(&c.server.0))
        .collect();
    order.sort_by_key(|c| std::cmp::Reverse(c.free.0));
    let size = size.div_ceil(4096) * 4096;
    let mut extents = Vec::new();
    let mut logical = 0u64;
    'servers: for cap in order {
        let Some(s) = servers.iter().find(|s| s.id == cap.server.0) else {
            continue;
        };
        let mut used: Vec<(u64, u64)> = allocs
            .iter()
            .flat_map(|a| a.extents.iter())
            .filter(|e| e.server == s.id)
            .map(|e| (e.device_offset, e.device_offset + e.len))
            .collect();
        used.sort_unstable();
        let mut base = 0u64;
        for v in &s.volumes {
            let Some(vol) = state.volumes.get(v) else {
                continue;
            };
            let vend = base + vol.size().0 / 4096 * 4096;
            let mut pos = base;
            for &(a, b) in used.iter().filter(|(a, b)| *b > base && *a < vend) {
                if a > pos {
                    let take = (a - pos).min(size - logical);
                    extents.push(ExtentRec {
                        server: s.id,
                        device_offset: pos,
                        len: take,
                        logical_offset: logical,
                    });
                    logical += take;
                    if logical == size {
                        break 'servers;
                    }
                }
                pos = pos.max(b);
            }
            if vend > pos {
                let take = (vend - pos).min(size - logical);
                extents.push(ExtentRec {
                    server: s.id,
                    device_offset: pos,
                    len: take,
                    logical_offset: logical,
                });
                logical += take;
                if logical == size {
                    break 'servers;
                }
            }
            base += vol.size().0;
        }
    }
    if logical < size {
        return Err((
            Status::NoSpace,
            format!(
                "domain {} has {} free bytes on servers holding no leg of mirror {mirror}, {size} asked",
                site.domain, logical
            ),
        ));
    }
    allocs.push(Allocation {
        mirror_id: mirror,
        via: via.to_string(),
        size,
        extents: extents.clone(),
        generation: 0,
        split: None,
        leg,
    });
    let path = MirrorService::alloc_path(state, &site.name);
    write_json_atomically(&path, &*allocs)
        .map_err(|e| (Status::IoError, format!("{}: {e}", path.display())))?;
    tracing::info!(
        mirror,
        leg,
        size,
        extents = extents.len(),
        via,
        "allocated a mirror leg"
    );
    Ok(extents)
}

fn local_release(state: &DaemonState, mirror: u64, leg: u32) -> Status {
    let svc = &state.mirror;
    let Some(site) = svc.site() else {
        return Status::InvalidRequest;
    };
    let mut allocs = lock(&svc.allocations);
    let before = allocs.len();
    if let Some(hs) = allocs
        .iter()
        .find(|a| a.mirror_id == mirror && a.leg == leg)
        .and_then(|a| a.split.as_ref())
    {
        super::split::ops::drop_image(state, mirror, leg, &hs.image);
    }
    allocs.retain(|a| !(a.mirror_id == mirror && a.leg == leg));
    if allocs.len() == before {
        return Status::NotFound;
    }
    tracing::info!(mirror, leg, "released a mirror leg");
    if let Some(t) = lock(&svc.targets).remove(&(mirror, leg)) {
        t.released.store(true, Ordering::SeqCst);
    }
    match write_json_atomically(&MirrorService::alloc_path(state, &site.name), &*allocs) {
        Ok(()) => Status::Ok,
        Err(_) => Status::IoError,
    }
}

/// The master's choice: a domain (not the asker's) with room, and its extents.
fn master_allocate(
    state: &DaemonState,
    asker: &str,
    mirror: u64,
    leg: u32,
    size: u64,
    want: u32,
) -> Result<(u32, Vec<ExtentRec>), (Status, String)> {
    let site = state
        .mirror
        .site()
        .ok_or((Status::InvalidRequest, "site not configured".to_string()))?;
    let peers = lock(&state.mirror.peers).clone();
    let asker_domain = if asker == site.name {
        site.domain
    } else {
        peers
            .iter()
            .find(|p| p.name == asker)
            .map_or(0, |p| p.domain)
    };
    let free = |caps: &[ServerCapacity]| -> u64 {
        caps.iter()
            .filter(|c| c.health == Health::Healthy)
            .map(|c| c.free.0)
            .sum()
    };
    let mut candidates: Vec<(u32, u64)> = Vec::new();
    candidates.push((site.domain, free(&capacity(state))));
    for (d, r) in lock(&state.mirror.reports).iter() {
        if r.at.elapsed() < Duration::from_secs(10) {
            candidates.push((*d, free(&r.report.servers)));
        }
    }
    // The asker's own domain only when asked for by name: a local second
    // leg, on this site's storage servers.
    candidates.retain(|(d, f)| (*d == want || (want == 0 && *d != asker_domain)) && *f >= size);
    // A further leg of a mirror goes to a domain holding none of its legs
    // if one has room; otherwise to one that does, on other servers (that
    // domain's agent excludes servers holding a leg of the mirror, and
    // answers NoSpace if the others lack room: then the next is tried).
    let placed = lock(&state.mirror.placements)
        .get(&mirror)
        .cloned()
        .unwrap_or_default();
    candidates.sort_by_key(|c| (placed.contains(&c.0), std::cmp::Reverse(c.1)));
    let mut last = None;
    for &(chosen, _) in &candidates {
        match master_allocate_in(state, &site, &peers, asker, mirror, leg, size, chosen) {
            Ok(ext) => {
                let mut p = lock(&state.mirror.placements);
                let v = p.entry(mirror).or_default();
                if !v.contains(&chosen) {
                    v.push(chosen);
                }
                return Ok((chosen, ext));
            }
            Err(e) => {
                tracing::info!(mirror, leg, domain = chosen, "allocation refused: {}", e.1);
                last = Some(e);
            }
        }
    }
    if let Some(e) = last {
        return Err(e);
    }
    Err((
        Status::NoSpace,
        format!(
            "no domain{} has {size} free bytes",
            if want == 0 {
                String::new()
            } else {
                format!(" {want}")
            }
        ),
    ))
}

/// The master asks domain `chosen` (itself or a peer) for the extents.
#[allow(clippy::too_many_arguments)]
fn master_allocate_in(
    state: &DaemonState,
    site: &SiteParams,
    peers: &[PeerParams],
    asker: &str,
    mirror: u64,
    leg: u32,
    size: u64,
    chosen: u32,
) -> Result<Vec<ExtentRec>, (Status, String)> {
    if chosen == site.domain {
        return local_allocate(state, mirror, leg, size, asker);
    }
    let peer = peers.iter().find(|p| p.domain == chosen).ok_or((
        Status::NotFound,
        format!("domain {chosen} has no known address"),
    ))?;
    let req = Message::AllocateRequest(AllocateRequest {
        mirror: MirrorId(mirror),
        size: ByteLen(size),
        domain: DomainId(chosen),
        leg: LegId(leg),
    });
    let replies = agent_call(site, peer.address, &req, 1).map_err(|e| (Status::Busy, e))?;
    match replies.last() {
        Some(Message::AllocateResponse(r)) if r.status == Status::Ok => {
            Ok(r.extents.iter().map(ExtentRec::from).collect())
        }
        Some(Message::AllocateResponse(r)) => {
            Err((r.status, format!("domain {chosen} refused: {:?}", r.status)))
        }
        _ => Err((Status::Busy, format!("domain {chosen} gave no allocation"))),
    }
}

// ---------------------------------------------------------------------------
// Blocking agent I/O (control plane threads only).

fn read_frame_blocking(s: &mut StdTcpStream, framer: &Framer) -> Result<Vec<u8>, String> {
    let mut buf = vec![0u8; 32];
    s.read_exact(&mut buf)
        .map_err(|e| format!("receive: {e}"))?;
    loop {
        match framer.poll(&buf).map_err(|e| format!("malformed: {e}"))? {
            Decoded::Complete { .. } => return Ok(buf),
            Decoded::NeedMore(n) => {
                let at = buf.len();
                buf.resize(at + n, 0);
                s.read_exact(&mut buf[at..])
                    .map_err(|e| format!("receive: {e}"))?;
            }
        }
    }
}

fn to_static(m: Message<'_>) -> Option<Message<'static>> {
    Some(match m {
        Message::Hello(x) => Message::Hello(x),
        Message::HelloAck(x) => Message::HelloAck(x),
        Message::Error(x) => Message::Error(x),
        Message::CapacityReport(x) => Message::CapacityReport(x),
        Message::AllocateRequest(x) => Message::AllocateRequest(x),
        Message::AllocateResponse(x) => Message::AllocateResponse(x),
        Message::ReleaseRequest(x) => Message::ReleaseRequest(x),
        Message::ReleaseAck(x) => Message::ReleaseAck(x),
        Message::SplitCtl(x) => Message::SplitCtl(x),
        Message::SplitCtlResp(x) => Message::SplitCtlResp(x),
        _ => return None,
    })
}

fn recv_blocking(s: &mut StdTcpStream, framer: &Framer) -> Result<Message<'static>, String> {
    let buf = read_frame_blocking(s, framer)?;
    match framer
        .decode_message(&buf)
        .map_err(|e| format!("malformed: {e}"))?
    {
        Decoded::Complete { value: (_, m), .. } => {
            to_static(m).ok_or_else(|| "unexpected message".to_string())
        }
        Decoded::NeedMore(_) => Err("short frame".into()),
    }
}

fn send_blocking(s: &mut StdTcpStream, framer: &Framer, m: &Message<'_>) -> Result<(), String> {
    let bytes = m
        .encode_to_vec(framer, RequestTag(0))
        .map_err(|e| e.to_string())?;
    s.write_all(&bytes).map_err(|e| format!("send: {e}"))
}

/// Connects to an agent, authenticates, sends `req` and reads `replies` messages.
pub(super) fn agent_call(
    site: &SiteParams,
    addr: SocketAddr,
    req: &Message<'_>,
    replies: usize,
) -> Result<Vec<Message<'static>>, String> {
    let cfg = hs_config(site).map_err(|e| e.message)?;
    let mut s = StdTcpStream::connect_timeout(&addr, Duration::from_secs(3))
        .map_err(|e| format!("connect {addr}: {e}"))?;
    let _ = s.set_read_timeout(Some(Duration::from_secs(15)));
    let _ = s.set_write_timeout(Some(Duration::from_secs(15)));
    let _ = s.set_nodelay(true);
    let mut framer = Framer::default();
    let (mut m, hello) = Initiator::start(cfg).map_err(|e| e.to_string())?;
    send_blocking(&mut s, &framer, &hello)?;
    loop {
        let msg = recv_blocking(&mut s, &framer)?;
        if let Message::Error(e) = &msg {
            return Err(format!("{addr} refused: {:?}: {}", e.code, e.text));
        }
        let step = m
            .handle(&msg)
            .map_err(|e| format!("handshake with {addr}: {e}"))?;
        for x in &step.send {
            send_blocking(&mut s, &framer, x)?;
        }
        if let Some(est) = step.established {
            framer = framer.with_version(est.version);
            break;
        }
    }
    send_blocking(&mut s, &framer, req)?;
    let mut out = Vec::new();
    for _ in 0..replies {
        let msg = recv_blocking(&mut s, &framer)?;
        if let Message::Error(e) = &msg {
            return Err(format!("{addr}: {:?}: {}", e.code, e.text));
        }
        out.push(msg);
    }
    Ok(out)
}

/// Serves one agent request on a plain thread.
fn serve_agent(
    state: Arc<DaemonState>,
    mut s: StdTcpStream,
    framer: Framer,
    peer: String,
    first: Message<'static>,
) {
    let _ = s.set_read_timeout(Some(Duration::from_secs(15)));
    let _ = s.set_nonblocking(false);
    let reply: Vec<Message<'static>> = match first {
        Message::CapacityReport(r) => {
            if state.mirror.site().is_some_and(|x| x.master) {
                lock(&state.mirror.reports).insert(
                    r.domain.0,
                    Report {
                        report: r,
                        at: Instant::now(),
                    },
                );
            }
            Vec::new()
        }
        Message::AllocateRequest(r) => {
            let site = state.mirror.site();
            let master = site.as_ref().is_some_and(|x| x.master);
            let res = if master {
                master_allocate(&state, &peer, r.mirror.0, r.leg.0, r.size.0, r.domain.0)
            } else {
                local_allocate(&state, r.mirror.0, r.leg.0, r.size.0, &peer)
                    .map(|e| (site.as_ref().map_or(0, |x| x.domain), e))
            };
            match res {
                Ok((domain, ext)) => {
                    let mut v = Vec::new();
                    if master {
                        v.push(Message::CapacityReport(CapacityReport {
                            domain: DomainId(domain),
                            reported_at: Timestamp(now_ns()),
                            servers: Vec::new(),
                        }));
                    }
                    v.push(Message::AllocateResponse(AllocateResponse {
                        mirror: r.mirror,
                        status: Status::Ok,
                        extents: ext.iter().map(Extent::from).collect(),
                    }));
                    v
                }
                Err((status, why)) => {
                    tracing::warn!(mirror = r.mirror.0, "allocation for {peer} failed: {why}");
                    let mut v = Vec::new();
                    if master {
                        v.push(Message::CapacityReport(CapacityReport {
                            domain: DomainId(0),
                            reported_at: Timestamp(now_ns()),
                            servers: Vec::new(),
                        }));
                    }
                    v.push(Message::AllocateResponse(AllocateResponse {
                        mirror: r.mirror,
                        status,
                        extents: Vec::new(),
                    }));
                    v
                }
            }
        }
        Message::ReleaseRequest(r) => {
            let site = state.mirror.site();
            let status = match site {
                Some(s) if s.master && r.domain.0 != s.domain => {
                    let peer = lock(&state.mirror.peers)
                        .iter()
                        .find(|p| p.domain == r.domain.0)
                        .cloned();
                    match peer.map(|p| agent_call(&s, p.address, &Message::ReleaseRequest(r), 1)) {
                        Some(Ok(v)) => match v.last() {
                            Some(Message::ReleaseAck(a)) => a.status,
                            _ => Status::Busy,
                        },
                        _ => Status::NotFound,
                    }
                }
                _ => local_release(&state, r.mirror.0, r.leg.0),
            };
            vec![Message::ReleaseAck(ReleaseAck {
                mirror: r.mirror,
                status,
            })]
        }
        Message::SplitCtl(c) => vec![super::split::ops::hosted_ctl(&state, &c)],
        _ => vec![Message::Error(ErrorMsg {
            code: ErrorCode::UnexpectedMessage,
            text: "not an agent request".into(),
        })],
    };
    for m in &reply {
        if let Err(e) = send_blocking(&mut s, &framer, m) {
            tracing::debug!("agent reply to {peer}: {e}");
            return;
        }
    }
}

// ---------------------------------------------------------------------------
// Incoming connections and hosted legs.

async fn handle_conn(state: Arc<DaemonState>, stream: TcpStream, peer: SocketAddr) {
    let Some(site) = state.mirror.site() else {
        return;
    };
    let Ok(cfg) = hs_config(&site) else {
        return;
    };
    let conn = Conn::new(stream);
    let est = match conn.handshake_acceptor(cfg, Duration::from_secs(5)).await {
        Ok(e) => e,
        Err(e) => {
            tracing::warn!(%peer, "mirror peer refused: {e}");
            return;
        }
    };
    let first = match conn.recv().await {
        Ok(f) => f,
        Err(e) => {
            tracing::debug!(%peer, "mirror peer left after the handshake: {e}");
            return;
        }
    };
    let framer = conn.framer();
    let (tag, msg) = match first.message(&framer) {
        Ok(x) => x,
        Err(e) => {
            tracing::warn!(%peer, "malformed first message, dropping the link: {e}");
            conn.abort();
            return;
        }
    };
    match msg {
        Message::GenerationExchange(g) => {
            drop(first);
            serve_leg(state, Rc::new(conn), tag, g, peer).await;
        }
        other => match to_static(other) {
            Some(m) => {
                let name = est.peer_name.to_string();
                drop(first);
                match conn.into_std() {
                    Some(s) => {
                        let _ = std::thread::Builder::new()
                            .name("agent-serve".into())
                            .spawn(move || serve_agent(state, s, framer, name, m));
                    }
                    None => tracing::warn!(%peer, "agent connection busy"),
                }
            }
            None => {
                tracing::warn!(%peer, "unexpected first message, dropping the link");
                conn.abort();
            }
        },
    }
}

fn leg_target(state: &DaemonState, mirror: u64, leg: u32) -> Result<Arc<LegTarget>, String> {
    let svc = &state.mirror;
    if let Some(t) = lock(&svc.targets).get(&(mirror, leg)) {
        return Ok(t.clone());
    }
    let alloc = lock(&svc.allocations)
        .iter()
        .find(|a| a.mirror_id == mirror && a.leg == leg)
        .cloned()
        .ok_or_else(|| format!("leg {leg} of mirror {mirror} is not hosted here"))?;
    let servers = lock(&svc.servers).clone();
    let mut pieces = Vec::new();
    for e in &alloc.extents {
        let s = servers
            .iter()
            .find(|s| s.id == e.server)
            .ok_or_else(|| format!("storage server {} is not configured", e.server))?;
        // Resolve the server offset to (volume, offset); an extent never
        // crosses a volume boundary.
        let mut base = 0u64;
        let mut found = None;
        for v in &s.volumes {
            let vol = state
                .volumes
                .get(v)
                .ok_or_else(|| format!("volume '{v}' of server {} is missing", s.name))?;
            let sz = vol.size().0;
            if e.device_offset >= base && e.device_offset + e.len <= base + sz {
                found = Some((vol, e.device_offset - base));
                break;
            }
            base += sz;
        }
        let (volume, offset) = found.ok_or_else(|| {
            format!(
                "extent at {} of server {} is outside its volumes",
                e.device_offset, s.name
            )
        })?;
        pieces.push(Piece {
            logical: e.logical_offset,
            len: e.len,
            volume,
            offset,
        });
    }
    let t = Arc::new(LegTarget {
        mirror,
        leg,
        size: alloc.size,
        pieces,
        gen: AtomicU64::new(alloc.generation),
        session: AtomicU64::new(u64::MAX),
        inflight: AtomicU64::new(0),
        released: AtomicBool::new(false),
        frozen: AtomicBool::new(alloc.split.is_some()),
    });
    lock(&svc.targets).insert((mirror, leg), t.clone());
    Ok(t)
}

/// Changes one hosted leg's allocation with `f` and persists the
/// allocation file (under the allocations lock, so changes never interleave).
fn update_allocation(
    state: &DaemonState,
    mirror: u64,
    leg: u32,
    f: impl FnOnce(&mut Allocation),
) -> Result<(), String> {
    let svc = &state.mirror;
    let site = svc.site().ok_or("site not configured")?;
    let mut allocs = lock(&svc.allocations);
    let a = allocs
        .iter_mut()
        .find(|a| a.mirror_id == mirror && a.leg == leg)
        .ok_or("allocation gone")?;
    f(a);
    write_json_atomically(&MirrorService::alloc_path(state, &site.name), &*allocs)
        .map_err(|e| e.to_string())
}

fn persist_generation(state: &DaemonState, mirror: u64, leg: u32, gen: u64) -> Result<(), String> {
    update_allocation(state, mirror, leg, |a| a.generation = gen)
}

/// A hosted leg's split, if any.
pub(super) fn hosted_split(
    state: &DaemonState,
    mirror: u64,
    leg: u32,
) -> Result<Option<super::split::ops::HostedSplit>, String> {
    lock(&state.mirror.allocations)
        .iter()
        .find(|a| a.mirror_id == mirror && a.leg == leg)
        .map(|a| a.split.clone())
        .ok_or_else(|| format!("no leg of mirror {mirror} is hosted here"))
}

/// Records (persists) a hosted leg's split and fences the primary's links:
/// once this returns with a split, no write of the primary is being
/// applied or will be.
pub(super) fn set_hosted_split(
    state: &DaemonState,
    mirror: u64,
    leg: u32,
    split: Option<super::split::ops::HostedSplit>,
) -> Result<(), String> {
    let svc = &state.mirror;
    let frozen = split.is_some();
    let target = lock(&svc.targets).get(&(mirror, leg)).cloned();
    if let Some(t) = &target {
        if frozen {
            t.frozen.store(true, Ordering::SeqCst);
            let t0 = Instant::now();
            while t.inflight.load(Ordering::SeqCst) != 0 && t0.elapsed() < Duration::from_secs(30) {
                std::thread::sleep(Duration::from_millis(1));
            }
        }
    }
    update_allocation(state, mirror, leg, |a| a.split = split)?;
    if let (Some(t), false) = (target, frozen) {
        t.frozen.store(false, Ordering::SeqCst);
    }
    Ok(())
}

/// One extent of a hosted leg: (logical offset, length, volume, offset in it).
pub(super) type HostedPiece = (u64, u64, Arc<Volume>, u64);

/// A hosted leg's extents.
pub(super) fn hosted_pieces(
    state: &DaemonState,
    mirror: u64,
    leg: u32,
) -> Result<Vec<HostedPiece>, String> {
    let t = leg_target(state, mirror, leg)?;
    Ok(t.pieces
        .iter()
        .map(|p| (p.logical, p.len, p.volume.clone(), p.offset))
        .collect())
}

/// Registers the image volumes of split hosted legs whose storage servers
/// are all configured (start-up replays servers after the site).
fn restore_split_images(state: &DaemonState) {
    let allocs = lock(&state.mirror.allocations).clone();
    for a in allocs {
        if let Some(hs) = &a.split {
            if let Err(e) = super::split::ops::expose(state, a.mirror_id, a.leg, hs) {
                tracing::debug!(mirror = a.mirror_id, "split image not exposed yet: {e}");
            }
        }
    }
}

struct Hosted {
    target: Arc<LegTarget>,
    chans: Vec<VolumeChannel>,
}

impl Hosted {
    async fn write(&self, offset: u64, data: IoBuf) -> Status {
        let len = data.len() as u64;
        if offset
            .checked_add(len)
            .map_or(true, |end| end > self.target.size)
        {
            return Status::OutOfRange;
        }
        let mut futs: Vec<std::pin::Pin<Box<dyn std::future::Future<Output = bool> + '_>>> =
            Vec::new();
        for (p, ch) in self.target.pieces.iter().zip(&self.chans) {
            let (a, b) = (offset.max(p.logical), (offset + len).min(p.logical + p.len));
            if a >= b {
                continue;
            }
            let Some(slice) = data.slice((a - offset) as usize, (b - a) as usize) else {
                return Status::InvalidRequest;
            };
            let at = p.offset + (a - p.logical);
            futs.push(Box::pin(async move {
                ch.write(ByteOffset(at), slice).await.0.is_ok()
            }));
        }
        if join_all(futs).await.into_iter().all(|ok| ok) {
            Status::Ok
        } else {
            Status::IoError
        }
    }

    /// Reads `len` bytes of the leg at `offset` into a pool chunk, routed
    /// by the extent map (a read crossing extents is assembled).
    async fn read(&self, offset: u64, len: usize) -> Result<IoBufMut, String> {
        let end = offset
            .checked_add(len as u64)
            .filter(|&e| e <= self.target.size)
            .ok_or_else(|| format!("read at {offset} beyond the leg"))?;
        let mut out = super::link::alloc_wait(len)
            .await
            .map_err(|e| e.to_string())?;
        for (p, ch) in self.target.pieces.iter().zip(&self.chans) {
            let (a, b) = (offset.max(p.logical), end.min(p.logical + p.len));
            if a >= b {
                continue;
            }
            let at = ByteOffset(p.offset + (a - p.logical));
            if a == offset && b == end {
                let (r, buf) = ch.read(at, out).await;
                r.map_err(|e| e.to_string())?;
                return Ok(buf);
            }
            let part = super::link::alloc_wait((b - a) as usize)
                .await
                .map_err(|e| e.to_string())?;
            let (r, part) = ch.read(at, part).await;
            r.map_err(|e| e.to_string())?;
            let dst = (a - offset) as usize;
            out[dst..dst + part.len()].copy_from_slice(&part);
        }
        Ok(out)
    }

    async fn flush(&self) -> Status {
        let futs: Vec<std::pin::Pin<Box<dyn std::future::Future<Output = bool> + '_>>> = self
            .chans
            .iter()
            .map(|c| Box::pin(async move { c.flush().await.is_ok() }) as _)
            .collect();
        if join_all(futs).await.into_iter().all(|ok| ok) {
            Status::Ok
        } else {
            Status::IoError
        }
    }
}

/// A hosted leg's link with nothing received for this long is dropped.
const LEG_IDLE_LIMIT: Duration = Duration::from_secs(15);

async fn serve_leg(
    state: Arc<DaemonState>,
    conn: Rc<Conn>,
    tag: RequestTag,
    first: GenerationExchange,
    peer: SocketAddr,
) {
    let target = match leg_target(&state, first.mirror.0, first.leg.0) {
        Ok(t) => t,
        Err(e) => {
            tracing::warn!(%peer, "mirror link refused: {e}");
            conn.refuse(Message::Error(ErrorMsg {
                code: ErrorCode::UnexpectedPeer,
                text: e,
            }))
            .await;
            return;
        }
    };
    if target.frozen.load(Ordering::SeqCst) {
        let text = format!(
            "this leg of mirror {} is split off; it takes no writes until a rejoin",
            target.mirror
        );
        tracing::info!(%peer, "{text}");
        conn.refuse(Message::Error(ErrorMsg {
            code: ErrorCode::UnexpectedPeer,
            text,
        }))
        .await;
        return;
    }
    // Fence: a new link session starts. Links of another session stop
    // applying writes (a write of a dead link still in a socket buffer must
    // not land after the primary resynced its region), and writes already
    // being applied finish before this link is answered.
    let session = tag.0 >> 32;
    target.session.store(session, Ordering::SeqCst);
    let t0 = Instant::now();
    while target.inflight.load(Ordering::SeqCst) != 0 && t0.elapsed() < Duration::from_secs(30) {
        mirrorpoint_poller::sleep(Duration::from_millis(1)).await;
    }
    let mine = target.gen.load(Ordering::SeqCst);
    let reply = GenerationExchange {
        mirror: first.mirror,
        leg: first.leg,
        current: Generation(mine),
        bitmap: Generation(0),
        history: [Generation(0); 2],
        flags: if mine != 0 {
            GenerationFlags::UP_TO_DATE
        } else {
            GenerationFlags(0)
        },
    };
    if conn
        .send(tag, &Message::GenerationExchange(reply), &[])
        .await
        .is_err()
    {
        return;
    }
    // A primary of another generation is refused, unless it names our
    // generation as the one its bitmap is relative to (the operator chose to
    // overwrite this leg, or an interrupted resync is resumed).
    if mine != 0 && first.current.0 != mine && first.bitmap.0 != mine {
        let text = format!(
            "generation mismatch: this leg of mirror {} holds generation {mine:016x}, the primary {:016x}; refusing writes",
            target.mirror, first.current.0
        );
        tracing::error!(%peer, "{text}");
        conn.refuse(Message::Error(ErrorMsg {
            code: ErrorCode::UnexpectedPeer,
            text,
        }))
        .await;
        return;
    }
    let hosted = Rc::new(Hosted {
        chans: target.pieces.iter().map(|p| p.volume.channel()).collect(),
        target,
    });
    let framer = conn.framer();
    loop {
        // The primary sends heartbeats at least every second: a link
        // silent for much longer is dead (its peer may never send a FIN).
        let mut f: RawFrame = match super::link::timeout(LEG_IDLE_LIMIT, conn.recv()).await {
            Some(Ok(f)) => f,
            Some(Err(e)) => {
                tracing::debug!(%peer, "mirror link closed: {e}");
                return;
            }
            None => {
                tracing::warn!(%peer, "mirror link silent for {LEG_IDLE_LIMIT:?}, dropping it");
                conn.abort();
                return;
            }
        };
        let (tag, msg) = match f.message(&framer) {
            Ok((tag, m)) => (tag, to_owned_leg(m)),
            Err(e) => {
                tracing::warn!(%peer, "malformed message on a mirror link, dropping it: {e}");
                conn.abort();
                return;
            }
        };
        match msg {
            LegMsg::Write { seq, offset } => {
                let Some(data) = f.take_payload() else {
                    conn.abort();
                    return;
                };
                let t = &hosted.target;
                t.inflight.fetch_add(1, Ordering::SeqCst);
                if t.session.load(Ordering::SeqCst) != session
                    || t.released.load(Ordering::SeqCst)
                    || t.frozen.load(Ordering::SeqCst)
                {
                    t.inflight.fetch_sub(1, Ordering::SeqCst);
                    tracing::info!(%peer, "write on a link of an older session fenced, dropping the link");
                    conn.abort();
                    return;
                }
                let (c, h) = (conn.clone(), hosted.clone());
                spawn(async move {
                    let status = h.write(offset, data).await;
                    h.target.inflight.fetch_sub(1, Ordering::SeqCst);
                    let _ = c
                        .send(tag, &Message::WriteAck(WriteAck { seq, status }), &[])
                        .await;
                })
                .detach();
            }
            LegMsg::Flush { seq } => {
                let (c, h) = (conn.clone(), hosted.clone());
                spawn(async move {
                    let status = h.flush().await;
                    let _ = c
                        .send(tag, &Message::FlushAck(FlushAck { seq, status }), &[])
                        .await;
                })
                .detach();
            }
            LegMsg::Digest(r) => {
                // Consistency check: digest the extents here, send only digests.
                let (c, h) = (conn.clone(), hosted.clone());
                spawn(async move {
                    let mut status = super::verify::check_request(&r, h.target.size);
                    let mut digests = Vec::new();
                    if status == Status::Ok {
                        let chunk = mirrorpoint_poller::buffer_pool().chunk_size() as u64;
                        let read = async |off: u64, n: usize| h.read(off, n).await;
                        match super::verify::digest_regions(
                            read,
                            r.offset.0,
                            r.len.0,
                            u64::from(r.region_size),
                            chunk,
                        )
                        .await
                        {
                            Ok(d) => digests = d,
                            Err(e) => {
                                tracing::warn!("digest of a hosted leg failed: {e}");
                                status = Status::IoError;
                            }
                        }
                    }
                    let list = super::wire::DigestList::from_packed(&digests).unwrap_or_default();
                    let resp = Message::RangeDigestResp(super::wire::RangeDigestResp {
                        range: r,
                        status,
                        digests: list,
                    });
                    let _ = c.send(tag, &resp, &[]).await;
                })
                .detach();
            }
            LegMsg::Read { offset, len } => {
                let (c, h) = (conn.clone(), hosted.clone());
                spawn(async move {
                    match h.read(offset, len).await {
                        Ok(b) => {
                            let b = b.freeze();
                            let resp = Message::ReadResp(super::wire::ReadResp {
                                status: Status::Ok,
                                data: &b,
                            });
                            let _ = c.send(tag, &resp, std::slice::from_ref(&b)).await;
                        }
                        Err(e) => {
                            tracing::warn!("read of a hosted leg failed: {e}");
                            let resp = Message::ReadResp(super::wire::ReadResp {
                                status: Status::IoError,
                                data: &[],
                            });
                            let _ = c.send(tag, &resp, &[]).await;
                        }
                    }
                })
                .detach();
            }
            LegMsg::Heartbeat(hb) => {
                let now = Timestamp(now_ns());
                let ack = Message::HeartbeatAck(HeartbeatAck {
                    counter: hb.counter,
                    echo_sent: hb.sent,
                    received: now,
                    replied: now,
                });
                let c = conn.clone();
                spawn(async move {
                    let _ = c.send(tag, &ack, &[]).await;
                })
                .detach();
            }
            LegMsg::Adopt(g) => {
                // Resync finished: make the data durable, then record that
                // this leg now holds the primary's generation.
                let (c, h, st) = (conn.clone(), hosted.clone(), state.clone());
                spawn(async move {
                    let mut status = h.flush().await;
                    if status == Status::Ok {
                        let (tx, rx) = oneshot();
                        let st2 = st.clone();
                        let (mirror, leg) = (h.target.mirror, h.target.leg);
                        std::thread::spawn(move || {
                            tx.send(persist_generation(&st2, mirror, leg, g.current.0))
                        });
                        match rx.await {
                            Ok(Ok(())) => h.target.gen.store(g.current.0, Ordering::SeqCst),
                            _ => status = Status::IoError,
                        }
                    }
                    let cur = h.target.gen.load(Ordering::SeqCst);
                    let reply = GenerationExchange {
                        current: Generation(cur),
                        flags: if status == Status::Ok {
                            GenerationFlags::UP_TO_DATE
                        } else {
                            GenerationFlags(0)
                        },
                        bitmap: Generation(0),
                        history: [Generation(0); 2],
                        ..g
                    };
                    let _ = c.send(tag, &Message::GenerationExchange(reply), &[]).await;
                })
                .detach();
            }
            LegMsg::Other(t) => {
                tracing::warn!(%peer, "unexpected {t} on a mirror link, dropping it");
                conn.refuse(Message::Error(ErrorMsg {
                    code: ErrorCode::UnexpectedMessage,
                    text: format!("unexpected {t}"),
                }))
                .await;
                return;
            }
        }
    }
}

enum LegMsg {
    Write {
        seq: super::wire::SeqNo,
        offset: u64,
    },
    Flush {
        seq: super::wire::SeqNo,
    },
    Heartbeat(super::wire::Heartbeat),
    Adopt(GenerationExchange),
    Digest(super::wire::RangeDigest),
    Read {
        offset: u64,
        len: usize,
    },
    Other(String),
}

fn to_owned_leg(m: Message<'_>) -> LegMsg {
    match m {
        Message::Write(w) => LegMsg::Write {
            seq: w.seq,
            offset: w.offset.0,
        },
        Message::Flush(f) => LegMsg::Flush { seq: f.seq },
        Message::Heartbeat(h) => LegMsg::Heartbeat(h),
        Message::RangeDigest(r) => LegMsg::Digest(r),
        Message::Read(r) => LegMsg::Read {
            offset: r.offset.0,
            len: r.len.0 as usize,
        },
        Message::GenerationExchange(g) if g.flags.0 & GenerationFlags::UP_TO_DATE.0 != 0 => {
            LegMsg::Adopt(g)
        }
        other => LegMsg::Other(format!("{:?}", other.msg_type())),
    }
}

// ---------------------------------------------------------------------------
// Mirrors run here as primary.

pub(super) fn record_path(state: &DaemonState, name: &str) -> PathBuf {
    MirrorService::data_dir(state).join(format!("mirror-{name}.json"))
}

fn meta_path(state: &DaemonState, name: &str) -> PathBuf {
    MirrorService::data_dir(state).join(format!("mirror-{name}.meta"))
}

fn local_state_path(state: &DaemonState, name: &str) -> PathBuf {
    MirrorService::data_dir(state).join(format!("mirror-{name}.local"))
}

/// `mirror_create`.
pub fn create(state: &Arc<DaemonState>, mut p: MirrorParams) -> Result<Value, SvcError> {
    let svc = &state.mirror;
    let site = svc
        .site()
        .ok_or_else(|| err(libc::EINVAL, "configure the site first (agent_set_site)"))?;
    if lock(&svc.mirrors).iter().any(|(x, _)| x.name == p.name)
        || state.volumes.get(&p.name).is_some()
    {
        return Err(err(
            libc::EEXIST,
            format!("a volume named '{}' exists", p.name),
        ));
    }
    let region_size = p.region_size.unwrap_or(64 << 10);
    let ack = match p.ack.as_deref() {
        None | Some("sync") => AckPolicy::Sync,
        Some("async") => AckPolicy::Async,
        Some(x) => {
            return Err(err(
                libc::EINVAL,
                format!("ack must be \"sync\" or \"async\", not \"{x}\""),
            ))
        }
    };
    if let Some(t) = p.failed_timeout_ms {
        if t < super::legops::MIN_FAILED_TIMEOUT_MS {
            return Err(err(
                libc::EINVAL,
                format!(
                    "failed_timeout_ms: must be at least {}, not {t}",
                    super::legops::MIN_FAILED_TIMEOUT_MS
                ),
            ));
        }
    }
    std::fs::create_dir_all(MirrorService::data_dir(state))
        .map_err(|e| err(libc::EIO, e.to_string()))?;
    let local = match (&p.volume, p.size) {
        (Some(v), _) => state
            .volumes
            .get(v)
            .ok_or_else(|| err(libc::ENODEV, format!("no volume named '{v}'")))?,
        (None, Some(size)) => {
            let name = format!("{}_local", p.name);
            let v = state
                .volumes
                .create(crate::volume::VolumeSpec::Uring(
                    crate::volume::registry::UringParams {
                        name: name.clone(),
                        filename: MirrorService::data_dir(state).join(format!("{name}.img")),
                        block_size: None,
                        size: Some(size),
                        queue_depth: None,
                        uuid: None,
                    },
                ))
                .map_err(|e| err(libc::EINVAL, e.to_string()))?;
            p.volume = Some(name);
            p.size = None;
            v
        }
        (None, None) => return Err(err(libc::EINVAL, "give the local volume or a size")),
    };
    if local.mirror().is_some() {
        return Err(err(libc::EINVAL, "the local volume is itself a mirror"));
    }
    let claim = ClaimGuard::take(&state.volumes, local.name(), &mirror_owner(&p.name))
        .map_err(|e| err(libc::EBUSY, e.to_string()))?;
    let size = local.size().0;
    let rpath = record_path(state, &p.name);
    let record: MirrorRecord = if rpath.exists() {
        let text = std::fs::read_to_string(&rpath)
            .map_err(|e| err(libc::EIO, format!("{}: {e}", rpath.display())))?;
        let r: MirrorRecord = serde_json::from_str(&text)
            .map_err(|e| err(libc::EINVAL, format!("{}: {e}", rpath.display())))?;
        if p.mirror_id.is_some_and(|id| id != r.mirror_id) || r.size != size {
            return Err(err(
                libc::EINVAL,
                format!(
                    "{} describes another mirror (id {}, {} bytes)",
                    rpath.display(),
                    r.mirror_id,
                    r.size
                ),
            ));
        }
        r
    } else {
        let id = p
            .mirror_id
            .unwrap_or_else(|| super::meta::random_gen() >> 1);
        let leg = allocate_leg(state, &site, id, 0, size, p.domain.unwrap_or(0))?;
        let r = MirrorRecord {
            mirror_id: id,
            size,
            legs: vec![leg],
            next_leg_id: 1,
            pending_release: Vec::new(),
            replacing: None,
        };
        write_json_atomically(&rpath, &r)
            .map_err(|e| err(libc::EIO, format!("{}: {e}", rpath.display())))?;
        r
    };
    p.mirror_id = Some(record.mirror_id);
    let slots = (0..record.legs.len())
        .map(|i| record.slot_of(i) + 1)
        .max()
        .unwrap_or(0);
    let meta = MirrorMeta::open(&meta_path(state, &p.name), size, region_size, slots, true)
        .map_err(|e| err(libc::EIO, e.to_string()))?;
    let spare = match &p.spare_bdev {
        Some(s) => Some(
            state
                .volumes
                .get(s)
                .ok_or_else(|| err(libc::EINVAL, format!("spare_bdev: no volume named '{s}'")))?,
        ),
        None => None,
    };
    let (recovery, device) = LocalRecovery::open(
        &local_state_path(state, &p.name),
        local.clone(),
        region_size,
    )
    .map_err(|e| err(libc::EINVAL, e.to_string()))?;
    let mut extra_claims = Vec::new();
    if let Some(d) = device.filter(|d| d != local.name()) {
        // A replacement was installed before the last stop.
        let v = state.volumes.get(&d).ok_or_else(|| {
            err(
                libc::ENODEV,
                format!("the local device was replaced by '{d}', which does not exist"),
            )
        })?;
        extra_claims.push(
            ClaimGuard::take(&state.volumes, &d, &mirror_owner(&p.name))
                .map_err(|e| err(libc::EBUSY, e.to_string()))?,
        );
        recovery
            .set_device(v)
            .map_err(|e| err(libc::EINVAL, e.to_string()))?;
    }
    if let Some(s) = spare.filter(|s| s.name() != recovery.device().name()) {
        extra_claims.push(
            ClaimGuard::take(&state.volumes, s.name(), &mirror_owner(&p.name))
                .map_err(|e| err(libc::EBUSY, format!("spare_bdev: {e}")))?,
        );
        recovery
            .set_spare(s)
            .map_err(|e| err(libc::EINVAL, e.to_string()))?;
    }
    let cfg = EngineConfig {
        recovery,
        ack,
        max_lag_ios: p.max_lag_ios.unwrap_or(64),
        resync_rate: p.resync_rate.unwrap_or(256 << 20),
        link_timeout: Duration::from_millis(p.link_timeout_ms.unwrap_or(3000).max(100)),
    };
    let legs = record
        .legs
        .iter()
        .enumerate()
        .map(|(i, l)| LegConfig {
            site: l.site.clone(),
            address: l.address,
            split: l.split.is_some(),
            slot: record.slot_of(i),
            leg_id: l.leg_id,
        })
        .collect();
    let hs = hs_config(&site)?;
    let engine = Mirror::start(
        p.name.clone(),
        MirrorId(record.mirror_id),
        local.clone(),
        meta.clone(),
        legs,
        cfg,
        hs,
        state.reactors.clone(),
    )
    .map_err(|e| err(libc::EINVAL, format!("{}: {e}", rpath.display())))?;
    let vol = Volume::new(
        p.name.clone(),
        random_uuid(),
        local.block_size(),
        local.num_blocks(),
        crate::volume::Backend::Mirror(engine.clone()),
    );
    if let Err(e) = state.volumes.register(vol) {
        engine.stop();
        return Err(err(libc::EEXIST, e.to_string()));
    }
    for (i, l) in record.legs.iter().enumerate() {
        engine.set_split_info(record.slot_of(i), l.split.clone());
    }
    super::split::ops::recover(state, &engine);
    super::verify::resume(&engine);
    claim.keep();
    extra_claims.into_iter().for_each(ClaimGuard::keep);
    lock(&svc.mirrors).push((p.clone(), engine));
    super::legops::start_monitor(state);
    tracing::info!(
        mirror = p.name,
        id = record.mirror_id,
        legs = record.legs.len(),
        recovered = meta.recovered_from_al,
        "mirror created"
    );
    Ok(
        json!({"name": p.name, "mirror_id": record.mirror_id, "legs": record.legs.iter().enumerate().map(|(i, l)| json!({"leg": record.slot_of(i), "leg_id": l.leg_id, "site": l.site, "domain": l.domain, "address": l.address.to_string(), "extents": l.extents})).collect::<Vec<_>>()}),
    )
}

/// Asks the master (or, on the master, decides) for leg `leg_id` of
/// mirror `id`: returns the leg's record (domain, address, extent map),
/// allocated and persisted by the domain's agent.
pub(super) fn allocate_leg(
    state: &DaemonState,
    site: &SiteParams,
    id: u64,
    leg_id: u32,
    size: u64,
    want: u32,
) -> Result<LegRecord, SvcError> {
    let svc = &state.mirror;
    let (domain, extents) = if site.master {
        master_allocate(state, &site.name, id, leg_id, size, want)
            .map_err(|(s, e)| err(-status_errno(s), e))?
    } else {
        let master = lock(&svc.peers)
            .iter()
            .find(|x| x.master)
            .cloned()
            .ok_or_else(|| {
                err(
                    libc::EINVAL,
                    "no master agent configured (agent_add_peer with master: true)",
                )
            })?;
        let req = Message::AllocateRequest(AllocateRequest {
            mirror: MirrorId(id),
            size: ByteLen(size),
            domain: DomainId(want),
            leg: LegId(leg_id),
        });
        let replies = agent_call(site, master.address, &req, 2)
            .map_err(|e| err(libc::EHOSTUNREACH, format!("master agent: {e}")))?;
        match (replies.first(), replies.get(1)) {
            (Some(Message::CapacityReport(c)), Some(Message::AllocateResponse(a)))
                if a.status == Status::Ok =>
            {
                (c.domain.0, a.extents.iter().map(ExtentRec::from).collect())
            }
            (_, Some(Message::AllocateResponse(a))) => {
                return Err(err(
                    -status_errno(a.status),
                    format!(
                        "master agent could not allocate {size} bytes: {:?}",
                        a.status
                    ),
                ))
            }
            _ => return Err(err(libc::EPROTO, "master agent gave no allocation")),
        }
    };
    // A leg in our own domain (asked for by name) is served by this daemon's
    // own leg service, like any other leg.
    let (leg_site, leg_address) = if domain == site.domain {
        (site.name.clone(), site.listen)
    } else {
        let peer = lock(&svc.peers)
            .iter()
            .find(|x| x.domain == domain)
            .cloned()
            .ok_or_else(|| {
                err(
                    libc::EINVAL,
                    format!(
                        "domain {domain} was chosen but no peer of that domain is configured here"
                    ),
                )
            })?;
        (peer.name, peer.address)
    };
    Ok(LegRecord {
        site: leg_site,
        domain,
        address: leg_address,
        extents,
        slot: None,
        leg_id,
        split: None,
    })
}

/// Releases a leg's allocation at its agent (through the master unless
/// this is the master).
pub(super) fn release_leg(
    state: &DaemonState,
    site: &SiteParams,
    mirror: u64,
    leg: &LegRecord,
) -> Result<(), String> {
    let req = Message::ReleaseRequest(ReleaseRequest {
        mirror: MirrorId(mirror),
        domain: DomainId(leg.domain),
        leg: LegId(leg.leg_id),
    });
    let addr = if site.master {
        leg.address
    } else {
        lock(&state.mirror.peers)
            .iter()
            .find(|x| x.master)
            .map(|m| m.address)
            .ok_or("no master agent configured")?
    };
    let replies = agent_call(site, addr, &req, 1)?;
    match replies.last() {
        Some(Message::ReleaseAck(a)) if a.status == Status::Ok || a.status == Status::NotFound => {
            Ok(())
        }
        Some(Message::ReleaseAck(a)) => Err(format!("release refused: {:?}", a.status)),
        _ => Err("no release acknowledgement".into()),
    }
}

pub(super) fn status_errno(s: Status) -> i32 {
    match s {
        Status::NoSpace => -libc::ENOSPC,
        Status::NotFound => -libc::ENOENT,
        Status::Busy => -libc::EBUSY,
        _ => -libc::EIO,
    }
}

/// `mirror_delete`: stops the mirror, releases its remote legs, removes its state.
pub fn delete(state: &Arc<DaemonState>, name: &str) -> Result<Value, SvcError> {
    let svc = &state.mirror;
    // Not while a leg of it is being added, removed or replaced.
    let _ops = lock(&svc.leg_ops);
    if state.iscsi.volume_in_use(name) {
        return Err(err(
            libc::EBUSY,
            format!("mirror '{name}' is exported over iSCSI: remove it from its target node first"),
        ));
    }
    let (p, m) = {
        let mut ms = lock(&svc.mirrors);
        let pos = ms
            .iter()
            .position(|(p, _)| p.name == name)
            .ok_or_else(|| err(libc::ENODEV, format!("no mirror named '{name}'")))?;
        ms.remove(pos)
    };
    let _ = state.volumes.delete(name);
    // Hosts connected over NVMe/TCP see the namespace go (as for bdev_delete).
    state.nvmf.remove_volume(name);
    m.stop();
    state.volumes.release(m.local().name(), &mirror_owner(name));
    // A replaced local volume and the spare are claimed too.
    for v in [p.volume.as_deref(), p.spare_bdev.as_deref()]
        .into_iter()
        .flatten()
    {
        state.volumes.release(v, &mirror_owner(name));
    }
    super::verify::forget(&m);
    let rpath = record_path(state, name);
    if let (Some(site), Ok(text)) = (svc.site(), std::fs::read_to_string(&rpath)) {
        if let Ok(r) = serde_json::from_str::<MirrorRecord>(&text) {
            for leg in r.legs.iter().chain(&r.pending_release) {
                if let Err(e) = release_leg(state, &site, r.mirror_id, leg) {
                    tracing::warn!(mirror = name, "releasing the leg at {}: {e}", leg.site);
                }
            }
        }
    }
    // A mirror created later under this name starts with a clean history.
    lock(&svc.policies).remove(name);
    let _ = std::fs::remove_file(&rpath);
    let _ = std::fs::remove_file(meta_path(state, name));
    let _ = std::fs::remove_file(local_state_path(state, name));
    let _ = p;
    Ok(Value::Bool(true))
}

/// `mirror_get_status`.
pub fn status(state: &DaemonState, name: Option<&str>) -> Result<Value, SvcError> {
    let ms = lock(&state.mirror.mirrors);
    let out: Vec<Value> = ms
        .iter()
        .filter(|(p, _)| name.map_or(true, |n| n == p.name))
        .map(|(p, m)| {
            let mut v = json!(m.status());
            let job = super::verify::snapshot(m);
            v["out_of_sync"] = json!(job.out_of_sync);
            v["verify"] = json!(job);
            super::legops::decorate_status(state, p, &mut v);
            v
        })
        .collect();
    if let Some(n) = name {
        if out.is_empty() {
            return Err(err(libc::ENODEV, format!("no mirror named '{n}'")));
        }
    }
    Ok(Value::Array(out))
}

/// `mirror_set_resync_rate`.
pub fn set_resync_rate(state: &DaemonState, name: &str, bps: u64) -> Result<Value, SvcError> {
    let ms = lock(&state.mirror.mirrors);
    let (_, m) = ms
        .iter()
        .find(|(p, _)| p.name == name)
        .ok_or_else(|| err(libc::ENODEV, format!("no mirror named '{name}'")))?;
    m.set_resync_rate(bps);
    Ok(Value::Bool(true))
}

/// `mirror_recover_local` parameters.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RecoverParams {
    name: String,
    #[serde(default)]
    source_leg: Option<usize>,
    #[serde(default)]
    replacement_bdev: Option<String>,
}

/// `mirror_recover_local`: rebuilds the local device (the same one once it
/// works again, or a replacement volume) from a remote leg while I/O goes on.
fn recover_local(state: &DaemonState, p: RecoverParams) -> Result<Value, SvcError> {
    let replacement = match &p.replacement_bdev {
        Some(r) => {
            let v = state.volumes.get(r).ok_or_else(|| {
                err(
                    libc::EINVAL,
                    format!("replacement_bdev: no volume named '{r}'"),
                )
            })?;
            if v.mirror().is_some() {
                return Err(err(
                    libc::EINVAL,
                    format!("replacement_bdev: volume '{r}' is itself a mirror"),
                ));
            }
            // Claimed for the mirror (refused if another owner has it).
            let g = ClaimGuard::take(&state.volumes, r, &mirror_owner(&p.name))
                .map_err(|e| err(libc::EINVAL, format!("replacement_bdev: {e}")))?;
            Some((v, g))
        }
        None => None,
    };
    let (replacement, guard) = match replacement {
        Some((v, g)) => (Some(v), Some(g)),
        None => (None, None),
    };
    let ms = lock(&state.mirror.mirrors);
    let (_, m) = ms
        .iter()
        .find(|(x, _)| x.name == p.name)
        .ok_or_else(|| err(libc::ENODEV, format!("no mirror named '{}'", p.name)))?;
    let previous = m.local();
    super::engine::recovery::start_recover(m, p.source_leg, replacement).map_err(|e| match e {
        RecoverError::Invalid(msg) => err(libc::EINVAL, msg),
        RecoverError::Busy(msg) => err(libc::EBUSY, msg),
        e @ RecoverError::Io { .. } => err(libc::EIO, e.to_string()),
    })?;
    if let Some(g) = guard {
        g.keep();
        // The old device is no longer the mirror's: the operator may delete it.
        if previous.name() != m.local().name() {
            state
                .volumes
                .release(previous.name(), &mirror_owner(&p.name));
        }
    }
    Ok(Value::Bool(true))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ResolveParams {
    name: String,
    #[serde(default)]
    leg: usize,
    action: String,
}

/// `mirror_resolve`: the operator's decision for a refused leg.
fn resolve(state: &DaemonState, p: ResolveParams) -> Result<Value, SvcError> {
    let ms = lock(&state.mirror.mirrors);
    let (_, m) = ms
        .iter()
        .find(|(x, _)| x.name == p.name)
        .ok_or_else(|| err(libc::ENODEV, format!("no mirror named '{}'", p.name)))?;
    match p.action.as_str() {
        "overwrite_leg" => m.overwrite_leg(p.leg).map_err(|e| err(libc::EINVAL, e))?,
        other => {
            return Err(err(
                libc::EINVAL,
                format!("action must be \"overwrite_leg\", not \"{other}\""),
            ))
        }
    }
    Ok(Value::Bool(true))
}

/// `agent_get_sites`.
pub fn sites(state: &DaemonState) -> Value {
    let svc = &state.mirror;
    let site = svc.site();
    let reports = lock(&svc.reports);
    let peers: Vec<Value> = lock(&svc.peers)
        .iter()
        .map(|p| {
            let r = reports.get(&p.domain);
            json!({
                "name": p.name, "domain": p.domain, "address": p.address.to_string(), "master": p.master,
                "last_report_ms": r.map(|r| r.at.elapsed().as_millis() as u64),
                "free_bytes": r.map(|r| r.report.servers.iter().filter(|c| c.health == Health::Healthy).map(|c| c.free.0).sum::<u64>()),
                "servers": r.map(|r| r.report.servers.iter().map(|c| json!({"id": c.server.0, "health": format!("{:?}", c.health).to_lowercase(), "total": c.total.0, "free": c.free.0})).collect::<Vec<_>>()),
            })
        })
        .collect();
    let servers: Vec<Value> = capacity(state)
        .iter()
        .map(|c| {
            let name = lock(&svc.servers).iter().find(|s| s.id == c.server.0).map(|s| (s.name.clone(), s.volumes.clone()));
            json!({"id": c.server.0, "name": name.as_ref().map(|n| n.0.clone()), "volumes": name.map(|n| n.1), "health": format!("{:?}", c.health).to_lowercase(), "total": c.total.0, "free": c.free.0})
        })
        .collect();
    json!({
        "site": site.as_ref().map(|s| json!({"name": s.name, "domain": s.domain, "master": s.master, "listen": lock(&svc.listening).map(|a| a.to_string())})),
        "peers": peers,
        "storage_servers": servers,
        "hosted_legs": lock(&svc.allocations).iter().map(|a| json!({"mirror_id": a.mirror_id, "via": a.via, "size": a.size, "extents": a.extents, "generation": format!("{:016x}", a.generation)})).collect::<Vec<_>>(),
    })
}

// ---------------------------------------------------------------------------
// RPC methods.

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NameOnly {
    name: String,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct MaybeName {
    #[serde(default)]
    name: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RateParams {
    name: String,
    bytes_per_second: u64,
}

pub(super) fn rpc_err(e: SvcError) -> crate::rpc::RpcError {
    if e.errno == libc::EINVAL {
        crate::rpc::RpcError::invalid_params(e.message)
    } else {
        crate::rpc::RpcError::app(-e.errno.abs(), e.message)
    }
}

/// Registers `agent_*` and `mirror_*`.
pub fn register(
    methods: &crate::rpc::MethodRegistry,
    state: &Arc<DaemonState>,
) -> Result<(), crate::rpc::RegisterError> {
    use crate::rpc::parse_params;
    let s = state.clone();
    methods.register("agent_set_site", move |p| {
        set_site(&s, parse_params(p)?).map_err(rpc_err)
    })?;
    let s = state.clone();
    methods.register("agent_add_peer", move |p| {
        add_peer(&s, parse_params(p)?).map_err(rpc_err)
    })?;
    let s = state.clone();
    methods.register("agent_add_storage_server", move |p| {
        add_storage_server(&s, parse_params(p)?).map_err(rpc_err)
    })?;
    let s = state.clone();
    methods.register("agent_get_sites", move |p| {
        let _: serde_json::Map<String, Value> = parse_params(p)?;
        Ok(sites(&s))
    })?;
    let s = state.clone();
    methods.register("mirror_create", move |p| {
        create(&s, parse_params(p)?).map_err(rpc_err)
    })?;
    let s = state.clone();
    methods.register("mirror_delete", move |p| {
        let n: NameOnly = parse_params(p)?;
        delete(&s, &n.name).map_err(rpc_err)
    })?;
    let s = state.clone();
    methods.register("mirror_get_status", move |p| {
        let n: MaybeName = parse_params(p)?;
        status(&s, n.name.as_deref()).map_err(rpc_err)
    })?;
    let s = state.clone();
    methods.register("mirror_resolve", move |p| {
        resolve(&s, parse_params(p)?).map_err(rpc_err)
    })?;
    let s = state.clone();
    methods.register("mirror_recover_local", move |p| {
        recover_local(&s, parse_params(p)?).map_err(rpc_err)
    })?;
    let s = state.clone();
    methods.register("mirror_set_resync_rate", move |p| {
        let r: RateParams = parse_params(p)?;
        set_resync_rate(&s, &r.name, r.bytes_per_second).map_err(rpc_err)
    })?;
    register_verify(methods, state)?;
    super::legops::register(methods, state)?;
    super::split::ops::register(methods, state)?;
    Ok(())
}

// ---------------------------------------------------------------------------
// Diagnostic I/O through the volume API (tests, kill -9 drills, operators
// checking a leg): deterministic patterns and checksums.

/// The byte at `pos` of the pattern of `seed` (what `bdev_write_pattern` writes).
pub fn pattern_byte(seed: u64, pos: u64) -> u8 {
    let x =
        (seed ^ (pos / 8).wrapping_mul(0x9e37_79b9_7f4a_7c15)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    (x >> ((pos % 8) * 8)) as u8
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PatternParams {
    name: String,
    offset: u64,
    len: u64,
    seed: u64,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CrcParams {
    name: String,
    offset: u64,
    len: u64,
}

fn pick_reactor(state: &DaemonState) -> Option<mirrorpoint_poller::ReactorHandle> {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let n = state.reactors.len().max(1) as u64;
    state
        .reactors
        .get((NEXT.fetch_add(1, Ordering::Relaxed) % n) as usize)
        .cloned()
}

/// Registers `bdev_write_pattern` and `bdev_read_crc`.
pub fn register_diag(
    methods: &crate::rpc::MethodRegistry,
    state: &Arc<DaemonState>,
) -> Result<(), crate::rpc::RegisterError> {
    use crate::rpc::{parse_params, RpcError};
    let s = state.clone();
    methods.register("bdev_write_pattern", move |p| {
        let p: PatternParams = parse_params(p)?;
        let vol = s
            .volumes
            .get(&p.name)
            .ok_or_else(|| RpcError::app(-libc::ENODEV, format!("no volume named '{}'", p.name)))?;
        let r = pick_reactor(&s).ok_or_else(|| RpcError::internal("no reactor"))?;
        let res = r
            .block_on(move || async move {
                let ch = vol.channel();
                let chunk = mirrorpoint_poller::buffer_pool().chunk_size() as u64;
                let mut off = p.offset;
                let end = p.offset.saturating_add(p.len);
                while off < end {
                    let n = chunk.min(end - off);
                    let mut b = super::link::alloc_wait(n as usize)
                        .await
                        .map_err(|e| e.to_string())?;
                    for (i, x) in b.iter_mut().enumerate() {
                        *x = pattern_byte(p.seed, off + i as u64);
                    }
                    let (r, _) = ch.write(ByteOffset(off), b.freeze()).await;
                    r.map_err(|e| e.to_string())?;
                    off += n;
                }
                Ok::<(), String>(())
            })
            .map_err(|_| RpcError::internal("reactor stopped"))?;
        res.map_err(|e| RpcError::app(-libc::EIO, e))?;
        Ok(Value::Bool(true))
    })?;
    let s = state.clone();
    methods.register("bdev_read_crc", move |p| {
        let p: CrcParams = parse_params(p)?;
        let vol = s
            .volumes
            .get(&p.name)
            .ok_or_else(|| RpcError::app(-libc::ENODEV, format!("no volume named '{}'", p.name)))?;
        let r = pick_reactor(&s).ok_or_else(|| RpcError::internal("no reactor"))?;
        let res = r
            .block_on(move || async move {
                let ch = vol.channel();
                let chunk = mirrorpoint_poller::buffer_pool().chunk_size() as u64;
                let mut crc = 0u32;
                let mut off = p.offset;
                let end = p.offset.saturating_add(p.len);
                while off < end {
                    let n = chunk.min(end - off);
                    let b = super::link::alloc_wait(n as usize)
                        .await
                        .map_err(|e| e.to_string())?;
                    let (r, b) = ch.read(ByteOffset(off), b).await;
                    r.map_err(|e| e.to_string())?;
                    crc = crc32c::crc32c_append(crc, &b);
                    off += n;
                }
                Ok::<u32, String>(crc)
            })
            .map_err(|_| RpcError::internal("reactor stopped"))?;
        let crc = res.map_err(|e| RpcError::app(-libc::EIO, e))?;
        Ok(json!({"crc32c": crc}))
    })?;
    Ok(())
}

// ---------------------------------------------------------------------------
// Consistency check and repair (mirror::verify).

fn find_mirror(state: &DaemonState, name: &str) -> Result<Arc<Mirror>, SvcError> {
    lock(&state.mirror.mirrors)
        .iter()
        .find(|(p, _)| p.name == name)
        .map(|(_, m)| m.clone())
        .ok_or_else(|| err(libc::ENODEV, format!("no mirror named '{name}'")))
}

fn verify_err(e: super::verify::VerifyError) -> SvcError {
    use super::verify::VerifyError as E;
    let errno = match &e {
        E::Busy(_) => libc::EBUSY,
        E::NotRunning(_) | E::NothingToRepair(_) => libc::EALREADY,
        E::Param { .. } => libc::EINVAL,
        E::Io { .. } => libc::EIO,
    };
    err(errno, e.to_string())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct VerifyParams {
    name: String,
    /// Bytes per second (0: no cap); default 256 MiB/s.
    #[serde(default)]
    rate: Option<u64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RepairParams {
    name: String,
    direction: super::verify::Direction,
    #[serde(default)]
    leg: Option<usize>,
    #[serde(default)]
    rate: Option<u64>,
}

/// Registers `mirror_verify`, `mirror_verify_cancel`, `mirror_verify_get`,
/// `mirror_verify_set_rate` and `mirror_repair`.
fn register_verify(
    methods: &crate::rpc::MethodRegistry,
    state: &Arc<DaemonState>,
) -> Result<(), crate::rpc::RegisterError> {
    use super::verify;
    use crate::rpc::parse_params;
    let s = state.clone();
    methods.register("mirror_verify", move |p| {
        let p: VerifyParams = parse_params(p)?;
        let m = find_mirror(&s, &p.name).map_err(rpc_err)?;
        let job = verify::start(&m, p.rate)
            .map_err(verify_err)
            .map_err(rpc_err)?;
        Ok(json!({"started": true, "total_bytes": job.total_bytes, "rate_limit": job.rate_limit}))
    })?;
    let s = state.clone();
    methods.register("mirror_verify_cancel", move |p| {
        let n: NameOnly = parse_params(p)?;
        let m = find_mirror(&s, &n.name).map_err(rpc_err)?;
        verify::cancel(&m).map_err(verify_err).map_err(rpc_err)?;
        Ok(Value::Bool(true))
    })?;
    let s = state.clone();
    methods.register("mirror_verify_get", move |p| {
        let n: NameOnly = parse_params(p)?;
        let m = find_mirror(&s, &n.name).map_err(rpc_err)?;
        let mut v = json!(verify::snapshot(&m));
        v["active"] = json!(verify::is_running(&m));
        Ok(v)
    })?;
    let s = state.clone();
    methods.register("mirror_verify_set_rate", move |p| {
        let r: RateParams = parse_params(p)?;
        let m = find_mirror(&s, &r.name).map_err(rpc_err)?;
        verify::set_rate(&m, r.bytes_per_second);
        Ok(Value::Bool(true))
    })?;
    let s = state.clone();
    methods.register("mirror_repair", move |p| {
        let p: RepairParams = parse_params(p)?;
        let m = find_mirror(&s, &p.name).map_err(rpc_err)?;
        let rj = verify::repair(&m, p.direction, p.leg, p.rate)
            .map_err(verify_err)
            .map_err(rpc_err)?;
        Ok(json!({"started": true, "total_bytes": rj.total_bytes, "ranges": rj.remaining.len()}))
    })?;
    Ok(())
}
