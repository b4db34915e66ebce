//! One iSCSI connection on its reactor: login over the socket, then the full
//! feature phase.
//!
//! Shape, and why:
//! - One *reader* loop per connection owns the receive side. It reads the
//!   BHS (+AHS, header digest) into a per-connection scratch chunk, then the
//!   data segment straight into a fresh pool chunk of exactly its length, so
//!   immediate data and Data-Out land in memory once and are handed to the
//!   SCSI layer (and on to the volume) without a copy.
//! - Commands run in the connection's command slots ([`crate::slots`]), not
//!   as tasks of their own: the reader starts a command and polls it once
//!   on the spot (a copy to a memory volume and the response happen right
//!   there, with no allocation, schedule or wake-up); one that must wait
//!   stays in its slot and the connection's driver task finishes it, so a
//!   slow command does not stall the socket. Every PDU we send is encoded into the
//!   connection's send queue ([`super::txq`]) in the same synchronous step
//!   that assigns its StatSN, so StatSNs leave in order, and a writer task
//!   sends whatever is queued in one vectored send: headers (and digests)
//!   copied, the volume's Data-In buffers shared.
//! - The command window is the session's (shared by its connections, under
//!   a mutex taken once per command); commands ahead of ExpCmdSN wait here
//!   until the gap fills, commands outside the window are dropped silently
//!   (RFC 7143 §3.2.2.1), immediate ones are served at once. MaxCmdSN is
//!   ExpCmdSN + queue depth - commands in flight - 1, so `queue_depth`
//!   bounds what a session can have outstanding (and the buffers it holds).
//! - Residuals are computed here, against the transfer length the CDB asks
//!   for (reads and writes) or the data the SCSI layer returned; a write
//!   whose CDB asks for more than EDTL is handed to the SCSI layer with its
//!   transfer length cut to the whole blocks EDTL covers (FCP-4's overflow
//!   rule: process normally, move no data beyond EDTL).
//! - Error recovery level 0: a header digest error ends the connection (the
//!   framing can no longer be trusted); a broken Data-Out sequence (DataSN,
//!   buffer offset, TTT, too much data), a data digest error or an oversized
//!   segment gets a Reject and abandons that one task; a PDU with a bad field
//!   or an unsupported opcode gets a Reject. In all those cases the
//!   connection and its other tasks carry on. Nothing a peer sends can panic
//!   this code.
//! - A ticker task per connection sends NOP-In pings on an idle connection,
//!   drops it when a ping goes unanswered, and ends it when the control plane
//!   asks (session reinstatement, target deleted, logout of another CID).

use std::cell::{Cell, RefCell};
use std::collections::{HashMap, VecDeque};
use std::future::{poll_fn, Future};
use std::io;
use std::net::{Shutdown, SocketAddr};
use std::os::fd::AsRawFd;
use std::pin::pin;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::Poll;
use std::time::{Duration, Instant};

use mirrorpoint_poller::{buffer_pool, current_index, sleep, spawn, IoBuf, IoBufMut};
use mirrorpoint_transport::{BatchRecv, SplitRecv, TcpStream};
use thiserror::Error;

use super::login::{
    os_random, text_request_response, LoginConfig, LoginEnv, LoginMachine, LoginOutcome,
    LoginResult, LoginStatus, LOGIN_MAX_DATA,
};
use super::negotiation::{Digest, SessionParams, SessionType};
use super::pacing::{self, Pacer};
use super::pdu::{
    self, Bhs, CmdSn, DataIn, DataSn, Isid, Itt, Lun, NopIn, PduError, R2t, RejectReason,
    ScsiCommand, StatSn, TaskAttr, TaskMgmtResponse, TextResponse, TmfFunction, Tsih, Ttt, BHS_LEN,
    DIGEST_LEN,
};
use super::registry::{CmdWindow, ConnInfo, IscsiTarget, NodeRuntime, Session};
use super::sense::scsi_response_sense_segment;
use super::text::TextAssembler;
use super::txq::{TxError, TxQueue};
use crate::scsi::task::{Nexus, ScsiResponse, ScsiStatus, ScsiTask, TaskAttribute};
use crate::scsi::{self as scsi_impl, ResetKind};
use crate::slots::{CommandSlots, Slots, Started};
use crate::volume::VolumeChannel;

/// How long a login may sit waiting for the next PDU.
const LOGIN_TIMEOUT: Duration = Duration::from_secs(30);
/// Most commands waiting for a CmdSN gap to fill.
const MAX_HELD: usize = 256;
/// Largest write a command may announce (bounds buffered Data-Out).
const MAX_WRITE_BYTES: u32 = 16 << 20;
/// How long the end of a connection waits for queued PDUs to go out.
const FLUSH_TIMEOUT: Duration = Duration::from_secs(2);

