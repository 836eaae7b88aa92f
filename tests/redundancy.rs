//! Redundancy on mounted pools: a member missing (`-o degraded`), its
//! resync when it is back, members used apart, `stackfs replace` onto a new
//! image file, `stackfs scrub` of damage on every member, and a daemon
//! killed in the middle of a resync.

mod support;

use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use support::*;

/// RAID-1 with the default filters (the MAC verifies every copy).
const RAID1: &str = "compress=zstd:1,crypt=aes-256-gcm,mirror=2";

fn raid1() -> Pool {
    Pool::with(2, "96M", &["--layers", RAID1])
}

/// `n` files of incompressible bytes named `{tag}{i}`, written and fsynced.
fn put_files(mnt: &Path, tag: &str, n: usize, len: usize) -> Vec<(PathBuf, Vec<u8>)> {
    (0..n)
        .map(|i| {
            let path = mnt.join(format!("{tag}{i}"));
            let data = random(len + i * 4099, tag.len() as u64 * 1000 + i as u64);
            fs::write(&path, &data).unwrap();
            fs::File::open(&path).unwrap().sync_all().unwrap();
            (PathBuf::from(format!("{tag}{i}")), data)
        })
        .collect()
}

fn check_files(mnt: &Path, files: &[(PathBuf, Vec<u8>)]) {
    for (name, data) in files {
        let got = fs::read(mnt.join(name)).unwrap_or_else(|e| panic!("{}: {e}", name.display()));
        assert!(got == *data, "{} differs", name.display());
    }
}

fn json(bytes: &[u8]) -> serde_json::Value {
    serde_json::from_slice(bytes).expect("JSON")
}

