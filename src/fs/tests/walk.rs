//! Walking the file data copy by copy (`walk_data`): a check finds and
//! repairs every bad unit of one copy once, a rebuild makes a blank copy
//! whole, and without a mirror a bad unit is reported as lost.

use super::*;

/// A mirrored pool (or a plain one) holding `n` files, open.
fn files(rig: &Rig, n: usize) -> (Fs, Vec<Vec<u8>>) {
    let fs = rig.open();
    let files: Vec<Vec<u8>> = (0..n)
        .map(|i| pattern(i as u8 + 1, 0, 30_000 + i * 7_000))
        .collect();
    for (i, data) in files.iter().enumerate() {
        let ino = create(&fs, ROOT, &format!("f{i}"));
        write_all(&fs, ino, 0, data);
        fs.fsync(ino).unwrap();
        fs.release(ino).unwrap();
    }
    (fs, files)
}

/// Garbage over the first 4 KiB of `count` units of file data on `copy`.
fn damage(copy: &Arc<Mem>, fs: &Fs, count: usize) -> usize {
    let garbage = Buf::copy_from(&pattern(200, 0, 4096));
    let mut placed: Vec<u64> = Vec::new();
    let rtx = fs.db().begin_read().unwrap();
    let t = rtx.open_table(EXTENTS).unwrap();
    for row in t.iter().unwrap() {
        let (_, v) = row.unwrap();
        placed.push(Extent::decode(v.value()).unwrap().phys);
    }
    for phys in placed.iter().take(count) {
        stackfs_layers::submit_wait(&**copy, Op::Write, *phys, garbage.clone()).unwrap();
    }
    placed.len().min(count)
}

fn walk(fs: &Fs, mode: CopyWalk) -> WalkCounts {
    fs.walk_data(mode, 0, &mut |_| true).unwrap()
}

fn check_files(fs: &Fs, files: &[Vec<u8>]) {
    for (i, data) in files.iter().enumerate() {
        let ino = lookup(fs, ROOT, &format!("f{i}")).unwrap().ino;
        same(&read_all(fs, ino), data);
    }
}

fn check_repairs_each_bad_unit_once(layers: Layers) {
    let rig = Rig::mirrored(layers, 48 << 20, 8 << 20);
    let (fs, files) = files(&rig, 12);
    let bad = damage(&rig.copies[0], &fs, 7);
    assert_eq!(bad, 7);
    // Copy 0 is whole: a check of it finds nothing.
    let clean = walk(&fs, CopyWalk::Check { copy: 0 });
    assert_eq!((clean.bad, clean.repaired), (0, 0), "{clean:?}");
    assert!(clean.items >= 12, "{clean:?}");
    let found = walk(&fs, CopyWalk::Check { copy: 1 });
    assert_eq!(
        (found.bad, found.repaired, found.unrepaired),
        (7, 7, 0),
        "{found:?}"
    );
    let member = &fs.stack.health.members()[1];
    assert_eq!((member.checksum_errors, member.repairs), (7, 7));
    // Repaired: a second check finds nothing, and every file reads intact.
    let again = walk(&fs, CopyWalk::Check { copy: 1 });
    assert_eq!(again.bad, 0, "{again:?}");
    check_files(&fs, &files);
}

#[test]
fn a_check_repairs_every_bad_unit_of_a_copy_once() {
    check_repairs_each_bad_unit_once(Layers::Plain);
}

#[test]
fn a_check_with_crypt_as_the_verifier() {
    check_repairs_each_bad_unit_once(Layers::Default);
}

#[test]
fn a_rebuild_makes_a_blank_copy_whole() {
    let rig = Rig::mirrored(Layers::Default, 48 << 20, 8 << 20);
    let (fs, files) = files(&rig, 10);
    // A new, blank device in copy 1's place (what `replace` does).
    let blank = Arc::new(Mem::new(48 << 20));
    fs.stack.bays[1].insert(blank.clone()).unwrap();
    fs.stack.health.revive(1, "blank".into());
    // Reads never go to it meanwhile.
    check_files(&fs, &files);
    let rebuilt = walk(&fs, CopyWalk::Rebuild { copy: 1 });
    assert_eq!((rebuilt.bad, rebuilt.unrepaired), (0, 0), "{rebuilt:?}");
    let units = rebuilt.items;
    assert_eq!(fs.stack.health.members()[1].repairs, units);
    fs.stack.health.set_resyncing(1, false);
    let check = walk(&fs, CopyWalk::Check { copy: 1 });
    assert_eq!((check.items, check.bad), (units, 0), "{check:?}");
    // A walk can stop and go on from its cursor.
    let mut cursor = 0;
    let mut batches = 0;
    fs.walk_data(CopyWalk::Check { copy: 1 }, 0, &mut |s| {
        cursor = s.cursor;
        batches += 1;
        false
    })
    .unwrap();
    assert_eq!(batches, 1);
    let rest = fs
        .walk_data(CopyWalk::Check { copy: 1 }, cursor, &mut |_| true)
        .unwrap();
    assert!(rest.items < units);
}

#[test]
fn without_a_mirror_a_bad_unit_is_reported_lost() {
    let rig = Rig::new(Layers::Plain, 48 << 20, 8 << 20);
    let (fs, _) = files(&rig, 4);
    assert_eq!(damage(&rig.mem, &fs, 1), 1);
    let mut lost = Vec::new();
    let counts = fs
        .walk_data(CopyWalk::Check { copy: 0 }, 0, &mut |s| {
            lost.extend_from_slice(s.lost);
            true
        })
        .unwrap();
    assert_eq!((counts.bad, counts.unrepaired), (1, 1), "{counts:?}");
    assert_eq!(lost.len(), 1);
}
