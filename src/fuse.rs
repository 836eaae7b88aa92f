//! The FUSE front end: a thin adapter from fuser's callbacks to `Fs`.

use crate::fs::{Caller, Fs, Inode, Privs, SetAttr, SetidChange, ROOT};
use fuser::{
    AccessFlags, CopyFileRangeFlags, Errno, FileHandle, Filesystem, FopenFlags, Generation,
    INodeNo, InitFlags, KernelConfig, LockOwner, OpenFlags, RenameFlags, ReplyAttr, ReplyCreate,
    ReplyData, ReplyDirectory, ReplyDirectoryPlus, ReplyEmpty, ReplyEntry, ReplyLseek, ReplyOpen,
    ReplyStatfs, ReplyWrite, ReplyXattr, Request, TimeOrNow, WriteFlags,
};
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

mod attr;
mod control;
mod privs;
mod requests;

pub use attr::attr;
use attr::{from_kernel, kind, missing, time};
use control::{
    health_and_jobs, is_admin, stats_json, COPIED_XATTR, FAULT_XATTR, HEALTH_XATTR, JOB_XATTR,
    MOUNT_XATTR, REPLACE_XATTR, SCRUB_XATTR, STATS_XATTR,
};
pub use control::{health_json, stack_stats};
use privs::ReqPrivs;
use requests::{Op, REQUESTS};

/// How long the kernel may trust attributes and names: we are the only writer.
const TTL: Duration = Duration::from_secs(1);

pub struct FuseFs {
    pub fs: Arc<Fs>,
    pub writeback: bool,
    /// Tells the kernel when attributes it caches changed behind its back
    /// (an atime the daemon updated); set once the session exists.
    pub notifier: Arc<std::sync::OnceLock<fuser::Notifier>>,
    /// Resync, replace and scrub (read-write mounts of a pool).
    pub jobs: Option<Arc<crate::rebuild::Jobs>>,
}

fn errno(e: stackfs_layers::Errno) -> Errno {
    Errno::from_i32(e.0)
}

fn caller(req: &Request) -> Caller {
    Caller {
        uid: req.uid(),
        gid: req.gid(),
    }
}

