//! One NVMe/TCP queue pair as seen from the host: a socket on the current
//! reactor, the command-ID table, the send side and the receive loop.
//!
//! Shape, and why:
//! * **A queue belongs to one reactor** (like an SPDK qpair): its state is an
//!   `Rc` shared by the tasks of that reactor only, so nothing is locked.
//! * **Commands are futures, completions are table entries.** A command takes
//!   a credit (at most `depth` in flight), a free CID and a slot; it sends its
//!   capsule and waits on its slot. One receive-loop task reads every PDU and
//!   demultiplexes by CID: CapsuleResp completes a slot, C2HData lands in
//!   the slot's buffer, R2T queues the requested H2CData.
//! * **Few receives, little copying.** The receive loop receives greedily
//!   into a staging chunk (up to 32 KiB), so one receive brings every
//!   CapsuleResp (or several small C2HData PDUs) that has arrived, and
//!   parses them all before receiving again: at QD 32 a receive per PDU
//!   would cost more than the target's whole answer. A PDU's head is
//!   checked (header digest first) before any field is trusted. Read data
//!   that a greedy receive staged is copied into the caller's pool buffer at
//!   DATAO (at most the staging size per receive); the rest of a large
//!   transfer is received straight into it. Write data goes out from the
//!   caller's frozen buffer as a gathered `sendmsg` (in-capsule, or sliced
//!   per H2CData PDU within MAXH2CDATA), never copied.
//! * **Failure is per queue.** A fatal protocol error (answered with an
//!   H2CTermReq when the codec gives a FES), a C2HTermReq, a socket error, a
//!   command timeout or the host dropping the queue marks it dead: the socket
//!   is shut down, every command in flight fails with the cause, and later
//!   commands fail at once. A data digest mismatch fails only its command.
//! * **Cancellation is safe.** A command future dropped after its capsule was
//!   queued leaves its slot (and buffer) reserved until the target answers, so a
//!   CID is never reused while the target may still use it. Sending is done
//!   by one task per queue that owns the socket's send side, so no command
//!   can leave a PDU half sent.
//! * **Batched sends.** Queued PDUs leave in as few `sendmsg` calls as
//!   possible: headers and digests are copied into one scratch pool chunk
//!   and gathered with the payload buffers, so a burst of capsules or
//!   H2CData PDUs is one system call.

use super::error::HostError;
use crate::nvmf::pdu::{
    self, CapsuleCmd, CommonHeader, DataDigest, H2CData, IcReq, PartsLayout, Pdu, PduConfig,
    PduError, PduType, DATA_HLEN, DIGEST_LEN, IC_LEN,
};
use crate::nvmf::spec::{CommandId, Cqe, DataSgl, Sqe, Status, PSDT_SGL_MPTR_CONTIGUOUS};
use crate::nvmf::wire::{u16_at, u32_at};
use mirrorpoint_poller::{
    buffer_pool, sleep, sleep_until, spawn, IoBuf, IoBufMut, LocalPermit, LocalSemaphore,
};
use mirrorpoint_transport::TcpStream;
use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::future::{poll_fn, Future};
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, RawFd};
use std::pin::pin;
use std::rc::Rc;
use std::sync::Arc;
use std::task::{Poll, Waker};
use std::time::{Duration, Instant};

/// Bytes the receive loop needs to read a PDU's length: the smallest
/// controller PDU (CapsuleResp, R2T, C2HData and C2HTermReq headers are all
/// 24 bytes).
const FIRST_RECV: usize = 24;
/// Largest PDU head the receive loop accepts: PDO is at most 255, plus a data
/// digest.
const HEAD_BUF: usize = 512;
/// The receive loop's staging area (at most: the pool's chunk size caps it).
/// Receives into it are greedy, so at QD 32 one receive brings many
/// CapsuleResps, or several 4 KiB C2HData PDUs, instead of one each.
const STAGE_MAX: usize = 32 * 1024;
/// How long a best-effort H2CTermReq may take before the socket is closed.
const TERM_REQ_SEND_TIMEOUT: Duration = Duration::from_secs(1);
/// In-capsule data the admin queue accepts (NVMe/TCP: 8 KiB for admin and
/// fabrics commands).
pub(crate) const ADMIN_IN_CAPSULE: u32 = 8192;

/// Runs `f` for at most `d`; `None` when the time ran out (`f` is dropped).
pub(crate) async fn with_timeout<F: Future>(d: Duration, f: F) -> Option<F::Output> {
    let mut f = pin!(f);
    let mut s = pin!(sleep(d));
    poll_fn(|cx| {
        if let Poll::Ready(v) = f.as_mut().poll(cx) {
            return Poll::Ready(Some(v));
        }
        if s.as_mut().poll(cx).is_ready() {
            return Poll::Ready(None);
        }
        Poll::Pending
    })
    .await
}

/// Counters of one queue (what went over the wire), for tests and the bench.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct QueueStats {
    /// Command capsules sent.
    pub commands: u64,
    /// Writes whose data went in the capsule.
    pub in_capsule_writes: u64,
    /// R2Ts answered.
    pub r2ts: u64,
    /// H2CData PDUs sent.
    pub h2c_data_pdus: u64,
    /// C2HData PDUs received.
    pub c2h_data_pdus: u64,
    /// CapsuleResps received.
    pub capsule_resps: u64,
    /// Commands completed by a SUCCESS-flagged C2HData (no CapsuleResp).
    pub success_flag_completions: u64,
    /// Commands that failed a data digest check.
    pub data_digest_errors: u64,
    /// `sendmsg` operations (PDUs are batched into as few as possible).
    pub send_ops: u64,
}

