//! The volume API on both backends, driven from reactor tasks: patterns
//! written and read back across cores, zeroing and unmapping, flush, and the
//! errors for bad requests.

use mirrorpoint_poller::{buffer_pool, PoolConfig, ReactorConfig, Runtime, RuntimeConfig};
use mirrorpoint_target::units::{BlockSize, ByteLen, ByteOffset};
use mirrorpoint_target::volume::registry::{MallocParams, UringParams};
use mirrorpoint_target::volume::{Volume, VolumeError, VolumeRegistry, VolumeSpec};
use std::sync::Arc;

fn runtime() -> Runtime {
    Runtime::start(RuntimeConfig {
        cores: vec![0, 1],
        reactor: ReactorConfig {
            pool: PoolConfig {
                chunk_size: 128 * 1024,
                chunk_count: 64,
                huge_pages: false,
            },
            ..ReactorConfig::default()
        },
        pin: false,
    })
    .expect("runtime")
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

/// Writes distinct patterns from one reactor, reads them back from the other.
fn exercise(rt: &Runtime, volume: Arc<Volume>) {
    let v = volume.clone();
    rt.handles()[0]
        .block_on(move || async move {
            let ch = v.channel();
            for i in 0..32u64 {
                let len = 4096 * (1 + (i as usize % 8));
                let mut buf = buffer_pool().alloc(len).expect("chunk");
                buf.copy_from_slice(&pattern(i, len));
                // Every other write is a FUA write (durable on completion).
                let (r, _) = if i % 2 == 1 {
                    ch.write_fua(ByteOffset(i * 64 * 1024), buf.freeze()).await
                } else {
                    ch.write(ByteOffset(i * 64 * 1024), buf.freeze()).await
                };
                r.expect("write");
            }
            ch.flush().await.expect("flush");
        })
        .expect("writer");
    let v = volume.clone();
    rt.handles()[1]
        .block_on(move || async move {
            let ch = v.channel();
            for i in 0..32u64 {
                let len = 4096 * (1 + (i as usize % 8));
                let buf = buffer_pool().alloc(len).expect("chunk");
                let (r, buf) = ch.read(ByteOffset(i * 64 * 1024), buf).await;
                r.expect("read");
                assert!(*buf == pattern(i, len)[..], "block {i} differs");
            }
            // Zeroing and unmapping read back as zeroes.
            ch.write_zeroes(ByteOffset(0), ByteLen(8192))
                .await
                .expect("write zeroes");
            ch.unmap(ByteOffset(64 * 1024), ByteLen(64 * 1024))
                .await
                .expect("unmap");
            for off in [0u64, 64 * 1024] {
                let buf = buffer_pool().alloc(8192).expect("chunk");
                let (r, buf) = ch.read(ByteOffset(off), buf).await;
                r.expect("read");
                assert!(buf.iter().all(|&b| b == 0), "range at {off} not zero");
            }
            // What was not zeroed is intact.
            let len = 4096 * 3;
            let buf = buffer_pool().alloc(len).expect("chunk");
            let (r, buf) = ch.read(ByteOffset(2 * 64 * 1024), buf).await;
            r.expect("read");
            assert!(*buf == pattern(2, len)[..]);
        })
        .expect("reader");
}

/// An unmap of several MiB (done in steps on memory volumes) zeroes exactly
/// its range: the blocks just before and after it keep their data.
fn large_unmap(rt: &Runtime, volume: Arc<Volume>) {
    rt.handles()[0]
        .block_on(move || async move {
            let ch = volume.channel();
            let (start, end) = (1024 * 1024 - 4096, 3 * 1024 * 1024 + 4096);
            for (seed, off) in [(90u64, start - 4096), (91, start), (92, 2 << 20), (93, end)] {
                let mut b = buffer_pool().alloc(4096).expect("chunk");
                b.copy_from_slice(&pattern(seed, 4096));
                let (r, _) = ch.write(ByteOffset(off), b.freeze()).await;
                r.expect("write");
            }
            ch.unmap(ByteOffset(start), ByteLen(end - start))
                .await
                .expect("unmap");
            for (seed, off, zero) in [
                (90u64, start - 4096, false),
                (91, start, true),
                (92, 2 << 20, true),
                (93, end, false),
            ] {
                let b = buffer_pool().alloc(4096).expect("chunk");
                let (r, b) = ch.read(ByteOffset(off), b).await;
                r.expect("read");
                if zero {
                    assert!(b.iter().all(|&x| x == 0), "block at {off} not zeroed");
                } else {
                    assert!(*b == pattern(seed, 4096)[..], "block at {off} lost");
                }
            }
        })
        .expect("unmapper");
}

/// A task looping over a volume whose I/O completes inline still lets the
/// other tasks of its reactor run: a second task counts its turns while the
/// first does 64 writes with no other await between them.
fn lets_other_tasks_run(rt: &Runtime, volume: Arc<Volume>) {
    let turns = rt.handles()[0]
        .block_on(move || async move {
            let ch = volume.channel();
            let ticks = std::rc::Rc::new(std::cell::Cell::new(0u32));
            let stop = std::rc::Rc::new(std::cell::Cell::new(false));
            let (t, st) = (ticks.clone(), stop.clone());
            let ticker = mirrorpoint_poller::spawn(async move {
                while !st.get() {
                    t.set(t.get() + 1);
                    mirrorpoint_poller::yield_now().await;
                }
            });
            // Let the ticker start, then count only what runs during the loop.
            mirrorpoint_poller::yield_now().await;
            let before = ticks.get();
            for i in 0..64u64 {
                let buf = buffer_pool().alloc(4096).expect("chunk");
                let (r, _) = ch.write(ByteOffset(i * 4096), buf.freeze()).await;
                r.expect("write");
            }
            let during = ticks.get() - before;
            stop.set(true);
            ticker.await;
            during
        })
        .expect("looper");
    assert!(
        turns >= 3,
        "the other task ran {turns} times during 64 writes"
    );
}

fn bad_requests(rt: &Runtime, volume: Arc<Volume>) {
    rt.handles()[0]
        .block_on(move || async move {
            let ch = volume.channel();
            let size = volume.size().0;
            let misaligned = buffer_pool().alloc(100).expect("chunk");
            let (r, _) = ch.read(ByteOffset(0), misaligned).await;
            assert!(matches!(r, Err(VolumeError::Misaligned { .. })), "{r:?}");
            let empty = buffer_pool().alloc(0).expect("chunk");
            let (r, _) = ch.read(ByteOffset(0), empty).await;
            assert!(matches!(r, Err(VolumeError::ZeroLength { .. })), "{r:?}");
            let past = buffer_pool().alloc(4096).expect("chunk").freeze();
            let (r, past) = ch.write(ByteOffset(size), past).await;
            assert!(matches!(r, Err(VolumeError::OutOfRange { .. })), "{r:?}");
            let (r, _) = ch.write_fua(ByteOffset(size), past).await;
            assert!(matches!(r, Err(VolumeError::OutOfRange { .. })), "{r:?}");
            let bs = u64::from(volume.block_size().bytes());
            let r = ch.unmap(ByteOffset(size - bs), ByteLen(2 * bs)).await;
            assert!(matches!(r, Err(VolumeError::OutOfRange { .. })), "{r:?}");
            let r = ch.write_zeroes(ByteOffset(1), ByteLen(512)).await;
            assert!(matches!(r, Err(VolumeError::Misaligned { .. })), "{r:?}");
        })
        .expect("bad requests");
}

#[test]
fn malloc_volume_round_trips_across_cores() {
    let rt = runtime();
    let reg = VolumeRegistry::new();
    let v = reg
        .create(VolumeSpec::Malloc(MallocParams {
            name: Some("m0".into()),
            num_blocks: 8192,
            block_size: BlockSize::B512,
            uuid: None,
        }))
        .expect("malloc");
    exercise(&rt, v.clone());
    lets_other_tasks_run(&rt, v.clone());
    large_unmap(&rt, v.clone());
    bad_requests(&rt, v);
}

#[test]
fn uring_volume_round_trips_and_persists() {
    let rt = runtime();
    let path = std::env::temp_dir().join(format!("mp-vol-{}.img", std::process::id()));
    let _ = std::fs::remove_file(&path);
    let reg = VolumeRegistry::new();
    let v = reg
        .create(VolumeSpec::Uring(UringParams {
            name: "u0".into(),
            filename: path.clone(),
            block_size: Some(BlockSize::B4096),
            size: Some(4 << 20),
            queue_depth: Some(4),
            uuid: None,
        }))
        .expect("uring");
    assert_eq!(v.num_blocks(), 1024);
    assert_eq!(v.info().driver_specific["uring"]["o_direct"], true);
    exercise(&rt, v.clone());
    bad_requests(&rt, v.clone());
    drop(v);
    reg.delete("u0").expect("delete");
    // What the volume wrote is in the file.
    let data = std::fs::read(&path).expect("image");
    assert_eq!(data.len(), 4 << 20);
    let len = 4096 * 4;
    assert_eq!(
        &data[3 * 64 * 1024..3 * 64 * 1024 + len],
        &pattern(3, len)[..]
    );
    std::fs::remove_file(path).ok();
}

/// A file on tmpfs is mapped and copied on the reactor (`memory_mapped`);
/// a file on a disk file system goes through the ring. Both round-trip the
/// same patterns, FUA writes included, and keep their data. The mapped file
/// keeps what it held before it was opened, is allocated in full when
/// opened (no hole left for a write to fault on), and shows every write to
/// a plain read of the file at once.
#[test]
fn uring_volume_on_tmpfs_is_mapped_and_round_trips() {
    let shm = std::path::Path::new("/dev/shm");
    if !shm.is_dir() {
        eprintln!("skipped: no /dev/shm");
        return;
    }
    let rt = runtime();
    let path = shm.join(format!("mp-vol-mapped-{}.img", std::process::id()));
    let _ = std::fs::remove_file(&path);
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::File::create(&path).expect("create");
        f.set_len(4 << 20).expect("size");
        f.write_all_at(&pattern(77, 8192), 3 << 20)
            .expect("old data");
    }
    let reg = VolumeRegistry::new();
    let v = reg
        .create(VolumeSpec::Uring(UringParams {
            name: "shm0".into(),
            filename: path.clone(),
            block_size: Some(BlockSize::B512),
            size: Some(4 << 20),
            queue_depth: Some(4),
            uuid: None,
        }))
        .expect("uring on tmpfs");
    assert_eq!(v.info().driver_specific["uring"]["memory_mapped"], true);
    assert!(v.completes_inline());
    {
        use std::os::unix::fs::MetadataExt;
        let allocated = std::fs::metadata(&path).expect("stat").blocks() * 512;
        assert!(allocated >= 4 << 20, "only {allocated} bytes allocated");
    }
    let v2 = v.clone();
    let old = rt.handles()[0]
        .block_on(move || async move {
            let ch = v2.channel();
            let buf = buffer_pool().alloc(8192).expect("chunk");
            let (r, buf) = ch.read(ByteOffset(3 << 20), buf).await;
            r.expect("read");
            buf.to_vec()
        })
        .expect("reader");
    assert_eq!(old, pattern(77, 8192), "data from before the open is lost");
    exercise(&rt, v.clone());
    bad_requests(&rt, v.clone());
    // Visible to a plain read of the file while the volume is still open.
    let data = std::fs::read(&path).expect("image");
    let len = 4096 * 6;
    assert_eq!(
        &data[5 * 64 * 1024..5 * 64 * 1024 + len],
        &pattern(5, len)[..]
    );
    lets_other_tasks_run(&rt, v.clone());
    large_unmap(&rt, v.clone());
    drop(v);
    reg.delete("shm0").expect("delete");
    let data = std::fs::read(&path).expect("image");
    assert_eq!(
        &data[5 * 64 * 1024..5 * 64 * 1024 + len],
        &pattern(5, len)[..]
    );
    std::fs::remove_file(&path).ok();

    // The same volume type on the disk file system goes through the ring.
    let disk = std::env::temp_dir().join(format!("mp-vol-ring-{}.img", std::process::id()));
    let _ = std::fs::remove_file(&disk);
    let v = reg
        .create(VolumeSpec::Uring(UringParams {
            name: "disk0".into(),
            filename: disk.clone(),
            block_size: None,
            size: Some(1 << 20),
            queue_depth: Some(4),
            uuid: None,
        }))
        .expect("uring on disk");
    let on_tmpfs = std::process::Command::new("stat")
        .args(["-f", "-c", "%T"])
        .arg(&disk)
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "tmpfs")
        .unwrap_or(false);
    assert_eq!(v.completes_inline(), on_tmpfs);
    drop(v);
    reg.delete("disk0").expect("delete");
    std::fs::remove_file(disk).ok();
}

