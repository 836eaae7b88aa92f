//! Encryption and compression on real mounts: nothing in clear on the
//! devices, tampering is EIO, keys are checked before anything is written,
//! and compression pays on text but costs nothing on random data.

mod support;

use std::fs;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::Path;
use std::process::Command;
use support::*;

fn images(p: &Pool) -> Vec<Vec<u8>> {
    p.imgs.iter().map(|i| fs::read(i).unwrap()).collect()
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

/// Bytes the image files take on disk (they are sparse).
fn allocated(p: &Pool) -> u64 {
    p.imgs
        .iter()
        .map(|i| fs::metadata(i).unwrap().blocks() * 512)
        .sum()
}

/// `meta_len` from device 0's superblock: where the data region starts in pool space.
fn meta_len(img: &Path) -> u64 {
    let mut b = [0u8; 8];
    fs::File::open(img)
        .unwrap()
        .read_exact_at(&mut b, 64)
        .unwrap();
    u64::from_le_bytes(b)
}

const DATA_START: u64 = 1 << 20;

#[test]
fn no_name_content_or_xattr_in_clear_on_any_device() {
    let p = Pool::new(3, "128M");
    p.mount();
    let dir = p.mnt.join("dir_MARKERNAME_q7");
    fs::create_dir(&dir).unwrap();
    fs::write(
        dir.join("file_MARKERNAME_z3"),
        b"contents MARKERBODY_k9 ".repeat(5000),
    )
    .unwrap();
    fs::write(p.mnt.join("small"), b"MARKERBODY_k9").unwrap();
    let c = std::ffi::CString::new(dir.join("file_MARKERNAME_z3").to_str().unwrap()).unwrap();
    let (n, v) = (c"user.MARKERXATTR_n1", b"MARKERXVAL_v2");
    // SAFETY: valid C strings and buffer for the duration of the call.
    assert_eq!(
        unsafe { libc::setxattr(c.as_ptr(), n.as_ptr(), v.as_ptr().cast(), v.len(), 0) },
        0
    );
    std::os::unix::fs::symlink("target_MARKERLINK_p5", p.mnt.join("l")).unwrap();
    p.umount();
    for (img, raw) in p.imgs.iter().zip(images(&p)) {
        for m in [
            "MARKERNAME",
            "MARKERBODY",
            "MARKERXATTR",
            "MARKERXVAL",
            "MARKERLINK",
        ] {
            assert!(
                !contains(&raw, m.as_bytes()),
                "{m} found in clear on {}",
                img.display()
            );
        }
    }
    p.mount();
    assert_eq!(fs::read(p.mnt.join("small")).unwrap(), b"MARKERBODY_k9");
    p.umount();
}

#[test]
fn flipped_data_byte_is_eio_for_that_region_only() {
    let p = Pool::new(1, "128M");
    p.mount();
    let data = random(256 << 10, 7);
    fs::write(p.mnt.join("victim"), &data).unwrap();
    fs::write(p.mnt.join("bystander"), b"still fine").unwrap();
    p.umount();
    // The first unit of the first file sits at the start of the data region.
    let at = DATA_START + meta_len(&p.imgs[0]) + 1000;
    let f = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&p.imgs[0])
        .unwrap();
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, at).unwrap();
    f.write_all_at(&[b[0] ^ 0x40], at).unwrap();
    drop(f);
    p.mount();
    let v = fs::File::open(p.mnt.join("victim")).unwrap();
    let mut buf = vec![0u8; 65536];
    let e = v.read_exact_at(&mut buf, 0).unwrap_err();
    assert_eq!(
        e.raw_os_error(),
        Some(libc::EIO),
        "tampered unit must be EIO"
    );
    let mut rest = vec![0u8; 192 << 10];
    v.read_exact_at(&mut rest, 65536).unwrap();
    assert!(rest == data[65536..], "the rest of the file reads back");
    assert_eq!(fs::read(p.mnt.join("bystander")).unwrap(), b"still fine");
    assert!(p.daemon_pid().is_some(), "the daemon keeps running");
    drop(v);
    p.umount();
}

#[test]
fn flipped_metadata_is_detected_not_used() {
    let p = Pool::new(1, "128M");
    p.mount();
    let names: Vec<String> = (0..300).map(|i| format!("entry-{i:04}")).collect();
    for n in &names {
        fs::write(p.mnt.join(n), n.as_bytes()).unwrap();
    }
    p.umount();
    // Damage one byte in every written slot of the metadata region.
    let f = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&p.imgs[0])
        .unwrap();
    let mut slot = vec![0u8; 8192];
    let mut damaged = 0;
    for off in (0..meta_len(&p.imgs[0])).step_by(8192) {
        f.read_exact_at(&mut slot, DATA_START + off).unwrap();
        if slot.iter().any(|b| *b != 0) {
            f.write_all_at(&[slot[500] ^ 1], DATA_START + off + 500)
                .unwrap();
            damaged += 1;
        }
    }
    drop(f);
    assert!(damaged > 0);
    let out = stackfs(&["mount", &p.source(), p.mnt.to_str().unwrap()]);
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("metadata"),
            "mount failed without naming the metadata: {err}"
        );
        assert!(!err.contains("panicked"));
        return;
    }
    // Mounted anyway: whatever it shows must be the truth or an error, never made up.
    if let Ok(rd) = fs::read_dir(&p.mnt) {
        let mut seen: Vec<String> = rd
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into())
            .collect();
        seen.sort();
        assert!(
            seen.is_empty() || seen == names,
            "damaged metadata gave a wrong listing"
        );
        for n in &seen {
            if let Ok(c) = fs::read(p.mnt.join(n)) {
                assert_eq!(c, n.as_bytes(), "damaged metadata gave wrong contents");
            }
        }
    }
    p.umount();
}

