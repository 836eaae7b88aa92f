//! The bay below a mirror: empty, it fails every request at once with EIO
//! and the mirror reads the other copy; a device put in takes the requests
//! from then on; a device too small is refused; a resyncing member gets
//! writes and no reads.

use stackfs_layers::bay::Bay;
use stackfs_layers::mem::noise;
use stackfs_layers::watchdog::Health;
use stackfs_layers::*;
use std::sync::Arc;

const SIZE: u64 = 1 << 20;

fn read(layer: &dyn Layer, addr: u64, len: usize) -> (IoResult, Vec<u8>) {
    let buf = Buf::zeroed(len);
    let r = submit_wait(layer, Op::Read, addr, buf.clone());
    (r, buf.as_slice().to_vec())
}

fn write(layer: &dyn Layer, addr: u64, data: &[u8]) {
    submit_wait(layer, Op::Write, addr, Buf::copy_from(data)).unwrap();
}

#[test]
fn an_empty_bay_fails_at_once_and_a_device_put_in_serves() {
    let bay = Bay::new(None, SIZE, "member 1".into());
    assert_eq!(bay.capacity(), SIZE);
    assert!(bay.name().contains("missing"), "{}", bay.name());
    assert_eq!(read(&*bay, 0, 4096).0, Err(Errno::EIO));
    let small = Arc::new(Mem::new(SIZE / 2));
    assert!(
        bay.insert(small).is_err(),
        "a device smaller than the member"
    );
    let mem = Arc::new(Mem::new(SIZE));
    assert!(bay.insert(mem.clone()).unwrap().is_none());
    let data = noise(8192, 3);
    write(&*bay, 4096, &data);
    assert_eq!(
        read(&*mem, 4096, 8192).1,
        data,
        "the write reached the device"
    );
    // Another device in its place: the old one gets nothing more.
    let next = Arc::new(Mem::new(SIZE));
    let old = bay.insert(next.clone()).unwrap().expect("the old device");
    write(&*bay, 0, &noise(4096, 4));
    assert_eq!(read(&*old, 0, 4096).1, vec![0; 4096]);
    assert_eq!(read(&*next, 0, 4096).1, noise(4096, 4));
}

#[test]
fn a_mirror_reads_around_an_empty_bay_and_a_resyncing_member() {
    let health = Health::new(vec!["a".into(), "b".into()]);
    health.set_groups(vec![vec![0, 1]]);
    let a = Arc::new(Mem::new(SIZE));
    let empty = Bay::new(None, SIZE, "b".into());
    let mirror = Mirror::new(
        vec![a.clone() as Arc<dyn Layer>, empty.clone()],
        vec![0, 1],
        health.clone(),
    )
    .unwrap();
    health.mark_missing(1);
    assert_eq!(health.members()[1].state(), "missing");
    assert!(!health.lost());
    let data = noise(4096, 9);
    write(&*mirror, 0, &data);
    assert_eq!(read(&*mirror, 0, 4096).1, data);
    // A new device in the bay, resyncing: it takes writes, serves no read.
    let b = Arc::new(Mem::new(SIZE));
    empty.insert(b.clone()).unwrap();
    health.revive(1, "b2".into());
    assert_eq!(health.members()[1].state(), "resyncing");
    let more = noise(4096, 10);
    write(&*mirror, 8192, &more);
    assert_eq!(
        read(&*b, 8192, 4096).1,
        more,
        "the write reached the new device"
    );
    assert_eq!(read(&*mirror, 0, 4096).1, data);
    // Even a read that avoids the good copy does not go to it.
    let avoiding = ExtentTag {
        avoid: 1,
        flags: stackfs_layers::io::TAG_NO_HEAL,
        ..ExtentTag::default()
    };
    let (r, _) = submit_wait_tag(&*mirror, Op::Read, 0, Buf::zeroed(4096), avoiding);
    assert_eq!(r, Err(Errno::EIO), "a read went to the copy being resynced");
    health.set_resyncing(1, false);
    let (r, _) = submit_wait_tag(&*mirror, Op::Read, 8192, Buf::zeroed(4096), avoiding);
    assert_eq!(r, Ok(4096), "once whole, it serves reads");
    // With one copy resyncing and the other faulted, the group is lost.
    health.set_resyncing(1, true);
    health.mark_faulted(0, "test".into());
    assert!(health.lost());
}
