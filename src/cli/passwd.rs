//! `stackfs passwd`: change the passphrase or key file of an encrypted pool.

use super::secret::secret;
use super::{CliResult, KeyArgs, LOCK_WAIT};
use stackfs::keys::KeyBlob;
use stackfs::lock::{self, Mode};
use stackfs::pool::{self, parse_source};
use stackfs::superblock::SbKey;
use std::path::PathBuf;

/// Re-wrap the master key with the new secret in every superblock; no data
/// is rewritten.
pub fn passwd(source: &str, old: &KeyArgs, new: KeyArgs) -> CliResult {
    let paths = parse_source(source);
    let _owner = lock::lock(&paths, Mode::Exclusive, LOCK_WAIT)?;
    if !pool::is_encrypted(&paths)? {
        return Err("this pool is not encrypted; it has no passphrase to change".into());
    }
    let old_secret = secret(old, "STACKFS_PASSPHRASE", false, "current passphrase")?;
    // The parameters of the blob that unlocked, not of whichever is newest.
    let (master, unlocked) = pool::unlock(&paths, &old_secret)?;
    // Only authenticated superblocks are taken as the base of the new ones.
    let found = pool::authenticated_with(&paths, &master)?;
    let newest = found
        .iter()
        .max_by_key(|(_, _, s)| s.generation)
        .map(|(_, _, s)| s.clone())
        .ok_or("no devices")?;
    let new_secret = secret(&new, "STACKFS_NEW_PASSPHRASE", true, "new passphrase")?;
    let blob = KeyBlob::wrap(&master, &new_secret, unlocked.kdf, &newest.pool_uuid)
        .map_err(|e| e.to_string())?
        .encode();
    let generation = newest.generation + 1;
    let devices: Vec<(PathBuf, u64)> = found.iter().map(|(p, s, _)| (p.clone(), *s)).collect();
    let superblock_key = SbKey::derive(&master);
    pool::update_superblocks(&devices, Some(&superblock_key), |superblock| {
        superblock.keys = blob.clone();
        superblock.generation = generation;
    })?;
    println!(
        "passphrase changed on {} device(s); no data was rewritten",
        devices.len()
    );
    Ok(())
}
