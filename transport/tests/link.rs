//! The TCP mirror link: framed messages with scattered payloads, serialised
//! senders, framing errors breaking the link, and a misbehaving peer not
//! disturbing a well-behaved one on the same reactor.

mod common;

use common::*;
use mirrorpoint_poller::{buffer_pool, spawn, IoBuf, IoBufMut};
use mirrorpoint_transport::{Acceptor, Link, TcpLink, TcpListener, TcpStream};
use std::io;
use std::rc::Rc;
use std::sync::{Arc, Mutex};
use std::time::Duration;

async fn pair() -> (TcpLink, TcpLink) {
    connected_pair(false).await
}

/// A connected pair of links; with `small`, both sockets get tiny kernel
/// buffers (set before the handshake: shrinking the receive buffer of an
/// established connection can stall it on zero-window probes).
async fn connected_pair(small: bool) -> (TcpLink, TcpLink) {
    let listener = TcpListener::bind(localhost()).expect("bind");
    if small {
        small_buffers(&listener);
    }
    let addr = listener.local_addr().expect("addr");
    let client = TcpStream::connect(addr).await.expect("connect");
    if small {
        // The client only sends on these links, so its receive side may
        // shrink late; the small send buffer forces partial sends.
        small_buffers(&client);
    }
    let (server, _) = listener.accept().await.expect("accept");
    (TcpLink::new(client), TcpLink::new(server))
}

fn chunks(n: usize) -> Vec<IoBufMut> {
    (0..n)
        .map(|_| buffer_pool().alloc(CHUNK).expect("chunk"))
        .collect()
}

/// Payload of message `tag`: three views with odd offsets and lengths.
fn payload_for(tag: u8) -> Vec<IoBuf> {
    let a = pattern_buf(tag, 0, CHUNK);
    let b = pattern_buf(tag.wrapping_add(1), 0, 70_001);
    vec![
        a.slice(3, 100_001 + usize::from(tag)).expect("a"),
        b,
        pattern_buf(tag, 7, 5),
    ]
}

fn concat(bufs: &[impl std::ops::Deref<Target = [u8]>], len: usize) -> Vec<u8> {
    let mut v = Vec::new();
    for b in bufs {
        v.extend_from_slice(b);
    }
    v.truncate(len);
    v
}

#[test]
fn messages_arrive_whole_with_concurrent_senders_and_partial_sends() {
    let rt = runtime(1);
    let ok = run(&rt.handles()[0], 30, || async {
        let (client, server) = connected_pair(true).await;
        assert_eq!(
            client.max_header_len(),
            mirrorpoint_transport::link::DEFAULT_MAX_HEADER
        );
        let client = Rc::new(client);
        // Two tasks send on one link at once; each message must stay whole.
        let senders: Vec<_> = (0..2u8)
            .map(|s| {
                let link = client.clone();
                spawn(async move {
                    for i in 0..10u8 {
                        let tag = s * 100 + i;
                        let header = vec![tag; 5 + usize::from(i)];
                        link.send_message(&header, &payload_for(tag)).await?;
                    }
                    io::Result::Ok(())
                })
            })
            .collect();
        let mut header = [0u8; 64];
        let mut bufs = chunks(2);
        for _ in 0..20 {
            let (r, b) = server.recv_into(&mut header, bufs).await;
            bufs = b;
            let got = r.expect("message");
            let tag = header[0];
            assert!(header[..got.header_len].iter().all(|&x| x == tag));
            assert_eq!(got.header_len, 5 + usize::from(tag % 100));
            let want = concat(&payload_for(tag), usize::MAX);
            assert_eq!(got.payload_len, want.len());
            assert!(
                concat(&bufs, got.payload_len) == want,
                "payload of {tag} differs"
            );
        }
        for s in senders {
            s.await.expect("sender");
        }
        // An empty message is a message too.
        client.send_message(&[], &[]).await.expect("empty");
        let (r, _) = server.recv_into(&mut header, bufs).await;
        r.expect("empty message").payload_len == 0
    });
    assert!(ok);
}

