//! A real NVMe namespace through the uring backend: O_DIRECT, fixed files,
//! fixed buffers, two reactors. Skipped unless MIRRORPOINT_HW_NVME names a
//! block device and MIRRORPOINT_HW_NVME_DESTRUCTIVE=1 allows writing to it.

use mirrorpoint_poller::{buffer_pool, Runtime, RuntimeConfig};
use mirrorpoint_target::units::ByteOffset;
use mirrorpoint_target::volume::registry::UringParams;
use mirrorpoint_target::volume::{VolumeRegistry, VolumeSpec};

const SPAN: u64 = 64 << 20;

#[test]
fn nvme_uring() {
    let Some(dev) = std::env::var_os("MIRRORPOINT_HW_NVME") else {
        eprintln!("skipped: set MIRRORPOINT_HW_NVME=/dev/nvmeXnY to run");
        return;
    };
    if std::env::var("MIRRORPOINT_HW_NVME_DESTRUCTIVE").as_deref() != Ok("1") {
        eprintln!(
            "skipped: set MIRRORPOINT_HW_NVME_DESTRUCTIVE=1 to allow overwriting the first 64 MiB"
        );
        return;
    }
    let registry = VolumeRegistry::new();
    let volume = registry
        .create(VolumeSpec::Uring(UringParams {
            name: "hw".into(),
            filename: dev.into(),
            block_size: None,
            size: None,
            queue_depth: Some(64),
            uuid: None,
        }))
        .expect("open device");
    assert_eq!(volume.info().driver_specific["uring"]["block_device"], true);
    assert_eq!(volume.info().driver_specific["uring"]["o_direct"], true);
    let rt = Runtime::start(RuntimeConfig {
        cores: vec![0, 1],
        ..RuntimeConfig::default()
    })
    .expect("runtime");
    let chunk = 128 * 1024u64;
    for (i, h) in rt.handles().iter().enumerate() {
        let v = volume.clone();
        h.block_on(move || async move {
            let ch = v.channel();
            let half = SPAN / 2;
            let base = i as u64 * half;
            let mut off = 0;
            while off < half {
                let mut b = buffer_pool().alloc(chunk as usize).expect("chunk");
                for (j, x) in b.iter_mut().enumerate() {
                    *x = ((base + off) as usize / 4096 + j) as u8;
                }
                ch.write(ByteOffset(base + off), b.freeze())
                    .await
                    .0
                    .expect("write");
                off += chunk;
            }
            ch.flush().await.expect("flush");
            let mut off = 0;
            while off < half {
                let b = buffer_pool().alloc(chunk as usize).expect("chunk");
                let (r, b) = ch.read(ByteOffset(base + off), b).await;
                r.expect("read");
                for (j, x) in b.iter().enumerate() {
                    assert_eq!(
                        *x,
                        ((base + off) as usize / 4096 + j) as u8,
                        "at {}",
                        base + off
                    );
                }
                off += chunk;
            }
        })
        .expect("reactor");
    }
}
