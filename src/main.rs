//! The `stackfs` command: mkfs, mount, info.

use clap::{Parser, Subcommand};
use stackfs::error::FsError;
use stackfs::fs::{Fs, FsOptions};
use stackfs::fuse::FuseFs;
use stackfs::keys::{Kdf, KeyBlob, Secret};
use stackfs::pool::{self, parse_source, uuid_str, MkfsOptions};
use stackfs_layers::{parse_size, StackSpec};
use std::io::{Read, Write};
use std::os::unix::io::FromRawFd;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

#[derive(Parser)]
#[command(
    name = "stackfs",
    version,
    about = "A pooled, layered filesystem in user space (FUSE)"
)]
struct Cli {
    /// More log output (repeat for more); RUST_LOG overrides.
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    verbose: u8,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Create a pool on one or more devices or image files.
    Mkfs {
        /// Layer stack, top first. Default: compress=zstd:1,crypt=aes-256-gcm,
        /// and stripe=64k over several devices. --layers "" for none.
        #[arg(long)]
        layers: Option<String>,
        #[command(flatten)]
        key: KeyArgs,
        /// Argon2id memory for the passphrase (e.g. 256M).
        #[arg(long, default_value = "256M")]
        kdf_memory: String,
        /// Argon2id passes.
        #[arg(long, default_value_t = 3)]
        kdf_time: u32,
        /// Stripe chunk size (multiple of 4 KiB), e.g. 64k.
        #[arg(long)]
        chunk: Option<String>,
        /// Create missing image files of this size (e.g. 1G).
        #[arg(long)]
        size: Option<String>,
        /// Overwrite devices that already hold a pool.
        #[arg(long)]
        force: bool,
        #[arg(required = true)]
        devices: Vec<PathBuf>,
    },
    /// Mount a pool: SOURCE is its devices joined by ':'.
    Mount {
        /// Stay in the foreground instead of returning once mounted.
        #[arg(short, long)]
        foreground: bool,
        /// Mount options, comma-separated (ro, rw, allow_other, fsname=, cache_size=, ...).
        #[arg(short = 'o')]
        options: Vec<String>,
        source: String,
        mountpoint: PathBuf,
    },
    /// Unmount a pool and wait until its daemon has written everything and
    /// let go of the devices (also installed as umount.fuse.stackfs, which
    /// umount(8) calls with these arguments).
    Umount {
        /// Mount point, or the pool's source (DEV1:DEV2...).
        target: String,
        /// Detach now (umount -l); the daemon finishes when the last user leaves.
        #[arg(short = 'l')]
        lazy: bool,
        /// Force (umount -f).
        #[arg(short = 'f')]
        force: bool,
        /// Accepted from umount(8): no mtab, read-only fallback, type, namespace.
        #[arg(short = 'n', hide = true)]
        no_mtab: bool,
        #[arg(short = 'r', hide = true)]
        read_only_fallback: bool,
        #[arg(short = 't', hide = true)]
        fstype: Option<String>,
        #[arg(short = 'N', hide = true)]
        namespace: Option<String>,
    },
    /// Show a pool's devices, layers and usage (usage of an encrypted pool
    /// needs its key: --passphrase-file, --key-file or STACKFS_PASSPHRASE);
    /// for a mounted pool, the live counters of every layer.
    Info {
        source: String,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        key: KeyArgs,
    },
    /// Check a pool (not mounted): superblocks, metadata, extents, entries,
    /// link counts. Exit 0 clean, 1 corrected, 4 errors left, 8 could not check.
    Fsck {
        source: String,
        /// Fix what is safe to fix (leaked extents, dangling entries, link
        /// counts, unreachable files to /lost+found, superblock copies).
        #[arg(long)]
        repair: bool,
        /// Also read back every extent and check its MAC and checksum.
        #[arg(long)]
        verify_data: bool,
        #[command(flatten)]
        key: KeyArgs,
    },
    /// Damage a pool's metadata on purpose (for testing fsck).
    #[command(hide = true)]
    DebugDamage {
        source: String,
        what: String,
        #[command(flatten)]
        key: KeyArgs,
    },
    /// Print the (key id, nonce) of every sealed block (for tests).
    #[command(hide = true)]
    DebugNonces {
        source: String,
        #[command(flatten)]
        key: KeyArgs,
    },
    /// Change the passphrase or key file: re-wraps the master key in every
    /// superblock; no data is rewritten.
    Passwd {
        source: String,
        /// The current secret.
        #[command(flatten)]
        key: KeyArgs,
        /// Read the new passphrase from the first line of FILE
        /// (or STACKFS_NEW_PASSPHRASE, or a prompt).
        #[arg(long)]
        new_passphrase_file: Option<PathBuf>,
        /// Use the bytes of FILE as the new key.
        #[arg(long)]
        new_key_file: Option<PathBuf>,
    },
}

/// Where the secret comes from; without these, STACKFS_PASSPHRASE, then a prompt.
#[derive(clap::Args, Default, Clone)]
struct KeyArgs {
    /// Read the passphrase from the first line of FILE.
    #[arg(long)]
    passphrase_file: Option<PathBuf>,
    /// Unlock with the bytes of FILE instead of a passphrase.
    #[arg(long)]
    key_file: Option<PathBuf>,
}

/// The secret from a key file, a passphrase file, the environment, or a prompt
/// without echo (asked twice when `confirm`).
fn secret(a: &KeyArgs, env: &str, confirm: bool, what: &str) -> Result<Secret, String> {
    if let Some(f) = &a.key_file {
        return Secret::key_file(f);
    }
    if let Some(f) = &a.passphrase_file {
        return Secret::passphrase_file(f);
    }
    if let Ok(p) = std::env::var(env) {
        // Not left in the environment, where /proc/PID/environ shows it.
        std::env::remove_var(env);
        if !p.is_empty() {
            return Ok(Secret::Passphrase(zeroize::Zeroizing::new(p.into_bytes())));
        }
    }
    // SAFETY: isatty only inspects the descriptor.
    if unsafe { libc::isatty(0) } != 1 {
        return Err(format!("no {what}: give --passphrase-file FILE, --key-file FILE or {env} (no terminal to ask on)"));
    }
    let ask = |prompt: &str| {
        rpassword::prompt_password(prompt)
            .map(|p| zeroize::Zeroizing::new(p.into_bytes()))
            .map_err(|e| e.to_string())
    };
    let p = ask(&format!("{what}: "))?;
    if p.is_empty() {
        return Err(format!("empty {what}"));
    }
    if confirm && *ask(&format!("{what} again: "))? != *p {
        return Err(format!("the two {what}s differ"));
    }
    Ok(Secret::Passphrase(p))
}

/// How long mount, fsck and passwd wait for a pool that another process is
/// releasing (a daemon still writing after `umount -l`, say).
const LOCK_WAIT: Duration = Duration::from_secs(60);

fn canonical_source(paths: &[PathBuf]) -> String {
    paths
        .iter()
        .map(|p| {
            std::fs::canonicalize(p)
                .unwrap_or_else(|_| p.clone())
                .display()
                .to_string()
        })
        .collect::<Vec<_>>()
        .join(":")
}

fn is_encrypted(paths: &[PathBuf]) -> Result<bool, String> {
    pool::is_encrypted(paths).map_err(|e| e.to_string())
}

