//! Resync of one remote leg: copies the leg's dirty regions from the local
//! device, with a window of regions in flight over the link.
//!
//! One region at a time left the link and both devices idle for a round
//! trip per 64 KiB region (the copy ran at a few hundred MiB/s whatever the
//! link). Here [`RESYNC_DEPTH`] workers, all futures of the supervisor's one
//! task on one reactor (so the pass state is plain `Cell`s), take regions
//! from a shared cursor; each copies its region under the region's overlap
//! lock, exactly as the single loop did, so the rules with host writes are
//! unchanged: a region is read and sent only while no host write to it is in
//! flight, and its dirty bit is cleared only after the leg acknowledged every
//! chunk of it. Progress (cleared bits) is committed every
//! [`RESYNC_COMMIT_EVERY`] by whichever worker sees it due, while the others
//! go on (a cleared bit only ever follows the leg's acknowledgement, so no
//! drain is needed). The rate cap is shared and kept before a copy, not
//! after: a worker reserves its region's bytes in the pass's budget and
//! waits until the cap allows them, so a window of regions never goes out as
//! one burst.

use super::*;

/// How often a resync makes its progress (cleared bits) durable.
const RESYNC_COMMIT_EVERY: Duration = Duration::from_millis(250);

/// Regions copied at once by a resync pass (each waits for a local read
/// and a leg round trip).
pub(super) const RESYNC_DEPTH: usize = 16;

/// One resync pass's shared state (its workers run in one task).
struct Pass {
    cursor: Cell<u64>,
    copied: Cell<u64>,
    /// Bytes taken from the rate cap's budget (copied or being copied).
    reserved: Cell<u64>,
    committing: Cell<bool>,
    last_commit: Cell<Instant>,
    error: RefCell<Option<String>>,
    started: Instant,
}

impl Pass {
    fn fail(&self, e: String) {
        self.error.borrow_mut().get_or_insert(e);
    }

    fn failed(&self) -> bool {
        self.error.borrow().is_some()
    }
}

/// Copies every dirty region of leg `leg` (link generation `gen`) to it.
pub(super) async fn resync(m: &Arc<Mirror>, leg: &Arc<Leg>, gen: u64) -> Result<(), String> {
    let idx = leg.idx;
    let local = m.local().channel();
    leg.resync_total
        .store(m.meta.dirty_regions(idx), Ordering::Relaxed);
    leg.resync_pass_copied.store(0, Ordering::Relaxed);
    let started = Instant::now();
    *leg.resync_started.lock().unwrap_or_else(|p| p.into_inner()) = Some(started);
    let pass = Pass {
        cursor: Cell::new(0),
        copied: Cell::new(0),
        reserved: Cell::new(0),
        committing: Cell::new(false),
        last_commit: Cell::new(started),
        error: RefCell::new(None),
        started,
    };
    let futs: Vec<Pin<Box<dyn Future<Output = ()> + '_>>> = (0..RESYNC_DEPTH)
        .map(|_| Box::pin(worker(m, leg, gen, &local, &pass)) as _)
        .collect();
    join_all(futs).await;
    if let Some(e) = pass.error.borrow_mut().take() {
        return Err(e);
    }
    let copied = pass.copied.get();
    if copied > 0 {
        tracing::info!(
            mirror = m.name,
            leg = idx,
            bytes = copied,
            "resync pass done"
        );
    }
    Ok(())
}

