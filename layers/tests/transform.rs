//! compress and crypt on real image files through io_uring.

use stackfs_layers::*;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::Arc;

const KEY_ID: KeyId = [3; 12];

const SIZE: u64 = 8 << 20;

fn stack(spec: &str, n: usize) -> (tempfile::TempDir, Vec<PathBuf>, Stack, ()) {
    let dir = tempfile::tempdir().unwrap();
    let paths: Vec<PathBuf> = (0..n)
        .map(|i| {
            let p = dir.path().join(format!("d{i}.img"));
            File::create(&p).unwrap().set_len(SIZE).unwrap();
            p
        })
        .collect();
    let devs = paths
        .iter()
        .map(|p| Arc::new(Device::open(p, 0, SIZE, false).unwrap()))
        .collect();
    let keys = CryptKeys {
        keyring: Arc::new(Keyring::new(&[7u8; 32])),
        write_key: Some(KEY_ID),
    };
    let s = StackSpec::parse(spec)
        .unwrap()
        .build_with(devs, Some(&keys), None)
        .unwrap();
    (dir, paths, s, ())
}

fn text(len: usize) -> Vec<u8> {
    b"stackfs compresses text like this line, over and over; "
        .iter()
        .cycle()
        .take(len)
        .copied()
        .collect()
}

fn random(len: usize, seed: u64) -> Vec<u8> {
    stackfs_layers::mem::noise(len, seed)
}

fn raw_devices(paths: &[PathBuf]) -> Vec<u8> {
    paths
        .iter()
        .flat_map(|p| std::fs::read(p).unwrap())
        .collect()
}

/// Write a unit, read it back with the tag the write recorded.
fn round_trip(top: &dyn Layer, addr: u64, data: &[u8]) -> ExtentTag {
    let (r, tag) = submit_wait_tag(
        top,
        Op::Write,
        addr,
        Buf::copy_from(data),
        ExtentTag::default(),
    );
    assert_eq!(r, Ok(data.len() as u64));
    let out = Buf::zeroed(data.len());
    let (r, _) = submit_wait_tag(top, Op::Read, addr, out.clone(), tag);
    assert_eq!(r, Ok(data.len() as u64));
    assert!(out.as_slice() == data, "read back differs");
    tag
}

#[test]
fn compress_crypt_stripe_round_trip_and_no_plaintext_on_disk() {
    let (_d, paths, s, _) = stack("compress=zstd:1,crypt=aes-256-gcm,stripe=64k", 3);
    let t = text(65536);
    let tag = round_trip(&*s.top, 0, &t);
    assert_eq!(tag.codec, compress::ZSTD);
    assert!(
        tag.stored_len < 4096,
        "64 KiB of repeated text compressed to {}",
        tag.stored_len
    );
    let r = random(65536, 3);
    let tag = round_trip(&*s.top, 1 << 20, &r);
    assert_eq!(tag.codec, compress::RAW, "random data is stored raw");
    assert_eq!(tag.stored_len, 65536);
    // Metadata path: crypt without compression.
    // A request sized as the metadata store sizes its slots fills 8 KiB.
    let slot = 8192 - crypt::OVERHEAD as usize;
    let m = random(slot, 9);
    let tag = round_trip(&*s.meta, 2 << 20, &m);
    assert_eq!(tag.codec, compress::RAW);
    assert_eq!(footprint(&*s.meta, slot as u64), 8192);
    s.top.shutdown();
    let disk = raw_devices(&paths);
    let marker = b"stackfs compresses text";
    assert!(
        !disk.windows(marker.len()).any(|w| w == marker),
        "plaintext found on a device"
    );
    assert!(
        !disk.windows(64).any(|w| w == &r[1000..1064]),
        "random plaintext found on a device"
    );
}

#[test]
fn lz4_round_trip() {
    let (_d, _p, s, _) = stack("compress=lz4", 1);
    let tag = round_trip(&*s.top, 0, &text(65536));
    assert_eq!(tag.codec, compress::LZ4 | compress::PADDED);
    round_trip(&*s.top, 65536, &random(10000, 1));
    s.top.shutdown();
}

#[test]
fn tampered_block_is_eio_not_bytes() {
    let (_d, paths, s, _) = stack("crypt", 1);
    let data = random(65536, 5);
    round_trip(&*s.top, 0, &data);
    assert_eq!(submit_wait(&*s.top, Op::Flush, 0, Buf::zeroed(0)), Ok(0));
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&paths[0])
        .unwrap();
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, 30000).unwrap();
    f.write_all_at(&[b[0] ^ 1], 30000).unwrap();
    f.sync_all().unwrap();
    // Drop the page cache's copy so the read sees the device (O_DIRECT reads do anyway).
    let out = Buf::zeroed(65536);
    assert_eq!(
        submit_wait(&*s.top, Op::Read, 0, out.clone()),
        Err(Errno::EIO)
    );
    assert!(
        out.as_slice().iter().all(|b| *b == 0),
        "no decrypted bytes leak on a failed read"
    );
    // Moving a valid block elsewhere also fails: the address is authenticated.
    let mut raw = vec![0u8; 69632];
    round_trip(&*s.top, 1 << 20, &data);
    f.read_exact_at(&mut raw, 1 << 20).unwrap();
    f.write_all_at(&raw, 2 << 20).unwrap();
    f.sync_all().unwrap();
    assert_eq!(
        submit_wait(&*s.top, Op::Read, 2 << 20, Buf::zeroed(65536)),
        Err(Errno::EIO)
    );
    // Untouched blocks still read; never-written space reads as zeros.
    round_trip(&*s.top, 4 << 20, &data);
    let z = Buf::copy_from(&[1u8; 4096]);
    assert_eq!(submit_wait(&*s.top, Op::Read, 6 << 20, z.clone()), Ok(4096));
    assert!(z.as_slice().iter().all(|b| *b == 0));
    s.top.shutdown();
}

