//! `watchdog`: a member that stops answering must not stop the filesystem.
//!
//! One watchdog sits above each device (below the stripe), so it knows which
//! member a request went to. Every request passing it goes down as a
//! *detached* copy (`Io::detached`): the same operation over the same
//! buffers, tied to the request above by nothing but this layer. When the
//! copy answers, the request above completes with its result. When it has
//! not answered within the timeout, the request above completes with
//! ETIMEDOUT at once, the member is marked faulted in the pool's `Health`
//! (one log line naming it), and a cancel is sent below. The copy stays in flight,
//! owning its buffers (and the device its iovec), until the device really
//! answers: a request blocked in an io-wq worker (a hung disk, a stopped
//! NBD or FUSE server) cannot be taken back, and nothing may be written into
//! memory that has been reused. Its late answer is logged and dropped.
//!
//! What the caller sees: ETIMEDOUT means the request went to the device and
//! has not answered; it may still be carried out (a write may still land,
//! so the space it fills must stay reserved until the device has answered,
//! which for the filesystem means this session). EIO means the device
//! answered with a failure, or the request never reached it.
//!
//! A faulted member gets no more requests: they fail with EIO at once, so
//! reads of what it holds fail fast and nothing piles up behind it (with a
//! mirror, another copy answers).
//!
//! Flushes are never timed out: a flush may legitimately take long (it
//! writes back everything the device caches). A flush sent to a faulted
//! member fails with EIO at once, like any request; a flush in flight when
//! the member faults (through another request's timeout) completes with EIO
//! then, its outcome unknown: the filesystem is in its failed state by then
//! and acts on no commit. Its copy stays in flight below (not cancelled: it
//! holds no buffer, and may still make earlier writes durable).

use crate::errno::Errno;
use crate::io::{Io, Op};
use crate::layer::Layer;
use crate::map::{self, Map, Mapping};
use parking_lot::{Condvar, Mutex};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The state of each member of a pool, shared by its watchdogs and mirrors
/// and read by the filesystem (its failed state) and `stackfs info`.
pub struct Health {
    members: Mutex<Vec<Member>>,
    any: AtomicBool,
    /// Per member: faulted (read without the lock, on every request).
    faulted: Vec<AtomicBool>,
    /// Members that hold the same data (mirror groups, by member index): the
    /// pool is lost only when every member of a group is faulted.
    groups: Mutex<Vec<Vec<usize>>>,
}

#[derive(Clone, Debug, Default)]
pub struct Member {
    pub name: String,
    /// Why the member is faulted; None while it answers.
    pub faulted: Option<String>,
    /// Requests failed because the member did not answer in time.
    pub timeouts: u64,
    /// Answers that came after their request had been failed.
    pub late: u64,
    /// Reads the member failed (a mirror read them from another copy).
    pub read_errors: u64,
    /// Writes (and flushes, discards) the member failed.
    pub write_errors: u64,
    /// Reads whose bytes failed verification above the mirror (found
    /// different from the good copy when healing).
    pub checksum_errors: u64,
    /// Ranges rewritten from a good copy, and their bytes.
    pub repairs: u64,
    pub bytes_repaired: u64,
}

impl Health {
    pub fn new(names: Vec<String>) -> Arc<Health> {
        let faulted = names.iter().map(|_| AtomicBool::new(false)).collect();
        Arc::new(Health {
            faulted,
            members: Mutex::new(
                names
                    .into_iter()
                    .map(|name| Member {
                        name,
                        ..Member::default()
                    })
                    .collect(),
            ),
            any: AtomicBool::new(false),
            groups: Mutex::new(Vec::new()),
        })
    }

    /// Declare which members mirror each other (`spec` does it when it builds
    /// `mirror=N`); a member in no group holds the only copy of its data.
    pub fn set_groups(&self, groups: Vec<Vec<usize>>) {
        *self.groups.lock() = groups;
    }

    /// The mirror groups, by member index (none without a mirror).
    pub fn groups(&self) -> Vec<Vec<usize>> {
        self.groups.lock().clone()
    }

    /// Copies each mirror group keeps (1 without a mirror).
    pub fn copies(&self) -> usize {
        self.groups.lock().first().map_or(1, |g| g.len().max(1))
    }

