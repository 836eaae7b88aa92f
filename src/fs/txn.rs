//! Transactions: begin and commit, inode access within them, and the
//! pending and deferred frees that commits make reusable.

use super::*;

impl Fs {
    /// Begin a transaction under the filesystem lock. Frees recorded by a
    /// transaction that was abandoned (an error returned before its commit)
    /// are dropped here: the extents they name are still in the committed map.
    pub(super) fn begin_tx(&self, st: &mut State) -> R<WriteTransaction> {
        st.pending_free.truncate(st.pending_mark);
        self.begin()
    }

    pub(crate) fn begin(&self) -> R<WriteTransaction> {
        if self.read_only {
            return Err(Errno::EROFS);
        }
        self.writable()?;
        self.db.begin_write().map_err(db_err)
    }

    /// The failed state: once a member is faulted (it stopped answering),
    /// nothing more is written, data or metadata, until the pool is mounted
    /// again. Writes, fsync and changes fail with EIO; reads go on (those of
    /// the faulted member fail with EIO from the watchdog).
    pub fn writable(&self) -> R<()> {
        if self.pool.stack.health.any_faulted() {
            return Err(Errno::EIO);
        }
        Ok(())
    }

    /// Whether the filesystem is in its failed state.
    pub fn failed(&self) -> bool {
        self.pool.stack.health.any_faulted()
    }

    /// Commit a transaction. A durable commit first flushes the data below
    /// (so no committed extent points at bytes not yet on disk), then makes
    /// the pending frees reusable.
    pub(super) fn commit(&self, st: &mut State, mut tx: WriteTransaction, durable: bool) -> R<()> {
        let durable = durable || self.policy.lock().sync_metadata;
        {
            let mut c = tx.open_table(COUNTERS).map_err(db_err)?;
            c.insert("next_ino", st.next_ino).map_err(db_err)?;
            c.insert("next_gen", st.next_gen).map_err(db_err)?;
        }
        if durable {
            self.flush_device()?;
            tx.set_durability(Durability::Immediate).map_err(db_err)?;
        } else {
            tx.set_durability(Durability::None).map_err(db_err)?;
        }
        if let Err(e) = tx.commit() {
            // Nothing of this transaction happened: neither do its frees.
            st.pending_free.truncate(st.pending_mark);
            return Err(db_err(e));
        }
        if durable {
            // Reads that looked up their extents before this commit may still
            // be reading the freed space: it waits for them (see ARCHITECTURE).
            let g = st.free_gen;
            st.free_gen += 1;
            let freed: Vec<(u64, u64)> = st.pending_free.drain(..).collect();
            st.deferred_free
                .extend(freed.into_iter().map(|(s, l)| (g, s, l)));
            self.release_deferred(st);
            st.undurable = false;
        } else {
            self.release_deferred(st);
            st.undurable = true;
        }
        st.pending_mark = st.pending_free.len();
        Ok(())
    }

    /// Make reusable the freed space that no read in flight can still be reading.
    pub(super) fn release_deferred(&self, st: &mut State) {
        let oldest = self.rd.oldest().unwrap_or(u64::MAX);
        let (free, keep): (Vec<_>, Vec<_>) = std::mem::take(&mut st.deferred_free)
            .into_iter()
            .partition(|(g, _, _)| *g < oldest);
        st.deferred_free = keep;
        for (_, s, l) in free {
            st.alloc.free(s, l);
        }
    }

    /// Wait (briefly: reads finish in milliseconds) until no read in flight
    /// holds freed space back, for a writer that would otherwise see ENOSPC.
    pub(super) fn drain_deferred(&self, st: &mut State) {
        let until = std::time::Instant::now() + Duration::from_secs(5);
        self.release_deferred(st);
        while !st.deferred_free.is_empty() && std::time::Instant::now() < until {
            std::thread::sleep(Duration::from_millis(1));
            self.release_deferred(st);
        }
    }

    pub(super) fn flush_device(&self) -> R<()> {
        stackfs_layers::submit_wait(&*self.data, Op::Flush, 0, Buf::zeroed(0)).map(|_| ())
    }

    pub(super) fn load_inode(&self, st: &State, ino: u64) -> R<Inode> {
        if let Some(i) = st.files.get(&ino).and_then(|f| f.inode.clone()) {
            return Ok(i);
        }
        let rtx = self.db.begin_read().map_err(db_err)?;
        let t = rtx.open_table(INODES).map_err(db_err)?;
        let v = t.get(ino).map_err(db_err)?.ok_or(err(libc::ENOENT))?;
        Inode::decode(ino, v.value())
    }

    pub(super) fn inode_tx(&self, st: &State, tx: &WriteTransaction, ino: u64) -> R<Inode> {
        if let Some(i) = st.files.get(&ino).and_then(|f| f.inode.clone()) {
            return Ok(i);
        }
        let t = tx.open_table(INODES).map_err(db_err)?;
        let v = t.get(ino).map_err(db_err)?.ok_or(err(libc::ENOENT))?;
        Inode::decode(ino, v.value())
    }

    pub(super) fn put_inode(&self, st: &mut State, tx: &WriteTransaction, inode: &Inode) -> R<()> {
        tx.open_table(INODES)
            .map_err(db_err)?
            .insert(inode.ino, inode.encode().as_slice())
            .map_err(db_err)?;
        if let Some(f) = st.files.get_mut(&inode.ino) {
            if f.inode.is_some() {
                f.inode = Some(inode.clone());
            }
        }
        Ok(())
    }

    pub(super) fn commit_now(&self, st: &mut State, durable: bool) -> R<()> {
        let tx = self.begin_tx(&mut *st)?;
        self.commit(st, tx, durable)
    }
}
