//! TCP over the reactor ring with real sockets on 127.0.0.1: echo on one and
//! across two reactors, vectored sends with partial I/O, greedy receives,
//! error cases, and runtime shutdown with pending socket ops.

mod common;

use common::*;
use mirrorpoint_poller::{buffer_pool, current_index, spawn, IoBuf, OneshotReceiver};
use mirrorpoint_transport::{
    hand_off, Acceptor, BatchRecv, SendList, SplitRecv, TcpListener, TcpStream,
};
use std::io;
use std::net::Shutdown;
use std::rc::Rc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const MIB: usize = 1024 * 1024;

/// Client side of an echo check: sends a pattern while reading it back.
async fn echo_client(addr: std::net::SocketAddr, seed: u8, total: usize) -> io::Result<usize> {
    let stream = Rc::new(TcpStream::connect(addr).await?);
    assert!(stream.nodelay()?, "TCP_NODELAY is on by default");
    let tx = stream.clone();
    let sender = spawn(async move { send_pattern(&tx, seed, total, 100_000).await });
    let got = check_pattern(&stream, seed, &[CHUNK, 4093, 1, 65_521, 777]).await?;
    sender.await?;
    Ok(got)
}

#[test]
fn echo_on_one_reactor() {
    let rt = runtime(1);
    let total = 4 * MIB + 12_345;
    let (got, echoed) = run(&rt.handles()[0], 30, move || async move {
        let listener = TcpListener::bind(localhost()).expect("bind");
        assert_ne!(
            getsockopt_int(&listener, libc::SOL_SOCKET, libc::SO_REUSEADDR),
            0,
            "listeners reuse addresses"
        );
        let addr = listener.local_addr().expect("addr");
        let server = spawn(async move {
            let (stream, peer) = listener.accept().await?;
            assert_eq!(peer, stream.peer_addr()?);
            echo(stream).await
        });
        let got = echo_client(addr, 1, total).await.expect("client");
        (got, server.await.expect("server"))
    });
    assert_eq!(got, total);
    assert_eq!(echoed, total);
}

#[test]
fn acceptor_spreads_connections_over_reactors() {
    let rt = runtime(2);
    let targets = rt.handles().to_vec();
    let seen: Arc<Mutex<Vec<usize>>> = Arc::default();
    let seen2 = seen.clone();
    let results = run(&rt.handles()[0], 30, move || async move {
        let listener = TcpListener::bind(localhost()).expect("bind");
        let acceptor = Acceptor::new(listener, targets).expect("acceptor");
        let addr = acceptor.local_addr().expect("addr");
        let accepting = spawn(async move {
            acceptor
                .run(move |stream, _peer| {
                    let seen = seen2.clone();
                    async move {
                        seen.lock()
                            .expect("lock")
                            .push(current_index().unwrap_or(99));
                        let _ = echo(stream).await;
                    }
                })
                .await
        });
        let clients: Vec<_> = (0..4u8)
            .map(|i| spawn(echo_client(addr, 10 + i, 2 * MIB + usize::from(i) * 1000)))
            .collect();
        let mut results = Vec::new();
        for c in clients {
            results.push(c.await);
        }
        drop(accepting); // cancels the pending accept
        results
    });
    for (i, r) in results.into_iter().enumerate() {
        assert_eq!(r.expect("client"), 2 * MIB + i * 1000);
    }
    let mut seen = seen.lock().expect("lock").clone();
    seen.sort();
    assert_eq!(seen, vec![0, 0, 1, 1], "round-robin over both reactors");
}

#[test]
fn hand_off_runs_the_connection_on_the_other_reactor() {
    let rt = runtime(2);
    let other = rt.handles()[1].clone();
    let total = 3 * MIB + 7;
    let (got, served_on, echoed) = run(&rt.handles()[0], 30, move || async move {
        let listener = TcpListener::bind(localhost()).expect("bind");
        let addr = listener.local_addr().expect("addr");
        let client = spawn(echo_client(addr, 42, total));
        let (stream, _) = listener.accept().await.expect("accept");
        let (tx, rx) = mirrorpoint_poller::oneshot();
        hand_off(stream, &other, move |s| async move {
            let here = current_index();
            tx.send((here, echo(s).await.map_err(|e| e.to_string())));
        })
        .expect("hand off");
        let got = client.await.expect("client");
        let (here, echoed) = rx.await.expect("served");
        (got, here, echoed)
    });
    assert_eq!(got, total);
    assert_eq!(served_on, Some(1));
    assert_eq!(echoed, Ok(total));
}