/// Many tasks on two cores at a queue depth above the channel's limit.
#[test]
fn deep_queues_on_two_cores() {
    let rt = runtime();
    let path = std::env::temp_dir().join(format!("mp-vol-qd-{}.img", std::process::id()));
    let _ = std::fs::remove_file(&path);
    let reg = VolumeRegistry::new();
    let v = reg
        .create(VolumeSpec::Uring(UringParams {
            name: "qd".into(),
            filename: path.clone(),
            block_size: None,
            size: Some(8 << 20),
            queue_depth: Some(8),
            uuid: None,
        }))
        .expect("uring");
    let waits: Vec<_> = rt
        .handles()
        .iter()
        .map(|h| {
            let v = v.clone();
            let core = h.index() as u64;
            h.spawn(move || async move {
                let ch = Rc::new(v.channel());
                let tasks: Vec<_> = (0..32u64)
                    .map(|t| {
                        let ch = ch.clone();
                        mirrorpoint_poller::spawn(async move {
                            let slot = core * 32 + t;
                            for round in 0..8u64 {
                                let mut b = buffer_pool().alloc(4096).expect("chunk");
                                b.copy_from_slice(&pattern(slot * 100 + round, 4096));
                                let (r, _) = ch.write(ByteOffset(slot * 4096), b.freeze()).await;
                                r.expect("write");
                            }
                            let b = buffer_pool().alloc(4096).expect("chunk");
                            let (r, b) = ch.read(ByteOffset(slot * 4096), b).await;
                            r.expect("read");
                            *b == pattern(slot * 100 + 7, 4096)[..]
                        })
                    })
                    .collect();
                let mut all = true;
                for t in tasks {
                    all &= t.await;
                }
                all
            })
        })
        .collect();
    for w in waits {
        assert!(w.recv_blocking().expect("core finished"));
    }
    std::fs::remove_file(path).ok();
}

use std::rc::Rc;
