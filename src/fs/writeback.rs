//! Writeback: group flushes of dirty data, the commits of their extents,
//! fsync and sync.

use super::*;

impl Fs {
    pub fn open_file(&self, ino: u64) -> ErrnoResult<Inode> {
        let mut state = self.state.lock();
        let inode = self.load_inode(&state, ino)?;
        state.files.entry(ino).or_default().open += 1;
        Ok(inode)
    }

    /// Write a file's dirty data out (not durably): close() reports its errors.
    pub fn flush(&self, ino: u64) -> ErrnoResult<()> {
        let mut state = self.state.lock();
        self.flush_file(&mut state, ino, false)
    }

    /// Last close of a handle: write its data out, free it if unlinked.
    /// The last close of a file. Its dirty data is not written here: closed
    /// files wait for a group flush (every `CLOSED_BATCH` closes, the commit
    /// timer, memory pressure, fsync or unmount), so that many small files
    /// cost one batch of writes and one commit instead of one each. The
    /// group flush runs on the commit thread when there is one.
    pub fn release(&self, ino: u64) -> ErrnoResult<()> {
        let mut state = self.state.lock();
        let Some(f) = state.files.get_mut(&ino) else {
            return Ok(());
        };
        f.open = f.open.saturating_sub(1);
        if f.open > 0 {
            return Ok(());
        }
        let gone = self
            .load_inode(&state, ino)
            .map(|i| i.nlink == 0)
            .unwrap_or(false);
        if gone {
            let tx = self.begin_tx(&mut *state)?;
            self.purge(&mut state, &tx, ino)?;
            self.commit(&mut state, tx, false)?;
        }
        match state.files.get(&ino) {
            Some(f) if f.units.is_empty() && f.inode.is_none() => {
                state.files.remove(&ino);
            }
            Some(f) => {
                if !f.in_closed_dirty {
                    state.files.get_mut(&ino).expect("present").in_closed_dirty = true;
                    state.closed_dirty += 1;
                }
                // The commit thread writes the group, on the other core,
                // while this FUSE thread answers the next request.
                if state.closed_dirty >= CLOSED_BATCH && !self.kick_writeback() {
                    self.flush_all(&mut state, false)?;
                }
            }
            None => {}
        }
        Ok(())
    }

    /// Write a file's dirty units to fresh space and commit the new extents.
    pub(super) fn flush_file(&self, state: &mut Guard, ino: u64, durable: bool) -> ErrnoResult<()> {
        self.flush_files(state, &[ino], durable)
    }

    /// Make everything committed so far durable: the device flush (which
    /// may take long: it writes back whatever the devices cache) runs with
    /// the lock released, holding the flush turn so that no data is written
    /// meanwhile; the durable commit after it needs no flush of its own.
    pub(super) fn durable_commit(&self, state: &mut Guard) -> ErrnoResult<()> {
        self.wait_for_flush(state);
        state.flushing = true;
        let flushed = Guard::unlocked(state, || self.flush_device());
        state.flushing = false;
        self.flush_done.notify_all();
        flushed?;
        let tx = self.begin_tx(state)?;
        self.commit_with(state, tx, Sync::Flushed)
    }

    /// Wait until no flush is writing with the lock released: for a second
    /// flush (commits of one file's units must not cross), and for truncate,
    /// zero-range and fallocate, which change units a flush may be writing.
    pub(super) fn wait_for_flush(&self, state: &mut Guard) {
        while state.flushing {
            self.flush_done.wait(state);
        }
    }

    /// Run `f` while the filesystem sends no write to the pool: with the
    /// lock held and no flush writing (a device put into a mirror's bay
    /// then misses no write in flight).
    pub fn without_writes<T>(&self, f: impl FnOnce() -> T) -> T {
        let mut state = self.state.lock();
        self.wait_for_flush(&mut state);
        f()
    }

