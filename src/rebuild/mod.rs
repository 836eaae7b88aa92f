//! Keeping a mirrored pool whole while it runs: one background thread per
//! mount (`Jobs`) that
//! - records every member that faults in the member-state record (see
//!   `pool::members`), so that it is never trusted again without a resync;
//! - resyncs a member that missed writes (it was missing, or faulted) and is
//!   back: it takes every write meanwhile, serves no read, and the walk
//!   (`CopyWalk::Rebuild`) makes it the same as its good copies;
//! - rebuilds a member onto a new device (`replace.rs`);
//! - scrubs on request (`scrub.rs`).
//!
//! Progress is saved as a cursor (a pool address) in the superblocks every
//! few seconds, after a device flush has made everything below it durable,
//! so that a resync or replace cut short by a crash or an unmount goes on
//! from there at the next mount. One job runs at a time.

mod replace;
pub mod scrub;

use crate::fs::{CopyWalk, Fs};
use crate::lock::PoolLock;
use crate::pool::members;
use crate::superblock::MemberStates;
use parking_lot::{Condvar, Mutex};
use serde_json::json;
use stackfs_layers::{Buf, Layer, Op};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

pub use scrub::ScrubReport;

/// How often a running resync or replace saves its cursor.
const CHECKPOINT_EVERY: Duration = Duration::from_secs(5);

/// Where the job running now is; read by `stackfs scrub`/`replace` through
/// the root's `stackfs.job` xattr (online), or by the command itself
/// (offline).
#[derive(Default)]
pub struct Progress {
    pub done: AtomicU64,
    pub total: AtomicU64,
    stop: AtomicBool,
    what: Mutex<String>,
}

impl Progress {
    pub fn start(&self, total: u64) {
        self.done.store(0, Ordering::Relaxed);
        self.total.store(total, Ordering::Relaxed);
    }
    pub fn advance(&self, bytes: u64) {
        self.done.fetch_add(bytes, Ordering::Relaxed);
    }
    pub fn say(&self, what: String) {
        *self.what.lock() = what;
    }
    pub fn what(&self) -> String {
        self.what.lock().clone()
    }
    /// Ask the walk to stop at its next batch.
    pub fn request_stop(&self) {
        self.stop.store(true, Ordering::Relaxed);
    }
    pub fn stopped(&self) -> bool {
        self.stop.load(Ordering::Relaxed)
    }
}

/// Keeps a walk under a rate (bytes per second).
pub struct Pace {
    rate: Option<u64>,
    started: Instant,
    bytes: u64,
}

impl Pace {
    pub fn new(rate: Option<u64>) -> Pace {
        Pace {
            rate,
            started: Instant::now(),
            bytes: 0,
        }
    }

    /// `bytes` more were read: sleep as long as the rate asks.
    pub fn after(&mut self, bytes: u64) {
        self.bytes += bytes;
        let Some(rate) = self.rate.filter(|r| *r > 0) else {
            return;
        };
        let due = Duration::from_secs_f64(self.bytes as f64 / rate as f64);
        if let Some(wait) = due.checked_sub(self.started.elapsed()) {
            std::thread::sleep(wait.min(Duration::from_secs(5)));
        }
    }
}

/// What the thread does next.
enum Job {
    Resync(u32),
    Replace,
    Scrub(Option<u64>),
}

