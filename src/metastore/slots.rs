//! Slot I/O: sealing a sector into a slot, reading slots back and judging
//! what they hold, and submitting batches of slot writes.

use super::ondisk::{
    le64, sector_name, Slot, Ver, PAIR, ROOT_SECTOR, SECTOR, SLOT, STAMP, TABLE_BASE,
};
use super::{eio, MetaStore};
use stackfs_layers::io::TAG_NO_HEAL;
use stackfs_layers::{submit_wait_tag, Buf, Errno, ExtentTag, Io, Op, Waiter};
use std::io;

impl MetaStore {
    pub(super) fn pair_addr(&self, sector: u64) -> u64 {
        if sector == ROOT_SECTOR {
            0
        } else if sector >= TABLE_BASE {
            (self.layout.pairs - 1 - (sector - TABLE_BASE)) * PAIR
        } else {
            (sector + 1) * PAIR
        }
    }

    fn seal(&self, sector: u64, seq: u64, payload: &[u8]) -> Buf {
        let mut b = Buf::zeroed(self.slot_len);
        let s = b.as_mut_slice();
        s[..SECTOR].copy_from_slice(payload);
        s[SECTOR..SECTOR + 8].copy_from_slice(&seq.to_le_bytes());
        s[SECTOR + 8..SECTOR + 16].copy_from_slice(&sector.to_le_bytes());
        s[SECTOR + 16..SECTOR + 32].copy_from_slice(&self.pool_uuid);
        let crc = crc32c::crc32c(&s[..SECTOR + 32]);
        s[SECTOR + 32..SECTOR + 36].copy_from_slice(&crc.to_le_bytes());
        b
    }

    /// Parse one slot read back for `sector`.
    pub(super) fn classify(&self, sector: u64, raw: &[u8]) -> Slot {
        if raw.len() < SECTOR + STAMP {
            return Slot::Damaged;
        }
        let crc = u32::from_le_bytes(raw[SECTOR + 32..SECTOR + 36].try_into().expect("4 bytes"));
        if crc32c::crc32c(&raw[..SECTOR + 32]) != crc {
            return if raw.iter().all(|b| *b == 0) {
                Slot::Empty
            } else {
                Slot::Damaged
            };
        }
        let seq = le64(raw, SECTOR);
        let which = le64(raw, SECTOR + 8);
        if raw[SECTOR + 16..SECTOR + 32] != self.pool_uuid {
            Slot::Foreign
        } else if which != sector {
            Slot::Moved(which, seq)
        } else {
            Slot::Valid(seq, raw[..SECTOR].to_vec().into_boxed_slice())
        }
    }

    /// Read slots (sector, slot index) in one batch. Each slot is its own
    /// request: below crypt, each is sealed separately. A slot not valid as
    /// read is read from the other mirror copies (`from_other_copies`).
    pub(super) fn read_slots(&self, reqs: &[(u64, u64)]) -> Vec<Slot> {
        let tagged: Vec<(u64, u64, ExtentTag)> = reqs
            .iter()
            .map(|&(s, k)| (s, k, ExtentTag::default()))
            .collect();
        reqs.iter()
            .zip(self.read_tagged(&tagged))
            .map(|(&(s, k), (slot, served))| self.from_other_copies(s, k, slot, served))
            .collect()
    }

    /// Read slots (sector, slot index, tag) in one batch, as they are: what
    /// each holds, and the tag that came back (the copies that served it).
    pub(super) fn read_tagged(&self, reqs: &[(u64, u64, ExtentTag)]) -> Vec<(Slot, ExtentTag)> {
        if reqs.is_empty() {
            return Vec::new();
        }
        let mut ios = Vec::with_capacity(reqs.len());
        let mut waits = Vec::with_capacity(reqs.len());
        for &(s, k, tag) in reqs {
            let w = Waiter::new();
            let addr = self.pair_addr(s) + k * SLOT;
            let io = Io::new(Op::Read, addr, Buf::zeroed(self.slot_len), Some(w.end_io()));
            io.set_tag(tag);
            ios.push(io);
            waits.push(w);
        }
        let bufs: Vec<Buf> = ios.iter().map(|io| io.buf().clone()).collect();
        self.top.submit_batch(ios);
        reqs.iter()
            .zip(waits.iter().zip(&bufs))
            .map(|(&(s, ..), (w, b))| {
                let (r, served) = w.wait_tag();
                let slot = match r {
                    Ok(_) => self.classify(s, b.as_slice()),
                    Err(e) => Slot::Failed(e),
                };
                (slot, served)
            })
            .collect()
    }

    /// The tag of a read from mirror copy `copy` alone (copy `copy` of
    /// every mirror below), healing nothing: the read fails with EIO when
    /// that copy does not answer.
    pub(super) fn only_copy(&self, copy: usize) -> ExtentTag {
        ExtentTag {
            avoid: self.all_copies() & !(1 << copy),
            flags: TAG_NO_HEAL,
            ..ExtentTag::default()
        }
    }

    /// The `avoid` bits of every copy.
    pub(super) fn all_copies(&self) -> u32 {
        u32::MAX >> (32 - self.copies.clamp(1, 32))
    }

