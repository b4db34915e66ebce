//! Error paths of the userspace NVMe/TCP initiator that no correct target
//! produces, against a minimal fake controller built from the codec (a
//! blocking std socket per connection on a plain thread): a data digest
//! mismatch (fails one command, the queue lives on), a C2HTermReq, a
//! command timeout, C2HData outside the transfer and a corrupted header
//! digest (both answered with an H2CTermReq carrying the right FES), a
//! completion for a command not in flight, several R2Ts per write with
//! H2CData split at MAXH2CDATA, and answers cut at arbitrary points.

mod nvmf_host_common;

use mirrorpoint_poller::{buffer_pool, PoolConfig, ReactorConfig, Runtime, RuntimeConfig};
use mirrorpoint_target::nvmf::host::{ConnectOptions, Controller, HostError, IoQueue};
use mirrorpoint_target::nvmf::identify::{active_ns_list, IdentifyController, IdentifyNamespace};
use mirrorpoint_target::nvmf::pdu::{
    self, C2HData, CapsuleResp, Fes, IcResp, Pdu, PduConfig, R2t, TermReq,
};
use mirrorpoint_target::nvmf::spec::{Cap, CntlId, CommandId, Cqe, Nqn, Nsid, Sqe, Status};
use mirrorpoint_target::units::{BlockSize, ByteLen};
use nvmf_host_common::{pattern, runtime, CHUNK, HOSTNQN};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::thread::JoinHandle;
use std::time::Duration;

const NQN: &str = "nqn.2024-01.io.mirrorpoint:fake";

fn read_pdu(s: &mut TcpStream) -> Option<Vec<u8>> {
    let mut ch = [0u8; 8];
    s.read_exact(&mut ch).ok()?;
    let plen = u32::from_le_bytes(ch[4..8].try_into().ok()?) as usize;
    let mut v = ch.to_vec();
    v.resize(plen, 0);
    s.read_exact(&mut v[8..]).ok()?;
    Some(v)
}

fn send(s: &mut TcpStream, p: Pdu<'_>, cfg: &PduConfig) {
    s.write_all(&p.to_vec(cfg).expect("encode")).expect("send");
}

fn resp(s: &mut TcpStream, cqe: Cqe, cfg: &PduConfig) {
    send(s, Pdu::CapsuleResp(CapsuleResp { cqe }), cfg);
}

/// ICReq in, ICResp out (granting what was asked); the codec config.
fn ic(s: &mut TcpStream, maxh2cdata: u32) -> PduConfig {
    let v = read_pdu(s).expect("ICReq");
    let Pdu::IcReq(req) = pdu::decode(&v, &PduConfig::default()).expect("decode").pdu else {
        panic!("expected ICReq");
    };
    let cfg = PduConfig {
        hdgst: req.hdgst,
        ddgst: req.ddgst,
        max_h2c_data: maxh2cdata,
        ..PduConfig::default()
    };
    let r = IcResp {
        cpda: 0,
        hdgst: req.hdgst,
        ddgst: req.ddgst,
        maxh2cdata,
    };
    send(s, Pdu::IcResp(r), &PduConfig::default());
    cfg
}

/// The next command capsule.
fn capsule(s: &mut TcpStream, cfg: &PduConfig) -> Option<Sqe> {
    let v = read_pdu(s)?;
    match pdu::decode(&v, cfg).expect("host PDU").pdu {
        Pdu::CapsuleCmd(c) => Some(c.sqe),
        other => panic!("expected a capsule, got {:?}", other.pdu_type()),
    }
}

fn c2h(s: &mut TcpStream, cid: CommandId, offset: u32, data: &[u8], cfg: &PduConfig) {
    let d = C2HData {
        cid,
        offset,
        last: true,
        success: false,
        data,
    };
    send(s, Pdu::C2HData(d), cfg);
}

