//! `stackfs umount` (also umount.fuse.stackfs): unmount, then wait for the
//! daemon to exit.

use super::open::canonical_source;
use super::CliResult;
use stackfs::lock::{self, MountEntry};
use stackfs::pool::parse_source;
use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::time::Duration;

/// The mount a `umount` target names: a mount point (in any spelling) or a
/// source. The mount point itself is never stat'ed (its daemon may hang).
pub(super) fn find_mount(target: &str) -> Option<MountEntry> {
    let path = Path::new(target);
    let absolute = std::env::current_dir()
        .map(|dir| dir.join(path))
        .unwrap_or(path.to_path_buf());
    let normal = match (absolute.parent(), absolute.file_name()) {
        (Some(dir), Some(name)) => std::fs::canonicalize(dir).ok().map(|d| d.join(name)),
        _ => None,
    };
    let source = canonical_source(&parse_source(target));
    lock::mounts().into_iter().rev().find(|m| {
        m.mountpoint == absolute
            || Some(&m.mountpoint) == normal.as_ref()
            || m.source == target
            || m.source == source
    })
}

/// Unmount, then wait for the daemon to exit, so that the pool is durable
/// and free when this returns (a plain FUSE unmount returns as soon as the
/// kernel lets go, while the daemon may still be writing).
pub fn umount(target: &str, lazy: bool, force: bool) -> CliResult {
    let mount = find_mount(target).ok_or(format!("{target}: not mounted"))?;
    // The daemon is the stackfs process serving this mount point; a mount
    // of another FUSE filesystem has none and is unmounted plainly.
    let daemon = lock::daemon_of(&mount);
    let mut flags = 0;
    if lazy {
        flags |= libc::MNT_DETACH;
    }
    if force {
        flags |= libc::MNT_FORCE;
    }
    let path = CString::new(mount.mountpoint.as_os_str().as_bytes()).map_err(|e| e.to_string())?;
    // SAFETY: `path` is a valid NUL-terminated path.
    if unsafe { libc::umount2(path.as_ptr(), flags) } != 0 {
        let error = std::io::Error::last_os_error();
        if error.raw_os_error() != Some(libc::EPERM) || !fusermount_unmount(&mount.mountpoint, lazy)
        {
            return Err(format!("unmounting {}: {error}", mount.mountpoint.display()).into());
        }
    }
    let Some(daemon) = daemon.filter(|_| !lazy) else {
        return Ok(());
    };
    if !lock::wait_exit(daemon.pid, Some(Duration::from_secs(5))) {
        eprintln!(
            "stackfs: waiting for the daemon (PID {}) to finish writing {}",
            daemon.pid, mount.source
        );
        lock::wait_exit(daemon.pid, None);
    }
    Ok(())
}

/// Not root: the setuid helper unmounts a user's own FUSE mount. Whether it did.
fn fusermount_unmount(mountpoint: &Path, lazy: bool) -> bool {
    let mut command = std::process::Command::new("fusermount3");
    command.arg("-u");
    if lazy {
        command.arg("-z");
    }
    command
        .arg(mountpoint)
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

/// Detach the mount (as `umount -l`): the session ends once the kernel lets go.
pub fn unmount(mountpoint: &Path) -> std::io::Result<()> {
    let path = CString::new(mountpoint.as_os_str().as_bytes()).map_err(std::io::Error::other)?;
    // SAFETY: `path` is a valid NUL-terminated path.
    if unsafe { libc::umount2(path.as_ptr(), libc::MNT_DETACH) } == 0 {
        return Ok(());
    }
    let error = std::io::Error::last_os_error();
    if fusermount_unmount(mountpoint, true) {
        Ok(())
    } else {
        Err(error)
    }
}
