//! The fault-injecting volume, SPDK's error bdev: `bdev_error_create`
//! wraps a base volume as `EE_<base>`, `bdev_error_inject_error` arms it to
//! fail the next N (or every) requests of an I/O type, `bdev_error_delete`
//! removes the wrapper.
//!
//! It exists so the mirror engine's handling of a failing local device can
//! be tested with real errors: an armed request never reaches the base
//! volume and completes with [`VolumeError::Io`] carrying `EIO` (or
//! [`VolumeError::NoBuffer`] for `nomem`), exactly the path a failing NVMe
//! device's completion takes through [`super::VolumeChannel`]. Disarmed, it
//! passes every request straight to the base volume's channel.
//!
//! The armed counts are atomics (one per I/O type), so the data path takes
//! no lock: a request claims one error with a compare-and-swap, and two
//! cores racing for the last armed error never both get it.

use super::{Volume, VolumeChannel, VolumeError};
use crate::units::{ByteLen, ByteOffset};
use mirrorpoint_poller::{IoBuf, IoBufMut};
use serde::{Deserialize, Serialize};
use std::io;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;

/// Armed count meaning "every request from now on, until cleared".
const PERMANENT: u64 = u64::MAX;

/// The I/O types errors can be injected into (SPDK's names).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum IoType {
    /// Reads.
    Read,
    /// Writes (and write zeroes).
    Write,
    /// Flushes.
    Flush,
    /// Unmaps.
    Unmap,
    /// Every type above.
    All,
    /// Disarms every type (SPDK's `clear`).
    Clear,
}

/// What an injected error looks like (SPDK's `failure` and `nomem`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// An I/O error (`EIO`), as a failing device gives.
    #[default]
    Failure,
    /// No buffer (`ENOMEM`): a transient resource shortage.
    Nomem,
}

const TYPES: usize = 4;

fn slot(t: IoType) -> Option<usize> {
    match t {
        IoType::Read => Some(0),
        IoType::Write => Some(1),
        IoType::Flush => Some(2),
        IoType::Unmap => Some(3),
        IoType::All | IoType::Clear => None,
    }
}

/// The armed errors of one error volume, shared by its channels.
#[derive(Default)]
pub struct Injection {
    armed: [AtomicU64; TYPES],
    kind: [AtomicU8; TYPES],
    injected: AtomicU64,
}

impl Injection {
    /// Arms `num` errors (or, with `permanent`, every request) of type `t`;
    /// `Clear` disarms everything. Replaces what was armed for that type.
    pub fn arm(&self, t: IoType, kind: ErrorKind, num: u64, permanent: bool) {
        let n = if permanent { PERMANENT } else { num };
        let k = match kind {
            ErrorKind::Failure => 0,
            ErrorKind::Nomem => 1,
        };
        let set = |i: usize, n: u64| {
            self.kind[i].store(k, Ordering::SeqCst);
            self.armed[i].store(n, Ordering::SeqCst);
        };
        match (t, slot(t)) {
            (_, Some(i)) => set(i, n),
            (IoType::Clear, _) => (0..TYPES).for_each(|i| set(i, 0)),
            _ => (0..TYPES).for_each(|i| set(i, n)),
        }
    }

    /// Claims one armed error of type slot `i`, if any.
    fn take(&self, i: usize) -> Option<VolumeError> {
        let a = &self.armed[i];
        let mut cur = a.load(Ordering::SeqCst);
        loop {
            if cur == 0 {
                return None;
            }
            let next = if cur == PERMANENT { cur } else { cur - 1 };
            match a.compare_exchange_weak(cur, next, Ordering::SeqCst, Ordering::SeqCst) {
                Ok(_) => break,
                Err(now) => cur = now,
            }
        }
        self.injected.fetch_add(1, Ordering::Relaxed);
        Some(match self.kind[i].load(Ordering::SeqCst) {
            1 => VolumeError::NoBuffer,
            _ => VolumeError::Io(io::Error::from_raw_os_error(libc::EIO)),
        })
    }

    /// Errors still armed per type (read, write, flush, unmap); `u64::MAX`
    /// is permanent.
    pub fn armed(&self) -> [u64; TYPES] {
        std::array::from_fn(|i| self.armed[i].load(Ordering::SeqCst))
    }

    /// Errors injected so far.
    pub fn injected(&self) -> u64 {
        self.injected.load(Ordering::Relaxed)
    }
}

