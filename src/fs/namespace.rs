//! The namespace: lookup, create, link, unlink, rename, readdir, and the
//! orphans (removed while still open or held by the kernel).

use super::*;

impl Fs {
    pub(super) fn purge_orphans(&self) -> ErrnoResult<()> {
        let n = self.purge_all_orphans()?;
        if n > 0 {
            log::info!("removed {n} orphaned file(s) left by an unclean shutdown");
        }
        Ok(())
    }

    /// Free every inode in `orphans` (removed while open or held by the
    /// kernel): at mount, and at unmount once the session is over (the
    /// kernel sends no forget for what it still caches then, and a release
    /// or forget queued just before the unmount may never arrive).
    pub(super) fn purge_all_orphans(&self) -> ErrnoResult<usize> {
        let mut state = self.state.lock();
        let orphans: Vec<u64> = read_table!(self, ORPHANS, |t| t
            .iter()
            .map_err(db_err)?
            .filter_map(|r| r.ok().map(|(k, _)| k.value()))
            .collect());
        if orphans.is_empty() {
            return Ok(0);
        }
        let tx = self.begin_tx(&mut *state)?;
        for ino in &orphans {
            self.purge(&mut state, &tx, *ino)?;
            state.dirs.remove(ino);
        }
        self.commit(&mut state, tx, true)?;
        Ok(orphans.len())
    }

    /// Look a name up for the kernel: a directory found counts one lookup
    /// the kernel will forget (`forget`).
    pub fn lookup(&self, parent: u64, name: &[u8]) -> ErrnoResult<Inode> {
        let mut state = self.state.lock();
        let inode = self.lookup_in(&state, parent, name)?;
        Self::count_lookup(&mut state, &inode);
        Ok(inode)
    }

    pub(super) fn lookup_in(&self, state: &State, parent: u64, name: &[u8]) -> ErrnoResult<Inode> {
        if name.len() > NAME_MAX {
            return Err(errno(libc::ENAMETOOLONG));
        }
        // The kernel asks for "." and ".." when it decodes an exported file
        // handle (NFS, open_by_handle_at).
        // ("." of any inode is itself: handles of files are decoded that way).
        if name == b"." {
            return self.load_inode(state, parent);
        }
        if name == b".." {
            let dir = self.load_inode(state, parent)?;
            if dir.kind != Kind::Dir {
                return Err(errno(libc::ENOTDIR));
            }
            return self.load_inode(state, dir.parent);
        }
        let found = read_table!(self, DIRENTS, |t| t
            .get((parent, name))
            .map_err(db_err)?
            .map(|v| dirent_decode(v.value())));
        let Some(found) = found else {
            // Tell "no such entry" from "parent is not a directory".
            let p = self.load_inode(state, parent)?;
            return Err(errno(if p.kind == Kind::Dir {
                libc::ENOENT
            } else {
                libc::ENOTDIR
            }));
        };
        let (ino, _, _) = found?;
        self.shown_inode(state, ino)
    }

    /// The kernel got an entry for `inode` (lookup, mkdir, readdirplus): a
    /// directory's lookup count goes up by one. Only directories are
    /// counted: removed files live on through their open handles only.
    pub(super) fn count_lookup(state: &mut State, inode: &Inode) {
        if inode.kind == Kind::Dir {
            state.dirs.entry(inode.ino).or_default().lookups += 1;
        }
    }

    pub(super) fn find(
        &self,
        tx: &Tx<'_>,
        parent: u64,
        name: &[u8],
    ) -> ErrnoResult<Option<(u64, Kind, u64)>> {
        let t = tx.read(DIRENTS)?;
        let v = t.get((parent, name)).map_err(db_err)?;
        v.map(|v| dirent_decode(v.value())).transpose()
    }

