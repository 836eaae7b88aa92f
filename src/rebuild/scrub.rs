//! `scrub`: read every copy of everything the pool holds, verify it, and
//! rewrite what is bad from a good copy. The same walk runs offline (the
//! `scrub` command over an unmounted pool) and online (in the daemon, started
//! through the root's `stackfs.scrub` xattr).
//!
//! Copy by copy: the metadata store's live slots, then every extent of file
//! data, each read from that copy only (`CopyWalk::Check`), verified (CRC,
//! MAC, the store's versions), and on failure read from the other copies,
//! which makes the mirror rewrite the bad one. A copy whose member is
//! missing, faulted or resyncing is skipped and said so.

use super::{Pace, Progress};
use crate::error::FsError;
use crate::fs::{CopyWalk, Fs, WalkCounts};
use serde_json::json;
use std::time::Instant;

/// fsck's exit codes, which scrub follows.
pub const CLEAN: u8 = 0;
pub const REPAIRED: u8 = 1;
pub const UNREPAIRED: u8 = 4;
pub const OPERATIONAL: u8 = 8;

/// One member's part in a scrub.
#[derive(Clone, Debug, Default)]
pub struct DeviceReport {
    pub index: usize,
    pub path: String,
    pub state: String,
    /// Bytes read from it during the scrub.
    pub read_bytes: u64,
    pub read_errors: u64,
    pub checksum_errors: u64,
    pub repairs: u64,
    pub bytes_repaired: u64,
}

/// What a scrub checked, found and repaired.
#[derive(Clone, Debug, Default)]
pub struct ScrubReport {
    /// Per copy walked: (copy, metadata, data).
    pub copies: Vec<(usize, WalkCounts, WalkCounts)>,
    /// Copies not walked, and why.
    pub skipped: Vec<String>,
    pub devices: Vec<DeviceReport>,
    /// File data no copy holds intact: (inode, byte offset of the unit).
    pub lost: Vec<(u64, u64)>,
    pub seconds: f64,
    /// Stopped before the end (`stackfs scrub --stop`, unmount).
    pub stopped: bool,
}

impl ScrubReport {
    fn total(&self) -> WalkCounts {
        let mut all = WalkCounts::default();
        for (_, meta, data) in &self.copies {
            all.add(meta);
            all.add(data);
        }
        all
    }

    /// 0: nothing bad; 1: everything bad was repaired; 4: some was not.
    pub fn exit_code(&self) -> u8 {
        let all = self.total();
        if all.unrepaired > 0 {
            UNREPAIRED
        } else if all.bad > 0 {
            REPAIRED
        } else {
            CLEAN
        }
    }

    pub fn to_json(&self) -> serde_json::Value {
        let counts = |c: &WalkCounts| {
            json!({"items": c.items, "bytes": c.bytes, "bad": c.bad,
                   "repaired": c.repaired, "unrepaired": c.unrepaired})
        };
        let copies: Vec<_> = self
            .copies
            .iter()
            .map(|(copy, meta, data)| json!({"copy": copy, "metadata": counts(meta), "data": counts(data)}))
            .collect();
        let devices: Vec<_> = self
            .devices
            .iter()
            .map(|d| {
                json!({"index": d.index, "path": d.path, "state": d.state,
                       "read_bytes": d.read_bytes, "read_errors": d.read_errors,
                       "checksum_errors": d.checksum_errors, "repairs": d.repairs,
                       "bytes_repaired": d.bytes_repaired})
            })
            .collect();
        json!({
            "copies": copies,
            "skipped": self.skipped,
            "devices": devices,
            "lost": self.lost.iter().map(|(ino, off)| json!({"inode": ino, "offset": off})).collect::<Vec<_>>(),
            "seconds": self.seconds,
            "stopped": self.stopped,
            "exit_code": self.exit_code(),
        })
    }
}

/// The counters of each member now: Health's, and the bytes read from its
/// device.
fn member_counters(fs: &Fs) -> Vec<DeviceReport> {
    let reads = device_reads(fs);
    fs.stack
        .health
        .members()
        .into_iter()
        .enumerate()
        .map(|(i, m)| DeviceReport {
            index: i,
            path: m.name.clone(),
            state: m.state().into(),
            read_bytes: reads.get(i).copied().unwrap_or(0),
            read_errors: m.read_errors,
            checksum_errors: m.checksum_errors,
            repairs: m.repairs,
            bytes_repaired: m.bytes_repaired,
        })
        .collect()
}

/// Bytes read from each member's device, in pool order (the stack's leaves).
fn device_reads(fs: &Fs) -> Vec<u64> {
    stackfs_layers::spec::walk(&fs.stack.top)
        .into_iter()
        .filter(|(_, l)| l.lowers().is_empty())
        .map(|(_, l)| l.stats().map_or(0, |s| s.snapshot().read_bytes))
        .collect()
}

/// What happened to each member between `before` and now.
fn difference(before: &[DeviceReport], after: Vec<DeviceReport>) -> Vec<DeviceReport> {
    after
        .into_iter()
        .map(|mut d| {
            if let Some(b) = before.get(d.index) {
                d.read_bytes = d.read_bytes.saturating_sub(b.read_bytes);
                d.read_errors = d.read_errors.saturating_sub(b.read_errors);
                d.checksum_errors = d.checksum_errors.saturating_sub(b.checksum_errors);
                d.repairs = d.repairs.saturating_sub(b.repairs);
                d.bytes_repaired = d.bytes_repaired.saturating_sub(b.bytes_repaired);
            }
            d
        })
        .collect()
}

/// Why copy `copy` cannot be walked: a member holding it is not readable.
fn unreadable(fs: &Fs, copy: usize, copies: usize) -> Option<String> {
    let health = &fs.stack.health;
    (copy..health.count()).step_by(copies).find_map(|i| {
        (!health.is_readable(i)).then(|| {
            let m = &health.members()[i];
            format!("copy {copy}: member {i} ({}) is {}", m.name, m.state())
        })
    })
}

/// Scrub the whole pool at most `rate` bytes per second (None: as fast as
/// it goes), telling `progress`.
pub fn scrub(fs: &Fs, rate: Option<u64>, progress: &Progress) -> Result<ScrubReport, FsError> {
    let started = Instant::now();
    let before = member_counters(fs);
    let copies = fs.copies();
    let per_copy = fs
        .data_to_walk(0)
        .map_err(|e| FsError::io("listing extents", e))?;
    progress.start(per_copy * copies as u64);
    let mut pace = Pace::new(rate);
    let mut report = ScrubReport::default();
    for copy in 0..copies {
        if let Some(why) = unreadable(fs, copy, copies) {
            report.skipped.push(why);
            progress.advance(per_copy);
            continue;
        }
        let mode = CopyWalk::Check { copy };
        progress.say(format!("copy {copy} of {copies}: metadata"));
        let meta = fs.walk_metadata(mode, &|_| {})?;
        progress.say(format!("copy {copy} of {copies}: data"));
        let data = fs
            .walk_data(mode, 0, &mut |step| {
                report.lost.extend_from_slice(step.lost);
                progress.advance(step.bytes);
                pace.after(step.bytes);
                !progress.stopped()
            })
            .map_err(|e| FsError::io("reading file data", e))?;
        report.copies.push((copy, meta, data));
        if progress.stopped() {
            report.stopped = true;
            break;
        }
    }
    report.devices = difference(&before, member_counters(fs));
    report.seconds = started.elapsed().as_secs_f64();
    Ok(report)
}