#[test]
fn every_write_takes_a_fresh_nonce() {
    let (_d, paths, s, _) = stack("crypt", 1);
    let data = random(4096, 1);
    for _ in 0..10 {
        round_trip(&*s.top, 0, &data);
    }
    s.top.shutdown();
    let disk = std::fs::read(&paths[0]).unwrap();
    // The tenth write (counter 9) is on disk, with the mount's key id.
    assert_eq!(&disk[..8], &9u64.to_le_bytes(), "one nonce per write");
    assert_eq!(&disk[8..12], b"KID2");
    assert_eq!(
        &disk[12..24],
        &KEY_ID,
        "the key id is stored with the block"
    );
}

#[test]
fn detached_tags_keep_extents_unpadded_and_verify() {
    let (_d, paths, s, _) = stack("compress=lz4,crypt", 1);
    let data = random(65536, 11);
    let tag = ExtentTag {
        flags: io::TAG_DETACHED,
        ..ExtentTag::default()
    };
    let (r, wrote) = submit_wait_tag(&*s.top, Op::Write, 0, Buf::copy_from(&data), tag);
    assert_eq!(r, Ok(65536));
    assert_ne!(wrote.mac, [0; 16], "the MAC comes back up through compress");
    assert_eq!(wrote.codec, compress::RAW);
    let out = Buf::zeroed(65536);
    assert_eq!(
        submit_wait_tag(&*s.top, Op::Read, 0, out.clone(), wrote).0,
        Ok(65536)
    );
    assert!(out.as_slice() == data.as_slice());
    // The ciphertext takes exactly the unit: nothing was written past it.
    assert_eq!(submit_wait(&*s.top, Op::Flush, 0, Buf::zeroed(0)), Ok(0));
    let disk = std::fs::read(&paths[0]).unwrap();
    assert!(disk[65536..69632].iter().all(|b| *b == 0));
    // A wrong MAC (an older version of the extent, say) is EIO.
    let mut stale = wrote;
    stale.mac[0] ^= 1;
    assert_eq!(
        submit_wait_tag(&*s.top, Op::Read, 0, Buf::zeroed(65536), stale).0,
        Err(Errno::EIO)
    );
    s.top.shutdown();
}

/// With detached crypt (what the filesystem uses for data), compressed units
/// are padded to whole blocks, so each reaches the device as an aligned
/// O_DIRECT request; the tag keeps the exact compressed length.
#[test]
fn detached_units_are_padded_to_blocks() {
    for (spec, id) in [
        (
            "compress=zstd:1,crypt=aes-256-gcm,stripe=64k",
            compress::ZSTD,
        ),
        ("compress=lz4,crypt=aes-256-gcm,stripe=64k", compress::LZ4),
        ("compress=zstd:1", compress::ZSTD),
    ] {
        let (_d, _p, s, _) = stack(spec, if spec.contains("stripe") { 3 } else { 1 });
        let mut data = text(65536);
        data[1000..1008].copy_from_slice(b"distinct");
        let detached = ExtentTag {
            flags: io::TAG_DETACHED,
            ..ExtentTag::default()
        };
        let (r, tag) =
            submit_wait_tag(&*s.top, Op::Write, 1 << 20, Buf::copy_from(&data), detached);
        assert_eq!(r, Ok(65536));
        assert_eq!(tag.codec, id | compress::PADDED, "{spec}");
        assert!(
            tag.stored_len % 4096 != 0 && tag.stored_len < 4096,
            "{spec}: stored {}",
            tag.stored_len
        );
        let written: u64 = spec::walk(&s.top)
            .iter()
            .filter(|(_, l)| l.name().starts_with("device:"))
            .map(|(_, l)| l.stats().unwrap().snapshot().write_bytes)
            .sum();
        assert_eq!(written, 4096, "{spec}: bytes that reached the devices");
        let out = Buf::zeroed(65536);
        let (r, _) = submit_wait_tag(&*s.top, Op::Read, 1 << 20, out.clone(), tag);
        assert_eq!(r, Ok(65536), "{spec}");
        assert!(
            out.as_slice() == data.as_slice(),
            "{spec}: read back differs"
        );
        s.top.shutdown();
    }
}
