//! Attributes: getattr, setattr, times, extended attributes and POSIX ACLs.

use super::*;

impl Fs {
    pub fn getattr(&self, ino: u64) -> ErrnoResult<Inode> {
        let state = self.state.lock();
        self.shown_inode(&state, ino)
    }

    /// The inode as `stat` shows it: space counts the file's data still in
    /// memory too (what it will take at most once flushed), so that `du`
    /// and sparse-file heuristics (blocks < size) do not see a written file
    /// as empty before its group flush.
    pub(super) fn shown_inode(&self, state: &State, ino: u64) -> ErrnoResult<Inode> {
        let mut inode = self.load_inode(state, ino)?;
        if let Some(f) = state.files.get(&ino).filter(|f| !f.units.is_empty()) {
            // Units that replace a stored extent take its place, not more.
            let first = f.units.keys().next().copied().unwrap_or(0);
            let last = f.units.keys().next_back().copied().unwrap_or(0);
            let stored: std::collections::HashSet<u64> = self
                .extents(ino, first, last)?
                .into_iter()
                .map(|(u, _)| u)
                .collect();
            for (u, d) in f.units.iter().filter(|(u, _)| !stored.contains(u)) {
                let bytes = if d.preallocated {
                    UNIT
                } else {
                    inode
                        .size
                        .saturating_sub(u * UNIT)
                        .min(UNIT)
                        .div_ceil(BLOCK)
                        * BLOCK
                };
                inode.stored += bytes;
            }
        }
        Ok(inode)
    }

    /// Drop the set-id bits that a change of kind `why` by `who` takes from
    /// `ino` (`setid_loss`), as Linux does before (or, for an ACL, with)
    /// the change itself. The kernel leaves this to us
    /// (FUSE_HANDLE_KILLPRIV_V2). Cheap when the file has no set-id bits.
    pub fn drop_setid(&self, ino: u64, why: SetidChange, who: &dyn Privs) -> ErrnoResult<()> {
        let mut state = self.state.lock();
        if setid_loss(&self.load_inode(&state, ino)?, why, who) == 0 {
            return Ok(());
        }
        let tx = self.begin_tx(&mut *state)?;
        let mut inode = self.inode_tx(&state, &tx, ino)?;
        inode.perm &= !setid_loss(&inode, why, who);
        inode.ctime = Ts::now();
        self.put_inode(&mut state, &tx, &inode)?;
        self.commit(&mut state, tx, false)
    }

    pub fn setattr(&self, ino: u64, a: SetAttr) -> ErrnoResult<Inode> {
        let mut state = self.state.lock();
        // Times only (the kernel's writeback cache sends these after writes),
        // on a file whose changed inode is still in memory: the change joins
        // it there and is committed with the file's data.
        if a.mode.is_none() && a.uid.is_none() && a.gid.is_none() && a.size.is_none() {
            if let Some(inode) = state.files.get_mut(&ino).and_then(|f| f.inode.as_mut()) {
                Self::set_times(inode, &a);
                return self.shown_inode(&state, ino);
            }
            // The times of a file removed since, written back by the kernel
            // before it forgets the inode: nothing to keep, nothing to fail
            // (an error here would reach the next syncfs as a write error).
            if let Some(gone) = state.gone.get_mut(&ino) {
                Self::set_times(gone, &a);
                return Ok(gone.clone());
            }
        }
        if let Some(size) = a.size {
            self.truncate(&mut state, ino, size)?;
        }
        let tx = self.begin_tx(&mut *state)?;
        let mut inode = self.inode_tx(&state, &tx, ino)?;
        if let Some(m) = a.mode {
            inode.perm = (m & 0o7777) as u16;
        }
        // The set-id bits a chown drops are dropped before it (`drop_setid`):
        // which ones depends on the caller.
        if a.uid.is_some() || a.gid.is_some() {
            if let Some(u) = a.uid {
                inode.uid = u;
            }
            if let Some(g) = a.gid {
                inode.gid = g;
            }
        }
        Self::set_times(&mut inode, &a);
        self.put_inode(&mut state, &tx, &inode)?;
        self.commit(&mut state, tx, false)?;
        Ok(inode)
    }

