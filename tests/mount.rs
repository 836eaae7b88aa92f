//! End-to-end tests on real mounts: the stackfs binary, real FUSE, real
//! io_uring on image files. Every mount is undone by a guard, even when a
//! test fails.

mod support;

use std::fs;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::process::Command;
use support::*;

#[test]
fn data_survives_remount() {
    let p = Pool::new(3, "256M");
    p.mount();
    let data: Vec<u8> = (0..5_000_000u32).map(|i| (i * 7 % 251) as u8).collect();
    fs::write(p.mnt.join("file"), &data).unwrap();
    fs::create_dir_all(p.mnt.join("a/b/c")).unwrap();
    std::os::unix::fs::symlink("../file", p.mnt.join("a/link")).unwrap();
    fs::hard_link(p.mnt.join("file"), p.mnt.join("a/b/hard")).unwrap();
    p.umount();
    p.mount();
    assert!(fs::read(p.mnt.join("file")).unwrap() == data);
    assert!(fs::read(p.mnt.join("a/b/hard")).unwrap() == data);
    assert_eq!(
        fs::read_link(p.mnt.join("a/link")).unwrap(),
        PathBuf::from("../file")
    );
    assert!(p.mnt.join("a/b/c").is_dir());
    p.umount();
}

/// A read-only mount reads everything and writes nothing; `info` shows usage.
#[test]
fn read_only_mount_changes_nothing() {
    let p = Pool::new(2, "128M");
    p.mount();
    fs::write(p.mnt.join("f"), b"kept").unwrap();
    p.umount();
    let before: Vec<Vec<u8>> = p.imgs.iter().map(|i| fs::read(i).unwrap()).collect();
    ok(stackfs(&[
        "mount",
        "-o",
        "ro",
        &p.source(),
        p.mnt.to_str().unwrap(),
    ]));
    assert_eq!(fs::read(p.mnt.join("f")).unwrap(), b"kept");
    let e = fs::write(p.mnt.join("g"), b"x").unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EROFS));
    p.umount();
    let info = ok(stackfs(&["info", &p.source()]));
    assert!(
        info.contains("inodes:      2"),
        "info shows no usage: {info}"
    );
    for (img, b) in p.imgs.iter().zip(&before) {
        assert!(
            &fs::read(img).unwrap() == b,
            "{} changed by a read-only mount",
            img.display()
        );
    }
}

/// fsync'ed data survives SIGKILL of the daemon; the pool mounts again without repair.
#[test]
fn fsynced_data_survives_sigkill() {
    let p = Pool::new(2, "256M");
    p.mount();
    let data: Vec<u8> = (0..3_000_000u32).map(|i| (i % 253) as u8).collect();
    {
        let f = fs::File::create(p.mnt.join("precious")).unwrap();
        f.write_all_at(&data, 0).unwrap();
        f.sync_all().unwrap();
    }
    let pid = p.daemon_pid().expect("daemon pid");
    // SAFETY: plain kill(2) on the daemon's pid.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    let _ = Command::new("umount").arg("-l").arg(&p.mnt).status();
    p.wait_daemon_gone();
    p.mount();
    assert!(
        fs::read(p.mnt.join("precious")).unwrap() == data,
        "fsync'ed data lost after SIGKILL"
    );
    p.umount();
}

/// `sync MOUNTPOINT` (fsync of a directory) makes everything written before
/// it durable, as a journal commit does on ext4: files copied in, the
/// directory synced, the daemon killed at once (the commit timer is set far
/// off, so only the sync can have made them durable).
#[test]
fn directory_fsync_makes_everything_before_it_durable() {
    let p = Pool::new(1, "256M");
    p.mount_with("commit=3600");
    fs::create_dir(p.mnt.join("d")).unwrap();
    let files: Vec<(String, Vec<u8>)> = (0..40)
        .map(|i| (format!("d/f{i}"), random(10_000 + i * 7_919, i as u64)))
        .collect();
    for (name, data) in &files {
        fs::write(p.mnt.join(name), data).unwrap();
    }
    let st = Command::new("sync").arg(&p.mnt).status().unwrap();
    assert!(st.success(), "sync {}", p.mnt.display());
    let pid = p.daemon_pid().expect("daemon pid");
    // SAFETY: plain kill(2) on the daemon's pid.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    let _ = Command::new("umount").arg("-l").arg(&p.mnt).status();
    p.wait_daemon_gone();
    p.mount();
    for (name, data) in &files {
        let got = fs::read(p.mnt.join(name)).unwrap_or_default();
        assert!(
            &got == data,
            "{name} was not durable after sync of the mount point"
        );
    }
    p.umount();
}

