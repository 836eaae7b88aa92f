//! The filesystem core, independent of FUSE: inodes, directories, extents,
//! dirty buffers, the read cache, and commits. Every operation takes the
//! filesystem lock for its duration; metadata changes are redb transactions
//! committed without durability, made durable by fsync, the commit timer and
//! unmount (each preceded by a flush of the data they reference).

use crate::alloc::{Allocator, BLOCK};
use crate::codec::{Dec, Enc};
use crate::error::FsError;
use crate::metastore::{MetaCopies, MetaStore, StoreWatch};
use crate::pool::Pool;
use lru::LruCache;
use parking_lot::Mutex;
use redb::{
    Database, Durability, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition,
    WriteTransaction,
};
use stackfs_layers::io::IoResult;
use stackfs_layers::io::{TAG_DETACHED, TAG_RAW};
use stackfs_layers::Stack;
use stackfs_layers::{Buf, Errno, ExtentTag, Io, Layer, Op, Waiter};
use std::collections::{BTreeMap, HashMap};
use std::num::NonZeroUsize;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Read table `$def` as operations under the filesystem lock see it:
/// through the group transaction when one is open (changes gathered, not
/// yet committed), else as last committed. `$body` runs with `$t` bound to
/// the table and the group's lock held: it must take no lock of the
/// filesystem's.
macro_rules! read_table {
    ($fs:expr, ($($def:expr),+), |$($t:ident),+| $body:expr) => {{
        let group = $fs.group.lock();
        match group.tx.as_ref() {
            Some(tx) => {
                $(let $t = tx.open_table($def).map_err(db_err)?;)+
                let out = $body;
                out
            }
            None => {
                group.check_untaken()?;
                let rtx = $fs.db().begin_read().map_err(db_err)?;
                $(let $t = rtx.open_table($def).map_err(db_err)?;)+
                let out = $body;
                out
            }
        }
    }};
    ($fs:expr, $def:expr, |$t:ident| $body:expr) => {
        read_table!($fs, ($def), |$t| $body)
    };
}

mod attr;
mod dirty;
mod meta_walk;
mod namespace;
mod read;
mod records;
mod rename;
mod scrub;
mod txn;
mod writeback;

#[cfg(test)]
mod tests;

pub use crate::metastore::{CopyWalk, WalkCounts};
use attr::{acl_create, ACL_ACCESS, ACL_DEFAULT};
use dirty::DirtyUnit;
use read::{copy_clipped, ReadSide};
pub use records::*;
pub use scrub::WalkStep;
use txn::{Group, Sync, Tx};

/// Logical size of a file data unit: the granule of copy-on-write and of the
/// extent map.
pub const UNIT: u64 = 64 << 10;
pub const ROOT: u64 = 1;
pub const NAME_MAX: usize = 255;
/// Dirty data kept in memory before writes push it out.
const DIRTY_LIMIT: u64 = 256 << 20;
/// Closed files with dirty data that trigger a group flush.
const CLOSED_BATCH: usize = 64;
const XATTR_SIZE_MAX: usize = 64 << 10;

/// The result of a filesystem operation: its value, or the errno the caller gets.
pub type ErrnoResult<T> = Result<T, Errno>;

/// The `Errno` of a libc error number (`errno(libc::ENOENT)`).
pub(crate) fn errno(e: i32) -> Errno {
    Errno(e)
}

/// A metadata store failure is an I/O error for the caller, logged here.
///
/// A full metadata region is ENOSPC: redb asked the store to grow and the
/// store refused (the filesystem then reopens the database, see `recover_store`).
pub(crate) fn db_err<E: Into<redb::Error>>(e: E) -> Errno {
    match e.into() {
        redb::Error::Io(io) if io.kind() == std::io::ErrorKind::StorageFull => {
            log::warn!("metadata store: {io}");
            Errno(libc::ENOSPC)
        }
        e => {
            log::error!("metadata store: {e}");
            Errno::EIO
        }
    }
}

/// Who is asking, for ownership of new files.
#[derive(Clone, Copy, Debug)]
pub struct Caller {
    pub uid: u32,
    pub gid: u32,
}

/// One directory entry as readdir returns it.
pub struct Entry {
    pub cookie: u64,
    pub ino: u64,
    pub kind: Kind,
    pub name: Vec<u8>,
}