/// Connection parameters of one queue.
#[derive(Debug, Clone, Copy)]
pub(crate) struct QueueParams {
    /// Queue ID (0 = admin).
    pub qid: u16,
    /// Commands in flight at most.
    pub depth: u16,
    /// Ask for header digests.
    pub hdgst: bool,
    /// Ask for data digests.
    pub ddgst: bool,
    /// Host PDU data alignment asked for (0's based dwords).
    pub hpda: u8,
    /// TCP connect + IC exchange limit.
    pub connect_timeout: Duration,
    /// Per-command limit.
    pub command_timeout: Duration,
}

/// The data a command moves.
pub(crate) enum Data {
    /// No data.
    None,
    /// Controller to host, into the first `len` bytes of the buffer.
    In(IoBufMut, u32),
    /// Host to controller from a pool buffer: in the capsule when
    /// `in_capsule` allows and it fits the queue's in-capsule limit, else
    /// solicited by R2T.
    Out(IoBuf, bool),
    /// Host to controller, small, always in the capsule (Connect data).
    OutInline(Vec<u8>),
}

enum Xfer {
    None,
    In {
        /// `None` while the receive loop is receiving into it.
        buf: Option<IoBufMut>,
        len: u32,
        received: u64,
    },
    Out {
        data: IoBuf,
        in_capsule: bool,
    },
}

#[derive(Default)]
struct Slot {
    busy: bool,
    xfer: Option<Xfer>,
    result: Option<Result<Cqe, HostError>>,
    /// A per-command error seen before the completion (data digest).
    error: Option<HostError>,
    waker: Option<Waker>,
    abandoned: bool,
    permit: Option<LocalPermit>,
}

impl Slot {
    fn buffer_in_flight(&self) -> bool {
        matches!(self.xfer, Some(Xfer::In { buf: None, .. }))
    }

    fn ready(&self) -> bool {
        self.result.is_some() && !self.buffer_in_flight()
    }
}

struct Inner {
    stream: TcpStream,
    fd: RawFd,
    qid: u16,
    depth: u16,
    cfg: PduConfig,
    maxh2cdata: u32,
    in_capsule_max: Cell<u32>,
    slots: RefCell<Vec<Slot>>,
    free: RefCell<Vec<u16>>,
    credits: LocalSemaphore,
    /// PDUs waiting for the send task, with their sequence numbers.
    out: RefCell<VecDeque<(u64, OutPdu)>>,
    /// Sequence number of the next PDU queued.
    out_next: Cell<u64>,
    /// Every PDU below this sequence number has been handed to the kernel.
    out_done: Cell<u64>,
    /// The send task, waiting for work.
    out_waker: RefCell<Option<Waker>>,
    /// Tasks waiting for a PDU to go out (H2CTermReq before closing).
    flush_wakers: RefCell<Vec<Waker>>,
    dead: RefCell<Option<Arc<HostError>>>,
    timeout: Duration,
    stats: Cell<QueueStats>,
}

/// A connected queue pair on the current reactor. Dropping it closes the
/// connection (commands still in flight fail).
pub(crate) struct Queue {
    inner: Rc<Inner>,
}

/// A weak handle for background tasks (keep-alive).
#[derive(Clone)]
pub(crate) struct WeakQueue(std::rc::Weak<Inner>);

impl WeakQueue {
    /// Runs `sqe` if the queue still exists.
    pub(crate) async fn execute(&self, sqe: Sqe) -> Option<Result<Cqe, HostError>> {
        let inner = self.0.upgrade()?;
        Some(Inner::execute(&inner, sqe, Data::None).await.0)
    }
}

impl Drop for Queue {
    fn drop(&mut self) {
        self.inner.die(HostError::Closed);
    }
}

