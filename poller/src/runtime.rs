//! Starting, addressing and stopping the set of reactors.
//!
//! A [`Runtime`] spawns one OS thread per configured core, pins it with
//! `core_affinity`, and builds the reactor (ring, pool, doorbell) on that
//! thread, because a ring set up for a single issuer must be driven by the
//! thread that made it. A [`ReactorHandle`] is how any thread (another
//! reactor, the admin socket) reaches a reactor: it posts closures to the
//! reactor's lock-free inbox and rings its doorbell.

use crate::reactor::{self, Core, Message, ReactorConfig, ReactorError, Shared};
use crate::stats::StatsSnapshot;
use crate::sync::{oneshot, Canceled, OneshotReceiver};
use std::future::Future;
use std::sync::atomic::Ordering;
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;

/// Which cores to run on and how each reactor behaves.
#[derive(Debug, Clone)]
pub struct RuntimeConfig {
    /// CPU ids, one reactor each. Empty means one reactor on the first CPU
    /// this process may use.
    pub cores: Vec<usize>,
    /// Settings shared by every reactor.
    pub reactor: ReactorConfig,
    /// Pin threads to their cores (off in tests that run many runtimes).
    pub pin: bool,
}

impl Default for RuntimeConfig {
    fn default() -> Self {
        RuntimeConfig {
            cores: Vec::new(),
            reactor: ReactorConfig::default(),
            pin: true,
        }
    }
}

/// A way to reach one reactor from any thread.
#[derive(Clone)]
pub struct ReactorHandle {
    shared: Arc<Shared>,
    index: usize,
    cpu: usize,
}

impl std::fmt::Debug for ReactorHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ReactorHandle(#{} on cpu {})", self.index, self.cpu)
    }
}

impl ReactorHandle {
    /// Index of the reactor in its runtime.
    pub fn index(&self) -> usize {
        self.index
    }

    /// The CPU it runs on.
    pub fn cpu(&self) -> usize {
        self.cpu
    }

    /// Runs `f` on the reactor; false if it has stopped.
    pub fn post(&self, f: impl FnOnce() + Send + 'static) -> bool {
        self.shared.post(Message::Run(Box::new(f)))
    }

    /// Builds a future on the reactor with `make` and runs it there as a task;
    /// the receiver yields its output (await it, or `recv_blocking` it).
    pub fn spawn<F, Fut, T>(&self, make: F) -> OneshotReceiver<T>
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = T> + 'static,
        T: Send + 'static,
    {
        let (tx, rx) = oneshot();
        self.post(move || {
            reactor::spawn(async move {
                tx.send(make().await);
            })
            .detach();
        });
        rx
    }

    /// Runs a future on the reactor and blocks this (non-reactor) thread for
    /// its output.
    pub fn block_on<F, Fut, T>(&self, make: F) -> Result<T, Canceled>
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = T> + 'static,
        T: Send + 'static,
    {
        self.spawn(make).recv_blocking()
    }

    /// The reactor's counters.
    pub fn stats(&self) -> StatsSnapshot {
        self.shared.stats.snapshot()
    }
}

/// The running reactors.
pub struct Runtime {
    handles: Vec<ReactorHandle>,
    threads: Vec<JoinHandle<()>>,
}

impl Runtime {
    /// Starts one reactor per configured core and waits until all are ready.
    pub fn start(config: RuntimeConfig) -> Result<Runtime, ReactorError> {
        let available: Vec<usize> = core_affinity::get_core_ids()
            .unwrap_or_default()
            .into_iter()
            .map(|c| c.id)
            .collect();
        let cores = if config.cores.is_empty() {
            vec![available.first().copied().unwrap_or(0)]
        } else {
            config.cores.clone()
        };
        if config.pin {
            if let Some(missing) = cores.iter().find(|c| !available.contains(c)) {
                return Err(ReactorError::NoSuchCore(*missing));
            }
        }
        let mut runtime = Runtime {
            handles: Vec::new(),
            threads: Vec::new(),
        };
        for (index, &cpu) in cores.iter().enumerate() {
            let shared = Arc::new(Shared::new(reactor::next_unique_id())?);
            let (ready_tx, ready_rx) = mpsc::channel();
            let thread_shared = shared.clone();
            let reactor_config = config.reactor.clone();
            let pin = config.pin;
            let thread = std::thread::Builder::new()
                .name(format!("reactor-{index}"))
                .spawn(move || {
                    if pin && !core_affinity::set_for_current(core_affinity::CoreId { id: cpu }) {
                        tracing::warn!(cpu, "could not pin reactor thread");
                    }
                    match Core::new(thread_shared, index, reactor_config) {
                        Ok(core) => {
                            let _ = ready_tx.send(Ok(()));
                            reactor::run_reactor(core);
                        }
                        Err(e) => {
                            let _ = ready_tx.send(Err(e));
                        }
                    }
                })
                .map_err(ReactorError::Spawn)?;
            runtime.threads.push(thread);
            let started = ready_rx.recv().unwrap_or_else(|_| {
                Err(ReactorError::Spawn(std::io::Error::other(
                    "reactor thread died during start-up",
                )))
            });
            started?;
            runtime.handles.push(ReactorHandle { shared, index, cpu });
        }
        Ok(runtime)
    }

    /// Handles to every reactor, by index.
    pub fn handles(&self) -> &[ReactorHandle] {
        &self.handles
    }

    /// The reactor at `index`.
    pub fn reactor(&self, index: usize) -> Option<&ReactorHandle> {
        self.handles.get(index)
    }

    /// Asks every reactor to stop once its data I/O has drained, and waits.
    pub fn shutdown(&mut self) {
        for h in &self.handles {
            h.shared.stop.store(true, Ordering::Release);
            h.post(|| {});
        }
        for t in self.threads.drain(..) {
            if t.join().is_err() {
                tracing::error!("a reactor thread panicked");
            }
        }
    }
}

impl Drop for Runtime {
    fn drop(&mut self) {
        self.shutdown();
    }
}
