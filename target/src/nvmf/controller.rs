//! Controllers: what a Fabrics Connect on the admin queue creates, and the
//! admin command set executed against it.
//!
//! A [`Controller`] belongs to one subsystem and one host. Its admin queue
//! lives on one connection (one reactor); its I/O queues may arrive on other
//! connections on other cores, and attach to it by CNTLID through the
//! target's controller table. So the controller is shared (`Arc`), its
//! registers and features sit behind a mutex touched only by admin commands
//! and Connects (control path), and the data path reads only atomics (the
//! `dead` flag, statistics) and the subsystem's namespace snapshot.
//!
//! Admin execution is synchronous and sans-IO: [`Controller::execute_admin`]
//! maps an SQE and its host data to a completion and the data to return, so
//! every admin rule is unit tested without sockets. Two things reach across
//! threads: asynchronous events (a namespace added by an RPC completes an
//! Asynchronous Event Request held on the admin connection's reactor, through
//! a waker) and teardown (keep-alive expiry or the admin connection closing
//! shuts down every connection of the controller, whatever core it is on,
//! with `shutdown(2)` on its socket, which is safe from any thread).

use super::identify::{
    active_ns_list, inactive_namespace, ns_id_descriptors, ControllerType, IdentifyCommand,
    IdentifyController, IdentifyNamespace, NamespaceIds, IDENTIFY_LEN,
};
use super::log_page::{
    changed_ns_list, discovery_log, error_log, lid, slice_log, DiscoveryEntry, ErrorEntry,
    GetLogPage, SmartLog,
};
use super::spec::{
    fid, number_of_queues_dw0, property_get_completion, AdminOpcode, Cap, Cc, CntlId, CommandId,
    Cqe, Csts, FabricsCommandType, Nsid, Property, PropertyCommand, Shutdown, Sqe, Status,
};
use super::subsystem::{lock, Subsystem};
use crate::units::Lba;
use std::collections::{BTreeSet, VecDeque};
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

/// Firmware revision reported in Identify Controller.
pub const FIRMWARE_REVISION: &str = concat!("mp", env!("CARGO_PKG_VERSION"));
/// Outstanding Asynchronous Event Requests allowed (AERL + 1).
pub const MAX_AERS: usize = 4;
/// Admin queue depth limit (entries) accepted at Connect.
pub const ADMIN_QUEUE_MIN: u16 = 32;

/// Limits a controller reports, from the transport options.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ControllerLimits {
    /// Queue entries per queue (CAP.MQES + 1).
    pub max_queue_depth: u16,
    /// I/O queues a controller may have.
    pub max_io_queues: u16,
    /// In-capsule data accepted on I/O queues, bytes.
    pub in_capsule_data: u32,
    /// Largest transfer of one command, bytes (a power of two, >= 4096).
    pub max_io_size: u32,
}

impl ControllerLimits {
    /// MDTS in 4 KiB (CAP.MPSMIN) units, log2.
    pub fn mdts(&self) -> u8 {
        let pages = (self.max_io_size / 4096).max(1);
        (31 - pages.leading_zeros()) as u8
    }
}

/// Entries the Error Information log page keeps (Identify ELPE + 1).
pub const ERROR_LOG_ENTRIES: usize = 64;

/// The newest failed commands, for the Error Information log page.
#[derive(Debug, Default)]
struct ErrorLog {
    /// Errors over the controller's life (the newest entry's count).
    count: u64,
    /// Newest last; at most [`ERROR_LOG_ENTRIES`].
    entries: VecDeque<ErrorEntry>,
}

/// Per-controller I/O statistics, updated by every queue with relaxed atomics.
#[derive(Debug, Default)]
pub struct IoStats {
    /// Read commands completed.
    pub reads: AtomicU64,
    /// Write commands completed.
    pub writes: AtomicU64,
    /// Bytes read.
    pub bytes_read: AtomicU64,
    /// Bytes written.
    pub bytes_written: AtomicU64,
}

/// How a held Asynchronous Event Request ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AerEnd {
    /// An event: the completion's DW0.
    Event(u32),
    /// Taken back by an Abort command: completes with Command Abort Requested.
    Aborted,
}

struct State {
    cc: Cc,
    csts: Csts,
    kato_ms: u32,
    aec: u32,
    io_queues: u16,
    io_qids: BTreeSet<u16>,
    aer_cids: VecDeque<super::spec::CommandId>,
    /// Held AERs an Abort command took back, to complete as aborted.
    aborted_aers: VecDeque<super::spec::CommandId>,
    events: VecDeque<u32>,
    changed_ns: BTreeSet<u32>,
    ns_notice_masked: bool,
    discovery_notice_masked: bool,
    waker: Option<Waker>,
    last_keep_alive: Instant,
}

/// What an admin command produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AdminOutcome {
    /// Complete now with `cqe`, after sending `data` to the host.
    Done {
        /// The completion (SQHD and SQID are filled in by the queue).
        cqe: Cqe,
        /// Controller-to-host data, if any.
        data: Option<Vec<u8>>,
    },
    /// An Asynchronous Event Request: completed later.
    Held,
    /// Fabrics Disconnect: complete, then close the connection.
    Disconnect(Cqe),
}

fn done(cqe: Cqe) -> AdminOutcome {
    AdminOutcome::Done { cqe, data: None }
}

fn status(sqe: &Sqe, s: Status) -> AdminOutcome {
    done(Cqe::new(sqe.cid, s))
}

/// Yields the discovery log's generation counter and entries for a host NQN.
pub type DiscoverySource = Box<dyn Fn(&str) -> (u64, Vec<DiscoveryEntry>) + Send + Sync>;

