//! The one trait every layer implements, and the counters the framework keeps
//! for each of them.

use crate::buf::Buf;
use crate::errno::Errno;
use crate::io::{ExtentTag, Io, IoResult, Op, Waiter};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// A node of the stack. It receives requests in its own address space,
/// transforms or splits them, and passes children to the layer(s) below.
/// It never blocks in `submit` on I/O: completion arrives through the chain.
pub trait Layer: Send + Sync {
    /// The layer as written in a spec (`stripe=64k`, `device:/dev/loop0`).
    fn name(&self) -> String;
    /// Bytes addressable in this layer's space.
    fn capacity(&self) -> u64;
    /// Alignment (bytes) that requests should keep for the fast path.
    fn alignment(&self) -> usize {
        4096
    }
    /// Hand one request to the layer; the caller's reference moves with it.
    fn submit(&self, io: Io);
    /// Hand many requests at once; layers that can batch (one syscall, one
    /// lock) override this. Mapping layers (`Map`) forward one batch to each
    /// layer below.
    fn submit_batch(&self, ios: Vec<Io>) {
        for io in ios {
            self.submit(io);
        }
    }
    /// Bytes this layer and those below add to every request (crypt's nonce
    /// and tag); a request of `len` bytes takes at most
    /// `footprint(len + overhead)` below, padded to 4 KiB.
    fn overhead(&self) -> u64 {
        0
    }
    /// Whether the layer accepts vectored reads and writes (`Io::child_vectored`):
    /// several buffers for one contiguous range, done as one request below.
    fn vectored(&self) -> bool {
        false
    }
    /// The layers directly below, for walking the stack.
    fn lowers(&self) -> Vec<Arc<dyn Layer>> {
        Vec::new()
    }
    /// Counters, when the framework keeps them for this node.
    fn stats(&self) -> Option<Arc<Stats>> {
        None
    }
    /// The count of this layer's own entries into the kernel to submit
    /// (io_uring_enter calls), for layers that make them (`device`).
    fn kernel_entries(&self) -> Option<Arc<AtomicU64>> {
        None
    }
    /// The repair counters of a layer that repairs (`mirror`), shared with
    /// the framework's `Stats` of its node.
    fn repairs(&self) -> Option<Arc<Repairs>> {
        None
    }
    /// Stop background work (completion threads); pending requests are cancelled.
    fn shutdown(&self) {
        for l in self.lowers() {
            l.shutdown();
        }
    }
}

/// What a redundant layer (`mirror`) repaired.
#[derive(Default)]
pub struct Repairs {
    /// Ranges rewritten from a good copy over a bad one, and their bytes.
    pub count: AtomicU64,
    pub bytes: AtomicU64,
    /// Heals not done because the range was written meanwhile (a scrub fixes them).
    pub skipped: AtomicU64,
    /// Reads sent to another copy after one failed (EIO or ETIMEDOUT).
    pub retries: AtomicU64,
}

/// Number of latency buckets: bucket i counts completions in [2^i, 2^(i+1)) µs.
pub const LATENCY_BUCKETS: usize = 24;

/// Per-layer counters.
#[derive(Default)]
pub struct Stats {
    pub requests: AtomicU64,
    pub read_bytes: AtomicU64,
    pub write_bytes: AtomicU64,
    pub errors: AtomicU64,
    pub in_flight: AtomicU64,
    pub latency_us: [AtomicU64; LATENCY_BUCKETS],
    /// Calls of `submit` or `submit_batch` (a lone request is a batch of one).
    pub batches: AtomicU64,
    /// Entries into the kernel to submit (io_uring_enter), shared with the
    /// layer that makes them (`Layer::kernel_entries`); stays 0 for others.
    pub kernel_entries: Arc<AtomicU64>,
    /// Repairs, shared with the layer that makes them (`Layer::repairs`);
    /// stay 0 for others.
    pub repairs: Arc<Repairs>,
}

/// A copy of `Stats` at one moment.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StatsSnapshot {
    pub requests: u64,
    pub read_bytes: u64,
    pub write_bytes: u64,
    pub errors: u64,
    pub in_flight: u64,
    pub latency_us: Vec<u64>,
    pub batches: u64,
    pub kernel_entries: u64,
    pub repairs: u64,
    pub bytes_repaired: u64,
    pub heals_skipped: u64,
    pub read_retries: u64,
}

impl StatsSnapshot {
    /// Kernel entries per batch received (1.0: one io_uring_enter per batch).
    pub fn kernel_entries_per_batch(&self) -> f64 {
        if self.batches == 0 {
            return 0.0;
        }
        self.kernel_entries as f64 / self.batches as f64
    }

    /// Upper bound of the bucket holding the q-th quantile, in microseconds.
    pub fn latency_quantile_us(&self, q: f64) -> u64 {
        let total: u64 = self.latency_us.iter().sum();
        if total == 0 {
            return 0;
        }
        let want = (total as f64 * q).ceil() as u64;
        let mut seen = 0;
        for (i, n) in self.latency_us.iter().enumerate() {
            seen += n;
            if seen >= want {
                return 1 << (i + 1);
            }
        }
        1 << LATENCY_BUCKETS
    }
}