/// Why a connection ended.
#[derive(Debug, Error)]
pub enum ConnError {
    /// Socket error or peer closed.
    #[error("socket: {0}")]
    Io(#[from] io::Error),
    /// A PDU we cannot recover from at ERL 0.
    #[error("protocol: {0}")]
    Protocol(String),
    /// Header digest mismatch.
    #[error("header digest error")]
    HeaderDigest,
    /// Out of pool buffers.
    #[error("no buffer available")]
    NoBuffer,
    /// Login failed or timed out.
    #[error("login: {0}")]
    Login(String),
    /// Closed on request (logout, reinstatement, removal).
    #[error("closed")]
    Closed,
}

/// Runs `f` and gives up after `d`.
pub(crate) async fn timeout<F: Future>(d: Duration, f: F) -> Option<F::Output> {
    let mut f = pin!(f);
    let mut s = pin!(sleep(d));
    std::future::poll_fn(|cx| {
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

/// Framing parameters of one direction.
#[derive(Debug, Clone, Copy)]
struct Framing {
    header_digest: bool,
    data_digest: bool,
    /// Largest data segment the peer may send us.
    max_recv: u32,
}

/// One received PDU.
struct InPdu {
    raw: [u8; BHS_LEN],
    bhs: Result<Bhs, PduError>,
    ahs: Vec<u8>,
    data: Option<IoBuf>,
    /// The data segment was longer than we allow (it was read and discarded).
    too_long: bool,
    /// Data digest mismatch.
    bad_data_digest: bool,
}

impl InPdu {
    fn data(&self) -> &[u8] {
        self.data.as_deref().unwrap_or(&[])
    }
}

fn le32(b: &[u8]) -> u32 {
    let mut a = [0u8; 4];
    if let Some(s) = b.get(..4) {
        a.copy_from_slice(s);
    }
    u32::from_le_bytes(a)
}

/// Most bytes one header receive asks for when the last PDU had no data
/// segment: room for about 16 command headers (with digests).
const GREEDY_RECV: usize = 1024;

/// The receive side: a scratch chunk staging headers, digests and padding.
///
/// Bytes `pos..end` of the scratch are received but not yet consumed. While
/// PDUs come without data segments (reads, NOP-Outs, task management), a
/// header receive asks for up to [`GREEDY_RECV`] bytes, so one receive
/// usually brings the headers of many commands at once. After a PDU that
/// carried data it asks for exactly one header, so a write's data segment
/// is received straight into its own pool chunk and never copied; only when
/// a data segment follows a greedy receive are its first bytes (less than
/// `GREEDY_RECV`) copied out of the scratch. A data segment is received
/// with one split `recvmsg` whose second iovec takes its padding, digest and
/// the next header into the scratch, so a stream of writes costs one
/// receive per write.
///
/// When a write's split receive shows more PDUs waiting behind it, the
/// reader turns to *batch* receives while writes of one size keep coming:
/// one `recvmsg` laid out as up to 16 (header, data chunk) pairs, so a
/// backlog of SCSI commands with immediate data lands whole, each data
/// segment in its own chunk, 16 writes per ring op. It takes only what has
/// arrived (a reader that waits holds one chunk, not 16), leaves an eighth
/// of the pool to others and sizes itself by what it found last; a PDU of
/// another shape ends the batch, its bytes copied back into the scratch
/// where the stream then continues. Not with data digests (a digest after
/// each segment breaks the layout). Behind a deep queue of writes the
/// connection loop paces the receives, so that such a backlog forms even
/// with an initiator in lock step (see [`super::pacing`]).
struct Reader {
    scratch: Option<IoBufMut>,
    pos: usize,
    end: usize,
    greedy: bool,
    /// The `msghdr` of split receives (data segment + what follows).
    split: Option<Box<SplitRecv>>,
    /// PDUs a batch receive brought whole, handed out before receiving again.
    ready: VecDeque<InPdu>,
    /// Writes the next batch receive lays out (1: no batch receive).
    batch: usize,
    /// Data segment length of the last PDU if it was a SCSI command with
    /// immediate data and nothing else (0 otherwise): the batch's shape.
    write_len: usize,
    /// The `msghdr` of batch receives.
    batch_recv: Option<Box<BatchRecv>>,
    /// The chunks a batch receive lends (kept empty between receives, so
    /// its capacity is reused and nothing is allocated per batch).
    batch_chunks: Vec<IoBufMut>,
    /// Writes the last batch receive took (whole, or finished in place).
    batch_took: usize,
}

/// Most writes one batch receive lays out...
const BATCH_MAX: usize = 16;
/// ...and at most this many data bytes of them.
const BATCH_BYTES: usize = 128 * 1024;
/// A batch receive takes chunks only while more than this share (1/8) of
/// the pool stays free for everyone else.
const BATCH_POOL_RESERVE_SHARE: usize = 8;

impl Reader {
    fn new() -> Result<Self, ConnError> {
        let pool = buffer_pool();
        let mut b = pool.alloc(pool.chunk_size()).ok_or(ConnError::NoBuffer)?;
        b.set_len(pool.chunk_size());
        Ok(Reader {
            scratch: Some(b),
            pos: 0,
            end: 0,
            greedy: false,
            split: Some(SplitRecv::new()),
            ready: VecDeque::new(),
            batch: 1,
            write_len: 0,
            batch_recv: Some(BatchRecv::new(BATCH_MAX)),
            batch_chunks: Vec::with_capacity(BATCH_MAX),
            batch_took: 0,
        })
    }

    /// One batch receive of writes whose data segments are `write_len`
    /// bytes (see the type's doc); the PDUs that arrived whole go to
    /// `ready`. Nothing is staged before it.
    async fn read_batch(&mut self, s: &TcpStream, f: Framing) -> Result<(), ConnError> {
        let hd = if f.header_digest { DIGEST_LEN } else { 0 };
        let (head, body) = (BHS_LEN + hd, self.write_len);
        let stride = head + body;
        let mut scratch = self.scratch.take().ok_or(ConnError::NoBuffer)?;
        let room = scratch.len().saturating_sub(GREEDY_RECV) / stride;
        let most = (BATCH_BYTES / body).clamp(1, BATCH_MAX).min(room);
        let pool = buffer_pool();
        let reserve = pool.chunk_count() / BATCH_POOL_RESERVE_SHARE;
        let mut chunks = std::mem::take(&mut self.batch_chunks);
        chunks.clear();
        while chunks.len() < self.batch.min(most) && pool.free_chunks() > reserve {
            match pool.alloc(body) {
                Some(c) => chunks.push(c),
                None => break,
            }
        }
        let recv = match self.batch_recv.take() {
            Some(recv) if chunks.len() >= 2 => recv,
            recv => {
                self.batch_recv = recv;
                chunks.clear();
                self.batch_chunks = chunks;
                self.scratch = Some(scratch);
                self.batch = 1;
                return Ok(());
            }
        };
        let k = chunks.len();
        let tail_end = k * stride + GREEDY_RECV;
        let (r, sc, mut chunks, recv) = s
            .recv_batch(scratch, head, body, chunks, tail_end, recv)
            .await;
        scratch = sc;
        self.batch_recv = Some(recv);
        if !matches!(r, Ok(n) if n > 0) {
            chunks.clear();
            self.batch_chunks = chunks;
            self.scratch = Some(scratch);
            return match r {
                Ok(_) => Err(ConnError::Io(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "connection closed by peer",
                ))),
                // Nothing waiting: the usual receive below waits for it.
                Err(e) if matches!(e.raw_os_error(), Some(libc::EAGAIN | libc::EINTR)) => Ok(()),
                Err(e) => Err(ConnError::Io(e)),
            };
        }
        let n = r.unwrap_or(0);
        let of_shape = |at: usize| -> Option<[u8; BHS_LEN]> {
            let h = scratch.get(at..at + head)?;
            let raw: [u8; BHS_LEN] = h.get(..BHS_LEN)?.try_into().ok()?;
            let lens = Bhs::lengths(&raw);
            let digest_ok = hd == 0 || le32(&h[BHS_LEN..]) == pdu::crc32c(&raw);
            (raw[0] & 0x3f == pdu::Opcode::ScsiCommand as u8
                && lens.ahs_len == 0
                && lens.data_len as usize == body
                && digest_ok)
                .then_some(raw)
        };
        let write = |raw: [u8; BHS_LEN], data: IoBuf| InPdu {
            raw,
            bhs: Bhs::decode(&raw).map(|(b, _)| b),
            ahs: Vec::new(),
            data: Some(data),
            too_long: false,
            bad_data_digest: false,
        };
        let mut whole = 0;
        while whole < k && n >= (whole + 1) * stride && of_shape(whole * stride).is_some() {
            whole += 1;
        }
        for (i, chunk) in chunks.drain(..whole).enumerate() {
            if let Some(raw) = of_shape(i * stride) {
                self.ready.push_back(write(raw, chunk.freeze()));
            }
        }
        self.batch_took = whole;
        // `chunks` now holds those of the PDUs from `whole` on.
        // Twice as many after a full batch, fewer after one the data ran out
        // in; a PDU of another shape says nothing.
        if whole == k {
            self.batch = (2 * k).min(most);
        } else if n < (whole + 1) * stride {
            self.batch = (whole + 1).max(k / 2);
        }
        let at = whole * stride;
        let after = n - at;
        let arriving = if whole < k && after > head && after < stride {
            of_shape(at)
        } else {
            None
        };
        self.greedy = false;
        if let (Some(raw), false) = (arriving, chunks.is_empty()) {
            // A write still arriving: finish its data in place.
            self.batch_took += 1;
            let chunk = chunks.swap_remove(0);
            chunks.clear();
            self.batch_chunks = chunks;
            (self.pos, self.end) = (0, 0);
            self.scratch = Some(scratch);
            let chunk = self.recv_data(s, chunk, after - head, body, 0).await?;
            self.ready.push_back(write(raw, chunk.freeze()));
            return Ok(());
        }
        // Anything else: the chunks' bytes back in place, and the stream
        // continues in the scratch at the first PDU not taken whole.
        for (j, chunk) in chunks.iter().enumerate() {
            let from = (whole + j) * stride + head;
            let got = n.saturating_sub(from).min(body);
            if let (Some(dst), Some(src)) = (scratch.get_mut(from..from + got), chunk.get(..got)) {
                dst.copy_from_slice(src);
            }
        }
        chunks.clear();
        self.batch_chunks = chunks;
        (self.pos, self.end) = (at, n);
        self.consume(0);
        self.scratch = Some(scratch);
        Ok(())
    }

    fn staged(&self) -> usize {
        self.end - self.pos
    }

    /// The PDU just read was a write of the batchable shape, and nothing
    /// was received behind it: what a paced connection waits after.
    fn took_a_lone_write(&self) -> bool {
        self.write_len > 0 && self.staged() == 0 && self.ready.is_empty()
    }

    /// Makes the next read try a batch receive (after a paced wait, writes
    /// are expected to have gathered).
    fn batch_next(&mut self) {
        self.batch = self.batch.max(2);
        self.batch_took = 0;
    }

    /// Writes the batch receive armed by [`Reader::batch_next`] took (0 if
    /// it found nothing or did not happen), and the last of them still
    /// waiting to be handed out (`None`: it was the PDU just read).
    fn batch_taken(&self) -> (usize, Option<&InPdu>) {
        (self.batch_took, self.ready.back())
    }

    /// Makes at least `need` bytes staged, receiving up to `want` (at least
    /// `need`, at most the scratch size) staged bytes in all.
    async fn ensure(&mut self, s: &TcpStream, need: usize, want: usize) -> Result<(), ConnError> {
        let mut buf = self.scratch.take().ok_or(ConnError::NoBuffer)?;
        let want = want.max(need);
        if want > buf.len() {
            self.scratch = Some(buf);
            return Err(ConnError::Protocol(format!(
                "header of {need} bytes exceeds the receive buffer"
            )));
        }
        if self.pos + want > buf.len() {
            buf.copy_within(self.pos..self.end, 0);
            self.end -= self.pos;
            self.pos = 0;
        }
        while self.staged() < need {
            let (r, b) = s.recv(buf, self.end..self.pos + want).await;
            buf = b;
            match r {
                Ok(0) => {
                    self.scratch = Some(buf);
                    return Err(ConnError::Io(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "connection closed by peer",
                    )));
                }
                Ok(n) => self.end += n,
                Err(e) if matches!(e.raw_os_error(), Some(libc::EINTR | libc::EAGAIN)) => {}
                Err(e) => {
                    self.scratch = Some(buf);
                    return Err(ConnError::Io(e));
                }
            }
        }
        self.scratch = Some(buf);
        Ok(())
    }

    /// Staged bytes `at..at + len` past the consumed ones.
    fn bytes(&self, at: usize, len: usize) -> &[u8] {
        self.scratch
            .as_ref()
            .and_then(|b| b.get(self.pos + at..self.pos + at + len))
            .unwrap_or(&[])
    }

    fn consume(&mut self, n: usize) {
        self.pos = (self.pos + n).min(self.end);
        if self.pos == self.end {
            self.pos = 0;
            self.end = 0;
        }
    }

    /// Receives `buf[got..n]` (the rest of a data segment; nothing is
    /// staged) with split receives that also bring up to `after` bytes of
    /// what follows (the segment's padding and digest, the next header)
    /// into the scratch: under a stream of writes one ring op per write
    /// instead of one for the data and one for the next header, and the
    /// data still lands straight in its own chunk.
    async fn recv_data(
        &mut self,
        s: &TcpStream,
        buf: IoBufMut,
        mut got: usize,
        n: usize,
        after: usize,
    ) -> Result<IoBufMut, ConnError> {
        let mut buf = buf;
        let mut scratch = self.scratch.take().ok_or(ConnError::NoBuffer)?;
        let mut split = self.split.take().unwrap_or_else(SplitRecv::new);
        // Nothing is staged (a data segment is only received once what a
        // greedy header receive brought is used up), so the scratch is
        // empty and rewound.
        debug_assert_eq!(self.staged(), 0);
        let tail_end = (self.end + after).min(scratch.len());
        let mut res = Ok(());
        while got < n {
            let (r, b, sc, sp) = s
                .recv_split(buf, got..n, scratch, self.end..tail_end, split)
                .await;
            (buf, scratch, split) = (b, sc, sp);
            match r {
                Ok(0) => {
                    res = Err(ConnError::Io(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        format!("connection closed by peer after {got} of {n} data bytes"),
                    )));
                    break;
                }
                Ok(k) => {
                    let body = k.min(n - got);
                    got += body;
                    // The kernel fills the body first: only bytes past it
                    // are in the tail.
                    self.end += k - body;
                }
                Err(e) if matches!(e.raw_os_error(), Some(libc::EINTR | libc::EAGAIN)) => {}
                Err(e) => {
                    res = Err(ConnError::Io(e));
                    break;
                }
            }
        }
        self.scratch = Some(scratch);
        self.split = Some(split);
        res.map(|()| buf)
    }

    /// Reads one PDU. `Err` ends the connection.
    async fn read(&mut self, s: &TcpStream, f: Framing) -> Result<InPdu, ConnError> {
        if self.ready.is_empty()
            && self.batch > 1
            && self.write_len > 0
            && u32::try_from(self.write_len).is_ok_and(|n| n <= f.max_recv)
            && self.staged() == 0
            && !f.data_digest
        {
            self.read_batch(s, f).await?;
        }
        if let Some(p) = self.ready.pop_front() {
            return Ok(p);
        }
        let hd = if f.header_digest { DIGEST_LEN } else { 0 };
        let greedy = self.greedy;
        let want = |n: usize| if greedy { n.max(GREEDY_RECV) } else { n };
        self.ensure(s, BHS_LEN, want(BHS_LEN + hd)).await?;
        let mut raw = [0u8; BHS_LEN];
        raw.copy_from_slice(self.bytes(0, BHS_LEN));
        let lens = Bhs::lengths(&raw);
        let hdr_end = BHS_LEN + lens.ahs_len;
        self.ensure(s, hdr_end + hd, want(hdr_end + hd)).await?;
        if hd > 0 {
            let got = le32(self.bytes(hdr_end, hd));
            if got != pdu::crc32c(self.bytes(0, hdr_end)) {
                return Err(ConnError::HeaderDigest);
            }
        }
        let ahs = self.bytes(BHS_LEN, lens.ahs_len).to_vec();
        self.consume(hdr_end + hd);
        let bhs = Bhs::decode(&raw).and_then(|(b, _)| {
            if b.opcode().is_initiator() {
                pdu::parse_ahs(&ahs)?;
                Ok(b)
            } else {
                Err(PduError::WrongDirection(b.opcode()))
            }
        });
        let n = lens.data_len as usize;
        self.greedy = n == 0;
        // A write with immediate data and nothing else: the shape batch
        // receives take while more like it keep coming.
        let write_shape = raw[0] & 0x3f == pdu::Opcode::ScsiCommand as u8
            && n > 0
            && lens.ahs_len == 0
            && pdu::pad_len(n) == 0
            && !f.data_digest;
        self.write_len = if write_shape { n } else { 0 };
        let dd = if f.data_digest && n > 0 {
            DIGEST_LEN
        } else {
            0
        };
        let trailer = pdu::pad_len(n) + dd;
        if lens.data_len > f.max_recv {
            // Read and drop it so the stream stays framed.
            let chunk = self.scratch.as_ref().map_or(4096, |b| b.len() / 2);
            let mut left = n + trailer;
            while left > 0 {
                let k = left.min(chunk);
                self.ensure(s, k, k).await?;
                self.consume(k);
                left -= k;
            }
            return Ok(InPdu {
                raw,
                bhs,
                ahs,
                data: None,
                too_long: true,
                bad_data_digest: false,
            });
        }
        let mut data = None;
        let mut bad_data_digest = false;
        if n > 0 {
            let mut buf = alloc_wait(n).await?;
            // Data bytes a greedy header receive already staged.
            let early = self.staged().min(n);
            if early > 0 {
                if let Some(dst) = buf.get_mut(..early) {
                    dst.copy_from_slice(self.bytes(0, early));
                }
                self.consume(early);
            }
            let buf = if early < n {
                // While batching, stop at this PDU's end: the next receive
                // is a batch one, which needs the stream to start a PDU.
                let next = if write_shape && self.batch > 1 {
                    0
                } else {
                    BHS_LEN + hd
                };
                self.recv_data(s, buf, early, n, trailer + next).await?
            } else {
                buf
            };
            let buf = buf.freeze();
            if trailer > 0 {
                self.ensure(s, trailer, trailer).await?;
            }
            if dd > 0 {
                let pad = pdu::pad_len(n);
                let crc = crc32c::crc32c_append(pdu::crc32c(&buf), self.bytes(0, pad));
                bad_data_digest = crc != le32(self.bytes(pad, DIGEST_LEN));
            }
            self.consume(trailer);
            if write_shape && self.staged() >= BHS_LEN && self.batch < 2 {
                // The next PDU was already waiting: batch from now on.
                self.batch = 2;
            }
            data = Some(buf);
        }
        Ok(InPdu {
            raw,
            bhs,
            ahs,
            data,
            too_long: false,
            bad_data_digest,
        })
    }
}

/// Encodes a PDU with a small owned data segment.
fn encode_small(bhs: &Bhs, data: &[u8], hd: bool, dd: bool) -> Result<Vec<u8>, ConnError> {
    let mut out = Vec::with_capacity(BHS_LEN + 8 + data.len() + 8);
    pdu::encode_pdu(bhs, &[], data, hd, dd, &mut out)
        .map_err(|e| ConnError::Protocol(e.to_string()))?;
    Ok(out)
}

struct Env<'a>(&'a IscsiTarget);

