//! The mirror layer over memory members (with the fault layer for errors
//! and delays), and the RAID-10 default stack over image files with the
//! real io_uring device: writes reach every copy, reads spread, a failed copy
//! is retried, a read that avoids a copy heals it, and a heal never
//! overwrites a newer write.

use stackfs_layers::io::{TAG_DETACHED, TAG_NO_HEAL};
use stackfs_layers::mem::noise;
use stackfs_layers::watchdog::Health;
use stackfs_layers::*;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::Arc;
use std::time::Duration;

const SIZE: u64 = 1 << 20;
const LEN: usize = 8192;
const ADDR: u64 = 4096;

/// A mirror over `copies` memory members, each under a fault layer (shared
/// control, `dev=i`) and the framework's counters.
struct Rig {
    mirror: Arc<dyn Layer>,
    memory: Vec<Arc<Mem>>,
    members: Vec<Arc<dyn Layer>>,
    faults: Vec<Arc<Fault>>,
    control: Arc<FaultControl>,
    health: Arc<Health>,
}

fn rig(copies: usize) -> Rig {
    let control = FaultControl::new();
    let memory: Vec<Arc<Mem>> = (0..copies).map(|_| Arc::new(Mem::new(SIZE))).collect();
    let faults: Vec<Arc<Fault>> = memory
        .iter()
        .enumerate()
        .map(|(i, m)| Fault::new(m.clone(), control.clone(), Some(i)))
        .collect();
    let members: Vec<Arc<dyn Layer>> = faults.iter().map(|f| Counted::wrap(f.clone())).collect();
    let health = Health::new((0..copies).map(|i| format!("mem{i}")).collect());
    health.set_groups(vec![(0..copies).collect()]);
    let indices = (0..copies).collect();
    let mirror = Counted::wrap(Mirror::new(members.clone(), indices, health.clone()).unwrap());
    Rig {
        mirror,
        memory,
        members,
        faults,
        control,
        health,
    }
}

impl Rig {
    fn write(&self, addr: u64, data: &[u8]) -> IoResult {
        submit_wait(&*self.mirror, Op::Write, addr, Buf::copy_from(data))
    }

    /// Read through the mirror with `tag`: result, bytes, tag that came back.
    fn read(&self, addr: u64, len: usize, tag: ExtentTag) -> (IoResult, Vec<u8>, ExtentTag) {
        let buf = Buf::zeroed(len);
        let (res, tag) = submit_wait_tag(&*self.mirror, Op::Read, addr, buf.clone(), tag);
        (res, buf.as_slice().to_vec(), tag)
    }

    /// The bytes copy `i` holds, read from its memory directly.
    fn copy_bytes(&self, i: usize, addr: u64, len: usize) -> Vec<u8> {
        let buf = Buf::zeroed(len);
        submit_wait(&*self.memory[i], Op::Read, addr, buf.clone()).unwrap();
        buf.as_slice().to_vec()
    }

    /// Overwrite copy `i`'s bytes behind the mirror's back (silent corruption).
    fn corrupt(&self, i: usize, addr: u64, len: usize) {
        let garbage = Buf::copy_from(&noise(len, 99));
        submit_wait(&*self.memory[i], Op::Write, addr, garbage).unwrap();
    }

    fn stats(&self) -> StatsSnapshot {
        self.mirror.stats().unwrap().snapshot()
    }

    fn member_reads(&self, i: usize) -> u64 {
        self.members[i].stats().unwrap().snapshot().read_bytes
    }
}

fn read_rule(dev: usize, action: FaultAction) -> FaultRule {
    FaultRule {
        dev: Some(dev),
        ..FaultRule::new(Some(Op::Read), action)
    }
}

#[test]
fn a_write_reaches_every_copy() {
    let rig = rig(3);
    let data = noise(LEN, 1);
    assert_eq!(rig.write(ADDR, &data), Ok(LEN as u64));
    for i in 0..3 {
        assert!(rig.copy_bytes(i, ADDR, LEN) == data, "copy {i}");
    }
    assert_eq!(
        submit_wait(&*rig.mirror, Op::Flush, 0, Buf::zeroed(0)),
        Ok(0)
    );
    assert!(!rig.health.any_faulted());
}