/// A controller of a subsystem, created by an admin queue Connect.
pub struct Controller {
    /// Controller ID.
    pub cntlid: u16,
    /// The subsystem.
    pub subsystem: Arc<Subsystem>,
    /// The host's NQN.
    pub hostnqn: String,
    /// The host identifier from Connect.
    pub hostid: [u8; 16],
    /// Limits reported to the host.
    pub limits: ControllerLimits,
    /// Statistics.
    pub stats: IoStats,
    state: Mutex<State>,
    errors: Mutex<ErrorLog>,
    dead: AtomicBool,
    sockets: Mutex<Vec<Weak<OwnedFd>>>,
    discovery_entries: DiscoverySource,
}

impl std::fmt::Debug for Controller {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Controller({} on {})", self.cntlid, self.subsystem.nqn)
    }
}

impl Controller {
    /// A controller in the state right after Connect (CC.EN = 0).
    /// `discovery_entries` yields the discovery log's generation counter and
    /// entries for a host NQN (used by discovery controllers only).
    pub fn new(
        cntlid: u16,
        subsystem: Arc<Subsystem>,
        hostnqn: String,
        hostid: [u8; 16],
        kato_ms: u32,
        limits: ControllerLimits,
        discovery_entries: DiscoverySource,
    ) -> Controller {
        Controller {
            cntlid,
            subsystem,
            hostnqn,
            hostid,
            limits,
            stats: IoStats::default(),
            state: Mutex::new(State {
                cc: Cc(0),
                csts: Csts(0),
                kato_ms,
                aec: 0,
                io_queues: limits.max_io_queues,
                io_qids: BTreeSet::new(),
                aer_cids: VecDeque::new(),
                aborted_aers: VecDeque::new(),
                events: VecDeque::new(),
                changed_ns: BTreeSet::new(),
                ns_notice_masked: false,
                discovery_notice_masked: false,
                waker: None,
                last_keep_alive: Instant::now(),
            }),
            errors: Mutex::new(ErrorLog::default()),
            dead: AtomicBool::new(false),
            sockets: Mutex::new(Vec::new()),
            discovery_entries,
        }
    }

    /// Records a command that completed with an error status in the Error
    /// Information log (what `nvme error-log` shows): queue, command id,
    /// status, namespace and first LBA.
    pub fn record_error(&self, sqid: u16, cid: CommandId, status: Status, nsid: Nsid, lba: Lba) {
        let mut log = lock(&self.errors);
        log.count += 1;
        let entry = ErrorEntry {
            error_count: log.count,
            sqid,
            cid,
            status,
            param_error_location: 0xffff,
            lba,
            nsid,
            trtype: 3,
            command_specific: 0,
        };
        if log.entries.len() == ERROR_LOG_ENTRIES {
            log.entries.pop_front();
        }
        log.entries.push_back(entry);
    }

    /// Errors recorded over the controller's life.
    pub fn error_count(&self) -> u64 {
        lock(&self.errors).count
    }

    /// Whether the controller has been torn down.
    pub fn is_dead(&self) -> bool {
        self.dead.load(Ordering::Acquire)
    }

    /// Whether CC.EN and CSTS.RDY are set.
    pub fn is_ready(&self) -> bool {
        lock(&self.state).csts.rdy()
    }

    /// The keep-alive timeout (0 = disabled).
    pub fn kato(&self) -> Duration {
        Duration::from_millis(u64::from(lock(&self.state).kato_ms))
    }

    /// When the last Keep Alive (or Connect) arrived.
    pub fn last_keep_alive(&self) -> Instant {
        lock(&self.state).last_keep_alive
    }

    /// Registers the socket of a connection so teardown can close it.
    pub fn register_socket(&self, fd: &Arc<OwnedFd>) {
        let mut s = lock(&self.sockets);
        s.retain(|w| w.strong_count() > 0);
        s.push(Arc::downgrade(fd));
        drop(s);
        if self.is_dead() {
            // Raced with teardown: close this one too.
            shutdown_fd(fd);
        }
    }

    /// Tears the controller down: every connection of it (admin and I/O, on
    /// any core) is shut down, held AERs are dropped, and a later I/O queue
    /// Connect cannot find it.
    pub fn teardown(&self, why: &str) {
        if self.dead.swap(true, Ordering::AcqRel) {
            return;
        }
        tracing::info!(cntlid = self.cntlid, subnqn = %self.subsystem.nqn, "controller torn down: {why}");
        let sockets: Vec<_> = lock(&self.sockets).drain(..).collect();
        for s in sockets.iter().filter_map(Weak::upgrade) {
            shutdown_fd(&s);
        }
        let waker = lock(&self.state).waker.take();
        if let Some(w) = waker {
            w.wake();
        }
    }

    /// Claims an I/O queue ID at its Connect; the status on refusal.
    pub fn attach_io_queue(&self, qid: u16) -> Result<(), Status> {
        let mut st = lock(&self.state);
        if !st.csts.rdy() {
            return Err(Status::COMMAND_SEQUENCE_ERROR.with_dnr());
        }
        if qid == 0 || qid > st.io_queues {
            return Err(Status::CONNECT_INVALID_PARAMETERS.with_dnr());
        }
        if !st.io_qids.insert(qid) {
            return Err(Status::CONNECT_INVALID_PARAMETERS.with_dnr());
        }
        Ok(())
    }

    /// I/O queues attached now.
    pub fn io_queue_count(&self) -> usize {
        lock(&self.state).io_qids.len()
    }

    /// Releases an I/O queue ID when its connection ends.
    pub fn detach_io_queue(&self, qid: u16) {
        lock(&self.state).io_qids.remove(&qid);
    }

