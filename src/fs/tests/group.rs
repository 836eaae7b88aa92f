//! The group transaction: operations gathered into one redb transaction,
//! what readers see of them, and what a failed operation does to them.

use super::*;

/// The names of `dir` as last committed to redb (not through the group).
fn committed_names(fs: &Fs, dir: u64) -> Vec<Vec<u8>> {
    let rtx = fs.db().begin_read().unwrap();
    let t = rtx.open_table(DIRENTS).unwrap();
    t.range((dir, &[][..])..=(dir, &[0xffu8; 256][..]))
        .unwrap()
        .map(|r| r.unwrap().0.value().1.to_vec())
        .collect()
}

fn listed(fs: &Fs, dir: u64) -> Vec<Vec<u8>> {
    let mut names = Vec::new();
    fs.readdir(dir, 0, |e| {
        names.push(e.name.clone());
        true
    })
    .unwrap();
    names.retain(|n| n != b"." && n != b"..");
    names.sort();
    names
}

fn gathered(fs: &Fs) -> u32 {
    fs.group.lock().ops
}

#[test]
fn operations_gather_and_readers_see_them_before_redb_commits() {
    let rig = Rig::small();
    let fs = rig.open();
    let dir = fs
        .mknod(ME, ROOT, b"d", libc::S_IFDIR | 0o755, 0, 0, None)
        .unwrap();
    for i in 0..10 {
        create(&fs, dir.ino, &format!("f{i:02}"));
    }
    fs.setxattr(dir.ino, b"user.k", b"v", 0).unwrap();
    assert_eq!(
        gathered(&fs),
        12,
        "every change joins the group (mkdir, 10 creates, setxattr)"
    );
    assert!(
        committed_names(&fs, ROOT).is_empty(),
        "redb has the group's changes already"
    );
    // Every reader under the lock sees them.
    let names: Vec<Vec<u8>> = (0..10).map(|i| format!("f{i:02}").into_bytes()).collect();
    assert_eq!(listed(&fs, dir.ino), names);
    assert!(lookup(&fs, dir.ino, "f07").is_some());
    assert_eq!(fs.getxattr(dir.ino, b"user.k").unwrap(), b"v");
    assert_eq!(fs.usage().unwrap().inodes, 12);
    // A durable commit takes the group along, and it survives a crash.
    fs.sync().unwrap();
    assert_eq!(gathered(&fs), 0);
    assert_eq!(committed_names(&fs, dir.ino).len(), 10);
    let fs = rig.crash(fs);
    let dir = lookup(&fs, ROOT, "d").expect("the directory after the crash");
    assert_eq!(listed(&fs, dir.ino), names);
    assert_eq!(fs.getxattr(dir.ino, b"user.k").unwrap(), b"v");
}

#[test]
fn a_group_is_committed_every_group_ops_operations() {
    let rig = Rig::small();
    let fs = rig.open();
    let n = txn::GROUP_OPS as usize + 5;
    for i in 0..n {
        create(&fs, ROOT, &format!("f{i}"));
    }
    assert_eq!(gathered(&fs), 5);
    assert_eq!(committed_names(&fs, ROOT).len(), txn::GROUP_OPS as usize);
    assert_eq!(listed(&fs, ROOT).len(), n);
}

#[test]
fn the_commit_thread_commits_a_full_group() {
    let rig = Rig::small();
    let fs = Arc::new(rig.open());
    // A long interval: no periodic commit comes in between.
    let committer = fs.commit_every(Duration::from_secs(3600)).unwrap();
    let n = txn::GROUP_OPS as usize + 5;
    for i in 0..n {
        create(&fs, ROOT, &format!("f{i}"));
    }
    let until = std::time::Instant::now() + Duration::from_secs(10);
    while committed_names(&fs, ROOT).len() < txn::GROUP_OPS as usize
        && std::time::Instant::now() < until
    {
        std::thread::sleep(Duration::from_millis(10));
    }
    drop(committer);
    let committed = committed_names(&fs, ROOT).len();
    assert!(
        committed >= txn::GROUP_OPS as usize,
        "{committed} names committed to redb after {n} creates"
    );
    assert_eq!(listed(&fs, ROOT).len(), n);
}

/// A filesystem with "durable" committed durably, then `n` creates gathered.
fn durable_then_gathered(rig: &Rig, n: usize) -> Fs {
    let fs = rig.open();
    create(&fs, ROOT, "durable");
    fs.sync().unwrap();
    for i in 0..n {
        create(&fs, ROOT, &format!("gathered{i}"));
    }
    fs
}