/// An error volume: the base volume and what is armed.
#[derive(Clone)]
pub struct ErrorBackend {
    base: Arc<Volume>,
    injection: Arc<Injection>,
}

impl ErrorBackend {
    /// Wraps `base`.
    pub fn new(base: Arc<Volume>) -> ErrorBackend {
        ErrorBackend {
            base,
            injection: Arc::new(Injection::default()),
        }
    }

    /// The wrapped volume.
    pub fn base(&self) -> &Arc<Volume> {
        &self.base
    }

    /// What is armed.
    pub fn injection(&self) -> &Arc<Injection> {
        &self.injection
    }

    /// For `bdev_get_bdevs`.
    pub fn describe(&self) -> serde_json::Value {
        let a = self.injection.armed();
        let show = |n: u64| {
            if n == PERMANENT {
                serde_json::json!("permanent")
            } else {
                serde_json::json!(n)
            }
        };
        serde_json::json!({"error": {
            "base_bdev": self.base.name(),
            "armed": {"read": show(a[0]), "write": show(a[1]), "flush": show(a[2]), "unmap": show(a[3])},
            "injected": self.injection.injected(),
        }})
    }

    /// A channel on the calling reactor.
    pub fn channel(&self) -> ErrorChannel {
        ErrorChannel {
            base: self.base.channel(),
            injection: self.injection.clone(),
        }
    }
}

/// An error volume opened on one reactor.
pub struct ErrorChannel {
    base: VolumeChannel,
    injection: Arc<Injection>,
}

impl ErrorChannel {
    /// Reads through the base volume unless a read error is armed.
    pub async fn read(
        &self,
        offset: ByteOffset,
        buf: IoBufMut,
    ) -> (Result<(), VolumeError>, IoBufMut) {
        if let Some(e) = self.injection.take(0) {
            mirrorpoint_poller::yield_now().await;
            return (Err(e), buf);
        }
        Box::pin(self.base.read(offset, buf)).await
    }

    /// Writes through the base volume unless a write error is armed.
    pub async fn write(&self, offset: ByteOffset, buf: IoBuf) -> (Result<(), VolumeError>, IoBuf) {
        if let Some(e) = self.injection.take(1) {
            mirrorpoint_poller::yield_now().await;
            return (Err(e), buf);
        }
        Box::pin(self.base.write(offset, buf)).await
    }

    /// A FUA write counts as a write.
    pub async fn write_fua(
        &self,
        offset: ByteOffset,
        buf: IoBuf,
    ) -> (Result<(), VolumeError>, IoBuf) {
        if let Some(e) = self.injection.take(1) {
            mirrorpoint_poller::yield_now().await;
            return (Err(e), buf);
        }
        Box::pin(self.base.write_fua(offset, buf)).await
    }

    /// Flushes the base volume unless a flush error is armed.
    pub async fn flush(&self) -> Result<(), VolumeError> {
        if let Some(e) = self.injection.take(2) {
            return Err(e);
        }
        Box::pin(self.base.flush()).await
    }

    /// Write zeroes counts as a write.
    pub async fn write_zeroes(&self, offset: ByteOffset, len: ByteLen) -> Result<(), VolumeError> {
        if let Some(e) = self.injection.take(1) {
            return Err(e);
        }
        Box::pin(self.base.write_zeroes(offset, len)).await
    }

