//! The per-core load: QD tasks per reactor, each doing one I/O at a time.
//!
//! Shaped like SPDK's bdevperf: the load runs inside the process on the same
//! reactors and volume channels a front end would use, so what it measures
//! is the cost of `poller` + `target` and nothing else. Each reactor opens
//! its own [`VolumeChannel`] and spawns `qd` local tasks; each task owns its
//! pool buffer(s) for the whole run (a write buffer is filled once, before
//! the clock starts), its own [`Pattern`], and loops "next I/O, submit,
//! await, record" until the deadline.
//!
//! The hot loop allocates nothing, makes no syscalls of its own (the ring's
//! submissions are the reactor's) and reads the clock once per I/O: the
//! completion time of one I/O is the issue time of the next, since a task
//! issues again straight away. The exception is the malloc backend, which
//! completes inline without ever suspending the task: there each task
//! yields after every I/O (else one task would run the whole test inside a
//! single poll, starving its siblings and the reactor loop) and reads the
//! clock a second time when it resumes, so the yield is not counted as
//! latency. The latency recorded is from the moment the
//! task issues (before the volume's range check and queue-depth permit) to
//! the moment it runs again after the completion, which includes the
//! reactor's reap-and-schedule delay, as fio's completion latency includes
//! its own reaping.
//!
//! Timing: all reactors first set up (channel, buffers, tasks) and report
//! ready; then the main thread picks one start instant for everyone. I/Os
//! issued before `start + ramp` or completed after `start + ramp + time` are
//! not recorded. The main thread samples `getrusage` and the reactors'
//! counters at the window's edges while the reactors run.

use crate::config::{BackendKind, LocalConfig};
use crate::error::BenchError;
use crate::results::{
    build_report, new_histogram, CoreResult, CpuTimes, ReactorWindow, Report, RunFacts,
};
use crate::workload::Pattern;
use hdrhistogram::Histogram;
use mirrorpoint_poller::{
    buffer_pool, oneshot, IoBuf, IoBufMut, OneshotReceiver, PoolConfig, ReactorConfig,
    ReactorError, Runtime, RuntimeConfig,
};
use mirrorpoint_target::units::{BlockSize, ByteOffset};
use mirrorpoint_target::volume::registry::{MallocParams, UringParams};
use mirrorpoint_target::volume::{Volume, VolumeChannel, VolumeError, VolumeRegistry, VolumeSpec};
use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Name of the volume under test.
const VOLUME_NAME: &str = "bench0";
/// Seed of the offset generators (fixed: runs are reproducible).
const SEED: u64 = 0x6d69_7272_6f72_7074;
/// Pool chunks beyond what the tasks hold.
const SPARE_CHUNKS: usize = 16;
/// Byte the write buffers are filled with.
const FILL: u8 = 0xa5;

/// The instants every task works to.
#[derive(Debug, Clone, Copy)]
struct Window {
    /// Tasks begin issuing.
    start: Instant,
    /// I/Os issued from here on are measured.
    measure_from: Instant,
    /// Tasks stop; I/Os completed after it are not measured.
    end: Instant,
}

/// One reactor's shared state: its histogram and counters.
struct CoreState {
    latency: RefCell<Histogram<u64>>,
    reads: Cell<u64>,
    writes: Cell<u64>,
    errors: Cell<u64>,
    first_error: RefCell<Option<VolumeError>>,
}

impl CoreState {
    fn fail(&self, e: VolumeError) {
        self.errors.set(self.errors.get() + 1);
        let mut first = self.first_error.borrow_mut();
        if first.is_none() {
            *first = Some(e);
        }
    }
}

/// The buffers a task keeps: one for reads, one (filled once) for writes.
struct TaskBuffers {
    read: Option<IoBufMut>,
    write: Option<IoBuf>,
}

/// One task's loop.
async fn worker(
    ch: Rc<VolumeChannel>,
    state: Rc<CoreState>,
    mut pattern: Pattern,
    mut bufs: TaskBuffers,
    window: Window,
    yield_each_io: bool,
) {
    let mut issued = Instant::now();
    loop {
        let io = pattern.next_io();
        let offset = ByteOffset(io.offset);
        let result = if io.read {
            let Some(buf) = bufs.read.take() else { break };
            let (r, buf) = ch.read(offset, buf).await;
            bufs.read = Some(buf);
            r
        } else {
            let Some(buf) = bufs.write.take() else { break };
            let (r, buf) = ch.write(offset, buf).await;
            bufs.write = Some(buf);
            r
        };
        let done = Instant::now();
        if let Err(e) = result {
            state.fail(e);
            break;
        }
        if issued >= window.measure_from && done <= window.end {
            let ns = done.duration_since(issued).as_nanos() as u64;
            state.latency.borrow_mut().saturating_record(ns.max(1));
            if io.read {
                state.reads.set(state.reads.get() + 1);
            } else {
                state.writes.set(state.writes.get() + 1);
            }
        }
        if done >= window.end || state.errors.get() > 0 {
            break;
        }
        if yield_each_io {
            // The I/O finished without suspending (malloc completes inline):
            // let the other tasks and the reactor's loop run.
            mirrorpoint_poller::yield_now().await;
            issued = Instant::now();
        } else {
            issued = done;
        }
    }
}