impl Queue {
    /// Connects TCP, exchanges ICReq/ICResp and starts the receive loop.
    pub(crate) async fn connect(addr: SocketAddr, p: QueueParams) -> Result<Queue, HostError> {
        if p.depth == 0 {
            return Err(HostError::InvalidRequest("queue depth 0".into()));
        }
        let stream = with_timeout(p.connect_timeout, TcpStream::connect(addr))
            .await
            .ok_or(HostError::Timeout("TCP connect"))??;
        let ic = Pdu::IcReq(IcReq {
            hpda: p.hpda,
            hdgst: p.hdgst,
            ddgst: p.ddgst,
            maxr2t: 0,
        });
        let pre = PduConfig {
            hpda: p.hpda,
            ..PduConfig::default()
        };
        let bytes = ic
            .to_vec(&pre)
            .map_err(|e| HostError::InvalidRequest(format!("ICReq: {e}")))?;
        stream.send_vectored_all(&bytes, &[]).await?;
        let head = buffer_pool().alloc(HEAD_BUF).ok_or(HostError::NoBuffer)?;
        let (r, head) = with_timeout(p.connect_timeout, stream.recv_exact(head, 0..IC_LEN))
            .await
            .ok_or(HostError::Timeout("ICResp"))?;
        r?;
        let ic = match pdu::decode(&head[..IC_LEN], &pre) {
            Ok(d) => match d.pdu {
                Pdu::IcResp(ic) => ic,
                Pdu::C2HTermReq(t) => {
                    return Err(HostError::Terminated {
                        fes: t.fes,
                        fei: t.fei,
                    })
                }
                other => {
                    return Err(HostError::Negotiation(format!(
                        "expected ICResp, got {:?}",
                        other.pdu_type()
                    )))
                }
            },
            // A C2HTermReq shorter than an ICResp would have been cut short by
            // recv_exact above only if the target then closed; report the codec error.
            Err(e) => return Err(HostError::Protocol(e)),
        };
        for (what, asked, got) in [("header", p.hdgst, ic.hdgst), ("data", p.ddgst, ic.ddgst)] {
            if asked != got {
                return Err(HostError::Negotiation(format!(
                    "{what} digest {} by the controller",
                    if asked { "refused" } else { "enabled unasked" }
                )));
            }
        }
        let chunk = u32::try_from(buffer_pool().chunk_size()).unwrap_or(u32::MAX);
        let cfg = PduConfig {
            hdgst: ic.hdgst,
            ddgst: ic.ddgst,
            cpda: ic.cpda,
            hpda: p.hpda,
            max_plen: chunk.saturating_add(1024),
            max_h2c_data: ic.maxh2cdata,
        };
        let fd = stream.as_raw_fd();
        let inner = Rc::new(Inner {
            stream,
            fd,
            qid: p.qid,
            depth: p.depth,
            cfg,
            maxh2cdata: ic.maxh2cdata,
            in_capsule_max: Cell::new(if p.qid == 0 { ADMIN_IN_CAPSULE } else { 0 }),
            slots: RefCell::new((0..p.depth).map(|_| Slot::default()).collect()),
            free: RefCell::new((0..p.depth).rev().collect()),
            credits: LocalSemaphore::new(usize::from(p.depth)),
            out: RefCell::new(VecDeque::new()),
            out_next: Cell::new(0),
            out_done: Cell::new(0),
            out_waker: RefCell::new(None),
            flush_wakers: RefCell::new(Vec::new()),
            dead: RefCell::new(None),
            timeout: p.command_timeout,
            stats: Cell::new(QueueStats::default()),
        });
        spawn(receive_loop(inner.clone(), head)).detach();
        spawn(send_loop(inner.clone())).detach();
        Ok(Queue { inner })
    }

    /// Runs one command; returns its completion and the `Data::In` buffer.
    pub(crate) async fn execute(
        &self,
        sqe: Sqe,
        data: Data,
    ) -> (Result<Cqe, HostError>, Option<IoBufMut>) {
        Inner::execute(&self.inner, sqe, data).await
    }

    /// Sets the in-capsule data limit (from Identify Controller IOCCSZ).
    pub(crate) fn set_in_capsule_max(&self, bytes: u32) {
        self.inner.in_capsule_max.set(bytes);
    }

    /// The in-capsule data limit.
    pub(crate) fn in_capsule_max(&self) -> u32 {
        self.inner.in_capsule_max.get()
    }

    /// MAXH2CDATA the controller gave.
    pub(crate) fn maxh2cdata(&self) -> u32 {
        self.inner.maxh2cdata
    }

    /// The negotiated codec parameters.
    pub(crate) fn codec(&self) -> PduConfig {
        self.inner.cfg
    }

    /// Queue ID.
    pub(crate) fn qid(&self) -> u16 {
        self.inner.qid
    }

    /// Commands in flight at most.
    pub(crate) fn depth(&self) -> u16 {
        self.inner.depth
    }

    /// Why the queue died, if it did.
    pub(crate) fn dead(&self) -> Option<HostError> {
        self.inner.dead_error()
    }

    /// Kills the queue with `cause` (no-op when already dead).
    pub(crate) fn kill(&self, cause: HostError) {
        self.inner.die(cause);
    }

    /// The queue's counters.
    pub(crate) fn stats(&self) -> QueueStats {
        self.inner.stats.get()
    }

    /// A weak handle.
    pub(crate) fn downgrade(&self) -> WeakQueue {
        WeakQueue(Rc::downgrade(&self.inner))
    }
}

/// Marks a command's slot abandoned if its future is dropped early.
struct SlotGuard<'a> {
    inner: &'a Rc<Inner>,
    cid: u16,
    armed: bool,
}

impl Drop for SlotGuard<'_> {
    fn drop(&mut self) {
        if self.armed {
            self.inner.abandon(self.cid);
        }
    }
}

enum Capsule {
    None,
    Buf(IoBuf),
    Bytes(Vec<u8>),
}

impl Inner {
    fn bump(&self, f: impl FnOnce(&mut QueueStats)) {
        let mut s = self.stats.get();
        f(&mut s);
        self.stats.set(s);
    }

    fn dead_error(&self) -> Option<HostError> {
        self.dead
            .borrow()
            .as_ref()
            .map(|c| HostError::Dead(c.clone()))
    }

