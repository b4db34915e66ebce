//! The controller as the host sees it: the admin queue and the connect
//! sequence, Identify, features, log pages, discovery and keep-alive.
//!
//! Shape, and why:
//! * [`Controller`] owns the admin queue and lives on the reactor that
//!   connected it (its queue is `!Send`). What other reactors need to open
//!   I/O queues — address, NQNs, host ID, CNTLID, CAP, Identify data, the
//!   namespaces and the options — is an immutable-after-connect
//!   [`ControllerInfo`] behind an `Arc`, so `IoQueue::connect` can run on any
//!   reactor, exactly like an SPDK qpair on its own poll group.
//! * The connect sequence is the one Linux nvme-tcp follows (ICReq/ICResp,
//!   Connect QID 0, Property Get CAP/VS, Property Set CC.EN=1, wait for
//!   CSTS.RDY, Identify Controller, Set Features Number of Queues), so a
//!   target that works with the kernel initiator works with this one.
//! * Keep Alive runs as a task that only holds a weak reference to the admin
//!   queue and is cancelled when the controller is dropped.

use super::error::HostError;
use super::parse::{self, ControllerData, DiscoveryLog, NamespaceData};
use super::queue::{Data, Queue, QueueParams};
use crate::nvmf::log_page::{lid, GetLogPage, DISCOVERY_RECORD_LEN};
use crate::nvmf::spec::{
    fid, AdminOpcode, Cap, CntlId, CommandId, ConnectCommand, ConnectData, Cqe, Csts, DataSgl, Nqn,
    Nsid, Property, PropertyCommand, QueueId, Shutdown, Sqe, CONNECT_DATA_LEN, DISCOVERY_NQN,
};
use mirrorpoint_poller::{buffer_pool, sleep, spawn, Task};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How a controller (and its I/O queues) connect.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectOptions {
    /// Ask for header digests (CRC32C) on every queue.
    pub header_digest: bool,
    /// Ask for data digests on every queue.
    pub data_digest: bool,
    /// Host identifier; derived from the host NQN when `None`.
    pub hostid: Option<[u8; 16]>,
    /// Keep Alive Timeout sent in Connect; Keep Alive commands go out every
    /// half of it. Zero disables keep-alive.
    pub keep_alive: Duration,
    /// How often Keep Alive is sent; half of `keep_alive` when `None`.
    pub keep_alive_interval: Option<Duration>,
    /// Admin commands in flight at most (the admin SQ has one more entry).
    pub admin_depth: u16,
    /// I/O queues to ask for with Set Features (Number of Queues).
    pub io_queues: u16,
    /// Host PDU data alignment to ask for (0's based dwords, 0..=31).
    pub hpda: u8,
    /// Send write data in the command capsule when the controller's IOCCSZ
    /// allows; when false every write waits for an R2T.
    pub in_capsule_writes: bool,
    /// Ask I/O queues to run without SQ flow control (Connect CATTR bit 2);
    /// a controller may then end reads with a SUCCESS-flagged C2HData
    /// instead of a CapsuleResp. Linux never asks; off by default.
    pub disable_sq_flow_control: bool,
    /// Limit for TCP connect and the ICReq/ICResp exchange.
    pub connect_timeout: Duration,
    /// Limit for one command; a command that exceeds it kills its queue.
    pub command_timeout: Duration,
}

impl Default for ConnectOptions {
    fn default() -> Self {
        ConnectOptions {
            header_digest: false,
            data_digest: false,
            hostid: None,
            keep_alive: Duration::from_secs(10),
            keep_alive_interval: None,
            admin_depth: 31,
            io_queues: 4,
            hpda: 0,
            in_capsule_writes: true,
            disable_sq_flow_control: false,
            connect_timeout: Duration::from_secs(10),
            command_timeout: Duration::from_secs(30),
        }
    }
}

/// A host ID (UUID version 4 layout) derived from the host NQN, so the same
/// host NQN always presents the same host ID.
pub fn host_id_for(hostnqn: &str) -> [u8; 16] {
    let h = Sha256::digest(hostnqn.as_bytes());
    let mut id = [0u8; 16];
    id.copy_from_slice(&h[..16]);
    id[6] = (id[6] & 0x0f) | 0x40;
    id[8] = (id[8] & 0x3f) | 0x80;
    id
}