/// Takes the next dirty region after the pass's cursor and copies it, until
/// none is left, an error, or the leg's state changes.
async fn worker(
    m: &Arc<Mirror>,
    leg: &Arc<Leg>,
    gen: u64,
    local: &crate::volume::VolumeChannel,
    pass: &Pass,
) {
    let idx = leg.idx;
    loop {
        if pass.failed() {
            return;
        }
        if m.stopping.load(Ordering::SeqCst)
            || leg.removed.load(Ordering::SeqCst)
            || leg.state() != LegState::Syncing
            || leg.link_gen.load(Ordering::SeqCst) != gen
        {
            pass.fail("resync interrupted".into());
            return;
        }
        let Some(r) = m.meta.next_dirty(idx, pass.cursor.get()) else {
            return;
        };
        pass.cursor.set(r + 1);
        let rs = m.meta.region_size();
        // Every region takes its bytes from the budget (also with no cap,
        // so a cap set mid-pass counts what was copied before it).
        let before = pass.reserved.get();
        pass.reserved.set(before + rs);
        let rate = m.resync_rate.load(Ordering::Relaxed);
        if rate > 0 {
            // Wait until the cap allows the bytes before this region.
            let due = Duration::from_secs_f64(before as f64 / rate as f64);
            if let Some(wait) = due.checked_sub(pass.started.elapsed()) {
                sleep(wait).await;
            }
        }
        let n = match copy_region(m, leg, gen, local, r).await {
            Ok(n) => n,
            Err(e) => {
                pass.fail(e);
                return;
            }
        };
        if n == 0 {
            // Nothing copied: give the budget back.
            pass.reserved.set(pass.reserved.get().saturating_sub(rs));
            continue;
        }
        // Progress reaches the file now and then, so a crash in a long
        // (full) sync resumes near where it was rather than from zero.
        if !pass.committing.get() && pass.last_commit.get().elapsed() >= RESYNC_COMMIT_EVERY {
            pass.committing.set(true);
            pass.last_commit.set(Instant::now());
            if let Err(e) = m.meta.commit().await {
                tracing::warn!(
                    mirror = m.name,
                    leg = idx,
                    "metadata commit during resync: {e}"
                );
            }
            pass.committing.set(false);
        }
        let copied = pass.copied.get() + n;
        pass.copied.set(copied);
        leg.resync_copied.fetch_add(n, Ordering::Relaxed);
        leg.resync_pass_copied.fetch_add(1, Ordering::Relaxed);
        let el = pass.started.elapsed();
        leg.resync_rate_seen.store(
            (copied as f64 / el.as_secs_f64().max(1e-6)) as u64,
            Ordering::Relaxed,
        );
    }
}

/// Copies region `r` to the leg under its overlap lock. Returns the bytes
/// copied (0: nothing to copy any more).
async fn copy_region(
    m: &Arc<Mirror>,
    leg: &Arc<Leg>,
    gen: u64,
    local: &crate::volume::VolumeChannel,
    r: u64,
) -> Result<u64, String> {
    let idx = leg.idx;
    let rs = m.meta.region_size();
    let size = m.local().size().0;
    let chunk = mirrorpoint_poller::buffer_pool().chunk_size() as u64;
    let start = r * rs;
    let end = (start + rs).min(size);
    let guard = m.overlap.lock(start, end);
    guard.ready().await;
    if !m.meta.is_dirty(idx, r) {
        return Ok(0);
    }
    if m.recovery.is_dirty(r) {
        // The local device misses this region (failed or being
        // rebuilt): the leg holds the newest data there.
        m.meta.clear_dirty(idx, r);
        return Ok(0);
    }
    if !m.recovery.local_readable(start, end - start) {
        return Err("the local device failed: the leg waits for its recovery".into());
    }
    if leg.removed.load(Ordering::SeqCst) {
        return Err("leg removed".into());
    }
    let link = m.core_link(leg).ok_or("link lost during resync")?;
    let mut off = start;
    while off < end {
        let len = chunk.min(end - off);
        let b = alloc_wait(len as usize).await.map_err(|e| e.to_string())?;
        let (res, b) = local.read(ByteOffset(off), b).await;
        if let Err(e) = res {
            let why = format!("local read for resync: {e}");
            if recovery::is_device_error(&e) {
                recovery::fail_local(m, off, len, &why).await;
            }
            return Err(why);
        }
        let data = b.freeze();
        let stamp = m.gate().peek();
        let msg = Message::Write(Write {
            mirror: m.id,
            seq: SeqNo(stamp.seq),
            epoch: Epoch(stamp.epoch),
            flags: WriteFlags::RESYNC,
            offset: ByteOffset(off),
            data: &data,
        });
        match link
            .request(&msg, std::slice::from_ref(&data), m.cfg.link_timeout)
            .await
        {
            Ok(Reply::Write(Status::Ok)) => {}
            Ok(_) => {
                m.leg_failed(leg, gen, "resync write refused");
                return Err("resync write refused".into());
            }
            Err(e) => {
                if link.kill() {
                    LINKS.with(|l| {
                        let mut l = l.borrow_mut();
                        if l.get(&(m.uid, idx)).is_some_and(|c| Rc::ptr_eq(c, &link)) {
                            l.remove(&(m.uid, idx));
                        }
                    });
                }
                m.leg_failed(leg, gen, &format!("resync: {e}"));
                return Err(e);
            }
        }
        off += len;
    }
    if leg.removed.load(Ordering::SeqCst) {
        // The slot may be handed to a new leg only after this task
        // ended; still, never clear a bit of a leg that is gone.
        return Err("leg removed".into());
    }
    m.meta.clear_dirty(idx, r);
    drop(guard);
    Ok(end - start)
}
