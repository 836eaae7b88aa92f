//! `Io`: one request, for every layer.
//!
//! Lifecycle (compare `bio_chain`/`bio_endio`): a request starts with one
//! reference, held by whoever is working on it. A layer that splits it calls
//! `child()` for each piece (the parent's count goes up by one per child),
//! submits the children below, then drops its own reference with `put()`. A
//! layer at the bottom calls `finish(result)` exactly once. When the count
//! reaches zero the request completes: its `end_io` hook runs (decrypt, verify,
//! gather...) in the thread that delivered the last completion, and the result
//! is added to the parent, whose count then drops. A parent therefore completes
//! once, after its last child, with the sum of the children's bytes or the
//! first error. The first error of a child cancels its siblings.

use crate::buf::Buf;
use crate::errno::Errno;
use parking_lot::Mutex;
use std::sync::atomic::{AtomicI32, AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
use std::time::Instant;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Op {
    Read,
    Write,
    /// Make every completed write durable (fdatasync below).
    Flush,
    /// The range's contents are no longer needed (punch hole / BLKDISCARD).
    Discard,
}

/// What transform layers record about an extent on its way down, and need
/// again on the way up: the filesystem stores it in the extent map.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ExtentTag {
    /// Compression codec of the stored bytes (0 = raw).
    pub codec: u8,
    /// Bytes the caller sees.
    pub logical_len: u32,
    /// Bytes that reach the bottom of the stack (after compression, with crypt overhead).
    pub stored_len: u32,
    /// Nonce the crypt layer used.
    pub nonce: [u8; 24],
    /// Authentication tag of the crypt layer.
    pub mac: [u8; 16],
    /// `TAG_DETACHED`: crypt keeps nonce and MAC here (the caller stores them)
    /// instead of next to the ciphertext, so an extent takes no extra space.
    pub flags: u8,
    /// Copies a read must not use (bit i: copy i of every mirror below), set
    /// by a caller re-reading an extent whose verification failed (see
    /// `retry_avoiding`). A mirror with every copy avoided fails with EIO.
    pub avoid: u32,
    /// Copies that served a read (bit i: copy i), set by the mirror and ORed
    /// up through the stack (with a stripe above: over every group). Unlike
    /// the other fields it travels up from a request that failed too: a read
    /// that fails verification above the mirror must still say where its
    /// bytes came from, so the caller can avoid that copy.
    pub copies: u32,
}

impl ExtentTag {
    /// Take over every field that differs between `before` and `after`: what
    /// the layers below a request recorded while it was in flight.
    fn take_changes(&mut self, before: &ExtentTag, after: &ExtentTag) {
        if before.codec != after.codec {
            self.codec = after.codec;
        }
        if before.logical_len != after.logical_len {
            self.logical_len = after.logical_len;
        }
        if before.stored_len != after.stored_len {
            self.stored_len = after.stored_len;
        }
        if before.nonce != after.nonce {
            self.nonce = after.nonce;
        }
        if before.mac != after.mac {
            self.mac = after.mac;
        }
        if before.flags != after.flags {
            self.flags = after.flags;
        }
        if before.avoid != after.avoid {
            self.avoid = after.avoid;
        }
        self.take_copies(before, after);
    }

    /// OR in the copies recorded below: siblings (stripe children over
    /// several mirror groups) add up instead of replacing each other.
    fn take_copies(&mut self, before: &ExtentTag, after: &ExtentTag) {
        if before.copies != after.copies {
            self.copies |= after.copies;
        }
    }

    /// The tag to re-read an extent with after the bytes of this read failed
    /// verification: the copies it came from are avoided from now on (with
    /// those avoided before), and `copies` starts empty for the new read.
    pub fn retry_avoiding(&self) -> ExtentTag {
        ExtentTag {
            avoid: self.avoid | self.copies,
            copies: 0,
            ..*self
        }
    }
}

