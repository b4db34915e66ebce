//! Site-to-site connections on the reactors: frames of [`super::wire`] over a
//! [`TcpStream`], the authenticated handshake, and small future helpers
//! (timeout, join) the mirror engine uses.
//!
//! On the leg's side a frame's payload is received straight into a pool
//! chunk of its own, so a replicated write's data lands in memory once and
//! is written to the leg's device from there; the receive of a write's
//! payload also brings the next frame's head into a small staging buffer
//! (one split `recvmsg`, [`TcpStream::recv_split`], as the NVMe/TCP and
//! iSCSI front ends do), so a stream of writes costs one receive per write.
//! The primary's side receives acknowledgements in bulk (see [`Conn::recv`]). Frames are sent through the link's
//! [`SendQueue`]: the encoded headers (copied, small) and the payload as
//! shared pool chunks, every frame queued meanwhile in the same `sendmsg`.

use std::cell::Cell;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use mirrorpoint_poller::{buffer_pool, sleep, IoBuf, IoBufMut};
use mirrorpoint_transport::{SplitRecv, TcpStream};

use super::sendq::SendQueue;

use super::wire::{
    Acceptor, Decoded, Established, Framer, HandshakeConfig, HandshakeError, Initiator, Message,
    MsgType, RequestTag, WireError,
};

