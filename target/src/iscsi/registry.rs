//! The iSCSI target's model: portal groups, initiator groups, CHAP groups,
//! target nodes, and the live sessions and connections.
//!
//! Shaped as in SPDK's iSCSI target because the RPC methods are SPDK's: a
//! *portal group* (tag) is a set of listen addresses, an *initiator group*
//! (tag) a set of allowed initiator names and source netmasks, and a *target
//! node* maps LUNs to volumes and is reachable through `(portal group,
//! initiator group)` pairs. Everything configurable lives behind one
//! control-plane mutex ([`IscsiTarget::state`]); it is taken by RPC handlers
//! and once per login, never per command. A logged-in connection holds an
//! `Arc<NodeRuntime>` (its LUN map, resolved to logical units) and works
//! from that snapshot; deleting a node marks it removed and shuts down the
//! sockets of its connections.
//!
//! Sessions are global (a session's connections may live on different
//! cores): the table maps (initiator name, ISID, target) and TSIH to an
//! `Arc<Session>`, whose command window is the only state connections of one
//! session share.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use mirrorpoint_poller::ReactorHandle;
use serde::{Deserialize, Serialize};
use thiserror::Error;

use super::login::{
    AuthPolicy, ChapConfig, ChapCredentials, ExistingSession, LoginConfig, Portal, TargetEntry,
};
use super::negotiation::{NegotiationLimits, SessionParams, SessionType};
use super::pdu::{CmdSn, Isid, Tsih};
use crate::scsi::{LogicalUnit, LunConfig};
use crate::volume::Volume;

/// Prefix SPDK-style short target names get.
pub const DEFAULT_IQN_PREFIX: &str = "iqn.2026-11.io.mirrorpoint:";
/// Default command window per session.
pub const DEFAULT_QUEUE_DEPTH: u32 = 64;

/// Control-plane errors (mapped onto RPC errors by `iscsi::rpc`).
#[derive(Debug, Error, PartialEq, Eq)]
pub enum ModelError {
    /// Bad parameter.
    #[error("{0}")]
    Invalid(String),
    /// Name or tag already used.
    #[error("{0} already exists")]
    Exists(String),
    /// No such object.
    #[error("{0} not found")]
    NotFound(String),
    /// Still referenced.
    #[error("{0} is in use")]
    InUse(String),
    /// A listener could not be opened.
    #[error("cannot listen on {addr}: {why}")]
    Listen {
        /// Address.
        addr: String,
        /// OS error text.
        why: String,
    },
}

/// One listen address of a portal group (SPDK: `{host, port}`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PortalSpec {
    /// IP address to bind.
    pub host: String,
    /// TCP port (string, as SPDK has it).
    pub port: String,
}

/// `iscsi_create_portal_group` parameters.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PortalGroupSpec {
    /// Portal group tag (1..=65535).
    pub tag: u16,
    /// Listen addresses.
    pub portals: Vec<PortalSpec>,
    /// Portals of a private group are not listed by SendTargets.
    #[serde(default)]
    pub private: bool,
}

/// `iscsi_create_initiator_group` parameters.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InitiatorGroupSpec {
    /// Initiator group tag.
    pub tag: u16,
    /// Initiator names, or `ANY`.
    pub initiators: Vec<String>,
    /// Source netmasks (`127.0.0.1/32`, `ANY`).
    pub netmasks: Vec<String>,
}

/// One CHAP credential of an auth group (SPDK: `user/secret/muser/msecret`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChapSecret {
    /// Name the initiator answers with.
    pub user: String,
    /// Its secret.
    pub secret: String,
    /// Name the target answers with (mutual CHAP).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub muser: Option<String>,
    /// The target's secret (mutual CHAP).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub msecret: Option<String>,
}

/// `iscsi_create_auth_group` parameters.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthGroupSpec {
    /// Auth group tag.
    pub tag: u32,
    /// Credentials; the first one is used.
    #[serde(default)]
    pub secrets: Vec<ChapSecret>,
}

/// A LUN of a target node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LunSpec {
    /// Volume name.
    pub bdev_name: String,
    /// LUN id.
    pub lun_id: u64,
}

