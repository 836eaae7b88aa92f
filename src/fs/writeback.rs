//! Writeback: group flushes of dirty data, the commits of their extents,
//! fsync and sync.

use super::*;

impl Fs {
    pub fn open_file(&self, ino: u64) -> R<Inode> {
        let mut st = self.st.lock();
        let inode = self.load_inode(&st, ino)?;
        st.files.entry(ino).or_default().open += 1;
        Ok(inode)
    }

    /// Write a file's dirty data out (not durably): close() reports its errors.
    pub fn flush(&self, ino: u64) -> R<()> {
        let mut st = self.st.lock();
        self.flush_file(&mut st, ino, false)
    }

    /// Last close of a handle: write its data out, free it if unlinked.
    /// The last close of a file. Its dirty data is not written here: closed
    /// files wait for a group flush (every `CLOSED_BATCH` closes, the commit
    /// timer, memory pressure, fsync or unmount), so that many small files
    /// cost one batch of writes and one commit instead of one each.
    pub fn release(&self, ino: u64) -> R<()> {
        let mut st = self.st.lock();
        let Some(f) = st.files.get_mut(&ino) else {
            return Ok(());
        };
        f.open = f.open.saturating_sub(1);
        if f.open > 0 {
            return Ok(());
        }
        let gone = self
            .load_inode(&st, ino)
            .map(|i| i.nlink == 0)
            .unwrap_or(false);
        if gone {
            let tx = self.begin_tx(&mut *st)?;
            self.purge(&mut st, &tx, ino)?;
            self.commit(&mut st, tx, false)?;
        }
        match st.files.get(&ino) {
            Some(f) if f.units.is_empty() && f.inode.is_none() => {
                st.files.remove(&ino);
            }
            Some(f) => {
                if !f.counted {
                    st.files.get_mut(&ino).expect("present").counted = true;
                    st.closed_dirty += 1;
                }
                if st.closed_dirty >= CLOSED_BATCH {
                    self.flush_all(&mut st, false)?;
                }
            }
            None => {}
        }
        Ok(())
    }

    /// Write a file's dirty units to fresh space and commit the new extents.
    pub(super) fn flush_file(&self, st: &mut State, ino: u64, durable: bool) -> R<()> {
        self.flush_files(st, &[ino], durable)
    }

    /// Write the dirty units of several files as one batch (compressed on
    /// every core, one submission per device) and commit all their new
    /// extents in one transaction: group commit for many small files.
    pub(super) fn flush_files(&self, st: &mut State, inos: &[u64], durable: bool) -> R<()> {
        // Failed: the dirty data stays in memory, unwritten (EIO to the caller).
        self.writable()?;
        let mut batch = Vec::new();
        for ino in inos {
            let Some(f) = st.files.get_mut(ino) else {
                continue;
            };
            if let Some(inode) = f.inode.take() {
                batch.push((inode, std::mem::take(&mut f.units)));
            }
        }
        if batch.is_empty() {
            return if durable && st.undurable {
                self.commit_now(st, true)
            } else {
                Ok(())
            };
        }
        let res = self.write_units(st, &mut batch, durable);
        let units: u64 = batch.iter().map(|(_, u)| u.len() as u64).sum();
        match res {
            Ok(()) => {
                st.dirty_bytes -= (units * UNIT).min(st.dirty_bytes);
                // Closed files have nothing left to keep.
                for (inode, _) in &batch {
                    if let Some(f) = st.files.get_mut(&inode.ino) {
                        f.counted = false;
                        if f.open == 0 && f.units.is_empty() && f.inode.is_none() {
                            st.files.remove(&inode.ino);
                        }
                    }
                }
                Ok(())
            }
            Err(e) => {
                // Keep everything in memory: a later flush may succeed.
                for (inode, units) in batch {
                    let f = st.files.entry(inode.ino).or_default();
                    f.inode.get_or_insert(inode);
                    for (u, d) in units {
                        f.units.entry(u).or_insert(d);
                    }
                }
                Err(e)
            }
        }
    }

