//! `stackfs mount -o remount[,ro|rw,...]`: change the running mount's flags
//! in place; no second daemon.

use super::options::{kernel_flags, MountOptions};
use super::CliResult;
use stackfs::lock;
use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

/// Going read-only first makes everything durable (fsync of the root
/// reaches the daemon as fsyncdir, which commits all).
pub fn remount(mountpoint: &Path, options: &MountOptions) -> CliResult {
    let canonical =
        std::fs::canonicalize(mountpoint).map_err(|e| format!("{}: {e}", mountpoint.display()))?;
    let entry = lock::mounts()
        .into_iter()
        .rev()
        .find(|m| m.mountpoint == canonical)
        .filter(|m| lock::daemon_of(m).is_some());
    let Some(entry) = entry else {
        return Err(format!(
            "{} is not a mounted stackfs pool; nothing to remount",
            canonical.display()
        )
        .into());
    };
    if options.read_only {
        std::fs::File::open(&canonical)
            .and_then(|dir| dir.sync_all())
            .map_err(|e| format!("flushing before remount: {e}"))?;
    }
    // As mount(8) does: the flags the mount has, then what this remount says.
    let mut kernel: Vec<String> = entry.options.split(',').map(String::from).collect();
    kernel.extend(options.kernel.iter().cloned());
    let mut flags = libc::MS_REMOUNT | kernel_flags(&kernel);
    if options.read_only {
        flags |= libc::MS_RDONLY;
    }
    let target = CString::new(canonical.as_os_str().as_bytes()).map_err(|e| e.to_string())?;
    // SAFETY: valid NUL-terminated path; the other pointers may be null for a remount.
    let result = unsafe {
        libc::mount(
            std::ptr::null(),
            target.as_ptr(),
            std::ptr::null(),
            flags,
            std::ptr::null(),
        )
    };
    if result != 0 {
        return Err(format!(
            "remounting {}: {}",
            canonical.display(),
            std::io::Error::last_os_error()
        )
        .into());
    }
    hand_over_daemon_rules(&canonical, options)
}

/// The atime and sync rules are the daemon's: hand over what was said,
/// through the `stackfs.mount` control xattr of the root.
fn hand_over_daemon_rules(mountpoint: &Path, options: &MountOptions) -> CliResult {
    let mut said = vec![options.atime.encode()];
    said.extend(
        options
            .kernel
            .iter()
            .filter(|k| ["sync", "dirsync", "async"].contains(&k.as_str()))
            .cloned(),
    );
    let said = said
        .into_iter()
        .filter(|s| !s.is_empty())
        .collect::<Vec<_>>()
        .join(",");
    if said.is_empty() {
        return Ok(());
    }
    if let Err(e) = super::info::set_control(mountpoint, c"stackfs.mount", &said) {
        return Err(format!(
            "remounted {}, but the daemon did not take {said}: {e}",
            mountpoint.display(),
        )
        .into());
    }
    Ok(())
}
