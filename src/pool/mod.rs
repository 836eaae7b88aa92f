//! A pool: the devices named by the user, checked against each other through
//! their superblocks, ordered by index, and built into the layer stack.
//! Every check happens before anything is written.

use crate::keys::{self, KeyBlob, KeyError, Secret};
use crate::lock::PoolLock;
use crate::superblock::MemberStates;
use crate::superblock::{self, SbError, SbKey, Superblock, DATA_START, SB_SIZE};
use stackfs_layers::spec::{Leaf, Stack};
use stackfs_layers::{CryptKeys, Keyring};
use stackfs_layers::{Device, StackSpec};
use std::fs::{File, OpenOptions};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

mod create;
pub mod members;

pub use create::{mkfs, MkfsOptions};

/// Smallest share of a device the pool will use.
pub const MIN_PER_DEVICE: u64 = 16 << 20;
/// The metadata store's unit of placement (one sector slot pair).
pub const META_ALIGN: u64 = 16 << 10;

#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    #[error("{path}: {err}")]
    Device { path: PathBuf, err: std::io::Error },
    #[error("{path}: not a stackfs device ({err})")]
    NotPool { path: PathBuf, err: SbError },
    #[error("{path} already holds stackfs pool {uuid}; use --force to overwrite it")]
    InUse { path: PathBuf, uuid: String },
    #[error("{path} belongs to pool {theirs}, not to pool {ours} (of {first})")]
    Foreign {
        path: PathBuf,
        theirs: String,
        ours: String,
        first: PathBuf,
    },
    #[error("{a} and {b} are the same device")]
    Duplicate { a: PathBuf, b: PathBuf },
    #[error("pool {uuid} has {count} devices; missing device number {missing}{hint}")]
    Missing {
        uuid: String,
        count: u32,
        missing: u32,
        hint: &'static str,
    },
    #[error("{path} is too small: {size} bytes, the pool needs at least {need}")]
    TooSmall { path: PathBuf, size: u64, need: u64 },
    #[error("{path} does not exist; give --size to create it as an image file")]
    NoSuchDevice { path: PathBuf },
    #[error("layer spec: {0}")]
    Spec(#[from] stackfs_layers::spec::SpecError),
    #[error("no devices given")]
    NoDevices,
    #[error("the pool is encrypted: give a passphrase (passphrase file, STACKFS_PASSPHRASE, or the prompt) or its key file")]
    NeedKey,
    #[error("{0}")]
    Key(#[from] KeyError),
    #[error("{path}: both superblock copies fail authentication (changed outside stackfs?); the pool is not opened")]
    Tampered { path: PathBuf },
    #[error("{0}")]
    Lock(String),
    #[error("{0}")]
    Other(String),
}

fn dev_err(path: &Path) -> impl FnOnce(std::io::Error) -> PoolError + '_ {
    move |err| PoolError::Device {
        path: path.to_path_buf(),
        err,
    }
}

pub fn uuid_str(u: &[u8; 16]) -> String {
    uuid::Uuid::from_bytes(*u).hyphenated().to_string()
}

/// Split `a:b:c` into device paths.
pub fn parse_source(source: &str) -> Vec<PathBuf> {
    source
        .split(':')
        .filter(|s| !s.is_empty())
        .map(PathBuf::from)
        .collect()
}

struct Opened {
    path: PathBuf,
    file: File,
    size: u64,
    id: (u64, u64),
}

fn open_dev(path: &Path, write: bool) -> Result<Opened, PoolError> {
    let file = OpenOptions::new()
        .read(true)
        .write(write)
        .open(path)
        .map_err(dev_err(path))?;
    let meta = file.metadata().map_err(dev_err(path))?;
    let size = stackfs_layers::device::device_size(&file).map_err(dev_err(path))?;
    let id = if meta.file_type().is_file() {
        (meta.dev(), meta.ino())
    } else {
        (meta.rdev(), 0)
    };
    Ok(Opened {
        path: path.to_path_buf(),
        file,
        size,
        id,
    })
}

