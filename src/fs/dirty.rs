//! Dirty file data in memory: writes, truncate, fallocate and lseek.

use super::*;

pub(super) struct DirtyUnit {
    /// The whole unit, page-aligned: written below as it is (no copy).
    pub(super) data: Buf,
    /// Space preallocated by fallocate: stored whole and uncompressed, even
    /// if all zeros or past the end of the file.
    pub(super) preallocated: bool,
}

impl DirtyUnit {
    /// The unit's bytes to change. Normally the buffer is ours alone; if a
    /// finished write's request still holds it for a moment (a failed flush
    /// put the unit back), change a copy rather than what it may still read.
    pub(super) fn bytes_mut(&mut self) -> &mut [u8] {
        if !self.data.is_unique() {
            self.data = Buf::copy_from(self.data.as_slice());
        }
        self.data.as_mut_slice()
    }
}

impl Fs {
    /// The unit's current contents, for a partial overwrite. Bytes past the
    /// file's size read as zeros, whatever the stored unit still holds there
    /// (a truncate committed before a crash shortened the file, not the unit).
    pub(super) fn unit_for_write(&self, state: &mut State, ino: u64, u: u64) -> ErrnoResult<()> {
        if state
            .files
            .get(&ino)
            .is_some_and(|f| f.units.contains_key(&u))
        {
            return Ok(());
        }
        let flying = state
            .in_flight
            .get(&ino)
            .and_then(|f| f.units.get(&u))
            .cloned();
        let old = match flying {
            // A flush is writing the unit: its bytes are the newest.
            Some(flying) => Some(flying),
            None => match self.extent(ino, u)? {
                Some(x) => self.read_units(ino, &[(u, x)])?.pop(),
                None => None,
            },
        };
        self.put_unit_for_write(state, ino, u, old)
    }

    /// Make unit `u` a dirty unit holding `old` (its newest stored or
    /// flying bytes, clipped to the file's size), or zeros.
    pub(super) fn put_unit_for_write(
        &self,
        state: &mut State,
        ino: u64,
        u: u64,
        old: Option<Buf>,
    ) -> ErrnoResult<()> {
        let mut data = Buf::zeroed(UNIT as usize);
        if let Some(old) = old {
            let size = self.load_inode(state, ino)?.size;
            let valid = size.saturating_sub(u * UNIT).min(UNIT) as usize;
            let old = &old.as_slice()[..old.len().min(valid)];
            copy_clipped(data.as_mut_slice(), old, 0);
        }
        state.files.entry(ino).or_default().units.insert(
            u,
            DirtyUnit {
                data,
                preallocated: false,
            },
        );
        state.dirty_bytes += UNIT;
        Ok(())
    }

    /// Zero bytes `from..to` of unit `u` of a file, in its dirty copy.
    fn zero_in_unit(
        &self,
        state: &mut State,
        ino: u64,
        u: u64,
        from: usize,
        to: usize,
    ) -> ErrnoResult<()> {
        self.unit_for_write(state, ino, u)?;
        let f = state
            .files
            .get_mut(&ino)
            .expect("unit_for_write made the file state");
        let d = f.units.get_mut(&u).expect("unit_for_write made the unit");
        d.bytes_mut()[from..to].fill(0);
        Ok(())
    }

    pub(super) fn file_inode(&self, state: &mut State, ino: u64) -> ErrnoResult<Inode> {
        let inode = self.load_inode(state, ino)?;
        state.files.entry(ino).or_default().inode = Some(inode.clone());
        Ok(inode)
    }

    /// Whether `new_units` more dirty units surely fit: every dirty unit
    /// may need a whole unit in one piece when it is written (compression
    /// only frees space after it). Counting free bytes instead would accept
    /// data that fragmented space cannot hold.
    pub(super) fn surely_fits(&self, state: &State, new_units: u64) -> bool {
        let pieces = state.alloc.free_pieces().saturating_mul(UNIT);
        pieces >= state.dirty_bytes + new_units * UNIT
    }

