//! The userspace NVMe/TCP initiator (`nvmf::host`) against mirrorpoint's own
//! NVMe/TCP target over 127.0.0.1: connect, identify, discovery, write/read/
//! verify at QD 32 with header and data digests on and off, in-capsule and
//! R2T-solicited writes (several H2CData PDUs per R2T), the C2HData SUCCESS
//! flag, Write Zeroes / deallocate / flush, an I/O queue on a second reactor,
//! NVMe status mapping, and a clean controller shutdown.

use mirrorpoint_poller::{buffer_pool, spawn, PoolConfig, ReactorConfig, Runtime, RuntimeConfig};
use mirrorpoint_target::nvmf::host::{ConnectOptions, Controller, HostError, IoQueue, StatusKind};
use mirrorpoint_target::nvmf::spec::DISCOVERY_NQN;
use mirrorpoint_target::nvmf::subsystem::{ListenAddress, NamespaceParams, Subsystem};
use mirrorpoint_target::nvmf::{NvmfTarget, TransportOptions};
use mirrorpoint_target::units::BlockSize;
use mirrorpoint_target::volume::registry::MallocParams;
use mirrorpoint_target::volume::{VolumeRegistry, VolumeSpec};
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::Arc;

const NQN: &str = "nqn.2024-01.io.mirrorpoint:hosttest";
const HOSTNQN: &str = "nqn.2014-08.org.nvmexpress:uuid:host-test";
const CHUNK: usize = 128 * 1024;
const BLOCKS: u64 = 8192; // 32 MiB of 4 KiB blocks