    /// Whether member `i` is faulted.
    pub fn is_faulted(&self, i: usize) -> bool {
        self.faulted
            .get(i)
            .is_some_and(|f| f.load(Ordering::Acquire))
    }

    /// Whether any member is faulted (cheap: one atomic load).
    pub fn any_faulted(&self) -> bool {
        self.any.load(Ordering::Acquire)
    }

    /// Whether some data has no copy left: a mirror group with every member
    /// faulted, or a faulted member that is in no group. Cheap while no
    /// member is faulted. The filesystem's failed state.
    pub fn lost(&self) -> bool {
        if !self.any_faulted() {
            return false;
        }
        let groups = self.groups.lock();
        let group_lost = groups
            .iter()
            .any(|g| !g.is_empty() && g.iter().all(|&i| self.is_faulted(i)));
        let alone_lost = (0..self.faulted.len())
            .any(|i| self.is_faulted(i) && !groups.iter().any(|g| g.contains(&i)));
        group_lost || alone_lost
    }

    fn has_copies(&self, i: usize) -> bool {
        self.groups
            .lock()
            .iter()
            .any(|g| g.len() > 1 && g.contains(&i))
    }

    pub fn members(&self) -> Vec<Member> {
        self.members.lock().clone()
    }

    /// Mark member `i` faulted after a timeout; logs once per member.
    pub fn fault(&self, i: usize, why: String) {
        self.update(i, |member| member.timeouts += 1);
        self.mark_faulted(i, why);
    }

    /// Mark member `i` faulted (it failed a write, or stopped answering):
    /// it gets no more requests. Logs once per member.
    pub fn mark_faulted(&self, i: usize, why: String) {
        let consequence = if self.has_copies(i) {
            "its mirror group carries on with the other copies"
        } else {
            "the filesystem stops writing"
        };
        self.update(i, |member| {
            if member.faulted.is_none() {
                log::error!("member {i} ({}) faulted: {why}; {consequence}", member.name);
                member.faulted = Some(why);
            }
        });
        if let Some(f) = self.faulted.get(i) {
            f.store(true, Ordering::Release);
            self.any.store(true, Ordering::Release);
        }
    }

    pub fn count_read_error(&self, i: usize) {
        self.update(i, |member| member.read_errors += 1);
    }

    pub fn count_write_error(&self, i: usize) {
        self.update(i, |member| member.write_errors += 1);
    }

    pub fn count_checksum_error(&self, i: usize) {
        self.update(i, |member| member.checksum_errors += 1);
    }

    /// Member `i` had `bytes` rewritten from a good copy.
    pub fn count_repair(&self, i: usize, bytes: u64) {
        self.update(i, |member| {
            member.repairs += 1;
            member.bytes_repaired += bytes;
        });
    }

    fn late(&self, i: usize) {
        self.update(i, |member| member.late += 1);
    }

    fn update(&self, i: usize, change: impl FnOnce(&mut Member)) {
        if let Some(member) = self.members.lock().get_mut(i) {
            change(member);
        }
    }
}

struct Tracked {
    started: Instant,
    /// The request above, until it has been completed (by the answer or
    /// by the timeout).
    upper: Io,
    /// The copy in flight below.
    lower: Io,
    /// Set by whichever completes the request above first.
    done: Arc<AtomicBool>,
    /// False for flushes, which are never timed out.
    timed: bool,
}

struct Shared {
    inflight: Mutex<HashMap<u64, Tracked>>,
    next: AtomicU64,
    stop: Mutex<bool>,
    wake: Condvar,
}