/// The caller of a change, as Linux's set-id rules ask about it.
pub trait Privs {
    /// Whether the caller has CAP_FSETID.
    fn fsetid(&self) -> bool;
    /// Whether `gid` is the caller's filesystem group or a supplementary one.
    fn in_group(&self, gid: u32) -> bool;
}

/// A change that may take set-id bits away (`setid_loss`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SetidChange {
    /// Data: write, truncate, fallocate (hole punch, zero range), copy_file_range.
    Data,
    /// chown or chgrp, even to the same owner.
    Chown,
    /// An access ACL set (the mode it implies).
    Acl,
}

/// The set-id bits of `i` that a change by `who` removes, as Linux's VFS
/// (and so ext4) removes them:
/// - data (`setattr_should_drop_suidgid`): on regular files, when the caller
///   lacks CAP_FSETID: set-user-id, and set-group-id if the file is
///   group-executable or the caller is outside its group;
/// - chown of a non-directory (`chown_common`): set-user-id always,
///   set-group-id if group-executable, or if the caller is outside the
///   group and lacks CAP_FSETID;
/// - an access ACL (`posix_acl_update_mode`): set-group-id, directories
///   included, if the caller is outside the group and lacks CAP_FSETID.
///
/// Setgid directories keep the bit through data changes and chown.
/// `who` is asked only when the file has a set-id bit to lose.
pub fn setid_loss(i: &Inode, why: SetidChange, who: &dyn Privs) -> u16 {
    const SUID: u16 = libc::S_ISUID as u16;
    const SGID: u16 = libc::S_ISGID as u16;
    const XGRP: u16 = libc::S_IXGRP as u16;
    let bits = i.perm & (SUID | SGID);
    if bits == 0 {
        return 0;
    }
    let outsider = || !who.in_group(i.gid) && !who.fsetid();
    match why {
        SetidChange::Data if i.kind != Kind::File || who.fsetid() => 0,
        SetidChange::Data | SetidChange::Chown if i.kind == Kind::Dir => 0,
        SetidChange::Data | SetidChange::Chown => {
            let sgid = bits & SGID != 0 && (i.perm & XGRP != 0 || outsider());
            (bits & SUID) | if sgid { SGID } else { 0 }
        }
        SetidChange::Acl if bits & SGID != 0 && outsider() => SGID,
        SetidChange::Acl => 0,
    }
}

/// Changes setattr may make.
#[derive(Default, Clone, Copy)]
pub struct SetAttr {
    pub mode: Option<u32>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub size: Option<u64>,
    pub atime: Option<Ts>,
    pub mtime: Option<Ts>,
    pub ctime: Option<Ts>,
}

#[derive(Default)]
struct FileState {
    /// The inode with changes not yet committed (size, times).
    inode: Option<Inode>,
    units: BTreeMap<u64, DirtyUnit>,
    open: u32,
    /// Counted in `State::closed_dirty` (closed with data not yet written).
    in_closed_dirty: bool,
}

struct State {
    alloc: Allocator,
    /// Space freed by commits not yet durable: reusable after the next durable one.
    pending_free: Vec<(u64, u64)>,
    /// How much of `pending_free` committed transactions recorded; the rest
    /// belongs to the transaction being built (dropped if it never commits).
    pending_mark: usize,
    /// Space freed by a durable commit while reads that may still be reading
    /// it were in flight: (the commit's free generation, address, length).
    deferred_free: Vec<(u64, u64, u64)>,
    /// Generation of frees: a read in flight with a ticket at or below a
    /// deferred free's generation may still be reading that space.
    free_gen: u64,
    /// Files closed with data not yet written since the last group flush.
    closed_dirty: usize,
    files: HashMap<u64, FileState>,
    dirty_bytes: u64,
    next_ino: u64,
    next_gen: u64,
    /// Something was committed without durability since the last durable commit.
    undurable: bool,
    /// The sequence number of the last operation committed (to the group
    /// transaction or to redb).
    seq: u64,
    /// Every operation up to this sequence number is durable.
    durable_seq: u64,
    /// Inodes changed since the last durable commit, with the sequence
    /// number of their last change: what fsync waits for.
    changed: HashMap<u64, u64>,
    /// Inodes the operation in progress changes (`put_inode`).
    touching: Vec<u64>,
    /// Directories the kernel holds (see `DirRefs`).
    dirs: HashMap<u64, DirRefs>,
    /// Nearly full metadata store: its free bytes as last counted, and the
    /// transactions that added metadata since (see `begin_adding`).
    meta_free: Option<u64>,
    meta_checks: u32,
    /// Removed inodes the kernel may not have forgotten yet (see `purge`).
    gone: HashMap<u64, Inode>,
    /// A flush is writing data with the lock released (one at a time).
    flushing: bool,
    /// What that flush is writing, by file: reads, stat and partial
    /// overwrites take the inode and the units' bytes from here until the
    /// commit.
    in_flight: HashMap<u64, InFlight>,
}