#[test]
fn oversized_frames_break_the_link_and_bad_input_does_not() {
    let rt = runtime(1);
    let kinds = run(&rt.handles()[0], 10, || async {
        let (client, server) = pair().await;
        let mut out = Vec::new();
        // Too long a header to send: refused before anything goes out.
        let big = vec![0u8; client.max_header_len() + 1];
        out.push(client.send_message(&big, &[]).await.map_err(|e| e.kind()));
        out.push(
            client
                .send_message(b"fine", &[])
                .await
                .map_err(|e| e.kind()),
        );
        let mut header = [0u8; 16];
        let (r, _) = server.recv_into(&mut header, chunks(1)).await;
        assert_eq!(&header[..r.expect("still usable").header_len], b"fine");
        assert!(!client.is_broken());
        // A header longer than the receiver's slice.
        client.send_message(&[1u8; 40], &[]).await.expect("send");
        let mut small = [0u8; 16];
        let (r, bufs) = server.recv_into(&mut small, chunks(1)).await;
        out.push(r.map(drop).map_err(|e| e.kind()));
        assert!(server.is_broken());
        let (r, _) = server.recv_into(&mut small, bufs).await;
        out.push(r.map(drop).map_err(|e| e.kind()));
        // A payload larger than the buffers, on a fresh pair.
        let (client, server) = pair().await;
        let p = pattern_buf(1, 0, CHUNK);
        client
            .send_message(b"h", &[p.clone(), p])
            .await
            .expect("send");
        let (r, _) = server.recv_into(&mut header, chunks(1)).await;
        out.push(r.map(drop).map_err(|e| e.kind()));
        out
    });
    assert_eq!(
        kinds,
        vec![
            Err(io::ErrorKind::InvalidInput),
            Ok(()),
            Err(io::ErrorKind::InvalidData),
            Err(io::ErrorKind::BrokenPipe),
            Err(io::ErrorKind::InvalidData),
        ]
    );
}

#[test]
fn a_dropped_receive_breaks_the_link_and_drop_closes_the_socket() {
    let rt = runtime(1);
    let (broken, eof) = run(&rt.handles()[0], 10, || async {
        let listener = TcpListener::bind(localhost()).expect("bind");
        let addr = listener.local_addr().expect("addr");
        let peer = TcpStream::connect(addr).await.expect("connect");
        let (server, _) = listener.accept().await.expect("accept");
        let link = TcpLink::new(server);
        // Half a frame prefix, then silence: the receive waits, and is dropped.
        peer.send_all(pattern_buf(0, 0, 6)).await.0.expect("send");
        let mut header = [0u8; 16];
        let r = timeout(
            Duration::from_millis(30),
            link.recv_into(&mut header, chunks(1)),
        )
        .await;
        assert!(r.is_none(), "nothing complete arrived");
        let broken = link.is_broken();
        // The abandoned receive still holds the socket; dropping the link must
        // still close the connection (the peer sees end of stream).
        drop(link);
        let buf = buffer_pool().alloc(16).expect("chunk");
        let eof = timeout(Duration::from_secs(2), peer.recv(buf, 0..16)).await;
        (broken, eof.map(|(r, _)| r.map_err(|e| e.kind())))
    });
    assert!(broken);
    assert_eq!(eof, Some(Ok(0)));
}

/// Echoes every message back; records how the connection ended.
async fn echo_messages(stream: TcpStream, log: Arc<Mutex<Vec<String>>>) {
    let link = TcpLink::new(stream);
    let mut header = [0u8; 256];
    let mut bufs = chunks(2);
    loop {
        let (r, b) = link.recv_into(&mut header, bufs).await;
        bufs = b;
        let got = match r {
            Ok(got) => got,
            Err(e) => {
                log.lock().expect("lock").push(format!("{:?}", e.kind()));
                return;
            }
        };
        let mut payload = Vec::new();
        let mut left = got.payload_len;
        let mut keep = Vec::new();
        for b in bufs {
            let frozen = b.freeze();
            let take = left.min(frozen.len());
            left -= take;
            payload.push(frozen.slice(0, take).expect("in range"));
            keep.push(frozen);
        }
        let sent = link.send_message(&header[..got.header_len], &payload).await;
        drop(payload);
        bufs = keep
            .into_iter()
            .map(|f| {
                f.try_into_mut()
                    .unwrap_or_else(|_| buffer_pool().alloc(CHUNK).expect("chunk"))
            })
            .collect();
        for b in bufs.iter_mut() {
            b.set_len(CHUNK);
        }
        if let Err(e) = sent {
            log.lock()
                .expect("lock")
                .push(format!("send {:?}", e.kind()));
            return;
        }
    }
}