pub struct Watchdog {
    /// The one layer below (a slice, for `Map::below`).
    lower: [Arc<dyn Layer>; 1],
    timeout: Duration,
    member: usize,
    health: Arc<Health>,
    shared: Arc<Shared>,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl Watchdog {
    /// A watchdog over member `member` of a pool, reporting to `health`.
    pub fn new(
        lower: Arc<dyn Layer>,
        timeout: Duration,
        member: usize,
        health: Arc<Health>,
    ) -> Arc<Watchdog> {
        let shared = Arc::new(Shared {
            inflight: Mutex::new(HashMap::new()),
            next: AtomicU64::new(0),
            stop: Mutex::new(false),
            wake: Condvar::new(),
        });
        let (s, h) = (shared.clone(), health.clone());
        let t = std::thread::Builder::new()
            .name("watchdog".into())
            .spawn(move || watch(s, timeout, member, h))
            .expect("spawn watchdog thread");
        Arc::new(Watchdog {
            lower: [lower],
            timeout,
            member,
            health,
            shared,
            thread: Mutex::new(Some(t)),
        })
    }

    /// The detached copy of `upper` that goes below, tracked until it answers.
    fn track(&self, upper: Io) -> Io {
        let id = self.shared.next.fetch_add(1, Ordering::Relaxed);
        let done = Arc::new(AtomicBool::new(false));
        let (shared, health, member) = (self.shared.clone(), self.health.clone(), self.member);
        let (up, flag) = (upper.clone(), done.clone());
        // The copy's tag reaches the request above by itself (`Io::detached`).
        let end_io = Box::new(move |low: &Io, r: Result<u64, Errno>| {
            shared.inflight.lock().remove(&id);
            if !flag.swap(true, Ordering::AcqRel) {
                up.finish(r);
            } else {
                health.late(member);
                log::warn!(
                    "member {member}: a request answered ({r:?}) after {:?}, long after it was failed",
                    low.age()
                );
            }
            r
        });
        let lower = upper.detached(Some(end_io));
        let cancel_below = lower.clone();
        upper.set_canceller(move || cancel_below.cancel());
        let timed = upper.op() != Op::Flush;
        self.shared.inflight.lock().insert(
            id,
            Tracked {
                started: Instant::now(),
                upper,
                lower: lower.clone(),
                done,
                timed,
            },
        );
        lower
    }
}

impl Map for Watchdog {
    fn below(&self) -> &[Arc<dyn Layer>] {
        &self.lower
    }
    /// A faulted member is not asked again (until the pool is mounted
    /// again): its requests would only pile up behind the ones it holds.
    fn map(&self, io: &Io) -> Mapping {
        if self.health.is_faulted(self.member) {
            return Mapping::Fail(Errno::EIO);
        }
        Mapping::Detached(0, self.track(io.clone()))
    }
}

fn watch(s: Arc<Shared>, timeout: Duration, member: usize, health: Arc<Health>) {
    let tick = (timeout / 4).clamp(Duration::from_millis(10), Duration::from_millis(500));
    loop {
        {
            let mut stop = s.stop.lock();
            if *stop {
                return;
            }
            s.wake.wait_for(&mut stop, tick);
            if *stop {
                return;
            }
        }
        let expired = claim(&s, |t| t.timed && t.started.elapsed() >= timeout);
        if !expired.is_empty() {
            health.fault(member, format!("no answer within {timeout:?}"));
            for (upper, lower) in expired {
                upper.finish(Err(Errno::ETIMEDOUT));
                lower.cancel();
            }
        }
        // Flushes in flight on a faulted member (also one that slipped in
        // while it faulted) fail now; their copies stay below.
        if health.is_faulted(member) {
            for (upper, _) in claim(&s, |t| !t.timed) {
                upper.finish(Err(Errno::EIO));
            }
        }
    }
}

/// The tracked requests that `pick` selects and whose request above nobody
/// has completed yet, now claimed for completion here; the copies stay
/// tracked until they answer.
fn claim(s: &Shared, pick: impl Fn(&Tracked) -> bool) -> Vec<(Io, Io)> {
    s.inflight
        .lock()
        .values()
        .filter(|t| pick(t) && !t.done.swap(true, Ordering::AcqRel))
        .map(|t| (t.upper.clone(), t.lower.clone()))
        .collect()
}

impl Layer for Watchdog {
    fn name(&self) -> String {
        format!("watchdog={}s", self.timeout.as_secs_f32())
    }
    fn capacity(&self) -> u64 {
        self.lower[0].capacity()
    }
    fn alignment(&self) -> usize {
        self.lower[0].alignment()
    }
    fn vectored(&self) -> bool {
        self.lower[0].vectored()
    }
    fn submit(&self, io: Io) {
        map::submit(self, io);
    }
    fn submit_batch(&self, ios: Vec<Io>) {
        map::submit_batch(self, ios);
    }
    fn overhead(&self) -> u64 {
        self.lower[0].overhead()
    }
    fn lowers(&self) -> Vec<Arc<dyn Layer>> {
        self.lower.to_vec()
    }
    fn shutdown(&self) {
        *self.shared.stop.lock() = true;
        self.shared.wake.notify_all();
        crate::layer::join_unless_current(self.thread.lock().take());
        self.lower[0].shutdown();
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        *self.shared.stop.lock() = true;
        self.shared.wake.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::buf::Buf;
    use crate::fault::{Fault, FaultAction, FaultControl, FaultRule};
    use crate::io::{ExtentTag, Waiter};
    use crate::mem::Mem;

    const TIMEOUT: Duration = Duration::from_millis(100);

    /// A watchdog over a fault layer over memory: member 0 of a one-member pool.
    fn watched() -> (Arc<FaultControl>, Arc<Health>, Arc<Watchdog>) {
        let control = FaultControl::new();
        let fault = Fault::new(Arc::new(Mem::new(1 << 20)), control.clone(), Some(0));
        let health = Health::new(vec!["mem".into()]);
        let watchdog = Watchdog::new(fault, TIMEOUT, 0, health.clone());
        (control, health, watchdog)
    }

    fn start(layer: &dyn Layer, op: Op) -> Waiter {
        let waiter = Waiter::new();
        layer.submit(Io::new(op, 0, Buf::zeroed(4096), Some(waiter.end_io())));
        waiter
    }

    fn delay(control: &FaultControl, op: Op, ms: u64) {
        let action = FaultAction::Delay(Duration::from_millis(ms));
        control.add_rule(FaultRule::new(Some(op), action));
    }

    #[test]
    fn a_slow_flush_is_never_timed_out() {
        let (control, health, watchdog) = watched();
        delay(&control, Op::Flush, 4 * TIMEOUT.as_millis() as u64);
        let started = Instant::now();
        assert_eq!(start(&*watchdog, Op::Flush).wait(), Ok(0));
        assert!(
            started.elapsed() >= 4 * TIMEOUT,
            "the flush went through the delay"
        );
        assert!(!health.any_faulted());
        watchdog.shutdown();
    }

    /// A write that does not answer fails with ETIMEDOUT (sent, outcome
    /// unknown) and faults the member; the flush in flight then fails with
    /// EIO at once, and so does every later request, without reaching below.
    #[test]
    fn a_timeout_fails_with_etimedout_and_fails_the_flushes_in_flight() {
        let (control, health, watchdog) = watched();
        delay(&control, Op::Flush, 30_000);
        delay(&control, Op::Write, 1_000);
        let flush = start(&*watchdog, Op::Flush);
        let started = Instant::now();
        assert_eq!(start(&*watchdog, Op::Write).wait(), Err(Errno::ETIMEDOUT));
        assert!(health.is_faulted(0));
        assert_eq!(flush.wait(), Err(Errno::EIO));
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "the flush did not wait for the device"
        );
        let injected = control.injected.load(Ordering::SeqCst);
        for op in [Op::Flush, Op::Read, Op::Write] {
            assert_eq!(start(&*watchdog, op).wait(), Err(Errno::EIO), "{op:?}");
        }
        assert_eq!(
            control.injected.load(Ordering::SeqCst),
            injected,
            "requests to a faulted member stop at the watchdog"
        );
        watchdog.shutdown();
    }

    /// What the layers below record in the detached copy's tag reaches the
    /// request above (the framework merges it; the watchdog copies nothing).
    #[test]
    fn the_tag_recorded_below_reaches_the_request_above() {
        struct Stamp;
        impl Layer for Stamp {
            fn name(&self) -> String {
                "stamp".into()
            }
            fn capacity(&self) -> u64 {
                1 << 20
            }
            fn submit(&self, io: Io) {
                let mut tag = io.tag();
                tag.mac = [7; 16];
                io.set_tag(tag);
                io.finish(Ok(io.len()));
            }
        }
        let health = Health::new(vec!["stamp".into()]);
        let watchdog = Watchdog::new(Arc::new(Stamp), TIMEOUT, 0, health);
        let sent = ExtentTag {
            codec: 2,
            ..ExtentTag::default()
        };
        let (res, tag) = crate::submit_wait_tag(&*watchdog, Op::Write, 0, Buf::zeroed(4096), sent);
        assert_eq!(res, Ok(4096));
        assert_eq!((tag.codec, tag.mac), (2, [7; 16]));
        watchdog.shutdown();
    }
}
