//! The filesystem core's own tests: `Fs` over `mem` and `fault` stacks, with
//! no FUSE, no devices and no root. A "crash" is the fault layer's power
//! cut (later writes acknowledged and dropped) followed by a fresh `Fs` over
//! the same memory.

mod crash;
mod errors;
mod group;
mod meta_copies;
mod mirror;
mod race;
mod resync;
mod space;
mod walk;

use super::*;
use stackfs_layers::bay::Bay;
use stackfs_layers::compress::Codec;
use stackfs_layers::compress::Compress;
use stackfs_layers::crypt::Crypt;
use stackfs_layers::mirror::Mirror;
use stackfs_layers::watchdog::{Health, Watchdog};
use stackfs_layers::{Counted, Fault, FaultAction, FaultControl, FaultRule, Keyring, Mem};
use std::sync::atomic::{AtomicU8, Ordering};

/// Which layers sit over the memory device.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(super) enum Layers {
    /// The fault layer only: the core's own behaviour, fastest.
    Plain,
    /// compress=zstd:1, crypt over the fault layer: the default stack, with
    /// the MAC and the compression the extent records carry.
    Default,
}

/// A pool in memory, which outlives the filesystems opened over it.
pub(super) struct Rig {
    pub mem: Arc<Mem>,
    /// More copies of `mem` under a mirror (none: no mirror).
    pub copies: Vec<Arc<Mem>>,
    pub ctl: Arc<FaultControl>,
    pub meta_len: u64,
    layers: Layers,
    keys: Arc<Keyring>,
    /// A watchdog over the fault layer fails requests older than this.
    pub timeout: Option<Duration>,
    /// Each open writes under a new key id, as each mount does.
    opens: AtomicU8,
    /// The fault layer of the last stack built (it holds hung requests).
    fault: parking_lot::Mutex<Option<Arc<Fault>>>,
}

pub(super) const ME: Caller = Caller { uid: 0, gid: 0 };

impl Rig {
    /// A formatted pool of `capacity` bytes, `meta_len` of them metadata.
    pub fn new(layers: Layers, capacity: u64, meta_len: u64) -> Rig {
        let _ = env_logger::builder().is_test(true).try_init();
        let rig = Rig {
            mem: Arc::new(Mem::new(capacity)),
            copies: Vec::new(),
            ctl: FaultControl::new(),
            meta_len,
            layers,
            keys: Arc::new(Keyring::new(&[7; 32])),
            timeout: None,
            opens: AtomicU8::new(1),
            fault: parking_lot::Mutex::new(None),
        };
        Fs::format(&rig.stack(), rig.geometry()).expect("format");
        rig
    }

    /// A pool of two copies under a `mirror` layer.
    pub fn mirrored(layers: Layers, capacity: u64, meta_len: u64) -> Rig {
        let mut rig = Rig::new(layers, capacity, meta_len);
        // Formatted again over the mirror, both copies alike.
        rig.copies = vec![Arc::new(Mem::new(capacity))];
        rig.mem = Arc::new(Mem::new(capacity));
        Fs::format(&rig.stack(), rig.geometry()).expect("format");
        rig
    }

    pub fn small() -> Rig {
        Rig::new(Layers::Plain, 64 << 20, 8 << 20)
    }

    fn geometry(&self) -> Geometry {
        Geometry {
            meta_len: self.meta_len,
            pool_uuid: [9; 16],
        }
    }

    pub fn stack(&self) -> Stack {
        let mems: Vec<Arc<Mem>> = std::iter::once(self.mem.clone())
            .chain(self.copies.iter().cloned())
            .collect();
        let health = Health::new((0..mems.len()).map(|i| format!("mem{i}")).collect());
        let mut members = Vec::new();
        let mirrored = mems.len() > 1;
        let mut bays = Vec::new();
        for (i, mem) in mems.into_iter().enumerate() {
            let cap = mem.capacity();
            let mut device: Arc<dyn Layer> = mem;
            if mirrored {
                let bay = Bay::new(Some(device), cap, format!("mem{i}"));
                bays.push(bay.clone());
                device = bay;
            }
            let fault = Fault::new(device, self.ctl.clone(), Some(i));
            if i == 0 {
                *self.fault.lock() = Some(fault.clone());
            }
            let mut member: Arc<dyn Layer> = Counted::wrap(fault);
            if let Some(t) = self.timeout {
                member = Counted::wrap(Watchdog::new(member, t, i, health.clone()));
            }
            members.push(member);
        }
        let bottom: Arc<dyn Layer> = if members.len() > 1 {
            health.set_groups(vec![(0..members.len()).collect()]);
            let count = members.len();
            let mirror =
                Mirror::new(members, (0..count).collect(), health.clone()).expect("mirror");
            Counted::wrap(mirror)
        } else {
            members.pop().expect("one member")
        };
        let (top, meta) = match self.layers {
            Layers::Plain => (bottom.clone(), bottom),
            Layers::Default => {
                let id = [self.opens.fetch_add(1, Ordering::Relaxed); 12];
                let crypt =
                    Counted::wrap(Arc::new(Crypt::new(bottom, self.keys.clone(), Some(id))));
                let top = Counted::wrap(Arc::new(Compress::new(crypt.clone(), Codec::Zstd(1))));
                (top, crypt)
            }
        };
        Stack {
            top,
            meta,
            fault: Some(self.ctl.clone()),
            health,
            bays,
        }
    }

