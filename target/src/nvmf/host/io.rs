//! I/O queues: NVM commands (Read, Write, Flush, Write Zeroes, Dataset
//! Management deallocate) on one queue pair of a connected controller.
//!
//! An [`IoQueue`] is opened on the reactor that will use it and stays there
//! (its socket and receive loop are that reactor's), while the controller it
//! belongs to may live on another: opening needs only the shared
//! [`ControllerInfo`]. Share a queue between tasks of its reactor with an
//! `Rc`; every method takes `&self` and up to `depth` commands run at once.
//!
//! Buffers are the reactor's pool chunks, as everywhere in mirrorpoint: a
//! read lands in the caller's `IoBufMut` (returned with the result), a write
//! goes out from the caller's `IoBuf` without a copy.

use super::controller::{fabrics_connect, ControllerInfo};
use super::error::HostError;
use super::parse::NamespaceData;
use super::queue::{Data, Queue, QueueParams, QueueStats};
use crate::nvmf::spec::{
    CntlId, CommandId, ConnectData, DataSgl, DsmRange, Nsid, NvmOpcode, RwCommand, Sqe,
    DSM_RANGE_LEN,
};
use crate::units::Lba;
use mirrorpoint_poller::{buffer_pool, sleep, IoBuf, IoBufMut};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

/// Most blocks one Read/Write/Write Zeroes addresses (NLB is 16 bits, 0's based).
pub const MAX_BLOCKS: u32 = 65536;

/// An I/O queue pair on the current reactor.
pub struct IoQueue {
    q: Queue,
    info: Arc<ControllerInfo>,
    namespaces: BTreeMap<u32, NamespaceData>,
    max_transfer: u64,
    in_capsule_writes: bool,
}

impl std::fmt::Debug for IoQueue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IoQueue")
            .field("qid", &self.q.qid())
            .field("depth", &self.q.depth())
            .field("cntlid", &self.info.cntlid)
            .finish()
    }
}

fn nvm_sqe(op: NvmOpcode, nsid: u32) -> Sqe {
    Sqe::new(
        op.as_u8(),
        CommandId(0),
        Nsid(nsid),
        DataSgl::Transport { len: 0 },
    )
}

impl IoQueue {
    /// Opens I/O queue `qid` (1..=granted queues) of the controller on the
    /// current reactor, with up to `depth` commands in flight (the SQ gets
    /// `depth + 1` entries, so `depth` must not exceed CAP.MQES).
    pub async fn connect(
        ctrl: &Arc<ControllerInfo>,
        qid: u16,
        depth: u16,
    ) -> Result<IoQueue, HostError> {
        if ctrl.is_discovery() {
            return Err(HostError::InvalidRequest(
                "a discovery controller has no I/O queues".into(),
            ));
        }
        if qid == 0 || qid > ctrl.io_queues {
            return Err(HostError::InvalidRequest(format!(
                "qid {qid} outside the {} I/O queues granted",
                ctrl.io_queues
            )));
        }
        if depth == 0 || depth > ctrl.cap.mqes {
            return Err(HostError::InvalidRequest(format!(
                "depth {depth} must be 1..={} (CAP.MQES)",
                ctrl.cap.mqes
            )));
        }
        let o = &ctrl.options;
        let q = Queue::connect(
            ctrl.addr,
            QueueParams {
                qid,
                depth,
                hdgst: o.header_digest,
                ddgst: o.data_digest,
                hpda: o.hpda,
                connect_timeout: o.connect_timeout,
                command_timeout: o.command_timeout,
            },
        )
        .await?;
        fabrics_connect(
            &q,
            qid,
            depth,
            0,
            if o.disable_sq_flow_control { 1 << 2 } else { 0 },
            ConnectData {
                hostid: ctrl.hostid,
                cntlid: CntlId(ctrl.cntlid),
                subnqn: ctrl.subnqn.clone(),
                hostnqn: ctrl.hostnqn.clone(),
            },
        )
        .await?;
        q.set_in_capsule_max(ctrl.identify.in_capsule_data());
        Ok(IoQueue {
            q,
            namespaces: ctrl.namespaces(),
            // A transfer lives in one pool chunk; MDTS may lower that.
            max_transfer: {
                let chunk = buffer_pool().chunk_size() as u64;
                ctrl.identify.max_transfer().map_or(chunk, |m| m.min(chunk))
            },
            in_capsule_writes: o.in_capsule_writes,
            info: ctrl.clone(),
        })
    }