/// What a connected controller is; shared with every reactor that opens I/O
/// queues on it.
#[derive(Debug)]
pub struct ControllerInfo {
    /// Where the controller was reached.
    pub addr: SocketAddr,
    /// Subsystem NQN.
    pub subnqn: Nqn,
    /// Host NQN.
    pub hostnqn: Nqn,
    /// Host identifier.
    pub hostid: [u8; 16],
    /// Controller ID from the Connect response.
    pub cntlid: u16,
    /// Controller capabilities.
    pub cap: Cap,
    /// Version register.
    pub vs: u32,
    /// Identify Controller.
    pub identify: ControllerData,
    /// I/O queues the controller granted (0 for discovery controllers).
    pub io_queues: u16,
    /// The options the controller was connected with.
    pub options: ConnectOptions,
    namespaces: Mutex<BTreeMap<u32, NamespaceData>>,
}

impl ControllerInfo {
    /// Whether this is a discovery controller.
    pub fn is_discovery(&self) -> bool {
        self.subnqn.as_str() == DISCOVERY_NQN
    }

    /// The namespaces found at connect (or the last refresh), by NSID.
    pub fn namespaces(&self) -> BTreeMap<u32, NamespaceData> {
        self.namespaces
            .lock()
            .map(|m| m.clone())
            .unwrap_or_default()
    }

    /// One namespace.
    pub fn namespace(&self, nsid: u32) -> Option<NamespaceData> {
        self.namespaces.lock().ok()?.get(&nsid).copied()
    }
}

/// A connected controller: its admin queue on the current reactor.
pub struct Controller {
    admin: Queue,
    info: Arc<ControllerInfo>,
    _keep_alive: Option<Task<()>>,
}

impl std::fmt::Debug for Controller {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Controller")
            .field("addr", &self.info.addr)
            .field("subnqn", &self.info.subnqn)
            .field("cntlid", &self.info.cntlid)
            .finish()
    }
}

fn nqn(s: &str, what: &str) -> Result<Nqn, HostError> {
    Nqn::new(s).map_err(|e| HostError::InvalidRequest(format!("{what} '{s}': {e}")))
}

pub(crate) fn admin_sqe(opcode: AdminOpcode, nsid: u32) -> Sqe {
    Sqe::new(
        opcode.as_u8(),
        CommandId(0),
        Nsid(nsid),
        DataSgl::Transport { len: 0 },
    )
}

/// Sends a Fabrics Connect on `q`; returns the completion.
pub(crate) async fn fabrics_connect(
    q: &Queue,
    qid: u16,
    sqsize: u16,
    kato: u32,
    cattr: u8,
    data: ConnectData,
) -> Result<Cqe, HostError> {
    let sqe = ConnectCommand {
        cid: CommandId(0),
        recfmt: 0,
        qid: QueueId(qid),
        sqsize,
        cattr,
        kato,
        sgl: DataSgl::InCapsule {
            offset: 0,
            len: CONNECT_DATA_LEN as u32,
        },
    }
    .to_sqe();
    let cqe = q
        .execute(sqe, Data::OutInline(data.encode().to_vec()))
        .await
        .0?;
    let authreq = cqe.dw0 >> 16;
    if authreq != 0 {
        return Err(HostError::Negotiation(format!(
            "controller requires in-band authentication (AUTHREQ {authreq:#x})"
        )));
    }
    Ok(cqe)
}

