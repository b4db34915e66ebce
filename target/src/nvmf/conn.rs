//! One NVMe/TCP connection (queue pair) on its reactor: the receive loop,
//! the send task, and command dispatch to the controller or the volume.
//!
//! Shape, and why:
//! * **One reactor for life.** The transport's `Acceptor` hands each
//!   accepted socket to a reactor (round-robin); everything below runs there
//!   as local tasks sharing an `Rc`, so per-connection state needs no lock.
//! * **Few receives, data in place.** PDUs are read in parts
//!   ([`pdu::parts_layout`]): the head from a per-connection staging
//!   vector, the data section into the pool chunk it belongs in (a fresh
//!   chunk for in-capsule data, the command's chunk at DATAO for H2CData),
//!   then the digest. Receives into the staging vector are greedy (several
//!   KiB), so one receive brings many command capsules at QD 32 and the loop
//!   parses them all before receiving again. On an I/O queue that has just
//!   seen in-capsule data, a receive that starts a PDU is *split*
//!   (`RECVMSG`): a capsule head's worth into the staging vector, then a
//!   spare pool chunk of the in-capsule size, then the rest of the staging
//!   vector; when the PDU is a capsule whose data starts right after that
//!   head, its data has landed in the chunk with the head (one receive per
//!   4 KiB write, no copy), else the chunk's bytes are copied back into the
//!   staging vector. When such a receive finds more capsules waiting, the
//!   next ones are *batch* receives (`sock::recv_batch`): one `RECVMSG`
//!   laid out as up to 16 (head, chunk) pairs, so a backlog of same-size
//!   in-capsule writes lands whole and in place, 16 per ring op. It takes
//!   only what has arrived (`MSG_DONTWAIT`; a connection that waits holds
//!   one chunk, not 16), leaves an eighth of the pool to others, and grows
//!   or shrinks its size with what it found; a PDU of another shape in the
//!   middle ends the batch, its bytes copied back to make the staging
//!   vector contiguous. Data that a greedy receive staged is copied into its
//!   chunk, the rest received in place (greedy tails are kept to 4 KiB, and
//!   left off while capsules come in batches). The sans-IO [`QueuePair`]
//!   validates the parts exactly as it would a contiguous PDU. Data
//!   received for a PDU the queue pair then rejects is never written: the
//!   rejection is fatal and the command's chunk dropped.
//! * **Zero-copy, batched send.** PDU heads are encoded straight into the
//!   connection's pending [`SendList`] (no vector per PDU); read data stays
//!   in the chunk the volume filled and is queued by reference. A send task
//!   swaps the pending list with its own (two lists ping-pong, keeping their
//!   capacities) and sends everything queued with one vectored `sendmsg`, so
//!   a batch of completions costs one ring op and, once warm, no allocation.
//! * **Concurrency, no task per command.** The receive loop executes admin
//!   commands inline (they touch only controller state). An I/O command is
//!   started in one of the connection's command slots ([`super::slots`], one
//!   per submission queue entry, sized at Connect) and polled once there and
//!   then: what completes at once is answered from the receive loop, what
//!   must wait (a disk request, a mirror leg) stays in its slot, and one
//!   driver task per connection polls the slots whose wakers fired. So a
//!   queue keeps many commands in flight with no allocation and no task
//!   scheduled per command. When the connection ends, the driver runs on
//!   until every command in a slot has finished (their answers are dropped).
//! * **Failure containment.** A fatal protocol error sends a C2HTermReq with
//!   the right FES/FEI and closes this connection only; losing the admin
//!   connection tears its controller down (and with it the controller's I/O
//!   queues on other cores, via their sockets).

use super::controller::{shutdown_fd, AdminOutcome, AerEnd, Controller};
use super::io::{alloc_wait, execute, NsChannel};
use super::pdu::{self, C2HData, CapsuleResp, CommonHeader, Pdu, PduConfig, PduError, TermReq};
use super::qpair::{Event, QpairConfig, QueuePair};
use super::sock;
use super::spec::{
    CommandId, ConnectCommand, ConnectData, Cqe, DataDirection, DataSgl, FabricsCommandType, Nsid,
    NvmOpcode, RwCommand, Sqe, Status, CONNECT_DATA_LEN,
};
use super::subsystem::NsMap;
use super::target::NvmfTarget;
use crate::slots::{CommandSlots, Slots, Started};
use crate::units::Lba;
use mirrorpoint_poller::{buffer_pool, sleep, spawn, IoBuf, IoBufMut, LocalNotify};
use mirrorpoint_transport::{SendList, TcpStream};
use std::cell::{Cell, OnceCell, RefCell};
use std::collections::HashMap;
use std::future::{poll_fn, Future};
use std::net::{SocketAddr, SocketAddrV4};
use std::os::fd::{AsFd, OwnedFd};
use std::pin::Pin;
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

/// Largest PDU head (everything before the data section): PDO is one byte.
const HEAD_MAX: usize = 256;
/// Staging bytes beyond a head (and beyond the split area): how much one
/// greedy receive may bring (e.g. 56 read capsules).
const STAGE_TAIL: usize = 4096;
/// Largest in-capsule size received split (the staging vector mirrors it).
const SPLIT_MAX: usize = 16 * 1024;
/// Most command capsules one batch receive lays out...
const BATCH_MAX: usize = 16;
/// ...and at most this many bytes of them (so 16 of 4 or 8 KiB, 8 of 16 KiB).
const BATCH_BYTES: usize = 128 * 1024;
/// A batch receive takes chunks only while more than this share (1/8) of
/// the pool stays free for everyone else.
const BATCH_POOL_RESERVE_SHARE: usize = 8;
/// In-capsule data accepted on the admin queue (and before Connect).
const ADMIN_IN_CAPSULE: u32 = 8192;
/// How long a host that overruns its queue size is given to drain it.
const SLOT_WAIT: Duration = Duration::from_secs(5);

enum Role {
    Unbound,
    Admin(Arc<Controller>),
    Io(Arc<Controller>),
}

/// Where a PDU's data section is received.
enum Dest {
    Pool(IoBufMut),
    Scratch(Vec<u8>),
}