/// A (portal group, initiator group) pair.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PgIgMap {
    /// Portal group tag.
    pub pg_tag: u16,
    /// Initiator group tag.
    pub ig_tag: u16,
}

fn default_qd() -> u32 {
    DEFAULT_QUEUE_DEPTH
}

/// `iscsi_create_target_node` parameters.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TargetNodeSpec {
    /// Target name: a full `iqn.`/`eui.`/`naa.` name, or a short name that
    /// gets [`DEFAULT_IQN_PREFIX`].
    pub name: String,
    /// TargetAlias.
    #[serde(default)]
    pub alias_name: Option<String>,
    /// LUN map.
    pub luns: Vec<LunSpec>,
    /// Where and to whom the node is visible.
    pub pg_ig_maps: Vec<PgIgMap>,
    /// Command window per session.
    #[serde(default = "default_qd")]
    pub queue_depth: u32,
    /// No CHAP even if discovery requires it.
    #[serde(default)]
    pub disable_chap: bool,
    /// CHAP required.
    #[serde(default)]
    pub require_chap: bool,
    /// Mutual CHAP required.
    #[serde(default)]
    pub mutual_chap: bool,
    /// Auth group holding the credentials.
    #[serde(default)]
    pub chap_group: Option<u32>,
    /// Inline credentials (instead of an auth group).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chap: Option<ChapSecret>,
    /// Offer header digests (CRC32C) (SPDK: `header_digest`).
    #[serde(default)]
    pub header_digest: bool,
    /// Offer data digests (CRC32C).
    #[serde(default)]
    pub data_digest: bool,
}

/// Full target name for a possibly short one.
pub fn full_name(name: &str) -> String {
    if name.starts_with("iqn.") || name.starts_with("eui.") || name.starts_with("naa.") {
        name.to_string()
    } else {
        format!("{DEFAULT_IQN_PREFIX}{name}")
    }
}

/// One LUN of a node.
#[derive(Clone)]
pub struct NodeLun {
    /// The SCSI logical unit.
    pub lu: Arc<LogicalUnit>,
    /// The volume behind it (channels are opened per connection).
    pub volume: Arc<Volume>,
}

/// A target node with its LUNs resolved: what the data path uses.
pub struct NodeRuntime {
    /// Full target name.
    pub name: String,
    /// Its configuration.
    pub spec: TargetNodeSpec,
    /// LUN id → logical unit and its volume, sorted.
    pub luns: BTreeMap<u64, NodeLun>,
    removed: AtomicBool,
}

impl NodeRuntime {
    /// True once the node was deleted.
    pub fn is_removed(&self) -> bool {
        self.removed.load(Ordering::Acquire)
    }
    /// The LUN ids.
    pub fn lun_ids(&self) -> Vec<u64> {
        self.luns.keys().copied().collect()
    }
}

/// The session-wide command window (RFC 7143 §3.2.2.1).
#[derive(Debug, Clone, Copy)]
pub struct CmdWindow {
    /// Next expected CmdSN.
    pub exp_cmd_sn: CmdSn,
    /// Window size (queue depth).
    pub depth: u32,
    /// SCSI tasks accepted and not yet answered, session-wide.
    pub in_flight: u32,
}

impl CmdWindow {
    /// MaxCmdSN to advertise: the window shrinks by the tasks in flight, so
    /// an initiator never has more than `depth` commands outstanding
    /// (MaxCmdSN = ExpCmdSN - 1 closes it).
    pub fn max_cmd_sn(&self) -> CmdSn {
        let open = self.depth.max(1).saturating_sub(self.in_flight);
        self.exp_cmd_sn.serial_add(open).serial_add(u32::MAX)
    }
}

/// A live connection as the control plane sees it.
#[derive(Debug, Clone)]
pub struct ConnInfo {
    /// Unique id.
    pub id: u64,
    /// Connection id within its session.
    pub cid: u16,
    /// Peer address.
    pub initiator_addr: SocketAddr,
    /// Local address.
    pub target_addr: SocketAddr,
    /// Reactor index.
    pub reactor: usize,
    /// Socket, for shutting it down from the control plane.
    pub fd: RawFd,
    /// Set when the connection must end.
    pub kill: Arc<AtomicBool>,
}

