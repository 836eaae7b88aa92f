//! The read side: committed extents, the unit cache, reads that complete in
//! the device threads, and unit verification.

use super::*;

/// The part of the read path that completions reach from the device threads,
/// without the filesystem lock.
pub(super) struct ReadSide {
    /// Decoded units as read from the pool (their stored length; bytes past
    /// it read as zeros).
    pub(super) cache: Mutex<LruCache<(u64, u64), Buf>>,
    /// Bumped (under the cache lock) whenever a unit leaves the cache because
    /// its data changed: a read that started before must not put its older
    /// copy back.
    pub(super) cache_gen: std::sync::atomic::AtomicU64,
    /// Reads in flight by free-generation ticket (how many hold each).
    pub(super) readers: Mutex<BTreeMap<u64, usize>>,
}

impl ReadSide {
    pub(super) fn uncache(&self, ino: u64, unit: u64) {
        let mut c = self.cache.lock();
        self.cache_gen
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        c.pop(&(ino, unit));
    }

    pub(super) fn generation(&self) -> u64 {
        let _c = self.cache.lock();
        self.cache_gen.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Cache a unit read from the pool, unless its data changed since `gen`.
    pub(super) fn put(&self, key: (u64, u64), data: Buf, gen: u64) {
        let mut c = self.cache.lock();
        if self.cache_gen.load(std::sync::atomic::Ordering::Relaxed) == gen {
            c.put(key, data);
        }
    }

    pub(super) fn enter(&self, ticket: u64) {
        *self.readers.lock().entry(ticket).or_default() += 1;
    }

    pub(super) fn leave(&self, ticket: u64) {
        let mut r = self.readers.lock();
        if let Some(n) = r.get_mut(&ticket) {
            *n -= 1;
            if *n == 0 {
                r.remove(&ticket);
            }
        }
    }

    /// The lowest ticket of a read in flight.
    pub(super) fn oldest(&self) -> Option<u64> {
        self.readers.lock().keys().next().copied()
    }
}

impl Fs {
    pub(super) fn extent(&self, ino: u64, unit: u64) -> ErrnoResult<Option<Extent>> {
        Ok(self.extents(ino, unit, unit)?.pop().map(|(_, x)| x))
    }

    /// The committed extents of units `first..=last`, with one range lookup.
    pub(super) fn extents(
        &self,
        ino: u64,
        first: u64,
        last: u64,
    ) -> ErrnoResult<Vec<(u64, Extent)>> {
        read_table!(self, EXTENTS, |t| {
            let mut out = Vec::new();
            for row in t.range((ino, first)..=(ino, last)).map_err(db_err)? {
                let (k, v) = row.map_err(db_err)?;
                out.push((k.value().1, Extent::decode(v.value())?));
            }
            Ok(out)
        })
    }

    /// Read committed units from the pool in one batch and wait; verify each.
    /// For callers holding the filesystem lock (partial overwrites, fsck).
    pub(crate) fn read_units(&self, ino: u64, units: &[(u64, Extent)]) -> ErrnoResult<Vec<Buf>> {
        self.read_units_since(ino, units, self.reads.generation())
    }

    /// `read_units`, caching what it reads only if no unit left the cache
    /// since generation `gen` (taken when the extents were looked up).
    fn read_units_since(
        &self,
        ino: u64,
        units: &[(u64, Extent)],
        gen: u64,
    ) -> ErrnoResult<Vec<Buf>> {
        let mut out = vec![None; units.len()];
        let mut ios = Vec::new();
        let mut waits = Vec::new();
        {
            let mut cache = self.reads.cache.lock();
            for (i, (u, x)) in units.iter().enumerate() {
                if let Some(d) = cache.get(&(ino, *u)) {
                    out[i] = Some(d.clone());
                    continue;
                }
                let (io, w) = unit_read(x, x.tag());
                waits.push((i, w, io.buf().clone()));
                ios.push(io);
            }
        }
        self.data.submit_batch(ios);
        let mut first_err = None;
        for (i, w, b) in waits {
            let (u, x) = units[i];
            let (r, served) = w.wait_tag();
            match self.verified_or_retried(ino, u, &x, r, served, b) {
                Ok(d) => {
                    self.reads.put((ino, u), d.clone(), gen);
                    out[i] = Some(d);
                }
                Err(e) => {
                    first_err.get_or_insert(e);
                }
            }
        }
        if let Some(e) = first_err {
            return Err(e);
        }
        Ok(out.into_iter().map(|o| o.expect("filled")).collect())
    }

