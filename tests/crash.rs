//! Power cuts at many points of a workload (in the spirit of xfstests'
//! dm-flakey tests and CrashMonkey): the pool's fault layer acknowledges and
//! drops every write after the Nth. After remounting, every state that was
//! durable before the cut must be there (or a later one), every rename must be
//! all or nothing, and every file must read without error. On a mirrored
//! pool (a fault layer over each member, one control) every file must then
//! read the same from the second copy of each group.

mod support;

use std::collections::BTreeMap;
use std::ffi::CString;
use std::fs;
use std::io::Write;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use support::*;

const LAYERS: &str = "compress=zstd:1,crypt=aes-256-gcm,stripe=64k,fault";
/// RAID-10 over 4 devices, a fault layer over each member.
const MIRRORED: &str = "compress=zstd:1,crypt=aes-256-gcm,stripe=64k,mirror=2,fault";
/// Cut points of the mirrored run: chosen so that it adds about a minute.
const MIRRORED_POINTS: u64 = 90;

fn fault(mnt: &Path, cmd: &str) {
    let p = CString::new(mnt.as_os_str().as_bytes()).unwrap();
    // SAFETY: valid C strings and buffer for the duration of the call.
    let r = unsafe {
        libc::setxattr(
            p.as_ptr(),
            c"stackfs.fault".as_ptr(),
            cmd.as_ptr().cast(),
            cmd.len(),
            0,
        )
    };
    assert_eq!(
        r,
        0,
        "fault command {cmd:?}: {}",
        std::io::Error::last_os_error()
    );
}

fn fault_status(mnt: &Path) -> String {
    String::from_utf8_lossy(&getxattr(mnt, c"stackfs.fault")).into_owned()
}

fn writes(status: &str) -> u64 {
    counter(status, "writes=")
}

