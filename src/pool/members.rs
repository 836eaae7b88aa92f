//! Which members hold a whole copy of their data. Every member present keeps
//! the pool's member-state record in its superblock (`MemberStates`): the
//! members that missed writes (stale, with how far their resync got) and a
//! replace in progress. The copy with the highest sequence is the current
//! one: a member that was away keeps an older one.
//!
//! At open, the record decides what a mirror may read: a stale member, or
//! the member being replaced, takes writes but serves no read until it is
//! whole again. A member missing from a degraded mount is recorded as stale
//! before anything is written, so that it is never trusted again without a
//! resync. Two members that each record the other as stale were each used
//! without the other: the pool has diverged, and is not opened.

use super::{dev_err, open_dev, uuid_str, PoolError, Superblocks};
use crate::superblock::{self, MemberStates, SbKey};
use stackfs_layers::StackSpec;
use std::path::PathBuf;

/// The current record: the one with the highest sequence among the members
/// present.
pub fn current(found: &Superblocks) -> MemberStates {
    found
        .iter()
        .map(|(_, _, sb)| &sb.states)
        .max_by_key(|s| s.seq)
        .cloned()
        .unwrap_or_default()
}

/// Whether member `index` must not serve reads: it missed writes, or it is
/// being replaced (its old device misses the writes the new one takes).
pub fn behind(states: &MemberStates, index: u32) -> bool {
    states.is_stale(index) || states.replace.as_ref().is_some_and(|r| r.index == index)
}

/// Refuse a pool whose members were used apart: member A records B as
/// stale while B records A as stale.
pub fn check_diverged(found: &Superblocks) -> Result<(), PoolError> {
    for (path_a, _, a) in found {
        for (path_b, _, b) in found {
            if a.index < b.index && a.states.is_stale(b.index) && b.states.is_stale(a.index) {
                return Err(PoolError::Other(format!(
                    "{} (member {}) and {} (member {}) were each used without the other: \
                     their data has diverged. Mount with one of them only (-o degraded), \
                     then replace the other (stackfs replace)",
                    path_a.display(),
                    a.index,
                    path_b.display(),
                    b.index
                )));
            }
        }
    }
    Ok(())
}

/// Every mirror group must keep a member that is present and whole.
/// `missing`: the members not given. Without `degraded`, any missing member
/// is an error.
pub fn check_groups(
    spec: &StackSpec,
    count: u32,
    missing: &[u32],
    states: &MemberStates,
    degraded: bool,
    uuid: &[u8; 16],
) -> Result<(), PoolError> {
    let copies = spec.copies() as u32;
    if !missing.is_empty() && (!degraded || copies < 2) {
        let hint = if copies >= 2 {
            "; the pool is mirrored: mount -o degraded uses it without that member"
        } else {
            " (give every device, in any order)"
        };
        return Err(PoolError::Missing {
            uuid: uuid_str(uuid),
            count,
            missing: missing[0],
            hint,
        });
    }
    for first in (0..count).step_by(copies.max(1) as usize) {
        let group: Vec<u32> = (first..first + copies).collect();
        let whole = group
            .iter()
            .any(|i| !missing.contains(i) && !behind(states, *i));
        if !whole {
            let say = |i: &u32| {
                if missing.contains(i) {
                    format!("member {i} is missing")
                } else {
                    format!("member {i} missed writes")
                }
            };
            return Err(PoolError::Other(format!(
                "mirror group {group:?} has no member present with all of its data ({}); \
                 give the missing devices",
                group.iter().map(say).collect::<Vec<_>>().join(", ")
            )));
        }
    }
    Ok(())
}

/// The record a read-write open writes before anything else: the members
/// missing now are stale from the start (their resync begins at 0). None
/// when nothing changes.
pub fn after_open(states: &MemberStates, missing: &[u32]) -> Option<MemberStates> {
    let mut next = states.clone();
    for &i in missing {
        next.mark_stale(i, 0);
    }
    if next == *states {
        return None;
    }
    next.seq += 1;
    Some(next)
}

