//! The admin methods of the foundation: volumes (`bdev_*`), reactors
//! (`framework_get_reactors`), the version, and `save_config`.
//!
//! Handlers run on the admin socket's threads, never on a reactor: they only
//! touch control-plane state (the volume registry, published reactor
//! counters) and open files, which may block.

use super::config::{ConfigCall, ConfigFile, SubsystemConfig};
use super::DaemonState;
use crate::rpc::{parse_params, MethodRegistry, RegisterError, RpcError};
use crate::volume::error::{ErrorKind, IoType};
use crate::volume::registry::{ErrorParams, MallocParams, UringParams};
use crate::volume::{CreateError, VolumeSpec};
use serde::Deserialize;
use serde_json::{json, Value};
use std::path::PathBuf;
use std::sync::Arc;

/// Maps a volume creation error onto an RPC error (SPDK uses negative errnos).
fn create_error(e: CreateError) -> RpcError {
    match e {
        CreateError::Invalid(msg) => RpcError::invalid_params(msg),
        CreateError::Exists(name) => RpcError::app(
            -libc::EEXIST,
            format!("File exists: volume '{name}' already exists"),
        ),
        CreateError::Claimed { name, by } => RpcError::app(
            -libc::EBUSY,
            format!("Device or resource busy: volume '{name}' is claimed by {by}"),
        ),
        CreateError::NotFound(name) => RpcError::app(
            -libc::ENODEV,
            format!("No such device: no volume named '{name}'"),
        ),
        CreateError::Io { what, source } => RpcError::app(
            -source.raw_os_error().unwrap_or(libc::EIO),
            format!("{what}: {source}"),
        ),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NameParam {
    name: String,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct OptionalName {
    #[serde(default)]
    name: Option<String>,
}

/// `bdev_error_inject_error` (SPDK's names; `permanent` is ours: every
/// request of the type fails until cleared).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct InjectParams {
    name: String,
    io_type: IoType,
    #[serde(default)]
    error_type: ErrorKind,
    #[serde(default)]
    num: Option<u64>,
    #[serde(default)]
    permanent: bool,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct SaveConfigParams {
    /// Also write the config to this file (atomically).
    #[serde(default)]
    filename: Option<PathBuf>,
}

/// Registers every foundation method.
pub fn register(methods: &MethodRegistry, state: &Arc<DaemonState>) -> Result<(), RegisterError> {
    let s = state.clone();
    methods.register("bdev_malloc_create", move |p| {
        let params: MallocParams = parse_params(p)?;
        let v = s
            .volumes
            .create(VolumeSpec::Malloc(params))
            .map_err(create_error)?;
        tracing::info!(
            name = v.name(),
            blocks = v.num_blocks(),
            "created malloc volume"
        );
        Ok(Value::String(v.name().to_string()))
    })?;
    let s = state.clone();
    methods.register("bdev_uring_create", move |p| {
        let params: UringParams = parse_params(p)?;
        let v = s
            .volumes
            .create(VolumeSpec::Uring(params))
            .map_err(create_error)?;
        tracing::info!(
            name = v.name(),
            blocks = v.num_blocks(),
            "created uring volume"
        );
        Ok(Value::String(v.name().to_string()))
    })?;
    let s = state.clone();
    methods.register("bdev_error_create", move |p| {
        let params: ErrorParams = parse_params(p)?;
        let v = s
            .volumes
            .create(VolumeSpec::Error(params))
            .map_err(create_error)?;
        tracing::info!(name = v.name(), "created error volume");
        Ok(Value::String(v.name().to_string()))
    })?;
    let s = state.clone();
    methods.register("bdev_error_inject_error", move |p| {
        let params: InjectParams = parse_params(p)?;
        let v = s
            .volumes
            .get(&params.name)
            .ok_or_else(|| create_error(CreateError::NotFound(params.name.clone())))?;
        let inj = v.error_injection().ok_or_else(|| {
            RpcError::invalid_params(format!(
                "name: volume '{}' is not an error volume (bdev_error_create)",
                params.name
            ))
        })?;
        let num = params.num.unwrap_or(1);
        if num == 0 && !params.permanent && params.io_type != IoType::Clear {
            return Err(RpcError::invalid_params(
                "num: must be at least 1 (or give \"permanent\": true)",
            ));
        }
        inj.arm(params.io_type, params.error_type, num, params.permanent);
        tracing::info!(
            name = params.name,
            io_type = ?params.io_type,
            num,
            permanent = params.permanent,
            "error injection armed"
        );
        Ok(Value::Bool(true))
    })?;
    for method in [
        "bdev_delete",
        "bdev_malloc_delete",
        "bdev_uring_delete",
        "bdev_error_delete",
    ] {
        let s = state.clone();
        methods.register(method, move |p| {
            let params: NameParam = parse_params(p)?;
            if method == "bdev_error_delete"
                && s.volumes
                    .get(&params.name)
                    .is_some_and(|v| v.error_injection().is_none())
            {
                return Err(RpcError::invalid_params(format!(
                    "name: volume '{}' is not an error volume (bdev_error_create)",
                    params.name
                )));
            }
            if s.iscsi.volume_in_use(&params.name) {
                return Err(RpcError::app(
                    -libc::EBUSY,
                    format!(
                        "Device or resource busy: volume '{}' is exported over iSCSI",
                        params.name
                    ),
                ));
            }
            s.volumes.delete(&params.name).map_err(create_error)?;
            // Hot-remove it from every NVMe-oF subsystem (hosts get a
            // namespace change notice), as SPDK does for a removed bdev.
            let removed = s.nvmf.remove_volume(&params.name);
            tracing::info!(name = params.name, namespaces = removed, "deleted volume");
            Ok(Value::Bool(true))
        })?;
    }
    let s = state.clone();
    methods.register("bdev_get_bdevs", move |p| {
        let params: OptionalName = parse_params(p)?;
        let infos = s.volumes.infos();
        let picked: Vec<_> = match &params.name {
            Some(n) => {
                let one: Vec<_> = infos.into_iter().filter(|i| &i.name == n).collect();
                if one.is_empty() {
                    return Err(create_error(CreateError::NotFound(n.clone())));
                }
                one
            }
            None => infos,
        };
        serde_json::to_value(picked).map_err(RpcError::internal)
    })?;
    let s = state.clone();
    methods.register("framework_get_reactors", move |p| {
        let _: OptionalName = parse_params(p).and_then(|o: OptionalName| match o.name {
            Some(_) => Err(RpcError::invalid_params(
                "framework_get_reactors takes no parameters",
            )),
            None => Ok(o),
        })?;
        let reactors: Vec<Value> = s
            .reactors
            .iter()
            .map(|h| {
                let st = h.stats();
                let total = st.busy_ns + st.idle_ns;
                let busy_pct = if total == 0 {
                    0.0
                } else {
                    st.busy_ns as f64 * 100.0 / total as f64
                };
                json!({
                    "index": h.index(),
                    "lcore": h.cpu(),
                    "busy_ns": st.busy_ns,
                    "idle_ns": st.idle_ns,
                    "busy_percent": (busy_pct * 100.0).round() / 100.0,
                    "ios_submitted": st.ios_submitted,
                    "ios_completed": st.ios_completed,
                    "submit_calls": st.submit_calls,
                    "tasks_run": st.tasks_run,
                    "sleeps": st.sleeps,
                })
            })
            .collect();
        Ok(json!({
            "busy_poll": s.options.busy_poll,
            "idle_timeout_us": s.options.idle_timeout.as_micros() as u64,
            "disk_submit": s.options.disk_submit.to_string(),
            "reactors": reactors,
        }))
    })?;
    for method in ["mirrorpoint_get_version", "spdk_get_version"] {
        methods.register(method, |p| {
            let _: serde_json::Map<String, Value> = parse_params(p)?;
            Ok(version_info())
        })?;
    }
    let s = state.clone();
    methods.register("save_config", move |p| {
        let params: SaveConfigParams = parse_params(p)?;
        let config = serde_json::to_value(current_config(&s)).map_err(RpcError::internal)?;
        if let Some(path) = params.filename {
            write_atomically(&path, &config).map_err(|e| {
                RpcError::app(
                    -e.raw_os_error().unwrap_or(libc::EIO),
                    format!("cannot write {}: {e}", path.display()),
                )
            })?;
        }
        Ok(config)
    })?;
    crate::mirror::service::register(methods, state)?;
    crate::mirror::service::register_diag(methods, state)?;
    Ok(())
}

/// The version answer.
pub fn version_info() -> Value {
    let version = env!("CARGO_PKG_VERSION");
    let mut parts = version.split('.').map(|p| p.parse::<u64>().unwrap_or(0));
    json!({
        "version": format!("mirrorpoint v{version}"),
        "fields": {
            "major": parts.next().unwrap_or(0),
            "minor": parts.next().unwrap_or(0),
            "patch": parts.next().unwrap_or(0),
            "suffix": "",
        }
    })
}

/// The configuration that rebuilds the daemon's current state.
pub fn current_config(state: &DaemonState) -> ConfigFile {
    let bdev = state
        .volumes
        .specs()
        .into_iter()
        .map(|spec| ConfigCall {
            method: spec.method().to_string(),
            params: Some(spec.params()),
        })
        .collect();
    let mirror = state
        .mirror
        .config_calls()
        .into_iter()
        .map(|(method, params)| ConfigCall {
            method,
            params: Some(params),
        })
        .collect();
    ConfigFile {
        subsystems: vec![
            SubsystemConfig {
                subsystem: "bdev".to_string(),
                config: bdev,
            },
            SubsystemConfig {
                subsystem: "mirror".to_string(),
                config: mirror,
            },
            SubsystemConfig {
                subsystem: "nvmf".to_string(),
                config: crate::nvmf::rpc::config_calls(&state.nvmf),
            },
            SubsystemConfig {
                subsystem: "iscsi".to_string(),
                config: crate::iscsi::rpc::config_calls(&state.iscsi),
            },
        ],
    }
}

/// Writes the config next to `path` and renames it into place. Owner-only
/// (0600): a configuration holds the mirror links' shared secret and CHAP
/// secrets.
fn write_atomically(path: &std::path::Path, value: &Value) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let text = serde_json::to_string_pretty(value).map_err(std::io::Error::other)?;
    let tmp = path.with_extension("tmp-save");
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)?;
    f.write_all(text.as_bytes())?;
    f.write_all(b"\n")?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)
}