    pub(super) fn write_units(
        &self,
        st: &mut State,
        batch: &mut [(Inode, BTreeMap<u64, DirtyUnit>)],
        durable: bool,
    ) -> R<()> {
        let mut ios = Vec::new();
        let mut waits = Vec::new();
        // Per file of the batch: (unit, its new extent, or None for a hole).
        let mut placed: Vec<Vec<(u64, Option<Extent>)>> = vec![Vec::new(); batch.len()];
        // After a failure whose outcome is unknown (a timed-out write, a
        // failed commit) the space stays taken: the failed state allocates
        // nothing more, and the next mount rebuilds the allocator.
        let free_placed = |st: &mut State, placed: &[Vec<(u64, Option<Extent>)>]| {
            if self.failed() {
                return;
            }
            for x in placed.iter().flatten().filter_map(|(_, x)| *x) {
                st.alloc.free(x.phys, x.alloc as u64);
            }
        };
        for (fi, (inode, units)) in batch.iter().enumerate() {
            for (&u, d) in units.iter() {
                let ustart = u * UNIT;
                // Units past EOF are kept only when fallocate reserved them.
                if ustart >= inode.size && !d.keep {
                    continue;
                }
                let logical = inode.size.saturating_sub(ustart).min(UNIT);
                let len = if d.keep {
                    UNIT
                } else {
                    logical.div_ceil(BLOCK) * BLOCK
                };
                // Crypt keeps nonce and MAC in the extent record (detached), so a
                // unit needs at most its own length; what compression saves is freed below.
                let alloc_len = len;
                let bytes = &d.data.as_slice()[..logical as usize];
                if !d.keep && logical == UNIT && bytes.iter().all(|b| *b == 0) {
                    // An all-zero unit is stored as a hole.
                    placed[fi].push((u, None));
                    continue;
                }
                let Some(phys) = st.alloc.alloc(alloc_len) else {
                    free_placed(st, &placed);
                    return Err(err(libc::ENOSPC));
                };
                // The unit's own buffer goes down: past `logical` it holds zeros
                // (truncate and writes past the end keep it so).
                let b = d.data.slice(0, len as usize);
                let x = Extent {
                    phys,
                    alloc: alloc_len as u32,
                    logical: logical as u32,
                    len: len as u32,
                    codec: 0,
                    stored: len as u32,
                    nonce: [0; 24],
                    mac: [0; 16],
                    crc: crc32c::crc32c(b.as_slice()),
                    map: block_map(bytes),
                };
                let w = Waiter::new();
                let io = Io::new(Op::Write, phys, b, Some(w.end_io()));
                // Preallocated units claim their full space: no compression.
                let flags = if d.keep {
                    TAG_DETACHED | TAG_RAW
                } else {
                    TAG_DETACHED
                };
                io.set_tag(ExtentTag {
                    flags,
                    ..ExtentTag::default()
                });
                ios.push(io);
                waits.push((fi, placed[fi].len(), w));
                placed[fi].push((u, Some(x)));
            }
        }
        self.data.submit_batch(ios);
        let mut failed = None;
        for (fi, i, w) in &waits {
            let (r, tag) = w.wait_tag();
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
                x.stored = tag.stored_len;
            }
            x.nonce = tag.nonce;
            x.mac = tag.mac;
            let used = (x.stored as u64)
                .div_ceil(BLOCK)
                .saturating_mul(BLOCK)
                .min(x.alloc as u64);
            st.alloc.free(x.phys + used, x.alloc as u64 - used);
            x.alloc = used as u32;
        }
        if let Some((ino, e)) = failed {
            log::error!("inode {ino}: data write failed: {e}");
            free_placed(st, &placed);
            return Err(Errno::EIO);
        }
        // The new inodes are staged and become the batch's only once the
        // commit has succeeded; on any error the new extents are freed and
        // the old ones stay (their frees are dropped with the transaction).
        let mut staged: Vec<Inode> = batch.iter().map(|(i, _)| i.clone()).collect();
        let res = self.commit_units(st, &mut staged, &placed, durable);
        match res {
            Ok(()) => {
                for ((inode, _), new) in batch.iter_mut().zip(staged) {
                    *inode = new;
                }
                Ok(())
            }
            Err(e) => {
                free_placed(st, &placed);
                Err(e)
            }
        }
    }

    /// One transaction for the new extents of a batch of files.
    pub(super) fn commit_units(
        &self,
        st: &mut State,
        inodes: &mut [Inode],
        placed: &[Vec<(u64, Option<Extent>)>],
        durable: bool,
    ) -> R<()> {
        let tx = self.begin_tx(&mut *st)?;
        for (inode, placed) in inodes.iter_mut().zip(placed) {
            let ino = inode.ino;
            {
                let mut t = tx.open_table(EXTENTS).map_err(db_err)?;
                for (u, x) in placed {
                    let old = match x {
                        Some(x) => t
                            .insert((ino, *u), x.encode().as_slice())
                            .map_err(db_err)?
                            .map(|v| Extent::decode(v.value())),
                        None => t
                            .remove((ino, *u))
                            .map_err(db_err)?
                            .map(|v| Extent::decode(v.value())),
                    };
                    if let Some(Ok(old)) = old {
                        st.pending_free.push((old.phys, old.alloc as u64));
                        inode.stored -= (old.alloc as u64).min(inode.stored);
                    }
                    if let Some(x) = x {
                        inode.stored += x.alloc as u64;
                    }
                }
            }
            // The inode may be gone (unlinked and purged meanwhile): then drop the extents again.
            let exists = tx
                .open_table(INODES)
                .map_err(db_err)?
                .get(ino)
                .map_err(db_err)?
                .is_some();
            if exists {
                tx.open_table(INODES)
                    .map_err(db_err)?
                    .insert(ino, inode.encode().as_slice())
                    .map_err(db_err)?;
            } else {
                self.drop_extents(st, &tx, ino, 0)?;
            }
        }
        // Out of the cache before the new extents are visible, but never
        // holding the cache lock over redb work: redb may read a metadata
        // sector through a device thread that is itself waiting for the
        // cache lock to finish a read.
        for (inode, placed) in inodes.iter().zip(placed) {
            for (u, _) in placed {
                self.rd.uncache(inode.ino, *u);
            }
        }
        self.commit(st, tx, durable)
    }

    pub(super) fn flush_all(&self, st: &mut State, durable: bool) -> R<()> {
        // In inode order: files created one after another are laid out one
        // after another (and the layout does not depend on hash order).
        let mut inos: Vec<u64> = st
            .files
            .iter()
            .filter(|(_, f)| f.inode.is_some() || !f.units.is_empty())
            .map(|(i, _)| *i)
            .collect();
        inos.sort_unstable();
        st.closed_dirty = 0;
        let mut first = None;
        if self.flush_files(st, &inos, false).is_err() {
            // One file's failure must not hold the others back: one by one.
            for ino in inos {
                if let Err(e) = self.flush_file(st, ino, false) {
                    first.get_or_insert(e);
                }
            }
        }
        // What did get written is made durable even when some file failed.
        let committed = if durable
            && !self.failed()
            && (st.undurable || !st.pending_free.is_empty() || !st.deferred_free.is_empty())
        {
            self.commit_now(st, true)
        } else {
            Ok(())
        };
        match first {
            Some(e) => Err(e),
            None => committed,
        }
    }

    pub fn fsync(&self, ino: u64) -> R<()> {
        let mut st = self.st.lock();
        if st.closed_dirty > 0 {
            // A durable commit makes every earlier metadata change durable,
            // names and sizes of closed files included: their data goes with it.
            self.flush_all(&mut st, true)?;
        }
        self.flush_file(&mut st, ino, true)?;
        if st.undurable {
            self.commit_now(&mut st, true)?;
        }
        Ok(())
    }

    /// Everything durable (timer, syncfs, unmount).
    pub fn sync(&self) -> R<()> {
        if self.read_only || self.closed.lock().is_some() {
            return Ok(());
        }
        let mut st = self.st.lock();
        self.flush_all(&mut st, true)
    }
}