/// A file's inode and units as a flush in progress took them.
struct InFlight {
    inode: Inode,
    units: BTreeMap<u64, Buf>,
}

/// The filesystem lock, held: flushes release it around their I/O.
type Guard<'a> = parking_lot::MutexGuard<'a, State>;

/// What keeps a removed directory's inode alive, as on a kernel filesystem:
/// open handles (opendir without releasedir) and the kernel's lookup count
/// (entries replied by lookup, mkdir and readdirplus, not yet forgotten: a
/// process's working directory, a path being walked). A directory removed
/// while held stays in `orphans` with no links until both reach zero.
#[derive(Default, Debug)]
struct DirRefs {
    open: u32,
    lookups: u64,
    /// Removed while held (in `orphans`, unless that commit failed).
    removed: bool,
}

/// Stops the stack's threads when the filesystem is dropped, after the
/// metadata store (declared before it) has written its last bytes.
struct StackGuard(Arc<dyn Layer>);

impl Drop for StackGuard {
    fn drop(&mut self) {
        self.0.shutdown();
    }
}

pub struct Fs {
    /// Operations' changes gathered, not yet committed to redb (dropped
    /// first: an open transaction keeps the database open).
    group: Mutex<Group>,
    /// The metadata database. Replaced only when the store was full (see
    /// `recover_store`); use `db()`.
    db: parking_lot::RwLock<Database>,
    /// What the metadata store tells about itself (space, damage).
    store: Mutex<Arc<StoreWatch>>,
    /// The metadata store's handle for walks over its copies (scrub,
    /// resync); replaced with `store`.
    meta_copies: Mutex<Arc<MetaCopies>>,
    _stop: StackGuard,
    /// The outcome of `shutdown`, once it ran (later calls return it again).
    closed: Mutex<Option<ErrnoResult<()>>>,
    /// Set once, when a metadata failure turned the filesystem read-only.
    failure: std::sync::OnceLock<String>,
    /// File data enters the stack here (the top); metadata enters below
    /// compression (`Stack::meta`, given to the metadata store).
    data: Arc<dyn Layer>,
    state: Mutex<State>,
    /// Signalled when a flush that released the lock has committed.
    flush_done: parking_lot::Condvar,
    /// The commit thread's wake-up, while it runs (`commit_every`).
    writeback: Mutex<Option<Arc<(Mutex<writeback::Wake>, parking_lot::Condvar)>>>,
    /// What reads share with their completions, which run without `state`.
    reads: Arc<ReadSide>,
    read_only: bool,
    /// What redb's integrity check found at open (fsck, or after the
    /// metadata store fell back to its older root copy).
    store_problem: Option<String>,
    /// The mount's atime and sync rules (remount can change them).
    policy: Mutex<MountPolicy>,
    /// The layers the filesystem runs over.
    pub stack: Stack,
    pub geometry: Geometry,
    /// The pool (devices, superblocks, ownership), when opened from one.
    pub pool: Option<Pool>,
}

/// Where the metadata store lives in a stack, and whose it is.
#[derive(Clone, Copy, Debug)]
pub struct Geometry {
    /// The metadata region: bytes `0..meta_len` of the metadata layer.
    pub meta_len: u64,
    /// The pool's UUID, recorded in the store's root.
    pub pool_uuid: [u8; 16],
}

/// The metadata store of a stack, and redb over it; the store's handles.
fn open_database(
    stack: &Stack,
    geometry: Geometry,
    read_only: bool,
) -> Result<(Database, Arc<StoreWatch>, Arc<MetaCopies>), FsError> {
    let store = MetaStore::open(
        stack.meta.clone(),
        geometry.meta_len,
        geometry.pool_uuid,
        read_only,
        stack.copies(),
    )
    .map_err(FsError::damaged)?;
    let watch = store.watch();
    let copies = store.copies_handle();
    let db = Database::builder()
        .set_cache_size(64 << 20)
        .create_with_backend(store)
        .map_err(|e| FsError::damaged(format!("metadata store: {e}")))?;
    Ok((db, watch, copies))
}

