//! `device`: the bottom of every stack. One backing device (block device or
//! image file) driven through io_uring.
//!
//! Submission pushes a whole batch of requests into the ring under one lock
//! and enters the kernel once. One completion thread per device reaps every
//! available completion, removes them from the in-flight table under one lock,
//! then runs each request's completion chain upward in its own context: the
//! chain reaches the filesystem's reply without another hand-off.
//!
//! An SQE in the ring owns its request until its CQE is reaped: a request
//! (with its buffers and iovecs) enters the in-flight table before its SQE is
//! pushed, and only the completion thread takes it out again, for its CQE. A
//! failed submit therefore fails only the requests whose SQEs never reached
//! the ring; the others stay in the table and reach the kernel with its next
//! entry (a retry, another submit, or the completion thread's next wait).

use crate::errno::Errno;
use crate::io::{Io, Op};
use crate::layer::{check_range, Layer};
use io_uring::{opcode, squeue, types, IoUring};
use parking_lot::{Mutex, MutexGuard};
use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;
use std::time::Duration;

/// user_data of the NOP that wakes the completion thread to stop.
const WAKE: u64 = 0;
/// user_data of our own cancel requests, whose completions need no action.
const CANCEL: u64 = u64::MAX;
const RING_ENTRIES: u32 = 512;
/// Sector size that O_DIRECT requests keep.
const DIRECT_ALIGN: usize = 4096;
/// Longest wait of the completion thread in the kernel: entries that a failed
/// submit left in the ring reach the kernel at its next entry, at the latest
/// one tick later, even when nothing else is in flight.
const REAP_TICK: Duration = Duration::from_millis(100);
/// Tries of a submit that fails with EINTR, EAGAIN or EBUSY before the
/// failure counts (about 13 ms of pauses in all, see `back_off`).
const SUBMIT_TRIES: u32 = 10;

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
    /// Set by `shutdown` (under the `inflight` lock): no request enters the
    /// table any more, new ones fail with EIO, and the ones it cancels
    /// complete with EIO.
    closed: AtomicBool,
    /// Entries into the kernel to submit (io_uring_enter calls of
    /// `push_all`, retries included; the completion thread's waits are not
    /// counted), shown in the device's stats.
    kernel_entries: Arc<AtomicU64>,
    /// Submit failures on demand, for tests (nothing in other builds).
    faults: SubmitFaults,
}

impl Ring {
    /// Push a batch's entries and submit them; set the cancellers of those
    /// that reached the ring, fail those that did not.
    fn push_settle(
        self: &Arc<Ring>,
        path: &Path,
        entries: &[squeue::Entry],
        mut started: Vec<(u64, Io)>,
    ) {
        let pushed = match self.push_all(entries) {
            Ok(()) => started.len(),
            Err(f) => {
                log::error!(
                    "{}: io_uring submit failed: {}; {} of {} requests fail, the others stay queued",
                    path.display(),
                    f.err,
                    started.len() - f.pushed,
                    started.len()
                );
                f.pushed
            }
        };
        let refused = started.split_off(pushed);
        for (id, io) in started {
            let ring = self.clone();
            io.set_canceller(move || ring.cancel(id));
        }
        self.fail_unqueued(refused);
    }

    fn fail_unqueued(&self, refused: Vec<(u64, Io)>) {
        if refused.is_empty() {
            return;
        }
        let failed: Vec<InFlight> = {
            let mut inflight = self.inflight.lock();
            refused
                .iter()
                .filter_map(|(id, _)| inflight.remove(id))
                .collect()
        };
        for f in failed {
            f.io.finish(Err(Errno::EIO));
        }
    }
}

/// A device whose requests may block the thread that issues them (an image
/// on a FUSE or network filesystem) submits from a thread of its own. io_uring
/// ties the workers that run punted requests to the thread that submitted
/// them, and a thread cannot exit before its workers: submitted from the FUSE
/// workers, a request stuck in a stopped server would keep the daemon from
/// ending. This thread is never waited for.
struct Submitter {
    tx: Mutex<mpsc::Sender<(Vec<squeue::Entry>, Vec<(u64, Io)>)>>,
}

