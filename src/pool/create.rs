//! Creating a pool: check and clear the devices, write their superblocks,
//! then the metadata store's root and the filesystem's root directory.

use super::{build_stack, check_distinct, dev_err, open_dev, uuid_str, Opened, Pool, PoolError};
use super::{META_ALIGN, MIN_PER_DEVICE};
use crate::keys::{self, Kdf, KeyBlob, Secret};
use crate::superblock::{self, SbKey, Superblock, DATA_START, MAX_SPEC, SB_SIZE};
use stackfs_layers::StackSpec;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;

/// What to make: the layer stack, the size of image files to create, the
/// key.
pub struct MkfsOptions {
    pub spec: StackSpec,
    pub size: Option<u64>,
    pub force: bool,
    /// Unlocks the pool when its stack has a crypt layer.
    pub secret: Option<Secret>,
    pub kdf: Kdf,
    /// (device index, bytes cleared, bytes to clear), for a progress bar.
    pub progress: Box<dyn Fn(usize, u64, u64)>,
}

/// Format the devices as one pool. Refuses a device that holds a pool
/// already unless `force`.
pub fn mkfs(paths: &[PathBuf], opts: &MkfsOptions) -> Result<Superblock, PoolError> {
    if paths.is_empty() {
        return Err(PoolError::NoDevices);
    }
    let spec = opts.spec.to_string();
    if spec.len() > MAX_SPEC {
        return Err(PoolError::Other(format!(
            "layer spec longer than {MAX_SPEC} bytes"
        )));
    }
    let devs = open_or_create(paths, opts.size)?;
    check_distinct(&devs)?;
    check_new_members(&devs, opts.force)?;
    let sizes = PoolSizes::plan(&opts.spec, &devs)?;
    let pool_uuid = *uuid::Uuid::new_v4().as_bytes();
    let (master, keys) = new_master_key(opts, &pool_uuid)?;
    let pool_wide = Superblock {
        version: superblock::FORMAT_VERSION,
        mac: [0; 32],
        pool_uuid,
        device_uuid: [0; 16],
        index: 0,
        count: devs.len() as u32,
        per_device: sizes.per_device,
        meta_len: sizes.meta_len,
        created: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
        generation: 0,
        spec,
        keys,
        nonce_next: 0,
        states: Default::default(),
    };
    let sb = write_superblocks(&devs, &pool_wide, master.as_ref(), &sizes, &*opts.progress)?;
    create_filesystem(&devs, &sb, &opts.spec, master)?;
    Ok(sb)
}

/// Open every device for writing; one that does not exist is created as an
/// image file of `size` bytes (refused without a size).
fn open_or_create(paths: &[PathBuf], size: Option<u64>) -> Result<Vec<Opened>, PoolError> {
    let mut devs = Vec::new();
    for p in paths {
        if !p.exists() {
            let Some(size) = size else {
                return Err(PoolError::NoSuchDevice { path: p.clone() });
            };
            // The superblock holds the wrapped key: readable by root only.
            OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(p)
                .and_then(|f| f.set_len(size))
                .map_err(dev_err(p))?;
        }
        devs.push(open_dev(p, true)?);
    }
    Ok(devs)
}

/// Every device is large enough for a pool, and holds none already unless
/// `force`.
fn check_new_members(devs: &[Opened], force: bool) -> Result<(), PoolError> {
    let need = DATA_START + MIN_PER_DEVICE + SB_SIZE as u64;
    for d in devs {
        if d.size < need {
            return Err(PoolError::TooSmall {
                path: d.path.clone(),
                size: d.size,
                need,
            });
        }
        if !force {
            if let Ok(found) = superblock::read(&d.file, d.size) {
                return Err(PoolError::InUse {
                    path: d.path.clone(),
                    uuid: uuid_str(&found.sb.pool_uuid),
                });
            }
        }
    }
    Ok(())
}

/// How a new pool uses its devices.
struct PoolSizes {
    /// The stripe chunk, at least the metadata store's unit of placement.
    chunk: u64,
    /// Bytes of each device the pool uses, from `DATA_START`.
    per_device: u64,
    /// Pool space `[0, meta_len)` holds the metadata store.
    meta_len: u64,
    /// Mirror groups (devices without a mirror) the stripe pools.
    groups: u64,
}

impl PoolSizes {
    /// Size the pool over `devs` (the smallest one sets every device's
    /// share) after probing the stack shape (device count vs stripe)
    /// without touching disks.
    fn plan(spec: &StackSpec, devs: &[Opened]) -> Result<PoolSizes, PoolError> {
        spec.check_devices(devs.len()).map_err(PoolError::Spec)?;
        let chunk = spec.chunk().unwrap_or(META_ALIGN).max(META_ALIGN);
        let smallest = devs.iter().map(|d| d.size).min().unwrap_or(0);
        // Leave the last 64 KiB of the smallest device for the backup superblock.
        let per_device = (smallest - DATA_START - (64 << 10)) / chunk * chunk;
        // Usable space: a mirror group holds one device's worth.
        let groups = (devs.len() / spec.copies()) as u64;
        let capacity = per_device * groups;
        let meta_len = (capacity / 8).clamp(16 << 20, 4 << 30).min(capacity / 2) / chunk * chunk;
        Ok(PoolSizes {
            chunk,
            per_device,
            meta_len,
            groups,
        })
    }

    /// The most of the metadata region one device can hold, in whole
    /// chunks, plus one chunk: the region is striped over the groups, and
    /// every device of a group holds its group's share.
    fn meta_share(&self) -> u64 {
        (self.meta_len.div_ceil(self.groups)).div_ceil(self.chunk) * self.chunk + self.chunk
    }
}

