//! The mount daemon: started by `stackfs mount` as `stackfs mount
//! --foreground` of itself, handed the secret through a pipe, detached once
//! the mount is ready, stopped by a signal, and the FUSE session loop.

use super::umount::unmount;
use stackfs::fs::Fs;
use stackfs::fuse::FuseFs;
use stackfs::keys::Secret;
use std::io::{Read, Write};
use std::os::unix::io::{AsRawFd, FromRawFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use zeroize::Zeroizing;

/// The environment variable with the descriptor on which the daemon says
/// "ok" to its parent once mounted.
const READY_FD: &str = "STACKFS_READY_FD";
/// The environment variable with the descriptor the daemon reads the
/// secret from (asked for by the parent, where the terminal is).
const SECRET_FD: &str = "STACKFS_SECRET_FD";

/// A descriptor number from the environment, if the parent set one.
fn fd_from_env(name: &str) -> Option<i32> {
    std::env::var(name).ok().and_then(|v| v.parse().ok())
}

/// The descriptor to report readiness on, when a parent waits for us.
pub fn ready_fd() -> Option<i32> {
    fd_from_env(READY_FD)
}

/// The secret the parent handed over, if it did.
pub fn handed_secret() -> Option<Result<Secret, String>> {
    fd_from_env(SECRET_FD).map(read_handed_secret)
}

/// A secret handed over by the parent: a kind byte, then the secret.
fn read_handed_secret(fd: i32) -> Result<Secret, String> {
    // SAFETY: the parent made this pipe end for us; we own it from here.
    let mut pipe = unsafe { std::fs::File::from_raw_fd(fd) };
    let mut raw = Zeroizing::new(Vec::new());
    pipe.read_to_end(&mut raw)
        .map_err(|e| format!("reading the secret from the parent: {e}"))?;
    match raw.split_first() {
        Some((b'K', rest)) => Ok(Secret::KeyFile(Zeroizing::new(rest.to_vec()))),
        Some((b'P', rest)) => Ok(Secret::Passphrase(Zeroizing::new(rest.to_vec()))),
        _ => Err("no secret from the parent".into()),
    }
}

/// A pipe whose ends close on exec; `inherit` lets one end through to a child.
fn pipe() -> Result<(i32, i32), String> {
    let mut fds = [0i32; 2];
    // SAFETY: pipe2 writes two descriptors into the array.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(format!("pipe: {}", std::io::Error::last_os_error()));
    }
    Ok((fds[0], fds[1]))
}

fn inherit(fd: i32) {
    // SAFETY: clears FD_CLOEXEC on a descriptor we own.
    unsafe { libc::fcntl(fd, libc::F_SETFD, 0) };
}

/// Parent side of daemon start: run ourselves in the foreground, detached,
/// hand over the secret asked for here, and wait until the daemon says the
/// mount is ready (or dies).
pub fn spawn(
    options: &[String],
    source: &str,
    mountpoint: &Path,
    handed: Option<&Secret>,
) -> super::CliResult {
    let secret_pipe = handed.map(|_| pipe()).transpose()?;
    let (ready_read, ready_write) = pipe()?;
    inherit(ready_write);
    let exe = std::env::current_exe().map_err(|e| format!("cannot find own executable: {e}"))?;
    let mut command = std::process::Command::new(exe);
    command.arg("mount").arg("--foreground");
    for option in options {
        command.arg("-o").arg(option);
    }
    command
        .arg(source)
        .arg(mountpoint)
        .env(READY_FD, ready_write.to_string())
        .env_remove("STACKFS_PASSPHRASE")
        .stdin(std::process::Stdio::null());
    if let Some((read_end, _)) = secret_pipe {
        inherit(read_end);
        command.env(SECRET_FD, read_end.to_string());
    }
    let child = command
        .spawn()
        .map_err(|e| format!("starting the daemon: {e}"));
    if let (Some((read_end, write_end)), Some(secret)) = (secret_pipe, handed) {
        // SAFETY: both ends are ours; the child holds its own copy of the read end.
        let mut pipe = unsafe {
            libc::close(read_end);
            std::fs::File::from_raw_fd(write_end)
        };
        let (kind, bytes): (u8, &[u8]) = match secret {
            Secret::KeyFile(b) => (b'K', b),
            Secret::Passphrase(b) => (b'P', b),
        };
        let _ = pipe.write_all(&[kind]).and_then(|_| pipe.write_all(bytes));
    }
    // SAFETY: the write end is ours; the child has its own copy.
    unsafe { libc::close(ready_write) };
    let mut child = child?;
    // SAFETY: the read end is an open pipe end owned from here on.
    let mut ready = unsafe { std::fs::File::from_raw_fd(ready_read) };
    let mut message = String::new();
    let _ = ready.read_to_string(&mut message);
    if message.starts_with("ok") {
        return Ok(());
    }
    let status = child.wait().map_err(|e| e.to_string())?;
    // Exit code 1: the daemon printed why on our stderr.
    if status.code() == Some(1) {
        return Err(super::CliError::Reported);
    }
    Err(format!("the daemon exited before the mount was ready ({status})").into())
}