    pub(super) fn add_entry(
        &self,
        tx: &Tx<'_>,
        dir: &mut Inode,
        name: &[u8],
        ino: u64,
        kind: Kind,
    ) -> ErrnoResult<()> {
        // The name's own place in the readdir order (see `name_cookie`).
        let cookie = {
            let mut cookies = tx.write(COOKIES)?;
            let mut c = name_cookie(name);
            while cookies.get((dir.ino, c)).map_err(db_err)?.is_some() {
                c = next_cookie(c);
            }
            cookies.insert((dir.ino, c), name).map_err(db_err)?;
            c
        };
        tx.write(DIRENTS)?
            .insert((dir.ino, name), dirent_val(ino, kind, cookie).as_slice())
            .map_err(db_err)?;
        let now = Ts::now();
        dir.mtime = now;
        dir.ctime = now;
        Ok(())
    }

    pub(super) fn remove_entry(
        &self,
        tx: &Tx<'_>,
        dir: &mut Inode,
        name: &[u8],
    ) -> ErrnoResult<()> {
        let old = tx
            .write(DIRENTS)?
            .remove((dir.ino, name))
            .map_err(db_err)?
            .map(|v| dirent_decode(v.value()));
        if let Some(Ok((_, _, cookie))) = old {
            tx.write(COOKIES)?
                .remove((dir.ino, cookie))
                .map_err(db_err)?;
        }
        let now = Ts::now();
        dir.mtime = now;
        dir.ctime = now;
        Ok(())
    }

    pub(super) fn check_name(name: &[u8]) -> ErrnoResult<()> {
        if name.len() > NAME_MAX {
            return Err(errno(libc::ENAMETOOLONG));
        }
        if name.is_empty() || name == b"." || name == b".." || name.contains(&b'/') {
            return Err(errno(libc::EINVAL));
        }
        Ok(())
    }

    /// Create any kind of node.
    pub fn mknod(
        &self,
        c: Caller,
        parent: u64,
        name: &[u8],
        mode: u32,
        umask: u32,
        rdev: u32,
        target: Option<&[u8]>,
    ) -> ErrnoResult<Inode> {
        Self::check_name(name)?;
        let kind = Kind::from_mode(mode).ok_or(errno(libc::EINVAL))?;
        let mut state = self.state.lock();
        let tx = self.begin_adding(&mut state)?;
        let mut dir = self.dir_for_new_name(&state, &tx, parent, name)?;
        let now = Ts::now();
        let ino = state.next_ino;
        state.next_ino += 1;
        let generation = state.next_gen;
        state.next_gen += 1;
        let (perm, gid, access_acl, default_acl) =
            self.new_mode(&tx, &dir, kind, mode, umask, c)?;
        let inode = Inode {
            ino,
            kind,
            perm,
            uid: c.uid,
            gid,
            nlink: if kind == Kind::Dir { 2 } else { 1 },
            size: target.map(|t| t.len() as u64).unwrap_or(0),
            stored: 0,
            atime: now,
            mtime: now,
            ctime: now,
            crtime: now,
            rdev,
            generation,
            parent,
            next_cookie: 3,
        };
        {
            let mut x = tx.write(XATTRS)?;
            if let Some(a) = &access_acl {
                x.insert((ino, ACL_ACCESS), a.as_slice()).map_err(db_err)?;
            }
            if let (Some(d), Kind::Dir) = (&default_acl, kind) {
                x.insert((ino, ACL_DEFAULT), d.as_slice()).map_err(db_err)?;
            }
        }
        if let Some(t) = target {
            tx.write(SYMLINKS)?.insert(ino, t).map_err(db_err)?;
        }
        self.put_inode(&mut state, &tx, &inode)?;
        self.add_entry(&tx, &mut dir, name, ino, kind)?;
        if kind == Kind::Dir {
            dir.nlink += 1;
        }
        self.put_inode(&mut state, &tx, &dir)?;
        self.commit(&mut state, tx, false)?;
        // The reply is an entry the kernel counts (mkdir).
        Self::count_lookup(&mut state, &inode);
        Ok(inode)
    }

