//! The metadata store over mirror copies: the root is taken from the copy
//! holding the newest, and a walk over every live slot of one copy checks
//! it (healing what is wrong) or rebuilds it from the other.

use super::*;
use crate::metastore::MetaStore;
use std::cell::Cell;

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

/// The store's slot pairs in use, as the durable root on disk names them
/// (a second, read-only view; the root pair last).
fn live_pairs(fs: &Fs) -> Vec<u64> {
    let g = fs.geometry;
    MetaStore::open(
        fs.stack.meta.clone(),
        g.meta_len,
        g.pool_uuid,
        true,
        fs.copies(),
    )
    .expect("a read-only view of the store")
    .live_pairs()
}

/// Garbage over `len` bytes of one copy at `addr`, behind the mirror.
fn scribble(copy: &Mem, addr: u64, len: usize) {
    let garbage = Buf::copy_from(&pattern(77, addr, len));
    stackfs_layers::submit_wait(copy, Op::Write, addr, garbage).unwrap();
}

fn walk(fs: &Fs, mode: CopyWalk) -> WalkCounts {
    let done = Cell::new(0);
    let counts = fs
        .walk_metadata(mode, &|n| done.set(done.get() + n))
        .unwrap_or_else(|e| panic!("{mode:?}: {e}"));
    assert_eq!(done.get(), counts.bytes, "{mode:?}: progress adds up");
    assert_eq!(counts.bytes, counts.items * 8192);
    counts
}

fn bad(c: &WalkCounts) -> (u64, u64, u64) {
    (c.bad, c.repaired, c.unrepaired)
}

