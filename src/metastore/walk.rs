//! Going over every live slot of the store on one mirror copy, for a
//! scrub (check the copy, heal what is wrong), a resync or a replaced
//! device (rebuild the copy from the others).
//!
//! The live slots: the root slot holding the durable root, and the slot the
//! current version of every table and data sector names. They are listed
//! under the store's lock, then read in batches without it while commits go
//! on. A slot that does not hold its version is counted as bad only if the
//! version is still current under the lock after the read: a sector that got
//! a newer version meanwhile (in its other slot) has moved on, and what its
//! old slot holds no longer matters. The walk writes nothing itself: reads
//! that avoid a copy make the mirror rewrite that copy where it differs.

use super::ondisk::{sector_name, Slot, Ver, ROOT_SECTOR, SLOT, TABLE_BASE};
use super::slots::holds;
use super::{eio, Format, MetaStore, State};
use stackfs_layers::ExtentTag;
use std::io;
use std::sync::Arc;

/// Slots read per batch.
const WALK_BATCH: usize = 256;

/// What a walk does with one copy.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CopyWalk {
    /// Read each live slot from copy `copy` alone and check it holds its
    /// version; one that does not is read again avoiding `copy`, and the
    /// mirror rewrites `copy` from the copy that answers.
    Check { copy: usize },
    /// Read each live slot avoiding `copy`: the mirror rewrites `copy`
    /// where it differs (a resync, a new device).
    Rebuild { copy: usize },
}

impl CopyWalk {
    pub fn copy(&self) -> usize {
        match *self {
            CopyWalk::Check { copy } | CopyWalk::Rebuild { copy } => copy,
        }
    }
}

/// What a walk found. `items`: the live slots (a Rebuild also copies the
/// other root slot, one item more, never bad). `bad`: live slots that did not hold their version as
/// first read (Check: on the copy checked; Rebuild: on the copy that served
/// the read, which was then read avoiding that copy too); each of them is
/// `repaired` (read right from another copy, which the mirror copied over
/// the bad one; or no longer live by then) or `unrepaired`.
#[derive(Default, Debug, Clone, PartialEq, Eq)]
pub struct WalkCounts {
    /// Live slots walked, and their bytes (8 KiB each, as on the devices).
    pub items: u64,
    pub bytes: u64,
    pub bad: u64,
    pub repaired: u64,
    pub unrepaired: u64,
}

impl WalkCounts {
    pub fn add(&mut self, other: &WalkCounts) {
        self.items += other.items;
        self.bytes += other.bytes;
        self.bad += other.bad;
        self.repaired += other.repaired;
        self.unrepaired += other.unrepaired;
    }
}

/// A handle on a store for walks, usable while redb owns the store: it
/// shares the store's versions and lock, and only reads.
pub struct MetaCopies {
    store: MetaStore,
}

impl MetaStore {
    /// A handle to walk the store's copies with (`MetaCopies::walk`).
    pub fn copies_handle(&self) -> Arc<MetaCopies> {
        Arc::new(MetaCopies {
            store: MetaStore {
                top: self.top.clone(),
                region: self.region,
                layout: self.layout,
                slot_len: self.slot_len,
                pool_uuid: self.pool_uuid,
                state: self.state.clone(),
                read_only: self.read_only,
                watch: self.watch.clone(),
                copies: self.copies,
            },
        })
    }
}

impl MetaCopies {
    /// Copies the stack below keeps.
    pub fn copies(&self) -> usize {
        self.store.copies
    }

    /// Walk every live slot (see the module doc). Without `repair` (or on
    /// a store opened read-only), a Check re-reads nothing and every bad
    /// slot is unrepaired; a Rebuild is refused. Without a mirror a Check
    /// only checks (bad slots are unrepaired). `progress` gets the bytes of
    /// each batch done.
    pub fn walk(
        &self,
        mode: CopyWalk,
        repair: bool,
        progress: &dyn Fn(u64),
    ) -> io::Result<WalkCounts> {
        let m = &self.store;
        let copy = mode.copy();
        if copy >= m.copies {
            return Err(eio(format!(
                "no copy {copy}: the stack keeps {} copies",
                m.copies
            )));
        }
        let repair = repair && !m.read_only && m.copies > 1;
        if matches!(mode, CopyWalk::Rebuild { .. }) && !repair {
            return Err(eio(format!(
                "copy {copy} cannot be rebuilt: {}",
                if m.copies == 1 {
                    "there is no other copy"
                } else {
                    "the store may not write"
                }
            )));
        }
        let live = m.live_slots()?;
        let tag = match mode {
            CopyWalk::Check { .. } if m.copies > 1 => m.only_copy(copy),
            CopyWalk::Check { .. } => ExtentTag::default(),
            CopyWalk::Rebuild { .. } => ExtentTag {
                avoid: 1 << copy,
                ..ExtentTag::default()
            },
        };
        let mut counts = WalkCounts::default();
        for batch in live.chunks(WALK_BATCH) {
            counts.items += batch.len() as u64;
            counts.bytes += batch.len() as u64 * SLOT;
            let reqs: Vec<(u64, u64, ExtentTag)> =
                batch.iter().map(|&(s, v)| (s, v.slot(), tag)).collect();
            let wrong: Vec<(u64, Ver, (Slot, ExtentTag))> = batch
                .iter()
                .zip(m.read_tagged(&reqs))
                .filter(|((_, v), (x, _))| !holds(x, *v))
                .map(|(&(s, v), read)| (s, v, read))
                .collect();
            let wrong = m.still_live(wrong);
            counts.bad += wrong.len() as u64;
            m.mend(mode, repair, wrong, &mut counts);
            progress(batch.len() as u64 * SLOT);
        }
        if let CopyWalk::Rebuild { .. } = mode {
            // The other root slot too (the previous root, or nothing yet):
            // the copy alone then opens without a fallback. It has no
            // version to hold, so it is never bad.
            let other = 1 - m.state.lock().root_slot;
            m.read_tagged(&[(ROOT_SECTOR, other, tag)]);
            counts.items += 1;
            counts.bytes += SLOT;
            progress(SLOT);
        }
        Ok(counts)
    }
}

