//! The state of each member of a pool: whether it answers, whether it holds
//! a whole copy of its data, and its error counters. Shared by the
//! watchdogs (which fault a member that stops answering), the mirrors
//! (which fault a member that fails a write, count what they repair, and
//! read only from members that are in sync), the filesystem (its failed
//! state) and `stackfs info`.

use parking_lot::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

pub struct Health {
    members: Mutex<Vec<Member>>,
    any: AtomicBool,
    /// Per member: faulted (read without the lock, on every request).
    faulted: Vec<AtomicBool>,
    /// Per member: being brought back in sync (resync or replace). It takes
    /// every write, and serves no read until it is whole.
    resyncing: Vec<AtomicBool>,
    /// Members that hold the same data (mirror groups, by member index): the
    /// pool is lost only when a group has no member left to read from.
    groups: Mutex<Vec<Vec<usize>>>,
    /// The pool is open read-only: nothing may be rewritten (no heals).
    read_only: AtomicBool,
}

#[derive(Clone, Debug, Default)]
pub struct Member {
    pub name: String,
    /// Why the member is faulted; None while it answers.
    pub faulted: Option<String>,
    /// The member was not there when the pool was opened (`-o degraded`).
    pub missing: bool,
    /// Being resynced or rebuilt: takes writes, serves no reads.
    pub resyncing: bool,
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

impl Member {
    /// One word for `stackfs info`: missing, faulted, resyncing or online.
    pub fn state(&self) -> &'static str {
        if self.missing {
            "missing"
        } else if self.faulted.is_some() {
            "faulted"
        } else if self.resyncing {
            "resyncing"
        } else {
            "online"
        }
    }
}

impl Health {
    pub fn new(names: Vec<String>) -> Arc<Health> {
        let flags = || names.iter().map(|_| AtomicBool::new(false)).collect();
        Arc::new(Health {
            faulted: flags(),
            resyncing: flags(),
            members: Mutex::new(
                names
                    .iter()
                    .map(|name| Member {
                        name: name.clone(),
                        ..Member::default()
                    })
                    .collect(),
            ),
            any: AtomicBool::new(false),
            groups: Mutex::new(Vec::new()),
            read_only: AtomicBool::new(false),
        })
    }

    /// Declare which members mirror each other (`spec` does it when it builds
    /// `mirror=N`); a member in no group holds the only copy of its data.
    pub fn set_groups(&self, groups: Vec<Vec<usize>>) {
        *self.groups.lock() = groups;
    }

    /// The pool is open read-only (fsck's check, `info`, a ro mount): the
    /// mirrors read around bad copies but rewrite none (a scrub will).
    pub fn set_read_only(&self) {
        self.read_only.store(true, Ordering::Release);
    }

    pub fn is_read_only(&self) -> bool {
        self.read_only.load(Ordering::Acquire)
    }

    /// Whether any member is faulted (not only resyncing).
    pub fn any_member_faulted(&self) -> bool {
        self.any_faulted() && (0..self.count()).any(|i| self.is_faulted(i))
    }

    /// The mirror groups, by member index (none without a mirror).
    pub fn groups(&self) -> Vec<Vec<usize>> {
        self.groups.lock().clone()
    }

    /// Copies each mirror group keeps (1 without a mirror).
    pub fn copies(&self) -> usize {
        self.groups.lock().first().map_or(1, |g| g.len().max(1))
    }

    /// The members that hold the same data as member `i` (itself included);
    /// just `i` when it is in no mirror group.
    pub fn group_of(&self, i: usize) -> Vec<usize> {
        self.groups
            .lock()
            .iter()
            .find(|g| g.contains(&i))
            .cloned()
            .unwrap_or_else(|| vec![i])
    }

    /// How many members the pool has.
    pub fn count(&self) -> usize {
        self.faulted.len()
    }

    /// Whether member `i` is faulted.
    pub fn is_faulted(&self, i: usize) -> bool {
        flag(&self.faulted, i)
    }

    /// Whether member `i` is being resynced (takes writes, serves no reads).
    pub fn is_resyncing(&self, i: usize) -> bool {
        flag(&self.resyncing, i)
    }

    /// Whether reads may go to member `i`: it answers and is in sync.
    pub fn is_readable(&self, i: usize) -> bool {
        !self.is_faulted(i) && !self.is_resyncing(i)
    }

    /// Whether any member is faulted or resyncing (cheap: one atomic load).
    pub fn any_faulted(&self) -> bool {
        self.any.load(Ordering::Acquire)
    }

    /// Whether some data has no copy left to read: a mirror group with no
    /// readable member, or a faulted member that is in no group. Cheap
    /// while every member is well. The filesystem's failed state.
    pub fn lost(&self) -> bool {
        if !self.any_faulted() {
            return false;
        }
        let groups = self.groups.lock();
        let group_lost = groups
            .iter()
            .any(|g| !g.is_empty() && g.iter().all(|&i| !self.is_readable(i)));
        let alone_lost = (0..self.faulted.len())
            .any(|i| !self.is_readable(i) && !groups.iter().any(|g| g.contains(&i)));
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

    /// Member `i` was not there when the pool was opened: faulted, and shown
    /// as missing.
    pub fn mark_missing(&self, i: usize) {
        self.update(i, |member| {
            member.missing = true;
            member.faulted = Some("missing when the pool was opened".into());
        });
        if let Some(f) = self.faulted.get(i) {
            f.store(true, Ordering::Release);
            self.any.store(true, Ordering::Release);
        }
    }

    /// Start or end the resync of member `i`.
    pub fn set_resyncing(&self, i: usize, on: bool) {
        self.update(i, |member| member.resyncing = on);
        if let Some(f) = self.resyncing.get(i) {
            f.store(on, Ordering::Release);
        }
        self.recount();
    }

    /// Member `i` is now a new device called `name` (a replace): it answers,
    /// its counters start from zero, and it is resyncing until rebuilt.
    pub fn revive(&self, i: usize, name: String) {
        self.update(i, |member| {
            *member = Member {
                name,
                resyncing: true,
                ..Member::default()
            }
        });
        if let (Some(f), Some(r)) = (self.faulted.get(i), self.resyncing.get(i)) {
            r.store(true, Ordering::Release);
            f.store(false, Ordering::Release);
        }
        self.recount();
    }

    fn recount(&self) {
        let any = (0..self.count()).any(|i| !self.is_readable(i));
        self.any.store(any, Ordering::Release);
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

    pub(crate) fn late(&self, i: usize) {
        self.update(i, |member| member.late += 1);
    }

    fn update(&self, i: usize, change: impl FnOnce(&mut Member)) {
        if let Some(member) = self.members.lock().get_mut(i) {
            change(member);
        }
    }
}

fn flag(flags: &[AtomicBool], i: usize) -> bool {
    flags.get(i).is_some_and(|f| f.load(Ordering::Acquire))
}
