//! NVM subsystems and the discovery subsystem: what a host may connect to.
//!
//! A [`Subsystem`] is an NQN with a serial and model number, namespaces
//! (each a volume under an NSID, with NGUID and UUID derived stably from the
//! volume's UUID unless given), the host NQNs allowed to connect (or "any
//! host") and the addresses it listens on. The well-known discovery
//! subsystem is a [`Subsystem`] too, with no namespaces and open to any host.
//!
//! Shape, and why: subsystems change on the control plane (RPC threads) and
//! are read on every core's data path. The control plane takes a lock; the
//! data path must not. So the namespace map is published as an immutable
//! `Arc<NsMap>` snapshot next to a generation counter: a queue pair keeps
//! its own snapshot (and its own per-core volume channels) and re-reads it
//! under the lock only when one atomic load shows the generation moved.

use super::controller::Controller;
use super::spec::Nqn;
use crate::volume::Volume;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddrV4;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard, Weak};

/// Default serial number of a subsystem created without one.
pub const DEFAULT_SERIAL: &str = "00000000000000000000";
/// Default model number.
pub const DEFAULT_MODEL: &str = "mirrorpoint Controller";
/// Default and largest namespace count of a subsystem.
pub const DEFAULT_MAX_NAMESPACES: u32 = 32;
/// Upper bound on `max_namespaces`.
pub const MAX_NAMESPACES_LIMIT: u32 = 1024;

pub(crate) fn read<T>(l: &RwLock<T>) -> RwLockReadGuard<'_, T> {
    l.read().unwrap_or_else(|p| p.into_inner())
}

pub(crate) fn write<T>(l: &RwLock<T>) -> RwLockWriteGuard<'_, T> {
    l.write().unwrap_or_else(|p| p.into_inner())
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Why a subsystem change was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SubsystemError {
    /// A parameter is malformed or out of range.
    #[error("{0}")]
    Invalid(String),
    /// Something of that name or number exists already.
    #[error("{0}")]
    Exists(String),
    /// Nothing of that name or number.
    #[error("{0}")]
    NotFound(String),
    /// The subsystem is full or the request is not possible in this state.
    #[error("{0}")]
    Unavailable(String),
}

/// The `namespace` parameter of `nvmf_subsystem_add_ns` (SPDK's shape).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NamespaceParams {
    /// The volume to export.
    pub bdev_name: String,
    /// Namespace ID; the lowest free one when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nsid: Option<u32>,
    /// NGUID as 32 hex digits (dashes allowed); derived from the volume UUID when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nguid: Option<String>,
    /// UUID; the volume's UUID when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uuid: Option<String>,
}

/// One namespace of a subsystem.
pub struct Namespace {
    /// Namespace ID.
    pub nsid: u32,
    /// The volume behind it.
    pub volume: Arc<Volume>,
    /// Namespace globally unique identifier.
    pub nguid: [u8; 16],
    /// Namespace UUID.
    pub uuid: [u8; 16],
    /// What created it (NSID filled in), for save_config.
    pub params: NamespaceParams,
}

impl std::fmt::Debug for Namespace {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Namespace({} = {})", self.nsid, self.volume.name())
    }
}

/// Namespaces by NSID, as published to the data path.
pub type NsMap = BTreeMap<u32, Arc<Namespace>>;

/// Parses 32 hex digits (dashes ignored) into 16 bytes.
pub fn parse_hex16(s: &str) -> Option<[u8; 16]> {
    let digits: Vec<u8> = s.bytes().filter(|&c| c != b'-').collect();
    if digits.len() != 32 {
        return None;
    }
    let mut out = [0u8; 16];
    for (o, pair) in out.iter_mut().zip(digits.chunks_exact(2)) {
        let text = std::str::from_utf8(pair).ok()?;
        *o = u8::from_str_radix(text, 16).ok()?;
    }
    Some(out)
}

/// Formats 16 bytes as a canonical UUID string.
pub fn format_uuid(b: &[u8; 16]) -> String {
    let mut out = String::with_capacity(36);
    for (i, x) in b.iter().enumerate() {
        if matches!(i, 4 | 6 | 8 | 10) {
            out.push('-');
        }
        out.push_str(&format!("{x:02x}"));
    }
    out
}

