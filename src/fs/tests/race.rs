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

#[test]
fn the_filesystem_goes_on_while_a_flush_waits_for_its_writes() {
    let rig = Rig::small();
    let fs = Arc::new(rig.open());
    let dir = fs
        .mknod(ME, ROOT, b"d", libc::S_IFDIR | 0o755, 0, 0, None)
        .unwrap()
        .ino;
    let b = create(&fs, dir, "b");
    write_all(&fs, b, 0, &pattern(1, 0, 100_000));
    fs.fsync(b).unwrap();
    let a = create(&fs, ROOT, "a");
    write_all(&fs, a, 0, &pattern(2, 0, 1 << 20));
    // Data writes hang: the fsync below waits for them, lock released.
    rig.ctl.add_rule(FaultRule {
        range: rig.data_range(),
        ..FaultRule::new(Some(Op::Write), FaultAction::Hang)
    });
    let syncing = {
        let fs = fs.clone();
        std::thread::spawn(move || fs.fsync(a))
    };
    while rig.ctl.hung_count() == 0 {
        std::thread::sleep(Duration::from_millis(1));
    }
    // Everything else goes on meanwhile.
    assert_eq!(lookup(&fs, dir, "b").unwrap().ino, b);
    assert_eq!(fs.getattr(b).unwrap().size, 100_000);
    let mut names = Vec::new();
    fs.readdir(dir, 0, |e| {
        names.push(e.name.clone());
        true
    })
    .unwrap();
    assert!(names.iter().any(|n| n == b"b"), "{names:?}");
    same(&read_all(&fs, b), &pattern(1, 0, 100_000));
    fs.setattr(
        b,
        SetAttr {
            mode: Some(0o600),
            ..SetAttr::default()
        },
    )
    .unwrap();
    create(&fs, dir, "c");
    // The data being written reads back, and can be written over.
    same(&read_all(&fs, a), &pattern(2, 0, 1 << 20));
    fs.write(a, 1000, b"over the data in flight").unwrap();
    assert!(
        !syncing.is_finished(),
        "the flush did not wait for its writes"
    );
    rig.release();
    syncing.join().unwrap().unwrap();
    fs.fsync(a).unwrap();
    let fs = rig.crash(Arc::into_inner(fs).expect("one owner"));
    let a = lookup(&fs, ROOT, "a").unwrap().ino;
    let mut want = pattern(2, 0, 1 << 20);
    want[1000..1023].copy_from_slice(b"over the data in flight");
    same(&read_all(&fs, a), &want);
    let b = lookup(&fs, lookup(&fs, ROOT, "d").unwrap().ino, "b").unwrap();
    assert_eq!(b.perm, 0o600);
}

/// Cost of a create over the plain mem stack (not a test: `cargo test
/// --release -p stackfs --lib create_cost -- --ignored --nocapture`).
#[test]
#[ignore]
fn create_cost() {
    let rig = Rig::new(Layers::Plain, 2 << 30, 1 << 30);
    let fs = Arc::new(rig.open());
    let n = 20_000;
    let t = std::time::Instant::now();
    for i in 0..n {
        create(&fs, ROOT, &format!("f{i}"));
    }
    let one = t.elapsed();
    let dirs: Vec<u64> = (0..2)
        .map(|d| {
            fs.mknod(
                ME,
                ROOT,
                format!("d{d}").as_bytes(),
                libc::S_IFDIR | 0o755,
                0,
                0,
                None,
            )
            .unwrap()
            .ino
        })
        .collect();
    let t = std::time::Instant::now();
    let threads: Vec<_> = dirs
        .into_iter()
        .map(|d| {
            let fs = fs.clone();
            std::thread::spawn(move || {
                for i in 0..n / 2 {
                    create(&fs, d, &format!("f{i}"));
                }
            })
        })
        .collect();
    threads.into_iter().for_each(|t| t.join().unwrap());
    let two = t.elapsed();
    println!(
        "{n} creates: one thread {:.1} us each; two threads {:.1} us each; ratio {:.2}",
        one.as_secs_f64() * 1e6 / n as f64,
        two.as_secs_f64() * 1e6 / n as f64,
        two.as_secs_f64() / one.as_secs_f64()
    );
}

/// Cost of an empty non-durable commit (see `create_cost`).
#[test]
#[ignore]
fn commit_cost() {
    let rig = Rig::new(Layers::Plain, 2 << 30, 1 << 30);
    let fs = rig.open();
    let n = 20_000;
    let t = std::time::Instant::now();
    for _ in 0..n {
        let mut state = fs.state.lock();
        let tx = fs.begin_tx(&mut state).unwrap();
        fs.commit(&mut state, tx, false).unwrap();
    }
    println!(
        "{n} empty commits: {:.1} us each",
        t.elapsed().as_secs_f64() * 1e6 / n as f64
    );
}

/// A write into part of a unit that is only on the pool reads the unit with
/// the filesystem lock released: a create elsewhere goes on while that read
/// hangs, and the write then lands on the right bytes.
#[test]
fn a_partial_write_reads_its_unit_without_holding_the_lock() {
    let rig = Rig::small();
    let fs = rig.open();
    let f = create(&fs, ROOT, "f");
    write_all(&fs, f, 0, &pattern(1, 0, UNIT as usize));
    fs.fsync(f).unwrap();
    rig.ctl.add_rule(FaultRule {
        range: rig.data_range(),
        ..FaultRule::new(Some(Op::Read), FaultAction::Hang)
    });
    let created = std::thread::scope(|s| {
        let writer = s.spawn(|| fs.write(f, 100, b"partial"));
        // Give the writer time to reach its read.
        std::thread::sleep(Duration::from_millis(200));
        let (done, wait) = std::sync::mpsc::channel();
        let fs = &fs;
        s.spawn(move || {
            let made = fs.mknod(ME, ROOT, b"other", libc::S_IFREG | 0o644, 0, 0, None);
            let _ = done.send(made.is_ok());
        });
        let created = wait.recv_timeout(Duration::from_secs(10));
        rig.release();
        assert_eq!(writer.join().unwrap(), Ok(7));
        created
    });
    assert_eq!(
        created,
        Ok(true),
        "a create waited for another file's data read"
    );
    let mut want = pattern(1, 0, UNIT as usize);
    want[100..107].copy_from_slice(b"partial");
    same(&read_all(&fs, f), &want);
}