/// Removing files the kernel still caches (it writes their times back
/// before it forgets them) leaves no error for the next syncfs.
#[test]
fn syncfs_after_removing_files_succeeds() {
    let p = Pool::new(1, "128M");
    p.mount();
    let run = p.mnt.join("run");
    fs::create_dir(&run).unwrap();
    for i in 0..3 {
        fs::write(run.join(format!("f{i}")), random(5000, i)).unwrap();
    }
    fs::remove_dir_all(&run).unwrap();
    let st = Command::new("sync").arg("-f").arg(&p.mnt).status().unwrap();
    assert!(
        st.success(),
        "syncfs of the mount failed after removing files"
    );
    p.umount();
}

/// A RAID-1 pool (mirror=2 over 2 images, no stripe) is made, mounted and
/// checked; its capacity is one device's, and a copy damaged on disk reads
/// back intact.
#[test]
fn raid1_pool_reads_through_a_damaged_copy() {
    let p = Pool::with(
        2,
        "128M",
        &["--layers", "compress=zstd:1,crypt=aes-256-gcm,mirror=2"],
    );
    p.mount();
    let data = random(3 << 20, 7);
    fs::write(p.mnt.join("f"), &data).unwrap();
    p.umount();
    let info = ok(stackfs(&["info", "--json", &p.source()]));
    let info: serde_json::Value = serde_json::from_str(&info).unwrap();
    let (usable, raw) = (
        info["capacity"].as_u64().unwrap(),
        info["raw_capacity"].as_u64().unwrap(),
    );
    assert_eq!(usable * 2, raw, "capacity of a 2-way mirror");
    // Garbage over the data region of the first image (past the metadata).
    let f = fs::OpenOptions::new().write(true).open(&p.imgs[0]).unwrap();
    let meta = info["metadata_region"].as_u64().unwrap();
    for off in (0..4u64 << 20).step_by(8192) {
        f.write_all_at(&[0x5a; 4096], (1 << 20) + meta + off)
            .unwrap();
    }
    drop(f);
    p.mount();
    assert!(
        fs::read(p.mnt.join("f")).unwrap() == data,
        "data not read from the good copy"
    );
    p.umount();
}

/// SIGTERM unmounts cleanly and flushes what was written.
#[test]
fn sigterm_flushes_and_unmounts() {
    let p = Pool::new(1, "128M");
    p.mount();
    fs::write(p.mnt.join("note"), b"written before SIGTERM").unwrap();
    let pid = p.daemon_pid().expect("daemon pid");
    // SAFETY: plain kill(2).
    unsafe { libc::kill(pid, libc::SIGTERM) };
    p.wait_daemon_gone();
    assert!(!is_mounted(&p.mnt));
    p.mount();
    assert_eq!(
        fs::read(p.mnt.join("note")).unwrap(),
        b"written before SIGTERM"
    );
    p.umount();
}

