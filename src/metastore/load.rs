//! Opening a store: the root record, then the version tables it names
//! (versioned format) or every sector's pair (legacy format).

use super::ondisk::{
    le64, Root, RootRec, Slot, Ver, Versioned, MAX_SEQ, PER_TABLE, ROOT_SECTOR, SECTOR, TABLE_BASE,
};
use super::{eio, Format, MetaStore, State, LEGACY_BATCH, LEGACY_SEQ_GAP};
use stackfs_layers::Errno;
use std::io;

impl MetaStore {
    /// Read both root slots; take the valid one with the higher sequence.
    /// Returns the record, its sequence and slot; notes a fallback.
    pub(super) fn read_root(&self) -> io::Result<(RootRec, u64, u64)> {
        let mut got = self.read_slots(&[(ROOT_SECTOR, 0), (ROOT_SECTOR, 1)]);
        let b = self.read_slot_retry(ROOT_SECTOR, 1, got.pop().unwrap_or(Slot::Damaged));
        let a = self.read_slot_retry(ROOT_SECTOR, 0, got.pop().unwrap_or(Slot::Damaged));
        for x in [&a, &b] {
            if let Slot::Failed(e) = x {
                if *e != Errno::EIO {
                    return Err(eio(format!("reading the root record: {e}")));
                }
            }
        }
        let unusable = |x: &Slot| matches!(x, Slot::Damaged | Slot::Failed(_) | Slot::Moved(..));
        let (best, slot, other) = match (&a, &b) {
            (Slot::Valid(qa, _), Slot::Valid(qb, _)) if qb > qa => (&b, 1, &a),
            (Slot::Valid(..), _) => (&a, 0, &b),
            (_, Slot::Valid(..)) => (&b, 1, &a),
            _ if !unusable(&a) && !unusable(&b) => return Err(eio(
                "metadata store has no root record: the metadata region was erased or overwritten",
            )),
            _ => {
                return Err(eio(format!(
                    "metadata root record: no usable copy (found {} and {})",
                    a.describe(),
                    b.describe()
                )))
            }
        };
        let Slot::Valid(seq, payload) = best else {
            unreachable!("matched valid above")
        };
        if *seq > MAX_SEQ {
            return Err(eio(format!("metadata root record claims version {seq}")));
        }
        // The first root ever written has sequence 1 and roots alternate
        // slots: from 2 on, the other slot was written, so empty means erased.
        let erased = *seq >= 2 && matches!(other, Slot::Empty | Slot::Foreign);
        if unusable(other) || erased {
            *self.watch.fell_back.lock() = Some(format!(
                "the other copy of the metadata root record is unusable ({}{}); \
                 the remaining copy (version {seq}) was used",
                other.describe(),
                if erased { ", zeroed?" } else { "" }
            ));
        }
        let rec = Root::decode(payload)
            .map_err(|why| eio(format!("metadata root record (version {seq}): {why}")))?;
        Ok((rec, *seq, slot))
    }

    /// Take a versioned root: read every table sector it names.
    pub(super) fn load_versioned(&self, st: &mut State, root: Root) -> io::Result<()> {
        let l = self.layout;
        if root.len > l.data * SECTOR as u64 {
            return Err(eio(format!(
                "recorded length {} exceeds the region",
                root.len
            )));
        }
        if root.tables.len() as u64 > l.tables {
            return Err(eio(format!(
                "the root names {} table sectors; the region has room for {}",
                root.tables.len(),
                l.tables
            )));
        }
        st.expected = vec![Ver::NONE; l.data as usize];
        st.tables = vec![Ver::NONE; l.tables as usize];
        st.tables[..root.tables.len()].copy_from_slice(&root.tables);
        let want: Vec<(u64, Ver)> = (0..root.tables.len() as u64)
            .map(|t| (TABLE_BASE + t, st.tables[t as usize]))
            .filter(|(_, v)| !v.is_none())
            .collect();
        let got = self.read_versions(&want)?;
        for ((s, _), payload) in want.iter().zip(got) {
            let t = s - TABLE_BASE;
            for i in 0..PER_TABLE {
                let v = Ver(le64(&payload, 8 * i as usize));
                let sector = t * PER_TABLE + i;
                if v.is_none() {
                    continue;
                }
                if sector >= l.data || !v.plausible(root.limit) {
                    return Err(eio(format!(
                        "metadata version table sector {t}: impossible entry for sector {sector}"
                    )));
                }
                st.expected[sector as usize] = v;
            }
        }
        st.format = Format::Versioned;
        st.len = root.len;
        st.high = root.len;
        st.next_seq = root.limit;
        st.root = root;
        Ok(())
    }