/// What the jobs share with the control xattrs.
struct Shared {
    /// The member-state record as last written.
    states: MemberStates,
    /// The members present: (index, path, size).
    devices: Vec<(u32, PathBuf, u64)>,
    /// A scrub asked for, with its rate.
    scrub: Option<Option<u64>>,
    /// The job running ("resync", "replace", "scrub") and the member.
    running: Option<(&'static str, Option<u32>)>,
    /// How the last job ended (a scrub's report, an error).
    last: Option<serde_json::Value>,
    stop: bool,
    /// The new device of a replace, locked while it is ours.
    new_lock: Option<PoolLock>,
    /// Devices taken out of their bays, shut down when the replace ends
    /// (requests they had in flight complete first).
    retired: Vec<Arc<dyn Layer>>,
}

/// Where the member-state record is kept: the superblocks of the members
/// present (`pool_recorder`), or wherever a test keeps it.
pub type Recorder =
    Box<dyn Fn(&Fs, &MemberStates, &[(PathBuf, u64)]) -> Result<(), String> + Send + Sync>;

/// The record in the superblocks of `devices` (sealed on an encrypted pool).
pub fn pool_recorder() -> Recorder {
    Box::new(|fs, states, devices| {
        // A test's power cut (the fault layer) loses superblock writes too.
        if fs.stack.fault.as_ref().is_some_and(|f| f.is_power_cut()) {
            return Err("the power is cut (fault layer): no superblock is written".into());
        }
        let key = fs.pool.as_ref().and_then(|p| p.sb_key.as_ref());
        members::record(devices, key, states).map_err(|e| e.to_string())
    })
}

/// The background jobs of one mount.
pub struct Jobs {
    fs: Weak<Fs>,
    shared: Mutex<Shared>,
    wake: Condvar,
    pub progress: Progress,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
    recorder: Recorder,
    /// How often a rebuild saves its cursor.
    checkpoint_every: Mutex<Duration>,
    /// Bytes per second a resync or replace may read (None: no limit).
    rebuild_rate: Mutex<Option<u64>>,
}

impl Jobs {
    /// Start the thread of a read-write pool, which first resumes what the
    /// member-state record asks for; resyncs and replaces read at most
    /// `rebuild_rate` bytes per second. None for a filesystem without a pool.
    pub fn start(fs: &Arc<Fs>, rebuild_rate: Option<u64>) -> Option<Arc<Jobs>> {
        let pool = fs.pool.as_ref()?;
        let devices = pool
            .indices
            .iter()
            .zip(&pool.paths)
            .zip(&pool.sizes)
            .map(|((i, p), s)| (*i, p.clone(), *s))
            .collect();
        let jobs = Jobs::new(fs, pool.states.clone(), devices, pool_recorder());
        jobs.shared.lock().new_lock = pool.new_lock.lock().take();
        jobs.set_rebuild_rate(rebuild_rate);
        let me = jobs.clone();
        let handle = std::thread::Builder::new()
            .name("stackfs-jobs".into())
            .spawn(move || me.run())
            .ok()?;
        *jobs.thread.lock() = Some(handle);
        Some(jobs)
    }

    /// Jobs over `fs` whose record is `states` (kept by `recorder`) and
    /// whose members present are `devices`: (index, path, size). No thread
    /// runs them: `step` does (`start` makes the thread).
    pub fn new(
        fs: &Arc<Fs>,
        states: MemberStates,
        devices: Vec<(u32, PathBuf, u64)>,
        recorder: Recorder,
    ) -> Arc<Jobs> {
        Arc::new(Jobs {
            fs: Arc::downgrade(fs),
            shared: Mutex::new(Shared {
                states,
                devices,
                scrub: None,
                running: None,
                last: None,
                stop: false,
                new_lock: None,
                retired: Vec::new(),
            }),
            wake: Condvar::new(),
            progress: Progress::default(),
            thread: Mutex::new(None),
            recorder,
            checkpoint_every: Mutex::new(CHECKPOINT_EVERY),
            rebuild_rate: Mutex::new(None),
        })
    }

    /// How often a resync or replace saves its cursor (tests of power cuts
    /// save it after every batch).
    pub fn set_checkpoint_every(&self, every: Duration) {
        *self.checkpoint_every.lock() = every;
    }

    /// Keep resyncs and replaces under `rate` bytes per second (the mount's
    /// `resync_rate=`), so that they leave the disks to the workload.
    pub fn set_rebuild_rate(&self, rate: Option<u64>) {
        *self.rebuild_rate.lock() = rate;
    }

    /// The record as last written.
    pub fn states(&self) -> MemberStates {
        self.shared.lock().states.clone()
    }

    /// Record faults, then run the next job if there is one; whether one ran.
    pub fn step(&self) -> bool {
        let Some(fs) = self.fs.upgrade() else {
            return false;
        };
        self.record_faults(&fs);
        match self.next_job(&fs) {
            Some(job) => {
                self.run_job(&fs, job);
                true
            }
            None => false,
        }
    }

    /// Stop the job running (its cursor is saved) and the thread.
    pub fn stop(&self) {
        self.shared.lock().stop = true;
        self.progress.request_stop();
        self.wake.notify_all();
        if let Some(t) = self.thread.lock().take() {
            let _ = t.join();
        }
    }

    fn run(&self) {
        loop {
            if self.shared.lock().stop || self.fs.strong_count() == 0 {
                return;
            }
            if !self.step() {
                let mut shared = self.shared.lock();
                if !shared.stop {
                    self.wake.wait_for(&mut shared, Duration::from_secs(1));
                }
            }
        }
    }