    /// A new inode's permission bits and group, and its ACLs: a default ACL
    /// on the parent replaces the umask (POSIX.1e), the new inode's access
    /// ACL being the default masked by the requested mode; under a setgid
    /// directory the group is the directory's (BSD semantics).
    #[allow(clippy::type_complexity)]
    fn new_mode(
        &self,
        tx: &Tx<'_>,
        dir: &Inode,
        kind: Kind,
        mode: u32,
        umask: u32,
        c: Caller,
    ) -> ErrnoResult<(u16, u32, Option<Vec<u8>>, Option<Vec<u8>>)> {
        let default_acl = match kind {
            Kind::Symlink => None,
            _ => tx
                .read(XATTRS)?
                .get((dir.ino, ACL_DEFAULT))
                .map_err(db_err)?
                .map(|v| v.value().to_vec()),
        };
        let mut access_acl = None;
        let mut perm = match &default_acl {
            Some(d) => {
                let (bits, acl) = acl_create(d, mode & 0o777).ok_or(Errno::EIO)?;
                access_acl = acl;
                (mode & 0o7000) as u16 | bits
            }
            None => (mode & !umask & 0o7777) as u16,
        };
        let mut gid = c.gid;
        if dir.perm & libc::S_ISGID as u16 != 0 {
            gid = dir.gid;
            if kind == Kind::Dir {
                perm |= libc::S_ISGID as u16;
            }
        }
        Ok((perm, gid, access_acl, default_acl))
    }

    /// The directory `parent`, if `name` can be made in it: a directory
    /// (ENOTDIR), not removed (ENOENT: a removed directory that is still
    /// open takes no new names), without that name yet (EEXIST).
    fn dir_for_new_name(
        &self,
        state: &State,
        tx: &Tx<'_>,
        parent: u64,
        name: &[u8],
    ) -> ErrnoResult<Inode> {
        let dir = self.inode_tx(state, tx, parent)?;
        if dir.kind != Kind::Dir {
            return Err(errno(libc::ENOTDIR));
        }
        if dir.nlink == 0 {
            return Err(errno(libc::ENOENT));
        }
        if self.find(tx, parent, name)?.is_some() {
            return Err(errno(libc::EEXIST));
        }
        Ok(dir)
    }

    pub fn readlink(&self, ino: u64) -> ErrnoResult<Vec<u8>> {
        let _state = self.state.lock();
        let target = read_table!(self, SYMLINKS, |t| t
            .get(ino)
            .map_err(db_err)?
            .map(|v| v.value().to_vec()));
        target.ok_or(errno(libc::EINVAL))
    }

    pub fn link(&self, ino: u64, parent: u64, name: &[u8]) -> ErrnoResult<Inode> {
        Self::check_name(name)?;
        let mut state = self.state.lock();
        let tx = self.begin_adding(&mut state)?;
        let mut inode = self.inode_tx(&state, &tx, ino)?;
        if inode.kind == Kind::Dir {
            return Err(errno(libc::EPERM));
        }
        let mut dir = self.dir_for_new_name(&state, &tx, parent, name)?;
        if inode.nlink >= u32::MAX - 1 {
            return Err(errno(libc::EMLINK));
        }
        if inode.nlink == 0 {
            // Relinking an open, unlinked file (linkat with AT_EMPTY_PATH) revives it.
            tx.write(ORPHANS)?.remove(ino).map_err(db_err)?;
        }
        inode.nlink += 1;
        inode.ctime = Ts::now();
        self.add_entry(&tx, &mut dir, name, ino, inode.kind)?;
        self.put_inode(&mut state, &tx, &dir)?;
        self.put_inode(&mut state, &tx, &inode)?;
        self.commit(&mut state, tx, false)?;
        Ok(inode)
    }

