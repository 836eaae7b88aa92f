//! Self-healing reads through a mirror: the filesystem's CRC (or crypt's
//! MAC) finds a bad copy, the read is retried on the other copy, and the
//! mirror rewrites the bad one.

use super::*;

/// A mirrored pool holding `n` files of `len(i)` bytes, unmounted.
fn mirrored_files(layers: Layers, n: usize, len: fn(usize) -> usize) -> (Rig, Vec<Vec<u8>>) {
    let rig = Rig::mirrored(layers, 48 << 20, 8 << 20);
    let fs = rig.open();
    let files: Vec<Vec<u8>> = (0..n).map(|i| pattern(i as u8, 0, len(i))).collect();
    for (i, data) in files.iter().enumerate() {
        let ino = create(&fs, ROOT, &format!("f{i}"));
        write_all(&fs, ino, 0, data);
        fs.release(ino).unwrap();
    }
    fs.shutdown().unwrap();
    (rig, files)
}

/// Garbage over every other 4 KiB block of `range` of copy 0 (the copy
/// reads go to first).
fn damage_copy_0(rig: &Rig, range: std::ops::Range<u64>) {
    let garbage = Buf::copy_from(&pattern(99, 0, 4096));
    let copy = rig.mem.clone() as Arc<dyn Layer>;
    for block in range.step_by(8192) {
        stackfs_layers::submit_wait(&*copy, Op::Write, block, garbage.clone()).unwrap();
    }
}

/// Files, then the first 2 MiB of copy 0's data region damaged.
fn damaged_copy(layers: Layers) -> (Rig, Vec<Vec<u8>>) {
    let (rig, files) = mirrored_files(layers, 24, |i| 20_000 + i * 9_000);
    damage_copy_0(&rig, rig.meta_len..rig.meta_len + (2 << 20));
    (rig, files)
}

fn reads_heal(layers: Layers) {
    let (rig, files) = damaged_copy(layers);
    let fs = rig.open();
    let check_all = |fs: &Fs| {
        for (i, data) in files.iter().enumerate() {
            let ino = lookup(fs, ROOT, &format!("f{i}")).unwrap().ino;
            same(&read_all(fs, ino), data);
        }
    };
    // Reads that skip the cache: every unit comes from a copy.
    check_all(&fs);
    let repaired = fs.stack.health.members()[0].repairs;
    assert!(repaired > 0, "nothing was repaired on the damaged copy");
    drop(fs);
    // The damaged copy was rewritten: a second pass finds nothing to repair.
    let fs = rig.open();
    check_all(&fs);
    let again: u64 = fs.stack.health.members().iter().map(|m| m.repairs).sum();
    assert_eq!(again, 0, "a second read repaired again");
}

#[test]
fn a_bad_copy_is_read_from_the_other_and_repaired() {
    reads_heal(Layers::Plain);
}

#[test]
fn the_same_with_crypt_as_the_verifier() {
    reads_heal(Layers::Default);
}

#[test]
fn a_damaged_copy_of_the_metadata_is_read_from_the_other_and_repaired() {
    for layers in [Layers::Plain, Layers::Default] {
        let (rig, files) = mirrored_files(layers, 40, |i| 3_000 + i * 100);
        // Copy 0's metadata region, both root slots included.
        damage_copy_0(&rig, 0..rig.meta_len);
        let fs = rig.open();
        for (i, data) in files.iter().enumerate() {
            let ino = lookup(&fs, ROOT, &format!("f{i}")).unwrap().ino;
            same(&read_all(&fs, ino), data);
        }
        let repairs = fs.stack.health.members()[0].repairs;
        assert!(repairs > 0, "{layers:?}: no metadata slot was repaired");
    }
}
