//! The hidden debug commands, for tests: damage a pool's metadata on
//! purpose (for fsck), list the nonces of sealed blocks.

use super::open::{open_fs, open_pool};
use super::{CliResult, KeyArgs};
use stackfs::metastore::MetaStore;
use stackfs::pool::Pool;

/// `debug-nonces`: the (key id, nonce) of every sealed block, one a line.
pub fn nonces(source: &str, key: &KeyArgs) -> CliResult {
    let fs = open_fs(source, key, true)?;
    for line in stackfs::audit::nonces(&fs)? {
        println!("{line}");
    }
    Ok(())
}

/// `debug-damage WHAT`: `live-pairs` lists the metadata slot pairs in use,
/// `store-garbage` overwrites the store; anything else is fsck's to inject.
pub fn damage(source: &str, what: &str, key: &KeyArgs) -> CliResult {
    match what {
        "live-pairs" => live_pairs(source, key),
        "store-garbage" => {
            store_garbage(source, key)?;
            println!("damaged: {what}");
            Ok(())
        }
        _ => {
            let fs = open_fs(source, key, false)?;
            stackfs::fsck::inject(&fs, what)?;
            println!("damaged: {what}");
            Ok(())
        }
    }
}

/// The pool's metadata store by itself (redb not on top), for the debug
/// commands that look at or damage it directly.
fn open_store(pool: &Pool, read_only: bool) -> CliResult<MetaStore> {
    Ok(MetaStore::open(
        pool.stack.meta.clone(),
        pool.sb.meta_len,
        pool.sb.pool_uuid,
        read_only,
        pool.stack.copies(),
    )
    .map_err(|e| e.to_string())?)
}

/// Print the pool addresses of the metadata slot pairs in use (for tests
/// that damage metadata: damage elsewhere is damage to free space).
fn live_pairs(source: &str, key: &KeyArgs) -> CliResult {
    let pool = open_pool(source, key, true)?;
    let store = open_store(&pool, true)?;
    for address in store.live_pairs() {
        println!("{address}");
    }
    pool.stack.top.shutdown();
    Ok(())
}

/// Overwrite the redb database's pages (not its header) with noise that the
/// metadata store accepts: what a bug, or someone with the key, could leave.
/// For testing that an unreadable store is named, never a crash.
fn store_garbage(source: &str, key: &KeyArgs) -> CliResult {
    use redb::StorageBackend;
    let pool = open_pool(source, key, false)?;
    let store = open_store(&pool, false)?;
    let len = store.len().map_err(|e| e.to_string())?;
    let noise = stackfs_layers::mem::noise(len.saturating_sub(8192) as usize, 7);
    store.write(8192, &noise).map_err(|e| e.to_string())?;
    store.sync_data().map_err(|e| e.to_string())?;
    pool.stack.top.shutdown();
    Ok(())
}
