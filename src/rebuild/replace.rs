//! `stackfs replace SOURCE OLD NEW`: rebuild a member onto a new device
//! while the pool runs (as `zpool replace` and md's `--replace` do).
//!
//! 1. Checks: the pool is mirrored, the member's group keeps another whole
//!    copy, NEW is no member and holds no stackfs superblock, and is large
//!    enough (an image file that does not exist is created, as large as the
//!    members).
//! 2. The replace is recorded in every member's superblock (member, NEW's
//!    path, the device UUID it will get, cursor 0).
//! 3. NEW goes into the member's bay while the filesystem sends no write,
//!    and the member is resyncing: it takes every write, serves no read. The
//!    old device leaves the mirror.
//! 4. The jobs thread rebuilds it (metadata, then data), saving the cursor;
//!    after a crash or an unmount, `pool::open` puts NEW back in the bay and
//!    the rebuild goes on from the cursor.
//! 5. At the end: a device flush, then NEW's superblock (written last: until
//!    then NEW holds none, so a half-built member is never taken for a
//!    member), then the record cleared on every member, then the old
//!    device's superblocks zeroed so that it is not taken for one either.

use super::{Jobs, Shared};
use crate::fs::Fs;
use crate::lock::{self, Mode};
use crate::pool::members;
use crate::superblock::{self, MemberStates, Replacing, Superblock, DATA_START, SB_SIZE};
use serde_json::json;
use stackfs_layers::{Buf, Counted, Device, Op};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

impl Jobs {
    /// Start replacing member `old` (its device path, or its number) with
    /// `new`. Returns what was started; the jobs thread does the rest.
    pub fn request_replace(&self, old: &str, new: &Path) -> Result<String, String> {
        let fs = self.fs.upgrade().ok_or("the filesystem is closing")?;
        let pool = fs.pool.as_ref().ok_or("no pool")?;
        if fs.copies() < 2 {
            return Err(format!(
                "the pool keeps one copy of its data ({}): replace needs a mirror, whose other \
                 copies the new device is rebuilt from",
                pool.sb.spec
            ));
        }
        let mut shared = self.shared.lock();
        if let Some((job, _)) = shared.running {
            return Err(format!("a {job} is running; replace when it is done"));
        }
        if let Some(r) = &shared.states.replace {
            return Err(format!(
                "member {} is being replaced by {} already",
                r.index, r.path
            ));
        }
        let k = member_of(old, &shared, pool.sb.count)?;
        let health = &fs.stack.health;
        let group = health.group_of(k as usize);
        if !group
            .iter()
            .any(|&i| i != k as usize && health.is_readable(i))
        {
            return Err(format!(
                "member {k} is the only whole copy left in its mirror group {group:?}: \
                 wait for the others to resync, or give the missing ones"
            ));
        }
        let need = DATA_START + pool.sb.per_device + SB_SIZE as u64;
        let like_size = shared.devices.iter().map(|d| d.2).max().unwrap_or(need);
        let new = prepare_new(new, need, like_size)?;
        if let Some((i, p, _)) = shared.devices.iter().find(|(_, p, _)| same_file(p, &new)) {
            return Err(format!("{} is member {i} of this pool", p.display()));
        }
        let new_lock = lock::lock(std::slice::from_ref(&new), Mode::Exclusive, Duration::ZERO)?;
        let device = Device::open(&new, DATA_START, pool.sb.per_device, false)
            .map_err(|e| format!("{}: {e}", new.display()))?;
        let mut next = shared.states.clone();
        next.replace = Some(Replacing {
            index: k,
            path: new.display().to_string(),
            device_uuid: *uuid::Uuid::new_v4().as_bytes(),
            cursor: 0,
        });
        next.stale.retain(|(i, _)| *i != k);
        next.seq += 1;
        self.record(&fs, &mut shared, next)?;
        shared.new_lock = Some(new_lock);
        let bay = fs
            .stack
            .bays
            .get(k as usize)
            .ok_or(format!("member {k} has no bay"))?;
        let name = new.display().to_string();
        let old_device = fs.without_writes(|| {
            health.revive(k as usize, name);
            bay.insert(Counted::wrap(Arc::new(device)))
        })?;
        shared.retired.extend(old_device);
        shared.last = None;
        drop(shared);
        self.wake.notify_all();
        log::info!(
            "replace: member {k} is being rebuilt onto {}",
            new.display()
        );
        Ok(format!("replacing member {k} with {}", new.display()))
    }

