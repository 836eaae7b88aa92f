//! Access times. The kernel leaves atime to FUSE servers (FUSE inodes are
//! S_NOATIME), so the daemon applies the mount's policy itself, with the
//! rules the kernel applies to its own filesystems:
//! - `relatime` (default): update when the atime is not newer than the
//!   mtime or the ctime, or is at least a day old;
//! - `strictatime`: every access updates it;
//! - `noatime`: never; `nodiratime`: never for directories.
//! An access is an open for reading (files) or an open of a directory: reads
//! served from the page cache never reach the daemon, so the update is made
//! where every reader passes (see ARCHITECTURE.md, "Access times").

use crate::fs::Ts;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AtimeMode {
    NoAtime,
    Relatime,
    Strict,
}

/// What the mount options said; None: not said (keep the current setting).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AtimePolicy {
    pub mode: Option<AtimeMode>,
    pub nodiratime: Option<bool>,
}

impl AtimePolicy {
    /// Take one mount option into account (others are ignored).
    pub fn apply(&mut self, opt: &str) {
        match opt {
            "noatime" => self.mode = Some(AtimeMode::NoAtime),
            // `atime` clears noatime: the kernel's default, relatime, again.
            // norelatime only clears relatime: the kernel then applies its default, relatime.
            "atime" | "relatime" | "nostrictatime" | "norelatime" => {
                self.mode = Some(AtimeMode::Relatime)
            }
            "strictatime" => self.mode = Some(AtimeMode::Strict),
            "nodiratime" => self.nodiratime = Some(true),
            "diratime" => self.nodiratime = Some(false),
            _ => {}
        }
    }

    /// As mount options, for handing to a running daemon (remount).
    pub fn encode(&self) -> String {
        let mut out = Vec::new();
        match self.mode {
            Some(AtimeMode::NoAtime) => out.push("noatime"),
            Some(AtimeMode::Relatime) => out.push("relatime"),
            Some(AtimeMode::Strict) => out.push("strictatime"),
            None => {}
        }
        match self.nodiratime {
            Some(true) => out.push("nodiratime"),
            Some(false) => out.push("diratime"),
            None => {}
        }
        out.join(",")
    }

    pub fn decode(s: &str) -> AtimePolicy {
        let mut p = AtimePolicy::default();
        for o in s.split(',') {
            p.apply(o.trim());
        }
        p
    }

    /// This policy laid over `current`.
    pub fn over(self, current: (AtimeMode, bool)) -> (AtimeMode, bool) {
        (
            self.mode.unwrap_or(current.0),
            self.nodiratime.unwrap_or(current.1),
        )
    }
}

/// Whether an access at `now` updates the atime, under `mode`.
pub fn due(mode: AtimeMode, atime: Ts, mtime: Ts, ctime: Ts, now: Ts) -> bool {
    match mode {
        AtimeMode::NoAtime => false,
        AtimeMode::Strict => true,
        AtimeMode::Relatime => {
            // Times the kernel sets (mtime and ctime of writes, with the
            // writeback cache) come from its coarse clock, up to one tick
            // behind the daemon's: an atime less than a tick newer than
            // them is not newer.
            let ns = |t: Ts| t.sec as i128 * 1_000_000_000 + t.nsec as i128;
            const TICK_NS: i128 = 10_000_000;
            ns(atime) < ns(mtime) + TICK_NS
                || ns(atime) < ns(ctime) + TICK_NS
                || now.sec.saturating_sub(atime.sec) >= 24 * 3600
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(secs: i64) -> Ts {
        Ts { sec: secs, nsec: 0 }
    }

    #[test]
    fn relatime_rules_as_the_kernel() {
        let r = AtimeMode::Relatime;
        // Older than the last change: updated once.
        assert!(due(r, t(100), t(200), t(200), t(300)));
        // Newer than both, less than a day old: not again.
        assert!(!due(r, t(300), t(200), t(200), t(400)));
        // Newer by less than a kernel clock tick: the coarse clock's doing.
        let fine = Ts {
            sec: 200,
            nsec: 3_000_000,
        };
        assert!(due(r, fine, t(200), t(200), t(400)));
        // A day old: updated.
        assert!(due(r, t(300), t(200), t(200), t(300 + 86400)));
        assert!(due(AtimeMode::Strict, t(300), t(200), t(200), t(301)));
        assert!(!due(AtimeMode::NoAtime, t(1), t(200), t(200), t(301)));
    }

    #[test]
    fn later_options_win_and_remounts_keep_what_they_do_not_say() {
        let mut p = AtimePolicy::default();
        for o in ["noatime", "strictatime", "nodiratime"] {
            p.apply(o);
        }
        assert_eq!(p.mode, Some(AtimeMode::Strict));
        let d = AtimePolicy::decode(&p.encode());
        assert_eq!(d, p);
        let only_dir = AtimePolicy::decode("diratime");
        assert_eq!(
            only_dir.over((AtimeMode::NoAtime, true)),
            (AtimeMode::NoAtime, false)
        );
    }
}