    /// Before a write changes units `first` and `last` in part: read those
    /// that are only on the pool with the filesystem lock released
    /// (metadata operations and other writes go on meanwhile), and make
    /// them the write's dirty units. If any unit left the cache meanwhile
    /// (its cache generation moved: a commit or truncate changed some
    /// extent), the read only fills the cache, and the write looks its
    /// units up again under the lock.
    pub(super) fn prefetch_partial(
        &self,
        state: &mut Guard,
        ino: u64,
        off: u64,
        end: u64,
    ) -> ErrnoResult<()> {
        let (first, last) = (off / UNIT, (end - 1) / UNIT);
        let size = self.load_inode(state, ino)?.size;
        let mut wanted = Vec::new();
        for u in [first, last] {
            let whole = off <= u * UNIT && end >= (u + 1) * UNIT;
            if u * UNIT >= size {
                continue; // past the end: the write starts from zeros
            }
            if whole || Self::unit_in_memory(state, ino, u) || wanted.iter().any(|(w, _)| *w == u) {
                continue;
            }
            if let Some(x) = self.extent(ino, u)? {
                wanted.push((u, x));
            }
        }
        if wanted.is_empty() {
            return Ok(());
        }
        let gen = self.reads.generation();
        // The space read is not given out again until the read is done.
        let ticket = state.free_gen;
        self.reads.enter(ticket);
        let read = Guard::unlocked(state, || self.read_units_since(ino, &wanted, gen));
        self.reads.leave(ticket);
        let read = read?;
        if self.reads.generation() != gen {
            return Ok(());
        }
        for ((u, _), old) in wanted.into_iter().zip(read) {
            if !Self::unit_in_memory(state, ino, u) {
                self.put_unit_for_write(state, ino, u, Some(old))?;
            }
        }
        Ok(())
    }

    /// Whether unit `u` of a file is dirty or being flushed.
    fn unit_in_memory(state: &State, ino: u64, u: u64) -> bool {
        state
            .files
            .get(&ino)
            .is_some_and(|f| f.units.contains_key(&u))
            || state
                .in_flight
                .get(&ino)
                .is_some_and(|f| f.units.contains_key(&u))
    }

    /// Verify a unit read from the pool; when it is bad and came from
    /// mirror copies, read it again from the others (the mirror rewrites the
    /// bad copy from the good one) until it verifies or no copy is left.
    fn verified_or_retried(
        &self,
        ino: u64,
        u: u64,
        x: &Extent,
        mut r: IoResult,
        mut served: ExtentTag,
        mut b: Buf,
    ) -> ErrnoResult<Buf> {
        loop {
            match verify_unit(ino, u, x, r, &b) {
                Ok(d) => return Ok(d),
                Err(e) if served.copies == 0 => return Err(e),
                Err(_) => {
                    b = Buf::zeroed(x.written_len as usize);
                    let tag = served.retry_avoiding();
                    (r, served) = stackfs_layers::submit_wait_tag(
                        &*self.data,
                        Op::Read,
                        x.phys,
                        b.clone(),
                        tag,
                    );
                }
            }
        }
    }