    /// Queue ID.
    pub fn qid(&self) -> u16 {
        self.q.qid()
    }

    /// Commands in flight at most.
    pub fn depth(&self) -> u16 {
        self.q.depth()
    }

    /// The controller.
    pub fn controller(&self) -> &Arc<ControllerInfo> {
        &self.info
    }

    /// `Some(cause)` once the queue is dead.
    pub fn error(&self) -> Option<HostError> {
        self.q.dead()
    }

    /// In-capsule data the controller accepts on this queue (IOCCSZ); writes
    /// use it unless `ConnectOptions::in_capsule_writes` is off.
    pub fn in_capsule_limit(&self) -> u32 {
        self.q.in_capsule_max()
    }

    /// MAXH2CDATA this queue's connection negotiated.
    pub fn max_h2c_data(&self) -> u32 {
        self.q.maxh2cdata()
    }

    /// The negotiated digests (header, data).
    pub fn digests(&self) -> (bool, bool) {
        let c = self.q.codec();
        (c.hdgst, c.ddgst)
    }

    /// What this queue has sent and received so far.
    pub fn stats(&self) -> QueueStats {
        self.q.stats()
    }

    /// Closes the connection; commands in flight fail with [`HostError::Closed`].
    pub fn close(&self) {
        self.q.kill(HostError::Closed);
    }

    /// Largest transfer of one command: MDTS, capped by the pool chunk.
    pub fn max_transfer(&self) -> u64 {
        self.max_transfer
    }

    /// A namespace as known when the queue was opened.
    pub fn namespace(&self, nsid: u32) -> Option<&NamespaceData> {
        self.namespaces.get(&nsid)
    }

    /// Bytes of `blocks` blocks of `nsid`, checked against NLB and MDTS.
    fn transfer_len(&self, nsid: u32, blocks: u32) -> Result<u32, HostError> {
        let ns = self
            .namespaces
            .get(&nsid)
            .ok_or_else(|| HostError::InvalidRequest(format!("no active namespace {nsid}")))?;
        if blocks == 0 || blocks > MAX_BLOCKS {
            return Err(HostError::InvalidRequest(format!(
                "{blocks} blocks (must be 1..={MAX_BLOCKS})"
            )));
        }
        let len = u64::from(blocks) * u64::from(ns.block_size.bytes());
        if len > self.max_transfer {
            return Err(HostError::InvalidRequest(format!(
                "{len}-byte transfer above the {}-byte limit",
                self.max_transfer
            )));
        }
        u32::try_from(len).map_err(|_| HostError::InvalidRequest("transfer too large".into()))
    }

    fn block_size(&self, nsid: u32) -> Result<u32, HostError> {
        self.namespaces
            .get(&nsid)
            .map(|n| n.block_size.bytes())
            .ok_or_else(|| HostError::InvalidRequest(format!("no active namespace {nsid}")))
    }

    /// Reads `blocks` blocks at `lba` into the first bytes of `buf` (which
    /// must hold them); the data is received straight into `buf`.
    pub async fn read(
        &self,
        nsid: u32,
        lba: u64,
        blocks: u32,
        buf: IoBufMut,
    ) -> (Result<(), HostError>, IoBufMut) {
        let len = match self.transfer_len(nsid, blocks) {
            Ok(l) => l,
            Err(e) => return (Err(e), buf),
        };
        let mut sqe = nvm_sqe(NvmOpcode::Read, nsid);
        RwCommand {
            slba: Lba(lba),
            nlb: blocks,
            fua: false,
            deac: false,
        }
        .fill_sqe(&mut sqe);
        let (r, b) = self.q.execute(sqe, Data::In(buf, len)).await;
        let r = r.map(drop);
        match b {
            Some(b) => (r, b),
            // Unreachable: a read's buffer always comes back with its result.
            // Rather than panic, hand back an empty chunk.
            None => (r.and(Err(HostError::NoBuffer)), any_chunk().await),
        }
    }

