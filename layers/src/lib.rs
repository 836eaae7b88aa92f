//! stackfs-layers: the I/O model of stackfs and its layers.
//!
//! A `Buf` is shared page-aligned memory plus a window; an `Io` is one request
//! that knows its children and completes once, upward, after all of them; a
//! `Layer` receives requests and hands children to the layers below. The
//! layers: `compress` (lz4, zstd), `crypt` (AES-256-GCM), `device` (io_uring),
//! `stripe` (RAID-0), `mirror` (RAID-1, self-healing reads), `fault` (for tests), and `mem` (in memory, for tests
//! and benchmarks).

pub mod bay;
pub mod buf;
pub mod compress;
pub mod crypt;
pub mod device;
pub mod errno;
pub mod fault;
pub mod health;
pub mod io;
pub mod layer;
pub mod map;
pub mod mem;
pub mod mirror;
pub mod spec;
pub mod stripe;
pub mod watchdog;

pub use buf::{Buf, BufPool, PAGE};
pub use crypt::{KeyId, Keyring};
pub use device::Device;
pub use errno::Errno;
pub use fault::{Fault, FaultAction, FaultControl, FaultRule};
pub use io::{EndIo, ExtentTag, Io, IoResult, Op, Waiter};
pub use layer::footprint;
pub use layer::{submit_wait, submit_wait_tag, Counted, Layer, Repairs, Stats, StatsSnapshot};
pub use map::{Map, Mapping};
pub use mem::Mem;
pub use mirror::Mirror;
pub use spec::{parse_size, CryptKeys, LayerSpec, Stack, StackSpec};
pub use stripe::Stripe;
