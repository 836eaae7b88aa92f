//! The framework forwards one batch per lower layer: the default stack
//! (compress, crypt, stripe, a watchdog over each device) enters the kernel
//! once per batch on each device, for writes and for reads; so does the
//! RAID-10 stack (a mirror below the stripe).

use stackfs_layers::io::TAG_DETACHED;
use stackfs_layers::*;
use std::fs::File;
use std::sync::Arc;
use std::time::Duration;

const SIZE: u64 = 16 << 20;
const UNIT: usize = 64 << 10;
const DEVICES: usize = 3;
const DEFAULT: &str = "compress=zstd:1,crypt=aes-256-gcm,stripe=64k";
const RAID10: &str = "compress=zstd:1,crypt=aes-256-gcm,stripe=64k,mirror=2";

fn default_stack(dir: &tempfile::TempDir) -> Stack {
    stack_of(dir, DEFAULT, DEVICES)
}

fn stack_of(dir: &tempfile::TempDir, spec: &str, count: usize) -> Stack {
    let devices = (0..count)
        .map(|i| {
            let path = dir.path().join(format!("d{i}.img"));
            File::create(&path).unwrap().set_len(SIZE).unwrap();
            Arc::new(Device::open(&path, 0, SIZE, false).unwrap())
        })
        .collect();
    let keys = CryptKeys {
        keyring: Arc::new(Keyring::new(&[7u8; 32])),
        write_key: Some([3; 12]),
    };
    StackSpec::parse(spec)
        .unwrap()
        .build_with(devices, Some(&keys), Some(Duration::from_secs(30)))
        .unwrap()
}

/// (batches, kernel entries) of each device node.
fn device_counts(stack: &Stack) -> Vec<(u64, u64)> {
    stackfs_layers::spec::walk(&stack.top)
        .into_iter()
        .filter(|(_, layer)| layer.name().starts_with("device:"))
        .map(|(_, layer)| {
            let s = layer.stats().unwrap().snapshot();
            (s.batches, s.kernel_entries)
        })
        .collect()
}

/// Units of three kinds: compressible text, random bytes (stored raw), zeros.
fn unit(i: usize) -> Vec<u8> {
    match i % 3 {
        0 => format!("unit {i} of the batch, compressible; ")
            .into_bytes()
            .into_iter()
            .cycle()
            .take(UNIT)
            .collect(),
        1 => stackfs_layers::mem::noise(UNIT, i as u64),
        _ => vec![0; UNIT],
    }
}

/// Submit `ios` as one batch at the top and wait for all of them; each
/// device must have received exactly one batch and entered the kernel once.
fn one_batch(stack: &Stack, ios: Vec<(Io, Waiter)>) -> Vec<(IoResult, ExtentTag)> {
    let before = device_counts(stack);
    let (ios, waiters): (Vec<Io>, Vec<Waiter>) = ios.into_iter().unzip();
    stack.top.submit_batch(ios);
    let results = waiters.iter().map(Waiter::wait_tag).collect();
    let after = device_counts(stack);
    assert_eq!(after.len(), before.len());
    for (dev, (b, a)) in before.iter().zip(&after).enumerate() {
        let (batches, entries) = (a.0 - b.0, a.1 - b.1);
        assert_eq!(
            batches, 1,
            "device {dev} got {batches} batches for one batch"
        );
        assert_eq!(
            entries, 1,
            "device {dev} entered the kernel {entries} times for one batch"
        );
    }
    results
}

#[test]
fn default_stack_enters_the_kernel_once_per_batch_per_device() {
    let dir = tempfile::tempdir().unwrap();
    batches_through(default_stack(&dir));
}

/// Writes reach both copies, and the reads of a batch spread over the
/// copies of each group: every device still gets one batch, one entry.
#[test]
fn raid10_stack_enters_the_kernel_once_per_batch_per_device() {
    let dir = tempfile::tempdir().unwrap();
    batches_through(stack_of(&dir, RAID10, 4));
}

fn batches_through(stack: Stack) {
    const N: usize = 12;
    let writes = (0..N)
        .map(|i| {
            let waiter = Waiter::new();
            let buf = Buf::copy_from(&unit(i));
            let io = Io::new(Op::Write, (i * UNIT) as u64, buf, Some(waiter.end_io()));
            io.set_tag(ExtentTag {
                flags: TAG_DETACHED,
                ..ExtentTag::default()
            });
            (io, waiter)
        })
        .collect();
    let written = one_batch(&stack, writes);
    let mut tags = Vec::new();
    for (i, (res, tag)) in written.into_iter().enumerate() {
        assert_eq!(res, Ok(UNIT as u64), "write {i}");
        assert_ne!(tag.mac, [0; 16], "write {i}: crypt's MAC reached the top");
        tags.push(tag);
    }
    assert!(
        tags[0].codec != 0 && tags[1].codec == 0,
        "text compressed, noise raw"
    );

    let bufs: Vec<Buf> = (0..N).map(|_| Buf::zeroed(UNIT)).collect();
    let reads = (0..N)
        .map(|i| {
            let waiter = Waiter::new();
            let io = Io::new(
                Op::Read,
                (i * UNIT) as u64,
                bufs[i].clone(),
                Some(waiter.end_io()),
            );
            io.set_tag(tags[i]);
            (io, waiter)
        })
        .collect();
    for (i, (res, _)) in one_batch(&stack, reads).into_iter().enumerate() {
        assert_eq!(res, Ok(UNIT as u64), "read {i}");
        assert!(
            bufs[i].as_slice() == unit(i),
            "read {i} brought other bytes"
        );
    }
    let flush = Waiter::new();
    one_batch(
        &stack,
        vec![(
            Io::new(Op::Flush, 0, Buf::zeroed(0), Some(flush.end_io())),
            flush,
        )],
    );
    stack.top.shutdown();
}