#[test]
fn hand_off_refuses_a_stream_an_abandoned_op_still_holds() {
    let rt = runtime(2);
    let other = rt.handles()[1].clone();
    let (busy, moved_ok) = run(&rt.handles()[0], 10, move || async move {
        let listener = TcpListener::bind(localhost()).expect("bind");
        let addr = listener.local_addr().expect("addr");
        let client = TcpStream::connect(addr).await.expect("connect");
        let (server, _) = listener.accept().await.expect("accept");
        // A receive that is dropped while the kernel still holds it.
        let buf = buffer_pool().alloc(64).expect("chunk");
        assert!(timeout(Duration::from_millis(10), server.recv(buf, 0..64))
            .await
            .is_none());
        let server = match hand_off(server, &other, |_s| async {}) {
            Err(mirrorpoint_transport::HandoffError::Busy(s)) => s,
            other => panic!("expected Busy, got {other:?}"),
        };
        // Once the abandoned receive completes (data arrives), it lets go.
        client.send_all(pattern_buf(0, 0, 8)).await.0.expect("send");
        mirrorpoint_poller::sleep(Duration::from_millis(20)).await;
        let (tx, rx) = mirrorpoint_poller::oneshot();
        let moved = hand_off(server, &other, move |s| async move {
            tx.send(s.peer_addr().is_ok());
        });
        (true, moved.is_ok() && rx.await == Ok(true))
    });
    assert!(busy);
    assert!(moved_ok, "the stream moves once the op has completed");
}

/// The stream carried by one vectored message: header then payload pieces.
fn flatten(header: &[u8], payload: &[IoBuf]) -> Vec<u8> {
    let mut v = header.to_vec();
    for p in payload {
        v.extend_from_slice(p);
    }
    v
}

/// What is left of `header` + `payload` after the first `n` bytes.
fn remainder(header: &[u8], payload: &[IoBuf], mut n: usize) -> (Vec<u8>, Vec<IoBuf>) {
    let h = n.min(header.len());
    n -= h;
    let mut rest = Vec::new();
    for p in payload {
        let skip = n.min(p.len());
        n -= skip;
        rest.push(p.slice(skip, p.len() - skip).expect("in range"));
    }
    (header[h..].to_vec(), rest)
}

#[test]
fn vectored_sends_arrive_intact_with_partial_sends_and_odd_reads() {
    let rt = runtime(1);
    let ok = run(&rt.handles()[0], 30, || async {
        let listener = TcpListener::bind(localhost()).expect("bind");
        small_buffers(&listener);
        let addr = listener.local_addr().expect("addr");
        let client = TcpStream::connect(addr).await.expect("connect");
        small_buffers(&client);
        let (server, _) = listener.accept().await.expect("accept");

        // Payload views at odd offsets and lengths of three chunks.
        let a = pattern_buf(1, 0, CHUNK);
        let b = pattern_buf(2, 0, 70_001);
        let c = pattern_buf(3, 5, 9);
        let payload = vec![
            a.slice(3, 100_001).expect("a"),
            b.clone(),
            c.slice(1, 5).expect("c"),
        ];
        let header: Vec<u8> = (0..37u8).collect();
        let one = flatten(&header, &payload);

        // One sendmsg into tiny socket buffers with nobody reading: partial.
        let n = client
            .send_vectored(&header, &payload)
            .await
            .expect("sendmsg");
        assert!(
            n > 0 && n < one.len(),
            "expected a partial send, got {n} of {}",
            one.len()
        );
        let mut expected = one.clone();

        // The receiver reads in odd-sized pieces while the rest goes out.
        let reader = spawn(async move {
            let mut got = Vec::new();
            let mut buf = buffer_pool().alloc(CHUNK).expect("chunk");
            let sizes = [1usize, 7, 4093, 13, 65_521, 3, 2048];
            for step in 0.. {
                let want = sizes[step % sizes.len()];
                let (r, b) = server.recv(buf, 5..5 + want).await;
                buf = b;
                match r {
                    Ok(0) => break,
                    Ok(n) => got.extend_from_slice(&buf[5..5 + n]),
                    Err(e) => return Err(e),
                }
            }
            Ok(got)
        });
        let (h, rest) = remainder(&header, &payload, n);
        client
            .send_vectored_all(&h, &rest)
            .await
            .expect("rest of the first message");
        for i in 0..12u8 {
            let header = vec![i; 1 + usize::from(i) * 3];
            client
                .send_vectored_all(&header, &payload)
                .await
                .expect("message");
            expected.extend_from_slice(&flatten(&header, &payload));
        }
        // Header only, payload only, and nothing at all.
        client
            .send_vectored_all(b"tail", &[])
            .await
            .expect("header only");
        client
            .send_vectored_all(&[], std::slice::from_ref(&c))
            .await
            .expect("payload only");
        client.send_vectored_all(&[], &[]).await.expect("empty");
        expected.extend_from_slice(b"tail");
        expected.extend_from_slice(&c);
        client.shutdown(Shutdown::Write).await.expect("fin");
        let got = reader.await.expect("reader");
        got.len() == expected.len() && got == expected
    });
    assert!(ok, "the byte stream differs from what was sent");
}

