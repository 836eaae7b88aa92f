//! `stackfs mount`: start a daemon (or be one, with `--foreground`) that
//! opens the pool, mounts it and serves it until it is unmounted.

use super::open::canonical_source;
use super::options::{parse_options, MountOptions};
use super::secret::passphrase;
use super::umount::unmount;
use super::{daemon, remount, CliResult, LOCK_WAIT};
use stackfs::fs::{Fs, FsOptions};
use stackfs::fuse::FuseFs;
use stackfs::lock::{self, Mode};
use stackfs::pool::{self, parse_source};
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

pub fn mount(foreground: bool, options: &[String], source: &str, mountpoint: PathBuf) -> CliResult {
    let parsed = parse_options(options)?;
    if parsed.remount {
        return remount::remount(&mountpoint, &parsed);
    }
    let paths = parse_source(source);
    if !foreground {
        // Ask here, where the terminal is; the daemon gets the secret through a pipe.
        let handed = if pool::is_encrypted(&paths)?
            && parsed.key.key_file.is_none()
            && parsed.key.passphrase_file.is_none()
        {
            Some(passphrase(&parsed.key)?)
        } else {
            None
        };
        return Ok(daemon::spawn(
            options,
            source,
            &mountpoint,
            handed.as_ref(),
        )?);
    }
    // Before any thread exists (io_uring completion threads start with the
    // pool), so that only the signal thread ever receives SIGTERM.
    daemon::block_signals();
    let mountpoint =
        std::fs::canonicalize(&mountpoint).map_err(|e| format!("{}: {e}", mountpoint.display()))?;
    let fs = Arc::new(open_fs(&paths, &parsed)?);
    // The kernel's record of the source names every device by its full
    // path, so `umount SOURCE` and the lock's holder lookup find it.
    let source = canonical_source(&paths);
    let notifier = Arc::new(OnceLock::new());
    stackfs::fs::use_coarse_clock(parsed.writeback && !parsed.read_only);
    // Resync, replace, scrub and the record of faulted members.
    let jobs = if parsed.read_only {
        None
    } else {
        stackfs::rebuild::Jobs::start(&fs, parsed.resync_rate)
    };
    let fusefs = FuseFs {
        fs: fs.clone(),
        writeback: parsed.writeback && !parsed.read_only,
        notifier: notifier.clone(),
        jobs: jobs.clone(),
    };
    let session = mount_fuse(fusefs, &source, &mountpoint, &parsed)?;
    let _ = notifier.set(session.notifier());
    set_readahead(&mountpoint, parsed.readahead_kb);
    if let Some(fd) = daemon::ready_fd() {
        daemon::detach(fd, parsed.log_file.as_deref());
    }
    Ok(daemon::serve(
        session,
        fs,
        jobs,
        &mountpoint,
        parsed.commit,
    )?)
}

/// Lock the pool (ours from here until the process exits, whatever
/// unmounts it), unlock it with the secret the parent handed over or one
/// asked for here, and open its filesystem.
fn open_fs(paths: &[PathBuf], options: &MountOptions) -> CliResult<Fs> {
    let owner = lock::lock(paths, Mode::Exclusive, LOCK_WAIT)?;
    let key = if !pool::is_encrypted(paths)? {
        None
    } else if let Some(handed) = daemon::handed_secret() {
        Some(handed?)
    } else {
        Some(passphrase(&options.key)?)
    };
    let pool = pool::open(
        paths,
        options.read_only,
        key.as_ref(),
        options.timeout,
        Some(owner),
        options.degraded,
    )?;
    drop(key);
    for warning in &pool.warnings {
        log::warn!("{warning}");
        eprintln!("stackfs: warning: {warning}");
    }
    Ok(Fs::open(
        pool,
        FsOptions {
            read_only: options.read_only,
            cache_bytes: options.cache_bytes,
            lenient: false,
            atime: options.atime,
            sync_metadata: options.sync_metadata,
        },
    )?)
}

fn session_config(options: &MountOptions) -> fuser::Config {
    let mut config = fuser::Config::default();
    config.acl = if options.is_public() {
        fuser::SessionACL::All
    } else {
        fuser::SessionACL::Owner
    };
    config.n_threads = Some(options.threads);
    config.clone_fd = true;
    config
}