/// A good-enough admin queue: Connect, properties, Identify, Set Features.
fn serve_admin(mut s: TcpStream) {
    let cfg = ic(&mut s, 8192);
    while let Some(sqe) = capsule(&mut s, &cfg) {
        let cid = sqe.cid;
        let ok = Cqe::new(cid, Status::SUCCESS);
        if sqe.is_fabrics() {
            let mut cqe = ok;
            match sqe.fctype() {
                0x01 => cqe.dw0 = 1, // Connect: CNTLID 1
                0x04 => {
                    let off = sqe.cdw10_plus(1);
                    let v = match off {
                        0x00 => Cap {
                            mqes: 63,
                            cqr: true,
                            to: 1,
                            nssrs: false,
                            css: 1,
                            mpsmin: 0,
                            mpsmax: 0,
                        }
                        .to_u64(),
                        0x08 => 0x0001_0400,
                        0x1c => 1, // CSTS.RDY
                        _ => 0,
                    };
                    cqe.dw0 = v as u32;
                    cqe.dw1 = (v >> 32) as u32;
                }
                _ => {}
            }
            resp(&mut s, cqe, &cfg);
            continue;
        }
        match sqe.opcode {
            0x06 => {
                let img = match sqe.cdw10_plus(0) & 0xff {
                    0x01 => IdentifyController::tcp_io(
                        "FAKE",
                        "fake",
                        "1",
                        CntlId(1),
                        Nqn::new(NQN).expect("nqn"),
                        1,
                        4096,
                    )
                    .encode()
                    .expect("identify"),
                    0x02 => active_ns_list(&[Nsid(1)], Nsid(0)).expect("list"),
                    _ => {
                        IdentifyNamespace::new(ByteLen(1 << 20), BlockSize::B512, [1; 16]).encode()
                    }
                };
                c2h(&mut s, cid, 0, &img, &cfg);
                resp(&mut s, ok, &cfg);
            }
            0x09 => resp(
                &mut s,
                Cqe {
                    dw0: 3 | (3 << 16),
                    ..ok
                },
                &cfg,
            ),
            _ => resp(&mut s, ok, &cfg),
        }
    }
}

/// A fake controller: serves the admin queue, and runs `io` on the first
/// I/O queue connection after its ICResp and Connect.
fn fake(
    maxh2cdata: u32,
    io: impl FnOnce(TcpStream, PduConfig) + Send + 'static,
) -> (SocketAddr, JoinHandle<()>) {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = l.local_addr().expect("addr");
    let t = std::thread::spawn(move || {
        let (admin, _) = l.accept().expect("admin accept");
        let a = std::thread::spawn(move || serve_admin(admin));
        let (mut s, _) = l.accept().expect("io accept");
        let cfg = ic(&mut s, maxh2cdata);
        let sqe = capsule(&mut s, &cfg).expect("connect");
        resp(&mut s, Cqe::new(sqe.cid, Status::SUCCESS), &cfg);
        io(s, cfg);
        let _ = a.join();
    });
    (addr, t)
}

fn options(digests: bool) -> ConnectOptions {
    ConnectOptions {
        header_digest: digests,
        data_digest: digests,
        keep_alive: Duration::ZERO,
        command_timeout: Duration::from_secs(10),
        ..ConnectOptions::default()
    }
}

/// Connects a controller and I/O queue 1 to the fake and runs `body`.
fn with_queue<F, Fut>(addr: SocketAddr, opts: ConnectOptions, body: F)
where
    F: FnOnce(IoQueue) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + 'static,
{
    with_queue_on(runtime(vec![0]), addr, opts, body);
}

/// [`with_queue`] on a given runtime (its pool's chunk size bounds the
/// host's receive staging).
fn with_queue_on<F, Fut>(rt: Runtime, addr: SocketAddr, opts: ConnectOptions, body: F)
where
    F: FnOnce(IoQueue) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + 'static,
{
    rt.handles()[0]
        .block_on(move || async move {
            let c = Controller::connect(addr, NQN, HOSTNQN, opts)
                .await
                .expect("connect");
            assert_eq!(
                c.info().namespace(1).expect("ns").block_size,
                BlockSize::B512
            );
            let q = IoQueue::connect(c.info(), 1, 8).await.expect("io queue");
            body(q).await;
            drop(c);
        })
        .expect("reactor");
}

async fn read8(q: &IoQueue) -> Result<Vec<u8>, HostError> {
    let b = buffer_pool().alloc(4096).expect("chunk");
    let (r, b) = q.read(1, 0, 8, b).await;
    r.map(|()| b.to_vec())
}