/// Formats 16 bytes as 32 upper-case hex digits (SPDK's NGUID format).
pub fn format_nguid(b: &[u8; 16]) -> String {
    b.iter().map(|x| format!("{x:02X}")).collect()
}

/// Stable identifiers for a volume: the UUID is the volume's; the NGUID is
/// the same 16 bytes (NGUID and UUID may coincide, and the same volume
/// exported twice is the same namespace to a multipathing host). A volume
/// UUID that does not parse (never for volumes made by the registry) falls
/// back to a hash of the text, still stable.
pub fn derived_ids(volume_uuid: &str) -> ([u8; 16], [u8; 16]) {
    let id = parse_hex16(volume_uuid).unwrap_or_else(|| {
        let a = crc32c::crc32c(volume_uuid.as_bytes());
        let b = crc32c::crc32c_append(a, b"nguid");
        let c = crc32c::crc32c_append(b, b"mirrorpoint");
        let d = crc32c::crc32c_append(c, volume_uuid.as_bytes());
        let mut out = [0u8; 16];
        for (i, w) in [a, b, c, d].iter().enumerate() {
            out[i * 4..i * 4 + 4].copy_from_slice(&w.to_be_bytes());
        }
        out
    });
    (id, id)
}

/// A listen address as RPCs give it (SPDK's `listen_address`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenAddress {
    /// Transport type: "tcp" (any case).
    pub trtype: String,
    /// Address family: "ipv4" (any case); IPv4 when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub adrfam: Option<String>,
    /// IPv4 address.
    pub traddr: String,
    /// TCP port as a string ("0" picks a free port).
    pub trsvcid: String,
}

impl ListenAddress {
    /// The socket address, checking transport and family.
    pub fn socket_addr(&self) -> Result<SocketAddrV4, SubsystemError> {
        if !self.trtype.eq_ignore_ascii_case("tcp") {
            return Err(SubsystemError::Invalid(format!(
                "trtype '{}' is not supported (only tcp)",
                self.trtype
            )));
        }
        if let Some(f) = &self.adrfam {
            if !f.eq_ignore_ascii_case("ipv4") {
                return Err(SubsystemError::Invalid(format!(
                    "adrfam '{f}' is not supported (only ipv4)"
                )));
            }
        }
        let ip = self.traddr.parse().map_err(|_| {
            SubsystemError::Invalid(format!("traddr '{}' is not an IPv4 address", self.traddr))
        })?;
        let port: u16 = self.trsvcid.parse().map_err(|_| {
            SubsystemError::Invalid(format!("trsvcid '{}' is not a port", self.trsvcid))
        })?;
        Ok(SocketAddrV4::new(ip, port))
    }

    /// The RPC form of a bound address.
    pub fn from_addr(a: SocketAddrV4) -> ListenAddress {
        ListenAddress {
            trtype: "TCP".into(),
            adrfam: Some("IPv4".into()),
            traddr: a.ip().to_string(),
            trsvcid: a.port().to_string(),
        }
    }
}

/// Who may connect and where.
#[derive(Debug, Clone, Default)]
pub struct AccessPolicy {
    /// Any host NQN may connect.
    pub allow_any_host: bool,
    /// Host NQNs allowed when `allow_any_host` is false.
    pub hosts: BTreeSet<String>,
    /// Addresses the subsystem is reachable on.
    pub listeners: Vec<SocketAddrV4>,
}

/// An NVM subsystem (or the discovery subsystem).
pub struct Subsystem {
    /// Subsystem NQN.
    pub nqn: Nqn,
    /// Whether this is the discovery subsystem.
    pub discovery: bool,
    /// Serial number (20 ASCII characters at most).
    pub serial: String,
    /// Model number (40 ASCII characters at most).
    pub model: String,
    /// Largest NSID.
    pub max_namespaces: u32,
    policy: RwLock<AccessPolicy>,
    namespaces: RwLock<Arc<NsMap>>,
    ns_generation: AtomicU64,
    controllers: Mutex<Vec<Weak<Controller>>>,
}

impl std::fmt::Debug for Subsystem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Subsystem({})", self.nqn)
    }
}