    async fn execute(
        this: &Rc<Inner>,
        mut sqe: Sqe,
        data: Data,
    ) -> (Result<Cqe, HostError>, Option<IoBufMut>) {
        let give_back = |data: Data| match data {
            Data::In(b, _) => Some(b),
            _ => None,
        };
        if let Some(e) = this.dead_error() {
            return (Err(e), give_back(data));
        }
        if let Data::In(b, len) = &data {
            if (b.len() as u64) < u64::from(*len) {
                let e = HostError::InvalidRequest(format!(
                    "buffer of {} bytes for a {len}-byte transfer",
                    b.len()
                ));
                return (Err(e), give_back(data));
            }
        }
        let permit = this.credits.acquire().await;
        if let Some(e) = this.dead_error() {
            return (Err(e), give_back(data));
        }
        let Some(cid) = this.free.borrow_mut().pop() else {
            let e = HostError::InvalidRequest("no free command ID".into());
            return (Err(e), give_back(data));
        };
        sqe.cid = CommandId(cid);
        sqe.flags |= PSDT_SGL_MPTR_CONTIGUOUS << 6;
        let (xfer, capsule) = match data {
            Data::None => {
                sqe.dptr = DataSgl::Transport { len: 0 }.encode();
                (Xfer::None, Capsule::None)
            }
            Data::In(buf, len) => {
                sqe.dptr = DataSgl::Transport { len }.encode();
                let x = Xfer::In {
                    buf: Some(buf),
                    len,
                    received: 0,
                };
                (x, Capsule::None)
            }
            Data::Out(buf, allow) => {
                let len = u32::try_from(buf.len()).unwrap_or(u32::MAX);
                let in_capsule = allow && len <= this.in_capsule_max.get();
                if in_capsule {
                    sqe.dptr = DataSgl::InCapsule { offset: 0, len }.encode();
                } else {
                    sqe.dptr = DataSgl::Transport { len }.encode();
                }
                let cap = if in_capsule {
                    Capsule::Buf(buf.clone())
                } else {
                    Capsule::None
                };
                (
                    Xfer::Out {
                        data: buf,
                        in_capsule,
                    },
                    cap,
                )
            }
            Data::OutInline(bytes) => {
                let len = u32::try_from(bytes.len()).unwrap_or(u32::MAX);
                sqe.dptr = DataSgl::InCapsule { offset: 0, len }.encode();
                (Xfer::None, Capsule::Bytes(bytes))
            }
        };
        if let Some(s) = this.slots.borrow_mut().get_mut(usize::from(cid)) {
            *s = Slot {
                busy: true,
                xfer: Some(xfer),
                permit: Some(permit),
                ..Slot::default()
            };
        }
        let mut guard = SlotGuard {
            inner: this,
            cid,
            armed: true,
        };
        this.bump(|s| {
            s.commands += 1;
            if matches!(capsule, Capsule::Buf(_)) {
                s.in_capsule_writes += 1;
            }
        });
        if let Err(e) = this.send_capsule(&sqe, capsule) {
            this.die(e);
        }
        let out = this.wait(cid).await;
        guard.armed = false;
        out
    }

    /// Encodes a command capsule and queues it for the send task.
    fn send_capsule(&self, sqe: &Sqe, capsule: Capsule) -> Result<(), HostError> {
        let data: &[u8] = match &capsule {
            Capsule::None => &[],
            Capsule::Buf(b) => b,
            Capsule::Bytes(v) => v,
        };
        let parts = Pdu::CapsuleCmd(CapsuleCmd { sqe: *sqe, data })
            .encode_parts(&self.cfg)
            .map_err(|e| HostError::InvalidRequest(format!("capsule: {e}")))?;
        let pdu = match capsule {
            Capsule::None => OutPdu {
                header: parts.header,
                payload: None,
                digest: None,
            },
            Capsule::Bytes(v) => {
                let mut all = parts.header;
                all.extend_from_slice(&v);
                if let Some(d) = parts.data_digest {
                    all.extend_from_slice(&d);
                }
                OutPdu {
                    header: all,
                    payload: None,
                    digest: None,
                }
            }
            Capsule::Buf(b) => OutPdu {
                header: parts.header,
                payload: Some(b),
                digest: parts.data_digest,
            },
        };
        self.push(pdu);
        Ok(())
    }

    /// Queues a PDU for the send task; returns its sequence number.
    fn push(&self, pdu: OutPdu) -> u64 {
        let seq = self.out_next.get();
        self.out_next.set(seq + 1);
        self.out.borrow_mut().push_back((seq, pdu));
        if let Some(w) = self.out_waker.borrow_mut().take() {
            w.wake();
        }
        seq
    }

    /// Waits for `cid`'s completion, killing the queue on timeout.
    async fn wait(&self, cid: u16) -> (Result<Cqe, HostError>, Option<IoBufMut>) {
        let deadline = Instant::now() + self.timeout;
        let mut timer = pin!(sleep_until(deadline));
        let mut timed_out = false;
        poll_fn(|cx| {
            if let Some(out) = self.try_take(cid, cx.waker()) {
                return Poll::Ready(out);
            }
            if !timed_out && timer.as_mut().poll(cx).is_ready() {
                timed_out = true;
                self.die(HostError::Timeout("command"));
                if let Some(out) = self.try_take(cid, cx.waker()) {
                    return Poll::Ready(out);
                }
            }
            Poll::Pending
        })
        .await
    }

    /// Takes a ready result and frees the slot, or registers the waker.
    fn try_take(
        &self,
        cid: u16,
        waker: &Waker,
    ) -> Option<(Result<Cqe, HostError>, Option<IoBufMut>)> {
        let taken = {
            let mut slots = self.slots.borrow_mut();
            let s = slots.get_mut(usize::from(cid))?;
            if !s.ready() {
                s.waker = Some(waker.clone());
                return None;
            }
            std::mem::take(s)
        };
        self.free.borrow_mut().push(cid);
        let buf = match taken.xfer {
            Some(Xfer::In { buf, .. }) => buf,
            _ => None,
        };
        let result = taken.result.unwrap_or(Err(HostError::Closed));
        drop(taken.permit);
        Some((result, buf))
    }

