//! fsck over a filesystem in memory: damage made in its tables is found,
//! repaired, and gone on the next check.

use super::*;
use crate::fs::{dirent_val, FsOptions, Geometry};
use redb::WriteTransaction;
use stackfs_layers::spec::Stack;
use stackfs_layers::watchdog::Health;
use stackfs_layers::{Layer, Mem};
use std::sync::Arc;

/// A new filesystem over a memory device, without superblocks.
fn mem_fs() -> Fs {
    let mem: Arc<dyn Layer> = Arc::new(Mem::new(64 << 20));
    let stack = || Stack {
        top: mem.clone(),
        meta: mem.clone(),
        fault: None,
        health: Health::new(vec!["mem".into()]),
        bays: Vec::new(),
    };
    let geometry = Geometry {
        meta_len: 8 << 20,
        pool_uuid: [9; 16],
    };
    Fs::format(&stack(), geometry).expect("format");
    Fs::open_on(stack(), geometry, FsOptions::default()).expect("open")
}

fn add_inode(tx: &WriteTransaction, inode: &Inode) {
    tx.open_table(INODES)
        .unwrap()
        .insert(inode.ino, inode.encode().as_slice())
        .unwrap();
}

fn add_entry(tx: &WriteTransaction, parent: u64, name: &[u8], ino: u64, kind: Kind, cookie: u64) {
    tx.open_table(DIRENTS)
        .unwrap()
        .insert((parent, name), dirent_val(ino, kind, cookie).as_slice())
        .unwrap();
    tx.open_table(COOKIES)
        .unwrap()
        .insert((parent, cookie), name)
        .unwrap();
}

/// The inode an entry names, if there is the entry.
fn lookup(fs: &Fs, parent: u64, name: &[u8]) -> Option<u64> {
    let rtx = fs.db().begin_read().unwrap();
    let dirents = rtx.open_table(DIRENTS).unwrap();
    let found = dirents.get((parent, name)).unwrap()?;
    Some(dirent_decode(found.value()).unwrap().0)
}

#[test]
fn repair_fixes_every_fixable_problem_and_the_next_check_is_clean() {
    let fs = mem_fs();
    let none = |_: u64, _: u64| {};
    assert_eq!(check(&fs, true, false, &none).unwrap().problems, vec![]);
    let tx = fs.begin().unwrap();
    // File 500, named "f", and a directory 1000 that no entry names.
    let mut file = Inode::new_dir(500, 0o644, ROOT);
    (file.kind, file.nlink) = (Kind::File, 1);
    add_inode(&tx, &file);
    add_entry(&tx, ROOT, b"f", 500, Kind::File, 70);
    add_inode(&tx, &Inode::new_dir(1000, 0o755, ROOT));
    // An entry of an inode that does not exist.
    add_entry(&tx, ROOT, b"ghost", 5000, Kind::File, 71);
    tx.commit().unwrap();
    inject(&fs, "leaked-extent").unwrap();
    inject(&fs, "wrong-nlink").unwrap();

    let report = check(&fs, false, true, &none).unwrap();
    let want = vec![
        Problem::DanglingEntry {
            parent: ROOT,
            name: b"ghost".to_vec(),
            ino: 5000,
        },
        Problem::WrongLinkCount {
            ino: 500,
            have: 6,
            want: 1,
        },
        Problem::Unreachable { ino: 1000 },
        Problem::ExtentLeaked {
            ino: u64::MAX - 1,
            unit: 0,
        },
    ];
    assert_eq!(report.problems, want);
    assert_eq!((report.repaired, report.exit_code()), (4, CORRECTED));

    let again = check(&fs, true, false, &none).unwrap();
    assert_eq!(again.problems, vec![], "after the repair");
    assert_eq!(again.exit_code(), CLEAN);
    assert_eq!(lookup(&fs, ROOT, b"ghost"), None);
    // lost+found is numbered after the highest inode, and holds "#1000".
    assert_eq!(lookup(&fs, ROOT, b"lost+found"), Some(1001));
    assert_eq!(lookup(&fs, 1001, b"#1000"), Some(1000));
    fs.shutdown().unwrap();
}
