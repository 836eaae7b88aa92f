//! The metadata store's storage: a redb `StorageBackend` kept in the pool's
//! metadata region and written through the layer stack.
//!
//! redb assumes that a write changes no byte outside its range and that a
//! small write is atomic. We give it more: every 4 KiB sector is written
//! atomically. Each sector owns a pair of 8 KiB slots; a write goes to the slot
//! that does not hold the last durable version, stamped with a sequence
//! number, the sector number, the pool UUID and a CRC32C. A read takes the
//! valid slot with the higher sequence. A torn or lost write therefore leaves
//! the previous version readable, whatever the layers below do with a
//! partially written slot (and once slots are encrypted, a torn slot fails its
//! MAC the same way it fails its CRC here).
//!
//! Writes are buffered until `sync_data` (or until the buffer is large), then
//! sent down as one batch followed by one flush.

use parking_lot::Mutex;
use stackfs_layers::{Buf, Errno, Io, Layer, Op, Waiter};
use std::collections::{BTreeMap, HashMap};
use std::io;
use std::sync::Arc;

pub const SECTOR: usize = 4096;
const SLOT: u64 = 8192;
const PAIR: u64 = 2 * SLOT;
/// Pseudo sector that records the store's length.
const LEN_SECTOR: u64 = u64::MAX;
/// Write buffered sectors out (without a flush) beyond this many.
const MAX_DIRTY: usize = 8192;

#[derive(Clone, Copy, Default)]
struct SlotState {
    /// Slot holding the version that is durable (or read at open), if any.
    durable: Option<u8>,
    /// Highest sequence number seen or written for this sector.
    seq: u64,
}

struct State {
    len: u64,
    /// Highest length ever reached: sectors below it may hold old bytes.
    high: u64,
    len_dirty: bool,
    slots: HashMap<u64, SlotState>,
    dirty: BTreeMap<u64, Box<[u8]>>,
    /// Sectors written out since the last flush: their slot becomes durable then.
    unflushed: Vec<(u64, u8)>,
}

pub struct MetaStore {
    top: Arc<dyn Layer>,
    /// Pool space given to the store: [0, region).
    region: u64,
    /// Bytes of one slot write, so that with the layers' overhead it takes 8 KiB.
    slot_len: usize,
    pool_uuid: [u8; 16],
    state: Mutex<State>,
    /// Writes (redb's recovery on open) stay in memory and never reach the pool.
    read_only: bool,
}

impl std::fmt::Debug for MetaStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "MetaStore({} bytes)", self.region)
    }
}

fn eio(what: impl std::fmt::Display) -> io::Error {
    io::Error::other(format!("metadata store: {what}"))
}

impl MetaStore {
    pub fn open(
        top: Arc<dyn Layer>,
        region: u64,
        pool_uuid: [u8; 16],
        read_only: bool,
    ) -> io::Result<MetaStore> {
        let slot_len = SLOT.saturating_sub(top.overhead()) as usize;
        if slot_len < SECTOR + 36 {
            return Err(eio(format!(
                "the layers add {} bytes per request; a slot cannot hold a sector",
                top.overhead()
            )));
        }
        let m = MetaStore {
            top,
            region,
            slot_len,
            pool_uuid,
            state: Mutex::new(State {
                len: 0,
                high: 0,
                len_dirty: false,
                slots: HashMap::new(),
                dirty: BTreeMap::new(),
                unflushed: Vec::new(),
            }),
            read_only,
        };
        let mut st = m.state.lock();
        if let Some(rec) = m.load(&mut st, &[LEN_SECTOR])?.pop().flatten() {
            st.len = u64::from_le_bytes(rec[0..8].try_into().expect("8 bytes"));
            st.high = u64::from_le_bytes(rec[8..16].try_into().expect("8 bytes")).max(st.len);
        }
        if st.len > m.max_len() {
            return Err(eio(format!(
                "recorded length {} exceeds the region",
                st.len
            )));
        }
        drop(st);
        Ok(m)
    }

    fn max_len(&self) -> u64 {
        (self.region / PAIR).saturating_sub(1) * SECTOR as u64
    }

    fn pair_addr(sector: u64) -> u64 {
        if sector == LEN_SECTOR {
            0
        } else {
            (sector + 1) * PAIR
        }
    }

    fn seal(&self, sector: u64, seq: u64, payload: &[u8]) -> Buf {
        let mut b = Buf::zeroed(self.slot_len);
        let s = b.as_mut_slice();
        s[..SECTOR].copy_from_slice(payload);
        s[SECTOR..SECTOR + 8].copy_from_slice(&seq.to_le_bytes());
        s[SECTOR + 8..SECTOR + 16].copy_from_slice(&sector.to_le_bytes());
        s[SECTOR + 16..SECTOR + 32].copy_from_slice(&self.pool_uuid);
        let crc = crc32c::crc32c(&s[..SECTOR + 32]);
        s[SECTOR + 32..SECTOR + 36].copy_from_slice(&crc.to_le_bytes());
        b
    }