    /// Drop one link of `ino`; at zero, free it now or when its last opener
    /// closes (a directory: when it is released and forgotten, `DirRefs`).
    pub(super) fn drop_link(
        &self,
        state: &mut State,
        tx: &Tx<'_>,
        inode: &mut Inode,
    ) -> ErrnoResult<()> {
        inode.nlink = inode.nlink.saturating_sub(if inode.kind == Kind::Dir {
            inode.nlink
        } else {
            1
        });
        inode.ctime = Ts::now();
        if inode.nlink > 0 {
            return self.put_inode(state, tx, inode);
        }
        let held = state.files.get(&inode.ino).is_some_and(|f| f.open > 0)
            || state
                .dirs
                .get(&inode.ino)
                .is_some_and(|d| d.open > 0 || d.lookups > 0);
        if held {
            if let Some(d) = state.dirs.get_mut(&inode.ino) {
                d.removed = true;
            }
            tx.write(ORPHANS)?.insert(inode.ino, ()).map_err(db_err)?;
            return self.put_inode(state, tx, inode);
        }
        self.purge(state, tx, inode.ino)
    }

    /// Remove an inode and everything it owns.
    pub(super) fn purge(&self, state: &mut State, tx: &Tx<'_>, ino: u64) -> ErrnoResult<()> {
        // The kernel may still write a removed file's times back before it
        // forgets the inode (writeback cache): answered from here (`setattr`).
        if let Ok(mut last) = self.inode_tx(state, tx, ino) {
            last.nlink = 0;
            state.gone.insert(ino, last);
        }
        if let Some(f) = state.files.get_mut(&ino) {
            let n = f.units.len() as u64 * UNIT;
            f.units.clear();
            f.inode = None;
            if f.open == 0 {
                state.files.remove(&ino);
            }
            state.dirty_bytes -= n.min(state.dirty_bytes);
        }
        self.drop_extents(state, tx, ino, 0)?;
        tx.write(INODES)?.remove(ino).map_err(db_err)?;
        tx.write(SYMLINKS)?.remove(ino).map_err(db_err)?;
        tx.write(ORPHANS)?.remove(ino).map_err(db_err)?;
        let mut x = tx.write(XATTRS)?;
        let names: Vec<Vec<u8>> = x
            .range((ino, &[][..])..)
            .map_err(db_err)?
            .map_while(|r| {
                r.ok()
                    .filter(|(k, _)| k.value().0 == ino)
                    .map(|(k, _)| k.value().1.to_vec())
            })
            .collect();
        for n in names {
            x.remove((ino, n.as_slice())).map_err(db_err)?;
        }
        Ok(())
    }

    /// Drop extents of units >= `from_unit`; their space is freed once durable.
    pub(super) fn drop_extents(
        &self,
        state: &mut State,
        tx: &Tx<'_>,
        ino: u64,
        from_unit: u64,
    ) -> ErrnoResult<u64> {
        let mut t = tx.write(EXTENTS)?;
        let doomed: Vec<(u64, Extent)> = t
            .range((ino, from_unit)..=(ino, u64::MAX))
            .map_err(db_err)?
            .filter_map(|r| r.ok())
            .filter_map(|(k, v)| Extent::decode(v.value()).ok().map(|x| (k.value().1, x)))
            .collect();
        let mut freed = 0;
        for (unit, x) in doomed {
            t.remove((ino, unit)).map_err(db_err)?;
            state.pending_free.push((x.phys, x.reserved_len as u64));
            freed += x.reserved_len as u64;
            self.reads.uncache(ino, unit);
        }
        Ok(freed)
    }

    pub fn unlink(&self, parent: u64, name: &[u8]) -> ErrnoResult<()> {
        let mut state = self.state.lock();
        let tx = self.begin_tx(&mut *state)?;
        let (ino, kind, _) = self.find(&tx, parent, name)?.ok_or(errno(libc::ENOENT))?;
        if kind == Kind::Dir {
            return Err(errno(libc::EISDIR));
        }
        let mut dir = self.inode_tx(&state, &tx, parent)?;
        self.remove_entry(&tx, &mut dir, name)?;
        self.put_inode(&mut state, &tx, &dir)?;
        let mut inode = self.inode_tx(&state, &tx, ino)?;
        self.drop_link(&mut state, &tx, &mut inode)?;
        self.commit(&mut state, tx, false)
    }