    /// Take a legacy root. Read-only: read as before. Read-write: learn the
    /// version of every sector now, to write them as tables at the first
    /// write-out.
    pub(super) fn load_legacy(&self, st: &mut State, len: u64, high: u64) -> io::Result<()> {
        st.len = len;
        st.high = high.max(len);
        if self.read_only {
            st.format = Format::LegacyReadOnly;
            if len > self.max_len(st) {
                return Err(eio(format!("recorded length {len} exceeds the region")));
            }
            return Ok(());
        }
        let max = self.layout.data * SECTOR as u64;
        if len > max {
            return Err(eio(format!(
                "this legacy store ({len} bytes) exceeds the versioned format's \
                 maximum of {max} bytes; open it read-only"
            )));
        }
        st.format = Format::LegacyUpgrade;
        st.expected = vec![Ver::NONE; self.layout.data as usize];
        st.tables = vec![Ver::NONE; self.layout.tables as usize];
        // Sectors from `len` on read as zeros from now on (version none).
        st.high = len;
        let sectors = len.div_ceil(SECTOR as u64);
        let mut max_seq = st.root_seq;
        let mut first = 0;
        while first < sectors {
            let batch: Vec<u64> = (first..sectors.min(first + LEGACY_BATCH)).collect();
            let found = self.legacy_load(&batch, &mut max_seq).map_err(|e| {
                eio(format!(
                    "reading the legacy store to upgrade it: {e}; open it read-only"
                ))
            })?;
            for (s, found) in batch.iter().zip(found) {
                if let Some((v, _)) = found {
                    st.expected[*s as usize] = v;
                }
            }
            first += LEGACY_BATCH;
        }
        // Table pairs written by an upgrade that did not complete.
        let tables: Vec<u64> = (0..self.layout.tables).map(|t| TABLE_BASE + t).collect();
        let reqs: Vec<(u64, u64)> = tables.iter().flat_map(|&s| [(s, 0), (s, 1)]).collect();
        for x in self.read_slots(&reqs) {
            max_seq = max_seq.max(x.seq().unwrap_or(0));
        }
        if max_seq > MAX_SEQ {
            return Err(eio(format!(
                "a legacy slot claims sequence number {max_seq}"
            )));
        }
        st.next_seq = max_seq + LEGACY_SEQ_GAP;
        st.root = Root {
            len,
            limit: 0,
            tables: Vec::new(),
        };
        Ok(())
    }

    /// The legacy rule: read both slots of each sector, take the valid one
    /// with the higher sequence (a damaged or EIO slot counts as absent).
    /// None: never written. Raises `max_seq` to every sequence seen.
    pub(super) fn legacy_load(
        &self,
        sectors: &[u64],
        max_seq: &mut u64,
    ) -> io::Result<Vec<Option<Versioned>>> {
        let reqs: Vec<(u64, u64)> = sectors.iter().flat_map(|&s| [(s, 0), (s, 1)]).collect();
        let mut got = self.read_slots(&reqs).into_iter();
        let mut out = Vec::with_capacity(sectors.len());
        for &s in sectors {
            let pair = [
                got.next().unwrap_or(Slot::Damaged),
                got.next().unwrap_or(Slot::Damaged),
            ];
            let mut best: Option<(u64, u64, Box<[u8]>)> = None;
            let mut bad = 0;
            for (k, x) in pair.into_iter().enumerate() {
                *max_seq = (*max_seq).max(x.seq().unwrap_or(0));
                match x {
                    Slot::Valid(q, p) if best.as_ref().is_none_or(|(b, ..)| q > *b) => {
                        best = Some((q, k as u64, p))
                    }
                    Slot::Failed(e) if e != Errno::EIO => {
                        return Err(eio(format!("reading sector {s}: {e}")))
                    }
                    Slot::Damaged | Slot::Failed(_) => bad += 1,
                    _ => {}
                }
            }
            if bad == 2 {
                return Err(eio(format!("sector {s}: both copies damaged")));
            }
            out.push(best.map(|(q, k, p)| (Ver::new(q.min(MAX_SEQ), k), p)));
        }
        Ok(out)
    }
}