    /// Parse one slot: Some((seq, payload)) when valid and ours; None when
    /// empty or left by another pool; Err when damaged.
    fn unseal<'a>(&self, sector: u64, raw: &'a [u8]) -> Result<Option<(u64, &'a [u8])>, ()> {
        let crc = u32::from_le_bytes(raw[SECTOR + 32..SECTOR + 36].try_into().expect("4 bytes"));
        if crc32c::crc32c(&raw[..SECTOR + 32]) != crc {
            return if raw.iter().all(|b| *b == 0) {
                Ok(None)
            } else {
                Err(())
            };
        }
        let seq = u64::from_le_bytes(raw[SECTOR..SECTOR + 8].try_into().expect("8 bytes"));
        let which = u64::from_le_bytes(raw[SECTOR + 8..SECTOR + 16].try_into().expect("8 bytes"));
        if raw[SECTOR + 16..SECTOR + 32] != self.pool_uuid || which != sector {
            return Ok(None);
        }
        Ok(Some((seq, &raw[..SECTOR])))
    }

    /// Read the slot pairs of `sectors` in one batch; learn which slot is
    /// current. None: never written (reads as zeros).
    fn load(&self, st: &mut State, sectors: &[u64]) -> io::Result<Vec<Option<Box<[u8]>>>> {
        let mut ios = Vec::with_capacity(sectors.len());
        let mut waits = Vec::with_capacity(sectors.len());
        // Each slot is its own request: below crypt, each is sealed separately.
        for &s in sectors {
            for k in 0..2 {
                let w = Waiter::new();
                let addr = Self::pair_addr(s) + k * SLOT;
                ios.push(Io::new(
                    Op::Read,
                    addr,
                    Buf::zeroed(self.slot_len),
                    Some(w.end_io()),
                ));
                waits.push(w);
            }
        }
        let bufs: Vec<Buf> = ios.iter().map(|io| io.buf().clone()).collect();
        self.top.submit_batch(ios);
        // A slot that fails to read back (a torn write below crypt fails its
        // tag with EIO) counts as damaged, like a CRC mismatch.
        let read_slot = |i: usize, s: u64| -> io::Result<Result<Option<(u64, Vec<u8>)>, ()>> {
            match waits[i].wait() {
                Ok(_) => Ok(self
                    .unseal(s, bufs[i].as_slice())
                    .map(|o| o.map(|(q, p)| (q, p.to_vec())))),
                Err(Errno::EIO) => Ok(Err(())),
                Err(e) => Err(eio(format!("reading sector {s}: {e}"))),
            }
        };
        let mut out = Vec::with_capacity(sectors.len());
        for (n, &s) in sectors.iter().enumerate() {
            let a = read_slot(2 * n, s)?;
            let c = read_slot(2 * n + 1, s)?;
            let best = match (a, c) {
                (Err(()), Err(())) => return Err(eio(format!("sector {s}: both copies damaged"))),
                (x, y) => {
                    let x = x.ok().flatten().map(|(q, p)| (q, 0u8, p));
                    let y = y.ok().flatten().map(|(q, p)| (q, 1u8, p));
                    match (x, y) {
                        (Some(x), Some(y)) => Some(if y.0 > x.0 { y } else { x }),
                        (x, y) => x.or(y),
                    }
                }
            };
            match best {
                Some((seq, slot, payload)) => {
                    // What we already know (a newer write not yet flushed) wins
                    // over what the disk shows.
                    st.slots.entry(s).or_insert(SlotState {
                        durable: Some(slot),
                        seq,
                    });
                    out.push(Some(payload.into_boxed_slice()));
                }
                None => {
                    st.slots.entry(s).or_default();
                    out.push(None)
                }
            }
        }
        Ok(out)
    }

    /// The current bytes of sectors (buffered or on disk), loading in one batch.
    fn sectors(&self, st: &mut State, first: u64, count: u64) -> io::Result<Vec<Box<[u8]>>> {
        let wanted: Vec<u64> = (first..first + count)
            .filter(|s| !st.dirty.contains_key(s))
            .collect();
        let mut loaded = self.load(st, &wanted)?.into_iter();
        let mut out = Vec::with_capacity(count as usize);
        for s in first..first + count {
            match st.dirty.get(&s) {
                Some(d) => out.push(d.clone()),
                None => out.push(
                    loaded
                        .next()
                        .flatten()
                        .unwrap_or_else(|| vec![0u8; SECTOR].into_boxed_slice()),
                ),
            }
        }
        Ok(out)
    }

    /// Send buffered sectors down; with `durable`, flush and make them current.
    fn write_out(&self, st: &mut State, durable: bool) -> io::Result<()> {
        if st.len_dirty {
            let mut rec = vec![0u8; SECTOR];
            rec[0..8].copy_from_slice(&st.len.to_le_bytes());
            rec[8..16].copy_from_slice(&st.high.to_le_bytes());
            st.dirty.insert(LEN_SECTOR, rec.into_boxed_slice());
            st.len_dirty = false;
        }
        let dirty = std::mem::take(&mut st.dirty);
        // Sectors never read need their slot state first.
        let unknown: Vec<u64> = dirty
            .keys()
            .copied()
            .filter(|s| !st.slots.contains_key(s))
            .collect();
        if !unknown.is_empty() {
            self.load(st, &unknown)?;
        }
        let mut ios = Vec::with_capacity(dirty.len());
        let mut waits = Vec::with_capacity(dirty.len());
        for (&s, data) in &dirty {
            let slot = st.slots.entry(s).or_default();
            let target = match slot.durable {
                Some(d) => 1 - d,
                None => 0,
            };
            slot.seq += 1;
            let w = Waiter::new();
            let addr = Self::pair_addr(s) + target as u64 * SLOT;
            ios.push(Io::new(
                Op::Write,
                addr,
                self.seal(s, slot.seq, data),
                Some(w.end_io()),
            ));
            waits.push(w);
            st.unflushed.push((s, target));
        }
        self.top.submit_batch(ios);
        let mut first_err = None;
        for w in waits {
            if let Err(e) = w.wait() {
                first_err.get_or_insert(e);
            }
        }
        if let Some(e) = first_err {
            // Keep the data buffered so nothing is lost; the caller sees the error.
            st.dirty = dirty;
            return Err(eio(format!("write failed: {e}")));
        }
        if durable {
            self.flush_below()?;
            for (s, target) in std::mem::take(&mut st.unflushed) {
                if let Some(slot) = st.slots.get_mut(&s) {
                    slot.durable = Some(target);
                }
            }
        }
        Ok(())
    }

    fn flush_below(&self) -> io::Result<()> {
        stackfs_layers::submit_wait(&*self.top, Op::Flush, 0, Buf::zeroed(0))
            .map(|_| ())
            .map_err(|e: Errno| eio(format!("flush failed: {e}")))
    }
}

