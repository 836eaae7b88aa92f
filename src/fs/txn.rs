//! Transactions: the group transaction that gathers operations, begin and
//! commit, inode access within them, and the pending and deferred frees that
//! commits make reusable.

use super::*;
use std::cell::Cell;

/// How a commit reaches the disk.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(super) enum Sync {
    /// Not durably: the next durable commit takes it along.
    None,
    /// Durably, after a device flush of the data it references.
    Flush,
    /// Durably; the caller flushed the device after its last data write
    /// (data written since by others is not referenced: flushes take turns).
    Flushed,
    /// Not durably, but to redb now: the group, by the commit thread.
    Group,
}

/// Operations gathered into one redb transaction before it is committed
/// without durability: a run of creates costs one commit (one update of
/// each table's root, one write-out of the pages they share) instead of one
/// each. Bounded so that a commit stays short; the commit thread, fsync and
/// unmount commit the group durably sooner.
pub(super) const GROUP_OPS: u32 = 256;
/// Past this many the operation that gets there commits the group itself:
/// the commit thread, asked at `GROUP_OPS`, is late.
const GROUP_OPS_MAX: u32 = 4 * GROUP_OPS;

/// The group transaction: the changes of operations that returned, not yet
/// committed to redb. Its lock is taken under the filesystem lock only, and
/// nothing is locked under it but the database handle: readers under the
/// filesystem lock read through it (`read_table!`).
#[derive(Default)]
pub(super) struct Group {
    pub(super) tx: Option<WriteTransaction>,
    /// Operations whose changes it holds (their callers have their answer).
    pub(super) ops: u32,
    /// An operation holds it (`Tx`): reads must go through that `Tx`.
    taken: bool,
}

impl Group {
    /// A read outside the group while an operation holds it would miss the
    /// changes gathered so far: a bug, reported as EIO rather than answered
    /// from older metadata.
    pub(super) fn check_untaken(&self) -> ErrnoResult<()> {
        if self.taken && self.ops > 0 {
            log::error!("a read inside an operation bypassed its transaction");
            return Err(Errno::EIO);
        }
        Ok(())
    }
}

/// An operation's hold on the group transaction, from `begin_tx` to
/// `commit`. Tables it changes are opened with `write`, tables it only
/// reads with `read`. An operation that fails before its first `write`
/// gives the transaction back as it found it; one that fails after it
/// aborts the group, and with it the changes of earlier operations not yet
/// committed (redb cannot undo part of a transaction): the filesystem then
/// fails (read-only), as after a failed commit. Only a metadata I/O error or
/// damage found midway can do that: operations check before they change.
pub(super) struct Tx<'a> {
    fs: &'a Fs,
    tx: Option<WriteTransaction>,
    wrote: Cell<bool>,
}

impl Tx<'_> {
    fn inner(&self) -> &WriteTransaction {
        self.tx
            .as_ref()
            .expect("a Tx holds its transaction until commit")
    }

    /// A table the operation reads.
    pub(super) fn read<K: redb::Key + 'static, V: redb::Value + 'static>(
        &self,
        def: TableDefinition<K, V>,
    ) -> ErrnoResult<redb::Table<'_, K, V>> {
        self.inner().open_table(def).map_err(db_err)
    }

    /// A table the operation changes.
    pub(super) fn write<K: redb::Key + 'static, V: redb::Value + 'static>(
        &self,
        def: TableDefinition<K, V>,
    ) -> ErrnoResult<redb::Table<'_, K, V>> {
        self.wrote.set(true);
        self.read(def)
    }

    pub(super) fn stats(&self) -> ErrnoResult<redb::DatabaseStats> {
        self.inner().stats().map_err(db_err)
    }

    /// The transaction, with no more to do on drop.
    fn into_inner(mut self) -> WriteTransaction {
        self.tx
            .take()
            .expect("a Tx holds its transaction until commit")
    }

    /// The transaction itself, out of the group (for a caller that commits it).
    fn take(self) -> WriteTransaction {
        let fs = self.fs;
        let tx = self.into_inner();
        let mut group = fs.group.lock();
        group.taken = false;
        group.ops = 0;
        tx
    }
}

impl Drop for Tx<'_> {
    /// An operation that returned an error without committing.
    fn drop(&mut self) {
        let Some(tx) = self.tx.take() else {
            return; // committed, or taken
        };
        let mut group = self.fs.group.lock();
        group.taken = false;
        if !self.wrote.get() {
            group.tx = Some(tx);
            return;
        }
        drop(tx);
        let lost = std::mem::take(&mut group.ops);
        drop(group);
        if lost > 0 {
            self.fs.fail(format!(
                "an operation failed after changing the metadata; the changes of {lost} \
                 earlier operation(s) gathered with it and not yet committed are lost"
            ));
        }
    }
}