impl FuseFs {
    fn entry(&self, reply: ReplyEntry, r: Result<Inode, stackfs_layers::Errno>) {
        match r {
            Ok(i) => reply.entry(&TTL, &attr(&i), Generation(i.generation)),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn data(reply: ReplyData, r: Result<Vec<u8>, stackfs_layers::Errno>) {
        match r {
            Ok(d) => reply.data(&d),
            Err(e) => reply.error(errno(e)),
        }
    }

    /// Apply the atime rules to an access; the kernel's cached attributes of
    /// the inode are dropped when the atime moved, so `stat` shows it.
    fn touch_atime(&self, ino: u64, dir: bool) {
        match self.fs.touch_atime(ino, dir) {
            Ok(true) => {
                if let Some(n) = self.notifier.get() {
                    // Attributes only (a negative offset): the data stays cached.
                    if let Err(e) = n.inval_inode(INodeNo(ino), -1, 0) {
                        log::debug!("invalidating the attributes of inode {ino}: {e}");
                    }
                }
            }
            Ok(false) => {}
            Err(e) => log::warn!("atime of inode {ino}: {e}"),
        }
    }

    fn empty(reply: ReplyEmpty, r: Result<(), stackfs_layers::Errno>) {
        match r {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno(e)),
        }
    }
}

impl Filesystem for FuseFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        let mut want = InitFlags::FUSE_DO_READDIRPLUS
            | InitFlags::FUSE_READDIRPLUS_AUTO
            | InitFlags::FUSE_PARALLEL_DIROPS
            | InitFlags::FUSE_EXPORT_SUPPORT
            // The kernel enforces ACLs; we store them, inherit default ACLs
            // and apply the umask ourselves (it does not apply under a default ACL).
            | InitFlags::FUSE_POSIX_ACL
            | InitFlags::FUSE_DONT_MASK
            | InitFlags::FUSE_BIG_WRITES
            // A symlink's target never changes (a new target is a new
            // inode): the kernel keeps it in the page cache, no READLINK.
            | InitFlags::FUSE_CACHE_SYMLINKS
            // Set-id bits are ours to drop on writes, truncates and chowns
            // (`fs::setid_loss`, as ext4 drops them): the kernel flags the
            // writes that must drop them and, in writeback mode, sends those
            // at once instead of caching them. Without it the kernel drops
            // them by setattr but keeps set-group-id without group execute
            // for callers outside the group, and asks for the
            // security.capability xattr on every write(2).
            | InitFlags::FUSE_HANDLE_KILLPRIV_V2;
        if self.writeback {
            want |= InitFlags::FUSE_WRITEBACK_CACHE;
        }
        let _ = config.add_capabilities(want & config.capabilities());
        let _ = config.set_max_write(1 << 20);
        let _ = config.set_max_readahead(1 << 20);
        let _ = config.set_max_background(64);
        Ok(())
    }

    fn destroy(&mut self) {
        // A resync or replace saves its cursor first (it goes on at the next mount).
        if let Some(jobs) = &self.jobs {
            jobs.stop();
        }
        if let Err(e) = self.fs.shutdown() {
            log::error!("flushing at unmount failed: {e}");
        }
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        REQUESTS.count(Op::Lookup);
        match self.fs.lookup(parent.0, name.as_bytes()) {
            // A miss is an entry of inode 0 (as libfuse's negative_timeout):
            // the kernel keeps the negative dentry for the TTL instead of
            // asking again. Every name is made through this mount, and the
            // kernel turns that very dentry positive when it makes one
            // (create, mknod, mkdir, symlink, link, rename), so the miss it
            // caches cannot go stale. It counts no lookup (no FORGET comes).
            Err(e) if e.0 == libc::ENOENT => {
                reply.entry_with_ttls(&Duration::ZERO, &TTL, &missing(), Generation(0))
            }
            r => self.entry(reply, r),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        REQUESTS.count(Op::Getattr);
        match self.fs.getattr(ino.0) {
            Ok(i) => reply.attr(&TTL, &attr(&i)),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn setattr(
        &self,
        req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        REQUESTS.count(Op::Setattr);
        let a = SetAttr {
            mode,
            uid,
            gid,
            size,
            atime: atime.map(time),
            mtime: mtime.map(time),
            ctime: ctime.map(from_kernel),
        };
        // Set-id bits are ours to drop (FUSE_HANDLE_KILLPRIV_V2). What the
        // kernel's FATTR_KILL_SUIDGID (not passed on by fuser) would ask: a
        // chown drops them (unless it sets a mode too), and so does a
        // truncate by a caller without CAP_FSETID. A setattr that sets
        // nothing is the kernel's "remove privileges" (file_remove_privs)
        // before a write, fallocate or copy_file_range that drops them
        // (those drop them too); dropping them here puts the new mode in the
        // reply, so the kernel's cached mode is right at once. A
        // chown(-1, -1) sets only the ctime with the writeback cache and
        // nothing without it (then the two look alike).
        let who = ReqPrivs::new(req);
        let chown = mode.is_none() && (uid.is_some() || gid.is_some());
        let nothing = mode.is_none()
            && uid.is_none()
            && gid.is_none()
            && size.is_none()
            && atime.is_none()
            && mtime.is_none();
        let why = if chown || nothing && (ctime.is_some() || !self.writeback) {
            Some(SetidChange::Chown)
        } else if nothing {
            Some(SetidChange::Data)
        } else {
            None
        };
        let mut r = Ok(());
        if let Some(why) = why {
            r = self.fs.drop_setid(ino.0, why, &who);
        }
        if r.is_ok() && size.is_some() {
            r = self.fs.drop_setid(ino.0, SetidChange::Data, &who);
        }
        match r.and_then(|_| self.fs.setattr(ino.0, a)) {
            Ok(i) => reply.attr(&TTL, &attr(&i)),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        REQUESTS.count(Op::Readlink);
        Self::data(reply, self.fs.readlink(ino.0))
    }

    fn mknod(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        rdev: u32,
        reply: ReplyEntry,
    ) {
        REQUESTS.count(Op::Mknod);
        self.entry(
            reply,
            self.fs.mknod(
                caller(req),
                parent.0,
                name.as_bytes(),
                mode,
                umask,
                rdev,
                None,
            ),
        )
    }

    fn mkdir(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        reply: ReplyEntry,
    ) {
        REQUESTS.count(Op::Mkdir);
        let mode = libc::S_IFDIR | (mode & 0o7777);
        self.entry(
            reply,
            self.fs
                .mknod(caller(req), parent.0, name.as_bytes(), mode, umask, 0, None),
        )
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        REQUESTS.count(Op::Unlink);
        Self::empty(reply, self.fs.unlink(parent.0, name.as_bytes()))
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        REQUESTS.count(Op::Rmdir);
        Self::empty(reply, self.fs.rmdir(parent.0, name.as_bytes()))
    }

    fn symlink(
        &self,
        req: &Request,
        parent: INodeNo,
        link_name: &OsStr,
        target: &Path,
        reply: ReplyEntry,
    ) {
        REQUESTS.count(Op::Symlink);
        let t = target.as_os_str().as_bytes();
        self.entry(
            reply,
            self.fs.mknod(
                caller(req),
                parent.0,
                link_name.as_bytes(),
                libc::S_IFLNK | 0o777,
                0,
                0,
                Some(t),
            ),
        )
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        REQUESTS.count(Op::Rename);
        Self::empty(
            reply,
            self.fs.rename(
                parent.0,
                name.as_bytes(),
                newparent.0,
                newname.as_bytes(),
                flags.bits(),
            ),
        )
    }

    fn link(
        &self,
        _req: &Request,
        ino: INodeNo,
        newparent: INodeNo,
        newname: &OsStr,
        reply: ReplyEntry,
    ) {
        REQUESTS.count(Op::Link);
        self.entry(reply, self.fs.link(ino.0, newparent.0, newname.as_bytes()))
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        REQUESTS.count(Op::Open);
        // An open for reading is an access (atime.rs): reads served from the
        // page cache never reach us.
        if flags.0 & libc::O_ACCMODE != libc::O_WRONLY {
            self.touch_atime(ino.0, false);
        }
        match self.fs.open_file(ino.0) {
            // Every change to a file goes through this mount, so the kernel's
            // page cache of it stays right across opens.
            Ok(_) => reply.opened(FileHandle(0), FopenFlags::FOPEN_KEEP_CACHE),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        _flags: i32,
        reply: ReplyCreate,
    ) {
        REQUESTS.count(Op::Create);
        let mode = libc::S_IFREG | (mode & 0o7777);
        let r = self
            .fs
            .mknod(caller(req), parent.0, name.as_bytes(), mode, umask, 0, None)
            .and_then(|i| self.fs.open_file(i.ino));
        match r {
            Ok(i) => reply.created(
                &TTL,
                &attr(&i),
                Generation(i.generation),
                FileHandle(0),
                FopenFlags::FOPEN_KEEP_CACHE,
            ),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        REQUESTS.count(Op::Read);
        // The reply is sent from the read's completion chain.
        self.fs
            .read_async(ino.0, offset, size, move |r| Self::data(reply, r));
    }

    fn write(
        &self,
        req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        data: &[u8],
        write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        REQUESTS.count(Op::Write);
        // Writes from the page cache (writeback) never carry the flag: the
        // kernel sends a write that must drop set-id bits straight through.
        let kill = write_flags
            .contains(WriteFlags::FUSE_WRITE_KILL_SUIDGID)
            .then(|| ReqPrivs {
                no_fsetid: true,
                ..ReqPrivs::new(req)
            });
        match self
            .fs
            .write_by(ino.0, offset, data, kill.as_ref().map(|k| k as &dyn Privs))
        {
            Ok(n) => reply.written(n),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        REQUESTS.count(Op::Flush);
        // Nothing to do at close: the kernel has written the dirty pages
        // (and reported their errors) before it sends FLUSH, and closed
        // files are flushed in groups from `release`. ENOSYS makes the
        // kernel stop sending FLUSH (fc->no_flush): one round trip less per
        // close, its writeback at close stays.
        reply.error(Errno::ENOSYS)
    }

    fn release(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        REQUESTS.count(Op::Release);
        Self::empty(reply, self.fs.release(ino.0))
    }

    fn fsync(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        REQUESTS.count(Op::Fsync);
        Self::empty(reply, self.fs.fsync(ino.0))
    }

    fn fsyncdir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        REQUESTS.count(Op::Fsyncdir);
        Self::empty(reply, self.fs.sync())
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        REQUESTS.count(Op::Opendir);
        self.touch_atime(ino.0, true);
        // The handle keeps the directory if it is removed while open.
        match self.fs.open_dir(ino.0) {
            Ok(_) => reply.opened(FileHandle(0), FopenFlags::empty()),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn releasedir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _flags: OpenFlags,
        reply: ReplyEmpty,
    ) {
        REQUESTS.count(Op::Releasedir);
        Self::empty(reply, self.fs.release_dir(ino.0))
    }

    /// The kernel drops lookups (a removed directory it held is freed here).
    fn forget(&self, _req: &Request, ino: INodeNo, nlookup: u64) {
        REQUESTS.count(Op::Forget);
        self.fs.forget(ino.0, nlookup)
    }

    /// No ioctls: counted, so that a workload that tries them shows it.
    fn ioctl(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _flags: fuser::IoctlFlags,
        _cmd: u32,
        _in_data: &[u8],
        _out_size: u32,
        reply: fuser::ReplyIoctl,
    ) {
        REQUESTS.count(Op::Ioctl);
        reply.error(Errno::ENOSYS)
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        REQUESTS.count(Op::Readdir);
        let r = self.fs.readdir(ino.0, offset, |e| {
            !reply.add(
                INodeNo(e.ino),
                e.cookie,
                kind(e.kind),
                OsStr::from_bytes(&e.name),
            )
        });
        match r {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn readdirplus(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectoryPlus,
    ) {
        REQUESTS.count(Op::Readdirplus);
        let fs = &self.fs;
        let r = fs.readdir(ino.0, offset, |e| {
            let Ok(i) = fs.getattr(e.ino) else {
                return true;
            };
            let full = reply.add(
                INodeNo(e.ino),
                e.cookie,
                OsStr::from_bytes(&e.name),
                &TTL,
                &attr(&i),
                Generation(i.generation),
            );
            // The kernel counts a lookup for every entry of the reply but
            // "." and "..".
            if !full && e.name != b"." && e.name != b".." {
                fs.remember(&i);
            }
            !full
        });
        match r {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        REQUESTS.count(Op::Statfs);
        match self.fs.usage() {
            Ok(u) => {
                // Inodes live in the metadata store: one per 4 KiB of data
                // space is the ceiling we report.
                let files = (u.total / 4096).max(u.inodes);
                reply.statfs(
                    u.total / 4096,
                    u.free / 4096,
                    u.free / 4096,
                    files,
                    files - u.inodes,
                    4096,
                    255,
                    4096,
                )
            }
            Err(e) => reply.error(errno(e)),
        }
    }

    fn setxattr(
        &self,
        req: &Request,
        ino: INodeNo,
        name: &OsStr,
        value: &[u8],
        flags: i32,
        _position: u32,
        reply: ReplyEmpty,
    ) {
        REQUESTS.count(Op::Setxattr);
        if ino.0 == ROOT && name.as_bytes() == FAULT_XATTR {
            return Self::empty(reply, self.fault_command(req, value));
        }
        if ino.0 == ROOT && name.as_bytes() == MOUNT_XATTR {
            return Self::empty(reply, self.mount_policy(req, value));
        }
        if ino.0 == ROOT && [SCRUB_XATTR, REPLACE_XATTR].contains(&name.as_bytes()) {
            return Self::empty(reply, self.job_command(req, name.as_bytes(), value));
        }
        let mut r = self.fs.setxattr(ino.0, name.as_bytes(), value, flags);
        if r.is_ok() && name.as_bytes() == b"system.posix_acl_access" {
            // The kernel would say so with FUSE_SETXATTR_ACL_KILL_SGID, which
            // fuser cannot receive (it does not take FUSE_SETXATTR_EXT).
            r = self
                .fs
                .drop_setid(ino.0, SetidChange::Acl, &ReqPrivs::new(req));
        }
        Self::empty(reply, r)
    }

    fn getxattr(&self, req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        REQUESTS.count(Op::Getxattr);
        let control = [
            FAULT_XATTR,
            STATS_XATTR,
            COPIED_XATTR,
            MOUNT_XATTR,
            HEALTH_XATTR,
            JOB_XATTR,
        ]
        .contains(&name.as_bytes());
        if ino.0 == ROOT && control && !is_admin(req) {
            reply.error(Errno::EPERM);
            return;
        }
        let r = match (ino.0, self.fs.stack.fault.as_ref()) {
            (ROOT, Some(f)) if name.as_bytes() == FAULT_XATTR => Ok(f.status().into_bytes()),
            (ROOT, _) if name.as_bytes() == STATS_XATTR => {
                Ok(stats_json(&self.fs.stack.top).to_string().into_bytes())
            }
            (ROOT, _) if name.as_bytes() == HEALTH_XATTR => {
                Ok(health_and_jobs(&self.fs, self.jobs.as_deref())
                    .to_string()
                    .into_bytes())
            }
            (ROOT, _) if name.as_bytes() == JOB_XATTR => match &self.jobs {
                Some(jobs) => Ok(jobs.status().to_string().into_bytes()),
                None => Err(stackfs_layers::Errno(libc::ENODATA)),
            },
            (ROOT, _) if name.as_bytes() == COPIED_XATTR => {
                Ok(stackfs_layers::buf::copied_bytes().to_string().into_bytes())
            }
            _ => self.fs.getxattr(ino.0, name.as_bytes()),
        };
        match r {
            Ok(v) if size == 0 => reply.size(v.len() as u32),
            Ok(v) if v.len() <= size as usize => reply.data(&v),
            Ok(_) => reply.error(Errno::ERANGE),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        REQUESTS.count(Op::Listxattr);
        match self.fs.listxattr(ino.0) {
            Ok(v) if size == 0 => reply.size(v.len() as u32),
            Ok(v) if v.len() <= size as usize => reply.data(&v),
            Ok(_) => reply.error(Errno::ERANGE),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn removexattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        REQUESTS.count(Op::Removexattr);
        Self::empty(reply, self.fs.removexattr(ino.0, name.as_bytes()))
    }

    fn access(&self, _req: &Request, ino: INodeNo, _mask: AccessFlags, reply: ReplyEmpty) {
        REQUESTS.count(Op::Access);
        // Permissions are checked by the kernel (default_permissions); this
        // only answers whether the inode exists.
        Self::empty(reply, self.fs.getattr(ino.0).map(|_| ()))
    }

    fn fallocate(
        &self,
        req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        REQUESTS.count(Op::Fallocate);
        // A data change: the kernel leaves dropping set-id bits to us, as
        // ext4 drops them (before the change), and does not say so.
        let r = self
            .fs
            .drop_setid(ino.0, SetidChange::Data, &ReqPrivs::new(req))
            .and_then(|_| self.fs.fallocate(ino.0, offset, length, mode));
        Self::empty(reply, r)
    }

    fn lseek(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: i64,
        whence: i32,
        reply: ReplyLseek,
    ) {
        REQUESTS.count(Op::Lseek);
        if offset < 0 {
            return reply.error(Errno::EINVAL);
        }
        match self.fs.lseek(ino.0, offset as u64, whence) {
            Ok(o) => reply.offset(o as i64),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn copy_file_range(
        &self,
        req: &Request,
        ino_in: INodeNo,
        _fh_in: FileHandle,
        offset_in: u64,
        ino_out: INodeNo,
        _fh_out: FileHandle,
        offset_out: u64,
        len: u64,
        _flags: CopyFileRangeFlags,
        reply: ReplyWrite,
    ) {
        REQUESTS.count(Op::CopyFileRange);
        // A write to `ino_out`, which the kernel does not flag (see fallocate).
        let who = ReqPrivs::new(req);
        if let Err(e) = self.fs.drop_setid(ino_out.0, SetidChange::Data, &who) {
            return reply.error(errno(e));
        }
        let mut done = 0u64;
        let len = len.min(u32::MAX as u64 / 2);
        while done < len {
            let n = (len - done).min(1 << 20) as u32;
            let data = match self.fs.read(ino_in.0, offset_in + done, n) {
                Ok(d) => d,
                Err(e) => return reply.error(errno(e)),
            };
            if data.is_empty() {
                break;
            }
            if let Err(e) = self.fs.write(ino_out.0, offset_out + done, &data) {
                return reply.error(errno(e));
            }
            done += data.len() as u64;
        }
        reply.written(done as u32)
    }
}