/// Reads the H2CTermReq the host sends: (FES, FEI).
fn term_req(s: &mut TcpStream, cfg: &PduConfig) -> (u16, u32) {
    let v = read_pdu(s).expect("H2CTermReq");
    match pdu::decode(&v, cfg).expect("decode").pdu {
        Pdu::H2CTermReq(t) => (t.fes, t.fei),
        other => panic!("expected H2CTermReq, got {:?}", other.pdu_type()),
    }
}

#[test]
fn data_digest_mismatch_fails_one_command() {
    let (addr, t) = fake(8192, |mut s, cfg| {
        let sqe = capsule(&mut s, &cfg).expect("read 1");
        let mut v = Pdu::C2HData(C2HData {
            cid: sqe.cid,
            offset: 0,
            last: true,
            success: false,
            data: &[0x11; 4096],
        })
        .to_vec(&cfg)
        .expect("encode");
        let n = v.len();
        v[n - 1] ^= 0xff; // corrupt the data digest
        s.write_all(&v).expect("send");
        resp(&mut s, Cqe::new(sqe.cid, Status::SUCCESS), &cfg);
        let sqe = capsule(&mut s, &cfg).expect("read 2");
        c2h(&mut s, sqe.cid, 0, &[0x22; 4096], &cfg);
        resp(&mut s, Cqe::new(sqe.cid, Status::SUCCESS), &cfg);
        while capsule(&mut s, &cfg).is_some() {}
    });
    with_queue(addr, options(true), |q| async move {
        let e = read8(&q).await.expect_err("corrupted read");
        assert!(matches!(e, HostError::DataDigest { .. }), "{e}");
        assert_eq!(read8(&q).await.expect("second read"), vec![0x22; 4096]);
        assert!(q.error().is_none());
        assert_eq!(q.stats().data_digest_errors, 1);
    });
    t.join().expect("fake");
}

/// Answers that arrive coalesced and cut anywhere (a greedy receive may end
/// mid-head, mid-data or mid-digest, and the staging area fills up) are
/// parsed in order: eight reads in flight, each answered with two C2HData
/// pieces and a CapsuleResp. With the pool's usual 128 KiB chunks (one read
/// larger than the 32 KiB staging area) the stream goes out in pieces of 1
/// byte to 9 KiB; with 8 KiB chunks (8 KiB of staging) the C2HData pieces
/// are 512 bytes and every write ends a few bytes into a PDU head, so the
/// staging area fills with unparsed heads and must wrap.
#[test]
fn answers_cut_anywhere_are_parsed_in_order() {
    for (digests, chunk) in [(false, CHUNK), (true, CHUNK), (false, 8192), (true, 8192)] {
        let (addr, t) = fake(8192, move |mut s, cfg| {
            s.set_nodelay(true).expect("nodelay");
            let small_staging = chunk < CHUNK;
            let mut out = Vec::new();
            let mut pdu_ends = Vec::new();
            for _ in 0..8 {
                let sqe = capsule(&mut s, &cfg).expect("read");
                let slba = u64::from(sqe.cdw10_plus(0));
                let len = ((sqe.cdw10_plus(2) & 0xffff) as usize + 1) * 512;
                let data = pattern(slba, len);
                let piece_len = if small_staging { 512 } else { len / 2 };
                for (i, piece) in data.chunks(piece_len).enumerate() {
                    let d = C2HData {
                        cid: sqe.cid,
                        offset: (i * piece_len) as u32,
                        last: (i + 1) * piece_len >= len,
                        success: false,
                        data: piece,
                    };
                    out.extend(Pdu::C2HData(d).to_vec(&cfg).expect("encode"));
                    pdu_ends.push(out.len());
                }
                let cqe = Cqe::new(sqe.cid, Status::SUCCESS);
                let r = Pdu::CapsuleResp(CapsuleResp { cqe });
                out.extend(r.to_vec(&cfg).expect("encode"));
                pdu_ends.push(out.len());
            }
            let mut x = 0x2545_F491_4F6C_DD1Du64 ^ chunk as u64;
            let mut at = 0;
            let mut next_pdu = 0;
            while at < out.len() {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let end = if small_staging {
                    // A few PDUs, then a few bytes into the next head.
                    next_pdu = (next_pdu + 1 + (x % 3) as usize).min(pdu_ends.len() - 1);
                    (pdu_ends[next_pdu] + 1 + (x % 20) as usize).min(out.len())
                } else {
                    let n = if x % 3 == 0 { 1 + x % 24 } else { 1 + x % 9216 } as usize;
                    (at + n).min(out.len())
                };
                s.write_all(&out[at..end]).expect("send");
                at = end;
                if small_staging || x % 4 == 0 {
                    // Let the host take this piece alone.
                    std::thread::sleep(Duration::from_micros(300));
                }
            }
            while capsule(&mut s, &cfg).is_some() {}
        });
        let rt = Runtime::start(RuntimeConfig {
            cores: vec![0],
            reactor: ReactorConfig {
                pool: PoolConfig {
                    chunk_size: chunk,
                    chunk_count: 64,
                    huge_pages: false,
                },
                ..ReactorConfig::default()
            },
            pin: false,
        })
        .expect("runtime");
        with_queue_on(rt, addr, options(digests), move |q| async move {
            let q = std::rc::Rc::new(q);
            let reads: Vec<_> = (0..8u64)
                .map(|i| {
                    let q = q.clone();
                    mirrorpoint_poller::spawn(async move {
                        let blocks: u32 = if i == 3 && chunk == CHUNK { 128 } else { 8 };
                        let len = blocks as usize * 512;
                        let b = buffer_pool().alloc(len).expect("chunk");
                        let (r, b) = q.read(1, i * 200, blocks, b).await;
                        r.unwrap_or_else(|e| panic!("read {i}: {e}"));
                        assert!(*b == pattern(i * 200, len)[..], "read {i} got other data");
                    })
                })
                .collect();
            for r in reads {
                r.await;
            }
            assert!(q.error().is_none());
            let pieces = if chunk < CHUNK { 8 * 8 } else { 8 * 2 };
            assert_eq!(q.stats().c2h_data_pdus, pieces);
        });
        t.join().expect("fake");
    }
}