/// What a reactor does: set up, say ready, wait for the start, run, report.
async fn core_main(
    core: usize,
    cores: usize,
    volume: Arc<Volume>,
    config: LocalConfig,
    ready: mirrorpoint_poller::OneshotSender<Result<(), BenchError>>,
    go: OneshotReceiver<Window>,
) -> Result<CoreResult, BenchError> {
    let setup = || -> Result<(Rc<VolumeChannel>, Vec<TaskBuffers>), BenchError> {
        let ch = Rc::new(volume.channel());
        let pool = buffer_pool();
        let bs = config.bs as usize;
        let mut all = Vec::with_capacity(config.qd);
        for task in 0..config.qd {
            let none = || BenchError::NoBuffer { core, task };
            let read = match config.read_percent {
                0 => None,
                _ => Some(pool.alloc(bs).ok_or_else(none)?),
            };
            let write = match config.read_percent {
                100 => None,
                _ => {
                    let mut b = pool.alloc(bs).ok_or_else(none)?;
                    b.fill(FILL);
                    Some(b.freeze())
                }
            };
            all.push(TaskBuffers { read, write });
        }
        Ok((ch, all))
    };
    let (ch, buffers) = match setup() {
        Ok(s) => {
            ready.send(Ok(()));
            s
        }
        Err(e) => {
            ready.send(Err(e));
            // The main thread reports the error sent above and ignores this.
            return Err(BenchError::ReactorLost(core));
        }
    };
    let Ok(window) = go.await else {
        return Err(BenchError::ReactorLost(core));
    };
    let state = Rc::new(CoreState {
        latency: RefCell::new(new_histogram()?),
        reads: Cell::new(0),
        writes: Cell::new(0),
        errors: Cell::new(0),
        first_error: RefCell::new(None),
    });
    mirrorpoint_poller::sleep_until(window.start).await;
    let tasks_total = (cores * config.qd) as u64;
    let yield_each_io = config.backend == BackendKind::Malloc;
    let volume_bytes = volume.size().0;
    let tasks: Vec<_> = buffers
        .into_iter()
        .enumerate()
        .map(|(i, bufs)| {
            let pattern = Pattern::new(
                config.workload.is_random(),
                config.read_percent,
                config.bs,
                volume_bytes,
                (core * config.qd + i) as u64,
                tasks_total,
                SEED,
            );
            mirrorpoint_poller::spawn(worker(
                ch.clone(),
                state.clone(),
                pattern,
                bufs,
                window,
                yield_each_io,
            ))
        })
        .collect();
    for t in tasks {
        t.await;
    }
    drop(ch);
    if let Some(first) = state.first_error.borrow_mut().take() {
        return Err(BenchError::Io {
            core,
            count: state.errors.get(),
            first,
        });
    }
    let latency = state.latency.replace(new_histogram()?);
    Ok(CoreResult {
        core,
        latency,
        reads: state.reads.get(),
        writes: state.writes.get(),
    })
}

fn create_volume(config: &LocalConfig) -> Result<(VolumeRegistry, Arc<Volume>), BenchError> {
    let registry = VolumeRegistry::new();
    let block_size = match config.block_size {
        Some(b) => Some(BlockSize::new(b).map_err(|e| BenchError::InvalidArgument(e.to_string()))?),
        None => None,
    };
    let spec = match config.backend {
        BackendKind::Malloc => {
            let bs = block_size.unwrap_or(BlockSize::B512);
            let bytes = config.size.unwrap_or(crate::config::DEFAULT_MALLOC_SIZE);
            VolumeSpec::Malloc(MallocParams {
                name: Some(VOLUME_NAME.into()),
                num_blocks: bytes / u64::from(bs.bytes()),
                block_size: bs,
                uuid: None,
            })
        }
        BackendKind::Uring => {
            let Some(file) = config.file.clone() else {
                return Err(BenchError::InvalidArgument(
                    "--backend uring needs --file PATH".into(),
                ));
            };
            VolumeSpec::Uring(UringParams {
                name: VOLUME_NAME.into(),
                filename: file,
                block_size,
                size: config.size,
                queue_depth: Some(config.qd),
                uuid: None,
            })
        }
    };
    let volume = registry.create(spec)?;
    Ok((registry, volume))
}

