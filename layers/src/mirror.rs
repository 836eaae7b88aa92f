//! `mirror`: N copies of the same space (RAID-1), like md's raid1 or a
//! ZFS mirror vdev, with self-healing reads.
//!
//! Writes, flushes and discards go to every copy that is not faulted, as
//! children of the one request. The request completes when every copy has
//! answered: with success if at least one copy took it (each copy that
//! failed is marked faulted in `Health`, with the reason, and gets no more
//! requests), with the first error if none did.
//!
//! A read goes to one copy: the one with the fewest reads in flight (ties:
//! the lowest index, so a lone reader and the copies of a stripe above agree),
//! skipping faulted copies and those the request's tag `avoid`s. The mirror
//! completes the read itself (`Mapping::Detached`): when the copy answers EIO
//! or ETIMEDOUT, it counts a read error on that member and sends the same
//! read to the next copy; only when no copy is left does the read fail (EIO).
//! The copy that served the read is recorded in the tag's `copies`.
//!
//! Verification is above (the filesystem's CRC, crypt's MAC). A caller whose
//! bytes fail it re-reads the extent with `ExtentTag::retry_avoiding`: the
//! copies that served the bad read are avoided. When such a read succeeds on
//! another copy, the mirror heals before it completes the read: it reads each
//! avoided copy's range, and where the bytes differ from the good ones (or do
//! not read) it counts a checksum error and writes the good bytes over them,
//! counting the repair (per member in `Health`, per layer in `Stats`). The
//! comparison keeps the count exact when `avoid` is wider than the damage
//! (with a stripe above, `copies` is ORed over every group a read touched).
//! A read tagged `TAG_NO_HEAL` avoids copies only to choose the one it
//! reads (the metadata store reading every copy of its root, a scrub
//! checking one copy): it heals nothing.
//!
//! A heal must never overwrite newer data (the metadata store rewrites its
//! slots in place): it is skipped (left to a scrub) when a write overlapping
//! its range was in flight at any time since the read started, which a log
//! of writes in flight and recently completed tells. While a heal runs, a new
//! write overlapping its range waits for it, so the heal cannot land after
//! it.

use crate::buf::Buf;
use crate::errno::Errno;
use crate::io::{Io, IoResult, Op, TAG_NO_HEAL};
use crate::layer::{check_range, Layer, Repairs};
use crate::map::{self, Map, Mapping};
use crate::spec::SpecError;
use crate::watchdog::Health;
use parking_lot::Mutex;
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Weak};

/// Most copies of a mirror (bits of `ExtentTag::avoid`).
pub const MAX_COPIES: usize = 32;
/// Completed writes remembered for the heal check; a read older than the
/// oldest of them skips its heal.
const RECENT_WRITES: usize = 4096;

/// `[start, end)` in the mirror's address space.
#[derive(Clone, Copy, Debug)]
struct Range {
    start: u64,
    end: u64,
}

impl Range {
    fn of(io: &Io) -> Range {
        Range {
            start: io.addr(),
            end: io.addr() + io.len(),
        }
    }
    fn overlaps(&self, other: &Range) -> bool {
        self.start < other.end && other.start < self.end
    }
}

/// What the heal check needs to know about writes.
#[derive(Default)]
struct WriteLog {
    /// Ticks once per completed write.
    clock: u64,
    next_id: u64,
    /// Writes and discards submitted and not yet completed, by id.
    in_flight: HashMap<u64, Range>,
    /// Recently completed writes with the clock at their completion, oldest first.
    recent: VecDeque<(u64, Range)>,
    /// The clock of the newest write dropped from `recent`.
    forgotten: u64,
    /// Ranges being healed, by id.
    heals: HashMap<u64, Range>,
    /// Writes waiting for a heal of their range (or a write waiting before them).
    deferred: Vec<Io>,
}

impl WriteLog {
    /// Whether a heal of `range` read at clock `since` may write: no
    /// overlapping write in flight now, none completed since.
    fn heal_is_safe(&self, range: &Range, since: u64) -> bool {
        self.forgotten <= since
            && !self.in_flight.values().any(|w| w.overlaps(range))
            && !self
                .recent
                .iter()
                .any(|(done, w)| *done > since && w.overlaps(range))
    }