#[test]
fn c2h_term_req_kills_the_queue() {
    let (addr, t) = fake(8192, |mut s, cfg| {
        let _ = capsule(&mut s, &cfg).expect("read");
        let tr = TermReq {
            fes: Fes::InvalidHeaderField as u16,
            fei: 5,
            data: &[0; 24],
        };
        send(&mut s, Pdu::C2HTermReq(tr), &cfg);
        let mut rest = Vec::new();
        let _ = s.read_to_end(&mut rest);
    });
    with_queue(addr, options(false), |q| async move {
        let e = read8(&q).await.expect_err("terminated");
        assert!(
            matches!(e.root(), HostError::Terminated { fes: 1, fei: 5 }),
            "{e}"
        );
        assert!(q.error().is_some());
        let e = read8(&q).await.expect_err("dead queue");
        assert!(matches!(e, HostError::Dead(_)), "{e}");
    });
    t.join().expect("fake");
}

#[test]
fn a_timed_out_command_kills_the_queue() {
    let (addr, t) = fake(8192, |mut s, cfg| {
        let _ = capsule(&mut s, &cfg).expect("read");
        // Never answer; the host must give up and close.
        let mut rest = Vec::new();
        let _ = s.read_to_end(&mut rest);
    });
    let opts = ConnectOptions {
        command_timeout: Duration::from_millis(300),
        ..options(false)
    };
    with_queue(addr, opts, |q| async move {
        let t0 = std::time::Instant::now();
        let e = read8(&q).await.expect_err("timeout");
        assert!(matches!(e.root(), HostError::Timeout(_)), "{e}");
        assert!(t0.elapsed() < Duration::from_secs(5));
        assert!(q.error().is_some());
    });
    t.join().expect("fake saw the host close");
}