    /// The mount's current rules.
    pub fn policy(&self) -> MountPolicy {
        *self.policy.lock()
    }

    /// A remount's options: what they say replaces, the rest stays.
    pub fn set_policy(&self, atime: crate::atime::AtimePolicy, sync_metadata: Option<bool>) {
        let mut p = self.policy.lock();
        (p.atime, p.nodiratime) = atime.over((p.atime, p.nodiratime));
        if let Some(s) = sync_metadata {
            p.sync_metadata = s;
        }
    }

    /// An access to `ino` (an open for reading, or of a directory): update
    /// its atime if the mount's atime rules say so (see atime.rs). The
    /// ctime does not change. True when the atime moved.
    pub fn touch_atime(&self, ino: u64, dir: bool) -> ErrnoResult<bool> {
        let p = self.policy();
        if self.read_only || (dir && p.nodiratime) {
            return Ok(false);
        }
        let now = Ts::now();
        let i = self.getattr(ino)?;
        if !crate::atime::due(p.atime, i.atime, i.mtime, i.ctime, now) {
            return Ok(false);
        }
        self.setattr(
            ino,
            SetAttr {
                atime: Some(now),
                ctime: Some(i.ctime),
                ..SetAttr::default()
            },
        )
        .map(|_| true)
    }

    pub(super) fn set_times(inode: &mut Inode, a: &SetAttr) {
        if let Some(t) = a.atime {
            inode.atime = t;
        }
        if let Some(t) = a.mtime {
            inode.mtime = t;
        }
        inode.ctime = a.ctime.unwrap_or_else(Ts::now);
        if a.size.is_some() && a.mtime.is_none() {
            inode.mtime = inode.ctime;
        }
    }

    pub fn setxattr(&self, ino: u64, name: &[u8], value: &[u8], flags: i32) -> ErrnoResult<()> {
        if name.is_empty() || name.len() > 255 {
            return Err(errno(libc::ERANGE));
        }
        if value.len() > XATTR_SIZE_MAX {
            return Err(errno(libc::E2BIG));
        }
        let mut state = self.state.lock();
        let tx = self.begin_adding(&mut state)?;
        let mut inode = self.inode_tx(&state, &tx, ino)?;
        if name == ACL_ACCESS {
            // The kernel leaves ACLs to us: an access ACL carries the mode bits,
            // and one with no named entries is nothing but a mode (as on ext4).
            let (mode, minimal) = acl_mode(value).ok_or(errno(libc::EINVAL))?;
            inode.perm = (inode.perm & !0o777) | mode;
            if minimal {
                tx.write(XATTRS)?.remove((ino, name)).map_err(db_err)?;
                inode.ctime = Ts::now();
                self.put_inode(&mut state, &tx, &inode)?;
                return self.commit(&mut state, tx, false);
            }
        }
        let exists = tx.read(XATTRS)?.get((ino, name)).map_err(db_err)?.is_some();
        if flags & libc::XATTR_CREATE != 0 && exists {
            return Err(errno(libc::EEXIST));
        }
        if flags & libc::XATTR_REPLACE != 0 && !exists {
            return Err(errno(libc::ENODATA));
        }
        tx.write(XATTRS)?
            .insert((ino, name), value)
            .map_err(db_err)?;
        inode.ctime = Ts::now();
        self.put_inode(&mut state, &tx, &inode)?;
        self.commit(&mut state, tx, false)
    }

    pub fn getxattr(&self, ino: u64, name: &[u8]) -> ErrnoResult<Vec<u8>> {
        if name.len() > 255 {
            return Err(errno(libc::ERANGE));
        }
        let state = self.state.lock();
        self.load_inode(&state, ino)?;
        let value = read_table!(self, XATTRS, |t| t
            .get((ino, name))
            .map_err(db_err)?
            .map(|v| v.value().to_vec()));
        value.ok_or(errno(libc::ENODATA))
    }