    /// Notes a namespace change: queues a Namespace Attribute Changed notice
    /// if the host enabled them and has not been told since it last read the
    /// Changed Namespace List.
    pub fn namespace_changed(&self, nsid: u32) {
        let waker = {
            let mut st = lock(&self.state);
            st.changed_ns.insert(nsid);
            if st.aec & (1 << 8) == 0 || st.ns_notice_masked {
                return;
            }
            st.ns_notice_masked = true;
            // Type 2 (notice), info 0 (namespace attribute changed), log page 04h.
            st.events
                .push_back(2 | (u32::from(lid::CHANGED_NAMESPACES) << 16));
            st.waker.take()
        };
        if let Some(w) = waker {
            w.wake();
        }
    }

    /// Notes a change of the discovery log (discovery controllers only):
    /// queues a Discovery Log Page Change notice if the host enabled them
    /// and has read the log since the last one.
    pub fn discovery_log_changed(&self) {
        if !self.subsystem.discovery {
            return;
        }
        let waker = {
            let mut st = lock(&self.state);
            if st.aec & (1 << 31) == 0 || st.discovery_notice_masked {
                return;
            }
            st.discovery_notice_masked = true;
            // Type 2 (notice), info F0h (discovery log page change), log page 70h.
            st.events
                .push_back(2 | (0xf0 << 8) | (u32::from(lid::DISCOVERY) << 16));
            st.waker.take()
        };
        if let Some(w) = waker {
            w.wake();
        }
    }

    /// Polls for an Asynchronous Event Request to complete: `Some((cid,
    /// end))` when an event meets a held request or an Abort took one back,
    /// `None` once the controller is dead (stop polling).
    pub fn poll_event(
        &self,
        cx: &mut Context<'_>,
    ) -> Poll<Option<(super::spec::CommandId, AerEnd)>> {
        if self.is_dead() {
            return Poll::Ready(None);
        }
        let mut st = lock(&self.state);
        if let Some(cid) = st.aborted_aers.pop_front() {
            return Poll::Ready(Some((cid, AerEnd::Aborted)));
        }
        if !st.aer_cids.is_empty() && !st.events.is_empty() {
            if let (Some(cid), Some(ev)) = (st.aer_cids.pop_front(), st.events.pop_front()) {
                return Poll::Ready(Some((cid, AerEnd::Event(ev))));
            }
        }
        st.waker = Some(cx.waker().clone());
        Poll::Pending
    }

    fn identify_controller(&self) -> Result<Vec<u8>, Status> {
        let discovery = self.subsystem.discovery;
        let mut id = IdentifyController::tcp_io(
            &self.subsystem.serial,
            &self.subsystem.model,
            FIRMWARE_REVISION,
            CntlId(self.cntlid),
            self.subsystem.nqn.clone(),
            self.subsystem.max_namespaces,
            self.limits.in_capsule_data,
        );
        id.mdts = self.limits.mdts();
        id.maxcmd = self.limits.max_queue_depth;
        id.aerl = (MAX_AERS - 1) as u8;
        id.elpe = (ERROR_LOG_ENTRIES - 1) as u8;
        let (ns, _) = self.subsystem.namespaces();
        // A volatile write cache is present unless every volume is RAM
        // (where there is no cache distinct from the medium to flush).
        let cache = ns
            .values()
            .any(|n| n.volume.info().product_name != "Malloc disk");
        id.vwc = if cache { 1 | (3 << 1) } else { 3 << 1 };
        if discovery {
            id.cntrltype = ControllerType::Discovery;
            id.nn = 0;
            id.oncs = 0;
            // Discovery log page change notices.
            id.oaes = 1 << 31;
            id.vwc = 0;
            id.cmic = 0;
        }
        id.encode().map_err(|_| Status::INTERNAL_ERROR)
    }

    fn identify(&self, sqe: &Sqe) -> Result<Vec<u8>, Status> {
        let cmd = IdentifyCommand::from_sqe(sqe);
        let (ns, _) = self.subsystem.namespaces();
        let valid_nsid = |n: Nsid| n.0 >= 1 && n.0 <= self.subsystem.max_namespaces;
        match cmd.cns {
            0x01 => self.identify_controller(),
            _ if self.subsystem.discovery => Err(Status::INVALID_FIELD.with_dnr()),
            0x00 => {
                if !valid_nsid(cmd.nsid) {
                    return Err(Status::INVALID_NAMESPACE.with_dnr());
                }
                match ns.get(&cmd.nsid.0) {
                    Some(n) => {
                        let v = &n.volume;
                        Ok(IdentifyNamespace::new(v.size(), v.block_size(), n.nguid).encode())
                    }
                    None => Ok(inactive_namespace()),
                }
            }
            0x02 => {
                let ids: Vec<Nsid> = ns.keys().map(|&n| Nsid(n)).collect();
                active_ns_list(&ids, cmd.nsid)
            }
            0x03 => {
                if !valid_nsid(cmd.nsid) {
                    return Err(Status::INVALID_NAMESPACE.with_dnr());
                }
                match ns.get(&cmd.nsid.0) {
                    Some(n) => Ok(ns_id_descriptors(&NamespaceIds {
                        eui64: None,
                        nguid: Some(n.nguid),
                        uuid: Some(n.uuid),
                        csi: Some(0),
                    })),
                    None => Err(Status::INVALID_NAMESPACE.with_dnr()),
                }
            }
            // I/O command set specific structures for the NVM command set
            // (CSI 0): no limits beyond MDTS, no NVM-specific namespace fields.
            0x05 if cmd.csi == 0 => {
                if !valid_nsid(cmd.nsid) || !ns.contains_key(&cmd.nsid.0) {
                    return Err(Status::INVALID_NAMESPACE.with_dnr());
                }
                Ok(vec![0u8; IDENTIFY_LEN])
            }
            0x06 if cmd.csi == 0 => Ok(vec![0u8; IDENTIFY_LEN]),
            _ => Err(Status::INVALID_FIELD.with_dnr()),
        }
    }