    pub(super) fn is_empty_dir(&self, tx: &Tx<'_>, ino: u64) -> ErrnoResult<bool> {
        let t = tx.read(COOKIES)?;
        let empty = t
            .range((ino, 0)..=(ino, u64::MAX))
            .map_err(db_err)?
            .next()
            .is_none();
        Ok(empty)
    }

    pub fn rmdir(&self, parent: u64, name: &[u8]) -> ErrnoResult<()> {
        if name == b"." {
            return Err(errno(libc::EINVAL));
        }
        if name == b".." {
            return Err(errno(libc::ENOTEMPTY));
        }
        let mut state = self.state.lock();
        let tx = self.begin_tx(&mut *state)?;
        let (ino, kind, _) = self.find(&tx, parent, name)?.ok_or(errno(libc::ENOENT))?;
        if kind != Kind::Dir {
            return Err(errno(libc::ENOTDIR));
        }
        if !self.is_empty_dir(&tx, ino)? {
            return Err(errno(libc::ENOTEMPTY));
        }
        let mut dir = self.inode_tx(&state, &tx, parent)?;
        self.remove_entry(&tx, &mut dir, name)?;
        dir.nlink = dir.nlink.saturating_sub(1);
        self.put_inode(&mut state, &tx, &dir)?;
        let mut inode = self.inode_tx(&state, &tx, ino)?;
        self.drop_link(&mut state, &tx, &mut inode)?;
        self.commit(&mut state, tx, false)
    }

    /// Entries after `offset` (a cookie; 0 = start, 1 = after ".", 2 = after "..").
    pub fn readdir(
        &self,
        ino: u64,
        offset: u64,
        mut want: impl FnMut(&Entry) -> bool,
    ) -> ErrnoResult<()> {
        let state = self.state.lock();
        let dir = self.load_inode(&state, ino)?;
        if dir.kind != Kind::Dir {
            return Err(errno(libc::ENOTDIR));
        }
        drop(state);
        if offset < 1
            && !want(&Entry {
                cookie: 1,
                ino,
                kind: Kind::Dir,
                name: b".".to_vec(),
            })
        {
            return Ok(());
        }
        if offset < 2
            && !want(&Entry {
                cookie: 2,
                ino: dir.parent,
                kind: Kind::Dir,
                name: b"..".to_vec(),
            })
        {
            return Ok(());
        }
        // In chunks, each read under the lock: `want` may take it (readdirplus).
        const CHUNK: usize = 128;
        let mut next = offset.max(2).saturating_add(1);
        loop {
            let chunk = {
                let _state = self.state.lock();
                self.entries(ino, next, CHUNK)?
            };
            for e in &chunk {
                if !want(e) {
                    return Ok(());
                }
            }
            match chunk.last() {
                Some(last) if chunk.len() == CHUNK && last.cookie < u64::MAX => {
                    next = last.cookie + 1
                }
                _ => return Ok(()),
            }
        }
    }

    /// Up to `max` entries of directory `ino` from cookie `next` on.
    fn entries(&self, ino: u64, next: u64, max: usize) -> ErrnoResult<Vec<Entry>> {
        read_table!(self, (COOKIES, DIRENTS), |cookies, dirents| {
            let mut out = Vec::new();
            for row in cookies
                .range((ino, next)..=(ino, u64::MAX))
                .map_err(db_err)?
            {
                let (k, name) = row.map_err(db_err)?;
                let name = name.value().to_vec();
                let Some(v) = dirents.get((ino, name.as_slice())).map_err(db_err)? else {
                    continue;
                };
                let (child, kind, _) = dirent_decode(v.value())?;
                out.push(Entry {
                    cookie: k.value().1,
                    ino: child,
                    kind,
                    name,
                });
                if out.len() == max {
                    break;
                }
            }
            Ok(out)
        })
    }