/// Tell the waiting parent we are mounted; from now on write nothing to the
/// terminal or files we inherited.
pub fn detach(fd: i32, log_file: Option<&Path>) {
    // SAFETY: the parent gave us this pipe end; we write once and close it.
    let mut ready = unsafe { std::fs::File::from_raw_fd(fd) };
    let _ = ready.write_all(b"ok\n");
    drop(ready);
    // SAFETY: setsid has no memory effects; a failure only means we stay in the group.
    unsafe { libc::setsid() };
    let output = log_file
        .and_then(|p| {
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(p)
                .ok()
        })
        .or_else(|| {
            std::fs::OpenOptions::new()
                .write(true)
                .open("/dev/null")
                .ok()
        });
    if let Some(file) = output {
        // SAFETY: dup2 onto the standard descriptors; `file` stays valid during the calls.
        unsafe {
            libc::dup2(file.as_raw_fd(), 1);
            libc::dup2(file.as_raw_fd(), 2);
        }
    }
    if let Ok(null) = std::fs::File::open("/dev/null") {
        // SAFETY: as above.
        unsafe { libc::dup2(null.as_raw_fd(), 0) };
    }
}

fn stop_signals() -> libc::sigset_t {
    // SAFETY: sigset_t is plain data, initialised by sigemptyset before use.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGHUP);
        set
    }
}

/// Block the stop signals in every thread (inherited), so one thread can
/// wait for them. Call before any thread exists.
pub fn block_signals() {
    let set = stop_signals();
    // SAFETY: `set` is a valid signal set; the old mask is not needed.
    unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
}

fn wait_for_signal() {
    let set = stop_signals();
    let mut signal = 0;
    // SAFETY: `set` is valid and `signal` outlives the call.
    unsafe { libc::sigwait(&set, &mut signal) };
}

/// A thread that detaches the mount on SIGTERM, SIGINT or SIGHUP; the
/// session loop then ends as the kernel lets go.
fn unmount_on_signal(mountpoint: PathBuf) -> Result<(), String> {
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            wait_for_signal();
            log::info!("signal received: unmounting {}", mountpoint.display());
            if let Err(e) = unmount(&mountpoint) {
                log::error!("unmount after signal failed: {e}");
            }
        })
        .map(drop)
        .map_err(|e| e.to_string())
}

/// Serve a mounted session until it ends (an unmount, or a signal that
/// makes one), committing periodically, then write everything and close.
pub fn serve(
    session: fuser::Session<FuseFs>,
    fs: Arc<Fs>,
    jobs: Option<Arc<stackfs::rebuild::Jobs>>,
    mountpoint: &Path,
    commit: Duration,
) -> Result<(), String> {
    unmount_on_signal(mountpoint.to_path_buf())?;
    // Group commit: everything written is durable within `commit=` seconds.
    let committer = fs
        .commit_every(commit)
        .map_err(|e| format!("starting the commit thread: {e}"))?;
    let result = session.run();
    // A resync or replace saves where it got to, and goes on at the next mount.
    if let Some(jobs) = jobs {
        jobs.stop();
    }
    drop(committer);
    // The outcome of the unmount's flush (also when the session's destroy
    // ran it first): data that could not be written is an error exit.
    let flushed = fs.shutdown();
    drop(fs);
    result.map_err(|e| format!("session ended with an error: {e}"))?;
    flushed.map_err(|e| format!("unmount: data or metadata could not be written: {e}"))
}
