//! Self-healing reads through a mirror: the filesystem's CRC (or crypt's
//! MAC) finds a bad copy, the read is retried on the other copy, and the
//! mirror rewrites the bad one.

use super::*;

/// Write files, then garbage over every other block of the first 2 MiB of
/// the data region of copy 0 (the copy reads go to first).
fn damaged_copy(layers: Layers) -> (Rig, Vec<Vec<u8>>) {
    let rig = Rig::mirrored(layers, 48 << 20, 8 << 20);
    let fs = rig.open();
    let files: Vec<Vec<u8>> = (0..24)
        .map(|i| pattern(i as u8, 0, 20_000 + i * 9_000))
        .collect();
    for (i, data) in files.iter().enumerate() {
        let ino = create(&fs, ROOT, &format!("f{i}"));
        write_all(&fs, ino, 0, data);
        fs.release(ino).unwrap();
    }
    fs.shutdown().unwrap();
    drop(fs);
    let garbage = Buf::copy_from(&pattern(99, 0, 4096));
    let copy = rig.mem.clone() as Arc<dyn Layer>;
    for block in (rig.meta_len..rig.meta_len + (2 << 20)).step_by(8192) {
        stackfs_layers::submit_wait(&*copy, Op::Write, block, garbage.clone()).unwrap();
    }
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
        let rig = Rig::mirrored(layers, 48 << 20, 8 << 20);
        let fs = rig.open();
        let files: Vec<Vec<u8>> = (0..40)
            .map(|i| pattern(i as u8, 0, 3_000 + i * 100))
            .collect();
        for (i, data) in files.iter().enumerate() {
            let ino = create(&fs, ROOT, &format!("f{i}"));
            write_all(&fs, ino, 0, data);
            fs.release(ino).unwrap();
        }
        fs.shutdown().unwrap();
        drop(fs);
        // Garbage over every other 4 KiB of copy 0's metadata region,
        // both root slots included.
        let garbage = Buf::copy_from(&pattern(77, 0, 4096));
        let copy = rig.mem.clone() as Arc<dyn Layer>;
        for block in (0..rig.meta_len).step_by(8192) {
            stackfs_layers::submit_wait(&*copy, Op::Write, block, garbage.clone()).unwrap();
        }
        let fs = rig.open();
        for (i, data) in files.iter().enumerate() {
            let ino = lookup(&fs, ROOT, &format!("f{i}")).unwrap().ino;
            same(&read_all(&fs, ino), data);
        }
        let repairs = fs.stack.health.members()[0].repairs;
        assert!(repairs > 0, "{layers:?}: no metadata slot was repaired");
    }
}