#[test]
fn c2h_data_outside_the_transfer_is_a_protocol_error() {
    let (addr, t) = fake(8192, |mut s, cfg| {
        let sqe = capsule(&mut s, &cfg).expect("read");
        c2h(&mut s, sqe.cid, 4096, &[0x33; 512], &cfg);
        let (fes, _) = term_req(&mut s, &cfg);
        assert_eq!(fes, Fes::DataOutOfRange as u16);
    });
    with_queue(addr, options(true), |q| async move {
        let e = read8(&q).await.expect_err("out of range");
        assert!(
            matches!(
                e.root(),
                HostError::Protocol(pdu::PduError::DataOutOfRange { .. })
            ),
            "{e}"
        );
    });
    t.join().expect("fake got the H2CTermReq");
}

#[test]
fn corrupted_header_digest_is_answered_with_term_req() {
    let (addr, t) = fake(8192, |mut s, cfg| {
        let sqe = capsule(&mut s, &cfg).expect("read");
        let mut v = Pdu::CapsuleResp(CapsuleResp {
            cqe: Cqe::new(sqe.cid, Status::SUCCESS),
        })
        .to_vec(&cfg)
        .expect("encode");
        v[24] ^= 0x01; // first byte of the header digest
        s.write_all(&v).expect("send");
        let received = u32::from_le_bytes(v[24..28].try_into().expect("4 bytes"));
        let (fes, fei) = term_req(&mut s, &cfg);
        assert_eq!(fes, Fes::HeaderDigestError as u16);
        assert_eq!(fei, received);
    });
    with_queue(addr, options(true), |q| async move {
        let e = read8(&q).await.expect_err("header digest");
        assert!(
            matches!(
                e.root(),
                HostError::Protocol(pdu::PduError::HeaderDigest { .. })
            ),
            "{e}"
        );
    });
    t.join().expect("fake got the H2CTermReq");
}

#[test]
fn completion_for_a_command_not_in_flight_kills_the_queue() {
    let (addr, t) = fake(8192, |mut s, cfg| {
        let sqe = capsule(&mut s, &cfg).expect("read");
        resp(
            &mut s,
            Cqe::new(CommandId(sqe.cid.0 ^ 0x40), Status::SUCCESS),
            &cfg,
        );
        let mut rest = Vec::new();
        let _ = s.read_to_end(&mut rest);
    });
    with_queue(addr, options(false), |q| async move {
        let e = read8(&q).await.expect_err("stray completion");
        assert!(matches!(e.root(), HostError::Unexpected(_)), "{e}");
    });
    t.join().expect("fake");
}

fn r2t_pieces(exhaust_pool: bool) {
    let want = pattern(9, 32768);
    let expect = want.clone();
    let (addr, t) = fake(8192, move |mut s, cfg| {
        let sqe = capsule(&mut s, &cfg).expect("write");
        let mut got = vec![0u8; 32768];
        let mut pieces = Vec::new();
        for (ttag, offset) in [(7u16, 0u32), (9, 16384)] {
            let r = R2t {
                cid: sqe.cid,
                ttag,
                offset,
                len: 16384,
            };
            send(&mut s, Pdu::R2t(r), &cfg);
            loop {
                let v = read_pdu(&mut s).expect("H2CData");
                let Pdu::H2CData(d) = pdu::decode(&v, &cfg).expect("decode").pdu else {
                    panic!("expected H2CData");
                };
                assert_eq!((d.cid, d.ttag), (sqe.cid, ttag));
                assert!(d.data.len() <= 8192);
                let o = d.offset as usize;
                got[o..o + d.data.len()].copy_from_slice(d.data);
                pieces.push((d.offset, d.data.len(), d.last));
                if d.last {
                    break;
                }
            }
        }
        assert_eq!(
            pieces,
            vec![
                (0, 8192, false),
                (8192, 8192, true),
                (16384, 8192, false),
                (24576, 8192, true)
            ]
        );
        assert!(got == expect, "written data differs");
        resp(&mut s, Cqe::new(sqe.cid, Status::SUCCESS), &cfg);
        while capsule(&mut s, &cfg).is_some() {}
    });
    with_queue(addr, options(true), move |q| async move {
        let mut b = buffer_pool().alloc(32768).expect("chunk");
        b.copy_from_slice(&want);
        // With the pool drained the send task cannot take a scratch chunk and
        // falls back to one payload per sendmsg, its digest carried over.
        let hog: Vec<_> = if exhaust_pool {
            std::iter::from_fn(|| buffer_pool().alloc(4096)).collect()
        } else {
            Vec::new()
        };
        q.write(1, 0, b.freeze()).await.expect("write");
        drop(hog);
        let st = q.stats();
        assert_eq!((st.r2ts, st.h2c_data_pdus, st.in_capsule_writes), (2, 4, 0));
        // Connect and write capsules, then per R2T: both pieces in one gathered
        // sendmsg; or, without scratch, header+payload twice, the last digest alone.
        assert_eq!(st.send_ops, if exhaust_pool { 8 } else { 4 }, "{st:?}");
    });
    t.join().expect("fake");
}