    /// A dropped command: free its slot now if answered, else when answered.
    fn abandon(&self, cid: u16) {
        let free = {
            let mut slots = self.slots.borrow_mut();
            match slots.get_mut(usize::from(cid)) {
                Some(s) if s.busy => {
                    s.abandoned = true;
                    s.waker = None;
                    s.ready()
                }
                _ => false,
            }
        };
        if free {
            self.free_slot(cid);
        }
    }

    fn free_slot(&self, cid: u16) {
        let old = self
            .slots
            .borrow_mut()
            .get_mut(usize::from(cid))
            .map(std::mem::take);
        if old.is_some() {
            self.free.borrow_mut().push(cid);
        }
        drop(old);
    }

    /// Records a result for a busy slot and wakes (or frees) it.
    fn finish(&self, cid: u16, result: Result<Cqe, HostError>) {
        let (waker, free) = {
            let mut slots = self.slots.borrow_mut();
            let Some(s) = slots.get_mut(usize::from(cid)) else {
                return;
            };
            if !s.busy || s.result.is_some() {
                return;
            }
            s.result = Some(result);
            (s.waker.take(), s.abandoned && s.ready())
        };
        if free {
            self.free_slot(cid);
        } else if let Some(w) = waker {
            w.wake();
        }
    }

    /// Puts a read buffer back after a receive into it.
    fn return_buffer(&self, cid: u16, b: IoBufMut) {
        let (waker, free) = {
            let mut slots = self.slots.borrow_mut();
            let Some(s) = slots.get_mut(usize::from(cid)) else {
                return;
            };
            if let Some(Xfer::In { buf, .. }) = &mut s.xfer {
                *buf = Some(b);
            }
            let ready = s.ready();
            (
                if ready { s.waker.take() } else { None },
                s.abandoned && ready,
            )
        };
        if free {
            self.free_slot(cid);
        } else if let Some(w) = waker {
            w.wake();
        }
    }

    /// Marks the queue dead, shuts the socket down and fails every command
    /// in flight with the cause.
    fn die(&self, cause: HostError) {
        if self.dead.borrow().is_some() {
            return;
        }
        if !matches!(cause, HostError::Closed) {
            tracing::debug!(qid = self.qid, "NVMe/TCP host queue dead: {cause}");
        }
        let cause = Arc::new(cause);
        *self.dead.borrow_mut() = Some(cause.clone());
        if let Some(w) = self.out_waker.borrow_mut().take() {
            w.wake();
        }
        for w in self.flush_wakers.borrow_mut().drain(..) {
            w.wake();
        }
        // SAFETY: fd belongs to self.stream, which lives as long as self.
        unsafe {
            libc::shutdown(self.fd, libc::SHUT_RDWR);
        }
        let busy: Vec<u16> = self
            .slots
            .borrow()
            .iter()
            .enumerate()
            .filter(|(_, s)| s.busy && s.result.is_none())
            .filter_map(|(i, _)| u16::try_from(i).ok())
            .collect();
        for cid in busy {
            self.finish(cid, Err(HostError::Dead(cause.clone())));
        }
    }

    /// Completes a command from its CapsuleResp.
    fn complete(&self, cqe: Cqe) -> Result<(), HostError> {
        let cid = cqe.cid.0;
        let result = {
            let slots = self.slots.borrow();
            match slots.get(usize::from(cid)) {
                Some(s) if s.busy && s.result.is_none() && !s.buffer_in_flight() => {
                    if let Some(e) = &s.error {
                        Err(e.clone())
                    } else if !cqe.status.is_success() {
                        Err(HostError::from_status(cqe.status, cqe.dw0))
                    } else {
                        match &s.xfer {
                            Some(Xfer::In { len, received, .. }) if *received < u64::from(*len) => {
                                Err(HostError::Unexpected(format!(
                                    "command {cid} completed after {received} of {len} bytes"
                                )))
                            }
                            _ => Ok(cqe),
                        }
                    }
                }
                _ => {
                    return Err(HostError::Unexpected(format!(
                        "completion for command {cid}, which is not in flight"
                    )))
                }
            }
        };
        self.finish(cid, result);
        Ok(())
    }

    /// Best-effort H2CTermReq for a fatal codec error; returns the cause.
    async fn fatal(&self, e: PduError, echo: Vec<u8>) -> HostError {
        if let Some(t) = e.h2c_term_req(&echo) {
            if let Ok(bytes) = t.to_vec(&self.cfg) {
                let seq = self.push(OutPdu {
                    header: bytes,
                    payload: None,
                    digest: None,
                });
                let sent = poll_fn(|cx| {
                    if self.out_done.get() > seq || self.dead.borrow().is_some() {
                        return Poll::Ready(());
                    }
                    self.flush_wakers.borrow_mut().push(cx.waker().clone());
                    Poll::Pending
                });
                let _ = with_timeout(TERM_REQ_SEND_TIMEOUT, sent).await;
            }
        }
        HostError::Protocol(e)
    }
}

/// What one data-less PDU asks of the receive loop.
enum Next {
    Continue,
    Stop(HostError),
}