impl MetaStore {
    /// Every live slot with the version it must hold: the durable root's,
    /// then the table sectors', then the data sectors'.
    fn live_slots(&self) -> io::Result<Vec<(u64, Ver)>> {
        let st = self.state.lock();
        if st.format == Format::LegacyReadOnly {
            return Err(eio(
                "a legacy store opened read-only has no version tables to walk",
            ));
        }
        let root = (ROOT_SECTOR, Ver::new(st.root_seq, st.root_slot));
        let tables = (0..st.tables.len() as u64).map(|t| TABLE_BASE + t);
        let data = 0..st.expected.len() as u64;
        Ok(std::iter::once(root)
            .chain(
                tables
                    .chain(data)
                    .map(|s| (s, Self::version(&st, s)))
                    .filter(|(_, v)| !v.is_none()),
            )
            .collect())
    }

    /// The version sector `s` must hold now (the root: the durable one).
    fn current(st: &State, s: u64) -> Ver {
        match s {
            ROOT_SECTOR => Ver::new(st.root_seq, st.root_slot),
            _ => Self::version(st, s),
        }
    }

    /// Those of `slots` whose version is still current (under the lock).
    fn still_live<T>(&self, slots: Vec<(u64, Ver, T)>) -> Vec<(u64, Ver, T)> {
        if slots.is_empty() {
            return slots;
        }
        let st = self.state.lock();
        slots
            .into_iter()
            .filter(|(s, v, _)| Self::current(&st, *s) == *v)
            .collect()
    }

    /// Deal with the live slots found bad (with what was read, and from
    /// which copies): with `repair`, read each again from the other copies
    /// (a Check first avoids the copy checked; then every copy that served
    /// a wrong version is avoided too), so the mirror rewrites the copies
    /// avoided from the one that answers; count the outcome.
    fn mend(
        &self,
        mode: CopyWalk,
        repair: bool,
        wrong: Vec<(u64, Ver, (Slot, ExtentTag))>,
        counts: &mut WalkCounts,
    ) {
        let copy = mode.copy();
        let first: Vec<(u64, Ver, (Slot, ExtentTag))> = match mode {
            CopyWalk::Check { .. } if repair => {
                let avoid = ExtentTag {
                    avoid: 1 << copy,
                    ..ExtentTag::default()
                };
                let reqs: Vec<(u64, u64, ExtentTag)> = wrong
                    .iter()
                    .map(|(s, v, _)| (*s, v.slot(), avoid))
                    .collect();
                let again = self.read_tagged(&reqs);
                wrong
                    .into_iter()
                    .zip(again)
                    .map(|((s, v, _), read)| (s, v, read))
                    .collect()
            }
            _ => wrong,
        };
        let mut left = Vec::new();
        for (s, v, (x, served)) in first {
            let found = match repair {
                true => self.other_copies_at(s, v, x, served),
                false => x,
            };
            if holds(&found, v) {
                counts.repaired += 1;
                log::warn!(
                    "metadata {} on copy {copy}: version {} did not read right; \
                     read from another copy, which the mirror copied over it",
                    sector_name(s),
                    v.seq()
                );
            } else {
                left.push((s, v, found));
            }
        }
        // Those that moved on meanwhile hold nothing live any more.
        let moved_on = left.len();
        let still = self.still_live(left);
        counts.repaired += (moved_on - still.len()) as u64;
        counts.unrepaired += still.len() as u64;
        for (s, v, found) in still {
            log::error!(
                "metadata {} on copy {copy}: version {} expected, found {}; {}",
                sector_name(s),
                v.seq(),
                found.describe(),
                if repair {
                    "no copy holds it"
                } else {
                    "not repaired"
                }
            );
        }
    }
}
