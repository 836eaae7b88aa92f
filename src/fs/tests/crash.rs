//! Power cuts after metadata-only operations on a file whose data is still
//! in memory: a size may never be committed ahead of its data.

use super::*;

const OLD: u64 = 3 * UNIT;
const NEW_AT: u64 = OLD - 1000;
const NEW_END: u64 = 6 * UNIT;

/// A metadata-only operation on file `ino` (named "a", also linked as "a2",
/// in the root), and the byte range it may legitimately turn to zeros.
type Op = (&'static str, fn(&Fs, u64), Option<(u64, u64)>);

const KEEP_SIZE: i32 = libc::FALLOC_FL_KEEP_SIZE;

fn ops() -> Vec<Op> {
    vec![
        (
            "chmod",
            |fs, ino| {
                fs.setattr(
                    ino,
                    SetAttr {
                        mode: Some(0o600),
                        ..SetAttr::default()
                    },
                )
                .map(drop)
                .unwrap()
            },
            None,
        ),
        (
            "chown",
            |fs, ino| {
                fs.setattr(
                    ino,
                    SetAttr {
                        uid: Some(7),
                        gid: Some(7),
                        ..SetAttr::default()
                    },
                )
                .map(drop)
                .unwrap()
            },
            None,
        ),
        (
            "link",
            |fs, ino| fs.link(ino, ROOT, b"a3").map(drop).unwrap(),
            None,
        ),
        (
            "unlink one of two links",
            |fs, _| fs.unlink(ROOT, b"a2").unwrap(),
            None,
        ),
        (
            "setxattr",
            |fs, ino| fs.setxattr(ino, b"user.k", b"v", 0).unwrap(),
            None,
        ),
        (
            "removexattr",
            |fs, ino| fs.removexattr(ino, b"user.old").unwrap(),
            None,
        ),
        (
            "punch a hole",
            |fs, ino| {
                fs.fallocate(ino, 0, UNIT, libc::FALLOC_FL_PUNCH_HOLE | KEEP_SIZE)
                    .unwrap()
            },
            Some((0, UNIT)),
        ),
        (
            "zero a range",
            |fs, ino| {
                fs.fallocate(ino, UNIT, UNIT, libc::FALLOC_FL_ZERO_RANGE | KEEP_SIZE)
                    .unwrap()
            },
            Some((UNIT, 2 * UNIT)),
        ),
    ]
}

/// The file as it was durably (OLD bytes of pattern 1), then pattern 2
/// written over `NEW_AT..NEW_END` and kept in memory (the file stays open).
fn prepare(fs: &Fs) -> u64 {
    let ino = create(fs, ROOT, "a");
    fs.link(ino, ROOT, b"a2").unwrap();
    fs.setxattr(ino, b"user.old", b"x", 0).unwrap();
    write_all(fs, ino, 0, &pattern(1, 0, OLD as usize));
    fs.fsync(ino).unwrap();
    fs.open_file(ino).unwrap();
    ino
}

/// Dirty data, the operation, and a durable commit of something else.
fn after_the_durable_point(fs: &Fs, ino: u64, op: fn(&Fs, u64)) -> ErrnoResult<()> {
    fs.write(
        ino,
        NEW_AT,
        &pattern(2, NEW_AT, (NEW_END - NEW_AT) as usize),
    )?;
    op(fs, ino);
    let other = fs
        .mknod(ME, ROOT, b"b", libc::S_IFREG | 0o644, 0, 0, None)?
        .ino;
    fs.fsync(other)
}

/// What the crash left: the old file, or the new one; a byte is never
/// zero except where the operation made zeros.
fn check(fs: &Fs, what: &str, zeros: Option<(u64, u64)>) {
    let name = if what == "unlink one of two links" {
        "a"
    } else {
        "a2"
    };
    let ino = lookup(fs, ROOT, name)
        .or_else(|| lookup(fs, ROOT, "a"))
        .unwrap_or_else(|| panic!("{what}: the file is gone"))
        .ino;
    let data = read_all(fs, ino);
    let size = data.len() as u64;
    assert!(
        size == OLD || size == NEW_END,
        "{what}: size {size} after the crash"
    );
    let (old, new) = (
        pattern(1, 0, OLD as usize),
        pattern(2, NEW_AT, (NEW_END - NEW_AT) as usize),
    );
    for (i, b) in data.iter().enumerate() {
        let i = i as u64;
        let was = (i < OLD).then(|| old[i as usize]);
        let now = (i >= NEW_AT).then(|| new[(i - NEW_AT) as usize]);
        let zero_ok = zeros.is_some_and(|(s, e)| (s..e).contains(&i));
        assert!(
            Some(*b) == was || Some(*b) == now || (zero_ok && *b == 0),
            "{what}: byte {i} of {size} is {b}, neither the old nor the new data"
        );
    }
}

#[test]
fn metadata_only_operations_never_commit_a_size_ahead_of_its_data() {
    for (what, op, zeros) in ops() {
        let rig = Rig::small();
        let fs = rig.open();
        let ino = prepare(&fs);
        after_the_durable_point(&fs, ino, op).unwrap();
        let fs = rig.crash(fs);
        check(&fs, what, zeros);
    }
}

#[test]
fn a_power_cut_at_every_write_after_metadata_only_operations() {
    for (what, op, zeros) in ops()
        .into_iter()
        .filter(|o| ["chmod", "punch a hole"].contains(&o.0))
    {
        // How many writes the phase makes, then a cut before each of them.
        let writes = {
            let rig = Rig::small();
            let fs = rig.open();
            let ino = prepare(&fs);
            let before = rig.ctl.written.load(Ordering::SeqCst);
            after_the_durable_point(&fs, ino, op).unwrap();
            rig.ctl.written.load(Ordering::SeqCst) - before
        };
        assert!(writes > 0, "{what}: the phase wrote nothing");
        for n in 0..=writes {
            let rig = Rig::small();
            let fs = rig.open();
            let ino = prepare(&fs);
            rig.ctl.cut_after_writes(n);
            let _ = after_the_durable_point(&fs, ino, op);
            let fs = rig.crash(fs);
            check(
                &fs,
                &format!("{what}, cut after {n} of {writes} writes"),
                zeros,
            );
        }
    }
}

#[test]
fn a_truncate_that_reached_the_disk_never_brings_old_bytes_back() {
    let rig = Rig::small();
    let fs = rig.open();
    let ino = create(&fs, ROOT, "t");
    write_all(&fs, ino, 0, &pattern(3, 0, 100_000));
    fs.fsync(ino).unwrap();
    // Shorten into the second unit, commit that, crash before the unit's
    // zeroed tail is written.
    fs.setattr(
        ino,
        SetAttr {
            size: Some(70_000),
            ..SetAttr::default()
        },
    )
    .unwrap();
    let other = create(&fs, ROOT, "o");
    fs.fsync(other).unwrap();
    let fs = rig.crash(fs);
    let ino = lookup(&fs, ROOT, "t").unwrap().ino;
    let size = fs.getattr(ino).unwrap().size;
    assert!(size == 70_000 || size == 100_000, "size {size}");
    // Longer again: what lay past the end must read as zeros.
    fs.setattr(
        ino,
        SetAttr {
            size: Some(100_000),
            ..SetAttr::default()
        },
    )
    .unwrap();
    let data = read_all(&fs, ino);
    if size == 70_000 {
        assert!(
            data[70_000..].iter().all(|b| *b == 0),
            "old bytes came back past the end"
        );
    }
    same(&data[..70_000], &pattern(3, 0, 70_000));
}

#[test]
fn times_kept_in_memory_are_committed_with_the_data() {
    let rig = Rig::small();
    let fs = rig.open();
    let ino = create(&fs, ROOT, "g");
    fs.write(ino, 0, b"data").unwrap();
    let old = Ts {
        sec: 946_684_800,
        nsec: 0,
    };
    // A times-only setattr joins the file's inode in memory.
    fs.setattr(
        ino,
        SetAttr {
            atime: Some(old),
            ..SetAttr::default()
        },
    )
    .unwrap();
    fs.write(ino, 4, b"more").unwrap();
    let mtime = fs.getattr(ino).unwrap().mtime;
    fs.shutdown().unwrap();
    drop(fs);
    let fs = rig.open();
    let got = lookup(&fs, ROOT, "g").unwrap();
    assert_eq!((got.atime, got.mtime, got.size), (old, mtime, 8));
}