async fn receive_loop(inner: Rc<Inner>, mut stage: IoBufMut) {
    let staging = stage.capacity().clamp(HEAD_BUF, STAGE_MAX);
    if !stage.set_len(staging) {
        inner.die(HostError::NoBuffer);
        return;
    }
    // stage[pos..have]: received and not yet parsed.
    let (mut pos, mut have) = (0, 0);
    let cause = loop {
        if inner.dead.borrow().is_some() {
            return;
        }
        let (r, s) = fill(&inner.stream, stage, &mut pos, &mut have, FIRST_RECV).await;
        stage = s;
        if let Err(e) = r {
            break HostError::from(e);
        }
        let Some(ch) = CommonHeader::parse(&stage[pos..have]) else {
            break HostError::Unexpected("short common header".into());
        };
        let parts = match pdu::parts_layout(&ch, &inner.cfg) {
            Ok(p) if p.head_len >= FIRST_RECV && p.head_len + DIGEST_LEN <= HEAD_BUF => p,
            Ok(_) => break HostError::Unexpected("PDU head of impossible length".into()),
            Err(e) => break inner.fatal(e, stage[pos..pos + FIRST_RECV].to_vec()).await,
        };
        let (r, s) = fill(&inner.stream, stage, &mut pos, &mut have, parts.head_len).await;
        stage = s;
        if let Err(e) = r {
            break HostError::from(e);
        }
        let mut head = [0u8; HEAD_BUF];
        head[..parts.head_len].copy_from_slice(&stage[pos..pos + parts.head_len]);
        pos += parts.head_len;
        let next = if ch.pdu_type == PduType::C2HData as u8 && parts.data_len > 0 {
            let (n, s) = receive_c2h_data(&inner, &head, stage, &mut pos, &mut have, &parts).await;
            stage = s;
            n
        } else {
            handle_pdu(&inner, &head[..parts.head_len]).await
        };
        if let Next::Stop(e) = next {
            break e;
        }
    };
    inner.die(cause);
}

/// Makes at least `need` unparsed bytes (at most the staging length less a
/// PDU head's worth) available at `stage[*pos..*have]`: moves what is left
/// to the front when it would not fit, then receives greedily, taking
/// whatever the socket already has up to the end of the staging area.
async fn fill(
    stream: &TcpStream,
    mut stage: IoBufMut,
    pos: &mut usize,
    have: &mut usize,
    need: usize,
) -> (std::io::Result<()>, IoBufMut) {
    if *pos == *have {
        (*pos, *have) = (0, 0);
    }
    let ready = *have - *pos;
    if ready >= need {
        return (Ok(()), stage);
    }
    if *pos + need > stage.len() {
        stage.copy_within(*pos..*have, 0);
        (*pos, *have) = (0, ready);
    }
    let end = stage.len();
    let (r, stage) = stream.recv_at_least(stage, *have..end, need - ready).await;
    match r {
        Ok(n) => {
            *have += n;
            (Ok(()), stage)
        }
        Err(e) => (Err(e), stage),
    }
}

/// A PDU without a separately received data section.
async fn handle_pdu(inner: &Rc<Inner>, bytes: &[u8]) -> Next {
    let decoded = pdu::decode_parts(bytes, &[], None, &inner.cfg);
    let pdu = match decoded {
        Ok((d, _)) => d.pdu,
        Err(e) => return Next::Stop(inner.fatal(e, bytes.to_vec()).await),
    };
    match pdu {
        Pdu::CapsuleResp(r) => {
            inner.bump(|s| s.capsule_resps += 1);
            match inner.complete(r.cqe) {
                Ok(()) => Next::Continue,
                Err(e) => Next::Stop(e),
            }
        }
        Pdu::R2t(r) => {
            let data = {
                let slots = inner.slots.borrow();
                match slots.get(usize::from(r.cid.0)) {
                    Some(Slot {
                        busy: true,
                        result: None,
                        xfer:
                            Some(Xfer::Out {
                                data,
                                in_capsule: false,
                            }),
                        ..
                    }) => Some(data.clone()),
                    _ => None,
                }
            };
            let Some(data) = data else {
                let e = PduError::SequenceError {
                    what: "R2T for a command with no solicited write in flight",
                };
                return Next::Stop(inner.fatal(e, bytes.to_vec()).await);
            };
            let end = u64::from(r.offset) + u64::from(r.len);
            if end > data.len() as u64 {
                let e = PduError::DataOutOfRange {
                    what: "R2T outside the command's data",
                };
                return Next::Stop(inner.fatal(e, bytes.to_vec()).await);
            }
            inner.bump(|s| s.r2ts += 1);
            match queue_h2c_data(inner, r.cid, r.ttag, &data, r.offset, r.len) {
                Ok(()) => Next::Continue,
                Err(e) => Next::Stop(e),
            }
        }
        Pdu::C2HTermReq(t) => Next::Stop(HostError::Terminated {
            fes: t.fes,
            fei: t.fei,
        }),
        _ => {
            let e = PduError::SequenceError {
                what: "PDU type not expected by a host",
            };
            Next::Stop(inner.fatal(e, bytes.to_vec()).await)
        }
    }
}

