//! The errors of opening and checking a filesystem, typed so that callers
//! (fsck's exit code, the mount command) act on what went wrong, never on
//! the words of a message.

use stackfs_layers::Errno;

#[derive(Debug, thiserror::Error)]
pub enum FsError {
    /// The pool itself could not be opened: devices, key, lock, superblocks.
    #[error("{0}")]
    Pool(String),
    /// The metadata store or the extent map is damaged: fsck's business.
    #[error("{0}")]
    Damaged(String),
    /// An operation failed with an errno (an I/O error, a full pool).
    #[error("{what}: {errno}")]
    Io { what: String, errno: Errno },
    /// Anything else (bad arguments to a tool, an unknown request).
    #[error("{0}")]
    Other(String),
}

impl FsError {
    pub fn damaged(what: impl std::fmt::Display) -> FsError {
        FsError::Damaged(what.to_string())
    }

    pub fn io(what: impl Into<String>, errno: Errno) -> FsError {
        FsError::Io {
            what: what.into(),
            errno,
        }
    }

    /// Damage to what is stored (as opposed to a device or usage problem).
    pub fn is_damage(&self) -> bool {
        matches!(self, FsError::Damaged(_))
    }
}

impl From<crate::pool::PoolError> for FsError {
    fn from(e: crate::pool::PoolError) -> FsError {
        FsError::Pool(e.to_string())
    }
}