    /// Writes all of `data` (a whole number of blocks) at `lba`: in the
    /// capsule when it fits the controller's in-capsule size, else in H2CData
    /// PDUs answering the controller's R2Ts.
    pub async fn write(&self, nsid: u32, lba: u64, data: IoBuf) -> Result<(), HostError> {
        let bs = self.block_size(nsid)?;
        if data.is_empty() || data.len() % bs as usize != 0 {
            return Err(HostError::InvalidRequest(format!(
                "{} bytes is not a whole number of {bs}-byte blocks",
                data.len()
            )));
        }
        let blocks = u32::try_from(data.len() / bs as usize)
            .map_err(|_| HostError::InvalidRequest("too many blocks".into()))?;
        self.transfer_len(nsid, blocks)?;
        let mut sqe = nvm_sqe(NvmOpcode::Write, nsid);
        RwCommand {
            slba: Lba(lba),
            nlb: blocks,
            fua: false,
            deac: false,
        }
        .fill_sqe(&mut sqe);
        let d = Data::Out(data, self.in_capsule_writes);
        self.q.execute(sqe, d).await.0.map(drop)
    }

    /// Runs a raw NVM command without data (opcode, NSID and CDWs as given;
    /// CID and SGL are filled in): for tests and tools.
    pub async fn raw_command(&self, sqe: Sqe) -> Result<crate::nvmf::spec::Cqe, HostError> {
        self.q.execute(sqe, Data::None).await.0
    }

    /// Flush (volatile write cache to media).
    pub async fn flush(&self, nsid: u32) -> Result<(), HostError> {
        let sqe = nvm_sqe(NvmOpcode::Flush, nsid);
        self.q.execute(sqe, Data::None).await.0.map(drop)
    }

    /// Write Zeroes over `blocks` blocks at `lba`; `deallocate` sets DEAC.
    pub async fn write_zeroes(
        &self,
        nsid: u32,
        lba: u64,
        blocks: u32,
        deallocate: bool,
    ) -> Result<(), HostError> {
        self.block_size(nsid)?;
        if blocks == 0 || blocks > MAX_BLOCKS {
            return Err(HostError::InvalidRequest(format!(
                "{blocks} blocks (must be 1..={MAX_BLOCKS})"
            )));
        }
        let mut sqe = nvm_sqe(NvmOpcode::WriteZeroes, nsid);
        RwCommand {
            slba: Lba(lba),
            nlb: blocks,
            fua: false,
            deac: deallocate,
        }
        .fill_sqe(&mut sqe);
        self.q.execute(sqe, Data::None).await.0.map(drop)
    }

    /// Dataset Management with the Deallocate attribute over `ranges`
    /// (`(lba, blocks)`, 1 to 256 of them).
    pub async fn deallocate(&self, nsid: u32, ranges: &[(u64, u32)]) -> Result<(), HostError> {
        self.block_size(nsid)?;
        if ranges.is_empty() || ranges.len() > 256 {
            return Err(HostError::InvalidRequest(format!(
                "{} ranges (must be 1..=256)",
                ranges.len()
            )));
        }
        let len = ranges.len() * DSM_RANGE_LEN;
        let mut buf = buffer_pool().alloc(len).ok_or(HostError::NoBuffer)?;
        for (slot, &(lba, nlb)) in buf.chunks_exact_mut(DSM_RANGE_LEN).zip(ranges) {
            let r = DsmRange {
                attributes: 0,
                nlb,
                slba: Lba(lba),
            };
            slot.copy_from_slice(&r.encode());
        }
        let mut sqe = nvm_sqe(NvmOpcode::DatasetManagement, nsid);
        sqe.cdw[0] = (ranges.len() - 1) as u32;
        sqe.cdw[1] = 1 << 2;
        // Range lists always go in the capsule when they fit (as Linux sends
        // them), whatever `in_capsule_writes` says.
        self.q
            .execute(sqe, Data::Out(buf.freeze(), true))
            .await
            .0
            .map(drop)
    }
}

/// Waits for any free pool chunk (only on a path that cannot happen).
async fn any_chunk() -> IoBufMut {
    loop {
        if let Some(b) = buffer_pool().alloc(0) {
            return b;
        }
        sleep(Duration::from_millis(1)).await;
    }
}