fn main() -> ExitCode {
    // A panic is a bug or damage we did not foresee: one log line with its
    // location, not a backtrace on the user's terminal. Where one can come
    // from data (redb reading a damaged store), it is caught and named.
    std::panic::set_hook(Box::new(|info| {
        let msg = stackfs::fs::panic_text(info.payload());
        let at = info
            .location()
            .map(|l| format!(" at {}:{}", l.file(), l.line()))
            .unwrap_or_default();
        log::error!("internal error{at}: {msg}");
    }));
    // Keys live in this process: no core dumps, no ptrace by other users.
    // SAFETY: prctl with integer arguments only.
    unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0) };
    // mount.fuse calls `stackfs SOURCE MOUNTPOINT -o OPTS`: treat it as `mount`.
    let mut args: Vec<String> = std::env::args().collect();
    let known = ["mkfs", "mount", "umount", "info", "fsck", "passwd", "help"];
    let looks_like_source =
        |a: &str| a.contains(':') || a.contains('/') || std::path::Path::new(a).exists();
    if args.len() > 2
        && !known.contains(&args[1].as_str())
        && looks_like_source(&args[1])
        && !args[2].starts_with('-')
    {
        args.insert(1, "mount".into());
    }
    let cli = Cli::parse_from(args);
    let level = match cli.verbose {
        0 => "warn",
        1 => "info",
        _ => "debug",
    };
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or(level)).init();
    if let Cmd::Fsck {
        source,
        repair,
        verify_data,
        key,
    } = &cli.cmd
    {
        return ExitCode::from(fsck(source, *repair, *verify_data, key));
    }
    let r = match cli.cmd {
        Cmd::Fsck { .. } => unreachable!("handled above"),
        Cmd::DebugNonces { source, key } => open_fs(&source, &key, true)
            .map_err(|e| e.to_string())
            .and_then(|fs| {
                stackfs::audit::nonces(&fs).map(|lines| lines.iter().for_each(|l| println!("{l}")))
            }),
        Cmd::DebugDamage { source, what, key } if what == "live-pairs" => live_pairs(&source, &key),
        Cmd::DebugDamage { source, what, key } if what == "store-garbage" => {
            store_garbage(&source, &key).map(|_| println!("damaged: {what}"))
        }
        Cmd::DebugDamage { source, what, key } => open_fs(&source, &key, false)
            .map_err(|e| e.to_string())
            .and_then(|fs| stackfs::fsck::inject(&fs, &what).map(|_| println!("damaged: {what}"))),
        Cmd::Mkfs {
            layers,
            key,
            kdf_memory,
            kdf_time,
            chunk,
            size,
            force,
            devices,
        } => mkfs(
            layers,
            &key,
            &kdf_memory,
            kdf_time,
            chunk,
            size,
            force,
            devices,
        ),
        Cmd::Passwd {
            source,
            key,
            new_passphrase_file,
            new_key_file,
        } => passwd(
            &source,
            &key,
            KeyArgs {
                passphrase_file: new_passphrase_file,
                key_file: new_key_file,
            },
        ),
        Cmd::Mount {
            foreground,
            options,
            source,
            mountpoint,
        } => mount(foreground, &options, &source, mountpoint),
        Cmd::Info { source, key, json } => info(&source, &key, json),
        Cmd::Umount {
            target,
            lazy,
            force,
            ..
        } => umount(&target, lazy, force),
    };
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("stackfs: {e}");
            ExitCode::FAILURE
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn mkfs(
    layers: Option<String>,
    key: &KeyArgs,
    kdf_memory: &str,
    kdf_time: u32,
    chunk: Option<String>,
    size: Option<String>,
    force: bool,
    devices: Vec<PathBuf>,
) -> Result<(), String> {
    let size = size
        .map(|s| parse_size(&s).ok_or(format!("--size {s:?} is not a size (e.g. 1G)")))
        .transpose()?;
    let default = if devices.len() > 1 {
        "compress=zstd:1,crypt=aes-256-gcm,stripe=64k"
    } else {
        "compress=zstd:1,crypt=aes-256-gcm"
    };
    let mut spec = StackSpec::parse(layers.as_deref().unwrap_or(default))
        .map_err(|e| format!("--layers: {e}"))?;
    if let Some(c) = chunk {
        let c = parse_size(&c)
            .filter(|c| *c > 0 && c % 4096 == 0)
            .ok_or(format!("--chunk {c:?} is not a multiple of 4 KiB"))?;
        let mut found = false;
        for l in spec.layers.iter_mut() {
            if let stackfs_layers::LayerSpec::Stripe { chunk } = l {
                *chunk = c;
                found = true;
            }
        }
        if !found {
            spec.layers
                .push(stackfs_layers::LayerSpec::Stripe { chunk: c });
        }
    }
    // Never format a pool that something holds (a mounted pool, fsck...).
    let existing: Vec<PathBuf> = devices.iter().filter(|p| p.exists()).cloned().collect();
    let _owner = stackfs::lock::lock(&existing, stackfs::lock::Mode::Exclusive, LOCK_WAIT)?;
    let sb = pool::mkfs(
        &devices,
        &MkfsOptions {
            secret: if spec.has_crypt() {
                Some(secret(key, "STACKFS_PASSPHRASE", true, "new passphrase")?)
            } else {
                None
            },
            kdf: Kdf {
                memory_kib: (parse_size(kdf_memory)
                    .filter(|m| (64 << 10..=64 << 30).contains(m))
                    .ok_or(format!(
                        "--kdf-memory {kdf_memory:?} must be a size from 64K to 64G"
                    ))?
                    >> 10) as u32,
                time: kdf_time.max(1),
                lanes: 1,
            },
            spec,
            size,
            force,
            progress: mkfs_progress(devices.len()),
        },
    )
    .map_err(|e| e.to_string())?;
    println!(
        "created pool {} on {} device(s), layers \"{}\", {} MiB per device",
        uuid_str(&sb.pool_uuid),
        sb.count,
        sb.spec,
        sb.per_device >> 20
    );
    Ok(())
}

struct MountOpts {
    read_only: bool,
    /// Other users may use the mount (the kernel checks permissions). Root
    /// mounts are public unless `private`; a user's own mount is private
    /// unless `allow_other` (which fuse.conf must allow).
    allow_other: Option<bool>,
    /// `/proc/mounts` and `df -T` show `fuse.stackfs` instead of `fuse`.
    show_subtype: bool,
    /// The atime policy the daemon applies (the kernel leaves atime to FUSE
    /// servers): what `noatime`, `relatime`, `strictatime`, `nodiratime` say.
    atime: stackfs::atime::AtimePolicy,
    /// `sync` or `dirsync`: every metadata change is durable when it returns.
    sync_metadata: bool,
    fsname: Option<String>,
    cache_bytes: u64,
    writeback: bool,
    kernel: Vec<String>,
    log_file: Option<PathBuf>,
    key: KeyArgs,
    remount: bool,
    /// Device request timeout; None: wait forever.
    timeout: Option<Duration>,
    /// Readahead of the mount's BDI in KiB (the kernel gives FUSE 128).
    readahead_kb: u64,
    /// FUSE worker threads, each with its own /dev/fuse clone.
    threads: usize,
    /// Interval of the periodic durable commit.
    commit: Duration,
}