fn check_distinct(devs: &[Opened]) -> Result<(), PoolError> {
    for (i, a) in devs.iter().enumerate() {
        if let Some(b) = devs[..i].iter().find(|b| b.id == a.id) {
            return Err(PoolError::Duplicate {
                a: b.path.clone(),
                b: a.path.clone(),
            });
        }
    }
    Ok(())
}

pub struct Pool {
    /// Superblock of device 0 (the pool-wide fields are the same on all).
    pub sb: Superblock,
    /// Authenticates superblocks (encrypted pools).
    pub sb_key: Option<SbKey>,
    /// The pool's members, locked for this process (None: `info` of a mounted pool).
    pub lock: Option<PoolLock>,
    /// The devices present, in pool order, with their sizes and indices.
    pub paths: Vec<PathBuf>,
    pub sizes: Vec<u64>,
    pub indices: Vec<u32>,
    /// Members not given (a degraded mount).
    pub missing: Vec<u32>,
    /// The members' copies as recorded in the superblocks (and, read-write,
    /// as written back at open).
    pub states: MemberStates,
    /// The lock on the new device of a replace resumed at open (taken over
    /// by the jobs thread).
    pub new_lock: parking_lot::Mutex<Option<PoolLock>>,
    pub stack: Stack,
    pub warnings: Vec<String>,
}

impl Pool {
    pub fn capacity(&self) -> u64 {
        self.stack.top.capacity()
    }
}

/// Every member's path, size and the superblock copy it is taken by.
pub type Superblocks = Vec<(PathBuf, u64, Superblock)>;

/// A warning for each device whose primary superblock was unusable.
fn backup_warnings(members: &[Member]) -> Vec<String> {
    members
        .iter()
        .filter_map(|m| {
            let why = m.found.used_backup.as_ref()?;
            Some(format!(
                "{}: primary superblock unusable ({why}); using the backup copy",
                m.path.display()
            ))
        })
        .collect()
}

/// Each device's path, size and superblock in use.
fn superblocks_of(members: Vec<Member>) -> Vec<(PathBuf, u64, Superblock)> {
    members
        .into_iter()
        .map(|m| (m.path, m.size, m.found.sb))
        .collect()
}

/// What one device holds: the copy in use and the backup.
struct Member {
    path: PathBuf,
    size: u64,
    found: superblock::Found,
}

fn read_members(paths: &[PathBuf]) -> Result<Vec<Member>, PoolError> {
    if paths.is_empty() {
        return Err(PoolError::NoDevices);
    }
    let mut devs = Vec::new();
    for p in paths {
        devs.push(open_dev(p, false)?);
    }
    check_distinct(&devs)?;
    devs.into_iter()
        .map(|d| {
            let found = superblock::read(&d.file, d.size).map_err(|err| PoolError::NotPool {
                path: d.path.clone(),
                err,
            })?;
            Ok(Member {
                path: d.path,
                size: d.size,
                found,
            })
        })
        .collect()
}

/// Read and check every superblock; nothing is written. On an encrypted
/// pool nothing here is authenticated yet (that needs the key: `open`).
pub fn inspect(paths: &[PathBuf]) -> Result<(Superblocks, Vec<String>), PoolError> {
    let members = read_members(paths)?;
    let warnings = backup_warnings(&members);
    Ok((check_members(superblocks_of(members), true)?.0, warnings))
}