    /// After a flush: whether the new units of a write to `off..end` can be
    /// placed exactly (a unit that ends the file needs only its blocks),
    /// next to the dirty units that are still in memory.
    pub(super) fn fits_exactly(
        &self,
        state: &State,
        ino: u64,
        off: u64,
        end: u64,
    ) -> ErrnoResult<bool> {
        let size = self.load_inode(state, ino)?.size.max(end);
        let dirty = state.files.get(&ino);
        let mut sizes = vec![UNIT; (state.dirty_bytes / UNIT) as usize];
        for u in off / UNIT..=(end - 1) / UNIT {
            if dirty.is_some_and(|f| f.units.contains_key(&u)) {
                continue;
            }
            let len = size.saturating_sub(u * UNIT).min(UNIT);
            sizes.push(len.div_ceil(BLOCK) * BLOCK);
        }
        Ok(state.alloc.fits(&sizes))
    }

    pub fn write(&self, ino: u64, off: u64, data: &[u8]) -> ErrnoResult<u32> {
        self.write_by(ino, off, data, None)
    }

    /// A write that drops set-id bits as a data change by `kill` does
    /// (`setid_loss`): the kernel asks for it with FUSE_WRITE_KILL_SUIDGID.
    /// The bits go with the write's other inode changes, in memory.
    pub fn write_by(
        &self,
        ino: u64,
        off: u64,
        data: &[u8],
        kill: Option<&dyn Privs>,
    ) -> ErrnoResult<u32> {
        if self.read_only {
            return Err(Errno::EROFS);
        }
        self.writable()?;
        let end = off
            .checked_add(data.len() as u64)
            .filter(|e| *e <= i64::MAX as u64)
            .ok_or(errno(libc::EFBIG))?;
        if data.is_empty() {
            return Ok(0);
        }
        let mut state = self.state.lock();
        self.prefetch_partial(&mut state, ino, off, end)?;
        let (first, last) = (off / UNIT, (end - 1) / UNIT);
        let dirty = state.files.get(&ino);
        let new_units = (first..=last)
            .filter(|u| !dirty.is_some_and(|f| f.units.contains_key(u)))
            .count() as u64;
        if !self.surely_fits(&state, new_units) {
            // Frees wait for a durable commit; make one before giving up.
            // (Before the inode is taken: the flush commits the file's own.)
            self.flush_all(&mut state, true)?;
            self.drain_deferred(&mut state);
            if !self.surely_fits(&state, new_units) && !self.fits_exactly(&state, ino, off, end)? {
                return Err(errno(libc::ENOSPC));
            }
        }
        let mut inode = self.file_inode(&mut state, ino)?;
        if let Some(who) = kill {
            inode.perm &= !setid_loss(&inode, SetidChange::Data, who);
        }
        for u in first..=last {
            let ustart = u * UNIT;
            let from = off.max(ustart);
            let to = end.min(ustart + UNIT);
            let whole = from == ustart && to == ustart + UNIT;
            let beyond = ustart >= inode.size;
            let bytes = &data[(from - off) as usize..(to - off) as usize];
            if whole || beyond {
                let f = state.files.get_mut(&ino).expect("file state");
                if !f.units.contains_key(&u) {
                    // A whole unit is copied in at once, not zeroed first.
                    let data = if whole {
                        Buf::copy_from(bytes)
                    } else {
                        Buf::zeroed(UNIT as usize)
                    };
                    f.units.insert(
                        u,
                        DirtyUnit {
                            data,
                            preallocated: false,
                        },
                    );
                    state.dirty_bytes += UNIT;
                    if whole {
                        continue;
                    }
                }
            } else {
                self.unit_for_write(&mut state, ino, u)?;
            }
            let f = state.files.get_mut(&ino).expect("file state");
            let d = f.units.get_mut(&u).expect("unit");
            d.bytes_mut()[(from - ustart) as usize..(to - ustart) as usize].copy_from_slice(bytes);
            stackfs_layers::buf::count_copy((to - from) as usize);
        }
        let now = Ts::now();
        inode.size = inode.size.max(end);
        inode.mtime = now;
        inode.ctime = now;
        state.files.get_mut(&ino).expect("file state").inode = Some(inode);
        if state.dirty_bytes > DIRTY_LIMIT / 2 {
            self.kick_writeback();
        }
        if state.dirty_bytes > DIRTY_LIMIT {
            self.flush_all(&mut state, false)?;
        }
        Ok(data.len() as u32)
    }