impl Submitter {
    fn start(ring: Arc<Ring>, path: PathBuf) -> std::io::Result<Submitter> {
        let (tx, rx) = mpsc::channel::<(Vec<squeue::Entry>, Vec<(u64, Io)>)>();
        std::thread::Builder::new()
            .name("uring-submit".into())
            .spawn(move || {
                while let Ok((entries, started)) = rx.recv() {
                    ring.push_settle(&path, &entries, started);
                }
            })?;
        Ok(Submitter { tx: Mutex::new(tx) })
    }
}

/// `push_all` failed with `err`: the first `pushed` entries are in the ring
/// (some maybe with the kernel already), the others never got there.
struct PushError {
    pushed: usize,
    err: std::io::Error,
}

impl Ring {
    /// Push entries, entering the kernel when the queue is full, then once at
    /// the end. After an error, the entries before `PushError::pushed` stay
    /// in the ring and keep owning their requests.
    fn push_all(&self, entries: &[squeue::Entry]) -> Result<(), PushError> {
        let at = |pushed| move |err| PushError { pushed, err };
        let mut guard = self.sq.lock();
        for (i, e) in entries.iter().enumerate() {
            while !self.push(e) {
                // Full: hand what the queue holds to the kernel, then retry.
                self.enter(&mut guard, i).map_err(at(i))?;
            }
            if self.faults.due(i + 1) {
                self.enter(&mut guard, i + 1).map_err(at(i + 1))?;
            }
        }
        self.enter(&mut guard, entries.len())
            .map_err(at(entries.len()))
    }

    /// Push one entry; false if the queue is full. Only holders of `sq` call it.
    fn push(&self, e: &squeue::Entry) -> bool {
        // SAFETY: only holders of `sq` touch the submission queue; the
        // completion thread uses only the completion queue. Dropping `sq`
        // publishes the new tail.
        let mut sq = unsafe { self.uring.submission_shared() };
        // SAFETY: every buffer named by `e` is owned by a request kept in
        // `inflight` until its completion is reaped.
        unsafe { sq.push(e) }.is_ok()
    }

    /// Hand the queued entries to the kernel (`pushed`: entries of this
    /// `push_all` in the ring so far). A transient failure is retried a few
    /// times, with pauses during which `sq` is released. EBUSY says the
    /// completion queue overflowed: the completion thread drains it
    /// meanwhile, as it never takes `sq` (and when the caller is that thread,
    /// a chain submitting, it has drained before running the chain; the
    /// retry's entry flushes the overflow). Waiting here cannot deadlock.
    fn enter(&self, guard: &mut MutexGuard<'_, ()>, pushed: usize) -> std::io::Result<()> {
        let mut tries = 0;
        loop {
            let res = match self.faults.take(pushed) {
                Some(err) => Err(err),
                None => {
                    self.kernel_entries.fetch_add(1, Ordering::Relaxed);
                    self.uring.submitter().submit().map(drop)
                }
            };
            match res {
                Err(e) if is_transient(&e) && tries + 1 < SUBMIT_TRIES => {
                    MutexGuard::unlocked(guard, || back_off(tries));
                    tries += 1;
                }
                res => return res,
            }
        }
    }

    fn cancel(&self, id: u64) {
        let e = opcode::AsyncCancel::new(id).build().user_data(CANCEL);
        match self.push_all(&[e]) {
            Ok(()) => {}
            // In the ring: it reaches the kernel with the next entry.
            Err(f) if f.pushed == 1 => {
                log::debug!(
                    "io_uring cancel of request {id} queued, not yet submitted: {}",
                    f.err
                )
            }
            Err(f) => log::warn!(
                "io_uring cancel of request {id} could not be queued: {}",
                f.err
            ),
        }
    }
}

/// EINTR: a signal; EAGAIN: the kernel is short of memory for requests;
/// EBUSY: the completion queue overflowed until it is drained.
fn is_transient(e: &std::io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EINTR | libc::EAGAIN | libc::EBUSY)
    )
}

/// Pause after the `n + 1`th failed try of a submit: a yield, then 50 µs
/// doubling up to 6.4 ms.
fn back_off(n: u32) {
    if n == 0 {
        std::thread::yield_now();
    } else {
        std::thread::sleep(Duration::from_micros(25 << n));
    }
}

