//! One owner per pool. `mount`, `fsck` and `passwd` lock every member
//! exclusively (`flock` on image files and device nodes, and `O_EXCL` on
//! block devices, which also keeps out kernel filesystems and other
//! exclusive openers); `info` takes a shared lock. The lock lives as long as
//! the process: a daemon that is still flushing after `umount` (or after
//! `umount -l` or `fusermount3 -u`) keeps its pool until it exits, so the next
//! mount waits for it instead of opening devices that are still being written.
//!
//! A conflict names its holder: the PID comes from /proc/locks, its mount
//! point from /proc/self/mountinfo (a stackfs mount whose source names the
//! same device). A holder that is mounted is an immediate error; one that is
//! not (a daemon releasing the pool, fsck, passwd) is waited for, up to a
//! bound that is printed.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Mode {
    Exclusive,
    Shared,
}

/// The locks on a pool's members; released when dropped (or at exit).
pub struct PoolLock {
    _files: Vec<File>,
}

/// Who holds a member.
#[derive(Debug)]
pub struct Holder {
    pub pid: i32,
    /// The holder's command line, shortened.
    pub command: String,
    /// Where the holder has the pool mounted, if it does (in this namespace).
    pub mountpoint: Option<PathBuf>,
}

impl std::fmt::Display for Holder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PID {} ({})", self.pid, self.command)?;
        if let Some(m) = &self.mountpoint {
            write!(f, ", mounted at {}", m.display())?;
        }
        Ok(())
    }
}

/// (st_dev, st_ino) of the inode a path names: what /proc/locks identifies.
fn inode_id(path: &Path) -> Option<(u64, u64)> {
    std::fs::metadata(path).ok().map(|m| (m.dev(), m.ino()))
}

/// Take `mode` locks on every path. A member held by a mounted pool fails at
/// once; one held otherwise is waited for up to `wait` (said on stderr).
pub fn lock(paths: &[PathBuf], mode: Mode, wait: Duration) -> Result<PoolLock, String> {
    // One order for everyone, so two lockers never hold a part each.
    let mut order: Vec<&PathBuf> = paths.iter().collect();
    order.sort_by_key(|p| inode_id(p));
    let mut files = Vec::new();
    for p in order {
        files.push(lock_one(p, mode, wait)?);
    }
    Ok(PoolLock { _files: files })
}

fn try_open(path: &Path, mode: Mode) -> std::io::Result<File> {
    let is_blockdev = std::fs::metadata(path)?.file_type().is_block_device();
    let mut o = OpenOptions::new();
    o.read(true);
    if is_blockdev && mode == Mode::Exclusive {
        o.custom_flags(libc::O_EXCL);
    }
    o.open(path)
}

