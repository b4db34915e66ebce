//! The initiator session the `nvmf_host_*` tests run against a real target
//! (mirrorpoint's own, or Linux nvmet-tcp in a QEMU guest): connect and
//! identify, discovery, write/read/verify at QD 32, zeroing, flush, status
//! mapping, a second I/O queue on another reactor, keep-alive and shutdown.

#![allow(dead_code)]

mod target;
#[allow(unused_imports)]
pub use target::{start_malloc_target, Target};

use mirrorpoint_poller::{
    buffer_pool, oneshot, spawn, PoolConfig, ReactorConfig, Runtime, RuntimeConfig,
};
use mirrorpoint_target::nvmf::host::{
    ConnectOptions, Controller, ControllerInfo, HostError, IoQueue, QueueStats, StatusKind,
};
use mirrorpoint_target::nvmf::spec::{CommandId, DataSgl, Nsid, NvmOpcode, Sqe};
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Instant;

pub const HOSTNQN: &str = "nqn.2014-08.org.nvmexpress:uuid:6d6972726f72-706f696e742d686f7374";
pub const CHUNK: usize = 128 * 1024;

pub fn runtime(cores: Vec<usize>) -> Runtime {
    Runtime::start(RuntimeConfig {
        cores,
        reactor: ReactorConfig {
            pool: PoolConfig {
                chunk_size: CHUNK,
                chunk_count: 256,
                huge_pages: false,
            },
            ..ReactorConfig::default()
        },
        pin: false,
    })
    .expect("runtime")
}

pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// Extent `i`: 4 KiB to 128 KiB (at least `floor` bytes) at a 128 KiB
/// stride, as (byte offset, bytes).
pub fn extent_from(i: u64, floor: usize) -> (u64, usize) {
    let len = 4096 * (1 + (i * 7 % 32) as usize);
    (
        i * 128 * 1024,
        len.max(floor.div_ceil(4096) * 4096).min(128 * 1024),
    )
}

/// [`extent_from`] without a floor.
pub fn extent(i: u64) -> (u64, usize) {
    extent_from(i, 0)
}

/// What one session saw.
#[derive(Debug, Clone)]
pub struct Report {
    pub cntlid: u16,
    pub model: String,
    pub nsze: u64,
    pub block_size: u32,
    pub digests: (bool, bool),
    pub in_capsule_limit: u32,
    pub max_h2c_data: u32,
    pub stats: QueueStats,
    pub extents: u64,
    pub bytes: u64,
    pub io_seconds: f64,
}

/// Writes `n` extents of namespace 1 with up to the queue depth in flight,
/// then reads them back concurrently and compares.
async fn write_read_verify(q: Rc<IoQueue>, bs: u64, n: u64, seed: u64, floor: usize) -> u64 {
    let mut tasks = Vec::new();
    let mut bytes = 0;
    for i in 0..n {
        let q = q.clone();
        bytes += extent_from(i, floor).1 as u64;
        tasks.push(spawn(async move {
            let (off, len) = extent_from(i, floor);
            let mut b = buffer_pool().alloc(len).expect("chunk");
            b.copy_from_slice(&pattern(seed + i, len));
            q.write(1, off / bs, b.freeze()).await
        }));
    }
    for (i, t) in tasks.into_iter().enumerate() {
        t.await.unwrap_or_else(|e| panic!("write {i}: {e}"));
    }
    let mut tasks = Vec::new();
    for i in 0..n {
        let q = q.clone();
        tasks.push(spawn(async move {
            let (off, len) = extent_from(i, floor);
            let b = buffer_pool().alloc(len).expect("chunk");
            let (r, b) = q.read(1, off / bs, (len as u64 / bs) as u32, b).await;
            r.map(|()| (i, *b == pattern(seed + i, len)[..]))
        }));
    }
    for t in tasks {
        let (i, same) = t.await.unwrap_or_else(|e| panic!("read: {e}"));
        assert!(same, "extent {i} read back different data");
    }
    bytes
}

