//! The NVMe/TCP target: subsystems, the controller table, transport options
//! and listening sockets, shared by the RPC threads and every reactor.
//!
//! Control-plane state sits behind locks (RPCs and Connects are rare). The
//! controller table is what lets an I/O queue Connect that arrives on any
//! connection, on any core, find its controller by (subsystem NQN, CNTLID):
//! the controller is an `Arc`, so attaching takes no message to the admin
//! queue's core. Listening sockets are shared between subsystems by address
//! and reference counted; each runs the transport's accept loop on one
//! reactor, which hands accepted connections round-robin to all reactors,
//! where a connection then lives for its whole life.

use super::controller::{shutdown_fd, Controller, ControllerLimits, ADMIN_QUEUE_MIN};
use super::log_page::DiscoveryEntry;
use super::spec::{
    connect_data_off, connect_off, connect_success_dw0, CntlId, ConnectCommand, ConnectData, Cqe,
    FabricsError, Status,
};
use super::subsystem::{lock, read, write, ListenAddress, Subsystem, SubsystemError};
use mirrorpoint_poller::ReactorHandle;
use mirrorpoint_transport::{Acceptor, TcpListener};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddrV4;
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock, Weak};

/// Transport options (`nvmf_create_transport`, SPDK's names).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TransportOptions {
    /// In-capsule data accepted on I/O queues, bytes (multiple of 16).
    pub in_capsule_data_size: u32,
    /// Largest transfer of one command (MDTS), bytes; at most a pool chunk.
    pub max_io_size: u32,
    /// MAXH2CDATA: largest H2CData PDU, bytes.
    pub io_unit_size: u32,
    /// Queue entries per queue.
    pub max_queue_depth: u16,
    /// I/O queues per controller.
    pub max_io_qpairs_per_ctrlr: u16,
    /// Outstanding R2Ts per command offered.
    pub max_r2t_per_command: u32,
    /// Use the C2HData SUCCESS flag where allowed (SQ flow control off, no data digest).
    pub c2h_success: bool,
}

impl TransportOptions {
    /// Defaults for a pool of `chunk` byte chunks.
    pub fn defaults(chunk: usize) -> TransportOptions {
        let chunk = u32::try_from(chunk).unwrap_or(u32::MAX);
        TransportOptions {
            in_capsule_data_size: 4096,
            max_io_size: chunk.min(1 << 20),
            io_unit_size: chunk.min(128 * 1024),
            max_queue_depth: 128,
            max_io_qpairs_per_ctrlr: 127,
            max_r2t_per_command: 1,
            c2h_success: true,
        }
    }

    /// Checks the options against the pool.
    pub fn validate(&self, chunk: usize) -> Result<(), SubsystemError> {
        let bad = |m: String| Err(SubsystemError::Invalid(m));
        if self.in_capsule_data_size % 16 != 0 || self.in_capsule_data_size > 128 * 1024 {
            return bad(format!(
                "in_capsule_data_size {} must be a multiple of 16 up to 131072",
                self.in_capsule_data_size
            ));
        }
        if self.in_capsule_data_size as usize > chunk {
            return bad(format!(
                "in_capsule_data_size {} exceeds the buffer pool chunk ({chunk})",
                self.in_capsule_data_size
            ));
        }
        if !self.max_io_size.is_power_of_two()
            || self.max_io_size < 4096
            || self.max_io_size as usize > chunk
        {
            return bad(format!(
                "max_io_size {} must be a power of two from 4096 up to the buffer pool chunk ({chunk})",
                self.max_io_size
            ));
        }
        if self.io_unit_size < 4096
            || self.io_unit_size % 4 != 0
            || self.io_unit_size > self.max_io_size
        {
            return bad(format!(
                "io_unit_size {} must be a multiple of 4 from 4096 up to max_io_size",
                self.io_unit_size
            ));
        }
        if self.max_queue_depth < ADMIN_QUEUE_MIN || self.max_queue_depth > 4096 {
            return bad(format!(
                "max_queue_depth {} must be between {ADMIN_QUEUE_MIN} and 4096",
                self.max_queue_depth
            ));
        }
        if self.max_io_qpairs_per_ctrlr == 0 || self.max_io_qpairs_per_ctrlr > 1024 {
            return bad("max_io_qpairs_per_ctrlr must be between 1 and 1024".into());
        }
        if self.max_r2t_per_command == 0 || self.max_r2t_per_command > 64 {
            return bad("max_r2t_per_command must be between 1 and 64".into());
        }
        Ok(())
    }