#[test]
fn eof_mid_frame_is_unexpected_eof_and_clean_eof_is_zero() {
    let rt = runtime(1);
    let (mid, clean, kept) = run(&rt.handles()[0], 10, || async {
        let listener = TcpListener::bind(localhost()).expect("bind");
        let addr = listener.local_addr().expect("addr");
        let client = TcpStream::connect(addr).await.expect("connect");
        let (server, _) = listener.accept().await.expect("accept");
        server
            .send_all(pattern_buf(9, 0, 100))
            .await
            .0
            .expect("send");
        server.shutdown(Shutdown::Write).await.expect("fin");
        let buf = buffer_pool().alloc(200).expect("chunk");
        let (mid, buf) = client.recv_exact(buf, 0..200).await;
        let kept = (0..100).all(|i| buf[i] == pattern_byte(9, i));
        let (clean, _) = client.recv(buf, 0..200).await;
        (mid.map_err(|e| e.kind()), clean.map_err(|e| e.kind()), kept)
    });
    assert_eq!(mid, Err(io::ErrorKind::UnexpectedEof));
    assert_eq!(clean, Ok(0));
    assert!(kept, "the bytes before the EOF landed in the buffer");
}

/// `recv_at_least` waits for its minimum, takes whatever else has already
/// arrived (up to the range's end), and calls an end of stream before the
/// minimum `UnexpectedEof`.
#[test]
fn recv_at_least_takes_what_has_arrived() {
    let rt = runtime(1);
    let (first, second, third, kept) = run(&rt.handles()[0], 10, || async {
        let listener = TcpListener::bind(localhost()).expect("bind");
        let addr = listener.local_addr().expect("addr");
        let client = TcpStream::connect(addr).await.expect("connect");
        let (server, _) = listener.accept().await.expect("accept");
        server
            .send_all(pattern_buf(5, 0, 300))
            .await
            .0
            .expect("send");
        // Let all 300 bytes arrive, then ask for at least 10 of at most 200.
        mirrorpoint_poller::sleep(Duration::from_millis(20)).await;
        let buf = buffer_pool().alloc(400).expect("chunk");
        let (first, buf) = client.recv_at_least(buf, 0..200, 10).await;
        // The other 100 arrived already; a minimum above them waits for more.
        let sender = spawn(async move {
            mirrorpoint_poller::sleep(Duration::from_millis(20)).await;
            server
                .send_all(pattern_buf(5, 300, 50))
                .await
                .0
                .expect("send");
            server.shutdown(Shutdown::Write).await.expect("fin");
        });
        let (second, buf) = client.recv_at_least(buf, 200..400, 150).await;
        sender.await;
        let kept = (0..350).all(|i| buf[i] == pattern_byte(5, i));
        let (third, _) = client.recv_at_least(buf, 0..10, 1).await;
        (first, second, third.map_err(|e| e.kind()), kept)
    });
    assert_eq!(first.expect("first"), 200);
    assert_eq!(second.expect("second"), 150);
    assert_eq!(third, Err(io::ErrorKind::UnexpectedEof));
    assert!(kept, "the bytes landed in stream order");
}