fn check_text(what: &str, s: &str, max: usize) -> Result<(), SubsystemError> {
    if s.is_empty() || s.len() > max || !s.bytes().all(|c| (0x20..=0x7e).contains(&c)) {
        return Err(SubsystemError::Invalid(format!(
            "{what} '{s}' must be 1 to {max} printable ASCII characters"
        )));
    }
    Ok(())
}

impl Subsystem {
    /// A new NVM subsystem with no namespaces, hosts or listeners.
    pub fn new(
        nqn: &str,
        serial: Option<&str>,
        model: Option<&str>,
        allow_any_host: bool,
        max_namespaces: Option<u32>,
    ) -> Result<Subsystem, SubsystemError> {
        let nqn = Nqn::new(nqn).map_err(|e| SubsystemError::Invalid(format!("nqn: {e}")))?;
        if !nqn.as_str().starts_with("nqn.") || nqn.as_str() == super::spec::DISCOVERY_NQN {
            return Err(SubsystemError::Invalid(format!(
                "nqn '{nqn}' must start with 'nqn.' and not be the discovery NQN"
            )));
        }
        let serial = serial.unwrap_or(DEFAULT_SERIAL);
        check_text("serial_number", serial, 20)?;
        let model = model.unwrap_or(DEFAULT_MODEL);
        check_text("model_number", model, 40)?;
        let max = max_namespaces.unwrap_or(0);
        let max = if max == 0 {
            DEFAULT_MAX_NAMESPACES
        } else {
            max
        };
        if max > MAX_NAMESPACES_LIMIT {
            return Err(SubsystemError::Invalid(format!(
                "max_namespaces {max} is above {MAX_NAMESPACES_LIMIT}"
            )));
        }
        Ok(Self::build(
            nqn,
            false,
            serial.into(),
            model.into(),
            max,
            allow_any_host,
        ))
    }

    /// The discovery subsystem.
    pub fn discovery() -> Result<Subsystem, SubsystemError> {
        let nqn = Nqn::new(super::spec::DISCOVERY_NQN)
            .map_err(|e| SubsystemError::Invalid(format!("discovery nqn: {e}")))?;
        Ok(Self::build(
            nqn,
            true,
            DEFAULT_SERIAL.into(),
            DEFAULT_MODEL.into(),
            0,
            true,
        ))
    }

    fn build(
        nqn: Nqn,
        discovery: bool,
        serial: String,
        model: String,
        max_namespaces: u32,
        allow_any_host: bool,
    ) -> Subsystem {
        Subsystem {
            nqn,
            discovery,
            serial,
            model,
            max_namespaces,
            policy: RwLock::new(AccessPolicy {
                allow_any_host,
                ..AccessPolicy::default()
            }),
            namespaces: RwLock::new(Arc::new(NsMap::new())),
            ns_generation: AtomicU64::new(0),
            controllers: Mutex::new(Vec::new()),
        }
    }

    /// The current access policy (a copy).
    pub fn policy(&self) -> AccessPolicy {
        read(&self.policy).clone()
    }

    /// Whether `hostnqn` may connect.
    pub fn host_allowed(&self, hostnqn: &str) -> bool {
        let p = read(&self.policy);
        p.allow_any_host || p.hosts.contains(hostnqn)
    }

    /// Whether the subsystem listens on `addr` (the discovery subsystem
    /// answers on every listening address).
    /// A listener on the unspecified address (0.0.0.0) covers every local
    /// address of its port.
    pub fn listens_on(&self, addr: SocketAddrV4) -> bool {
        self.discovery
            || read(&self.policy).listeners.iter().any(|l| {
                l.port() == addr.port() && (l.ip() == addr.ip() || l.ip().is_unspecified())
            })
    }

    /// Sets "allow any host".
    pub fn set_allow_any_host(&self, allow: bool) {
        write(&self.policy).allow_any_host = allow;
    }

    /// Adds an allowed host.
    pub fn add_host(&self, hostnqn: &str) -> Result<(), SubsystemError> {
        Nqn::new(hostnqn).map_err(|e| SubsystemError::Invalid(format!("host: {e}")))?;
        if !write(&self.policy).hosts.insert(hostnqn.to_string()) {
            return Err(SubsystemError::Exists(format!(
                "host '{hostnqn}' is already allowed on {}",
                self.nqn
            )));
        }
        Ok(())
    }

