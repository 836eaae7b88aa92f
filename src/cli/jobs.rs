//! `stackfs scrub` and `stackfs replace`: ask a mounted pool's daemon for the
//! job through its root's control xattrs and follow it with a progress bar;
//! `scrub` of a pool that is not mounted runs here instead.

use super::info::{daemon_json, set_control};
use super::open::open_fs;
use super::umount::find_mount;
use super::{CliResult, KeyArgs};
use serde_json::Value;
use stackfs::rebuild::scrub::{self, ScrubReport, OPERATIONAL};
use stackfs::rebuild::Progress;
use std::ffi::CStr;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// How often the job's progress is asked for.
const POLL: Duration = Duration::from_millis(200);

/// A progress bar over bytes.
fn bar() -> indicatif::ProgressBar {
    let bar =
        indicatif::ProgressBar::with_draw_target(Some(0), indicatif::ProgressDrawTarget::stderr());
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    bar
}

/// Set a control xattr of the mount's root; a refusal's reason is in
/// `stackfs.job`.
fn command(mountpoint: &Path, name: &CStr, value: &str) -> Result<(), String> {
    let Err(error) = set_control(mountpoint, name, value) else {
        return Ok(());
    };
    let why = daemon_json(mountpoint, c"stackfs.job")
        .and_then(|s| s["last"]["error"].as_str().map(str::to_string));
    Err(why.unwrap_or_else(|| match error.raw_os_error() {
        Some(libc::EROFS) => "the pool is mounted read-only".into(),
        Some(libc::EPERM | libc::EACCES) => {
            "only root (or the user who mounted the pool) may do that".into()
        }
        _ => format!("the daemon refused: {error}"),
    }))
}

/// Follow the daemon's job until it ends; returns how it ended.
fn follow(mountpoint: &Path, job: &str) -> Result<Value, String> {
    let bar = bar();
    let asked = std::time::Instant::now();
    let mut seen_running = false;
    loop {
        let status = daemon_json(mountpoint, c"stackfs.job")
            .ok_or("the daemon no longer answers (unmounted?)")?;
        let running = &status["running"];
        if running.is_object() {
            seen_running = true;
            bar.set_message(running["what"].as_str().unwrap_or(job).to_string());
            bar.set_length(running["total"].as_u64().unwrap_or(0));
            bar.set_position(running["done"].as_u64().unwrap_or(0));
        } else if status["last"].is_object() && status["queued_scrub"] != true {
            bar.finish_and_clear();
            return Ok(status["last"].clone());
        } else if !seen_running && asked.elapsed() > Duration::from_secs(60) {
            bar.finish_and_clear();
            return Err(format!("the daemon has not started the {job}"));
        }
        std::thread::sleep(POLL);
    }
}

fn human(bytes: u64) -> String {
    indicatif::HumanBytes(bytes).to_string()
}

/// The scrub report, as text.
fn print_report(source: &str, r: &Value) {
    let sum = |key: &str| -> u64 {
        r["copies"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|c| {
                c["metadata"][key].as_u64().unwrap_or(0) + c["data"][key].as_u64().unwrap_or(0)
            })
            .sum()
    };
    println!(
        "scrub of {source}: {} checked in {:.1} s; {} bad, {} repaired, {} unrepaired{}",
        human(sum("bytes")),
        r["seconds"].as_f64().unwrap_or(0.0),
        sum("bad"),
        sum("repaired"),
        sum("unrepaired"),
        if r["stopped"].as_bool() == Some(true) {
            " (stopped before the end)"
        } else {
            ""
        }
    );
    for c in r["copies"].as_array().into_iter().flatten() {
        let part = |p: &Value, what: &str| {
            format!(
                "{} {what} ({} bad, {} repaired)",
                p["items"], p["bad"], p["repaired"]
            )
        };
        println!(
            "  copy {}: {}, {}",
            c["copy"],
            part(&c["metadata"], "metadata slots"),
            part(&c["data"], "data units")
        );
    }
    for s in r["skipped"].as_array().into_iter().flatten() {
        println!("  skipped {}", s.as_str().unwrap_or(""));
    }
    println!(
        "  {:<4} {:<36} {:<9} {:>10} {:>9} {:>9} {:>9}",
        "", "device", "state", "read", "read err", "cksum err", "repaired"
    );
    for d in r["devices"].as_array().into_iter().flatten() {
        println!(
            "  [{}]  {:<36} {:<9} {:>10} {:>9} {:>9} {:>9}",
            d["index"],
            d["path"].as_str().unwrap_or(""),
            d["state"].as_str().unwrap_or(""),
            human(d["read_bytes"].as_u64().unwrap_or(0)),
            d["read_errors"].as_u64().unwrap_or(0),
            d["checksum_errors"].as_u64().unwrap_or(0),
            human(d["bytes_repaired"].as_u64().unwrap_or(0)),
        );
    }
    for l in r["lost"].as_array().into_iter().flatten() {
        println!(
            "  lost: inode {} at offset {} (no copy holds it intact)",
            l["inode"], l["offset"]
        );
    }
}

