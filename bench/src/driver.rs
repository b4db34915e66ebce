//! The per-core load: QD tasks per reactor, each doing one I/O at a time.
//!
//! Shaped like SPDK's bdevperf: the load runs inside the process on the same
//! reactors and volume channels a front end would use, so what it measures
//! is the cost of `poller` + `target` and nothing else. Each reactor opens
//! its own channel(s) ([`Channel`]: a [`VolumeChannel`] for `local`, one
//! NVMe/TCP I/O queue per connection for `nvmf`, see `crate::nvmf`) and
//! spawns `qd` local tasks per channel; each task owns its
//! pool buffer(s) for the whole run (a write buffer is filled with random
//! bytes once, before the clock starts, and stamped with the offset and a
//! counter before each write, so no two writes carry the same data), its
//! own [`Pattern`], and loops "next I/O, submit, await, record" until the
//! deadline.
//!
//! The hot loop allocates nothing, makes no syscalls of its own (the ring's
//! submissions are the reactor's; over NVMe/TCP whatever the initiator
//! does per command is part of what the bench's CPU figure measures) and
//! reads the clock once per I/O: the
//! completion time of one I/O is the issue time of the next, since a task
//! issues again straight away. The exception is a volume that completes
//! inline without ever suspending the task (malloc, or a file on tmpfs,
//! see `Volume::completes_inline`): there each task
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

use crate::config::{BackendKind, LoadConfig, LocalConfig};
use crate::error::{BenchError, IoFailure};
use crate::results::{
    build_report, new_histogram, CoreResult, CpuTimes, ReactorWindow, Report, RunFacts,
};
use crate::targetcpu::{ProcSample, TargetCpu, TargetReactor, TargetRpc};
use crate::timeline::{spawn_event, EventRun, Sample};
use crate::workload::{Pattern, WyRand};
use hdrhistogram::Histogram;
use mirrorpoint_poller::{
    buffer_pool, oneshot, DiskSubmit, IoBuf, IoBufMut, OneshotReceiver, OneshotSender, PoolConfig,
    ReactorConfig, ReactorError, ReactorHandle, Runtime, RuntimeConfig, StatsSnapshot,
};
use mirrorpoint_target::nvmf::host::IoQueue;
use mirrorpoint_target::units::{BlockSize, ByteOffset};
use mirrorpoint_target::volume::registry::{MallocParams, UringParams};
use mirrorpoint_target::volume::{Volume, VolumeChannel, VolumeRegistry, VolumeSpec};
use std::cell::{Cell, RefCell};
use std::future::Future;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Name of the volume under test.
const VOLUME_NAME: &str = "bench0";
/// Seed of the offset generators (fixed: runs are reproducible).
const SEED: u64 = 0x6d69_7272_6f72_7074;
/// Pool chunks beyond what the tasks hold.
const SPARE_CHUNKS: usize = 16;
/// Bytes between two stamps of [`stamp_write_buffer`] (one per 512-byte sector).
const STAMP_STRIDE: usize = 512;
/// Timeline samples reserved per core and measured second.
const SAMPLES_PER_CORE_SECOND: f64 = 100_000.0;
/// Most timeline samples reserved up front per core (64 MiB).
const MAX_RESERVED_SAMPLES: usize = 4 << 20;

/// The instants every task works to.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Window {
    /// Tasks begin issuing.
    start: Instant,
    /// I/Os issued from here on are measured.
    measure_from: Instant,
    /// Tasks stop; I/Os completed after it are not measured.
    end: Instant,
}

/// Where a task's I/Os go: a volume channel in this process, or an NVMe/TCP
/// I/O queue. Both are opened on the reactor that uses them.
pub(crate) enum Channel {
    /// `local`: the volume directly.
    Volume(VolumeChannel),
    /// `nvmf`: one I/O queue (TCP connection) of the controller.
    Nvmf {
        /// The queue.
        q: IoQueue,
        /// Namespace driven.
        nsid: u32,
        /// Its block size in bytes.
        block: u64,
    },
}

