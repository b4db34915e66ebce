//! The daemon: reactors, volumes, and the admin socket, started together
//! and stopped in the right order.
//!
//! Start: reactors first (volumes open channels on them), then the state
//! from the config file (or the built-in default), then the admin socket, so
//! that nobody can talk to a half-built target. Stop: the admin socket
//! first, then the reactors drain their in-flight I/O, then every volume is
//! synced to stable storage.

pub mod config;
pub mod methods;

use crate::iscsi::registry::IscsiTarget;
use crate::nvmf::NvmfTarget;
use crate::rpc::{MethodRegistry, RpcServer, ServerConfig, ServerError};
use crate::volume::registry::UringParams;
use crate::volume::{VolumeRegistry, VolumeSpec};
use config::{ConfigError, ConfigFile};
use mirrorpoint_poller::{
    DiskSubmit, PoolConfig, ReactorConfig, ReactorError, ReactorHandle, Runtime, RuntimeConfig,
};
use std::net::SocketAddrV4;
use std::path::PathBuf;
use std::sync::{Arc, Weak};
use std::time::Duration;

/// Size of the default volume's backing file.
pub const DEFAULT_VOLUME_SIZE: u64 = 1 << 30;
/// Name of the default volume.
pub const DEFAULT_VOLUME_NAME: &str = "vol0";
/// Where the default configuration's iSCSI portal listens.
pub const DEFAULT_ISCSI_LISTEN: &str = "127.0.0.1:3260";
/// Where the default configuration keeps its data.
pub const DEFAULT_DATA_DIR: &str = "/var/tmp/mirrorpoint";
/// The NVMe-oF subsystem the default configuration exports its volume in.
pub const DEFAULT_SUBSYSTEM_NQN: &str = "nqn.2026-11.io.mirrorpoint:vol0";
/// Where the default configuration listens for NVMe/TCP hosts.
pub const DEFAULT_NVMF_LISTEN: &str = "127.0.0.1:4420";

/// How to start the daemon.
#[derive(Debug, Clone)]
pub struct DaemonOptions {
    /// CPUs to run reactors on (empty: the first CPU).
    pub cores: Vec<usize>,
    /// Admin socket path.
    pub rpc_socket: PathBuf,
    /// Configuration to start from; the built-in default when `None`.
    pub config_file: Option<PathBuf>,
    /// Where the built-in default keeps its volume.
    pub data_dir: PathBuf,
    /// Reactors never block (lab benchmarks).
    pub busy_poll: bool,
    /// Spin this long without work before blocking.
    pub idle_timeout: Duration,
    /// When disk requests reach the kernel.
    pub disk_submit: DiskSubmit,
    /// Buffer pool per reactor.
    pub pool: PoolConfig,
    /// Pin reactor threads to their CPUs.
    pub pin: bool,
    /// Where the built-in default exports its volume over iSCSI.
    pub iscsi_listen: String,
    /// Where the built-in default exports its volume over NVMe/TCP (None: not exported).
    pub nvmf_default_listen: Option<SocketAddrV4>,
}

impl Default for DaemonOptions {
    fn default() -> Self {
        DaemonOptions {
            cores: Vec::new(),
            rpc_socket: PathBuf::from(crate::rpc::DEFAULT_SOCKET_PATH),
            config_file: None,
            data_dir: PathBuf::from(DEFAULT_DATA_DIR),
            busy_poll: false,
            idle_timeout: ReactorConfig::default().idle_timeout,
            disk_submit: DiskSubmit::default(),
            pool: PoolConfig::default(),
            pin: true,
            iscsi_listen: DEFAULT_ISCSI_LISTEN.to_string(),
            nvmf_default_listen: DEFAULT_NVMF_LISTEN.parse().ok(),
        }
    }
}

