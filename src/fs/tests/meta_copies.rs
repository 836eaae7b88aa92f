//! The metadata store over mirror copies: the root is taken from the copy
//! holding the newest.

use super::*;

/// Files `f{from}`.. `f{from + n - 1}`, committed durably.
fn add_files(fs: &Fs, from: usize, n: usize) {
    for i in from..from + n {
        let ino = create(fs, ROOT, &format!("f{i}"));
        write_all(fs, ino, 0, &pattern(i as u8, 0, 5000 + i * 100));
        fs.release(ino).unwrap();
    }
    fs.sync().unwrap();
}

/// Files `f0`.. `f{n - 1}` are there, with their bytes.
fn check_files(fs: &Fs, n: usize) {
    for i in 0..n {
        let ino = lookup(fs, ROOT, &format!("f{i}"))
            .unwrap_or_else(|| panic!("f{i} is missing"))
            .ino;
        same(&read_all(fs, ino), &pattern(i as u8, 0, 5000 + i * 100));
    }
}

/// A copy faulted while the filesystem runs (its writes fail) misses the
/// last commits; back after a restart, it holds an older root, valid. The
/// newest root is taken whichever copy reads would go to first, and in
/// whichever slot it is (1 to 3 commits missed).
#[test]
fn the_newest_root_is_taken_from_whichever_copy_holds_it() {
    for (stale, missed) in [0, 1]
        .into_iter()
        .flat_map(|c| (1..=3).map(move |m| (c, m)))
    {
        let rig = Rig::mirrored(Layers::Plain, 48 << 20, 8 << 20);
        let fs = rig.open();
        add_files(&fs, 0, 3);
        let mut rule = FaultRule::new(Some(Op::Write), FaultAction::Error(Errno::EIO));
        rule.dev = Some(stale);
        rig.ctl.add_rule(rule);
        for i in 0..missed {
            add_files(&fs, 3 + i, 1);
        }
        assert!(fs.stack.health.is_faulted(stale), "copy {stale} faulted");
        // Gone without an unmount: the last commit is the last sync's.
        rig.ctl.cut_power();
        drop(fs);
        let fs = rig.open();
        let case = format!("copy {stale} missed {missed} commit(s)");
        assert!(fs.store.lock().fell_back().is_none(), "{case}");
        check_files(&fs, 3 + missed);
        let extra = lookup(&fs, ROOT, &format!("f{}", 3 + missed));
        assert!(extra.is_none(), "{case}");
        fs.shutdown().unwrap();
    }
}