    fn must_wait(&self, range: &Range) -> bool {
        self.heals.values().any(|h| h.overlaps(range))
            || self.deferred.iter().any(|w| Range::of(w).overlaps(range))
    }

    fn completed(&mut self, id: u64) {
        if let Some(range) = self.in_flight.remove(&id) {
            self.clock += 1;
            self.recent.push_back((self.clock, range));
            if self.recent.len() > RECENT_WRITES {
                if let Some((done, _)) = self.recent.pop_front() {
                    self.forgotten = done;
                }
            }
        }
    }
}

pub struct Mirror {
    me: Weak<Mirror>,
    lowers: Vec<Arc<dyn Layer>>,
    /// Pool member index of each copy (for `Health`).
    members: Vec<usize>,
    health: Arc<Health>,
    /// Reads in flight per copy.
    reads_in_flight: Vec<AtomicU64>,
    capacity: u64,
    vectored: bool,
    writes: Mutex<WriteLog>,
    repairs: Arc<Repairs>,
}

/// Where a read stands: the copies it must not or need not try again.
#[derive(Clone, Copy)]
struct ReadState {
    /// The write clock when the read started (for the heal check).
    since: u64,
    /// Copies the caller avoids.
    avoid: u32,
    /// Copies tried and failed.
    failed: u32,
    /// Whether a success heals the avoided copies (not with `TAG_NO_HEAL`).
    heals: bool,
}

impl Mirror {
    /// A mirror over `lowers`, copy i being pool member `members[i]`.
    pub fn new(
        lowers: Vec<Arc<dyn Layer>>,
        members: Vec<usize>,
        health: Arc<Health>,
    ) -> Result<Arc<Mirror>, SpecError> {
        if !(2..=MAX_COPIES).contains(&lowers.len()) || members.len() != lowers.len() {
            return Err(SpecError::BadParam {
                layer: "mirror".into(),
                why: format!("{} copies: a mirror keeps 2 to {MAX_COPIES}", lowers.len()),
            });
        }
        let capacity = lowers.iter().map(|l| l.capacity()).min().unwrap_or(0);
        let vectored = lowers.iter().all(|l| l.vectored());
        Ok(Arc::new_cyclic(|me| Mirror {
            me: me.clone(),
            reads_in_flight: lowers.iter().map(|_| AtomicU64::new(0)).collect(),
            lowers,
            members,
            health,
            capacity,
            vectored,
            writes: Mutex::new(WriteLog::default()),
            repairs: Arc::default(),
        }))
    }

    fn copies(&self) -> usize {
        self.lowers.len()
    }

    fn usable(&self, copy: usize, excluded: u32) -> bool {
        excluded & (1 << copy) == 0 && !self.health.is_faulted(self.members[copy])
    }

    /// The copy to read from: fewest reads in flight, lowest index on a tie;
    /// never a copy being resynced (it is not whole yet).
    fn pick(&self, excluded: u32) -> Option<usize> {
        (0..self.copies())
            .filter(|&copy| {
                self.usable(copy, excluded) && !self.health.is_resyncing(self.members[copy])
            })
            .min_by_key(|&copy| self.reads_in_flight[copy].load(Ordering::Relaxed))
    }

    /// Register writes and discards in the log before they are mapped; those
    /// overlapping a heal (or a write already waiting) wait, and are returned
    /// to `submit_batch` when it ends. Returns the requests that go on now.
    fn admit(&self, ios: Vec<Io>) -> Vec<Io> {
        let mut admitted = Vec::with_capacity(ios.len());
        let mut waiting = Vec::new();
        let mut log = self.writes.lock();
        for io in ios {
            if !matches!(io.op(), Op::Write | Op::Discard) || io.is_cancelled() {
                admitted.push(io);
                continue;
            }
            let range = Range::of(&io);
            if log.must_wait(&range) {
                log.deferred.push(io.clone());
                waiting.push(io);
                continue;
            }
            let id = log.next_id;
            log.next_id += 1;
            log.in_flight.insert(id, range);
            let me = self.me.clone();
            io.observe(move |_, _| {
                if let Some(mirror) = me.upgrade() {
                    mirror.writes.lock().completed(id);
                }
            });
            admitted.push(io);
        }
        drop(log);
        // Outside the lock: a canceller set on a cancelled request runs at once.
        for io in waiting {
            self.cancel_while_waiting(&io);
        }
        admitted
    }