pub const TAG_DETACHED: u8 = 1;
/// `TAG_RAW`: store the bytes uncompressed (space the caller wants claimed,
/// such as preallocated zeros).
pub const TAG_RAW: u8 = 2;
/// `TAG_NO_HEAL`: a read that avoids copies only to choose the one it reads
/// (the metadata store reading each copy in turn, a scrub checking one):
/// the mirror does not heal the avoided copies from it. Without it, a read
/// that avoids copies takes the bytes it got as the good ones.
pub const TAG_NO_HEAL: u8 = 4;

/// Bytes transferred, or the errno that ended the request.
pub type IoResult = Result<u64, Errno>;

/// Runs when a request completes; may change the result it passes upward
/// (a decrypting layer turns a bad MAC into EIO).
pub type EndIo = Box<dyn FnOnce(&Io, IoResult) -> IoResult + Send>;

type Canceller = Box<dyn FnOnce() + Send>;
type Observer = Box<dyn FnOnce(&Io, &IoResult) + Send>;

const FINISHED: u8 = 1;
const CANCELLED: u8 = 2;

struct IoInner {
    op: Op,
    addr: u64,
    /// Bytes covered: the buffer's length, or the range of a discard.
    len: u64,
    buf: Buf,
    /// A vectored request's buffers in order (`buf` is the first); empty otherwise.
    segs: Vec<Buf>,
    tag: Mutex<ExtentTag>,
    /// The tag the request was made with: what changed since then goes up.
    initial_tag: ExtentTag,
    parent: Option<Io>,
    /// For a detached copy (`Io::detached`): the request it does the I/O of.
    /// Not a parent (no completion reference); only its tag is updated.
    origin: Option<Io>,
    children: Mutex<Vec<Weak<IoInner>>>,
    remaining: AtomicUsize,
    bytes: AtomicU64,
    error: AtomicI32,
    state: AtomicU8,
    end_io: Mutex<Option<EndIo>>,
    /// Set by whoever holds the request queued or in flight; run once on cancel.
    canceller: Mutex<Option<Canceller>>,
    /// Completion observers (per-layer counters); run before `end_io`.
    observers: Mutex<Vec<Observer>>,
    created: Instant,
}

/// A counted handle on one request. Cloning the handle does not add a
/// completion reference: only `child()` and the initial reference count.
#[derive(Clone)]
pub struct Io(Arc<IoInner>);

impl std::fmt::Debug for Io {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Io({:?} @{} len {})", self.0.op, self.0.addr, self.0.len)
    }
}

impl Io {
    /// A top-level request; `end_io` receives its final result.
    pub fn new(op: Op, addr: u64, buf: Buf, end_io: Option<EndIo>) -> Io {
        let len = buf.len() as u64;
        Io::build(
            op,
            addr,
            len,
            buf,
            Vec::new(),
            None,
            end_io,
            ExtentTag::default(),
        )
    }

    /// A discard of `len` bytes (no buffer).
    pub fn discard(addr: u64, len: u64, end_io: Option<EndIo>) -> Io {
        Io::build(
            Op::Discard,
            addr,
            len,
            Buf::zeroed(0),
            Vec::new(),
            None,
            end_io,
            ExtentTag::default(),
        )
    }

    #[allow(clippy::too_many_arguments)]
    fn build(
        op: Op,
        addr: u64,
        len: u64,
        buf: Buf,
        segs: Vec<Buf>,
        parent: Option<Io>,
        end_io: Option<EndIo>,
        tag: ExtentTag,
    ) -> Io {
        let cancelled = parent.as_ref().is_some_and(|p| p.is_cancelled());
        Io(Arc::new(IoInner {
            op,
            addr,
            len,
            buf,
            segs,
            tag: Mutex::new(tag),
            initial_tag: tag,
            parent,
            origin: None,
            children: Mutex::new(Vec::new()),
            remaining: AtomicUsize::new(1),
            bytes: AtomicU64::new(0),
            error: AtomicI32::new(0),
            state: AtomicU8::new(if cancelled { CANCELLED } else { 0 }),
            end_io: Mutex::new(end_io),
            canceller: Mutex::new(None),
            observers: Mutex::new(Vec::new()),
            created: Instant::now(),
        }))
    }

