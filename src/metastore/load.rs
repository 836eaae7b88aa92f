//! Opening a store: the root record, then the version tables it names
//! (versioned format) or every sector's pair (legacy format).

use super::ondisk::{
    le64, Root, RootRec, Slot, Ver, Versioned, MAX_SEQ, PER_TABLE, ROOT_SECTOR, SECTOR, TABLE_BASE,
};
use super::{eio, Format, MetaStore, State, LEGACY_BATCH, LEGACY_SEQ_GAP};
use stackfs_layers::{Errno, ExtentTag};
use std::io;

/// Both root slots as one copy holds them: the copy, and slots 0 and 1.
type RootPair = (usize, [Slot; 2]);

fn unusable(x: &Slot) -> bool {
    matches!(x, Slot::Damaged | Slot::Failed(_) | Slot::Moved(..))
}

impl MetaStore {
    /// Read both root slots (from every copy, when the stack keeps several);
    /// take the valid one with the highest sequence. Returns the record, its
    /// sequence and slot; notes a fallback.
    pub(super) fn read_root(&self) -> io::Result<(RootRec, u64, u64)> {
        let pairs = self.root_pairs()?;
        let Some((seq, slot, payload, other)) = newest_root(&pairs) else {
            return Err(no_root(&pairs));
        };
        if seq > MAX_SEQ {
            return Err(eio(format!("metadata root record claims version {seq}")));
        }
        // The first root ever written has sequence 1 and roots alternate
        // slots: from 2 on, the other slot was written, so empty means erased.
        let erased = seq >= 2 && matches!(other, Slot::Empty | Slot::Foreign);
        if unusable(other) || erased {
            *self.watch.fell_back.lock() = Some(format!(
                "the other slot of the metadata root record is unusable ({}{}); \
                 the remaining slot (version {seq}) was used",
                other.describe(),
                if erased { ", zeroed?" } else { "" }
            ));
        }
        for (copy, pair) in &pairs {
            if !matches!(&pair[slot as usize], Slot::Valid(q, _) if *q == seq) {
                log::warn!(
                    "metadata root record: copy {copy} holds {} where another holds \
                     version {seq}, which was taken (a copy that missed commits; \
                     the next commit rewrites the root on every copy)",
                    pair[slot as usize].describe()
                );
            }
        }
        let rec = Root::decode(payload)
            .map_err(|why| eio(format!("metadata root record (version {seq}): {why}")))?;
        Ok((rec, seq, slot))
    }

    /// Both root slots of every copy (one copy, read as any slot, without a
    /// mirror; with one, each copy alone, healing nothing: the next commit
    /// rewrites the root on every copy). A copy that does not answer (EIO)
    /// holds failed slots; another errno, after one retry, is an error.
    fn root_pairs(&self) -> io::Result<Vec<RootPair>> {
        let mirrored = self.copies > 1;
        let tags: Vec<ExtentTag> = match mirrored {
            true => (0..self.copies).map(|c| self.only_copy(c)).collect(),
            false => vec![ExtentTag::default()],
        };
        let reqs: Vec<(u64, u64, ExtentTag)> = tags
            .iter()
            .flat_map(|&t| [(ROOT_SECTOR, 0, t), (ROOT_SECTOR, 1, t)])
            .collect();
        let got = self.read_tagged(&reqs);
        let mut slots = Vec::with_capacity(reqs.len());
        for (req, (first, served)) in reqs.iter().zip(got) {
            let mut x = match first {
                Slot::Failed(e) if e != Errno::EIO => self
                    .read_tagged(std::slice::from_ref(req))
                    .pop()
                    .map_or(Slot::Failed(e), |(again, _)| again),
                other => other,
            };
            if !mirrored {
                x = self.from_other_copies(req.0, req.1, x, served);
            }
            if let Slot::Failed(e) = &x {
                if *e != Errno::EIO {
                    return Err(eio(format!("reading the root record: {e}")));
                }
            }
            slots.push(x);
        }
        let mut slots = slots.into_iter();
        let mut pairs = Vec::with_capacity(tags.len());
        for copy in 0..tags.len() {
            let a = slots.next().unwrap_or(Slot::Damaged);
            let b = slots.next().unwrap_or(Slot::Damaged);
            pairs.push((copy, [a, b]));
        }
        Ok(pairs)
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

/// The valid root with the highest sequence over every copy and slot (the
/// lowest copy, then slot 0, on a tie): sequence, slot, payload, and the
/// other slot of its pair as the copies holding that root have it (the
/// most usable of them: a copy whose other slot is damaged while another's
/// holds the previous root is not a fallback).
fn newest_root(pairs: &[RootPair]) -> Option<(u64, u64, &[u8], &Slot)> {
    let mut best: Option<(u64, usize, &[u8])> = None;
    for (_, pair) in pairs {
        for (k, x) in pair.iter().enumerate() {
            if let Slot::Valid(q, p) = x {
                if best.is_none_or(|(b, ..)| *q > b) {
                    best = Some((*q, k, p));
                }
            }
        }
    }
    let (seq, k, payload) = best?;
    let rank = |x: &Slot| match x {
        Slot::Valid(..) => 2,
        Slot::Empty | Slot::Foreign => 1,
        _ => 0,
    };
    let other = pairs
        .iter()
        .filter(|(_, pair)| matches!(&pair[k], Slot::Valid(q, _) if *q == seq))
        .map(|(_, pair)| &pair[1 - k])
        .reduce(|a, b| if rank(b) > rank(a) { b } else { a })?;
    Some((seq, k as u64, payload, other))
}

/// The error when no copy holds a valid root: none was ever written (every
/// slot empty or another pool's), or what each copy holds.
fn no_root(pairs: &[RootPair]) -> io::Error {
    if pairs
        .iter()
        .all(|(_, p)| !unusable(&p[0]) && !unusable(&p[1]))
    {
        return eio(
            "metadata store has no root record: the metadata region was erased or overwritten",
        );
    }
    let found = |p: &[Slot; 2]| format!("{} and {}", p[0].describe(), p[1].describe());
    let what = match pairs {
        [(_, p)] => format!("found {}", found(p)),
        _ => pairs
            .iter()
            .map(|(c, p)| format!("copy {c}: found {}", found(p)))
            .collect::<Vec<_>>()
            .join("; "),
    };
    eio(format!("metadata root record: no usable copy ({what})"))
}
