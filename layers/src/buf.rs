//! Clone buffers: page-aligned shared memory plus one window (offset, length).
//!
//! A `Buf` is an `Arc` of aligned pages and a window into them. `split_at` and
//! `slice` make new windows over the same pages, so a layer that carves a request
//! (striping at a chunk boundary) never copies data. Memory comes from a
//! `BufPool`, which bounds the bytes outstanding: an exhausted pool makes the
//! caller wait until another buffer is dropped, never fail.

use parking_lot::{Condvar, Mutex};
use std::alloc::{alloc_zeroed, dealloc, Layout};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// Alignment of every allocation: enough for O_DIRECT on 4 KiB-sector devices.
pub const PAGE: usize = 4096;

static COPIED: AtomicU64 = AtomicU64::new(0);

/// Bytes of file data copied from one buffer into another by stackfs itself
/// (not by a codec or cipher writing its output, not by the kernel), since
/// the process started: the figure the copy tests hold down.
pub fn copied_bytes() -> u64 {
    COPIED.load(Ordering::Relaxed)
}

/// Record a copy of `n` bytes of data.
pub fn count_copy(n: usize) {
    COPIED.fetch_add(n as u64, Ordering::Relaxed);
}

/// Page-aligned memory. Dropping it returns its bytes to the pool's budget.
struct Pages {
    ptr: NonNull<u8>,
    cap: usize,
    pool: Option<Arc<PoolInner>>,
}

// SAFETY: `Pages` owns its allocation; concurrent access goes through `Buf`,
// whose rules (below) keep writers and readers of one byte apart in time.
unsafe impl Send for Pages {}
unsafe impl Sync for Pages {}

impl Pages {
    fn alloc(cap: usize, pool: Option<Arc<PoolInner>>) -> Pages {
        let cap = cap.max(PAGE).div_ceil(PAGE) * PAGE;
        if let Some(ptr) = recycled::take(cap) {
            // SAFETY: a recycled chunk of exactly `cap` bytes that nothing else uses.
            unsafe { std::ptr::write_bytes(ptr.as_ptr(), 0, cap) };
            return Pages { ptr, cap, pool };
        }
        let layout = Layout::from_size_align(cap, PAGE).expect("page layout");
        // SAFETY: layout has a non-zero size (at least one page).
        let raw = unsafe { alloc_zeroed(layout) };
        let ptr = NonNull::new(raw).unwrap_or_else(|| std::alloc::handle_alloc_error(layout));
        Pages { ptr, cap, pool }
    }

    /// `cap` bytes whose contents the caller overwrites at once.
    fn alloc_uninit(cap: usize) -> Pages {
        if let Some(ptr) = recycled::take(cap) {
            return Pages {
                ptr,
                cap,
                pool: None,
            };
        }
        let layout = Layout::from_size_align(cap, PAGE).expect("page layout");
        // SAFETY: the layout has a non-zero size; the caller writes every
        // byte before any slice is made over the memory.
        let raw = unsafe { std::alloc::alloc(layout) };
        let ptr = NonNull::new(raw).unwrap_or_else(|| std::alloc::handle_alloc_error(layout));
        Pages {
            ptr,
            cap,
            pool: None,
        }
    }
}

impl Drop for Pages {
    fn drop(&mut self) {
        if !recycled::give(self.ptr, self.cap) {
            let layout = Layout::from_size_align(self.cap, PAGE).expect("page layout");
            // SAFETY: allocated in `Pages::alloc*` with this very layout.
            unsafe { dealloc(self.ptr.as_ptr(), layout) };
        }
        if let Some(pool) = &self.pool {
            pool.release(self.cap);
        }
    }
}

/// Give back the memory of freed buffers kept for reuse (see `recycled`).
pub fn release_kept() {
    recycled::release_all();
}

/// Freed chunks kept for the next buffers of the same size. Unit buffers
/// (64 KiB, and their compressed and sealed forms) come and go at every
/// write; memory the allocator gives back and takes again costs a page
/// fault and a page clear per 4 KiB, which was two fifths of the daemon's
/// CPU on a sequential write. A chunk taken from here is warm.
mod recycled {
    use super::PAGE;
    use parking_lot::Mutex;
    use std::ptr::NonNull;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// Sizes kept: up to this many pages (a unit with crypt overhead fits).
    const MAX_PAGES: usize = 32;
    /// Bytes kept at most, over all sizes.
    const MAX_BYTES: usize = 256 << 20;