fn parse_options(options: &[String]) -> Result<MountOpts, String> {
    let mut o = MountOpts {
        read_only: false,
        allow_other: None,
        show_subtype: false,
        atime: stackfs::atime::AtimePolicy::default(),
        sync_metadata: false,
        fsname: None,
        cache_bytes: 256 << 20,
        writeback: true,
        kernel: Vec::new(),
        log_file: None,
        key: KeyArgs::default(),
        remount: false,
        timeout: Some(pool::DEFAULT_TIMEOUT),
        readahead_kb: 4096,
        threads: 4,
        commit: Duration::from_secs(5),
    };
    for opt in options
        .iter()
        .flat_map(|s| s.split(','))
        .map(str::trim)
        .filter(|s| !s.is_empty())
    {
        let (k, v) = opt
            .split_once('=')
            .map(|(k, v)| (k, Some(v)))
            .unwrap_or((opt, None));
        match (k, v) {
            ("ro", None) => o.read_only = true,
            ("rw", None) => o.read_only = false,
            ("allow_other", None) => o.allow_other = Some(true),
            ("private", None) => o.allow_other = Some(false),
            ("show_subtype", None) => o.show_subtype = true,
            ("default_permissions", None) => {}
            ("remount", None) => o.remount = true,
            ("readahead", Some(v)) => {
                o.readahead_kb = v
                    .parse()
                    .ok()
                    .filter(|k| *k <= 1 << 20)
                    .ok_or(format!("readahead={v} is not a size in KiB"))?
            }
            ("timeout", Some(v)) => {
                let secs: f64 = v
                    .parse()
                    .ok()
                    .filter(|s: &f64| *s >= 0.0 && *s < 1e7)
                    .ok_or(format!("timeout={v} is not a number of seconds"))?;
                o.timeout = (secs > 0.0).then(|| Duration::from_secs_f64(secs));
            }
            ("commit", Some(v)) => {
                o.commit = v
                    .parse()
                    .ok()
                    .filter(|s: &u64| (1..=86400).contains(s))
                    .map(Duration::from_secs)
                    .ok_or(format!(
                        "commit={v} is not a number of seconds from 1 to 86400"
                    ))?
            }
            ("threads", Some(v)) => {
                o.threads = v
                    .parse()
                    .ok()
                    .filter(|n| (1..=64).contains(n))
                    .ok_or(format!("threads={v} is not a number from 1 to 64"))?
            }
            ("fsname", Some(v)) => o.fsname = Some(v.to_string()),
            ("cache_size", Some(v)) => {
                o.cache_bytes = parse_size(v).ok_or(format!("cache_size={v} is not a size"))?
            }
            ("writeback", None) => o.writeback = true,
            ("nowriteback", None) => o.writeback = false,
            ("log_file", Some(v)) => o.log_file = Some(PathBuf::from(v)),
            ("key_file", Some(v)) => o.key.key_file = Some(PathBuf::from(v)),
            ("passphrase_file", Some(v)) => o.key.passphrase_file = Some(PathBuf::from(v)),
            // Kernel mount flags; the atime ones also set the daemon's policy.
            (
                "suid" | "nosuid" | "dev" | "nodev" | "exec" | "noexec" | "atime" | "noatime"
                | "relatime" | "norelatime" | "strictatime" | "nostrictatime" | "diratime"
                | "nodiratime" | "lazytime" | "nolazytime" | "sync" | "async" | "dirsync"
                | "iversion" | "noiversion" | "silent" | "loud" | "nomand",
                None,
            ) => {
                o.atime.apply(k);
                match k {
                    "sync" | "dirsync" => o.sync_metadata = true,
                    "async" => o.sync_metadata = false,
                    _ => {}
                }
                o.kernel.push(k.to_string())
            }
            ("mand", None) => {
                return Err(
                    "mand: mandatory locking is not supported (Linux removed it in 5.15)".into(),
                )
            }
            ("context" | "fscontext" | "defcontext" | "rootcontext", Some(_)) => {
                return Err(format!(
                    "{k}=: SELinux labels are not supported on stackfs (FUSE has no per-mount \
                     context labelling); mount without it"
                ))
            }
            // Options mount(8) and fstab pass along, meaningless to us: who may
            // mount (owner, group, user, users), automount and boot ordering.
            (
                "defaults" | "nofail" | "_netdev" | "noauto" | "auto" | "user" | "nouser" | "users"
                | "owner" | "group",
                None,
            ) => {}
            (k, _) if k.starts_with("x-") || k == "comment" || k == "subtype" => {}
            // The kernel's own FUSE options, which mount(8) passes back from
            // /proc/mounts on a remount.
            ("user_id" | "group_id" | "rootmode" | "fd" | "blksize" | "max_read", Some(_)) => {}
            _ => return Err(format!("unknown mount option {opt:?}")),
        }
    }
    Ok(o)
}

