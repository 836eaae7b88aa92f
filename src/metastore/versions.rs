//! The version table in memory: the current version of every sector, the
//! slot a new version goes to, and the undo log of a failed write-out.

use super::ondisk::{Ver, PER_TABLE, TABLE_BASE};
use super::{MetaStore, State};
use std::collections::BTreeSet;

/// Undo log of the version changes of a write-out that failed.
#[derive(Default)]
pub(super) struct Undo {
    pub(super) versions: Vec<(u64, Ver)>,
    /// Sectors this write-out added to `unflushed`.
    pub(super) unflushed: Vec<u64>,
    pub(super) dirty_tables: BTreeSet<u64>,
}

impl MetaStore {
    pub(super) fn version(st: &State, s: u64) -> Ver {
        let at = if s >= TABLE_BASE {
            st.tables.get((s - TABLE_BASE) as usize)
        } else {
            st.expected.get(s as usize)
        };
        at.copied().unwrap_or(Ver::NONE)
    }

    /// Slot a new version of `s` goes to: not the one the durable root names.
    pub(super) fn target(st: &State, s: u64) -> u64 {
        let committed = st
            .unflushed
            .get(&s)
            .copied()
            .unwrap_or_else(|| Self::version(st, s));
        if committed.is_none() {
            0
        } else {
            1 - committed.slot()
        }
    }

    pub(super) fn take_seq(st: &mut State) -> u64 {
        st.next_seq += 1;
        st.next_seq - 1
    }

    /// Make `new` the current version of `s`, logging the change in `undo`.
    pub(super) fn change(st: &mut State, s: u64, new: Ver, undo: &mut Undo) {
        let old = Self::version(st, s);
        if old == new {
            return;
        }
        if let std::collections::hash_map::Entry::Vacant(e) = st.unflushed.entry(s) {
            e.insert(old);
            undo.unflushed.push(s);
        }
        undo.versions.push((s, old));
        Self::set_version(st, s, new);
        if s < TABLE_BASE {
            st.dirty_tables.insert(s / PER_TABLE);
        }
    }

    fn set_version(st: &mut State, s: u64, v: Ver) {
        let at = if s >= TABLE_BASE {
            st.tables.get_mut((s - TABLE_BASE) as usize)
        } else {
            st.expected.get_mut(s as usize)
        };
        if let Some(x) = at {
            *x = v;
        }
    }

    pub(super) fn rollback(st: &mut State, undo: Undo) {
        for (s, old) in undo.versions.into_iter().rev() {
            Self::set_version(st, s, old);
        }
        for s in undo.unflushed {
            st.unflushed.remove(&s);
        }
        st.dirty_tables = undo.dirty_tables;
    }
}
