//! One reactor: a pinned thread, its io_uring, its tasks, and its loop.
//!
//! Execution model: a small single-threaded async executor per reactor
//! (glommio/monoio style) rather than hand-written state machines. Protocol
//! code (NVMe/TCP queue pairs, iSCSI connections, mirror links) reads as
//! straight-line `async` code, every I/O future completes from this
//! reactor's ring, and tasks never migrate, so they can use `Rc`/`RefCell`
//! and take no locks. Tasks are `async-task` runnables; waking one from
//! this thread pushes it on a local queue, waking it from another thread
//! posts it to the reactor's lock-free inbox and rings the doorbell.
//!
//! Each loop turn reaps completions, drains the inbox, fires timers, runs
//! ready tasks, and submits the new SQEs with one `io_uring_enter`. Disk
//! requests are the exception by default ([`DiskSubmit`]): each enters the
//! ring as soon as it is queued, so the device starts on it while the turn
//! goes on running tasks, as fio does with its default `iodepth_batch=1`. While
//! turns find work, the reactor spins; after `idle_timeout` without work it
//! blocks in the ring until a completion, a doorbell ring or the next timer
//! (unless `busy_poll` is set, for lab benchmarks).

use crate::buffer::{BufferPool, PoolConfig};
use crate::op::{OpKind, OpTable};
use crate::stats::{LocalStats, ReactorStats};
use crate::timer::{TimerId, TimerQueue};
use crate::wake::Doorbell;
use async_task::Runnable;
use crossbeam_queue::SegQueue;
use io_uring::{opcode, types, IoUring};
use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::future::Future;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::pin::Pin;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

/// User data of the doorbell's eventfd read (never a slot index).
const DOORBELL_TAG: u64 = u64::MAX;
/// User data of cancel requests, whose own completions are ignored.
const CANCEL_TAG: u64 = u64::MAX - 1;
/// Fixed-file slots registered per ring.
const FIXED_FILE_SLOTS: u32 = 1024;
/// Tasks run per turn before the reactor reaps completions again.
const TASK_BUDGET: usize = 256;
/// How long shutdown waits for data ops, then for cancelled ops.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

/// Settings of one reactor.
#[derive(Debug, Clone)]
pub struct ReactorConfig {
    /// Submission queue entries (completion queue is twice that).
    pub ring_entries: u32,
    /// Spin this long without work before blocking in the ring.
    pub idle_timeout: Duration,
    /// Never block: spin always (lab benchmarks).
    pub busy_poll: bool,
    /// When disk requests (file reads, writes, syncs) reach the kernel.
    pub disk_submit: DiskSubmit,
    /// The buffer pool each reactor registers with its ring.
    pub pool: PoolConfig,
}

impl Default for ReactorConfig {
    fn default() -> Self {
        ReactorConfig {
            ring_entries: 1024,
            idle_timeout: Duration::from_micros(50),
            busy_poll: false,
            disk_submit: DiskSubmit::default(),
            pool: PoolConfig::default(),
        }
    }
}

/// When a reactor hands disk requests to the kernel.
///
/// Measured on a virtio disk at QD 32 (BENCHMARKS.md, bench v0): batching
/// disk requests with everything else a turn queued cost 10–30% of the
/// randwrite IOPS against submitting each one at once, because the device sat idle
/// for part of every turn while later tasks ran. Sockets stay batched: a
/// network op gains nothing from an early start, and its syscall is the
/// per-I/O cost the front ends are measured on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DiskSubmit {
    /// One `io_uring_enter` per disk request, right when it is queued (it
    /// also carries whatever else is queued by then).
    #[default]
    Immediate,
    /// Disk requests wait for the end of the loop turn, with the rest.
    PerTurn,
}

impl std::str::FromStr for DiskSubmit {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "immediate" => Ok(DiskSubmit::Immediate),
            "per-turn" => Ok(DiskSubmit::PerTurn),
            other => Err(format!(
                "unknown disk submission policy '{other}' (expected 'immediate' or 'per-turn')"
            )),
        }
    }
}

impl std::fmt::Display for DiskSubmit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            DiskSubmit::Immediate => "immediate",
            DiskSubmit::PerTurn => "per-turn",
        })
    }
}