/// Parent side of daemon start: run ourselves in the foreground, detached,
/// and wait until it says the mount is ready (or dies).
/// A secret handed over by the parent: a kind byte, then the secret.
fn read_handed_secret(fd: i32) -> Result<Secret, String> {
    // SAFETY: the parent made this pipe end for us; we own it from here.
    let mut f = unsafe { std::fs::File::from_raw_fd(fd) };
    let mut raw = zeroize::Zeroizing::new(Vec::new());
    f.read_to_end(&mut raw)
        .map_err(|e| format!("reading the secret from the parent: {e}"))?;
    match raw.split_first() {
        Some((b'K', rest)) => Ok(Secret::KeyFile(zeroize::Zeroizing::new(rest.to_vec()))),
        Some((b'P', rest)) => Ok(Secret::Passphrase(zeroize::Zeroizing::new(rest.to_vec()))),
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

fn spawn_daemon(
    options: &[String],
    source: &str,
    mountpoint: &std::path::Path,
    handed: Option<&Secret>,
) -> Result<(), String> {
    let secret_pipe = handed.map(|_| pipe()).transpose()?;
    let (ready_r, ready_w) = pipe()?;
    inherit(ready_w);
    let fds = [ready_r, ready_w];
    let exe = std::env::current_exe().map_err(|e| format!("cannot find own executable: {e}"))?;
    let mut cmd = std::process::Command::new(exe);
    cmd.arg("mount").arg("--foreground");
    for o in options {
        cmd.arg("-o").arg(o);
    }
    cmd.arg(source)
        .arg(mountpoint)
        .env("STACKFS_READY_FD", fds[1].to_string())
        .env_remove("STACKFS_PASSPHRASE")
        .stdin(std::process::Stdio::null());
    if let Some((r, _)) = secret_pipe {
        inherit(r);
        cmd.env("STACKFS_SECRET_FD", r.to_string());
    }
    let child = cmd.spawn().map_err(|e| format!("starting the daemon: {e}"));
    if let (Some((r, w)), Some(s)) = (secret_pipe, handed) {
        // SAFETY: both ends are ours; the child holds its own copy of the read end.
        let mut w = unsafe {
            libc::close(r);
            std::fs::File::from_raw_fd(w)
        };
        let (kind, bytes): (u8, &[u8]) = match s {
            Secret::KeyFile(b) => (b'K', b),
            Secret::Passphrase(b) => (b'P', b),
        };
        let _ = w.write_all(&[kind]).and_then(|_| w.write_all(bytes));
    }
    // SAFETY: fds[1] is ours; the child has its own copy.
    unsafe { libc::close(fds[1]) };
    let mut child = child?;
    // SAFETY: fds[0] is an open pipe end owned from here on.
    let mut r = unsafe { std::fs::File::from_raw_fd(fds[0]) };
    let mut msg = String::new();
    let _ = r.read_to_string(&mut msg);
    if msg.starts_with("ok") {
        return Ok(());
    }
    let status = child.wait().map_err(|e| e.to_string())?;
    Err(format!(
        "the daemon exited before the mount was ready ({status})"
    ))
}

fn mount(
    foreground: bool,
    options: &[String],
    source: &str,
    mountpoint: PathBuf,
) -> Result<(), String> {
    let o = parse_options(options)?;
    let ready_fd: Option<i32> = std::env::var("STACKFS_READY_FD")
        .ok()
        .and_then(|v| v.parse().ok());
    if o.remount {
        return remount(&mountpoint, &o);
    }
    let paths = parse_source(source);
    if !foreground {
        // Ask here, where the terminal is; the daemon gets the secret through a pipe.
        let handed =
            if is_encrypted(&paths)? && o.key.key_file.is_none() && o.key.passphrase_file.is_none()
            {
                Some(secret(&o.key, "STACKFS_PASSPHRASE", false, "passphrase")?)
            } else {
                None
            };
        return spawn_daemon(options, source, &mountpoint, handed.as_ref());
    }
    // Before any thread exists (io_uring completion threads start with the
    // pool), so that only the signal thread ever receives SIGTERM.
    block_signals();
    let mountpoint =
        std::fs::canonicalize(&mountpoint).map_err(|e| format!("{}: {e}", mountpoint.display()))?;
    // The pool is ours from here until the process exits, whatever unmounts it.
    let owner = stackfs::lock::lock(&paths, stackfs::lock::Mode::Exclusive, LOCK_WAIT)?;
    let key = if !is_encrypted(&paths)? {
        None
    } else if let Some(fd) = std::env::var("STACKFS_SECRET_FD")
        .ok()
        .and_then(|v| v.parse::<i32>().ok())
    {
        Some(read_handed_secret(fd)?)
    } else {
        Some(secret(&o.key, "STACKFS_PASSPHRASE", false, "passphrase")?)
    };
    let pool = pool::open(&paths, o.read_only, key.as_ref(), o.timeout, Some(owner))
        .map_err(|e| e.to_string())?;
    drop(key);
    // The kernel's record of the source names every device by its full
    // path, so `umount SOURCE` and the lock's holder lookup find it.
    let source = canonical_source(&paths);
    let source = source.as_str();
    for w in &pool.warnings {
        log::warn!("{w}");
        eprintln!("stackfs: warning: {w}");
    }
    let fs = Arc::new(
        Fs::open(
            pool,
            FsOptions {
                read_only: o.read_only,
                cache_bytes: o.cache_bytes,
                lenient: false,
                atime: o.atime,
                sync_metadata: o.sync_metadata,
            },
        )
        .map_err(|e| e.to_string())?,
    );
    let notifier = Arc::new(std::sync::OnceLock::new());
    let fusefs = FuseFs {
        fs: fs.clone(),
        writeback: o.writeback && !o.read_only,
        notifier: notifier.clone(),
    };
    let session = mount_fuse(fusefs, source, &mountpoint, &o)?;
    let _ = notifier.set(session.notifier());
    set_readahead(&mountpoint, o.readahead_kb);
    if let Some(fd) = ready_fd {
        detach(fd, o.log_file.as_deref());
    }
    let mp = mountpoint.clone();
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            wait_for_signal();
            log::info!("signal received: unmounting {}", mp.display());
            if let Err(e) = unmount(&mp) {
                log::error!("unmount after signal failed: {e}");
            }
        })
        .map_err(|e| e.to_string())?;
    let running = Arc::new(AtomicBool::new(true));
    let commit_ms = o.commit.as_millis() as u64;
    let timer = {
        let (fs, running) = (fs.clone(), running.clone());
        std::thread::Builder::new()
            .name("commit".into())
            .spawn(move || {
                // Group commit: everything written is durable within
                // `commit=` seconds (5 by default).
                let mut waited = 0;
                while running.load(Ordering::Acquire) {
                    std::thread::sleep(Duration::from_millis(200));
                    waited += 200;
                    if waited >= commit_ms {
                        waited = 0;
                        // Failed (a member stopped answering): nothing to commit.
                        if fs.failed() {
                            continue;
                        }
                        if let Err(e) = fs.sync() {
                            log::error!("periodic commit failed: {e}");
                        }
                    }
                }
            })
            .map_err(|e| e.to_string())?
    };
    let r = session.run();
    running.store(false, Ordering::Release);
    let _ = timer.join();
    if let Err(e) = fs.shutdown() {
        log::error!("final commit failed: {e}");
    }
    drop(fs);
    r.map_err(|e| format!("session ended with an error: {e}"))
}

/// Whether other users may use the mount: root mounts are public, as a
/// kernel filesystem is (the kernel checks modes and ACLs:
/// default_permissions); `private` keeps one to root. A user's own mount
/// is private unless `allow_other`.
fn is_public(o: &MountOpts) -> bool {
    // SAFETY: geteuid has no preconditions.
    o.allow_other.unwrap_or(unsafe { libc::geteuid() } == 0)
}

/// The MS_* flags the kernel options ask for, later ones overriding earlier.
fn kernel_flags(options: &[String]) -> libc::c_ulong {
    use libc::*;
    let atime_modes = MS_NOATIME | MS_RELATIME | MS_STRICTATIME;
    let mut f: c_ulong = 0;
    for k in options {
        let (set, clear): (c_ulong, c_ulong) = match k.as_str() {
            "nosuid" => (MS_NOSUID, 0),
            "suid" => (0, MS_NOSUID),
            "nodev" => (MS_NODEV, 0),
            "dev" => (0, MS_NODEV),
            "noexec" => (MS_NOEXEC, 0),
            "exec" => (0, MS_NOEXEC),
            "noatime" => (MS_NOATIME, atime_modes),
            "atime" => (0, MS_NOATIME),
            "relatime" => (MS_RELATIME, atime_modes),
            "norelatime" => (0, MS_RELATIME),
            "strictatime" => (MS_STRICTATIME, atime_modes),
            "nostrictatime" => (0, MS_STRICTATIME),
            "nodiratime" => (MS_NODIRATIME, 0),
            "diratime" => (0, MS_NODIRATIME),
            "lazytime" => (MS_LAZYTIME, 0),
            "nolazytime" => (0, MS_LAZYTIME),
            "sync" => (MS_SYNCHRONOUS, 0),
            "async" => (0, MS_SYNCHRONOUS),
            "dirsync" => (MS_DIRSYNC, 0),
            "iversion" => (MS_I_VERSION, 0),
            "noiversion" => (0, MS_I_VERSION),
            "silent" => (MS_SILENT, 0),
            "loud" => (0, MS_SILENT),
            _ => (0, 0),
        };
        f = (f & !clear) | set;
    }
    f
}

