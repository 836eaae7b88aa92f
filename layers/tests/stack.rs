//! Real io_uring on real files: striping against an in-memory model,
//! cancellation through a hanging fault layer, error propagation.

use proptest::prelude::*;
use stackfs_layers::*;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const DEV_SIZE: u64 = 4 << 20;

fn images(dir: &tempfile::TempDir, n: usize, size: u64) -> Vec<PathBuf> {
    (0..n)
        .map(|i| {
            let p = dir.path().join(format!("d{i}.img"));
            File::create(&p).unwrap().set_len(size).unwrap();
            p
        })
        .collect()
}

fn open_all(paths: &[PathBuf], size: u64) -> Vec<Arc<Device>> {
    paths
        .iter()
        .map(|p| Arc::new(Device::open(p, 0, size, false).unwrap()))
        .collect()
}

fn fill(seed: u64, len: usize) -> Buf {
    Buf::copy_from(&stackfs_layers::mem::noise(
        len,
        seed.wrapping_mul(0x9E37_79B9_7F4A_7C15),
    ))
}

#[derive(Clone, Debug)]
enum Step {
    Write { addr: u64, len: usize, seed: u64 },
    Read { addr: u64, len: usize },
    Flush,
}

fn step(cap: u64) -> impl Strategy<Value = Step> {
    let max_len = 300_000usize;
    prop_oneof![
        4 => (0..cap - max_len as u64, 1..max_len, any::<u64>()).prop_map(|(a, l, s)| Step::Write { addr: a, len: l, seed: s }),
        4 => (0..cap - max_len as u64, 1..max_len).prop_map(|(a, l)| Step::Read { addr: a, len: l }),
        1 => Just(Step::Flush),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, .. ProptestConfig::default() })]

    /// Striped I/O of random sizes and alignments returns what a flat model
    /// returns, and every byte sits where RAID-0 puts it.
    #[test]
    fn stripe_matches_model(ndev in 1usize..=5, chunk_pages in 1u64..=32, steps in prop::collection::vec(step(2 << 20), 1..25)) {
        let dir = tempfile::tempdir().unwrap();
        let paths = images(&dir, ndev, DEV_SIZE);
        let chunk = chunk_pages * 4096;
        let spec = StackSpec::parse(&format!("stripe={chunk}")).unwrap();
        let stack = spec.build(open_all(&paths, DEV_SIZE)).unwrap();
        let top = stack.top.clone();
        let mut model = vec![0u8; top.capacity() as usize];
        for s in &steps {
            match s {
                Step::Write { addr, len, seed } => {
                    let b = fill(*seed, *len);
                    model[*addr as usize..*addr as usize + len].copy_from_slice(b.as_slice());
                    prop_assert_eq!(submit_wait(&*top, Op::Write, *addr, b), Ok(*len as u64));
                }
                Step::Read { addr, len } => {
                    let b = Buf::zeroed(*len);
                    prop_assert_eq!(submit_wait(&*top, Op::Read, *addr, b.clone()), Ok(*len as u64));
                    prop_assert!(b.as_slice() == &model[*addr as usize..*addr as usize + len]);
                }
                Step::Flush => prop_assert_eq!(submit_wait(&*top, Op::Flush, 0, Buf::zeroed(0)), Ok(0)),
            }
        }
        prop_assert_eq!(submit_wait(&*top, Op::Flush, 0, Buf::zeroed(0)), Ok(0));
        top.shutdown();
        drop(stack);
        // Every byte of the model at its RAID-0 place on the device files.
        let files: Vec<File> = paths.iter().map(|p| File::open(p).unwrap()).collect();
        let per_dev = top.capacity() / ndev as u64;
        for (d, f) in files.iter().enumerate() {
            let mut raw = vec![0u8; per_dev as usize];
            f.read_exact_at(&mut raw, 0).unwrap();
            for (c, piece) in raw.chunks(chunk as usize).enumerate() {
                let logical = (c as u64 * ndev as u64 + d as u64) * chunk;
                prop_assert!(piece == &model[logical as usize..logical as usize + piece.len()], "device {} chunk {}", d, c);
            }
        }
    }
}