#[test]
fn a_crash_loses_a_group_whole() {
    let rig = Rig::small();
    let fs = durable_then_gathered(&rig, 20);
    fs.unlink(ROOT, b"durable").unwrap();
    let fs = rig.crash(fs);
    assert_eq!(listed(&fs, ROOT), vec![b"durable".to_vec()]);
}

#[test]
fn refusals_before_any_change_keep_the_group() {
    let rig = Rig::small();
    let fs = rig.open();
    let f = create(&fs, ROOT, "f");
    fs.setxattr(f, b"user.a", b"1", 0).unwrap();
    let before = gathered(&fs);
    let refusals = [
        fs.mknod(ME, ROOT, b"f", libc::S_IFREG | 0o644, 0, 0, None)
            .map(|_| ()),
        fs.setxattr(f, b"user.a", b"2", libc::XATTR_CREATE),
        fs.setxattr(f, b"user.b", b"2", libc::XATTR_REPLACE),
        fs.removexattr(f, b"user.none"),
        fs.unlink(ROOT, b"missing"),
        fs.rmdir(ROOT, b"f"),
        fs.rename(ROOT, b"missing", ROOT, b"other", 0),
        fs.link(f, f, b"x").map(|_| ()),
    ];
    for r in refusals {
        assert!(r.is_err());
    }
    assert!(!fs.failed(), "{:?}", fs.failure());
    assert_eq!(gathered(&fs), before, "a refusal changed the group");
    fs.sync().unwrap();
    let fs = rig.crash(fs);
    let f = lookup(&fs, ROOT, "f").expect("f survives").ino;
    assert_eq!(fs.getxattr(f, b"user.a").unwrap(), b"1");
    assert_eq!(listed(&fs, ROOT), vec![b"f".to_vec()]);
}

#[test]
fn an_operation_failing_after_a_change_fails_the_filesystem() {
    let rig = Rig::small();
    let fs = durable_then_gathered(&rig, 3);
    {
        // As an operation that changed a table and then failed.
        let mut state = fs.state.lock();
        let tx = fs.begin_tx(&mut state).unwrap();
        tx.write(INODES).unwrap().remove(ROOT).unwrap();
        drop(tx);
    }
    assert!(fs.failed());
    let why = fs.failure().unwrap();
    assert!(why.contains("3 earlier operation(s)"), "{why}");
    // Nothing half-done is visible, nothing more is changed.
    assert!(lookup(&fs, ROOT, "gathered0").is_none());
    assert!(lookup(&fs, ROOT, "durable").is_some());
    let e = fs.mknod(ME, ROOT, b"later", libc::S_IFREG | 0o644, 0, 0, None);
    assert_eq!(e.unwrap_err(), Errno::EROFS);
}

#[test]
fn a_sync_mount_commits_every_operation() {
    let rig = Rig::small();
    let fs = rig.open();
    fs.policy.lock().sync_metadata = true;
    create(&fs, ROOT, "f");
    assert_eq!(gathered(&fs), 0);
    let fs = rig.crash(fs);
    assert!(lookup(&fs, ROOT, "f").is_some());
}

#[test]
fn fsync_commits_only_for_a_file_with_changes_not_yet_durable() {
    let rig = Rig::small();
    let fs = rig.open();
    let a = create(&fs, ROOT, "a");
    write_all(&fs, a, 0, &pattern(1, 0, 100_000));
    fs.fsync(a).unwrap();
    let durable = fs.state.lock().durable_seq;
    // Another file's change is not what an fsync of `a` waits for.
    create(&fs, ROOT, "b");
    fs.fsync(a).unwrap();
    assert_eq!(
        fs.state.lock().durable_seq,
        durable,
        "fsync of a durable file committed"
    );
    assert_eq!(gathered(&fs), 1);
    // A change of `a` is, and everything before it goes along.
    let chmod = SetAttr {
        mode: Some(0o600),
        ..SetAttr::default()
    };
    fs.setattr(a, chmod).unwrap();
    fs.fsync(a).unwrap();
    assert!(fs.state.lock().durable_seq > durable);
    let fs = rig.crash(fs);
    let a = lookup(&fs, ROOT, "a").expect("a after the crash");
    assert_eq!(a.perm & 0o777, 0o600);
    assert!(
        lookup(&fs, ROOT, "b").is_some(),
        "b was created before a's chmod"
    );
    same(&read_all(&fs, a.ino), &pattern(1, 0, 100_000));
}