#[test]
fn bad_devices_are_clear_errors() {
    let p = Pool::new(3, "64M");
    let other = Pool::new(1, "64M");
    let src = p.source();
    let (a, b, c) = (
        p.imgs[0].display().to_string(),
        p.imgs[1].display().to_string(),
        p.imgs[2].display().to_string(),
    );
    let mnt = p.mnt.to_str().unwrap();
    let sums: Vec<Vec<u8>> = p.imgs.iter().map(|i| fs::read(i).unwrap()).collect();

    // Any order works.
    ok(stackfs(&["info", &format!("{c}:{a}:{b}")]));
    // Missing device.
    fails_with(
        stackfs(&["mount", &format!("{a}:{b}"), mnt]),
        "missing device number 2",
    );
    // The same device twice.
    fails_with(
        stackfs(&["mount", &format!("{a}:{b}:{a}"), mnt]),
        "same device",
    );
    // A device of another pool.
    fails_with(
        stackfs(&[
            "mount",
            &format!("{a}:{b}:{}", other.imgs[0].display()),
            mnt,
        ]),
        "belongs to pool",
    );
    // An unformatted device.
    let blank = p.dir.path().join("blank.img");
    fs::File::create(&blank).unwrap().set_len(64 << 20).unwrap();
    fails_with(
        stackfs(&["mount", &format!("{a}:{b}:{}", blank.display()), mnt]),
        "not a stackfs device",
    );
    // A device that does not exist.
    fails_with(
        stackfs(&["mount", &format!("{a}:{b}:/nonexistent/x.img"), mnt]),
        "/nonexistent/x.img",
    );
    // mkfs refuses to overwrite a pool, and refuses tiny devices.
    fails_with(stackfs(&["mkfs", &a]), "already holds stackfs pool");
    let tiny = p.dir.path().join("tiny.img");
    fails_with(
        stackfs(&["mkfs", "--size", "1M", tiny.to_str().unwrap()]),
        "too small",
    );
    fails_with(
        stackfs(&[
            "mkfs",
            "--layers",
            "stripe=3k",
            "--size",
            "64M",
            tiny.to_str().unwrap(),
        ]),
        "multiple of 4 KiB",
    );
    fails_with(
        stackfs(&["mount", "-o", "bogus_option", &src, mnt]),
        "unknown mount option",
    );
    // None of that wrote anything.
    for (img, before) in p.imgs.iter().zip(&sums) {
        assert!(
            &fs::read(img).unwrap() == before,
            "{} changed",
            img.display()
        );
    }
    assert!(!is_mounted(&p.mnt));
}

/// A damaged primary superblock is replaced from the backup at mount, with a warning.
#[test]
fn damaged_primary_superblock_uses_backup() {
    let p = Pool::new(2, "64M");
    let f = fs::OpenOptions::new().write(true).open(&p.imgs[1]).unwrap();
    f.write_all_at(&[0xff; 64], 100).unwrap();
    drop(f);
    let out = stackfs(&["info", &p.source()]);
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(out.status.success(), "{err}");
    assert!(
        err.contains("using the backup copy"),
        "no warning about the backup: {err}"
    );
    p.mount();
    fs::write(p.mnt.join("x"), b"still works").unwrap();
    p.umount();
    let out = stackfs(&["info", &p.source()]);
    assert!(
        !String::from_utf8_lossy(&out.stderr).contains("backup"),
        "primary was not repaired"
    );
    // Both copies damaged: a clear error.
    let size = fs::metadata(&p.imgs[0]).unwrap().len();
    let f = fs::OpenOptions::new().write(true).open(&p.imgs[0]).unwrap();
    f.write_all_at(&[0xff; 64], 100).unwrap();
    f.write_all_at(&[0xff; 64], size - 4096 + 100).unwrap();
    drop(f);
    fails_with(stackfs(&["info", &p.source()]), "checksum");
}

/// A full pool gives ENOSPC, keeps what was written, and takes data again after deletes.
#[test]
fn full_pool_enospc_and_recovery() {
    let p = Pool::new(1, "48M");
    p.mount();
    // Random bytes: compression must not let the pool swallow them all.
    let chunk = random(1 << 20, 0x9E37_79B9_7F4A_7C15);
    let mut written = 0;
    let mut hit = None;
    // With the kernel's writeback cache, ENOSPC shows at fsync/close, as on NFS.
    let put = |name: String| -> std::io::Result<()> {
        use std::io::Write;
        let mut f = fs::File::create(p.mnt.join(name))?;
        f.write_all(&chunk)?;
        f.sync_all()
    };
    for i in 0..200 {
        match put(format!("f{i}")) {
            Ok(()) => written += 1,
            Err(e) => {
                hit = Some(e);
                break;
            }
        }
    }
    let e = hit.expect("the pool never filled up");
    assert_eq!(e.raw_os_error(), Some(libc::ENOSPC), "{e}");
    assert!(written > 5);
    for i in 0..written {
        assert!(
            fs::read(p.mnt.join(format!("f{i}"))).unwrap() == chunk,
            "f{i} damaged by ENOSPC"
        );
    }
    for i in 0..=written {
        let _ = fs::remove_file(p.mnt.join(format!("f{i}")));
    }
    for i in 0..5 {
        fs::write(p.mnt.join(format!("g{i}")), &chunk)
            .expect("space is usable again after deletes");
    }
    p.umount();
    p.mount();
    assert!(fs::read(p.mnt.join("g4")).unwrap() == chunk);
    p.umount();
    let f = stackfs(&["fsck", &p.source()]);
    assert_eq!(
        f.status.code(),
        Some(0),
        "fsck after ENOSPC: {}",
        String::from_utf8_lossy(&f.stdout)
    );
}