    /// A top-level request doing the same I/O as this one (operation,
    /// address, buffers, tag) but tied to it by nothing: this one may complete
    /// while the copy is still in flight, holding its buffers. The watchdog
    /// uses it to fail a request above without waiting for the device.
    /// What the layers below record in the copy's tag reaches this request's
    /// tag when the copy completes (before the copy's `end_io`), as long as
    /// this one has not finished.
    pub fn detached(&self, end_io: Option<EndIo>) -> Io {
        let i = &self.0;
        let mut copy = Io::build(
            i.op,
            i.addr,
            i.len,
            i.buf.clone(),
            i.segs.clone(),
            None,
            end_io,
            *i.tag.lock(),
        );
        Arc::get_mut(&mut copy.0)
            .expect("a request just built has one handle")
            .origin = Some(self.clone());
        copy
    }

    /// A child request over (usually) a clone of part of this request's
    /// buffer. The parent will not complete before the child has.
    pub fn child(&self, op: Op, addr: u64, buf: Buf, end_io: Option<EndIo>) -> Io {
        let len = buf.len() as u64;
        self.child_len(op, addr, len, buf, end_io)
    }

    /// A child doing this request's whole I/O (operation, range, buffers):
    /// one copy's share of a mirrored write, flush or discard.
    pub fn child_copy(&self, end_io: Option<EndIo>) -> Io {
        let i = &self.0;
        self.add_child(i.op, i.addr, i.len, i.buf.clone(), i.segs.clone(), end_io)
    }

    /// A child discard of `len` bytes.
    pub fn child_discard(&self, addr: u64, len: u64, end_io: Option<EndIo>) -> Io {
        self.child_len(Op::Discard, addr, len, Buf::zeroed(0), end_io)
    }

    /// A child read or write over several buffers that are contiguous in the
    /// address space but not in memory (readv/writev below). Only layers whose
    /// `Layer::vectored` is true receive such requests.
    pub fn child_vectored(&self, op: Op, addr: u64, mut segs: Vec<Buf>) -> Io {
        debug_assert!(matches!(op, Op::Read | Op::Write));
        if segs.len() == 1 {
            let buf = segs.pop().expect("one segment");
            return self.child(op, addr, buf, None);
        }
        let len = segs.iter().map(|b| b.len() as u64).sum();
        let first = segs.first().cloned().unwrap_or_else(|| Buf::zeroed(0));
        self.add_child(op, addr, len, first, segs, None)
    }

    fn child_len(&self, op: Op, addr: u64, len: u64, buf: Buf, end_io: Option<EndIo>) -> Io {
        self.add_child(op, addr, len, buf, Vec::new(), end_io)
    }

    fn add_child(
        &self,
        op: Op,
        addr: u64,
        len: u64,
        buf: Buf,
        segs: Vec<Buf>,
        end_io: Option<EndIo>,
    ) -> Io {
        self.0.remaining.fetch_add(1, Ordering::AcqRel);
        let tag = *self.0.tag.lock();
        let c = Io::build(op, addr, len, buf, segs, Some(self.clone()), end_io, tag);
        self.0.children.lock().push(Arc::downgrade(&c.0));
        c
    }