    fn get_log_page(&self, sqe: &Sqe, max_transfer: u32) -> Result<Vec<u8>, Status> {
        let cmd = GetLogPage::from_sqe(sqe);
        let page = match (self.subsystem.discovery, cmd.lid) {
            (true, lid::DISCOVERY) => {
                if !cmd.rae {
                    lock(&self.state).discovery_notice_masked = false;
                }
                let (genctr, entries) = (self.discovery_entries)(&self.hostnqn);
                discovery_log(genctr, &entries).map_err(|_| Status::INTERNAL_ERROR)?
            }
            (_, lid::ERROR_INFORMATION) => {
                let log = lock(&self.errors);
                let newest_first: Vec<ErrorEntry> = log.entries.iter().rev().copied().collect();
                error_log(&newest_first, (ERROR_LOG_ENTRIES - 1) as u8)
            }
            (false, lid::SMART) => {
                let s = &self.stats;
                SmartLog {
                    temperature_kelvin: 293,
                    available_spare: 100,
                    spare_threshold: 10,
                    data_units_read: SmartLog::data_units(s.bytes_read.load(Ordering::Relaxed)),
                    data_units_written: SmartLog::data_units(
                        s.bytes_written.load(Ordering::Relaxed),
                    ),
                    host_reads: u128::from(s.reads.load(Ordering::Relaxed)),
                    host_writes: u128::from(s.writes.load(Ordering::Relaxed)),
                    power_cycles: 1,
                    error_log_entries: u128::from(self.error_count()),
                    ..SmartLog::default()
                }
                .encode()
            }
            (false, lid::FIRMWARE_SLOT) => {
                let mut p = vec![0u8; 512];
                // AFI: slot 1 active; FRS1: the firmware revision.
                let fr = FIRMWARE_REVISION.bytes().chain(std::iter::repeat(b' '));
                for (d, c) in p.iter_mut().skip(8).take(8).zip(fr) {
                    *d = c;
                }
                if let Some(afi) = p.first_mut() {
                    *afi = 1;
                }
                p
            }
            (false, lid::CHANGED_NAMESPACES) => {
                let mut st = lock(&self.state);
                let ids: Vec<Nsid> = st.changed_ns.iter().map(|&n| Nsid(n)).collect();
                let page = if ids.len() > 1024 {
                    changed_ns_list(&[Nsid::BROADCAST])
                } else {
                    changed_ns_list(&ids)
                };
                if !cmd.rae {
                    st.changed_ns.clear();
                    st.ns_notice_masked = false;
                }
                page
            }
            _ => return Err(Status::INVALID_LOG_PAGE.with_dnr()),
        };
        slice_log(&page, &cmd, max_transfer)
    }

    fn features(&self, sqe: &Sqe, set: bool) -> Result<u32, Status> {
        let cdw10 = sqe.cdw10_plus(0);
        let cdw11 = sqe.cdw10_plus(1);
        let id = (cdw10 & 0xff) as u8;
        if set && cdw10 & (1 << 31) != 0 {
            return Err(Status::FEATURE_NOT_SAVEABLE.with_dnr());
        }
        let sel = (cdw10 >> 8) & 0x7;
        if !set && sel == 3 {
            // Supported capabilities: changeable for the ones Set accepts.
            return match id {
                fid::NUMBER_OF_QUEUES | fid::ASYNC_EVENT_CONFIG | fid::KEEP_ALIVE_TIMER => {
                    Ok(1 << 2)
                }
                fid::ARBITRATION | fid::VOLATILE_WRITE_CACHE => Ok(0),
                _ => Err(Status::INVALID_FIELD.with_dnr()),
            };
        }
        let discovery = self.subsystem.discovery;
        let mut st = lock(&self.state);
        match id {
            fid::ARBITRATION if !set => Ok(0),
            fid::VOLATILE_WRITE_CACHE if !discovery => {
                let present = self.identify_vwc_present();
                if set {
                    // The cache cannot be switched; accept only what it is.
                    if (cdw11 & 1 != 0) == present {
                        Ok(cdw11 & 1)
                    } else {
                        Err(Status::FEATURE_NOT_CHANGEABLE.with_dnr())
                    }
                } else {
                    Ok(u32::from(present))
                }
            }
            fid::NUMBER_OF_QUEUES if !discovery => {
                if set {
                    let nsqr = cdw11 & 0xffff;
                    let ncqr = cdw11 >> 16;
                    if nsqr == 0xffff || ncqr == 0xffff {
                        return Err(Status::INVALID_FIELD.with_dnr());
                    }
                    if !st.io_qids.is_empty() {
                        return Err(Status::COMMAND_SEQUENCE_ERROR.with_dnr());
                    }
                    let want = (nsqr.min(ncqr) + 1).min(u32::from(self.limits.max_io_queues));
                    st.io_queues = want as u16;
                }
                Ok(number_of_queues_dw0(st.io_queues))
            }
            fid::ASYNC_EVENT_CONFIG => {
                if set {
                    st.aec = cdw11;
                }
                Ok(st.aec)
            }
            fid::KEEP_ALIVE_TIMER => {
                if set {
                    // Round up to the 1 s granularity reported in KAS.
                    let ms = cdw11;
                    st.kato_ms = if ms == 0 {
                        0
                    } else {
                        ms.div_ceil(1000).saturating_mul(1000)
                    };
                    st.last_keep_alive = Instant::now();
                }
                Ok(st.kato_ms)
            }
            _ => Err(Status::INVALID_FIELD.with_dnr()),
        }
    }

    fn identify_vwc_present(&self) -> bool {
        let (ns, _) = self.subsystem.namespaces();
        ns.values()
            .any(|n| n.volume.info().product_name != "Malloc disk")
    }