impl Channel {
    async fn read(&self, offset: u64, buf: IoBufMut) -> (Result<(), IoFailure>, IoBufMut) {
        match self {
            Channel::Volume(ch) => {
                let (r, b) = ch.read(ByteOffset(offset), buf).await;
                (r.map_err(IoFailure::from), b)
            }
            Channel::Nvmf { q, nsid, block } => {
                let blocks = (buf.len() as u64 / block) as u32;
                let (r, b) = q.read(*nsid, offset / block, blocks, buf).await;
                (r.map_err(IoFailure::from), b)
            }
        }
    }

    async fn write(&self, offset: u64, buf: IoBuf) -> (Result<(), IoFailure>, IoBuf) {
        match self {
            Channel::Volume(ch) => {
                let (r, b) = ch.write(ByteOffset(offset), buf).await;
                (r.map_err(IoFailure::from), b)
            }
            Channel::Nvmf { q, nsid, block } => {
                // The initiator sends from a shared view of the chunk, so the
                // task keeps its buffer (no copy, no refill).
                let r = q.write(*nsid, offset / block, buf.clone()).await;
                (r.map_err(IoFailure::from), buf)
            }
        }
    }
}

/// One channel's share of a reactor's load.
pub(crate) struct Lane {
    /// Where its tasks' I/Os go.
    pub(crate) ch: Rc<Channel>,
    /// Index (over the whole run) of its first task; its tasks follow.
    pub(crate) first_task: u64,
}

/// One reactor's shared state: its histogram and counters.
struct CoreState {
    latency: RefCell<Histogram<u64>>,
    reads: Cell<u64>,
    writes: Cell<u64>,
    errors: Cell<u64>,
    first_error: RefCell<Option<IoFailure>>,
    /// Every measured I/O (completion, latency), when a timeline is asked for.
    samples: Option<RefCell<Vec<Sample>>>,
}