    static KEPT: AtomicUsize = AtomicUsize::new(0);
    /// Chunk addresses by size in pages (index 0 unused).
    static CHUNKS: [Mutex<Vec<usize>>; MAX_PAGES + 1] =
        [const { Mutex::new(Vec::new()) }; MAX_PAGES + 1];

    /// Free every kept chunk (an idle filesystem gives its memory back).
    pub fn release_all() {
        for (pages, class) in CHUNKS.iter().enumerate() {
            let chunks = std::mem::take(&mut *class.lock());
            let cap = pages * PAGE;
            for addr in chunks {
                KEPT.fetch_sub(cap, Ordering::Relaxed);
                let layout = std::alloc::Layout::from_size_align(cap, PAGE).expect("page layout");
                // SAFETY: a chunk of `cap` bytes allocated with this layout,
                // given back by its last owner and taken by nobody since.
                unsafe { std::alloc::dealloc(addr as *mut u8, layout) };
            }
        }
    }

    pub(super) fn take(cap: usize) -> Option<NonNull<u8>> {
        let class = CHUNKS.get(cap / PAGE)?;
        let addr = class.lock().pop()?;
        KEPT.fetch_sub(cap, Ordering::Relaxed);
        NonNull::new(addr as *mut u8)
    }

    /// Keep a chunk for reuse; false when it is not kept (then free it).
    pub(super) fn give(ptr: NonNull<u8>, cap: usize) -> bool {
        let Some(class) = CHUNKS.get(cap / PAGE) else {
            return false;
        };
        if KEPT.fetch_add(cap, Ordering::Relaxed) + cap > MAX_BYTES {
            KEPT.fetch_sub(cap, Ordering::Relaxed);
            return false;
        }
        class.lock().push(ptr.as_ptr() as usize);
        true
    }
}

/// A window over shared, page-aligned memory.
///
/// Rules that make sharing sound: a buffer being filled by a read is not looked
/// at by its owner until the read completes (completion is the hand-over), and
/// windows that are written concurrently (children of one split) never overlap.
/// `as_mut_slice` therefore requires `&mut self` and no other window alive.
#[derive(Clone)]
pub struct Buf {
    pages: Arc<Pages>,
    off: usize,
    len: usize,
}

impl std::fmt::Debug for Buf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Buf[{}+{} of {}]", self.off, self.len, self.pages.cap)
    }
}

impl Buf {
    /// A zeroed buffer outside any pool (tests, one-off metadata).
    pub fn zeroed(len: usize) -> Buf {
        Buf {
            pages: Arc::new(Pages::alloc(len, None)),
            off: 0,
            len,
        }
    }

    /// A buffer holding a copy of `data` (counted in `copied_bytes`).
    pub fn copy_from(data: &[u8]) -> Buf {
        let cap = data.len().max(PAGE).div_ceil(PAGE) * PAGE;
        let pages = Pages::alloc_uninit(cap);
        // SAFETY: `cap` bytes owned by `pages` alone; every byte is written
        // before any slice is made over them: `data` fills the window, zeros
        // the rest.
        unsafe {
            let raw = pages.ptr.as_ptr();
            std::ptr::copy_nonoverlapping(data.as_ptr(), raw, data.len());
            std::ptr::write_bytes(raw.add(data.len()), 0, cap - data.len());
        }
        count_copy(data.len());
        Buf {
            pages: Arc::new(pages),
            off: 0,
            len: data.len(),
        }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Bytes from the window's start to the end of the allocation.
    pub fn capacity(&self) -> usize {
        self.pages.cap - self.off
    }

    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: off+len <= cap by construction; the memory lives as long as `pages`.
        unsafe { std::slice::from_raw_parts(self.pages.ptr.as_ptr().add(self.off), self.len) }
    }