    /// Removes an allowed host (connected controllers stay, as in SPDK).
    pub fn remove_host(&self, hostnqn: &str) -> Result<(), SubsystemError> {
        if !write(&self.policy).hosts.remove(hostnqn) {
            return Err(SubsystemError::NotFound(format!(
                "host '{hostnqn}' is not allowed on {}",
                self.nqn
            )));
        }
        Ok(())
    }

    /// Records a listening address.
    pub fn add_listener(&self, addr: SocketAddrV4) -> Result<(), SubsystemError> {
        let mut p = write(&self.policy);
        if p.listeners.contains(&addr) {
            return Err(SubsystemError::Exists(format!(
                "{} already listens on {addr}",
                self.nqn
            )));
        }
        p.listeners.push(addr);
        Ok(())
    }

    /// Forgets a listening address.
    pub fn remove_listener(&self, addr: SocketAddrV4) -> Result<(), SubsystemError> {
        let mut p = write(&self.policy);
        let before = p.listeners.len();
        p.listeners.retain(|a| *a != addr);
        if p.listeners.len() == before {
            return Err(SubsystemError::NotFound(format!(
                "{} does not listen on {addr}",
                self.nqn
            )));
        }
        Ok(())
    }

    /// The namespace generation: changes whenever the namespace set does.
    pub fn ns_generation(&self) -> u64 {
        self.ns_generation.load(Ordering::Acquire)
    }

    /// The current namespace snapshot and its generation.
    pub fn namespaces(&self) -> (Arc<NsMap>, u64) {
        let map = read(&self.namespaces);
        (map.clone(), self.ns_generation.load(Ordering::Acquire))
    }

    /// Adds a namespace; returns its NSID.
    pub fn add_namespace(
        &self,
        volume: Arc<Volume>,
        mut params: NamespaceParams,
    ) -> Result<u32, SubsystemError> {
        if self.discovery {
            return Err(SubsystemError::Invalid(
                "the discovery subsystem has no namespaces".into(),
            ));
        }
        let (mut nguid, uuid_default) = derived_ids(volume.uuid());
        if let Some(g) = &params.nguid {
            nguid = parse_hex16(g).ok_or_else(|| {
                SubsystemError::Invalid(format!("nguid '{g}' is not 32 hex digits"))
            })?;
        }
        let uuid = match &params.uuid {
            Some(u) => parse_hex16(u)
                .filter(|_| u.len() == 36)
                .ok_or_else(|| SubsystemError::Invalid(format!("uuid '{u}' is not a UUID")))?,
            None => uuid_default,
        };
        let nsid = {
            let mut map = write(&self.namespaces);
            let nsid = match params.nsid {
                Some(0) | None => (1..=self.max_namespaces)
                    .find(|n| !map.contains_key(n))
                    .ok_or_else(|| {
                        SubsystemError::Unavailable(format!(
                            "{} has no free namespace ID (max_namespaces {})",
                            self.nqn, self.max_namespaces
                        ))
                    })?,
                Some(n) if n > self.max_namespaces => {
                    return Err(SubsystemError::Invalid(format!(
                        "nsid {n} is above max_namespaces {}",
                        self.max_namespaces
                    )))
                }
                Some(n) if map.contains_key(&n) => {
                    return Err(SubsystemError::Exists(format!(
                        "nsid {n} is already in use on {}",
                        self.nqn
                    )))
                }
                Some(n) => n,
            };
            params.nsid = Some(nsid);
            let mut next = NsMap::clone(&map);
            next.insert(
                nsid,
                Arc::new(Namespace {
                    nsid,
                    volume,
                    nguid,
                    uuid,
                    params,
                }),
            );
            *map = Arc::new(next);
            self.ns_generation.fetch_add(1, Ordering::AcqRel);
            nsid
        };
        self.namespace_changed(nsid);
        Ok(nsid)
    }

    /// Removes a namespace.
    pub fn remove_namespace(&self, nsid: u32) -> Result<Arc<Namespace>, SubsystemError> {
        let removed = {
            let mut map = write(&self.namespaces);
            let mut next = NsMap::clone(&map);
            let removed = next.remove(&nsid).ok_or_else(|| {
                SubsystemError::NotFound(format!("{} has no namespace {nsid}", self.nqn))
            })?;
            *map = Arc::new(next);
            self.ns_generation.fetch_add(1, Ordering::AcqRel);
            removed
        };
        self.namespace_changed(nsid);
        Ok(removed)
    }