    /// A cancel takes a waiting write out of the queue and fails it. (If the
    /// heal ended meanwhile and sent it on, the write is not found here: the
    /// cancel reaches its children as for any request.)
    fn cancel_while_waiting(&self, io: &Io) {
        let (me, id) = (self.me.clone(), io.id());
        io.set_canceller(move || {
            let Some(mirror) = me.upgrade() else { return };
            let mut log = mirror.writes.lock();
            if let Some(at) = log.deferred.iter().position(|w| w.id() == id) {
                let parked = log.deferred.remove(at);
                drop(log);
                parked.finish(Err(Errno::ECANCELED));
            }
        });
    }

    /// Children of a write, flush or discard for every copy not faulted.
    fn fan_out(&self, io: &Io) -> Mapping {
        let targets: Vec<usize> = (0..self.copies()).filter(|&c| self.usable(c, 0)).collect();
        if targets.is_empty() {
            return Mapping::Fail(Errno::EIO);
        }
        let outcome = Arc::new(FanOut {
            pending: AtomicUsize::new(targets.len()),
            succeeded: AtomicUsize::new(0),
            cancelled: AtomicBool::new(false),
            first_error: AtomicI32::new(0),
            len: io.len(),
        });
        let children = targets
            .into_iter()
            .map(|copy| {
                let (outcome, health) = (outcome.clone(), self.health.clone());
                let member = self.members[copy];
                let end_io = Box::new(move |child: &Io, r: IoResult| {
                    outcome.answer(child, r, &health, member)
                });
                (copy, io.child_copy(Some(end_io)))
            })
            .collect();
        Mapping::Split(children)
    }

    /// Start a read, or fail it when every copy is avoided or faulted.
    fn read(&self, io: &Io) -> Mapping {
        let tag = io.tag();
        let avoid = tag.avoid;
        // Only a read that avoids copies heals, and needs the write clock.
        let heals = avoid != 0 && tag.flags & TAG_NO_HEAL == 0;
        let since = if heals { self.writes.lock().clock } else { 0 };
        let state = ReadState {
            since,
            avoid,
            failed: 0,
            heals,
        };
        match self.pick(state.avoid) {
            Some(copy) => Mapping::Detached(copy, self.attempt(io, copy, state)),
            None => Mapping::Fail(Errno::EIO),
        }
    }

    /// The detached copy of `origin` that reads from `copy`.
    fn attempt(&self, origin: &Io, copy: usize, state: ReadState) -> Io {
        self.reads_in_flight[copy].fetch_add(1, Ordering::Relaxed);
        let (me, upper) = (self.me.clone(), origin.clone());
        let end_io = Box::new(move |_: &Io, r: IoResult| {
            if let Some(mirror) = me.upgrade() {
                mirror.reads_in_flight[copy].fetch_sub(1, Ordering::Relaxed);
                mirror.answered(upper, copy, state, r);
            } else {
                upper.finish(Err(Errno::EIO));
            }
            r
        });
        let lower = origin.detached(Some(end_io));
        let cancel_below = lower.clone();
        origin.set_canceller(move || cancel_below.cancel());
        lower
    }

    /// A copy answered a read: complete it, try the next copy, or heal.
    fn answered(&self, origin: Io, copy: usize, mut state: ReadState, r: IoResult) {
        match r {
            Ok(n) => {
                let mut tag = origin.tag();
                tag.copies = 1 << copy;
                origin.set_tag(tag);
                if state.heals {
                    self.heal(origin, copy, state, n);
                } else {
                    origin.finish(Ok(n));
                }
            }
            Err(e) if (e == Errno::EIO || e == Errno::ETIMEDOUT) && !origin.is_cancelled() => {
                self.health.count_read_error(self.members[copy]);
                state.failed |= 1 << copy;
                match self.pick(state.avoid | state.failed) {
                    Some(next) => {
                        log::warn!(
                            "mirror: {origin:?} failed on copy {copy} ({e}); reading copy {next}"
                        );
                        self.repairs.retries.fetch_add(1, Ordering::Relaxed);
                        self.lowers[next].submit(self.attempt(&origin, next, state));
                    }
                    None => {
                        origin.finish(Err(Errno::EIO));
                    }
                }
            }
            Err(e) => {
                origin.finish(Err(e));
            }
        }
    }