pub async fn read_one(q: &IoQueue, lba: u64, blocks: u32, bs: u64) -> Result<Vec<u8>, HostError> {
    let b = buffer_pool()
        .alloc((u64::from(blocks) * bs) as usize)
        .expect("chunk");
    let (r, b) = q.read(1, lba, blocks, b).await;
    r.map(|()| b.to_vec())
}

/// The controller side of a session, on the reactor that owns the
/// controller; sends the info out, waits for `done`, then shuts down.
async fn controller_side(
    addr: SocketAddr,
    nqn: String,
    opts: ConnectOptions,
    (seed, extents, floor): (u64, u64, usize),
    info_tx: mirrorpoint_poller::OneshotSender<Arc<ControllerInfo>>,
    done: mirrorpoint_poller::OneshotReceiver<()>,
) -> Report {
    let ctrl = Controller::connect(addr, &nqn, HOSTNQN, opts.clone())
        .await
        .unwrap_or_else(|e| panic!("connect to {nqn} at {addr}: {e}"));
    let info = ctrl.info().clone();
    assert_eq!(ctrl.digests(), (opts.header_digest, opts.data_digest));
    assert_eq!(info.identify.subnqn, nqn);
    assert!(info.io_queues >= 2, "granted {} I/O queues", info.io_queues);
    let ns = info.namespace(1).expect("namespace 1 active");
    let bs = u64::from(ns.block_size.bytes());
    assert!(ns.nsze * bs >= extent(extents).0, "namespace too small");
    assert!(ctrl
        .active_namespaces()
        .await
        .expect("ns list")
        .contains(&1));
    assert_eq!(
        ctrl.identify_namespace(1).await.expect("identify ns").nsze,
        ns.nsze
    );

    let q = Rc::new(IoQueue::connect(&info, 1, 32).await.expect("I/O queue 1"));
    assert_eq!(q.digests(), (opts.header_digest, opts.data_digest));
    let t0 = Instant::now();
    let bytes = write_read_verify(q.clone(), bs, extents, seed, floor).await;
    let io_seconds = t0.elapsed().as_secs_f64();
    let stats = q.stats();
    if opts.in_capsule_writes && q.in_capsule_limit() >= 4096 {
        assert!(stats.in_capsule_writes > 0, "{stats:?}");
    }
    if !opts.in_capsule_writes {
        assert_eq!(stats.in_capsule_writes, 0, "{stats:?}");
        assert!(
            stats.r2ts >= extents,
            "at least one R2T per write: {stats:?}"
        );
    }
    assert!(stats.h2c_data_pdus >= stats.r2ts, "{stats:?}");
    assert!(stats.c2h_data_pdus >= extents, "{stats:?}");
    assert_eq!(stats.data_digest_errors, 0);
    let pdus = stats.commands + stats.h2c_data_pdus;
    assert!(stats.send_ops < pdus, "no send batching: {stats:?}");

    // Zeroing (if supported), flush.
    let (off0, _) = extent(0);
    if info.identify.oncs & (1 << 3) != 0 {
        q.write_zeroes(1, off0 / bs, 2, false)
            .await
            .expect("write zeroes");
        let z = read_one(&q, off0 / bs, 2, bs).await.expect("read zeroed");
        assert!(z.iter().all(|&x| x == 0), "write zeroes left data");
    }
    q.flush(1).await.expect("flush");

    // Status mapping (a Flush to an inactive NSID); the queue survives a
    // failed command.
    let sqe = Sqe::new(
        NvmOpcode::Flush.as_u8(),
        CommandId(0),
        Nsid(9),
        DataSgl::Transport { len: 0 },
    );
    let e = q.raw_command(sqe).await.expect_err("flush of NSID 9");
    assert_eq!(e.status_kind(), Some(StatusKind::InvalidNamespace), "{e}");
    let b = buffer_pool().alloc(4096).expect("chunk");
    let (r, _) = q.read(7, 0, 1, b).await;
    assert!(matches!(r, Err(HostError::InvalidRequest(_))), "{r:?}");
    q.flush(1).await.expect("queue alive after errors");
    assert!(q.error().is_none());

    info_tx.send(info.clone());
    done.await.expect("done signal");
    ctrl.keep_alive().await.expect("keep alive");
    let stats = q.stats();
    drop(q);
    ctrl.shutdown().await.expect("controller shutdown");
    Report {
        cntlid: info.cntlid,
        model: info.identify.model.clone(),
        nsze: ns.nsze,
        block_size: ns.block_size.bytes(),
        digests: ctrl.digests(),
        in_capsule_limit: if opts.in_capsule_writes {
            info.identify.in_capsule_data()
        } else {
            0
        },
        max_h2c_data: 0,
        stats,
        extents,
        bytes,
        io_seconds,
    }
}