impl LoginEnv for Env<'_> {
    fn fill_random(&mut self, buf: &mut [u8]) -> bool {
        os_random(buf)
    }
    fn find_session(&self, isid: Isid, tsih: Tsih) -> Option<super::login::ExistingSession> {
        self.0.existing(isid, tsih)
    }
    fn allocate_tsih(&mut self) -> Option<Tsih> {
        self.0.allocate_tsih()
    }
}

/// Entry point: serve one accepted connection until it ends.
pub async fn serve(target: Arc<IscsiTarget>, stream: TcpStream, peer: SocketAddr, pg_tag: u16) {
    let _ = stream.set_nodelay(true);
    let local = stream
        .local_addr()
        .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)));
    match run(&target, stream, peer, local, pg_tag).await {
        Ok(()) | Err(ConnError::Closed) => tracing::debug!(%peer, "iSCSI connection closed"),
        Err(e) => tracing::info!(%peer, "iSCSI connection ended: {e}"),
    }
}

async fn run(
    target: &Arc<IscsiTarget>,
    stream: TcpStream,
    peer: SocketAddr,
    local: SocketAddr,
    pg_tag: u16,
) -> Result<(), ConnError> {
    let mut reader = Reader::new()?;
    let mut cfg = target.login_config(pg_tag, peer.ip());
    // Our MaxRecvDataSegmentLength must fit a pool chunk (data lands in one).
    let chunk = buffer_pool().chunk_size() as u32;
    cfg.limits.max_recv_data_segment_length = cfg.limits.max_recv_data_segment_length.min(chunk);
    // The first response of the full feature phase opens the real window.
    cfg.cmd_window = 1;
    let res = login(target, &stream, &mut reader, &cfg).await?;
    let params = res.params.clone();
    let node = match params.session_type {
        SessionType::Normal => {
            let name = params.target_name.clone().unwrap_or_default();
            match target.node(&name) {
                Some(n) if !n.is_removed() => Some(n),
                _ => return Err(ConnError::Login("target vanished during login".into())),
            }
        }
        SessionType::Discovery => None,
    };
    let initiator = params.initiator_name.clone().unwrap_or_default();
    let session = if res.new_session {
        let depth = node.as_ref().map_or(16, |n| n.spec.queue_depth);
        let s = Arc::new(Session {
            tsih: res.tsih,
            isid: res.isid,
            initiator_name: initiator.clone(),
            target_name: params.target_name.clone(),
            session_type: params.session_type,
            params: params.clone(),
            tpgt: pg_tag,
            window: std::sync::Mutex::new(CmdWindow {
                exp_cmd_sn: res.exp_cmd_sn,
                depth,
                in_flight: 0,
            }),
            conns: std::sync::Mutex::new(Vec::new()),
        });
        let old = target.add_session(s.clone());
        if !old.is_empty() {
            tracing::info!(initiator, "session reinstated");
            for o in &old {
                if let Some(n) = &node {
                    let nexus = nexus_for(&o.initiator_name, o.isid, &n.name, o.tpgt);
                    for l in n.luns.values() {
                        l.lu.nexus_lost(&nexus);
                    }
                }
            }
        }
        s
    } else {
        let s = target
            .find_session(res.isid, res.tsih)
            .ok_or_else(|| ConnError::Login("session vanished during login".into()))?;
        // Connection reinstatement: an old connection with this CID goes.
        s.kill_cid(res.cid.0);
        s
    };
    // Commands in flight on this connection: at most the session's window.
    let depth = node.as_ref().map_or(16, |n| n.spec.queue_depth);
    let kill = Arc::new(AtomicBool::new(false));
    let id = target.next_id();
    session.add_conn(ConnInfo {
        id,
        cid: res.cid.0,
        initiator_addr: peer,
        target_addr: local,
        reactor: current_index().unwrap_or(0),
        fd: stream.as_raw_fd(),
        kill: kill.clone(),
    });
    let conn = Rc::new(Conn {
        stream,
        target: target.clone(),
        session: session.clone(),
        node,
        params: params.clone(),
        framing_out: Framing {
            header_digest: params.header_digest == Digest::Crc32c,
            data_digest: params.data_digest == Digest::Crc32c,
            max_recv: params.initiator_max_recv_data_segment_length,
        },
        tx: TxQueue::new(
            params.header_digest == Digest::Crc32c,
            params.data_digest == Digest::Crc32c,
        ),
        st: RefCell::new(ConnState {
            stat_sn: res.next_stat_sn,
            tasks: HashMap::new(),
            writes: HashMap::new(),
            held: Vec::new(),
            text: TextAssembler::new(64 * 1024),
            text_out: None,
            next_ttt: 1,
            last_rx: Instant::now(),
            ping: None,
            done: false,
        }),
        channels: RefCell::new(HashMap::new()),
        cmds: Box::new(Slots::new(usize::try_from(depth).unwrap_or(1024), scsi_job)),
        closing: Cell::new(false),
        nexus: nexus_for(
            &initiator,
            res.isid,
            params.target_name.as_deref().unwrap_or(""),
            pg_tag,
        ),
        cid: res.cid.0,
        kill,
        pg_tag,
        peer,
    });
    // Deregisters before the stream (owned by `conn`) can close.
    let _guard = ConnGuard {
        target: target.clone(),
        session,
        node: conn.node.clone(),
        nexus: conn.nexus.clone(),
        id,
    };
    spawn(drive_commands(conn.clone())).detach();
    // However `run` ends (even dropped), the driver is told to finish the
    // commands in flight and stop, which frees the connection.
    let _closing = CloseOnDrop(&conn);
    let writer = spawn(writer(conn.clone()));
    let ticker = spawn(ticker(Rc::downgrade(&conn)));
    let framing_in = Framing {
        header_digest: conn.framing_out.header_digest,
        data_digest: conn.framing_out.data_digest,
        max_recv: params.target_max_recv_data_segment_length,
    };
    let r = conn.clone().full_feature(&mut reader, framing_in).await;
    drop(ticker);
    if matches!(r, Ok(()) | Err(ConnError::Closed)) {
        // An orderly end (logout, reset, closed by the control plane): what
        // is queued (a Logout or TMF response) goes out first, bounded in
        // time in case the peer stopped reading.
        let _ = timeout(FLUSH_TIMEOUT, conn.tx.flushed()).await;
    }
    drop(writer);
    conn.abort_all();
    r
}