impl CoreState {
    fn fail(&self, e: IoFailure) {
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
    /// Writes this task has stamped (see [`stamp_write_buffer`]).
    stamps: u64,
}

/// Makes every write's content unique, as fio's default `scramble_buffers`
/// does: the buffer holds random bytes from the start, and before each
/// write the first 16 bytes of every 512-byte sector get the write's offset
/// and a per-task counter. A device or host that compresses or
/// deduplicates (a VM's image on a copy-on-write or compressing store)
/// would otherwise see the same block written over and over and answer
/// differently than it does for real data. Costs 16 stores per 4 KiB. A
/// buffer still shared (a volume that kept a reference) is written as is.
fn stamp_write_buffer(buf: IoBuf, offset: u64, stamps: &mut u64) -> IoBuf {
    let mut owned = match buf.try_into_mut() {
        Ok(b) => b,
        Err(shared) => return shared,
    };
    *stamps = stamps.wrapping_add(1);
    for sector in owned.chunks_mut(STAMP_STRIDE) {
        if let Some(head) = sector.get_mut(..16) {
            head[..8].copy_from_slice(&offset.to_le_bytes());
            head[8..].copy_from_slice(&stamps.to_le_bytes());
        }
    }
    owned.freeze()
}

/// Fills a write buffer with pseudo-random bytes (a distinct stream per task).
fn fill_random(buf: &mut [u8], seed: u64) {
    let mut rng = WyRand::new(seed);
    for word in buf.chunks_mut(8) {
        let bytes = rng.next_u64().to_le_bytes();
        word.copy_from_slice(&bytes[..word.len()]);
    }
}

/// One task's loop.
async fn worker(
    ch: Rc<Channel>,
    state: Rc<CoreState>,
    mut pattern: Pattern,
    mut bufs: TaskBuffers,
    window: Window,
    yield_each_io: bool,
) {
    let mut issued = Instant::now();
    loop {
        let io = pattern.next_io();
        let result = if io.read {
            let Some(buf) = bufs.read.take() else { break };
            let (r, buf) = ch.read(io.offset, buf).await;
            bufs.read = Some(buf);
            r
        } else {
            let Some(buf) = bufs.write.take() else { break };
            let buf = stamp_write_buffer(buf, io.offset, &mut bufs.stamps);
            let (r, buf) = ch.write(io.offset, buf).await;
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
            if let Some(samples) = &state.samples {
                let at = done.duration_since(window.measure_from).as_nanos() as u64;
                samples.borrow_mut().push((at, ns));
            }
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

/// What the driver needs to know about the run besides the load.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Shape {
    /// Bytes the I/Os may address.
    pub(crate) volume_bytes: u64,
    /// Tasks over all reactors (for spreading sequential cursors).
    pub(crate) tasks_total: u64,
    /// Tasks yield after each I/O (the backend completes inline).
    pub(crate) yield_each_io: bool,
}

fn task_buffers(load: &LoadConfig, core: usize, task: usize) -> Result<TaskBuffers, BenchError> {
    let pool = buffer_pool();
    let bs = load.bs as usize;
    let none = || BenchError::NoBuffer { core, task };
    let read = match load.read_percent {
        0 => None,
        _ => Some(pool.alloc(bs).ok_or_else(none)?),
    };
    let write = match load.read_percent {
        100 => None,
        _ => {
            let mut b = pool.alloc(bs).ok_or_else(none)?;
            fill_random(&mut b, SEED ^ ((core as u64) << 32) ^ task as u64);
            Some(b.freeze())
        }
    };
    Ok(TaskBuffers {
        read,
        write,
        stamps: 0,
    })
}

/// What a reactor does: set up its lanes (`setup`), take `load.qd` task
/// buffers per lane, say ready, wait for the start, run, report.
pub(crate) async fn core_main<S>(
    core: usize,
    setup: S,
    load: LoadConfig,
    shape: Shape,
    ready: OneshotSender<Result<(), BenchError>>,
    go: OneshotReceiver<Window>,
) -> Result<CoreResult, BenchError>
where
    S: Future<Output = Result<Vec<Lane>, BenchError>>,
{
    let prepared = async {
        let lanes = setup.await?;
        let mut all = Vec::new();
        for lane in lanes {
            let mut bufs = Vec::with_capacity(load.qd);
            for task in 0..load.qd {
                bufs.push(task_buffers(&load, core, all.len() * load.qd + task)?);
            }
            all.push((lane, bufs));
        }
        Ok::<_, BenchError>(all)
    }
    .await;
    let lanes = match prepared {
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
        samples: load.timeline.as_ref().map(|_| {
            // Reserved before the clock starts; a faster run grows it
            // (amortised, rarely).
            let expected = (load.time.as_secs_f64() * SAMPLES_PER_CORE_SECOND) as usize;
            RefCell::new(Vec::with_capacity(expected.min(MAX_RESERVED_SAMPLES)))
        }),
    });
    mirrorpoint_poller::sleep_until(window.start).await;
    let mut tasks = Vec::new();
    for (lane, bufs) in lanes {
        for (i, b) in bufs.into_iter().enumerate() {
            let pattern = Pattern::new(
                load.workload.is_random(),
                load.read_percent,
                load.bs,
                shape.volume_bytes,
                lane.first_task + i as u64,
                shape.tasks_total,
                SEED,
            );
            tasks.push(mirrorpoint_poller::spawn(worker(
                lane.ch.clone(),
                state.clone(),
                pattern,
                b,
                window,
                shape.yield_each_io,
            )));
        }
    }
    for t in tasks {
        t.await;
    }
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
        samples: state.samples.as_ref().map(|s| s.take()).unwrap_or_default(),
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

/// Pool and ring settings that fit the run: `tasks_per_core` tasks on the
/// busiest reactor, and `extra_chunks` more for whatever else it runs.
pub(crate) fn runtime_config(
    load: &LoadConfig,
    tasks_per_core: usize,
    extra_chunks: usize,
) -> RuntimeConfig {
    let per_task = if load.read_percent == 0 || load.read_percent == 100 {
        1
    } else {
        2
    };
    let chunks = (tasks_per_core * per_task + SPARE_CHUNKS + extra_chunks)
        .min(mirrorpoint_poller::buffer::MAX_CHUNKS);
    let ring_entries = (tasks_per_core.max(64) as u32)
        .next_power_of_two()
        .max(1024);
    RuntimeConfig {
        cores: load.cores.clone(),
        reactor: ReactorConfig {
            ring_entries,
            idle_timeout: load
                .idle_timeout
                .unwrap_or(ReactorConfig::default().idle_timeout),
            busy_poll: load.busy_poll,
            disk_submit: DiskSubmit::default(),
            pool: PoolConfig {
                chunk_size: load.chunk_size,
                chunk_count: chunks,
                huge_pages: true,
            },
        },
        pin: true,
    }
}

/// Starts the reactors, mapping an unusable CPU to a bad argument.
pub(crate) fn start_runtime(config: RuntimeConfig) -> Result<Runtime, BenchError> {
    Runtime::start(config).map_err(|e| match e {
        ReactorError::NoSuchCore(c) => BenchError::InvalidArgument(format!(
            "--cores: CPU {c} is not available to this process"
        )),
        e => BenchError::Runtime(e),
    })
}

fn sleep_until(t: Instant) {
    let now = Instant::now();
    if t > now {
        std::thread::sleep(t - now);
    }
}

/// What the main thread saw of a run.
pub(crate) struct Measured {
    /// Each reactor's result.
    pub(crate) cores: Vec<CoreResult>,
    /// This process's CPU time over the window.
    pub(crate) cpu: CpuTimes,
    /// Reactor counters around the window.
    pub(crate) windows: Vec<ReactorWindow>,
    /// The target's CPU time over the window, if a pid was given.
    pub(crate) target: Option<TargetCpu>,
    /// The target's reactors over the window, by their own accounting, if
    /// its admin socket was given.
    pub(crate) target_reactors: Option<Vec<TargetReactor>>,
    /// The timeline's events, as they ran.
    pub(crate) events: Vec<EventRun>,
}

/// Runs one [`core_main`] per reactor (made by `spawn_core`), starts them
/// together once all are set up, samples CPU and counters at the edges of
/// the measured window, and collects the results. The runtime is left
/// running for the caller to shut down.
pub(crate) fn drive<F>(
    handles: &[ReactorHandle],
    load: &LoadConfig,
    target_pid: Option<u32>,
    mut target_rpc: Option<&mut TargetRpc>,
    mut spawn_core: F,
) -> Result<Measured, BenchError>
where
    F: FnMut(
        &ReactorHandle,
        OneshotSender<Result<(), BenchError>>,
        OneshotReceiver<Window>,
    ) -> OneshotReceiver<Result<CoreResult, BenchError>>,
{
    let mut readies = Vec::new();
    let mut gos = Vec::new();
    let mut results = Vec::new();
    for h in handles {
        let (ready_tx, ready_rx) = oneshot();
        let (go_tx, go_rx) = oneshot();
        results.push(spawn_core(h, ready_tx, go_rx));
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
        return Err(e);
    }

    let start = Instant::now() + Duration::from_millis(5);
    let window = Window {
        start,
        measure_from: start + load.ramp,
        end: start + load.ramp + load.time,
    };
    for g in gos {
        g.send(window);
    }
    let events: Vec<_> = load
        .timeline
        .iter()
        .flat_map(|t| t.events.iter().cloned())
        .map(|e| spawn_event(e, window.measure_from))
        .collect();

    sleep_until(window.measure_from);
    let target0 = target_pid.map(ProcSample::take).transpose();
    let reactors0 = target_rpc.as_mut().map(|t| t.sample()).transpose();
    let cpu0 = CpuTimes::now();
    let stats0: Vec<StatsSnapshot> = handles.iter().map(|h| h.stats()).collect();
    sleep_until(window.end);
    let target1 = target_pid.map(ProcSample::take).transpose();
    let reactors1 = target_rpc.as_mut().map(|t| t.sample()).transpose();
    let cpu1 = CpuTimes::now();
    let stats1: Vec<StatsSnapshot> = handles.iter().map(|h| h.stats()).collect();

    let mut cores = Vec::new();
    let mut first_error = None;
    for (i, r) in results.into_iter().enumerate() {
        match r.recv_blocking() {
            Ok(Ok(c)) => cores.push(c),
            Ok(Err(e)) => first_error = first_error.or(Some(e)),
            Err(_) => first_error = first_error.or(Some(BenchError::ReactorLost(i))),
        }
    }
    let mut runs = Vec::new();
    for e in events {
        match e.join() {
            Ok(Ok(run)) => runs.push(run),
            Ok(Err(err)) => first_error = first_error.or(Some(err)),
            Err(_) => {
                first_error = first_error.or(Some(BenchError::Event {
                    command: "(its thread panicked)".into(),
                    error: std::io::Error::other("event thread panicked"),
                }))
            }
        }
    }
    if let Some(e) = first_error {
        return Err(e);
    }
    let target = match (target0?, target1?) {
        (Some(a), Some(b)) => Some(b.since(&a)),
        _ => None,
    };
    let target_reactors = match (reactors0?, reactors1?) {
        (Some(a), Some(b)) => Some(b.since(&a)),
        _ => None,
    };
    Ok(Measured {
        cores,
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
        target,
        target_reactors,
        events: runs,
    })
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
    let load = config.load();
    let mut rt_config = runtime_config(&load, load.qd, 0);
    rt_config.reactor.disk_submit = config.disk_submit;
    let idle_timeout = rt_config.reactor.idle_timeout;
    let mut runtime = start_runtime(rt_config)?;
    let handles = runtime.handles().to_vec();
    let cores = handles.len();
    let shape = Shape {
        volume_bytes,
        tasks_total: (cores * load.qd) as u64,
        yield_each_io: volume.completes_inline(),
    };
    let measured = drive(&handles, &load, None, None, |h, ready, go| {
        let core = h.index();
        let volume = volume.clone();
        let load = load.clone();
        let first_task = (core * load.qd) as u64;
        h.spawn(move || {
            let setup = async move {
                Ok(vec![Lane {
                    ch: Rc::new(Channel::Volume(volume.channel())),
                    first_task,
                }])
            };
            core_main(core, setup, load, shape, ready, go)
        })
    });
    runtime.shutdown();
    drop(volume);
    drop(registry);
    let measured = measured?;
    let facts = RunFacts {
        volume_bytes,
        block_size,
        o_direct,
        idle_timeout,
        disk_submit: Some(config.disk_submit),
        measured: config.time,
        cpu: measured.cpu,
        windows: measured.windows,
        events: measured.events,
    };
    let mut report = build_report(&load, &facts, &measured.cores)?;
    report.backend = Some(config.backend);
    report.file = config.file.as_ref().map(|p| p.display().to_string());
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_write_carries_distinct_data_with_its_offset() {
        let pool = mirrorpoint_poller::BufferPool::new(PoolConfig {
            chunk_size: 4096,
            chunk_count: 2,
            ..PoolConfig::default()
        })
        .expect("pool");
        let mut b = pool.alloc(4096).expect("chunk");
        fill_random(&mut b, 7);
        let mut buf = b.freeze();
        let mut stamps = 0;
        let mut seen = Vec::new();
        for offset in [0u64, 4096, 0] {
            buf = stamp_write_buffer(buf, offset, &mut stamps);
            // Every sector starts with the offset, then the counter.
            for sector in buf.chunks(STAMP_STRIDE) {
                assert_eq!(sector[..8], offset.to_le_bytes());
                assert_eq!(sector[8..16], stamps.to_le_bytes());
            }
            seen.push(buf.to_vec());
        }
        assert_ne!(seen[0], seen[2], "the same offset twice is still new data");
        // The rest of each sector is the random fill, not a constant.
        assert!(seen[0][16..512].iter().any(|&x| x != seen[0][16]));
        // A buffer someone else still holds is left alone.
        let held = buf.clone();
        let again = stamp_write_buffer(buf, 8192, &mut stamps);
        assert_eq!(again.to_vec(), held.to_vec());
        assert_eq!(stamps, 3);
    }
}
