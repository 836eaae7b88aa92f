//! stackfs: a pooled, layered filesystem in user space.

pub mod alloc;
pub mod atime;
pub mod audit;
pub mod codec;
pub mod error;
pub mod fs;
pub mod fsck;
pub mod fuse;
pub mod keys;
pub mod lock;
pub mod metastore;
pub mod pool;
pub mod rebuild;
pub mod superblock;