/// A counter of the fault status line, e.g. `injected=`.
fn counter(status: &str, key: &str) -> u64 {
    status
        .split_whitespace()
        .find_map(|w| w.strip_prefix(key))
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

fn content(tag: &str, i: usize) -> Vec<u8> {
    let len = 1000 + (i * 37_813) % 200_000;
    let mut x = (i as u64 + 1) * 0x9E37_79B9_7F4A_7C15;
    let mut v = format!("{tag}-{i}:").into_bytes();
    v.extend((0..len).map(|_| {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        // Half text, half noise: both compressed and raw units get exercised.
        if x % 2 == 0 {
            b'a' + (x % 26) as u8
        } else {
            x as u8
        }
    }));
    v
}

/// The states each path goes through, and which of them were durable
/// (acknowledged by fsync while the power was still on).
#[derive(Default)]
struct Journal {
    states: BTreeMap<String, Vec<Option<Vec<u8>>>>,
    durable: BTreeMap<String, usize>,
    /// Hard links made to a path.
    links: BTreeMap<String, Vec<String>>,
    /// Paths whose last operation failed half-way (after the cut).
    unknown: std::collections::BTreeSet<String>,
}

impl Journal {
    fn set(&mut self, path: &str, state: Option<Vec<u8>>) {
        let s = self
            .states
            .entry(path.to_string())
            .or_insert_with(|| vec![None]);
        s.push(state);
    }
    /// The current state of `paths` reached the disk if the power was on.
    fn synced(&mut self, mnt: &Path, paths: &[&str]) {
        if fault_status(mnt).contains("power=on") {
            for p in paths {
                let n = self.states[*p].len() - 1;
                self.durable.insert(p.to_string(), n);
            }
        }
    }
}

fn fsync_path(p: &Path) -> std::io::Result<()> {
    fs::File::open(p)?.sync_all()
}

fn put(mnt: &Path, name: &str, data: &[u8]) -> std::io::Result<()> {
    let mut f = fs::File::create(mnt.join(name))?;
    f.write_all(data)?;
    f.sync_all()
}

/// Writes, fsyncs, atomic replaces by rename, truncates, hard links. Returns
/// what it did, and what was durable when a cut is armed. Once the power is
/// cut, reads of data written after the cut fail (the device never got it):
/// the workload stops at its first error then, and only then.
fn workload(mnt: &Path) -> Journal {
    let mut j = Journal::default();
    let step = |j: &mut Journal,
                paths: &[&str],
                op: &mut dyn FnMut(&mut Journal) -> std::io::Result<()>|
     -> bool {
        match op(j) {
            Ok(()) => true,
            Err(e) => {
                assert!(
                    fault_status(mnt).contains("power=cut"),
                    "error with the power on: {e}"
                );
                // What these paths hold now is not known.
                j.unknown.extend(paths.iter().map(|p| p.to_string()));
                false
            }
        }
    };
    for i in 0..24 {
        let f = format!("f{i}");
        let ok = step(&mut j, &[&f], &mut |j| {
            let data = content("f", i);
            put(mnt, &f, &data)?;
            fsync_path(mnt)?;
            j.set(&f, Some(data));
            j.synced(mnt, &[&f]);
            Ok(())
        });
        // Atomic replace: write a temporary, fsync it, rename over "cur".
        let ok = ok
            && step(&mut j, &["tmp"], &mut |j| {
                let next = content("cur", i);
                put(mnt, "tmp", &next)?;
                fs::rename(mnt.join("tmp"), mnt.join("cur"))?;
                j.set("cur", Some(next));
                fsync_path(mnt)?;
                j.synced(mnt, &["cur"]);
                Ok(())
            });
        let g = format!("f{}", i.max(1) - 1);
        let mut names = vec![g.clone()];
        names.extend(j.links.get(&g).cloned().unwrap_or_default());
        let name_refs: Vec<&str> = names.iter().map(|n| n.as_str()).collect();
        let ok = ok
            && (i % 3 != 2
                || step(&mut j, &name_refs, &mut |j| {
                    let mut half = j.states[&g].last().cloned().flatten().unwrap();
                    half.truncate(half.len() / 2);
                    let file = fs::OpenOptions::new().write(true).open(mnt.join(&g))?;
                    file.set_len(half.len() as u64)?;
                    // Every name of the inode sees the truncation.
                    for n in &names {
                        j.set(n, Some(half.clone()));
                    }
                    file.sync_all()?;
                    j.synced(mnt, &name_refs);
                    Ok(())
                }));
        let h = format!("h{i}");
        let ok = ok
            && (i % 4 != 1
                || step(&mut j, &[&h], &mut |j| {
                    fs::hard_link(mnt.join(&f), mnt.join(&h))?;
                    j.set(&h, j.states[&f].last().cloned().flatten());
                    j.links.entry(f.clone()).or_default().push(h.clone());
                    fsync_path(mnt)?;
                    j.synced(mnt, &[&h]);
                    Ok(())
                }));
        // Never synced: may or may not survive, but must read cleanly.
        let loose = format!("loose{i}");
        let ok = ok
            && (i % 5 != 4
                || step(&mut j, &[&loose], &mut |_| {
                    fs::write(mnt.join(&loose), content("loose", i))
                }));
        if !ok {
            break;
        }
    }
    j
}

/// Checks the remounted pool against the journal; returns what every listed
/// name read.
fn check(mnt: &Path, j: &Journal, cut: u64) -> BTreeMap<String, Vec<u8>> {
    let mut listed: Vec<String> = fs::read_dir(mnt)
        .unwrap_or_else(|e| panic!("cut {cut}: readdir failed: {e}"))
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    listed.sort();
    let mut read = BTreeMap::new();
    for name in listed {
        // Everything present reads without error (no torn or corrupt extent).
        let data =
            fs::read(mnt.join(&name)).unwrap_or_else(|e| panic!("cut {cut}: reading {name}: {e}"));
        read.insert(name, data);
    }
    for (path, states) in &j.states {
        if j.unknown.contains(path) {
            continue;
        }
        let actual = fs::read(mnt.join(path)).ok();
        let from = j.durable.get(path).copied().unwrap_or(0);
        assert!(
            states[from..].iter().any(|s| *s == actual),
            "cut {cut}: {path} is in none of its states from #{from} on (len {:?}; durable states have lens {:?})",
            actual.as_ref().map(|a| a.len()),
            states[from..].iter().map(|s| s.as_ref().map(|v| v.len())).collect::<Vec<_>>()
        );
    }
    read
}

/// Copies per mirror group of a layer spec (1 without a mirror).
fn copies(layers: &str) -> usize {
    layers
        .split(',')
        .find_map(|l| l.strip_prefix("mirror="))
        .map_or(1, |n| n.parse().expect("mirror=N in the test's spec"))
}

/// After a fresh mount (empty caches), every file again, with reads from the
/// first copy of each mirror group failing, so the other copy serves them:
/// both copies must give what the first read gave. Returns the reads the
/// fault layer turned away (the second copy served those).
fn reread_from_second_copies(
    p: &Pool,
    devices: usize,
    copies: usize,
    first: &BTreeMap<String, Vec<u8>>,
    cut: u64,
) -> u64 {
    p.mount();
    for dev in (0..devices).step_by(copies) {
        fault(&p.mnt, &format!("error read dev={dev}"));
    }
    for (name, data) in first {
        let again = fs::read(p.mnt.join(name)).unwrap_or_else(|e| {
            panic!("cut {cut}: reading {name} from the second copies failed: {e}")
        });
        assert!(
            again == *data,
            "cut {cut}: {name} reads differently from the second copies (len {} then {})",
            data.len(),
            again.len()
        );
    }
    let turned_away = counter(&fault_status(&p.mnt), "injected=");
    p.umount();
    turned_away
}

fn mkfs(p: &Pool, layers: &str) {
    let args = [
        "mkfs",
        "--force",
        "--size",
        "96M",
        "--kdf-memory",
        "8M",
        "--kdf-time",
        "1",
        "--layers",
        layers,
    ];
    let paths: Vec<String> = p.imgs.iter().map(|i| i.display().to_string()).collect();
    let mut all: Vec<&str> = args.to_vec();
    all.extend(paths.iter().map(|s| s.as_str()));
    ok(stackfs(&all));
}

/// The crash group: the workload on a pool of `devices` image files with
/// `layers` (which must hold `fault`), cut at `points` write counts spread
/// over it, each on a fresh pool; after each cut the remounted pool is
/// checked against the journal, read from the second copies when mirrored,
/// and fsck'd.
fn power_cuts(layers: &str, devices: usize, points: u64) {
    let started = std::time::Instant::now();
    let p = Pool::with(devices, "96M", &["--layers", layers, "--force"]);
    // A run without a cut: how many writes reach the devices in all.
    p.mount();
    let before = writes(&fault_status(&p.mnt));
    let full = workload(&p.mnt);
    let total = writes(&fault_status(&p.mnt)) - before;
    p.umount();
    p.mount();
    check(&p.mnt, &full, u64::MAX);
    p.umount();
    assert!(total > points, "the workload makes only {total} writes");

    let copies = copies(layers);
    let (mut cuts_with_loss, mut turned_away) = (0, 0);
    for n in 0..points {
        // Fresh pool each time; the cut counts writes from when it is armed.
        let cut = n * total / points;
        mkfs(&p, layers);
        p.mount();
        fault(&p.mnt, &format!("cut-after {cut}"));
        let j = workload(&p.mnt);
        if fault_status(&p.mnt).contains("power=cut") {
            cuts_with_loss += 1;
        }
        p.umount();
        p.mount();
        let first = check(&p.mnt, &j, cut);
        p.umount();
        if copies > 1 {
            turned_away += reread_from_second_copies(&p, devices, copies, &first, cut);
        }
        let f = stackfs(&["fsck", &p.source()]);
        assert_eq!(
            f.status.code(),
            Some(0),
            "cut {cut}: fsck: {}",
            String::from_utf8_lossy(&f.stdout)
        );
    }
    let second = if copies > 1 {
        format!("; {turned_away} reads served by second copies")
    } else {
        String::new()
    };
    eprintln!(
        "{layers} over {devices} devices: {points} power-cut points over {total} writes; \
         {cuts_with_loss} cut before the end{second}; {:.1} s",
        started.elapsed().as_secs_f64()
    );
    assert!(
        cuts_with_loss >= points - 2,
        "most runs must actually lose power"
    );
    assert!(
        copies == 1 || turned_away > 0,
        "no read was turned away from a first copy: the second copies were not read"
    );
}

#[test]
fn power_cut_at_200_points() {
    power_cuts(LAYERS, 3, 200);
}

/// RAID-10 (two mirrors of two, striped) with a fault layer below each
/// mirror member, all on one control: a cut may fall between the copies of
/// one write, so the copies differ in what was in flight.
#[test]
fn power_cut_on_a_mirrored_pool() {
    power_cuts(MIRRORED, 4, MIRRORED_POINTS);
}

/// The classic safe replace: write a new version under a temporary name,
/// close it without fsync, rename it over the old file; then an unrelated
/// fsync makes that rename durable, and the power goes. The name must hold
/// the old or the new content, never the new size without its data. (Closed
/// files are flushed in groups, so this needs the rename to write the
/// file's data first, and fsync to take closed files' data along.)
#[test]
fn replace_by_rename_survives_a_later_fsync_and_power_cut() {
    let p = Pool::with(3, "96M", &["--layers", LAYERS, "--force"]);
    p.mount();
    let (old, new) = (content("old", 1), content("new", 2));
    put(&p.mnt, "target", &old).unwrap();
    fsync_path(&p.mnt).unwrap();
    fs::write(p.mnt.join("target.tmp"), &new).unwrap();
    fs::rename(p.mnt.join("target.tmp"), p.mnt.join("target")).unwrap();
    put(&p.mnt, "other", b"unrelated").unwrap();
    fault(&p.mnt, "cut");
    p.umount();
    p.mount();
    let got = fs::read(p.mnt.join("target")).unwrap();
    assert!(
        got == old || got == new,
        "target is neither version (len {}, old {}, new {})",
        got.len(),
        old.len(),
        new.len()
    );
    assert_eq!(fs::read(p.mnt.join("other")).unwrap(), b"unrelated");
    p.umount();
}