/// Reads of one batch, held in flight by a delay, go to the copy with the
/// fewest reads in flight: two each on a 2-way mirror.
#[test]
fn parallel_reads_spread_over_the_copies() {
    let rig = rig(2);
    rig.write(0, &noise(4 * LEN, 2)).unwrap();
    for dev in 0..2 {
        let delay = FaultAction::Delay(Duration::from_millis(50));
        rig.control.add_rule(read_rule(dev, delay));
    }
    let waiters: Vec<Waiter> = (0..4).map(|_| Waiter::new()).collect();
    let ios = waiters
        .iter()
        .enumerate()
        .map(|(i, w)| {
            let addr = (i * LEN) as u64;
            Io::new(Op::Read, addr, Buf::zeroed(LEN), Some(w.end_io()))
        })
        .collect();
    rig.mirror.submit_batch(ios);
    let copies: Vec<u32> = waiters
        .iter()
        .map(|w| {
            let (res, tag) = w.wait_tag();
            assert_eq!(res, Ok(LEN as u64));
            tag.copies
        })
        .collect();
    assert_eq!(copies, vec![0b01, 0b10, 0b01, 0b10]);
    assert_eq!(rig.member_reads(0), 2 * LEN as u64);
    assert_eq!(rig.member_reads(1), 2 * LEN as u64);
}

/// EIO from the copy read is retried on the other copy, transparently; the
/// read error is counted on the member, which is not faulted for it.
#[test]
fn eio_on_one_copy_is_retried_on_the_next() {
    let rig = rig(2);
    let data = noise(LEN, 3);
    rig.write(ADDR, &data).unwrap();
    rig.control
        .add_rule(read_rule(0, FaultAction::Error(Errno::EIO)));
    let (res, bytes, tag) = rig.read(ADDR, LEN, ExtentTag::default());
    assert_eq!(res, Ok(LEN as u64));
    assert!(bytes == data);
    assert_eq!(tag.copies, 0b10, "served by copy 1");
    let members = rig.health.members();
    assert_eq!((members[0].read_errors, members[1].read_errors), (1, 0));
    assert_eq!(rig.stats().read_retries, 1);
    rig.control
        .add_rule(read_rule(1, FaultAction::Error(Errno::EIO)));
    assert_eq!(rig.read(ADDR, LEN, ExtentTag::default()).0, Err(Errno::EIO));
}

/// A read whose bytes failed verification above is repeated avoiding the
/// copy it came from: the other copy answers, and the bad one is rewritten
/// with the good bytes before the read completes, counted once.
#[test]
fn a_read_that_avoids_a_copy_heals_it() {
    let rig = rig(2);
    let data = noise(LEN, 4);
    rig.write(ADDR, &data).unwrap();
    rig.corrupt(0, ADDR + 4096, 4096);
    let (res, bytes, tag) = rig.read(ADDR, LEN, ExtentTag::default());
    assert_eq!((res, tag.copies), (Ok(LEN as u64), 0b01));
    assert!(
        bytes != data,
        "copy 0 (the lowest, all idle) served the bad bytes"
    );

    let retry = tag.retry_avoiding();
    let (res, bytes, tag) = rig.read(ADDR, LEN, retry);
    assert_eq!((res, tag.copies), (Ok(LEN as u64), 0b10));
    assert!(bytes == data);
    assert!(rig.copy_bytes(0, ADDR, LEN) == data, "copy 0 repaired");
    let member = &rig.health.members()[0];
    assert_eq!(
        (
            member.repairs,
            member.bytes_repaired,
            member.checksum_errors
        ),
        (1, LEN as u64, 1)
    );
    let stats = rig.stats();
    assert_eq!((stats.repairs, stats.bytes_repaired), (1, LEN as u64));

    // Asked again (the caller retrying a range already healed): nothing to repair.
    assert_eq!(rig.read(ADDR, LEN, retry).0, Ok(LEN as u64));
    assert_eq!(rig.health.members()[0].repairs, 1, "counted once");
    assert_eq!(rig.stats().repairs, 1);
    assert!(!rig.health.any_faulted());
}

