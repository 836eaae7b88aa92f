//! Opening a pool outside a mount (fsck, passwd, the debug commands), with
//! typed errors: what went wrong decides fsck's exit code, not its words.

use super::secret::passphrase;
use super::{KeyArgs, LOCK_WAIT};
use stackfs::error::FsError;
use stackfs::fs::{Fs, FsOptions};
use stackfs::lock::{self, Mode};
use stackfs::pool::{self, parse_source, Pool};
use std::path::PathBuf;

/// The pool's devices by their full paths, joined by ':': how the kernel's
/// record of a mount names them, so `umount SOURCE` and the lock's holder
/// lookup find it.
pub fn canonical_source(paths: &[PathBuf]) -> String {
    paths
        .iter()
        .map(|p| {
            std::fs::canonicalize(p)
                .unwrap_or_else(|_| p.clone())
                .display()
                .to_string()
        })
        .collect::<Vec<_>>()
        .join(":")
}

/// Lock a pool's devices and open it outside a mount (fsck, tools): the
/// lock refuses a mounted pool, naming its mount point and daemon.
pub fn open_pool(source: &str, key: &KeyArgs, read_only: bool) -> Result<Pool, FsError> {
    let paths = parse_source(source);
    let owner = lock::lock(&paths, Mode::Exclusive, LOCK_WAIT).map_err(FsError::Pool)?;
    let secret = if pool::is_encrypted(&paths)? {
        Some(passphrase(key).map_err(FsError::Pool)?)
    } else {
        None
    };
    let pool = pool::open(
        &paths,
        read_only,
        secret.as_ref(),
        Some(pool::DEFAULT_TIMEOUT),
        Some(owner),
        false,
    )?;
    for warning in &pool.warnings {
        eprintln!("stackfs: warning: {warning}");
    }
    Ok(pool)
}

/// Open a pool's filesystem outside a mount (fsck, tools).
pub fn open_fs(source: &str, key: &KeyArgs, read_only: bool) -> Result<Fs, FsError> {
    Fs::open(
        open_pool(source, key, read_only)?,
        FsOptions {
            read_only,
            cache_bytes: 16 << 20,
            lenient: true,
            ..FsOptions::default()
        },
    )
}
