//! Rename: moving and exchanging names, with the checks POSIX asks for.

use super::*;

impl Fs {
    /// Is `ancestor` on the path from `dir` up to the root?
    pub(super) fn is_ancestor(
        &self,
        state: &State,
        tx: &Tx<'_>,
        ancestor: u64,
        mut dir: u64,
    ) -> ErrnoResult<bool> {
        for _ in 0..100_000 {
            if dir == ancestor {
                return Ok(true);
            }
            if dir == ROOT {
                return Ok(false);
            }
            dir = self.inode_tx(state, tx, dir)?.parent;
        }
        Err(Errno::EIO)
    }

    pub fn rename(
        &self,
        parent: u64,
        name: &[u8],
        newparent: u64,
        newname: &[u8],
        flags: u32,
    ) -> ErrnoResult<()> {
        const NOREPLACE: u32 = libc::RENAME_NOREPLACE;
        const EXCHANGE: u32 = libc::RENAME_EXCHANGE;
        if flags & !(NOREPLACE | EXCHANGE) != 0 || flags == NOREPLACE | EXCHANGE {
            return Err(errno(libc::EINVAL));
        }
        Self::check_name(newname)?;
        let mut state = self.state.lock();
        // Write-then-rename replaces files safely only if the data lands no
        // later than the rename (ext4's auto_da_alloc): write both files'
        // dirty data first, so that no commit that makes the rename durable
        // can leave the new name with the new size and no data.
        for (dir, n) in [(parent, name), (newparent, newname)] {
            if let Some(i) = self.entry_ino(dir, n)? {
                if state.files.get(&i).is_some_and(|f| f.inode.is_some()) {
                    self.flush_file(&mut state, i, false)?;
                }
            }
        }
        let tx = self.begin_tx(&mut *state)?;
        let (ino, kind, _) = self.find(&tx, parent, name)?.ok_or(errno(libc::ENOENT))?;
        let target = self.find(&tx, newparent, newname)?;
        self.inode_tx(&state, &tx, parent)?;
        let nd = self.inode_tx(&state, &tx, newparent)?;
        if nd.kind != Kind::Dir {
            return Err(errno(libc::ENOTDIR));
        }
        if nd.nlink == 0 {
            // Into a removed directory (still open somewhere): as ext4.
            return Err(errno(libc::ENOENT));
        }
        if kind == Kind::Dir
            && parent != newparent
            && self.is_ancestor(&state, &tx, ino, newparent)?
        {
            return Err(errno(libc::EINVAL));
        }
        let names = RenameNames {
            parent,
            name,
            newparent,
            newname,
        };
        if flags & EXCHANGE != 0 {
            let target = target.ok_or(errno(libc::ENOENT))?;
            if target.0 != ino {
                self.exchange(&mut state, &tx, &names, (ino, kind), (target.0, target.1))?;
            }
            return self.commit(&mut state, tx, false);
        }
        if let Some((tino, tkind, _)) = target {
            if flags & NOREPLACE != 0 {
                return Err(errno(libc::EEXIST));
            }
            if tino == ino {
                // Two names of one inode: POSIX says do nothing.
                return self.commit(&mut state, tx, false);
            }
            match (kind == Kind::Dir, tkind == Kind::Dir) {
                (true, false) => return Err(errno(libc::ENOTDIR)),
                (false, true) => return Err(errno(libc::EISDIR)),
                (true, true) if !self.is_empty_dir(&tx, tino)? => {
                    return Err(errno(libc::ENOTEMPTY))
                }
                _ => {}
            }
            let mut ndir = self.inode_tx(&state, &tx, newparent)?;
            self.remove_entry(&tx, &mut ndir, newname)?;
            if tkind == Kind::Dir {
                ndir.nlink = ndir.nlink.saturating_sub(1);
            }
            self.put_inode(&mut state, &tx, &ndir)?;
            let mut t = self.inode_tx(&state, &tx, tino)?;
            self.drop_link(&mut state, &tx, &mut t)?;
        }
        self.move_entry(&mut state, &tx, &names, ino, kind)?;
        self.commit(&mut state, tx, false)
    }

    /// Rename's last step: the entry leaves its directory for the new one
    /// (a directory takes its ".." link along).
    fn move_entry(
        &self,
        state: &mut State,
        tx: &Tx<'_>,
        names: &RenameNames,
        ino: u64,
        kind: Kind,
    ) -> ErrnoResult<()> {
        let moves_dir = kind == Kind::Dir && names.parent != names.newparent;
        let mut pdir = self.inode_tx(state, tx, names.parent)?;
        self.remove_entry(tx, &mut pdir, names.name)?;
        if moves_dir {
            pdir.nlink = pdir.nlink.saturating_sub(1);
        }
        self.put_inode(state, tx, &pdir)?;
        let mut ndir = self.inode_tx(state, tx, names.newparent)?;
        self.add_entry(tx, &mut ndir, names.newname, ino, kind)?;
        if moves_dir {
            ndir.nlink += 1;
        }
        self.put_inode(state, tx, &ndir)?;
        let mut n = self.inode_tx(state, tx, ino)?;
        if kind == Kind::Dir {
            n.parent = names.newparent;
        }
        n.ctime = Ts::now();
        self.put_inode(state, tx, &n)
    }

    /// RENAME_EXCHANGE of two different inodes: each name now names the other.
    fn exchange(
        &self,
        state: &mut State,
        tx: &Tx<'_>,
        names: &RenameNames,
        (ino, kind): (u64, Kind),
        (tino, tkind): (u64, Kind),
    ) -> ErrnoResult<()> {
        let (parent, newparent) = (names.parent, names.newparent);
        if tkind == Kind::Dir && parent != newparent && self.is_ancestor(state, tx, tino, parent)? {
            return Err(errno(libc::EINVAL));
        }
        let mut pdir = self.inode_tx(state, tx, parent)?;
        self.remove_entry(tx, &mut pdir, names.name)?;
        self.put_inode(state, tx, &pdir)?;
        let mut ndir = self.inode_tx(state, tx, newparent)?;
        self.remove_entry(tx, &mut ndir, names.newname)?;
        self.add_entry(tx, &mut ndir, names.newname, ino, kind)?;
        self.put_inode(state, tx, &ndir)?;
        let mut pdir = self.inode_tx(state, tx, parent)?;
        self.add_entry(tx, &mut pdir, names.name, tino, tkind)?;
        if parent != newparent {
            // A directory that moves takes its ".." link along.
            let d = (kind == Kind::Dir) as i64 - (tkind == Kind::Dir) as i64;
            pdir.nlink = (pdir.nlink as i64 - d) as u32;
            self.put_inode(state, tx, &pdir)?;
            let mut ndir = self.inode_tx(state, tx, newparent)?;
            ndir.nlink = (ndir.nlink as i64 + d) as u32;
            self.put_inode(state, tx, &ndir)?;
        } else {
            self.put_inode(state, tx, &pdir)?;
        }
        for (i, p) in [(ino, newparent), (tino, parent)] {
            let mut n = self.inode_tx(state, tx, i)?;
            if n.kind == Kind::Dir {
                n.parent = p;
            }
            n.ctime = Ts::now();
            self.put_inode(state, tx, &n)?;
        }
        Ok(())
    }
}

/// The two names of a rename.
struct RenameNames<'a> {
    parent: u64,
    name: &'a [u8],
    newparent: u64,
    newname: &'a [u8],
}