/// A new encrypted pool's master key, and its blob (wrapped with the
/// secret, bound to the pool UUID); neither without a crypt layer.
fn new_master_key(
    opts: &MkfsOptions,
    pool_uuid: &[u8; 16],
) -> Result<(Option<keys::Key>, Vec<u8>), PoolError> {
    match (&opts.secret, opts.spec.has_crypt()) {
        (Some(secret), true) => {
            let master = keys::random_key()?;
            let blob = KeyBlob::wrap(&master, secret, opts.kdf, pool_uuid)?.encode();
            Ok((Some(master), blob))
        }
        (None, true) => Err(PoolError::NeedKey),
        (Some(_), false) => Err(PoolError::Other(
            "a passphrase or key file was given, but the layer spec has no crypt layer".into(),
        )),
        (None, false) => Ok((None, Vec::new())),
    }
}

/// Clear each device's region, then write its superblocks: the pool-wide
/// fields with the device's own UUID and index, sealed with the master key
/// (encrypted pools). Returns device 0's.
fn write_superblocks(
    devs: &[Opened],
    pool_wide: &Superblock,
    master: Option<&keys::Key>,
    sizes: &PoolSizes,
    progress: &dyn Fn(usize, u64, u64),
) -> Result<Superblock, PoolError> {
    let meta_share = sizes.meta_share().min(sizes.per_device);
    let mut first = None;
    for (i, d) in devs.iter().enumerate() {
        let mut sb = Superblock {
            device_uuid: *uuid::Uuid::new_v4().as_bytes(),
            index: i as u32,
            ..pool_wide.clone()
        };
        if let Some(m) = master {
            sb.seal(&SbKey::derive(m));
        }
        // Old pool contents must not leak into the new one: punch the region.
        clear_region(&d.file, DATA_START, sizes.per_device, meta_share, &|done| {
            progress(i, done, sizes.per_device)
        })
        .map_err(dev_err(&d.path))?;
        superblock::write(&d.file, d.size, &sb).map_err(dev_err(&d.path))?;
        first.get_or_insert(sb);
    }
    Ok(first.expect("at least one device"))
}

/// Write, through the new pool's stack, the metadata store's root record
/// (from now on a store without one, a metadata region erased or
/// overwritten, is an error, not a new pool), then the filesystem itself:
/// its root directory, committed durably, so a new pool is a whole
/// filesystem (fsck is clean before any mount).
fn create_filesystem(
    devs: &[Opened],
    sb: &Superblock,
    spec: &StackSpec,
    master: Option<keys::Key>,
) -> Result<(), PoolError> {
    let members: Vec<(u32, Option<&std::path::Path>)> = devs
        .iter()
        .enumerate()
        .map(|(i, d)| (i as u32, Some(d.path.as_path())))
        .collect();
    let stack = build_stack(spec, &members, sb.per_device, master.as_ref(), false, None)?;
    if let Err(e) =
        crate::metastore::MetaStore::format(stack.meta.clone(), sb.meta_len, sb.pool_uuid)
    {
        stack.top.shutdown();
        return Err(PoolError::Other(format!(
            "writing the metadata store's root: {e}"
        )));
    }
    let pool = Pool {
        sb: sb.clone(),
        sb_key: master.as_ref().map(|m| SbKey::derive(m)),
        lock: None,
        paths: devs.iter().map(|d| d.path.clone()).collect(),
        sizes: devs.iter().map(|d| d.size).collect(),
        indices: (0..devs.len() as u32).collect(),
        missing: Vec::new(),
        states: Default::default(),
        new_lock: Default::default(),
        stack,
        warnings: Vec::new(),
    };
    let fs = crate::fs::Fs::open(pool, crate::fs::FsOptions::default())
        .map_err(|e| PoolError::Other(format!("creating the filesystem: {e}")))?;
    fs.shutdown()
        .map_err(|e| PoolError::Other(format!("creating the filesystem: {e}")))?;
    Ok(())
}

/// Forget a device's old contents before the new pool uses it: punch the
/// whole region out (image files) or discard it (block devices), then make
/// sure the metadata share reads as zeros (old metadata slots, sealed with
/// another pool's key, would otherwise read as damage). Reports progress in bytes.
fn clear_region(
    file: &File,
    off: u64,
    len: u64,
    meta_share: u64,
    progress: &dyn Fn(u64),
) -> std::io::Result<()> {
    use std::os::unix::io::AsRawFd;
    const STEP: u64 = 1 << 30;
    let is_blockdev =
        std::os::unix::fs::FileTypeExt::is_block_device(&file.metadata()?.file_type());
    let mut zeroed = false;
    let mut done = 0;
    while done < len {
        let n = STEP.min(len - done);
        let at = off + done;
        // SAFETY: plain syscalls on an fd we own, with plain integer arguments.
        let r = unsafe {
            if is_blockdev {
                const BLKDISCARD: libc::c_ulong = 0x1277;
                let range = [at, n];
                libc::ioctl(file.as_raw_fd(), BLKDISCARD, range.as_ptr())
            } else {
                libc::fallocate(
                    file.as_raw_fd(),
                    libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                    at as i64,
                    n as i64,
                )
            }
        };
        if r != 0 {
            break;
        }
        zeroed = !is_blockdev;
        done += n;
        progress(done);
    }
    if !zeroed {
        // Discard unsupported, or a block device (discarded blocks need not read as zeros).
        let zeros = vec![0u8; 1 << 20];
        let mut at = 0;
        while at < meta_share {
            let n = (zeros.len() as u64).min(meta_share - at) as usize;
            std::os::unix::fs::FileExt::write_all_at(file, &zeros[..n], off + at)?;
            at += n as u64;
            progress(at.min(len));
        }
        file.sync_data()?;
    }
    progress(len);
    Ok(())
}
