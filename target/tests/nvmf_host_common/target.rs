//! Our NVMe/TCP target in the test process: one malloc namespace (NSID 1)
//! in one subsystem, listening on 127.0.0.1 at a free port, with the
//! transport options a test asks for. Shared by the `nvmf_*` tests that
//! drive it with the userspace initiator.

use super::{runtime, CHUNK};
use mirrorpoint_poller::Runtime;
use mirrorpoint_target::nvmf::subsystem::{ListenAddress, NamespaceParams, Subsystem};
use mirrorpoint_target::nvmf::{NvmfTarget, TransportOptions};
use mirrorpoint_target::units::BlockSize;
use mirrorpoint_target::volume::registry::MallocParams;
use mirrorpoint_target::volume::{VolumeRegistry, VolumeSpec};
use std::net::SocketAddr;
use std::sync::Arc;

/// A running target; shut down on drop.
pub struct Target {
    /// The target's reactors (keep them alive).
    pub rt: Runtime,
    /// Its volumes.
    pub volumes: VolumeRegistry,
    /// The NVMe-oF target.
    pub nvmf: Arc<NvmfTarget>,
    /// Where it listens.
    pub addr: SocketAddr,
}

impl Drop for Target {
    fn drop(&mut self) {
        self.nvmf.shutdown();
    }
}

/// Starts the target on one reactor (CPU 0): subsystem `nqn` with a malloc
/// volume `volume` of `blocks` blocks of `block_size` as namespace 1.
pub fn start_malloc_target(
    nqn: &str,
    volume: &str,
    blocks: u64,
    block_size: BlockSize,
    transport: TransportOptions,
) -> Target {
    let rt = runtime(vec![0]);
    let volumes = VolumeRegistry::new();
    let vol = volumes
        .create(VolumeSpec::Malloc(MallocParams {
            name: Some(volume.into()),
            num_blocks: blocks,
            block_size,
            uuid: None,
        }))
        .expect("volume");
    let nvmf = NvmfTarget::new(rt.handles().to_vec(), CHUNK).expect("target");
    nvmf.create_transport(transport).expect("transport");
    nvmf.add_subsystem(Subsystem::new(nqn, None, None, true, None).expect("subsystem"))
        .expect("add subsystem");
    nvmf.nvm_subsystem(nqn)
        .expect("subsystem")
        .add_namespace(
            vol,
            NamespaceParams {
                bdev_name: volume.into(),
                nsid: Some(1),
                nguid: None,
                uuid: None,
            },
        )
        .expect("namespace");
    let bound = nvmf
        .add_listener(
            nqn,
            &ListenAddress {
                trtype: "tcp".into(),
                adrfam: None,
                traddr: "127.0.0.1".into(),
                trsvcid: "0".into(),
            },
        )
        .expect("listener");
    Target {
        rt,
        volumes,
        nvmf,
        addr: SocketAddr::V4(bound),
    }
}
