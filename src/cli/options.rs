//! Mount options (`-o`): what the daemon does with them, and the kernel's
//! MS_* flags they stand for.

use super::KeyArgs;
use stackfs::atime::AtimePolicy;
use stackfs::pool;
use stackfs_layers::parse_size;
use std::path::PathBuf;
use std::time::Duration;

/// What `-o` asked for, with the defaults of everything it did not.
pub struct MountOptions {
    pub read_only: bool,
    /// Other users may use the mount (the kernel checks permissions). Root
    /// mounts are public unless `private`; a user's own mount is private
    /// unless `allow_other` (which fuse.conf must allow).
    pub allow_other: Option<bool>,
    /// `/proc/mounts` and `df -T` show `fuse.stackfs` instead of `fuse`.
    pub show_subtype: bool,
    /// The atime policy the daemon applies (the kernel leaves atime to FUSE
    /// servers): what `noatime`, `relatime`, `strictatime`, `nodiratime` say.
    pub atime: AtimePolicy,
    /// `sync` or `dirsync`: every metadata change is durable when it returns.
    pub sync_metadata: bool,
    pub fsname: Option<String>,
    pub cache_bytes: u64,
    pub writeback: bool,
    /// The generic kernel mount flags given, in order (see `kernel_flags`).
    pub kernel: Vec<String>,
    pub log_file: Option<PathBuf>,
    pub key: KeyArgs,
    pub remount: bool,
    /// Device request timeout; None: wait forever.
    pub timeout: Option<Duration>,
    /// Readahead of the mount's BDI in KiB (the kernel gives FUSE 128).
    pub readahead_kb: u64,
    /// FUSE worker threads, each with its own /dev/fuse clone.
    pub threads: usize,
    /// Interval of the periodic durable commit.
    pub commit: Duration,
    /// Mount a mirrored pool with members missing (`degraded`).
    pub degraded: bool,
    /// Bytes per second a resync or replace reads at most (`resync_rate=`).
    pub resync_rate: Option<u64>,
}

impl Default for MountOptions {
    fn default() -> MountOptions {
        MountOptions {
            read_only: false,
            allow_other: None,
            show_subtype: false,
            atime: AtimePolicy::default(),
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
            commit: Duration::from_secs(1),
            degraded: false,
            resync_rate: None,
        }
    }
}

impl MountOptions {
    /// Whether other users may use the mount: root mounts are public, as a
    /// kernel filesystem is (the kernel checks modes and ACLs:
    /// default_permissions); `private` keeps one to root. A user's own mount
    /// is private unless `allow_other`.
    pub fn is_public(&self) -> bool {
        // SAFETY: geteuid has no preconditions.
        self.allow_other.unwrap_or(unsafe { libc::geteuid() } == 0)
    }
}

/// The generic kernel mount flags: the MS_* bits each sets and clears
/// (`nomand` is accepted and means nothing since Linux 5.15).
const KERNEL_FLAGS: &[(&str, libc::c_ulong, libc::c_ulong)] = {
    use libc::*;
    const ATIME_MODES: c_ulong = MS_NOATIME | MS_RELATIME | MS_STRICTATIME;
    &[
        ("nosuid", MS_NOSUID, 0),
        ("suid", 0, MS_NOSUID),
        ("nodev", MS_NODEV, 0),
        ("dev", 0, MS_NODEV),
        ("noexec", MS_NOEXEC, 0),
        ("exec", 0, MS_NOEXEC),
        ("noatime", MS_NOATIME, ATIME_MODES),
        ("atime", 0, MS_NOATIME),
        ("relatime", MS_RELATIME, ATIME_MODES),
        ("norelatime", 0, MS_RELATIME),
        ("strictatime", MS_STRICTATIME, ATIME_MODES),
        ("nostrictatime", 0, MS_STRICTATIME),
        ("nodiratime", MS_NODIRATIME, 0),
        ("diratime", 0, MS_NODIRATIME),
        ("lazytime", MS_LAZYTIME, 0),
        ("nolazytime", 0, MS_LAZYTIME),
        ("sync", MS_SYNCHRONOUS, 0),
        ("async", 0, MS_SYNCHRONOUS),
        ("dirsync", MS_DIRSYNC, 0),
        ("iversion", MS_I_VERSION, 0),
        ("noiversion", 0, MS_I_VERSION),
        ("silent", MS_SILENT, 0),
        ("loud", 0, MS_SILENT),
        ("nomand", 0, 0),
    ]
};

fn is_kernel_flag(name: &str) -> bool {
    KERNEL_FLAGS.iter().any(|(flag, _, _)| *flag == name)
}

/// The MS_* flags the kernel options ask for, later ones overriding earlier
/// (anything else in `options` is ignored).
pub fn kernel_flags(options: &[String]) -> libc::c_ulong {
    options.iter().fold(0, |flags, name| {
        match KERNEL_FLAGS.iter().find(|(flag, _, _)| flag == name) {
            Some((_, set, clear)) => (flags & !clear) | set,
            None => flags,
        }
    })
}

/// Parse every `-o` argument (each comma-separated) in order.
pub fn parse_options(options: &[String]) -> Result<MountOptions, String> {
    let mut parsed = MountOptions::default();
    for option in options
        .iter()
        .flat_map(|s| s.split(','))
        .map(str::trim)
        .filter(|s| !s.is_empty())
    {
        parsed.apply(option)?;
    }
    Ok(parsed)
}

