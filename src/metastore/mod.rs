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
//!
//! Over a mirror (`copies` > 1, given at open from the stack), copies can
//! differ: one that missed commits (faulted, or cut off by a power loss)
//! holds an older root, valid. Opening reads both root slots from every
//! copy, each alone (`avoid` every other copy, `TAG_NO_HEAL`: the mirror
//! heals nothing from it; the next commit rewrites the root on every copy),
//! and takes the valid root with the highest sequence over all of them; a
//! copy that does not answer (EIO) is skipped. The fallback (the other slot
//! of the pair unusable or erased) is judged on the copies holding that
//! root: it is one only if no such copy has that slot usable. Every other
//! read that finds a slot not holding the version it must (damaged, or older
//! on such a copy) is read again avoiding the copies that served it, and the
//! mirror rewrites them from the copy that answers (`other_copies_at`).
//!
//! A walk (`walk`, through the `MetaCopies` handle, usable while redb owns
//! the store) goes over every live slot — the durable root's slot, and the
//! slot the current version of each table and data sector names — on one
//! copy: `Check` reads each from that copy alone and, where it does not hold
//! its version, again from the others (the mirror rewrites the copy);
//! `Rebuild` reads each avoiding the copy (the mirror rewrites it where it
//! differs). A slot whose sector got a newer version during the walk is not
//! bad. The walk writes nothing itself.
//!
//! The parts: `ondisk` (records and their encoding), `slots` (slot I/O),
//! `load` (open: root and version tables), `versions` (the version table in
//! memory), `write_out` (commits), `backend` (what redb calls), `walk`
//! (walks over one copy).

mod backend;
mod load;
mod ondisk;
mod slots;
#[cfg(test)]
mod tests;
mod versions;
mod walk;
mod write_out;

pub use ondisk::SECTOR;
pub use walk::{CopyWalk, MetaCopies, WalkCounts};

use ondisk::{Layout, Root, RootRec, Ver, ROOT_SECTOR, SLOT, STAMP, TABLE_BASE};
use parking_lot::Mutex;
use stackfs_layers::mirror::MAX_COPIES;
use stackfs_layers::{Buf, Io, Layer, Op, Waiter};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

/// Write buffered sectors out (without a flush) beyond this many.
const MAX_DIRTY: usize = 8192;
/// Sequence numbers a root reserves beyond those already used.
const SEQ_BLOCK: u64 = 1 << 20;
/// On upgrading a legacy store, sequences start this far above the highest
/// one seen, clear of anything an older write may have left.
const LEGACY_SEQ_GAP: u64 = 1 << 32;
/// Sectors read per batch when reading a whole legacy store.
const LEGACY_BATCH: u64 = 1024;

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
    /// Shared with the handles of `copies_handle`.
    state: Arc<Mutex<State>>,
    /// Writes (redb's recovery on open) stay in memory and never reach the pool.
    read_only: bool,
    watch: Arc<StoreWatch>,
    /// Copies the stack below keeps of every byte (`mirror=N`; 1 without).
    copies: usize,
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
        copies: usize,
    ) -> io::Result<MetaStore> {
        if !(1..=MAX_COPIES).contains(&copies) {
            return Err(eio(format!(
                "{copies} copies below: a stack keeps 1 to {MAX_COPIES}"
            )));
        }
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
            state: Arc::new(Mutex::new(State {
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
            })),
            read_only,
            watch: Arc::new(StoreWatch::default()),
            copies,
        })
    }

    /// Write the root of a new, empty store, durably. For a new pool only
    /// (a fresh pool UUID): sequence numbers start over.
    pub fn format(top: Arc<dyn Layer>, region: u64, pool_uuid: [u8; 16]) -> io::Result<()> {
        let m = MetaStore::new(top, region, pool_uuid, false, 1)?;
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
    /// `format` writes the first one. `copies`: the copies the stack below
    /// keeps (`Stack::copies`); with more than one, the root is read from
    /// every copy.
    pub fn open(
        top: Arc<dyn Layer>,
        region: u64,
        pool_uuid: [u8; 16],
        read_only: bool,
        copies: usize,
    ) -> io::Result<MetaStore> {
        let m = MetaStore::new(top, region, pool_uuid, read_only, copies)?;
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
}
