//! `stackfs info`: a pool's devices, layers and usage; for a mounted pool,
//! the daemon's live counters and member health.

use super::secret::passphrase;
use super::{CliResult, KeyArgs, LOCK_WAIT};
use serde_json::{json, Value};
use stackfs::fs::{Fs, FsOptions};
use stackfs::keys::KeyBlob;
use stackfs::lock::{self, Mode};
use stackfs::pool::{self, parse_source, uuid_str};
use stackfs::superblock::Superblock;
use std::ffi::{CStr, CString};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// What `pool::inspect` found: each device's path, size and superblock.
type Found = [(PathBuf, u64, Superblock)];

pub fn info(source: &str, key: &KeyArgs, json: bool) -> CliResult {
    let paths = parse_source(source);
    if paths.is_empty() {
        return Err("no devices given".into());
    }
    // A member that stops answering (an image on a stopped FUSE or network
    // server) blocks every stat and read of it: probe it from a thread, and
    // if it does not answer, show what the mounted daemon knows.
    let probe_path = paths[0].clone();
    let (sender, receiver) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = sender.send(lock::mount_of(&probe_path));
    });
    let mounted = match receiver.recv_timeout(Duration::from_secs(5)) {
        Ok(mount) => mount,
        Err(_) => return info_unanswered(source, &paths, json),
    };
    // A shared lock keeps fsck and passwd out while we read; a mounted pool
    // is read without one (superblocks only, and the daemon's counters).
    let _shared = match mounted {
        Some(_) => None,
        None => Some(lock::lock(&paths, Mode::Shared, LOCK_WAIT)?),
    };
    let (found, warnings) = pool::inspect(&paths)?;
    for warning in &warnings {
        eprintln!("stackfs: warning: {warning}");
    }
    let superblock = &found[0].2;
    let encryption = encryption(&found);
    let mut out = describe(&found, &encryption);
    let mountpoint = lock::mount_of(&paths[0]).map(|m| m.mountpoint.display().to_string());
    if let Some(mountpoint) = &mountpoint {
        add_live(&mut out, mountpoint)?;
    } else {
        add_usage(&mut out, &paths, superblock, key);
    }
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&out).map_err(|e| e.to_string())?
        );
        return Ok(());
    }
    print_pool(&out, &found, encryption.as_deref(), mountpoint.as_deref());
    print_usage(&out);
    Ok(())
}

/// How an encrypted pool is unlocked, from its newest superblock.
fn encryption(found: &Found) -> Option<String> {
    let superblock = &found[0].2;
    (!superblock.keys.is_empty()).then(|| {
        let newest = found
            .iter()
            .max_by_key(|(_, _, s)| s.generation)
            .map(|(_, _, s)| KeyBlob::decode(&s.keys));
        match newest {
            Some(Ok(blob)) => format!("aes-256-gcm, unlocked by {}", blob.describe()),
            _ => "aes-256-gcm, key material unreadable".into(),
        }
    })
}

/// How many copies a pool's layer spec keeps of each byte (1 without a mirror).
fn mirror_copies(spec: &str) -> u64 {
    let parsed = stackfs_layers::StackSpec::parse(spec).ok();
    let copies = parsed
        .into_iter()
        .flat_map(|s| s.layers)
        .find_map(|l| match l {
            stackfs_layers::LayerSpec::Mirror { copies } => Some(copies as u64),
            _ => None,
        });
    copies.unwrap_or(1).max(1)
}

/// What the superblocks say, as JSON.
fn describe(found: &Found, encryption: &Option<String>) -> Value {
    let superblock = &found[0].2;
    let devices: Vec<_> = found
        .iter()
        .map(|(p, size, d)| json!({"index": d.index, "path": p.display().to_string(), "size": size, "uuid": uuid_str(&d.device_uuid)}))
        .collect();
    json!({
        "pool": uuid_str(&superblock.pool_uuid),
        "layers": superblock.spec,
        "encryption": encryption,
        "devices": devices,
        // Usable space: a mirror keeps every byte on each of its copies.
        "capacity": superblock.per_device * superblock.count as u64 / mirror_copies(&superblock.spec),
        "raw_capacity": superblock.per_device * superblock.count as u64,
        "metadata_region": superblock.meta_len,
        "members_recorded": recorded_states(found),
    })
}

