//! Running out of space: fragmented data space and a full metadata region
//! are ENOSPC where the data is offered, never after it was accepted.

use super::*;

/// A pool whose free space is only holes too small for a whole unit.
fn fragmented() -> (Rig, Fs) {
    // 4 MiB of data space: 64 units.
    let rig = Rig::new(Layers::Plain, (8 << 20) + (4 << 20), 8 << 20);
    let fs = rig.open();
    // 28 KiB and 32 KiB files in turn, then the 28 KiB ones removed: 60
    // KiB pieces never line up into 64 KiB.
    let mut n = 0;
    loop {
        let name = format!("f{n}");
        let ino = create(&fs, ROOT, &name);
        let len = if n % 2 == 0 { 28 << 10 } else { 32 << 10 };
        if fs.write(ino, 0, &pattern(n as u8, 0, len)).is_err() {
            fs.unlink(ROOT, name.as_bytes()).unwrap();
            break;
        }
        fs.release(ino).unwrap();
        n += 1;
        if n % 16 == 0 && fs.sync().is_err() {
            break;
        }
    }
    fs.sync().ok();
    for i in (0..n).step_by(2) {
        fs.unlink(ROOT, format!("f{i}").as_bytes()).unwrap();
    }
    fs.sync().unwrap();
    (rig, fs)
}

#[test]
fn enospc_by_fragmentation_is_reported_at_write() {
    let (rig, fs) = fragmented();
    let free = fs.usage().unwrap().free;
    assert!(free > 1 << 20, "the removals freed {free} bytes");
    let ino = create(&fs, ROOT, "big");
    let mut accepted = 0u64;
    let data = pattern(9, 0, UNIT as usize);
    loop {
        match fs.write(ino, accepted, &data) {
            Ok(_) => accepted += UNIT,
            Err(e) => {
                assert_eq!(e, Errno(libc::ENOSPC), "write failed with {e}");
                break;
            }
        }
        assert!(accepted < 64 * UNIT, "writes never ran out of space");
    }
    // Everything accepted is written.
    fs.fsync(ino).expect("fsync of accepted data");
    // Small files still fit in the holes.
    let small = create(&fs, ROOT, "small");
    write_all(&fs, small, 0, &pattern(10, 0, 8192));
    fs.fsync(small).expect("a small file in fragmented space");
    let fs = rig.crash(fs);
    let ino = lookup(&fs, ROOT, "big").unwrap().ino;
    let got = read_all(&fs, ino);
    assert_eq!(got.len() as u64, accepted);
    for unit in got.chunks(UNIT as usize) {
        same(unit, &data);
    }
}

#[test]
fn a_full_metadata_region_is_enospc_and_nothing_else_is_lost() {
    // A small metadata region: it fills after some thousands of names.
    let rig = Rig::new(Layers::Plain, 64 << 20, 2 << 20);
    let fs = rig.open();
    let dir = fs
        .mknod(ME, ROOT, b"d", libc::S_IFDIR | 0o755, 0, 0, None)
        .unwrap()
        .ino;
    let long = "n".repeat(200);
    let mut made = 0usize;
    let refused = loop {
        let name = format!("{long}{made}");
        match fs.mknod(ME, dir, name.as_bytes(), libc::S_IFREG | 0o644, 0, 0, None) {
            Ok(_) => made += 1,
            Err(e) => break e,
        }
        assert!(made < 1_000_000, "the metadata region never filled");
    };
    assert_eq!(refused, Errno(libc::ENOSPC), "after {made} files");
    assert!(!fs.failed(), "{:?}", fs.failure());
    // Removing names makes room again.
    for i in 0..made / 2 {
        fs.unlink(dir, format!("{long}{i}").as_bytes()).unwrap();
    }
    fs.sync().unwrap();
    let again = fs.mknod(ME, dir, b"again", libc::S_IFREG | 0o644, 0, 0, None);
    assert!(again.is_ok(), "no room after removing half: {again:?}");
    let fs = rig.crash(fs);
    // Every name whose creation succeeded and was not removed is there.
    for i in (made / 2..made).step_by(97) {
        assert!(
            lookup(&fs, dir, &format!("{long}{i}")).is_some(),
            "file {i} is lost"
        );
    }
    assert!(lookup(&fs, dir, "again").is_some());
}