impl Fs {
    /// Begin an operation's transaction under the filesystem lock: the group
    /// transaction, or a new one. Frees recorded by an operation that failed
    /// (an error returned before its commit) are dropped here: the extents
    /// they name are still in the map.
    pub(super) fn begin_tx(&self, state: &mut State) -> ErrnoResult<Tx<'_>> {
        state.pending_free.truncate(state.pending_mark);
        state.touching.clear();
        if self.read_only {
            return Err(Errno::EROFS);
        }
        self.writable()?;
        // Nearly full, every commit is durable, and an operation starts with
        // no gathered changes: one refused a growth of the store then loses
        // only its own (see `recover_store`).
        if self.near_full() && self.group.lock().ops > 0 {
            let group = self.hold_group()?;
            self.commit_with(state, group, Sync::Flush)?;
        }
        self.hold_group()
    }

    /// The group transaction, or a new one, held by the caller.
    fn hold_group(&self) -> ErrnoResult<Tx<'_>> {
        let mut group = self.group.lock();
        if group.taken {
            // redb would wait for the other transaction to end: forever.
            log::error!("an operation began a transaction inside another");
            return Err(Errno::EIO);
        }
        let tx = match group.tx.take() {
            Some(tx) => tx,
            None => self.db().begin_write().map_err(|e| {
                self.fail(format!("the metadata store refuses new transactions ({e})"));
                Errno::EROFS
            })?,
        };
        group.taken = true;
        Ok(Tx {
            fs: self,
            tx: Some(tx),
            wrote: Cell::new(false),
        })
    }

    /// A write transaction for a caller that commits it itself (fsck's
    /// repairs): the group transaction, with the counters, or a new one.
    pub(crate) fn begin(&self) -> ErrnoResult<WriteTransaction> {
        let mut state = self.state.lock();
        let tx = self.begin_tx(&mut state)?;
        Self::put_counters(&state, &tx)?;
        state.pending_mark = state.pending_free.len();
        Ok(tx.take())
    }

    fn put_counters(state: &State, tx: &Tx<'_>) -> ErrnoResult<()> {
        let mut c = tx.write(COUNTERS)?;
        c.insert("next_ino", state.next_ino).map_err(db_err)?;
        c.insert("next_gen", state.next_gen).map_err(db_err)?;
        Ok(())
    }

    /// The metadata database, opened again first if the store refused to
    /// grow (redb refuses everything after any storage error).
    pub(crate) fn db(&self) -> parking_lot::RwLockReadGuard<'_, Database> {
        if self.store.lock().refused_growth() {
            self.recover_store();
        }
        self.db.read()
    }

    /// The metadata region is full: the transaction that asked for more was
    /// dropped (its caller got ENOSPC), and redb, which now refuses every
    /// operation, is opened again over the store as it is on disk. Nothing
    /// else is lost: near full, every commit is durable (`near_full`).
    fn recover_store(&self) {
        let mut db = self.db.write();
        let mut store = self.store.lock();
        if !store.refused_growth() {
            return; // another thread did it
        }
        match open_database(&self.stack, self.geometry, self.read_only) {
            Ok((fresh, watch, copies)) if watch.fell_back().is_none() => {
                watch.release();
                *db = fresh;
                *store = watch;
                *self.meta_copies.lock() = copies;
                log::warn!("metadata region full: an operation was refused with ENOSPC");
            }
            Ok((_, watch, _)) => {
                *store = watch;
                self.fail("the metadata store was full and its root could not be read back".into());
            }
            Err(e) => {
                store.refuse_nothing_more();
                self.fail(format!(
                    "the metadata store was full and could not be opened again: {e}"
                ));
            }
        }
    }

    /// Begin a transaction that adds metadata (a name, an inode, an
    /// attribute): ENOSPC when the store is nearly full, so that the space
    /// left stays for removals, which need some to make room (copy-on-write).
    pub(super) fn begin_adding(&self, state: &mut State) -> ErrnoResult<Tx<'_>> {
        let tx = self.begin_tx(state)?;
        if self.near_full() {
            let (len, _) = self.store.lock().space();
            // redb's page count is a walk of every table: not for every call.
            if state.meta_checks % 32 == 0 || state.meta_free.is_none() {
                let stats = tx.stats()?;
                let used = stats.allocated_pages() * stats.page_size() as u64;
                state.meta_free = Some(len.saturating_sub(used));
                log::debug!("metadata store nearly full: {len} bytes, {used} in use");
            }
            state.meta_checks = state.meta_checks.wrapping_add(1);
            if state.meta_free.unwrap_or(0) < Self::meta_reserve(len) {
                state.meta_free = None;
                return Err(Errno(libc::ENOSPC));
            }
        }
        Ok(tx)
    }

    /// Metadata space kept for removals when the store is nearly full.
    fn meta_reserve(len: u64) -> u64 {
        (len / 16).max(64 << 10)
    }

    /// Whether the metadata store cannot double again (redb grows it by
    /// doubling): then every commit is made durable, so that a refused
    /// growth can be recovered from the disk without losing anything.
    pub(super) fn near_full(&self) -> bool {
        let (len, max) = self.store.lock().space();
        len.saturating_mul(2) > max
    }

    /// The failed state: once data is lost to the pool (a member outside any
    /// mirror, or every member of a mirror group, faulted: it stopped
    /// answering), or a metadata commit failed (its outcome on disk is
    /// unknown), nothing
    /// more is written or allocated, data or metadata, until the pool is
    /// mounted again: the space a failed commit may have used is never
    /// given out twice. Changes fail with EIO (a faulted member) or EROFS
    /// (read-only after a metadata failure, as ext4's errors=remount-ro);
    /// reads go on (those of a faulted member fail with EIO).
    pub fn writable(&self) -> ErrnoResult<()> {
        if self.stack.health.lost() {
            return Err(Errno::EIO);
        }
        if self.failure.get().is_some() {
            return Err(Errno::EROFS);
        }
        Ok(())
    }

    /// Whether the filesystem is in its failed state.
    pub fn failed(&self) -> bool {
        self.stack.health.lost() || self.failure.get().is_some()
    }

    /// Why the filesystem turned read-only, if a metadata failure made it so.
    pub fn failure(&self) -> Option<&str> {
        self.failure.get().map(|s| s.as_str())
    }

    /// Enter the failed state, saying why once.
    pub(super) fn fail(&self, why: String) {
        let line = format!(
            "{why}; the filesystem is read-only from now on (unmount it, then run stackfs fsck)"
        );
        if self.failure.set(line.clone()).is_ok() {
            log::error!("{line}");
        }
    }

    /// Commit a transaction. A durable commit first flushes the data below
    /// (so no committed extent points at bytes not yet on disk), then makes
    /// the pending frees reusable.
    pub(super) fn commit(&self, state: &mut State, tx: Tx<'_>, durable: bool) -> ErrnoResult<()> {
        self.commit_with(state, tx, if durable { Sync::Flush } else { Sync::None })
    }

    /// Commit, durably unless `sync` is `None` (and the mount is not `sync`).
    /// A commit without durability joins the group transaction, which the
    /// commit thread commits to redb once it holds `GROUP_OPS` operations.
    pub(super) fn commit_with(&self, state: &mut State, tx: Tx<'_>, sync: Sync) -> ErrnoResult<()> {
        let sync = match sync {
            Sync::None if self.policy.lock().sync_metadata || self.near_full() => Sync::Flush,
            other => other,
        };
        let durable = matches!(sync, Sync::Flush | Sync::Flushed);
        state.seq += 1;
        let seq = state.seq;
        for ino in std::mem::take(&mut state.touching) {
            state.changed.insert(ino, seq);
        }
        {
            let mut group = self.group.lock();
            group.ops += 1;
            let ops = group.ops;
            // At GROUP_OPS the commit thread (when there is one) is asked to
            // commit the group; operations go on gathering meanwhile.
            let gather = ops < GROUP_OPS
                || (ops < GROUP_OPS_MAX && (ops > GROUP_OPS || self.ask_group_commit()));
            if sync == Sync::None && gather {
                group.taken = false;
                group.tx = Some(tx.into_inner());
                drop(group);
                self.release_deferred(state);
                state.undurable = true;
                state.pending_mark = state.pending_free.len();
                return Ok(());
            }
        }
        Self::put_counters(state, &tx)?;
        let mut tx = tx.take();
        if sync == Sync::Flush {
            self.flush_device()?;
        }
        let durability = if durable {
            Durability::Immediate
        } else {
            Durability::None
        };
        tx.set_durability(durability).map_err(db_err)?;
        if let Err(e) = tx.commit() {
            if self.store.lock().refused_growth() {
                // The store refused to grow before anything was written:
                // nothing of this transaction happened (see `recover_store`).
                state.pending_free.truncate(state.pending_mark);
                return Err(db_err(e));
            }
            // Part of it may be on disk: its frees stay pending and its new
            // extents stay allocated (the failed state allocates no more).
            self.fail(format!(
                "a metadata commit failed ({e}); whether it reached the disk is unknown"
            ));
            return Err(Errno::EIO);
        }
        if durable {
            // Reads that looked up their extents before this commit may still
            // be reading the freed space: it waits for them (see ARCHITECTURE).
            let g = state.free_gen;
            state.free_gen += 1;
            let freed: Vec<(u64, u64)> = state.pending_free.drain(..).collect();
            state
                .deferred_free
                .extend(freed.into_iter().map(|(s, l)| (g, s, l)));
            self.release_deferred(state);
            state.undurable = false;
            // Everything committed so far is durable with it.
            state.durable_seq = seq;
            state.changed.clear();
        } else {
            self.release_deferred(state);
            state.undurable = true;
        }
        state.pending_mark = state.pending_free.len();
        Ok(())
    }

    /// Commit the group transaction to redb, without durability (the commit
    /// thread, asked by the operation that filled it).
    pub(super) fn commit_group(&self, state: &mut State) -> ErrnoResult<()> {
        if self.group.lock().ops == 0 {
            return Ok(());
        }
        let tx = self.begin_tx(state)?;
        self.commit_with(state, tx, Sync::Group)
    }

    /// Make reusable the freed space that no read in flight can still be reading.
    pub(super) fn release_deferred(&self, state: &mut State) {
        let oldest = self.reads.oldest().unwrap_or(u64::MAX);
        let (free, later): (Vec<_>, Vec<_>) = std::mem::take(&mut state.deferred_free)
            .into_iter()
            .partition(|(g, _, _)| *g < oldest);
        state.deferred_free = later;
        for (_, s, l) in free {
            state.alloc.free(s, l);
        }
    }

    /// Wait (briefly: reads finish in milliseconds) until no read in flight
    /// holds freed space back, for a writer that would otherwise see ENOSPC.
    pub(super) fn drain_deferred(&self, state: &mut State) {
        let until = std::time::Instant::now() + Duration::from_secs(5);
        self.release_deferred(state);
        while !state.deferred_free.is_empty() && std::time::Instant::now() < until {
            std::thread::sleep(Duration::from_millis(1));
            self.release_deferred(state);
        }
    }

    /// Flush the devices. Written data they have not made durable may be
    /// lost: nothing can be committed over it, so a failure fails the
    /// filesystem (EIO).
    pub(super) fn flush_device(&self) -> ErrnoResult<()> {
        let flushed = stackfs_layers::submit_wait(&*self.data, Op::Flush, 0, Buf::zeroed(0));
        flushed.map(|_| ()).map_err(|e| {
            self.fail(format!("a device flush failed ({e})"));
            Errno::EIO
        })
    }

    /// The newest inode: changed in memory, being flushed, or committed.
    pub(super) fn load_inode(&self, state: &State, ino: u64) -> ErrnoResult<Inode> {
        if let Some(i) = Self::inode_in_memory(state, ino) {
            return Ok(i);
        }
        let found = read_table!(self, INODES, |t| t
            .get(ino)
            .map_err(db_err)?
            .map(|v| Inode::decode(ino, v.value())));
        found.ok_or(errno(libc::ENOENT))?
    }

    fn inode_in_memory(state: &State, ino: u64) -> Option<Inode> {
        let changed = state.files.get(&ino).and_then(|f| f.inode.clone());
        changed.or_else(|| state.in_flight.get(&ino).map(|f| f.inode.clone()))
    }

    pub(super) fn inode_tx(&self, state: &State, tx: &Tx<'_>, ino: u64) -> ErrnoResult<Inode> {
        if let Some(i) = Self::inode_in_memory(state, ino) {
            return Ok(i);
        }
        let t = tx.read(INODES)?;
        let v = t.get(ino).map_err(db_err)?.ok_or(errno(libc::ENOENT))?;
        Inode::decode(ino, v.value())
    }

    /// Record an inode's metadata change in `tx`. A file with data still in
    /// memory keeps, in the record, a size no larger than the one its
    /// committed data has: the size written by a metadata-only operation
    /// (chmod, link, xattrs, ...) is never ahead of its data, so a crash
    /// cannot leave a zero-filled tail. The full size goes with the data's
    /// own commit (`commit_units`).
    pub(super) fn put_inode(
        &self,
        state: &mut State,
        tx: &Tx<'_>,
        inode: &Inode,
    ) -> ErrnoResult<()> {
        let mut record = inode.clone();
        let mut table = tx.write(INODES)?;
        state.touching.push(inode.ino);
        let flying = state.in_flight.contains_key(&inode.ino);
        let changed = state
            .files
            .get(&inode.ino)
            .is_some_and(|f| f.inode.is_some());
        if changed || flying {
            // The change joins the file's in memory (a flush in progress
            // took the inode: the next flush commits it again).
            state.files.entry(inode.ino).or_default().inode = Some(inode.clone());
            let committed = match table.get(inode.ino).map_err(db_err)? {
                Some(v) => Inode::decode(inode.ino, v.value())?.size,
                None => 0,
            };
            record.size = record.size.min(committed);
        }
        table
            .insert(inode.ino, record.encode().as_slice())
            .map_err(db_err)?;
        Ok(())
    }
}