/// What the superblocks record about the members' copies: who missed
/// writes (and how far its resync got), a replace in progress, who is
/// missing here.
fn recorded_states(found: &Found) -> Value {
    let states = pool::members::current(&found.to_vec());
    let count = found[0].2.count;
    let missing: Vec<u32> = (0..count)
        .filter(|i| !found.iter().any(|(_, _, s)| s.index == *i))
        .collect();
    json!({
        "stale": states.stale.iter().map(|(i, c)| json!({"member": i, "resynced_to": c})).collect::<Vec<_>>(),
        "replacing": states.replace.as_ref().map(|r| json!({"member": r.index, "new": r.path, "rebuilt_to": r.cursor})),
        "missing": missing,
    })
}

/// Live counters and member health from the daemon, and space as statfs
/// sees it.
fn add_live(out: &mut Value, mountpoint: &str) -> CliResult {
    out["mounted_at"] = json!(mountpoint);
    let path = CString::new(mountpoint).map_err(|e| e.to_string())?;
    if let Some(v) = daemon_json(Path::new(mountpoint), c"stackfs.stats") {
        out["layer_counters"] = v;
    }
    if let Some(v) = daemon_json(Path::new(mountpoint), c"stackfs.health") {
        out["health"] = v;
    }
    // SAFETY: statvfs fills the struct we pass.
    let mut stats: libc::statvfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statvfs(path.as_ptr(), &mut stats) } == 0 {
        out["data_space"] = json!(stats.f_blocks * stats.f_frsize);
        out["free"] = json!(stats.f_bavail * stats.f_frsize);
        out["inodes"] = json!(stats.f_files - stats.f_ffree);
    }
    Ok(())
}

/// Usage of a pool that is not mounted, read from its metadata (an
/// encrypted pool needs its key); why not, when it cannot be read.
fn add_usage(out: &mut Value, paths: &[PathBuf], superblock: &Superblock, key: &KeyArgs) {
    let usage = || -> CliResult<_> {
        let secret = match superblock.keys.is_empty() {
            true => None,
            false => Some(passphrase(key)?),
        };
        let pool = pool::open(
            paths,
            true,
            secret.as_ref(),
            Some(pool::DEFAULT_TIMEOUT),
            None,
            true,
        )?;
        let fs = Fs::open(
            pool,
            FsOptions {
                read_only: true,
                cache_bytes: 16 << 20,
                lenient: true,
                ..FsOptions::default()
            },
        )?;
        let usage = fs.usage().map_err(|e| e.to_string())?;
        let space = fs.space().map_err(|e| e.to_string())?;
        Ok((usage, space))
    };
    match usage() {
        Ok((usage, space)) => {
            out["data_space"] = json!(usage.total);
            out["free"] = json!(usage.free);
            out["inodes"] = json!(usage.inodes);
            out["logical_bytes"] = json!(space.logical);
            out["stored_bytes"] = json!(space.stored);
        }
        Err(e) => out["usage_unavailable"] = json!(e.to_string()),
    }
}

fn mib(value: &Value) -> u64 {
    value.as_u64().unwrap_or(0) >> 20
}

/// The pool, its devices, and the daemon's view of its members.
fn print_pool(out: &Value, found: &Found, encryption: Option<&str>, mountpoint: Option<&str>) {
    let superblock = &found[0].2;
    println!("pool:        {}", out["pool"].as_str().unwrap_or(""));
    println!(
        "layers:      {}",
        if superblock.spec.is_empty() {
            "(none)"
        } else {
            &superblock.spec
        }
    );
    if let Some(e) = encryption {
        println!("encryption:  {e}");
    }
    println!("devices:     {}", superblock.count);
    for (path, size, device) in found {
        print_device(path, *size, device);
    }
    println!(
        "capacity:    {} MiB (metadata region {} MiB)",
        mib(&out["capacity"]),
        mib(&out["metadata_region"])
    );
    if let Some(m) = mountpoint {
        println!("state:       mounted at {m}");
    }
    match out["health"].as_object() {
        Some(health) => print_health(health),
        None => print_recorded(&out["members_recorded"]),
    }
}