/// Why a link failed.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    /// Socket I/O.
    #[error("i/o: {0}")]
    Io(#[from] io::Error),
    /// The peer sent something malformed.
    #[error("malformed frame: {0}")]
    Wire(#[from] WireError),
    /// Authentication or version negotiation failed.
    #[error("handshake: {0}")]
    Handshake(#[from] HandshakeError),
    /// The peer reported an error and closed.
    #[error("peer error {code:?}: {text}")]
    Peer {
        /// Code.
        code: super::wire::ErrorCode,
        /// Text.
        text: String,
    },
    /// Nothing arrived in time.
    #[error("timed out")]
    Timeout,
    /// Unexpected message.
    #[error("unexpected {0:?}")]
    Unexpected(MsgType),
    /// No pool buffer.
    #[error("no I/O buffer available")]
    NoBuffer,
}

/// Runs `f`, or gives up after `d`.
pub async fn timeout<F: Future>(d: Duration, f: F) -> Option<F::Output> {
    let mut f = std::pin::pin!(f);
    let mut s = std::pin::pin!(sleep(d));
    std::future::poll_fn(|cx: &mut Context<'_>| {
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

/// Runs every future to completion concurrently; outputs in order.
pub async fn join_all<T>(futs: Vec<Pin<Box<dyn Future<Output = T> + '_>>>) -> Vec<T> {
    let mut futs: Vec<Option<Pin<Box<dyn Future<Output = T> + '_>>>> =
        futs.into_iter().map(Some).collect();
    let mut out: Vec<Option<T>> = futs.iter().map(|_| None).collect();
    std::future::poll_fn(|cx: &mut Context<'_>| {
        let mut pending = false;
        for (slot, o) in futs.iter_mut().zip(out.iter_mut()) {
            if let Some(f) = slot {
                match f.as_mut().poll(cx) {
                    Poll::Ready(v) => {
                        *o = Some(v);
                        *slot = None;
                    }
                    Poll::Pending => pending = true,
                }
            }
        }
        if pending {
            Poll::Pending
        } else {
            Poll::Ready(())
        }
    })
    .await;
    out.into_iter().flatten().collect()
}

/// A received frame: its header bytes and payload (in a pool chunk).
pub struct RawFrame {
    head: Vec<u8>,
    payload: Option<IoBuf>,
}

impl RawFrame {
    /// Decodes (and checks both CRCs of) the frame.
    pub fn message(&self, framer: &Framer) -> Result<(RequestTag, Message<'_>), WireError> {
        let payload: &[u8] = self.payload.as_deref().unwrap_or(&[]);
        let frame = framer.decode_split(&self.head, payload)?;
        Ok((frame.header.tag, frame.message(framer.limits())?))
    }

    /// The payload, if the frame has one (bulk data is exactly it).
    pub fn payload(&self) -> Option<&IoBuf> {
        self.payload.as_ref()
    }

    /// The payload (for writes: it goes to the disk as is).
    pub fn take_payload(&mut self) -> Option<IoBuf> {
        self.payload.take()
    }
}

/// One site-to-site connection on the current reactor.
pub struct Conn {
    stream: std::rc::Rc<TcpStream>,
    framer: Cell<Framer>,
    tx: SendQueue,
    rx: std::cell::RefCell<RxBuf>,
    batched: Cell<bool>,
    /// The disk side's staging buffer (see [`Conn::recv`]).
    stage: Cell<Option<Stage>>,
    /// Peer's site name once authenticated.
    pub peer: std::cell::RefCell<String>,
}

impl Conn {
    /// Wraps a connected stream and starts its writer task.
    ///
    /// # Panics
    /// Off a reactor thread.
    pub fn new(stream: TcpStream) -> Conn {
        let stream = std::rc::Rc::new(stream);
        Conn {
            tx: SendQueue::new(&stream),
            stream,
            framer: Cell::new(Framer::default()),
            rx: std::cell::RefCell::new(RxBuf::default()),
            batched: Cell::new(false),
            stage: Cell::new(None),
            peer: std::cell::RefCell::new(String::new()),
        }
    }

    /// Connects to `addr` within `d`.
    pub async fn connect(addr: SocketAddr, d: Duration) -> Result<Conn, LinkError> {
        match timeout(d, TcpStream::connect(addr)).await {
            Some(Ok(s)) => Ok(Conn::new(s)),
            Some(Err(e)) => Err(e.into()),
            None => Err(LinkError::Timeout),
        }
    }

    /// Receive in bulk from now on (see [`Conn::recv`]): for links that
    /// receive small frames (the primary's side, acknowledgements). Payloads
    /// then are slices of shared chunks, not aligned for direct disk I/O.
    pub fn set_batched(&self) {
        self.batched.set(true);
    }

    /// The framer (version negotiated by the handshake).
    pub fn framer(&self) -> Framer {
        self.framer.get()
    }

    /// Tears the socket down now: pending receives and sends fail.
    pub fn abort(&self) {
        // SAFETY: shutdown(2) on a descriptor we own; no memory is passed.
        unsafe {
            libc::shutdown(self.stream.as_raw_fd(), libc::SHUT_RDWR);
        }
    }

    /// Sends one message; `payload` replaces the message's bulk data on the
    /// wire (same bytes, sent from the pool chunks without a copy). Returns
    /// once the frame is in the kernel. Dropping the future does not take
    /// the frame back: it is queued whole before the first await.
    pub async fn send(
        &self,
        tag: RequestTag,
        msg: &Message<'_>,
        payload: &[IoBuf],
    ) -> Result<(), LinkError> {
        let framer = self.framer.get();
        let head_len = msg.encoded_head_len();
        let n = self.tx.queue(|list| -> Result<(), LinkError> {
            list.append_with(|v| {
                let start = v.len();
                v.resize(start + head_len, 0);
                match msg.encode(&framer, tag, &mut v[start..]) {
                    Ok(enc) => {
                        v.truncate(start + enc.len);
                        if payload.is_empty() {
                            v.extend_from_slice(enc.trailer);
                        }
                        Ok(())
                    }
                    Err(e) => {
                        v.truncate(start);
                        Err(LinkError::Wire(e))
                    }
                }
            })?;
            for p in payload {
                list.push_chunk(p.clone());
            }
            Ok(())
        })?;
        self.tx.sent(n).await?;
        Ok(())
    }

    /// Receives one frame.
    ///
    /// In batched mode, bytes are received in bulk into a pool chunk and as many frames as
    /// arrived are cut out of it, their payloads being slices of that chunk
    /// (one receive for many small frames such as acknowledgements). A large
    /// payload is received straight into a chunk of its own instead, after
    /// moving the few bytes of it that already arrived; a partial small frame
    /// at the end of a chunk is moved to the next one. No payload is copied
    /// otherwise.
    pub async fn recv(&self) -> Result<RawFrame, LinkError> {
        if !self.batched.get() {
            return self.recv_exact_frame().await;
        }
        let framer = self.framer.get();
        loop {
            let (header, avail) = {
                let rx = self.rx.borrow();
                let bytes: &[u8] = rx.buf.as_deref().map_or(&[], |b| &b[rx.start..rx.end]);
                let avail = bytes.len();
                match framer.decode_head(bytes)? {
                    Decoded::NeedMore(_) => (None, avail),
                    Decoded::Complete { value, consumed } => (Some((value, consumed)), avail),
                }
            };
            if let Some((h, hl)) = header {
                let total = hl + h.payload_len as usize;
                let len = h.payload_len as usize;
                let step = {
                    let mut rx = self.rx.borrow_mut();
                    let start = rx.start;
                    let Some(buf) = rx.buf.clone() else {
                        return Err(LinkError::NoBuffer);
                    };
                    let head = buf[start..start + hl].to_vec();
                    if avail >= total {
                        rx.start += total;
                        let payload = (len > 0).then(|| buf.slice(start + hl, len)).flatten();
                        return Ok(RawFrame { head, payload });
                    }
                    if len > DIRECT_PAYLOAD {
                        // Large payload: its own chunk, straight from the socket.
                        rx.start = rx.end;
                        Some((head, buf[start + hl..start + avail].to_vec()))
                    } else {
                        None
                    }
                };
                if let Some((head, prefix)) = step {
                    let have = prefix.len();
                    let mut pb = alloc_wait(len).await?;
                    pb[..have].copy_from_slice(&prefix);
                    let (r, pb) = self.stream.recv_exact(pb, have..len).await;
                    r?;
                    return Ok(RawFrame {
                        head,
                        payload: Some(pb.freeze()),
                    });
                }
            }
            self.refill().await?;
        }
    }

    /// Receives one frame for the disk side of a link (the leg): its head
    /// from the staging buffer (received exactly, never into a payload), its
    /// payload into a chunk of its own (aligned for the disk). A `Write`'s
    /// payload is received with split receives that also bring up to one
    /// `Write` head of what follows into the staging buffer, so a stream of
    /// writes costs one receive per write instead of three (fixed header,
    /// message header, payload).
    async fn recv_exact_frame(&self) -> Result<RawFrame, LinkError> {
        let st = match self.stage.take() {
            Some(st) => st,
            None => Stage {
                buf: alloc_wait(STAGE_LEN).await?,
                pos: 0,
                end: 0,
                split: SplitRecv::new(),
            },
        };
        let (r, st) = self.recv_staged(st).await;
        self.stage.set(Some(st));
        r
    }

    /// [`Conn::recv_exact_frame`] on the staging buffer `st` (moved in and
    /// out: the ring owns its memory while a receive is in flight).
    async fn recv_staged(&self, mut st: Stage) -> (Result<RawFrame, LinkError>, Stage) {
        let framer = self.framer.get();
        // 1. The head: what is staged, then exactly the missing bytes.
        let (h, hl) = loop {
            match framer.decode_head(&st.buf[st.pos..st.end]) {
                Ok(Decoded::Complete { value, consumed }) => break (value, consumed),
                Ok(Decoded::NeedMore(n)) => {
                    let need = st.end - st.pos + n;
                    if need > st.buf.len() {
                        let e = WireError::BufferTooSmall {
                            needed: need,
                            available: st.buf.len(),
                        };
                        return (Err(e.into()), st);
                    }
                    if st.pos + need > st.buf.len() {
                        st.buf.copy_within(st.pos..st.end, 0);
                        st.end -= st.pos;
                        st.pos = 0;
                    }
                    let range = st.end..st.pos + need;
                    let (r, b) = self.stream.recv(st.buf, range).await;
                    st.buf = b;
                    match r {
                        Ok(0) => return (Err(eof()), st),
                        Ok(k) => st.end += k,
                        Err(e) if retry(&e) => {}
                        Err(e) => return (Err(e.into()), st),
                    }
                }
                Err(e) => return (Err(e.into()), st),
            }
        };
        let head = st.buf[st.pos..st.pos + hl].to_vec();
        st.consume(hl);
        let len = h.payload_len as usize;
        if len == 0 {
            let f = RawFrame {
                head,
                payload: None,
            };
            return (Ok(f), st);
        }
        // 2. The payload: what the last split receive brought of it (at
        // most a few bytes: staged bytes are heads), then the rest.
        let mut pb = match alloc_wait(len).await {
            Ok(b) => b,
            Err(e) => return (Err(e), st),
        };
        let have = st.staged().min(len);
        pb[..have].copy_from_slice(&st.buf[st.pos..st.pos + have]);
        st.consume(have);
        let tail = if h.msg_type == MsgType::Write {
            MsgType::Write.header_len()
        } else {
            // Other frames with payloads (handshake, agent requests) are
            // followed by nothing the peer sends before our answer; a
            // connection handed off after one keeps no staged bytes.
            0
        };
        let mut got = have;
        while got < len {
            // Nothing is staged here: the staging buffer is rewound.
            let tail_end = (st.end + tail).min(st.buf.len());
            let range = st.end..tail_end;
            let (r, p, b, sp) = self
                .stream
                .recv_split(pb, got..len, st.buf, range, st.split)
                .await;
            (pb, st.buf, st.split) = (p, b, sp);
            match r {
                Ok(0) => return (Err(eof()), st),
                Ok(k) => {
                    // The kernel fills the payload first.
                    let body = k.min(len - got);
                    got += body;
                    st.end += k - body;
                }
                Err(e) if retry(&e) => {}
                Err(e) => return (Err(e.into()), st),
            }
        }
        let f = RawFrame {
            head,
            payload: Some(pb.freeze()),
        };
        (Ok(f), st)
    }

    /// Receives more bytes into a fresh chunk, after moving the unparsed tail.
    async fn refill(&self) -> Result<(), LinkError> {
        let pool = buffer_pool();
        let cap = pool.chunk_size();
        let mut nb = alloc_wait(cap).await?;
        let left = {
            let rx = self.rx.borrow();
            let tail: &[u8] = rx.buf.as_deref().map_or(&[], |b| &b[rx.start..rx.end]);
            if tail.len() >= cap {
                return Err(LinkError::NoBuffer);
            }
            nb[..tail.len()].copy_from_slice(tail);
            tail.len()
        };
        let (r, nb) = self.stream.recv(nb, left..cap).await;
        let n = r?;
        if n == 0 {
            return Err(LinkError::Io(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "connection closed by peer",
            )));
        }
        let mut rx = self.rx.borrow_mut();
        rx.buf = Some(nb.freeze());
        rx.start = 0;
        rx.end = left + n;
        Ok(())
    }

    /// Sends an Error message and closes.
    pub async fn refuse(&self, msg: Message<'_>) {
        let _ = timeout(Duration::from_secs(1), self.send(RequestTag(0), &msg, &[])).await;
        self.abort();
    }

    /// Runs the initiator side of the handshake.
    pub async fn handshake_initiator(
        &self,
        cfg: HandshakeConfig,
        d: Duration,
    ) -> Result<Established, LinkError> {
        match timeout(d, self.initiator_inner(cfg)).await {
            Some(r) => r,
            None => Err(LinkError::Timeout),
        }
    }

    async fn initiator_inner(&self, cfg: HandshakeConfig) -> Result<Established, LinkError> {
        let (mut m, hello) = Initiator::start(cfg)?;
        self.send(RequestTag(0), &hello, &[]).await?;
        loop {
            let f = self.recv().await?;
            let (_, msg) = f.message(&self.framer.get())?;
            if let Message::Error(e) = &msg {
                return Err(LinkError::Peer {
                    code: e.code,
                    text: e.text.clone(),
                });
            }
            let step = match m.handle(&msg) {
                Ok(s) => s,
                Err(e) => {
                    self.refuse(e.to_wire()).await;
                    return Err(e.into());
                }
            };
            for s in &step.send {
                self.send(RequestTag(0), s, &[]).await?;
            }
            if let Some(est) = step.established {
                self.established(&est);
                return Ok(est);
            }
        }
    }

    /// Runs the acceptor side of the handshake.
    pub async fn handshake_acceptor(
        &self,
        cfg: HandshakeConfig,
        d: Duration,
    ) -> Result<Established, LinkError> {
        match timeout(d, self.acceptor_inner(cfg)).await {
            Some(r) => r,
            None => Err(LinkError::Timeout),
        }
    }

    async fn acceptor_inner(&self, cfg: HandshakeConfig) -> Result<Established, LinkError> {
        let mut m = Acceptor::new(cfg)?;
        loop {
            let f = match self.recv().await {
                Ok(f) => f,
                Err(LinkError::Wire(e)) => {
                    // Not our protocol, or another major version: say so.
                    let he = match e {
                        WireError::VersionMismatch { ours, theirs } => {
                            HandshakeError::VersionMismatch {
                                ours: super::wire::VersionRange::new(ours, ours)
                                    .unwrap_or(super::wire::VersionRange::CURRENT),
                                theirs: super::wire::VersionRange::new(theirs, theirs)
                                    .unwrap_or(super::wire::VersionRange::CURRENT),
                            }
                        }
                        _ => {
                            self.abort();
                            return Err(LinkError::Wire(e));
                        }
                    };
                    self.refuse(he.to_wire()).await;
                    return Err(he.into());
                }
                Err(e) => return Err(e),
            };
            let (_, msg) = f.message(&self.framer.get())?;
            let step = match m.handle(&msg) {
                Ok(s) => s,
                Err(e) => {
                    self.refuse(e.to_wire()).await;
                    return Err(e.into());
                }
            };
            for s in &step.send {
                self.send(RequestTag(0), s, &[]).await?;
            }
            if let Some(est) = step.established {
                self.established(&est);
                return Ok(est);
            }
        }
    }

    fn established(&self, est: &Established) {
        self.framer.set(self.framer.get().with_version(est.version));
        *self.peer.borrow_mut() = est.peer_name.to_string();
    }

    /// Gives the socket back as a std stream (to serve it off the reactors),
    /// or `None` if an operation still holds it.
    /// `None` too if bytes of a next frame were already received.
    pub fn into_std(self) -> Option<std::net::TcpStream> {
        let staged = self.stage.take().map_or(0, |st| st.staged());
        let batched = {
            let rx = self.rx.borrow();
            rx.end - rx.start
        };
        if staged + batched > 0 {
            return None;
        }
        let stream = self.stream.clone();
        // Ends the writer task; it holds the socket only while sending, and
        // every send this connection made has completed by now.
        drop(self);
        std::rc::Rc::try_unwrap(stream).ok()?.into_std().ok()
    }
}

/// Staging buffer of the disk side: frame heads (the largest is a few
/// hundred bytes) and what a split receive brings after a payload.
const STAGE_LEN: usize = 4096;

/// Bytes received ahead on the disk side: `buf[pos..end]` are staged (the
/// start of the next frame's head, received by a split receive with the
/// previous payload).
struct Stage {
    buf: IoBufMut,
    pos: usize,
    end: usize,
    split: Box<SplitRecv>,
}

impl Stage {
    fn staged(&self) -> usize {
        self.end - self.pos
    }

    fn consume(&mut self, n: usize) {
        self.pos = (self.pos + n).min(self.end);
        if self.pos == self.end {
            self.pos = 0;
            self.end = 0;
        }
    }
}

fn eof() -> LinkError {
    LinkError::Io(io::Error::new(
        io::ErrorKind::UnexpectedEof,
        "connection closed by peer",
    ))
}

fn retry(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EINTR | libc::EAGAIN))
}

/// Payloads larger than this are received into a chunk of their own.
const DIRECT_PAYLOAD: usize = 16 * 1024;

/// Received bytes not yet cut into frames: `buf[start..end]`.
#[derive(Default)]
pub struct RxBuf {
    buf: Option<IoBuf>,
    start: usize,
    end: usize,
}

/// A pool chunk of `len` bytes, waiting briefly for one to come free.
pub async fn alloc_wait(len: usize) -> Result<IoBufMut, LinkError> {
    let pool = buffer_pool();
    if len > pool.chunk_size() {
        return Err(LinkError::NoBuffer);
    }
    for _ in 0..5000 {
        if let Some(b) = pool.alloc(len) {
            return Ok(b);
        }
        sleep(Duration::from_millis(1)).await;
    }
    Err(LinkError::NoBuffer)
}

/// Nanoseconds since the Unix epoch.
pub fn now_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}
