//! Who sent a request, for the set-id rules: capabilities and groups from /proc.

use crate::fs::Privs;
use fuser::Request;

const CAP_FSETID: u32 = 4;

/// The caller of a request, for the set-id rules (`fs::setid_loss`). Its
/// capabilities and supplementary groups come from /proc/PID/status, read
/// once and only when a file has set-id bits to lose. The requests that use
/// this come from the caller's own system call (the kernel waits for the
/// reply), so PID is the caller. One we cannot see there (another PID
/// namespace) has CAP_FSETID iff it is root, and only its own group.
pub(super) struct ReqPrivs {
    pub(super) uid: u32,
    pub(super) gid: u32,
    pub(super) pid: u32,
    /// The kernel found the caller without CAP_FSETID (FUSE_WRITE_KILL_SUIDGID).
    pub(super) no_fsetid: bool,
    /// (CAP_FSETID in the effective set, supplementary groups)
    pub(super) status: std::cell::OnceCell<Option<(bool, Vec<u32>)>>,
}

impl ReqPrivs {
    pub(super) fn new(req: &Request) -> ReqPrivs {
        ReqPrivs {
            uid: req.uid(),
            gid: req.gid(),
            pid: req.pid(),
            no_fsetid: false,
            status: std::cell::OnceCell::new(),
        }
    }

    fn status(&self) -> Option<&(bool, Vec<u32>)> {
        self.status
            .get_or_init(|| {
                if self.pid == 0 {
                    return None;
                }
                let text = std::fs::read_to_string(format!("/proc/{}/status", self.pid)).ok()?;
                let (mut caps, mut groups) = (None, None);
                for line in text.lines() {
                    if let Some(v) = line.strip_prefix("CapEff:") {
                        caps = u64::from_str_radix(v.trim(), 16).ok();
                    } else if let Some(v) = line.strip_prefix("Groups:") {
                        groups = Some(
                            v.split_whitespace()
                                .filter_map(|g| g.parse().ok())
                                .collect(),
                        );
                    }
                }
                Some((caps? & (1 << CAP_FSETID) != 0, groups?))
            })
            .as_ref()
    }
}

impl Privs for ReqPrivs {
    fn fsetid(&self) -> bool {
        !self.no_fsetid && self.status().map_or(self.uid == 0, |s| s.0)
    }

    fn in_group(&self, gid: u32) -> bool {
        gid == self.gid || self.status().is_some_and(|s| s.1.contains(&gid))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fs::{Inode, Kind, SetidChange};

    struct P {
        fsetid: bool,
        groups: Vec<u32>,
    }

    impl Privs for P {
        fn fsetid(&self) -> bool {
            self.fsetid
        }
        fn in_group(&self, gid: u32) -> bool {
            self.groups.contains(&gid)
        }
    }

    #[test]
    fn setid_bits_go_where_ext4_drops_them() {
        use crate::fs::setid_loss;
        use SetidChange::*;
        let dir = |perm: u16| Inode {
            perm,
            gid: 50,
            ..Inode::new_dir(2, 0, 1)
        };
        let file = |perm: u16| Inode {
            kind: Kind::File,
            ..dir(perm)
        };
        let user = P {
            fsetid: false,
            groups: vec![],
        };
        let member = P {
            fsetid: false,
            groups: vec![50],
        };
        let root = P {
            fsetid: true,
            groups: vec![],
        };
        // Data: set-group-id without group execute goes only for outsiders.
        assert_eq!(setid_loss(&file(0o6777), Data, &user), 0o6000);
        assert_eq!(setid_loss(&file(0o6766), Data, &user), 0o6000);
        assert_eq!(setid_loss(&file(0o6766), Data, &member), 0o4000);
        assert_eq!(setid_loss(&file(0o2776), Data, &member), 0o2000);
        assert_eq!(setid_loss(&file(0o6777), Data, &root), 0);
        assert_eq!(setid_loss(&file(0o0777), Data, &user), 0);
        assert_eq!(setid_loss(&dir(0o2777), Data, &user), 0);
        // chown: set-user-id even for root.
        assert_eq!(setid_loss(&file(0o6755), Chown, &root), 0o6000);
        assert_eq!(setid_loss(&file(0o6745), Chown, &root), 0o4000);
        assert_eq!(setid_loss(&file(0o6745), Chown, &member), 0o4000);
        assert_eq!(setid_loss(&file(0o6745), Chown, &user), 0o6000);
        assert_eq!(setid_loss(&dir(0o6755), Chown, &root), 0);
        // An access ACL: set-group-id for outsiders, directories too.
        assert_eq!(setid_loss(&file(0o6755), Acl, &user), 0o2000);
        assert_eq!(setid_loss(&dir(0o2755), Acl, &user), 0o2000);
        assert_eq!(setid_loss(&file(0o6755), Acl, &member), 0);
        assert_eq!(setid_loss(&file(0o6755), Acl, &root), 0);
    }

    #[test]
    fn a_callers_groups_and_capabilities_come_from_proc() {
        // SAFETY: these have no preconditions.
        let (uid, gid) = unsafe { (libc::geteuid(), libc::getegid()) };
        let me = |pid: u32| ReqPrivs {
            uid,
            gid: gid + 1,
            pid,
            no_fsetid: false,
            status: std::cell::OnceCell::new(),
        };
        let mut groups = vec![0 as libc::gid_t; 256];
        // SAFETY: the buffer holds 256 entries.
        let n = unsafe { libc::getgroups(256, groups.as_mut_ptr()) };
        assert!(n >= 0);
        let p = me(std::process::id());
        assert!(p.status().is_some());
        for g in &groups[..n as usize] {
            assert!(p.in_group(*g), "group {g}");
        }
        assert!(p.in_group(gid + 1), "the request's group");
        assert!(!p.in_group(0xfffe_fffe));
        let caps = std::fs::read_to_string("/proc/self/status").unwrap();
        let eff = caps
            .lines()
            .find_map(|l| l.strip_prefix("CapEff:"))
            .unwrap();
        let fsetid = u64::from_str_radix(eff.trim(), 16).unwrap() & (1 << CAP_FSETID) != 0;
        assert_eq!(p.fsetid(), fsetid);
        // The kernel's word wins; a caller we cannot see is capable iff root.
        assert!(!ReqPrivs {
            no_fsetid: true,
            ..me(std::process::id())
        }
        .fsetid());
        assert_eq!(me(0).fsetid(), uid == 0);
        assert!(me(0).in_group(gid + 1) && !me(0).in_group(0xfffe_fffe));
    }
}