    /// The limits controllers report.
    pub fn limits(&self) -> ControllerLimits {
        ControllerLimits {
            max_queue_depth: self.max_queue_depth,
            max_io_queues: self.max_io_qpairs_per_ctrlr,
            in_capsule_data: self.in_capsule_data_size,
            max_io_size: self.max_io_size,
        }
    }
}

struct ListenerEntry {
    fd: Arc<OwnedFd>,
    users: usize,
}

/// The NVMe/TCP target.
pub struct NvmfTarget {
    subsystems: RwLock<Vec<Arc<Subsystem>>>,
    controllers: Mutex<BTreeMap<(String, u16), Weak<Controller>>>,
    next_cntlid: Mutex<u16>,
    transport: RwLock<(TransportOptions, bool)>,
    listeners: Mutex<HashMap<SocketAddrV4, ListenerEntry>>,
    connections: Mutex<Vec<Weak<OwnedFd>>>,
    reactors: Vec<ReactorHandle>,
    genctr: AtomicU64,
    chunk_size: usize,
    this: Weak<NvmfTarget>,
}

impl NvmfTarget {
    /// A target with only the discovery subsystem, running connections on
    /// `reactors`, whose pools have chunks of `chunk_size` bytes.
    pub fn new(
        reactors: Vec<ReactorHandle>,
        chunk_size: usize,
    ) -> Result<Arc<NvmfTarget>, SubsystemError> {
        let discovery = Arc::new(Subsystem::discovery()?);
        Ok(Arc::new_cyclic(|this| NvmfTarget {
            subsystems: RwLock::new(vec![discovery]),
            controllers: Mutex::new(BTreeMap::new()),
            next_cntlid: Mutex::new(1),
            transport: RwLock::new((TransportOptions::defaults(chunk_size), false)),
            listeners: Mutex::new(HashMap::new()),
            connections: Mutex::new(Vec::new()),
            reactors,
            genctr: AtomicU64::new(1),
            chunk_size,
            this: this.clone(),
        }))
    }

    /// Pool chunk size (largest I/O).
    pub fn chunk_size(&self) -> usize {
        self.chunk_size
    }

    /// Current transport options.
    pub fn transport(&self) -> TransportOptions {
        read(&self.transport).0
    }

    /// Whether `nvmf_create_transport` was called (for save_config).
    pub fn transport_created(&self) -> bool {
        read(&self.transport).1
    }

    /// Sets the transport options (before any listener exists).
    pub fn create_transport(&self, opts: TransportOptions) -> Result<(), SubsystemError> {
        opts.validate(self.chunk_size)?;
        if read(&self.transport).1 {
            return Err(SubsystemError::Exists(
                "the TCP transport already exists".into(),
            ));
        }
        if !lock(&self.listeners).is_empty() {
            return Err(SubsystemError::Unavailable(
                "transport options must be set before any listener is added".into(),
            ));
        }
        *write(&self.transport) = (opts, true);
        Ok(())
    }

    /// The discovery log changed (subsystems, listeners or hosts): bump its
    /// generation counter and notify discovery controllers that asked.
    pub fn discovery_changed(&self) {
        self.genctr.fetch_add(1, Ordering::AcqRel);
        if let Some(d) = self.subsystem(super::spec::DISCOVERY_NQN) {
            for c in d.controllers() {
                c.discovery_log_changed();
            }
        }
    }

    /// Every subsystem, discovery first, then in creation order.
    pub fn subsystems(&self) -> Vec<Arc<Subsystem>> {
        read(&self.subsystems).clone()
    }