fn runtime(cores: Vec<usize>) -> Runtime {
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

struct Target {
    _rt: Runtime,
    _volumes: VolumeRegistry,
    nvmf: Arc<NvmfTarget>,
    addr: SocketAddr,
}

/// Our target with one 32 MiB malloc namespace; MAXH2CDATA 8 KiB so a
/// solicited write takes several H2CData PDUs per R2T.
fn start_target() -> Target {
    let rt = runtime(vec![0]);
    let volumes = VolumeRegistry::new();
    let vol = volumes
        .create(VolumeSpec::Malloc(MallocParams {
            name: Some("hostvol".into()),
            num_blocks: BLOCKS,
            block_size: BlockSize::B4096,
            uuid: None,
        }))
        .expect("volume");
    let nvmf = NvmfTarget::new(rt.handles().to_vec(), CHUNK).expect("target");
    nvmf.create_transport(TransportOptions {
        io_unit_size: 8192,
        ..TransportOptions::defaults(CHUNK)
    })
    .expect("transport");
    nvmf.add_subsystem(Subsystem::new(NQN, None, None, true, None).expect("subsystem"))
        .expect("add subsystem");
    nvmf.nvm_subsystem(NQN)
        .expect("subsystem")
        .add_namespace(
            vol,
            NamespaceParams {
                bdev_name: "hostvol".into(),
                nsid: Some(1),
                nguid: None,
                uuid: None,
            },
        )
        .expect("namespace");
    let bound = nvmf
        .add_listener(
            NQN,
            &ListenAddress {
                trtype: "tcp".into(),
                adrfam: None,
                traddr: "127.0.0.1".into(),
                trsvcid: "0".into(),
            },
        )
        .expect("listener");
    Target {
        _rt: rt,
        _volumes: volumes,
        nvmf,
        addr: SocketAddr::V4(bound),
    }
}

impl Drop for Target {
    fn drop(&mut self) {
        self.nvmf.shutdown();
    }
}

fn pattern(seed: u64, len: usize) -> Vec<u8> {
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

/// Extent `i` of the QD test: 1 to 32 blocks (up to 128 KiB) at 32-block strides.
fn extent(i: u64) -> (u64, u32) {
    (i * 32, 1 + (i * 7 % 32) as u32)
}

const EXTENTS: u64 = 128;

/// Writes EXTENTS extents with up to `depth` in flight, then reads them
/// back (also concurrently) and compares.
async fn write_read_verify(q: Rc<IoQueue>, seed: u64) {
    let mut tasks = Vec::new();
    for i in 0..EXTENTS {
        let q = q.clone();
        tasks.push(spawn(async move {
            let (lba, blocks) = extent(i);
            let len = blocks as usize * 4096;
            let mut b = buffer_pool().alloc(len).expect("chunk");
            b.copy_from_slice(&pattern(seed + i, len));
            q.write(1, lba, b.freeze()).await
        }));
    }
    for (i, t) in tasks.into_iter().enumerate() {
        t.await.unwrap_or_else(|e| panic!("write {i}: {e}"));
    }
    let mut tasks = Vec::new();
    for i in 0..EXTENTS {
        let q = q.clone();
        tasks.push(spawn(async move {
            let (lba, blocks) = extent(i);
            let len = blocks as usize * 4096;
            let b = buffer_pool().alloc(len).expect("chunk");
            let (r, b) = q.read(1, lba, blocks, b).await;
            r.map(|()| (i, *b == pattern(seed + i, len)[..]))
        }));
    }
    for t in tasks {
        let (i, same) = t.await.expect("read");
        assert!(same, "extent {i} read back different data");
    }
}

/// One whole session with `opts`; returns what the I/O queue negotiated.
fn session(t: &Target, opts: ConnectOptions, seed: u64) -> (bool, bool, u32) {
    let host = runtime(vec![0, 1]);
    let addr = t.addr;
    let o = opts.clone();
    let info = host.handles()[0]
        .block_on(move || async move {
            let ctrl = Controller::connect(addr, NQN, HOSTNQN, o.clone())
                .await
                .expect("connect");
            let info = ctrl.info().clone();
            assert_eq!(ctrl.digests(), (o.header_digest, o.data_digest));
            assert_eq!(info.identify.subnqn, NQN);
            assert_eq!(info.identify.cntlid, info.cntlid);
            assert!(info.io_queues >= 2, "granted {}", info.io_queues);
            let ns = info.namespace(1).expect("namespace 1");
            assert_eq!(ns.nsze, BLOCKS);
            assert_eq!(ns.block_size, BlockSize::B4096);
            assert_eq!(ctrl.active_namespaces().await.expect("ns list"), vec![1]);
            assert_eq!(
                ctrl.identify_namespace(1).await.expect("id ns").nsze,
                BLOCKS
            );

            let q = Rc::new(IoQueue::connect(&info, 1, 32).await.expect("io queue"));
            assert_eq!(q.digests(), (o.header_digest, o.data_digest));
            write_read_verify(q.clone(), seed).await;

            // Zeroing, deallocation, flush.
            let (lba0, _) = extent(0);
            let (lba1, _) = extent(1);
            q.write_zeroes(1, lba0, 1, false)
                .await
                .expect("write zeroes");
            q.deallocate(1, &[(lba1, 1)]).await.expect("deallocate");
            q.flush(1).await.expect("flush");
            for lba in [lba0, lba1] {
                let b = buffer_pool().alloc(4096).expect("chunk");
                let (r, b) = q.read(1, lba, 1, b).await;
                r.expect("read zeroed");
                assert!(b.iter().all(|&x| x == 0), "lba {lba} not zero");
            }

            // Status mapping; the queue survives a failed command.
            let b = buffer_pool().alloc(8192).expect("chunk");
            let (r, _) = q.read(1, BLOCKS - 1, 2, b).await;
            let e = r.expect_err("read past the end");
            assert_eq!(e.status_kind(), Some(StatusKind::LbaOutOfRange), "{e}");
            let b = buffer_pool().alloc(4096).expect("chunk");
            let (r, _) = q.read(7, 0, 1, b).await;
            assert!(matches!(r, Err(HostError::InvalidRequest(_))), "{r:?}");
            q.flush(1).await.expect("queue still alive");
            assert!(q.error().is_none());

            // Keep the controller alive (on this reactor) while reactor 1
            // uses it; hand back the info for that.
            let info2 = info.clone();
            let keep = spawn(async move {
                mirrorpoint_poller::sleep(std::time::Duration::from_secs(3)).await;
                ctrl.keep_alive().await.expect("keep alive");
                ctrl.shutdown().await.expect("shutdown");
                drop(ctrl);
            });
            keep.detach();
            let q_in = q.in_capsule_limit();
            let h2c = q.max_h2c_data();
            (info2, q_in, h2c)
        })
        .expect("reactor 0");
    let (info, in_capsule, h2c) = info;
    assert_eq!(h2c, 8192);
    // A second I/O queue on the other reactor reads what the first wrote.
    host.handles()[1]
        .block_on(move || async move {
            let q = IoQueue::connect(&info, 2, 8).await.expect("io queue 2");
            let (lba, blocks) = extent(5);
            let len = blocks as usize * 4096;
            let b = buffer_pool().alloc(len).expect("chunk");
            let (r, b) = q.read(1, lba, blocks, b).await;
            r.expect("read on queue 2");
            assert!(*b == pattern(seed + 5, len)[..], "queue 2 sees other data");
        })
        .expect("reactor 1");
    (opts.header_digest, opts.data_digest, in_capsule)
}

#[test]
fn plain_in_capsule_and_success_flag() {
    let t = start_target();
    let (_, _, icd) = session(
        &t,
        ConnectOptions {
            disable_sq_flow_control: true,
            ..ConnectOptions::default()
        },
        1,
    );
    assert!(icd >= 4096, "in-capsule limit {icd}");
}

#[test]
fn digests_in_capsule() {
    let t = start_target();
    session(
        &t,
        ConnectOptions {
            header_digest: true,
            data_digest: true,
            ..ConnectOptions::default()
        },
        2,
    );
}

#[test]
fn plain_r2t_only() {
    let t = start_target();
    let (_, _, icd) = session(
        &t,
        ConnectOptions {
            in_capsule_writes: false,
            ..ConnectOptions::default()
        },
        3,
    );
    assert_eq!(icd, 0);
}

#[test]
fn digests_r2t_only() {
    let t = start_target();
    session(
        &t,
        ConnectOptions {
            header_digest: true,
            data_digest: true,
            in_capsule_writes: false,
            ..ConnectOptions::default()
        },
        4,
    );
}

#[test]
fn discovery_and_refusals() {
    let t = start_target();
    let host = runtime(vec![0]);
    let addr = t.addr;
    host.handles()[0]
        .block_on(move || async move {
            let d = Controller::connect_discovery(addr, HOSTNQN, ConnectOptions::default())
                .await
                .expect("discovery connect");
            assert!(d.info().is_discovery());
            assert_eq!(d.info().identify.subnqn, DISCOVERY_NQN);
            let log = d.discovery_log().await.expect("discovery log");
            let e = log
                .entries
                .iter()
                .find(|e| e.subnqn == NQN)
                .unwrap_or_else(|| panic!("{NQN} not in {log:?}"));
            assert_eq!(e.trtype, 3);
            assert_eq!(e.traddr, "127.0.0.1");
            assert_eq!(e.trsvcid, addr.port().to_string());
            assert!(IoQueue::connect(d.info(), 1, 8).await.is_err());

            // An unknown subsystem is refused with a typed status.
            let r = Controller::connect(
                addr,
                "nqn.2024-01.io.mirrorpoint:nope",
                HOSTNQN,
                ConnectOptions::default(),
            )
            .await;
            let e = r.expect_err("unknown subsystem");
            assert!(
                matches!(
                    e.status_kind(),
                    Some(StatusKind::ConnectInvalidParameters | StatusKind::ConnectInvalidHost)
                ),
                "{e}"
            );
        })
        .expect("reactor");
}
