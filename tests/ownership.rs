//! One owner per pool, on real mounts: a second mount of the same pool is
//! refused whatever the spelling or order of its devices, and `umount`
//! followed at once by `mount`, in every way a pool is unmounted, never
//! opens devices that the old daemon is still writing.
//!
//! `STACKFS_CYCLES` sets the number of back-to-back cycles per way (default
//! 200 under CI=true, 20 otherwise).

mod support;

use std::fs;
use std::path::Path;
use std::process::Command;
use support::*;

fn cycles() -> usize {
    std::env::var("STACKFS_CYCLES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(if std::env::var("CI").is_ok() { 200 } else { 20 })
}

/// What cycle `i` writes: a small tree and 20 MB of incompressible data.
fn write_cycle(mnt: &Path, i: usize) {
    for d in 0..4 {
        let dir = mnt.join(format!("tree/d{d}"));
        fs::create_dir_all(&dir).unwrap();
        for f in 0..8 {
            fs::write(
                dir.join(format!("f{f}")),
                format!("cycle {i} dir {d} file {f}\n").repeat(50),
            )
            .unwrap();
        }
    }
    fs::write(mnt.join("big"), random(20_000_000, i as u64)).unwrap();
    fs::write(mnt.join("cycle"), i.to_string()).unwrap();
}

fn verify_cycle(mnt: &Path, i: usize) {
    assert_eq!(
        fs::read_to_string(mnt.join("cycle")).unwrap(),
        i.to_string(),
        "cycle marker"
    );
    for d in 0..4 {
        for f in 0..8 {
            let got = fs::read_to_string(mnt.join(format!("tree/d{d}/f{f}"))).unwrap();
            assert_eq!(
                got,
                format!("cycle {i} dir {d} file {f}\n").repeat(50),
                "cycle {i} d{d}/f{f}"
            );
        }
    }
    assert!(
        fs::read(mnt.join("big")).unwrap() == random(20_000_000, i as u64),
        "cycle {i}: big differs"
    );
}

fn run(cmd: &mut Command) {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// An unmount command, tried again while the mount is busy: the tests of
/// this file run as threads of one process, and a child another thread
/// forks holds copies of this thread's open files until it execs.
fn unmount_with(cmd: &mut Command) {
    for _ in 0..20 {
        let out = cmd.output().unwrap();
        if out.status.success() {
            return;
        }
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("busy"), "{cmd:?}: {err}");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    panic!("{cmd:?}: still busy after 20 tries");
}

fn fsck_clean(p: &Pool) {
    let out = stackfs(&["fsck", &p.source()]);
    assert!(
        out.status.success(),
        "fsck: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Cycles of mount, verify the previous cycle, write, unmount with `unmount`,
/// with no pause anywhere.
fn cycle_with(p: &Pool, mount: &dyn Fn(), unmount: &dyn Fn()) {
    let n = cycles();
    for i in 0..n {
        mount();
        if i > 0 {
            verify_cycle(&p.mnt, i - 1);
        }
        write_cycle(&p.mnt, i);
        unmount();
    }
    mount();
    verify_cycle(&p.mnt, n - 1);
    unmount();
    p.wait_daemon_gone();
    fsck_clean(p);
}

#[test]
fn umount_then_mount_at_once_never_loses_a_byte() {
    let p = Pool::new(2, "256M");
    // The plain umount(8) of a FUSE mount returns before the daemon is done:
    // the next mount waits for the pool's lock.
    cycle_with(&p, &|| p.mount(), &|| {
        unmount_with(Command::new("umount").arg(&p.mnt));
    });
}

#[test]
fn stackfs_umount_and_fusermount_cycles() {
    let p = Pool::new(2, "256M");
    // stackfs umount waits for the daemon itself.
    cycle_with(&p, &|| p.mount(), &|| {
        unmount_with(Command::new(BIN).arg("umount").arg(&p.mnt));
        assert!(
            p.daemon_pid().is_none(),
            "stackfs umount returned before the daemon exited"
        );
    });
    // fusermount3 -u: the next mount waits.
    cycle_with(&p, &|| p.mount(), &|| {
        unmount_with(Command::new("fusermount3").arg("-u").arg(&p.mnt));
    });
}

#[test]
fn mount_t_stackfs_and_umount_by_source_cycles() {
    if std::env::var("CI").is_err() && std::env::var("STACKFS_TEST_INSTALL").is_err() {
        eprintln!(
            "needs CI=true or STACKFS_TEST_INSTALL=1 (installs stackfs system-wide); not run"
        );
        return;
    }
    let _installed = install();
    let p = Pool::new(2, "256M");
    let mount = || {
        run(Command::new("mount")
            .args(["-t", "stackfs"])
            .arg(p.source())
            .arg(&p.mnt)
            .env("STACKFS_PASSPHRASE", PASS));
    };
    // util-linux runs umount.fuse (our helper), which waits for the daemon.
    cycle_with(&p, &mount, &|| {
        unmount_with(Command::new("umount").arg(p.source()));
        assert!(
            p.daemon_pid().is_none(),
            "umount returned before the daemon exited"
        );
    });
}

#[test]
fn a_pool_has_one_owner() {
    let p = Pool::new(2, "64M");
    p.mount();
    fs::write(p.mnt.join("kept"), b"first mount").unwrap();
    let second = p.dir.path().join("second");
    fs::create_dir(&second).unwrap();
    let imgs: Vec<String> = p.imgs.iter().map(|i| i.display().to_string()).collect();
    // A symlink to the first device, and a ./ spelling of the second.
    let link = p.dir.path().join("link.img");
    std::os::unix::fs::symlink(&p.imgs[0], &link).unwrap();
    let dotted = p.dir.path().join(".").join(p.imgs[1].file_name().unwrap());
    let spellings = [
        imgs.join(":"),
        format!("{}:{}", imgs[1], imgs[0]),
        format!("{}:{}", link.display(), dotted.display()),
    ];
    let mnt = p.mnt.display().to_string();
    for s in &spellings {
        let out = stackfs(&["mount", s, second.to_str().unwrap()]);
        fails_with(out, "PID");
        let out = stackfs(&["mount", s, second.to_str().unwrap()]);
        fails_with(out, &format!("mounted at {mnt}"));
        assert!(!is_mounted(&second), "{s}: a second mount appeared");
    }
    fails_with(stackfs(&["fsck", &p.source()]), "mount");
    let mut passwd = Command::new(BIN);
    passwd
        .args(["passwd", &p.source()])
        .env("STACKFS_PASSPHRASE", PASS)
        .env("STACKFS_NEW_PASSPHRASE", "other");
    fails_with(passwd.output().unwrap(), "PID");
    fails_with(
        stackfs(&["mkfs", "--force", "--size", "64M", &imgs[0], &imgs[1]]),
        "PID",
    );
    // The first mount is untouched.
    assert_eq!(fs::read(p.mnt.join("kept")).unwrap(), b"first mount");
    fs::write(p.mnt.join("more"), b"still writable").unwrap();
    p.umount();
    p.mount();
    assert_eq!(fs::read(p.mnt.join("more")).unwrap(), b"still writable");
    p.umount();
    fsck_clean(&p);
}