/// Test hook: "once `after` entries of one `push_all` are in the ring, enter
/// the kernel, and fail that submit and the next ones with `errno`, `times`
/// submits in all".
#[cfg(test)]
struct SubmitFaults(Mutex<Option<SubmitFault>>);

#[cfg(test)]
#[derive(Clone, Copy)]
struct SubmitFault {
    after: usize,
    errno: i32,
    times: u32,
}

#[cfg(test)]
impl SubmitFaults {
    fn new() -> SubmitFaults {
        SubmitFaults(Mutex::new(None))
    }

    fn set(&self, fault: Option<SubmitFault>) {
        *self.0.lock() = fault;
    }

    /// Whether to enter the kernel once `pushed` entries are in the ring.
    fn due(&self, pushed: usize) -> bool {
        self.0.lock().is_some_and(|f| f.after == pushed)
    }

    /// The failure to return instead of submitting, if one is due.
    fn take(&self, pushed: usize) -> Option<std::io::Error> {
        let mut slot = self.0.lock();
        let f = slot.as_mut().filter(|f| f.after == pushed)?;
        let err = std::io::Error::from_raw_os_error(f.errno);
        f.times -= 1;
        if f.times == 0 {
            *slot = None;
        }
        Some(err)
    }
}

#[cfg(not(test))]
struct SubmitFaults;

#[cfg(not(test))]
impl SubmitFaults {
    fn new() -> SubmitFaults {
        SubmitFaults
    }

    fn due(&self, _pushed: usize) -> bool {
        false
    }

    fn take(&self, _pushed: usize) -> Option<std::io::Error> {
        None
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
    /// Every request goes to an io-wq worker (IOSQE_ASYNC), never issued
    /// inline in the submitting thread: see `blocks_inline`.
    always_async: bool,
    /// Set with `always_async`: batches are submitted from this thread.
    submitter: Option<Submitter>,
}

/// Whether I/O on this file may block the thread that issues it, whatever
/// io_uring's non-blocking attempt says: an image file on a FUSE, network
/// or cluster filesystem. Issued inline, a request to a server that stopped
/// answering blocks the submitter (our FUSE workers, the completion thread)
/// in the kernel, where no timeout reaches it; in a worker, only the worker
/// waits and the watchdog fails the request above.
fn blocks_inline(file: &File) -> bool {
    // f_type values from linux/magic.h.
    const REMOTE: [i64; 9] = [
        0x6573_5546, // FUSE
        0x6969,      // NFS
        0xFF53_4D42, // CIFS
        0xFE53_4D42, // SMB2
        0x0102_1997, // 9P
        0x00C3_6400, // Ceph
        0x4750_4653, // GPFS
        0x0BD0_0BD0, // Lustre
        0x564C,      // NCP
    ];
    // SAFETY: fstatfs fills the struct we pass, for a descriptor we own.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::fstatfs(file.as_raw_fd(), &mut st) } != 0 {
        return false;
    }
    REMOTE.contains(&(st.f_type as i64))
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
            closed: AtomicBool::new(false),
            kernel_entries: Arc::new(AtomicU64::new(0)),
            faults: SubmitFaults::new(),
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
        let always_async = !is_blockdev && blocks_inline(&buffered);
        let ring_for_submitter = ring.clone();
        if always_async {
            log::info!(
                "{}: on a FUSE or network filesystem: every request goes to an io_uring worker",
                path.display()
            );
        }
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
            always_async,
            submitter: if always_async {
                Some(Submitter::start(ring_for_submitter, path.to_path_buf())?)
            } else {
                None
            },
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
        if self.ring.closed.load(Ordering::Acquire) {
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
                return Some((self.flags(e).user_data(id), Some(IoVecs(iov))));
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
        Some((self.flags(entry).user_data(id), None))
    }

