//! `mirrorpoint-bench nvmf`: the `local` load, over NVMe/TCP.
//!
//! One controller (admin queue) is connected on the first reactor and kept
//! there for the whole run; `--connections` I/O queues are opened from its
//! shared [`ControllerInfo`], queue `q` on reactor `(q - 1) % cores`, each
//! with `--qd` tasks. The tasks, the timing, the histograms and the report
//! are the driver's ([`crate::driver`]), the same as `local`'s: only the
//! channel differs (an [`IoQueue`] instead of a volume channel). Reads land
//! in the task's pool chunk, writes go out from it without a copy.
//!
//! With `--target-pid`, the target's CPU time (process and threads) is
//! sampled from `/proc` at the edges of the measured window
//! ([`crate::targetcpu`]) and reported per I/O. With `--target-rpc`, the
//! target's reactors' own busy time (`framework_get_reactors`) is sampled
//! at the same edges and reported per I/O too.

use crate::config::NvmfConfig;
use crate::driver::{core_main, drive, runtime_config, start_runtime, Channel, Lane, Shape};
use crate::error::BenchError;
use crate::results::{
    build_report, NvmfSession, Report, RunFacts, TargetCpuReport, TargetReactorsReport,
};
use crate::targetcpu::TargetRpc;
use mirrorpoint_poller::oneshot;
use mirrorpoint_target::nvmf::host::{ConnectOptions, Controller, ControllerInfo, IoQueue};
use std::rc::Rc;
use std::sync::Arc;

/// Pool chunks per connection beyond the tasks' own.
const CHUNKS_PER_CONNECTION: usize = 8;

/// What the admin side sends once the controller is up.
struct Connected {
    info: Arc<ControllerInfo>,
    digests: (bool, bool),
}