impl Dest {
    fn bytes(&self) -> &[u8] {
        match self {
            Dest::Pool(b) => b,
            Dest::Scratch(v) => v,
        }
    }
}

struct PendingWrite {
    sqe: Sqe,
    sgl: DataSgl,
    buf: Option<IoBufMut>,
    digest_ok: bool,
}

struct NsCache {
    generation: u64,
    map: Arc<NsMap>,
    open: HashMap<u32, Rc<NsChannel>>,
}

struct Conn {
    target: Arc<NvmfTarget>,
    stream: TcpStream,
    fd: Arc<OwnedFd>,
    local: SocketAddrV4,
    qp: RefCell<QueuePair>,
    /// PDUs queued for the writer, in send order.
    out: RefCell<SendList>,
    out_wake: LocalNotify,
    closing: Cell<bool>,
    writer_done: LocalNotify,
    slot_free: LocalNotify,
    role: RefCell<Role>,
    qid: Cell<u16>,
    sqhd: Cell<u16>,
    sqsize: Cell<u16>,
    sq_flow_off: Cell<bool>,
    pending: RefCell<HashMap<u16, PendingWrite>>,
    ns: RefCell<Option<NsCache>>,
    /// In-flight I/O commands (I/O queues, set at Connect).
    cmds: OnceCell<Box<dyn CommandSlots<IoJob, IoDone>>>,
    io_in_capsule: u32,
    maxh2cdata: u32,
    c2h_success: bool,
}

/// Serves one accepted connection on the current reactor until it closes.
pub(crate) async fn serve(target: Arc<NvmfTarget>, stream: TcpStream) {
    let local = match stream.local_addr() {
        Ok(SocketAddr::V4(a)) => a,
        Ok(SocketAddr::V6(_)) | Err(_) => {
            tracing::debug!("dropping a connection without an IPv4 local address");
            return;
        }
    };
    // A duplicate descriptor of the same socket: receives of PDU heads use
    // it, and controllers and the target shut the socket down through it
    // from any thread.
    let fd = match stream.as_fd().try_clone_to_owned() {
        Ok(fd) => Arc::new(fd),
        Err(e) => {
            tracing::warn!("dropping connection: {e}");
            return;
        }
    };
    let opts = target.transport();
    let qp = QueuePair::new(QpairConfig {
        allow_hdgst: true,
        allow_ddgst: true,
        cpda: 0,
        maxh2cdata: opts.io_unit_size,
        in_capsule_data: opts.in_capsule_data_size.max(ADMIN_IN_CAPSULE),
        max_transfer: opts.max_io_size,
        max_r2t_per_command: opts.max_r2t_per_command,
    });
    target.register_connection(&fd);
    let conn = Rc::new(Conn {
        target,
        stream,
        fd,
        local,
        maxh2cdata: qp.codec().max_h2c_data,
        qp: RefCell::new(qp),
        out: RefCell::new(SendList::new()),
        out_wake: LocalNotify::default(),
        closing: Cell::new(false),
        writer_done: LocalNotify::default(),
        slot_free: LocalNotify::default(),
        role: RefCell::new(Role::Unbound),
        qid: Cell::new(0),
        sqhd: Cell::new(0),
        sqsize: Cell::new(0),
        sq_flow_off: Cell::new(false),
        pending: RefCell::new(HashMap::new()),
        ns: RefCell::new(None),
        cmds: OnceCell::new(),
        io_in_capsule: opts.in_capsule_data_size,
        c2h_success: opts.c2h_success,
    });
    spawn(writer(conn.clone())).detach();
    run(conn).await;
}

async fn run(conn: Rc<Conn>) {
    if let Err(e) = receive_loop(&conn).await {
        tracing::debug!(local = %conn.local, "connection ends: {e}");
    }
    // Flush what is queued (a TermReq, a Disconnect answer), bounded in time.
    conn.closing.set(true);
    conn.out_wake.notify();
    // The command driver ends once the commands in flight have finished.
    if let Some(cmds) = conn.cmds.get() {
        cmds.wake_driver();
    }
    let guard_fd = conn.fd.clone();
    spawn(async move {
        sleep(Duration::from_secs(2)).await;
        shutdown_fd(&guard_fd);
    })
    .detach();
    conn.writer_done.wait().await;
    shutdown_fd(&conn.fd);
    let role = std::mem::replace(&mut *conn.role.borrow_mut(), Role::Unbound);
    match role {
        Role::Admin(c) => c.teardown("admin queue closed"),
        Role::Io(c) => c.detach_io_queue(conn.qid.get()),
        Role::Unbound => {}
    }
    conn.pending.borrow_mut().clear();
    conn.ns.borrow_mut().take();
}

/// Sends whatever is queued, all of it in one `sendmsg` (more only when the
/// kernel takes it partly), until the connection closes.
async fn writer(conn: Rc<Conn>) {
    let mut list = SendList::new();
    loop {
        std::mem::swap(&mut list, &mut *conn.out.borrow_mut());
        if list.is_empty() {
            if conn.closing.get() {
                break;
            }
            conn.out_wake.wait().await;
            continue;
        }
        let (r, back) = conn.stream.send_list(list).await;
        list = back;
        list.clear();
        if let Err(e) = r {
            tracing::debug!("send failed: {e}");
            conn.closing.set(true);
            conn.out.borrow_mut().clear();
            shutdown_fd(&conn.fd);
            break;
        }
    }
    conn.writer_done.notify();
}

/// The data section of an outgoing PDU.
enum Payload {
    /// Built on the heap (admin replies).
    Heap(Vec<u8>),
    /// A pool chunk (read data), sent without copying.
    Pool(IoBuf),
}

/// Why the receive loop stopped.
#[derive(Debug, thiserror::Error)]
enum Close {
    #[error("socket: {0}")]
    Io(#[from] std::io::Error),
    #[error("protocol error, C2HTermReq sent: {0}")]
    Fatal(PduError),
    #[error("host terminated the connection (FES {0:#x})")]
    HostTerm(u16),
    #[error("disconnect")]
    Disconnect,
    #[error("host exceeded its submission queue size")]
    Overrun,
}

/// An event with its borrows resolved.
enum Owned {
    Connected(pdu::IcResp),
    Command {
        sqe: Sqe,
        sgl: DataSgl,
    },
    CommandError {
        sqe: Sqe,
        status: Status,
    },
    Data {
        cid: CommandId,
        digest_ok: bool,
        complete: bool,
    },
    Terminated(u16),
}

impl Conn {
    fn codec(&self) -> PduConfig {
        *self.qp.borrow().codec()
    }