    pub(super) fn truncate(&self, state: &mut Guard, ino: u64, size: u64) -> ErrnoResult<()> {
        // The units a flush is writing must be committed before they change.
        self.wait_for_flush(state);
        let mut inode = self.file_inode(state, ino)?;
        if inode.kind != Kind::File {
            return Err(errno(if inode.kind == Kind::Dir {
                libc::EISDIR
            } else {
                libc::EINVAL
            }));
        }
        if size > i64::MAX as u64 {
            return Err(errno(libc::EFBIG));
        }
        if size < inode.size {
            // Zero the tail of the last kept unit; drop every unit after it.
            let keep = size.div_ceil(UNIT);
            if size % UNIT != 0 {
                self.zero_in_unit(
                    state,
                    ino,
                    size / UNIT,
                    (size % UNIT) as usize,
                    UNIT as usize,
                )?;
            }
            let f = state.files.get_mut(&ino).expect("file");
            let gone: Vec<u64> = f.units.range(keep..).map(|(u, _)| *u).collect();
            for u in &gone {
                f.units.remove(u);
            }
            state.dirty_bytes -= (gone.len() as u64 * UNIT).min(state.dirty_bytes);
            let tx = self.begin_tx(&mut *state)?;
            let freed = self.drop_extents(state, &tx, ino, keep)?;
            inode.stored -= freed.min(inode.stored);
            inode.size = size;
            self.put_inode(state, &tx, &inode)?;
            state.files.get_mut(&ino).expect("file").inode = Some(inode);
            self.commit(state, tx, false)?;
        } else {
            // The unit holding the old end: what it stores past the end must
            // read as zeros once the file is longer.
            let tail = inode.size / UNIT;
            if inode.size % UNIT != 0 && size > inode.size && self.extent(ino, tail)?.is_some() {
                self.unit_for_write(state, ino, tail)?;
            }
            inode.size = size;
            state.files.get_mut(&ino).expect("file").inode = Some(inode);
        }
        Ok(())
    }

    /// Zero `[off, off+len)`: whole units become holes, partial ones are rewritten.
    pub(super) fn zero_range(
        &self,
        state: &mut Guard,
        ino: u64,
        off: u64,
        len: u64,
    ) -> ErrnoResult<()> {
        let inode = self.file_inode(state, ino)?;
        let end = off + len;
        if len == 0 {
            return Ok(());
        }
        let (first, last) = (off / UNIT, (end - 1) / UNIT);
        // The units zeroed in part (at most the first and the last), read
        // before the transaction begins (a read takes the metadata as it is).
        let span = |u: u64| (off.max(u * UNIT), end.min((u + 1) * UNIT));
        let whole = |u: u64| span(u) == (u * UNIT, (u + 1) * UNIT);
        let mut partial = vec![first, last];
        partial.dedup();
        for u in partial.into_iter().filter(|u| !whole(*u)) {
            if u * UNIT < inode.size {
                let (from, to) = span(u);
                let (from, to) = ((from - u * UNIT) as usize, (to - u * UNIT) as usize);
                self.zero_in_unit(state, ino, u, from, to)?;
            }
        }
        let tx = self.begin_tx(&mut *state)?;
        let mut stored = inode.stored;
        for u in (first..=last).filter(|u| whole(*u)) {
            let units = &mut state.files.get_mut(&ino).expect("file").units;
            if units.remove(&u).is_some() {
                state.dirty_bytes -= UNIT.min(state.dirty_bytes);
            }
            let old = tx
                .write(EXTENTS)?
                .remove((ino, u))
                .map_err(db_err)?
                .map(|v| Extent::decode(v.value()));
            if let Some(Ok(x)) = old {
                state.pending_free.push((x.phys, x.reserved_len as u64));
                stored -= (x.reserved_len as u64).min(stored);
            }
            self.reads.uncache(ino, u);
        }
        let f = state.files.get_mut(&ino).expect("file");
        let mut i = f.inode.clone().expect("file inode");
        i.stored = stored;
        self.put_inode(state, &tx, &i)?;
        state.files.get_mut(&ino).expect("file").inode = Some(i);
        self.commit(state, tx, false)
    }

