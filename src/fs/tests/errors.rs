//! Error semantics: a failed or unknown commit, metadata I/O errors, data
//! write errors and unmount.

use super::*;

#[test]
fn a_metadata_write_error_turns_the_filesystem_read_only() {
    let rig = Rig::small();
    let fs = rig.open();
    let kept = create(&fs, ROOT, "kept");
    write_all(&fs, kept, 0, &pattern(1, 0, 200_000));
    fs.fsync(kept).unwrap();
    rig.fail(Some(Op::Write), rig.meta_range(), Errno::EIO);
    let made = fs.mknod(ME, ROOT, b"new", libc::S_IFREG | 0o644, 0, 0, None);
    let synced = made.and_then(|i| fs.fsync(i.ino));
    assert!(
        synced.is_err(),
        "a commit through failing metadata writes succeeded"
    );
    assert!(fs.failed(), "not in the failed state");
    assert!(
        fs.failure().unwrap().contains("read-only"),
        "{:?}",
        fs.failure()
    );
    // Said once; from now on every change is refused at once, the same way.
    rig.ctl.clear();
    let e = fs
        .mknod(ME, ROOT, b"later", libc::S_IFREG | 0o644, 0, 0, None)
        .unwrap_err();
    assert_eq!(e, Errno::EROFS);
    assert_eq!(fs.write(kept, 0, b"x").unwrap_err(), Errno::EROFS);
    assert_eq!(fs.unlink(ROOT, b"kept").unwrap_err(), Errno::EROFS);
    // Reads go on.
    same(&read_all(&fs, kept), &pattern(1, 0, 200_000));
    assert!(
        fs.shutdown().is_err(),
        "unmount of a failed filesystem reported success"
    );
    drop(fs);
    let fs = rig.open();
    assert_eq!(
        read_all(&fs, lookup(&fs, ROOT, "kept").unwrap().ino),
        pattern(1, 0, 200_000)
    );
}

#[test]
fn an_unknown_commit_outcome_never_gives_its_space_out_again() {
    let rig = Rig::small();
    let fs = rig.open();
    let ino = create(&fs, ROOT, "f");
    write_all(&fs, ino, 0, &pattern(1, 0, 8 * UNIT as usize));
    fs.fsync(ino).unwrap();
    let free_before = fs.usage().unwrap().free;
    // The rewrite's data is written; the flush before its commit fails:
    // whether the commit would have reached the disk is unknown.
    write_all(&fs, ino, 0, &pattern(2, 0, 8 * UNIT as usize));
    rig.fail(Some(Op::Flush), None, Errno::EIO);
    assert!(fs.fsync(ino).is_err());
    rig.ctl.clear();
    assert!(fs.failed());
    let free_after = fs.usage().unwrap().free;
    assert!(
        free_after <= free_before - 8 * UNIT,
        "the rewrite's space went back to use: {free_before} free before, {free_after} after"
    );
    assert_eq!(fs.write(ino, 0, b"y").unwrap_err(), Errno::EROFS);
    assert!(fs.shutdown().is_err());
    drop(fs);
    // The durable state is the old file, whole.
    let fs = rig.open();
    let ino = lookup(&fs, ROOT, "f").unwrap().ino;
    same(&read_all(&fs, ino), &pattern(1, 0, 8 * UNIT as usize));
}

#[test]
fn a_data_write_error_keeps_the_data_for_a_later_flush() {
    let rig = Rig::small();
    let fs = rig.open();
    let ino = create(&fs, ROOT, "f");
    write_all(&fs, ino, 0, &pattern(4, 0, 300_000));
    rig.fail(Some(Op::Write), rig.data_range(), Errno::EIO);
    assert_eq!(fs.fsync(ino).unwrap_err(), Errno::EIO);
    assert!(!fs.failed(), "a refused data write is not a failed commit");
    rig.ctl.clear();
    fs.fsync(ino).unwrap();
    let fs = rig.crash(fs);
    let ino = lookup(&fs, ROOT, "f").unwrap().ino;
    same(&read_all(&fs, ino), &pattern(4, 0, 300_000));
}

#[test]
fn unmount_never_reports_success_after_failing_to_write_data() {
    let rig = Rig::small();
    let fs = rig.open();
    let a = create(&fs, ROOT, "a");
    write_all(&fs, a, 0, &pattern(5, 0, 100_000));
    fs.release(a).unwrap();
    rig.fail(Some(Op::Write), rig.data_range(), Errno::EIO);
    let first = fs.shutdown();
    assert_eq!(first, Err(Errno::EIO), "unmount reported success");
    assert_eq!(fs.shutdown(), first, "a second call forgot the failure");
}

