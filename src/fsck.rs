//! `stackfs fsck`: check every superblock copy, the metadata store, every
//! extent (inside the data region, no overlap, owned by a live regular file),
//! every directory entry, link counts and unreachable inodes; with
//! `verify_data`, read back every extent through the stack (MAC and CRC).
//! With `repair`, fix what is safe: drop extents and entries that point at
//! nothing, set wrong link counts, move unreachable inodes to /lost+found.
//! Exit codes as e2fsck: 0 clean, 1 corrected, 4 left uncorrected, 8 error.

use crate::error::FsError;
use crate::fs::{dirent_decode, dirent_val, Extent, Fs, Inode, Kind, ROOT, UNIT};
use crate::fs::{COOKIES, DIRENTS, EXTENTS, INODES, ORPHANS, SYMLINKS};
use crate::superblock::{self, SB_SIZE};
use redb::{Durability, ReadableDatabase, ReadableTable};
use std::collections::{BTreeMap, HashMap};
use std::os::unix::fs::FileExt;

pub const CLEAN: u8 = 0;
pub const CORRECTED: u8 = 1;
pub const UNCORRECTED: u8 = 4;
pub const OPERATIONAL: u8 = 8;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Problem {
    /// A superblock copy that does not read back (the other one does).
    SuperblockCopy {
        device: String,
        which: &'static str,
        why: String,
    },
    ExtentOutside {
        ino: u64,
        unit: u64,
        phys: u64,
    },
    ExtentOverlap {
        ino: u64,
        unit: u64,
        other: u64,
    },
    /// An extent whose inode is gone or is not a regular file: its space is leaked.
    ExtentLeaked {
        ino: u64,
        unit: u64,
    },
    BadRecord {
        what: String,
    },
    DanglingEntry {
        parent: u64,
        name: Vec<u8>,
        ino: u64,
    },
    WrongLinkCount {
        ino: u64,
        have: u32,
        want: u32,
    },
    /// Not reachable from the root, not pending removal.
    Unreachable {
        ino: u64,
    },
    MissingSymlinkTarget {
        ino: u64,
    },
    BadData {
        ino: u64,
        unit: u64,
    },
    /// redb's integrity check of the metadata store failed (or repaired it).
    MetadataStore {
        why: String,
    },
}

impl Problem {
    /// What `repair` can fix without losing data that is still reachable.
    fn fixable(&self) -> bool {
        matches!(
            self,
            Problem::SuperblockCopy { .. }
                | Problem::ExtentLeaked { .. }
                | Problem::DanglingEntry { .. }
                | Problem::WrongLinkCount { .. }
                | Problem::Unreachable { .. }
        )
    }
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Problem::SuperblockCopy { device, which, why } => {
                write!(f, "{device}: {which} superblock unusable ({why})")
            }
            Problem::ExtentOutside { ino, unit, phys } => write!(
                f,
                "inode {ino} unit {unit}: extent at {phys} lies outside the data region"
            ),
            Problem::ExtentOverlap { ino, unit, other } => write!(
                f,
                "inode {ino} unit {unit}: extent overlaps one of inode {other}"
            ),
            Problem::ExtentLeaked { ino, unit } => write!(
                f,
                "inode {ino} unit {unit}: extent of no live file (leaked space)"
            ),
            Problem::BadRecord { what } => write!(f, "malformed record: {what}"),
            Problem::DanglingEntry { parent, name, ino } => {
                write!(
                    f,
                    "directory {parent}: entry {:?} points at missing inode {ino}",
                    String::from_utf8_lossy(name)
                )
            }
            Problem::WrongLinkCount { ino, have, want } => {
                write!(f, "inode {ino}: link count {have}, should be {want}")
            }
            Problem::Unreachable { ino } => write!(f, "inode {ino}: not reachable from the root"),
            Problem::MissingSymlinkTarget { ino } => write!(f, "symlink {ino}: target missing"),
            Problem::BadData { ino, unit } => write!(
                f,
                "inode {ino} offset {}: data fails its MAC or checksum",
                unit * UNIT
            ),
            Problem::MetadataStore { why } => write!(f, "metadata store: {why}"),
        }
    }
}