/// Top-level requests striped over hanging devices, cancelled from the top:
/// every child completes once with ECANCELED, quickly, and memory comes back.
#[test]
fn cancel_reaches_hung_children() {
    let dir = tempfile::tempdir().unwrap();
    let paths = images(&dir, 3, DEV_SIZE);
    let stack = StackSpec::parse("stripe=64k,fault")
        .unwrap()
        .build(open_all(&paths, DEV_SIZE))
        .unwrap();
    if let Some(f) = &stack.fault {
        f.add_rule(FaultRule::new(Some(Op::Write), FaultAction::Hang));
    }
    let pool = BufPool::new(64 << 20);
    let completions = Arc::new(AtomicUsize::new(0));
    let mut tops = Vec::new();
    let mut waiters = Vec::new();
    for i in 0..8u64 {
        let w = Waiter::new();
        let io = Io::new(
            Op::Write,
            i * (1 << 20),
            pool.get(1 << 20),
            Some(w.end_io()),
        );
        // Count the children's completions as they pass the observer hooks.
        tops.push(io.clone());
        waiters.push(w);
        stack.top.submit(io);
    }
    let hung = stack.fault.as_ref().unwrap().hung_count();
    assert_eq!(
        hung,
        8 * 16,
        "each 1 MiB write is 16 chunks of 64 KiB, all hung"
    );
    let started = Instant::now();
    for io in &tops {
        io.cancel();
    }
    for w in &waiters {
        assert_eq!(w.wait(), Err(Errno::ECANCELED));
        completions.fetch_add(1, Ordering::SeqCst);
    }
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "cancellation took {:?}",
        started.elapsed()
    );
    assert_eq!(completions.load(Ordering::SeqCst), 8);
    assert_eq!(stack.fault.as_ref().unwrap().hung_count(), 0);
    drop(tops);
    drop(waiters);
    assert_eq!(pool.in_use(), 0, "every buffer returned to the pool");
    // The devices still work afterwards.
    if let Some(f) = &stack.fault {
        f.clear();
    }
    assert_eq!(
        submit_wait(&*stack.top, Op::Write, 0, fill(1, 8192)),
        Ok(8192)
    );
    stack.top.shutdown();
}

/// Cancel a request while its children are in flight in the kernel
/// (delayed, then passed to io_uring): it completes exactly once.
#[test]
fn cancel_races_completion_and_counts_once() {
    let dir = tempfile::tempdir().unwrap();
    let paths = images(&dir, 2, DEV_SIZE);
    let stack = StackSpec::parse("stripe=4k,fault")
        .unwrap()
        .build(open_all(&paths, DEV_SIZE))
        .unwrap();
    if let Some(f) = &stack.fault {
        f.command("delay any ms=1 every=2").unwrap();
    }
    let ends = Arc::new(AtomicUsize::new(0));
    for round in 0..200u64 {
        let e = ends.clone();
        let w = Waiter::new();
        let we = w.end_io();
        let io = Io::new(
            Op::Write,
            (round % 16) * 65536,
            fill(round, 65536),
            Some(Box::new(move |io, r| {
                e.fetch_add(1, Ordering::SeqCst);
                we(io, r)
            })),
        );
        stack.top.submit(io.clone());
        if round % 3 == 0 {
            io.cancel();
        }
        let r = w.wait();
        assert!(
            r == Ok(65536) || r == Err(Errno::ECANCELED),
            "round {round}: {r:?}"
        );
    }
    assert_eq!(ends.load(Ordering::SeqCst), 200);
    stack.top.shutdown();
}

/// An EIO in one child of a striped write fails the parent with EIO; the
/// siblings are cancelled; later requests work.
#[test]
fn child_error_fails_parent_and_cancels_siblings() {
    let dir = tempfile::tempdir().unwrap();
    let paths = images(&dir, 3, DEV_SIZE);
    let stack = StackSpec::parse("stripe=64k,fault")
        .unwrap()
        .build(open_all(&paths, DEV_SIZE))
        .unwrap();
    // Device 1 fails writes; devices 0 and 2 hang them, so only cancellation can end them.
    let f = stack.fault.clone().unwrap();
    f.command("error write errno=EIO dev=1").unwrap();
    f.command("hang write dev=0").unwrap();
    f.command("hang write dev=2").unwrap();
    let started = Instant::now();
    assert_eq!(
        submit_wait(&*stack.top, Op::Write, 0, fill(7, 1 << 20)),
        Err(Errno::EIO)
    );
    assert!(started.elapsed() < Duration::from_secs(2));
    assert_eq!(f.hung_count(), 0, "siblings were cancelled");
    if let Some(f) = &stack.fault {
        f.clear();
    }
    let b = fill(8, 1 << 20);
    assert_eq!(
        submit_wait(&*stack.top, Op::Write, 0, b.clone()),
        Ok(1 << 20)
    );
    let r = Buf::zeroed(1 << 20);
    assert_eq!(
        submit_wait(&*stack.top, Op::Read, 0, r.clone()),
        Ok(1 << 20)
    );
    assert!(r.as_slice() == b.as_slice());
    stack.top.shutdown();
}