/// A logged-in session.
pub struct Session {
    /// TSIH.
    pub tsih: Tsih,
    /// ISID.
    pub isid: Isid,
    /// Initiator name.
    pub initiator_name: String,
    /// Target name (normal sessions).
    pub target_name: Option<String>,
    /// Session type.
    pub session_type: SessionType,
    /// Negotiated session-wide parameters.
    pub params: SessionParams,
    /// Portal group tag.
    pub tpgt: u16,
    /// The shared command window.
    pub window: Mutex<CmdWindow>,
    /// Connections.
    pub conns: Mutex<Vec<ConnInfo>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Session {
    /// Locks the command window.
    pub fn window(&self) -> MutexGuard<'_, CmdWindow> {
        lock(&self.window)
    }

    /// Marks every connection for closing and shuts their sockets down.
    pub fn kill_all(&self) {
        for c in lock(&self.conns).iter() {
            kill_conn(c);
        }
    }

    /// Kills one connection by CID; true if it existed.
    pub fn kill_cid(&self, cid: u16) -> bool {
        let conns = lock(&self.conns);
        let mut found = false;
        for c in conns.iter().filter(|c| c.cid == cid) {
            kill_conn(c);
            found = true;
        }
        found
    }

    /// Number of connections.
    pub fn conn_count(&self) -> usize {
        lock(&self.conns).len()
    }
}

fn kill_conn(c: &ConnInfo) {
    c.kill.store(true, Ordering::Release);
    // SAFETY: the fd is open: a connection removes its ConnInfo (under this
    // same lock) before its socket is closed.
    unsafe {
        libc::shutdown(c.fd, libc::SHUT_RDWR);
    }
}

/// Looks up a volume by name.
pub type VolumeLookup = Arc<dyn Fn(&str) -> Option<Arc<Volume>> + Send + Sync>;

struct PortalGroupEntry {
    spec: PortalGroupSpec,
    /// Bound addresses (after port 0 resolution) and listener ids.
    listeners: Vec<(SocketAddr, u64)>,
}

#[derive(Default)]
struct State {
    pgs: BTreeMap<u16, PortalGroupEntry>,
    igs: BTreeMap<u16, InitiatorGroupSpec>,
    auth: BTreeMap<u32, AuthGroupSpec>,
    nodes: BTreeMap<String, Arc<NodeRuntime>>,
    discovery_chap: Option<(bool, bool, Option<u32>)>,
}

/// The iSCSI target: configuration, listeners and sessions.
pub struct IscsiTarget {
    state: Mutex<State>,
    sessions: Mutex<Vec<Arc<Session>>>,
    next_tsih: Mutex<u16>,
    next_id: AtomicU64,
    /// Reactors connections are spread over.
    pub reactors: Vec<ReactorHandle>,
    volumes: VolumeLookup,
    /// Negotiation limits for every login.
    pub limits: Mutex<NegotiationLimits>,
    /// NOP-In keep-alive interval (0: off) and answer timeout, seconds.
    pub nop: Mutex<(u64, u64)>,
}

/// Is `ip` inside `mask` (`ANY`, `a.b.c.d`, `a.b.c.d/n`, IPv6 likewise).
pub fn netmask_matches(mask: &str, ip: IpAddr) -> bool {
    let mask = mask.trim();
    if mask.eq_ignore_ascii_case("ANY") {
        return true;
    }
    let (addr, bits) = match mask.split_once('/') {
        Some((a, b)) => (a, b.parse::<u32>().ok()),
        None => (mask, None),
    };
    let addr = addr.trim_start_matches('[').trim_end_matches(']');
    let Ok(net) = addr.parse::<IpAddr>() else {
        return false;
    };
    match (net, ip) {
        (IpAddr::V4(n), IpAddr::V4(i)) => {
            let b = bits.unwrap_or(32).min(32);
            let m = if b == 0 { 0 } else { u32::MAX << (32 - b) };
            u32::from(n) & m == u32::from(i) & m
        }
        (IpAddr::V6(n), IpAddr::V6(i)) => {
            let b = bits.unwrap_or(128).min(128);
            let m = if b == 0 { 0 } else { u128::MAX << (128 - b) };
            u128::from(n) & m == u128::from(i) & m
        }
        (IpAddr::V4(n), IpAddr::V6(i)) => i.to_ipv4_mapped().is_some_and(|i| {
            let b = bits.unwrap_or(32).min(32);
            let m = if b == 0 { 0 } else { u32::MAX << (32 - b) };
            u32::from(n) & m == u32::from(i) & m
        }),
        _ => false,
    }
}