    /// Mutable view; only when this is the sole window onto the memory.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        assert!(
            Arc::get_mut(&mut self.pages).is_some(),
            "as_mut_slice on a shared Buf"
        );
        // SAFETY: no other `Buf` shares the pages (checked above), so this is unique.
        unsafe { std::slice::from_raw_parts_mut(self.pages.ptr.as_ptr().add(self.off), self.len) }
    }

    /// Mutable view of a shared buffer, for the completion of a split request
    /// whose children have all finished.
    ///
    /// # Safety
    /// The caller guarantees no other window onto these bytes is read or
    /// written while the returned slice lives.
    #[allow(clippy::mut_from_ref)]
    pub unsafe fn as_mut_slice_unchecked(&self) -> &mut [u8] {
        std::slice::from_raw_parts_mut(self.pages.ptr.as_ptr().add(self.off), self.len)
    }

    /// Raw pointer for the kernel (io_uring) to read from or write into.
    pub fn as_ptr(&self) -> *mut u8 {
        // SAFETY: off <= cap.
        unsafe { self.pages.ptr.as_ptr().add(self.off) }
    }

    /// Shrink or grow the window within the allocation.
    pub fn set_len(&mut self, len: usize) {
        assert!(self.off + len <= self.pages.cap, "set_len beyond capacity");
        self.len = len;
    }

    /// A clone over `[start, start+len)` of this window.
    pub fn slice(&self, start: usize, len: usize) -> Buf {
        assert!(start + len <= self.len, "slice out of range");
        Buf {
            pages: self.pages.clone(),
            off: self.off + start,
            len,
        }
    }

    /// Two clones: `[0, at)` and `[at, len)`.
    pub fn split_at(&self, at: usize) -> (Buf, Buf) {
        (self.slice(0, at), self.slice(at, self.len - at))
    }

    /// True when address, length and memory suit O_DIRECT on `align`-byte sectors.
    pub fn is_aligned(&self, align: usize) -> bool {
        (self.as_ptr() as usize) % align == 0 && self.len % align == 0
    }

    /// True when no other window shares this memory: then nobody else can
    /// see a change made through `as_mut_slice_unchecked`.
    pub fn is_unique(&self) -> bool {
        Arc::strong_count(&self.pages) == 1
    }

    /// How many windows share this memory (for leak tests).
    pub fn share_count(&self) -> usize {
        Arc::strong_count(&self.pages)
    }
}

struct PoolInner {
    limit: usize,
    used: Mutex<usize>,
    freed: Condvar,
}

impl PoolInner {
    fn release(&self, n: usize) {
        let mut used = self.used.lock();
        *used -= n;
        self.freed.notify_all();
    }
}

/// A bounded source of buffers: `get` waits while the budget is spent.
#[derive(Clone)]
pub struct BufPool {
    inner: Arc<PoolInner>,
}

impl BufPool {
    pub fn new(limit_bytes: usize) -> BufPool {
        BufPool {
            inner: Arc::new(PoolInner {
                limit: limit_bytes,
                used: Mutex::new(0),
                freed: Condvar::new(),
            }),
        }
    }

    /// A zeroed buffer of `len` bytes; blocks while the pool is exhausted.
    /// A request larger than the whole budget waits for an empty pool and then
    /// proceeds alone, so it cannot deadlock.
    pub fn get(&self, len: usize) -> Buf {
        let cap = len.max(PAGE).div_ceil(PAGE) * PAGE;
        {
            let mut used = self.inner.used.lock();
            while *used > 0 && *used + cap > self.inner.limit {
                self.inner.freed.wait(&mut used);
            }
            *used += cap;
        }
        Buf {
            pages: Arc::new(Pages::alloc(cap, Some(self.inner.clone()))),
            off: 0,
            len,
        }
    }

    /// Bytes currently handed out.
    pub fn in_use(&self) -> usize {
        *self.inner.used.lock()
    }

    pub fn limit(&self) -> usize {
        self.inner.limit
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn split_shares_memory() {
        let mut b = Buf::zeroed(8192);
        b.as_mut_slice()[4096] = 7;
        let (l, r) = b.split_at(4096);
        assert_eq!(l.len(), 4096);
        assert_eq!(r.as_slice()[0], 7);
        assert_eq!(r.as_ptr() as usize, b.as_ptr() as usize + 4096);
        assert!(l.is_aligned(4096) && r.is_aligned(4096));
        assert_eq!(b.share_count(), 3);
    }

    #[test]
    fn pool_blocks_then_resumes() {
        let pool = BufPool::new(2 * PAGE);
        let a = pool.get(PAGE);
        let _b = pool.get(PAGE);
        let p2 = pool.clone();
        let t = std::thread::spawn(move || p2.get(PAGE).len());
        std::thread::sleep(Duration::from_millis(50));
        assert!(
            !t.is_finished(),
            "get must wait while the pool is exhausted"
        );
        drop(a);
        assert_eq!(t.join().unwrap(), PAGE);
    }

    #[test]
    fn oversized_request_does_not_deadlock() {
        let pool = BufPool::new(PAGE);
        let b = pool.get(4 * PAGE);
        assert_eq!(b.len(), 4 * PAGE);
        drop(b);
        assert_eq!(pool.in_use(), 0);
    }
}