#[test]
fn wrong_or_missing_key_is_an_error_and_writes_nothing() {
    let p = Pool::new(2, "64M");
    let mnt = p.mnt.to_str().unwrap();
    let src = p.source();
    let before = images(&p);
    let run = |args: &[&str], pass: Option<&str>| {
        let mut c = Command::new(BIN);
        c.args(args)
            .env_remove("STACKFS_PASSPHRASE")
            .stdin(std::process::Stdio::null());
        if let Some(pw) = pass {
            c.env("STACKFS_PASSPHRASE", pw);
        }
        c.output().unwrap()
    };
    fails_with(
        run(&["mount", &src, mnt], Some("not the passphrase")),
        "wrong passphrase",
    );
    fails_with(run(&["mount", &src, mnt], None), "no passphrase");
    let kf = p.dir.path().join("key");
    fs::write(&kf, random(64, 1)).unwrap();
    fails_with(
        run(
            &[
                "mount",
                "-o",
                &format!("key_file={}", kf.display()),
                &src,
                mnt,
            ],
            None,
        ),
        "key file",
    );
    let pf = p.dir.path().join("pass");
    fs::write(&pf, "wrong\n").unwrap();
    fails_with(
        run(
            &[
                "mount",
                "-o",
                &format!("passphrase_file={}", pf.display()),
                &src,
                mnt,
            ],
            None,
        ),
        "wrong passphrase",
    );
    fails_with(
        run(
            &["passwd", &src, "--passphrase-file", pf.to_str().unwrap()],
            Some("x"),
        ),
        "wrong passphrase",
    );
    assert!(!is_mounted(&p.mnt));
    assert!(images(&p) == before, "a failed unlock changed the devices");
}

#[test]
fn key_file_pool_and_passwd() {
    let dir = tempfile::tempdir().unwrap();
    let kf = dir.path().join("pool.key");
    fs::write(&kf, random(64, 42)).unwrap();
    let p = Pool::with(2, "64M", &["--key-file", kf.to_str().unwrap()]);
    let mnt = p.mnt.to_str().unwrap();
    ok(stackfs(&[
        "mount",
        "-o",
        &format!("key_file={}", kf.display()),
        &p.source(),
        mnt,
    ]));
    fs::write(p.mnt.join("f"), b"locked by a key file").unwrap();
    p.umount();
    // A passphrase does not open a key-file pool.
    fails_with(stackfs(&["mount", &p.source(), mnt]), "key file");
    // Re-wrap the master key under a passphrase; the data stays as it is.
    let newpass = dir.path().join("new");
    fs::write(&newpass, "brand new passphrase\n").unwrap();
    ok(stackfs(&[
        "passwd",
        &p.source(),
        "--key-file",
        kf.to_str().unwrap(),
        "--new-passphrase-file",
        newpass.to_str().unwrap(),
    ]));
    fails_with(
        stackfs(&[
            "mount",
            "-o",
            &format!("key_file={}", kf.display()),
            &p.source(),
            mnt,
        ]),
        "passphrase",
    );
    ok(stackfs(&[
        "mount",
        "-o",
        &format!("passphrase_file={}", newpass.display()),
        &p.source(),
        mnt,
    ]));
    assert_eq!(fs::read(p.mnt.join("f")).unwrap(), b"locked by a key file");
    p.umount();
}

#[test]
fn compression_pays_on_text_and_costs_little_on_random_data() {
    // A tar of /usr/include, written as often as it takes to reach 200 MiB.
    let p = Pool::new(3, "1G");
    p.mount();
    let tar = p.dir.path().join("include.tar");
    let st = Command::new("tar")
        .arg("cf")
        .arg(&tar)
        .args(["-C", "/usr", "include"])
        .status()
        .unwrap();
    assert!(st.success());
    let text = fs::read(&tar).unwrap();
    fs::remove_file(&tar).unwrap();
    let base = allocated(&p);
    let mut written = 0u64;
    let mut i = 0;
    while written < 200 << 20 {
        fs::write(p.mnt.join(format!("include-{i}.tar")), &text).unwrap();
        written += text.len() as u64;
        i += 1;
    }
    p.umount();
    let text_cost = allocated(&p) - base;
    eprintln!(
        "text: {} MiB written, {} MiB on the devices ({:.1} %)",
        written >> 20,
        text_cost >> 20,
        100.0 * text_cost as f64 / written as f64
    );
    assert!(
        text_cost * 100 < written * 35,
        "text took {text_cost} bytes for {written}"
    );

    p.mount();
    let base = allocated(&p);
    let rnd = random(100 << 20, 99);
    fs::write(p.mnt.join("random"), &rnd).unwrap();
    p.umount();
    let rnd_cost = allocated(&p) - base;
    eprintln!(
        "random: 100 MiB written, {:.1} MiB on the devices",
        rnd_cost as f64 / (1 << 20) as f64
    );
    assert!(
        rnd_cost * 100 <= rnd.len() as u64 * 103 + (1 << 20) * 100,
        "random data took {rnd_cost} bytes"
    );
    p.mount();
    assert!(fs::read(p.mnt.join("random")).unwrap() == rnd);
    assert!(fs::read(p.mnt.join("include-0.tar")).unwrap() == text);
    p.umount();
}