/// Runs `mirrorpoint-bench nvmf` and returns what it measured.
pub fn run_nvmf(config: &NvmfConfig) -> Result<Report, BenchError> {
    // The target's admin socket first: a wrong path fails before any I/O.
    let mut target_rpc = config
        .target_rpc
        .as_deref()
        .map(TargetRpc::connect)
        .transpose()?;
    let load = config.load.clone();
    let ncores = load.cores.len();
    let per_core_conns = config.connections.div_ceil(ncores);
    let rt_config = runtime_config(
        &load,
        per_core_conns * load.qd,
        per_core_conns * CHUNKS_PER_CONNECTION,
    );
    let idle_timeout = rt_config.reactor.idle_timeout;
    let mut runtime = start_runtime(rt_config)?;
    let handles = runtime.handles().to_vec();

    // The controller lives on the first reactor until `stop`.
    let (info_tx, info_rx) = oneshot::<Result<Connected, BenchError>>();
    let (stop_tx, stop_rx) = oneshot::<()>();
    let opts = ConnectOptions {
        header_digest: config.header_digest,
        data_digest: config.data_digest,
        io_queues: config.connections as u16,
        disable_sq_flow_control: config.no_sq_flow_control,
        ..ConnectOptions::default()
    };
    let (addr, nqn, hostnqn) = (config.addr, config.nqn.clone(), config.hostnqn.clone());
    let admin = handles[0].spawn(move || async move {
        let ctrl = match Controller::connect(addr, &nqn, &hostnqn, opts).await {
            Ok(c) => c,
            Err(e) => {
                info_tx.send(Err(BenchError::Nvmf(format!(
                    "cannot connect to {nqn} at {addr}: {e}"
                ))));
                return;
            }
        };
        info_tx.send(Ok(Connected {
            info: ctrl.info().clone(),
            digests: ctrl.digests(),
        }));
        let _ = stop_rx.await;
        let _ = ctrl.shutdown().await;
    });
    let stop = |runtime: &mut mirrorpoint_poller::Runtime,
                stop_tx: mirrorpoint_poller::OneshotSender<()>| {
        stop_tx.send(());
        let _ = admin.recv_blocking();
        runtime.shutdown();
    };
    let connected = match info_rx.recv_blocking() {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => {
            drop(stop_tx);
            runtime.shutdown();
            return Err(e);
        }
        Err(_) => {
            runtime.shutdown();
            return Err(BenchError::ReactorLost(0));
        }
    };
    let info = connected.info.clone();
    let checked = check_session(config, &info);
    let (block, volume_bytes) = match checked {
        Ok(g) => g,
        Err(e) => {
            stop(&mut runtime, stop_tx);
            return Err(e);
        }
    };

    let shape = Shape {
        volume_bytes,
        tasks_total: (config.connections * load.qd) as u64,
        yield_each_io: false,
    };
    let (nsid, qd, connections) = (config.nsid, load.qd, config.connections);
    let measured = drive(
        &handles,
        &load,
        config.target_pid,
        target_rpc.as_mut(),
        |h, ready, go| {
            let core = h.index();
            let info = info.clone();
            let load = load.clone();
            h.spawn(move || {
                let setup = async move {
                    let mut lanes = Vec::new();
                    for qid in (1..=connections).filter(|q| (q - 1) % ncores == core) {
                        let q = IoQueue::connect(&info, qid as u16, qd as u16)
                            .await
                            .map_err(|e| {
                                BenchError::Nvmf(format!("cannot open I/O queue {qid}: {e}"))
                            })?;
                        lanes.push(Lane {
                            ch: Rc::new(Channel::Nvmf { q, nsid, block }),
                            first_task: ((qid - 1) * qd) as u64,
                        });
                    }
                    Ok(lanes)
                };
                core_main(core, setup, load, shape, ready, go)
            })
        },
    );
    stop(&mut runtime, stop_tx);
    let measured = measured?;
    let facts = RunFacts {
        volume_bytes,
        block_size: block as u32,
        o_direct: None,
        idle_timeout,
        disk_submit: None,
        measured: load.time,
        cpu: measured.cpu,
        windows: measured.windows,
        events: measured.events,
    };
    let mut report = build_report(&load, &facts, &measured.cores)?;
    report.mode = "nvmf";
    report.nvmf = Some(NvmfSession {
        addr: config.addr.to_string(),
        nqn: config.nqn.clone(),
        nsid: config.nsid,
        cntlid: info.cntlid,
        connections: config.connections,
        qd_per_connection: load.qd,
        header_digest: connected.digests.0,
        data_digest: connected.digests.1,
        sq_flow_control: !config.no_sq_flow_control,
    });
    report.target_cpu = measured
        .target
        .as_ref()
        .map(|t| TargetCpuReport::new(t, report.ops, report.time_s));
    report.target_reactors = measured
        .target_reactors
        .as_deref()
        .map(|r| TargetReactorsReport::new(r, report.ops, report.time_s));
    Ok(report)
}

/// Checks the run against what the controller granted and the namespace;
/// returns the namespace's block size and bytes.
fn check_session(config: &NvmfConfig, info: &ControllerInfo) -> Result<(u64, u64), BenchError> {
    let invalid = |m: String| Err(BenchError::InvalidArgument(m));
    let Some(ns) = info.namespace(config.nsid) else {
        return invalid(format!(
            "--nsid {}: no such active namespace in {} (active: {:?})",
            config.nsid,
            config.nqn,
            info.namespaces().keys().collect::<Vec<_>>()
        ));
    };
    let block = u64::from(ns.block_size.bytes());
    let bytes = ns.size_bytes();
    let bs = config.load.bs;
    if bs % block != 0 {
        return invalid(format!(
            "--bs {bs} is not a multiple of the namespace's {block}-byte block size"
        ));
    }
    if bytes < bs {
        return invalid(format!(
            "namespace {} holds {bytes} bytes, less than one --bs {bs} I/O",
            config.nsid
        ));
    }
    if usize::from(info.io_queues) < config.connections {
        return invalid(format!(
            "--connections {}: the controller granted only {} I/O queues",
            config.connections, info.io_queues
        ));
    }
    if config.load.qd > usize::from(info.cap.mqes) {
        return invalid(format!(
            "--qd {}: above the controller's queue size limit (CAP.MQES {})",
            config.load.qd, info.cap.mqes
        ));
    }
    if let Some(mdts) = info.identify.max_transfer() {
        if bs > mdts {
            return invalid(format!(
                "--bs {bs} is above the controller's largest transfer (MDTS, {mdts} bytes)"
            ));
        }
    }
    Ok((block, bytes))
}