    /// A slot that is not valid as read, from mirror copies: read it from
    /// the others (the mirror rewrites the copies avoided from the one that
    /// answers) until one holds a valid slot; else what was read first.
    pub(super) fn from_other_copies(
        &self,
        s: u64,
        k: u64,
        first: Slot,
        mut served: ExtentTag,
    ) -> Slot {
        let addr = self.pair_addr(s) + k * SLOT;
        while !matches!(first, Slot::Valid(..)) && served.copies != 0 {
            let buf = Buf::zeroed(self.slot_len);
            let tag = served.retry_avoiding();
            let (r, again) = submit_wait_tag(&*self.top, Op::Read, addr, buf.clone(), tag);
            served = again;
            if r.is_ok() {
                if let valid @ Slot::Valid(..) = self.classify(s, buf.as_slice()) {
                    return valid;
                }
            }
        }
        first
    }

    /// A slot read that does not hold version `v` (with a mirror below:
    /// damaged, or older on a copy that missed writes): read it again
    /// avoiding the copies that served it, until one holds `v` or none is
    /// left. The mirror rewrites the copies avoided from the one that
    /// answers. Returns the slot holding `v`, else what was read first.
    pub(super) fn other_copies_at(
        &self,
        s: u64,
        v: Ver,
        first: Slot,
        mut served: ExtentTag,
    ) -> Slot {
        while !holds(&first, v) && served.copies != 0 {
            let tag = served.retry_avoiding();
            let Some((again, tag_back)) = self.read_tagged(&[(s, v.slot(), tag)]).pop() else {
                break;
            };
            if holds(&again, v) {
                return again;
            }
            served = tag_back;
        }
        first
    }

    /// Read one slot; an error other than EIO (a timeout, a cancel) is
    /// retried once.
    pub(super) fn read_slot_retry(&self, s: u64, k: u64, first: Slot) -> Slot {
        match first {
            Slot::Failed(e) if e != Errno::EIO => {
                self.read_slots(&[(s, k)]).pop().unwrap_or(Slot::Failed(e))
            }
            other => other,
        }
    }

    /// Read sectors at the versions given (none of them `NONE`), in one
    /// batch: each from the slot its version names, accepted only if it
    /// holds exactly that version (from another mirror copy if the one read
    /// holds anything else, as `other_copies_at`).
    pub(super) fn read_versions(&self, want: &[(u64, Ver)]) -> io::Result<Vec<Box<[u8]>>> {
        let reqs: Vec<(u64, u64, ExtentTag)> = want
            .iter()
            .map(|(s, v)| (*s, v.slot(), ExtentTag::default()))
            .collect();
        let got = self.read_tagged(&reqs);
        let mut out = Vec::with_capacity(want.len());
        for (&(s, v), (x, served)) in want.iter().zip(got) {
            // A copy that missed writes holds an older version: not taken.
            let x = self.other_copies_at(s, v, x, served);
            match self.read_slot_retry(s, v.slot(), x) {
                Slot::Valid(q, p) if q == v.seq() => out.push(p),
                other => return Err(self.version_error(s, v, other)),
            }
        }
        Ok(out)
    }

    /// The error for a sector whose slot does not hold the expected version:
    /// what both slots hold (the partner is read now, to say so).
    fn version_error(&self, s: u64, v: Ver, found: Slot) -> io::Error {
        let partner = self
            .read_slots(&[(s, 1 - v.slot())])
            .pop()
            .unwrap_or(Slot::Damaged);
        let (a, b) = if v.slot() == 0 {
            (&found, &partner)
        } else {
            (&partner, &found)
        };
        let what = match (a, b) {
            (Slot::Valid(qa, _), Slot::Valid(qb, _)) => format!("versions {qa} and {qb}"),
            _ => format!("{} and {}", a.describe(), b.describe()),
        };
        let older = [a, b]
            .iter()
            .any(|x| matches!(x, Slot::Valid(q, _) if *q < v.seq()));
        let hint = if matches!(a, Slot::Empty) || matches!(b, Slot::Empty) {
            " (zeroed?)"
        } else if older {
            " (rolled back?)"
        } else {
            ""
        };
        let msg = format!(
            "metadata {}: version {} expected, found {what}{hint}",
            sector_name(s),
            v.seq()
        );
        // redb reports later failures only as "previous I/O error": say it once here.
        log::error!("{msg}");
        self.watch.damage.lock().get_or_insert_with(|| msg.clone());
        eio(msg)
    }

    pub(super) fn seal_write(&self, s: u64, v: Ver, payload: &[u8]) -> (Io, Waiter) {
        let w = Waiter::new();
        let addr = self.pair_addr(s) + v.slot() * SLOT;
        let io = Io::new(
            Op::Write,
            addr,
            self.seal(s, v.seq(), payload),
            Some(w.end_io()),
        );
        (io, w)
    }

    /// Submit writes as one batch, wait for all; with `flush`, then one flush.
    pub(super) fn submit_all(&self, writes: Vec<(Io, Waiter)>, flush: bool) -> io::Result<()> {
        let (ios, waits): (Vec<Io>, Vec<Waiter>) = writes.into_iter().unzip();
        if !ios.is_empty() {
            self.top.submit_batch(ios);
        }
        let mut first_err = None;
        for w in waits {
            if let Err(e) = w.wait() {
                first_err.get_or_insert(e);
            }
        }
        if let Some(e) = first_err {
            return Err(eio(format!("write failed: {e}")));
        }
        if flush {
            stackfs_layers::submit_wait(&*self.top, Op::Flush, 0, Buf::zeroed(0))
                .map_err(|e: Errno| eio(format!("flush failed: {e}")))?;
        }
        Ok(())
    }
}

/// Whether a slot as read holds version `v`.
pub(super) fn holds(x: &Slot, v: Ver) -> bool {
    matches!(x, Slot::Valid(q, _) if *q == v.seq())
}