impl Controller {
    /// Connects to `subnqn` at `addr` as `hostnqn` on the current reactor and
    /// brings the controller up (see the module notes for the sequence).
    /// Connecting to [`DISCOVERY_NQN`] gives a discovery controller: no
    /// queues are negotiated and no namespaces scanned.
    pub async fn connect(
        addr: SocketAddr,
        subnqn: &str,
        hostnqn: &str,
        options: ConnectOptions,
    ) -> Result<Controller, HostError> {
        let subnqn = nqn(subnqn, "subsystem NQN")?;
        let hostnqn = nqn(hostnqn, "host NQN")?;
        if options.admin_depth == 0 || options.admin_depth > 4095 {
            return Err(HostError::InvalidRequest(
                "admin_depth must be 1..=4095".into(),
            ));
        }
        let hostid = options
            .hostid
            .unwrap_or_else(|| host_id_for(hostnqn.as_str()));
        let admin = Queue::connect(
            addr,
            QueueParams {
                qid: 0,
                depth: options.admin_depth,
                hdgst: options.header_digest,
                ddgst: options.data_digest,
                hpda: options.hpda,
                connect_timeout: options.connect_timeout,
                command_timeout: options.command_timeout,
            },
        )
        .await?;
        let kato = u32::try_from(options.keep_alive.as_millis()).unwrap_or(u32::MAX);
        let cqe = fabrics_connect(
            &admin,
            0,
            options.admin_depth,
            kato,
            0,
            ConnectData {
                hostid,
                cntlid: CntlId::DYNAMIC,
                subnqn: subnqn.clone(),
                hostnqn: hostnqn.clone(),
            },
        )
        .await?;
        let cntlid = (cqe.dw0 & 0xffff) as u16;
        let cap = Cap::from_u64(property_get(&admin, Property::Cap).await?);
        let vs = property_get(&admin, Property::Vs).await? as u32;
        // CC: EN, NVM command set, 4 KiB pages, 64-byte SQEs, 16-byte CQEs.
        let cc = 1u64 | (6 << 16) | (4 << 20);
        property_set(&admin, Property::Cc, cc).await?;
        let ready_in = Duration::from_millis(500 * u64::from(cap.to.max(2)));
        wait_csts(&admin, ready_in, |c| c.rdy()).await?;
        let identify = ControllerData::decode(&identify(&admin, 0x01, 0).await?);
        let discovery = subnqn.as_str() == DISCOVERY_NQN;
        let mut io_queues = 0;
        if !discovery && options.io_queues > 0 {
            let n = u32::from(options.io_queues - 1);
            let mut sqe = admin_sqe(AdminOpcode::SetFeatures, 0);
            sqe.cdw[0] = u32::from(fid::NUMBER_OF_QUEUES);
            sqe.cdw[1] = n | (n << 16);
            let dw0 = admin.execute(sqe, Data::None).await.0?.dw0;
            let granted = (dw0 & 0xffff).min(dw0 >> 16) + 1;
            io_queues = u16::try_from(granted)
                .unwrap_or(u16::MAX)
                .min(options.io_queues);
        }
        let info = Arc::new(ControllerInfo {
            addr,
            subnqn,
            hostnqn,
            hostid,
            cntlid,
            cap,
            vs,
            identify,
            io_queues,
            options: options.clone(),
            namespaces: Mutex::new(BTreeMap::new()),
        });
        let keep_alive = (kato > 0).then(|| {
            let weak = admin.downgrade();
            let period = options
                .keep_alive_interval
                .unwrap_or(options.keep_alive / 2)
                .max(Duration::from_millis(10));
            spawn(async move {
                loop {
                    sleep(period).await;
                    match weak.execute(admin_sqe(AdminOpcode::KeepAlive, 0)).await {
                        None => return,
                        Some(Ok(_)) => {}
                        Some(Err(e)) => {
                            tracing::debug!("keep alive failed: {e}");
                            return;
                        }
                    }
                }
            })
        });
        let c = Controller {
            admin,
            info,
            _keep_alive: keep_alive,
        };
        if !discovery {
            c.refresh_namespaces().await?;
        }
        Ok(c)
    }

    /// Connects to the discovery subsystem at `addr`.
    pub async fn connect_discovery(
        addr: SocketAddr,
        hostnqn: &str,
        options: ConnectOptions,
    ) -> Result<Controller, HostError> {
        Controller::connect(addr, DISCOVERY_NQN, hostnqn, options).await
    }

    /// What other reactors need to open I/O queues.
    pub fn info(&self) -> &Arc<ControllerInfo> {
        &self.info
    }

    /// Whether the admin queue is still usable; `Some(cause)` if not.
    pub fn error(&self) -> Option<HostError> {
        self.admin.dead()
    }