/// fsck finds injected damage (exit 4), repairs it (exit 1), then is clean
/// (exit 0); it refuses a mounted pool (exit 8).
#[test]
fn fsck_finds_repairs_and_refuses_mounted() {
    let p = Pool::new(2, "128M");
    p.mount();
    fs::create_dir(p.mnt.join("d")).unwrap();
    fs::write(p.mnt.join("d/f"), b"data").unwrap();
    fs::hard_link(p.mnt.join("d/f"), p.mnt.join("g")).unwrap();
    let code = stackfs(&["fsck", &p.source()]).status.code();
    assert_eq!(code, Some(8), "fsck must refuse a mounted pool");
    p.umount();
    assert_eq!(stackfs(&["fsck", &p.source()]).status.code(), Some(0));
    ok(stackfs(&["debug-damage", &p.source(), "leaked-extent"]));
    ok(stackfs(&["debug-damage", &p.source(), "wrong-nlink"]));
    let out = stackfs(&["fsck", &p.source()]);
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert_eq!(out.status.code(), Some(4), "{text}");
    assert!(
        text.contains("leaked space") && text.contains("link count"),
        "{text}"
    );
    assert_eq!(
        stackfs(&["fsck", "--repair", &p.source()]).status.code(),
        Some(1)
    );
    assert_eq!(
        stackfs(&["fsck", "--verify-data", &p.source()])
            .status
            .code(),
        Some(0)
    );
    p.mount();
    assert_eq!(fs::read(p.mnt.join("g")).unwrap(), b"data");
    p.umount();
}

/// File handles (name_to_handle_at) stay valid across a remount: inode
/// numbers and generations are stable, so NFS re-exports see no stale handles.
#[test]
fn file_handles_survive_remount() {
    use std::ffi::CString;
    use std::os::unix::ffi::OsStrExt;
    let p = Pool::new(1, "64M");
    p.mount();
    fs::create_dir(p.mnt.join("dir")).unwrap();
    fs::write(p.mnt.join("dir/f"), b"handle me").unwrap();
    let path = CString::new(p.mnt.join("dir/f").as_os_str().as_bytes()).unwrap();
    // struct file_handle: u32 handle_bytes, i32 handle_type, then the bytes.
    let mut fh = vec![0u8; 8 + 128];
    fh[..4].copy_from_slice(&128u32.to_ne_bytes());
    let mut mount_id = 0i32;
    // SAFETY: the buffer holds a file_handle of 128 bytes; all pointers are valid.
    let r = unsafe {
        libc::syscall(
            libc::SYS_name_to_handle_at,
            libc::AT_FDCWD,
            path.as_ptr(),
            fh.as_mut_ptr(),
            &mut mount_id,
            0,
        )
    };
    assert_eq!(
        r,
        0,
        "name_to_handle_at: {}",
        std::io::Error::last_os_error()
    );
    p.umount();
    p.mount();
    let mnt = fs::File::open(&p.mnt).unwrap();
    use std::os::unix::io::{AsRawFd, FromRawFd};
    // SAFETY: as above; the handle came from the previous mount of the same pool.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_open_by_handle_at,
            mnt.as_raw_fd(),
            fh.as_mut_ptr(),
            libc::O_RDONLY,
        )
    };
    assert!(
        fd >= 0,
        "open_by_handle_at after remount: {}",
        std::io::Error::last_os_error()
    );
    // SAFETY: the syscall returned a new descriptor that we now own.
    let f = unsafe { fs::File::from_raw_fd(fd as i32) };
    let mut s = String::new();
    std::io::Read::read_to_string(&mut &f, &mut s).unwrap();
    assert_eq!(s, "handle me");
    drop(f);
    drop(mnt);
    p.umount();
}

