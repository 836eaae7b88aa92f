//! The root directory's control xattrs (admin only): layer counters,
//! member health, fault commands for tests, remount options.

use super::FuseFs;
use crate::fs::Fs;
use fuser::Request;

pub(super) const FAULT_XATTR: &[u8] = b"stackfs.fault";
pub(super) const STATS_XATTR: &[u8] = b"stackfs.stats";
/// Bytes of file data the daemon has copied between its own buffers (root only, read-only).
pub(super) const COPIED_XATTR: &[u8] = b"stackfs.copied";
/// The members' health (online, faulted), JSON; `stackfs info` shows it.
pub(super) const HEALTH_XATTR: &[u8] = b"stackfs.health";
/// Set by `stackfs mount -o remount,...`: the atime and sync options the
/// daemon applies itself (the kernel keeps the other flags).
pub(super) const MOUNT_XATTR: &[u8] = b"stackfs.mount";
/// Set by `stackfs scrub`: `start`, `start rate=BYTES`, or `stop`.
pub(super) const SCRUB_XATTR: &[u8] = b"stackfs.scrub";
/// Set by `stackfs replace`: the old member and the new device, one per line.
pub(super) const REPLACE_XATTR: &[u8] = b"stackfs.replace";
/// The background job running (resync, replace, scrub) and how the last one
/// ended, JSON.
pub(super) const JOB_XATTR: &[u8] = b"stackfs.job";

/// Who may read and set the control xattrs: root, and the user running the
/// daemon (a user's own mount).
pub(super) fn is_admin(req: &Request) -> bool {
    // SAFETY: geteuid has no preconditions.
    req.uid() == 0 || req.uid() == unsafe { libc::geteuid() }
}

/// Every layer of the stack with its counters, as JSON (`stackfs info` of a
/// mounted pool reads it from the root's `stackfs.stats` xattr).
pub fn stack_stats(top: &std::sync::Arc<dyn stackfs_layers::Layer>) -> serde_json::Value {
    let nodes: Vec<serde_json::Value> = stackfs_layers::spec::walk(top)
        .into_iter()
        .map(|(depth, l)| {
            let s = l.stats().map(|s| s.snapshot()).unwrap_or_default();
            serde_json::json!({
                "depth": depth,
                "layer": l.name(),
                "requests": s.requests,
                "read_bytes": s.read_bytes,
                "write_bytes": s.write_bytes,
                "errors": s.errors,
                "in_flight": s.in_flight,
                "latency_p50_us": s.latency_quantile_us(0.5),
                "latency_p99_us": s.latency_quantile_us(0.99),
                // Devices: batches submitted and kernel entries they took.
                "batches": s.batches,
                "kernel_entries": s.kernel_entries,
            })
        })
        .collect();
    serde_json::Value::Array(nodes)
}

/// What `stackfs.stats` answers: the FUSE front end with its requests by
/// opcode (`opcodes`), then every layer of the stack (`stack_stats`).
pub(super) fn stats_json(top: &std::sync::Arc<dyn stackfs_layers::Layer>) -> serde_json::Value {
    let (opcodes, total) = super::requests::REQUESTS.snapshot();
    let front = serde_json::json!({
        "depth": 0,
        "layer": "fuse",
        "requests": total,
        "opcodes": opcodes,
    });
    let mut nodes = vec![front];
    if let serde_json::Value::Array(layers) = stack_stats(top) {
        nodes.extend(layers);
    }
    serde_json::Value::Array(nodes)
}

/// Each member's state, for `stackfs info`.
pub fn health_json(fs: &Fs) -> serde_json::Value {
    let members: Vec<serde_json::Value> = fs
        .stack
        .health
        .members()
        .into_iter()
        .enumerate()
        .map(|(i, m)| {
            serde_json::json!({
                "index": i,
                "path": m.name,
                "state": m.state(),
                "why": m.faulted,
                "timeouts": m.timeouts,
                "late_answers": m.late,
                "read_errors": m.read_errors,
                "write_errors": m.write_errors,
                "checksum_errors": m.checksum_errors,
                "repairs": m.repairs,
                "bytes_repaired": m.bytes_repaired,
            })
        })
        .collect();
    let health = &fs.stack.health;
    let state = if fs.failed() {
        "failed"
    } else if health.any_faulted() {
        // A mirror lost a member but every group still has a copy.
        "degraded"
    } else {
        "online"
    };
    serde_json::json!({
        "state": state,
        "failure": fs.failure(),
        "members": members,
    })
}