/// The checks every set of superblocks must pass, before anything is
/// written; the members in pool order, and those missing (allowed only
/// `degraded`, when every mirror group keeps a whole member).
fn check_members(
    mut found: Superblocks,
    degraded: bool,
) -> Result<(Superblocks, Vec<u32>), PoolError> {
    let (first_path, _, first) = found[0].clone();
    for (path, size, sb) in &found {
        if sb.pool_uuid != first.pool_uuid {
            return Err(PoolError::Foreign {
                path: path.clone(),
                theirs: uuid_str(&sb.pool_uuid),
                ours: uuid_str(&first.pool_uuid),
                first: first_path.clone(),
            });
        }
        if let Some((other, _, _)) = found
            .iter()
            .find(|(p, _, o)| o.device_uuid == sb.device_uuid && p != path)
        {
            return Err(PoolError::Duplicate {
                a: other.clone(),
                b: path.clone(),
            });
        }
        let need = DATA_START + sb.per_device + SB_SIZE as u64;
        if *size < need {
            return Err(PoolError::TooSmall {
                path: path.clone(),
                size: *size,
                need,
            });
        }
        if sb.count != first.count
            || sb.per_device != first.per_device
            || sb.spec != first.spec
            || sb.meta_len != first.meta_len
        {
            return Err(PoolError::Other(format!(
                "{}: superblock disagrees with {} about the pool's shape",
                path.display(),
                first_path.display()
            )));
        }
    }
    let spec = StackSpec::parse(&first.spec)?;
    match (spec.has_crypt(), first.keys.is_empty()) {
        (false, false) => {
            return Err(PoolError::Other(format!(
                "{}: the superblock holds key material but its layer spec {:?} has no crypt layer \
                 (changed outside stackfs?); refusing to store data in clear",
                first_path.display(),
                first.spec
            )))
        }
        (true, true) => {
            return Err(PoolError::Other(format!(
                "{}: the layer spec has a crypt layer but the superblock holds no key material",
                first_path.display()
            )))
        }
        _ => {}
    }
    let missing: Vec<u32> = (0..first.count)
        .filter(|want| !found.iter().any(|(_, _, sb)| sb.index == *want))
        .collect();
    if found.len() as u32 + missing.len() as u32 != first.count {
        return Err(PoolError::Other(format!(
            "pool has {} devices but {} were given",
            first.count,
            found.len()
        )));
    }
    members::check_diverged(&found)?;
    let states = members::current(&found);
    members::check_groups(
        &spec,
        first.count,
        &missing,
        &states,
        degraded,
        &first.pool_uuid,
    )?;
    found.sort_by_key(|(_, _, sb)| sb.index);
    Ok((found, missing))
}

/// How long a device request may take before it is cancelled and fails
/// with EIO, unless the mount says otherwise (`timeout=SECONDS`).
pub const DEFAULT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// Pick each device's superblock copy by its MAC (encrypted pools): the
/// primary, else the backup; a format-1 copy (before MACs) is taken as it is.
/// Returns the copies and which devices need their superblocks rewritten.
fn authenticate(
    members: Vec<Member>,
    key: &SbKey,
    warnings: &mut Vec<String>,
) -> Result<(Superblocks, Vec<bool>), PoolError> {
    let mut out = Vec::new();
    let mut rewrite = Vec::new();
    // Once any copy is format 2, a format-1 copy is a downgrade, not an old pool.
    let upgraded = members.iter().any(|m| {
        m.found.sb.version >= 2 || m.found.backup.as_ref().is_some_and(|b| b.version >= 2)
    });
    for m in members {
        let primary = m.found.used_backup.is_none().then_some(&m.found.sb);
        let pick = if primary.is_some_and(|p| p.verify(key)) {
            (m.found.sb.clone(), false)
        } else if let Some(b) = m.found.backup.as_ref().filter(|b| b.verify(key)) {
            warnings.push(format!(
                "{}: primary superblock fails authentication or does not read; using the backup copy",
                m.path.display()
            ));
            (b.clone(), true)
        } else if !upgraded
            && m.found.sb.version == 1
            && m.found.backup.as_ref().is_none_or(|b| b.version == 1)
        {
            warnings.push(format!(
                "{}: superblock format 1 has no MAC; a read-write mount rewrites it as format 2",
                m.path.display()
            ));
            (m.found.sb.clone(), true)
        } else {
            return Err(PoolError::Tampered { path: m.path });
        };
        out.push((m.path, m.size, pick.0));
        rewrite.push(pick.1);
    }
    Ok((out, rewrite))
}