/// Power cut: writes after the cut are acknowledged but never reach the file;
/// a torn write lands only its first bytes.
#[test]
fn power_cut_and_torn_write() {
    let dir = tempfile::tempdir().unwrap();
    let paths = images(&dir, 1, DEV_SIZE);
    let stack = StackSpec::parse("fault")
        .unwrap()
        .build(open_all(&paths, DEV_SIZE))
        .unwrap();
    let top = stack.top.clone();
    let ctl = stack.fault.as_ref().unwrap();
    ctl.cut_after_writes(2);
    for i in 0..4u64 {
        assert_eq!(
            submit_wait(
                &*top,
                Op::Write,
                i * 4096,
                Buf::copy_from(&[i as u8 + 1; 4096])
            ),
            Ok(4096)
        );
    }
    assert!(ctl.is_power_cut());
    assert_eq!(submit_wait(&*top, Op::Flush, 0, Buf::zeroed(0)), Ok(0));
    ctl.clear();
    ctl.command("tear 100 write").unwrap();
    assert_eq!(
        submit_wait(&*top, Op::Write, 8 * 4096, Buf::copy_from(&[9; 4096])),
        Ok(4096)
    );
    top.shutdown();
    let f = File::open(&paths[0]).unwrap();
    let mut raw = vec![0u8; 9 * 4096];
    f.read_exact_at(&mut raw, 0).unwrap();
    assert!(raw[..4096].iter().all(|b| *b == 1));
    assert!(raw[4096..8192].iter().all(|b| *b == 2));
    assert!(
        raw[8192..16384].iter().all(|b| *b == 0),
        "writes after the cut were dropped"
    );
    assert!(raw[8 * 4096..8 * 4096 + 100].iter().all(|b| *b == 9));
    assert!(
        raw[8 * 4096 + 100..].iter().all(|b| *b == 0),
        "torn write kept only 100 bytes"
    );
}

#[test]
fn discard_punches_holes() {
    let dir = tempfile::tempdir().unwrap();
    let paths = images(&dir, 2, DEV_SIZE);
    let stack = StackSpec::parse("stripe=64k")
        .unwrap()
        .build(open_all(&paths, DEV_SIZE))
        .unwrap();
    let top = stack.top.clone();
    assert_eq!(
        submit_wait(&*top, Op::Write, 0, fill(3, 512 << 10)),
        Ok(512 << 10)
    );
    let w = Waiter::new();
    top.submit(Io::discard(0, 512 << 10, Some(w.end_io())));
    assert_eq!(w.wait(), Ok(512 << 10));
    let r = fill(4, 512 << 10);
    let mut r = Buf::copy_from(r.as_slice());
    r.set_len(512 << 10);
    assert_eq!(submit_wait(&*top, Op::Read, 0, r.clone()), Ok(512 << 10));
    assert!(r.as_slice().iter().all(|b| *b == 0));
    top.shutdown();
}

#[test]
fn bad_input_is_an_error_not_a_panic() {
    let dir = tempfile::tempdir().unwrap();
    assert!(Device::open(&dir.path().join("missing.img"), 0, 4096, false).is_err());
    let paths = images(&dir, 1, 1 << 20);
    assert!(
        Device::open(&paths[0], 0, 2 << 20, false).is_err(),
        "range beyond the file"
    );
    let dev = Arc::new(Device::open(&paths[0], 0, 1 << 20, false).unwrap());
    assert_eq!(
        submit_wait(&*dev, Op::Write, (1 << 20) - 4096, Buf::zeroed(8192)),
        Err(Errno::EINVAL)
    );
    assert_eq!(
        submit_wait(&*dev, Op::Read, u64::MAX - 10, Buf::zeroed(4096)),
        Err(Errno::EINVAL)
    );
    // Unaligned requests take the buffered path and still work.
    let b = Buf::copy_from(b"hello");
    let mut odd = Buf::zeroed(4096).slice(3, 5);
    assert_eq!(submit_wait(&*dev, Op::Write, 1001, b), Ok(5));
    let _ = &mut odd;
    assert_eq!(submit_wait(&*dev, Op::Read, 1001, odd.clone()), Ok(5));
    assert_eq!(odd.as_slice(), b"hello");
    let ctl = FaultControl::new();
    assert!(ctl.command("explode").is_err());
    assert!(ctl.command("error range=10-5").is_err());
    assert!(ctl.command("delay write").is_err());
    assert!(ctl.command("error errno=ENOTREAL").is_err());
    assert!(Stripe::new(1000, vec![dev.clone() as Arc<dyn Layer>]).is_err());
    assert!(StackSpec::parse("stripe=64k")
        .unwrap()
        .build(vec![])
        .is_err());
    let two = vec![
        dev.clone(),
        Arc::new(Device::open(&paths[0], 0, 1 << 20, false).unwrap()),
    ];
    assert!(
        StackSpec::parse("").unwrap().build(two).is_err(),
        "two devices need a stripe layer"
    );
    dev.shutdown();
}