    /// Unmaps through the base volume unless an unmap error is armed.
    pub async fn unmap(&self, offset: ByteOffset, len: ByteLen) -> Result<(), VolumeError> {
        if let Some(e) = self.injection.take(3) {
            return Err(e);
        }
        Box::pin(self.base.unmap(offset, len)).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::units::BlockSize;
    use crate::volume::registry::{ErrorParams, MallocParams};
    use crate::volume::{VolumeRegistry, VolumeSpec};
    use mirrorpoint_poller::{buffer_pool, PoolConfig, ReactorConfig, Runtime, RuntimeConfig};

    #[test]
    fn armed_counts_are_claimed_once_each() {
        let inj = Injection::default();
        inj.arm(IoType::Write, ErrorKind::Failure, 2, false);
        assert!(inj.take(0).is_none(), "reads are not armed");
        assert!(
            matches!(inj.take(1), Some(VolumeError::Io(e)) if e.raw_os_error() == Some(libc::EIO))
        );
        assert!(inj.take(1).is_some());
        assert!(inj.take(1).is_none(), "only two were armed");
        inj.arm(IoType::All, ErrorKind::Nomem, 0, true);
        for _ in 0..100 {
            assert!(matches!(inj.take(2), Some(VolumeError::NoBuffer)));
        }
        inj.arm(IoType::Clear, ErrorKind::Failure, 0, false);
        assert_eq!(inj.armed(), [0; 4]);
        assert_eq!(inj.injected(), 102);
    }

    #[test]
    fn racing_cores_never_claim_more_than_armed() {
        let inj = Arc::new(Injection::default());
        inj.arm(IoType::Read, ErrorKind::Failure, 1000, false);
        let got: u64 = (0..4)
            .map(|_| {
                let inj = inj.clone();
                std::thread::spawn(move || {
                    (0..1000).filter(|_| inj.take(0).is_some()).count() as u64
                })
            })
            .collect::<Vec<_>>()
            .into_iter()
            .map(|h| h.join().expect("thread"))
            .sum();
        assert_eq!(got, 1000);
        assert_eq!(inj.armed()[0], 0);
    }

    /// Through the volume API: errors surface as `VolumeError::Io` (EIO)
    /// from the channel, and nothing reaches the base while armed.
    #[test]
    fn injected_errors_surface_through_the_volume_api() {
        let reg = VolumeRegistry::new();
        let base = reg
            .create(VolumeSpec::Malloc(MallocParams {
                name: Some("m".into()),
                num_blocks: 64,
                block_size: BlockSize::B512,
                uuid: None,
            }))
            .expect("malloc");
        let ee = reg
            .create(VolumeSpec::Error(ErrorParams {
                base_name: "m".into(),
                uuid: None,
            }))
            .expect("error bdev");
        assert_eq!(ee.name(), "EE_m");
        assert_eq!(ee.size(), base.size());
        assert!(
            matches!(reg.delete("m"), Err(crate::volume::CreateError::Invalid(_))),
            "the base is claimed by EE_m"
        );
        let mut rt = Runtime::start(RuntimeConfig {
            cores: vec![0],
            reactor: ReactorConfig {
                pool: PoolConfig {
                    chunk_size: 64 * 1024,
                    chunk_count: 16,
                    huge_pages: false,
                },
                ..ReactorConfig::default()
            },
            pin: false,
        })
        .expect("runtime");
        let inj = ee.error_injection().expect("an error volume").clone();
        rt.handles()[0]
            .block_on(move || async move {
                let ch = ee.channel();
                let bch = base.channel();
                let mut b = buffer_pool().alloc(4096).expect("buf");
                b.fill(0xab);
                let data = b.freeze();
                inj.arm(IoType::Write, ErrorKind::Failure, 1, false);
                let (r, data) = ch.write(ByteOffset(0), data).await;
                match r {
                    Err(VolumeError::Io(e)) => assert_eq!(e.raw_os_error(), Some(libc::EIO)),
                    other => panic!("expected EIO, got {other:?}"),
                }
                let (r, back) = bch
                    .read(ByteOffset(0), buffer_pool().alloc(4096).expect("buf"))
                    .await;
                r.expect("base read");
                assert!(
                    back.iter().all(|&x| x == 0),
                    "the failed write reached the base"
                );
                let (r, _) = ch.write(ByteOffset(0), data).await;
                r.expect("disarmed after one");
                inj.arm(IoType::Read, ErrorKind::Failure, 0, true);
                for _ in 0..3 {
                    let (r, _) = ch
                        .read(ByteOffset(0), buffer_pool().alloc(4096).expect("buf"))
                        .await;
                    assert!(matches!(r, Err(VolumeError::Io(_))));
                }
                inj.arm(IoType::Flush, ErrorKind::Failure, 1, false);
                assert!(ch.flush().await.is_err());
                assert!(ch.flush().await.is_ok());
                inj.arm(IoType::Clear, ErrorKind::Failure, 0, false);
                let (r, back) = ch
                    .read(ByteOffset(0), buffer_pool().alloc(4096).expect("buf"))
                    .await;
                r.expect("cleared");
                assert!(back.iter().all(|&x| x == 0xab));
            })
            .expect("block_on");
        rt.shutdown();
        reg.delete("EE_m").expect("delete wrapper");
        reg.delete("m").expect("base free again");
    }
}
