//! The metadata store's live slots walked on one mirror copy, for scrub,
//! resync and device replacement (see `metastore/walk.rs`): while the
//! filesystem runs, with redb owning the store.

use super::*;

impl Fs {
    /// Copies the stack keeps of every byte (`mirror=N`: N; else 1).
    pub fn copies(&self) -> usize {
        self.stack.copies()
    }

    /// Walk every live slot of the metadata store on copy `mode.copy()`:
    /// check it (and have the mirror rewrite what is wrong from another
    /// copy) or rebuild it from the others. `progress` gets the bytes of
    /// each batch done. Refused when a member holding that copy is faulted
    /// (the mirror neither reads nor writes it), and a rebuild when the
    /// filesystem may not write (read-only, or failed); a check then only
    /// counts (its bad slots unrepaired). Without a mirror a check only
    /// counts.
    pub fn walk_metadata(
        &self,
        mode: CopyWalk,
        progress: &dyn Fn(u64),
    ) -> Result<WalkCounts, FsError> {
        let copy = mode.copy();
        let copies = self.copies();
        if copy >= copies {
            return Err(FsError::Other(format!(
                "no copy {copy}: the pool keeps {copies} cop{}",
                if copies == 1 { "y" } else { "ies" }
            )));
        }
        let writable = !self.read_only && self.writable().is_ok();
        if let (CopyWalk::Rebuild { .. }, false) = (mode, writable) {
            return Err(FsError::io(
                format!("rebuilding copy {copy} of the metadata"),
                if self.read_only {
                    Errno::EROFS
                } else {
                    self.writable().err().unwrap_or(Errno::EROFS)
                },
            ));
        }
        self.copy_answers(copy)?;
        let handle = self.meta_copies.lock().clone();
        let counts = handle
            .walk(mode, writable, progress)
            .map_err(|e| FsError::Other(format!("walking copy {copy} of the metadata: {e}")))?;
        // A repair write that failed faulted the member: its copy is not
        // what was counted.
        self.copy_answers(copy)?;
        if !Arc::ptr_eq(&handle, &self.meta_copies.lock()) {
            return Err(FsError::Other(format!(
                "walking copy {copy} of the metadata: the store was opened again \
                 meanwhile (it was full); walk it again"
            )));
        }
        Ok(counts)
    }

    /// An error if a member holding copy `copy` (in any mirror group) is
    /// faulted.
    fn copy_answers(&self, copy: usize) -> Result<(), FsError> {
        let health = &self.stack.health;
        let members = health.members();
        for group in health.groups() {
            let Some(&m) = group.get(copy) else { continue };
            if health.is_faulted(m) {
                let member = members.get(m);
                return Err(FsError::io(
                    format!(
                        "copy {copy} of the metadata: member {m} ({}) is faulted ({})",
                        member.map_or("?", |x| x.name.as_str()),
                        member
                            .and_then(|x| x.faulted.as_deref())
                            .unwrap_or("no reason recorded")
                    ),
                    Errno::EIO,
                ));
            }
        }
        Ok(())
    }
}
