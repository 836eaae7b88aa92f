//! Unit tests of the device layer: submit failures injected mid-batch,
//! shutdown with requests in flight.

use super::*;
use crate::buf::{Buf, BufPool, PAGE};
use crate::io::{EndIo, IoResult};
use crate::mem::noise;
use std::sync::mpsc;
use std::time::Instant;

/// Longest wait for any completion: a hang fails the test, not the run.
const PATIENCE: Duration = Duration::from_secs(20);

/// A completion: request index, result, and the bytes a read brought.
type Done = (usize, IoResult, Vec<u8>);

/// A device over an image file of `len` bytes (`data`, or zeros).
fn device(len: usize, data: Option<&[u8]>) -> (tempfile::TempDir, PathBuf, Device) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("dev.img");
    match data {
        Some(d) => std::fs::write(&path, d).unwrap(),
        None => File::create(&path).unwrap().set_len(len as u64).unwrap(),
    }
    let dev = Device::open(&path, 0, len as u64, false).unwrap();
    // Once a request has come back, the completion thread is asleep in
    // the kernel again: entries a test leaves in the ring have to wait
    // for its next tick, as they would on an idle device.
    let res = crate::layer::submit_wait(&dev, Op::Read, 0, Buf::zeroed(PAGE));
    assert_eq!(res, Ok(PAGE as u64));
    std::thread::sleep(Duration::from_millis(5));
    (dir, path, dev)
}

fn arm(dev: &Device, after: usize, errno: i32, times: u32) {
    dev.ring.faults.set(Some(SubmitFault {
        after,
        errno,
        times,
    }));
}

/// One page read per page of the device, into buffers of `pool` that
/// only the requests hold; each reports through `tx` with what it read.
fn page_reads(n: usize, pool: &BufPool, tx: &mpsc::Sender<Done>) -> Vec<Io> {
    (0..n)
        .map(|i| {
            let tx = tx.clone();
            let end_io: EndIo = Box::new(move |io, res| {
                let data = io.buf().as_slice().to_vec();
                tx.send((i, res, data)).unwrap();
                res
            });
            Io::new(Op::Read, (i * PAGE) as u64, pool.get(PAGE), Some(end_io))
        })
        .collect()
}

/// Every completion still due, by index; panics after `PATIENCE`.
fn collect(rx: &mpsc::Receiver<Done>, got: &mut [Option<(IoResult, Vec<u8>)>]) {
    let deadline = Instant::now() + PATIENCE;
    while got.iter().any(Option::is_none) {
        let left = deadline.saturating_duration_since(Instant::now());
        let (i, res, data) = rx.recv_timeout(left).expect("a request never completed");
        assert!(
            got[i].replace((res, data)).is_none(),
            "request {i} completed twice"
        );
    }
}

/// Completions already delivered, without waiting.
fn delivered(rx: &mpsc::Receiver<Done>, got: &mut [Option<(IoResult, Vec<u8>)>]) {
    while let Ok((i, res, data)) = rx.try_recv() {
        assert!(
            got[i].replace((res, data)).is_none(),
            "request {i} completed twice"
        );
    }
}