/// A read that avoids copies only to choose its copy (`TAG_NO_HEAL`)
/// reads that copy, damaged or not, and rewrites nothing.
#[test]
fn a_read_choosing_its_copy_heals_nothing() {
    let rig = rig(2);
    let data = noise(LEN, 5);
    rig.write(ADDR, &data).unwrap();
    rig.corrupt(1, ADDR, 4096);
    let bad = rig.copy_bytes(1, ADDR, LEN);
    for (copy, want) in [(1usize, &bad), (0, &data)] {
        let only = ExtentTag {
            avoid: 0b11 & !(1 << copy),
            flags: TAG_NO_HEAL,
            ..ExtentTag::default()
        };
        let (res, bytes, tag) = rig.read(ADDR, LEN, only);
        assert_eq!((res, tag.copies), (Ok(LEN as u64), 1 << copy));
        assert!(&bytes == want, "copy {copy} read as it is");
    }
    assert!(rig.copy_bytes(0, ADDR, LEN) == data, "copy 0 untouched");
    assert!(rig.copy_bytes(1, ADDR, LEN) == bad, "copy 1 untouched");
    let members = rig.health.members();
    assert_eq!((members[0].repairs, members[1].repairs), (0, 0));
    assert_eq!(rig.stats().repairs, 0);
}

#[test]
fn a_read_with_every_copy_avoided_fails_with_eio() {
    let rig = rig(3);
    rig.write(ADDR, &noise(LEN, 5)).unwrap();
    let all = ExtentTag {
        avoid: 0b111,
        ..ExtentTag::default()
    };
    assert_eq!(rig.read(ADDR, LEN, all).0, Err(Errno::EIO));
    // Two avoided and the third faulted: no good copy either.
    rig.health.mark_faulted(2, "test".into());
    let two = ExtentTag {
        avoid: 0b011,
        ..ExtentTag::default()
    };
    assert_eq!(rig.read(ADDR, LEN, two).0, Err(Errno::EIO));
    assert_eq!(rig.stats().repairs, 0);
}

/// A write to the range lands while the healing read is in flight: the
/// read's bytes may be older, so the heal is skipped (a scrub fixes the
/// copy later) and the newer write stays on both copies.
#[test]
fn a_heal_is_skipped_when_a_newer_write_overlaps() {
    let rig = rig(2);
    rig.write(ADDR, &noise(LEN, 6)).unwrap();
    rig.control
        .add_rule(read_rule(1, FaultAction::Delay(Duration::from_millis(300))));
    let waiter = Waiter::new();
    let read = Io::new(Op::Read, ADDR, Buf::zeroed(LEN), Some(waiter.end_io()));
    read.set_tag(ExtentTag {
        avoid: 0b01,
        ..ExtentTag::default()
    });
    rig.mirror.submit(read);
    let newer = noise(LEN, 7);
    rig.write(ADDR + 4096, &newer[..4096]).unwrap();
    assert_eq!(waiter.wait(), Ok(LEN as u64));
    let stats = rig.stats();
    assert_eq!((stats.repairs, stats.heals_skipped), (0, 1));
    for i in 0..2 {
        assert!(
            rig.copy_bytes(i, ADDR + 4096, 4096) == newer[..4096],
            "copy {i} keeps the newer write"
        );
    }
}