    pub fn fallocate(&self, ino: u64, off: u64, len: u64, mode: i32) -> ErrnoResult<()> {
        let keep = mode & libc::FALLOC_FL_KEEP_SIZE != 0;
        let punch = mode & libc::FALLOC_FL_PUNCH_HOLE != 0;
        let zero = mode & libc::FALLOC_FL_ZERO_RANGE != 0;
        if mode
            & !(libc::FALLOC_FL_KEEP_SIZE | libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_ZERO_RANGE)
            != 0
        {
            return Err(errno(libc::EOPNOTSUPP));
        }
        if punch && (!keep || zero) {
            return Err(errno(libc::EINVAL));
        }
        let end = off
            .checked_add(len)
            .filter(|e| *e <= i64::MAX as u64)
            .ok_or(errno(libc::EFBIG))?;
        if len == 0 {
            return Err(errno(libc::EINVAL));
        }
        let mut state = self.state.lock();
        self.wait_for_flush(&mut state);
        let inode = self.file_inode(&mut state, ino)?;
        if inode.kind != Kind::File {
            return Err(errno(libc::ENODEV));
        }
        if punch || zero {
            let zend = if punch { end.min(inode.size) } else { end };
            if zend > off {
                self.zero_range(&mut state, ino, off, zend - off)?;
            }
        } else {
            // Copy-on-write cannot reserve blocks for later overwrites; it
            // stores every unit of the range at full size now (zeros in the
            // holes), so the space is claimed and counted.
            let (first, last) = (off / UNIT, (end - 1) / UNIT);
            let stored: HashMap<u64, Extent> =
                self.extents(ino, first, last)?.into_iter().collect();
            let short: Vec<u64> = (first..=last)
                .filter(|u| {
                    !state.files[&ino].units.contains_key(u)
                        && stored.get(u).is_none_or(|x| (x.reserved_len as u64) < UNIT)
                })
                .collect();
            // Preallocated units are stored whole: only whole pieces count.
            if !self.surely_fits(&state, short.len() as u64) {
                self.flush_all(&mut state, true)?;
                self.drain_deferred(&mut state);
                if !self.surely_fits(&state, short.len() as u64) {
                    return Err(errno(libc::ENOSPC));
                }
                // The flush committed the file's inode: take it up again.
                self.file_inode(&mut state, ino)?;
            }
            for u in short {
                self.unit_for_write(&mut state, ino, u)?;
            }
            let f = state.files.get_mut(&ino).expect("file");
            for (_, d) in f.units.range_mut(first..=last) {
                d.preallocated = true;
            }
        }
        if !keep && end > inode.size {
            let mut i = self.file_inode(&mut state, ino)?;
            i.size = end;
            i.ctime = Ts::now();
            state.files.get_mut(&ino).expect("file").inode = Some(i);
        }
        Ok(())
    }

    /// SEEK_DATA / SEEK_HOLE at 4 KiB granularity: a block is data when it
    /// holds a non-zero byte (blocks of zeros read the same as holes).
    pub fn lseek(&self, ino: u64, off: u64, whence: i32) -> ErrnoResult<u64> {
        let state = self.state.lock();
        let inode = self.load_inode(&state, ino)?;
        if off >= inode.size {
            return Err(errno(libc::ENXIO));
        }
        let (first, last) = (off / UNIT, (inode.size - 1) / UNIT);
        let mut maps: BTreeMap<u64, u16> = self
            .extents(ino, first, last)?
            .into_iter()
            .map(|(u, x)| (u, x.map))
            .collect();
        let flying = state.in_flight.get(&ino).into_iter();
        for (u, data) in flying.flat_map(|f| f.units.range(first..=last)) {
            maps.insert(*u, block_map(data.as_slice()));
        }
        if let Some(f) = state.files.get(&ino) {
            for (u, d) in f.units.range(first..=last) {
                maps.insert(*u, block_map(d.data.as_slice()));
            }
        }
        let per_unit = UNIT / BLOCK;
        let end_block = inode.size.div_ceil(BLOCK);
        let start_block = off / BLOCK;
        let found = |b: u64| Ok(off.max(b * BLOCK));
        match whence {
            libc::SEEK_DATA => {
                for (u, m) in &maps {
                    for i in 0..per_unit {
                        let b = u * per_unit + i;
                        if b >= end_block {
                            break;
                        }
                        if b >= start_block && m & (1 << i) != 0 {
                            return found(b);
                        }
                    }
                }
                Err(errno(libc::ENXIO))
            }
            libc::SEEK_HOLE => {
                let mut b = start_block;
                while b < end_block {
                    let (u, i) = (b / per_unit, b % per_unit);
                    match maps.get(&u) {
                        Some(&m) if m & (1 << i) != 0 => b += 1,
                        _ => return found(b),
                    }
                }
                Ok(inode.size)
            }
            _ => Err(errno(libc::EINVAL)),
        }
    }
}
