//! Walking the file data copy by copy: what `scrub`, resync and `replace`
//! do to the data (the metadata store walks its own slots, `meta_walk`).
//!
//! Every committed extent is read through the whole stack and verified as
//! any read is (CRC, and crypt's MAC), in pool order, so that a walk can stop
//! and resume from a pool address (its cursor). What the tag's `avoid` asks
//! of the mirrors below decides the walk:
//! - `Check { copy }` reads copy `copy` only. A unit that fails is read again
//!   from the other copies (`retry_avoiding`): the mirror rewrites the bad
//!   copy from the good one, and the unit counts as repaired; when no copy
//!   holds it, as unrepaired.
//! - `Rebuild { copy }` reads from any other copy; the mirror compares copy
//!   `copy` with what it read and rewrites it where it differs. A source
//!   that fails verification is avoided in turn, as in `Check`.
//!
//! The extents are taken from a snapshot and checked again before their
//! batch is read, under a read ticket, so that space freed meanwhile is not
//! reused while it is read (a unit rewritten meanwhile is skipped: its new
//! extent was written to every copy the mirror writes).

use super::read::{unit_read, verify_unit};
use super::*;
use stackfs_layers::io::TAG_NO_HEAL;

/// Units read per batch.
const BATCH_UNITS: usize = 32;

/// How the walk's first read of each unit is tagged, over mirrors of
/// `copies` copies: `Check` reads the copy checked alone and heals nothing
/// (its bytes are not verified yet); `Rebuild` avoids the copy rebuilt, so
/// the mirror heals it.
fn walk_tag(mode: CopyWalk, copies: usize, tag: ExtentTag) -> ExtentTag {
    let all = if copies >= 32 {
        u32::MAX
    } else {
        (1u32 << copies) - 1
    };
    match mode {
        CopyWalk::Check { copy } if copies > 1 => ExtentTag {
            avoid: all & !(1 << copy),
            flags: tag.flags | TAG_NO_HEAL,
            ..tag
        },
        CopyWalk::Check { .. } => tag,
        CopyWalk::Rebuild { copy } => ExtentTag {
            avoid: 1 << copy,
            ..tag
        },
    }
}

/// Where a walk is, after each batch.
pub struct WalkStep<'a> {
    /// Bytes read by this batch.
    pub bytes: u64,
    /// Every extent starting below this pool address has been walked.
    pub cursor: u64,
    /// Units found unrepairable in this batch: (inode, byte offset).
    pub lost: &'a [(u64, u64)],
}

/// An extent as found in the snapshot: (pool address, inode, unit, extent).
type Placed = (u64, u64, u64, Extent);

impl Fs {
    /// Bytes of file data the walk would read from `from` on.
    pub fn data_to_walk(&self, from: u64) -> ErrnoResult<u64> {
        Ok(self
            .placed_extents(from)?
            .iter()
            .map(|p| p.3.written_len as u64)
            .sum())
    }

    /// Walk every extent starting at or above pool address `from`, in pool
    /// order. `step` is told after each batch and stops the walk by
    /// returning false (then the counts so far are returned).
    pub fn walk_data(
        &self,
        mode: CopyWalk,
        from: u64,
        step: &mut dyn FnMut(WalkStep) -> bool,
    ) -> ErrnoResult<WalkCounts> {
        let copies = self.copies();
        let mut counts = WalkCounts::default();
        let placed = self.placed_extents(from)?;
        for batch in placed.chunks(BATCH_UNITS) {
            let (lost, bytes) = self.walk_batch(batch, mode, copies, &mut counts)?;
            let cursor = batch.last().map_or(from, |p| p.0 + 1);
            let go_on = step(WalkStep {
                bytes,
                cursor,
                lost: &lost,
            });
            if !go_on {
                break;
            }
        }
        Ok(counts)
    }

