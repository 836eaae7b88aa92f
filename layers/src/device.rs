//! `device`: the bottom of every stack. One backing device (block device or
//! image file) driven through io_uring.
//!
//! Submission pushes a whole batch of requests into the ring under one lock
//! and enters the kernel once. One completion thread per device reaps every
//! available completion, removes them from the in-flight table under one lock,
//! then runs each request's completion chain upward in its own context: the
//! chain reaches the filesystem's reply without another hand-off.

use crate::errno::Errno;
use crate::io::{Io, Op};
use crate::layer::{check_range, Layer};
use io_uring::{opcode, squeue, types, IoUring};
use parking_lot::Mutex;
use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

/// user_data of the NOP that wakes the completion thread to stop.
const WAKE: u64 = 0;
/// user_data of our own cancel requests, whose completions need no action.
const CANCEL: u64 = u64::MAX;
const RING_ENTRIES: u32 = 512;
/// Sector size that O_DIRECT requests keep.
const DIRECT_ALIGN: usize = 4096;

/// The iovec array of a vectored request: it must stay put until the kernel
/// has finished the request, so it lives in the in-flight table with it.
struct IoVecs(#[allow(dead_code)] Box<[libc::iovec]>);

// SAFETY: the iovecs point into buffers owned by the request they travel
// with; the array itself is only read by the kernel.
unsafe impl Send for IoVecs {}

/// A request the kernel holds, with what must outlive it there.
struct InFlight {
    io: Io,
    _iov: Option<IoVecs>,
}

struct Ring {
    uring: IoUring,
    /// Serialises pushes to the submission queue.
    sq: Mutex<()>,
    inflight: Mutex<HashMap<u64, InFlight>>,
    next_id: AtomicU64,
    stop: AtomicBool,
}

impl Ring {
    /// Push entries, entering the kernel when the queue is full, then once at the end.
    fn push_all(&self, entries: &[squeue::Entry]) -> std::io::Result<()> {
        let _g = self.sq.lock();
        for e in entries {
            loop {
                // SAFETY: only holders of `sq` touch the submission queue; the
                // completion thread uses only the completion queue.
                let mut sq = unsafe { self.uring.submission_shared() };
                // SAFETY: every buffer named by `e` is owned by a request kept in
                // `inflight` until its completion is reaped.
                if unsafe { sq.push(e) }.is_ok() {
                    break;
                }
                drop(sq);
                self.uring.submitter().submit()?;
            }
        }
        self.uring.submitter().submit()?;
        Ok(())
    }

    fn cancel(&self, id: u64) {
        let e = opcode::AsyncCancel::new(id).build().user_data(CANCEL);
        if let Err(err) = self.push_all(&[e]) {
            log::warn!("io_uring cancel of request {id} could not be queued: {err}");
        }
    }
}

pub struct Device {
    path: PathBuf,
    /// O_DIRECT descriptor, when the backing filesystem accepts O_DIRECT.
    direct: Option<File>,
    buffered: File,
    is_blockdev: bool,
    /// Where this layer's address 0 sits on the device.
    base: u64,
    capacity: u64,
    ring: Arc<Ring>,
    reaper: Mutex<Option<JoinHandle<()>>>,
    warned_buffered: AtomicBool,
    /// Set by `shutdown`: no completion thread is left to finish new requests.
    closed: AtomicBool,
}

/// Size of a block device or regular file.
pub fn device_size(file: &File) -> std::io::Result<u64> {
    let meta = file.metadata()?;
    if meta.file_type().is_block_device() {
        let mut size: u64 = 0;
        // BLKGETSIZE64 = _IOR(0x12, 114, size_t)
        const BLKGETSIZE64: libc::c_ulong = 0x8008_1272;
        // SAFETY: the ioctl writes one u64 into `size`, which outlives the call.
        let r = unsafe { libc::ioctl(file.as_raw_fd(), BLKGETSIZE64, &mut size as *mut u64) };
        if r != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(size)
    } else {
        Ok(meta.len())
    }
}

impl Device {
    /// Open `path` and expose `[base, base+capacity)` of it as this layer's space.
    pub fn open(path: &Path, base: u64, capacity: u64, read_only: bool) -> std::io::Result<Device> {
        let mut opts = OpenOptions::new();
        opts.read(true).write(!read_only);
        let buffered = opts.open(path)?;
        let is_blockdev = buffered.metadata()?.file_type().is_block_device();
        let size = device_size(&buffered)?;
        if base.checked_add(capacity).is_none_or(|end| end > size) {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!(
                    "{}: range {base}+{capacity} exceeds the device size {size}",
                    path.display()
                ),
            ));
        }
        let direct = match opts.clone().custom_flags(libc::O_DIRECT).open(path) {
            Ok(f) => Some(f),
            Err(e) => {
                log::info!(
                    "{}: O_DIRECT not available ({e}); using buffered I/O",
                    path.display()
                );
                None
            }
        };
        let ring = Arc::new(Ring {
            uring: IoUring::new(RING_ENTRIES)?,
            sq: Mutex::new(()),
            inflight: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(1),
            stop: AtomicBool::new(false),
        });
        let r = ring.clone();
        let name = format!(
            "uring-{}",
            path.file_name()
                .map(|n| n.to_string_lossy())
                .unwrap_or_default()
        );
        let reaper = std::thread::Builder::new()
            .name(name)
            .spawn(move || reap(r))?;
        Ok(Device {
            path: path.to_path_buf(),
            direct,
            buffered,
            is_blockdev,
            base,
            capacity,
            ring,
            reaper: Mutex::new(Some(reaper)),
            warned_buffered: AtomicBool::new(false),
            closed: AtomicBool::new(false),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Build the ring entry for one request, or finish it at once (range
    /// errors, block-device discards, cancelled before start).
    fn entry(&self, io: &Io, id: u64) -> Option<(squeue::Entry, Option<IoVecs>)> {
        if io.is_cancelled() {
            io.finish(Err(Errno::ECANCELED));
            return None;
        }
        if self.closed.load(Ordering::Acquire) {
            io.finish(Err(Errno::EIO));
            return None;
        }
        if let Err(e) = check_range(io.addr(), io.len(), self.capacity) {
            io.finish(Err(e));
            return None;
        }
        let off = self.base + io.addr();
        let entry = match io.op() {
            Op::Read | Op::Write if io.is_vectored() => {
                let fd = self.fd_for(io, off);
                let iov: Box<[libc::iovec]> = io
                    .segments()
                    .iter()
                    .map(|b| libc::iovec {
                        iov_base: b.as_ptr().cast(),
                        iov_len: b.len(),
                    })
                    .collect();
                let (ptr, n) = (iov.as_ptr(), iov.len() as u32);
                let e = if io.op() == Op::Read {
                    opcode::Readv::new(types::Fd(fd), ptr, n)
                        .offset(off)
                        .build()
                } else {
                    opcode::Writev::new(types::Fd(fd), ptr, n)
                        .offset(off)
                        .build()
                };
                // The boxed array does not move when the box does.
                return Some((e.user_data(id), Some(IoVecs(iov))));
            }
            Op::Read | Op::Write => {
                let fd = self.fd_for(io, off);
                let (ptr, len) = (io.buf().as_ptr(), io.len() as u32);
                if io.op() == Op::Read {
                    opcode::Read::new(types::Fd(fd), ptr, len)
                        .offset(off)
                        .build()
                } else {
                    opcode::Write::new(types::Fd(fd), ptr, len)
                        .offset(off)
                        .build()
                }
            }
            Op::Flush => opcode::Fsync::new(types::Fd(self.buffered.as_raw_fd()))
                .flags(types::FsyncFlags::DATASYNC)
                .build(),
            Op::Discard if self.is_blockdev => {
                io.finish(self.blkdiscard(off, io.len()));
                return None;
            }
            Op::Discard => opcode::Fallocate::new(types::Fd(self.buffered.as_raw_fd()), io.len())
                .offset(off)
                .mode(libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE)
                .build(),
        };
        Some((entry.user_data(id), None))
    }

    fn fd_for(&self, io: &Io, off: u64) -> i32 {
        if let Some(d) = &self.direct {
            if io.segments().iter().all(|b| b.is_aligned(DIRECT_ALIGN))
                && off % DIRECT_ALIGN as u64 == 0
            {
                return d.as_raw_fd();
            }
            if !self.warned_buffered.swap(true, Ordering::Relaxed) {
                log::info!(
                    "{}: unaligned request ({} bytes at {off}); such requests use buffered I/O",
                    self.path.display(),
                    io.len()
                );
            }
        }
        self.buffered.as_raw_fd()
    }

    fn blkdiscard(&self, off: u64, len: u64) -> Result<u64, Errno> {
        // BLKDISCARD = _IO(0x12, 119)
        const BLKDISCARD: libc::c_ulong = 0x1277;
        let range = [off, len];
        // SAFETY: the ioctl reads two u64 from `range`, which outlives the call.
        let r = unsafe { libc::ioctl(self.buffered.as_raw_fd(), BLKDISCARD, range.as_ptr()) };
        if r != 0 {
            return Err(Errno::from_io(&std::io::Error::last_os_error()));
        }
        Ok(len)
    }
}

impl Layer for Device {
    fn name(&self) -> String {
        format!("device:{}", self.path.display())
    }

    fn capacity(&self) -> u64 {
        self.capacity
    }

    fn vectored(&self) -> bool {
        true
    }

    fn submit(&self, io: Io) {
        self.submit_batch(vec![io]);
    }

    fn submit_batch(&self, ios: Vec<Io>) {
        let mut entries = Vec::with_capacity(ios.len());
        let mut started = Vec::with_capacity(ios.len());
        for io in ios {
            let id = self.ring.next_id.fetch_add(1, Ordering::Relaxed);
            if let Some((e, iov)) = self.entry(&io, id) {
                entries.push(e);
                started.push((id, io, iov));
            }
        }
        if started.is_empty() {
            return;
        }
        let started: Vec<(u64, Io)> = {
            let mut inflight = self.ring.inflight.lock();
            started
                .into_iter()
                .map(|(id, io, iov)| {
                    inflight.insert(
                        id,
                        InFlight {
                            io: io.clone(),
                            _iov: iov,
                        },
                    );
                    (id, io)
                })
                .collect()
        };
        if let Err(err) = self.ring.push_all(&entries) {
            // The ring refused them: none was started; fail each one.
            log::error!("{}: io_uring submit failed: {err}", self.path.display());
            let mut inflight = self.ring.inflight.lock();
            let failed: Vec<Io> = started
                .iter()
                .filter_map(|(id, _)| inflight.remove(id).map(|f| f.io))
                .collect();
            drop(inflight);
            for io in failed {
                io.finish(Err(Errno::from_io(&err)));
            }
            return;
        }
        for (id, io) in started {
            let ring = self.ring.clone();
            io.set_canceller(move || ring.cancel(id));
        }
    }

    fn shutdown(&self) {
        let Some(handle) = self.reaper.lock().take() else {
            return;
        };
        let ids: Vec<u64> = self.ring.inflight.lock().keys().copied().collect();
        for id in ids {
            self.ring.cancel(id);
        }
        self.ring.stop.store(true, Ordering::Release);
        let nop = opcode::Nop::new().build().user_data(WAKE);
        // Without the wake-up the completion thread would never return.
        if self.ring.push_all(&[nop]).is_ok() {
            crate::layer::join_unless_current(Some(handle));
        }
    }
}

impl Drop for Device {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// The completion thread: reap everything available, then run the chains.
fn reap(ring: Arc<Ring>) {
    let mut done: Vec<(u64, i32)> = Vec::with_capacity(RING_ENTRIES as usize);
    loop {
        if let Err(e) = ring.uring.submitter().submit_and_wait(1) {
            if e.raw_os_error() != Some(libc::EINTR) {
                log::error!("io_uring wait failed: {e}");
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
        }
        {
            // SAFETY: this thread is the only user of the completion queue.
            let cq = unsafe { ring.uring.completion_shared() };
            done.extend(cq.map(|c| (c.user_data(), c.result())));
        }
        // Each entry keeps its iovecs alive until the chain has run.
        let mut finished = Vec::with_capacity(done.len());
        {
            let mut inflight = ring.inflight.lock();
            for (id, res) in done.drain(..) {
                if id == WAKE || id == CANCEL {
                    continue;
                }
                if let Some(io) = inflight.remove(&id) {
                    finished.push((io, res));
                }
            }
        }
        for (f, res) in finished {
            // A bug in some layer's completion must not take the device's
            // only completion thread with it: every later request would hang.
            let chain = std::panic::AssertUnwindSafe(|| f.io.finish(result_of(&f.io, res)));
            if std::panic::catch_unwind(chain).is_err() {
                log::error!("a completion chain panicked; the device goes on");
            }
        }
        if ring.stop.load(Ordering::Acquire) && ring.inflight.lock().is_empty() {
            return;
        }
    }
}

/// Turn a completion's result into the request's: a short read past the end
/// of an image file reads zeros; a short write is an I/O error.
fn result_of(io: &Io, res: i32) -> Result<u64, Errno> {
    if res < 0 {
        return Err(Errno(-res));
    }
    let n = res as u64;
    match io.op() {
        Op::Read if n < io.len() => {
            let mut at = 0u64;
            for seg in io.segments() {
                let start = n.saturating_sub(at).min(seg.len() as u64) as usize;
                // SAFETY: the read is complete; this request still owns its buffers.
                unsafe { seg.as_mut_slice_unchecked()[start..].fill(0) };
                at += seg.len() as u64;
            }
            Ok(io.len())
        }
        Op::Write if n < io.len() => {
            log::error!("short write: {n} of {} bytes at {}", io.len(), io.addr());
            Err(Errno::EIO)
        }
        Op::Flush => Ok(0),
        Op::Discard => Ok(io.len()),
        _ => Ok(n),
    }
}
