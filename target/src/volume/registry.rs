//! The daemon's set of volumes, by name, with the parameters each was
//! created from, so that `save_config` can write them back out as the RPC
//! calls that recreate them. Control plane only: a mutex is fine here.

use super::memory::MemoryImage;
use super::uring::{UringBackend, DEFAULT_QUEUE_DEPTH};
use super::{random_uuid, Backend, CreateError, Volume, VolumeInfo};
use crate::units::BlockSize;
use serde::{Deserialize, Serialize};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};

/// Parameters of `bdev_malloc_create` (SPDK's names).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MallocParams {
    /// Volume name; "MallocN" when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Size in blocks.
    pub num_blocks: u64,
    /// Block size in bytes.
    pub block_size: BlockSize,
    /// Fixed UUID; random when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uuid: Option<String>,
}

/// Parameters of `bdev_uring_create` (SPDK's names, plus `size` and `queue_depth`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UringParams {
    /// Volume name.
    pub name: String,
    /// Path of the file or block device.
    pub filename: PathBuf,
    /// Block size in bytes (default 512, or the device's when larger).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub block_size: Option<BlockSize>,
    /// Create or extend a regular file to this many bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<u64>,
    /// Per-core queue depth toward the device.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queue_depth: Option<usize>,
    /// Fixed UUID; random when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uuid: Option<String>,
}

/// Parameters of `bdev_error_create` (SPDK's names): wraps `base_name` as
/// `EE_<base_name>`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ErrorParams {
    /// The volume to wrap.
    pub base_name: String,
    /// Fixed UUID; random when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uuid: Option<String>,
}

/// How a volume was made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VolumeSpec {
    /// `bdev_malloc_create`.
    Malloc(MallocParams),
    /// `bdev_uring_create`.
    Uring(UringParams),
    /// `bdev_error_create`.
    Error(ErrorParams),
}

impl VolumeSpec {
    /// The RPC method that recreates it.
    pub fn method(&self) -> &'static str {
        match self {
            VolumeSpec::Malloc(_) => "bdev_malloc_create",
            VolumeSpec::Uring(_) => "bdev_uring_create",
            VolumeSpec::Error(_) => "bdev_error_create",
        }
    }

    /// The params of that call.
    pub fn params(&self) -> serde_json::Value {
        let v = match self {
            VolumeSpec::Malloc(p) => serde_json::to_value(p),
            VolumeSpec::Uring(p) => serde_json::to_value(p),
            VolumeSpec::Error(p) => serde_json::to_value(p),
        };
        v.unwrap_or(serde_json::Value::Null)
    }
}

struct Entry {
    volume: Arc<Volume>,
    /// None for volumes another subsystem builds (mirrors): not a bdev call.
    spec: Option<VolumeSpec>,
    /// Who holds the volume as its storage (a mirror's local leg, a storage
    /// server's pool), as SPDK's bdev claims: it cannot be deleted or
    /// claimed by another until released.
    claimed_by: Option<String>,
}

/// All volumes of the daemon.
#[derive(Default)]
pub struct VolumeRegistry {
    entries: Mutex<Vec<Entry>>,
}

/// Largest malloc volume: beyond this a typo would eat the machine.
const MAX_MALLOC_BYTES: u64 = 1 << 40;

fn check_uuid(uuid: &str) -> Result<(), CreateError> {
    let ok = uuid.len() == 36
        && uuid.char_indices().all(|(i, c)| match i {
            8 | 13 | 18 | 23 => c == '-',
            _ => c.is_ascii_hexdigit(),
        });
    if ok {
        Ok(())
    } else {
        Err(CreateError::Invalid(format!(
            "uuid '{uuid}' is not of the form xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx"
        )))
    }
}

fn check_name(name: &str) -> Result<(), CreateError> {
    if name.is_empty() || name.len() > 255 || name.chars().any(|c| c.is_control() || c == '/') {
        return Err(CreateError::Invalid(format!(
            "volume name '{name}' must be 1 to 255 printable characters without '/'"
        )));
    }
    Ok(())
}