    /// Write the dirty units of several files as one batch (compressed on
    /// every core, one submission per device) and commit all their new
    /// extents in one transaction: group commit for many small files.
    ///
    /// The data is written with the filesystem lock released: the units move
    /// to `in_flight`, where reads and partial overwrites find them, and
    /// lookups, getattr, readdir, reads and metadata changes go on meanwhile.
    /// The lock is taken again to commit.
    pub(super) fn flush_files(
        &self,
        state: &mut Guard,
        inos: &[u64],
        durable: bool,
    ) -> ErrnoResult<()> {
        // Failed: the dirty data stays in memory, unwritten (EIO to the caller).
        self.writable()?;
        self.wait_for_flush(state);
        let mut batch = Vec::new();
        for ino in inos {
            let Some(f) = state.files.get_mut(ino) else {
                continue;
            };
            if let Some(inode) = f.inode.take() {
                batch.push((inode, std::mem::take(&mut f.units)));
            }
        }
        if batch.is_empty() {
            return if durable && state.undurable {
                self.durable_commit(state)
            } else {
                Ok(())
            };
        }
        let units: u64 = batch.iter().map(|(_, u)| u.len() as u64).sum();
        state.dirty_bytes -= (units * UNIT).min(state.dirty_bytes);
        for (inode, units) in &batch {
            let flying = InFlight {
                inode: inode.clone(),
                units: units.iter().map(|(u, d)| (*u, d.data.clone())).collect(),
            };
            state.in_flight.insert(inode.ino, flying);
        }
        state.flushing = true;
        let res = self.write_units(state, &mut batch, durable);
        state.flushing = false;
        if res.is_err() {
            // Keep everything in memory: a later flush may succeed. Units
            // written again meanwhile keep their newer data.
            for (inode, units) in &mut batch {
                let f = state.files.entry(inode.ino).or_default();
                f.inode.get_or_insert(inode.clone());
                let mut back = 0;
                for (u, d) in std::mem::take(units) {
                    if let std::collections::btree_map::Entry::Vacant(e) = f.units.entry(u) {
                        e.insert(d);
                        back += 1;
                    }
                }
                state.dirty_bytes += back * UNIT;
            }
        }
        for (inode, _) in &batch {
            state.in_flight.remove(&inode.ino);
            // Closed files have nothing left to keep.
            if let (Ok(()), Some(f)) = (&res, state.files.get_mut(&inode.ino)) {
                f.in_closed_dirty = false;
                if f.open == 0 && f.units.is_empty() && f.inode.is_none() {
                    state.files.remove(&inode.ino);
                }
            }
        }
        self.flush_done.notify_all();
        res
    }

    /// Place, write and commit a batch. Returns with the lock held again.
    pub(super) fn write_units(
        &self,
        state: &mut Guard,
        batch: &mut [(Inode, BTreeMap<u64, DirtyUnit>)],
        durable: bool,
    ) -> ErrnoResult<()> {
        let prepared = Guard::unlocked(state, || Self::prepare_units(batch));
        let (mut placed, ios, waits) = self.place_units(state, batch, &prepared)?;
        // The data goes down without the lock; a durable flush also makes
        // it durable there (the commit then needs no device flush of its own).
        let (results, flushed) = Guard::unlocked(state, || {
            self.submit_in_chunks(ios, &waits, &mut placed);
            let results: Vec<_> = waits.iter().map(|(_, _, w)| w.wait_tag()).collect();
            let ok = results.iter().all(|(r, _)| r.is_ok());
            let flushed = (durable && ok).then(|| self.flush_device());
            (results, flushed)
        });
        let mut failed = None;
        for ((fi, i, _), (r, tag)) in waits.iter().zip(results) {
            if let Err(e) = r {
                failed.get_or_insert((batch[*fi].0.ino, e));
                continue;
            }
            // Keep what compression recorded; give back the space it saved.
            let x = placed[*fi][*i]
                .1
                .as_mut()
                .expect("written units have extents");
            if tag.codec != 0 {
                x.codec = tag.codec;
                x.stored_len = tag.stored_len;
            }
            x.nonce = tag.nonce;
            x.mac = tag.mac;
            let used = (x.stored_len as u64)
                .div_ceil(BLOCK)
                .saturating_mul(BLOCK)
                .min(x.reserved_len as u64);
            state
                .alloc
                .free(x.phys + used, x.reserved_len as u64 - used);
            x.reserved_len = used as u32;
        }
        if let Some((ino, e)) = failed {
            log::error!("inode {ino}: data write failed: {e}");
            // A write that timed out may still land: its space stays taken
            // until the next mount (the member is faulted meanwhile).
            if e != Errno(libc::ETIMEDOUT) {
                self.free_placed(state, &placed);
            }
            return Err(Errno::EIO);
        }
        let sync = match flushed {
            None => Sync::None,
            Some(Ok(())) => Sync::Flushed,
            Some(Err(e)) => return Err(e),
        };
        let res = self.commit_units(state, batch, &placed, sync);
        if res.is_err() {
            self.free_placed(state, &placed);
        }
        res
    }