/// `stackfs scrub SOURCE`: online when mounted (the daemon scrubs; this
/// follows it), else here. Returns fsck-style exit codes: 0 clean, 1 all
/// repaired, 4 damage left, 8 could not scrub.
pub fn scrub(source: &str, rate: Option<u64>, stop: bool, json: bool, key: &KeyArgs) -> u8 {
    let outcome = match find_mount(source) {
        Some(m) if stop => command(&m.mountpoint, c"stackfs.scrub", "stop").map(|_| None),
        Some(m) => scrub_online(&m.mountpoint, rate).map(Some),
        None if stop => Err(format!("{source}: not mounted, no scrub to stop")),
        None => scrub_offline(source, rate, key).map(Some),
    };
    match outcome {
        Ok(None) => 0,
        Ok(Some(report)) => {
            if json {
                println!("{report}");
            } else {
                print_report(source, &report);
            }
            report["exit_code"].as_u64().unwrap_or(OPERATIONAL as u64) as u8
        }
        Err(e) => {
            eprintln!("stackfs scrub: {e}");
            OPERATIONAL
        }
    }
}

fn scrub_online(mountpoint: &Path, rate: Option<u64>) -> Result<Value, String> {
    let start = match rate {
        Some(r) => format!("start rate={r}"),
        None => "start".into(),
    };
    command(mountpoint, c"stackfs.scrub", &start)?;
    let last = follow(mountpoint, "scrub")?;
    match last["error"].as_str() {
        Some(e) => Err(e.to_string()),
        None => Ok(last),
    }
}

fn scrub_offline(source: &str, rate: Option<u64>, key: &KeyArgs) -> Result<Value, String> {
    let fs = open_fs(source, key, false).map_err(|e| e.to_string())?;
    let progress = Progress::default();
    let report: Result<ScrubReport, String> = std::thread::scope(|s| {
        let walk = s.spawn(|| scrub::scrub(&fs, rate, &progress));
        let bar = bar();
        while !walk.is_finished() {
            bar.set_message(progress.what());
            bar.set_length(progress.total.load(std::sync::atomic::Ordering::Relaxed));
            bar.set_position(progress.done.load(std::sync::atomic::Ordering::Relaxed));
            std::thread::sleep(POLL);
        }
        bar.finish_and_clear();
        match walk.join() {
            Ok(r) => r.map_err(|e| e.to_string()),
            Err(_) => Err("the scrub stopped on an internal error".into()),
        }
    });
    let closed = fs.shutdown();
    let report = report?;
    closed.map_err(|e| format!("closing the pool: {e}"))?;
    Ok(report.to_json())
}

/// `stackfs replace SOURCE OLD NEW`: rebuild a member of a mounted pool
/// onto a new device; follows the rebuild unless `no_wait`.
pub fn replace(source: &str, old: &str, new: &Path, no_wait: bool) -> CliResult {
    let mount = find_mount(source).ok_or(format!(
        "{source}: not mounted; replace works on a mounted pool (mount it first, \
         with -o degraded if a member is missing)"
    ))?;
    let absolute = |p: &Path| -> PathBuf {
        std::env::current_dir()
            .map(|d| d.join(p))
            .unwrap_or(p.to_path_buf())
    };
    let old_named = if Path::new(old).exists() {
        absolute(Path::new(old)).display().to_string()
    } else {
        old.to_string()
    };
    let request = format!("{old_named}\n{}", absolute(new).display());
    command(&mount.mountpoint, c"stackfs.replace", &request)?;
    if no_wait {
        println!(
            "replacing {old} with {}; follow it with stackfs info",
            new.display()
        );
        return Ok(());
    }
    let last = follow(&mount.mountpoint, "replace")?;
    if let Some(e) = last["error"].as_str() {
        return Err(format!("replace: {e}").into());
    }
    if last["stopped"].as_bool() == Some(true) {
        return Err(
            "replace stopped before the end (unmounted?); it goes on at the next mount".into(),
        );
    }
    println!(
        "member {} is now {} (the old device's superblocks are cleared)",
        last["member"],
        last["new"].as_str().unwrap_or("")
    );
    Ok(())
}