    fn next_job(&self, fs: &Fs) -> Option<Job> {
        let mut shared = self.shared.lock();
        let health = &fs.stack.health;
        let ready = |i: u32| health.is_resyncing(i as usize) && !health.is_faulted(i as usize);
        if let Some(r) = &shared.states.replace {
            if ready(r.index) && shared.new_lock.is_some() {
                return Some(Job::Replace);
            }
        }
        let replacing = shared.states.replace.as_ref().map(|r| r.index);
        if let Some((m, _)) = shared
            .states
            .stale
            .iter()
            .find(|(m, _)| ready(*m) && Some(*m) != replacing)
        {
            return Some(Job::Resync(*m));
        }
        shared.scrub.take().map(Job::Scrub)
    }

    fn run_job(&self, fs: &Fs, job: Job) {
        let (name, member) = match job {
            Job::Resync(m) => ("resync", Some(m)),
            Job::Replace => (
                "replace",
                self.shared.lock().states.replace.as_ref().map(|r| r.index),
            ),
            Job::Scrub(_) => ("scrub", None),
        };
        {
            let mut shared = self.shared.lock();
            // A stop asked for before the job began holds for it too.
            if shared.stop {
                return;
            }
            self.progress.stop.store(false, Ordering::Relaxed);
            shared.running = Some((name, member));
        }
        let outcome = match job {
            Job::Resync(m) => self
                .resync(fs, m)
                .map(|_| json!({"job": "resync", "member": m})),
            Job::Replace => self.replace_job(fs),
            Job::Scrub(rate) => scrub::scrub(fs, rate, &self.progress)
                .map(|r| r.to_json())
                .map_err(|e| e.to_string()),
        };
        let last = match outcome {
            Ok(v) => v,
            Err(e) => {
                log::error!("{name}: {e}");
                json!({"job": name, "error": e})
            }
        };
        let mut shared = self.shared.lock();
        shared.running = None;
        shared.last = Some(last);
        drop(shared);
        self.wake.notify_all();
    }

    /// Record every faulted member as stale (from 0): it missed writes from
    /// the moment it faulted. A faulted new device ends its replace.
    fn record_faults(&self, fs: &Fs) {
        let health = &fs.stack.health;
        if !health.any_member_faulted() {
            return;
        }
        let mut shared = self.shared.lock();
        let mut next = shared.states.clone();
        for i in 0..health.count() as u32 {
            if !health.is_faulted(i as usize) {
                continue;
            }
            if next.replace.as_ref().is_some_and(|r| r.index == i) {
                log::error!("replace: the new device of member {i} faulted; the replace ends");
                next.replace = None;
                shared.new_lock = None;
            }
            next.mark_stale(i, 0);
        }
        if next != shared.states {
            next.seq += 1;
            if let Err(e) = self.record(fs, &mut shared, next) {
                log::error!("recording a faulted member: {e}");
            }
        }
    }

    /// Write `next` into the superblocks of every member present that
    /// answers, and keep it.
    fn record(&self, fs: &Fs, shared: &mut Shared, next: MemberStates) -> Result<(), String> {
        let health = &fs.stack.health;
        let devices: Vec<(PathBuf, u64)> = shared
            .devices
            .iter()
            .filter(|(i, _, _)| !health.is_faulted(*i as usize))
            .map(|(_, p, s)| (p.clone(), *s))
            .collect();
        (self.recorder)(fs, &next, &devices)?;
        shared.states = next;
        Ok(())
    }

    /// Flush every device, then record `change` applied to the states:
    /// what the change says is done is durable first.
    fn checkpoint(&self, fs: &Fs, change: impl FnOnce(&mut MemberStates)) -> Result<(), String> {
        stackfs_layers::submit_wait(&*fs.stack.top, Op::Flush, 0, Buf::zeroed(0))
            .map_err(|e| format!("flushing the devices: {e}"))?;
        let mut shared = self.shared.lock();
        let mut next = shared.states.clone();
        change(&mut next);
        next.seq += 1;
        self.record(fs, &mut shared, next)
    }