fn session_config(o: &MountOpts) -> fuser::Config {
    let mut config = fuser::Config::default();
    config.acl = if is_public(o) {
        fuser::SessionACL::All
    } else {
        fuser::SessionACL::Owner
    };
    config.n_threads = Some(o.threads);
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
    mountpoint: &std::path::Path,
    o: &MountOpts,
) -> Result<fuser::Session<FuseFs>, String> {
    let mut config = session_config(o);
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        config.mount_options = vec![
            fuser::MountOption::FSName(o.fsname.clone().unwrap_or_else(|| source.to_string())),
            fuser::MountOption::DefaultPermissions,
            if o.read_only {
                fuser::MountOption::RO
            } else {
                fuser::MountOption::RW
            },
        ];
        if o.show_subtype {
            config
                .mount_options
                .push(fuser::MountOption::Subtype("stackfs".into()));
        }
        // Public (allow_other) comes from the session's ACL (session_config).
        config.mount_options.extend(
            o.kernel
                .iter()
                .map(|k| fuser::MountOption::CUSTOM(k.clone())),
        );
        return fuser::Session::new(fusefs, mountpoint, &config)
            .map_err(|e| format!("mounting at {}: {e}", mountpoint.display()));
    }
    use std::ffi::CString;
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::io::{AsRawFd, OwnedFd};
    let dev = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/fuse")
        .map_err(|e| format!("/dev/fuse: {e}"))?;
    let mut data = format!(
        "fd={},rootmode=40000,user_id=0,group_id=0,default_permissions",
        dev.as_raw_fd()
    );
    if is_public(o) {
        data.push_str(",allow_other");
    }
    let mut flags = kernel_flags(&o.kernel);
    if o.read_only {
        flags |= libc::MS_RDONLY;
    }
    let c = |s: &[u8]| CString::new(s).map_err(|_| "a NUL byte in the mount arguments".to_string());
    let (src, target, fstype, data_c) = (
        c(o.fsname.as_deref().unwrap_or(source).as_bytes())?,
        c(mountpoint.as_os_str().as_bytes())?,
        c(if o.show_subtype {
            b"fuse.stackfs"
        } else {
            b"fuse"
        })?,
        c(data.as_bytes())?,
    );
    // SAFETY: all pointers are valid NUL-terminated strings that outlive the call.
    let r = unsafe {
        libc::mount(
            src.as_ptr(),
            target.as_ptr(),
            fstype.as_ptr(),
            flags,
            data_c.as_ptr().cast(),
        )
    };
    if r != 0 {
        return Err(format!(
            "mounting at {}: {}",
            mountpoint.display(),
            std::io::Error::last_os_error()
        ));
    }
    let fd: OwnedFd = dev.into();
    fuser::Session::from_fd(fusefs, fd, config.acl, config).map_err(|e| {
        let _ = unmount(mountpoint);
        format!("FUSE handshake at {}: {e}", mountpoint.display())
    })
}

/// `-o remount[,ro|rw]`: change the running mount's flags in place; no second
/// daemon. Going read-only first makes everything durable (fsync of the root
/// reaches the daemon as fsyncdir, which commits all).
fn remount(mountpoint: &std::path::Path, o: &MountOpts) -> Result<(), String> {
    use std::os::unix::ffi::OsStrExt;
    let mnt =
        std::fs::canonicalize(mountpoint).map_err(|e| format!("{}: {e}", mountpoint.display()))?;
    let entry = stackfs::lock::mounts()
        .into_iter()
        .rev()
        .find(|m| m.mountpoint == mnt)
        .filter(|m| stackfs::lock::daemon_of(m).is_some());
    let Some(entry) = entry else {
        return Err(format!(
            "{} is not a mounted stackfs pool; nothing to remount",
            mnt.display()
        ));
    };
    if o.read_only {
        std::fs::File::open(&mnt)
            .and_then(|d| d.sync_all())
            .map_err(|e| format!("flushing before remount: {e}"))?;
    }
    // As mount(8) does: the flags the mount has, then what this remount says.
    let mut kernel: Vec<String> = entry.options.split(',').map(String::from).collect();
    kernel.extend(o.kernel.iter().cloned());
    let mut flags = libc::MS_REMOUNT | kernel_flags(&kernel);
    if o.read_only {
        flags |= libc::MS_RDONLY;
    }
    let target = std::ffi::CString::new(mnt.as_os_str().as_bytes()).map_err(|e| e.to_string())?;
    // SAFETY: valid NUL-terminated path; the other pointers may be null for a remount.
    let r = unsafe {
        libc::mount(
            std::ptr::null(),
            target.as_ptr(),
            std::ptr::null(),
            flags,
            std::ptr::null(),
        )
    };
    if r != 0 {
        return Err(format!(
            "remounting {}: {}",
            mnt.display(),
            std::io::Error::last_os_error()
        ));
    }
    // The atime and sync rules are the daemon's: hand over what was said.
    let mut said = vec![o.atime.encode()];
    said.extend(
        o.kernel
            .iter()
            .filter(|k| ["sync", "dirsync", "async"].contains(&k.as_str()))
            .cloned(),
    );
    let said = said
        .into_iter()
        .filter(|s| !s.is_empty())
        .collect::<Vec<_>>()
        .join(",");
    if !said.is_empty() {
        let name = c"stackfs.mount";
        // SAFETY: valid C strings and a buffer that outlive the call.
        let r = unsafe {
            libc::setxattr(
                target.as_ptr(),
                name.as_ptr(),
                said.as_ptr().cast(),
                said.len(),
                0,
            )
        };
        if r != 0 {
            return Err(format!(
                "remounted {}, but the daemon did not take {said}: {}",
                mnt.display(),
                std::io::Error::last_os_error()
            ));
        }
    }
    Ok(())
}

/// Raise the mount's readahead through its BDI (measured here: cold 1 MiB
/// sequential reads go from ~250 to ~400 MB/s with 4 MiB). The device
/// number comes from mountinfo: a stat of our own mount would wait for the
/// session loop, which is not running yet.
fn set_readahead(mountpoint: &std::path::Path, kb: u64) {
    let mnt = mountpoint.to_string_lossy().replace(' ', "\\040");
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let Some(dev) = info
        .lines()
        .rev()
        .map(|l| l.split(' ').collect::<Vec<_>>())
        .find(|f| f.len() > 4 && f[4] == mnt)
        .map(|f| f[2].to_string())
    else {
        log::info!("readahead: {} not found in mountinfo", mountpoint.display());
        return;
    };
    let path = format!("/sys/class/bdi/{dev}/read_ahead_kb");
    if let Err(e) = std::fs::write(&path, kb.to_string()) {
        log::info!("readahead: {path}: {e} (the kernel's 128 KiB stays)");
    }
}

/// The mount a `umount` target names: a mount point (in any spelling) or a
/// source. The mount point itself is never stat'ed (its daemon may hang).
fn find_mount(target: &str) -> Option<stackfs::lock::MountEntry> {
    let t = std::path::Path::new(target);
    let abs = std::env::current_dir()
        .map(|d| d.join(t))
        .unwrap_or(t.to_path_buf());
    let normal = match (abs.parent(), abs.file_name()) {
        (Some(dir), Some(name)) => std::fs::canonicalize(dir).ok().map(|d| d.join(name)),
        _ => None,
    };
    let source = canonical_source(&parse_source(target));
    stackfs::lock::mounts().into_iter().rev().find(|m| {
        m.mountpoint == abs
            || Some(&m.mountpoint) == normal.as_ref()
            || m.source == target
            || m.source == source
    })
}