#[test]
fn r2ts_are_answered_in_maxh2cdata_pieces() {
    r2t_pieces(false);
}

#[test]
fn r2t_pieces_without_a_scratch_chunk() {
    r2t_pieces(true);
}

/// Never panics on what a target sends: valid responses to two reads and a
/// write, with a few bytes flipped (or the stream cut short), for many seeds;
/// every command must end (Ok or a typed error) once the fake hangs up.
#[test]
fn mutated_target_input_never_panics_or_hangs() {
    for seed in 1..=32u64 {
        let digests = seed % 2 == 0;
        let (addr, t) = fake(8192, move |mut s, cfg| {
            let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
            let mut rnd = move || {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x
            };
            let mut out = Vec::new();
            for _ in 0..3 {
                let Some(sqe) = capsule(&mut s, &cfg) else {
                    return;
                };
                if sqe.opcode == 0x02 {
                    let d = C2HData {
                        cid: sqe.cid,
                        offset: 0,
                        last: true,
                        success: seed % 3 == 0 && !cfg.ddgst,
                        data: &[0x5a; 4096],
                    };
                    out.extend(Pdu::C2HData(d).to_vec(&cfg).expect("encode"));
                    if seed % 3 != 0 || cfg.ddgst {
                        out.extend(
                            Pdu::CapsuleResp(CapsuleResp {
                                cqe: Cqe::new(sqe.cid, Status::SUCCESS),
                            })
                            .to_vec(&cfg)
                            .expect("encode"),
                        );
                    }
                } else {
                    let r = R2t {
                        cid: sqe.cid,
                        ttag: 1,
                        offset: 0,
                        len: 4096,
                    };
                    out.extend(Pdu::R2t(r).to_vec(&cfg).expect("encode"));
                }
            }
            // Flip up to three bytes among the headers (the first 64 bytes of
            // each 128-byte window, where fields live), or cut the stream.
            for _ in 0..1 + rnd() % 3 {
                let i = (rnd() as usize) % out.len();
                out[i] ^= (rnd() as u8) | 1;
            }
            if rnd() % 4 == 0 {
                let keep = (rnd() as usize) % out.len();
                out.truncate(keep);
            }
            let _ = s.write_all(&out);
            std::thread::sleep(Duration::from_millis(20));
            let _ = s.shutdown(std::net::Shutdown::Both);
        });
        let opts = ConnectOptions {
            command_timeout: Duration::from_secs(3),
            ..options(digests)
        };
        // The fake answers with in-capsule write data disabled so the write
        // waits for the (possibly mutated) R2T.
        let opts = ConnectOptions {
            in_capsule_writes: false,
            ..opts
        };
        with_queue(addr, opts, move |q| async move {
            let q = std::rc::Rc::new(q);
            let mut tasks = Vec::new();
            for i in 0..2u64 {
                let q = q.clone();
                tasks.push(mirrorpoint_poller::spawn(async move {
                    let b = buffer_pool().alloc(4096).expect("chunk");
                    q.read(1, i * 8, 8, b).await.0.err()
                }));
            }
            let q2 = q.clone();
            tasks.push(mirrorpoint_poller::spawn(async move {
                let b = buffer_pool().alloc(4096).expect("chunk");
                q2.write(1, 64, b.freeze()).await.err()
            }));
            for t in tasks {
                if let Some(e) = t.await {
                    eprintln!("seed {seed}: {}", e.root());
                }
            }
        });
        t.join().expect("fake");
    }
}