/// Mount and complete the FUSE handshake. As root we call mount(2) ourselves,
/// with type `fuse` (what `df -T` shows for libfuse filesystems, and what
/// fstests' FSTYP=fuse expects) or `fuse.stackfs` with `show_subtype`, and
/// the devices as source; other users go through fusermount3.
fn mount_fuse(
    fusefs: FuseFs,
    source: &str,
    mountpoint: &Path,
    options: &MountOptions,
) -> Result<fuser::Session<FuseFs>, String> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return mount_fuse_as_user(fusefs, source, mountpoint, options);
    }
    use std::ffi::CString;
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::io::{AsRawFd, OwnedFd};
    let device = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/fuse")
        .map_err(|e| format!("/dev/fuse: {e}"))?;
    let mut data = format!(
        "fd={},rootmode=40000,user_id=0,group_id=0,default_permissions",
        device.as_raw_fd()
    );
    if options.is_public() {
        data.push_str(",allow_other");
    }
    let mut flags = super::options::kernel_flags(&options.kernel);
    if options.read_only {
        flags |= libc::MS_RDONLY;
    }
    let c = |s: &[u8]| CString::new(s).map_err(|_| "a NUL byte in the mount arguments".to_string());
    let (source_c, target_c, fstype_c, data_c) = (
        c(options.fsname.as_deref().unwrap_or(source).as_bytes())?,
        c(mountpoint.as_os_str().as_bytes())?,
        c(if options.show_subtype {
            b"fuse.stackfs"
        } else {
            b"fuse"
        })?,
        c(data.as_bytes())?,
    );
    // SAFETY: all pointers are valid NUL-terminated strings that outlive the call.
    let result = unsafe {
        libc::mount(
            source_c.as_ptr(),
            target_c.as_ptr(),
            fstype_c.as_ptr(),
            flags,
            data_c.as_ptr().cast(),
        )
    };
    if result != 0 {
        return Err(format!(
            "mounting at {}: {}",
            mountpoint.display(),
            std::io::Error::last_os_error()
        ));
    }
    let fd: OwnedFd = device.into();
    let config = session_config(options);
    fuser::Session::from_fd(fusefs, fd, config.acl, config).map_err(|e| {
        let _ = unmount(mountpoint);
        format!("FUSE handshake at {}: {e}", mountpoint.display())
    })
}

/// A user's mount, through fuser and the setuid fusermount3.
fn mount_fuse_as_user(
    fusefs: FuseFs,
    source: &str,
    mountpoint: &Path,
    options: &MountOptions,
) -> Result<fuser::Session<FuseFs>, String> {
    let mut config = session_config(options);
    config.mount_options = vec![
        fuser::MountOption::FSName(options.fsname.clone().unwrap_or_else(|| source.to_string())),
        fuser::MountOption::DefaultPermissions,
        if options.read_only {
            fuser::MountOption::RO
        } else {
            fuser::MountOption::RW
        },
    ];
    if options.show_subtype {
        config
            .mount_options
            .push(fuser::MountOption::Subtype("stackfs".into()));
    }
    // Public (allow_other) comes from the session's ACL (session_config).
    config.mount_options.extend(
        options
            .kernel
            .iter()
            .map(|k| fuser::MountOption::CUSTOM(k.clone())),
    );
    fuser::Session::new(fusefs, mountpoint, &config)
        .map_err(|e| format!("mounting at {}: {e}", mountpoint.display()))
}

/// Raise the mount's readahead through its BDI (measured here: cold 1 MiB
/// sequential reads go from ~250 to ~400 MB/s with 4 MiB). The device
/// number comes from mountinfo: a stat of our own mount would wait for the
/// session loop, which is not running yet.
fn set_readahead(mountpoint: &Path, kb: u64) {
    let Some(mount) = lock::mounts()
        .into_iter()
        .rev()
        .find(|m| m.mountpoint == mountpoint)
    else {
        log::info!("readahead: {} not found in mountinfo", mountpoint.display());
        return;
    };
    let path = format!("/sys/class/bdi/{}/read_ahead_kb", mount.device);
    if let Err(e) = std::fs::write(&path, kb.to_string()) {
        log::info!("readahead: {path}: {e} (the kernel's 128 KiB stays)");
    }
}
