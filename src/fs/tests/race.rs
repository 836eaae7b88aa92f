//! Reads racing rewrites and durable commits: space freed by a commit is
//! not reused while a read that looked up the old extent is in flight (the
//! free generations), so every read sees one whole version of a unit.

use super::*;
use std::sync::atomic::AtomicBool;

const UNITS: u64 = 8;

fn version(v: u8, unit: u64) -> Vec<u8> {
    vec![v.wrapping_mul(7).wrapping_add(unit as u8) | 1; UNIT as usize]
}

fn rewrites_race_reads(layers: Layers) {
    let rig = Rig::new(layers, 24 << 20, 8 << 20);
    let fs = Arc::new(rig.open());
    let ino = create(&fs, ROOT, "f");
    for u in 0..UNITS {
        write_all(&fs, ino, u * UNIT, &version(0, u));
    }
    fs.fsync(ino).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let readers: Vec<_> = (0..2)
        .map(|r| {
            let (fs, stop) = (fs.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut reads = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let u = (reads * 3 + r) % UNITS;
                    let got = fs.read(ino, u * UNIT, UNIT as u32).expect("read");
                    let v = (0..=255u8).find(|v| got == version(*v, u));
                    assert!(v.is_some(), "unit {u}: a read saw no whole version");
                    reads += 1;
                }
                reads
            })
        })
        .collect();
    // The pool has room for about three copies of the file: space is
    // reused all the time.
    for v in 1..=120u8 {
        for u in 0..UNITS {
            fs.write(ino, u * UNIT, &version(v, u)).unwrap();
        }
        fs.fsync(ino).unwrap();
    }
    stop.store(true, Ordering::Relaxed);
    let reads: u64 = readers.into_iter().map(|t| t.join().unwrap()).sum();
    assert!(reads > 0);
}

#[test]
fn reads_racing_rewrites_and_durable_commits_see_whole_versions() {
    rewrites_race_reads(Layers::Plain);
}

#[test]
fn the_same_through_compression_and_encryption() {
    rewrites_race_reads(Layers::Default);
}