    pub fn op(&self) -> Op {
        self.0.op
    }
    pub fn addr(&self) -> u64 {
        self.0.addr
    }
    /// The request's buffer; for a vectored request, its first segment only.
    pub fn buf(&self) -> &Buf {
        &self.0.buf
    }
    /// Every buffer of the request in address order: one, or a vectored request's segments.
    pub fn segments(&self) -> &[Buf] {
        if self.0.segs.is_empty() {
            std::slice::from_ref(&self.0.buf)
        } else {
            &self.0.segs
        }
    }
    pub fn is_vectored(&self) -> bool {
        !self.0.segs.is_empty()
    }
    /// Bytes covered by the request (a discard's range has no buffer).
    pub fn len(&self) -> u64 {
        self.0.len
    }
    pub fn is_empty(&self) -> bool {
        self.0.len == 0
    }
    pub fn parent(&self) -> Option<&Io> {
        self.0.parent.as_ref()
    }
    pub fn tag(&self) -> ExtentTag {
        *self.0.tag.lock()
    }
    pub fn set_tag(&self, tag: ExtentTag) {
        *self.0.tag.lock() = tag;
    }
    pub fn age(&self) -> std::time::Duration {
        self.0.created.elapsed()
    }
    pub fn is_cancelled(&self) -> bool {
        self.0.state.load(Ordering::Acquire) & CANCELLED != 0
    }
    /// True once `finish` has been called (the request may still wait for children).
    pub fn is_finished(&self) -> bool {
        self.0.state.load(Ordering::Acquire) & FINISHED != 0
    }
    /// Identity, for tables of requests in flight.
    pub fn id(&self) -> usize {
        Arc::as_ptr(&self.0) as usize
    }
    pub fn same(&self, other: &Io) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }

    /// The bottom of the stack reports the outcome of this request. Only the
    /// first call counts; later calls (a cancel racing a completion) are ignored.
    /// Returns whether this call was the one that counted.
    pub fn finish(&self, res: IoResult) -> bool {
        let prev = self.0.state.fetch_or(FINISHED, Ordering::AcqRel);
        if prev & FINISHED != 0 {
            return false;
        }
        self.0.canceller.lock().take();
        self.record(res);
        self.put();
        true
    }

    /// Give up the reference taken at creation without reporting anything
    /// (a layer that has handed all the work to children).
    pub fn put(&self) {
        if self.0.remaining.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.complete();
        }
    }

    fn record(&self, res: IoResult) {
        match res {
            Ok(n) => {
                self.0.bytes.fetch_add(n, Ordering::AcqRel);
            }
            Err(e) => {
                if self
                    .0
                    .error
                    .compare_exchange(0, e.0, Ordering::AcqRel, Ordering::Acquire)
                    .is_ok()
                {
                    // First failure: the siblings' work is wasted, stop it.
                    self.cancel_children();
                }
            }
        }
    }

    fn complete(&self) {
        let err = self.0.error.load(Ordering::Acquire);
        let mut res = if err != 0 {
            Err(Errno(err))
        } else {
            Ok(self.0.bytes.load(Ordering::Acquire))
        };
        let observers = std::mem::take(&mut *self.0.observers.lock());
        for obs in observers {
            obs(self, &res);
        }
        if res.is_ok() {
            self.merge_tag_up();
        } else {
            self.merge_copies_up();
        }
        if let Some(end_io) = self.0.end_io.lock().take() {
            // A panicking hook must not leave its parent waiting forever
            // (a FUSE reply never sent, a waiter never woken): it fails the
            // request instead.
            let hook = std::panic::AssertUnwindSafe(|| end_io(self, res));
            res = std::panic::catch_unwind(hook).unwrap_or_else(|_| {
                log::error!("{self:?}: completion hook panicked; failing the request with EIO");
                Err(Errno::EIO)
            });
        }
        self.0.children.lock().clear();
        if let Some(parent) = &self.0.parent {
            parent.record(res);
            parent.put();
        }
    }

    /// Carry what the layers below changed in this request's tag up to its
    /// parent (or, for a detached copy, to the request it copies): the
    /// framework's one place for it, so that no layer copies tags by hand.
    fn merge_tag_up(&self) {
        let Some(target) = self.merge_target() else {
            return;
        };
        let now = self.tag();
        if now != self.0.initial_tag {
            target.0.tag.lock().take_changes(&self.0.initial_tag, &now);
        }
    }

    /// After a failure, only the copies that served the request go up (see
    /// `ExtentTag::copies`): what else the layers recorded is not a result.
    fn merge_copies_up(&self) {
        if let Some(target) = self.merge_target() {
            let now = self.tag();
            target.0.tag.lock().take_copies(&self.0.initial_tag, &now);
        }
    }

    /// Where this request's tag changes go: its parent, or for a detached
    /// copy the request it copies while that one is still open.
    fn merge_target(&self) -> Option<&Io> {
        match (&self.0.parent, &self.0.origin) {
            (Some(parent), _) => Some(parent),
            (None, Some(origin)) if !origin.is_finished() => Some(origin),
            _ => None,
        }
    }

    /// Cancel this request and every descendant: queued ones never start,
    /// in-flight ones are cancelled where they are, each completes once with
    /// ECANCELED (unless it had already completed).
    pub fn cancel(&self) {
        let canceller = {
            let mut slot = self.0.canceller.lock();
            self.0.state.fetch_or(CANCELLED, Ordering::AcqRel);
            slot.take()
        };
        self.cancel_children();
        if let Some(f) = canceller {
            f();
        }
    }

    fn cancel_children(&self) {
        let children: Vec<Io> = self
            .0
            .children
            .lock()
            .iter()
            .filter_map(|w| w.upgrade().map(Io))
            .collect();
        for c in children {
            c.cancel();
        }
    }

    /// Whoever queues or starts this request says how to cancel it there.
    /// If the request was cancelled already, `f` runs now.
    pub fn set_canceller(&self, f: impl FnOnce() + Send + 'static) {
        let mut slot = self.0.canceller.lock();
        if self.is_cancelled() {
            drop(slot);
            f();
        } else if self.is_finished() {
            // Completed meanwhile: nothing left to cancel.
        } else {
            *slot = Some(Box::new(f));
        }
    }

    /// Remove the canceller (the request left the queue by itself).
    pub fn clear_canceller(&self) {
        self.0.canceller.lock().take();
    }

    /// Run `f` when this request completes, before its `end_io`.
    pub fn observe(&self, f: impl FnOnce(&Io, &IoResult) + Send + 'static) {
        self.0.observers.lock().push(Box::new(f));
    }
}