fn wait_until(what: &str, cond: impl Fn() -> bool) {
    let deadline = Instant::now() + PATIENCE;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// A submit fails for good after K of N entries: more than a ring's worth,
/// so the first RING_ENTRIES are with the kernel and the rest of the K
/// wait in the ring. The K keep their buffers until their completions and
/// read the right bytes; only the N - K that never reached the ring fail.
#[test]
fn failed_submit_fails_only_unqueued_requests() {
    const N: usize = 600;
    const K: usize = 550;
    let data = noise(N * PAGE, 11);
    let (_dir, _path, dev) = device(N * PAGE, Some(&data));
    let pool = BufPool::new(N * PAGE);
    let (tx, rx) = mpsc::channel();
    let ios = page_reads(N, &pool, &tx);
    let first = dev.ring.next_id.load(Ordering::Relaxed);
    arm(&dev, K, libc::EIO, 1);
    dev.submit_batch(ios);

    // Read the pool before the completions: a queued request whose
    // buffer is gone has delivered its completion already.
    let held = pool.in_use();
    let mut got = vec![None; N];
    delivered(&rx, &mut got);
    let done_ok = got[..K].iter().flatten().filter(|(r, _)| r.is_ok()).count();
    assert!(
        held >= (K - done_ok) * PAGE,
        "a queued request lost its buffer: {held} bytes held, {done_ok} of {K} done"
    );
    for (i, g) in got.iter().enumerate().skip(K) {
        let res = g.as_ref().map(|(r, _)| *r);
        assert_eq!(res, Some(Err(Errno::EIO)), "unqueued request {i}");
    }
    let table = dev.ring.inflight.lock();
    assert!((first + K as u64..first + N as u64).all(|id| !table.contains_key(&id)));
    drop(table);

    collect(&rx, &mut got);
    for (i, g) in got.iter().enumerate().take(K) {
        let (res, bytes) = g.as_ref().unwrap();
        assert_eq!(*res, Ok(PAGE as u64), "queued request {i}");
        assert!(
            bytes[..] == data[i * PAGE..][..PAGE],
            "request {i} read wrong bytes"
        );
    }
    wait_until("every buffer is back", || pool.in_use() == 0);
    assert!(dev.ring.inflight.lock().is_empty());
}

/// Vectored writes (their iovecs live in the in-flight table too) with a
/// submit that stays EBUSY past every retry: the K queued writes reach
/// the file, the others fail with EIO and leave it untouched.
#[test]
fn persistent_ebusy_fails_only_unqueued_writes() {
    const N: usize = 8;
    const K: usize = 3;
    const LEN: usize = 2 * PAGE;
    let (_dir, path, dev) = device(N * LEN, None);
    let data = noise(N * LEN, 5);
    let (tx, rx) = mpsc::channel();
    let ios: Vec<Io> = (0..N)
        .map(|i| {
            let tx = tx.clone();
            let end_io: EndIo = Box::new(move |_, res| {
                tx.send((i, res, Vec::new())).unwrap();
                res
            });
            let buf = Buf::copy_from(&data[i * LEN..][..LEN]);
            let addr = (i * LEN) as u64;
            let parent = Io::new(Op::Write, addr, buf.clone(), Some(end_io));
            let child = parent.child_vectored(
                Op::Write,
                addr,
                vec![buf.slice(0, PAGE), buf.slice(PAGE, PAGE)],
            );
            parent.put();
            child
        })
        .collect();
    arm(&dev, K, libc::EBUSY, u32::MAX);
    let start = Instant::now();
    dev.submit_batch(ios);
    assert!(
        start.elapsed() < Duration::from_secs(2),
        "the retries are bounded"
    );
    dev.ring.faults.set(None);

    let mut got = vec![None; N];
    collect(&rx, &mut got);
    let on_disk = std::fs::read(&path).unwrap();
    for (i, g) in got.iter().enumerate() {
        let res = g.as_ref().unwrap().0;
        let stored = &on_disk[i * LEN..][..LEN];
        if i < K {
            assert_eq!(res, Ok(LEN as u64), "queued write {i}");
            assert!(stored == &data[i * LEN..][..LEN], "write {i} not on disk");
        } else {
            assert_eq!(res, Err(Errno::EIO), "unqueued write {i}");
            assert!(
                stored.iter().all(|&b| b == 0),
                "refused write {i} reached the disk"
            );
        }
    }
    assert!(dev.ring.inflight.lock().is_empty());
}

/// EAGAIN, EBUSY or EINTR a few times in a row is retried: every request
/// of the batch completes normally.
#[test]
fn transient_submit_errors_are_retried() {
    const N: usize = 8;
    let data = noise(N * PAGE, 3);
    let (_dir, _path, dev) = device(N * PAGE, Some(&data));
    let pool = BufPool::new(N * PAGE);
    for errno in [libc::EAGAIN, libc::EBUSY, libc::EINTR] {
        let (tx, rx) = mpsc::channel();
        arm(&dev, 2, errno, 3);
        dev.submit_batch(page_reads(N, &pool, &tx));
        let mut got = vec![None; N];
        collect(&rx, &mut got);
        for (i, g) in got.iter().enumerate() {
            let (res, bytes) = g.as_ref().unwrap();
            assert_eq!(*res, Ok(PAGE as u64), "errno {errno}, request {i}");
            assert!(
                bytes[..] == data[i * PAGE..][..PAGE],
                "request {i} read wrong bytes"
            );
        }
        assert!(
            dev.ring.faults.0.lock().is_none(),
            "every injected failure was used"
        );
    }
}

/// A read of one page whose completion checks that the device let go of it
/// first (its buffer was not handed back while the kernel could still write
/// it), then reports through `tx`.
fn watched_read(dev: &Device, i: usize, pool: &BufPool, tx: &mpsc::Sender<Done>) -> Io {
    let (tx, ring) = (tx.clone(), dev.ring.clone());
    let end_io: EndIo = Box::new(move |io, res| {
        let held = ring.inflight.lock().values().any(|f| f.io.same(io));
        assert!(!held, "request {i} completed while the ring still held it");
        tx.send((i, res, io.buf().as_slice().to_vec())).unwrap();
        res
    });
    Io::new(Op::Read, (i * PAGE) as u64, pool.get(PAGE), Some(end_io))
}

/// Shutdown with a batch in flight: every request completes once, with its
/// bytes or EIO; none hangs; every buffer comes back; the completion thread
/// is gone; and a request submitted afterwards fails with EIO at once.
#[test]
fn shutdown_with_requests_in_flight() {
    const N: usize = 400;
    let data = noise(N * PAGE, 17);
    let (_dir, _path, dev) = device(N * PAGE, Some(&data));
    let pool = BufPool::new(N * PAGE);
    let (tx, rx) = mpsc::channel();
    let ios: Vec<Io> = (0..N).map(|i| watched_read(&dev, i, &pool, &tx)).collect();
    dev.submit_batch(ios);
    let started = Instant::now();
    dev.shutdown();
    assert!(started.elapsed() < PATIENCE, "shutdown returned");
    let mut got = vec![None; N];
    collect(&rx, &mut got);
    for (i, g) in got.iter().enumerate() {
        let (res, bytes) = g.as_ref().unwrap();
        match res {
            Ok(n) => {
                assert_eq!(*n, PAGE as u64, "request {i}");
                assert!(
                    bytes[..] == data[i * PAGE..][..PAGE],
                    "request {i} read wrong bytes"
                );
            }
            Err(e) => assert_eq!(*e, Errno::EIO, "request {i}"),
        }
    }
    assert!(dev.ring.inflight.lock().is_empty());
    assert!(
        dev.reaper.lock().is_none(),
        "the completion thread was joined"
    );
    wait_until("every buffer is back", || pool.in_use() == 0);

    let (tx, rx) = mpsc::channel();
    dev.submit_batch(vec![watched_read(&dev, 0, &pool, &tx)]);
    let (_, res, _) = rx.try_recv().expect("completed within submit");
    assert_eq!(res, Err(Errno::EIO));
    for op in [Op::Write, Op::Flush, Op::Discard] {
        let res = crate::layer::submit_wait(&dev, op, 0, Buf::zeroed(PAGE));
        assert_eq!(res, Err(Errno::EIO), "{op:?} after shutdown");
    }
}