    fn property(&self, sqe: &Sqe) -> AdminOutcome {
        let cmd = match PropertyCommand::from_sqe(sqe) {
            Ok(c) => c,
            Err(e) => return done(e.completion(sqe.cid)),
        };
        let prop = match cmd.property() {
            Ok(p) => p,
            Err(e) => return done(e.completion(sqe.cid)),
        };
        let mut st = lock(&self.state);
        match cmd.value {
            None => {
                let v = match prop {
                    Property::Cap => Cap {
                        mqes: self.limits.max_queue_depth.saturating_sub(1),
                        cqr: true,
                        to: 10,
                        nssrs: false,
                        css: 1,
                        mpsmin: 0,
                        mpsmax: 0,
                    }
                    .to_u64(),
                    Property::Vs => u64::from(super::spec::version(1, 4, 0)),
                    Property::Cc => u64::from(st.cc.0),
                    Property::Csts => u64::from(st.csts.0),
                    Property::Nssr => 0,
                };
                done(property_get_completion(sqe.cid, v))
            }
            Some(v) => match prop {
                Property::Cc => {
                    let new = Cc(v as u32);
                    let old = st.cc;
                    if new.en() && !old.en() {
                        if !self.subsystem.discovery
                            && (new.iosqes() != 6 || new.iocqes() != 4 || new.css() != 0)
                        {
                            // Invalid configuration: the controller fails to become ready.
                            st.csts = Csts::new(false, true, Shutdown::None);
                            st.cc = new;
                            return done(Cqe::new(sqe.cid, Status::SUCCESS));
                        }
                        st.csts = Csts::new(true, false, Shutdown::None);
                    } else if !new.en() && old.en() {
                        // Controller reset.
                        st.csts = Csts::new(false, false, Shutdown::None);
                    }
                    if new.shn() != Shutdown::None {
                        let rdy = st.csts.rdy();
                        st.csts = Csts::new(rdy, st.csts.cfs(), Shutdown::Abrupt);
                    } else if old.shn() != Shutdown::None {
                        let rdy = st.csts.rdy();
                        st.csts = Csts::new(rdy, st.csts.cfs(), Shutdown::None);
                    }
                    st.cc = new;
                    done(Cqe::new(sqe.cid, Status::SUCCESS))
                }
                _ => status(sqe, Status::INVALID_FIELD.with_dnr()),
            },
        }
    }

    /// Executes one admin command. `_data` is the host's data for commands
    /// that carry some (none of the supported ones reads it yet);
    /// `max_transfer` is the length of the command's data buffer (its SGL),
    /// which bounds what is returned.
    pub fn execute_admin(&self, sqe: &Sqe, _data: &[u8], max_transfer: u32) -> AdminOutcome {
        if sqe.is_fabrics() {
            return match FabricsCommandType::from_u8(sqe.fctype()) {
                Some(FabricsCommandType::PropertyGet | FabricsCommandType::PropertySet) => {
                    self.property(sqe)
                }
                Some(FabricsCommandType::Disconnect) => {
                    AdminOutcome::Disconnect(Cqe::new(sqe.cid, Status::SUCCESS))
                }
                Some(FabricsCommandType::Connect) => {
                    status(sqe, Status::COMMAND_SEQUENCE_ERROR.with_dnr())
                }
                _ => status(sqe, Status::INVALID_OPCODE.with_dnr()),
            };
        }
        if !lock(&self.state).csts.rdy() && sqe.opcode != AdminOpcode::KeepAlive.as_u8() {
            // Only fabrics commands before CC.EN.
            return status(sqe, Status::COMMAND_SEQUENCE_ERROR.with_dnr());
        }
        let with_data = |r: Result<Vec<u8>, Status>, limit: usize| match r {
            Ok(mut d) => {
                d.truncate(limit);
                AdminOutcome::Done {
                    cqe: Cqe::new(sqe.cid, Status::SUCCESS),
                    data: Some(d),
                }
            }
            Err(s) => status(sqe, s),
        };
        match AdminOpcode::from_u8(sqe.opcode) {
            Some(AdminOpcode::Identify) => {
                if max_transfer < IDENTIFY_LEN as u32 {
                    return status(sqe, Status::DATA_SGL_LENGTH_INVALID.with_dnr());
                }
                with_data(self.identify(sqe), IDENTIFY_LEN)
            }
            Some(AdminOpcode::GetLogPage) => {
                let r = self.get_log_page(sqe, max_transfer);
                let n = r.as_ref().map(Vec::len).unwrap_or(0);
                with_data(r, n)
            }
            Some(AdminOpcode::SetFeatures) => match self.features(sqe, true) {
                Ok(dw0) => done(Cqe {
                    dw0,
                    ..Cqe::new(sqe.cid, Status::SUCCESS)
                }),
                Err(s) => status(sqe, s),
            },
            Some(AdminOpcode::GetFeatures) => match self.features(sqe, false) {
                Ok(dw0) => done(Cqe {
                    dw0,
                    ..Cqe::new(sqe.cid, Status::SUCCESS)
                }),
                Err(s) => status(sqe, s),
            },
            Some(AdminOpcode::KeepAlive) => {
                lock(&self.state).last_keep_alive = Instant::now();
                status(sqe, Status::SUCCESS)
            }
            Some(AdminOpcode::AsyncEventRequest) => {
                let waker = {
                    let mut st = lock(&self.state);
                    if st.aer_cids.len() >= MAX_AERS {
                        return status(sqe, Status::ASYNC_EVENT_LIMIT_EXCEEDED.with_dnr());
                    }
                    st.aer_cids.push_back(sqe.cid);
                    st.waker.take()
                };
                if let Some(w) = waker {
                    w.wake();
                }
                AdminOutcome::Held
            }
            Some(AdminOpcode::Abort) => {
                // CDW10: SQID in bits 15:0, CID in bits 31:16. A held AER
                // (admin queue) is taken back and completes as aborted; an
                // I/O command is already on its volume and runs to
                // completion, so it is "not aborted" (DW0 bit 0), which the
                // specification allows for any command.
                let sqid = (sqe.cdw10_plus(0) & 0xffff) as u16;
                let cid = super::spec::CommandId((sqe.cdw10_plus(0) >> 16) as u16);
                let waker = if sqid == 0 {
                    let mut st = lock(&self.state);
                    match st.aer_cids.iter().position(|&c| c == cid) {
                        Some(i) => {
                            st.aer_cids.remove(i);
                            st.aborted_aers.push_back(cid);
                            Some(st.waker.take())
                        }
                        None => None,
                    }
                } else {
                    None
                };
                let aborted = waker.is_some();
                if let Some(Some(w)) = waker {
                    w.wake();
                }
                done(Cqe {
                    dw0: u32::from(!aborted),
                    ..Cqe::new(sqe.cid, Status::SUCCESS)
                })
            }
            Some(AdminOpcode::Fabrics) | None => status(sqe, Status::INVALID_OPCODE.with_dnr()),
        }
    }
}