    /// Whether any namespace exports `volume_name`.
    pub fn uses_volume(&self, volume_name: &str) -> bool {
        read(&self.namespaces)
            .values()
            .any(|n| n.volume.name() == volume_name)
    }

    /// Registers a live controller for namespace change notices.
    pub fn attach_controller(&self, c: &Arc<Controller>) {
        let mut list = lock(&self.controllers);
        list.retain(|w| w.strong_count() > 0);
        list.push(Arc::downgrade(c));
    }

    /// Live controllers.
    pub fn controllers(&self) -> Vec<Arc<Controller>> {
        let mut list = lock(&self.controllers);
        list.retain(|w| w.strong_count() > 0);
        list.iter().filter_map(Weak::upgrade).collect()
    }

    fn namespace_changed(&self, nsid: u32) {
        for c in self.controllers() {
            c.namespace_changed(nsid);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_derived_stably() {
        let (g, u) = derived_ids("0123abcd-4567-89ab-cdef-0123456789ab");
        assert_eq!(format_uuid(&u), "0123abcd-4567-89ab-cdef-0123456789ab");
        assert_eq!(g, u);
        let (g1, _) = derived_ids("not-a-uuid");
        let (g2, _) = derived_ids("not-a-uuid");
        assert_eq!(g1, g2);
        assert_ne!(g1, [0; 16]);
        assert_eq!(parse_hex16(&format_nguid(&g1)), Some(g1));
    }

    #[test]
    fn subsystem_validation_and_policy() {
        assert!(Subsystem::new("bogus", None, None, false, None).is_err());
        assert!(Subsystem::new(super::super::spec::DISCOVERY_NQN, None, None, true, None).is_err());
        assert!(Subsystem::new(
            "nqn.2026-11.io.x:a",
            Some("x".repeat(21).as_str()),
            None,
            true,
            None
        )
        .is_err());
        assert!(Subsystem::new("nqn.2026-11.io.x:a", None, None, true, Some(5000)).is_err());
        let s = Subsystem::new("nqn.2026-11.io.x:a", Some("SN1"), None, false, None).expect("ok");
        assert!(!s.host_allowed("nqn.host"));
        s.add_host("nqn.host").expect("add");
        assert!(s.add_host("nqn.host").is_err());
        assert!(s.host_allowed("nqn.host"));
        s.remove_host("nqn.host").expect("remove");
        assert!(s.remove_host("nqn.host").is_err());
        s.set_allow_any_host(true);
        assert!(s.host_allowed("nqn.other"));
        let a: SocketAddrV4 = "127.0.0.1:4420".parse().expect("addr");
        assert!(!s.listens_on(a));
        s.add_listener(a).expect("listen");
        assert!(s.add_listener(a).is_err());
        assert!(s.listens_on(a));
        let any: SocketAddrV4 = "0.0.0.0:4421".parse().expect("addr");
        s.add_listener(any).expect("listen any");
        assert!(s.listens_on("10.1.2.3:4421".parse().expect("addr")));
        assert!(!s.listens_on("10.1.2.3:4420".parse().expect("addr")));
        s.remove_listener(a).expect("unlisten");
        assert!(s.remove_listener(a).is_err());
        assert!(Subsystem::discovery().expect("discovery").listens_on(a));
    }

    #[test]
    fn listen_address_parsing() {
        let ok = ListenAddress {
            trtype: "tcp".into(),
            adrfam: Some("IPv4".into()),
            traddr: "127.0.0.1".into(),
            trsvcid: "4420".into(),
        };
        assert_eq!(ok.socket_addr().expect("ok").port(), 4420);
        for bad in [
            ListenAddress {
                trtype: "rdma".into(),
                ..ok.clone()
            },
            ListenAddress {
                adrfam: Some("ipv6".into()),
                ..ok.clone()
            },
            ListenAddress {
                traddr: "::1".into(),
                ..ok.clone()
            },
            ListenAddress {
                trsvcid: "http".into(),
                ..ok.clone()
            },
        ] {
            assert!(bad.socket_addr().is_err(), "{bad:?}");
        }
    }
}