pub struct Report {
    pub problems: Vec<Problem>,
    pub repaired: usize,
    pub inodes: u64,
    pub extents: u64,
}

impl Report {
    pub fn exit_code(&self) -> u8 {
        let left = self.problems.len() - self.repaired;
        if left > 0 {
            UNCORRECTED
        } else if self.repaired > 0 {
            CORRECTED
        } else {
            CLEAN
        }
    }
}

/// Called with (done, total) as extents are checked or read.
pub type Progress<'a> = &'a dyn Fn(u64, u64);

fn bad(what: impl Into<String>) -> Problem {
    Problem::BadRecord { what: what.into() }
}

/// Both superblock copies of every device of the pool.
pub fn check_superblocks(fs: &Fs) -> Vec<Problem> {
    let mut out = Vec::new();
    // A filesystem opened over a bare stack (tests) has no superblocks.
    let Some(pool) = &fs.pool else {
        return out;
    };
    for (path, size) in pool.paths.iter().zip(&pool.sizes) {
        let Ok(f) = std::fs::File::open(path) else {
            continue;
        };
        for (which, off) in [("primary", 0), ("backup", superblock::backup_offset(*size))] {
            let mut raw = vec![0u8; SB_SIZE];
            let why = match f.read_exact_at(&mut raw, off) {
                Err(e) => Some(e.to_string()),
                Ok(()) => match superblock::Superblock::decode(&raw) {
                    Err(e) => Some(e.to_string()),
                    Ok(sb) if pool.sb_key.is_some() && sb.version < 2 => {
                        Some("format 1, without a MAC".into())
                    }
                    Ok(sb) if pool.sb_key.as_ref().is_some_and(|k| !sb.verify(k)) => {
                        Some("fails authentication (changed outside stackfs?)".into())
                    }
                    Ok(sb) if sb.pool_uuid != fs.geometry.pool_uuid => {
                        Some("belongs to another pool".into())
                    }
                    Ok(_) => None,
                },
            };
            if let Some(why) = why {
                out.push(Problem::SuperblockCopy {
                    device: path.display().to_string(),
                    which,
                    why,
                });
            }
        }
    }
    out
}