/// Errors starting a reactor.
#[derive(Debug, thiserror::Error)]
pub enum ReactorError {
    /// io_uring could not be set up.
    #[error("io_uring setup failed: {0}")]
    Ring(#[source] io::Error),
    /// The eventfd for the doorbell could not be made.
    #[error("eventfd failed: {0}")]
    EventFd(#[source] io::Error),
    /// The buffer pool could not be built or registered.
    #[error("buffer pool: {0}")]
    Pool(String),
    /// The reactor thread could not be spawned.
    #[error("cannot spawn reactor thread: {0}")]
    Spawn(#[source] io::Error),
    /// The requested core does not exist.
    #[error("core {0} is not available to this process")]
    NoSuchCore(usize),
}

pub(crate) enum Message {
    Run(Box<dyn FnOnce() + Send>),
    Schedule(Runnable),
}

/// The part of a reactor other threads may touch.
pub(crate) struct Shared {
    pub(crate) unique_id: u64,
    inbox: SegQueue<Message>,
    doorbell: Doorbell,
    eventfd: OwnedFd,
    pub(crate) stop: AtomicBool,
    closed: AtomicBool,
    pub(crate) stats: ReactorStats,
}

impl Shared {
    pub(crate) fn new(unique_id: u64) -> Result<Self, ReactorError> {
        // SAFETY: eventfd has no memory arguments; the result is checked below.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if fd < 0 {
            return Err(ReactorError::EventFd(io::Error::last_os_error()));
        }
        Ok(Shared {
            unique_id,
            inbox: SegQueue::new(),
            doorbell: Doorbell::new(),
            // SAFETY: fd is a fresh descriptor we own.
            eventfd: unsafe { OwnedFd::from_raw_fd(fd) },
            stop: AtomicBool::new(false),
            closed: AtomicBool::new(false),
            stats: ReactorStats::default(),
        })
    }

    /// Posts a message; false if the reactor has already shut down.
    pub(crate) fn post(&self, msg: Message) -> bool {
        if self.closed.load(Ordering::Acquire) {
            if let Message::Schedule(r) = msg {
                // A local task may only be dropped on its own thread, which is gone.
                std::mem::forget(r);
            }
            return false;
        }
        self.inbox.push(msg);
        self.ring_doorbell();
        true
    }

    pub(crate) fn ring_doorbell(&self) {
        if self.doorbell.after_publish() {
            let one: u64 = 1;
            // SAFETY: writes 8 bytes from a live u64 to our eventfd.
            let _ = unsafe {
                libc::write(
                    self.eventfd.as_raw_fd(),
                    (&one as *const u64).cast(),
                    std::mem::size_of::<u64>(),
                )
            };
        }
    }
}

/// Everything a reactor owns; lives on its thread only.
pub(crate) struct Core {
    pub(crate) shared: Arc<Shared>,
    pub(crate) index: usize,
    // Field order matters for drop: the ring goes before the pool it registered.
    ring: RefCell<IoUring>,
    pub(crate) ops: RefCell<OpTable>,
    run_queue: RefCell<VecDeque<Runnable>>,
    pub(crate) timers: RefCell<TimerQueue>,
    files: RefCell<FixedFiles>,
    pub(crate) pool: BufferPool,
    config: ReactorConfig,
    doorbell_buf: Box<Cell<u64>>,
    doorbell_armed: Cell<bool>,
    /// SQEs pushed since the last io_uring_enter.
    unsubmitted: Cell<usize>,
    stats: RefCell<LocalStats>,
}

struct FixedFiles {
    enabled: bool,
    free: Vec<u32>,
}

thread_local! {
    static CURRENT: RefCell<Option<Rc<Core>>> = const { RefCell::new(None) };
    static CURRENT_ID: Cell<u64> = const { Cell::new(0) };
}

/// Runs `f` with the current reactor.
///
/// # Panics
/// When called off a reactor thread: I/O futures and spawns exist only there.
pub(crate) fn with_core<T>(f: impl FnOnce(&Rc<Core>) -> T) -> T {
    match try_with_core(f) {
        Some(t) => t,
        None => panic!("mirrorpoint-poller: called outside a reactor thread"),
    }
}

/// Runs `f` with the current reactor, or returns `None` off a reactor.
pub(crate) fn try_with_core<T>(f: impl FnOnce(&Rc<Core>) -> T) -> Option<T> {
    // A shared borrow, not a clone: calls nest freely (only reactor start and
    // exit take the mutable borrow), and the hot path pays no refcounting.
    CURRENT.with(|c| c.borrow().as_ref().map(f))
}

/// Whether this thread is a reactor.
pub fn on_reactor() -> bool {
    CURRENT_ID.with(|c| c.get()) != 0
}

/// The index of the current reactor in its runtime, if on one.
pub fn current_index() -> Option<usize> {
    try_with_core(|c| c.index)
}

/// The current reactor's counters, exact as of now (a [`ReactorHandle`]
/// reads the copy published about once a millisecond).
///
/// [`ReactorHandle`]: crate::ReactorHandle
///
/// # Panics
/// Off a reactor thread.
pub fn current_stats() -> crate::StatsSnapshot {
    with_core(|c| c.stats.borrow().snapshot())
}

/// The current reactor's buffer pool.
///
/// # Panics
/// Off a reactor thread.
pub fn buffer_pool() -> BufferPool {
    with_core(|c| c.pool.clone())
}

impl Core {
    pub(crate) fn new(
        shared: Arc<Shared>,
        index: usize,
        config: ReactorConfig,
    ) -> Result<Self, ReactorError> {
        let ring = build_ring(config.ring_entries).map_err(ReactorError::Ring)?;
        let pool = BufferPool::new(config.pool).map_err(|e| ReactorError::Pool(e.to_string()))?;
        let iovecs = pool.iovecs();
        // SAFETY: the iovecs describe the pool's mapping, which outlives the ring
        // (the ring field is dropped before the pool field).
        unsafe { ring.submitter().register_buffers(&iovecs) }
            .map_err(|e| ReactorError::Pool(format!("register_buffers: {e}")))?;
        let files = match ring.submitter().register_files_sparse(FIXED_FILE_SLOTS) {
            Ok(()) => FixedFiles {
                enabled: true,
                free: (0..FIXED_FILE_SLOTS).rev().collect(),
            },
            Err(e) => {
                tracing::warn!("fixed files unavailable ({e}); using plain descriptors");
                FixedFiles {
                    enabled: false,
                    free: Vec::new(),
                }
            }
        };
        Ok(Core {
            shared,
            index,
            ring: RefCell::new(ring),
            ops: RefCell::new(OpTable::default()),
            run_queue: RefCell::new(VecDeque::new()),
            timers: RefCell::new(TimerQueue::default()),
            files: RefCell::new(files),
            pool,
            config,
            doorbell_buf: Box::new(Cell::new(0)),
            doorbell_armed: Cell::new(false),
            unsubmitted: Cell::new(0),
            stats: RefCell::new(LocalStats::default()),
        })
    }

    /// Pushes one SQE; the caller guarantees its memory stays valid (see `Op::submit`).
    pub(crate) unsafe fn submit_entry(&self, entry: io_uring::squeue::Entry, kind: OpKind) -> u32 {
        let index = self.ops.borrow_mut().reserve(kind);
        let entry = entry.user_data(u64::from(index));
        self.stats.borrow_mut().ios_submitted += 1;
        // SAFETY: forwarded from the caller.
        if unsafe { self.push_sqe(&entry) }.is_err() {
            // Even after flushing the SQ there is no room: fail the op, don't block.
            self.ops.borrow_mut().complete(index, -libc::EBUSY, 0);
        }
        index
    }

    unsafe fn push_sqe(&self, entry: &io_uring::squeue::Entry) -> Result<(), ()> {
        let mut ring = self.ring.borrow_mut();
        // SAFETY: forwarded from the caller.
        let first = unsafe { ring.submission().push(entry) };
        if first.is_ok() {
            self.unsubmitted.set(self.unsubmitted.get() + 1);
            return Ok(());
        }
        let _ = ring.submit();
        self.stats.borrow_mut().submit_calls += 1;
        self.unsubmitted.set(0);
        // SAFETY: as above.
        let second = unsafe { ring.submission().push(entry) };
        if second.is_ok() {
            self.unsubmitted.set(1);
        }
        second.map_err(|_| ())
    }

    /// Called right after a disk request was queued: enters the ring now
    /// when the policy says disk requests must not wait for the turn's end.
    pub(crate) fn disk_request_queued(&self) {
        if self.config.disk_submit != DiskSubmit::Immediate || self.unsubmitted.get() == 0 {
            return;
        }
        self.flush_submissions();
    }

    /// Registers `fd` in a fixed-file slot of this ring.
    pub(crate) fn register_file(&self, fd: RawFd) -> Option<u32> {
        let mut files = self.files.borrow_mut();
        if !files.enabled {
            return None;
        }
        let slot = files.free.pop()?;
        match self
            .ring
            .borrow()
            .submitter()
            .register_files_update(slot, &[fd])
        {
            Ok(_) => Some(slot),
            Err(e) => {
                tracing::warn!("register_files_update: {e}");
                files.free.push(slot);
                None
            }
        }
    }

    /// Releases a fixed-file slot.
    pub(crate) fn unregister_file(&self, slot: u32) {
        let _ = self
            .ring
            .borrow()
            .submitter()
            .register_files_update(slot, &[-1]);
        self.files.borrow_mut().free.push(slot);
    }

    fn arm_doorbell(&self) {
        if self.doorbell_armed.get() {
            return;
        }
        let entry = opcode::Read::new(
            types::Fd(self.shared.eventfd.as_raw_fd()),
            self.doorbell_buf.as_ptr().cast(),
            8,
        )
        .build()
        .user_data(DOORBELL_TAG);
        // SAFETY: doorbell_buf is boxed and lives as long as the core; the ring
        // is torn down (and this read cancelled and reaped) before it is freed.
        if unsafe { self.push_sqe(&entry) }.is_ok() {
            self.doorbell_armed.set(true);
        }
    }

    fn reap(&self) -> usize {
        let mut n = 0;
        let mut ring = self.ring.borrow_mut();
        let mut ops = self.ops.borrow_mut();
        for cqe in ring.completion() {
            match cqe.user_data() {
                DOORBELL_TAG => self.doorbell_armed.set(false),
                CANCEL_TAG => {}
                ud => {
                    ops.complete(ud as u32, cqe.result(), cqe.flags());
                    n += 1;
                }
            }
        }
        self.stats.borrow_mut().ios_completed += n as u64;
        n
    }

    fn drain_inbox(&self) -> usize {
        // `is_empty` is two loads; `pop` on an empty queue adds a SeqCst
        // fence, which an idle spin would pay on every turn.
        if self.shared.inbox.is_empty() {
            return 0;
        }
        let mut n = 0;
        while let Some(msg) = self.shared.inbox.pop() {
            n += 1;
            match msg {
                Message::Run(f) => f(),
                Message::Schedule(r) => self.run_queue.borrow_mut().push_back(r),
            }
            if n >= TASK_BUDGET {
                break;
            }
        }
        n
    }

    fn run_tasks(&self) -> usize {
        let mut n = 0;
        while n < TASK_BUDGET {
            let next = self.run_queue.borrow_mut().pop_front();
            match next {
                Some(r) => {
                    r.run();
                    n += 1;
                }
                None => break,
            }
        }
        self.stats.borrow_mut().tasks_run += n as u64;
        n
    }

    fn flush_submissions(&self) {
        let mut ring = self.ring.borrow_mut();
        // Enter when there is something to submit, or when the kernel has
        // completions waiting to be posted (COOP_TASKRUN + TASKRUN_FLAG).
        if self.unsubmitted.get() == 0 && !ring.submission().taskrun() {
            return;
        }
        if self.unsubmitted.get() > 0 {
            self.stats.borrow_mut().submit_calls += 1;
        }
        self.unsubmitted.set(0);
        {
            if let Err(e) = ring.submit() {
                if e.raw_os_error() != Some(libc::EBUSY) && e.raw_os_error() != Some(libc::EINTR) {
                    tracing::error!("io_uring submit: {e}");
                }
            }
        }
    }

    fn has_ready_work(&self) -> bool {
        !self.run_queue.borrow().is_empty() || !self.shared.inbox.is_empty()
    }

    /// Blocks in the ring until a completion, a doorbell ring or `deadline`.
    fn block(&self, deadline: Option<Instant>) {
        self.shared.doorbell.prepare_sleep();
        if self.has_ready_work() {
            self.shared.doorbell.awake();
            return;
        }
        self.arm_doorbell();
        self.unsubmitted.set(0);
        let ring = self.ring.borrow();
        let result = match deadline {
            Some(d) => {
                let wait = d.saturating_duration_since(Instant::now());
                let ts = types::Timespec::from(wait);
                let args = types::SubmitArgs::new().timespec(&ts);
                ring.submitter().submit_with_args(1, &args)
            }
            None => ring.submit_and_wait(1),
        };
        if let Err(e) = result {
            match e.raw_os_error() {
                Some(libc::ETIME) | Some(libc::EINTR) | Some(libc::EBUSY) => {}
                _ => tracing::error!("io_uring wait: {e}"),
            }
        }
        drop(ring);
        self.shared.doorbell.awake();
        self.stats.borrow_mut().sleeps += 1;
    }

    /// The reactor loop; returns when asked to stop and drained.
    pub(crate) fn run_loop(&self) {
        let mut last_work = Instant::now();
        let mut turn_start = last_work;
        let mut last_publish = last_work;
        let mut stop_seen: Option<Instant> = None;
        loop {
            let mut work = self.reap();
            work += self.drain_inbox();
            work += self.timers.borrow_mut().fire(turn_start);
            work += self.run_tasks();
            self.flush_submissions();

            if stop_seen.is_none() && self.shared.stop.load(Ordering::Acquire) {
                stop_seen = Some(Instant::now());
            }
            if let Some(since) = stop_seen {
                let data = self.ops.borrow().in_flight_data();
                if (data == 0 && !self.has_ready_work()) || since.elapsed() > DRAIN_TIMEOUT {
                    if data > 0 {
                        tracing::warn!(data, "reactor stopping with data ops still in flight");
                    }
                    break;
                }
            }

            let mut now = Instant::now();
            {
                let mut stats = self.stats.borrow_mut();
                let spent = now.duration_since(turn_start);
                if work > 0 {
                    stats.busy += spent;
                    last_work = now;
                } else {
                    stats.idle += spent;
                }
            }
            if work == 0
                && !self.config.busy_poll
                && stop_seen.is_none()
                && now.duration_since(last_work) >= self.config.idle_timeout
            {
                // Publish first: a reactor may now block for a long time.
                self.stats.borrow().publish(&self.shared.stats);
                last_publish = now;
                let deadline = self.timers.borrow_mut().next_deadline();
                self.block(deadline);
                let after = Instant::now();
                self.stats.borrow_mut().idle += after.duration_since(now);
                now = after;
            }
            if now.duration_since(last_publish) >= Duration::from_millis(1) {
                self.stats.borrow().publish(&self.shared.stats);
                last_publish = now;
            }
            turn_start = now;
        }
        self.stats.borrow().publish(&self.shared.stats);
    }

    /// Cancels what the kernel still holds, waits for it, and drops every
    /// task, timer and parked resource on this thread. Returns true when the
    /// kernel still holds memory of ours, which must then be leaked.
    pub(crate) fn teardown(&self) -> bool {
        self.shared.closed.store(true, Ordering::Release);
        // Cancel everything still in the kernel, the doorbell read included.
        let pending = self.ops.borrow().pending_indices();
        for index in pending {
            let e = opcode::AsyncCancel::new(u64::from(index))
                .build()
                .user_data(CANCEL_TAG);
            // SAFETY: a cancel request carries no pointers.
            let _ = unsafe { self.push_sqe(&e) };
        }
        if self.doorbell_armed.get() {
            let e = opcode::AsyncCancel::new(DOORBELL_TAG)
                .build()
                .user_data(CANCEL_TAG);
            // SAFETY: as above.
            let _ = unsafe { self.push_sqe(&e) };
        }
        let deadline = Instant::now() + DRAIN_TIMEOUT;
        while (self.ops.borrow().in_flight() > 0 || self.doorbell_armed.get())
            && Instant::now() < deadline
        {
            {
                let ring = self.ring.borrow();
                let ts = types::Timespec::from(Duration::from_millis(10));
                let args = types::SubmitArgs::new().timespec(&ts);
                let _ = ring.submitter().submit_with_args(1, &args);
            }
            self.reap();
        }
        let leak = self.ops.borrow().in_flight() > 0 || self.doorbell_armed.get();
        if leak {
            tracing::warn!("ops still in the kernel at teardown; leaking their memory");
        }
        // Take everything out first, then drop it outside the borrows: dropping
        // a task may drop ops, which reach back into the table.
        let parked = self.ops.borrow_mut().take_all(leak);
        drop(parked);
        let wakers = self.timers.borrow_mut().drain();
        drop(wakers);
        loop {
            let queued: Vec<Runnable> = self.run_queue.borrow_mut().drain(..).collect();
            let mut inbox = Vec::new();
            while let Some(m) = self.shared.inbox.pop() {
                inbox.push(m);
            }
            if queued.is_empty() && inbox.is_empty() {
                break;
            }
            drop(queued);
            drop(inbox);
        }
        leak
    }
}

/// Builds a ring for one issuer. `COOP_TASKRUN` spares the reactor the
/// inter-processor interrupts the kernel would otherwise use to post
/// completions, but then completions are only posted when the reactor enters
/// the kernel; `TASKRUN_FLAG` makes the kernel say so in the SQ flags, and
/// [`Core::flush_submissions`] enters whenever it is set. (Without the flag, a
/// reactor on a core that does not take the device interrupt and has nothing
/// to submit would never see its completions.)
fn build_ring(entries: u32) -> io::Result<IoUring> {
    let cq = entries.saturating_mul(2);
    IoUring::builder()
        .setup_cqsize(cq)
        .setup_single_issuer()
        .setup_coop_taskrun()
        .setup_taskrun_flag()
        .build(entries)
        .or_else(|_| IoUring::builder().setup_cqsize(cq).build(entries))
}

/// Runs a reactor on the calling thread until it is told to stop.
pub(crate) fn run_reactor(core: Core) {
    let core = Rc::new(core);
    CURRENT.with(|c| *c.borrow_mut() = Some(core.clone()));
    CURRENT_ID.with(|c| c.set(core.shared.unique_id));
    core.run_loop();
    let kernel_holds_memory = core.teardown();
    CURRENT.with(|c| c.borrow_mut().take());
    CURRENT_ID.with(|c| c.set(0));
    if kernel_holds_memory {
        std::mem::forget(core);
        return;
    }
    match Rc::try_unwrap(core) {
        Ok(core) => drop(core),
        // Something still holds the core (a leaked task): leak it with it, so
        // no memory the kernel might touch is freed.
        Err(rc) => std::mem::forget(rc),
    }
}

/// A handle to a task spawned on a reactor; await it for the output, or
/// `detach` it to let it run on its own. Dropping it cancels the task.
pub type Task<T> = async_task::Task<T>;

/// Spawns a task on the current reactor.
///
/// # Panics
/// Off a reactor thread.
pub fn spawn<F>(future: F) -> Task<F::Output>
where
    F: Future + 'static,
    F::Output: 'static,
{
    with_core(|core| {
        let shared = core.shared.clone();
        let my_id = shared.unique_id;
        let schedule = move |runnable: Runnable| {
            if CURRENT_ID.with(|c| c.get()) == my_id {
                let pushed = try_with_core(|c| c.run_queue.borrow_mut().push_back(runnable));
                debug_assert!(pushed.is_some());
            } else {
                shared.post(Message::Schedule(runnable));
            }
        };
        let (runnable, task) = async_task::spawn_local(future, schedule);
        runnable.schedule();
        task
    })
}

/// Waits until `deadline` on the current reactor's timer heap.
pub struct Sleep {
    deadline: Instant,
    timer: Option<TimerId>,
}

/// Sleeps for `duration`.
pub fn sleep(duration: Duration) -> Sleep {
    sleep_until(Instant::now() + duration)
}

/// Sleeps until `deadline`.
pub fn sleep_until(deadline: Instant) -> Sleep {
    Sleep {
        deadline,
        timer: None,
    }
}

impl Future for Sleep {
    type Output = ();
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if Instant::now() >= self.deadline {
            if let Some(id) = self.timer.take() {
                with_core(|c| c.timers.borrow_mut().cancel(id));
            }
            return Poll::Ready(());
        }
        let deadline = self.deadline;
        match self.timer {
            Some(id) => with_core(|c| c.timers.borrow_mut().update(id, cx.waker())),
            None => {
                let id = with_core(|c| c.timers.borrow_mut().insert(deadline, cx.waker().clone()));
                self.timer = Some(id);
            }
        }
        Poll::Pending
    }
}

impl Drop for Sleep {
    fn drop(&mut self) {
        if let Some(id) = self.timer.take() {
            let _ = try_with_core(|c| c.timers.borrow_mut().cancel(id));
        }
    }
}

/// Lets other ready tasks run before continuing.
pub async fn yield_now() {
    struct YieldNow(bool);
    impl Future for YieldNow {
        type Output = ();
        fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
            if self.0 {
                return Poll::Ready(());
            }
            self.0 = true;
            cx.waker().wake_by_ref();
            Poll::Pending
        }
    }
    YieldNow(false).await
}

static NEXT_UNIQUE_ID: AtomicU64 = AtomicU64::new(1);

pub(crate) fn next_unique_id() -> u64 {
    NEXT_UNIQUE_ID.fetch_add(1, Ordering::Relaxed)
}