/// Every device's superblock, authenticated when the pool is encrypted
/// (unlocked with `secret`), then checked against each other; which devices
/// need their copies rewritten; the master key.
pub fn authenticated(
    paths: &[PathBuf],
    secret: Option<&Secret>,
    degraded: bool,
    warnings: &mut Vec<String>,
) -> Result<(Superblocks, Vec<u32>, Vec<PathBuf>, Option<keys::Key>), PoolError> {
    let members = read_members(paths)?;
    check_foreign(&members)?;
    let encrypted = members.iter().any(has_keys);
    let (found, rewrite, master) = if encrypted {
        let secret = secret.ok_or(PoolError::NeedKey)?;
        let master = unlock_members(&members, secret)?.0;
        let (found, rewrite) = authenticate(members, &SbKey::derive(&master), warnings)?;
        (found, rewrite, Some(master))
    } else {
        let rewrite = members
            .iter()
            .map(|m| m.found.used_backup.is_some())
            .collect();
        warnings.extend(backup_warnings(&members));
        (superblocks_of(members), rewrite, None)
    };
    // Devices whose copies need rewriting, by path (check_members reorders).
    let rewrite = found
        .iter()
        .zip(rewrite)
        .filter(|(_, again)| *again)
        .map(|((path, _, _), _)| path.clone())
        .collect();
    let (found, missing) = check_members(found, degraded)?;
    Ok((found, missing, rewrite, master))
}

/// Every device's authenticated superblock, with the master key already
/// unlocked (passwd), checked against each other.
pub fn authenticated_with(paths: &[PathBuf], master: &keys::Key) -> Result<Superblocks, PoolError> {
    let mut warnings = Vec::new();
    let (found, _) = authenticate(read_members(paths)?, &SbKey::derive(master), &mut warnings)?;
    Ok(check_members(found, false)?.0)
}

/// A device whose every copy names another pool, with other key material,
/// is foreign (said before any MAC is checked, so the error says what it
/// is). The pool is the one the first device's copies agree on; a device
/// with a copy changed is not foreign (authentication deals with it).
fn check_foreign(members: &[Member]) -> Result<(), PoolError> {
    let uuids = |m: &Member| -> Vec<[u8; 16]> {
        std::iter::once(&m.found.sb)
            .chain(m.found.backup.as_ref())
            .map(|sb| sb.pool_uuid)
            .collect()
    };
    let Some(first) = members.first() else {
        return Ok(());
    };
    let ours = uuids(first);
    let Some(ours) = ours.first().filter(|u| ours.iter().all(|x| x == *u)) else {
        return Ok(());
    };
    for m in &members[1..] {
        let theirs = uuids(m);
        // Our own key material under another pool's UUID is our device with
        // its UUID changed: authentication names that.
        let our_keys = !first.found.sb.keys.is_empty() && m.found.sb.keys == first.found.sb.keys;
        if theirs.iter().all(|u| u != ours) && !our_keys {
            return Err(PoolError::Foreign {
                path: m.path.clone(),
                theirs: uuid_str(&theirs[0]),
                ours: uuid_str(ours),
                first: first.path.clone(),
            });
        }
    }
    Ok(())
}

/// Whether any copy of any device holds key material (no other check: a
/// tampered copy must still get as far as authentication).
pub fn is_encrypted(paths: &[PathBuf]) -> Result<bool, PoolError> {
    Ok(read_members(paths)?.iter().any(has_keys))
}

fn has_keys(m: &Member) -> bool {
    !m.found.sb.keys.is_empty() || m.found.backup.as_ref().is_some_and(|b| !b.keys.is_empty())
}

