//! fsck's repairs: the safe ones, applied to the database in one durable
//! transaction, then the superblock copies rewritten.

use super::Problem;
use crate::error::FsError;
use crate::fs::{dirent_decode, dirent_val, Fs, Inode, Kind, ROOT};
use crate::fs::{COOKIES, DIRENTS, EXTENTS, INODES};
use redb::{Durability, ReadableTable, Table, WriteTransaction};

/// A failure while repairing.
fn repair_error(x: impl std::fmt::Display) -> FsError {
    FsError::Other(format!("repair: {x}"))
}

/// Apply the safe repairs in one durable transaction, then rewrite unusable
/// superblock copies; returns how many problems were repaired.
pub(super) fn fix(fs: &Fs, problems: &[Problem]) -> Result<usize, FsError> {
    let mut fixed = 0;
    let mut tx = fs.begin().map_err(repair_error)?;
    {
        let mut tables = RepairTables::open(&tx)?;
        for p in problems {
            if tables.repair(p)? {
                fixed += 1;
            }
        }
    }
    tx.set_durability(Durability::Immediate)
        .map_err(repair_error)?;
    tx.commit().map_err(repair_error)?;
    fixed += rewrite_superblocks(fs, problems)?;
    Ok(fixed)
}

/// The tables a repair changes, open in its write transaction.
struct RepairTables<'txn> {
    inodes: Table<'txn, u64, &'static [u8]>,
    dirents: Table<'txn, (u64, &'static [u8]), &'static [u8]>,
    cookies: Table<'txn, (u64, u64), &'static [u8]>,
    extents: Table<'txn, (u64, u64), &'static [u8]>,
}

impl<'txn> RepairTables<'txn> {
    fn open(tx: &'txn WriteTransaction) -> Result<Self, FsError> {
        Ok(RepairTables {
            inodes: tx.open_table(INODES).map_err(repair_error)?,
            dirents: tx.open_table(DIRENTS).map_err(repair_error)?,
            cookies: tx.open_table(COOKIES).map_err(repair_error)?,
            extents: tx.open_table(EXTENTS).map_err(repair_error)?,
        })
    }

    /// Repair one problem if it is one fixed in the database; whether it was.
    fn repair(&mut self, problem: &Problem) -> Result<bool, FsError> {
        match problem {
            Problem::ExtentLeaked { ino, unit } => {
                self.extents.remove((*ino, *unit)).map_err(repair_error)?;
                Ok(true)
            }
            Problem::DanglingEntry { parent, name, .. } => {
                self.remove_entry(*parent, name)?;
                Ok(true)
            }
            Problem::WrongLinkCount { ino, want, .. } => {
                let Some(mut i) = self.load(*ino) else {
                    return Ok(false);
                };
                i.nlink = *want;
                self.store(*ino, &i)?;
                Ok(true)
            }
            Problem::Unreachable { ino } => self.adopt(*ino),
            // Superblock copies are rewritten after the commit.
            _ => Ok(false),
        }
    }

    /// The inode, if its record is there and decodes.
    fn load(&self, ino: u64) -> Option<Inode> {
        self.inodes
            .get(ino)
            .ok()
            .flatten()
            .and_then(|v| Inode::decode(ino, v.value()).ok())
    }

    fn store(&mut self, ino: u64, inode: &Inode) -> Result<(), FsError> {
        self.inodes
            .insert(ino, inode.encode().as_slice())
            .map_err(repair_error)?;
        Ok(())
    }

    /// Remove a directory entry and its readdir cookie.
    fn remove_entry(&mut self, parent: u64, name: &[u8]) -> Result<(), FsError> {
        if let Some(v) = self.dirents.remove((parent, name)).map_err(repair_error)? {
            if let Ok((_, _, cookie)) = dirent_decode(v.value()) {
                self.cookies
                    .remove((parent, cookie))
                    .map_err(repair_error)?;
            }
        }
        Ok(())
    }

    /// Add the entry `name` → `ino` to directory `parent` (whose inode is
    /// `dir`, updated in memory: the caller stores it), with a new cookie.
    fn add_entry(
        &mut self,
        parent: u64,
        dir: &mut Inode,
        name: &[u8],
        ino: u64,
        kind: Kind,
    ) -> Result<(), FsError> {
        let cookie = dir.next_cookie.max(3);
        dir.next_cookie = cookie + 1;
        self.dirents
            .insert((parent, name), dirent_val(ino, kind, cookie).as_slice())
            .map_err(repair_error)?;
        self.cookies
            .insert((parent, cookie), name)
            .map_err(repair_error)?;
        Ok(())
    }

    /// Give an unreachable inode the name `#ino` in /lost+found, as e2fsck
    /// does; false if /lost+found or the inode cannot be loaded.
    fn adopt(&mut self, ino: u64) -> Result<bool, FsError> {
        let Some(lf) = self.lost_found(ino)? else {
            return Ok(false);
        };
        let (Some(mut dir), Some(mut i)) = (self.load(lf), self.load(ino)) else {
            return Ok(false);
        };
        if i.kind == Kind::Dir {
            dir.nlink += 1;
            i.parent = lf;
            i.nlink = i.nlink.max(2);
        } else {
            i.nlink = 1;
        }
        let name = format!("#{ino}");
        self.add_entry(lf, &mut dir, name.as_bytes(), ino, i.kind)?;
        self.store(lf, &dir)?;
        self.store(ino, &i)?;
        Ok(true)
    }

    /// The inode number of /lost+found, created if missing (numbered after
    /// both `adoptee` and the highest inode); None if the root is missing.
    fn lost_found(&mut self, adoptee: u64) -> Result<Option<u64>, FsError> {
        let existing = self
            .dirents
            .get((ROOT, &b"lost+found"[..]))
            .map_err(repair_error)?
            .map(|v| dirent_decode(v.value()));
        if let Some(entry) = existing {
            return Ok(Some(entry.map_err(repair_error)?.0));
        }
        let Some(mut root) = self.load(ROOT) else {
            return Ok(None);
        };
        let highest = self
            .inodes
            .last()
            .ok()
            .flatten()
            .map(|(k, _)| k.value())
            .unwrap_or(ROOT);
        let lf = adoptee.max(highest) + 1;
        self.store(lf, &Inode::new_dir(lf, 0o700, ROOT))?;
        root.nlink += 1;
        self.add_entry(ROOT, &mut root, b"lost+found", lf, Kind::Dir)?;
        self.store(ROOT, &root)?;
        Ok(Some(lf))
    }
}

/// Rewrite both superblock copies of every device from the good one, if
/// any copy is unusable; returns how many unusable copies there were.
fn rewrite_superblocks(fs: &Fs, problems: &[Problem]) -> Result<usize, FsError> {
    let unusable = problems
        .iter()
        .filter(|p| matches!(p, Problem::SuperblockCopy { .. }))
        .count();
    let (true, Some(pool)) = (unusable > 0, &fs.pool) else {
        return Ok(0);
    };
    let devices: Vec<_> = pool
        .paths
        .iter()
        .cloned()
        .zip(pool.sizes.iter().copied())
        .collect();
    crate::pool::update_superblocks(&devices, pool.sb_key.as_ref(), |_| {})
        .map_err(repair_error)?;
    Ok(unusable)
}