    /// A subsystem by NQN.
    pub fn subsystem(&self, nqn: &str) -> Option<Arc<Subsystem>> {
        read(&self.subsystems)
            .iter()
            .find(|s| s.nqn.as_str() == nqn)
            .cloned()
    }

    /// An NVM subsystem by NQN (the discovery subsystem is not one).
    pub fn nvm_subsystem(&self, nqn: &str) -> Result<Arc<Subsystem>, SubsystemError> {
        self.subsystem(nqn)
            .filter(|s| !s.discovery)
            .ok_or_else(|| SubsystemError::NotFound(format!("no subsystem '{nqn}'")))
    }

    /// Adds a subsystem.
    pub fn add_subsystem(&self, s: Subsystem) -> Result<Arc<Subsystem>, SubsystemError> {
        let mut list = write(&self.subsystems);
        if list.iter().any(|x| x.nqn == s.nqn) {
            return Err(SubsystemError::Exists(format!(
                "subsystem '{}' already exists",
                s.nqn
            )));
        }
        let s = Arc::new(s);
        list.push(s.clone());
        drop(list);
        self.discovery_changed();
        Ok(s)
    }

    /// Deletes a subsystem: its listeners close and its controllers are torn down.
    pub fn delete_subsystem(&self, nqn: &str) -> Result<(), SubsystemError> {
        let s = {
            let mut list = write(&self.subsystems);
            let pos = list
                .iter()
                .position(|x| x.nqn.as_str() == nqn && !x.discovery)
                .ok_or_else(|| SubsystemError::NotFound(format!("no subsystem '{nqn}'")))?;
            list.remove(pos)
        };
        for a in s.policy().listeners {
            self.release_listener(a);
        }
        for c in s.controllers() {
            c.teardown("subsystem deleted");
        }
        self.discovery_changed();
        Ok(())
    }

    /// Removes every namespace exporting `volume_name`; returns how many.
    pub fn remove_volume(&self, volume_name: &str) -> usize {
        let mut n = 0;
        for s in self.subsystems().iter().filter(|s| !s.discovery) {
            let (map, _) = s.namespaces();
            for ns in map.values().filter(|ns| ns.volume.name() == volume_name) {
                if s.remove_namespace(ns.nsid).is_ok() {
                    n += 1;
                }
            }
        }
        n
    }

    /// Whether any subsystem exports `volume_name`.
    pub fn volume_in_use(&self, volume_name: &str) -> bool {
        read(&self.subsystems)
            .iter()
            .any(|s| s.uses_volume(volume_name))
    }

    /// Makes `nqn` listen on `addr` (port 0 picks one); returns the bound address.
    pub fn add_listener(
        &self,
        nqn: &str,
        addr: &ListenAddress,
    ) -> Result<SocketAddrV4, SubsystemError> {
        let s = self.nvm_subsystem(nqn)?;
        let want = addr.socket_addr()?;
        if want.port() != 0 && s.listens_on(want) {
            return Err(SubsystemError::Exists(format!(
                "{nqn} already listens on {want}"
            )));
        }
        let bound = self.acquire_listener(want)?;
        if let Err(e) = s.add_listener(bound) {
            self.release_listener(bound);
            return Err(e);
        }
        self.discovery_changed();
        Ok(bound)
    }

    /// Stops `nqn` listening on `addr`.
    pub fn remove_listener(&self, nqn: &str, addr: &ListenAddress) -> Result<(), SubsystemError> {
        let s = self.nvm_subsystem(nqn)?;
        let a = addr.socket_addr()?;
        s.remove_listener(a)?;
        self.release_listener(a);
        self.discovery_changed();
        Ok(())
    }

