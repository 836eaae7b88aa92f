//! The metadata store's storage: a redb `StorageBackend` kept in the pool's
//! metadata region and written through the layer stack.
//!
//! redb assumes that a write changes no byte outside its range and that a
//! small write is atomic. We give it more: every 4 KiB sector is written
//! atomically, and a sector never reads back as anything but its current
//! version. Each sector owns a pair of 8 KiB slots; a write goes to the slot
//! that does not hold the last committed version, stamped with a sequence
//! number (store-wide, never reused), the sector number, the pool UUID and a
//! CRC32C. The version of every sector (sequence number and slot) is kept in
//! memory and, on disk, in version table sectors at the end of the region;
//! the root record (pair 0) names the version of every table sector. A read
//! takes the slot the table names and accepts it only if it holds exactly
//! that version: a zeroed slot, an older version written back, a slot moved
//! from another sector all fail with an error naming the sector, never with
//! other bytes.
//!
//! A durable write-out (`sync_data`) is a commit in two phases: the data
//! sectors and the changed table sectors as one batch, a flush; then the root
//! (alternating between its own two slots), a flush. A crash at any point
//! leaves the previous root, whose versions are still in their slots: a
//! torn or lost write is never read. Writes are buffered until `sync_data`
//! (or until the buffer is large).

use parking_lot::Mutex;
use stackfs_layers::{Buf, Errno, Io, Layer, Op, Waiter};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

pub const SECTOR: usize = 4096;
const SLOT: u64 = 8192;
const PAIR: u64 = 2 * SLOT;
/// What a slot stamps after the payload: sequence (8), sector (8), pool
/// UUID (16), CRC32C (4).
const STAMP: usize = 36;
/// The root record's sector number (pair 0).
const ROOT_SECTOR: u64 = u64::MAX;
/// Version table sector `t` is logical sector `TABLE_BASE + t`.
const TABLE_BASE: u64 = u64::MAX / 2;
/// Versions one table sector holds (u64 LE each).
const PER_TABLE: u64 = (SECTOR / 8) as u64;
/// First bytes of a root record in this format; a legacy root starts with
/// the store's length instead.
const ROOT_TAG: [u8; 8] = *b"sfsmeta2";
/// Root record: tag, length, sequence limit, table count, then the versions.
const ROOT_HEADER: usize = 32;
/// Table sectors the root can name: this caps the store at
/// `MAX_TABLES × 512` sectors (1016 MiB).
const MAX_TABLES: usize = (SECTOR - ROOT_HEADER) / 8;
/// Write buffered sectors out (without a flush) beyond this many.
const MAX_DIRTY: usize = 8192;
/// Sequence numbers a root reserves beyond those already used.
const SEQ_BLOCK: u64 = 1 << 20;
/// On upgrading a legacy store, sequences start this far above the highest
/// one seen, clear of anything an older write may have left.
const LEGACY_SEQ_GAP: u64 = 1 << 32;
/// Sequence numbers stay below this (a root claiming more is refused), so
/// that no arithmetic on them can overflow.
const MAX_SEQ: u64 = 1 << 62;
/// Sectors read per batch when reading a whole legacy store.
const LEGACY_BATCH: u64 = 1024;

/// A version of a sector: sequence number and slot (0 = never written,
/// reads as zeros). The same encoding is stored in the tables and the root.
#[derive(Clone, Copy, Default, PartialEq, Eq, Debug)]
struct Ver(u64);

impl Ver {
    const NONE: Ver = Ver(0);

    fn new(seq: u64, slot: u64) -> Ver {
        Ver(seq << 1 | (slot & 1))
    }
    fn seq(self) -> u64 {
        self.0 >> 1
    }
    fn slot(self) -> u64 {
        self.0 & 1
    }
    fn is_none(self) -> bool {
        self.0 == 0
    }
    /// A version read from disk that we could have written.
    fn plausible(self, limit: u64) -> bool {
        self.is_none() || (self.seq() >= 1 && self.seq() < limit)
    }
}

/// The root record of the versioned format.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct Root {
    len: u64,
    /// Every sequence number ever stamped on a slot of this store is below it.
    limit: u64,
    /// Versions of the table sectors in use.
    tables: Vec<Ver>,
}

/// A root record as found on disk.
enum RootRec {
    Versioned(Root),
    /// Written by the code before version tables: length, highest length.
    Legacy {
        len: u64,
        high: u64,
    },
}

fn le64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

impl Root {
    fn encode(&self) -> Box<[u8]> {
        let mut p = vec![0u8; SECTOR].into_boxed_slice();
        p[0..8].copy_from_slice(&ROOT_TAG);
        p[8..16].copy_from_slice(&self.len.to_le_bytes());
        p[16..24].copy_from_slice(&self.limit.to_le_bytes());
        p[24..32].copy_from_slice(&(self.tables.len() as u64).to_le_bytes());
        for (i, v) in self.tables.iter().enumerate() {
            let at = ROOT_HEADER + 8 * i;
            p[at..at + 8].copy_from_slice(&v.0.to_le_bytes());
        }
        p
    }

    fn decode(p: &[u8]) -> Result<RootRec, String> {
        if p.len() != SECTOR {
            return Err("root record of the wrong size".into());
        }
        if p[0..8] != ROOT_TAG {
            if p[16..].iter().any(|b| *b != 0) {
                return Err("root record of an unknown format".into());
            }
            return Ok(RootRec::Legacy {
                len: le64(p, 0),
                high: le64(p, 8),
            });
        }
        let count = le64(p, 24);
        if count > MAX_TABLES as u64 {
            return Err(format!("root record names {count} table sectors"));
        }
        let root = Root {
            len: le64(p, 8),
            limit: le64(p, 16),
            tables: (0..count as usize)
                .map(|i| Ver(le64(p, ROOT_HEADER + 8 * i)))
                .collect(),
        };
        if root.limit > MAX_SEQ {
            return Err(format!(
                "root record claims sequence numbers up to {}",
                root.limit
            ));
        }
        if root.tables.iter().any(|v| !v.plausible(root.limit)) {
            return Err("root record names an impossible table version".into());
        }
        Ok(RootRec::Versioned(root))
    }
}

/// What one slot holds, as far as this store is concerned.
enum Slot {
    /// Ours, for the sector asked: sequence number and payload.
    Valid(u64, Box<[u8]>),
    /// All zeros: never written (or erased).
    Empty,
    /// A valid slot of another pool (a reused device).
    Foreign,
    /// A valid slot of this pool for another sector, and its sequence.
    Moved(u64, u64),
    /// Checksum mismatch.
    Damaged,
    /// The read failed (EIO: a device error, or crypt's MAC check).
    Failed(Errno),
}

impl Slot {
    fn describe(&self) -> String {
        match self {
            Slot::Valid(q, _) => format!("version {q}"),
            Slot::Empty => "an empty slot".into(),
            Slot::Foreign => "a slot of another pool".into(),
            Slot::Moved(s, _) => format!("the slot of {} (moved)", sector_name(*s)),
            Slot::Damaged => "a damaged slot (checksum)".into(),
            Slot::Failed(e) if *e == Errno::EIO => {
                "a slot that fails to read (EIO: damaged, or MAC mismatch)".into()
            }
            Slot::Failed(e) => format!("a slot that fails to read ({e})"),
        }
    }
    /// The sequence number of a valid slot of this pool, whatever its sector.
    fn seq(&self) -> Option<u64> {
        match self {
            Slot::Valid(q, _) | Slot::Moved(_, q) => Some(*q),
            _ => None,
        }
    }
}

fn sector_name(s: u64) -> String {
    if s == ROOT_SECTOR {
        "root record".into()
    } else if s >= TABLE_BASE {
        format!("version table sector {}", s - TABLE_BASE)
    } else {
        format!("sector {s}")
    }
}

/// Where the pairs are: the root at pair 0, data sector `s` at pair `s + 1`,
/// table sector `t` at pair `pairs − 1 − t`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Layout {
    pairs: u64,
    /// Data sectors the store may use.
    data: u64,
    /// Table sectors needed to cover them.
    tables: u64,
}

impl Layout {
    fn of(region: u64) -> Layout {
        let pairs = region / PAIR;
        let avail = pairs.saturating_sub(1);
        // d data sectors need ceil(d/512) table pairs: share `avail` so.
        let t = avail.div_ceil(PER_TABLE + 1);
        let data = (avail - t).min(MAX_TABLES as u64 * PER_TABLE);
        Layout {
            pairs,
            data,
            tables: data.div_ceil(PER_TABLE),
        }
    }
}

