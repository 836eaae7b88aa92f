//! What the kernel caches of a stackfs mount (negative entries, page cache
//! kept across opens, symlink targets) never hides a change made by another
//! process on the same mount. Every mount is undone by a guard.

mod support;

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::Command;
use support::*;

/// Requests of `opcode` the daemon has answered so far.
fn requests(mnt: &Path, opcode: &str) -> u64 {
    let v: serde_json::Value = serde_json::from_slice(&getxattr(mnt, c"stackfs.stats")).unwrap();
    assert_eq!(v[0]["layer"], "fuse", "the front end comes first: {v}");
    v[0]["opcodes"][opcode].as_u64().unwrap()
}

/// Run a command (another process than the test) and insist that it worked.
fn run(cmd: &str, args: &[&str]) {
    let out = Command::new(cmd).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "{cmd} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn a_cached_miss_turns_into_whatever_another_process_makes() {
    let p = Pool::new(1, "64M");
    p.mount();
    let m = |name: &str| p.mnt.join(name);
    let path = |name: &str| m(name).to_str().unwrap().to_string();
    // Two misses in a row: the second comes from the kernel's negative dentry.
    let before = requests(&p.mnt, "lookup");
    assert!(fs::symlink_metadata(m("nothing")).is_err());
    assert!(fs::symlink_metadata(m("nothing")).is_err());
    assert_eq!(
        requests(&p.mnt, "lookup") - before,
        1,
        "the miss was not cached"
    );

    fs::write(m("target"), b"data").unwrap();
    let makers: [(&str, &[&str]); 6] = [
        ("touch", &[]),
        ("mkdir", &[]),
        ("mkfifo", &[]),
        ("ln", &["-s", "target"]),
        ("ln", &[&path("target")]),
        ("mv", &[&path("target")]),
    ];
    for (i, (cmd, args)) in makers.iter().enumerate() {
        let name = format!("made{i}");
        // The miss is cached first, then the name is made elsewhere.
        assert!(fs::symlink_metadata(m(&name)).is_err());
        let mut args = args.to_vec();
        let full = path(&name);
        args.push(&full);
        run(cmd, &args);
        assert!(
            fs::symlink_metadata(m(&name)).is_ok(),
            "{cmd} {args:?} made a name the test still misses"
        );
        if *cmd == "mv" {
            assert!(fs::symlink_metadata(m("target")).is_err());
            fs::write(m("target"), b"data").unwrap();
        }
    }
    // A removed name is missing at once, and back at once when made again.
    run("rm", &[&path("made0")]);
    assert!(fs::symlink_metadata(m("made0")).is_err());
    run("rmdir", &[&path("made1")]);
    assert!(fs::symlink_metadata(m("made1")).is_err());
    run("mkdir", &[&path("made0")]);
    assert!(m("made0").is_dir());
    p.umount();
}

#[test]
fn a_kept_page_cache_never_shows_old_data() {
    let p = Pool::new(1, "64M");
    p.mount();
    let f = p.mnt.join("f");
    let name = f.to_str().unwrap();
    let first = random(200_000, 1);
    fs::write(&f, &first).unwrap();
    // Read it once: its pages are cached and kept across opens.
    assert!(fs::read(&f).unwrap() == first);

    // Another process overwrites the middle.
    run(
        "dd",
        &[
            "if=/dev/zero",
            &format!("of={name}"),
            "bs=4096",
            "seek=10",
            "count=2",
            "conv=notrunc",
            "status=none",
        ],
    );
    let mut want = first.clone();
    want[40_960..49_152].fill(0);
    assert!(fs::read(&f).unwrap() == want, "overwrite not seen");

    // ... with O_DIRECT, around the page cache.
    run(
        "dd",
        &[
            "if=/dev/zero",
            &format!("of={name}"),
            "bs=4096",
            "seek=4",
            "count=1",
            "conv=notrunc",
            "oflag=direct",
            "status=none",
        ],
    );
    want[16_384..20_480].fill(0);
    assert!(fs::read(&f).unwrap() == want, "direct write not seen");

    // ... punches a hole, which goes around the page cache.
    run("fallocate", &["-p", "-o", "65536", "-l", "65536", name]);
    want[65_536..131_072].fill(0);
    assert!(fs::read(&f).unwrap() == want, "hole not seen");

    // ... copies another file over part of it (the daemon copies the data).
    let src = p.mnt.join("src");
    let other = random(8192, 2);
    fs::write(&src, &other).unwrap();
    run(
        "xfs_io",
        &[
            "-c",
            &format!("copy_range -s 0 -d 131072 -l 8192 {}", src.display()),
            name,
        ],
    );
    want[131_072..139_264].copy_from_slice(&other);
    assert!(fs::read(&f).unwrap() == want, "copy_file_range not seen");

    // ... and truncates it: size and data at once.
    run("truncate", &["-s", "1000", name]);
    assert_eq!(fs::metadata(&f).unwrap().size(), 1000);
    assert!(fs::read(&f).unwrap() == want[..1000], "truncate not seen");
    p.umount();
}

#[test]
fn a_symlink_made_again_shows_its_new_target() {
    let p = Pool::new(1, "64M");
    p.mount();
    let link = p.mnt.join("link");
    std::os::unix::fs::symlink("first", &link).unwrap();
    assert_eq!(fs::read_link(&link).unwrap(), Path::new("first"));
    run("ln", &["-sfn", "second", link.to_str().unwrap()]);
    assert_eq!(fs::read_link(&link).unwrap(), Path::new("second"));
    p.umount();
}