    /// The read of `origin` from `good` succeeded while it avoided other
    /// copies: rewrite those that differ, then complete the read.
    fn heal(&self, origin: Io, good: usize, state: ReadState, n: u64) {
        let range = Range::of(&origin);
        let targets: Vec<usize> = (0..self.copies())
            .filter(|&c| c != good && state.avoid & (1 << c) != 0 && self.usable(c, 0))
            .collect();
        // A read-only pool rewrites nothing: the bad copy is left for a scrub.
        if self.health.is_read_only() {
            if !targets.is_empty() {
                log::info!("mirror: {origin:?} not healed: the pool is open read-only");
            }
            origin.finish(Ok(n));
            return;
        }
        let heal_id = {
            let mut log = self.writes.lock();
            if targets.is_empty() || !log.heal_is_safe(&range, state.since) {
                None
            } else {
                let id = log.next_id;
                log.next_id += 1;
                log.heals.insert(id, range);
                Some(id)
            }
        };
        let Some(heal_id) = heal_id else {
            if !targets.is_empty() {
                log::info!("mirror: heal of {origin:?} skipped: the range was written meanwhile");
                self.repairs.skipped.fetch_add(1, Ordering::Relaxed);
            }
            origin.finish(Ok(n));
            return;
        };
        let mut good_bytes = Vec::with_capacity(origin.len() as usize);
        for segment in origin.segments() {
            good_bytes.extend_from_slice(segment.as_slice());
        }
        let job = Arc::new(HealJob {
            mirror: self.me.clone(),
            origin,
            result: n,
            heal_id,
            good: Buf::copy_from(&good_bytes),
            pending: AtomicUsize::new(targets.len()),
        });
        for copy in targets {
            job.clone().check(copy);
        }
    }

    /// A heal ended: its range is free again, the writes it held go on.
    fn heal_done(&self, heal_id: u64) {
        let waiting = {
            let mut log = self.writes.lock();
            log.heals.remove(&heal_id);
            std::mem::take(&mut log.deferred)
        };
        for io in &waiting {
            io.clear_canceller();
        }
        if !waiting.is_empty() {
            self.submit_batch(waiting);
        }
    }

    /// Repairs made, bytes rewritten, heals skipped, reads retried.
    pub fn repairs(&self) -> Arc<Repairs> {
        self.repairs.clone()
    }
}

/// The answers of one write, flush or discard sent to every copy.
struct FanOut {
    pending: AtomicUsize,
    succeeded: AtomicUsize,
    cancelled: AtomicBool,
    first_error: AtomicI32,
    len: u64,
}

impl FanOut {
    /// One copy answered. A failed copy is faulted, not failed upward; the
    /// last answer carries the request's outcome (the others add no bytes).
    fn answer(&self, child: &Io, r: IoResult, health: &Health, member: usize) -> IoResult {
        match r {
            Ok(_) => {
                self.succeeded.fetch_add(1, Ordering::AcqRel);
            }
            Err(Errno::ECANCELED) => self.cancelled.store(true, Ordering::Release),
            Err(e) => {
                health.count_write_error(member);
                health.mark_faulted(member, format!("a {:?} failed: {e}", child.op()));
                let _ =
                    self.first_error
                        .compare_exchange(0, e.0, Ordering::AcqRel, Ordering::Acquire);
            }
        }
        if self.pending.fetch_sub(1, Ordering::AcqRel) != 1 {
            return Ok(0);
        }
        if self.cancelled.load(Ordering::Acquire) {
            Err(Errno::ECANCELED)
        } else if self.succeeded.load(Ordering::Acquire) > 0 {
            Ok(self.len)
        } else {
            Err(Errno(self.first_error.load(Ordering::Acquire)))
        }
    }
}

/// Rewriting the avoided copies of one range from the good bytes.
struct HealJob {
    mirror: Weak<Mirror>,
    origin: Io,
    result: u64,
    heal_id: u64,
    good: Buf,
    pending: AtomicUsize,
}