    /// Read `size` bytes at `off` and hand the result to `done`. What is dirty
    /// or cached is copied at once under the lock; units that must come from
    /// the pool are read without it, and `done` then runs in the completion
    /// chain of the last of them (the device thread that reaped it), so the
    /// FUSE reply is sent from there and no thread waits for the I/O.
    pub fn read_async(
        &self,
        ino: u64,
        off: u64,
        size: u32,
        done: impl FnOnce(ErrnoResult<Vec<u8>>) + Send + 'static,
    ) {
        let plan = {
            let state = self.state.lock();
            self.plan_read(&state, ino, off, size)
        };
        let (mut out, fetch, ticket, gen) = match plan {
            Err(e) => return done(Err(e)),
            Ok(p) => p,
        };
        if fetch.is_empty() {
            return done(Ok(out));
        }
        let reads = self.reads.clone();
        let shared = Arc::new(Mutex::new(std::mem::take(&mut out)));
        let result = shared.clone();
        let group = Io::new(
            Op::Read,
            0,
            Buf::zeroed(0),
            Some(Box::new(move |_, r| {
                reads.leave(ticket);
                let data = std::mem::take(&mut *result.lock());
                done(r.map(|_| data));
                r
            })),
        );
        let unit_read = Arc::new(UnitRead {
            ino,
            off,
            gen,
            out: shared,
            reads: self.reads.clone(),
            data: self.data.clone(),
        });
        let ios = fetch
            .into_iter()
            .map(|(u, x)| unit_read.child(&group, u, x, x.tag()))
            .collect();
        self.data.submit_batch(ios);
        group.put();
    }
}

/// What the unit reads of one `read_async` share.
struct UnitRead {
    ino: u64,
    off: u64,
    gen: u64,
    out: Arc<Mutex<Vec<u8>>>,
    reads: Arc<ReadSide>,
    data: Arc<dyn Layer>,
}

impl UnitRead {
    /// The read of unit `u` (extent `x`) as a child of `group`: verified in
    /// its completion and copied into the reply. A bad unit that came from
    /// mirror copies is read again from the others, as a new child of the
    /// group (so the group waits for it), and the bad copy is healed below.
    fn child(self: &Arc<Self>, group: &Io, u: u64, x: Extent, tag: ExtentTag) -> Io {
        let (this, parent) = (self.clone(), group.clone());
        let io = group.child(
            Op::Read,
            x.phys,
            Buf::zeroed(x.written_len as usize),
            Some(Box::new(move |io, r| {
                let served = io.tag();
                match verify_unit(this.ino, u, &x, r, io.buf()) {
                    Ok(d) => {
                        this.place(u, &d);
                        this.reads.put((this.ino, u), d, this.gen);
                        Ok(x.written_len as u64)
                    }
                    Err(e) if served.copies == 0 => Err(e),
                    Err(_) => {
                        let retry = this.child(&parent, u, x, served.retry_avoiding());
                        this.data.submit(retry);
                        Ok(0)
                    }
                }
            })),
        );
        io.set_tag(tag);
        io
    }