/// `stackfs umount`: unmount, then wait for the daemon to exit, so that the
/// pool is durable and free when this returns (a plain FUSE unmount returns
/// as soon as the kernel lets go, while the daemon may still be writing).
fn umount(target: &str, lazy: bool, force: bool) -> Result<(), String> {
    let m = find_mount(target).ok_or(format!("{target}: not mounted"))?;
    // The daemon is the stackfs process holding the pool's first device; a
    // mount of another FUSE filesystem has none and is unmounted plainly.
    let daemon = stackfs::lock::daemon_of(&m);
    let mut flags = 0;
    if lazy {
        flags |= libc::MNT_DETACH;
    }
    if force {
        flags |= libc::MNT_FORCE;
    }
    use std::os::unix::ffi::OsStrExt;
    let c =
        std::ffi::CString::new(m.mountpoint.as_os_str().as_bytes()).map_err(|e| e.to_string())?;
    // SAFETY: `c` is a valid NUL-terminated path.
    if unsafe { libc::umount2(c.as_ptr(), flags) } != 0 {
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EPERM) {
            return Err(format!("unmounting {}: {e}", m.mountpoint.display()));
        }
        // Not root: the setuid helper unmounts a user's own FUSE mount.
        let mut cmd = std::process::Command::new("fusermount3");
        cmd.arg("-u");
        if lazy {
            cmd.arg("-z");
        }
        let ok = cmd
            .arg(&m.mountpoint)
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        if !ok {
            return Err(format!("unmounting {}: {e}", m.mountpoint.display()));
        }
    }
    let Some(d) = daemon.filter(|_| !lazy) else {
        return Ok(());
    };
    if !stackfs::lock::wait_exit(d.pid, Some(Duration::from_secs(5))) {
        eprintln!(
            "stackfs: waiting for the daemon (PID {}) to finish writing {}",
            d.pid, m.source
        );
        stackfs::lock::wait_exit(d.pid, None);
    }
    Ok(())
}

/// Detach the mount (as `umount -l`): the session ends once the kernel lets go.
fn unmount(mountpoint: &std::path::Path) -> std::io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let c =
        std::ffi::CString::new(mountpoint.as_os_str().as_bytes()).map_err(std::io::Error::other)?;
    // SAFETY: `c` is a valid NUL-terminated path.
    if unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) } == 0 {
        return Ok(());
    }
    let e = std::io::Error::last_os_error();
    // Not root: ask the setuid helper.
    let ok = std::process::Command::new("fusermount3")
        .arg("-u")
        .arg("-z")
        .arg(mountpoint)
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if ok {
        Ok(())
    } else {
        Err(e)
    }
}

/// Tell the waiting parent we are mounted; from now on write nothing to the
/// terminal or files we inherited.
fn detach(fd: i32, log_file: Option<&std::path::Path>) {
    // SAFETY: the parent gave us this pipe end; we write once and close it.
    let mut w = unsafe { std::fs::File::from_raw_fd(fd) };
    let _ = w.write_all(b"ok\n");
    drop(w);
    // SAFETY: setsid has no memory effects; a failure only means we stay in the group.
    unsafe { libc::setsid() };
    let target = log_file
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
    if let Some(f) = target {
        use std::os::unix::io::AsRawFd;
        // SAFETY: dup2 onto the standard descriptors; `f` stays valid during the calls.
        unsafe {
            libc::dup2(f.as_raw_fd(), 1);
            libc::dup2(f.as_raw_fd(), 2);
        }
    }
    if let Ok(null) = std::fs::File::open("/dev/null") {
        use std::os::unix::io::AsRawFd;
        // SAFETY: as above.
        unsafe { libc::dup2(null.as_raw_fd(), 0) };
    }
}

