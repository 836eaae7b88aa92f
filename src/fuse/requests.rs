//! FUSE requests answered, by opcode: what a workload costs in round trips
//! to the daemon (the root's `stackfs.stats` shows them).

use std::sync::atomic::{AtomicU64, Ordering};

/// The requests the front end answers. fuser answers INIT, DESTROY and
/// INTERRUPT itself; a batch forget counts once per inode (fuser's type for
/// it cannot be named outside fuser, so it reaches `forget`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Op {
    Lookup,
    Forget,
    Getattr,
    Setattr,
    Readlink,
    Mknod,
    Mkdir,
    Unlink,
    Rmdir,
    Symlink,
    Rename,
    Link,
    Open,
    Read,
    Write,
    Statfs,
    Release,
    Fsync,
    Setxattr,
    Getxattr,
    Listxattr,
    Removexattr,
    Flush,
    Opendir,
    Readdir,
    Releasedir,
    Fsyncdir,
    Access,
    Create,
    Ioctl,
    Readdirplus,
    Fallocate,
    Lseek,
    CopyFileRange,
}

impl Op {
    const ALL: [Op; 34] = [
        Op::Lookup,
        Op::Forget,
        Op::Getattr,
        Op::Setattr,
        Op::Readlink,
        Op::Mknod,
        Op::Mkdir,
        Op::Unlink,
        Op::Rmdir,
        Op::Symlink,
        Op::Rename,
        Op::Link,
        Op::Open,
        Op::Read,
        Op::Write,
        Op::Statfs,
        Op::Release,
        Op::Fsync,
        Op::Setxattr,
        Op::Getxattr,
        Op::Listxattr,
        Op::Removexattr,
        Op::Flush,
        Op::Opendir,
        Op::Readdir,
        Op::Releasedir,
        Op::Fsyncdir,
        Op::Access,
        Op::Create,
        Op::Ioctl,
        Op::Readdirplus,
        Op::Fallocate,
        Op::Lseek,
        Op::CopyFileRange,
    ];

    /// The opcode's name in the kernel's `fuse.h`, lower case.
    fn name(self) -> &'static str {
        match self {
            Op::Lookup => "lookup",
            Op::Forget => "forget",
            Op::Getattr => "getattr",
            Op::Setattr => "setattr",
            Op::Readlink => "readlink",
            Op::Mknod => "mknod",
            Op::Mkdir => "mkdir",
            Op::Unlink => "unlink",
            Op::Rmdir => "rmdir",
            Op::Symlink => "symlink",
            Op::Rename => "rename",
            Op::Link => "link",
            Op::Open => "open",
            Op::Read => "read",
            Op::Write => "write",
            Op::Statfs => "statfs",
            Op::Release => "release",
            Op::Fsync => "fsync",
            Op::Setxattr => "setxattr",
            Op::Getxattr => "getxattr",
            Op::Listxattr => "listxattr",
            Op::Removexattr => "removexattr",
            Op::Flush => "flush",
            Op::Opendir => "opendir",
            Op::Readdir => "readdir",
            Op::Releasedir => "releasedir",
            Op::Fsyncdir => "fsyncdir",
            Op::Access => "access",
            Op::Create => "create",
            Op::Ioctl => "ioctl",
            Op::Readdirplus => "readdirplus",
            Op::Fallocate => "fallocate",
            Op::Lseek => "lseek",
            Op::CopyFileRange => "copy_file_range",
        }
    }
}

/// One counter per opcode.
pub(super) struct RequestCounts {
    counts: [AtomicU64; Op::ALL.len()],
}

/// The daemon's counters. A daemon serves one mount, so they are the
/// mount's; a static keeps them out of `FuseFs`, which `main.rs` builds.
pub(super) static REQUESTS: RequestCounts = RequestCounts::new();

impl RequestCounts {
    const fn new() -> RequestCounts {
        RequestCounts {
            counts: [const { AtomicU64::new(0) }; Op::ALL.len()],
        }
    }

    pub(super) fn count(&self, op: Op) {
        self.counts[op as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// `{"lookup": n, ...}` for every opcode, and the total.
    pub(super) fn snapshot(&self) -> (serde_json::Map<String, serde_json::Value>, u64) {
        let mut total = 0;
        let mut by_op = serde_json::Map::new();
        for op in Op::ALL {
            let n = self.counts[op as usize].load(Ordering::Relaxed);
            total += n;
            by_op.insert(op.name().to_string(), n.into());
        }
        (by_op, total)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_opcode_has_its_own_counter() {
        for (i, op) in Op::ALL.iter().enumerate() {
            assert_eq!(*op as usize, i, "{op:?} is out of place in Op::ALL");
        }
        let counts = RequestCounts::new();
        counts.count(Op::Lookup);
        counts.count(Op::Lookup);
        counts.count(Op::CopyFileRange);
        let (by_op, total) = counts.snapshot();
        assert_eq!(total, 3);
        assert_eq!(by_op["lookup"], 2);
        assert_eq!(by_op["copy_file_range"], 1);
        assert_eq!(by_op["getxattr"], 0);
        assert_eq!(by_op.len(), Op::ALL.len());
    }
}