/// The same I/O on a real loop device, where the machine lets us make one.
#[test]
fn loop_device_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let paths = images(&dir, 1, 8 << 20);
    let out = std::process::Command::new("losetup")
        .args(["--find", "--show"])
        .arg(&paths[0])
        .output();
    let Some(out) = out.ok().filter(|o| o.status.success()) else {
        eprintln!("losetup unavailable here; loop device test skipped");
        return;
    };
    let loopdev = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let result = std::panic::catch_unwind(|| {
        let dev =
            Arc::new(Device::open(std::path::Path::new(&loopdev), 0, 8 << 20, false).unwrap());
        assert_eq!(dev.capacity(), 8 << 20);
        let b = fill(11, 1 << 20);
        assert_eq!(
            submit_wait(&*dev, Op::Write, 1 << 20, b.clone()),
            Ok(1 << 20)
        );
        assert_eq!(submit_wait(&*dev, Op::Flush, 0, Buf::zeroed(0)), Ok(0));
        let r = Buf::zeroed(1 << 20);
        assert_eq!(
            submit_wait(&*dev, Op::Read, 1 << 20, r.clone()),
            Ok(1 << 20)
        );
        assert!(r.as_slice() == b.as_slice());
        let w = Waiter::new();
        dev.submit(Io::discard(1 << 20, 1 << 20, Some(w.end_io())));
        assert!(w.wait().is_ok());
        dev.shutdown();
    });
    let _ = std::process::Command::new("losetup")
        .args(["-d", &loopdev])
        .status();
    result.unwrap();
}

#[test]
fn counters_count() {
    let dir = tempfile::tempdir().unwrap();
    let paths = images(&dir, 2, DEV_SIZE);
    let stack = StackSpec::parse("stripe=64k")
        .unwrap()
        .build(open_all(&paths, DEV_SIZE))
        .unwrap();
    assert_eq!(
        submit_wait(&*stack.top, Op::Write, 0, fill(1, 256 << 10)),
        Ok(256 << 10)
    );
    let top = stack.top.stats().unwrap().snapshot();
    assert_eq!(
        (top.requests, top.write_bytes, top.in_flight, top.errors),
        (1, 256 << 10, 0, 0)
    );
    assert_eq!(top.latency_us.iter().sum::<u64>(), 1);
    let nodes = stackfs_layers::spec::walk(&stack.top);
    assert_eq!(nodes.len(), 3);
    // Chunks 0 and 2 sit next to each other on device 0: one vectored write.
    let dev0 = nodes[1].1.stats().unwrap().snapshot();
    assert_eq!((dev0.requests, dev0.write_bytes), (1, 128 << 10));
    stack.top.shutdown();
}

/// A 1 MiB request over 3 devices reaches each device as one request (six or
/// five 64 KiB chunks merged), reads back what was written, and a lower that
/// cannot take vectors (fault) gets one request per chunk instead.
#[test]
fn stripe_merges_chunks_per_device() {
    for (spec, per_dev) in [("stripe=64k", [1, 1, 1]), ("stripe=64k,fault", [5, 6, 5])] {
        let dir = tempfile::tempdir().unwrap();
        let paths = images(&dir, 3, DEV_SIZE);
        let stack = StackSpec::parse(spec)
            .unwrap()
            .build(open_all(&paths, DEV_SIZE))
            .unwrap();
        let data = fill(7, 1 << 20);
        assert_eq!(
            submit_wait(&*stack.top, Op::Write, 4 << 20, data.clone()),
            Ok(1 << 20)
        );
        let back = Buf::zeroed(1 << 20);
        assert_eq!(
            submit_wait(&*stack.top, Op::Read, 4 << 20, back.clone()),
            Ok(1 << 20)
        );
        assert!(back.as_slice() == data.as_slice(), "{spec}: data differs");
        let devices: Vec<_> = stackfs_layers::spec::walk(&stack.top)
            .into_iter()
            .filter(|(_, l)| l.name().starts_with("device:"))
            .collect();
        assert_eq!(devices.len(), 3);
        for (i, (_, d)) in devices.iter().enumerate() {
            let s = d.stats().unwrap().snapshot();
            assert_eq!(s.requests, 2 * per_dev[i], "{spec}: device {i} requests");
            assert_eq!(s.write_bytes, per_dev_bytes(i), "{spec}: device {i} bytes");
        }
        stack.top.shutdown();
    }
}

/// Bytes of a 1 MiB request at 4 MiB (chunk 64) that land on device `i` of 3.
fn per_dev_bytes(i: usize) -> u64 {
    (64..80u64).filter(|c| c % 3 == i as u64).count() as u64 * (64 << 10)
}