/// A sector's version and bytes, as read.
type Versioned = (Ver, Box<[u8]>);

/// How the root record found at open was written.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Format {
    Versioned,
    /// Legacy, opened read-only: read as the old code did (higher valid
    /// sequence of the pair wins).
    LegacyReadOnly,
    /// Legacy, opened read-write: versions were read at open; the tables and
    /// a versioned root are written before anything else.
    LegacyUpgrade,
}

/// What the store's user must see after redb owns the store.
#[derive(Default)]
pub struct StoreWatch {
    fell_back: Mutex<Option<String>>,
    /// The first damaged sector found (redb passes on only "I/O error").
    damage: Mutex<Option<String>>,
    /// Writes stay in memory (as when read-only) until released.
    hold: AtomicBool,
    /// The store's length now, and the most it may grow to.
    len: AtomicU64,
    max_len: AtomicU64,
    /// redb asked the store to grow past its region: redb refuses every
    /// later operation, and the database must be opened again.
    refused: AtomicBool,
}

impl StoreWatch {
    /// Why the root was taken from its older copy, if it was.
    pub fn fell_back(&self) -> Option<String> {
        self.fell_back.lock().clone()
    }
    /// The first damaged sector found, if any, with what was found.
    pub fn damage(&self) -> Option<String> {
        self.damage.lock().clone()
    }
    /// Let writes reach the pool again. A store that fell back holds them
    /// until its user has checked the database.
    pub fn release(&self) {
        self.hold.store(false, Ordering::Release);
    }
    /// The store's length, and the most it may grow to.
    pub fn space(&self) -> (u64, u64) {
        (
            self.len.load(Ordering::Acquire),
            self.max_len.load(Ordering::Acquire),
        )
    }
    /// Forget a refused growth (the store is given up on anyway).
    pub fn refuse_nothing_more(&self) {
        self.refused.store(false, Ordering::Release);
    }
    /// Whether a growth past the region was refused (see `refused`).
    pub fn refused_growth(&self) -> bool {
        self.refused.load(Ordering::Acquire)
    }
}

/// Undo log of the version changes of a write-out that failed.
#[derive(Default)]
struct Undo {
    versions: Vec<(u64, Ver)>,
    /// Sectors this write-out added to `unflushed`.
    unflushed: Vec<u64>,
    dirty_tables: BTreeSet<u64>,
}

struct State {
    format: Format,
    len: u64,
    /// Highest length reached: sectors from `len` up to it may hold old bytes
    /// (a legacy store's; the versioned format drops versions on shrinking).
    high: u64,
    /// Current version of every data sector; memory is authoritative.
    expected: Vec<Ver>,
    /// Current version of every table sector.
    tables: Vec<Ver>,
    /// Table sectors whose entries changed since they were last written.
    dirty_tables: BTreeSet<u64>,
    /// Buffered sectors; None: all zeros.
    dirty: BTreeMap<u64, Option<Box<[u8]>>>,
    /// Sectors whose version changed since the durable root, with the version
    /// that root names: its slot must not be overwritten before the next root.
    unflushed: HashMap<u64, Ver>,
    /// The durable root, its sequence number and slot.
    root: Root,
    root_seq: u64,
    root_slot: u64,
    /// A commit's root whose write or flush failed: it may or may not be on
    /// disk, so it is written again before anything else.
    pending_root: Option<Root>,
    /// Next sequence number to stamp.
    next_seq: u64,
}

pub struct MetaStore {
    top: Arc<dyn Layer>,
    /// Pool space given to the store: [0, region).
    region: u64,
    layout: Layout,
    /// Bytes of one slot write, so that with the layers' overhead it takes 8 KiB.
    slot_len: usize,
    pool_uuid: [u8; 16],
    state: Mutex<State>,
    /// Writes (redb's recovery on open) stay in memory and never reach the pool.
    read_only: bool,
    watch: Arc<StoreWatch>,
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
    fn new(
        top: Arc<dyn Layer>,
        region: u64,
        pool_uuid: [u8; 16],
        read_only: bool,
    ) -> io::Result<MetaStore> {
        let slot_len = SLOT.saturating_sub(top.overhead()) as usize;
        if slot_len < SECTOR + STAMP {
            return Err(eio(format!(
                "the layers add {} bytes per request; a slot cannot hold a sector",
                top.overhead()
            )));
        }
        Ok(MetaStore {
            top,
            region,
            layout: Layout::of(region),
            slot_len,
            pool_uuid,
            state: Mutex::new(State {
                format: Format::Versioned,
                len: 0,
                high: 0,
                expected: Vec::new(),
                tables: Vec::new(),
                dirty_tables: BTreeSet::new(),
                dirty: BTreeMap::new(),
                unflushed: HashMap::new(),
                root: Root::default(),
                root_seq: 0,
                root_slot: 0,
                pending_root: None,
                next_seq: 1,
            }),
            read_only,
            watch: Arc::new(StoreWatch::default()),
        })
    }

    /// Write the root of a new, empty store, durably. For a new pool only
    /// (a fresh pool UUID): sequence numbers start over.
    pub fn format(top: Arc<dyn Layer>, region: u64, pool_uuid: [u8; 16]) -> io::Result<()> {
        let m = MetaStore::new(top, region, pool_uuid, false)?;
        if m.layout.pairs < 1 {
            return Err(eio("the metadata region cannot hold a root record"));
        }
        let root = Root {
            len: 0,
            limit: 1,
            tables: Vec::new(),
        };
        // Slot 1 is cleared so that whatever it held cannot outrank the root
        // (zeros written through crypt read back as zeros: an empty slot).
        let w = Waiter::new();
        let clear = Io::new(Op::Write, SLOT, Buf::zeroed(m.slot_len), Some(w.end_io()));
        let ios = vec![
            m.seal_write(ROOT_SECTOR, Ver::new(1, 0), &root.encode()),
            (clear, w),
        ];
        m.submit_all(ios, true)
    }

    /// Open the store of a pool. A region without a root record is refused:
    /// `format` writes the first one.
    pub fn open(
        top: Arc<dyn Layer>,
        region: u64,
        pool_uuid: [u8; 16],
        read_only: bool,
    ) -> io::Result<MetaStore> {
        let m = MetaStore::new(top, region, pool_uuid, read_only)?;
        let (rec, seq, slot) = m.read_root()?;
        let mut st = m.state.lock();
        st.root_seq = seq;
        st.root_slot = slot;
        match rec {
            RootRec::Versioned(root) => m.load_versioned(&mut st, root)?,
            RootRec::Legacy { len, high } => m.load_legacy(&mut st, len, high)?,
        }
        m.watch.len.store(st.len, Ordering::Release);
        m.watch.max_len.store(m.max_len(&st), Ordering::Release);
        drop(st);
        if m.watch.fell_back().is_some() {
            m.watch.hold.store(true, Ordering::Release);
        }
        Ok(m)
    }

    /// Why the root was read from its older copy (its newer one unusable), if it was.
    pub fn fell_back(&self) -> Option<String> {
        self.watch.fell_back()
    }

    /// A handle on the fallback report and the write hold, usable once
    /// redb owns the store. After a fallback, writes stay in memory until
    /// `StoreWatch::release`.
    pub fn watch(&self) -> Arc<StoreWatch> {
        self.watch.clone()
    }

    fn max_len(&self, st: &State) -> u64 {
        let sectors = match st.format {
            Format::LegacyReadOnly => self.layout.pairs.saturating_sub(1),
            _ => self.layout.data,
        };
        sectors * SECTOR as u64
    }

    fn may_write(&self) -> bool {
        !self.read_only && !self.watch.hold.load(Ordering::Acquire)
    }