/// Open a pool for use, holding `lock` on its members: check it, authenticate
/// and repair superblocks (when writable), and build the stack. Every
/// read-write open encrypts with a key of its own (see crypt.rs).
/// `degraded`: open a mirrored pool with members missing, as long as every
/// mirror group keeps a whole member; read-write, they are recorded as stale
/// before anything is written.
pub fn open(
    paths: &[PathBuf],
    read_only: bool,
    secret: Option<&Secret>,
    timeout: Option<std::time::Duration>,
    lock: Option<PoolLock>,
    degraded: bool,
) -> Result<Pool, PoolError> {
    let mut warnings = Vec::new();
    let (found, missing, rewrite, master) = authenticated(paths, secret, degraded, &mut warnings)?;
    let sb_key = master.as_ref().map(|m| SbKey::derive(m));
    let mut states = members::current(&found);
    let mut missing = missing;
    let mut resumed = None;
    if !read_only {
        for (path, size, sb) in found.iter().filter(|(p, _, _)| rewrite.contains(p)) {
            let mut sb = sb.clone();
            if let Some(k) = &sb_key {
                sb.seal(k);
            }
            let f = open_dev(path, true)?;
            superblock::write(&f.file, *size, &sb).map_err(dev_err(path))?;
            warnings.push(format!("{}: superblocks rewritten", path.display()));
        }
        if let Some(r) = states.replace.clone() {
            let need = DATA_START + found[0].2.per_device + SB_SIZE as u64;
            match members::reopen_new(&r, need) {
                Ok(lock) => {
                    missing.retain(|i| *i != r.index);
                    resumed = Some((r.index, PathBuf::from(&r.path), lock));
                }
                Err(why) => {
                    warnings.push(format!(
                        "the replace of member {} by {} cannot go on ({why}); \
                         the member is resynced instead",
                        r.index, r.path
                    ));
                    states = members::drop_replace(&states);
                    let devices: Vec<(PathBuf, u64)> =
                        found.iter().map(|(p, s, _)| (p.clone(), *s)).collect();
                    members::record(&devices, sb_key.as_ref(), &states)?;
                }
            }
        }
        if let Some(next) = members::after_open(&states, &missing) {
            let devices: Vec<(PathBuf, u64)> =
                found.iter().map(|(p, s, _)| (p.clone(), *s)).collect();
            members::record(&devices, sb_key.as_ref(), &next)?;
            states = next;
        }
    }
    for i in &missing {
        warnings.push(format!(
            "member {i} is missing: the pool runs degraded, each mirror group reading from the copies left"
        ));
    }
    let sb = found[0].2.clone();
    let spec = StackSpec::parse(&sb.spec)?;
    let replaced = resumed.as_ref().map(|(i, _, _)| *i);
    let mut leaves: Vec<(u32, Option<&Path>)> = found
        .iter()
        .filter(|(_, _, s)| Some(s.index) != replaced)
        .map(|(p, _, s)| (s.index, Some(p.as_path())))
        .chain(missing.iter().map(|i| (*i, None)))
        .chain(resumed.iter().map(|(i, p, _)| (*i, Some(p.as_path()))))
        .collect();
    leaves.sort_by_key(|(i, _)| *i);
    let stack = build_stack(
        &spec,
        &leaves,
        sb.per_device,
        master.as_ref(),
        read_only,
        timeout,
    )?;
    if read_only {
        stack.health.set_read_only();
    }
    for i in 0..sb.count {
        if members::behind(&states, i) && !missing.contains(&i) {
            stack.health.set_resyncing(i as usize, true);
        }
    }
    Ok(Pool {
        sb,
        sb_key,
        lock,
        paths: found.iter().map(|(p, _, _)| p.clone()).collect(),
        sizes: found.iter().map(|(_, s, _)| *s).collect(),
        indices: found.iter().map(|(_, _, s)| s.index).collect(),
        missing,
        states,
        new_lock: parking_lot::Mutex::new(resumed.map(|(_, _, lock)| lock)),
        stack,
        warnings,
    })
}