/// Wait until every member is online (a resync or replace finished).
fn wait_online(mnt: &Path) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let health = json(&getxattr(mnt, c"stackfs.health"));
        let states: Vec<String> = health["members"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["state"].as_str().unwrap_or("?").to_string())
            .collect();
        if states.iter().all(|s| s == "online") {
            return;
        }
        assert!(Instant::now() < deadline, "members still {states:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Mount a pool made of `imgs` (some of the pool's devices), with options.
fn mount_devices(p: &Pool, imgs: &[&Path], options: &str) -> std::process::Output {
    let source: Vec<String> = imgs.iter().map(|p| p.display().to_string()).collect();
    let log = format!("log_file={}", p.log().display());
    let opts = if options.is_empty() {
        log
    } else {
        format!("{log},{options}")
    };
    stackfs(&[
        "mount",
        "-o",
        &opts,
        &source.join(":"),
        p.mnt.to_str().unwrap(),
    ])
}

/// Unmount and wait for the daemon (whatever devices it was given).
fn umount(p: &Pool) {
    unmount_retrying_busy(|| stackfs(&["umount", p.mnt.to_str().unwrap()]));
}

#[test]
fn a_missing_member_needs_degraded_and_is_resynced_when_back() {
    let p = raid1();
    p.mount();
    let before = put_files(&p.mnt, "a", 8, 300_000);
    p.umount();
    let (d0, d1) = (p.imgs[0].clone(), p.imgs[1].clone());
    let away = p.dir.path().join("d1.away");
    fs::rename(&d1, &away).unwrap();
    // Without `degraded`: a named error that says how.
    let refused = mount_devices(&p, &[&d0], "");
    fails_with(refused, "missing device number 1");
    assert!(!is_mounted(&p.mnt));
    ok(mount_devices(&p, &[&d0], "degraded"));
    check_files(&p.mnt, &before);
    let health = json(&getxattr(&p.mnt, c"stackfs.health"));
    assert_eq!(health["state"], "degraded", "{health}");
    assert_eq!(health["members"][1]["state"], "missing", "{health}");
    let during = put_files(&p.mnt, "b", 6, 200_000);
    fs::remove_file(p.mnt.join("a0")).unwrap();
    umount(&p);
    // Back: it resyncs while mounted, then serves reads again.
    fs::rename(&away, &d1).unwrap();
    ok(mount_devices(&p, &[&d0, &d1], ""));
    wait_online(&p.mnt);
    check_files(&p.mnt, &before[1..]);
    check_files(&p.mnt, &during);
    umount(&p);
    // The resynced member alone holds everything, metadata included.
    fs::rename(&d0, p.dir.path().join("d0.away")).unwrap();
    ok(mount_devices(&p, &[&d1], "degraded"));
    check_files(&p.mnt, &before[1..]);
    check_files(&p.mnt, &during);
    assert!(!p.mnt.join("a0").exists());
    umount(&p);
}

#[test]
fn members_used_apart_are_refused_together() {
    let p = raid1();
    p.mount();
    put_files(&p.mnt, "a", 2, 100_000);
    p.umount();
    let (d0, d1) = (p.imgs[0].clone(), p.imgs[1].clone());
    for (alone, tag) in [(&d0, "x"), (&d1, "y")] {
        ok(mount_devices(&p, &[alone], "degraded"));
        put_files(&p.mnt, tag, 1, 50_000);
        umount(&p);
    }
    fails_with(
        mount_devices(&p, &[&d0, &d1], ""),
        "each used without the other",
    );
    assert!(!is_mounted(&p.mnt));
}

#[test]
fn replace_onto_a_new_image_then_remove_the_old() {
    let mut p = raid1();
    p.mount();
    let files = put_files(&p.mnt, "f", 10, 400_000);
    let new = p.dir.path().join("new.img");
    let out = stackfs(&[
        "replace",
        p.mnt.to_str().unwrap(),
        p.imgs[1].to_str().unwrap(),
        new.to_str().unwrap(),
    ]);
    let said = ok(out);
    assert!(said.contains("member 1 is now"), "{said}");
    check_files(&p.mnt, &files);
    let health = json(&getxattr(&p.mnt, c"stackfs.health"));
    assert_eq!(health["members"][1]["state"], "online", "{health}");
    umount(&p);
    // The old device is no member any more.
    fails_with(
        stackfs(&["info", p.imgs[1].to_str().unwrap()]),
        "not a stackfs device",
    );
    fs::remove_file(&p.imgs[1]).unwrap();
    p.imgs[1] = new.clone();
    p.mount();
    check_files(&p.mnt, &files);
    p.umount();
    // The new member alone holds everything.
    fsck_clean_and_whole_on(&p, &new, &files);
}

/// `fsck --verify-data` of the pool finds nothing, then the member `alone`
/// mounted by itself (degraded) holds every file.
fn fsck_clean_and_whole_on(p: &Pool, alone: &Path, files: &[(PathBuf, Vec<u8>)]) {
    let out = stackfs(&["fsck", "--verify-data", &p.source()]);
    let said = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{said}");
    ok(mount_devices(p, &[alone], "degraded"));
    check_files(&p.mnt, files);
    umount(p);
}

/// Garbage over 4 KiB at each of `offsets` of an image file.
fn damage(img: &Path, offsets: impl Iterator<Item = u64>) {
    use std::os::unix::fs::FileExt;
    let f = fs::OpenOptions::new().write(true).open(img).unwrap();
    for off in offsets {
        f.write_all_at(&random(4096, off), off).unwrap();
    }
    f.sync_all().unwrap();
}

fn scrub(target: &str) -> (Option<i32>, serde_json::Value) {
    let out = stackfs(&["scrub", "--json", target]);
    let report = serde_json::from_slice(&out.stdout).unwrap_or_else(|_| {
        panic!(
            "scrub printed no report: {}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (out.status.code(), report)
}

fn total(report: &serde_json::Value, key: &str) -> u64 {
    report["copies"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["metadata"][key].as_u64().unwrap() + c["data"][key].as_u64().unwrap())
        .sum()
}

#[test]
fn scrub_repairs_damage_on_every_member() {
    let p = raid1();
    p.mount();
    let files = put_files(&p.mnt, "f", 12, 2_000_000);
    p.umount();
    let info = json(ok(stackfs(&["info", "--json", &p.source()])).as_bytes());
    let data_start = (1 << 20) + info["metadata_region"].as_u64().unwrap();
    // Different blocks on each member, never both copies of one.
    damage(&p.imgs[0], (0..8).map(|k| data_start + k * 2 * 65536));
    damage(&p.imgs[1], (0..8).map(|k| data_start + (k * 2 + 1) * 65536));
    p.mount();
    let mnt = p.mnt.to_str().unwrap().to_string();
    let (code, report) = scrub(&mnt);
    assert_eq!(code, Some(1), "{report}");
    assert_eq!(total(&report, "unrepaired"), 0, "{report}");
    assert_eq!(total(&report, "bad"), 16, "{report}");
    assert_eq!(total(&report, "repaired"), 16, "{report}");
    for d in report["devices"].as_array().unwrap() {
        assert_eq!(d["repairs"], 8, "{report}");
        assert!(d["read_bytes"].as_u64().unwrap() >= 24_000_000, "{report}");
    }
    let (code, again) = scrub(&mnt);
    assert_eq!((code, total(&again, "bad")), (Some(0), 0), "{again}");
    check_files(&p.mnt, &files);
    p.umount();
    // Offline, with a rate limit.
    damage(&p.imgs[1], std::iter::once(data_start + 65536 * 40));
    let out = stackfs(&["scrub", "--rate", "200M", &p.source()]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(text.contains("1 bad, 1 repaired, 0 unrepaired"), "{text}");
}

/// Kill the daemon (SIGKILL) and detach its mount.
fn kill_daemon(p: &Pool) {
    let pid = p.daemon_pid().expect("daemon");
    // SAFETY: kill has no memory preconditions.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    let _ = std::process::Command::new("umount")
        .arg("-l")
        .arg(&p.mnt)
        .status();
    p.wait_daemon_gone();
}

#[test]
fn a_resync_cut_by_a_killed_daemon_goes_on_at_the_next_mount() {
    let p = raid1();
    p.mount();
    put_files(&p.mnt, "a", 2, 100_000);
    p.umount();
    let (d0, d1) = (p.imgs[0].clone(), p.imgs[1].clone());
    ok(mount_devices(&p, &[&d0], "degraded"));
    let files = put_files(&p.mnt, "b", 24, 1_000_000);
    umount(&p);
    // A slow resync (resync_rate=), and the daemon dies midway.
    ok(mount_devices(&p, &[&d0, &d1], "resync_rate=8M"));
    std::thread::sleep(Duration::from_millis(700));
    kill_daemon(&p);
    let recorded = json(ok(stackfs(&["info", "--json", &p.source()])).as_bytes());
    let stale = &recorded["members_recorded"]["stale"];
    assert_eq!(stale[0]["member"], 1, "the resync was not cut: {recorded}");
    ok(mount_devices(&p, &[&d0, &d1], ""));
    wait_online(&p.mnt);
    check_files(&p.mnt, &files);
    umount(&p);
    fsck_clean_and_whole_on(&p, &d1, &files);
}

#[test]
fn a_replace_cut_by_a_killed_daemon_goes_on_at_the_next_mount() {
    let mut p = raid1();
    p.mount_with("resync_rate=8M");
    let files = put_files(&p.mnt, "f", 24, 1_000_000);
    let new = p.dir.path().join("new.img");
    ok(stackfs(&[
        "replace",
        "--no-wait",
        p.mnt.to_str().unwrap(),
        p.imgs[1].to_str().unwrap(),
        new.to_str().unwrap(),
    ]));
    std::thread::sleep(Duration::from_millis(700));
    kill_daemon(&p);
    // Half built: the new image is no member yet.
    fails_with(
        stackfs(&["info", new.to_str().unwrap()]),
        "not a stackfs device",
    );
    let recorded = json(ok(stackfs(&["info", "--json", &p.source()])).as_bytes());
    assert_eq!(
        recorded["members_recorded"]["replacing"]["member"], 1,
        "{recorded}"
    );
    // The same devices as before: the replace goes on by itself.
    p.mount();
    wait_online(&p.mnt);
    let health = json(&getxattr(&p.mnt, c"stackfs.health"));
    assert_eq!(
        health["members"][1]["path"],
        new.display().to_string(),
        "{health}"
    );
    check_files(&p.mnt, &files);
    umount(&p);
    fs::remove_file(&p.imgs[1]).unwrap();
    p.imgs[1] = new;
    p.mount();
    check_files(&p.mnt, &files);
    p.umount();
}

#[test]
fn a_missing_member_is_replaced_by_its_number() {
    let mut p = raid1();
    p.mount();
    let files = put_files(&p.mnt, "f", 6, 500_000);
    p.umount();
    fs::remove_file(&p.imgs[1]).unwrap();
    let d0 = p.imgs[0].clone();
    ok(mount_devices(&p, &[&d0], "degraded"));
    let new = p.dir.path().join("new.img");
    let said = ok(stackfs(&[
        "replace",
        p.mnt.to_str().unwrap(),
        "1",
        new.to_str().unwrap(),
    ]));
    assert!(said.contains("member 1 is now"), "{said}");
    let health = json(&getxattr(&p.mnt, c"stackfs.health"));
    assert_eq!(health["state"], "online", "{health}");
    umount(&p);
    p.imgs[1] = new;
    p.mount();
    check_files(&p.mnt, &files);
    p.umount();
}