pub fn check(
    fs: &Fs,
    verify_data: bool,
    repair: bool,
    progress: Progress,
) -> Result<Report, FsError> {
    let e = |x: &dyn std::fmt::Display| FsError::damaged(format!("metadata store: {x}"));
    let mut problems = check_superblocks(fs);
    // redb's own check ran when the filesystem was opened (lenient).
    if let Some(why) = fs.store_problem() {
        problems.push(Problem::MetadataStore { why: why.into() });
    }
    // Every sector the store's version table names, read back as it is on
    // disk now (a second, read-only view: the durable state).
    match crate::metastore::MetaStore::open(
        fs.stack.meta.clone(),
        fs.geometry.meta_len,
        fs.geometry.pool_uuid,
        true,
    ) {
        Ok(view) => problems.extend(
            view.verify_all()
                .into_iter()
                .map(|why| Problem::MetadataStore { why }),
        ),
        Err(why) => problems.push(Problem::MetadataStore {
            why: why.to_string(),
        }),
    }
    let rtx = fs.db().begin_read().map_err(|x| e(&x))?;
    // Inodes.
    let mut inodes: BTreeMap<u64, Inode> = BTreeMap::new();
    for row in rtx
        .open_table(INODES)
        .map_err(|x| e(&x))?
        .iter()
        .map_err(|x| e(&x))?
    {
        let (k, v) = row.map_err(|x| e(&x))?;
        match Inode::decode(k.value(), v.value()) {
            Ok(i) => {
                inodes.insert(k.value(), i);
            }
            Err(_) => problems.push(bad(format!("inode {}", k.value()))),
        }
    }
    // Directory entries and the references they make.
    let mut refs: HashMap<u64, u32> = HashMap::new();
    let mut subdirs: HashMap<u64, u32> = HashMap::new();
    let cookies = rtx.open_table(COOKIES).map_err(|x| e(&x))?;
    for row in rtx
        .open_table(DIRENTS)
        .map_err(|x| e(&x))?
        .iter()
        .map_err(|x| e(&x))?
    {
        let (k, v) = row.map_err(|x| e(&x))?;
        let (parent, name) = k.value();
        let Ok((ino, kind, cookie)) = dirent_decode(v.value()) else {
            problems.push(bad(format!(
                "entry {:?} of directory {parent}",
                String::from_utf8_lossy(name)
            )));
            continue;
        };
        if !inodes.contains_key(&ino) {
            problems.push(Problem::DanglingEntry {
                parent,
                name: name.to_vec(),
                ino,
            });
            continue;
        }
        let cookie_ok = cookies
            .get((parent, cookie))
            .map_err(|x| e(&x))?
            .is_some_and(|c| c.value() == name);
        if !cookie_ok {
            problems.push(bad(format!(
                "readdir cookie of entry {:?} in directory {parent}",
                String::from_utf8_lossy(name)
            )));
        }
        *refs.entry(ino).or_default() += 1;
        if kind == Kind::Dir {
            *subdirs.entry(parent).or_default() += 1;
        }
    }
    let orphans: Vec<u64> = rtx
        .open_table(ORPHANS)
        .map_err(|x| e(&x))?
        .iter()
        .map_err(|x| e(&x))?
        .filter_map(|r| r.ok().map(|(k, _)| k.value()))
        .collect();
    let symlinks = rtx.open_table(SYMLINKS).map_err(|x| e(&x))?;
    for (ino, i) in &inodes {
        if *ino == ROOT {
            continue;
        }
        let have = refs.get(ino).copied().unwrap_or(0);
        if have == 0 {
            if !orphans.contains(ino) {
                problems.push(Problem::Unreachable { ino: *ino });
            }
            continue;
        }
        let want = if i.kind == Kind::Dir {
            2 + subdirs.get(ino).copied().unwrap_or(0)
        } else {
            have
        };
        if i.nlink != want {
            problems.push(Problem::WrongLinkCount {
                ino: *ino,
                have: i.nlink,
                want,
            });
        }
        if i.kind == Kind::Symlink && symlinks.get(*ino).map_err(|x| e(&x))?.is_none() {
            problems.push(Problem::MissingSymlinkTarget { ino: *ino });
        }
    }
    if let Some(root) = inodes.get(&ROOT) {
        let want = 2 + subdirs.get(&ROOT).copied().unwrap_or(0);
        if root.nlink != want {
            problems.push(Problem::WrongLinkCount {
                ino: ROOT,
                have: root.nlink,
                want,
            });
        }
    } else {
        problems.push(bad("the root directory is missing"));
    }
    // Extents: inside the data region, no overlap, owned by a live file.
    let (start, end) = (fs.geometry.meta_len, fs.stack.top.capacity());
    let table = rtx.open_table(EXTENTS).map_err(|x| e(&x))?;
    let total = redb::ReadableTableMetadata::len(&table).map_err(|x| e(&x))?;
    let mut spans: Vec<(u64, u64, u64, u64)> = Vec::new();
    let mut to_verify: Vec<(u64, u64, Extent)> = Vec::new();
    for (n, row) in table.iter().map_err(|x| e(&x))?.enumerate() {
        let (k, v) = row.map_err(|x| e(&x))?;
        let (ino, unit) = k.value();
        progress(n as u64, total);
        let Ok(x) = Extent::decode(v.value()) else {
            problems.push(bad(format!("extent of inode {ino} unit {unit}")));
            continue;
        };
        if !inodes.get(&ino).is_some_and(|i| {
            i.kind == Kind::File && !(refs.get(&ino).is_none() && !orphans.contains(&ino))
        }) {
            problems.push(Problem::ExtentLeaked { ino, unit });
            continue;
        }
        if x.phys < start
            || x.phys.checked_add(x.alloc as u64).is_none_or(|e| e > end)
            || x.alloc % 4096 != 0
        {
            problems.push(Problem::ExtentOutside {
                ino,
                unit,
                phys: x.phys,
            });
            continue;
        }
        spans.push((x.phys, x.alloc as u64, ino, unit));
        to_verify.push((ino, unit, x));
    }
    spans.sort_unstable();
    for w in spans.windows(2) {
        if w[0].0 + w[0].1 > w[1].0 {
            problems.push(Problem::ExtentOverlap {
                ino: w[1].2,
                unit: w[1].3,
                other: w[0].2,
            });
        }
    }
    if verify_data {
        for (n, (ino, unit, x)) in to_verify.iter().enumerate() {
            progress(n as u64, to_verify.len() as u64);
            if fs.read_units(*ino, &[(*unit, *x)]).is_err() {
                problems.push(Problem::BadData {
                    ino: *ino,
                    unit: *unit,
                });
            }
        }
    }
    drop(table);
    drop(cookies);
    drop(symlinks);
    drop(rtx);
    let extents = total;
    let mut repaired = 0;
    if repair && problems.iter().any(|p| p.fixable()) {
        repaired = fix(fs, &problems)?;
    }
    Ok(Report {
        problems,
        repaired,
        inodes: inodes.len() as u64,
        extents,
    })
}

