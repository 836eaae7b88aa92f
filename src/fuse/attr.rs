//! Attributes and times between `Fs` and fuser: what the kernel is told,
//! and what it sends.

use crate::fs::{Inode, Kind, Ts};
use fuser::{FileAttr, FileType, INodeNo, TimeOrNow};
use std::time::SystemTime;

pub(super) fn kind(k: Kind) -> FileType {
    match k {
        Kind::File => FileType::RegularFile,
        Kind::Dir => FileType::Directory,
        Kind::Symlink => FileType::Symlink,
        Kind::Fifo => FileType::NamedPipe,
        Kind::Socket => FileType::Socket,
        Kind::Char => FileType::CharDevice,
        Kind::Block => FileType::BlockDevice,
    }
}

/// The attributes of a negative entry (inode 0): the kernel reads none.
pub(super) fn missing() -> FileAttr {
    FileAttr {
        ino: INodeNo(0),
        size: 0,
        blocks: 0,
        atime: SystemTime::UNIX_EPOCH,
        mtime: SystemTime::UNIX_EPOCH,
        ctime: SystemTime::UNIX_EPOCH,
        crtime: SystemTime::UNIX_EPOCH,
        kind: FileType::RegularFile,
        perm: 0,
        nlink: 0,
        uid: 0,
        gid: 0,
        rdev: 0,
        blksize: 0,
        flags: 0,
    }
}

pub fn attr(i: &Inode) -> FileAttr {
    FileAttr {
        ino: INodeNo(i.ino),
        size: i.size,
        blocks: i.blocks(),
        atime: i.atime.to_system(),
        mtime: i.mtime.to_system(),
        ctime: i.ctime.to_system(),
        crtime: i.crtime.to_system(),
        kind: kind(i.kind),
        perm: i.perm,
        nlink: i.nlink,
        uid: i.uid,
        gid: i.gid,
        rdev: i.rdev,
        blksize: 65536,
        flags: 0,
    }
}

pub(super) fn time(t: TimeOrNow) -> Ts {
    match t {
        TimeOrNow::Now => Ts::now(),
        TimeOrNow::SpecificTime(t) => from_kernel(t),
    }
}

/// A time the kernel sent, as fuser 0.18 hands it over. For times before
/// 1970 fuser builds `EPOCH - (|sec| + nsec)` from the kernel's (sec, nsec),
/// where the kernel means `sec + nsec`; undo that to get the kernel's pair.
pub(super) fn from_kernel(t: SystemTime) -> Ts {
    match t.duration_since(std::time::UNIX_EPOCH) {
        Ok(_) => Ts::from(t),
        Err(e) => Ts {
            sec: -(e.duration().as_secs() as i64),
            nsec: e.duration().subsec_nanos(),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn kernel_times_before_1970_are_read_back_as_the_kernel_meant() {
        // The kernel's (-2 s, 500_000_000 ns) is -1.5 s; fuser hands over EPOCH - 2.5 s.
        let from_fuser = std::time::UNIX_EPOCH - Duration::new(2, 500_000_000);
        assert_eq!(
            from_kernel(from_fuser),
            Ts {
                sec: -2,
                nsec: 500_000_000
            }
        );
        assert_eq!(
            Ts::from(
                Ts {
                    sec: -2,
                    nsec: 500_000_000
                }
                .to_system()
            ),
            Ts {
                sec: -2,
                nsec: 500_000_000
            }
        );
        let later = std::time::UNIX_EPOCH + Duration::new(5, 7);
        assert_eq!(from_kernel(later), Ts { sec: 5, nsec: 7 });
    }
}