    /// Queues `p` for the writer: its head encoded straight into the
    /// pending list, then its data (the pool chunk `chunk` when given, else
    /// a copy of `p`'s data), then its data digest. False when it could not
    /// be encoded (nothing is queued then).
    fn enqueue_pdu_with(&self, p: &Pdu<'_>, codec: &PduConfig, chunk: Option<IoBuf>) -> bool {
        if self.closing.get() {
            return true;
        }
        let mut out = self.out.borrow_mut();
        match out.append_with(|v| p.encode_head_into(codec, v)) {
            Ok(tail) => {
                match chunk {
                    Some(c) => out.push_chunk(c),
                    None => out.push_bytes(p.data()),
                }
                if let Some(t) = tail {
                    out.push_bytes(&t);
                }
                drop(out);
                self.out_wake.notify();
                true
            }
            Err(e) => {
                tracing::error!("cannot encode {:?}: {e}", p.pdu_type());
                false
            }
        }
    }

    fn enqueue_pdu(&self, p: &Pdu<'_>) {
        self.enqueue_pdu_with(p, &self.codec(), None);
    }

    fn term_req(&self, e: PduError, head: &[u8]) {
        if let Some(f) = e.fatal() {
            let t = TermReq::new(f, head);
            self.enqueue_pdu(&Pdu::C2HTermReq(t));
        }
    }

    fn advance_sqhd(&self) {
        let size = u32::from(self.sqsize.get()) + 1;
        let next = (u32::from(self.sqhd.get()) + 1) % size.max(1);
        self.sqhd.set(next as u16);
    }

    /// Forgets a finished command, freeing its submission queue slot.
    fn forget(&self, cid: CommandId) {
        let _ = self.qp.borrow_mut().complete(cid);
        self.slot_free.notify();
    }

    /// Commands the host may have outstanding: the queue size once
    /// connected (SQ flow control), the admin minimum before.
    fn command_limit(&self) -> usize {
        match &*self.role.borrow() {
            Role::Unbound => usize::from(super::controller::ADMIN_QUEUE_MIN),
            _ => usize::from(self.sqsize.get()) + 1,
        }
    }

    /// Waits (bounded) until the host is within its queue size again: a host
    /// that overruns it gets backpressure, not unbounded memory.
    async fn wait_for_slot(&self) -> Result<(), Close> {
        if self.qp.borrow().outstanding() < self.command_limit() {
            return Ok(());
        }
        let deadline = Instant::now() + SLOT_WAIT;
        while self.qp.borrow().outstanding() >= self.command_limit() {
            let now = Instant::now();
            if now >= deadline {
                return Err(Close::Overrun);
            }
            let mut wake = std::pin::pin!(self.slot_free.wait());
            let mut timer = std::pin::pin!(sleep(deadline - now));
            poll_fn(|cx| {
                if wake.as_mut().poll(cx).is_ready() || timer.as_mut().poll(cx).is_ready() {
                    Poll::Ready(())
                } else {
                    Poll::Pending
                }
            })
            .await;
        }
        Ok(())
    }

    /// Sends a completion and forgets the command.
    fn respond(&self, mut cqe: Cqe, tracked: bool) {
        cqe.sqhd = self.sqhd.get();
        cqe.sqid = self.qid.get();
        if tracked {
            self.forget(cqe.cid);
        }
        self.enqueue_pdu(&Pdu::CapsuleResp(CapsuleResp { cqe }));
    }

    /// Answers a finished I/O command.
    fn finish(&self, d: IoDone) {
        match d.read {
            Some(buf) => self.respond_with_data(d.cqe, Payload::Pool(buf)),
            None => self.respond(d.cqe, true),
        }
    }

    fn success_flag_allowed(&self) -> bool {
        self.c2h_success && self.sq_flow_off.get() && !self.codec().ddgst
    }

    /// Sends controller-to-host data then the completion (or the data with
    /// SUCCESS when allowed and the status is success).
    fn respond_with_data(&self, cqe: Cqe, data: Payload) {
        let bytes_len = match &data {
            Payload::Heap(v) => v.len(),
            Payload::Pool(b) => b.len(),
        };
        if bytes_len == 0 {
            self.respond(cqe, true);
            return;
        }
        let success =
            cqe.status.is_success() && cqe.dw0 == 0 && cqe.dw1 == 0 && self.success_flag_allowed();
        let codec = self.codec();
        let queued = {
            let (bytes, chunk): (&[u8], Option<IoBuf>) = match &data {
                Payload::Heap(v) => (v, None),
                Payload::Pool(b) => (b, Some(b.clone())),
            };
            let p = Pdu::C2HData(C2HData {
                cid: cqe.cid,
                offset: 0,
                last: true,
                success,
                data: bytes,
            });
            self.enqueue_pdu_with(&p, &codec, chunk)
        };
        drop(data);
        if !queued {
            self.respond(Cqe::new(cqe.cid, Status::INTERNAL_ERROR), true);
            return;
        }
        if success {
            self.forget(cqe.cid);
        } else {
            self.respond(cqe, true);
        }
    }

    /// The namespace on this core, opening its channel on first use and
    /// refreshing the snapshot when the subsystem's generation moved.
    fn namespace(&self, ctrl: &Controller, nsid: u32) -> Option<Rc<NsChannel>> {
        let sub = &ctrl.subsystem;
        let mut cache = self.ns.borrow_mut();
        let stale = cache
            .as_ref()
            .map_or(true, |c| c.generation != sub.ns_generation());
        if stale {
            let (map, generation) = sub.namespaces();
            let mut open = cache.take().map(|c| c.open).unwrap_or_default();
            open.retain(|id, ch| map.get(id).is_some_and(|n| Arc::ptr_eq(n, &ch.ns)));
            *cache = Some(NsCache {
                generation,
                map,
                open,
            });
        }
        let c = cache.as_mut()?;
        if let Some(ch) = c.open.get(&nsid) {
            return Some(ch.clone());
        }
        let ns = c.map.get(&nsid)?.clone();
        let chan = ns.volume.channel();
        let ch = Rc::new(NsChannel { ns, chan });
        c.open.insert(nsid, ch.clone());
        Some(ch)
    }

