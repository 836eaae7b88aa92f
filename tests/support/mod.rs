//! Helpers shared by the mounted tests: the stackfs binary, pools of image
//! files that unmount themselves on drop.
#![allow(dead_code)]

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_stackfs");

/// The passphrase of every test pool (the default stack is encrypted).
pub const PASS: &str = "test passphrase";

/// The value of extended attribute `name` (a C string literal) of `path`.
pub fn getxattr(path: &Path, name: &std::ffi::CStr) -> Vec<u8> {
    use std::os::unix::ffi::OsStrExt;
    let p = std::ffi::CString::new(path.as_os_str().as_bytes()).unwrap();
    let mut buf = vec![0u8; 1 << 16];
    // SAFETY: valid C strings; the buffer outlives the call.
    let n = unsafe {
        libc::getxattr(
            p.as_ptr(),
            name.as_ptr(),
            buf.as_mut_ptr().cast(),
            buf.len(),
        )
    };
    assert!(
        n >= 0,
        "getxattr {name:?} of {}: {}",
        path.display(),
        std::io::Error::last_os_error()
    );
    buf.truncate(n as usize);
    buf
}

/// Incompressible bytes (xorshift), the same for the same seed.
pub fn random(len: usize, seed: u64) -> Vec<u8> {
    stackfs_layers::mem::noise(len, seed)
}

pub fn stackfs(args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .env("STACKFS_PASSPHRASE", PASS)
        .output()
        .expect("run stackfs")
}

pub fn ok(out: Output) -> String {
    assert!(
        out.status.success(),
        "stackfs failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub fn fails_with(out: Output, needle: &str) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "expected failure mentioning {needle:?}"
    );
    assert!(
        err.contains(needle),
        "error {err:?} does not mention {needle:?}"
    );
    assert!(!err.contains("panicked"), "stackfs panicked: {err}");
}

/// Run an unmount command until it succeeds; a busy mount is tried again
/// for up to 5 s (see `Pool::umount`), any other failure fails the test.
pub fn unmount_retrying_busy(unmount: impl Fn() -> Output) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let out = unmount();
        if out.status.success() {
            return;
        }
        let said = String::from_utf8_lossy(&out.stderr);
        assert!(
            said.contains("busy") && Instant::now() < deadline,
            "umount failed: {said}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

pub fn is_mounted(mnt: &Path) -> bool {
    let m = mnt.to_string_lossy().to_string();
    fs::read_to_string("/proc/mounts")
        .unwrap_or_default()
        .lines()
        .any(|l| l.split(' ').nth(1) == Some(&m))
}

/// A pool of image files in a temporary directory, unmounted on drop.
pub struct Pool {
    pub dir: tempfile::TempDir,
    pub imgs: Vec<PathBuf>,
    pub mnt: PathBuf,
}

impl Pool {
    pub fn new(n: usize, size: &str) -> Pool {
        Pool::with(n, size, &[])
    }

    /// A pool made with extra mkfs arguments (e.g. `--layers`, `--key-file`).
    pub fn with(n: usize, size: &str, extra: &[&str]) -> Pool {
        let dir = tempfile::tempdir().unwrap();
        let imgs: Vec<PathBuf> = (0..n)
            .map(|i| dir.path().join(format!("d{i}.img")))
            .collect();
        let mnt = dir.path().join("mnt");
        fs::create_dir(&mnt).unwrap();
        let mut args = vec![
            "mkfs",
            "--size",
            size,
            "--kdf-memory",
            "8M",
            "--kdf-time",
            "1",
        ];
        args.extend_from_slice(extra);
        let paths: Vec<String> = imgs.iter().map(|p| p.display().to_string()).collect();
        args.extend(paths.iter().map(|s| s.as_str()));
        ok(stackfs(&args));
        Pool { dir, imgs, mnt }
    }

    pub fn source(&self) -> String {
        self.imgs
            .iter()
            .map(|p| p.display().to_string())
            .collect::<Vec<_>>()
            .join(":")
    }

    pub fn mount(&self) {
        self.mount_with("");
    }

    /// Mount with extra options (`-o`, comma-separated).
    pub fn mount_with(&self, options: &str) {
        let log = format!("log_file={}", self.log().display());
        let log = if options.is_empty() {
            log
        } else {
            format!("{log},{options}")
        };
        ok(stackfs(&[
            "mount",
            "-o",
            &log,
            &self.source(),
            self.mnt.to_str().unwrap(),
        ]));
        assert!(is_mounted(&self.mnt));
    }

    /// The daemons' log (RUST_LOG applies); shown when a test fails.
    pub fn log(&self) -> PathBuf {
        self.dir.path().join("daemon.log")
    }

    /// Unmount and wait for the daemon. A busy mount is tried again for a
    /// while: a process another test thread is starting holds a copy of
    /// this thread's open files until it execs (tests run in parallel), so
    /// a file just closed here can keep the mount busy for a moment.
    pub fn umount(&self) {
        unmount_retrying_busy(|| Command::new("umount").arg(&self.mnt).output().unwrap());
        self.wait_daemon_gone();
    }

    pub fn wait_daemon_gone(&self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if self.daemon_pid().is_none() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("daemon still running 20 s after unmount");
    }

    /// The daemon serving this pool, if it still runs (zombies do not count).
    pub fn daemon_pid(&self) -> Option<i32> {
        let source = self.source();
        for e in fs::read_dir("/proc").ok()?.flatten() {
            let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
                continue;
            };
            let cmd = fs::read(e.path().join("cmdline")).unwrap_or_default();
            let args: Vec<&[u8]> = cmd.split(|b| *b == 0).collect();
            if args.contains(&&b"--foreground"[..]) && args.contains(&source.as_bytes()) {
                return Some(pid);
            }
        }
        None
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        if is_mounted(&self.mnt) {
            let _ = Command::new("umount").arg("-l").arg(&self.mnt).status();
        }
        if std::thread::panicking() {
            let log = fs::read_to_string(self.log()).unwrap_or_default();
            let _ = fs::write(std::env::temp_dir().join("stackfs-failed-test.log"), &log);
            let tail: Vec<&str> = log.lines().rev().take(30).collect();
            eprintln!("--- daemon log (last lines) ---");
            for l in tail.iter().rev() {
                eprintln!("{l}");
            }
        }
    }
}

/// Install stackfs and its mount helpers system-wide; uninstalled on drop.
pub fn install() -> impl Drop {
    let bin = Path::new(BIN).canonicalize().unwrap();
    let make = move |target: &str| {
        let st = Command::new("make")
            .args([
                "-C",
                concat!(env!("CARGO_MANIFEST_DIR"), "/mount-scripts"),
                target,
            ])
            .arg(format!("BIN={}", bin.display()))
            .stdout(std::process::Stdio::null())
            .status()
            .unwrap();
        assert!(st.success(), "make {target}");
    };
    struct Uninstall<F: Fn(&str)>(F);
    impl<F: Fn(&str)> Drop for Uninstall<F> {
        fn drop(&mut self) {
            (self.0)("uninstall");
        }
    }
    make("install");
    Uninstall(make)
}
