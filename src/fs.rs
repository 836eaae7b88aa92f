//! The filesystem core, independent of FUSE: inodes, directories, extents,
//! dirty buffers, the read cache, and commits. Every operation takes the
//! filesystem lock for its duration; metadata changes are redb transactions
//! committed without durability, made durable by fsync, the commit timer and
//! unmount (each preceded by a flush of the data they reference).

use crate::alloc::{Allocator, BLOCK};
use crate::codec::{Dec, Enc};
use crate::error::FsError;
use crate::metastore::MetaStore;
use crate::pool::Pool;
use lru::LruCache;
use parking_lot::Mutex;
use redb::{
    Database, Durability, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition,
    WriteTransaction,
};
use stackfs_layers::io::IoResult;
use stackfs_layers::io::{TAG_DETACHED, TAG_RAW};
use stackfs_layers::{Buf, Errno, ExtentTag, Io, Layer, Op, Waiter};
use std::collections::{BTreeMap, HashMap};
use std::num::NonZeroUsize;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

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

pub(crate) const INODES: TableDefinition<u64, &[u8]> = TableDefinition::new("inodes");
pub(crate) const DIRENTS: TableDefinition<(u64, &[u8]), &[u8]> = TableDefinition::new("dirents");
pub(crate) const COOKIES: TableDefinition<(u64, u64), &[u8]> = TableDefinition::new("cookies");
pub(crate) const EXTENTS: TableDefinition<(u64, u64), &[u8]> = TableDefinition::new("extents");
pub(crate) const XATTRS: TableDefinition<(u64, &[u8]), &[u8]> = TableDefinition::new("xattrs");
pub(crate) const SYMLINKS: TableDefinition<u64, &[u8]> = TableDefinition::new("symlinks");
pub(crate) const ORPHANS: TableDefinition<u64, ()> = TableDefinition::new("orphans");
const COUNTERS: TableDefinition<&str, u64> = TableDefinition::new("counters");

pub type R<T> = Result<T, Errno>;

fn err(e: i32) -> Errno {
    Errno(e)
}

/// A metadata store failure is an I/O error for the caller, logged here.
fn db_err(e: impl std::fmt::Display) -> Errno {
    log::error!("metadata store: {e}");
    Errno::EIO
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    File,
    Dir,
    Symlink,
    Fifo,
    Socket,
    Char,
    Block,
}