#[test]
fn the_commit_thread_makes_writes_durable_within_its_interval() {
    let rig = Rig::small();
    let fs = Arc::new(rig.open());
    let committer = fs.commit_every(Duration::from_millis(50)).unwrap();
    let ino = create(&fs, ROOT, "f");
    write_all(&fs, ino, 0, &pattern(7, 0, 150_000));
    fs.release(ino).unwrap();
    // No fsync: the thread's group commit is what makes it durable.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while fs.has_undurable() {
        assert!(
            std::time::Instant::now() < deadline,
            "nothing was committed"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    drop(committer);
    let fs = rig.crash(Arc::into_inner(fs).expect("the thread let go"));
    let ino = lookup(&fs, ROOT, "f").expect("the file was committed").ino;
    same(&read_all(&fs, ino), &pattern(7, 0, 150_000));
}

#[test]
fn a_timed_out_write_keeps_its_space_until_the_next_mount() {
    let mut rig = Rig::small();
    rig.timeout = Some(Duration::from_millis(200));
    let fs = rig.open();
    let ino = create(&fs, ROOT, "f");
    write_all(&fs, ino, 0, &pattern(1, 0, 4 * UNIT as usize));
    fs.fsync(ino).unwrap();
    let free_before = fs.usage().unwrap().free;
    write_all(&fs, ino, 0, &pattern(2, 0, 4 * UNIT as usize));
    // The device stops answering writes: the watchdog fails them (the
    // requests below may still land later) and faults the member.
    rig.ctl.add_rule(FaultRule {
        range: rig.data_range(),
        ..FaultRule::new(Some(Op::Write), FaultAction::Hang)
    });
    assert_eq!(fs.fsync(ino).unwrap_err(), Errno::EIO);
    assert!(
        fs.failed(),
        "a member that stopped answering is not faulted"
    );
    let free_after = fs.usage().unwrap().free;
    assert!(
        free_after <= free_before - 4 * UNIT,
        "the timed-out writes' space went back to use: {free_before} free before, {free_after} after"
    );
    // The late writes land; nothing was committed over the old data.
    rig.release();
    drop(fs);
    let fs = rig.open();
    let ino = lookup(&fs, ROOT, "f").unwrap().ino;
    same(&read_all(&fs, ino), &pattern(1, 0, 4 * UNIT as usize));
}

#[test]
fn times_written_back_for_a_removed_file_are_not_an_error() {
    let rig = Rig::small();
    let fs = rig.open();
    let ino = create(&fs, ROOT, "f");
    fs.write(ino, 0, b"x").unwrap();
    fs.release(ino).unwrap();
    fs.unlink(ROOT, b"f").unwrap();
    let t = Ts {
        sec: 1_000_000,
        nsec: 0,
    };
    let times = SetAttr {
        mtime: Some(t),
        ctime: Some(t),
        ..SetAttr::default()
    };
    assert_eq!(fs.setattr(ino, times).unwrap().nlink, 0);
    // Anything else about it is still an error.
    let chmod = SetAttr {
        mode: Some(0o600),
        ..SetAttr::default()
    };
    assert_eq!(fs.setattr(ino, chmod).unwrap_err(), Errno(libc::ENOENT));
    fs.forget(ino, 1);
    assert_eq!(fs.setattr(ino, times).unwrap_err(), Errno(libc::ENOENT));
}

#[test]
fn a_writer_waking_the_commit_thread_under_the_lock_does_not_deadlock() {
    let rig = Rig::small();
    let fs = Arc::new(rig.open());
    let committer = fs.commit_every(Duration::from_millis(1)).unwrap();
    let (done, finished) = std::sync::mpsc::channel();
    let writer = fs.clone();
    std::thread::spawn(move || {
        // As `write` does past the write-back mark: the filesystem lock is
        // held while the commit thread is woken. Meanwhile the thread's
        // periodic check (every 1 ms) wants the filesystem lock.
        let state = writer.state.lock();
        std::thread::sleep(Duration::from_millis(50));
        writer.kick_writeback();
        drop(state);
        let _ = done.send(());
    });
    if finished.recv_timeout(Duration::from_secs(10)).is_err() {
        // Dropping it would join a deadlocked thread: fail instead of hang.
        std::mem::forget(committer);
        panic!("the writer and the commit thread deadlocked");
    }
    drop(committer);
}

#[test]
fn a_failed_filesystem_leaves_its_commit_thread_waiting() {
    let rig = Rig::small();
    let fs = Arc::new(rig.open());
    let committer = fs.commit_every(Duration::from_secs(3600)).unwrap();
    fs.fail("a failure for the test".into());
    // Asked for work it cannot do: it drops the requests and waits again,
    // rather than spinning on them.
    assert!(fs.kick_writeback());
    assert!(fs.ask_group_commit());
    let signal = fs.writeback.lock().clone().expect("the thread's signal");
    let until = std::time::Instant::now() + Duration::from_secs(10);
    let waits = loop {
        // A spinning thread never lets go of its wake-up lock.
        match signal.0.try_lock_for(Duration::from_millis(100)) {
            Some(asked) if !asked.dirty && !asked.group => break true,
            _ if std::time::Instant::now() >= until => break false,
            _ => std::thread::sleep(Duration::from_millis(1)),
        }
    };
    if !waits {
        // Dropping it would join a spinning thread: fail instead of hang.
        std::mem::forget(committer);
        panic!("the commit thread keeps requests it cannot serve, and never waits");
    }
    drop(committer);
}
