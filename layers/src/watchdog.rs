//! `watchdog`: a member that stops answering must not stop the filesystem.
//!
//! One watchdog sits above each device (below the stripe), so it knows which
//! member a request went to. Every request passing it goes down as a
//! *detached* copy (`Io::detached`): the same operation over the same
//! buffers, tied to the request above by nothing but this layer. When the
//! copy answers, the request above completes with its result. When it has
//! not answered within the timeout, the request above completes with EIO
//! at once, the member is marked faulted in the pool's `Health` (one log
//! line naming it), and a cancel is sent below. The copy stays in flight,
//! owning its buffers (and the device its iovec), until the device really
//! answers: a request blocked in an io-wq worker (a hung disk, a stopped
//! NBD or FUSE server) cannot be taken back, and nothing may be written into
//! memory that has been reused. Its late answer is logged and dropped.
//!
//! A faulted member gets no more requests: they fail with EIO at once, so
//! reads of what it holds fail fast and nothing piles up behind it (with a
//! mirror, another copy answers).
//!
//! Flushes are timed like everything else, but a flush that times out
//! faults the member too: the filesystem then stops writing (its failed
//! state), so no commit's outcome is ever left unknown and acted upon.

use crate::errno::Errno;
use crate::io::Io;
use crate::layer::Layer;
use parking_lot::{Condvar, Mutex};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The state of each member of a pool, shared by its watchdogs and read by
/// the filesystem (its failed state) and `stackfs info`.
pub struct Health {
    members: Mutex<Vec<Member>>,
    any: AtomicBool,
    /// Per member: faulted (read without the lock, on every request).
    faulted: Vec<AtomicBool>,
}

#[derive(Clone, Debug)]
pub struct Member {
    pub name: String,
    /// Why the member is faulted; None while it answers.
    pub faulted: Option<String>,
    /// Requests failed because the member did not answer in time.
    pub timeouts: u64,
    /// Answers that came after their request had been failed.
    pub late: u64,
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
                        faulted: None,
                        timeouts: 0,
                        late: 0,
                    })
                    .collect(),
            ),
            any: AtomicBool::new(false),
        })
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

    pub fn members(&self) -> Vec<Member> {
        self.members.lock().clone()
    }

    /// Mark member `i` faulted; logs once per member.
    pub fn fault(&self, i: usize, why: String) {
        let mut m = self.members.lock();
        let Some(member) = m.get_mut(i) else {
            return;
        };
        member.timeouts += 1;
        if member.faulted.is_none() {
            log::error!(
                "member {i} ({}) faulted: {why}; the filesystem stops writing",
                member.name
            );
            member.faulted = Some(why);
        }
        if let Some(f) = self.faulted.get(i) {
            f.store(true, Ordering::Release);
        }
        self.any.store(true, Ordering::Release);
    }

    fn late(&self, i: usize) {
        if let Some(member) = self.members.lock().get_mut(i) {
            member.late += 1;
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
}

struct Shared {
    inflight: Mutex<HashMap<u64, Tracked>>,
    next: AtomicU64,
    stop: Mutex<bool>,
    wake: Condvar,
}

pub struct Watchdog {
    lower: Arc<dyn Layer>,
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
            lower,
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
        let end_io = Box::new(move |low: &Io, r: Result<u64, Errno>| {
            shared.inflight.lock().remove(&id);
            if !flag.swap(true, Ordering::AcqRel) {
                up.set_tag(low.tag());
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
        self.shared.inflight.lock().insert(
            id,
            Tracked {
                started: Instant::now(),
                upper,
                lower: lower.clone(),
                done,
            },
        );
        lower
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
        let now = Instant::now();
        // Requests above whose copy has not answered in time; the copies
        // stay tracked until they answer.
        let expired: Vec<(Io, Io)> = s
            .inflight
            .lock()
            .values()
            .filter(|t| {
                now.duration_since(t.started) >= timeout && !t.done.swap(true, Ordering::AcqRel)
            })
            .map(|t| (t.upper.clone(), t.lower.clone()))
            .collect();
        if expired.is_empty() {
            continue;
        }
        health.fault(member, format!("no answer within {timeout:?}"));
        for (upper, lower) in expired {
            upper.finish(Err(Errno::EIO));
            lower.cancel();
        }
    }
}

impl Layer for Watchdog {
    fn name(&self) -> String {
        format!("watchdog={}s", self.timeout.as_secs_f32())
    }
    fn capacity(&self) -> u64 {
        self.lower.capacity()
    }
    fn alignment(&self) -> usize {
        self.lower.alignment()
    }
    fn vectored(&self) -> bool {
        self.lower.vectored()
    }
    fn submit(&self, io: Io) {
        self.submit_batch(vec![io]);
    }
    fn submit_batch(&self, ios: Vec<Io>) {
        // A faulted member is not asked again (until the pool is mounted
        // again): its requests would only pile up behind the ones it holds.
        if self.health.is_faulted(self.member) {
            for io in ios {
                io.finish(Err(Errno::EIO));
            }
            return;
        }
        let copies: Vec<Io> = ios.into_iter().map(|io| self.track(io)).collect();
        self.lower.submit_batch(copies);
    }
    fn overhead(&self) -> u64 {
        self.lower.overhead()
    }
    fn lowers(&self) -> Vec<Arc<dyn Layer>> {
        vec![self.lower.clone()]
    }
    fn shutdown(&self) {
        *self.shared.stop.lock() = true;
        self.shared.wake.notify_all();
        crate::layer::join_unless_current(self.thread.lock().take());
        self.lower.shutdown();
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        *self.shared.stop.lock() = true;
        self.shared.wake.notify_all();
    }
}