    pub fn listxattr(&self, ino: u64) -> ErrnoResult<Vec<u8>> {
        let state = self.state.lock();
        self.load_inode(&state, ino)?;
        read_table!(self, XATTRS, |t| {
            let mut out = Vec::new();
            for row in t.range((ino, &[][..])..).map_err(db_err)? {
                let (k, _) = row.map_err(db_err)?;
                let (i, n) = k.value();
                if i != ino {
                    break;
                }
                out.extend_from_slice(n);
                out.push(0);
            }
            Ok(out)
        })
    }

    pub fn removexattr(&self, ino: u64, name: &[u8]) -> ErrnoResult<()> {
        let mut state = self.state.lock();
        let tx = self.begin_tx(&mut *state)?;
        let mut inode = self.inode_tx(&state, &tx, ino)?;
        if tx.read(XATTRS)?.get((ino, name)).map_err(db_err)?.is_none() {
            return Err(errno(libc::ENODATA));
        }
        tx.write(XATTRS)?.remove((ino, name)).map_err(db_err)?;
        inode.ctime = Ts::now();
        self.put_inode(&mut state, &tx, &inode)?;
        self.commit(&mut state, tx, false)
    }
}

pub(super) const ACL_ACCESS: &[u8] = b"system.posix_acl_access";
pub(super) const ACL_DEFAULT: &[u8] = b"system.posix_acl_default";
pub(super) const ACL_USER_OBJ: u16 = 0x01;
pub(super) const ACL_GROUP_OBJ: u16 = 0x04;
pub(super) const ACL_MASK: u16 = 0x10;
pub(super) const ACL_OTHER: u16 = 0x20;

/// Entries (tag, perm, id) of an ACL in its xattr form; None if malformed.
pub(super) fn acl_entries(v: &[u8]) -> Option<Vec<(u16, u16, u32)>> {
    if v.len() < 4 || (v.len() - 4) % 8 != 0 || u32::from_le_bytes(v[..4].try_into().ok()?) != 2 {
        return None;
    }
    Some(
        v[4..]
            .chunks(8)
            .map(|e| {
                (
                    u16::from_le_bytes([e[0], e[1]]),
                    u16::from_le_bytes([e[2], e[3]]) & 7,
                    u32::from_le_bytes([e[4], e[5], e[6], e[7]]),
                )
            })
            .collect(),
    )
}

/// What a new inode gets from its parent's default ACL and the requested
/// mode (as Linux's posix_acl_create): its permission bits, and its access
/// ACL unless that says no more than the bits.
pub(super) fn acl_create(default: &[u8], mode: u32) -> Option<(u16, Option<Vec<u8>>)> {
    let mut entries = acl_entries(default)?;
    let has_mask = entries.iter().any(|e| e.0 == ACL_MASK);
    let m = mode as u16;
    for e in entries.iter_mut() {
        match e.0 {
            ACL_USER_OBJ => e.1 &= (m >> 6) & 7,
            ACL_MASK => e.1 &= (m >> 3) & 7,
            ACL_GROUP_OBJ if !has_mask => e.1 &= (m >> 3) & 7,
            ACL_OTHER => e.1 &= m & 7,
            _ => {}
        }
    }
    let mut out = 2u32.to_le_bytes().to_vec();
    for (tag, perm, id) in &entries {
        out.extend_from_slice(&tag.to_le_bytes());
        out.extend_from_slice(&perm.to_le_bytes());
        out.extend_from_slice(&id.to_le_bytes());
    }
    let (bits, minimal) = acl_mode(&out)?;
    Some((bits, (!minimal).then_some(out)))
}

/// The permission bits an access ACL (Linux xattr form) implies, and whether
/// it is minimal (owner, group and other only). None if malformed.
pub(super) fn acl_mode(v: &[u8]) -> Option<(u16, bool)> {
    let (mut user, mut group, mut other, mut mask) = (None, None, None, None);
    let mut minimal = true;
    for (tag, perm, _) in acl_entries(v)? {
        match tag {
            ACL_USER_OBJ => user = Some(perm),
            ACL_GROUP_OBJ => group = Some(perm),
            ACL_OTHER => other = Some(perm),
            ACL_MASK => {
                mask = Some(perm);
                minimal = false;
            }
            0x02 | 0x08 => minimal = false,
            _ => return None,
        }
    }
    let g = mask.or(group)?;
    Some(((user? << 6) | (g << 3) | other?, minimal))
}