/// The record in the superblocks of a pool that is not mounted.
fn print_recorded(recorded: &Value) {
    for i in recorded["missing"].as_array().into_iter().flatten() {
        println!("  [{i}] missing (mount -o degraded uses the pool without it)");
    }
    for s in recorded["stale"].as_array().into_iter().flatten() {
        println!(
            "  member {} missed writes; its resync (at {} MiB) runs at the next read-write mount",
            s["member"],
            s["resynced_to"].as_u64().unwrap_or(0) >> 20
        );
    }
    if let Some(r) = recorded["replacing"].as_object() {
        println!(
            "  member {} is being replaced by {} (rebuilt to {} MiB); it goes on at the next mount",
            r["member"],
            r["new"].as_str().unwrap_or("?"),
            r["rebuilt_to"].as_u64().unwrap_or(0) >> 20
        );
    }
}

/// The daemon's view: the pool state (as `zpool status`), the job running
/// or the last one, and each member.
fn print_health(health: &serde_json::Map<String, Value>) {
    match (health["state"].as_str(), health["failure"].as_str()) {
        (Some("failed"), Some(why)) => println!("pool state:  FAILED: {why}"),
        (Some("failed"), None) => println!("pool state:  FAILED: data of a member that stopped answering is not on any other copy; read-only until remounted (fsck after it answers again)"),
        (Some("degraded"), _) => println!("pool state:  DEGRADED: a member is missing, faulted or resyncing; every mirror group still has a good copy"),
        _ => println!("pool state:  ONLINE"),
    }
    if let Some(jobs) = health.get("jobs") {
        print_scan(jobs);
    }
    for member in health["members"].as_array().into_iter().flatten() {
        println!(
            "  [{}] {:<9} {}: {} timeouts, {} late answers, errors: {} read, {} write, {} checksum; {} repairs ({} bytes){}",
            member["index"],
            member["state"].as_str().unwrap_or("?"),
            member["path"].as_str().unwrap_or("?"),
                member["timeouts"],
                member["late_answers"],
                member["read_errors"],
                member["write_errors"],
                member["checksum_errors"],
                member["repairs"],
            member["bytes_repaired"],
            why(member)
        );
    }
}

/// The `scan:` line: the job running with its progress, or the last one.
fn print_scan(jobs: &Value) {
    let running = &jobs["running"];
    if running.is_object() {
        let (done, total) = (
            running["done"].as_u64().unwrap_or(0),
            running["total"].as_u64().unwrap_or(0).max(1),
        );
        println!(
            "scan:        {} in progress: {:.1}% ({} of {} MiB)",
            running["what"].as_str().unwrap_or("?"),
            100.0 * done as f64 / total as f64,
            done >> 20,
            total >> 20
        );
        return;
    }
    let last = &jobs["last"];
    if let Some(e) = last["error"].as_str() {
        println!(
            "scan:        the last {} failed: {e}",
            last["job"].as_str().unwrap_or("job")
        );
    } else if last["copies"].is_array() {
        println!(
            "scan:        scrub done in {:.1} s, exit code {} (stackfs scrub --json for the report)",
            last["seconds"].as_f64().unwrap_or(0.0),
            last["exit_code"]
        );
    } else if let Some(job) = last["job"].as_str() {
        println!("scan:        {job} of member {} done", last["member"]);
    }
}

fn print_device(path: &Path, size: u64, device: &Superblock) {
    println!(
        "  [{}] {}  {} MiB  device {}",
        device.index,
        path.display(),
        size >> 20,
        uuid_str(&device.device_uuid)
    );
}