impl redb::StorageBackend for MetaStore {
    fn len(&self) -> Result<u64, io::Error> {
        Ok(self.state.lock().len)
    }

    fn read(&self, offset: u64, out: &mut [u8]) -> Result<(), io::Error> {
        let mut st = self.state.lock();
        let end = offset
            .checked_add(out.len() as u64)
            .filter(|e| *e <= st.len)
            .ok_or_else(|| eio("read past the end"))?;
        if out.is_empty() {
            return Ok(());
        }
        let first = offset / SECTOR as u64;
        let last = (end - 1) / SECTOR as u64;
        let secs = self.sectors(&mut st, first, last - first + 1)?;
        let mut done = 0usize;
        for (i, sec) in secs.iter().enumerate() {
            let base = (first + i as u64) * SECTOR as u64;
            let from = (offset + done as u64 - base) as usize;
            let n = (SECTOR - from).min(out.len() - done);
            out[done..done + n].copy_from_slice(&sec[from..from + n]);
            done += n;
        }
        Ok(())
    }

    fn set_len(&self, len: u64) -> Result<(), io::Error> {
        let mut st = self.state.lock();
        if len > self.max_len() {
            return Err(io::Error::new(
                io::ErrorKind::StorageFull,
                format!("metadata region full ({} bytes)", self.max_len()),
            ));
        }
        if len > st.len {
            // New positions must read as zeros, also where an old, longer store left bytes.
            let from = st.len.div_ceil(SECTOR as u64);
            let to = len.min(st.high).div_ceil(SECTOR as u64);
            if st.len % SECTOR as u64 != 0 {
                let s = st.len / SECTOR as u64;
                let cut = (st.len % SECTOR as u64) as usize;
                let mut sec = self.sectors(&mut st, s, 1)?.pop().expect("one sector");
                sec[cut..].fill(0);
                st.dirty.insert(s, sec);
            }
            for s in from..to {
                st.dirty.insert(s, vec![0u8; SECTOR].into_boxed_slice());
            }
        }
        st.len = len;
        st.high = st.high.max(len);
        st.len_dirty = true;
        Ok(())
    }

    fn sync_data(&self) -> Result<(), io::Error> {
        if self.read_only {
            return Ok(());
        }
        let mut st = self.state.lock();
        self.write_out(&mut st, true)
    }

    fn write(&self, offset: u64, data: &[u8]) -> Result<(), io::Error> {
        let mut st = self.state.lock();
        let end = offset
            .checked_add(data.len() as u64)
            .filter(|e| *e <= st.len)
            .ok_or_else(|| eio("write past the end"))?;
        if data.is_empty() {
            return Ok(());
        }
        let first = offset / SECTOR as u64;
        let last = (end - 1) / SECTOR as u64;
        // Only partially covered sectors need their old bytes.
        let mut done = 0usize;
        for s in first..=last {
            let base = s * SECTOR as u64;
            let from = (offset + done as u64 - base) as usize;
            let n = (SECTOR - from).min(data.len() - done);
            let mut sec = if n == SECTOR {
                vec![0u8; SECTOR].into_boxed_slice()
            } else {
                self.sectors(&mut st, s, 1)?.pop().expect("one sector")
            };
            sec[from..from + n].copy_from_slice(&data[done..done + n]);
            st.dirty.insert(s, sec);
            done += n;
        }
        if st.dirty.len() > MAX_DIRTY && !self.read_only {
            self.write_out(&mut st, false)?;
        }
        Ok(())
    }
}
