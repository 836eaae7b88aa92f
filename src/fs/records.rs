//! The on-disk records of the filesystem: the redb tables, inodes, extents,
//! directory entries and their readdir cookies.

use super::*;

pub(crate) const INODES: TableDefinition<u64, &[u8]> = TableDefinition::new("inodes");
pub(crate) const DIRENTS: TableDefinition<(u64, &[u8]), &[u8]> = TableDefinition::new("dirents");
pub(crate) const COOKIES: TableDefinition<(u64, u64), &[u8]> = TableDefinition::new("cookies");
pub(crate) const EXTENTS: TableDefinition<(u64, u64), &[u8]> = TableDefinition::new("extents");
pub(crate) const XATTRS: TableDefinition<(u64, &[u8]), &[u8]> = TableDefinition::new("xattrs");
pub(crate) const SYMLINKS: TableDefinition<u64, &[u8]> = TableDefinition::new("symlinks");
pub(crate) const ORPHANS: TableDefinition<u64, ()> = TableDefinition::new("orphans");
pub(super) const COUNTERS: TableDefinition<&str, u64> = TableDefinition::new("counters");

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

/// Whether times come from the kernel's coarse clock (see `use_coarse_clock`).
static COARSE_CLOCK: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Stamp times with the coarse clock (the jiffy the kernel itself stamps
/// file times with). Under FUSE's writeback cache the kernel keeps a file's
/// times and sends them at close: a time the daemon stamped finer than the
/// kernel's own looks changed to it, and costs a SETATTR per file.
pub fn use_coarse_clock(on: bool) {
    COARSE_CLOCK.store(on, std::sync::atomic::Ordering::Relaxed);
}

impl Ts {
    pub fn now() -> Ts {
        if COARSE_CLOCK.load(std::sync::atomic::Ordering::Relaxed) {
            let mut t = libc::timespec {
                tv_sec: 0,
                tv_nsec: 0,
            };
            // SAFETY: `t` is a valid timespec to write.
            if unsafe { libc::clock_gettime(libc::CLOCK_REALTIME_COARSE, &mut t) } == 0 {
                return Ts {
                    sec: t.tv_sec,
                    nsec: t.tv_nsec as u32,
                };
            }
        }
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

    pub(crate) fn decode(ino: u64, raw: &[u8]) -> ErrnoResult<Inode> {
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
        let ts = |d: &mut Dec| -> ErrnoResult<Ts> {
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
    pub reserved_len: u32,
    /// Bytes of file data the unit holds; the rest of the unit reads as zeros.
    pub data_len: u32,
    /// Bytes the filesystem wrote (the data rounded up to 4 KiB).
    pub written_len: u32,
    /// Compression codec (0: raw) and compressed length, from the extent tag.
    pub codec: u8,
    pub stored_len: u32,
    /// The crypt layer's nonce and key id (12 bytes each) and MAC (zeros
    /// without crypt), from the extent tag. Records of version 1 (before
    /// per-mount keys) have no key id: zeros, the master key.
    pub nonce: [u8; 24],
    pub mac: [u8; 16],
    /// CRC32C of the `written_len` bytes written (before any layer transformed them).
    pub crc: u32,
    /// Bit i set: 4 KiB block i of the unit holds non-zero bytes. Blocks of
    /// zeros are reported as holes by SEEK_DATA/SEEK_HOLE.
    pub map: u16,
}

/// Which 4 KiB blocks of a unit's bytes are not all zero.
pub(super) fn block_map(data: &[u8]) -> u16 {
    data.chunks(BLOCK as usize)
        .enumerate()
        .filter(|(_, b)| b.iter().any(|x| *x != 0))
        .fold(0, |m, (i, _)| m | 1 << i)
}

impl Extent {
    /// What the layers need to read this extent back.
    pub(super) fn tag(&self) -> ExtentTag {
        ExtentTag {
            codec: self.codec,
            logical_len: self.written_len,
            stored_len: self.stored_len,
            nonce: self.nonce,
            mac: self.mac,
            flags: TAG_DETACHED,
            // Which mirror copies to read is per read, not per extent.
            ..ExtentTag::default()
        }
    }

    pub(crate) fn encode(&self) -> Vec<u8> {
        let mut e = Enc::default();
        e.u8(2)
            .u64(self.phys)
            .u32(self.reserved_len)
            .u32(self.data_len)
            .u32(self.written_len)
            .u8(self.codec)
            .u32(self.stored_len)
            .bytes(&self.nonce)
            .bytes(&self.mac)
            .u32(self.crc)
            .u16(self.map);
        e.0
    }
    pub fn decode(raw: &[u8]) -> ErrnoResult<Extent> {
        let mut d = Dec::new(raw);
        let bad = |_| Errno::EIO;
        let version = d.u8().map_err(bad)?;
        if version != 1 && version != 2 {
            return Err(Errno::EIO);
        }
        Ok(Extent {
            phys: d.u64().map_err(bad)?,
            reserved_len: d.u32().map_err(bad)?,
            data_len: d.u32().map_err(bad)?,
            written_len: d.u32().map_err(bad)?,
            codec: d.u8().map_err(bad)?,
            stored_len: d.u32().map_err(bad)?,
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

pub(crate) fn dirent_decode(raw: &[u8]) -> ErrnoResult<(u64, Kind, u64)> {
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
pub(super) const HASHED_COOKIE_MIN: u64 = 1 << 32;
pub(super) const HASHED_COOKIE_MAX: u64 = i64::MAX as u64;

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