/// The layer stack over the pool's members in pool order: (path, bytes
/// used from `DATA_START`). A writable stack encrypts with a key of its own.
fn build_stack(
    spec: &StackSpec,
    members: &[(u32, Option<&Path>)],
    per_device: u64,
    master: Option<&keys::Key>,
    read_only: bool,
    timeout: Option<std::time::Duration>,
) -> Result<Stack, PoolError> {
    let mut leaves = Vec::new();
    for (index, path) in members {
        leaves.push(match path {
            Some(path) => Leaf::Device(Arc::new(
                Device::open(path, DATA_START, per_device, read_only).map_err(dev_err(path))?,
            )),
            None => Leaf::Missing {
                name: format!("member {index}"),
                capacity: per_device,
            },
        });
    }
    let crypt_keys = match master {
        Some(m) => Some(CryptKeys {
            keyring: Arc::new(Keyring::new(m)),
            write_key: if read_only {
                None
            } else {
                Some(fresh_key_id()?)
            },
        }),
        None => None,
    };
    Ok(spec.build_leaves(leaves, crypt_keys.as_ref(), timeout)?)
}

/// A random key id for this mount's writes (never all zeros: that names
/// the master key).
fn fresh_key_id() -> Result<stackfs_layers::KeyId, PoolError> {
    use ring::rand::SecureRandom;
    let mut id = [0u8; 12];
    while id == [0; 12] {
        ring::rand::SystemRandom::new()
            .fill(&mut id)
            .map_err(|_| PoolError::Key(KeyError::Random))?;
    }
    Ok(id)
}

/// The master key and the key blob that unlocked it. Every distinct blob of
/// every copy is tried, newest generation first (a passwd cut short by a
/// crash leaves devices with either the old or the new wrapping; both unlock).
fn unlock_members(members: &[Member], secret: &Secret) -> Result<(keys::Key, KeyBlob), PoolError> {
    let mut sbs: Vec<&Superblock> = members
        .iter()
        .flat_map(|m| std::iter::once(&m.found.sb).chain(m.found.backup.as_ref()))
        .filter(|sb| !sb.keys.is_empty())
        .collect();
    sbs.sort_by_key(|sb| std::cmp::Reverse(sb.generation));
    // The wrap binds the pool UUID: a blob is tried once per UUID it is found with.
    let mut tried: Vec<(&[u8], [u8; 16])> = Vec::new();
    let mut first_err = None;
    for sb in sbs {
        if tried.contains(&(sb.keys.as_slice(), sb.pool_uuid)) {
            continue;
        }
        tried.push((&sb.keys, sb.pool_uuid));
        let blob = match KeyBlob::decode(&sb.keys) {
            Ok(b) => b,
            Err(e) => {
                first_err.get_or_insert(e);
                continue;
            }
        };
        match blob.unwrap(secret, &sb.pool_uuid) {
            Ok(k) => return Ok((k, blob)),
            Err(e) => {
                first_err.get_or_insert(e);
            }
        }
    }
    Err(first_err.map(PoolError::Key).unwrap_or(PoolError::NeedKey))
}

/// Unlock a pool's master key (for passwd): the key, and the blob that
/// unlocked it (its KDF parameters are the ones to keep).
pub fn unlock(paths: &[PathBuf], secret: &Secret) -> Result<(keys::Key, KeyBlob), PoolError> {
    unlock_members(&read_members(paths)?, secret)
}

/// Rewrite every device's superblocks with `change` applied to what each
/// device holds now, sealed with `key` (encrypted pools); each device's
/// backup is made durable before its primary.
pub fn update_superblocks(
    devices: &[(PathBuf, u64)],
    key: Option<&SbKey>,
    change: impl Fn(&mut Superblock),
) -> Result<(), PoolError> {
    for (path, size) in devices {
        let d = open_dev(path, true)?;
        let found = superblock::read(&d.file, *size).map_err(|err| PoolError::NotPool {
            path: path.clone(),
            err,
        })?;
        // The copy to start from: one that authenticates, when there is a key.
        let mut sb = match key {
            Some(k) if !found.sb.verify(k) && found.sb.version >= 2 => found
                .backup
                .filter(|b| b.verify(k))
                .ok_or_else(|| PoolError::Tampered { path: path.clone() })?,
            _ => found.sb,
        };
        change(&mut sb);
        if let Some(k) = key {
            sb.seal(k);
        }
        superblock::write(&d.file, *size, &sb).map_err(dev_err(path))?;
    }
    Ok(())
}