    fn acquire_listener(&self, want: SocketAddrV4) -> Result<SocketAddrV4, SubsystemError> {
        let mut l = lock(&self.listeners);
        if want.port() != 0 {
            if let Some(e) = l.get_mut(&want) {
                e.users += 1;
                return Ok(want);
            }
        }
        let Some(reactor) = self.reactors.first() else {
            return Err(SubsystemError::Unavailable("no reactors".into()));
        };
        let cannot = |e: std::io::Error| {
            SubsystemError::Unavailable(format!("cannot listen on {want}: {e}"))
        };
        let std_listener = std::net::TcpListener::bind(want).map_err(cannot)?;
        let bound = match std_listener.local_addr().map_err(cannot)? {
            std::net::SocketAddr::V4(a) => a,
            std::net::SocketAddr::V6(_) => {
                return Err(SubsystemError::Invalid("bound an IPv6 address".into()))
            }
        };
        // A duplicate of the descriptor: shutdown(2) on it from this thread
        // ends the accept loop on its reactor.
        let fd = Arc::new(OwnedFd::from(std_listener.try_clone().map_err(cannot)?));
        let target = self
            .this
            .upgrade()
            .ok_or_else(|| SubsystemError::Unavailable("target is gone".into()))?;
        let reactors = self.reactors.clone();
        if !reactor.post(move || {
            let acceptor =
                TcpListener::from_std(std_listener).and_then(|l| Acceptor::new(l, reactors));
            match acceptor {
                Ok(a) => mirrorpoint_poller::spawn(async move {
                    let r = a
                        .run(move |stream, _peer| super::conn::serve(target.clone(), stream))
                        .await;
                    tracing::debug!(%bound, "accept loop ends: {r:?}");
                })
                .detach(),
                Err(e) => tracing::error!(%bound, "cannot accept: {e}"),
            }
        }) {
            return Err(SubsystemError::Unavailable("reactors are stopping".into()));
        }
        tracing::info!(%bound, "NVMe/TCP listening");
        l.insert(bound, ListenerEntry { fd, users: 1 });
        Ok(bound)
    }

    fn release_listener(&self, a: SocketAddrV4) {
        let mut l = lock(&self.listeners);
        if let Some(e) = l.get_mut(&a) {
            e.users = e.users.saturating_sub(1);
            if e.users == 0 {
                // Wakes the accept loop, which then ends.
                shutdown_fd(&e.fd);
                l.remove(&a);
                tracing::info!(%a, "NVMe/TCP listener closed");
            }
        }
    }

    /// Remembers a connection's socket so shutdown can close it.
    pub fn register_connection(&self, fd: &Arc<OwnedFd>) {
        let mut c = lock(&self.connections);
        c.retain(|w| w.strong_count() > 0);
        c.push(Arc::downgrade(fd));
    }

    /// Closes every listener and connection (daemon shutdown).
    pub fn shutdown(&self) {
        for (_, e) in lock(&self.listeners).drain() {
            shutdown_fd(&e.fd);
        }
        for c in lock(&self.connections)
            .drain(..)
            .filter_map(|w| w.upgrade())
        {
            shutdown_fd(&c);
        }
    }

    /// Discovery log content for a host: every listener of every NVM
    /// subsystem it may connect to.
    pub fn discovery_entries(&self, hostnqn: &str) -> (u64, Vec<DiscoveryEntry>) {
        let genctr = self.genctr.load(Ordering::Acquire);
        let mut out = Vec::new();
        let mut ports: BTreeMap<SocketAddrV4, u16> = BTreeMap::new();
        for s in self.subsystems().iter().filter(|s| !s.discovery) {
            if !s.host_allowed(hostnqn) {
                continue;
            }
            for a in s.policy().listeners {
                let next = ports.len() as u16;
                let portid = *ports.entry(a).or_insert(next);
                out.push(DiscoveryEntry::tcp_ipv4(
                    s.nqn.clone(),
                    &a.ip().to_string(),
                    a.port(),
                    portid,
                ));
            }
        }
        (genctr, out)
    }

    /// A live controller by subsystem and CNTLID.
    pub fn controller(&self, subnqn: &str, cntlid: u16) -> Option<Arc<Controller>> {
        lock(&self.controllers)
            .get(&(subnqn.to_string(), cntlid))
            .and_then(Weak::upgrade)
            .filter(|c| !c.is_dead())
    }