    /// A filesystem over the pool as it is now (power back on).
    pub fn open(&self) -> Fs {
        self.ctl.clear();
        match Fs::open_on(self.stack(), self.geometry(), FsOptions::default()) {
            Ok(fs) => fs,
            Err(e) => panic!("opening the filesystem: {e}"),
        }
    }

    /// Cut the power, drop the filesystem without its unmount, and open
    /// what the pool holds.
    pub fn crash(&self, fs: Fs) -> Fs {
        self.ctl.cut_power();
        drop(fs);
        self.open()
    }

    /// Fail every request of `op` within `range` with `errno`.
    pub fn fail(&self, op: Option<Op>, range: Option<(u64, u64)>, errno: Errno) {
        let mut rule = FaultRule::new(op, FaultAction::Error(errno));
        rule.range = range;
        self.ctl.add_rule(rule);
    }

    /// Let hung requests go on, and stop hanging new ones.
    pub fn release(&self) {
        self.ctl.clear();
        if let Some(f) = &*self.fault.lock() {
            f.release_hung();
        }
    }

    /// The metadata region, for rules that hit only metadata.
    pub fn meta_range(&self) -> Option<(u64, u64)> {
        Some((0, self.meta_len))
    }

    /// Everything after the metadata region.
    pub fn data_range(&self) -> Option<(u64, u64)> {
        Some((self.meta_len, u64::MAX))
    }
}

/// Bytes that are never zero, different for every (seed, offset).
pub(super) fn pattern(seed: u8, off: u64, len: usize) -> Vec<u8> {
    (0..len as u64)
        .map(|i| {
            let x = (off + i)
                .wrapping_mul(2654435761)
                .rotate_left(seed as u32 % 31)
                ^ seed as u64;
            (x % 251) as u8 + 1
        })
        .collect()
}

pub(super) fn create(fs: &Fs, parent: u64, name: &str) -> u64 {
    fs.mknod(
        ME,
        parent,
        name.as_bytes(),
        libc::S_IFREG | 0o644,
        0,
        0,
        None,
    )
    .unwrap_or_else(|e| panic!("create {name}: {e}"))
    .ino
}

pub(super) fn write_all(fs: &Fs, ino: u64, off: u64, data: &[u8]) {
    // Writes arrive from the kernel in pieces of at most 1 MiB.
    for (i, chunk) in data.chunks(1 << 20).enumerate() {
        let at = off + (i << 20) as u64;
        let n = fs
            .write(ino, at, chunk)
            .unwrap_or_else(|e| panic!("write at {at}: {e}"));
        assert_eq!(n as usize, chunk.len());
    }
}

pub(super) fn read_all(fs: &Fs, ino: u64) -> Vec<u8> {
    let size = fs.getattr(ino).expect("getattr").size;
    let mut out = Vec::new();
    while (out.len() as u64) < size {
        let got = fs
            .read(ino, out.len() as u64, 1 << 20)
            .unwrap_or_else(|e| panic!("read at {}: {e}", out.len()));
        assert!(!got.is_empty(), "short read at {}", out.len());
        out.extend(got);
    }
    out
}

pub(super) fn lookup(fs: &Fs, parent: u64, name: &str) -> Option<Inode> {
    match fs.lookup(parent, name.as_bytes()) {
        Ok(i) => Some(i),
        Err(e) if e.0 == libc::ENOENT => None,
        Err(e) => panic!("lookup {name}: {e}"),
    }
}

/// Two byte strings are equal; if not, say where they first differ (not
/// the whole of both).
#[track_caller]
pub(super) fn same(got: &[u8], want: &[u8]) {
    if got != want {
        let at = got.iter().zip(want).position(|(a, b)| a != b);
        panic!(
            "{} bytes read, {} expected; first difference at {:?}",
            got.len(),
            want.len(),
            at
        );
    }
}