/// `recv_batch` lays (head, body) pairs over the stage and the chunks and
/// the rest over the stage's tail, takes only what has arrived
/// (`WouldBlock` when nothing has), and refuses a layout that does not fit.
#[test]
fn batch_receive_lands_each_body_in_its_chunk() {
    const HEAD: usize = 8;
    const BODY: usize = 24;
    const STRIDE: usize = HEAD + BODY;
    let rt = runtime(1);
    let (idle, misfit, got, stage_ok, chunks_ok) = run(&rt.handles()[0], 10, || async {
        let listener = TcpListener::bind(localhost()).expect("bind");
        let addr = listener.local_addr().expect("addr");
        let client = TcpStream::connect(addr).await.expect("connect");
        let (server, _) = listener.accept().await.expect("accept");
        let mut stage = buffer_pool().alloc(4096).expect("stage");
        stage.set_len(4 * STRIDE + 16);
        let chunks: Vec<_> = (0..4)
            .map(|_| buffer_pool().alloc(BODY).expect("chunk"))
            .collect();
        let batch = BatchRecv::new(4);
        // Nothing sent yet: the batch receive does not wait.
        let (idle, stage, chunks, batch) = client
            .recv_batch(stage, HEAD, BODY, chunks, 4 * STRIDE + 16, batch)
            .await;
        // A tail past the stage's end does not fit.
        let (misfit, stage, chunks, batch) = client
            .recv_batch(stage, HEAD, BODY, chunks, 4 * STRIDE + 17, batch)
            .await;
        // Three whole messages and half of a fourth.
        let sent = 3 * STRIDE + STRIDE / 2;
        server
            .send_all(pattern_buf(9, 0, sent))
            .await
            .0
            .expect("send");
        mirrorpoint_poller::sleep(Duration::from_millis(20)).await;
        let (got, stage, chunks, _) = client
            .recv_batch(stage, HEAD, BODY, chunks, 4 * STRIDE + 16, batch)
            .await;
        let n = *got.as_ref().unwrap_or(&0);
        // Stream byte `s` is in the stage at `s` for heads, in chunk `s / STRIDE`
        // for bodies.
        let stage_ok = (0..n.min(4 * STRIDE))
            .filter(|s| s % STRIDE < HEAD)
            .all(|s| stage[s] == pattern_byte(9, s));
        let chunks_ok = (0..n.min(4 * STRIDE))
            .filter(|s| s % STRIDE >= HEAD)
            .all(|s| chunks[s / STRIDE][s % STRIDE - HEAD] == pattern_byte(9, s));
        (
            idle.map_err(|e| e.kind()),
            misfit.map_err(|e| e.kind()),
            got.map_err(|e| e.kind()),
            stage_ok,
            chunks_ok,
        )
    });
    assert_eq!(idle, Err(io::ErrorKind::WouldBlock));
    assert_eq!(misfit, Err(io::ErrorKind::InvalidInput));
    assert_eq!(got, Ok(3 * STRIDE + STRIDE / 2));
    assert!(stage_ok, "every head landed at its place in the stage");
    assert!(chunks_ok, "every body landed in its own chunk");
}