    fn alloc_cntlid(&self, subnqn: &str) -> Option<u16> {
        let table = lock(&self.controllers);
        let mut next = lock(&self.next_cntlid);
        for _ in 0..0xffef {
            let id = *next;
            *next = if id >= 0xffef { 1 } else { id + 1 };
            let live = table
                .get(&(subnqn.to_string(), id))
                .is_some_and(|w| w.strong_count() > 0);
            if !live {
                return Some(id);
            }
        }
        None
    }

    /// Fabrics Connect: creates a controller (QID 0) or attaches an I/O
    /// queue to one (QID > 0). On success returns the controller and the
    /// completion; on refusal, the completion to send.
    pub fn connect(
        &self,
        cmd: &ConnectCommand,
        data: &ConnectData,
        local: SocketAddrV4,
        fd: &Arc<OwnedFd>,
    ) -> Result<(Arc<Controller>, Cqe), Cqe> {
        let cid = cmd.cid;
        let invalid = |offset: u16, in_data: bool| {
            FabricsError::InvalidParameter { offset, in_data }.completion(cid)
        };
        let subnqn = data.subnqn.as_str();
        let Some(sub) = self.subsystem(subnqn) else {
            return Err(invalid(connect_data_off::SUBNQN, true));
        };
        if !sub.listens_on(local) {
            return Err(invalid(connect_data_off::SUBNQN, true));
        }
        if !sub.host_allowed(data.hostnqn.as_str()) {
            return Err(Cqe::new(cid, Status::CONNECT_INVALID_HOST.with_dnr()));
        }
        let opts = self.transport();
        if cmd.sqsize == 0 || cmd.sqsize >= opts.max_queue_depth {
            return Err(invalid(connect_off::SQSIZE, false));
        }
        if cmd.qid.0 == 0 {
            if cmd.sqsize + 1 < ADMIN_QUEUE_MIN {
                return Err(invalid(connect_off::SQSIZE, false));
            }
            if data.cntlid != CntlId::DYNAMIC {
                return Err(invalid(connect_data_off::CNTLID, true));
            }
            let Some(cntlid) = self.alloc_cntlid(subnqn) else {
                return Err(Cqe::new(cid, Status::CONNECT_CONTROLLER_BUSY));
            };
            let entries_of = self.this.clone();
            let ctrl = Arc::new(Controller::new(
                cntlid,
                sub.clone(),
                data.hostnqn.as_str().to_string(),
                data.hostid,
                cmd.kato,
                opts.limits(),
                Box::new(move |host| match entries_of.upgrade() {
                    Some(t) => t.discovery_entries(host),
                    None => (0, Vec::new()),
                }),
            ));
            ctrl.register_socket(fd);
            sub.attach_controller(&ctrl);
            let mut table = lock(&self.controllers);
            table.retain(|_, w| w.strong_count() > 0);
            table.insert((subnqn.to_string(), cntlid), Arc::downgrade(&ctrl));
            drop(table);
            tracing::info!(cntlid, subnqn, hostnqn = %data.hostnqn, "controller created");
            let cqe = Cqe {
                dw0: connect_success_dw0(CntlId(cntlid), 0),
                ..Cqe::new(cid, Status::SUCCESS)
            };
            return Ok((ctrl, cqe));
        }
        if sub.discovery {
            return Err(invalid(connect_off::QID, false));
        }
        let Some(ctrl) = self.controller(subnqn, data.cntlid.0) else {
            return Err(invalid(connect_data_off::CNTLID, true));
        };
        if ctrl.hostnqn != data.hostnqn.as_str() || ctrl.hostid != data.hostid {
            return Err(invalid(connect_data_off::HOSTNQN, true));
        }
        match ctrl.attach_io_queue(cmd.qid.0) {
            Ok(()) => {}
            Err(s) if s == Status::CONNECT_INVALID_PARAMETERS.with_dnr() => {
                return Err(invalid(connect_off::QID, false))
            }
            Err(s) => return Err(Cqe::new(cid, s)),
        }
        ctrl.register_socket(fd);
        let cqe = Cqe {
            dw0: connect_success_dw0(CntlId(ctrl.cntlid), 0),
            ..Cqe::new(cid, Status::SUCCESS)
        };
        Ok((ctrl, cqe))
    }
}