    /// Send a flush's writes down a few MiB at a time, each unit's CRC taken
    /// just before: every layer's pass over a unit (the CRC, compression's
    /// guess, sealing) then finds it in the CPU's cache, where one pass per
    /// layer over a whole batch of up to 128 MiB read it from memory each time.
    fn submit_in_chunks(
        &self,
        mut ios: Vec<Io>,
        waits: &[(usize, usize, Waiter)],
        placed: &mut [Vec<(u64, Option<Extent>)>],
    ) {
        const CHUNK: usize = 32;
        let mut sent = 0;
        while !ios.is_empty() {
            let rest = ios.split_off(CHUNK.min(ios.len()));
            for (io, (fi, i, _)) in ios.iter().zip(&waits[sent..]) {
                if let Some(x) = placed[*fi][*i].1.as_mut() {
                    x.crc = crc32c::crc32c(io.buf().as_slice());
                }
            }
            sent += ios.len();
            self.data.submit_batch(std::mem::replace(&mut ios, rest));
        }
    }

    /// Give back the space of a batch that was not committed. After a
    /// failure whose outcome is unknown (a timed-out write, a failed commit)
    /// the space stays taken: the failed state allocates nothing more, and
    /// the next mount rebuilds the allocator.
    fn free_placed(&self, state: &mut State, placed: &[Vec<(u64, Option<Extent>)>]) {
        if self.failed() {
            return;
        }
        for x in placed.iter().flatten().filter_map(|(_, x)| *x) {
            state.alloc.free(x.phys, x.reserved_len as u64);
        }
    }

    /// Without the lock: what each unit of the batch is (a hole, or bytes of
    /// some length with their CRC and block map). Reading every byte of a
    /// large batch takes a while; nothing else waits for it.
    fn prepare_units(batch: &[(Inode, BTreeMap<u64, DirtyUnit>)]) -> Vec<Vec<Prepared>> {
        let prepare = |inode: &Inode, u: u64, d: &DirtyUnit| {
            let ustart = u * UNIT;
            // Units past EOF are kept only when fallocate reserved them.
            if ustart >= inode.size && !d.preallocated {
                return None;
            }
            let logical = inode.size.saturating_sub(ustart).min(UNIT);
            // Crypt keeps nonce and MAC in the extent record (detached), so a
            // unit needs at most its own length; what compression saves is freed later.
            let len = if d.preallocated {
                UNIT
            } else {
                logical.div_ceil(BLOCK) * BLOCK
            };
            let bytes = &d.data.as_slice()[..logical as usize];
            // An all-zero unit is stored as a hole.
            let hole = !d.preallocated && logical == UNIT && bytes.iter().all(|b| *b == 0);
            Some(Prepared {
                unit: u,
                hole,
                data_len: logical as u32,
                written_len: len as u32,
                map: if hole { 0 } else { block_map(bytes) },
                raw: d.preallocated,
            })
        };
        batch
            .iter()
            .map(|(inode, units)| {
                units
                    .iter()
                    .filter_map(|(&u, d)| prepare(inode, u, d))
                    .collect()
            })
            .collect()
    }