/// `data` on both copies, copy 0 damaged, and a read that avoids copy 0 in
/// flight: its heal's write to copy 0 hangs (returned once it does). The
/// read's waiter completes when the hung write is let go.
fn heal_held(rig: &Rig, data: &[u8]) -> Waiter {
    rig.write(ADDR, data).unwrap();
    rig.corrupt(0, ADDR, 4096);
    rig.control.add_rule(FaultRule {
        dev: Some(0),
        ..FaultRule::new(Some(Op::Write), FaultAction::Hang)
    });
    let read = Waiter::new();
    let io = Io::new(Op::Read, ADDR, Buf::zeroed(LEN), Some(read.end_io()));
    io.set_tag(ExtentTag {
        avoid: 0b01,
        ..ExtentTag::default()
    });
    rig.mirror.submit(io);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while rig.control.hung_count() < 1 {
        assert!(
            std::time::Instant::now() < deadline,
            "the heal write never came"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    read
}

/// A write overlapping a heal in progress waits for it: the heal's write
/// (of older bytes) cannot land after the newer one.
#[test]
fn a_write_waits_for_the_heal_of_its_range() {
    let rig = rig(2);
    let read = heal_held(&rig, &noise(LEN, 9));
    let newer = noise(LEN, 10);
    let write = Waiter::new();
    let io = Io::new(
        Op::Write,
        ADDR,
        Buf::copy_from(&newer),
        Some(write.end_io()),
    );
    rig.mirror.submit(io);
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(
        rig.control.hung_count(),
        1,
        "the newer write waits above the copies"
    );
    rig.control.clear();
    rig.faults[0].release_hung();
    assert_eq!(read.wait(), Ok(LEN as u64));
    assert_eq!(write.wait(), Ok(LEN as u64));
    for i in 0..2 {
        assert!(
            rig.copy_bytes(i, ADDR, LEN) == newer,
            "copy {i} has the newer write"
        );
    }
    assert_eq!(rig.stats().repairs, 1);
}

/// A waiting write that is cancelled leaves the queue with ECANCELED and
/// never reaches the copies.
#[test]
fn a_write_cancelled_while_it_waits_for_a_heal_never_lands() {
    let rig = rig(2);
    let data = noise(LEN, 14);
    let read = heal_held(&rig, &data);
    let write = Waiter::new();
    let io = Io::new(
        Op::Write,
        ADDR,
        Buf::copy_from(&noise(LEN, 15)),
        Some(write.end_io()),
    );
    rig.mirror.submit(io.clone());
    io.cancel();
    assert_eq!(write.wait(), Err(Errno::ECANCELED));
    rig.control.clear();
    rig.faults[0].release_hung();
    assert_eq!(read.wait(), Ok(LEN as u64));
    for i in 0..2 {
        assert!(rig.copy_bytes(i, ADDR, LEN) == data, "copy {i}");
    }
}

/// A watchdog under each copy: a copy that stops answering a read times
/// out, is faulted, and the read is answered by the other copy; later reads
/// go to the other copy at once.
#[test]
fn a_read_timed_out_on_one_copy_is_answered_by_the_other() {
    use stackfs_layers::watchdog::Watchdog;
    let control = FaultControl::new();
    let health = Health::new(vec!["mem0".into(), "mem1".into()]);
    health.set_groups(vec![vec![0, 1]]);
    let members: Vec<Arc<dyn Layer>> = (0..2)
        .map(|i| {
            let fault = Fault::new(Arc::new(Mem::new(SIZE)), control.clone(), Some(i));
            let watched: Arc<dyn Layer> =
                Watchdog::new(fault, Duration::from_millis(100), i, health.clone());
            watched
        })
        .collect();
    let mirror = Mirror::new(members, vec![0, 1], health.clone()).unwrap();
    let data = noise(LEN, 16);
    submit_wait(&*mirror, Op::Write, ADDR, Buf::copy_from(&data)).unwrap();
    control.add_rule(read_rule(0, FaultAction::Hang));
    let buf = Buf::zeroed(LEN);
    let (res, tag) = submit_wait_tag(&*mirror, Op::Read, ADDR, buf.clone(), ExtentTag::default());
    assert_eq!((res, tag.copies), (Ok(LEN as u64), 0b10));
    assert!(buf.as_slice() == data);
    assert!(health.is_faulted(0) && !health.lost());
    assert_eq!(health.members()[0].timeouts, 1);
    let started = std::time::Instant::now();
    let (res, tag) = submit_wait_tag(&*mirror, Op::Read, ADDR, buf, ExtentTag::default());
    assert_eq!((res, tag.copies), (Ok(LEN as u64), 0b10));
    assert!(
        started.elapsed() < Duration::from_millis(100),
        "no second timeout"
    );
    mirror.shutdown();
}

/// A copy that fails a write is faulted with the reason; the write succeeds
/// on the other, later reads skip the faulted copy, and the pool is lost
/// only when no copy is left.
#[test]
fn a_failed_write_faults_its_copy_and_the_write_succeeds() {
    let rig = rig(2);
    rig.control.add_rule(FaultRule {
        dev: Some(1),
        ..FaultRule::new(Some(Op::Write), FaultAction::Error(Errno::EIO))
    });
    let data = noise(LEN, 8);
    assert_eq!(rig.write(ADDR, &data), Ok(LEN as u64));
    let members = rig.health.members();
    assert!(members[1].faulted.as_deref().unwrap().contains("failed"));
    assert_eq!((members[0].write_errors, members[1].write_errors), (0, 1));
    assert!(rig.health.any_faulted() && !rig.health.lost());
    let avoid_healthy = ExtentTag {
        avoid: 0b01,
        ..ExtentTag::default()
    };
    assert_eq!(rig.read(ADDR, LEN, avoid_healthy).0, Err(Errno::EIO));
    let (res, bytes, _) = rig.read(ADDR, LEN, ExtentTag::default());
    assert!(res.is_ok() && bytes == data);

    rig.control.add_rule(FaultRule {
        dev: Some(0),
        ..FaultRule::new(Some(Op::Write), FaultAction::Error(Errno::EIO))
    });
    assert_eq!(rig.write(ADDR, &data), Err(Errno::EIO));
    assert!(rig.health.lost());
}

/// A read hung on its copy is cancelled there, and completes with ECANCELED.
#[test]
fn cancelling_a_read_cancels_it_on_its_copy() {
    let rig = rig(2);
    rig.control.add_rule(read_rule(0, FaultAction::Hang));
    let waiter = Waiter::new();
    let read = Io::new(Op::Read, 0, Buf::zeroed(4096), Some(waiter.end_io()));
    rig.mirror.submit(read.clone());
    read.cancel();
    assert_eq!(waiter.wait(), Err(Errno::ECANCELED));
}

// --- The default stack, RAID-10 over image files -------------------------

const DEV_SIZE: u64 = 16 << 20;
const UNIT: usize = 64 << 10;

fn raid10(dir: &tempfile::TempDir) -> (Stack, Vec<std::path::PathBuf>) {
    let paths: Vec<_> = (0..4)
        .map(|i| {
            let path = dir.path().join(format!("d{i}.img"));
            File::create(&path).unwrap().set_len(DEV_SIZE).unwrap();
            path
        })
        .collect();
    let devices = paths
        .iter()
        .map(|p| Arc::new(Device::open(p, 0, DEV_SIZE, false).unwrap()))
        .collect();
    let keys = CryptKeys {
        keyring: Arc::new(Keyring::new(&[7u8; 32])),
        write_key: Some([3; 12]),
    };
    let stack = StackSpec::parse("compress=zstd:1,crypt=aes-256-gcm,stripe=64k,mirror=2")
        .unwrap()
        .build_with(devices, Some(&keys), Some(Duration::from_secs(30)))
        .unwrap();
    (stack, paths)
}

fn image_bytes(path: &std::path::Path, offset: u64, len: usize) -> Vec<u8> {
    let mut out = vec![0; len];
    File::open(path)
        .unwrap()
        .read_exact_at(&mut out, offset)
        .unwrap();
    out
}

/// Garbage written into one image file under a unit: crypt's MAC fails on
/// the first read, the caller re-reads avoiding that copy, gets the data,
/// and the bad copy is repaired on disk.
#[test]
fn raid10_default_stack_heals_a_corrupted_copy_through_the_mac() {
    let dir = tempfile::tempdir().unwrap();
    let (stack, paths) = raid10(&dir);
    assert_eq!(
        stack.top.capacity(),
        2 * DEV_SIZE,
        "usable space: two groups"
    );
    // Unit 1 (random bytes, stored raw) sits in stripe chunk 1: group 1,
    // members 2 and 3, at offset 0 of each.
    let data = noise(UNIT, 11);
    let written = ExtentTag {
        flags: TAG_DETACHED,
        ..ExtentTag::default()
    };
    let (res, tag) = submit_wait_tag(
        &*stack.top,
        Op::Write,
        UNIT as u64,
        Buf::copy_from(&data),
        written,
    );
    assert_eq!(res, Ok(UNIT as u64));
    assert_eq!(tag.stored_len as usize, UNIT, "stored raw");
    assert!(image_bytes(&paths[2], 0, UNIT) == image_bytes(&paths[3], 0, UNIT));
    File::options()
        .write(true)
        .open(&paths[2])
        .unwrap()
        .write_all_at(&noise(4096, 12), 8192)
        .unwrap();

    let buf = Buf::zeroed(UNIT);
    let (res, failed) = submit_wait_tag(&*stack.top, Op::Read, UNIT as u64, buf.clone(), tag);
    assert_eq!(res, Err(Errno::EIO), "crypt's MAC caught the bad copy");
    assert_eq!(
        failed.copies, 0b01,
        "and the caller learns which copy served it"
    );

    let retry = ExtentTag {
        copies: failed.copies,
        ..tag
    }
    .retry_avoiding();
    let (res, _) = submit_wait_tag(&*stack.top, Op::Read, UNIT as u64, buf.clone(), retry);
    assert_eq!(res, Ok(UNIT as u64));
    assert!(buf.as_slice() == data);
    assert!(
        image_bytes(&paths[2], 0, UNIT) == image_bytes(&paths[3], 0, UNIT),
        "the bad copy is repaired on disk"
    );
    let members = stack.health.members();
    assert_eq!((members[2].repairs, members[2].checksum_errors), (1, 1));
    assert!(members
        .iter()
        .enumerate()
        .all(|(i, m)| i == 2 || m.repairs == 0));
    let (res, _) = submit_wait_tag(&*stack.top, Op::Read, UNIT as u64, buf.clone(), tag);
    assert_eq!(res, Ok(UNIT as u64), "a plain read finds no damage now");
    assert!(!stack.health.any_faulted());
    stack.top.shutdown();
}

/// RAID-1 built from a spec, with a fault layer under each member: a write
/// one member fails leaves that member faulted and the pool whole; the
/// capacity is the smallest member's.
#[test]
fn raid1_from_a_spec_survives_a_member_failing_writes() {
    let dir = tempfile::tempdir().unwrap();
    let sizes = [DEV_SIZE, DEV_SIZE / 2];
    let devices = sizes
        .iter()
        .enumerate()
        .map(|(i, size)| {
            let path = dir.path().join(format!("r{i}.img"));
            File::create(&path).unwrap().set_len(*size).unwrap();
            Arc::new(Device::open(&path, 0, *size, false).unwrap())
        })
        .collect();
    let stack = StackSpec::parse("mirror=2,fault")
        .unwrap()
        .build_with(devices, None, Some(Duration::from_secs(30)))
        .unwrap();
    assert_eq!(stack.top.capacity(), DEV_SIZE / 2);
    assert_eq!(stack.top.name(), "mirror=2");
    let control = stack.fault.clone().unwrap();
    control.command("error write dev=0").unwrap();
    let data = noise(UNIT, 13);
    assert_eq!(
        submit_wait(&*stack.top, Op::Write, 0, Buf::copy_from(&data)),
        Ok(UNIT as u64)
    );
    assert!(stack.health.is_faulted(0) && !stack.health.lost());
    let buf = Buf::zeroed(UNIT);
    assert_eq!(
        submit_wait(&*stack.top, Op::Read, 0, buf.clone()),
        Ok(UNIT as u64)
    );
    assert!(buf.as_slice() == data);
    control.command("error write dev=1").unwrap();
    assert_eq!(
        submit_wait(&*stack.top, Op::Write, 0, Buf::copy_from(&data)),
        Err(Errno::EIO)
    );
    assert!(stack.health.lost());
    stack.top.shutdown();
}