impl Kind {
    fn code(self) -> u8 {
        self as u8
    }
    fn from_code(c: u8) -> Option<Kind> {
        Some(match c {
            0 => Kind::File,
            1 => Kind::Dir,
            2 => Kind::Symlink,
            3 => Kind::Fifo,
            4 => Kind::Socket,
            5 => Kind::Char,
            6 => Kind::Block,
            _ => return None,
        })
    }
    pub fn from_mode(mode: u32) -> Option<Kind> {
        Some(match mode & libc::S_IFMT {
            libc::S_IFREG | 0 => Kind::File,
            libc::S_IFDIR => Kind::Dir,
            libc::S_IFLNK => Kind::Symlink,
            libc::S_IFIFO => Kind::Fifo,
            libc::S_IFSOCK => Kind::Socket,
            libc::S_IFCHR => Kind::Char,
            libc::S_IFBLK => Kind::Block,
            _ => return None,
        })
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Ts {
    pub sec: i64,
    pub nsec: u32,
}

impl Ts {
    pub fn now() -> Ts {
        Ts::from(SystemTime::now())
    }
    pub fn to_system(self) -> SystemTime {
        if self.sec >= 0 {
            UNIX_EPOCH + Duration::new(self.sec as u64, self.nsec)
        } else {
            UNIX_EPOCH - Duration::from_secs(self.sec.unsigned_abs())
                + Duration::from_nanos(self.nsec as u64)
        }
    }
}

impl From<SystemTime> for Ts {
    fn from(t: SystemTime) -> Ts {
        match t.duration_since(UNIX_EPOCH) {
            Ok(d) => Ts {
                sec: d.as_secs() as i64,
                nsec: d.subsec_nanos(),
            },
            Err(e) => {
                let d = e.duration();
                let (mut sec, mut nsec) = (-(d.as_secs() as i64), d.subsec_nanos());
                if nsec > 0 {
                    sec -= 1;
                    nsec = 1_000_000_000 - nsec;
                }
                Ts { sec, nsec }
            }
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Inode {
    pub ino: u64,
    pub kind: Kind,
    pub perm: u16,
    pub uid: u32,
    pub gid: u32,
    pub nlink: u32,
    pub size: u64,
    /// Bytes of pool space its extents take.
    pub stored: u64,
    pub atime: Ts,
    pub mtime: Ts,
    pub ctime: Ts,
    pub crtime: Ts,
    pub rdev: u32,
    pub generation: u64,
    /// Directories: the parent directory.
    pub parent: u64,
    /// Directories: next counter cookie. Entries made before readdir
    /// cookies were hashed have counter cookies (below `HASHED_COOKIE_MIN`);
    /// only fsck still hands these out (lost+found and its entries).
    pub next_cookie: u64,
}

impl Inode {
    /// An empty directory owned by root (the root itself, lost+found).
    pub(crate) fn new_dir(ino: u64, perm: u16, parent: u64) -> Inode {
        let now = Ts::now();
        Inode {
            ino,
            kind: Kind::Dir,
            perm,
            uid: 0,
            gid: 0,
            nlink: 2,
            size: 0,
            stored: 0,
            atime: now,
            mtime: now,
            ctime: now,
            crtime: now,
            rdev: 0,
            generation: 0,
            parent,
            next_cookie: 3,
        }
    }

    pub(crate) fn encode(&self) -> Vec<u8> {
        let mut e = Enc::default();
        e.u8(1)
            .u8(self.kind.code())
            .u16(self.perm)
            .u32(self.uid)
            .u32(self.gid)
            .u32(self.nlink);
        e.u64(self.size).u64(self.stored);
        for t in [self.atime, self.mtime, self.ctime, self.crtime] {
            e.i64(t.sec).u32(t.nsec);
        }
        e.u32(self.rdev)
            .u64(self.generation)
            .u64(self.parent)
            .u64(self.next_cookie);
        e.0
    }

    pub(crate) fn decode(ino: u64, raw: &[u8]) -> R<Inode> {
        let bad = |_| {
            log::error!("inode {ino}: record is malformed");
            Errno::EIO
        };
        let mut d = Dec::new(raw);
        if d.u8().map_err(bad)? != 1 {
            log::error!("inode {ino}: unknown record version");
            return Err(Errno::EIO);
        }
        let kind = Kind::from_code(d.u8().map_err(bad)?).ok_or_else(|| {
            log::error!("inode {ino}: unknown file type");
            Errno::EIO
        })?;
        let ts = |d: &mut Dec| -> R<Ts> {
            Ok(Ts {
                sec: d.i64().map_err(bad)?,
                nsec: d.u32().map_err(bad)?,
            })
        };
        let (perm, uid, gid, nlink) = (
            d.u16().map_err(bad)?,
            d.u32().map_err(bad)?,
            d.u32().map_err(bad)?,
            d.u32().map_err(bad)?,
        );
        let (size, stored) = (d.u64().map_err(bad)?, d.u64().map_err(bad)?);
        let (atime, mtime, ctime, crtime) = (ts(&mut d)?, ts(&mut d)?, ts(&mut d)?, ts(&mut d)?);
        Ok(Inode {
            ino,
            kind,
            perm,
            uid,
            gid,
            nlink,
            size,
            stored,
            atime,
            mtime,
            ctime,
            crtime,
            rdev: d.u32().map_err(bad)?,
            generation: d.u64().map_err(bad)?,
            parent: d.u64().map_err(bad)?,
            next_cookie: d.u64().map_err(bad)?,
        })
    }

    pub fn blocks(&self) -> u64 {
        self.stored.div_ceil(512)
    }
}

/// Where one unit of a file lives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Extent {
    /// Pool address of the stored bytes.
    pub phys: u64,
    /// Pool space reserved (a multiple of 4 KiB).
    pub alloc: u32,
    /// Bytes of file data the unit holds; the rest of the unit reads as zeros.
    pub logical: u32,
    /// Bytes the filesystem wrote (the data rounded up to 4 KiB).
    pub len: u32,
    /// Compression codec (0: raw) and compressed length, from the extent tag.
    pub codec: u8,
    pub stored: u32,
    /// The crypt layer's nonce and key id (12 bytes each) and MAC (zeros
    /// without crypt), from the extent tag. Records of version 1 (before
    /// per-mount keys) have no key id: zeros, the master key.
    pub nonce: [u8; 24],
    pub mac: [u8; 16],
    /// CRC32C of the `len` bytes written (before any layer transformed them).
    pub crc: u32,
    /// Bit i set: 4 KiB block i of the unit holds non-zero bytes. Blocks of
    /// zeros are reported as holes by SEEK_DATA/SEEK_HOLE.
    pub map: u16,
}

/// Which 4 KiB blocks of a unit's bytes are not all zero.
fn block_map(data: &[u8]) -> u16 {
    data.chunks(BLOCK as usize)
        .enumerate()
        .filter(|(_, b)| b.iter().any(|x| *x != 0))
        .fold(0, |m, (i, _)| m | 1 << i)
}

impl Extent {
    /// What the layers need to read this extent back.
    fn tag(&self) -> ExtentTag {
        ExtentTag {
            codec: self.codec,
            logical_len: self.len,
            stored_len: self.stored,
            nonce: self.nonce,
            mac: self.mac,
            flags: TAG_DETACHED,
        }
    }

    pub(crate) fn encode(&self) -> Vec<u8> {
        let mut e = Enc::default();
        e.u8(2)
            .u64(self.phys)
            .u32(self.alloc)
            .u32(self.logical)
            .u32(self.len)
            .u8(self.codec)
            .u32(self.stored)
            .bytes(&self.nonce)
            .bytes(&self.mac)
            .u32(self.crc)
            .u16(self.map);
        e.0
    }
    pub fn decode(raw: &[u8]) -> R<Extent> {
        let mut d = Dec::new(raw);
        let bad = |_| Errno::EIO;
        let version = d.u8().map_err(bad)?;
        if version != 1 && version != 2 {
            return Err(Errno::EIO);
        }
        Ok(Extent {
            phys: d.u64().map_err(bad)?,
            alloc: d.u32().map_err(bad)?,
            logical: d.u32().map_err(bad)?,
            len: d.u32().map_err(bad)?,
            codec: d.u8().map_err(bad)?,
            stored: d.u32().map_err(bad)?,
            nonce: if version == 1 {
                let mut n = [0u8; 24];
                n[..12].copy_from_slice(&d.array::<12>().map_err(bad)?);
                n
            } else {
                d.array().map_err(bad)?
            },
            mac: d.array().map_err(bad)?,
            crc: d.u32().map_err(bad)?,
            map: d.u16().map_err(bad)?,
        })
    }
}

pub(crate) fn dirent_val(ino: u64, kind: Kind, cookie: u64) -> Vec<u8> {
    let mut e = Enc::default();
    e.u64(ino).u8(kind.code()).u64(cookie);
    e.0
}

pub(crate) fn dirent_decode(raw: &[u8]) -> R<(u64, Kind, u64)> {
    let mut d = Dec::new(raw);
    let ino = d.u64().map_err(|_| Errno::EIO)?;
    let kind = d.u8().ok().and_then(Kind::from_code).ok_or(Errno::EIO)?;
    let cookie = d.u64().map_err(|_| Errno::EIO)?;
    Ok((ino, kind, cookie))
}

/// Readdir cookies of entries made since cookies are hashed lie in
/// `[HASHED_COOKIE_MIN, HASHED_COOKIE_MAX]`: above the counter cookies of
/// older entries (and of fsck's lost+found), which stay where they are, and
/// within a positive `off_t`, which is what the kernel takes as an offset.
const HASHED_COOKIE_MIN: u64 = 1 << 32;
const HASHED_COOKIE_MAX: u64 = i64::MAX as u64;

/// Where a name sits in its directory's readdir order, as ext4's htree does:
/// a hash of the name, so that a name renamed away and back (or removed and
/// made again) returns to the same place, and a directory stream that has
/// passed it does not return it a second time. The hash (FNV-1a, then
/// murmur3's 64-bit finalizer to spread it) is part of the format: it must
/// never change. A cookie already taken moves the entry to the next free one
/// (`next_cookie`).
pub(crate) fn name_cookie(name: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in name {
        h ^= b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^= h >> 33;
    HASHED_COOKIE_MIN + h % (HASHED_COOKIE_MAX - HASHED_COOKIE_MIN + 1)
}

/// The cookie probed after `c` when `c` is taken (wrapping within the range).
pub(crate) fn next_cookie(c: u64) -> u64 {
    if c >= HASHED_COOKIE_MAX {
        HASHED_COOKIE_MIN
    } else {
        c + 1
    }
}

#[cfg(test)]
mod cookie_tests {
    use super::*;

    #[test]
    fn name_cookies_never_change_and_stay_in_their_range() {
        // Stored in every directory: these values are part of the format.
        assert_eq!(name_cookie(b""), 8056974242263673126);
        assert_eq!(name_cookie(b"a"), 189900341162987099);
        assert_eq!(name_cookie(b"file-0"), 5166489117844868908);
        assert_eq!(name_cookie(b"lost+found"), 3517208211732230986);
        for i in 0..10_000 {
            let c = name_cookie(format!("f{i}").as_bytes());
            assert!((HASHED_COOKIE_MIN..=HASHED_COOKIE_MAX).contains(&c));
        }
        assert_eq!(next_cookie(HASHED_COOKIE_MAX), HASHED_COOKIE_MIN);
        assert_eq!(next_cookie(HASHED_COOKIE_MIN), HASHED_COOKIE_MIN + 1);
        assert!(HASHED_COOKIE_MAX <= i64::MAX as u64 && HASHED_COOKIE_MIN > 2);
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

struct DirtyUnit {
    /// The whole unit, page-aligned: written below as it is (no copy).
    data: Buf,
    /// Store even if all zeros (space preallocated by fallocate).
    keep: bool,
}

impl DirtyUnit {
    /// The unit's bytes to change. Normally the buffer is ours alone; if a
    /// finished write's request still holds it for a moment (a failed flush
    /// put the unit back), change a copy rather than what it may still read.
    fn bytes_mut(&mut self) -> &mut [u8] {
        if !self.data.is_unique() {
            self.data = Buf::copy_from(self.data.as_slice());
        }
        self.data.as_mut_slice()
    }
}

#[derive(Default)]
struct FileState {
    /// The inode with changes not yet committed (size, times).
    inode: Option<Inode>,
    units: BTreeMap<u64, DirtyUnit>,
    open: u32,
    /// Counted in `State::closed_dirty` (closed with data not yet written).
    counted: bool,
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
    /// Directories the kernel holds (see `DirRefs`).
    dirs: HashMap<u64, DirRefs>,
}

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

/// The part of the read path that completions reach from the device threads,
/// without the filesystem lock.
struct ReadSide {
    /// Decoded units as read from the pool (their stored length; bytes past
    /// it read as zeros).
    cache: Mutex<LruCache<(u64, u64), Buf>>,
    /// Bumped (under the cache lock) whenever a unit leaves the cache because
    /// its data changed: a read that started before must not put its older
    /// copy back.
    cache_gen: std::sync::atomic::AtomicU64,
    /// Reads in flight by free-generation ticket (how many hold each).
    readers: Mutex<BTreeMap<u64, usize>>,
}

impl ReadSide {
    fn uncache(&self, ino: u64, unit: u64) {
        let mut c = self.cache.lock();
        self.cache_gen
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        c.pop(&(ino, unit));
    }

    fn generation(&self) -> u64 {
        let _c = self.cache.lock();
        self.cache_gen.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Cache a unit read from the pool, unless its data changed since `gen`.
    fn put(&self, key: (u64, u64), data: Buf, gen: u64) {
        let mut c = self.cache.lock();
        if self.cache_gen.load(std::sync::atomic::Ordering::Relaxed) == gen {
            c.put(key, data);
        }
    }

    fn enter(&self, ticket: u64) {
        *self.readers.lock().entry(ticket).or_default() += 1;
    }

    fn leave(&self, ticket: u64) {
        let mut r = self.readers.lock();
        if let Some(n) = r.get_mut(&ticket) {
            *n -= 1;
            if *n == 0 {
                r.remove(&ticket);
            }
        }
    }

    /// The lowest ticket of a read in flight.
    fn oldest(&self) -> Option<u64> {
        self.readers.lock().keys().next().copied()
    }
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
    pub(crate) db: Database,
    _stop: StackGuard,
    closed: std::sync::atomic::AtomicBool,
    /// File data enters the stack here (the top); metadata enters below
    /// compression (`Stack::meta`, given to the metadata store).
    data: Arc<dyn Layer>,
    st: Mutex<State>,
    /// What reads share with their completions, which run without `st`.
    rd: Arc<ReadSide>,
    read_only: bool,
    /// What redb's integrity check found at open (fsck, or after the
    /// metadata store fell back to its older root copy).
    store_problem: Option<String>,
    /// The mount's atime and sync rules (remount can change them).
    policy: Mutex<MountPolicy>,
    pub pool: Pool,
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
        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| Fs::open_inner(pool, opts)))
        {
            Ok(r) => r,
            Err(p) => Err(FsError::damaged(format!(
                "metadata store is damaged: {} (run stackfs fsck)",
                panic_text(&*p)
            ))),
        }
    }

    fn open_inner(pool: Pool, opts: FsOptions) -> Result<Fs, FsError> {
        let top = pool.stack.top.clone();
        let meta_len = pool.sb.meta_len;
        let store = MetaStore::open(
            pool.stack.meta.clone(),
            meta_len,
            pool.sb.pool_uuid,
            opts.read_only,
        )
        .map_err(FsError::damaged)?;
        let watch = store.watch();
        let mut db = Database::builder()
            .set_cache_size(64 << 20)
            .create_with_backend(store)
            .map_err(|e| FsError::damaged(format!("metadata store: {e}")))?;
        // After the store's root was read from its older copy (a torn root
        // write, or damage), and for fsck and tools (lenient), redb checks
        // every page first; the store holds its writes in memory until then.
        let fell_back = watch.fell_back();
        if let Some(why) = &fell_back {
            log::warn!("metadata store: {why}; checking the database's integrity");
        }
        let mut store_problem = None;
        if fell_back.is_some() || opts.lenient {
            store_problem = match db.check_integrity() {
                Ok(true) => None,
                Ok(false) => Some("redb's integrity check found damage and repaired it".into()),
                Err(e) => Some(format!("redb's integrity check failed: {e}")),
            };
            if let (Some(why), Some(p), false) = (&fell_back, &store_problem, opts.lenient) {
                return Err(FsError::damaged(format!(
                    "metadata store: {why}, and {p}; run stackfs fsck"
                )));
            }
        }
        watch.release();
        let capacity = top.capacity();
        let mut used = Vec::new();
        let (mut next_ino, mut next_gen) = (ROOT + 1, 1);
        {
            let store_err = |e: redb::Error| FsError::damaged(format!("metadata store: {e}"));
            let rtx = db.begin_read().map_err(|e| store_err(e.into()))?;
            if let Ok(t) = rtx.open_table(EXTENTS) {
                for row in t.iter().map_err(|e| store_err(e.into()))? {
                    let (k, v) = row.map_err(|e| store_err(e.into()))?;
                    let x = Extent::decode(v.value()).map_err(|_| {
                        FsError::damaged(format!("extent of inode {} is malformed", k.value().0))
                    })?;
                    used.push((x.phys, x.alloc as u64));
                }
            }
            if let Ok(t) = rtx.open_table(COUNTERS) {
                next_ino = t
                    .get("next_ino")
                    .ok()
                    .flatten()
                    .map(|v| v.value())
                    .unwrap_or(next_ino);
                next_gen = t
                    .get("next_gen")
                    .ok()
                    .flatten()
                    .map(|v| v.value())
                    .unwrap_or(next_gen);
            }
        }
        let alloc = match Allocator::from_used(meta_len, capacity, used.clone()) {
            Ok(a) => a,
            // fsck must open what it is asked to repair: take the union.
            Err(_) if opts.lenient => Allocator::from_union(meta_len, capacity, used),
            Err(e) => {
                return Err(FsError::damaged(format!(
                    "extent map is inconsistent: {e} (run stackfs fsck)"
                )))
            }
        };
        let cache_units = (opts.cache_bytes / UNIT).max(16) as usize;
        let fs = Fs {
            db,
            _stop: StackGuard(top.clone()),
            closed: std::sync::atomic::AtomicBool::new(false),
            data: top,
            st: Mutex::new(State {
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
            }),
            rd: Arc::new(ReadSide {
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
            pool,
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

    fn init_root(&self) -> R<()> {
        let mut st = self.st.lock();
        let tx = self.begin_tx(&mut *st)?;
        {
            let mut t = tx.open_table(INODES).map_err(db_err)?;
            if t.get(ROOT).map_err(db_err)?.is_some() {
                return Ok(());
            }
            let root = Inode::new_dir(ROOT, 0o755, ROOT);
            t.insert(ROOT, root.encode().as_slice()).map_err(db_err)?;
            tx.open_table(DIRENTS).map_err(db_err)?;
            tx.open_table(COOKIES).map_err(db_err)?;
            tx.open_table(EXTENTS).map_err(db_err)?;
            tx.open_table(XATTRS).map_err(db_err)?;
            tx.open_table(SYMLINKS).map_err(db_err)?;
            tx.open_table(ORPHANS).map_err(db_err)?;
            let mut c = tx.open_table(COUNTERS).map_err(db_err)?;
            c.insert("next_ino", st.next_ino).map_err(db_err)?;
            c.insert("next_gen", st.next_gen).map_err(db_err)?;
        }
        self.commit(&mut st, tx, true)
    }

    fn purge_orphans(&self) -> R<()> {
        let n = self.purge_all_orphans()?;
        if n > 0 {
            log::info!("removed {n} orphaned file(s) left by an unclean shutdown");
        }
        Ok(())
    }

    /// Free every inode in `orphans` (removed while open or held by the
    /// kernel): at mount, and at unmount once the session is over (the
    /// kernel sends no forget for what it still caches then, and a release
    /// or forget queued just before the unmount may never arrive).
    fn purge_all_orphans(&self) -> R<usize> {
        let mut st = self.st.lock();
        let orphans: Vec<u64> = {
            let rtx = self.db.begin_read().map_err(db_err)?;
            let t = rtx.open_table(ORPHANS).map_err(db_err)?;
            t.iter()
                .map_err(db_err)?
                .filter_map(|r| r.ok().map(|(k, _)| k.value()))
                .collect()
        };
        if orphans.is_empty() {
            return Ok(0);
        }
        let tx = self.begin_tx(&mut *st)?;
        for ino in &orphans {
            self.purge(&mut st, &tx, *ino)?;
            st.dirs.remove(ino);
        }
        self.commit(&mut st, tx, true)?;
        Ok(orphans.len())
    }

    /// Begin a transaction under the filesystem lock. Frees recorded by a
    /// transaction that was abandoned (an error returned before its commit)
    /// are dropped here: the extents they name are still in the committed map.
    fn begin_tx(&self, st: &mut State) -> R<WriteTransaction> {
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
    fn commit(&self, st: &mut State, mut tx: WriteTransaction, durable: bool) -> R<()> {
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
    fn release_deferred(&self, st: &mut State) {
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
    fn drain_deferred(&self, st: &mut State) {
        let until = std::time::Instant::now() + Duration::from_secs(5);
        self.release_deferred(st);
        while !st.deferred_free.is_empty() && std::time::Instant::now() < until {
            std::thread::sleep(Duration::from_millis(1));
            self.release_deferred(st);
        }
    }

    fn flush_device(&self) -> R<()> {
        stackfs_layers::submit_wait(&*self.data, Op::Flush, 0, Buf::zeroed(0)).map(|_| ())
    }

    // ----- inode access -----

    fn load_inode(&self, st: &State, ino: u64) -> R<Inode> {
        if let Some(i) = st.files.get(&ino).and_then(|f| f.inode.clone()) {
            return Ok(i);
        }
        let rtx = self.db.begin_read().map_err(db_err)?;
        let t = rtx.open_table(INODES).map_err(db_err)?;
        let v = t.get(ino).map_err(db_err)?.ok_or(err(libc::ENOENT))?;
        Inode::decode(ino, v.value())
    }

    fn inode_tx(&self, st: &State, tx: &WriteTransaction, ino: u64) -> R<Inode> {
        if let Some(i) = st.files.get(&ino).and_then(|f| f.inode.clone()) {
            return Ok(i);
        }
        let t = tx.open_table(INODES).map_err(db_err)?;
        let v = t.get(ino).map_err(db_err)?.ok_or(err(libc::ENOENT))?;
        Inode::decode(ino, v.value())
    }

    fn put_inode(&self, st: &mut State, tx: &WriteTransaction, inode: &Inode) -> R<()> {
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

    pub fn getattr(&self, ino: u64) -> R<Inode> {
        let st = self.st.lock();
        self.shown_inode(&st, ino)
    }

    /// The inode as `stat` shows it: space counts the file's data still in
    /// memory too (what it will take at most once flushed), so that `du`
    /// and sparse-file heuristics (blocks < size) do not see a written file
    /// as empty before its group flush.
    fn shown_inode(&self, st: &State, ino: u64) -> R<Inode> {
        let mut inode = self.load_inode(st, ino)?;
        if let Some(f) = st.files.get(&ino).filter(|f| !f.units.is_empty()) {
            // Units that replace a stored extent take its place, not more.
            let first = f.units.keys().next().copied().unwrap_or(0);
            let last = f.units.keys().next_back().copied().unwrap_or(0);
            let stored: std::collections::HashSet<u64> = self
                .extents(ino, first, last)?
                .into_iter()
                .map(|(u, _)| u)
                .collect();
            for (u, d) in f.units.iter().filter(|(u, _)| !stored.contains(u)) {
                let bytes = if d.keep {
                    UNIT
                } else {
                    inode
                        .size
                        .saturating_sub(u * UNIT)
                        .min(UNIT)
                        .div_ceil(BLOCK)
                        * BLOCK
                };
                inode.stored += bytes;
            }
        }
        Ok(inode)
    }

    /// Look a name up for the kernel: a directory found counts one lookup
    /// the kernel will forget (`forget`).
    pub fn lookup(&self, parent: u64, name: &[u8]) -> R<Inode> {
        let mut st = self.st.lock();
        let inode = self.lookup_in(&st, parent, name)?;
        Self::count_lookup(&mut st, &inode);
        Ok(inode)
    }

    fn lookup_in(&self, st: &State, parent: u64, name: &[u8]) -> R<Inode> {
        if name.len() > NAME_MAX {
            return Err(err(libc::ENAMETOOLONG));
        }
        // The kernel asks for "." and ".." when it decodes an exported file
        // handle (NFS, open_by_handle_at).
        // ("." of any inode is itself: handles of files are decoded that way).
        if name == b"." {
            return self.load_inode(st, parent);
        }
        if name == b".." {
            let dir = self.load_inode(st, parent)?;
            if dir.kind != Kind::Dir {
                return Err(err(libc::ENOTDIR));
            }
            return self.load_inode(st, dir.parent);
        }
        let rtx = self.db.begin_read().map_err(db_err)?;
        let t = rtx.open_table(DIRENTS).map_err(db_err)?;
        let v = t.get((parent, name)).map_err(db_err)?;
        let Some(v) = v else {
            // Tell "no such entry" from "parent is not a directory".
            let p = self.load_inode(st, parent)?;
            return Err(err(if p.kind == Kind::Dir {
                libc::ENOENT
            } else {
                libc::ENOTDIR
            }));
        };
        let (ino, _, _) = dirent_decode(v.value())?;
        self.shown_inode(st, ino)
    }

    /// The kernel got an entry for `inode` (lookup, mkdir, readdirplus): a
    /// directory's lookup count goes up by one. Only directories are
    /// counted: removed files live on through their open handles only.
    fn count_lookup(st: &mut State, inode: &Inode) {
        if inode.kind == Kind::Dir {
            st.dirs.entry(inode.ino).or_default().lookups += 1;
        }
    }

    fn find(&self, tx: &WriteTransaction, parent: u64, name: &[u8]) -> R<Option<(u64, Kind, u64)>> {
        let t = tx.open_table(DIRENTS).map_err(db_err)?;
        let v = t.get((parent, name)).map_err(db_err)?;
        v.map(|v| dirent_decode(v.value())).transpose()
    }

    fn add_entry(
        &self,
        tx: &WriteTransaction,
        dir: &mut Inode,
        name: &[u8],
        ino: u64,
        kind: Kind,
    ) -> R<()> {
        // The name's own place in the readdir order (see `name_cookie`).
        let cookie = {
            let mut cookies = tx.open_table(COOKIES).map_err(db_err)?;
            let mut c = name_cookie(name);
            while cookies.get((dir.ino, c)).map_err(db_err)?.is_some() {
                c = next_cookie(c);
            }
            cookies.insert((dir.ino, c), name).map_err(db_err)?;
            c
        };
        tx.open_table(DIRENTS)
            .map_err(db_err)?
            .insert((dir.ino, name), dirent_val(ino, kind, cookie).as_slice())
            .map_err(db_err)?;
        let now = Ts::now();
        dir.mtime = now;
        dir.ctime = now;
        Ok(())
    }

    fn remove_entry(&self, tx: &WriteTransaction, dir: &mut Inode, name: &[u8]) -> R<()> {
        let old = tx
            .open_table(DIRENTS)
            .map_err(db_err)?
            .remove((dir.ino, name))
            .map_err(db_err)?
            .map(|v| dirent_decode(v.value()));
        if let Some(Ok((_, _, cookie))) = old {
            tx.open_table(COOKIES)
                .map_err(db_err)?
                .remove((dir.ino, cookie))
                .map_err(db_err)?;
        }
        let now = Ts::now();
        dir.mtime = now;
        dir.ctime = now;
        Ok(())
    }

    fn check_name(name: &[u8]) -> R<()> {
        if name.len() > NAME_MAX {
            return Err(err(libc::ENAMETOOLONG));
        }
        if name.is_empty() || name == b"." || name == b".." || name.contains(&b'/') {
            return Err(err(libc::EINVAL));
        }
        Ok(())
    }

    /// Create any kind of node.
    pub fn mknod(
        &self,
        c: Caller,
        parent: u64,
        name: &[u8],
        mode: u32,
        umask: u32,
        rdev: u32,
        target: Option<&[u8]>,
    ) -> R<Inode> {
        Self::check_name(name)?;
        let kind = Kind::from_mode(mode).ok_or(err(libc::EINVAL))?;
        let mut st = self.st.lock();
        let tx = self.begin_tx(&mut *st)?;
        let mut dir = self.inode_tx(&st, &tx, parent)?;
        if dir.kind != Kind::Dir {
            return Err(err(libc::ENOTDIR));
        }
        if dir.nlink == 0 {
            return Err(err(libc::ENOENT));
        }
        if self.find(&tx, parent, name)?.is_some() {
            return Err(err(libc::EEXIST));
        }
        let now = Ts::now();
        let ino = st.next_ino;
        st.next_ino += 1;
        let generation = st.next_gen;
        st.next_gen += 1;
        // A default ACL on the parent replaces the umask (POSIX.1e): the new
        // inode's access ACL is the default masked by the requested mode.
        let default_acl = match kind {
            Kind::Symlink => None,
            _ => tx
                .open_table(XATTRS)
                .map_err(db_err)?
                .get((parent, ACL_DEFAULT))
                .map_err(db_err)?
                .map(|v| v.value().to_vec()),
        };
        let mut access_acl = None;
        let mut perm = match &default_acl {
            Some(d) => {
                let (bits, acl) = acl_create(d, mode & 0o777).ok_or(Errno::EIO)?;
                access_acl = acl;
                (mode & 0o7000) as u16 | bits
            }
            None => (mode & !umask & 0o7777) as u16,
        };
        let mut gid = c.gid;
        if dir.perm & libc::S_ISGID as u16 != 0 {
            // BSD group semantics under a setgid directory.
            gid = dir.gid;
            if kind == Kind::Dir {
                perm |= libc::S_ISGID as u16;
            }
        }
        let inode = Inode {
            ino,
            kind,
            perm,
            uid: c.uid,
            gid,
            nlink: if kind == Kind::Dir { 2 } else { 1 },
            size: target.map(|t| t.len() as u64).unwrap_or(0),
            stored: 0,
            atime: now,
            mtime: now,
            ctime: now,
            crtime: now,
            rdev,
            generation,
            parent,
            next_cookie: 3,
        };
        {
            let mut x = tx.open_table(XATTRS).map_err(db_err)?;
            if let Some(a) = &access_acl {
                x.insert((ino, ACL_ACCESS), a.as_slice()).map_err(db_err)?;
            }
            if let (Some(d), Kind::Dir) = (&default_acl, kind) {
                x.insert((ino, ACL_DEFAULT), d.as_slice()).map_err(db_err)?;
            }
        }
        if let Some(t) = target {
            tx.open_table(SYMLINKS)
                .map_err(db_err)?
                .insert(ino, t)
                .map_err(db_err)?;
        }
        self.put_inode(&mut st, &tx, &inode)?;
        self.add_entry(&tx, &mut dir, name, ino, kind)?;
        if kind == Kind::Dir {
            dir.nlink += 1;
        }
        self.put_inode(&mut st, &tx, &dir)?;
        self.commit(&mut st, tx, false)?;
        // The reply is an entry the kernel counts (mkdir).
        Self::count_lookup(&mut st, &inode);
        Ok(inode)
    }

    pub fn readlink(&self, ino: u64) -> R<Vec<u8>> {
        let _st = self.st.lock();
        let rtx = self.db.begin_read().map_err(db_err)?;
        let t = rtx.open_table(SYMLINKS).map_err(db_err)?;
        let v = t.get(ino).map_err(db_err)?.ok_or(err(libc::EINVAL))?;
        Ok(v.value().to_vec())
    }

    pub fn link(&self, ino: u64, parent: u64, name: &[u8]) -> R<Inode> {
        Self::check_name(name)?;
        let mut st = self.st.lock();
        let tx = self.begin_tx(&mut *st)?;
        let mut inode = self.inode_tx(&st, &tx, ino)?;
        if inode.kind == Kind::Dir {
            return Err(err(libc::EPERM));
        }
        let mut dir = self.inode_tx(&st, &tx, parent)?;
        if dir.kind != Kind::Dir {
            return Err(err(libc::ENOTDIR));
        }
        if dir.nlink == 0 {
            // A removed directory that is still open takes no new names.
            return Err(err(libc::ENOENT));
        }
        if self.find(&tx, parent, name)?.is_some() {
            return Err(err(libc::EEXIST));
        }
        if inode.nlink >= u32::MAX - 1 {
            return Err(err(libc::EMLINK));
        }
        if inode.nlink == 0 {
            // Relinking an open, unlinked file (linkat with AT_EMPTY_PATH) revives it.
            tx.open_table(ORPHANS)
                .map_err(db_err)?
                .remove(ino)
                .map_err(db_err)?;
        }
        inode.nlink += 1;
        inode.ctime = Ts::now();
        self.add_entry(&tx, &mut dir, name, ino, inode.kind)?;
        self.put_inode(&mut st, &tx, &dir)?;
        self.put_inode(&mut st, &tx, &inode)?;
        self.commit(&mut st, tx, false)?;
        Ok(inode)
    }

    /// Drop one link of `ino`; at zero, free it now or when its last opener
    /// closes (a directory: when it is released and forgotten, `DirRefs`).
    fn drop_link(&self, st: &mut State, tx: &WriteTransaction, inode: &mut Inode) -> R<()> {
        inode.nlink = inode.nlink.saturating_sub(if inode.kind == Kind::Dir {
            inode.nlink
        } else {
            1
        });
        inode.ctime = Ts::now();
        if inode.nlink > 0 {
            return self.put_inode(st, tx, inode);
        }
        let held = st.files.get(&inode.ino).is_some_and(|f| f.open > 0)
            || st
                .dirs
                .get(&inode.ino)
                .is_some_and(|d| d.open > 0 || d.lookups > 0);
        if held {
            if let Some(d) = st.dirs.get_mut(&inode.ino) {
                d.removed = true;
            }
            tx.open_table(ORPHANS)
                .map_err(db_err)?
                .insert(inode.ino, ())
                .map_err(db_err)?;
            return self.put_inode(st, tx, inode);
        }
        self.purge(st, tx, inode.ino)
    }

    /// Remove an inode and everything it owns.
    fn purge(&self, st: &mut State, tx: &WriteTransaction, ino: u64) -> R<()> {
        if let Some(f) = st.files.get_mut(&ino) {
            let n = f.units.len() as u64 * UNIT;
            f.units.clear();
            f.inode = None;
            if f.open == 0 {
                st.files.remove(&ino);
            }
            st.dirty_bytes -= n.min(st.dirty_bytes);
        }
        self.drop_extents(st, tx, ino, 0)?;
        tx.open_table(INODES)
            .map_err(db_err)?
            .remove(ino)
            .map_err(db_err)?;
        tx.open_table(SYMLINKS)
            .map_err(db_err)?
            .remove(ino)
            .map_err(db_err)?;
        tx.open_table(ORPHANS)
            .map_err(db_err)?
            .remove(ino)
            .map_err(db_err)?;
        let mut x = tx.open_table(XATTRS).map_err(db_err)?;
        let names: Vec<Vec<u8>> = x
            .range((ino, &[][..])..)
            .map_err(db_err)?
            .map_while(|r| {
                r.ok()
                    .filter(|(k, _)| k.value().0 == ino)
                    .map(|(k, _)| k.value().1.to_vec())
            })
            .collect();
        for n in names {
            x.remove((ino, n.as_slice())).map_err(db_err)?;
        }
        Ok(())
    }

    /// Drop extents of units >= `from_unit`; their space is freed once durable.
    fn drop_extents(
        &self,
        st: &mut State,
        tx: &WriteTransaction,
        ino: u64,
        from_unit: u64,
    ) -> R<u64> {
        let mut t = tx.open_table(EXTENTS).map_err(db_err)?;
        let doomed: Vec<(u64, Extent)> = t
            .range((ino, from_unit)..=(ino, u64::MAX))
            .map_err(db_err)?
            .filter_map(|r| r.ok())
            .filter_map(|(k, v)| Extent::decode(v.value()).ok().map(|x| (k.value().1, x)))
            .collect();
        let mut freed = 0;
        for (unit, x) in doomed {
            t.remove((ino, unit)).map_err(db_err)?;
            st.pending_free.push((x.phys, x.alloc as u64));
            freed += x.alloc as u64;
            self.rd.uncache(ino, unit);
        }
        Ok(freed)
    }

    pub fn unlink(&self, parent: u64, name: &[u8]) -> R<()> {
        let mut st = self.st.lock();
        let tx = self.begin_tx(&mut *st)?;
        let (ino, kind, _) = self.find(&tx, parent, name)?.ok_or(err(libc::ENOENT))?;
        if kind == Kind::Dir {
            return Err(err(libc::EISDIR));
        }
        let mut dir = self.inode_tx(&st, &tx, parent)?;
        self.remove_entry(&tx, &mut dir, name)?;
        self.put_inode(&mut st, &tx, &dir)?;
        let mut inode = self.inode_tx(&st, &tx, ino)?;
        self.drop_link(&mut st, &tx, &mut inode)?;
        self.commit(&mut st, tx, false)
    }

    fn is_empty_dir(&self, tx: &WriteTransaction, ino: u64) -> R<bool> {
        let t = tx.open_table(COOKIES).map_err(db_err)?;
        let empty = t
            .range((ino, 0)..=(ino, u64::MAX))
            .map_err(db_err)?
            .next()
            .is_none();
        Ok(empty)
    }

    pub fn rmdir(&self, parent: u64, name: &[u8]) -> R<()> {
        if name == b"." {
            return Err(err(libc::EINVAL));
        }
        if name == b".." {
            return Err(err(libc::ENOTEMPTY));
        }
        let mut st = self.st.lock();
        let tx = self.begin_tx(&mut *st)?;
        let (ino, kind, _) = self.find(&tx, parent, name)?.ok_or(err(libc::ENOENT))?;
        if kind != Kind::Dir {
            return Err(err(libc::ENOTDIR));
        }
        if !self.is_empty_dir(&tx, ino)? {
            return Err(err(libc::ENOTEMPTY));
        }
        let mut dir = self.inode_tx(&st, &tx, parent)?;
        self.remove_entry(&tx, &mut dir, name)?;
        dir.nlink = dir.nlink.saturating_sub(1);
        self.put_inode(&mut st, &tx, &dir)?;
        let mut inode = self.inode_tx(&st, &tx, ino)?;
        self.drop_link(&mut st, &tx, &mut inode)?;
        self.commit(&mut st, tx, false)
    }

    /// Is `ancestor` on the path from `dir` up to the root?
    fn is_ancestor(
        &self,
        st: &State,
        tx: &WriteTransaction,
        ancestor: u64,
        mut dir: u64,
    ) -> R<bool> {
        for _ in 0..100_000 {
            if dir == ancestor {
                return Ok(true);
            }
            if dir == ROOT {
                return Ok(false);
            }
            dir = self.inode_tx(st, tx, dir)?.parent;
        }
        Err(Errno::EIO)
    }

    pub fn rename(
        &self,
        parent: u64,
        name: &[u8],
        newparent: u64,
        newname: &[u8],
        flags: u32,
    ) -> R<()> {
        const NOREPLACE: u32 = libc::RENAME_NOREPLACE;
        const EXCHANGE: u32 = libc::RENAME_EXCHANGE;
        if flags & !(NOREPLACE | EXCHANGE) != 0 || flags == NOREPLACE | EXCHANGE {
            return Err(err(libc::EINVAL));
        }
        Self::check_name(newname)?;
        let mut st = self.st.lock();
        // Write-then-rename replaces files safely only if the data lands no
        // later than the rename (ext4's auto_da_alloc): write both files'
        // dirty data first, so that no commit that makes the rename durable
        // can leave the new name with the new size and no data.
        for (dir, n) in [(parent, name), (newparent, newname)] {
            if let Some(i) = self.entry_ino(dir, n)? {
                if st.files.get(&i).is_some_and(|f| f.inode.is_some()) {
                    self.flush_file(&mut st, i, false)?;
                }
            }
        }
        let tx = self.begin_tx(&mut *st)?;
        let (ino, kind, _) = self.find(&tx, parent, name)?.ok_or(err(libc::ENOENT))?;
        let target = self.find(&tx, newparent, newname)?;
        let mut pdir = self.inode_tx(&st, &tx, parent)?;
        let nd = self.inode_tx(&st, &tx, newparent)?;
        if nd.kind != Kind::Dir {
            return Err(err(libc::ENOTDIR));
        }
        if nd.nlink == 0 {
            // Into a removed directory (still open somewhere): as ext4.
            return Err(err(libc::ENOENT));
        }
        if kind == Kind::Dir && parent != newparent && self.is_ancestor(&st, &tx, ino, newparent)? {
            return Err(err(libc::EINVAL));
        }
        if flags & EXCHANGE != 0 {
            let (tino, tkind, _) = target.ok_or(err(libc::ENOENT))?;
            if tkind == Kind::Dir
                && parent != newparent
                && self.is_ancestor(&st, &tx, tino, parent)?
            {
                return Err(err(libc::EINVAL));
            }
            if tino == ino {
                return self.commit(&mut st, tx, false);
            }
            self.remove_entry(&tx, &mut pdir, name)?;
            self.put_inode(&mut st, &tx, &pdir)?;
            let mut ndir = self.inode_tx(&st, &tx, newparent)?;
            self.remove_entry(&tx, &mut ndir, newname)?;
            self.add_entry(&tx, &mut ndir, newname, ino, kind)?;
            self.put_inode(&mut st, &tx, &ndir)?;
            let mut pdir = self.inode_tx(&st, &tx, parent)?;
            self.add_entry(&tx, &mut pdir, name, tino, tkind)?;
            if parent != newparent {
                // A directory that moves takes its ".." link along.
                let d = (kind == Kind::Dir) as i64 - (tkind == Kind::Dir) as i64;
                pdir.nlink = (pdir.nlink as i64 - d) as u32;
                self.put_inode(&mut st, &tx, &pdir)?;
                let mut ndir = self.inode_tx(&st, &tx, newparent)?;
                ndir.nlink = (ndir.nlink as i64 + d) as u32;
                self.put_inode(&mut st, &tx, &ndir)?;
            } else {
                self.put_inode(&mut st, &tx, &pdir)?;
            }
            for (i, p) in [(ino, newparent), (tino, parent)] {
                let mut n = self.inode_tx(&st, &tx, i)?;
                if n.kind == Kind::Dir {
                    n.parent = p;
                }
                n.ctime = Ts::now();
                self.put_inode(&mut st, &tx, &n)?;
            }
            return self.commit(&mut st, tx, false);
        }
        if let Some((tino, tkind, _)) = target {
            if flags & NOREPLACE != 0 {
                return Err(err(libc::EEXIST));
            }
            if tino == ino {
                // Two names of one inode: POSIX says do nothing.
                return self.commit(&mut st, tx, false);
            }
            match (kind == Kind::Dir, tkind == Kind::Dir) {
                (true, false) => return Err(err(libc::ENOTDIR)),
                (false, true) => return Err(err(libc::EISDIR)),
                (true, true) if !self.is_empty_dir(&tx, tino)? => return Err(err(libc::ENOTEMPTY)),
                _ => {}
            }
            let mut ndir = self.inode_tx(&st, &tx, newparent)?;
            self.remove_entry(&tx, &mut ndir, newname)?;
            if tkind == Kind::Dir {
                ndir.nlink = ndir.nlink.saturating_sub(1);
            }
            self.put_inode(&mut st, &tx, &ndir)?;
            let mut t = self.inode_tx(&st, &tx, tino)?;
            self.drop_link(&mut st, &tx, &mut t)?;
        }
        let mut pdir = self.inode_tx(&st, &tx, parent)?;
        self.remove_entry(&tx, &mut pdir, name)?;
        if kind == Kind::Dir && parent != newparent {
            pdir.nlink = pdir.nlink.saturating_sub(1);
        }
        self.put_inode(&mut st, &tx, &pdir)?;
        let mut ndir = self.inode_tx(&st, &tx, newparent)?;
        self.add_entry(&tx, &mut ndir, newname, ino, kind)?;
        if kind == Kind::Dir && parent != newparent {
            ndir.nlink += 1;
        }
        self.put_inode(&mut st, &tx, &ndir)?;
        let mut n = self.inode_tx(&st, &tx, ino)?;
        if kind == Kind::Dir {
            n.parent = newparent;
        }
        n.ctime = Ts::now();
        self.put_inode(&mut st, &tx, &n)?;
        self.commit(&mut st, tx, false)
    }

    /// Entries after `offset` (a cookie; 0 = start, 1 = after ".", 2 = after "..").
    pub fn readdir(&self, ino: u64, offset: u64, mut want: impl FnMut(&Entry) -> bool) -> R<()> {
        let st = self.st.lock();
        let dir = self.load_inode(&st, ino)?;
        if dir.kind != Kind::Dir {
            return Err(err(libc::ENOTDIR));
        }
        drop(st);
        if offset < 1
            && !want(&Entry {
                cookie: 1,
                ino,
                kind: Kind::Dir,
                name: b".".to_vec(),
            })
        {
            return Ok(());
        }
        if offset < 2
            && !want(&Entry {
                cookie: 2,
                ino: dir.parent,
                kind: Kind::Dir,
                name: b"..".to_vec(),
            })
        {
            return Ok(());
        }
        let rtx = self.db.begin_read().map_err(db_err)?;
        let cookies = rtx.open_table(COOKIES).map_err(db_err)?;
        let dirents = rtx.open_table(DIRENTS).map_err(db_err)?;
        for row in cookies
            .range((ino, offset.max(2).saturating_add(1))..=(ino, u64::MAX))
            .map_err(db_err)?
        {
            let (k, name) = row.map_err(db_err)?;
            let name = name.value().to_vec();
            let Some(v) = dirents.get((ino, name.as_slice())).map_err(db_err)? else {
                continue;
            };
            let (child, kind, _) = dirent_decode(v.value())?;
            if !want(&Entry {
                cookie: k.value().1,
                ino: child,
                kind,
                name,
            }) {
                break;
            }
        }
        Ok(())
    }

    /// opendir: a handle on a directory, which keeps it (with no links, in
    /// `orphans`) if it is removed while open, until `release_dir`.
    pub fn open_dir(&self, ino: u64) -> R<Inode> {
        let mut st = self.st.lock();
        let inode = self.load_inode(&st, ino)?;
        if inode.kind != Kind::Dir {
            return Err(err(libc::ENOTDIR));
        }
        st.dirs.entry(ino).or_default().open += 1;
        Ok(inode)
    }

    /// releasedir: the last handle of a removed directory frees it, unless
    /// the kernel still holds it (lookups not yet forgotten).
    pub fn release_dir(&self, ino: u64) -> R<()> {
        let mut st = self.st.lock();
        let Some(d) = st.dirs.get_mut(&ino) else {
            return Ok(());
        };
        d.open = d.open.saturating_sub(1);
        if Self::unheld(&mut st, ino) {
            self.purge_dead_dirs(&mut st, &[ino])?;
        }
        Ok(())
    }

    /// readdirplus gave the kernel an entry (other than "." and ".."): it
    /// counts as a lookup of that inode.
    pub fn remember(&self, inode: &Inode) {
        Self::count_lookup(&mut self.st.lock(), inode);
    }

    /// The kernel forgets `n` lookups of `ino`.
    pub fn forget(&self, ino: u64, n: u64) {
        self.forget_many(&[(ino, n)])
    }

    /// The kernel forgets lookups, (inode, count) each. The directories
    /// removed while held that nothing holds any more are freed together.
    pub fn forget_many(&self, nodes: &[(u64, u64)]) {
        let mut st = self.st.lock();
        let mut dead = Vec::new();
        for &(ino, n) in nodes {
            let Some(d) = st.dirs.get_mut(&ino) else {
                continue;
            };
            d.lookups = d.lookups.saturating_sub(n);
            if Self::unheld(&mut st, ino) {
                dead.push(ino);
            }
        }
        if let Err(e) = self.purge_dead_dirs(&mut st, &dead) {
            log::warn!(
                "freeing {} removed directories: {e} (freed at unmount)",
                dead.len()
            );
        }
    }

    /// Stop tracking a directory nothing holds any more; true if it was
    /// removed (it is freed now).
    fn unheld(st: &mut State, ino: u64) -> bool {
        match st.dirs.get(&ino) {
            Some(d) if d.open == 0 && d.lookups == 0 => {
                st.dirs.remove(&ino).is_some_and(|d| d.removed)
            }
            _ => false,
        }
    }

    /// Free removed directories nothing holds (those that really have no
    /// links: the removal may not have committed).
    fn purge_dead_dirs(&self, st: &mut State, inos: &[u64]) -> R<()> {
        if inos.is_empty() || self.read_only {
            return Ok(());
        }
        let tx = self.begin_tx(st)?;
        let mut n = 0;
        for &ino in inos {
            if self
                .inode_tx(st, &tx, ino)
                .is_ok_and(|i| i.kind == Kind::Dir && i.nlink == 0)
            {
                self.purge(st, &tx, ino)?;
                n += 1;
            }
        }
        if n == 0 {
            return Ok(());
        }
        self.commit(st, tx, false)
    }

    /// Drop the set-id bits that a change of kind `why` by `who` takes from
    /// `ino` (`setid_loss`), as Linux does before (or, for an ACL, with)
    /// the change itself. The kernel leaves this to us
    /// (FUSE_HANDLE_KILLPRIV_V2). Cheap when the file has no set-id bits.
    pub fn drop_setid(&self, ino: u64, why: SetidChange, who: &dyn Privs) -> R<()> {
        let mut st = self.st.lock();
        if setid_loss(&self.load_inode(&st, ino)?, why, who) == 0 {
            return Ok(());
        }
        let tx = self.begin_tx(&mut *st)?;
        let mut inode = self.inode_tx(&st, &tx, ino)?;
        inode.perm &= !setid_loss(&inode, why, who);
        inode.ctime = Ts::now();
        self.put_inode(&mut st, &tx, &inode)?;
        self.commit(&mut st, tx, false)
    }

    pub fn setattr(&self, ino: u64, a: SetAttr) -> R<Inode> {
        let mut st = self.st.lock();
        // Times only (the kernel's writeback cache sends these after writes),
        // on a file whose changed inode is still in memory: the change joins
        // it there and is committed with the file's data.
        if a.mode.is_none() && a.uid.is_none() && a.gid.is_none() && a.size.is_none() {
            if let Some(inode) = st.files.get_mut(&ino).and_then(|f| f.inode.as_mut()) {
                Self::set_times(inode, &a);
                return self.shown_inode(&st, ino);
            }
        }
        if let Some(size) = a.size {
            self.truncate(&mut st, ino, size)?;
        }
        let tx = self.begin_tx(&mut *st)?;
        let mut inode = self.inode_tx(&st, &tx, ino)?;
        if let Some(m) = a.mode {
            inode.perm = (m & 0o7777) as u16;
        }
        // The set-id bits a chown drops are dropped before it (`drop_setid`):
        // which ones depends on the caller.
        if a.uid.is_some() || a.gid.is_some() {
            if let Some(u) = a.uid {
                inode.uid = u;
            }
            if let Some(g) = a.gid {
                inode.gid = g;
            }
        }
        Self::set_times(&mut inode, &a);
        self.put_inode(&mut st, &tx, &inode)?;
        self.commit(&mut st, tx, false)?;
        Ok(inode)
    }

    /// The mount's current rules.
    pub fn policy(&self) -> MountPolicy {
        *self.policy.lock()
    }

    /// A remount's options: what they say replaces, the rest stays.
    pub fn set_policy(&self, atime: crate::atime::AtimePolicy, sync_metadata: Option<bool>) {
        let mut p = self.policy.lock();
        (p.atime, p.nodiratime) = atime.over((p.atime, p.nodiratime));
        if let Some(s) = sync_metadata {
            p.sync_metadata = s;
        }
    }

    /// An access to `ino` (an open for reading, or of a directory): update
    /// its atime if the mount's atime rules say so (see atime.rs). The
    /// ctime does not change. True when the atime moved.
    pub fn touch_atime(&self, ino: u64, dir: bool) -> R<bool> {
        let p = self.policy();
        if self.read_only || (dir && p.nodiratime) {
            return Ok(false);
        }
        let now = Ts::now();
        let i = self.getattr(ino)?;
        if !crate::atime::due(p.atime, i.atime, i.mtime, i.ctime, now) {
            return Ok(false);
        }
        self.setattr(
            ino,
            SetAttr {
                atime: Some(now),
                ctime: Some(i.ctime),
                ..SetAttr::default()
            },
        )
        .map(|_| true)
    }

    fn set_times(inode: &mut Inode, a: &SetAttr) {
        if let Some(t) = a.atime {
            inode.atime = t;
        }
        if let Some(t) = a.mtime {
            inode.mtime = t;
        }
        inode.ctime = a.ctime.unwrap_or_else(Ts::now);
        if a.size.is_some() && a.mtime.is_none() {
            inode.mtime = inode.ctime;
        }
    }

    // ----- file data -----

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

    fn extent(&self, ino: u64, unit: u64) -> R<Option<Extent>> {
        Ok(self.extents(ino, unit, unit)?.pop().map(|(_, x)| x))
    }

    /// The committed extents of units `first..=last`, with one range lookup.
    fn extents(&self, ino: u64, first: u64, last: u64) -> R<Vec<(u64, Extent)>> {
        let rtx = self.db.begin_read().map_err(db_err)?;
        let t = rtx.open_table(EXTENTS).map_err(db_err)?;
        let mut out = Vec::new();
        for row in t.range((ino, first)..=(ino, last)).map_err(db_err)? {
            let (k, v) = row.map_err(db_err)?;
            out.push((k.value().1, Extent::decode(v.value())?));
        }
        Ok(out)
    }

    /// Read committed units from the pool in one batch and wait; verify each.
    /// For callers holding the filesystem lock (partial overwrites, fsck).
    pub(crate) fn read_units(&self, ino: u64, units: &[(u64, Extent)]) -> R<Vec<Buf>> {
        let gen = self.rd.generation();
        let mut out = vec![None; units.len()];
        let mut ios = Vec::new();
        let mut waits = Vec::new();
        {
            let mut cache = self.rd.cache.lock();
            for (i, (u, x)) in units.iter().enumerate() {
                if let Some(d) = cache.get(&(ino, *u)) {
                    out[i] = Some(d.clone());
                    continue;
                }
                let w = Waiter::new();
                let io = Io::new(
                    Op::Read,
                    x.phys,
                    Buf::zeroed(x.len as usize),
                    Some(w.end_io()),
                );
                // The transform layers need back what they recorded at write time.
                io.set_tag(x.tag());
                waits.push((i, w, io.buf().clone()));
                ios.push(io);
            }
        }
        self.data.submit_batch(ios);
        let mut first_err = None;
        for (i, w, b) in waits {
            let (u, x) = units[i];
            match verify_unit(ino, u, &x, w.wait(), &b) {
                Ok(d) => {
                    self.rd.put((ino, u), d.clone(), gen);
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
        done: impl FnOnce(R<Vec<u8>>) + Send + 'static,
    ) {
        let plan = {
            let st = self.st.lock();
            self.plan_read(&st, ino, off, size)
        };
        let (mut out, fetch, ticket, gen) = match plan {
            Err(e) => return done(Err(e)),
            Ok(p) => p,
        };
        if fetch.is_empty() {
            return done(Ok(out));
        }
        let rd = self.rd.clone();
        let shared = Arc::new(Mutex::new(std::mem::take(&mut out)));
        let result = shared.clone();
        let group = Io::new(
            Op::Read,
            0,
            Buf::zeroed(0),
            Some(Box::new(move |_, r| {
                rd.leave(ticket);
                let data = std::mem::take(&mut *result.lock());
                done(r.map(|_| data));
                r
            })),
        );
        let mut ios = Vec::with_capacity(fetch.len());
        for (u, x) in fetch {
            let (rd, out) = (self.rd.clone(), shared.clone());
            let io = group.child(
                Op::Read,
                x.phys,
                Buf::zeroed(x.len as usize),
                Some(Box::new(move |io, r| {
                    let d = verify_unit(ino, u, &x, r, io.buf())?;
                    let ustart = u * UNIT;
                    let from = off.max(ustart);
                    let mut out = out.lock();
                    let to = (off + out.len() as u64).min(ustart + UNIT);
                    copy_clipped(
                        &mut out[(from - off) as usize..(to - off) as usize],
                        d.as_slice(),
                        (from - ustart) as usize,
                    );
                    drop(out);
                    rd.put((ino, u), d, gen);
                    Ok(x.len as u64)
                })),
            );
            io.set_tag(x.tag());
            ios.push(io);
        }
        self.data.submit_batch(ios);
        group.put();
    }

    /// Under the lock: the reply buffer with every dirty or cached byte in
    /// place, the units still to read from the pool, and the read's ticket
    /// (registered: it holds back the reuse of space freed from now on) and
    /// cache generation.
    #[allow(clippy::type_complexity)]
    fn plan_read(
        &self,
        st: &State,
        ino: u64,
        off: u64,
        size: u32,
    ) -> R<(Vec<u8>, Vec<(u64, Extent)>, u64, u64)> {
        let inode = self.load_inode(st, ino)?;
        if off >= inode.size || size == 0 {
            return Ok((Vec::new(), Vec::new(), 0, 0));
        }
        let end = (off + size as u64).min(inode.size);
        let mut out = vec![0u8; (end - off) as usize];
        let (first, last) = (off / UNIT, (end - 1) / UNIT);
        let file = st.files.get(&ino);
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
        let mut cache = self.rd.cache.lock();
        for (u, x) in committed {
            if file.is_some_and(|f| f.units.contains_key(&u)) {
                continue;
            }
            match cache.get(&(ino, u)) {
                Some(d) => place(u, d.as_slice(), &mut out),
                None => fetch.push((u, x)),
            }
        }
        let gen = self.rd.cache_gen.load(std::sync::atomic::Ordering::Relaxed);
        drop(cache);
        if let Some(f) = file {
            for (u, d) in f.units.range(first..=last) {
                place(*u, d.data.as_slice(), &mut out);
            }
        }
        let ticket = st.free_gen;
        if !fetch.is_empty() {
            self.rd.enter(ticket);
        }
        Ok((out, fetch, ticket, gen))
    }

    /// Read and wait (copy_file_range).
    pub fn read(&self, ino: u64, off: u64, size: u32) -> R<Vec<u8>> {
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        self.read_async(ino, off, size, move |r| {
            let _ = tx.send(r);
        });
        rx.recv().unwrap_or(Err(Errno::EIO))
    }

    /// The unit's current contents, for a partial overwrite.
    fn unit_for_write(&self, st: &mut State, ino: u64, u: u64) -> R<()> {
        if st.files.get(&ino).is_some_and(|f| f.units.contains_key(&u)) {
            return Ok(());
        }
        let mut data = Buf::zeroed(UNIT as usize);
        if let Some(x) = self.extent(ino, u)? {
            let old = self.read_units(ino, &[(u, x)])?.pop().expect("one");
            copy_clipped(data.as_mut_slice(), old.as_slice(), 0);
        }
        st.files
            .entry(ino)
            .or_default()
            .units
            .insert(u, DirtyUnit { data, keep: false });
        st.dirty_bytes += UNIT;
        Ok(())
    }

    fn file_inode(&self, st: &mut State, ino: u64) -> R<Inode> {
        let inode = self.load_inode(st, ino)?;
        st.files.entry(ino).or_default().inode = Some(inode.clone());
        Ok(inode)
    }

    /// Space that new dirty data may still claim.
    fn room(&self, st: &State) -> u64 {
        st.alloc.free_bytes().saturating_sub(st.dirty_bytes)
    }

    pub fn write(&self, ino: u64, off: u64, data: &[u8]) -> R<u32> {
        self.write_by(ino, off, data, None)
    }

    /// A write that drops set-id bits as a data change by `kill` does
    /// (`setid_loss`): the kernel asks for it with FUSE_WRITE_KILL_SUIDGID.
    /// The bits go with the write's other inode changes, in memory.
    pub fn write_by(&self, ino: u64, off: u64, data: &[u8], kill: Option<&dyn Privs>) -> R<u32> {
        if self.read_only {
            return Err(Errno::EROFS);
        }
        self.writable()?;
        let end = off
            .checked_add(data.len() as u64)
            .filter(|e| *e <= i64::MAX as u64)
            .ok_or(err(libc::EFBIG))?;
        if data.is_empty() {
            return Ok(0);
        }
        let mut st = self.st.lock();
        let mut inode = self.file_inode(&mut st, ino)?;
        if let Some(who) = kill {
            inode.perm &= !setid_loss(&inode, SetidChange::Data, who);
        }
        let (first, last) = (off / UNIT, (end - 1) / UNIT);
        let new_units = (first..=last)
            .filter(|u| !st.files[&ino].units.contains_key(u))
            .count() as u64;
        if self.room(&st) < new_units * UNIT {
            // Frees wait for a durable commit; make one before giving up.
            self.flush_all(&mut st, true)?;
            self.drain_deferred(&mut st);
            if self.room(&st) < new_units * UNIT {
                return Err(err(libc::ENOSPC));
            }
        }
        for u in first..=last {
            let ustart = u * UNIT;
            let from = off.max(ustart);
            let to = end.min(ustart + UNIT);
            let whole = from == ustart && to == ustart + UNIT;
            let beyond = ustart >= inode.size;
            if whole || beyond {
                let f = st.files.get_mut(&ino).expect("file state");
                if !f.units.contains_key(&u) {
                    f.units.insert(
                        u,
                        DirtyUnit {
                            data: Buf::zeroed(UNIT as usize),
                            keep: false,
                        },
                    );
                    st.dirty_bytes += UNIT;
                }
            } else {
                self.unit_for_write(&mut st, ino, u)?;
            }
            let f = st.files.get_mut(&ino).expect("file state");
            let d = f.units.get_mut(&u).expect("unit");
            d.bytes_mut()[(from - ustart) as usize..(to - ustart) as usize]
                .copy_from_slice(&data[(from - off) as usize..(to - off) as usize]);
            stackfs_layers::buf::count_copy((to - from) as usize);
        }
        let now = Ts::now();
        inode.size = inode.size.max(end);
        inode.mtime = now;
        inode.ctime = now;
        st.files.get_mut(&ino).expect("file state").inode = Some(inode);
        if st.dirty_bytes > DIRTY_LIMIT {
            self.flush_all(&mut st, false)?;
        }
        Ok(data.len() as u32)
    }

    /// Write a file's dirty units to fresh space and commit the new extents.
    fn flush_file(&self, st: &mut State, ino: u64, durable: bool) -> R<()> {
        self.flush_files(st, &[ino], durable)
    }

    /// Write the dirty units of several files as one batch (compressed on
    /// every core, one submission per device) and commit all their new
    /// extents in one transaction: group commit for many small files.
    fn flush_files(&self, st: &mut State, inos: &[u64], durable: bool) -> R<()> {
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

    fn write_units(
        &self,
        st: &mut State,
        batch: &mut [(Inode, BTreeMap<u64, DirtyUnit>)],
        durable: bool,
    ) -> R<()> {
        let mut ios = Vec::new();
        let mut waits = Vec::new();
        // Per file of the batch: (unit, its new extent, or None for a hole).
        let mut placed: Vec<Vec<(u64, Option<Extent>)>> = vec![Vec::new(); batch.len()];
        let free_placed = |st: &mut State, placed: &[Vec<(u64, Option<Extent>)>]| {
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
    fn commit_units(
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

    fn commit_now(&self, st: &mut State, durable: bool) -> R<()> {
        let tx = self.begin_tx(&mut *st)?;
        self.commit(st, tx, durable)
    }

    fn flush_all(&self, st: &mut State, durable: bool) -> R<()> {
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
        if self.flush_files(st, &inos, false).is_err() {
            // One file's failure must not hold the others back: one by one.
            let mut first = None;
            for ino in inos {
                if let Err(e) = self.flush_file(st, ino, false) {
                    first.get_or_insert(e);
                }
            }
            if let Some(e) = first {
                return Err(e);
            }
        }
        if durable && (st.undurable || !st.pending_free.is_empty() || !st.deferred_free.is_empty())
        {
            self.commit_now(st, true)?;
        }
        Ok(())
    }

    /// fsync: this file's data and all metadata so far, durably.
    /// The inode a directory entry names (committed state).
    fn entry_ino(&self, dir: u64, name: &[u8]) -> R<Option<u64>> {
        let rtx = self.db.begin_read().map_err(db_err)?;
        let t = rtx.open_table(DIRENTS).map_err(db_err)?;
        let v = t.get((dir, name)).map_err(db_err)?;
        v.map(|v| dirent_decode(v.value()).map(|(i, _, _)| i))
            .transpose()
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
        if self.read_only || self.closed.load(std::sync::atomic::Ordering::Acquire) {
            return Ok(());
        }
        let mut st = self.st.lock();
        self.flush_all(&mut st, true)
    }

    fn truncate(&self, st: &mut State, ino: u64, size: u64) -> R<()> {
        let mut inode = self.file_inode(st, ino)?;
        if inode.kind != Kind::File {
            return Err(err(if inode.kind == Kind::Dir {
                libc::EISDIR
            } else {
                libc::EINVAL
            }));
        }
        if size > i64::MAX as u64 {
            return Err(err(libc::EFBIG));
        }
        if size < inode.size {
            // Zero the tail of the last kept unit; drop every unit after it.
            let keep = size.div_ceil(UNIT);
            if size % UNIT != 0 {
                let u = size / UNIT;
                self.unit_for_write(st, ino, u)?;
                let d = st
                    .files
                    .get_mut(&ino)
                    .expect("file")
                    .units
                    .get_mut(&u)
                    .expect("unit");
                d.bytes_mut()[(size % UNIT) as usize..].fill(0);
            }
            let f = st.files.get_mut(&ino).expect("file");
            let gone: Vec<u64> = f.units.range(keep..).map(|(u, _)| *u).collect();
            for u in &gone {
                f.units.remove(u);
            }
            st.dirty_bytes -= (gone.len() as u64 * UNIT).min(st.dirty_bytes);
            let tx = self.begin_tx(&mut *st)?;
            let freed = self.drop_extents(st, &tx, ino, keep)?;
            inode.stored -= freed.min(inode.stored);
            inode.size = size;
            self.put_inode(st, &tx, &inode)?;
            st.files.get_mut(&ino).expect("file").inode = Some(inode);
            self.commit(st, tx, false)?;
        } else {
            inode.size = size;
            st.files.get_mut(&ino).expect("file").inode = Some(inode);
        }
        Ok(())
    }

    /// Zero `[off, off+len)`: whole units become holes, partial ones are rewritten.
    fn zero_range(&self, st: &mut State, ino: u64, off: u64, len: u64) -> R<()> {
        let inode = self.file_inode(st, ino)?;
        let end = off + len;
        if len == 0 {
            return Ok(());
        }
        let (first, last) = (off / UNIT, (end - 1) / UNIT);
        let tx = self.begin_tx(&mut *st)?;
        let mut stored = inode.stored;
        for u in first..=last {
            let ustart = u * UNIT;
            let from = off.max(ustart);
            let to = end.min(ustart + UNIT);
            if from == ustart && to == ustart + UNIT {
                if st
                    .files
                    .get_mut(&ino)
                    .expect("file")
                    .units
                    .remove(&u)
                    .is_some()
                {
                    st.dirty_bytes -= UNIT.min(st.dirty_bytes);
                }
                let old = tx
                    .open_table(EXTENTS)
                    .map_err(db_err)?
                    .remove((ino, u))
                    .map_err(db_err)?
                    .map(|v| Extent::decode(v.value()));
                if let Some(Ok(x)) = old {
                    st.pending_free.push((x.phys, x.alloc as u64));
                    stored -= (x.alloc as u64).min(stored);
                }
                self.rd.uncache(ino, u);
            } else if ustart < inode.size {
                self.unit_for_write(st, ino, u)?;
                let d = st
                    .files
                    .get_mut(&ino)
                    .expect("file")
                    .units
                    .get_mut(&u)
                    .expect("unit");
                d.bytes_mut()[(from - ustart) as usize..(to - ustart) as usize].fill(0);
            }
        }
        let f = st.files.get_mut(&ino).expect("file");
        let mut i = f.inode.clone().expect("file inode");
        i.stored = stored;
        self.put_inode(st, &tx, &i)?;
        st.files.get_mut(&ino).expect("file").inode = Some(i);
        self.commit(st, tx, false)
    }

    pub fn fallocate(&self, ino: u64, off: u64, len: u64, mode: i32) -> R<()> {
        let keep = mode & libc::FALLOC_FL_KEEP_SIZE != 0;
        let punch = mode & libc::FALLOC_FL_PUNCH_HOLE != 0;
        let zero = mode & libc::FALLOC_FL_ZERO_RANGE != 0;
        if mode
            & !(libc::FALLOC_FL_KEEP_SIZE | libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_ZERO_RANGE)
            != 0
        {
            return Err(err(libc::EOPNOTSUPP));
        }
        if punch && (!keep || zero) {
            return Err(err(libc::EINVAL));
        }
        let end = off
            .checked_add(len)
            .filter(|e| *e <= i64::MAX as u64)
            .ok_or(err(libc::EFBIG))?;
        if len == 0 {
            return Err(err(libc::EINVAL));
        }
        let mut st = self.st.lock();
        let inode = self.file_inode(&mut st, ino)?;
        if inode.kind != Kind::File {
            return Err(err(libc::ENODEV));
        }
        if punch || zero {
            let zend = if punch { end.min(inode.size) } else { end };
            if zend > off {
                self.zero_range(&mut st, ino, off, zend - off)?;
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
                    !st.files[&ino].units.contains_key(u)
                        && stored.get(u).is_none_or(|x| (x.alloc as u64) < UNIT)
                })
                .collect();
            if self.room(&st) < short.len() as u64 * UNIT {
                self.flush_all(&mut st, true)?;
                self.drain_deferred(&mut st);
                if self.room(&st) < short.len() as u64 * UNIT {
                    return Err(err(libc::ENOSPC));
                }
            }
            for u in short {
                self.unit_for_write(&mut st, ino, u)?;
            }
            let f = st.files.get_mut(&ino).expect("file");
            for (_, d) in f.units.range_mut(first..=last) {
                d.keep = true;
            }
        }
        if !keep && end > inode.size {
            let mut i = self.file_inode(&mut st, ino)?;
            i.size = end;
            i.ctime = Ts::now();
            st.files.get_mut(&ino).expect("file").inode = Some(i);
        }
        Ok(())
    }

    /// SEEK_DATA / SEEK_HOLE at 4 KiB granularity: a block is data when it
    /// holds a non-zero byte (blocks of zeros read the same as holes).
    pub fn lseek(&self, ino: u64, off: u64, whence: i32) -> R<u64> {
        let st = self.st.lock();
        let inode = self.load_inode(&st, ino)?;
        if off >= inode.size {
            return Err(err(libc::ENXIO));
        }
        let (first, last) = (off / UNIT, (inode.size - 1) / UNIT);
        let mut maps: BTreeMap<u64, u16> = self
            .extents(ino, first, last)?
            .into_iter()
            .map(|(u, x)| (u, x.map))
            .collect();
        if let Some(f) = st.files.get(&ino) {
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
                Err(err(libc::ENXIO))
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
            _ => Err(err(libc::EINVAL)),
        }
    }

    // ----- xattrs -----

    pub fn setxattr(&self, ino: u64, name: &[u8], value: &[u8], flags: i32) -> R<()> {
        if name.is_empty() || name.len() > 255 {
            return Err(err(libc::ERANGE));
        }
        if value.len() > XATTR_SIZE_MAX {
            return Err(err(libc::E2BIG));
        }
        let mut st = self.st.lock();
        let tx = self.begin_tx(&mut *st)?;
        let mut inode = self.inode_tx(&st, &tx, ino)?;
        if name == ACL_ACCESS {
            // The kernel leaves ACLs to us: an access ACL carries the mode bits,
            // and one with no named entries is nothing but a mode (as on ext4).
            let (mode, minimal) = acl_mode(value).ok_or(err(libc::EINVAL))?;
            inode.perm = (inode.perm & !0o777) | mode;
            if minimal {
                tx.open_table(XATTRS)
                    .map_err(db_err)?
                    .remove((ino, name))
                    .map_err(db_err)?;
                inode.ctime = Ts::now();
                self.put_inode(&mut st, &tx, &inode)?;
                return self.commit(&mut st, tx, false);
            }
        }
        {
            let mut t = tx.open_table(XATTRS).map_err(db_err)?;
            let exists = t.get((ino, name)).map_err(db_err)?.is_some();
            if flags & libc::XATTR_CREATE != 0 && exists {
                return Err(err(libc::EEXIST));
            }
            if flags & libc::XATTR_REPLACE != 0 && !exists {
                return Err(err(libc::ENODATA));
            }
            t.insert((ino, name), value).map_err(db_err)?;
        }
        inode.ctime = Ts::now();
        self.put_inode(&mut st, &tx, &inode)?;
        self.commit(&mut st, tx, false)
    }

    pub fn getxattr(&self, ino: u64, name: &[u8]) -> R<Vec<u8>> {
        if name.len() > 255 {
            return Err(err(libc::ERANGE));
        }
        let st = self.st.lock();
        self.load_inode(&st, ino)?;
        let rtx = self.db.begin_read().map_err(db_err)?;
        let t = rtx.open_table(XATTRS).map_err(db_err)?;
        let v = t
            .get((ino, name))
            .map_err(db_err)?
            .ok_or(err(libc::ENODATA))?;
        Ok(v.value().to_vec())
    }

    pub fn listxattr(&self, ino: u64) -> R<Vec<u8>> {
        let st = self.st.lock();
        self.load_inode(&st, ino)?;
        let rtx = self.db.begin_read().map_err(db_err)?;
        let t = rtx.open_table(XATTRS).map_err(db_err)?;
        let mut out = Vec::new();
        for row in t.range((ino, &[][..])..).map_err(db_err)? {
            let (k, _) = row.map_err(db_err)?;
            let (i, n) = k.value();
            if i != ino {
                break;
            }
            out.extend_from_slice(n);
            out.push(0);
        }
        Ok(out)
    }

    pub fn removexattr(&self, ino: u64, name: &[u8]) -> R<()> {
        let mut st = self.st.lock();
        let tx = self.begin_tx(&mut *st)?;
        let mut inode = self.inode_tx(&st, &tx, ino)?;
        let gone = tx
            .open_table(XATTRS)
            .map_err(db_err)?
            .remove((ino, name))
            .map_err(db_err)?
            .is_some();
        if !gone {
            return Err(err(libc::ENODATA));
        }
        inode.ctime = Ts::now();
        self.put_inode(&mut st, &tx, &inode)?;
        self.commit(&mut st, tx, false)
    }

    pub fn usage(&self) -> R<Usage> {
        let st = self.st.lock();
        let rtx = self.db.begin_read().map_err(db_err)?;
        // A pool that was never mounted read-write has no tables yet.
        let inodes = match rtx.open_table(INODES) {
            Ok(t) => t.len().map_err(db_err)?,
            Err(redb::TableError::TableDoesNotExist(_)) => 0,
            Err(e) => return Err(db_err(e)),
        };
        let pending: u64 = st.pending_free.iter().map(|(_, l)| l).sum::<u64>()
            + st.deferred_free.iter().map(|(_, _, l)| l).sum::<u64>();
        Ok(Usage {
            total: st.alloc.total_bytes(),
            free: (st.alloc.free_bytes() + pending).saturating_sub(st.dirty_bytes),
            inodes,
        })
    }

    /// File data as written (logical) and as stored in the pool: scans the extent map.
    pub fn space(&self) -> R<Space> {
        let _st = self.st.lock();
        let rtx = self.db.begin_read().map_err(db_err)?;
        let mut sp = Space {
            logical: 0,
            stored: 0,
        };
        let t = match rtx.open_table(EXTENTS) {
            Ok(t) => t,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(sp),
            Err(e) => return Err(db_err(e)),
        };
        for row in t.iter().map_err(db_err)? {
            let (_, v) = row.map_err(db_err)?;
            let x = Extent::decode(v.value())?;
            sp.logical += x.logical as u64;
            sp.stored += x.alloc as u64;
        }
        Ok(sp)
    }

    /// Make everything durable and refuse further syncs; the stack stops
    /// when the last handle on the filesystem is dropped.
    pub fn shutdown(&self) -> R<()> {
        if self.failed() {
            // A member stopped answering: nothing more is written; the pool
            // stays in its last durable state (fsck it after the member is back).
            self.closed
                .store(true, std::sync::atomic::Ordering::Release);
            return Err(Errno::EIO);
        }
        // The session is over: nothing can hold a removed file any more.
        if !self.read_only && !self.closed.load(std::sync::atomic::Ordering::Acquire) {
            match self.purge_all_orphans() {
                Ok(0) => {}
                Ok(n) => log::debug!("freed {n} removed file(s) still held at unmount"),
                Err(e) => log::warn!("freeing removed files at unmount: {e} (freed at next mount)"),
            }
        }
        let r = self.sync();
        self.closed
            .store(true, std::sync::atomic::Ordering::Release);
        r
    }
}

const ACL_ACCESS: &[u8] = b"system.posix_acl_access";
const ACL_DEFAULT: &[u8] = b"system.posix_acl_default";
const ACL_USER_OBJ: u16 = 0x01;
const ACL_GROUP_OBJ: u16 = 0x04;
const ACL_MASK: u16 = 0x10;
const ACL_OTHER: u16 = 0x20;

/// Entries (tag, perm, id) of an ACL in its xattr form; None if malformed.
fn acl_entries(v: &[u8]) -> Option<Vec<(u16, u16, u32)>> {
    if v.len() < 4 || (v.len() - 4) % 8 != 0 || u32::from_le_bytes(v[..4].try_into().ok()?) != 2 {
        return None;
    }
    Some(
        v[4..]
            .chunks(8)
            .map(|e| {
                (
                    u16::from_le_bytes([e[0], e[1]]),
                    u16::from_le_bytes([e[2], e[3]]) & 7,
                    u32::from_le_bytes([e[4], e[5], e[6], e[7]]),
                )
            })
            .collect(),
    )
}

/// What a new inode gets from its parent's default ACL and the requested
/// mode (as Linux's posix_acl_create): its permission bits, and its access
/// ACL unless that says no more than the bits.
fn acl_create(default: &[u8], mode: u32) -> Option<(u16, Option<Vec<u8>>)> {
    let mut entries = acl_entries(default)?;
    let has_mask = entries.iter().any(|e| e.0 == ACL_MASK);
    let m = mode as u16;
    for e in entries.iter_mut() {
        match e.0 {
            ACL_USER_OBJ => e.1 &= (m >> 6) & 7,
            ACL_MASK => e.1 &= (m >> 3) & 7,
            ACL_GROUP_OBJ if !has_mask => e.1 &= (m >> 3) & 7,
            ACL_OTHER => e.1 &= m & 7,
            _ => {}
        }
    }
    let mut out = 2u32.to_le_bytes().to_vec();
    for (tag, perm, id) in &entries {
        out.extend_from_slice(&tag.to_le_bytes());
        out.extend_from_slice(&perm.to_le_bytes());
        out.extend_from_slice(&id.to_le_bytes());
    }
    let (bits, minimal) = acl_mode(&out)?;
    Some((bits, (!minimal).then_some(out)))
}

/// The permission bits an access ACL (Linux xattr form) implies, and whether
/// it is minimal (owner, group and other only). None if malformed.
fn acl_mode(v: &[u8]) -> Option<(u16, bool)> {
    let (mut user, mut group, mut other, mut mask) = (None, None, None, None);
    let mut minimal = true;
    for (tag, perm, _) in acl_entries(v)? {
        match tag {
            ACL_USER_OBJ => user = Some(perm),
            ACL_GROUP_OBJ => group = Some(perm),
            ACL_OTHER => other = Some(perm),
            ACL_MASK => {
                mask = Some(perm);
                minimal = false;
            }
            0x02 | 0x08 => minimal = false,
            _ => return None,
        }
    }
    let g = mask.or(group)?;
    Some(((user? << 6) | (g << 3) | other?, minimal))
}

/// Copy `src[from..]` into `out`, as far as `src` reaches; the rest of `out`
/// stays as it is (zeros: a unit's bytes past its stored length read as zeros).
fn copy_clipped(out: &mut [u8], src: &[u8], from: usize) {
    let n = src.len().saturating_sub(from).min(out.len());
    if n > 0 {
        out[..n].copy_from_slice(&src[from..from + n]);
        stackfs_layers::buf::count_copy(n);
    }
}

/// Check a unit read from the pool; its bytes up to the logical length.
fn verify_unit(ino: u64, u: u64, x: &Extent, r: IoResult, b: &Buf) -> R<Buf> {
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
    let n = (x.logical as usize).min(UNIT as usize).min(b.len());
    Ok(b.slice(0, n))
}