    /// The rebuild of the member being replaced, then its end.
    pub(super) fn replace_job(&self, fs: &Fs) -> Result<serde_json::Value, String> {
        let r = self
            .shared
            .lock()
            .states
            .replace
            .clone()
            .ok_or("no replace in progress")?;
        let what = format!("replace of member {} onto {}", r.index, r.path);
        log::info!("{what}: starting at pool address {}", r.cursor);
        let save = |s: &mut MemberStates, cursor: u64| {
            if let Some(x) = s.replace.as_mut() {
                x.cursor = cursor;
            }
        };
        if !self.rebuild(fs, r.index, r.cursor, &what, &save)? {
            log::info!("{what}: stopped; it goes on at the next mount");
            return Ok(json!({"job": "replace", "member": r.index, "stopped": true}));
        }
        let old = self.finish_replace(fs, &r)?;
        log::info!("{what}: done");
        Ok(json!({"job": "replace", "member": r.index, "new": r.path, "old": old}))
    }

    /// The rebuilt member becomes the pool's: NEW's superblock, then the
    /// record on every member, then the old device's superblocks zeroed.
    fn finish_replace(&self, fs: &Fs, r: &Replacing) -> Result<Option<String>, String> {
        let pool = fs.pool.as_ref().ok_or("no pool")?;
        stackfs_layers::submit_wait(&*fs.stack.top, Op::Flush, 0, Buf::zeroed(0))
            .map_err(|e| format!("flushing the devices: {e}"))?;
        if fs.stack.health.is_faulted(r.index as usize) {
            // The jobs thread records it, and gives the replace up.
            return Err(format!("{} faulted at the end of its rebuild", r.path));
        }
        let mut shared = self.shared.lock();
        let mut next = shared.states.clone();
        next.replace = None;
        next.stale.retain(|(i, _)| *i != r.index);
        next.seq += 1;
        let like = Superblock {
            states: next.clone(),
            ..pool.sb.clone()
        };
        let new = PathBuf::from(&r.path);
        members::enroll(&new, &like, r.index, r.device_uuid, pool.sb_key.as_ref())
            .map_err(|e| e.to_string())?;
        let size = device_size(&r.path).unwrap_or(0);
        let old = shared
            .devices
            .iter()
            .position(|(i, _, _)| *i == r.index)
            .map(|at| shared.devices.remove(at).1);
        shared.devices.push((r.index, new, size));
        shared.devices.sort_by_key(|d| d.0);
        self.record(fs, &mut shared, next)?;
        if let Some(old) = &old {
            if let Err(e) = members::retire(old) {
                log::warn!(
                    "replace: {} could not be cleared ({e}); do not give it with the pool again",
                    old.display()
                );
            }
        }
        for d in shared.retired.drain(..) {
            d.shutdown();
        }
        fs.stack.health.set_resyncing(r.index as usize, false);
        Ok(old.map(|p| p.display().to_string()))
    }
}

/// Which member `old` names: a present member's device (any spelling), or
/// a member number (`1`, `member 1`), which also names a missing one.
fn member_of(old: &str, shared: &Shared, count: u32) -> Result<u32, String> {
    let number = old.strip_prefix("member ").unwrap_or(old).trim();
    if let Ok(i) = number.parse::<u32>() {
        return if i < count {
            Ok(i)
        } else {
            Err(format!("the pool has members 0 to {}", count - 1))
        };
    }
    let path = Path::new(old);
    shared
        .devices
        .iter()
        .find(|(_, p, _)| same_file(p, path))
        .map(|(i, _, _)| *i)
        .ok_or_else(|| {
            format!("{old} is not a member of this pool (give a member's device, or its number)")
        })
}

fn same_file(a: &Path, b: &Path) -> bool {
    match (std::fs::canonicalize(a), std::fs::canonicalize(b)) {
        (Ok(a), Ok(b)) => a == b,
        _ => a == b,
    }
}

fn device_size(path: &str) -> Option<u64> {
    let f = std::fs::File::open(path).ok()?;
    stackfs_layers::device::device_size(&f).ok()
}

/// The new device's full path, checked: large enough, and holding no
/// stackfs superblock. An image file that does not exist is created with
/// `size` bytes.
fn prepare_new(path: &Path, need: u64, size: u64) -> Result<PathBuf, String> {
    let say = |e: std::io::Error| format!("{}: {e}", path.display());
    if !path.exists() {
        let f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(path)
            .map_err(say)?;
        f.set_len(size.max(need)).map_err(say)?;
    }
    let full = std::fs::canonicalize(path).map_err(say)?;
    let f = std::fs::File::open(&full).map_err(say)?;
    let have = stackfs_layers::device::device_size(&f).map_err(say)?;
    if have < need {
        return Err(format!(
            "{} holds {have} bytes; a member of this pool needs {need}",
            full.display()
        ));
    }
    if let Ok(found) = superblock::read(&f, have) {
        return Err(format!(
            "{} holds a stackfs superblock (pool {}); clear it first if it is no longer used",
            full.display(),
            crate::pool::uuid_str(&found.sb.pool_uuid)
        ));
    }
    Ok(full)
}