    fn flags(&self, e: squeue::Entry) -> squeue::Entry {
        if self.always_async {
            e.flags(squeue::Flags::ASYNC)
        } else {
            e
        }
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

    /// Fail requests whose entries never reached the ring: the kernel never
    /// saw them, so they leave the in-flight table at once.
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

    fn kernel_entries(&self) -> Option<Arc<AtomicU64>> {
        Some(self.ring.kernel_entries.clone())
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
        // Into the table before into the ring: the table owns each request,
        // its buffers and its iovecs while its entry is in the ring.
        let started: Vec<(u64, Io)> = {
            let mut inflight = self.ring.inflight.lock();
            if self.ring.closed.load(Ordering::Acquire) {
                // Shut down since `entry` looked: nobody would reap them.
                drop(inflight);
                for (_, io, _) in started {
                    io.finish(Err(Errno::EIO));
                }
                return;
            }
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
        match &self.submitter {
            // Submitted from the device's own thread (see `Submitter`).
            Some(sub) => {
                if let Err(mpsc::SendError((_, started))) = sub.tx.lock().send((entries, started)) {
                    self.ring.fail_unqueued(started);
                }
            }
            None => self.ring.push_settle(&self.path, &entries, started),
        }
    }

    fn shutdown(&self) {
        let Some(handle) = self.reaper.lock().take() else {
            return;
        };
        // Nothing enters the table from now on: whatever is in it now is
        // all the completion thread waits for.
        let ids: Vec<u64> = {
            let inflight = self.ring.inflight.lock();
            self.ring.closed.store(true, Ordering::Release);
            inflight.keys().copied().collect()
        };
        for id in ids {
            self.ring.cancel(id);
        }
        self.ring.stop.store(true, Ordering::Release);
        let nop = opcode::Nop::new().build().user_data(WAKE);
        // The wake-up makes the completion thread see `stop` now. Without it
        // the thread is not waited for: it returns by itself at a later tick
        // once nothing is in flight (never, on kernels without timed waits).
        if self.ring.push_all(&[nop]).is_err() {
            return;
        }
        // A request the device never answers (a hung disk, a stopped FUSE or
        // NBD server under an image file) keeps the completion thread, which
        // owns the ring and every in-flight buffer, waiting. Shutdown does not
        // wait for it past SHUTDOWN_WAIT: the thread is left running with the
        // memory the kernel may still write, and ends with the process.
        let start = std::time::Instant::now();
        while !handle.is_finished() && start.elapsed() < SHUTDOWN_WAIT {
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        if handle.is_finished() {
            crate::layer::join_unless_current(Some(handle));
        } else {
            log::error!(
                "{}: {} request(s) still unanswered at shutdown; left in flight",
                self.path.display(),
                self.ring.inflight.lock().len()
            );
        }
    }
}

/// How long shutdown waits for requests in flight to be answered.
const SHUTDOWN_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

impl Drop for Device {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// The completion thread: reap everything available, then run the chains.
fn reap(ring: Arc<Ring>) {
    let mut done: Vec<(u64, i32)> = Vec::with_capacity(RING_ENTRIES as usize);
    loop {
        wait_for_completion(&ring);
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
        // What shutdown cancelled fails as a shut-down device does: EIO.
        let closed = ring.closed.load(Ordering::Acquire);
        for (f, res) in finished {
            let res = if closed && res == -libc::ECANCELED {
                -libc::EIO
            } else {
                res
            };
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

/// Submit whatever the ring holds (entries a failed submit left there too)
/// and wait for a completion, for at most `REAP_TICK`.
fn wait_for_completion(ring: &Ring) {
    let submitter = ring.uring.submitter();
    let res = if ring.uring.params().is_feature_ext_arg() {
        let tick = types::Timespec::from(REAP_TICK);
        submitter.submit_with_args(1, &types::SubmitArgs::new().timespec(&tick))
    } else {
        // Before Linux 5.11 the wait has no timeout: entries left in the ring
        // wait for the next completion or submit.
        submitter.submit_and_wait(1)
    };
    if let Err(e) = res {
        match e.raw_os_error() {
            // Timed out, interrupted, or the completion queue overflowed: reap now.
            Some(libc::ETIME | libc::EINTR | libc::EBUSY) => {}
            _ => {
                log::error!("io_uring wait failed: {e}");
                std::thread::sleep(Duration::from_millis(10));
            }
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

#[cfg(test)]
mod tests;
