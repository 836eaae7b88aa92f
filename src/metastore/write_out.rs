//! Write-out: new versions for buffered sectors and changed table sectors,
//! the two-phase commit (sectors and tables, flush; root, flush), the
//! sequence-number reservation and a legacy store's upgrade.

use super::ondisk::{Root, Ver, PER_TABLE, ROOT_SECTOR, SECTOR, TABLE_BASE};
use super::versions::Undo;
use super::{Format, MetaStore, State, SEQ_BLOCK};
use stackfs_layers::{Io, Waiter};
use std::collections::BTreeMap;
use std::io;

impl MetaStore {
    /// New versions for buffered sectors (an all-zero sector becomes version
    /// none and needs no write); the writes to send.
    fn plan_data(
        &self,
        st: &mut State,
        data: &BTreeMap<u64, Option<Box<[u8]>>>,
        undo: &mut Undo,
    ) -> Vec<(Io, Waiter)> {
        let mut writes = Vec::with_capacity(data.len());
        for (&s, payload) in data {
            match payload.as_deref().filter(|p| p.iter().any(|b| *b != 0)) {
                None => Self::change(st, s, Ver::NONE, undo),
                Some(p) => {
                    let v = Ver::new(Self::take_seq(st), Self::target(st, s));
                    Self::change(st, s, v, undo);
                    writes.push(self.seal_write(s, v, p));
                }
            }
        }
        writes
    }

    /// New versions for the table sectors whose entries changed; the writes.
    fn plan_tables(&self, st: &mut State, undo: &mut Undo) -> Vec<(Io, Waiter)> {
        let mut writes = Vec::new();
        for t in std::mem::take(&mut st.dirty_tables) {
            let s = TABLE_BASE + t;
            let mut p = vec![0u8; SECTOR];
            for i in 0..PER_TABLE {
                let v = Self::version(st, t * PER_TABLE + i);
                p[8 * i as usize..8 * i as usize + 8].copy_from_slice(&v.0.to_le_bytes());
            }
            if p.iter().all(|b| *b == 0) {
                Self::change(st, s, Ver::NONE, undo);
            } else {
                let v = Ver::new(Self::take_seq(st), Self::target(st, s));
                Self::change(st, s, v, undo);
                writes.push(self.seal_write(s, v, &p));
            }
        }
        writes
    }

    /// The root naming the current table versions (up to the last in use).
    fn current_root(st: &State) -> Root {
        let used = st
            .tables
            .iter()
            .rposition(|v| !v.is_none())
            .map_or(0, |i| i + 1);
        Root {
            len: st.len,
            limit: st.next_seq + SEQ_BLOCK,
            tables: st.tables[..used].to_vec(),
        }
    }

    /// Write `root` to the root slot not holding the durable one, then flush.
    /// With `settles` (the root describes every current version), nothing is
    /// unflushed any more once it is durable; if it fails, it is pending.
    fn write_root(&self, st: &mut State, root: Root, settles: bool) -> io::Result<()> {
        let (seq, slot) = (st.root_seq + 1, 1 - st.root_slot);
        let w = self.seal_write(ROOT_SECTOR, Ver::new(seq, slot), &root.encode());
        match self.submit_all(vec![w], true) {
            Ok(()) => {
                st.root = root;
                st.root_seq = seq;
                st.root_slot = slot;
                if settles {
                    st.unflushed.clear();
                    st.pending_root = None;
                }
                Ok(())
            }
            Err(e) => {
                if settles {
                    st.pending_root = Some(root);
                }
                Err(e)
            }
        }
    }

    /// Make sure `need` more sequence numbers are below the durable root's
    /// limit: a number stamped on disk must never be handed out again after
    /// a crash. Raising the limit rewrites the durable root as it is.
    fn reserve(&self, st: &mut State, need: u64) -> io::Result<()> {
        if st.next_seq + need <= st.root.limit {
            return Ok(());
        }
        let root = Root {
            limit: st.next_seq + need + SEQ_BLOCK,
            ..st.root.clone()
        };
        self.write_root(st, root, false)
    }

    /// A legacy store's first write-out: write every table sector from the
    /// versions read at open, flush, then a versioned root, flush.
    fn upgrade(&self, st: &mut State) -> io::Result<()> {
        let mut undo = Undo::default();
        let used = st
            .expected
            .iter()
            .rposition(|v| !v.is_none())
            .map_or(0, |i| i as u64 + 1);
        st.dirty_tables = (0..used.div_ceil(PER_TABLE)).collect();
        let writes = self.plan_tables(st, &mut undo);
        let count = writes.len();
        if let Err(e) = self.submit_all(writes, true) {
            Self::rollback(st, undo);
            return Err(e);
        }
        st.format = Format::Versioned;
        log::info!("metadata store: upgrading to the versioned format ({count} table sectors)");
        let root = Root {
            len: st.root.len,
            ..Self::current_root(st)
        };
        self.write_root(st, root, true)
    }

    /// Whether the durable root describes the current state exactly.
    fn settled(st: &State) -> bool {
        st.dirty.is_empty()
            && st.dirty_tables.is_empty()
            && st.unflushed.is_empty()
            && st.pending_root.is_none()
            && st.len == st.root.len
    }

    /// Send buffered sectors down. With `durable`, a commit: the sectors and
    /// the changed table sectors, a flush, then the root, a flush.
    pub(super) fn write_out(&self, st: &mut State, durable: bool) -> io::Result<()> {
        if st.format == Format::LegacyUpgrade {
            self.upgrade(st)?;
        }
        if let Some(root) = st.pending_root.clone() {
            self.write_root(st, root, true)?;
        }
        if st.dirty.is_empty() && (!durable || Self::settled(st)) {
            return Ok(());
        }
        let tables = if durable { st.tables.len() as u64 } else { 0 };
        self.reserve(st, st.dirty.len() as u64 + tables)?;
        let data = std::mem::take(&mut st.dirty);
        let mut undo = Undo {
            dirty_tables: st.dirty_tables.clone(),
            ..Undo::default()
        };
        let mut writes = self.plan_data(st, &data, &mut undo);
        if durable {
            writes.extend(self.plan_tables(st, &mut undo));
        }
        if let Err(e) = self.submit_all(writes, durable) {
            // Keep the data buffered so nothing is lost; the caller sees the error.
            Self::rollback(st, undo);
            st.dirty = data;
            return Err(e);
        }
        if durable {
            let root = Self::current_root(st);
            self.write_root(st, root, true)?;
        }
        Ok(())
    }
}