/// Usage, stored data and the layer counters.
fn print_usage(out: &Value) {
    if let Some(e) = out["usage_unavailable"].as_str() {
        println!("usage:       unavailable ({e})");
    } else {
        let (total, free) = (mib(&out["data_space"]), mib(&out["free"]));
        println!(
            "used:        {} MiB of {total} MiB data space",
            total.saturating_sub(free)
        );
        println!("inodes:      {}", out["inodes"].as_u64().unwrap_or(0));
    }
    if let (Some(logical), Some(stored)) =
        (out["logical_bytes"].as_u64(), out["stored_bytes"].as_u64())
    {
        let ratio = if stored > 0 {
            logical as f64 / stored as f64
        } else {
            1.0
        };
        println!(
            "data:        {} MiB logical in {} MiB stored (ratio {ratio:.2})",
            logical >> 20,
            stored >> 20
        );
    }
    if let Some(nodes) = out["layer_counters"].as_array() {
        println!("layer counters:");
        for node in nodes {
            println!(
                "  {:indent$}{:<24} {:>9} req {:>8} MiB read {:>8} MiB written {:>4} err  p50 {}µs p99 {}µs",
                "",
                node["layer"].as_str().unwrap_or(""),
                node["requests"],
                mib(&node["read_bytes"]),
                mib(&node["write_bytes"]),
                node["errors"],
                node["latency_p50_us"],
                node["latency_p99_us"],
                indent = 2 * node["depth"].as_u64().unwrap_or(0) as usize
            );
        }
    }
}

/// A member's reason for its state, as " (why)", or nothing.
fn why(member: &Value) -> String {
    member["why"]
        .as_str()
        .map(|w| format!(" ({w})"))
        .unwrap_or_default()
}

/// A JSON control xattr of a mounted pool's root, answered by its daemon.
pub(super) fn daemon_json(mountpoint: &Path, name: &CStr) -> Option<Value> {
    let path = CString::new(mountpoint.as_os_str().as_encoded_bytes()).ok()?;
    let mut buf = vec![0u8; 1 << 16];
    // SAFETY: valid C strings; the buffer outlives the call.
    let n = unsafe {
        libc::getxattr(
            path.as_ptr(),
            name.as_ptr(),
            buf.as_mut_ptr().cast(),
            buf.len(),
        )
    };
    (n > 0)
        .then(|| serde_json::from_slice(&buf[..n as usize]).ok())
        .flatten()
}

/// Set a control xattr of a mounted pool's root (its daemon acts on it).
pub(super) fn set_control(mountpoint: &Path, name: &CStr, value: &str) -> std::io::Result<()> {
    let path =
        CString::new(mountpoint.as_os_str().as_encoded_bytes()).map_err(std::io::Error::other)?;
    // SAFETY: valid C strings; the value outlives the call.
    let r = unsafe {
        libc::setxattr(
            path.as_ptr(),
            name.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            0,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// `info` when the devices do not answer: the daemon's view of its members,
/// from the mount whose source names them (found without touching them).
fn info_unanswered(source: &str, paths: &[PathBuf], json: bool) -> CliResult {
    let names: Vec<String> = paths.iter().map(|p| p.display().to_string()).collect();
    let mount = lock::mounts().into_iter().rev().find(|m| {
        m.fstype.starts_with("fuse")
            && (m.source == source || names.iter().any(|n| m.source.split(':').any(|s| s == n)))
    });
    let health = mount
        .as_ref()
        .and_then(|m| daemon_json(&m.mountpoint, c"stackfs.health"));
    if json {
        println!(
            "{}",
            json!({"devices_answer": false, "mounted_at": mount.as_ref().map(|m| m.mountpoint.display().to_string()), "health": health})
        );
    } else {
        println!("devices:     not answering within 5 s (a member is hung)");
        if let Some(m) = &mount {
            println!("state:       mounted at {}", m.mountpoint.display());
        }
        if let Some(health) = &health {
            println!(
                "pool state:  {}",
                health["state"].as_str().unwrap_or("?").to_uppercase()
            );
            for member in health["members"].as_array().into_iter().flatten() {
                println!(
                    "  [{}] {:<8} {}{}",
                    member["index"],
                    member["state"].as_str().unwrap_or("?"),
                    member["path"].as_str().unwrap_or(""),
                    why(member)
                );
            }
        }
    }
    Err("the pool's devices do not answer".into())
}