    /// Under the lock: space for every prepared unit and its write request.
    /// Per file: (unit, its new extent, or None for a hole).
    #[allow(clippy::type_complexity)]
    fn place_units(
        &self,
        state: &mut State,
        batch: &[(Inode, BTreeMap<u64, DirtyUnit>)],
        prepared: &[Vec<Prepared>],
    ) -> ErrnoResult<(
        Vec<Vec<(u64, Option<Extent>)>>,
        Vec<Io>,
        Vec<(usize, usize, Waiter)>,
    )> {
        let mut ios = Vec::new();
        let mut waits = Vec::new();
        let mut placed: Vec<Vec<(u64, Option<Extent>)>> = vec![Vec::new(); batch.len()];
        for (fi, ((_, units), prepared)) in batch.iter().zip(prepared).enumerate() {
            for p in prepared {
                if p.hole {
                    placed[fi].push((p.unit, None));
                    continue;
                }
                let Some(phys) = state.alloc.alloc(p.written_len as u64) else {
                    self.free_placed(state, &placed);
                    return Err(errno(libc::ENOSPC));
                };
                // The unit's own buffer goes down: past `data_len` it holds zeros
                // (truncate and writes past the end keep it so).
                let b = units[&p.unit].data.slice(0, p.written_len as usize);
                let x = Extent {
                    phys,
                    reserved_len: p.written_len,
                    data_len: p.data_len,
                    written_len: p.written_len,
                    codec: 0,
                    stored_len: p.written_len,
                    nonce: [0; 24],
                    mac: [0; 16],
                    // Set as the unit goes down (`submit_in_chunks`).
                    crc: 0,
                    map: p.map,
                };
                let w = Waiter::new();
                let io = Io::new(Op::Write, phys, b, Some(w.end_io()));
                // Preallocated units claim their full space: no compression.
                let raw = if p.raw { TAG_RAW } else { 0 };
                io.set_tag(ExtentTag {
                    flags: TAG_DETACHED | raw,
                    ..ExtentTag::default()
                });
                ios.push(io);
                waits.push((fi, placed[fi].len(), w));
                placed[fi].push((p.unit, Some(x)));
            }
        }
        Ok((placed, ios, waits))
    }

    /// One transaction for the new extents of a batch of files. The record
    /// written is the file's newest inode (a chmod or a write made while the
    /// data was in flight stays), with the size whose data this commits.
    pub(super) fn commit_units(
        &self,
        state: &mut State,
        batch: &[(Inode, BTreeMap<u64, DirtyUnit>)],
        placed: &[Vec<(u64, Option<Extent>)>],
        sync: Sync,
    ) -> ErrnoResult<()> {
        let tx = self.begin_tx(&mut *state)?;
        for ((flushed, _), placed) in batch.iter().zip(placed) {
            let ino = flushed.ino;
            let committed = match tx.read(INODES)?.get(ino).map_err(db_err)? {
                Some(v) => Some(Inode::decode(ino, v.value())?),
                None => None,
            };
            let Some(committed) = committed else {
                // Unlinked and purged meanwhile: drop the extents again.
                self.put_extents(state, &tx, ino, placed)?;
                self.drop_extents(state, &tx, ino, 0)?;
                continue;
            };
            let delta = self.put_extents(state, &tx, ino, placed)?;
            let mut record = match state.files.get_mut(&ino).and_then(|f| f.inode.as_mut()) {
                Some(newest) => {
                    newest.stored = newest.stored.saturating_add_signed(delta);
                    newest.clone()
                }
                // Unchanged since the flush took it: the inode it took.
                None => Inode {
                    stored: committed.stored.saturating_add_signed(delta),
                    ..flushed.clone()
                },
            };
            record.size = flushed.size;
            state.touching.push(ino);
            tx.write(INODES)?
                .insert(ino, record.encode().as_slice())
                .map_err(db_err)?;
        }
        // Out of the cache before the new extents are visible, but never
        // holding the cache lock over redb work: redb may read a metadata
        // sector through a device thread that is itself waiting for the
        // cache lock to finish a read.
        for ((inode, _), placed) in batch.iter().zip(placed) {
            for (u, _) in placed {
                self.reads.uncache(inode.ino, *u);
            }
        }
        self.commit_with(state, tx, sync)
    }

    /// Record a file's new extents (None: a hole) in `tx`; the change of
    /// its stored bytes. The old extents' space is freed with the commit.
    fn put_extents(
        &self,
        state: &mut State,
        tx: &Tx<'_>,
        ino: u64,
        placed: &[(u64, Option<Extent>)],
    ) -> ErrnoResult<i64> {
        let mut t = tx.write(EXTENTS)?;
        let mut delta = 0i64;
        for (u, x) in placed {
            let old = match x {
                Some(x) => t.insert((ino, *u), x.encode().as_slice()).map_err(db_err)?,
                None => t.remove((ino, *u)).map_err(db_err)?,
            };
            if let Some(Ok(old)) = old.map(|v| Extent::decode(v.value())) {
                state.pending_free.push((old.phys, old.reserved_len as u64));
                delta -= old.reserved_len as i64;
            }
            if let Some(x) = x {
                delta += x.reserved_len as i64;
            }
        }
        Ok(delta)
    }