impl VolumeRegistry {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> MutexGuard<'_, Vec<Entry>> {
        self.entries.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Creates a volume from its spec and registers it; returns its name.
    pub fn create(&self, spec: VolumeSpec) -> Result<Arc<Volume>, CreateError> {
        let mut spec = spec;
        let volume = match &mut spec {
            VolumeSpec::Malloc(p) => {
                let name = match &p.name {
                    Some(n) => n.clone(),
                    None => self.next_free_name("Malloc"),
                };
                p.name = Some(name.clone());
                self.build_malloc(&name, p)?
            }
            VolumeSpec::Uring(p) => self.build_uring(p)?,
            VolumeSpec::Error(p) => self.build_error(p)?,
        };
        let mut entries = self.lock();
        if entries.iter().any(|e| e.volume.name() == volume.name()) {
            return Err(CreateError::Exists(volume.name().to_string()));
        }
        // Record the UUID so save_config gives the volume the same identity.
        match &mut spec {
            VolumeSpec::Malloc(p) => p.uuid = Some(volume.uuid().to_string()),
            VolumeSpec::Uring(p) => p.uuid = Some(volume.uuid().to_string()),
            VolumeSpec::Error(p) => p.uuid = Some(volume.uuid().to_string()),
        }
        let volume = Arc::new(volume);
        entries.push(Entry {
            volume: volume.clone(),
            spec: Some(spec),
            claimed_by: None,
        });
        Ok(volume)
    }

    /// Registers a volume built elsewhere (a mirror over a local volume).
    pub fn register(&self, volume: Volume) -> Result<Arc<Volume>, CreateError> {
        check_name(volume.name())?;
        let mut entries = self.lock();
        if entries.iter().any(|e| e.volume.name() == volume.name()) {
            return Err(CreateError::Exists(volume.name().to_string()));
        }
        let volume = Arc::new(volume);
        entries.push(Entry {
            volume: volume.clone(),
            spec: None,
            claimed_by: None,
        });
        Ok(volume)
    }

    fn next_free_name(&self, prefix: &str) -> String {
        let entries = self.lock();
        (0..)
            .map(|i| format!("{prefix}{i}"))
            .find(|n| entries.iter().all(|e| e.volume.name() != n))
            .unwrap_or_else(|| prefix.to_string())
    }

    fn build_malloc(&self, name: &str, p: &MallocParams) -> Result<Volume, CreateError> {
        check_name(name)?;
        if let Some(u) = &p.uuid {
            check_uuid(u)?;
        }
        let bytes = p
            .num_blocks
            .checked_mul(u64::from(p.block_size.bytes()))
            .filter(|&b| b > 0 && b <= MAX_MALLOC_BYTES)
            .ok_or_else(|| {
                CreateError::Invalid(format!(
                    "num_blocks {} x block_size {} must be between 1 byte and 1 TiB",
                    p.num_blocks, p.block_size
                ))
            })?;
        let backend = MemoryImage::new(bytes).map_err(|source| CreateError::Io {
            what: format!("cannot map {bytes} bytes for {name}"),
            source,
        })?;
        Ok(Volume::new(
            name.to_string(),
            p.uuid.clone().unwrap_or_else(random_uuid),
            p.block_size,
            p.num_blocks,
            Backend::Malloc(backend),
        ))
    }

