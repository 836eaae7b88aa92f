//! The `stackfs` command line: its arguments (clap), and one module per
//! command. The daemon (spawning, detaching, signals, the session loop) and
//! the mount options have their own modules, shared by mount and remount.

pub mod daemon;
pub mod debug;
pub mod fsck;
pub mod info;
pub mod jobs;
pub mod mkfs;
pub mod mount;
pub mod open;
pub mod options;
pub mod passwd;
pub mod remount;
pub mod secret;
pub mod umount;

use clap::{Parser, Subcommand};
use stackfs::error::FsError;
use stackfs::pool::PoolError;
use std::path::PathBuf;
use std::time::Duration;

#[derive(Parser)]
#[command(
    name = "stackfs",
    version,
    about = "A pooled, layered filesystem in user space (FUSE)"
)]
pub struct Cli {
    /// More log output (repeat for more); RUST_LOG overrides.
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    pub verbose: u8,
    #[command(subcommand)]
    pub cmd: Cmd,
}

#[derive(Subcommand)]
pub enum Cmd {
    /// Create a pool on one or more devices or image files.
    Mkfs(mkfs::MkfsArgs),
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
    /// Read every copy of everything the pool holds, verify it, and rewrite
    /// bad copies from good ones. Online when SOURCE (devices or mount
    /// point) is mounted, else offline. Exit 0 clean, 1 all repaired, 4
    /// damage left, 8 could not scrub.
    Scrub {
        source: String,
        /// Read at most this many bytes per second (e.g. 100M).
        #[arg(long, value_parser = parse_rate)]
        rate: Option<u64>,
        /// Stop the scrub running on a mounted pool.
        #[arg(long)]
        stop: bool,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        key: KeyArgs,
    },
    /// Rebuild member OLD (its device, or its number) of a mounted mirrored
    /// pool onto NEW (a device, or an image file, created if missing), while
    /// the pool runs. A crash or unmount midway resumes at the next mount.
    Replace {
        /// The pool: its devices or its mount point.
        source: String,
        old: String,
        new: PathBuf,
        /// Return once started (follow it with `stackfs info`).
        #[arg(long)]
        no_wait: bool,
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
pub struct KeyArgs {
    /// Read the passphrase from the first line of FILE.
    #[arg(long)]
    pub passphrase_file: Option<PathBuf>,
    /// Unlock with the bytes of FILE instead of a passphrase.
    #[arg(long)]
    pub key_file: Option<PathBuf>,
}

fn parse_rate(s: &str) -> Result<u64, String> {
    stackfs_layers::parse_size(s).ok_or(format!("{s:?} is not a size (e.g. 100M)"))
}

/// How long mount, fsck and passwd wait for a pool that another process is
/// releasing (a daemon still writing after `umount -l`, say).
pub const LOCK_WAIT: Duration = Duration::from_secs(60);

/// Why a command failed; `main` prints it as `stackfs: MESSAGE` and exits 1.
/// The filesystem's and the pool's errors stay typed up to here; the rest
/// (usage, the lock, prompts, system calls) are sentences already.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error(transparent)]
    Fs(#[from] FsError),
    #[error(transparent)]
    Pool(#[from] PoolError),
    #[error("{0}")]
    Message(String),
    /// Failed, and the reason was already printed (by the daemon a mount
    /// started, which shares our stderr).
    #[error("")]
    Reported,
}

impl From<String> for CliError {
    fn from(message: String) -> CliError {
        CliError::Message(message)
    }
}

impl From<&str> for CliError {
    fn from(message: &str) -> CliError {
        CliError::Message(message.to_string())
    }
}

/// What a command returns.
pub type CliResult<T = ()> = Result<T, CliError>;