/// Every request to copy `copy` fails with EIO (a member that is gone).
fn copy_gone(rig: &Rig, copy: usize) {
    let mut rule = FaultRule::new(None, FaultAction::Error(Errno::EIO));
    rule.dev = Some(copy);
    rig.ctl.add_rule(rule);
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

/// Live slots damaged on copy 1 only: a check of copy 1 finds each once and
/// the mirror rewrites it; a check of copy 0 finds nothing, and rewrites
/// nothing (it reads copy 0 alone, healing nothing from it).
#[test]
fn a_check_walk_finds_and_repairs_the_damage_of_one_copy() {
    for layers in [Layers::Plain, Layers::Default] {
        let rig = Rig::mirrored(layers, 48 << 20, 8 << 20);
        let fs = rig.open();
        add_files(&fs, 0, 30);
        let pairs = live_pairs(&fs);
        let (root, rest) = pairs.split_last().unwrap();
        let mut hit: Vec<u64> = rest.iter().step_by(3).take(5).copied().collect();
        hit.push(*root);
        let n = hit.len() as u64;
        for &pair in &hit {
            scribble(&rig.copies[0], pair, 16384);
        }
        let before = fs.stack.health.members();
        let c0 = walk(&fs, CopyWalk::Check { copy: 0 });
        assert_eq!(bad(&c0), (0, 0, 0), "{layers:?}: copy 0 is whole");
        assert!(c0.items > n, "{layers:?}: {c0:?}");
        let c1 = walk(&fs, CopyWalk::Check { copy: 1 });
        assert_eq!(bad(&c1), (n, n, 0), "{layers:?}");
        assert_eq!(c1.items, c0.items);
        let after = fs.stack.health.members();
        assert_eq!(after[1].checksum_errors - before[1].checksum_errors, n);
        assert_eq!(after[1].repairs - before[1].repairs, n);
        assert_eq!((after[0].repairs, after[0].checksum_errors), (0, 0));
        for copy in [1, 0] {
            let again = walk(&fs, CopyWalk::Check { copy });
            assert_eq!(bad(&again), (0, 0, 0), "{layers:?}: copy {copy} again");
        }
        check_files(&fs, 30);
        fs.shutdown().unwrap();
    }
}

/// Copy 1's metadata region zeroed (a new, blank device): a rebuild walk
/// fills it from copy 0; a check then finds it whole, and with copy 0 gone
/// the pool opens from copy 1 alone, without a fallback.
#[test]
fn a_rebuild_walk_fills_a_blank_copy() {
    for layers in [Layers::Plain, Layers::Default] {
        let rig = Rig::mirrored(layers, 48 << 20, 8 << 20);
        let fs = rig.open();
        add_files(&fs, 0, 30);
        let blank = Buf::zeroed(rig.meta_len as usize);
        stackfs_layers::submit_wait(&*rig.copies[0], Op::Write, 0, blank).unwrap();
        let before = fs.stack.health.members()[1].repairs;
        let rebuilt = walk(&fs, CopyWalk::Rebuild { copy: 1 });
        assert_eq!(bad(&rebuilt), (0, 0, 0), "{layers:?}");
        // Every live slot and the other root slot differed from zeros.
        let repairs = fs.stack.health.members()[1].repairs - before;
        assert_eq!(repairs, rebuilt.items, "{layers:?}");
        let check = walk(&fs, CopyWalk::Check { copy: 1 });
        assert_eq!(bad(&check), (0, 0, 0), "{layers:?}");
        assert_eq!(check.items + 1, rebuilt.items);
        // Nothing more reaches the pool; then copy 0 answers nothing.
        rig.ctl.cut_power();
        drop(fs);
        rig.ctl.clear();
        copy_gone(&rig, 0);
        let opts = FsOptions {
            read_only: true,
            ..FsOptions::default()
        };
        let fs = Fs::open_on(rig.stack(), rig.geometry(), opts)
            .unwrap_or_else(|e| panic!("{layers:?}: opening from copy 1 alone: {e}"));
        assert!(fs.store.lock().fell_back().is_none(), "{layers:?}");
        check_files(&fs, 30);
        assert!(fs.stack.health.members()[0].read_errors > 0);
    }
}

/// Without a mirror a check only counts: a damaged live slot is bad and
/// unrepaired. There is no copy 1, and nothing to rebuild from.
#[test]
fn without_a_mirror_a_check_only_counts() {
    let rig = Rig::small();
    let fs = rig.open();
    add_files(&fs, 0, 10);
    let clean = walk(&fs, CopyWalk::Check { copy: 0 });
    assert_eq!(bad(&clean), (0, 0, 0));
    scribble(&rig.mem, live_pairs(&fs)[0], 16384);
    let c = walk(&fs, CopyWalk::Check { copy: 0 });
    assert_eq!(bad(&c), (1, 0, 1));
    assert_eq!(c.items, clean.items);
    assert!(fs
        .walk_metadata(CopyWalk::Check { copy: 1 }, &|_| ())
        .is_err());
    assert!(fs
        .walk_metadata(CopyWalk::Rebuild { copy: 0 }, &|_| ())
        .is_err());
}

/// Commits go on while copy 1 is checked again and again: a slot whose
/// sector gets a newer version during a walk is not bad.
#[test]
fn sectors_rewritten_during_a_walk_are_not_bad() {
    let rig = Rig::mirrored(Layers::Plain, 48 << 20, 8 << 20);
    let fs = rig.open();
    add_files(&fs, 0, 20);
    let stop = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|s| {
        s.spawn(|| {
            let mut round = 0u8;
            while !stop.load(Ordering::Relaxed) {
                for i in 0..20 {
                    let ino = lookup(&fs, ROOT, &format!("f{i}")).unwrap().ino;
                    fs.write(ino, 0, &pattern(round, 0, 3000)).unwrap();
                    fs.fsync(ino).unwrap();
                }
                round = round.wrapping_add(1);
            }
        });
        // The writer stops also when a walk's assertion fails.
        let _stop = StopOnDrop(&stop);
        let mut walks = 0;
        let started = std::time::Instant::now();
        while walks < 20 || started.elapsed() < Duration::from_millis(300) {
            let c = walk(&fs, CopyWalk::Check { copy: 1 });
            assert_eq!(bad(&c), (0, 0, 0), "walk {walks}");
            walks += 1;
        }
    });
    let members = fs.stack.health.members();
    assert_eq!((members[0].repairs, members[1].repairs), (0, 0));
}

struct StopOnDrop<'a>(&'a std::sync::atomic::AtomicBool);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}