/// Pool and ring settings that fit the run.
fn runtime_config(config: &LocalConfig) -> RuntimeConfig {
    let per_task = if config.read_percent == 0 || config.read_percent == 100 {
        1
    } else {
        2
    };
    let chunks = (config.qd * per_task + SPARE_CHUNKS).min(mirrorpoint_poller::buffer::MAX_CHUNKS);
    let ring_entries = (config.qd.max(64) as u32).next_power_of_two().max(1024);
    RuntimeConfig {
        cores: config.cores.clone(),
        reactor: ReactorConfig {
            ring_entries,
            idle_timeout: config
                .idle_timeout
                .unwrap_or(ReactorConfig::default().idle_timeout),
            busy_poll: config.busy_poll,
            pool: PoolConfig {
                chunk_size: config.chunk_size,
                chunk_count: chunks,
                huge_pages: true,
            },
        },
        pin: true,
    }
}

fn sleep_until(t: Instant) {
    let now = Instant::now();
    if t > now {
        std::thread::sleep(t - now);
    }
}

/// Runs `mirrorpoint-bench local` and returns what it measured.
pub fn run_local(config: &LocalConfig) -> Result<Report, BenchError> {
    let (registry, volume) = create_volume(config)?;
    let volume_bytes = volume.size().0;
    let block_size = volume.block_size().bytes();
    config.check_geometry(block_size, volume_bytes)?;
    let o_direct = match config.backend {
        BackendKind::Uring => volume.info().driver_specific["uring"]["o_direct"].as_bool(),
        BackendKind::Malloc => None,
    };
    let rt_config = runtime_config(config);
    let idle_timeout = rt_config.reactor.idle_timeout;
    let mut runtime = Runtime::start(rt_config).map_err(|e| match e {
        ReactorError::NoSuchCore(c) => BenchError::InvalidArgument(format!(
            "--cores: CPU {c} is not available to this process"
        )),
        e => BenchError::Runtime(e),
    })?;
    let handles = runtime.handles().to_vec();

    let mut readies = Vec::new();
    let mut gos = Vec::new();
    let mut results = Vec::new();
    for h in &handles {
        let (ready_tx, ready_rx) = oneshot();
        let (go_tx, go_rx) = oneshot();
        let core = h.index();
        let cores = handles.len();
        let volume = volume.clone();
        let cfg = config.clone();
        results.push(h.spawn(move || core_main(core, cores, volume, cfg, ready_tx, go_rx)));
        readies.push(ready_rx);
        gos.push(go_tx);
    }
    let mut setup_error = None;
    for (i, r) in readies.into_iter().enumerate() {
        match r.recv_blocking() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => setup_error = setup_error.or(Some(e)),
            Err(_) => setup_error = setup_error.or(Some(BenchError::ReactorLost(i))),
        }
    }
    if let Some(e) = setup_error {
        drop(gos); // tasks waiting for the start see the sender go and end
        for r in results {
            let _ = r.recv_blocking();
        }
        runtime.shutdown();
        return Err(e);
    }

    let start = Instant::now() + Duration::from_millis(5);
    let window = Window {
        start,
        measure_from: start + config.ramp,
        end: start + config.ramp + config.time,
    };
    for g in gos {
        g.send(window);
    }

    sleep_until(window.measure_from);
    let cpu0 = CpuTimes::now();
    let stats0: Vec<_> = handles.iter().map(|h| h.stats()).collect();
    sleep_until(window.end);
    let cpu1 = CpuTimes::now();
    let stats1: Vec<_> = handles.iter().map(|h| h.stats()).collect();

    let mut cores = Vec::new();
    let mut first_error = None;
    for (i, r) in results.into_iter().enumerate() {
        match r.recv_blocking() {
            Ok(Ok(c)) => cores.push(c),
            Ok(Err(e)) => first_error = first_error.or(Some(e)),
            Err(_) => first_error = first_error.or(Some(BenchError::ReactorLost(i))),
        }
    }
    runtime.shutdown();
    drop(volume);
    drop(registry);
    if let Some(e) = first_error {
        return Err(e);
    }
    let facts = RunFacts {
        volume_bytes,
        block_size,
        o_direct,
        idle_timeout,
        measured: config.time,
        cpu: cpu1.since(cpu0),
        windows: handles
            .iter()
            .zip(stats0.into_iter().zip(stats1))
            .map(|(h, (start, end))| ReactorWindow {
                reactor: h.index(),
                cpu: h.cpu(),
                start,
                end,
            })
            .collect(),
    };
    build_report(config, &facts, &cores)
}