    fn all_namespaces(&self, ctrl: &Controller) -> Vec<Rc<NsChannel>> {
        let (map, _) = ctrl.subsystem.namespaces();
        map.keys()
            .filter_map(|&n| self.namespace(ctrl, n))
            .collect()
    }

    fn issue_r2ts(&self, cid: CommandId) {
        loop {
            let r = self.qp.borrow_mut().next_r2t(cid, self.maxh2cdata);
            match r {
                Ok(Some(r2t)) => self.enqueue_pdu(&Pdu::R2t(r2t)),
                _ => break,
            }
        }
    }
}

async fn receive_loop(conn: &Rc<Conn>) -> Result<(), Close> {
    // Bytes of the stream from the start of the current PDU: its head, and
    // possibly (after a greedy read) the first bytes of what follows.
    // The split receive's chunk size (0: never split), and the staging
    // layout: [capsule head | mirror of the split chunk | greedy tail].
    let split_len = match conn.io_in_capsule as usize {
        n if n <= SPLIT_MAX => n,
        _ => 0,
    };
    let head_area = pdu::CAPSULE_CMD_HLEN + pdu::DIGEST_LEN;
    // Capsules one batch receive may take (adapted between 1 and the most),
    // the chunks it lends them, and its iovecs.
    let batch_max = match split_len {
        0 => 1,
        n => (BATCH_BYTES / n).clamp(1, BATCH_MAX),
    };
    let mut batch = 1;
    let mut batch_chunks: Vec<IoBufMut> = Vec::with_capacity(batch_max);
    let mut batch_msg = mirrorpoint_transport::BatchRecv::new(batch_max);
    // Receives other than a batch one stop at `greedy_end`: what a greedy
    // receive stages is copied later, so it is kept to STAGE_TAIL bytes
    // past a head and a split chunk's mirror.
    let greedy_end = HEAD_MAX.max(head_area + split_len) + STAGE_TAIL;
    let mut stage = vec![0u8; greedy_end.max(batch_max * (head_area + split_len) + STAGE_TAIL)];
    let mut have = 0usize;
    let mut dg = vec![0u8; 4];
    let mut split_msg = sock::SplitMsg::new();
    // A pool chunk kept for the next split receive.
    let mut spare: Option<IoBufMut> = None;
    // The last command capsule carried in-capsule data.
    let mut recent_icd = false;
    loop {
        let codec = conn.codec();
        // A command capsule head, with its digest when negotiated.
        let greedy = pdu::CAPSULE_CMD_HLEN + if codec.hdgst { pdu::DIGEST_LEN } else { 0 };
        // A split receive's chunk and how many of its bytes arrived: they
        // follow stage[..greedy] in the stream, and the stream continues at
        // stage[greedy + split_len..have].
        let mut split: Option<(IoBufMut, usize)> = None;
        let io_queue = matches!(&*conn.role.borrow(), Role::Io(_));
        if have == 0 && batch > 1 && recent_icd && io_queue && !codec.ddgst {
            batch_chunks.extend(spare.take());
            let reserve = buffer_pool().chunk_count() / BATCH_POOL_RESERVE_SHARE;
            while batch_chunks.len() < batch && buffer_pool().free_chunks() > reserve {
                match buffer_pool().alloc(split_len) {
                    Some(c) => batch_chunks.push(c),
                    None => break,
                }
            }
            if batch_chunks.len() < 2 {
                spare = batch_chunks.pop();
                batch = 1;
            } else {
                let chunks = std::mem::take(&mut batch_chunks);
                // What follows the batch: at most STAGE_TAIL bytes (copied later).
                let tail_end = chunks.len() * (greedy + split_len) + STAGE_TAIL;
                let (r, s, chunks, m) = sock::recv_batch(
                    &conn.fd, stage, greedy, split_len, chunks, tail_end, batch_msg,
                )
                .await;
                (stage, batch_chunks, batch_msg) = (s, chunks, m);
                let n = match r {
                    Ok(n) => n,
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => 0,
                    Err(e) => return Err(e.into()),
                };
                if n == 0 {
                    // Nothing waiting: the split receive below waits, with
                    // one chunk rather than a batch's worth.
                    spare = batch_chunks.pop();
                    batch_chunks.clear();
                } else {
                    let stride = greedy + split_len;
                    let k = batch_chunks.len();
                    // The leading capsules that arrived whole, each in its place.
                    let mut whole = 0;
                    while whole < k
                        && n >= (whole + 1) * stride
                        && capsule_of_shape(&stage[whole * stride..], &codec, greedy, split_len)
                    {
                        whole += 1;
                    }
                    // Twice as many after a full batch, fewer after one the
                    // data ran out in; a PDU of another shape says nothing.
                    if whole == k {
                        batch = (2 * k).min(batch_max);
                    } else if n < (whole + 1) * stride {
                        batch = (whole + 1).max(k / 2);
                    }
                    // (Drained in place: no vector is allocated per batch.)
                    for (i, mut chunk) in batch_chunks.drain(..whole).enumerate() {
                        conn.wait_for_slot().await?;
                        chunk.set_len(split_len);
                        let head = &stage[i * stride..i * stride + greedy];
                        let ev = take_event(conn, head, &chunk, None)?;
                        act(conn, ev, Some(Dest::Pool(chunk)))?;
                    }
                    // What follows: a capsule of the same shape still arriving
                    // keeps its chunk (the split receive's state); anything else
                    // is made contiguous in the staging vector, chunk bytes
                    // copied back into their mirror areas.
                    let at = whole * stride;
                    let after = n - at;
                    let arriving = whole < k
                        && after > greedy
                        && after < stride
                        && capsule_of_shape(&stage[at..], &codec, greedy, split_len);
                    if arriving {
                        stage.copy_within(at..at + greedy, 0);
                        let chunk = batch_chunks.remove(0);
                        split = Some((chunk, after - greedy));
                        have = greedy + (after - greedy);
                    } else {
                        for (j, chunk) in batch_chunks.iter().enumerate() {
                            let from = (whole + j) * stride + greedy;
                            let got = n.saturating_sub(from).min(split_len);
                            stage[from..from + got].copy_from_slice(&chunk[..got]);
                        }
                        stage.copy_within(at..n, 0);
                        have = after;
                    }
                    spare = batch_chunks.pop();
                    batch_chunks.clear();
                    if have == 0 {
                        continue;
                    }
                }
            }
        }
        while have < pdu::CH_LEN {
            if have == 0 && split_len > 0 && recent_icd && io_queue {
                if let Some(chunk) = spare.take().or_else(|| buffer_pool().alloc(split_len)) {
                    let tail = greedy + split_len..greedy_end;
                    let (r, s, c, m) = sock::recv_split(
                        &conn.fd,
                        stage,
                        0..greedy,
                        chunk,
                        0..split_len,
                        tail,
                        split_msg,
                    )
                    .await;
                    (stage, split_msg) = (s, m);
                    let n = r?;
                    if n > greedy + split_len && !codec.ddgst {
                        // More than one capsule was waiting: batch next time.
                        batch = batch.max(2).min(batch_max);
                    }
                    if n <= greedy {
                        have = n;
                        spare = Some(c);
                    } else {
                        let in_chunk = (n - greedy).min(split_len);
                        have = greedy + split_len + (n - greedy - in_chunk);
                        if in_chunk < split_len {
                            // Nothing reached the tail.
                            have = greedy + in_chunk;
                        }
                        split = Some((c, in_chunk));
                    }
                    continue;
                }
            }
            let end = greedy_end;
            let (r, b) = sock::recv_some(&conn.fd, stage, have, end).await;
            stage = b;
            have += r?;
        }
        let ch = CommonHeader::parse(&stage).unwrap_or_default();
        if ch.pdu_type == pdu::PduType::CapsuleCmd as u8 {
            conn.wait_for_slot().await?;
        }
        let parts = match pdu::parts_layout(&ch, &codec) {
            Ok(p) if p.head_len <= HEAD_MAX => p,
            Ok(_) => {
                let e = PduError::InvalidHeaderField {
                    offset: pdu::ch_off::PDO,
                    what: "PDU head too long",
                };
                conn.term_req(e, stage.get(..pdu::CH_LEN).unwrap_or(&[]));
                return Err(Close::Fatal(e));
            }
            Err(e) => {
                conn.term_req(e, stage.get(..pdu::CH_LEN).unwrap_or(&[]));
                return Err(Close::Fatal(e));
            }
        };
        if ch.pdu_type == pdu::PduType::CapsuleCmd as u8 {
            recent_icd = parts.data_len > 0;
        }
        // Resolve a split receive: the capsule's data in the chunk, or the
        // chunk's bytes back into the staging vector.
        let mut in_place: Option<(IoBufMut, usize)> = None;
        if let Some((mut chunk, in_chunk)) = split.take() {
            let tail = have.saturating_sub(greedy + split_len);
            let fits = ch.pdu_type == pdu::PduType::CapsuleCmd as u8
                && parts.head_len == greedy
                && parts.data_len > 0
                && parts.data_len <= split_len;
            if fits {
                // Stream bytes after the data: the chunk's rest, then the tail.
                let extra = in_chunk.saturating_sub(parts.data_len);
                if let (Some(dst), Some(src)) = (
                    stage.get_mut(greedy..greedy + extra),
                    chunk.get(parts.data_len..in_chunk),
                ) {
                    dst.copy_from_slice(src);
                }
                let from = greedy + split_len;
                stage.copy_within(from..from + tail, greedy + extra);
                have = greedy + extra + tail;
                chunk.set_len(parts.data_len);
                in_place = Some((chunk, in_chunk.min(parts.data_len)));
            } else {
                // Contiguous again: the tail already follows the mirror area.
                if let (Some(dst), Some(src)) = (
                    stage.get_mut(greedy..greedy + in_chunk),
                    chunk.get(..in_chunk),
                ) {
                    dst.copy_from_slice(src);
                }
                spare = Some(chunk);
            }
        }
        if have < parts.head_len {
            let (r, b) = sock::recv_exact(&conn.fd, stage, have, parts.head_len).await;
            stage = b;
            r?;
            have = parts.head_len;
        }
        let head = &stage;
        let mut consumed = parts.head_len;
        // Pick where the data section lands.
        let mut h2c_cid: Option<u16> = None;
        let mut dest: Option<(Dest, usize)> = None;
        if parts.data_len > 0 {
            let h2c = ch.pdu_type == pdu::PduType::H2CData as u8;
            // Data bytes already in the destination (split receive).
            let mut pre = 0usize;
            let (d, at) = if let Some((b, n)) = in_place.take() {
                pre = n;
                (Dest::Pool(b), 0)
            } else if h2c {
                let cid = super::wire::u16_at(head, 8);
                let datao = super::wire::u32_at(head, 12) as usize;
                let taken = conn.pending.borrow_mut().get_mut(&cid).and_then(|p| {
                    let fits = p.buf.as_ref().is_some_and(|b| {
                        datao
                            .checked_add(parts.data_len)
                            .is_some_and(|e| e <= b.len())
                    });
                    if fits {
                        p.buf.take()
                    } else {
                        None
                    }
                });
                match taken {
                    Some(b) => {
                        h2c_cid = Some(cid);
                        (Dest::Pool(b), datao)
                    }
                    None => (Dest::Scratch(vec![0u8; parts.data_len]), 0),
                }
            } else {
                match alloc_wait(parts.data_len).await {
                    Some(b) => (Dest::Pool(b), 0),
                    None => (Dest::Scratch(vec![0u8; parts.data_len]), 0),
                }
            };
            // Data bytes already staged by a greedy receive.
            let staged = (have - consumed).min(parts.data_len - pre);
            let src = stage.get(consumed..consumed + staged).unwrap_or(&[]);
            let (from, to) = (at + pre, at + pre + staged);
            let d = match d {
                Dest::Pool(mut b) => {
                    if let Some(dst) = b.get_mut(from..to) {
                        dst.copy_from_slice(src);
                    }
                    Dest::Pool(b)
                }
                Dest::Scratch(mut v) => {
                    if let Some(dst) = v.get_mut(from..to) {
                        dst.copy_from_slice(src);
                    }
                    Dest::Scratch(v)
                }
            };
            consumed += staged;
            let (start, end) = (to, at + parts.data_len);
            let (r, d) = match d {
                Dest::Pool(mut b) if start < end => {
                    let batching = batch > 1 && recent_icd && io_queue && !codec.ddgst;
                    // The rest of the data in place; what follows it (the
                    // next PDUs) into the staging vector, greedily. Every
                    // staged byte was consumed above, so `have == consumed`.
                    let mut start = start;
                    let mut r = Ok(());
                    while start < end {
                        // No tail while capsules come in batches: the next
                        // receive is then a batch one, which needs the
                        // stream to start a PDU. (Empty too when a batch
                        // receive left more staged.)
                        let tail = if batching {
                            have..have
                        } else {
                            have..greedy_end.max(have)
                        };
                        let (got, s, c, m) = sock::recv_split(
                            &conn.fd,
                            stage,
                            have..have,
                            b,
                            start..end,
                            tail,
                            split_msg,
                        )
                        .await;
                        (stage, b, split_msg) = (s, c, m);
                        match got {
                            Ok(n) => {
                                let into_chunk = n.min(end - start);
                                start += into_chunk;
                                have += n - into_chunk;
                            }
                            Err(e) => {
                                r = Err(e);
                                break;
                            }
                        }
                    }
                    (r, Dest::Pool(b))
                }
                Dest::Scratch(v) if start < end => {
                    let (r, v) = sock::recv_exact(&conn.fd, v, start, end).await;
                    (r, Dest::Scratch(v))
                }
                d => (Ok(()), d),
            };
            r?;
            dest = Some((d, at));
        }
        let ddgst = if parts.ddgst {
            let staged = (have - consumed).min(pdu::DIGEST_LEN);
            if let (Some(dst), Some(src)) =
                (dg.get_mut(..staged), stage.get(consumed..consumed + staged))
            {
                dst.copy_from_slice(src);
            }
            consumed += staged;
            if staged < pdu::DIGEST_LEN {
                let (r, d) = sock::recv_exact(&conn.fd, dg, staged, pdu::DIGEST_LEN).await;
                dg = d;
                r?;
            }
            Some(super::wire::u32_at(&dg, 0))
        } else {
            None
        };
        let head_bytes = stage.get(..parts.head_len).unwrap_or(&[]);
        let data: &[u8] = match &dest {
            Some((d, at)) => d.bytes().get(*at..*at + parts.data_len).unwrap_or(&[]),
            None => &[],
        };
        let ev = take_event(conn, head_bytes, data, ddgst)?;
        // Give a borrowed H2C chunk back to its command.
        let mut dest = dest.map(|(d, _)| d);
        if let (Some(cid), Some(Dest::Pool(_))) = (h2c_cid, &dest) {
            if let Some(Dest::Pool(b)) = dest.take() {
                if let Some(p) = conn.pending.borrow_mut().get_mut(&cid) {
                    p.buf = Some(b);
                }
            }
        }
        // Bytes of the next PDU that the greedy read brought: keep them.
        let keep = have.saturating_sub(consumed);
        if keep > 0 && have <= stage.len() {
            stage.copy_within(consumed..have, 0);
        }
        have = keep;
        act(conn, ev, dest)?;
    }
}

/// Whether `head` starts a command capsule of the shape a batch receive lays
/// out: a head of `head_len` bytes, then exactly `data_len` bytes of
/// in-capsule data, no data digest.
fn capsule_of_shape(head: &[u8], codec: &PduConfig, head_len: usize, data_len: usize) -> bool {
    let Some(ch) = CommonHeader::parse(head) else {
        return false;
    };
    ch.pdu_type == pdu::PduType::CapsuleCmd as u8
        && matches!(pdu::parts_layout(&ch, codec),
            Ok(p) if p.head_len == head_len && p.data_len == data_len && !p.ddgst)
}

/// Hands a received PDU (head and data section) to the queue pair's state
/// machine; a protocol error is answered with a C2HTermReq and ends the
/// connection.
fn take_event(
    conn: &Conn,
    head_bytes: &[u8],
    data: &[u8],
    ddgst: Option<u32>,
) -> Result<Owned, Close> {
    let received = conn.qp.borrow_mut().receive_parts(head_bytes, data, ddgst);
    match received {
        Ok(r) => Ok(match r.event {
            Event::Connected { icresp, .. } => Owned::Connected(icresp),
            Event::Command { sqe, sgl, .. } => Owned::Command { sqe, sgl },
            Event::CommandError { sqe, status } => Owned::CommandError { sqe, status },
            Event::Data {
                cid,
                digest_ok,
                complete,
                ..
            } => Owned::Data {
                cid,
                digest_ok,
                complete,
            },
            Event::Terminated { fes, .. } => Owned::Terminated(fes),
        }),
        Err(e) => {
            let echo = head_bytes
                .get(..head_bytes.len().min(pdu::TERM_REQ_MAX_DATA))
                .unwrap_or(&[]);
            conn.term_req(e, echo);
            Err(Close::Fatal(e))
        }
    }
}

/// Acts on what a PDU asked for: answers, starts the command, sends R2Ts.
/// `dest` is the PDU's data section (an H2CData chunk already given back).
fn act(conn: &Rc<Conn>, ev: Owned, dest: Option<Dest>) -> Result<(), Close> {
    match ev {
        Owned::Connected(icresp) => {
            // Digests are not in force yet for the ICResp itself.
            conn.enqueue_pdu_with(&Pdu::IcResp(icresp), &PduConfig::default(), None);
        }
        Owned::CommandError { sqe, status } => {
            conn.advance_sqhd();
            conn.respond(Cqe::new(sqe.cid, status), false);
        }
        Owned::Terminated(fes) => return Err(Close::HostTerm(fes)),
        Owned::Command { sqe, sgl } => {
            conn.advance_sqhd();
            let in_capsule = match dest {
                Some(Dest::Pool(b)) => Some(b),
                Some(Dest::Scratch(_)) => {
                    // No chunk was free for in-capsule data.
                    conn.respond(Cqe::new(sqe.cid, Status::COMMAND_INTERRUPTED), true);
                    return Ok(());
                }
                None => None,
            };
            let r2t = matches!(sgl, DataSgl::Transport { len } if len > 0)
                && sqe.data_direction() == DataDirection::HostToController;
            if r2t {
                // The data chunk: now if the pool has one; otherwise a
                // task waits for one and sends the R2Ts then, so this
                // loop keeps receiving the data of writes that have one.
                let len = sgl.len() as usize;
                let buf = buffer_pool().alloc(len);
                let ready = buf.is_some();
                conn.pending.borrow_mut().insert(
                    sqe.cid.0,
                    PendingWrite {
                        sqe,
                        sgl,
                        buf,
                        digest_ok: true,
                    },
                );
                if ready {
                    conn.issue_r2ts(sqe.cid);
                } else {
                    spawn(wait_for_write_buffer(conn.clone(), sqe.cid, len)).detach();
                }
            } else if dispatch(conn, sqe, sgl, in_capsule)? {
                return Err(Close::Disconnect);
            }
        }
        Owned::Data {
            cid,
            digest_ok,
            complete,
        } => {
            if let Some(p) = conn.pending.borrow_mut().get_mut(&cid.0) {
                p.digest_ok &= digest_ok;
            }
            if complete {
                let p = conn.pending.borrow_mut().remove(&cid.0);
                if let Some(p) = p {
                    match (p.digest_ok, p.buf) {
                        (true, Some(buf)) => {
                            if dispatch(conn, p.sqe, p.sgl, Some(buf))? {
                                return Err(Close::Disconnect);
                            }
                        }
                        _ => conn.respond(Cqe::new(cid, Status::TRANSIENT_TRANSPORT_ERROR), true),
                    }
                }
            } else {
                conn.issue_r2ts(cid);
            }
        }
    }
    Ok(())
}

/// Gives a write that found the pool empty its chunk once one frees up,
/// then asks the host for the data.
async fn wait_for_write_buffer(conn: Rc<Conn>, cid: CommandId, len: usize) {
    let buf = alloc_wait(len).await;
    let got = {
        let mut pending = conn.pending.borrow_mut();
        match (pending.get_mut(&cid.0), buf) {
            (Some(p), Some(b)) => {
                p.buf = Some(b);
                true
            }
            (Some(_), None) => {
                pending.remove(&cid.0);
                false
            }
            // The connection ended meanwhile.
            (None, _) => return,
        }
    };
    if got {
        conn.issue_r2ts(cid);
    } else {
        conn.respond(Cqe::new(cid, Status::COMMAND_INTERRUPTED), true);
    }
}

/// Executes a command whose data (if any) has fully arrived. Returns true
/// when the connection should close after the answer (Disconnect).
fn dispatch(
    conn: &Rc<Conn>,
    sqe: Sqe,
    sgl: DataSgl,
    data: Option<IoBufMut>,
) -> Result<bool, Close> {
    let role = match &*conn.role.borrow() {
        Role::Unbound => None,
        Role::Admin(c) => Some((true, c.clone())),
        Role::Io(c) => Some((false, c.clone())),
    };
    let Some((admin, ctrl)) = role else {
        connect(conn, &sqe, data.as_deref().unwrap_or(&[]));
        return Ok(false);
    };
    if ctrl.is_dead() {
        conn.respond(Cqe::new(sqe.cid, Status::ABORTED_SQ_DELETION), true);
        return Ok(false);
    }
    if admin {
        let bytes: &[u8] = data.as_deref().unwrap_or(&[]);
        match ctrl.execute_admin(&sqe, bytes, sgl.len()) {
            AdminOutcome::Done { cqe, data } => match data {
                Some(d) if !d.is_empty() => conn.respond_with_data(cqe, Payload::Heap(d)),
                _ => conn.respond(cqe, true),
            },
            AdminOutcome::Held => {}
            AdminOutcome::Disconnect(cqe) => {
                conn.respond(cqe, true);
                return Ok(true);
            }
        }
        return Ok(false);
    }
    // I/O queue.
    if sqe.is_fabrics() {
        if sqe.fctype() == FabricsCommandType::Disconnect.as_u8() {
            conn.respond(Cqe::new(sqe.cid, Status::SUCCESS), true);
            return Ok(true);
        }
        conn.respond(Cqe::new(sqe.cid, Status::INVALID_OPCODE.with_dnr()), true);
        return Ok(false);
    }
    if let (Some(d), DataSgl::InCapsule { .. }) = (&data, sgl) {
        if d.len() > conn.io_in_capsule as usize {
            conn.respond(
                Cqe::new(sqe.cid, Status::DATA_SGL_LENGTH_INVALID.with_dnr()),
                true,
            );
            return Ok(false);
        }
    }
    let nsid = sqe.nsid;
    // One namespace (every command but a broadcast Flush) without a vector.
    let (one, all): (Option<Rc<NsChannel>>, Vec<Rc<NsChannel>>) =
        if sqe.opcode == NvmOpcode::Flush.as_u8() && nsid == Nsid::BROADCAST {
            (None, conn.all_namespaces(&ctrl))
        } else {
            match conn.namespace(&ctrl, nsid.0) {
                Some(n) => (Some(n), Vec::new()),
                None => {
                    conn.respond(
                        Cqe::new(sqe.cid, Status::INVALID_NAMESPACE.with_dnr()),
                        true,
                    );
                    return Ok(false);
                }
            }
        };
    let job = IoJob {
        ctrl,
        qid: conn.qid.get(),
        sqe,
        sgl,
        data,
        one,
        all,
    };
    let started = match conn.cmds.get() {
        Some(c) => c.start(job),
        None => Started::Full(job),
    };
    match started {
        Started::Done(d) => conn.finish(d),
        Started::Parked => {}
        // No free slot (or no table): a task of its own, as a last resort.
        Started::Full(job) => spawn_command(conn, job),
    }
    Ok(false)
}

/// An I/O command ready to execute: its namespace(s) and data.
struct IoJob {
    ctrl: Arc<Controller>,
    qid: u16,
    sqe: Sqe,
    sgl: DataSgl,
    data: Option<IoBufMut>,
    /// The namespace (every command but a broadcast Flush)...
    one: Option<Rc<NsChannel>>,
    /// ...or all of them.
    all: Vec<Rc<NsChannel>>,
}

/// A finished I/O command: its completion and read data.
struct IoDone {
    cqe: Cqe,
    read: Option<IoBuf>,
}

/// Executes an I/O command on its namespace(s); the future a command slot
/// holds. It does not touch the connection: the caller answers.
async fn io_command(job: IoJob) -> IoDone {
    let IoJob {
        ctrl,
        qid,
        sqe,
        sgl,
        mut data,
        one,
        all,
    } = job;
    let mut status = Status::SUCCESS;
    let mut read_data = None;
    for ns in one.iter().chain(all.iter()) {
        let out = execute(ns, &sqe, sgl, data.take()).await;
        if !out.status.is_success() {
            status = out.status;
            break;
        }
        read_data = out.data;
    }
    if status.is_success() {
        let n = sgl.len() as u64;
        if sqe.opcode == NvmOpcode::Read.as_u8() {
            ctrl.stats.reads.fetch_add(1, Ordering::Relaxed);
            ctrl.stats.bytes_read.fetch_add(n, Ordering::Relaxed);
        } else if sqe.opcode == NvmOpcode::Write.as_u8() {
            ctrl.stats.writes.fetch_add(1, Ordering::Relaxed);
            ctrl.stats.bytes_written.fetch_add(n, Ordering::Relaxed);
        }
    } else {
        let rw = sqe.opcode == NvmOpcode::Read.as_u8()
            || sqe.opcode == NvmOpcode::Write.as_u8()
            || sqe.opcode == NvmOpcode::WriteZeroes.as_u8();
        let lba = if rw {
            RwCommand::from_sqe(&sqe).slba
        } else {
            Lba(0)
        };
        ctrl.record_error(qid, sqe.cid, status, sqe.nsid, lba);
    }
    IoDone {
        cqe: Cqe::new(sqe.cid, status),
        read: read_data.filter(|_| status.is_success()),
    }
}

/// Runs a command that found no free slot as a task of its own.
fn spawn_command(conn: &Rc<Conn>, job: IoJob) {
    let c = conn.clone();
    spawn(async move {
        let d = io_command(job).await;
        c.finish(d);
    })
    .detach();
}

/// The connection's command driver: polls the slots whose wakers fired and
/// answers what finished; after the connection closes, until none is left.
async fn drive_commands(conn: Rc<Conn>) {
    poll_fn(|cx| {
        let Some(cmds) = conn.cmds.get() else {
            return Poll::Ready(());
        };
        cmds.poll_woken(cx, &mut |d| conn.finish(d));
        if conn.closing.get() && cmds.busy() == 0 {
            cmds.unregister();
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    })
    .await;
}

fn connect(conn: &Rc<Conn>, sqe: &Sqe, data: &[u8]) {
    if !sqe.is_fabrics() || sqe.fctype() != FabricsCommandType::Connect.as_u8() {
        conn.respond(
            Cqe::new(sqe.cid, Status::COMMAND_SEQUENCE_ERROR.with_dnr()),
            true,
        );
        return;
    }
    let cmd = match ConnectCommand::from_sqe(sqe) {
        Ok(c) => c,
        Err(e) => return conn.respond(e.completion(sqe.cid), true),
    };
    let cd = match ConnectData::decode(data.get(..CONNECT_DATA_LEN).unwrap_or(data)) {
        Ok(d) => d,
        Err(e) => return conn.respond(e.completion(sqe.cid), true),
    };
    match conn.target.connect(&cmd, &cd, conn.local, &conn.fd) {
        Err(cqe) => conn.respond(cqe, true),
        Ok((ctrl, cqe)) => {
            conn.qid.set(cmd.qid.0);
            conn.sqsize.set(cmd.sqsize);
            conn.sq_flow_off.set(cmd.cattr & (1 << 2) != 0);
            // SQ head: the Connect itself was the first entry consumed.
            conn.sqhd.set(1 % (cmd.sqsize.saturating_add(1)).max(1));
            if cmd.qid.0 == 0 {
                *conn.role.borrow_mut() = Role::Admin(ctrl.clone());
                spawn(keep_alive_task(conn.clone(), ctrl.clone())).detach();
                spawn(aen_task(conn.clone(), ctrl)).detach();
            } else {
                *conn.role.borrow_mut() = Role::Io(ctrl);
                // One slot per submission queue entry.
                let slots = Slots::new(usize::from(cmd.sqsize) + 1, io_command);
                if conn.cmds.set(Box::new(slots)).is_ok() {
                    spawn(drive_commands(conn.clone())).detach();
                }
            }
            conn.respond(cqe, true);
        }
    }
}

async fn keep_alive_task(conn: Rc<Conn>, ctrl: Arc<Controller>) {
    loop {
        if conn.closing.get() || ctrl.is_dead() {
            return;
        }
        let kato = ctrl.kato();
        if kato.is_zero() {
            sleep(Duration::from_millis(500)).await;
            continue;
        }
        let since = ctrl.last_keep_alive().elapsed();
        if since > kato {
            ctrl.teardown("keep-alive timeout");
            return;
        }
        let wait = (kato - since).min(Duration::from_millis(500)) + Duration::from_millis(10);
        sleep(wait).await;
    }
}

async fn aen_task(conn: Rc<Conn>, ctrl: Arc<Controller>) {
    struct Next<'a>(&'a Controller);
    impl Future for Next<'_> {
        type Output = Option<(CommandId, AerEnd)>;
        fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
            self.0.poll_event(cx)
        }
    }
    while let Some((cid, end)) = Next(&ctrl).await {
        let cqe = match end {
            AerEnd::Event(dw0) => Cqe {
                dw0,
                ..Cqe::new(cid, Status::SUCCESS)
            },
            AerEnd::Aborted => Cqe::new(cid, Status::ABORT_REQUESTED),
        };
        conn.respond(cqe, true);
    }
}