    fn build_uring(&self, p: &UringParams) -> Result<Volume, CreateError> {
        check_name(&p.name)?;
        if let Some(u) = &p.uuid {
            check_uuid(u)?;
        }
        if self.lock().iter().any(|e| e.volume.name() == p.name) {
            return Err(CreateError::Exists(p.name.clone()));
        }
        let opened = UringBackend::open(
            &p.filename,
            p.size,
            p.queue_depth.unwrap_or(DEFAULT_QUEUE_DEPTH),
        )?;
        let block_size = match p.block_size {
            Some(bs) if bs.bytes() < opened.device_block_size && opened.backend.is_direct() => {
                return Err(CreateError::Invalid(format!(
                    "block_size {bs} is smaller than the device's logical block size {}",
                    opened.device_block_size
                )))
            }
            Some(bs) => bs,
            None => BlockSize::new(opened.device_block_size).unwrap_or(BlockSize::B512),
        };
        let num_blocks = opened.size / u64::from(block_size.bytes());
        if num_blocks == 0 {
            return Err(CreateError::Invalid(format!(
                "{} holds less than one {block_size}-byte block (give \"size\" to create or extend it)",
                p.filename.display()
            )));
        }
        Ok(Volume::new(
            p.name.clone(),
            p.uuid.clone().unwrap_or_else(random_uuid),
            block_size,
            num_blocks,
            Backend::Uring(opened.backend),
        ))
    }

    fn build_error(&self, p: &ErrorParams) -> Result<Volume, CreateError> {
        if let Some(u) = &p.uuid {
            check_uuid(u)?;
        }
        let base = self
            .get(&p.base_name)
            .ok_or_else(|| CreateError::NotFound(p.base_name.clone()))?;
        let name = format!("EE_{}", p.base_name);
        check_name(&name)?;
        Ok(Volume::new(
            name,
            p.uuid.clone().unwrap_or_else(random_uuid),
            base.block_size(),
            base.num_blocks(),
            Backend::Error(super::error::ErrorBackend::new(base)),
        ))
    }

    /// Removes a volume. Channels still open keep it alive until they close.
    /// A volume an error volume wraps is claimed: delete the wrapper first.
    /// A claimed volume is refused: its owner must release it first.
    pub fn delete(&self, name: &str) -> Result<Arc<Volume>, CreateError> {
        let mut entries = self.lock();
        if let Some(w) = entries
            .iter()
            .find(|e| e.volume.error_base().is_some_and(|b| b.name() == name))
        {
            return Err(CreateError::Invalid(format!(
                "volume '{name}' is claimed by the error volume '{}' (bdev_error_delete it first)",
                w.volume.name()
            )));
        }
        let pos = entries
            .iter()
            .position(|e| e.volume.name() == name)
            .ok_or_else(|| CreateError::NotFound(name.to_string()))?;
        if let Some(by) = &entries[pos].claimed_by {
            return Err(CreateError::Claimed {
                name: name.to_string(),
                by: by.clone(),
            });
        }
        Ok(entries.remove(pos).volume)
    }

    /// Claims a volume for `owner` (e.g. "mirror m1"): until released, it
    /// cannot be deleted or claimed by anyone else. Claiming again for the
    /// same owner succeeds (config replay, retries).
    pub fn claim(&self, name: &str, owner: &str) -> Result<Arc<Volume>, CreateError> {
        let mut entries = self.lock();
        let e = entries
            .iter_mut()
            .find(|e| e.volume.name() == name)
            .ok_or_else(|| CreateError::NotFound(name.to_string()))?;
        match &e.claimed_by {
            Some(by) if by != owner => Err(CreateError::Claimed {
                name: name.to_string(),
                by: by.clone(),
            }),
            _ => {
                e.claimed_by = Some(owner.to_string());
                Ok(e.volume.clone())
            }
        }
    }

    /// Releases `owner`'s claim on a volume (nothing if it holds none).
    pub fn release(&self, name: &str, owner: &str) {
        let mut entries = self.lock();
        if let Some(e) = entries
            .iter_mut()
            .find(|e| e.volume.name() == name && e.claimed_by.as_deref() == Some(owner))
        {
            e.claimed_by = None;
        }
    }

    /// Who claimed a volume, if anyone.
    pub fn claimed_by(&self, name: &str) -> Option<String> {
        self.lock()
            .iter()
            .find(|e| e.volume.name() == name)
            .and_then(|e| e.claimed_by.clone())
    }

