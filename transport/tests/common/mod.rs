//! Helpers shared by the transport tests: runtimes, bounded waits, data
//! patterns, an echo server, and raw socket options for provoking partial
//! I/O and resets.
#![allow(dead_code)]

use mirrorpoint_poller::{
    buffer_pool, sleep, IoBuf, PoolConfig, ReactorConfig, ReactorHandle, Runtime, RuntimeConfig,
};
use mirrorpoint_transport::TcpStream;
use std::future::Future;
use std::io;
use std::net::{Shutdown, SocketAddr};
use std::os::fd::AsRawFd;
use std::pin::pin;
use std::task::Poll;
use std::time::Duration;

pub const CHUNK: usize = 128 * 1024;

pub fn runtime(reactors: usize) -> Runtime {
    Runtime::start(RuntimeConfig {
        cores: (0..reactors).collect(),
        reactor: ReactorConfig {
            pool: PoolConfig {
                chunk_size: CHUNK,
                chunk_count: 128,
                huge_pages: false,
            },
            idle_timeout: Duration::from_micros(200),
            ..ReactorConfig::default()
        },
        pin: false,
    })
    .expect("runtime starts")
}

/// Runs a future on `handle`'s reactor and waits at most `secs` for it.
pub fn run<F, Fut, T>(handle: &ReactorHandle, secs: u64, make: F) -> T
where
    F: FnOnce() -> Fut + Send + 'static,
    Fut: Future<Output = T> + 'static,
    T: Send + 'static,
{
    let rx = handle.spawn(make);
    let (tx, done) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(rx.recv_blocking());
    });
    match done.recv_timeout(Duration::from_secs(secs)) {
        Ok(Ok(v)) => v,
        Ok(Err(_)) => panic!("the test task was dropped (panicked?)"),
        Err(_) => panic!("test did not finish within {secs} s"),
    }
}

/// `Some(output)` if `fut` finishes within `d`, else `None` (dropping it).
pub async fn timeout<F: Future>(d: Duration, fut: F) -> Option<F::Output> {
    let mut fut = pin!(fut);
    let mut timer = pin!(sleep(d));
    std::future::poll_fn(move |cx| {
        if let Poll::Ready(v) = fut.as_mut().poll(cx) {
            return Poll::Ready(Some(v));
        }
        if timer.as_mut().poll(cx).is_ready() {
            return Poll::Ready(None);
        }
        Poll::Pending
    })
    .await
}

pub fn localhost() -> SocketAddr {
    "127.0.0.1:0".parse().expect("address")
}

/// The byte at stream offset `i` of pattern `seed`.
pub fn pattern_byte(seed: u8, i: usize) -> u8 {
    ((i as u64 * 31 + u64::from(seed) * 7 + (i as u64 >> 13)) % 251) as u8
}

/// A pool chunk holding `len` pattern bytes starting at stream offset `at`.
pub fn pattern_buf(seed: u8, at: usize, len: usize) -> IoBuf {
    let mut b = buffer_pool().alloc(len).expect("pool chunk");
    for (i, x) in b.iter_mut().enumerate() {
        *x = pattern_byte(seed, at + i);
    }
    b.freeze()
}

/// Echoes everything back until the peer closes its side, then closes ours.
pub async fn echo(stream: TcpStream) -> io::Result<usize> {
    let mut total = 0;
    loop {
        let buf = buffer_pool()
            .alloc(CHUNK)
            .ok_or_else(|| io::Error::other("pool empty"))?;
        let (r, buf) = stream.recv(buf, 0..CHUNK).await;
        let n = r?;
        if n == 0 {
            stream.shutdown(Shutdown::Write).await?;
            return Ok(total);
        }
        let out = buf.freeze().slice(0, n).expect("in range");
        stream.send_all(out).await.0?;
        total += n;
    }
}

/// Sends `total` pattern bytes in pieces of up to `piece`, then half-closes.
pub async fn send_pattern(
    stream: &TcpStream,
    seed: u8,
    total: usize,
    piece: usize,
) -> io::Result<()> {
    let mut at = 0;
    while at < total {
        let len = piece.min(total - at).min(CHUNK);
        stream.send_all(pattern_buf(seed, at, len)).await.0?;
        at += len;
    }
    stream.shutdown(Shutdown::Write).await
}

/// Receives until end of stream in pieces of the given sizes (cycled),
/// checking every byte against pattern `seed`; returns the byte count.
pub async fn check_pattern(stream: &TcpStream, seed: u8, sizes: &[usize]) -> io::Result<usize> {
    let mut buf = buffer_pool()
        .alloc(CHUNK)
        .ok_or_else(|| io::Error::other("pool empty"))?;
    let mut at = 0;
    for step in 0.. {
        let want = sizes[step % sizes.len()].min(CHUNK);
        let (r, b) = stream.recv(buf, 0..want).await;
        buf = b;
        let n = r?;
        if n == 0 {
            return Ok(at);
        }
        for (i, &x) in buf[..n].iter().enumerate() {
            if x != pattern_byte(seed, at + i) {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("byte {} differs", at + i),
                ));
            }
        }
        at += n;
    }
    Ok(at)
}

fn setsockopt_int(fd: &impl AsRawFd, level: i32, name: i32, value: i32) {
    // SAFETY: passes a pointer to a live c_int and its size.
    let r = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            level,
            name,
            (&value as *const i32).cast(),
            std::mem::size_of::<i32>() as libc::socklen_t,
        )
    };
    assert_eq!(r, 0, "setsockopt {name}: {}", io::Error::last_os_error());
}

/// Shrinks the kernel's send and receive buffers (forces partial I/O).
pub fn small_buffers(fd: &impl AsRawFd) {
    setsockopt_int(fd, libc::SOL_SOCKET, libc::SO_SNDBUF, 4096);
    setsockopt_int(fd, libc::SOL_SOCKET, libc::SO_RCVBUF, 4096);
}

/// Makes the next close send a RST instead of a FIN.
pub fn reset_on_close(fd: &impl AsRawFd) {
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: passes a pointer to a live linger struct and its size.
    let r = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&linger as *const libc::linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        )
    };
    assert_eq!(r, 0, "SO_LINGER: {}", io::Error::last_os_error());
}

/// Reads an int socket option.
pub fn getsockopt_int(fd: &impl AsRawFd, level: i32, name: i32) -> i32 {
    let mut value: i32 = 0;
    let mut len = std::mem::size_of::<i32>() as libc::socklen_t;
    // SAFETY: passes a live c_int and its size, which the kernel fills in.
    let r = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            level,
            name,
            (&mut value as *mut i32).cast(),
            &mut len,
        )
    };
    assert_eq!(r, 0, "getsockopt {name}: {}", io::Error::last_os_error());
    value
}