/// Why the daemon could not start.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// The reactors could not start.
    #[error("reactors: {0}")]
    Reactor(#[from] ReactorError),
    /// The configuration could not be loaded.
    #[error("{0}")]
    Config(#[from] ConfigError),
    /// The admin socket could not start.
    #[error("admin socket: {0}")]
    Rpc(#[from] ServerError),
    /// The default configuration could not be built.
    #[error("default configuration: {0}")]
    Default(String),
    /// Method registration clashed (a bug).
    #[error("method registration: {0}")]
    Register(#[from] crate::rpc::RegisterError),
}

/// State the admin methods share.
pub struct DaemonState {
    /// Every volume.
    pub volumes: VolumeRegistry,
    /// Handles to the reactors.
    pub reactors: Vec<ReactorHandle>,
    /// The options the daemon started with.
    pub options: DaemonOptions,
    /// The iSCSI target (portal groups, nodes, sessions).
    pub iscsi: Arc<IscsiTarget>,
    /// Mirrors, hosted legs, the site's agent.
    pub mirror: crate::mirror::service::MirrorService,
    /// The NVMe/TCP target.
    pub nvmf: Arc<NvmfTarget>,
}

/// A running target.
pub struct Daemon {
    runtime: Option<Runtime>,
    state: Arc<DaemonState>,
    server: Option<RpcServer>,
    methods: Arc<MethodRegistry>,
    /// What start-up did, line by line, for the operator.
    pub startup_report: Vec<String>,
}

impl Daemon {
    /// Starts reactors, loads the configuration (or the default) and opens
    /// the admin socket.
    pub fn start(options: DaemonOptions) -> Result<Daemon, DaemonError> {
        let runtime = Runtime::start(RuntimeConfig {
            cores: options.cores.clone(),
            reactor: ReactorConfig {
                busy_poll: options.busy_poll,
                idle_timeout: options.idle_timeout,
                disk_submit: options.disk_submit,
                pool: options.pool,
                ..ReactorConfig::default()
            },
            pin: options.pin,
        })?;
        let mut report = Vec::new();
        let cpus: Vec<String> = runtime
            .handles()
            .iter()
            .map(|h| h.cpu().to_string())
            .collect();
        report.push(format!(
            "reactors on cpu {} ({})",
            cpus.join(","),
            if options.busy_poll {
                "busy-poll"
            } else {
                "adaptive polling"
            }
        ));
        let nvmf = NvmfTarget::new(runtime.handles().to_vec(), options.pool.chunk_size)
            .map_err(|e| DaemonError::Default(e.to_string()))?;
        let state = Arc::new_cyclic(|weak: &Weak<DaemonState>| {
            let w = weak.clone();
            DaemonState {
                volumes: VolumeRegistry::new(),
                reactors: runtime.handles().to_vec(),
                options: options.clone(),
                mirror: Default::default(),
                nvmf,
                iscsi: IscsiTarget::new(
                    runtime.handles().to_vec(),
                    Arc::new(move |name: &str| w.upgrade().and_then(|s| s.volumes.get(name))),
                ),
            }
        });
        let methods = Arc::new(MethodRegistry::new());
        methods::register(&methods, &state)?;
        crate::nvmf::rpc::register(&methods, &state)?;
        crate::iscsi::rpc::register(&methods, &state.iscsi)?;
        match &options.config_file {
            Some(path) => {
                let cfg = ConfigFile::read(path)?;
                let n = cfg.apply(&methods)?;
                report.push(format!("applied {n} calls from {}", path.display()));
            }
            None => {
                let line = Self::apply_default(&state, &options)?;
                report.push(line);
                report.extend(Self::apply_default_nvmf(&state, &options, &methods));
            }
        }
        for info in state.volumes.infos() {
            report.push(format!(
                "volume {}: {} blocks of {} bytes ({} MiB), {}",
                info.name,
                info.num_blocks,
                info.block_size,
                (info.num_blocks * u64::from(info.block_size)) >> 20,
                info.product_name
            ));
        }
        let server = RpcServer::start(ServerConfig::new(&options.rpc_socket), methods.clone())?;
        report.push(format!("admin socket {}", options.rpc_socket.display()));
        Ok(Daemon {
            runtime: Some(runtime),
            state,
            server: Some(server),
            methods,
            startup_report: report,
        })
    }

    fn apply_default(state: &DaemonState, options: &DaemonOptions) -> Result<String, DaemonError> {
        let dir = &options.data_dir;
        std::fs::create_dir_all(dir)
            .map_err(|e| DaemonError::Default(format!("cannot create {}: {e}", dir.display())))?;
        let file = dir.join(format!("{DEFAULT_VOLUME_NAME}.img"));
        state
            .volumes
            .create(VolumeSpec::Uring(UringParams {
                name: DEFAULT_VOLUME_NAME.to_string(),
                filename: file.clone(),
                block_size: None,
                size: Some(DEFAULT_VOLUME_SIZE),
                queue_depth: None,
                uuid: None,
            }))
            .map_err(|e| DaemonError::Default(e.to_string()))?;
        let iscsi = match crate::iscsi::rpc::export_default(
            &state.iscsi,
            DEFAULT_VOLUME_NAME,
            &options.iscsi_listen,
        ) {
            Ok(name) => format!(
                "exported over iSCSI as {name} LUN 0 on {}",
                options.iscsi_listen
            ),
            Err(e) => format!("iSCSI export on {} failed: {e}", options.iscsi_listen),
        };
        Ok(format!(
            "no --config given: built-in default, volume '{DEFAULT_VOLUME_NAME}' on {} ({} MiB, sparse); {iscsi}",
            file.display(),
            DEFAULT_VOLUME_SIZE >> 20
        ))
    }

    /// Exports the default volume over NVMe/TCP. A listener that cannot be
    /// opened (port taken) is reported, not fatal: the admin socket still
    /// comes up so the operator can add one.
    fn apply_default_nvmf(
        state: &DaemonState,
        options: &DaemonOptions,
        methods: &MethodRegistry,
    ) -> Vec<String> {
        let mut lines = Vec::new();
        let calls = [
            (
                "nvmf_create_subsystem",
                serde_json::json!({"nqn": DEFAULT_SUBSYSTEM_NQN, "allow_any_host": true,
                    "serial_number": "MP0000000000000001", "model_number": "mirrorpoint vol0"}),
            ),
            (
                "nvmf_subsystem_add_ns",
                serde_json::json!({"nqn": DEFAULT_SUBSYSTEM_NQN, "namespace": {"bdev_name": DEFAULT_VOLUME_NAME}}),
            ),
        ];
        for (m, p) in calls {
            if let Err(e) = methods.call(m, Some(p)) {
                lines.push(format!("default NVMe-oF export: {m} failed: {e}"));
                return lines;
            }
        }
        if let Some(addr) = options.nvmf_default_listen {
            let la = crate::nvmf::subsystem::ListenAddress::from_addr(addr);
            match state.nvmf.add_listener(DEFAULT_SUBSYSTEM_NQN, &la) {
                Ok(bound) => lines.push(format!(
                    "NVMe/TCP: {DEFAULT_SUBSYSTEM_NQN} (volume '{DEFAULT_VOLUME_NAME}') on {bound}, any host"
                )),
                Err(e) => lines.push(format!("NVMe/TCP: cannot listen on {addr}: {e}")),
            }
        }
        lines
    }

    /// Shared state (for front ends and tests).
    pub fn state(&self) -> &Arc<DaemonState> {
        &self.state
    }

    /// The method registry (for front ends to add their methods).
    pub fn methods(&self) -> &Arc<MethodRegistry> {
        &self.methods
    }

    /// Stops the admin socket, drains the reactors, syncs every volume.
    /// Returns how many volumes were synced.
    pub fn shutdown(mut self) -> usize {
        self.stop()
    }

    fn stop(&mut self) -> usize {
        if let Some(server) = self.server.take() {
            server.shutdown();
        }
        // Front ends first (no new host I/O), then the mirror links.
        self.state.iscsi.kill_all();
        self.state.nvmf.shutdown();
        self.state.mirror.shutdown();
        if let Some(mut rt) = self.runtime.take() {
            rt.shutdown();
        }
        let mut synced = 0;
        for v in self.state.volumes.all() {
            match v.sync_blocking() {
                Ok(()) => synced += 1,
                Err(e) => tracing::error!(volume = v.name(), "sync at shutdown failed: {e}"),
            }
        }
        synced
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if self.runtime.is_some() || self.server.is_some() {
            self.stop();
        }
    }
}