fn chap_from(secret: &ChapSecret, mutual: bool) -> Result<ChapConfig, ModelError> {
    let m = if mutual {
        match (&secret.muser, &secret.msecret) {
            (Some(u), Some(s)) => Some(ChapCredentials {
                name: u.clone(),
                secret: s.as_bytes().to_vec(),
            }),
            _ => {
                return Err(ModelError::Invalid(
                    "mutual CHAP needs muser and msecret".into(),
                ))
            }
        }
    } else {
        None
    };
    ChapConfig::new(
        ChapCredentials {
            name: secret.user.clone(),
            secret: secret.secret.as_bytes().to_vec(),
        },
        m,
    )
    .map_err(|e| ModelError::Invalid(e.to_string()))
}

impl IscsiTarget {
    /// A target with no configuration.
    pub fn new(reactors: Vec<ReactorHandle>, volumes: VolumeLookup) -> Arc<Self> {
        let limits = NegotiationLimits {
            max_connections: 4,
            max_outstanding_r2t: 1,
            ..NegotiationLimits::default()
        };
        Arc::new(IscsiTarget {
            state: Mutex::new(State::default()),
            sessions: Mutex::new(Vec::new()),
            next_tsih: Mutex::new(0),
            next_id: AtomicU64::new(1),
            reactors,
            volumes,
            limits: Mutex::new(limits),
            nop: Mutex::new((30, 30)),
        })
    }