/// A C2HData PDU whose head is in `head`: header checked; the data that
/// greedy receives already staged is copied into the command's buffer at
/// DATAO and the rest received straight into it; then the digest; then
/// full validation.
async fn receive_c2h_data(
    inner: &Rc<Inner>,
    head: &[u8; HEAD_BUF],
    mut stage: IoBufMut,
    pos: &mut usize,
    have: &mut usize,
    parts: &PartsLayout,
) -> (Next, IoBufMut) {
    let hl = parts.head_len;
    if inner.cfg.hdgst {
        let received = u32_at(head, DATA_HLEN);
        let computed = crc32c::crc32c(&head[..DATA_HLEN]);
        if received != computed {
            let e = PduError::HeaderDigest { received, computed };
            let n = Next::Stop(inner.fatal(e, head[..hl].to_vec()).await);
            return (n, stage);
        }
    }
    let cid = u16_at(head, 8);
    let datao = u32_at(head, 12);
    let datal = u32_at(head, 16);
    if usize::try_from(datal).ok() != Some(parts.data_len) {
        let e = PduError::InvalidHeaderField {
            offset: 16,
            what: "DATAL does not match PDU data length",
        };
        let n = Next::Stop(inner.fatal(e, head[..hl].to_vec()).await);
        return (n, stage);
    }
    let end = u64::from(datao) + u64::from(datal);
    // Take the command's buffer if the range lies within its transfer.
    let taken: Result<IoBufMut, PduError> = {
        let mut slots = inner.slots.borrow_mut();
        match slots.get_mut(usize::from(cid)) {
            Some(Slot {
                busy: true,
                result: None,
                xfer: Some(Xfer::In { buf, len, .. }),
                ..
            }) => {
                if end > u64::from(*len) {
                    Err(PduError::DataOutOfRange {
                        what: "C2HData outside the command's transfer",
                    })
                } else {
                    buf.take().ok_or(PduError::SequenceError {
                        what: "C2HData while the buffer is busy",
                    })
                }
            }
            _ => Err(PduError::SequenceError {
                what: "C2HData for a command with no read in flight",
            }),
        }
    };
    let buf = match taken {
        Ok(b) => b,
        Err(e) => {
            let n = Next::Stop(inner.fatal(e, head[..hl].to_vec()).await);
            return (n, stage);
        }
    };
    let range = datao as usize..end as usize;
    let mut buf = buf;
    let staged = (*have - *pos).min(range.len());
    let received_from = range.start + staged;
    let Some(dst) = buf.get_mut(range.start..received_from) else {
        inner.return_buffer(cid, buf);
        let e = PduError::DataOutOfRange {
            what: "C2HData outside the command's buffer",
        };
        let n = Next::Stop(inner.fatal(e, head[..hl].to_vec()).await);
        return (n, stage);
    };
    dst.copy_from_slice(&stage[*pos..*pos + staged]);
    *pos += staged;
    let (r, buf) = inner.stream.recv_exact(buf, received_from..range.end).await;
    let mut ddgst = None;
    let mut res = r.map_err(HostError::from);
    if res.is_ok() && parts.ddgst {
        let (r, s) = fill(&inner.stream, stage, pos, have, DIGEST_LEN).await;
        stage = s;
        res = r.map_err(HostError::from);
        if res.is_ok() {
            ddgst = Some(u32_at(&stage, *pos));
            *pos += DIGEST_LEN;
        }
    }
    let outcome = match res {
        Err(e) => Err(e),
        Ok(()) => match pdu::decode_parts(&head[..hl], &buf[range], ddgst, &inner.cfg) {
            Ok((d, digest)) => match d.pdu {
                Pdu::C2HData(c) => Ok((c.success, digest)),
                _ => Err(HostError::Unexpected(
                    "C2HData decoded as another PDU".into(),
                )),
            },
            Err(e) => Err(inner.fatal(e, head[..hl].to_vec()).await),
        },
    };
    let next = match outcome {
        Err(e) => Next::Stop(e),
        Ok((success, digest)) => {
            inner.bump(|s| {
                s.c2h_data_pdus += 1;
                s.success_flag_completions += u64::from(success);
                s.data_digest_errors += u64::from(matches!(digest, DataDigest::Mismatch { .. }));
            });
            // Account before handing the buffer back (the slot is busy and ours).
            {
                let mut slots = inner.slots.borrow_mut();
                if let Some(s) = slots.get_mut(usize::from(cid)) {
                    if let Some(Xfer::In { received, .. }) = &mut s.xfer {
                        *received += u64::from(datal);
                    }
                    if let DataDigest::Mismatch { received, computed } = digest {
                        if s.error.is_none() {
                            s.error = Some(HostError::DataDigest {
                                cid,
                                received,
                                computed,
                            });
                        }
                    }
                }
            }
            inner.return_buffer(cid, buf);
            if success {
                // SUCCESS: no CapsuleResp follows; complete as if one did.
                let cqe = Cqe::new(CommandId(cid), Status::SUCCESS);
                if let Err(e) = inner.complete(cqe) {
                    return (Next::Stop(e), stage);
                }
            }
            return (Next::Continue, stage);
        }
    };
    inner.return_buffer(cid, buf);
    (next, stage)
}

/// Answers one R2T: queues H2CData PDUs of at most MAXH2CDATA bytes
/// covering `offset..offset+len` of the command's data (slices of the
/// caller's buffer, not copies), the last one flagged.
fn queue_h2c_data(
    inner: &Inner,
    cid: CommandId,
    ttag: u16,
    data: &IoBuf,
    offset: u32,
    len: u32,
) -> Result<(), HostError> {
    let end = offset.saturating_add(len);
    let mut off = offset;
    let step = inner.maxh2cdata.max(4096);
    while off < end {
        let n = step.min(end - off);
        let chunk = data
            .slice(off as usize, n as usize)
            .ok_or_else(|| HostError::Unexpected("R2T range outside the data".into()))?;
        let pdu = Pdu::H2CData(H2CData {
            cid,
            ttag,
            offset: off,
            last: off + n == end,
            data: &chunk,
        });
        let parts = pdu
            .encode_parts(&inner.cfg)
            .map_err(|e| HostError::InvalidRequest(format!("H2CData: {e}")))?;
        inner.push(OutPdu {
            header: parts.header,
            payload: Some(chunk),
            digest: parts.data_digest,
        });
        inner.bump(|s| s.h2c_data_pdus += 1);
        off += n;
    }
    Ok(())
}