fn signal_set() -> libc::sigset_t {
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

/// Block the stop signals in every thread (inherited), so one thread can wait for them.
fn block_signals() {
    let set = signal_set();
    // SAFETY: `set` is a valid signal set; the old mask is not needed.
    unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
}

fn wait_for_signal() {
    let set = signal_set();
    let mut sig = 0;
    // SAFETY: `set` is valid and `sig` outlives the call.
    unsafe { libc::sigwait(&set, &mut sig) };
}

fn info(source: &str, key: &KeyArgs, json: bool) -> Result<(), String> {
    use serde_json::json;
    let paths = parse_source(source);
    if paths.is_empty() {
        return Err("no devices given".into());
    }
    // A member that stops answering (an image on a stopped FUSE or network
    // server) blocks every stat and read of it: probe it from a thread, and
    // if it does not answer, show what the mounted daemon knows.
    let probe_paths = paths.clone();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let r = stackfs::lock::mount_of(&probe_paths[0]);
        let _ = tx.send(r);
    });
    let mounted = match rx.recv_timeout(Duration::from_secs(5)) {
        Ok(m) => m,
        Err(_) => return info_unanswered(source, &paths, json),
    };
    // A shared lock keeps fsck and passwd out while we read; a mounted pool
    // is read without one (superblocks only, and the daemon's counters).
    let _shared = match mounted {
        Some(_) => None,
        None => Some(stackfs::lock::lock(
            &paths,
            stackfs::lock::Mode::Shared,
            LOCK_WAIT,
        )?),
    };
    let (found, warnings) = pool::inspect(&paths).map_err(|e| e.to_string())?;
    for w in &warnings {
        eprintln!("stackfs: warning: {w}");
    }
    let sb = &found[0].2;
    let encryption = (!sb.keys.is_empty()).then(|| {
        let newest = found
            .iter()
            .max_by_key(|(_, _, s)| s.generation)
            .map(|(_, _, s)| KeyBlob::decode(&s.keys));
        match newest {
            Some(Ok(b)) => format!("aes-256-gcm, unlocked by {}", b.describe()),
            _ => "aes-256-gcm, key material unreadable".into(),
        }
    });
    let devices: Vec<_> = found
        .iter()
        .map(|(p, size, d)| json!({"index": d.index, "path": p.display().to_string(), "size": size, "uuid": uuid_str(&d.device_uuid)}))
        .collect();
    let mut out = json!({
        "pool": uuid_str(&sb.pool_uuid),
        "layers": sb.spec,
        "encryption": encryption,
        "devices": devices,
        "capacity": sb.per_device * sb.count as u64,
        "metadata_region": sb.meta_len,
    });
    let mountpoint = stackfs::lock::mount_of(&paths[0]).map(|m| m.mountpoint.display().to_string());
    if let Some(m) = &mountpoint {
        out["mounted_at"] = json!(m);
        // Live counters and member health from the daemon, and space as
        // statfs sees it.
        let c = std::ffi::CString::new(m.as_str()).map_err(|e| e.to_string())?;
        if let Some(v) = daemon_json(std::path::Path::new(m), c"stackfs.stats") {
            out["layer_counters"] = v;
        }
        if let Some(v) = daemon_json(std::path::Path::new(m), c"stackfs.health") {
            out["health"] = v;
        }
        // SAFETY: statvfs fills the struct we pass.
        let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
        if unsafe { libc::statvfs(c.as_ptr(), &mut st) } == 0 {
            out["data_space"] = json!(st.f_blocks * st.f_frsize);
            out["free"] = json!(st.f_bavail * st.f_frsize);
            out["inodes"] = json!(st.f_files - st.f_ffree);
        }
    } else {
        let secret = match sb.keys.is_empty() {
            true => Ok(None),
            false => secret(key, "STACKFS_PASSPHRASE", false, "passphrase").map(Some),
        };
        let opened = secret.and_then(|s| {
            pool::open(&paths, true, s.as_ref(), Some(pool::DEFAULT_TIMEOUT), None)
                .map_err(|e| e.to_string())
                .and_then(|p| {
                    Fs::open(
                        p,
                        FsOptions {
                            read_only: true,
                            cache_bytes: 16 << 20,
                            lenient: true,
                            ..FsOptions::default()
                        },
                    )
                    .map_err(|e| e.to_string())
                })
        });
        match opened.and_then(|fs| {
            Ok((
                fs.usage().map_err(|e| e.to_string())?,
                fs.space().map_err(|e| e.to_string())?,
            ))
        }) {
            Ok((u, space)) => {
                out["data_space"] = json!(u.total);
                out["free"] = json!(u.free);
                out["inodes"] = json!(u.inodes);
                out["logical_bytes"] = json!(space.logical);
                out["stored_bytes"] = json!(space.stored);
            }
            Err(e) => out["usage_unavailable"] = json!(e),
        }
    }
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&out).map_err(|e| e.to_string())?
        );
        return Ok(());
    }
    let mib = |v: &serde_json::Value| v.as_u64().unwrap_or(0) >> 20;
    println!("pool:        {}", out["pool"].as_str().unwrap_or(""));
    println!(
        "layers:      {}",
        if sb.spec.is_empty() {
            "(none)"
        } else {
            &sb.spec
        }
    );
    if let Some(e) = &encryption {
        println!("encryption:  {e}");
    }
    println!("devices:     {}", sb.count);
    for (path, size, d) in &found {
        println!(
            "  [{}] {}  {} MiB  device {}",
            d.index,
            path.display(),
            size >> 20,
            uuid_str(&d.device_uuid)
        );
    }
    println!(
        "capacity:    {} MiB (metadata region {} MiB)",
        mib(&out["capacity"]),
        mib(&out["metadata_region"])
    );
    if let Some(m) = &mountpoint {
        println!("state:       mounted at {m}");
    }
    if let Some(h) = out["health"].as_object() {
        if h["state"] == "failed" {
            println!("pool state:  FAILED: a member stopped answering; read-only until remounted (fsck after it answers again)");
        } else {
            println!("pool state:  ONLINE");
        }
        for m in h["members"].as_array().into_iter().flatten() {
            println!(
                "  [{}] {:<8} {} timeouts, {} late answers{}",
                m["index"],
                m["state"].as_str().unwrap_or("?"),
                m["timeouts"],
                m["late_answers"],
                m["why"]
                    .as_str()
                    .map(|w| format!(" ({w})"))
                    .unwrap_or_default()
            );
        }
    }
    if let Some(e) = out["usage_unavailable"].as_str() {
        println!("usage:       unavailable ({e})");
    } else {
        let (total, free) = (mib(&out["data_space"]), mib(&out["free"]));
        println!(
            "used:        {} MiB of {total} MiB data space",
            total.saturating_sub(free)
        );
        println!("inodes:      {}", out["inodes"].as_u64().unwrap_or(0));
    }
    if let (Some(l), Some(st)) = (out["logical_bytes"].as_u64(), out["stored_bytes"].as_u64()) {
        let ratio = if st > 0 { l as f64 / st as f64 } else { 1.0 };
        println!(
            "data:        {} MiB logical in {} MiB stored (ratio {ratio:.2})",
            l >> 20,
            st >> 20
        );
    }
    if let Some(nodes) = out["layer_counters"].as_array() {
        println!("layer counters:");
        for n in nodes {
            println!(
                "  {:indent$}{:<24} {:>9} req {:>8} MiB read {:>8} MiB written {:>4} err  p50 {}µs p99 {}µs",
                "",
                n["layer"].as_str().unwrap_or(""),
                n["requests"],
                mib(&n["read_bytes"]),
                mib(&n["write_bytes"]),
                n["errors"],
                n["latency_p50_us"],
                n["latency_p99_us"],
                indent = 2 * n["depth"].as_u64().unwrap_or(0) as usize
            );
        }
    }
    Ok(())
}

/// A JSON control xattr of a mounted pool's root, answered by its daemon.
fn daemon_json(mountpoint: &std::path::Path, name: &std::ffi::CStr) -> Option<serde_json::Value> {
    let c = std::ffi::CString::new(mountpoint.as_os_str().as_encoded_bytes()).ok()?;
    let mut buf = vec![0u8; 1 << 16];
    // SAFETY: valid C strings; the buffer outlives the call.
    let n = unsafe {
        libc::getxattr(
            c.as_ptr(),
            name.as_ptr(),
            buf.as_mut_ptr().cast(),
            buf.len(),
        )
    };
    (n > 0)
        .then(|| serde_json::from_slice(&buf[..n as usize]).ok())
        .flatten()
}

/// `info` when the devices do not answer: the daemon's view of its members,
/// from the mount whose source names them (found without touching them).
fn info_unanswered(source: &str, paths: &[PathBuf], json: bool) -> Result<(), String> {
    let names: Vec<String> = paths.iter().map(|p| p.display().to_string()).collect();
    let mount = stackfs::lock::mounts().into_iter().rev().find(|m| {
        m.fstype.starts_with("fuse")
            && (m.source == source || names.iter().any(|n| m.source.split(':').any(|s| s == n)))
    });
    let health = mount
        .as_ref()
        .and_then(|m| daemon_json(&m.mountpoint, c"stackfs.health"));
    if json {
        println!(
            "{}",
            serde_json::json!({"devices_answer": false, "mounted_at": mount.as_ref().map(|m| m.mountpoint.display().to_string()), "health": health})
        );
    } else {
        println!("devices:     not answering within 5 s (a member is hung)");
        if let Some(m) = &mount {
            println!("state:       mounted at {}", m.mountpoint.display());
        }
        if let Some(h) = &health {
            println!(
                "pool state:  {}",
                h["state"].as_str().unwrap_or("?").to_uppercase()
            );
            for m in h["members"].as_array().into_iter().flatten() {
                println!(
                    "  [{}] {:<8} {}{}",
                    m["index"],
                    m["state"].as_str().unwrap_or("?"),
                    m["path"].as_str().unwrap_or(""),
                    m["why"]
                        .as_str()
                        .map(|w| format!(" ({w})"))
                        .unwrap_or_default()
                );
            }
        }
    }
    Err("the pool's devices do not answer".into())
}