    fn pair_addr(&self, sector: u64) -> u64 {
        if sector == ROOT_SECTOR {
            0
        } else if sector >= TABLE_BASE {
            (self.layout.pairs - 1 - (sector - TABLE_BASE)) * PAIR
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

    /// Parse one slot read back for `sector`.
    fn classify(&self, sector: u64, raw: &[u8]) -> Slot {
        if raw.len() < SECTOR + STAMP {
            return Slot::Damaged;
        }
        let crc = u32::from_le_bytes(raw[SECTOR + 32..SECTOR + 36].try_into().expect("4 bytes"));
        if crc32c::crc32c(&raw[..SECTOR + 32]) != crc {
            return if raw.iter().all(|b| *b == 0) {
                Slot::Empty
            } else {
                Slot::Damaged
            };
        }
        let seq = le64(raw, SECTOR);
        let which = le64(raw, SECTOR + 8);
        if raw[SECTOR + 16..SECTOR + 32] != self.pool_uuid {
            Slot::Foreign
        } else if which != sector {
            Slot::Moved(which, seq)
        } else {
            Slot::Valid(seq, raw[..SECTOR].to_vec().into_boxed_slice())
        }
    }

    /// Read slots (sector, slot index) in one batch. Each slot is its own
    /// request: below crypt, each is sealed separately.
    fn read_slots(&self, reqs: &[(u64, u64)]) -> Vec<Slot> {
        if reqs.is_empty() {
            return Vec::new();
        }
        let mut ios = Vec::with_capacity(reqs.len());
        let mut waits = Vec::with_capacity(reqs.len());
        for &(s, k) in reqs {
            let w = Waiter::new();
            let addr = self.pair_addr(s) + k * SLOT;
            ios.push(Io::new(
                Op::Read,
                addr,
                Buf::zeroed(self.slot_len),
                Some(w.end_io()),
            ));
            waits.push(w);
        }
        let bufs: Vec<Buf> = ios.iter().map(|io| io.buf().clone()).collect();
        self.top.submit_batch(ios);
        reqs.iter()
            .zip(waits.iter().zip(&bufs))
            .map(|(&(s, _), (w, b))| match w.wait() {
                Ok(_) => self.classify(s, b.as_slice()),
                Err(e) => Slot::Failed(e),
            })
            .collect()
    }

    /// Read one slot; an error other than EIO (a timeout, a cancel) is
    /// retried once.
    fn read_slot_retry(&self, s: u64, k: u64, first: Slot) -> Slot {
        match first {
            Slot::Failed(e) if e != Errno::EIO => {
                self.read_slots(&[(s, k)]).pop().unwrap_or(Slot::Failed(e))
            }
            other => other,
        }
    }

    /// Read both root slots; take the valid one with the higher sequence.
    /// Returns the record, its sequence and slot; notes a fallback.
    fn read_root(&self) -> io::Result<(RootRec, u64, u64)> {
        let mut got = self.read_slots(&[(ROOT_SECTOR, 0), (ROOT_SECTOR, 1)]);
        let b = self.read_slot_retry(ROOT_SECTOR, 1, got.pop().unwrap_or(Slot::Damaged));
        let a = self.read_slot_retry(ROOT_SECTOR, 0, got.pop().unwrap_or(Slot::Damaged));
        for x in [&a, &b] {
            if let Slot::Failed(e) = x {
                if *e != Errno::EIO {
                    return Err(eio(format!("reading the root record: {e}")));
                }
            }
        }
        let unusable = |x: &Slot| matches!(x, Slot::Damaged | Slot::Failed(_) | Slot::Moved(..));
        let (best, slot, other) = match (&a, &b) {
            (Slot::Valid(qa, _), Slot::Valid(qb, _)) if qb > qa => (&b, 1, &a),
            (Slot::Valid(..), _) => (&a, 0, &b),
            (_, Slot::Valid(..)) => (&b, 1, &a),
            _ if !unusable(&a) && !unusable(&b) => return Err(eio(
                "metadata store has no root record: the metadata region was erased or overwritten",
            )),
            _ => {
                return Err(eio(format!(
                    "metadata root record: no usable copy (found {} and {})",
                    a.describe(),
                    b.describe()
                )))
            }
        };
        let Slot::Valid(seq, payload) = best else {
            unreachable!("matched valid above")
        };
        if *seq > MAX_SEQ {
            return Err(eio(format!("metadata root record claims version {seq}")));
        }
        // The first root ever written has sequence 1 and roots alternate
        // slots: from 2 on, the other slot was written, so empty means erased.
        let erased = *seq >= 2 && matches!(other, Slot::Empty | Slot::Foreign);
        if unusable(other) || erased {
            *self.watch.fell_back.lock() = Some(format!(
                "the other copy of the metadata root record is unusable ({}{}); \
                 the remaining copy (version {seq}) was used",
                other.describe(),
                if erased { ", zeroed?" } else { "" }
            ));
        }
        let rec = Root::decode(payload)
            .map_err(|why| eio(format!("metadata root record (version {seq}): {why}")))?;
        Ok((rec, *seq, slot))
    }

    /// Take a versioned root: read every table sector it names.
    fn load_versioned(&self, st: &mut State, root: Root) -> io::Result<()> {
        let l = self.layout;
        if root.len > l.data * SECTOR as u64 {
            return Err(eio(format!(
                "recorded length {} exceeds the region",
                root.len
            )));
        }
        if root.tables.len() as u64 > l.tables {
            return Err(eio(format!(
                "the root names {} table sectors; the region has room for {}",
                root.tables.len(),
                l.tables
            )));
        }
        st.expected = vec![Ver::NONE; l.data as usize];
        st.tables = vec![Ver::NONE; l.tables as usize];
        st.tables[..root.tables.len()].copy_from_slice(&root.tables);
        let want: Vec<(u64, Ver)> = (0..root.tables.len() as u64)
            .map(|t| (TABLE_BASE + t, st.tables[t as usize]))
            .filter(|(_, v)| !v.is_none())
            .collect();
        let got = self.read_versions(&want)?;
        for ((s, _), payload) in want.iter().zip(got) {
            let t = s - TABLE_BASE;
            for i in 0..PER_TABLE {
                let v = Ver(le64(&payload, 8 * i as usize));
                let sector = t * PER_TABLE + i;
                if v.is_none() {
                    continue;
                }
                if sector >= l.data || !v.plausible(root.limit) {
                    return Err(eio(format!(
                        "metadata version table sector {t}: impossible entry for sector {sector}"
                    )));
                }
                st.expected[sector as usize] = v;
            }
        }
        st.format = Format::Versioned;
        st.len = root.len;
        st.high = root.len;
        st.next_seq = root.limit;
        st.root = root;
        Ok(())
    }

    /// Take a legacy root. Read-only: read as before. Read-write: learn the
    /// version of every sector now, to write them as tables at the first
    /// write-out.
    fn load_legacy(&self, st: &mut State, len: u64, high: u64) -> io::Result<()> {
        st.len = len;
        st.high = high.max(len);
        if self.read_only {
            st.format = Format::LegacyReadOnly;
            if len > self.max_len(st) {
                return Err(eio(format!("recorded length {len} exceeds the region")));
            }
            return Ok(());
        }
        let max = self.layout.data * SECTOR as u64;
        if len > max {
            return Err(eio(format!(
                "this legacy store ({len} bytes) exceeds the versioned format's \
                 maximum of {max} bytes; open it read-only"
            )));
        }
        st.format = Format::LegacyUpgrade;
        st.expected = vec![Ver::NONE; self.layout.data as usize];
        st.tables = vec![Ver::NONE; self.layout.tables as usize];
        // Sectors from `len` on read as zeros from now on (version none).
        st.high = len;
        let sectors = len.div_ceil(SECTOR as u64);
        let mut max_seq = st.root_seq;
        let mut first = 0;
        while first < sectors {
            let batch: Vec<u64> = (first..sectors.min(first + LEGACY_BATCH)).collect();
            let found = self.legacy_load(&batch, &mut max_seq).map_err(|e| {
                eio(format!(
                    "reading the legacy store to upgrade it: {e}; open it read-only"
                ))
            })?;
            for (s, found) in batch.iter().zip(found) {
                if let Some((v, _)) = found {
                    st.expected[*s as usize] = v;
                }
            }
            first += LEGACY_BATCH;
        }
        // Table pairs written by an upgrade that did not complete.
        let tables: Vec<u64> = (0..self.layout.tables).map(|t| TABLE_BASE + t).collect();
        let reqs: Vec<(u64, u64)> = tables.iter().flat_map(|&s| [(s, 0), (s, 1)]).collect();
        for x in self.read_slots(&reqs) {
            max_seq = max_seq.max(x.seq().unwrap_or(0));
        }
        if max_seq > MAX_SEQ {
            return Err(eio(format!(
                "a legacy slot claims sequence number {max_seq}"
            )));
        }
        st.next_seq = max_seq + LEGACY_SEQ_GAP;
        st.root = Root {
            len,
            limit: 0,
            tables: Vec::new(),
        };
        Ok(())
    }

    /// The legacy rule: read both slots of each sector, take the valid one
    /// with the higher sequence (a damaged or EIO slot counts as absent).
    /// None: never written. Raises `max_seq` to every sequence seen.
    fn legacy_load(
        &self,
        sectors: &[u64],
        max_seq: &mut u64,
    ) -> io::Result<Vec<Option<Versioned>>> {
        let reqs: Vec<(u64, u64)> = sectors.iter().flat_map(|&s| [(s, 0), (s, 1)]).collect();
        let mut got = self.read_slots(&reqs).into_iter();
        let mut out = Vec::with_capacity(sectors.len());
        for &s in sectors {
            let pair = [
                got.next().unwrap_or(Slot::Damaged),
                got.next().unwrap_or(Slot::Damaged),
            ];
            let mut best: Option<(u64, u64, Box<[u8]>)> = None;
            let mut bad = 0;
            for (k, x) in pair.into_iter().enumerate() {
                *max_seq = (*max_seq).max(x.seq().unwrap_or(0));
                match x {
                    Slot::Valid(q, p) if best.as_ref().is_none_or(|(b, ..)| q > *b) => {
                        best = Some((q, k as u64, p))
                    }
                    Slot::Failed(e) if e != Errno::EIO => {
                        return Err(eio(format!("reading sector {s}: {e}")))
                    }
                    Slot::Damaged | Slot::Failed(_) => bad += 1,
                    _ => {}
                }
            }
            if bad == 2 {
                return Err(eio(format!("sector {s}: both copies damaged")));
            }
            out.push(best.map(|(q, k, p)| (Ver::new(q.min(MAX_SEQ), k), p)));
        }
        Ok(out)
    }

    /// Read sectors at the versions given (none of them `NONE`), in one
    /// batch: each from the slot its version names, accepted only if it
    /// holds exactly that version.
    fn read_versions(&self, want: &[(u64, Ver)]) -> io::Result<Vec<Box<[u8]>>> {
        let reqs: Vec<(u64, u64)> = want.iter().map(|(s, v)| (*s, v.slot())).collect();
        let got = self.read_slots(&reqs);
        let mut out = Vec::with_capacity(want.len());
        for (&(s, v), x) in want.iter().zip(got) {
            match self.read_slot_retry(s, v.slot(), x) {
                Slot::Valid(q, p) if q == v.seq() => out.push(p),
                other => return Err(self.version_error(s, v, other)),
            }
        }
        Ok(out)
    }

    /// The error for a sector whose slot does not hold the expected version:
    /// what both slots hold (the partner is read now, to say so).
    fn version_error(&self, s: u64, v: Ver, found: Slot) -> io::Error {
        let partner = self
            .read_slots(&[(s, 1 - v.slot())])
            .pop()
            .unwrap_or(Slot::Damaged);
        let (a, b) = if v.slot() == 0 {
            (&found, &partner)
        } else {
            (&partner, &found)
        };
        let what = match (a, b) {
            (Slot::Valid(qa, _), Slot::Valid(qb, _)) => format!("versions {qa} and {qb}"),
            _ => format!("{} and {}", a.describe(), b.describe()),
        };
        let older = [a, b]
            .iter()
            .any(|x| matches!(x, Slot::Valid(q, _) if *q < v.seq()));
        let hint = if matches!(a, Slot::Empty) || matches!(b, Slot::Empty) {
            " (zeroed?)"
        } else if older {
            " (rolled back?)"
        } else {
            ""
        };
        let msg = format!(
            "metadata {}: version {} expected, found {what}{hint}",
            sector_name(s),
            v.seq()
        );
        // redb reports later failures only as "previous I/O error": say it once here.
        log::error!("{msg}");
        self.watch.damage.lock().get_or_insert_with(|| msg.clone());
        eio(msg)
    }

    /// The pool addresses of the slot pairs the store uses now: every sector
    /// with a version (data and table sectors), and the root's pair.
    pub fn live_pairs(&self) -> Vec<u64> {
        let st = self.state.lock();
        let data = (0..st.expected.len() as u64).filter(|&s| !Self::version(&st, s).is_none());
        let tables = (0..st.tables.len() as u64)
            .map(|t| TABLE_BASE + t)
            .filter(|&s| !Self::version(&st, s).is_none());
        let mut out: Vec<u64> = data.chain(tables).map(|s| self.pair_addr(s)).collect();
        out.push(self.pair_addr(ROOT_SECTOR));
        out
    }

    /// Read every sector the version table names, as fsck does: the damaged
    /// ones, each with what was found (also sectors nothing reads today,
    /// such as pages redb has freed).
    pub fn verify_all(&self) -> Vec<String> {
        let st = self.state.lock();
        if st.format == Format::LegacyReadOnly {
            return Vec::new();
        }
        let named: Vec<(u64, Ver)> = (0..st.expected.len() as u64)
            .map(|s| (s, Self::version(&st, s)))
            .chain(
                (0..st.tables.len() as u64)
                    .map(|t| (TABLE_BASE + t, Self::version(&st, TABLE_BASE + t))),
            )
            .filter(|(_, v)| !v.is_none())
            .collect();
        let mut out = Vec::new();
        for chunk in named.chunks(256) {
            if self.read_versions(chunk).is_ok() {
                continue;
            }
            for one in chunk {
                if let Err(e) = self.read_versions(std::slice::from_ref(one)) {
                    out.push(e.to_string());
                }
            }
        }
        out
    }

    fn version(st: &State, s: u64) -> Ver {
        let at = if s >= TABLE_BASE {
            st.tables.get((s - TABLE_BASE) as usize)
        } else {
            st.expected.get(s as usize)
        };
        at.copied().unwrap_or(Ver::NONE)
    }

    /// The on-disk bytes of sectors that are not buffered.
    fn fetch(&self, st: &State, sectors: &[u64]) -> io::Result<Vec<Box<[u8]>>> {
        let zeros = || vec![0u8; SECTOR].into_boxed_slice();
        if st.format == Format::LegacyReadOnly {
            let found = self.legacy_load(sectors, &mut 0)?;
            return Ok(found
                .into_iter()
                .map(|f| f.map_or_else(zeros, |(_, p)| p))
                .collect());
        }
        let want: Vec<(u64, Ver)> = sectors
            .iter()
            .map(|&s| (s, Self::version(st, s)))
            .filter(|(_, v)| !v.is_none())
            .collect();
        let mut got = self.read_versions(&want)?.into_iter();
        Ok(sectors
            .iter()
            .map(|&s| match Self::version(st, s).is_none() {
                true => zeros(),
                false => got.next().unwrap_or_else(zeros),
            })
            .collect())
    }

    /// The current bytes of sectors (buffered or on disk), loading in one batch.
    fn sectors(&self, st: &State, first: u64, count: u64) -> io::Result<Vec<Box<[u8]>>> {
        let wanted: Vec<u64> = (first..first + count)
            .filter(|s| !st.dirty.contains_key(s))
            .collect();
        let mut loaded = self.fetch(st, &wanted)?.into_iter();
        let mut out = Vec::with_capacity(count as usize);
        for s in first..first + count {
            out.push(match st.dirty.get(&s) {
                Some(Some(d)) => d.clone(),
                Some(None) => vec![0u8; SECTOR].into_boxed_slice(),
                None => loaded.next().expect("one per sector not buffered"),
            });
        }
        Ok(out)
    }

    /// Slot a new version of `s` goes to: not the one the durable root names.
    fn target(st: &State, s: u64) -> u64 {
        let committed = st
            .unflushed
            .get(&s)
            .copied()
            .unwrap_or_else(|| Self::version(st, s));
        if committed.is_none() {
            0
        } else {
            1 - committed.slot()
        }
    }

    fn take_seq(st: &mut State) -> u64 {
        st.next_seq += 1;
        st.next_seq - 1
    }

    /// Make `new` the current version of `s`, logging the change in `undo`.
    fn change(st: &mut State, s: u64, new: Ver, undo: &mut Undo) {
        let old = Self::version(st, s);
        if old == new {
            return;
        }
        if let std::collections::hash_map::Entry::Vacant(e) = st.unflushed.entry(s) {
            e.insert(old);
            undo.unflushed.push(s);
        }
        undo.versions.push((s, old));
        Self::set_version(st, s, new);
        if s < TABLE_BASE {
            st.dirty_tables.insert(s / PER_TABLE);
        }
    }

    fn set_version(st: &mut State, s: u64, v: Ver) {
        let at = if s >= TABLE_BASE {
            st.tables.get_mut((s - TABLE_BASE) as usize)
        } else {
            st.expected.get_mut(s as usize)
        };
        if let Some(x) = at {
            *x = v;
        }
    }

    fn rollback(st: &mut State, undo: Undo) {
        for (s, old) in undo.versions.into_iter().rev() {
            Self::set_version(st, s, old);
        }
        for s in undo.unflushed {
            st.unflushed.remove(&s);
        }
        st.dirty_tables = undo.dirty_tables;
    }

    fn seal_write(&self, s: u64, v: Ver, payload: &[u8]) -> (Io, Waiter) {
        let w = Waiter::new();
        let addr = self.pair_addr(s) + v.slot() * SLOT;
        let io = Io::new(
            Op::Write,
            addr,
            self.seal(s, v.seq(), payload),
            Some(w.end_io()),
        );
        (io, w)
    }

    /// Submit writes as one batch, wait for all; with `flush`, then one flush.
    fn submit_all(&self, writes: Vec<(Io, Waiter)>, flush: bool) -> io::Result<()> {
        let (ios, waits): (Vec<Io>, Vec<Waiter>) = writes.into_iter().unzip();
        if !ios.is_empty() {
            self.top.submit_batch(ios);
        }
        let mut first_err = None;
        for w in waits {
            if let Err(e) = w.wait() {
                first_err.get_or_insert(e);
            }
        }
        if let Some(e) = first_err {
            return Err(eio(format!("write failed: {e}")));
        }
        if flush {
            stackfs_layers::submit_wait(&*self.top, Op::Flush, 0, Buf::zeroed(0))
                .map_err(|e: Errno| eio(format!("flush failed: {e}")))?;
        }
        Ok(())
    }

    /// New versions for buffered sectors (an all-zero sector becomes version
    /// none and needs no write); the writes to send.
    fn plan_data(
        &self,
        st: &mut State,
        data: &BTreeMap<u64, Option<Box<[u8]>>>,
        undo: &mut Undo,
    ) -> Vec<(Io, Waiter)> {
        let mut writes = Vec::with_capacity(data.len());
        for (&s, payload) in data {
            match payload.as_deref().filter(|p| p.iter().any(|b| *b != 0)) {
                None => Self::change(st, s, Ver::NONE, undo),
                Some(p) => {
                    let v = Ver::new(Self::take_seq(st), Self::target(st, s));
                    Self::change(st, s, v, undo);
                    writes.push(self.seal_write(s, v, p));
                }
            }
        }
        writes
    }

    /// New versions for the table sectors whose entries changed; the writes.
    fn plan_tables(&self, st: &mut State, undo: &mut Undo) -> Vec<(Io, Waiter)> {
        let mut writes = Vec::new();
        for t in std::mem::take(&mut st.dirty_tables) {
            let s = TABLE_BASE + t;
            let mut p = vec![0u8; SECTOR];
            for i in 0..PER_TABLE {
                let v = Self::version(st, t * PER_TABLE + i);
                p[8 * i as usize..8 * i as usize + 8].copy_from_slice(&v.0.to_le_bytes());
            }
            if p.iter().all(|b| *b == 0) {
                Self::change(st, s, Ver::NONE, undo);
            } else {
                let v = Ver::new(Self::take_seq(st), Self::target(st, s));
                Self::change(st, s, v, undo);
                writes.push(self.seal_write(s, v, &p));
            }
        }
        writes
    }

    /// The root naming the current table versions (up to the last in use).
    fn current_root(st: &State) -> Root {
        let used = st
            .tables
            .iter()
            .rposition(|v| !v.is_none())
            .map_or(0, |i| i + 1);
        Root {
            len: st.len,
            limit: st.next_seq + SEQ_BLOCK,
            tables: st.tables[..used].to_vec(),
        }
    }

    /// Write `root` to the root slot not holding the durable one, then flush.
    /// With `settles` (the root describes every current version), nothing is
    /// unflushed any more once it is durable; if it fails, it is pending.
    fn write_root(&self, st: &mut State, root: Root, settles: bool) -> io::Result<()> {
        let (seq, slot) = (st.root_seq + 1, 1 - st.root_slot);
        let w = self.seal_write(ROOT_SECTOR, Ver::new(seq, slot), &root.encode());
        match self.submit_all(vec![w], true) {
            Ok(()) => {
                st.root = root;
                st.root_seq = seq;
                st.root_slot = slot;
                if settles {
                    st.unflushed.clear();
                    st.pending_root = None;
                }
                Ok(())
            }
            Err(e) => {
                if settles {
                    st.pending_root = Some(root);
                }
                Err(e)
            }
        }
    }

    /// Make sure `need` more sequence numbers are below the durable root's
    /// limit: a number stamped on disk must never be handed out again after
    /// a crash. Raising the limit rewrites the durable root as it is.
    fn reserve(&self, st: &mut State, need: u64) -> io::Result<()> {
        if st.next_seq + need <= st.root.limit {
            return Ok(());
        }
        let root = Root {
            limit: st.next_seq + need + SEQ_BLOCK,
            ..st.root.clone()
        };
        self.write_root(st, root, false)
    }

    /// A legacy store's first write-out: write every table sector from the
    /// versions read at open, flush, then a versioned root, flush.
    fn upgrade(&self, st: &mut State) -> io::Result<()> {
        let mut undo = Undo::default();
        let used = st
            .expected
            .iter()
            .rposition(|v| !v.is_none())
            .map_or(0, |i| i as u64 + 1);
        st.dirty_tables = (0..used.div_ceil(PER_TABLE)).collect();
        let writes = self.plan_tables(st, &mut undo);
        let count = writes.len();
        if let Err(e) = self.submit_all(writes, true) {
            Self::rollback(st, undo);
            return Err(e);
        }
        st.format = Format::Versioned;
        log::info!("metadata store: upgrading to the versioned format ({count} table sectors)");
        let root = Root {
            len: st.root.len,
            ..Self::current_root(st)
        };
        self.write_root(st, root, true)
    }

    /// Whether the durable root describes the current state exactly.
    fn settled(st: &State) -> bool {
        st.dirty.is_empty()
            && st.dirty_tables.is_empty()
            && st.unflushed.is_empty()
            && st.pending_root.is_none()
            && st.len == st.root.len
    }

    /// Send buffered sectors down. With `durable`, a commit: the sectors and
    /// the changed table sectors, a flush, then the root, a flush.
    fn write_out(&self, st: &mut State, durable: bool) -> io::Result<()> {
        if st.format == Format::LegacyUpgrade {
            self.upgrade(st)?;
        }
        if let Some(root) = st.pending_root.clone() {
            self.write_root(st, root, true)?;
        }
        if st.dirty.is_empty() && (!durable || Self::settled(st)) {
            return Ok(());
        }
        let tables = if durable { st.tables.len() as u64 } else { 0 };
        self.reserve(st, st.dirty.len() as u64 + tables)?;
        let data = std::mem::take(&mut st.dirty);
        let mut undo = Undo {
            dirty_tables: st.dirty_tables.clone(),
            ..Undo::default()
        };
        let mut writes = self.plan_data(st, &data, &mut undo);
        if durable {
            writes.extend(self.plan_tables(st, &mut undo));
        }
        if let Err(e) = self.submit_all(writes, durable) {
            // Keep the data buffered so nothing is lost; the caller sees the error.
            Self::rollback(st, undo);
            st.dirty = data;
            return Err(e);
        }
        if durable {
            let root = Self::current_root(st);
            self.write_root(st, root, true)?;
        }
        Ok(())
    }
}

impl redb::StorageBackend for MetaStore {
    fn len(&self) -> Result<u64, io::Error> {
        Ok(self.state.lock().len)
    }

    fn read(&self, offset: u64, out: &mut [u8]) -> Result<(), io::Error> {
        let st = self.state.lock();
        let end = offset
            .checked_add(out.len() as u64)
            .filter(|e| *e <= st.len)
            .ok_or_else(|| eio("read past the end"))?;
        if out.is_empty() {
            return Ok(());
        }
        let first = offset / SECTOR as u64;
        let last = (end - 1) / SECTOR as u64;
        let secs = self.sectors(&st, first, last - first + 1)?;
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
        let max = self.max_len(&st);
        if len > max {
            self.watch.refused.store(true, Ordering::Release);
            return Err(io::Error::new(
                io::ErrorKind::StorageFull,
                format!(
                    "metadata store full: {len} bytes asked, at most {max} \
                     (the region's size, or the version table's limit of {} bytes)",
                    MAX_TABLES as u64 * PER_TABLE * SECTOR as u64
                ),
            ));
        }
        let sec = SECTOR as u64;
        if len > st.len {
            // New positions must read as zeros, also where an old, longer store left bytes.
            if st.len % sec != 0 {
                let s = st.len / sec;
                let cut = (st.len % sec) as usize;
                let mut bytes = self.sectors(&st, s, 1)?.pop().expect("one sector");
                bytes[cut..].fill(0);
                st.dirty.insert(s, Some(bytes));
            }
            for s in st.len.div_ceil(sec)..len.min(st.high).div_ceil(sec) {
                st.dirty.insert(s, None);
            }
        } else if st.format != Format::LegacyReadOnly {
            // Whole sectors cut off lose their version (they read as zeros).
            for s in len.div_ceil(sec)..st.len.div_ceil(sec) {
                if st.dirty.contains_key(&s) || !Self::version(&st, s).is_none() {
                    st.dirty.insert(s, None);
                }
            }
        }
        st.len = len;
        self.watch.len.store(len, Ordering::Release);
        st.high = match st.format {
            Format::LegacyReadOnly => st.high.max(len),
            _ => len,
        };
        Ok(())
    }

    fn sync_data(&self) -> Result<(), io::Error> {
        if !self.may_write() {
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
                self.sectors(&st, s, 1)?.pop().expect("one sector")
            };
            sec[from..from + n].copy_from_slice(&data[done..done + n]);
            st.dirty.insert(s, Some(sec));
            done += n;
        }
        if st.dirty.len() > MAX_DIRTY && self.may_write() {
            self.write_out(&mut st, false)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use redb::{ReadableDatabase, ReadableTable, StorageBackend, TableDefinition};
    use stackfs_layers::{submit_wait, Mem};
    use std::sync::atomic::AtomicU64;
    use std::sync::atomic::Ordering::Relaxed;

    const REGION: u64 = 4 << 20;
    const UUID: [u8; 16] = [7; 16];
    const S: u64 = SECTOR as u64;
    const ROWS: TableDefinition<u64, &[u8]> = TableDefinition::new("rows");

    /// The mem device under a tap that counts writes and flushes and fails
    /// chosen requests (by address) a number of times.
    struct Tap {
        mem: Mem,
        writes: AtomicU64,
        flushes: AtomicU64,
        fail: Mutex<HashMap<(bool, u64), (Errno, u32)>>,
    }

    impl Tap {
        fn fail(&self, write: bool, addr: u64, e: Errno, times: u32) {
            self.fail.lock().insert((write, addr), (e, times));
        }
        fn raw(&self, addr: u64, len: usize) -> Vec<u8> {
            let b = Buf::zeroed(len);
            submit_wait(&self.mem, Op::Read, addr, b.clone()).unwrap();
            b.as_slice().to_vec()
        }
        fn poke(&self, addr: u64, bytes: &[u8]) {
            submit_wait(&self.mem, Op::Write, addr, Buf::copy_from(bytes)).unwrap();
        }
    }

    impl Layer for Tap {
        fn name(&self) -> String {
            "tap".into()
        }
        fn capacity(&self) -> u64 {
            self.mem.capacity()
        }
        fn submit(&self, io: Io) {
            let key = match io.op() {
                Op::Write => {
                    self.writes.fetch_add(1, Relaxed);
                    Some((true, io.addr()))
                }
                Op::Flush => {
                    self.flushes.fetch_add(1, Relaxed);
                    None
                }
                Op::Read => Some((false, io.addr())),
                Op::Discard => None,
            };
            let mut fail = self.fail.lock();
            if let Some((e, n)) = key.and_then(|k| fail.get_mut(&k)) {
                if *n > 0 {
                    *n -= 1;
                    let e = *e;
                    drop(fail);
                    io.finish(Err(e));
                    return;
                }
            }
            drop(fail);
            self.mem.submit(io);
        }
    }

    fn tap(capacity: u64) -> (Arc<Tap>, Arc<dyn Layer>) {
        let tap = Arc::new(Tap {
            mem: Mem::new(capacity),
            writes: AtomicU64::new(0),
            flushes: AtomicU64::new(0),
            fail: Mutex::new(HashMap::new()),
        });
        let top: Arc<dyn Layer> = tap.clone();
        (tap, top)
    }

    /// A formatted store over a fresh device.
    fn setup() -> (Arc<Tap>, Arc<dyn Layer>) {
        let (tap, top) = tap(REGION);
        MetaStore::format(top.clone(), REGION, UUID).unwrap();
        (tap, top)
    }

    fn open(top: &Arc<dyn Layer>) -> MetaStore {
        MetaStore::open(top.clone(), REGION, UUID, false).unwrap()
    }

    fn open_err(top: &Arc<dyn Layer>) -> String {
        MetaStore::open(top.clone(), REGION, UUID, false)
            .map(|_| ())
            .unwrap_err()
            .to_string()
    }

    fn put(m: &MetaStore, s: u64, byte: u8) {
        m.write(s * S, &[byte; SECTOR]).unwrap();
    }

    fn get(m: &MetaStore, s: u64) -> io::Result<Vec<u8>> {
        let mut b = vec![0u8; SECTOR];
        m.read(s * S, &mut b).map(|_| b)
    }

    fn ver(m: &MetaStore, s: u64) -> Ver {
        m.state.lock().expected[s as usize]
    }

    fn slot_addr(m: &MetaStore, s: u64, k: u64) -> u64 {
        m.pair_addr(s) + k * SLOT
    }

    /// A store of 8 sectors, sector s holding byte s+1, committed.
    fn committed8(top: &Arc<dyn Layer>) -> MetaStore {
        let m = open(top);
        m.set_len(8 * S).unwrap();
        for s in 0..8 {
            put(&m, s, s as u8 + 1);
        }
        m.sync_data().unwrap();
        m
    }

    #[test]
    fn layout_caps_the_store_near_1_gib() {
        let l = Layout::of(4 << 30);
        assert_eq!(l.data * S, 1016 << 20);
        assert_eq!(l.tables, MAX_TABLES as u64);
        let l = Layout::of(16 << 20);
        assert_eq!((l.pairs, l.data, l.tables), (1024, 1021, 2));
        // Data pairs [1, data] and table pairs [pairs - tables, pairs) are disjoint.
        assert!(l.data < l.pairs - l.tables);
    }

    #[test]
    fn zeroed_newest_slot_is_an_error() {
        let (tap, top) = setup();
        let m = committed8(&top);
        put(&m, 3, 0xaa);
        m.sync_data().unwrap();
        let v = ver(&m, 3);
        drop(m);
        tap.poke(
            slot_addr(&open(&top), 3, v.slot()),
            &vec![0u8; SLOT as usize],
        );
        let m = open(&top);
        assert_eq!(get(&m, 2).unwrap(), vec![3u8; SECTOR]);
        let e = get(&m, 3).unwrap_err().to_string();
        assert!(e.contains("metadata sector 3: version"), "{e}");
        assert!(e.contains("zeroed?"), "{e}");
    }

    #[test]
    fn older_version_written_back_is_an_error() {
        let (tap, top) = setup();
        let m = committed8(&top);
        let v1 = ver(&m, 3);
        let old = tap.raw(slot_addr(&m, 3, v1.slot()), SLOT as usize);
        for b in [0x21, 0x22] {
            put(&m, 3, b);
            m.sync_data().unwrap();
        }
        // Two commits later, the current version is in v1's slot again.
        let v3 = ver(&m, 3);
        assert_eq!(v3.slot(), v1.slot());
        drop(m);
        tap.poke(slot_addr(&open(&top), 3, v1.slot()), &old);
        let m = open(&top);
        let e = get(&m, 3).unwrap_err().to_string();
        assert!(
            e.contains(&format!(
                "sector 3: version {} expected, found versions",
                v3.seq()
            )),
            "{e}"
        );
        assert!(e.contains("rolled back?"), "{e}");
    }

    #[test]
    fn swapped_pairs_are_an_error() {
        let (tap, top) = setup();
        let m = committed8(&top);
        let (a, b) = (m.pair_addr(3), m.pair_addr(4));
        drop(m);
        let (ra, rb) = (tap.raw(a, PAIR as usize), tap.raw(b, PAIR as usize));
        tap.poke(a, &rb);
        tap.poke(b, &ra);
        let m = open(&top);
        let e = get(&m, 3).unwrap_err().to_string();
        assert!(
            e.contains("metadata sector 3:") && e.contains("the slot of sector 4 (moved)"),
            "{e}"
        );
        let e = get(&m, 4).unwrap_err().to_string();
        assert!(
            e.contains("metadata sector 4:") && e.contains("moved"),
            "{e}"
        );
        assert_eq!(get(&m, 5).unwrap(), vec![6u8; SECTOR]);
    }

    #[test]
    fn zeroed_region_has_no_root() {
        let (tap, top) = setup();
        drop(committed8(&top));
        tap.poke(0, &vec![0u8; REGION as usize]);
        let e = open_err(&top);
        assert!(e.contains("no root record"), "{e}");
        // An unformatted region is refused the same way.
        let (_, fresh) = tap_only();
        assert!(open_err(&fresh).contains("no root record"));
    }

    #[test]
    fn zeroed_root_slot_is_reported() {
        let (tap, top) = setup();
        let m = committed8(&top);
        put(&m, 7, 0x99);
        m.sync_data().unwrap();
        let slot = m.state.lock().root_slot;
        drop(m);
        // The newest root erased: the previous one is consistent (one commit
        // older), which cannot be told from a root never written, except
        // that roots from version 2 on always have a written partner.
        tap.poke(slot * SLOT, &vec![0u8; SLOT as usize]);
        let m = open(&top);
        let why = m.fell_back().expect("reported");
        assert!(why.contains("an empty slot, zeroed?"), "{why}");
        assert_eq!(get(&m, 7).unwrap(), vec![8u8; SECTOR]);
        // A store just formatted has one root copy only: nothing to report.
        let (_, fresh) = setup();
        assert!(open(&fresh).fell_back().is_none());
    }

    #[test]
    fn root_two_commits_old_is_detected() {
        let (tap, top) = setup();
        let db = redb::Database::builder()
            .create_with_backend(open(&top))
            .unwrap();
        insert(&db, 0, 10);
        let old = tap.raw(0, PAIR as usize);
        insert(&db, 10, 20);
        insert(&db, 20, 30);
        drop(db);
        // Both root copies replaced by those of two commits earlier.
        tap.poke(0, &old);
        let e = MetaStore::open(top.clone(), REGION, UUID, false)
            .and_then(|m| {
                redb::Database::builder()
                    .create_with_backend(m)
                    .map(|_| ())
                    .map_err(io::Error::other)
            })
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("metadata") && e.contains("expected, found"),
            "{e}"
        );
    }

    fn tap_only() -> (Arc<Tap>, Arc<dyn Layer>) {
        tap(REGION)
    }

    #[test]
    fn garbage_in_the_other_slot_is_ignored() {
        let (tap, top) = setup();
        let m = committed8(&top);
        let v = ver(&m, 3);
        let other = slot_addr(&m, 3, 1 - v.slot());
        drop(m);
        // A torn write of the next version, never committed.
        tap.poke(other, &mem_noise(SLOT as usize, 1));
        let m = open(&top);
        assert_eq!(get(&m, 3).unwrap(), vec![4u8; SECTOR]);
        assert!(m.fell_back().is_none());
    }

    fn mem_noise(len: usize, seed: u64) -> Vec<u8> {
        stackfs_layers::mem::noise(len, seed)
    }

    #[test]
    fn torn_root_falls_back_and_holds_writes() {
        let (tap, top) = setup();
        let m = committed8(&top);
        let (seq, slot) = {
            let st = m.state.lock();
            (st.root_seq, st.root_slot)
        };
        put(&m, 5, 0x55);
        m.sync_data().unwrap();
        drop(m);
        // The last root write was torn: the previous root is used.
        tap.poke((1 - slot) * SLOT, &mem_noise(SLOT as usize, 2));
        let m = open(&top);
        let why = m.fell_back().expect("fell back");
        assert!(
            why.contains(&format!("remaining copy (version {seq})")),
            "{why}"
        );
        // The previous commit reads back whole (its versions are still there).
        assert_eq!(get(&m, 5).unwrap(), vec![6u8; SECTOR]);
        // Until released, writes stay in memory.
        let before = tap.writes.load(Relaxed);
        put(&m, 6, 0x66);
        m.sync_data().unwrap();
        assert_eq!(tap.writes.load(Relaxed), before);
        assert_eq!(get(&m, 6).unwrap(), vec![0x66u8; SECTOR]);
        m.watch().release();
        m.sync_data().unwrap();
        assert!(tap.writes.load(Relaxed) > before);
        drop(m);
        let m = open(&top);
        assert!(m.fell_back().is_none());
        assert_eq!(get(&m, 6).unwrap(), vec![0x66u8; SECTOR]);
    }

    #[test]
    fn eio_on_a_root_slot_falls_back() {
        let (tap, top) = setup();
        let m = committed8(&top);
        put(&m, 7, 0x99);
        m.sync_data().unwrap();
        let slot = m.state.lock().root_slot;
        drop(m);
        tap.fail(false, slot * SLOT, Errno::EIO, 1);
        let m = open(&top);
        assert!(m.fell_back().unwrap().contains("EIO"));
        // Exactly the last commit is lost, consistently.
        assert_eq!(get(&m, 7).unwrap(), vec![8u8; SECTOR]);
        assert_eq!(get(&m, 6).unwrap(), vec![7u8; SECTOR]);
    }

    #[test]
    fn crash_between_the_phases_gives_the_previous_commit() {
        let (tap, top) = setup();
        let m = committed8(&top);
        let v1 = ver(&m, 5);
        let root = tap.raw(0, PAIR as usize);
        // The next commit grows the store and rewrites every sector ...
        m.set_len(12 * S).unwrap();
        for s in 0..12 {
            put(&m, s, 0x40 + s as u8);
        }
        m.sync_data().unwrap();
        let v2 = ver(&m, 5);
        assert_ne!(v2.slot(), v1.slot());
        drop(m);
        // ... but its root never reached the disk; one data write was torn.
        tap.poke(0, &root);
        let orphan = tap.raw(slot_addr(&open(&top), 5, v2.slot()), SLOT as usize);
        tap.poke(
            slot_addr(&open(&top), 6, 1 - v1.slot()),
            &mem_noise(SLOT as usize, 3),
        );
        let m = open(&top);
        assert_eq!(m.len().unwrap(), 8 * S);
        for s in 0..8 {
            assert_eq!(get(&m, s).unwrap(), vec![s as u8 + 1; SECTOR], "sector {s}");
        }
        // Writing on: the new version of sector 5 takes the orphan's slot.
        put(&m, 5, 0x77);
        m.sync_data().unwrap();
        let v3 = ver(&m, 5);
        assert_eq!(v3.slot(), v2.slot());
        // Sequence numbers are never reused: the orphan, written back, is
        // not taken for the committed version.
        assert!(v3.seq() > v2.seq());
        drop(m);
        tap.poke(slot_addr(&open(&top), 5, v2.slot()), &orphan);
        let m = open(&top);
        let e = get(&m, 5).unwrap_err().to_string();
        assert!(e.contains("metadata sector 5:"), "{e}");
    }

    #[test]
    fn failed_root_write_is_retried_before_anything_else() {
        let (tap, top) = setup();
        let m = committed8(&top);
        let slot = m.state.lock().root_slot;
        // Prime the sequence reservation so the failing write is the commit's.
        put(&m, 1, 0x11);
        m.sync_data().unwrap();
        // Roots alternate: the next one goes where the one before last is.
        tap.fail(true, slot * SLOT, Errno::EIO, 1);
        put(&m, 2, 0x12);
        assert!(m.sync_data().is_err());
        // Reads go on from the versions just written.
        assert_eq!(get(&m, 2).unwrap(), vec![0x12u8; SECTOR]);
        put(&m, 2, 0x13);
        m.sync_data().unwrap();
        drop(m);
        let m = open(&top);
        assert_eq!(get(&m, 1).unwrap(), vec![0x11u8; SECTOR]);
        assert_eq!(get(&m, 2).unwrap(), vec![0x13u8; SECTOR]);
    }

    #[test]
    fn read_errors_and_retries() {
        let (tap, top) = setup();
        let m = committed8(&top);
        let v = ver(&m, 3);
        let at = slot_addr(&m, 3, v.slot());
        drop(m);
        // A timeout is retried once.
        tap.fail(false, at, Errno::ETIMEDOUT, 1);
        let m = open(&top);
        assert_eq!(get(&m, 3).unwrap(), vec![4u8; SECTOR]);
        drop(m);
        tap.fail(false, at, Errno::ETIMEDOUT, 2);
        let e = get(&open(&top), 3).unwrap_err().to_string();
        assert!(e.contains("sector 3") && e.contains("fails to read"), "{e}");
        // EIO (a failed MAC under crypt) is not retried, and the other
        // slot's version is never used instead.
        tap.fail(false, at, Errno::EIO, 1);
        let e = get(&open(&top), 3).unwrap_err().to_string();
        assert!(e.contains("sector 3") && e.contains("EIO"), "{e}");
    }

    #[test]
    fn overflow_write_outs_keep_the_commit() {
        let region = 160 << 20;
        let (_tap, top) = tap(region);
        MetaStore::format(top.clone(), region, UUID).unwrap();
        let open = || MetaStore::open(top.clone(), region, UUID, false).unwrap();
        let n = MAX_DIRTY as u64 + 100;
        let m = open();
        m.set_len(n * S).unwrap();
        for s in 0..n {
            put(&m, s, 1);
        }
        m.sync_data().unwrap();
        // Two overflows without a commit, then a crash.
        for b in [2, 3] {
            for s in 0..n {
                put(&m, s, b);
            }
        }
        assert!(!m.state.lock().unflushed.is_empty());
        drop(m);
        let m = open();
        for s in [0, 77, n - 1] {
            assert_eq!(get(&m, s).unwrap(), vec![1u8; SECTOR]);
        }
        for s in 0..n {
            put(&m, s, 4);
        }
        m.sync_data().unwrap();
        drop(m);
        let m = open();
        for s in [0, 77, n - 1] {
            assert_eq!(get(&m, s).unwrap(), vec![4u8; SECTOR]);
        }
    }

    #[test]
    fn shrink_and_grow_read_zeros_and_the_cap_is_enforced() {
        let (_tap, top) = setup();
        let m = committed8(&top);
        m.set_len(2 * S + 100).unwrap();
        m.set_len(8 * S).unwrap();
        let mut b = vec![0u8; SECTOR];
        m.read(2 * S, &mut b).unwrap();
        assert_eq!(&b[..100], &[3u8; 100][..]);
        assert!(b[100..].iter().all(|x| *x == 0));
        assert_eq!(get(&m, 5).unwrap(), vec![0u8; SECTOR]);
        m.sync_data().unwrap();
        drop(m);
        let m = open(&top);
        assert_eq!(get(&m, 5).unwrap(), vec![0u8; SECTOR]);
        assert_eq!(get(&m, 1).unwrap(), vec![2u8; SECTOR]);
        let e = m.set_len(m.layout.data * S + 1).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::StorageFull);
    }

    /// Write a store in the format before version tables: the pairs of
    /// `sectors` (seq 5, slot 1, the bytes; and an older seq 4 of garbage in
    /// slot 0) and the length record at pair 0 (seq 9; a shorter seq 8).
    fn write_legacy(top: &Arc<dyn Layer>, len: u64, sectors: &[(u64, Vec<u8>)]) {
        let m = MetaStore::new(top.clone(), REGION, UUID, false).unwrap();
        let mut ios = Vec::new();
        for (s, bytes) in sectors {
            ios.push(m.seal_write(*s, Ver::new(5, 1), bytes));
            ios.push(m.seal_write(*s, Ver::new(4, 0), &mem_noise(SECTOR, *s)));
        }
        let mut rec = vec![0u8; SECTOR];
        rec[0..8].copy_from_slice(&len.to_le_bytes());
        rec[8..16].copy_from_slice(&(len + 3 * S).to_le_bytes());
        ios.push(m.seal_write(ROOT_SECTOR, Ver::new(9, 0), &rec));
        rec[0..8].copy_from_slice(&(len - S).to_le_bytes());
        ios.push(m.seal_write(ROOT_SECTOR, Ver::new(8, 1), &rec));
        m.submit_all(ios, true).unwrap();
    }

    fn rows(db: &redb::Database) -> Vec<(u64, Vec<u8>)> {
        let rtx = db.begin_read().unwrap();
        let t = rtx.open_table(ROWS).unwrap();
        t.iter()
            .unwrap()
            .map(|r| {
                let (k, v) = r.unwrap();
                (k.value(), v.value().to_vec())
            })
            .collect()
    }

    fn insert(db: &redb::Database, from: u64, to: u64) {
        let tx = db.begin_write().unwrap();
        {
            let mut t = tx.open_table(ROWS).unwrap();
            for i in from..to {
                t.insert(i, &mem_noise(300, i)[..]).unwrap();
            }
        }
        tx.commit().unwrap();
    }

    fn want(to: u64) -> Vec<(u64, Vec<u8>)> {
        (0..to).map(|i| (i, mem_noise(300, i))).collect()
    }

    #[test]
    fn legacy_store_is_read_and_upgraded() {
        // A database built on a versioned store, copied out sector by sector.
        let (_t, src) = setup();
        let db = redb::Database::builder()
            .create_with_backend(open(&src))
            .unwrap();
        insert(&db, 0, 200);
        drop(db);
        let m = open(&src);
        let len = m.len().unwrap();
        let sectors: Vec<(u64, Vec<u8>)> = (0..len / S).map(|s| (s, get(&m, s).unwrap())).collect();
        drop(m);
        let (tap, top) = tap_only();
        write_legacy(&top, len, &sectors);
        // Read-only: read as before, nothing written.
        let writes = tap.writes.load(Relaxed);
        let ro = MetaStore::open(top.clone(), REGION, UUID, true).unwrap();
        assert_eq!(ro.state.lock().format, Format::LegacyReadOnly);
        let db = redb::Database::builder().create_with_backend(ro).unwrap();
        assert_eq!(rows(&db), want(200));
        drop(db);
        assert_eq!(tap.writes.load(Relaxed), writes);
        // Read-write: upgraded at the first write-out.
        let db = redb::Database::builder()
            .create_with_backend(open(&top))
            .unwrap();
        assert_eq!(rows(&db), want(200));
        insert(&db, 200, 300);
        drop(db);
        let m = open(&top);
        {
            let st = m.state.lock();
            assert_eq!(st.format, Format::Versioned);
            assert!(!st.root.tables.is_empty());
        }
        let root = tap.raw(m.state.lock().root_slot * SLOT, SECTOR);
        assert_eq!(&root[..8], &ROOT_TAG);
        let db = redb::Database::builder().create_with_backend(m).unwrap();
        assert_eq!(rows(&db), want(300));
    }

    #[test]
    fn redb_survives_reopen() {
        let (_tap, top) = setup();
        let db = redb::Database::builder()
            .create_with_backend(open(&top))
            .unwrap();
        for k in 0..10 {
            insert(&db, k * 100, (k + 1) * 100);
        }
        drop(db);
        let mut db = redb::Database::builder()
            .create_with_backend(open(&top))
            .unwrap();
        assert_eq!(rows(&db), want(1000));
        assert!(db.check_integrity().unwrap());
        insert(&db, 1000, 1100);
        drop(db);
        let db = redb::Database::builder()
            .create_with_backend(open(&top))
            .unwrap();
        assert_eq!(rows(&db), want(1100));
    }

    /// `cargo test --release -p stackfs --lib metastore::tests::bench -- --ignored --nocapture`
    #[test]
    #[ignore]
    fn bench() {
        let (tap, top) = self::tap(256 << 20);
        let region = 64 << 20;
        MetaStore::format(top.clone(), region, [7; 16]).unwrap();
        let s = MetaStore::open(top.clone(), region, [7; 16], false).unwrap();
        s.set_len(8 << 20).unwrap();
        let n = 5000u64;
        let (w0, f0) = (tap.writes.load(Relaxed), tap.flushes.load(Relaxed));
        let t = std::time::Instant::now();
        for i in 0..n {
            let off = (i * 7919 % 2000) * 4096;
            s.write(off, &[i as u8 | 1; 4096 * 4]).unwrap();
            s.sync_data().unwrap();
        }
        let el = t.elapsed();
        eprintln!(
            "BENCH raw: {n} x (4 sectors + sync_data): {el:?} = {:.1} us each; {:.2} writes, {:.2} flushes each",
            el.as_secs_f64() * 1e6 / n as f64,
            (tap.writes.load(Relaxed) - w0) as f64 / n as f64,
            (tap.flushes.load(Relaxed) - f0) as f64 / n as f64
        );
        drop(s);
        let (tap, top) = self::tap(256 << 20);
        MetaStore::format(top.clone(), region, [7; 16]).unwrap();
        let db = redb::Database::builder()
            .create_with_backend(MetaStore::open(top.clone(), region, [7; 16], false).unwrap())
            .unwrap();
        const T: TableDefinition<u64, &[u8]> = TableDefinition::new("t");
        let n = 2000u64;
        let (w0, f0) = (tap.writes.load(Relaxed), tap.flushes.load(Relaxed));
        let t = std::time::Instant::now();
        for i in 0..n {
            let tx = db.begin_write().unwrap();
            tx.open_table(T)
                .unwrap()
                .insert(i, &[1u8; 100][..])
                .unwrap();
            tx.commit().unwrap();
        }
        let el = t.elapsed();
        eprintln!(
            "BENCH redb: {n} durable commits: {el:?} = {:.1} us each; {:.2} writes, {:.2} flushes each",
            el.as_secs_f64() * 1e6 / n as f64,
            (tap.writes.load(Relaxed) - w0) as f64 / n as f64,
            (tap.flushes.load(Relaxed) - f0) as f64 / n as f64
        );
    }
}
