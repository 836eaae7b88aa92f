//! Free space of the data region, in 4 KiB blocks: a map of free ranges with
//! a next-fit cursor, so sequential writes land sequentially. It is rebuilt
//! at mount from the extent map (space no committed extent references is
//! free), which is what makes a crash unable to leak or double-allocate space.

use std::collections::BTreeMap;

pub const BLOCK: u64 = 4096;
/// The largest single allocation writes make (a file unit, see `fs::UNIT`).
pub const PIECE: u64 = 64 << 10;

pub struct Allocator {
    free: BTreeMap<u64, u64>,
    cursor: u64,
    free_bytes: u64,
    /// Free `piece`-sized allocations the free ranges hold (each range
    /// counts its length divided by `piece`, rounded down): what writes
    /// that need whole pieces can count on, however fragmented the space.
    pieces: u64,
    piece: u64,
    start: u64,
    end: u64,
}

impl Allocator {
    /// Free space given a list of used ranges; Err names the first overlap
    /// or out-of-region range.
    pub fn from_used(start: u64, end: u64, mut used: Vec<(u64, u64)>) -> Result<Allocator, String> {
        used.sort_unstable();
        let mut a = Allocator {
            free: BTreeMap::new(),
            cursor: start,
            free_bytes: 0,
            pieces: 0,
            piece: PIECE,
            start,
            end,
        };
        let mut at = start;
        for (s, l) in used {
            if s < at || s.checked_add(l).is_none_or(|e| e > end) {
                return Err(format!(
                    "extent at {s}+{l} overlaps another or lies outside the data region"
                ));
            }
            if s > at {
                a.add_range(at, s - at);
            }
            at = s + l;
        }
        if end > at {
            a.add_range(at, end - at);
        }
        Ok(a)
    }

    /// Like `from_used`, but overlapping or out-of-region ranges are merged
    /// and clipped instead of refused (fsck opens damaged pools with it).
    pub fn from_union(start: u64, end: u64, mut used: Vec<(u64, u64)>) -> Allocator {
        used.sort_unstable();
        let mut merged: Vec<(u64, u64)> = Vec::new();
        for (s, l) in used {
            let (s, e) = (s.clamp(start, end), s.saturating_add(l).clamp(start, end));
            match merged.last_mut() {
                Some((ms, ml)) if s <= *ms + *ml => *ml = (*ml).max(e - *ms),
                _ if e > s => merged.push((s, e - s)),
                _ => {}
            }
        }
        Allocator::from_used(start, end, merged).expect("merged ranges do not overlap")
    }

    pub fn free_bytes(&self) -> u64 {
        self.free_bytes
    }

    /// Free whole `PIECE`s (64 KiB, a file unit) that can be allocated.
    pub fn free_pieces(&self) -> u64 {
        self.pieces
    }

    /// Whether allocations of every one of `sizes` could be made now
    /// (first fit, largest first, over the free ranges' lengths).
    pub fn fits(&self, sizes: &[u64]) -> bool {
        let mut want: Vec<u64> = sizes.to_vec();
        want.sort_unstable_by(|a, b| b.cmp(a));
        let mut ranges: Vec<u64> = self.free.values().copied().collect();
        ranges.sort_unstable_by(|a, b| b.cmp(a));
        for w in want {
            match ranges.iter_mut().find(|r| **r >= w) {
                Some(r) => *r -= w,
                None => return false,
            }
        }
        true
    }

    fn add_range(&mut self, start: u64, len: u64) {
        self.free.insert(start, len);
        self.free_bytes += len;
        self.pieces += len / self.piece;
    }

    fn remove_range(&mut self, start: u64) -> Option<u64> {
        let len = self.free.remove(&start)?;
        self.free_bytes -= len;
        self.pieces -= len / self.piece;
        Some(len)
    }

    pub fn total_bytes(&self) -> u64 {
        self.end - self.start
    }

    /// `len` bytes (a multiple of BLOCK) in one piece, or None when no free
    /// range is large enough.
    pub fn alloc(&mut self, len: u64) -> Option<u64> {
        let found = self
            .free
            .range(self.cursor..)
            .chain(self.free.range(..self.cursor))
            .find(|(_, l)| **l >= len)
            .map(|(s, l)| (*s, *l))
            .or_else(|| {
                // The range holding the cursor may start before it.
                self.free
                    .range(..self.cursor)
                    .next_back()
                    .filter(|(s, l)| **s + **l > self.cursor && **l >= len)
                    .map(|(s, l)| (*s, *l))
            })?;
        let (s, l) = found;
        self.remove_range(s);
        if l > len {
            self.add_range(s + len, l - len);
        }
        self.cursor = s + len;
        Some(s)
    }

    pub fn free(&mut self, start: u64, len: u64) {
        if len == 0 {
            return;
        }
        let mut s = start;
        let mut l = len;
        if let Some((&ps, &pl)) = self.free.range(..start).next_back() {
            if ps + pl == start {
                self.remove_range(ps);
                s = ps;
                l += pl;
            }
        }
        if let Some(nl) = self.remove_range(start + len) {
            l += nl;
        }
        self.add_range(s, l);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alloc_free_merge() {
        let mut a = Allocator::from_used(0, 10 * BLOCK, vec![]).unwrap();
        let x = a.alloc(4 * BLOCK).unwrap();
        let y = a.alloc(4 * BLOCK).unwrap();
        assert_eq!((x, y), (0, 4 * BLOCK));
        assert!(a.alloc(4 * BLOCK).is_none());
        a.free(x, 4 * BLOCK);
        a.free(y, 4 * BLOCK);
        assert_eq!(a.free_bytes(), 10 * BLOCK);
        assert_eq!(a.alloc(10 * BLOCK), Some(0), "freed ranges merged");
    }

    #[test]
    fn pieces_count_what_fragmented_space_can_hold() {
        // 10 free ranges of 60 KiB: 600 KiB free, but not one 64 KiB piece.
        let used: Vec<(u64, u64)> = (0..10)
            .map(|i| (i * 16 * BLOCK + 15 * BLOCK, BLOCK))
            .collect();
        let mut a = Allocator::from_used(0, 160 * BLOCK, used).unwrap();
        assert_eq!(a.free_bytes(), 150 * BLOCK);
        assert_eq!(a.free_pieces(), 0);
        assert!(a.alloc(PIECE).is_none());
        assert!(a.fits(&[15 * BLOCK; 10]));
        assert!(!a.fits(&[15 * BLOCK; 11]));
        // Freeing the blocks between them joins the ranges into whole pieces.
        for i in 0..10 {
            a.free(i * 16 * BLOCK + 15 * BLOCK, BLOCK);
        }
        assert_eq!(a.free_pieces(), 10);
        let x = a.alloc(PIECE).unwrap();
        assert_eq!(a.free_pieces(), 9);
        a.free(x, PIECE);
        assert_eq!(a.free_pieces(), 10);
    }

    #[test]
    fn rebuild_detects_overlap() {
        assert!(
            Allocator::from_used(0, 100 * BLOCK, vec![(0, 2 * BLOCK), (BLOCK, BLOCK)]).is_err()
        );
        let a = Allocator::from_used(0, 100 * BLOCK, vec![(BLOCK, BLOCK)]).unwrap();
        assert_eq!(a.free_bytes(), 99 * BLOCK);
    }
}