impl MountOptions {
    /// Take one option, `NAME` or `NAME=VALUE`.
    fn apply(&mut self, option: &str) -> Result<(), String> {
        let (name, value) = option
            .split_once('=')
            .map(|(k, v)| (k, Some(v)))
            .unwrap_or((option, None));
        match (name, value) {
            ("ro", None) => self.read_only = true,
            ("rw", None) => self.read_only = false,
            ("allow_other", None) => self.allow_other = Some(true),
            ("private", None) => self.allow_other = Some(false),
            ("show_subtype", None) => self.show_subtype = true,
            ("default_permissions", None) => {}
            ("remount", None) => self.remount = true,
            ("degraded", None) => self.degraded = true,
            ("resync_rate", Some(v)) => {
                self.resync_rate =
                    Some(parse_size(v).ok_or(format!("resync_rate={v} is not a size (e.g. 50M)"))?)
            }
            ("readahead", Some(v)) => self.readahead_kb = parse_readahead(v)?,
            ("timeout", Some(v)) => self.timeout = parse_timeout(v)?,
            ("commit", Some(v)) => self.commit = parse_commit(v)?,
            ("threads", Some(v)) => self.threads = parse_threads(v)?,
            ("fsname", Some(v)) => self.fsname = Some(v.to_string()),
            ("cache_size", Some(v)) => {
                self.cache_bytes = parse_size(v).ok_or(format!("cache_size={v} is not a size"))?
            }
            ("writeback", None) => self.writeback = true,
            ("nowriteback", None) => self.writeback = false,
            ("log_file", Some(v)) => self.log_file = Some(PathBuf::from(v)),
            ("key_file", Some(v)) => self.key.key_file = Some(PathBuf::from(v)),
            ("passphrase_file", Some(v)) => self.key.passphrase_file = Some(PathBuf::from(v)),
            // Kernel mount flags; the atime ones also set the daemon's policy.
            (flag, None) if is_kernel_flag(flag) => {
                self.atime.apply(flag);
                match flag {
                    "sync" | "dirsync" => self.sync_metadata = true,
                    "async" => self.sync_metadata = false,
                    _ => {}
                }
                self.kernel.push(flag.to_string())
            }
            ("mand", None) => {
                return Err(
                    "mand: mandatory locking is not supported (Linux removed it in 5.15)".into(),
                )
            }
            ("context" | "fscontext" | "defcontext" | "rootcontext", Some(_)) => {
                return Err(format!(
                    "{name}=: SELinux labels are not supported on stackfs (FUSE has no per-mount \
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
            (name, _) if name.starts_with("x-") || name == "comment" || name == "subtype" => {}
            // The kernel's own FUSE options, which mount(8) passes back from
            // /proc/mounts on a remount.
            ("user_id" | "group_id" | "rootmode" | "fd" | "blksize" | "max_read", Some(_)) => {}
            _ => return Err(format!("unknown mount option {option:?}")),
        }
        Ok(())
    }
}

fn parse_readahead(value: &str) -> Result<u64, String> {
    value
        .parse()
        .ok()
        .filter(|kb| *kb <= 1 << 20)
        .ok_or(format!("readahead={value} is not a size in KiB"))
}

/// `timeout=0` waits forever.
fn parse_timeout(value: &str) -> Result<Option<Duration>, String> {
    let secs: f64 = value
        .parse()
        .ok()
        .filter(|s: &f64| *s >= 0.0 && *s < 1e7)
        .ok_or(format!("timeout={value} is not a number of seconds"))?;
    Ok((secs > 0.0).then(|| Duration::from_secs_f64(secs)))
}

fn parse_commit(value: &str) -> Result<Duration, String> {
    value
        .parse()
        .ok()
        .filter(|s: &u64| (1..=86400).contains(s))
        .map(Duration::from_secs)
        .ok_or(format!(
            "commit={value} is not a number of seconds from 1 to 86400"
        ))
}

fn parse_threads(value: &str) -> Result<usize, String> {
    value
        .parse()
        .ok()
        .filter(|n| (1..=64).contains(n))
        .ok_or(format!("threads={value} is not a number from 1 to 64"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn options(list: &str) -> Result<MountOptions, String> {
        parse_options(&[list.to_string()])
    }

    #[test]
    fn later_kernel_flags_override_earlier_ones() {
        let flags =
            |list: &[&str]| kernel_flags(&list.iter().map(|s| s.to_string()).collect::<Vec<_>>());
        assert_eq!(flags(&["nosuid", "suid"]), 0);
        assert_eq!(flags(&["noatime", "relatime"]), libc::MS_RELATIME);
        assert_eq!(flags(&["strictatime", "noatime"]), libc::MS_NOATIME);
        assert_eq!(
            flags(&["rw", "nodev", "nomand", "sync"]),
            libc::MS_NODEV | libc::MS_SYNCHRONOUS
        );
    }

    #[test]
    fn options_set_the_daemon_and_kernel_side() {
        let parsed =
            options("ro,noatime,sync,commit=30,timeout=0,threads=8,x-systemd.foo=1").unwrap();
        assert!(parsed.read_only && parsed.sync_metadata);
        assert_eq!(parsed.kernel, ["noatime", "sync"]);
        assert_eq!(parsed.commit, Duration::from_secs(30));
        assert_eq!(parsed.timeout, None);
        assert_eq!(parsed.threads, 8);
        assert!(!options("sync,async").unwrap().sync_metadata);
    }

    #[test]
    fn bad_options_are_named() {
        let error = |list: &str| options(list).err().unwrap_or_default();
        assert_eq!(error("frobnicate"), "unknown mount option \"frobnicate\"");
        assert_eq!(error("noatime=1"), "unknown mount option \"noatime=1\"");
        assert_eq!(
            error("commit=0"),
            "commit=0 is not a number of seconds from 1 to 86400"
        );
        assert_eq!(
            error("threads=65"),
            "threads=65 is not a number from 1 to 64"
        );
        assert!(error("mand").starts_with("mand: mandatory locking"));
        assert!(error("context=x").starts_with("context=: SELinux"));
    }
}