    pub(super) fn flush_all(&self, state: &mut Guard, durable: bool) -> ErrnoResult<()> {
        // In inode order: files created one after another are laid out one
        // after another (and the layout does not depend on hash order).
        let mut inos: Vec<u64> = state
            .files
            .iter()
            .filter(|(_, f)| f.inode.is_some() || !f.units.is_empty())
            .map(|(i, _)| *i)
            .collect();
        inos.sort_unstable();
        state.closed_dirty = 0;
        let mut first = None;
        if self.flush_files(state, &inos, false).is_err() {
            // One file's failure must not hold the others back: one by one.
            for ino in inos {
                if let Err(e) = self.flush_file(state, ino, false) {
                    first.get_or_insert(e);
                }
            }
        }
        // What did get written is made durable even when some file failed.
        let committed = if durable
            && !self.failed()
            && (state.undurable
                || !state.pending_free.is_empty()
                || !state.deferred_free.is_empty())
        {
            self.durable_commit(state)
        } else {
            Ok(())
        };
        match first {
            Some(e) => Err(e),
            None => committed,
        }
    }

    /// fsync: this file's data and every change before its last one,
    /// durably. A file whose changes are all durable already (those of
    /// other files may not be) costs no commit.
    pub fn fsync(&self, ino: u64) -> ErrnoResult<()> {
        let mut state = self.state.lock();
        if !Self::undurable_file(&state, ino) {
            return Ok(());
        }
        if state.closed_dirty > 0 {
            // A durable commit makes every earlier metadata change durable,
            // names and sizes of closed files included: their data goes with it.
            self.flush_all(&mut state, true)?;
        }
        self.flush_file(&mut state, ino, true)?;
        // Another fsync's commit, made while this one waited for its turn,
        // may have covered the file's last change.
        self.wait_for_flush(&mut state);
        if Self::undurable_file(&state, ino) {
            self.durable_commit(&mut state)?;
        }
        Ok(())
    }

    /// Whether something of file `ino` is not durable yet: dirty data, a
    /// flush writing it, or a change committed since the last durable commit.
    fn undurable_file(state: &State, ino: u64) -> bool {
        state
            .files
            .get(&ino)
            .is_some_and(|f| f.inode.is_some() || !f.units.is_empty())
            || state.in_flight.contains_key(&ino)
            || state
                .changed
                .get(&ino)
                .is_some_and(|s| *s > state.durable_seq)
    }

    /// Everything durable (timer, syncfs, unmount).
    pub fn sync(&self) -> ErrnoResult<()> {
        if self.read_only || self.closed.lock().is_some() {
            return Ok(());
        }
        let mut state = self.state.lock();
        self.flush_all(&mut state, true)
    }
}

/// A unit of a flush, looked at before it is placed (`prepare_units`).
struct Prepared {
    unit: u64,
    /// All zeros: stored as a hole.
    hole: bool,
    /// As in `Extent`: bytes of file data, and bytes written (rounded up to 4 KiB).
    data_len: u32,
    written_len: u32,
    map: u16,
    /// Preallocated: stored whole, uncompressed.
    raw: bool,
}

/// The commit thread of a mount (see `Fs::commit_every`); stopped and
/// joined when dropped.
pub struct CommitThread {
    fs: Arc<Fs>,
    signal: Arc<(Mutex<Wake>, parking_lot::Condvar)>,
    handle: Option<std::thread::JoinHandle<()>>,
}

/// What wakes the commit thread.
#[derive(Default)]
pub(super) struct Wake {
    pub(super) stop: bool,
    /// Writes passed half the dirty limit.
    pub(super) dirty: bool,
    /// The group transaction is full: commit it.
    pub(super) group: bool,
}