    fn state(&self) -> MutexGuard<'_, State> {
        lock(&self.state)
    }

    /// A fresh unique id (connections, listeners).
    pub fn next_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    // ---- portal groups ----

    /// Records a portal group whose listeners are already bound.
    pub(crate) fn add_portal_group(
        &self,
        spec: PortalGroupSpec,
        listeners: Vec<(SocketAddr, u64)>,
    ) -> Result<(), ModelError> {
        let mut st = self.state();
        if st.pgs.contains_key(&spec.tag) {
            return Err(ModelError::Exists(format!("portal group {}", spec.tag)));
        }
        st.pgs
            .insert(spec.tag, PortalGroupEntry { spec, listeners });
        Ok(())
    }

    /// Checks a new portal group before binding.
    pub(crate) fn check_new_portal_group(&self, spec: &PortalGroupSpec) -> Result<(), ModelError> {
        if spec.tag == 0 {
            return Err(ModelError::Invalid(
                "portal group tag must be 1..65535".into(),
            ));
        }
        if spec.portals.is_empty() {
            return Err(ModelError::Invalid("a portal group needs portals".into()));
        }
        if self.state().pgs.contains_key(&spec.tag) {
            return Err(ModelError::Exists(format!("portal group {}", spec.tag)));
        }
        Ok(())
    }

    /// Removes a portal group; returns its listener ids to stop.
    pub(crate) fn remove_portal_group(&self, tag: u16) -> Result<Vec<u64>, ModelError> {
        let mut st = self.state();
        if st
            .nodes
            .values()
            .any(|n| n.spec.pg_ig_maps.iter().any(|m| m.pg_tag == tag))
        {
            return Err(ModelError::InUse(format!("portal group {tag}")));
        }
        let e = st
            .pgs
            .remove(&tag)
            .ok_or_else(|| ModelError::NotFound(format!("portal group {tag}")))?;
        Ok(e.listeners.into_iter().map(|(_, id)| id).collect())
    }

    /// Portal groups with their bound addresses.
    pub fn portal_groups(&self) -> Vec<(PortalGroupSpec, Vec<SocketAddr>)> {
        self.state()
            .pgs
            .values()
            .map(|e| (e.spec.clone(), e.listeners.iter().map(|l| l.0).collect()))
            .collect()
    }

    // ---- initiator groups ----

    /// Adds an initiator group.
    pub fn add_initiator_group(&self, spec: InitiatorGroupSpec) -> Result<(), ModelError> {
        if spec.tag == 0 {
            return Err(ModelError::Invalid(
                "initiator group tag must be 1..65535".into(),
            ));
        }
        if spec.initiators.is_empty() || spec.netmasks.is_empty() {
            return Err(ModelError::Invalid(
                "an initiator group needs initiators and netmasks".into(),
            ));
        }
        for m in &spec.netmasks {
            let ok = m.eq_ignore_ascii_case("ANY")
                || m.split('/')
                    .next()
                    .map(|a| a.trim_matches(|c| c == '[' || c == ']'))
                    .and_then(|a| a.parse::<IpAddr>().ok())
                    .is_some();
            if !ok {
                return Err(ModelError::Invalid(format!("bad netmask '{m}'")));
            }
        }
        let mut st = self.state();
        if st.igs.contains_key(&spec.tag) {
            return Err(ModelError::Exists(format!("initiator group {}", spec.tag)));
        }
        st.igs.insert(spec.tag, spec);
        Ok(())
    }

    /// Deletes an initiator group.
    pub fn remove_initiator_group(&self, tag: u16) -> Result<(), ModelError> {
        let mut st = self.state();
        if st
            .nodes
            .values()
            .any(|n| n.spec.pg_ig_maps.iter().any(|m| m.ig_tag == tag))
        {
            return Err(ModelError::InUse(format!("initiator group {tag}")));
        }
        st.igs
            .remove(&tag)
            .map(drop)
            .ok_or_else(|| ModelError::NotFound(format!("initiator group {tag}")))
    }

    /// Initiator groups.
    pub fn initiator_groups(&self) -> Vec<InitiatorGroupSpec> {
        self.state().igs.values().cloned().collect()
    }

    // ---- auth groups ----

    /// Adds a CHAP auth group.
    pub fn add_auth_group(&self, spec: AuthGroupSpec) -> Result<(), ModelError> {
        for s in &spec.secrets {
            if s.user.is_empty() || s.secret.is_empty() {
                return Err(ModelError::Invalid(
                    "CHAP user and secret must be set".into(),
                ));
            }
        }
        let mut st = self.state();
        if st.auth.contains_key(&spec.tag) {
            return Err(ModelError::Exists(format!("auth group {}", spec.tag)));
        }
        st.auth.insert(spec.tag, spec);
        Ok(())
    }

    /// Adds a secret to an auth group.
    pub fn add_auth_secret(&self, tag: u32, secret: ChapSecret) -> Result<(), ModelError> {
        if secret.user.is_empty() || secret.secret.is_empty() {
            return Err(ModelError::Invalid(
                "CHAP user and secret must be set".into(),
            ));
        }
        let mut st = self.state();
        let g = st
            .auth
            .get_mut(&tag)
            .ok_or_else(|| ModelError::NotFound(format!("auth group {tag}")))?;
        if g.secrets.iter().any(|s| s.user == secret.user) {
            return Err(ModelError::Exists(format!("CHAP user {}", secret.user)));
        }
        g.secrets.push(secret);
        Ok(())
    }

    /// Deletes an auth group.
    pub fn remove_auth_group(&self, tag: u32) -> Result<(), ModelError> {
        let mut st = self.state();
        if st.nodes.values().any(|n| n.spec.chap_group == Some(tag)) {
            return Err(ModelError::InUse(format!("auth group {tag}")));
        }
        st.auth
            .remove(&tag)
            .map(drop)
            .ok_or_else(|| ModelError::NotFound(format!("auth group {tag}")))
    }

    /// Auth groups.
    pub fn auth_groups(&self) -> Vec<AuthGroupSpec> {
        self.state().auth.values().cloned().collect()
    }

    /// Sets discovery CHAP (`iscsi_set_discovery_auth`).
    pub fn set_discovery_auth(
        &self,
        require_chap: bool,
        mutual_chap: bool,
        chap_group: Option<u32>,
    ) -> Result<(), ModelError> {
        let mut st = self.state();
        if let Some(g) = chap_group {
            if !st.auth.contains_key(&g) {
                return Err(ModelError::NotFound(format!("auth group {g}")));
            }
        }
        st.discovery_chap = if require_chap {
            Some((true, mutual_chap, chap_group))
        } else {
            None
        };
        Ok(())
    }

    /// Discovery CHAP settings, if any.
    pub fn discovery_auth(&self) -> Option<(bool, bool, Option<u32>)> {
        self.state().discovery_chap
    }

    // ---- target nodes ----

    fn auth_policy(st: &State, spec: &TargetNodeSpec) -> Result<AuthPolicy, ModelError> {
        if spec.disable_chap || !(spec.require_chap || spec.mutual_chap) {
            return Ok(AuthPolicy::None);
        }
        let secret = match (&spec.chap, spec.chap_group) {
            (Some(s), _) => s.clone(),
            (None, Some(g)) => st
                .auth
                .get(&g)
                .ok_or_else(|| ModelError::NotFound(format!("auth group {g}")))?
                .secrets
                .first()
                .cloned()
                .ok_or_else(|| ModelError::Invalid(format!("auth group {g} has no secret")))?,
            (None, None) => {
                return Err(ModelError::Invalid(
                    "require_chap needs chap_group or chap credentials".into(),
                ))
            }
        };
        Ok(AuthPolicy::Chap(chap_from(&secret, spec.mutual_chap)?))
    }

    /// Creates a target node; its LUNs must name existing volumes.
    pub fn add_target_node(&self, mut spec: TargetNodeSpec) -> Result<String, ModelError> {
        let name = full_name(&spec.name);
        if name.len() > 223 || name.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(ModelError::Invalid(format!("bad target name '{name}'")));
        }
        spec.name = name.clone();
        if spec.queue_depth == 0 || spec.queue_depth > 4096 {
            return Err(ModelError::Invalid("queue_depth must be 1..4096".into()));
        }
        if spec.disable_chap && (spec.require_chap || spec.mutual_chap) {
            return Err(ModelError::Invalid(
                "disable_chap conflicts with require_chap/mutual_chap".into(),
            ));
        }
        let mut luns = BTreeMap::new();
        for l in &spec.luns {
            if l.lun_id >= 16384 {
                return Err(ModelError::Invalid(format!(
                    "LUN id {} above 16383",
                    l.lun_id
                )));
            }
            let v = (self.volumes)(&l.bdev_name)
                .ok_or_else(|| ModelError::NotFound(format!("volume '{}'", l.bdev_name)))?;
            let lu = Arc::new(LogicalUnit::new(
                v.clone(),
                LunConfig {
                    serial: format!("{}-{}", l.bdev_name, l.lun_id),
                    ..LunConfig::default()
                },
            ));
            if luns.insert(l.lun_id, NodeLun { lu, volume: v }).is_some() {
                return Err(ModelError::Invalid(format!("LUN {} given twice", l.lun_id)));
            }
        }
        let mut st = self.state();
        if st.nodes.contains_key(&name) {
            return Err(ModelError::Exists(format!("target node '{name}'")));
        }
        for m in &spec.pg_ig_maps {
            if !st.pgs.contains_key(&m.pg_tag) {
                return Err(ModelError::NotFound(format!("portal group {}", m.pg_tag)));
            }
            if !st.igs.contains_key(&m.ig_tag) {
                return Err(ModelError::NotFound(format!(
                    "initiator group {}",
                    m.ig_tag
                )));
            }
        }
        Self::auth_policy(&st, &spec)?;
        st.nodes.insert(
            name.clone(),
            Arc::new(NodeRuntime {
                name: name.clone(),
                spec,
                luns,
                removed: AtomicBool::new(false),
            }),
        );
        Ok(name)
    }

    /// Changes a node's CHAP settings (`iscsi_target_node_set_auth`).
    pub fn set_node_auth(
        &self,
        name: &str,
        f: impl FnOnce(&mut TargetNodeSpec),
    ) -> Result<(), ModelError> {
        let name = full_name(name);
        let mut st = self.state();
        let node = st
            .nodes
            .get(&name)
            .cloned()
            .ok_or_else(|| ModelError::NotFound(format!("target node '{name}'")))?;
        let mut spec = node.spec.clone();
        f(&mut spec);
        Self::auth_policy(&st, &spec)?;
        st.nodes.insert(
            name.clone(),
            Arc::new(NodeRuntime {
                name,
                spec,
                luns: node.luns.clone(),
                removed: AtomicBool::new(false),
            }),
        );
        Ok(())
    }

    /// Deletes a node and drops its sessions.
    pub fn remove_target_node(&self, name: &str) -> Result<(), ModelError> {
        let name = full_name(name);
        let node = self
            .state()
            .nodes
            .remove(&name)
            .ok_or_else(|| ModelError::NotFound(format!("target node '{name}'")))?;
        node.removed.store(true, Ordering::Release);
        for s in self.sessions_of(&name) {
            s.kill_all();
        }
        Ok(())
    }

    /// Target nodes.
    pub fn target_nodes(&self) -> Vec<Arc<NodeRuntime>> {
        self.state().nodes.values().cloned().collect()
    }

    /// A node by full name.
    pub fn node(&self, name: &str) -> Option<Arc<NodeRuntime>> {
        self.state().nodes.get(name).cloned()
    }

    /// True when a volume is exported by some node.
    pub fn volume_in_use(&self, volume: &str) -> bool {
        self.state()
            .nodes
            .values()
            .any(|n| n.spec.luns.iter().any(|l| l.bdev_name == volume))
    }

    /// The login policy for a connection that arrived on portal group
    /// `pg_tag` from `peer`: only nodes mapped to that portal group through
    /// an initiator group whose netmasks include `peer` are visible.
    pub fn login_config(&self, pg_tag: u16, peer: IpAddr) -> LoginConfig {
        let st = self.state();
        let mut targets = Vec::new();
        for node in st.nodes.values() {
            let mut visible = false;
            let mut names: Option<Vec<String>> = Some(Vec::new());
            for m in node.spec.pg_ig_maps.iter().filter(|m| m.pg_tag == pg_tag) {
                let Some(ig) = st.igs.get(&m.ig_tag) else {
                    continue;
                };
                if !ig.netmasks.iter().any(|n| netmask_matches(n, peer)) {
                    continue;
                }
                visible = true;
                if ig.initiators.iter().any(|i| i.eq_ignore_ascii_case("ANY")) {
                    names = None;
                } else if let Some(v) = names.as_mut() {
                    v.extend(ig.initiators.iter().cloned());
                }
            }
            if !visible {
                continue;
            }
            let mut portals = Vec::new();
            for m in &node.spec.pg_ig_maps {
                if let Some(pg) = st.pgs.get(&m.pg_tag) {
                    if pg.spec.private && m.pg_tag != pg_tag {
                        continue;
                    }
                    for (addr, _) in &pg.listeners {
                        let p = Portal {
                            address: addr.to_string(),
                            tpgt: m.pg_tag,
                        };
                        if !portals.contains(&p) {
                            portals.push(p);
                        }
                    }
                }
            }
            targets.push(TargetEntry {
                name: node.name.clone(),
                alias: node.spec.alias_name.clone(),
                allowed_initiators: names,
                auth: Self::auth_policy(&st, &node.spec).unwrap_or(AuthPolicy::None),
                portals,
                redirect: None,
                removed: node.is_removed(),
            });
        }
        let discovery_auth = match st.discovery_chap {
            Some((true, mutual, Some(g))) => st
                .auth
                .get(&g)
                .and_then(|a| a.secrets.first())
                .and_then(|s| chap_from(s, mutual).ok())
                .map(AuthPolicy::Chap)
                .unwrap_or(AuthPolicy::None),
            _ => AuthPolicy::None,
        };
        let limits = lock(&self.limits).clone();
        LoginConfig {
            targets,
            discovery_enabled: true,
            discovery_auth,
            portal_group_tag: pg_tag,
            limits,
            cmd_window: DEFAULT_QUEUE_DEPTH,
            chap_challenge_len: 16,
        }
    }

    // ---- sessions ----

    /// A session by ISID and TSIH (for adding a connection).
    pub fn find_session(&self, isid: Isid, tsih: Tsih) -> Option<Arc<Session>> {
        lock(&self.sessions)
            .iter()
            .find(|s| s.isid == isid && s.tsih == tsih)
            .cloned()
    }

    /// The login machine's view of an existing session.
    pub fn existing(&self, isid: Isid, tsih: Tsih) -> Option<ExistingSession> {
        self.find_session(isid, tsih).map(|s| ExistingSession {
            initiator_name: s.initiator_name.clone(),
            target_name: s.target_name.clone(),
            session_type: s.session_type,
            connections: u16::try_from(s.conn_count()).unwrap_or(u16::MAX),
            max_connections: s.params.max_connections,
            params: s.params.clone(),
        })
    }

    /// A TSIH not in use.
    pub fn allocate_tsih(&self) -> Option<Tsih> {
        let sessions = lock(&self.sessions);
        let mut next = lock(&self.next_tsih);
        for _ in 0..=u16::MAX {
            *next = next.wrapping_add(1).max(1);
            let t = Tsih(*next);
            if !sessions.iter().any(|s| s.tsih == t) {
                return Some(t);
            }
        }
        None
    }

    /// Registers a new session, first closing any session it reinstates
    /// (same initiator name, ISID and target: RFC 7143 §6.3.5).
    pub fn add_session(&self, s: Arc<Session>) -> Vec<Arc<Session>> {
        let mut sessions = lock(&self.sessions);
        let mut old = Vec::new();
        sessions.retain(|o| {
            let same = o.isid == s.isid
                && o.initiator_name == s.initiator_name
                && o.target_name == s.target_name;
            if same {
                old.push(o.clone());
            }
            !same
        });
        for o in &old {
            o.kill_all();
        }
        sessions.push(s);
        old
    }

    /// Removes a session with no connections left; true when this call
    /// removed it (false if it still has connections or was already gone,
    /// e.g. replaced by a reinstating login).
    pub fn remove_session_if_empty(&self, s: &Arc<Session>) -> bool {
        let mut sessions = lock(&self.sessions);
        if s.conn_count() != 0 {
            return false;
        }
        let before = sessions.len();
        sessions.retain(|o| !Arc::ptr_eq(o, s));
        sessions.len() != before
    }

    /// Every session.
    pub fn sessions(&self) -> Vec<Arc<Session>> {
        lock(&self.sessions).clone()
    }

    /// Sessions to a target.
    pub fn sessions_of(&self, target: &str) -> Vec<Arc<Session>> {
        lock(&self.sessions)
            .iter()
            .filter(|s| s.target_name.as_deref() == Some(target))
            .cloned()
            .collect()
    }

    /// Closes every session (shutdown).
    pub fn kill_all(&self) {
        for s in self.sessions() {
            s.kill_all();
        }
    }
}