/// The administrator's path: `make install`, an fstab line, `mount -T`,
/// `umount`, remount read-only and back, for both the `stackfs` type (our
/// helper) and `fuse.stackfs` (through mount.fuse3). It installs into
/// /usr/local/bin and /sbin, so it runs in CI (CI=true) or when
/// STACKFS_TEST_INSTALL=1; elsewhere it says so and stops.
#[test]
fn fstab_mount_umount_remount() {
    if std::env::var("CI").is_err() && std::env::var("STACKFS_TEST_INSTALL").is_err() {
        eprintln!("fstab test needs CI=true or STACKFS_TEST_INSTALL=1 (it installs stackfs system-wide); not run");
        return;
    }
    let _guard = install();
    let p = Pool::new(2, "64M");
    let pass = p.dir.path().join("pass");
    fs::write(&pass, format!("{PASS}\n")).unwrap();
    for fstype in ["stackfs", "fuse.stackfs"] {
        let fstab = p.dir.path().join("fstab");
        fs::write(
            &fstab,
            format!("{} {} {fstype} passphrase_file={},nofail,_netdev,x-systemd.device-timeout=10s 0 0\n", p.source(), p.mnt.display(), pass.display()),
        )
        .unwrap();
        let mount = |extra: &[&str]| {
            let out = Command::new("mount")
                .arg("-T")
                .arg(&fstab)
                .args(extra)
                .arg(&p.mnt)
                .env_remove("STACKFS_PASSPHRASE")
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "{fstype}: mount {extra:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        mount(&[]);
        let line = fs::read_to_string("/proc/mounts")
            .unwrap()
            .lines()
            .find(|l| l.contains(p.mnt.to_str().unwrap()))
            .unwrap()
            .to_string();
        assert!(
            line.starts_with(&format!("{} ", p.source())),
            "{fstype}: /proc/mounts shows {line}"
        );
        assert!(
            line.contains(" fuse "),
            "{fstype}: the type shows as fuse: {line}"
        );
        fs::write(p.mnt.join(fstype), b"through fstab").unwrap();
        mount(&["-o", "remount,ro"]);
        assert_eq!(
            fs::write(p.mnt.join("no"), b"x")
                .unwrap_err()
                .raw_os_error(),
            Some(libc::EROFS)
        );
        mount(&["-o", "remount,rw"]);
        fs::write(p.mnt.join("yes"), b"x").unwrap();
        // Unmount by source, as fstests does.
        assert!(Command::new("umount")
            .arg(p.source())
            .status()
            .unwrap()
            .success());
        p.wait_daemon_gone();
        mount(&[]);
        assert_eq!(fs::read(p.mnt.join(fstype)).unwrap(), b"through fstab");
        p.umount();
    }
}

/// A device that stops answering: reads fail with EIO within the mount's
/// timeout, the daemon keeps serving, and umount still works.
#[test]
fn hung_device_times_out_and_umount_works() {
    use std::ffi::CString;
    use std::os::unix::ffi::OsStrExt;
    use std::time::{Duration, Instant};
    let p = Pool::with(
        2,
        "64M",
        &[
            "--layers",
            "compress=lz4,crypt=aes-256-gcm,stripe=64k,fault",
        ],
    );
    p.mount();
    let data: Vec<u8> = (0..300_000u32)
        .map(|i| (i % 251) as u8 ^ (i >> 9) as u8)
        .collect();
    fs::write(p.mnt.join("f"), &data).unwrap();
    p.umount();
    let log = format!("timeout=2,log_file={}", p.log().display());
    ok(stackfs(&[
        "mount",
        "-o",
        &log,
        &p.source(),
        p.mnt.to_str().unwrap(),
    ]));
    let root = CString::new(p.mnt.as_os_str().as_bytes()).unwrap();
    let cmd = b"hang any";
    // SAFETY: valid C strings and buffer for the duration of the call.
    let r = unsafe {
        libc::setxattr(
            root.as_ptr(),
            c"stackfs.fault".as_ptr(),
            cmd.as_ptr().cast(),
            cmd.len(),
            0,
        )
    };
    assert_eq!(r, 0, "{}", std::io::Error::last_os_error());
    let started = Instant::now();
    let e = fs::read(p.mnt.join("f")).unwrap_err();
    let took = started.elapsed();
    assert_eq!(e.raw_os_error(), Some(libc::EIO), "{e}");
    assert!(
        took >= Duration::from_millis(1500) && took < Duration::from_secs(10),
        "EIO after {took:?}"
    );
    assert!(p.daemon_pid().is_some(), "the daemon keeps running");
    let started = Instant::now();
    p.umount();
    assert!(started.elapsed() < Duration::from_secs(20));
    // The device answers again: everything is there.
    p.mount();
    assert!(fs::read(p.mnt.join("f")).unwrap() == data);
    p.umount();
}

/// `info --json`: usage and the compression ratio from the pool at rest; live
/// per-layer counters from a mounted pool.
#[test]
fn info_json_shows_usage_and_live_counters() {
    let p = Pool::new(3, "128M");
    p.mount();
    fs::write(
        p.mnt.join("text"),
        b"all work and no play makes a dull filesystem\n".repeat(20_000),
    )
    .unwrap();
    let live: serde_json::Value =
        serde_json::from_str(&ok(stackfs(&["info", "--json", &p.source()]))).unwrap();
    let layers = live["layer_counters"]
        .as_array()
        .expect("counters of a mounted pool");
    let names: Vec<&str> = layers.iter().filter_map(|l| l["layer"].as_str()).collect();
    assert!(
        names.iter().any(|n| n.starts_with("compress"))
            && names.iter().any(|n| n.starts_with("device:")),
        "{names:?}"
    );
    // The FUSE front end comes first, with its requests by opcode.
    assert_eq!(layers[0]["layer"], "fuse");
    assert!(layers[0]["opcodes"]["create"].as_u64() >= Some(1));
    assert!(layers[0]["opcodes"]["write"].as_u64() >= Some(1));
    assert!(layers[1..].iter().all(|l| l["errors"] == 0));
    assert!(layers
        .iter()
        .any(|l| l["write_bytes"].as_u64().unwrap_or(0) > 0));
    p.umount();
    let rest: serde_json::Value =
        serde_json::from_str(&ok(stackfs(&["info", "--json", &p.source()]))).unwrap();
    let (logical, stored) = (
        rest["logical_bytes"].as_u64().unwrap(),
        rest["stored_bytes"].as_u64().unwrap(),
    );
    assert!(
        logical >= 900_000 && stored * 10 < logical,
        "logical {logical}, stored {stored}"
    );
    assert_eq!(rest["devices"].as_array().unwrap().len(), 3);
}

/// The mount's readahead is raised past the kernel's 128 KiB for FUSE
/// (default 4 MiB, `-o readahead=KB`).
#[test]
fn readahead_is_raised() {
    let p = Pool::new(1, "64M");
    let bdi_ra = |p: &Pool| {
        let mnt = p.mnt.to_string_lossy().to_string();
        let info = fs::read_to_string("/proc/self/mountinfo").unwrap();
        let dev = info
            .lines()
            .map(|l| l.split(' ').collect::<Vec<_>>())
            .find(|f| f.len() > 4 && f[4] == mnt)
            .map(|f| f[2].to_string())
            .unwrap();
        fs::read_to_string(format!("/sys/class/bdi/{dev}/read_ahead_kb"))
            .unwrap()
            .trim()
            .to_string()
    };
    p.mount();
    assert_eq!(bdi_ra(&p), "4096");
    p.umount();
    ok(stackfs(&[
        "mount",
        "-o",
        "readahead=512",
        &p.source(),
        p.mnt.to_str().unwrap(),
    ]));
    assert_eq!(bdi_ra(&p), "512");
    p.umount();
}

/// Bytes of file data the daemon copied between its own buffers so far.
fn copied(mnt: &std::path::Path) -> u64 {
    String::from_utf8(getxattr(mnt, c"stackfs.copied"))
        .unwrap()
        .parse()
        .unwrap()
}

/// The data path copies no more than its design needs, per byte of file data:
/// a write copies once from the FUSE request into the file's unit buffer,
/// which then goes below as it is (compressed output is encrypted in place;
/// incompressible data is copied once more, into the ciphertext buffer, because
/// the unit must survive a failed write); a cold read copies once, from the
/// decoded unit into the reply.
#[test]
fn copies_per_byte_stay_within_the_design() {
    let p = Pool::new(3, "256M");
    p.mount();
    let len = 16usize << 20;
    let text: Vec<u8> = (0..len)
        .map(|i| b"stackfs copies little "[i % 22])
        .collect();
    let random = random(len, 0x9E37_79B9_7F4A_7C15);
    let per_byte = |before: u64, after: u64| (after - before) as f64 / len as f64;
    let write = |name: &str, data: &[u8]| {
        let before = copied(&p.mnt);
        let f = fs::File::create(p.mnt.join(name)).unwrap();
        f.write_all_at(data, 0).unwrap();
        f.sync_all().unwrap();
        drop(f);
        per_byte(before, copied(&p.mnt))
    };
    let text_w = write("text", &text);
    let random_w = write("random", &random);
    eprintln!("copies per byte: text write {text_w:.3}, random write {random_w:.3}");
    assert!(
        (1.0..1.05).contains(&text_w),
        "compressible write: {text_w:.3} copies per byte"
    );
    assert!(
        (2.0..2.05).contains(&random_w),
        "incompressible write: {random_w:.3} copies per byte"
    );
    // Cold reads: a fresh daemon has nothing cached.
    p.umount();
    p.mount();
    for (name, data) in [("text", &text), ("random", &random)] {
        let before = copied(&p.mnt);
        assert!(
            &fs::read(p.mnt.join(name)).unwrap() == data,
            "{name} differs"
        );
        let r = per_byte(before, copied(&p.mnt));
        eprintln!("copies per byte: {name} cold read {r:.3}");
        assert!(
            (1.0..1.05).contains(&r),
            "{name} cold read: {r:.3} copies per byte"
        );
    }
    p.umount();
}

/// Bytes the mounted pool's device layers have written so far.
fn device_writes(mnt: &std::path::Path) -> u64 {
    let v: serde_json::Value = serde_json::from_slice(&getxattr(mnt, c"stackfs.stats")).unwrap();
    v.as_array()
        .unwrap()
        .iter()
        .filter(|l| l["layer"].as_str().unwrap().starts_with("device:"))
        .map(|l| l["write_bytes"].as_u64().unwrap())
        .sum()
}

/// Closing a file does not write it by itself: closed files are written
/// together, every 64 closes, in one batch and one commit. Before that their
/// data is served from memory and counted in st_blocks; after it, the data
/// is on the devices and survives a remount.
#[test]
fn closed_files_are_flushed_in_groups() {
    let p = Pool::new(3, "256M");
    let mnt = p.mnt.to_str().unwrap();
    // A long commit interval keeps the timer out of the way.
    ok(stackfs(&["mount", "-o", "commit=600", &p.source(), mnt]));
    let content = |i: usize| random(10_000, (i as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15));
    let before = device_writes(&p.mnt);
    for i in 0..63 {
        fs::write(p.mnt.join(format!("f{i}")), content(i)).unwrap();
    }
    let after = device_writes(&p.mnt);
    eprintln!("device writes: {before} before, {after} after 63 closes");
    // Metadata sectors may go out (the store writes its buffer beyond a
    // size); the 63 files' 756 KiB of data may not.
    assert!(
        after - before < 100_000,
        "closes wrote file data on their own"
    );
    let meta = fs::metadata(p.mnt.join("f5")).unwrap();
    use std::os::unix::fs::MetadataExt;
    assert!(
        meta.blocks() * 512 >= 10_000,
        "unflushed data not counted in st_blocks"
    );
    assert!(fs::read(p.mnt.join("f5")).unwrap() == content(5));
    fs::write(p.mnt.join("f63"), content(63)).unwrap();
    // The kernel sends RELEASE after close() has returned: give it a moment.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(3);
    let mut written = device_writes(&p.mnt) - before;
    while written < 64 * 12_288 && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(20));
        written = device_writes(&p.mnt) - before;
    }
    assert!(
        written >= 64 * 12_288,
        "the 64th close should write all 64 files: {written} bytes written"
    );
    p.umount();
    p.mount();
    for i in [0, 31, 63] {
        assert!(
            fs::read(p.mnt.join(format!("f{i}"))).unwrap() == content(i),
            "f{i}"
        );
    }
    p.umount();
}