/// A progress bar per device on a terminal (clearing old contents of large
/// devices takes a while); nothing otherwise.
fn mkfs_progress(n: usize) -> Box<dyn Fn(usize, u64, u64)> {
    let multi = indicatif::MultiProgress::with_draw_target(indicatif::ProgressDrawTarget::stderr());
    let style = indicatif::ProgressStyle::with_template(
        "device {prefix}: clearing [{bar:40}] {bytes}/{total_bytes}",
    )
    .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar());
    let bars: Vec<indicatif::ProgressBar> = (0..n)
        .map(|i| {
            let b = multi.add(indicatif::ProgressBar::new(0));
            b.set_style(style.clone());
            b.set_prefix(i.to_string());
            b
        })
        .collect();
    Box::new(move |i, done, total| {
        if let Some(b) = bars.get(i) {
            b.set_length(total);
            b.set_position(done);
            if done >= total {
                b.finish();
            }
        }
    })
}

/// Lock a pool's devices and open it outside a mount (fsck, tools): the
/// lock refuses a mounted pool, naming its mount point and daemon.
fn open_pool(source: &str, key: &KeyArgs, read_only: bool) -> Result<pool::Pool, String> {
    let paths = parse_source(source);
    let owner = stackfs::lock::lock(&paths, stackfs::lock::Mode::Exclusive, LOCK_WAIT)?;
    let secret = if is_encrypted(&paths)? {
        Some(secret(key, "STACKFS_PASSPHRASE", false, "passphrase")?)
    } else {
        None
    };
    let pool = pool::open(
        &paths,
        read_only,
        secret.as_ref(),
        Some(pool::DEFAULT_TIMEOUT),
        Some(owner),
    )
    .map_err(|e| e.to_string())?;
    for w in &pool.warnings {
        eprintln!("stackfs: warning: {w}");
    }
    Ok(pool)
}

/// Open a pool's filesystem outside a mount (fsck, tools).
fn open_fs(source: &str, key: &KeyArgs, read_only: bool) -> Result<Fs, FsError> {
    Fs::open(
        open_pool(source, key, read_only).map_err(FsError::Pool)?,
        FsOptions {
            read_only,
            cache_bytes: 16 << 20,
            lenient: true,
            ..FsOptions::default()
        },
    )
}

/// The pool's metadata store by itself (redb not on top), for the debug
/// commands that look at or damage it directly.
fn open_store(pool: &pool::Pool, read_only: bool) -> Result<stackfs::metastore::MetaStore, String> {
    stackfs::metastore::MetaStore::open(
        pool.stack.meta.clone(),
        pool.sb.meta_len,
        pool.sb.pool_uuid,
        read_only,
    )
    .map_err(|e| e.to_string())
}

/// Print the pool addresses of the metadata slot pairs in use (for tests
/// that damage metadata: damage elsewhere is damage to free space).
fn live_pairs(source: &str, key: &KeyArgs) -> Result<(), String> {
    let pool = open_pool(source, key, true)?;
    let store = open_store(&pool, true)?;
    for a in store.live_pairs() {
        println!("{a}");
    }
    pool.stack.top.shutdown();
    Ok(())
}

/// Overwrite the redb database's pages (not its header) with noise that the
/// metadata store accepts: what a bug, or someone with the key, could leave.
/// For testing that an unreadable store is named, never a crash.
fn store_garbage(source: &str, key: &KeyArgs) -> Result<(), String> {
    use redb::StorageBackend;
    let pool = open_pool(source, key, false)?;
    let store = open_store(&pool, false)?;
    let len = store.len().map_err(|e| e.to_string())?;
    let noise = stackfs_layers::mem::noise(len.saturating_sub(8192) as usize, 7);
    store.write(8192, &noise).map_err(|e| e.to_string())?;
    store.sync_data().map_err(|e| e.to_string())?;
    pool.stack.top.shutdown();
    Ok(())
}

fn fsck(source: &str, repair: bool, verify_data: bool, key: &KeyArgs) -> u8 {
    use stackfs::fsck;
    let fs = match open_fs(source, key, !repair) {
        Ok(fs) => fs,
        Err(e) => {
            eprintln!("stackfs fsck: {e}");
            // A metadata store that cannot be opened is damage, not a usage error.
            return if e.is_damage() {
                fsck::UNCORRECTED
            } else {
                fsck::OPERATIONAL
            };
        }
    };
    let bar =
        indicatif::ProgressBar::with_draw_target(Some(0), indicatif::ProgressDrawTarget::stderr());
    bar.set_style(
        indicatif::ProgressStyle::with_template("{msg} [{bar:40}] {pos}/{len} extents")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    bar.set_message("checking");
    let progress = |done: u64, total: u64| {
        bar.set_length(total);
        bar.set_position(done);
    };
    let checked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        fsck::check(&fs, verify_data, repair, &progress)
    }));
    let report = match checked {
        Ok(Ok(r)) => r,
        Err(p) => {
            bar.finish_and_clear();
            eprintln!(
                "stackfs fsck: metadata store is damaged: {}",
                stackfs::fs::panic_text(&*p)
            );
            return fsck::UNCORRECTED;
        }
        Ok(Err(e)) if e.is_damage() => {
            bar.finish_and_clear();
            eprintln!("stackfs fsck: {e}");
            return fsck::UNCORRECTED;
        }
        Ok(Err(e)) => {
            bar.finish_and_clear();
            eprintln!("stackfs fsck: {e}");
            return fsck::OPERATIONAL;
        }
    };
    bar.finish_and_clear();
    for p in &report.problems {
        println!("{p}");
    }
    let code = report.exit_code();
    println!(
        "{source}: {} inodes, {} extents; {} problem(s), {} repaired",
        report.inodes,
        report.extents,
        report.problems.len(),
        report.repaired
    );
    code
}

fn passwd(source: &str, old: &KeyArgs, new: KeyArgs) -> Result<(), String> {
    let paths = parse_source(source);
    let _owner = stackfs::lock::lock(&paths, stackfs::lock::Mode::Exclusive, LOCK_WAIT)?;
    if !is_encrypted(&paths)? {
        return Err("this pool is not encrypted; it has no passphrase to change".into());
    }
    let old_secret = secret(old, "STACKFS_PASSPHRASE", false, "current passphrase")?;
    // The parameters of the blob that unlocked, not of whichever is newest.
    let (master, unlocked) = pool::unlock(&paths, &old_secret).map_err(|e| e.to_string())?;
    // Only authenticated superblocks are taken as the base of the new ones.
    let found = pool::authenticated_with(&paths, &master).map_err(|e| e.to_string())?;
    let newest = found
        .iter()
        .max_by_key(|(_, _, s)| s.generation)
        .map(|(_, _, s)| s.clone())
        .ok_or("no devices")?;
    let new_secret = secret(&new, "STACKFS_NEW_PASSPHRASE", true, "new passphrase")?;
    let blob = KeyBlob::wrap(&master, &new_secret, unlocked.kdf, &newest.pool_uuid)
        .map_err(|e| e.to_string())?
        .encode();
    let generation = newest.generation + 1;
    let devices: Vec<(PathBuf, u64)> = found.iter().map(|(p, s, _)| (p.clone(), *s)).collect();
    let sb_key = stackfs::superblock::SbKey::derive(&master);
    pool::update_superblocks(&devices, Some(&sb_key), |sb| {
        sb.keys = blob.clone();
        sb.generation = generation;
    })
    .map_err(|e| e.to_string())?;
    println!(
        "passphrase changed on {} device(s); no data was rewritten",
        devices.len()
    );
    Ok(())
}