/// After the store's root was read from its older copy (a torn root write,
/// or damage), and for fsck and tools (lenient), redb checks every page
/// first; the store holds its writes in memory until then. The problem found,
/// if any (an error unless lenient).
fn check_store(
    db: &mut Database,
    watch: &StoreWatch,
    lenient: bool,
) -> Result<Option<String>, FsError> {
    let fell_back = watch.fell_back();
    if let Some(why) = &fell_back {
        log::warn!("metadata store: {why}; checking the database's integrity");
    }
    if fell_back.is_none() && !lenient {
        return Ok(None);
    }
    let problem = match db.check_integrity() {
        Ok(true) => None,
        Ok(false) => Some("redb's integrity check found damage and repaired it".into()),
        Err(e) => Some(format!("redb's integrity check failed: {e}")),
    };
    if let (Some(why), Some(p), false) = (&fell_back, &problem, lenient) {
        return Err(FsError::damaged(format!(
            "metadata store: {why}, and {p}; run stackfs fsck"
        )));
    }
    Ok(problem)
}

/// The free space (everything in the data region no extent uses) and the
/// inode and generation counters, from the committed metadata.
fn load_allocation(
    db: &Database,
    meta_len: u64,
    capacity: u64,
    lenient: bool,
) -> Result<(Allocator, u64, u64), FsError> {
    let store_err = |e: redb::Error| FsError::damaged(format!("metadata store: {e}"));
    let rtx = db.begin_read().map_err(|e| store_err(e.into()))?;
    let mut used = Vec::new();
    if let Ok(t) = rtx.open_table(EXTENTS) {
        for row in t.iter().map_err(|e| store_err(e.into()))? {
            let (k, v) = row.map_err(|e| store_err(e.into()))?;
            let x = Extent::decode(v.value()).map_err(|_| {
                FsError::damaged(format!("extent of inode {} is malformed", k.value().0))
            })?;
            used.push((x.phys, x.reserved_len as u64));
        }
    }
    let counter = |name: &str, default: u64| {
        let t = rtx.open_table(COUNTERS).ok()?;
        let v = t.get(name).ok().flatten().map(|v| v.value());
        Some(v.unwrap_or(default))
    };
    let next_ino = counter("next_ino", ROOT + 1).unwrap_or(ROOT + 1);
    let next_gen = counter("next_gen", 1).unwrap_or(1);
    let alloc = match Allocator::from_used(meta_len, capacity, used.clone()) {
        Ok(a) => a,
        // fsck must open what it is asked to repair: take the union.
        Err(_) if lenient => Allocator::from_union(meta_len, capacity, used),
        Err(e) => {
            return Err(FsError::damaged(format!(
                "extent map is inconsistent: {e} (run stackfs fsck)"
            )))
        }
    };
    Ok((alloc, next_ino, next_gen))
}

/// The data of an extent map, as written and as stored.
fn space_of(t: &impl ReadableTable<(u64, u64), &'static [u8]>) -> ErrnoResult<Space> {
    let mut sp = Space {
        logical: 0,
        stored: 0,
    };
    for row in t.iter().map_err(db_err)? {
        let x = Extent::decode(row.map_err(db_err)?.1.value())?;
        sp.logical += x.data_len as u64;
        sp.stored += x.reserved_len as u64;
    }
    Ok(sp)
}

/// A second handle on the same layers.
pub fn share(stack: &Stack) -> Stack {
    Stack {
        top: stack.top.clone(),
        meta: stack.meta.clone(),
        fault: stack.fault.clone(),
        health: stack.health.clone(),
        bays: stack.bays.clone(),
    }
}

/// The message of a caught panic.
pub fn panic_text(p: &(dyn std::any::Any + Send)) -> String {
    p.downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unreadable data".into())
}

/// What the mount options ask of the daemon itself.
#[derive(Clone, Copy, Debug)]
pub struct MountPolicy {
    pub atime: crate::atime::AtimeMode,
    pub nodiratime: bool,
    /// `sync` or `dirsync`: every metadata change is committed durably.
    pub sync_metadata: bool,
}

pub struct FsOptions {
    pub read_only: bool,
    pub cache_bytes: u64,
    /// Open even an inconsistent extent map (fsck).
    pub lenient: bool,
    /// The atime options given (relatime when none is).
    pub atime: crate::atime::AtimePolicy,
    pub sync_metadata: bool,
}