impl Stats {
    pub fn snapshot(&self) -> StatsSnapshot {
        StatsSnapshot {
            requests: self.requests.load(Ordering::Relaxed),
            read_bytes: self.read_bytes.load(Ordering::Relaxed),
            write_bytes: self.write_bytes.load(Ordering::Relaxed),
            errors: self.errors.load(Ordering::Relaxed),
            in_flight: self.in_flight.load(Ordering::Relaxed),
            latency_us: self
                .latency_us
                .iter()
                .map(|a| a.load(Ordering::Relaxed))
                .collect(),
            batches: self.batches.load(Ordering::Relaxed),
            kernel_entries: self.kernel_entries.load(Ordering::Relaxed),
            repairs: self.repairs.count.load(Ordering::Relaxed),
            bytes_repaired: self.repairs.bytes.load(Ordering::Relaxed),
            heals_skipped: self.repairs.skipped.load(Ordering::Relaxed),
            read_retries: self.repairs.retries.load(Ordering::Relaxed),
        }
    }

    fn start(self: &Arc<Self>, io: &Io) {
        self.requests.fetch_add(1, Ordering::Relaxed);
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        let stats = self.clone();
        let start = std::time::Instant::now();
        io.observe(move |io, res| stats.end(io, res, start.elapsed()));
    }

    fn end(&self, io: &Io, res: &IoResult, took: Duration) {
        self.in_flight.fetch_sub(1, Ordering::Relaxed);
        match res {
            Ok(n) => {
                let counter = match io.op() {
                    Op::Read => &self.read_bytes,
                    Op::Write => &self.write_bytes,
                    _ => return self.bucket(took),
                };
                counter.fetch_add(*n, Ordering::Relaxed);
            }
            Err(_) => {
                self.errors.fetch_add(1, Ordering::Relaxed);
            }
        }
        self.bucket(took);
    }

    fn bucket(&self, took: Duration) {
        let us = took.as_micros().max(1) as u64;
        let i = (63 - us.leading_zeros() as usize).min(LATENCY_BUCKETS - 1);
        self.latency_us[i].fetch_add(1, Ordering::Relaxed);
    }
}

/// The framework's wrapper: counts every request that enters the layer.
/// The stack builder puts one around each layer, so layers need not count.
pub struct Counted {
    inner: Arc<dyn Layer>,
    stats: Arc<Stats>,
}

impl Counted {
    pub fn wrap(inner: Arc<dyn Layer>) -> Arc<dyn Layer> {
        let stats = Stats {
            kernel_entries: inner.kernel_entries().unwrap_or_default(),
            repairs: inner.repairs().unwrap_or_default(),
            ..Stats::default()
        };
        Arc::new(Counted {
            inner,
            stats: Arc::new(stats),
        })
    }
}

impl Layer for Counted {
    fn name(&self) -> String {
        self.inner.name()
    }
    fn capacity(&self) -> u64 {
        self.inner.capacity()
    }
    fn alignment(&self) -> usize {
        self.inner.alignment()
    }
    fn submit(&self, io: Io) {
        self.stats.batches.fetch_add(1, Ordering::Relaxed);
        self.stats.start(&io);
        self.inner.submit(io);
    }
    fn submit_batch(&self, ios: Vec<Io>) {
        self.stats.batches.fetch_add(1, Ordering::Relaxed);
        for io in &ios {
            self.stats.start(io);
        }
        self.inner.submit_batch(ios);
    }
    fn overhead(&self) -> u64 {
        self.inner.overhead()
    }
    fn vectored(&self) -> bool {
        self.inner.vectored()
    }
    fn lowers(&self) -> Vec<Arc<dyn Layer>> {
        self.inner.lowers()
    }
    fn stats(&self) -> Option<Arc<Stats>> {
        Some(self.stats.clone())
    }
    fn kernel_entries(&self) -> Option<Arc<AtomicU64>> {
        self.inner.kernel_entries()
    }
    fn repairs(&self) -> Option<Arc<Repairs>> {
        self.inner.repairs()
    }
    fn shutdown(&self) {
        self.inner.shutdown();
    }
}

/// Submit one request and wait for it: for code that is not itself driven by
/// completions (mkfs, fsck, the metadata store, tests).
pub fn submit_wait(layer: &dyn Layer, op: Op, addr: u64, buf: Buf) -> IoResult {
    submit_wait_tag(layer, op, addr, buf, ExtentTag::default()).0
}

/// Like `submit_wait`, with an extent tag going down and the one recorded by
/// the layers coming back.
pub fn submit_wait_tag(
    layer: &dyn Layer,
    op: Op,
    addr: u64,
    buf: Buf,
    tag: ExtentTag,
) -> (IoResult, ExtentTag) {
    let w = Waiter::new();
    let io = Io::new(op, addr, buf, Some(w.end_io()));
    io.set_tag(tag);
    layer.submit(io);
    w.wait_tag()
}

/// Join a layer's background thread on shutdown, unless shutdown runs on that
/// very thread (a completion chain dropping the last handle).
pub fn join_unless_current(handle: Option<std::thread::JoinHandle<()>>) {
    if let Some(t) = handle {
        if t.thread().id() != std::thread::current().id() {
            let _ = t.join();
        }
    }
}

/// Space below a layer for a request of `len` bytes: with the layers'
/// overhead, padded to whole 4 KiB blocks.
pub fn footprint(layer: &dyn Layer, len: u64) -> u64 {
    (len + layer.overhead()).div_ceil(4096) * 4096
}

/// Check that `[addr, addr+len)` fits in a layer of `capacity` bytes.
pub fn check_range(addr: u64, len: u64, capacity: u64) -> Result<(), Errno> {
    match addr.checked_add(len) {
        Some(end) if end <= capacity => Ok(()),
        _ => Err(Errno::EINVAL),
    }
}