fn try_flock(f: &File, mode: Mode) -> std::io::Result<()> {
    let op = match mode {
        Mode::Exclusive => libc::LOCK_EX,
        Mode::Shared => libc::LOCK_SH,
    };
    // SAFETY: flock on a descriptor we own.
    if unsafe { libc::flock(f.as_raw_fd(), op | libc::LOCK_NB) } == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

fn lock_one(path: &Path, mode: Mode, wait: Duration) -> Result<File, String> {
    let start = Instant::now();
    let mut said = false;
    loop {
        let busy = match try_open(path, mode) {
            Ok(f) => match try_flock(&f, mode) {
                Ok(()) => return Ok(f),
                Err(e) if e.raw_os_error() == Some(libc::EWOULDBLOCK) => true,
                Err(e) => return Err(format!("{}: locking: {e}", path.display())),
            },
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) => true,
            Err(e) => return Err(format!("{}: {e}", path.display())),
        };
        debug_assert!(busy);
        let holder = holder_of(path);
        match &holder {
            Some(h) if h.mountpoint.is_some() => {
                return Err(format!(
                    "the pool is in use: {} is held by {h}",
                    path.display()
                ))
            }
            None if start.elapsed() >= wait => {
                return Err(format!(
                "{} is in use by another program or the kernel (mounted, or opened exclusively)",
                path.display()
            ))
            }
            Some(h) if start.elapsed() >= wait => {
                return Err(format!(
                    "the pool is in use: {} is still held by {h} after {} s",
                    path.display(),
                    wait.as_secs()
                ))
            }
            _ => {}
        }
        if !said {
            said = true;
            let who = holder.map(|h| h.to_string());
            eprintln!(
                "stackfs: {} is held by {}; waiting up to {} s for it to be released",
                path.display(),
                who.as_deref().unwrap_or("another program"),
                wait.as_secs()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The process holding a lock on `path`'s inode, from /proc/locks.
pub fn holder_of(path: &Path) -> Option<Holder> {
    let (dev, ino) = inode_id(path)?;
    let locks = std::fs::read_to_string("/proc/locks").ok()?;
    let pid = locks.lines().find_map(|l| {
        // "1: FLOCK  ADVISORY  WRITE 1234 fd:01:5678 0 EOF"; waiters have "->".
        let f: Vec<&str> = l.split_whitespace().collect();
        if f.len() < 6 || f[1] == "->" {
            return None;
        }
        let mut id = f[5].split(':');
        let major = u64::from_str_radix(id.next()?, 16).ok()?;
        let minor = u64::from_str_radix(id.next()?, 16).ok()?;
        let inode: u64 = id.next()?.parse().ok()?;
        let same =
            libc::major(dev) as u64 == major && libc::minor(dev) as u64 == minor && inode == ino;
        (same && f[1] == "FLOCK")
            .then(|| f[4].parse::<i32>().ok())
            .flatten()
    })?;
    let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    let mut command = cmd
        .split(|b| *b == 0)
        .filter(|a| !a.is_empty())
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect::<Vec<_>>()
        .join(" ");
    if command.len() > 120 {
        let mut cut = 117;
        while !command.is_char_boundary(cut) {
            cut -= 1;
        }
        command.truncate(cut);
        command.push_str("...");
    }
    Some(Holder {
        pid,
        command,
        mountpoint: mount_of(path).map(|m| m.mountpoint),
    })
}

/// One line of /proc/self/mountinfo.
#[derive(Clone, Debug)]
pub struct MountEntry {
    /// The mount's device number, "MAJOR:MINOR" (its BDI in /sys/class/bdi).
    pub device: String,
    pub mountpoint: PathBuf,
    /// Per-mount options (rw, nosuid, relatime...).
    pub options: String,
    pub fstype: String,
    pub source: String,
}

/// Undo mountinfo's octal escapes (space, tab, newline, backslash).
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let octal = b
            .get(i + 1..i + 4)
            .filter(|d| d.iter().all(|c| (b'0'..=b'7').contains(c)));
        if let (b'\\', Some(d)) = (b[i], octal) {
            out.push(d.iter().fold(0u8, |v, c| v.wrapping_mul(8) + (c - b'0')));
            i += 4;
            continue;
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Every mount of this namespace, in mount order.
pub fn mounts() -> Vec<MountEntry> {
    parse_mountinfo(&std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default())
}

/// The lines of a mountinfo file; malformed ones are skipped.
fn parse_mountinfo(info: &str) -> Vec<MountEntry> {
    info.lines()
        .filter_map(|l| {
            let (left, right) = l.split_once(" - ")?;
            // "36 35 98:0 /root /mnt rw,noatime master:1 - ext3 /dev/root rw"
            let mut f = left.split(' ');
            let device = f.nth(2)?;
            let mountpoint = f.nth(1)?;
            let options = f.next()?;
            let mut r = right.split(' ');
            let fstype = r.next()?;
            let source = r.next()?;
            Some(MountEntry {
                device: device.to_string(),
                mountpoint: PathBuf::from(unescape(mountpoint)),
                options: options.to_string(),
                fstype: fstype.to_string(),
                source: unescape(source),
            })
        })
        .collect()
}

/// Whether a mount's source names `path`'s inode among its devices.
fn names_device(source: &str, id: (u64, u64)) -> bool {
    crate::pool::parse_source(source)
        .iter()
        .any(|p| p.is_absolute() && inode_id(p) == Some(id))
}

/// The FUSE mount whose source names the device `path`, if any.
pub fn mount_of(path: &Path) -> Option<MountEntry> {
    let id = inode_id(path)?;
    mounts()
        .into_iter()
        .rev()
        .find(|m| m.fstype.starts_with("fuse") && names_device(&m.source, id))
}

/// The stackfs daemon serving a mount, if it is one: the stackfs daemon
/// process whose mount point argument is this mount's (a mount of another
/// FUSE filesystem gives None). Found from /proc alone: nothing of the
/// pool is touched, since a member that stopped answering would block any
/// stat of it (and the mount point itself is never stat'ed either).
pub fn daemon_of(m: &MountEntry) -> Option<Holder> {
    if !m.fstype.starts_with("fuse") {
        return None;
    }
    let procs = std::fs::read_dir("/proc").ok()?;
    procs.flatten().find_map(|e| {
        let pid: i32 = e.file_name().to_str()?.parse().ok()?;
        let comm = std::fs::read_to_string(e.path().join("comm")).ok()?;
        if comm.trim() != "stackfs" {
            return None;
        }
        let cmd = std::fs::read(e.path().join("cmdline")).ok()?;
        let args: Vec<String> = cmd
            .split(|b| *b == 0)
            .filter(|a| !a.is_empty())
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        if !args.iter().any(|a| a == "--foreground") {
            return None;
        }
        // `stackfs mount --foreground [-o OPTS]... SOURCE MOUNTPOINT`
        let arg = PathBuf::from(args.last()?);
        let abs = if arg.is_absolute() {
            arg
        } else {
            std::fs::read_link(e.path().join("cwd")).ok()?.join(arg)
        };
        let normal = match (abs.parent(), abs.file_name()) {
            (Some(dir), Some(name)) => std::fs::canonicalize(dir).ok()?.join(name),
            _ => abs,
        };
        (normal == m.mountpoint).then(|| Holder {
            pid,
            command: args.join(" "),
            mountpoint: Some(m.mountpoint.clone()),
        })
    })
}

/// Wait until process `pid` has exited. False if `limit` passed first.
pub fn wait_exit(pid: i32, limit: Option<Duration>) -> bool {
    let start = Instant::now();
    // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) } as i32;
    loop {
        let step = 1000;
        if fd >= 0 {
            let mut p = libc::pollfd {
                fd,
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd.
            let r = unsafe { libc::poll(&mut p, 1, step) };
            if r > 0 {
                // SAFETY: our own descriptor.
                unsafe { libc::close(fd) };
                return true;
            }
        } else {
            // SAFETY: signal 0 only checks that the process exists.
            if unsafe { libc::kill(pid, 0) } != 0 {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        if limit.is_some_and(|l| start.elapsed() >= l) {
            if fd >= 0 {
                // SAFETY: our own descriptor.
                unsafe { libc::close(fd) };
            }
            return false;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_exclusive_lock_names_the_holder_and_a_shared_one_waits() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("a.img");
        std::fs::write(&a, b"x").unwrap();
        let held = lock(std::slice::from_ref(&a), Mode::Exclusive, Duration::ZERO).unwrap();
        // flock conflicts between open files, also in one process.
        let e = lock(
            std::slice::from_ref(&a),
            Mode::Shared,
            Duration::from_millis(200),
        )
        .err()
        .expect("held");
        assert!(e.contains(&format!("PID {}", std::process::id())), "{e}");
        // Another spelling of the same file is the same inode.
        let other = dir.path().join(".").join("a.img");
        assert!(lock(&[other], Mode::Exclusive, Duration::ZERO).is_err());
        drop(held);
        let s1 = lock(std::slice::from_ref(&a), Mode::Shared, Duration::ZERO).unwrap();
        let _s2 = lock(std::slice::from_ref(&a), Mode::Shared, Duration::ZERO).unwrap();
        assert!(lock(std::slice::from_ref(&a), Mode::Exclusive, Duration::ZERO).is_err());
        drop(s1);
    }

    #[test]
    fn mountinfo_lines() {
        let info =
            "36 35 98:0 /root /mnt/a\\040b rw,noatime master:1 - fuse /d/x.img:/d/y.img rw\n\
                    garbage\n\
                    40 36 0:52 / /proc rw,nosuid - proc proc rw\n";
        let mounts = parse_mountinfo(info);
        assert_eq!(mounts.len(), 2);
        assert_eq!(mounts[0].device, "98:0");
        assert_eq!(mounts[0].mountpoint, PathBuf::from("/mnt/a b"));
        assert_eq!(mounts[0].options, "rw,noatime");
        assert_eq!(mounts[0].fstype, "fuse");
        assert_eq!(mounts[0].source, "/d/x.img:/d/y.img");
        assert_eq!(mounts[1].device, "0:52");
        assert_eq!(mounts[1].mountpoint, PathBuf::from("/proc"));
    }

    #[test]
    fn mountinfo_escapes() {
        assert_eq!(unescape(r"/mnt/a\040b"), "/mnt/a b");
        assert_eq!(unescape(r"/x\134y"), r"/x\y");
        assert_eq!(unescape("plain"), "plain");
        assert_eq!(unescape(r"end\04"), r"end\04");
    }
}