    /// The admin queue's negotiated digests (header, data).
    pub fn digests(&self) -> (bool, bool) {
        let c = self.admin.codec();
        (c.hdgst, c.ddgst)
    }

    /// Runs a raw admin command without data; returns the completion.
    pub async fn admin_command(&self, sqe: Sqe) -> Result<Cqe, HostError> {
        self.admin.execute(sqe, Data::None).await.0
    }

    /// Identify with `cns` for `nsid`: the 4096-byte image.
    pub async fn identify_raw(&self, cns: u8, nsid: u32) -> Result<Vec<u8>, HostError> {
        identify(&self.admin, cns, nsid).await
    }

    /// Identify Controller, fresh.
    pub async fn identify_controller(&self) -> Result<ControllerData, HostError> {
        Ok(ControllerData::decode(
            &identify(&self.admin, 0x01, 0).await?,
        ))
    }

    /// Identify Namespace.
    pub async fn identify_namespace(&self, nsid: u32) -> Result<NamespaceData, HostError> {
        let img = identify(&self.admin, 0x00, nsid).await?;
        NamespaceData::decode(&img)
            .map_err(|e| HostError::InvalidRequest(format!("namespace {nsid}: {e}")))
    }

    /// The active namespace IDs (CNS 02h), following the list past 1024.
    pub async fn active_namespaces(&self) -> Result<Vec<u32>, HostError> {
        let mut all = Vec::new();
        let mut after = 0u32;
        loop {
            let ids = parse::ns_list(&identify(&self.admin, 0x02, after).await?);
            let full = ids.len() == 1024;
            match ids.last() {
                Some(&last) if full && last < 0xffff_fffe => after = last,
                _ => {
                    all.extend(ids);
                    return Ok(all);
                }
            }
            all.extend(ids);
        }
    }

    /// Re-reads the active namespaces and their Identify data into
    /// [`ControllerInfo`] (I/O queues opened later see the result).
    pub async fn refresh_namespaces(&self) -> Result<BTreeMap<u32, NamespaceData>, HostError> {
        let mut map = BTreeMap::new();
        for nsid in self.active_namespaces().await? {
            let img = identify(&self.admin, 0x00, nsid).await?;
            match NamespaceData::decode(&img) {
                Ok(d) => {
                    map.insert(nsid, d);
                }
                Err(e) => tracing::debug!(nsid, "namespace skipped: {e}"),
            }
        }
        if let Ok(mut m) = self.info.namespaces.lock() {
            *m = map.clone();
        }
        Ok(map)
    }

    /// Get Log Page: `len` bytes (a multiple of 4) from `offset` of `log_id`.
    pub async fn get_log_page(
        &self,
        log_id: u8,
        nsid: u32,
        offset: u64,
        len: u32,
    ) -> Result<Vec<u8>, HostError> {
        if len == 0 || len % 4 != 0 || offset % 4 != 0 {
            return Err(HostError::InvalidRequest(
                "log page length and offset must be non-zero dword multiples".into(),
            ));
        }
        let mut sqe = admin_sqe(AdminOpcode::GetLogPage, nsid);
        GetLogPage {
            cid: CommandId(0),
            nsid: Nsid(nsid),
            lid: log_id,
            lsp: 0,
            rae: false,
            numd: u64::from(len / 4),
            offset,
            lsi: 0,
        }
        .fill_sqe(&mut sqe);
        read_admin(&self.admin, sqe, len).await
    }

    /// Reads the whole discovery log, re-reading if the generation counter
    /// changed while it was read.
    pub async fn discovery_log(&self) -> Result<DiscoveryLog, HostError> {
        let rec = DISCOVERY_RECORD_LEN as u64;
        let max = buffer_pool().chunk_size() as u64;
        for _ in 0..4 {
            let hdr = self.get_log_page(lid::DISCOVERY, 0, 0, rec as u32).await?;
            let (genctr, numrec) = parse::discovery_header(&hdr);
            let len = numrec
                .saturating_add(1)
                .saturating_mul(rec)
                .min(max / rec * rec);
            let all = self.get_log_page(lid::DISCOVERY, 0, 0, len as u32).await?;
            let log = parse::discovery_log(&all);
            if log.genctr == genctr {
                return Ok(log);
            }
        }
        Err(HostError::Unexpected(
            "discovery log kept changing while it was read".into(),
        ))
    }