/// Marks the connection closing and wakes its command driver when dropped.
struct CloseOnDrop<'a>(&'a Conn);

impl Drop for CloseOnDrop<'_> {
    fn drop(&mut self) {
        self.0.closing.set(true);
        self.0.cmds.wake_driver();
    }
}

/// The connection's command driver: polls the slots whose wakers fired;
/// after the connection ends, until none is left (their tasks are aborted
/// by then, so they finish their volume I/O and answer nothing).
async fn drive_commands(conn: Rc<Conn>) {
    poll_fn(|cx| {
        conn.cmds.poll_woken(cx, &mut |()| {});
        if conn.closing.get() && conn.cmds.busy() == 0 {
            conn.cmds.unregister();
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    })
    .await;
}

/// A SCSI command ready to execute, with what it needs to answer.
struct ScsiJob {
    conn: Rc<Conn>,
    ctl: Rc<TaskCtl>,
    cmd: ScsiCommand,
    cdb: Vec<u8>,
    spdtl: Option<u64>,
    data: Vec<IoBuf>,
}

/// Executes a command and sends its response (unless it was aborted or
/// replaced meanwhile); run in a command slot, or as a task of its own when
/// every slot is busy.
async fn scsi_job(job: ScsiJob) {
    let ScsiJob {
        conn,
        ctl,
        cmd,
        cdb,
        spdtl,
        data,
    } = job;
    let itt = cmd.itt.0;
    let resp = conn.execute(&ctl, &cmd, &cdb, data).await;
    let mine = conn
        .st
        .borrow()
        .tasks
        .get(&itt)
        .is_some_and(|t| Rc::ptr_eq(t, &ctl));
    if mine {
        conn.st.borrow_mut().tasks.remove(&itt);
    }
    ctl.release();
    if ctl.aborted.get() || !mine {
        return;
    }
    if let Err(e) = conn.respond(&cmd, spdtl, resp).await {
        tracing::debug!("send failed: {e}");
        let _ = conn.stream.shutdown(Shutdown::Both).await;
    }
}

struct ConnGuard {
    target: Arc<IscsiTarget>,
    session: Arc<Session>,
    node: Option<Arc<NodeRuntime>>,
    nexus: Nexus,
    id: u64,
}

impl Drop for ConnGuard {
    fn drop(&mut self) {
        self.session.remove_conn(self.id);
        // The last connection gone ends the session (ERL 0, no
        // Time2Retain): the I_T nexus is lost, and the SCSI layer drops
        // what it kept for it (SPC-2 reservations, unit attentions).
        if self.target.remove_session_if_empty(&self.session) {
            if let Some(n) = &self.node {
                for l in n.luns.values() {
                    l.lu.nexus_lost(&self.nexus);
                }
            }
        }
    }
}

fn nexus_for(initiator: &str, isid: Isid, target: &str, tpgt: u16) -> Nexus {
    let i: String = isid.0.iter().map(|b| format!("{b:02x}")).collect();
    Nexus {
        initiator_port: format!("{initiator},i,0x{i}"),
        target_port: format!("{target},t,0x{tpgt:04x}"),
        relative_port: tpgt,
    }
}

async fn login(
    target: &IscsiTarget,
    stream: &TcpStream,
    reader: &mut Reader,
    cfg: &LoginConfig,
) -> Result<Box<LoginResult>, ConnError> {
    let mut machine = LoginMachine::new();
    let framing = Framing {
        header_digest: false,
        data_digest: false,
        max_recv: LOGIN_MAX_DATA as u32,
    };
    loop {
        let p = match timeout(LOGIN_TIMEOUT, reader.read(stream, framing)).await {
            Some(r) => r?,
            None => return Err(ConnError::Login("login timed out".into())),
        };
        let step = match &p.bhs {
            Ok(Bhs::LoginRequest(req)) if !p.too_long => {
                machine.handle(cfg, &mut Env(target), req, p.data())
            }
            Ok(_) | Err(PduError::UnknownOpcode(_)) | Err(PduError::WrongDirection(_)) => {
                machine.abort(cfg, LoginStatus::InvalidDuringLogin)
            }
            Err(_) => machine.abort(cfg, LoginStatus::InitiatorError),
        };
        let out = encode_small(&Bhs::LoginResponse(step.response), &step.data, false, false)?;
        stream.send_vectored_all(&out, &[]).await?;
        match step.outcome {
            LoginOutcome::Continue => {}
            LoginOutcome::FullFeature(r) => return Ok(r),
            LoginOutcome::Failed(st) => return Err(ConnError::Login(format!("{st:?}"))),
        }
    }
}

/// Sends what the connection's tasks queue, batch by batch (see
/// [`super::txq`]). A send error shuts the socket down, which ends the
/// reader and so the connection.
async fn writer(conn: Rc<Conn>) {
    loop {
        let batch = conn.tx.next().await;
        let (r, list) = conn.stream.send_list(batch.list).await;
        conn.tx.done(r.is_ok(), list);
        if let Err(e) = r {
            tracing::debug!("send of {} PDUs failed: {e}", batch.pdus);
            let _ = conn.stream.shutdown(Shutdown::Both).await;
            return;
        }
    }
}

/// A command's control block, shared by its collecting and executing stages.
struct TaskCtl {
    lun: u64,
    aborted: Cell<bool>,
    /// Its place in the session's window; given back (reopening the window)
    /// just before the status goes out, or when the task is dropped.
    slot: RefCell<Option<Slot>>,
}

impl TaskCtl {
    fn new(lun: u64, session: &Arc<Session>) -> Rc<TaskCtl> {
        session.window().in_flight += 1;
        Rc::new(TaskCtl {
            lun,
            aborted: Cell::new(false),
            slot: RefCell::new(Some(Slot(session.clone()))),
        })
    }
    fn release(&self) {
        drop(self.slot.borrow_mut().take());
    }
}

/// One unit of a session's in-flight count.
struct Slot(Arc<Session>);

impl Drop for Slot {
    fn drop(&mut self) {
        let mut w = self.0.window();
        w.in_flight = w.in_flight.saturating_sub(1);
    }
}

/// A pool chunk, waiting a little when the pool is momentarily empty
/// (commands in flight hold chunks until they complete).
async fn alloc_wait(len: usize) -> Result<IoBufMut, ConnError> {
    let pool = buffer_pool();
    for _ in 0..2000 {
        if let Some(b) = pool.alloc(len) {
            return Ok(b);
        }
        sleep(Duration::from_millis(1)).await;
    }
    Err(ConnError::NoBuffer)
}

/// An outstanding R2T.
struct R2tOut {
    ttt: u32,
    offset: u32,
    len: u32,
    got: u32,
    next_data_sn: u32,
}

/// A write collecting its Data-Out.
struct WriteCollect {
    ctl: Rc<TaskCtl>,
    cmd: ScsiCommand,
    cdb: Vec<u8>,
    /// The SCSI transfer length of the original CDB, when known.
    spdtl: Option<u64>,
    /// Bytes to collect: min(EDTL, SCSI transfer length when known).
    want: u32,
    bufs: Vec<IoBuf>,
    received: u32,
    unsolicited_done: bool,
    unsol_data_sn: u32,
    r2ts: Vec<R2tOut>,
    next_r2t_offset: u32,
    r2t_sn: u32,
}

struct ConnState {
    stat_sn: StatSn,
    tasks: HashMap<u32, Rc<TaskCtl>>,
    writes: HashMap<u32, WriteCollect>,
    held: Vec<(CmdSn, InPdu)>,
    text: TextAssembler,
    /// A long text response being sent in pieces: (TTT, rest).
    text_out: Option<(u32, Vec<u8>)>,
    next_ttt: u32,
    last_rx: Instant,
    /// Our outstanding NOP-In ping: (TTT, sent at).
    ping: Option<(u32, Instant)>,
    done: bool,
}

struct Conn {
    stream: TcpStream,
    target: Arc<IscsiTarget>,
    session: Arc<Session>,
    node: Option<Arc<NodeRuntime>>,
    params: SessionParams,
    framing_out: Framing,
    /// Outgoing PDUs; the writer task sends them in batches.
    tx: TxQueue,
    st: RefCell<ConnState>,
    channels: RefCell<HashMap<u64, Rc<VolumeChannel>>>,
    /// SCSI commands being executed, each in a slot rather than a task of
    /// its own (see [`crate::slots`]); [`drive_commands`] finishes them.
    cmds: Box<dyn CommandSlots<ScsiJob, ()>>,
    /// The connection has ended: the driver stops once the slots are empty.
    closing: Cell<bool>,
    nexus: Nexus,
    cid: u16,
    kill: Arc<AtomicBool>,
    pg_tag: u16,
    peer: SocketAddr,
}

enum Verdict {
    Now,
    Hold,
    Drop,
}

/// Data transfer length the CDB asks for, for the commands whose residuals
/// the transport must report (reads and writes).
fn scsi_transfer_len(cdb: &[u8], block_size: u32) -> Option<u64> {
    let b = |i: usize| u64::from(cdb.get(i).copied().unwrap_or(0));
    let blocks = match cdb.first()? {
        0x08 | 0x0a => {
            let l = b(4);
            if l == 0 {
                256
            } else {
                l
            }
        }
        0x28 | 0x2a | 0x2e => (b(7) << 8) | b(8),
        0xa8 | 0xaa | 0xae => (b(6) << 24) | (b(7) << 16) | (b(8) << 8) | b(9),
        0x88 | 0x8a | 0x8e => (b(10) << 24) | (b(11) << 16) | (b(12) << 8) | b(13),
        _ => return None,
    };
    Some(blocks * u64::from(block_size))
}

/// Rewrites the TRANSFER LENGTH of a WRITE / WRITE AND VERIFY (10, 12,
/// 16) CDB to `blocks` (a smaller value: see the overflow rule where it is
/// called). WRITE(6) is left alone (its 0 means 256 blocks).
fn clamp_write_blocks(cdb: &mut [u8], blocks: u32) {
    let (at, width) = match cdb.first() {
        Some(0x2a | 0x2e) => (7, 2),
        Some(0xaa | 0xae) => (6, 4),
        Some(0x8a | 0x8e) => (10, 4),
        _ => return,
    };
    let v = blocks.to_be_bytes();
    let src = if width == 2 {
        let b = u16::try_from(blocks).unwrap_or(u16::MAX).to_be_bytes();
        vec![b[0], b[1]]
    } else {
        v.to_vec()
    };
    if let Some(dst) = cdb.get_mut(at..at + width) {
        dst.copy_from_slice(&src);
    }
}

/// SAM single-level LUN; `None` for formats we do not use.
fn decode_lun(l: Lun) -> Option<u64> {
    let b = l.0;
    match b[0] >> 6 {
        0 if b[0] == 0 => Some(u64::from(b[1])),
        1 => Some((u64::from(b[0] & 0x3f) << 8) | u64::from(b[1])),
        _ => None,
    }
}

fn attr(a: TaskAttr) -> TaskAttribute {
    match a {
        TaskAttr::Untagged | TaskAttr::Simple => TaskAttribute::Simple,
        TaskAttr::Ordered => TaskAttribute::Ordered,
        TaskAttr::HeadOfQueue => TaskAttribute::HeadOfQueue,
        TaskAttr::Aca => TaskAttribute::Aca,
    }
}

/// CmdSN of a command PDU (raw bytes 24..28) and its I bit, for PDUs that
/// failed to decode but whose sequence number must still be consumed.
fn raw_cmd_sn(raw: &[u8; BHS_LEN]) -> Option<(CmdSn, bool)> {
    let op = raw[0] & 0x3f;
    if matches!(op, 0x00..=0x04 | 0x06) {
        let v = u32::from_be_bytes([raw[24], raw[25], raw[26], raw[27]]);
        Some((CmdSn(v), raw[0] & 0x40 != 0))
    } else {
        None
    }
}

impl Conn {
    fn window(&self) -> (CmdSn, CmdSn) {
        let w = self.session.window();
        (w.exp_cmd_sn, w.max_cmd_sn())
    }

    fn verdict(&self, sn: CmdSn, immediate: bool) -> Verdict {
        if immediate {
            return Verdict::Now;
        }
        let mut w = self.session.window();
        if sn == w.exp_cmd_sn {
            w.exp_cmd_sn = sn.next();
            Verdict::Now
        } else if w.exp_cmd_sn.lt(sn) && !w.max_cmd_sn().lt(sn) {
            Verdict::Hold
        } else {
            Verdict::Drop
        }
    }

    /// Sends one PDU; `mk` builds the header from (StatSN, ExpCmdSN,
    /// MaxCmdSN). `advance` says whether it consumes a StatSN.
    async fn send(
        &self,
        advance: bool,
        mk: impl FnOnce(StatSn, CmdSn, CmdSn) -> Bhs,
        small: &[u8],
        bufs: &[IoBuf],
    ) -> Result<(), ConnError> {
        let stat_sn = {
            let mut st = self.st.borrow_mut();
            let s = st.stat_sn;
            if advance {
                st.stat_sn = s.next();
            }
            s
        };
        let (exp, max) = self.window();
        let bhs = mk(stat_sn, exp, max);
        self.tx.push(&bhs, small, bufs).map_err(|e| match e {
            TxError::Broken => ConnError::Closed,
            e => ConnError::Protocol(e.to_string()),
        })
    }

    async fn reject(&self, reason: RejectReason, raw: &[u8; BHS_LEN]) -> Result<(), ConnError> {
        self.send(
            true,
            |s, e, m| pdu::reject_for(reason, s, e, m),
            raw.as_slice(),
            &[],
        )
        .await
    }

    fn abort_all(&self) {
        let mut st = self.st.borrow_mut();
        for t in st.tasks.values() {
            t.aborted.set(true);
        }
        st.tasks.clear();
        st.writes.clear();
        st.held.clear();
    }

    async fn full_feature(
        self: Rc<Self>,
        reader: &mut Reader,
        framing: Framing,
    ) -> Result<(), ConnError> {
        let mut pacer = Pacer::new();
        // Our answers the initiator had unread in the write that makes the
        // next receive a paced one.
        let mut paced_by: Option<u32> = None;
        loop {
            if self.kill.load(Ordering::Acquire) || self.st.borrow().done {
                return Err(ConnError::Closed);
            }
            // Behind a deep queue of writes (see `pacing`): let the
            // initiator's next writes gather, take them with one batch
            // receive, and adapt the wait to what it took.
            if paced_by.is_some() {
                mirrorpoint_poller::sleep(pacer.wait()).await;
                reader.batch_next();
            }
            let p = reader.read(&self.stream, framing).await?;
            let next_stat_sn = self.st.borrow().stat_sn;
            let unacked_of = |p: &InPdu| match &p.bhs {
                Ok(Bhs::ScsiCommand(c)) => pacing::unacked(next_stat_sn, c.exp_stat_sn),
                _ => None,
            };
            if let Some(trigger) = paced_by.take() {
                let (took, last) = reader.batch_taken();
                let last = unacked_of(last.unwrap_or(&p));
                pacer.after_receive(took, [Some(trigger), last]);
            }
            if reader.took_a_lone_write() {
                paced_by = unacked_of(&p).filter(|&n| pacing::paces_after(n));
            }
            self.st.borrow_mut().last_rx = Instant::now();
            self.clone().dispatch(p).await?;
            if self.st.borrow().done {
                return Ok(());
            }
        }
    }

    /// Handles one PDU from the wire (window check first).
    async fn dispatch(self: Rc<Self>, p: InPdu) -> Result<(), ConnError> {
        let bhs = match &p.bhs {
            Ok(b) => b.clone(),
            Err(e) => {
                // Consume the CmdSN of a rejected command so the window moves.
                if let Some((sn, imm)) = raw_cmd_sn(&p.raw) {
                    let _ = self.verdict(sn, imm);
                }
                let reason = e.reject_reason().unwrap_or(RejectReason::ProtocolError);
                return self.reject(reason, &p.raw).await;
            }
        };
        if p.too_long {
            if let Some((sn, imm)) = raw_cmd_sn(&p.raw) {
                let _ = self.verdict(sn, imm);
            }
            if let Bhs::DataOut(d) = &bhs {
                // Its data is gone: the task cannot complete.
                let mut st = self.st.borrow_mut();
                if let Some(t) = st.tasks.remove(&d.itt.0) {
                    t.aborted.set(true);
                }
                st.writes.remove(&d.itt.0);
            }
            return self.reject(RejectReason::ProtocolError, &p.raw).await;
        }
        if p.bad_data_digest {
            // RFC 7143 §7.8: discard the PDU and Reject it. Without
            // recovery (ERL 0) a task that lost data cannot finish: abandon
            // it; a command with bad immediate data never starts.
            if let Some((sn, imm)) = raw_cmd_sn(&p.raw) {
                let _ = self.verdict(sn, imm);
            }
            if let Bhs::DataOut(d) = &bhs {
                let mut st = self.st.borrow_mut();
                if let Some(t) = st.tasks.remove(&d.itt.0) {
                    t.aborted.set(true);
                }
                st.writes.remove(&d.itt.0);
            }
            return self.reject(RejectReason::DataDigestError, &p.raw).await;
        }
        let (sn, imm) = match &bhs {
            Bhs::ScsiCommand(c) => (c.cmd_sn, c.immediate),
            Bhs::NopOut(n) => (n.cmd_sn, n.immediate || n.itt.is_reserved()),
            Bhs::TaskMgmtRequest(t) => (t.cmd_sn, t.immediate),
            Bhs::TextRequest(t) => (t.cmd_sn, t.immediate),
            Bhs::LogoutRequest(l) => (l.cmd_sn, l.immediate),
            Bhs::DataOut(_) => return self.data_out(p).await,
            Bhs::Snack(_) => return self.reject(RejectReason::ProtocolError, &p.raw).await,
            Bhs::LoginRequest(_) => return self.reject(RejectReason::ProtocolError, &p.raw).await,
            _ => return self.reject(RejectReason::ProtocolError, &p.raw).await,
        };
        match self.verdict(sn, imm) {
            Verdict::Drop => Ok(()),
            Verdict::Hold => {
                let mut st = self.st.borrow_mut();
                if st.held.len() < MAX_HELD && !st.held.iter().any(|(s, _)| *s == sn) {
                    st.held.push((sn, p));
                }
                Ok(())
            }
            Verdict::Now => {
                self.clone().command(bhs, p).await?;
                self.release_held().await
            }
        }
    }

    /// Runs held commands whose turn has come (the gap before them was
    /// filled here, or on another connection of the session).
    async fn release_held(self: Rc<Self>) -> Result<(), ConnError> {
        loop {
            let next = {
                let exp = self.session.window().exp_cmd_sn;
                let mut st = self.st.borrow_mut();
                let i = st.held.iter().position(|(s, _)| *s == exp);
                i.map(|i| st.held.swap_remove(i))
            };
            let Some((sn, p)) = next else { break };
            if let Verdict::Now = self.verdict(sn, false) {
                if let Ok(b) = p.bhs.clone() {
                    self.clone().command(b, p).await?;
                }
            }
            if self.st.borrow().done {
                break;
            }
        }
        Ok(())
    }

    /// A command whose CmdSN was accepted.
    async fn command(self: Rc<Self>, bhs: Bhs, p: InPdu) -> Result<(), ConnError> {
        match bhs {
            Bhs::ScsiCommand(c) => self.scsi_command(c, p).await,
            Bhs::NopOut(n) => {
                if n.itt.is_reserved() {
                    let mut st = self.st.borrow_mut();
                    if st.ping.is_some_and(|(t, _)| t == n.ttt.0) {
                        st.ping = None;
                    }
                    return Ok(());
                }
                let max = self.framing_out.max_recv as usize;
                let data = p.data();
                let echo = data.get(..data.len().min(max)).unwrap_or(&[]);
                self.send(
                    true,
                    |s, e, m| {
                        Bhs::NopIn(NopIn {
                            lun: n.lun,
                            itt: n.itt,
                            ttt: Ttt::RESERVED,
                            stat_sn: s,
                            exp_cmd_sn: e,
                            max_cmd_sn: m,
                        })
                    },
                    echo,
                    &[],
                )
                .await
            }
            Bhs::TaskMgmtRequest(t) => self.tmf(t).await,
            Bhs::TextRequest(t) => self.text(t, p).await,
            Bhs::LogoutRequest(l) => {
                use super::pdu::LogoutReason::*;
                let (resp, close_self, close_session) = match l.reason {
                    CloseSession => (0u8, true, true),
                    CloseConnection if l.cid.0 == self.cid => (0, true, false),
                    CloseConnection => {
                        if self.session.kill_cid(l.cid.0) {
                            (0, false, false)
                        } else {
                            (1, false, false)
                        }
                    }
                    RemoveConnectionForRecovery => (2, false, false),
                };
                self.send(
                    true,
                    |s, e, m| {
                        Bhs::LogoutResponse(pdu::LogoutResponse {
                            response: resp,
                            itt: l.itt,
                            stat_sn: s,
                            exp_cmd_sn: e,
                            max_cmd_sn: m,
                            time2wait: 0,
                            time2retain: 0,
                        })
                    },
                    &[],
                    &[],
                )
                .await?;
                if close_session {
                    // Other connections of the session go too.
                    for c in self.session.conn_infos() {
                        if c.cid != self.cid {
                            self.session.kill_cid(c.cid);
                        }
                    }
                }
                if close_self {
                    self.st.borrow_mut().done = true;
                }
                Ok(())
            }
            _ => self.reject(RejectReason::ProtocolError, &p.raw).await,
        }
    }

    fn lun_volume_block(&self, lun: u64) -> Option<u32> {
        self.node
            .as_ref()?
            .luns
            .get(&lun)
            .map(|l| l.volume.block_size().bytes())
    }

    async fn scsi_command(self: Rc<Self>, c: ScsiCommand, p: InPdu) -> Result<(), ConnError> {
        if self.params.session_type == SessionType::Discovery || self.node.is_none() {
            return self.reject(RejectReason::ProtocolError, &p.raw).await;
        }
        let mut cdb = c.cdb.to_vec();
        for a in pdu::parse_ahs(&p.ahs).unwrap_or_default() {
            if let pdu::Ahs::ExtendedCdb(ext) = a {
                cdb.extend_from_slice(ext);
            }
        }
        let lun = decode_lun(c.lun).unwrap_or(u64::MAX);
        if self.st.borrow().tasks.contains_key(&c.itt.0) {
            return self.reject(RejectReason::TaskInProgress, &p.raw).await;
        }
        let edtl = c.expected_data_transfer_length;
        let bs = self.lun_volume_block(lun);
        // The transfer the CDB asks for (reads and writes), for residuals.
        let spdtl = bs.and_then(|bs| scsi_transfer_len(&cdb, bs));
        if let (true, Some(bs), Some(s)) = (c.write, bs, spdtl) {
            if s > u64::from(edtl) {
                // Overflow on a write (FCP-4 §9.4.2, as iSCSI inherits it):
                // process the command normally, but transfer no data beyond
                // EDTL. The SCSI layer sees a CDB for the whole blocks that
                // EDTL covers; the residual is reported against the
                // original length.
                clamp_write_blocks(&mut cdb, edtl / bs);
            }
        }
        let ctl = TaskCtl::new(lun, &self.session);
        let imm_len = p.data().len() as u32;
        if !c.write || edtl == 0 {
            if imm_len > 0 {
                return self.reject(RejectReason::ProtocolError, &p.raw).await;
            }
            self.st.borrow_mut().tasks.insert(c.itt.0, ctl.clone());
            self.start(ctl, c, cdb, spdtl, Vec::new());
            return Ok(());
        }
        // A write: check immediate data against the negotiated limits.
        let pr = &self.params;
        if (imm_len > 0 && !pr.immediate_data)
            || imm_len > pr.first_burst_length
            || imm_len > edtl
            || (!c.final_ && pr.initial_r2t)
        {
            return self.reject(RejectReason::ProtocolError, &p.raw).await;
        }
        let want = spdtl.map_or(edtl, |s| u32::try_from(s).unwrap_or(u32::MAX).min(edtl));
        if want > MAX_WRITE_BYTES {
            // Answer now; any Data-Out that follows finds no task and is dropped.
            let resp = ScsiResponse {
                status: ScsiStatus::CheckCondition,
                sense: Some(
                    super::sense::Sense::invalid_field_in_cdb(7, None)
                        .to_fixed()
                        .to_vec(),
                ),
                data_in: Vec::new(),
            };
            return self.respond(&c, spdtl, resp).await;
        }
        let mut w = WriteCollect {
            ctl: ctl.clone(),
            cmd: c.clone(),
            cdb,
            spdtl,
            want,
            bufs: p.data.into_iter().collect(),
            received: imm_len,
            unsolicited_done: c.final_,
            unsol_data_sn: 0,
            r2ts: Vec::new(),
            next_r2t_offset: imm_len,
            r2t_sn: 0,
        };
        if w.unsolicited_done {
            w.next_r2t_offset = w.received;
        }
        self.st.borrow_mut().tasks.insert(c.itt.0, ctl);
        self.progress_write(w).await
    }

    /// Issues R2Ts or starts execution of a write, as its state allows.
    async fn progress_write(self: Rc<Self>, mut w: WriteCollect) -> Result<(), ConnError> {
        if w.ctl.aborted.get() {
            return Ok(());
        }
        if w.unsolicited_done && w.r2ts.is_empty() && w.received >= w.want {
            let WriteCollect {
                ctl,
                cmd,
                cdb,
                spdtl,
                bufs,
                want,
                ..
            } = w;
            let bufs = truncate(bufs, want as usize);
            self.start(ctl, cmd, cdb, spdtl, bufs);
            return Ok(());
        }
        let mut new = Vec::new();
        if w.unsolicited_done {
            let max_out = usize::from(self.params.max_outstanding_r2t.max(1));
            while w.r2ts.len() < max_out && w.next_r2t_offset < w.want {
                let len = (w.want - w.next_r2t_offset).min(self.params.max_burst_length.max(512));
                let ttt = {
                    let mut st = self.st.borrow_mut();
                    let t = st.next_ttt;
                    st.next_ttt = st.next_ttt.wrapping_add(1).max(1);
                    if st.next_ttt == u32::MAX {
                        st.next_ttt = 1;
                    }
                    t
                };
                let r = R2tOut {
                    ttt,
                    offset: w.next_r2t_offset,
                    len,
                    got: 0,
                    next_data_sn: 0,
                };
                new.push((w.r2t_sn, r.ttt, r.offset, r.len));
                w.r2t_sn += 1;
                w.next_r2t_offset += len;
                w.r2ts.push(r);
            }
        }
        let lun = w.cmd.lun;
        let itt = w.cmd.itt;
        self.st.borrow_mut().writes.insert(itt.0, w);
        for (sn, ttt, off, len) in new {
            self.send(
                false,
                |s, e, m| {
                    Bhs::R2t(R2t {
                        lun,
                        itt,
                        ttt: Ttt(ttt),
                        stat_sn: s,
                        exp_cmd_sn: e,
                        max_cmd_sn: m,
                        r2t_sn: pdu::R2tSn(sn),
                        buffer_offset: off,
                        desired_data_transfer_length: len,
                    })
                },
                &[],
                &[],
            )
            .await?;
        }
        Ok(())
    }

    async fn data_out(self: Rc<Self>, p: InPdu) -> Result<(), ConnError> {
        let Ok(Bhs::DataOut(d)) = &p.bhs else {
            return Ok(());
        };
        let len = p.data().len() as u32;
        let Some(mut w) = self.st.borrow_mut().writes.remove(&d.itt.0) else {
            // Unknown or finished task (aborted, answered early): drop it.
            return Ok(());
        };
        let bad = |why: &str| ConnError::Protocol(format!("Data-Out: {why}"));
        let mut err = None;
        if d.ttt.is_reserved() {
            if w.unsolicited_done {
                err = Some(bad("unsolicited data after F bit"));
            } else if d.data_sn.0 != w.unsol_data_sn {
                err = Some(bad("DataSN out of order"));
            } else if d.buffer_offset != w.received {
                err = Some(bad("buffer offset out of order"));
            } else if w.received + len > self.params.first_burst_length.max(w.received) {
                err = Some(bad("unsolicited data beyond FirstBurstLength"));
            } else {
                w.unsol_data_sn += 1;
                w.received += len;
                if let Some(b) = p.data {
                    w.bufs.push(b);
                }
                if d.final_ {
                    w.unsolicited_done = true;
                    w.next_r2t_offset = w.received;
                }
            }
        } else {
            match w.r2ts.iter().position(|r| r.ttt == d.ttt.0) {
                None => err = Some(bad("unknown TTT")),
                Some(i) => {
                    let r = &mut w.r2ts[i];
                    if d.data_sn.0 != r.next_data_sn {
                        err = Some(bad("DataSN out of order"));
                    } else if d.buffer_offset != r.offset + r.got || r.offset + r.got != w.received
                    {
                        err = Some(bad("buffer offset out of order"));
                    } else if r.got + len > r.len {
                        err = Some(bad("more data than the R2T asked for"));
                    } else {
                        r.next_data_sn += 1;
                        r.got += len;
                        w.received += len;
                        if let Some(b) = p.data {
                            w.bufs.push(b);
                        }
                        if d.final_ {
                            if r.got != r.len {
                                err = Some(bad("F bit before the R2T was satisfied"));
                            } else {
                                w.r2ts.remove(i);
                            }
                        }
                    }
                }
            }
        }
        if let Some(e) = err {
            // ERL 0 cannot recover the sequence: reject the PDU and abandon
            // the task (the initiator fails it on the Reject); the
            // connection and its other tasks carry on. Late Data-Out for
            // the abandoned task finds no task and is dropped.
            tracing::debug!("{e}; task {:#x} abandoned", d.itt.0);
            w.ctl.aborted.set(true);
            self.st.borrow_mut().tasks.remove(&d.itt.0);
            return self.reject(RejectReason::ProtocolError, &p.raw).await;
        }
        self.progress_write(w).await
    }

    fn channel(&self, lun: u64) -> Option<Rc<VolumeChannel>> {
        let node = self.node.as_ref()?;
        let l = node.luns.get(&lun)?;
        let mut ch = self.channels.borrow_mut();
        Some(
            ch.entry(lun)
                .or_insert_with(|| Rc::new(l.volume.channel()))
                .clone(),
        )
    }

    /// Starts a command in a free slot, where it runs at once as far as
    /// it can without waiting (a copy to a memory volume and the response
    /// both happen right here); a task of its own when every slot is busy.
    fn start(
        self: Rc<Self>,
        ctl: Rc<TaskCtl>,
        cmd: ScsiCommand,
        cdb: Vec<u8>,
        spdtl: Option<u64>,
        data: Vec<IoBuf>,
    ) {
        let job = ScsiJob {
            conn: self.clone(),
            ctl,
            cmd,
            cdb,
            spdtl,
            data,
        };
        match self.cmds.start(job) {
            Started::Done(()) | Started::Parked => {}
            Started::Full(job) => spawn(scsi_job(job)).detach(),
        }
    }

    async fn execute(
        &self,
        ctl: &TaskCtl,
        c: &ScsiCommand,
        cdb: &[u8],
        data_out: Vec<IoBuf>,
    ) -> ScsiResponse {
        let task = ScsiTask {
            cdb,
            data_out,
            expected_data_in: if c.read {
                c.expected_data_transfer_length
            } else {
                0
            },
            expected_data_out: if c.write {
                c.expected_data_transfer_length
            } else {
                0
            },
            attribute: attr(c.attr),
            nexus: &self.nexus,
        };
        let Some(node) = self.node.as_ref() else {
            return scsi_impl::lun_not_supported(&task);
        };
        if cdb.first() == Some(&0xa0) {
            return scsi_impl::report_luns(&node.lun_ids(), &task);
        }
        match (node.luns.get(&ctl.lun), self.channel(ctl.lun)) {
            (Some(l), Some(ch)) => l.lu.execute(&ch, task).await,
            _ => scsi_impl::lun_not_supported(&task),
        }
    }

    /// Sends Data-In (status piggybacked on the last when sense-free) and/or
    /// the SCSI Response, with residuals.
    async fn respond(
        &self,
        c: &ScsiCommand,
        spdtl: Option<u64>,
        resp: ScsiResponse,
    ) -> Result<(), ConnError> {
        let edtl = u64::from(c.expected_data_transfer_length);
        let data_len = resp.data_in_len() as u64;
        // Residuals (RFC 7143 §11.4.5): against the SCSI transfer length
        // when we know it, else against what was actually moved.
        let (over, under, residual) = match spdtl {
            Some(s) if s > edtl => (true, false, s - edtl),
            Some(s) if s < edtl => (false, true, edtl - s),
            Some(_) => (false, false, 0),
            None if c.read && data_len < edtl => (false, true, edtl - data_len),
            None => (false, false, 0),
        };
        let residual = u32::try_from(residual).unwrap_or(u32::MAX);
        let status = resp.status as u8;
        let mut data_sn = 0u32;
        let send_data = c.read && data_len > 0;
        let piggyback = send_data && resp.sense.is_none();
        if send_data {
            // PDUs of at most the initiator's MaxRecvDataSegmentLength, in
            // sequences of at most MaxBurstLength (F=1 ends each sequence).
            let max = self.framing_out.max_recv.max(512) as usize;
            let burst = self.params.max_burst_length.max(512) as usize;
            let mut pieces: Vec<(Vec<IoBuf>, bool)> = Vec::new();
            let mut cur: Vec<IoBuf> = Vec::new();
            let mut cur_len = 0usize;
            let mut total = 0usize;
            for b in &resp.data_in {
                let mut off = 0;
                while off < b.len() {
                    let to_burst_end = burst - total % burst;
                    let room = (max - cur_len).min(to_burst_end);
                    let take = (b.len() - off).min(room);
                    if let Some(s) = b.slice(off, take) {
                        cur.push(s);
                    }
                    cur_len += take;
                    off += take;
                    total += take;
                    let burst_end = total % burst == 0;
                    if cur_len == max || burst_end {
                        pieces.push((std::mem::take(&mut cur), burst_end));
                        cur_len = 0;
                    }
                }
            }
            if !cur.is_empty() {
                pieces.push((cur, true));
            }
            let n = pieces.len();
            let mut offset = 0u32;
            for (i, (piece, seq_end)) in pieces.into_iter().enumerate() {
                let last = i + 1 == n;
                let fin = last || seq_end;
                let st = last && piggyback;
                let plen: usize = piece.iter().map(|b| b.len()).sum();
                let dsn = DataSn(data_sn);
                let off = offset;
                self.send(
                    st,
                    |s, e, m| {
                        Bhs::DataIn(DataIn {
                            final_: fin,
                            acknowledge: false,
                            overflow: st && over,
                            underflow: st && under,
                            has_status: st,
                            status,
                            lun: c.lun,
                            itt: c.itt,
                            ttt: Ttt::RESERVED,
                            stat_sn: if st { s } else { StatSn(0) },
                            exp_cmd_sn: e,
                            max_cmd_sn: m,
                            data_sn: dsn,
                            buffer_offset: off,
                            residual_count: if st { residual } else { 0 },
                        })
                    },
                    &[],
                    &piece,
                )
                .await?;
                data_sn += 1;
                offset += plen as u32;
            }
            if piggyback {
                return Ok(());
            }
        }
        let seg = resp
            .sense
            .as_deref()
            .map(scsi_response_sense_segment)
            .unwrap_or_default();
        self.send(
            true,
            |s, e, m| {
                Bhs::ScsiResponse(pdu::ScsiResponse {
                    bidi_overflow: false,
                    bidi_underflow: false,
                    overflow: over,
                    underflow: under,
                    response: 0,
                    status,
                    itt: c.itt,
                    snack_tag: 0,
                    stat_sn: s,
                    exp_cmd_sn: e,
                    max_cmd_sn: m,
                    exp_data_sn: DataSn(data_sn),
                    bidi_read_residual_count: 0,
                    residual_count: residual,
                })
            },
            &seg,
            &[],
        )
        .await
    }

    async fn tmf(&self, t: pdu::TaskMgmtRequest) -> Result<(), ConnError> {
        const COMPLETE: u8 = 0;
        const NO_TASK: u8 = 1;
        const NO_LUN: u8 = 2;
        const NOT_SUPPORTED: u8 = 5;
        let lun = decode_lun(t.lun).unwrap_or(u64::MAX);
        let node = self.node.clone();
        let lu = node.as_ref().and_then(|n| n.luns.get(&lun).cloned());
        let abort_where = |pred: &dyn Fn(&TaskCtl) -> bool| {
            let mut st = self.st.borrow_mut();
            let itts: Vec<u32> = st
                .tasks
                .iter()
                .filter(|(_, c)| pred(c))
                .map(|(i, _)| *i)
                .collect();
            for i in itts {
                if let Some(c) = st.tasks.remove(&i) {
                    c.aborted.set(true);
                }
                st.writes.remove(&i);
            }
        };
        let response = if node.is_none() {
            NOT_SUPPORTED
        } else {
            match t.function {
                TmfFunction::AbortTask => {
                    let found = {
                        let mut st = self.st.borrow_mut();
                        let c = st.tasks.remove(&t.referenced_task_tag.0);
                        st.writes.remove(&t.referenced_task_tag.0);
                        c.map(|c| c.aborted.set(true)).is_some()
                    };
                    if found {
                        COMPLETE
                    } else {
                        let (exp, _) = self.window();
                        // Not received yet (RFC 7143 §11.5.1): complete.
                        if !t.ref_cmd_sn.lt(exp) {
                            COMPLETE
                        } else {
                            NO_TASK
                        }
                    }
                }
                TmfFunction::AbortTaskSet | TmfFunction::ClearTaskSet => match &lu {
                    Some(l) => {
                        let _ = l;
                        abort_where(&|c| c.lun == lun);
                        COMPLETE
                    }
                    None => NO_LUN,
                },
                TmfFunction::LogicalUnitReset => match &lu {
                    Some(l) => {
                        abort_where(&|c| c.lun == lun);
                        l.lu.reset(ResetKind::LogicalUnit, &self.nexus);
                        COMPLETE
                    }
                    None => NO_LUN,
                },
                TmfFunction::TargetWarmReset | TmfFunction::TargetColdReset => {
                    abort_where(&|_| true);
                    let kind = if t.function == TmfFunction::TargetWarmReset {
                        ResetKind::TargetWarm
                    } else {
                        ResetKind::TargetCold
                    };
                    if let Some(n) = &node {
                        for l in n.luns.values() {
                            l.lu.reset(kind, &self.nexus);
                        }
                    }
                    COMPLETE
                }
                TmfFunction::ClearAca | TmfFunction::TaskReassign | TmfFunction::Other(_) => {
                    NOT_SUPPORTED
                }
            }
        };
        self.send(
            true,
            |s, e, m| {
                Bhs::TaskMgmtResponse(TaskMgmtResponse {
                    response,
                    itt: t.itt,
                    stat_sn: s,
                    exp_cmd_sn: e,
                    max_cmd_sn: m,
                })
            },
            &[],
            &[],
        )
        .await?;
        if t.function == TmfFunction::TargetColdReset && response == COMPLETE {
            // The response must reach the initiator before the reset closes
            // this connection (it is queued, not yet sent).
            let _ = timeout(FLUSH_TIMEOUT, self.tx.flushed()).await;
            // A cold reset ends every session of the target, this one too.
            if let Some(n) = &node {
                for s in self.target.sessions_of(&n.name) {
                    s.kill_all();
                }
            }
        }
        Ok(())
    }

    async fn text(&self, t: pdu::TextRequest, p: InPdu) -> Result<(), ConnError> {
        let max = self.framing_out.max_recv.max(512) as usize;
        // Continuation of our long response (a TTT of ours while no request
        // text is being assembled).
        let assembling = self.st.borrow().text.in_progress();
        if !t.ttt.is_reserved() && !assembling {
            let pending = self.st.borrow_mut().text_out.take();
            let Some((ttt, mut rest)) = pending.filter(|(ttt, _)| *ttt == t.ttt.0) else {
                return self.reject(RejectReason::InvalidPduField, &p.raw).await;
            };
            let chunk: Vec<u8> = rest.drain(..rest.len().min(max)).collect();
            let more = !rest.is_empty();
            if more {
                self.st.borrow_mut().text_out = Some((ttt, rest));
            }
            return self.text_response(&t, &chunk, !more, more, ttt).await;
        }
        let assembled = self.st.borrow_mut().text.push(p.data(), t.continue_);
        let whole = match assembled {
            Ok(Some(w)) => w,
            Ok(None) => {
                // More request text follows (C=1): an empty response with
                // F=0 and a TTT asks for the rest (RFC 7143 §11.10.2).
                let ttt = self.new_ttt();
                return self.text_response(&t, &[], false, false, ttt).await;
            }
            Err(_) => {
                self.st.borrow_mut().text.reset();
                return self.reject(RejectReason::ProtocolError, &p.raw).await;
            }
        };
        let cfg = self.target.login_config(self.pg_tag, self.peer.ip());
        let initiator = self.params.initiator_name.clone().unwrap_or_default();
        let visible: Vec<_> = cfg
            .targets
            .into_iter()
            .filter(|e| {
                e.allowed_initiators
                    .as_ref()
                    .map_or(true, |l| l.contains(&initiator))
            })
            .collect();
        match text_request_response(
            &whole,
            self.params.session_type,
            self.params.target_name.as_deref(),
            &visible,
        ) {
            Ok(mut out) => {
                let more = out.len() > max;
                let rest = if more { out.split_off(max) } else { Vec::new() };
                let ttt = if more { self.new_ttt() } else { u32::MAX };
                if more {
                    self.st.borrow_mut().text_out = Some((ttt, rest));
                }
                self.text_response(&t, &out, !more, more, ttt).await
            }
            Err(reason) => self.reject(reason, &p.raw).await,
        }
    }

    fn new_ttt(&self) -> u32 {
        let mut st = self.st.borrow_mut();
        let t = st.next_ttt;
        st.next_ttt = st.next_ttt.wrapping_add(1).max(1);
        if st.next_ttt == u32::MAX {
            st.next_ttt = 1;
        }
        t
    }

    async fn text_response(
        &self,
        t: &pdu::TextRequest,
        data: &[u8],
        final_: bool,
        continue_: bool,
        ttt: u32,
    ) -> Result<(), ConnError> {
        self.send(
            true,
            |s, e, m| {
                Bhs::TextResponse(TextResponse {
                    final_,
                    continue_,
                    lun: t.lun,
                    itt: t.itt,
                    ttt: if final_ { Ttt::RESERVED } else { Ttt(ttt) },
                    stat_sn: s,
                    exp_cmd_sn: e,
                    max_cmd_sn: m,
                })
            },
            data,
            &[],
        )
        .await
    }
}

/// Writes the first `n` bytes of `bufs` (no copy: slices).
fn truncate(bufs: Vec<IoBuf>, n: usize) -> Vec<IoBuf> {
    let mut out = Vec::with_capacity(bufs.len());
    let mut left = n;
    for b in bufs {
        if left == 0 {
            break;
        }
        if b.len() <= left {
            left -= b.len();
            out.push(b);
        } else {
            if let Some(s) = b.slice(0, left) {
                out.push(s);
            }
            left = 0;
        }
    }
    out
}

/// Keep-alive and control-plane checks for one connection.
async fn ticker(conn: std::rc::Weak<Conn>) {
    loop {
        sleep(Duration::from_millis(500)).await;
        let Some(c) = conn.upgrade() else { return };
        let removed = c.node.as_ref().is_some_and(|n| n.is_removed());
        if c.kill.load(Ordering::Acquire) || removed {
            let _ = c.stream.shutdown(Shutdown::Both).await;
            return;
        }
        // Held commands whose gap another connection of the session filled.
        let held = !c.st.borrow().held.is_empty();
        if held && c.clone().release_held().await.is_err() {
            let _ = c.stream.shutdown(Shutdown::Both).await;
            return;
        }
        let (interval, wait) = *c.target.nop.lock().unwrap_or_else(|p| p.into_inner());
        if interval == 0 {
            continue;
        }
        let (idle, ping) = {
            let st = c.st.borrow();
            (st.last_rx.elapsed(), st.ping)
        };
        match ping {
            Some((_, at)) if at.elapsed() > Duration::from_secs(wait.max(1)) => {
                tracing::info!(peer = %c.peer, "NOP-In ping unanswered; dropping connection");
                let _ = c.stream.shutdown(Shutdown::Both).await;
                return;
            }
            Some(_) => {}
            None if idle > Duration::from_secs(interval) => {
                let ttt = c.new_ttt();
                c.st.borrow_mut().ping = Some((ttt, Instant::now()));
                let r = c
                    .send(
                        false,
                        |s, e, m| {
                            Bhs::NopIn(NopIn {
                                lun: Lun::default(),
                                itt: Itt::RESERVED,
                                ttt: Ttt(ttt),
                                stat_sn: s,
                                exp_cmd_sn: e,
                                max_cmd_sn: m,
                            })
                        },
                        &[],
                        &[],
                    )
                    .await;
                if r.is_err() {
                    return;
                }
            }
            None => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lun_decoding() {
        assert_eq!(decode_lun(Lun::from_u64(0)), Some(0));
        assert_eq!(decode_lun(Lun([0, 5, 0, 0, 0, 0, 0, 0])), Some(5));
        assert_eq!(decode_lun(Lun([0x41, 0x02, 0, 0, 0, 0, 0, 0])), Some(0x102));
        assert_eq!(decode_lun(Lun([0x01, 0x02, 0, 0, 0, 0, 0, 0])), None);
        assert_eq!(decode_lun(Lun([0xc0, 0, 0, 0, 0, 0, 0, 0])), None);
    }

    #[test]
    fn transfer_lengths_and_clamping() {
        let mut w10 = [0x2a, 0, 0, 0, 0, 0, 0, 0, 4, 0];
        assert_eq!(scsi_transfer_len(&w10, 512), Some(2048));
        clamp_write_blocks(&mut w10, 1);
        assert_eq!(scsi_transfer_len(&w10, 512), Some(512));
        let mut w16 = [0u8; 16];
        w16[0] = 0x8a;
        w16[13] = 8;
        assert_eq!(scsi_transfer_len(&w16, 4096), Some(32768));
        clamp_write_blocks(&mut w16, 0);
        assert_eq!(scsi_transfer_len(&w16, 4096), Some(0));
        // WRITE(6): 0 means 256 blocks, never clamped.
        let mut w6 = [0x0a, 0, 0, 0, 0, 0];
        assert_eq!(scsi_transfer_len(&w6, 512), Some(256 * 512));
        clamp_write_blocks(&mut w6, 1);
        assert_eq!(w6[4], 0);
        assert_eq!(scsi_transfer_len(&[0x12, 0, 0, 0, 36, 0], 512), None);
        assert_eq!(scsi_transfer_len(&[], 512), None);
    }

    #[test]
    fn window_shrinks_with_tasks_in_flight() {
        let mut w = CmdWindow {
            exp_cmd_sn: CmdSn(10),
            depth: 4,
            in_flight: 0,
        };
        assert_eq!(w.max_cmd_sn(), CmdSn(13));
        w.in_flight = 3;
        assert_eq!(w.max_cmd_sn(), CmdSn(10));
        w.in_flight = 4;
        assert_eq!(w.max_cmd_sn(), CmdSn(9), "closed: ExpCmdSN - 1");
        w.in_flight = 9;
        assert_eq!(w.max_cmd_sn(), CmdSn(9));
        w.exp_cmd_sn = CmdSn(u32::MAX);
        w.in_flight = 0;
        assert_eq!(w.max_cmd_sn(), CmdSn(2), "wraps");
    }

    #[test]
    fn raw_cmd_sn_only_for_commands() {
        let mut raw = [0u8; BHS_LEN];
        raw[0] = 0x41; // immediate SCSI Command
        raw[24..28].copy_from_slice(&7u32.to_be_bytes());
        assert_eq!(raw_cmd_sn(&raw), Some((CmdSn(7), true)));
        raw[0] = 0x05; // Data-Out carries no CmdSN
        assert_eq!(raw_cmd_sn(&raw), None);
    }

    #[test]
    fn truncation_slices_without_copying() {
        let pool = mirrorpoint_poller::BufferPool::new(mirrorpoint_poller::PoolConfig {
            chunk_size: 4096,
            chunk_count: 4,
            huge_pages: false,
        })
        .expect("pool");
        let a = pool.alloc(1000).expect("a").freeze();
        let b = pool.alloc(1000).expect("b").freeze();
        let t = truncate(vec![a.clone(), b], 1500);
        assert_eq!(t.len(), 2);
        assert_eq!(t[1].len(), 500);
        assert_eq!(t[0].as_ptr(), a.as_ptr());
        assert!(truncate(vec![a], 0).is_empty());
    }
}