    /// Make member `member`'s copy the same as the others from pool address
    /// `from` on, saving the cursor with `save`. Returns whether it got to
    /// the end (not stopped, and the member still answers).
    fn rebuild(
        &self,
        fs: &Fs,
        member: u32,
        from: u64,
        what: &str,
        save: &dyn Fn(&mut MemberStates, u64),
    ) -> Result<bool, String> {
        let copy = member as usize % fs.copies();
        let mode = CopyWalk::Rebuild { copy };
        let meta_len = fs.geometry.meta_len;
        let total = fs
            .data_to_walk(from.max(meta_len))
            .map_err(|e| format!("listing extents: {e}"))?;
        self.progress.start(total);
        let faulted = || fs.stack.health.is_faulted(member as usize);
        if from < meta_len {
            self.progress.say(format!("{what}: metadata"));
            fs.walk_metadata(mode, &|_| {}).map_err(|e| e.to_string())?;
            self.checkpoint(fs, |s| save(s, if faulted() { 0 } else { meta_len }))?;
        }
        self.progress.say(format!("{what}: data"));
        let mut saved = Instant::now();
        let mut failed = None;
        let mut pace = Pace::new(*self.rebuild_rate.lock());
        fs.walk_data(mode, from.max(meta_len), &mut |step| {
            self.progress.advance(step.bytes);
            pace.after(step.bytes);
            // Another member that faults meanwhile is recorded at once.
            self.record_faults(fs);
            if self.progress.stopped() || faulted() {
                return false;
            }
            if saved.elapsed() >= *self.checkpoint_every.lock() {
                saved = Instant::now();
                // Applied after the flush: a member that faulted in it is
                // behind from the start again.
                let cursor =
                    |s: &mut MemberStates| save(s, if faulted() { 0 } else { step.cursor });
                if let Err(e) = self.checkpoint(fs, cursor) {
                    failed = Some(e);
                    return false;
                }
            }
            !self.progress.stopped() && !faulted()
        })
        .map_err(|e| format!("reading file data: {e}"))?;
        if let Some(e) = failed {
            return Err(e);
        }
        Ok(!self.progress.stopped() && !faulted())
    }

    /// Resync member `m`, from where its record says.
    fn resync(&self, fs: &Fs, m: u32) -> Result<(), String> {
        let from = self
            .shared
            .lock()
            .states
            .stale
            .iter()
            .find(|(i, _)| *i == m)
            .map_or(0, |(_, c)| *c);
        let what = format!("resync of member {m}");
        log::info!("{what}: starting at pool address {from}");
        let save = |s: &mut MemberStates, cursor: u64| s.mark_stale(m, cursor);
        if !self.rebuild(fs, m, from, &what, &save)? {
            log::info!("{what}: stopped; it goes on at the next mount");
            return Ok(());
        }
        let faulted = || fs.stack.health.is_faulted(m as usize);
        self.checkpoint(fs, |s| {
            if faulted() {
                s.mark_stale(m, 0);
            } else {
                s.stale.retain(|(i, _)| *i != m);
            }
        })?;
        if faulted() {
            return Err(format!("{what}: the member faulted at the end"));
        }
        fs.stack.health.set_resyncing(m as usize, false);
        log::info!("{what}: done; the member serves reads again");
        Ok(())
    }

    /// Ask for a scrub at `rate` bytes per second (None: no limit).
    pub fn request_scrub(&self, rate: Option<u64>) -> Result<(), String> {
        let mut shared = self.shared.lock();
        if let Some((job, member)) = shared.running {
            return Err(match member {
                Some(m) => format!("a {job} of member {m} is running; scrub when it is done"),
                None => format!("a {job} is running"),
            });
        }
        shared.scrub = Some(rate);
        shared.last = None;
        drop(shared);
        self.wake.notify_all();
        Ok(())
    }

    /// The job running and its progress, or how the last one ended.
    pub fn status(&self) -> serde_json::Value {
        let shared = self.shared.lock();
        let health = self.fs.upgrade().map(|fs| fs.stack.health.members());
        let resyncing: Vec<u32> = shared.states.stale.iter().map(|(i, _)| *i).collect();
        json!({
            "running": shared.running.map(|(job, member)| json!({
                "job": job,
                "member": member,
                "what": self.progress.what(),
                "done": self.progress.done.load(Ordering::Relaxed),
                "total": self.progress.total.load(Ordering::Relaxed),
            })),
            "queued_scrub": shared.scrub.is_some(),
            "last": shared.last,
            "stale": resyncing,
            "replacing": shared.states.replace.as_ref().map(|r| json!({
                "member": r.index, "new": r.path, "cursor": r.cursor})),
            "members": health.map(|h| h.len()),
        })
    }

    /// A request was refused: say why in the status.
    pub fn refused(&self, job: &str, why: String) {
        self.shared.lock().last = Some(json!({"job": job, "error": why}));
    }

    /// Stop a scrub running or asked for (`stackfs scrub --stop`); a resync
    /// or replace goes on.
    pub fn stop_job(&self) {
        let mut shared = self.shared.lock();
        shared.scrub = None;
        if shared.running.is_some_and(|(job, _)| job == "scrub") {
            self.progress.request_stop();
        }
    }
}