/// `shutdown(2)` a socket: wakes every pending receive on it, from any thread.
pub fn shutdown_fd(fd: &OwnedFd) {
    // SAFETY: shutdown on a descriptor we hold; no memory is passed.
    unsafe {
        libc::shutdown(fd.as_raw_fd(), libc::SHUT_RDWR);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nvmf::spec::{CommandId, DataSgl, OPC_FABRICS};
    use crate::nvmf::subsystem::NamespaceParams;
    use crate::volume::{VolumeRegistry, VolumeSpec};

    fn limits() -> ControllerLimits {
        ControllerLimits {
            max_queue_depth: 128,
            max_io_queues: 8,
            in_capsule_data: 4096,
            max_io_size: 128 * 1024,
        }
    }

    fn ctrl(sub: Arc<Subsystem>) -> Controller {
        Controller::new(
            1,
            sub,
            "nqn.host".into(),
            [0; 16],
            0,
            limits(),
            Box::new(|_| (7, Vec::new())),
        )
    }

    fn prop_set(cid: u16, off: u32, v: u64) -> Sqe {
        PropertyCommand {
            cid: CommandId(cid),
            size8: false,
            offset: off,
            value: Some(v),
        }
        .to_sqe()
    }

    fn prop_get(cid: u16, off: u32, size8: bool) -> Sqe {
        PropertyCommand {
            cid: CommandId(cid),
            size8,
            offset: off,
            value: None,
        }
        .to_sqe()
    }

    fn cqe(o: AdminOutcome) -> (Cqe, Option<Vec<u8>>) {
        match o {
            AdminOutcome::Done { cqe, data } => (cqe, data),
            other => panic!("{other:?}"),
        }
    }

    fn admin(op: AdminOpcode, cid: u16, nsid: u32, cdw: [u32; 6]) -> Sqe {
        let mut s = Sqe::new(
            op.as_u8(),
            CommandId(cid),
            Nsid(nsid),
            DataSgl::Transport { len: 4096 },
        );
        s.cdw = cdw;
        s
    }

    fn enable(c: &Controller) {
        // CC: EN, IOSQES 6, IOCQES 4.
        let cc = 1 | (6 << 16) | (4 << 20);
        let (r, _) = cqe(c.execute_admin(&prop_set(1, 0x14, cc), &[], 0));
        assert!(r.status.is_success());
    }

    fn subsystem_with_ns() -> Arc<Subsystem> {
        let reg = VolumeRegistry::new();
        let v = reg
            .create(VolumeSpec::Malloc(crate::volume::registry::MallocParams {
                name: Some("m0".into()),
                num_blocks: 64,
                block_size: crate::units::BlockSize::B512,
                uuid: Some("0123abcd-4567-89ab-cdef-0123456789ab".into()),
            }))
            .expect("volume");
        let s = Arc::new(
            Subsystem::new("nqn.2026-11.io.t:a", Some("SN"), None, true, None).expect("sub"),
        );
        s.add_namespace(
            v,
            NamespaceParams {
                bdev_name: "m0".into(),
                nsid: None,
                nguid: None,
                uuid: None,
            },
        )
        .expect("ns");
        s
    }

    #[test]
    fn registers_enable_and_shutdown() {
        let c = ctrl(subsystem_with_ns());
        let (r, _) = cqe(c.execute_admin(&prop_get(1, 0, true), &[], 0));
        let cap = Cap::from_u64(u64::from(r.dw0) | (u64::from(r.dw1) << 32));
        assert_eq!(cap.mqes, 127);
        assert!(cap.cqr);
        assert_eq!(cap.css & 1, 1);
        let (r, _) = cqe(c.execute_admin(&prop_get(1, 8, false), &[], 0));
        assert_eq!(r.dw0, super::super::spec::version(1, 4, 0));
        // Wrong width.
        let (r, _) = cqe(c.execute_admin(&prop_get(1, 0, false), &[], 0));
        assert!(!r.status.is_success());
        // Admin commands before enable are refused.
        let (r, _) = cqe(c.execute_admin(
            &admin(AdminOpcode::Identify, 2, 0, [1, 0, 0, 0, 0, 0]),
            &[],
            4096,
        ));
        assert_eq!(r.status, Status::COMMAND_SEQUENCE_ERROR.with_dnr());
        enable(&c);
        let (r, _) = cqe(c.execute_admin(&prop_get(1, 0x1c, false), &[], 0));
        assert!(Csts(r.dw0).rdy());
        // Shutdown notification: SHST complete.
        let cc = 1 | (6 << 16) | (4 << 20) | (1 << 14);
        cqe(c.execute_admin(&prop_set(1, 0x14, cc), &[], 0));
        let (r, _) = cqe(c.execute_admin(&prop_get(1, 0x1c, false), &[], 0));
        assert_eq!(Csts(r.dw0).shst(), Shutdown::Abrupt);
        // Disable: not ready.
        cqe(c.execute_admin(&prop_set(1, 0x14, 0), &[], 0));
        let (r, _) = cqe(c.execute_admin(&prop_get(1, 0x1c, false), &[], 0));
        assert!(!Csts(r.dw0).rdy());
    }

    #[test]
    fn identify_controller_and_namespaces() {
        let c = ctrl(subsystem_with_ns());
        enable(&c);
        let (r, d) = cqe(c.execute_admin(
            &admin(AdminOpcode::Identify, 2, 0, [1, 0, 0, 0, 0, 0]),
            &[],
            4096,
        ));
        assert!(r.status.is_success());
        let d = d.expect("data");
        assert_eq!(d.len(), 4096);
        assert_eq!(d[77], 5, "MDTS = 128 KiB / 4 KiB = 2^5");
        assert_eq!(u16::from_le_bytes([d[78], d[79]]), 1);
        assert_eq!(d[525] & 1, 0, "malloc only: no volatile write cache");
        let (_, d) = cqe(c.execute_admin(&admin(AdminOpcode::Identify, 2, 1, [0; 6]), &[], 4096));
        let d = d.expect("ns");
        assert_eq!(u64::from_le_bytes(d[0..8].try_into().expect("8")), 64);
        let (_, d) = cqe(c.execute_admin(
            &admin(AdminOpcode::Identify, 2, 0, [2, 0, 0, 0, 0, 0]),
            &[],
            4096,
        ));
        assert_eq!(&d.expect("list")[0..8], &[1, 0, 0, 0, 0, 0, 0, 0]);
        let (_, d) = cqe(c.execute_admin(
            &admin(AdminOpcode::Identify, 2, 1, [3, 0, 0, 0, 0, 0]),
            &[],
            4096,
        ));
        let d = d.expect("descs");
        assert_eq!(d[0], 2, "NGUID first");
        assert_eq!(&d[4..8], &[0x01, 0x23, 0xab, 0xcd]);
        // Inactive but valid NSID: zeroes; invalid NSID: error.
        let (r, d) = cqe(c.execute_admin(&admin(AdminOpcode::Identify, 2, 2, [0; 6]), &[], 4096));
        assert!(r.status.is_success());
        assert!(d.expect("zeroes").iter().all(|&b| b == 0));
        let (r, _) = cqe(c.execute_admin(&admin(AdminOpcode::Identify, 2, 0, [0; 6]), &[], 4096));
        assert_eq!(r.status, Status::INVALID_NAMESPACE.with_dnr());
        let (r, _) = cqe(c.execute_admin(
            &admin(AdminOpcode::Identify, 2, 0, [0x10, 0, 0, 0, 0, 0]),
            &[],
            4096,
        ));
        assert_eq!(r.status, Status::INVALID_FIELD.with_dnr());
    }

    #[test]
    fn features_queues_kato_and_aen() {
        let sub = subsystem_with_ns();
        let c = Arc::new(ctrl(sub.clone()));
        sub.attach_controller(&c);
        enable(&c);
        // Number of queues: 16 asked, 8 granted.
        let (r, _) = cqe(c.execute_admin(
            &admin(
                AdminOpcode::SetFeatures,
                3,
                0,
                [7, 15 | (15 << 16), 0, 0, 0, 0],
            ),
            &[],
            0,
        ));
        assert_eq!(r.dw0, 7 | (7 << 16));
        assert!(c.attach_io_queue(8).is_ok());
        assert!(c.attach_io_queue(8).is_err(), "duplicate qid");
        assert!(c.attach_io_queue(9).is_err(), "beyond granted");
        // Saveable refused.
        let (r, _) = cqe(c.execute_admin(
            &admin(AdminOpcode::SetFeatures, 3, 0, [0x8000_000b, 0, 0, 0, 0, 0]),
            &[],
            0,
        ));
        assert_eq!(r.status, Status::FEATURE_NOT_SAVEABLE.with_dnr());
        // KATO rounds up to seconds.
        let (r, _) = cqe(c.execute_admin(
            &admin(AdminOpcode::SetFeatures, 3, 0, [0x0f, 1500, 0, 0, 0, 0]),
            &[],
            0,
        ));
        assert_eq!(r.dw0, 2000);
        assert_eq!(c.kato(), Duration::from_secs(2));
        // AEN: enable namespace notices, hold an AER, change a namespace.
        cqe(c.execute_admin(
            &admin(AdminOpcode::SetFeatures, 3, 0, [0x0b, 1 << 8, 0, 0, 0, 0]),
            &[],
            0,
        ));
        assert_eq!(
            c.execute_admin(&admin(AdminOpcode::AsyncEventRequest, 9, 0, [0; 6]), &[], 0),
            AdminOutcome::Held
        );
        struct Noop;
        impl std::task::Wake for Noop {
            fn wake(self: Arc<Self>) {}
        }
        let waker = Waker::from(Arc::new(Noop));
        let mut cx = Context::from_waker(&waker);
        assert!(c.poll_event(&mut cx).is_pending());
        sub.remove_namespace(1).expect("remove");
        match c.poll_event(&mut cx) {
            Poll::Ready(Some((cid, AerEnd::Event(dw0)))) => {
                assert_eq!(cid, CommandId(9));
                assert_eq!(dw0, 2 | (4 << 16));
            }
            other => panic!("{other:?}"),
        }
        // Changed namespace list names NSID 1 and reading it clears it.
        let mut glp = admin(AdminOpcode::GetLogPage, 4, 0xffff_ffff, [0; 6]);
        GetLogPage {
            cid: CommandId(4),
            nsid: Nsid::BROADCAST,
            lid: 4,
            lsp: 0,
            rae: false,
            numd: 1024,
            offset: 0,
            lsi: 0,
        }
        .fill_sqe(&mut glp);
        let (_, d) = cqe(c.execute_admin(&glp, &[], 4096));
        assert_eq!(&d.expect("log")[0..8], &[1, 0, 0, 0, 0, 0, 0, 0]);
        let (_, d) = cqe(c.execute_admin(&glp, &[], 4096));
        assert!(d.expect("log").iter().all(|&b| b == 0));
        // AER limit.
        for i in 0..MAX_AERS as u16 {
            assert_eq!(
                c.execute_admin(
                    &admin(AdminOpcode::AsyncEventRequest, 20 + i, 0, [0; 6]),
                    &[],
                    0
                ),
                AdminOutcome::Held
            );
        }
        let (r, _) = cqe(c.execute_admin(
            &admin(AdminOpcode::AsyncEventRequest, 30, 0, [0; 6]),
            &[],
            0,
        ));
        assert_eq!(r.status, Status::ASYNC_EVENT_LIMIT_EXCEEDED.with_dnr());
        // Abort of an I/O command answers "not aborted"; of a held AER, it
        // takes the AER back, which then completes as aborted.
        let (r, _) = cqe(c.execute_admin(
            &admin(AdminOpcode::Abort, 5, 0, [9 << 16 | 1, 0, 0, 0, 0, 0]),
            &[],
            0,
        ));
        assert_eq!((r.status, r.dw0), (Status::SUCCESS, 1));
        let (r, _) = cqe(c.execute_admin(
            &admin(AdminOpcode::Abort, 5, 0, [21 << 16, 0, 0, 0, 0, 0]),
            &[],
            0,
        ));
        assert_eq!((r.status, r.dw0), (Status::SUCCESS, 0), "AER 21 aborted");
        assert_eq!(
            c.poll_event(&mut cx),
            Poll::Ready(Some((CommandId(21), AerEnd::Aborted)))
        );
        let (r, _) = cqe(c.execute_admin(
            &admin(AdminOpcode::Abort, 5, 0, [21 << 16, 0, 0, 0, 0, 0]),
            &[],
            0,
        ));
        assert_eq!(r.dw0, 1, "an AER is aborted once");
        assert!(c.poll_event(&mut cx).is_pending());
        let mut bad = admin(AdminOpcode::Abort, 6, 0, [0; 6]);
        bad.opcode = 0x55;
        let (r, _) = cqe(c.execute_admin(&bad, &[], 0));
        assert_eq!(r.status, Status::INVALID_OPCODE.with_dnr());
        // Teardown ends event polling.
        c.teardown("test");
        assert_eq!(c.poll_event(&mut cx), Poll::Ready(None));
        let _ = OPC_FABRICS;
    }

    #[test]
    fn discovery_controller_serves_the_discovery_log() {
        let d = Arc::new(Subsystem::discovery().expect("disc"));
        let c = Controller::new(
            2,
            d,
            "nqn.host".into(),
            [0; 16],
            0,
            limits(),
            Box::new(|_| {
                let nqn = crate::nvmf::spec::Nqn::new("nqn.2026-11.io.t:a").expect("nqn");
                (3, vec![DiscoveryEntry::tcp_ipv4(nqn, "127.0.0.1", 4420, 1)])
            }),
        );
        cqe(c.execute_admin(&prop_set(1, 0x14, 1), &[], 0));
        let (_, d) = cqe(c.execute_admin(
            &admin(AdminOpcode::Identify, 2, 0, [1, 0, 0, 0, 0, 0]),
            &[],
            4096,
        ));
        assert_eq!(d.expect("id")[111], ControllerType::Discovery as u8);
        let mut glp = admin(AdminOpcode::GetLogPage, 4, 0, [0; 6]);
        GetLogPage {
            cid: CommandId(4),
            nsid: Nsid(0),
            lid: 0x70,
            lsp: 0,
            rae: false,
            numd: 512,
            offset: 1024,
            lsi: 0,
        }
        .fill_sqe(&mut glp);
        let (r, d) = cqe(c.execute_admin(&glp, &[], 2048));
        assert!(r.status.is_success());
        let d = d.expect("entry");
        assert_eq!(d.len(), 2048);
        assert_eq!(d[0], 3, "TRTYPE tcp");
        let mut glp = admin(AdminOpcode::GetLogPage, 4, 0, [0; 6]);
        GetLogPage {
            cid: CommandId(4),
            nsid: Nsid(0),
            lid: 0x02,
            lsp: 0,
            rae: false,
            numd: 128,
            offset: 0,
            lsi: 0,
        }
        .fill_sqe(&mut glp);
        let (r, _) = cqe(c.execute_admin(&glp, &[], 512));
        assert_eq!(r.status, Status::INVALID_LOG_PAGE.with_dnr());
        // Discovery log change notices: enabled, one per read of the log.
        cqe(c.execute_admin(
            &admin(AdminOpcode::SetFeatures, 3, 0, [0x0b, 1 << 31, 0, 0, 0, 0]),
            &[],
            0,
        ));
        assert_eq!(
            c.execute_admin(&admin(AdminOpcode::AsyncEventRequest, 9, 0, [0; 6]), &[], 0),
            AdminOutcome::Held
        );
        c.discovery_log_changed();
        c.discovery_log_changed();
        struct Noop;
        impl std::task::Wake for Noop {
            fn wake(self: Arc<Self>) {}
        }
        let waker = Waker::from(Arc::new(Noop));
        let mut cx = Context::from_waker(&waker);
        assert_eq!(
            c.poll_event(&mut cx),
            Poll::Ready(Some((
                CommandId(9),
                AerEnd::Event(2 | (0xf0 << 8) | (0x70 << 16))
            )))
        );
        assert_eq!(
            c.execute_admin(
                &admin(AdminOpcode::AsyncEventRequest, 10, 0, [0; 6]),
                &[],
                0
            ),
            AdminOutcome::Held
        );
        assert!(
            c.poll_event(&mut cx).is_pending(),
            "masked until the log is read"
        );
    }
}