impl HealJob {
    /// Read `copy`'s bytes; rewrite them if they differ from the good ones.
    fn check(self: Arc<Self>, copy: usize) {
        let Some(mirror) = self.mirror.upgrade() else {
            return self.copy_done();
        };
        let job = self.clone();
        let end_io = Box::new(move |read: &Io, r: IoResult| {
            let same = read.buf().as_slice() == job.good.as_slice();
            job.compared(copy, r.map(|_| same));
            r
        });
        let len = self.good.len();
        let read = Io::new(Op::Read, self.origin.addr(), Buf::zeroed(len), Some(end_io));
        mirror.lowers[copy].submit(read);
    }

    /// `same`: whether the copy read back the good bytes (Err: it did not read).
    fn compared(self: Arc<Self>, copy: usize, same: Result<bool, Errno>) {
        let Some(mirror) = self.mirror.upgrade() else {
            return self.copy_done();
        };
        let member = mirror.members[copy];
        match same {
            Ok(true) => return self.copy_done(),
            Ok(false) => mirror.health.count_checksum_error(member),
            Err(_) => mirror.health.count_read_error(member),
        }
        let job = self.clone();
        let end_io = Box::new(move |write: &Io, r: IoResult| {
            job.rewritten(copy, write.len(), r);
            r
        });
        let write = Io::new(
            Op::Write,
            self.origin.addr(),
            self.good.clone(),
            Some(end_io),
        );
        mirror.lowers[copy].submit(write);
    }

    fn rewritten(self: Arc<Self>, copy: usize, bytes: u64, r: IoResult) {
        if let Some(mirror) = self.mirror.upgrade() {
            let member = mirror.members[copy];
            match r {
                Ok(_) => {
                    log::warn!(
                        "mirror: repaired {bytes} bytes at {} on copy {copy} (member {member})",
                        self.origin.addr()
                    );
                    mirror.health.count_repair(member, bytes);
                    mirror.repairs.count.fetch_add(1, Ordering::Relaxed);
                    mirror.repairs.bytes.fetch_add(bytes, Ordering::Relaxed);
                }
                Err(e) => {
                    mirror.health.count_write_error(member);
                    mirror
                        .health
                        .mark_faulted(member, format!("a repair write failed: {e}"));
                }
            }
        }
        self.copy_done();
    }

    /// One avoided copy is dealt with; after the last, the read completes.
    fn copy_done(self: Arc<Self>) {
        if self.pending.fetch_sub(1, Ordering::AcqRel) != 1 {
            return;
        }
        if let Some(mirror) = self.mirror.upgrade() {
            mirror.heal_done(self.heal_id);
        }
        self.origin.finish(Ok(self.result));
    }
}

impl Map for Mirror {
    fn below(&self) -> &[Arc<dyn Layer>] {
        &self.lowers
    }
    fn map(&self, io: &Io) -> Mapping {
        if let Err(e) = check_range(io.addr(), io.len(), self.capacity) {
            return Mapping::Fail(e);
        }
        match io.op() {
            Op::Read => self.read(io),
            Op::Write | Op::Flush | Op::Discard => self.fan_out(io),
        }
    }
}

impl Layer for Mirror {
    fn name(&self) -> String {
        format!("mirror={}", self.copies())
    }
    fn capacity(&self) -> u64 {
        self.capacity
    }
    fn alignment(&self) -> usize {
        self.lowers
            .iter()
            .map(|l| l.alignment())
            .max()
            .unwrap_or(4096)
    }
    fn vectored(&self) -> bool {
        self.vectored
    }
    fn overhead(&self) -> u64 {
        self.lowers.iter().map(|l| l.overhead()).max().unwrap_or(0)
    }
    fn submit(&self, io: Io) {
        self.submit_batch(vec![io]);
    }
    fn submit_batch(&self, ios: Vec<Io>) {
        let admitted = self.admit(ios);
        if !admitted.is_empty() {
            map::submit_batch(self, admitted);
        }
    }
    fn lowers(&self) -> Vec<Arc<dyn Layer>> {
        self.lowers.clone()
    }
    fn repairs(&self) -> Option<Arc<Repairs>> {
        Some(self.repairs.clone())
    }
}