/// Most header bytes gathered into one `sendmsg`.
const SEND_BATCH_BYTES: usize = 64 * 1024;
/// Most payload buffers gathered into one `sendmsg`.
const SEND_BATCH_PAYLOADS: usize = 128;

/// A batch ready for one `sendmsg`.
struct Batch {
    header: Vec<u8>,
    segments: Vec<IoBuf>,
    last_seq: Option<u64>,
}

/// Gathers queued PDUs into one scratch pool chunk (headers and digests,
/// copied) interleaved with the payloads (not copied): one `sendmsg` for
/// many PDUs, payloads included. `None` when the pool has no chunk.
fn gather_scratch(inner: &Inner) -> Option<Batch> {
    let pool = buffer_pool();
    let cap = pool.chunk_size().min(SEND_BATCH_BYTES);
    let mut scratch = pool.alloc(cap)?;
    enum Seg {
        Scratch(usize, usize),
        Payload(IoBuf),
    }
    let mut segs: Vec<Seg> = Vec::new();
    let mut pos = 0usize;
    let mut payloads = 0usize;
    let mut last_seq = None;
    {
        let mut out = inner.out.borrow_mut();
        while let Some((_, pdu)) = out.front() {
            let need = pdu.header.len() + pdu.digest.map_or(0, |d| d.len());
            if pos + need > cap || payloads >= SEND_BATCH_PAYLOADS {
                break;
            }
            let Some((seq, pdu)) = out.pop_front() else {
                break;
            };
            let mut put = |bytes: &[u8], segs: &mut Vec<Seg>| {
                if let Some(dst) = scratch.get_mut(pos..pos + bytes.len()) {
                    dst.copy_from_slice(bytes);
                }
                match segs.last_mut() {
                    Some(Seg::Scratch(_, end)) if *end == pos => *end += bytes.len(),
                    _ => segs.push(Seg::Scratch(pos, pos + bytes.len())),
                }
                pos += bytes.len();
            };
            put(&pdu.header, &mut segs);
            if let Some(p) = pdu.payload {
                segs.push(Seg::Payload(p));
                payloads += 1;
            }
            if let Some(d) = pdu.digest {
                put(&d, &mut segs);
            }
            last_seq = Some(seq);
        }
    }
    let frozen = scratch.freeze();
    let segments = segs
        .into_iter()
        .filter_map(|s| match s {
            Seg::Scratch(a, b) => frozen.slice(a, b - a),
            Seg::Payload(p) => Some(p),
        })
        .collect();
    Some(Batch {
        header: Vec::new(),
        segments,
        last_seq,
    })
}

/// Without a scratch chunk: the headers of data-less PDUs and at most one
/// payload; that payload's digest is left in `carry` for the next batch.
fn gather_plain(inner: &Inner, carry: &mut Option<[u8; DIGEST_LEN]>) -> Batch {
    let mut header = Vec::new();
    if let Some(d) = carry.take() {
        header.extend_from_slice(&d);
    }
    let mut segments = Vec::new();
    let mut last_seq = None;
    let mut out = inner.out.borrow_mut();
    while header.len() < SEND_BATCH_BYTES {
        let Some((seq, pdu)) = out.pop_front() else {
            break;
        };
        header.extend_from_slice(&pdu.header);
        last_seq = Some(seq);
        if let Some(p) = pdu.payload {
            segments.push(p);
            *carry = pdu.digest;
            break;
        }
    }
    Batch {
        header,
        segments,
        last_seq,
    }
}

/// The send task: owns the socket's send side and drains the queue in
/// batches, each one `sendmsg` (see [`gather_scratch`]); at QD 32 a burst
/// of capsules, or of H2CData PDUs, leaves in one system call.
async fn send_loop(inner: Rc<Inner>) {
    let mut carry: Option<[u8; DIGEST_LEN]> = None;
    loop {
        let ready = poll_fn(|cx| {
            if inner.dead.borrow().is_some() {
                return Poll::Ready(false);
            }
            if carry.is_some() || !inner.out.borrow().is_empty() {
                return Poll::Ready(true);
            }
            *inner.out_waker.borrow_mut() = Some(cx.waker().clone());
            Poll::Pending
        })
        .await;
        if !ready {
            return;
        }
        let batch = match carry {
            None => gather_scratch(&inner),
            Some(_) => None,
        }
        .unwrap_or_else(|| gather_plain(&inner, &mut carry));
        inner.bump(|s| s.send_ops += 1);
        let sent = inner
            .stream
            .send_vectored_all(&batch.header, &batch.segments)
            .await;
        if let Err(e) = sent {
            inner.die(e.into());
            return;
        }
        if let Some(seq) = batch.last_seq {
            inner.out_done.set(seq + 1);
        }
        for w in inner.flush_wakers.borrow_mut().drain(..) {
            w.wake();
        }
    }
}

/// One PDU queued for sending: header bytes (copied; for capsules without
/// in-capsule data, everything), an optional payload from a pool buffer and
/// the payload's data digest.
struct OutPdu {
    header: Vec<u8>,
    payload: Option<IoBuf>,
    digest: Option<[u8; DIGEST_LEN]>,
}