impl Session {
    /// Adds a connection record.
    pub fn add_conn(&self, c: ConnInfo) {
        lock(&self.conns).push(c);
    }
    /// Removes a connection record (before its socket closes).
    pub fn remove_conn(&self, id: u64) {
        lock(&self.conns).retain(|c| c.id != id);
    }
    /// Connection records.
    pub fn conn_infos(&self) -> Vec<ConnInfo> {
        lock(&self.conns).clone()
    }
}

/// Per-LUN settings map for RPC answers.
pub fn lun_map(node: &NodeRuntime) -> HashMap<u64, String> {
    node.spec
        .luns
        .iter()
        .map(|l| (l.lun_id, l.bdev_name.clone()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn netmasks() {
        let ip: IpAddr = "127.0.0.1".parse().unwrap();
        assert!(netmask_matches("ANY", ip));
        assert!(netmask_matches("127.0.0.0/8", ip));
        assert!(netmask_matches("127.0.0.1", ip));
        assert!(!netmask_matches("10.0.0.0/8", ip));
        assert!(!netmask_matches("garbage", ip));
        assert!(netmask_matches("0.0.0.0/0", ip));
    }

    #[test]
    fn short_names_get_the_prefix() {
        assert_eq!(full_name("vol0"), "iqn.2026-11.io.mirrorpoint:vol0");
        assert_eq!(full_name("iqn.x:y"), "iqn.x:y");
    }
}
