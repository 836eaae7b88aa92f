//! The store's on-disk records: where the slot pairs are, what a slot
//! stamps after its payload, how a version is encoded, and the root record.
//! `ARCHITECTURE.md` gives every byte.

use stackfs_layers::Errno;

/// The store's unit: redb sees bytes, each 4 KiB sector is written atomically.
pub const SECTOR: usize = 4096;
pub(super) const SLOT: u64 = 8192;
pub(super) const PAIR: u64 = 2 * SLOT;
/// What a slot stamps after the payload: sequence (8), sector (8), pool
/// UUID (16), CRC32C (4).
pub(super) const STAMP: usize = 36;
/// The root record's sector number (pair 0).
pub(super) const ROOT_SECTOR: u64 = u64::MAX;
/// Version table sector `t` is logical sector `TABLE_BASE + t`.
pub(super) const TABLE_BASE: u64 = u64::MAX / 2;
/// Versions one table sector holds (u64 LE each).
pub(super) const PER_TABLE: u64 = (SECTOR / 8) as u64;
/// First bytes of a root record in this format; a legacy root starts with
/// the store's length instead.
pub(super) const ROOT_TAG: [u8; 8] = *b"sfsmeta2";
/// Root record: tag, length, sequence limit, table count, then the versions.
pub(super) const ROOT_HEADER: usize = 32;
/// Table sectors the root can name: this caps the store at
/// `MAX_TABLES × 512` sectors (1016 MiB).
pub(super) const MAX_TABLES: usize = (SECTOR - ROOT_HEADER) / 8;
/// Sequence numbers stay below this (a root claiming more is refused), so
/// that no arithmetic on them can overflow.
pub(super) const MAX_SEQ: u64 = 1 << 62;

/// A version of a sector: sequence number and slot (0 = never written,
/// reads as zeros). The same encoding is stored in the tables and the root.
#[derive(Clone, Copy, Default, PartialEq, Eq, Debug)]
pub(super) struct Ver(pub(super) u64);

impl Ver {
    pub(super) const NONE: Ver = Ver(0);

    pub(super) fn new(seq: u64, slot: u64) -> Ver {
        Ver(seq << 1 | (slot & 1))
    }
    pub(super) fn seq(self) -> u64 {
        self.0 >> 1
    }
    pub(super) fn slot(self) -> u64 {
        self.0 & 1
    }
    pub(super) fn is_none(self) -> bool {
        self.0 == 0
    }
    /// A version read from disk that we could have written.
    pub(super) fn plausible(self, limit: u64) -> bool {
        self.is_none() || (self.seq() >= 1 && self.seq() < limit)
    }
}

/// The root record of the versioned format.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(super) struct Root {
    pub(super) len: u64,
    /// Every sequence number ever stamped on a slot of this store is below it.
    pub(super) limit: u64,
    /// Versions of the table sectors in use.
    pub(super) tables: Vec<Ver>,
}

/// A root record as found on disk.
pub(super) enum RootRec {
    Versioned(Root),
    /// Written by the code before version tables: length, highest length.
    Legacy {
        len: u64,
        high: u64,
    },
}

pub(super) fn le64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

impl Root {
    pub(super) fn encode(&self) -> Box<[u8]> {
        let mut p = vec![0u8; SECTOR].into_boxed_slice();
        p[0..8].copy_from_slice(&ROOT_TAG);
        p[8..16].copy_from_slice(&self.len.to_le_bytes());
        p[16..24].copy_from_slice(&self.limit.to_le_bytes());
        p[24..32].copy_from_slice(&(self.tables.len() as u64).to_le_bytes());
        for (i, v) in self.tables.iter().enumerate() {
            let at = ROOT_HEADER + 8 * i;
            p[at..at + 8].copy_from_slice(&v.0.to_le_bytes());
        }
        p
    }

    pub(super) fn decode(p: &[u8]) -> Result<RootRec, String> {
        if p.len() != SECTOR {
            return Err("root record of the wrong size".into());
        }
        if p[0..8] != ROOT_TAG {
            if p[16..].iter().any(|b| *b != 0) {
                return Err("root record of an unknown format".into());
            }
            return Ok(RootRec::Legacy {
                len: le64(p, 0),
                high: le64(p, 8),
            });
        }
        let count = le64(p, 24);
        if count > MAX_TABLES as u64 {
            return Err(format!("root record names {count} table sectors"));
        }
        let root = Root {
            len: le64(p, 8),
            limit: le64(p, 16),
            tables: (0..count as usize)
                .map(|i| Ver(le64(p, ROOT_HEADER + 8 * i)))
                .collect(),
        };
        if root.limit > MAX_SEQ {
            return Err(format!(
                "root record claims sequence numbers up to {}",
                root.limit
            ));
        }
        if root.tables.iter().any(|v| !v.plausible(root.limit)) {
            return Err("root record names an impossible table version".into());
        }
        Ok(RootRec::Versioned(root))
    }
}

/// What one slot holds, as far as this store is concerned.
pub(super) enum Slot {
    /// Ours, for the sector asked: sequence number and payload.
    Valid(u64, Box<[u8]>),
    /// All zeros: never written (or erased).
    Empty,
    /// A valid slot of another pool (a reused device).
    Foreign,
    /// A valid slot of this pool for another sector, and its sequence.
    Moved(u64, u64),
    /// Checksum mismatch.
    Damaged,
    /// The read failed (EIO: a device error, or crypt's MAC check).
    Failed(Errno),
}

impl Slot {
    pub(super) fn describe(&self) -> String {
        match self {
            Slot::Valid(q, _) => format!("version {q}"),
            Slot::Empty => "an empty slot".into(),
            Slot::Foreign => "a slot of another pool".into(),
            Slot::Moved(s, _) => format!("the slot of {} (moved)", sector_name(*s)),
            Slot::Damaged => "a damaged slot (checksum)".into(),
            Slot::Failed(e) if *e == Errno::EIO => {
                "a slot that fails to read (EIO: damaged, or MAC mismatch)".into()
            }
            Slot::Failed(e) => format!("a slot that fails to read ({e})"),
        }
    }
    /// The sequence number of a valid slot of this pool, whatever its sector.
    pub(super) fn seq(&self) -> Option<u64> {
        match self {
            Slot::Valid(q, _) | Slot::Moved(_, q) => Some(*q),
            _ => None,
        }
    }
}

pub(super) fn sector_name(s: u64) -> String {
    if s == ROOT_SECTOR {
        "root record".into()
    } else if s >= TABLE_BASE {
        format!("version table sector {}", s - TABLE_BASE)
    } else {
        format!("sector {s}")
    }
}

/// Where the pairs are: the root at pair 0, data sector `s` at pair `s + 1`,
/// table sector `t` at pair `pairs − 1 − t`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Layout {
    pub(super) pairs: u64,
    /// Data sectors the store may use.
    pub(super) data: u64,
    /// Table sectors needed to cover them.
    pub(super) tables: u64,
}

impl Layout {
    pub(super) fn of(region: u64) -> Layout {
        let pairs = region / PAIR;
        let avail = pairs.saturating_sub(1);
        // d data sectors need ceil(d/512) table pairs: share `avail` so.
        let t = avail.div_ceil(PER_TABLE + 1);
        let data = (avail - t).min(MAX_TABLES as u64 * PER_TABLE);
        Layout {
            pairs,
            data,
            tables: data.div_ceil(PER_TABLE),
        }
    }
}

/// A sector's version and bytes, as read.
pub(super) type Versioned = (Ver, Box<[u8]>);