/// Apply the safe repairs in one durable transaction; returns how many.
fn fix(fs: &Fs, problems: &[Problem]) -> Result<usize, FsError> {
    let e = |x: &dyn std::fmt::Display| FsError::Other(format!("repair: {x}"));
    let mut fixed = 0;
    let mut tx = fs.begin().map_err(|x| e(&x))?;
    {
        let mut inodes = tx.open_table(INODES).map_err(|x| e(&x))?;
        let mut dirents = tx.open_table(DIRENTS).map_err(|x| e(&x))?;
        let mut cookies = tx.open_table(COOKIES).map_err(|x| e(&x))?;
        let mut extents = tx.open_table(EXTENTS).map_err(|x| e(&x))?;
        let load = |t: &redb::Table<u64, &[u8]>, ino: u64| -> Option<Inode> {
            t.get(ino)
                .ok()
                .flatten()
                .and_then(|v| Inode::decode(ino, v.value()).ok())
        };
        for p in problems {
            match p {
                Problem::SuperblockCopy { .. } => {}
                Problem::ExtentLeaked { ino, unit } => {
                    extents.remove((*ino, *unit)).map_err(|x| e(&x))?;
                    fixed += 1;
                }
                Problem::DanglingEntry { parent, name, .. } => {
                    if let Some(v) = dirents
                        .remove((*parent, name.as_slice()))
                        .map_err(|x| e(&x))?
                    {
                        if let Ok((_, _, cookie)) = dirent_decode(v.value()) {
                            cookies.remove((*parent, cookie)).map_err(|x| e(&x))?;
                        }
                    }
                    fixed += 1;
                }
                Problem::WrongLinkCount { ino, want, .. } => {
                    if let Some(mut i) = load(&inodes, *ino) {
                        i.nlink = *want;
                        inodes
                            .insert(*ino, i.encode().as_slice())
                            .map_err(|x| e(&x))?;
                        fixed += 1;
                    }
                }
                Problem::Unreachable { ino } => {
                    // Give it a name in /lost+found, as e2fsck does.
                    let existing = dirents
                        .get((ROOT, &b"lost+found"[..]))
                        .map_err(|x| e(&x))?
                        .map(|v| dirent_decode(v.value()));
                    let lf = match existing {
                        Some(d) => d.map_err(|x| e(&x))?.0,
                        None => {
                            let Some(mut root) = load(&inodes, ROOT) else {
                                continue;
                            };
                            let lf = (*ino).max(
                                inodes
                                    .last()
                                    .ok()
                                    .flatten()
                                    .map(|(k, _)| k.value())
                                    .unwrap_or(ROOT),
                            ) + 1;
                            let dir = Inode::new_dir(lf, 0o700, ROOT);
                            inodes
                                .insert(lf, dir.encode().as_slice())
                                .map_err(|x| e(&x))?;
                            let cookie = root.next_cookie.max(3);
                            root.next_cookie = cookie + 1;
                            root.nlink += 1;
                            dirents
                                .insert(
                                    (ROOT, &b"lost+found"[..]),
                                    dirent_val(lf, Kind::Dir, cookie).as_slice(),
                                )
                                .map_err(|x| e(&x))?;
                            cookies
                                .insert((ROOT, cookie), &b"lost+found"[..])
                                .map_err(|x| e(&x))?;
                            inodes
                                .insert(ROOT, root.encode().as_slice())
                                .map_err(|x| e(&x))?;
                            lf
                        }
                    };
                    let (Some(mut dir), Some(mut i)) = (load(&inodes, lf), load(&inodes, *ino))
                    else {
                        continue;
                    };
                    let name = format!("#{ino}");
                    let cookie = dir.next_cookie.max(3);
                    dir.next_cookie = cookie + 1;
                    if i.kind == Kind::Dir {
                        dir.nlink += 1;
                        i.parent = lf;
                        i.nlink = i.nlink.max(2);
                    } else {
                        i.nlink = 1;
                    }
                    dirents
                        .insert(
                            (lf, name.as_bytes()),
                            dirent_val(*ino, i.kind, cookie).as_slice(),
                        )
                        .map_err(|x| e(&x))?;
                    cookies
                        .insert((lf, cookie), name.as_bytes())
                        .map_err(|x| e(&x))?;
                    inodes
                        .insert(lf, dir.encode().as_slice())
                        .map_err(|x| e(&x))?;
                    inodes
                        .insert(*ino, i.encode().as_slice())
                        .map_err(|x| e(&x))?;
                    fixed += 1;
                }
                _ => {}
            }
        }
    }
    tx.set_durability(Durability::Immediate)
        .map_err(|x| e(&x))?;
    tx.commit().map_err(|x| e(&x))?;
    // Superblock copies: rewrite both from the good one.
    let copies = problems
        .iter()
        .any(|p| matches!(p, Problem::SuperblockCopy { .. }));
    if let (true, Some(pool)) = (copies, &fs.pool) {
        let devices: Vec<_> = pool
            .paths
            .iter()
            .cloned()
            .zip(pool.sizes.iter().copied())
            .collect();
        crate::pool::update_superblocks(&devices, pool.sb_key.as_ref(), |_| {})
            .map_err(|x| e(&x))?;
        fixed += problems
            .iter()
            .filter(|p| matches!(p, Problem::SuperblockCopy { .. }))
            .count();
    }
    Ok(fixed)
}