/// The members' health with the background job's status (`stackfs info`).
pub(super) fn health_and_jobs(fs: &Fs, jobs: Option<&crate::rebuild::Jobs>) -> serde_json::Value {
    let mut v = health_json(fs);
    if let (Some(jobs), Some(obj)) = (jobs, v.as_object_mut()) {
        obj.insert("jobs".into(), jobs.status());
    }
    v
}

/// The text of a control xattr being set: EPERM unless the caller is an
/// admin (checked first), EINVAL unless it is UTF-8.
fn admin_text<'a>(req: &Request, value: &'a [u8]) -> Result<&'a str, stackfs_layers::Errno> {
    if !is_admin(req) {
        return Err(stackfs_layers::Errno(libc::EPERM));
    }
    std::str::from_utf8(value).map_err(|_| stackfs_layers::Errno::EINVAL)
}

impl FuseFs {
    /// A remount's options for the daemon (`stackfs.mount`), root only.
    pub(super) fn mount_policy(
        &self,
        req: &Request,
        value: &[u8],
    ) -> Result<(), stackfs_layers::Errno> {
        let opts = admin_text(req, value)?;
        let atime = crate::atime::AtimePolicy::decode(opts);
        let mut sync = None;
        for o in opts.split(',') {
            match o {
                "sync" | "dirsync" => sync = Some(true),
                "async" => sync = Some(false),
                _ => {}
            }
        }
        self.fs.set_policy(atime, sync);
        log::info!("remount: {opts} -> {:?}", self.fs.policy());
        Ok(())
    }

    /// Start or stop a scrub (`stackfs.scrub`), or start a replace
    /// (`stackfs.replace`). A refusal is EINVAL here; its reason is in
    /// `stackfs.job`.
    pub(super) fn job_command(
        &self,
        req: &Request,
        name: &[u8],
        value: &[u8],
    ) -> Result<(), stackfs_layers::Errno> {
        let text = admin_text(req, value)?;
        let jobs = self
            .jobs
            .as_ref()
            .ok_or(stackfs_layers::Errno(libc::EROFS))?;
        let refused = |e: String| {
            log::warn!("{}: {e}", String::from_utf8_lossy(name));
            jobs.refused(&String::from_utf8_lossy(name), e);
            stackfs_layers::Errno::EINVAL
        };
        if name == SCRUB_XATTR {
            let mut words = text.split_whitespace();
            return match (words.next(), words.next()) {
                (Some("start"), None) => jobs.request_scrub(None).map_err(refused),
                (Some("start"), Some(rate)) => {
                    let rate = rate
                        .strip_prefix("rate=")
                        .and_then(stackfs_layers::parse_size)
                        .ok_or_else(|| refused(format!("{rate:?} is not rate=BYTES")))?;
                    jobs.request_scrub(Some(rate)).map_err(refused)
                }
                (Some("stop"), None) => {
                    jobs.stop_job();
                    Ok(())
                }
                _ => Err(refused(format!("{text:?}: start [rate=BYTES] or stop"))),
            };
        }
        let (old, new) = text.split_once('\n').ok_or_else(|| {
            refused("give the old member and the new device, one per line".into())
        })?;
        jobs.request_replace(old, std::path::Path::new(new))
            .map(|started| log::info!("{started}"))
            .map_err(refused)
    }

    /// Tests steer a stack's fault layers through the root directory's
    /// `stackfs.fault` xattr (root only; pools without a fault layer refuse).
    pub(super) fn fault_command(
        &self,
        req: &Request,
        value: &[u8],
    ) -> Result<(), stackfs_layers::Errno> {
        let cmd = admin_text(req, value)?;
        let f = self
            .fs
            .stack
            .fault
            .as_ref()
            .ok_or(stackfs_layers::Errno(libc::ENOTSUP))?;
        f.command(cmd).map_err(|e| {
            log::warn!("fault command {cmd:?}: {e}");
            stackfs_layers::Errno::EINVAL
        })
    }
}