/// Blocks a thread until a request completes: for callers that are not
/// themselves completion-driven (mkfs, fsck, metadata store, tests).
#[derive(Clone, Default)]
pub struct Waiter {
    inner: Arc<(Mutex<Option<(IoResult, ExtentTag)>>, parking_lot::Condvar)>,
}

impl Waiter {
    pub fn new() -> Waiter {
        Waiter::default()
    }

    /// The `end_io` to give the request.
    pub fn end_io(&self) -> EndIo {
        let inner = self.inner.clone();
        Box::new(move |io, res| {
            let mut slot = inner.0.lock();
            *slot = Some((res, io.tag()));
            inner.1.notify_all();
            res
        })
    }

    pub fn wait(&self) -> IoResult {
        self.wait_tag().0
    }

    /// The result and the extent tag the layers recorded.
    pub fn wait_tag(&self) -> (IoResult, ExtentTag) {
        let mut slot = self.inner.0.lock();
        loop {
            if let Some(r) = slot.take() {
                return r;
            }
            self.inner.1.wait(&mut slot);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parent_completes_after_last_child_with_sum() {
        let w = Waiter::new();
        let p = Io::new(Op::Read, 0, Buf::zeroed(8192), Some(w.end_io()));
        let (a, b) = p.buf().split_at(4096);
        let c1 = p.child(Op::Read, 0, a, None);
        let c2 = p.child(Op::Read, 4096, b, None);
        p.put();
        c1.finish(Ok(4096));
        assert!(w.inner.0.lock().is_none(), "parent completed early");
        c2.finish(Ok(4096));
        assert_eq!(w.wait(), Ok(8192));
    }

    #[test]
    fn first_error_wins_and_cancels_siblings() {
        let w = Waiter::new();
        let p = Io::new(Op::Write, 0, Buf::zeroed(8192), Some(w.end_io()));
        let c1 = p.child(Op::Write, 0, p.buf().slice(0, 4096), None);
        let c2 = p.child(Op::Write, 4096, p.buf().slice(4096, 4096), None);
        let c2b = c2.clone();
        c2.set_canceller(move || {
            c2b.finish(Err(Errno::ECANCELED));
        });
        p.put();
        c1.finish(Err(Errno::EIO));
        assert!(c2.is_cancelled());
        assert_eq!(w.wait(), Err(Errno::EIO));
    }

    /// What a child's layers record in its tag reaches the parent; an
    /// unchanged sibling does not undo it, a failed child records nothing.
    #[test]
    fn changes_to_a_childs_tag_are_merged_into_the_parent() {
        let w = Waiter::new();
        let p = Io::new(Op::Write, 0, Buf::zeroed(8192), Some(w.end_io()));
        p.set_tag(ExtentTag {
            codec: 1,
            ..ExtentTag::default()
        });
        let (a, b) = p.buf().split_at(4096);
        let stamped = p.child(Op::Write, 0, a, None);
        let unchanged = p.child(Op::Write, 4096, b.clone(), None);
        let failed = p.child(Op::Write, 4096, b, None);
        stamped.set_tag(ExtentTag {
            mac: [9; 16],
            ..stamped.tag()
        });
        failed.set_tag(ExtentTag {
            nonce: [5; 24],
            ..failed.tag()
        });
        p.put();
        stamped.finish(Ok(4096));
        unchanged.finish(Ok(4096));
        failed.finish(Err(Errno::EIO));
        let (res, tag) = w.wait_tag();
        assert_eq!(res, Err(Errno::EIO));
        assert_eq!((tag.codec, tag.mac, tag.nonce), (1, [9; 16], [0; 24]));
    }

    /// The copies that served a read are ORed over siblings, and reach the
    /// caller through a request that failed (verification above a mirror).
    #[test]
    fn copies_are_ored_and_travel_up_through_a_failure() {
        let w = Waiter::new();
        let top = Io::new(Op::Read, 0, Buf::zeroed(8192), Some(w.end_io()));
        let failing = Box::new(|_: &Io, _: IoResult| Err(Errno::EIO));
        let verified = top.child(Op::Read, 0, top.buf().clone(), Some(failing));
        let (a, b) = verified.buf().split_at(4096);
        let group0 = verified.child(Op::Read, 0, a, None);
        let group1 = verified.child(Op::Read, 4096, b, None);
        top.put();
        verified.put();
        group0.set_tag(ExtentTag {
            copies: 0b01,
            ..group0.tag()
        });
        group1.set_tag(ExtentTag {
            copies: 0b10,
            ..group1.tag()
        });
        group0.finish(Ok(4096));
        group1.finish(Ok(4096));
        let (res, tag) = w.wait_tag();
        assert_eq!(res, Err(Errno::EIO));
        assert_eq!(tag.copies, 0b11);
        let retry = tag.retry_avoiding();
        assert_eq!((retry.avoid, retry.copies), (0b11, 0));
    }

    #[test]
    fn finish_counts_once() {
        let w = Waiter::new();
        let io = Io::new(Op::Read, 0, Buf::zeroed(4096), Some(w.end_io()));
        assert!(io.finish(Ok(4096)));
        assert!(!io.finish(Err(Errno::ECANCELED)));
        assert_eq!(w.wait(), Ok(4096));
    }

    #[test]
    fn child_of_cancelled_parent_starts_cancelled() {
        let p = Io::new(Op::Read, 0, Buf::zeroed(4096), None);
        p.cancel();
        let c = p.child(Op::Read, 0, p.buf().clone(), None);
        assert!(c.is_cancelled());
        let ran = Arc::new(AtomicU8::new(0));
        let r = ran.clone();
        c.set_canceller(move || {
            r.store(1, Ordering::SeqCst);
        });
        assert_eq!(
            ran.load(Ordering::SeqCst),
            1,
            "canceller of a cancelled request runs at once"
        );
    }
}