impl Default for FsOptions {
    fn default() -> Self {
        FsOptions {
            read_only: false,
            cache_bytes: 256 << 20,
            lenient: false,
            atime: crate::atime::AtimePolicy::default(),
            sync_metadata: false,
        }
    }
}

/// Bytes of file data, as written and as stored.
pub struct Space {
    pub logical: u64,
    pub stored: u64,
}

/// Counters the statfs and info commands show.
pub struct Usage {
    pub total: u64,
    pub free: u64,
    pub inodes: u64,
}

impl Fs {
    /// Open the filesystem in a pool; on a fresh pool, create the root.
    ///
    /// redb trusts what it reads: a store it cannot parse may make it panic
    /// anywhere while the filesystem opens. That is damage to name, not a
    /// crash: the panic is caught here and reported as such.
    pub fn open(pool: Pool, opts: FsOptions) -> Result<Fs, FsError> {
        let geometry = Geometry {
            meta_len: pool.sb.meta_len,
            pool_uuid: pool.sb.pool_uuid,
        };
        let mut fs = Fs::open_on(share(&pool.stack), geometry, opts)?;
        fs.pool = Some(pool);
        Ok(fs)
    }

    /// Open the filesystem over any layer stack (a pool's, or `mem` and
    /// `fault` stacks in tests) whose metadata region `geometry` describes.
    pub fn open_on(stack: Stack, geometry: Geometry, opts: FsOptions) -> Result<Fs, FsError> {
        let opened = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            Fs::open_inner(stack, geometry, opts)
        }));
        match opened {
            Ok(r) => r,
            Err(p) => Err(FsError::damaged(format!(
                "metadata store is damaged: {} (run stackfs fsck)",
                panic_text(&*p)
            ))),
        }
    }

    /// Write an empty metadata store (its first root) over a fresh stack.
    pub fn format(stack: &Stack, geometry: Geometry) -> Result<(), FsError> {
        MetaStore::format(stack.meta.clone(), geometry.meta_len, geometry.pool_uuid).map_err(|e| {
            FsError::io(
                format!("writing the metadata store's root: {e}"),
                Errno::EIO,
            )
        })
    }

    fn open_inner(stack: Stack, geometry: Geometry, opts: FsOptions) -> Result<Fs, FsError> {
        let top = stack.top.clone();
        let meta_len = geometry.meta_len;
        let (mut db, watch, meta_copies) = open_database(&stack, geometry, opts.read_only)?;
        let store_problem = check_store(&mut db, &watch, opts.lenient)?;
        watch.release();
        let (alloc, next_ino, next_gen) =
            load_allocation(&db, meta_len, top.capacity(), opts.lenient)?;
        let cache_units = (opts.cache_bytes / UNIT).max(16) as usize;
        let fs = Fs {
            group: Mutex::new(Group::default()),
            db: parking_lot::RwLock::new(db),
            store: Mutex::new(watch.clone()),
            meta_copies: Mutex::new(meta_copies),
            _stop: StackGuard(top.clone()),
            closed: Mutex::new(None),
            failure: std::sync::OnceLock::new(),
            data: top,
            state: Mutex::new(State {
                alloc,
                pending_free: Vec::new(),
                pending_mark: 0,
                deferred_free: Vec::new(),
                free_gen: 0,
                closed_dirty: 0,
                files: HashMap::new(),
                dirty_bytes: 0,
                next_ino,
                next_gen,
                undurable: false,
                dirs: HashMap::new(),
                meta_free: None,
                meta_checks: 0,
                gone: HashMap::new(),
                flushing: false,
                in_flight: HashMap::new(),
                seq: 0,
                durable_seq: 0,
                changed: HashMap::new(),
                touching: Vec::new(),
            }),
            flush_done: parking_lot::Condvar::new(),
            writeback: Mutex::new(None),
            reads: Arc::new(ReadSide {
                cache: Mutex::new(LruCache::new(
                    NonZeroUsize::new(cache_units).expect("non-zero"),
                )),
                cache_gen: std::sync::atomic::AtomicU64::new(0),
                readers: Mutex::new(BTreeMap::new()),
            }),
            read_only: opts.read_only,
            store_problem,
            policy: Mutex::new({
                let (atime, nodiratime) =
                    opts.atime.over((crate::atime::AtimeMode::Relatime, false));
                MountPolicy {
                    atime,
                    nodiratime,
                    sync_metadata: opts.sync_metadata,
                }
            }),
            stack,
            geometry,
            pool: None,
        };
        if !fs.read_only {
            // A damaged sector reaches us from redb as a bare I/O error: name it.
            let named = |what: &str, e: Errno| match watch.damage() {
                Some(d) => FsError::damaged(format!("{what}: {e}; {d}")),
                None => FsError::io(what, e),
            };
            fs.init_root()
                .map_err(|e| named("creating the root directory", e))?;
            fs.purge_orphans()
                .map_err(|e| named("removing orphaned files", e))?;
        }
        Ok(fs)
    }

    /// The metadata store's integrity problem found at open, if any (the
    /// check runs when lenient, or after a fallback to the older root).
    pub fn store_problem(&self) -> Option<&str> {
        self.store_problem.as_deref()
    }

    pub(super) fn init_root(&self) -> ErrnoResult<()> {
        let mut state = self.state.lock();
        let tx = self.begin_tx(&mut *state)?;
        {
            if tx.read(INODES)?.get(ROOT).map_err(db_err)?.is_some() {
                return Ok(());
            }
            let root = Inode::new_dir(ROOT, 0o755, ROOT);
            let mut t = tx.write(INODES)?;
            t.insert(ROOT, root.encode().as_slice()).map_err(db_err)?;
            tx.write(DIRENTS)?;
            tx.write(COOKIES)?;
            tx.write(EXTENTS)?;
            tx.write(XATTRS)?;
            tx.write(SYMLINKS)?;
            tx.write(ORPHANS)?;
            tx.write(COUNTERS)?;
        }
        self.commit(&mut state, tx, true)
    }

    pub fn usage(&self) -> ErrnoResult<Usage> {
        let state = self.state.lock();
        let inodes = match self.group.lock().tx.as_ref() {
            Some(tx) => tx
                .open_table(INODES)
                .map_err(db_err)?
                .len()
                .map_err(db_err)?,
            None => {
                let rtx = self.db().begin_read().map_err(db_err)?;
                // A pool that was never mounted read-write has no tables yet.
                match rtx.open_table(INODES) {
                    Ok(t) => t.len().map_err(db_err)?,
                    Err(redb::TableError::TableDoesNotExist(_)) => 0,
                    Err(e) => return Err(db_err(e)),
                }
            }
        };
        let pending: u64 = state.pending_free.iter().map(|(_, l)| l).sum::<u64>()
            + state.deferred_free.iter().map(|(_, _, l)| l).sum::<u64>();
        Ok(Usage {
            total: state.alloc.total_bytes(),
            free: (state.alloc.free_bytes() + pending).saturating_sub(state.dirty_bytes),
            inodes,
        })
    }

    /// File data as written (logical) and as stored in the pool: scans the extent map.
    pub fn space(&self) -> ErrnoResult<Space> {
        let _state = self.state.lock();
        let group = self.group.lock();
        if let Some(tx) = group.tx.as_ref() {
            return space_of(&tx.open_table(EXTENTS).map_err(db_err)?);
        }
        drop(group);
        let rtx = self.db().begin_read().map_err(db_err)?;
        match rtx.open_table(EXTENTS) {
            Ok(t) => space_of(&t),
            Err(redb::TableError::TableDoesNotExist(_)) => Ok(Space {
                logical: 0,
                stored: 0,
            }),
            Err(e) => Err(db_err(e)),
        }
    }

    /// Make everything durable and refuse further syncs; the stack stops
    /// when the last handle on the filesystem is dropped.
    pub fn shutdown(&self) -> ErrnoResult<()> {
        let mut closed = self.closed.lock();
        if let Some(outcome) = *closed {
            return outcome;
        }
        let outcome = self.shut_down();
        if let Err(e) = outcome {
            log::error!("unmount: dirty data or metadata could not be written: {e}");
        }
        *closed = Some(outcome);
        outcome
    }

    fn shut_down(&self) -> ErrnoResult<()> {
        if self.read_only {
            return Ok(());
        }
        if self.failed() {
            // A member stopped answering or a commit failed: nothing more is
            // written; the pool stays in its last durable state (fsck it).
            return Err(if self.stack.health.lost() {
                Errno::EIO
            } else {
                Errno::EROFS
            });
        }
        // The session is over: nothing can hold a removed file any more.
        match self.purge_all_orphans() {
            Ok(0) => {}
            Ok(n) => log::debug!("freed {n} removed file(s) still held at unmount"),
            Err(e) => log::warn!("freeing removed files at unmount: {e} (freed at next mount)"),
        }
        let mut state = self.state.lock();
        self.flush_all(&mut state, true)
    }
}