    /// Get Features: completion dword 0.
    pub async fn get_features(&self, fid: u8, cdw11: u32) -> Result<u32, HostError> {
        let mut sqe = admin_sqe(AdminOpcode::GetFeatures, 0);
        sqe.cdw[0] = u32::from(fid);
        sqe.cdw[1] = cdw11;
        Ok(self.admin_command(sqe).await?.dw0)
    }

    /// Set Features: completion dword 0.
    pub async fn set_features(&self, fid: u8, cdw11: u32) -> Result<u32, HostError> {
        let mut sqe = admin_sqe(AdminOpcode::SetFeatures, 0);
        sqe.cdw[0] = u32::from(fid);
        sqe.cdw[1] = cdw11;
        Ok(self.admin_command(sqe).await?.dw0)
    }

    /// Sends one Keep Alive now.
    pub async fn keep_alive(&self) -> Result<(), HostError> {
        self.admin_command(admin_sqe(AdminOpcode::KeepAlive, 0))
            .await
            .map(drop)
    }

    /// Property Get.
    pub async fn property_get(&self, p: Property) -> Result<u64, HostError> {
        property_get(&self.admin, p).await
    }

    /// Normal shutdown: CC.SHN = 01b, then waits for CSTS.SHST = complete.
    /// The connection stays open until the controller is dropped.
    pub async fn shutdown(&self) -> Result<(), HostError> {
        let cc = property_get(&self.admin, Property::Cc).await?;
        property_set(&self.admin, Property::Cc, (cc & !(3 << 14)) | (1 << 14)).await?;
        wait_csts(&self.admin, Duration::from_secs(10), |c| {
            c.shst() == Shutdown::Abrupt
        })
        .await
    }
}

async fn property_get(q: &Queue, p: Property) -> Result<u64, HostError> {
    let sqe = PropertyCommand {
        cid: CommandId(0),
        size8: p.is_8_bytes(),
        offset: p.offset(),
        value: None,
    }
    .to_sqe();
    let cqe = q.execute(sqe, Data::None).await.0?;
    Ok(u64::from(cqe.dw0) | (u64::from(cqe.dw1) << 32))
}

async fn property_set(q: &Queue, p: Property, value: u64) -> Result<(), HostError> {
    let sqe = PropertyCommand {
        cid: CommandId(0),
        size8: p.is_8_bytes(),
        offset: p.offset(),
        value: Some(value),
    }
    .to_sqe();
    q.execute(sqe, Data::None).await.0.map(drop)
}

/// Polls CSTS until `done` (or CFS, or the time runs out).
async fn wait_csts(
    q: &Queue,
    limit: Duration,
    done: impl Fn(Csts) -> bool,
) -> Result<(), HostError> {
    let deadline = Instant::now() + limit;
    loop {
        let csts = Csts(property_get(q, Property::Csts).await? as u32);
        if csts.cfs() {
            return Err(HostError::NotReady(
                "controller fatal status (CSTS.CFS)".into(),
            ));
        }
        if done(csts) {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(HostError::NotReady(format!(
                "CSTS {:#x} after {} ms",
                csts.0,
                limit.as_millis()
            )));
        }
        sleep(Duration::from_millis(10)).await;
    }
}

/// An admin command reading `len` bytes into a pool buffer, copied out.
async fn read_admin(q: &Queue, sqe: Sqe, len: u32) -> Result<Vec<u8>, HostError> {
    let buf = buffer_pool()
        .alloc(len as usize)
        .ok_or(HostError::NoBuffer)?;
    let (r, buf) = q.execute(sqe, Data::In(buf, len)).await;
    r?;
    Ok(buf.map(|b| b.to_vec()).unwrap_or_default())
}

async fn identify(q: &Queue, cns: u8, nsid: u32) -> Result<Vec<u8>, HostError> {
    let mut sqe = admin_sqe(AdminOpcode::Identify, nsid);
    sqe.cdw[0] = u32::from(cns);
    read_admin(q, sqe, crate::nvmf::identify::IDENTIFY_LEN as u32).await
}