#[test]
fn a_misbehaving_connection_does_not_disturb_another() {
    let rt = runtime(1);
    let here = rt.handles()[0].clone();
    let log: Arc<Mutex<Vec<String>>> = Arc::default();
    let server_log = log.clone();
    let good = run(&rt.handles()[0], 30, move || async move {
        let listener = TcpListener::bind(localhost()).expect("bind");
        let acceptor = Acceptor::new(listener, vec![here]).expect("acceptor");
        let addr = acceptor.local_addr().expect("addr");
        let accepting = spawn(async move {
            let _ = acceptor
                .run(move |s, _| echo_messages(s, server_log.clone()))
                .await;
        });
        let good = spawn(async move {
            let link = TcpLink::new(TcpStream::connect(addr).await?);
            let mut header = [0u8; 256];
            let mut bufs = chunks(2);
            for i in 0..40u8 {
                let payload = payload_for(i);
                link.send_message(&[i; 9], &payload).await?;
                let (r, b) = link.recv_into(&mut header, bufs).await;
                bufs = b;
                let got = r?;
                if header[..got.header_len] != [i; 9]
                    || concat(&bufs, got.payload_len) != concat(&payload, usize::MAX)
                {
                    return Err(io::Error::other(format!("echo {i} differs")));
                }
                mirrorpoint_poller::yield_now().await;
            }
            io::Result::Ok(40)
        });
        // Garbage instead of a frame.
        let garbage = spawn(async move {
            let s = TcpStream::connect(addr).await.expect("connect");
            let _ = s.send_all(pattern_buf(5, 0, 4096)).await;
            mirrorpoint_poller::sleep(Duration::from_millis(20)).await;
        });
        // A valid prefix announcing a large payload, then a reset mid-way.
        let reset = spawn(async move {
            let s = TcpStream::connect(addr).await.expect("connect");
            let mut prefix = Vec::new();
            prefix.extend_from_slice(b"MPL1");
            prefix.extend_from_slice(&4u32.to_le_bytes());
            prefix.extend_from_slice(&200_000u32.to_le_bytes());
            prefix.extend_from_slice(b"head");
            let _ = s
                .send_vectored_all(&prefix, &[pattern_buf(6, 0, 50_000)])
                .await;
            mirrorpoint_poller::sleep(Duration::from_millis(10)).await;
            reset_on_close(&s);
        });
        // A header length far beyond any limit, then an orderly close.
        let huge = spawn(async move {
            let s = TcpStream::connect(addr).await.expect("connect");
            let mut prefix = Vec::new();
            prefix.extend_from_slice(b"MPL1");
            prefix.extend_from_slice(&u32::MAX.to_le_bytes());
            prefix.extend_from_slice(&0u32.to_le_bytes());
            let _ = s.send_vectored_all(&prefix, &[]).await;
        });
        garbage.await;
        reset.await;
        huge.await;
        let good = good.await;
        // Give the server's error paths a moment to log.
        mirrorpoint_poller::sleep(Duration::from_millis(50)).await;
        drop(accepting);
        good.map_err(|e| e.to_string())
    });
    assert_eq!(good, Ok(40));
    let mut log = log.lock().expect("lock").clone();
    log.sort();
    // Each connection ended on its own: two framing errors, the reset one
    // (reset, or end of stream if the server had not reached the reset), and
    // the good one's orderly close at a frame boundary.
    assert_eq!(log.len(), 4, "{log:?}");
    assert_eq!(
        log.iter().filter(|l| *l == "InvalidData").count(),
        2,
        "{log:?}"
    );
    assert!(
        log.iter()
            .all(|l| l == "InvalidData" || l == "ConnectionReset" || l == "UnexpectedEof"),
        "{log:?}"
    );
}