    /// Every committed extent at or above `from`, in pool order.
    fn placed_extents(&self, from: u64) -> ErrnoResult<Vec<Placed>> {
        let rtx = self.db().begin_read().map_err(db_err)?;
        let t = rtx.open_table(EXTENTS).map_err(db_err)?;
        let mut out = Vec::new();
        for row in t.iter().map_err(db_err)? {
            let (k, v) = row.map_err(db_err)?;
            let (ino, unit) = k.value();
            let x = Extent::decode(v.value())?;
            if x.phys >= from {
                out.push((x.phys, ino, unit, x));
            }
        }
        out.sort_unstable_by_key(|p| p.0);
        Ok(out)
    }

    /// Read one batch (those of its extents still committed as they were)
    /// and verify it. Returns the units lost and the bytes read.
    fn walk_batch(
        &self,
        batch: &[Placed],
        mode: CopyWalk,
        copies: usize,
        counts: &mut WalkCounts,
    ) -> ErrnoResult<(Vec<(u64, u64)>, u64)> {
        let (ticket, live) = self.pin(batch)?;
        let mut ios = Vec::with_capacity(live.len());
        let mut waits = Vec::with_capacity(live.len());
        for (_, _, _, x) in &live {
            let (io, w) = unit_read(x, walk_tag(mode, copies, x.tag()));
            waits.push((w, io.buf().clone()));
            ios.push(io);
        }
        self.data.submit_batch(ios);
        let mut lost = Vec::new();
        let mut bytes = 0;
        for ((_, ino, unit, x), (w, b)) in live.iter().zip(waits) {
            let (r, served) = w.wait_tag();
            counts.items += 1;
            counts.bytes += x.written_len as u64;
            bytes += x.written_len as u64;
            if verify_unit(*ino, *unit, x, r, &b).is_ok() {
                continue;
            }
            counts.bad += 1;
            if self.reread_elsewhere(mode, (*ino, *unit), x, served) {
                counts.repaired += 1;
            } else {
                counts.unrepaired += 1;
                lost.push((*ino, unit * UNIT));
            }
        }
        self.reads.leave(ticket);
        Ok((lost, bytes))
    }

    /// A unit read bad: read it from the copies not tried yet (the mirror
    /// rewrites the ones avoided from the first that verifies).
    fn reread_elsewhere(
        &self,
        mode: CopyWalk,
        (ino, unit): (u64, u64),
        x: &Extent,
        served: ExtentTag,
    ) -> bool {
        // The retries heal what they avoid: the copy checked and the copies
        // that served bad bytes (a rebuild keeps avoiding its copy).
        let mut served = ExtentTag {
            flags: served.flags & !TAG_NO_HEAL,
            avoid: match mode {
                CopyWalk::Check { .. } => 0,
                CopyWalk::Rebuild { copy } => 1 << copy,
            },
            ..served
        };
        while served.copies != 0 {
            let b = Buf::zeroed(x.written_len as usize);
            let tag = served.retry_avoiding();
            let (r, again) =
                stackfs_layers::submit_wait_tag(&*self.data, Op::Read, x.phys, b.clone(), tag);
            if verify_unit(ino, unit, x, r, &b).is_ok() {
                return true;
            }
            served = again;
        }
        false
    }

    /// Take a read ticket (space freed from now on is not reused until it is
    /// given back) and keep the extents of `batch` still committed as found.
    fn pin(&self, batch: &[Placed]) -> ErrnoResult<(u64, Vec<Placed>)> {
        let ticket = {
            let state = self.state.lock();
            self.reads.enter(state.free_gen);
            state.free_gen
        };
        let still = (|| {
            let rtx = self.db().begin_read().map_err(db_err)?;
            let t = rtx.open_table(EXTENTS).map_err(db_err)?;
            let mut live = Vec::with_capacity(batch.len());
            for p in batch {
                let now = t.get((p.1, p.2)).map_err(db_err)?;
                if now.is_some_and(|v| v.value() == p.3.encode().as_slice()) {
                    live.push(p.clone());
                }
            }
            Ok(live)
        })();
        match still {
            Ok(live) => Ok((ticket, live)),
            Err(e) => {
                self.reads.leave(ticket);
                Err(e)
            }
        }
    }
}