/// The record once a replace that cannot go on is given up: the member is
/// stale from the start (its old device, if it is given, is resynced).
pub fn drop_replace(states: &MemberStates) -> MemberStates {
    let mut next = states.clone();
    if let Some(r) = next.replace.take() {
        next.mark_stale(r.index, 0);
    }
    next.seq += 1;
    next
}

/// Take back the new device of a replace in progress (after a restart): it
/// must still hold no superblock and be large enough. Returns its lock.
pub fn reopen_new(r: &superblock::Replacing, need: u64) -> Result<crate::lock::PoolLock, String> {
    let path = PathBuf::from(&r.path);
    let lock = crate::lock::lock(
        std::slice::from_ref(&path),
        crate::lock::Mode::Exclusive,
        std::time::Duration::ZERO,
    )?;
    let d = open_dev(&path, true).map_err(|e| e.to_string())?;
    if d.size < need {
        return Err(format!(
            "it holds {} bytes, the member needs {need}",
            d.size
        ));
    }
    if superblock::read(&d.file, d.size).is_ok() {
        return Err("it holds a stackfs superblock now".into());
    }
    Ok(lock)
}

/// Write `states` into the superblocks of the members present (both copies,
/// durably), sealed with `key` on an encrypted pool.
pub fn record(
    devices: &[(PathBuf, u64)],
    key: Option<&SbKey>,
    states: &MemberStates,
) -> Result<(), PoolError> {
    super::update_superblocks(devices, key, |sb| sb.states = states.clone())
}

/// Write the superblock that makes `path` member `index` of the pool, with
/// `like` as the pool-wide fields: the last step of a replace.
pub fn enroll(
    path: &std::path::Path,
    like: &superblock::Superblock,
    index: u32,
    device_uuid: [u8; 16],
    key: Option<&SbKey>,
) -> Result<(), PoolError> {
    let d = open_dev(path, true)?;
    let mut sb = like.clone();
    sb.index = index;
    sb.device_uuid = device_uuid;
    if let Some(k) = key {
        sb.seal(k);
    }
    superblock::write(&d.file, d.size, &sb).map_err(dev_err(path))
}

/// Zero both superblock copies of a member that left the pool (replaced):
/// it is no longer taken for a member.
pub fn retire(path: &std::path::Path) -> Result<(), PoolError> {
    use std::os::unix::fs::FileExt;
    let d = open_dev(path, true)?;
    let zeros = vec![0u8; superblock::SB_SIZE];
    for off in [0, superblock::backup_offset(d.size)] {
        d.file.write_all_at(&zeros, off).map_err(dev_err(path))?;
    }
    d.file.sync_data().map_err(dev_err(path))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_member_missing_now_restarts_its_resync() {
        let states = MemberStates {
            seq: 4,
            stale: vec![(1, 4096)],
            replace: None,
        };
        let next = after_open(&states, &[1, 3]).unwrap();
        assert_eq!(next.seq, 5);
        assert_eq!(next.stale, vec![(1, 0), (3, 0)]);
        assert!(after_open(&next, &[]).is_none());
    }

    #[test]
    fn a_group_needs_a_whole_member() {
        let spec = StackSpec::parse("stripe=64k,mirror=2").unwrap();
        let none = MemberStates::default();
        let uuid = [0; 16];
        assert!(check_groups(&spec, 4, &[1], &none, true, &uuid).is_ok());
        assert!(check_groups(&spec, 4, &[1], &none, false, &uuid).is_err());
        assert!(check_groups(&spec, 4, &[1, 2], &none, true, &uuid).is_ok());
        let err = check_groups(&spec, 4, &[0, 1], &none, true, &uuid).unwrap_err();
        assert!(err.to_string().contains("group [0, 1]"), "{err}");
        let stale = MemberStates {
            seq: 1,
            stale: vec![(0, 0)],
            replace: None,
        };
        assert!(check_groups(&spec, 4, &[1], &stale, true, &uuid).is_err());
        let plain = StackSpec::parse("stripe=64k").unwrap();
        let err = check_groups(&plain, 2, &[1], &none, true, &uuid).unwrap_err();
        assert!(err.to_string().contains("missing device number 1"), "{err}");
    }
}