    /// Copy a verified unit's bytes into the reply.
    fn place(&self, u: u64, d: &Buf) {
        let ustart = u * UNIT;
        let from = self.off.max(ustart);
        let mut out = self.out.lock();
        let to = (self.off + out.len() as u64).min(ustart + UNIT);
        copy_clipped(
            &mut out[(from - self.off) as usize..(to - self.off) as usize],
            d.as_slice(),
            (from - ustart) as usize,
        );
    }
}

impl Fs {
    /// Under the lock: the reply buffer with every dirty or cached byte in
    /// place, the units still to read from the pool, and the read's ticket
    /// (registered: it holds back the reuse of space freed from now on) and
    /// cache generation.
    #[allow(clippy::type_complexity)]
    pub(super) fn plan_read(
        &self,
        state: &State,
        ino: u64,
        off: u64,
        size: u32,
    ) -> ErrnoResult<(Vec<u8>, Vec<(u64, Extent)>, u64, u64)> {
        let inode = self.load_inode(state, ino)?;
        if off >= inode.size || size == 0 {
            return Ok((Vec::new(), Vec::new(), 0, 0));
        }
        let end = (off + size as u64).min(inode.size);
        let mut out = vec![0u8; (end - off) as usize];
        let (first, last) = (off / UNIT, (end - 1) / UNIT);
        let file = state.files.get(&ino);
        let mut fetch = Vec::new();
        let place = |u: u64, src: &[u8], out: &mut [u8]| {
            let ustart = u * UNIT;
            let from = off.max(ustart);
            let to = end.min(ustart + UNIT);
            copy_clipped(
                &mut out[(from - off) as usize..(to - off) as usize],
                src,
                (from - ustart) as usize,
            );
        };
        let committed = self.extents(ino, first, last)?;
        // Units a flush is writing: newer than what is committed.
        let flying = state.in_flight.get(&ino).map(|f| &f.units);
        let mut cache = self.reads.cache.lock();
        for (u, x) in committed {
            if file.is_some_and(|f| f.units.contains_key(&u))
                || flying.is_some_and(|f| f.contains_key(&u))
            {
                continue;
            }
            match cache.get(&(ino, u)) {
                Some(d) => place(u, d.as_slice(), &mut out),
                None => fetch.push((u, x)),
            }
        }
        let gen = self
            .reads
            .cache_gen
            .load(std::sync::atomic::Ordering::Relaxed);
        drop(cache);
        for (u, data) in flying.into_iter().flat_map(|f| f.range(first..=last)) {
            place(*u, data.as_slice(), &mut out);
        }
        if let Some(f) = file {
            for (u, d) in f.units.range(first..=last) {
                place(*u, d.data.as_slice(), &mut out);
            }
        }
        let ticket = state.free_gen;
        if !fetch.is_empty() {
            self.reads.enter(ticket);
        }
        Ok((out, fetch, ticket, gen))
    }

    /// Read and wait (copy_file_range).
    pub fn read(&self, ino: u64, off: u64, size: u32) -> ErrnoResult<Vec<u8>> {
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        self.read_async(ino, off, size, move |r| {
            let _ = tx.send(r);
        });
        rx.recv().unwrap_or(Err(Errno::EIO))
    }
}

/// Copy `src[from..]` into `out`, as far as `src` reaches; the rest of `out`
/// stays as it is (zeros: a unit's bytes past its stored length read as zeros).
pub(super) fn copy_clipped(out: &mut [u8], src: &[u8], from: usize) {
    let n = src.len().saturating_sub(from).min(out.len());
    if n > 0 {
        out[..n].copy_from_slice(&src[from..from + n]);
        stackfs_layers::buf::count_copy(n);
    }
}

/// The read of a committed unit, tagged with `tag`: what the transform
/// layers recorded at write time (`Extent::tag`), and which copies to read.
pub(super) fn unit_read(x: &Extent, tag: ExtentTag) -> (Io, Waiter) {
    let w = Waiter::new();
    let io = Io::new(
        Op::Read,
        x.phys,
        Buf::zeroed(x.written_len as usize),
        Some(w.end_io()),
    );
    io.set_tag(tag);
    (io, w)
}

/// Check a unit read from the pool; its bytes up to `data_len`.
pub(super) fn verify_unit(ino: u64, u: u64, x: &Extent, r: IoResult, b: &Buf) -> ErrnoResult<Buf> {
    if let Err(e) = r {
        // A cancelled sibling of a failed read has nothing new to say.
        if e != Errno::ECANCELED {
            log::error!("inode {ino} offset {}: read failed: {e}", u * UNIT);
        }
        return Err(Errno::EIO);
    }
    if crc32c::crc32c(b.as_slice()) != x.crc {
        log::error!(
            "inode {ino} offset {}: checksum mismatch at pool address {}; data is corrupt",
            u * UNIT,
            x.phys
        );
        return Err(Errno::EIO);
    }
    let n = (x.data_len as usize).min(UNIT as usize).min(b.len());
    Ok(b.slice(0, n))
}