#[test]
fn send_list_and_split_receive_keep_part_order() {
    let rt = runtime(1);
    let (ok, got, rest) = run(&rt.handles()[0], 10, || async {
        let listener = TcpListener::bind(localhost()).expect("bind");
        let addr = listener.local_addr().expect("addr");
        let client = TcpStream::connect(addr).await.expect("connect");
        let (server, _) = listener.accept().await.expect("accept");
        // Copied bytes around two shared chunks: "ab" [chunk 300] "cde" [chunk 50] "f".
        let c1 = pattern_buf(3, 0, 300);
        let c2 = pattern_buf(4, 0, 50);
        let mut list = SendList::new();
        list.push_bytes(b"ab");
        list.push_chunk(c1.clone());
        list.push_bytes(b"cde");
        list.push_chunk(c2.clone());
        list.push_bytes(b"f");
        let (ok, _list) = server.send_list(list).await;
        let mut want = b"ab".to_vec();
        want.extend_from_slice(&c1);
        want.extend_from_slice(b"cde");
        want.extend_from_slice(&c2);
        want.push(b'f');
        // Split receives: the first 302 bytes into `body` at offset 10, what
        // follows into `tail` at offset 5, until everything is in.
        let mut body = buffer_pool().alloc(312).expect("chunk");
        assert!(body.set_len(312));
        let mut tail = buffer_pool().alloc(100).expect("chunk");
        assert!(tail.set_len(100));
        let mut split = SplitRecv::new();
        let (mut in_body, mut in_tail) = (0usize, 0usize);
        while in_body + in_tail < want.len() {
            let (r, b, t, s) = client
                .recv_split(body, 10 + in_body..312, tail, 5 + in_tail..100, split)
                .await;
            (body, tail, split) = (b, t, s);
            let n = r.expect("split receive");
            assert!(n > 0, "no end of stream before all bytes");
            let to_body = n.min(302 - in_body);
            in_body += to_body;
            in_tail += n - to_body;
        }
        // A range outside its buffer is refused, nothing received.
        let (bad, body, tail, _) = client.recv_split(body, 0..1, tail, 0..101, split).await;
        assert_eq!(bad.map_err(|e| e.kind()), Err(io::ErrorKind::InvalidInput));
        let rest = (
            body[10..312] == want[..302],
            tail[5..5 + in_tail] == want[302..],
        );
        (ok.is_ok(), (in_body, in_tail), rest)
    });
    assert!(ok, "send_list sent everything");
    assert_eq!(got, (302, 54));
    assert_eq!(rest, (true, true), "bytes arrive in part order, body first");
}

#[test]
fn peer_reset_is_an_error_not_a_panic() {
    let rt = runtime(1);
    let (recv, send) = run(&rt.handles()[0], 10, || async {
        let listener = TcpListener::bind(localhost()).expect("bind");
        let addr = listener.local_addr().expect("addr");
        let client = TcpStream::connect(addr).await.expect("connect");
        let (server, _) = listener.accept().await.expect("accept");
        let reader = spawn(async move {
            let buf = buffer_pool().alloc(4096).expect("chunk");
            let (r, _) = client.recv(buf, 0..4096).await;
            (r.map_err(|e| e.kind()), client)
        });
        mirrorpoint_poller::sleep(Duration::from_millis(20)).await;
        reset_on_close(&server);
        drop(server);
        let (recv, client) = reader.await;
        let mut send = Ok(());
        for _ in 0..3 {
            // The first send after a reset may still be accepted locally.
            if let Err(e) = client.send_all(pattern_buf(1, 0, 65_536)).await.0 {
                send = Err(e.kind());
                break;
            }
        }
        (recv, send)
    });
    assert_eq!(recv, Err(io::ErrorKind::ConnectionReset));
    assert!(
        matches!(
            send,
            Err(io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset)
        ),
        "{send:?}"
    );
}

#[test]
fn connecting_to_a_closed_port_is_refused() {
    let rt = runtime(1);
    let closed = std::net::TcpListener::bind(localhost()).expect("bind");
    let addr = closed.local_addr().expect("addr");
    drop(closed);
    let r = run(&rt.handles()[0], 10, move || async move {
        TcpStream::connect(addr)
            .await
            .map(drop)
            .map_err(|e| e.kind())
    });
    assert_eq!(r, Err(io::ErrorKind::ConnectionRefused));
}

#[test]
fn runtime_shutdown_with_pending_accept_and_recv_is_prompt() {
    let mut rt = runtime(1);
    let silent = std::net::TcpListener::bind(localhost()).expect("bind");
    let addr = silent.local_addr().expect("addr");
    let ready: OneshotReceiver<bool> = rt.handles()[0].spawn(move || async move {
        let listener = TcpListener::bind(localhost()).expect("bind");
        spawn(async move {
            let _ = listener.accept().await;
        })
        .detach();
        let stream = TcpStream::connect(addr).await.expect("connect");
        spawn(async move {
            let buf = buffer_pool().alloc(4096).expect("chunk");
            let _ = stream.recv(buf, 0..4096).await;
        })
        .detach();
        true
    });
    assert_eq!(ready.recv_blocking(), Ok(true));
    std::thread::sleep(Duration::from_millis(50));
    let t0 = Instant::now();
    rt.shutdown();
    let took = t0.elapsed();
    assert!(took < Duration::from_secs(2), "shutdown took {took:?}");
    drop(silent);
}
