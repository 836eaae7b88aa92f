//! Resync of a member that missed writes, cut by a power failure at many
//! points: nothing is lost, the resync goes on from its last saved cursor,
//! and at its end the member's copy is whole.

use super::*;
use crate::rebuild::{Jobs, Recorder};
use crate::superblock::MemberStates;

/// A mirrored pool whose copy 1 missed the writes of half its files (its
/// writes failed, as on a member gone missing): the files and the record
/// that says so.
fn stale_copy(rig: &Rig) -> (Vec<Vec<u8>>, MemberStates) {
    let fs = rig.open();
    let mut files = Vec::new();
    for i in 0..12 {
        if i == 6 {
            // From here on, member 1 gets no write.
            let mut rule = FaultRule::new(Some(Op::Write), FaultAction::Error(Errno::EIO));
            rule.dev = Some(1);
            rig.ctl.add_rule(rule);
        }
        let data = pattern(i as u8 + 1, 0, 400_000 + i * 60_000);
        let ino = create(&fs, ROOT, &format!("f{i}"));
        write_all(&fs, ino, 0, &data);
        fs.fsync(ino).unwrap();
        fs.release(ino).unwrap();
        files.push(data);
    }
    assert!(
        fs.stack.health.is_faulted(1),
        "member 1 should have faulted"
    );
    fs.shutdown().unwrap();
    rig.ctl.clear();
    let states = MemberStates {
        seq: 1,
        stale: vec![(1, 0)],
        replace: None,
    };
    (files, states)
}

/// A record kept in memory, lost while the power is cut (as superblock
/// writes would be).
fn recorder(rig: &Rig, kept: &Arc<Mutex<MemberStates>>) -> Recorder {
    let (ctl, kept) = (rig.ctl.clone(), kept.clone());
    Box::new(move |_, states, _| {
        if ctl.is_power_cut() {
            return Err("power cut".into());
        }
        *kept.lock() = states.clone();
        Ok(())
    })
}

/// Open the pool with member 1 resyncing per the record, and run the jobs
/// once (the resync), with the power cut after `cut` more writes.
fn resync_once(rig: &Rig, kept: &Arc<Mutex<MemberStates>>, cut: Option<u64>) -> Arc<Fs> {
    let fs = Arc::new(rig.open());
    if let Some(n) = cut {
        rig.ctl.cut_after_writes(n);
    }
    let states = kept.lock().clone();
    if states.is_stale(1) {
        fs.stack.health.set_resyncing(1, true);
    }
    let jobs = Jobs::new(&fs, states, Vec::new(), recorder(rig, kept));
    jobs.set_checkpoint_every(Duration::ZERO);
    jobs.step();
    fs
}

fn check_files(fs: &Fs, files: &[Vec<u8>]) {
    for (i, data) in files.iter().enumerate() {
        let ino = lookup(fs, ROOT, &format!("f{i}")).unwrap().ino;
        same(&read_all(fs, ino), data);
    }
}

#[test]
fn a_resync_finishes_and_the_copy_is_whole() {
    let rig = Rig::mirrored(Layers::Plain, 48 << 20, 8 << 20);
    let (files, states) = stale_copy(&rig);
    let kept = Arc::new(Mutex::new(states));
    let fs = resync_once(&rig, &kept, None);
    assert!(kept.lock().stale.is_empty(), "{:?}", kept.lock());
    assert!(!fs.stack.health.is_resyncing(1));
    let check = fs
        .walk_data(CopyWalk::Check { copy: 1 }, 0, &mut |_| true)
        .unwrap();
    assert_eq!(check.bad, 0, "{check:?}");
    check_files(&fs, &files);
}

#[test]
fn power_cuts_at_50_points_of_a_resync_lose_nothing_and_it_resumes() {
    // How many writes a whole resync makes.
    let rig = Rig::mirrored(Layers::Plain, 48 << 20, 8 << 20);
    let (_, states) = stale_copy(&rig);
    let before = rig.ctl.written.load(Ordering::SeqCst);
    drop(resync_once(&rig, &Arc::new(Mutex::new(states)), None));
    let writes = rig.ctl.written.load(Ordering::SeqCst) - before;
    assert!(
        writes >= 50,
        "a resync of {writes} writes is too small to cut 50 times"
    );
    for point in 0..50u64 {
        let cut = point * writes / 50;
        let rig = Rig::mirrored(Layers::Plain, 48 << 20, 8 << 20);
        let (files, states) = stale_copy(&rig);
        let kept = Arc::new(Mutex::new(states));
        let fs = resync_once(&rig, &kept, Some(cut));
        let saved = kept.lock().clone();
        let fs = Arc::try_unwrap(fs).unwrap_or_else(|_| panic!("fs still shared"));
        drop(rig.crash(fs));
        // After the cut: still stale unless the resync was recorded done.
        let fs = resync_once(&rig, &kept, None);
        assert!(
            kept.lock().stale.is_empty(),
            "cut {cut}: the resync did not finish ({:?}, saved {saved:?})",
            kept.lock()
        );
        let check = fs
            .walk_data(CopyWalk::Check { copy: 1 }, 0, &mut |_| true)
            .unwrap();
        assert_eq!(check.bad, 0, "cut {cut} (saved {saved:?}): {check:?}");
        check_files(&fs, &files);
    }
}