    /// opendir: a handle on a directory, which keeps it (with no links, in
    /// `orphans`) if it is removed while open, until `release_dir`.
    pub fn open_dir(&self, ino: u64) -> ErrnoResult<Inode> {
        let mut state = self.state.lock();
        let inode = self.load_inode(&state, ino)?;
        if inode.kind != Kind::Dir {
            return Err(errno(libc::ENOTDIR));
        }
        state.dirs.entry(ino).or_default().open += 1;
        Ok(inode)
    }

    /// releasedir: the last handle of a removed directory frees it, unless
    /// the kernel still holds it (lookups not yet forgotten).
    pub fn release_dir(&self, ino: u64) -> ErrnoResult<()> {
        let mut state = self.state.lock();
        let Some(d) = state.dirs.get_mut(&ino) else {
            return Ok(());
        };
        d.open = d.open.saturating_sub(1);
        if Self::unheld(&mut state, ino) {
            self.purge_dead_dirs(&mut state, &[ino])?;
        }
        Ok(())
    }

    /// readdirplus gave the kernel an entry (other than "." and ".."): it
    /// counts as a lookup of that inode.
    pub fn remember(&self, inode: &Inode) {
        Self::count_lookup(&mut self.state.lock(), inode);
    }

    /// The kernel forgets `n` lookups of `ino`.
    pub fn forget(&self, ino: u64, n: u64) {
        self.forget_many(&[(ino, n)])
    }

    /// The kernel forgets lookups, (inode, count) each. The directories
    /// removed while held that nothing holds any more are freed together.
    pub fn forget_many(&self, nodes: &[(u64, u64)]) {
        let mut state = self.state.lock();
        let mut dead = Vec::new();
        for &(ino, n) in nodes {
            state.gone.remove(&ino);
            let Some(d) = state.dirs.get_mut(&ino) else {
                continue;
            };
            d.lookups = d.lookups.saturating_sub(n);
            if Self::unheld(&mut state, ino) {
                dead.push(ino);
            }
        }
        if let Err(e) = self.purge_dead_dirs(&mut state, &dead) {
            log::warn!(
                "freeing {} removed directories: {e} (freed at unmount)",
                dead.len()
            );
        }
    }

    /// Stop tracking a directory nothing holds any more; true if it was
    /// removed (it is freed now).
    pub(super) fn unheld(state: &mut State, ino: u64) -> bool {
        match state.dirs.get(&ino) {
            Some(d) if d.open == 0 && d.lookups == 0 => {
                state.dirs.remove(&ino).is_some_and(|d| d.removed)
            }
            _ => false,
        }
    }

    /// Free removed directories nothing holds (those that really have no
    /// links: the removal may not have committed).
    pub(super) fn purge_dead_dirs(&self, state: &mut State, inos: &[u64]) -> ErrnoResult<()> {
        if inos.is_empty() || self.read_only {
            return Ok(());
        }
        let tx = self.begin_tx(state)?;
        let mut n = 0;
        for &ino in inos {
            if self
                .inode_tx(state, &tx, ino)
                .is_ok_and(|i| i.kind == Kind::Dir && i.nlink == 0)
            {
                self.purge(state, &tx, ino)?;
                n += 1;
            }
        }
        if n == 0 {
            return Ok(());
        }
        self.commit(state, tx, false)
    }

    /// fsync: this file's data and all metadata so far, durably.
    /// The inode a directory entry names.
    pub(super) fn entry_ino(&self, dir: u64, name: &[u8]) -> ErrnoResult<Option<u64>> {
        let v = read_table!(self, DIRENTS, |t| t
            .get((dir, name))
            .map_err(db_err)?
            .map(|v| dirent_decode(v.value()).map(|(i, _, _)| i)));
        v.transpose()
    }
}