/// One session against the target at `addr` exporting namespace 1 of `nqn`.
pub fn session(
    addr: SocketAddr,
    nqn: &str,
    opts: ConnectOptions,
    seed: u64,
    extents: u64,
) -> Report {
    session_with_floor(addr, nqn, opts, seed, extents, 0)
}

/// [`session`] with writes of at least `floor` bytes.
pub fn session_with_floor(
    addr: SocketAddr,
    nqn: &str,
    opts: ConnectOptions,
    seed: u64,
    extents: u64,
    floor: usize,
) -> Report {
    let host = runtime(vec![0, 1]);
    let (info_tx, info_rx) = oneshot();
    let (done_tx, done_rx) = oneshot();
    let nqn = nqn.to_string();
    let o = opts.clone();
    let report = host.handles()[0]
        .spawn(move || controller_side(addr, nqn, o, (seed, extents, floor), info_tx, done_rx));
    let info = info_rx
        .recv_blocking()
        .expect("controller side failed (see panic above)");
    // A second I/O queue, on the other reactor, reads what the first wrote.
    let h2c = host.handles()[1]
        .block_on(move || async move {
            let q = IoQueue::connect(&info, 2, 8).await.expect("I/O queue 2");
            let bs = u64::from(info.namespace(1).expect("ns").block_size.bytes());
            let (off, len) = extent_from(5, floor);
            let b = buffer_pool().alloc(len).expect("chunk");
            let (r, b) = q.read(1, off / bs, (len as u64 / bs) as u32, b).await;
            r.expect("read on queue 2");
            assert!(*b == pattern(seed + 5, len)[..], "queue 2 sees other data");
            q.max_h2c_data()
        })
        .expect("reactor 1");
    done_tx.send(());
    let mut r = report.recv_blocking().expect("controller side");
    r.max_h2c_data = h2c;
    r
}

/// Discovery: the log lists `nqn` on `port`.
pub fn discovery(addr: SocketAddr, nqn: &str, port: &str) {
    let host = runtime(vec![0]);
    let nqn = nqn.to_string();
    let port = port.to_string();
    host.handles()[0]
        .block_on(move || async move {
            let d = Controller::connect_discovery(addr, HOSTNQN, ConnectOptions::default())
                .await
                .expect("discovery connect");
            assert!(d.info().is_discovery());
            let log = d.discovery_log().await.expect("discovery log");
            let e = log
                .entries
                .iter()
                .find(|e| e.subnqn == nqn)
                .unwrap_or_else(|| panic!("{nqn} not in {log:?}"));
            assert_eq!(e.trtype, 3, "TCP");
            assert_eq!(e.trsvcid, port);
            assert!(IoQueue::connect(d.info(), 1, 8).await.is_err());
            eprintln!("discovery log: {} entries, {e:?}", log.entries.len());
        })
        .expect("reactor");
}