/// For tests of fsck itself: damage the metadata on purpose.
pub fn inject(fs: &Fs, what: &str) -> Result<(), String> {
    let e = |x: &dyn std::fmt::Display| format!("inject: {x}");
    let mut tx = fs.begin().map_err(|x| e(&x))?;
    {
        match what {
            "leaked-extent" => {
                // An extent record of an inode that does not exist.
                let mut t = tx.open_table(EXTENTS).map_err(|x| e(&x))?;
                // In free space at the end of the pool: referenced by no file.
                let phys = fs.stack.top.capacity() - 4096;
                let x = Extent {
                    phys,
                    alloc: 4096,
                    logical: 4096,
                    len: 4096,
                    codec: 0,
                    stored: 4096,
                    nonce: [0; 24],
                    mac: [0; 16],
                    crc: 0,
                    map: 1,
                };
                t.insert((u64::MAX - 1, 0), x.encode().as_slice())
                    .map_err(|x| e(&x))?;
            }
            "wrong-nlink" => {
                let mut t = tx.open_table(INODES).map_err(|x| e(&x))?;
                let victim = t
                    .iter()
                    .map_err(|x| e(&x))?
                    .filter_map(|r| r.ok())
                    .map(|(k, _)| k.value())
                    .find(|k| *k != ROOT)
                    .ok_or("no inode besides the root")?;
                let mut i = Inode::decode(
                    victim,
                    t.get(victim).map_err(|x| e(&x))?.ok_or("gone")?.value(),
                )
                .map_err(|x| e(&x))?;
                i.nlink += 5;
                t.insert(victim, i.encode().as_slice()).map_err(|x| e(&x))?;
            }
            other => {
                return Err(format!(
                    "unknown damage {other:?} (leaked-extent, wrong-nlink)"
                ))
            }
        }
    }
    tx.set_durability(Durability::Immediate)
        .map_err(|x| e(&x))?;
    tx.commit().map_err(|x| e(&x))
}