    /// Looks a volume up.
    pub fn get(&self, name: &str) -> Option<Arc<Volume>> {
        self.lock()
            .iter()
            .find(|e| e.volume.name() == name)
            .map(|e| e.volume.clone())
    }

    /// Every volume's facts, in creation order, with their claims.
    pub fn infos(&self) -> Vec<VolumeInfo> {
        self.lock()
            .iter()
            .map(|e| {
                let mut info = e.volume.info();
                info.claimed = e.claimed_by.is_some();
                info.claimed_by = e.claimed_by.clone();
                info
            })
            .collect()
    }

    /// Every volume, in creation order.
    pub fn all(&self) -> Vec<Arc<Volume>> {
        self.lock().iter().map(|e| e.volume.clone()).collect()
    }

    /// The specs, in creation order, for save_config.
    pub fn specs(&self) -> Vec<VolumeSpec> {
        self.lock().iter().filter_map(|e| e.spec.clone()).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn malloc(name: Option<&str>, blocks: u64) -> VolumeSpec {
        VolumeSpec::Malloc(MallocParams {
            name: name.map(str::to_string),
            num_blocks: blocks,
            block_size: BlockSize::B512,
            uuid: None,
        })
    }

    #[test]
    fn create_list_delete() {
        let r = VolumeRegistry::new();
        let a = r.create(malloc(None, 16)).expect("Malloc0");
        assert_eq!(a.name(), "Malloc0");
        assert_eq!(
            r.create(malloc(None, 16)).expect("Malloc1").name(),
            "Malloc1"
        );
        assert!(matches!(
            r.create(malloc(Some("Malloc0"), 8)),
            Err(CreateError::Exists(_))
        ));
        assert_eq!(r.infos().len(), 2);
        r.delete("Malloc0").expect("deleted");
        assert!(matches!(r.delete("Malloc0"), Err(CreateError::NotFound(_))));
        assert_eq!(
            r.create(malloc(None, 16)).expect("reuses").name(),
            "Malloc0"
        );
    }

    #[test]
    fn rejects_bad_parameters() {
        let r = VolumeRegistry::new();
        assert!(matches!(
            r.create(malloc(Some("z"), 0)),
            Err(CreateError::Invalid(_))
        ));
        assert!(matches!(
            r.create(malloc(Some("a/b"), 8)),
            Err(CreateError::Invalid(_))
        ));
        assert!(matches!(
            r.create(malloc(Some("huge"), u64::MAX)),
            Err(CreateError::Invalid(_))
        ));
        let bad_uuid = VolumeSpec::Malloc(MallocParams {
            name: Some("u".into()),
            num_blocks: 8,
            block_size: BlockSize::B512,
            uuid: Some("not-a-uuid".into()),
        });
        assert!(matches!(r.create(bad_uuid), Err(CreateError::Invalid(_))));
        let missing = VolumeSpec::Uring(UringParams {
            name: "f".into(),
            filename: "/nonexistent/dir/file".into(),
            block_size: None,
            size: None,
            queue_depth: None,
            uuid: None,
        });
        assert!(matches!(r.create(missing), Err(CreateError::Io { .. })));
    }

    #[test]
    fn specs_record_the_uuid_for_save_config() {
        let r = VolumeRegistry::new();
        let v = r.create(malloc(Some("m"), 8)).expect("created");
        let specs = r.specs();
        assert_eq!(specs[0].method(), "bdev_malloc_create");
        assert_eq!(specs[0].params()["uuid"], v.uuid());
        assert_eq!(specs[0].params()["block_size"], 512);
    }

    #[test]
    fn block_size_in_params_is_validated_by_serde() {
        let err = serde_json::from_value::<MallocParams>(serde_json::json!({
            "num_blocks": 8, "block_size": 1000
        }))
        .expect_err("1000 is not a block size");
        assert!(err.to_string().contains("block size 1000"), "{err}");
    }
}