impl Fs {
    /// Start the thread that makes everything written durable within
    /// `interval` of being written: one group commit (a flush of every
    /// dirty file and one durable transaction) per interval in which
    /// something changed, none while idle or failed.
    pub fn commit_every(self: &Arc<Fs>, interval: Duration) -> std::io::Result<CommitThread> {
        let signal = Arc::new((Mutex::new(Wake::default()), parking_lot::Condvar::new()));
        *self.writeback.lock() = Some(signal.clone());
        let (fs, thread_signal) = (self.clone(), signal.clone());
        let handle = std::thread::Builder::new()
            .name("commit".into())
            .spawn(move || fs.commit_loop(&thread_signal, interval))?;
        Ok(CommitThread {
            fs: self.clone(),
            signal,
            handle: Some(handle),
        })
    }

    /// The commit thread: a durable group commit every `interval` in which
    /// something changed; a plain write-back of dirty data as soon as
    /// writes pass half the dirty limit (so that writers seldom reach the
    /// limit, where they flush themselves and hold a FUSE thread meanwhile).
    fn commit_loop(&self, signal: &(Mutex<Wake>, parking_lot::Condvar), interval: Duration) {
        let (asked, wake) = signal;
        let mut asked = asked.lock();
        let mut due = std::time::Instant::now() + interval;
        while !asked.stop {
            if !asked.dirty && !asked.group {
                wake.wait_until(&mut asked, due);
            }
            if asked.stop || self.failed() {
                // Nothing more is written: what was asked is dropped (a
                // flag left set would keep the thread from waiting).
                asked.dirty = false;
                asked.group = false;
                due = std::time::Instant::now() + interval;
                continue;
            }
            if std::mem::take(&mut asked.group) {
                let committed = parking_lot::MutexGuard::unlocked(&mut asked, || {
                    self.commit_group(&mut self.state.lock())
                });
                if let Err(e) = committed {
                    log::error!("commit of the gathered metadata changes failed: {e}");
                }
                continue;
            }
            if std::mem::take(&mut asked.dirty) {
                let written = parking_lot::MutexGuard::unlocked(&mut asked, || {
                    let mut state = self.state.lock();
                    self.flush_all(&mut state, false)
                });
                if let Err(e) = written {
                    log::warn!("write-back of dirty data failed: {e}");
                }
                continue;
            }
            if std::time::Instant::now() < due {
                continue;
            }
            due = std::time::Instant::now() + interval;
            // Never the filesystem lock while holding `asked`: a writer
            // holds the filesystem lock when it wakes this thread
            // (`kick_writeback`), so the opposite order deadlocks.
            let undurable = parking_lot::MutexGuard::unlocked(&mut asked, || self.has_undurable());
            if !undurable {
                // Idle: the buffers kept for the next writes go back.
                stackfs_layers::buf::release_kept();
                continue;
            }
            let synced = parking_lot::MutexGuard::unlocked(&mut asked, || self.sync());
            if let Err(e) = synced {
                log::error!("periodic commit failed: {e}");
            }
        }
    }

    /// Ask the commit thread (if any: whether there is one) to write dirty
    /// data back now.
    pub(super) fn kick_writeback(&self) -> bool {
        self.ask_commit_thread(|asked| asked.dirty = true)
    }

    /// Ask the commit thread (if any: whether there is one) to commit the
    /// group transaction.
    pub(super) fn ask_group_commit(&self) -> bool {
        self.ask_commit_thread(|asked| asked.group = true)
    }

    fn ask_commit_thread(&self, ask: impl FnOnce(&mut Wake)) -> bool {
        let Some(signal) = &*self.writeback.lock() else {
            return false;
        };
        ask(&mut signal.0.lock());
        signal.1.notify_one();
        true
    }

    /// Whether anything written is not durable yet.
    pub(super) fn has_undurable(&self) -> bool {
        let state = self.state.lock();
        state.undurable
            || !state.pending_free.is_empty()
            || state
                .files
                .values()
                .any(|f| f.inode.is_some() || !f.units.is_empty())
    }
}

impl Drop for CommitThread {
    fn drop(&mut self) {
        *self.fs.writeback.lock() = None;
        self.signal.0.lock().stop = true;
        self.signal.1.notify_all();
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}
